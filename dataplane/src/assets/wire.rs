//! The `stoq/1` asset requests' payloads (docs/PROTOCOL.md, "Assets"):
//! parsed once here, at the edge, into [`AssetRequest`]; the worker works
//! on that. Integers are big-endian; an address is its 16 bytes.

use super::address::AssetAddress;
use super::memory::{Access, Owner};
use crate::protocols::stoq_registry::{
    ASSET_ALLOC, ASSET_CAS, ASSET_FREE, ASSET_GRANT, ASSET_LIST, ASSET_READ, ASSET_WRITE,
};

/// The most bytes one `ASSET_READ` returns (the client's response limit,
/// `stoq::RESPONSE_PAYLOAD_MAX`, less room to spare); longer reads are
/// several requests.
pub const READ_LEN_MAX: u32 = 16 * 1024 * 1024 - 64;

/// What a cluster member adds to a request it proxies to the member that
/// holds the asset (`ASSET_PROXY`): the caller's owner key (32 bytes) and
/// the request's kind.
pub const PROXIED_HEADER_LEN: usize = 33;

/// The most bytes a read through another member returns (`ASSET_PROXY`):
/// what a member holds for the reads it proxies stays bounded. Longer
/// reads are several, or asked of the holder.
pub const PROXIED_READ_LEN_MAX: u32 = 1 << 20;

/// The longest asset request payload: a request's bound
/// (`stoq::REQUEST_PAYLOAD_MAX`) less [`PROXIED_HEADER_LEN`], so that any
/// request a member takes, it can also proxy.
pub const PAYLOAD_MAX: usize = crate::protocols::stoq::REQUEST_PAYLOAD_MAX - PROXIED_HEADER_LEN;

/// The most bytes one `ASSET_WRITE` carries (its address and offset take
/// 24 of [`PAYLOAD_MAX`]).
pub const WRITE_LEN_MAX: usize = PAYLOAD_MAX - 24;

/// The most bytes one `ASSET_WRITE` of a storage asset carries: each is a
/// command of the control plane's log, which on a cluster goes to the
/// other members as one Raft message (under 60 KiB).
pub const STORAGE_WRITE_LEN_MAX: usize = 48 * 1024;

/// What an allocation asks for (and which assets a list shows). Compute
/// and VM assets are later kinds; a number this build does not serve is
/// refused by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum AllocKind {
    /// Held by the node's workers, gone with the process.
    Memory = 1,
    /// Durable, in the control plane's store.
    Storage = 2,
}

impl AllocKind {
    fn from_byte(byte: u8) -> Result<Self, WireError> {
        match byte {
            1 => Ok(AllocKind::Memory),
            2 => Ok(AllocKind::Storage),
            other => Err(WireError::AllocKind(other)),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            AllocKind::Memory => "memory",
            AllocKind::Storage => "storage",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AssetRequest<'a> {
    /// `kind: u8, size: u64`, then for storage an optional name (a DNS
    /// label, [`NAME_LEN_MAX`] bytes at most: the asset is published as
    /// `NAME.assets.APEX` in the zone) → the address (16 bytes).
    Alloc {
        kind: AllocKind,
        size: u64,
        name: Option<&'a str>,
    },
    /// `address, offset: u64, len: u32` → the bytes.
    Read {
        address: AssetAddress,
        offset: u64,
        len: u32,
    },
    /// `address, offset: u64, data…` → nothing.
    Write {
        address: AssetAddress,
        offset: u64,
        data: &'a [u8],
    },
    /// `address, offset: u64, len: u32, expected[len], new[len]` →
    /// `swapped: u8`, then the bytes that were there.
    Cas {
        address: AssetAddress,
        offset: u64,
        expected: &'a [u8],
        new: &'a [u8],
    },
    /// `address` → the bytes freed (u64).
    Free { address: AssetAddress },
    /// nothing (memory) or 2 (storage) → JSON: the caller's assets of that
    /// kind. (Memory has one encoding, the empty payload, as clients before
    /// storage sent it.)
    List { kind: AllocKind },
    /// `address, grantee: [u8; 32], access: u8` (0 withdraws, 1 read, 2
    /// write) → `changed: u8`.
    Grant {
        address: AssetAddress,
        grantee: Owner,
        access: Option<Access>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("{what}: expected {expected} bytes, got {got}")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("asset kind {0} is not served by this build (1 is memory, 2 storage)")]
    AllocKind(u8),
    #[error("a list's payload is empty (memory assets) or 2 (storage assets), not {0}")]
    ListKind(u8),
    #[error("only storage assets take a name (a memory asset's address ends with its lease)")]
    NameForMemory,
    #[error(
        "an asset's name is one DNS label: 1 to {NAME_LEN_MAX} of a-z, 0-9 and '-', not starting or ending with '-'"
    )]
    Name,
    #[error("grant access {0} is not 0 (withdraw), 1 (read) or 2 (write)")]
    Access(u8),
    #[error("a read returns at most {READ_LEN_MAX} bytes, not {0}")]
    ReadLen(u32),
    #[error("not an asset request kind: {0:#04x}")]
    Kind(u8),
    #[error(
        "an asset request's payload is at most {PAYLOAD_MAX} bytes, not {0} (a write carries at most {WRITE_LEN_MAX})"
    )]
    TooLong(usize),
    #[error("a proxied request names an asset by address (not {0:#04x})")]
    ProxiedKind(u8),
    #[error(
        "a read through another member returns at most {PROXIED_READ_LEN_MAX} bytes, not {0}; read in parts, or at the member that holds the asset"
    )]
    ProxiedReadLen(u32),
}

/// The longest asset name (one DNS label).
pub const NAME_LEN_MAX: usize = 63;

/// `bytes` as an asset name: one lowercase DNS label.
pub fn label(bytes: &[u8]) -> Result<&str, WireError> {
    let ok = (1..=NAME_LEN_MAX).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first() != Some(&b'-')
        && bytes.last() != Some(&b'-');
    match ok {
        true => std::str::from_utf8(bytes).map_err(|_| WireError::Name),
        false => Err(WireError::Name),
    }
}

/// A payload cut into fields, each taken once.
struct Fields<'a> {
    what: &'static str,
    rest: &'a [u8],
    total: usize,
}

impl<'a> Fields<'a> {
    fn new(what: &'static str, payload: &'a [u8]) -> Self {
        Self {
            what,
            rest: payload,
            total: payload.len(),
        }
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        match self.rest.split_first_chunk::<N>() {
            Some((head, rest)) => {
                self.rest = rest;
                Ok(*head)
            }
            None => Err(self.short(N)),
        }
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.rest.len() < n {
            return Err(self.short(n));
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    fn short(&self, n: usize) -> WireError {
        WireError::Length {
            what: self.what,
            expected: self.total - self.rest.len() + n,
            got: self.total,
        }
    }

    fn address(&mut self) -> Result<AssetAddress, WireError> {
        Ok(AssetAddress::from_octets(self.take::<16>()?))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.take::<8>()?))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.take::<4>()?))
    }

    /// Nothing may follow the last field.
    fn end(self) -> Result<(), WireError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(WireError::Length {
                what: self.what,
                expected: self.total - self.rest.len(),
                got: self.total,
            })
        }
    }
}

impl<'a> AssetRequest<'a> {
    /// The asset the request names, if it names one.
    pub fn address(&self) -> Option<AssetAddress> {
        match self {
            AssetRequest::Read { address, .. }
            | AssetRequest::Write { address, .. }
            | AssetRequest::Cas { address, .. }
            | AssetRequest::Free { address }
            | AssetRequest::Grant { address, .. } => Some(*address),
            AssetRequest::Alloc { .. } | AssetRequest::List { .. } => None,
        }
    }

    /// Which kind of asset it is about: storage requests are the control
    /// plane's to answer (an address of another node is neither: it is
    /// answered "elsewhere" where it arrives).
    pub fn asset_kind(&self) -> AllocKind {
        match self {
            AssetRequest::Alloc { kind, .. } | AssetRequest::List { kind } => *kind,
            _ if self.address().is_some_and(|a| a.id.is_storage()) => AllocKind::Storage,
            _ => AllocKind::Memory,
        }
    }

    /// Parse the payload of a request of `kind`.
    pub fn decode(kind: u8, payload: &'a [u8]) -> Result<Self, WireError> {
        if payload.len() > PAYLOAD_MAX {
            return Err(WireError::TooLong(payload.len()));
        }
        let request = match kind {
            ASSET_ALLOC => {
                let mut f = Fields::new("ASSET_ALLOC", payload);
                let kind = AllocKind::from_byte(f.take::<1>()?[0])?;
                let size = f.u64()?;
                let name = match f.rest {
                    [] => None,
                    _ if kind == AllocKind::Memory => return Err(WireError::NameForMemory),
                    bytes => Some(label(bytes)?),
                };
                AssetRequest::Alloc { kind, size, name }
            }
            ASSET_READ => {
                let mut f = Fields::new("ASSET_READ", payload);
                let (address, offset, len) = (f.address()?, f.u64()?, f.u32()?);
                f.end()?;
                if len > READ_LEN_MAX {
                    return Err(WireError::ReadLen(len));
                }
                AssetRequest::Read {
                    address,
                    offset,
                    len,
                }
            }
            ASSET_WRITE => {
                let mut f = Fields::new("ASSET_WRITE", payload);
                let (address, offset) = (f.address()?, f.u64()?);
                AssetRequest::Write {
                    address,
                    offset,
                    data: f.rest,
                }
            }
            ASSET_CAS => {
                let mut f = Fields::new("ASSET_CAS", payload);
                let (address, offset, len) = (f.address()?, f.u64()?, f.u32()? as usize);
                let expected = f.bytes(len)?;
                let new = f.bytes(len)?;
                f.end()?;
                AssetRequest::Cas {
                    address,
                    offset,
                    expected,
                    new,
                }
            }
            ASSET_FREE => {
                let mut f = Fields::new("ASSET_FREE", payload);
                let address = f.address()?;
                f.end()?;
                AssetRequest::Free { address }
            }
            ASSET_LIST => {
                let mut f = Fields::new("ASSET_LIST", payload);
                let kind = match f.rest.is_empty() {
                    true => AllocKind::Memory,
                    false => match f.take::<1>()?[0] {
                        2 => AllocKind::Storage,
                        other => return Err(WireError::ListKind(other)),
                    },
                };
                f.end()?;
                AssetRequest::List { kind }
            }
            ASSET_GRANT => {
                let mut f = Fields::new("ASSET_GRANT", payload);
                let (address, grantee) = (f.address()?, Owner(f.take::<32>()?));
                let access = match f.take::<1>()?[0] {
                    0 => None,
                    byte => Some(Access::from_byte(byte).ok_or(WireError::Access(byte))?),
                };
                f.end()?;
                AssetRequest::Grant {
                    address,
                    grantee,
                    access,
                }
            }
            other => return Err(WireError::Kind(other)),
        };
        Ok(request)
    }

    /// The request's kind and payload, as a client sends it.
    pub fn encode(&self) -> (u8, Vec<u8>) {
        let mut out = Vec::new();
        let kind = match self {
            AssetRequest::Alloc { kind, size, name } => {
                out.push(*kind as u8);
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(name.unwrap_or_default().as_bytes());
                ASSET_ALLOC
            }
            AssetRequest::Read {
                address,
                offset,
                len,
            } => {
                out.extend_from_slice(&address.octets());
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(&len.to_be_bytes());
                ASSET_READ
            }
            AssetRequest::Write {
                address,
                offset,
                data,
            } => {
                out.extend_from_slice(&address.octets());
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(data);
                ASSET_WRITE
            }
            AssetRequest::Cas {
                address,
                offset,
                expected,
                new,
            } => {
                out.extend_from_slice(&address.octets());
                out.extend_from_slice(&offset.to_be_bytes());
                let len = u32::try_from(expected.len()).expect("a request is at most 64 KiB");
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(expected);
                out.extend_from_slice(new);
                ASSET_CAS
            }
            AssetRequest::Free { address } => {
                out.extend_from_slice(&address.octets());
                ASSET_FREE
            }
            AssetRequest::List { kind } => {
                if *kind != AllocKind::Memory {
                    out.push(*kind as u8);
                }
                ASSET_LIST
            }
            AssetRequest::Grant {
                address,
                grantee,
                access,
            } => {
                out.extend_from_slice(&address.octets());
                out.extend_from_slice(&grantee.0);
                out.push(access.map_or(0, Access::byte));
                ASSET_GRANT
            }
        };
        (kind, out)
    }
}

/// `ASSET_PROXY`'s payload: the asset request `kind` with `payload`, which
/// `owner` sent to this member: owner (32 bytes) ‖ kind ‖ payload.
pub fn encode_proxied(owner: &Owner, kind: u8, payload: &[u8]) -> Vec<u8> {
    [&owner.0[..], &[kind], payload].concat()
}

/// An `ASSET_PROXY` payload's owner and request. Only requests that name
/// an asset by address are proxied (an allocation or a list is the
/// receiving member's own).
pub fn decode_proxied(payload: &[u8]) -> Result<(Owner, AssetRequest<'_>), WireError> {
    let mut f = Fields::new("ASSET_PROXY", payload);
    let owner = Owner(f.take::<32>()?);
    let kind = f.take::<1>()?[0];
    let request = AssetRequest::decode(kind, f.rest)?;
    check_proxied(kind, &request)?;
    Ok((owner, request))
}

/// Whether `request` (of `kind`) may go through another member: it names
/// an address, and a read is at most [`PROXIED_READ_LEN_MAX`].
pub fn check_proxied(kind: u8, request: &AssetRequest<'_>) -> Result<(), WireError> {
    match request {
        _ if request.address().is_none() => Err(WireError::ProxiedKind(kind)),
        AssetRequest::Read { len, .. } if *len > PROXIED_READ_LEN_MAX => {
            Err(WireError::ProxiedReadLen(*len))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address() -> AssetAddress {
        "fd71:7e57:0:1:0:1:2:3".parse().unwrap()
    }

    #[test]
    fn every_request_round_trips() {
        let requests = [
            AssetRequest::Alloc {
                kind: AllocKind::Memory,
                size: 4096,
                name: None,
            },
            AssetRequest::Read {
                address: address(),
                offset: 7,
                len: 4096,
            },
            AssetRequest::Write {
                address: address(),
                offset: u64::MAX,
                data: b"payload",
            },
            AssetRequest::Write {
                address: address(),
                offset: 0,
                data: b"",
            },
            AssetRequest::Cas {
                address: address(),
                offset: 1,
                expected: b"ab",
                new: b"cd",
            },
            AssetRequest::Free { address: address() },
            AssetRequest::List {
                kind: AllocKind::Memory,
            },
            AssetRequest::List {
                kind: AllocKind::Storage,
            },
            AssetRequest::Alloc {
                kind: AllocKind::Storage,
                size: 1,
                name: None,
            },
            AssetRequest::Grant {
                address: address(),
                grantee: Owner([9; 32]),
                access: Some(Access::Write),
            },
            AssetRequest::Grant {
                address: address(),
                grantee: Owner([9; 32]),
                access: None,
            },
        ];
        for request in requests {
            let (kind, payload) = request.encode();
            let decoded = AssetRequest::decode(kind, &payload).unwrap();
            assert_eq!(decoded, request);
        }
        // A list without a kind is of memory assets (what clients before
        // storage sent); a kind past the known ones is refused by name.
        assert_eq!(
            AssetRequest::decode(ASSET_LIST, &[]).unwrap(),
            AssetRequest::List {
                kind: AllocKind::Memory
            }
        );
        for kind in [1, 3] {
            assert_eq!(
                AssetRequest::decode(ASSET_LIST, &[kind]),
                Err(WireError::ListKind(kind)),
                "memory is the empty payload"
            );
        }
        assert_eq!(
            AssetRequest::decode(ASSET_LIST, &[2, 0]),
            Err(WireError::Length {
                what: "ASSET_LIST",
                expected: 1,
                got: 2
            })
        );
    }

    #[test]
    fn a_storage_allocation_may_carry_a_name_of_one_label() {
        let named = AssetRequest::Alloc {
            kind: AllocKind::Storage,
            size: 1,
            name: Some("notes-2"),
        };
        let (kind, payload) = named.encode();
        assert_eq!(AssetRequest::decode(kind, &payload), Ok(named));
        let mut head = vec![AllocKind::Storage as u8];
        head.extend_from_slice(&1u64.to_be_bytes());
        let long = "a".repeat(NAME_LEN_MAX + 1);
        for bad in ["-a", "a-", "Notes", "a.b", "a b", "é", long.as_str()] {
            let payload = [head.as_slice(), bad.as_bytes()].concat();
            assert_eq!(
                AssetRequest::decode(ASSET_ALLOC, &payload),
                Err(WireError::Name),
                "{bad:?}"
            );
        }
        head[0] = AllocKind::Memory as u8;
        let payload = [head.as_slice(), b"notes"].concat();
        assert_eq!(
            AssetRequest::decode(ASSET_ALLOC, &payload),
            Err(WireError::NameForMemory)
        );
    }

    #[test]
    fn storage_requests_are_known_by_their_identifier() {
        let storage = AssetAddress {
            locator: address().locator,
            id: crate::assets::address::AssetId::new(
                crate::assets::address::NodeNumber::new(1).unwrap(),
                crate::assets::address::STORAGE_BLOCKS_FIRST,
                0,
            ),
        };
        let read = |address| AssetRequest::Read {
            address,
            offset: 0,
            len: 1,
        };
        assert_eq!(read(storage).asset_kind(), AllocKind::Storage);
        assert_eq!(read(address()).asset_kind(), AllocKind::Memory);
    }

    #[test]
    fn truncated_extended_and_odd_payloads_are_refused() {
        for request in [
            AssetRequest::Alloc {
                kind: AllocKind::Memory,
                size: 1,
                name: None,
            },
            AssetRequest::Read {
                address: address(),
                offset: 0,
                len: 1,
            },
            AssetRequest::Free { address: address() },
            AssetRequest::Grant {
                address: address(),
                grantee: Owner([1; 32]),
                access: Some(Access::Read),
            },
        ] {
            let (kind, payload) = request.encode();
            for cut in 0..payload.len() {
                assert!(
                    matches!(
                        AssetRequest::decode(kind, &payload[..cut]),
                        Err(WireError::Length { .. })
                    ),
                    "{kind:#x} cut at {cut}"
                );
            }
            let mut long = payload.clone();
            long.push(0);
            assert!(matches!(
                AssetRequest::decode(kind, &long),
                Err(WireError::Length { .. } | WireError::NameForMemory)
            ));
        }
        fn odd(kind: u8, payload: &[u8]) -> Result<(), WireError> {
            AssetRequest::decode(kind, payload).map(|_| ())
        }
        assert_eq!(
            odd(ASSET_ALLOC, &[3, 0, 0, 0, 0, 0, 0, 0, 1]),
            Err(WireError::AllocKind(3))
        );
        let mut grant = address().octets().to_vec();
        grant.extend_from_slice(&[0; 32]);
        grant.push(3);
        assert_eq!(odd(ASSET_GRANT, &grant), Err(WireError::Access(3)));
        let mut read = address().octets().to_vec();
        read.extend_from_slice(&0u64.to_be_bytes());
        read.extend_from_slice(&(READ_LEN_MAX + 1).to_be_bytes());
        assert_eq!(
            odd(ASSET_READ, &read),
            Err(WireError::ReadLen(READ_LEN_MAX + 1))
        );
        let mut cas = address().octets().to_vec();
        cas.extend_from_slice(&0u64.to_be_bytes());
        cas.extend_from_slice(&u32::MAX.to_be_bytes());
        cas.extend_from_slice(b"abcd");
        assert!(matches!(
            odd(ASSET_CAS, &cas),
            Err(WireError::Length { .. })
        ));
        assert_eq!(odd(ASSET_LIST, b"x"), Err(WireError::ListKind(b'x')));
        assert_eq!(odd(0x01, b""), Err(WireError::Kind(0x01)));
    }

    #[test]
    fn every_request_a_member_takes_it_can_proxy() {
        let full = vec![0; WRITE_LEN_MAX];
        let write = AssetRequest::Write {
            address: address(),
            offset: 0,
            data: &full,
        };
        let (kind, payload) = write.encode();
        assert_eq!(payload.len(), PAYLOAD_MAX);
        let envelope = encode_proxied(&Owner([1; 32]), kind, &payload);
        assert_eq!(envelope.len(), crate::protocols::stoq::REQUEST_PAYLOAD_MAX);
        let (owner, back) = decode_proxied(&envelope).unwrap();
        assert_eq!((owner, back), (Owner([1; 32]), write));
        // A read through a member is bounded; an allocation never goes.
        for (len, ok) in [
            (PROXIED_READ_LEN_MAX, true),
            (PROXIED_READ_LEN_MAX + 1, false),
        ] {
            let (kind, read) = AssetRequest::Read {
                address: address(),
                offset: 0,
                len,
            }
            .encode();
            let envelope = encode_proxied(&Owner([1; 32]), kind, &read);
            let decoded = decode_proxied(&envelope);
            assert_eq!(decoded.is_ok(), ok, "{len}: {decoded:?}");
        }
        let (kind, alloc) = AssetRequest::Alloc {
            kind: AllocKind::Memory,
            size: 1,
            name: None,
        }
        .encode();
        assert!(matches!(
            decode_proxied(&encode_proxied(&Owner([1; 32]), kind, &alloc)),
            Err(WireError::ProxiedKind(_))
        ));
        let longer = [payload.as_slice(), &[0]].concat();
        assert!(matches!(
            AssetRequest::decode(kind, &longer),
            Err(WireError::TooLong(n)) if n == PAYLOAD_MAX + 1
        ));
    }
}
