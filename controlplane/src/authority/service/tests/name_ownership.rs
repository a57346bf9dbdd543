//! Who may hold which name: wildcards and the server's and operator's
//! names are the operator's, names compare without case, and what a
//! certificate's holder issued goes when that certificate is revoked.

use super::*;

fn zone_config() -> ZoneConfig {
    ZoneConfig {
        apex: "internet2.test.".into(),
        server_name: "node1".into(),
        server_addresses: vec!["2001:db8::1".parse().unwrap()],
        server_port: 443,
    }
}

/// Server names `node1.internet2.test` and `::1`, and the zone with the
/// server's own records.
fn fixture(tag: &str) -> Fixture {
    fixture_with(tag, fast_config().server_names)
}

fn fixture_with(tag: &str, server_names: Vec<String>) -> Fixture {
    let config = ServiceConfig {
        server_names,
        zone: Some(zone_config()),
        ..fast_config()
    };
    let mut f = Fixture::with_config(tag, config);
    let pin = f.service.server_spki_sha256().unwrap();
    f.service
        .register_server(&zone_config(), pin, f.now)
        .unwrap();
    f
}

/// A CSR with subject CN `cn` and the DNS names or IP addresses `sans`
/// (none: the CN is its only name), with a new key.
fn csr_named(cn: &str, sans: &[&str]) -> String {
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let mut params =
        CertificateParams::new(sans.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.serialize_request(&key).unwrap().pem().unwrap()
}

/// `ENROLL` of `csr_pem` with a fresh token is refused with `code`, and
/// changes neither the authority nor the zone.
fn enroll_refused(f: &mut Fixture, what: &str, csr_pem: &str, code: u16) {
    let payload = json_bytes(json!({ "token": f.token(), "csr_pem": csr_pem }));
    refused(f, what, &Caller::default(), ENROLL, &payload, code);
}

fn issue_payload(csr_pem: &str, usage: &str) -> Vec<u8> {
    json_bytes(json!({ "csr_pem": csr_pem, "usage": usage }))
}

/// [`Fixture::refused`], and the zone did not change either.
fn refused(f: &mut Fixture, what: &str, caller: &Caller, kind: u8, payload: &[u8], code: u16) {
    let zone = f.service.zone();
    f.refused(what, caller, kind, payload, code);
    assert_eq!(f.service.zone(), zone, "{what} changed the zone");
}

/// A client certificate for `names` with a new key, issued by the operator
/// (who may issue any name).
fn operator_issued_client(f: &mut Fixture, names: &[&str]) -> (Issued, Caller) {
    let (_, csr_pem) = csr(names);
    let operator = f.operator.clone();
    let issued = f.issue(&operator, &csr_pem, CertUsage::Client);
    let caller = caller_of(&issued);
    (issued, caller)
}

/// A client the operator issued a certificate for `name` (one only the
/// operator may hold) may neither issue a server certificate for it with a
/// new key nor renew its own. Returns that certificate.
fn holder_may_neither_issue_nor_renew(f: &mut Fixture, name: &str) -> Issued {
    let (held, holder) = operator_issued_client(f, &[name]);
    let (_, again) = csr(&[name]);
    let payload = issue_payload(&again, "server");
    refused(
        f,
        &format!("issue {name}"),
        &holder,
        CERT_ISSUE,
        &payload,
        UNAUTHORIZED,
    );
    let payload = json_bytes(json!({ "certificate_pem": held.certificate_pem }));
    refused(
        f,
        &format!("renew {name}"),
        &holder,
        CERT_RENEW,
        &payload,
        UNAUTHORIZED,
    );
    held
}

fn serial_of(issued: &Issued) -> Serial {
    parse_serial("serial", &issued.serial).unwrap()
}

fn is_revoked(f: &Fixture, issued: &Issued) -> bool {
    f.service
        .trust()
        .revoked
        .is_revoked(serial_of(issued).as_bytes())
}

/// The revocation reason `CERT_LIST` shows for `issued`.
fn listed_reason(f: &mut Fixture, issued: &Issued) -> Option<String> {
    let operator = f.operator.clone();
    let list: CertList = f
        .call(&operator, CERT_LIST, json!({ "filter": "revoked" }))
        .unwrap();
    list.certificates
        .into_iter()
        .find(|c| c.serial == issued.serial)
        .and_then(|c| c.revocation_reason)
}

#[test]
fn wildcards_are_the_operators_alone() {
    let mut f = fixture("names-wildcard");
    let operator = f.operator.clone();

    // The reported attack: enroll a wildcard, then issue it for a server.
    let (_, wildcard) = csr(&["*.internet2.test"]);
    enroll_refused(&mut f, "enroll a wildcard", &wildcard, UNAUTHORIZED);
    let cn_only = csr_named("*.internet2.test", &[]);
    enroll_refused(&mut f, "enroll a wildcard CN", &cn_only, UNAUTHORIZED);
    let inside = csr_named(
        "app.internet2.test",
        &["app.internet2.test", "*.app.internet2.test"],
    );
    enroll_refused(&mut f, "enroll a wildcard SAN", &inside, UNAUTHORIZED);

    // An enrollee may not issue one, not even under its own name.
    let (_, app, _) = f.enroll(&["app.internet2.test"]);
    let (_, under) = csr(&["*.app.internet2.test"]);
    let payload = issue_payload(&under, "server");
    refused(
        &mut f,
        "issue a wildcard",
        &app,
        CERT_ISSUE,
        &payload,
        UNAUTHORIZED,
    );

    // A holder of a wildcard the operator gave it neither issues nor
    // renews it.
    let held = holder_may_neither_issue_nor_renew(&mut f, "*.internet2.test");

    // The zone holds no wildcard, and only the operator is told it is
    // malformed rather than not allowed.
    for name in ["*", "*.internet2.test"] {
        let set = json_bytes(json!({ "name": name, "addresses": ["2001:db8::5"] }));
        refused(&mut f, "set a wildcard", &app, DNS_SET, &set, UNAUTHORIZED);
        let remove = json_bytes(json!({ "name": name }));
        refused(
            &mut f,
            "remove a wildcard",
            &app,
            DNS_REMOVE,
            &remove,
            UNAUTHORIZED,
        );
        refused(
            &mut f,
            "operator's wildcard",
            &operator,
            DNS_SET,
            &set,
            MALFORMED_REQUEST,
        );
    }

    // The operator may issue and renew one.
    let (_, server) = csr(&["*.internet2.test"]);
    let issued = f.issue(&operator, &server, CertUsage::Server);
    let facts = cert_facts(&first_cert(&issued.certificate_pem)).unwrap();
    assert_eq!(facts.dns_names, ["*.internet2.test"]);
    f.call::<Issued>(
        &operator,
        CERT_RENEW,
        json!({ "certificate_pem": held.certificate_pem }),
    )
    .unwrap();
}

#[test]
fn names_compare_without_case_or_trailing_dot() {
    let mut f = fixture("names-case");
    let operator = f.operator.clone();
    let (_, app, _) = f.enroll(&["app.internet2.test"]);

    let (_, upper) = csr(&["APP.internet2.test"]);
    enroll_refused(&mut f, "enroll APP", &upper, NAME_TAKEN);
    for cn in ["App.Internet2.TEST", "app.internet2.test."] {
        let cn_only = csr_named(cn, &[]);
        enroll_refused(&mut f, cn, &cn_only, NAME_TAKEN);
    }
    // A name held as a CN alone (no DNS name) is held in every case too.
    let token = f.token();
    let laptop = csr_named("laptop-9", &[]);
    f.call::<Issued>(
        &Caller::default(),
        ENROLL,
        json!({ "token": token, "csr_pem": laptop }),
    )
    .unwrap();
    let shouted = csr_named("LAPTOP-9", &[]);
    enroll_refused(&mut f, "LAPTOP-9", &shouted, NAME_TAKEN);

    // A holder's names are its own in any case.
    let (_, own) = csr(&["App.Internet2.Test"]);
    f.issue(&app, &own, CertUsage::Server);

    // Listing by name ignores case too.
    let list: CertList = f
        .call(
            &operator,
            CERT_LIST,
            json!({ "filter": "name:APP.INTERNET2.TEST" }),
        )
        .unwrap();
    assert_eq!(list.certificates.len(), 2, "{list:?}");
    let list: CertList = f
        .call(&operator, CERT_LIST, json!({ "filter": "name:Laptop-9" }))
        .unwrap();
    assert_eq!(list.certificates.len(), 1, "{list:?}");
}

#[test]
fn the_operators_name_is_reserved_in_any_case() {
    let mut f = fixture("names-operator");
    for cn in ["operator", "Operator", "OPERATOR", "operator."] {
        let cn_only = csr_named(cn, &[]);
        enroll_refused(&mut f, cn, &cn_only, UNAUTHORIZED);
    }
    let (_, san) = csr(&["edge.example", "Operator"]);
    enroll_refused(&mut f, "a SAN Operator", &san, UNAUTHORIZED);
    let (_, edge, _) = f.enroll(&["edge.example"]);
    let as_operator = csr_named("Operator", &[]);
    let payload = issue_payload(&as_operator, "client");
    refused(
        &mut f,
        "issue Operator",
        &edge,
        CERT_ISSUE,
        &payload,
        UNAUTHORIZED,
    );
}

#[test]
fn the_servers_own_names_are_the_operators() {
    let mut f = fixture("names-server");
    for names in [
        &["node1.internet2.test"][..],
        &["NODE1.Internet2.Test"],
        &["edge.example", "::1"],
        &["edge.example", "0:0::1"],
    ] {
        let (_, csr_pem) = csr(names);
        enroll_refused(&mut f, &format!("{names:?}"), &csr_pem, UNAUTHORIZED);
    }
    let dotted = csr_named("node1.internet2.test.", &[]);
    enroll_refused(&mut f, "node1 with its dot", &dotted, UNAUTHORIZED);

    // A client the operator gave the server's name may not issue it for a
    // server, nor renew it.
    holder_may_neither_issue_nor_renew(&mut f, "node1.internet2.test");

    // The zone's server name counts even when the certificate's names do
    // not list it.
    let mut f = fixture_with("names-server-zone", vec!["localhost".into()]);
    for name in ["node1.internet2.test", "localhost"] {
        let (_, csr_pem) = csr(&[name]);
        enroll_refused(&mut f, name, &csr_pem, UNAUTHORIZED);
    }
}

#[test]
fn revoking_a_certificate_revokes_what_was_issued_on_its_authority() {
    let mut f = fixture("names-cascade");
    let operator = f.operator.clone();
    let (parent, app, app_key) = f.enroll(&["app.internet2.test"]);
    let app_pin = sha256(&app_key.public_key_der());
    let set = json_bytes(json!({
        "name": "app",
        "addresses": ["2001:db8::a"],
        "tlsa": [{ "port": 443, "spki_sha256": hex(&app_pin) }],
    }));
    f.call_raw::<DnsChanged>(&app, DNS_SET, &set).unwrap();

    // A client certificate with another key, on app's authority; a server
    // certificate on its; and a renewal of the client, which keeps the
    // link.
    let (_, client_csr) = csr(&["app.internet2.test"]);
    let child = f.issue(&app, &client_csr, CertUsage::Client);
    let child_caller = caller_of(&child);
    let (grandchild_key, server_csr) = csr(&["app.internet2.test"]);
    let grandchild = f.issue(&child_caller, &server_csr, CertUsage::Server);
    let renewed: Issued = f
        .call(
            &child_caller,
            CERT_RENEW,
            json!({ "certificate_pem": child.certificate_pem }),
        )
        .unwrap();
    let grandchild_pin = sha256(&grandchild_key.public_key_der());
    let app_tlsa = |f: &Fixture| {
        f.service
            .zone()
            .names
            .into_iter()
            .find(|n| n.name == "app.internet2.test.")
            .unwrap()
            .tlsa
    };
    assert_eq!(app_tlsa(&f), [(443, grandchild_pin)]);
    // Neither what the operator issued nor another client is app's.
    let (by_operator, _) = operator_issued_client(&mut f, &["app.internet2.test"]);
    let (other, _, _) = f.enroll(&["other.internet2.test"]);

    let generation = f.service.trust().generation;
    f.call::<Revoked>(
        &app,
        CERT_REVOKE,
        json!({ "serial": parent.serial, "reason": "key_compromise" }),
    )
    .unwrap();
    for (what, issued) in [
        ("parent", &parent),
        ("child", &child),
        ("grandchild", &grandchild),
        ("renewed child", &renewed),
    ] {
        assert!(is_revoked(&f, issued), "the {what} is revoked");
    }
    assert!(!is_revoked(&f, &by_operator), "the operator's stays");
    assert!(!is_revoked(&f, &other), "another client's stays");
    assert_eq!(f.service.trust().generation, generation + 4);
    assert_eq!(
        listed_reason(&mut f, &parent).as_deref(),
        Some("key_compromise")
    );
    for issued in [&child, &grandchild, &renewed] {
        assert_eq!(
            listed_reason(&mut f, issued).as_deref(),
            Some("privilege_withdrawn")
        );
    }
    // The grandchild's pin went with it, in the same transaction.
    assert!(app_tlsa(&f).is_empty());
    f.refused("a revoked child", &child_caller, CT_STH, b"", UNAUTHORIZED);
    // Revoking again changes nothing.
    let payload = json_bytes(json!({ "serial": parent.serial }));
    refused(
        &mut f,
        "revoke again",
        &operator,
        CERT_REVOKE,
        &payload,
        ALREADY_REVOKED,
    );

    // After a restart, the same list and the same links.
    let trust = f.service.trust();
    let config = ServiceConfig {
        zone: Some(zone_config()),
        ..fast_config()
    };
    let mut f = f.reopen(config);
    assert_eq!(f.service.trust(), trust);

    // A renewal carries its predecessor's authority: revoking it revokes
    // what was issued on the predecessor.
    let (first, q, _) = f.enroll(&["q.internet2.test"]);
    let (_, q_csr) = csr(&["q.internet2.test"]);
    let issued_on_first = f.issue(&q, &q_csr, CertUsage::Client);
    let second: Issued = f
        .call(
            &q,
            CERT_RENEW,
            json!({ "certificate_pem": first.certificate_pem }),
        )
        .unwrap();
    f.call::<Revoked>(&operator, CERT_REVOKE, json!({ "serial": second.serial }))
        .unwrap();
    assert!(is_revoked(&f, &issued_on_first));
    assert!(!is_revoked(&f, &first), "a predecessor is not revoked");
}

#[test]
fn revoking_a_certificate_revokes_its_renewals_and_what_was_issued_on_them() {
    let mut f = fixture("names-renewal-cascade");
    let operator = f.operator.clone();
    let renew = |f: &mut Fixture, caller: &Caller, issued: &Issued| -> Issued {
        f.call(
            caller,
            CERT_RENEW,
            json!({ "certificate_pem": issued.certificate_pem }),
        )
        .unwrap()
    };
    let (p1, p1_caller, p1_key) = f.enroll(&["r.internet2.test"]);
    let pin = sha256(&p1_key.public_key_der());
    let set = json_bytes(json!({
        "name": "r",
        "addresses": ["2001:db8::e"],
        "tlsa": [{ "port": 443, "spki_sha256": hex(&pin) }],
    }));
    f.call_raw::<DnsChanged>(&p1_caller, DNS_SET, &set).unwrap();

    // The reported dodge: renew ahead of a revocation (same key) and issue
    // on the renewal; and renew the renewal.
    let p2 = renew(&mut f, &p1_caller, &p1);
    let p2_caller = caller_of(&p2);
    let (_, child_csr) = csr(&["r.internet2.test"]);
    let child = f.issue(&p2_caller, &child_csr, CertUsage::Client);
    let p3 = renew(&mut f, &p2_caller, &p2);
    let (unrelated, _, _) = f.enroll(&["unrelated.internet2.test"]);

    f.call::<Revoked>(
        &operator,
        CERT_REVOKE,
        json!({ "serial": p1.serial, "reason": "key_compromise" }),
    )
    .unwrap();
    for (what, issued) in [
        ("first", &p1),
        ("renewal", &p2),
        ("child of the renewal", &child),
        ("renewal of the renewal", &p3),
    ] {
        assert!(is_revoked(&f, issued), "the {what} is revoked");
    }
    assert!(
        !is_revoked(&f, &unrelated),
        "an unrelated certificate stays"
    );
    for issued in [&p2, &child, &p3] {
        assert_eq!(
            listed_reason(&mut f, issued).as_deref(),
            Some("privilege_withdrawn")
        );
    }
    // No live certificate has the key any more: its pin went too.
    let tlsa = f
        .service
        .zone()
        .names
        .into_iter()
        .find(|n| n.name == "r.internet2.test.")
        .unwrap()
        .tlsa;
    assert!(tlsa.is_empty(), "{tlsa:?}");
    f.refused("the renewal", &p2_caller, CT_STH, b"", UNAUTHORIZED);
    // A second revocation, of the first or of a renewal, changes nothing.
    for issued in [&p1, &p2] {
        let payload = json_bytes(json!({ "serial": issued.serial }));
        refused(
            &mut f,
            "revoke again",
            &operator,
            CERT_REVOKE,
            &payload,
            ALREADY_REVOKED,
        );
    }

    // The other way, as before: revoking a renewal revokes what was issued
    // on its predecessor, not the predecessor itself.
    let (q1, q1_caller, _) = f.enroll(&["q.internet2.test"]);
    let (_, on_q1_csr) = csr(&["q.internet2.test"]);
    let on_q1 = f.issue(&q1_caller, &on_q1_csr, CertUsage::Client);
    let q2 = renew(&mut f, &q1_caller, &q1);
    f.call::<Revoked>(&operator, CERT_REVOKE, json!({ "serial": q2.serial }))
        .unwrap();
    assert!(is_revoked(&f, &on_q1));
    assert!(!is_revoked(&f, &q1), "a predecessor is not revoked");
    assert!(!is_revoked(&f, &unrelated));
}

#[test]
fn the_zone_refuses_every_one_of_the_servers_names() {
    let server_names = vec![
        "node1.internet2.test".into(),
        "api.internet2.test".into(),
        "::1".into(),
    ];
    let mut f = fixture_with("names-server-dns", server_names);
    let operator = f.operator.clone();
    // A holder of the server's names, as one issued before they were
    // reserved would be; a name of its own shows it may change others.
    let (_, holder) = operator_issued_client(
        &mut f,
        &[
            "own.internet2.test",
            "api.internet2.test",
            "node1.internet2.test",
        ],
    );
    let set = |name: &str| json_bytes(json!({ "name": name, "addresses": ["2001:db8::5"] }));
    f.call_raw::<DnsChanged>(&holder, DNS_SET, &set("own"))
        .unwrap();
    for name in ["api", "API.internet2.test.", "api.internet2.test", "node1"] {
        refused(&mut f, name, &holder, DNS_SET, &set(name), UNAUTHORIZED);
        let remove = json_bytes(json!({ "name": name }));
        refused(&mut f, name, &holder, DNS_REMOVE, &remove, UNAUTHORIZED);
    }
    // The operator's to set, and then still not the holder's to remove.
    f.call_raw::<DnsChanged>(&operator, DNS_SET, &set("api"))
        .unwrap();
    let remove = json_bytes(json!({ "name": "api" }));
    refused(
        &mut f,
        "remove api",
        &holder,
        DNS_REMOVE,
        &remove,
        UNAUTHORIZED,
    );
}
