//! The memory an AF_XDP socket shares with the kernel, and the book-keeping
//! that proves no frame is ever lost.
//!
//! Every frame is always in exactly one place: the fill ring (the kernel may
//! write a received packet into it), our free list (ready for a transmit),
//! or the TX ring (the kernel is sending it and will hand it back on the
//! completion ring). Received frames are returned to the fill ring within
//! the same `poll_recv`, so between calls `fill + free + tx == total`; the
//! counters below are published in `stats` and checked by the tests.

use std::io;
use std::ptr::NonNull;

/// An anonymous, page-aligned mapping, unmapped on drop.
pub struct Area {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; the worker that
// owns the backend is the only thread that reads or writes it (the kernel
// writes only into frames we handed to the fill ring).
unsafe impl Send for Area {}

impl Area {
    pub fn new(len: usize) -> io::Result<Self> {
        // SAFETY: an anonymous private mapping with no address hint; the
        // result is checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Self { ptr, len })
    }

    pub fn as_slice_ptr(&self) -> NonNull<[u8]> {
        NonNull::slice_from_raw_parts(self.ptr, self.len)
    }

    /// Where `len` bytes at `offset` start, if they lie inside the area.
    fn start_of(&self, offset: u64, len: usize) -> Option<usize> {
        let start = usize::try_from(offset).ok()?;
        (start.checked_add(len)? <= self.len).then_some(start)
    }

    /// `len` bytes at `offset`, if they lie inside the area.
    pub fn bytes(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let start = self.start_of(offset, len)?;
        // SAFETY: in bounds (checked by `start_of`); the frame was handed to
        // us by the kernel on the RX ring, so the kernel no longer writes it.
        Some(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(start), len) })
    }

    /// `len` bytes at `offset` for writing, if they lie inside the area.
    pub fn bytes_mut(&mut self, offset: u64, len: usize) -> Option<&mut [u8]> {
        let start = self.start_of(offset, len)?;
        // SAFETY: in bounds (checked by `start_of`); the frame came from our
        // free list, so neither the kernel nor another descriptor refers to it.
        Some(unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(start), len) })
    }
}

impl Drop for Area {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; the UMEM
        // registration that referred to it was dropped before (field order
        // in the backend).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// Where the frames are (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct FrameCounts {
    pub total: u64,
    pub free: u64,
    pub fill: u64,
    pub tx: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn area_bounds_are_checked() {
        let mut area = Area::new(8192).unwrap();
        assert!(area.bytes(0, 8192).is_some());
        assert!(area.bytes(4096, 4097).is_none());
        assert!(area.bytes(u64::MAX, 1).is_none());
        area.bytes_mut(100, 4).unwrap().copy_from_slice(b"abcd");
        assert_eq!(area.bytes(100, 4).unwrap(), b"abcd");
        assert!(area.bytes_mut(8190, 4).is_none());
    }
}
