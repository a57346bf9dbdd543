//! What the harness's clients send and what the honest one expects back.

use super::{DNS_ADDRESS, DNS_NAME, GOOD_BUNDLE};
use crate::admission::{KIND_ADMISSION_PARAMS, KIND_ADMISSION_SUBMIT, KIND_PLOT_REGISTER};
use crate::protocols::{Alpn, perf, stoq};
use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RData, RecordType};

/// Size of the honest `perf` response.
const HONEST_PERF_BYTES: u64 = 10_000;
const HONEST_PING: &[u8] = b"honest";

/// A DNS query message with a 2-byte length prefix (RFC 9250 §4.2).
fn dns_query(name: &str, kind: RecordType, id: u16) -> Vec<u8> {
    let mut query = Message::new(id, MessageType::Query, OpCode::Query);
    query.queries.push(Query::query(
        Name::from_ascii(name).expect("harness names are valid"),
        kind,
    ));
    let message = query.to_vec().expect("a one-question query encodes");
    let mut framed = (message.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&message);
    framed
}

/// A perf request: the response size, then a short upload of the pattern.
fn perf_request(response_len: u64, upload: usize) -> Vec<u8> {
    let mut out = response_len.to_be_bytes().to_vec();
    out.extend_from_slice(&perf::pattern_chunk(0, upload));
    out
}

/// The message `Op::Request` writes: for each protocol, well-formed
/// requests of every kind the server treats differently and a few
/// malformed ones.
pub(super) fn request_bytes(alpn: Alpn, variant: u8) -> Vec<u8> {
    match alpn {
        Alpn::Stoq => {
            let kind_of = |n: u8| 0x10 + n % 0x30;
            match variant % 12 {
                0 => stoq::encode(stoq::Kind::Ping as u8, b"hostile").to_vec(),
                1 => stoq::encode(stoq::Kind::Stats as u8, b"").to_vec(),
                2 => stoq::encode(0x7e, b"unknown kind").to_vec(),
                3 => stoq::encode(kind_of(variant / 12), &[variant; 40]).to_vec(),
                4 => stoq::encode(stoq::KIND_ENROLL, b"enroll me").to_vec(),
                5 => stoq::encode(KIND_ADMISSION_PARAMS, b"").to_vec(),
                6 => stoq::encode(KIND_ADMISSION_SUBMIT, GOOD_BUNDLE).to_vec(),
                7 => stoq::encode(KIND_ADMISSION_SUBMIT, b"forged bundle").to_vec(),
                8 => stoq::encode(KIND_PLOT_REGISTER, &[1; 64]).to_vec(),
                9 => {
                    stoq::encode(stoq::Kind::Ping as u8, &[0; stoq::PING_PAYLOAD_MAX + 1]).to_vec()
                }
                10 => {
                    // A header announcing more than the server accepts.
                    let mut header = stoq::encode(stoq::Kind::Ping as u8, b"").to_vec();
                    header[4..8]
                        .copy_from_slice(&(stoq::REQUEST_PAYLOAD_MAX as u32 + 1).to_be_bytes());
                    header
                }
                _ => {
                    let mut bad = stoq::encode(stoq::Kind::Ping as u8, b"v9").to_vec();
                    bad[0] = 9;
                    bad
                }
            }
        }
        Alpn::Doq => match variant % 6 {
            0 => dns_query(DNS_NAME, RecordType::AAAA, 0),
            1 => dns_query("_4433._udp.node1.internet2.test.", RecordType::TLSA, 0),
            2 => dns_query("nowhere.internet2.test.", RecordType::AAAA, 0),
            // RFC 9250 §4.2.1: a non-zero ID closes the connection.
            3 => dns_query(DNS_NAME, RecordType::AAAA, 7),
            4 => vec![0, 5, 1, 2, 3, 4, 5],
            // A length prefix past what follows.
            _ => vec![1, 44, 0, 0, 1, 0],
        },
        Alpn::Perf => {
            let sizes = [0, 1, 1000, 100_000, u64::MAX];
            perf_request(sizes[usize::from(variant) % sizes.len()], 100)
        }
    }
}

pub(super) fn honest_request(alpn: Alpn) -> Vec<u8> {
    match alpn {
        Alpn::Stoq => stoq::encode(stoq::Kind::Ping as u8, HONEST_PING).to_vec(),
        Alpn::Doq => dns_query(DNS_NAME, RecordType::AAAA, 0),
        Alpn::Perf => perf_request(HONEST_PERF_BYTES, 1000),
    }
}

/// Whether an honest response is the right answer.
pub(super) fn check_honest_response(alpn: Alpn, bytes: &[u8], len: u64) -> Result<(), String> {
    match alpn {
        Alpn::Stoq => {
            let message = stoq::decode(bytes, stoq::RESPONSE_PAYLOAD_MAX)
                .map_err(|e| format!("the response does not decode: {e}"))?;
            let expected = [
                stoq::Kind::Ping as u8 | stoq::RESPONSE_FLAG,
                KIND_ADMISSION_SUBMIT | stoq::RESPONSE_FLAG,
            ];
            if !expected.contains(&message.kind) {
                let (code, text) = stoq::decode_error_payload(&message.payload);
                return Err(format!("kind {:#04x} (error {code}: {text})", message.kind));
            }
            if message.kind == expected[0] && message.payload != HONEST_PING {
                return Err("the ping came back changed".into());
            }
            Ok(())
        }
        Alpn::Doq => {
            let [hi, lo, message @ ..] = bytes else {
                return Err("shorter than the length prefix".into());
            };
            if usize::from(u16::from_be_bytes([*hi, *lo])) != message.len() {
                return Err("the length prefix does not match".into());
            }
            let message = Message::from_vec(message).map_err(|e| e.to_string())?;
            match message.answers.as_slice() {
                [record] if record.data == RData::AAAA(DNS_ADDRESS.into()) => Ok(()),
                other => Err(format!("answers {other:?}")),
            }
        }
        Alpn::Perf => {
            if len != HONEST_PERF_BYTES || !perf::matches_pattern(0, bytes) {
                return Err(format!(
                    "{len} bytes, not {HONEST_PERF_BYTES} of the pattern"
                ));
            }
            Ok(())
        }
    }
}
