//! perf client: holds `--connections` connections, downloads on `--active` of
//! them (or churns handshakes with `--handshake-only`) for `--duration`, and
//! reports goodput and handshake figures.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use hdrhistogram::Histogram;
use quinn::{Connection, Endpoint, VarInt};
use tokio::task::JoinSet;
use tokio::time::{timeout, timeout_at};

use crate::{tls, udp};

/// Bytes requested per stream. A fixed size (rather than "until stopped")
/// lets every response be checked for exact length.
const REQUEST_BYTES: u64 = 16 << 20;
/// Handshakes in flight while opening the held connections; unbounded
/// concurrency with 10k connections would only measure queueing.
const MAX_PENDING_HANDSHAKES: usize = 256;
/// Without this a dead server would stall connects for the whole idle timeout.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Only the first few errors are printed; the rest are just counted.
const PRINTED_ERRORS: u64 = 5;
/// Latency histogram range: 1 us .. 60 s, 3 significant digits.
const MAX_HANDSHAKE_US: u64 = 60_000_000;

#[derive(Args)]
pub struct ClientArgs {
    /// Server address, e.g. [::1]:4433 (IPv6 only).
    #[arg(long, value_parser = crate::parse_ipv6)]
    connect: SocketAddr,
    /// Measurement duration in seconds (after all connections are open).
    #[arg(long)]
    duration: f64,
    /// Connections to open and hold for the whole run.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Concurrent loops (streams) per active connection.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// Connections that run loops; the rest stay idle. Default: all.
    #[arg(long)]
    active: Option<usize>,
    /// Write the results as a JSON object to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Loops open fresh connections (handshake, then close)
    /// instead of downloading, to measure the handshake rate.
    #[arg(long)]
    handshake_only: bool,
    /// UDP socket buffer size in bytes, each direction.
    #[arg(long, default_value_t = udp::DEFAULT_SOCKET_BUFFER)]
    socket_buffer: usize,
    /// Seconds between keep-alives on held connections (the same default
    /// as our client's).
    #[arg(long, default_value_t = dataplane::client::bench::KEEP_ALIVE.as_secs())]
    keep_alive: u64,
}

/// Counters shared by all tasks.
struct Stats {
    bytes: AtomicU64,
    handshakes: AtomicU64,
    errors: AtomicU64,
    handshake_us: Mutex<Histogram<u64>>,
}

impl Stats {
    fn new() -> Result<Self> {
        Ok(Self {
            bytes: AtomicU64::new(0),
            handshakes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            handshake_us: Mutex::new(Histogram::new_with_bounds(1, MAX_HANDSHAKE_US, 3)?),
        })
    }

    fn record_handshake(&self, latency: Duration) {
        let us = (latency.as_micros() as u64).clamp(1, MAX_HANDSHAKE_US);
        self.handshake_us.lock().unwrap().saturating_record(us);
        self.handshakes.fetch_add(1, Relaxed);
    }

    fn error(&self, err: &anyhow::Error) {
        if self.errors.fetch_add(1, Relaxed) < PRINTED_ERRORS {
            eprintln!("error: {err:#}");
        }
    }
}

/// What every task needs to open connections and count results.
struct Ctx {
    endpoint: Endpoint,
    server: SocketAddr,
    stats: Stats,
}

impl Ctx {
    /// Opens one connection, recording its handshake latency (connect start
    /// to connection established, as seen by the client).
    async fn connect(&self) -> Result<Connection> {
        let start = Instant::now();
        let connecting = self.endpoint.connect(self.server, "localhost")?;
        let conn = timeout(HANDSHAKE_TIMEOUT, connecting)
            .await
            .context("handshake timed out")?
            .context("handshake failed")?;
        self.stats.record_handshake(start.elapsed());
        Ok(conn)
    }
}

/// Results of the measurement phase.
struct Report {
    elapsed: Duration,
    bytes: u64,
    connections: u64,
    handshakes: u64,
    handshakes_per_s: f64,
    p50_us: u64,
    p99_us: u64,
    errors: u64,
}

pub async fn run(args: ClientArgs, max_udp_payload: u16) -> Result<()> {
    ensure!(args.duration > 0.0, "--duration must be positive");
    ensure!(
        args.connections > 0 && args.streams > 0,
        "--connections and --streams must be at least 1"
    );
    let duration = Duration::from_secs_f64(args.duration);
    let ctx = Arc::new(Ctx {
        endpoint: client_endpoint(
            duration,
            Duration::from_secs(args.keep_alive.max(1)),
            args.socket_buffer,
            max_udp_payload,
        )?,
        server: args.connect,
        stats: Stats::new()?,
    });

    let setup = Instant::now();
    let held = Arc::new(open_held(&ctx, args.connections).await);
    let setup_time = setup.elapsed();
    if held.is_empty() {
        bail!("no connection to {} could be established", args.connect);
    }
    eprintln!(
        "opened {} connections in {:.2} s",
        held.len(),
        setup_time.as_secs_f64()
    );

    let report = measure(&ctx, &held, &args, duration, setup_time).await;
    ctx.endpoint.close(VarInt::from_u32(0), b"done");
    // Give the CONNECTION_CLOSE frames a moment to leave; not worth waiting longer.
    let _ = timeout(Duration::from_secs(1), ctx.endpoint.wait_idle()).await;

    print_summary(&report, &args);
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    Ok(())
}

/// One endpoint (one UDP socket) carries all connections. The idle timeout
/// outlasts the run so nothing held can expire, keep-alives do the rest.
fn client_endpoint(
    duration: Duration,
    keep_alive: Duration,
    socket_buffer: usize,
    max_udp_payload: u16,
) -> Result<Endpoint> {
    // The server never opens streams, so the client allows it none.
    let idle_timeout = dataplane::client::bench::client_idle_timeout(keep_alive, duration);
    let transport = crate::transport_config(idle_timeout, Some(keep_alive), 0, max_udp_payload)?;
    let mut config = quinn::ClientConfig::new(Arc::new(tls::client_crypto()?));
    config.transport_config(Arc::new(transport));
    let mut endpoint = udp::endpoint("[::]:0".parse()?, socket_buffer, max_udp_payload, None)?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Opens `n` connections with at most `MAX_PENDING_HANDSHAKES` in flight.
/// Failures are counted and skipped.
async fn open_held(ctx: &Arc<Ctx>, n: usize) -> Vec<Connection> {
    let mut pending = JoinSet::new();
    let mut held = Vec::with_capacity(n);
    let mut keep = |result: Result<Result<Connection>, _>| match result {
        Ok(Ok(conn)) => held.push(conn),
        Ok(Err(e)) => ctx.stats.error(&e),
        Err(e) => ctx.stats.error(&anyhow::Error::new(e)),
    };
    for _ in 0..n {
        if pending.len() >= MAX_PENDING_HANDSHAKES
            && let Some(result) = pending.join_next().await
        {
            keep(result);
        }
        let ctx = ctx.clone();
        pending.spawn(async move { ctx.connect().await });
    }
    while let Some(result) = pending.join_next().await {
        keep(result);
    }
    held
}

/// Runs the loops until the deadline and collects the figures.
async fn measure(
    ctx: &Arc<Ctx>,
    held: &Arc<Vec<Connection>>,
    args: &ClientArgs,
    duration: Duration,
    setup_time: Duration,
) -> Report {
    let setup_handshakes = ctx.stats.handshakes.load(Relaxed);
    let start = Instant::now();
    let deadline = tokio::time::Instant::from_std(start + duration);
    let progress = tokio::spawn(progress(ctx.clone(), held.clone(), start));

    let mut loops = JoinSet::new();
    let active = args.active.unwrap_or(held.len()).min(held.len());
    for conn in &held[..active] {
        for _ in 0..args.streams {
            if args.handshake_only {
                loops.spawn(churn_loop(ctx.clone(), deadline));
            } else {
                loops.spawn(download_loop(ctx.clone(), conn.clone(), deadline));
            }
        }
    }
    loops.join_all().await;
    let elapsed = start.elapsed();
    progress.abort();

    // Held connections lost during the run are failures too.
    let alive = held.iter().filter(|c| c.close_reason().is_none()).count() as u64;
    ctx.stats
        .errors
        .fetch_add(held.len() as u64 - alive, Relaxed);

    let stats = &ctx.stats;
    let handshakes = stats.handshakes.load(Relaxed);
    // The rate comes from the phase that exercised handshakes: the churn loops
    // with --handshake-only, otherwise opening the held connections.
    let handshakes_per_s = if args.handshake_only {
        (handshakes - setup_handshakes) as f64 / elapsed.as_secs_f64()
    } else {
        setup_handshakes as f64 / setup_time.as_secs_f64()
    };
    let hist = stats.handshake_us.lock().unwrap();
    Report {
        elapsed,
        bytes: stats.bytes.load(Relaxed),
        connections: alive,
        handshakes,
        handshakes_per_s,
        p50_us: hist.value_at_quantile(0.50),
        p99_us: hist.value_at_quantile(0.99),
        errors: stats.errors.load(Relaxed),
    }
}

/// Repeatedly downloads `REQUEST_BYTES` on one connection until the deadline.
async fn download_loop(ctx: Arc<Ctx>, conn: Connection, deadline: tokio::time::Instant) {
    // The deadline cancels a download midway; its bytes so far still count.
    while let Ok(result) = timeout_at(deadline, fetch(&conn, REQUEST_BYTES, &ctx.stats.bytes)).await
    {
        if let Err(e) = result {
            ctx.stats.error(&e);
            if conn.close_reason().is_some() {
                return;
            }
        }
    }
}

/// Repeatedly opens a connection and closes it once the handshake is
/// complete, as our client's handshake-only mode does, so both clients ask
/// the servers for the same work. (This client does not resume, so it
/// needs no request to receive session tickets.)
async fn churn_loop(ctx: Arc<Ctx>, deadline: tokio::time::Instant) {
    let once = || async {
        let conn = ctx.connect().await?;
        conn.close(VarInt::from_u32(0), b"done");
        anyhow::Ok(())
    };
    while let Ok(result) = timeout_at(deadline, once()).await {
        if let Err(e) = result {
            ctx.stats.error(&e);
        }
    }
}

/// One perf request: ask for `len` bytes, upload nothing, read the response,
/// adding received payload bytes to `counter` as they arrive.
async fn fetch(conn: &Connection, len: u64, counter: &AtomicU64) -> Result<()> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&len.to_be_bytes()).await?;
    send.finish()?;
    // Reading chunks in batches avoids copying and locking the connection
    // once per packet.
    let mut chunks: [_; 32] = Default::default();
    let mut received = 0u64;
    while let Some(n) = recv.read_chunks(&mut chunks).await? {
        let batch: u64 = chunks[..n].iter().map(|c| c.len() as u64).sum();
        counter.fetch_add(batch, Relaxed);
        received += batch;
    }
    ensure!(received == len, "short response: {received} of {len} bytes");
    Ok(())
}

/// Prints one line per second to stderr until aborted.
async fn progress(ctx: Arc<Ctx>, held: Arc<Vec<Connection>>, start: Instant) {
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::from_std(start) + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let (mut last_bytes, mut last_time) = (0, start);
    loop {
        let now = tick.tick().await.into_std();
        let bytes = ctx.stats.bytes.load(Relaxed);
        let gbps = gbits_per_s(bytes - last_bytes, now - last_time);
        let alive = held.iter().filter(|c| c.close_reason().is_none()).count();
        let handshakes = ctx.stats.handshakes.load(Relaxed);
        let secs = (now - start).as_secs();
        eprintln!("[{secs:>3}s] {gbps:.2} Gbit/s  conns {alive}  handshakes {handshakes}");
        (last_bytes, last_time) = (bytes, now);
    }
}

fn gbits_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9
}

fn print_summary(r: &Report, args: &ClientArgs) {
    let mode = if args.handshake_only {
        "handshake-only"
    } else {
        "download"
    };
    println!(
        "{mode}: {:.2} s, {} connections held, {} active x {} streams",
        r.elapsed.as_secs_f64(),
        r.connections,
        args.active
            .unwrap_or(args.connections)
            .min(args.connections),
        args.streams
    );
    println!(
        "goodput     {:.3} Gbit/s ({} bytes)",
        gbits_per_s(r.bytes, r.elapsed),
        r.bytes
    );
    println!(
        "handshakes  {} ({:.1}/s), p50 {} us, p99 {} us",
        r.handshakes, r.handshakes_per_s, r.p50_us, r.p99_us
    );
    println!("errors      {}", r.errors);
}

fn write_json(path: &PathBuf, r: &Report) -> Result<()> {
    let json = serde_json::json!({
        "goodput_gbps": gbits_per_s(r.bytes, r.elapsed),
        "bytes": r.bytes,
        "duration_s": r.elapsed.as_secs_f64(),
        "connections": r.connections,
        "handshakes": r.handshakes,
        "handshakes_per_s": r.handshakes_per_s,
        "handshake_us_p50": r.p50_us,
        "handshake_us_p99": r.p99_us,
        "errors": r.errors,
    });
    std::fs::write(path, format!("{json:#}\n"))
        .with_context(|| format!("writing {}", path.display()))
}
