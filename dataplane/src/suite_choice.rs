//! The server's cipher suite rule: AES-128-GCM for everyone, except a
//! client whose first TLS 1.3 suite is ChaCha20-Poly1305, which says it has
//! no AES hardware (OpenSSL's PRIORITIZE_CHACHA rule).
//!
//! rustls picks either the server's order or the client's, nothing in
//! between, so the server keeps two TLS configs that differ only in suite
//! order and starts each connection's session on the one its ClientHello
//! asks for. The choice waits for the ClientHello's cipher list on the
//! CRYPTO stream; until then the session has produced nothing, exactly as
//! rustls itself waits for a partial ClientHello.

use std::any::Any;
use std::sync::Arc;

use quinn_proto::crypto::rustls::QuicServerConfig;
use quinn_proto::crypto::{
    self, ExportKeyingMaterialError, HeaderKey, KeyPair, Keys, PacketKey, UnsupportedVersion,
};
use quinn_proto::transport_parameters::TransportParameters;
use quinn_proto::{ConnectionId, Side, TransportError};

/// A ClientHello larger than this is handed to rustls undecided (the
/// AES-first session), which then judges it.
const CLIENT_HELLO_BUFFER_MAX: usize = 16 * 1024;

const TLS13_AES_128_GCM_SHA256: u16 = 0x1301;
const TLS13_AES_256_GCM_SHA384: u16 = 0x1302;
const TLS13_CHACHA20_POLY1305_SHA256: u16 = 0x1303;

/// The two server TLS configs; Initial keys and Retry tags are the same
/// for both (RFC 9001 fixes them to AES-128-GCM).
pub struct SuiteChoice {
    pub aes_first: Arc<QuicServerConfig>,
    pub chacha_first: Arc<QuicServerConfig>,
}

impl crypto::ServerConfig for SuiteChoice {
    fn initial_keys(
        &self,
        version: u32,
        dst_cid: &ConnectionId,
    ) -> Result<Keys, UnsupportedVersion> {
        self.aes_first.initial_keys(version, dst_cid)
    }

    fn retry_tag(&self, version: u32, orig_dst_cid: &ConnectionId, packet: &[u8]) -> [u8; 16] {
        self.aes_first.retry_tag(version, orig_dst_cid, packet)
    }

    fn start_session(
        self: Arc<Self>,
        version: u32,
        params: &TransportParameters,
    ) -> Box<dyn crypto::Session> {
        let inner = crypto::ServerConfig::start_session(self.aes_first.clone(), version, params);
        Box::new(Chosen {
            inner,
            undecided: Some(Box::new(Undecided {
                config: self,
                version,
                params: *params,
                client_hello: Vec::new(),
            })),
        })
    }
}

/// What starting the other session needs, kept until the choice.
struct Undecided {
    config: Arc<SuiteChoice>,
    version: u32,
    params: TransportParameters,
    client_hello: Vec<u8>,
}

/// A session on the config the ClientHello chose.
struct Chosen {
    inner: Box<dyn crypto::Session>,
    undecided: Option<Box<Undecided>>,
}

#[derive(Debug, PartialEq, Eq)]
enum Choice {
    /// The cipher list has not arrived whole yet.
    NotYet,
    AesFirst,
    ChachaFirst,
}

/// Reads the client's first TLS 1.3 suite from the start of a ClientHello
/// handshake message: type(1) length(3) legacy_version(2) random(32)
/// session_id<1> cipher_suites<2>. GREASE and TLS 1.2 suites are skipped.
/// Anything that is not a ClientHello goes to the default config, whose
/// rustls session refuses it.
fn choose(client_hello: &[u8]) -> Choice {
    const SESSION_ID_AT: usize = 1 + 3 + 2 + 32;
    let Some(&kind) = client_hello.first() else {
        return Choice::NotYet;
    };
    if kind != 1 {
        return Choice::AesFirst;
    }
    let Some(&session_id_len) = client_hello.get(SESSION_ID_AT) else {
        return Choice::NotYet;
    };
    let suites_at = SESSION_ID_AT + 1 + usize::from(session_id_len);
    let Some(len) = client_hello.get(suites_at..suites_at + 2) else {
        return Choice::NotYet;
    };
    let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    let Some(suites) = client_hello.get(suites_at + 2..suites_at + 2 + len) else {
        return Choice::NotYet;
    };
    for suite in suites.chunks_exact(2) {
        match u16::from_be_bytes([suite[0], suite[1]]) {
            TLS13_CHACHA20_POLY1305_SHA256 => return Choice::ChachaFirst,
            TLS13_AES_128_GCM_SHA256 | TLS13_AES_256_GCM_SHA384 => return Choice::AesFirst,
            _ => {}
        }
    }
    Choice::AesFirst
}

impl crypto::Session for Chosen {
    fn read_handshake(&mut self, buf: &[u8]) -> Result<bool, TransportError> {
        let Some(undecided) = self.undecided.as_mut() else {
            return self.inner.read_handshake(buf);
        };
        undecided.client_hello.extend_from_slice(buf);
        let choice = choose(&undecided.client_hello);
        if choice == Choice::NotYet && undecided.client_hello.len() < CLIENT_HELLO_BUFFER_MAX {
            return Ok(false);
        }
        let Some(undecided) = self.undecided.take() else {
            unreachable!("checked above");
        };
        if choice == Choice::ChachaFirst {
            self.inner = crypto::ServerConfig::start_session(
                undecided.config.chacha_first.clone(),
                undecided.version,
                &undecided.params,
            );
        }
        self.inner.read_handshake(&undecided.client_hello)
    }

    fn initial_keys(&self, dst_cid: &ConnectionId, side: Side) -> Keys {
        self.inner.initial_keys(dst_cid, side)
    }

    fn handshake_data(&self) -> Option<Box<dyn Any>> {
        self.inner.handshake_data()
    }

    fn peer_identity(&self) -> Option<Box<dyn Any>> {
        self.inner.peer_identity()
    }

    fn early_crypto(&self) -> Option<(Box<dyn HeaderKey>, Box<dyn PacketKey>)> {
        self.inner.early_crypto()
    }

    fn early_data_accepted(&self) -> Option<bool> {
        self.inner.early_data_accepted()
    }

    fn is_handshaking(&self) -> bool {
        self.inner.is_handshaking()
    }

    fn transport_parameters(&self) -> Result<Option<TransportParameters>, TransportError> {
        self.inner.transport_parameters()
    }

    fn write_handshake(&mut self, buf: &mut Vec<u8>) -> Option<Keys> {
        self.inner.write_handshake(buf)
    }

    fn next_1rtt_keys(&mut self) -> Option<KeyPair<Box<dyn PacketKey>>> {
        self.inner.next_1rtt_keys()
    }

    fn is_valid_retry(&self, orig_dst_cid: &ConnectionId, header: &[u8], payload: &[u8]) -> bool {
        self.inner.is_valid_retry(orig_dst_cid, header, payload)
    }

    fn export_keying_material(
        &self,
        output: &mut [u8],
        label: &[u8],
        context: &[u8],
    ) -> Result<(), ExportKeyingMaterialError> {
        self.inner.export_keying_material(output, label, context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::ring::cipher_suite as suite;

    /// The ClientHello handshake message a rustls client with `suites` in
    /// this order sends (the TLS record header stripped).
    fn client_hello(suites: Vec<rustls::SupportedCipherSuite>) -> Vec<u8> {
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites = suites;
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let mut conn =
            rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap())
                .unwrap();
        let mut record = Vec::new();
        conn.write_tls(&mut record).unwrap();
        record.split_off(5)
    }

    #[test]
    fn the_clients_first_tls13_suite_decides() {
        let chacha = client_hello(vec![
            suite::TLS13_CHACHA20_POLY1305_SHA256,
            suite::TLS13_AES_128_GCM_SHA256,
        ]);
        assert_eq!(choose(&chacha), Choice::ChachaFirst);
        let aes256 = client_hello(vec![
            suite::TLS13_AES_256_GCM_SHA384,
            suite::TLS13_CHACHA20_POLY1305_SHA256,
        ]);
        assert_eq!(choose(&aes256), Choice::AesFirst);
        let aes128 = client_hello(vec![suite::TLS13_AES_128_GCM_SHA256]);
        assert_eq!(choose(&aes128), Choice::AesFirst);
    }

    #[test]
    fn a_partial_client_hello_waits_and_junk_goes_to_the_default() {
        let hello = client_hello(vec![suite::TLS13_CHACHA20_POLY1305_SHA256]);
        for cut in 0..40 {
            assert_eq!(choose(&hello[..cut]), Choice::NotYet, "cut at {cut}");
        }
        assert_eq!(choose(&hello), Choice::ChachaFirst);
        assert_eq!(choose(&[2, 0, 0, 0]), Choice::AesFirst);
        // A cipher list with no TLS 1.3 suite: the default, which refuses it.
        let mut tls12_only = vec![1, 0, 0, 0, 3, 3];
        tls12_only.extend([0; 32]);
        tls12_only.extend([0, 0, 2, 0xc0, 0x2b]);
        assert_eq!(choose(&tls12_only), Choice::AesFirst);
    }
}
