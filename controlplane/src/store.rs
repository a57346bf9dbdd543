//! The control plane's store (`authority.redb`) and the one write
//! transaction a group of commands shares.
//!
//! Outside a group, each command is its own durable transaction
//! ([`Store::transact`]). Inside one (`crate::machine::Machine::defer_durability`),
//! every command writes into one open transaction ([`Store::write_grouped`]):
//! the pages the commands share (the upper levels of each table's tree, the
//! log's tree heads) are copied and checksummed once per group rather than
//! once per command, and one commit ends the group. The cost of a command
//! then no longer grows with the depth of the trees its writes copy
//! (README: "Issuance cost as the store grows").
//!
//! A read sees every command applied, grouped or not: [`Store::begin_read`]
//! first commits the open transaction without waiting for the disk
//! ([`Store::settle`]); the next grouped command opens a new one. Durability
//! is the group's: only [`Store::make_durable`] fsyncs.
//!
//! A grouped command must be refused before it writes anything: the group's
//! earlier commands share its transaction, so a refusal cannot abort it
//! (redb keeps no savepoint in a transaction that has written). A write
//! that fails in a group loses the group: the transaction is dropped, and
//! every later grouped write, settle and [`Store::make_durable`] fails until
//! the process reloads the store.

use redb::{Database, Durability, ReadTransaction, ReadableDatabase, WriteTransaction};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// A handle on the store; clones share the database and the group's
/// transaction.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    group: Arc<Mutex<Group>>,
    /// Set before a commit that does not wait for the disk, cleared after
    /// one that does: while set, what a read sees may not be on disk yet.
    unsynced: Arc<AtomicBool>,
}

#[derive(Default)]
struct Group {
    /// The transaction the group's commands have written into, not yet
    /// committed.
    open: Option<WriteTransaction>,
    /// Why the group's writes were lost, when they were.
    lost: Option<String>,
}

/// What failed in a group, for its caller to wrap in its own error.
#[derive(Debug, thiserror::Error)]
pub enum GroupError<E> {
    /// The write itself failed; what `write` returned.
    #[error(transparent)]
    Write(E),
    /// The store failed opening or committing the group's transaction.
    #[error(transparent)]
    Store(#[from] redb::Error),
    /// An earlier write of the group failed.
    #[error("an earlier write of this group failed ({0}); the store must be reopened")]
    Lost(String),
}

/// Marks the group lost when dropped: armed while a grouped write runs,
/// forgotten once it returned.
struct Unfinished<'a>(&'a Store);

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        self.0
            .group()
            .lost
            .get_or_insert_with(|| "a grouped write did not finish".into());
    }
}

impl GroupError<std::convert::Infallible> {
    /// As the error of a write that returns `E`.
    pub fn widen<E>(self) -> GroupError<E> {
        match self {
            Self::Write(never) => match never {},
            Self::Store(e) => GroupError::Store(e),
            Self::Lost(why) => GroupError::Lost(why),
        }
    }

    /// As a store error, for a reader.
    pub fn into_redb(self) -> redb::Error {
        self.widen().flatten(|e| e)
    }
}

impl<E> GroupError<E> {
    /// The write's own error, or the store's as `store` wraps it.
    pub fn flatten(self, store: impl FnOnce(redb::Error) -> E) -> E {
        match self {
            Self::Write(e) => e,
            Self::Store(e) => store(e),
            Self::Lost(why) => store(redb::Error::Io(std::io::Error::other(format!(
                "an earlier write of this group failed ({why}); the store must be reopened"
            )))),
        }
    }
}

impl Store {
    pub fn new(db: Arc<Database>) -> Self {
        Self {
            db,
            group: Arc::default(),
            unsynced: Arc::default(),
        }
    }

    /// The database, for what reads it whole while no group is open
    /// (loading the state at start or after a snapshot, dumping a
    /// snapshot after [`Self::make_durable`]).
    pub fn database(&self) -> Arc<Database> {
        debug_assert!(
            self.group().open.is_none(),
            "the whole store is read while a group's writes are open"
        );
        self.db.clone()
    }

    /// The database, for reads of what is committed from another thread
    /// (the workers' storage reads): a group's open writes are not seen
    /// until it settles, and what a settle committed is durable only once
    /// [`Self::unsynced`] reads false after the read began.
    pub fn committed(&self) -> Arc<Database> {
        self.db.clone()
    }

    /// Whether a commit that did not wait for the disk may be in what a
    /// read begun before this call sees.
    pub fn unsynced(&self) -> Arc<AtomicBool> {
        self.unsynced.clone()
    }

    fn group(&self) -> std::sync::MutexGuard<'_, Group> {
        self.group.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A read transaction that sees every command applied: the group's
    /// open transaction is committed first, without an fsync.
    pub fn begin_read(&self) -> Result<ReadTransaction, redb::Error> {
        self.settle().map_err(GroupError::into_redb)?;
        Ok(self.db.begin_read()?)
    }

    /// Commit the group's open transaction, if any, without waiting for
    /// the disk: what it wrote is visible to every read, and durable with
    /// the group's [`Self::make_durable`].
    pub fn settle(&self) -> Result<(), GroupError<std::convert::Infallible>> {
        let mut group = self.group();
        if let Some(lost) = &group.lost {
            return Err(GroupError::Lost(lost.clone()));
        }
        let Some(mut txn) = group.open.take() else {
            return Ok(());
        };
        self.unsynced.store(true, Ordering::Release);
        let committed = txn
            .set_durability(Durability::None)
            .map_err(redb::Error::from)
            .and_then(|()| txn.commit().map_err(redb::Error::from));
        if let Err(e) = &committed {
            group.lost = Some(e.to_string());
        }
        Ok(committed?)
    }

    /// Run `write` in the group's transaction (opened if none is). `Err`
    /// from `write` that `is_failure` calls a failure loses the group, as
    /// does a `write` that unwinds; any other `Err` is a refusal, and
    /// `write` must not have written before it (see the module
    /// documentation). `write` reads through `txn`, not through the store:
    /// while it runs, a read of the store sees the group's transaction as
    /// it was last settled.
    pub fn write_grouped<T, E>(
        &self,
        write: impl FnOnce(&WriteTransaction) -> Result<T, E>,
        is_failure: impl FnOnce(&E) -> bool,
    ) -> Result<T, GroupError<E>> {
        // Taken out of the lock while `write` runs: a read inside it sees
        // what was committed, and cannot deadlock on the group.
        let txn = {
            let mut group = self.group();
            if let Some(lost) = &group.lost {
                return Err(GroupError::Lost(lost.clone()));
            }
            group.open.take()
        };
        let txn = match txn {
            Some(txn) => txn,
            None => self.db.begin_write().map_err(|e| {
                let e = redb::Error::from(e);
                self.group().lost = Some(e.to_string());
                e
            })?,
        };
        // A `write` that unwinds drops the transaction: the group is lost.
        let unfinished = Unfinished(self);
        let written = write(&txn);
        std::mem::forget(unfinished);
        match written {
            Ok(value) => {
                self.group().open = Some(txn);
                Ok(value)
            }
            Err(e) if is_failure(&e) => {
                // Dropped: aborted, with every write of the group.
                drop(txn);
                self.group().lost = Some("a grouped write failed".into());
                Err(GroupError::Write(e))
            }
            Err(refused) => {
                self.group().open = Some(txn);
                Err(GroupError::Write(refused))
            }
        }
    }

    /// End the group: commit its open transaction and fsync everything it
    /// and the settled transactions before it wrote. With `settled` false
    /// and nothing open, the group wrote nothing and nothing is written.
    pub fn make_durable(&self, settled: bool) -> Result<(), GroupError<std::convert::Infallible>> {
        let mut group = self.group();
        if let Some(lost) = &group.lost {
            return Err(GroupError::Lost(lost.clone()));
        }
        let open = group.open.take();
        if open.is_none() && !settled {
            return Ok(());
        }
        let committed = (|| {
            let mut txn = match open {
                Some(txn) => txn,
                None => self.db.begin_write()?,
            };
            txn.set_durability(Durability::Immediate)?;
            txn.commit()?;
            Ok::<_, redb::Error>(())
        })();
        match &committed {
            Err(e) => group.lost = Some(e.to_string()),
            Ok(()) => self.unsynced.store(false, Ordering::Release),
        }
        Ok(committed?)
    }

    /// Run `write` in a transaction of its own, committed with
    /// `durability` (`Immediate`: fsynced before this returns) when it
    /// succeeds and aborted, writing nothing, when it fails. A group's open
    /// transaction is committed first (redb has one writer at a time).
    pub fn transact<T, E>(
        &self,
        durability: Durability,
        write: impl FnOnce(&WriteTransaction) -> Result<T, E>,
    ) -> Result<T, GroupError<E>> {
        self.settle().map_err(GroupError::widen)?;
        let mut txn = self.db.begin_write().map_err(redb::Error::from)?;
        txn.set_durability(durability).map_err(redb::Error::from)?;
        let synced = matches!(durability, Durability::Immediate);
        match write(&txn) {
            Ok(value) => {
                if !synced {
                    self.unsynced.store(true, Ordering::Release);
                }
                txn.commit().map_err(redb::Error::from)?;
                if synced {
                    self.unsynced.store(false, Ordering::Release);
                }
                Ok(value)
            }
            Err(e) => {
                txn.abort().map_err(redb::Error::from)?;
                Err(GroupError::Write(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TempDir;
    use redb::{ReadableTable, TableDefinition};

    const T: TableDefinition<u64, u64> = TableDefinition::new("t");

    fn put(k: u64) -> impl FnOnce(&WriteTransaction) -> Result<(), redb::Error> {
        move |txn| Ok(txn.open_table(T)?.insert(k, k).map(drop)?)
    }

    fn keys(store: &Store) -> Result<Vec<u64>, redb::Error> {
        let txn = store.begin_read()?;
        let table = txn.open_table(T)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            out.push(row?.0.value());
        }
        Ok(out)
    }

    fn open(dir: &TempDir) -> Store {
        std::fs::create_dir_all(&dir.0).unwrap();
        let store = Store::new(Arc::new(Database::create(dir.0.join("s.redb")).unwrap()));
        store
            .transact(Durability::Immediate, |txn| txn.open_table(T).map(drop))
            .unwrap();
        store
    }

    /// A group's writes are read as they are made, a refusal keeps the
    /// group, and the group is on disk once made durable.
    #[test]
    fn a_group_is_read_as_it_goes_and_kept() {
        let dir = TempDir::new("store-group");
        let store = open(&dir);
        store.write_grouped(put(1), |_| true).unwrap();
        assert_eq!(keys(&store).unwrap(), [1], "a read settles the group");
        store.write_grouped(put(2), |_| true).unwrap();
        let refused = store.write_grouped(|_| Err::<(), _>("no"), |_| false);
        assert!(matches!(refused, Err(GroupError::Write("no"))));
        store.write_grouped(put(3), |_| true).unwrap();
        store.make_durable(true).unwrap();
        drop(store);
        assert_eq!(keys(&open(&dir)).unwrap(), [1, 2, 3]);
    }

    /// A write that fails in a group loses what the group had not yet
    /// committed, and says so until the store is opened again: no later
    /// write, read or `make_durable` passes it over.
    #[test]
    fn a_failed_write_loses_the_group_and_says_so() {
        let dir = TempDir::new("store-lost");
        let store = open(&dir);
        store.write_grouped(put(1), |_| true).unwrap();
        store.settle().unwrap();
        store.write_grouped(put(2), |_| true).unwrap();
        let failed = store.write_grouped::<(), _>(
            |txn| {
                put(3)(txn)?;
                Err(redb::Error::Io(std::io::Error::other("disk")))
            },
            |_| true,
        );
        assert!(matches!(failed, Err(GroupError::Write(_))));
        assert!(matches!(
            store.write_grouped(put(4), |_| true),
            Err(GroupError::Lost(_))
        ));
        assert!(keys(&store).is_err());
        assert!(matches!(store.make_durable(true), Err(GroupError::Lost(_))));
        drop(store);
        // What the group settled before the failure was committed; the
        // rest was not.
        assert_eq!(keys(&open(&dir)).unwrap(), [1]);
    }

    /// A grouped write that unwinds drops the group's transaction: the
    /// group is lost, not made durable without it.
    #[test]
    fn a_write_that_unwinds_loses_the_group() {
        let dir = TempDir::new("store-unwind");
        let store = open(&dir);
        store.write_grouped(put(1), |_| true).unwrap();
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            store.write_grouped::<(), redb::Error>(
                |txn| {
                    put(2)(txn)?;
                    panic!("a bug in a write")
                },
                |_| true,
            )
        }));
        assert!(unwound.is_err());
        assert!(matches!(store.make_durable(true), Err(GroupError::Lost(_))));
        drop(store);
        assert_eq!(keys(&open(&dir)).unwrap(), Vec::<u64>::new());
    }

    #[test]
    fn what_a_read_may_see_unsynced_is_flagged_until_a_durable_commit() {
        let dir = TempDir::new("store-unsynced");
        let store = open(&dir);
        let unsynced = store.unsynced();
        let flagged = || unsynced.load(Ordering::Acquire);
        assert!(!flagged());
        store.write_grouped(put(1), |_| true).unwrap();
        assert!(!flagged(), "open, not committed: no read sees it");
        store.settle().unwrap();
        assert!(flagged(), "committed without an fsync");
        store.make_durable(true).unwrap();
        assert!(!flagged());
        store.transact(Durability::None, put(2)).unwrap();
        assert!(flagged());
        store.transact(Durability::Immediate, put(3)).unwrap();
        assert!(!flagged(), "a durable commit syncs what came before");
    }
}
