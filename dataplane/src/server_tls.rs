//! The server's TLS session for every QUIC connection: which cipher suite
//! it runs, and how little of TLS it keeps once the handshake is over.
//!
//! **Suite.** AES-128-GCM for everyone, except a client whose first TLS 1.3
//! suite is ChaCha20-Poly1305, which says it has no AES hardware
//! (OpenSSL's PRIORITIZE_CHACHA rule). rustls picks either the server's
//! order or the client's, nothing in between, so the server keeps two TLS
//! configs that differ only in suite order and starts each connection's
//! rustls session on the one its ClientHello asks for. The choice waits for
//! the ClientHello's cipher list on the CRYPTO stream; until then the
//! session has produced nothing, exactly as rustls itself waits for a
//! partial ClientHello.
//!
//! **Settling.** A rustls connection keeps its handshake state, buffers
//! and secrets for as long as it lives: about 3 KB for every held QUIC
//! connection (20 090 against 17 081 B per held connection at 20 000,
//! bench-40g --netns, 2026-12-02). QUIC needs none of it after the handshake (TLS 1.3 over
//! QUIC has no post-handshake messages from a client, and key updates
//! derive from the traffic secrets alone). Once the handshake is complete
//! and the session tickets are written, the session keeps only what is
//! asked of it later: the ALPN and server name, the client's certificate
//! chain, the secrets for the next key update and the connection's
//! admission binding (its TLS exporter value, exported before the rustls
//! state is dropped). Other exporter labels fail after that point, and
//! CRYPTO data a client sends after the handshake is a protocol violation.

use std::any::Any;
use std::sync::{Arc, OnceLock};

use quinn_proto::crypto::rustls::{HandshakeData, QuicServerConfig};
use quinn_proto::crypto::{
    self, ExportKeyingMaterialError, HeaderKey, KeyPair, Keys, PacketKey, UnsupportedVersion,
};
use quinn_proto::transport_parameters::TransportParameters;
use quinn_proto::{ConnectionId, Side, TransportError, TransportErrorCode};
use rustls::pki_types::CertificateDer;
use rustls::quic::{KeyChange, Secrets, Suite, Version};

use crate::admission::BINDING_LABEL;

/// A ClientHello larger than this is handed to rustls undecided (the
/// AES-first session), which then judges it.
const CLIENT_HELLO_BUFFER_MAX: usize = 16 * 1024;

const TLS13_AES_128_GCM_SHA256: u16 = 0x1301;
const TLS13_AES_256_GCM_SHA384: u16 = 0x1302;
const TLS13_CHACHA20_POLY1305_SHA256: u16 = 0x1303;

/// The server's QUIC crypto config: the two TLS configs and the Initial
/// keys and Retry tags, which are the same for both (RFC 9001 fixes them
/// to AES-128-GCM).
pub struct ServerTls {
    quic: QuicServerConfig,
    initial: Suite,
    aes_first: Arc<rustls::ServerConfig>,
    chacha_first: Arc<rustls::ServerConfig>,
}

/// A TLS config the QUIC server cannot run.
#[derive(Debug, thiserror::Error)]
#[error("the TLS config has no QUIC Initial suite (TLS13_AES_128_GCM_SHA256)")]
pub struct NoInitialSuite;

impl ServerTls {
    /// `aes_first` and `chacha_first` must differ only in suite order.
    pub fn new(
        aes_first: Arc<rustls::ServerConfig>,
        chacha_first: Arc<rustls::ServerConfig>,
    ) -> Result<Self, NoInitialSuite> {
        let initial = rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256
            .tls13()
            .and_then(|suite| suite.quic_suite())
            .ok_or(NoInitialSuite)?;
        let quic = QuicServerConfig::with_initial(aes_first.clone(), initial)
            .map_err(|_| NoInitialSuite)?;
        Ok(Self {
            quic,
            initial,
            aes_first,
            chacha_first,
        })
    }
}

impl crypto::ServerConfig for ServerTls {
    fn initial_keys(
        &self,
        version: u32,
        dst_cid: &ConnectionId,
    ) -> Result<Keys, UnsupportedVersion> {
        self.quic.initial_keys(version, dst_cid)
    }

    fn retry_tag(&self, version: u32, orig_dst_cid: &ConnectionId, packet: &[u8]) -> [u8; 16] {
        self.quic.retry_tag(version, orig_dst_cid, packet)
    }

    fn start_session(
        self: Arc<Self>,
        version: u32,
        params: &TransportParameters,
    ) -> Box<dyn crypto::Session> {
        let initial = self.initial;
        let mut encoded = Vec::new();
        params.write(&mut encoded);
        let (tls, version) = match quic_version(version) {
            Some(version) => (
                Tls::Undecided(Box::new(Undecided {
                    config: self,
                    version,
                    params: encoded,
                    client_hello: Vec::new(),
                })),
                version,
            ),
            // The endpoint accepts only versions `initial_keys` took.
            None => (
                Tls::Failed(format!("QUIC version {version:#x} has no TLS mapping")),
                Version::V1,
            ),
        };
        Box::new(ServerSession {
            tls,
            initial,
            version,
            handshake_data_ready: false,
        })
    }
}

/// quinn-proto's mapping of the QUIC versions it speaks to TLS's.
fn quic_version(version: u32) -> Option<Version> {
    match version {
        0xff00_001d..=0xff00_0020 => Some(Version::V1Draft),
        0x0000_0001 | 0xff00_0021..=0xff00_0022 => Some(Version::V1),
        _ => None,
    }
}

/// One connection's server TLS session (see the module doc).
struct ServerSession {
    tls: Tls,
    initial: Suite,
    version: Version,
    /// `HandshakeDataReady` was signalled (once per connection).
    handshake_data_ready: bool,
}

enum Tls {
    /// Waiting for the ClientHello's cipher list.
    Undecided(Box<Undecided>),
    Handshaking {
        conn: Box<rustls::quic::Connection>,
        /// The next key phase, from the 1-RTT key change.
        next: Option<NextPhase>,
    },
    Settled(Box<Settled>),
    /// The session could not start; the reason. (A TLS error during the
    /// handshake leaves it `Handshaking`: quinn-proto closes the connection
    /// with the error returned.)
    Failed(String),
}

/// What starting the chosen session needs, kept until the choice.
struct Undecided {
    config: Arc<ServerTls>,
    version: Version,
    /// Our transport parameters, encoded.
    params: Vec<u8>,
    client_hello: Vec<u8>,
}

/// What a completed handshake keeps.
struct Settled {
    alpn: Option<Vec<u8>>,
    server_name: Option<String>,
    peer: Option<Vec<CertificateDer<'static>>>,
    next: NextPhase,
    binding: Option<[u8; 32]>,
}

/// The keys of the next 1-RTT key phase. quinn-proto asks for them as soon
/// as the 1-RTT keys exist and holds them for the connection's life, yet
/// uses them only when a key update happens: built eagerly they are two
/// AES-GCM key schedules (about 1.2 KB) in every held connection. Here they
/// are built from the phase's secrets on first use. (A key update itself
/// reads the confidentiality limit of the phase after it, which builds
/// that one: only connections that never update keep theirs unbuilt.)
enum NextPhase {
    /// The secrets of the phase quinn-proto asks for next.
    Unissued(Secrets),
    /// The phase last handed out; the one after it derives from it.
    Issued(Arc<KeyPhase>),
}

impl NextPhase {
    fn issue(&mut self) -> Arc<KeyPhase> {
        let secrets = match self {
            NextPhase::Unissued(secrets) => secrets.clone(),
            NextPhase::Issued(last) => {
                // A key update happened: step past the last phase's secrets
                // (rustls advances them only as it derives keys).
                let mut secrets = last.secrets.clone();
                drop(secrets.next_packet_keys());
                secrets
            }
        };
        let phase = Arc::new(KeyPhase {
            secrets,
            keys: OnceLock::new(),
        });
        *self = NextPhase::Issued(phase.clone());
        phase
    }
}

/// One key phase's secrets and, once used, its keys.
struct KeyPhase {
    secrets: Secrets,
    keys: OnceLock<rustls::quic::PacketKeySet>,
}

impl KeyPhase {
    fn keys(&self) -> &rustls::quic::PacketKeySet {
        self.keys
            .get_or_init(|| self.secrets.clone().next_packet_keys())
    }
}

/// One direction's packet key of a key phase, built on first use.
struct LazyPacketKey {
    phase: Arc<KeyPhase>,
    local: bool,
}

impl LazyPacketKey {
    // quinn-proto implements its `PacketKey` for the box, not the key.
    #[allow(clippy::borrowed_box)]
    fn key(&self) -> &Box<dyn rustls::quic::PacketKey> {
        let keys = self.phase.keys();
        if self.local {
            &keys.local
        } else {
            &keys.remote
        }
    }
}

impl PacketKey for LazyPacketKey {
    fn encrypt(&self, packet: u64, buf: &mut [u8], header_len: usize) {
        PacketKey::encrypt(self.key(), packet, buf, header_len)
    }

    fn decrypt(
        &self,
        packet: u64,
        header: &[u8],
        payload: &mut bytes::BytesMut,
    ) -> Result<(), crypto::CryptoError> {
        PacketKey::decrypt(self.key(), packet, header, payload)
    }

    fn tag_len(&self) -> usize {
        PacketKey::tag_len(self.key())
    }

    fn confidentiality_limit(&self) -> u64 {
        PacketKey::confidentiality_limit(self.key())
    }

    fn integrity_limit(&self) -> u64 {
        PacketKey::integrity_limit(self.key())
    }
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

/// rustls' keys of one packet space, boxed as quinn-proto takes them.
fn quinn_keys(keys: rustls::quic::Keys) -> Keys {
    Keys {
        header: KeyPair {
            local: Box::new(keys.local.header),
            remote: Box::new(keys.remote.header),
        },
        packet: KeyPair {
            local: Box::new(keys.local.packet),
            remote: Box::new(keys.remote.packet),
        },
    }
}

fn error(code: TransportErrorCode, reason: String) -> TransportError {
    TransportError {
        code,
        frame: None,
        reason,
    }
}

fn server_name(conn: &rustls::quic::Connection) -> Option<&str> {
    match conn {
        rustls::quic::Connection::Server(conn) => conn.server_name(),
        rustls::quic::Connection::Client(_) => None,
    }
}

impl ServerSession {
    fn start(&mut self, undecided: Undecided, choice: Choice) -> Result<(), TransportError> {
        let config = match choice {
            Choice::ChachaFirst => &undecided.config.chacha_first,
            Choice::AesFirst | Choice::NotYet => &undecided.config.aes_first,
        };
        let conn = rustls::quic::ServerConnection::new(
            config.clone(),
            undecided.version,
            undecided.params,
        )
        .map_err(|e| {
            let reason = format!("TLS session: {e}");
            self.tls = Tls::Failed(reason.clone());
            error(TransportErrorCode::INTERNAL_ERROR, reason)
        })?;
        let mut conn = Box::new(rustls::quic::Connection::Server(conn));
        let read = conn.read_hs(&undecided.client_hello);
        self.tls = Tls::Handshaking { conn, next: None };
        read.map_err(|e| self.tls_error(e))
    }

    /// The transport error for a rustls error: its alert as a CRYPTO_ERROR
    /// where it sent one.
    fn tls_error(&self, tls: rustls::Error) -> TransportError {
        match &self.tls {
            Tls::Handshaking { conn, .. } if conn.alert().is_some() => TransportError {
                code: TransportErrorCode::crypto(conn.alert().map_or(0, u8::from)),
                frame: None,
                reason: tls.to_string(),
            },
            _ => error(
                TransportErrorCode::PROTOCOL_VIOLATION,
                format!("TLS error: {tls}"),
            ),
        }
    }

    /// Drop the rustls state of a completed handshake (see the module doc).
    fn settle(&mut self) {
        let Tls::Handshaking { conn, next } =
            std::mem::replace(&mut self.tls, Tls::Failed(String::new()))
        else {
            return;
        };
        let Some(next) = next else {
            self.tls = Tls::Handshaking { conn, next };
            return;
        };
        let binding = conn
            .export_keying_material([0u8; 32], BINDING_LABEL, Some(b""))
            .ok();
        self.tls = Tls::Settled(Box::new(Settled {
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            server_name: server_name(&conn).map(str::to_owned),
            peer: conn
                .peer_certificates()
                .map(|chain| chain.iter().map(|c| c.clone().into_owned()).collect()),
            next,
            binding,
        }));
    }
}

impl crypto::Session for ServerSession {
    fn read_handshake(&mut self, buf: &[u8]) -> Result<bool, TransportError> {
        match &mut self.tls {
            Tls::Undecided(undecided) => {
                undecided.client_hello.extend_from_slice(buf);
                let choice = choose(&undecided.client_hello);
                if choice == Choice::NotYet
                    && undecided.client_hello.len() < CLIENT_HELLO_BUFFER_MAX
                {
                    return Ok(false);
                }
                let Tls::Undecided(undecided) =
                    std::mem::replace(&mut self.tls, Tls::Failed(String::new()))
                else {
                    unreachable!("matched above");
                };
                self.start(*undecided, choice)?;
            }
            Tls::Handshaking { conn, .. } => {
                let read = conn.read_hs(buf);
                read.map_err(|e| self.tls_error(e))?;
            }
            Tls::Settled(_) if buf.is_empty() => return Ok(false),
            Tls::Settled(_) => {
                return Err(error(
                    TransportErrorCode::PROTOCOL_VIOLATION,
                    "TLS data after the handshake".into(),
                ));
            }
            Tls::Failed(reason) => {
                return Err(error(TransportErrorCode::INTERNAL_ERROR, reason.clone()));
            }
        }
        // rustls has no explicit signal that the ClientHello was read: the
        // server name, the ALPN or the end of the handshake show it.
        if !self.handshake_data_ready
            && let Tls::Handshaking { conn, .. } = &self.tls
            && (conn.alpn_protocol().is_some()
                || server_name(conn).is_some()
                || !conn.is_handshaking())
        {
            self.handshake_data_ready = true;
            return Ok(true);
        }
        Ok(false)
    }

    fn initial_keys(&self, dst_cid: &ConnectionId, side: Side) -> Keys {
        let side = match side {
            Side::Client => rustls::Side::Client,
            Side::Server => rustls::Side::Server,
        };
        quinn_keys(self.initial.keys(dst_cid, side, self.version))
    }

    fn handshake_data(&self) -> Option<Box<dyn Any>> {
        if !self.handshake_data_ready {
            return None;
        }
        let (protocol, server_name) = match &self.tls {
            Tls::Handshaking { conn, .. } => (
                conn.alpn_protocol().map(<[u8]>::to_vec),
                server_name(conn).map(str::to_owned),
            ),
            Tls::Settled(settled) => (settled.alpn.clone(), settled.server_name.clone()),
            Tls::Undecided(_) | Tls::Failed(_) => return None,
        };
        Some(Box::new(HandshakeData {
            protocol,
            server_name,
        }))
    }

    /// A `Vec<CertificateDer<'static>>`, as quinn-proto's rustls session.
    fn peer_identity(&self) -> Option<Box<dyn Any>> {
        let chain: Vec<CertificateDer<'static>> = match &self.tls {
            Tls::Handshaking { conn, .. } => conn
                .peer_certificates()?
                .iter()
                .map(|c| c.clone().into_owned())
                .collect(),
            Tls::Settled(settled) => settled.peer.clone()?,
            Tls::Undecided(_) | Tls::Failed(_) => return None,
        };
        Some(Box::new(chain))
    }

    fn early_crypto(&self) -> Option<(Box<dyn HeaderKey>, Box<dyn PacketKey>)> {
        let Tls::Handshaking { conn, .. } = &self.tls else {
            return None;
        };
        let keys = conn.zero_rtt_keys()?;
        Some((Box::new(keys.header), Box::new(keys.packet)))
    }

    /// A client's question; the server has no answer.
    fn early_data_accepted(&self) -> Option<bool> {
        None
    }

    fn is_handshaking(&self) -> bool {
        match &self.tls {
            Tls::Undecided(_) => true,
            Tls::Handshaking { conn, .. } => conn.is_handshaking(),
            Tls::Settled(_) | Tls::Failed(_) => false,
        }
    }

    fn transport_parameters(&self) -> Result<Option<TransportParameters>, TransportError> {
        let Tls::Handshaking { conn, .. } = &self.tls else {
            return Ok(None);
        };
        match conn.quic_transport_parameters() {
            None => Ok(None),
            Some(mut buf) => TransportParameters::read(Side::Server, &mut buf)
                .map(Some)
                .map_err(Into::into),
        }
    }

    fn write_handshake(&mut self, buf: &mut Vec<u8>) -> Option<Keys> {
        let Tls::Handshaking { conn, next } = &mut self.tls else {
            return None;
        };
        let written = buf.len();
        let keys = match conn.write_hs(buf) {
            Some(KeyChange::Handshake { keys }) => keys,
            Some(KeyChange::OneRtt {
                keys,
                next: secrets,
            }) => {
                *next = Some(NextPhase::Unissued(secrets));
                keys
            }
            None => {
                // Nothing left to write: a completed handshake has written
                // its session tickets, and TLS is done with.
                if buf.len() == written && !conn.is_handshaking() {
                    self.settle();
                }
                return None;
            }
        };
        Some(quinn_keys(keys))
    }

    fn next_1rtt_keys(&mut self) -> Option<KeyPair<Box<dyn PacketKey>>> {
        let next = match &mut self.tls {
            Tls::Handshaking { next, .. } => next.as_mut()?,
            Tls::Settled(settled) => &mut settled.next,
            Tls::Undecided(_) | Tls::Failed(_) => return None,
        };
        let phase = next.issue();
        Some(KeyPair {
            local: Box::new(LazyPacketKey {
                phase: phase.clone(),
                local: true,
            }),
            remote: Box::new(LazyPacketKey {
                phase,
                local: false,
            }),
        })
    }

    /// Retry packets are a client's to check.
    fn is_valid_retry(&self, _: &ConnectionId, _: &[u8], _: &[u8]) -> bool {
        false
    }

    fn export_keying_material(
        &self,
        output: &mut [u8],
        label: &[u8],
        context: &[u8],
    ) -> Result<(), ExportKeyingMaterialError> {
        match &self.tls {
            Tls::Handshaking { conn, .. } => conn
                .export_keying_material(output, label, Some(context))
                .map(|_| ())
                .map_err(|_| ExportKeyingMaterialError),
            Tls::Settled(settled)
                if label == BINDING_LABEL && context.is_empty() && output.len() == 32 =>
            {
                let binding = settled.binding.ok_or(ExportKeyingMaterialError)?;
                output.copy_from_slice(&binding);
                Ok(())
            }
            _ => Err(ExportKeyingMaterialError),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::aws_lc_rs::cipher_suite as suite;

    /// The ClientHello handshake message a rustls client with `suites` in
    /// this order sends (the TLS record header stripped).
    fn client_hello(suites: Vec<rustls::SupportedCipherSuite>) -> Vec<u8> {
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
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
