//! One integer socket option, for the benchmark binaries (each includes
//! this file as a module of its own).

use std::io;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;

/// `setsockopt(level, option, value)` with a C int value.
pub fn set_int(
    socket: &UdpSocket,
    level: libc::c_int,
    option: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int together with its exact size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            option,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
