//! TLS material and rustls configurations for both sides.

use std::net::IpAddr;
use std::sync::Arc;

use anyhow::Result;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::rustls::{
    self, DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
};

use crate::ALPN;

/// A freshly generated self-signed certificate (ECDSA P-256, rcgen's default).
pub struct SelfSigned {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
    pub pem: String,
}

/// Certificate for "localhost" plus the listen IP (unless it is the wildcard,
/// which is no useful name).
pub fn self_signed(ip: IpAddr) -> Result<SelfSigned> {
    let mut names = vec!["localhost".to_string()];
    if !ip.is_unspecified() {
        names.push(ip.to_string());
    }
    let rcgen::CertifiedKey { cert, key_pair } = rcgen::generate_simple_self_signed(names)?;
    Ok(SelfSigned {
        pem: cert.pem(),
        cert: cert.der().clone(),
        key: PrivatePkcs8KeyDer::from(key_pair.serialize_der()).into(),
    })
}

/// Our server's provider (`dataplane::transport::provider`): aws-lc-rs,
/// quinn's fastest (its X25519 costs about half ring's), with the same
/// suites and key exchange groups in the same order, so handshake figures
/// compare the servers and not their crypto.
fn provider() -> Arc<CryptoProvider> {
    dataplane::transport::provider()
}

/// TLS 1.3 only (QUIC requires it). Without `tickets` no session tickets
/// are issued, the cheapest full handshake. With `tickets`, rustls' default
/// resumption (two tickets per handshake, single-use sessions in its
/// in-memory store) and 0-RTT accepted on resumption, so a client can
/// resume and can tell that it did.
pub fn server_crypto(identity: SelfSigned, tickets: bool) -> Result<QuicServerConfig> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![identity.cert], identity.key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // The suite in the server's order (AES-128-GCM first), as ours picks
    // it, whatever order the client lists.
    tls.ignore_client_order = true;
    if tickets {
        tls.send_tls13_tickets = 2;
        // RFC 9001 §4.6.1: QUIC servers signal 0-RTT with 0xffffffff.
        tls.max_early_data_size = u32::MAX;
    } else {
        tls.send_tls13_tickets = 0;
    }
    Ok(QuicServerConfig::try_from(tls)?)
}

/// Resumption and 0-RTT are disabled so every connection costs a full
/// handshake, which is what the handshake figures are meant to measure.
pub fn client_crypto() -> Result<QuicClientConfig> {
    let provider = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.resumption = rustls::client::Resumption::disabled();
    tls.enable_early_data = false;
    Ok(QuicClientConfig::try_from(tls)?)
}

/// INSECURE, benchmark only: accepts any server certificate and name, since the
/// server's certificate is self-signed and generated at start. The handshake
/// signature is still verified so that the client does the same cryptographic
/// work per handshake as a real client would.
#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
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
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
