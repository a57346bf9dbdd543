//! The zone's tables in the authority's redb database (the file that holds
//! the CT log and the CA registry, so a pin change can commit in the same
//! transaction as the certificate that caused it):
//!
//! - `dns_records`: absolute name (lowercase, trailing dot) → its records
//!   ([`encode`]);
//! - `dns_meta`: `"changes"` → how many changes the zone has seen (u64);
//!   the SOA serial is its low 32 bits.
//!
//! Each change writes its names' rows and the counter in one transaction.
//! The record encoding: version (1), owner flag (0, or 1 followed by the
//! 32-byte SPKI SHA-256), AAAA count (u8) and 16 bytes per address, TLSA
//! count (u8) and per pin the port (u16, big-endian) and the 32-byte SPKI
//! SHA-256. [`decode`] accepts only what [`encode`] writes for a valid
//! [`RecordSet`].

use super::name::{NameError, qualify};
use super::zone::{RecordSet, Tlsa};
use super::{MAX_NAMES, ZoneError};
use redb::WriteTransaction;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::BTreeMap;
use std::net::Ipv6Addr;

pub(crate) const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("dns_records");
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("dns_meta");
const META_CHANGES: &str = "changes";
const FORMAT_VERSION: u8 = 1;

/// Create the tables in `txn` if missing.
pub(crate) fn init_in(txn: &WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(RECORDS)?;
    txn.open_table(META)?;
    Ok(())
}

/// The records of the zone `apex` and the change counter.
pub(super) fn load(
    db: &Database,
    apex: &str,
) -> Result<(BTreeMap<String, RecordSet>, u64), ZoneError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(RECORDS)?;
    let changes = txn
        .open_table(META)?
        .get(META_CHANGES)?
        .map_or(0, |v| v.value());
    let mut records = BTreeMap::new();
    let mut elsewhere = 0usize;
    for row in table.iter()? {
        let (name, value) = row?;
        let name = name.value();
        match qualify(apex, name) {
            Ok(q) if q == name => {}
            Err(NameError::OutsideZone { .. } | NameError::Apex { .. }) => {
                elsewhere += 1;
                continue;
            }
            _ => return Err(ZoneError::Corrupt(format!("{name:?} is not a valid name"))),
        }
        let set = decode(value.value()).ok_or_else(|| {
            ZoneError::Corrupt(format!("the records of {name} cannot be decoded"))
        })?;
        records.insert(name.to_owned(), set);
    }
    if records.len() > MAX_NAMES {
        return Err(ZoneError::Corrupt(format!(
            "{} names, more than the {MAX_NAMES} allowed",
            records.len()
        )));
    }
    if elsewhere > 0 {
        tracing::warn!(
            names = elsewhere,
            apex,
            "the zone store holds names outside the configured apex; they are not served"
        );
    }
    Ok((records, changes))
}

/// Write the rows of `edits` and the counter `changes` in `txn`.
pub(super) fn write(
    txn: &WriteTransaction,
    edits: &[(String, Option<RecordSet>)],
    changes: u64,
) -> Result<(), redb::Error> {
    let mut table = txn.open_table(RECORDS)?;
    for (name, records) in edits {
        match records {
            Some(records) => table.insert(name.as_str(), encode(records).as_slice())?,
            None => table.remove(name.as_str())?,
        };
    }
    txn.open_table(META)?.insert(META_CHANGES, changes)?;
    Ok(())
}

/// See the module documentation.
pub fn encode(records: &RecordSet) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(2 + 33 + 1 + records.aaaa().len() * 16 + records.tlsa().len() * 34);
    out.push(FORMAT_VERSION);
    match records.owner() {
        Some(owner) => {
            out.push(1);
            out.extend_from_slice(&owner);
        }
        None => out.push(0),
    }
    // RecordSet bounds both counts far below 256.
    out.push(records.aaaa().len() as u8);
    for address in records.aaaa() {
        out.extend_from_slice(&address.octets());
    }
    out.push(records.tlsa().len() as u8);
    for tlsa in records.tlsa() {
        out.extend_from_slice(&tlsa.port.to_be_bytes());
        out.extend_from_slice(&tlsa.spki_sha256);
    }
    out
}

/// See the module documentation; `None` for anything else.
pub fn decode(bytes: &[u8]) -> Option<RecordSet> {
    let mut rest = bytes;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, tail) = rest.split_at_checked(n)?;
        rest = tail;
        Some(head)
    };
    if take(1)? != [FORMAT_VERSION] {
        return None;
    }
    let owner = match take(1)?[0] {
        0 => None,
        1 => Some(<[u8; 32]>::try_from(take(32)?).ok()?),
        _ => return None,
    };
    let count = usize::from(take(1)?[0]);
    let mut aaaa = Vec::with_capacity(count.min(16));
    for _ in 0..count {
        aaaa.push(Ipv6Addr::from(<[u8; 16]>::try_from(take(16)?).ok()?));
    }
    let count = usize::from(take(1)?[0]);
    let mut tlsa = Vec::with_capacity(count.min(16));
    for _ in 0..count {
        let port = u16::from_be_bytes(take(2)?.try_into().ok()?);
        let spki_sha256 = take(32)?.try_into().ok()?;
        tlsa.push(Tlsa { port, spki_sha256 });
    }
    let set = RecordSet::new(aaaa, tlsa, owner).ok()?;
    // Only the canonical (sorted, deduplicated) form is ever written, and
    // this comparison also refuses trailing bytes.
    (encode(&set) == bytes).then_some(set)
}
