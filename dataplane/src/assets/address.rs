//! Asset addresses: identifier-locator addressing (ILA, RFC 6740's idea in
//! IPv6 form). An address is a node's /64 locator followed by the asset's
//! 64-bit identifier. The identifier is the asset's for life and unique in
//! the cluster; the locator says which node holds it now, so moving an asset
//! changes only the upper half.
//!
//! Identifier layout (most significant first):
//!
//! | bits | field | meaning |
//! |---|---|---|
//! | 12 | node | the node that allocated it (at most [`NODES_MAX`]) |
//! | 36 | block | a block of [`BLOCK_LEN`] identifiers, reserved durably by the node |
//! | 16 | offset | the identifier's place in its block |
//!
//! Memory identifiers take the lower half of the blocks: a node never hands
//! out one below its durable high-water mark of blocks, so identifiers are
//! not reused across restarts, and two nodes never share one because the
//! node number is part of it. Storage identifiers take the upper half
//! ([`STORAGE_BLOCKS_FIRST`]), numbered by one counter in the control
//! plane's store, so the two kinds never meet and either is known by its
//! identifier alone.

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

/// Bits of the node number in an identifier.
pub const NODE_BITS: u32 = 12;
/// Bits of the block number in an identifier.
pub const BLOCK_BITS: u32 = 36;
/// Bits of the offset within a block.
pub const OFFSET_BITS: u32 = 16;
const _: () = assert!(NODE_BITS + BLOCK_BITS + OFFSET_BITS == 64);

/// Nodes a cluster may number.
pub const NODES_MAX: u16 = 1 << NODE_BITS;
/// Identifiers per block.
pub const BLOCK_LEN: u64 = 1 << OFFSET_BITS;
/// Blocks there are in an identifier.
pub const BLOCKS_MAX: u64 = 1 << BLOCK_BITS;
/// The first block of storage identifiers; memory blocks lie below it, so
/// this is also the number of blocks a node may reserve for memory.
pub const STORAGE_BLOCKS_FIRST: u64 = BLOCKS_MAX / 2;

/// The upper 64 bits of an asset address: the /64 of the node holding it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Locator(pub u64);

impl Locator {
    /// The locator of a /64 prefix given as an address (the lower half is
    /// ignored).
    pub fn of_prefix(prefix: Ipv6Addr) -> Self {
        Self((u128::from(prefix) >> 64) as u64)
    }

    /// A node's default locator: the ULA /48 `prefix48` (its lower 80 bits
    /// are ignored) with the node number as the 16-bit subnet.
    pub fn in_ula(prefix48: Ipv6Addr, node: NodeNumber) -> Self {
        let high48 = (u128::from(prefix48) >> 80) as u64;
        Self((high48 << 16) | u64::from(node.0))
    }
}

impl fmt::Debug for Locator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Locator({self})")
    }
}

/// The /64 prefix, e.g. `fd71:7e57:0:1::/64`.
impl fmt::Display for Locator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix = Ipv6Addr::from(u128::from(self.0) << 64);
        write!(f, "{prefix}/64")
    }
}

/// A node's number within its cluster (0 for a single node).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeNumber(u16);

impl NodeNumber {
    pub fn new(n: u16) -> Result<Self, AddressError> {
        if n < NODES_MAX {
            Ok(Self(n))
        } else {
            Err(AddressError::NodeNumber(n))
        }
    }

    pub fn get(self) -> u16 {
        self.0
    }
}

/// An asset's identifier: the lower 64 bits of its address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AssetId(pub u64);

impl AssetId {
    pub fn new(node: NodeNumber, block: u64, offset: u16) -> Self {
        debug_assert!(block < BLOCKS_MAX);
        Self(
            (u64::from(node.0) << (BLOCK_BITS + OFFSET_BITS))
                | (block << OFFSET_BITS)
                | u64::from(offset),
        )
    }

    /// The node that allocated it.
    pub fn node(self) -> u16 {
        (self.0 >> (BLOCK_BITS + OFFSET_BITS)) as u16
    }

    /// The block it was allocated from.
    pub fn block(self) -> u64 {
        (self.0 >> OFFSET_BITS) & (BLOCKS_MAX - 1)
    }

    /// Whether it names a storage asset (held in the control plane's
    /// store) rather than a memory one.
    pub fn is_storage(self) -> bool {
        self.block() >= STORAGE_BLOCKS_FIRST
    }
}

impl fmt::Debug for AssetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AssetId({:016x})", self.0)
    }
}

/// Where an asset is: locator ‖ identifier, written as an IPv6 address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AssetAddress {
    pub locator: Locator,
    pub id: AssetId,
}

impl AssetAddress {
    /// The 16 bytes a guest or a request carries (network byte order).
    pub fn octets(self) -> [u8; 16] {
        Ipv6Addr::from(self).octets()
    }

    pub fn from_octets(octets: [u8; 16]) -> Self {
        Self::from(Ipv6Addr::from(octets))
    }
}

impl From<Ipv6Addr> for AssetAddress {
    fn from(address: Ipv6Addr) -> Self {
        let bits = u128::from(address);
        Self {
            locator: Locator((bits >> 64) as u64),
            id: AssetId(bits as u64),
        }
    }
}

impl From<AssetAddress> for Ipv6Addr {
    fn from(address: AssetAddress) -> Self {
        Ipv6Addr::from((u128::from(address.locator.0) << 64) | u128::from(address.id.0))
    }
}

impl fmt::Display for AssetAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Ipv6Addr::from(*self).fmt(f)
    }
}

impl fmt::Debug for AssetAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AssetAddress({self})")
    }
}

impl FromStr for AssetAddress {
    type Err = AddressError;

    /// An IPv6 address, with or without brackets (`[fd71::1]` as users
    /// paste it from a URL).
    fn from_str(s: &str) -> Result<Self, AddressError> {
        let bare = s
            .strip_prefix('[')
            .and_then(|rest| rest.strip_suffix(']'))
            .unwrap_or(s);
        bare.parse::<Ipv6Addr>()
            .map(Self::from)
            .map_err(|_| AddressError::Syntax(s.chars().take(64).collect()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("{0:?} is not an asset address (an IPv6 address, e.g. fd71:7e57:0:1::2a)")]
    Syntax(String),
    #[error("node number {0} is out of range (0 to {max})", max = NODES_MAX - 1)]
    NodeNumber(u16),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_its_locator_then_its_identifier() {
        let node = NodeNumber::new(5).unwrap();
        let locator = Locator::in_ula("fd71:7e57:0::".parse().unwrap(), node);
        let id = AssetId::new(node, 0x1_2345_6789, 0xbeef);
        assert_eq!((id.node(), id.block()), (5, 0x1_2345_6789));
        let address = AssetAddress { locator, id };
        let text = address.to_string();
        assert!(text.starts_with("fd71:7e57:0:5:"), "{text}");
        assert_eq!(text.parse::<AssetAddress>().unwrap(), address);
        assert_eq!(
            format!("[{text}]").parse::<AssetAddress>().unwrap(),
            address
        );
        assert_eq!(AssetAddress::from_octets(address.octets()), address);
        assert_eq!(
            Locator::of_prefix("fd71:7e57:0:5:ffff::1".parse().unwrap()),
            locator
        );
    }

    #[test]
    fn bad_addresses_and_node_numbers_are_refused() {
        for bad in [
            "",
            "10.0.0.1",
            "fd71::1::2",
            "[fd71::1",
            "node1.internet2.test",
        ] {
            assert!(
                matches!(bad.parse::<AssetAddress>(), Err(AddressError::Syntax(_))),
                "{bad}"
            );
        }
        assert_eq!(
            NodeNumber::new(NODES_MAX),
            Err(AddressError::NodeNumber(NODES_MAX))
        );
        assert!(NodeNumber::new(NODES_MAX - 1).is_ok());
    }

    #[test]
    fn identifiers_of_different_nodes_or_blocks_never_meet() {
        let a = AssetId::new(NodeNumber::new(1).unwrap(), 7, u16::MAX);
        let b = AssetId::new(NodeNumber::new(2).unwrap(), 7, u16::MAX);
        let c = AssetId::new(NodeNumber::new(1).unwrap(), 8, 0);
        assert_ne!(a, b);
        assert_eq!(a.0 + 1, c.0, "blocks of one node are consecutive");
        let top = AssetId::new(NodeNumber::new(NODES_MAX - 1).unwrap(), BLOCKS_MAX - 1, 0);
        assert_eq!(top.node(), NODES_MAX - 1);
        assert_eq!(top.block(), BLOCKS_MAX - 1);
    }
}
