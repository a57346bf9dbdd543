//! What the four admission proofs cost, in process and without the
//! network: the client's steps (work, time, stake, space, encoding) and the
//! server's check of a whole bundle (`ProofBundle::decode` then
//! `AdmissionSnapshot::verify`, which is what the worker's gate runs), each
//! timed per bundle with hdrhistogram, against an `AdmissionState` on a
//! scratch redb file with the development settings. Every bundle gets a
//! fresh random binding, as every connection does; every one must verify.
//! `internet2 admission-bench` measures the same exchange over QUIC; the
//! difference is the transport's share.
//!
//! cargo run --release -p internet2-benches --bin admission-micro -- --iterations 2000

mod stats;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use controlplane::authority::ca::KeyAlgorithm;
use controlplane::authority::ct::LogKeyAlgorithm;
use controlplane::consensus::beacon::verify_tick;
use controlplane::consensus::binding::Binding;
use controlplane::consensus::space::{Plot, SpaceParams, verify_space};
use controlplane::consensus::stake::{ClientKey, stake_message};
use controlplane::consensus::state::{AdmissionConfig, AdmissionSnapshot, AdmissionState};
use controlplane::consensus::work::{self, Difficulty, DifficultyConfig};
use controlplane::consensus::{AdmissionMode, ProofBundle};
use controlplane::machine::Machine;
use hdrhistogram::Histogram;
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::{Value, json};
use stats::median;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

/// The development settings of `deploy/internet2-dev.toml`.
const PLOT_K: u8 = 12;
const CHALLENGES: u8 = 8;
const DIFFICULTY_BITS: u8 = 8;
const DEVELOPMENT_STAKE: u64 = 1;

/// The timed steps, in the order a bundle goes through them: the client's
/// (one per proof, plus the tick check before signing and the encoding),
/// then the server's whole check and, inside it, its two costly parts.
const STEPS: [&str; 9] = [
    "client_tick_check",
    "client_time",
    "client_work",
    "client_stake",
    "client_space",
    "client_encode",
    "server_verify",
    "server_stake_check",
    "server_space_check",
];

#[derive(Parser)]
struct Args {
    /// Bundles made and verified per run and key.
    #[arg(long, default_value_t = 2000)]
    iterations: u64,
    /// Runs, each on a fresh store with a fresh key and plot; the medians
    /// over runs are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The client certificate's key.
    #[arg(long, value_enum, default_value_t = KeyChoice::Both)]
    key: KeyChoice,
    /// Scratch directory (removed at the end; default: one under the
    /// system temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Also write every run and the medians as JSON here.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum KeyChoice {
    EcdsaP256,
    Ed25519,
    Both,
}

#[derive(Clone, Copy)]
enum KeyKind {
    EcdsaP256,
    Ed25519,
}

impl KeyKind {
    fn name(self) -> &'static str {
        match self {
            KeyKind::EcdsaP256 => "ecdsa_p256",
            KeyKind::Ed25519 => "ed25519",
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.iterations == 0 || args.runs == 0 {
        bail!("--iterations and --runs must be at least 1");
    }
    let dir = args.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("i2-admission-micro-{}", std::process::id()))
    });
    let _ = std::fs::remove_dir_all(&dir);
    let result = run(&args, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(args: &Args, dir: &Path) -> anyhow::Result<()> {
    let keys: &[KeyKind] = match args.key {
        KeyChoice::EcdsaP256 => &[KeyKind::EcdsaP256],
        KeyChoice::Ed25519 => &[KeyKind::Ed25519],
        KeyChoice::Both => &[KeyKind::EcdsaP256, KeyKind::Ed25519],
    };
    let mut runs = Vec::new();
    for run in 0..args.runs {
        let mut by_key = serde_json::Map::new();
        for &key in keys {
            eprintln!(
                "admission-micro: run {}/{} {}: {} bundles",
                run + 1,
                args.runs,
                key.name(),
                args.iterations
            );
            let scratch = dir.join(format!("run-{run}-{}", key.name()));
            std::fs::create_dir_all(&scratch)
                .with_context(|| format!("creating {}", scratch.display()))?;
            by_key.insert(key.name().into(), measure(&scratch, key, args.iterations)?);
        }
        runs.push(Value::Object(by_key));
    }
    let medians = medians(&runs);
    print_table(&medians, keys, args);
    if let Some(path) = &args.json {
        let doc = json!({
            "settings": settings(args.iterations),
            "runs": runs,
            "medians": medians,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn settings(iterations: u64) -> Value {
    json!({
        "mode": "mandatory",
        "plot_k": PLOT_K,
        "challenges": CHALLENGES,
        "difficulty_bits": DIFFICULTY_BITS,
        "development_stake": DEVELOPMENT_STAKE,
        "iterations": iterations,
    })
}

fn development_config() -> AdmissionConfig {
    AdmissionConfig {
        mode: AdmissionMode::MANDATORY,
        space: SpaceParams::new(PLOT_K, CHALLENGES).expect("the development plot fits a bundle"),
        difficulty: DifficultyConfig {
            base: Difficulty::new(DIFFICULTY_BITS).expect("below the ceiling"),
            ..DifficultyConfig::default()
        },
        development_stake: Some(DEVELOPMENT_STAKE),
        ..AdmissionConfig::default()
    }
}

/// The client's certificate key, signing as `KeyAdmitter` does.
enum Signer {
    Ecdsa(ring::signature::EcdsaKeyPair),
    Ed25519(ring::signature::Ed25519KeyPair),
}

impl Signer {
    fn sign(&self, rng: &SystemRandom, message: &[u8]) -> anyhow::Result<Vec<u8>> {
        Ok(match self {
            Signer::Ecdsa(key) => key
                .sign(rng, message)
                .map_err(|_| anyhow::anyhow!("ECDSA signing failed"))?
                .as_ref()
                .to_vec(),
            Signer::Ed25519(key) => key.sign(message).as_ref().to_vec(),
        })
    }
}

/// A fresh key and a self-signed certificate for it (only its key matters
/// to admission).
fn client(kind: KeyKind, rng: &SystemRandom) -> anyhow::Result<(ClientKey, Signer)> {
    let algorithm = match kind {
        KeyKind::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        KeyKind::Ed25519 => &rcgen::PKCS_ED25519,
    };
    let key = rcgen::KeyPair::generate_for(algorithm)?;
    let cert = rcgen::CertificateParams::new(vec!["micro.internet2.test".to_owned()])?
        .self_signed(&key)?;
    let client = ClientKey::from_certificate_der(cert.der())
        .map_err(|e| anyhow::anyhow!("the bench certificate: {e}"))?;
    let pkcs8 = key.serialize_der();
    let signer = match kind {
        KeyKind::EcdsaP256 => Signer::Ecdsa(
            ring::signature::EcdsaKeyPair::from_pkcs8(
                &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                &pkcs8,
                rng,
            )
            .map_err(|e| anyhow::anyhow!("the ECDSA key: {e}"))?,
        ),
        KeyKind::Ed25519 => Signer::Ed25519(
            ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8)
                .map_err(|e| anyhow::anyhow!("the Ed25519 key: {e}"))?,
        ),
    };
    Ok((client, signer))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One run for one key: open the store, build and register the plot, then
/// make and verify `iterations` bundles.
fn measure(dir: &Path, kind: KeyKind, iterations: u64) -> anyhow::Result<Value> {
    let config = development_config();
    let mut machine = Machine::open(
        dir,
        KeyAlgorithm::EcdsaP256,
        LogKeyAlgorithm::Ed25519,
        None,
        SystemTime::now(),
    )
    .with_context(|| format!("creating the store in {}", dir.display()))?;
    let state = AdmissionState::open(
        &machine.authority().database(),
        config,
        &dir.join("beacon-node.key"),
    )?;
    machine.attach_admission(state, unix_now())?;
    let snapshot_of = |machine: &Machine| machine.admission().expect("attached above").snapshot();
    let rng = SystemRandom::new();
    let (client, signer) = client(kind, &rng)?;
    let identity = client.identity();

    let started = Instant::now();
    let plot = Plot::build(&identity.0, config.space, |_, _| {});
    let plot_build = started.elapsed();
    let started = Instant::now();
    machine.register_plot(identity, plot.commitment(), PLOT_K)?;
    let plot_register = started.elapsed();
    let mut snapshot = snapshot_of(&machine);
    if snapshot.stake(&identity) < config.stake_min {
        bail!("registering the plot did not grant the development stake");
    }

    let mut histograms: Vec<Histogram<u64>> = STEPS
        .iter()
        .map(|_| Histogram::new(3).expect("valid precision"))
        .collect();
    let (mut hashes, mut bundle_bytes) = (0u64, 0usize);
    for i in 0..iterations {
        // The control plane's once-a-second tick, outside the timed steps,
        // so a long run never names a stale tick.
        if machine.tick(unix_now())?.is_some() {
            snapshot = snapshot_of(&machine);
        }
        let mut exporter = [0u8; 32];
        rng.fill(&mut exporter)
            .map_err(|_| anyhow::anyhow!("the system random source failed"))?;
        let binding = Binding::from_exporter(exporter);
        let (times, bundle) = one_bundle(&snapshot, &client, &signer, &plot, &binding, &rng)
            .with_context(|| format!("bundle {i}"))?;
        for (histogram, ns) in histograms.iter_mut().zip(times) {
            histogram.record(ns.max(1))?;
        }
        hashes += bundle.work_hashes;
        bundle_bytes = bundle.bytes;
    }

    let mut report = serde_json::Map::new();
    for (step, histogram) in STEPS.iter().zip(&histograms) {
        report.insert(
            format!("{step}_us_p50"),
            us(histogram.value_at_quantile(0.50)),
        );
        report.insert(
            format!("{step}_us_p99"),
            us(histogram.value_at_quantile(0.99)),
        );
    }
    report.insert(
        "plot_build_ms".into(),
        json!(plot_build.as_secs_f64() * 1e3),
    );
    report.insert(
        "plot_register_ms".into(),
        json!(plot_register.as_secs_f64() * 1e3),
    );
    report.insert(
        "work_hashes_mean".into(),
        json!(hashes as f64 / iterations as f64),
    );
    report.insert("bundle_bytes".into(), json!(bundle_bytes));
    report.insert("bundles".into(), json!(iterations));
    Ok(Value::Object(report))
}

fn us(ns: u64) -> Value {
    json!(ns as f64 / 1e3)
}

/// What one bundle was besides its step times.
struct Made {
    work_hashes: u64,
    bytes: usize,
}

/// Make one bundle step by step as `prove_bundle` does, encode it, and
/// verify it as the gate does. Returns the nanoseconds of each of
/// [`STEPS`].
fn one_bundle(
    snapshot: &AdmissionSnapshot,
    client: &ClientKey,
    signer: &Signer,
    plot: &Plot,
    binding: &Binding,
    rng: &SystemRandom,
) -> anyhow::Result<([u64; STEPS.len()], Made)> {
    let params = snapshot.parameters().clone();
    let mut times = [0u64; STEPS.len()];
    let mut timed = |step: usize, started: Instant| {
        times[step] = started.elapsed().as_nanos() as u64;
    };

    // The client checks the offered tick before it signs over it.
    let t = Instant::now();
    let tick_ok = verify_tick(&params.tick, snapshot.beacon_public_key());
    timed(0, t);
    tick_ok.map_err(|e| anyhow::anyhow!("the beacon tick does not verify: {e}"))?;

    // Time: nothing to compute, the bundle names the offered tick.
    let t = Instant::now();
    let (tick_index, tick_hash) = black_box((params.tick.index, params.tick.hash));
    timed(1, t);

    let t = Instant::now();
    let (work_nonce, work_hashes) = work::solve(binding, params.difficulty);
    timed(2, t);

    let t = Instant::now();
    let stake_signature = signer.sign(rng, &stake_message(binding, &tick_hash))?;
    timed(3, t);

    let t = Instant::now();
    let space_proofs = plot.prove(binding);
    timed(4, t);

    let t = Instant::now();
    let bytes = ProofBundle {
        work_nonce,
        tick_index,
        tick_hash,
        stake_signature,
        space_proofs,
    }
    .encode();
    timed(5, t);
    let bytes = bytes.map_err(|e| anyhow::anyhow!("the bundle does not encode: {e}"))?;

    // The gate's `Pending::verify`: parse, then check against the snapshot.
    let t = Instant::now();
    let verdict = ProofBundle::decode(&bytes)
        .map_err(|e| anyhow::anyhow!("the bundle does not decode: {e}"))
        .and_then(|bundle| {
            snapshot
                .verify(&params, client, binding, &bundle, unix_now())
                .map_err(|e| anyhow::anyhow!("the bundle was refused: {e}"))
                .map(|admitted| (bundle, admitted))
        });
    timed(6, t);
    let (bundle, admitted) = verdict?;
    if admitted.identity() != client.identity() {
        bail!("admitted as another identity");
    }

    // The two costly parts of that check, on their own.
    let message = stake_message(binding, &bundle.tick_hash);
    let t = Instant::now();
    let signature_ok = client.verify(&message, &bundle.stake_signature);
    timed(7, t);
    let commitment = snapshot
        .plot(&client.identity())
        .context("the plot is not in the snapshot")?
        .commitment;
    let t = Instant::now();
    let space_ok = verify_space(
        &commitment,
        &client.identity().0,
        params.space,
        binding,
        &bundle.space_proofs,
    );
    timed(8, t);
    if !signature_ok || space_ok.is_err() {
        bail!("a part of an admitted bundle failed on its own");
    }
    Ok((
        times,
        Made {
            work_hashes,
            bytes: bytes.len(),
        },
    ))
}

/// The median over runs of every number, per key (same shape as a run).
fn medians(runs: &[Value]) -> Value {
    let Some(Value::Object(first)) = runs.first() else {
        return Value::Null;
    };
    let mut out = serde_json::Map::new();
    for (key, fields) in first {
        let Value::Object(fields) = fields else {
            continue;
        };
        let mut per_key = serde_json::Map::new();
        for field in fields.keys() {
            let mut xs: Vec<f64> = runs.iter().filter_map(|r| r[key][field].as_f64()).collect();
            per_key.insert(
                field.clone(),
                median(&mut xs).map_or(Value::Null, |m| json!(m)),
            );
        }
        out.insert(key.clone(), Value::Object(per_key));
    }
    Value::Object(out)
}

fn print_table(medians: &Value, keys: &[KeyKind], args: &Args) {
    println!(
        "admission-micro: {} runs x {} bundles per key, plot k={PLOT_K}, {CHALLENGES} challenges, difficulty {DIFFICULTY_BITS} bits; medians over runs",
        args.runs, args.iterations
    );
    print!("{:<34}", "step (us)");
    for key in keys {
        print!("{:>24}", format!("{} p50 / p99", key.name()));
    }
    println!();
    let rows = [
        ("client: tick check (Ed25519)", "client_tick_check"),
        ("client: time (read the tick)", "client_time"),
        ("client: work", "client_work"),
        ("client: stake signature", "client_stake"),
        ("client: space answers", "client_space"),
        ("client: bundle encode", "client_encode"),
        ("server: verify bundle", "server_verify"),
        ("server:   of it stake signature", "server_stake_check"),
        ("server:   of it space paths", "server_space_check"),
    ];
    for (label, step) in rows {
        print!("{label:<34}");
        for key in keys {
            let m = &medians[key.name()];
            let p50 = shown_us(&m[format!("{step}_us_p50")]);
            let p99 = shown_us(&m[format!("{step}_us_p99")]);
            print!("{:>24}", format!("{p50} / {p99}"));
        }
        println!();
    }
    for (label, field, unit) in [
        ("plot build, once (ms)", "plot_build_ms", 2),
        ("plot registration, durable (ms)", "plot_register_ms", 2),
        ("work hashes per bundle, mean", "work_hashes_mean", 1),
        ("bundle bytes", "bundle_bytes", 0),
    ] {
        print!("{label:<34}");
        for key in keys {
            let v = medians[key.name()][field].as_f64().unwrap_or(f64::NAN);
            print!("{:>24}", format!("{v:.unit$}"));
        }
        println!();
    }
}

/// Microseconds with one decimal; below 1 us, nanoseconds (reading the
/// tick takes tens of them).
fn shown_us(value: &Value) -> String {
    match value.as_f64() {
        Some(us) if us < 1.0 => format!("{:.0} ns", us * 1e3),
        Some(us) => format!("{us:.1}"),
        None => "-".to_owned(),
    }
}
