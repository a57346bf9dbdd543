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
//! tables ([`snapshot`]).

use super::codec::{
    decode_optional_log_id, decode_stored_membership, encode_optional_log_id,
    encode_stored_membership,
};
use super::{Member, Outcome, TypeConfig};
use crate::authority::logged::AuthorityError;
use crate::machine::{CLUSTER_META, Machine, snapshot};
use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    Entry, EntryPayload, LogId, RaftSnapshotBuilder, StorageError, StorageIOError, StoredMembership,
};
use std::cell::RefCell;
use std::io::Cursor;
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

type Error = StorageError<u64>;

/// The last snapshot built or installed: its metadata and its bytes.
type Current = Rc<RefCell<Option<(SnapshotMeta<u64, Member>, Vec<u8>)>>>;

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
    pub fn new(host: Host) -> Self {
        Self {
            host,
            current: Rc::default(),
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
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, Error> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), Error> {
        let bytes = snapshot.into_inner();
        let membership = encode_stored_membership(&meta.last_membership);
        self.host
            .borrow_mut()
            .machine_mut()
            .install(&bytes, |txn| {
                record(txn, meta.last_log_id.as_ref(), Some(&membership))
            })
            .map_err(|e: AuthorityError| {
                StorageError::from(StorageIOError::write_snapshot(Some(meta.signature()), &e))
            })?;
        tracing::info!(snapshot = %meta.snapshot_id, "snapshot installed");
        *self.current.borrow_mut() = Some((meta.clone(), bytes));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, Error> {
        Ok(self
            .current
            .borrow()
            .as_ref()
            .map(|(meta, bytes)| Snapshot {
                meta: meta.clone(),
                snapshot: Box::new(Cursor::new(bytes.clone())),
            }))
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
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, Error> {
        let (last_log_id, last_membership, txn) = self
            .view
            .take()
            .unwrap_or_else(|| Err(read_error(std::io::Error::other("the snapshot was built"))))?;
        let (done, dumped) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("snapshot".into())
            .spawn(move || {
                let _ = done.send(snapshot::dump_in(&txn));
            })
            .map_err(read_error)?;
        let bytes = dumped
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
        // (or built) meanwhile, and stays the one handed out.
        let mut current = self.current.borrow_mut();
        if current
            .as_ref()
            .is_none_or(|(held, _)| held.last_log_id < meta.last_log_id)
        {
            *current = Some((meta.clone(), bytes.clone()));
        }
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}
