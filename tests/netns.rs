//! Tests on the project's own two-host topology: network namespaces joined
//! by a veth pair (fd71:7e57:0:2::/64, IPv4 only link-local 169.254.71.0/24),
//! removed again whatever the outcome.

mod common;

use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

const SERVER_IP: &str = "fd71:7e57:0:2::1";
const CLIENT_IP: &str = "fd71:7e57:0:2::2";
const SERVER_V4: &str = "169.254.71.1";

/// Two namespaces and a veth pair; Drop deletes both namespaces (and so
/// the veth pair).
struct Topology {
    server: String,
    client: String,
}

impl Topology {
    fn create(tag: &str) -> Topology {
        Topology::create_with_queues(tag, 1)
    }

    /// Each veth end gets `queues` RX and TX queues (the `xdp` backend binds
    /// one per worker; veth spreads flows over them like RSS).
    fn create_with_queues(tag: &str, queues: usize) -> Topology {
        let id = format!("{}-{}", std::process::id(), tag);
        let topology = Topology {
            server: format!("i2t-s-{id}"),
            client: format!("i2t-c-{id}"),
        };
        for ns in [&topology.server, &topology.client] {
            ip(&["netns", "add", ns]);
            let status = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    ns,
                    "sysctl",
                    "-qw",
                    "net.ipv6.conf.all.accept_dad=0",
                    "net.ipv6.conf.default.accept_dad=0",
                ])
                .status()
                .unwrap();
            assert!(status.success());
        }
        let queues = queues.to_string();
        ip(&[
            "link",
            "add",
            "v0",
            "netns",
            &topology.server,
            "numtxqueues",
            &queues,
            "numrxqueues",
            &queues,
            "type",
            "veth",
            "peer",
            "name",
            "v1",
            "netns",
            &topology.client,
            "numtxqueues",
            &queues,
            "numrxqueues",
            &queues,
        ]);
        for (ns, dev, v6, v4) in [
            (&topology.server, "v0", SERVER_IP, SERVER_V4),
            (&topology.client, "v1", CLIENT_IP, "169.254.71.2"),
        ] {
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ]);
            ip(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", dev]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        topology
    }

    fn exec(&self, ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.server, &self.client] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ping_from_client(topology: &Topology, server: &Server, timeout_ms: u32) -> std::process::Output {
    topology
        .exec(&topology.client, CLIENT)
        .args([
            "ping",
            "--connect",
            &format!("[{SERVER_IP}]:{}", server.port),
            "--ca",
        ])
        .arg(server.ca())
        .args(["--timeout-ms", &timeout_ms.to_string()])
        .output()
        .unwrap()
}

/// Counters read from inside the server's namespace (over lo, not the
/// filtered veth).
fn front_door(topology: &Topology, server: &Server) -> serde_json::Value {
    stats(topology, server)["front_door"].clone()
}

fn stats(topology: &Topology, server: &Server) -> serde_json::Value {
    let out = topology
        .exec(&topology.server, CLIENT)
        .args([
            "stats",
            "--json",
            "--connect",
            &format!("[{SERVER_IP}]:{}", server.port),
            "--ca",
        ])
        .arg(server.ca())
        .output()
        .unwrap();
    serde_json::from_slice(&ok(&out).into_bytes()).unwrap()
}

fn reload(server: &Server, blocklist: &str) {
    let config = std::fs::read_to_string(server.dir.join("server.toml")).unwrap();
    let config = config
        .lines()
        .map(|l| {
            if l.starts_with("blocklist") {
                format!("blocklist = [{blocklist}]")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(server.dir.join("server.toml"), config).unwrap();
    signal(server.pid(), "HUP");
    server.wait_for_log("reloaded: blocklist applied", Duration::from_secs(10));
}

#[test]
fn xdp_front_door_drops_ipv4_and_blocklisted_sources_and_passes_the_rest() {
    if !is_root() {
        return skip_or_fail("network namespaces and XDP need root");
    }
    let topology = Topology::create("xdp");
    let wrapper = ["ip", "netns", "exec", topology.server.as_str()];
    let server = Server::start_in(
        "xdp",
        SERVER_IP,
        "[dataplane]\nworkers = 1\nxdp_interface = \"v0\"\nxdp_mode = \"native\"\nblocklist = []\n",
        &wrapper,
    );
    assert!(
        server
            .log()
            .iter()
            .any(|l| l.contains("XDP front door attached"))
    );

    // QUIC from the client host passes; NDP (ICMPv6) had to pass first.
    ok(&ping_from_client(&topology, &server, 5000));
    let before = front_door(&topology, &server);
    assert!(before["pass_ours"].as_u64().unwrap() > 0, "{before}");
    assert!(
        before["pass_other"].as_u64().unwrap() > 0,
        "NDP is passed: {before}"
    );

    // IPv4 to the port is dropped at XDP (link-local test addresses only).
    let send_v4 = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nfor _ in range(20): s.sendto(b'x' * 100, ('{SERVER_V4}', {}))",
        server.port
    );
    let sent = topology
        .exec(&topology.client, "python3")
        .args(["-c", &send_v4])
        .status()
        .unwrap();
    assert!(sent.success());
    let after = front_door(&topology, &server);
    assert!(after["drop_ipv4"].as_u64().unwrap() >= 20, "{after}");

    // Block the client's address: its handshakes die at XDP.
    reload(&server, &format!("\"{CLIENT_IP}/128\""));
    let blocked = ping_from_client(&topology, &server, 1500);
    assert!(
        !blocked.status.success(),
        "a blocklisted source gets no answer"
    );
    let counters = front_door(&topology, &server);
    assert!(counters["drop_blocked"].as_u64().unwrap() > 0, "{counters}");

    // Unblock: served again.
    reload(&server, "");
    ok(&ping_from_client(&topology, &server, 5000));
    drop(server);
    drop(topology);
}

fn counter(worker: &serde_json::Value, name: &str) -> u64 {
    worker[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {worker}"))
}

/// Run `internet2 bench` from the client namespace; returns its JSON.
fn bench_from_client(topology: &Topology, server: &Server, args: &[&str]) -> serde_json::Value {
    let json = server.dir.join(format!("bench-{}.json", args.len()));
    let out = topology
        .exec(&topology.client, CLIENT)
        .args([
            "bench",
            "--connect",
            &format!("[{SERVER_IP}]:{}", server.port),
            "--ca",
        ])
        .arg(server.ca())
        .args(args)
        .args(["--quiet", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    ok(&out);
    read_json(&json)
}

#[test]
fn xdp_backend_serves_verified_transfers_and_returns_every_frame() {
    if !is_root() {
        return skip_or_fail("network namespaces, XDP and AF_XDP need root");
    }
    let topology = Topology::create_with_queues("afxdp", 2);
    let wrapper = ["ip", "netns", "exec", topology.server.as_str()];
    let server = Server::start_in(
        "afxdp",
        SERVER_IP,
        "[stoq_transport]\nbackend = \"xdp\"\nzero_copy = \"auto\"\n\
         [dataplane]\nworkers = 2\nxdp_interface = \"v0\"\nxdp_mode = \"native\"\nblocklist = []\n",
        &wrapper,
    );
    let log = server.log();
    assert_eq!(
        log.iter().filter(|l| l.contains("backend xdp")).count(),
        2,
        "both workers run AF_XDP: {log:#?}"
    );

    // Bad input first: junk QUIC headers (AF_XDP path), datagrams larger
    // than the MTU (IPv6 fragments: passed to the kernel, reassembled, read
    // from the worker's kernel socket), another port. None may wedge a ring.
    let junk = format!(
        "import os, socket\n\
         s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n\
         for i in range(600): s.sendto(os.urandom(i % 64), ('{SERVER_IP}', {port}))\n\
         for i in range(40): s.sendto(os.urandom(3000), ('{SERVER_IP}', {port}))\n\
         for i in range(40): s.sendto(b'x' * 100, ('{SERVER_IP}', {other}))\n",
        port = server.port,
        other = server.port + 1,
    );
    let sent = topology
        .exec(&topology.client, "python3")
        .args(["-c", &junk])
        .status()
        .unwrap();
    assert!(sent.success());
    let after_junk = stats(&topology, &server);
    let total = &after_junk["total"];
    assert!(
        counter(total, "drop_truncated") + counter(total, "drop_not_quic") > 0,
        "junk headers are dropped and counted: {total}"
    );
    assert!(
        counter(&after_junk["front_door"], "pass_other") >= 40 * 3,
        "fragments and other ports go to the kernel: {after_junk}"
    );

    // A transfer each way, every byte checked by both ends.
    let result = bench_from_client(
        &topology,
        &server,
        &[
            "--download",
            "20000000",
            "--upload",
            "20000000",
            "--requests",
            "1",
            "--verify",
            "--duration",
            "60",
        ],
    );
    assert_eq!(result["bytes"], 20_000_000, "{result}");
    assert_eq!(result["uploaded_bytes"], 20_000_000, "{result}");
    assert_eq!(result["verify_failures"], 0, "{result}");
    assert_eq!(result["errors"], 0, "{result}");

    // Many connections, spread by veth over both queues.
    let result = bench_from_client(
        &topology,
        &server,
        &[
            "--connections",
            "200",
            "--active",
            "20",
            "--download",
            "65536",
            "--duration",
            "3",
        ],
    );
    assert_eq!(result["handshakes"], 200, "{result}");
    assert_eq!(result["errors"], 0, "{result}");

    let counters = stats(&topology, &server);
    assert_eq!(counter(&counters["total"], "perf_upload_mismatch"), 0);
    assert!(
        counter(&counters["front_door"], "redirect_xsk") > 0,
        "the front door redirects to the AF_XDP sockets: {counters}"
    );
    assert!(
        counter(&counters["total"], "xdp_rx_frames") > 0,
        "{counters}"
    );
    // veth picks the receive queue from the client socket's transmit queue,
    // so one queue may carry everything: its worker then hands datagrams
    // to their owners, and both owners send through their own sockets.
    for worker in counters["workers"].as_array().unwrap() {
        assert!(counter(worker, "xdp_tx_frames") > 0, "{worker}");
        assert_eq!(counter(worker, "xdp_rx_invalid"), 0, "{worker}");
    }

    // Idle again: every frame is back on the fill ring or the free list.
    wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        let workers = stats(&topology, &server)["workers"]
            .as_array()
            .unwrap()
            .clone();
        let balanced = workers.iter().all(|w| {
            counter(w, "xdp_frames_tx") == 0
                && counter(w, "xdp_frames_free") + counter(w, "xdp_frames_fill")
                    == counter(w, "xdp_frames_total")
                && counter(w, "xdp_frames_total") > 0
        });
        if balanced {
            Ok(())
        } else {
            Err(format!("frames were not all returned: {workers:#?}"))
        }
    });
    drop(server);
    drop(topology);
}

#[test]
fn xdp_backend_with_zero_copy_on_fails_clearly_on_veth() {
    if !is_root() {
        return skip_or_fail("network namespaces, XDP and AF_XDP need root");
    }
    let topology = Topology::create("afxdp-zc");
    let dir = temp_dir("afxdp-zc");
    let config = dir.join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[internet2]\nbind = \"{SERVER_IP}\"\nport = {}\n\
             [stoq_transport]\nbackend = \"xdp\"\nzero_copy = \"on\"\n\
             [dataplane]\nworkers = 1\nxdp_interface = \"v0\"\n",
            free_port()
        ),
    )
    .unwrap();
    let out = topology
        .exec(&topology.server, SERVER)
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success(), "veth has no zero-copy AF_XDP");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("zero_copy = \"on\"") && stderr.contains("v0 queue 0"),
        "{stderr}"
    );
    drop(topology);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Run `f` on a thread that entered network namespace `ns` (sockets it
/// opens live there).
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    use std::os::fd::AsRawFd;
    std::thread::scope(|s| {
        s.spawn(|| {
            let handle = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
            // SAFETY: setns on this thread only, with a namespace file we
            // hold open; no memory is shared with the kernel.
            let entered = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(entered, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    })
}

/// Proofs that never verify: a malformed bundle every time.
#[derive(Debug)]
struct GarbageProofs;

impl dataplane::admission::Admitter for GarbageProofs {
    fn registration(&self, _: &[u8]) -> Result<Option<Vec<u8>>, String> {
        Ok(None)
    }

    fn bundle(&self, _: &[u8], _: &[u8; 32]) -> Result<Vec<u8>, String> {
        Ok(vec![0xab; 64])
    }
}

/// One connection from the client namespace with a garbage bundle.
fn lie_from_client(topology: &Topology, server: &Server) {
    let root = controlplane::authority::pem::load_cert(&server.ca()).unwrap();
    let target = dataplane::client::ClientTarget {
        remote: format!("[{SERVER_IP}]:{}", server.port).parse().unwrap(),
        server_name: "localhost".into(),
        trust: dataplane::ServerTrust::Roots(vec![root]),
        identity: Some(operator_identity(server)),
        backend: dataplane::BackendKind::Socket,
        transport: dataplane::TransportSettings::default(),
        admitter: Some(std::sync::Arc::new(GarbageProofs)),
    };
    let outcome = in_netns(&topology.client, || {
        let config = target
            .client_config(dataplane::protocols::ALPN_STOQ)
            .unwrap();
        dataplane::client::rpc(
            &target,
            &config,
            vec![(
                dataplane::protocols::stoq::Kind::Ping,
                bytes::Bytes::from_static(b"x"),
            )],
            Duration::from_secs(3),
        )
        .unwrap()
    });
    let error = outcome.error.unwrap_or_default();
    assert!(error.contains("(0x205)"), "{error}");
}

/// `internet2-server ARGS` as the operator, inside the server's namespace.
fn operator(topology: &Topology, server: &Server, args: &[&str]) -> serde_json::Value {
    let out = server
        .operator_command(topology.exec(&topology.server, SERVER))
        .args(args)
        .output()
        .unwrap();
    serde_json::from_str(&ok(&out)).unwrap()
}

fn isolated(topology: &Topology, server: &Server) -> Vec<String> {
    operator(topology, server, &["blocklist", "list"])["isolated"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["prefix"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn repeated_admission_failures_isolate_the_source_until_removed_or_expired() {
    if !is_root() {
        return skip_or_fail("network namespaces and XDP need root");
    }
    let topology = Topology::create("iso");
    let wrapper = ["ip", "netns", "exec", topology.server.as_str()];
    // A /128 here: the server's own address (from which its operator
    // commands come) shares the client's /64 on this test link.
    let server = Server::start_in(
        "iso",
        SERVER_IP,
        "[hypermesh_assets]\nplot_k = 12\ndevelopment_stake = 1\nisolation_threshold = 3\nisolation_identity_threshold = 100000\nisolation_ttl_s = 4\nisolation_ipv6_prefix_len = 128\n[dataplane]\nworkers = 1\nxdp_interface = \"v0\"\n",
        &wrapper,
    );
    ok(&ping_from_client(&topology, &server, 5000));
    let blocked_prefix = format!("{CLIENT_IP}/128");

    // Three refused bundles put the source on the blocklist ...
    for _ in 0..3 {
        lie_from_client(&topology, &server);
    }
    let isolation = |what: &'static str| {
        wait_until(Duration::from_secs(5), Duration::from_millis(100), || {
            if isolated(&topology, &server).contains(&blocked_prefix) {
                Ok(())
            } else {
                Err(what.to_owned())
            }
        })
    };
    isolation("the liar was never isolated");
    // ... and its next attempts, honest or not, die at the XDP front door.
    let refused = ping_from_client(&topology, &server, 1500);
    assert!(!refused.status.success(), "an isolated source was served");
    let counters = front_door(&topology, &server);
    assert!(counters["drop_blocked"].as_u64().unwrap() > 0, "{counters}");
    let status = stats(&topology, &server)["admission"].clone();
    assert_eq!(status["isolated_count"], 1, "{status}");

    // The operator lifts it.
    operator(
        &topology,
        &server,
        &["blocklist", "remove", &blocked_prefix],
    );
    ok(&ping_from_client(&topology, &server, 5000));

    // Isolated again, it expires by itself after the time to live.
    for _ in 0..3 {
        lie_from_client(&topology, &server);
    }
    let isolated_at = Instant::now();
    isolation("the liar was never isolated again");
    assert!(!ping_from_client(&topology, &server, 1000).status.success());
    // Each failed ping waits out its own 1.5 s timeout: no extra sleep.
    let expiry = (isolated_at + Duration::from_secs(15)).saturating_duration_since(Instant::now());
    wait_until(expiry, Duration::ZERO, || {
        if ping_from_client(&topology, &server, 1500).status.success() {
            Ok(())
        } else {
            Err("the entry never expired".into())
        }
    });
    assert!(isolated(&topology, &server).is_empty());
    drop(server);
    drop(topology);
}
