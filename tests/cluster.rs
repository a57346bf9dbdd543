//! Three-member clusters on the project's own topology: a namespace per
//! member (fd71:7e57:0:3::N/64), all on one bridge in a hub namespace,
//! removed again whatever the outcome. Members run `--mode production`
//! (mandatory admission, no development stake) with the development plot
//! size, and talk Raft to each other over `stoq/1`.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PORT: u16 = 4433;

struct Member {
    ns: String,
    ip: String,
    dir: PathBuf,
    child: Option<Child>,
    /// The member's clock, off by this much (libfaketime's `FAKETIME`
    /// offset, such as `+120s`); `None` is the machine's clock.
    clock: Option<&'static str>,
}

impl Member {
    fn address(&self) -> String {
        format!("[{}]:{PORT}", self.ip)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// Start (or restart) the member's server with `args` after
    /// `--bootstrap federated`; waits for its `listening` line.
    fn start(&mut self, args: &[&str]) {
        if let Err(why) = self.try_start(args) {
            panic!("{why}");
        }
    }

    /// [`Self::start`], or why the server did not start (it exited, or
    /// printed no `listening` line within 60 s: then it is killed).
    fn try_start(&mut self, args: &[&str]) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .unwrap();
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.ns]);
        if let Some(offset) = self.clock {
            // libfaketime preloaded into the server itself (`ip netns exec`
            // execs it): the `faketime` program forks, and killing it left
            // the server running.
            command
                .env("LD_PRELOAD", LIBFAKETIME)
                .env("FAKETIME", offset)
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        let mut child = command
            .args([SERVER, "--mode", "production"])
            .arg("--config")
            .arg(self.dir.join("server.toml"))
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--bootstrap", "federated"])
            .args(args)
            .env("RUST_LOG", "info,openraft=warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start internet2-server");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(out).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let line = rx.recv_timeout(Duration::from_secs(60));
        if !line.as_ref().is_ok_and(|l| l.starts_with("listening on")) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{} did not start ({line:?}):\n{}",
                self.ns,
                self.log()
            ));
        }
        self.child = Some(child);
        Ok(())
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// An operator command on this member's data directory.
    fn operator(&self, args: &[&str]) -> String {
        ok(&admin_in(&self.dir, args)).trim().to_owned()
    }
}

/// The hub, the members' namespaces and their processes; Drop stops the
/// processes and deletes every namespace (and so every veth).
struct Cluster {
    hub: String,
    members: Vec<Member>,
    created: Vec<String>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            member.kill9();
            if std::env::var_os("KEEP_TEST_DIRS").is_none() {
                let _ = std::fs::remove_dir_all(&member.dir);
            }
        }
        for ns in self.created.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

impl Cluster {
    /// Three namespaces on one bridge, no server started yet; `None` (test
    /// skipped) where namespaces cannot be made.
    fn create(tag: &str) -> Option<Cluster> {
        if !is_root() {
            skip_or_fail("cluster tests need root for network namespaces");
            return None;
        }
        let id = format!("{}-{tag}", std::process::id());
        let mut cluster = Cluster {
            hub: format!("i2c-hub-{id}"),
            members: Vec::new(),
            created: Vec::new(),
        };
        ip(&["netns", "add", &cluster.hub]);
        cluster.created.push(cluster.hub.clone());
        ip(&["-n", &cluster.hub, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &cluster.hub, "link", "set", "br0", "up"]);
        for n in 1..=3 {
            let ns = format!("i2c-m{n}-{id}");
            ip(&["netns", "add", &ns]);
            cluster.created.push(ns.clone());
            let status = Command::new("ip")
                .args(["netns", "exec", &ns, "sysctl", "-qw"])
                .args([
                    "net.ipv6.conf.all.accept_dad=0",
                    "net.ipv6.conf.default.accept_dad=0",
                    // The partition test takes the link down and up again:
                    // the address must stay.
                    "net.ipv6.conf.all.keep_addr_on_down=1",
                    "net.ipv6.conf.default.keep_addr_on_down=1",
                ])
                .status()
                .unwrap();
            assert!(status.success());
            let port = format!("p{n}");
            ip(&[
                "link",
                "add",
                "eth0",
                "netns",
                &ns,
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                &cluster.hub,
            ]);
            ip(&["-n", &cluster.hub, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &cluster.hub, "link", "set", &port, "up"]);
            let address = format!("fd71:7e57:0:3::{n}");
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{address}/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            let dir = temp_dir(&format!("cluster-{tag}-m{n}"));
            std::fs::write(
                dir.join("server.toml"),
                format!(
                    "[internet2]\nbind = \"{address}\"\nport = {PORT}\n\
                     [dataplane]\nworkers = 1\n\
                     [trustchain_authority]\ndns_name = \"m{n}\"\n\
                     [hypermesh_assets]\nplot_k = 12\nnode_number = {n}\n"
                ),
            )
            .unwrap();
            cluster.members.push(Member {
                ns,
                ip: address,
                dir,
                child: None,
                clock: None,
            });
        }
        Some(cluster)
    }

    /// Member 1 starts the cluster; 2 joins through 1, 3 through 2 (a
    /// follower, which names the leader); all three end voters.
    /// Returns the join tokens it spent.
    fn form(&mut self) -> Vec<String> {
        self.members[0].start(&["--cluster-init"]);
        let mut spent = Vec::new();
        for (n, via) in [(1, 0), (2, 1)] {
            spent.push(self.join(n, via).unwrap_or_else(|why| panic!("{why}")));
        }
        self.wait_for_voters(3);
        spent
    }

    /// Start member `n` joining through member `via` with a new token;
    /// the token, or why it did not start.
    fn join(&mut self, n: usize, via: usize) -> Result<String, String> {
        let token = self.members[0].operator(&["cluster", "join-token"]);
        let via = self.members[via].address();
        self.members[n].try_start(&["--join", &via, "--join-token", &token])?;
        Ok(token)
    }

    /// Wait (up to 60 s) until a member reports `n` voters.
    fn wait_for_voters(&self, n: usize) {
        self.wait_for(Duration::from_secs(60), |status| {
            let voters = status["members"]
                .as_array()
                .map_or(0, |m| m.iter().filter(|m| m["role"] == "voter").count());
            (voters == n)
                .then_some(())
                .ok_or(format!("{voters} voters"))
        });
    }

    /// The root and operator identity every member holds alike.
    fn ca(&self) -> PathBuf {
        self.members[0].dir.join("ca.pem")
    }

    fn identity(&self) -> PathBuf {
        self.members[0].dir.join("operator.pem")
    }

    /// Every member's address, for `--connect` (fail over between them).
    fn all(&self, except: Option<usize>) -> String {
        let addresses: Vec<String> = (0..self.members.len())
            .filter(|n| Some(*n) != except)
            .map(|n| self.members[n].address())
            .collect();
        addresses.join(",")
    }

    /// `internet2 ARGS` in member `n`'s namespace with `--connect
    /// connect`, as the operator.
    fn client_at(&self, n: usize, connect: &str, args: &[&str]) -> std::process::Output {
        self.client_as(n, connect, &self.identity(), args)
    }

    /// `internet2 ARGS` in member `n`'s namespace with `--connect
    /// connect`, as `identity`.
    fn client_as(
        &self,
        n: usize,
        connect: &str,
        identity: &std::path::Path,
        args: &[&str],
    ) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.members[n].ns, CLIENT])
            .args(args)
            .args(["--connect", connect])
            .arg("--ca")
            .arg(self.ca())
            .arg("--identity")
            .arg(identity)
            .output()
            .unwrap()
    }

    /// `internet2-server ARGS` on member `n`'s data directory, in its
    /// namespace (an operator command that asks the running member).
    fn operator_at(&self, n: usize, args: &[&str]) -> std::process::Output {
        let member = &self.members[n];
        Command::new("ip")
            .args(["netns", "exec", &member.ns, SERVER])
            .arg("--config")
            .arg(member.dir.join("server.toml"))
            .arg("--data-dir")
            .arg(&member.dir)
            .args(args)
            .output()
            .unwrap()
    }

    /// `internet2 ARGS` in member `n`'s namespace, at member `n`, as the
    /// operator.
    fn at_member(&self, n: usize, args: &[&str]) -> std::process::Output {
        self.client_at(n, &self.members[n].address(), args)
    }

    fn status_from(&self, n: usize) -> Result<serde_json::Value, String> {
        let out = self.at_member(n, &["cluster", "status", "--json"]);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    }

    /// Wait until a running member's status passes `check`.
    fn wait_for(
        &self,
        limit: Duration,
        mut check: impl FnMut(&serde_json::Value) -> Result<(), String>,
    ) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        wait_until(limit, Duration::from_millis(300), || {
            let mut why = vec![String::from("no member answered")];
            for n in (0..self.members.len()).filter(|n| self.members[*n].child.is_some()) {
                match self.status_from(n) {
                    Ok(status) => match check(&status) {
                        Ok(()) => {
                            last = status;
                            return Ok(());
                        }
                        Err(e) => why.push(format!("{}: {e}: {status}", self.members[n].ns)),
                    },
                    Err(e) => why.push(format!("{}: {e}", self.members[n].ns)),
                }
            }
            Err(why.join("\n"))
        });
        last
    }

    /// Enroll a new client through `connect` (a member list); the log index
    /// it was given, or the error.
    fn enroll(&self, from: usize, connect: &str, name: &str) -> Result<u64, String> {
        let token = self.members[0].operator(&["enroll-token"]);
        let out_file = self.members[from].dir.join(format!("{name}.pem"));
        let out = Command::new("ip")
            .args(["netns", "exec", &self.members[from].ns, CLIENT])
            .args(["enroll", &token, "--connect", connect, "--name", name])
            .arg("--out")
            .arg(&out_file)
            .arg("--ca")
            .arg(self.ca())
            .args(["--timeout-ms", "8000"])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let index = text
            .lines()
            .find_map(|l| l.strip_prefix("log index"))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok());
        match index {
            Some(index) => Ok(index),
            None => Err(text),
        }
    }

    /// Member `n`'s signed tree head (the client verifies its signature).
    fn sth(&self, n: usize) -> Result<(u64, String), String> {
        let out = self.at_member(n, &["ct", "sth", "--json"]);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let sth: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        Ok((
            sth["tree_size"].as_u64().unwrap_or(0),
            sth["root_hash"].as_str().unwrap_or_default().to_owned(),
        ))
    }

    /// Every running member's tree head, once they all reached `size`.
    fn heads_at_least(&self, size: u64) -> Vec<(u64, String)> {
        let mut heads = Vec::new();
        wait_until(Duration::from_secs(30), Duration::from_millis(300), || {
            heads.clear();
            for n in (0..self.members.len()).filter(|n| self.members[*n].child.is_some()) {
                let head = self.sth(n)?;
                if head.0 < size {
                    return Err(format!("{} is at tree size {}", self.members[n].ns, head.0));
                }
                heads.push(head);
            }
            Ok(())
        });
        heads
    }

    /// Member `n` proves that tree `old` is a prefix of tree `new` (the
    /// client checks the proof against both signed roots).
    fn consistent(&self, n: usize, old: u64, new: u64) {
        let out = self.at_member(
            n,
            &["ct", "consistency", &old.to_string(), &new.to_string()],
        );
        ok(&out);
    }

    /// Once every running member's tree holds `at_least` entries, the first
    /// three members each prove tree `since` a prefix of the smallest of
    /// those trees, and the heads of that size have one root.
    fn heads_agree(&self, since: u64, at_least: u64) {
        let heads = self.heads_at_least(at_least);
        let size = heads.iter().map(|h| h.0).min().unwrap();
        for n in 0..3 {
            self.consistent(n, since, size);
        }
        let same_size: Vec<_> = heads.iter().filter(|h| h.0 == size).collect();
        assert!(
            same_size.windows(2).all(|w| w[0].1 == w[1].1),
            "two members signed different roots for tree size {size}: {heads:?}"
        );
    }

    fn leader(status: &serde_json::Value) -> Option<usize> {
        let name = status["leader"].as_str()?;
        name.strip_prefix('m')?.parse::<usize>().ok().map(|n| n - 1)
    }
}

/// Init, join (through a follower), write through a follower, kill -9 the
/// leader (three times, the killed member back each time): a new leader
/// commits, every acknowledged certificate is on every member, the heads
/// agree and grow consistently, the killed member catches up, and a
/// removed member leaves the configuration. Join tokens
/// are refused when spent or of the wrong kind.
#[test]
fn a_cluster_forms_fails_over_and_never_forks() {
    let Some(mut cluster) = Cluster::create("form") else {
        return;
    };
    let spent = cluster.form();
    // The first member took a snapshot and purged its log: the others
    // started from the snapshot, sent in chunks over `stoq/1`.
    for member in &cluster.members[1..] {
        assert!(
            member.log().contains("snapshot installed"),
            "{} did not start from a snapshot:\n{}",
            member.ns,
            member.log()
        );
    }
    let status = cluster.wait_for(Duration::from_secs(10), |_| Ok(()));
    let leader = Cluster::leader(&status).expect("a leader");
    let follower = (leader + 1) % 3;

    // The cluster's name (the zone's apex) resolves to every member, each
    // with its key's pin, from any member. A member commits its TLSA record
    // after it joined, through the leader, so the last one's may land just
    // after it became a voter: each member is asked until it has all three
    // pins (at most 10 s), and then checked.
    let mut pins = Vec::new();
    for n in 0..3 {
        let resolve = || -> serde_json::Value {
            serde_json::from_str(&ok(
                &cluster.at_member(n, &["resolve", "internet2.test", "--json"])
            ))
            .unwrap()
        };
        let asked = std::time::Instant::now();
        let mut resolved = resolve();
        while resolved["pins_sha256"].as_array().map_or(0, Vec::len) < 3
            && asked.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(200));
            resolved = resolve();
        }
        let mut addresses: Vec<String> = resolved["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect();
        addresses.sort();
        let mut expected: Vec<String> = cluster.all(None).split(',').map(str::to_owned).collect();
        expected.sort();
        assert_eq!(addresses, expected, "{resolved}");
        assert_eq!(
            resolved["pins_sha256"].as_array().unwrap().len(),
            3,
            "{resolved}"
        );
        pins.push(resolved["pins_sha256"].clone());
    }
    assert!(
        pins.windows(2).all(|w| w[0] == w[1]),
        "members disagree: {pins:?}"
    );

    // A write through a follower is forwarded to the leader and answered.
    let first = cluster
        .enroll(
            follower,
            &cluster.members[follower].address(),
            "app1.example",
        )
        .unwrap_or_else(|e| panic!("enrolling through a follower: {e}"));
    let heads = cluster.heads_at_least(first + 1);
    assert!(
        heads.windows(2).all(|w| w[0] == w[1]),
        "members disagree: {heads:?}"
    );

    // Kill -9 the leader: the others elect one that commits.
    let killed_at = Instant::now();
    cluster.members[leader].kill9();
    let after = cluster.wait_for(Duration::from_secs(20), |status| {
        match Cluster::leader(status) {
            Some(n) if n != leader => Ok(()),
            other => Err(format!("leader {other:?}")),
        }
    });
    eprintln!(
        "new leader {:?} after {:?}",
        after["leader"],
        killed_at.elapsed()
    );
    let connect = cluster.all(Some(leader));
    let second = cluster
        .enroll(follower, &connect, "app2.example")
        .unwrap_or_else(|e| panic!("enrolling after the leader died: {e}"));
    assert!(second > first);
    // A client that knows only the cluster's name reaches a live member
    // (the dead one's address is among those it resolved), pinned.
    for n in [follower, 3 - leader - follower] {
        let out = cluster.at_member(
            n,
            &["cluster", "status", "--json", "--host", "internet2.test"],
        );
        let status: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
        assert!(
            Cluster::leader(&status).is_some_and(|l| l != leader),
            "{status}"
        );
    }

    // The killed member comes back with its data, catches up, and every
    // head agrees with every other at each size.
    cluster.members[leader].start(&[]);
    cluster.heads_agree(first + 1, second + 1);

    // Two more rounds of kill -9 the leader, a write the new leader
    // commits, and the killed member back: every head still agrees.
    let mut last = second;
    for round in 0..2 {
        let status = cluster.wait_for(Duration::from_secs(30), |status| {
            let members = status["members"].as_array().cloned().unwrap_or_default();
            let caught_up = members
                .iter()
                .filter(|m| m["role"] == "voter" && m["lag"].as_u64().is_some_and(|l| l <= 5))
                .count();
            (caught_up == 3 && Cluster::leader(status).is_some())
                .then_some(())
                .ok_or(format!("{caught_up} voters caught up"))
        });
        let leader = Cluster::leader(&status).expect("checked");
        cluster.members[leader].kill9();
        cluster.wait_for(Duration::from_secs(20), |status| {
            match Cluster::leader(status) {
                Some(n) if n != leader => Ok(()),
                other => Err(format!("leader {other:?}")),
            }
        });
        let from = (leader + 1) % 3;
        let index = cluster
            .enroll(
                from,
                &cluster.all(Some(leader)),
                &format!("loop{round}.example"),
            )
            .unwrap_or_else(|e| panic!("round {round}: enrolling after the leader died: {e}"));
        assert!(index > last, "round {round}: {index} after {last}");
        last = index;
        cluster.members[leader].start(&[]);
    }
    let heads = cluster.heads_at_least(last + 1);
    let size = heads.iter().map(|h| h.0).min().unwrap();
    for n in 0..3 {
        cluster.consistent(n, first + 1, size);
    }

    // Refused joins (the node does not start): a spent join token, an
    // enrollment token dressed as one, and a good token whose pin names
    // another issuer (the node refuses the member it reached). The node
    // would be "spare" at an address of its own.
    let enroll = cluster.members[0].operator(&["enroll-token"]);
    let pin = spent[0].split_once('.').unwrap().1;
    let disguised = format!("{enroll}.{pin}");
    let fresh = cluster.members[0].operator(&["cluster", "join-token"]);
    let other_pin = format!("{}.{}", fresh.split_once('.').unwrap().0, "A".repeat(43));
    for (token, why, expect) in [
        (spent[0].as_str(), "a spent join token", "used"),
        (disguised.as_str(), "an enrollment token", "join token"),
        (other_pin.as_str(), "another issuer's pin", "pins"),
    ] {
        let spare = temp_dir("cluster-spare");
        let config = std::fs::read_to_string(cluster.members[2].dir.join("server.toml"))
            .unwrap()
            .replace(&cluster.members[2].ip, "fd71:7e57:0:3::9")
            .replace("dns_name = \"m3\"", "dns_name = \"spare\"")
            .replace("node_number = 3", "node_number = 9");
        std::fs::write(spare.join("server.toml"), config).unwrap();
        let out = Command::new("ip")
            .args(["netns", "exec", &cluster.members[2].ns, SERVER])
            .args(["--mode", "production", "--config"])
            .arg(spare.join("server.toml"))
            .arg("--data-dir")
            .arg(&spare)
            .args(["--bootstrap", "federated", "--join"])
            .arg(cluster.members[0].address())
            .args(["--join-token", token])
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&spare);
        assert!(!out.status.success(), "{why} let a node join");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("cannot join") && stderr.contains(expect),
            "{why}: {stderr}"
        );
    }

    // Remove the third member (asked of member 1, inside its namespace):
    // the others carry on as two.
    let remover = 0;
    let out = Command::new("ip")
        .args(["netns", "exec", &cluster.members[remover].ns, SERVER])
        .arg("--config")
        .arg(cluster.members[remover].dir.join("server.toml"))
        .arg("--data-dir")
        .arg(&cluster.members[remover].dir)
        .args(["cluster", "remove", "m3"])
        .output()
        .unwrap();
    let removed: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(
        removed["certificates_revoked"].as_array().map(Vec::len),
        Some(1),
        "the removed member's node certificate is not revoked: {removed}"
    );
    cluster.members[2].kill9();
    cluster.wait_for(Duration::from_secs(20), |status| {
        let names: Vec<&str> = status["members"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["name"].as_str())
            .collect();
        (names.len() == 2 && !names.contains(&"m3"))
            .then_some(())
            .ok_or(format!("members {names:?}"))
    });
    // (Removing the leader makes the other two elect one first.)
    wait_until(Duration::from_secs(30), Duration::from_millis(500), || {
        cluster
            .enroll(0, &cluster.all(Some(2)), "app3.example")
            .map(|_| ())
    });

    // m3 wiped (a new key) joins again: as a new member, never as the old.
    let old_id = node_id(&cluster.members[2]);
    let config = std::fs::read(cluster.members[2].dir.join("server.toml")).unwrap();
    std::fs::remove_dir_all(&cluster.members[2].dir).unwrap();
    std::fs::create_dir_all(&cluster.members[2].dir).unwrap();
    std::fs::write(cluster.members[2].dir.join("server.toml"), config).unwrap();
    let token = cluster.members[0].operator(&["cluster", "join-token"]);
    let via = cluster.members[1].address();
    cluster.members[2].start(&["--join", &via, "--join-token", &token]);
    let new_id = node_id(&cluster.members[2]);
    assert_ne!(old_id, new_id, "a wiped node came back as its old self");
    cluster.wait_for(Duration::from_secs(30), |status| {
        let m3 = status["members"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["name"] == "m3");
        match m3 {
            Some(m) if m["id"] == new_id && m["role"] == "voter" => Ok(()),
            other => Err(format!("m3 is {other:?}")),
        }
    });
}

/// A server of another CA on a member's address and name while the member
/// is down (a cluster of its own: another root): the members refuse it at
/// the handshake and name it in their logs, it gets none of the cluster's
/// entries, the other two go on committing, and the member, back on its
/// address, catches up with them.
#[test]
fn an_impostor_of_another_ca_on_a_members_address_is_refused() {
    let Some(mut cluster) = Cluster::create("impostor") else {
        return;
    };
    cluster.form();
    let before = cluster
        .enroll(0, &cluster.all(None), "before.example")
        .unwrap();
    cluster.members[2].kill9();
    let dir = temp_dir("cluster-impostor-m3");
    std::fs::copy(
        cluster.members[2].dir.join("server.toml"),
        dir.join("server.toml"),
    )
    .unwrap();
    let impostor = Member {
        ns: cluster.members[2].ns.clone(),
        ip: cluster.members[2].ip.clone(),
        dir,
        child: None,
        clock: None,
    };
    // A member of the cluster, so that its drop stops the impostor too.
    cluster.members.push(impostor);
    cluster.members[3].start(&["--cluster-init"]);

    // Two of three commit on: the impostor does not count for the third.
    let during = {
        let mut index = 0;
        wait_until(Duration::from_secs(30), Duration::from_millis(500), || {
            index = cluster.enroll(0, &cluster.all(Some(2)), "during.example")?;
            Ok(())
        });
        index
    };
    assert!(during > before);
    let impostor_address = format!("[{}]", cluster.members[3].ip);
    wait_until(Duration::from_secs(20), Duration::from_millis(500), || {
        let named = (0..2).any(|n| {
            cluster.members[n].log().lines().any(|line| {
                line.contains("the peer failed its handshake") && line.contains(&impostor_address)
            })
        });
        named
            .then_some(())
            .ok_or("no member named the impostor's failed handshake".to_owned())
    });
    // The impostor learnt nothing: no snapshot, no entry of the cluster.
    let impostor_log = cluster.members[3].log();
    assert!(
        !impostor_log.contains("snapshot installed") && !impostor_log.contains("during.example"),
        "the impostor received the cluster's state:\n{impostor_log}"
    );

    // The member, back on its address, catches up: every head agrees.
    cluster.members[3].kill9();
    cluster.members[2].start(&[]);
    cluster.heads_agree(before + 1, during + 1);
}

/// A member's Raft id, from its data directory.
fn node_id(member: &Member) -> u64 {
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(member.dir.join("cluster-node.json")).unwrap())
            .unwrap();
    record["id"].as_u64().unwrap()
}

/// The leader cut off (its link down) is a minority of one: what it is
/// asked to write never commits, the other two elect a leader and commit,
/// and once the link is back the old leader follows and agrees.
#[test]
fn a_partitioned_minority_commits_nothing() {
    let Some(mut cluster) = Cluster::create("part") else {
        return;
    };
    cluster.form();
    let status = cluster.wait_for(Duration::from_secs(10), |_| Ok(()));
    let cut = Cluster::leader(&status).expect("a leader");
    let before = cluster.heads_at_least(0)[0].0;
    ip(&[
        "-n",
        &cluster.members[cut].ns,
        "link",
        "set",
        "eth0",
        "down",
    ]);

    // The cut-off member cannot commit a certificate.
    let refused = cluster.enroll(cut, &cluster.members[cut].address(), "cut.example");
    assert!(
        refused.is_err(),
        "a minority of one committed a certificate: {refused:?}"
    );

    // The majority can.
    let majority: Vec<usize> = (0..3).filter(|n| *n != cut).collect();
    let connect = cluster.all(Some(cut));
    let index = {
        let mut result = Err(String::new());
        wait_until(Duration::from_secs(30), Duration::from_millis(500), || {
            result = cluster.enroll(majority[0], &connect, "majority.example");
            result.as_ref().map(|_| ()).map_err(|e| e.clone())
        });
        result.unwrap()
    };
    ip(&["-n", &cluster.members[cut].ns, "link", "set", "eth0", "up"]);
    let heads = cluster.heads_at_least(index + 1);
    let size = heads.iter().map(|h| h.0).min().unwrap();
    assert!(size > before);
    for n in 0..3 {
        cluster.consistent(n, before.max(1), size);
    }
}

/// Members whose clocks disagree (libfaketime: m2 two minutes behind, m3
/// two minutes ahead) form a cluster and log what each of them proposes:
/// certificates are valid from before their issuance, and the log's time
/// never goes back, so an entry proposed behind the latest tree head is
/// logged at the head's time (and said so) rather than refused. Every
/// head agrees and grows consistently.
#[test]
fn members_with_skewed_clocks_log_every_proposal_and_agree() {
    if !std::path::Path::new(LIBFAKETIME).exists() {
        return skip_or_fail("libfaketime is not installed (Debian: faketime)");
    }
    let Some(mut cluster) = Cluster::create("skew") else {
        return;
    };
    cluster.members[1].clock = Some("-120s");
    cluster.members[2].clock = Some("+120s");
    cluster.form();
    let before = cluster.heads_at_least(0)[0].0;
    let mut last = 0;
    // Through the member ahead first (the log's time jumps ahead), then
    // the one behind and the first; each proposes with its own clock.
    for (round, via) in [2, 1, 0, 2, 1].into_iter().enumerate() {
        let name = format!("skew-{round}.example");
        let index = cluster
            .enroll(via, &cluster.members[via].address(), &name)
            .unwrap_or_else(|e| panic!("through m{}: {e}", via + 1));
        assert!(index >= last, "{index} after {last}");
        last = index;
    }
    let heads = cluster.heads_at_least(last + 1);
    assert!(
        heads.windows(2).all(|w| w[0] == w[1]) || heads.iter().all(|h| h.0 > last),
        "{heads:?}"
    );
    let size = heads.iter().map(|h| h.0).min().unwrap();
    for n in 0..3 {
        cluster.consistent(n, before.max(1), size);
    }
    assert!(
        cluster
            .members
            .iter()
            .any(|m| m.log().contains("before the log's latest tree head")),
        "no member said a proposal came from behind the log's time"
    );
}

/// A member whose node certificate is past half its lifetime renews it
/// through the log (same key, a new serial) and serves with it; its copy
/// of the operator's identity is renewed too. The member's clock
/// (libfaketime, read from a file) jumps 50 days on while it runs; node
/// certificates live 90 days, the operator's one.
#[test]
fn a_node_certificate_past_half_its_life_is_renewed() {
    let Some(clock) = FakedClock::new("renewal-clock") else {
        return skip_or_fail("libfaketime is not installed (Debian: faketime)");
    };
    let faked = clock.wrapper();
    let faked: Vec<&str> = faked.iter().map(String::as_str).collect();
    let server = first_member_alone("cluster-renewal", &faked);
    let node_pem = server.dir.join("cluster-node.pem");
    let before = std::fs::read(&node_pem).unwrap();
    let operator_pem = server.dir.join("operator.pem");
    let operator_before = std::fs::read(&operator_pem).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !server
            .log()
            .iter()
            .any(|l| l.contains("node certificate renewed")),
        "renewed while young"
    );

    clock.set("+50d");
    // The operator's identity first (it is the older for its lifetime),
    // the node certificate at the next look.
    server.wait_for_log("operator identity renewed", Duration::from_secs(60));
    server.wait_for_log("node certificate renewed", Duration::from_secs(60));
    let after = std::fs::read(&node_pem).unwrap();
    assert_ne!(before, after, "cluster-node.pem is the renewed certificate");
    // A client 100 days on (when the first certificate has expired, 90
    // days after its issuance, and the renewed one has not), without a
    // certificate of its own, reaches the member over DNS-over-QUIC: the
    // member serves the renewed certificate.
    let out = Command::new("env")
        .args([
            &format!("LD_PRELOAD={LIBFAKETIME}"),
            "FAKETIME=+100d",
            "FAKETIME_DONT_FAKE_MONOTONIC=1",
            CLIENT,
        ])
        .args([
            "resolve",
            "--anonymous",
            "--json",
            "--connect",
            &server.addr(),
        ])
        .arg("--ca")
        .arg(server.ca())
        .arg("node1.internet2.test")
        .output()
        .unwrap();
    let answer: serde_json::Value = serde_json::from_str(&ok(&out)).expect("resolve JSON");
    assert_eq!(answer["name"], "node1.internet2.test", "{answer}");
    // The operator's identity is a new certificate too (its key is new:
    // a day's lifetime, renewed at half of it).
    assert_ne!(operator_before, std::fs::read(&operator_pem).unwrap());
}

/// A learner whose promotion the leader that added it never finished
/// (killed right after the join) is promoted by the next leader: m1 starts
/// the cluster, m2 joins and is a voter; m3 joins through m1, which is
/// killed -9 the moment m3 says it joined (before m1's first look at
/// whether m3 caught up). With m1 back, whichever member leads promotes
/// m3 once it caught up, and all three end voters.
#[test]
fn a_learner_left_by_a_dead_leader_is_promoted_by_the_next() {
    let Some(mut cluster) = Cluster::create("promote") else {
        return;
    };
    cluster.members[0].start(&["--cluster-init"]);
    let token = cluster.members[0].operator(&["cluster", "join-token"]);
    let via = cluster.members[0].address();
    cluster.members[1].start(&["--join", &via, "--join-token", &token]);
    cluster.wait_for_voters(2);

    let leader_pid = cluster.members[0].child.as_ref().unwrap().id();
    let joiner_log = cluster.members[2].dir.join("server.log");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && started.elapsed() < Duration::from_secs(60)
            {
                let text = std::fs::read_to_string(&joiner_log).unwrap_or_default();
                if text.contains("joined as member") {
                    // SAFETY: a plain signal to the leader's process.
                    unsafe { libc::kill(leader_pid as i32, libc::SIGKILL) };
                    return Some(started.elapsed());
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            None
        })
    };
    let token = cluster.members[0].operator(&["cluster", "join-token"]);
    cluster.members[2].start(&["--join", &via, "--join-token", &token]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(
        watcher.join().unwrap().is_some(),
        "m3 never said it joined:\n{}",
        cluster.members[2].log()
    );
    cluster.members[0].kill9();
    let m3 = node_id(&cluster.members[2]);
    assert!(
        !cluster.members[0]
            .log()
            .lines()
            .any(|l| l.contains("is a voter now") && l.contains(&format!("id={m3}"))),
        "m1 promoted m3 before it was killed: the test did not test the next leader"
    );
    cluster.members[0].start(&[]);
    cluster.wait_for(Duration::from_secs(60), |status| {
        let roles: Vec<String> = status["members"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| format!("{}={}", m["name"], m["role"]))
            .collect();
        let voters = roles.iter().filter(|r| r.ends_with("\"voter\"")).count();
        (voters == 3).then_some(()).ok_or(format!("{roles:?}"))
    });
}

/// `internet2-server rotate` on a member renews its node certificate, the
/// certificate a member serves (a single node's ROTATE issues a server
/// certificate instead): through the log, at once, and served to the next
/// connection.
#[test]
fn rotate_on_a_member_renews_the_node_certificate_it_serves() {
    use dataplane::client::peers::{PeerRequest, Peers};
    let server = first_member_alone("cluster-rotate", &[]);
    let node_pem = server.dir.join("cluster-node.pem");
    let serial_of = |path: &std::path::Path| {
        let der = controlplane::authority::pem::load_cert(path).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        cert.raw_serial_as_string().replace(':', "")
    };
    let before = serial_of(&node_pem);

    let printed = ok(&server.admin(&["rotate"]));
    let after = serial_of(&node_pem);
    assert_ne!(before, after, "cluster-node.pem is a new certificate");
    assert!(
        printed.to_lowercase().contains(&after.to_lowercase()),
        "rotate printed {printed:?}, the new node certificate is {after}"
    );
    server.wait_for_log("node certificate renewed", Duration::from_secs(10));

    // The next connection is served the new certificate.
    let mut target = operator_target(&server);
    target.server_name = "::1".into();
    let peers = Peers::spawn(&target).unwrap();
    let (seen, served) = std::sync::mpsc::channel();
    let request = PeerRequest {
        remote: target.remote,
        server_name: target.server_name.clone(),
        kind: controlplane::authority::api::CT_STH,
        payload: bytes::Bytes::new(),
        deadline: Instant::now() + Duration::from_secs(10),
        check: Some(Box::new(
            move |peer: &dataplane::client::peers::PeerIdentity| {
                let _ = seen.send(peer.leaf.clone());
                Ok(())
            },
        )),
        on_reply: Box::new(|_| {}),
    };
    assert!(peers.send(request).is_ok());
    let leaf = served.recv_timeout(Duration::from_secs(15)).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    assert_eq!(cert.raw_serial_as_string().replace(':', ""), after);
}

/// The first member of a new cluster on production defaults, on [::1]
/// without namespaces (started through `wrapper`), once its node
/// certificate is issued and logged.
fn first_member_alone(tag: &str, wrapper: &[&str]) -> Server {
    let server = Server::start_with(
        tag,
        "::1",
        "[hypermesh_assets]\nplot_k = 12\n",
        wrapper,
        &[
            "--mode",
            "production",
            "--bootstrap",
            "federated",
            "--cluster-init",
        ],
    );
    server.wait_for_log(
        "node certificate issued and logged",
        Duration::from_secs(30),
    );
    server
}

/// Assets on a cluster. Memory: each member hands out identifiers with its
/// own node number under its own locator, which the membership records
/// (a member whose locator is another's is refused at its join); a member
/// asked for another's asset proxies the request to the holder, for the
/// caller's identity. Storage assets are replicated: any member serves
/// each, and the operator's quotas hold on all.
#[test]
fn memory_assets_are_proxied_to_their_member_and_storage_assets_replicated() {
    let Some(mut cluster) = Cluster::create("assets") else {
        return;
    };
    cluster.members[0].start(&["--cluster-init"]);
    cluster.join(1, 0).unwrap();
    // Member 3 configured with member 1's node number: refused.
    let config = cluster.members[2].dir.join("server.toml");
    let own = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, own.replace("node_number = 3", "node_number = 1")).unwrap();
    let why = cluster.join(2, 1).unwrap_err();
    assert!(
        why.contains("asset locator") && why.contains("is m1 "),
        "{why}"
    );
    std::fs::write(&config, own).unwrap();
    cluster.join(2, 0).unwrap();
    cluster.wait_for_voters(3);
    let status = cluster.status_from(2).unwrap();
    let locators: Vec<_> = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["asset_locator"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        locators.iter().all(|l| l.ends_with("::/64")) && {
            let mut unique = locators.clone();
            unique.sort();
            unique.dedup();
            unique.len() == 3
        },
        "{status}"
    );

    let alloc = cluster.at_member(0, &["asset", "alloc", "memory", "4K", "--json"]);
    let alloc: serde_json::Value = serde_json::from_str(ok(&alloc).trim()).unwrap();
    let address = alloc["address"].as_str().unwrap().to_owned();
    let a = address.as_str();
    let ip: std::net::Ipv6Addr = a.parse().unwrap();
    let segments = ip.segments();
    assert_eq!(
        segments[3], 1,
        "member 1's locator has its node number: {a}"
    );
    assert_eq!(segments[4] >> 4, 1, "so has the identifier: {a}");
    let file = cluster.members[0].dir.join("in.bin");
    std::fs::write(&file, b"abc").unwrap();
    ok(&cluster.at_member(0, &["asset", "write", a, "--in", file.to_str().unwrap()]));

    // Member 2 alone, asked for member 1's asset: proxied.
    let read = cluster.at_member(1, &["asset", "read", a, "--len", "3"]);
    assert_eq!(ok(&read).as_bytes(), b"abc");
    // Written through member 3, read back at the holder.
    std::fs::write(&file, b"xyz").unwrap();
    ok(&cluster.at_member(
        2,
        &[
            "asset",
            "write",
            a,
            "--offset",
            "1",
            "--in",
            file.to_str().unwrap(),
        ],
    ));
    let read = cluster.at_member(0, &["asset", "read", a, "--len", "4"]);
    assert_eq!(ok(&read).as_bytes(), b"axyz");
    // Another identity, through a proxy: the holder sees who it is.
    cluster
        .enroll(1, &cluster.members[1].address(), "stranger")
        .unwrap();
    let stranger = cluster.members[1].dir.join("stranger.pem");
    let granted = cluster.operator_at(0, &["stake", "grant", "--cert", stranger.to_str().unwrap()]);
    let granted: serde_json::Value = serde_json::from_str(ok(&granted).trim()).unwrap();
    let stranger_id = granted["identity"].as_str().unwrap().to_owned();
    // Member 2 applies the grant a moment after the leader answered it.
    let mut why = String::new();
    for _ in 0..50 {
        let refused = cluster.client_as(
            1,
            &cluster.members[1].address(),
            &stranger,
            &["asset", "read", a, "--len", "3"],
        );
        assert!(!refused.status.success());
        why = String::from_utf8_lossy(&refused.stderr).into_owned();
        if !why.contains("stake") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(why.contains("server error 13:"), "{why}");
    // An address under no member's locator: said so by the member asked.
    let mut other = segments;
    (other[2], other[3]) = (9, 9);
    let nowhere = std::net::Ipv6Addr::from(other);
    let unknown = cluster.at_member(1, &["asset", "read", &nowhere.to_string(), "--len", "3"]);
    let why = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        !unknown.status.success() && why.contains("server error 12:") && why.contains("no member"),
        "{why}"
    );
    // What the proxy costs a command (printed, never asserted): a read at
    // the holder, against one through member 2.
    let median_ms = |connect: &str| {
        let mut ms: Vec<u128> = (0..5)
            .map(|_| {
                let started = Instant::now();
                ok(&cluster.client_at(1, connect, &["asset", "read", a, "--len", "3"]));
                started.elapsed().as_millis()
            })
            .collect();
        ms.sort_unstable();
        ms[2]
    };
    let direct = median_ms(&cluster.members[0].address());
    let proxied = median_ms(&cluster.members[1].address());
    eprintln!(
        "asset read command from member 2's namespace, median of 5: at the holder {direct} ms, \
         through member 2 {proxied} ms"
    );
    let listed = cluster.at_member(0, &["asset", "list", "--json"]);
    let listed: serde_json::Value = serde_json::from_str(ok(&listed).trim()).unwrap();
    assert_eq!(listed[0]["address"], a, "{listed}");

    // Storage: every member's store holds every storage asset, each
    // change a command of the log; a member answers once it applied it,
    // the others a moment later.
    let eventually = |n: usize, args: &[&str], expect: &dyn Fn(&std::process::Output) -> bool| {
        let mut last = None;
        for _ in 0..50 {
            let out = cluster.at_member(n, args);
            if expect(&out) {
                return;
            }
            last = Some(out);
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "member {} never answered {args:?} as expected: {last:?}",
            n + 1
        );
    };
    let stored = cluster.at_member(2, &["asset", "alloc", "storage", "100K", "--json"]);
    let stored: serde_json::Value = serde_json::from_str(ok(&stored).trim()).unwrap();
    let s = stored["address"].as_str().unwrap().to_owned();
    // More than one storage write carries: the client sends several.
    let data: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &data).unwrap();
    ok(&cluster.at_member(0, &["asset", "write", &s, "--in", file.to_str().unwrap()]));
    let back = cluster.members[1].dir.join("back.bin");
    let back_path = back.to_str().unwrap();
    let read_back = |n: usize| {
        let _ = std::fs::remove_file(&back);
        let out = cluster.at_member(
            n,
            &["asset", "read", &s, "--len", "70000", "--out", back_path],
        );
        (out, std::fs::read(&back).ok())
    };
    // `file` written to the storage asset through member `n`, once a
    // majority there commits it (after an election, when one is due).
    let write_through = |n: usize| {
        wait_until(Duration::from_secs(30), Duration::from_millis(500), || {
            let write = ["asset", "write", &s, "--in", file.to_str().unwrap()];
            let out = cluster.at_member(n, &write);
            match out.status.success() {
                true => Ok(()),
                false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
            }
        });
    };
    // Member `n`, cut off, refuses a read with `NOT_LEADER` (code 32)
    // rather than answer with anything, `held` (its old bytes) above all.
    let refuses_read = |n: usize, held: &[u8], name: &str| {
        let (out, bytes) = read_back(n);
        let why = String::from_utf8_lossy(&out.stderr);
        let answered = match &bytes {
            Some(bytes) if bytes == held => "its old bytes",
            Some(_) => "other bytes",
            None => "none",
        };
        assert!(
            !out.status.success() && why.contains("server error 32:"),
            "{name}, cut off, answered a read ({answered}): {why}"
        );
    };
    // Reads are linearizable: written through member 1, the bytes read
    // back at member 2 at once, whether or not member 2 had applied the
    // write when the read arrived.
    let (out, bytes) = read_back(1);
    assert!(out.status.success(), "{out:?}");
    assert!(bytes == Some(data.clone()), "member 2 read other bytes");
    // Member 2 cut off from the others (its port on the bridge down; its
    // own address still answers a client in its namespace): a write
    // through member 1 commits with member 3, and member 2 answers a read
    // with `NOT_LEADER` (code 32), never the bytes it holds.
    common::ip(&["-n", &cluster.hub, "link", "set", "p2", "down"]);
    let newer: Vec<u8> = data.iter().map(|b| b ^ 0x5a).collect();
    std::fs::write(&file, &newer).unwrap();
    write_through(0);
    refuses_read(1, &data, "member 2");
    common::ip(&["-n", &cluster.hub, "link", "set", "p2", "up"]);
    eventually(
        1,
        &["asset", "read", &s, "--len", "70000", "--out", back_path],
        &|out| out.status.success() && std::fs::read(&back).is_ok_and(|b| b == newer),
    );
    // The leader cut off: by the time the others elected a leader and
    // committed a write, its read lease has run out and no majority
    // confirms it leads, so it too answers `NOT_LEADER`, never its old
    // bytes. (The lease's own bound is checked in process, in
    // `controlplane::cluster::tests`.)
    let status = cluster.status_from(1).unwrap();
    let leader = Cluster::leader(&status).expect("a leader");
    let other = (0..3).find(|n| *n != leader).unwrap();
    let port = format!("p{}", leader + 1);
    common::ip(&["-n", &cluster.hub, "link", "set", &port, "down"]);
    let newest: Vec<u8> = data.iter().map(|b| b ^ 0xa5).collect();
    std::fs::write(&file, &newest).unwrap();
    write_through(other);
    refuses_read(leader, &newer, "the old leader");
    common::ip(&["-n", &cluster.hub, "link", "set", &port, "up"]);
    eventually(
        leader,
        &["asset", "read", &s, "--len", "70000", "--out", back_path],
        &|out| out.status.success() && std::fs::read(&back).is_ok_and(|b| b == newest),
    );
    // The operator's quota, set at member 1, holds at member 3.
    ok(&cluster.operator_at(0, &["quota", "set", &stranger_id, "--storage", "50K"]));
    let over = ["asset", "alloc", "storage", "60K"];
    let mut why = String::new();
    for _ in 0..50 {
        let out = cluster.client_as(2, &cluster.members[2].address(), &stranger, &over);
        assert!(!out.status.success(), "past the quota");
        why = String::from_utf8_lossy(&out.stderr).into_owned();
        if why.contains("server error 15:") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(why.contains("server error 15:"), "{why}");
    let stranger_read = cluster.client_as(
        2,
        &cluster.members[2].address(),
        &stranger,
        &["asset", "read", &s, "--len", "3"],
    );
    assert!(
        String::from_utf8_lossy(&stranger_read.stderr).contains("server error 13:"),
        "{stranger_read:?}"
    );
    // A named storage asset: the name is the cluster's zone's, and freed
    // through another member than the one that allocated it (another
    // locator), it goes with the asset, so a new asset may take it.
    let named = [
        "asset", "alloc", "storage", "4K", "--name", "notes", "--json",
    ];
    let first = cluster.at_member(2, &named);
    let first: serde_json::Value = serde_json::from_str(ok(&first).trim()).unwrap();
    let n = first["address"].as_str().unwrap().to_owned();
    eventually(0, &named[..6], &|out| {
        String::from_utf8_lossy(&out.stderr).contains("server error 18:")
    });
    ok(&cluster.at_member(1, &["asset", "free", &n]));
    let mut taken = None;
    for _ in 0..50 {
        let out = cluster.at_member(0, &named);
        if out.status.success() {
            taken = Some(out);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let taken = taken.expect("the freed asset's name is free again");
    let taken: serde_json::Value = serde_json::from_str(ok(&taken).trim()).unwrap();
    ok(&cluster.at_member(0, &["asset", "free", taken["address"].as_str().unwrap()]));
    let freed = cluster.at_member(1, &["asset", "free", &s, "--json"]);
    let freed: serde_json::Value = serde_json::from_str(ok(&freed).trim()).unwrap();
    assert_eq!(freed["freed_bytes"], 100 * 1024);
    eventually(0, &["asset", "read", &s, "--len", "3"], &|out| {
        String::from_utf8_lossy(&out.stderr).contains("server error 11:")
    });
    let freed = cluster.at_member(2, &["asset", "free", a, "--json"]);
    let freed: serde_json::Value = serde_json::from_str(ok(&freed).trim()).unwrap();
    assert_eq!(freed["freed_bytes"], 4096);
    let gone = cluster.at_member(0, &["asset", "read", a, "--len", "3"]);
    let why = String::from_utf8_lossy(&gone.stderr);
    assert!(
        !gone.status.success() && why.contains("server error 11:"),
        "{why}"
    );

    // A VM is a storage asset: deployed through member 1, every member
    // holds it and runs it on its own VM threads.
    let echo = concat!(env!("CARGO_MANIFEST_DIR"), "/vm/modules/echo.wat");
    ok(&cluster.at_member(0, &["vm", "deploy", echo, "--name", "echo"]));
    eventually(2, &["vm", "call", "echo", "--input", "hi"], &|out| {
        out.status.success() && out.stdout == b"hi"
    });
    eventually(1, &["vm", "remove", "echo"], &|out| out.status.success());
    // A VM run at member 2 reaches a memory asset of member 1 through the
    // asset proxy, writing it and reading it back.
    let alloc = cluster.at_member(0, &["asset", "alloc", "memory", "4K", "--json"]);
    let alloc: serde_json::Value = serde_json::from_str(ok(&alloc).trim()).unwrap();
    let held: std::net::Ipv6Addr = alloc["address"].as_str().unwrap().parse().unwrap();
    let input = cluster.members[1].dir.join("round-trip.bin");
    std::fs::write(&input, [&held.octets()[..], b"via a member"].concat()).unwrap();
    let round_trip = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/vm/modules/asset_roundtrip.wat"
    );
    let input = input.to_str().unwrap();
    let ran = cluster.at_member(1, &["vm", "run", round_trip, "--input-file", input]);
    assert_eq!(ok(&ran), "via a member", "{ran:?}");
    let read = cluster.at_member(0, &["asset", "read", &held.to_string(), "--len", "12"]);
    assert_eq!(ok(&read), "via a member");
    // A VM run at member 3 writes a storage asset through the cluster's
    // log: every member reads what it wrote.
    let alloc = cluster.at_member(0, &["asset", "alloc", "storage", "4K", "--json"]);
    let alloc: serde_json::Value = serde_json::from_str(ok(&alloc).trim()).unwrap();
    let stored = alloc["address"].as_str().unwrap().to_owned();
    let octets = stored.parse::<std::net::Ipv6Addr>().unwrap().octets();
    let input = cluster.members[2].dir.join("storage-trip.bin");
    std::fs::write(&input, [&octets[..], b"in the log"].concat()).unwrap();
    let input = input.to_str().unwrap();
    eventually(
        2,
        &["vm", "run", round_trip, "--input-file", input],
        &|out| out.status.success() && out.stdout == b"in the log",
    );
    eventually(1, &["asset", "read", &stored, "--len", "10"], &|out| {
        out.status.success() && out.stdout == b"in the log"
    });
    eventually(0, &["vm", "call", "echo"], &|out| {
        String::from_utf8_lossy(&out.stderr).contains("server error 10:")
    });
}
