//! The QUIC performance protocol (draft-banks-quic-performance, ALPN
//! `perf`): on each bidirectional stream the client sends the response size
//! as a big-endian u64, then its upload, then FIN; the server answers with
//! exactly that many bytes and FIN.
//!
//! Our peers fill both directions with a documented pattern (byte at stream
//! offset `o` is `o % 251`) so transfers can be checked end to end; other
//! implementations may send anything, which the server only counts.

use crate::stats::Counters;
use bytes::Bytes;
use quinn_proto::{Connection, Dir, ReadError, StreamId, VarInt, WriteError};
use std::collections::HashMap;
use std::sync::LazyLock;

/// Size of the request header (the response length).
pub const REQUEST_HEADER_LEN: usize = 8;
/// The pattern's period; prime so it never lines up with packet sizes.
pub const PATTERN_PERIOD: usize = 251;
/// Largest slice handed to quinn-proto in one write.
pub const WRITE_CHUNK_LEN: usize = 64 * 1024;
/// Application error code for a stream the server gives up on.
pub const PERF_STREAM_ERROR: u32 = 0x1;

const PATTERN_LEN: usize = WRITE_CHUNK_LEN + PATTERN_PERIOD;
static PATTERN: LazyLock<Bytes> = LazyLock::new(|| {
    (0..PATTERN_LEN)
        .map(|i| (i % PATTERN_PERIOD) as u8)
        .collect()
});

/// The pattern bytes for stream offsets `offset..offset + len` (len at most
/// `WRITE_CHUNK_LEN`), without copying.
pub fn pattern_chunk(offset: u64, len: usize) -> Bytes {
    debug_assert!(len <= WRITE_CHUNK_LEN);
    let start = (offset % PATTERN_PERIOD as u64) as usize;
    PATTERN.slice(start..start + len)
}

/// Whether `data`, found at stream offset `offset`, follows the pattern.
pub fn matches_pattern(offset: u64, data: &[u8]) -> bool {
    let mut position = offset;
    data.chunks(WRITE_CHUNK_LEN).all(|piece| {
        let ok = pattern_chunk(position, piece.len()) == piece;
        position += piece.len() as u64;
        ok
    })
}

/// Write pattern bytes to `id` from `*sent` while flow control allows, up to
/// `total`. Returns false if the stream is gone (stopped or reset).
pub fn write_pattern(
    conn: &mut Connection,
    id: StreamId,
    sent: &mut u64,
    total: u64,
    counters: &mut Counters,
) -> bool {
    while *sent < total {
        let len = (total - *sent).min(WRITE_CHUNK_LEN as u64) as usize;
        let mut chunk = [pattern_chunk(*sent, len)];
        match conn.send_stream(id).write_chunks(&mut chunk) {
            Ok(written) if written.bytes == 0 => break,
            Ok(written) => {
                *sent += written.bytes as u64;
                counters.stream_bytes_tx += written.bytes as u64;
            }
            Err(WriteError::Blocked) => break,
            Err(_) => return false,
        }
    }
    true
}

/// Server side of one perf stream.
#[derive(Debug, Default)]
struct PerfStream {
    header: [u8; REQUEST_HEADER_LEN],
    header_len: usize,
    response_len: Option<u64>,
    sent: u64,
    upload_offset: u64,
    upload_ok: bool,
    fin_sent: bool,
    /// The client's FIN was read: the upload is complete.
    upload_done: bool,
    /// The response is acknowledged in full, or the client stopped it.
    response_done: bool,
}

/// Server side of a `perf` connection.
#[derive(Debug, Default)]
pub struct PerfServer {
    streams: HashMap<StreamId, PerfStream>,
}

impl PerfServer {
    /// Accept new streams and read every stream that may have data.
    pub fn on_readable(
        &mut self,
        conn: &mut Connection,
        id: Option<StreamId>,
        counters: &mut Counters,
    ) {
        while let Some(id) = conn.streams().accept(Dir::Bi) {
            counters.perf_streams += 1;
            self.streams.insert(
                id,
                PerfStream {
                    upload_ok: true,
                    ..PerfStream::default()
                },
            );
            self.read(conn, id, counters);
        }
        if let Some(id) = id {
            self.read(conn, id, counters);
        }
    }

    /// Flow control opened up on `id`: continue the response.
    pub fn on_writable(&mut self, conn: &mut Connection, id: StreamId, counters: &mut Counters) {
        self.respond(conn, id, counters);
    }

    /// The peer acknowledged the whole response, or stopped reading it.
    /// The stream's state stays until the upload is read to its end too.
    pub fn on_finished(&mut self, id: StreamId) {
        if let Some(stream) = self.streams.get_mut(&id) {
            stream.response_done = true;
            if stream.upload_done {
                self.streams.remove(&id);
            }
        }
    }

    /// Streams opened so far that still hold state (for 0-RTT deferral).
    pub fn stream_ids(&self) -> Vec<StreamId> {
        self.streams.keys().copied().collect()
    }

    fn read(&mut self, conn: &mut Connection, id: StreamId, counters: &mut Counters) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        let mut recv = conn.recv_stream(id);
        let Ok(mut chunks) = recv.read(true) else {
            return;
        };
        let mut fin = false;
        let mut gone = false;
        loop {
            match chunks.next(usize::MAX) {
                Ok(Some(chunk)) => stream.consume(&chunk.bytes, counters),
                Ok(None) => {
                    fin = true;
                    break;
                }
                Err(ReadError::Blocked) => break,
                Err(ReadError::Reset(_)) => {
                    gone = true;
                    break;
                }
            }
        }
        let _ = chunks.finalize();
        if fin && !stream.upload_ok {
            counters.perf_upload_mismatch += 1;
        }
        stream.upload_done |= fin;
        if gone || (fin && stream.response_len.is_none()) {
            // Reset by the peer, or FIN before a complete request: nothing to answer.
            let _ = conn
                .send_stream(id)
                .reset(VarInt::from_u32(PERF_STREAM_ERROR));
            self.streams.remove(&id);
            return;
        }
        self.respond(conn, id, counters);
        if self
            .streams
            .get(&id)
            .is_some_and(|s| s.upload_done && s.response_done)
        {
            self.streams.remove(&id);
        }
    }

    fn respond(&mut self, conn: &mut Connection, id: StreamId, counters: &mut Counters) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        let Some(total) = stream.response_len else {
            return;
        };
        if stream.fin_sent {
            return;
        }
        if !write_pattern(conn, id, &mut stream.sent, total, counters) {
            self.streams.remove(&id);
            return;
        }
        if stream.sent == total {
            stream.fin_sent = conn.send_stream(id).finish().is_ok();
        }
    }
}

impl PerfStream {
    fn consume(&mut self, mut data: &[u8], counters: &mut Counters) {
        counters.stream_bytes_rx += data.len() as u64;
        if self.header_len < REQUEST_HEADER_LEN {
            let take = (REQUEST_HEADER_LEN - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&data[..take]);
            self.header_len += take;
            data = &data[take..];
            if self.header_len == REQUEST_HEADER_LEN {
                self.response_len = Some(u64::from_be_bytes(self.header));
            }
        }
        if self.upload_ok && !data.is_empty() {
            self.upload_ok = matches_pattern(self.upload_offset, data);
        }
        self.upload_offset += data.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_continuous_across_chunks() {
        let a = pattern_chunk(0, 1000);
        let b = pattern_chunk(1000, 1000);
        let whole: Vec<u8> = (0..2000).map(|i| (i % PATTERN_PERIOD) as u8).collect();
        assert_eq!([&a[..], &b[..]].concat(), whole);
        assert!(matches_pattern(1000, &b));
        assert!(!matches_pattern(999, &b));
    }
}
