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
//!
//! With `--snapshot-mib N` it measures a snapshot instead: the members'
//! store is filled with N MiB of storage assets through the log while one
//! member is cut off, the leader snapshots and purges its log, and the
//! member is brought back and catches up from the snapshot, sent in
//! 48 KiB chunks as between servers. Reported per run: how much the
//! process's peak resident memory grew from the snapshot to the catch-up
//! (all three members are in the process), and how long that took.

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
use stats::medians_of;
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
    /// Measure a snapshot of a store holding this many MiB of storage
    /// assets, sent to a member that was cut off (instead of issuances).
    #[arg(long, default_value_t = 0)]
    snapshot_mib: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.runs == 0 || args.requests == 0 || args.concurrency == 0 {
        bail!("--runs, --requests and --concurrency must be at least 1");
    }
    if args.snapshot_mib > 0 {
        return stats::in_scratch(&args.dir, || snapshots(&args));
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

/// Three members in one process, each a machine and its Raft handle.
type Members = Vec<(Rc<RefCell<Machine>>, controlplane::cluster::Raft)>;

/// Start three members in `dir` over `routes`, and the index of the one
/// elected leader.
async fn start_members(
    dir: &Path,
    routes: &Routes,
    config: openraft::Config,
) -> anyhow::Result<(Members, usize)> {
    let config = Arc::new(config.validate()?);
    let keys = dir.join("keys");
    drop(open_machine(&keys)?);
    let mut members = BTreeMap::new();
    let mut nodes = Vec::new();
    for id in 1..=3u64 {
        let node_dir = dir.join(format!("node{id}"));
        copy_shared_keys(&keys, &node_dir)?;
        let machine = Rc::new(RefCell::new(open_machine(&node_dir)?));
        let raft = local::start(id, routes, config.clone(), &node_dir, machine.clone())
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
    let leader = (metrics.current_leader.expect("waited for") - 1) as usize;
    Ok((nodes, leader))
}

fn on_local_runtime<T>(
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    tokio::task::LocalSet::new().block_on(&runtime, work)
}

/// Three members in one process; `concurrency` tasks propose through the
/// leader, each waiting for its entry to be applied there.
fn cluster(args: &Args, dir: &Path) -> anyhow::Result<Value> {
    on_local_runtime(async {
        let routes = Routes::default();
        let config = openraft::Config {
            heartbeat_interval: 100,
            election_timeout_min: 1000,
            election_timeout_max: 2000,
            ..openraft::Config::default()
        };
        let (nodes, leader) = start_members(dir, &routes, config).await?;
        let (machine, raft) = nodes[leader].clone();

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

/// A field of /proc/self/status, in KiB.
fn status_kib(field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|line| {
            line.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .with_context(|| format!("no {field} in /proc/self/status"))
}

/// Storage assets of 4 MiB, written 48 KiB at a time (what one log entry
/// carries), `concurrency` writes in flight through the leader.
async fn fill(
    args: &Args,
    raft: &controlplane::cluster::Raft,
    machine: &Rc<RefCell<Machine>>,
) -> anyhow::Result<()> {
    use controlplane::assets::{AllocLimits, AssetApplied, AssetChange};
    use controlplane::machine::Applied;
    use dataplane::assets::address::NodeNumber;
    use dataplane::assets::memory::Owner;
    const ASSET: u64 = 4 << 20;
    const WRITE: usize = 48 << 10;
    let owner = Owner([7; 32]);
    let limits = AllocLimits {
        default_quota: u64::MAX / 4,
        node_max: u64::MAX / 4,
    };
    let node = NodeNumber::new(1)?;
    let mut writes = Vec::new();
    for _ in 0..(args.snapshot_mib << 20).div_ceil(ASSET) {
        let id = machine.borrow().assets().next_id(node);
        let alloc = AssetChange::Alloc {
            owner,
            size: ASSET,
            id,
            name: None,
            zone: None,
            limits,
        };
        match raft.client_write(Command::Asset(alloc)).await?.data {
            Outcome::Applied(Applied::Asset(AssetApplied::Allocated(_))) => {}
            other => bail!("an allocation answered {other:?}"),
        }
        for offset in (0..ASSET).step_by(WRITE) {
            writes.push((id, offset));
        }
    }
    let writes = Rc::new(RefCell::new(writes));
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (raft, writes) = (raft.clone(), writes.clone());
        tasks.push(tokio::task::spawn_local(async move {
            loop {
                let Some((id, offset)) = writes.borrow_mut().pop() else {
                    return Ok::<(), anyhow::Error>(());
                };
                // Bytes that do not compress or repeat.
                let len = (ASSET - offset).min(WRITE as u64);
                let data: Vec<u8> = (0..len)
                    .map(|i| ((offset + i).wrapping_mul(0x9E37_79B9) >> 7) as u8)
                    .collect();
                let write = AssetChange::Write {
                    caller: owner,
                    id,
                    offset,
                    data,
                };
                match raft.client_write(Command::Asset(write)).await?.data {
                    Outcome::Applied(_) => {}
                    other => bail!("a write answered {other:?}"),
                }
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// One snapshot run: fill the store with a member cut off, snapshot on the
/// leader, purge its log, and let the member catch up from the snapshot.
fn snapshot_run(args: &Args, dir: &Path) -> anyhow::Result<Value> {
    on_local_runtime(async {
        let routes = Routes::default();
        let config = openraft::Config {
            snapshot_policy: openraft::SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: 0,
            snapshot_max_chunk_size: 48 * 1024,
            // A snapshot of hundreds of MiB takes seconds to install.
            install_snapshot_timeout: 60_000,
            // The member cut off while the store fills must not stand for
            // election meanwhile: a new leader would send it the entries
            // it missed from its own log, not the snapshot.
            heartbeat_interval: 100,
            election_timeout_min: 60_000,
            election_timeout_max: 90_000,
            ..openraft::Config::default()
        };
        let (nodes, leader) = start_members(dir, &routes, config).await?;
        let (machine, raft) = nodes[leader].clone();
        let away = (leader + 1) % 3;
        let away_id = away as u64 + 1;
        routes.down.borrow_mut().insert(away_id);
        let filling = Instant::now();
        fill(args, &raft, &machine).await?;
        eprintln!(
            "cluster-micro: {} MiB written through the log in {:.1} s",
            args.snapshot_mib,
            filling.elapsed().as_secs_f64()
        );
        let applied = raft
            .metrics()
            .borrow()
            .last_applied
            .context("nothing applied")?;
        let wait = Some(Duration::from_secs(600));

        // Peak resident memory from here on: writing 5 to clear_refs
        // resets VmHWM to the current resident size.
        std::fs::write("/proc/self/clear_refs", "5")?;
        let resident_before = status_kib("VmRSS:")?;
        let started = Instant::now();
        raft.trigger().snapshot().await?;
        raft.wait(wait).snapshot(applied, "snapshot built").await?;
        let built = started.elapsed();
        eprintln!("cluster-micro: snapshot built in {} ms", built.as_millis());
        raft.trigger().purge_log(applied.index).await?;
        raft.wait(wait)
            .metrics(|m| m.purged == Some(applied), "log purged")
            .await?;
        routes.down.borrow_mut().remove(&away_id);
        eprintln!("cluster-micro: log purged; the member is back");
        nodes[away]
            .1
            .wait(wait)
            .metrics(
                |m| {
                    m.last_applied
                        .is_some_and(|last| last.index >= applied.index)
                },
                "caught up",
            )
            .await?;
        if nodes[away].1.metrics().borrow().snapshot != Some(applied) {
            bail!("the member caught up from the log, not from the snapshot");
        }
        let caught_up = started.elapsed();
        let peak = status_kib("VmHWM:")?;

        let store = |n: usize| -> anyhow::Result<Vec<u8>> {
            Ok(controlplane::machine::snapshot::dump(
                &nodes[n].0.borrow().authority().database(),
            )?)
        };
        if store(away)? != store(leader)? {
            bail!("the member that caught up holds another store than the leader");
        }
        let store_bytes = std::fs::metadata(machine.borrow().authority().store_path())?.len();
        for (_, raft) in &nodes {
            raft.shutdown().await?;
        }
        Ok(json!({
            "store_mib": store_bytes as f64 / (1 << 20) as f64,
            "snapshot_build_ms": built.as_millis() as u64,
            "catch_up_ms": caught_up.as_millis() as u64,
            "peak_rss_growth_mib": peak.saturating_sub(resident_before) as f64 / 1024.0,
        }))
    })
}

fn snapshots(args: &Args) -> anyhow::Result<()> {
    let mut runs = Vec::new();
    for r in 0..args.runs {
        let dir = args.dir.join(format!("snapshot-{r}"));
        eprintln!(
            "cluster-micro: snapshot of {} MiB, run {}/{}",
            args.snapshot_mib,
            r + 1,
            args.runs
        );
        let report = snapshot_run(args, &dir)?;
        eprintln!("cluster-micro: {report}");
        let _ = std::fs::remove_dir_all(&dir);
        runs.push(report);
    }
    let mut out = medians_of(
        &runs,
        &[
            "store_mib",
            "snapshot_build_ms",
            "catch_up_ms",
            "peak_rss_growth_mib",
        ],
    );
    out.insert("snapshot_mib".into(), json!(args.snapshot_mib));
    out.insert("runs".into(), json!(runs));
    println!("{}", serde_json::to_string_pretty(&Value::Object(out))?);
    Ok(())
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
        let mut side = medians_of(reports, &["per_second", "latency_us_p50", "latency_us_p99"]);
        side.insert("runs".into(), json!(reports));
        out.insert((*name).into(), Value::Object(side));
    }
    out.insert("requests".into(), json!(args.requests));
    out.insert("concurrency".into(), json!(args.concurrency));
    println!("{}", serde_json::to_string_pretty(&Value::Object(out))?);
    Ok(())
}
