//! Per-ALPN stream handlers and the wire formats they share with clients.

pub mod doq;
pub mod legacy_dns;
pub mod perf;
pub mod stoq;
pub mod stoq_registry;

use crate::stats::Counters;
use bytes::Bytes;
use quinn_proto::{Connection, ReadError, StreamId, WriteError};

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
pub enum ReadState {
    /// More may come.
    Open,
    /// The peer finished the stream: `buf` holds everything it sent.
    Finished,
    /// The peer reset the stream.
    Reset,
}

/// Append what stream `id` has to `buf`, reading at most one byte past
/// `limit` (so an oversized request is seen without buffering it), and
/// count the bytes as received stream data.
pub(crate) fn read_bounded(
    conn: &mut Connection,
    id: StreamId,
    buf: &mut Vec<u8>,
    limit: usize,
    counters: &mut Counters,
) -> ReadState {
    let before = buf.len();
    let state = read_stream(conn, id, buf, limit);
    counters.stream_bytes_rx += (buf.len() - before) as u64;
    state
}

/// [`read_bounded`] without counters (clients): `buf` grows to at most
/// `limit + 1` bytes, so `buf.len() > limit` means "too long".
pub fn read_stream(
    conn: &mut Connection,
    id: StreamId,
    buf: &mut Vec<u8>,
    limit: usize,
) -> ReadState {
    let mut recv = conn.recv_stream(id);
    let Ok(mut chunks) = recv.read(true) else {
        return ReadState::Open;
    };
    let mut state = ReadState::Open;
    loop {
        match chunks.next(limit + 1 - buf.len().min(limit)) {
            Ok(Some(chunk)) => {
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

/// What is left to write of a response on one stream, in order. Most
/// responses are one piece; a bulk asset read's are its header and then
/// pieces that share its region's chunks (`assets::region`), handed to the
/// transport as they are.
#[derive(Debug, Default)]
pub(crate) struct Unsent(Vec<Bytes>);

impl Unsent {
    /// Write as much of `pieces` as stream `id`'s flow control takes now
    /// and finish the stream once all of it is written. What is left is
    /// written by [`Unsent::resume`] on the stream's next `Writable` event:
    /// a response larger than the peer's window is delivered whole, never
    /// cut short. Nothing is left when the peer stopped the stream or the
    /// connection is closing (nothing to send).
    pub(crate) fn send(conn: &mut Connection, id: StreamId, pieces: Vec<Bytes>) -> Self {
        let mut unsent = Self(pieces);
        unsent.write(conn, id);
        unsent
    }

    /// Write what is left, if anything.
    pub(crate) fn resume(&mut self, conn: &mut Connection, id: StreamId) {
        if !self.0.is_empty() {
            self.write(conn, id);
        }
    }

    /// Bytes left.
    pub(crate) fn len(&self) -> usize {
        self.0.iter().map(Bytes::len).sum()
    }

    fn write(&mut self, conn: &mut Connection, id: StreamId) {
        let mut send = conn.send_stream(id);
        if self.0.is_empty() {
            // An empty response: the stream's end is all there is.
            let _ = send.finish();
            return;
        }
        // A partial write limited by connection-level credit does not arm a
        // Writable event; write until the stream itself reports Blocked
        // (which does), or all of it went.
        loop {
            match send.write_chunks(&mut self.0) {
                Ok(written) => {
                    self.0.drain(..written.chunks);
                    if self.0.is_empty() {
                        let _ = send.finish();
                        return;
                    }
                    if written.bytes == 0 {
                        return;
                    }
                }
                Err(WriteError::Blocked) => return,
                Err(WriteError::Stopped(_) | WriteError::ClosedStream) => {
                    self.0.clear();
                    return;
                }
            }
        }
    }
}
