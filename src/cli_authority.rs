//! The `internet2` client's authority commands: `enroll`, `cert`, `ca` and
//! `ct`, speaking the authority's `stoq/1` kinds
//! (`controlplane::authority::api`, `docs/PROTOCOL.md` "Authority
//! messages").
//!
//! Nothing the server sends is trusted until it is checked here with the
//! client-side checks of `api`: every signed tree head against the log key
//! (`check_sth`), every proof against a checked tree head (`verify_proof`,
//! `verify_consistency`), every issued certificate against the root the
//! user trusts (`--ca`) with `verify_issued` before it is written or
//! printed. Local input (files, serials, tokens, names) is checked before
//! any network I/O.
//!
//! The binary owns the connection flags: it hands in a type implementing
//! [`Connect`], flattened into every command here, and this module asks it
//! for a `ClientTarget` and a timeout. Each request is one `stoq/1`
//! connection (`dataplane::client::rpc_raw`).

use anyhow::{Context, bail};
use controlplane::authority::api::{
    self, CaRoot, CertIssueRequest, CertList, CertListRequest, CertRenewRequest, CertRevokeRequest,
    CertUsage, Consistency, CtConsistencyRequest, CtEntriesRequest, CtKey, CtProofRequest,
    EnrollRequest, Entries, Issued, LogPublicKey, NoArguments, Proof, Revoked, Sth, hex,
};
use controlplane::authority::ct::{self, SignedTreeHead, decode_leaf, encode_x509_leaf, leaf_hash};
use dataplane::client::rpc::Reply;
use dataplane::client::{ClientError, ClientTarget, rpc_raw};
use dataplane::{ClientIdentity, ServerTrust};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

/// How the binary's connection flags become a target. Implemented by the
/// binary's flag struct, which every command here flattens.
pub trait Connect: clap::Args + std::fmt::Debug {
    /// The server to reach, the roots to trust and the client identity to
    /// present (the one the flags choose).
    fn target(&self) -> anyhow::Result<ClientTarget>;
    fn timeout(&self) -> Duration;
    /// The target and the cluster's members to try, in order, when there
    /// is more than one (given, or the addresses a cluster's name resolved
    /// to); empty for the target's own address only.
    fn target_and_members(&self) -> anyhow::Result<(ClientTarget, Vec<std::net::SocketAddr>)> {
        Ok((self.target()?, Vec::new()))
    }
}

/// `internet2 enroll`.
#[derive(Debug, clap::Args)]
pub struct EnrollArgs<T: Connect> {
    #[command(flatten)]
    pub target: T,
    /// The one-time token from `internet2-server enroll-token`.
    pub token: String,
    /// A name for the certificate (repeat for more); the first is also its
    /// subject CN. Default: this host's name.
    #[arg(long = "name", value_name = "NAME")]
    pub names: Vec<String>,
    /// Where to save the identity (certificate, intermediate and key, mode
    /// 0600). Until it is saved, the new key waits beside it in
    /// `PEM.pending`, which a rerun after a failure reuses. Default:
    /// `$XDG_DATA_HOME/internet2/identity.pem`.
    #[arg(long, value_name = "PEM")]
    pub out: Option<PathBuf>,
    /// Replace an existing identity file.
    #[arg(long)]
    pub force: bool,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum UsageArg {
    Client,
    Server,
}

/// `internet2 cert …`.
#[derive(Debug, clap::Subcommand)]
pub enum CertCommand<T: Connect> {
    /// Have the CA sign a CSR (names: the CSR's CN and SANs; only the
    /// operator may issue for names its certificate does not carry).
    Issue {
        #[command(flatten)]
        target: T,
        #[arg(long, value_name = "FILE")]
        csr: PathBuf,
        #[arg(long, value_enum, default_value = "client")]
        usage: UsageArg,
        /// Default: the server's configured lifetime; at most 90 days.
        #[arg(long)]
        lifetime_hours: Option<u32>,
        /// Write the certificate and intermediate here (default: stdout).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Renew a certificate: same key, names and lifetime, new serial.
    Renew {
        #[command(flatten)]
        target: T,
        /// The certificate (or an identity file: its first certificate).
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
        /// Write the new certificate and intermediate here, plus the key
        /// when --cert held one (default: stdout, without the key).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Revoke a certificate (its owner or the operator).
    Revoke {
        #[command(flatten)]
        target: T,
        /// 32 hex digits.
        serial: String,
        #[arg(long, value_parser = api::REVOCATION_REASONS)]
        reason: Option<String>,
    },
    /// Every certificate the CA issued (all pages).
    List {
        #[command(flatten)]
        target: T,
        /// all, valid, revoked or name:NAME.
        #[arg(long, default_value = "all")]
        filter: String,
        #[arg(long)]
        json: bool,
    },
    /// Check a certificate: chain to the --ca root, validity, inclusion in
    /// the log under a signed tree head, and revocation.
    Verify {
        #[command(flatten)]
        target: T,
        /// A PEM certificate (or an identity file: its first certificate).
        file: PathBuf,
    },
}

/// `internet2 ca …`.
#[derive(Debug, clap::Subcommand)]
pub enum CaCommand<T: Connect> {
    /// Print the CA's root certificate (PEM).
    Root {
        #[command(flatten)]
        target: T,
        /// Fail unless the server's root is the one given with --ca.
        #[arg(long)]
        check: bool,
        /// Print the intermediate after the root.
        #[arg(long)]
        intermediate: bool,
    },
}

/// `internet2 cluster …`.
#[derive(Debug, clap::Subcommand)]
pub enum ClusterCommand<T: Connect> {
    /// The cluster as its leader sees it (any member relays the question):
    /// leader, term, commit index and every member's role and lag.
    Status {
        #[command(flatten)]
        target: T,
        /// Print the JSON answer.
        #[arg(long)]
        json: bool,
        /// The member's own view (a follower otherwise relays the
        /// leader's): who it takes for the leader, its term and commit.
        #[arg(long)]
        own_view: bool,
    },
}

/// `internet2 ct …`: the Certificate Transparency log, every answer checked.
#[derive(Debug, clap::Subcommand)]
pub enum CtCommand<T: Connect> {
    /// The latest signed tree head.
    Sth {
        #[command(flatten)]
        target: T,
        #[arg(long)]
        json: bool,
    },
    /// The inclusion proof of a certificate or leaf hash in the latest tree.
    #[command(group(clap::ArgGroup::new("leaf").required(true).args(["cert", "leaf_hash"])))]
    Proof {
        #[command(flatten)]
        target: T,
        #[arg(long, value_name = "FILE")]
        cert: Option<PathBuf>,
        /// base64 of the 32-byte leaf hash.
        #[arg(long, value_name = "B64")]
        leaf_hash: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Proof that the tree of size OLD is a prefix of the tree of size NEW.
    Consistency {
        #[command(flatten)]
        target: T,
        old: u64,
        new: u64,
        #[arg(long)]
        json: bool,
    },
    /// Log entries START..END (END exclusive, at most 256).
    Entries {
        #[command(flatten)]
        target: T,
        start: u64,
        end: u64,
        #[arg(long)]
        json: bool,
    },
    /// The log's public key.
    Key {
        #[command(flatten)]
        target: T,
        #[arg(long)]
        json: bool,
    },
}

/// Why an authority request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot reach {remote}: {source}")]
    Setup {
        remote: SocketAddr,
        source: Box<ClientError>,
    },
    #[error("{what} to {remote}: {why}")]
    Failed {
        what: &'static str,
        remote: SocketAddr,
        why: String,
    },
    #[error("{what}: {} (server error 0x{code:02x})", explain(*.code, .message))]
    Refused {
        what: &'static str,
        code: u16,
        message: String,
    },
    #[error("the server's answer to {what} is not the expected JSON: {detail}")]
    BadAnswer { what: &'static str, detail: String },
}

/// A readable sentence for an authority error code, with the server's
/// own words after it.
fn explain(code: u16, message: &str) -> String {
    let summary = match code {
        api::UNKNOWN_KIND => "the server does not answer authority requests",
        api::MALFORMED_REQUEST => "the server did not understand the request",
        api::BAD_CSR => "the certificate request was refused",
        api::UNAUTHORIZED => "not allowed",
        api::UNKNOWN_SERIAL => "no certificate of this CA has that serial",
        api::ALREADY_REVOKED => "the certificate is already revoked",
        api::TOKEN_INVALID => "enrollment token invalid or expired",
        api::TOKEN_USED => "enrollment token already used",
        api::NOT_OUR_CA => "not a certificate of this CA",
        api::EXPIRED => "the certificate is expired or not yet valid",
        api::OUT_OF_RANGE => "outside the log",
        api::NOT_FOUND => "not in the log",
        api::STORAGE => "the server failed internally (its log has details)",
        api::NAME_TAKEN => "a name is already taken",
        api::REVOKED => "the certificate is revoked",
        api::NOT_IN_ZONE => "the name is not inside the zone (or is its apex)",
        api::ZONE_FULL => "the zone is full",
        api::NOT_LEADER => "not the cluster's leader",
        _ => "refused",
    };
    format!("{summary}: {message}")
}

/// The kind's name in the one registry of `stoq/1` kinds.
fn kind_name(kind: u8) -> &'static str {
    dataplane::protocols::stoq_registry::spec(kind).map_or("request", |spec| spec.name)
}

/// Why a member's outcome sends the request to the next member: it never
/// completed a handshake (down), or it is not the cluster's leader (it
/// changed nothing). `None`: this outcome is the answer.
fn passed_over(outcome: &dataplane::client::rpc::RpcOutcome) -> Option<String> {
    if outcome.handshake.is_none() {
        let why = outcome.error.as_deref().unwrap_or("no handshake");
        return Some(format!("did not answer ({why})"));
    }
    if outcome.closed_with == Some(u64::from(dataplane::admission::CLOSE_ADMISSION_UNAVAILABLE)) {
        return Some("cannot admit anyone now (a member catching up)".to_owned());
    }
    match outcome.replies.first() {
        Some(Reply::Error { code, .. }) if *code == api::NOT_LEADER => {
            Some("is not the cluster's leader".to_owned())
        }
        _ => None,
    }
}

/// One server (or the members of one cluster), one identity (or none),
/// one timeout.
struct Session {
    target: ClientTarget,
    timeout: Duration,
    /// Addresses to fail over to, in order; the one that answered last
    /// is tried first.
    members: Vec<std::net::SocketAddr>,
    answered: std::cell::Cell<usize>,
    /// Members that did not answer, and when: tried after the others for
    /// a while (a long-running client such as `failover-load` would
    /// otherwise wait out a dead member's timeout on every request).
    silent: std::cell::RefCell<std::collections::HashMap<std::net::SocketAddr, std::time::Instant>>,
}

/// How long a member that did not answer is tried after the others.
const SILENT_FOR: Duration = Duration::from_secs(3);

impl Session {
    fn open(flags: &impl Connect) -> anyhow::Result<Self> {
        let (target, members) = flags.target_and_members()?;
        Ok(Self {
            target,
            timeout: flags.timeout(),
            members,
            answered: std::cell::Cell::new(0),
            silent: Default::default(),
        })
    }

    /// One request to the first member that takes it: a member that does
    /// not complete a handshake is down (the request never reached it),
    /// and one that answers `NOT_LEADER` changed nothing, so the next is
    /// tried. Any other answer, even an error, is the answer.
    fn exchange(
        &self,
        config: &quinn_proto::ClientConfig,
        kind: u8,
        payload: &[u8],
    ) -> Result<(std::net::SocketAddr, dataplane::client::rpc::RpcOutcome), ClientError> {
        if self.members.len() < 2 {
            let outcome = rpc_raw(&self.target, config, kind, payload, self.timeout)?;
            return Ok((self.target.remote, outcome));
        }
        let start = self.answered.get();
        let count = self.members.len();
        // From the one that answered last, in turn; members silent lately
        // at the end.
        let now = std::time::Instant::now();
        let is_silent = |at: usize| {
            self.silent
                .borrow()
                .get(&self.members[at])
                .is_some_and(|since| now.duration_since(*since) < SILENT_FOR)
        };
        let mut order: Vec<usize> = (0..count).map(|step| (start + step) % count).collect();
        order.sort_by_key(|at| is_silent(*at));
        let mut last = None;
        let mut someone_answered = false;
        for (step, &at) in order.iter().enumerate() {
            // A member silent lately is not waited for again while another
            // is up (it answered `NOT_LEADER`: an election is under way).
            if someone_answered && is_silent(at) {
                continue;
            }
            let target = ClientTarget {
                remote: self.members[at],
                ..self.target.clone()
            };
            let outcome = rpc_raw(&target, config, kind, payload, self.timeout)?;
            let Some(why) = passed_over(&outcome) else {
                self.answered.set(at);
                self.silent.borrow_mut().remove(&target.remote);
                return Ok((target.remote, outcome));
            };
            if outcome.handshake.is_none() {
                self.silent
                    .borrow_mut()
                    .insert(target.remote, std::time::Instant::now());
            } else {
                someone_answered = true;
            }
            if let Some(next) = order.get(step + 1) {
                eprintln!(
                    "internet2: {} {why}; trying {}",
                    target.remote, self.members[*next]
                );
            }
            last = Some((target.remote, outcome));
        }
        Ok(last.expect("at least two members were tried"))
    }

    /// The root certificate the user trusts (`--ca`): the anchor of every
    /// chain check here, never the server's word.
    fn trusted_root(&self) -> anyhow::Result<Vec<u8>> {
        match &self.target.trust {
            ServerTrust::Roots(roots) | ServerTrust::RootsAndPin { roots, .. }
                if !roots.is_empty() =>
            {
                Ok(roots[0].to_vec())
            }
            _ => bail!("no trusted root certificate (pass --ca)"),
        }
    }

    fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        kind: u8,
        request: &Req,
    ) -> Result<Resp, CallError> {
        let what = kind_name(kind);
        let payload = serde_json::to_vec(request).expect("requests serialize");
        let setup = |source| CallError::Setup {
            remote: self.target.remote,
            source: Box::new(source),
        };
        let config = self
            .target
            .client_config(dataplane::protocols::ALPN_STOQ)
            .map_err(setup)?;
        let (remote, outcome) = self.exchange(&config, kind, &payload).map_err(setup)?;
        let body = match outcome.replies.into_iter().next() {
            Some(Reply::Ok(body)) => body,
            Some(Reply::Error { code, message }) => {
                return Err(CallError::Refused {
                    what,
                    code,
                    message,
                });
            }
            Some(Reply::Failed(why)) => return Err(CallError::Failed { what, remote, why }),
            None => {
                return Err(CallError::Failed {
                    what,
                    remote,
                    why: outcome.error.unwrap_or_else(|| "no answer".into()),
                });
            }
        };
        serde_json::from_slice(&body).map_err(|e| CallError::BadAnswer {
            what,
            detail: e.to_string(),
        })
    }

    /// The log key, as the server states it (`CT_KEY`, checked against its
    /// log id). The connection is authenticated by the --ca root.
    fn log_key(&self) -> anyhow::Result<(CtKey, LogPublicKey)> {
        let answer: CtKey = self.call(api::CT_KEY, &NoArguments {})?;
        let key = LogPublicKey::from_ct_key(&answer).context("the log key (CT_KEY)")?;
        Ok((answer, key))
    }

    /// The latest tree head, its signature checked with `key`.
    fn checked_sth(&self, key: &LogPublicKey) -> anyhow::Result<(Sth, SignedTreeHead)> {
        let sth: Sth = self.call(api::CT_STH, &NoArguments {})?;
        let checked = api::check_sth(&sth, key)
            .context("REFUSING the latest tree head: its signature does not verify")?;
        Ok((sth, checked))
    }

    /// The CA's root and intermediate, the root compared with the trusted
    /// one and the intermediate checked to be signed by it.
    fn ca_root(&self) -> anyhow::Result<CaRoot> {
        let answer: CaRoot = self.call(api::CA_ROOT, &NoArguments {})?;
        let trusted = self.trusted_root()?;
        let root = pem_der("the server's root_pem", &answer.root_pem)?;
        if root != trusted {
            bail!("the server's root certificate is not the one given with --ca");
        }
        let intermediate = pem_der("the server's intermediate_pem", &answer.intermediate_pem)?;
        let (root, intermediate) = (parse_x509(&root)?, parse_x509(&intermediate)?);
        if !signed_by(&intermediate, &root) {
            bail!("the server's intermediate is not signed by the --ca root");
        }
        Ok(answer)
    }
}

/// An `Issued` answer that passed `api::verify_issued` against the trusted
/// root and the log key; only [`trust_issued`] makes one, and every path
/// that writes or prints an issued certificate takes one.
struct VerifiedIssued(Issued);

fn trust_issued(
    issued: Issued,
    key: &LogPublicKey,
    root_der: &[u8],
) -> anyhow::Result<VerifiedIssued> {
    api::verify_issued(&issued, key, root_der).context(
        "REFUSING the issued certificate: it does not check out against the --ca root and the log",
    )?;
    Ok(VerifiedIssued(issued))
}

impl VerifiedIssued {
    fn print_summary(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let issued = &self.0;
        // verify_issued parsed the certificate already.
        let facts = pem_der("certificate_pem", &issued.certificate_pem)
            .and_then(|der| CertFacts::of(&der))
            .expect("a verified certificate parses");
        writeln!(out, "serial     {}", issued.serial)?;
        writeln!(out, "subject    CN={}", facts.subject)?;
        writeln!(out, "names      {}", facts.names().join(", "))?;
        writeln!(out, "not after  {}", utc(issued.not_after))?;
        writeln!(
            out,
            "log index  {} (tree size {}, inclusion proof and tree head signature verified)",
            issued.leaf_index, issued.sth.tree_size
        )
    }

    /// Certificate, intermediate and (when given) the key, as one PEM text.
    fn pem(&self, key_pem: Option<&str>) -> String {
        let mut out = String::new();
        for part in [&self.0.certificate_pem, &self.0.chain_pem]
            .into_iter()
            .map(String::as_str)
            .chain(key_pem)
        {
            out.push_str(part);
            if !part.ends_with('\n') {
                out.push('\n');
            }
        }
        out
    }
}

/// What the CLI shows of a certificate.
struct CertFacts {
    serial: String,
    subject: String,
    issuer: String,
    dns_names: Vec<String>,
    ip_addresses: Vec<IpAddr>,
    not_before: i64,
    not_after: i64,
    spki: Vec<u8>,
}

impl CertFacts {
    fn of(der: &[u8]) -> anyhow::Result<Self> {
        let cert = parse_x509(der)?;
        let names = controlplane::authority::ca::certificate_names(&cert);
        Ok(Self {
            serial: hex(cert.raw_serial()),
            subject: names.subject,
            issuer: cert.issuer().to_string(),
            dns_names: names.dns_names,
            ip_addresses: names.ip_addresses,
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            spki: cert.public_key().raw.to_vec(),
        })
    }

    fn names(&self) -> Vec<String> {
        let ips = self.ip_addresses.iter().map(ToString::to_string);
        self.dns_names.iter().cloned().chain(ips).collect()
    }
}

/// A certificate read from a local file (its first certificate), with the
/// private key when the file holds one (an identity file).
struct LocalCert {
    der: Vec<u8>,
    pem: String,
    key_pem: Option<String>,
    facts: CertFacts,
}

fn read_local(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// What PEM blocks a file holds, for error messages.
fn pem_labels(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let labels: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("-----BEGIN ")?.strip_suffix("-----"))
        .collect();
    if labels.is_empty() {
        "no PEM block".into()
    } else {
        labels.join(", ")
    }
}

fn read_certificate(path: &Path) -> anyhow::Result<LocalCert> {
    let bytes = read_local(path)?;
    let der = CertificateDer::pem_slice_iter(&bytes)
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{}: not a certificate: expected a PEM CERTIFICATE block, found {}",
                path.display(),
                pem_labels(&bytes)
            )
        })?;
    let facts =
        CertFacts::of(&der).with_context(|| format!("{}: not a certificate", path.display()))?;
    let key_pem = PrivateKeyDer::from_pem_slice(&bytes).ok().map(|key| {
        let label = match &key {
            PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
            PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
            _ => "PRIVATE KEY",
        };
        pem_encode(label, key.secret_der())
    });
    Ok(LocalCert {
        pem: pem_encode("CERTIFICATE", &der),
        der: der.to_vec(),
        key_pem,
        facts,
    })
}

/// A CSR file, parsed and its signature checked before it is sent.
fn read_csr(path: &Path) -> anyhow::Result<String> {
    let bytes = read_local(path)?;
    let der = CertificateSigningRequestDer::from_pem_slice(&bytes).map_err(|_| {
        anyhow::anyhow!(
            "{}: not a CSR: expected a PEM CERTIFICATE REQUEST block, found {}",
            path.display(),
            pem_labels(&bytes)
        )
    })?;
    let csr = match X509CertificationRequest::from_der(&der) {
        Ok(([], csr)) => csr,
        Ok(_) => bail!("{}: not a usable CSR: trailing bytes", path.display()),
        Err(e) => bail!("{}: not a usable CSR: {e}", path.display()),
    };
    csr.verify_signature().map_err(|e| {
        anyhow::anyhow!(
            "{}: the CSR's signature does not verify: {e}",
            path.display()
        )
    })?;
    Ok(pem_encode("CERTIFICATE REQUEST", &der))
}

fn parse_x509(der: &[u8]) -> anyhow::Result<X509Certificate<'_>> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => bail!("trailing bytes after the X.509 certificate"),
        Err(e) => bail!("not an X.509 certificate: {e}"),
    }
}

fn signed_by(child: &X509Certificate<'_>, parent: &X509Certificate<'_>) -> bool {
    child.issuer().as_raw() == parent.subject().as_raw()
        && child.verify_signature(Some(parent.public_key())).is_ok()
}

fn pem_der(field: &str, pem: &str) -> anyhow::Result<Vec<u8>> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|d| d.to_vec())
        .map_err(|e| anyhow::anyhow!("{field} is not a PEM certificate: {e}"))
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let body = api::b64(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn unix_now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Unix seconds as RFC 3339 UTC (proleptic Gregorian; H. Hinnant's
/// `civil_from_days`).
fn utc(unix_s: u64) -> String {
    utc_signed(i64::try_from(unix_s).unwrap_or(i64::MAX))
}

fn utc_signed(unix_s: i64) -> String {
    let (days, secs) = (unix_s.div_euclid(86_400), unix_s.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

fn utc_ms(unix_ms: u64) -> String {
    utc(unix_ms / 1000)
}

fn print_json(value: &impl Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("answers serialize")
    );
}

/// Write `contents` to `path` with mode 0600, its missing parent
/// directories made with 0700. Unless `replace`, an existing file is an
/// error; a replacement is written beside it and renamed over it, so the
/// file is never half written.
fn write_private(path: &Path, contents: &str, replace: bool) -> anyhow::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let staging = if replace {
        let mut name = path.file_name().unwrap_or_default().to_owned();
        name.push(format!(".{}.tmp", std::process::id()));
        path.with_file_name(name)
    } else {
        path.to_owned()
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&staging)
        .with_context(|| match replace {
            false if path.exists() => format!(
                "{} exists; pass --force to replace it, or --out elsewhere",
                path.display()
            ),
            _ => format!("cannot create {}", staging.display()),
        })?;
    let written = file
        .write_all(contents.as_bytes())
        .and_then(|()| file.sync_all());
    if replace && written.is_ok() {
        return std::fs::rename(&staging, path).with_context(|| {
            let _ = std::fs::remove_file(&staging);
            format!("cannot replace {}", path.display())
        });
    }
    written.with_context(|| {
        let _ = std::fs::remove_file(&staging);
        format!("cannot write {}", staging.display())
    })
}

// ---------------------------------------------------------------- enroll

/// This host's name, the default certificate name.
fn host_name() -> anyhow::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|n| n.trim().to_owned())
        .unwrap_or_default();
    if name.is_empty() {
        bail!("cannot read this host's name; pass --name NAME");
    }
    Ok(name)
}

/// A CSR for `names` (the first is the CN) with `key`.
fn csr_for(key: &rcgen::KeyPair, names: &[String]) -> anyhow::Result<String> {
    let mut params = rcgen::CertificateParams::new(names.to_vec())
        .with_context(|| format!("the names {names:?} are not DNS names or IP addresses"))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, names[0].as_str());
    params
        .serialize_request(key)
        .and_then(|csr| csr.pem())
        .context("cannot make the certificate request")
}

/// Where `enroll` keeps the key of an enrollment in progress: beside the
/// identity file, written before the token is sent, removed once the
/// identity is saved. A token is never spent on a key that is not on disk.
fn pending_key_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_owned();
    name.push(".pending");
    out.with_file_name(name)
}

/// The key an earlier attempt left in `pending` (`true`), or a new ECDSA
/// P-256 key saved there (0600) first (`false`).
fn pending_key(pending: &Path) -> anyhow::Result<(rcgen::KeyPair, bool)> {
    if pending.exists() {
        let pem = std::fs::read_to_string(pending)
            .with_context(|| format!("cannot read {}", pending.display()))?;
        let key = rcgen::KeyPair::from_pem(&pem).map_err(|e| {
            anyhow::anyhow!(
                "{}: not a private key ({e}); remove it to enroll with a new key",
                pending.display()
            )
        })?;
        return Ok((key, true));
    }
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .context("cannot generate a key")?;
    write_private(pending, &key.serialize_pem(), false)?;
    Ok((key, false))
}

/// `internet2 enroll`: a key made here and saved before the token is
/// spent, a certificate paid for with the token, verified against the log
/// before it is saved. Run again after a failure, it finishes with the
/// saved key (the server answers the same token and key with the same
/// certificate).
pub fn enroll<T: Connect>(args: &EnrollArgs<T>, default_out: &Path) -> anyhow::Result<()> {
    let out = args.out.clone().unwrap_or_else(|| default_out.to_owned());
    if out.exists() && !args.force {
        bail!(
            "{} exists; pass --force to replace it, or --out elsewhere",
            out.display()
        );
    }
    let token = args.token.trim();
    if token.len() != controlplane::authority::enrollment::TOKEN_TEXT_LEN
        || !token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        bail!(
            "the enrollment token must be {} base64url characters, as `internet2-server enroll-token` prints it",
            controlplane::authority::enrollment::TOKEN_TEXT_LEN
        );
    }
    let names = match args.names.is_empty() {
        true => vec![host_name()?],
        false => args.names.clone(),
    };
    let pending = pending_key_path(&out);
    let (key, resumed) = pending_key(&pending)?;
    if resumed {
        eprintln!(
            "using the key an earlier attempt saved in {}",
            pending.display()
        );
    }
    let csr_pem = csr_for(&key, &names)?;

    // Without a certificate the server answers only ENROLL and CT_KEY. The
    // log key comes first: a server that cannot give it costs no token.
    let mut session = Session::open(&args.target)?;
    let root_der = session.trusted_root()?;
    session.target.identity = None;
    let (_, log_key) = session.log_key()?;
    let request = EnrollRequest {
        token: token.to_owned(),
        csr_pem,
    };
    let kept = || {
        format!(
            "the key of this enrollment stays in {}; running the same command again finishes with it",
            pending.display()
        )
    };
    let issued: Issued = session.call(api::ENROLL, &request).with_context(kept)?;
    let cert_der = pem_der("certificate_pem", &issued.certificate_pem)?;
    if CertFacts::of(&cert_der)?.spki != key.public_key_der() {
        bail!("REFUSING the issued certificate: it is not for the key made here");
    }
    let verified = trust_issued(issued, &log_key, &root_der).with_context(kept)?;
    write_private(&out, &verified.pem(Some(&key.serialize_pem())), args.force)
        .with_context(kept)?;
    std::fs::remove_file(&pending).with_context(|| {
        format!(
            "the identity is saved, but {} is not removed",
            pending.display()
        )
    })?;
    println!("enrolled; identity saved to {}", out.display());
    verified.print_summary(&mut std::io::stdout())?;

    let chain_der = pem_der("chain_pem", &verified.0.chain_pem)?;
    session.target.identity = Some(ClientIdentity {
        chain: vec![cert_der.into(), chain_der.into()],
        key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    });
    report_admission(&mut session, &out);
    Ok(())
}

/// Whether a server admits an identity.
enum Admission {
    Admitted,
    /// It holds too little stake: the operator must grant it.
    NeedsStake {
        identity: controlplane::consensus::stake::Identity,
        short: crate::admission::StakeShortfall,
    },
}

/// Tell the user whether the server admits the identity just saved (in
/// `session`'s target) and, when it lacks stake, the operator's command
/// that grants it. Nothing here undoes the enrollment.
fn report_admission(session: &mut Session, out: &Path) {
    match admission_of(session, out) {
        Ok(Admission::Admitted) => println!("admitted: this server accepts the new identity"),
        Ok(Admission::NeedsStake { identity, short }) => {
            println!(
                "not admitted yet: this server requires stake {} and identity {identity} holds {}",
                short.min, short.held
            );
            println!("ask the operator of this server to run:");
            println!("  {}", short.grant_command(&identity));
        }
        Err(e) => {
            eprintln!("warning: the identity is saved, but this server did not admit it: {e:#}")
        }
    }
}

/// One admitted ping with the identity in `session` (it builds the plot,
/// cached beside `out`, and registers it, which is when a development
/// server grants stake); when that is refused, the connection's admission
/// parameters say whether stake is what is missing.
fn admission_of(session: &mut Session, out: &Path) -> anyhow::Result<Admission> {
    let identity = session
        .target
        .identity
        .as_ref()
        .expect("called with the new identity");
    let owner = crate::admission::identity_of_certificate(&identity.chain[0])
        .map_err(|e| anyhow::anyhow!("the new certificate's key: {e}"))?;
    session.target.admitter = Some(crate::admission::KeyAdmitter::new(
        identity,
        Some(out),
        true,
    )?);
    let config = session
        .target
        .client_config(dataplane::protocols::ALPN_STOQ)?;
    let ping = vec![(
        dataplane::protocols::stoq::Kind::Ping,
        bytes::Bytes::from_static(b"enrolled"),
    )];
    let outcome = dataplane::client::rpc(&session.target, &config, ping, session.timeout)?;
    let refused = match outcome.replies.into_iter().next() {
        Some(Reply::Ok(_)) => return Ok(Admission::Admitted),
        Some(Reply::Error { code, message }) => format!("server error {code}: {message}"),
        Some(Reply::Failed(why)) => why,
        None => outcome.error.unwrap_or_else(|| "no answer".into()),
    };
    // The parameters alone: no proofs, so this is no second refusal.
    session.target.admitter = None;
    let parameters = rpc_raw(
        &session.target,
        &config,
        dataplane::admission::KIND_ADMISSION_PARAMS,
        &[],
        session.timeout,
    )?;
    if let Some(Reply::Ok(body)) = parameters.replies.first()
        && let Some(short) =
            crate::admission::StakeShortfall::of_offer(body).map_err(|e| anyhow::anyhow!(e))?
    {
        return Ok(Admission::NeedsStake {
            identity: owner,
            short,
        });
    }
    bail!("{refused}")
}

// ---------------------------------------------------------------- cert

pub fn cert<T: Connect>(command: &CertCommand<T>) -> anyhow::Result<()> {
    match command {
        CertCommand::Issue {
            target,
            csr,
            usage,
            lifetime_hours,
            out,
        } => {
            let csr_pem = read_csr(csr)?;
            let request = CertIssueRequest {
                csr_pem,
                usage: match usage {
                    UsageArg::Client => CertUsage::Client,
                    UsageArg::Server => CertUsage::Server,
                },
                lifetime_hours: *lifetime_hours,
            };
            let session = Session::open(target)?;
            let issued = issue_checked(&session, api::CERT_ISSUE, &request)?;
            emit_issued(&issued, None, out.as_deref())
        }
        CertCommand::Renew { target, cert, out } => {
            let local = read_certificate(cert)?;
            let request = CertRenewRequest {
                certificate_pem: local.pem,
            };
            let session = Session::open(target)?;
            let issued = issue_checked(&session, api::CERT_RENEW, &request)?;
            emit_issued(&issued, local.key_pem.as_deref(), out.as_deref())
        }
        CertCommand::Revoke {
            target,
            serial,
            reason,
        } => {
            let serial = parse_serial(serial)?;
            let session = Session::open(target)?;
            let request = CertRevokeRequest {
                serial,
                reason: reason.clone(),
            };
            let revoked: Revoked = match session.call(api::CERT_REVOKE, &request) {
                Ok(revoked) => revoked,
                Err(CallError::Failed { why, .. }) if presents(&session, &request.serial) => bail!(
                    "the server closed the connection ({why}); this connection presented the \
                     certificate being revoked, which the server stops accepting at once, so \
                     the revocation has most likely happened: check with \
                     `internet2 cert list --filter revoked` as another identity"
                ),
                Err(e) => return Err(e.into()),
            };
            println!("revoked {} at {}", revoked.serial, utc(revoked.revoked_at));
            Ok(())
        }
        CertCommand::List {
            target,
            filter,
            json,
        } => cert_list(target, filter, *json),
        CertCommand::Verify { target, file } => cert_verify(target, file),
    }
}

/// Send an issuing request and verify the answer before anything uses it.
fn issue_checked(
    session: &Session,
    kind: u8,
    request: &impl Serialize,
) -> anyhow::Result<VerifiedIssued> {
    let root_der = session.trusted_root()?;
    let issued: Issued = session.call(kind, request)?;
    let (_, log_key) = session.log_key()?;
    trust_issued(issued, &log_key, &root_der)
}

fn emit_issued(
    issued: &VerifiedIssued,
    key_pem: Option<&str>,
    out: Option<&Path>,
) -> anyhow::Result<()> {
    match out {
        Some(path) => {
            write_private(path, &issued.pem(key_pem), true)?;
            println!("saved to {}", path.display());
            issued.print_summary(&mut std::io::stdout())?;
        }
        None => {
            issued.print_summary(&mut std::io::stderr())?;
            print!("{}", issued.pem(None));
        }
    }
    Ok(())
}

/// Whether the session's client certificate has `serial`.
fn presents(session: &Session, serial: &str) -> bool {
    let leaf = session
        .target
        .identity
        .as_ref()
        .and_then(|i| i.chain.first());
    leaf.and_then(|der| CertFacts::of(der).ok())
        .is_some_and(|facts| facts.serial == serial)
}

fn parse_serial(serial: &str) -> anyhow::Result<String> {
    let serial = serial.trim().replace(':', "").to_ascii_lowercase();
    if serial.len() != 32 || !serial.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("the serial must be 32 hex digits (as `internet2 cert list` shows it)");
    }
    Ok(serial)
}

fn check_filter(filter: &str) -> anyhow::Result<()> {
    match filter {
        "all" | "valid" | "revoked" => Ok(()),
        f if f.strip_prefix("name:").is_some_and(|n| !n.is_empty()) => Ok(()),
        other => bail!("--filter {other:?} is not one of all, valid, revoked, name:NAME"),
    }
}

/// Every page of `CERT_LIST` for `filter`.
fn list_all(session: &Session, filter: &str) -> anyhow::Result<CertList> {
    let mut all = CertList {
        certificates: Vec::new(),
        next: None,
    };
    let mut after = None;
    loop {
        let request = CertListRequest {
            filter: filter.to_owned(),
            after: after.take(),
        };
        let page: CertList = session.call(api::CERT_LIST, &request)?;
        all.certificates.extend(page.certificates);
        match page.next {
            // A server that repeats itself would page forever.
            Some(next) if all.certificates.last().is_some_and(|c| c.serial == next) => {
                after = Some(next)
            }
            Some(next) => bail!("CERT_LIST: the page's `next` {next} is not its last serial"),
            None => return Ok(all),
        }
    }
}

fn cert_list(target: &impl Connect, filter: &str, json: bool) -> anyhow::Result<()> {
    check_filter(filter)?;
    let session = Session::open(target)?;
    let list = list_all(&session, filter)?;
    if json {
        print_json(&list);
        return Ok(());
    }
    let now = unix_now_s();
    println!(
        "{:<32}  {:<6}  {:<20}  {:<7}  {:<5}  subject / names",
        "serial", "usage", "not after", "status", "leaf"
    );
    for c in &list.certificates {
        let status = match (c.revoked_at, i64::try_from(c.not_after).unwrap_or(i64::MAX)) {
            (Some(_), _) => "revoked",
            (None, t) if t < now => "expired",
            _ => "valid",
        };
        let names: Vec<&str> = c
            .dns_names
            .iter()
            .chain(&c.ip_addresses)
            .map(String::as_str)
            .collect();
        println!(
            "{:<32}  {:<6}  {:<20}  {status:<7}  {:<5}  {} [{}]",
            c.serial,
            match c.usage {
                CertUsage::Client => "client",
                CertUsage::Server => "server",
                CertUsage::Node => "member",
            },
            utc(c.not_after),
            c.leaf_index,
            c.subject,
            names.join(", ")
        );
    }
    println!("{} certificates", list.certificates.len());
    Ok(())
}

/// `cert verify`: chain to the --ca root, validity now, inclusion under a
/// signed tree head (all through `verify_issued`), then revocation.
fn cert_verify(target: &impl Connect, file: &Path) -> anyhow::Result<()> {
    let local = read_certificate(file)?;
    let facts = &local.facts;
    let session = Session::open(target)?;
    let ca = session.ca_root()?;
    let intermediate_der = pem_der("intermediate_pem", &ca.intermediate_pem)?;
    println!("certificate {} ({})", file.display(), facts.subject);
    println!("  serial      {}", facts.serial);
    println!("  names       {}", facts.names().join(", "));
    if !signed_by(&parse_x509(&local.der)?, &parse_x509(&intermediate_der)?) {
        bail!(
            "{}: not a certificate of this CA: it was issued by {:?}, not by the intermediate of the --ca root",
            file.display(),
            facts.issuer
        );
    }
    println!("  chain       signed by the intermediate, which the --ca root signed");
    let now = unix_now_s();
    let validity = format!(
        "{} to {}",
        utc_signed(facts.not_before),
        utc_signed(facts.not_after)
    );
    if now > facts.not_after {
        bail!("{}: the certificate expired ({validity})", file.display());
    }
    if now < facts.not_before {
        bail!(
            "{}: the certificate is not yet valid ({validity})",
            file.display()
        );
    }
    println!("  validity    {validity}: valid now");

    let (ct_key, log_key) = session.log_key()?;
    let (sth, checked) = session.checked_sth(&log_key)?;
    let request = CtProofRequest {
        leaf_hash: None,
        certificate_pem: Some(local.pem.clone()),
        tree_size: Some(checked.tree_size),
    };
    let proof: Proof = session.call(api::CT_PROOF, &request)?;
    let issued = Issued {
        certificate_pem: local.pem.clone(),
        chain_pem: ca.intermediate_pem.clone(),
        serial: facts.serial.clone(),
        not_before: u64::try_from(facts.not_before).unwrap_or(0),
        not_after: u64::try_from(facts.not_after).unwrap_or(0),
        leaf_index: proof.leaf_index,
        sth,
        proof,
    };
    api::verify_issued(&issued, &log_key, &session.trusted_root()?).with_context(|| {
        format!(
            "{}: the log does not prove this certificate",
            file.display()
        )
    })?;
    println!(
        "  tree head   size {} at {}, signature verified ({}, log id {})",
        checked.tree_size,
        utc_ms(checked.timestamp_ms),
        ct_key.algorithm,
        ct_key.log_id
    );
    println!(
        "  log         leaf {} (logged {}), inclusion proof verified against the tree head",
        issued.leaf_index,
        utc_ms(issued.proof.timestamp)
    );
    let revoked = list_all(&session, "revoked")?;
    if let Some(r) = revoked
        .certificates
        .iter()
        .find(|c| c.serial == facts.serial)
    {
        bail!(
            "{}: the certificate is revoked (at {}, reason {})",
            file.display(),
            r.revoked_at.map_or_else(|| "?".into(), utc),
            r.revocation_reason.as_deref().unwrap_or("unspecified")
        );
    }
    println!("  revocation  not revoked");
    println!("OK");
    Ok(())
}

// ---------------------------------------------------------------- ca

pub fn ca<T: Connect>(command: &CaCommand<T>) -> anyhow::Result<()> {
    let CaCommand::Root {
        target,
        check,
        intermediate,
    } = command;
    let session = Session::open(target)?;
    let answer = if *check {
        let answer = session.ca_root()?;
        eprintln!("the server's root is the --ca root; its intermediate is signed by it");
        answer
    } else {
        session.call(api::CA_ROOT, &NoArguments {})?
    };
    print!("{}", answer.root_pem);
    if *intermediate {
        print!("{}", answer.intermediate_pem);
    }
    Ok(())
}

// ---------------------------------------------------------------- cluster

pub fn cluster<T: Connect>(command: &ClusterCommand<T>) -> anyhow::Result<()> {
    let ClusterCommand::Status {
        target,
        json,
        own_view,
    } = command;
    let session = Session::open(target)?;
    let status: serde_json::Value = session.call(
        dataplane::protocols::stoq_registry::CLUSTER_STATUS,
        &serde_json::json!({ "own_view": own_view }),
    )?;
    if *json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    let text = |key: &str| match &status[key] {
        serde_json::Value::Null => "-".to_owned(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    println!(
        "leader {}  term {}  commit_index {}  (answered by {})",
        text("leader"),
        text("term"),
        text("commit_index"),
        text("answered_by")
    );
    println!("{:<20}  {:<7}  {:>6}  address", "name", "role", "lag");
    for member in status["members"].as_array().into_iter().flatten() {
        let field = |key: &str| match &member[key] {
            serde_json::Value::Null => "-".to_owned(),
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        println!(
            "{:<20}  {:<7}  {:>6}  {}",
            field("name"),
            field("role"),
            field("lag"),
            field("address")
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- failover load

/// `internet2 failover-load`: what `cargo xtask bench-cluster` runs while
/// it kills leaders.
#[derive(Debug, clap::Args)]
pub struct FailoverLoadArgs<T: Connect> {
    #[command(flatten)]
    pub target: T,
    /// Stop issuing once this file exists, then check every member's log.
    #[arg(long, value_name = "PATH")]
    pub stop_file: PathBuf,
    /// Append one JSON line per acknowledged certificate here (its time,
    /// the member that answered, serial, log index and tree head).
    #[arg(long, value_name = "PATH")]
    pub acks: PathBuf,
    /// Write the summary here as JSON.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
}

/// One acknowledged certificate.
struct Ack {
    leaf_index: u64,
    certificate_pem: String,
    sth: Sth,
}

/// Issue certificates one at a time through the members (failing over as
/// every command does) until the stop file appears; every answer is
/// either a certificate checked against the root and the log, or a refusal
/// that changed nothing (retried), or wrong. Then check, on every member,
/// that each acknowledged certificate is at its index in the log, and that
/// every tree head seen is consistent with the latest (the independent
/// verifier in `controlplane::authority::ct::verify`).
pub fn failover_load<T: Connect>(args: &FailoverLoadArgs<T>) -> anyhow::Result<()> {
    let session = Session::open(&args.target)?;
    // The first connection also builds the admission plot: give it time.
    let started = std::time::Instant::now();
    let key = loop {
        match session.log_key() {
            Ok((_, key)) => break key,
            Err(e) if started.elapsed() < Duration::from_secs(60) => {
                eprintln!("failover-load: the log key: {e:#}; asking again");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e),
        }
    };
    let root = session.trusted_root()?;
    let config = session
        .target
        .client_config(dataplane::protocols::ALPN_STOQ)?;
    let payload = crate::authority_load::issue_payload()?;
    let mut acks_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.acks)
        .with_context(|| format!("{}", args.acks.display()))?;
    let mut acks = Vec::new();
    let (mut retried, mut unknown) = (0u64, 0u64);
    let mut wrong: Vec<String> = Vec::new();
    while !args.stop_file.exists() {
        let (remote, outcome) = session.exchange(&config, api::CERT_ISSUE, &payload)?;
        match outcome.replies.first() {
            Some(Reply::Ok(body)) => {
                let checked = serde_json::from_slice::<Issued>(body)
                    .map_err(anyhow::Error::from)
                    .and_then(|issued| trust_issued(issued, &key, &root));
                match checked {
                    Ok(VerifiedIssued(issued)) => {
                        let line = serde_json::json!({
                            "t_ms": unix_ms(SystemTime::now()),
                            "member": remote.to_string(),
                            "serial": issued.serial,
                            "leaf_index": issued.leaf_index,
                            "tree_size": issued.sth.tree_size,
                        });
                        writeln!(acks_file, "{line}")?;
                        acks.push(Ack {
                            leaf_index: issued.leaf_index,
                            certificate_pem: issued.certificate_pem,
                            sth: issued.sth,
                        });
                    }
                    Err(e) => wrong.push(format!("{remote}: {e:#}")),
                }
            }
            Some(Reply::Error { code, message }) => match *code {
                // Nothing changed: asked again.
                api::NOT_LEADER => retried += 1,
                // Sent, unanswered: maybe committed (then it is in the
                // log, unacknowledged); asked again.
                api::STORAGE if message.contains("may be committed") => unknown += 1,
                _ => wrong.push(format!("{remote}: {code:#x} {message}")),
            },
            // No member answered (an election, a member restarting), or
            // one took the request and did not answer in time (a follower
            // whose leader just died): asked again, that member last.
            Some(Reply::Failed(_)) | None => {
                retried += 1;
                session
                    .silent
                    .borrow_mut()
                    .insert(remote, std::time::Instant::now());
            }
        }
        if outcome
            .replies
            .first()
            .is_none_or(|r| !matches!(r, Reply::Ok(_)))
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    eprintln!(
        "failover-load: {} acknowledged, {retried} retried, {unknown} unanswered, {} wrong; checking every member",
        acks.len(),
        wrong.len()
    );
    let members = match &session.members {
        members if members.is_empty() => vec![session.target.remote],
        members => members.clone(),
    };
    // Each member's latest head, then its log against every ack.
    let mut heads = Vec::new();
    let mut missing = Vec::new();
    for member in &members {
        let one = Session {
            target: ClientTarget {
                remote: *member,
                ..session.target.clone()
            },
            timeout: session.timeout,
            members: Vec::new(),
            answered: std::cell::Cell::new(0),
            silent: Default::default(),
        };
        // A member restarted late may still be catching up (or not admit
        // anyone yet): wait for it to hold every acknowledged entry.
        let needed = acks.iter().map(|a| a.leaf_index + 1).max().unwrap_or(0);
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let sth = loop {
            match one.checked_sth(&key) {
                Ok((sth, _)) if sth.tree_size >= needed => break sth,
                Ok(_) | Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(500));
                }
                Ok((sth, _)) => break sth,
                Err(e) => return Err(e.context(format!("{member}: its latest tree head"))),
            }
        };
        let size = sth.tree_size;
        let mut entries = std::collections::HashMap::new();
        let mut start = 0;
        while start < size {
            let end = (start + api::MAX_ENTRIES_PER_REQUEST).min(size);
            let page: api::Entries =
                one.call(api::CT_ENTRIES, &api::CtEntriesRequest { start, end })?;
            for entry in page.entries {
                entries.insert(entry.leaf_index, entry.certificate_pem);
            }
            start = end;
        }
        for ack in &acks {
            if entries.get(&ack.leaf_index) != Some(&ack.certificate_pem) {
                missing.push(format!("{member}: log index {}", ack.leaf_index));
            }
        }
        heads.push((*member, sth, one));
    }
    // The largest head, and every head seen proven a prefix of it by the
    // member that signed it; heads of one size must be one root.
    let (_, newest, by) = heads
        .iter()
        .max_by_key(|(_, sth, _)| sth.tree_size)
        .expect("at least one member");
    let mut inconsistent = Vec::new();
    let mut seen: std::collections::BTreeMap<u64, String> = std::collections::BTreeMap::new();
    let all_heads = acks
        .iter()
        .map(|a| &a.sth)
        .chain(heads.iter().map(|(_, sth, _)| sth));
    let mut checked = 0;
    for sth in all_heads {
        if let Some(root) = seen.get(&sth.tree_size) {
            if *root != sth.root_hash {
                inconsistent.push(format!(
                    "two roots for tree size {}: {root} and {}",
                    sth.tree_size, sth.root_hash
                ));
            }
            continue;
        }
        seen.insert(sth.tree_size, sth.root_hash.clone());
        if sth.tree_size == 0 || sth.tree_size == newest.tree_size {
            continue;
        }
        let answer: Consistency = by.call(
            api::CT_CONSISTENCY,
            &CtConsistencyRequest {
                old_size: sth.tree_size,
                new_size: newest.tree_size,
            },
        )?;
        checked += 1;
        if answer.new_sth.root_hash != newest.root_hash
            || api::verify_consistency(sth, &answer.new_sth, &answer.proof, &key).is_err()
        {
            inconsistent.push(format!(
                "tree {} is not a prefix of tree {}",
                sth.tree_size, newest.tree_size
            ));
        }
    }
    let summary = serde_json::json!({
        "acknowledged": acks.len(),
        "retried": retried,
        "unanswered_then_retried": unknown,
        "wrong_answers": wrong,
        "members": heads.iter().map(|(m, sth, _)| serde_json::json!({
            "address": m.to_string(),
            "tree_size": sth.tree_size,
        })).collect::<Vec<_>>(),
        "acknowledged_missing_from_a_log": missing,
        "tree_heads_checked": seen.len(),
        "consistency_proofs_verified": checked,
        "inconsistent": inconsistent,
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&summary)? + "\n")?;
    }
    if !wrong.is_empty() || !missing.is_empty() || !inconsistent.is_empty() {
        bail!(
            "the cluster gave a wrong answer, lost an acknowledged certificate, or forked (see the summary)"
        );
    }
    Ok(())
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

// ---------------------------------------------------------------- ct

pub fn ct<T: Connect>(command: &CtCommand<T>) -> anyhow::Result<()> {
    match command {
        CtCommand::Sth { target, json } => {
            let session = Session::open(target)?;
            let (ct_key, log_key) = session.log_key()?;
            let (sth, checked) = session.checked_sth(&log_key)?;
            if *json {
                print_json(&sth);
            } else {
                print_sth(&sth, &checked, &ct_key);
            }
            Ok(())
        }
        CtCommand::Proof {
            target,
            cert,
            leaf_hash,
            json,
        } => ct_proof(target, cert.as_deref(), leaf_hash.as_deref(), *json),
        CtCommand::Consistency {
            target,
            old,
            new,
            json,
        } => ct_consistency(target, *old, *new, *json),
        CtCommand::Entries {
            target,
            start,
            end,
            json,
        } => ct_entries(target, *start, *end, *json),
        CtCommand::Key { target, json } => {
            let session = Session::open(target)?;
            let (answer, _) = session.log_key()?;
            if *json {
                print_json(&answer);
            } else {
                println!("algorithm   {}", answer.algorithm);
                println!(
                    "log id      {} (SHA-256 of the key, checked)",
                    answer.log_id
                );
                println!("public key  {}", answer.public_key);
            }
            Ok(())
        }
    }
}

fn print_sth(sth: &Sth, checked: &SignedTreeHead, key: &CtKey) {
    println!("tree size   {}", checked.tree_size);
    println!(
        "timestamp   {} ({} ms)",
        utc_ms(checked.timestamp_ms),
        sth.timestamp
    );
    println!("root hash   {}", sth.root_hash);
    println!("log id      {}", sth.log_id);
    println!("signature   verified ({})", key.algorithm);
}

/// What `ct proof` proves the inclusion of.
enum Leaf {
    Certificate(LocalCert),
    Hash(ct::Hash),
}

fn ct_proof(
    target: &impl Connect,
    cert: Option<&Path>,
    hash: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let leaf = match (cert, hash) {
        (Some(path), None) => Leaf::Certificate(read_certificate(path)?),
        (None, Some(b64)) => {
            Leaf::Hash(api::b64_hash("--leaf-hash", b64.trim()).map_err(|e| anyhow::anyhow!(e))?)
        }
        _ => bail!("give exactly one of --cert and --leaf-hash"),
    };
    let session = Session::open(target)?;
    let (_, log_key) = session.log_key()?;
    let (_, checked) = session.checked_sth(&log_key)?;
    let request = CtProofRequest {
        leaf_hash: match &leaf {
            Leaf::Hash(h) => Some(api::b64(h)),
            Leaf::Certificate(_) => None,
        },
        certificate_pem: match &leaf {
            Leaf::Certificate(c) => Some(c.pem.clone()),
            Leaf::Hash(_) => None,
        },
        tree_size: Some(checked.tree_size),
    };
    let proof: Proof = session.call(api::CT_PROOF, &request)?;
    // The leaf hash is recomputed here, never taken from the answer.
    let hash = match &leaf {
        Leaf::Hash(h) => *h,
        Leaf::Certificate(c) => leaf_hash(
            &encode_x509_leaf(proof.timestamp, &c.der, &[])
                .map_err(|e| anyhow::anyhow!("the certificate cannot be a log entry: {e}"))?,
        ),
    };
    if api::b64_hash("proof.leaf_hash", &proof.leaf_hash).ok() != Some(hash) {
        bail!("REFUSING the proof: it is for another leaf than the one asked about");
    }
    api::verify_proof(&proof, &hash, &checked)
        .context("REFUSING the proof: it does not verify against the signed tree head")?;
    if json {
        print_json(&proof);
        return Ok(());
    }
    println!("leaf index  {}", proof.leaf_index);
    println!("leaf hash   {}", proof.leaf_hash);
    println!("logged at   {}", utc_ms(proof.timestamp));
    println!(
        "tree size   {} (tree head signature verified)",
        proof.tree_size
    );
    println!("root hash   {}", proof.root_hash);
    println!(
        "audit path  {} hashes: inclusion verified",
        proof.audit_path.len()
    );
    Ok(())
}

fn ct_consistency(target: &impl Connect, old: u64, new: u64, json: bool) -> anyhow::Result<()> {
    if old == 0 || old > new {
        bail!("need 1 <= OLD <= NEW, got {old} and {new}");
    }
    let session = Session::open(target)?;
    let (_, log_key) = session.log_key()?;
    // The tree head of the old size comes from the log too: a consistency
    // "proof" from a size to itself carries that size's signed head.
    let old_head: Consistency = session.call(
        api::CT_CONSISTENCY,
        &CtConsistencyRequest {
            old_size: old,
            new_size: old,
        },
    )?;
    let answer: Consistency = session.call(
        api::CT_CONSISTENCY,
        &CtConsistencyRequest {
            old_size: old,
            new_size: new,
        },
    )?;
    if (answer.old_size, answer.new_size, answer.new_sth.tree_size) != (old, new, new)
        || old_head.new_sth.tree_size != old
    {
        bail!("REFUSING the consistency proof: it is for other tree sizes than asked");
    }
    api::verify_consistency(&old_head.new_sth, &answer.new_sth, &answer.proof, &log_key)
        .context("REFUSING the consistency proof: the log did not only append")?;
    if json {
        print_json(&answer);
        return Ok(());
    }
    println!(
        "tree {old} (root {}) is a prefix of tree {new} (root {})",
        old_head.new_sth.root_hash, answer.new_sth.root_hash
    );
    println!(
        "both tree heads' signatures and the {}-hash consistency proof verified",
        answer.proof.len()
    );
    Ok(())
}

/// `ct entries`: each entry's leaf input must hold the certificate shown
/// beside it and be proven in the latest signed tree head.
fn ct_entries(target: &impl Connect, start: u64, end: u64, json: bool) -> anyhow::Result<()> {
    if start >= end || end - start > api::MAX_ENTRIES_PER_REQUEST {
        bail!(
            "need START < END with at most {} entries, got {start}..{end}",
            api::MAX_ENTRIES_PER_REQUEST
        );
    }
    let session = Session::open(target)?;
    let (_, log_key) = session.log_key()?;
    let (_, checked) = session.checked_sth(&log_key)?;
    let answer: Entries = session.call(api::CT_ENTRIES, &CtEntriesRequest { start, end })?;
    if answer.entries.len() as u64 != end - start {
        bail!(
            "REFUSING the entries: asked for {} and got {}",
            end - start,
            answer.entries.len()
        );
    }
    let mut logged = Vec::with_capacity(answer.entries.len());
    for (entry, index) in answer.entries.iter().zip(start..) {
        let refuse = |why: String| anyhow::anyhow!("REFUSING entry {index}: {why}");
        if entry.leaf_index != index {
            return Err(refuse(format!("it says it is {}", entry.leaf_index)));
        }
        let input = api::b64_decode("leaf_input", &entry.leaf_input).map_err(refuse)?;
        let leaf = decode_leaf(&input).map_err(|e| refuse(e.to_string()))?;
        if pem_der("certificate_pem", &entry.certificate_pem)? != leaf.cert_der {
            return Err(refuse(
                "its certificate_pem is not the certificate in its leaf".into(),
            ));
        }
        let hash = leaf_hash(&input);
        let request = CtProofRequest {
            leaf_hash: Some(api::b64(&hash)),
            certificate_pem: None,
            tree_size: Some(checked.tree_size),
        };
        let proof: Proof = session.call(api::CT_PROOF, &request)?;
        if proof.leaf_index != index {
            return Err(refuse(format!(
                "the log proves it at index {}",
                proof.leaf_index
            )));
        }
        api::verify_proof(&proof, &hash, &checked)
            .map_err(|e| refuse(format!("its inclusion proof does not verify: {e}")))?;
        logged.push((leaf.timestamp_ms, CertFacts::of(&leaf.cert_der)?));
    }
    if json {
        print_json(&answer);
        return Ok(());
    }
    for ((timestamp_ms, facts), index) in logged.iter().zip(start..) {
        println!(
            "{index:>6}  {}  {}  {} [{}]",
            utc_ms(*timestamp_ms),
            facts.serial,
            facts.subject,
            facts.names().join(", ")
        );
    }
    println!(
        "{} entries, each proven in the signed tree head of size {}",
        logged.len(),
        checked.tree_size
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(handshake: bool, reply: Option<Reply>) -> dataplane::client::rpc::RpcOutcome {
        dataplane::client::rpc::RpcOutcome {
            replies: reply.into_iter().collect(),
            handshake: handshake.then_some(Duration::from_millis(1)),
            latency: None,
            zero_rtt_accepted: false,
            error: (!handshake).then(|| "timed out".to_owned()),
            admission: None,
            admission_deadline: false,
            closed_with: None,
        }
    }

    #[test]
    fn only_a_member_that_is_down_or_not_the_leader_is_passed_over() {
        let error = |code| Reply::Error {
            code,
            message: String::new(),
        };
        assert_eq!(
            passed_over(&outcome(false, None)).as_deref(),
            Some("did not answer (timed out)")
        );
        assert!(passed_over(&outcome(true, Some(error(api::NOT_LEADER)))).is_some());
        // A member that cannot admit anyone yet ran nothing.
        let mut unavailable = outcome(true, None);
        unavailable.closed_with =
            Some(u64::from(dataplane::admission::CLOSE_ADMISSION_UNAVAILABLE));
        assert!(passed_over(&unavailable).is_some());
        // Any other answer is final: the request reached a server that
        // may have acted on it.
        for reply in [
            error(api::ALREADY_REVOKED),
            error(api::STORAGE),
            Reply::Ok(bytes::Bytes::new()),
            Reply::Failed("reset after the handshake".into()),
        ] {
            assert_eq!(passed_over(&outcome(true, Some(reply))), None);
        }
    }

    #[test]
    fn utc_matches_known_dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(utc_signed(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn serials_are_normalized_or_refused() {
        let upper = "00112233445566778899AABBCCDDEEFF";
        assert_eq!(
            parse_serial(upper).unwrap(),
            "00112233445566778899aabbccddeeff"
        );
        assert!(parse_serial("0011").is_err());
        assert!(parse_serial("zz112233445566778899aabbccddeeff").is_err());
    }

    #[test]
    fn filters_are_checked_locally() {
        for ok in ["all", "valid", "revoked", "name:node1"] {
            check_filter(ok).unwrap();
        }
        assert!(check_filter("name:").is_err());
        assert!(check_filter("everything").is_err());
    }
}

/// `internet2 dns …`: the server's zone (the operator manages any name; a
/// client only names its certificate carries, with its own key's pin).
#[derive(Debug, clap::Subcommand)]
pub enum DnsCommand<T: Connect> {
    /// Set a name's AAAA addresses and TLSA pins (replaces both sets).
    Add {
        #[command(flatten)]
        target: T,
        /// Relative to the apex (`web`) or absolute (`web.internet2.test.`).
        name: String,
        /// An IPv6 address (repeat for several).
        #[arg(long = "address", value_name = "IPV6")]
        addresses: Vec<std::net::Ipv6Addr>,
        /// Publish a TLSA 3 1 1 pin: the SHA-256 of this certificate's key.
        #[arg(long, value_name = "PEM", conflicts_with = "pin")]
        pin_cert: Option<PathBuf>,
        /// Publish this TLSA 3 1 1 pin (64 hex digits).
        #[arg(long, value_name = "HEX")]
        pin: Option<String>,
        /// The UDP port the pin is for (default: --connect's port).
        #[arg(long)]
        port: Option<u16>,
        #[arg(long)]
        json: bool,
    },
    /// Remove a name and its records.
    Remove {
        #[command(flatten)]
        target: T,
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Every name in the zone.
    List {
        #[command(flatten)]
        target: T,
        #[arg(long)]
        json: bool,
    },
}

pub fn dns<T: Connect>(command: &DnsCommand<T>) -> anyhow::Result<()> {
    match command {
        DnsCommand::Add {
            target,
            name,
            addresses,
            pin_cert,
            pin,
            port,
            json,
        } => {
            let session = Session::open(target)?;
            let port = port.unwrap_or(session.target.remote.port());
            let pin = match (pin_cert, pin) {
                (Some(path), _) => Some(api::hex(&controlplane::authority::pem::spki_sha256(
                    &controlplane::authority::pem::load_cert(path)?,
                )?)),
                (None, Some(pin)) => {
                    api::hex_hash("--pin", pin).map_err(|e| anyhow::anyhow!(e))?;
                    Some(pin.to_lowercase())
                }
                (None, None) => None,
            };
            if addresses.is_empty() && pin.is_none() {
                bail!("give --address and/or --pin/--pin-cert (use `dns remove` to delete a name)");
            }
            let request = api::DnsSetRequest {
                name: name.clone(),
                addresses: addresses.iter().map(ToString::to_string).collect(),
                tlsa: pin
                    .into_iter()
                    .map(|spki_sha256| api::DnsTlsa { port, spki_sha256 })
                    .collect(),
            };
            let changed: api::DnsChanged = session.call(api::DNS_SET, &request)?;
            print_changed(&changed, *json)
        }
        DnsCommand::Remove { target, name, json } => {
            let session = Session::open(target)?;
            let changed: api::DnsChanged = session.call(
                api::DNS_REMOVE,
                &api::DnsRemoveRequest { name: name.clone() },
            )?;
            print_changed(&changed, *json)
        }
        DnsCommand::List { target, json } => {
            let session = Session::open(target)?;
            let mut records = Vec::new();
            let mut after = None;
            let serial = loop {
                let page: api::DnsList =
                    session.call(api::DNS_LIST, &api::DnsListRequest { after })?;
                records.extend(page.records);
                match page.next {
                    Some(next) => after = Some(next),
                    None => break page.serial,
                }
            };
            if *json {
                println!(
                    "{}",
                    serde_json::json!({ "serial": serial, "records": records })
                );
                return Ok(());
            }
            println!("zone serial {serial}, {} names", records.len());
            for record in &records {
                print_record(record);
            }
            Ok(())
        }
    }
}

fn print_changed(changed: &api::DnsChanged, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(changed)?);
        return Ok(());
    }
    match &changed.record {
        Some(record) => print_record(record),
        None => println!("{} removed", changed.name),
    }
    println!("zone serial {}", changed.serial);
    Ok(())
}

fn print_record(record: &api::DnsRecord) {
    println!("{}", record.name);
    for address in &record.addresses {
        println!("  AAAA {address}");
    }
    for tlsa in &record.tlsa {
        println!("  TLSA 3 1 1 {} (_{}._udp)", tlsa.spki_sha256, tlsa.port);
    }
    if let Some(owner) = &record.owner {
        println!("  owner key {owner}");
    }
}
