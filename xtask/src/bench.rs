//! Running the benchmark roles and measuring them.
//!
//! The binaries under test are built once by cargo and then run directly
//! (never through `cargo run`), so the server's pid is the process whose
//! CPU time and memory /proc reports.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use crate::netns::{self, CLIENT_IP, SERVER_IP, Topology};
use crate::report::{Flavor, Metrics, Report, Run, Side};
use crate::{BenchArgs, Role};

/// How long a server may take to print its `listening on` line.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a server may drain after SIGTERM before it gets SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// First port; each run gets the next one, so a run never meets packets or
/// state left by the previous server on the same port.
const BASE_PORT: u16 = 4433;
/// Both servers get the same stream limit and socket buffers so the
/// comparison measures the stacks, not their different defaults (quinn
/// allocates per-stream state up front, which would inflate its RSS at the
/// quinn-baseline default of 1024).
const MAX_STREAMS: usize = 256;
const SOCKET_BUFFER: usize = 16 << 20;
/// Above this many connections, only one moves data unless --active says
/// otherwise: large counts measure what held connections cost.
const ACTIVE_ALL_UP_TO: usize = 32;
/// Limits of the impaired path (inside what `impair-relay` accepts): a
/// path beyond them is a mistyped flag, not an experiment.
const DELAY_MS_MAX: f64 = 10_000.0;
const QUEUE_MS_MAX: f64 = 10_000.0;
const RATE_MBIT_MAX: f64 = 100_000.0;
/// The largest --transfer-mib: 1 TiB per stream.
const TRANSFER_MIB_MAX: u64 = 1 << 20;

/// The bottleneck's queue when --rate-mbit comes without --queue-ms.
const QUEUE_MS_DEFAULT: f64 = 50.0;

// ---------------------------------------------------------------------------
// Interrupts

/// Set by SIGINT/SIGTERM/SIGHUP. The process does not die on those signals:
/// every wait loop polls this flag and unwinds through the guards, so the
/// namespaces and child processes are always cleaned up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The error returned when the user interrupted the run.
#[derive(Debug)]
pub struct Interrupted;

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

extern "C" fn on_signal(_sig: libc::c_int) {
    // Only an atomic store: the one thing that is async-signal-safe here.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

pub(crate) fn install_signal_handlers() -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only performs an atomic store, and the
        // sigaction struct is fully initialised (zeroed, then set).
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("installing a signal handler");
        }
    }
    Ok(())
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

pub(crate) fn check_interrupt() -> Result<()> {
    if interrupted() {
        Err(Interrupted.into())
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Entry point

pub fn bench_40g(args: &BenchArgs) -> Result<()> {
    validate(args)?;
    if args.netns {
        // Fail fast, before a possibly long build.
        netns::preflight()?;
    }
    install_signal_handlers()?;
    let bins = build()?;
    check_interrupt()?;
    match args.role {
        Some(Role::Server) => run_server_role(args, &bins),
        Some(Role::Client) => {
            let report = run_client_role(args, &bins)?;
            finish(args, &report)
        }
        None => {
            let report = run_netns(args, &bins)?;
            finish(args, &report)
        }
    }
}

fn validate(args: &BenchArgs) -> Result<()> {
    if args.runs == 0 || args.runs > 1000 {
        bail!("--runs must be between 1 and 1000");
    }
    if args.duration == 0 {
        bail!("--duration must be at least 1 second");
    }
    if !(1..=3600).contains(&args.keep_alive) {
        bail!("--keep-alive must be between 1 and 3600 seconds");
    }
    if args.connections == 0 || args.streams == 0 || args.client_workers == 0 {
        bail!("--connections, --streams and --client-workers must be at least 1");
    }
    if args.active == Some(0) {
        bail!("--active must be at least 1");
    }
    if let Some(mib) = args.transfer_mib {
        if args.client == crate::ClientKind::Quinn {
            bail!("--transfer-mib needs --client ours (the quinn-baseline client runs timed)");
        }
        if args.handshake_only {
            bail!("--transfer-mib moves data; drop --handshake-only");
        }
        if !(1..=TRANSFER_MIB_MAX).contains(&mib) {
            bail!("--transfer-mib {mib}: must be 1 to {TRANSFER_MIB_MAX} MiB per stream");
        }
    }
    if args.resume && args.client == crate::ClientKind::Quinn {
        bail!("--resume needs --client ours (the quinn-baseline client never resumes)");
    }
    // Checked here rather than with clap's `requires`, which did not reject
    // these flags next to the required `mode` group.
    if args.compare && !args.netns {
        bail!(
            "--compare needs --netns; across two hosts run the server role with --baseline \
             and the client role with --baseline instead"
        );
    }
    if args.matrix && !args.netns {
        bail!("--matrix needs --netns");
    }
    if args.matrix && args.compare {
        bail!("--matrix already runs the quinn baseline; drop --compare");
    }
    if args.backend == crate::Backend::Xdp
        && args.role == Some(Role::Server)
        && args.xdp_interface.is_none()
    {
        bail!(
            "--backend xdp in the server role needs --xdp-interface IF (the NIC the workers bind)"
        );
    }
    if args.xdp_interface.is_some() && args.role != Some(Role::Server) {
        bail!("--xdp-interface is for --role server; --netns uses its own veth");
    }
    if args.baseline && args.role.is_none() {
        bail!("--baseline is for two-host mode (--role); --netns uses --compare");
    }
    let ipv6 = |a: &Option<SocketAddr>, flag: &str| match a {
        Some(a) if !a.is_ipv6() => bail!("{flag} {a}: IPv6 only, e.g. [::1]:4433"),
        _ => Ok(()),
    };
    ipv6(&args.listen, "--listen")?;
    ipv6(&args.connect, "--connect")?;
    match args.role {
        None => {
            for (set, flag) in [
                (args.listen.is_some(), "--listen"),
                (args.connect.is_some(), "--connect"),
                (args.ca.is_some(), "--ca"),
                (args.data_dir.is_some(), "--data-dir"),
            ] {
                if set {
                    bail!("{flag} is for two-host mode (--role); --netns picks its own");
                }
            }
            if !(1280..=65535).contains(&args.mtu) {
                bail!("--mtu must be between 1280 (the IPv6 minimum) and 65535");
            }
        }
        Some(Role::Server) => {
            if args.listen.is_none() {
                bail!("--role server needs --listen, e.g. --listen [::]:4433");
            }
            if args.connect.is_some() || args.ca.is_some() {
                bail!("--connect and --ca are for --role client");
            }
        }
        Some(Role::Client) => {
            if args.connect.is_none() {
                bail!("--role client needs --connect, e.g. --connect [2001:db8::1]:4433");
            }
            if args.ca.is_none() && args.client == crate::ClientKind::Ours {
                bail!(
                    "--role client with --client ours needs --ca PATH: the CA (or, for the \
                     quinn baseline, the cert.pem) the server role printed"
                );
            }
            if args.listen.is_some() || args.data_dir.is_some() {
                bail!("--listen and --data-dir are for --role server");
            }
        }
    }
    validate_impairment(args)?;
    validate_congestion(args)
}

/// --delay-ms, --loss, --rate-mbit and --queue-ms.
fn validate_impairment(args: &BenchArgs) -> Result<()> {
    let any = args.delay_ms.is_some()
        || args.loss.is_some()
        || args.rate_mbit.is_some()
        || args.queue_ms.is_some();
    if any && !args.netns {
        bail!(
            "--delay-ms, --loss, --rate-mbit and --queue-ms need --netns (the relay runs in \
             the client namespace); across two hosts the path is the real one"
        );
    }
    if let Some(delay) = args.delay_ms
        && !(0.0..=DELAY_MS_MAX).contains(&delay)
    {
        bail!(
            "--delay-ms {delay}: the one-way delay must be 0 to {DELAY_MS_MAX} ms \
             (20 ms RTT is --delay-ms 10)"
        );
    }
    if let Some(loss) = args.loss
        && !(0.0..1.0).contains(&loss)
    {
        bail!("--loss {loss}: a probability per datagram, at least 0 and below 1 (0.01 is 1%)");
    }
    if let Some(rate) = args.rate_mbit
        && !(rate > 0.0 && rate <= RATE_MBIT_MAX)
    {
        bail!("--rate-mbit {rate}: the bottleneck must be above 0 and at most {RATE_MBIT_MAX}");
    }
    if let Some(queue) = args.queue_ms {
        if args.rate_mbit.is_none() {
            bail!("--queue-ms {queue}: the queue is the bottleneck's; give --rate-mbit too");
        }
        if !(queue > 0.0 && queue <= QUEUE_MS_MAX) {
            bail!("--queue-ms {queue}: must be above 0 and at most {QUEUE_MS_MAX} ms");
        }
    }
    Ok(())
}

/// --congestion. Whether our server knows a name is its own to say
/// (`check_controllers`); this catches what cannot work at all.
fn validate_congestion(args: &BenchArgs) -> Result<()> {
    if args.congestion.is_empty() {
        return Ok(());
    }
    if args.compare || args.matrix || args.baseline {
        bail!(
            "--congestion sets our server's controller, but --compare, --matrix and --baseline \
             also measure the quinn baseline, which keeps quinn's (cubic): compare \
             controllers without them"
        );
    }
    if args.role == Some(Role::Client) {
        bail!("--congestion is the server's (it sends the bulk data): give it to the server role");
    }
    if args.role == Some(Role::Server) && args.congestion.len() > 1 {
        bail!("--role server runs one server: give --congestion one name");
    }
    for (i, name) in args.congestion.iter().enumerate() {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            bail!(
                "--congestion {name:?}: not a controller name (lowercase letters and digits, \
                 e.g. cubic,bbr,newreno)"
            );
        }
        if args.congestion[..i].contains(name) {
            bail!("--congestion names {name} twice");
        }
    }
    Ok(())
}

/// Prints the table and writes the JSON.
fn finish(args: &BenchArgs, report: &Report) -> Result<()> {
    print!("{}", report.table());
    if let Some(path) = &args.json {
        report.write_json(path)?;
        eprintln!("bench-40g: wrote {}", path.display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Build

struct Binaries {
    server: PathBuf,
    client: PathBuf,
    baseline: PathBuf,
    relay: PathBuf,
}

/// Builds the two packages under test.
fn build() -> Result<Binaries> {
    let mut take = build_release(
        "bench-40g",
        &["-p", "internet2-server", "-p", "internet2-benches"],
    )?;
    Ok(Binaries {
        server: take("internet2-server")?,
        client: take("internet2")?,
        baseline: take("quinn-baseline")?,
        relay: take("impair-relay")?,
    })
}

/// `cargo build --release ARGS` in the workspace (a no-op when up to date),
/// taking the executables' paths from cargo's own messages so a custom
/// target directory just works. Returns a lookup by binary name.
pub(crate) fn build_release(
    task: &str,
    args: &[&str],
) -> Result<impl FnMut(&str) -> Result<PathBuf>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask lives inside the workspace")?;
    eprintln!("{task}: cargo build --release {}", args.join(" "));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut child = Command::new(cargo)
        .current_dir(root)
        .args(["build", "--release"])
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo build")?;
    let mut executables = HashMap::new();
    let stdout = child.stdout.take().context("cargo stdout")?;
    for line in BufReader::new(stdout).lines() {
        let Ok(msg) = serde_json::from_str::<Value>(&line?) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        if let (Some(name), Some(exe)) =
            (msg["target"]["name"].as_str(), msg["executable"].as_str())
        {
            executables.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    let status = child.wait()?;
    // A terminal Ctrl-C reaches cargo too (same process group) and fails
    // the build; that is an interrupt, not a build error.
    check_interrupt()?;
    if !status.success() {
        bail!("cargo build failed ({status})");
    }
    Ok(move |name: &str| {
        executables
            .remove(name)
            .ok_or_else(|| anyhow!("cargo build did not report the `{name}` executable"))
    })
}

// ---------------------------------------------------------------------------
// --netns

fn run_netns(args: &BenchArgs, bins: &Binaries) -> Result<Report> {
    netns::remove_stale()?;
    remove_stale_work_dirs(WORK_PREFIX);
    let work = WorkDir::create(WORK_PREFIX)?;
    check_controllers(args, bins, &work)?;
    // Declared after `work`, so it is dropped first: namespaces go before
    // the directory their processes were writing to.
    // One veth queue per server worker, so the AF_XDP backend binds one
    // queue each (veth spreads flows over queues like RSS).
    let topo = Topology::create(args.mtu, args.workers.unwrap_or(1))?;
    eprintln!(
        "bench-40g: namespaces {} [{SERVER_IP}] and {} [{CLIENT_IP}], veth MTU {}",
        topo.server_ns, topo.client_ns, args.mtu
    );
    let clk_tck = clk_tck()?;
    let sides: Vec<Side> = if args.matrix {
        vec![
            Side::Ours(Flavor::UringSteering),
            Side::Ours(Flavor::UringHandoff),
            Side::Ours(Flavor::Xdp),
            Side::Baseline,
        ]
    } else if args.compare {
        vec![Side::OURS, Side::Baseline]
    } else if !args.congestion.is_empty() {
        // The labels live as long as the process: a few short names,
        // leaked once, keep `Side` a plain copyable value.
        args.congestion
            .iter()
            .map(|name| Side::Ours(Flavor::Congestion(name.clone().leak())))
            .collect()
    } else {
        vec![Side::OURS]
    };
    if let Some(path) = Impairment::from_args(args) {
        eprintln!("bench-40g: impaired path through impair-relay: {path}");
    }
    let mut runs = Vec::new();
    for run in 0..args.runs {
        for &side in &sides {
            check_interrupt()?;
            let index = runs.len();
            let port = BASE_PORT + index as u16;
            eprintln!(
                "bench-40g: run {}/{} [{}] port {port}",
                run + 1,
                args.runs,
                side.label()
            );
            let log = work
                .path
                .join(format!("server-{index}-{}.log", side.label()));
            let id = RunId { index, round: run };
            let (metrics, relay) = netns_run(
                args, bins, &topo, &work, side, port, id, clk_tck, &log,
            )
            .map_err(|e| {
                // The server log is the first thing to look at, and it
                // is deleted with the scratch directory: show its end.
                if e.is::<Interrupted>() {
                    e
                } else {
                    let tail = log_tail(&log);
                    e.context(format!("run {} [{}] failed{tail}", index + 1, side.label()))
                }
            })?;
            runs.push(Run {
                side,
                metrics,
                relay,
            });
        }
    }
    Ok(Report {
        setup: setup(args, "netns"),
        runs,
    })
}

/// Which run of a --netns invocation: `index` counts every run (ports,
/// file names), `round` the passes over the sides (the relay's seed, so
/// every side of a round meets the same losses).
#[derive(Clone, Copy)]
struct RunId {
    index: usize,
    round: usize,
}

/// One run in the namespaces: start a server (and the impairment relay
/// when asked for), run the client against it, measure the server, stop
/// it. Returns the figures and the relay's stats.
#[allow(clippy::too_many_arguments)]
fn netns_run(
    args: &BenchArgs,
    bins: &Binaries,
    topo: &Topology,
    work: &WorkDir,
    side: Side,
    port: u16,
    id: RunId,
    clk_tck: f64,
    log: &Path,
) -> Result<(Metrics, Option<Value>)> {
    let index = id.index;
    let addr = SocketAddr::new(IpAddr::V6(SERVER_IP), port);
    let data_dir = work.path.join("data");
    let server_cmd = match side {
        Side::Ours(flavor) => {
            let config = work.path.join(format!("server-{index}.toml"));
            write_config(&config, &our_netns_server(args, addr, flavor))?;
            let mut cmd = Topology::exec(&topo.server_ns, &bins.server);
            cmd.arg("--config")
                .arg(&config)
                .arg("--data-dir")
                .arg(&data_dir);
            cmd
        }
        Side::Baseline => {
            let mut cmd = Topology::exec(&topo.server_ns, &bins.baseline);
            cmd.args(baseline_server_args(
                args,
                addr,
                &baseline_cert_dir(work, index),
            ));
            cmd
        }
    };
    let log_file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let (mut server, listening) = start_server(server_cmd, side, Stdio::from(log_file))?;
    let pid = server.pid();
    // `ip netns exec` must have exec'd the server itself; if it ever forks,
    // /proc of this pid would measure `ip`, not the server.
    if std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "ip") {
        bail!("`ip netns exec` forked instead of exec'ing; cannot measure the server");
    }
    let ca = match side {
        Side::Ours(_) => listening_ca(&listening).unwrap_or_else(|| data_dir.join("ca.pem")),
        Side::Baseline => baseline_cert_dir(work, index).join("cert.pem"),
    };

    // Started after the server is up and stopped (for its stats) right
    // after the client: its counters cover the client's run alone.
    let relay = match Impairment::from_args(args) {
        Some(path) => Some(ImpairRelay::start(&path, bins, topo, work, addr, id)?),
        None => None,
    };
    // The client's server: the relay in its own namespace, or the server.
    let target = relay.as_ref().map_or(addr, |r| r.addr);

    let (_, rss_before) = proc_mem(pid)?;
    let cpu_before = proc_cpu_ticks(pid)?;
    let client_json = work.path.join(format!("client-{index}.json"));
    let client_cmd = client_command(args, bins, Some(&topo.client_ns), target, &ca, &client_json);
    let started = Instant::now();
    run_client(client_cmd, args.client, side, client_timeout(args))?;
    let wall = started.elapsed().as_secs_f64();
    if let Some(status) = server.child.try_wait()? {
        bail!("{} exited during the client run ({status})", server.name);
    }
    let relay_stats = relay.map(ImpairRelay::stop).transpose()?;
    let cpu_after = proc_cpu_ticks(pid)?;
    let (hwm, rss_end) = proc_mem(pid)?;
    // Read before stopping: the counters die with the server.
    let handoff_ratio = match side {
        Side::Ours(_) => handoff_ratio(Topology::exec(&topo.client_ns, &bins.client), addr, &ca)?,
        Side::Baseline => None,
    };
    let status = server.stop()?;
    if !status.success() {
        bail!("{} exited with {status} after SIGTERM", server.name);
    }

    let client = ClientResult::read(&client_json)?;
    let cpu_s = (cpu_after.saturating_sub(cpu_before)) as f64 / clk_tck;
    let cores = cpu_s / wall;
    let connections = client.get("connections");
    let (full, resumed) = cpu_per_handshake(args, &client, side, cpu_s)?;
    let metrics = Metrics {
        server_cpu_us_per_handshake: full,
        server_cpu_us_per_resumed_handshake: resumed,
        server_cpu_s: Some(cpu_s),
        server_cpu_cores: Some(cores),
        gbps_per_server_core: client
            .get("goodput_gbps")
            .filter(|_| cores > 0.0)
            .map(|g| g / cores),
        server_rss_bytes: Some(hwm as f64),
        server_rss_end_bytes: Some(rss_end as f64),
        // Churned connections (--handshake-only) have no steady per-connection
        // footprint to divide by.
        server_rss_per_idle_connection: connections
            .filter(|&c| c > 0.0 && !args.handshake_only)
            .map(|c| hwm.saturating_sub(rss_before) as f64 / c),
        handoff_ratio,
        transfer_s: transfer_seconds(args, &client)?,
        ..client.metrics()
    };
    Ok(match relay_stats {
        Some(stats) => (with_relay_stats(metrics, &stats), Some(stats)),
        None => (metrics, None),
    })
}

/// Our server's settings for one flavor in the namespaces.
fn our_netns_server(args: &BenchArgs, addr: SocketAddr, flavor: Flavor) -> OurServer<'static> {
    let (backend, steering) = flavor_settings(args, flavor);
    OurServer {
        addr,
        backend,
        workers: args.workers.unwrap_or(1),
        steering,
        xdp: (backend == crate::Backend::Xdp).then_some(netns::SERVER_DEV),
        max_udp_payload: max_udp_payload(args, backend),
        idle_timeout: server_idle_timeout(args),
        congestion: match flavor {
            Flavor::Congestion(name) => Some(name),
            _ => None,
        },
    }
}

/// Has our server load a configuration with each --congestion name, so a
/// name it does not know fails here, in its own words, before any
/// namespace exists.
fn check_controllers(args: &BenchArgs, bins: &Binaries, work: &WorkDir) -> Result<()> {
    for name in &args.congestion {
        let config = work.path.join(format!("check-{name}.toml"));
        let addr = SocketAddr::new(IpAddr::V6(SERVER_IP), BASE_PORT);
        // Only the controller is in question; an XDP interface does not
        // exist yet.
        let server = OurServer {
            backend: crate::Backend::Uring,
            xdp: None,
            congestion: Some(name),
            ..our_netns_server(args, addr, Flavor::AsConfigured)
        };
        write_config(&config, &server)?;
        let out = Command::new(&bins.server)
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(work.path.join("check"))
            .arg("--check-config")
            .output()
            .context("running internet2-server --check-config")?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let why = stderr.trim();
            bail!(
                "--congestion {name}: our server does not take it: {}",
                why.strip_prefix("error: ").unwrap_or(why)
            );
        }
    }
    Ok(())
}

/// The impaired path of --delay-ms, --loss, --rate-mbit and --queue-ms.
struct Impairment {
    delay_ms: f64,
    loss: f64,
    rate_mbit: Option<f64>,
    queue_ms: f64,
}

impl Impairment {
    /// `None` when no flag asks for the relay.
    fn from_args(args: &BenchArgs) -> Option<Impairment> {
        (args.delay_ms.is_some() || args.loss.is_some() || args.rate_mbit.is_some()).then(|| {
            Impairment {
                delay_ms: args.delay_ms.unwrap_or(0.0),
                loss: args.loss.unwrap_or(0.0),
                rate_mbit: args.rate_mbit,
                queue_ms: args.queue_ms.unwrap_or(QUEUE_MS_DEFAULT),
            }
        })
    }
}

impl fmt::Display for Impairment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ms one way, loss {} each way",
            self.delay_ms, self.loss
        )?;
        match self.rate_mbit {
            Some(rate) => write!(f, ", {rate} Mbit/s with a {} ms queue", self.queue_ms),
            None => f.write_str(", no bottleneck"),
        }
    }
}

/// One run's impairment relay, in the client namespace: it listens on the
/// client's own address at the server's port and forwards over the veth
/// to the server, so only the client's destination changes.
struct ImpairRelay {
    proc: Proc,
    addr: SocketAddr,
    stats: PathBuf,
    log: PathBuf,
}

impl ImpairRelay {
    fn start(
        path: &Impairment,
        bins: &Binaries,
        topo: &Topology,
        work: &WorkDir,
        server: SocketAddr,
        id: RunId,
    ) -> Result<ImpairRelay> {
        let addr = SocketAddr::new(IpAddr::V6(CLIENT_IP), server.port());
        let stats = work.path.join(format!("relay-{}.json", id.index));
        let log = work.path.join(format!("relay-{}.log", id.index));
        let mut cmd = Topology::exec(&topo.client_ns, &bins.relay);
        cmd.args(["--listen", &addr.to_string()])
            .args(["--upstream", &server.to_string()])
            .args(["--delay-ms", &path.delay_ms.to_string()])
            .args(["--loss", &path.loss.to_string()])
            .args(["--seed", &(id.round + 1).to_string()])
            .arg("--stats")
            .arg(&stats);
        if let Some(rate) = path.rate_mbit {
            cmd.args(["--rate-mbit", &rate.to_string()])
                .args(["--queue-ms", &path.queue_ms.to_string()]);
        }
        let log_file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let (proc, _) = start_listening(cmd, "impair-relay", "relay", Stdio::from(log_file))
            .map_err(|e| {
                let tail = log_tail(&log);
                e.context(format!("starting the impairment relay{tail}"))
            })?;
        Ok(ImpairRelay {
            proc,
            addr,
            stats,
            log,
        })
    }

    /// SIGTERM, then the stats it wrote on its way out.
    fn stop(mut self) -> Result<Value> {
        let status = self.proc.stop()?;
        if !status.success() {
            bail!(
                "impair-relay exited with {status} after SIGTERM{}",
                log_tail(&self.log)
            );
        }
        let text = std::fs::read_to_string(&self.stats)
            .with_context(|| format!("impair-relay wrote no stats to {}", self.stats.display()))?;
        let stats: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", self.stats.display()))?;
        let dir = |d: &str, k: &str| stats[d][k].as_f64().unwrap_or(f64::NAN);
        eprintln!(
            "bench-40g: relay: to client {} datagrams, queue p50 {:.2} / p99 {:.2} ms, lost {}, \
             queue drops {}; to server {} datagrams, lost {}, queue drops {}",
            dir("to_client", "datagrams_in"),
            dir("to_client", "queue_ms_p50"),
            dir("to_client", "queue_ms_p99"),
            dir("to_client", "dropped_loss"),
            dir("to_client", "dropped_queue"),
            dir("to_server", "datagrams_in"),
            dir("to_server", "dropped_loss"),
            dir("to_server", "dropped_queue"),
        );
        Ok(stats)
    }
}

/// A run's figures with the relay's queue and drops added.
fn with_relay_stats(metrics: Metrics, stats: &Value) -> Metrics {
    let get = |dir: &str, key: &str| stats[dir][key].as_f64();
    Metrics {
        relay_to_client_queue_ms_p50: get("to_client", "queue_ms_p50"),
        relay_to_client_queue_ms_p99: get("to_client", "queue_ms_p99"),
        relay_to_client_dropped_loss: get("to_client", "dropped_loss"),
        relay_to_client_dropped_queue: get("to_client", "dropped_queue"),
        relay_to_server_dropped_loss: get("to_server", "dropped_loss"),
        relay_to_server_dropped_queue: get("to_server", "dropped_queue"),
        ..metrics
    }
}

/// Server CPU µs per handshake of a handshake-only run: full, or resumed
/// with --resume. A --resume run in which the server did not resume (nearly)
/// every handshake is an error, not a figure.
fn cpu_per_handshake(
    args: &BenchArgs,
    client: &ClientResult,
    side: Side,
    cpu_s: f64,
) -> Result<(Option<f64>, Option<f64>)> {
    let Some(handshakes) = client.get("handshakes").filter(|&h| h > 0.0) else {
        return Ok((None, None));
    };
    if !args.handshake_only {
        return Ok((None, None));
    }
    let per = Some(cpu_s * 1e6 / handshakes);
    if !args.resume {
        return Ok((per, None));
    }
    let resumed = client.get("handshakes_resumed").unwrap_or(0.0);
    if resumed < 0.9 * handshakes {
        bail!(
            "--resume: the {} server resumed {resumed} of {handshakes} handshakes; \
             per-resumed-handshake CPU would measure full handshakes",
            side.label()
        );
    }
    Ok((None, per))
}

/// Where the quinn baseline of run `index` writes its certificate.
fn baseline_cert_dir(work: &WorkDir, index: usize) -> PathBuf {
    work.path.join(format!("baseline-{index}"))
}

/// The backend and steering of one flavor of our server.
fn flavor_settings(args: &BenchArgs, flavor: Flavor) -> (crate::Backend, crate::Steering) {
    use crate::{Backend, Steering};
    match flavor {
        Flavor::UringSteering => (Backend::Uring, Steering::On),
        Flavor::UringHandoff => (Backend::Uring, Steering::Off),
        Flavor::Xdp => (Backend::Xdp, args.steering),
        Flavor::AsConfigured | Flavor::Congestion(_) => (args.backend, args.steering),
    }
}

/// The largest UDP payload both ends use (MTU discovery's ceiling): what
/// the path MTU leaves after the IPv6 and UDP headers, and never more than
/// one AF_XDP frame holds.
fn max_udp_payload(args: &BenchArgs, backend: crate::Backend) -> u32 {
    const IPV6_UDP_HEADERS: u32 = 48;
    const XDP_FRAME_PAYLOAD: u32 = 1452;
    let payload = args.mtu.saturating_sub(IPV6_UDP_HEADERS).clamp(1200, 65527);
    match backend {
        crate::Backend::Xdp => payload.min(XDP_FRAME_PAYLOAD),
        _ => payload,
    }
}

/// What `write_config` puts in our server's config file.
struct OurServer<'a> {
    addr: SocketAddr,
    backend: crate::Backend,
    /// 0: one per core.
    workers: usize,
    steering: crate::Steering,
    xdp: Option<&'a str>,
    max_udp_payload: u32,
    /// Matched to the clients' keep-alive interval.
    idle_timeout: Duration,
    /// `congestion_control`; `None` keeps the server's default.
    congestion: Option<&'a str>,
}

/// Our server's configuration: only what the benchmark controls, the rest
/// stays at the server's defaults. `xdp` names the interface whose queues
/// the `xdp` backend binds (the front door is attached there).
fn write_config(path: &Path, server: &OurServer) -> Result<()> {
    let xdp = server
        .xdp
        .map_or(String::new(), |i| format!("xdp_interface = \"{i}\"\n"));
    // Names are checked to be lowercase letters and digits: no quoting.
    let congestion = server
        .congestion
        .map_or(String::new(), |c| format!("congestion_control = \"{c}\"\n"));
    let text = format!(
        "# Written by `cargo xtask bench-40g`.\n\
         [internet2]\n\
         bind = \"{ip}\"\n\
         port = {port}\n\
         \n\
         [stoq_transport]\n\
         backend = \"{backend}\"\n\
         socket_buffer_bytes = {SOCKET_BUFFER}\n\
         streams_bidi_max = {MAX_STREAMS}\n\
         max_udp_payload_bytes = {max_udp_payload}\n\
         idle_timeout_ms = {idle_timeout_ms}\n\
         {congestion}\
         \n\
         [trustchain_authority]\n\
         perf_without_client_certificate = true\n\
         \n\
         [dataplane]\n\
         workers = {workers}\n\
         steering = \"{steering}\"\n\
         {xdp}",
        ip = server.addr.ip(),
        port = server.addr.port(),
        backend = server.backend.as_str(),
        steering = server.steering.as_str(),
        max_udp_payload = server.max_udp_payload,
        idle_timeout_ms = server.idle_timeout.as_millis(),
        workers = server.workers,
    );
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The clients' keep-alive interval (--keep-alive).
fn keep_alive(args: &BenchArgs) -> Duration {
    Duration::from_secs(args.keep_alive)
}

/// Both servers' idle timeout: twice the clients' keep-alive interval (one
/// keep-alive may be lost), never below our server's default 30 s.
fn server_idle_timeout(args: &BenchArgs) -> Duration {
    (keep_alive(args) * 2).max(Duration::from_secs(30))
}

/// The quinn baseline's server arguments: our server's stream limit and
/// socket buffers, its certificate written to `cert_dir` (for our client's
/// --ca), and session tickets when the run resumes.
fn baseline_server_args(args: &BenchArgs, addr: SocketAddr, cert_dir: &Path) -> Vec<String> {
    let mut argv = vec![
        "--runtime".into(),
        args.baseline_runtime.clone(),
        "--max-udp-payload".into(),
        max_udp_payload(args, crate::Backend::Uring).to_string(),
        "server".into(),
        "--listen".into(),
        addr.to_string(),
        "--max-streams".into(),
        MAX_STREAMS.to_string(),
        "--socket-buffer".into(),
        SOCKET_BUFFER.to_string(),
        "--cert-dir".into(),
        cert_dir.display().to_string(),
        "--idle-timeout".into(),
        server_idle_timeout(args).as_secs().to_string(),
    ];
    if args.resume {
        argv.push("--tickets".into());
    }
    argv
}

/// The command of the --client chosen, against the server at `addr`,
/// inside `ns` when given. Both clients get the same load shape; only ours
/// takes a CA (the server's, or the baseline's own certificate), workers
/// and a backend.
fn client_command(
    args: &BenchArgs,
    bins: &Binaries,
    ns: Option<&str>,
    addr: SocketAddr,
    ca: &Path,
    json: &Path,
) -> Command {
    let program = match args.client {
        crate::ClientKind::Ours => &bins.client,
        crate::ClientKind::Quinn => &bins.baseline,
    };
    let mut cmd = match ns {
        Some(ns) => Topology::exec(ns, program),
        None => Command::new(program),
    };
    match args.client {
        crate::ClientKind::Ours => {
            // AF_XDP is a server backend: the client then runs io_uring.
            let backend = match args.backend {
                crate::Backend::Xdp => crate::Backend::Uring,
                other => other,
            };
            cmd.args(["bench", "--connect", &addr.to_string(), "--ca"])
                .arg(ca)
                .args(["--workers", &args.client_workers.to_string()])
                // The same handshake crypto as the baseline client, which
                // checks the signature but not the chain: the comparison is
                // of the servers, not of certificate path validation.
                .arg("--no-chain-check")
                // Nor client certificates: quinn's client has none.
                .arg("--anonymous")
                .args(["--backend", backend.as_str()]);
            if args.resume {
                cmd.arg("--resume");
            }
            if let Some(mib) = args.transfer_mib {
                cmd.args(["--download", &(mib << 20).to_string()])
                    .args(["--requests", "1"]);
            }
        }
        crate::ClientKind::Quinn => {
            cmd.args(["--runtime", &args.baseline_runtime])
                .args([
                    "--max-udp-payload",
                    &max_udp_payload(args, crate::Backend::Uring).to_string(),
                ])
                .args(["client", "--connect", &addr.to_string()]);
        }
    }
    cmd.args(["--duration", &args.duration.to_string()])
        .args(["--keep-alive", &keep_alive(args).as_secs().to_string()])
        .args(["--connections", &args.connections.to_string()])
        .args(["--streams", &args.streams.to_string()])
        .arg("--json")
        .arg(json);
    if let Some(active) = active(args) {
        cmd.args(["--active", &active.to_string()]);
    }
    if args.handshake_only {
        cmd.arg("--handshake-only");
    }
    cmd
}

/// --transfer-mib: the seconds the transfer took, once every byte of it
/// arrived; a transfer cut short by --duration is an error, not a figure.
fn transfer_seconds(args: &BenchArgs, client: &ClientResult) -> Result<Option<f64>> {
    let Some(mib) = args.transfer_mib else {
        return Ok(None);
    };
    let streams = active(args).unwrap_or(args.connections) * args.streams;
    let expected = streams as u64 * (mib << 20);
    let got = client.get("bytes").unwrap_or(0.0) as u64;
    if got < expected {
        bail!(
            "the transfer of {mib} MiB on each of {streams} stream(s) was not done within \
             --duration {} s ({got} of {expected} bytes arrived); give a longer --duration",
            args.duration
        );
    }
    Ok(client.get("duration_s"))
}

/// Connections that move data: --active, else all of a small count and one
/// of a large count (held connections are the point of a large count).
fn active(args: &BenchArgs) -> Option<usize> {
    match args.active {
        Some(a) => Some(a.min(args.connections)),
        None if args.handshake_only => None,
        None if args.connections > ACTIVE_ALL_UP_TO => Some(1),
        None => None,
    }
}

/// The client measures for --duration after opening its connections; leave
/// generous room for that (at 100 set-ups/s at worst) and for its shutdown
/// before calling it hung.
fn client_timeout(args: &BenchArgs) -> Duration {
    Duration::from_secs(args.duration + 120 + args.connections as u64 / 100)
}

/// handoffs_in / datagrams_rx from our server's live counters. The counters
/// cover the server's lifetime: one run in --netns mode (a fresh server per
/// run), everything since it started in two-host mode.
///
/// Right after a run the server may still be working through the clients'
/// closes (100 000 at once at the end of a hold), which can hold up the
/// operator's admission past its deadline: the read is tried three times.
fn handoff_ratio(mut cmd: Command, addr: SocketAddr, ca: &Path) -> Result<Option<f64>> {
    const TRIES: usize = 3;
    cmd.args(["stats", "--connect", &addr.to_string(), "--ca"])
        .arg(ca)
        .arg("--json");
    let mut tried = 0;
    let out = loop {
        tried += 1;
        let out = cmd.output().context("running `internet2 stats`")?;
        if out.status.success() {
            break out;
        }
        let why = format!(
            "`internet2 stats` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        if tried == TRIES {
            bail!("{why} ({TRIES} tries)");
        }
        eprintln!("bench-40g: {why}; trying again in 2 s");
        std::thread::sleep(Duration::from_secs(2));
    };
    let stats: Value = serde_json::from_slice(&out.stdout)
        .context("`internet2 stats --json` printed something that is not JSON")?;
    let total = &stats["total"];
    let (Some(handoffs_in), Some(datagrams_rx)) = (
        total["handoffs_in"].as_f64(),
        total["datagrams_rx"].as_f64(),
    ) else {
        bail!("`internet2 stats --json` lacks total.handoffs_in or total.datagrams_rx");
    };
    Ok((datagrams_rx > 0.0).then(|| handoffs_in / datagrams_rx))
}

// ---------------------------------------------------------------------------
// Two-host mode

fn run_server_role(args: &BenchArgs, bins: &Binaries) -> Result<()> {
    let listen = args.listen.context("--role server needs --listen")?;
    remove_stale_work_dirs(WORK_PREFIX);
    let work = WorkDir::create(WORK_PREFIX)?;
    let (cmd, side, ca) = if args.baseline {
        let mut cmd = Command::new(&bins.baseline);
        let cert_dir = baseline_cert_dir(&work, 0);
        cmd.args(baseline_server_args(args, listen, &cert_dir));
        (cmd, Side::Baseline, Some(cert_dir.join("cert.pem")))
    } else {
        let data_dir = args
            .data_dir
            .clone()
            .unwrap_or_else(|| work.path.join("data"));
        let config = work.path.join("server.toml");
        // 0 = one worker per core: a dedicated server host should use all.
        write_config(
            &config,
            &OurServer {
                addr: listen,
                backend: args.backend,
                workers: args.workers.unwrap_or(0),
                steering: args.steering,
                xdp: args.xdp_interface.as_deref(),
                max_udp_payload: max_udp_payload(args, args.backend),
                idle_timeout: server_idle_timeout(args),
                congestion: args.congestion.first().map(String::as_str),
            },
        )?;
        let mut cmd = Command::new(&bins.server);
        cmd.arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(&data_dir);
        (cmd, Side::OURS, Some(data_dir.join("ca.pem")))
    };
    // The operator watches this terminal: server logs go straight to it.
    let (mut server, listening) = start_server(cmd, side, Stdio::inherit())?;
    let pid = server.pid();
    println!("bench-40g: {listening}");
    if side.is_ours() {
        let ca = listening_ca(&listening).or(ca).context("no CA path")?;
        println!(
            "bench-40g: CA at {ca}\n\
             copy it and operator.pem beside it (the operator's client certificate, \
             for the server's counters) to one directory on the client host, then run there:\n  \
             cargo xtask bench-40g --role client --connect [THIS-HOST-IPV6]:{port} --ca ca.pem",
            ca = ca.display(),
            port = listen.port(),
        );
        if args.data_dir.is_none() {
            println!(
                "bench-40g: the CA lives in a temporary directory removed on exit; \
                 pass --data-dir to keep it across restarts"
            );
        }
    } else {
        println!(
            "bench-40g: quinn baseline; its certificate is {cert} (our client's --ca); \
             on the client host run:\n  \
             cargo xtask bench-40g --role client --baseline --connect [THIS-HOST-IPV6]:{port} \
             --ca cert.pem   (or --client quinn without --ca)",
            cert = ca.as_deref().unwrap_or(Path::new("?")).display(),
            port = listen.port()
        );
    }
    println!("bench-40g: Ctrl-C stops the server");
    let clk_tck = clk_tck()?;
    let started = Instant::now();
    let cpu_start = proc_cpu_ticks(pid)?;
    loop {
        if let Some(status) = server.child.try_wait()? {
            bail!("{} exited on its own ({status})", server.name);
        }
        if interrupted() {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let cpu_s = proc_cpu_ticks(pid)?.saturating_sub(cpu_start) as f64 / clk_tck;
    let (hwm, _) = proc_mem(pid)?;
    let status = server.stop()?;
    println!(
        "bench-40g: server stopped ({status}); {cpu_s:.1} CPU s over {:.0} s, peak RSS {:.1} MiB",
        started.elapsed().as_secs_f64(),
        hwm as f64 / (1024.0 * 1024.0)
    );
    if !status.success() {
        bail!("{} exited with {status} after SIGTERM", server.name);
    }
    Ok(())
}

fn run_client_role(args: &BenchArgs, bins: &Binaries) -> Result<Report> {
    let addr = args.connect.context("--role client needs --connect")?;
    let side = if args.baseline {
        Side::Baseline
    } else {
        Side::OURS
    };
    let ca = args.ca.clone().unwrap_or_default();
    if side.is_ours() && !ca.is_file() {
        bail!("--ca {}: no such file", ca.display());
    }
    remove_stale_work_dirs(WORK_PREFIX);
    let work = WorkDir::create(WORK_PREFIX)?;
    let mut runs = Vec::new();
    for run in 0..args.runs {
        check_interrupt()?;
        eprintln!(
            "bench-40g: run {}/{} [{}]",
            run + 1,
            args.runs,
            side.label()
        );
        let json = work.path.join(format!("client-{run}.json"));
        run_client(
            client_command(args, bins, None, addr, &ca, &json),
            args.client,
            side,
            client_timeout(args),
        )?;
        let handoff_ratio = match side {
            Side::Ours(_) => handoff_ratio(Command::new(&bins.client), addr, &ca)?,
            Side::Baseline => None,
        };
        // The server is on another host: its CPU and memory are not ours to
        // read, so those columns stay empty.
        let client = ClientResult::read(&json)?;
        let metrics = Metrics {
            handoff_ratio,
            transfer_s: transfer_seconds(args, &client)?,
            ..client.metrics()
        };
        runs.push(Run {
            side,
            metrics,
            relay: None,
        });
    }
    Ok(Report {
        setup: setup(args, "two-host"),
        runs,
    })
}

fn setup(args: &BenchArgs, mode: &str) -> Value {
    let netns = mode == "netns";
    crate::report::setup(&[
        ("mode", mode.into()),
        ("duration_s", args.duration.into()),
        ("connections", args.connections.into()),
        ("active", active(args).map_or(Value::Null, Value::from)),
        ("streams", args.streams.into()),
        ("backend", args.backend.as_str().into()),
        ("steering", args.steering.as_str().into()),
        ("matrix", args.matrix.into()),
        (
            "server_workers",
            if netns {
                args.workers.unwrap_or(1).into()
            } else {
                Value::Null
            },
        ),
        ("client", args.client.as_str().into()),
        ("resume", args.resume.into()),
        ("baseline_runtime", args.baseline_runtime.clone().into()),
        ("client_workers", args.client_workers.into()),
        ("keep_alive_s", args.keep_alive.into()),
        ("mtu", if netns { args.mtu.into() } else { Value::Null }),
        ("handshake_only", args.handshake_only.into()),
        (
            "transfer_mib",
            args.transfer_mib.map_or(Value::Null, Value::from),
        ),
        ("runs", args.runs.into()),
        (
            "connect",
            args.connect.map_or(Value::Null, |a| json!(a.to_string())),
        ),
        (
            "congestion",
            if args.congestion.is_empty() {
                Value::Null
            } else {
                args.congestion.join(",").into()
            },
        ),
        ("delay_ms", args.delay_ms.map_or(Value::Null, Value::from)),
        ("loss", args.loss.map_or(Value::Null, Value::from)),
        ("rate_mbit", args.rate_mbit.map_or(Value::Null, Value::from)),
        (
            "queue_ms",
            Impairment::from_args(args)
                .filter(|i| i.rate_mbit.is_some())
                .map_or(Value::Null, |i| i.queue_ms.into()),
        ),
    ])
}

// ---------------------------------------------------------------------------
// Processes

/// A child that is killed if still running when dropped, so no error path
/// leaves a server behind (which would also keep its namespace alive).
pub(crate) struct Proc {
    child: Child,
    name: &'static str,
}

impl Proc {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then SIGKILL if it has not exited within STOP_GRACE.
    pub(crate) fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        // SAFETY: kill has no memory-safety preconditions; the pid is our
        // own unreaped child, so it cannot have been recycled.
        unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "xtask: {} still running {} s after SIGTERM; killing it",
            self.name,
            STOP_GRACE.as_secs()
        );
        self.child.kill()?;
        Ok(self.child.wait()?)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn server_name(side: Side) -> &'static str {
    match side {
        Side::Ours(_) => "internet2-server",
        Side::Baseline => "quinn-baseline server",
    }
}

/// Starts a server and waits for its `listening on` line. Children get
/// their own process group so a terminal Ctrl-C reaches only xtask, which
/// then stops them in order.
pub(crate) fn start_server(cmd: Command, side: Side, stderr: Stdio) -> Result<(Proc, String)> {
    start_listening(cmd, server_name(side), side.label(), stderr)
}

/// Starts `name` and waits for its `listening on` line; other lines it
/// prints before that are shown prefixed with `label`.
fn start_listening(
    mut cmd: Command,
    name: &'static str,
    label: &str,
    stderr: Stdio,
) -> Result<(Proc, String)> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .process_group(0);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
    let stdout = child.stdout.take().context("server stdout")?;
    let mut server = Proc { child, name };
    let (tx, rx) = mpsc::channel();
    // Keeps draining stdout after the listening line so the server can
    // never block on a full pipe.
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + LISTEN_TIMEOUT;
    loop {
        check_interrupt()?;
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) if line.starts_with("listening on ") => return Ok((server, line)),
            Ok(line) => eprintln!("[{label}] {line}"),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                let status = server.child.wait()?;
                bail!("{name} exited ({status}) before printing `listening on`");
            }
        }
        if Instant::now() > deadline {
            bail!(
                "{name} did not print `listening on` within {} s",
                LISTEN_TIMEOUT.as_secs()
            );
        }
    }
}

/// The `ca=PATH` field of our server's listening line.
fn listening_ca(line: &str) -> Option<PathBuf> {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("ca="))
        .map(PathBuf::from)
}

/// Runs a client to completion, forwarding its stderr (the per-second
/// progress lines) prefixed with the side. Fails on a non-zero exit.
/// The server of the run (`side`) labels the progress lines.
fn run_client(
    mut cmd: Command,
    client: crate::ClientKind,
    side: Side,
    timeout: Duration,
) -> Result<()> {
    let name = match client {
        crate::ClientKind::Ours => "internet2 bench",
        crate::ClientKind::Quinn => "quinn-baseline client",
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
    let stderr = child.stderr.take().context("client stderr")?;
    let mut stdout = child.stdout.take().context("client stdout")?;
    let mut client = Proc { child, name };
    let prefix = format!("[{}]", side.label());
    let err_reader: JoinHandle<Vec<String>> = thread::spawn(move || {
        // The last lines are kept for the error message if the client fails.
        let mut tail = Vec::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("{prefix} {line}");
            tail.push(line);
            if tail.len() > 20 {
                tail.remove(0);
            }
        }
        tail
    });
    let out_reader: JoinHandle<String> = thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = client.child.try_wait()? {
            break status;
        }
        check_interrupt()?;
        if started.elapsed() > timeout {
            bail!(
                "{name} still running after {} s; killed it",
                timeout.as_secs()
            );
        }
        thread::sleep(Duration::from_millis(50));
    };
    let tail = err_reader.join().unwrap_or_default();
    let out = out_reader.join().unwrap_or_default();
    if !status.success() {
        bail!(
            "{name} failed ({status})\n--- stdout\n{}\n--- stderr (last lines)\n{}",
            out.trim_end(),
            tail.join("\n")
        );
    }
    Ok(())
}

/// The client's JSON result.
struct ClientResult(Value);

impl ClientResult {
    fn read(path: &Path) -> Result<ClientResult> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("the client wrote no JSON to {}", path.display()))?;
        Ok(ClientResult(serde_json::from_str(&text).with_context(
            || format!("{} is not JSON", path.display()),
        )?))
    }

    fn get(&self, key: &str) -> Option<f64> {
        self.0[key].as_f64()
    }

    fn metrics(&self) -> Metrics {
        Metrics {
            goodput_gbps: self.get("goodput_gbps"),
            setup_rate_first_1k: self.get("setup_rate_first_1k"),
            setup_rate_last_1k: self.get("setup_rate_last_1k"),
            handshakes_resumed: self.get("handshakes_resumed"),
            handshakes_per_s: self.get("handshakes_per_s"),
            handshake_us_p50: self.get("handshake_us_p50"),
            handshake_us_p99: self.get("handshake_us_p99"),
            connections: self.get("connections"),
            errors: self.get("errors"),
            duration_s: self.get("duration_s"),
            ..Metrics::default()
        }
    }
}

// ---------------------------------------------------------------------------
// /proc

/// The CPU of some processes, sampled every 10 ms while a client runs, so
/// each phase of the client's report can be charged what they used within
/// its window (`window_unix_ms`; ticks of 10 ms, phases last seconds).
pub(crate) struct CpuSamples {
    /// (milliseconds since the Unix epoch, each process's ticks).
    samples: Vec<(u64, Vec<u64>)>,
    tck: f64,
}

impl CpuSamples {
    /// Sample `pids` until `client` exits: its status and the samples.
    pub(crate) fn while_running(
        pids: &[u32],
        client: &mut std::process::Child,
    ) -> Result<(std::process::ExitStatus, Self)> {
        let tck = clk_tck()?;
        let mut samples = Vec::new();
        loop {
            let ticks = pids
                .iter()
                .map(|pid| proc_cpu_ticks(*pid))
                .collect::<Result<Vec<u64>>>()?;
            samples.push((now_ms(), ticks));
            if let Some(status) = client.try_wait()? {
                return Ok((status, Self { samples, tck }));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// CPU seconds of each process within `window` ([start, end] in ms).
    pub(crate) fn within(&self, window: &Value) -> Option<Vec<f64>> {
        let at = |ms: u64| {
            self.samples
                .iter()
                .rev()
                .find(|(t, _)| *t <= ms)
                .or(self.samples.first())
                .map(|(_, ticks)| ticks.clone())
        };
        let (start, end) = (at(window[0].as_u64()?)?, at(window[1].as_u64()?)?);
        Some(
            start
                .iter()
                .zip(&end)
                .map(|(a, b)| b.saturating_sub(*a) as f64 / self.tck)
                .collect(),
        )
    }
}

/// A fresh server for a loopback bench: `dir` holds its configuration
/// ([::1] on a free port, `workers` workers, the development admission
/// settings and the `[hypermesh_assets]` keys in `assets`), its data and
/// its log. The server, its port and its log's path.
pub(crate) fn start_loopback_server(
    server: &Path,
    task: &str,
    dir: &Path,
    workers: usize,
    assets: &str,
) -> Result<(Proc, u16, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let port = free_udp_port()?;
    let config = dir.join("server.toml");
    std::fs::write(
        &config,
        format!(
            "# Written by `cargo xtask {task}`.\n\
             [internet2]\nbind = \"::1\"\nport = {port}\n\
             [dataplane]\nworkers = {workers}\n\
             [hypermesh_assets]\n\
             plot_k = 12\n\
             challenges = 8\n\
             difficulty_base = 8\n\
             development_stake = 1\n\
             {assets}",
        ),
    )
    .with_context(|| format!("writing {}", config.display()))?;
    let log = dir.join("server.log");
    let mut cmd = Command::new(server);
    cmd.arg("--config").arg(&config).arg("--data-dir").arg(dir);
    let log_file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let (proc, _) =
        start_server(cmd, Side::OURS, Stdio::from(log_file)).with_context(|| log_tail(&log))?;
    Ok((proc, port, log))
}

/// Write a benchmark's JSON report to `path`, and say so.
pub(crate) fn write_report(task: &str, path: &Path, doc: &Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(doc)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("{task}: wrote {}", path.display());
    Ok(())
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// utime + stime of the whole process (all threads), in clock ticks.
pub(crate) fn proc_cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat (did the server exit?)"))?;
    stat_ticks(&stat)
}

fn stat_ticks(stat: &str) -> Result<u64> {
    // The command name (field 2) may contain spaces and parentheses; the
    // fields after its closing parenthesis start at field 3 (state), so
    // utime (14) and stime (15) are the 12th and 13th of them.
    let rest = &stat[stat.rfind(')').context("malformed /proc/PID/stat")? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .context("malformed /proc/PID/stat")
    };
    Ok(field(11)? + field(12)?)
}

/// (VmHWM, VmRSS) in bytes.
fn proc_mem(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status (did the server exit?)"))?;
    let kib = |key: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|k| k * 1024)
            .with_context(|| format!("no {key} in /proc/{pid}/status"))
    };
    Ok((kib("VmHWM:")?, kib("VmRSS:")?))
}

/// Clock ticks per second, the unit of utime/stime.
pub(crate) fn clk_tck() -> Result<f64> {
    let out = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .context("running `getconf CLK_TCK`")?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|&t| t > 0.0)
        .context("`getconf CLK_TCK` printed no positive number")
}

// ---------------------------------------------------------------------------
// Scratch space

/// A per-process scratch directory (configs, the netns-mode CA, client
/// JSON, server logs), removed on drop.
pub(crate) struct WorkDir {
    pub(crate) path: PathBuf,
}

/// Scratch directory prefix of `bench-40g` and `bench-authority`.
const WORK_PREFIX: &str = "i2b-";

impl WorkDir {
    /// `TMPDIR/PREFIXpid`, emptied first (a leftover of a dead process
    /// that had our pid).
    pub(crate) fn create(prefix: &str) -> Result<WorkDir> {
        let path = std::env::temp_dir().join(format!("{prefix}{}", std::process::id()));
        // A leftover from a dead process that had our pid.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(WorkDir { path })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Removes scratch directories (named `PREFIXpid`) of earlier runs whose
/// process is gone (one interrupted with Ctrl-C never ran its drops).
pub(crate) fn remove_stale_work_dirs(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !netns::xtask_alive(pid) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The last lines of a server log, for error messages.
pub(crate) fn log_tail(log: &Path) -> String {
    let text = strip_ansi(&std::fs::read_to_string(log).unwrap_or_default());
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n");
    if tail.is_empty() {
        String::new()
    } else {
        format!("\n--- {} (last lines)\n{tail}", log.display())
    }
}

/// The server's tracing output colours even when writing to a file; drop
/// the escape sequences (ESC [ ... letter) so the tail reads cleanly.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// bench-authority

/// `cargo xtask bench-authority`: our server on [::1] in a scratch data
/// directory, `internet2 authority-bench` against it `runs` times (a fresh
/// server each run), per-metric medians printed and written as JSON. With
/// `--baseline-server`, that binary (an older build) is measured the same
/// way, alternating with ours run by run, and both medians are reported.
pub fn bench_authority(args: &crate::AuthorityBenchArgs) -> Result<()> {
    if args.runs == 0 || args.requests == 0 {
        bail!("--runs and --requests must be at least 1");
    }
    install_signal_handlers()?;
    let bins = build()?;
    if let Some(path) = &args.baseline_server
        && !path.is_file()
    {
        bail!("--baseline-server {}: no such file", path.display());
    }
    remove_stale_work_dirs(WORK_PREFIX);
    let work = WorkDir::create(WORK_PREFIX)?;
    let mut sides = vec![("ours", bins.server.clone(), Vec::new())];
    if let Some(path) = &args.baseline_server {
        sides.push(("baseline", path.clone(), Vec::new()));
    }
    for run in 0..args.runs {
        for (label, server, reports) in &mut sides {
            check_interrupt()?;
            let dir = work.path.join(format!("authority-{label}-{run}"));
            eprintln!("bench-authority: {label}, run {}/{}", run + 1, args.runs);
            reports.push(authority_run(args, server, &bins.client, &dir)?);
        }
    }
    let mut medians_by_side = serde_json::Map::new();
    let mut runs_by_side = serde_json::Map::new();
    for (label, _, reports) in &sides {
        medians_by_side.insert((*label).into(), medians(reports));
        runs_by_side.insert((*label).into(), json!(reports));
    }
    // Without a baseline the report keeps its old shape: one side's.
    let (medians, runs) = if sides.len() == 1 {
        (
            medians_by_side.remove("ours").unwrap_or_default(),
            runs_by_side.remove("ours").unwrap_or_default(),
        )
    } else {
        (Value::Object(medians_by_side), Value::Object(runs_by_side))
    };
    println!("{}", serde_json::to_string_pretty(&medians)?);
    if let Some(path) = &args.json {
        let doc = json!({ "medians": medians, "runs": runs });
        write_report("bench-authority", path, &doc)?;
    }
    Ok(())
}

/// One fresh `server` in `dir` and one `internet2 authority-bench` run
/// against it; the client's JSON report.
fn authority_run(
    args: &crate::AuthorityBenchArgs,
    server: &Path,
    client: &Path,
    dir: &Path,
) -> Result<Value> {
    let port = free_udp_port()?;
    std::fs::create_dir_all(dir)?;
    let config = dir.join("server.toml");
    std::fs::write(
        &config,
        format!(
            "# Written by `cargo xtask bench-authority`.\n\
             [internet2]\nbind = \"::1\"\nport = {port}\n\
             [dataplane]\nworkers = {workers}\n\
             [trustchain_authority]\nperf_without_client_certificate = true\n",
            workers = args.workers,
        ),
    )?;
    let mut cmd = Command::new(server);
    cmd.arg("--config").arg(&config).arg("--data-dir").arg(dir);
    let log = File::create(dir.join("server.log"))?;
    let (mut server, _) = start_server(cmd, Side::OURS, Stdio::from(log))?;
    let json = dir.join("result.json");
    let status = Command::new(client)
        .args([
            "authority-bench",
            "--connect",
            &format!("[::1]:{port}"),
            "--ca",
        ])
        .arg(dir.join("ca.pem"))
        .args(["--requests", &args.requests.to_string()])
        .args(["--concurrency", &args.concurrency.to_string()])
        .args(["--handshake-seconds", &args.handshake_seconds.to_string()])
        .arg("--json")
        .arg(&json)
        .status()
        .context("running internet2 authority-bench")?;
    server.stop()?;
    if !status.success() {
        bail!("authority-bench in {} failed ({status})", dir.display());
    }
    Ok(serde_json::from_str(&std::fs::read_to_string(&json)?)?)
}

/// The median of every numeric leaf over the runs (same shape as one run;
/// other leaves are taken from the first).
pub(crate) fn medians(reports: &[Value]) -> Value {
    fn walk(values: &[&Value]) -> Value {
        match values.first() {
            Some(Value::Object(first)) => {
                let mut out = serde_json::Map::new();
                for key in first.keys() {
                    let children: Vec<&Value> = values.iter().map(|v| &v[key]).collect();
                    out.insert(key.clone(), walk(&children));
                }
                Value::Object(out)
            }
            Some(Value::Number(_)) => {
                let mut xs: Vec<f64> = values.iter().filter_map(|v| v.as_f64()).collect();
                xs.sort_by(f64::total_cmp);
                match xs.len() {
                    0 => Value::Null,
                    n if n % 2 == 1 => json!(xs[n / 2]),
                    n => json!((xs[n / 2 - 1] + xs[n / 2]) / 2.0),
                }
            }
            Some(other) => (*other).clone(),
            None => Value::Null,
        }
    }
    walk(&reports.iter().collect::<Vec<_>>())
}

pub(crate) fn free_udp_port() -> Result<u16> {
    let socket = std::net::UdpSocket::bind("[::1]:0").context("binding a probe socket on [::1]")?;
    Ok(socket.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_the_command_name() {
        // Parsing must survive a command name with spaces and parentheses.
        let line = "42 (a b) c) S 1 2 3 4 5 6 7 8 9 10 111 222 0 0 20 0";
        assert_eq!(stat_ticks(line).unwrap(), 333);
        assert!(stat_ticks("42 (x) S 1").is_err());
    }

    #[test]
    fn ca_from_listening_line() {
        let line = "listening on [fd71:7e57:0:1::1]:4433 workers=1 ca=/tmp/x/ca.pem";
        assert_eq!(listening_ca(line), Some(PathBuf::from("/tmp/x/ca.pem")));
        assert_eq!(listening_ca("listening on [::1]:4433"), None);
    }

    /// `cargo xtask bench-40g ARGS`, parsed as the command line is.
    fn bench_args(argv: &[&str]) -> BenchArgs {
        use clap::Parser;
        let argv = ["cargo xtask", "bench-40g"].iter().chain(argv);
        match crate::Cli::try_parse_from(argv).unwrap().task {
            crate::Task::Bench40g(args) => *args,
            _ => unreachable!("parsed bench-40g"),
        }
    }

    #[test]
    fn impaired_path_flags_are_checked() {
        let err = |argv: &[&str]| validate(&bench_args(argv)).unwrap_err().to_string();
        assert!(err(&["--netns", "--loss", "1"]).contains("below 1"));
        assert!(err(&["--netns", "--loss=-0.1"]).contains("--loss -0.1"));
        assert!(err(&["--netns", "--loss", "NaN"]).contains("--loss NaN"));
        assert!(err(&["--netns", "--rate-mbit", "0"]).contains("above 0"));
        assert!(err(&["--netns", "--rate-mbit", "5", "--queue-ms", "0"]).contains("above 0"));
        assert!(err(&["--netns", "--queue-ms", "20"]).contains("give --rate-mbit too"));
        assert!(err(&["--netns", "--delay-ms", "20000"]).contains("0 to 10000"));
        let two_host = [
            "--role",
            "server",
            "--listen",
            "[::]:4433",
            "--delay-ms",
            "10",
        ];
        assert!(err(&two_host).contains("need --netns"));

        let args = bench_args(&["--netns", "--delay-ms", "10", "--rate-mbit", "50"]);
        validate(&args).unwrap();
        let path = Impairment::from_args(&args).unwrap();
        assert_eq!((path.delay_ms, path.loss, path.queue_ms), (10.0, 0.0, 50.0));
        assert!(Impairment::from_args(&bench_args(&["--netns"])).is_none());
    }

    #[test]
    fn a_transfer_counts_only_when_every_byte_arrived() {
        let err = |argv: &[&str]| validate(&bench_args(argv)).unwrap_err().to_string();
        let quinn = ["--netns", "--transfer-mib", "64", "--client", "quinn"];
        assert!(err(&quinn).contains("needs --client ours"));
        assert!(err(&["--netns", "--transfer-mib", "0"]).contains("1 to"));
        let churn = ["--netns", "--transfer-mib", "1", "--handshake-only"];
        assert!(err(&churn).contains("drop --handshake-only"));

        // Two connections of two streams: four transfers of 64 MiB.
        let argv = ["--netns", "--transfer-mib", "64", "--connections", "2"];
        let args = bench_args(&[&argv[..], &["--streams", "2"]].concat());
        validate(&args).unwrap();
        let client =
            |bytes: u64| ClientResult(serde_json::json!({"bytes": bytes, "duration_s": 7.5}));
        let all = 4 * (64u64 << 20);
        assert_eq!(transfer_seconds(&args, &client(all)).unwrap(), Some(7.5));
        let short = transfer_seconds(&args, &client(all - 1)).unwrap_err();
        assert!(short.to_string().contains("was not done within"), "{short}");
        let timed = bench_args(&["--netns"]);
        assert_eq!(transfer_seconds(&timed, &client(0)).unwrap(), None);
    }

    #[test]
    fn congestion_flags_are_checked() {
        let err = |argv: &[&str]| validate(&bench_args(argv)).unwrap_err().to_string();
        let compare = err(&["--netns", "--compare", "--congestion", "bbr"]);
        assert!(compare.contains("quinn baseline"), "{compare}");
        assert!(err(&["--netns", "--matrix", "--congestion", "bbr"]).contains("quinn baseline"));
        assert!(err(&["--netns", "--congestion", "cubic,BBR"]).contains("not a controller"));
        assert!(err(&["--netns", "--congestion", "cubic,"]).contains("not a controller"));
        assert!(err(&["--netns", "--congestion", "bbr,bbr"]).contains("twice"));
        let server = ["--role", "server", "--listen", "[::]:4433", "--congestion"];
        assert!(err(&[&server[..], &["cubic,bbr"]].concat()).contains("one name"));
        validate(&bench_args(&[&server[..], &["bbr"]].concat())).unwrap();
        let args = bench_args(&["--netns", "--congestion", "cubic,bbr,bbr2"]);
        validate(&args).unwrap();
        assert_eq!(args.congestion, ["cubic", "bbr", "bbr2"]);
    }

    #[test]
    fn controller_is_written_to_our_config() {
        let dir = std::env::temp_dir().join(format!("xtask-test-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let args = bench_args(&["--netns"]);
        let addr = SocketAddr::new(IpAddr::V6(SERVER_IP), 4433);
        let path = dir.join("server.toml");
        write_config(
            &path,
            &our_netns_server(&args, addr, Flavor::Congestion("bbr")),
        )
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let transport = text.split("[stoq_transport]").nth(1).unwrap();
        let transport = transport.split("\n[").next().unwrap();
        assert!(
            transport.contains("congestion_control = \"bbr\"\n"),
            "{text}"
        );
        write_config(&path, &our_netns_server(&args, addr, Flavor::AsConfigured)).unwrap();
        assert!(
            !std::fs::read_to_string(&path)
                .unwrap()
                .contains("congestion")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ansi_is_stripped() {
        assert_eq!(
            strip_ansi("\u{1b}[2mtime\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m x"),
            "time  INFO x"
        );
    }
}
