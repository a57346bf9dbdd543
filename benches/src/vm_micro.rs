//! What a VM call costs in process, without the network or the control
//! plane: a fresh instance of a small module and its call (echo, 64
//! bytes), fuel metering against the same engine without it (compute.wat:
//! ten million rounds of arithmetic), and a 4 KiB `asset_read` of a local
//! memory asset against a 4 KiB `memory.copy` inside the guest and a 4 KiB
//! native copy (copy_4k.wat). Each figure is the median of `--rounds`
//! rounds, the compared ones alternating within each round.
//! `internet2 vm-bench` measures `vm call` over a connection; the
//! difference is the transport's and the control plane's share.
//!
//! cargo run --release -p internet2-benches --bin vm-micro -- --rounds 5

mod stats;

use anyhow::{Context, bail};
use clap::Parser;
use controlplane::vm::Reason;
use dataplane::assets::address::{Locator, NodeNumber};
use dataplane::assets::memory::{MemoryAssets, Owner};
use serde_json::json;
use stats::median;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;
use vm::{Compiled, Limits, Runtime, VmConfig};

#[derive(Parser)]
struct Args {
    /// Rounds; each figure is their median.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Calls of the small module per round.
    #[arg(long, default_value_t = 2000)]
    calls: u32,
    /// 4 KiB copies per round, each way.
    #[arg(long, default_value_t = 100_000)]
    copies: u32,
}

const OWNER: Owner = Owner([1; 32]);
const LIMITS: Limits = Limits {
    fuel: u64::MAX / 4,
    memory_bytes: 16 << 20,
};

fn module(runtime: &Runtime, name: &str) -> anyhow::Result<Compiled> {
    let path = format!("{}/../vm/modules/{name}", env!("CARGO_MANIFEST_DIR"));
    let bytes = wat::parse_file(&path).with_context(|| path.clone())?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    runtime
        .compile(digest.as_ref().try_into().expect("32 bytes"), &bytes)
        .with_context(|| path)
}

/// Seconds `run` takes, which must succeed.
fn timed(runtime: &Runtime, compiled: &Compiled, input: &[u8]) -> anyhow::Result<f64> {
    let started = Instant::now();
    let outcome = runtime.call(compiled, OWNER, LIMITS, input);
    let took = started.elapsed().as_secs_f64();
    if outcome.reason != Reason::Finished || outcome.status != 0 {
        bail!("the call failed: {outcome:?}");
    }
    Ok(took)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let assets = Arc::new(MemoryAssets::new(
        NodeNumber::new(1).expect("a node number"),
        Locator(0xfd00_0000_0000_0001),
        1,
        (0, 1 << 20),
        (1 << 30, 1 << 30),
    ));
    let address = assets.alloc(0, &OWNER, 4096).map_err(anyhow::Error::msg)?;
    let config = VmConfig::default();
    let metered =
        Runtime::metering(&config, 1, Some(assets.clone()), true).map_err(anyhow::Error::msg)?;
    let unmetered =
        Runtime::metering(&config, 1, Some(assets), false).map_err(anyhow::Error::msg)?;
    let echo = module(&metered, "echo.wat")?;
    let compute = module(&metered, "compute.wat")?;
    let compute_unmetered = module(&unmetered, "compute.wat")?;
    let copy = module(&metered, "copy_4k.wat")?;
    let copy_input = |mode: u8| {
        let mut input = address.octets().to_vec();
        input.push(mode);
        input.extend_from_slice(&args.copies.to_le_bytes());
        input
    };
    let (asset_input, guest_input) = (copy_input(0), copy_input(1));
    let small = [7u8; 64];
    let (src, mut dst) = (vec![3u8; 4096], vec![0u8; 4096]);
    let mut rounds: [Vec<f64>; 6] = Default::default();
    for round in 0..args.rounds {
        eprintln!("vm-micro: round {} of {}", round + 1, args.rounds);
        let mut calls = 0.0;
        for _ in 0..args.calls {
            calls += timed(&metered, &echo, &small)?;
        }
        rounds[0].push(calls / f64::from(args.calls) * 1e6);
        rounds[1].push(timed(&metered, &compute, &[])? * 1e3);
        rounds[2].push(timed(&unmetered, &compute_unmetered, &[])? * 1e3);
        let per_copy = 1e9 / f64::from(args.copies);
        rounds[3].push(timed(&metered, &copy, &asset_input)? * per_copy);
        rounds[4].push(timed(&metered, &copy, &guest_input)? * per_copy);
        let started = Instant::now();
        for _ in 0..args.copies {
            dst.copy_from_slice(black_box(&src));
            black_box(&mut dst);
        }
        rounds[5].push(started.elapsed().as_secs_f64() * per_copy);
    }
    let [
        call_us,
        metered_ms,
        unmetered_ms,
        asset_ns,
        guest_ns,
        native_ns,
    ] = rounds.map(|mut xs| median(&mut xs).unwrap_or(f64::NAN));
    let report = json!({
        "rounds": args.rounds,
        "call_small_module_us": call_us,
        "compute_metered_ms": metered_ms,
        "compute_unmetered_ms": unmetered_ms,
        "fuel_cost_ratio": metered_ms / unmetered_ms,
        "asset_read_4k_ns": asset_ns,
        "guest_memory_copy_4k_ns": guest_ns,
        "native_copy_4k_ns": native_ns,
        "asset_read_over_guest_copy": asset_ns / guest_ns,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
