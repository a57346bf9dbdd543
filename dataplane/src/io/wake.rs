//! Waking a sleeping worker from another thread (eventfd).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// An eventfd plus a "sleeping" flag, so senders only pay for the syscall
/// when the worker is (about to be) blocked in its wait.
#[derive(Debug)]
pub struct Waker {
    fd: OwnedFd,
    sleeping: AtomicBool,
}

impl Waker {
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor this function exclusively owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            fd,
            sleeping: AtomicBool::new(false),
        })
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Called by a sender after it queued something for this worker.
    pub fn wake(&self) {
        // SeqCst pairs with `prepare_sleep`: either the worker sees the queued
        // item when it re-checks its queues, or we see it sleeping here.
        if self.sleeping.load(Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live local to an fd we own.
            unsafe { libc::write(self.fd(), (&one as *const u64).cast(), 8) };
        }
    }

    /// The worker announces it is about to block; it must re-check its queues
    /// after this and before blocking.
    pub fn prepare_sleep(&self) {
        self.sleeping.store(true, Ordering::SeqCst);
    }

    /// The worker is running again: clear the flag and the counter.
    pub fn woke(&self) {
        self.sleeping.store(false, Ordering::SeqCst);
        let mut value: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live local; EAGAIN is fine.
        unsafe { libc::read(self.fd(), (&mut value as *mut u64).cast(), 8) };
    }
}
