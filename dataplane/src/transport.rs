//! QUIC transport and TLS settings shared by server and client workers.

use quinn_proto::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
use quinn_proto::crypto::rustls::QuicClientConfig;
use quinn_proto::{IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use std::sync::Arc;
use std::time::Duration;

/// Congestion controllers: quinn-proto's three and our BBRv3.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CongestionControl {
    Cubic,
    /// quinn-proto's BBR (version 1).
    Bbr,
    Newreno,
    /// The design document's name for a BBRv2-family controller: our
    /// BBRv3 (its successor), the same as `Bbr3`.
    Bbr2,
    /// BBRv3 (`crate::congestion`).
    Bbr3,
}

/// Connection-level receive window of a peer the server does not trust yet
/// (`doq`, enrolling or unadmitted `stoq/1`): it bounds what the transport
/// buffers for it, in order or not (RFC 9000 §4.1 counts the highest offset
/// of every stream). One whole request still fits.
pub const UNTRUSTED_RECEIVE_WINDOW_BYTES: u64 = 128 * 1024;
const _: () = assert!(
    UNTRUSTED_RECEIVE_WINDOW_BYTES as usize
        >= crate::protocols::stoq::HEADER_LEN + crate::protocols::stoq::REQUEST_PAYLOAD_MAX
);
/// Bytes the server keeps in flight for a peer it does not trust yet:
/// written and not yet acknowledged. quinn-proto holds every sent byte
/// until the peer acknowledges it, so a peer that grants a large window and
/// never acknowledges would otherwise pin the whole configured send window
/// (64 MiB) of answers. Raised to the configured window once trusted.
pub const UNTRUSTED_SEND_WINDOW_BYTES: u64 = 256 * 1024;
/// Concurrent bidirectional streams of a peer the server does not trust yet
/// (`stoq/1` before admission).
pub const UNTRUSTED_STREAMS_BIDI_MAX: u32 = 16;
/// Concurrent bidirectional streams of a DNS-over-QUIC peer, which is
/// never trusted. One query per stream, and a stream's credit comes back
/// only once the peer has acknowledged its answer: a peer that received
/// its answers in one packet may hold that acknowledgement for its
/// max_ack_delay (25 ms by default) while it has no credit left to send
/// anything else, so a peer with as many queries in flight as its limit
/// waits that long every round (answers from the system resolver came
/// back at 1 300/s instead of 47 000/s at 16 in flight against a limit of
/// 16). The limit grows to twice what the peer keeps open, so up to 32 in
/// flight never wait. What the peer can make the server hold is still
/// bounded: queries by the untrusted receive window and doq's
/// unfinished-query bound, answers by the untrusted send window and doq's
/// unread-answer bound; the extra streams' state is about 0.4 KB each.
pub const DOQ_STREAMS_BIDI_MAX: u32 = 64;
/// Concurrent bidirectional streams every connection starts with; the
/// server doubles a connection's limit as its peer uses it (up to
/// [`UNTRUSTED_STREAMS_BIDI_MAX`], or `streams_bidi_max` once trusted).
/// quinn-proto keeps a hash-map entry per stream the peer may open, in
/// both directions' maps: 7 fit in 8 buckets, 16 take 32 (about 1 KB more
/// in every held connection).
pub const INITIAL_STREAMS_BIDI: u32 = 7;

/// Knobs of the QUIC transport (see `[stoq_transport]` in the config).
#[derive(Clone, Debug)]
pub struct TransportSettings {
    pub congestion: CongestionControl,
    pub stream_receive_window_bytes: u64,
    pub receive_window_bytes: u64,
    pub send_window_bytes: u64,
    pub streams_bidi_max: u32,
    pub idle_timeout: Duration,
    pub keep_alive: Option<Duration>,
    pub initial_mtu: u16,
    /// The largest UDP payload MTU discovery probes for (its upper bound):
    /// 1452 fits a 1500-byte Ethernet MTU under IPv6; 8952 fits jumbo
    /// frames (MTU 9000).
    pub max_udp_payload: u16,
    pub gso: bool,
}

impl Default for TransportSettings {
    fn default() -> Self {
        Self {
            congestion: CongestionControl::Cubic,
            stream_receive_window_bytes: 16 << 20,
            receive_window_bytes: 64 << 20,
            send_window_bytes: 64 << 20,
            streams_bidi_max: 100,
            idle_timeout: Duration::from_secs(30),
            keep_alive: None,
            initial_mtu: 1200,
            max_udp_payload: crate::worker::UDP_PAYLOAD_MAX as u16,
            gso: true,
        }
    }
}

impl TransportSettings {
    /// The largest UDP payload connections may grow to (MTU discovery's
    /// ceiling, or the initial MTU if higher).
    pub fn udp_payload_max(&self) -> usize {
        usize::from(self.initial_mtu.max(self.max_udp_payload))
    }

    /// The server's transport: [`Self::build`] with the initial
    /// connection window cut to what an untrusted peer gets and
    /// [`INITIAL_STREAMS_BIDI`] streams. The server raises them per
    /// connection as it trusts and uses it (`server::ServerService::widen`).
    pub fn build_server(&self) -> TransportConfig {
        let mut t = self.build();
        t.receive_window(
            VarInt::from_u64(
                self.receive_window_bytes
                    .min(UNTRUSTED_RECEIVE_WINDOW_BYTES),
            )
            .unwrap_or(VarInt::MAX),
        )
        .send_window(self.send_window_bytes.min(UNTRUSTED_SEND_WINDOW_BYTES))
        .max_concurrent_bidi_streams(VarInt::from_u32(
            self.streams_bidi_max.min(INITIAL_STREAMS_BIDI),
        ));
        t
    }

    /// quinn-proto's MTU discovery, probing up to `max_udp_payload`.
    fn mtu_discovery(&self) -> MtuDiscoveryConfig {
        let mut mtu = MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_udp_payload.max(1200));
        mtu
    }

    /// The client's transport (and the base of the server's).
    pub fn build(&self) -> TransportConfig {
        let mut t = TransportConfig::default();
        t.stream_receive_window(
            VarInt::from_u64(self.stream_receive_window_bytes).unwrap_or(VarInt::MAX),
        )
        .receive_window(VarInt::from_u64(self.receive_window_bytes).unwrap_or(VarInt::MAX))
        .send_window(self.send_window_bytes)
        .max_concurrent_bidi_streams(VarInt::from_u32(self.streams_bidi_max))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .max_idle_timeout(IdleTimeout::try_from(self.idle_timeout).ok())
        .keep_alive_interval(self.keep_alive)
        .initial_mtu(self.initial_mtu.max(1200))
        .mtu_discovery_config(Some(self.mtu_discovery()))
        .enable_segmentation_offload(self.gso);
        match self.congestion {
            CongestionControl::Cubic => {
                t.congestion_controller_factory(Arc::new(CubicConfig::default()))
            }
            CongestionControl::Bbr => {
                t.congestion_controller_factory(Arc::new(BbrConfig::default()))
            }
            CongestionControl::Newreno => {
                t.congestion_controller_factory(Arc::new(NewRenoConfig::default()))
            }
            CongestionControl::Bbr2 | CongestionControl::Bbr3 => {
                t.congestion_controller_factory(Arc::new(crate::congestion::Bbr3Config::default()))
            }
        };
        t
    }
}

/// What the server presents in TLS, and how it checks clients.
#[derive(Clone)]
pub struct ServerIdentity {
    /// The server's certificate, swappable for rotation.
    pub certificates: Arc<crate::trust::CertificateStore>,
    /// Client certificates are checked with it when given (`None`: no
    /// client certificate is asked for).
    pub client_verifier: Option<Arc<dyn ClientCertVerifier>>,
    pub resumption: Resumption,
}

/// A client's certificate chain and key, presented for mutual TLS.
#[derive(Debug)]
pub struct ClientIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for ClientIdentity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// How TLS sessions resume (docs/PROTOCOL.md, "Resumption and 0-RTT").
#[derive(Clone, Debug)]
pub enum Resumption {
    /// Stateless tickets sealed with a key the control plane owns and
    /// rotates; no 0-RTT.
    Tickets(Arc<dyn rustls::server::ProducesTickets>),
    /// Single-use session IDs in a bounded cache shared by all workers:
    /// a ticket is taken on first use, so a replayed ClientHello gets no
    /// early data. Enables 0-RTT.
    SingleUseWithZeroRtt(Arc<dyn rustls::server::StoresServerSessions>),
}

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("the TLS configuration cannot carry QUIC: {0}")]
    NoQuicSuite(String),
    #[error("the server-certificate verifier cannot be built: {0}")]
    Verifier(String),
}

/// The TLS provider of every QUIC connection, server and clients: aws-lc-rs,
/// whose X25519 costs about half of ring's (32 against 60 µs for a key pair
/// and its agreement on this project's machines, a third of a full
/// handshake's server CPU with ring). TLS 1.3 suites ordered AES-128-GCM,
/// ChaCha20, AES-256-GCM: AES-128 does 10 rounds instead of 14 on every
/// packet and its key schedule hashes with SHA-256 instead of SHA-384, for
/// the same 128-bit security level QUIC's header protection has anyway.
/// The quinn baseline (`benches/`) runs this provider too.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    provider_in_order(false)
}

/// aws-lc-rs's TLS 1.3 suites, AES-128-GCM first (or ChaCha20 first), and
/// the key exchange groups ring offered: X25519, P-256, P-384. A server
/// takes the first group of the client's list that it supports, so the
/// post-quantum hybrid (X25519MLKEM768) is left out: clients that list it
/// first would get its larger first flight and cost, a change not measured
/// here.
fn provider_in_order(chacha_first: bool) -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::aws_lc_rs::{cipher_suite, kx_group};
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    if chacha_first {
        provider.cipher_suites.swap(0, 1);
    }
    provider.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];
    Arc::new(provider)
}

/// The server's QUIC crypto: TLS 1.3 only, our ALPNs, tickets, 0-RTT, and
/// the server's sessions (`server_tls`): AES-128-GCM, or ChaCha20 for
/// clients that list it first; TLS state dropped after the handshake.
/// With `aes_first` false every client gets ChaCha20 first.
pub fn server_crypto(
    identity: &ServerIdentity,
    alpns: &[&[u8]],
    aes_first: bool,
) -> Result<Arc<crate::server_tls::ServerTls>, TlsSetupError> {
    let tls = crate::server_tls::ServerTls::new(
        server_tls(identity, alpns, !aes_first)?,
        server_tls(identity, alpns, true)?,
    )
    .map_err(|e| TlsSetupError::NoQuicSuite(e.to_string()))?;
    Ok(Arc::new(tls))
}

/// One server TLS config, its suites in `provider_in_order`'s order. Both
/// share the certificates, client verifier and session store.
fn server_tls(
    identity: &ServerIdentity,
    alpns: &[&[u8]],
    chacha_first: bool,
) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider_in_order(chacha_first))
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match &identity.client_verifier {
        Some(verifier) => builder.with_client_cert_verifier(verifier.clone()),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(identity.certificates.clone());
    // The server picks the suite in its own order, not the client's
    // preference: many clients list AES-256 first, which costs SHA-384 in
    // every handshake and 14 AES rounds per packet.
    config.ignore_client_order = true;
    config.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    // One ticket per handshake, full or resumed: each connection leaves
    // the client one for its next, and the single-use store holds one entry
    // per connection instead of two.
    config.send_tls13_tickets = 1;
    match &identity.resumption {
        Resumption::Tickets(ticketer) => config.ticketer = ticketer.clone(),
        Resumption::SingleUseWithZeroRtt(cache) => {
            config.session_storage = cache.clone();
            // RFC 9001 §4.6.1: a QUIC server signals 0-RTT with
            // max_early_data_size 0xffffffff; stream limits bound the data.
            config.max_early_data_size = u32::MAX;
        }
    }
    Ok(Arc::new(config))
}

/// How a client decides to trust the server.
#[derive(Clone, Debug)]
pub enum ServerTrust {
    /// Certificates chaining to these roots (PEM-decoded DER).
    Roots(Vec<CertificateDer<'static>>),
    /// Benchmarks only: check the TLS 1.3 handshake signature against the
    /// presented certificate's key, but neither its chain nor its name (what
    /// the quinn baseline client does, so both load generators spend the
    /// same crypto per handshake).
    HandshakeSignatureOnly,
    /// Chain to these roots *and* a key whose SubjectPublicKeyInfo hashes
    /// (SHA-256) to one of the pins DNS TLSA `3 1 1` records published (a
    /// cluster's name has one per member).
    RootsAndPin {
        roots: Vec<CertificateDer<'static>>,
        pins: Vec<[u8; 32]>,
    },
    /// Chain to the issuing CA certificate the server presents whose key
    /// hashes (SHA-256 of its SubjectPublicKeyInfo) to this pin: how a node
    /// that joins a cluster, holding only its join token, knows it reached
    /// the cluster's CA.
    IssuerPin([u8; 32]),
}

/// No certificate the server presented is the pinned issuer.
#[derive(Debug, thiserror::Error)]
#[error("the server's chain has no issuer with the key the join token pins")]
pub struct IssuerMismatch;

/// The verifier behind `ServerTrust::IssuerPin`: the pinned issuer the
/// server presents is the one trust anchor of the usual WebPKI checks.
#[derive(Debug)]
struct IssuerPinned {
    spki_sha256: [u8; 32],
    /// The handshake signature checks, as every verifier makes them.
    signatures: SignatureOnly,
}

impl IssuerPinned {
    /// The WebPKI verifier anchored at the presented issuer the pin names.
    fn anchored(
        &self,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<Arc<rustls::client::WebPkiServerVerifier>, rustls::Error> {
        let issuer = intermediates
            .iter()
            .find(|der| crate::trust::spki_sha256(der.as_ref()) == Some(self.spki_sha256))
            .ok_or_else(|| {
                rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
                    rustls::OtherError(Arc::new(IssuerMismatch)),
                ))
            })?;
        let roots = root_store(&[issuer.clone().into_owned()])?;
        rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.signatures.0.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))
    }
}

impl rustls::client::danger::ServerCertVerifier for IssuerPinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.anchored(intermediates)?
            .verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.signatures.supported_verify_schemes()
    }
}

/// The server's key is not the one its DNS name pins.
#[derive(Debug, thiserror::Error)]
#[error("the server's key does not match the TLSA 3 1 1 pin its DNS name publishes")]
pub struct PinMismatch;

/// The verifier behind `ServerTrust::RootsAndPin`: the usual WebPKI checks,
/// then the pin.
#[derive(Debug)]
struct PinnedVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    pins: Vec<[u8; 32]>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified =
            self.inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(end_entity.as_ref()).map_err(|_| {
                rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
            })?;
        let digest = ring::digest::digest(&ring::digest::SHA256, parsed.public_key().raw);
        if !self.pins.iter().any(|pin| digest.as_ref() == pin) {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(PinMismatch))),
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The verifier behind `ServerTrust::HandshakeSignatureOnly`.
#[derive(Debug)]
struct SignatureOnly(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for SignatureOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A root store of `roots`; one that is not a usable CA certificate fails
/// the whole set.
fn root_store(roots: &[CertificateDer<'static>]) -> Result<rustls::RootCertStore, rustls::Error> {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add(root.clone())?;
    }
    Ok(store)
}

/// rustls client config for QUIC. With `resume`, sessions are remembered
/// and later connections resume and may send 0-RTT; without, every
/// connection is a full handshake (what handshake benchmarks measure).
pub fn client_crypto(
    trust: &ServerTrust,
    identity: Option<&ClientIdentity>,
    alpn: &[u8],
    resume: bool,
) -> Result<Arc<QuicClientConfig>, TlsSetupError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match trust {
        ServerTrust::Roots(roots) => builder.with_root_certificates(root_store(roots)?),
        ServerTrust::HandshakeSignatureOnly => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SignatureOnly(provider()))),
        ServerTrust::RootsAndPin { roots, pins } => {
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(root_store(roots)?),
                provider(),
            )
            .build()
            .map_err(|e| TlsSetupError::Verifier(e.to_string()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                    inner,
                    pins: pins.clone(),
                }))
        }
        ServerTrust::IssuerPin(spki_sha256) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(IssuerPinned {
                spki_sha256: *spki_sha256,
                signatures: SignatureOnly(provider()),
            })),
    };
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(id.chain.clone(), id.key.clone_key())?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    if resume {
        config.enable_early_data = true;
    } else {
        config.resumption = rustls::client::Resumption::disabled();
    }
    QuicClientConfig::try_from(config)
        .map(Arc::new)
        .map_err(|e| TlsSetupError::NoQuicSuite(e.to_string()))
}
