//! Per-ALPN stream handlers and the wire formats they share with clients.

pub mod doq;
pub mod perf;
pub mod stoq;

use quinn_proto::Connection;

/// ALPN identifiers served on the one UDP port.
pub const ALPN_PERF: &[u8] = b"perf";
pub const ALPN_STOQ: &[u8] = b"stoq/1";
/// RFC 9250 §4.1.1.
pub const ALPN_DOQ: &[u8] = b"doq";

/// The application protocols this build serves, in server preference order.
pub const SERVED_ALPNS: [&[u8]; 3] = [ALPN_STOQ, ALPN_PERF, ALPN_DOQ];

/// Which protocol a connection negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    Perf,
    Stoq,
    Doq,
}

impl Alpn {
    /// Read the negotiated protocol once the handshake data is available.
    pub fn of(conn: &Connection) -> Option<Alpn> {
        let data = conn.crypto_session().handshake_data()?;
        let data = data
            .downcast::<quinn_proto::crypto::rustls::HandshakeData>()
            .ok()?;
        match data.protocol.as_deref()? {
            ALPN_PERF => Some(Alpn::Perf),
            ALPN_STOQ => Some(Alpn::Stoq),
            ALPN_DOQ => Some(Alpn::Doq),
            _ => None,
        }
    }
}
