//! `internet2 admission-bench`: what admission costs a connection, measured
//! over the network against a running server, in one run:
//!
//! 1. `connections` connections one after another, each a full handshake
//!    (a fresh client config: no session to resume), the admission
//!    exchange and one ping: the admission round trip (parameters request
//!    to admitted answer, the client's proofs included), and the client's
//!    own share of it (checking the offer, making the bundle);
//! 2. connections per second from `concurrency` threads for `seconds`,
//!    each connection again handshake, admission and one ping; failures
//!    are counted (an honest client has none).
//!
//! A server with admission off answers the parameters request with
//! `AdmissionOff`; the report then says `"admission": "off"` and the same
//! phases measure the connection without proofs, the baseline that
//! `cargo xtask bench-admission` compares against in the same run.

use anyhow::{Context, bail};
use bytes::Bytes;
use controlplane::consensus::stake::{ClientKey, KeyAlgorithm};
use controlplane::consensus::wire;
use dataplane::admission::Admitter;
use dataplane::client::rpc::{Reply, RpcOutcome};
use dataplane::client::{self, ClientTarget};
use dataplane::protocols::stoq::Kind;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use std::path::Path;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The ping each connection makes once admitted.
const PING_PAYLOAD: &[u8] = b"admission-bench";

/// How much load each phase applies.
#[derive(Clone, Debug)]
pub struct AdmissionBenchPlan {
    /// Connections of the sequential phase.
    pub connections: u64,
    /// Threads opening connections in the rate phase.
    pub concurrency: usize,
    /// Seconds of the rate phase.
    pub seconds: f64,
    /// Longest a connection may take.
    pub timeout: Duration,
}

/// Run, print the table, and write the JSON report to `json` when given.
pub fn bench(
    target: &ClientTarget,
    plan: &AdmissionBenchPlan,
    json: Option<&Path>,
) -> anyhow::Result<()> {
    let report = run(target, plan)?;
    print_table(target, &report);
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Run both phases against `target`, which must carry a client identity
/// and its admitter. Returns the JSON report; prints progress to stderr.
pub fn run(target: &ClientTarget, plan: &AdmissionBenchPlan) -> anyhow::Result<Value> {
    if plan.connections == 0
        || plan.concurrency == 0
        || !(plan.seconds > 0.0 && plan.seconds.is_finite())
    {
        bail!("--connections, --concurrency and --seconds must be above 0");
    }
    let (Some(identity), Some(admitter)) = (&target.identity, &target.admitter) else {
        bail!(
            "admission-bench needs a client identity that makes proofs (--identity, or operator.pem beside --ca)"
        );
    };
    let key = identity
        .chain
        .first()
        .context("the client identity holds no certificate")
        .and_then(|leaf| {
            ClientKey::from_certificate_der(leaf)
                .map_err(|e| anyhow::anyhow!("this identity cannot be admitted: {e}"))
        })?;
    let timed = Arc::new(TimedAdmitter::new(admitter.clone()));
    let mut measured = target.clone();
    measured.admitter = Some(timed.clone());

    // The first connection may build the plot and register it; it is
    // reported on its own and left out of the percentiles.
    eprintln!("admission-bench: first connection (plot, registration)");
    let first = connect(&measured, plan.timeout)
        .map_err(|e| anyhow::anyhow!("the first connection failed: {e}"))?;
    let registrations = timed.registrations.load(Ordering::Relaxed);
    timed.reset();

    eprintln!(
        "admission-bench: {} connections, one at a time",
        plan.connections
    );
    let sequential = sequential(&measured, plan)?;
    let admission_on = match (sequential.admitted, first.admission.is_some()) {
        (n, true) if n == plan.connections => true,
        (0, false) => false,
        (n, _) => bail!(
            "the server ran admission on {n} of {} connections (and {} the first); it must be all or none",
            plan.connections,
            if first.admission.is_some() {
                "on"
            } else {
                "not on"
            }
        ),
    };
    let client_share = timed.report();
    let registrations_after_first = timed.registrations.load(Ordering::Relaxed);
    timed.reset();

    eprintln!(
        "admission-bench: connections from {} threads for {:.1} s",
        plan.concurrency, plan.seconds
    );
    let loaded = loaded(&measured, plan);
    if loaded.admitted != 0 && !admission_on {
        bail!("the server started admitting connections in the rate phase");
    }

    let difficulty = timed.difficulty();
    Ok(json!({
        "admission": if admission_on { "on" } else { "off" },
        "client_key": match key.algorithm() {
            KeyAlgorithm::EcdsaP256Sha256 => "ecdsa-p256",
            KeyAlgorithm::Ed25519 => "ed25519",
        },
        "full_handshakes": true,
        "difficulty_bits_min": difficulty.map(|(min, _)| min),
        "difficulty_bits_max": difficulty.map(|(_, max)| max),
        "first_connection": {
            "admission_us": first.admission.map(|d| d.as_micros() as u64),
            "latency_us": first.latency.map(|d| d.as_micros() as u64),
            "plot_registrations": registrations,
        },
        "sequential": {
            "connections": plan.connections,
            "plot_registrations": registrations_after_first,
            "admission_us_p50": admission_on.then(|| sequential.admission_us.value_at_quantile(0.50)),
            "admission_us_p99": admission_on.then(|| sequential.admission_us.value_at_quantile(0.99)),
            "client_offer_check_us_p50": admission_on.then(|| client_share.offer_check_us.value_at_quantile(0.50)),
            "client_offer_check_us_p99": admission_on.then(|| client_share.offer_check_us.value_at_quantile(0.99)),
            "client_bundle_us_p50": admission_on.then(|| client_share.bundle_us.value_at_quantile(0.50)),
            "client_bundle_us_p99": admission_on.then(|| client_share.bundle_us.value_at_quantile(0.99)),
            "handshake_us_p50": sequential.handshake_us.value_at_quantile(0.50),
            "handshake_us_p99": sequential.handshake_us.value_at_quantile(0.99),
            "latency_us_p50": sequential.latency_us.value_at_quantile(0.50),
            "latency_us_p99": sequential.latency_us.value_at_quantile(0.99),
        },
        "loaded": {
            "threads": plan.concurrency,
            "seconds": loaded.elapsed.as_secs_f64(),
            "connections": loaded.ok,
            "failures": loaded.failures,
            "first_failure": loaded.first_failure,
            "per_second": loaded.ok as f64 / loaded.elapsed.as_secs_f64().max(1e-9),
            "latency_us_p50": loaded.latency_us.value_at_quantile(0.50),
            "latency_us_p99": loaded.latency_us.value_at_quantile(0.99),
        },
    }))
}

/// One connection: a full handshake (a fresh config, so no session is
/// resumed), admission when the server asks for it, and one ping.
fn connect(target: &ClientTarget, timeout: Duration) -> Result<RpcOutcome, String> {
    let config = target
        .client_config(dataplane::protocols::ALPN_STOQ)
        .map_err(|e| e.to_string())?;
    let outcome = client::rpc(
        target,
        &config,
        vec![(Kind::Ping, Bytes::from_static(PING_PAYLOAD))],
        timeout,
    )
    .map_err(|e| e.to_string())?;
    match &outcome.replies[0] {
        Reply::Ok(echo) if echo.as_ref() == PING_PAYLOAD => Ok(outcome),
        Reply::Ok(_) => Err("the server echoed a different payload".into()),
        Reply::Error { code, message } => Err(format!("server error {code:#x}: {message}")),
        Reply::Failed(why) => Err(why.clone()),
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new(3).expect("valid precision")
}

fn record(histogram: &mut Histogram<u64>, duration: Option<Duration>) {
    if let Some(d) = duration {
        let _ = histogram.record((d.as_micros() as u64).max(1));
    }
}

struct Sequential {
    admitted: u64,
    admission_us: Histogram<u64>,
    handshake_us: Histogram<u64>,
    latency_us: Histogram<u64>,
}

fn sequential(target: &ClientTarget, plan: &AdmissionBenchPlan) -> anyhow::Result<Sequential> {
    let mut out = Sequential {
        admitted: 0,
        admission_us: histogram(),
        handshake_us: histogram(),
        latency_us: histogram(),
    };
    for i in 0..plan.connections {
        let outcome = connect(target, plan.timeout)
            .map_err(|e| anyhow::anyhow!("connection {} failed: {e}", i + 1))?;
        out.admitted += u64::from(outcome.admission.is_some());
        record(&mut out.admission_us, outcome.admission);
        record(&mut out.handshake_us, outcome.handshake);
        record(&mut out.latency_us, outcome.latency);
    }
    Ok(out)
}

#[derive(Default)]
struct Tally {
    ok: u64,
    admitted: u64,
    failures: u64,
    first_failure: Option<String>,
    latency_us: Option<Histogram<u64>>,
}

struct Loaded {
    ok: u64,
    admitted: u64,
    failures: u64,
    first_failure: Option<String>,
    latency_us: Histogram<u64>,
    elapsed: Duration,
}

/// `concurrency` threads open connections until `seconds` have passed;
/// the rate counts the connections completed until the last one ends.
fn loaded(target: &ClientTarget, plan: &AdmissionBenchPlan) -> Loaded {
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(plan.seconds);
    let tallies: Vec<Tally> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..plan.concurrency)
            .map(|_| {
                scope.spawn(|| {
                    let mut tally = Tally {
                        latency_us: Some(histogram()),
                        ..Tally::default()
                    };
                    while Instant::now() < deadline {
                        match connect(target, plan.timeout) {
                            Ok(outcome) => {
                                tally.ok += 1;
                                tally.admitted += u64::from(outcome.admission.is_some());
                                if let Some(h) = &mut tally.latency_us {
                                    record(h, outcome.latency);
                                }
                            }
                            Err(why) => {
                                tally.failures += 1;
                                tally.first_failure.get_or_insert(why);
                            }
                        }
                    }
                    tally
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| {
                t.join().unwrap_or_else(|_| Tally {
                    failures: 1,
                    first_failure: Some("a load thread panicked".into()),
                    ..Tally::default()
                })
            })
            .collect()
    });
    let elapsed = started.elapsed();
    let mut out = Loaded {
        ok: 0,
        admitted: 0,
        failures: 0,
        first_failure: None,
        latency_us: histogram(),
        elapsed,
    };
    for tally in tallies {
        out.ok += tally.ok;
        out.admitted += tally.admitted;
        out.failures += tally.failures;
        out.first_failure = out.first_failure.or(tally.first_failure);
        if let Some(h) = &tally.latency_us {
            out.latency_us.add(h).expect("same precision");
        }
    }
    out
}

/// The client's own share of admission: wraps the target's admitter and
/// times its two calls (checking the offer, then making the bundle), and
/// notes the difficulty each offer asked for.
struct TimedAdmitter {
    inner: Arc<dyn Admitter>,
    offer_check_us: Mutex<Histogram<u64>>,
    bundle_us: Mutex<Histogram<u64>>,
    registrations: AtomicU64,
    /// Smallest and largest difficulty offered (`u8::MAX` and 0: none yet).
    difficulty_min: AtomicU8,
    difficulty_max: AtomicU8,
}

impl std::fmt::Debug for TimedAdmitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimedAdmitter")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// The timings a [`TimedAdmitter`] collected.
struct ClientShare {
    offer_check_us: Histogram<u64>,
    bundle_us: Histogram<u64>,
}

impl TimedAdmitter {
    fn new(inner: Arc<dyn Admitter>) -> Self {
        Self {
            inner,
            offer_check_us: Mutex::new(histogram()),
            bundle_us: Mutex::new(histogram()),
            registrations: AtomicU64::new(0),
            difficulty_min: AtomicU8::new(u8::MAX),
            difficulty_max: AtomicU8::new(0),
        }
    }

    fn reset(&self) {
        self.offer_check_us.lock().expect("not poisoned").reset();
        self.bundle_us.lock().expect("not poisoned").reset();
        self.registrations.store(0, Ordering::Relaxed);
    }

    fn report(&self) -> ClientShare {
        ClientShare {
            offer_check_us: self.offer_check_us.lock().expect("not poisoned").clone(),
            bundle_us: self.bundle_us.lock().expect("not poisoned").clone(),
        }
    }

    /// (smallest, largest) difficulty offered, if any offer was seen.
    fn difficulty(&self) -> Option<(u8, u8)> {
        let (min, max) = (
            self.difficulty_min.load(Ordering::Relaxed),
            self.difficulty_max.load(Ordering::Relaxed),
        );
        (min <= max).then_some((min, max))
    }
}

impl Admitter for TimedAdmitter {
    fn registration(&self, parameters: &[u8]) -> Result<Option<Vec<u8>>, String> {
        let started = Instant::now();
        let result = self.inner.registration(parameters);
        let elapsed = started.elapsed();
        record(
            &mut self.offer_check_us.lock().expect("not poisoned"),
            Some(elapsed),
        );
        if let Ok(Some(_)) = &result {
            self.registrations.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    fn bundle(&self, parameters: &[u8], binding: &[u8; 32]) -> Result<Vec<u8>, String> {
        let started = Instant::now();
        let result = self.inner.bundle(parameters, binding);
        let elapsed = started.elapsed();
        record(
            &mut self.bundle_us.lock().expect("not poisoned"),
            Some(elapsed),
        );
        if let Ok(offer) = wire::decode_offer(parameters) {
            let bits = offer.params.difficulty.bits();
            self.difficulty_min.fetch_min(bits, Ordering::Relaxed);
            self.difficulty_max.fetch_max(bits, Ordering::Relaxed);
        }
        result
    }
}

fn print_table(target: &ClientTarget, report: &Value) {
    let us = |v: &Value| v.as_u64().map_or("-".to_owned(), |v| v.to_string());
    let on = report["admission"] == "on";
    let difficulty = match (
        report["difficulty_bits_min"].as_u64(),
        report["difficulty_bits_max"].as_u64(),
    ) {
        (Some(min), Some(max)) if min == max => format!(", difficulty {min} bits"),
        (Some(min), Some(max)) => format!(", difficulty {min}..{max} bits"),
        _ => String::new(),
    };
    println!(
        "admission-bench {}: admission {}{difficulty}, client key {}, full handshakes",
        target.remote,
        if on { "on" } else { "off" },
        report["client_key"].as_str().unwrap_or("?"),
    );
    let s = &report["sequential"];
    println!(
        "sequential: {} connections (each: handshake, {}, one ping)",
        us(&s["connections"]),
        if on {
            "admission"
        } else {
            "parameters request answered AdmissionOff"
        }
    );
    let mut rows = vec![];
    if on {
        rows.extend([
            ("admission round trip", "admission_us"),
            ("  of it client offer check", "client_offer_check_us"),
            ("  of it client bundle", "client_bundle_us"),
        ]);
    }
    rows.extend([
        ("handshake", "handshake_us"),
        ("connect to ping reply", "latency_us"),
    ]);
    for (label, key) in rows {
        println!(
            "  {label:<30} p50 {:>7} us  p99 {:>7} us",
            us(&s[format!("{key}_p50")]),
            us(&s[format!("{key}_p99")]),
        );
    }
    let first = &report["first_connection"];
    if on {
        println!(
            "  {:<30} {:>11} us  ({} plot registrations)",
            "first connection's admission",
            us(&first["admission_us"]),
            us(&first["plot_registrations"]),
        );
    }
    let l = &report["loaded"];
    println!(
        "loaded: {} threads for {:.1} s",
        us(&l["threads"]),
        l["seconds"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  {:<30} {:>11.1}/s  ({} connections, {} failures)",
        "connections",
        l["per_second"].as_f64().unwrap_or(0.0),
        us(&l["connections"]),
        us(&l["failures"]),
    );
    println!(
        "  {:<30} p50 {:>7} us  p99 {:>7} us",
        "connect to ping reply",
        us(&l["latency_us_p50"]),
        us(&l["latency_us_p99"]),
    );
    if let Some(why) = l["first_failure"].as_str() {
        println!("  first failure: {why}");
    }
}
