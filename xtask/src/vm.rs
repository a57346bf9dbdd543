//! `cargo xtask bench-vm`: what a VM call costs, in one run.
//!
//! Each of `--runs` rounds runs `vm-micro` once (in process, no server: a
//! fresh instance and call of a small module, fuel metering against the
//! same engine without it, a 4 KiB `asset_read` against a 4 KiB copy in
//! the guest and a native one), then starts a fresh server on [::1] (the
//! development admission settings, `--workers` workers, one VM thread) and
//! runs `internet2 vm-bench` against it: a small module's call one at a
//! time beside a 1 KiB ping, then calls with many in flight. The server's
//! CPU is read from /proc every 10 ms meanwhile and charged to each
//! phase's window: server CPU per call beside the paired figures. The
//! table shows the medians over the rounds.
//!
//! Servers run as `bench-40g` runs them (own process group, SIGTERM then
//! SIGKILL); they and the scratch directory are removed on every path out,
//! errors and Ctrl-C included.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};

use crate::admission::{read_json, run_client};
use crate::bench::{
    CpuSamples, WorkDir, build_release, check_interrupt, install_signal_handlers, log_tail,
    medians, remove_stale_work_dirs, start_loopback_server, write_report,
};

/// Prefix of the scratch directories under the system temporary directory.
const WORK_DIR_PREFIX: &str = "i2-bench-vm-";

#[derive(Args, Clone, Debug)]
pub struct VmBenchArgs {
    /// Rounds (each: vm-micro, then a fresh server and vm-bench); medians
    /// are reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Calls (and pings) one at a time per round.
    #[arg(long, default_value_t = 5_000)]
    pub calls: u64,
    /// Calls with many in flight per round.
    #[arg(long, default_value_t = 50_000)]
    pub loaded_calls: u64,
    /// Calls in flight in the loaded phase.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Server workers.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Also write all rounds and the medians as JSON here.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
}

struct Binaries {
    server: PathBuf,
    client: PathBuf,
    micro: PathBuf,
}

pub fn bench_vm(args: &VmBenchArgs) -> Result<()> {
    if args.runs == 0 || args.calls == 0 || args.loaded_calls == 0 || args.concurrency == 0 {
        bail!("--runs, --calls, --loaded-calls and --concurrency must be at least 1");
    }
    install_signal_handlers()?;
    let mut take = build_release(
        "bench-vm",
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
            "vm-micro",
        ],
    )?;
    let bins = Binaries {
        server: take("internet2-server")?,
        client: take("internet2")?,
        micro: take("vm-micro")?,
    };
    remove_stale_work_dirs(WORK_DIR_PREFIX);
    let work = WorkDir::create(WORK_DIR_PREFIX)?;
    let mut rounds = Vec::new();
    for run in 0..args.runs {
        check_interrupt()?;
        eprintln!("bench-vm: run {}/{}: vm-micro", run + 1, args.runs);
        let micro_out = work.path.join(format!("micro-{run}.json"));
        let mut micro = Command::new(&bins.micro);
        micro.args(["--rounds", "1"]);
        run_client(micro, "vm-micro", &micro_out)?;
        let micro = read_json(&micro_out)?;
        eprintln!(
            "bench-vm: run {}/{}: server and vm-bench",
            run + 1,
            args.runs
        );
        let dir = work.path.join(format!("server-{run}"));
        let over = against_server(&bins, args, &dir)?;
        rounds.push(json!({"micro": micro, "server": over}));
    }
    let medians = medians(&rounds);
    print_table(args, &medians);
    if let Some(path) = &args.json {
        let doc = json!({
            "settings": {
                "runs": args.runs,
                "calls": args.calls,
                "loaded_calls": args.loaded_calls,
                "concurrency": args.concurrency,
                "workers": args.workers,
            },
            "medians": medians,
            "runs": rounds,
        });
        write_report("bench-vm", path, &doc)?;
    }
    Ok(())
}

fn against_server(bins: &Binaries, args: &VmBenchArgs, dir: &Path) -> Result<Value> {
    let (mut server, port, log) = start_loopback_server(
        &bins.server,
        "bench-vm",
        dir,
        args.workers,
        "vm_threads = 1\n",
    )?;
    let json_path = dir.join("vm-bench.json");
    let spawned = Command::new(&bins.client)
        .args(["vm-bench", "--connect", &format!("[::1]:{port}")])
        .arg("--ca")
        .arg(dir.join("ca.pem"))
        .args(["--calls", &args.calls.to_string()])
        .args(["--loaded-calls", &args.loaded_calls.to_string()])
        .args(["--concurrency", &args.concurrency.to_string()])
        .arg("--json")
        .arg(&json_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn();
    let sampled = spawned
        .context("starting internet2 vm-bench")
        .and_then(|mut client| CpuSamples::while_running(&[server.pid()], &mut client));
    let stopped = server.stop();
    let (status, samples) = sampled.with_context(|| log_tail(&log))?;
    if !status.success() {
        bail!("internet2 vm-bench failed ({status}){}", log_tail(&log));
    }
    stopped?;
    let mut report = read_json(&json_path)?;
    // Server CPU microseconds per request of each phase.
    for phase in [
        "call",
        "ping_1k",
        "storage_header_read",
        "check_only_call",
        "call_loaded",
    ] {
        let requests = report[phase]["requests"].as_f64().unwrap_or(0.0);
        let cpu = samples
            .within(&report[phase]["window_unix_ms"])
            .and_then(|cpu| cpu.first().copied());
        report[phase]["server_cpu_us_per_request"] = match cpu {
            Some(seconds) if requests > 0.0 => json!(seconds * 1e6 / requests),
            _ => Value::Null,
        };
    }
    Ok(report)
}

fn print_table(args: &VmBenchArgs, m: &Value) {
    let num = |v: &Value, decimals: usize| {
        v.as_f64()
            .map_or("-".to_owned(), |x| format!("{x:.decimals$}"))
    };
    let micro = &m["micro"];
    println!();
    println!(
        "bench-vm: medians over {} runs; server on [::1] with {} worker(s) and 1 VM thread",
        args.runs, args.workers
    );
    println!();
    println!("in process (vm-micro)");
    for (label, key, decimals) in [
        (
            "small module: instantiate + call (us)",
            "call_small_module_us",
            1,
        ),
        ("compute.wat with fuel (ms)", "compute_metered_ms", 2),
        ("compute.wat without fuel (ms)", "compute_unmetered_ms", 2),
        ("fuel's cost (with / without)", "fuel_cost_ratio", 3),
        ("asset_read 4 KiB (ns)", "asset_read_4k_ns", 0),
        (
            "memory.copy 4 KiB in the guest (ns)",
            "guest_memory_copy_4k_ns",
            0,
        ),
        ("native copy 4 KiB (ns)", "native_copy_4k_ns", 0),
    ] {
        println!("  {label:<44}{:>14}", num(&micro[key], decimals));
    }
    let server = &m["server"];
    println!();
    println!("over QUIC on loopback (internet2 vm-bench, one connection)");
    println!(
        "  {:<44}{:>10}{:>10}{:>12}{:>14}",
        "", "p50 us", "p99 us", "per second", "server us/req"
    );
    for (label, key) in [
        ("vm call, one at a time", "call"),
        ("ping 1 KiB (worker)", "ping_1k"),
        (
            "VM header read (worker, from the store)",
            "storage_header_read",
        ),
        ("check-only call (.., VM thread, no run)", "check_only_call"),
        ("vm call, many in flight", "call_loaded"),
    ] {
        let phase = &server[key];
        println!(
            "  {label:<44}{:>10}{:>10}{:>12}{:>14}",
            num(&phase["latency_us_p50"], 0),
            num(&phase["latency_us_p99"], 0),
            num(&phase["per_second"], 0),
            num(&phase["server_cpu_us_per_request"], 1),
        );
    }
}
