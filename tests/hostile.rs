//! End to end against hostile clients: the real server on `[::1]` and an
//! independent attacker built on aioquic (`tests/interop/stoq_peer.py`,
//! installed by `.ci/setup-interop.sh`), with the real `internet2` client
//! for what honest users do alongside.
//!
//! Each test states what a user would notice if it broke: a worker that
//! goes silent, a revoked certificate that still gets served, a wildcard
//! or the server's own name in a stranger's hands, an enrollment that
//! cannot finish in production, memory that grows with unfinished DNS
//! streams.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Run `command` to completion within `limit` (killed past it: a failure),
/// handing each stderr line to `on_stderr` as it comes.
fn run_bounded(mut command: Command, limit: Duration, mut on_stderr: impl FnMut(&str)) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the command");
    let mut stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let out_thread = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stdout.read_to_end(&mut text);
        text
    });
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + limit;
    let mut err_text = String::new();
    let status = loop {
        while let Ok(line) = lines.recv_timeout(Duration::from_millis(50)) {
            on_stderr(&line);
            err_text.push_str(&line);
            err_text.push('\n');
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} did not finish within {limit:?}; stderr:\n{err_text}");
        }
    };
    for line in lines.try_iter() {
        err_text.push_str(&line);
        err_text.push('\n');
    }
    Output {
        status,
        stdout: out_thread.join().unwrap(),
        stderr: err_text.into_bytes(),
    }
}

/// The one JSON line `stoq_peer.py` prints (the run must have completed).
fn peer_json(command: Command, limit: Duration) -> serde_json::Value {
    let out = run_bounded(command, limit, |_| {});
    let stdout = ok(&out);
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("stoq_peer prints one JSON line ({e}): {stdout}"))
}

/// `internet2 ping` on a fresh connection, within 15 s.
fn ping(server: &Server) -> Result<(), String> {
    let mut command = Command::new(CLIENT);
    command
        .args(["ping", "--connect", &server.addr(), "--ca"])
        .arg(server.ca());
    let out = run_bounded(command, Duration::from_secs(15), |_| {});
    match out.status.success() {
        true => Ok(()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

fn worker_handshakes(stats: &serde_json::Value) -> Vec<u64> {
    stats["workers"]
        .as_array()
        .expect("stats lists its workers")
        .iter()
        .map(|w| w["handshakes"].as_u64().unwrap_or(0))
        .collect()
}

/// Whether a stream's answer, as `stoq_peer.py` describes it, is the
/// stoq/1 error CERTIFICATE_REQUIRED.
fn certificate_required(answer: &serde_json::Value) -> bool {
    use dataplane::protocols::stoq::{ErrorCode, KIND_ERROR};
    answer["kind"].as_u64() == Some(u64::from(KIND_ERROR))
        && answer["code"].as_u64() == Some(ErrorCode::CertificateRequired as u64)
}

/// A stoq/1 stream that a client without a certificate finishes empty (or
/// inside the header, or short of the announced payload) is answered with an
/// error and leaves its worker serving: afterwards 20 fresh `internet2 ping`
/// connections all succeed and both workers' handshake counters move (a
/// worker that died or hangs would leave the connections routed to it
/// unanswered and its counters frozen).
#[test]
fn empty_stoq_stream_without_certificate_does_not_silence_a_worker() {
    let Some(python) = interop_python() else {
        return skip_or_fail("aioquic is not installed: run `bash .ci/setup-interop.sh`");
    };
    let server = Server::start("hostile-empty", "[dataplane]\nworkers = 2\n");
    ping(&server).expect("the server answers before the attack");
    let before = worker_handshakes(&server.stats());
    assert_eq!(before.len(), 2, "two workers: {before:?}");

    let mut command = interop_peer(&python, "stoq_peer.py", &server);
    command.args(["empty-stream", "--connections", "8"]);
    let result = peer_json(command, Duration::from_secs(120));
    eprintln!("attacker saw: {result}");

    let mut failed = Vec::new();
    for n in 0..20 {
        if let Err(why) = ping(&server) {
            failed.push(format!("ping {n}: {}", why.trim()));
        }
    }
    let log = server.log();
    let mut panics = log
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("panicked"));
    assert!(
        failed.is_empty(),
        "after empty stoq/1 streams without a certificate, {} of 20 pings failed:\n{}\nserver: {}\nattacker saw: {result}",
        failed.len(),
        failed.join("\n"),
        panics
            .next()
            .map(|(i, l)| format!("{l} {}", log.get(i + 1).map_or("", String::as_str)))
            .unwrap_or_else(|| "no panic logged".into())
    );
    let after = worker_handshakes(&server.stats());
    assert!(
        before.iter().zip(&after).all(|(b, a)| a > b),
        "every worker completes new handshakes (before {before:?}, after {after:?})"
    );

    // What the attacker saw: every bad stream answered (MALFORMED) or reset,
    // the control ping refused for want of a certificate, the connection
    // left open.
    assert_eq!(result["handshakes_ok"], 8, "{result}");
    for entry in result["results"].as_array().unwrap() {
        for (variant, stream) in entry["streams"].as_object().unwrap() {
            let answered = stream["kind"] == 0xff || stream.get("reset").is_some();
            assert!(
                answered,
                "stream `{variant}` got neither an error nor a reset: {entry}"
            );
        }
        assert!(
            certificate_required(&entry["control_ping"]),
            "a ping without a certificate is answered CERTIFICATE_REQUIRED: {entry}"
        );
        assert_eq!(entry["stayed_open"], true, "{entry}");
    }
}

/// 1-RTT key updates from an independent client (aioquic): the server
/// builds each new key phase from the last only when a key update uses it
/// (`dataplane::server_tls`). After each of four updates in a row, the
/// client's packets in the new phase are read and answered in it (the
/// client sees the server's answer arrive in the phase it switched to),
/// and the connection stays open.
#[test]
fn repeated_key_updates_from_aioquic_are_followed() {
    let Some(python) = interop_python() else {
        return skip_or_fail("aioquic is not installed: run `bash .ci/setup-interop.sh`");
    };
    // Production defaults: admission on, certificate-less stoq/1 may only
    // enroll.
    let server = Server::start_production("hostile-key-update", "");
    let mut command = interop_peer(&python, "stoq_peer.py", &server);
    command.args(["key-update", "--rounds", "4"]);
    let result = peer_json(command, Duration::from_secs(120));
    assert_eq!(result["handshake"], "ok", "{result}");
    let rounds = result["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 4, "{result}");
    for (n, round) in rounds.iter().enumerate() {
        let phase = (n as u64 + 1) % 2;
        assert_eq!(
            round["send_phase"].as_u64(),
            Some(phase),
            "round {n}: the client updated its keys: {result}"
        );
        assert_eq!(
            round["recv_phase"].as_u64(),
            Some(phase),
            "round {n}: the server answered in the new phase: {result}"
        );
        assert!(
            certificate_required(&round["answer"]),
            "round {n}: the ping was read and answered (CERTIFICATE_REQUIRED): {result}"
        );
    }
    assert_eq!(result["stayed_open"], true, "{result}");
    assert!(
        !server.log().iter().any(|l| l.contains("panicked")),
        "no panic in the server"
    );
}

/// A certificate that expired while its session ticket is still good
/// buys nothing after the server's wall clock stepped past its expiry (an
/// NTP correction: the monotonic clock does not move): the resumed
/// connection, which skips the handshake's certificate check, is closed
/// by the worker's own check on the wall clock as it is now.
#[test]
fn an_expired_certificate_cannot_resume_after_a_clock_step() {
    let Some(python) = interop_python() else {
        return skip_or_fail("aioquic is not installed: run `bash .ci/setup-interop.sh`");
    };
    let Some(clock) = FakedClock::new("hostile-clock") else {
        return skip_or_fail("libfaketime is not installed (Debian: faketime)");
    };
    let faked = clock.wrapper();
    let faked: Vec<&str> = faked.iter().map(String::as_str).collect();
    let server = Server::start_in(
        "hostile-clock-step",
        "::1",
        "[hypermesh_assets]\nconsensus_mode = \"off\"\n",
        &faked,
    );
    // One hour of life (and the CA's five minutes of slack before it).
    let (identity, _) = issue_identity_for(&server, "short-lived", Some(1));
    let ticket = server.dir.join("short-lived.ticket");
    let phase = |name: &str| resume_phase(&python, &server, &identity, &ticket, name);
    let saved = phase("save");
    assert_eq!(
        saved["ping"]["kind"], 0x81,
        "served before the step: {saved}"
    );
    assert_eq!(saved["ticket"], true, "{saved}");

    // The server's wall clock steps two hours on.
    clock.set("+2h");
    std::thread::sleep(Duration::from_secs(2));
    let resumed = phase("resume");
    eprintln!("resumed after the step: {resumed}");
    assert_eq!(resumed["served"], false, "served after expiry: {resumed}");
    assert_eq!(
        resumed["closed"]["application"], true,
        "closed by the server's own check: {resumed}"
    );
}

/// A session ticket issued to a certificate that is then revoked buys
/// nothing: resuming with it (a ping in 0-RTT, another after the
/// handshake) is closed with 0x102 (certificate revoked) before anything
/// is served. Admission is off so that a served ping would be visible.
#[test]
fn revoked_certificate_cannot_resume() {
    let Some(python) = interop_python() else {
        return skip_or_fail("aioquic is not installed: run `bash .ci/setup-interop.sh`");
    };
    let server = Server::start(
        "hostile-resume",
        "[hypermesh_assets]\nconsensus_mode = \"off\"\n",
    );
    let (identity, serial) = issue_identity(&server, "resumer");
    let ticket = server.dir.join("resumer.ticket");
    let phase = |name: &str| resume_phase(&python, &server, &identity, &ticket, name);

    let saved = phase("save");
    assert_eq!(
        saved["ping"]["kind"], 0x81,
        "served before revocation: {saved}"
    );
    assert_eq!(
        saved["ticket"], true,
        "the server issued a session ticket: {saved}"
    );

    ok(&server.client(&["cert", "revoke", &serial]));
    // The revocation is in force for full handshakes.
    let refused = server.client(&["ping", "--identity", identity.to_str().unwrap()]);
    assert!(
        !refused.status.success(),
        "a full handshake with the revoked certificate is refused"
    );

    let resumed = phase("resume");
    assert_eq!(
        resumed["served"], false,
        "nothing served on a revoked resumption: {resumed}"
    );
    assert_eq!(
        (
            resumed["closed"]["error_code"].as_u64(),
            resumed["closed"]["application"].as_bool()
        ),
        (Some(0x102), Some(true)),
        "a resumption with a revoked certificate is closed with 0x102: {resumed}"
    );
}

/// Enrollment hands out client certificates for the enrollee's own names,
/// never a wildcard, the server's own name (in any letter case), or the
/// operator's reserved name (in any letter case); nor can a certificate
/// an enrollee holds buy a server certificate for the wildcard or the
/// server's name. An honest enrollment in the same run succeeds.
#[test]
fn enrollee_cannot_get_a_wildcard_or_the_server_name() {
    let Some(python) = interop_python() else {
        return skip_or_fail("aioquic is not installed: run `bash .ci/setup-interop.sh`");
    };
    let server = Server::start(
        "hostile-names",
        "[trustchain_authority]\ndns_apex = \"internet2.test.\"\ndns_name = \"node1\"\n\
         [hypermesh_assets]\nconsensus_mode = \"off\"\n",
    );
    let names = [
        "*.internet2.test",
        "node1.internet2.test",
        "NODE1.Internet2.Test",
        "OPERATOR",
    ];
    let mut command = interop_peer(&python, "stoq_peer.py", &server);
    command.arg("enroll-wildcard");
    for _ in 0..names.len() + 1 {
        command.args(["--token", &enrollment_token(&server)]);
    }
    for name in names {
        command.args(["--name", name]);
    }
    command
        .args(["--honest-name", "honest-enrollee"])
        .arg("--out-dir")
        .arg(&server.dir);
    let result = peer_json(command, Duration::from_secs(60));
    eprintln!("attacker saw: {result}");

    assert_eq!(
        result["honest_enrolled"], true,
        "an honest enrollment works: {result}"
    );
    let mut granted = Vec::new();
    for name in names {
        let answer = &result["enroll"][name];
        if answer["kind"] != 0xff {
            granted.push(format!("ENROLL {name}: {answer}"));
        }
    }
    for (holder, issues) in result["cert_issue"].as_object().unwrap() {
        for (target, answer) in issues.as_object().unwrap() {
            if answer["kind"] != 0xff {
                granted.push(format!(
                    "CERT_ISSUE server {target} with the certificate for {holder}: {answer}"
                ));
            }
        }
    }
    assert!(
        granted.is_empty(),
        "an enrollee got what it must not:\n{}",
        granted.join("\n")
    );
}

/// On a production server (`--mode production`; no development stake, so
/// a new identity cannot be admitted until the operator grants stake), an
/// enrollment still completes: `internet2 enroll TOKEN` saves the identity,
/// and an independent client gets its certificate and the CT log key it
/// needs to check the certificate's inclusion proof (from the ENROLL
/// answer, from CT_KEY on the certificate-less connection, or from CT_KEY
/// with the new certificate).
#[test]
fn production_enrollment_saves_the_identity() {
    let python = interop_python();
    // Production defaults but plot_k 12, which keeps the plot small.
    let server = Server::start_production("hostile-production", "plot_k = 12\n");
    let identity = server.dir.join("prod-client.pem");
    let token = enrollment_token(&server);
    let mut command = Command::new(CLIENT);
    command
        .args(["enroll", &token, "--name", "prod-client", "--out"])
        .arg(&identity)
        .args(["--connect", &server.addr(), "--ca"])
        .arg(server.ca());
    let out = run_bounded(command, Duration::from_secs(60), |_| {});
    let enrolled = out.status.success() && identity.exists();

    let Some(python) = python else {
        assert!(
            enrolled,
            "internet2 enroll on a production server: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return skip_or_fail("aioquic is not installed: run `bash .ci/setup-interop.sh`");
    };
    let mut command = interop_peer(&python, "stoq_peer.py", &server);
    command
        .args(["enroll-production", "--token", &enrollment_token(&server)])
        .args(["--name", "prod-aioquic", "--out"])
        .arg(server.dir.join("prod-aioquic.pem"));
    let result = peer_json(command, Duration::from_secs(60));
    eprintln!("aioquic saw: {result}");

    assert!(
        enrolled,
        "internet2 enroll on a production server saves the identity: {}\n(aioquic saw: {result})",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(result["enroll"]["kind"], 0x90, "ENROLL answered: {result}");
    assert_eq!(
        result["log_key_obtained"], true,
        "an enrollee can get the CT log key: {result}"
    );
}

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc status")
}

/// Largest resident set growth a flood of 200 `doq` connections without
/// client certificates, each with 4 unfinished streams (an incomplete
/// 64 KiB DNS message, plus 64 KiB at the far end of the stream's
/// flow-control window), may cause: 64 MiB in all.
const DOQ_FLOOD_RSS_GROWTH_MAX_KIB: u64 = 64 * 1024;

/// Unfinished DNS-over-QUIC streams cost bounded memory: 200 connections
/// x 4 streams, each with 64 KiB of an incomplete message and 64 KiB at
/// the far end of its flow-control window, never finished, held for 10 s,
/// grow the server's resident set by less than
/// [`DOQ_FLOOD_RSS_GROWTH_MAX_KIB`] (64 MiB) at its peak, and honest
/// queries (a fresh connection each) are all answered meanwhile.
#[test]
fn doq_flood_of_unfinished_streams_is_bounded() {
    let Some(python) = interop_python() else {
        return skip_or_fail("aioquic is not installed: run `bash .ci/setup-interop.sh`");
    };
    let server = Server::start("hostile-doq", "[dataplane]\nworkers = 2\n");
    let pid = server.pid();
    // Warm up (first handshakes, first queries), then the baseline.
    let mut warm = interop_peer(&python, "stoq_peer.py", &server);
    warm.args([
        "doq-hold",
        "--connections",
        "2",
        "--in-order",
        "0",
        "--far",
        "0",
        "--hold",
        "1",
    ]);
    let warmed = peer_json(warm, Duration::from_secs(60));
    assert!(warmed["honest_ok"].as_u64() > Some(0), "{warmed}");
    let baseline = rss_kib(pid);

    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let sampler = std::thread::spawn(move || {
        let mut peak = 0;
        loop {
            peak = peak.max(rss_kib(pid));
            if stop_rx.recv_timeout(Duration::from_millis(100)).is_ok() {
                return peak;
            }
        }
    });
    let mut held = None;
    let mut command = interop_peer(&python, "stoq_peer.py", &server);
    command.args([
        "--timeout",
        "150",
        "doq-hold",
        "--connections",
        "200",
        "--streams",
        "4",
        "--in-order",
        "65536",
        "--far",
        "65536",
        "--hold",
        "10",
    ]);
    let out = run_bounded(command, Duration::from_secs(180), |line| {
        if line.contains("doq-hold: holding") {
            held = Some(rss_kib(pid));
        }
    });
    let _ = stop_tx.send(());
    let peak = sampler.join().unwrap();
    let after = rss_kib(pid);
    let result: serde_json::Value =
        serde_json::from_str(ok(&out).trim()).expect("stoq_peer prints JSON");
    let growth = peak.saturating_sub(baseline);
    eprintln!(
        "doq flood: VmRSS baseline {baseline} KiB, when held {held:?} KiB, peak {peak} KiB, after {after} KiB; growth {growth} KiB; {result}"
    );
    assert!(
        result["honest_ok"].as_u64() > Some(0) && result["honest_failed"] == 0,
        "honest queries are answered during the flood: {result}"
    );
    assert!(
        growth < DOQ_FLOOD_RSS_GROWTH_MAX_KIB,
        "the flood grew the server's VmRSS by {growth} KiB (baseline {baseline}, peak {peak}), over the bound of {DOQ_FLOOD_RSS_GROWTH_MAX_KIB} KiB; {result}"
    );
}

/// The beacon tick the server's `stats` shows.
fn beacon_tick(server: &Server) -> u64 {
    server.stats()["admission"]["beacon_tick"]
        .as_u64()
        .expect("stats shows the beacon tick")
}

/// One client floods the control plane with list scans (16 at a time on
/// each of 4 connections, for 6 s) while the operator's requests keep
/// completing and the beacon keeps ticking. The flooder's excess is
/// answered BUSY; nobody else is made to wait behind its backlog.
#[test]
fn a_control_plane_flood_starves_neither_other_clients_nor_the_beacon() {
    use dataplane::client::rpc::{Framing, Reply, Request};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let server = Server::start("fairness", "");
    let (path, _) = issue_identity(&server, "flooder.internet2.test");
    let identity = internet2_server::authority::load_identity(&path).unwrap();
    let admitter: Arc<dyn dataplane::admission::Admitter> =
        internet2_server::admission::KeyAdmitter::new(&identity, Some(&path), false).unwrap();
    let flooder = dataplane::client::ClientTarget {
        identity: Some(identity),
        admitter: Some(admitter),
        ..operator_target(&server)
    };
    let scan = Request {
        message: dataplane::protocols::stoq::encode(
            controlplane::authority::api::CERT_LIST,
            br#"{"filter":"all"}"#,
        ),
        idempotent: false,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let (answered, busy) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (flooder, scan, stop) = (flooder.clone(), scan.clone(), stop.clone());
            let (answered, busy) = (answered.clone(), busy.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(outcome) = dataplane::client::rpc_framed(
                        &flooder,
                        dataplane::protocols::ALPN_STOQ,
                        Framing::Stoq,
                        vec![scan.clone(); 16],
                        Duration::from_secs(10),
                    ) else {
                        continue;
                    };
                    for reply in &outcome.replies {
                        match reply {
                            Reply::Ok(_) => answered.fetch_add(1, Ordering::Relaxed),
                            Reply::Error { .. } => busy.fetch_add(1, Ordering::Relaxed),
                            Reply::Failed(_) => 0,
                        };
                    }
                }
            })
        })
        .collect();
    let started = Instant::now();
    let first_tick = beacon_tick(&server);
    let mut served = 0;
    while started.elapsed() < Duration::from_secs(6) {
        // operator_rpc panics unless the request is answered.
        operator_rpc(&server, controlplane::authority::api::CT_STH, b"{}");
        served += 1;
    }
    let last_tick = beacon_tick(&server);
    let elapsed_s = started.elapsed().as_secs();
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        thread.join().unwrap();
    }
    let (answered, busy) = (
        answered.load(Ordering::Relaxed),
        busy.load(Ordering::Relaxed),
    );
    assert!(
        answered > 100,
        "the flooder kept the control plane busy ({answered} scans answered, {busy} refused)"
    );
    assert!(
        served >= 6,
        "the operator's requests completed during the flood: {served}"
    );
    // One tick a second; the slack is for the stats reads themselves.
    assert!(
        last_tick >= first_tick + elapsed_s.saturating_sub(2),
        "the beacon ticked {} times in {elapsed_s} s of flood",
        last_tick - first_tick
    );
}

/// A cluster member (`--bootstrap federated --cluster-init`, production
/// defaults) attacked on the cluster kinds by an independent client
/// (aioquic): garbage Raft messages, a forwarded change, status and remove,
/// and joins that are empty, cut short, not JSON, of bad base64 or with a
/// token never issued. Without a certificate, only the joins are read (and
/// refused); with an ordinary client certificate of the cluster's CA
/// (admission off, so the requests reach the member check), every Raft
/// message and forward is UNAUTHORIZED. Nobody joins, and afterwards the
/// member still leads its cluster of one and commits a certificate.
#[test]
fn cluster_kinds_serve_no_stranger_and_no_bad_join() {
    use controlplane::authority::api;
    use dataplane::protocols::stoq::ErrorCode;
    let Some(python) = interop_python() else {
        return skip_or_fail("aioquic is not installed: run `bash .ci/setup-interop.sh`");
    };
    let member = ["--bootstrap", "federated", "--cluster-init"];
    let attack = |server: &Server, cert: Option<&std::path::Path>| {
        let mut command = interop_peer(&python, "stoq_peer.py", server);
        command.arg("cluster-kinds");
        if let Some(cert) = cert {
            command.arg("--cert").arg(cert);
        }
        let result = peer_json(command, Duration::from_secs(60));
        assert_eq!(result["handshake"], "ok", "{result}");
        assert_eq!(result["stayed_open"], true, "{result}");
        result
    };
    let code = |result: &serde_json::Value, name: &str| -> u64 {
        let answer = &result["answers"][name];
        assert_eq!(answer["ok"], false, "{name} was served: {result}");
        answer["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("{name}: no error answer: {result}"))
    };
    let joins_refused = |result: &serde_json::Value| {
        for name in ["join_empty", "join_not_json", "join_bad_base64"] {
            assert_eq!(
                code(result, name),
                u64::from(api::MALFORMED_REQUEST),
                "{name}: {result}"
            );
        }
        assert_eq!(
            code(result, "join_cut_short"),
            ErrorCode::Malformed as u64,
            "{result}"
        );
        assert_eq!(
            code(result, "join_unknown_token"),
            u64::from(api::TOKEN_INVALID),
            "{result}"
        );
    };
    let leads_alone = |server: &Server| {
        let status = server.client(&["cluster", "status", "--json"]);
        let status: serde_json::Value = serde_json::from_str(&ok(&status)).expect("status JSON");
        assert_eq!(
            status["members"].as_array().map(Vec::len),
            Some(1),
            "{status}"
        );
        assert!(status["leader"].is_string(), "{status}");
        issue_identity(server, "after-the-attack");
        assert!(
            !server.log().iter().any(|l| l.contains("panicked")),
            "no panic in the server"
        );
    };

    let production = Server::start_production_with("hostile-cluster", "plot_k = 12", &member);
    let bare = attack(&production, None);
    for name in [
        "raft_append",
        "raft_vote",
        "raft_snapshot",
        "forward",
        "status",
        "remove",
    ] {
        assert_eq!(
            code(&bare, name),
            ErrorCode::CertificateRequired as u64,
            "{name}: {bare}"
        );
    }
    joins_refused(&bare);
    leads_alone(&production);

    // A node certificate of another CA (the member's name prefix, both
    // usages, a name in the zone): refused at the handshake, nothing served.
    let foreign = foreign_node_identity(&production.dir, "m9");
    let mut command = interop_peer(&python, "stoq_peer.py", &production);
    command.arg("cluster-kinds").arg("--cert").arg(&foreign);
    let result = peer_json(command, Duration::from_secs(60));
    eprintln!("another CA's node: {result}");
    let served = result["answers"]
        .as_object()
        .is_some_and(|answers| answers.values().any(|a| a["ok"] == true));
    assert!(!served, "another CA's node was served: {result}");
    // Closed with the TLS alert unknown_ca (QUIC crypto error 0x100 + 48).
    assert_eq!(result["stayed_open"], false, "{result}");
    assert_eq!(result["closed"]["error_code"], 0x100 + 48, "{result}");
    leads_alone(&production);

    let open = Server::start_production_with(
        "hostile-cluster-open",
        "plot_k = 12\nconsensus_mode = \"off\"",
        &member,
    );
    let (stranger, _) = issue_identity(&open, "stranger");
    let client = attack(&open, Some(&stranger));
    for name in [
        "raft_append",
        "raft_vote",
        "raft_snapshot",
        "forward",
        "remove",
    ] {
        assert_eq!(
            code(&client, name),
            u64::from(api::UNAUTHORIZED),
            "{name}: {client}"
        );
    }
    joins_refused(&client);
    assert_eq!(client["control_ping"]["ok"], true, "{client}");
    leads_alone(&open);
}

/// A node identity (certificate, its CA, key: one PEM file) that looks like
/// a member's but is signed by a CA of its own.
fn foreign_node_identity(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "internet2 intermediate");
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec![format!("{name}.internet2.test")]).unwrap();
    leaf.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("{}{name}", dataplane::trust::NODE_COMMON_NAME_PREFIX),
    );
    leaf.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let leaf = leaf.signed_by(&key, &ca, &ca_key).unwrap();
    let path = dir.join(format!("foreign-{name}.pem"));
    std::fs::write(&path, leaf.pem() + &ca.pem() + &key.serialize_pem()).unwrap();
    path
}

/// aioquic's `resume-after-revoke` phase `name` (`save`: a ticket for
/// `identity` into `ticket`; `resume`: resume with it) against `server`.
fn resume_phase(
    python: &std::path::Path,
    server: &Server,
    identity: &std::path::Path,
    ticket: &std::path::Path,
    name: &str,
) -> serde_json::Value {
    let mut command = interop_peer(python, "stoq_peer.py", server);
    command
        .args(["resume-after-revoke", "--cert"])
        .arg(identity)
        .arg("--ticket-file")
        .arg(ticket)
        .args(["--phase", name]);
    peer_json(command, Duration::from_secs(60))
}

/// Asset requests from an independent client (aioquic) that are cut short,
/// too long, of unknown kinds or access values, out of range or for a
/// forged address each get their typed error, and change nothing; a peer
/// that asks for the same 8 MiB five times and never reads gets at most
/// two answers built for it and `BUSY` for the rest; the connection and
/// the asset stay.
#[test]
fn bad_and_unread_asset_requests_from_aioquic_change_nothing() {
    use dataplane::protocols::stoq::ErrorCode;
    let Some(python) = interop_python() else {
        return skip_or_fail("aioquic is not installed: run `bash .ci/setup-interop.sh`");
    };
    // Admission off: the peer speaks stoq/1 with the operator's certificate
    // and no proofs (aioquic has no admitter).
    let server = Server::start(
        "hostile-assets",
        "[hypermesh_assets]\nconsensus_mode = \"off\"\n",
    );
    let mut command = interop_peer(&python, "stoq_peer.py", &server);
    command
        .args(["asset-kinds", "--cert"])
        .arg(server.dir.join("operator.pem"));
    let result = peer_json(command, Duration::from_secs(60));
    assert_eq!(result["alloc"]["ok"], true, "{result}");
    let code = |name: &str| result["answers"][name]["code"].as_u64();
    let malformed = Some(ErrorCode::Malformed as u64);
    for name in [
        "alloc_cut_short",
        "alloc_unknown_kind",
        "read_too_long",
        "cas_length_past_payload",
        "grant_unknown_access",
        "list_trailing_byte",
        "free_empty",
        "header_only",
        "list_memory_as_a_byte",
        "storage_alloc_bad_name",
        "memory_alloc_named",
        "vm_call_empty",
        "vm_call_cut_address",
        "vm_call_unknown_flags",
        "vm_call_bad_name",
    ] {
        assert_eq!(code(name), malformed, "{name}: {result}");
    }
    assert_eq!(
        code("vm_call_memory_asset"),
        Some(ErrorCode::VmModule as u64),
        "{result}"
    );
    assert_eq!(
        code("read_forged_address"),
        Some(ErrorCode::AssetUnknown as u64),
        "{result}"
    );
    for name in [
        "storage_read_forged",
        "storage_write_forged",
        "vm_call_forged_storage",
    ] {
        assert_eq!(
            code(name),
            Some(ErrorCode::AssetUnknown as u64),
            "{name}: {result}"
        );
    }
    assert_eq!(
        code("storage_alloc_empty"),
        Some(ErrorCode::AssetLimit as u64),
        "{result}"
    );
    assert_eq!(
        code("read_out_of_range"),
        Some(ErrorCode::AssetRange as u64),
        "{result}"
    );
    assert_eq!(
        code("proxy_from_a_client"),
        Some(ErrorCode::CertificateRequired as u64),
        "only members proxy: {result}"
    );
    let busy = result["unread"]["busy"].as_u64().unwrap();
    assert!(busy >= 3, "at most two 8 MiB answers held: {result}");
    assert_eq!(result["control_ping"]["ok"], true, "{result}");
    assert_eq!(result["stayed_open"], true, "{result}");
    let assets = &server.stats()["assets"];
    assert_eq!(assets["assets"], 1, "only the one allocation: {assets}");
    assert_eq!(assets["bytes"], 8 << 20, "{assets}");
    ping(&server).expect("the server still serves others");
}
