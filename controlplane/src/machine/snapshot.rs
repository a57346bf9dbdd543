//! The whole store as bytes, table by table and row by row: what a Raft
//! snapshot carries to a lagging or new node, and what two replicas that
//! applied the same commands agree on.
//!
//! `snapshot = "i2snap" ‖ format u8 ‖ tables u8 ‖ (name length u8 ‖ name
//! ‖ rows u64 ‖ (key length u32 ‖ key ‖ value length u32 ‖ value)*)*`
//! ([`FORMAT`]; a member refuses another format and says which), the tables in
//! `for_each_table!`'s order, each row as redb stores it. [`restore`]
//! takes exactly that (every table, in order, rows in key order, each key
//! and value a valid value of its table's types) and replaces the tables'
//! contents in one transaction; anything else is refused and changes
//! nothing. `cluster_meta` (the last applied entry and the membership) is
//! not in it: the snapshot's own metadata carries those.

use crate::assets;
use crate::authority::ct::log;
use crate::authority::registry;
use crate::consensus::state;
use crate::dns::store;
use redb::{
    Database, Key, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition, TableHandle, Value, WriteTransaction,
};
use std::io::{Read, Write};

/// Every table of the store's replicated state, in snapshot order.
macro_rules! for_each_table {
    ($visit:ident) => {
        $visit!(log::LEAVES);
        $visit!(log::LEAF_HASHES);
        $visit!(log::INDEX_BY_HASH);
        $visit!(log::STHS);
        $visit!(log::META);
        $visit!(registry::CERTIFICATES);
        $visit!(registry::REVOCATIONS);
        $visit!(registry::CHILDREN);
        $visit!(registry::RENEWALS);
        $visit!(registry::NAMES);
        $visit!(registry::ENROLLMENT_TOKENS);
        $visit!(registry::ENROLLMENT_PAID);
        $visit!(store::RECORDS);
        $visit!(store::META);
        $visit!(state::STAKE);
        $visit!(state::PLOTS);
        $visit!(state::BEACON);
        $visit!(assets::STORAGE);
        $visit!(assets::CHUNKS);
        $visit!(assets::QUOTAS);
        $visit!(assets::META);
    };
}

/// What a snapshot starts with.
const MAGIC: &[u8; 6] = b"i2snap";
/// The snapshot format this release writes and reads. Another release's
/// snapshot is refused with both numbers: a rolling upgrade must not need
/// a snapshot between members of different formats.
pub const FORMAT: u8 = 2;

/// One table's rows, as raw bytes.
pub type Rows = Vec<(Vec<u8>, Vec<u8>)>;

fn rows_of<K: Key + 'static, V: Value + 'static>(
    txn: &ReadTransaction,
    table: TableDefinition<K, V>,
) -> Result<Rows, redb::Error> {
    let mut rows = Vec::new();
    each_row(txn, table, |k, v| {
        rows.push((k.to_vec(), v.to_vec()));
        Ok(())
    })?;
    Ok(rows)
}

/// Call `visit` with every row of `table` as `txn` reads it, as raw
/// bytes, in key order.
fn each_row<K: Key + 'static, V: Value + 'static>(
    txn: &ReadTransaction,
    table: TableDefinition<K, V>,
    mut visit: impl FnMut(&[u8], &[u8]) -> Result<(), redb::Error>,
) -> Result<(), redb::Error> {
    let table = txn.open_table(table)?;
    for row in table.iter()? {
        let (k, v) = row?;
        visit(
            K::as_bytes(&k.value()).as_ref(),
            V::as_bytes(&v.value()).as_ref(),
        )?;
    }
    Ok(())
}

/// Every replicated table's name and rows, in snapshot order.
pub fn tables(db: &Database) -> Result<Vec<(String, Rows)>, redb::Error> {
    let txn = db.begin_read()?;
    let mut out = Vec::new();
    macro_rules! read {
        ($table:expr) => {
            out.push(($table.name().to_owned(), rows_of(&txn, $table)?));
        };
    }
    for_each_table!(read);
    Ok(out)
}

/// How many tables a snapshot holds.
fn table_count() -> u8 {
    let mut tables = 0u8;
    macro_rules! count {
        ($table:expr) => {
            let _ = $table;
            tables += 1;
        };
    }
    for_each_table!(count);
    tables
}

/// The store as snapshot bytes, in memory (tests and small stores; a
/// member writes its snapshots to a file with [`dump_to`]).
pub fn dump(db: &Database) -> Result<Vec<u8>, redb::Error> {
    let mut out = Vec::new();
    dump_to(&db.begin_read()?, &mut out)?;
    Ok(out)
}

/// The store as `txn` reads it, written to `out` as snapshot bytes row by
/// row: nothing but the row at hand is held in memory, whatever the
/// store's size. A read transaction sees one state whatever is written
/// after it began, so this may run on another thread while commands go on
/// being applied.
pub fn dump_to(txn: &ReadTransaction, mut out: impl Write) -> Result<(), redb::Error> {
    out.write_all(MAGIC)?;
    out.write_all(&[FORMAT, table_count()])?;
    macro_rules! write {
        ($table:expr) => {
            let name = $table.name();
            out.write_all(&[name.len() as u8])?;
            out.write_all(name.as_bytes())?;
            let rows = txn.open_table($table)?.len()?;
            out.write_all(&rows.to_be_bytes())?;
            each_row(txn, $table, |k, v| {
                for part in [k, v] {
                    out.write_all(&(part.len() as u32).to_be_bytes())?;
                    out.write_all(part)?;
                }
                Ok(())
            })?;
        };
    }
    for_each_table!(write);
    out.flush()?;
    Ok(())
}

/// Why snapshot bytes were refused.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("the snapshot is malformed: {0}")]
    Malformed(String),
    #[error(transparent)]
    Storage(#[from] redb::Error),
}

/// Whether `bytes` is a valid value of type `T` (redb's decoders assume
/// it and panic otherwise).
fn valid<T: Value>(bytes: &[u8]) -> bool {
    match T::fixed_width() {
        Some(width) => bytes.len() == width,
        None if T::type_name().name() == "&str" => std::str::from_utf8(bytes).is_ok(),
        None => true,
    }
}

/// The longest key or value a snapshot may carry: far above any row the
/// store writes (an asset chunk is 64 KiB, a request at most 64 KiB).
const PART_MAX: usize = 16 << 20;

/// Snapshot bytes being read: at most `left` more, so that no length a
/// snapshot claims makes a buffer larger than what is actually there.
struct Source<R> {
    bytes: R,
    left: u64,
}

impl<R: Read> Source<R> {
    /// The next `len` bytes; `None` when fewer are left. A key or value
    /// longer than any the store holds is refused before anything is
    /// allocated for it.
    fn take(&mut self, len: usize) -> Result<Option<Vec<u8>>, RestoreError> {
        if len > PART_MAX {
            return Err(RestoreError::Malformed(format!(
                "a key or value of {len} bytes (the store holds none over {PART_MAX})"
            )));
        }
        if len as u64 > self.left {
            return Ok(None);
        }
        let mut out = vec![0; len];
        self.bytes
            .read_exact(&mut out)
            .map_err(|e| RestoreError::Malformed(format!("the snapshot could not be read: {e}")))?;
        self.left -= len as u64;
        Ok(Some(out))
    }

    fn array<const N: usize>(&mut self) -> Result<Option<[u8; N]>, RestoreError> {
        Ok(self
            .take(N)?
            .map(|bytes| bytes.try_into().expect("N bytes were taken")))
    }

    fn u8(&mut self) -> Result<Option<u8>, RestoreError> {
        Ok(self.array::<1>()?.map(|[b]| b))
    }

    fn u32(&mut self) -> Result<Option<u32>, RestoreError> {
        Ok(self.array()?.map(u32::from_be_bytes))
    }

    fn u64(&mut self) -> Result<Option<u64>, RestoreError> {
        Ok(self.array()?.map(u64::from_be_bytes))
    }
}

fn restore_table<K: Key + 'static, V: Value + 'static>(
    txn: &WriteTransaction,
    table: TableDefinition<K, V>,
    r: &mut Source<impl Read>,
) -> Result<(), RestoreError> {
    let malformed = |what: String| RestoreError::Malformed(what);
    let name = table.name().to_owned();
    let len = r
        .u8()?
        .ok_or_else(|| malformed(format!("no table where {name} belongs")))?;
    let given = r.take(usize::from(len))?.unwrap_or_default();
    if given != name.as_bytes() {
        return Err(malformed(format!(
            "table {name} is missing or out of order"
        )));
    }
    let count = r
        .u64()?
        .ok_or_else(|| malformed(format!("{name}: no row count")))?;
    let mut table = txn.open_table(table).map_err(redb::Error::from)?;
    table.retain(|_, _| false).map_err(redb::Error::from)?;
    let mut previous: Option<Vec<u8>> = None;
    for _ in 0..count {
        let mut part = || -> Result<Option<Vec<u8>>, RestoreError> {
            let Some(len) = r.u32()? else {
                return Ok(None);
            };
            r.take(len as usize)
        };
        let (Some(k), Some(v)) = (part()?, part()?) else {
            return Err(malformed(format!("{name}: a row is cut short")));
        };
        if !valid::<K>(&k) || !valid::<V>(&v) {
            return Err(malformed(format!(
                "{name}: a row is not of the table's types"
            )));
        }
        if let Some(previous) = &previous
            && K::compare(previous, &k) != std::cmp::Ordering::Less
        {
            return Err(malformed(format!("{name}: rows out of key order")));
        }
        table
            .insert(K::from_bytes(&k), V::from_bytes(&v))
            .map_err(redb::Error::from)?;
        previous = Some(k);
    }
    Ok(())
}

/// Replace the replicated tables' contents with the `len` bytes `bytes`
/// gives (a [`dump_to`]), in `txn`, reading them row by row; refused (the
/// caller aborts `txn`) when they are not exactly one.
pub fn restore(txn: &WriteTransaction, bytes: impl Read, len: u64) -> Result<(), RestoreError> {
    let mut r = Source { bytes, left: len };
    if r.take(MAGIC.len())?.as_deref() != Some(&MAGIC[..]) {
        return Err(RestoreError::Malformed(
            "not an internet2 snapshot (or one from a release before snapshot formats)".into(),
        ));
    }
    match r.u8()? {
        Some(FORMAT) => {}
        Some(other) => {
            return Err(RestoreError::Malformed(format!(
                "a snapshot of format {other}; this release reads format {FORMAT} \
                 (members of one cluster must run releases with one snapshot format)"
            )));
        }
        None => return Err(RestoreError::Malformed("no format".into())),
    }
    let tables = r
        .u8()?
        .ok_or_else(|| RestoreError::Malformed("empty".into()))?;
    let expected = table_count();
    if tables != expected {
        return Err(RestoreError::Malformed(format!(
            "{tables} tables where {expected} belong"
        )));
    }
    macro_rules! write {
        ($table:expr) => {
            restore_table(txn, $table, &mut r)?;
        };
    }
    for_each_table!(write);
    if r.left != 0 {
        return Err(RestoreError::Malformed("bytes after the last table".into()));
    }
    Ok(())
}
