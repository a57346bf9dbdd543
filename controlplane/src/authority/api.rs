//! The authority's `stoq/1` messages: request kinds, JSON request and
//! response shapes and error codes, shared by the server
//! ([`super::service`]) and the client CLI, plus the client's own checks of
//! what the server hands out ([`verify_issued`], [`verify_consistency`]).
//!
//! The transport frames a request as kind + payload; the response kind is
//! `kind | 0x80`, an error is kind `0xff` with a u16 code and a UTF-8
//! message ([`ServiceError`]). Payloads here are JSON objects; binary
//! values (hashes, signatures, keys, leaf inputs) are standard base64 with
//! padding, serials are 32 lowercase hex digits, certificate validity and
//! revocation times are Unix seconds, CT timestamps are Unix milliseconds
//! (as RFC 6962 has them). Unknown fields in a request are refused
//! (`MALFORMED_REQUEST`). Kinds without arguments take an empty payload or
//! `{}`. `docs/PROTOCOL.md` ("Authority messages") is the reference.
//!
//! The verification helpers are pure: they take what the server sent and
//! the keys the client trusts, and use the client-side proof checks of
//! `ct::verify`, not the code that makes proofs.

use super::ct::sth::{ED25519_SPKI_PREFIX, P256_SPKI_PREFIX};
use super::ct::{
    self, Hash, LogKeyAlgorithm, SignedTreeHead, encode_x509_leaf, leaf_hash, verify_sth,
};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::digest::{SHA256, digest};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

// Request kinds (stoq/1). The response kind is `kind | RESPONSE_BIT`.
/// Enrollment with a one-time token.
pub const ENROLL: u8 = 0x10;
pub const CERT_ISSUE: u8 = 0x11;
pub const CERT_RENEW: u8 = 0x12;
pub const CERT_REVOKE: u8 = 0x13;
pub const CERT_LIST: u8 = 0x14;
pub const CA_ROOT: u8 = 0x15;
pub const CT_STH: u8 = 0x20;
pub const CT_PROOF: u8 = 0x21;
pub const CT_CONSISTENCY: u8 = 0x22;
pub const CT_ENTRIES: u8 = 0x23;
pub const CT_KEY: u8 = 0x24;
/// Operator only: issue a new server certificate now.
pub const ROTATE: u8 = 0x30;
/// Zone updates (served only when the server holds a zone; otherwise
/// `UNKNOWN_KIND`): set a name's AAAA and TLSA records.
pub const DNS_SET: u8 = 0x38;
/// Remove a name and all its records.
pub const DNS_REMOVE: u8 = 0x39;
/// List the zone's names, in pages.
pub const DNS_LIST: u8 = 0x3a;
/// The kinds served without a client certificate: enrollment, and the log
/// key an enrolling client checks its new certificate's log proof with.
pub const ANONYMOUS_KINDS: [u8; 2] = [ENROLL, CT_KEY];
/// The zone kinds.
pub const DNS_KINDS: [u8; 3] = [DNS_SET, DNS_REMOVE, DNS_LIST];
/// Every request kind the authority answers.
pub const KINDS: [u8; 15] = [
    ENROLL,
    CERT_ISSUE,
    CERT_RENEW,
    CERT_REVOKE,
    CERT_LIST,
    CA_ROOT,
    CT_STH,
    CT_PROOF,
    CT_CONSISTENCY,
    CT_ENTRIES,
    CT_KEY,
    ROTATE,
    DNS_SET,
    DNS_REMOVE,
    DNS_LIST,
];
pub const RESPONSE_BIT: u8 = 0x80;
// No request kind collides with its own or another's response kind, or with
// the error kind 0xff; every one is in the range the transport forwards to
// the control plane.
const _: () = {
    let mut i = 0;
    while i < KINDS.len() {
        assert!(KINDS[i] < RESPONSE_BIT);
        assert!(KINDS[i] >= FORWARDED_KINDS_FIRST && KINDS[i] <= FORWARDED_KINDS_LAST);
        i += 1;
    }
};
/// The `stoq/1` kinds the workers forward to the control plane.
pub const FORWARDED_KINDS_FIRST: u8 = 0x10;
pub const FORWARDED_KINDS_LAST: u8 = 0x3f;

/// The largest request payload the transport passes on (`stoq/1`).
pub const MAX_REQUEST_LEN: usize = 65536;
/// The most entries one `CT_ENTRIES` request may ask for.
pub const MAX_ENTRIES_PER_REQUEST: u64 = 256;
const _: () = assert!(MAX_ENTRIES_PER_REQUEST <= ct::MAX_ENTRIES_PER_CALL);

// Error codes (u16), sent with kind 0xff.
/// The kind is not one the authority serves (as stoq/1's `UNKNOWN_MESSAGE`).
pub const UNKNOWN_KIND: u16 = 0x02;
/// The payload is not the JSON the kind takes (syntax, a missing or unknown
/// field, a bad value, base64 or hex that does not decode, too large).
pub const MALFORMED_REQUEST: u16 = 0x10;
/// The CSR does not parse, its signature does not verify, it carries an
/// extension other than names and key usages, or its names or key are not
/// ones the CA issues for.
pub const BAD_CSR: u16 = 0x11;
/// The caller may not do this: no (valid) client certificate, not the
/// owner, not the operator, or a reserved name.
pub const UNAUTHORIZED: u16 = 0x12;
/// No certificate of this authority has this serial.
pub const UNKNOWN_SERIAL: u16 = 0x13;
/// The certificate is already revoked.
pub const ALREADY_REVOKED: u16 = 0x14;
/// The enrollment token is malformed, was not minted by this server (bad
/// MAC) or has expired.
pub const TOKEN_INVALID: u16 = 0x15;
/// The enrollment token was already spent.
pub const TOKEN_USED: u16 = 0x16;
/// The certificate was not issued by this CA.
pub const NOT_OUR_CA: u16 = 0x17;
/// The certificate is expired or not yet valid.
pub const EXPIRED: u16 = 0x18;
/// Tree sizes or entry indices outside the log, or a range too large.
pub const OUT_OF_RANGE: u16 = 0x19;
/// No log entry has this leaf hash or certificate (or the log is empty);
/// `DNS_REMOVE`: the zone holds no such name.
pub const NOT_FOUND: u16 = 0x1a;
/// The server failed inside (storage, signing); details are in its log.
pub const STORAGE: u16 = 0x1b;
/// A name in the CSR is held by an unrevoked, unexpired certificate with
/// another key.
pub const NAME_TAKEN: u16 = 0x1c;
/// The certificate is revoked (renewing a revoked certificate).
pub const REVOKED: u16 = 0x1d;
/// The name is not inside the zone, or it is the zone's apex.
pub const NOT_IN_ZONE: u16 = 0x1e;
/// The zone holds as many names as it may ([`crate::dns::MAX_NAMES`]).
pub const ZONE_FULL: u16 = 0x1f;
/// A cluster member that is not the leader was asked to change the state;
/// the message names the leader where this member knows it. Ask another
/// member.
pub const NOT_LEADER: u16 = 0x20;

/// An error answer: kind 0xff, `code`, `message` (UTF-8, for a person).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (error 0x{code:02x})")]
pub struct ServiceError {
    pub code: u16,
    pub message: String,
}

impl ServiceError {
    pub fn new(code: u16, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn malformed(message: impl Into<String>) -> Self {
        Self::new(MALFORMED_REQUEST, message)
    }
}

/// A request without arguments (`{}` or an empty payload).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoArguments {}

/// `ENROLL`: a certificate for the CSR's key and names, paid for by a token.
/// Sent again with the same token and a CSR for the same key, it answers
/// the certificate the token paid for (a retry after a lost answer); with
/// another key, `TOKEN_USED`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub token: String,
    pub csr_pem: String,
}

/// What an issued certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertUsage {
    Client,
    Server,
    /// A cluster member's (listed only; issued when a node joins).
    Node,
}

/// `CERT_ISSUE`: names come from the CSR's subject CN and SAN DNS/IP entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertIssueRequest {
    pub csr_pem: String,
    pub usage: CertUsage,
    /// Default: the server's configured lifetime (24 h); at most 90 days.
    #[serde(default)]
    pub lifetime_hours: Option<u32>,
}

/// `CERT_RENEW`: same key, names and lifetime, new serial, valid from now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertRenewRequest {
    pub certificate_pem: String,
}

/// `CERT_REVOKE`. `reason`: one of [`REVOCATION_REASONS`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertRevokeRequest {
    pub serial: String,
    #[serde(default)]
    pub reason: Option<String>,
}

/// The reasons `CERT_REVOKE` accepts (RFC 5280 §5.3.1 names, snake case).
pub const REVOCATION_REASONS: [&str; 7] = [
    "unspecified",
    "key_compromise",
    "ca_compromise",
    "affiliation_changed",
    "superseded",
    "cessation_of_operation",
    "privilege_withdrawn",
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    pub serial: String,
    /// Unix seconds.
    pub revoked_at: u64,
}

/// `CERT_LIST`: `filter` is `all` (default), `valid` (now, not revoked),
/// `revoked` or `name:<name>`; pages of up to 1000 in serial order after
/// `after`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertListRequest {
    #[serde(default = "filter_all")]
    pub filter: String,
    #[serde(default)]
    pub after: Option<String>,
}

fn filter_all() -> String {
    "all".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateInfo {
    pub serial: String,
    pub subject: String,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<String>,
    pub usage: CertUsage,
    /// Unix seconds.
    pub not_before: u64,
    pub not_after: u64,
    pub leaf_index: u64,
    pub renewed_from: Option<String>,
    /// Unix seconds; `null` when not revoked.
    pub revoked_at: Option<u64>,
    pub revocation_reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertList {
    pub certificates: Vec<CertificateInfo>,
    /// Pass as `after` for the next page; `null` when this was the last.
    pub next: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaRoot {
    pub root_pem: String,
    pub intermediate_pem: String,
}

/// A signed tree head (RFC 6962 §3.5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sth {
    pub tree_size: u64,
    /// Unix milliseconds.
    pub timestamp: u64,
    /// base64, 32 bytes.
    pub root_hash: String,
    /// base64 of the TLS `DigitallySigned` struct: signature scheme (u16),
    /// signature length (u16), signature over the `TreeHeadSignature`.
    pub signature: String,
    /// base64, 32 bytes: SHA-256 of the log key's SubjectPublicKeyInfo.
    pub log_id: String,
}

/// An inclusion proof (audit path) of one log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proof {
    pub leaf_index: u64,
    pub tree_size: u64,
    /// The entry's timestamp (Unix ms), part of its `MerkleTreeLeaf`.
    pub timestamp: u64,
    pub leaf_hash: String,
    pub root_hash: String,
    pub audit_path: Vec<String>,
}

/// `CT_PROOF`: exactly one of `leaf_hash` (base64) and `certificate_pem`;
/// the proof is for the tree of `tree_size` (default: the latest tree head).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CtProofRequest {
    #[serde(default)]
    pub leaf_hash: Option<String>,
    #[serde(default)]
    pub certificate_pem: Option<String>,
    #[serde(default)]
    pub tree_size: Option<u64>,
}

/// `CT_CONSISTENCY`: 1 <= `old_size` <= `new_size` <= the log's size, and
/// `new_size` the size of a tree head the log signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CtConsistencyRequest {
    pub old_size: u64,
    pub new_size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consistency {
    pub old_size: u64,
    pub new_size: u64,
    pub proof: Vec<String>,
    /// The tree head of `new_size`.
    pub new_sth: Sth,
}

/// `CT_ENTRIES`: entries `start..end` (end exclusive), at most
/// [`MAX_ENTRIES_PER_REQUEST`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CtEntriesRequest {
    pub start: u64,
    pub end: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub leaf_index: u64,
    /// base64 of the RFC 6962 `MerkleTreeLeaf`.
    pub leaf_input: String,
    pub certificate_pem: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entries {
    pub entries: Vec<Entry>,
}

/// Algorithm names in [`CtKey::algorithm`].
pub const LOG_ALGORITHM_ED25519: &str = "ed25519";
pub const LOG_ALGORITHM_ECDSA_P256: &str = "ecdsa-p256-sha256";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtKey {
    /// [`LOG_ALGORITHM_ED25519`] or [`LOG_ALGORITHM_ECDSA_P256`].
    pub algorithm: String,
    /// base64 of the SubjectPublicKeyInfo DER.
    pub public_key: String,
    pub log_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotated {
    pub serial: String,
    /// Unix seconds.
    pub not_after: u64,
}

/// An issued certificate with everything a client needs to check, before
/// trusting it, that it is in the log ([`verify_issued`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issued {
    pub certificate_pem: String,
    /// The intermediate CA certificate, PEM.
    pub chain_pem: String,
    pub serial: String,
    /// Unix seconds.
    pub not_before: u64,
    pub not_after: u64,
    pub leaf_index: u64,
    /// The tree head that covers the certificate's entry.
    pub sth: Sth,
    /// The entry's inclusion proof in `sth`'s tree.
    pub proof: Proof,
}

/// A TLSA `3 1 1` record of a name: `_PORT._udp.NAME` pins the key whose
/// SubjectPublicKeyInfo has this SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsTlsa {
    /// The UDP port, 1..=65535.
    pub port: u16,
    /// 64 hex digits (answers use lowercase).
    pub spki_sha256: String,
}

/// `DNS_SET`: replace the AAAA and TLSA records of `name` with these (an
/// empty or absent list clears that set; both empty is refused: use
/// `DNS_REMOVE`). `name` is absolute with a trailing dot, absolute without
/// it when it ends with the apex, otherwise relative to the apex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSetRequest {
    pub name: String,
    /// IPv6 addresses in text form, at most [`crate::dns::MAX_ADDRESSES_PER_NAME`].
    #[serde(default)]
    pub addresses: Vec<String>,
    /// At most [`crate::dns::MAX_PINS_PER_NAME`].
    #[serde(default)]
    pub tlsa: Vec<DnsTlsa>,
}

/// `DNS_REMOVE`: remove `name` (as in [`DnsSetRequest`]) and its records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsRemoveRequest {
    pub name: String,
}

/// `DNS_LIST`: up to [`MAX_DNS_RECORDS_PER_PAGE`] names after `after` (an
/// absolute name, from [`DnsList::next`]), in name order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsListRequest {
    #[serde(default)]
    pub after: Option<String>,
}

/// The most names one `DNS_LIST` answer holds.
pub const MAX_DNS_RECORDS_PER_PAGE: usize = 1000;

/// A name's records as the zone holds them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsRecord {
    /// Absolute, lowercase, with its trailing dot.
    pub name: String,
    /// Sorted.
    pub addresses: Vec<String>,
    /// Sorted by port, then pin.
    pub tlsa: Vec<DnsTlsa>,
    /// Hex SHA-256 of the SPKI of the certificate that set the name; `null`
    /// when the operator or the server set it.
    pub owner: Option<String>,
}

/// The answer to `DNS_SET` (the name's records as stored) and `DNS_REMOVE`
/// (`record` is `null`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsChanged {
    pub name: String,
    pub record: Option<DnsRecord>,
    /// The zone's SOA serial after the request.
    pub serial: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsList {
    pub records: Vec<DnsRecord>,
    /// The zone's SOA serial.
    pub serial: u32,
    /// Pass as `after` for the next page; `null` when this was the last.
    pub next: Option<String>,
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Decode a hex field that must hold a 32-byte hash (64 hex digits, either
/// case); the error names the field.
pub fn hex_hash(field: &str, text: &str) -> Result<Hash, String> {
    let bad = || format!("{field} is not 64 hex digits (a SHA-256)");
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

pub fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// Decode a base64 field; the error names the field.
pub fn b64_decode(field: &str, text: &str) -> Result<Vec<u8>, String> {
    STANDARD
        .decode(text)
        .map_err(|e| format!("{field} is not valid base64: {e}"))
}

/// Decode a base64 field that must hold a 32-byte hash.
pub fn b64_hash(field: &str, text: &str) -> Result<Hash, String> {
    let bytes = b64_decode(field, text)?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("{field} is {} bytes, not a 32-byte hash", b.len()))
}

impl Sth {
    pub fn from_signed(sth: &SignedTreeHead, log_id: &Hash) -> Self {
        Self {
            tree_size: sth.tree_size,
            timestamp: sth.timestamp_ms,
            root_hash: b64(&sth.root_hash),
            signature: b64(&sth.digitally_signed()),
            log_id: b64(log_id),
        }
    }

    /// The tree head and log id this JSON form carries (signature not checked).
    pub fn decode(&self) -> Result<(SignedTreeHead, Hash), VerifyError> {
        let encoding = |detail: String| VerifyError::Encoding(detail);
        let root_hash = b64_hash("sth.root_hash", &self.root_hash).map_err(encoding)?;
        let log_id = b64_hash("sth.log_id", &self.log_id).map_err(encoding)?;
        let signed = b64_decode("sth.signature", &self.signature).map_err(encoding)?;
        let bad = || encoding("sth.signature is not a DigitallySigned struct".into());
        if signed.len() < 4 {
            return Err(bad());
        }
        let algorithm = match u16::from_be_bytes([signed[0], signed[1]]) {
            0x0807 => LogKeyAlgorithm::Ed25519,
            0x0403 => LogKeyAlgorithm::EcdsaP256Sha256,
            other => {
                return Err(encoding(format!(
                    "sth.signature uses signature scheme 0x{other:04x}, not Ed25519 or ECDSA P-256"
                )));
            }
        };
        let len = usize::from(u16::from_be_bytes([signed[2], signed[3]]));
        if signed.len() != 4 + len {
            return Err(bad());
        }
        let sth = SignedTreeHead {
            tree_size: self.tree_size,
            timestamp_ms: self.timestamp,
            root_hash,
            signature: signed[4..].to_vec(),
            algorithm,
        };
        Ok((sth, log_id))
    }
}

/// A log's public key as a client holds it (from `CT_KEY` or configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPublicKey {
    pub algorithm: LogKeyAlgorithm,
    /// The raw key (32-byte Ed25519 key or 65-byte uncompressed P-256 point).
    pub raw: Vec<u8>,
}

impl LogPublicKey {
    /// From a SubjectPublicKeyInfo DER of an Ed25519 or P-256 key.
    pub fn from_spki(spki: &[u8]) -> Result<Self, VerifyError> {
        for (prefix, algorithm, len) in [
            (ED25519_SPKI_PREFIX, LogKeyAlgorithm::Ed25519, 32),
            (P256_SPKI_PREFIX, LogKeyAlgorithm::EcdsaP256Sha256, 65),
        ] {
            if let Some(raw) = spki.strip_prefix(prefix)
                && raw.len() == len
            {
                return Ok(Self {
                    algorithm,
                    raw: raw.to_vec(),
                });
            }
        }
        Err(VerifyError::LogKey)
    }

    /// From a `CT_KEY` answer: the key, checked against its log id.
    pub fn from_ct_key(key: &CtKey) -> Result<Self, VerifyError> {
        let spki = b64_decode("public_key", &key.public_key).map_err(VerifyError::Encoding)?;
        let this = Self::from_spki(&spki)?;
        let log_id = b64_hash("log_id", &key.log_id).map_err(VerifyError::Encoding)?;
        if this.log_id() != log_id {
            return Err(VerifyError::WrongLog);
        }
        Ok(this)
    }

    pub fn spki(&self) -> Vec<u8> {
        let prefix = match self.algorithm {
            LogKeyAlgorithm::Ed25519 => ED25519_SPKI_PREFIX,
            LogKeyAlgorithm::EcdsaP256Sha256 => P256_SPKI_PREFIX,
        };
        [prefix, &self.raw].concat()
    }

    /// RFC 6962 §3.2: SHA-256 of the SubjectPublicKeyInfo.
    pub fn log_id(&self) -> Hash {
        let mut out = [0u8; 32];
        out.copy_from_slice(digest(&SHA256, &self.spki()).as_ref());
        out
    }
}

/// Why a client does not trust what the server sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the answer is malformed: {0}")]
    Encoding(String),
    #[error("the log key is not an Ed25519 or ECDSA P-256 SubjectPublicKeyInfo")]
    LogKey,
    #[error("the tree head was signed by another log (its log id is not the key's)")]
    WrongLog,
    #[error("the tree head: {0}")]
    Sth(ct::VerifyError),
    #[error("the inclusion proof does not match the tree head: {0}")]
    ProofMismatch(&'static str),
    #[error(
        "the leaf hash recomputed from the certificate differs from the proof's: \
         the certificate is not the logged one"
    )]
    LeafHashMismatch,
    #[error("the proof: {0}")]
    Proof(ct::VerifyError),
    #[error("the certificate chain: {0}")]
    Chain(String),
}

fn pem_cert(field: &str, pem: &str) -> Result<Vec<u8>, VerifyError> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|d| d.to_vec())
        .map_err(|e| VerifyError::Encoding(format!("{field} is not a PEM certificate: {e}")))
}

fn parse_cert<'a>(what: &str, der: &'a [u8]) -> Result<X509Certificate<'a>, VerifyError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        _ => Err(VerifyError::Chain(format!(
            "{what} is not an X.509 certificate"
        ))),
    }
}

/// `child` was signed by `parent`, whose subject is `child`'s issuer.
fn check_signed_by(
    child: &X509Certificate<'_>,
    parent: &X509Certificate<'_>,
    what: &str,
) -> Result<(), VerifyError> {
    if child.issuer().as_raw() != parent.subject().as_raw()
        || child.verify_signature(Some(parent.public_key())).is_err()
    {
        return Err(VerifyError::Chain(what.into()));
    }
    Ok(())
}

/// Check an `Issued` answer before trusting its certificate: the
/// certificate chains (by signature) to `root_der` through `chain_pem`
/// and carries `serial`; the tree head is signed by the log key; and the
/// certificate, as an RFC 6962 x509 `MerkleTreeLeaf` with the proof's
/// timestamp, is leaf `leaf_index` of that tree (checked with the
/// client-side verifier of `ct::verify`). Validity times are not checked
/// here (no clock); the TLS stack checks them on use.
pub fn verify_issued(
    issued: &Issued,
    log_public_key: &LogPublicKey,
    root_der: &[u8],
) -> Result<(), VerifyError> {
    let cert_der = pem_cert("certificate_pem", &issued.certificate_pem)?;
    let intermediate_der = pem_cert("chain_pem", &issued.chain_pem)?;
    let cert = parse_cert("certificate_pem", &cert_der)?;
    let intermediate = parse_cert("chain_pem", &intermediate_der)?;
    let root = parse_cert("the root", root_der)?;
    check_signed_by(
        &intermediate,
        &root,
        "the intermediate is not signed by the root",
    )?;
    check_signed_by(
        &cert,
        &intermediate,
        "the certificate is not signed by the intermediate",
    )?;
    let serial = hex(cert.raw_serial());
    if serial != issued.serial {
        return Err(VerifyError::Chain(format!(
            "the certificate's serial is {serial}, not {}",
            issued.serial
        )));
    }

    let sth = check_sth(&issued.sth, log_public_key)?;
    let proof = &issued.proof;
    if proof.tree_size != sth.tree_size {
        return Err(VerifyError::ProofMismatch("its tree size differs"));
    }
    if proof.leaf_index != issued.leaf_index {
        return Err(VerifyError::ProofMismatch("its leaf index differs"));
    }
    let root_hash = b64_hash("proof.root_hash", &proof.root_hash).map_err(VerifyError::Encoding)?;
    if root_hash != sth.root_hash {
        return Err(VerifyError::ProofMismatch("its root hash differs"));
    }
    let leaf = encode_x509_leaf(proof.timestamp, &cert_der, &[])
        .map_err(|e| VerifyError::Encoding(e.to_string()))?;
    let hash = leaf_hash(&leaf);
    let claimed = b64_hash("proof.leaf_hash", &proof.leaf_hash).map_err(VerifyError::Encoding)?;
    if hash != claimed {
        return Err(VerifyError::LeafHashMismatch);
    }
    let path = decode_path("proof.audit_path", &proof.audit_path)?;
    ct::verify_inclusion(
        &hash,
        proof.leaf_index,
        sth.tree_size,
        &path,
        &sth.root_hash,
    )
    .map_err(VerifyError::Proof)
}

/// Check a proof (from `CT_PROOF`) of `leaf_hash` against a tree head the
/// client has already checked with [`check_sth`].
pub fn verify_proof(
    proof: &Proof,
    leaf_hash: &Hash,
    sth: &SignedTreeHead,
) -> Result<(), VerifyError> {
    if proof.tree_size != sth.tree_size {
        return Err(VerifyError::ProofMismatch("its tree size differs"));
    }
    let root_hash = b64_hash("proof.root_hash", &proof.root_hash).map_err(VerifyError::Encoding)?;
    if root_hash != sth.root_hash {
        return Err(VerifyError::ProofMismatch("its root hash differs"));
    }
    let path = decode_path("proof.audit_path", &proof.audit_path)?;
    ct::verify_inclusion(
        leaf_hash,
        proof.leaf_index,
        sth.tree_size,
        &path,
        &sth.root_hash,
    )
    .map_err(VerifyError::Proof)
}

/// Decode a tree head and check that `key` signed it.
pub fn check_sth(sth: &Sth, key: &LogPublicKey) -> Result<SignedTreeHead, VerifyError> {
    let (sth, log_id) = sth.decode()?;
    if log_id != key.log_id() {
        return Err(VerifyError::WrongLog);
    }
    verify_sth(&sth, &key.raw, key.algorithm).map_err(VerifyError::Sth)?;
    Ok(sth)
}

/// Check that the log of `key` grew from `old` to `new` by appending only:
/// both tree heads are signed by `key`, and `proof` (base64 hashes, from
/// `CT_CONSISTENCY`) proves the old tree a prefix of the new one.
pub fn verify_consistency(
    old: &Sth,
    new: &Sth,
    proof: &[String],
    key: &LogPublicKey,
) -> Result<(), VerifyError> {
    let old = check_sth(old, key)?;
    let new = check_sth(new, key)?;
    let path = decode_path("proof", proof)?;
    ct::verify_consistency(
        old.tree_size,
        new.tree_size,
        &old.root_hash,
        &new.root_hash,
        &path,
    )
    .map_err(VerifyError::Proof)
}

fn decode_path(field: &str, path: &[String]) -> Result<Vec<Hash>, VerifyError> {
    // A proof in a tree of at most 2^64 leaves has at most 2 * 64 hashes.
    if path.len() > 128 {
        return Err(VerifyError::Encoding(format!(
            "{field} has {} hashes",
            path.len()
        )));
    }
    path.iter()
        .map(|h| b64_hash(field, h).map_err(VerifyError::Encoding))
        .collect()
}
