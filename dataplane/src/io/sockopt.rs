//! Creating the worker UDP sockets: IPv6 only, SO_REUSEPORT, big buffers.

use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{SocketAddr, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;

/// One worker's server socket on the shared address and port.
pub fn bind_worker_socket(addr: SocketAddrV6, buffer_bytes: usize) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    // IPv4 is not served: v4-mapped traffic never reaches a V6ONLY socket.
    socket.set_only_v6(true)?;
    socket.set_reuse_port(true)?;
    set_buffers(&socket, buffer_bytes);
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::V6(addr).into())?;
    Ok(socket.into())
}

/// A client socket on an ephemeral port.
pub fn bind_client_socket(local: SocketAddrV6, buffer_bytes: usize) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_only_v6(true)?;
    set_buffers(&socket, buffer_bytes);
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::V6(local).into())?;
    Ok(socket.into())
}

/// Ask for `bytes` of socket buffer; as root the `*BUFFORCE` options lift the
/// `net.core.[rw]mem_max` cap, otherwise the kernel clamps silently.
fn set_buffers(socket: &Socket, bytes: usize) {
    let _ = socket.set_recv_buffer_size(bytes);
    let _ = socket.set_send_buffer_size(bytes);
    let value = bytes.min(i32::MAX as usize) as libc::c_int;
    for option in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // SAFETY: passes a pointer to a live c_int with its exact size.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}
