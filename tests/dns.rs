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
    // A name too long for its pin's name (`_443._udp.NAME`) is refused
    // its pin with the reason, and the zone's answers keep moving.
    let label = "a".repeat(63);
    let long = format!("{label}.{label}.{label}.{}", "b".repeat(46));
    let pin = "ab".repeat(32);
    let out = server.client(&["dns", "add", &long, "--pin", &pin, "--port", "443"]);
    assert!(
        !out.status.success(),
        "a pin at a {}-character name",
        long.len() + 25
    );
    assert!(stderr(&out).contains("too long to pin"), "{}", stderr(&out));
    let list = server.client(&["dns", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_str(ok(&list).trim()).unwrap();
    assert_eq!(list["records"].as_array().unwrap().len(), 1, "{list}");
    ok(&server.client(&["dns", "add", "after", "--address", "fd71:7e57::82"]));
    let resolved = server.client(&["resolve", "after.internet2.test", "--json"]);
    let resolved: serde_json::Value = serde_json::from_str(ok(&resolved).trim()).unwrap();
    assert_eq!(
        resolved["addresses"],
        serde_json::json!([format!("[fd71:7e57::82]:{}", server.port)])
    );
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
    doq_to(&target, streams)
}

/// [`doq`] to `target` (its name and trust), anonymously.
fn doq_to(target: &dataplane::client::ClientTarget, streams: Vec<Vec<u8>>) -> Vec<Reply> {
    let requests = streams
        .into_iter()
        .map(|message| Request {
            message: message.into(),
            idempotent: true,
        })
        .collect();
    let outcome = dataplane::client::rpc_framed(
        target,
        dataplane::protocols::ALPN_DOQ,
        Framing::Doq,
        requests,
        Duration::from_secs(8),
    );
    match outcome {
        Ok(outcome) => outcome.replies,
        Err(e) => vec![Reply::Failed(e.to_string())],
    }
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

/// A stand-in for the host's resolver on `[::1]` (UDP and TCP on one
/// port), counting what it is asked:
/// - `www.example.org` AAAA: `2001:db8::1` (TTL 300), with an A record the
///   server must remove;
/// - `big.example.org` AAAA: over UDP an empty, truncated answer; over TCP
///   40 addresses;
/// - `silent.example.org`: never answered;
/// - anything else: NXDOMAIN with an SOA;
/// - over UDP, a question without EDNS offering at least 1232 bytes:
///   REFUSED (the resolver must offer it).
struct Upstream {
    addr: std::net::SocketAddr,
    udp_asked: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tcp_asked: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Upstream {
    fn start() -> Upstream {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let udp = std::net::UdpSocket::bind("[::1]:0").unwrap();
        let addr = udp.local_addr().unwrap();
        let tcp = std::net::TcpListener::bind(addr).unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        tcp.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (udp_asked, tcp_asked) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (s, asked) = (stop.clone(), udp_asked.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, from)) = udp.recv_from(&mut buf) else {
                    continue;
                };
                asked.fetch_add(1, Ordering::Relaxed);
                if let Some(answer) = upstream_answer(&buf[..n], false) {
                    udp.send_to(&answer, from).unwrap();
                }
            }
        });
        let (s, asked) = (stop.clone(), tcp_asked.clone());
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            while !s.load(Ordering::Relaxed) {
                let Ok((mut stream, _)) = tcp.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                asked.fetch_add(1, Ordering::Relaxed);
                stream.set_nonblocking(false).unwrap();
                let mut len = [0u8; 2];
                stream.read_exact(&mut len).unwrap();
                let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
                stream.read_exact(&mut query).unwrap();
                if let Some(answer) = upstream_answer(&query, true) {
                    stream
                        .write_all(&(answer.len() as u16).to_be_bytes())
                        .unwrap();
                    stream.write_all(&answer).unwrap();
                }
            }
        });
        Upstream {
            addr,
            udp_asked,
            tcp_asked,
            stop,
        }
    }

    fn asked(&self) -> (usize, usize) {
        use std::sync::atomic::Ordering;
        (
            self.udp_asked.load(Ordering::Relaxed),
            self.tcp_asked.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn upstream_answer(query: &[u8], tcp: bool) -> Option<Vec<u8>> {
    use hickory_proto::rr::rdata::{A, AAAA, SOA};
    use hickory_proto::rr::{RData, Record};
    let query = Message::from_vec(query).ok()?;
    let question = query.queries.first()?.clone();
    let name = question.name().to_lowercase().to_ascii();
    let mut answer = Message::response(query.metadata.id, OpCode::Query);
    answer.queries.push(question.clone());
    answer.metadata.recursion_available = true;
    let owner = question.name().clone();
    if !tcp && query.edns.as_ref().is_none_or(|e| e.max_payload() < 1232) {
        answer.metadata.response_code = ResponseCode::Refused;
        return answer.to_vec().ok();
    }
    match (name.as_str(), question.query_type()) {
        ("silent.example.org.", _) => return None,
        ("www.example.org.", RecordType::AAAA) => {
            answer.answers.push(Record::from_rdata(
                owner.clone(),
                300,
                RData::AAAA(AAAA("2001:db8::1".parse().unwrap())),
            ));
            answer.answers.push(Record::from_rdata(
                owner,
                300,
                RData::A(A("192.0.2.1".parse().unwrap())),
            ));
        }
        ("big.example.org." | "huge.example.org.", RecordType::AAAA) if !tcp => {
            answer.metadata.truncation = true
        }
        ("huge.example.org.", RecordType::AAAA) => {
            // 28 to 44 KB (with or without name compression): a large
            // answer, but whole over TCP.
            for i in 1..=1000u16 {
                let ip = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 1, i);
                answer
                    .answers
                    .push(Record::from_rdata(owner.clone(), 60, RData::AAAA(AAAA(ip))));
            }
        }
        ("big.example.org.", RecordType::AAAA) => {
            for i in 1..=40u16 {
                let ip = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i);
                answer
                    .answers
                    .push(Record::from_rdata(owner.clone(), 60, RData::AAAA(AAAA(ip))));
            }
        }
        _ => {
            answer.metadata.response_code = ResponseCode::NXDomain;
            let apex = Name::from_ascii("example.org.").unwrap();
            let soa = SOA::new(apex.clone(), apex.clone(), 1, 3600, 600, 86400, 60);
            answer
                .authorities
                .push(Record::from_rdata(apex, 60, RData::SOA(soa)));
        }
    }
    answer.to_vec().ok()
}

fn parsed(reply: &Reply) -> Message {
    match reply {
        Reply::Ok(bytes) => Message::from_vec(bytes).unwrap(),
        other => panic!("no answer: {other:?}"),
    }
}

fn aaaa_answers(message: &Message) -> Vec<String> {
    message
        .answers
        .iter()
        .map(|r| format!("{}/{}", r.record_type(), r.data))
        .collect()
}

#[test]
fn phase0_asks_the_system_resolver_for_names_outside_the_zone() {
    let upstream = Upstream::start();
    // Production defaults, with the migration aid switched on.
    let server = Server::start_production(
        "dns-forward",
        &format!(
            "[trustchain_authority]\noutside_zone = \"system-resolver\"\nupstream_resolvers = [\"{}\"]\n",
            upstream.addr
        ),
    );
    let out = |name: &str, kind: RecordType| query(name, kind, DNSClass::IN, 0);

    // The answer, without its A record, not authoritative, recursion on.
    let answer = parsed(&doq(&server, vec![out("www.example.org.", RecordType::AAAA)])[0]);
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert_eq!(aaaa_answers(&answer), vec!["AAAA/2001:db8::1"]);
    assert!(!answer.metadata.authoritative && answer.metadata.recursion_available);
    assert_eq!(answer.metadata.id, 0);
    assert_eq!(upstream.asked(), (1, 0));

    // Asked again (another case): from the cache, its TTL counting down.
    let again = parsed(&doq(&server, vec![out("WWW.example.ORG.", RecordType::AAAA)])[0]);
    assert_eq!(aaaa_answers(&again), vec!["AAAA/2001:db8::1"]);
    assert!(again.answers[0].ttl <= 300);
    assert_eq!(
        again.queries[0].name().to_ascii(),
        "WWW.example.ORG.",
        "the question as asked"
    );
    assert_eq!(upstream.asked(), (1, 0));

    // IPv6 only: A is an empty NOERROR, not asked upstream; ANY is refused.
    let replies = doq(
        &server,
        vec![
            out("www.example.org.", RecordType::A),
            out("www.example.org.", RecordType::ANY),
        ],
    );
    let a = parsed(&replies[0]);
    assert_eq!(
        (a.metadata.response_code, a.answers.len()),
        (ResponseCode::NoError, 0)
    );
    assert_eq!(rcode(&replies[1]), ResponseCode::Refused);
    assert_eq!(upstream.asked(), (1, 0));

    // NXDOMAIN passes with its SOA; a truncated UDP answer is asked over TCP.
    let replies = doq(
        &server,
        vec![
            out("nope.example.org.", RecordType::AAAA),
            out("big.example.org.", RecordType::AAAA),
        ],
    );
    let nx = parsed(&replies[0]);
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(nx.authorities.len(), 1);
    assert_eq!(parsed(&replies[1]).answers.len(), 40);
    assert_eq!(upstream.asked(), (3, 1));

    // A silent upstream: SERVFAIL after the timeout, while the zone's own
    // names on the same connection are answered, authoritatively, at once.
    let replies = doq(
        &server,
        vec![
            out("silent.example.org.", RecordType::AAAA),
            out("node1.internet2.test.", RecordType::AAAA),
        ],
    );
    assert_eq!(rcode(&replies[0]), ResponseCode::ServFail);
    let own = parsed(&replies[1]);
    assert!(own.metadata.authoritative);
    assert_eq!(aaaa_answers(&own), vec!["AAAA/::1"]);
    assert_eq!(upstream.asked(), (4, 1));
    // The failure is remembered for a moment (RFC 9520): not asked again.
    // The host's own names (single labels, .local, private reverse zones)
    // are refused without asking.
    let replies = doq(
        &server,
        vec![
            out("silent.example.org.", RecordType::AAAA),
            out("gateway.", RecordType::AAAA),
            out("printer.local.", RecordType::AAAA),
            out("1.0.0.10.in-addr.arpa.", RecordType::PTR),
        ],
    );
    assert_eq!(rcode(&replies[0]), ResponseCode::ServFail);
    for refused in &replies[1..] {
        assert_eq!(rcode(refused), ResponseCode::Refused);
    }
    assert_eq!(upstream.asked(), (4, 1));
    assert!(server.stats()["total"]["doq_forwarded"].as_u64().unwrap() >= 4);

    // An independent DoQ client (dnspython) gets the same answer.
    match interop_python() {
        Some(python) => {
            let out = interop_peer(&python, "doq_query.py", &server)
                .args(["www.example.org", "AAAA"])
                .output()
                .unwrap();
            let json: serde_json::Value = serde_json::from_str(ok(&out).trim()).unwrap();
            assert_eq!(json["rcode"], "NOERROR", "{json}");
            assert_eq!(
                json["answers"],
                serde_json::json!(["2001:db8::1"]),
                "{json}"
            );
            assert_eq!(json["aa"], false, "{json}");
        }
        None => skip_or_fail("dnspython is not installed: run `bash .ci/setup-interop.sh`"),
    }
}

/// A DoQ peer that asks for large answers and never reads them (an
/// independent client, aioquic, granting 64 bytes per stream and never
/// more) is closed with DOQ_EXCESSIVE_LOAD once its unread answers pass
/// `UNREAD_ANSWER_BYTES_MAX`, and everyone else is served on.
#[test]
fn a_doq_peer_that_never_reads_its_answers_is_closed() {
    let Some(python) = interop_python() else {
        return skip_or_fail("aioquic is not installed: run `bash .ci/setup-interop.sh`");
    };
    let upstream = Upstream::start();
    let server = Server::start_production(
        "dns-unread",
        &format!(
            "[trustchain_authority]\noutside_zone = \"system-resolver\"\nupstream_resolvers = [\"{}\"]\n",
            upstream.addr
        ),
    );
    let out = interop_peer(&python, "stoq_peer.py", &server)
        .args([
            "--timeout",
            "60",
            "doq-unread",
            "--query-name",
            "huge.example.org",
        ])
        .args(["--queries", "40", "--every", "0.05"])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_str(ok(&out).trim())
        .unwrap_or_else(|e| panic!("stoq_peer prints one JSON line ({e}): {}", ok(&out)));
    assert_eq!(json["connected"], true, "{json}");
    assert_eq!(
        json["closed"]["error_code"],
        dataplane::protocols::doq::DOQ_EXCESSIVE_LOAD,
        "{json}"
    );
    assert_eq!(json["closed"]["application"], true, "{json}");
    assert!(
        json["received_bytes"].as_u64().unwrap() < 4096,
        "the peer read almost nothing: {json}"
    );
    let answer = parsed(
        &doq(
            &server,
            vec![query(
                "huge.example.org.",
                RecordType::AAAA,
                DNSClass::IN,
                0,
            )],
        )[0],
    );
    assert_eq!(
        answer.answers.len(),
        1000,
        "an honest reader gets the whole answer"
    );
}

#[test]
fn phase0_migration_aids_are_refused_where_they_do_not_belong() {
    let dir = temp_dir("dns-phase0-refused");
    let run = |config: &str, args: &[&str]| {
        std::fs::write(
            dir.join("server.toml"),
            format!(
                "[internet2]\nbind = \"::1\"\nport = {}\n{config}",
                free_port()
            ),
        )
        .unwrap();
        let out = std::process::Command::new(SERVER)
            .args(args)
            .arg("--config")
            .arg(dir.join("server.toml"))
            .arg("--data-dir")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(!out.status.success(), "started with {config}");
        stderr(&out)
    };
    let forward = "[trustchain_authority]\noutside_zone = \"system-resolver\"\nupstream_resolvers = [\"[::1]:53\"]\n";
    let why = run(forward, &["--bootstrap", "federated", "--cluster-init"]);
    assert!(why.contains("phase0"), "{why}");
    let why = run(
        "[trustchain_authority]\nupstream_resolvers = [\"[::1]:53\"]\n",
        &[],
    );
    assert!(
        why.contains("upstream_resolvers") && why.contains("system-resolver"),
        "{why}"
    );
    let why = run(
        "[trustchain_authority]\noutside_zone = \"system-resolver\"\nupstream_resolvers = [\"nowhere\"]\n",
        &[],
    );
    assert!(why.contains("not an address"), "{why}");
    let why = run(
        "[trustchain_authority]\nimport_certificate = \"/x.pem\"\n",
        &[],
    );
    assert!(why.contains("needs import_key"), "{why}");
    let why = run(
        "[trustchain_authority]\nimport_certificate = \"/nonexistent/x.pem\"\nimport_key = \"/nonexistent/k.pem\"\n",
        &[],
    );
    assert!(
        why.contains("cannot import the certificate") && why.contains("/nonexistent/x.pem"),
        "{why}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A public CA (a stand-in for one clients trust already) and certificates
/// it issues.
struct PublicCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl PublicCa {
    fn new() -> PublicCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Public Test Root");
        PublicCa {
            cert: params.self_signed(&key).unwrap(),
            key,
        }
    }

    /// Write a chain (leaf, root) and key for `names` to `dir`.
    fn issue(
        &self,
        dir: &std::path::Path,
        names: &[&str],
    ) -> (std::path::PathBuf, std::path::PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let (chain, key_path) = (dir.join("fullchain.pem"), dir.join("privkey.pem"));
        std::fs::write(&chain, cert.pem() + &self.cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (chain, key_path)
    }

    fn root(&self) -> rustls::pki_types::CertificateDer<'static> {
        self.cert.der().clone()
    }
}

#[test]
fn phase0_serves_an_imported_certificate_for_its_public_names() {
    let public = PublicCa::new();
    let files = temp_dir("dns-import-files");
    let (chain, key) = public.issue(&files, &["www.example.org", "*.pub.example.org"]);
    let server = Server::start_production(
        "dns-import",
        &format!(
            "[trustchain_authority]\nimport_certificate = \"{}\"\nimport_key = \"{}\"\n",
            chain.display(),
            key.display()
        ),
    );
    let own = query("node1.internet2.test.", RecordType::AAAA, DNSClass::IN, 0);
    // A client that trusts only the public root, asking for `name`.
    let public_client = |name: &str| dataplane::client::ClientTarget {
        server_name: name.into(),
        trust: dataplane::ServerTrust::Roots(vec![public.root()]),
        ..target(&server)
    };
    for name in ["www.example.org", "a.pub.example.org", "WWW.EXAMPLE.ORG"] {
        let replies = doq_to(&public_client(name), vec![own.clone()]);
        assert_eq!(rcode(&replies[0]), ResponseCode::NoError, "{name}");
    }
    // Names the certificate does not cover get the embedded CA's
    // certificate, which the public root does not vouch for.
    for name in [
        "pub.example.org",
        "a.b.pub.example.org",
        "example.org",
        "localhost",
    ] {
        let replies = doq_to(&public_client(name), vec![own.clone()]);
        assert!(
            matches!(&replies[0], Reply::Failed(_)),
            "{name}: {:?}",
            replies[0]
        );
    }
    // Clients of the embedded CA see no change.
    good_query_works(&server);

    // An independent client (dnspython) trusting only the public root.
    match interop_python() {
        Some(python) => {
            std::fs::write(files.join("root.pem"), public.cert.pem()).unwrap();
            let out = interop_peer(&python, "doq_query.py", &server)
                .arg("--cafile")
                .arg(files.join("root.pem"))
                .args([
                    "--server-name",
                    "www.example.org",
                    "node1.internet2.test",
                    "AAAA",
                ])
                .output()
                .unwrap();
            let json: serde_json::Value = serde_json::from_str(ok(&out).trim()).unwrap();
            assert_eq!(json["rcode"], "NOERROR", "{json}");
        }
        None => skip_or_fail("dnspython is not installed: run `bash .ci/setup-interop.sh`"),
    }

    // Renewed in place (certbot's way) and SIGHUP: the new certificate.
    let _ = server.log(); // what was logged so far
    public.issue(&files, &["www2.example.org"]);
    signal(server.pid(), "HUP");
    server.wait_for_log("imported certificate served", Duration::from_secs(10));
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || match &doq_to(&public_client("www2.example.org"), vec![own.clone()])[0] {
            Reply::Ok(_) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    assert!(matches!(
        &doq_to(&public_client("www.example.org"), vec![own.clone()])[0],
        Reply::Failed(_)
    ));

    // A broken renewal is refused and the served certificate stays.
    std::fs::write(&key, "not a key").unwrap();
    signal(server.pid(), "HUP");
    server.wait_for_log("was not replaced", Duration::from_secs(10));
    let replies = doq_to(&public_client("www2.example.org"), vec![own.clone()]);
    assert_eq!(rcode(&replies[0]), ResponseCode::NoError);
    let _ = std::fs::remove_dir_all(&files);
}

#[test]
fn phase0_with_an_external_ca_serves_its_certificate_for_every_name_but_its_own() {
    let public = PublicCa::new();
    let files = temp_dir("dns-external-ca-files");
    let (chain, key) = public.issue(&files, &["www.example.org"]);
    let server = Server::start_production(
        "dns-external-ca",
        &format!(
            "[trustchain_authority]\nca_mode = \"external\"\nimport_certificate = \"{}\"\nimport_key = \"{}\"\n",
            chain.display(),
            key.display()
        ),
    );
    let own = query("node1.internet2.test.", RecordType::AAAA, DNSClass::IN, 0);
    let trusting = |root: rustls::pki_types::CertificateDer<'static>, name: &str| {
        dataplane::client::ClientTarget {
            server_name: name.into(),
            trust: dataplane::ServerTrust::Roots(vec![root]),
            ..target(&server)
        }
    };
    let replies = doq_to(
        &trusting(public.root(), "www.example.org"),
        vec![own.clone()],
    );
    assert_eq!(rcode(&replies[0]), ResponseCode::NoError);
    // A name no certificate carries gets the external one too: the client
    // that trusts the external root refuses it for its name, not its issuer.
    match &doq_to(
        &trusting(public.root(), "mail.example.net"),
        vec![own.clone()],
    )[0]
    {
        Reply::Failed(why) => assert!(why.contains("not valid for name"), "{why}"),
        other => panic!("{other:?}"),
    }
    // The server's own names keep the embedded certificate: the operator,
    // enrollment and the CLI still reach it.
    let embedded = controlplane::authority::pem::load_cert(&server.ca()).unwrap();
    for name in ["localhost", "node1.internet2.test"] {
        let replies = doq_to(&trusting(embedded.clone(), name), vec![own.clone()]);
        assert_eq!(rcode(&replies[0]), ResponseCode::NoError, "{name}");
    }
    // A client that names no server (an address: rustls sends no SNI) gets
    // the embedded certificate too: checked against the embedded root, it
    // is refused at most for its names, never for its issuer.
    match &doq_to(&trusting(embedded.clone(), "::1"), vec![own.clone()])[0] {
        Reply::Failed(why) => assert!(why.contains("not valid for name"), "{why}"),
        reply => assert_eq!(rcode(reply), ResponseCode::NoError),
    }
    let out = server.admin(&["blocklist", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&files);
}
