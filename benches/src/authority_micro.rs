//! The authority's own cost, in process and without the network: the same
//! `AuthorityService::handle` the control-plane thread calls for a
//! forwarded `CERT_ISSUE` and `CT_PROOF`, timed per request with
//! hdrhistogram, against a scratch data directory (durable redb commits
//! included). `internet2 authority-bench` measures the same requests over
//! QUIC; the difference is the transport's share.
//!
//! cargo run --release -p internet2-benches --bin authority-micro -- --requests 2000

mod stats;

use anyhow::Context;
use clap::Parser;
use controlplane::authority::api;
use controlplane::authority::service::{AuthorityService, Caller, ServiceConfig};
use hdrhistogram::Histogram;
use std::time::{Instant, SystemTime};

#[derive(Parser)]
struct Args {
    /// Requests per phase.
    #[arg(long, default_value_t = 2000)]
    requests: u64,
    /// Scratch data directory (removed at the end).
    #[arg(long, default_value = "/tmp/i2-authority-micro")]
    dir: std::path::PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    stats::in_scratch(&args.dir, || run(&args))
}

fn run(args: &Args) -> anyhow::Result<()> {
    let now = SystemTime::now();
    let mut service = AuthorityService::open(&args.dir, ServiceConfig::default(), now)
        .context("opening the authority")?;
    let operator = args.dir.join("operator.pem");
    service.ensure_operator_identity(&operator, now)?;
    let operator_der = rustls_pem_cert(&operator)?;
    let caller = Caller {
        cert_der: Some(operator_der),
    };
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::new(vec!["micro.internet2.test".to_owned()])?
        .serialize_request(&key)?
        .pem()?;
    let issue = serde_json::to_vec(&api::CertIssueRequest {
        csr_pem: csr,
        usage: api::CertUsage::Client,
        lifetime_hours: Some(1),
    })?;
    let mut issued_pem = String::new();
    let issuance = time(args.requests, || {
        let body = service
            .handle(&caller, api::CERT_ISSUE, &issue, SystemTime::now())
            .map_err(|e| anyhow::anyhow!("CERT_ISSUE: {}", e.message))?;
        let issued: api::Issued = serde_json::from_slice(&body)?;
        issued_pem = issued.certificate_pem;
        Ok(())
    })?;
    let proof = serde_json::to_vec(&api::CtProofRequest {
        leaf_hash: None,
        certificate_pem: Some(issued_pem),
        tree_size: None,
    })?;
    let proofs = time(args.requests, || {
        service
            .handle(&caller, api::CT_PROOF, &proof, SystemTime::now())
            .map_err(|e| anyhow::anyhow!("CT_PROOF: {}", e.message))?;
        Ok(())
    })?;
    let report = serde_json::json!({
        "requests": args.requests,
        "issuance_us_p50": issuance.value_at_quantile(0.5),
        "issuance_us_p99": issuance.value_at_quantile(0.99),
        "inclusion_proof_us_p50": proofs.value_at_quantile(0.5),
        "inclusion_proof_us_p99": proofs.value_at_quantile(0.99),
        "log_size": args.requests + 1,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn time(
    requests: u64,
    mut request: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Histogram<u64>> {
    let mut histogram = Histogram::<u64>::new(3).expect("valid precision");
    for _ in 0..requests {
        let started = Instant::now();
        request()?;
        histogram.record((started.elapsed().as_micros() as u64).max(1))?;
    }
    Ok(histogram)
}

fn rustls_pem_cert(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    Ok(CertificateDer::from_pem_file(path)
        .with_context(|| format!("reading {}", path.display()))?
        .to_vec())
}
