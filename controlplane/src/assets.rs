//! Storage assets and the operator's asset quotas: the part of the HyperMesh
//! asset registry that survives a restart, so it lives in the control
//! plane's store and changes only through [`crate::machine::Command::Asset`].
//!
//! A storage asset is a durable byte object of a fixed size. Its bytes are
//! kept in chunks of [`CHUNK_LEN`] (`asset_chunks`, keyed by identifier and
//! chunk number; a chunk never written reads as zeros), so a write or a
//! read costs what it touches, not the object's size. Its record
//! (`asset_storage`) holds the owner, the size and the grants.
//!
//! Identifiers come from one counter in the store (`asset_meta`): the
//! upper half of the block space ([`STORAGE_BLOCKS_FIRST`]) is storage's,
//! so a storage identifier never meets a memory one, and an identifier is
//! never handed out twice, whichever node proposes. An identifier below the
//! counter that has no record was freed ("released"); one at or above it
//! was never allocated ("unknown").
//!
//! Every decision is made in [`StorageAssets::write`] from the state and
//! the command alone (the identifier, the access check, the quota, the
//! compare of a compare-and-swap), so replicas applying the same commands
//! agree; each refusal comes before the first write, as a group commit
//! needs (`crate::store`).
//!
//! Quotas (`asset_quotas`) are the operator's, per identity: memory bytes
//! (held by the dataplane's workers, which take the limits from here) and
//! storage bytes. An identity without a row has the configured defaults.

use crate::dns::ZoneChange;
use dataplane::assets::StorageTotals;
use dataplane::assets::address::{AssetId, BLOCK_LEN, NodeNumber, STORAGE_BLOCKS_FIRST};
use dataplane::assets::memory::{
    ASSET_OVERHEAD_BYTES, ASSETS_PER_OWNER_MAX, Access, GRANT_OVERHEAD_BYTES, GRANTS_PER_ASSET_MAX,
    LIST_LEN_MAX, Owner,
};
#[cfg(test)]
use redb::ReadableTableMetadata;
use redb::WriteTransaction;
use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::{BTreeMap, BTreeSet, HashMap};

pub(crate) const STORAGE: TableDefinition<u64, &[u8]> = TableDefinition::new("asset_storage");
pub(crate) const CHUNKS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("asset_chunks");
pub(crate) const QUOTAS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("asset_quotas");
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("asset_meta");
/// `asset_meta`'s key for the next storage sequence number.
const NEXT: &str = "next_storage";

/// Bytes per stored chunk of an object.
pub const CHUNK_LEN: u64 = 64 * 1024;
/// The largest storage asset (the quota bounds it further).
pub const STORAGE_SIZE_MAX: u64 = 1 << 40;
/// Storage assets a node holds, all owners together: each is a record in
/// the control plane's memory, loaded at every start.
pub const STORAGE_ASSETS_NODE_MAX: usize = 1 << 22;
/// Named storage assets one owner may hold: each name is one of the
/// zone's (at most 65,536 for every use).
pub const NAMED_PER_OWNER_MAX: usize = 64;
/// The most bytes one storage read returns: 64 of them may wait in one
/// group commit's answers, so a group holds at most 16 MiB of them, and a
/// connection's answers waiting to be sent stay near the bound a memory
/// read has (`dataplane::assets::serve::QUEUED_RESPONSE_BYTES_MAX`).
pub const STORAGE_READ_LEN_MAX: u64 = 256 * 1024;
/// Storage sequence numbers there are: the blocks above
/// [`STORAGE_BLOCKS_FIRST`].
const SEQUENCE_END: u64 =
    (dataplane::assets::address::BLOCKS_MAX - STORAGE_BLOCKS_FIRST) * BLOCK_LEN;

/// The identifier of storage sequence number `seq`, allocated by `node`.
pub fn storage_id(node: NodeNumber, seq: u64) -> AssetId {
    AssetId::new(
        node,
        STORAGE_BLOCKS_FIRST + seq / BLOCK_LEN,
        (seq % BLOCK_LEN) as u16,
    )
}

/// The sequence number of a storage identifier.
fn sequence_of(id: AssetId) -> Option<u64> {
    let block = id.block().checked_sub(STORAGE_BLOCKS_FIRST)?;
    Some(block * BLOCK_LEN + (id.0 % BLOCK_LEN))
}

/// One change to the storage assets or the quotas, as its proposer asked
/// it. `caller` is who asked (the owner or a grantee); the apply checks
/// that they may.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AssetChange {
    /// A new storage asset of `size` zero bytes for `owner`, as `id`: an
    /// identifier at or past the counter when it was proposed (refused as
    /// stale if the counter passed it; the counter moves past it, so an
    /// identifier a proposer skipped is never handed out). With `name`,
    /// the absolute name `zone` publishes the asset's address at. The
    /// proposer's `limits` are what it is checked against, so every
    /// replica checks the same.
    Alloc {
        owner: Owner,
        size: u64,
        id: AssetId,
        name: Option<String>,
        zone: Option<ZoneChange>,
        limits: AllocLimits,
    },
    Write {
        caller: Owner,
        id: AssetId,
        offset: u64,
        data: Vec<u8>,
    },
    /// Replace `expected` with `new` at `offset` if that is what is there.
    Cas {
        caller: Owner,
        id: AssetId,
        offset: u64,
        expected: Vec<u8>,
        new: Vec<u8>,
    },
    /// Free `id`; `zone` removes its name, if it has one.
    Free {
        caller: Owner,
        id: AssetId,
        zone: Option<ZoneChange>,
    },
    /// Set (`Some`) or withdraw (`None`) `grantee`'s access.
    /// A grant is charged to its owner's quota: checked against the
    /// proposer's `limits`, as an allocation is.
    Grant {
        caller: Owner,
        id: AssetId,
        grantee: Owner,
        access: Option<Access>,
        limits: AllocLimits,
    },
    /// The operator's quotas for `owner`; `None` is the default.
    Quota { owner: Owner, quota: Quota },
}

impl AssetChange {
    /// The zone change that comes with it.
    pub fn zone(&self) -> Option<&ZoneChange> {
        match self {
            AssetChange::Alloc { zone, .. } | AssetChange::Free { zone, .. } => zone.as_ref(),
            _ => None,
        }
    }
}

/// What an applied [`AssetChange`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AssetApplied {
    Allocated(AssetId),
    Written,
    /// Whether it swapped, and the bytes that were there.
    Swapped(bool, Vec<u8>),
    /// The bytes the asset held.
    Freed(u64),
    /// Whether the grant changed anything.
    Granted(bool),
    Quota,
}

/// An identity's quotas as the operator set them; `None` is the node's
/// default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Quota {
    pub memory: Option<u64>,
    pub storage: Option<u64>,
    /// The fuel each call of the identity's VMs may be given.
    #[serde(default)]
    pub fuel: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage asset {0:?}: no such asset")]
    Unknown(AssetId),
    #[error("storage asset {0:?}: released (freed)")]
    Released(AssetId),
    #[error("storage asset {0:?}: neither owned by this identity nor granted to it")]
    Forbidden(AssetId),
    #[error("storage asset {id:?}: bytes {offset}..{end} are outside its {size} bytes")]
    OutOfRange {
        id: AssetId,
        offset: u64,
        end: u64,
        size: u64,
    },
    #[error("compare-and-swap: expected and new values differ in length ({expected} and {new})")]
    CasLength { expected: usize, new: usize },
    #[error(
        "storage quota exceeded: {used} of {limit} bytes in use, {asked} more asked (each asset counts {ASSET_OVERHEAD_BYTES} bytes beside its size, each grant {GRANT_OVERHEAD_BYTES})"
    )]
    QuotaExceeded { limit: u64, used: u64, asked: u64 },
    #[error("this node holds all the storage assets it may ({limit} bytes)")]
    NodeFull { limit: u64 },
    #[error("this node holds all the storage assets it may ({STORAGE_ASSETS_NODE_MAX} assets)")]
    NodeAssetsFull,
    #[error("a storage read returns at most {STORAGE_READ_LEN_MAX} bytes, not {0}; read in parts")]
    ReadLen(u64),
    #[error("a storage asset holds 1 to {STORAGE_SIZE_MAX} bytes, not {0}")]
    Size(u64),
    #[error("at most {ASSETS_PER_OWNER_MAX} storage assets per owner")]
    TooManyAssets,
    #[error("at most {GRANTS_PER_ASSET_MAX} grants per asset")]
    TooManyGrants,
    #[error("every storage identifier has been handed out")]
    IdsExhausted,
    #[error("at most {NAMED_PER_OWNER_MAX} named storage assets per owner")]
    TooManyNames,
    #[error("another storage asset was allocated since this one was planned; retry")]
    Stale,
    #[error("the stored asset records are corrupt: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Storage(#[from] redb::Error),
}

impl StorageError {
    /// The store failed, rather than the request being refused.
    pub fn is_storage_failure(&self) -> bool {
        matches!(self, Self::Storage(_) | Self::Corrupt(_))
    }
}

impl From<redb::StorageError> for StorageError {
    fn from(e: redb::StorageError) -> Self {
        Self::Storage(e.into())
    }
}

impl From<redb::TransactionError> for StorageError {
    fn from(e: redb::TransactionError) -> Self {
        Self::Storage(e.into())
    }
}

impl From<redb::TableError> for StorageError {
    fn from(e: redb::TableError) -> Self {
        Self::Storage(e.into())
    }
}

/// The node's limits (configuration, the same on every replica).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StorageLimits {
    /// Storage bytes of an identity the operator set no quota for.
    pub default_quota: u64,
    /// Memory bytes of such an identity (the workers enforce it).
    pub default_memory_quota: u64,
    /// Storage bytes of all owners together.
    pub node_max: u64,
    /// The fuel each VM call of such an identity may be given.
    pub default_fuel_quota: u64,
}

/// What an allocation is checked against beside the owner's quota: the
/// proposer's configuration, carried in the command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocLimits {
    /// The storage quota of an identity the operator set none for.
    pub default_quota: u64,
    /// Storage bytes of all owners together.
    pub node_max: u64,
}

impl From<StorageLimits> for AllocLimits {
    fn from(limits: StorageLimits) -> Self {
        Self {
            default_quota: limits.default_quota,
            node_max: limits.node_max,
        }
    }
}

impl Default for StorageLimits {
    fn default() -> Self {
        Self {
            default_quota: 1 << 30,
            default_memory_quota: 64 << 20,
            node_max: 64 << 30,
            default_fuel_quota: crate::vm::FUEL_QUOTA_DEFAULT,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    owner: Owner,
    size: u64,
    grants: Vec<(Owner, Access)>,
    /// The absolute name the zone publishes its address at.
    name: Option<String>,
}

impl Record {
    /// What it counts against its owner's quota.
    fn charge(&self) -> u64 {
        self.size + ASSET_OVERHEAD_BYTES + GRANT_OVERHEAD_BYTES * self.grants.len() as u64
    }

    fn may(&self, who: &Owner, write: bool) -> bool {
        self.owner == *who
            || self
                .grants
                .iter()
                .any(|(grantee, access)| grantee == who && (!write || *access == Access::Write))
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(41 + 33 * self.grants.len());
        out.extend_from_slice(&self.owner.0);
        out.extend_from_slice(&self.size.to_be_bytes());
        out.push(self.grants.len() as u8);
        for (grantee, access) in &self.grants {
            out.extend_from_slice(&grantee.0);
            out.push(access.byte());
        }
        // A name of the zone: at most 253 bytes.
        let name = self.name.as_deref().unwrap_or_default();
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let (owner, rest) = bytes.split_first_chunk::<32>()?;
        let (size, rest) = rest.split_first_chunk::<8>()?;
        let (&count, mut rest) = rest.split_first()?;
        let mut grants = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let (grantee, tail) = rest.split_first_chunk::<32>()?;
            let (&access, tail) = tail.split_first()?;
            grants.push((Owner(*grantee), Access::from_byte(access)?));
            rest = tail;
        }
        let (&len, rest) = rest.split_first()?;
        let name = match (len, rest.len() == usize::from(len)) {
            (_, false) => return None,
            (0, true) => None,
            (_, true) => Some(std::str::from_utf8(rest).ok()?.to_owned()),
        };
        Some(Self {
            owner: Owner(*owner),
            size: u64::from_be_bytes(*size),
            grants,
            name,
        })
    }
}

/// A quota row: which limits are set (a bit each), then memory, storage
/// and fuel; without fuel, 17 bytes (as releases before VMs wrote it).
fn encode_quota(quota: &Quota) -> Vec<u8> {
    let mut out = vec![
        u8::from(quota.memory.is_some())
            | (u8::from(quota.storage.is_some()) << 1)
            | (u8::from(quota.fuel.is_some()) << 2),
    ];
    out.extend_from_slice(&quota.memory.unwrap_or(0).to_be_bytes());
    out.extend_from_slice(&quota.storage.unwrap_or(0).to_be_bytes());
    if let Some(fuel) = quota.fuel {
        out.extend_from_slice(&fuel.to_be_bytes());
    }
    out
}

fn decode_quota(bytes: &[u8]) -> Option<Quota> {
    let (flags, fuel) = match bytes.len() {
        17 if bytes[0] <= 3 => (bytes[0], 0),
        25 if (4..=7).contains(&bytes[0]) => {
            (bytes[0], u64::from_be_bytes(bytes[17..].try_into().ok()?))
        }
        _ => return None,
    };
    let memory = u64::from_be_bytes(bytes[1..9].try_into().ok()?);
    let storage = u64::from_be_bytes(bytes[9..17].try_into().ok()?);
    Some(Quota {
        memory: (flags & 1 != 0).then_some(memory),
        storage: (flags & 2 != 0).then_some(storage),
        fuel: (flags & 4 != 0).then_some(fuel),
    })
}

/// A storage asset as `asset list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageInfo {
    pub id: AssetId,
    pub size: u64,
    pub grants: usize,
    pub name: Option<String>,
}

/// The storage assets and quotas, as the store holds them, in memory.
#[derive(Debug, Default)]
pub struct StorageAssets {
    records: HashMap<AssetId, Record>,
    by_owner: HashMap<Owner, BTreeSet<AssetId>>,
    /// How many of each owner's assets have a name.
    named: HashMap<Owner, usize>,
    /// Each owner's charge (sizes, overheads and grants).
    used: HashMap<Owner, u64>,
    quotas: BTreeMap<Owner, Quota>,
    next: u64,
    /// Every owner's charge together.
    charged: u64,
    bytes: u64,
    limits: StorageLimits,
    freed_assets: u64,
    freed_bytes: u64,
    /// VM assets whose module was hashed, with the SHA-256 it had, since
    /// their bytes last changed (in memory only: a restart hashes again).
    checked_modules: std::sync::Mutex<HashMap<AssetId, [u8; 32]>>,
}

/// Make the tables a new store lacks (in the store's first transaction).
pub(crate) fn init_in(txn: &WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(STORAGE)?;
    txn.open_table(CHUNKS)?;
    txn.open_table(QUOTAS)?;
    txn.open_table(META)?;
    Ok(())
}

impl StorageAssets {
    /// Load what `db` holds (its tables made by [`init_in`]), every record
    /// checked.
    pub fn load(db: &Database, limits: StorageLimits) -> Result<Self, StorageError> {
        let txn = db.begin_read()?;
        let mut state = Self {
            limits,
            ..Self::default()
        };
        let meta = txn.open_table(META)?;
        state.next = meta.get(NEXT)?.map_or(0, |v| v.value());
        for row in txn.open_table(STORAGE)?.iter()? {
            let (id, bytes) = row?;
            let id = AssetId(id.value());
            let record = Record::decode(bytes.value())
                .ok_or_else(|| StorageError::Corrupt(format!("the record of {id:?}")))?;
            if sequence_of(id).is_none_or(|seq| seq >= state.next) {
                return Err(StorageError::Corrupt(format!(
                    "{id:?} is not a storage identifier handed out"
                )));
            }
            state.take(id, record);
        }
        for row in txn.open_table(QUOTAS)?.iter()? {
            let (owner, bytes) = row?;
            let quota = decode_quota(bytes.value())
                .ok_or_else(|| StorageError::Corrupt("a quota row".into()))?;
            state.quotas.insert(Owner(*owner.value()), quota);
        }
        Ok(state)
    }

    /// The same state loaded again from `db` (a snapshot was installed).
    pub(crate) fn reloaded(&self, db: &Database) -> Result<Self, StorageError> {
        Self::load(db, self.limits)
    }

    pub fn set_limits(&mut self, limits: StorageLimits) {
        self.limits = limits;
    }

    pub fn limits(&self) -> StorageLimits {
        self.limits
    }

    fn take(&mut self, id: AssetId, record: Record) {
        if record.name.is_some() {
            *self.named.entry(record.owner).or_default() += 1;
        }
        *self.used.entry(record.owner).or_default() += record.charge();
        self.charged += record.charge();
        self.bytes += record.size;
        self.by_owner.entry(record.owner).or_default().insert(id);
        self.records.insert(id, record);
    }

    /// The memory limit of every identity the operator set one for (the
    /// workers' quota ledger takes these).
    pub fn memory_limits(&self) -> HashMap<Owner, u64> {
        self.quotas
            .iter()
            .filter_map(|(owner, q)| Some((*owner, q.memory?)))
            .collect()
    }

    /// Every identity with a quota set, with its limits and what it holds.
    pub fn quotas(&self) -> Vec<(Owner, Quota, u64)> {
        self.quotas
            .iter()
            .map(|(owner, quota)| (*owner, *quota, self.used_by(owner)))
            .collect()
    }

    /// The storage bytes `owner` is charged for.
    pub fn used_by(&self, owner: &Owner) -> u64 {
        self.used.get(owner).copied().unwrap_or(0)
    }

    /// The effective limits of `owner`: (memory, storage).
    pub fn effective(&self, owner: &Owner) -> (u64, u64) {
        let quota = self.quotas.get(owner).copied().unwrap_or_default();
        (
            quota.memory.unwrap_or(self.limits.default_memory_quota),
            quota.storage.unwrap_or(self.limits.default_quota),
        )
    }

    pub fn totals(&self) -> StorageTotals {
        StorageTotals {
            assets: self.records.len() as u64,
            bytes: self.bytes,
            owners: self.by_owner.len() as u64,
            freed_assets: self.freed_assets,
            freed_bytes: self.freed_bytes,
        }
    }

    /// What `owner` holds, by identifier: the first [`LIST_LEN_MAX`].
    pub fn list(&self, owner: &Owner) -> Vec<StorageInfo> {
        self.by_owner
            .get(owner)
            .into_iter()
            .flatten()
            .take(LIST_LEN_MAX)
            .map(|id| {
                let record = &self.records[id];
                StorageInfo {
                    id: *id,
                    size: record.size,
                    grants: record.grants.len(),
                    name: record.name.clone(),
                }
            })
            .collect()
    }

    /// How many of `owner`'s assets have a name.
    fn named_by(&self, owner: &Owner) -> usize {
        self.named.get(owner).copied().unwrap_or(0)
    }

    /// The fuel each call of `owner`'s VMs may be given.
    pub fn fuel_quota(&self, owner: &Owner) -> u64 {
        self.quota_of(owner)
            .fuel
            .unwrap_or(self.limits.default_fuel_quota)
    }

    /// The SHA-256 `id`'s module had when it was last hashed, if its bytes
    /// have not changed since ([`Self::set_module_checked`]).
    pub fn module_checked(&self, id: AssetId) -> Option<[u8; 32]> {
        self.checked_modules
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
            .copied()
    }

    /// `id`'s module hashes to `sha256` (until its bytes change).
    pub fn set_module_checked(&self, id: AssetId, sha256: [u8; 32]) {
        if self.records.contains_key(&id) {
            self.checked_modules
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(id, sha256);
        }
    }

    /// Whether an identity other than `id`'s owner may write it.
    pub fn writable_by_others(&self, id: AssetId) -> bool {
        self.records.get(&id).is_some_and(|record| {
            record
                .grants
                .iter()
                .any(|(_, access)| *access == Access::Write)
        })
    }

    /// The owner and size of storage asset `id`, if it exists.
    pub fn owner_and_size(&self, id: AssetId) -> Option<(Owner, u64)> {
        self.records.get(&id).map(|r| (r.owner, r.size))
    }

    /// The quotas the operator set for `owner` (none: the defaults).
    pub fn quota_of(&self, owner: &Owner) -> Quota {
        self.quotas.get(owner).copied().unwrap_or_default()
    }

    /// The name `id` is published at, if it has one and exists.
    pub fn name_of(&self, id: AssetId) -> Option<&str> {
        self.records.get(&id)?.name.as_deref()
    }

    /// The counter's next identifier, with `node`'s number in it: what an
    /// allocation proposed now takes.
    pub fn next_id(&self, node: NodeNumber) -> AssetId {
        storage_id(node, self.next)
    }

    /// The counter: the sequence number of the next identifier.
    pub fn next_sequence(&self) -> u64 {
        self.next
    }

    /// The record of `id`, or why there is none.
    fn record(&self, id: AssetId) -> Result<&Record, StorageError> {
        if let Some(record) = self.records.get(&id) {
            return Ok(record);
        }
        match sequence_of(id) {
            Some(seq) if seq < self.next => Err(StorageError::Released(id)),
            _ => Err(StorageError::Unknown(id)),
        }
    }

    /// The record of `id` if `who` may read (or, with `write`, write)
    /// bytes `offset..offset + len` of it.
    fn checked(
        &self,
        who: &Owner,
        id: AssetId,
        offset: u64,
        len: u64,
        write: bool,
    ) -> Result<&Record, StorageError> {
        let record = self.record(id)?;
        if !record.may(who, write) {
            return Err(StorageError::Forbidden(id));
        }
        match offset.checked_add(len) {
            Some(end) if end <= record.size => Ok(record),
            end => Err(StorageError::OutOfRange {
                id,
                offset,
                end: end.unwrap_or(u64::MAX),
                size: record.size,
            }),
        }
    }

    /// Bytes `offset..offset + len` of `id`, read in `txn` (a read of the
    /// store), if `who` may read them.
    pub fn read(
        &self,
        txn: &ReadTransaction,
        who: &Owner,
        id: AssetId,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, StorageError> {
        if len > STORAGE_READ_LEN_MAX {
            return Err(StorageError::ReadLen(len));
        }
        self.checked(who, id, offset, len, false)?;
        read_chunks(&txn.open_table(CHUNKS)?, id, offset, len as usize)
    }

    /// Check `change` against the state and write its rows in `txn` (the
    /// machine's transaction); [`Self::absorb`] it once written, with
    /// nothing applied in between. A refusal writes nothing.
    pub(crate) fn write(
        &self,
        txn: &WriteTransaction,
        change: &AssetChange,
    ) -> Result<AssetApplied, StorageError> {
        match change {
            AssetChange::Alloc {
                owner,
                size,
                id,
                name,
                limits,
                ..
            } => {
                let seq = match sequence_of(*id) {
                    Some(seq) if seq >= self.next => seq,
                    _ => return Err(StorageError::Stale),
                };
                if *size == 0 || *size > STORAGE_SIZE_MAX {
                    return Err(StorageError::Size(*size));
                }
                if seq >= SEQUENCE_END {
                    return Err(StorageError::IdsExhausted);
                }
                if self.records.len() >= STORAGE_ASSETS_NODE_MAX {
                    return Err(StorageError::NodeAssetsFull);
                }
                if name.is_some() && self.named_by(owner) >= NAMED_PER_OWNER_MAX {
                    return Err(StorageError::TooManyNames);
                }
                if self.by_owner.get(owner).map_or(0, BTreeSet::len) as u64 >= ASSETS_PER_OWNER_MAX
                {
                    return Err(StorageError::TooManyAssets);
                }
                self.check_charge(owner, size + ASSET_OVERHEAD_BYTES, limits)?;
                let record = Record {
                    owner: *owner,
                    size: *size,
                    grants: Vec::new(),
                    name: name.clone(),
                };
                txn.open_table(STORAGE)?
                    .insert(id.0, record.encode().as_slice())?;
                txn.open_table(META)?.insert(NEXT, seq + 1)?;
                Ok(AssetApplied::Allocated(*id))
            }
            AssetChange::Write {
                caller,
                id,
                offset,
                data,
            } => {
                self.checked(caller, *id, *offset, data.len() as u64, true)?;
                write_bytes(txn, *id, *offset, data)?;
                Ok(AssetApplied::Written)
            }
            AssetChange::Cas {
                caller,
                id,
                offset,
                expected,
                new,
            } => {
                if expected.len() != new.len() {
                    return Err(StorageError::CasLength {
                        expected: expected.len(),
                        new: new.len(),
                    });
                }
                self.checked(caller, *id, *offset, new.len() as u64, true)?;
                let was = read_chunks(&txn.open_table(CHUNKS)?, *id, *offset, new.len())?;
                let swapped = was == *expected;
                if swapped {
                    write_bytes(txn, *id, *offset, new)?;
                }
                Ok(AssetApplied::Swapped(swapped, was))
            }
            AssetChange::Free { caller, id, .. } => {
                let record = self.record(*id)?;
                if record.owner != *caller {
                    return Err(StorageError::Forbidden(*id));
                }
                txn.open_table(STORAGE)?.remove(id.0)?;
                // The chunks written, not the size: a free costs what the
                // writes that made the chunks paid for.
                txn.open_table(CHUNKS)?
                    .retain_in((id.0, 0)..=(id.0, u64::MAX), |_, _| false)?;
                Ok(AssetApplied::Freed(record.size))
            }
            AssetChange::Grant {
                caller,
                id,
                grantee,
                access,
                limits,
            } => {
                let record = self.record(*id)?;
                if record.owner != *caller {
                    return Err(StorageError::Forbidden(*id));
                }
                let Some(next) = granted(record, grantee, *access) else {
                    return Ok(AssetApplied::Granted(false));
                };
                let grew = next.grants.len() > record.grants.len();
                if grew {
                    if record.grants.len() >= GRANTS_PER_ASSET_MAX {
                        return Err(StorageError::TooManyGrants);
                    }
                    self.check_charge(caller, GRANT_OVERHEAD_BYTES, limits)?;
                }
                txn.open_table(STORAGE)?
                    .insert(id.0, next.encode().as_slice())?;
                Ok(AssetApplied::Granted(true))
            }
            AssetChange::Quota { owner, quota } => {
                let mut table = txn.open_table(QUOTAS)?;
                if *quota == Quota::default() {
                    table.remove(&owner.0)?;
                } else {
                    table.insert(&owner.0, encode_quota(quota).as_slice())?;
                }
                Ok(AssetApplied::Quota)
            }
        }
    }

    /// Whether `owner` may be charged `more` bytes (its quota and the
    /// node's bound).
    fn check_charge(
        &self,
        owner: &Owner,
        more: u64,
        limits: &AllocLimits,
    ) -> Result<(), StorageError> {
        let used = self.used_by(owner);
        let limit = self
            .quotas
            .get(owner)
            .and_then(|quota| quota.storage)
            .unwrap_or(limits.default_quota);
        if used.saturating_add(more) > limit {
            return Err(StorageError::QuotaExceeded {
                limit,
                used,
                asked: more,
            });
        }
        if self.charged.saturating_add(more) > limits.node_max {
            return Err(StorageError::NodeFull {
                limit: limits.node_max,
            });
        }
        Ok(())
    }

    /// Take in `change`, which [`Self::write`] wrote, answering `applied`.
    pub(crate) fn absorb(&mut self, change: AssetChange, applied: &AssetApplied) {
        // A VM's module hashed before a change to its bytes is hashed again
        // before its next call.
        if let AssetChange::Write { id, .. }
        | AssetChange::Cas { id, .. }
        | AssetChange::Free { id, .. } = &change
        {
            self.checked_modules
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(id);
        }
        match (change, applied) {
            (
                AssetChange::Alloc {
                    owner, size, name, ..
                },
                AssetApplied::Allocated(id),
            ) => {
                self.next = sequence_of(*id).map_or(self.next, |seq| seq + 1);
                self.take(
                    *id,
                    Record {
                        owner,
                        size,
                        grants: Vec::new(),
                        name,
                    },
                );
            }
            (AssetChange::Free { id, .. }, AssetApplied::Freed(_)) => {
                if let Some(record) = self.records.remove(&id) {
                    if record.name.is_some()
                        && let Some(named) = self.named.get_mut(&record.owner)
                    {
                        *named -= 1;
                        if *named == 0 {
                            self.named.remove(&record.owner);
                        }
                    }
                    self.release(&record.owner, record.charge());
                    self.bytes -= record.size;
                    self.freed_assets += 1;
                    self.freed_bytes += record.size;
                    if let Some(ids) = self.by_owner.get_mut(&record.owner) {
                        ids.remove(&id);
                        if ids.is_empty() {
                            self.by_owner.remove(&record.owner);
                        }
                    }
                }
            }
            (
                AssetChange::Grant {
                    id,
                    grantee,
                    access,
                    ..
                },
                AssetApplied::Granted(true),
            ) => {
                let Some(record) = self.records.get(&id) else {
                    return;
                };
                let Some(next) = granted(record, &grantee, access) else {
                    return;
                };
                let (before, after) = (record.charge(), next.charge());
                let owner = next.owner;
                self.records.insert(id, next);
                if after >= before {
                    *self.used.entry(owner).or_default() += after - before;
                    self.charged += after - before;
                } else {
                    self.release(&owner, before - after);
                }
            }
            (AssetChange::Quota { owner, quota }, AssetApplied::Quota) => {
                if quota == Quota::default() {
                    self.quotas.remove(&owner);
                } else {
                    self.quotas.insert(owner, quota);
                }
            }
            // Bytes written live in the store only.
            _ => {}
        }
    }

    fn release(&mut self, owner: &Owner, charge: u64) {
        self.charged -= charge;
        if let Some(used) = self.used.get_mut(owner) {
            *used -= charge;
            if *used == 0 {
                self.used.remove(owner);
            }
        }
    }
}

/// `record` with `grantee`'s access set to `access` (`None` withdraws);
/// `None` when that changes nothing.
fn granted(record: &Record, grantee: &Owner, access: Option<Access>) -> Option<Record> {
    let now = record
        .grants
        .iter()
        .find(|(g, _)| g == grantee)
        .map(|(_, a)| *a);
    if now == access {
        return None;
    }
    let mut next = record.clone();
    next.grants.retain(|(g, _)| g != grantee);
    if let Some(access) = access {
        next.grants.push((*grantee, access));
    }
    Some(next)
}

/// Call `f(chunk, offset within it, offset in the range, bytes)` for each
/// chunk that bytes `offset..offset + len` touch.
fn for_chunks(
    offset: u64,
    len: u64,
    mut f: impl FnMut(u64, usize, usize, usize) -> Result<(), StorageError>,
) -> Result<(), StorageError> {
    let mut at = 0u64;
    while at < len {
        let position = offset + at;
        let chunk = position / CHUNK_LEN;
        let within = position % CHUNK_LEN;
        let n = (CHUNK_LEN - within).min(len - at);
        f(chunk, within as usize, at as usize, n as usize)?;
        at += n;
    }
    Ok(())
}

/// Fill `out` from `stored` (a chunk, possibly shorter than the chunk's
/// extent: what lies past it reads as zeros) from `within`.
fn copy_from_chunk(stored: &[u8], within: usize, out: &mut [u8]) {
    let available = stored.len().saturating_sub(within).min(out.len());
    if available > 0 {
        out[..available].copy_from_slice(&stored[within..within + available]);
    }
}

/// Write `data` at `offset` of `id`'s chunks in `txn`.
fn write_bytes(
    txn: &WriteTransaction,
    id: AssetId,
    offset: u64,
    data: &[u8],
) -> Result<(), StorageError> {
    let mut chunks = txn.open_table(CHUNKS)?;
    for_chunks(offset, data.len() as u64, |chunk, within, at, n| {
        let mut bytes = chunks
            .get((id.0, chunk))?
            .map(|v| v.value().to_vec())
            .unwrap_or_default();
        if bytes.len() < within + n {
            bytes.resize(within + n, 0);
        }
        bytes[within..within + n].copy_from_slice(&data[at..at + n]);
        chunks.insert((id.0, chunk), bytes.as_slice())?;
        Ok(())
    })
}

/// Bytes `offset..offset + len` of `id` from `chunks` (of a read or the
/// write transaction).
fn read_chunks(
    chunks: &impl ReadableTable<(u64, u64), &'static [u8]>,
    id: AssetId,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, StorageError> {
    let mut out = vec![0u8; len];
    for_chunks(offset, len as u64, |chunk, within, at, n| {
        if let Some(stored) = chunks.get((id.0, chunk))? {
            copy_from_chunk(stored.value(), within, &mut out[at..at + n]);
        }
        Ok(())
    })?;
    Ok(out)
}

/// Bytes `offset..offset + len` of storage asset `id` as `txn` sees them:
/// the caller checked the access and the range.
pub(crate) fn read_in(
    txn: &ReadTransaction,
    id: AssetId,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, StorageError> {
    read_chunks(&txn.open_table(CHUNKS)?, id, offset, len)
}

/// How many rows the chunk table holds (tests: a free leaves none).
#[cfg(test)]
pub(crate) fn chunk_rows(db: &Database) -> u64 {
    let txn = db.begin_read().unwrap();
    txn.open_table(CHUNKS).unwrap().len().unwrap()
}

#[cfg(test)]
mod tests;
