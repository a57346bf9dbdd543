//! Next-hop MAC resolution for the AF_XDP transmit path.
//!
//! AF_XDP bypasses the kernel's IPv6 output path, so the backend has to write
//! whole Ethernet frames itself, including the destination MAC. That MAC is
//! the link-layer address of the *next hop*: the destination itself when it is
//! on-link, or the gateway of the route otherwise. The kernel already knows
//! both answers (routing table + neighbour cache), so instead of duplicating
//! Neighbour Discovery we ask it over rtnetlink:
//!
//! 1. `RTM_GETROUTE` for the destination gives the output interface and the
//!    gateway (if any), exactly as the kernel would route the packet;
//! 2. `RTM_GETNEIGH` for the next-hop address on that interface gives its MAC
//!    and NUD state.
//!
//! We never *trigger* resolution ourselves. When no usable entry exists the
//! caller sends that packet through the kernel's own UDP socket, which makes
//! the kernel run Neighbour Discovery; a later lookup then finds the entry.
//!
//! [`NeighbourCache`] puts a per-worker, lock-free cache in front of this so
//! the hot path costs a hash lookup, and netlink is only asked when an entry is
//! new or due for a re-check (positive answers after `ttl`, negative ones after
//! `retry`, so a burst of packets to an unresolved destination costs at most
//! one netlink round trip per `retry`).
//!
//! Known limitation: the kernel only refreshes a neighbour entry (STALE ->
//! DELAY -> PROBE -> REACHABLE) when *it* sends traffic through it. Traffic we
//! send over AF_XDP is invisible to it, so a STALE entry stays STALE and we
//! keep using its MAC. If the peer's MAC changes without the kernel noticing
//! (gratuitous NA, or our kernel-path traffic), we keep sending to the old MAC
//! until the kernel's garbage collector drops the entry; then the lookup
//! misses, the caller uses the kernel path, and the kernel re-resolves.

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_MULTIPART, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteType, RouteVia,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;
use netlink_sys::{Socket, SocketAddr};

pub use super::frame::Mac;

/// Where frames for a destination should go, as seen from one interface.
///
/// Everything except [`NextHop::Mac`] means "no MAC is known": the caller then
/// sends through the kernel's own UDP socket, which makes the kernel resolve
/// the neighbour (or route the packet elsewhere), and retries later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextHop {
    /// Put this MAC in the Ethernet destination field.
    Mac(Mac),
    /// The route leaves through another interface (its ifindex).
    OtherInterface(u32),
    /// No route, or an unreachable/blackhole/prohibit/throw route.
    Unreachable,
    /// The route is on our interface but the neighbour entry is missing,
    /// incomplete or failed.
    Unresolved,
}

/// The part of a route that matters for framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// Output interface index (`RTA_OIF`).
    pub oif: u32,
    /// Gateway (`RTA_GATEWAY`); `None` when the destination is on-link.
    pub gateway: Option<Ipv6Addr>,
}

/// How long one `recv` waits for the kernel. Answers to route/neighbour
/// queries take microseconds; this only bounds how long a worker can stall if
/// something is badly wrong.
const RECV_TIMEOUT: Duration = Duration::from_millis(100);
/// Upper bound on a whole request, so a stream of stale replies cannot keep a
/// worker waiting (each `recv` alone is bounded by [`RECV_TIMEOUT`]).
const REQUEST_DEADLINE: Duration = Duration::from_millis(400);
/// Receive buffer. Dump datagrams are at most a few pages (the kernel caps
/// them at 32 KiB); anything larger is detected via `MSG_TRUNC`.
const RECV_BUF_LEN: usize = 64 * 1024;
/// How often an interrupted (`NLM_F_DUMP_INTR`) dump is retried.
const DUMP_ATTEMPTS: usize = 3;

/// One rtnetlink (`NETLINK_ROUTE`) socket with synchronous request/response.
///
/// The socket lives in the network namespace of the thread that opened it.
/// Every reply is checked against the request's sequence number and our port
/// id; replies to earlier requests that timed out are discarded rather than
/// mistaken for the current answer. `NLMSG_ERROR` becomes an `io::Error`
/// carrying the kernel's errno.
pub struct Rtnetlink {
    socket: Socket,
    port: u32,
    seq: u32,
    buf: Vec<u8>,
    /// Set once the kernel rejected a neighbour *get* request (before Linux
    /// 4.20 only dumps exist), so we go straight to the dump afterwards.
    neigh_get_unsupported: bool,
}

impl std::fmt::Debug for Rtnetlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rtnetlink")
            .field("port", &self.port)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

/// Messages of one answer, plus whether the kernel flagged the dump as
/// inconsistent (the table changed while it was being dumped).
#[derive(Debug, Default)]
struct Reply {
    messages: Vec<RouteNetlinkMessage>,
    interrupted: bool,
}

fn invalid_data(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("rtnetlink: {what}"))
}

/// Converts a kernel error code (negative errno in `NLMSG_ERROR`/`NLMSG_DONE`)
/// into an `io::Error`, without overflowing on hostile values.
fn kernel_error(code: i32) -> io::Error {
    let errno = code.checked_abs().filter(|e| *e != 0).unwrap_or(libc::EIO);
    io::Error::from_raw_os_error(errno)
}

/// Feeds one received datagram (possibly several netlink messages) into
/// `reply`. Returns `Ok(true)` once the answer to request `seq` is complete.
///
/// Kept free of the socket so the validation logic can be unit-tested with
/// crafted buffers.
fn absorb_datagram(data: &[u8], seq: u32, port: u32, reply: &mut Reply) -> io::Result<bool> {
    let mut offset = 0usize;
    while offset < data.len() {
        let rest = &data[offset..];
        // new_checked verifies 16 <= nlmsg_len <= rest.len().
        let nl = NetlinkBuffer::new_checked(rest).map_err(invalid_data)?;
        let len = nl.length() as usize;
        let this_seq = nl.sequence_number();
        let this_port = nl.port_number();
        // NLMSG_ALIGN; the last message of a datagram may omit the padding.
        offset = offset.saturating_add(len.saturating_add(3) & !3);
        if this_seq != seq || this_port != port {
            // A late answer to an earlier request that timed out, or not for
            // us at all. Skipped before parsing so odd payloads cannot fail
            // the current request.
            continue;
        }
        let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rest[..len])
            .map_err(invalid_data)?;
        if msg.header.flags & NLM_F_DUMP_INTR != 0 {
            reply.interrupted = true;
        }
        let multipart = msg.header.flags & NLM_F_MULTIPART != 0;
        match msg.payload {
            NetlinkPayload::InnerMessage(inner) => {
                reply.messages.push(inner);
                if !multipart {
                    return Ok(true);
                }
            }
            NetlinkPayload::Error(err) => {
                return match err.code {
                    Some(code) => Err(kernel_error(code.get())),
                    // A plain ACK ends the request.
                    None => Ok(true),
                };
            }
            NetlinkPayload::Done(done) => {
                if done.code != 0 {
                    return Err(kernel_error(done.code));
                }
                return Ok(true);
            }
            NetlinkPayload::Noop => {}
            NetlinkPayload::Overrun(_) => return Err(invalid_data("kernel reported overrun")),
            _ => {
                return Err(invalid_data(format_args!(
                    "unexpected message type {}",
                    msg.header.message_type
                )));
            }
        }
    }
    Ok(false)
}

/// Errors with which `RTM_GETROUTE` says "no usable route": `ENETUNREACH` (no
/// route, or an `unreachable` route), `EHOSTUNREACH`, `EACCES`/`EPERM`
/// (`prohibit`), `EAGAIN` (`throw`), `EINVAL` (`blackhole`). The IPv6 FIB
/// answers such routes with the route's error instead of a message.
fn is_no_route(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(
            libc::ENETUNREACH
                | libc::EHOSTUNREACH
                | libc::EACCES
                | libc::EPERM
                | libc::EAGAIN
                | libc::EINVAL
        )
    )
}

/// `fe80::/10`. Link-local addresses only mean something together with an
/// interface (their scope/zone), so they are looked up with that interface
/// pinned; see [`Rtnetlink::next_hop`].
fn is_unicast_link_local(addr: Ipv6Addr) -> bool {
    addr.segments()[0] & 0xffc0 == 0xfe80
}

/// RFC 2464 section 7: IPv6 multicast maps to `33:33` + the low 32 bits.
fn multicast_mac(addr: Ipv6Addr) -> Mac {
    let o = addr.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

/// The MAC of a neighbour message if it is for `ifindex`/`addr` and in a state
/// in which the kernel itself would transmit to it without resolving first.
fn usable_mac(msg: &NeighbourMessage, ifindex: u32, addr: Ipv6Addr) -> Option<Mac> {
    if msg.header.ifindex != ifindex {
        return None;
    }
    let usable = matches!(
        msg.header.state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
            | NeighbourState::Noarp
    );
    if !usable {
        return None;
    }
    let mut dst_matches = false;
    let mut mac = None;
    for attr in &msg.attributes {
        match attr {
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                dst_matches = *a == addr;
            }
            NeighbourAttribute::LinkLayerAddress(lladdr) => {
                // Not 6 bytes: not Ethernet (or a NOARP entry without one).
                mac = <Mac>::try_from(lladdr.as_slice()).ok();
            }
            _ => {}
        }
    }
    // An all-zero MAC (seen on some NOARP entries) is useless in a frame.
    mac.filter(|m| dst_matches && *m != [0; 6])
}

/// The first usable MAC for `ifindex`/`addr` among the neighbour messages of
/// a reply (see [`usable_mac`]).
fn find_usable_mac(messages: &[RouteNetlinkMessage], ifindex: u32, addr: Ipv6Addr) -> Option<Mac> {
    messages.iter().find_map(|m| match m {
        RouteNetlinkMessage::NewNeighbour(n) => usable_mac(n, ifindex, addr),
        _ => None,
    })
}

impl Rtnetlink {
    /// Opens an rtnetlink socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        let addr = socket.bind_auto()?;
        socket2::SockRef::from(&socket).set_read_timeout(Some(RECV_TIMEOUT))?;
        // Strict checking (Linux >= 4.20) makes the kernel reject malformed
        // requests instead of ignoring fields and filters it does not
        // understand. Older kernels fail this setsockopt; they still work.
        let _ = socket.set_netlink_get_strict_chk(true);
        Ok(Self {
            socket,
            port: addr.port_number(),
            seq: 0,
            buf: Vec::with_capacity(RECV_BUF_LEN),
            neigh_get_unsupported: false,
        })
    }

    /// Sends one request and collects its answer (one message, or all
    /// messages of a dump).
    fn request(&mut self, payload: RouteNetlinkMessage, dump: bool) -> io::Result<Reply> {
        self.seq = self.seq.wrapping_add(1).max(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { 0 };
        header.sequence_number = seq;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
        msg.finalize();
        let mut out = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut out);
        let kernel = SocketAddr::new(0, 0);
        let sent = self.socket.send_to(&out, &kernel, 0)?;
        if sent != out.len() {
            return Err(invalid_data(format_args!(
                "short send: {sent} of {}",
                out.len()
            )));
        }

        let deadline = Instant::now() + REQUEST_DEADLINE;
        let mut reply = Reply::default();
        loop {
            if Instant::now() >= deadline {
                return Err(timed_out());
            }
            self.buf.clear();
            let n = match self.socket.recv(&mut self.buf, libc::MSG_TRUNC) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    // Reported as TimedOut without an errno, so it can never be
                    // confused with a kernel EAGAIN ("throw" route).
                    return Err(timed_out());
                }
                Err(e) => return Err(e),
            };
            if n > self.buf.len() {
                return Err(invalid_data(format_args!(
                    "datagram of {n} bytes truncated to {}",
                    self.buf.len()
                )));
            }
            if absorb_datagram(&self.buf[..n], seq, self.port, &mut reply)? {
                return Ok(reply);
            }
        }
    }

    /// Runs a dump, retrying when the kernel flags it as interrupted (the
    /// table changed mid-dump, so the result may be inconsistent).
    fn dump(&mut self, payload: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        for _ in 0..DUMP_ATTEMPTS {
            let reply = self.request(payload.clone(), true)?;
            if !reply.interrupted {
                return Ok(reply.messages);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::Interrupted,
            "rtnetlink: dump kept being interrupted by table changes",
        ))
    }

    /// `RTM_GETROUTE` for `dst` (`RTA_DST`/128, `AF_INET6`): the output
    /// interface and gateway the kernel would use. `Ok(None)` when there is no
    /// usable route (none at all, or unreachable/blackhole/prohibit/throw).
    pub fn route(&mut self, dst: Ipv6Addr) -> io::Result<Option<Route>> {
        self.route_via(dst, None)
    }

    /// Like [`Rtnetlink::route`], optionally pinning the output interface
    /// (`RTA_OIF`), as `ip -6 route get DST oif DEV` does. Pinning is needed
    /// for link-local destinations, which are ambiguous without an interface;
    /// for others it would hide that the kernel prefers another interface.
    pub fn route_via(&mut self, dst: Ipv6Addr, oif: Option<u32>) -> io::Result<Option<Route>> {
        let mut req = RouteMessage::default();
        req.header.address_family = AddressFamily::Inet6;
        req.header.destination_prefix_length = 128;
        req.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet6(dst)));
        if let Some(oif) = oif {
            req.attributes.push(RouteAttribute::Oif(oif));
        }
        let reply = match self.request(RouteNetlinkMessage::GetRoute(req), false) {
            Ok(reply) => reply,
            Err(e) if is_no_route(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(route) = reply.messages.into_iter().find_map(|m| match m {
            RouteNetlinkMessage::NewRoute(r) => Some(r),
            _ => None,
        }) else {
            return Err(invalid_data("RTM_GETROUTE answered without a route"));
        };
        if matches!(
            route.header.kind,
            RouteType::Unreachable | RouteType::BlackHole | RouteType::Prohibit | RouteType::Throw
        ) {
            return Ok(None);
        }
        parse_route(&route).map(Some)
    }

    /// The MAC of `addr` on `ifindex` if the kernel's neighbour entry is in a
    /// usable state (REACHABLE, STALE, DELAY, PROBE, PERMANENT, NOARP) and has
    /// an Ethernet address; `None` when missing, INCOMPLETE or FAILED.
    pub fn neighbour(&mut self, ifindex: u32, addr: Ipv6Addr) -> io::Result<Option<Mac>> {
        if self.neigh_get_unsupported {
            return self.neighbour_by_dump(ifindex, addr);
        }
        let mut req = NeighbourMessage::default();
        req.header.family = AddressFamily::Inet6;
        req.header.ifindex = ifindex;
        req.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet6(
                addr,
            )));
        match self.request(RouteNetlinkMessage::GetNeighbour(req), false) {
            Ok(reply) => Ok(find_usable_mac(&reply.messages, ifindex, addr)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                // Kernel without RTM_GETNEIGH "get" support (< 4.20).
                self.neigh_get_unsupported = true;
                self.neighbour_by_dump(ifindex, addr)
            }
            Err(e) => Err(e),
        }
    }

    /// Fallback for old kernels: dump the IPv6 neighbour table. Newer kernels
    /// filter by the `NDA_IFINDEX` attribute (under strict checking the
    /// header's `ndm_ifindex` must be 0); older ones ignore it, so we filter
    /// again here.
    fn neighbour_by_dump(&mut self, ifindex: u32, addr: Ipv6Addr) -> io::Result<Option<Mac>> {
        let mut req = NeighbourMessage::default();
        req.header.family = AddressFamily::Inet6;
        req.attributes.push(NeighbourAttribute::IfIndex(ifindex));
        let messages = self.dump(RouteNetlinkMessage::GetNeighbour(req))?;
        Ok(find_usable_mac(&messages, ifindex, addr))
    }

    /// Route + neighbour: the next hop for `dst` as seen from interface
    /// `ifindex`.
    ///
    /// Link-local destinations (`fe80::/10`) are looked up with `RTA_OIF =
    /// ifindex`: every interface has an `fe80::/64` route, so without the pin
    /// the kernel would pick one of them by metric and we could wrongly answer
    /// [`NextHop::OtherInterface`]. A link-local address is only meaningful
    /// with its zone, and for us the zone is our interface. Link-local
    /// *gateways* (the usual router-advertised default route) need no special
    /// care: the neighbour lookup is always done on the route's interface.
    ///
    /// Multicast destinations need no lookup: their MAC is derived from the
    /// address (RFC 2464).
    pub fn next_hop(&mut self, ifindex: u32, dst: Ipv6Addr) -> io::Result<NextHop> {
        if dst.is_multicast() {
            return Ok(NextHop::Mac(multicast_mac(dst)));
        }
        let pin = is_unicast_link_local(dst).then_some(ifindex);
        let Some(route) = self.route_via(dst, pin)? else {
            return Ok(NextHop::Unreachable);
        };
        if route.oif != ifindex {
            return Ok(NextHop::OtherInterface(route.oif));
        }
        let hop = route.gateway.unwrap_or(dst);
        Ok(match self.neighbour(ifindex, hop)? {
            Some(mac) => NextHop::Mac(mac),
            None => NextHop::Unresolved,
        })
    }

    /// The Ethernet address of interface `ifindex` (`RTM_GETLINK`,
    /// `IFLA_ADDRESS`), for the source field of our frames.
    pub fn interface_mac(&mut self, ifindex: u32) -> io::Result<Mac> {
        let mut req = LinkMessage::default();
        req.header.index = ifindex;
        let reply = self.request(RouteNetlinkMessage::GetLink(req), false)?;
        let link = reply
            .messages
            .iter()
            .find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) if l.header.index == ifindex => Some(l),
                _ => None,
            })
            .ok_or_else(|| invalid_data(format_args!("no RTM_NEWLINK for ifindex {ifindex}")))?;
        let address = link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Address(bytes) => Some(bytes.as_slice()),
                _ => None,
            })
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("interface {ifindex} has no link-layer address"),
                )
            })?;
        <Mac>::try_from(address).map_err(|_| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "interface {ifindex} has a {}-byte link-layer address, not Ethernet",
                    address.len()
                ),
            )
        })
    }
}

fn timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "rtnetlink: no answer from the kernel in time",
    )
}

/// Output interface and gateway of an `RTM_NEWROUTE` answer. A multipath
/// answer to a *get* request normally already names the chosen path; if only
/// `RTA_MULTIPATH` is present we take its first hop.
fn parse_route(route: &RouteMessage) -> io::Result<Route> {
    let mut oif = None;
    let mut gateway = None;
    let mut first_path = None;
    for attr in &route.attributes {
        match attr {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(RouteAddress::Inet6(g)) => gateway = Some(*g),
            RouteAttribute::Via(RouteVia::Inet6(g)) => gateway = Some(*g),
            RouteAttribute::Gateway(_) | RouteAttribute::Via(_) => {
                // e.g. an IPv4 next hop for an IPv6 route (RFC 5549): needs
                // ARP, not ND, which this module does not do.
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "route has a non-IPv6 gateway",
                ));
            }
            RouteAttribute::MultiPath(hops) => first_path = hops.first(),
            _ => {}
        }
    }
    if oif.is_none()
        && let Some(hop) = first_path
    {
        oif = Some(hop.interface_index);
        for attr in &hop.attributes {
            match attr {
                RouteAttribute::Gateway(RouteAddress::Inet6(g))
                | RouteAttribute::Via(RouteVia::Inet6(g)) => gateway = Some(*g),
                _ => {}
            }
        }
    }
    let oif = oif.ok_or_else(|| invalid_data("route answer without an output interface"))?;
    Ok(Route { oif, gateway })
}

/// The Ethernet address of interface `ifindex`, via a short-lived rtnetlink
/// socket in the calling thread's network namespace.
pub fn interface_mac(ifindex: u32) -> io::Result<Mac> {
    Rtnetlink::open()?.interface_mac(ifindex)
}

/// The index of interface `name` in the calling thread's network namespace;
/// the error names the interface so a misconfiguration is obvious.
pub fn ifindex(name: &str) -> io::Result<u32> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "interface name {name:?} is not a valid Linux interface name (1 to {} bytes)",
                libc::IFNAMSIZ - 1
            ),
        ));
    }
    let c_name = CString::new(name).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {name:?} contains a NUL byte"),
        )
    })?;
    // SAFETY: `c_name` is a valid NUL-terminated string that outlives the
    // call; if_nametoindex only reads it.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        let err = io::Error::last_os_error();
        let kind = match err.raw_os_error() {
            Some(libc::ENODEV) | Some(libc::ENXIO) => io::ErrorKind::NotFound,
            _ => err.kind(),
        };
        return Err(io::Error::new(kind, format!("interface {name:?}: {err}")));
    }
    Ok(index)
}

/// Counters of a [`NeighbourCache`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NeighbourStats {
    /// Lookups answered from the cache without netlink I/O (positive or
    /// negative answers).
    pub hits: u64,
    /// Next-hop resolutions done over netlink (each is a route query plus,
    /// usually, a neighbour query).
    pub queries: u64,
    /// Lookups that returned `None` (the caller took the kernel path).
    pub misses: u64,
    /// Netlink queries that failed with an error (timeouts, unexpected errno).
    pub errors: u64,
    /// Entries dropped to stay within the capacity.
    pub evictions: u64,
    /// Entries currently cached.
    pub entries: usize,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    mac: Option<Mac>,
    /// When the entry must be re-checked over netlink.
    due: Instant,
}

/// Per-destination next-hop cache in front of [`Rtnetlink`], owned by one
/// worker thread (no locks).
///
/// Positive entries are re-checked after `ttl` so MAC changes and route
/// changes are picked up; negative entries after `retry`, so an unresolved
/// destination costs at most one netlink round trip per `retry` however many
/// packets go to it. The map is bounded; on overflow, expired entries are
/// dropped first, then arbitrary ones. Its hasher is the std SipHash with a
/// random key, since destinations are chosen by remote peers.
///
/// Netlink I/O is blocking (answers take microseconds, bounded at a few
/// hundred milliseconds if the kernel does not answer), and only happens for
/// absent or due entries.
pub struct NeighbourCache {
    rtnl: Rtnetlink,
    ifindex: u32,
    ttl: Duration,
    retry: Duration,
    capacity: usize,
    entries: HashMap<Ipv6Addr, Entry>,
    stats: NeighbourStats,
}

impl std::fmt::Debug for NeighbourCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NeighbourCache")
            .field("ifindex", &self.ifindex)
            .field("ttl", &self.ttl)
            .field("retry", &self.retry)
            .field("capacity", &self.capacity)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl NeighbourCache {
    /// Default re-check interval for entries with a MAC.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(1);
    /// Default re-check interval for destinations without a MAC.
    pub const DEFAULT_RETRY: Duration = Duration::from_millis(50);
    /// Default bound on cached destinations.
    pub const DEFAULT_CAPACITY: usize = 65536;
    /// Timings are clamped to this so `now + ttl` cannot overflow `Instant`.
    const MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);

    /// A cache for frames sent on `ifindex`, with default timings. Opens its
    /// netlink socket in the calling thread's network namespace.
    pub fn new(ifindex: u32) -> io::Result<Self> {
        Self::with_timing(ifindex, Self::DEFAULT_TTL, Self::DEFAULT_RETRY)
    }

    /// Like [`NeighbourCache::new`] with explicit re-check intervals.
    pub fn with_timing(ifindex: u32, ttl: Duration, retry: Duration) -> io::Result<Self> {
        Self::with_config(ifindex, ttl, retry, Self::DEFAULT_CAPACITY)
    }

    /// Like [`NeighbourCache::with_timing`] with an explicit capacity (at
    /// least 1).
    pub fn with_config(
        ifindex: u32,
        ttl: Duration,
        retry: Duration,
        capacity: usize,
    ) -> io::Result<Self> {
        Ok(Self {
            rtnl: Rtnetlink::open()?,
            ifindex,
            ttl: ttl.min(Self::MAX_INTERVAL),
            retry: retry.min(Self::MAX_INTERVAL),
            capacity: capacity.max(1),
            entries: HashMap::new(),
            stats: NeighbourStats::default(),
        })
    }

    /// The interface this cache resolves for.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The MAC to put in frames for `dst` now, or `None` (then the caller uses
    /// the kernel path). Only does netlink I/O when the entry is absent or due.
    pub fn lookup(&mut self, dst: Ipv6Addr, now: Instant) -> Option<Mac> {
        let previous = match self.entries.get(&dst) {
            Some(entry) if now < entry.due => {
                self.stats.hits += 1;
                if entry.mac.is_none() {
                    self.stats.misses += 1;
                }
                return entry.mac;
            }
            Some(entry) => entry.mac,
            None => None,
        };

        self.stats.queries += 1;
        let (mac, interval) = match self.rtnl.next_hop(self.ifindex, dst) {
            Ok(NextHop::Mac(mac)) => (Some(mac), self.ttl),
            Ok(other) => {
                tracing::trace!(%dst, ifindex = self.ifindex, next_hop = ?other, "no next-hop MAC");
                (None, self.retry)
            }
            Err(err) => {
                // A netlink hiccup says nothing about the neighbour: keep the
                // last known MAC (if any) rather than flipping a working
                // destination to the slow path, and ask again soon.
                self.stats.errors += 1;
                tracing::debug!(%dst, ifindex = self.ifindex, error = %err, "next-hop lookup failed");
                (previous, self.retry)
            }
        };
        if mac.is_none() {
            self.stats.misses += 1;
        }
        let entry = Entry {
            mac,
            due: now + interval,
        };
        if !self.entries.contains_key(&dst) {
            self.make_room(now);
        }
        self.entries.insert(dst, entry);
        mac
    }

    /// Drops the entry for `dst`, so the next lookup asks netlink (e.g. after
    /// the caller saw a send through the kernel path succeed).
    pub fn forget(&mut self, dst: Ipv6Addr) {
        self.entries.remove(&dst);
    }

    /// Drops all entries (e.g. on a link or route change notification).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Counters since creation.
    pub fn stats(&self) -> NeighbourStats {
        NeighbourStats {
            entries: self.entries.len(),
            ..self.stats
        }
    }

    /// Makes room for one new entry. Sweeps expired entries first, then
    /// evicts arbitrary ones down to 15/16 of the capacity, so the O(n) sweep
    /// runs at most once per `capacity / 16` insertions.
    fn make_room(&mut self, now: Instant) {
        if self.entries.len() < self.capacity {
            return;
        }
        let before = self.entries.len();
        self.entries.retain(|_, e| e.due > now);
        let target = self.capacity - (self.capacity / 16).max(1);
        if self.entries.len() > target {
            let excess = self.entries.len() - target;
            let victims: Vec<Ipv6Addr> = self.entries.keys().take(excess).copied().collect();
            for key in victims {
                self.entries.remove(&key);
            }
        }
        self.stats.evictions += (before - self.entries.len()) as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::fs::File;
    use std::os::fd::AsRawFd;
    use std::process::Command;
    use std::sync::atomic::{AtomicU32, Ordering};

    // ---- pure tests (no privileges) ----

    #[test]
    fn link_local_and_multicast_helpers() {
        assert!(is_unicast_link_local("fe80::1".parse().unwrap()));
        assert!(is_unicast_link_local("febf::1".parse().unwrap()));
        assert!(!is_unicast_link_local("fec0::1".parse().unwrap()));
        assert!(!is_unicast_link_local("fd71:7e57:0:8::1".parse().unwrap()));
        assert_eq!(
            multicast_mac("ff02::1:ff00:1234".parse().unwrap()),
            [0x33, 0x33, 0xff, 0x00, 0x12, 0x34]
        );
    }

    #[test]
    fn kernel_error_is_robust() {
        assert_eq!(
            kernel_error(-libc::ENOENT).raw_os_error(),
            Some(libc::ENOENT)
        );
        assert_eq!(
            kernel_error(libc::ENOENT).raw_os_error(),
            Some(libc::ENOENT)
        );
        assert_eq!(kernel_error(i32::MIN).raw_os_error(), Some(libc::EIO));
        assert_eq!(kernel_error(0).raw_os_error(), Some(libc::EIO));
    }

    /// Builds a raw netlink message (header + payload), padded to 4 bytes.
    fn raw_message(kind: u16, flags: u16, seq: u32, port: u32, payload: &[u8]) -> Vec<u8> {
        let len = 16 + payload.len();
        let mut v = Vec::with_capacity(len + 3);
        v.extend_from_slice(&(len as u32).to_ne_bytes());
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(&flags.to_ne_bytes());
        v.extend_from_slice(&seq.to_ne_bytes());
        v.extend_from_slice(&port.to_ne_bytes());
        v.extend_from_slice(payload);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    fn error_payload(code: i32) -> Vec<u8> {
        let mut p = code.to_ne_bytes().to_vec();
        p.extend_from_slice(&[0u8; 16]); // the echoed request header
        p
    }

    #[test]
    fn datagram_validation() {
        const ERROR: u16 = 2;
        const DONE: u16 = 3;
        let (seq, port) = (7, 4242);

        // A stale error for an older request is skipped; ours is reported.
        let mut data = raw_message(ERROR, 0, seq - 1, port, &error_payload(-libc::EPERM));
        data.extend(raw_message(
            ERROR,
            0,
            seq,
            port,
            &error_payload(-libc::ENOENT),
        ));
        let err = absorb_datagram(&data, seq, port, &mut Reply::default()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));

        // Another port's message is skipped; nothing complete yet.
        let data = raw_message(ERROR, 0, seq, port + 1, &error_payload(-libc::ENOENT));
        assert!(!absorb_datagram(&data, seq, port, &mut Reply::default()).unwrap());

        // An ACK completes the request.
        let data = raw_message(ERROR, 0, seq, port, &error_payload(0));
        assert!(absorb_datagram(&data, seq, port, &mut Reply::default()).unwrap());

        // DONE with an error code, and DONE with DUMP_INTR set.
        let data = raw_message(
            DONE,
            NLM_F_MULTIPART,
            seq,
            port,
            &(-libc::EBUSY).to_ne_bytes(),
        );
        let err = absorb_datagram(&data, seq, port, &mut Reply::default()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBUSY));
        let data = raw_message(
            DONE,
            NLM_F_MULTIPART | NLM_F_DUMP_INTR,
            seq,
            port,
            &0i32.to_ne_bytes(),
        );
        let mut reply = Reply::default();
        assert!(absorb_datagram(&data, seq, port, &mut reply).unwrap());
        assert!(reply.interrupted);

        // Length field beyond the datagram, or below the header size.
        let mut data = raw_message(DONE, 0, seq, port, &0i32.to_ne_bytes());
        data[0..4].copy_from_slice(&100u32.to_ne_bytes());
        let err = absorb_datagram(&data, seq, port, &mut Reply::default()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        data[0..4].copy_from_slice(&8u32.to_ne_bytes());
        assert!(absorb_datagram(&data, seq, port, &mut Reply::default()).is_err());
        // A truncated trailing header.
        let mut data = raw_message(ERROR, 0, seq - 1, port, &error_payload(0));
        data.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(absorb_datagram(&data, seq, port, &mut Reply::default()).is_err());
        // An error message too short to hold its code.
        let data = raw_message(ERROR, 0, seq, port, &[]);
        assert!(absorb_datagram(&data, seq, port, &mut Reply::default()).is_err());
    }

    #[test]
    fn ifindex_rejects_bad_names() {
        let err = ifindex("").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let err = ifindex("a-name-that-is-too-long").unwrap_err();
        assert!(err.to_string().contains("a-name-that-is-too-long"), "{err}");
        let err = ifindex("a\0b").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    // ---- namespace tests (root) ----

    static NS_COUNTER: AtomicU32 = AtomicU32::new(0);

    /// Whether namespace tests can run. Skips (with a reason) when not root,
    /// but under CI (`CI=true` or `1`) a skip would hide a broken setup, so panic.
    fn privileged() -> bool {
        let reason = if !cfg!(target_os = "linux") {
            Some("not Linux".to_string())
        // SAFETY: geteuid has no preconditions and cannot fail.
        } else if unsafe { libc::geteuid() } != 0 {
            Some("needs root to create network namespaces".to_string())
        } else {
            match Command::new("ip").arg("-V").output() {
                Ok(o) if o.status.success() => None,
                Ok(o) => Some(format!("`ip -V` failed: {:?}", o.status)),
                Err(e) => Some(format!("`ip` (iproute2) not runnable: {e}")),
            }
        };
        match reason {
            None => true,
            // Same reading of CI as `cargo xtask ci`.
            Some(reason) if matches!(std::env::var("CI").as_deref(), Ok("true" | "1")) => {
                panic!("namespace test cannot run under CI: {reason}")
            }
            Some(reason) => {
                eprintln!("skipping namespace test: {reason}");
                false
            }
        }
    }

    fn ip(args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
        assert!(
            out.status.success(),
            "ip {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ip -n NS …`, the arguments written as on a shell command line (none
    /// of them holds a space).
    fn ip_in(ns: &str, command: &str) -> String {
        let mut args = vec!["-n", ns];
        args.extend(command.split_whitespace());
        ip(&args)
    }

    /// A permanent neighbour entry for `addr` with `mac` on `a0`.
    fn add_permanent_neighbour(ns: &str, addr: &str, mac: &str) {
        ip_in(
            ns,
            &format!("-6 neigh add {addr} lladdr {mac} dev a0 nud permanent"),
        );
    }

    /// Deletes the namespaces it names when dropped, also during a panic.
    /// Deleting a namespace destroys the veths inside it.
    struct NetnsGuard(Vec<String>);

    impl Drop for NetnsGuard {
        fn drop(&mut self) {
            for name in &self.0 {
                let _ = Command::new("ip").args(["netns", "del", name]).output();
            }
        }
    }

    fn new_netns(guard: &mut NetnsGuard) -> String {
        let n = NS_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("i2t-nb-{}-{n}", std::process::id());
        // Registered before creation so a half-made namespace is removed too.
        guard.0.push(name.clone());
        ip(&["netns", "add", &name]);
        // No DAD, so link-local addresses are usable at once. Written from a
        // thread inside the namespace: /proc/sys/net is per network namespace
        // of the opening thread (and this needs no sysctl binary).
        in_netns(&name, || {
            for conf in ["all", "default"] {
                let path = format!("/proc/sys/net/ipv6/conf/{conf}/accept_dad");
                std::fs::write(&path, "0").unwrap_or_else(|e| panic!("{path}: {e}"));
            }
        });
        ip_in(&name, "link set lo up");
        name
    }

    const LOCAL_ADDR: &str = "fd71:7e57:0:8::1";
    const PEER_ADDR: &str = "fd71:7e57:0:8::2";

    /// Two namespaces joined by a veth pair: `a0` (fd71:7e57:0:8::1/64) in
    /// `local`, `b0` (fd71:7e57:0:8::2/64) in `peer`. Nothing is created in
    /// the host namespace: the veth is made inside `local` with its peer end
    /// placed straight into `peer`.
    struct Topology {
        local: String,
        peer: String,
        _guard: NetnsGuard,
    }

    /// The [`Topology`], or `None` where namespace tests cannot run (see
    /// [`privileged`]); the test then returns early.
    fn topology() -> Option<Topology> {
        if !privileged() {
            return None;
        }
        let mut guard = NetnsGuard(Vec::new());
        let local = new_netns(&mut guard);
        let peer = new_netns(&mut guard);
        ip_in(
            &local,
            &format!("link add a0 type veth peer name b0 netns {peer}"),
        );
        ip_in(&local, &format!("addr add {LOCAL_ADDR}/64 dev a0 nodad"));
        ip_in(&peer, &format!("addr add {PEER_ADDR}/64 dev b0 nodad"));
        ip_in(&local, "link set a0 up");
        ip_in(&peer, "link set b0 up");
        Some(Topology {
            local,
            peer,
            _guard: guard,
        })
    }

    /// Runs `f` on a fresh thread that has joined namespace `ns`; sockets it
    /// opens (netlink included) live there. The caller's thread is untouched.
    fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = File::open(format!("/var/run/netns/{ns}"))
                    .unwrap_or_else(|e| panic!("open netns {ns}: {e}"));
                // SAFETY: the fd is an open network-namespace file for the
                // duration of the call; setns only changes the namespace of
                // this freshly spawned thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {ns}: {}", io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Runs `f` with an rtnetlink socket opened in namespace `ns`.
    fn with_rtnetlink<T: Send>(ns: &str, f: impl FnOnce(&mut Rtnetlink) -> T + Send) -> T {
        in_netns(ns, || f(&mut Rtnetlink::open().unwrap()))
    }

    /// `(ifindex, mac)` of `dev` in `ns`, from `ip -j link show`.
    fn link_info(ns: &str, dev: &str) -> (u32, Mac) {
        let out = ip_in(ns, &format!("-j link show dev {dev}"));
        let json: serde_json::Value = serde_json::from_str(&out).expect("ip -j output");
        let link = &json[0];
        let index = link["ifindex"].as_u64().expect("ifindex") as u32;
        (index, parse_mac(link["address"].as_str().expect("address")))
    }

    fn parse_mac(s: &str) -> Mac {
        let bytes: Vec<u8> = s
            .split(':')
            .map(|b| u8::from_str_radix(b, 16).expect("hex"))
            .collect();
        bytes.try_into().expect("6 bytes")
    }

    fn addr(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn permanent_neighbour_and_gateway() {
        let Some(t) = topology() else { return };
        let ns = t.local.as_str();
        add_permanent_neighbour(ns, "fd71:7e57:0:8::10", "02:00:00:00:00:10");
        // The gateway is a permanent neighbour too, so its MAC is known.
        add_permanent_neighbour(ns, "fd71:7e57:0:8::fe", "02:00:00:00:00:fe");
        let (a0, _) = link_info(ns, "a0");

        // Before the gateway route exists, the far prefix has no route.
        let before = with_rtnetlink(ns, |rt| {
            (
                rt.route(addr("fd71:7e57:0:88::5")).unwrap(),
                rt.next_hop(a0, addr("fd71:7e57:0:88::5")).unwrap(),
            )
        });
        assert_eq!(before, (None, NextHop::Unreachable));

        ip_in(
            ns,
            "-6 route add fd71:7e57:0:88::/64 via fd71:7e57:0:8::fe dev a0",
        );
        with_rtnetlink(ns, |rt| {
            assert_eq!(
                rt.route(addr("fd71:7e57:0:8::10")).unwrap(),
                Some(Route {
                    oif: a0,
                    gateway: None
                })
            );
            assert_eq!(
                rt.neighbour(a0, addr("fd71:7e57:0:8::10")).unwrap(),
                Some([2, 0, 0, 0, 0, 0x10])
            );
            assert_eq!(
                rt.next_hop(a0, addr("fd71:7e57:0:8::10")).unwrap(),
                NextHop::Mac([2, 0, 0, 0, 0, 0x10])
            );
            assert_eq!(
                rt.route(addr("fd71:7e57:0:88::5")).unwrap(),
                Some(Route {
                    oif: a0,
                    gateway: Some(addr("fd71:7e57:0:8::fe"))
                })
            );
            assert_eq!(
                rt.next_hop(a0, addr("fd71:7e57:0:88::5")).unwrap(),
                NextHop::Mac([2, 0, 0, 0, 0, 0xfe])
            );
            // Multicast needs no neighbour entry.
            assert_eq!(
                rt.next_hop(a0, addr("ff02::1")).unwrap(),
                NextHop::Mac([0x33, 0x33, 0, 0, 0, 1])
            );
            // The dump fallback for kernels without neighbour "get" agrees.
            assert_eq!(
                rt.neighbour_by_dump(a0, addr("fd71:7e57:0:8::10")).unwrap(),
                Some([2, 0, 0, 0, 0, 0x10])
            );
            assert_eq!(
                rt.neighbour_by_dump(a0, addr("fd71:7e57:0:8::11")).unwrap(),
                None
            );
            // A neighbour on another (existing) interface is not ours.
            assert_eq!(rt.neighbour(1, addr("fd71:7e57:0:8::10")).unwrap(), None);
        });
    }

    #[test]
    fn unresolved_unreachable_other_interface_and_link_local() {
        let Some(t) = topology() else { return };
        let ns = t.local.as_str();
        // A second interface in the same namespace. (A dummy device would do,
        // but not every kernel has the dummy driver; veth is needed anyway.)
        ip_in(ns, "link add o0 type veth peer name o1");
        ip_in(ns, "link set o0 up");
        ip_in(ns, "link set o1 up");
        ip_in(ns, "-6 route add fd71:7e57:0:88:1::/80 dev o0");
        ip_in(ns, "-6 route add unreachable fd71:7e57:0:88:2::/80");
        ip_in(ns, "-6 route add blackhole fd71:7e57:0:88:3::/80");
        ip_in(ns, "-6 route add prohibit fd71:7e57:0:88:4::/80");
        // An incomplete/failed entry is not usable.
        ip_in(ns, "-6 neigh add fd71:7e57:0:8::21 dev a0 nud failed");
        add_permanent_neighbour(ns, "fe80::10", "02:00:00:00:fe:10");
        let (a0, _) = link_info(ns, "a0");
        let (o0, _) = link_info(ns, "o0");

        with_rtnetlink(ns, |rt| {
            let hop =
                |rt: &mut Rtnetlink, oif: u32, dst: &str| rt.next_hop(oif, addr(dst)).unwrap();
            assert_eq!(hop(rt, a0, "fd71:7e57:0:8::20"), NextHop::Unresolved);
            assert_eq!(hop(rt, a0, "fd71:7e57:0:8::21"), NextHop::Unresolved);
            assert_eq!(rt.neighbour(a0, addr("fd71:7e57:0:8::21")).unwrap(), None);
            assert_eq!(hop(rt, a0, "fd71:7e57:0:88::5"), NextHop::Unreachable);
            assert_eq!(hop(rt, a0, "fd71:7e57:0:88:2::1"), NextHop::Unreachable);
            assert_eq!(hop(rt, a0, "fd71:7e57:0:88:3::1"), NextHop::Unreachable);
            assert_eq!(hop(rt, a0, "fd71:7e57:0:88:4::1"), NextHop::Unreachable);
            assert_eq!(
                hop(rt, a0, "fd71:7e57:0:88:1::1"),
                NextHop::OtherInterface(o0)
            );
            assert_eq!(
                rt.route(addr("fd71:7e57:0:88:1::1")).unwrap(),
                Some(Route {
                    oif: o0,
                    gateway: None
                })
            );
            // Link-local: both a0 and o0 have fe80::/64; the lookup is pinned
            // to the interface asked about, so each sees its own neighbour.
            assert_eq!(
                hop(rt, a0, "fe80::10"),
                NextHop::Mac([2, 0, 0, 0, 0xfe, 0x10])
            );
            assert_eq!(hop(rt, o0, "fe80::10"), NextHop::Unresolved);
            // Our own address routes through lo: not something to frame.
            assert!(matches!(hop(rt, a0, LOCAL_ADDR), NextHop::OtherInterface(i) if i != a0));
            // A non-existent interface is an error, not a wrong answer.
            assert!(rt.neighbour(999_999, addr("fd71:7e57:0:8::10")).is_err());
        });
    }

    #[test]
    fn real_resolution_learns_peer_mac() {
        let Some(t) = topology() else { return };
        let (a0, _) = link_info(&t.local, "a0");
        let (_, peer_mac) = link_info(&t.peer, "b0");
        let peer = addr(PEER_ADDR);

        let (first, learned) = with_rtnetlink(&t.local, |rt| {
            let first = rt.next_hop(a0, peer).unwrap();
            // One datagram through the kernel makes it run Neighbour
            // Discovery, as the caller's fallback path would.
            let udp = std::net::UdpSocket::bind("[::]:0").unwrap();
            udp.send_to(b"hello", (peer, 9)).unwrap();
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                let hop = rt.next_hop(a0, peer).unwrap();
                if matches!(hop, NextHop::Mac(_)) || Instant::now() > deadline {
                    break (first, hop);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        assert_eq!(first, NextHop::Unresolved);
        assert_eq!(learned, NextHop::Mac(peer_mac));
    }

    #[test]
    fn cache_ttl_retry_and_eviction() {
        let Some(t) = topology() else { return };
        let ns = t.local.as_str();
        add_permanent_neighbour(ns, "fd71:7e57:0:8::10", "02:00:00:00:00:10");
        let (a0, _) = link_info(ns, "a0");
        let known = addr("fd71:7e57:0:8::10");
        let unknown = addr("fd71:7e57:0:8::20");
        let ttl = Duration::from_secs(1);
        let retry = Duration::from_millis(50);

        // Time is simulated through `now`; only netlink state is real.
        let (mut cache, t0) = in_netns(ns, || {
            let mut cache = NeighbourCache::with_timing(a0, ttl, retry).unwrap();
            let t0 = Instant::now();
            assert_eq!(cache.lookup(known, t0), Some([2, 0, 0, 0, 0, 0x10]));
            assert_eq!(cache.stats().queries, 1);
            // Within ttl: answered from the cache.
            assert_eq!(
                cache.lookup(known, t0 + ttl / 2),
                Some([2, 0, 0, 0, 0, 0x10])
            );
            let s = cache.stats();
            assert_eq!((s.queries, s.hits, s.misses, s.entries), (1, 1, 0, 1));
            (cache, t0)
        });
        // The socket stays in the namespace it was opened in, whatever thread
        // uses it later.
        ip_in(
            ns,
            "-6 neigh replace fd71:7e57:0:8::10 lladdr 02:00:00:00:00:11 dev a0 nud permanent",
        );
        // Still cached until the ttl has passed...
        assert_eq!(
            cache.lookup(known, t0 + ttl / 2),
            Some([2, 0, 0, 0, 0, 0x10])
        );
        assert_eq!(cache.stats().queries, 1);
        // ...then re-checked.
        assert_eq!(
            cache.lookup(known, t0 + ttl + Duration::from_millis(1)),
            Some([2, 0, 0, 0, 0, 0x11])
        );
        assert_eq!(cache.stats().queries, 2);

        // Misses are rate-limited by `retry`.
        assert_eq!(cache.lookup(unknown, t0), None);
        assert_eq!(cache.lookup(unknown, t0 + retry / 2), None);
        let s = cache.stats();
        assert_eq!((s.queries, s.misses), (3, 2));
        // Once the neighbour appears, it is picked up after `retry`.
        add_permanent_neighbour(ns, "fd71:7e57:0:8::20", "02:00:00:00:00:20");
        assert_eq!(cache.lookup(unknown, t0 + retry / 2), None);
        assert_eq!(
            cache.lookup(unknown, t0 + retry),
            Some([2, 0, 0, 0, 0, 0x20])
        );
        let s = cache.stats();
        assert_eq!((s.queries, s.misses, s.errors), (4, 3, 0));

        cache.forget(unknown);
        assert_eq!(cache.stats().entries, 1);

        // Capacity bound: 10 destinations into 4 slots.
        let mut small = in_netns(ns, || {
            NeighbourCache::with_config(a0, ttl, retry, 4).unwrap()
        });
        for i in 0..10u16 {
            small.lookup(Ipv6Addr::new(0xfd71, 0x7e57, 0, 8, 0, 0, 1, i), t0);
            assert!(small.stats().entries <= 4);
        }
        // Each overflow drops one entry (down to 3, 15/16 of 4 rounded
        // down), not the whole map: 10 - 4 evictions in all.
        assert_eq!(small.stats().evictions, 6);
        assert!(format!("{small:?}").contains("NeighbourCache"));
    }

    #[test]
    fn interface_mac_and_ifindex_match_ip_link() {
        let Some(t) = topology() else { return };
        let (index, mac) = link_info(&t.local, "a0");
        let (got_index, got_mac, missing, bad_mac) = in_netns(&t.local, || {
            let index = ifindex("a0").unwrap();
            (
                index,
                interface_mac(index).unwrap(),
                ifindex("i2t-missing0").unwrap_err(),
                interface_mac(999_999).unwrap_err(),
            )
        });
        assert_eq!(got_index, index);
        assert_eq!(got_mac, mac);
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        assert!(missing.to_string().contains("i2t-missing0"), "{missing}");
        assert_eq!(bad_mac.raw_os_error(), Some(libc::ENODEV));
        // lo has an all-zero but 6-byte address; it is reported as is.
        let lo = in_netns(&t.local, || interface_mac(ifindex("lo").unwrap()).unwrap());
        assert_eq!(lo, [0; 6]);
    }
}
