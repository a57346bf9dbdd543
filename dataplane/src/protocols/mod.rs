//! Per-ALPN stream handlers and the wire formats they share with clients.

pub mod doq;
pub mod legacy_dns;
pub mod perf;
pub mod stoq;

use crate::stats::Counters;
use quinn_proto::{Connection, ReadError, StreamId};

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

/// What a bounded read found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReadState {
    /// More may come.
    Open,
    /// The peer finished the stream: `buf` holds everything it sent.
    Finished,
    /// The peer reset the stream.
    Reset,
}

/// Append what stream `id` has to `buf`, reading at most one byte past
/// `limit` (so an oversized request is seen without buffering it).
pub(crate) fn read_bounded(
    conn: &mut Connection,
    id: StreamId,
    buf: &mut Vec<u8>,
    limit: usize,
    counters: &mut Counters,
) -> ReadState {
    let mut recv = conn.recv_stream(id);
    let Ok(mut chunks) = recv.read(true) else {
        return ReadState::Open;
    };
    let mut state = ReadState::Open;
    loop {
        match chunks.next(limit + 1 - buf.len().min(limit)) {
            Ok(Some(chunk)) => {
                counters.stream_bytes_rx += chunk.bytes.len() as u64;
                buf.extend_from_slice(&chunk.bytes);
                if buf.len() > limit {
                    break;
                }
            }
            Ok(None) => {
                state = ReadState::Finished;
                break;
            }
            Err(ReadError::Blocked) => break,
            Err(ReadError::Reset(_)) => {
                state = ReadState::Reset;
                break;
            }
        }
    }
    let _ = chunks.finalize();
    state
}
