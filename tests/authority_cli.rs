//! End to end: the real `internet2` client's authority commands against the
//! real server on `[::1]`, with `openssl` as the independent check of the
//! chains it writes.

mod common;

use common::{CLIENT, Server, enrollment_token, ok};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The command failed; its stderr.
fn failed(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "command should have failed\nstdout: {}\nstderr: {stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(&ok(out)).expect("the output is JSON")
}

fn keys(value: &serde_json::Value) -> Vec<String> {
    let mut keys: Vec<String> = value
        .as_object()
        .expect("a JSON object")
        .keys()
        .cloned()
        .collect();
    keys.sort();
    keys
}

/// Enroll `name` with a fresh token into `<dir>/<name>.pem`.
fn enroll(server: &Server, name: &str) -> PathBuf {
    let path = server.dir.join(format!("{name}.pem"));
    let token = enrollment_token(server);
    let out = server.client(&[
        "enroll",
        &token,
        "--name",
        name,
        "--out",
        path.to_str().unwrap(),
    ]);
    let stdout = ok(&out);
    assert!(stdout.contains(name), "enroll output: {stdout}");
    path
}

/// The certificates of a PEM file, each as its own PEM block.
fn pem_certs(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    text.split_inclusive("-----END CERTIFICATE-----\n")
        .filter_map(|block| {
            block
                .find("-----BEGIN CERTIFICATE-----")
                .map(|at| block[at..].to_owned())
        })
        .collect()
}

fn list(server: &Server, filter: &str) -> Vec<serde_json::Value> {
    let out = server.client(&["cert", "list", "--filter", filter, "--json"]);
    json(&out)["certificates"].as_array().unwrap().clone()
}

/// `openssl verify` of the first certificate in `leaf` against the
/// server's root, with the intermediate `ca root --intermediate` prints.
fn openssl_verify(server: &Server, leaf: &Path) {
    let root_out = ok(&server.client(&["ca", "root", "--check", "--intermediate"]));
    let intermediate = server.dir.join("intermediate-check.pem");
    let leaf_only = server.dir.join("leaf-check.pem");
    let certs: Vec<&str> = root_out
        .split_inclusive("-----END CERTIFICATE-----\n")
        .collect();
    assert_eq!(
        certs.len(),
        2,
        "ca root --intermediate prints two certificates"
    );
    std::fs::write(&intermediate, certs[1]).unwrap();
    std::fs::write(&leaf_only, &pem_certs(leaf)[0]).unwrap();
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(server.ca())
        .arg("-untrusted")
        .arg(&intermediate)
        .arg(&leaf_only)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn enroll_use_verify_and_revoke() {
    let server = Server::start("auth-enroll", "");
    // (node1.internet2.test is the server's own name: taken.)
    let identity = server.dir.join("laptop1.pem");
    let token = enrollment_token(&server);
    let enroll_args = [
        "enroll",
        &token,
        "--name",
        "laptop1",
        "--name",
        "laptop1.internet2.test",
        "--out",
        identity.to_str().unwrap(),
    ];
    let stdout = ok(&server.client(&enroll_args));
    assert!(stdout.contains("serial"), "{stdout}");
    assert!(stdout.contains("log index"), "{stdout}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&identity).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the identity file is private");
    let written = std::fs::read(&identity).unwrap();
    assert_eq!(
        pem_certs(&identity).len(),
        2,
        "certificate and intermediate"
    );

    // The same token again: refused, nothing changes (no new certificate,
    // the identity file untouched even with --force).
    let before = list(&server, "all").len();
    let again = server.dir.join("laptop1-again.pem");
    let reuse = server.client(&[
        "enroll",
        &token,
        "--name",
        "laptop1",
        "--out",
        again.to_str().unwrap(),
    ]);
    let stderr = failed(&reuse);
    assert!(stderr.contains("enrollment token already used"), "{stderr}");
    assert!(!again.exists());
    assert_eq!(list(&server, "all").len(), before);
    // An existing identity is not overwritten without --force.
    let stderr = failed(&server.client(&enroll_args));
    assert!(stderr.contains("--force"), "{stderr}");
    assert_eq!(std::fs::read(&identity).unwrap(), written);

    let identity_arg = identity.to_str().unwrap();
    ok(&server.client(&["ping", "--identity", identity_arg]));

    let mine: Vec<_> = list(&server, "name:laptop1")
        .into_iter()
        .filter(|c| c["subject"] == "laptop1")
        .collect();
    assert_eq!(mine.len(), 1, "cert list shows the enrolled certificate");
    let serial = mine[0]["serial"].as_str().unwrap().to_owned();
    assert_eq!(mine[0]["usage"], "client");
    assert!(
        mine[0]["dns_names"]
            .as_array()
            .unwrap()
            .contains(&"laptop1.internet2.test".into())
    );
    let valid = list(&server, "valid");
    assert!(valid.iter().any(|c| c["serial"] == serial.as_str()));

    let verified = ok(&server.client(&["cert", "verify", identity_arg]));
    assert!(verified.contains("inclusion proof verified"), "{verified}");
    assert!(verified.contains("not revoked"), "{verified}");
    openssl_verify(&server, &identity);

    // The operator (operator.pem beside --ca) revokes it.
    let revoked = ok(&server.client(&["cert", "revoke", &serial, "--reason", "key_compromise"]));
    assert!(revoked.contains(&serial), "{revoked}");
    let stderr = failed(&server.client(&["ping", "--identity", identity_arg]));
    assert!(!stderr.is_empty());
    let stderr = failed(&server.client(&["cert", "verify", identity_arg]));
    assert!(stderr.contains("the certificate is revoked"), "{stderr}");
    let stderr = failed(&server.client(&["cert", "revoke", &serial]));
    assert!(stderr.contains("already revoked"), "{stderr}");
    assert!(
        list(&server, "revoked")
            .iter()
            .any(|c| c["serial"] == serial.as_str() && c["revocation_reason"] == "key_compromise")
    );
}

#[test]
fn ct_commands_verify_and_print_the_documented_json() {
    let server = Server::start("auth-ct", "");
    let identity = enroll(&server, "ctnode");
    enroll(&server, "ctnode2");

    let sth = json(&server.client(&["ct", "sth", "--json"]));
    assert_eq!(
        keys(&sth),
        ["log_id", "root_hash", "signature", "timestamp", "tree_size"]
    );
    let size = sth["tree_size"].as_u64().unwrap();
    assert!(size >= 2, "two enrollments are logged: {sth}");
    assert!(ok(&server.client(&["ct", "sth"])).contains("signature   verified"));

    let proof = json(&server.client(&[
        "ct",
        "proof",
        "--cert",
        identity.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(
        keys(&proof),
        [
            "audit_path",
            "leaf_hash",
            "leaf_index",
            "root_hash",
            "timestamp",
            "tree_size"
        ]
    );
    assert_eq!(proof["tree_size"], size);
    let leaf_hash = proof["leaf_hash"].as_str().unwrap();
    let by_hash = json(&server.client(&["ct", "proof", "--leaf-hash", leaf_hash, "--json"]));
    assert_eq!(by_hash["leaf_index"], proof["leaf_index"]);
    let human = ok(&server.client(&["ct", "proof", "--leaf-hash", leaf_hash]));
    assert!(human.contains("inclusion verified"), "{human}");
    let zero_hash = format!("{}=", "A".repeat(43));
    let unknown = server.client(&["ct", "proof", "--leaf-hash", &zero_hash]);
    assert!(failed(&unknown).contains("not in the log"));

    let new = size.to_string();
    let consistency = json(&server.client(&["ct", "consistency", "1", &new, "--json"]));
    assert_eq!(
        keys(&consistency),
        ["new_size", "new_sth", "old_size", "proof"]
    );
    assert_eq!(consistency["new_sth"]["tree_size"], size);
    assert!(ok(&server.client(&["ct", "consistency", "1", &new])).contains("prefix"));
    let stderr = failed(&server.client(&["ct", "consistency", "1", &(size + 1).to_string()]));
    assert!(stderr.contains("outside the log"), "{stderr}");

    let entries = json(&server.client(&["ct", "entries", "0", "2", "--json"]));
    assert_eq!(keys(&entries), ["entries"]);
    let entries = entries["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    for (entry, index) in entries.iter().zip(0u64..) {
        assert_eq!(keys(entry), ["certificate_pem", "leaf_index", "leaf_input"]);
        assert_eq!(entry["leaf_index"], index);
    }
    assert!(ok(&server.client(&["ct", "entries", "0", "2"])).contains("2 entries"));

    let key = json(&server.client(&["ct", "key", "--json"]));
    assert_eq!(keys(&key), ["algorithm", "log_id", "public_key"]);
    assert_eq!(key["log_id"], sth["log_id"]);
    assert!(ok(&server.client(&["ct", "key"])).contains(key["algorithm"].as_str().unwrap()));
}

#[test]
fn operator_issues_renews_and_lists() {
    let server = Server::start("auth-issue", "");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["svc.internet2.test".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "svc.internet2.test");
    let csr = server.dir.join("svc.csr");
    std::fs::write(&csr, params.serialize_request(&key).unwrap().pem().unwrap()).unwrap();
    let issued = server.dir.join("svc.pem");
    let stdout = ok(&server.client(&[
        "cert",
        "issue",
        "--csr",
        csr.to_str().unwrap(),
        "--usage",
        "server",
        "--lifetime-hours",
        "48",
        "--out",
        issued.to_str().unwrap(),
    ]));
    assert!(stdout.contains("svc.internet2.test"), "{stdout}");
    openssl_verify(&server, &issued);
    let renewed = server.dir.join("svc-renewed.pem");
    ok(&server.client(&[
        "cert",
        "renew",
        "--cert",
        issued.to_str().unwrap(),
        "--out",
        renewed.to_str().unwrap(),
    ]));
    ok(&server.client(&["cert", "verify", renewed.to_str().unwrap()]));
    let svc = list(&server, "name:svc.internet2.test");
    assert_eq!(svc.len(), 2, "the issued and the renewed certificate");
    assert!(svc.iter().all(|c| c["usage"] == "server"));
    assert!(svc.iter().any(|c| !c["renewed_from"].is_null()));
    // Without --out the chain goes to stdout.
    let stdout = ok(&server.client(&["cert", "renew", "--cert", issued.to_str().unwrap()]));
    assert_eq!(stdout.matches("-----BEGIN CERTIFICATE-----").count(), 2);
}

#[test]
fn foreign_and_malformed_input_is_refused() {
    let server = Server::start("auth-bad", "");
    // A certificate of another CA.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let foreign = rcgen::CertificateParams::new(vec!["node1".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let foreign_path = server.dir.join("foreign.pem");
    std::fs::write(&foreign_path, foreign.pem()).unwrap();
    let stderr = failed(&server.client(&["cert", "verify", foreign_path.to_str().unwrap()]));
    assert!(stderr.contains("not a certificate of this CA"), "{stderr}");
    let stderr = failed(&server.client(&["ct", "proof", "--cert", foreign_path.to_str().unwrap()]));
    assert!(stderr.contains("not a certificate of this CA"), "{stderr}");

    // Bad local input fails before any network I/O: against a port where
    // nothing listens, the error is about the input, not the connection.
    let text = server.dir.join("notes.txt");
    std::fs::write(&text, "not a certificate\n").unwrap();
    let csr_path = server.dir.join("request.csr");
    let params = rcgen::CertificateParams::new(vec!["node1".to_owned()]).unwrap();
    std::fs::write(
        &csr_path,
        params.serialize_request(&key).unwrap().pem().unwrap(),
    )
    .unwrap();
    let missing = server.dir.join("missing.pem");
    let cases: [(&[&str], &str); 7] = [
        (
            &["cert", "verify", text.to_str().unwrap()],
            "not a certificate",
        ),
        (
            &["cert", "verify", csr_path.to_str().unwrap()],
            "CERTIFICATE REQUEST",
        ),
        (
            &["cert", "verify", missing.to_str().unwrap()],
            "cannot read",
        ),
        (
            &["cert", "issue", "--csr", foreign_path.to_str().unwrap()],
            "not a CSR",
        ),
        (
            &["cert", "renew", "--cert", text.to_str().unwrap()],
            "not a certificate",
        ),
        (&["cert", "revoke", "1234"], "32 hex digits"),
        (
            &["enroll", "short-token", "--out", missing.to_str().unwrap()],
            "base64url",
        ),
    ];
    let silent = format!("[::1]:{}", common::free_port());
    for (args, expected) in cases {
        let out = Command::new(CLIENT)
            .args(args)
            .args(["--connect", &silent, "--timeout-ms", "5000", "--ca"])
            .arg(server.ca())
            .output()
            .unwrap();
        let stderr = failed(&out);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

fn operator(server: &Server, args: &[&str]) -> Output {
    server
        .operator_command(Command::new(common::SERVER))
        .args(args)
        .output()
        .expect("run internet2-server")
}

#[test]
fn enrollment_on_production_defaults_ends_with_the_stake_grant_command() {
    use std::os::unix::fs::PermissionsExt;
    let server = Server::start_production("auth-production", "");
    let token = ok(&operator(&server, &["enroll-token"])).trim().to_owned();
    let identity = server.dir.join("prod-laptop.pem");
    let path = identity.to_str().unwrap();
    // The first admission builds the 2^18-leaf plot: more time than the
    // default 5 s on a slow machine.
    let timeout = ["--timeout-ms", "60000"];
    let out = server.client(
        &[
            &["enroll", &token, "--name", "prod-laptop", "--out", path][..],
            &timeout,
        ]
        .concat(),
    );
    let stdout = ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mode = std::fs::metadata(&identity).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the identity file is private");
    assert!(
        !server.dir.join("prod-laptop.pem.pending").exists(),
        "the pending key is removed once the identity is saved"
    );
    assert!(
        !format!("{stdout}{stderr}").contains("Identity(["),
        "no identity is shown as a byte array:\n{stdout}{stderr}"
    );

    // The exact command, naming this identity (SHA-256 of its key) in hex.
    let line = stdout
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("internet2-server stake grant "))
        .unwrap_or_else(|| panic!("no stake grant command in:\n{stdout}\n{stderr}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let der = controlplane::authority::pem::load_cert(&identity).unwrap();
    let expected = internet2_server::admission::identity_of_certificate(&der).unwrap();
    assert_eq!(
        words,
        [
            "internet2-server",
            "stake",
            "grant",
            &controlplane::authority::api::hex(&expected.0),
            "--amount",
            "1"
        ],
        "{stdout}"
    );
    assert!(words[3].len() == 64 && words[3].bytes().all(|b| b.is_ascii_hexdigit()));

    // Without stake the identity is refused; the operator's command, as
    // printed, admits it.
    let ping = [&["ping", "--identity", path][..], &timeout].concat();
    assert!(
        !server.client(&ping).status.success(),
        "admitted without stake"
    );
    ok(&operator(&server, &words[1..]));
    ok(&server.client(&ping));
}

/// The private key block of an identity file.
fn key_pem(identity: &Path) -> String {
    let text = std::fs::read_to_string(identity).unwrap();
    let begin = text.find("-----BEGIN PRIVATE KEY-----").expect("a key");
    text[begin..].to_owned()
}

#[test]
fn a_rerun_enrollment_finishes_with_its_pending_key_and_no_other_key() {
    use std::os::unix::fs::PermissionsExt;
    let server = Server::start("auth-retry", "");
    let token = enrollment_token(&server);
    let enroll_into = |path: &Path| {
        server.client(&[
            "enroll",
            &token,
            "--name",
            "retry",
            "--out",
            path.to_str().unwrap(),
        ])
    };
    let first = server.dir.join("first.pem");
    ok(&enroll_into(&first));
    let certificates = list(&server, "all").len();

    // As after a failure once the token was spent: the key of that attempt
    // is pending beside the output. The rerun sends it with the same token
    // and gets the same certificate; nothing new is issued.
    let second = server.dir.join("second.pem");
    let pending = server.dir.join("second.pem.pending");
    std::fs::write(&pending, key_pem(&first)).unwrap();
    let out = enroll_into(&second);
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("earlier attempt"), "{stderr}");
    let load = |p: &Path| controlplane::authority::pem::load_cert(p).unwrap();
    assert_eq!(load(&second), load(&first), "the same certificate");
    assert_eq!(key_pem(&second), key_pem(&first));
    assert!(!pending.exists(), "the pending key is removed");
    assert_eq!(list(&server, "all").len(), certificates);
    ok(&server.client(&["ping", "--identity", second.to_str().unwrap()]));

    // Another key with the spent token: refused; its key stays pending
    // (private) for a rerun, and no identity is written.
    let third = server.dir.join("third.pem");
    let stderr = failed(&enroll_into(&third));
    assert!(stderr.contains("enrollment token already used"), "{stderr}");
    assert!(!third.exists());
    let pending = server.dir.join("third.pem.pending");
    let mode = std::fs::metadata(&pending).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(list(&server, "all").len(), certificates);
}

#[test]
fn several_members_a_request_goes_to_the_first_that_answers() {
    // Production defaults: mandatory admission on every connection tried.
    let server = Server::start_production("auth-members", "");
    // Nothing listens on the first address: the handshake never completes,
    // so the request was never delivered there and goes to the next.
    let down = format!("[::1]:{}", common::free_port());
    let members = format!("{down},{}", server.addr());
    let out = server.client(&[
        "cert",
        "list",
        "--json",
        "--connect",
        &members,
        "--timeout-ms",
        "1500",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let listed = json(&out);
    assert!(
        !listed["certificates"].as_array().unwrap().is_empty(),
        "{listed}"
    );
    assert!(
        stderr.contains(&format!("{down} did not answer")),
        "the switch is said: {stderr}"
    );
    // An answer that is an error is the answer: the next member is not
    // asked (here it is the same server; the refusal comes once).
    let unknown = "01".repeat(16);
    let out = server.client(&[
        "cert",
        "revoke",
        &unknown,
        "--connect",
        &format!("{},{}", server.addr(), server.addr()),
    ]);
    let stderr = failed(&out);
    assert!(
        stderr.contains("no certificate of this authority"),
        "{stderr}"
    );
    assert!(!stderr.contains("did not answer"), "{stderr}");
    // Every member down: the last one's failure, after trying each.
    let other_down = format!("[::1]:{}", common::free_port());
    let out = server.client(&[
        "cert",
        "list",
        "--connect",
        &format!("{down},{other_down}"),
        "--timeout-ms",
        "1000",
    ]);
    let stderr = failed(&out);
    assert!(
        stderr.contains(&format!("{down} did not answer")),
        "{stderr}"
    );
    assert!(stderr.contains(&other_down), "{stderr}");
}
