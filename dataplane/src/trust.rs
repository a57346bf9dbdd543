//! Certificates in the handshake, from snapshots the control plane swaps.
//!
//! Workers never ask the control plane anything during a handshake: the
//! client-certificate check reads the current [`TrustSnapshot`] (roots and
//! revoked serials) and the server certificate comes from the current
//! [`CertificateStore`] entry, both behind an `ArcSwap` (one atomic load per
//! handshake, no lock). The control plane builds a new snapshot and swaps
//! it in: the next handshake sees it; connections already open are checked
//! against it by their worker (`generation` tells a worker something
//! changed).

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::sync::Arc;

/// Roots clients must chain to, and the serials no longer accepted.
pub struct TrustSnapshot {
    /// Changes whenever roots or revocations change.
    pub generation: u64,
    /// Revoked serials (DER INTEGER content bytes), sorted.
    revoked: Vec<Vec<u8>>,
    /// The chain check for these roots, built once per snapshot.
    verifier: Arc<dyn ClientCertVerifier>,
}

impl std::fmt::Debug for TrustSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustSnapshot")
            .field("generation", &self.generation)
            .field("revoked", &self.revoked.len())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("a trust root is unusable: {0}")]
    Root(String),
    #[error("the client-certificate verifier cannot be built: {0}")]
    Verifier(String),
}

impl TrustSnapshot {
    /// Clients must chain to `roots` (intermediates come from the client's
    /// handshake); `revoked` serials are refused. A client may also connect
    /// without a certificate: what it may then do is the ALPN handler's
    /// decision (enrollment only, or public DNS).
    pub fn new(
        generation: u64,
        roots: &[CertificateDer<'static>],
        mut revoked: Vec<Vec<u8>>,
    ) -> Result<Self, TrustError> {
        let mut store = RootCertStore::empty();
        for root in roots {
            store
                .add(root.clone())
                .map_err(|e| TrustError::Root(e.to_string()))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(store),
            crate::transport::provider(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| TrustError::Verifier(e.to_string()))?;
        revoked.sort();
        revoked.dedup();
        Ok(Self {
            generation,
            revoked,
            verifier,
        })
    }

    pub fn is_revoked(&self, serial: &[u8]) -> bool {
        self.revoked
            .binary_search_by(|s| s.as_slice().cmp(serial))
            .is_ok()
    }
}

/// The current trust snapshot, swapped by the control plane.
pub struct TrustStore {
    current: ArcSwap<TrustSnapshot>,
}

impl TrustStore {
    pub fn new(initial: TrustSnapshot) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwap::from_pointee(initial),
        })
    }

    pub fn load(&self) -> Arc<TrustSnapshot> {
        self.current.load_full()
    }

    /// Cheap check for workers, once per loop iteration.
    pub fn generation(&self) -> u64 {
        self.current.load().generation
    }

    pub fn swap(&self, next: TrustSnapshot) {
        self.current.store(Arc::new(next));
    }
}

impl std::fmt::Debug for TrustStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustStore")
            .field("current", &*self.current.load())
            .finish()
    }
}

/// The serial number of a certificate (DER INTEGER content bytes, as the
/// control plane records them), or None if it does not parse.
pub fn serial_of(cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.tbs_certificate.raw_serial().to_vec())
}

/// A client certificate as a worker keeps it for the connection's life:
/// what the revocation and validity checks need, parsed once.
#[derive(Clone, Debug)]
pub struct PeerCertificate {
    pub der: CertificateDer<'static>,
    /// DER INTEGER content bytes, as the control plane records them.
    pub serial: Vec<u8>,
    /// The subject CN is [`OPERATOR_COMMON_NAME`] (a name the CA issues
    /// to the operator only).
    pub operator: bool,
    /// The subject CN names a member of the cluster
    /// ([`NODE_COMMON_NAME_PREFIX`], a name the CA issues only to a node
    /// that joined with a join token).
    pub node: bool,
    not_before_unix_s: i64,
    not_after_unix_s: i64,
}

/// The subject common name of the operator's certificate (the authority
/// reserves it; `src/` asserts it equals the authority's constant).
pub const OPERATOR_COMMON_NAME: &str = "operator";

/// SHA-256 of a certificate's SubjectPublicKeyInfo (DER in, `None` when it
/// does not parse): the TLSA `3 1 1` pin of its key.
pub fn spki_sha256(der: &[u8]) -> Option<[u8; 32]> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.public_key().raw);
    digest.as_ref().try_into().ok()
}

/// How the subject common name of a cluster member's certificate starts
/// (`cluster-node.NAME`); the authority reserves every name with it.
pub const NODE_COMMON_NAME_PREFIX: &str = "cluster-node.";

/// The member name a certificate's subject CN gives, if it is a cluster
/// member's ([`NODE_COMMON_NAME_PREFIX`]). The caller must have checked
/// that it chains to this CA.
pub fn node_name<'a>(cert: &'a x509_parser::certificate::X509Certificate<'_>) -> Option<&'a str> {
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    cn.strip_prefix(NODE_COMMON_NAME_PREFIX)
        .filter(|name| !name.is_empty())
}

/// Why a connection's client certificate no longer admits it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PeerRefusal {
    #[error("client certificate revoked")]
    Revoked,
    #[error("client certificate expired or not yet valid")]
    OutsideValidity,
}

/// Whether the certificate's subject CN is [`OPERATOR_COMMON_NAME`]. The
/// caller must have checked that it chains to this CA, which issues that
/// name to the operator alone.
pub fn names_operator(cert: &x509_parser::certificate::X509Certificate<'_>) -> bool {
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        == Some(OPERATOR_COMMON_NAME)
}

impl PeerCertificate {
    /// None when the certificate does not parse (the handshake's chain
    /// check parsed it already, so only a resumed session's stored
    /// certificate could get here malformed).
    pub fn parse(der: CertificateDer<'static>) -> Option<Self> {
        let (serial, operator, node, not_before_unix_s, not_after_unix_s) = {
            let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
            let validity = parsed.validity();
            let operator = names_operator(&parsed);
            (
                parsed.tbs_certificate.raw_serial().to_vec(),
                operator,
                node_name(&parsed).is_some(),
                validity.not_before.timestamp(),
                validity.not_after.timestamp(),
            )
        };
        Some(Self {
            der,
            serial,
            operator,
            node,
            not_before_unix_s,
            not_after_unix_s,
        })
    }
}

impl TrustSnapshot {
    /// Whether `peer` may still use a connection at `now`. The handshake's
    /// chain check does this for a full handshake; a resumed session (1-RTT
    /// or 0-RTT) skips it in rustls, and an open connection outlives its
    /// handshake, so workers call this on both.
    pub fn check_peer(
        &self,
        peer: &PeerCertificate,
        now: std::time::SystemTime,
    ) -> Result<(), PeerRefusal> {
        if self.is_revoked(&peer.serial) {
            return Err(PeerRefusal::Revoked);
        }
        let now = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        if now < peer.not_before_unix_s || now > peer.not_after_unix_s {
            return Err(PeerRefusal::OutsideValidity);
        }
        Ok(())
    }
}

/// rustls' client-certificate hook: the current snapshot's chain check,
/// then its revocation list.
#[derive(Debug)]
pub struct SnapshotClientVerifier {
    store: Arc<TrustStore>,
    provider: Arc<CryptoProvider>,
}

impl SnapshotClientVerifier {
    pub fn new(store: Arc<TrustStore>) -> Arc<Self> {
        Arc::new(Self {
            store,
            provider: crate::transport::provider(),
        })
    }
}

impl ClientCertVerifier for SnapshotClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        // stoq/1 without a certificate may only enroll, doq is public:
        // the handlers enforce that once the ALPN is known.
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let snapshot = self.store.current.load();
        let verified = snapshot
            .verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        let serial = serial_of(end_entity).ok_or(rustls::Error::InvalidCertificate(
            rustls::CertificateError::BadEncoding,
        ))?;
        if snapshot.is_revoked(&serial) {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The server's own certificate, swapped on rotation. Handshakes in flight
/// keep the key they started with; the next one gets the new certificate.
///
/// Beside it, phase0 may hold an [`Imported`] certificate another CA issued
/// for public names: a client that asks for one of them (SNI) gets that
/// one instead.
pub struct CertificateStore {
    current: ArcSwap<CertifiedKey>,
    imported: arc_swap::ArcSwapOption<Imported>,
}

/// A certificate chain another CA issued, with its key, for the names it
/// covers (its DNS subject alternative names).
pub struct Imported {
    names: Vec<String>,
    key: Arc<CertifiedKey>,
    /// Past it the certificate is no longer presented.
    not_after: std::time::SystemTime,
    /// `ca_mode = "external"`: also served to every client that asks for a
    /// name outside these (the embedded certificate's names, which the
    /// operator, enrollment and the CLI use); clients that ask for none
    /// (by address) get the embedded certificate.
    default_except: Option<Vec<String>>,
}

impl std::fmt::Debug for Imported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Imported")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl Imported {
    /// Refuses a key that is not the leaf's. The certificate is presented
    /// until `not_after` (the leaf's), not after.
    pub fn new(
        names: Vec<String>,
        chain: Vec<CertificateDer<'static>>,
        key: &PrivateKeyDer<'static>,
        not_after: std::time::SystemTime,
    ) -> Result<Self, rustls::Error> {
        let key = certified(chain, key)?;
        key.keys_match()?;
        Ok(Self {
            names: names.into_iter().map(|n| n.to_ascii_lowercase()).collect(),
            key: Arc::new(key),
            not_after,
            default_except: None,
        })
    }

    /// Presented to every client that asks for a name, except for
    /// `own_names` (and names they cover or that cover them).
    pub fn as_default_except(mut self, own_names: Vec<String>) -> Self {
        self.default_except = Some(own_names);
        self
    }

    /// Whether a client asking for `server_name` gets this certificate.
    fn serves(&self, server_name: &str) -> bool {
        self.covers(server_name)
            || self
                .default_except
                .as_ref()
                .is_some_and(|own| !own.iter().any(|o| names_overlap(o, server_name)))
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Whether the certificate is for `server_name`.
    pub fn covers(&self, server_name: &str) -> bool {
        self.names.iter().any(|n| name_covers(n, server_name))
    }
}

/// Whether two certificate names could name one server: equal, or one
/// covers the other (`*.example.org` and `a.example.org`).
/// Allocates nothing: it runs per handshake with `ca_mode = "external"`.
pub fn names_overlap(a: &str, b: &str) -> bool {
    fn bare(n: &str) -> &str {
        n.strip_suffix('.').unwrap_or(n)
    }
    bare(a).eq_ignore_ascii_case(bare(b)) || name_covers(a, b) || name_covers(b, a)
}

/// Whether the certificate name `pattern` covers `name` (RFC 6125 §6.4): the
/// same name without regard to case, or `*.` and exactly one more label on
/// the left (`*.example.org` covers `a.example.org`, not `example.org` nor
/// `a.b.example.org`).
pub fn name_covers(pattern: &str, name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    let pattern = pattern.strip_suffix('.').unwrap_or(pattern);
    match pattern.strip_prefix("*.") {
        Some(parent) => name.split_once('.').is_some_and(|(label, rest)| {
            !label.is_empty() && label != "*" && rest.eq_ignore_ascii_case(parent)
        }),
        None => pattern.eq_ignore_ascii_case(name),
    }
}

impl CertificateStore {
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: &PrivateKeyDer<'static>,
    ) -> Result<Arc<Self>, rustls::Error> {
        Ok(Arc::new(Self {
            current: ArcSwap::from_pointee(certified(chain, key)?),
            imported: arc_swap::ArcSwapOption::empty(),
        }))
    }

    /// Serve `imported` to clients that ask for its names (None: stop).
    pub fn set_imported(&self, imported: Option<Imported>) {
        self.imported.store(imported.map(Arc::new));
    }

    /// The names the imported certificate is served for.
    pub fn imported_names(&self) -> Vec<String> {
        self.imported
            .load()
            .as_ref()
            .map(|i| i.names.clone())
            .unwrap_or_default()
    }

    pub fn swap(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: &PrivateKeyDer<'static>,
    ) -> Result<(), rustls::Error> {
        self.current.store(Arc::new(certified(chain, key)?));
        Ok(())
    }

    /// The certificate chain handshakes present now.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.current.load().cert.clone()
    }
}

fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: &PrivateKeyDer<'static>,
) -> Result<CertifiedKey, rustls::Error> {
    let signing_key = crate::transport::provider()
        .key_provider
        .load_private_key(key.clone_key())?;
    Ok(CertifiedKey::new(chain, signing_key))
}

impl std::fmt::Debug for CertificateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateStore").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for CertificateStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = hello.server_name()
            && let Some(imported) = self.imported.load().as_ref()
            && imported.serves(name)
            && std::time::SystemTime::now() < imported.not_after
        {
            return Some(imported.key.clone());
        }
        Some(self.current.load_full())
    }
}

#[cfg(test)]
mod tests {
    use super::{name_covers, names_overlap};

    #[test]
    fn a_wildcard_covers_one_label_and_no_more() {
        assert!(name_covers("www.example.org", "WWW.Example.org"));
        assert!(name_covers("www.example.org", "www.example.org."));
        assert!(!name_covers("www.example.org", "example.org"));
        assert!(name_covers("*.example.org", "a.example.org"));
        assert!(!name_covers("*.example.org", "example.org"));
        assert!(!name_covers("*.example.org", "a.b.example.org"));
        assert!(!name_covers("*.example.org", ".example.org"));
        assert!(!name_covers("*.example.org", "*.example.org"));
        assert!(!name_covers("*.example.org", "a.example.org.evil"));
        assert!(!name_covers("a*.example.org", "ab.example.org"));
        assert!(!name_covers("*", "localhost"));
        assert!(names_overlap("*.example.org", "*.Example.org."));
        assert!(names_overlap("a.example.org", "*.example.org"));
        assert!(names_overlap("*.example.org", "a.example.org"));
        assert!(!names_overlap("*.example.org", "example.org"));
    }
}
