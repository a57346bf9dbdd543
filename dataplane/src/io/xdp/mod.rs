//! The `xdp` backend: one AF_XDP socket per worker, bound to one NIC queue.
//!
//! The XDP front door (`ebpf/xdp_front_door.c`) redirects IPv6 UDP to our
//! port from that queue into this socket's RX ring; the worker parses the
//! Ethernet, IPv6 and UDP headers itself (`frame`), hands the payload to the
//! same worker loop as the other backends, and returns the frame to the fill
//! ring at once. Transmits are written straight into free UMEM frames with
//! headers built here (checksummed), placed on the TX ring, and kicked once
//! per loop iteration; the completion ring gives the frames back.
//!
//! The next hop's MAC comes from the kernel's route and neighbour tables
//! over netlink (`neighbour`), cached per destination. Until it is known a
//! datagram goes out through the worker's ordinary kernel socket instead,
//! which makes the kernel resolve the neighbour (NDP) for the next lookup.
//! That socket also receives what the front door passes to the kernel:
//! fragments the kernel reassembled, packets from queues without an AF_XDP
//! socket. Nothing is lost when the fast path cannot take a packet.
//!
//! Copy mode works on any driver with XDP (veth included); zero-copy needs
//! driver support (`XDP_SETUP_XSK_POOL`), which `zero_copy = "on"` demands
//! and `"auto"` tries first.

pub mod frame;
pub mod neighbour;
mod umem;

use super::socket::SocketBackend;
use super::{Backend, RecvDatagram, SendDatagram, Waker, poll_many};
use crate::stats::Counters;
use frame::{HEADERS_LEN, Mac, Udp6Header};
use neighbour::NeighbourCache;
use quinn_proto::EcnCodepoint;
use serde::{Deserialize, Serialize};
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::num::NonZeroU32;
use std::time::{Duration, Instant};
use umem::{Area, FrameCounts};
use xdpilone::xdp::XdpDesc;
use xdpilone::{DeviceQueue, IfInfo, RingRx, RingTx, Socket, SocketConfig, Umem, UmemConfig};

/// Bytes per UMEM frame: a full 1500-byte MTU frame plus the kernel's
/// XDP_PACKET_HEADROOM (256) fit; a power of two, as aligned mode requires.
pub const FRAME_LEN: u32 = 2048;
/// Frames read from the RX ring per batch.
const RX_BATCH: u32 = 64;
/// RX batches per `poll_recv`: bounds how long a flood can starve sending.
const RX_BATCHES_PER_POLL: usize = 8;
/// How often a worker with frames stuck on the TX ring retries the kick.
const TX_RETRY: Duration = Duration::from_micros(100);
/// Hop limit of every IPv6 packet we build (RFC 8200 leaves it to the host;
/// Linux defaults to 64).
const HOP_LIMIT: u8 = 64;
/// In copy mode the kernel sends at most 32 frames per `sendto`
/// (TX_BATCH_SIZE in net/xdp/xsk.c) and answers EAGAIN to be called again.
const COPY_MODE_TX_BATCH: u32 = 32;

/// `[stoq_transport] zero_copy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ZeroCopy {
    /// Zero-copy where the driver supports it, copy mode elsewhere.
    Auto,
    /// Zero-copy or fail.
    On,
    /// Always copy mode.
    Off,
}

/// What one worker's AF_XDP socket binds to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdpSettings {
    pub interface: String,
    pub queue: u32,
    pub zero_copy: ZeroCopy,
    /// UMEM frames (a power of two): half for the fill ring, half for sends.
    pub frames: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error("interface `{interface}`: {source}")]
    Interface {
        interface: String,
        source: io::Error,
    },
    #[error("AF_XDP on {interface} queue {queue}: {step} failed: {source}")]
    Socket {
        interface: String,
        queue: u32,
        step: &'static str,
        source: io::Error,
    },
    #[error(
        "zero_copy = \"on\" but {interface} queue {queue} refused zero-copy ({source}); its driver lacks AF_XDP zero-copy support: use zero_copy = \"auto\" or \"off\""
    )]
    ZeroCopyUnsupported {
        interface: String,
        queue: u32,
        source: io::Error,
    },
    #[error("xdp_frames must be a power of two in 64..=262144, not {0}")]
    Frames(u32),
}

fn errno(e: xdpilone::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.get_raw())
}

/// The rings of one bound socket. Field order is drop order: rings and the
/// socket go before the UMEM registration, which goes before its memory.
struct Rings {
    rx: RingRx,
    tx: RingTx,
    device: DeviceQueue,
    _umem: Umem,
    area: Area,
    zero_copy: bool,
}

// SAFETY: `Umem` is not `Send` only because it holds a pointer to the
// area; the area is owned by the same `Rings` and moves with it. A backend
// is built on the main thread, moved to its worker once, and used only there.
unsafe impl Send for Rings {}

impl Rings {
    fn open(
        info: &IfInfo,
        frames: u32,
        bind_flags: u16,
    ) -> Result<Self, (&'static str, io::Error)> {
        let ring_len = frames / 2;
        let area = Area::new(frames as usize * FRAME_LEN as usize).map_err(|e| ("mmap", e))?;
        let config = UmemConfig {
            fill_size: ring_len,
            complete_size: ring_len,
            frame_size: FRAME_LEN,
            headroom: 0,
            flags: 0,
        };
        // SAFETY: the area is a fresh page-aligned mapping of exactly
        // `frames` frames, and `Rings` keeps it alive (declared last) for
        // as long as the UMEM registration exists.
        let umem =
            unsafe { Umem::new(config, area.as_slice_ptr()) }.map_err(|e| ("UMEM", errno(e)))?;
        let socket = Socket::with_shared(info, &umem).map_err(|e| ("socket", errno(e)))?;
        let device = umem
            .fq_cq(&socket)
            .map_err(|e| ("fill/completion rings", errno(e)))?;
        let ring = NonZeroU32::new(ring_len);
        let user = umem
            .rx_tx(
                &socket,
                &SocketConfig {
                    rx_size: ring,
                    tx_size: ring,
                    bind_flags: bind_flags | SocketConfig::XDP_BIND_NEED_WAKEUP,
                },
            )
            .map_err(|e| ("RX/TX rings", errno(e)))?;
        let rx = user
            .map_rx()
            .map_err(|e| ("mapping the RX ring", errno(e)))?;
        let tx = user
            .map_tx()
            .map_err(|e| ("mapping the TX ring", errno(e)))?;
        umem.bind(&user).map_err(|e| ("bind", errno(e)))?;
        Ok(Self {
            rx,
            tx,
            device,
            _umem: umem,
            area,
            zero_copy: bind_flags & SocketConfig::XDP_BIND_ZEROCOPY != 0,
        })
    }
}

pub struct XdpBackend {
    rings: Rings,
    /// The worker's ordinary UDP socket: the slow path (see module docs).
    kernel: SocketBackend,
    neighbours: NeighbourCache,
    local_mac: Mac,
    listen: SocketAddrV6,
    /// Frame offsets ready for sending.
    free: Vec<u64>,
    /// Frames the fill ring should hold.
    fill_target: u64,
    /// Entries in each ring.
    ring_len: u32,
    counts: FrameCounts,
    stats: XdpStats,
    /// Frames put on the TX ring since the last kick.
    unkicked: bool,
}

#[derive(Debug, Default)]
struct XdpStats {
    rx_frames: u64,
    rx_invalid: u64,
    tx_frames: u64,
    tx_kernel: u64,
    tx_full: u64,
    tx_kicks: u64,
}

impl XdpBackend {
    /// Create the UMEM and rings, bind them to the configured queue, and
    /// fill the fill ring. The socket is not yet fed: register
    /// [`XdpBackend::raw_fd`] in the front door's socket map.
    pub fn open(
        settings: &XdpSettings,
        listen: SocketAddrV6,
        kernel: SocketBackend,
    ) -> Result<Self, XdpError> {
        if !settings.frames.is_power_of_two() || !(64..=262_144).contains(&settings.frames) {
            return Err(XdpError::Frames(settings.frames));
        }
        let interface_error = |source| XdpError::Interface {
            interface: settings.interface.clone(),
            source,
        };
        let ifindex = neighbour::ifindex(&settings.interface).map_err(interface_error)?;
        let local_mac = neighbour::interface_mac(ifindex).map_err(interface_error)?;
        let mut info = IfInfo::invalid();
        info.from_ifindex(ifindex)
            .map_err(|e| interface_error(errno(e)))?;
        info.set_queue(settings.queue);
        let rings = Self::bind(settings, &info)?;
        let neighbours = NeighbourCache::new(ifindex).map_err(|source| XdpError::Socket {
            interface: settings.interface.clone(),
            queue: settings.queue,
            step: "netlink",
            source,
        })?;
        let frames = u64::from(settings.frames);
        let mut backend = Self {
            rings,
            kernel,
            neighbours,
            local_mac,
            listen,
            free: (0..frames).map(|i| i * u64::from(FRAME_LEN)).collect(),
            fill_target: frames / 2,
            ring_len: settings.frames / 2,
            counts: FrameCounts {
                total: frames,
                free: frames,
                fill: 0,
                tx: 0,
            },
            stats: XdpStats::default(),
            unkicked: false,
        };
        backend.refill();
        Ok(backend)
    }

    /// Bind per `zero_copy`: `auto` tries zero-copy and falls back to copy
    /// mode (logged) on a driver without it.
    fn bind(settings: &XdpSettings, info: &IfInfo) -> Result<Rings, XdpError> {
        let socket_error = |(step, source)| XdpError::Socket {
            interface: settings.interface.clone(),
            queue: settings.queue,
            step,
            source,
        };
        match settings.zero_copy {
            ZeroCopy::Off => Rings::open(info, settings.frames, SocketConfig::XDP_BIND_COPY)
                .map_err(socket_error),
            ZeroCopy::On => Rings::open(info, settings.frames, SocketConfig::XDP_BIND_ZEROCOPY)
                .map_err(|(step, source)| match step {
                    "bind" => XdpError::ZeroCopyUnsupported {
                        interface: settings.interface.clone(),
                        queue: settings.queue,
                        source,
                    },
                    _ => socket_error((step, source)),
                }),
            ZeroCopy::Auto => {
                match Rings::open(info, settings.frames, SocketConfig::XDP_BIND_ZEROCOPY) {
                    Ok(rings) => Ok(rings),
                    Err(("bind", e)) => {
                        tracing::info!(
                            interface = settings.interface,
                            queue = settings.queue,
                            reason = %e,
                            "AF_XDP zero-copy unavailable on this driver; copy mode"
                        );
                        Rings::open(info, settings.frames, SocketConfig::XDP_BIND_COPY)
                            .map_err(socket_error)
                    }
                    Err(other) => Err(socket_error(other)),
                }
            }
        }
    }

    /// The socket to register in the front door's `xsks` map.
    pub fn raw_fd(&self) -> i32 {
        self.rings.rx.as_raw_fd()
    }

    pub fn zero_copy(&self) -> bool {
        self.rings.zero_copy
    }

    /// Top the fill ring up to its target from the free list.
    fn refill(&mut self) {
        loop {
            let want = self.fill_target.saturating_sub(self.counts.fill);
            let want = want.min(self.free.len() as u64) as u32;
            if want == 0 {
                break;
            }
            let mut writer = self.rings.device.fill(want);
            // Take exactly the reserved count: `insert` would drop an item it
            // pulled from the iterator when the ring had no slot for it.
            let n = writer.capacity() as usize;
            let start = self.free.len() - n;
            let put = writer.insert(self.free[start..].iter().copied()) as usize;
            writer.commit();
            drop(writer);
            self.free.truncate(self.free.len() - put);
            self.counts.free -= put as u64;
            self.counts.fill += put as u64;
            if put == 0 {
                break;
            }
        }
        if self.rings.device.needs_wakeup() {
            self.rings.device.wake();
        }
    }

    /// Take back the frames the kernel finished sending.
    fn reap_completions(&mut self) {
        let mut reader = self.rings.device.complete(u32::MAX);
        while let Some(addr) = reader.read() {
            self.free.push(addr & !u64::from(FRAME_LEN - 1));
        }
        let n = reader.capacity() as u64;
        reader.release();
        self.counts.tx -= n;
        self.counts.free += n;
    }

    /// Ask the kernel to send what is on the TX ring. Copy mode sends at
    /// most 32 frames per call, so call until the ring drained or the
    /// device pushes back (then the next loop iteration retries).
    fn kick(&mut self) {
        let rounds = self.rings.tx.pending() / COPY_MODE_TX_BATCH + 2;
        for _ in 0..rounds {
            if self.rings.tx.pending() == 0 {
                break;
            }
            if self.rings.zero_copy && !self.rings.tx.needs_wakeup() {
                break;
            }
            self.stats.tx_kicks += 1;
            // SAFETY: a zero-length sendto on our own AF_XDP socket with no
            // buffers or address; it only triggers transmission.
            let rc = unsafe {
                libc::sendto(
                    self.rings.tx.as_raw_fd(),
                    std::ptr::null(),
                    0,
                    libc::MSG_DONTWAIT,
                    std::ptr::null(),
                    0,
                )
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    // Budget spent or the device queue is busy: go again.
                    Some(libc::EAGAIN | libc::EBUSY | libc::ENOBUFS | libc::EINTR) => {}
                    _ => {
                        tracing::debug!(error = %e, "AF_XDP transmit kick failed");
                        break;
                    }
                }
            }
        }
        self.unkicked = self.rings.tx.pending() > 0;
    }

    /// Put `t`'s segments on the TX ring, all or none.
    fn send_frames(&mut self, t: &SendDatagram<'_>, header: &Udp6Header) -> io::Result<()> {
        let segment = t.segment_size.unwrap_or(t.contents.len()).max(1);
        if segment + HEADERS_LEN > FRAME_LEN as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("datagram of {segment} bytes does not fit an AF_XDP frame"),
            ));
        }
        let n = t.contents.len().div_ceil(segment);
        if self.free.len() < n {
            self.reap_completions();
        }
        if self.free.len() < n {
            self.kick();
            self.reap_completions();
        }
        if self.free.len() < n {
            self.stats.tx_full += 1;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if self.tx_ring_free() < n {
            self.stats.tx_full += 1;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        // The ring may hand out fewer slots than are free (it answers from a
        // cached consumer index and refreshes only when that shows none), so
        // reserve until all n are placed; the check above guarantees room.
        let mut payloads = t.contents.chunks(segment);
        let mut left = n;
        while left > 0 {
            let mut writer = self.rings.tx.transmit(left as u32);
            let slots = writer.capacity() as usize;
            if slots == 0 {
                debug_assert!(false, "the TX ring had room for {left} more");
                break;
            }
            for payload in payloads.by_ref().take(slots) {
                let addr = self.free.pop().expect("checked: n frames are free");
                let frame = self
                    .rings
                    .area
                    .bytes_mut(addr, FRAME_LEN as usize)
                    .expect("free frames lie inside the UMEM");
                frame[HEADERS_LEN..HEADERS_LEN + payload.len()].copy_from_slice(payload);
                let len = frame::write_headers(frame, header, payload.len())
                    .expect("checked: the datagram fits the frame");
                writer.insert_once(XdpDesc {
                    addr,
                    len: len as u32,
                    options: 0,
                });
            }
            writer.commit();
            left -= slots;
        }
        let n = n as u64;
        self.counts.free -= n;
        self.counts.tx += n;
        self.stats.tx_frames += n;
        self.unkicked = true;
        Ok(())
    }

    /// TX ring slots the kernel has consumed (the true count, not the
    /// ring's cached view).
    fn tx_ring_free(&self) -> usize {
        (self.ring_len - self.rings.tx.pending()) as usize
    }

    /// Our address for a reply: the one the peer wrote to.
    fn source_ip(&self, t: &SendDatagram<'_>) -> Option<Ipv6Addr> {
        match t.src_ip {
            Some(IpAddr::V6(ip)) => Some(ip),
            Some(IpAddr::V4(_)) => None,
            None if !self.listen.ip().is_unspecified() => Some(*self.listen.ip()),
            None => None,
        }
    }
}

impl Backend for XdpBackend {
    fn name(&self) -> &'static str {
        "xdp"
    }

    fn poll_recv(&mut self, sink: &mut dyn FnMut(RecvDatagram<'_>)) -> io::Result<usize> {
        self.reap_completions();
        let mut delivered = 0;
        let port = self.listen.port();
        let listen_ip = *self.listen.ip();
        let for_us = |dst: &SocketAddrV6| {
            dst.port() == port && (listen_ip.is_unspecified() || *dst.ip() == listen_ip)
        };
        for _ in 0..RX_BATCHES_PER_POLL {
            let mut reader = self.rings.rx.receive(RX_BATCH);
            let n = reader.capacity();
            if n == 0 {
                break;
            }
            while let Some(desc) = reader.read() {
                self.free.push(desc.addr & !u64::from(FRAME_LEN - 1));
                let parsed = self
                    .rings
                    .area
                    .bytes(desc.addr, desc.len as usize)
                    .ok_or(frame::FrameError::Truncated)
                    .and_then(frame::parse_udp6);
                match parsed {
                    Ok(udp) if for_us(&udp.header().dst) => {
                        let header = udp.header();
                        sink(RecvDatagram {
                            remote: SocketAddr::V6(header.src),
                            local_ip: Some(IpAddr::V6(*header.dst.ip())),
                            ecn: EcnCodepoint::from_bits(header.traffic_class & 0b11),
                            data: udp.payload,
                            stride: 0,
                        });
                        delivered += 1;
                    }
                    _ => self.stats.rx_invalid += 1,
                }
            }
            reader.release();
            drop(reader);
            let n = u64::from(n);
            self.stats.rx_frames += n;
            self.counts.fill -= n;
            self.counts.free += n;
            self.refill();
            if n < u64::from(RX_BATCH) {
                break;
            }
        }
        delivered += self.kernel.poll_recv(sink)?;
        Ok(delivered)
    }

    fn send(&mut self, t: &SendDatagram<'_>) -> io::Result<()> {
        let (SocketAddr::V6(destination), Some(src)) = (t.destination, self.source_ip(t)) else {
            return self.kernel.send(t);
        };
        let Some(dst_mac) = self.neighbours.lookup(*destination.ip(), Instant::now()) else {
            self.stats.tx_kernel += 1;
            return self.kernel.send(t);
        };
        let header = Udp6Header {
            src_mac: self.local_mac,
            dst_mac,
            src: SocketAddrV6::new(src, self.listen.port(), 0, 0),
            dst: SocketAddrV6::new(*destination.ip(), destination.port(), 0, 0),
            traffic_class: t.ecn.map_or(0, |e| e as u8),
            hop_limit: HOP_LIMIT,
        };
        self.send_frames(t, &header)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.unkicked {
            self.kick();
        }
        self.reap_completions();
        self.kernel.flush()
    }

    fn max_gso_segments(&self) -> usize {
        // Segments are split into frames here; batches still save work.
        crate::worker::GSO_SEGMENTS_MAX
    }

    fn publish(&self, counters: &mut Counters) {
        counters.xdp_rx_frames = self.stats.rx_frames;
        counters.xdp_rx_invalid = self.stats.rx_invalid;
        counters.xdp_tx_frames = self.stats.tx_frames;
        counters.xdp_tx_kernel = self.stats.tx_kernel;
        counters.xdp_tx_full = self.stats.tx_full;
        counters.xdp_tx_kicks = self.stats.tx_kicks;
        counters.xdp_neighbour_queries = self.neighbours.stats().queries;
        counters.xdp_frames_total = self.counts.total;
        counters.xdp_frames_free = self.counts.free;
        counters.xdp_frames_fill = self.counts.fill;
        counters.xdp_frames_tx = self.counts.tx;
    }

    fn wait(
        &mut self,
        waker: &Waker,
        timeout: Option<Duration>,
        want_write: bool,
    ) -> io::Result<()> {
        if self.rings.tx.pending() > 0 {
            self.kick();
        }
        self.reap_completions();
        let room = crate::worker::GSO_SEGMENTS_MAX;
        if want_write && self.free.len() >= room && self.tx_ring_free() >= room {
            return Ok(());
        }
        // Frames still on the TX ring need another kick soon: nothing else
        // would wake us for them.
        let timeout = if self.rings.tx.pending() > 0 || want_write {
            Some(timeout.map_or(TX_RETRY, |t| t.min(TX_RETRY)))
        } else {
            timeout
        };
        poll_many(
            &[
                (self.rings.rx.as_raw_fd(), libc::POLLIN),
                (self.kernel.raw_fd(), libc::POLLIN),
            ],
            waker,
            timeout,
        )
    }
}

const _: () = assert!(FRAME_LEN.is_power_of_two());
const _: () = assert!(HEADERS_LEN + crate::worker::UDP_PAYLOAD_MAX + 256 <= FRAME_LEN as usize);
