//! Per-ALPN stream handlers and the wire formats they share with clients.

pub mod perf;
pub mod stoq;

use quinn_proto::Connection;

/// ALPN identifiers served on the one UDP port.
pub const ALPN_PERF: &[u8] = b"perf";
pub const ALPN_STOQ: &[u8] = b"stoq/1";

/// The application protocols this build serves, in server preference order.
pub const SERVED_ALPNS: [&[u8]; 2] = [ALPN_STOQ, ALPN_PERF];

/// Which protocol a connection negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    Perf,
    Stoq,
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
            _ => None,
        }
    }
}
