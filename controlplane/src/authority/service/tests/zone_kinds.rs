//! The zone kinds (`DNS_SET`, `DNS_REMOVE`, `DNS_LIST`) and the zone's
//! pins following the CA, driven through `handle` as the control-plane
//! thread drives them.

use super::*;

const SERVER_ADDRESS: &str = "2001:db8::1";

fn zone_config() -> ZoneConfig {
    ZoneConfig {
        apex: "internet2.test.".into(),
        server_name: "node1".into(),
        server_addresses: vec![SERVER_ADDRESS.parse().unwrap()],
        server_port: 443,
    }
}

pub(super) fn zone_service_config() -> ServiceConfig {
    ServiceConfig {
        zone: Some(zone_config()),
        ..fast_config()
    }
}

/// A service with a zone and the server's own records in it.
fn zone_fixture(tag: &str) -> Fixture {
    let mut f = Fixture::with_config(tag, zone_service_config());
    let pin = f.service.server_spki_sha256().unwrap();
    f.service
        .register_server(&zone_config(), pin, f.now)
        .unwrap();
    f
}

fn pin_of(caller: &Caller) -> [u8; 32] {
    cert_facts(caller.cert_der.as_ref().unwrap()).unwrap().pin()
}

fn set_payload(name: &str, addresses: &[&str], tlsa: &[(u16, [u8; 32])]) -> Vec<u8> {
    let tlsa: Vec<Value> = tlsa
        .iter()
        .map(|(port, pin)| json!({ "port": port, "spki_sha256": hex(pin) }))
        .collect();
    json_bytes(json!({ "name": name, "addresses": addresses, "tlsa": tlsa }))
}

/// `caller` sets `name`'s addresses and pins; the answer.
pub(super) fn dns_set(
    f: &mut Fixture,
    caller: &Caller,
    name: &str,
    addresses: &[&str],
    tlsa: &[(u16, [u8; 32])],
) -> DnsChanged {
    f.call_raw(caller, DNS_SET, &set_payload(name, addresses, tlsa))
        .unwrap()
}

/// A client certificate for `names` with a new key, issued by the operator
/// (who, unlike enrollment, may issue a name another key holds).
fn operator_issued_client(f: &mut Fixture, names: &[&str]) -> Caller {
    let (_, csr_pem) = csr(names);
    let operator = f.operator.clone();
    caller_of(&f.issue(&operator, &csr_pem, CertUsage::Client))
}

/// The record `list` has for `name`.
fn listed<'a>(list: &'a DnsList, name: &str) -> &'a DnsRecord {
    list.records.iter().find(|r| r.name == name).expect(name)
}

fn records_of(f: &Fixture, name: &str) -> Option<crate::dns::NameRecords> {
    f.service.zone().names.into_iter().find(|n| n.name == name)
}

/// `kind` fails with `code`, and neither the zone nor the authority changed.
fn zone_refused(f: &mut Fixture, what: &str, caller: &Caller, kind: u8, payload: &[u8], code: u16) {
    let zone = f.service.zone();
    f.refused(what, caller, kind, payload, code);
    assert_eq!(f.service.zone(), zone, "{what} changed the zone");
}

#[test]
fn zone_names_can_be_set_listed_and_removed() {
    let mut f = zone_fixture("zone-happy");
    let operator = f.operator.clone();
    let server_pin = f.service.server_spki_sha256().unwrap();

    // The server's own name is there from the start, with its pin.
    let list: DnsList = f.call(&operator, DNS_LIST, json!({})).unwrap();
    assert_eq!(list.serial, 1);
    assert_eq!(list.next, None);
    assert_eq!(
        list.records,
        [DnsRecord {
            name: "node1.internet2.test.".into(),
            addresses: vec![SERVER_ADDRESS.into()],
            tlsa: vec![DnsTlsa {
                port: 443,
                spki_sha256: hex(&server_pin),
            }],
            owner: None,
        }]
    );

    let payload = set_payload("App", &["2001:db8::10", "2001:db8::9"], &[(443, [7; 32])]);
    let set: DnsChanged = f.call_raw(&operator, DNS_SET, &payload).unwrap();
    assert_eq!(set.name, "app.internet2.test.");
    assert_eq!(set.serial, 2);
    let record = set.record.unwrap();
    assert_eq!(record.addresses, ["2001:db8::9", "2001:db8::10"]);
    assert_eq!(record.owner, None);
    let zone = f.service.zone();
    assert_eq!(
        (zone.apex.as_str(), zone.serial, zone.generation),
        ("internet2.test.", 2, 2)
    );
    assert_eq!(
        records_of(&f, "app.internet2.test.").unwrap().tlsa,
        [(443, [7; 32])]
    );
    // The same records again are no change.
    let again: DnsChanged = f.call_raw(&operator, DNS_SET, &payload).unwrap();
    assert_eq!(again.serial, 2);
    assert_eq!(f.service.zone_generation(), 2);

    // A set replaces both sets: no pins given, none left.
    let payload = json_bytes(json!({ "name": "app.internet2.test", "addresses": ["2001:db8::9"] }));
    let set: DnsChanged = f.call_raw(&operator, DNS_SET, &payload).unwrap();
    assert_eq!(set.serial, 3);
    let app = records_of(&f, "app.internet2.test.").unwrap();
    assert_eq!(app.aaaa, ["2001:db8::9".parse::<Ipv6Addr>().unwrap()]);
    assert!(app.tlsa.is_empty());

    // Any authenticated caller may list.
    let (_, reader, _) = f.enroll(&["reader.example"]);
    let list: DnsList = f.call(&reader, DNS_LIST, json!({})).unwrap();
    assert_eq!(list.records.len(), 2);
    let list: DnsList = f
        .call(&reader, DNS_LIST, json!({ "after": "app.internet2.test." }))
        .unwrap();
    assert_eq!(list.records.len(), 1);
    assert_eq!(list.records[0].name, "node1.internet2.test.");

    let removed: DnsChanged = f
        .call(&operator, DNS_REMOVE, json!({ "name": "app" }))
        .unwrap();
    assert_eq!((removed.record, removed.serial), (None, 4));
    assert_eq!(records_of(&f, "app.internet2.test."), None);
    zone_refused(
        &mut f,
        "remove twice",
        &operator,
        DNS_REMOVE,
        br#"{"name":"app"}"#,
        NOT_FOUND,
    );
}

#[test]
fn the_zone_survives_a_restart() {
    let mut f = zone_fixture("zone-restart");
    let operator = f.operator.clone();
    let (_, app, _) = f.enroll(&["app.internet2.test"]);
    let app_pin = pin_of(&app);
    dns_set(&mut f, &operator, "web", &["2001:db8::80"], &[]);
    dns_set(&mut f, &app, "app", &["2001:db8::a"], &[(443, app_pin)]);
    let snapshot = f.service.zone();
    assert_eq!((snapshot.serial, snapshot.names.len()), (3, 3));

    let mut f = f.reopen(zone_service_config());
    assert_eq!(f.service.zone(), snapshot);
    // Registering the same server records again changes nothing.
    let pin = f.service.server_spki_sha256().unwrap();
    f.service
        .register_server(&zone_config(), pin, f.now)
        .unwrap();
    assert_eq!(f.service.zone(), snapshot);
    // The owner key is durable too: another key still may not take the name.
    let list: DnsList = f.call_raw(&app, DNS_LIST, b"").unwrap();
    assert_eq!(
        listed(&list, "app.internet2.test.").owner,
        Some(hex(&app_pin))
    );
    let thief = operator_issued_client(&mut f, &["app.internet2.test"]);
    zone_refused(
        &mut f,
        "a name another key owns, after a restart",
        &thief,
        DNS_SET,
        &set_payload("app", &["2001:db8::bad"], &[]),
        NAME_TAKEN,
    );
    // A new server address is registered as one change.
    let moved = ZoneConfig {
        server_addresses: vec!["2001:db8::2".parse().unwrap()],
        ..zone_config()
    };
    f.service.register_server(&moved, pin, f.now).unwrap();
    assert_eq!(f.service.zone().serial, snapshot.serial + 1);
}

#[test]
fn only_holders_of_a_certificate_for_a_name_may_change_it() {
    let mut f = zone_fixture("zone-authz");
    let operator = f.operator.clone();
    let (_, app, _) = f.enroll(&["app.internet2.test"]);
    let (_, other, _) = f.enroll(&["other.internet2.test"]);
    let app_pin = pin_of(&app);

    // The holder sets its name's addresses and its own pin.
    let set = dns_set(&mut f, &app, "app", &["2001:db8::a"], &[(443, app_pin)]);
    assert_eq!(set.record.unwrap().owner, Some(hex(&app_pin)));

    let anyone = Caller::default();
    let server_pin = f.service.server_spki_sha256().unwrap();
    for (what, caller, kind, payload) in [
        (
            "no certificate",
            &anyone,
            DNS_SET,
            set_payload("app", &["2001:db8::b"], &[]),
        ),
        (
            "a name the certificate does not carry",
            &other,
            DNS_SET,
            set_payload("app", &["2001:db8::b"], &[]),
        ),
        (
            "remove a name the certificate does not carry",
            &other,
            DNS_REMOVE,
            br#"{"name":"app"}"#.to_vec(),
        ),
        (
            "a new name the certificate does not carry",
            &other,
            DNS_SET,
            set_payload("new", &["2001:db8::b"], &[]),
        ),
        (
            "a foreign pin",
            &app,
            DNS_SET,
            set_payload("app", &["2001:db8::a"], &[(443, app_pin), (853, [7; 32])]),
        ),
        (
            "the server's pin",
            &app,
            DNS_SET,
            set_payload("app", &[], &[(443, server_pin)]),
        ),
    ] {
        zone_refused(&mut f, what, caller, kind, &payload, UNAUTHORIZED);
    }

    // A client certificate for the server's name (only the operator can
    // issue one) still does not change the server's records.
    let node1 = operator_issued_client(&mut f, &["node1.internet2.test"]);
    zone_refused(
        &mut f,
        "the server's own name",
        &node1,
        DNS_SET,
        &set_payload("node1", &["2001:db8::66"], &[]),
        UNAUTHORIZED,
    );

    // Another key with a certificate for the name may not take it while
    // the owner's certificate is live.
    let thief = operator_issued_client(&mut f, &["app.internet2.test"]);
    let thief_pin = pin_of(&thief);
    zone_refused(
        &mut f,
        "a name another key owns",
        &thief,
        DNS_SET,
        &set_payload("app", &["2001:db8::bad"], &[(443, thief_pin)]),
        NAME_TAKEN,
    );
    zone_refused(
        &mut f,
        "remove a name another key owns",
        &thief,
        DNS_REMOVE,
        br#"{"name":"app"}"#,
        NAME_TAKEN,
    );

    // The operator may set any name, with any pin; it then has no owner.
    let set = dns_set(
        &mut f,
        &operator,
        "app",
        &["2001:db8::c"],
        &[(443, [7; 32])],
    );
    assert_eq!(set.record.unwrap().owner, None);
    dns_set(&mut f, &operator, "node1", &["2001:db8::1"], &[]);
    // The holder takes it back (it now has no owner key).
    let set = dns_set(&mut f, &app, "app", &["2001:db8::a"], &[(443, app_pin)]);
    assert_eq!(set.record.unwrap().owner, Some(hex(&app_pin)));

    // Once no live certificate holds the owner's key, another holder of a
    // certificate for the name may take it.
    let app_serial = cert_facts_serial(&app);
    f.call::<Revoked>(&operator, CERT_REVOKE, json!({ "serial": app_serial }))
        .unwrap();
    let set = dns_set(&mut f, &thief, "app", &["2001:db8::d"], &[(443, thief_pin)]);
    assert_eq!(set.record.unwrap().owner, Some(hex(&thief_pin)));
    let removed: DnsChanged = f
        .call(&thief, DNS_REMOVE, json!({ "name": "app.internet2.test." }))
        .unwrap();
    assert_eq!(removed.record, None);
    assert_eq!(records_of(&f, "app.internet2.test."), None);
}

fn cert_facts_serial(caller: &Caller) -> String {
    ca::serial_of(caller.cert_der.as_ref().unwrap())
        .unwrap()
        .to_string()
}

#[test]
fn bad_zone_requests_get_their_code_and_change_nothing() {
    let mut f = zone_fixture("zone-bad");
    let operator = f.operator.clone();
    dns_set(&mut f, &operator, "app", &["2001:db8::a"], &[]);
    let pin = [7u8; 32];
    let long = "a".repeat(64);
    let many_addresses: Vec<String> = (1..=17).map(|i| format!("2001:db8::{i:x}")).collect();
    let many_refs: Vec<&str> = many_addresses.iter().map(String::as_str).collect();
    let many_pins: Vec<(u16, [u8; 32])> = (1..=17).map(|p| (p, pin)).collect();
    let huge: Vec<String> = (1..=3000).map(|i| format!("2001:db8::{i:x}")).collect();
    let huge_refs: Vec<&str> = huge.iter().map(String::as_str).collect();
    let good_pin = hex(&pin);
    let cases: Vec<(&str, u8, Vec<u8>, u16)> = vec![
        ("not JSON", DNS_SET, b"{name".to_vec(), MALFORMED_REQUEST),
        (
            "no name",
            DNS_SET,
            br#"{"addresses":["2001:db8::1"]}"#.to_vec(),
            MALFORMED_REQUEST,
        ),
        (
            "label with _",
            DNS_SET,
            set_payload("a_b", &["2001:db8::1"], &[]),
            MALFORMED_REQUEST,
        ),
        (
            "label with -",
            DNS_SET,
            set_payload("-ab", &["2001:db8::1"], &[]),
            MALFORMED_REQUEST,
        ),
        (
            "empty label",
            DNS_SET,
            set_payload("a..b", &["2001:db8::1"], &[]),
            MALFORMED_REQUEST,
        ),
        (
            "long label",
            DNS_SET,
            set_payload(&long, &["2001:db8::1"], &[]),
            MALFORMED_REQUEST,
        ),
        (
            "empty name",
            DNS_SET,
            set_payload("", &["2001:db8::1"], &[]),
            MALFORMED_REQUEST,
        ),
        (
            "outside the zone",
            DNS_SET,
            set_payload("app.example.com.", &["2001:db8::1"], &[]),
            NOT_IN_ZONE,
        ),
        (
            "the apex",
            DNS_SET,
            set_payload("internet2.test.", &["2001:db8::1"], &[]),
            NOT_IN_ZONE,
        ),
        (
            "remove the apex",
            DNS_REMOVE,
            br#"{"name":"internet2.test"}"#.to_vec(),
            NOT_IN_ZONE,
        ),
        (
            "IPv4",
            DNS_SET,
            set_payload("app", &["192.0.2.1"], &[]),
            MALFORMED_REQUEST,
        ),
        (
            "v4-mapped",
            DNS_SET,
            set_payload("app", &["::ffff:192.0.2.1"], &[]),
            MALFORMED_REQUEST,
        ),
        (
            "unspecified",
            DNS_SET,
            set_payload("app", &["::"], &[]),
            MALFORMED_REQUEST,
        ),
        (
            "scoped",
            DNS_SET,
            set_payload("app", &["fe80::1%eth0"], &[]),
            MALFORMED_REQUEST,
        ),
        (
            "17 addresses",
            DNS_SET,
            set_payload("app", &many_refs, &[]),
            MALFORMED_REQUEST,
        ),
        (
            "17 pins",
            DNS_SET,
            set_payload("app", &[], &many_pins),
            MALFORMED_REQUEST,
        ),
        (
            "3000 addresses",
            DNS_SET,
            set_payload("app", &huge_refs, &[]),
            MALFORMED_REQUEST,
        ),
        (
            "over 64 KiB",
            DNS_SET,
            json_bytes(json!({ "name": "app", "addresses": vec!["2001:db8::1"; 6000] })),
            MALFORMED_REQUEST,
        ),
        (
            "nothing to set",
            DNS_SET,
            br#"{"name":"app"}"#.to_vec(),
            MALFORMED_REQUEST,
        ),
        (
            "port 0",
            DNS_SET,
            set_payload("app", &[], &[(0, pin)]),
            MALFORMED_REQUEST,
        ),
        (
            "short pin",
            DNS_SET,
            json_bytes(json!({ "name": "app", "tlsa": [{ "port": 443, "spki_sha256": "abcd" }] })),
            MALFORMED_REQUEST,
        ),
        (
            "not hex",
            DNS_SET,
            json_bytes(
                json!({ "name": "app", "tlsa": [{ "port": 443, "spki_sha256": "zz".repeat(32) }] }),
            ),
            MALFORMED_REQUEST,
        ),
        (
            "signed hex",
            DNS_SET,
            json_bytes(
                json!({ "name": "app", "tlsa": [{ "port": 443, "spki_sha256": format!("+f{}", &good_pin[2..]) }] }),
            ),
            MALFORMED_REQUEST,
        ),
        (
            "port too large",
            DNS_SET,
            json_bytes(
                json!({ "name": "app", "tlsa": [{ "port": 70000, "spki_sha256": good_pin }] }),
            ),
            MALFORMED_REQUEST,
        ),
        (
            "unknown field",
            DNS_SET,
            json_bytes(json!({ "name": "app", "addresses": ["2001:db8::1"], "ttl": 60 })),
            MALFORMED_REQUEST,
        ),
        (
            "unknown TLSA field",
            DNS_SET,
            json_bytes(
                json!({ "name": "app", "tlsa": [{ "port": 443, "spki_sha256": good_pin, "usage": 3 }] }),
            ),
            MALFORMED_REQUEST,
        ),
        (
            "unknown remove field",
            DNS_REMOVE,
            br#"{"name":"app","all":true}"#.to_vec(),
            MALFORMED_REQUEST,
        ),
        (
            "remove a bad name",
            DNS_REMOVE,
            br#"{"name":"a_b"}"#.to_vec(),
            MALFORMED_REQUEST,
        ),
        (
            "remove an unknown name",
            DNS_REMOVE,
            br#"{"name":"nobody"}"#.to_vec(),
            NOT_FOUND,
        ),
        (
            "unknown list field",
            DNS_LIST,
            br#"{"before":"x"}"#.to_vec(),
            MALFORMED_REQUEST,
        ),
    ];
    for (what, kind, payload, code) in cases {
        zone_refused(&mut f, what, &operator, kind, &payload, code);
    }
    // Still serving.
    dns_set(&mut f, &operator, "app", &["2001:db8::b"], &[]);
}

#[test]
fn server_certificates_keep_their_names_pins_in_step() {
    let mut f = zone_fixture("zone-ca");
    let operator = f.operator.clone();
    let (_, app, _) = f.enroll(&["app.internet2.test"]);
    let app_pin = pin_of(&app);
    let pins = [(443, app_pin), (853, app_pin)];
    dns_set(&mut f, &app, "app", &["2001:db8::a"], &pins);
    dns_set(&mut f, &operator, "plain", &["2001:db8::b"], &[]);
    let before = f.service.zone();

    // A client certificate changes no pin.
    let (_, client_csr) = csr(&["app.internet2.test"]);
    f.issue(&app, &client_csr, CertUsage::Client);
    assert_eq!(f.service.zone(), before);

    // A server certificate with a new key re-pins the names it carries.
    let (server_key, server_csr) = csr(&["app.internet2.test"]);
    let server_pin = sha256(&server_key.public_key_der());
    let issued = f.issue(&app, &server_csr, CertUsage::Server);
    let app_records = records_of(&f, "app.internet2.test.").unwrap();
    assert_eq!(app_records.tlsa, [(443, server_pin), (853, server_pin)]);
    assert_eq!(
        app_records.aaaa,
        ["2001:db8::a".parse::<Ipv6Addr>().unwrap()]
    );
    assert_eq!(f.service.zone().serial, before.serial + 1);
    // The owner follows the key.
    let list: DnsList = f.call(&operator, DNS_LIST, json!({})).unwrap();
    assert_eq!(
        listed(&list, "app.internet2.test.").owner,
        Some(hex(&server_pin))
    );
    // A name without pins gets none.
    let (_, plain_csr) = csr(&["plain.internet2.test"]);
    f.issue(&operator, &plain_csr, CertUsage::Server);
    assert!(
        records_of(&f, "plain.internet2.test.")
            .unwrap()
            .tlsa
            .is_empty()
    );

    // Renewal: the operator pinned another key; renewing the server
    // certificate pins its key again.
    dns_set(
        &mut f,
        &operator,
        "app",
        &["2001:db8::a"],
        &[(443, [7; 32])],
    );
    let renewed: Issued = f
        .call(
            &operator,
            CERT_RENEW,
            json!({ "certificate_pem": issued.certificate_pem }),
        )
        .unwrap();
    assert_eq!(
        records_of(&f, "app.internet2.test.").unwrap().tlsa,
        [(443, server_pin)]
    );

    // Revoking one of two live certificates with the key keeps the pin;
    // revoking the last removes it (the addresses stay). The renewal goes
    // first: revoking the certificate it renewed would take it along.
    let generation = f.service.zone_generation();
    f.call::<Revoked>(&operator, CERT_REVOKE, json!({ "serial": renewed.serial }))
        .unwrap();
    assert_eq!(f.service.zone_generation(), generation);
    f.call::<Revoked>(
        &operator,
        CERT_REVOKE,
        json!({ "serial": issued.serial, "reason": "key_compromise" }),
    )
    .unwrap();
    let app_records = records_of(&f, "app.internet2.test.").unwrap();
    assert!(app_records.tlsa.is_empty());
    assert_eq!(
        app_records.aaaa,
        ["2001:db8::a".parse::<Ipv6Addr>().unwrap()]
    );
    assert_eq!(f.service.zone_generation(), generation + 1);

    // The server's own pin is not the CA's to change.
    let server_records = records_of(&f, "node1.internet2.test.").unwrap();
    let (_, node1_csr) = csr(&["node1.internet2.test"]);
    f.issue(&operator, &node1_csr, CertUsage::Server);
    assert_eq!(
        records_of(&f, "node1.internet2.test.").unwrap(),
        server_records
    );

    // Pins removed with a revocation are gone after a restart too.
    let snapshot = f.service.zone();
    let f = f.reopen(zone_service_config());
    assert_eq!(f.service.zone(), snapshot);
}

#[test]
fn without_a_zone_the_zone_kinds_are_unknown() {
    let mut f = Fixture::new("no-zone");
    let operator = f.operator.clone();
    for kind in DNS_KINDS {
        f.refused("no zone", &operator, kind, b"{}", UNKNOWN_KIND);
    }
    let zone = f.service.zone();
    assert_eq!(
        (zone.apex.as_str(), zone.generation, zone.names.len()),
        ("", 0, 0)
    );
    let pin = f.service.server_spki_sha256().unwrap();
    assert!(matches!(
        f.service.register_server(&zone_config(), pin, f.now),
        Err(AuthorityError::Zone { .. })
    ));
}
