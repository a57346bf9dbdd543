//! Developer tasks for the workspace, run as `cargo xtask <task>`.
//!
//! `bench-40g` measures our server (and, with `--compare`, a plain-quinn
//! baseline) for goodput, handshake rate, CPU and memory, either across two
//! hosts or between two network namespaces on this machine; in the
//! namespaces it can put an impaired path (benches' `impair-relay`: delay,
//! loss, a bottleneck) between client and server and compare our server's
//! congestion controllers over it. `ci` runs the whole test suite as CI
//! does.

mod admission;
mod bench;
mod ci;
mod cluster;
mod ebpf;
mod netns;
mod report;
mod vm;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Developer tasks for internet2-server")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Benchmark our server (and optionally plain quinn) over a real link or
    /// a veth pair between two network namespaces.
    #[command(name = "bench-40g")]
    Bench40g(Box<BenchArgs>),
    /// Measure the authority on [::1]: issuance latency and rate (durable,
    /// CT-logged), inclusion-proof latency, handshakes with and without
    /// mutual TLS; medians over --runs fresh servers.
    #[command(name = "bench-authority")]
    BenchAuthority(AuthorityBenchArgs),
    /// Measure admission on [::1]: proof costs in process (admission-micro),
    /// the admission round trip and connections/s against a server with
    /// admission and one without; medians over --runs fresh servers.
    #[command(name = "bench-admission")]
    BenchAdmission(admission::AdmissionBenchArgs),
    /// Three cluster members in network namespaces: issuance through the
    /// leader against one node under the same load (medians, server CPU
    /// per issuance), then leader kills under continuous issuance with
    /// every member's log checked at the end. Needs root.
    #[command(name = "bench-cluster")]
    BenchCluster(cluster::ClusterBenchArgs),
    /// Measure VM calls: in process (vm-micro: a call, fuel's cost,
    /// asset_read against copies), then `internet2 vm-bench` against a
    /// fresh server on [::1] with its CPU per call; medians over --runs.
    #[command(name = "bench-vm")]
    BenchVm(vm::VmBenchArgs),
    /// Compile the BPF programs in ebpf/ (objects are committed); with
    /// --check, fail if a committed object differs from its source.
    BuildEbpf {
        #[arg(long)]
        check: bool,
    },
    /// The test suite as CI runs it: packages, interop peers, fmt, clippy,
    /// tests, and netns bench smoke runs (plain, and over the impairment
    /// relay).
    Ci {
        /// Seconds of each netns bench smoke run (per side).
        #[arg(long, default_value_t = 3)]
        smoke_seconds: u32,
    },
}

/// Which end of a two-host benchmark this machine plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Role {
    Server,
    Client,
}

/// Our server's eBPF reuseport steering.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Steering {
    Auto,
    On,
    Off,
}

impl Steering {
    pub fn as_str(self) -> &'static str {
        match self {
            Steering::Auto => "auto",
            Steering::On => "on",
            Steering::Off => "off",
        }
    }
}

/// Our I/O backend, for both our server and our client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    Uring,
    Socket,
    /// AF_XDP (server only; our client then uses uring).
    Xdp,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Uring => "uring",
            Backend::Socket => "socket",
            Backend::Xdp => "xdp",
        }
    }
}

#[derive(Args, Clone, Debug)]
pub struct AuthorityBenchArgs {
    /// Fresh servers to measure; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Requests in each request phase.
    #[arg(long, default_value_t = 500)]
    pub requests: u64,
    /// Requests in flight in the throughput phase.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Seconds of each handshake phase.
    #[arg(long, default_value_t = 3.0)]
    pub handshake_seconds: f64,
    /// Server workers.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Also measure this server binary (an older build), alternating with
    /// ours run by run; both medians are reported.
    #[arg(long, value_name = "PATH")]
    pub baseline_server: Option<PathBuf>,
    /// Also write all runs and the medians as JSON here.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
}

#[derive(Args, Clone, Debug)]
#[command(group(clap::ArgGroup::new("mode").required(true).args(["role", "netns"])))]
pub struct BenchArgs {
    /// Two-host mode: run one end here, the other end on the peer host.
    #[arg(long, value_enum, conflicts_with = "netns")]
    pub role: Option<Role>,
    /// Server role: address to serve on, e.g. [::]:4433 (IPv6 only).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Client role: the server's address, e.g. [2001:db8::1]:4433.
    #[arg(long, value_name = "ADDR")]
    pub connect: Option<SocketAddr>,
    /// Run server and client on this machine, in two network namespaces
    /// joined by a veth pair (needs root).
    #[arg(long)]
    pub netns: bool,
    /// Seconds each client run measures.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub duration: u64,
    /// Connections the client opens and holds.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub connections: usize,
    /// Seconds between the clients' keep-alives on held connections; both
    /// servers' idle timeout is set to twice this (at least 30 s).
    #[arg(long, default_value_t = 15, value_name = "SECS")]
    pub keep_alive: u64,
    /// Connections that move data (default: all up to 32 connections, else 1,
    /// so that large counts measure the cost of held connections).
    #[arg(long, value_name = "N")]
    pub active: Option<usize>,
    /// Concurrent streams per active connection.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub streams: usize,
    /// I/O backend of our server and our client.
    #[arg(long, value_enum, default_value_t = Backend::Uring)]
    pub backend: Backend,
    /// Our server's eBPF reuseport steering (with 2+ workers).
    #[arg(long, value_enum, default_value_t = Steering::Auto)]
    pub steering: Steering,
    /// Our server's workers (default: 1 with --netns, one per core otherwise).
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Our client's worker threads.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub client_workers: usize,
    /// The path MTU: the veth pair's in --netns mode. Both servers and
    /// clients grow UDP payloads to MTU - 48 (IPv6 + UDP headers; at most
    /// 1452 with --backend xdp).
    #[arg(long, default_value_t = 1500, value_name = "BYTES")]
    pub mtu: u32,
    /// Measure handshakes (connect, complete, close, repeat) instead of goodput.
    #[arg(long)]
    pub handshake_only: bool,
    /// A fixed-size transfer instead of a timed one (--client ours): each
    /// active stream downloads this many MiB once, and the run ends when
    /// all of them have arrived; --duration is then the longest a run may
    /// take. Goodput is the bytes over the time they took, and the table
    /// gives that time ("transfer s").
    #[arg(long, value_name = "MIB")]
    pub transfer_mib: Option<u64>,
    /// Runs per side; medians are reported. With --compare the sides alternate.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub runs: usize,
    /// Also write the results as JSON here.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// --netns only: alternate runs of our server and the quinn baseline.
    #[arg(long)]
    pub compare: bool,
    /// --netns only: alternate uring with steering on, uring with steering
    /// off, the xdp backend, and the quinn baseline; report all four.
    #[arg(long)]
    pub matrix: bool,
    /// Server role with --backend xdp: the NIC whose queues the workers bind
    /// (the XDP front door is attached there).
    #[arg(long, value_name = "IF")]
    pub xdp_interface: Option<String>,
    /// Two-host mode: the server is quinn-baseline (the server role runs
    /// it; the client role drives it with the --client chosen).
    #[arg(long)]
    pub baseline: bool,
    /// Server role: where our server keeps its keys and CA (default: a
    /// temporary directory, removed on exit).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Client role: the server's CA (printed by the server role).
    #[arg(long, value_name = "PATH")]
    pub ca: Option<PathBuf>,
    /// The client that drives the server(s): ours (`internet2 bench`) or
    /// the quinn-baseline client. With --compare and --matrix the same
    /// client drives every server, so the figures compare servers.
    #[arg(long, value_enum, default_value_t = ClientKind::Ours)]
    pub client: ClientKind,
    /// The quinn baseline's tokio runtime (server, and client with
    /// --client quinn): current-thread is quinn at its best; multi-thread
    /// is tokio's default, to show the difference.
    #[arg(long, default_value = "current-thread", value_parser = ["current-thread", "multi-thread"])]
    pub baseline_runtime: String,
    /// Resume TLS sessions (--client ours): with --handshake-only this
    /// measures resumed handshakes; the quinn baseline then issues tickets.
    #[arg(long)]
    pub resume: bool,
    /// --netns only: one-way delay added each way, in ms (20 ms RTT is
    /// --delay-ms 10). Any of --delay-ms, --loss and --rate-mbit puts an
    /// impairment relay (benches' `impair-relay`) on the path: it runs in
    /// the client namespace, the client sends to it and it forwards to the
    /// server over the veth.
    #[arg(long, value_name = "MS")]
    pub delay_ms: Option<f64>,
    /// --netns only: the probability that the relay loses a datagram, each
    /// way (0 <= P < 1; 0.01 is 1%). The loss sequence is seeded by the
    /// round, so every server or controller of a round meets the same one.
    #[arg(long, value_name = "P")]
    pub loss: Option<f64>,
    /// --netns only: the relay's bottleneck each way, in Mbit/s on the wire
    /// (IPv6 and UDP headers count). Datagrams serialise one after another
    /// at this rate behind a drop-tail queue of --queue-ms.
    #[arg(long, value_name = "MBIT")]
    pub rate_mbit: Option<f64>,
    /// With --rate-mbit: the bottleneck's queue, in ms of traffic at that
    /// rate; a datagram that would wait longer for the link is dropped
    /// [default: 50].
    #[arg(long, value_name = "MS")]
    pub queue_ms: Option<f64>,
    /// Our server's congestion controllers, comma-separated (e.g.
    /// cubic,bbr), each written as `[stoq_transport] congestion_control =
    /// "NAME"`; the server checks the names (--check-config) before the
    /// first run. In a goodput run the server sends the bulk data (the perf
    /// client downloads), so its controller is the one that paces the
    /// transfer; the clients keep their default (cubic). With several names
    /// the runs alternate between them and the table and the JSON
    /// (`congestion`) give each one's medians. Not with --compare,
    /// --matrix or --baseline: the quinn baseline keeps its own.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub congestion: Vec<String>,
}

/// Which load generator drives the servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ClientKind {
    /// `internet2 bench`.
    Ours,
    /// The quinn-baseline client (plain quinn on tokio).
    Quinn,
}

impl ClientKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientKind::Ours => "ours",
            ClientKind::Quinn => "quinn",
        }
    }
}

/// The workspace root (xtask lives one level below it).
fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_owned()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Bench40g(args) => bench::bench_40g(&args),
        Task::BenchAuthority(args) => bench::bench_authority(&args),
        Task::BenchAdmission(args) => admission::bench_admission(&args),
        Task::BenchCluster(args) => cluster::bench_cluster(&args),
        Task::BenchVm(args) => vm::bench_vm(&args),
        Task::BuildEbpf { check } => ebpf::run(&workspace_root(), check),
        Task::Ci { smoke_seconds } => ci::run(&workspace_root(), smoke_seconds),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<bench::Interrupted>() => {
            eprintln!("bench-40g: interrupted; cleaned up");
            // 128 + SIGINT, as a shell reports a process stopped by Ctrl-C.
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
