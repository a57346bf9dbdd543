//! `cargo xtask bench-admission`: what admission costs, in one run.
//!
//! Each of `--runs` rounds starts two fresh servers on [::1], one after
//! the other (the order alternates between rounds): one with the
//! development admission settings (`[hypermesh_assets]` mandatory, a plot
//! of 2^12 leaves, development stake 1) and one with admission off. It
//! runs `internet2 admission-bench` against each (admission round trip,
//! connections per second) and then `admission-micro` with no server
//! running (the proofs' cost in process). The table shows the medians over
//! the rounds; the ratio of the connection rates is taken per round, where
//! the two servers ran back to back, and its median shown.
//!
//! Servers run as `bench-40g` runs them (own process group, SIGTERM then
//! SIGKILL); they and the scratch directory are removed on every path out,
//! errors and Ctrl-C included.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::bench::{
    WorkDir, build_release, check_interrupt, install_signal_handlers, log_tail, medians,
    remove_stale_work_dirs, start_loopback_server, write_report,
};
use clap::Args;
use serde_json::{Map, Value, json};

/// How long one client command may run before it is killed.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);
/// Prefix of the scratch directories under the system temporary directory.
const WORK_DIR_PREFIX: &str = "i2-bench-admission-";

#[derive(Args, Clone, Debug)]
pub struct AdmissionBenchArgs {
    /// Rounds (each: a server with admission, one without, admission-micro);
    /// medians are reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Connections of the one-at-a-time phase against each server.
    #[arg(long, default_value_t = 300)]
    pub connections: u64,
    /// Threads opening connections in the rate phase.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Seconds of the rate phase.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Bundles admission-micro makes and verifies per key and round.
    #[arg(long, default_value_t = 2000)]
    pub iterations: u64,
    /// Server workers.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Also write all rounds and the medians as JSON here.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
}

/// Which server a measurement ran against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Admission {
    On,
    Off,
}

impl Admission {
    fn key(self) -> &'static str {
        match self {
            Admission::On => "admission_on",
            Admission::Off => "admission_off",
        }
    }

    /// What `internet2 admission-bench` must report for this server.
    fn reported(self) -> &'static str {
        match self {
            Admission::On => "on",
            Admission::Off => "off",
        }
    }

    fn consensus_mode(self) -> &'static str {
        match self {
            Admission::On => "mandatory",
            Admission::Off => "off",
        }
    }
}

struct Binaries {
    server: PathBuf,
    client: PathBuf,
    micro: PathBuf,
}

pub fn bench_admission(args: &AdmissionBenchArgs) -> Result<()> {
    if args.runs == 0 || args.connections == 0 || args.concurrency == 0 || args.iterations == 0 {
        bail!("--runs, --connections, --concurrency and --iterations must be at least 1");
    }
    if !(args.seconds > 0.0 && args.seconds.is_finite()) {
        bail!("--seconds must be a positive number");
    }
    install_signal_handlers()?;
    let bins = build()?;
    remove_stale_work_dirs(WORK_DIR_PREFIX);
    let work = WorkDir::create(WORK_DIR_PREFIX)?;
    let mut rounds = Vec::new();
    for run in 0..args.runs {
        check_interrupt()?;
        let order = if run % 2 == 0 {
            [Admission::On, Admission::Off]
        } else {
            [Admission::Off, Admission::On]
        };
        let mut round = Map::new();
        for admission in order {
            let dir = work.path.join(format!("{}-{run}", admission.key()));
            eprintln!(
                "bench-admission: run {}/{}: server with admission {}",
                run + 1,
                args.runs,
                admission.reported()
            );
            let report = against_server(&bins, args, admission, &dir)?;
            round.insert(admission.key().into(), report);
        }
        eprintln!(
            "bench-admission: run {}/{}: admission-micro",
            run + 1,
            args.runs
        );
        round.insert("micro".into(), micro(&bins, args, &work.path, run)?);
        let rate = |key: &str| round[key]["loaded"]["per_second"].as_f64();
        let ratio = match (rate("admission_on"), rate("admission_off")) {
            (Some(on), Some(off)) if off > 0.0 => json!(on / off),
            _ => Value::Null,
        };
        round.insert("ratio_per_second_on_vs_off".into(), ratio);
        rounds.push(Value::Object(round));
    }
    let medians = medians(&rounds);
    print_table(args, &medians, &rounds);
    if let Some(path) = &args.json {
        let doc = json!({
            "settings": {
                "runs": args.runs,
                "connections": args.connections,
                "concurrency": args.concurrency,
                "seconds": args.seconds,
                "iterations": args.iterations,
                "workers": args.workers,
            },
            "medians": medians,
            "runs": rounds,
        });
        write_report("bench-admission", path, &doc)?;
    }
    Ok(())
}

/// Build the server, the client and admission-micro.
fn build() -> Result<Binaries> {
    let mut take = build_release(
        "bench-admission",
        &[
            "-p",
            "internet2-server",
            "-p",
            "internet2-benches",
            "--bin",
            "internet2-server",
            "--bin",
            "internet2",
            "--bin",
            "admission-micro",
        ],
    )?;
    Ok(Binaries {
        server: take("internet2-server")?,
        client: take("internet2")?,
        micro: take("admission-micro")?,
    })
}

fn against_server(
    bins: &Binaries,
    args: &AdmissionBenchArgs,
    admission: Admission,
    dir: &Path,
) -> Result<Value> {
    let keys = format!("consensus_mode = \"{}\"\n", admission.consensus_mode());
    let (mut server, port, log) =
        start_loopback_server(&bins.server, "bench-admission", dir, args.workers, &keys)?;
    let json_path = dir.join("admission-bench.json");
    let mut cmd = Command::new(&bins.client);
    cmd.args(["admission-bench", "--connect", &format!("[::1]:{port}")])
        .arg("--ca")
        .arg(dir.join("ca.pem"))
        .args(["--connections", &args.connections.to_string()])
        .args(["--concurrency", &args.concurrency.to_string()])
        .args(["--seconds", &args.seconds.to_string()])
        .arg("--json")
        .arg(&json_path);
    let ran = run_client(cmd, "internet2 admission-bench", &dir.join("client.out"));
    let stopped = server.stop();
    ran.with_context(|| log_tail(&log))?;
    let status = stopped?;
    if !status.success() {
        bail!(
            "the server with admission {} exited with {status} after SIGTERM{}",
            admission.reported(),
            log_tail(&log)
        );
    }
    let report = read_json(&json_path)?;
    if report["admission"] != admission.reported() {
        bail!(
            "the server configured with consensus_mode = \"{}\" ran admission {} (expected {})",
            admission.consensus_mode(),
            report["admission"],
            admission.reported()
        );
    }
    Ok(report)
}

/// admission-micro once (one run of it); returns its medians (per key).
fn micro(bins: &Binaries, args: &AdmissionBenchArgs, work: &Path, run: usize) -> Result<Value> {
    let json_path = work.join(format!("micro-{run}.json"));
    let mut cmd = Command::new(&bins.micro);
    cmd.args(["--runs", "1", "--key", "both"])
        .args(["--iterations", &args.iterations.to_string()])
        .arg("--dir")
        .arg(work.join(format!("micro-{run}")))
        .arg("--json")
        .arg(&json_path);
    run_client(
        cmd,
        "admission-micro",
        &work.join(format!("micro-{run}.out")),
    )?;
    Ok(read_json(&json_path)?["medians"].clone())
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("the client wrote no JSON to {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

/// Run a client command to completion within [`CLIENT_TIMEOUT`]: its
/// stderr (progress) passes through, its stdout goes to `out`, shown if it
/// fails.
pub(crate) fn run_client(mut cmd: Command, name: &str, out: &Path) -> Result<()> {
    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(file)
        .spawn()
        .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > CLIENT_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{name} still running after {} s; killed it",
                CLIENT_TIMEOUT.as_secs()
            );
        }
        thread::sleep(Duration::from_millis(50));
    };
    if !status.success() {
        let printed = std::fs::read_to_string(out).unwrap_or_default();
        bail!(
            "{name} failed ({status})\n--- stdout\n{}",
            printed.trim_end()
        );
    }
    Ok(())
}

fn print_table(args: &AdmissionBenchArgs, m: &Value, rounds: &[Value]) {
    // Microseconds below 1 print as nanoseconds (reading the tick).
    let us = |v: &Value| match v.as_f64() {
        Some(x) if x < 1.0 => format!("{:.0} ns", x * 1e3),
        Some(x) => format!("{x:.1}"),
        None => "-".to_owned(),
    };
    let micro_pair = |v: &Value, key: &str| {
        format!(
            "{} / {}",
            us(&v[format!("{key}_p50")]),
            us(&v[format!("{key}_p99")])
        )
    };
    let num = |v: &Value, decimals: usize| {
        v.as_f64()
            .map_or("-".to_owned(), |x| format!("{x:.decimals$}"))
    };
    let pair = |v: &Value, key: &str, decimals: usize| {
        format!(
            "{} / {}",
            num(&v[format!("{key}_p50")], decimals),
            num(&v[format!("{key}_p99")], decimals)
        )
    };
    println!();
    println!(
        "bench-admission: medians over {} runs; servers on [::1] with {} worker(s), \
         [hypermesh_assets] consensus_mode \"mandatory\" (plot_k 12, challenges 8, difficulty_base 8, \
         development_stake 1) vs \"off\"",
        args.runs, args.workers
    );
    println!();
    println!(
        "in process (admission-micro, {} bundles per run and key)",
        args.iterations
    );
    println!(
        "  {:<44}{:>22}{:>22}",
        "p50 / p99 (us)", "ECDSA P-256", "Ed25519"
    );
    let micro = &m["micro"];
    for (label, key) in [
        ("server: verify full bundle", "server_verify_us"),
        ("server:   of it stake signature", "server_stake_check_us"),
        ("server:   of it space paths", "server_space_check_us"),
        ("client: work", "client_work_us"),
        ("client: time (read the tick)", "client_time_us"),
        (
            "client: tick check (Ed25519 verify)",
            "client_tick_check_us",
        ),
        ("client: stake signature", "client_stake_us"),
        ("client: space answers", "client_space_us"),
        ("client: bundle encode", "client_encode_us"),
    ] {
        println!(
            "  {label:<44}{:>22}{:>22}",
            micro_pair(&micro["ecdsa_p256"], key),
            micro_pair(&micro["ed25519"], key)
        );
    }
    for (label, key, decimals) in [
        ("client: plot build, once (ms)", "plot_build_ms", 2),
        ("work hashes per bundle, mean", "work_hashes_mean", 1),
        ("bundle bytes", "bundle_bytes", 0),
    ] {
        println!(
            "  {label:<44}{:>22}{:>22}",
            num(&micro["ecdsa_p256"][key], decimals),
            num(&micro["ed25519"][key], decimals)
        );
    }
    let on = &m["admission_on"];
    let off = &m["admission_off"];
    println!();
    println!(
        "over QUIC on loopback (internet2 admission-bench, client key {}, full handshakes, difficulty offered {}..{} bits)",
        on["client_key"].as_str().unwrap_or("?"),
        num(&on["difficulty_bits_min"], 0),
        num(&on["difficulty_bits_max"], 0),
    );
    println!(
        "  {:<44}{:>22}{:>22}",
        "p50 / p99 (us)", "admission on", "admission off"
    );
    let (s_on, s_off) = (&on["sequential"], &off["sequential"]);
    println!(
        "  {:<44}{:>22}{:>22}",
        "admission round trip (client proofs incl.)",
        pair(s_on, "admission_us", 0),
        "-"
    );
    println!(
        "  {:<44}{:>22}{:>22}",
        "  of it client bundle",
        pair(s_on, "client_bundle_us", 0),
        "-"
    );
    println!(
        "  {:<44}{:>22}{:>22}",
        "  of it client offer check",
        pair(s_on, "client_offer_check_us", 0),
        "-"
    );
    for (label, key) in [
        ("handshake", "handshake_us"),
        ("connect to ping reply, one at a time", "latency_us"),
    ] {
        println!(
            "  {label:<44}{:>22}{:>22}",
            pair(s_on, key, 0),
            pair(s_off, key, 0)
        );
    }
    let (l_on, l_off) = (&on["loaded"], &off["loaded"]);
    println!(
        "  {:<44}{:>22}{:>22}",
        format!("connect to ping reply, {} threads", args.concurrency),
        pair(l_on, "latency_us", 0),
        pair(l_off, "latency_us", 0)
    );
    println!(
        "  {:<44}{:>22}{:>22}",
        format!(
            "connections/s, {} threads, {} s",
            args.concurrency, args.seconds
        ),
        num(&l_on["per_second"], 1),
        num(&l_off["per_second"], 1)
    );
    let failures = |key: &str| -> u64 {
        rounds
            .iter()
            .filter_map(|r| r[key]["loaded"]["failures"].as_u64())
            .sum()
    };
    println!(
        "  {:<44}{:>22}{:>22}",
        "failed connections, all runs",
        failures("admission_on"),
        failures("admission_off")
    );
    println!(
        "  {:<44}{:>22}",
        "connections/s on / off (per-run, median)",
        num(&m["ratio_per_second_on_vs_off"], 3)
    );
}
