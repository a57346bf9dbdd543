//! Mutual TLS with the embedded CA, end to end on [::1]: who may connect
//! with what, revocation of open connections, rotation under load.

mod common;

use common::*;
use controlplane::authority::api;
use dataplane::client::rpc::Reply;

use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

fn ping_with(server: &Server, identity: &[&str]) -> std::process::Output {
    let mut args = vec!["ping", "--timeout-ms", "3000"];
    args.extend_from_slice(identity);
    server.client(&args)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn stoq_needs_a_certificate_of_this_ca() {
    let server = Server::start("mtls", "");
    // The operator identity beside ca.pem is found by default.
    ok(&ping_with(&server, &[]));

    // No certificate: the connection may only enroll.
    let anonymous = ping_with(&server, &["--anonymous"]);
    assert!(!anonymous.status.success());
    assert!(
        stderr(&anonymous).contains("error 5"),
        "{}",
        stderr(&anonymous)
    );

    // A certificate from another CA: the handshake fails.
    let foreign_key = rcgen::KeyPair::generate().unwrap();
    let foreign = rcgen::CertificateParams::new(vec!["intruder".to_string()])
        .unwrap()
        .self_signed(&foreign_key)
        .unwrap();
    let foreign_path = server.dir.join("foreign.pem");
    std::fs::write(
        &foreign_path,
        format!("{}{}", foreign.pem(), foreign_key.serialize_pem()),
    )
    .unwrap();
    let refused = ping_with(&server, &["--identity", foreign_path.to_str().unwrap()]);
    assert!(!refused.status.success(), "a foreign certificate connects");

    // Signed by this CA's intermediate but expired: refused too.
    let intermediate_key = rcgen::KeyPair::from_pem(
        &std::fs::read_to_string(server.dir.join("ca/intermediate.key")).unwrap(),
    )
    .unwrap();
    let intermediate = rcgen::CertificateParams::from_ca_cert_pem(
        &std::fs::read_to_string(server.dir.join("ca/intermediate.pem")).unwrap(),
    )
    .unwrap()
    .self_signed(&intermediate_key)
    .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["expired".to_string()]).unwrap();
    let day = time::Duration::days(1);
    params.not_before = time::OffsetDateTime::now_utc() - day * 3;
    params.not_after = time::OffsetDateTime::now_utc() - day;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let expired = params
        .signed_by(&key, &intermediate, &intermediate_key)
        .unwrap();
    let expired_path = server.dir.join("expired.pem");
    std::fs::write(
        &expired_path,
        format!(
            "{}{}{}",
            expired.pem(),
            std::fs::read_to_string(server.dir.join("ca/intermediate.pem")).unwrap(),
            key.serialize_pem()
        ),
    )
    .unwrap();
    let refused = ping_with(&server, &["--identity", expired_path.to_str().unwrap()]);
    assert!(!refused.status.success(), "an expired certificate connects");

    // A certificate the CA issued works, and the operator was not disturbed.
    let (issued, _) = issue_identity(&server, "client-a");
    ok(&ping_with(
        &server,
        &["--identity", issued.to_str().unwrap()],
    ));
    let stats = server.stats();
    assert!(
        stats["total"]["failed_handshakes"].as_u64().unwrap() >= 2,
        "{stats}"
    );
}

#[test]
fn perf_without_a_certificate_only_where_configured() {
    let strict = Server::start("perf-strict", "");
    let out = strict.client(&["bench", "--anonymous", "--duration", "1"]);
    assert!(
        stderr(&out).contains("needs a client certificate on this server (code 257)"),
        "perf without a certificate is served: {}",
        stderr(&out)
    );
    assert_eq!(strict.stats()["total"]["refused_certificate"], 1);
    // With the operator's certificate it runs.
    let served = strict.client(&["bench", "--duration", "1"]);
    assert!(
        stderr(&served).contains("errors 0")
            || String::from_utf8_lossy(&served.stdout).contains("errors 0"),
        "{served:?}"
    );

    let open = Server::start(
        "perf-open",
        "[trustchain_authority]\nperf_without_client_certificate = true\n",
    );
    let served = open.client(&["bench", "--anonymous", "--duration", "1"]);
    assert!(
        String::from_utf8_lossy(&served.stdout).contains("errors 0"),
        "{served:?}"
    );
}

#[test]
fn revocation_closes_open_connections_and_refuses_the_next_handshake() {
    let server = Server::start("revoke", "[dataplane]\nworkers = 2\n");
    let (identity, serial) = issue_identity(&server, "client-r");
    let json = server.dir.join("held.json");
    // Four connections held open (and moving data) with that identity.
    // Small requests: a client flooded with bulk data can drop the close
    // from its full socket buffer and then meet a stateless reset instead
    // of the revocation code this test checks for.
    let held = Command::new(CLIENT)
        .args(["bench", "--connect", &server.addr(), "--ca"])
        .arg(server.ca())
        .arg("--identity")
        .arg(&identity)
        .args([
            "--connections",
            "4",
            "--duration",
            "6",
            "--download",
            "1024",
        ])
        .args(["--quiet", "--json"])
        .arg(&json)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let revoke = serde_json::to_vec(&api::CertRevokeRequest {
        serial: serial.clone(),
        reason: Some("key_compromise".into()),
    })
    .unwrap();
    let before = server.stats()["total"]["closed"].as_u64().unwrap();
    let started = SystemTime::now();
    operator_rpc(&server, api::CERT_REVOKE, &revoke);
    // The server closes the four held connections by itself.
    loop {
        let closed = server.stats()["total"]["closed"].as_u64().unwrap();
        if closed >= before + 4 {
            break;
        }
        assert!(
            started.elapsed().unwrap() < Duration::from_secs(5),
            "the held connections outlived the revocation ({closed} closed)"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = held.wait_with_output().unwrap();
    let why = stderr(&out);
    assert!(why.contains("code 258") || why.contains("revoked"), "{why}");
    let result = read_json(&json);
    assert!(result["errors"].as_u64().unwrap() >= 1, "{result}");

    // The next handshake with it fails; the operator still works.
    let refused = ping_with(&server, &["--identity", identity.to_str().unwrap()]);
    assert!(!refused.status.success(), "a revoked certificate connects");
    ok(&ping_with(&server, &[]));
}

#[test]
fn rotation_under_continuous_handshakes_fails_none() {
    // Rotate every 1.08 s, and twice more on request, during 6 s of
    // back-to-back mutual-TLS handshakes.
    let server = Server::start(
        "rotate",
        "[trustchain_authority]\ncertificate_rotation_hours = 0.0003\n",
    );
    let json = server.dir.join("handshakes.json");
    let bench = Command::new(CLIENT)
        .args(["bench", "--connect", &server.addr(), "--ca"])
        .arg(server.ca())
        .args(["--handshake-only", "--duration", "6", "--quiet", "--json"])
        .arg(&json)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(1500));
        ok(&server.admin(&["rotate"]));
    }
    let out = bench.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let result = read_json(&json);
    assert_eq!(result["errors"], 0, "{result}");
    assert!(result["handshakes"].as_u64().unwrap() > 50, "{result}");
    let rotations = server
        .log()
        .iter()
        .filter(|l| l.contains("server certificate rotated"))
        .count();
    assert!(rotations >= 4, "only {rotations} rotations happened");
    // Every certificate a client saw chained to the root: a failed
    // handshake would show here and in the client's errors.
    assert_eq!(server.stats()["total"]["failed_handshakes"], 0);
}

/// The log's key, fetched once (and checked against its own id).
fn log_key(server: &Server) -> api::LogPublicKey {
    let key: api::CtKey =
        serde_json::from_slice(&operator_rpc(server, api::CT_KEY, b"{}")).unwrap();
    api::LogPublicKey::from_ct_key(&key).unwrap()
}

#[test]
fn kill_9_loses_no_acknowledged_certificate_and_the_log_never_forks() {
    let mut server = Server::start("crash", "");
    let root = controlplane::authority::pem::load_cert(&server.ca()).unwrap();
    let key = log_key(&server);
    let request = {
        let k = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::new(vec!["burst".to_string()])
            .unwrap()
            .serialize_request(&k)
            .unwrap()
            .pem()
            .unwrap();
        serde_json::to_vec(&api::CertIssueRequest {
            csr_pem: csr,
            usage: api::CertUsage::Client,
            lifetime_hours: Some(1),
        })
        .unwrap()
    };
    let mut acknowledged: Vec<api::Issued> = Vec::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..3 {
        // A burst of issuances on one connection per request, killed at a
        // pseudo-random moment in the middle of it.
        let target = operator_target(&server);
        let config = target
            .client_config(dataplane::protocols::ALPN_STOQ)
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let payload = request.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let burst = std::thread::spawn(move || {
            // Until the kill (a request in flight then may or may not be
            // acknowledged; only acknowledged ones are checked).
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                let outcome = dataplane::client::rpc_raw(
                    &target,
                    &config,
                    api::CERT_ISSUE,
                    &payload,
                    Duration::from_secs(2),
                );
                let Ok(outcome) = outcome else { return };
                match &outcome.replies[0] {
                    Reply::Ok(body) => {
                        if tx
                            .send(serde_json::from_slice::<api::Issued>(body).unwrap())
                            .is_err()
                        {
                            return;
                        }
                    }
                    _ => return,
                }
            }
        });
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(300 + seed % 500));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        server.kill9_and_restart();
        burst.join().unwrap();
        let before = acknowledged.len();
        acknowledged.extend(rx.try_iter());
        assert!(
            acknowledged.len() > before,
            "round {round}: nothing was issued"
        );
    }

    // Every certificate a client was told about is in the log, proven
    // against a tree head signed after the last restart, and every tree
    // head handed out before is consistent with it: the log never forked.
    let latest: api::Sth =
        serde_json::from_slice(&operator_rpc(&server, api::CT_STH, b"{}")).unwrap();
    api::check_sth(&latest, &key).unwrap();
    for issued in &acknowledged {
        let proof_request = serde_json::to_vec(&api::CtProofRequest {
            leaf_hash: None,
            certificate_pem: Some(issued.certificate_pem.clone()),
            tree_size: Some(latest.tree_size),
        })
        .unwrap();
        let proof: api::Proof =
            serde_json::from_slice(&operator_rpc(&server, api::CT_PROOF, &proof_request)).unwrap();
        let now = api::Issued {
            sth: latest.clone(),
            proof,
            ..issued.clone()
        };
        api::verify_issued(&now, &key, root.as_ref())
            .unwrap_or_else(|e| panic!("certificate {} lost after kill -9: {e:?}", issued.serial));
        let consistency_request = serde_json::to_vec(&api::CtConsistencyRequest {
            old_size: issued.sth.tree_size,
            new_size: latest.tree_size,
        })
        .unwrap();
        let consistency: api::Consistency = serde_json::from_slice(&operator_rpc(
            &server,
            api::CT_CONSISTENCY,
            &consistency_request,
        ))
        .unwrap();
        api::verify_consistency(&issued.sth, &consistency.new_sth, &consistency.proof, &key)
            .unwrap_or_else(|e| panic!("tree head {} forked: {e:?}", issued.sth.tree_size));
    }
    eprintln!(
        "{} acknowledged certificates survived 3 kill -9s; log size {}",
        acknowledged.len(),
        latest.tree_size
    );
}
