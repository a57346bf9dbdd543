//! Ethernet + IPv6 + UDP header codec for the AF_XDP backend.
//!
//! An AF_XDP socket hands the worker whole Ethernet frames and expects whole
//! frames back: the kernel's IP and UDP layers are bypassed, so this module
//! does their job for the one kind of packet the server speaks, an IPv6/UDP
//! datagram in an untagged Ethernet II frame.
//!
//! Everything here treats received bytes as hostile: every length is checked
//! before it is trusted, fields are read through bounds-checked helpers, and
//! no input makes any function panic.
//!
//! Frame layout (offsets from the start of the frame):
//!
//! ```text
//!  0  destination MAC (6)     6  source MAC (6)      12  ethertype (2)
//! 14  version | traffic class | flow label (4)
//! 18  payload length (2)     20  next header (1)    21  hop limit (1)
//! 22  source address (16)    38  destination address (16)
//! 54  UDP source port (2)    56  UDP destination port (2)
//! 58  UDP length (2)         60  UDP checksum (2)
//! 62  UDP payload
//! ```

use std::fmt;
use std::net::{Ipv6Addr, SocketAddrV6};

/// Ethernet (14) + IPv6 (40) + UDP (8).
pub const HEADERS_LEN: usize = ETH_LEN + IPV6_LEN + UDP_LEN;

/// A MAC address, in wire order.
pub type Mac = [u8; 6];

/// Untagged Ethernet II header: two MACs and the ethertype.
const ETH_LEN: usize = 14;
/// Fixed IPv6 header (RFC 8200 §3), without extension headers.
const IPV6_LEN: usize = 40;
/// UDP header (RFC 768).
const UDP_LEN: usize = 8;

const ETHERTYPE_IPV6: u16 = 0x86dd;
/// IANA protocol number of UDP, as IPv6 "next header" and in the pseudo-header.
const IPPROTO_UDP: u8 = 17;
/// Largest UDP payload whose length fits the 16-bit UDP length field.
const MAX_PAYLOAD_LEN: usize = u16::MAX as usize - UDP_LEN;

// Field offsets from the start of the frame.
const ETH_DST: usize = 0;
const ETH_SRC: usize = 6;
const ETH_TYPE: usize = 12;
const IP_VERSION_CLASS_FLOW: usize = ETH_LEN;
const IP_PAYLOAD_LEN: usize = ETH_LEN + 4;
const IP_NEXT_HEADER: usize = ETH_LEN + 6;
const IP_HOP_LIMIT: usize = ETH_LEN + 7;
const IP_SRC: usize = ETH_LEN + 8;
const IP_DST: usize = ETH_LEN + 24;
const UDP_START: usize = ETH_LEN + IPV6_LEN;
const UDP_SRC_PORT: usize = UDP_START;
const UDP_DST_PORT: usize = UDP_START + 2;
const UDP_LENGTH: usize = UDP_START + 4;
const UDP_CHECKSUM: usize = UDP_START + 6;

/// A received IPv6/UDP datagram inside an Ethernet frame (borrowed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Udp6<'a> {
    header: Udp6Header,
    /// Exactly the UDP payload (UDP length - 8), never Ethernet padding.
    pub payload: &'a [u8],
}

impl Udp6<'_> {
    /// The headers of this datagram as received, in the form `write_headers`
    /// takes (a reply swaps the MACs and the addresses). Flowinfo and scope
    /// id of both addresses are 0.
    pub fn header(&self) -> &Udp6Header {
        &self.header
    }
}

/// Why a frame is not an IPv6/UDP datagram we take (each is a counter in
/// stats).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The frame ends inside the Ethernet, IPv6 or UDP header.
    Truncated,
    /// The ethertype is not IPv6, or the IP version field is not 6. This
    /// includes 802.1Q / 802.1ad VLAN-tagged frames: only untagged Ethernet
    /// is supported (NICs normally strip the tag in hardware, and the
    /// server's interface is not expected to be a trunk port).
    NotIpv6,
    /// The IPv6 next header is not UDP: extension headers (hop-by-hop,
    /// routing, fragment, ...), ICMPv6, TCP, and so on. QUIC never needs
    /// extension headers, and ICMPv6 (neighbour discovery, PMTU) belongs to
    /// the kernel, which the XDP program should pass it to.
    NotUdp,
    /// The IPv6 payload length or the UDP length does not agree with the
    /// frame: the frame is shorter than the IPv6 payload length says, the UDP
    /// length differs from the IPv6 payload length, or it is below 8. A
    /// jumbogram (payload length 0 plus a hop-by-hop option) is not supported.
    BadLength,
}

impl FrameError {
    /// Every reason, for registering one stats counter each.
    pub const ALL: [FrameError; 4] = [
        FrameError::Truncated,
        FrameError::NotIpv6,
        FrameError::NotUdp,
        FrameError::BadLength,
    ];

    /// A short snake_case name for stats and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            FrameError::Truncated => "truncated",
            FrameError::NotIpv6 => "not_ipv6",
            FrameError::NotUdp => "not_udp",
            FrameError::BadLength => "bad_length",
        }
    }
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for FrameError {}

/// Parses an untagged Ethernet frame carrying an IPv6/UDP datagram.
///
/// Ethernet padding after the IPv6 payload (frames are at least 60 bytes on
/// the wire) is accepted and left out of `payload`.
///
/// The UDP checksum is deliberately not verified here:
/// - on veth (tests, containers) the kernel may hand over CHECKSUM_PARTIAL
///   frames whose checksum field holds only the pseudo-header sum, so a
///   strict check would drop good packets;
/// - real NICs verify the checksum in hardware before XDP sees the frame;
/// - QUIC's AEAD authenticates every payload byte anyway, so a corrupted
///   datagram is dropped by the crypto layer.
///
/// Use [`checksum_valid`] for tests and diagnostics.
pub fn parse_udp6(frame: &[u8]) -> Result<Udp6<'_>, FrameError> {
    let ethertype = read::<2>(frame, ETH_TYPE).ok_or(FrameError::Truncated)?;
    if u16::from_be_bytes(ethertype) != ETHERTYPE_IPV6 {
        return Err(FrameError::NotIpv6);
    }
    let ip: &[u8; IPV6_LEN] = frame
        .get(ETH_LEN..)
        .and_then(<[u8]>::first_chunk)
        .ok_or(FrameError::Truncated)?;
    if ip[IP_VERSION_CLASS_FLOW - ETH_LEN] >> 4 != 6 {
        return Err(FrameError::NotIpv6);
    }
    if ip[IP_NEXT_HEADER - ETH_LEN] != IPPROTO_UDP {
        return Err(FrameError::NotUdp);
    }
    let h: &[u8; HEADERS_LEN] = frame.first_chunk().ok_or(FrameError::Truncated)?;

    let ip_payload_len = usize::from(u16::from_be_bytes(field::<IP_PAYLOAD_LEN, 2>(h)));
    let udp_len = usize::from(u16::from_be_bytes(field::<UDP_LENGTH, 2>(h)));
    if udp_len != ip_payload_len || udp_len < UDP_LEN {
        return Err(FrameError::BadLength);
    }
    let payload = frame
        .get(HEADERS_LEN..UDP_START + udp_len)
        .ok_or(FrameError::BadLength)?;

    let [version_class, class_flow, ..] = field::<IP_VERSION_CLASS_FLOW, 4>(h);
    Ok(Udp6 {
        header: Udp6Header {
            src_mac: field::<ETH_SRC, 6>(h),
            dst_mac: field::<ETH_DST, 6>(h),
            src: socket_addr(field::<IP_SRC, 16>(h), field::<UDP_SRC_PORT, 2>(h)),
            dst: socket_addr(field::<IP_DST, 16>(h), field::<UDP_DST_PORT, 2>(h)),
            traffic_class: (version_class << 4) | (class_flow >> 4),
            hop_limit: h[IP_HOP_LIMIT],
        },
        payload,
    })
}

/// What goes into the headers of every frame sent to one peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Udp6Header {
    pub src_mac: Mac,
    pub dst_mac: Mac,
    /// Only the address and port are used; flowinfo and scope id are ignored.
    pub src: SocketAddrV6,
    /// Only the address and port are used; flowinfo and scope id are ignored.
    pub dst: SocketAddrV6,
    /// The IPv6 traffic class: DSCP in the high 6 bits, ECN in the low 2.
    pub traffic_class: u8,
    pub hop_limit: u8,
}

/// Writes the 62 header bytes in front of a payload already in place.
///
/// The payload is at `frame[HEADERS_LEN..HEADERS_LEN + payload_len]` (the
/// worker copies it straight into the UMEM frame). This fills in the
/// Ethernet, IPv6 and UDP headers, with IPv6 payload length, UDP length and
/// the full UDP checksum (RFC 8200 §8.1: mandatory in IPv6, over the
/// pseudo-header; a computed 0 is sent as 0xffff). The flow label is 0.
///
/// Returns the frame length, or `None` if `frame` is shorter than that or
/// `payload_len` exceeds 65535 - 8.
pub fn write_headers(frame: &mut [u8], header: &Udp6Header, payload_len: usize) -> Option<usize> {
    if payload_len > MAX_PAYLOAD_LEN {
        return None;
    }
    let udp_len = u16::try_from(payload_len + UDP_LEN).ok()?;
    let frame_len = HEADERS_LEN + payload_len;
    let (h, payload) = frame
        .get_mut(..frame_len)?
        .split_first_chunk_mut::<HEADERS_LEN>()?;

    put::<ETH_DST, _>(h, header.dst_mac);
    put::<ETH_SRC, _>(h, header.src_mac);
    put::<ETH_TYPE, _>(h, ETHERTYPE_IPV6.to_be_bytes());
    // Version 6, traffic class, flow label 0.
    let version_class_flow = (6u32 << 28) | (u32::from(header.traffic_class) << 20);
    put::<IP_VERSION_CLASS_FLOW, _>(h, version_class_flow.to_be_bytes());
    // Without extension headers the IPv6 payload is exactly the UDP datagram.
    put::<IP_PAYLOAD_LEN, _>(h, udp_len.to_be_bytes());
    put::<IP_NEXT_HEADER, _>(h, [IPPROTO_UDP]);
    put::<IP_HOP_LIMIT, _>(h, [header.hop_limit]);
    put::<IP_SRC, _>(h, header.src.ip().octets());
    put::<IP_DST, _>(h, header.dst.ip().octets());
    put::<UDP_SRC_PORT, _>(h, header.src.port().to_be_bytes());
    put::<UDP_DST_PORT, _>(h, header.dst.port().to_be_bytes());
    put::<UDP_LENGTH, _>(h, udp_len.to_be_bytes());
    put::<UDP_CHECKSUM, _>(h, [0, 0]);

    // The UDP header is 8 bytes, so summing it and the payload separately
    // keeps the payload's words aligned as they are in the datagram.
    let sum = pseudo_header_sum(header.src.ip(), header.dst.ip())
        + u64::from(udp_len)
        + sum_words(&field::<UDP_START, UDP_LEN>(h))
        + sum_words(payload);
    put::<UDP_CHECKSUM, _>(h, checksum_field(sum).to_be_bytes());
    Some(frame_len)
}

/// Whether `frame` is an IPv6/UDP datagram (as [`parse_udp6`] takes it) with
/// a correct UDP checksum. A zero checksum field means "not computed", which
/// IPv6 forbids (RFC 8200 §8.1), so it is not valid.
///
/// For tests and diagnostics; the receive path does not call it (see
/// [`parse_udp6`] for why).
pub fn checksum_valid(frame: &[u8]) -> bool {
    let Ok(datagram) = parse_udp6(frame) else {
        return false;
    };
    if read::<2>(frame, UDP_CHECKSUM) == Some([0, 0]) {
        return false;
    }
    let Some(segment) = frame.get(UDP_START..HEADERS_LEN + datagram.payload.len()) else {
        return false;
    };
    // The segment includes the checksum field, so a correct one makes the
    // whole sum all ones (one's-complement -0).
    let sum = pseudo_header_sum(datagram.header.src.ip(), datagram.header.dst.ip())
        + segment.len() as u64
        + sum_words(segment);
    fold(sum) == 0xffff
}

/// The RFC 8200 §8.1 pseudo-header sum for one (source, destination) pair,
/// without the upper-layer length, which the caller adds per datagram. The
/// pair is fixed per peer, so a sender may compute this once. The result is
/// unfolded: add it to further sums and fold once at the end.
pub fn pseudo_header_sum(src: &Ipv6Addr, dst: &Ipv6Addr) -> u64 {
    // Three zero bytes then the next header: as a 32-bit word, just 17.
    sum_words(&src.octets()) + sum_words(&dst.octets()) + u64::from(IPPROTO_UDP)
}

/// The RFC 1071 sum of `bytes` as big-endian 16-bit words (a trailing odd
/// byte is padded with a zero byte on the right), not yet folded to 16 bits.
///
/// Why wider words work: the one's-complement sum is addition modulo
/// 2^16 - 1, and 2^16 ≡ 1 (mod 2^16 - 1), so a 32-bit big-endian word
/// `hi * 2^16 + lo` contributes the same as its two 16-bit halves `hi + lo`.
/// Adding 32-bit words into a 64-bit accumulator defers every end-around
/// carry to the final [`fold`]. Each 8-byte chunk adds less than 2^33, so
/// the accumulator cannot overflow before 2^31 chunks (16 GiB); callers pass
/// at most one datagram (64 KiB).
fn sum_words(bytes: &[u8]) -> u64 {
    let (chunks, tail) = bytes.as_chunks::<8>();
    let mut sum = 0u64;
    for chunk in chunks {
        sum += split_u64(u64::from_be_bytes(*chunk));
    }
    // The tail starts at a multiple of 8, so zero-padding it on the right to
    // 8 bytes keeps every byte in its 16-bit word position.
    let mut last = [0u8; 8];
    for (dst, src) in last.iter_mut().zip(tail) {
        *dst = *src;
    }
    sum + split_u64(u64::from_be_bytes(last))
}

/// The sum of the two 32-bit halves of `word`.
fn split_u64(word: u64) -> u64 {
    (word >> 32) + (word & 0xffff_ffff)
}

/// Folds a wide sum to 16 bits with end-around carries. A nonzero sum folds
/// to 1..=0xffff, as the RFC 1071 word-by-word sum would.
fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The value for the UDP checksum field from the full sum (pseudo-header,
/// header with checksum 0, payload): its one's complement, with a computed 0
/// sent as 0xffff, because 0 in IPv6 means "no checksum" (RFC 8200 §8.1).
fn checksum_field(sum: u64) -> u16 {
    match !fold(sum) {
        0 => 0xffff,
        checksum => checksum,
    }
}

/// An address and a big-endian port as a socket address, flowinfo and scope 0.
fn socket_addr(ip: [u8; 16], port: [u8; 2]) -> SocketAddrV6 {
    SocketAddrV6::new(Ipv6Addr::from(ip), u16::from_be_bytes(port), 0, 0)
}

/// `N` bytes of `bytes` at `at`, or `None` if they run past the end.
fn read<const N: usize>(bytes: &[u8], at: usize) -> Option<[u8; N]> {
    bytes.get(at..)?.first_chunk().copied()
}

/// `N` bytes of the fixed headers at `AT`; in bounds by a compile-time check.
fn field<const AT: usize, const N: usize>(h: &[u8; HEADERS_LEN]) -> [u8; N] {
    const { assert!(AT + N <= HEADERS_LEN) };
    let mut out = [0; N];
    out.copy_from_slice(&h[AT..AT + N]);
    out
}

/// Writes `value` into the fixed headers at `AT`; in bounds by a
/// compile-time check.
fn put<const AT: usize, const N: usize>(h: &mut [u8; HEADERS_LEN], value: [u8; N]) {
    const { assert!(AT + N <= HEADERS_LEN) };
    h[AT..AT + N].copy_from_slice(&value);
}

/// The property the `xdp_frame` fuzz target and the corpus replay check
/// (panics where it fails): any bytes parse or give a typed error and carry
/// no valid checksum; a parsed datagram rebuilt with [`write_headers`]
/// parses back to the same fields and payload with a valid checksum, and a
/// frame that had a valid checksum and flow label 0 (all we send) is rebuilt
/// byte for byte, up to any Ethernet padding. Returns whether it parsed.
pub fn assert_round_trip(data: &[u8]) -> bool {
    let Ok(parsed) = parse_udp6(data) else {
        assert!(!checksum_valid(data));
        return false;
    };
    let payload_len = parsed.payload.len();
    let mut rebuilt = vec![0; HEADERS_LEN + payload_len];
    rebuilt[HEADERS_LEN..].copy_from_slice(parsed.payload);
    assert_eq!(
        write_headers(&mut rebuilt, parsed.header(), payload_len),
        Some(rebuilt.len())
    );
    let again = parse_udp6(&rebuilt).expect("a rebuilt frame parses");
    assert_eq!(again.header(), parsed.header());
    assert_eq!(again.payload, parsed.payload);
    assert!(checksum_valid(&rebuilt));
    let flow_label_zero = data[15] & 0x0f == 0 && data[16..18] == [0, 0];
    if checksum_valid(data) && flow_label_zero {
        assert_eq!(rebuilt, data[..rebuilt.len()]);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{XorShift, hex};

    /// Frames captured from a veth pair between two scratch network
    /// namespaces, with tx checksum offload off on the sender (so the kernel
    /// wrote the full UDP checksum) and `net.ipv6.auto_flowlabels=0` (so the
    /// flow label is 0, as `write_headers` sends it). Sender
    /// 02:00:5e:71:00:0a [fd71:7e57:0:9::a]:40123, receiver
    /// 02:00:5e:71:00:0b [fd71:7e57:0:9::b]:4433; read with an AF_PACKET
    /// socket on the receiving veth.
    ///
    /// Default socket options: traffic class 0, hop limit 64, an even
    /// 28-byte payload.
    const CAPTURED_PLAIN: &str = "02005e71000b02005e71000a86dd6000000000241140\
        fd717e5700000009000000000000000afd717e5700000009000000000000000b\
        9cbb11510024ae1a\
        696e7465726e65743220786470206672616d65206361707475726521";
    /// IPV6_TCLASS 0xba (DSCP EF, ECN ECT(0)), IPV6_UNICAST_HOPS 7, an odd
    /// 29-byte payload.
    const CAPTURED_TCLASS: &str = "02005e71000b02005e71000a86dd6ba0000000251107\
        fd717e5700000009000000000000000afd717e5700000009000000000000000b\
        9cbb11510025eb1a\
        6f6464207061796c6f61642c2044534350204546202b20454354283029";

    const MAC_A: Mac = [0x02, 0x00, 0x5e, 0x71, 0x00, 0x0a];
    const MAC_B: Mac = [0x02, 0x00, 0x5e, 0x71, 0x00, 0x0b];

    fn addr(s: &str, port: u16) -> SocketAddrV6 {
        SocketAddrV6::new(s.parse().unwrap(), port, 0, 0)
    }

    fn sample_header() -> Udp6Header {
        Udp6Header {
            src_mac: MAC_A,
            dst_mac: MAC_B,
            src: addr("fd71:7e57:0:9::a", 40123),
            dst: addr("fd71:7e57:0:9::b", 4433),
            traffic_class: 0xba,
            hop_limit: 7,
        }
    }

    /// A whole frame from `write_headers` with `payload`.
    fn build(header: &Udp6Header, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0; HEADERS_LEN + payload.len()];
        frame[HEADERS_LEN..].copy_from_slice(payload);
        let len = write_headers(&mut frame, header, payload.len()).unwrap();
        assert_eq!(len, frame.len());
        frame
    }

    /// The plain RFC 1071 algorithm, 16 bits at a time with an end-around
    /// carry after every add, as a reference for the wide-word sum.
    fn reference_checksum(frame: &[u8]) -> u16 {
        let segment = &frame[UDP_START..];
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&frame[IP_SRC..IP_DST + 16]);
        bytes.extend_from_slice(&(segment.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&[0, 0, 0, IPPROTO_UDP]);
        bytes.extend_from_slice(&segment[..6]);
        bytes.extend_from_slice(&[0, 0]); // the checksum field itself
        bytes.extend_from_slice(&segment[8..]);
        if bytes.len() % 2 == 1 {
            bytes.push(0);
        }
        let mut sum: u32 = 0;
        for word in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([word[0], word[1]]));
            sum = (sum & 0xffff) + (sum >> 16);
        }
        match !(sum as u16) {
            0 => 0xffff,
            c => c,
        }
    }

    fn checksum_of(frame: &[u8]) -> u16 {
        u16::from_be_bytes([frame[UDP_CHECKSUM], frame[UDP_CHECKSUM + 1]])
    }

    #[test]
    fn round_trip() {
        let header = sample_header();
        for len in [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 1451, 1452] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let frame = build(&header, &payload);
            let parsed = parse_udp6(&frame).unwrap();
            assert_eq!(*parsed.header(), header, "len {len}");
            assert_eq!(parsed.payload, &payload[..], "len {len}");
            assert!(checksum_valid(&frame), "len {len}");
            assert_eq!(checksum_of(&frame), reference_checksum(&frame), "len {len}");
        }
    }

    #[test]
    fn round_trip_ignores_flowinfo_and_scope() {
        let mut header = sample_header();
        header.src = SocketAddrV6::new(*header.src.ip(), 1, 0xfffff, 3);
        header.dst = SocketAddrV6::new(*header.dst.ip(), 65535, 0x12345, 0);
        header.traffic_class = 0xff;
        header.hop_limit = 255;
        let frame = build(&header, b"x");
        // Flow label bits are all zero.
        assert_eq!(frame[14..18], [0x6f, 0xf0, 0, 0]);
        let parsed = *parse_udp6(&frame).unwrap().header();
        assert_eq!(parsed.src, addr("fd71:7e57:0:9::a", 1));
        assert_eq!(parsed.dst, addr("fd71:7e57:0:9::b", 65535));
        assert_eq!(parsed.traffic_class, 0xff);
        assert_eq!(parsed.hop_limit, 255);
    }

    #[test]
    fn captured_frames() {
        let cases = [
            (
                CAPTURED_PLAIN,
                0x00,
                64,
                &b"internet2 xdp frame capture!"[..],
            ),
            (
                CAPTURED_TCLASS,
                0xba,
                7,
                &b"odd payload, DSCP EF + ECT(0)"[..],
            ),
        ];
        for (capture, traffic_class, hop_limit, payload) in cases {
            let frame = hex(capture);
            let parsed = parse_udp6(&frame).unwrap();
            let received = parsed.header();
            assert_eq!(received.src_mac, MAC_A);
            assert_eq!(received.dst_mac, MAC_B);
            assert_eq!(received.src, addr("fd71:7e57:0:9::a", 40123));
            assert_eq!(received.dst, addr("fd71:7e57:0:9::b", 4433));
            assert_eq!(
                received.src.ip().segments(),
                [0xfd71, 0x7e57, 0, 9, 0, 0, 0, 0xa]
            );
            assert_eq!(received.traffic_class, traffic_class);
            assert_eq!(received.hop_limit, hop_limit);
            assert_eq!(parsed.payload, payload);
            assert!(checksum_valid(&frame));

            // Writing the same fields reproduces the kernel's headers,
            // checksum included, byte for byte.
            let mut rebuilt = vec![0; frame.len()];
            rebuilt[HEADERS_LEN..].copy_from_slice(payload);
            let header = Udp6Header {
                src_mac: MAC_A,
                dst_mac: MAC_B,
                src: addr("fd71:7e57:0:9::a", 40123),
                dst: addr("fd71:7e57:0:9::b", 4433),
                traffic_class,
                hop_limit,
            };
            assert_eq!(
                write_headers(&mut rebuilt, &header, payload.len()),
                Some(frame.len())
            );
            assert_eq!(rebuilt, frame);
        }
        // ECN is the low two bits of the traffic class: ECT(0) here.
        let tclass = parse_udp6(&hex(CAPTURED_TCLASS))
            .unwrap()
            .header()
            .traffic_class;
        let ecn = tclass & 0b11;
        assert_eq!(ecn, 0b10);
    }

    #[test]
    fn ethernet_padding_is_ignored() {
        // A 1-byte payload is a 63-byte frame; pad it like a short frame.
        let mut frame = build(&sample_header(), b"z");
        frame.extend_from_slice(&[0xee; 11]);
        let parsed = parse_udp6(&frame).unwrap();
        assert_eq!(parsed.payload, b"z");
        assert!(checksum_valid(&frame));
    }

    /// Sets a big-endian u16 at `at`.
    fn set_u16(frame: &mut [u8], at: usize, value: u16) {
        frame[at..at + 2].copy_from_slice(&value.to_be_bytes());
    }

    #[test]
    fn bad_frames() {
        use FrameError::{BadLength, NotIpv6, NotUdp, Truncated};
        let valid = build(&sample_header(), b"0123456789");
        let with = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut frame = valid.clone();
            edit(&mut frame);
            frame
        };
        let cut = |len: usize| valid[..len].to_vec();
        let byte = |at: usize, value: u8| with(&|f| f[at] = value);
        let word = |at: usize, value: u16| with(&|f| set_u16(f, at, value));
        // The IPv6 payload length and the UDP length, set together.
        let lengths = |ip: u16, udp: u16| {
            with(&|f| {
                set_u16(f, IP_PAYLOAD_LEN, ip);
                set_u16(f, UDP_LENGTH, udp);
            })
        };
        let cases: Vec<(&str, Vec<u8>, FrameError)> = vec![
            ("empty", vec![], Truncated),
            ("13 bytes", cut(13), Truncated),
            ("ipv4 ethertype", word(ETH_TYPE, 0x0800), NotIpv6),
            ("802.1Q tag", word(ETH_TYPE, 0x8100), NotIpv6),
            ("802.1ad tag", word(ETH_TYPE, 0x88a8), NotIpv6),
            ("ip version 4", byte(IP_VERSION_CLASS_FLOW, 0x4b), NotIpv6),
            (
                "ip version 0",
                with(&|f| f[IP_VERSION_CLASS_FLOW] &= 0x0f),
                NotIpv6,
            ),
            ("fragment header", byte(IP_NEXT_HEADER, 44), NotUdp),
            ("hop-by-hop", byte(IP_NEXT_HEADER, 0), NotUdp),
            ("icmpv6", byte(IP_NEXT_HEADER, 58), NotUdp),
            ("tcp", byte(IP_NEXT_HEADER, 6), NotUdp),
            ("ipv6 header truncated", cut(UDP_START - 1), Truncated),
            ("ethernet only", cut(ETH_LEN), Truncated),
            ("udp header truncated", cut(HEADERS_LEN - 1), Truncated),
            ("ipv6 header only", cut(UDP_START), Truncated),
            (
                "payload length past the frame",
                cut(valid.len() - 1),
                BadLength,
            ),
            ("both lengths past the frame", lengths(19, 19), BadLength),
            (
                "udp length below ipv6 payload length",
                word(UDP_LENGTH, 17),
                BadLength,
            ),
            (
                "udp length above ipv6 payload length",
                word(UDP_LENGTH, 19),
                BadLength,
            ),
            ("udp length below 8", lengths(4, 4), BadLength),
            ("jumbogram lengths", lengths(0, 0), BadLength),
        ];
        for (name, frame, expected) in cases {
            assert_eq!(parse_udp6(&frame), Err(expected), "{name}");
            assert!(!checksum_valid(&frame), "{name}");
        }
    }

    #[test]
    fn error_names() {
        let names: Vec<&str> = FrameError::ALL.iter().map(|e| e.as_str()).collect();
        assert_eq!(names, ["truncated", "not_ipv6", "not_udp", "bad_length"]);
        assert_eq!(FrameError::NotUdp.to_string(), "not_udp");
    }

    #[test]
    fn write_headers_rejects_bad_sizes() {
        let header = sample_header();
        assert_eq!(write_headers(&mut [], &header, 0), None);
        assert_eq!(write_headers(&mut [0; HEADERS_LEN - 1], &header, 0), None);
        assert_eq!(write_headers(&mut [0; HEADERS_LEN + 9], &header, 10), None);
        assert_eq!(
            write_headers(&mut [0; HEADERS_LEN], &header, 0),
            Some(HEADERS_LEN)
        );
        assert_eq!(write_headers(&mut [0; 100], &header, usize::MAX), None);

        let mut big = vec![0; HEADERS_LEN + MAX_PAYLOAD_LEN + 1];
        assert_eq!(write_headers(&mut big, &header, MAX_PAYLOAD_LEN + 1), None);
        let len = write_headers(&mut big, &header, MAX_PAYLOAD_LEN);
        assert_eq!(len, Some(HEADERS_LEN + MAX_PAYLOAD_LEN));
        let frame = &big[..HEADERS_LEN + MAX_PAYLOAD_LEN];
        assert_eq!(frame[UDP_LENGTH..UDP_LENGTH + 2], [0xff, 0xff]);
        assert_eq!(parse_udp6(frame).unwrap().payload.len(), MAX_PAYLOAD_LEN);
        assert!(checksum_valid(frame));
    }

    #[test]
    fn fold_and_zero_checksum() {
        assert_eq!(fold(0), 0);
        assert_eq!(fold(0xffff), 0xffff);
        assert_eq!(fold(0x1_0000), 1);
        assert_eq!(fold(0x1_fffe), 0xffff);
        assert_eq!(fold(u64::MAX), 0xffff);
        // A sum that folds to all ones computes checksum 0, sent as 0xffff.
        assert_eq!(checksum_field(0xffff), 0xffff);
        assert_eq!(checksum_field(0x2_fffd), 0xffff);
        assert_eq!(checksum_field(0x1234), !0x1234);
    }

    #[test]
    fn computed_zero_checksum_is_sent_as_ffff() {
        // With a two-byte payload of zeros the checksum is c; a payload of c
        // itself then makes the sum all ones, so the computed checksum is 0.
        let header = sample_header();
        let c = checksum_of(&build(&header, &[0, 0]));
        assert_ne!(c, 0xffff, "pick another header for this test");
        let frame = build(&header, &c.to_be_bytes());
        assert_eq!(checksum_of(&frame), 0xffff);
        assert!(checksum_valid(&frame));
        assert_eq!(reference_checksum(&frame), 0xffff);
    }

    #[test]
    fn checksum_valid_detects_damage() {
        let payload: Vec<u8> = (0..1452u32).map(|i| (i * 13) as u8).collect();
        let frame = build(&sample_header(), &payload);
        assert!(checksum_valid(&frame));
        for bit in [0, 7, 100 * 8 + 3, 1451 * 8, 1451 * 8 + 7] {
            let mut damaged = frame.clone();
            damaged[HEADERS_LEN + bit / 8] ^= 1 << (bit % 8);
            assert!(!checksum_valid(&damaged), "bit {bit}");
        }
        // Addresses are covered through the pseudo-header.
        let mut damaged = frame.clone();
        damaged[IP_DST + 15] ^= 1;
        assert!(!checksum_valid(&damaged));
        // A zero checksum field means "none", which IPv6 does not allow.
        let mut zero = frame.clone();
        zero[UDP_CHECKSUM..UDP_CHECKSUM + 2].copy_from_slice(&[0, 0]);
        assert!(!checksum_valid(&zero));
    }

    #[test]
    fn wide_sum_matches_reference() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..2000 {
            let len = (rng.next() % 1600) as usize;
            let payload: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let mut header = sample_header();
            let mut ip = [0u8; 16];
            ip.iter_mut().for_each(|b| *b = rng.next() as u8);
            header.src = SocketAddrV6::new(ip.into(), rng.next() as u16, 0, 0);
            let frame = build(&header, &payload);
            assert_eq!(checksum_of(&frame), reference_checksum(&frame));
            assert!(checksum_valid(&frame));
        }
    }

    #[test]
    fn fuzz_never_panics() {
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        let valid = build(&sample_header(), &[0x5a; 120]);
        let mut accepted = 0;
        for i in 0..100_000 {
            let len = (rng.next() % 200) as usize;
            let frame: Vec<u8> = if i % 2 == 0 {
                (0..len).map(|_| rng.next() as u8).collect()
            } else {
                // A valid frame, resized and with a few bytes changed,
                // mostly in the headers.
                let mut frame = valid.clone();
                frame.resize(len, 0);
                for _ in 0..rng.next() % 4 {
                    if frame.is_empty() {
                        break;
                    }
                    let span = if rng.next().is_multiple_of(4) {
                        frame.len()
                    } else {
                        HEADERS_LEN
                    };
                    let at = (rng.next() as usize % span).min(frame.len() - 1);
                    frame[at] = rng.next() as u8;
                }
                frame
            };
            if let Ok(parsed) = parse_udp6(&frame) {
                accepted += 1;
                assert!(HEADERS_LEN + parsed.payload.len() <= frame.len());
            }
            let _ = checksum_valid(&frame);

            let mut out = frame;
            let payload_len = (rng.next() % 300) as usize;
            let written = write_headers(&mut out, &sample_header(), payload_len);
            assert_eq!(written.is_some(), HEADERS_LEN + payload_len <= out.len());
        }
        // The mutations leave enough frames whole to exercise the accept path.
        assert!(accepted > 1000, "accepted {accepted}");
    }
}
