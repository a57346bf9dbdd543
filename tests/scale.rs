//! Scale, checked functionally (a test never asserts a timing): a server
//! holding many connections keeps every one of them usable, and lets them
//! all go when the clients leave. `internet2 bench` is the client; the
//! set-up rates it prints are reported, not asserted (issue figures come
//! from `cargo xtask bench-40g`).

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

const CONNECTIONS: u64 = 20_000;

#[test]
fn twenty_thousand_connections_are_held_used_and_released() {
    let server = Server::start("scale", "[dataplane]\nworkers = 2\n");
    let json = server.dir.join("bench.json");
    // Every connection is opened first, then each makes one 1000-byte
    // request: all of them are still usable with 20 000 open.
    let out = Command::new(CLIENT)
        .args(["bench", "--connect", &server.addr(), "--ca"])
        .arg(server.ca())
        .args([
            "--connections",
            &CONNECTIONS.to_string(),
            "--download",
            "1000",
            "--requests",
            "1",
            "--verify",
            "--duration",
            "300",
            "--quiet",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = ok(&out);
    eprintln!("{stdout}");
    let result = read_json(&json);
    assert_eq!(result["handshakes"], CONNECTIONS, "{result}");
    assert_eq!(
        result["connections"], CONNECTIONS,
        "all held at once: {result}"
    );
    // At least one request per connection completed, each checked byte for
    // byte (the bench may start a few more before it sees its plan done).
    let requests = result["requests"].as_u64().unwrap();
    assert!(requests >= CONNECTIONS, "each one served: {result}");
    assert_eq!(result["bytes"].as_u64(), Some(requests * 1000), "{result}");
    assert_eq!(result["errors"], 0, "{result}");
    assert_eq!(result["verify_failures"], 0, "{result}");
    // The client closed them all; the server lets every one go (the stats
    // request's own connection is the one left). Right after 20 000
    // handshakes the admission difficulty is up, and a stats client may
    // miss the bundle deadline: it asks again.
    wait_until(Duration::from_secs(90), Duration::from_millis(500), || {
        let stats = server.try_stats()?;
        match stats["total"]["connections"].as_u64() {
            Some(n) if n <= 1 => Ok(()),
            n => Err(format!("{n:?} connections still open on the server")),
        }
    });
}
