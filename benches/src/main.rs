//! `quinn-baseline`: plain quinn on tokio, the reference that internet2-server is
//! benchmarked against.
//!
//! Both sides speak the QUIC performance protocol of draft-banks-quic-performance
//! (ALPN `perf`): the client opens a bidirectional stream, sends a big-endian u64
//! with the number of bytes it wants back, optionally uploads data, and finishes
//! its send side; the server drains the upload and answers with exactly that many
//! bytes. Only IPv6 addresses are accepted, matching the appliance.

mod client;
mod server;
mod sockopt;
mod tls;
mod udp;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use quinn::{MtuDiscoveryConfig, TransportConfig, VarInt};

/// ALPN token of draft-banks-quic-performance.
const ALPN: &[u8] = b"perf";

/// Windows are sized so that flow control never caps a single connection on a
/// fast link: the baseline should be limited by quinn itself, not by defaults
/// tuned for the open internet.
const STREAM_RECEIVE_WINDOW: u32 = 16 << 20;
const CONNECTION_RECEIVE_WINDOW: u32 = 64 << 20;
const SEND_WINDOW: u64 = 64 << 20;

#[derive(Parser)]
#[command(
    name = "quinn-baseline",
    about = "QUIC perf (draft-banks) baseline on quinn + tokio"
)]
struct Cli {
    /// Tokio runtime. `current-thread` is quinn at its best here: one
    /// endpoint is driven by one task, so a thread pool only adds
    /// cross-thread wake-ups. `multi-thread` is tokio's default, kept to
    /// show the difference.
    #[arg(long, value_enum, default_value = "current-thread", global = true)]
    runtime: Runtime,
    /// The largest UDP payload: MTU discovery's ceiling and what this end
    /// advertises it receives. 1452 fits MTU 1500; 8952 fits MTU 9000.
    #[arg(long, default_value_t = 1452, global = true,
          value_parser = clap::value_parser!(u16).range(1200..=65527))]
    max_udp_payload: u16,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Runtime {
    CurrentThread,
    MultiThread,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the perf protocol until SIGINT/SIGTERM.
    Server(server::ServerArgs),
    /// Measure download goodput and handshake latency against a perf server.
    Client(client::ClientArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = match cli.runtime {
        Runtime::CurrentThread => tokio::runtime::Builder::new_current_thread(),
        Runtime::MultiThread => tokio::runtime::Builder::new_multi_thread(),
    }
    .enable_all()
    .build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Server(args) => server::run(args, cli.max_udp_payload).await,
            Command::Client(args) => client::run(args, cli.max_udp_payload).await,
        }
    })
}

/// Clap value parser for `[IPv6]:PORT`; IPv4 (also IPv4-mapped) is refused
/// because the appliance under comparison is IPv6 only.
fn parse_ipv6(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s
        .parse()
        .map_err(|e| format!("{e}: expected [IPv6]:PORT, e.g. [::1]:4433"))?;
    match addr {
        SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_none() => Ok(addr),
        _ => Err("IPv4 is not supported: use an IPv6 address, e.g. [::1]:4433".into()),
    }
}

/// Transport settings shared by client and server. Congestion control stays at
/// quinn's default (CUBIC). `peer_bidi_streams` is how many concurrent streams
/// the peer may open; quinn allocates state for all of them up front, per
/// connection, so it is a memory cost with many connections.
fn transport_config(
    idle_timeout: Duration,
    keep_alive: Option<Duration>,
    peer_bidi_streams: u32,
    max_udp_payload: u16,
) -> Result<TransportConfig> {
    let mut mtu = MtuDiscoveryConfig::default();
    mtu.upper_bound(max_udp_payload);
    let mut config = TransportConfig::default();
    config.mtu_discovery_config(Some(mtu));
    config
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW))
        .send_window(SEND_WINDOW)
        .max_concurrent_bidi_streams(VarInt::from_u32(peer_bidi_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .max_idle_timeout(Some(idle_timeout.try_into()?))
        .keep_alive_interval(keep_alive);
    Ok(config)
}
