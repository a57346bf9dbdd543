//! The harness on stable, in every test run: seeded random sequences over
//! every ALPN (a property test), the regression cases by name, and the
//! generator of the fuzz target's seed corpus.

use super::*;
use crate::test_support::XorShift;

/// Random sequences per run (each ends with the honest and drain checks).
const SEQUENCES: u64 = 300;

fn connect(alpn: Alpn, with_cert: bool) -> Op {
    Op::Connect {
        alpn,
        with_cert,
        zero_rtt: false,
    }
}

const SETTLE: Op = Op::Deliver { n: 0 };

fn sequence(admission: bool, ops: Vec<Op>) -> Sequence {
    Sequence {
        settings: Settings { admission },
        ops,
    }
}

/// Named inputs: the regression cases, and one short exercise of each
/// protocol. They seed the fuzz corpus and run as tests of their own.
fn named_seeds() -> Vec<(&'static str, Sequence)> {
    vec![
        (
            // Once panicked the worker: "index out of bounds: the len is 0
            // but the index is 1" (an empty request with FIN).
            "stoq_anonymous_empty_fin",
            sequence(
                false,
                vec![
                    connect(Alpn::Stoq, false),
                    Op::OpenStream { conn: 0 },
                    Op::Finish { conn: 0, stream: 0 },
                    SETTLE,
                ],
            ),
        ),
        (
            "stoq_truncated_header_fin",
            sequence(
                false,
                vec![
                    connect(Alpn::Stoq, true),
                    Op::OpenStream { conn: 0 },
                    Op::Write {
                        conn: 0,
                        stream: 0,
                        len: 5,
                        byte: stoq::VERSION,
                    },
                    Op::Finish { conn: 0, stream: 0 },
                    SETTLE,
                ],
            ),
        ),
        (
            "stoq_reset_after_partial_data",
            sequence(false, reset_after_partial(Alpn::Stoq)),
        ),
        (
            "doq_reset_after_partial_data",
            sequence(false, reset_after_partial(Alpn::Doq)),
        ),
        (
            "perf_reset_after_partial_data",
            sequence(false, reset_after_partial(Alpn::Perf)),
        ),
        (
            // The authority's answer arrives after the client stopped the
            // stream it was for.
            "stoq_stop_sending_pending_answer",
            sequence(
                false,
                vec![
                    connect(Alpn::Stoq, true),
                    Op::OpenStream { conn: 0 },
                    Op::Request {
                        conn: 0,
                        stream: 0,
                        variant: 0x80 | 3,
                    },
                    SETTLE,
                    Op::StopSending {
                        conn: 0,
                        stream: 0,
                        code: 9,
                    },
                    SETTLE,
                    Op::Authority,
                    SETTLE,
                ],
            ),
        ),
        (
            // A response backed up against a client that stopped reading,
            // then stopped.
            "perf_stop_sending_unsent_response",
            sequence(
                false,
                vec![
                    connect(Alpn::Perf, true),
                    Op::ToggleReading { conn: 0 },
                    Op::OpenStream { conn: 0 },
                    Op::Request {
                        conn: 0,
                        stream: 0,
                        variant: 0x80 | 4,
                    },
                    SETTLE,
                    Op::StopSending {
                        conn: 0,
                        stream: 0,
                        code: 1,
                    },
                    SETTLE,
                    Op::AdvanceTime { ms: 1000 },
                    SETTLE,
                ],
            ),
        ),
        (
            "doq_partial_query_past_idle_deadline",
            sequence(
                false,
                vec![
                    connect(Alpn::Doq, false),
                    Op::OpenStream { conn: 0 },
                    Op::Write {
                        conn: 0,
                        stream: 0,
                        len: 1,
                        byte: 0,
                    },
                    SETTLE,
                    Op::AdvanceTime { ms: 11_000 },
                    SETTLE,
                ],
            ),
        ),
        (
            // Requests in 0-RTT data of a resumed session, some datagrams
            // lost and reordered on the way.
            "stoq_zero_rtt_lossy",
            sequence(
                true,
                vec![
                    connect(Alpn::Stoq, true),
                    Op::CloseConnection { conn: 0, code: 0 },
                    SETTLE,
                    Op::Connect {
                        alpn: Alpn::Stoq,
                        with_cert: true,
                        zero_rtt: true,
                    },
                    Op::OpenStream { conn: 0 },
                    Op::Request {
                        conn: 0,
                        stream: 0,
                        variant: 0x80,
                    },
                    Op::OpenStream { conn: 0 },
                    Op::Request {
                        conn: 0,
                        stream: 0,
                        variant: 0x80 | 6,
                    },
                    Op::Reorder {
                        to_server: true,
                        depth: 0,
                    },
                    Op::DropNext { to_server: true },
                    Op::Deliver { n: 2 },
                    Op::Duplicate { to_server: false },
                    SETTLE,
                    Op::AdvanceTime { ms: 300 },
                    SETTLE,
                ],
            ),
        ),
        (
            "doq_every_query",
            sequence(false, every_request(connect(Alpn::Doq, false), 6)),
        ),
        (
            "stoq_admission_every_request",
            sequence(true, {
                let mut ops = every_request(connect(Alpn::Stoq, true), 12);
                ops.extend([Op::Authority, SETTLE, Op::AdvanceTime { ms: 6000 }, SETTLE]);
                ops
            }),
        ),
        (
            "perf_without_certificate",
            sequence(
                false,
                vec![
                    connect(Alpn::Perf, false),
                    Op::OpenStream { conn: 0 },
                    Op::Request {
                        conn: 0,
                        stream: 0,
                        variant: 0x80 | 2,
                    },
                    SETTLE,
                ],
            ),
        ),
    ]
}

/// After `connect`, each of the first `variants` requests of its protocol
/// on a stream of its own, finished and delivered.
fn every_request(connect: Op, variants: u8) -> Vec<Op> {
    let mut ops = vec![connect];
    for variant in 0..variants {
        ops.extend([
            Op::OpenStream { conn: 0 },
            Op::Request {
                conn: 0,
                stream: 0,
                variant: 0x80 | variant,
            },
            SETTLE,
        ]);
    }
    ops
}

/// Open a stream, send part of a request, let it arrive, reset the stream.
fn reset_after_partial(alpn: Alpn) -> Vec<Op> {
    vec![
        connect(alpn, true),
        Op::OpenStream { conn: 0 },
        Op::Write {
            conn: 0,
            stream: 0,
            len: 5,
            byte: 1,
        },
        SETTLE,
        Op::Reset {
            conn: 0,
            stream: 0,
            code: 7,
        },
        SETTLE,
    ]
}

fn seed(name: &str) -> Sequence {
    named_seeds()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| s)
        .unwrap_or_else(|| panic!("no seed {name}"))
}

/// Run through the byte decoder (the fuzz target's path).
fn run_bytes(sequence: &Sequence) -> Counters {
    let bytes = sequence.encode();
    assert_eq!(&Sequence::decode(&bytes), sequence, "the seed round-trips");
    match run(&bytes) {
        Ok(counters) => counters,
        Err(violation) => panic!("{violation}\nsequence: {sequence:#?}"),
    }
}

#[test]
fn an_empty_sequence_passes_the_honest_and_drain_checks() {
    for admission in [false, true] {
        let counters = run_bytes(&sequence(admission, Vec::new()));
        assert!(counters.handshakes >= 3, "{counters:?}");
        assert_eq!(counters.connections, 0);
        assert_eq!(counters.doq_queries, 1);
        assert_eq!(counters.perf_streams, 1);
    }
}

#[test]
fn anonymous_stoq_stream_finished_empty_gets_an_error_not_a_panic() {
    let counters = run_bytes(&seed("stoq_anonymous_empty_fin"));
    assert_eq!(counters.connection_panics, 0);
    assert_eq!(counters.stoq_errors, 1, "answered MALFORMED");
}

#[test]
fn truncated_stoq_header_then_fin_is_answered_malformed() {
    let counters = run_bytes(&seed("stoq_truncated_header_fin"));
    assert_eq!(counters.stoq_errors, 1);
}

#[test]
fn reset_after_partial_data_is_forgotten_on_every_alpn() {
    for name in [
        "stoq_reset_after_partial_data",
        "doq_reset_after_partial_data",
        "perf_reset_after_partial_data",
    ] {
        let counters = run_bytes(&seed(name));
        assert_eq!(counters.stoq_errors + counters.doq_errors, 0, "{name}");
    }
}

#[test]
fn stop_sending_on_a_pending_answer() {
    run_bytes(&seed("stoq_stop_sending_pending_answer"));
    let counters = run_bytes(&seed("perf_stop_sending_unsent_response"));
    assert_eq!(
        counters.perf_streams, 2,
        "the hostile stream and the honest one"
    );
}

#[test]
fn doq_query_without_fin_is_closed_at_the_idle_deadline() {
    let counters = run_bytes(&seed("doq_partial_query_past_idle_deadline"));
    assert_eq!(counters.doq_idle_closed, 1);
}

/// The one connection the input's ops made, which must still be open.
fn live_input_connection(harness: &Harness) -> &client::ClientConn {
    let c = harness
        .client
        .conns
        .iter()
        .find(|c| !c.honest)
        .expect("the connection");
    assert!(!c.lost, "{:?}: {:?}", c.alpn, c.lost_reason);
    c
}

/// The server builds the keys of each 1-RTT key phase lazily, deriving
/// every phase from the last (`server_tls::NextPhase`): after each of
/// several client key updates, a request on the same connection is still
/// answered, on every ALPN.
#[test]
fn requests_are_answered_across_repeated_key_updates() {
    const UPDATES: usize = 4;
    for (alpn, variant) in [(Alpn::Stoq, 0), (Alpn::Doq, 0), (Alpn::Perf, 2)] {
        let mut harness = Harness::new(Settings::default());
        let mut apply = |op| {
            harness
                .apply(op)
                .unwrap_or_else(|v| panic!("{alpn:?} {op:?}: {v}"))
        };
        apply(connect(alpn, true));
        for _ in 0..UPDATES {
            apply(Op::KeyUpdate { conn: 0 });
            apply(Op::OpenStream { conn: 0 });
            apply(Op::Request {
                conn: 0,
                stream: 0,
                variant: 0x80 | variant,
            });
            apply(SETTLE);
            // Past three PTOs, so quinn-proto drops the old keys and takes
            // the next forced update.
            apply(Op::AdvanceTime { ms: 1000 });
            apply(SETTLE);
        }
        let c = live_input_connection(&harness);
        assert_eq!(c.streams.len(), UPDATES);
        for id in &c.streams {
            let received = c.received.get(id);
            assert!(
                received.is_some_and(|r| r.fin && r.len > 0),
                "{alpn:?} stream {id}: no whole answer after a key update"
            );
        }
        harness.check().unwrap();
    }
}

/// An untrusted connection starts with `INITIAL_STREAMS_BIDI` streams and
/// is granted more as it holds them open, never past its bound however
/// long it keeps asking: `DOQ_STREAMS_BIDI_MAX` for doq,
/// `UNTRUSTED_STREAMS_BIDI_MAX` for stoq/1 before admission (here without
/// a certificate, so only enrollment).
#[test]
fn an_untrusted_connections_streams_grow_to_its_bound_and_stop() {
    use crate::transport::{
        DOQ_STREAMS_BIDI_MAX, INITIAL_STREAMS_BIDI, UNTRUSTED_STREAMS_BIDI_MAX,
    };
    for (alpn, bound) in [
        (Alpn::Doq, DOQ_STREAMS_BIDI_MAX),
        (Alpn::Stoq, UNTRUSTED_STREAMS_BIDI_MAX),
    ] {
        let mut harness = Harness::new(Settings::default());
        let mut apply = |op| harness.apply(op).unwrap_or_else(|v| panic!("{op:?}: {v}"));
        apply(connect(alpn, false));
        for _ in 0..8 {
            for _ in 0..bound * 2 {
                apply(Op::OpenStream { conn: 0 });
                // A first byte and nothing more: a doq query announcing
                // 65 535 bytes, an unfinished stoq/1 header. Either keeps
                // the stream open.
                apply(Op::Write {
                    conn: 0,
                    stream: 0,
                    len: 1,
                    byte: 0xff,
                });
            }
            apply(SETTLE);
        }
        let c = live_input_connection(&harness);
        let opened = c.streams.len();
        assert!(
            opened > INITIAL_STREAMS_BIDI as usize,
            "{alpn:?}: the limit grew with use: {opened} streams"
        );
        assert_eq!(
            opened, bound as usize,
            "{alpn:?}: an untrusted peer never gets more"
        );
    }
}

#[test]
fn the_committed_corpus_holds_every_named_seed() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/stream_events");
    for (name, sequence) in named_seeds() {
        let committed = std::fs::read(dir.join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}; run write_seed_corpus"));
        assert_eq!(
            committed,
            sequence.encode(),
            "{name} changed; run write_seed_corpus"
        );
    }
}

#[test]
fn every_named_seed_passes() {
    for (name, sequence) in named_seeds() {
        let bytes = sequence.encode();
        if let Err(violation) = run(&bytes) {
            panic!("{name}: {violation}");
        }
    }
}

/// One random op, weighted towards what makes progress (requests and
/// deliveries) over what only disturbs it.
fn random_op(rng: &mut XorShift, main: Alpn) -> Op {
    let r = rng.next();
    let byte = |shift: u32| (r >> shift) as u8;
    // Mostly the newest connection and stream (operand 0), so requests,
    // FINs and resets tend to land on the same stream.
    let newest_mostly = |b: u8| if b < 160 { 0 } else { b % 4 };
    let conn = newest_mostly(byte(8));
    let stream = newest_mostly(byte(16));
    let to_server = byte(24) & 1 == 1;
    match r % 100 {
        // Mostly the sequence's protocol with a certificate, so a session
        // to resume (and send 0-RTT data on) is often there.
        0..=6 => Op::Connect {
            alpn: match byte(8) % 6 {
                0 => Alpn::Stoq,
                1 => Alpn::Doq,
                2 => Alpn::Perf,
                _ => main,
            },
            with_cert: byte(16) % 4 != 0,
            zero_rtt: byte(24) % 2 == 0,
        },
        7..=15 => Op::OpenStream { conn },
        16..=24 => Op::Write {
            conn,
            stream,
            len: [1, 5, 8, 100, 1500, 6000][usize::from(byte(32)) % 6],
            byte: byte(40),
        },
        25..=39 => Op::Request {
            conn,
            stream,
            variant: byte(32),
        },
        40..=47 => Op::Finish { conn, stream },
        48..=51 => Op::Reset {
            conn,
            stream,
            code: byte(32),
        },
        52..=55 => Op::StopSending {
            conn,
            stream,
            code: byte(32),
        },
        56..=57 => Op::CloseConnection {
            conn,
            code: byte(32),
        },
        58..=59 => Op::ToggleReading { conn },
        60..=65 => Op::AdvanceTime {
            ms: [1, 25, 300, 1000, 5_500, 11_000, 31_000, 60_000][usize::from(byte(32)) % 8],
        },
        66..=69 => Op::DropNext { to_server },
        70..=72 => Op::Duplicate { to_server },
        73..=76 => Op::Reorder {
            to_server,
            depth: byte(32) % 6,
        },
        77..=95 => Op::Deliver {
            n: if byte(32) % 3 == 0 {
                0
            } else {
                byte(40) % 8 + 1
            },
        },
        _ => Op::Authority,
    }
}

fn random_sequence(seed: u64) -> Sequence {
    let mut rng = XorShift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let alpn = [Alpn::Stoq, Alpn::Doq, Alpn::Perf][(seed % 3) as usize];
    let mut ops = vec![Op::Connect {
        alpn,
        with_cert: !seed.is_multiple_of(7),
        zero_rtt: false,
    }];
    let len = 8 + rng.next() % 40;
    ops.extend((0..len).map(|_| random_op(&mut rng, alpn)));
    sequence(seed % 3 == 1, ops)
}

#[test]
fn random_stream_event_sequences_keep_the_server_whole() {
    let mut total = Counters::default();
    for seed in 0..SEQUENCES {
        let sequence = random_sequence(seed);
        match run(&sequence.encode()) {
            Ok(counters) => total.add(&counters),
            Err(violation) => panic!("seed {seed}: {violation}\nsequence: {sequence:#?}"),
        }
    }
    // The generator reaches every handler's outcomes: answers and errors
    // on each protocol, admission both ways, 0-RTT, Retry, the deadlines.
    let reached = [
        ("stoq_requests", total.stoq_requests),
        ("stoq_errors", total.stoq_errors),
        ("doq_queries", total.doq_queries),
        ("doq_errors", total.doq_errors),
        ("doq_idle_closed", total.doq_idle_closed),
        ("perf_streams", total.perf_streams),
        ("admitted", total.admitted),
        ("admission_deadline", total.admission_deadline),
        ("zero_rtt_deferred", total.zero_rtt_deferred),
        ("retries", total.retries),
        ("refused_certificate", total.refused_certificate),
    ];
    for (name, count) in reached {
        assert!(count > 0, "no sequence reached {name}: {total:#?}");
    }
}

/// Writes the fuzz target's seed corpus. Run after changing the op
/// language or the named seeds:
/// `cargo test --release -p dataplane --lib write_seed_corpus -- --ignored`
#[test]
#[ignore = "writes dataplane/fuzz/corpus/stream_events"]
fn write_seed_corpus() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/stream_events");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, sequence) in named_seeds() {
        std::fs::write(dir.join(name), sequence.encode()).unwrap();
    }
    for seed in [1, 2, 3] {
        std::fs::write(
            dir.join(format!("random_{seed}")),
            random_sequence(seed).encode(),
        )
        .unwrap();
    }
}

/// A longer soak than every test run affords: `HARNESS_SEQUENCES`
/// sequences from `HARNESS_FIRST_SEED`, of up to [`op::OPS_MAX`] ops each.
/// `cargo test --release -p dataplane --lib harness_soak -- --ignored`
#[test]
#[ignore = "minutes of random sequences; run by hand or in a nightly job"]
fn harness_soak() {
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let first = env("HARNESS_FIRST_SEED", 1_000_000);
    let count = env("HARNESS_SEQUENCES", 5_000);
    for seed in first..first + count {
        let mut sequence = random_sequence(seed);
        let mut rng = XorShift(seed.wrapping_mul(31) | 1);
        let main = match sequence.ops[0] {
            Op::Connect { alpn, .. } => alpn,
            _ => Alpn::Stoq,
        };
        let len = sequence.ops.len() + (rng.next() % op::OPS_MAX as u64) as usize;
        while sequence.ops.len() < len.min(op::OPS_MAX) {
            sequence.ops.push(random_op(&mut rng, main));
        }
        if let Err(violation) = run(&sequence.encode()) {
            panic!("seed {seed}: {violation}\nsequence: {sequence:#?}");
        }
    }
}
