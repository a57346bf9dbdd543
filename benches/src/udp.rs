//! Endpoint sockets with large kernel buffers.
//!
//! Kernel defaults (~208 KiB) overflow under bursts such as hundreds of
//! concurrent handshakes, and the resulting drops cost whole PTOs. The
//! appliance sizes its buffers the same way (plain request, then the root-only
//! `*BUFFORCE` options that lift `net.core.[rw]mem_max`), so the baseline must
//! too for a fair comparison.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;

use anyhow::{Context, Result};
use quinn::udp::UdpSocketState;
use quinn::{Endpoint, EndpointConfig, ServerConfig, TokioRuntime};

/// Socket buffer size asked for on both sides, each direction.
pub const DEFAULT_SOCKET_BUFFER: usize = 8 << 20;

/// A quinn endpoint on `addr` whose socket has `buffer` bytes each way and
/// that takes UDP payloads up to `max_udp_payload`.
pub fn endpoint(
    addr: SocketAddr,
    buffer: usize,
    max_udp_payload: u16,
    server: Option<ServerConfig>,
) -> Result<Endpoint> {
    let socket = UdpSocket::bind(addr).with_context(|| format!("binding {addr}"))?;
    set_buffers(&socket, buffer)?;
    let mut config = EndpointConfig::default();
    config.max_udp_payload_size(max_udp_payload)?;
    Ok(Endpoint::new(
        config,
        server,
        socket,
        Arc::new(TokioRuntime),
    )?)
}

/// Best effort: the plain options are clamped by sysctl limits and the forced
/// ones need CAP_NET_ADMIN, so failures are ignored and the outcome is checked.
fn set_buffers(socket: &UdpSocket, bytes: usize) -> Result<()> {
    let options = [
        libc::SO_RCVBUF,
        libc::SO_SNDBUF,
        libc::SO_RCVBUFFORCE,
        libc::SO_SNDBUFFORCE,
    ];
    for option in options {
        let value = bytes.min(i32::MAX as usize) as libc::c_int;
        let _ = crate::sockopt::set_int(socket, libc::SOL_SOCKET, option, value);
    }
    warn_if_small(socket, bytes)
}

/// Linux reports twice the requested size (it counts bookkeeping overhead),
/// so anything below the request means the kernel clamped it.
fn warn_if_small(socket: &UdpSocket, bytes: usize) -> Result<()> {
    let state = UdpSocketState::new(socket.into())?;
    let recv = state.recv_buffer_size(socket.into())?;
    let send = state.send_buffer_size(socket.into())?;
    if recv < bytes || send < bytes {
        eprintln!(
            "warning: UDP buffers are {recv} B receive / {send} B send, asked for {bytes} B; \
             run as root or raise net.core.rmem_max / wmem_max"
        );
    }
    Ok(())
}
