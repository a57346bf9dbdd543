//! `internet2`: the client. `ping` and `stats` speak `stoq/1`; `bench`
//! drives the `perf` protocol on the dataplane's own workers.

#![forbid(unsafe_code)]

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use dataplane::client::bench::{BenchPlan, BenchReport};
use dataplane::client::rpc::Reply;
use dataplane::client::{self, ClientTarget};
use dataplane::protocols::stoq::Kind;
use dataplane::{BackendKind, CongestionControl, ServerTrust, StatsSnapshot, TransportSettings};
use hdrhistogram::Histogram;
use internet2_server::cli_authority;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(version, about = "Client for internet2-server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Round-trip a stoq/1 ping; with --count > 1 later pings resume the
    /// TLS session and use 0-RTT.
    Ping {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Payload echoed by the server (at most 1024 bytes).
        #[arg(long, default_value = "internet2")]
        payload: String,
    },
    /// The server's live per-worker counters.
    Stats {
        #[command(flatten)]
        target: TargetArgs,
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Load the server with the perf protocol and report goodput and handshakes.
    Bench(BenchArgs),
    /// Resolve a name through the server's embedded DNS (DNS over QUIC):
    /// its IPv6 endpoints and the pin of the key that must answer there.
    Resolve {
        #[command(flatten)]
        target: TargetArgs,
        /// The name, e.g. node1.internet2.test
        name: String,
        /// The service port whose TLSA pin to look up (default: --connect's port).
        #[arg(long)]
        port: Option<u16>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Get this machine's first certificate with a one-time token.
    Enroll(cli_authority::EnrollArgs<TargetArgs>),
    /// Issue, renew, revoke, list and verify certificates.
    #[command(subcommand)]
    Cert(cli_authority::CertCommand<TargetArgs>),
    /// The certificate authority's root.
    #[command(subcommand)]
    Ca(cli_authority::CaCommand<TargetArgs>),
    /// The cluster of the server's members.
    #[command(subcommand)]
    Cluster(cli_authority::ClusterCommand<TargetArgs>),
    /// Issue certificates one at a time through a cluster's members
    /// (failing over) until a stop file appears, then check every
    /// member's log against every acknowledged one (`cargo xtask
    /// bench-cluster` runs it while killing leaders).
    FailoverLoad(cli_authority::FailoverLoadArgs<TargetArgs>),
    /// The Certificate Transparency log (every answer verified here).
    #[command(subcommand)]
    Ct(cli_authority::CtCommand<TargetArgs>),
    /// Reach a server by its name in the embedded DNS: resolve it (DNS over
    /// QUIC at --connect), connect, check its key against the name's TLSA
    /// pin, and round-trip a ping.
    Connect {
        #[command(flatten)]
        target: TargetArgs,
        /// e.g. node1.internet2.test
        server: String,
    },
    /// Measure the embedded DNS: DoQ latency and queries/s on one
    /// connection, the legacy UDP gateway beside it (--udp-port), and how
    /// soon an update is visible.
    DnsBench {
        #[command(flatten)]
        target: TargetArgs,
        /// The name queried (AAAA).
        #[arg(long, default_value = "node1.internet2.test")]
        query_name: String,
        #[arg(long, default_value_t = 5000)]
        queries: u64,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// The legacy gateway's port (the server runs --enable-legacy-gateway).
        #[arg(long)]
        udp_port: Option<u16>,
        #[arg(long, default_value_t = 50)]
        updates: u32,
        #[arg(long, value_name = "PATH")]
        json: Option<PathBuf>,
    },
    /// The server's DNS zone: add, remove and list names.
    #[command(subcommand)]
    Dns(cli_authority::DnsCommand<TargetArgs>),
    /// Memory and storage assets on the server, by address: alloc, write, read, free,
    /// list, grant.
    #[command(subcommand)]
    Asset(internet2_server::cli_assets::AssetCommand<TargetArgs>),
    /// WebAssembly VMs on the server: run a module once, deploy one under a
    /// name, call it, list and remove them.
    #[command(subcommand)]
    Vm(internet2_server::cli_vm::VmCommand<TargetArgs>),
    /// Measure assets: memory allocations per second on one connection,
    /// 4 KiB read latency beside a ping's, bulk-read goodput; then durable
    /// storage allocations per second and 4 KiB storage reads (freed at
    /// the end). With two --connect members of a cluster, the reads also
    /// run through the second, which proxies them to the first.
    AssetBench {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 100_000)]
        allocs: u64,
        /// Bytes per allocated asset in the allocation phase.
        #[arg(long, default_value_t = 64)]
        alloc_size: u64,
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        #[arg(long, default_value_t = 5_000)]
        reads: u64,
        /// The asset the bulk phase reads, in MiB (within the quota, with
        /// the allocation phase's assets still held).
        #[arg(long, default_value_t = 16)]
        bulk_mib: u64,
        /// What the bulk phase moves in all, in MiB.
        #[arg(long, default_value_t = 1024)]
        bulk_total_mib: u64,
        /// Durable storage allocations (0 skips the storage phase; its
        /// assets are freed at the end).
        #[arg(long, default_value_t = 20_000)]
        storage_allocs: u64,
        #[arg(long, value_name = "PATH")]
        json: Option<PathBuf>,
    },
    /// Measure VM calls: a small module's call one at a time (beside a
    /// ping's latency), then calls per second with many in flight. The
    /// module is deployed for the run and removed at the end.
    VmBench {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 5_000)]
        calls: u64,
        #[arg(long, default_value_t = 50_000)]
        loaded_calls: u64,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, value_name = "PATH")]
        json: Option<PathBuf>,
    },
    /// Measure admission: the admission round trip and the client's share
    /// of it, one connection at a time; then connections per second
    /// (handshake, admission, one ping) from several threads. Against a
    /// server with admission off, the same without proofs.
    AdmissionBench(AdmissionBenchArgs),
    /// Measure the authority: issuance latency (durable, CT-logged) and
    /// rate, inclusion-proof latency, handshakes with and without mTLS.
    AuthorityBench {
        #[command(flatten)]
        target: TargetArgs,
        /// Requests in each request phase.
        #[arg(long, default_value_t = 500)]
        requests: u64,
        /// Requests in flight in the throughput phase.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Seconds of each handshake phase.
        #[arg(long, default_value_t = 3.0)]
        handshake_seconds: f64,
        /// Only the loaded issuance phase.
        #[arg(long)]
        issuance_only: bool,
        /// Write the result as JSON here.
        #[arg(long, value_name = "PATH")]
        json: Option<PathBuf>,
    },
}

impl TargetArgs {
    /// The first member: where measurements go.
    fn first(&self) -> SocketAddr {
        self.connect[0]
    }
}

impl cli_authority::Connect for TargetArgs {
    fn target(&self) -> anyhow::Result<ClientTarget> {
        target(self, TransportSettings::default())
    }

    fn target_and_members(&self) -> anyhow::Result<(ClientTarget, Vec<SocketAddr>)> {
        reach(self, TransportSettings::default())
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

#[derive(Debug, Args)]
struct TargetArgs {
    /// Server address, IPv6 only (with --host: the server whose embedded
    /// DNS resolves the name). Several, comma-separated, are members of one
    /// cluster: a request goes to the first that completes a handshake,
    /// the others in turn when it does not; measurements (bench, ping)
    /// use the first.
    #[arg(long, default_value = "[::1]:4433", value_delimiter = ',', num_args = 1..)]
    connect: Vec<SocketAddr>,
    /// Reach the server by its name in the embedded DNS: resolve it over
    /// DNS-over-QUIC at --connect, connect to its address, and refuse a
    /// server whose key does not match the name's TLSA pin.
    #[arg(long = "host", value_name = "NAME")]
    by_name: Option<String>,
    /// Root certificate to trust (default: the development CA in the
    /// server's default data directory).
    #[arg(long, value_name = "PEM")]
    ca: Option<PathBuf>,
    /// Name to verify in the server's certificate.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Client certificate for mutual TLS: a PEM file with the certificate
    /// chain and the private key. Default: `operator.pem` beside the --ca
    /// file (the server writes it into its data directory for local
    /// operators), else the identity `internet2 enroll` saved.
    #[arg(long, value_name = "PEM", conflicts_with = "anonymous")]
    identity: Option<PathBuf>,
    /// Present no client certificate (the server then allows enrollment,
    /// public DNS and, where configured, perf).
    #[arg(long)]
    anonymous: bool,
    /// Give up after this many milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    #[arg(long, value_enum, default_value = "socket")]
    backend: BackendArg,
}

#[derive(Debug, Args)]
struct AdmissionBenchArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Connections of the one-at-a-time phase.
    #[arg(long, default_value_t = 300)]
    connections: u64,
    /// Threads opening connections in the rate phase.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Seconds of the rate phase.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Write the result as JSON here.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum BackendArg {
    Uring,
    Socket,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum CongestionArg {
    Cubic,
    Bbr,
    Newreno,
    Bbr2,
    Bbr3,
}

#[derive(Debug, Args)]
struct BenchArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Seconds to run (ignored once --requests is reached).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Connections that move data (default: all).
    #[arg(long)]
    active: Option<usize>,
    /// Concurrent streams per active connection.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// Bytes requested per stream request.
    #[arg(long, default_value_t = 16 << 20)]
    download: u64,
    /// Bytes uploaded per stream request.
    #[arg(long, default_value_t = 0)]
    upload: u64,
    /// Requests per stream, then stop (default: until --duration).
    #[arg(long)]
    requests: Option<u64>,
    /// Check every received byte against the perf pattern.
    #[arg(long)]
    verify: bool,
    /// Measure handshakes: connect, complete, close, repeat.
    #[arg(long)]
    handshake_only: bool,
    /// Client worker threads.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Pin client workers to these cores (comma separated).
    #[arg(long, value_delimiter = ',')]
    cores: Vec<usize>,
    /// Handshakes in flight per client worker.
    #[arg(long, default_value_t = 256)]
    handshake_concurrency: usize,
    /// Seconds between keep-alives on held connections. The server's idle
    /// timeout must be at least twice this (ours: 30 s by default).
    #[arg(long, default_value_t = dataplane::client::bench::KEEP_ALIVE.as_secs_f64())]
    keep_alive: f64,
    /// Resume the TLS session of an earlier connection (and offer 0-RTT)
    /// where the server gave a ticket; by default every connection is a
    /// full handshake.
    #[arg(long)]
    resume: bool,
    #[arg(long, value_enum, default_value = "cubic")]
    congestion: CongestionArg,
    /// Write the result as JSON here.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Benchmark only: verify the server's handshake signature but not its
    /// certificate chain or name (the quinn baseline client's work).
    #[arg(long)]
    no_chain_check: bool,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Ping {
            target,
            count,
            payload,
        } => ping(&target, count, &payload),
        Command::Stats { target, json } => stats(&target, json),
        Command::Bench(args) => bench(&args),
        Command::Resolve {
            target,
            name,
            port,
            json,
        } => resolve(&target, &name, port, json),
        Command::Enroll(args) => cli_authority::enroll(&args, &enrolled_identity_path()),
        Command::Cert(command) => cli_authority::cert(&command),
        Command::Ca(command) => cli_authority::ca(&command),
        Command::Cluster(command) => cli_authority::cluster(&command),
        Command::FailoverLoad(args) => cli_authority::failover_load(&args),
        Command::Ct(command) => cli_authority::ct(&command),
        Command::Dns(command) => cli_authority::dns(&command),
        Command::Asset(command) => internet2_server::cli_assets::asset(&command),
        Command::Vm(command) => internet2_server::cli_vm::vm(&command),
        Command::VmBench {
            target,
            calls,
            loaded_calls,
            concurrency,
            json,
        } => {
            let plan = internet2_server::vm_bench::VmBenchPlan {
                calls: calls.max(1),
                loaded_calls: loaded_calls.max(1),
                concurrency: concurrency.max(1),
            };
            internet2_server::vm_bench::run(&target, &plan)
                .and_then(|report| print_report(&report, json.as_deref()))
        }
        Command::AssetBench {
            target,
            allocs,
            alloc_size,
            concurrency,
            reads,
            bulk_mib,
            bulk_total_mib,
            storage_allocs,
            json,
        } => asset_bench(
            &target,
            &internet2_server::asset_bench::AssetBenchPlan {
                allocs,
                alloc_size,
                concurrency: concurrency.max(1),
                reads: reads.max(1),
                bulk_bytes: bulk_mib.max(1) << 20,
                bulk_total_bytes: bulk_total_mib.max(1) << 20,
                storage_allocs,
                through: target.connect.get(1).copied(),
            },
            json.as_deref(),
        ),
        Command::DnsBench {
            target,
            query_name,
            queries,
            concurrency,
            udp_port,
            updates,
            json,
        } => dns_bench(
            &target,
            &internet2_server::dns_bench::DnsBenchPlan {
                name: query_name,
                queries,
                concurrency,
                udp_port,
                updates,
            },
            json.as_deref(),
        ),
        Command::Connect { mut target, server } => {
            target.by_name = Some(server);
            ping(&target, 1, "internet2")
        }
        Command::AdmissionBench(args) => target(&args.target, TransportSettings::default())
            .and_then(|target| {
                internet2_server::admission_bench::bench(
                    &target,
                    &internet2_server::admission_bench::AdmissionBenchPlan {
                        connections: args.connections,
                        concurrency: args.concurrency,
                        seconds: args.seconds,
                        timeout: Duration::from_millis(args.target.timeout_ms),
                    },
                    args.json.as_deref(),
                )
            }),
        Command::AuthorityBench {
            target,
            requests,
            concurrency,
            handshake_seconds,
            issuance_only,
            json,
        } => authority_bench(
            &target,
            &internet2_server::authority_load::AuthorityBenchPlan {
                requests,
                concurrency,
                handshake_seconds,
                handshake_concurrency: 64,
                issuance_only,
            },
            json.as_deref(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn target(args: &TargetArgs, transport: TransportSettings) -> anyhow::Result<ClientTarget> {
    Ok(reach(args, transport)?.0)
}

/// The target, and the members to fail over to when there are several
/// (`--connect` lists them, or `--host` names a cluster).
fn reach(
    args: &TargetArgs,
    transport: TransportSettings,
) -> anyhow::Result<(ClientTarget, Vec<SocketAddr>)> {
    let ca = args
        .ca
        .clone()
        .unwrap_or_else(|| internet2_server::default_data_dir().join("ca.pem"));
    let root = controlplane::authority::pem::load_cert(&ca).with_context(|| {
        format!(
            "cannot read the CA certificate {} (pass --ca)",
            ca.display()
        )
    })?;
    let (identity, admitter) = if args.anonymous {
        (None, None)
    } else {
        client_identity(args.identity.as_deref(), &ca)?.unzip()
    };
    let target = ClientTarget {
        remote: args.first(),
        server_name: args.server_name.clone(),
        trust: ServerTrust::Roots(vec![root.clone()]),
        identity,
        admitter,
        backend: match args.backend {
            BackendArg::Uring => BackendKind::Uring,
            BackendArg::Socket => BackendKind::Socket,
        },
        transport,
    };
    match &args.by_name {
        Some(name) => by_name(
            target,
            &args.connect,
            name,
            root,
            Duration::from_millis(args.timeout_ms),
        ),
        None => Ok((target, args.connect.clone())),
    }
}

/// Resolve `name` through the embedded DNS of the first of `servers` that
/// answers and aim at it, pinned: a cluster's name resolves to every
/// member (their AAAA records and their keys' pins), and they are the
/// members to fail over to.
fn by_name(
    dns: ClientTarget,
    servers: &[SocketAddr],
    name: &str,
    root: rustls::pki_types::CertificateDer<'static>,
    timeout: Duration,
) -> anyhow::Result<(ClientTarget, Vec<SocketAddr>)> {
    let port = dns.remote.port();
    let mut resolved = None;
    for (at, server) in servers.iter().enumerate() {
        let asked = ClientTarget {
            remote: *server,
            ..dns.clone()
        };
        // An error, or an answer without addresses or pins (a server that
        // does not know the name yet): the next server is asked.
        let why = match client::resolve_endpoint(&asked, name, port, timeout) {
            Ok(answer) if answer.addresses.is_empty() => {
                format!("{name} has no IPv6 address (AAAA) in the zone")
            }
            Ok(answer) if answer.pins.is_empty() => format!(
                "{name} publishes no key pin (TLSA 3 1 1 at _{port}._udp.{name}); refusing to connect without one"
            ),
            Ok(answer) => {
                resolved = Some(answer);
                break;
            }
            Err(e) => format!("cannot resolve {name}: {e}"),
        };
        if at + 1 == servers.len() {
            bail!("{why}");
        }
        eprintln!("internet2: {server}: {why}; asking the next");
    }
    let resolved = resolved.with_context(|| format!("cannot resolve {name}: no server to ask"))?;
    // Clients start at a member chosen at random, so they spread over the
    // cluster; the order after it is the resolved one.
    let mut addresses: Vec<SocketAddr> = resolved
        .addresses
        .iter()
        .copied()
        .map(SocketAddr::V6)
        .collect();
    let start = {
        use std::hash::{BuildHasher, Hasher};
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish() as usize
    };
    let count = addresses.len();
    addresses.rotate_left(start % count);
    let remote = addresses[0];
    let members = if count > 1 { addresses } else { Vec::new() };
    let target = ClientTarget {
        remote,
        server_name: name.trim_end_matches('.').to_owned(),
        trust: ServerTrust::RootsAndPin {
            roots: vec![root],
            pins: resolved.pins,
        },
        ..dns
    };
    Ok((target, members))
}

/// Where `internet2 enroll` keeps this user's identity.
fn enrolled_identity_path() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map_or_else(|| PathBuf::from("."), PathBuf::from)
                .join(".local/share")
        });
    base.join("internet2").join("identity.pem")
}

/// The client certificate to present: `--identity`, else `operator.pem`
/// beside the CA file, else the enrolled identity; none if neither exists.
fn client_identity(
    explicit: Option<&std::path::Path>,
    ca: &std::path::Path,
) -> anyhow::Result<
    Option<(
        dataplane::ClientIdentity,
        std::sync::Arc<dyn dataplane::admission::Admitter>,
    )>,
> {
    let path = match explicit {
        Some(path) => path.to_owned(),
        None => {
            let operator = ca.with_file_name("operator.pem");
            let enrolled = enrolled_identity_path();
            match [operator, enrolled].into_iter().find(|p| p.is_file()) {
                Some(path) => path,
                None => return Ok(None),
            }
        }
    };
    let identity = internet2_server::authority::load_identity(&path)?;
    let admitter = internet2_server::admission::admitter_for_file(&identity, &path)?;
    Ok(Some((identity, admitter)))
}

fn dns_bench(
    args: &TargetArgs,
    plan: &internet2_server::dns_bench::DnsBenchPlan,
    json: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    if plan.queries == 0 || plan.concurrency == 0 || plan.updates == 0 {
        bail!("--queries, --concurrency and --updates must be above 0");
    }
    let target = target(args, TransportSettings::default())?;
    print_report(&internet2_server::dns_bench::run(&target, plan)?, json)
}

fn authority_bench(
    args: &TargetArgs,
    plan: &internet2_server::authority_load::AuthorityBenchPlan,
    json: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use internet2_server::authority_load::run;
    if plan.requests == 0 || plan.concurrency == 0 || plan.handshake_seconds <= 0.0 {
        bail!("--requests, --concurrency and --handshake-seconds must be above 0");
    }
    let target = target(args, TransportSettings::default())?;
    let report = run(&target, plan)?;
    let us = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    for (name, key) in [
        ("issuance, one at a time", "issuance_sequential"),
        ("issuance, loaded", "issuance_loaded"),
        ("inclusion proof", "inclusion_proof"),
    ] {
        let p = &report[key];
        if p.is_null() {
            continue;
        }
        println!(
            "{name:<26} {:>8.0}/s  p50 {:>6} us  p99 {:>6} us  ({} requests)",
            p["per_second"].as_f64().unwrap_or(0.0),
            us(&p["latency_us_p50"]),
            us(&p["latency_us_p99"]),
            us(&p["requests"]),
        );
    }
    for (name, key) in [
        ("handshakes with mTLS", "handshakes_mtls"),
        ("handshakes without mTLS", "handshakes_without_mtls"),
    ] {
        let p = &report[key];
        if p.is_null() {
            continue;
        }
        println!(
            "{name:<26} {:>8.0}/s  p50 {:>6} us  p99 {:>6} us  ({} handshakes, {} errors)",
            p["per_second"].as_f64().unwrap_or(0.0),
            us(&p["latency_us_p50"]),
            us(&p["latency_us_p99"]),
            us(&p["handshakes"]),
            us(&p["errors"]),
        );
    }
    if let Some(ratio) = report["ratio_handshakes_mtls_vs_without"].as_f64() {
        println!("handshake rate with mTLS / without: {ratio:.2}");
    }
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn asset_bench(
    args: &TargetArgs,
    plan: &internet2_server::asset_bench::AssetBenchPlan,
    json: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let target = target(args, TransportSettings::default())?;
    print_report(&internet2_server::asset_bench::run(&target, plan)?, json)
}

/// A bench's JSON report on standard output, and in `json` when given.
fn print_report(report: &serde_json::Value, json: Option<&std::path::Path>) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(report)?);
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn ping(args: &TargetArgs, count: u32, payload: &str) -> anyhow::Result<()> {
    let target = target(args, TransportSettings::default())?;
    let config = target.client_config(dataplane::protocols::ALPN_STOQ)?;
    let timeout = Duration::from_millis(args.timeout_ms);
    if let (Some(name), ServerTrust::RootsAndPin { pins, .. }) = (&args.by_name, &target.trust) {
        let pins: Vec<String> = pins
            .iter()
            .map(|pin| controlplane::authority::api::hex(pin))
            .collect();
        println!(
            "{name} is {} (key pinned by TLSA 3 1 1 {})",
            target.remote,
            pins.join(" or ")
        );
    }
    for n in 1..=count.max(1) {
        let outcome = client::rpc(
            &target,
            &config,
            vec![(Kind::Ping, Bytes::copy_from_slice(payload.as_bytes()))],
            timeout,
        )?;
        match &outcome.replies[0] {
            Reply::Ok(echo) if echo.as_ref() == payload.as_bytes() => {}
            Reply::Ok(_) => bail!("ping {n}: the server echoed a different payload"),
            Reply::Error { code, message } => bail!("ping {n}: server error {code}: {message}"),
            Reply::Failed(why) if why.contains("PinMismatch") => bail!(
                "ping {n} to {}: refused: the server's key does not match the TLSA 3 1 1 pin its DNS name publishes",
                target.remote
            ),
            Reply::Failed(why) => bail!("ping {n} to {}: {why}", target.remote),
        }
        let handshake = outcome.handshake.map_or(0.0, |d| d.as_secs_f64() * 1e3);
        println!(
            "ping {n} {}: reply {:.3} ms after connect (handshake {handshake:.3} ms, 0-RTT {})",
            target.remote,
            outcome.latency.map_or(0.0, |d| d.as_secs_f64() * 1e3),
            if outcome.zero_rtt_accepted {
                "accepted"
            } else {
                "no"
            }
        );
    }
    Ok(())
}

fn stats(args: &TargetArgs, json: bool) -> anyhow::Result<()> {
    let target = target(args, TransportSettings::default())?;
    let config = target.client_config(dataplane::protocols::ALPN_STOQ)?;
    let outcome = client::rpc(
        &target,
        &config,
        vec![(Kind::Stats, Bytes::new())],
        Duration::from_millis(args.timeout_ms),
    )?;
    let body = match &outcome.replies[0] {
        Reply::Ok(body) => body.clone(),
        Reply::Error { code, message } => bail!("server error {code}: {message}"),
        Reply::Failed(why) => bail!("stats from {}: {why}", args.first()),
    };
    if json {
        println!("{}", String::from_utf8_lossy(&body));
        return Ok(());
    }
    let snapshot: StatsSnapshot =
        serde_json::from_slice(&body).context("the server's stats are not valid JSON")?;
    let total = serde_json::to_value(snapshot.total)?;
    let workers: Vec<serde_json::Value> = snapshot
        .workers
        .iter()
        .map(|w| serde_json::to_value(w).expect("counters serialize"))
        .collect();
    print!("{:<22}{:>14}", "counter", "total");
    for i in 0..workers.len() {
        print!("{:>14}", format!("worker {i}"));
    }
    println!();
    for (key, value) in total.as_object().expect("counters are an object") {
        print!("{key:<22}{:>14}", value.to_string());
        for w in &workers {
            print!("{:>14}", w[key].to_string());
        }
        println!();
    }
    if let Some(serde_json::Value::Object(admission)) = &snapshot.admission {
        println!();
        println!("admission");
        for (key, value) in admission {
            let shown = match value {
                serde_json::Value::Array(items) if items.is_empty() => "none".to_owned(),
                serde_json::Value::Array(items) => items
                    .iter()
                    .map(|item| match item {
                        serde_json::Value::Object(entry) => entry
                            .values()
                            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                            .collect::<Vec<_>>()
                            .join(" "),
                        other => other
                            .as_str()
                            .map_or_else(|| other.to_string(), str::to_owned),
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                serde_json::Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            println!("  {key:<22}{shown}");
        }
    }
    Ok(())
}

fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    if !(args.keep_alive >= 1.0 && args.keep_alive <= 3600.0) {
        bail!("--keep-alive must be between 1 and 3600 seconds");
    }
    let keep_alive = Duration::from_secs_f64(args.keep_alive);
    let transport = TransportSettings {
        congestion: match args.congestion {
            CongestionArg::Cubic => CongestionControl::Cubic,
            CongestionArg::Bbr => CongestionControl::Bbr,
            CongestionArg::Newreno => CongestionControl::Newreno,
            CongestionArg::Bbr2 => CongestionControl::Bbr2,
            CongestionArg::Bbr3 => CongestionControl::Bbr3,
        },
        // Held connections must outlive the run.
        keep_alive: Some(keep_alive),
        idle_timeout: dataplane::client::bench::client_idle_timeout(
            keep_alive,
            Duration::from_secs_f64(args.duration),
        ),
        ..TransportSettings::default()
    };
    let mut target = target(&args.target, transport)?;
    if args.no_chain_check {
        target.trust = ServerTrust::HandshakeSignatureOnly;
    }
    if !(args.duration > 0.0 && args.duration.is_finite()) {
        bail!("--duration must be a positive number of seconds");
    }
    let plan = BenchPlan {
        remote: args.target.first(),
        server_name: args.target.server_name.clone(),
        connections: args.connections.max(1),
        active: args
            .active
            .unwrap_or(args.connections)
            .min(args.connections),
        streams: args.streams.max(1),
        download_bytes: args.download,
        upload_bytes: args.upload,
        requests_per_stream: args.requests,
        duration: Duration::from_secs_f64(args.duration),
        handshake_only: args.handshake_only,
        verify: args.verify,
        handshake_concurrency: args.handshake_concurrency,
        resume: args.resume,
    };
    let cores = (!args.cores.is_empty()).then_some(args.cores.as_slice());
    let started = Instant::now();
    let handle = client::spawn_bench(&target, &plan, args.workers, cores)?;
    let mut last_bytes = 0u64;
    let mut last = started;
    while !handle.is_finished() {
        std::thread::sleep(Duration::from_millis(100));
        if last.elapsed() >= Duration::from_secs(1) && !args.quiet {
            let now = Instant::now();
            let sum = |f: fn(&dataplane::client::bench::BenchProgress) -> u64| {
                handle.progress.iter().map(|p| f(p)).sum::<u64>()
            };
            let bytes = sum(|p| p.bytes.load(Ordering::Relaxed));
            let gbps = (bytes - last_bytes) as f64 * 8.0 / (now - last).as_secs_f64() / 1e9;
            eprintln!(
                "[{:>3.0}s] {gbps:.2} Gbit/s  conns {}  handshakes {}  errors {}",
                (now - started).as_secs_f64(),
                sum(|p| p.connections.load(Ordering::Relaxed)),
                sum(|p| p.handshakes.load(Ordering::Relaxed)),
                sum(|p| p.errors.load(Ordering::Relaxed)),
            );
            last_bytes = bytes;
            last = now;
        }
    }
    let reports = handle.join()?;
    let result = summarize(&reports);
    println!(
        "goodput {:.3} Gbit/s  bytes {}  handshakes {} (resumed {}, {:.0}/s, p50 {} us, p99 {} us)  connections {}  errors {}  verify_failures {}",
        result["goodput_gbps"].as_f64().unwrap_or(0.0),
        result["bytes"],
        result["handshakes"],
        result["handshakes_resumed"],
        result["handshakes_per_s"].as_f64().unwrap_or(0.0),
        result["handshake_us_p50"],
        result["handshake_us_p99"],
        result["connections"],
        result["errors"],
        result["verify_failures"],
    );
    if let (Some(first), Some(last)) = (
        result["setup_rate_first_1k"].as_f64(),
        result["setup_rate_last_1k"].as_f64(),
    ) {
        println!(
            "set-up rate: first 1000 handshakes {first:.0}/s, last 1000 {last:.0}/s (ratio {:.2})",
            last / first
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&result)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(first) = reports.iter().find_map(|r| r.first_error.clone()) {
        eprintln!("first error: {first}");
    }
    let failures: u64 = reports.iter().map(|r| r.errors + r.verify_failures).sum();
    if reports.iter().all(|r| r.handshakes == 0) {
        bail!(
            "no connection to {} completed a handshake",
            args.target.first()
        );
    }
    if args.verify && failures > 0 {
        bail!("{failures} errors or verification failures");
    }
    Ok(())
}

fn summarize(reports: &[BenchReport]) -> serde_json::Value {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    for r in reports {
        let _ = histogram.add(&r.handshake_us);
    }
    let elapsed = reports
        .iter()
        .map(|r| r.elapsed)
        .max()
        .unwrap_or_default()
        .as_secs_f64()
        .max(1e-9);
    let handshake_elapsed = reports
        .iter()
        .map(|r| r.handshake_elapsed)
        .max()
        .unwrap_or_default()
        .as_secs_f64()
        .max(1e-9);
    let bytes: u64 = reports.iter().map(|r| r.bytes).sum();
    let handshakes: u64 = reports.iter().map(|r| r.handshakes).sum();
    let mut connected_at: Vec<_> = reports
        .iter()
        .flat_map(|r| r.connected_at.iter().copied())
        .collect();
    let setup = dataplane::client::bench::setup_rates(&mut connected_at, 1000);
    serde_json::json!({
        "setup_rate_first_1k": setup.map(|(first, _)| first),
        "setup_rate_last_1k": setup.map(|(_, last)| last),
        "goodput_gbps": bytes as f64 * 8.0 / elapsed / 1e9,
        "bytes": bytes,
        "uploaded_bytes": reports.iter().map(|r| r.uploaded).sum::<u64>(),
        "duration_s": elapsed,
        "connections": reports.iter().map(|r| r.connections_peak).sum::<u64>(),
        "handshakes": handshakes,
        "handshakes_resumed": reports.iter().map(|r| r.resumed).sum::<u64>(),
        "handshakes_per_s": handshakes as f64 / handshake_elapsed,
        "setup_s": handshake_elapsed,
        "handshake_us_p50": histogram.value_at_quantile(0.5),
        "handshake_us_p99": histogram.value_at_quantile(0.99),
        "requests": reports.iter().map(|r| r.requests).sum::<u64>(),
        "errors": reports.iter().map(|r| r.errors).sum::<u64>(),
        "verify_failures": reports.iter().map(|r| r.verify_failures).sum::<u64>(),
        "client_counters": reports.iter().fold(dataplane::Counters::default(), |mut total, r| {
            total.add(&r.client_counters);
            total
        }),
    })
}

fn resolve(args: &TargetArgs, name: &str, port: Option<u16>, json: bool) -> anyhow::Result<()> {
    let target = target(args, TransportSettings::default())?;
    let port = port.unwrap_or(args.first().port());
    let resolved =
        client::resolve_endpoint(&target, name, port, Duration::from_millis(args.timeout_ms))?;
    let pins: Vec<String> = resolved
        .pins
        .iter()
        .map(|p| controlplane::authority::api::hex(p))
        .collect();
    if json {
        let addresses: Vec<String> = resolved.addresses.iter().map(ToString::to_string).collect();
        println!(
            "{}",
            serde_json::json!({ "name": name, "addresses": addresses, "pins_sha256": pins })
        );
        return Ok(());
    }
    println!("{name}");
    for address in &resolved.addresses {
        println!("  {address}");
    }
    for pin in &pins {
        println!("  pin (TLSA 3 1 1, SPKI SHA-256) {pin}");
    }
    if pins.is_empty() {
        println!("  no pin published for port {port}");
    }
    Ok(())
}
