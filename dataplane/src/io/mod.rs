//! I/O backends: where datagrams enter and leave a worker.
//!
//! A backend owns one UDP socket (or ring) and moves batches; it knows
//! nothing about QUIC. The worker calls `poll_recv` for everything that is
//! ready, `send` for each transmit quinn-proto produced, `flush` once per loop
//! iteration, and `wait` when it has nothing to do.

#[cfg(any(test, feature = "harness"))]
pub mod memory;
pub mod signals;
pub mod socket;
pub mod sockopt;
pub mod uring;
pub mod wake;
pub mod xdp;

use quinn_proto::EcnCodepoint;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

pub use wake::Waker;

/// Largest receive a buffer must hold: a full GRO batch is up to 64
/// segments (the kernel's UDP_MAX_SEGMENTS) of up to 1500 bytes; a smaller
/// buffer truncates the batch and loses datagrams.
pub const RECV_BUF_LEN: usize = 128 * 1024;
/// The largest UDP payload RFC 9000 allows (§18.2, max_udp_payload_size);
/// one receive buffer holds it, so socket and io_uring endpoints take any.
pub const MAX_UDP_PAYLOAD_RECEIVED: u16 = 65527;
const _: () = assert!(RECV_BUF_LEN >= MAX_UDP_PAYLOAD_RECEIVED as usize);
const _: () = assert!(RECV_BUF_LEN >= 64 * 1500);

/// One receive buffer: a single datagram, or several of `stride` bytes each
/// when the kernel coalesced them (GRO).
#[derive(Debug)]
pub struct RecvDatagram<'a> {
    pub remote: SocketAddr,
    pub local_ip: Option<IpAddr>,
    pub ecn: Option<EcnCodepoint>,
    pub data: &'a [u8],
    pub stride: usize,
}

impl<'a> RecvDatagram<'a> {
    /// The individual datagrams of a GRO buffer.
    pub fn segments(&self) -> impl Iterator<Item = &'a [u8]> + use<'a> {
        let stride = if self.stride == 0 {
            self.data.len().max(1)
        } else {
            self.stride
        };
        self.data.chunks(stride)
    }
}

/// One transmit: a datagram, or `contents.len() / segment_size` of them sent
/// with one GSO call.
#[derive(Debug)]
pub struct SendDatagram<'a> {
    pub destination: SocketAddr,
    pub ecn: Option<EcnCodepoint>,
    pub src_ip: Option<IpAddr>,
    pub contents: &'a [u8],
    pub segment_size: Option<usize>,
}

/// Where and how a transmit goes: a [`SendDatagram`] without its contents.
#[derive(Clone, Copy, Debug)]
pub struct SendHeader {
    pub destination: SocketAddr,
    pub ecn: Option<EcnCodepoint>,
    pub src_ip: Option<IpAddr>,
    pub segment_size: Option<usize>,
}

impl SendHeader {
    /// The transmit of `contents` to this header's destination.
    pub fn with<'a>(&self, contents: &'a [u8]) -> SendDatagram<'a> {
        SendDatagram {
            destination: self.destination,
            ecn: self.ecn,
            src_ip: self.src_ip,
            contents,
            segment_size: self.segment_size,
        }
    }
}

impl From<&quinn_proto::Transmit> for SendHeader {
    fn from(t: &quinn_proto::Transmit) -> Self {
        Self {
            destination: t.destination,
            ecn: t.ecn,
            src_ip: t.src_ip,
            segment_size: t.segment_size,
        }
    }
}

/// Batch sizes of a backend (`[stoq_transport] uring_recv_ops`, `uring_send_ops`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoBatch {
    /// io_uring receive buffers per worker (128 KiB each, which takes a
    /// whole GRO batch), rounded up to a power of two: the provided buffers
    /// of the one multishot receive. A datagram that finds them all taken
    /// waits in the socket until the worker hands them back. On kernels
    /// without provided-buffer rings, that many single-shot receives wait
    /// on the socket instead, and each datagram wakes every one of them
    /// (there 4 beat 32 by 1.2-1.5x in set-ups/s, bench-40g --netns,
    /// 2026-12-02).
    pub recv_ops: usize,
    /// io_uring send operations that may be in flight.
    pub send_ops: usize,
}

impl Default for IoBatch {
    fn default() -> Self {
        Self {
            recv_ops: 4,
            send_ops: 128,
        }
    }
}

/// Which backend a worker runs; chosen in `[stoq_transport] backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// io_uring, falling back to `socket` (logged) where the kernel refuses it.
    Uring,
    /// recvmmsg / sendmsg with GSO and GRO.
    Socket,
    /// AF_XDP: one XDP socket per worker on one NIC queue, fed by the XDP
    /// front door; needs `[dataplane] xdp_interface`.
    Xdp,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Uring => "uring",
            BackendKind::Socket => "socket",
            BackendKind::Xdp => "xdp",
        }
    }
}

/// The operations a worker needs from its I/O.
pub trait Backend: Send {
    /// Short name for logs and stats.
    fn name(&self) -> &'static str;
    /// Hand every datagram that is ready now to `sink`, without blocking.
    /// Returns how many receive buffers were delivered.
    fn poll_recv(&mut self, sink: &mut dyn FnMut(RecvDatagram<'_>)) -> io::Result<usize>;
    /// Send or queue one transmit. `WouldBlock` means it was not taken: call
    /// again after `wait(.., want_write = true)`.
    fn send(&mut self, transmit: &SendDatagram<'_>) -> io::Result<()>;
    /// `send` for contents that are the whole of `buf`, a buffer the caller
    /// owns and reuses. A backend that sends from buffers of its own may take
    /// `buf` and leave one of its own, emptied, in its place rather than copy
    /// it; `buf` is unchanged when the send is not taken (`WouldBlock`).
    fn send_owned(&mut self, header: &SendHeader, buf: &mut Vec<u8>) -> io::Result<()> {
        self.send(&header.with(buf))
    }
    /// Push queued sends to the kernel. Called once per loop iteration.
    fn flush(&mut self) -> io::Result<()>;
    /// Segments per GSO call the socket accepts (1 without GSO).
    fn max_gso_segments(&self) -> usize;
    /// Write the backend's own counters (frames, rings) into `counters`;
    /// called before the worker publishes them.
    fn publish(&self, _counters: &mut crate::stats::Counters) {}
    /// Block until a datagram is ready, the waker fires, `timeout` passes, or
    /// (with `want_write`) the socket can take sends again.
    fn wait(
        &mut self,
        waker: &Waker,
        timeout: Option<Duration>,
        want_write: bool,
    ) -> io::Result<()>;
}

/// `ppoll` on the socket and the waker's eventfd.
pub(crate) fn poll_fds(
    socket_fd: i32,
    waker: &Waker,
    timeout: Option<Duration>,
    want_write: bool,
) -> io::Result<()> {
    let events = libc::POLLIN | if want_write { libc::POLLOUT } else { 0 };
    poll_many(&[(socket_fd, events)], waker, timeout)
}

/// `ppoll` on up to three descriptors (with their events) and the waker.
pub(crate) fn poll_many(
    sockets: &[(i32, libc::c_short)],
    waker: &Waker,
    timeout: Option<Duration>,
) -> io::Result<()> {
    const SOCKETS_MAX: usize = 3;
    assert!(
        sockets.len() <= SOCKETS_MAX,
        "poll_many takes at most {SOCKETS_MAX} sockets"
    );
    let unused = libc::pollfd {
        fd: -1,
        events: 0,
        revents: 0,
    };
    let mut fds = [unused; SOCKETS_MAX + 1];
    fds[0] = libc::pollfd {
        fd: waker.fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    for (slot, &(fd, events)) in fds[1..].iter_mut().zip(sockets) {
        *slot = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
    }
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `fds` and `ts` are live locals; the count covers the waker
    // and the given sockets, all inside `fds`.
    let rc = unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            (sockets.len() + 1) as libc::nfds_t,
            ts_ptr,
            std::ptr::null(),
        )
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    Ok(())
}

/// Turns the kernel's UDP receive offload (`UDP_GRO`) on or off; a kernel
/// without it (before 5.0) has nothing to turn off.
pub(crate) fn set_gro(socket: &std::net::UdpSocket, on: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let value: libc::c_int = on.into();
    // SAFETY: a valid socket and a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_GRO,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    let error = io::Error::last_os_error();
    if rc == 0 || (!on && error.raw_os_error() == Some(libc::ENOPROTOOPT)) {
        Ok(())
    } else {
        Err(error)
    }
}
