//! A memory asset's bytes, held in chunks so that a bulk read's answer can
//! refer to them instead of copying them: the answer's pieces are
//! [`Bytes`] that share a chunk with the region, and the transport
//! encrypts straight from them into its packets. A write to a chunk that an
//! answer still holds (until the peer acknowledged it) first copies that
//! chunk, so an answer always carries the bytes as they were when it was
//! made. A chunk nobody has written yet is not allocated: it reads as
//! zeros.

use bytes::{BufMut, Bytes};
use std::ops::Range;
use std::sync::Arc;

/// Bytes per chunk: the most a write copies when an answer holds its chunk.
pub const CHUNK_BYTES: usize = 64 * 1024;

/// A chunk nobody has written, as any answer reads it.
static ZEROS: [u8; CHUNK_BYTES] = [0; CHUNK_BYTES];

/// One chunk's bytes, shared between the region and the answers that
/// refer to it.
#[derive(Clone)]
struct Chunk(Arc<Box<[u8]>>);

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// A region's bytes. See the module documentation.
pub struct RegionBytes {
    len: usize,
    /// `None` for a chunk never written (zeros).
    chunks: Box<[Option<Chunk>]>,
}

impl RegionBytes {
    /// `len` zero bytes; nothing but the chunk table is allocated.
    pub fn zeroed(len: usize) -> Self {
        Self {
            len,
            chunks: std::iter::repeat_with(|| None)
                .take(len.div_ceil(CHUNK_BYTES))
                .collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Chunks allocated so far (written at least once), for tests.
    #[cfg(test)]
    fn allocated(&self) -> usize {
        self.chunks.iter().filter(|c| c.is_some()).count()
    }

    /// Copy `range` (within the region) into `out`.
    pub fn copy_to(&self, range: Range<usize>, out: &mut impl BufMut) {
        for (i, within) in pieces(range) {
            match &self.chunks[i] {
                Some(chunk) => out.put_slice(&chunk.0[within]),
                None => out.put_slice(&ZEROS[within]),
            }
        }
    }

    /// `range` (within the region) as pieces that share the region's
    /// chunks: no byte is copied.
    pub fn share(&self, range: Range<usize>, out: &mut Vec<Bytes>) {
        for (i, within) in pieces(range) {
            out.push(match &self.chunks[i] {
                Some(chunk) => Bytes::from_owner(chunk.clone()).slice(within),
                None => Bytes::from_static(&ZEROS[within]),
            });
        }
    }

    /// Write `data` at `offset` (within the region). A chunk an answer
    /// still holds is copied first (the answer keeps the old bytes).
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        let mut at = 0;
        for (i, within) in pieces(offset..offset + data.len()) {
            let len = self.chunk_len(i);
            let part = &data[at..at + within.len()];
            at += within.len();
            let slot = &mut self.chunks[i];
            let shared = slot
                .as_mut()
                .is_some_and(|chunk| Arc::get_mut(&mut chunk.0).is_none());
            if shared && within.len() == len {
                // Written whole while an answer holds it: a new chunk of
                // these bytes, nothing copied from the one it holds.
                *slot = Some(Chunk(Arc::new(part.into())));
                continue;
            }
            let chunk = slot.get_or_insert_with(|| Chunk(Arc::new(vec![0; len].into())));
            Arc::make_mut(&mut chunk.0)[within].copy_from_slice(part);
        }
    }

    fn chunk_len(&self, i: usize) -> usize {
        CHUNK_BYTES.min(self.len - i * CHUNK_BYTES)
    }
}

/// `range` cut at chunk boundaries: each chunk's index and the part of it
/// the range covers.
fn pieces(range: Range<usize>) -> impl Iterator<Item = (usize, Range<usize>)> {
    let mut at = range.start;
    std::iter::from_fn(move || {
        if at >= range.end {
            return None;
        }
        let i = at / CHUNK_BYTES;
        let base = i * CHUNK_BYTES;
        let within = at - base..(range.end - base).min(CHUNK_BYTES);
        at = base + within.end;
        Some((i, within))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(r: &RegionBytes, range: Range<usize>) -> Vec<u8> {
        let mut out = Vec::new();
        r.copy_to(range, &mut out);
        out
    }

    fn shared(r: &RegionBytes, range: Range<usize>) -> Vec<u8> {
        let mut pieces = Vec::new();
        r.share(range, &mut pieces);
        pieces.concat()
    }

    #[test]
    fn reads_what_was_written_across_chunks_and_zeros_elsewhere() {
        let len = 3 * CHUNK_BYTES + 100;
        let mut r = RegionBytes::zeroed(len);
        assert_eq!(r.allocated(), 0);
        let data: Vec<u8> = (0..CHUNK_BYTES + 10).map(|i| (i % 251) as u8 + 1).collect();
        let at = CHUNK_BYTES - 5;
        r.write(at, &data);
        // The write touched the first, second and third chunk; the last
        // (100 bytes) is still unallocated.
        assert_eq!(r.allocated(), 3);
        let mut want = vec![0; len];
        want[at..at + data.len()].copy_from_slice(&data);
        assert_eq!(read(&r, 0..len), want);
        assert_eq!(shared(&r, 0..len), want);
        for range in [
            0..1,
            at - 1..at + 7,
            2 * CHUNK_BYTES..len,
            len - 1..len,
            5..5,
        ] {
            assert_eq!(read(&r, range.clone()), want[range.clone()]);
            assert_eq!(shared(&r, range.clone()), want[range.clone()]);
        }
    }

    #[test]
    fn an_answer_keeps_the_bytes_it_was_made_of_when_the_region_is_written() {
        let mut r = RegionBytes::zeroed(2 * CHUNK_BYTES);
        r.write(0, &[7; 2 * CHUNK_BYTES]);
        let mut answer = Vec::new();
        r.share(10..CHUNK_BYTES + 10, &mut answer);
        r.write(0, &[9; 2 * CHUNK_BYTES]);
        assert!(answer.concat().iter().all(|b| *b == 7));
        assert!(read(&r, 0..2 * CHUNK_BYTES).iter().all(|b| *b == 9));
        // Once the answer is gone a write goes in place: no chunk is
        // shared, so none is copied (the same allocation keeps its bytes).
        drop(answer);
        let before = r.chunks[0].as_ref().map(|c| c.0.as_ptr());
        r.write(1, &[1]);
        assert_eq!(r.chunks[0].as_ref().map(|c| c.0.as_ptr()), before);
    }

    #[test]
    fn a_shared_chunk_written_whole_is_replaced_and_the_answer_keeps_the_old() {
        let mut r = RegionBytes::zeroed(CHUNK_BYTES + 10);
        r.write(0, &[3; CHUNK_BYTES + 10]);
        let mut answer = Vec::new();
        r.share(0..CHUNK_BYTES + 10, &mut answer);
        r.write(0, &[4; CHUNK_BYTES + 10]);
        assert!(answer.concat().iter().all(|b| *b == 3));
        assert!(read(&r, 0..CHUNK_BYTES + 10).iter().all(|b| *b == 4));
        assert_eq!(r.chunks[1].as_ref().map(|c| c.0.len()), Some(10));
    }

    #[test]
    fn a_region_shorter_than_a_chunk_has_one_short_chunk() {
        let mut r = RegionBytes::zeroed(10);
        r.write(8, b"ab");
        assert_eq!(read(&r, 0..10), b"\0\0\0\0\0\0\0\0ab");
        assert_eq!(r.chunks[0].as_ref().map(|c| c.0.len()), Some(10));
        assert_eq!(RegionBytes::zeroed(0).len(), 0);
    }
}
