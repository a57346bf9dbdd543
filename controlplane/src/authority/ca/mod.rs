//! The certificate authority core: a two-level CA (root → intermediate →
//! leaves) kept in a data directory, issuing short-lived server and client
//! certificates, renewing and revoking them, and checking presented chains
//! (the logic the mTLS verifier calls).
//!
//! Files (in the directory given to [`CertificateAuthority::open_or_create`]):
//! `root.pem`, `root.key`, `intermediate.pem`, `intermediate.key`. They are
//! made once (keys mode 0600, each written to a temporary file and renamed)
//! and afterwards only read, never rewritten. The root key is only used at
//! creation; issuing uses the intermediate.
//!
//! The registry of issued serials and the revocation list are held here in
//! memory; this type does no storage of its own. On its own (as in these
//! tests) a restart forgets them. The durable form is
//! `authority::Authority`: it writes every issued certificate and every
//! revocation to redb before it records them here (through the crate-private
//! `sign` / `record_issued` and `check_revocable` / `record_revocation`
//! pairs), and on open hands the stored registry back through `restore`.

mod names;

pub use names::{CertificateNames, certificate_names, ip_from_bytes, same_name};
mod revocation;
pub(crate) mod store;
#[cfg(test)]
mod tests;

pub use revocation::RevocationSnapshot;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SerialNumber, SignatureAlgorithm,
};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

pub const ROOT_CERT_FILE: &str = "root.pem";
pub const ROOT_KEY_FILE: &str = "root.key";
pub const INTERMEDIATE_CERT_FILE: &str = "intermediate.pem";
pub const INTERMEDIATE_KEY_FILE: &str = "intermediate.key";

const DAY: u64 = 24 * 3600;
/// Validity of a newly made root.
pub const ROOT_VALIDITY: Duration = Duration::from_secs(3650 * DAY);
/// Validity of a newly made intermediate.
pub const INTERMEDIATE_VALIDITY: Duration = Duration::from_secs(1825 * DAY);
/// Lifetime of a leaf certificate unless the request says otherwise.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(DAY);
/// The longest lifetime a leaf may ask for.
pub const MAX_LIFETIME: Duration = Duration::from_secs(90 * DAY);
/// The most subject alternative names (DNS names plus IP addresses) a leaf may carry.
pub const MAX_NAMES: usize = 32;
/// How long before its issuance a certificate (and a new CA) is valid
/// from: a peer or cluster member whose clock is behind the issuer's by
/// up to this accepts it at once. Its lifetime still counts from the
/// issuance.
pub const CLOCK_SLACK: Duration = Duration::from_secs(300);
/// RFC 5280 upper bound for a common name.
pub const MAX_SUBJECT_LEN: usize = 64;

const ROOT_NAME: &str = "internet2 root CA";
const INTERMEDIATE_NAME: &str = "internet2 intermediate CA";

/// The key algorithm of a newly made CA (and of the keys it generates for leaves).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeyAlgorithm {
    #[default]
    EcdsaP256,
    Ed25519,
}

impl KeyAlgorithm {
    fn rcgen(self) -> &'static SignatureAlgorithm {
        match self {
            Self::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Self::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }

    fn of(key: &KeyPair) -> Option<Self> {
        [Self::EcdsaP256, Self::Ed25519]
            .into_iter()
            .find(|a| key.algorithm() == a.rcgen())
    }
}

/// What a leaf certificate is for (its extended key usage).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Usage {
    #[default]
    Server,
    Client,
    /// A cluster member's: the server certificate it serves with and the
    /// client certificate it reaches the other members with (both
    /// serverAuth and clientAuth).
    Node,
}

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Server => "server (serverAuth)",
            Self::Client => "client (clientAuth)",
            Self::Node => "cluster member (serverAuth and clientAuth)",
        })
    }
}

/// A certificate serial number: 16 random bytes, the first in 1..=0x7f so
/// the DER INTEGER is positive and exactly these 16 bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Serial(pub [u8; 16]);

impl Serial {
    /// The serial from a certificate's raw INTEGER bytes, if it is one of ours.
    pub fn from_raw(raw: &[u8]) -> Option<Self> {
        raw.try_into().ok().map(Self)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn random(rng: &dyn ring::rand::SecureRandom) -> Result<Self, CaError> {
        let mut bytes = [0u8; 16];
        rng.fill(&mut bytes).map_err(|_| CaError::Random)?;
        bytes[0] = (bytes[0] & 0x7f).max(1);
        Ok(Self(bytes))
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({self})")
    }
}

/// A request for a leaf certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssueRequest {
    /// The subject common name.
    pub subject: String,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
    pub usage: Usage,
    /// At most [`MAX_LIFETIME`]; cut short at the intermediate's expiry.
    pub lifetime: Duration,
    /// The subject's public key (SubjectPublicKeyInfo DER). `None`: the CA
    /// generates a key pair and returns it in [`IssuedCertificate::private_key`].
    pub public_key: Option<Vec<u8>>,
    /// The certificate on whose authority this one is issued: its
    /// revocation revokes this one too (see `authority::registry`). The CA
    /// only carries it to [`IssuedCertificate::parent`].
    pub parent: Option<Serial>,
}

impl Default for IssueRequest {
    fn default() -> Self {
        Self {
            subject: String::new(),
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            usage: Usage::Server,
            lifetime: DEFAULT_LIFETIME,
            public_key: None,
            parent: None,
        }
    }
}

/// A PKCS#8 private key the CA generated. Its `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Pkcs8Key {
    pub der: Vec<u8>,
    pub pem: String,
}

impl fmt::Debug for Pkcs8Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pkcs8Key(..)")
    }
}

/// An issued leaf certificate.
#[derive(Clone, Debug)]
pub struct IssuedCertificate {
    pub serial: Serial,
    pub cert_der: Vec<u8>,
    pub cert_pem: String,
    /// The leaf then the intermediate, PEM.
    pub chain_pem: String,
    /// Set when the CA generated the key pair.
    pub private_key: Option<Pkcs8Key>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The subject common name, names and usage the certificate carries
    /// (what the registry lists it by).
    pub subject: String,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
    pub usage: Usage,
    /// The serial of the certificate this one renewed, if it is a renewal.
    pub renewed_from: Option<Serial>,
    /// [`IssueRequest::parent`].
    pub parent: Option<Serial>,
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a usable PEM file: {detail}")]
    Pem { path: PathBuf, detail: String },
    #[error(
        "{dir}: the CA files are incomplete (missing {missing:?}); restore them from a backup, \
         or remove the remaining CA files to make a new CA (clients must then trust the new root)"
    )]
    Incomplete {
        dir: PathBuf,
        missing: Vec<&'static str>,
    },
    #[error("{path}: {detail}; restore the CA files from a backup")]
    Inconsistent { path: PathBuf, detail: String },
    #[error("cannot make a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("the system random number generator failed")]
    Random,
    #[error("the request has an empty subject; give a common name")]
    EmptySubject,
    #[error("the subject is {len} characters long; at most {max} are allowed")]
    SubjectTooLong { len: usize, max: usize },
    #[error("the subject contains control characters")]
    SubjectControlCharacters,
    #[error(
        "the request has {count} names (DNS names plus IP addresses); at most {max} are allowed"
    )]
    TooManyNames { count: usize, max: usize },
    #[error("a server certificate needs at least one DNS name or IP address")]
    NoNames,
    #[error("{name:?} is not a valid DNS name: {reason}")]
    InvalidDnsName { name: String, reason: &'static str },
    #[error("the requested lifetime is zero; ask for at least one second")]
    ZeroLifetime,
    #[error("the requested lifetime {requested:?} is longer than the maximum {max:?}")]
    LifetimeTooLong { requested: Duration, max: Duration },
    #[error("the request's public key is not a usable SubjectPublicKeyInfo: {0}")]
    InvalidPublicKey(String),
    #[error(
        "the intermediate CA is valid from {not_before} to {not_after}, not at {now}; \
         a new intermediate is needed"
    )]
    IssuerNotValid {
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        now: OffsetDateTime,
    },
    #[error("not a parsable X.509 certificate: {0}")]
    Parse(String),
    #[error("the certificate was issued by {issuer:?}, not by this CA")]
    UnknownIssuer { issuer: String },
    #[error("the certificate's signature does not verify against this CA's intermediate")]
    BadSignature,
    #[error("the certificate is a CA certificate, not a leaf")]
    NotEndEntity,
    #[error("the certificate is not valid before {not_before} (now {now}); check the clocks")]
    NotYetValid {
        not_before: OffsetDateTime,
        now: OffsetDateTime,
    },
    #[error("the certificate expired at {not_after} (now {now}); renew it before it expires")]
    Expired {
        not_after: OffsetDateTime,
        now: OffsetDateTime,
    },
    #[error("the certificate is not valid for {expected} use")]
    WrongUsage { expected: Usage },
    #[error("certificate {serial} is revoked")]
    Revoked { serial: Serial },
    #[error("serial {serial} was not issued by this CA")]
    UnknownSerial { serial: Serial },
    #[error("certificate {serial} is already revoked")]
    AlreadyRevoked { serial: Serial },
}

/// The CA, owned by the control plane (`issue`, `renew` and `revoke` take
/// `&mut self`). Workers check revocation through [`RevocationSnapshot`]s
/// without locks; [`Self::verify_chain`] takes `&self`.
pub struct CertificateAuthority {
    dir: PathBuf,
    algorithm: KeyAlgorithm,
    root_pem: String,
    root_der: Vec<u8>,
    intermediate_pem: String,
    intermediate_der: Vec<u8>,
    intermediate_not_before: OffsetDateTime,
    intermediate_not_after: OffsetDateTime,
    /// rcgen's view of the stored intermediate: its name and key identifier,
    /// as the issuer of new leaves.
    issuer: Certificate,
    issuer_key: KeyPair,
    rng: ring::rand::SystemRandom,
    issued: HashMap<Serial, SystemTime>,
    revoked: BTreeMap<Serial, SystemTime>,
    snapshot: RevocationSnapshot,
    verified: VerifiedSignatures,
}

/// Signatures checked at most ([`VerifiedSignatures`]), then forgotten
/// all at once.
const VERIFIED_MAX: usize = 8192;

/// Certificates whose signature by the intermediate verified, by the
/// SHA-256 of the whole certificate: a caller presents the same
/// certificate on every request, and its signature cannot stop being
/// valid. Validity, usage and revocation are still checked every time
/// ([`CertificateAuthority::verify_chain`]); only the public-key
/// operation is not repeated.
#[derive(Default)]
struct VerifiedSignatures(std::sync::Mutex<std::collections::HashSet<[u8; 32]>>);

impl VerifiedSignatures {
    fn set(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<[u8; 32]>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn key(cert_der: &[u8]) -> [u8; 32] {
        let mut key = [0u8; 32];
        key.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, cert_der).as_ref());
        key
    }

    /// Whether `cert`'s signature verified once before; otherwise verify
    /// it by `issuer` and remember it when it does.
    fn verify(
        &self,
        cert_der: &[u8],
        cert: &X509Certificate<'_>,
        issuer: &X509Certificate<'_>,
    ) -> Result<(), CaError> {
        let key = Self::key(cert_der);
        if self.set().contains(&key) {
            return Ok(());
        }
        cert.verify_signature(Some(issuer.public_key()))
            .map_err(|_| CaError::BadSignature)?;
        let mut verified = self.set();
        if verified.len() >= VERIFIED_MAX {
            verified.clear();
        }
        verified.insert(key);
        Ok(())
    }
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("dir", &self.dir)
            .field("algorithm", &self.algorithm)
            .field("issued", &self.issued.len())
            .field("revoked", &self.revoked.len())
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Load the CA from `dir`, or make a new root and intermediate there
    /// (with `algorithm`, valid from `now`) when the directory has no CA
    /// files. Existing files are never rewritten; when they hold another
    /// algorithm than `algorithm`, theirs is used (and a warning logged).
    pub fn open_or_create(
        dir: &Path,
        algorithm: KeyAlgorithm,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let files = [
            ROOT_CERT_FILE,
            ROOT_KEY_FILE,
            INTERMEDIATE_CERT_FILE,
            INTERMEDIATE_KEY_FILE,
        ];
        let missing: Vec<&'static str> = files
            .into_iter()
            .filter(|f| !dir.join(f).exists())
            .collect();
        if missing.len() == files.len() {
            create(dir, algorithm, now)?;
        } else if !missing.is_empty() {
            return Err(CaError::Incomplete {
                dir: dir.to_owned(),
                missing,
            });
        }
        let ca = Self::load(dir)?;
        if ca.algorithm != algorithm {
            tracing::warn!(
                dir = %dir.display(),
                stored = ?ca.algorithm,
                configured = ?algorithm,
                "the stored CA uses another key algorithm than configured; keeping the stored CA"
            );
        }
        let now = datetime(now);
        if now < ca.intermediate_not_before || now > ca.intermediate_not_after {
            tracing::warn!(
                dir = %dir.display(),
                not_after = %ca.intermediate_not_after,
                "the intermediate CA is not valid now; issuing will fail"
            );
        }
        Ok(ca)
    }

    fn load(dir: &Path) -> Result<Self, CaError> {
        let root_path = dir.join(ROOT_CERT_FILE);
        let root_pem = store::read(&root_path)?;
        let root_der = store::pem_to_der(&root_path, &root_pem)?;
        let root_key_path = dir.join(ROOT_KEY_FILE);
        let root_key = store::load_key(&root_key_path)?;
        let int_path = dir.join(INTERMEDIATE_CERT_FILE);
        let intermediate_pem = store::read(&int_path)?;
        let intermediate_der = store::pem_to_der(&int_path, &intermediate_pem)?;
        let int_key_path = dir.join(INTERMEDIATE_KEY_FILE);
        let issuer_key = store::load_key(&int_key_path)?;

        let inconsistent = |path: &Path, detail: String| CaError::Inconsistent {
            path: path.to_owned(),
            detail,
        };
        let root = parse(&root_der).map_err(|e| inconsistent(&root_path, e.to_string()))?;
        let int = parse(&intermediate_der).map_err(|e| inconsistent(&int_path, e.to_string()))?;
        if root.public_key().raw != root_key.public_key_der() {
            return Err(inconsistent(
                &root_key_path,
                format!("the key does not belong to {ROOT_CERT_FILE}"),
            ));
        }
        if int.public_key().raw != issuer_key.public_key_der() {
            return Err(inconsistent(
                &int_key_path,
                format!("the key does not belong to {INTERMEDIATE_CERT_FILE}"),
            ));
        }
        if int.issuer().as_raw() != root.subject().as_raw()
            || int.verify_signature(Some(root.public_key())).is_err()
        {
            return Err(inconsistent(
                &int_path,
                format!("not issued by {ROOT_CERT_FILE}"),
            ));
        }
        let algorithm = KeyAlgorithm::of(&issuer_key).ok_or_else(|| {
            inconsistent(
                &int_key_path,
                "neither an ECDSA P-256 nor an Ed25519 key".into(),
            )
        })?;
        let intermediate_not_before = int.validity().not_before.to_datetime();
        let intermediate_not_after = int.validity().not_after.to_datetime();
        // The issuer's name and key identifier come from the stored
        // certificate, so leaves chain to it; the signature over this
        // stand-in certificate is never used.
        let issuer =
            CertificateParams::from_ca_cert_pem(&intermediate_pem)?.self_signed(&issuer_key)?;
        Ok(Self {
            dir: dir.to_owned(),
            algorithm,
            root_pem,
            root_der,
            intermediate_pem,
            intermediate_der,
            intermediate_not_before,
            intermediate_not_after,
            issuer,
            issuer_key,
            rng: ring::rand::SystemRandom::new(),
            issued: HashMap::new(),
            revoked: BTreeMap::new(),
            snapshot: RevocationSnapshot::default(),
            verified: VerifiedSignatures::default(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// The root certificate clients and servers trust, PEM.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    pub fn root_der(&self) -> &[u8] {
        &self.root_der
    }

    pub fn intermediate_pem(&self) -> &str {
        &self.intermediate_pem
    }

    pub fn intermediate_der(&self) -> &[u8] {
        &self.intermediate_der
    }

    /// Issue a leaf certificate valid from `now`.
    pub fn issue(
        &mut self,
        request: IssueRequest,
        now: SystemTime,
    ) -> Result<IssuedCertificate, CaError> {
        let issued = self.sign(request, now, None)?;
        self.record_issued(issued.serial, issued.not_after);
        Ok(issued)
    }

    /// Make and sign a certificate with a serial not issued before, without
    /// recording it: the caller stores it durably first, then calls
    /// [`Self::record_issued`]. A certificate that is never recorded was
    /// never handed out.
    pub(crate) fn sign(
        &self,
        request: IssueRequest,
        now: SystemTime,
        renewed_from: Option<Serial>,
    ) -> Result<IssuedCertificate, CaError> {
        names::validate(&request)?;
        let public_key = request
            .public_key
            .as_deref()
            .map(rcgen::SubjectPublicKeyInfo::from_der)
            .transpose()
            .map_err(|e| CaError::InvalidPublicKey(e.to_string()))?;
        let issued_at = datetime(now);
        if issued_at < self.intermediate_not_before || issued_at >= self.intermediate_not_after {
            return Err(CaError::IssuerNotValid {
                not_before: self.intermediate_not_before,
                not_after: self.intermediate_not_after,
                now: issued_at,
            });
        }
        let not_before = (issued_at - CLOCK_SLACK).max(self.intermediate_not_before);
        let not_after = (issued_at + request.lifetime).min(self.intermediate_not_after);
        let serial = loop {
            let serial = Serial::random(&self.rng)?;
            if !self.issued.contains_key(&serial) {
                break serial;
            }
        };

        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(&request.subject);
        params.subject_alt_names = names::san(&request)?;
        // No BasicConstraints at all: rcgen's ExplicitNoCa encodes the
        // DEFAULT cA=FALSE, which DER forbids and strict parsers (Python's
        // cryptography, so aioquic and dnspython) refuse. An end-entity
        // certificate without the extension is not a CA (RFC 5280 §4.2.1.9).
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match request.usage {
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::Node => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(SerialNumber::from_slice(&serial.0));
        params.not_before = not_before;
        params.not_after = not_after;

        let (cert, private_key) = match public_key {
            Some(key) => (
                params.signed_by(&key, &self.issuer, &self.issuer_key)?,
                None,
            ),
            None => {
                let key = KeyPair::generate_for(self.algorithm.rcgen())?;
                let cert = params.signed_by(&key, &self.issuer, &self.issuer_key)?;
                let pkcs8 = Pkcs8Key {
                    der: key.serialize_der(),
                    pem: key.serialize_pem(),
                };
                (cert, Some(pkcs8))
            }
        };
        let not_after = SystemTime::from(not_after);
        let cert_pem = cert.pem();
        let chain_pem = format!("{cert_pem}{}", self.intermediate_pem);
        tracing::debug!(
            %serial,
            subject = %request.subject,
            usage = %request.usage,
            "signed certificate"
        );
        Ok(IssuedCertificate {
            serial,
            cert_der: cert.der().to_vec(),
            cert_pem,
            chain_pem,
            private_key,
            not_before: SystemTime::from(not_before),
            not_after,
            subject: request.subject,
            dns_names: request.dns_names,
            ip_addresses: request.ip_addresses,
            usage: request.usage,
            renewed_from,
            parent: request.parent,
        })
    }

    /// Record a certificate made by [`Self::sign`] as issued: from now on it
    /// can be revoked, and its serial is never used again.
    pub(crate) fn record_issued(&mut self, serial: Serial, not_after: SystemTime) {
        self.issued.insert(serial, not_after);
        tracing::info!(%serial, "issued certificate");
    }

    /// Replace the registry with one read back from storage: every serial
    /// ever issued (with its expiry) and every revocation. Each revocation
    /// raised the snapshot generation by one, so the restored snapshot is
    /// the one held before the restart.
    pub(crate) fn restore(
        &mut self,
        issued: HashMap<Serial, SystemTime>,
        revoked: BTreeMap<Serial, SystemTime>,
    ) {
        self.snapshot =
            RevocationSnapshot::new(revoked.len() as u64, revoked.keys().copied().collect());
        self.issued = issued;
        self.revoked = revoked;
    }

    /// Issue a successor to `current_cert_der`, a valid, unrevoked
    /// certificate of this CA: same subject, names, usage, lifetime and
    /// public key (the holder keeps its key pair), new serial, valid from
    /// `now`. Expired certificates are refused; their holders must enroll
    /// anew. The old certificate stays valid until it expires or is revoked.
    pub fn renew(
        &mut self,
        current_cert_der: &[u8],
        now: SystemTime,
    ) -> Result<IssuedCertificate, CaError> {
        let (request, current) = self.renewal_request(current_cert_der, now)?;
        let issued = self.sign(request, now, Some(current))?;
        self.record_issued(issued.serial, issued.not_after);
        Ok(issued)
    }

    /// The request that renews `current_cert_der`, and its serial; see
    /// [`Self::renew`].
    pub(crate) fn renewal_request(
        &self,
        current_cert_der: &[u8],
        now: SystemTime,
    ) -> Result<(IssueRequest, Serial), CaError> {
        let cert = parse(current_cert_der)?;
        let usage = match cert.extended_key_usage() {
            Ok(Some(eku)) if eku.value.server_auth && eku.value.client_auth => Usage::Node,
            Ok(Some(eku)) if eku.value.server_auth => Usage::Server,
            Ok(Some(eku)) if eku.value.client_auth => Usage::Client,
            _ => {
                return Err(CaError::WrongUsage {
                    expected: Usage::Server,
                });
            }
        };
        let current = self.check(current_cert_der, &cert, usage, now)?;
        let names::CertificateNames {
            subject,
            dns_names,
            ip_addresses,
        } = names::certificate_names(&cert);
        let validity = cert.validity();
        // The span less the slack it was valid from before its issuance
        // ([`CLOCK_SLACK`]): the lifetime it was issued with.
        let lifetime = (validity.not_after.to_datetime() - validity.not_before.to_datetime())
            .unsigned_abs()
            .saturating_sub(CLOCK_SLACK)
            .clamp(CLOCK_SLACK, MAX_LIFETIME);
        let request = IssueRequest {
            subject,
            dns_names,
            ip_addresses,
            usage,
            lifetime,
            public_key: Some(cert.public_key().raw.to_vec()),
            // The CA does not know it; `authority::Authority` keeps the
            // predecessor's from its registry.
            parent: None,
        };
        Ok((request, current))
    }

    /// Revoke a certificate this CA issued.
    pub fn revoke(&mut self, serial: &Serial, now: SystemTime) -> Result<(), CaError> {
        self.check_revocable(serial)?;
        self.record_revocation(*serial, now);
        Ok(())
    }

    /// Whether [`Self::revoke`] would accept `serial`: issued, not yet revoked.
    pub(crate) fn check_revocable(&self, serial: &Serial) -> Result<(), CaError> {
        if !self.issued.contains_key(serial) {
            return Err(CaError::UnknownSerial { serial: *serial });
        }
        if self.revoked.contains_key(serial) {
            return Err(CaError::AlreadyRevoked { serial: *serial });
        }
        Ok(())
    }

    /// Record a revocation [`Self::check_revocable`] accepted and publish a
    /// new snapshot.
    pub(crate) fn record_revocation(&mut self, serial: Serial, now: SystemTime) {
        self.record_revocations(&[serial], now);
    }

    /// Record revocations stored together (issued, not yet revoked serials)
    /// and publish one new snapshot. The generation still rises by one per
    /// revocation, so it equals the number of revocations, as
    /// [`Self::restore`] sets it.
    pub(crate) fn record_revocations(&mut self, serials: &[Serial], now: SystemTime) {
        for serial in serials {
            let before = self.revoked.insert(*serial, now);
            debug_assert!(
                self.issued.contains_key(serial) && before.is_none(),
                "{serial} was not revocable"
            );
            tracing::info!(%serial, "revoked certificate");
        }
        self.snapshot = RevocationSnapshot::new(
            self.snapshot.generation() + serials.len() as u64,
            self.revoked.keys().copied().collect(),
        );
    }

    /// The current revocation list, to hand to workers (cheap to clone).
    pub fn revocations(&self) -> RevocationSnapshot {
        self.snapshot.clone()
    }

    /// Check a presented leaf certificate: issued by our intermediate
    /// (name and signature), valid at `now`, for `usage`, not revoked.
    pub fn verify_chain(
        &self,
        cert_der: &[u8],
        usage: Usage,
        now: SystemTime,
    ) -> Result<Serial, CaError> {
        self.check(cert_der, &parse(cert_der)?, usage, now)
    }

    /// `cert` is `cert_der` parsed.
    fn check(
        &self,
        cert_der: &[u8],
        cert: &X509Certificate<'_>,
        usage: Usage,
        now: SystemTime,
    ) -> Result<Serial, CaError> {
        let intermediate = parse(&self.intermediate_der)?;
        if cert.issuer().as_raw() != intermediate.subject().as_raw() {
            return Err(CaError::UnknownIssuer {
                issuer: cert.issuer().to_string(),
            });
        }
        self.verified.verify(cert_der, cert, &intermediate)?;
        if cert.is_ca() {
            return Err(CaError::NotEndEntity);
        }
        let now = datetime(now);
        if now < self.intermediate_not_before || now > self.intermediate_not_after {
            return Err(CaError::IssuerNotValid {
                not_before: self.intermediate_not_before,
                not_after: self.intermediate_not_after,
                now,
            });
        }
        let not_before = cert.validity().not_before.to_datetime();
        let not_after = cert.validity().not_after.to_datetime();
        if now < not_before {
            return Err(CaError::NotYetValid { not_before, now });
        }
        if now > not_after {
            return Err(CaError::Expired { not_after, now });
        }
        let usable = match cert.extended_key_usage() {
            Ok(Some(eku)) => match usage {
                Usage::Server => eku.value.server_auth,
                Usage::Client => eku.value.client_auth,
                Usage::Node => eku.value.server_auth && eku.value.client_auth,
            },
            _ => false,
        };
        if !usable {
            return Err(CaError::WrongUsage { expected: usage });
        }
        let serial = Serial::from_raw(cert.raw_serial())
            .ok_or_else(|| CaError::Parse("the serial number is not 16 bytes".into()))?;
        if self.snapshot.is_revoked(&serial.0) {
            return Err(CaError::Revoked { serial });
        }
        Ok(serial)
    }
}

/// Make a root and an intermediate in `dir`.
fn create(dir: &Path, algorithm: KeyAlgorithm, now: SystemTime) -> Result<(), CaError> {
    store::create_dir(dir)?;
    let rng = ring::rand::SystemRandom::new();
    let not_before = datetime(now) - CLOCK_SLACK;

    let root_key = KeyPair::generate_for(algorithm.rcgen())?;
    let mut root = ca_params(ROOT_NAME, 1, Serial::random(&rng)?);
    root.not_before = not_before;
    root.not_after = not_before + ROOT_VALIDITY;
    let root = root.self_signed(&root_key)?;

    let int_key = KeyPair::generate_for(algorithm.rcgen())?;
    let mut int = ca_params(INTERMEDIATE_NAME, 0, Serial::random(&rng)?);
    int.not_before = not_before;
    int.not_after = not_before + INTERMEDIATE_VALIDITY;
    int.use_authority_key_identifier_extension = true;
    let int = int.signed_by(&int_key, &root, &root_key)?;

    store::write_private(
        &dir.join(ROOT_KEY_FILE),
        root_key.serialize_pem().as_bytes(),
    )?;
    store::write_public(&dir.join(ROOT_CERT_FILE), root.pem().as_bytes())?;
    store::write_private(
        &dir.join(INTERMEDIATE_KEY_FILE),
        int_key.serialize_pem().as_bytes(),
    )?;
    store::write_public(&dir.join(INTERMEDIATE_CERT_FILE), int.pem().as_bytes())?;
    store::sync_dir(dir)?;
    tracing::info!(dir = %dir.display(), ?algorithm, "created certificate authority");
    Ok(())
}

fn ca_params(name: &str, path_len: u8, serial: Serial) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(SerialNumber::from_slice(&serial.0));
    params
}

fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

/// `now` to whole seconds, as certificates hold it.
fn datetime(now: SystemTime) -> OffsetDateTime {
    let at = OffsetDateTime::from(now);
    at.replace_nanosecond(0).unwrap_or(at)
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, CaError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(CaError::Parse(
            "trailing bytes after the certificate".into(),
        )),
        Err(e) => Err(CaError::Parse(e.to_string())),
    }
}

/// The SubjectPublicKeyInfo of a certificate, from its DER: its key.
pub(crate) fn public_key_of(der: &[u8]) -> Result<Vec<u8>, CaError> {
    Ok(parse(der)?.public_key().raw.to_vec())
}

/// The serial of a certificate of ours, from its DER.
pub(crate) fn serial_of(der: &[u8]) -> Result<Serial, CaError> {
    Serial::from_raw(parse(der)?.raw_serial())
        .ok_or_else(|| CaError::Parse("the serial number is not 16 bytes".into()))
}
