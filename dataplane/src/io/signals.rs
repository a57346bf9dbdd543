//! SIGINT/SIGTERM (drain) and SIGHUP (reload) as synchronous events: blocked in every thread (the mask
//! is inherited, so call this before spawning any) and taken by `sigwait`
//! in the thread that drains the server.

use std::io;

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// Block SIGINT, SIGTERM and SIGHUP in this thread and every thread it spawns later.
pub fn block_termination_signals() -> io::Result<()> {
    let set = termination_set();
    // SAFETY: passes a valid, initialised set; the old mask is not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Wait for SIGINT, SIGTERM or SIGHUP; returns the signal number.
pub fn wait_termination_signal() -> io::Result<i32> {
    let set = termination_set();
    let mut signal: libc::c_int = 0;
    // SAFETY: `set` is initialised and `signal` is a live local.
    let rc = unsafe { libc::sigwait(&set, &mut signal) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(signal)
}

/// SIGHUP's number, for callers matching on `wait_termination_signal`.
pub const SIGHUP: i32 = libc::SIGHUP;
