//! The `uring` backend: io_uring with one multishot `recvmsg` over a ring
//! of provided buffers (GRO on), `sendmsg` with a `UDP_SEGMENT` cmsg for
//! each GSO batch, and a read on the worker's eventfd so wakes end the ring
//! wait.
//!
//! Receiving: one armed multishot receive waits on the socket and posts a
//! completion per datagram (or GRO batch) into whichever provided buffer is
//! free; the buffer goes back to the ring once the worker has handled it.
//! On kernels without provided-buffer rings (before 5.19), or that refuse
//! multishot `recvmsg` (before 6.0: the first completion says so), the
//! backend keeps a standing batch of single-shot `recvmsg` operations
//! instead, each of which wakes on every datagram.
//!
//! Every operation owns memory (buffer, `msghdr`, address, control space)
//! that stays pinned in a `Box` or the buffer ring until its completion
//! arrives.

use super::{Backend, IoBatch, RECV_BUF_LEN, RecvDatagram, SendDatagram, SendHeader, Waker};
use io_uring::{IoUring, cqueue, opcode, types};
use quinn_proto::EcnCodepoint;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

/// Most receive buffers a worker keeps (`[stoq_transport] uring_recv_ops`).
pub const RECV_OPS_MAX: usize = 1024;
/// The buffer group of the provided receive buffers (one per ring).
const RECV_BUFFER_GROUP: u16 = 0;
/// The kernel's `struct io_uring_recvmsg_out` at the start of every
/// multishot receive buffer (four u32 fields).
const RECVMSG_OUT_LEN: usize = 16;
/// Most send operations in flight (`[stoq_transport] uring_send_ops`); a full
/// set reports `WouldBlock` until one completes.
pub const SEND_OPS_MAX: usize = 4096;

const CONTROL_LEN: usize = 128;
const TAG_RECV: u64 = 1 << 32;
const TAG_SEND: u64 = 2 << 32;
const TAG_WAKE: u64 = 3 << 32;
const TAG_MULTISHOT: u64 = 4 << 32;
const TAG_CANCEL: u64 = 5 << 32;
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
    // Dropped first: the kernel lets go of the receive buffers with it.
    ring: IoUring,
    socket: UdpSocket,
    recv: Receiver,
    send: Vec<Box<Slot>>,
    free_sends: Vec<usize>,
    wake_buf: Box<u64>,
    wake_armed: bool,
    waker_fd: i32,
    max_gso: usize,
    /// Completions reaped: (user data, result, flags).
    ready: Vec<(u64, i32, u32)>,
}

// Each slot is boxed on its own (see `UringBackend`).
#[allow(clippy::vec_box)]
enum Receiver {
    /// One multishot `recvmsg` over provided buffers.
    Multishot { buffers: BufRing, armed: bool },
    /// Single-shot `recvmsg` operations, each with its own slot. `retired`
    /// is the buffer ring of a multishot receive the kernel refused, kept
    /// alive (and read from) while a completion of it may still arrive.
    Armed {
        slots: Vec<Box<Slot>>,
        retired: Option<BufRing>,
    },
}

/// A provided-buffer ring: `len` receive buffers the kernel picks from, and
/// the ring of entries through which the worker hands them (back) to it.
struct BufRing {
    /// `len` ring entries, page-aligned as the kernel requires.
    entries: std::ptr::NonNull<types::BufRingEntry>,
    entries_layout: std::alloc::Layout,
    /// `len` buffers of `buf_len` bytes each.
    buffers: std::ptr::NonNull<u8>,
    buffers_layout: std::alloc::Layout,
    buf_len: usize,
    len: u16,
    /// The tail the worker has written up to (published with `publish`).
    tail: u16,
    /// The `msghdr` the multishot receive was armed with: only its name
    /// and control lengths matter, and they lay out every buffer.
    hdr: Box<libc::msghdr>,
}

// SAFETY: the ring and buffers are owned allocations that only this worker
// touches (and the kernel, through the ring it was registered with).
unsafe impl Send for BufRing {}

impl BufRing {
    /// `len` buffers (a power of two), each with room for the multishot
    /// header, a sockaddr_in6, `CONTROL_LEN` of cmsgs and `RECV_BUF_LEN`
    /// of datagrams.
    fn new(len: u16) -> io::Result<Self> {
        debug_assert!(len.is_power_of_two());
        let name_len = std::mem::size_of::<libc::sockaddr_in6>();
        let buf_len =
            (RECVMSG_OUT_LEN + name_len + CONTROL_LEN + RECV_BUF_LEN).next_multiple_of(64);
        let page = 4096;
        let entries_layout = std::alloc::Layout::from_size_align(
            usize::from(len) * std::mem::size_of::<types::BufRingEntry>(),
            page,
        )
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let buffers_layout = std::alloc::Layout::from_size_align(usize::from(len) * buf_len, page)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: both layouts have a non-zero size (len >= 1).
        let entries = std::ptr::NonNull::new(
            unsafe { std::alloc::alloc_zeroed(entries_layout) }.cast::<types::BufRingEntry>(),
        )
        .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        let Some(buffers) = std::ptr::NonNull::new(unsafe { std::alloc::alloc(buffers_layout) })
        else {
            // SAFETY: allocated just above with this layout.
            unsafe { std::alloc::dealloc(entries.as_ptr().cast(), entries_layout) };
            return Err(io::ErrorKind::OutOfMemory.into());
        };
        // SAFETY: all-zero is a valid msghdr.
        let mut hdr: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        hdr.msg_namelen = name_len as libc::socklen_t;
        hdr.msg_controllen = CONTROL_LEN;
        let mut ring = Self {
            entries,
            entries_layout,
            buffers,
            buffers_layout,
            buf_len,
            len,
            tail: 0,
            hdr,
        };
        for bid in 0..len {
            ring.provide(bid);
        }
        ring.publish();
        Ok(ring)
    }

    /// Queue buffer `bid` for the kernel (visible after `publish`).
    fn provide(&mut self, bid: u16) {
        let index = usize::from(self.tail & (self.len - 1));
        // SAFETY: index < len entries; the kernel reads only entries below
        // the published tail, and this one is past it until `publish`.
        let entry = unsafe { &mut *self.entries.as_ptr().add(index) };
        // SAFETY: bid < len, so the buffer lies inside the allocation.
        let addr = unsafe { self.buffers.as_ptr().add(usize::from(bid) * self.buf_len) };
        entry.set_addr(addr as u64);
        entry.set_len(self.buf_len as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Make every provided buffer visible to the kernel.
    fn publish(&self) {
        // SAFETY: the tail field lives in the first entry of the ring, which
        // is initialised; the kernel reads it with acquire semantics.
        unsafe {
            let tail = types::BufRingEntry::tail(self.entries.as_ptr()) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// The first `len` bytes of buffer `bid`, which the kernel has filled.
    fn buffer(&self, bid: u16, len: usize) -> Option<&[u8]> {
        if bid >= self.len || len > self.buf_len {
            return None;
        }
        // SAFETY: in bounds (checked), and the kernel is done with this
        // buffer until it is provided again.
        Some(unsafe {
            std::slice::from_raw_parts(
                self.buffers.as_ptr().add(usize::from(bid) * self.buf_len),
                len,
            )
        })
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with these layouts; the ring that used
        // them was dropped first (field order of `UringBackend`).
        unsafe {
            std::alloc::dealloc(self.entries.as_ptr().cast(), self.entries_layout);
            std::alloc::dealloc(self.buffers.as_ptr(), self.buffers_layout);
        }
    }
}

impl UringBackend {
    /// Queue one `sendmsg` from a free send slot whose buffer `fill` writes
    /// (the whole buffer is the datagram). `WouldBlock` when every slot is in
    /// flight: the next `poll_recv` frees the finished ones, and `fill` was
    /// not called.
    fn send_from_slot(
        &mut self,
        fill: impl FnOnce(&mut Vec<u8>),
        destination: SocketAddr,
        segment_size: Option<usize>,
        ecn: Option<EcnCodepoint>,
    ) -> io::Result<()> {
        let Some(index) = self.free_sends.pop() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let slot = &mut self.send[index];
        fill(&mut slot.buf);
        slot.addr = to_sockaddr(destination);
        let control_len = write_send_control(&mut slot.control, segment_size, ecn);
        slot.arm(slot.buf.len(), control_len);
        if control_len == 0 {
            slot.hdr.msg_control = std::ptr::null_mut();
        } else {
            slot.hdr.msg_control = slot.control.0.as_mut_ptr().cast();
        }
        let entry = opcode::SendMsg::new(types::Fd(self.socket.as_raw_fd()), &slot.hdr)
            .build()
            .user_data(TAG_SEND | index as u64);
        let pushed = self.push(entry);
        if pushed.is_err() {
            // Not queued: the kernel never saw the slot, which is free again
            // (the datagram is lost, as any failed send).
            self.free_sends.push(index);
        }
        pushed
    }
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
        let recv = match Self::buffer_ring(&ring, recv_ops) {
            Ok(buffers) => Receiver::Multishot {
                buffers,
                armed: false,
            },
            Err(e) => {
                tracing::info!(error = %e, "no provided-buffer ring; io_uring receives one datagram per operation");
                Receiver::Armed {
                    slots: (0..recv_ops).map(|_| Slot::new(RECV_BUF_LEN)).collect(),
                    retired: None,
                }
            }
        };
        let mut backend = Self {
            ring,
            socket,
            recv,
            send: (0..send_ops).map(|_| Slot::new(0)).collect(),
            free_sends: (0..send_ops).rev().collect(),
            wake_buf: Box::new(0),
            wake_armed: false,
            waker_fd: waker.fd(),
            max_gso,
            ready: Vec::with_capacity(entries as usize * 2),
        };
        match &backend.recv {
            Receiver::Multishot { .. } => backend.arm_multishot()?,
            Receiver::Armed { slots, .. } => {
                for index in 0..slots.len() {
                    backend.arm_recv(index)?;
                }
            }
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

    /// `count` provided buffers (rounded up to a power of two), registered
    /// with `ring`; fails where the kernel has no provided-buffer rings.
    fn buffer_ring(ring: &IoUring, count: usize) -> io::Result<BufRing> {
        let len = count.clamp(1, RECV_OPS_MAX).next_power_of_two() as u16;
        let buffers = BufRing::new(len)?;
        // SAFETY: the entries stay allocated, unmoved, until after the ring
        // is dropped (field order of `UringBackend`).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                buffers.entries.as_ptr() as u64,
                len,
                RECV_BUFFER_GROUP,
                0,
            )?;
        }
        Ok(buffers)
    }

    fn arm_multishot(&mut self) -> io::Result<()> {
        let Receiver::Multishot { buffers, armed } = &mut self.recv else {
            return Ok(());
        };
        let entry = opcode::RecvMsgMulti::new(
            types::Fd(self.socket.as_raw_fd()),
            &*buffers.hdr,
            RECV_BUFFER_GROUP,
        )
        .build()
        .user_data(TAG_MULTISHOT);
        *armed = true;
        self.push(entry)
    }

    /// The kernel has provided-buffer rings but refused multishot
    /// `recvmsg` (5.19 has the one, only 6.0 the other): cancel it and
    /// receive with single-shot operations, one per buffer.
    fn single_shot(&mut self) -> io::Result<()> {
        let retired = Receiver::Armed {
            slots: Vec::new(),
            retired: None,
        };
        let Receiver::Multishot { buffers, armed } = std::mem::replace(&mut self.recv, retired)
        else {
            return Ok(());
        };
        tracing::warn!(
            "the kernel refuses multishot recvmsg; io_uring receives one datagram per operation"
        );
        if armed {
            let cancel = opcode::AsyncCancel::new(TAG_MULTISHOT)
                .build()
                .user_data(TAG_CANCEL);
            self.push(cancel)?;
        }
        let count = usize::from(buffers.len);
        self.recv = Receiver::Armed {
            slots: (0..count).map(|_| Slot::new(RECV_BUF_LEN)).collect(),
            retired: Some(buffers),
        };
        for index in 0..count {
            self.arm_recv(index)?;
        }
        Ok(())
    }

    fn arm_recv(&mut self, index: usize) -> io::Result<()> {
        let Receiver::Armed { slots, .. } = &mut self.recv else {
            return Ok(());
        };
        let slot = &mut slots[index];
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
        self.ready.extend(
            self.ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
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
        let mut refused = false;
        let ready = std::mem::take(&mut self.ready);
        for &(user_data, result, flags) in &ready {
            let index = (user_data & !TAG_MASK) as usize;
            match user_data & TAG_MASK {
                TAG_MULTISHOT => {
                    let (buffers, live) = match &mut self.recv {
                        Receiver::Multishot { buffers, armed } => {
                            // ENOBUFS (every buffer waiting here) or an
                            // error ends the multishot receive: armed again
                            // below, once the buffers are back.
                            if !cqueue::more(flags) {
                                *armed = false;
                            }
                            (buffers, true)
                        }
                        Receiver::Armed {
                            retired: Some(buffers),
                            ..
                        } => (buffers, false),
                        Receiver::Armed { retired: None, .. } => continue,
                    };
                    if result >= 0
                        && let Some(bid) = cqueue::buffer_select(flags)
                    {
                        if let Some(datagram) = buffers
                            .buffer(bid, result as usize)
                            .and_then(|b| parse_multishot(b, &buffers.hdr))
                        {
                            sink(datagram);
                            delivered += 1;
                        }
                        if live {
                            buffers.provide(bid);
                        }
                    } else if live && (result == -libc::EINVAL || result == -libc::EOPNOTSUPP) {
                        refused = true;
                    } else if result < 0 && result != -libc::ENOBUFS && result != -libc::ECANCELED {
                        tracing::debug!(error = %io::Error::from_raw_os_error(-result), "recvmsg failed");
                    }
                }
                TAG_RECV => {
                    if let Receiver::Armed { slots, .. } = &self.recv {
                        if result >= 0 {
                            if let Some(datagram) = parse_recv(&slots[index], result as usize) {
                                sink(datagram);
                                delivered += 1;
                            }
                        } else if result != -libc::EINTR && result != -libc::EAGAIN {
                            tracing::debug!(error = %io::Error::from_raw_os_error(-result), "recvmsg failed");
                        }
                        self.arm_recv(index)?;
                    }
                }
                TAG_SEND => {
                    if result < 0 && result != -libc::EMSGSIZE {
                        // Treated as loss; QUIC retransmits.
                        tracing::debug!(error = %io::Error::from_raw_os_error(-result), "sendmsg failed");
                    }
                    self.free_sends.push(index);
                }
                TAG_WAKE => self.wake_armed = false,
                TAG_CANCEL => {}
                _ => unreachable!("only our tags are submitted"),
            }
        }
        self.ready = ready;
        if refused {
            self.single_shot()?;
        }
        if let Receiver::Multishot { buffers, armed } = &self.recv {
            buffers.publish();
            if !armed {
                self.arm_multishot()?;
            }
        }
        if !self.wake_armed {
            self.arm_wake()?;
        }
        Ok(delivered)
    }

    fn send(&mut self, t: &SendDatagram<'_>) -> io::Result<()> {
        self.send_from_slot(
            |buf| {
                buf.clear();
                buf.extend_from_slice(t.contents);
            },
            t.destination,
            t.segment_size,
            t.ecn,
        )
    }

    fn send_owned(&mut self, header: &SendHeader, buf: &mut Vec<u8>) -> io::Result<()> {
        // The slot sends from the caller's buffer, and the caller gets the
        // slot's finished one back to write its next transmit into.
        self.send_from_slot(
            |slot_buf| {
                std::mem::swap(slot_buf, buf);
                buf.clear();
            },
            header.destination,
            header.segment_size,
            header.ecn,
        )
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
    let control = &slot.control.0[..slot.hdr.msg_controllen.min(CONTROL_LEN)];
    parse_datagram(&slot.addr, control, &slot.buf[..len])
}

/// A multishot completion's buffer: the kernel's header, then the name and
/// control fields laid out by `hdr`'s lengths, then the datagram(s).
fn parse_multishot<'a>(buffer: &'a [u8], hdr: &libc::msghdr) -> Option<RecvDatagram<'a>> {
    let out = types::RecvMsgOut::parse(buffer, hdr).ok()?;
    if out.is_payload_truncated() || out.is_name_data_truncated() {
        return None;
    }
    let name = out.name_data();
    if name.len() < std::mem::size_of::<libc::sockaddr_in6>() {
        return None;
    }
    // SAFETY: at least size_of::<sockaddr_in6>() bytes, read unaligned; any
    // bytes are a valid sockaddr_in6.
    let addr = unsafe { std::ptr::read_unaligned(name.as_ptr().cast::<libc::sockaddr_in6>()) };
    // The payload lies after the fixed-size name and control fields (its
    // slice is taken from `buffer` to keep the buffer's lifetime).
    let start = RECVMSG_OUT_LEN + hdr.msg_namelen as usize + hdr.msg_controllen;
    let payload = buffer.get(start..start + out.payload_data().len())?;
    parse_datagram(&addr, out.control_data(), payload)
}

/// The datagram(s) from `addr`, with what the cmsgs in `control` say: the
/// GRO stride, the local address, the ECN bits.
fn parse_datagram<'a>(
    addr: &libc::sockaddr_in6,
    control: &[u8],
    data: &'a [u8],
) -> Option<RecvDatagram<'a>> {
    if addr.sin6_family != libc::AF_INET6 as libc::sa_family_t {
        return None;
    }
    let remote = SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::from(addr.sin6_addr.s6_addr),
        u16::from_be(addr.sin6_port),
        addr.sin6_flowinfo,
        addr.sin6_scope_id,
    ));
    let mut stride = data.len();
    let mut local_ip = None;
    let mut ecn = None;
    // The cmsgs, copied to aligned memory for the CMSG_* walk.
    let mut aligned = Control([0; CONTROL_LEN]);
    let control_len = control.len().min(CONTROL_LEN);
    aligned.0[..control_len].copy_from_slice(&control[..control_len]);
    // SAFETY: a zeroed msghdr pointing at our aligned copy of the cmsgs the
    // kernel wrote; CMSG_* walk only within `control_len`.
    unsafe {
        let mut hdr: libc::msghdr = std::mem::zeroed();
        hdr.msg_control = aligned.0.as_mut_ptr().cast();
        hdr.msg_controllen = control_len;
        let mut cmsg = libc::CMSG_FIRSTHDR(&hdr);
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
            cmsg = libc::CMSG_NXTHDR(&hdr, cmsg);
        }
    }
    Some(RecvDatagram {
        remote,
        local_ip,
        ecn,
        data,
        stride,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    const DATAGRAMS: usize = 12;

    /// Skip with a printed reason, or fail in CI, which runs on a kernel
    /// with io_uring and provided-buffer rings.
    fn skip_or_fail(reason: &str) {
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!("CI must be able to run this test, but: {reason}");
        }
        eprintln!("SKIPPED: {reason}");
    }

    /// A backend with 2 receive buffers on a loopback socket, receiving
    /// with multishot `recvmsg`; `None` (after `skip_or_fail`) where the
    /// kernel cannot.
    fn multishot_backend(waker: &Waker) -> Option<(UringBackend, SocketAddr)> {
        let socket = UdpSocket::bind("[::1]:0").expect("bind [::1]");
        let addr = socket.local_addr().expect("local address");
        let batch = IoBatch {
            recv_ops: 2,
            send_ops: 1,
        };
        let backend = match UringBackend::new(socket, waker, 1, batch) {
            Ok(backend) => backend,
            Err(e) => {
                skip_or_fail(&format!("io_uring unavailable: {e}"));
                return None;
            }
        };
        if !matches!(backend.recv, Receiver::Multishot { .. }) {
            skip_or_fail("the kernel has no provided-buffer rings");
            return None;
        }
        Some((backend, addr))
    }

    /// Send `DATAGRAMS` numbered datagrams to `addr` at once, then receive
    /// them (10 s at most); asserts they all arrived, in order, from the
    /// sender.
    fn send_and_receive_all(backend: &mut UringBackend, waker: &Waker, addr: SocketAddr) {
        let sender = UdpSocket::bind("[::1]:0").expect("bind [::1]");
        let from = sender.local_addr().expect("local address");
        for i in 0..DATAGRAMS {
            sender.send_to(&[i as u8; 100], addr).expect("send");
        }
        let mut received = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while received.len() < DATAGRAMS && Instant::now() < deadline {
            backend
                .wait(waker, Some(Duration::from_millis(100)), false)
                .expect("wait");
            backend
                .poll_recv(&mut |d| {
                    assert_eq!(d.remote, from);
                    received.push(d.data.to_vec());
                })
                .expect("poll_recv");
        }
        let sent: Vec<Vec<u8>> = (0..DATAGRAMS).map(|i| vec![i as u8; 100]).collect();
        assert_eq!(received, sent);
    }

    /// More datagrams queue on the socket than there are receive buffers:
    /// the multishot receive runs out of buffers and ends, is armed again
    /// once they are back, and every datagram arrives in order with its
    /// sender.
    #[test]
    fn datagrams_beyond_the_receive_buffers_wait_and_all_arrive() {
        let waker = Waker::new().expect("eventfd");
        let Some((mut backend, addr)) = multishot_backend(&waker) else {
            return;
        };
        send_and_receive_all(&mut backend, &waker, addr);
    }

    /// The switch a kernel that refuses multishot `recvmsg` causes: the
    /// armed multishot receive is cancelled, single-shot receives take
    /// over, and every datagram still arrives in order.
    #[test]
    fn after_falling_back_to_single_shot_receives_datagrams_arrive() {
        let waker = Waker::new().expect("eventfd");
        let Some((mut backend, addr)) = multishot_backend(&waker) else {
            return;
        };
        backend.single_shot().expect("fall back");
        assert!(matches!(
            backend.recv,
            Receiver::Armed {
                retired: Some(_),
                ..
            }
        ));
        send_and_receive_all(&mut backend, &waker, addr);
    }
}
