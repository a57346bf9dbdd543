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
    let stream = |op: fn(u8, u8) -> Op| op(0, 0);
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
                    stream(|conn, stream| Op::Finish { conn, stream }),
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
            "reset_after_partial_data",
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
                        stream: 1,
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
            sequence(
                false,
                (0..6)
                    .flat_map(|variant| {
                        [
                            Op::OpenStream { conn: 0 },
                            Op::Request {
                                conn: 0,
                                stream: variant,
                                variant: 0x80 | variant,
                            },
                            SETTLE,
                        ]
                    })
                    .fold(vec![connect(Alpn::Doq, false)], |mut ops, op| {
                        ops.push(op);
                        ops
                    }),
            ),
        ),
        (
            "stoq_admission_every_request",
            sequence(
                true,
                (0..12)
                    .flat_map(|variant| {
                        [
                            Op::OpenStream { conn: 0 },
                            Op::Request {
                                conn: 0,
                                stream: variant,
                                variant: 0x80 | variant,
                            },
                            SETTLE,
                        ]
                    })
                    .chain([Op::Authority, SETTLE, Op::AdvanceTime { ms: 6000 }, SETTLE])
                    .fold(vec![connect(Alpn::Stoq, true)], |mut ops, op| {
                        ops.push(op);
                        ops
                    }),
            ),
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
        "reset_after_partial_data",
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
    assert_eq!(counters.perf_streams, 2, "the hostile stream and the honest one");
}

#[test]
fn doq_query_without_fin_is_closed_at_the_idle_deadline() {
    let counters = run_bytes(&seed("doq_partial_query_past_idle_deadline"));
    assert_eq!(counters.doq_idle_closed, 1);
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
fn random_op(rng: &mut XorShift) -> Op {
    let r = rng.next();
    let byte = |shift: u32| (r >> shift) as u8;
    let conn = byte(8);
    let stream = byte(16);
    let to_server = byte(24) & 1 == 1;
    match r % 100 {
        0..=6 => Op::Connect {
            alpn: [Alpn::Stoq, Alpn::Doq, Alpn::Perf][usize::from(byte(8)) % 3],
            with_cert: byte(16) % 4 != 0,
            zero_rtt: byte(24) % 3 == 0,
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
            n: if byte(32) % 3 == 0 { 0 } else { byte(40) % 8 + 1 },
        },
        _ => Op::Authority,
    }
}

fn random_sequence(seed: u64) -> Sequence {
    let mut rng = XorShift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let alpn = [Alpn::Stoq, Alpn::Doq, Alpn::Perf][(seed % 3) as usize];
    let mut ops = vec![Op::Connect {
        alpn,
        with_cert: !seed.is_multiple_of(5),
        zero_rtt: false,
    }];
    let len = 8 + rng.next() % 40;
    ops.extend((0..len).map(|_| random_op(&mut rng)));
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
    eprintln!("{total:#?}");
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

#[test]
fn debug_trace() {
    let s = seed("stoq_anonymous_empty_fin");
    let mut h = Harness::new(s.settings);
    for op in &s.ops {
        h.apply(*op).unwrap();
        let c = h.counters();
        eprintln!(
            "{op:?}: conns {} hs {} stoq_req {} err {} rx {} tx {} client {:?} q {} {}",
            h.server_connections(),
            c.handshakes,
            c.stoq_requests,
            c.stoq_errors,
            c.datagrams_rx,
            c.datagrams_tx,
            h.client
                .conns
                .iter()
                .map(|c| (c.connected, c.lost, c.streams.len()))
                .collect::<Vec<_>>(),
            h.to_server.len(),
            h.to_client.len()
        );
    }
}

#[test]
#[ignore]
fn explore() {
    let n: u64 = std::env::var("EXPLORE_N").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let start: u64 = std::env::var("EXPLORE_START").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let zero = std::env::var("EXPLORE_ZERO").is_ok();
    let mut failures = 0;
    for seed in start..start + n {
        let mut sequence = random_sequence(seed);
        if std::env::var("EXPLORE_BYTES").is_ok() {
            let mut rng = XorShift(seed * 7919 + 1);
            let len = 20 + rng.next() % 300;
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            sequence = Sequence::decode(&bytes);
        }
        if zero {
            for op in &mut sequence.ops {
                if let Op::Connect { zero_rtt, .. } = op {
                    *zero_rtt = true;
                }
            }
        }
        if let Err(violation) = run(&sequence.encode()) {
            eprintln!("seed {seed}: {violation}");
            failures += 1;
        }
    }
    assert_eq!(failures, 0);
}

#[test]
#[ignore]
fn explore_one() {
    let seed: u64 = std::env::var("EXPLORE_SEED").unwrap().parse().unwrap();
    let mut sequence = random_sequence(seed);
    for op in &mut sequence.ops {
        if let Op::Connect { zero_rtt, .. } = op {
            *zero_rtt = true;
        }
    }
    let mut h = Harness::new(sequence.settings);
    for op in &sequence.ops {
        h.apply(*op).unwrap();
        let c = h.counters();
        eprintln!(
            "{op:?}: conns {} acc {} hs {} closed {} rx {} tx {} client {:?} q {} {}",
            h.server_connections(),
            c.accepted,
            c.handshakes,
            c.closed,
            c.datagrams_rx,
            c.datagrams_tx,
            h.client
                .conns
                .iter()
                .map(|c| (c.connected, c.lost, c.streams.len()))
                .collect::<Vec<_>>(),
            h.to_server.len(),
            h.to_client.len()
        );
    }
    let r = h.check_honest();
    eprintln!("honest {r:?}, conns {}", h.server_connections());
    let r = h.check_drains();
    let start = h.now;
    eprintln!("drains {r:?}, server timeout {:?} client timeout {:?} conns {} counters {:?}", h.server.poll_timeout().map(|t| t - start), h.client.poll_timeout(), h.client.conns.len(), h.counters());
}

#[test]
#[ignore]
fn debug_zero_rtt() {
    let s = seed("stoq_zero_rtt_lossy");
    let mut h = Harness::new(s.settings);
    for op in &s.ops {
        h.apply(*op).unwrap();
        let c = h.counters();
        eprintln!(
            "{op:?}: conns {} hs {} deferred {} req {} client {:?} q {} {}",
            h.server_connections(),
            c.handshakes,
            c.zero_rtt_deferred,
            c.stoq_requests,
            h.client
                .conns
                .iter()
                .map(|c| (c.connected, c.lost, c.streams.len(), c.conn.has_0rtt(), c.conn.is_handshaking()))
                .collect::<Vec<_>>(),
            h.to_server.len(),
            h.to_client.len()
        );
    }
}
