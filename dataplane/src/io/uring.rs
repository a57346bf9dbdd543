//! The `uring` backend: io_uring with a standing batch of `recvmsg`
//! operations (GRO on), `sendmsg` with a `UDP_SEGMENT` cmsg for each GSO
//! batch, and a read on the worker's eventfd so wakes end the ring wait.
//!
//! Every operation owns a slot whose memory (buffer, `msghdr`, address,
//! control space) stays pinned in a `Box` until its completion arrives.

use super::{Backend, IoBatch, RECV_BUF_LEN, RecvDatagram, SendDatagram, Waker};
use io_uring::{IoUring, opcode, types};
use quinn_proto::EcnCodepoint;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Most receive operations a ring keeps in flight (`[stoq_transport] uring_recv_ops`).
pub const RECV_OPS_MAX: usize = 1024;
/// Most send operations in flight (`[stoq_transport] uring_send_ops`); a full
/// set reports `WouldBlock` until one completes.
pub const SEND_OPS_MAX: usize = 4096;

const CONTROL_LEN: usize = 128;
const TAG_RECV: u64 = 1 << 32;
const TAG_SEND: u64 = 2 << 32;
const TAG_WAKE: u64 = 3 << 32;
const TAG_MASK: u64 = 0xffff_ffff << 32;

#[repr(C, align(8))]
struct Control([u8; CONTROL_LEN]);

/// Memory one `recvmsg`/`sendmsg` points into.
struct Slot {
    buf: Vec<u8>,
    hdr: libc::msghdr,
    iov: libc::iovec,
    addr: libc::sockaddr_in6,
    control: Control,
}

// SAFETY: the raw pointers in `hdr` point into the same boxed slot (or are
// null) and move with it; nothing else aliases them across threads.
unsafe impl Send for Slot {}

impl Slot {
    fn new(capacity: usize) -> Box<Self> {
        // SAFETY: msghdr, iovec and sockaddr_in6 are plain C structs for
        // which all-zero is a valid value.
        let mut slot = Box::new(Slot {
            buf: vec![0u8; capacity],
            hdr: unsafe { std::mem::zeroed() },
            iov: unsafe { std::mem::zeroed() },
            addr: unsafe { std::mem::zeroed() },
            control: Control([0; CONTROL_LEN]),
        });
        slot.hdr.msg_name = (&mut slot.addr as *mut libc::sockaddr_in6).cast();
        slot.hdr.msg_iov = &mut slot.iov;
        slot.hdr.msg_iovlen = 1;
        slot.hdr.msg_control = slot.control.0.as_mut_ptr().cast();
        slot
    }

    fn arm(&mut self, len: usize, control_len: usize) {
        self.iov.iov_base = self.buf.as_mut_ptr().cast();
        self.iov.iov_len = len;
        self.hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        self.hdr.msg_controllen = control_len;
    }
}

// Each slot is boxed on its own: the kernel holds pointers into it (and it
// points into itself), so it must never move, whatever the Vec does.
#[allow(clippy::vec_box)]
pub struct UringBackend {
    ring: IoUring,
    socket: UdpSocket,
    recv: Vec<Box<Slot>>,
    send: Vec<Box<Slot>>,
    free_sends: Vec<usize>,
    wake_buf: Box<u64>,
    wake_armed: bool,
    waker_fd: i32,
    max_gso: usize,
    ready: Vec<(u64, i32)>,
}

impl UringBackend {
    /// Take over `socket` (options already set by quinn-udp's state, which
    /// also detected GSO). Fails where the kernel refuses io_uring.
    pub fn new(
        socket: UdpSocket,
        waker: &Waker,
        max_gso: usize,
        batch: IoBatch,
    ) -> io::Result<Self> {
        let recv_ops = batch.recv_ops.clamp(1, RECV_OPS_MAX);
        let send_ops = batch.send_ops.clamp(1, SEND_OPS_MAX);
        // Every operation plus the eventfd read fit the submission queue at once.
        let entries = (recv_ops + send_ops + 1).next_power_of_two() as u32;
        // io_uring parks blocking-mode socket operations on the socket's
        // wait queue instead of failing them with EAGAIN.
        socket.set_nonblocking(false)?;
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .build(entries)
            .or_else(|_| IoUring::new(entries))?;
        let mut backend = Self {
            ring,
            socket,
            recv: (0..recv_ops).map(|_| Slot::new(RECV_BUF_LEN)).collect(),
            send: (0..send_ops).map(|_| Slot::new(0)).collect(),
            free_sends: (0..send_ops).rev().collect(),
            wake_buf: Box::new(0),
            wake_armed: false,
            waker_fd: waker.fd(),
            max_gso,
            ready: Vec::with_capacity(entries as usize * 2),
        };
        for index in 0..recv_ops {
            backend.arm_recv(index)?;
        }
        backend.arm_wake()?;
        backend.ring.submit()?;
        Ok(backend)
    }

    fn push(&mut self, entry: io_uring::squeue::Entry) -> io::Result<()> {
        // SAFETY: every entry points into a boxed slot (or `wake_buf`) that
        // stays alive and untouched until its completion is reaped.
        while unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.ring.submit()?;
        }
        Ok(())
    }

    fn arm_recv(&mut self, index: usize) -> io::Result<()> {
        let slot = &mut self.recv[index];
        slot.arm(RECV_BUF_LEN, CONTROL_LEN);
        let entry = opcode::RecvMsg::new(types::Fd(self.socket.as_raw_fd()), &mut slot.hdr)
            .build()
            .user_data(TAG_RECV | index as u64);
        self.push(entry)
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let entry = opcode::Read::new(
            types::Fd(self.waker_fd),
            (&mut *self.wake_buf as *mut u64).cast(),
            8,
        )
        .build()
        .user_data(TAG_WAKE);
        self.wake_armed = true;
        self.push(entry)
    }

    fn reap(&mut self) {
        self.ready.clear();
        self.ready
            .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
    }
}

impl Backend for UringBackend {
    fn name(&self) -> &'static str {
        "uring"
    }

    fn poll_recv(&mut self, sink: &mut dyn FnMut(RecvDatagram<'_>)) -> io::Result<usize> {
        self.ring.submit()?;
        self.reap();
        let mut delivered = 0;
        let ready = std::mem::take(&mut self.ready);
        for &(user_data, result) in &ready {
            let index = (user_data & !TAG_MASK) as usize;
            match user_data & TAG_MASK {
                TAG_RECV => {
                    if result >= 0 {
                        let slot = &self.recv[index];
                        if let Some(datagram) = parse_recv(slot, result as usize) {
                            sink(datagram);
                            delivered += 1;
                        }
                    } else if result != -libc::EINTR && result != -libc::EAGAIN {
                        tracing::debug!(error = %io::Error::from_raw_os_error(-result), "recvmsg failed");
                    }
                    self.arm_recv(index)?;
                }
                TAG_SEND => {
                    if result < 0 && result != -libc::EMSGSIZE {
                        // Treated as loss; QUIC retransmits.
                        tracing::debug!(error = %io::Error::from_raw_os_error(-result), "sendmsg failed");
                    }
                    self.free_sends.push(index);
                }
                TAG_WAKE => self.wake_armed = false,
                _ => unreachable!("only our tags are submitted"),
            }
        }
        self.ready = ready;
        if !self.wake_armed {
            self.arm_wake()?;
        }
        Ok(delivered)
    }

    fn send(&mut self, t: &SendDatagram<'_>) -> io::Result<()> {
        // All slots in flight: the worker waits for a completion, and the
        // next `poll_recv` frees the finished ones.
        let Some(index) = self.free_sends.pop() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let slot = &mut self.send[index];
        slot.buf.clear();
        slot.buf.extend_from_slice(t.contents);
        slot.addr = to_sockaddr(t.destination);
        let control_len = write_send_control(&mut slot.control, t.segment_size, t.ecn);
        slot.arm(t.contents.len(), control_len);
        if control_len == 0 {
            slot.hdr.msg_control = std::ptr::null_mut();
        } else {
            slot.hdr.msg_control = slot.control.0.as_mut_ptr().cast();
        }
        let entry = opcode::SendMsg::new(types::Fd(self.socket.as_raw_fd()), &slot.hdr)
            .build()
            .user_data(TAG_SEND | index as u64);
        self.push(entry)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.ring.submit()?;
        Ok(())
    }

    fn max_gso_segments(&self) -> usize {
        self.max_gso
    }

    fn wait(
        &mut self,
        _waker: &Waker,
        timeout: Option<Duration>,
        _want_write: bool,
    ) -> io::Result<()> {
        // Any completion ends the wait: a datagram, a finished send (room
        // for the blocked one), or the eventfd read (a wake).
        let result = match timeout {
            Some(t) => {
                let ts = types::Timespec::new()
                    .sec(t.as_secs())
                    .nsec(t.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
            None => self.ring.submit_and_wait(1),
        };
        match result {
            Ok(_) => Ok(()),
            Err(e)
                if e.raw_os_error() == Some(libc::ETIME)
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn to_sockaddr(addr: SocketAddr) -> libc::sockaddr_in6 {
    let v6 = match addr {
        SocketAddr::V6(a) => a,
        // Workers only ever talk to IPv6 peers (v4 is dropped on receive).
        SocketAddr::V4(a) => SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0),
    };
    // SAFETY: all-zero is a valid sockaddr_in6.
    let mut out: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    out.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    out.sin6_port = v6.port().to_be();
    out.sin6_addr.s6_addr = v6.ip().octets();
    out.sin6_flowinfo = v6.flowinfo();
    out.sin6_scope_id = v6.scope_id();
    out
}

/// Writes the UDP_SEGMENT and IPV6_TCLASS cmsgs; returns the control length.
fn write_send_control(
    control: &mut Control,
    segment_size: Option<usize>,
    ecn: Option<EcnCodepoint>,
) -> usize {
    // SAFETY: a zeroed msghdr whose control points at our aligned buffer
    // lets the CMSG_* helpers walk it; every write stays inside
    // CMSG_SPACE-sized steps, which fit CONTROL_LEN (asserted by the sizes).
    control.0.fill(0);
    unsafe {
        let mut hdr: libc::msghdr = std::mem::zeroed();
        hdr.msg_control = control.0.as_mut_ptr().cast();
        hdr.msg_controllen = CONTROL_LEN;
        let mut len = 0usize;
        let mut cmsg = libc::CMSG_FIRSTHDR(&hdr);
        if let Some(segment) = segment_size {
            (*cmsg).cmsg_level = libc::SOL_UDP;
            (*cmsg).cmsg_type = libc::UDP_SEGMENT;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment as u16);
            len += libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) as usize;
            cmsg = libc::CMSG_NXTHDR(&hdr, cmsg);
        }
        if let Some(ecn) = ecn
            && !cmsg.is_null()
        {
            (*cmsg).cmsg_level = libc::IPPROTO_IPV6;
            (*cmsg).cmsg_type = libc::IPV6_TCLASS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
            std::ptr::write_unaligned(
                libc::CMSG_DATA(cmsg).cast::<libc::c_int>(),
                ecn as u8 as libc::c_int,
            );
            len += libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) as usize;
        }
        len
    }
}

fn parse_recv(slot: &Slot, len: usize) -> Option<RecvDatagram<'_>> {
    if slot.addr.sin6_family != libc::AF_INET6 as libc::sa_family_t {
        return None;
    }
    let ip = Ipv6Addr::from(slot.addr.sin6_addr.s6_addr);
    let remote = SocketAddr::V6(SocketAddrV6::new(
        ip,
        u16::from_be(slot.addr.sin6_port),
        slot.addr.sin6_flowinfo,
        slot.addr.sin6_scope_id,
    ));
    let mut stride = len;
    let mut local_ip = None;
    let mut ecn = None;
    // SAFETY: the kernel filled `msg_controllen` bytes of our control buffer
    // with well-formed cmsgs; CMSG_* walk only within that length.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&slot.hdr);
        while !cmsg.is_null() {
            let data = libc::CMSG_DATA(cmsg);
            match ((*cmsg).cmsg_level, (*cmsg).cmsg_type) {
                (libc::SOL_UDP, libc::UDP_GRO) => {
                    stride = std::ptr::read_unaligned(data.cast::<libc::c_int>()) as usize;
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    let info = std::ptr::read_unaligned(data.cast::<libc::in6_pktinfo>());
                    local_ip = Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
                }
                (libc::IPPROTO_IPV6, libc::IPV6_TCLASS) => {
                    let tclass = std::ptr::read_unaligned(data.cast::<libc::c_int>());
                    ecn = EcnCodepoint::from_bits(tclass as u8 & 0b11);
                }
                _ => {}
            }
            cmsg = libc::CMSG_NXTHDR(&slot.hdr, cmsg);
        }
    }
    Some(RecvDatagram {
        remote,
        local_ip,
        ecn,
        data: &slot.buf[..len],
        stride,
    })
}
