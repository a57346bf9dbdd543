//! What a memory asset's allocation and free cost on one core, and whether
//! that cost grows with the assets already held: one worker's shard
//! (`dataplane::assets::memory::MemoryShard`: quota check, identifier,
//! zeroed region, table entry) against the floor of the same work without
//! the registry (a zeroed region in a plain hash map), both in one process,
//! alternating run by run, at several counts of assets held meanwhile.
//!
//! cargo run --release -p internet2-benches --bin asset-micro -- --held 0,100000,1000000

mod stats;

use clap::Parser;
use dataplane::assets::address::{Locator, NodeNumber};
use dataplane::assets::memory::{BlockReserve, MemoryShard, Owner, QuotaLedger};
use serde_json::json;
use stats::median;
use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// Assets held while measuring (each count is a separate shard),
    /// comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,100000,1000000")]
    held: Vec<u64>,
    /// Allocation+free pairs timed per run.
    #[arg(long, default_value_t = 2_000_000)]
    pairs: u64,
    /// Runs per side (medians reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Bytes per asset.
    #[arg(long, default_value_t = 64)]
    size: u64,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

const OWNERS: usize = 64;

fn owners() -> Vec<Owner> {
    (0..OWNERS).map(|i| Owner([i as u8; 32])).collect()
}

/// Pairs per second through a shard holding `held` assets meanwhile.
fn shard_rate(args: &Args, held: u64) -> anyhow::Result<f64> {
    let ledger = Arc::new(QuotaLedger::new(u64::MAX, u64::MAX));
    let node = NodeNumber::new(0)?;
    let reserve = Arc::new(BlockReserve::new(node, 0, 1, 1 << 30));
    let locator = Locator::in_ula("fd71:7e57::".parse()?, node);
    let mut shard = MemoryShard::new(locator, ledger, reserve, 0);
    let owners = owners();
    for i in 0..held {
        shard.alloc(&owners[i as usize % OWNERS], args.size)?;
    }
    let started = Instant::now();
    for i in 0..args.pairs {
        let owner = &owners[i as usize % OWNERS];
        let address = shard.alloc(owner, args.size)?;
        black_box(shard.free(owner, address)?);
    }
    Ok(args.pairs as f64 / started.elapsed().as_secs_f64())
}

/// The floor: the same regions in a plain map, no quota, no identifiers.
fn floor_rate(args: &Args, held: u64) -> f64 {
    let mut map: HashMap<u64, Box<[u8]>> = HashMap::new();
    for i in 0..held {
        map.insert(i, vec![0; args.size as usize].into_boxed_slice());
    }
    let started = Instant::now();
    for i in 0..args.pairs {
        let key = held + i;
        map.insert(key, vec![0; args.size as usize].into_boxed_slice());
        black_box(map.remove(&key));
    }
    args.pairs as f64 / started.elapsed().as_secs_f64()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.runs == 0 || args.pairs == 0 || args.size == 0 {
        anyhow::bail!("--runs, --pairs and --size must be at least 1");
    }
    let mut rows = Vec::new();
    println!(
        "{:>10} {:>16} {:>16} {:>8}",
        "held", "shard pairs/s", "floor pairs/s", "ratio"
    );
    for &held in &args.held {
        let (mut shard, mut floor) = (Vec::new(), Vec::new());
        for run in 0..args.runs {
            shard.push(shard_rate(&args, held)?);
            floor.push(floor_rate(&args, held));
            eprintln!(
                "held {held} run {}/{}: shard {:.0}/s, floor {:.0}/s",
                run + 1,
                args.runs,
                shard[run],
                floor[run]
            );
        }
        let runs = json!({"shard": shard.clone(), "floor": floor.clone()});
        let (s, f) = (
            median(&mut shard).unwrap_or(0.0),
            median(&mut floor).unwrap_or(0.0),
        );
        println!("{held:>10} {s:>16.0} {f:>16.0} {:>8.2}", s / f);
        rows.push(json!({
            "held": held,
            "shard_pairs_per_s": s,
            "floor_pairs_per_s": f,
            "runs": runs,
        }));
    }
    if let Some(path) = &args.json {
        let doc = json!({"size": args.size, "pairs": args.pairs, "results": rows});
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)?;
    }
    Ok(())
}
