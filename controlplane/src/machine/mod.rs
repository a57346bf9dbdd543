//! The control plane's state as one deterministic state machine.
//!
//! Every change to the durable state is a [`Command`]: log a certificate
//! (with the enrollment token it spends and the zone pins it brings),
//! revoke one (with what it brings along), change the zone, grant or
//! withdraw stake, register a plot, tick the beacon. A proposer decides
//! everything a command needs that is not a function of the state (keys,
//! signatures, serials, randomness, time) before it is a command; then
//! [`Machine::apply`] is the one code path that writes: it opens the one
//! write transaction of the store (`authority.redb`), checks the command
//! against the state, writes it, commits durably, and only then takes it
//! into memory (in a group, [`Machine::defer_durability`], the commands
//! share one transaction and are taken into memory as they are written;
//! see `crate::store`) (the log's tree, the CA's issued and revoked serials, the
//! zone, the ledger, plots and beacon). A command that no longer fits the
//! state (a spent token, a serial revoked meanwhile, a zone change planned
//! on an older zone) is refused by every replica alike and changes
//! nothing.
//!
//! A single node proposes and applies at once (the `issue`, `revoke`, …
//! methods below). Applying the same commands in the same order to a
//! fresh store gives the same tables, row for row: the log's tree heads
//! are signed in the apply, with the command's time, so they are equal
//! byte for byte under an Ed25519 log key, and equal but for the
//! signature's randomness under ECDSA.
//!
//! The store's tables are made in one transaction when it opens
//! (`init_store`); nothing else in the crate opens a write transaction on
//! it.

pub mod codec;
pub mod snapshot;
#[cfg(test)]
pub(crate) mod tests;

use crate::assets::{AssetApplied, AssetChange, StorageAssets, StorageLimits};
use crate::authority::ca::{IssueRequest, KeyAlgorithm, Serial};
use crate::authority::ct::{AppendReceipt, CtLog, LogKeyAlgorithm, LogSigner};
use crate::authority::logged::{
    Authority, AuthorityError, Certify, CertifyWritten, LoggedCertificate, Revoke,
};
use crate::authority::registry::{self, RevocationReason};
use crate::consensus::beacon::Tick;
use crate::consensus::state::{self, AdmissionApplied, AdmissionChange, AdmissionState};
use crate::dns::{Zone, ZoneChange, ZoneConfig};
use crate::store::{GroupError, Store};
use redb::{Database, Durability, TableDefinition, WriteTransaction};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

/// What a replicated store records beside its state (`crate::cluster`):
/// the last Raft entry it applied and the membership, written in the
/// transaction of that entry. Not part of a snapshot's tables.
pub(crate) const CLUSTER_META: TableDefinition<&str, &[u8]> = TableDefinition::new("cluster_meta");

/// One change to the control plane's state, as its proposer decided it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Log and register a certificate the CA signed.
    Certify(Certify),
    /// Revoke a certificate and what was issued on its authority.
    Revoke(Revoke),
    /// Set or remove names of the zone.
    Zone(ZoneChange),
    /// Stake, plots and the beacon.
    Admission(AdmissionChange),
    /// Storage assets and the operator's asset quotas.
    Asset(AssetChange),
}

/// What an applied [`Command`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The certificate's log entry and the tree head that covers it.
    Certified(AppendReceipt),
    /// Every serial revoked, the command's first.
    Revoked(Vec<Serial>),
    Zone,
    Admission(AdmissionApplied),
    Asset(AssetApplied),
}

/// A command written, not yet committed.
enum Written {
    Certified(CertifyWritten),
    Revoked(Vec<Serial>),
    Zone,
    Admission(AdmissionApplied),
    Asset(AssetApplied),
}

/// The control plane's replicated state. See the module documentation.
pub struct Machine {
    authority: Authority,
    zone: Option<Zone>,
    /// The zone's settings, for a reload.
    zone_config: Option<ZoneConfig>,
    admission: Option<AdmissionState>,
    /// Storage assets and asset quotas.
    assets: StorageAssets,
    /// The commands applied since [`Self::record_commands`], in order.
    journal: Option<Vec<Command>>,
    /// Commands applied since [`Self::defer_durability`], committed but
    /// not yet fsynced; `None` outside a group.
    group: Option<usize>,
    /// A cluster member's: only the Raft log's entries change it
    /// ([`Self::apply_with`]); [`Self::apply`] refuses.
    replicated: bool,
    /// Counts the changes taken into memory, but the admission state's
    /// (beacon ticks, stakes, plots) and the writes to storage assets that
    /// hold no checked VM module: what a VM call's checks read of the CA,
    /// the zone and the assets at one count holds while the count stays
    /// ([`Self::changes`]). Moved on after each change.
    changes: Arc<AtomicU64>,
}

impl Machine {
    /// Open or create the store under `dir` (see
    /// `crate::authority::logged`): the CA, the log, the registry and, with
    /// `zone`, the DNS zone. The admission state joins later
    /// ([`Self::attach_admission`]).
    pub fn open(
        dir: &Path,
        ca_algorithm: KeyAlgorithm,
        log_algorithm: LogKeyAlgorithm,
        zone: Option<&ZoneConfig>,
        now: SystemTime,
    ) -> Result<Self, AuthorityError> {
        let authority = Authority::open(dir, ca_algorithm, log_algorithm, now)?;
        // A snapshot check cut short by a crash leaves its scratch file.
        let _ = std::fs::remove_file(snapshot_scratch(authority.store_path()));
        let zone_config = zone.cloned();
        let assets = StorageAssets::load(&authority.database(), StorageLimits::default())
            .map_err(|e| asset_load_error(authority.store_path(), e))?;
        let zone = match zone {
            Some(config) => Some(Zone::open(&authority.database(), config).map_err(|source| {
                AuthorityError::Zone {
                    path: authority.store_path().to_owned(),
                    source,
                }
            })?),
            None => None,
        };
        Ok(Self {
            authority,
            zone,
            zone_config,
            admission: None,
            assets,
            journal: None,
            group: None,
            replicated: false,
            changes: Arc::default(),
        })
    }

    /// Take in the admission state (opened on [`Authority::database`]) and
    /// tick its beacon at `now_unix_s`, unless the stored latest tick is
    /// from that second or later.
    pub fn attach_admission(
        &mut self,
        state: AdmissionState,
        now_unix_s: u64,
    ) -> Result<(), AuthorityError> {
        self.adopt_admission(state);
        self.tick(now_unix_s)?;
        if !self.admission().is_some_and(AdmissionState::has_ticked) {
            self.admission = None;
            return Err(AuthorityError::Admission(state::StateError::Config(
                "the beacon made no tick at start-up; is the clock at 0?".into(),
            )));
        }
        Ok(())
    }

    /// From now on only the cluster's log changes this machine: a change
    /// applied any other way ([`Self::apply`]) is refused, so no member
    /// writes what the others do not.
    pub fn set_replicated(&mut self) {
        self.replicated = true;
    }

    pub fn is_replicated(&self) -> bool {
        self.replicated
    }

    /// Take in the admission state without ticking: a replica (or a
    /// replay) applies the ticks its log holds.
    pub fn adopt_admission(&mut self, state: AdmissionState) {
        self.admission = Some(state);
    }

    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    pub fn zone(&self) -> Option<&Zone> {
        self.zone.as_ref()
    }

    pub fn admission(&self) -> Option<&AdmissionState> {
        self.admission.as_ref()
    }

    pub fn assets(&self) -> &StorageAssets {
        &self.assets
    }

    /// The node's asset limits (configuration: every replica must be given
    /// the same).
    pub fn set_asset_limits(&mut self, limits: StorageLimits) {
        self.assets.set_limits(limits);
        self.changed();
    }

    /// The count of changes taken into memory so far, which every command
    /// applied (but the admission state's, and writes to storage assets
    /// holding no checked VM module), every reload and every limit change
    /// moves on: a reader on another thread compares it with the count a
    /// VM call's checks were made at.
    pub fn changes(&self) -> Arc<AtomicU64> {
        self.changes.clone()
    }

    /// The store, for reads of what is committed from another thread, and
    /// whether what such a read sees may not be on disk yet
    /// ([`crate::store::Store::unsynced`]).
    pub fn committed_store(&self) -> (Arc<Database>, Arc<std::sync::atomic::AtomicBool>) {
        let store = self.authority.store();
        (store.committed(), store.unsynced())
    }

    fn changed(&self) {
        self.changes.fetch_add(1, Ordering::Release);
    }

    /// Bytes `offset..offset + len` of storage asset `id`, if `who` may
    /// read them (what the group applied so far included).
    pub fn read_storage(
        &self,
        who: &dataplane::assets::memory::Owner,
        id: dataplane::assets::address::AssetId,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, AuthorityError> {
        let path = self.authority.store_path();
        let txn = self
            .authority
            .store()
            .begin_read()
            .map_err(|source| AuthorityError::Store {
                path: path.to_owned(),
                source,
            })?;
        Ok(self.assets.read(&txn, who, id, offset, len)?)
    }

    /// Apply an asset change (a single node: propose and apply at once).
    pub fn change_assets(&mut self, change: AssetChange) -> Result<AssetApplied, AuthorityError> {
        match self.apply(Command::Asset(change))? {
            Applied::Asset(applied) => Ok(applied),
            other => unreachable!("an asset change applied as {other:?}"),
        }
    }

    /// For what is the node's own, not replicated state (the difficulty
    /// controller).
    pub fn admission_mut(&mut self) -> Option<&mut AdmissionState> {
        self.admission.as_mut()
    }

    /// Keep every command applied from now on, for [`Self::take_commands`]:
    /// what a replay (or a replica) applies.
    pub fn record_commands(&mut self) {
        self.journal.get_or_insert_with(Vec::new);
    }

    /// The commands recorded since [`Self::record_commands`] or the last
    /// call.
    pub fn take_commands(&mut self) -> Vec<Command> {
        self.journal
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Group commit: from now until [`Self::make_durable`], commands write
    /// into one transaction of the store (`crate::store`), each visible to
    /// every later read and command at once, and one commit with one fsync
    /// makes the whole group durable. Whoever applies a command in a group
    /// must not acknowledge it before [`Self::make_durable`] returned.
    pub fn defer_durability(&mut self) {
        self.group.get_or_insert(0);
    }

    /// Commands applied in the open group and not yet durable.
    pub fn deferred(&self) -> usize {
        self.group.unwrap_or(0)
    }

    /// Commit what the group wrote so far without waiting for the disk
    /// (a read does this too); the group stays open.
    pub fn settle(&mut self) -> Result<(), AuthorityError> {
        self.authority
            .store()
            .settle()
            .map_err(|e| self.store_error(e.widen()))
    }

    /// End the group: commit and fsync what it wrote (one write to the
    /// disk for all of it). Outside a group, or when the group applied
    /// nothing, nothing is written. When this fails, or a write of the
    /// group failed, the state in memory is ahead of the disk: the process
    /// must stop and reload the store.
    pub fn make_durable(&mut self) -> Result<usize, AuthorityError> {
        let Some(applied) = self.group.take() else {
            return Ok(0);
        };
        self.authority
            .store()
            .make_durable(applied > 0)
            .map_err(|e| self.store_error(e.widen()))?;
        Ok(applied)
    }

    /// A store error as this machine's.
    fn store_error(&self, e: GroupError<AuthorityError>) -> AuthorityError {
        store_error(self.authority.store_path(), e)
    }

    /// Run `write` in the group's transaction or, outside a group, in a
    /// durable transaction of its own.
    fn transact<T>(
        &self,
        write: impl FnOnce(&WriteTransaction) -> Result<T, AuthorityError>,
    ) -> Result<T, AuthorityError> {
        let store = self.authority.store();
        match self.group {
            Some(_) => store.write_grouped(write, AuthorityError::is_storage_failure),
            None => store.transact(Durability::Immediate, write),
        }
        .map_err(|e| self.store_error(e))
    }

    /// Apply `command`: check it against the state, write it, then take it
    /// into memory. The write is durable when this returns, unless a group
    /// is open ([`Self::defer_durability`]). A command refused or a write
    /// that fails changes nothing (a failed write in a group loses the
    /// group: see [`Self::make_durable`]).
    pub fn apply(&mut self, command: Command) -> Result<Applied, AuthorityError> {
        if self.replicated {
            return Err(AuthorityError::Replicated);
        }
        // Counted before the write: a group whose write failed still
        // makes `make_durable` fail and say so.
        if let Some(applied) = &mut self.group {
            *applied += 1;
        }
        let counted = self.counted(&command);
        let written = self.transact(|txn| self.write(txn, &command))?;
        if let Some(journal) = &mut self.journal {
            journal.push(command.clone());
        }
        Ok(self.absorb(command, written, counted))
    }

    /// Apply a replicated entry: `command` (if any) and, in the same
    /// transaction, what `also` writes (the entry's place in the log). A
    /// refused command still records `also`: it was applied, as a refusal.
    /// `Err` is a storage failure only, after which the state in memory
    /// cannot be trusted.
    pub(crate) fn apply_with(
        &mut self,
        command: Option<Command>,
        also: impl Fn(&WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<Option<Result<Applied, AuthorityError>>, AuthorityError> {
        let path = self.authority.store_path().to_owned();
        let store = |source| AuthorityError::Store {
            path: path.clone(),
            source,
        };
        if let Some(applied) = &mut self.group {
            *applied += 1;
        }
        let Some(command) = command else {
            self.transact(|txn| also(txn).map_err(store))?;
            return Ok(None);
        };
        let counted = self.counted(&command);
        let written = self.transact(|txn| {
            let written = self.write(txn, &command)?;
            also(txn).map_err(store)?;
            Ok(written)
        });
        match written {
            Ok(written) => {
                if let Some(journal) = &mut self.journal {
                    journal.push(command.clone());
                }
                Ok(Some(Ok(self.absorb(command, written, counted))))
            }
            Err(e) if e.is_storage_failure() => Err(e),
            Err(refused) => {
                self.transact(|txn| also(txn).map_err(store))?;
                Ok(Some(Err(refused)))
            }
        }
    }

    /// Replace the whole state with a snapshot's tables
    /// ([`snapshot::restore`], read from `snapshot` row by row) and what
    /// `also` writes, in one durable transaction, then load it into
    /// memory. Refused snapshot bytes change nothing.
    pub(crate) fn install(
        &mut self,
        snapshot: &mut (impl Read + Seek),
        also: impl Fn(&WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), AuthorityError> {
        self.check_snapshot(snapshot)?;
        // Before the store changes too: a worker's read that began after
        // the commit sees the count moved.
        self.changed();
        let path = self.authority.store_path().to_owned();
        self.authority
            .store()
            .transact(Durability::Immediate, |txn| {
                restore_in(txn, snapshot, &path)?;
                also(txn).map_err(|source| AuthorityError::Store {
                    path: path.clone(),
                    source,
                })
            })
            .map_err(|e| self.store_error(e))?;
        self.reload()
    }

    /// Whether `snapshot` would open as this node's store: restored into a
    /// scratch file beside the store and loaded there with every check a
    /// restart makes (the log under this log's key, the registry against
    /// the log, the zone, the admission state). A snapshot that passes
    /// [`snapshot::restore`]'s checks of its form may still hold a
    /// registry that disagrees with its log; installed, it would leave a
    /// node that cannot reopen. Refused here ([`AuthorityError::Stale`]),
    /// it changes nothing. Costs one more write of the snapshot.
    fn check_snapshot(&self, snapshot: &mut (impl Read + Seek)) -> Result<(), AuthorityError> {
        let path = snapshot_scratch(self.authority.store_path());
        let _ = std::fs::remove_file(&path);
        let refused = |e: AuthorityError| AuthorityError::Stale(format!("a snapshot refused: {e}"));
        let checked = (|| {
            let db = std::sync::Arc::new(Database::create(&path).map_err(|e| {
                AuthorityError::Store {
                    path: path.clone(),
                    source: e.into(),
                }
            })?);
            Store::new(db.clone())
                .transact(Durability::None, |txn| restore_in(txn, snapshot, &path))
                .map_err(|e| store_error(&path, e))?;
            self.authority.check_tables(db.clone()).map_err(refused)?;
            if let Some(config) = &self.zone_config {
                Zone::open(&db, config).map_err(|source| {
                    refused(AuthorityError::Zone {
                        path: path.clone(),
                        source,
                    })
                })?;
            }
            if let Some(state) = &self.admission {
                state.reloaded(&db).map_err(|e| refused(e.into()))?;
            }
            self.assets.reloaded(&db).map_err(|e| refused(e.into()))?;
            Ok(())
        })();
        let _ = std::fs::remove_file(&path);
        checked
    }

    /// Load everything in memory again from the store.
    fn reload(&mut self) -> Result<(), AuthorityError> {
        self.changed();
        let reloaded = self.reload_counted();
        self.changed();
        reloaded
    }

    fn reload_counted(&mut self) -> Result<(), AuthorityError> {
        self.authority.reload()?;
        let db = self.authority.database();
        if let Some(config) = &self.zone_config {
            self.zone = Some(
                Zone::open(&db, config).map_err(|source| AuthorityError::Zone {
                    path: self.authority.store_path().to_owned(),
                    source,
                })?,
            );
        }
        if let Some(state) = &self.admission {
            self.admission = Some(state.reloaded(&db)?);
        }
        self.assets = self
            .assets
            .reloaded(&db)
            .map_err(|e| asset_load_error(self.authority.store_path(), e))?;
        Ok(())
    }

    /// A value of the store's `cluster_meta` table.
    pub(crate) fn cluster_meta(&self, key: &str) -> Result<Option<Vec<u8>>, AuthorityError> {
        let path = self.authority.store_path();
        let store = |source: redb::Error| AuthorityError::Store {
            path: path.to_owned(),
            source,
        };
        let txn = self.authority.store().begin_read().map_err(store)?;
        let table = txn.open_table(CLUSTER_META).map_err(|e| store(e.into()))?;
        let value = table.get(key).map_err(|e| store(e.into()))?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    /// Write `command` in `txn`. Every refusal comes before its first
    /// write: a group's commands share `txn` (`crate::store`).
    fn write(&self, txn: &WriteTransaction, command: &Command) -> Result<Written, AuthorityError> {
        Ok(match command {
            Command::Certify(certify) => {
                let zone = self.check_zone(certify.zone.as_ref())?;
                let written = self.authority.write_certify(txn, certify)?;
                self.write_zone(txn, zone)?;
                Written::Certified(written)
            }
            Command::Revoke(revoke) => {
                let zone = self.check_zone(revoke.zone.as_ref())?;
                let revoked = self.authority.write_revocation(txn, revoke)?;
                self.write_zone(txn, zone)?;
                Written::Revoked(revoked)
            }
            Command::Zone(change) => {
                let zone = self.check_zone(Some(change))?;
                self.write_zone(txn, zone)?;
                Written::Zone
            }
            Command::Admission(change) => {
                // Not a refusal: a replica without the state would skip
                // what the others apply.
                let state = self.admission.as_ref().ok_or_else(|| {
                    AuthorityError::NotConfigured("admission is not running on this node".into())
                })?;
                Written::Admission(state.write(txn, change)?)
            }
            Command::Asset(change) => {
                let zone = self.check_zone(change.zone())?;
                let applied = self.assets.write(txn, change)?;
                self.write_zone(txn, zone)?;
                Written::Asset(applied)
            }
        })
    }

    /// `change`, once checked against the zone as it is (the zone it was
    /// planned on, names it may set); nothing is written.
    fn check_zone<'a>(
        &self,
        change: Option<&'a ZoneChange>,
    ) -> Result<Option<&'a ZoneChange>, AuthorityError> {
        let Some(change) = change else {
            return Ok(None);
        };
        let zone = self.zone.as_ref().ok_or_else(|| {
            AuthorityError::NotConfigured("a zone change for a node without a zone".into())
        })?;
        if !zone.follows(change) {
            return Err(AuthorityError::Stale(
                "the zone changed since this change was planned".into(),
            ));
        }
        // A change from the cluster's log is checked as one planned here.
        zone.check(change).map_err(|source| AuthorityError::Zone {
            path: self.authority.store_path().to_owned(),
            source,
        })?;
        Ok(Some(change))
    }

    /// Write a change [`Self::check_zone`] passed.
    fn write_zone(
        &self,
        txn: &WriteTransaction,
        change: Option<&ZoneChange>,
    ) -> Result<(), AuthorityError> {
        let Some(change) = change else {
            return Ok(());
        };
        change.write(txn).map_err(|source| AuthorityError::Store {
            path: self.authority.store_path().to_owned(),
            source,
        })
    }

    /// Whether `command` moves the count of changes: not the admission
    /// state's, nor a write of the bytes of a storage asset that holds no
    /// checked module (no check the count guards reads them). A counted
    /// command moves it before it is written (a worker's read that began
    /// after its commit sees the count moved) and again once it is taken
    /// into memory.
    fn counted(&self, command: &Command) -> bool {
        let counted = match command {
            Command::Admission(_) => false,
            Command::Asset(AssetChange::Write { id, .. } | AssetChange::Cas { id, .. }) => {
                self.assets.module_checked(*id).is_some()
            }
            _ => true,
        };
        if counted {
            self.changed();
        }
        counted
    }

    fn absorb(&mut self, command: Command, written: Written, counted: bool) -> Applied {
        let applied = self.absorb_counted(command, written);
        if counted {
            self.changed();
        }
        applied
    }

    fn absorb_counted(&mut self, command: Command, written: Written) -> Applied {
        match (command, written) {
            (Command::Certify(certify), Written::Certified(written)) => {
                self.absorb_zone(certify.zone);
                Applied::Certified(self.authority.absorb_certify(written))
            }
            (Command::Revoke(revoke), Written::Revoked(serials)) => {
                self.authority
                    .absorb_revocations(&serials, &revoke.revocation);
                self.absorb_zone(revoke.zone);
                Applied::Revoked(serials)
            }
            (Command::Zone(change), Written::Zone) => {
                self.absorb_zone(Some(change));
                Applied::Zone
            }
            (Command::Admission(change), Written::Admission(applied)) => {
                if let Some(state) = &mut self.admission {
                    state.absorb(change, applied);
                }
                Applied::Admission(applied)
            }
            (Command::Asset(change), Written::Asset(applied)) => {
                self.absorb_zone(change.zone().cloned());
                self.assets.absorb(change, &applied);
                Applied::Asset(applied)
            }
            _ => unreachable!("each command is written as its own kind"),
        }
    }

    fn absorb_zone(&mut self, change: Option<ZoneChange>) {
        if let (Some(zone), Some(change)) = (&mut self.zone, change) {
            zone.apply(change);
        }
    }

    // ---------------------------------------- a single node: propose, apply

    /// Sign a certificate for `request`, log it, register it and apply
    /// `zone` with it; returns once all of it is durable.
    pub fn issue(
        &mut self,
        request: IssueRequest,
        now: SystemTime,
        zone: Option<ZoneChange>,
    ) -> Result<LoggedCertificate, AuthorityError> {
        let (certificate, mut certify) = self.authority.propose_issue(request, now)?;
        certify.zone = zone;
        let receipt = self.certify(certify)?;
        Ok(LoggedCertificate::logged(certificate, receipt))
    }

    /// Renew a certificate of this CA and log the successor, with `zone`.
    pub fn renew(
        &mut self,
        current_cert_der: &[u8],
        now: SystemTime,
        zone: Option<ZoneChange>,
    ) -> Result<LoggedCertificate, AuthorityError> {
        let (certificate, mut certify) = self.authority.propose_renewal(current_cert_der, now)?;
        certify.zone = zone;
        let receipt = self.certify(certify)?;
        Ok(LoggedCertificate::logged(certificate, receipt))
    }

    fn certify(&mut self, certify: Certify) -> Result<AppendReceipt, AuthorityError> {
        match self.apply(Command::Certify(certify))? {
            Applied::Certified(receipt) => Ok(receipt),
            other => unreachable!("a certificate applied as {other:?}"),
        }
    }

    /// Revoke a certificate this authority issued, with `zone`; returns
    /// once the revocation is durable, with the serials revoked along
    /// (what renewed it or was issued on its authority). An unknown serial
    /// is `CaError::UnknownSerial`, a second revocation
    /// `CaError::AlreadyRevoked`.
    pub fn revoke(
        &mut self,
        serial: Serial,
        reason: Option<RevocationReason>,
        now: SystemTime,
        zone: Option<ZoneChange>,
    ) -> Result<Vec<Serial>, AuthorityError> {
        let mut revoke = self.authority.propose_revocation(serial, reason, now)?;
        revoke.zone = zone;
        match self.apply(Command::Revoke(revoke))? {
            Applied::Revoked(mut serials) => {
                serials.remove(0);
                Ok(serials)
            }
            other => unreachable!("a revocation applied as {other:?}"),
        }
    }

    /// Apply a change planned on the zone.
    pub fn change_zone(&mut self, change: ZoneChange) -> Result<(), AuthorityError> {
        self.apply(Command::Zone(change)).map(drop)
    }

    fn state(&self) -> Result<&AdmissionState, AuthorityError> {
        self.admission.as_ref().ok_or_else(|| {
            AuthorityError::Admission(state::StateError::Config(
                "admission is not running on this node".into(),
            ))
        })
    }

    fn admission_change(&mut self, change: AdmissionChange) -> Result<u64, AuthorityError> {
        match self.apply(Command::Admission(change))? {
            Applied::Admission(AdmissionApplied::Stake { total }) => Ok(total),
            Applied::Admission(_) => Ok(0),
            other => unreachable!("an admission change applied as {other:?}"),
        }
    }

    /// Add `amount` to `identity`'s stake, durably; returns the new total.
    /// Refused (nothing changes) for 0, an overflow or a full ledger.
    pub fn grant(
        &mut self,
        identity: crate::consensus::stake::Identity,
        amount: u64,
    ) -> Result<u64, AuthorityError> {
        let change = self.state()?.propose_grant(identity, amount)?;
        self.admission_change(change)
    }

    /// Withdraw up to `amount` from `identity`, durably; returns what is
    /// left. An identity left with nothing leaves the ledger.
    pub fn withdraw(
        &mut self,
        identity: crate::consensus::stake::Identity,
        amount: u64,
    ) -> Result<u64, AuthorityError> {
        self.state()?;
        self.admission_change(AdmissionChange::StakeWithdraw { identity, amount })
    }

    /// Register `identity`'s plot (see `AdmissionState::propose_plot`).
    pub fn register_plot(
        &mut self,
        identity: crate::consensus::stake::Identity,
        commitment: crate::authority::ct::Hash,
        k: u8,
    ) -> Result<(), AuthorityError> {
        if let Some(change) = self.state()?.propose_plot(identity, commitment, k)? {
            self.admission_change(change)?;
        }
        Ok(())
    }

    /// Make, persist and return the beacon's next tick if `now_unix_s` is
    /// past the latest tick's second; `None` otherwise. Call about once a
    /// second.
    pub fn tick(&mut self, now_unix_s: u64) -> Result<Option<Tick>, AuthorityError> {
        let Some(change) = self.state()?.propose_tick(now_unix_s) else {
            return Ok(None);
        };
        let AdmissionChange::BeaconTick(tick) = &change else {
            unreachable!("a tick proposal is a tick");
        };
        let tick = tick.clone();
        self.admission_change(change)?;
        Ok(Some(tick))
    }
}

/// [`snapshot::restore`] into `txn` of the store at `path`, from the start
/// of `bytes` to their end, through a buffer: malformed or unreadable
/// bytes are a refusal ([`AuthorityError::Stale`]), a write that fails
/// the store's.
fn restore_in(
    txn: &WriteTransaction,
    bytes: &mut (impl Read + Seek),
    path: &Path,
) -> Result<(), AuthorityError> {
    let unreadable =
        |e: std::io::Error| AuthorityError::Stale(format!("the snapshot could not be read: {e}"));
    let len = bytes.seek(SeekFrom::End(0)).map_err(unreadable)?;
    bytes.seek(SeekFrom::Start(0)).map_err(unreadable)?;
    let buffered = std::io::BufReader::with_capacity(SNAPSHOT_READ_BUFFER, bytes);
    snapshot::restore(txn, buffered, len).map_err(|e| match e {
        snapshot::RestoreError::Malformed(why) => AuthorityError::Stale(why),
        snapshot::RestoreError::Storage(source) => AuthorityError::Store {
            path: path.to_owned(),
            source,
        },
    })
}

/// A failure of the store at `path` (or a write's own error) as an
/// [`AuthorityError`].
fn store_error(path: &Path, e: GroupError<AuthorityError>) -> AuthorityError {
    e.flatten(|source| AuthorityError::Store {
        path: path.to_owned(),
        source,
    })
}

/// A store whose asset tables do not load.
fn asset_load_error(path: &Path, e: crate::assets::StorageError) -> AuthorityError {
    match e {
        crate::assets::StorageError::Storage(source) => AuthorityError::Store {
            path: path.to_owned(),
            source,
        },
        other => AuthorityError::Asset(other),
    }
}

/// How much of a snapshot is read from its file at a time.
const SNAPSHOT_READ_BUFFER: usize = 256 * 1024;

/// Where a snapshot is restored to be checked ([`Machine::check_snapshot`]):
/// beside the store.
fn snapshot_scratch(store: &Path) -> std::path::PathBuf {
    store.with_extension("snapshot-check")
}

/// Make every table of the store at `path` that is missing, in one
/// transaction: the log's (recording `signer`'s key in a new log, checking
/// it in an existing one), the registry's, the zone's and the admission
/// state's.
pub(crate) fn init_store(
    store: &Store,
    signer: &LogSigner,
    path: &Path,
) -> Result<(), AuthorityError> {
    store
        .transact(Durability::Immediate, |txn| {
            CtLog::init_in(txn, signer).map_err(|source| AuthorityError::Log {
                path: path.to_owned(),
                source,
            })?;
            registry::init_in(txn).map_err(|source| AuthorityError::Registry {
                path: path.to_owned(),
                source,
            })?;
            crate::dns::store::init_in(txn)
                .and_then(|()| state::init_in(txn))
                .and_then(|()| crate::assets::init_in(txn))
                .and_then(|()| {
                    txn.open_table(CLUSTER_META)
                        .map(drop)
                        .map_err(redb::Error::from)
                })
                .map_err(|source| AuthorityError::Store {
                    path: path.to_owned(),
                    source,
                })
        })
        .map_err(|e| store_error(path, e))
}
