//! The Raft state machine: committed entries applied to the
//! [`Machine`](crate::machine::Machine) in log order, each with its log id
//! (and a membership entry's membership) recorded in the store's
//! `cluster_meta` in the same transaction. Applying does not wait for the
//! disk: the Raft log already holds every entry durably, and a crash
//! before the store's next fsync re-applies them from the log (the store
//! records the last entry it holds). The store is fsynced before a
//! snapshot is built, since the log before a snapshot may then be purged
//! ([`SNAPSHOT_EVERY`]), or at the latest every [`DURABLE_EVERY`]
//! commands. Snapshots are the store's
//! tables ([`snapshot`]), in files beside it ([`super::snapshot_file`]).

use super::codec::{
    decode_optional_log_id, decode_stored_membership, encode_optional_log_id,
    encode_stored_membership,
};
use super::snapshot_file::{SnapshotFile, SnapshotPaths};
use super::{Member, Outcome, TypeConfig};
use crate::authority::logged::AuthorityError;
use crate::machine::{CLUSTER_META, Machine, snapshot};
use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    Entry, EntryPayload, LogId, RaftSnapshotBuilder, StorageError, StorageIOError, StoredMembership,
};
use std::cell::RefCell;
use std::rc::Rc;

const APPLIED: &str = "applied";

/// A member snapshots its store after this many entries at first, then
/// whenever the log since the last snapshot is as long as the log before
/// it (`runtime::cluster`); the snapshot makes the store durable first.
pub const SNAPSHOT_EVERY: u64 = 10_000;

/// Commands applied without an fsync of the store at most, should no
/// snapshot come first: what a crash makes a member re-apply from its log
/// at start. An fsync every batch, or every few hundred commands, stalled
/// the leader's thread on the pages the commands had rewritten and
/// pushed the issuance p99 over 20 ms (`cargo xtask bench-cluster`).
pub const DURABLE_EVERY: usize = 2 * SNAPSHOT_EVERY as usize;
const MEMBERSHIP: &str = "membership";

/// How much of a snapshot a build writes to its file at a time.
const DUMP_BUFFER: usize = 256 * 1024;

type Error = StorageError<u64>;

/// The last snapshot built or installed: its metadata (its bytes are the
/// file at [`SnapshotPaths::current`]).
type Current = Rc<RefCell<Option<SnapshotMeta<u64, Member>>>>;

/// What owns a node's [`Machine`]: the machine itself, or the authority
/// service that answers requests from it.
pub trait HoldsMachine {
    fn machine(&self) -> &Machine;
    fn machine_mut(&mut self) -> &mut Machine;
}

impl HoldsMachine for Machine {
    fn machine(&self) -> &Machine {
        self
    }

    fn machine_mut(&mut self) -> &mut Machine {
        self
    }
}

impl HoldsMachine for crate::authority::service::AuthorityService {
    fn machine(&self) -> &Machine {
        self.machine()
    }

    fn machine_mut(&mut self) -> &mut Machine {
        self.machine_mut()
    }
}

/// A node's machine, shared with whatever else runs on its thread.
pub type Host = Rc<RefCell<dyn HoldsMachine>>;

/// The state machine of one node, sharing the [`Machine`] with the node's
/// service (the same thread; no borrow is held across an await).
pub struct StateMachine {
    host: Host,
    current: Current,
    paths: SnapshotPaths,
    recent: Recent,
}

/// How many applied entries' outcomes a node keeps for
/// [`Recent::take`].
const RECENT_OUTCOMES: usize = 4096;

/// The outcomes of the last entries this node applied, by log index: a
/// member that had the leader commit its proposal answers from what
/// applying it did here.
#[derive(Clone, Default)]
pub struct Recent(Rc<RefCell<std::collections::VecDeque<(u64, Outcome)>>>);

impl Recent {
    fn push(&self, index: u64, outcome: Outcome) {
        let mut recent = self.0.borrow_mut();
        if recent.len() == RECENT_OUTCOMES {
            recent.pop_front();
        }
        recent.push_back((index, outcome));
    }

    /// The outcome of entry `index`, once, if it is among the recent ones.
    pub fn take(&self, index: u64) -> Option<Outcome> {
        let mut recent = self.0.borrow_mut();
        let at = recent.iter().position(|(i, _)| *i == index)?;
        recent.remove(at).map(|(_, outcome)| outcome)
    }
}

impl StateMachine {
    /// The state machine of `host`'s machine; snapshot files an earlier
    /// run left beside its store are removed.
    pub fn new(host: Host) -> Self {
        let paths = SnapshotPaths::beside(host.borrow().machine().authority().store_path());
        paths.remove_all();
        Self {
            host,
            current: Rc::default(),
            paths,
            recent: Recent::default(),
        }
    }

    /// The outcomes this state machine keeps of what it applies.
    pub fn recent(&self) -> Recent {
        self.recent.clone()
    }
}

fn read_error(e: impl std::error::Error + 'static) -> Error {
    StorageIOError::read_state_machine(&e).into()
}

fn write_error(e: impl std::error::Error + 'static) -> Error {
    StorageIOError::write_state_machine(&e).into()
}

fn corrupt(what: &str) -> Error {
    read_error(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("the store's {what} cannot be decoded; restore the data directory"),
    ))
}

/// The last entry a store applied, and the membership it holds.
type AppliedState = (Option<LogId<u64>>, StoredMembership<u64, Member>);

/// The last applied entry and the membership the store records.
fn applied_state(machine: &Machine) -> Result<AppliedState, Error> {
    let applied = match machine.cluster_meta(APPLIED).map_err(read_error)? {
        None => None,
        Some(bytes) => decode_optional_log_id(&bytes).ok_or_else(|| corrupt(APPLIED))?,
    };
    let membership = match machine.cluster_meta(MEMBERSHIP).map_err(read_error)? {
        None => StoredMembership::default(),
        Some(bytes) => decode_stored_membership(&bytes).ok_or_else(|| corrupt(MEMBERSHIP))?,
    };
    Ok((applied, membership))
}

/// Write `applied` (and `membership`) into `cluster_meta` in `txn`.
fn record(
    txn: &redb::WriteTransaction,
    applied: Option<&LogId<u64>>,
    membership: Option<&[u8]>,
) -> Result<(), redb::Error> {
    let mut bytes = Vec::new();
    encode_optional_log_id(applied, &mut bytes);
    let mut table = txn.open_table(CLUSTER_META)?;
    table.insert(APPLIED, bytes.as_slice())?;
    if let Some(membership) = membership {
        table.insert(MEMBERSHIP, membership)?;
    }
    Ok(())
}

/// Apply `entries` in order, each with its log id recorded with it.
fn apply_entries(
    machine: &mut Machine,
    entries: impl IntoIterator<Item = Entry<TypeConfig>>,
) -> Result<Vec<(u64, Outcome)>, Error> {
    let mut outcomes = Vec::new();
    for entry in entries {
        let log_id = entry.log_id;
        let (command, membership) = match entry.payload {
            EntryPayload::Blank => (None, None),
            EntryPayload::Normal(command) => (Some(command), None),
            EntryPayload::Membership(membership) => (
                None,
                Some(encode_stored_membership(&StoredMembership::new(
                    Some(log_id),
                    membership,
                ))),
            ),
        };
        let applied = machine
            .apply_with(command, |txn| {
                record(txn, Some(&log_id), membership.as_deref())
            })
            .map_err(write_error)?;
        outcomes.push((log_id.index, match applied {
            None => Outcome::Nothing,
            Some(Ok(applied)) => Outcome::Applied(applied),
            Some(Err(refused)) => {
                tracing::info!(index = log_id.index, reason = %refused, "a committed command was refused on apply");
                Outcome::Refused(Rc::new(refused))
            }
        }));
    }
    Ok(outcomes)
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<AppliedState, Error> {
        applied_state(self.host.borrow().machine())
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>, Error>
    where
        I: IntoIterator<Item = Entry<TypeConfig>>,
    {
        let mut host = self.host.borrow_mut();
        let machine = host.machine_mut();
        // The group stays open across batches: the Raft log holds every
        // entry durably already, so the store is fsynced before a snapshot
        // is taken (after which the log before it may be purged), or after
        // DURABLE_EVERY commands. A batch's entries share one transaction,
        // committed at its end.
        machine.defer_durability();
        let applied = apply_entries(machine, entries);
        let durable = if machine.deferred() >= DURABLE_EVERY {
            machine.make_durable().map(drop).map_err(write_error)
        } else {
            machine.settle().map_err(write_error)
        };
        let outcomes = applied?;
        durable?;
        for (index, outcome) in &outcomes {
            self.recent.push(*index, outcome.clone());
        }
        Ok(outcomes.into_iter().map(|(_, outcome)| outcome).collect())
    }

    /// Called between applies: the store is made durable (the log before
    /// the snapshot may be purged once it is built) and a read transaction
    /// taken of it as it is, with the entry it holds last. The builder
    /// dumps that transaction on a thread of its own while entries go on
    /// being applied: a snapshot copies the whole store, and the
    /// control-plane thread would otherwise stall for as long as that
    /// takes, longer as the store grows.
    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        let mut host = self.host.borrow_mut();
        let view = (|| {
            host.machine_mut().make_durable().map_err(write_error)?;
            let machine = host.machine();
            let (last_log_id, last_membership) = applied_state(machine)?;
            let txn = redb::ReadableDatabase::begin_read(&*machine.authority().database())
                .map_err(read_error)?;
            Ok((last_log_id, last_membership, txn))
        })();
        SnapshotBuilder {
            view: Some(view),
            current: self.current.clone(),
            paths: self.paths.clone(),
        }
    }

    /// A fresh file for the chunks (openraft writes each at its offset).
    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotFile>, Error> {
        Ok(Box::new(
            SnapshotFile::create(&self.paths.receiving).map_err(write_error)?,
        ))
    }

    /// Install the store from the received file, read row by row; the file
    /// then becomes the snapshot this member hands out.
    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, Member>,
        mut snapshot: Box<SnapshotFile>,
    ) -> Result<(), Error> {
        let membership = encode_stored_membership(&meta.last_membership);
        self.host
            .borrow_mut()
            .machine_mut()
            .install(snapshot.file(), |txn| {
                record(txn, meta.last_log_id.as_ref(), Some(&membership))
            })
            .map_err(|e: AuthorityError| {
                StorageError::from(StorageIOError::write_snapshot(Some(meta.signature()), &e))
            })?;
        tracing::info!(snapshot = %meta.snapshot_id, "snapshot installed");
        // The file received becomes the one handed out (it is the one at
        // the receiving path unless a test handed over another member's
        // build, which is copied). Failing that, the member would hold a
        // snapshot it cannot hand out, with its log purged behind it: an
        // error of the data directory, which stops its Raft (logged).
        let receiving = &self.paths.receiving;
        let kept = if snapshot.path() == receiving && same_file(snapshot.file(), receiving) {
            std::fs::rename(receiving, &self.paths.current)
        } else {
            SnapshotFile::create(&self.paths.current).and_then(|mut copy| {
                let file = snapshot.file();
                std::io::Seek::rewind(file)?;
                std::io::copy(file, copy.file()).map(drop)
            })
        };
        kept.map_err(|e| {
            StorageError::from(StorageIOError::write_snapshot(Some(meta.signature()), &e))
        })?;
        *self.current.borrow_mut() = Some(meta.clone());
        Ok(())
    }

    /// The snapshot held, on a file handle of its own: each stream reads
    /// it at its own offset.
    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, Error> {
        let Some(meta) = self.current.borrow().clone() else {
            return Ok(None);
        };
        let file = SnapshotFile::open(&self.paths.current).map_err(read_error)?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(file),
        }))
    }
}

/// Whether `file` is the file at `path` (not one that replaced it).
fn same_file(file: &std::fs::File, path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// The applied state and a read transaction of the store at one point
/// between applies.
type View = Result<
    (
        Option<LogId<u64>>,
        StoredMembership<u64, Member>,
        redb::ReadTransaction,
    ),
    Error,
>;

/// Builds a snapshot of the store as it was when the builder was made.
pub struct SnapshotBuilder {
    view: Option<View>,
    current: Current,
    paths: SnapshotPaths,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, Error> {
        let (last_log_id, last_membership, txn) = self
            .view
            .take()
            .unwrap_or_else(|| Err(read_error(std::io::Error::other("the snapshot was built"))))?;
        let (done, dumped) = tokio::sync::oneshot::channel();
        let building = self.paths.building.clone();
        std::thread::Builder::new()
            .name("snapshot".into())
            .spawn(move || {
                let dumped = (|| {
                    let mut file = SnapshotFile::create(&building)?;
                    let out = std::io::BufWriter::with_capacity(DUMP_BUFFER, file.file());
                    snapshot::dump_to(&txn, out)?;
                    Ok::<_, redb::Error>(file)
                })();
                if dumped.is_err() {
                    let _ = std::fs::remove_file(&building);
                }
                let _ = done.send(dumped);
            })
            .map_err(read_error)?;
        let file = dumped
            .await
            .map_err(|_| read_error(std::io::Error::other("the snapshot thread stopped")))?
            .map_err(read_error)?;
        let snapshot_id = match &last_log_id {
            Some(id) => format!(
                "{}-{}-{}",
                id.leader_id.term, id.leader_id.node_id, id.index
            ),
            None => "empty".to_owned(),
        };
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
            snapshot_id,
        };
        // The dump took a while: a newer snapshot may have been installed
        // (or built) meanwhile, and stays the one handed out. The file
        // handle reads this build whatever happens to its name.
        let mut current = self.current.borrow_mut();
        if current
            .as_ref()
            .is_none_or(|held| held.last_log_id < meta.last_log_id)
        {
            std::fs::rename(&self.paths.building, &self.paths.current).map_err(write_error)?;
            *current = Some(meta.clone());
        } else {
            let _ = std::fs::remove_file(&self.paths.building);
        }
        Ok(Snapshot {
            meta,
            snapshot: Box::new(file),
        })
    }
}
