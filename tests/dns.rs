//! The embedded zone end to end: who may change which records, pinning,
//! and DNS-over-QUIC bad input, each followed by a good query.

mod common;

use common::*;
use dataplane::client::rpc::{Framing, Reply, Request};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RecordType};
use std::time::Duration;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A client identity for `name`, issued by the server's CA through the
/// operator (`internet2 cert issue`).
fn identity_for(server: &Server, name: &str) -> std::path::PathBuf {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(vec![name.to_string()])
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let csr_path = server.dir.join(format!("{name}.csr"));
    std::fs::write(&csr_path, csr).unwrap();
    let cert_path = server.dir.join(format!("{name}.cert.pem"));
    ok(&server.client(&[
        "cert",
        "issue",
        "--csr",
        csr_path.to_str().unwrap(),
        "--usage",
        "client",
        "--out",
        cert_path.to_str().unwrap(),
    ]));
    let identity = server.dir.join(format!("{name}.pem"));
    std::fs::write(
        &identity,
        std::fs::read_to_string(&cert_path).unwrap() + &key.serialize_pem(),
    )
    .unwrap();
    identity
}

#[test]
fn only_a_certificate_for_the_name_may_change_it_and_the_operator_all() {
    let server = Server::start("dns-rules", "");
    let web = identity_for(&server, "web.internet2.test");
    let other = identity_for(&server, "other.internet2.test");
    let web_id = ["--identity", web.to_str().unwrap()];
    let other_id = ["--identity", other.to_str().unwrap()];
    let add = |identity: &[&str], pin_cert: &std::path::Path| {
        let mut args = vec![
            "dns",
            "add",
            "web",
            "--address",
            "fd71:7e57::80",
            "--pin-cert",
        ];
        args.push(pin_cert.to_str().unwrap());
        args.extend_from_slice(identity);
        server.client(&args)
    };
    // The holder of web's certificate publishes its own key.
    ok(&add(&web_id, &web));
    // Another client may not touch web, not even with its own key.
    let refused = add(&other_id, &other);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("not allowed"),
        "{}",
        stderr(&refused)
    );
    // web may not publish a key it does not hold.
    let foreign_pin = add(&web_id, &other);
    assert!(!foreign_pin.status.success(), "{}", stderr(&foreign_pin));
    // The change that went through is what resolvers see.
    let resolved = server.client(&["resolve", "web.internet2.test", "--json"]);
    let resolved: serde_json::Value = serde_json::from_str(ok(&resolved).trim()).unwrap();
    assert_eq!(
        resolved["addresses"],
        serde_json::json!([format!("[fd71:7e57::80]:{}", server.port)])
    );
    // The operator manages every name.
    ok(&server.client(&["dns", "remove", "web"]));
    let gone = server.client(&["resolve", "web.internet2.test"]);
    assert!(stderr(&gone).contains("NXDomain"), "{}", stderr(&gone));
    // Names outside the zone and bad labels are refused, changing nothing.
    for bad in ["web.example.com.", "bad_label", "-dash", "internet2.test."] {
        let out = server.client(&["dns", "add", bad, "--address", "fd71:7e57::81"]);
        assert!(!out.status.success(), "{bad} was accepted");
    }
    let list = server.client(&["dns", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_str(ok(&list).trim()).unwrap();
    assert_eq!(list["records"].as_array().unwrap().len(), 1, "{list}");
}

#[test]
fn a_server_whose_key_does_not_match_the_pin_is_refused() {
    let server = Server::start("dns-pin", "");
    // By its name, with its real pin: connected and verified.
    let good = server.client(&["connect", "node1.internet2.test"]);
    assert!(ok(&good).contains("key pinned by TLSA 3 1 1"));
    // The operator publishes another key for it: the client refuses.
    ok(&server.client(&[
        "dns",
        "add",
        "node1",
        "--address",
        "::1",
        "--pin",
        &"ab".repeat(32),
    ]));
    let refused = server.client(&["connect", "node1.internet2.test"]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("does not match the TLSA 3 1 1 pin"),
        "{}",
        stderr(&refused)
    );
}

fn query(name: &str, kind: RecordType, class: DNSClass, id: u16) -> Vec<u8> {
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    let mut q = Query::query(Name::from_ascii(name).unwrap(), kind);
    q.set_query_class(class);
    message.queries.push(q);
    framed(&message.to_vec().unwrap())
}

fn framed(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

/// Send `streams` (each the exact bytes of one stream) on one DoQ
/// connection, then check a good query on a new connection succeeds.
fn doq(server: &Server, streams: Vec<Vec<u8>>) -> Vec<Reply> {
    let target = dataplane::client::ClientTarget {
        identity: None,
        ..target(server)
    };
    let requests = streams
        .into_iter()
        .map(|message| Request {
            message: message.into(),
            idempotent: true,
        })
        .collect();
    let outcome = dataplane::client::rpc_framed(
        &target,
        dataplane::protocols::ALPN_DOQ,
        Framing::Doq,
        requests,
        Duration::from_secs(3),
    )
    .unwrap();
    outcome.replies
}

fn target(server: &Server) -> dataplane::client::ClientTarget {
    let root = controlplane::authority::pem::load_cert(&server.ca()).unwrap();
    dataplane::client::ClientTarget {
        remote: server.socket_addr(),
        server_name: "localhost".into(),
        trust: dataplane::ServerTrust::Roots(vec![root]),
        identity: None,
        backend: dataplane::BackendKind::Socket,
        admitter: None,
        transport: dataplane::TransportSettings::default(),
    }
}

fn rcode(reply: &Reply) -> ResponseCode {
    match reply {
        Reply::Ok(bytes) => Message::from_vec(bytes).unwrap().metadata.response_code,
        other => panic!("no answer: {other:?}"),
    }
}

fn good_query_works(server: &Server) {
    let replies = doq(
        server,
        vec![query(
            "node1.internet2.test.",
            RecordType::AAAA,
            DNSClass::IN,
            0,
        )],
    );
    assert_eq!(rcode(&replies[0]), ResponseCode::NoError);
}

#[test]
fn bad_dns_over_quic_input_gets_the_rfc_answer_and_the_server_serves_on() {
    let server = Server::start("dns-bad", "");
    good_query_works(&server);

    // Malformed message: FORMERR, the connection stays.
    let replies = doq(&server, vec![framed(b"\x00\x00garbage")]);
    assert_eq!(rcode(&replies[0]), ResponseCode::FormErr);
    good_query_works(&server);

    // A label longer than 63 bytes in the wire form: FORMERR.
    let mut bad_label = vec![0u8; 12];
    bad_label[5] = 1; // QDCOUNT 1
    bad_label.push(64);
    bad_label.extend_from_slice(&[b'a'; 64]);
    bad_label.extend_from_slice(&[0, 0, 28, 0, 1]);
    let replies = doq(&server, vec![framed(&bad_label)]);
    assert_eq!(rcode(&replies[0]), ResponseCode::FormErr);
    good_query_works(&server);

    // Unknown class: REFUSED; unknown type: NOERROR with no data.
    let replies = doq(
        &server,
        vec![
            query("node1.internet2.test.", RecordType::AAAA, DNSClass::CH, 0),
            query("node1.internet2.test.", RecordType::MX, DNSClass::IN, 0),
        ],
    );
    assert_eq!(rcode(&replies[0]), ResponseCode::Refused);
    assert_eq!(rcode(&replies[1]), ResponseCode::NoError);
    good_query_works(&server);

    // Protocol violations close the connection with DOQ_PROTOCOL_ERROR
    // (RFC 9250 §4.3): a non-zero message ID, two queries on one stream, a
    // stream that ends inside its message.
    let two = [
        query("node1.internet2.test.", RecordType::AAAA, DNSClass::IN, 0),
        query("node1.internet2.test.", RecordType::TLSA, DNSClass::IN, 0),
    ]
    .concat();
    let mut short = query("node1.internet2.test.", RecordType::AAAA, DNSClass::IN, 0);
    short[1] = short[1].wrapping_add(40);
    for stream in [
        query("node1.internet2.test.", RecordType::AAAA, DNSClass::IN, 7),
        two,
        short,
    ] {
        let replies = doq(&server, vec![stream]);
        match &replies[0] {
            Reply::Failed(why) => assert!(why.contains("code 2"), "{why}"),
            other => panic!("a protocol violation was answered: {other:?}"),
        }
        good_query_works(&server);
    }

    // The largest message a length prefix allows: answered FORMERR.
    let replies = doq(&server, vec![framed(&vec![0u8; u16::MAX as usize])]);
    assert_eq!(rcode(&replies[0]), ResponseCode::FormErr);
    good_query_works(&server);
    assert!(server.stats()["total"]["doq_errors"].as_u64().unwrap() >= 3);
}
