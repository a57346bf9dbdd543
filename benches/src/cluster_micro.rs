//! The cluster's commit path, in one process and without sockets: durable,
//! CT-logged issuances through three members' Raft logs and state
//! machines (the in-process network, `controlplane::cluster::local`),
//! beside the same issuances on one node that applies groups of them with
//! one fsync (what a server does today). Each side runs `--concurrency`
//! requests in flight; per-request latency is from the proposal to the
//! answer (the entry applied on the leader, or the group fsynced). Medians
//! over `--runs`, the two sides alternating.
//!
//! cargo run --release -p internet2-benches --bin cluster-micro -- --runs 3 --requests 2000

mod stats;

use anyhow::{Context, bail};
use clap::Parser;
use controlplane::authority::ca::{IssueRequest, KeyAlgorithm};
use controlplane::authority::ct::LogKeyAlgorithm;
use controlplane::cluster::local::{self, Routes};
use controlplane::cluster::{Member, Outcome, copy_shared_keys};
use controlplane::machine::{Command, Machine};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use stats::median;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

#[derive(Parser)]
struct Args {
    /// Runs of each side; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Issuances per run.
    #[arg(long, default_value_t = 2000)]
    requests: u64,
    /// Requests in flight.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Scratch directory (removed at the end).
    #[arg(long, default_value = "/tmp/i2-cluster-micro")]
    dir: PathBuf,
    /// Also report the single node's rate over each window of this many
    /// issuances (the cost curve as the store grows); 0: none.
    #[arg(long, default_value_t = 0)]
    window: u64,
    /// Run the single node alone (no cluster side).
    #[arg(long)]
    single_only: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.runs == 0 || args.requests == 0 || args.concurrency == 0 {
        bail!("--runs, --requests and --concurrency must be at least 1");
    }
    stats::in_scratch(&args.dir, || run(&args))
}

fn request(i: u64) -> IssueRequest {
    let name = format!("n{i}.cluster-micro.test");
    IssueRequest {
        subject: name.clone(),
        dns_names: vec![name],
        ..IssueRequest::default()
    }
}

fn open_machine(dir: &Path) -> anyhow::Result<Machine> {
    Machine::open(
        dir,
        KeyAlgorithm::EcdsaP256,
        LogKeyAlgorithm::EcdsaP256Sha256,
        None,
        SystemTime::now(),
    )
    .with_context(|| format!("opening a store in {}", dir.display()))
}

fn report(latency: &Histogram<u64>, elapsed: Duration) -> Value {
    json!({
        "requests": latency.len(),
        "per_second": latency.len() as f64 / elapsed.as_secs_f64(),
        "latency_us_p50": latency.value_at_quantile(0.5),
        "latency_us_p99": latency.value_at_quantile(0.99),
    })
}

/// One node: groups of `concurrency` proposals applied with one fsync,
/// each answered when its group is durable.
fn single(args: &Args, dir: &Path) -> anyhow::Result<Value> {
    let mut machine = open_machine(dir)?;
    let mut latency = Histogram::<u64>::new(3)?;
    let mut windows = Vec::new();
    let mut window = (Histogram::<u64>::new(3)?, Instant::now());
    let started = Instant::now();
    let mut i = 0;
    while i < args.requests {
        let group = (args.requests - i).min(args.concurrency as u64);
        let group_start = Instant::now();
        machine.defer_durability();
        for _ in 0..group {
            let (_, certify) = machine
                .authority()
                .propose_issue(request(i), SystemTime::now())?;
            machine.apply(Command::Certify(certify))?;
            i += 1;
        }
        machine.make_durable()?;
        let us = group_start.elapsed().as_micros() as u64;
        for _ in 0..group {
            latency.record(us.max(1))?;
            window.0.record(us.max(1))?;
        }
        if args.window > 0 && window.0.len() >= args.window {
            let mut row = report(&window.0, window.1.elapsed());
            row["store_after"] = json!(i);
            eprintln!("cluster-micro: single, window to {i}: {row}");
            windows.push(row);
            window = (Histogram::<u64>::new(3)?, Instant::now());
        }
    }
    let mut out = report(&latency, started.elapsed());
    if args.window > 0 {
        out["windows"] = json!(windows);
    }
    Ok(out)
}

/// Three members in one process; `concurrency` tasks propose through the
/// leader, each waiting for its entry to be applied there.
fn cluster(args: &Args, dir: &Path) -> anyhow::Result<Value> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    tokio::task::LocalSet::new().block_on(&runtime, async {
        let routes = Routes::default();
        let config = Arc::new(
            openraft::Config {
                heartbeat_interval: 100,
                election_timeout_min: 1000,
                election_timeout_max: 2000,
                ..openraft::Config::default()
            }
            .validate()?,
        );
        let keys = dir.join("keys");
        drop(open_machine(&keys)?);
        let mut members = BTreeMap::new();
        let mut nodes = Vec::new();
        for id in 1..=3u64 {
            let node_dir = dir.join(format!("node{id}"));
            copy_shared_keys(&keys, &node_dir)?;
            let machine = Rc::new(RefCell::new(open_machine(&node_dir)?));
            let raft = local::start(id, &routes, config.clone(), &node_dir, machine.clone())
                .await
                .map_err(|e| anyhow::anyhow!("member {id}: {e}"))?;
            members.insert(
                id,
                Member {
                    name: format!("node{id}"),
                    address: format!("[fd71:7e57::{id}]:443"),
                    locator: None,
                },
            );
            nodes.push((machine, raft));
        }
        nodes[0].1.initialize(members).await?;
        let metrics = nodes[0]
            .1
            .wait(Some(Duration::from_secs(10)))
            .metrics(|m| m.current_leader.is_some(), "a leader")
            .await?;
        let (machine, raft) =
            nodes[(metrics.current_leader.expect("waited for") - 1) as usize].clone();

        let next = Rc::new(RefCell::new(0u64));
        let latency = Rc::new(RefCell::new(Histogram::<u64>::new(3)?));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..args.concurrency {
            let (machine, raft, next, latency) =
                (machine.clone(), raft.clone(), next.clone(), latency.clone());
            let total = args.requests;
            tasks.push(tokio::task::spawn_local(async move {
                loop {
                    let i = {
                        let mut next = next.borrow_mut();
                        if *next >= total {
                            return Ok::<(), anyhow::Error>(());
                        }
                        *next += 1;
                        *next - 1
                    };
                    let proposed = Instant::now();
                    let (_, certify) = machine
                        .borrow()
                        .authority()
                        .propose_issue(request(i), SystemTime::now())?;
                    let written = raft.client_write(Command::Certify(certify)).await?;
                    if !matches!(written.data, Outcome::Applied(_)) {
                        bail!("issuance {i} was not applied: {:?}", written.data);
                    }
                    let us = proposed.elapsed().as_micros() as u64;
                    latency.borrow_mut().record(us.max(1))?;
                }
            }));
        }
        for task in tasks {
            task.await??;
        }
        let elapsed = started.elapsed();
        let out = report(&latency.borrow(), elapsed);
        for (_, raft) in &nodes {
            raft.shutdown().await?;
        }
        Ok(out)
    })
}

fn run(args: &Args) -> anyhow::Result<()> {
    let mut sides: [(&str, Vec<Value>); 2] = [("single", Vec::new()), ("cluster", Vec::new())];
    for r in 0..args.runs {
        for (name, reports) in &mut sides {
            if args.single_only && *name != "single" {
                continue;
            }
            let dir = args.dir.join(format!("{name}-{r}"));
            eprintln!("cluster-micro: {name}, run {}/{}", r + 1, args.runs);
            let report = match *name {
                "single" => single(args, &dir)?,
                _ => cluster(args, &dir)?,
            };
            let _ = std::fs::remove_dir_all(&dir);
            reports.push(report);
        }
    }
    let mut out = serde_json::Map::new();
    for (name, reports) in &sides {
        let mut side = serde_json::Map::new();
        for key in ["per_second", "latency_us_p50", "latency_us_p99"] {
            let mut values: Vec<f64> = reports.iter().filter_map(|r| r[key].as_f64()).collect();
            side.insert(key.into(), json!(median(&mut values)));
        }
        side.insert("runs".into(), json!(reports));
        out.insert((*name).into(), Value::Object(side));
    }
    out.insert("requests".into(), json!(args.requests));
    out.insert("concurrency".into(), json!(args.concurrency));
    println!("{}", serde_json::to_string_pretty(&Value::Object(out))?);
    Ok(())
}
