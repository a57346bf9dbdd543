//! Interop with an independent QUIC implementation (aioquic, from PyPI,
//! installed by `.ci/setup-interop.sh`): their perf client against our
//! server, and our perf client against their server.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

#[test]
fn aioquic_perf_client_against_our_server() {
    let Some(python) = interop_python() else {
        return skip_or_fail("aioquic is not installed: run `bash .ci/setup-interop.sh`");
    };
    // aioquic's perf client has no certificate of our CA.
    let server = Server::start(
        "aioquic-client",
        "[trustchain_authority]\nperf_without_client_certificate = true\n",
    );
    let out = interop_peer(&python, "perf_client.py", &server)
        .args([
            "--server-name",
            "localhost",
            "--download",
            "10000000",
            "--upload",
            "1000000",
            "--timeout",
            "60",
        ])
        .output()
        .unwrap();
    let stdout = ok(&out);
    let result: serde_json::Value =
        serde_json::from_str(stdout.trim()).expect("perf_client prints JSON");
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["received"], 10_000_000, "{result}");
    let stats = server.stats();
    assert!(
        stats["total"]["stream_bytes_rx"].as_u64().unwrap() >= 1_000_008,
        "the upload reached the server: {stats}"
    );
}

#[test]
fn our_perf_client_against_aioquic_server() {
    let Some(python) = interop_python() else {
        return skip_or_fail("aioquic is not installed: run `bash .ci/setup-interop.sh`");
    };
    let dir = temp_dir("aioquic-server");
    let port = free_port();
    let mut child = Command::new(&python)
        .arg(interop_script("perf_server.py"))
        .args([
            "--host",
            "::1",
            "--port",
            &port.to_string(),
            "--self-signed",
        ])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let ready = rx.recv_timeout(Duration::from_secs(30));
    let json = dir.join("bench.json");
    let out = Command::new(CLIENT)
        .args(["bench", "--connect", &format!("[::1]:{port}"), "--ca"])
        .arg(dir.join("cert.pem"))
        .args([
            "--download",
            "5000000",
            "--upload",
            "100000",
            "--requests",
            "1",
            "--duration",
            "60",
            "--quiet",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        ready.as_deref(),
        Ok("listening"),
        "aioquic server did not start"
    );
    ok(&out);
    let result = read_json(&json);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(result["bytes"], 5_000_000, "{result}");
    assert_eq!(result["errors"], 0, "{result}");
}

/// dnspython's DoQ client (an independent implementation) against our zone.
fn doq(python: &std::path::Path, server: &Server, name: &str, rdtype: &str) -> serde_json::Value {
    let out = interop_peer(python, "doq_query.py", server)
        .args([name, rdtype])
        .output()
        .unwrap();
    serde_json::from_str(ok(&out).trim()).expect("doq_query prints JSON")
}

#[test]
fn dnspython_doq_client_against_our_zone() {
    let Some(python) = interop_python() else {
        return skip_or_fail("dnspython is not installed: run `bash .ci/setup-interop.sh`");
    };
    let server = Server::start(
        "doq",
        "[trustchain_authority]\ndns_apex = \"internet2.test.\"\ndns_name = \"node1\"\n",
    );
    let aaaa = doq(&python, &server, "node1.internet2.test", "AAAA");
    assert_eq!(
        (aaaa["rcode"].as_str(), aaaa["aa"].as_bool()),
        (Some("NOERROR"), Some(true)),
        "{aaaa}"
    );
    assert_eq!(aaaa["answers"], serde_json::json!(["::1"]));

    // The TLSA pin is the SHA-256 of the server's SPKI (its key is kept
    // across certificate rotations), computed here by openssl, not by us.
    let tlsa = doq(
        &python,
        &server,
        &format!("_{}._udp.node1.internet2.test", server.port),
        "TLSA",
    );
    let spki = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl pkey -in {} -pubout -outform der | sha256sum",
            server.dir.join("server-tls.key").display()
        ))
        .output()
        .unwrap();
    let pin = String::from_utf8_lossy(&spki.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(
        tlsa["answers"],
        serde_json::json!([format!("3 1 1 {pin}")]),
        "{tlsa}"
    );

    let a = doq(&python, &server, "node1.internet2.test", "A");
    assert_eq!(a["rcode"], "NOERROR");
    assert_eq!(a["answers"], serde_json::json!([]), "IPv6 only: no A data");
    assert_eq!(
        a["authority"].as_array().unwrap().len(),
        1,
        "negative answers carry the SOA"
    );
    let unknown = doq(&python, &server, "nope.internet2.test", "AAAA");
    assert_eq!(unknown["rcode"], "NXDOMAIN");
    let outside = doq(&python, &server, "example.com", "AAAA");
    assert_eq!(outside["rcode"], "REFUSED");
    assert!(server.stats()["total"]["doq_queries"].as_u64().unwrap() >= 5);

    // Our own resolver agrees with dnspython and openssl.
    let out = server.client(&["resolve", "node1.internet2.test", "--json"]);
    let resolved: serde_json::Value = serde_json::from_str(ok(&out).trim()).unwrap();
    assert_eq!(
        resolved["addresses"],
        serde_json::json!([format!("[::1]:{}", server.port)])
    );
    assert_eq!(resolved["pins_sha256"], serde_json::json!([pin]));
    let missing = server.client(&["resolve", "nope.internet2.test"]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("NXDomain"),
        "{missing:?}"
    );
}
