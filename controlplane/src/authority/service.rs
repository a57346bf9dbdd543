//! The authority's request handlers, sans-IO: the control-plane thread owns
//! one [`AuthorityService`] and calls [`AuthorityService::handle`] with every
//! `stoq/1` request that needs the authority (the worker forwards the raw
//! payload and the client certificate the TLS layer verified, and writes back
//! the bytes or the error returned). Time is an argument; the only I/O is the
//! authority's own storage (redb, durable before a certificate is returned)
//! and the operator identity file.
//!
//! A request that changes the state goes in two steps
//! ([`AuthorityService::handle_request`]): checked and proposed (the CA
//! signs, the serial and time are chosen) as a [`Command`], then answered
//! from what applying it did ([`Pending::finish`]). A single node applies
//! at once (`handle`); a cluster commits the command through its log
//! first, after other commands perhaps, so the apply checks it again and
//! may refuse it (a revocation of a serial revoked meanwhile is
//! `ALREADY_REVOKED`).
//!
//! Who may do what (the caller is identified by its client certificate,
//! checked again here against the CA and the revocation list):
//! - `ENROLL`: anyone, with a valid one-time token (again with the same
//!   token and key: the certificate it paid for, so a client that lost the
//!   answer can finish); `CT_KEY`: anyone, so an enrolling client checks
//!   its certificate's log proof before it has one. These two are the only
//!   kinds served without a client certificate;
//! - the operator (a certificate of this CA with subject CN exactly
//!   [`OPERATOR`]): everything;
//! - `CERT_ISSUE`: only for names the caller's own certificate carries
//!   (its CN, DNS names and IP addresses), and not the operator's names
//!   (below);
//! - `CERT_RENEW`, `CERT_REVOKE`: the owner (the caller's certificate has
//!   the same public key as the one named) or the operator;
//! - `CERT_LIST`, `CA_ROOT`, `CT_*`: any authenticated caller;
//! - `ROTATE`: the operator only.
//!
//! Names (a certificate's CN, DNS names and IP addresses):
//! - compared as DNS compares them, without case (RFC 4343 §3) and
//!   without an absolute name's trailing dot; a certificate keeps the
//!   spelling its CSR asked for;
//! - the operator's alone: [`OPERATOR`], the server's own names
//!   ([`ServiceConfig::server_names`], the zone's server name) and
//!   wildcards (a CN or DNS name with a `*`). `ENROLL` refuses them, and
//!   `CERT_ISSUE` and `CERT_RENEW` by anyone else (`UNAUTHORIZED`). A
//!   wildcard is refused because whether its requester holds every name
//!   under it cannot be checked for names not registered yet: the first
//!   to ask would pre-empt them all;
//! - first come, first served: `ENROLL` refuses a name an unrevoked,
//!   unexpired certificate with another key carries (`NAME_TAKEN`); the
//!   same key may enroll again for its names. There is no namespace
//!   delegation;
//! - held on authority: a certificate a non-operator's `CERT_ISSUE` makes
//!   is issued on the authority of the caller's certificate (its parent;
//!   renewals keep it). Revoking a certificate revokes, in the same
//!   transaction and with reason `privilege_withdrawn`, every live one
//!   that renewed it or was issued on its authority or on that of a
//!   certificate it renewed, and so on down (see `registry::descendants`
//!   for the cost): renewing ahead of a revocation does not escape it.
//!
//! The zone (when [`ServiceConfig::zone`] is set; see `crate::dns`):
//! - `DNS_LIST`: any authenticated caller (DNS data is public);
//! - `DNS_SET`, `DNS_REMOVE`: the operator for any name; another caller
//!   only for a name its certificate carries as its CN or a DNS name equal
//!   to the absolute name without its trailing dot (`app.internet2.test`;
//!   relative names in certificates do not count), only with TLSA pins of
//!   its own certificate's key, never one of the server's own names (as
//!   above: `server_names` too, not only the zone's server name) nor a
//!   wildcard (`UNAUTHORIZED`; the zone holds none), and not a name
//!   another key set (`NAME_TAKEN`) while a live (unrevoked, unexpired)
//!   certificate with that key still carries it. A name the operator or
//!   the server set has no owner key: a holder of a certificate for it may
//!   take it over.
//! - kept in step with the CA: issuing a server certificate (`CERT_ISSUE`
//!   with usage server, or `CERT_RENEW` of one) replaces the pins of the
//!   zone names it carries that have pins with its key's pin, in the
//!   transaction that logs the certificate; revoking a certificate removes
//!   its key's pins from the names it carries, in the revocation's
//!   transaction (and those of what it revokes with it), unless another
//!   live certificate with the same key carries the name. The server's own
//!   name is left to
//!   [`AuthorityService::register_server`].
//!
//! Rotation: `ROTATE` issues a new server certificate and keeps it; the
//! caller (the control-plane thread) takes it with
//! [`AuthorityService::take_rotated`] after each `handle` and publishes it
//! to the workers.

use super::api::{self, ServiceError};
use super::ca::IssuedCertificate;
use super::ca::{
    self, CaError, DEFAULT_LIFETIME, IssueRequest, KeyAlgorithm, RevocationSnapshot, Serial, Usage,
    same_name,
};
use super::ct::AppendReceipt;
use super::ct::{LogError, LogKeyAlgorithm, decode_leaf, encode_x509_leaf, leaf_hash};
use super::enrollment::{EnrollmentKey, VerifiedToken};
use super::logged::{Authority, AuthorityError, LoggedCertificate};
use super::logged::{Certify, SpentToken};
use super::registry::{
    CertificateFilter, CertificateRecord, MAX_RECORDS_PER_CALL, RevocationReason,
};
use crate::dns::{
    NameError, RecordError, RecordSet, Tlsa, Zone, ZoneChange, ZoneConfig, ZoneError, ZoneSnapshot,
};
use crate::machine::{Applied, Command, Machine};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

/// The subject common name of the operator's certificate. Reserved: no
/// enrollment may ask for it.
pub const OPERATOR: &str = "operator";

/// Who sent a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    /// The client certificate the TLS layer verified (leaf DER); `None` on
    /// a connection without one (it may only enroll).
    pub cert_der: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Lifetime of issued certificates unless a request says otherwise.
    pub lifetime: Duration,
    /// The names of the server's own certificate (DNS names or IP
    /// addresses; the first is also its subject CN).
    pub server_names: Vec<String>,
    pub ca_algorithm: KeyAlgorithm,
    pub log_algorithm: LogKeyAlgorithm,
    /// The DNS zone the authority holds; `None`: no zone, and the zone
    /// kinds answer `UNKNOWN_KIND`.
    pub zone: Option<ZoneConfig>,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            lifetime: DEFAULT_LIFETIME,
            server_names: vec!["localhost".into()],
            ca_algorithm: KeyAlgorithm::EcdsaP256,
            log_algorithm: LogKeyAlgorithm::EcdsaP256Sha256,
            zone: None,
        }
    }
}

/// What the TLS layer needs to check client certificates without asking
/// the control plane: build an immutable snapshot from it and swap it in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustMaterial {
    /// Changes whenever the material changes (today: with every
    /// revocation; the root and intermediate never change while running).
    pub generation: u64,
    pub root_der: Vec<u8>,
    pub intermediate_der: Vec<u8>,
    pub revoked: RevocationSnapshot,
}

/// A server certificate with its new key, ready for the TLS layer.
#[derive(Clone)]
pub struct ServerCertificate {
    /// The leaf, then the intermediate, DER.
    pub chain_der: Vec<Vec<u8>>,
    /// The leaf's private key, PKCS#8 DER.
    pub key_pkcs8_der: Vec<u8>,
    pub serial: Serial,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for ServerCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCertificate")
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The authority behind `stoq/1`. See the module documentation.
pub struct AuthorityService {
    /// The state: CA, log, registry, zone (and, once the server attaches
    /// it, admission). Every change goes through its `apply`.
    machine: Machine,
    config: ServiceConfig,
    tokens: EnrollmentKey,
    rotated: Option<ServerCertificate>,
    /// The server's TLS key (PKCS#8), kept across rotations: clients pin
    /// its SPKI (DNS TLSA 3 1 1), so a rotation must not change it.
    server_key: Vec<u8>,
}

/// The server's TLS key in the data directory (PEM, 0600, never rewritten).
pub const SERVER_KEY_FILE: &str = "server-tls.key";

fn server_spki(pkcs8: &[u8]) -> Result<Vec<u8>, AuthorityError> {
    let der = rustls::pki_types::PrivatePkcs8KeyDer::from(pkcs8);
    let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| AuthorityError::Ca(CaError::Rcgen(e)))?;
    Ok(key.public_key_der())
}

/// The public key (SubjectPublicKeyInfo DER) of the server's TLS key in
/// `data_dir`, made on first use: what a member's certificates certify.
pub fn server_public_key(data_dir: &Path) -> Result<Vec<u8>, AuthorityError> {
    server_spki(&load_or_create_server_key(data_dir)?)
}

/// Load the server's TLS key (PKCS#8 DER), or make one (ECDSA P-256) on
/// first start.
pub fn load_or_create_server_key(data_dir: &Path) -> Result<Vec<u8>, AuthorityError> {
    let path = data_dir.join(SERVER_KEY_FILE);
    let io = |source| AuthorityError::Io {
        path: path.clone(),
        source,
    };
    if path.exists() {
        let pem = std::fs::read_to_string(&path).map_err(io)?;
        let key = rcgen::KeyPair::from_pem(&pem).map_err(|e| {
            io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not a private key: {e}"),
            ))
        })?;
        return Ok(key.serialize_der());
    }
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| AuthorityError::Ca(CaError::Rcgen(e)))?;
    super::ca::store::write_private(&path, key.serialize_pem().as_bytes())?;
    super::ca::store::sync_dir(data_dir)?;
    Ok(key.serialize_der())
}

/// The caller, once its certificate is checked.
struct Identity {
    operator: bool,
    /// Its certificate's serial: what it issues is issued on that
    /// certificate's authority.
    serial: Serial,
    facts: CertFacts,
}

/// What a certificate or CSR says about its holder.
struct CertFacts {
    subject: String,
    dns_names: Vec<String>,
    ip_addresses: Vec<IpAddr>,
    /// SubjectPublicKeyInfo DER.
    spki: Vec<u8>,
}

impl CertFacts {
    /// The certificate names `name` (absolute, with its trailing dot) as
    /// its CN or a DNS name, without the dot.
    fn carries_dns(&self, name: &str) -> bool {
        self.dns_candidates().any(|n| same_name(n, name))
    }

    /// Its CN and DNS names.
    fn dns_candidates(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.subject.as_str()).chain(self.dns_names.iter().map(String::as_str))
    }

    /// SHA-256 of the SubjectPublicKeyInfo: its TLSA 3 1 1 pin.
    fn pin(&self) -> [u8; 32] {
        sha256(&self.spki)
    }

    fn carries(&self, name: &str) -> bool {
        self.names().any(|n| one_name(&n, name))
    }

    /// Its first CN or DNS name with a wildcard, if any. `*` anywhere
    /// counts: a verifier may read `a*.example` as a wildcard too.
    fn wildcard(&self) -> Option<&str> {
        self.dns_candidates().find(|n| n.contains('*'))
    }

    /// Every name: the subject CN, DNS names, IP addresses.
    fn names(&self) -> impl Iterator<Item = String> + '_ {
        std::iter::once(self.subject.clone())
            .chain(self.dns_names.iter().cloned())
            .chain(self.ip_addresses.iter().map(IpAddr::to_string))
    }

    /// A request for its names and key, issued on the authority of
    /// certificate `parent` if any.
    fn request(&self, usage: Usage, lifetime: Duration, parent: Option<Serial>) -> IssueRequest {
        IssueRequest {
            subject: self.subject.clone(),
            dns_names: self.dns_names.clone(),
            ip_addresses: self.ip_addresses.clone(),
            usage,
            lifetime,
            public_key: Some(self.spki.clone()),
            parent,
        }
    }
}

/// Whether two certificate names are one: equal IP addresses, or DNS
/// names (or CNs) equal as [`same_name`] compares them.
fn one_name(a: &str, b: &str) -> bool {
    match (a.parse::<IpAddr>(), b.parse::<IpAddr>()) {
        (Ok(a), Ok(b)) => a == b,
        _ => same_name(a, b),
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

fn zone_error(e: ZoneError) -> ServiceError {
    match e {
        ZoneError::Full => ServiceError::new(api::ZONE_FULL, e.to_string()),
        ZoneError::PinNameTooLong { .. } | ZoneError::NotAName(_) => {
            ServiceError::malformed(e.to_string())
        }
        other => internal(other),
    }
}

fn name_error(field: &str, e: NameError) -> ServiceError {
    let code = match e {
        NameError::OutsideZone { .. } | NameError::Apex { .. } => api::NOT_IN_ZONE,
        _ => api::MALFORMED_REQUEST,
    };
    ServiceError::new(code, format!("{field}: {e}"))
}

fn record_error(e: RecordError) -> ServiceError {
    ServiceError::malformed(e.to_string())
}

fn dns_record(name: &str, records: &RecordSet) -> api::DnsRecord {
    api::DnsRecord {
        name: name.to_owned(),
        addresses: records.aaaa().iter().map(Ipv6Addr::to_string).collect(),
        tlsa: records
            .tlsa()
            .iter()
            .map(|t| api::DnsTlsa {
                port: t.port,
                spki_sha256: api::hex(&t.spki_sha256),
            })
            .collect(),
        owner: records.owner().map(|o| api::hex(&o)),
    }
}

/// The records a `DNS_SET` asks for, checked.
fn requested_records(
    request: &api::DnsSetRequest,
    owner: Option<[u8; 32]>,
) -> Result<RecordSet, ServiceError> {
    let aaaa = request
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| {
            a.parse::<Ipv6Addr>().map_err(|_| {
                ServiceError::malformed(format!(
                    "addresses[{i}] {a:?} is not an IPv6 address (the zone is IPv6-only)"
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let tlsa = request
        .tlsa
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let spki_sha256 = api::hex_hash(&format!("tlsa[{i}].spki_sha256"), &t.spki_sha256)
                .map_err(ServiceError::malformed)?;
            Ok(Tlsa {
                port: t.port,
                spki_sha256,
            })
        })
        .collect::<Result<Vec<_>, ServiceError>>()?;
    RecordSet::new(aaaa, tlsa, owner).map_err(record_error)
}

fn unauthorized(message: impl Into<String>) -> ServiceError {
    ServiceError::new(api::UNAUTHORIZED, message)
}

fn out_of_range(message: impl Into<String>) -> ServiceError {
    ServiceError::new(api::OUT_OF_RANGE, message)
}

/// An internal failure: logged here in full, answered without details.
fn internal(error: impl std::fmt::Display) -> ServiceError {
    tracing::error!(%error, "authority request failed inside the server");
    ServiceError::new(
        api::STORAGE,
        "the authority failed internally; the server log has the details",
    )
}

fn log_error(e: LogError) -> ServiceError {
    internal(e)
}

/// The code for an error of the authority.
fn authority_error(e: AuthorityError) -> ServiceError {
    let code = match &e {
        AuthorityError::TokenUsed => api::TOKEN_USED,
        AuthorityError::NameTaken { .. } => api::NAME_TAKEN,
        AuthorityError::Ca(ca) => match ca {
            CaError::UnknownIssuer { .. } | CaError::BadSignature => api::NOT_OUR_CA,
            CaError::Expired { .. } | CaError::NotYetValid { .. } => api::EXPIRED,
            CaError::Revoked { .. } => api::REVOKED,
            CaError::UnknownSerial { .. } => api::UNKNOWN_SERIAL,
            CaError::AlreadyRevoked { .. } => api::ALREADY_REVOKED,
            CaError::EmptySubject
            | CaError::SubjectTooLong { .. }
            | CaError::SubjectControlCharacters
            | CaError::TooManyNames { .. }
            | CaError::NoNames
            | CaError::InvalidDnsName { .. }
            | CaError::InvalidPublicKey(_) => api::BAD_CSR,
            CaError::ZeroLifetime
            | CaError::LifetimeTooLong { .. }
            | CaError::Parse(_)
            | CaError::NotEndEntity
            | CaError::WrongUsage { .. } => api::MALFORMED_REQUEST,
            _ => return internal(e),
        },
        _ => return internal(e),
    };
    ServiceError::new(code, e.to_string())
}

/// Parse a request payload (an empty one reads as `{}`).
pub(crate) fn parse<T: DeserializeOwned>(payload: &[u8]) -> Result<T, ServiceError> {
    let payload = if payload.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        payload
    };
    serde_json::from_slice(payload).map_err(|e| {
        ServiceError::malformed(format!("the request is not valid JSON for its kind: {e}"))
    })
}

fn respond<T: Serialize>(value: &T) -> Result<Vec<u8>, ServiceError> {
    serde_json::to_vec(value).map_err(internal)
}

fn unix_s(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn parse_serial(field: &str, hex: &str) -> Result<Serial, ServiceError> {
    let bad = || ServiceError::malformed(format!("{field} must be 32 hex digits, got {hex:?}"));
    if hex.len() != 32 || !hex.is_ascii() {
        return Err(bad());
    }
    let mut serial = [0u8; 16];
    for (i, byte) in serial.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(Serial(serial))
}

fn parse_reason(reason: Option<&str>) -> Result<Option<RevocationReason>, ServiceError> {
    use RevocationReason as R;
    let Some(reason) = reason else {
        return Ok(None);
    };
    let all = [
        R::Unspecified,
        R::KeyCompromise,
        R::CaCompromise,
        R::AffiliationChanged,
        R::Superseded,
        R::CessationOfOperation,
        R::PrivilegeWithdrawn,
    ];
    api::REVOCATION_REASONS
        .iter()
        .position(|r| *r == reason)
        .map(|i| Some(all[i]))
        .ok_or_else(|| {
            ServiceError::malformed(format!(
                "reason {reason:?} is not one of {:?}",
                api::REVOCATION_REASONS
            ))
        })
}

fn reason_name(reason: RevocationReason) -> &'static str {
    use RevocationReason as R;
    match reason {
        R::Unspecified => "unspecified",
        R::KeyCompromise => "key_compromise",
        R::CaCompromise => "ca_compromise",
        R::AffiliationChanged => "affiliation_changed",
        R::Superseded => "superseded",
        R::CessationOfOperation => "cessation_of_operation",
        R::PrivilegeWithdrawn => "privilege_withdrawn",
    }
}

fn pem_der(field: &str, pem: &str) -> Result<Vec<u8>, ServiceError> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|d| d.to_vec())
        .map_err(|e| ServiceError::malformed(format!("{field} is not a PEM certificate: {e}")))
}

fn parse_x509(der: &[u8]) -> Result<X509Certificate<'_>, String> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err("trailing bytes after the certificate".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// The holder's names and key, from a certificate.
fn cert_facts(der: &[u8]) -> Result<CertFacts, String> {
    let cert = parse_x509(der)?;
    let super::ca::CertificateNames {
        subject,
        dns_names,
        ip_addresses,
    } = super::ca::certificate_names(&cert);
    Ok(CertFacts {
        subject,
        dns_names,
        ip_addresses,
        spki: cert.public_key().raw.to_vec(),
    })
}

/// Parse and check a CSR: PEM, DER, signature (rcgen), names and key.
fn parse_csr(pem: &str) -> Result<CertFacts, ServiceError> {
    let bad = |message: String| ServiceError::new(api::BAD_CSR, message);
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| bad(format!("csr_pem is not a PEM certificate request: {e}")))?;
    let params = rcgen::CertificateSigningRequestParams::from_der(&der).map_err(|e| {
        bad(match e {
            rcgen::Error::RingUnspecified => "the CSR's signature does not verify".into(),
            rcgen::Error::UnsupportedExtension => {
                "the CSR asks for an extension other than subject alternative names and key usages"
                    .into()
            }
            other => format!("the CSR cannot be parsed: {other}"),
        })
    })?;
    let csr = match X509CertificationRequest::from_der(&der) {
        Ok(([], csr)) => csr,
        _ => return Err(bad("the CSR has trailing bytes".into())),
    };
    let info = &csr.certification_request_info;
    let subject = info
        .subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| bad("the CSR's subject has no (UTF-8) common name".into()))?
        .to_owned();
    let mut dns_names = Vec::new();
    let mut ip_addresses = Vec::new();
    for name in params.params.subject_alt_names {
        match name {
            rcgen::SanType::DnsName(dns) => dns_names.push(dns.as_str().to_owned()),
            rcgen::SanType::IpAddress(ip) => ip_addresses.push(ip),
            _ => {
                return Err(bad(
                    "the CSR has a subject alternative name other than a DNS name or IP address"
                        .into(),
                ));
            }
        }
    }
    Ok(CertFacts {
        subject,
        dns_names,
        ip_addresses,
        spki: info.subject_pki.raw.to_vec(),
    })
}

pub fn pem_certificate(der: &[u8]) -> String {
    let body = api::b64(der);
    let mut out = String::with_capacity(body.len() + body.len() / 64 + 60);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        // Base64 is ASCII.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn certificate_info(record: &CertificateRecord) -> api::CertificateInfo {
    api::CertificateInfo {
        serial: record.serial.to_string(),
        subject: record.subject.clone(),
        dns_names: record.dns_names.clone(),
        ip_addresses: record.ip_addresses.iter().map(IpAddr::to_string).collect(),
        usage: match record.usage {
            Usage::Client => api::CertUsage::Client,
            Usage::Server => api::CertUsage::Server,
            Usage::Node => api::CertUsage::Node,
        },
        not_before: unix_s(record.not_before),
        not_after: unix_s(record.not_after),
        leaf_index: record.leaf_index,
        renewed_from: record.renewed_from.map(|s| s.to_string()),
        revoked_at: record.revocation.map(|r| r.revoked_at_ms / 1000),
        revocation_reason: record
            .revocation
            .and_then(|r| r.reason)
            .map(|r| reason_name(r).to_owned()),
    }
}

/// How a request continues once its command is applied: with what the
/// command did (or why it was refused), it makes the answer.
pub type Finish = Box<dyn FnOnce(&mut AuthorityService, Result<Applied, AuthorityError>) -> Answer>;

/// A response payload, or the error to answer with.
pub type Answer = Result<Vec<u8>, ServiceError>;

/// A command a request proposes, and how to answer once it is applied.
pub struct Pending {
    pub command: Command,
    pub finish: Finish,
}

/// Where a request stands after [`AuthorityService::handle_request`].
pub enum Handled {
    /// Answered: it changed nothing, or was refused.
    Answer(Answer),
    /// Its command is to be committed; then `finish` answers.
    Commit(Box<Pending>),
}

fn answer<T: Serialize>(value: &T) -> Result<Handled, ServiceError> {
    Ok(Handled::Answer(respond(value)))
}

/// Commit `command`; once applied, `finish` turns what it did into the
/// answer's value. A refusal at apply is the answer's error.
fn commit<T: Serialize>(
    command: Command,
    finish: impl FnOnce(&mut AuthorityService, Applied) -> Result<T, ServiceError> + 'static,
) -> Result<Handled, ServiceError> {
    Ok(Handled::Commit(Box::new(pending(command, finish))))
}

/// `command`, and `finish` to run with what applying it did.
fn pending<T: Serialize>(
    command: Command,
    finish: impl FnOnce(&mut AuthorityService, Applied) -> Result<T, ServiceError> + 'static,
) -> Pending {
    Pending {
        command,
        finish: Box::new(move |service, applied| {
            let applied = applied.map_err(authority_error)?;
            respond(&finish(service, applied)?)
        }),
    }
}

/// The receipt of an applied certificate.
fn certified(applied: Applied) -> Result<AppendReceipt, ServiceError> {
    match applied {
        Applied::Certified(receipt) => Ok(receipt),
        other => Err(internal(format!("a certificate was applied as {other:?}"))),
    }
}

impl AuthorityService {
    /// Open (or create) the authority in `data_dir`: CA, log, registry and
    /// the enrollment secret.
    pub fn open(
        data_dir: &Path,
        config: ServiceConfig,
        now: SystemTime,
    ) -> Result<Self, AuthorityError> {
        let machine = Machine::open(
            data_dir,
            config.ca_algorithm,
            config.log_algorithm,
            config.zone.as_ref(),
            now,
        )?;
        let tokens = EnrollmentKey::load_or_create(data_dir)?;
        let server_key = load_or_create_server_key(data_dir)?;
        Ok(Self {
            machine,
            config,
            tokens,
            rotated: None,
            server_key,
        })
    }

    /// One `stoq/1` request of kind `kind` (one of [`api::KINDS`]) from
    /// `caller`, on this node alone: what [`Self::handle_request`] asks to
    /// commit is applied here at once. Returns the JSON response payload
    /// (response kind `kind | 0x80`), or the error to answer with (kind
    /// 0xff). Call [`Self::take_rotated`] afterwards. A request that fails
    /// changes nothing.
    pub fn handle(
        &mut self,
        caller: &Caller,
        kind: u8,
        payload: &[u8],
        now: SystemTime,
    ) -> Result<Vec<u8>, ServiceError> {
        match self.handle_request(caller, kind, payload, now) {
            Handled::Answer(answer) => answer,
            Handled::Commit(pending) => {
                let Pending { command, finish } = *pending;
                let applied = self.machine.apply(command);
                finish(self, applied)
            }
        }
    }

    /// One `stoq/1` request, as far as it goes without changing the
    /// state: its answer, or the command it proposes and how to answer once
    /// that command is applied (here, or through the cluster's log).
    pub fn handle_request(
        &mut self,
        caller: &Caller,
        kind: u8,
        payload: &[u8],
        now: SystemTime,
    ) -> Handled {
        self.route(caller, kind, payload, now)
            .unwrap_or_else(|e| Handled::Answer(Err(e)))
    }

    fn route(
        &mut self,
        caller: &Caller,
        kind: u8,
        payload: &[u8],
        now: SystemTime,
    ) -> Result<Handled, ServiceError> {
        if !api::KINDS.contains(&kind)
            || (self.machine.zone().is_none() && api::DNS_KINDS.contains(&kind))
        {
            return Err(ServiceError::new(
                api::UNKNOWN_KIND,
                format!("kind 0x{kind:02x} is not an authority request"),
            ));
        }
        if payload.len() > api::MAX_REQUEST_LEN {
            return Err(ServiceError::malformed(format!(
                "the request is {} bytes; at most {} are allowed",
                payload.len(),
                api::MAX_REQUEST_LEN
            )));
        }
        if kind == api::ENROLL {
            return self.enroll(parse(payload)?, now);
        }
        if kind == api::CT_KEY {
            parse::<api::NoArguments>(payload)?;
            return answer(&self.ct_key());
        }
        let who = self.identify(caller, now)?;
        match kind {
            api::CERT_ISSUE => self.cert_issue(&who, parse(payload)?, now),
            api::CERT_RENEW => self.cert_renew(&who, parse(payload)?, now),
            api::CERT_REVOKE => self.cert_revoke(&who, parse(payload)?, now),
            api::CERT_LIST => answer(&self.cert_list(parse(payload)?, now)?),
            api::CA_ROOT => {
                parse::<api::NoArguments>(payload)?;
                let ca = self.machine.authority().ca();
                answer(&api::CaRoot {
                    root_pem: ca.root_pem().to_owned(),
                    intermediate_pem: ca.intermediate_pem().to_owned(),
                })
            }
            api::CT_STH => {
                parse::<api::NoArguments>(payload)?;
                answer(&self.latest_sth()?)
            }
            api::CT_PROOF => answer(&self.ct_proof(parse(payload)?)?),
            api::CT_CONSISTENCY => answer(&self.ct_consistency(parse(payload)?)?),
            api::CT_ENTRIES => answer(&self.ct_entries(parse(payload)?)?),
            api::ROTATE => {
                parse::<api::NoArguments>(payload)?;
                self.rotate(&who, now)
            }
            api::DNS_SET => self.dns_set(&who, parse(payload)?, now),
            api::DNS_REMOVE => self.dns_remove(&who, parse(payload)?, now),
            api::DNS_LIST => answer(&self.dns_list(parse(payload)?)?),
            _ => unreachable!("every kind in api::KINDS is served"),
        }
    }

    /// The server certificate a `ROTATE` request issued, once: the caller
    /// publishes it to the workers. `None` when there is none since the
    /// last call.
    pub fn take_rotated(&mut self) -> Option<ServerCertificate> {
        self.rotated.take()
    }

    /// The roots, intermediate and revoked serials for the TLS layer's
    /// lock-free snapshot; `generation` changes whenever they change.
    pub fn trust(&self) -> TrustMaterial {
        let ca = self.machine.authority().ca();
        let revoked = self.machine.authority().revocations();
        TrustMaterial {
            generation: revoked.generation(),
            root_der: ca.root_der().to_vec(),
            intermediate_der: ca.intermediate_der().to_vec(),
            revoked,
        }
    }

    /// The zone as the workers answer from it. Without a zone
    /// ([`ServiceConfig::zone`] is `None`): an empty apex, no names,
    /// generation 0. It copies every name: call it when
    /// [`Self::zone_generation`] changed, not after every request.
    pub fn zone(&self) -> ZoneSnapshot {
        self.machine.zone().map_or_else(
            || ZoneSnapshot {
                apex: String::new(),
                serial: 0,
                generation: 0,
                names: Vec::new(),
            },
            Zone::snapshot,
        )
    }

    /// Changes whenever the zone changes (cheap); 0 without a zone.
    pub fn zone_generation(&self) -> u64 {
        self.machine.zone().map_or(0, Zone::generation)
    }

    /// The TLSA 3 1 1 pin of the server's TLS key: SHA-256 of its
    /// SubjectPublicKeyInfo. Stable across rotations.
    pub fn server_spki_sha256(&self) -> Result<[u8; 32], AuthorityError> {
        Ok(sha256(&server_spki(&self.server_key)?))
    }

    /// Set the server's own records at start: AAAA for
    /// `zone.server_addresses` and a TLSA pin `spki_sha256` on
    /// `zone.server_port`, under `zone.server_name`, with no owner key.
    /// Durable before it returns; nothing is written when they are
    /// already so. `zone` must name the zone the service was opened with.
    pub fn register_server(
        &mut self,
        zone: &ZoneConfig,
        spki_sha256: [u8; 32],
        _now: SystemTime,
    ) -> Result<(), AuthorityError> {
        if let Some(change) = self.server_records_change(zone, spki_sha256)? {
            self.machine.change_zone(change)?;
        }
        Ok(())
    }

    /// [`Self::register_server`] as a proposal, for a cluster member:
    /// `None` when the records are so already.
    pub fn propose_server_records(
        &self,
        zone: &ZoneConfig,
        spki_sha256: [u8; 32],
    ) -> Result<Option<Pending>, AuthorityError> {
        let Some(change) = self.server_records_change(zone, spki_sha256)? else {
            return Ok(None);
        };
        Ok(Some(pending(Command::Zone(change), |_, _| Ok(()))))
    }

    /// The change that sets the server's own records, if they differ.
    fn server_records_change(
        &self,
        zone: &ZoneConfig,
        spki_sha256: [u8; 32],
    ) -> Result<Option<ZoneChange>, AuthorityError> {
        let path = self.machine.authority().store_path().to_owned();
        let error = |source| AuthorityError::Zone {
            path: path.clone(),
            source,
        };
        let open = self.machine.zone().ok_or_else(|| {
            error(ZoneError::Config(
                "the service was opened without a zone".into(),
            ))
        })?;
        if open.apex() != zone.apex {
            return Err(error(ZoneError::Config(format!(
                "the server registers in {:?}, but the zone is {:?}",
                zone.apex,
                open.apex()
            ))));
        }
        let name = open
            .qualify(&zone.server_name)
            .map_err(|e| error(ZoneError::Config(format!("server name: {e}"))))?;
        let tlsa = vec![Tlsa {
            port: zone.server_port,
            spki_sha256,
        }];
        let records = RecordSet::new(zone.server_addresses.clone(), tlsa, None)
            .map_err(|e| error(ZoneError::Config(format!("server records: {e}"))))?;
        open.plan(vec![(name, Some(records))]).map_err(error)
    }

    /// Issue (and log) a fresh server certificate for
    /// `config.server_names` with a new key. Used at start and for
    /// rotation; the previous certificate stays valid until it expires,
    /// so the validity periods overlap.
    pub fn issue_server_certificate(
        &mut self,
        now: SystemTime,
    ) -> Result<ServerCertificate, AuthorityError> {
        let (certificate, certify) = self.propose_server_certificate(now)?;
        self.machine.apply(Command::Certify(certify))?;
        Ok(self.server_certificate(certificate))
    }

    /// A server certificate for `config.server_names` with the server's
    /// key, signed, and the command that logs it.
    fn propose_server_certificate(
        &self,
        now: SystemTime,
    ) -> Result<(IssuedCertificate, Certify), AuthorityError> {
        let (dns_names, ip_addresses) = split_names(&self.config.server_names);
        let request = IssueRequest {
            subject: self
                .config
                .server_names
                .first()
                .cloned()
                .unwrap_or_default(),
            dns_names,
            ip_addresses,
            usage: Usage::Server,
            lifetime: self.config.lifetime,
            public_key: Some(server_spki(&self.server_key)?),
            parent: None,
        };
        self.machine.authority().propose_issue(request, now)
    }

    /// What the workers present, for a logged server certificate.
    fn server_certificate(&self, certificate: IssuedCertificate) -> ServerCertificate {
        ServerCertificate {
            chain_der: vec![
                certificate.cert_der,
                self.machine.authority().ca().intermediate_der().to_vec(),
            ],
            key_pkcs8_der: self.server_key.clone(),
            serial: certificate.serial,
            not_after: certificate.not_after,
        }
    }

    /// Make sure `path` holds a valid operator identity: a client
    /// certificate of this CA with subject CN [`OPERATOR`], its private key
    /// and the intermediate, as one PEM file (mode 0600). A new one is
    /// issued when the file is missing, unreadable, not ours, revoked, or
    /// past half its lifetime.
    pub fn ensure_operator_identity(
        &mut self,
        path: &Path,
        now: SystemTime,
    ) -> Result<(), AuthorityError> {
        let Some((certificate, certify)) = self.operator_identity_due(path, now)? else {
            return Ok(());
        };
        self.machine.apply(Command::Certify(certify))?;
        self.write_operator_identity(path, certificate)
    }

    /// [`Self::ensure_operator_identity`] as a proposal, for a cluster
    /// member: `None` when the identity is fresh. Once applied, the file is
    /// written here (the key never leaves this member).
    pub fn propose_operator_identity(
        &self,
        path: &Path,
        now: SystemTime,
    ) -> Result<Option<Pending>, AuthorityError> {
        let Some((certificate, certify)) = self.operator_identity_due(path, now)? else {
            return Ok(None);
        };
        let path = path.to_owned();
        Ok(Some(pending(
            Command::Certify(certify),
            move |service, _| {
                service
                    .write_operator_identity(&path, certificate)
                    .map_err(internal)
            },
        )))
    }

    /// A new operator certificate (with its key) and the command that logs
    /// it, unless `path` holds a fresh one.
    fn operator_identity_due(
        &self,
        path: &Path,
        now: SystemTime,
    ) -> Result<Option<(IssuedCertificate, Certify)>, AuthorityError> {
        if self.operator_identity_is_fresh(path, now) {
            return Ok(None);
        }
        let request = IssueRequest {
            subject: OPERATOR.into(),
            usage: Usage::Client,
            lifetime: self.config.lifetime,
            ..IssueRequest::default()
        };
        self.machine
            .authority()
            .propose_issue(request, now)
            .map(Some)
    }

    /// Write a logged operator certificate, the intermediate and its key to
    /// `path` (0600).
    fn write_operator_identity(
        &self,
        path: &Path,
        certificate: IssuedCertificate,
    ) -> Result<(), AuthorityError> {
        let key = certificate
            .private_key
            .ok_or(AuthorityError::Ca(CaError::Random))?;
        let pem = format!(
            "{}{}{}",
            certificate.cert_pem,
            self.machine.authority().ca().intermediate_pem(),
            key.pem
        );
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| AuthorityError::Io {
                path: dir.to_owned(),
                source,
            })?;
        }
        ca::store::write_private(path, pem.as_bytes())?;
        tracing::info!(path = %path.display(), serial = %certificate.serial, "wrote the operator identity");
        Ok(())
    }

    /// Whether `path` holds an operator certificate of this CA that is
    /// not yet past half its lifetime.
    pub fn operator_identity_is_fresh(&self, path: &Path, now: SystemTime) -> bool {
        let Ok(pem) = std::fs::read(path) else {
            return false;
        };
        let Ok(der) = CertificateDer::from_pem_slice(&pem) else {
            return false;
        };
        if self
            .machine
            .authority()
            .verify_chain(&der, Usage::Client, now)
            .is_err()
        {
            return false;
        }
        let Ok(cert) = parse_x509(&der) else {
            return false;
        };
        let operator = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            == Some(OPERATOR);
        let not_before = cert.validity().not_before.timestamp();
        let not_after = cert.validity().not_after.timestamp();
        let half = not_before + (not_after - not_before) / 2;
        operator && i64::try_from(unix_s(now)).is_ok_and(|now| now < half)
    }

    /// The root certificate, PEM.
    pub fn root_pem(&self) -> String {
        self.machine.authority().ca().root_pem().to_owned()
    }

    pub fn authority(&self) -> &Authority {
        self.machine.authority()
    }

    /// The state machine, for the server's admission runtime, which keeps
    /// its state there too, and for the cluster, which applies to it.
    pub fn machine_mut(&mut self) -> &mut Machine {
        &mut self.machine
    }

    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    fn identify(&self, caller: &Caller, now: SystemTime) -> Result<Identity, ServiceError> {
        let der = caller.cert_der.as_deref().ok_or_else(|| {
            unauthorized("this request needs a client certificate; enroll first to get one")
        })?;
        let serial = self
            .machine
            .authority()
            .verify_chain(der, Usage::Client, now)
            .map_err(|e| unauthorized(format!("the client certificate is not accepted: {e}")))?;
        let facts =
            cert_facts(der).map_err(|e| unauthorized(format!("client certificate: {e}")))?;
        Ok(Identity {
            operator: facts.subject == OPERATOR,
            serial,
            facts,
        })
    }

    fn enroll(
        &mut self,
        request: api::EnrollRequest,
        now: SystemTime,
    ) -> Result<Handled, ServiceError> {
        let token = self
            .tokens
            .verify(&request.token, now)
            .map_err(|e| ServiceError::new(api::TOKEN_INVALID, e.to_string()))?;
        let csr = parse_csr(&request.csr_pem)?;
        if self
            .machine
            .authority()
            .token_spent(token.id())
            .map_err(authority_error)?
        {
            return answer(&self.enrolled_before(&token, &csr)?);
        }
        self.check_not_reserved(&csr)?;
        self.check_names_free(&csr, now)?;
        let (certificate, mut certify) = self
            .machine
            .authority()
            .propose_issue(csr.request(Usage::Client, self.config.lifetime, None), now)
            .map_err(authority_error)?;
        certify.token = Some(SpentToken::of(&token));
        self.commit_certificate(certificate, certify, Vec::new())
    }

    /// Commit a certificate's command; answer with it, logged and proven.
    fn commit_certificate(
        &mut self,
        certificate: IssuedCertificate,
        certify: Certify,
        zone_names: Vec<String>,
    ) -> Result<Handled, ServiceError> {
        commit(Command::Certify(certify), move |service, applied| {
            let logged = LoggedCertificate::logged(certificate, certified(applied)?);
            service.zone_followed(zone_names);
            service.issued(&logged)
        })
    }

    /// A spent token again: the certificate it paid for, proven in the
    /// latest tree head, when `csr` (its signature proves the key) has that
    /// certificate's key and it is not revoked; otherwise `TOKEN_USED`.
    fn enrolled_before(
        &self,
        token: &VerifiedToken,
        csr: &CertFacts,
    ) -> Result<api::Issued, ServiceError> {
        let paid_for = match self
            .machine
            .authority()
            .token_certificate(token.id())
            .map_err(authority_error)?
        {
            Some(serial) => self
                .authority()
                .certificate(&serial)
                .map_err(authority_error)?,
            None => None,
        };
        let same_key =
            |r: &CertificateRecord| cert_facts(&r.cert_der).is_ok_and(|f| f.spki == csr.spki);
        let Some(record) = paid_for.filter(|r| r.revocation.is_none() && same_key(r)) else {
            return Err(ServiceError::new(
                api::TOKEN_USED,
                "the enrollment token was already used; mint a new one",
            ));
        };
        let sth = self.latest_sth()?;
        let leaf =
            encode_x509_leaf(record.logged_at_ms, &record.cert_der, &[]).map_err(internal)?;
        let proof = self.ct_proof(api::CtProofRequest {
            leaf_hash: Some(api::b64(&leaf_hash(&leaf))),
            certificate_pem: None,
            tree_size: Some(sth.tree_size),
        })?;
        Ok(api::Issued {
            certificate_pem: pem_certificate(&record.cert_der),
            chain_pem: self.machine.authority().ca().intermediate_pem().to_owned(),
            serial: record.serial.to_string(),
            not_before: unix_s(record.not_before),
            not_after: unix_s(record.not_after),
            leaf_index: record.leaf_index,
            sth,
            proof,
        })
    }

    /// `holder` (a CSR, or a certificate to renew) has none of the names
    /// reserved for the operator (see the module documentation). For
    /// callers other than the operator.
    fn check_not_reserved(&self, holder: &CertFacts) -> Result<(), ServiceError> {
        if let Some(name) = holder.wildcard() {
            return Err(unauthorized(format!(
                "{name:?} is a wildcard name; only the operator may issue one (that you hold \
                 every name under it cannot be checked for names not registered yet)"
            )));
        }
        if holder.carries(OPERATOR) {
            return Err(unauthorized(format!(
                "the name {OPERATOR:?} (in any case) is reserved for the operator"
            )));
        }
        let member = dataplane::trust::NODE_COMMON_NAME_PREFIX;
        if let Some(name) = holder.names().find(|n| {
            n.get(..member.len())
                .is_some_and(|start| start.eq_ignore_ascii_case(member))
        }) {
            return Err(unauthorized(format!(
                "{name:?}: names starting {member:?} are the cluster members' (issued when a node joins)"
            )));
        }
        if let Some(name) = holder.names().find(|n| self.is_server_name(n)) {
            return Err(unauthorized(format!(
                "{name:?} is the server's own name; only the operator may issue it"
            )));
        }
        Ok(())
    }

    /// Whether `name` (a certificate name, or an absolute zone name) is one
    /// of the server's own names: [`ServiceConfig::server_names`] or the
    /// zone's server name, compared as [`one_name`] does. The one home of
    /// that rule for enrollment, issuance, renewal and the zone.
    fn is_server_name(&self, name: &str) -> bool {
        let zone_server = self.machine.zone().map(Zone::server_name);
        self.config
            .server_names
            .iter()
            .map(String::as_str)
            .chain(zone_server)
            .any(|s| one_name(name, s))
    }

    /// No unrevoked, unexpired certificate with another key carries any of
    /// `csr`'s names.
    fn check_names_free(&self, csr: &CertFacts, now: SystemTime) -> Result<(), ServiceError> {
        // At the time the command carries (whole milliseconds), which the
        // apply checks the names again at.
        let now = UNIX_EPOCH
            + Duration::from_millis(
                now.duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
            );
        for name in csr.names() {
            let held = self.find_by_name(&name, |record| {
                let live = record.revocation.is_none() && record.not_after >= now;
                Ok(live && cert_facts(&record.cert_der).map_err(internal)?.spki != csr.spki)
            })?;
            if let Some(record) = held {
                return Err(ServiceError::new(
                    api::NAME_TAKEN,
                    format!(
                        "{name:?} is held by certificate {} with another key",
                        record.serial
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The first certificate carrying `name` (a registry name filter) for
    /// which `found` holds, page by page through the registry's name index
    /// (the certificates carrying the name, not the whole registry).
    fn find_by_name(
        &self,
        name: &str,
        mut found: impl FnMut(&CertificateRecord) -> Result<bool, ServiceError>,
    ) -> Result<Option<CertificateRecord>, ServiceError> {
        let filter = CertificateFilter::Name(name.to_owned());
        let mut after = None;
        loop {
            let page = self
                .authority()
                .certificates(&filter, after)
                .map_err(authority_error)?;
            let last_page = page.len() < MAX_RECORDS_PER_CALL;
            after = page.last().map(|r| r.serial);
            for record in page {
                if found(&record)? {
                    return Ok(Some(record));
                }
            }
            if last_page {
                return Ok(None);
            }
        }
    }

    fn cert_issue(
        &mut self,
        who: &Identity,
        request: api::CertIssueRequest,
        now: SystemTime,
    ) -> Result<Handled, ServiceError> {
        let csr = parse_csr(&request.csr_pem)?;
        if !who.operator {
            self.check_not_reserved(&csr)?;
            if let Some(name) = csr.names().find(|n| !who.facts.carries(n)) {
                return Err(unauthorized(format!(
                    "your certificate does not carry the name {name:?}; only the operator may issue for other names"
                )));
            }
        }
        let lifetime = request.lifetime_hours.map_or(self.config.lifetime, |h| {
            Duration::from_secs(u64::from(h) * 3600)
        });
        let usage = match request.usage {
            api::CertUsage::Client => Usage::Client,
            api::CertUsage::Server => Usage::Server,
            api::CertUsage::Node => {
                return Err(unauthorized(
                    "a cluster member's certificate is issued only when a node joins with a join token",
                ));
            }
        };
        let change = match usage {
            Usage::Server => self.repin_change(&csr)?,
            Usage::Client | Usage::Node => None,
        };
        // Its names are the caller's: it goes when the caller's certificate
        // goes. The operator's authority is its own.
        let parent = (!who.operator).then_some(who.serial);
        let names = zone_names(change.as_ref());
        let (certificate, mut certify) = self
            .machine
            .authority()
            .propose_issue(csr.request(usage, lifetime, parent), now)
            .map_err(authority_error)?;
        certify.zone = change;
        self.commit_certificate(certificate, certify, names)
    }

    /// The pin changes a server certificate for `holder`'s names and key
    /// brings (see the module documentation); `None` without a zone or
    /// when nothing changes.
    fn repin_change(&self, holder: &CertFacts) -> Result<Option<ZoneChange>, ServiceError> {
        let Some(zone) = self.machine.zone() else {
            return Ok(None);
        };
        let edits = zone.repin_edits(holder.dns_candidates(), holder.pin());
        zone.plan(edits).map_err(zone_error)
    }

    /// Log the pin changes `names` a certificate's issuance or revocation
    /// brought, once applied.
    fn zone_followed(&self, names: Vec<String>) {
        if let Some(zone) = self.machine.zone().filter(|_| !names.is_empty()) {
            tracing::info!(?names, serial = zone.serial(), "zone pins follow the CA");
        }
    }

    /// Whether a live (unrevoked, unexpired) certificate with the key of
    /// `pin`, other than those in `except`, carries `name` (absolute).
    fn key_holds(
        &self,
        name: &str,
        pin: [u8; 32],
        except: &[Serial],
        now: SystemTime,
    ) -> Result<bool, ServiceError> {
        let holder = self.find_by_name(name, |record| {
            let live = record.revocation.is_none()
                && record.not_before <= now
                && now <= record.not_after
                && !except.contains(&record.serial);
            Ok(live && cert_facts(&record.cert_der).map_err(internal)?.pin() == pin)
        })?;
        Ok(holder.is_some())
    }

    fn cert_renew(
        &mut self,
        who: &Identity,
        request: api::CertRenewRequest,
        now: SystemTime,
    ) -> Result<Handled, ServiceError> {
        let der = pem_der("certificate_pem", &request.certificate_pem)?;
        let facts = cert_facts(&der)
            .map_err(|e| ServiceError::malformed(format!("certificate_pem: {e}")))?;
        self.check_ours(&der)?;
        if !who.operator {
            if facts.spki != who.facts.spki {
                return Err(unauthorized(
                    "only the certificate's owner (same key) or the operator may renew it",
                ));
            }
            // Not even one issued before these names were reserved.
            self.check_not_reserved(&facts)?;
        }
        let server = ca::serial_of(&der)
            .ok()
            .and_then(|serial| self.machine.authority().certificate(&serial).ok().flatten())
            .is_some_and(|record| record.usage == Usage::Server);
        let change = if server {
            self.repin_change(&facts)?
        } else {
            None
        };
        let names = zone_names(change.as_ref());
        let (certificate, mut certify) = self
            .machine
            .authority()
            .propose_renewal(&der, now)
            .map_err(authority_error)?;
        certify.zone = change;
        self.commit_certificate(certificate, certify, names)
    }

    fn cert_revoke(
        &mut self,
        who: &Identity,
        request: api::CertRevokeRequest,
        now: SystemTime,
    ) -> Result<Handled, ServiceError> {
        let serial = parse_serial("serial", &request.serial)?;
        let reason = parse_reason(request.reason.as_deref())?;
        let record = self
            .machine
            .authority()
            .certificate(&serial)
            .map_err(authority_error)?
            .ok_or_else(|| {
                ServiceError::new(
                    api::UNKNOWN_SERIAL,
                    format!("no certificate of this authority has serial {serial}"),
                )
            })?;
        let facts = cert_facts(&record.cert_der).map_err(internal)?;
        if !who.operator && facts.spki != who.facts.spki {
            return Err(unauthorized(
                "only the certificate's owner (same key) or the operator may revoke it",
            ));
        }
        // What the revocation's transaction revokes with it (nothing else
        // writes in between), for the pins they take along.
        let mut revoked = vec![(serial, facts)];
        for child in self
            .machine
            .authority()
            .descendants(&serial, now)
            .map_err(authority_error)?
        {
            revoked.push((child.serial, cert_facts(&child.cert_der).map_err(internal)?));
        }
        let change = self.unpin_change(&revoked, now)?;
        let names = zone_names(change.as_ref());
        let mut revoke = self
            .machine
            .authority()
            .propose_revocation(serial, reason, now)
            .map_err(authority_error)?;
        revoke.zone = change;
        let by = if who.operator { "operator" } else { "owner" };
        let reason = request.reason.unwrap_or_else(|| "unspecified".into());
        commit(Command::Revoke(revoke), move |service, applied| {
            let Applied::Revoked(serials) = applied else {
                return Err(internal(format!("a revocation was applied as {applied:?}")));
            };
            service.zone_followed(names);
            // The audit trail: durable in the registry, and in the log output.
            tracing::info!(%serial, subject = %record.subject, reason, by, "certificate revoked");
            for child in serials.iter().skip(1) {
                tracing::info!(serial = %child, with = %serial, "certificate revoked with the one it renewed or was issued on the authority of");
            }
            Ok(api::Revoked {
                serial: serial.to_string(),
                revoked_at: unix_s(now),
            })
        })
    }

    /// The pins revoking the certificates `revoked` (together) removes:
    /// each one's key's, from the zone names it carries that no other live
    /// certificate with that key carries.
    fn unpin_change(
        &self,
        revoked: &[(Serial, CertFacts)],
        now: SystemTime,
    ) -> Result<Option<ZoneChange>, ServiceError> {
        let Some(zone) = self.machine.zone() else {
            return Ok(None);
        };
        let serials: Vec<Serial> = revoked.iter().map(|(serial, _)| *serial).collect();
        // A name's records with every revoked key's pin off: one key's
        // edit builds on another's for the same name.
        let mut edits: BTreeMap<String, Option<RecordSet>> = BTreeMap::new();
        for (_, facts) in revoked {
            let pin = facts.pin();
            for (name, _) in zone.unpin_edits(facts.dns_candidates(), pin) {
                if self.key_holds(&name, pin, &serials, now)? {
                    continue;
                }
                let records = match edits.get(&name) {
                    Some(edited) => edited.clone(),
                    None => zone.get(&name).cloned(),
                };
                let unpinned = records.and_then(|set| set.unpinned(pin).unwrap_or(Some(set)));
                edits.insert(name, unpinned);
            }
        }
        zone.plan(edits.into_iter().collect()).map_err(zone_error)
    }

    fn dns_zone(&self) -> &Zone {
        // `handle` serves the zone kinds only with a zone.
        self.machine
            .zone()
            .expect("zone kinds are served only with a zone")
    }

    /// `input` as a name of the zone (absolute), if `who` may change it:
    /// see the module documentation.
    fn name_to_change(
        &self,
        who: &Identity,
        input: &str,
        now: SystemTime,
    ) -> Result<String, ServiceError> {
        if !who.operator && input.contains('*') {
            return Err(unauthorized(format!(
                "{input:?} is a wildcard name: those are the operator's alone (and the zone holds none)"
            )));
        }
        let zone = self.dns_zone();
        let name = zone.qualify(input).map_err(|e| name_error("name", e))?;
        if who.operator {
            return Ok(name);
        }
        if self.is_server_name(&name) {
            return Err(unauthorized(format!(
                "{name} is the server's own name; only the operator may change it"
            )));
        }
        let assets = format!(".{}.{}", crate::runtime::assets::ASSET_NAMES, zone.apex());
        if name.ends_with(&assets) {
            return Err(unauthorized(format!(
                "{name} is an asset's name: it is set by `asset alloc --name` and removed by the asset's free; only the operator may change it otherwise"
            )));
        }
        if !who.facts.carries_dns(&name) {
            return Err(unauthorized(format!(
                "your certificate does not carry the name {:?} (as its CN or a DNS name); \
                 only the operator may change other names",
                name.trim_end_matches('.')
            )));
        }
        if let Some(owner) = zone.get(&name).and_then(RecordSet::owner)
            && owner != who.facts.pin()
            && self.key_holds(&name, owner, &[], now)?
        {
            return Err(ServiceError::new(
                api::NAME_TAKEN,
                format!(
                    "{name} was set by key {} which a live certificate for it still holds",
                    api::hex(&owner)
                ),
            ));
        }
        Ok(name)
    }

    /// Set (`Some`) or remove (`None`) the records of `name` (from
    /// [`Self::name_to_change`]); answered with `changed` and the zone's
    /// serial after it. A change to what is there already is answered at
    /// once.
    fn zone_write(
        &mut self,
        who: &Identity,
        name: String,
        records: Option<RecordSet>,
    ) -> Result<Handled, ServiceError> {
        let record = records.as_ref().map(|r| dns_record(&name, r));
        let what = match records {
            Some(_) => "zone name set",
            None => "zone name removed",
        };
        let change = self
            .dns_zone()
            .plan(vec![(name.clone(), records)])
            .map_err(zone_error)?;
        let Some(change) = change else {
            let serial = self.dns_zone().serial();
            return answer(&api::DnsChanged {
                name,
                record,
                serial,
            });
        };
        let by = if who.operator { "operator" } else { "owner" };
        commit(Command::Zone(change), move |service, _| {
            let serial = service.dns_zone().serial();
            tracing::info!(%name, by, serial, "{what}");
            Ok(api::DnsChanged {
                name,
                record,
                serial,
            })
        })
    }

    fn dns_set(
        &mut self,
        who: &Identity,
        request: api::DnsSetRequest,
        now: SystemTime,
    ) -> Result<Handled, ServiceError> {
        let name = self.name_to_change(who, &request.name, now)?;
        let pin = who.facts.pin();
        let owner = (!who.operator).then_some(pin);
        let records = requested_records(&request, owner)?;
        if !who.operator && records.tlsa().iter().any(|t| t.spki_sha256 != pin) {
            return Err(unauthorized(format!(
                "a TLSA pin is not your certificate's key ({}); only the operator may pin other keys",
                api::hex(&pin)
            )));
        }
        self.zone_write(who, name, Some(records))
    }

    fn dns_remove(
        &mut self,
        who: &Identity,
        request: api::DnsRemoveRequest,
        now: SystemTime,
    ) -> Result<Handled, ServiceError> {
        let name = self.name_to_change(who, &request.name, now)?;
        if self.dns_zone().get(&name).is_none() {
            return Err(ServiceError::new(
                api::NOT_FOUND,
                format!("the zone has no records for {name}"),
            ));
        }
        self.zone_write(who, name, None)
    }

    fn dns_list(&self, request: api::DnsListRequest) -> Result<api::DnsList, ServiceError> {
        let zone = self.dns_zone();
        let after = request.after.map(|a| a.to_ascii_lowercase());
        let (page, more) = zone.page(after.as_deref(), api::MAX_DNS_RECORDS_PER_PAGE);
        let next = more
            .then(|| page.last().map(|(name, _)| (*name).to_owned()))
            .flatten();
        Ok(api::DnsList {
            records: page.iter().map(|(n, r)| dns_record(n, r)).collect(),
            serial: zone.serial(),
            next,
        })
    }

    fn cert_list(
        &self,
        request: api::CertListRequest,
        now: SystemTime,
    ) -> Result<api::CertList, ServiceError> {
        let filter = match request.filter.as_str() {
            "all" => CertificateFilter::All,
            "valid" => CertificateFilter::ValidAt(now),
            "revoked" => CertificateFilter::Revoked,
            other => match other.strip_prefix("name:") {
                Some(name) if !name.is_empty() => CertificateFilter::Name(name.to_owned()),
                _ => {
                    return Err(ServiceError::malformed(format!(
                        "filter {other:?} is not one of all, valid, revoked, name:<name>"
                    )));
                }
            },
        };
        let after = request
            .after
            .as_deref()
            .map(|a| parse_serial("after", a))
            .transpose()?;
        let records = self
            .machine
            .authority()
            .certificates(&filter, after)
            .map_err(authority_error)?;
        let next = (records.len() == MAX_RECORDS_PER_CALL)
            .then(|| records.last().map(|r| r.serial.to_string()))
            .flatten();
        Ok(api::CertList {
            certificates: records.iter().map(certificate_info).collect(),
            next,
        })
    }

    /// `der` was issued by this CA (issuer name and signature), whatever
    /// its validity or revocation.
    fn check_ours(&self, der: &[u8]) -> Result<(), ServiceError> {
        let cert =
            parse_x509(der).map_err(|e| ServiceError::malformed(format!("certificate: {e}")))?;
        let intermediate =
            parse_x509(self.machine.authority().ca().intermediate_der()).map_err(internal)?;
        if cert.issuer().as_raw() != intermediate.subject().as_raw()
            || cert
                .verify_signature(Some(intermediate.public_key()))
                .is_err()
        {
            return Err(ServiceError::new(
                api::NOT_OUR_CA,
                format!(
                    "the certificate was issued by {:?}, not by this CA",
                    cert.issuer().to_string()
                ),
            ));
        }
        Ok(())
    }

    fn latest_sth(&self) -> Result<api::Sth, ServiceError> {
        let log = self.machine.authority().log();
        let sth = log
            .latest_sth()
            .ok_or_else(|| ServiceError::new(api::NOT_FOUND, "the log is empty"))?;
        Ok(api::Sth::from_signed(&sth, &log.log_id()))
    }

    /// The answer to an issuance: the certificate with its proof in the
    /// tree head its append signed.
    fn issued(&self, logged: &LoggedCertificate) -> Result<api::Issued, ServiceError> {
        let log = self.machine.authority().log();
        let certificate = &logged.certificate;
        // A batch of one: the entry carries the tree head's timestamp.
        let timestamp_ms = logged.sth.timestamp_ms;
        let leaf = encode_x509_leaf(timestamp_ms, &certificate.cert_der, &[]).map_err(internal)?;
        let hash = leaf_hash(&leaf);
        if log.leaf_hash(logged.leaf_index) != Some(hash) {
            return Err(internal(format!(
                "log entry {} is not certificate {}",
                logged.leaf_index, certificate.serial
            )));
        }
        let proof = log
            .inclusion_proof_at(logged.leaf_index, logged.sth.tree_size)
            .map_err(log_error)?;
        Ok(api::Issued {
            certificate_pem: certificate.cert_pem.clone(),
            chain_pem: self.machine.authority().ca().intermediate_pem().to_owned(),
            serial: certificate.serial.to_string(),
            not_before: unix_s(certificate.not_before),
            not_after: unix_s(certificate.not_after),
            leaf_index: logged.leaf_index,
            sth: api::Sth::from_signed(&logged.sth, &log.log_id()),
            proof: api::Proof {
                leaf_index: proof.leaf_index,
                tree_size: proof.tree_size,
                timestamp: timestamp_ms,
                leaf_hash: api::b64(&hash),
                root_hash: api::b64(&logged.sth.root_hash),
                audit_path: proof.audit_path.iter().map(|h| api::b64(h)).collect(),
            },
        })
    }

    fn ct_proof(&self, request: api::CtProofRequest) -> Result<api::Proof, ServiceError> {
        let log = self.machine.authority().log();
        let size = log.size();
        let tree_size = request.tree_size.unwrap_or(size);
        if tree_size == 0 || tree_size > size {
            return Err(out_of_range(format!(
                "tree size {tree_size} is not in 1..={size}, the log's sizes"
            )));
        }
        let hash = match (&request.leaf_hash, &request.certificate_pem) {
            (Some(hash), None) => {
                api::b64_hash("leaf_hash", hash).map_err(ServiceError::malformed)?
            }
            (None, Some(pem)) => self.leaf_hash_of(pem)?,
            _ => {
                return Err(ServiceError::malformed(
                    "give exactly one of leaf_hash and certificate_pem",
                ));
            }
        };
        let proof = log
            .inclusion_proof_by_hash(&hash, tree_size)
            .map_err(|e| match e {
                LogError::UnknownLeaf | LogError::LeafNotInTree { .. } => {
                    ServiceError::new(api::NOT_FOUND, e.to_string())
                }
                other => log_error(other),
            })?;
        let index = proof.leaf_index;
        let entry = log.entries(index, index + 1).map_err(log_error)?;
        let leaf = entry
            .first()
            .map(|bytes| decode_leaf(bytes))
            .transpose()
            .map_err(internal)?
            .ok_or_else(|| internal(format!("log entry {index} is missing")))?;
        Ok(api::Proof {
            leaf_index: index,
            tree_size,
            timestamp: leaf.timestamp_ms,
            leaf_hash: api::b64(&hash),
            root_hash: api::b64(&log.root(tree_size).map_err(log_error)?),
            audit_path: proof.audit_path.iter().map(|h| api::b64(h)).collect(),
        })
    }

    /// The leaf hash of a certificate this CA issued, from its registry
    /// record (which holds the entry's timestamp).
    fn leaf_hash_of(&self, pem: &str) -> Result<[u8; 32], ServiceError> {
        let der = pem_der("certificate_pem", pem)?;
        self.check_ours(&der)?;
        let serial = ca::serial_of(&der).map_err(|e| ServiceError::malformed(e.to_string()))?;
        let record = self
            .machine
            .authority()
            .certificate(&serial)
            .map_err(authority_error)?
            .filter(|r| r.cert_der == der)
            .ok_or_else(|| {
                ServiceError::new(
                    api::NOT_FOUND,
                    format!("certificate {serial} is not in the log"),
                )
            })?;
        let leaf =
            encode_x509_leaf(record.logged_at_ms, &record.cert_der, &[]).map_err(internal)?;
        Ok(leaf_hash(&leaf))
    }

    fn ct_consistency(
        &self,
        request: api::CtConsistencyRequest,
    ) -> Result<api::Consistency, ServiceError> {
        let log = self.machine.authority().log();
        let (old_size, new_size, size) = (request.old_size, request.new_size, log.size());
        if old_size == 0 || old_size > new_size || new_size > size {
            return Err(out_of_range(format!(
                "sizes {old_size} and {new_size} do not satisfy 1 <= old <= new <= {size}"
            )));
        }
        let sth = log.sth_at(new_size).map_err(log_error)?.ok_or_else(|| {
            out_of_range(format!("the log signed no tree head of size {new_size}"))
        })?;
        let proof = log
            .consistency_proof(old_size, new_size)
            .map_err(log_error)?;
        Ok(api::Consistency {
            old_size,
            new_size,
            proof: proof.iter().map(|h| api::b64(h)).collect(),
            new_sth: api::Sth::from_signed(&sth, &log.log_id()),
        })
    }

    fn ct_entries(&self, request: api::CtEntriesRequest) -> Result<api::Entries, ServiceError> {
        let log = self.machine.authority().log();
        let (start, end, size) = (request.start, request.end, log.size());
        if start >= end || end > size || end - start > api::MAX_ENTRIES_PER_REQUEST {
            return Err(out_of_range(format!(
                "entries {start}..{end} are not a non-empty range of at most {} within the log's {size}",
                api::MAX_ENTRIES_PER_REQUEST
            )));
        }
        let leaves = log.entries(start, end).map_err(log_error)?;
        let entries = leaves
            .iter()
            .zip(start..)
            .map(|(leaf, leaf_index)| {
                let decoded = decode_leaf(leaf).map_err(internal)?;
                Ok(api::Entry {
                    leaf_index,
                    leaf_input: api::b64(leaf),
                    certificate_pem: pem_certificate(&decoded.cert_der),
                })
            })
            .collect::<Result<_, ServiceError>>()?;
        Ok(api::Entries { entries })
    }

    fn ct_key(&self) -> api::CtKey {
        let log = self.machine.authority().log();
        api::CtKey {
            algorithm: match log.algorithm() {
                LogKeyAlgorithm::Ed25519 => api::LOG_ALGORITHM_ED25519,
                LogKeyAlgorithm::EcdsaP256Sha256 => api::LOG_ALGORITHM_ECDSA_P256,
            }
            .to_owned(),
            public_key: api::b64(&log.public_key_spki()),
            log_id: api::b64(&log.log_id()),
        }
    }

    fn rotate(&mut self, who: &Identity, now: SystemTime) -> Result<Handled, ServiceError> {
        if !who.operator {
            return Err(unauthorized(
                "only the operator may rotate the server certificate",
            ));
        }
        let pending = self
            .propose_server_certificate_rotation(now)
            .map_err(authority_error)?;
        Ok(Handled::Commit(Box::new(pending)))
    }

    /// The node certificate of a node joining the cluster as member
    /// `name` at `ip`, paid for with a join token (spent with it in the
    /// log): its names are the member's and `server_names` (the server
    /// certificate it serves with), its key `spki`.
    pub fn propose_member(
        &self,
        token: &str,
        name: &str,
        ip: IpAddr,
        server_names: &[String],
        spki: Vec<u8>,
        now: SystemTime,
    ) -> Result<(IssuedCertificate, Certify), ServiceError> {
        let token = self
            .tokens
            .verify_for(super::enrollment::Purpose::Join, token, now)
            .map_err(|e| ServiceError::new(api::TOKEN_INVALID, format!("join token: {e}")))?;
        if self
            .machine
            .authority()
            .token_spent(token.id())
            .map_err(authority_error)?
        {
            return Err(ServiceError::new(
                api::TOKEN_USED,
                "this join token was used already; mint a new one",
            ));
        }
        if let Some(name) = server_names.iter().find(|n| n.contains('*')) {
            return Err(unauthorized(format!(
                "{name:?} is a wildcard name: a member's certificate carries none"
            )));
        }
        let (certificate, mut certify) = self
            .member_request(name, ip, server_names, spki, now)
            .map_err(authority_error)?;
        certify.token = Some(SpentToken::of(&token));
        Ok((certificate, certify))
    }

    /// This member's own node certificate (the first member of a new
    /// cluster), for its server names and `ip`, on the server's key.
    pub fn propose_own_member(
        &self,
        name: &str,
        ip: IpAddr,
        now: SystemTime,
    ) -> Result<(IssuedCertificate, Certify), AuthorityError> {
        let spki = server_spki(&self.server_key)?;
        self.member_request(name, ip, &self.config.server_names, spki, now)
    }

    fn member_request(
        &self,
        name: &str,
        ip: IpAddr,
        server_names: &[String],
        spki: Vec<u8>,
        now: SystemTime,
    ) -> Result<(IssuedCertificate, Certify), AuthorityError> {
        let (dns_names, mut ip_addresses) = split_names(server_names);
        if !ip_addresses.contains(&ip) {
            ip_addresses.push(ip);
        }
        let request = IssueRequest {
            subject: crate::cluster::node::node_subject(name),
            dns_names,
            ip_addresses,
            usage: Usage::Node,
            lifetime: ca::MAX_LIFETIME,
            public_key: Some(spki),
            parent: None,
        };
        self.machine.authority().propose_issue(request, now)
    }

    /// A new server certificate as a proposal: once applied, it is what
    /// [`Self::take_rotated`] hands out (the caller publishes it).
    pub fn propose_server_certificate_rotation(
        &self,
        now: SystemTime,
    ) -> Result<Pending, AuthorityError> {
        let (certificate, certify) = self.propose_server_certificate(now)?;
        Ok(pending(
            Command::Certify(certify),
            move |service, applied| {
                certified(applied)?;
                let certificate = service.server_certificate(certificate);
                let rotated = api::Rotated {
                    serial: certificate.serial.to_string(),
                    not_after: unix_s(certificate.not_after),
                };
                service.rotated = Some(certificate);
                Ok(rotated)
            },
        ))
    }
}

/// Server names as DNS names and IP addresses.
/// The names `change` sets or removes, for the log line.
fn zone_names(change: Option<&ZoneChange>) -> Vec<String> {
    change.map_or_else(Vec::new, |c| c.names().map(str::to_owned).collect())
}

impl AuthorityService {
    /// Whether the certificate `der` carries every DNS name of the
    /// server's (`server_names`): a member whose node certificate lacks
    /// one (the names changed, e.g. the cluster's name was added) renews it.
    pub fn carries_server_names(&self, der: &[u8]) -> bool {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
            return false;
        };
        let carried = super::ca::certificate_names(&cert).dns_names;
        let (wanted, _) = split_names(&self.config.server_names);
        wanted
            .iter()
            .all(|name| carried.iter().any(|c| one_name(c, name)))
    }
}

fn split_names(names: &[String]) -> (Vec<String>, Vec<IpAddr>) {
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    for name in names {
        match name.parse::<IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => dns.push(name.clone()),
        }
    }
    (dns, ips)
}

#[cfg(test)]
mod tests;
