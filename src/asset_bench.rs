//! `internet2 asset-bench`: what memory assets cost over the network, in
//! one run against a running server, each phase on one established
//! connection (`dataplane::client::run_load`: handshakes are not in the
//! figures):
//!
//! 1. allocations per second with many in flight (small assets; they stay
//!    allocated until the lease ends, `asset_lease_grace_s` after the run);
//! 2. a 4 KiB read of one asset, one at a time (p50/p99), beside a `PING`
//!    of 1 KiB on the same connection kind: the transport's floor;
//! 3. bulk reads of one large asset (16 MiB per request, several in
//!    flight): goodput;
//! 4. durable storage allocations per second with many in flight (each
//!    answered once its group commit is on disk), then a 4 KiB storage
//!    read one at a time; the storage assets are freed at the end.
//!
//! Given a second member of the same cluster (`through`), phases 2 and 3
//! also run through it, reading the same assets: each request is proxied
//! to the member that holds them, beside the direct figures of the same
//! run.

use crate::cli_assets::{alloc, free, free_storage, send, storage_assets, writes};

use bytes::Bytes;
use dataplane::assets::wire::{AllocKind, AssetRequest, PROXIED_READ_LEN_MAX, READ_LEN_MAX};
use dataplane::client::load::{LoadPlan, LoadReport};
use dataplane::client::rpc::Framing;
use dataplane::client::{self, ClientTarget};
use dataplane::protocols::stoq_registry::PING;
use serde_json::json;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct AssetBenchPlan {
    /// Allocations in phase 1, and how many in flight.
    pub allocs: u64,
    pub alloc_size: u64,
    pub concurrency: usize,
    /// Reads (and pings) in phase 2.
    pub reads: u64,
    /// The asset phase 3 reads, and the bytes it moves in all.
    pub bulk_bytes: u64,
    pub bulk_total_bytes: u64,
    /// Storage allocations in phase 4 (0 skips the phase).
    pub storage_allocs: u64,
    /// Another member of the target's cluster, which proxies.
    pub through: Option<std::net::SocketAddr>,
}

pub fn run(target: &ClientTarget, plan: &AssetBenchPlan) -> anyhow::Result<serde_json::Value> {
    let config = target.client_config(dataplane::protocols::ALPN_STOQ)?;
    // `total` of `request`, `concurrency` in flight, at `at`.
    let load_at = |at: &ClientTarget, request: &AssetRequest<'_>, total, concurrency| {
        let (kind, payload) = request.encode();
        timed(|| {
            checked(client::run_load(
                at,
                &config,
                plan_of(kind, Bytes::from(payload), total, concurrency),
            )?)
        })
    };
    let load = |request: &AssetRequest<'_>, total, concurrency| {
        load_at(target, request, total, concurrency)
    };
    eprintln!(
        "asset-bench: {} allocations of {} bytes, {} in flight",
        plan.allocs, plan.alloc_size, plan.concurrency
    );
    let allocs = load(
        &AssetRequest::Alloc {
            kind: AllocKind::Memory,
            size: plan.alloc_size,
            name: None,
        },
        plan.allocs,
        plan.concurrency,
    )?;

    let timeout = Duration::from_secs(10);
    let small = alloc(target, AllocKind::Memory, 4096, timeout)?;
    eprintln!("asset-bench: {} reads of 4 KiB, one at a time", plan.reads);
    let reads = load(
        &AssetRequest::Read {
            address: small,
            offset: 0,
            len: 4096,
        },
        plan.reads,
        1,
    )?;
    eprintln!("asset-bench: {} pings of 1 KiB, one at a time", plan.reads);
    let pings = timed(|| {
        checked(client::run_load(
            target,
            &config,
            plan_of(PING, Bytes::from(vec![7u8; 1024]), plan.reads, 1),
        )?)
    })?;
    let proxy = plan.through.map(|remote| ClientTarget {
        remote,
        ..target.clone()
    });
    let through = |request: &AssetRequest<'_>, total, concurrency| {
        let proxy = proxy.as_ref().expect("only called with a proxy");
        load_at(proxy, request, total, concurrency)
    };
    let proxied_reads = match &proxy {
        Some(proxy) => {
            eprintln!(
                "asset-bench: {} reads of 4 KiB through {}, one at a time",
                plan.reads, proxy.remote
            );
            let read = AssetRequest::Read {
                address: small,
                offset: 0,
                len: 4096,
            };
            Some(through(&read, plan.reads, 1)?)
        }
        None => None,
    };

    let bulk = alloc(target, AllocKind::Memory, plan.bulk_bytes, timeout)?;
    let chunk = plan.bulk_bytes.min(u64::from(READ_LEN_MAX)) as u32;
    // What the reads return is written first: bytes in memory, not pages
    // (or chunks) nobody wrote, which read as zeros without touching it.
    let pattern: Vec<u8> = (0..chunk).map(|i| (i % 251) as u8 + 1).collect();
    send(target, writes(bulk, 0, &pattern), timeout)?;
    let bulk_requests = plan.bulk_total_bytes.div_ceil(u64::from(chunk)).max(1);
    eprintln!(
        "asset-bench: {bulk_requests} reads of {chunk} bytes from a {} byte asset, 4 in flight",
        plan.bulk_bytes
    );
    let bulk_reads = load(
        &AssetRequest::Read {
            address: bulk,
            offset: 0,
            len: chunk,
        },
        bulk_requests,
        4,
    )?;
    let gbps = |phase: &Phase, chunk: u32| {
        let report = &phase.report;
        report.ok as f64 * f64::from(chunk) * 8.0 / report.elapsed.as_secs_f64().max(1e-9) / 1e9
    };
    // Through a member, a read returns at most PROXIED_READ_LEN_MAX: as
    // many bytes in flight in smaller reads.
    let proxied_chunk = chunk.min(PROXIED_READ_LEN_MAX);
    let proxied_in_flight = (4 * chunk / proxied_chunk) as usize;
    let proxied_bulk = match &proxy {
        Some(proxy) => {
            eprintln!(
                "asset-bench: the same bytes through {} in reads of {proxied_chunk}, {proxied_in_flight} in flight",
                proxy.remote
            );
            let read = AssetRequest::Read {
                address: bulk,
                offset: 0,
                len: proxied_chunk,
            };
            let requests = bulk_requests * u64::from(chunk / proxied_chunk);
            Some(through(&read, requests, proxied_in_flight)?)
        }
        None => None,
    };
    for address in [small, bulk] {
        free(target, address, timeout)?;
    }
    let storage = match plan.storage_allocs {
        0 => serde_json::Value::Null,
        // It frees every storage asset of the identity at the end: only
        // one that holds none of its own may run it.
        _ if !storage_assets(target, timeout)?.is_empty() => {
            eprintln!(
                "asset-bench: storage phase skipped: this identity holds storage assets (run it with an identity that holds none)"
            );
            json!({"skipped": "the identity holds storage assets"})
        }
        n => {
            // What one connection may have waiting at the control plane.
            let in_flight = plan
                .concurrency
                .min(dataplane::protocols::stoq::FORWARDED_PER_CONNECTION_MAX);
            eprintln!(
                "asset-bench: {n} durable storage allocations of {} bytes, {in_flight} in flight",
                plan.alloc_size
            );
            let allocs = load(
                &AssetRequest::Alloc {
                    kind: AllocKind::Storage,
                    size: plan.alloc_size,
                    name: None,
                },
                n,
                in_flight,
            );
            let reads = allocs.and_then(|allocs| {
                let one = alloc(target, AllocKind::Storage, 4096, timeout)?;
                eprintln!(
                    "asset-bench: {} storage reads of 4 KiB, one at a time",
                    plan.reads
                );
                let read = AssetRequest::Read {
                    address: one,
                    offset: 0,
                    len: 4096,
                };
                let reads = load(&read, plan.reads, 1)?;
                // On a cluster every member holds every storage asset:
                // the same reads at the other member, which answers them
                // from its own store (not a proxy).
                let other = match &proxy {
                    Some(proxy) => {
                        eprintln!("asset-bench: the same storage reads at {}", proxy.remote);
                        Some(through(&read, plan.reads, 1)?)
                    }
                    None => None,
                };
                Ok((allocs, reads, other))
            });
            // Whatever happened, the storage assets go: they are durable.
            let freed = free_storage(target, timeout)?;
            eprintln!("asset-bench: {freed} storage assets freed");
            let (allocs, reads, other) = reads?;
            json!({
                "allocs": phase(&allocs),
                "read_4k": phase(&reads),
                "read_4k_at_other_member": other.as_ref().map(phase),
                "freed": freed,
            })
        }
    };
    Ok(json!({
        "storage": storage,
        "allocs": phase(&allocs),
        "read_4k": phase(&reads),
        "ping_1k": phase(&pings),
        "bulk_read": {
            "requests": bulk_reads.report.ok,
            "window_unix_ms": bulk_reads.window,
            "request_bytes": chunk,
            "gbps": gbps(&bulk_reads, chunk),
            "latency_us_p50": bulk_reads.report.latency_us.value_at_quantile(0.50),
        },
        "proxied": proxy.as_ref().map(|proxy| json!({
            "through": proxy.remote.to_string(),
            "read_4k": proxied_reads.as_ref().map(phase),
            "bulk_read_gbps": proxied_bulk.as_ref().map(|phase| gbps(phase, proxied_chunk)),
            "bulk_read_requests": proxied_bulk.as_ref().map(|phase| phase.report.ok),
            "bulk_read_window_unix_ms": proxied_bulk.as_ref().map(|phase| phase.window),
            "bulk_request_bytes": proxied_chunk,
        })),
        "alloc_size": plan.alloc_size,
        "concurrency": plan.concurrency,
    }))
}

pub(crate) fn plan_of(kind: u8, payload: Bytes, total: u64, concurrency: usize) -> LoadPlan {
    LoadPlan {
        framing: Framing::Stoq,
        kind,
        payload,
        total,
        concurrency,
        timeout: Duration::from_secs(120),
    }
}

/// A phase that stopped early or met an error answer is not a figure.
pub(crate) fn checked(report: LoadReport) -> anyhow::Result<LoadReport> {
    report.complete().map_err(anyhow::Error::msg)
}

/// A phase's report, and when it ran (milliseconds since the Unix epoch),
/// so that a caller sampling the servers' CPU meanwhile can charge each
/// phase its share (`cargo xtask bench-cluster`).
pub(crate) struct Phase {
    report: LoadReport,
    window: [u64; 2],
}

pub(crate) fn timed(run: impl FnOnce() -> anyhow::Result<LoadReport>) -> anyhow::Result<Phase> {
    let started = unix_ms();
    let report = run()?;
    Ok(Phase {
        report,
        window: [started, unix_ms()],
    })
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(crate) fn phase(phase: &Phase) -> serde_json::Value {
    let mut summary = phase.report.summary();
    summary["window_unix_ms"] = json!(phase.window);
    summary
}
