//! The DNS zone the control plane holds: an authoritative, IPv6-only zone
//! of AAAA records and TLSA `3 1 1` pins (DANE-EE, SubjectPublicKeyInfo,
//! SHA-256), durable in the authority's redb database.
//!
//! What it owns: the records per name ([`RecordSet`], with the key that
//! last set the name), the zone's change counter (from which the SOA serial
//! comes), and their storage ([`store`]). What it must not do: answer DNS
//! messages (the dataplane's workers do that from a [`ZoneSnapshot`]) or
//! decide who may change what (the authority service does, from the
//! caller's certificate).
//!
//! Data enters as a [`ZoneChange`] planned against the current zone
//! ([`Zone::plan`]), which checks every bound. The control plane's state
//! machine (`crate::machine`) applies it, on its own or with the CA's
//! issuance or revocation that brought it: [`ZoneChange::write`] in the
//! machine's transaction, then [`Zone::apply`]. Data leaves as an immutable [`ZoneSnapshot`] that the
//! control-plane thread publishes to the workers whenever
//! [`Zone::generation`] changed.

pub mod forward;
mod name;
pub mod store;
mod zone;

pub use name::{NameError, check_apex, check_relative, qualify};
pub use zone::{Published, RecordError, RecordSet, Tlsa, Zone, ZoneChange};

use std::net::Ipv6Addr;

/// The most names the zone holds (records of the apex not counted).
pub const MAX_NAMES: usize = 65536;
/// The most AAAA addresses one name has.
pub const MAX_ADDRESSES_PER_NAME: usize = 16;
/// The most TLSA pins one name has (over all its ports).
pub const MAX_PINS_PER_NAME: usize = 16;
/// The longest name in text form, without its trailing dot (RFC 1035 §2.3.4
/// allows 255 octets on the wire, which is 253 characters of text).
pub const MAX_NAME_LEN: usize = 253;
/// The longest label (RFC 1035 §2.3.4).
pub const MAX_LABEL_LEN: usize = 63;

/// The zone's configuration, fixed at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneConfig {
    /// The zone's apex, absolute and lowercase, e.g. `internet2.test.`.
    pub apex: String,
    /// The server's own name relative to the apex, e.g. `node1`.
    pub server_name: String,
    /// The server's addresses (its AAAA records).
    pub server_addresses: Vec<Ipv6Addr>,
    /// The UDP port of the server's TLSA record (`_PORT._udp.NAME`).
    pub server_port: u16,
}

/// The records of one name as the workers answer them (the dataplane's
/// `PublishedName`): the name absolute, lowercase, with its trailing dot;
/// its AAAA addresses and its TLSA `3 1 1` pins by UDP port, each sorted,
/// no duplicates.
pub use dataplane::protocols::doq::PublishedName as NameRecords;

/// The whole zone at one moment, immutable: what workers answer from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneSnapshot {
    /// Absolute, lowercase, with its trailing dot.
    pub apex: String,
    /// The SOA serial; it changes (RFC 1982 arithmetic) with every change.
    pub serial: u32,
    /// Changes with every change of the zone; equal generations mean equal
    /// snapshots (it is the durable change counter).
    pub generation: u64,
    /// In name order.
    pub names: Vec<NameRecords>,
}

/// Why the zone could not be opened or changed.
#[derive(Debug, thiserror::Error)]
pub enum ZoneError {
    #[error("zone storage failed: {0}")]
    Storage(#[from] redb::Error),
    #[error("the zone store is corrupt: {0}; restore the data directory from a backup")]
    Corrupt(String),
    #[error("the zone configuration: {0}")]
    Config(String),
    #[error("the zone holds {MAX_NAMES} names, its limit; remove some first")]
    Full,
    #[error(
        "{name} is too long to pin: its pin's name `_{port}._udp.{name}` would exceed {MAX_NAME_LEN} characters"
    )]
    PinNameTooLong { name: String, port: u16 },
    #[error("a zone change is refused: {0}")]
    NotAName(String),
}

redb_errors_into_storage!(ZoneError);

#[cfg(test)]
mod tests;
