//! `internet2 dns-bench`: what the embedded DNS costs, in one run against a
//! running server:
//!
//! 1. DNS-over-QUIC query latency on an established connection, one query
//!    at a time (p50/p99);
//! 2. DoQ queries per second with many in flight on one connection (a
//!    server with one worker gives the per-worker figure);
//! 3. the same two over plain UDP through the legacy gateway, when one is
//!    given (`--udp-port`): the conventional resolver path beside DoQ;
//! 4. how long after an update's acknowledgement the new record is in
//!    the answers (the control plane swaps the zone snapshot the workers
//!    read).

use anyhow::{Context, bail};
use bytes::Bytes;
use controlplane::authority::api;
use dataplane::client::load::{LoadPlan, LoadReport};
use dataplane::client::rpc::{Framing, Reply, Request};
use dataplane::client::{self, ClientTarget};
use hdrhistogram::Histogram;
use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use serde_json::json;
use std::net::{Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct DnsBenchPlan {
    /// The name queried (AAAA).
    pub name: String,
    pub queries: u64,
    pub concurrency: usize,
    /// The legacy gateway's UDP port on the same host, if running.
    pub udp_port: Option<u16>,
    /// Record updates whose visibility is timed.
    pub updates: u32,
}

pub fn run(target: &ClientTarget, plan: &DnsBenchPlan) -> anyhow::Result<serde_json::Value> {
    let name = Name::from_ascii(if plan.name.ends_with('.') {
        plan.name.clone()
    } else {
        format!("{}.", plan.name)
    })
    .with_context(|| format!("`{}` is not a DNS name", plan.name))?;
    let query = Bytes::from(aaaa_query(&name, 0));
    let mut doq_target = target.clone();
    doq_target.identity = None;
    let config = doq_target.client_config(dataplane::protocols::ALPN_DOQ)?;
    let load = |total: u64, concurrency: usize| -> anyhow::Result<LoadReport> {
        let report = client::run_load(
            &doq_target,
            &config,
            LoadPlan {
                framing: Framing::Doq,
                kind: 0,
                payload: query.clone(),
                total,
                concurrency,
                timeout: Duration::from_secs(120),
            },
        )?;
        if let Some(why) = &report.failure {
            bail!("the DoQ load stopped: {why}");
        }
        if report.errors > 0 {
            bail!("{} DoQ answers were malformed", report.errors);
        }
        Ok(report)
    };
    eprintln!("dns-bench: {} DoQ queries, one at a time", plan.queries);
    let doq_sequential = load(plan.queries, 1)?;
    eprintln!(
        "dns-bench: {} DoQ queries, {} in flight",
        plan.queries, plan.concurrency
    );
    let doq_loaded = load(plan.queries, plan.concurrency)?;
    let udp = match plan.udp_port {
        Some(port) => {
            let server = SocketAddr::new(target.remote.ip(), port);
            eprintln!(
                "dns-bench: {} UDP queries to the legacy gateway",
                plan.queries
            );
            Some(udp_bench(server, &name, plan)?)
        }
        None => None,
    };
    eprintln!("dns-bench: {} updates, timed until visible", plan.updates);
    let visibility = update_visibility(target, &doq_target, plan.updates)?;
    Ok(json!({
        "doq_sequential": phase(&doq_sequential),
        "doq_loaded": phase(&doq_loaded),
        "udp_gateway": udp,
        "update_visible_us": visibility,
        "queries": plan.queries,
        "concurrency": plan.concurrency,
    }))
}

fn aaaa_query(name: &Name, id: u16) -> Vec<u8> {
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message
        .queries
        .push(Query::query(name.clone(), RecordType::AAAA));
    message.to_vec().expect("a one-question query encodes")
}

fn phase(report: &LoadReport) -> serde_json::Value {
    json!({
        "queries": report.ok,
        "per_second": report.per_second(),
        "latency_us_p50": report.latency_us.value_at_quantile(0.50),
        "latency_us_p99": report.latency_us.value_at_quantile(0.99),
    })
}

/// Sequential latency, then a window of `concurrency` queries in flight.
fn udp_bench(
    server: SocketAddr,
    name: &Name,
    plan: &DnsBenchPlan,
) -> anyhow::Result<serde_json::Value> {
    let socket = UdpSocket::bind("[::]:0").context("binding a UDP socket")?;
    socket.connect(server)?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 1500];
    let mut latency = Histogram::<u64>::new(3).expect("valid precision");
    let started = Instant::now();
    for i in 0..plan.queries {
        let id = (i % 65_000) as u16 + 1;
        let sent = Instant::now();
        socket.send(&aaaa_query(name, id))?;
        loop {
            let n = socket
                .recv(&mut buf)
                .context("the legacy gateway did not answer")?;
            if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
                break;
            }
        }
        let _ = latency.record((sent.elapsed().as_micros() as u64).max(1));
    }
    let sequential = started.elapsed();
    // Loaded: keep `concurrency` queries outstanding.
    let started = Instant::now();
    let (mut sent, mut answered) = (0u64, 0u64);
    while answered < plan.queries {
        while sent < plan.queries && sent - answered < plan.concurrency as u64 {
            socket.send(&aaaa_query(name, (sent % 65_000) as u16 + 1))?;
            sent += 1;
        }
        socket
            .recv(&mut buf)
            .context("the legacy gateway stopped answering")?;
        answered += 1;
    }
    let loaded = started.elapsed();
    Ok(json!({
        "sequential_per_second": plan.queries as f64 / sequential.as_secs_f64(),
        "latency_us_p50": latency.value_at_quantile(0.50),
        "latency_us_p99": latency.value_at_quantile(0.99),
        "loaded_per_second": plan.queries as f64 / loaded.as_secs_f64(),
    }))
}

/// Set a fresh address on a scratch name, then query (DoQ, a new
/// connection each time) until it answers with it; p50/p99 of the time
/// from the update's acknowledgement to the first answer carrying it.
fn update_visibility(
    operator: &ClientTarget,
    doq: &ClientTarget,
    updates: u32,
) -> anyhow::Result<serde_json::Value> {
    let config = operator.client_config(dataplane::protocols::ALPN_STOQ)?;
    let scratch = format!("dns-bench-{}", std::process::id());
    let mut visible = Histogram::<u64>::new(3).expect("valid precision");
    let mut polls = 0u64;
    for i in 0..updates {
        let address = Ipv6Addr::new(0xfd71, 0x7e57, 0xb, 0, 0, 0, 0, i as u16 + 1);
        let request = serde_json::to_vec(&api::DnsSetRequest {
            name: scratch.clone(),
            addresses: vec![address.to_string()],
            tlsa: Vec::new(),
        })?;
        let outcome = client::rpc_raw(
            operator,
            &config,
            api::DNS_SET,
            &request,
            Duration::from_secs(5),
        )?;
        let changed: api::DnsChanged = match &outcome.replies[0] {
            Reply::Ok(body) => serde_json::from_slice(body)?,
            other => bail!("DNS_SET refused (the operator identity is needed): {other:?}"),
        };
        let acknowledged = Instant::now();
        let fqdn = Name::from_ascii(&changed.name)?;
        loop {
            polls += 1;
            if answers_with(doq, &fqdn, address)? {
                break;
            }
            if acknowledged.elapsed() > Duration::from_secs(5) {
                bail!("update {i} was not visible within 5 s");
            }
        }
        let _ = visible.record((acknowledged.elapsed().as_micros() as u64).max(1));
    }
    let cleanup = serde_json::to_vec(&api::DnsRemoveRequest { name: scratch })?;
    let _ = client::rpc_raw(
        operator,
        &config,
        api::DNS_REMOVE,
        &cleanup,
        Duration::from_secs(5),
    );
    Ok(json!({
        "updates": updates,
        "p50": visible.value_at_quantile(0.50),
        "p99": visible.value_at_quantile(0.99),
        "polls_per_update": polls as f64 / f64::from(updates.max(1)),
    }))
}

fn answers_with(doq: &ClientTarget, name: &Name, address: Ipv6Addr) -> anyhow::Result<bool> {
    let query = aaaa_query(name, 0);
    let mut framed = (query.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&query);
    let outcome = client::rpc_framed(
        doq,
        dataplane::protocols::ALPN_DOQ,
        Framing::Doq,
        vec![Request {
            message: framed.into(),
            idempotent: true,
        }],
        Duration::from_secs(2),
    )?;
    let Reply::Ok(bytes) = &outcome.replies[0] else {
        bail!("the DoQ query failed: {:?}", outcome.replies[0]);
    };
    let message = Message::from_vec(bytes)?;
    Ok(message
        .answers
        .iter()
        .any(|r| matches!(&r.data, RData::AAAA(a) if a.0 == address)))
}
