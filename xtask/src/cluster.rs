//! `cargo xtask bench-cluster`: three members in network namespaces on one
//! bridge (fd71:7e57:0:4::1..3, a client at ::10), removed however the run
//! ends.
//!
//! 1. Issuance (durable, CT-logged, through the leader) with 32 requests
//!    in flight, alternating run by run with one phase0 server in the same
//!    topology under the same load; medians, and server CPU per issuance
//!    (all members together) read from /proc around each run. With
//!    `--baseline-server`, that binary (an older build) runs the same
//!    cluster and single node after ours in each run, with the same client.
//! 2. Assets (`--asset-runs`, each a fresh cluster): `internet2
//!    asset-bench` from the client allocates memory assets at member 1 and
//!    reads them there and through member 2, which proxies each request
//!    to member 1 (`ASSET_PROXY`): 4 KiB reads one at a time (p50, p99)
//!    and 16 MiB in flight (Gbit/s), direct and proxied in the same
//!    process; then 1 000 durable storage allocations and 4 KiB storage
//!    reads one at a time at member 1 and at member 2 (each answers from
//!    its own store after a read fence). The members' CPU is sampled from
//!    /proc meanwhile and each phase charged its window's share (per read,
//!    per Gbit).
//! 3. Failover: `internet2 failover-load` issues certificates through the
//!    members while the leader is killed (`kill -9`) and restarted, again
//!    and again; for each kill, the time until a certificate is
//!    acknowledged by another member. At the end the load checks every
//!    member's log against every acknowledged certificate and every tree
//!    head against the latest (independent verifier).

use crate::bench::{
    CpuSamples, Proc, WorkDir, build_release, check_interrupt, clk_tck, install_signal_handlers,
    medians, now_ms, proc_cpu_ticks, start_server,
};
use crate::netns::{ip, ns_sh, remove};
use crate::report::Side;
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PREFIX: &str = "i2k-";
const PORT: u16 = 4433;
const CLIENT_IP: &str = "fd71:7e57:0:4::10";

#[derive(clap::Args, Clone, Debug)]
pub struct ClusterBenchArgs {
    /// Runs of the issuance phase (each: a fresh cluster, then a fresh
    /// single node); medians are reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Issuances per run.
    #[arg(long, default_value_t = 3000)]
    pub requests: u64,
    /// Issuances in flight.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Leader kills in the failover phase (0: skip it).
    #[arg(long, default_value_t = 20)]
    pub kills: usize,
    /// Runs of the asset phase (0: skip it): each a fresh cluster, and
    /// `internet2 asset-bench` from the client's namespace allocating at
    /// member 1, reading there and through member 2, which proxies.
    #[arg(long, default_value_t = 3)]
    pub asset_runs: usize,
    /// Also write the report as JSON here.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Also measure this server binary (an older build) in the issuance
    /// phase, alternating with ours run by run, with the same client.
    #[arg(long, value_name = "PATH")]
    pub baseline_server: Option<PathBuf>,
}

/// The namespaces; Drop kills what runs in them and deletes them.
struct Topology {
    hub: String,
    members: Vec<String>,
    client: String,
    created: Vec<String>,
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            if let Err(e) = remove(ns) {
                eprintln!("bench-cluster: could not remove namespace {ns}: {e:#}");
            }
        }
    }
}

fn member_ip(n: usize) -> String {
    format!("fd71:7e57:0:4::{}", n + 1)
}

impl Topology {
    fn create() -> Result<Topology> {
        let pid = std::process::id();
        let mut topo = Topology {
            hub: format!("{PREFIX}hub-{pid}"),
            members: (1..=3).map(|n| format!("{PREFIX}m{n}-{pid}")).collect(),
            client: format!("{PREFIX}c-{pid}"),
            created: Vec::new(),
        };
        ip(&["netns", "add", &topo.hub])?;
        topo.created.push(topo.hub.clone());
        ip(&["-n", &topo.hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &topo.hub, "link", "set", "br0", "up"])?;
        let hosts: Vec<(String, String)> = topo
            .members
            .iter()
            .enumerate()
            .map(|(n, ns)| (ns.clone(), member_ip(n)))
            .chain([(topo.client.clone(), CLIENT_IP.to_owned())])
            .collect();
        for (i, (ns, address)) in hosts.iter().enumerate() {
            ip(&["netns", "add", ns])?;
            topo.created.push(ns.clone());
            ns_sh(
                ns,
                "echo 0 > /proc/sys/net/ipv6/conf/all/accept_dad && \
                 echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad && \
                 echo 1 > /proc/sys/net/ipv6/conf/all/keep_addr_on_down && \
                 echo 1 > /proc/sys/net/ipv6/conf/default/keep_addr_on_down",
            )?;
            let port = format!("p{i}");
            ip(&[
                "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", &port, "netns",
                &topo.hub,
            ])?;
            ip(&["-n", &topo.hub, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &topo.hub, "link", "set", &port, "up"])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{address}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        }
        Ok(topo)
    }
}

/// The binaries and the scratch space of one invocation.
struct Bench {
    server: PathBuf,
    client: PathBuf,
    work: WorkDir,
    topo: Topology,
}

/// One running member (or single node).
struct Node {
    proc: Proc,
    dir: PathBuf,
}

impl Bench {
    /// A fresh data directory and config for member `n` (`tag` keeps runs
    /// apart).
    fn prepare(&self, tag: &str, n: usize) -> Result<PathBuf> {
        let dir = self.work.path.join(format!("{tag}-m{}", n + 1));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("server.toml"),
            format!(
                "# Written by `cargo xtask bench-cluster`.\n\
                 [internet2]\nbind = \"{}\"\nport = {PORT}\n\
                 [dataplane]\nworkers = 1\n\
                 [trustchain_authority]\ndns_name = \"m{}\"\n\
                 [hypermesh_assets]\nplot_k = 12\nnode_number = {}\n",
                member_ip(n),
                n + 1,
                n + 1
            ),
        )?;
        Ok(dir)
    }

    /// Start the server of member `n` in `dir` with `args`.
    fn start(&self, n: usize, dir: &Path, args: &[&str]) -> Result<Node> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.topo.members[n]])
            .arg(&self.server)
            .args(["--mode", "production", "--config"])
            .arg(dir.join("server.toml"))
            .arg("--data-dir")
            .arg(dir)
            .args(args)
            .env("RUST_LOG", "info,openraft=warn");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("server.log"))?;
        let (proc, _) = start_server(cmd, Side::OURS, Stdio::from(log))
            .with_context(|| format!("starting member {} in {}", n + 1, dir.display()))?;
        Ok(Node {
            proc,
            dir: dir.to_owned(),
        })
    }

    /// A new three-member cluster: member 1 starts it, 2 and 3 join.
    fn form(&self, tag: &str) -> Result<Vec<Option<Node>>> {
        let first_dir = self.prepare(tag, 0)?;
        let first = self.start(
            0,
            &first_dir,
            &["--bootstrap", "federated", "--cluster-init"],
        )?;
        let mut nodes = vec![Some(first)];
        for n in 1..3 {
            let token = operator(&self.server, &first_dir, &["cluster", "join-token"])?;
            let dir = self.prepare(tag, n)?;
            let via = format!("[{}]:{PORT}", member_ip(0));
            nodes.push(Some(self.start(
                n,
                &dir,
                &[
                    "--bootstrap",
                    "federated",
                    "--join",
                    &via,
                    "--join-token",
                    &token,
                ],
            )?));
        }
        self.wait_status(&first_dir, Duration::from_secs(60), |status| {
            voters(status) == 3 && status["leader"].is_string()
        })?;
        Ok(nodes)
    }

    /// `internet2 ARGS --ca … --identity …` in the client namespace.
    fn client(&self, ca_dir: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.topo.client])
            .arg(&self.client)
            .args(args)
            .arg("--ca")
            .arg(ca_dir.join("ca.pem"))
            .arg("--identity")
            .arg(ca_dir.join("operator.pem"));
        cmd
    }

    fn status(&self, ca_dir: &Path) -> Option<Value> {
        self.status_of(ca_dir, &all_members())
    }

    /// The first of `members` (comma-separated) to answer: who it takes
    /// for the leader.
    fn own_view(&self, ca_dir: &Path, members: &str) -> Option<Value> {
        let out = self
            .client(
                ca_dir,
                &[
                    "cluster",
                    "status",
                    "--json",
                    "--own-view",
                    "--connect",
                    members,
                ],
            )
            .args(["--timeout-ms", "1000"])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The status as the first of `members` (comma-separated) to answer
    /// gives it.
    fn status_of(&self, ca_dir: &Path, members: &str) -> Option<Value> {
        let out = self
            .client(
                ca_dir,
                &["cluster", "status", "--json", "--connect", members],
            )
            .args(["--timeout-ms", "1000"])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    fn wait_status(
        &self,
        ca_dir: &Path,
        limit: Duration,
        check: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + limit;
        loop {
            check_interrupt()?;
            if let Some(status) = self.status(ca_dir).filter(|s| check(s)) {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "the cluster did not reach the expected state in {} s (last: {:?})",
                    limit.as_secs(),
                    self.status(ca_dir)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `internet2 authority-bench --issuance-only` at `address`; the
    /// report and the CPU ticks `pids` used meanwhile.
    fn issuance(
        &self,
        ca_dir: &Path,
        address: &str,
        pids: &[u32],
        args: &ClusterBenchArgs,
        out: &Path,
    ) -> Result<Value> {
        let before: u64 = pids
            .iter()
            .map(|p| proc_cpu_ticks(*p))
            .sum::<Result<u64>>()?;
        let status = self
            .client(
                ca_dir,
                &["authority-bench", "--issuance-only", "--connect", address],
            )
            .args(["--requests", &args.requests.to_string()])
            .args(["--concurrency", &args.concurrency.to_string()])
            .arg("--json")
            .arg(out)
            .stdout(Stdio::null())
            .status()?;
        let after: u64 = pids
            .iter()
            .map(|p| proc_cpu_ticks(*p))
            .sum::<Result<u64>>()?;
        if !status.success() {
            bail!("authority-bench against {address} failed ({status})");
        }
        let report: Value = serde_json::from_str(&std::fs::read_to_string(out)?)?;
        let loaded = &report["issuance_loaded"];
        let requests = loaded["requests"].as_f64().unwrap_or(0.0).max(1.0);
        let cpu_us = (after - before) as f64 / clk_tck()? * 1e6 / requests;
        Ok(json!({
            "per_second": loaded["per_second"],
            "latency_us_p50": loaded["latency_us_p50"],
            "latency_us_p99": loaded["latency_us_p99"],
            "server_cpu_us_per_issuance": cpu_us,
        }))
    }
}

fn voters(status: &Value) -> usize {
    status["members"]
        .as_array()
        .map_or(0, |m| m.iter().filter(|m| m["role"] == "voter").count())
}

fn all_members() -> String {
    (0..3)
        .map(|n| format!("[{}]:{PORT}", member_ip(n)))
        .collect::<Vec<_>>()
        .join(",")
}

/// The member index of the status' leader (`mN`).
fn leader_of(status: &Value) -> Option<usize> {
    let name = status["leader"].as_str()?;
    name.strip_prefix('m')?
        .parse::<usize>()
        .ok()?
        .checked_sub(1)
}

fn operator(server: &Path, dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(server)
        .arg("--config")
        .arg(dir.join("server.toml"))
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "internet2-server {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

pub fn bench_cluster(args: &ClusterBenchArgs) -> Result<()> {
    if args.runs == 0 || args.requests == 0 || args.concurrency == 0 {
        bail!("--runs, --requests and --concurrency must be at least 1");
    }
    crate::netns::preflight()?;
    install_signal_handlers()?;
    let mut take = build_release("bench-cluster", &["-p", "internet2-server"])?;
    let server = take("internet2-server")?;
    let client = take("internet2")?;
    crate::bench::remove_stale_work_dirs(PREFIX);
    if let Some(path) = &args.baseline_server
        && !path.is_file()
    {
        bail!("--baseline-server {}: no such file", path.display());
    }
    let mut bench = Bench {
        server: server.clone(),
        client,
        work: WorkDir::create(PREFIX)?,
        topo: Topology::create()?,
    };
    let mut sides = vec![("ours", server, Vec::new(), Vec::new())];
    if let Some(path) = &args.baseline_server {
        sides.push(("baseline", path.clone(), Vec::new(), Vec::new()));
    }
    for run in 0..args.runs {
        for (label, server, cluster_runs, single_runs) in &mut sides {
            bench.server = server.clone();
            let (cluster, single) = issuance_run(&bench, args, label, run)?;
            cluster_runs.push(cluster);
            single_runs.push(single);
        }
    }
    bench.server = sides[0].1.clone();
    let summary = |cluster_runs: &[Value], single_runs: &[Value]| {
        let cluster = medians(cluster_runs);
        let single = medians(single_runs);
        let ratio = match (
            cluster["per_second"].as_f64(),
            single["per_second"].as_f64(),
        ) {
            (Some(c), Some(s)) if s > 0.0 => json!(c / s),
            _ => Value::Null,
        };
        json!({
            "cluster_of_3": cluster,
            "single_node": single,
            "cluster_vs_single_per_second": ratio,
            "runs": { "cluster_of_3": cluster_runs, "single_node": single_runs },
        })
    };
    let mut issuance = summary(&sides[0].2, &sides[0].3);
    issuance["requests"] = json!(args.requests);
    issuance["concurrency"] = json!(args.concurrency);
    if let Some((_, path, cluster_runs, single_runs)) = sides.get(1) {
        let baseline = summary(cluster_runs, single_runs);
        let ratio = |kind: &str, key: &str| match (
            issuance[kind][key].as_f64(),
            baseline[kind][key].as_f64(),
        ) {
            (Some(ours), Some(theirs)) if theirs > 0.0 => json!(ours / theirs),
            _ => Value::Null,
        };
        issuance["vs_baseline"] = json!({
            "cluster_of_3_per_second": ratio("cluster_of_3", "per_second"),
            "single_node_per_second": ratio("single_node", "per_second"),
            "cluster_of_3_server_cpu_us_per_issuance":
                ratio("cluster_of_3", "server_cpu_us_per_issuance"),
            "single_node_server_cpu_us_per_issuance":
                ratio("single_node", "server_cpu_us_per_issuance"),
        });
        issuance["baseline"] = baseline;
        issuance["baseline"]["server"] = json!(path.display().to_string());
    }
    let mut asset_runs = Vec::new();
    for run in 0..args.asset_runs {
        asset_runs.push(assets_run(&bench, run, args.asset_runs)?);
    }
    let assets = match asset_runs.is_empty() {
        true => Value::Null,
        false => json!({"median": medians(&asset_runs), "runs": asset_runs}),
    };
    let failover = if args.kills > 0 {
        failover(&bench, args.kills)?
    } else {
        Value::Null
    };
    let report = json!({
        "issuance": issuance,
        "assets": assets,
        "failover": failover,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if report["failover"]["check_passed"] == false {
        bail!("the failover check failed (see the report)");
    }
    Ok(())
}

/// One run of the issuance phase with `bench.server`: a fresh cluster of
/// three, then a fresh single node, under the same load.
fn issuance_run(
    bench: &Bench,
    args: &ClusterBenchArgs,
    label: &str,
    run: usize,
) -> Result<(Value, Value)> {
    check_interrupt()?;
    eprintln!(
        "bench-cluster: issuance, run {}/{}, {label}: three members",
        run + 1,
        args.runs
    );
    let tag = format!("run{run}-{label}");
    let nodes = bench.form(&tag)?;
    let ca_dir = &nodes[0].as_ref().expect("started").dir;
    let status = bench.wait_status(ca_dir, Duration::from_secs(10), |s| leader_of(s).is_some())?;
    let leader = leader_of(&status).expect("checked");
    let pids: Vec<u32> = nodes.iter().flatten().map(|n| n.proc.pid()).collect();
    let address = format!("[{}]:{PORT}", member_ip(leader));
    let out = bench.work.path.join(format!("{tag}-cluster.json"));
    let cluster = bench.issuance(ca_dir, &address, &pids, args, &out)?;
    drop(nodes);

    eprintln!(
        "bench-cluster: issuance, run {}/{}, {label}: one node",
        run + 1,
        args.runs
    );
    let dir = bench.prepare(&format!("{tag}-single"), 0)?;
    let single = bench.start(0, &dir, &[])?;
    let address = format!("[{}]:{PORT}", member_ip(0));
    let out = bench.work.path.join(format!("{tag}-single.json"));
    let single_run = bench.issuance(&dir, &address, &[single.proc.pid()], args, &out)?;
    drop(single);
    Ok((cluster, single_run))
}

/// One run of the asset phase: a fresh cluster of three; from the client's
/// namespace, `internet2 asset-bench` with member 1 first and member 2
/// second, so its reads run at the holder and through a member that
/// proxies them, alternating phases in one process.
fn assets_run(bench: &Bench, run: usize, runs: usize) -> Result<Value> {
    check_interrupt()?;
    eprintln!("bench-cluster: assets, run {}/{runs}", run + 1);
    let tag = format!("assets{run}");
    let nodes = bench.form(&tag)?;
    let ca_dir = &nodes[0].as_ref().expect("started").dir;
    let connect = format!("[{}]:{PORT},[{}]:{PORT}", member_ip(0), member_ip(1));
    let out = bench.work.path.join(format!("{tag}.json"));
    let pids: Vec<u32> = nodes.iter().flatten().map(|n| n.proc.pid()).collect();
    let mut client = bench
        .client(ca_dir, &["asset-bench", "--connect", &connect])
        .args(["--allocs", "10000", "--reads", "5000"])
        .args(["--storage-allocs", "1000", "--bulk-mib", "16"])
        .args(["--bulk-total-mib", "512", "--json"])
        .arg(&out)
        .stdout(Stdio::null())
        .spawn()?;
    // The members' CPU, sampled while it runs: each phase is charged what
    // they used within its window.
    let (status, samples) = CpuSamples::while_running(&pids, &mut client)?;
    drop(nodes);
    if !status.success() {
        bail!("asset-bench through {connect} failed ({status})");
    }
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
    let cpu = |window: &Value| samples.within(window);
    // Per unit of work (a request, a Gbit): all members, and the two the
    // phases use (member 1 holds the assets, member 2 proxies).
    let charged = |window: &Value, units: f64, scale: f64| -> Value {
        match cpu(window) {
            Some(members) if units > 0.0 => json!({
                "all_members": members.iter().sum::<f64>() * scale / units,
                "member_1": members[0] * scale / units,
                "member_2": members[1] * scale / units,
            }),
            _ => Value::Null,
        }
    };
    let per_read_us = |phase: &Value| {
        let reads = phase["requests"].as_f64().unwrap_or(0.0);
        charged(&phase["window_unix_ms"], reads, 1e6)
    };
    let per_gbit_s = |window: &Value, requests: &Value, bytes: &Value| {
        let gbit = requests.as_f64().unwrap_or(0.0) * bytes.as_f64().unwrap_or(0.0) * 8.0 / 1e9;
        charged(window, gbit, 1.0)
    };
    let proxied = &report["proxied"];
    let bulk = &report["bulk_read"];
    let storage = &report["storage"];
    Ok(json!({
        "read_4k_us_p50": report["read_4k"]["latency_us_p50"],
        "read_4k_us_p99": report["read_4k"]["latency_us_p99"],
        "proxied_read_4k_us_p50": proxied["read_4k"]["latency_us_p50"],
        "proxied_read_4k_us_p99": proxied["read_4k"]["latency_us_p99"],
        "ping_1k_us_p99": report["ping_1k"]["latency_us_p99"],
        "storage_read_4k_us_p50": storage["read_4k"]["latency_us_p50"],
        "storage_read_4k_us_p99": storage["read_4k"]["latency_us_p99"],
        "storage_read_4k_at_member_2_us_p50": storage["read_4k_at_other_member"]["latency_us_p50"],
        "storage_read_4k_at_member_2_us_p99": storage["read_4k_at_other_member"]["latency_us_p99"],
        "server_cpu_us_per_storage_read_4k": per_read_us(&storage["read_4k"]),
        "server_cpu_us_per_storage_read_4k_at_member_2": per_read_us(&storage["read_4k_at_other_member"]),
        "bulk_read_gbps": bulk["gbps"],
        "proxied_bulk_read_gbps": proxied["bulk_read_gbps"],
        "server_cpu_us_per_read_4k": per_read_us(&report["read_4k"]),
        "server_cpu_us_per_proxied_read_4k": per_read_us(&proxied["read_4k"]),
        "server_cpu_s_per_gbit_bulk": per_gbit_s(
            &bulk["window_unix_ms"],
            &bulk["requests"],
            &bulk["request_bytes"],
        ),
        "server_cpu_s_per_gbit_proxied_bulk": per_gbit_s(
            &proxied["bulk_read_window_unix_ms"],
            &proxied["bulk_read_requests"],
            &proxied["bulk_request_bytes"],
        ),
    }))
}

/// Kill the leader `kills` times under continuous issuance; see the module
/// documentation.
fn failover(bench: &Bench, kills: usize) -> Result<Value> {
    eprintln!("bench-cluster: failover, {kills} leader kills under continuous issuance");
    let mut nodes = bench.form("failover")?;
    let ca_dir = nodes[0].as_ref().expect("started").dir.clone();
    let stop = bench.work.path.join("failover.stop");
    let acks = bench.work.path.join("failover.acks");
    let summary = bench.work.path.join("failover.json");
    let log = File::create(bench.work.path.join("failover-load.log"))?;
    let mut load = bench
        .client(&ca_dir, &["failover-load", "--connect", &all_members()])
        // A dead member is given up after this (a request here takes
        // tens of milliseconds).
        .args(["--timeout-ms", "500"])
        .arg("--stop-file")
        .arg(&stop)
        .arg("--acks")
        .arg(&acks)
        .arg("--json")
        .arg(&summary)
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .context("starting internet2 failover-load")?;
    let mut commit_after_kill_ms = Vec::new();
    let mut elected_after_kill_ms = Vec::new();
    let mut missed = 0;
    for kill in 0..kills {
        check_interrupt()?;
        if let Some(status) = load.try_wait()? {
            keep_logs(bench);
            bail!("failover-load stopped before the kills were done ({status})");
        }
        let status = bench.wait_status(&ca_dir, Duration::from_secs(60), |s| {
            voters(s) == 3
                && leader_of(s).is_some()
                && s["members"]
                    .as_array()
                    .is_some_and(|m| m.iter().all(|m| m["lag"].as_u64().is_some_and(|l| l <= 50)))
        })?;
        let leader = leader_of(&status).expect("checked");
        let killed_address = format!("[{}]:{PORT}", member_ip(leader));
        let survivors = (0..3)
            .filter(|n| *n != leader)
            .map(|n| format!("[{}]:{PORT}", member_ip(n)))
            .collect::<Vec<_>>()
            .join(",");
        let node = nodes[leader].take().context("the leader is running")?;
        let dir = node.dir.clone();
        let killed_at = now_ms();
        drop(node); // SIGKILL
        // A new leader: elected, then a certificate acknowledged by a
        // member other than the one killed.
        let deadline = Instant::now() + Duration::from_secs(30);
        let (mut elected, mut committed) = (None, None);
        while Instant::now() < deadline && committed.is_none() {
            check_interrupt()?;
            if elected.is_none()
                && bench
                    .own_view(&ca_dir, &survivors)
                    .and_then(|s| leader_of(&s))
                    .is_some_and(|l| l != leader)
            {
                elected = Some(now_ms() - killed_at);
            }
            committed = first_ack_after(&acks, killed_at, &killed_address);
            std::thread::sleep(Duration::from_millis(20));
        }
        match committed {
            Some(at) => commit_after_kill_ms.push(at - killed_at),
            None => missed += 1,
        }
        if let Some(ms) = elected {
            elected_after_kill_ms.push(ms);
        }
        eprintln!(
            "bench-cluster: kill {}/{kills}: member {} (leader); elected after {elected:?} ms, a certificate committed after {:?} ms",
            kill + 1,
            leader + 1,
            committed.map(|at| at - killed_at)
        );
        nodes[leader] = Some(bench.start(leader, &dir, &["--bootstrap", "federated"])?);
    }
    // Every member back and caught up before the load stops and checks.
    bench.wait_status(&ca_dir, Duration::from_secs(120), |s| {
        voters(s) == 3
            && s["members"]
                .as_array()
                .is_some_and(|m| m.iter().all(|m| m["lag"].as_u64().is_some_and(|l| l <= 5)))
    })?;
    std::fs::write(&stop, b"")?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let exit = loop {
        if let Some(status) = load.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = load.kill();
            bail!("failover-load did not finish its check in 600 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let check: Value = std::fs::read_to_string(&summary)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or(Value::Null);
    let distribution = |values: &mut Vec<u64>| {
        values.sort_unstable();
        let at = |q: f64| {
            values
                .get(((values.len() as f64 - 1.0) * q).round() as usize)
                .copied()
        };
        json!({
            "all": values,
            "median": at(0.5),
            "p90": at(0.9),
            "max": values.last(),
        })
    };
    if !exit.success() {
        keep_logs(bench);
    }
    let within_2s = commit_after_kill_ms
        .iter()
        .filter(|ms| **ms <= 2000)
        .count();
    Ok(json!({
        "kills": kills,
        "commit_after_kill_ms": distribution(&mut commit_after_kill_ms),
        "elected_after_kill_ms": distribution(&mut elected_after_kill_ms),
        "kills_with_a_commit_within_2s": within_2s,
        "kills_without_a_commit_in_30s": missed,
        "load_exit": exit.code(),
        "check": check,
        "check_passed": exit.success(),
    }))
}

/// Copy the scratch directory (configs, logs, the load's acks) where it
/// outlives the run, for a post-mortem.
fn keep_logs(bench: &Bench) {
    let kept = std::env::temp_dir().join(format!("bench-cluster-logs-{}", std::process::id()));
    let copied = Command::new("cp")
        .arg("-r")
        .arg(&bench.work.path)
        .arg(&kept)
        .status();
    if copied.is_ok_and(|s| s.success()) {
        eprintln!("bench-cluster: the logs are kept in {}", kept.display());
    }
}

/// The time of the first certificate acknowledged after `after_ms` by a
/// member other than `not_by`.
fn first_ack_after(acks: &Path, after_ms: u64, not_by: &str) -> Option<u64> {
    let text = std::fs::read_to_string(acks).ok()?;
    text.lines()
        .rev()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .take_while(|ack| ack["t_ms"].as_u64().is_some_and(|t| t > after_ms))
        .filter(|ack| ack["member"].as_str() != Some(not_by))
        .filter_map(|ack| ack["t_ms"].as_u64())
        .min()
}
