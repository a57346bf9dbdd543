//! The authority's request handlers, driven as the control-plane thread
//! drives them: raw payloads in, JSON or a coded error out.

use super::*;
use crate::authority::api::*;
use crate::authority::ct::{self, SignedTreeHead};
use crate::authority::enrollment::{self, DEFAULT_TTL};
use crate::machine::Command;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rcgen::{CertificateParams, DnType, KeyPair};
use serde_json::{Value, json};

use crate::test_support::TempDir;

fn fast_config() -> ServiceConfig {
    ServiceConfig {
        server_names: vec!["node1.internet2.test".into(), "::1".into()],
        ca_algorithm: KeyAlgorithm::Ed25519,
        log_algorithm: LogKeyAlgorithm::Ed25519,
        ..ServiceConfig::default()
    }
}

/// A service with its operator, in a fresh directory.
struct Fixture {
    dir: TempDir,
    service: AuthorityService,
    operator: Caller,
    now: SystemTime,
}

impl Fixture {
    fn new(tag: &str) -> Self {
        Self::with_config(tag, fast_config())
    }

    fn with_config(tag: &str, config: ServiceConfig) -> Self {
        let dir = TempDir::new(tag);
        let now = SystemTime::now();
        let mut service = AuthorityService::open(&dir.0, config, now).unwrap();
        let path = dir.0.join("operator.pem");
        service.ensure_operator_identity(&path, now).unwrap();
        let operator = Caller {
            cert_der: Some(first_cert(&std::fs::read_to_string(&path).unwrap())),
        };
        Self {
            dir,
            service,
            operator,
            now,
        }
    }

    fn call<T: DeserializeOwned>(
        &mut self,
        caller: &Caller,
        kind: u8,
        request: Value,
    ) -> Result<T, ServiceError> {
        self.call_raw(caller, kind, &serde_json::to_vec(&request).unwrap())
    }

    fn call_raw<T: DeserializeOwned>(
        &mut self,
        caller: &Caller,
        kind: u8,
        payload: &[u8],
    ) -> Result<T, ServiceError> {
        let bytes = self.service.handle(caller, kind, payload, self.now)?;
        Ok(serde_json::from_slice(&bytes).expect("the response is the documented JSON"))
    }

    /// The same service opened again on its directory with `config`, as
    /// after a restart.
    fn reopen(self, config: ServiceConfig) -> Self {
        let Self {
            dir,
            service,
            operator,
            now,
        } = self;
        drop(service);
        let service = AuthorityService::open(&dir.0, config, now).unwrap();
        Self {
            dir,
            service,
            operator,
            now,
        }
    }

    /// `caller` has `csr_pem` issued for `usage`, with the default lifetime.
    fn issue(&mut self, caller: &Caller, csr_pem: &str, usage: CertUsage) -> Issued {
        self.call(
            caller,
            CERT_ISSUE,
            json!({ "csr_pem": csr_pem, "usage": usage }),
        )
        .unwrap()
    }

    fn token(&self) -> String {
        enrollment::mint(&self.dir.0, DEFAULT_TTL, self.now).unwrap()
    }

    /// Enroll a new client for `names`; returns its answer and its caller.
    fn enroll(&mut self, names: &[&str]) -> (Issued, Caller, KeyPair) {
        let (key, csr_pem) = csr(names);
        let token = self.token();
        let issued: Issued = self
            .call(
                &Caller::default(),
                ENROLL,
                json!({ "token": token, "csr_pem": csr_pem }),
            )
            .unwrap();
        let caller = caller_of(&issued);
        (issued, caller, key)
    }

    fn log_key(&mut self) -> LogPublicKey {
        let key: CtKey = self
            .call(&self.operator.clone(), CT_KEY, json!({}))
            .unwrap();
        LogPublicKey::from_ct_key(&key).unwrap()
    }

    fn root_der(&self) -> Vec<u8> {
        self.service.trust().root_der
    }

    /// What a failed request must leave as it was.
    fn state(&self) -> (u64, Vec<CertificateRecord>, u64) {
        let authority = self.service.authority();
        (
            authority.log().size(),
            authority
                .certificates(&CertificateFilter::All, None)
                .unwrap(),
            authority.revocations().generation(),
        )
    }

    /// `kind` with `payload` from `caller` fails with `code` and changes nothing.
    fn refused(&mut self, what: &str, caller: &Caller, kind: u8, payload: &[u8], code: u16) {
        let before = self.state();
        let err = self
            .call_raw::<Value>(caller, kind, payload)
            .expect_err(what);
        assert_eq!(err.code, code, "{what}: {err}");
        assert!(!err.message.is_empty(), "{what}");
        assert_eq!(self.state(), before, "{what} changed the authority");
        assert!(self.service.take_rotated().is_none(), "{what}");
    }
}

fn first_cert(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

fn caller_of(issued: &Issued) -> Caller {
    Caller {
        cert_der: Some(first_cert(&issued.certificate_pem)),
    }
}

/// A CSR for `names` (the first is also the CN), with a new Ed25519 key.
fn csr(names: &[&str]) -> (KeyPair, String) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let csr_pem = csr_with(&key, names);
    (key, csr_pem)
}

fn csr_with(key: &KeyPair, names: &[&str]) -> String {
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.serialize_request(key).unwrap().pem().unwrap()
}

fn pem(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

fn json_bytes(v: Value) -> Vec<u8> {
    serde_json::to_vec(&v).unwrap()
}

#[test]
fn every_kind_answers_its_happy_path() {
    let mut f = Fixture::new("happy");
    let operator = f.operator.clone();
    let root: CaRoot = f.call(&operator, CA_ROOT, json!({})).unwrap();
    assert_eq!(root.root_pem, f.service.root_pem());
    assert!(root.intermediate_pem.contains("BEGIN CERTIFICATE"));
    let key = f.log_key();
    let root_der = f.root_der();

    // ENROLL, on a connection without a certificate.
    let (issued, client, client_key) = f.enroll(&["edge-1.example", "2001:db8::7"]);
    verify_issued(&issued, &key, &root_der).unwrap();
    let facts = cert_facts(&client.cert_der.clone().unwrap()).unwrap();
    assert_eq!(facts.subject, "edge-1.example");
    assert_eq!(facts.dns_names, ["edge-1.example"]);
    assert_eq!(
        facts.ip_addresses,
        ["2001:db8::7".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(facts.spki, client_key.public_key_der());
    assert_eq!(
        issued.not_after - issued.not_before,
        24 * 3600 + crate::authority::ca::CLOCK_SLACK.as_secs()
    );

    // The CT kinds, by the client.
    let sth: Sth = f.call(&client, CT_STH, json!({})).unwrap();
    let sth_checked = check_sth(&sth, &key).unwrap();
    assert_eq!(sth.tree_size, f.service.authority().log().size());
    let proof: Proof = f
        .call(
            &client,
            CT_PROOF,
            json!({ "certificate_pem": issued.certificate_pem }),
        )
        .unwrap();
    assert_eq!(proof.leaf_index, issued.leaf_index);
    assert_eq!(proof.leaf_hash, issued.proof.leaf_hash);
    let hash = b64_hash("leaf_hash", &proof.leaf_hash).unwrap();
    verify_proof(&proof, &hash, &sth_checked).unwrap();
    let by_hash: Proof = f
        .call(
            &client,
            CT_PROOF,
            json!({ "leaf_hash": proof.leaf_hash, "tree_size": issued.sth.tree_size }),
        )
        .unwrap();
    assert_eq!(by_hash, issued.proof, "the proof at issuance, again");
    let consistency: Consistency = f
        .call(
            &client,
            CT_CONSISTENCY,
            json!({ "old_size": issued.sth.tree_size, "new_size": sth.tree_size }),
        )
        .unwrap();
    assert_eq!(consistency.new_sth, sth);
    verify_consistency(&issued.sth, &consistency.new_sth, &consistency.proof, &key).unwrap();
    let entries: Entries = f
        .call(
            &client,
            CT_ENTRIES,
            json!({ "start": 0, "end": sth.tree_size }),
        )
        .unwrap();
    assert_eq!(entries.entries.len() as u64, sth.tree_size);
    let mine = &entries.entries[issued.leaf_index as usize];
    assert_eq!(mine.certificate_pem, issued.certificate_pem);
    let leaf = STANDARD.decode(&mine.leaf_input).unwrap();
    assert_eq!(
        STANDARD.encode(ct::leaf_hash(&leaf)),
        issued.proof.leaf_hash
    );

    // CERT_LIST with every filter.
    let list: CertList = f.call(&client, CERT_LIST, json!({})).unwrap();
    assert_eq!(list.certificates.len() as u64, sth.tree_size);
    assert_eq!(list.next, None);
    let named: CertList = f
        .call(&client, CERT_LIST, json!({ "filter": "name:2001:db8::7" }))
        .unwrap();
    assert_eq!(named.certificates.len(), 1);
    assert_eq!(named.certificates[0].serial, issued.serial);
    assert_eq!(named.certificates[0].usage, CertUsage::Client);

    // CERT_ISSUE for a name the client carries, with its own lifetime
    // (and its own key, so that it owns the new certificate too).
    let csr_pem = csr_with(&client_key, &["edge-1.example"]);
    let server: Issued = f
        .call(
            &client,
            CERT_ISSUE,
            json!({ "csr_pem": csr_pem, "usage": "server", "lifetime_hours": 2 }),
        )
        .unwrap();
    verify_issued(&server, &key, &root_der).unwrap();
    assert_eq!(
        server.not_after - server.not_before,
        2 * 3600 + crate::authority::ca::CLOCK_SLACK.as_secs()
    );

    // CERT_RENEW by the owner: same key, new serial.
    let renewed: Issued = f
        .call(
            &client,
            CERT_RENEW,
            json!({ "certificate_pem": issued.certificate_pem }),
        )
        .unwrap();
    verify_issued(&renewed, &key, &root_der).unwrap();
    assert_ne!(renewed.serial, issued.serial);
    assert_eq!(
        cert_facts(&first_cert(&renewed.certificate_pem))
            .unwrap()
            .spki,
        facts.spki
    );

    // CERT_REVOKE by the owner; the trust material moves on.
    let generation = f.service.trust().generation;
    let revoked: Revoked = f
        .call(
            &client,
            CERT_REVOKE,
            json!({ "serial": server.serial, "reason": "superseded" }),
        )
        .unwrap();
    assert_eq!(revoked.serial, server.serial);
    assert_eq!(revoked.revoked_at, unix_s(f.now));
    let trust = f.service.trust();
    assert_eq!(trust.generation, generation + 1);
    assert!(
        trust
            .revoked
            .is_revoked(&parse_serial("s", &server.serial).unwrap().0)
    );
    let revoked_list: CertList = f
        .call(&client, CERT_LIST, json!({ "filter": "revoked" }))
        .unwrap();
    assert_eq!(revoked_list.certificates.len(), 1);
    assert_eq!(
        revoked_list.certificates[0].revocation_reason.as_deref(),
        Some("superseded")
    );
    let valid: CertList = f
        .call(&client, CERT_LIST, json!({ "filter": "valid" }))
        .unwrap();
    assert!(valid.certificates.iter().all(|c| c.serial != server.serial));
    assert_eq!(valid.certificates.len(), list.certificates.len() + 1);

    // ROTATE by the operator: the new certificate is handed over once.
    let rotated: Rotated = f.call(&operator, ROTATE, json!({})).unwrap();
    let published = f.service.take_rotated().expect("the rotated certificate");
    assert!(f.service.take_rotated().is_none());
    assert_eq!(published.serial.to_string(), rotated.serial);
    assert_eq!(published.chain_der.len(), 2);
    let server_facts = cert_facts(&published.chain_der[0]).unwrap();
    assert_eq!(server_facts.dns_names, ["node1.internet2.test"]);
    assert_eq!(
        server_facts.ip_addresses,
        ["::1".parse::<IpAddr>().unwrap()]
    );
    f.service
        .authority()
        .verify_chain(&published.chain_der[0], Usage::Server, f.now)
        .unwrap();
    let key_pair = rcgen::KeyPair::try_from(published.key_pkcs8_der.as_slice()).unwrap();
    assert_eq!(key_pair.public_key_der(), server_facts.spki);
}

#[test]
fn bad_input_gets_its_code_and_changes_nothing() {
    let mut f = Fixture::new("bad");
    let operator = f.operator.clone();
    let (issued, client, _) = f.enroll(&["edge-2.example"]);
    let (_, good_csr) = csr(&["edge-2.example"]);
    let anyone = Caller::default();

    // Requests that are not the JSON of their kind.
    for (what, payload) in [
        ("truncated JSON", b"{\"token\":".to_vec()),
        ("not an object", b"[1,2]".to_vec()),
        ("binary", vec![0xff, 0x00, 0x13]),
        ("missing field", json_bytes(json!({ "token": f.token() }))),
        (
            "unknown field",
            json_bytes(json!({ "token": f.token(), "csr_pem": good_csr, "admin": true })),
        ),
    ] {
        f.refused(what, &anyone, ENROLL, &payload, MALFORMED_REQUEST);
    }
    let oversized = vec![b' '; MAX_REQUEST_LEN + 1];
    f.refused(
        "oversized",
        &operator,
        CT_STH,
        &oversized,
        MALFORMED_REQUEST,
    );
    f.refused(
        "arguments to CT_STH",
        &operator,
        CT_STH,
        b"{\"x\":1}",
        MALFORMED_REQUEST,
    );
    f.refused("unknown kind", &operator, 0x2f, b"{}", UNKNOWN_KIND);

    // CSRs.
    let csr_der = CertificateSigningRequestDer::from_pem_slice(good_csr.as_bytes())
        .unwrap()
        .to_vec();
    let mut bad_signature = csr_der.clone();
    *bad_signature.last_mut().unwrap() ^= 1;
    let truncated = &csr_der[..csr_der.len() - 10];
    for (what, csr_pem) in [
        ("not PEM", "hello".to_owned()),
        (
            "garbage DER",
            pem("CERTIFICATE REQUEST", b"\x30\x03\x02\x01\x01"),
        ),
        ("truncated CSR", pem("CERTIFICATE REQUEST", truncated)),
        (
            "bad CSR signature",
            pem("CERTIFICATE REQUEST", &bad_signature),
        ),
        ("a certificate, not a CSR", issued.certificate_pem.clone()),
    ] {
        let payload = json_bytes(json!({ "csr_pem": csr_pem, "usage": "client" }));
        f.refused(what, &operator, CERT_ISSUE, &payload, BAD_CSR);
        let payload = json_bytes(json!({ "token": f.token(), "csr_pem": csr_pem }));
        f.refused(what, &anyone, ENROLL, &payload, BAD_CSR);
    }
    let (_, bad_name) = csr(&["bad_name!.example"]);
    let payload = json_bytes(json!({ "csr_pem": bad_name, "usage": "server" }));
    f.refused("invalid DNS name", &operator, CERT_ISSUE, &payload, BAD_CSR);
    let payload =
        json_bytes(json!({ "csr_pem": good_csr, "usage": "client", "lifetime_hours": 0 }));
    f.refused(
        "zero lifetime",
        &operator,
        CERT_ISSUE,
        &payload,
        MALFORMED_REQUEST,
    );
    let payload =
        json_bytes(json!({ "csr_pem": good_csr, "usage": "client", "lifetime_hours": 100000 }));
    f.refused(
        "long lifetime",
        &operator,
        CERT_ISSUE,
        &payload,
        MALFORMED_REQUEST,
    );
    let payload = json_bytes(json!({ "csr_pem": good_csr, "usage": "admin" }));
    f.refused(
        "unknown usage",
        &operator,
        CERT_ISSUE,
        &payload,
        MALFORMED_REQUEST,
    );

    // Tokens: reused, expired, forged.
    let token = f.token();
    let (_, csr_pem) = csr(&["edge-3.example"]);
    let enroll = json_bytes(json!({ "token": token, "csr_pem": csr_pem }));
    let first: Issued = f.call_raw(&anyone, ENROLL, &enroll).unwrap();
    // The same token and key again (a client that lost the answer): the
    // same certificate, proven in the latest tree head; nothing is issued.
    f.enroll(&["edge-5.example"]);
    let before = f.state();
    let again: Issued = f.call_raw(&anyone, ENROLL, &enroll).unwrap();
    assert_eq!(f.state(), before, "a retry issues nothing");
    assert_eq!(again.serial, first.serial);
    assert_eq!(
        first_cert(&again.certificate_pem),
        first_cert(&first.certificate_pem)
    );
    assert!(again.sth.tree_size > first.sth.tree_size, "the latest head");
    let (log_key, root_der) = (f.log_key(), f.root_der());
    verify_issued(&again, &log_key, &root_der).unwrap();
    let (_, other_csr) = csr(&["edge-4.example"]);
    let payload = json_bytes(json!({ "token": token, "csr_pem": other_csr }));
    f.refused(
        "a used token, other CSR",
        &anyone,
        ENROLL,
        &payload,
        TOKEN_USED,
    );
    let expired = enrollment::mint(
        &f.dir.0,
        Duration::from_secs(60),
        f.now - Duration::from_secs(61),
    )
    .unwrap();
    let payload = json_bytes(json!({ "token": expired, "csr_pem": other_csr }));
    f.refused("an expired token", &anyone, ENROLL, &payload, TOKEN_INVALID);
    let mut raw = URL_SAFE_NO_PAD.decode(f.token()).unwrap();
    *raw.last_mut().unwrap() ^= 0x10;
    let payload =
        json_bytes(json!({ "token": URL_SAFE_NO_PAD.encode(&raw), "csr_pem": other_csr }));
    f.refused(
        "a flipped MAC bit",
        &anyone,
        ENROLL,
        &payload,
        TOKEN_INVALID,
    );
    let payload = json_bytes(json!({ "token": "abc", "csr_pem": other_csr }));
    f.refused("a short token", &anyone, ENROLL, &payload, TOKEN_INVALID);

    // Serials.
    let payload = json_bytes(json!({ "serial": "00".repeat(16) }));
    f.refused(
        "unknown serial",
        &operator,
        CERT_REVOKE,
        &payload,
        UNKNOWN_SERIAL,
    );
    for serial in ["xyz", "0102", &"zz".repeat(16), &"ä".repeat(16)] {
        let payload = json_bytes(json!({ "serial": serial }));
        f.refused(serial, &operator, CERT_REVOKE, &payload, MALFORMED_REQUEST);
    }
    let payload = json_bytes(json!({ "serial": issued.serial, "reason": "bored" }));
    f.refused(
        "unknown reason",
        &operator,
        CERT_REVOKE,
        &payload,
        MALFORMED_REQUEST,
    );
    let payload = json_bytes(json!({ "filter": "some" }));
    f.refused(
        "unknown filter",
        &operator,
        CERT_LIST,
        &payload,
        MALFORMED_REQUEST,
    );
    let payload = json_bytes(json!({ "after": "12" }));
    f.refused(
        "bad after",
        &operator,
        CERT_LIST,
        &payload,
        MALFORMED_REQUEST,
    );

    // Certificates of another CA.
    let mut other = Fixture::new("bad-other");
    let (foreign, _, _) = other.enroll(&["edge-2.example"]);
    let payload = json_bytes(json!({ "certificate_pem": foreign.certificate_pem }));
    f.refused(
        "renew, other CA",
        &operator,
        CERT_RENEW,
        &payload,
        NOT_OUR_CA,
    );
    f.refused("proof, other CA", &operator, CT_PROOF, &payload, NOT_OUR_CA);
    let payload = json_bytes(json!({ "serial": foreign.serial }));
    f.refused(
        "revoke, other CA",
        &operator,
        CERT_REVOKE,
        &payload,
        UNKNOWN_SERIAL,
    );
    let payload = json_bytes(json!({ "certificate_pem": "not pem" }));
    f.refused(
        "renew, not PEM",
        &operator,
        CERT_RENEW,
        &payload,
        MALFORMED_REQUEST,
    );

    // Expired and revoked certificates are not renewed.
    let (_, short_csr) = csr(&["short.example"]);
    let short: Issued = f
        .call(
            &operator,
            CERT_ISSUE,
            json!({ "csr_pem": short_csr, "usage": "client", "lifetime_hours": 1 }),
        )
        .unwrap();
    let now = f.now;
    f.now = now + Duration::from_secs(2 * 3600);
    let payload = json_bytes(json!({ "certificate_pem": short.certificate_pem }));
    f.refused("renew, expired", &operator, CERT_RENEW, &payload, EXPIRED);
    f.now = now + Duration::from_secs(1);
    f.call::<Revoked>(&operator, CERT_REVOKE, json!({ "serial": short.serial }))
        .unwrap();
    f.refused("renew, revoked", &operator, CERT_RENEW, &payload, REVOKED);
    let payload = json_bytes(json!({ "serial": short.serial }));
    f.refused(
        "revoke twice",
        &operator,
        CERT_REVOKE,
        &payload,
        ALREADY_REVOKED,
    );

    // CT sizes and hashes.
    let size = f.service.authority().log().size();
    for (old, new) in [(0, size), (size, size + 1), (3, 2), (1, u64::MAX)] {
        let payload = json_bytes(json!({ "old_size": old, "new_size": new }));
        f.refused(
            "consistency sizes",
            &client,
            CT_CONSISTENCY,
            &payload,
            OUT_OF_RANGE,
        );
    }
    for (start, end) in [(0, 0), (2, 1), (0, size + 1), (size, size + 1)] {
        let payload = json_bytes(json!({ "start": start, "end": end }));
        f.refused("entries range", &client, CT_ENTRIES, &payload, OUT_OF_RANGE);
    }
    let payload = json_bytes(json!({ "start": -1, "end": 2 }));
    f.refused(
        "negative start",
        &client,
        CT_ENTRIES,
        &payload,
        MALFORMED_REQUEST,
    );
    let hash = issued.proof.leaf_hash.clone();
    for (what, payload) in [
        (
            "truncated b64",
            json!({ "leaf_hash": &hash[..hash.len() - 4] }),
        ),
        (
            "b64 of 31 bytes",
            json!({ "leaf_hash": STANDARD.encode([0u8; 31]) }),
        ),
        ("not b64", json!({ "leaf_hash": "%%%%" })),
        ("neither", json!({})),
        (
            "both",
            json!({ "leaf_hash": hash, "certificate_pem": issued.certificate_pem }),
        ),
    ] {
        f.refused(
            what,
            &client,
            CT_PROOF,
            &json_bytes(payload),
            MALFORMED_REQUEST,
        );
    }
    let payload = json_bytes(json!({ "leaf_hash": STANDARD.encode([7u8; 32]) }));
    f.refused("unknown leaf", &client, CT_PROOF, &payload, NOT_FOUND);
    let payload = json_bytes(json!({ "leaf_hash": hash, "tree_size": issued.leaf_index }));
    f.refused("leaf past the tree", &client, CT_PROOF, &payload, NOT_FOUND);
    let payload = json_bytes(json!({ "leaf_hash": hash, "tree_size": size + 1 }));
    f.refused(
        "tree past the log",
        &client,
        CT_PROOF,
        &payload,
        OUT_OF_RANGE,
    );
}

#[test]
fn callers_may_do_only_what_the_rules_allow() {
    let mut f = Fixture::new("authz");
    let operator = f.operator.clone();
    let (_, alice, alice_key) = f.enroll(&["alice.example"]);
    let (b, bob, _) = f.enroll(&["bob.example"]);
    let anyone = Caller::default();

    // Without a certificate, only ENROLL and the log key (which an
    // enrolling client checks its certificate's log proof with).
    // (The zone kinds are unknown without a zone: see tests/zone_kinds.rs.)
    for kind in KINDS
        .into_iter()
        .filter(|k| !ANONYMOUS_KINDS.contains(k) && !DNS_KINDS.contains(k))
    {
        f.refused("no certificate", &anyone, kind, b"{}", UNAUTHORIZED);
    }
    let key: CtKey = f.call(&anyone, CT_KEY, json!({})).unwrap();
    let operators: CtKey = f.call(&operator, CT_KEY, json!({})).unwrap();
    assert_eq!(key, operators, "everyone is told the same log key");
    // A certificate of another CA is no identity.
    let other = Fixture::new("authz-other");
    let stranger = other.operator.clone();
    f.refused("foreign operator", &stranger, CT_STH, b"", UNAUTHORIZED);
    f.refused("foreign operator", &stranger, ROTATE, b"", UNAUTHORIZED);
    // A server certificate is not a client identity.
    let server = f.service.issue_server_certificate(f.now).unwrap();
    let server_caller = Caller {
        cert_der: Some(server.chain_der[0].clone()),
    };
    f.refused(
        "server certificate",
        &server_caller,
        CT_STH,
        b"",
        UNAUTHORIZED,
    );

    // Only the operator rotates.
    f.refused("rotate by a client", &alice, ROTATE, b"", UNAUTHORIZED);

    // Issue only for one's own names; the operator for any.
    let (_, bobs) = csr(&["bob.example"]);
    let payload = json_bytes(json!({ "csr_pem": bobs, "usage": "server" }));
    f.refused(
        "issue for another's name",
        &alice,
        CERT_ISSUE,
        &payload,
        UNAUTHORIZED,
    );
    let (_, mixed) = csr(&["alice.example", "bob.example"]);
    let payload = json_bytes(json!({ "csr_pem": mixed, "usage": "server" }));
    f.refused(
        "issue for one more name",
        &alice,
        CERT_ISSUE,
        &payload,
        UNAUTHORIZED,
    );
    let (_, op) = csr(&["operator"]);
    let payload = json_bytes(json!({ "csr_pem": op, "usage": "client" }));
    f.refused(
        "issue an operator",
        &alice,
        CERT_ISSUE,
        &payload,
        UNAUTHORIZED,
    );
    let (_, any) = csr(&["made-by-op.example", "bob.example"]);
    f.issue(&operator, &any, CertUsage::Server);

    // Renew and revoke: the owner or the operator.
    let payload = json_bytes(json!({ "certificate_pem": b.certificate_pem }));
    f.refused(
        "renew another's",
        &alice,
        CERT_RENEW,
        &payload,
        UNAUTHORIZED,
    );
    let payload = json_bytes(json!({ "serial": b.serial }));
    f.refused(
        "revoke another's",
        &alice,
        CERT_REVOKE,
        &payload,
        UNAUTHORIZED,
    );
    f.call::<Issued>(
        &operator,
        CERT_RENEW,
        json!({ "certificate_pem": b.certificate_pem }),
    )
    .unwrap();
    // Another certificate of alice's key is alice's too.
    let own = csr_with(&alice_key, &["alice.example"]);
    let second = f.issue(&alice, &own, CertUsage::Client);
    f.call::<Revoked>(&alice, CERT_REVOKE, json!({ "serial": second.serial }))
        .unwrap();

    // Enrollment: the reserved name, and names held by another key.
    let (_, op) = csr(&["op.example", "operator"]);
    let payload = json_bytes(json!({ "token": f.token(), "csr_pem": op }));
    f.refused(
        "enroll as operator",
        &anyone,
        ENROLL,
        &payload,
        UNAUTHORIZED,
    );
    let (_, taken) = csr(&["alice.example"]);
    let payload = json_bytes(json!({ "token": f.token(), "csr_pem": taken }));
    f.refused("enroll a taken name", &anyone, ENROLL, &payload, NAME_TAKEN);
    let (_, taken) = csr(&["carol.example", "alice.example"]);
    let payload = json_bytes(json!({ "token": f.token(), "csr_pem": taken }));
    f.refused("enroll a taken SAN", &anyone, ENROLL, &payload, NAME_TAKEN);
    // The same key may enroll again for its names.
    let again = csr_with(&alice_key, &["alice.example"]);
    let token = f.token();
    f.call::<Issued>(&anyone, ENROLL, json!({ "token": token, "csr_pem": again }))
        .unwrap();

    // A revoked client is no longer anyone; its name is free again.
    f.call::<Revoked>(&operator, CERT_REVOKE, json!({ "serial": b.serial }))
        .unwrap();
    f.refused("revoked caller", &bob, CT_STH, b"", UNAUTHORIZED);
    let renewed_bobs: CertList = f
        .call(
            &operator,
            CERT_LIST,
            json!({ "filter": "name:bob.example" }),
        )
        .unwrap();
    for c in renewed_bobs
        .certificates
        .iter()
        .filter(|c| c.revoked_at.is_none())
    {
        f.call::<Revoked>(&operator, CERT_REVOKE, json!({ "serial": c.serial }))
            .unwrap();
    }
    // (The operator's "made-by-op" certificate also carries bob.example.)
    let (_, bobs) = csr(&["bob.example"]);
    let token = f.token();
    f.call::<Issued>(&anyone, ENROLL, json!({ "token": token, "csr_pem": bobs }))
        .unwrap();
}

#[test]
fn verify_issued_accepts_real_answers_and_rejects_tampering() {
    let mut f = Fixture::new("verify");
    let key = f.log_key();
    let root_der = f.root_der();
    let (issued, _, _) = f.enroll(&["v.example"]);
    let (other, _, _) = f.enroll(&["w.example"]);
    verify_issued(&issued, &key, &root_der).unwrap();

    let mut t = issued.clone();
    t.certificate_pem = other.certificate_pem.clone();
    t.serial = other.serial.clone();
    assert_eq!(
        verify_issued(&t, &key, &root_der),
        Err(VerifyError::LeafHashMismatch)
    );
    let mut t = issued.clone();
    t.proof.timestamp += 1;
    assert_eq!(
        verify_issued(&t, &key, &root_der),
        Err(VerifyError::LeafHashMismatch)
    );
    let mut t = issued.clone();
    t.serial = other.serial.clone();
    assert!(matches!(
        verify_issued(&t, &key, &root_der),
        Err(VerifyError::Chain(_))
    ));

    // Another log's key.
    let mut g = Fixture::new("verify-other");
    let other_key = g.log_key();
    assert_eq!(
        verify_issued(&issued, &other_key, &root_der),
        Err(VerifyError::WrongLog)
    );
    let mut t = issued.clone();
    t.sth.log_id = STANDARD.encode(other_key.log_id());
    assert!(matches!(
        verify_issued(&t, &other_key, &root_der),
        Err(VerifyError::Sth(ct::VerifyError::BadSignature))
    ));
    // Another CA's root.
    assert!(matches!(
        verify_issued(&issued, &key, &g.root_der()),
        Err(VerifyError::Chain(_))
    ));

    // A wrong root hash: in the tree head (signature fails), in the proof
    // (mismatch), or in both with a path that cannot lead there.
    let mut wrong = b64_hash("r", &issued.sth.root_hash).unwrap();
    wrong[0] ^= 1;
    let mut t = issued.clone();
    t.sth.root_hash = STANDARD.encode(wrong);
    assert!(matches!(
        verify_issued(&t, &key, &root_der),
        Err(VerifyError::Sth(ct::VerifyError::BadSignature))
    ));
    let mut t = issued.clone();
    t.proof.root_hash = STANDARD.encode(wrong);
    assert!(matches!(
        verify_issued(&t, &key, &root_der),
        Err(VerifyError::ProofMismatch(_))
    ));
    // A proof for the other certificate's entry.
    let mut t = other.clone();
    t.proof.audit_path = issued.proof.audit_path.clone();
    assert_ne!(t.proof.audit_path, other.proof.audit_path);
    assert!(matches!(
        verify_issued(&t, &key, &root_der),
        Err(VerifyError::Proof(_))
    ));
    let mut t = issued.clone();
    t.proof.audit_path.push(STANDARD.encode([0u8; 32]));
    assert!(matches!(
        verify_issued(&t, &key, &root_der),
        Err(VerifyError::Proof(_))
    ));
    let mut t = issued.clone();
    t.proof.audit_path[0] = "AAAA".into();
    assert!(matches!(
        verify_issued(&t, &key, &root_der),
        Err(VerifyError::Encoding(_))
    ));
}

#[test]
fn proofs_for_a_log_of_hundreds_of_leaves_verify_client_side() {
    const N: u64 = 300;
    let mut f = Fixture::new("many");
    let operator = f.operator.clone();
    let key = f.log_key();
    let root_der = f.root_der();
    let start = f.service.authority().log().size();
    let mut heads: Vec<Sth> = Vec::new();
    let mut issued_all = Vec::new();
    for i in 0..N {
        let (_, csr_pem) = csr(&[&format!("n{i}.example")]);
        f.now += Duration::from_millis(1);
        let issued = f.issue(&operator, &csr_pem, CertUsage::Client);
        verify_issued(&issued, &key, &root_der).unwrap();
        assert_eq!(issued.leaf_index, start + i);
        heads.push(issued.sth.clone());
        issued_all.push(issued);
    }
    let latest: Sth = f.call(&operator, CT_STH, json!({})).unwrap();
    let latest_checked = check_sth(&latest, &key).unwrap();
    let size = latest.tree_size;
    assert_eq!(size, start + N);

    // Every entry's proof in the latest tree, and in a middle one.
    let middle: &Sth = &heads[(N / 2) as usize];
    let middle_checked: SignedTreeHead = check_sth(middle, &key).unwrap();
    for issued in &issued_all {
        let hash = b64_hash("h", &issued.proof.leaf_hash).unwrap();
        let proof: Proof = f
            .call(
                &operator,
                CT_PROOF,
                json!({ "leaf_hash": issued.proof.leaf_hash }),
            )
            .unwrap();
        verify_proof(&proof, &hash, &latest_checked).unwrap();
        if issued.leaf_index < middle.tree_size {
            let proof: Proof = f
                .call(
                    &operator,
                    CT_PROOF,
                    json!({ "leaf_hash": issued.proof.leaf_hash, "tree_size": middle.tree_size }),
                )
                .unwrap();
            verify_proof(&proof, &hash, &middle_checked).unwrap();
        }
    }

    // Consistency from every tree head to the latest, and between pairs.
    for old in &heads {
        let c: Consistency = f
            .call(
                &operator,
                CT_CONSISTENCY,
                json!({ "old_size": old.tree_size, "new_size": size }),
            )
            .unwrap();
        verify_consistency(old, &c.new_sth, &c.proof, &key).unwrap();
    }
    for (i, old) in heads.iter().enumerate().step_by(7) {
        let new = &heads[(i * 3 + 5).min(heads.len() - 1)];
        if new.tree_size < old.tree_size {
            continue;
        }
        let c: Consistency = f
            .call(
                &operator,
                CT_CONSISTENCY,
                json!({ "old_size": old.tree_size, "new_size": new.tree_size }),
            )
            .unwrap();
        assert_eq!(&c.new_sth, new);
        verify_consistency(old, new, &c.proof, &key).unwrap();
        // A proof for other sizes does not verify.
        if old.tree_size != new.tree_size && new != &latest {
            assert!(verify_consistency(old, &latest, &c.proof, &key).is_err());
        }
    }

    // Entries in pages of at most 256; every leaf input hashes to its proof's hash.
    let payload = json_bytes(json!({ "start": 0, "end": 257 }));
    f.refused("257 entries", &operator, CT_ENTRIES, &payload, OUT_OF_RANGE);
    let mut all = Vec::new();
    let mut at = 0;
    while at < size {
        let end = (at + MAX_ENTRIES_PER_REQUEST).min(size);
        let page: Entries = f
            .call(&operator, CT_ENTRIES, json!({ "start": at, "end": end }))
            .unwrap();
        assert_eq!(page.entries.len() as u64, end - at);
        all.extend(page.entries);
        at = end;
    }
    for issued in &issued_all {
        let entry = &all[issued.leaf_index as usize];
        assert_eq!(entry.leaf_index, issued.leaf_index);
        assert_eq!(entry.certificate_pem, issued.certificate_pem);
        let leaf = STANDARD.decode(&entry.leaf_input).unwrap();
        assert_eq!(
            STANDARD.encode(ct::leaf_hash(&leaf)),
            issued.proof.leaf_hash
        );
    }
}

#[test]
fn issued_certificates_pass_openssl_verify() {
    // The default algorithms (ECDSA P-256 CA and log), as in production.
    let mut f = Fixture::with_config(
        "openssl",
        ServiceConfig {
            server_names: vec!["node1.internet2.test".into()],
            ..ServiceConfig::default()
        },
    );
    let (issued, _, _) = f.enroll(&["client.example"]);
    let key = f.log_key();
    assert_eq!(key.algorithm, LogKeyAlgorithm::EcdsaP256Sha256);
    verify_issued(&issued, &key, &f.root_der()).unwrap();
    let server = f.service.issue_server_certificate(f.now).unwrap();
    let dir = &f.dir.0;
    let root = dir.join("check-root.pem");
    let intermediate = dir.join("check-intermediate.pem");
    std::fs::write(&root, f.service.root_pem()).unwrap();
    std::fs::write(&intermediate, &issued.chain_pem).unwrap();
    let leaves = [
        ("client", issued.certificate_pem.clone()),
        ("server", pem("CERTIFICATE", &server.chain_der[0])),
        (
            "operator",
            std::fs::read_to_string(dir.join("operator.pem")).unwrap(),
        ),
    ];
    for (name, leaf_pem) in leaves {
        let leaf = dir.join(format!("check-{name}.pem"));
        std::fs::write(&leaf, leaf_pem).unwrap();
        let out = std::process::Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(&root)
            .arg("-untrusted")
            .arg(&intermediate)
            .arg(&leaf)
            .output()
            .expect("openssl is installed");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(": OK"),
            "{name}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_operator_identity_is_kept_until_half_its_lifetime() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fixture::new("operator");
    let mut service = f.service;
    let path = f.dir.0.join("operator.pem");
    let first = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(first.matches("BEGIN CERTIFICATE").count(), 2);
    assert!(first.contains("BEGIN PRIVATE KEY"));
    let size = service.authority().log().size();
    service
        .ensure_operator_identity(&path, f.now + Duration::from_secs(11 * 3600))
        .unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), first);
    assert_eq!(service.authority().log().size(), size);
    let later = f.now + Duration::from_secs(13 * 3600);
    service.ensure_operator_identity(&path, later).unwrap();
    let second = std::fs::read_to_string(&path).unwrap();
    assert_ne!(second, first);
    assert_eq!(service.authority().log().size(), size + 1);
    // The new identity is the operator.
    let operator = Caller {
        cert_der: Some(first_cert(&second)),
    };
    service
        .handle(&operator, ROTATE, b"", later)
        .expect("the operator rotates");
    // A revoked identity is replaced at once.
    let serial = ca::serial_of(&first_cert(&second)).unwrap();
    service
        .machine_mut()
        .revoke(serial, None, later, None)
        .unwrap();
    service.ensure_operator_identity(&path, later).unwrap();
    assert_ne!(std::fs::read_to_string(&path).unwrap(), second);
}

#[test]
fn a_spent_token_stays_spent_after_a_restart() {
    let mut f = Fixture::new("restart");
    let anyone = Caller::default();
    let token = f.token();
    let (_, csr_pem) = csr(&["r.example"]);
    let payload = json_bytes(json!({ "token": token, "csr_pem": csr_pem }));
    let first: Issued = f.call_raw(&anyone, ENROLL, &payload).unwrap();
    let mut f = f.reopen(fast_config());
    let (_, other_csr) = csr(&["r.example"]);
    let other = json_bytes(json!({ "token": token, "csr_pem": other_csr }));
    f.refused(
        "a token spent before the restart",
        &anyone,
        ENROLL,
        &other,
        TOKEN_USED,
    );
    // What it paid for is remembered too: the same key gets it again.
    let again: Issued = f.call_raw(&anyone, ENROLL, &payload).unwrap();
    assert_eq!(again.serial, first.serial);
    // Unless it was revoked since.
    let operator = f.operator.clone();
    f.call::<Value>(&operator, CERT_REVOKE, json!({ "serial": first.serial }))
        .unwrap();
    f.refused(
        "a revoked enrollment",
        &anyone,
        ENROLL,
        &payload,
        TOKEN_USED,
    );
    // A token minted while the service holds the database works.
    let fresh = f.token();
    let (_, csr_pem) = csr(&["s.example"]);
    let payload = json_bytes(json!({ "token": fresh, "csr_pem": csr_pem }));
    f.call_raw::<Issued>(&anyone, ENROLL, &payload).unwrap();
}

mod name_ownership;
mod replay;
mod zone_kinds;

/// What a cluster does with a request: the command is proposed first and
/// applied later (after other commands, perhaps), then answered.
#[test]
fn a_proposal_changes_nothing_until_applied_and_a_stale_one_is_refused() {
    let mut f = Fixture::new("pending");
    let operator = f.operator.clone();
    let now = f.now;
    // Reads are answered at once.
    assert!(matches!(
        f.service.handle_request(&operator, CT_STH, b"{}", now),
        Handled::Answer(Ok(_))
    ));
    let (_, csr_pem) = csr(&["pending.internet2.test"]);
    let payload = json_bytes(json!({ "csr_pem": csr_pem, "usage": "server" }));
    let Handled::Commit(pending) = f
        .service
        .handle_request(&operator, CERT_ISSUE, &payload, now)
    else {
        panic!("an issuance waits for its command");
    };
    let before = f.state();
    assert!(matches!(pending.command, Command::Certify(_)));
    assert_eq!(f.state(), before, "a proposal changes nothing");
    let Pending { command, finish } = *pending;
    let applied = f.service.machine_mut().apply(command);
    let issued: Issued = serde_json::from_slice(&finish(&mut f.service, applied).unwrap()).unwrap();
    let key = f.log_key();
    verify_issued(&issued, &key, &f.root_der()).unwrap();

    // Two revocations of it, both proposed before either applies: the
    // first revokes, the second is answered ALREADY_REVOKED.
    let revoke = json_bytes(json!({ "serial": issued.serial }));
    let mut proposals = Vec::new();
    for _ in 0..2 {
        match f
            .service
            .handle_request(&operator, CERT_REVOKE, &revoke, now)
        {
            Handled::Commit(pending) => proposals.push(pending),
            Handled::Answer(answer) => panic!("a revocation waits: {answer:?}"),
        }
    }
    let mut answers = Vec::new();
    for pending in proposals {
        let Pending { command, finish } = *pending;
        let applied = f.service.machine_mut().apply(command);
        answers.push(finish(&mut f.service, applied));
    }
    assert!(answers[0].is_ok(), "{:?}", answers[0]);
    assert_eq!(answers[1].as_ref().unwrap_err().code, ALREADY_REVOKED);
}

/// A renewal proposed before a revocation of what it renews, applied after
/// it, must not escape the revocation (a cluster applies in log order).
#[test]
fn a_renewal_overtaken_by_its_predecessors_revocation_is_refused() {
    let mut f = Fixture::new("overtaken-renewal");
    let operator = f.operator.clone();
    let now = f.now;
    let (_, csr_pem) = csr(&["renewed.internet2.test"]);
    let issued = f.issue(&operator, &csr_pem, CertUsage::Server);
    let propose = |f: &mut Fixture, kind, payload: Vec<u8>| match f
        .service
        .handle_request(&operator, kind, &payload, now)
    {
        Handled::Commit(pending) => *pending,
        Handled::Answer(answer) => panic!("proposed, not answered: {answer:?}"),
    };
    let renewal = propose(
        &mut f,
        CERT_RENEW,
        json_bytes(json!({ "certificate_pem": issued.certificate_pem })),
    );
    let revocation = propose(
        &mut f,
        CERT_REVOKE,
        json_bytes(json!({ "serial": issued.serial })),
    );
    let before = f.state().0;
    for Pending { command, finish } in [revocation, renewal] {
        let applied = f.service.machine_mut().apply(command);
        let answer = finish(&mut f.service, applied);
        if let Err(e) = answer {
            assert_eq!(e.code, REVOKED, "{e:?}");
        }
    }
    assert_eq!(f.state().0, before, "the renewal was not logged");
}
