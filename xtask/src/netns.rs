//! The `--netns` topology: two network namespaces joined by a veth pair, and
//! a guard that removes them however the benchmark ends.
//!
//! Everything is created inside the namespaces (the veth pair is born there
//! with `ip link add ... netns`), so the host's own interfaces, addresses
//! and sysctls are never touched.

use std::io::ErrorKind;
use std::net::Ipv6Addr;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Prefix of every namespace we create; stale-namespace cleanup only ever
/// looks at names with this prefix.
const PREFIX: &str = "i2b-";

/// Unique local addresses (fd71:7e57::/48) so nothing can collide with a
/// real network the host is on.
pub const SERVER_IP: Ipv6Addr = Ipv6Addr::new(0xfd71, 0x7e57, 0, 1, 0, 0, 0, 1);
pub const CLIENT_IP: Ipv6Addr = Ipv6Addr::new(0xfd71, 0x7e57, 0, 1, 0, 0, 0, 2);
const PREFIX_LEN: u8 = 64;

/// Interface names only need to be unique inside their own namespace.
pub const SERVER_DEV: &str = "i2b-srv";
const CLIENT_DEV: &str = "i2b-cli";

/// The two namespaces. Dropping it kills whatever still runs inside them and
/// deletes them (deleting a namespace also deletes its veth end).
pub struct Topology {
    pub server_ns: String,
    pub client_ns: String,
    /// Namespaces created so far, so a half-built topology is removed too.
    created: Vec<String>,
}

impl Topology {
    /// Builds the topology for this process. `mtu` applies to both veth
    /// ends, each of which gets `queues` RX and TX queues.
    pub fn create(mtu: u32, queues: usize) -> Result<Topology> {
        let pid = std::process::id();
        let mut topo = Topology {
            server_ns: format!("{PREFIX}srv-{pid}"),
            client_ns: format!("{PREFIX}cli-{pid}"),
            created: Vec::new(),
        };
        for ns in [topo.server_ns.clone(), topo.client_ns.clone()] {
            ip(&["netns", "add", &ns])?;
            topo.created.push(ns.clone());
            // A fresh namespace has its own sysctls: set them before the
            // veth exists so it inherits them. No DAD means addresses are
            // usable at once instead of after ~1-2 s of probing.
            ns_sh(
                &ns,
                "echo 0 > /proc/sys/net/ipv6/conf/all/disable_ipv6 && \
                 echo 0 > /proc/sys/net/ipv6/conf/default/disable_ipv6 && \
                 echo 0 > /proc/sys/net/ipv6/conf/all/accept_dad && \
                 echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad && \
                 echo 0 > /proc/sys/net/ipv6/conf/default/dad_transmits",
            )?;
            ip(&["-n", &ns, "link", "set", "dev", "lo", "up"])?;
        }
        let queues = queues.max(1).to_string();
        ip(&[
            "link",
            "add",
            SERVER_DEV,
            "netns",
            &topo.server_ns,
            "numtxqueues",
            &queues,
            "numrxqueues",
            &queues,
            "type",
            "veth",
            "peer",
            "name",
            CLIENT_DEV,
            "netns",
            &topo.client_ns,
            "numtxqueues",
            &queues,
            "numrxqueues",
            &queues,
        ])?;
        let mtu = mtu.to_string();
        for (ns, dev, addr) in [
            (&topo.server_ns, SERVER_DEV, SERVER_IP),
            (&topo.client_ns, CLIENT_DEV, CLIENT_IP),
        ] {
            ip(&["-n", ns, "link", "set", "dev", dev, "mtu", &mtu])
                .with_context(|| format!("setting MTU {mtu} on the veth pair"))?;
            let cidr = format!("{addr}/{PREFIX_LEN}");
            ip(&["-n", ns, "-6", "addr", "add", &cidr, "dev", dev, "nodad"])?;
            ip(&["-n", ns, "link", "set", "dev", dev, "up"])?;
        }
        Ok(topo)
    }

    /// A command that runs `program` inside namespace `ns`. `ip netns exec`
    /// execs the program in place (no fork), so the child's pid is the
    /// program's pid, which is what /proc measurements need.
    pub fn exec(ns: &str, program: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(program);
        cmd
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            if let Err(e) = remove(ns) {
                eprintln!("bench-40g: could not remove namespace {ns}: {e:#}");
            }
        }
    }
}

/// Checks what --netns needs before anything is created.
pub fn preflight() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "--netns needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) to create network \
             namespaces; run it as root, e.g. `sudo -E cargo xtask bench-40g --netns ...`"
        );
    }
    ip(&["-V"]).context("checking for iproute2")?;
    Ok(())
}

/// Removes namespaces left by an earlier run that died without cleaning up
/// (SIGKILL, power loss). A name is stale when the pid it carries is no
/// longer an xtask process; checking the process name as well as the pid
/// keeps a recycled pid from protecting a stale namespace forever.
pub fn remove_stale() -> Result<()> {
    let list = ip(&["netns", "list"])?;
    for line in list.lines() {
        // Lines look like `name` or `name (id: 3)`.
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.rsplit('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && xtask_alive(pid) {
            continue;
        }
        eprintln!("bench-40g: removing stale namespace {name} (pid {pid} is gone)");
        remove(name)?;
    }
    Ok(())
}

/// Whether `pid` is a live xtask process, i.e. the owner of the `i2b-*`
/// namespaces and scratch directory named after it.
pub fn xtask_alive(pid: u32) -> bool {
    // A killed xtask can linger as a zombie until its parent reaps it (some
    // inits are slow to); a zombie cleans nothing up, so it counts as gone.
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
        return false;
    };
    let state = stat[close + 1..].split_whitespace().next().unwrap_or("");
    &stat[open + 1..close] == "xtask" && !matches!(state, "Z" | "X")
}

/// Kills every process still inside `ns`, then deletes it. A process left
/// inside would keep the namespace (and its veth) alive after its name is
/// gone, invisible to `ip netns list`.
pub(crate) fn remove(ns: &str) -> Result<()> {
    if let Ok(pids) = ip(&["netns", "pids", ns]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // SIGKILL is asynchronous; give the kernel a moment to tear the
        // processes down so the namespace really goes away.
        for _ in 0..50 {
            if ip(&["netns", "pids", ns]).is_ok_and(|p| p.trim().is_empty()) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    ip(&["netns", "del", ns])?;
    Ok(())
}

/// Runs a shell snippet inside `ns`; writes to /proc/sys/net land in the
/// namespace of the writing process, so this sets namespace-local sysctls
/// without needing the `sysctl` tool.
pub(crate) fn ns_sh(ns: &str, script: &str) -> Result<()> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", script])
        .output()
        .context("running `ip netns exec`")?;
    if !out.status.success() {
        bail!(
            "setting sysctls in {ns} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `ip ARGS`, returning stdout, or an error that shows the command and
/// its stderr.
pub fn ip(args: &[&str]) -> Result<String> {
    let out = match Command::new("ip").args(args).output() {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            bail!("`ip` not found in PATH: --netns needs iproute2 (apt-get install iproute2)")
        }
        Err(e) => return Err(e).context("running `ip`"),
    };
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
