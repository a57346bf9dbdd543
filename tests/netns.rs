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

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Topology {
    fn create(tag: &str) -> Topology {
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
        ip(&[
            "link",
            "add",
            "v0",
            "netns",
            &topology.server,
            "type",
            "veth",
            "peer",
            "name",
            "v1",
            "netns",
            &topology.client,
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
    let stats: serde_json::Value = serde_json::from_slice(&ok(&out).into_bytes()).unwrap();
    stats["front_door"].clone()
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
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if server
            .log()
            .iter()
            .any(|l| l.contains("reloaded: blocklist applied"))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the server never applied the reload"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
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
