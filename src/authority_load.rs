//! `internet2 authority-bench`: what the authority costs, measured over the
//! network against a running server, in one run:
//!
//! 1. issuance latency, one request at a time on an established connection
//!    (each answer is a certificate that is durable and CT-logged);
//! 2. issuances per second with many requests in flight;
//! 3. inclusion-proof latency (`CT_PROOF` for a logged certificate);
//! 4. handshake rate with a client certificate (mutual TLS) and without.
//!
//! Every figure comes with the request count it is made of; nothing is
//! compared against a stored number.

use anyhow::{Context, bail};
use bytes::Bytes;
use controlplane::authority::api;
use dataplane::client::bench::BenchPlan;
use dataplane::client::load::{LoadPlan, LoadReport};
use dataplane::client::{self, ClientTarget};
use hdrhistogram::Histogram;
use serde_json::json;
use std::time::Duration;

/// How much load each phase applies.
#[derive(Clone, Debug)]
pub struct AuthorityBenchPlan {
    /// Requests of each request phase.
    pub requests: u64,
    /// Requests in flight in the throughput phase.
    pub concurrency: usize,
    /// Seconds of each handshake phase.
    pub handshake_seconds: f64,
    pub handshake_concurrency: usize,
    /// Only the loaded issuance phase (what a CPU-per-issuance figure
    /// read around the run is made of).
    pub issuance_only: bool,
}

/// Run all phases against `target` (which must carry a client identity
/// the server accepts for `CERT_ISSUE`: the operator's, or one whose names
/// the CSR uses). Returns the JSON report; prints progress to stderr.
pub fn run(target: &ClientTarget, plan: &AuthorityBenchPlan) -> anyhow::Result<serde_json::Value> {
    if target.identity.is_none() {
        bail!(
            "authority-bench issues certificates: it needs a client identity (--identity, or operator.pem beside --ca)"
        );
    }
    let config = target.client_config(dataplane::protocols::ALPN_STOQ)?;
    let issue = issue_payload()?;
    let timeout = Duration::from_secs(120);
    let load = |kind: u8, payload: Bytes, total: u64, concurrency: usize| {
        client::run_load(
            target,
            &config,
            LoadPlan {
                framing: dataplane::client::rpc::Framing::Stoq,
                kind,
                payload,
                total,
                concurrency,
                timeout,
            },
        )
        .map_err(anyhow::Error::from)
        .and_then(checked)
    };

    if plan.issuance_only {
        eprintln!(
            "authority-bench: {} issuances, {} in flight",
            plan.requests, plan.concurrency
        );
        let loaded = load(api::CERT_ISSUE, issue, plan.requests, plan.concurrency)?;
        return Ok(json!({
            "issuance_loaded": phase(&loaded),
            "requests": plan.requests,
            "concurrency": plan.concurrency,
        }));
    }
    eprintln!(
        "authority-bench: {} issuances, one at a time",
        plan.requests
    );
    let sequential = load(api::CERT_ISSUE, issue.clone(), plan.requests, 1)?;
    eprintln!(
        "authority-bench: {} issuances, {} in flight",
        plan.requests, plan.concurrency
    );
    let loaded = load(
        api::CERT_ISSUE,
        issue.clone(),
        plan.requests,
        plan.concurrency,
    )?;

    // A logged certificate to prove, checked client-side once so the
    // timed requests are known to be real proofs.
    let outcome = client::rpc_raw(target, &config, api::CERT_ISSUE, &issue, timeout)?;
    let issued: api::Issued = match &outcome.replies[0] {
        client::rpc::Reply::Ok(body) => serde_json::from_slice(body)?,
        other => bail!("issuing the certificate to prove failed: {other:?}"),
    };
    let proof_request = Bytes::from(serde_json::to_vec(&api::CtProofRequest {
        leaf_hash: None,
        certificate_pem: Some(issued.certificate_pem.clone()),
        tree_size: None,
    })?);
    eprintln!(
        "authority-bench: {} inclusion proofs, one at a time",
        plan.requests
    );
    let proofs = load(api::CT_PROOF, proof_request, plan.requests, 1)?;

    eprintln!(
        "authority-bench: handshakes for {:.0} s with a client certificate, then {:.0} s without",
        plan.handshake_seconds, plan.handshake_seconds
    );
    let with_mtls = handshakes(target, plan)?;
    let mut anonymous = target.clone();
    anonymous.identity = None;
    let without_mtls = handshakes(&anonymous, plan)?;

    Ok(json!({
        "issuance_sequential": phase(&sequential),
        "issuance_loaded": phase(&loaded),
        "inclusion_proof": phase(&proofs),
        "handshakes_mtls": with_mtls,
        "handshakes_without_mtls": without_mtls,
        "ratio_handshakes_mtls_vs_without": ratio(&with_mtls, &without_mtls),
        "requests": plan.requests,
        "concurrency": plan.concurrency,
    }))
}

/// A CSR for a load-test name (the operator may issue for any name).
pub fn issue_payload() -> anyhow::Result<Bytes> {
    let key = rcgen::KeyPair::generate().context("making a key")?;
    let name = format!("load-{}.internet2.test", std::process::id());
    let csr = rcgen::CertificateParams::new(vec![name])?
        .serialize_request(&key)?
        .pem()?;
    Ok(Bytes::from(serde_json::to_vec(&api::CertIssueRequest {
        csr_pem: csr,
        usage: api::CertUsage::Client,
        lifetime_hours: Some(1),
    })?))
}

fn checked(report: LoadReport) -> anyhow::Result<LoadReport> {
    report.complete().map_err(anyhow::Error::msg)
}

fn phase(report: &LoadReport) -> serde_json::Value {
    report.summary()
}

fn handshakes(
    target: &ClientTarget,
    plan: &AuthorityBenchPlan,
) -> anyhow::Result<serde_json::Value> {
    let bench = BenchPlan {
        remote: target.remote,
        server_name: target.server_name.clone(),
        connections: 1,
        active: 0,
        streams: 1,
        download_bytes: 0,
        upload_bytes: 0,
        requests_per_stream: None,
        duration: Duration::from_secs_f64(plan.handshake_seconds),
        handshake_only: true,
        verify: false,
        handshake_concurrency: plan.handshake_concurrency,
        resume: false,
    };
    let reports = client::spawn_bench(target, &bench, 1, None)?.join()?;
    let mut histogram = Histogram::<u64>::new(3).expect("valid precision");
    let (mut count, mut errors, mut seconds) = (0, 0, 0f64);
    let mut first_error = None;
    for r in &reports {
        count += r.handshakes;
        errors += r.errors;
        seconds = seconds.max(r.handshake_elapsed.as_secs_f64());
        histogram.add(&r.handshake_us).expect("same precision");
        first_error = first_error.or(r.first_error.clone());
    }
    if count == 0 {
        bail!(
            "no handshake completed{}",
            first_error.map_or(String::new(), |e| format!(": {e}"))
        );
    }
    Ok(json!({
        "handshakes": count,
        "errors": errors,
        "per_second": count as f64 / seconds.max(1e-9),
        "latency_us_p50": histogram.value_at_quantile(0.50),
        "latency_us_p99": histogram.value_at_quantile(0.99),
    }))
}

fn ratio(a: &serde_json::Value, b: &serde_json::Value) -> serde_json::Value {
    match (a["per_second"].as_f64(), b["per_second"].as_f64()) {
        (Some(a), Some(b)) if b > 0.0 => json!(a / b),
        _ => serde_json::Value::Null,
    }
}
