//! The relay's system calls that std does not wrap: ppoll(2) with a
//! nanosecond timeout and a signal mask, socket options, and the SIGTERM
//! handler. Every `unsafe` of the relay is here.

use std::io;
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Set by SIGTERM or SIGINT; the event loop then writes its stats and exits.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_sig: libc::c_int) {
    // Only an atomic store: the one thing that is async-signal-safe here.
    STOP.store(true, Ordering::SeqCst);
}

pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Installs the SIGTERM/SIGINT handler and blocks both signals, returning
/// the mask to wait with: they are delivered only inside `ppoll`, which
/// then returns, so a signal can never slip in between the check of
/// `stop_requested` and the wait (the race a plain poll(2) has).
pub fn stop_on_signals() -> io::Result<libc::sigset_t> {
    // SAFETY: every struct passed is fully initialised (zeroed, then set
    // through the libc calls), the handler only stores to an atomic, and
    // sigprocmask only changes this (single-threaded) process's mask.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_stop as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigemptyset(&mut sa.sa_mask);
        let mut block: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut block);
        for sig in [libc::SIGTERM, libc::SIGINT] {
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            libc::sigaddset(&mut block, sig);
        }
        let mut wait_mask: libc::sigset_t = std::mem::zeroed();
        if libc::sigprocmask(libc::SIG_BLOCK, &block, &mut wait_mask) != 0 {
            return Err(io::Error::last_os_error());
        }
        libc::sigdelset(&mut wait_mask, libc::SIGTERM);
        libc::sigdelset(&mut wait_mask, libc::SIGINT);
        Ok(wait_mask)
    }
}

/// Waits until one of `fds` has its events, `timeout` passes (`None`:
/// forever) or a signal unblocked by `mask` arrives (then `Ok(0)`).
pub fn ppoll(
    fds: &mut [libc::pollfd],
    timeout: Option<Duration>,
    mask: Option<&libc::sigset_t>,
) -> io::Result<usize> {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    // SAFETY: `fds` is a live, exclusively borrowed slice of its stated
    // length; the timespec and the mask live across the call or are null.
    let rc = unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            ts.as_ref().map_or(std::ptr::null(), |t| t as *const _),
            mask.map_or(std::ptr::null(), |m| m as *const _),
        )
    };
    if rc >= 0 {
        return Ok(rc as usize);
    }
    let err = io::Error::last_os_error();
    if err.kind() == io::ErrorKind::Interrupted {
        Ok(0)
    } else {
        Err(err)
    }
}

/// Large kernel buffers (the forced options lift `net.core.[rw]mem_max`
/// where the relay has CAP_NET_ADMIN, as in the bench's namespaces), so
/// the kernel does not drop what the model should decide about; and
/// don't-fragment, so a datagram too big for the path is refused as on a
/// real link instead of being fragmented.
pub fn tune_socket(socket: &UdpSocket, buffer_bytes: usize) {
    let bytes = buffer_bytes.min(i32::MAX as usize) as libc::c_int;
    for option in [
        libc::SO_RCVBUF,
        libc::SO_SNDBUF,
        libc::SO_RCVBUFFORCE,
        libc::SO_SNDBUFFORCE,
    ] {
        // Best effort: the forced options need CAP_NET_ADMIN.
        let _ = crate::sockopt::set_int(socket, libc::SOL_SOCKET, option, bytes);
    }
    let _ = crate::sockopt::set_int(
        socket,
        libc::IPPROTO_IPV6,
        libc::IPV6_MTU_DISCOVER,
        libc::IPV6_PMTUDISC_DO,
    );
}
