//! The Raft log, durable in a redb file of its own (`raft-log.redb` beside
//! the store): `raft_log` (index → entry, `super::codec`) and `raft_meta`
//! (`vote`, `committed`, `purged`). Every append is one transaction,
//! fsynced before openraft is told it is flushed; so are the vote, a
//! truncation and a purge. The committed index rides on the next fsync.

use super::TypeConfig;
use super::codec::{
    decode_entry, decode_optional_log_id, decode_vote, encode_entry, encode_optional_log_id,
    encode_vote,
};
use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{Entry, LogId, StorageError, StorageIOError, Vote};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "purged";

type Error = StorageError<u64>;

/// The log store; clones share the file (openraft reads through one).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

fn read_error(e: impl std::error::Error + 'static) -> Error {
    StorageIOError::read_logs(&e).into()
}

fn write_error(e: impl std::error::Error + 'static) -> Error {
    StorageIOError::write_logs(&e).into()
}

fn corrupt(what: &str) -> Error {
    let e = std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("the Raft log's {what} cannot be decoded; restore the data directory"),
    );
    read_error(e)
}

impl LogStore {
    /// Open or create the log at `path`.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let db = Database::create(path).map_err(write_error)?;
        let txn = db.begin_write().map_err(write_error)?;
        txn.open_table(LOG).map_err(write_error)?;
        txn.open_table(META).map_err(write_error)?;
        txn.commit().map_err(write_error)?;
        Ok(Self { db: Arc::new(db) })
    }

    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        let txn = self.db.begin_read().map_err(read_error)?;
        let table = txn.open_table(META).map_err(read_error)?;
        let value = table.get(key).map_err(read_error)?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    /// Write in one transaction, fsynced before this returns.
    fn write(
        &self,
        write: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), Error> {
        self.write_with(Durability::Immediate, write)
    }

    /// Write in one transaction with `durability`.
    fn write_with(
        &self,
        durability: Durability,
        write: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), Error> {
        let mut txn = self.db.begin_write().map_err(write_error)?;
        txn.set_durability(durability).map_err(write_error)?;
        write(&txn).map_err(write_error)?;
        txn.commit().map_err(write_error)
    }

    fn set_meta(&self, key: &str, value: &[u8], durability: Durability) -> Result<(), Error> {
        self.write_with(durability, |txn| {
            txn.open_table(META)?.insert(key, value)?;
            Ok(())
        })
    }

    fn optional_log_id(&self, key: &str) -> Result<Option<LogId<u64>>, Error> {
        match self.meta(key)? {
            None => Ok(None),
            Some(bytes) => decode_optional_log_id(&bytes).ok_or_else(|| corrupt(key)),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, Error> {
        let txn = self.db.begin_read().map_err(read_error)?;
        let table = txn.open_table(LOG).map_err(read_error)?;
        let mut out = Vec::new();
        for row in table.range(range).map_err(read_error)? {
            let (index, bytes) = row.map_err(read_error)?;
            let entry = decode_entry(bytes.value()).ok_or_else(|| corrupt("entry"))?;
            if entry.log_id.index != index.value() {
                return Err(corrupt("entry index"));
            }
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, Error> {
        let last_purged_log_id = self.optional_log_id(PURGED)?;
        let txn = self.db.begin_read().map_err(read_error)?;
        let table = txn.open_table(LOG).map_err(read_error)?;
        let last = match table.last().map_err(read_error)? {
            Some((_, bytes)) => Some(
                decode_entry(bytes.value())
                    .ok_or_else(|| corrupt("entry"))?
                    .log_id,
            ),
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), Error> {
        self.set_meta(VOTE, &encode_vote(vote), Durability::Immediate)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, Error> {
        match self.meta(VOTE)? {
            None => Ok(None),
            Some(bytes) => decode_vote(&bytes).map(Some).ok_or_else(|| corrupt(VOTE)),
        }
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> Result<(), Error> {
        let mut bytes = Vec::new();
        encode_optional_log_id(committed.as_ref(), &mut bytes);
        // Not fsynced of its own: the next append's makes it durable, and a
        // committed index lost in a crash only means the node learns it
        // again from the leader before applying further.
        self.set_meta(COMMITTED, &bytes, Durability::None)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, Error> {
        self.optional_log_id(COMMITTED)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), Error>
    where
        I: IntoIterator<Item = Entry<TypeConfig>>,
    {
        let mut rows = Vec::new();
        for entry in entries {
            let bytes = encode_entry(&entry).map_err(write_error)?;
            rows.push((entry.log_id.index, bytes));
        }
        let written = self.write(|txn| {
            let mut table = txn.open_table(LOG)?;
            for (index, bytes) in &rows {
                table.insert(index, bytes.as_slice())?;
            }
            Ok(())
        });
        match &written {
            Ok(()) => callback.log_io_completed(Ok(())),
            Err(e) => callback.log_io_completed(Err(std::io::Error::other(e.to_string()))),
        }
        written
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), Error> {
        self.write(|txn| {
            let mut table = txn.open_table(LOG)?;
            table.retain_in(log_id.index.., |_, _| false)?;
            Ok(())
        })
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), Error> {
        let mut purged = Vec::new();
        encode_optional_log_id(Some(&log_id), &mut purged);
        self.write(|txn| {
            let mut table = txn.open_table(LOG)?;
            table.retain_in(..=log_id.index, |_, _| false)?;
            txn.open_table(META)?.insert(PURGED, purged.as_slice())?;
            Ok(())
        })
    }
}
