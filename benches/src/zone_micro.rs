//! What publishing a zone change to the workers costs as the zone grows:
//! the whole zone built again (what every change cost before the
//! publisher learned which names changed, and what start-up costs) against
//! one change published in place (`ZonePublisher::publish`), both in one
//! process over the same zone, at several zone sizes. The zone is filled
//! through the state machine's own `Command::Zone`; each name has an
//! address and a pin, as an enrolled name does.
//!
//! cargo run --release -p internet2-benches --bin zone-micro -- --sizes 1000,8000,64000

mod stats;

use anyhow::Context;
use clap::Parser;
use controlplane::authority::ca::KeyAlgorithm;
use controlplane::authority::ct::LogKeyAlgorithm;
use controlplane::dns::{RecordSet, Tlsa, ZoneConfig};
use controlplane::machine::{Command, Machine};
use controlplane::runtime::{ApexMembers, ZonePublisher};
use serde_json::json;
use stats::median;
use std::path::PathBuf;
use std::time::{Instant, SystemTime};

#[derive(Parser)]
struct Args {
    /// Zone sizes (names), comma-separated, ascending.
    #[arg(long, value_delimiter = ',', default_value = "1000,8000,64000")]
    sizes: Vec<usize>,
    /// Whole-zone builds timed per size (median).
    #[arg(long, default_value_t = 5)]
    builds: usize,
    /// Single-name changes published per size (median).
    #[arg(long, default_value_t = 200)]
    changes: usize,
    /// Scratch directory (removed at the end).
    #[arg(long, default_value = "/tmp/i2-zone-micro")]
    dir: PathBuf,
}

const APEX: &str = "internet2.test.";

fn records(i: usize) -> RecordSet {
    let address = format!("fd71:7e57:1::{:x}:{:x}", i >> 16, i & 0xffff)
        .parse()
        .expect("a valid address");
    let mut pin = [0u8; 32];
    pin[..8].copy_from_slice(&(i as u64).to_be_bytes());
    RecordSet::new(
        vec![address],
        vec![Tlsa {
            port: 443,
            spki_sha256: pin,
        }],
        None,
    )
    .expect("a valid record set")
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    stats::in_scratch(&args.dir, || run(&args))
}

fn run(args: &Args) -> anyhow::Result<()> {
    let config = ZoneConfig {
        apex: APEX.into(),
        server_name: "node1".into(),
        server_addresses: Vec::new(),
        server_port: 443,
    };
    let mut machine = Machine::open(
        &args.dir,
        KeyAlgorithm::EcdsaP256,
        LogKeyAlgorithm::EcdsaP256Sha256,
        Some(&config),
        SystemTime::now(),
    )
    .context("opening a scratch store")?;
    let change = |machine: &mut Machine, edits: Vec<(String, Option<RecordSet>)>| {
        let zone = machine.zone().context("the store has its zone")?;
        if let Some(planned) = zone.plan(edits)? {
            machine.apply(Command::Zone(planned))?;
        }
        anyhow::Ok(())
    };
    let mut rows = Vec::new();
    let mut filled = 0;
    for &size in &args.sizes {
        while filled < size {
            let chunk = (size - filled).min(4096);
            let edits = (filled..filled + chunk)
                .map(|i| (format!("n{i}.{APEX}"), Some(records(i))))
                .collect();
            change(&mut machine, edits)?;
            filled += chunk;
        }
        eprintln!("zone-micro: {size} names");
        let zone = machine.zone().context("the store has its zone")?;
        let mut whole = Vec::new();
        let mut publisher = None;
        for _ in 0..args.builds {
            let started = Instant::now();
            publisher = Some(ZonePublisher::start(
                zone,
                "node1".into(),
                ApexMembers::default(),
            )?);
            whole.push(started.elapsed().as_secs_f64() * 1e6);
        }
        let mut publisher = publisher.context("--builds must be at least 1")?;
        let mut in_place = Vec::new();
        for c in 0..args.changes {
            // Alternately re-address a name and remove-then-restore one.
            let i = (c * 7919) % size;
            let edit = match c % 3 {
                0 => Some(records(i + size)),
                1 => None,
                _ => Some(records(i)),
            };
            change(&mut machine, vec![(format!("n{i}.{APEX}"), edit)])?;
            let zone = machine.zone().context("the store has its zone")?;
            let started = Instant::now();
            publisher.publish(zone, &ApexMembers::default())?;
            in_place.push(started.elapsed().as_secs_f64() * 1e6);
        }
        let whole_us = median(&mut whole).unwrap_or(0.0);
        let in_place_us = median(&mut in_place).unwrap_or(0.0);
        rows.push(json!({
            "names": size,
            "whole_zone_us": whole_us,
            "one_change_in_place_us": in_place_us,
            "ratio": whole_us / in_place_us.max(0.001),
        }));
    }
    println!("{}", serde_json::to_string_pretty(&rows)?);
    Ok(())
}
