//! `impair-relay`: a UDP relay that puts an impaired path between QUIC
//! clients and a server, for comparing congestion controllers where the
//! kernel has no `netem`. `cargo xtask bench-40g --netns` runs it in the
//! client namespace when given `--delay-ms`, `--loss` or `--rate-mbit`.
//!
//! Clients send to `--listen`; per client address the relay opens its own
//! socket to `--upstream` and relays the replies back. Each direction is
//! one link shared by all flows (`link.rs`): seeded random loss, a
//! rate-limited bottleneck whose drop-tail queue holds at most `--queue-ms`
//! of traffic, then a fixed one-way delay. It is single-threaded: one
//! ppoll(2) waits for a readable socket or the next scheduled delivery.
//! Memory is bounded by the queue, a per-direction buffer bound and the
//! flow cap.
//!
//! It prints `listening on ADDR` when ready, runs until SIGTERM/SIGINT or
//! `--duration`, then writes its counters and queueing-delay percentiles
//! as JSON to `--stats` (stdout without it).
//!
//! impair-relay --listen '[::1]:5000' --upstream '[::1]:4433' \
//!     --delay-ms 10 --loss 0.01 --rate-mbit 50 --queue-ms 50 --stats relay.json

mod link;
mod relay;
#[path = "../sockopt.rs"]
mod sockopt;
mod sys;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::json;

use link::LinkConfig;
use relay::{Relay, RelayConfig};

/// The longest delay or queue accepted, ms: bounds the scheduled data.
const MS_MAX: f64 = 100_000.0;
/// The fastest bottleneck accepted, Mbit/s.
const RATE_MBIT_MAX: f64 = 1_000_000.0;

#[derive(Parser)]
#[command(
    name = "impair-relay",
    about = "UDP relay with delay, loss and a rate-limited bottleneck, each way"
)]
struct Args {
    /// Where clients send, e.g. [fd71:7e57:0:1::2]:4433.
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// The server the relay forwards to.
    #[arg(long, value_name = "ADDR")]
    upstream: SocketAddr,
    /// One-way delay added after the bottleneck, each way (20 ms RTT is 10).
    #[arg(long, default_value_t = 0.0, value_name = "MS")]
    delay_ms: f64,
    /// Probability that a datagram is lost, each way (0 to 1).
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    loss: f64,
    /// The bottleneck's rate each way, counting IPv6 and UDP headers
    /// (default: no bottleneck).
    #[arg(long, value_name = "MBIT")]
    rate_mbit: Option<f64>,
    /// The bottleneck's drop-tail queue: a datagram that would wait longer
    /// than this for the link is dropped.
    #[arg(long, default_value_t = 50.0, value_name = "MS")]
    queue_ms: f64,
    /// Seed of the loss sequence (each direction derives its own).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Exit after this many seconds (default: at SIGTERM or SIGINT).
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Write the stats JSON here on exit (default: stdout).
    #[arg(long, value_name = "PATH")]
    stats: Option<PathBuf>,
    /// Client addresses served (each keeps its flow for the relay's life);
    /// datagrams from further ones are dropped.
    #[arg(long, default_value_t = 256, value_name = "N")]
    flows_max: usize,
    /// Scheduled but undelivered data per direction, MiB; past it datagrams
    /// are dropped (matters only for a fast path with a long delay).
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    buffer_mib: usize,
    /// Kernel buffer of each socket, each way.
    #[arg(long, default_value_t = 16 << 20, value_name = "BYTES")]
    socket_buffer: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let config = relay_config(&args)?;
    // Before the socket exists, so no signal can go unnoticed.
    let wait_mask = sys::stop_on_signals().context("installing the SIGTERM handler")?;
    let mut relay =
        Relay::bind(config).with_context(|| format!("binding --listen {}", args.listen))?;
    println!(
        "listening on {} upstream {}",
        relay.local_addr()?,
        args.upstream
    );
    std::io::stdout().flush()?;
    let started = Instant::now();
    let deadline = args.duration.map(|s| started + Duration::from_secs_f64(s));
    while !sys::stop_requested() && deadline.is_none_or(|d| Instant::now() < d) {
        relay.poll(deadline, Some(&wait_mask)).context("ppoll")?;
    }
    let mut stats = relay.stats_json();
    stats["duration_s"] = json!(started.elapsed().as_secs_f64());
    stats["listen"] = json!(args.listen.to_string());
    stats["upstream"] = json!(args.upstream.to_string());
    stats["config"] = json!({
        "delay_ms": args.delay_ms,
        "loss": args.loss,
        "rate_mbit": args.rate_mbit,
        "queue_ms": args.rate_mbit.map(|_| args.queue_ms),
        "seed": args.seed,
    });
    let text = serde_json::to_string_pretty(&stats)? + "\n";
    match &args.stats {
        Some(path) => {
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?
        }
        None => print!("{text}"),
    }
    Ok(())
}

/// Checks the arguments and turns them into both directions' links.
fn relay_config(args: &Args) -> Result<RelayConfig> {
    if !(0.0..=MS_MAX).contains(&args.delay_ms) {
        bail!("--delay-ms {}: must be 0 to {MS_MAX}", args.delay_ms);
    }
    if !(0.0..=1.0).contains(&args.loss) {
        bail!("--loss {}: a probability, 0 to 1 (0.01 is 1%)", args.loss);
    }
    if !(args.queue_ms > 0.0 && args.queue_ms <= MS_MAX) {
        bail!(
            "--queue-ms {}: must be above 0 and at most {MS_MAX}",
            args.queue_ms
        );
    }
    if let Some(rate) = args.rate_mbit
        && !(rate > 0.0 && rate <= RATE_MBIT_MAX)
    {
        bail!("--rate-mbit {rate}: must be above 0 and at most {RATE_MBIT_MAX}");
    }
    if args.flows_max == 0 || args.buffer_mib == 0 {
        bail!("--flows-max and --buffer-mib must be at least 1");
    }
    if !args.listen.is_ipv6() || !args.upstream.is_ipv6() {
        bail!("--listen and --upstream: IPv6 only, e.g. [::1]:4433");
    }
    let ns = |ms: f64| (ms * 1e6).round() as u64;
    let link = |seed| LinkConfig {
        // At least 1 bit/s: a positive rate below that rounds to nothing.
        rate_bit_per_s: args.rate_mbit.map(|r| ((r * 1e6).round() as u64).max(1)),
        queue_ns: ns(args.queue_ms),
        delay_ns: ns(args.delay_ms),
        loss: args.loss,
        seed,
        buffer_bytes_max: args.buffer_mib << 20,
    };
    Ok(RelayConfig {
        listen: args.listen,
        upstream: args.upstream,
        // Different streams each way, both fixed by --seed.
        to_server: link(args.seed ^ 0x5eed_0000_0000_0001),
        to_client: link(args.seed),
        flows_max: args.flows_max,
        socket_buffer_bytes: args.socket_buffer,
    })
}
