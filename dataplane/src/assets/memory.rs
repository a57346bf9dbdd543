//! Memory assets: regions of bytes a node holds for their owner. They are
//! not durable: a restart releases them (their identifiers then answer
//! [`AssetError::Released`]).
//!
//! A [`MemoryShard`] is one worker's: the regions it holds and the
//! identifiers it hands out, owned by its thread with no lock. What the
//! shards share is read-mostly or counted: the [`QuotaLedger`] (the
//! operator's limits, swapped whole, and each owner's usage in atomics, so
//! a quota holds across workers) and the [`BlockReserve`] (blocks of
//! identifiers, handed to shards one at a time).

use super::address::{
    AssetAddress, AssetId, BLOCK_LEN, Locator, NodeNumber,
    STORAGE_BLOCKS_FIRST as MEMORY_BLOCKS_END,
};
use super::region::RegionBytes;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The largest memory asset: one bulk read of it is the benchmark's 1 GiB.
pub const REGION_BYTES_MAX: u64 = 1 << 30;
/// Assets one owner may hold on a node at once, whatever their size.
pub const ASSETS_PER_OWNER_MAX: u64 = 1 << 20;
/// What the quota charges for an asset beside its bytes: its entry in the
/// shard's tables and its allocation's header, rounded up.
pub const ASSET_OVERHEAD_BYTES: u64 = 256;
/// What the quota charges for one grant.
pub const GRANT_OVERHEAD_BYTES: u64 = 64;
/// Grants one asset may carry.
pub const GRANTS_PER_ASSET_MAX: usize = 64;

/// Who owns an asset: SHA-256 of the owner's certificate key (its
/// SubjectPublicKeyInfo), the identity of the admission ledger.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Owner(pub [u8; 32]);

/// What a grant lets another identity do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    /// Read and write (a writer may read what it writes).
    Write,
}

impl Access {
    /// As the wire and the store write it: 1 read, 2 write.
    pub fn byte(self) -> u8 {
        match self {
            Access::Read => 1,
            Access::Write => 2,
        }
    }

    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Access::Read),
            2 => Some(Access::Write),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssetError {
    #[error("{0}: no such asset")]
    Unknown(AssetAddress),
    #[error("{0}: released (freed, its lease expired, or the node restarted)")]
    Released(AssetAddress),
    #[error("{address}: held by the node of locator {locator:?}, not this one")]
    Elsewhere {
        address: AssetAddress,
        locator: Locator,
    },
    #[error("{0}: neither owned by this identity nor granted to it")]
    Forbidden(AssetAddress),
    #[error("{address}: bytes {offset}..{end} are outside its {size} bytes")]
    OutOfRange {
        address: AssetAddress,
        offset: u64,
        end: u64,
        size: u64,
    },
    #[error(
        "memory quota exceeded: {used} of {limit} bytes in use, {asked} more asked (each asset counts {ASSET_OVERHEAD_BYTES} bytes beside its size, each grant {GRANT_OVERHEAD_BYTES})"
    )]
    QuotaExceeded { limit: u64, used: u64, asked: u64 },
    #[error("this node holds all the memory assets it may ({limit} bytes); try again later")]
    NodeFull { limit: u64 },
    #[error("at most {ASSETS_PER_OWNER_MAX} memory assets per owner on a node")]
    TooManyAssets,
    #[error("a memory asset holds 1 to {REGION_BYTES_MAX} bytes, not {0}")]
    Size(u64),
    #[error("compare-and-swap: expected and new values differ in length ({expected} and {new})")]
    CasLength { expected: usize, new: usize },
    #[error("at most {GRANTS_PER_ASSET_MAX} grants per asset")]
    TooManyGrants,
    #[error("this node has handed out every asset identifier it reserved; try again shortly")]
    IdsExhausted,
}

/// One owner's memory in use on this node, counted across workers.
#[derive(Debug, Default)]
pub struct Usage {
    bytes: AtomicU64,
    assets: AtomicU64,
}

impl Usage {
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn assets(&self) -> u64 {
        self.assets.load(Ordering::Relaxed)
    }
}

/// The operator's memory quotas and every owner's usage on this node.
#[derive(Debug)]
pub struct QuotaLedger {
    /// Per-owner limits in bytes, replaced whole when the operator sets one.
    limits: ArcSwap<HashMap<Owner, u64>>,
    /// The limit of an owner the operator set none for.
    default_bytes: u64,
    /// Taken once per owner per shard (a shard keeps the `Arc`).
    usage: Mutex<HashMap<Owner, Arc<Usage>>>,
    /// Every owner's bytes together, and their bound on this node.
    node_bytes: AtomicU64,
    node_limit: u64,
}

impl QuotaLedger {
    /// `default_bytes` per owner the operator set no limit for, and
    /// `node_limit` for all owners together.
    pub fn new(default_bytes: u64, node_limit: u64) -> Self {
        Self {
            limits: ArcSwap::from_pointee(HashMap::new()),
            default_bytes,
            usage: Mutex::new(HashMap::new()),
            node_bytes: AtomicU64::new(0),
            node_limit,
        }
    }

    /// Replace the operator's limits (the control plane, from its store).
    pub fn set_limits(&self, limits: HashMap<Owner, u64>) {
        self.limits.store(Arc::new(limits));
    }

    pub fn limit(&self, owner: &Owner) -> u64 {
        self.limits
            .load()
            .get(owner)
            .copied()
            .unwrap_or(self.default_bytes)
    }

    pub fn usage(&self, owner: &Owner) -> Arc<Usage> {
        let mut usage = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        usage.entry(*owner).or_default().clone()
    }

    /// Take `bytes` and one asset of `owner`'s quota, or refuse with
    /// nothing taken.
    fn reserve(&self, owner: &Owner, usage: &Usage, bytes: u64) -> Result<(), AssetError> {
        if usage.assets.fetch_add(1, Ordering::Relaxed) >= ASSETS_PER_OWNER_MAX {
            usage.assets.fetch_sub(1, Ordering::Relaxed);
            return Err(AssetError::TooManyAssets);
        }
        self.reserve_bytes(owner, usage, bytes).inspect_err(|_| {
            usage.assets.fetch_sub(1, Ordering::Relaxed);
        })
    }

    /// Take `bytes` of `owner`'s quota and of the node's, or refuse with
    /// nothing taken.
    fn reserve_bytes(&self, owner: &Owner, usage: &Usage, bytes: u64) -> Result<(), AssetError> {
        take_within(&usage.bytes, bytes, self.limit(owner)).map_err(|(used, limit)| {
            AssetError::QuotaExceeded {
                limit,
                used,
                asked: bytes,
            }
        })?;
        take_within(&self.node_bytes, bytes, self.node_limit).map_err(|(_, limit)| {
            usage.bytes.fetch_sub(bytes, Ordering::Relaxed);
            AssetError::NodeFull { limit }
        })
    }

    fn release_bytes(&self, usage: &Usage, bytes: u64) {
        usage.bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.node_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    fn release(&self, usage: &Usage, bytes: u64) {
        self.release_bytes(usage, bytes);
        usage.assets.fetch_sub(1, Ordering::Relaxed);
    }

    /// Hold `bytes` of `owner`'s quota (and the node's) outside the
    /// shards, until the [`Held`] drops: a VM instance's memory while its
    /// call runs. Refused with nothing taken past either limit.
    pub fn hold(&self, owner: &Owner, bytes: u64) -> Result<Held<'_>, AssetError> {
        let usage = self.usage(owner);
        self.reserve_bytes(owner, &usage, bytes)?;
        Ok(Held {
            ledger: self,
            usage,
            bytes,
        })
    }
}

/// Bytes of an owner's memory quota held by [`QuotaLedger::hold`].
#[derive(Debug)]
pub struct Held<'a> {
    ledger: &'a QuotaLedger,
    usage: Arc<Usage>,
    bytes: u64,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.ledger.release_bytes(&self.usage, self.bytes);
    }
}

/// Add `n` to `counter` unless that passes `limit`; else the count and the
/// limit.
fn take_within(counter: &AtomicU64, n: u64, limit: u64) -> Result<(), (u64, u64)> {
    counter
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
            used.checked_add(n).filter(|&total| total <= limit)
        })
        .map(|_| ())
        .map_err(|used| (used, limit))
}

/// Blocks of identifiers a node may hand out this run: from `base` (its
/// durable high-water mark at start) to what it has reserved since (the
/// control plane writes a reservation before it extends
/// [`Self::reserved_until`]). Shard `i` of `n` takes blocks `base + i`,
/// `base + i + n`, … so the shard that holds an identifier follows from it.
#[derive(Debug)]
pub struct BlockReserve {
    node: NodeNumber,
    base: u64,
    shards: u64,
    reserved_until: AtomicU64,
    /// One past the highest block handed out.
    high: AtomicU64,
}

impl BlockReserve {
    /// Blocks `base..reserved_until` may be handed out, among `shards`.
    pub fn new(node: NodeNumber, base: u64, shards: usize, reserved_until: u64) -> Self {
        assert!(shards > 0, "at least one shard");
        Self {
            node,
            base,
            shards: shards as u64,
            reserved_until: AtomicU64::new(reserved_until.min(MEMORY_BLOCKS_END)),
            high: AtomicU64::new(base),
        }
    }

    /// One past the highest block handed out: every identifier of this node
    /// below it may have been in use.
    pub fn high(&self) -> u64 {
        self.high.load(Ordering::Relaxed)
    }

    /// The control plane reserved blocks up to `until` durably.
    pub fn extend(&self, until: u64) {
        self.reserved_until
            .fetch_max(until.min(MEMORY_BLOCKS_END), Ordering::Relaxed);
    }

    /// Shard `shard`'s `nth` block, if reserved.
    fn block(&self, shard: u64, nth: u64) -> Option<u64> {
        let block = nth
            .checked_mul(self.shards)?
            .checked_add(self.base + shard)?;
        if block >= self.reserved_until.load(Ordering::Relaxed) {
            return None;
        }
        self.high.fetch_max(block + 1, Ordering::Relaxed);
        Some(block)
    }

    /// The shard that hands out (and holds) `id`, if this run could have.
    pub fn shard_of(&self, id: AssetId) -> Option<usize> {
        if id.node() != self.node.get() || id.block() < self.base {
            return None;
        }
        Some(((id.block() - self.base) % self.shards) as usize)
    }
}

struct Region {
    owner: Owner,
    usage: Arc<Usage>,
    /// What the quotas hold for it: its size, [`ASSET_OVERHEAD_BYTES`] and
    /// [`GRANT_OVERHEAD_BYTES`] per grant.
    charged: u64,
    bytes: RegionBytes,
    grants: Vec<(Owner, Access)>,
}

impl Region {
    fn may(&self, who: &Owner, access: Access) -> bool {
        *who == self.owner
            || self
                .grants
                .iter()
                .any(|(g, a)| g == who && (*a == Access::Write || access == Access::Read))
    }
}

/// What `list` tells an owner about one asset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryAssetInfo {
    pub address: AssetAddress,
    pub size: u64,
    pub grants: usize,
}

/// A range of a region a read may see, while its shard is held.
pub struct Span<'a> {
    bytes: &'a RegionBytes,
    range: std::ops::Range<usize>,
}

impl Span<'_> {
    pub fn len(&self) -> usize {
        self.range.len()
    }

    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }

    /// The bytes, copied into `out`.
    pub fn copy_to(&self, out: &mut impl bytes::BufMut) {
        self.bytes.copy_to(self.range.clone(), out);
    }

    /// The bytes as pieces appended to `out`, sharing the region's chunks
    /// (no copy; a later write to the region does not change them).
    pub fn share(&self, out: &mut Vec<bytes::Bytes>) {
        self.bytes.share(self.range.clone(), out);
    }

    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        self.copy_to(&mut out);
        out
    }
}

/// One worker's memory assets. See the module documentation.
pub struct MemoryShard {
    locator: Locator,
    ledger: Arc<QuotaLedger>,
    reserve: Arc<BlockReserve>,
    index: u64,
    /// Blocks taken so far.
    blocks_taken: u64,
    /// The block being handed out and the next offset in it.
    block: Option<(u64, u64)>,
    regions: HashMap<AssetId, Region>,
    /// The bytes of every region held.
    bytes_held: u64,
    /// Each owner with assets here: its usage counters (taken from the
    /// ledger once) and its assets, so that listing or releasing an
    /// owner's assets costs what it holds, not what the shard holds.
    owners: HashMap<Owner, Owned>,
}

struct Owned {
    usage: Arc<Usage>,
    ids: std::collections::HashSet<AssetId>,
}

impl MemoryShard {
    /// Shard `index` of those `reserve` was made for.
    pub fn new(
        locator: Locator,
        ledger: Arc<QuotaLedger>,
        reserve: Arc<BlockReserve>,
        index: usize,
    ) -> Self {
        assert!(
            (index as u64) < reserve.shards,
            "shard {index} of {}",
            reserve.shards
        );
        Self {
            locator,
            ledger,
            reserve,
            index: index as u64,
            blocks_taken: 0,
            block: None,
            regions: HashMap::new(),
            bytes_held: 0,
            owners: HashMap::new(),
        }
    }

    /// Memory assets this shard holds.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// A zeroed region of `size` bytes for `owner`, within its quota.
    pub fn alloc(&mut self, owner: &Owner, size: u64) -> Result<AssetAddress, AssetError> {
        if size == 0 || size > REGION_BYTES_MAX {
            return Err(AssetError::Size(size));
        }
        let usage = match self.owners.get(owner) {
            Some(owned) => owned.usage.clone(),
            None => self.ledger.usage(owner),
        };
        let charged = size + ASSET_OVERHEAD_BYTES;
        self.ledger.reserve(owner, &usage, charged)?;
        let Some(id) = self.next_id() else {
            self.ledger.release(&usage, charged);
            return Err(AssetError::IdsExhausted);
        };
        self.owners
            .entry(*owner)
            .or_insert_with(|| Owned {
                usage: usage.clone(),
                ids: Default::default(),
            })
            .ids
            .insert(id);
        let region = Region {
            owner: *owner,
            usage,
            charged,
            bytes: RegionBytes::zeroed(size as usize),
            grants: Vec::new(),
        };
        self.regions.insert(id, region);
        self.bytes_held += size;
        Ok(AssetAddress {
            locator: self.locator,
            id,
        })
    }

    fn next_id(&mut self) -> Option<AssetId> {
        let (block, offset) = match self.block {
            Some((block, offset)) if offset < BLOCK_LEN => (block, offset),
            _ => {
                let block = self.reserve.block(self.index, self.blocks_taken)?;
                self.blocks_taken += 1;
                (block, 0)
            }
        };
        self.block = Some((block, offset + 1));
        Some(AssetId::new(self.reserve.node, block, offset as u16))
    }

    /// Free an asset its owner holds; its bytes return to the quota.
    pub fn free(&mut self, who: &Owner, address: AssetAddress) -> Result<u64, AssetError> {
        let region = self.region(address)?;
        if region.owner != *who {
            return Err(AssetError::Forbidden(address));
        }
        let region = self.regions.remove(&address.id).expect("found above");
        if let Some(owned) = self.owners.get_mut(who) {
            owned.ids.remove(&address.id);
            if owned.ids.is_empty() {
                self.owners.remove(who);
            }
        }
        Ok(self.released(&region))
    }

    /// Return a removed region's charge to the quotas: its size.
    fn released(&mut self, region: &Region) -> u64 {
        let size = region.bytes.len() as u64;
        self.ledger.release(&region.usage, region.charged);
        self.bytes_held -= size;
        size
    }

    /// `len` bytes from `offset`, for the owner or a grantee: copied by
    /// [`Span::copy_to`] or shared by [`Span::share`].
    pub fn read(
        &self,
        who: &Owner,
        address: AssetAddress,
        offset: u64,
        len: u64,
    ) -> Result<Span<'_>, AssetError> {
        let region = self.allowed(who, address, Access::Read)?;
        let range = span(address, region, offset, len)?;
        Ok(Span {
            bytes: &region.bytes,
            range,
        })
    }

    /// Write `data` at `offset`, for the owner or a writer.
    pub fn write(
        &mut self,
        who: &Owner,
        address: AssetAddress,
        offset: u64,
        data: &[u8],
    ) -> Result<(), AssetError> {
        self.allowed(who, address, Access::Write)?;
        let region = self.regions.get_mut(&address.id).expect("allowed above");
        let range = span(address, region, offset, data.len() as u64)?;
        region.bytes.write(range.start, data);
        Ok(())
    }

    /// Replace `expected` at `offset` with `new` if the bytes there are
    /// `expected`; either way, the bytes that were there.
    pub fn compare_and_swap(
        &mut self,
        who: &Owner,
        address: AssetAddress,
        offset: u64,
        expected: &[u8],
        new: &[u8],
    ) -> Result<(bool, Vec<u8>), AssetError> {
        if expected.len() != new.len() {
            return Err(AssetError::CasLength {
                expected: expected.len(),
                new: new.len(),
            });
        }
        self.allowed(who, address, Access::Write)?;
        let region = self.regions.get_mut(&address.id).expect("allowed above");
        let range = span(address, region, offset, new.len() as u64)?;
        let mut was = Vec::with_capacity(range.len());
        region.bytes.copy_to(range.clone(), &mut was);
        let swapped = was == expected;
        if swapped {
            region.bytes.write(range.start, new);
        }
        Ok((swapped, was))
    }

    /// Let `grantee` read (or write) an asset `who` owns; a second grant to
    /// the same identity replaces the first. Whether it changed anything.
    pub fn grant(
        &mut self,
        who: &Owner,
        address: AssetAddress,
        grantee: Owner,
        access: Access,
    ) -> Result<bool, AssetError> {
        let ledger = self.ledger.clone();
        let region = self.owned_mut(who, address)?;
        if let Some(grant) = region.grants.iter_mut().find(|(g, _)| *g == grantee) {
            let changed = grant.1 != access;
            grant.1 = access;
            return Ok(changed);
        }
        if region.grants.len() >= GRANTS_PER_ASSET_MAX {
            return Err(AssetError::TooManyGrants);
        }
        ledger.reserve_bytes(who, &region.usage, GRANT_OVERHEAD_BYTES)?;
        region.charged += GRANT_OVERHEAD_BYTES;
        region.grants.push((grantee, access));
        Ok(true)
    }

    /// Withdraw `grantee`'s grant; whether it had one.
    pub fn revoke_grant(
        &mut self,
        who: &Owner,
        address: AssetAddress,
        grantee: &Owner,
    ) -> Result<bool, AssetError> {
        let ledger = self.ledger.clone();
        let region = self.owned_mut(who, address)?;
        let before = region.grants.len();
        region.grants.retain(|(g, _)| g != grantee);
        let withdrawn = region.grants.len() != before;
        if withdrawn {
            ledger.release_bytes(&region.usage, GRANT_OVERHEAD_BYTES);
            region.charged -= GRANT_OVERHEAD_BYTES;
        }
        Ok(withdrawn)
    }

    /// The assets `owner` holds in this shard, by address.
    pub fn list(&self, owner: &Owner) -> Vec<MemoryAssetInfo> {
        let Some(owned) = self.owners.get(owner) else {
            return Vec::new();
        };
        let mut out: Vec<MemoryAssetInfo> = owned
            .ids
            .iter()
            .filter_map(|id| Some((id, self.regions.get(id)?)))
            .map(|(id, r)| MemoryAssetInfo {
                address: AssetAddress {
                    locator: self.locator,
                    id: *id,
                },
                size: r.bytes.len() as u64,
                grants: r.grants.len(),
            })
            .collect();
        out.sort_by_key(|a| a.address);
        out
    }

    /// Release everything `owner` holds here (its lease ended): the number
    /// of assets and bytes released.
    pub fn release_owner(&mut self, owner: &Owner) -> (u64, u64) {
        let Some(owned) = self.owners.remove(owner) else {
            return (0, 0);
        };
        let mut released = (0, 0);
        for id in owned.ids {
            if let Some(region) = self.regions.remove(&id) {
                released = (released.0 + 1, released.1 + self.released(&region));
            }
        }
        released
    }

    fn region(&self, address: AssetAddress) -> Result<&Region, AssetError> {
        if address.locator != self.locator {
            return Err(AssetError::Elsewhere {
                address,
                locator: address.locator,
            });
        }
        self.regions.get(&address.id).ok_or_else(|| {
            // Identifiers of this node in a block already handed out may
            // have been in use: released. Any other is not one of ours.
            let ours = address.id.node() == self.reserve.node.get()
                && address.id.block() < self.reserve.high();
            if ours {
                AssetError::Released(address)
            } else {
                AssetError::Unknown(address)
            }
        })
    }

    fn allowed(
        &self,
        who: &Owner,
        address: AssetAddress,
        access: Access,
    ) -> Result<&Region, AssetError> {
        let region = self.region(address)?;
        if region.may(who, access) {
            Ok(region)
        } else {
            Err(AssetError::Forbidden(address))
        }
    }

    fn owned_mut(&mut self, who: &Owner, address: AssetAddress) -> Result<&mut Region, AssetError> {
        if self.region(address)?.owner != *who {
            return Err(AssetError::Forbidden(address));
        }
        Ok(self.regions.get_mut(&address.id).expect("found above"))
    }
}

/// Assets one `list` answers with at most (about 90 bytes each as JSON).
pub const LIST_LEN_MAX: usize = 10_000;

/// How long an owner's memory assets outlive its last connection.
pub const LEASE_GRACE: Duration = Duration::from_secs(30);

/// Every worker's shard, and the owners' leases: what the workers share.
/// Each shard has its own lock, taken for one request's copy at a time; a
/// worker allocates in its own shard, so allocations do not contend.
pub struct MemoryAssets {
    shards: Box<[Mutex<MemoryShard>]>,
    reserve: Arc<BlockReserve>,
    ledger: Arc<QuotaLedger>,
    locator: Locator,
    leases: Mutex<Leases>,
    grace: Duration,
    lease_released_assets: AtomicU64,
    lease_released_bytes: AtomicU64,
    /// The clock's origin for the two fields below.
    epoch: Instant,
    /// When the next sweep may run, in ms after `epoch` (checked without a
    /// lock on every worker poll).
    sweep_due_ms: AtomicU64,
    /// Owners whose grace is running.
    expiring: AtomicU64,
    /// The storage assets' totals, as the control plane last published them.
    storage: super::StorageGauge,
    /// Whether the control plane serves storage assets (a single node's
    /// does; a cluster member's not yet).
    serves_storage: std::sync::atomic::AtomicBool,
    /// Whether the control plane proxies requests for other members'
    /// assets (a cluster member's does).
    proxies: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Leases {
    /// Owners with assets or connections: open connections, or since when
    /// they have had none.
    owners: HashMap<Owner, Lease>,
}

/// How often leases are swept, at most.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Clone, Copy)]
enum Lease {
    Connected(u32),
    Since(Instant),
}

/// Totals across shards, for `stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryTotals {
    pub assets: u64,
    pub bytes: u64,
    pub owners: u64,
    /// Assets released because their owner's lease ended.
    pub lease_released_assets: u64,
    pub lease_released_bytes: u64,
    /// The storage assets (held by the control plane's store).
    #[serde(default)]
    pub storage: super::StorageTotals,
}

impl MemoryAssets {
    /// One shard per worker; identifiers from block `base` of `node` up to
    /// `reserved_until`; `quota_bytes` for each owner the operator set no
    /// quota for, and `node_bytes` for all owners together.
    pub fn new(
        node: NodeNumber,
        locator: Locator,
        workers: usize,
        (base, reserved_until): (u64, u64),
        (quota_bytes, node_bytes): (u64, u64),
    ) -> Self {
        let ledger = Arc::new(QuotaLedger::new(quota_bytes, node_bytes));
        let reserve = Arc::new(BlockReserve::new(node, base, workers, reserved_until));
        let shards = (0..workers)
            .map(|i| {
                Mutex::new(MemoryShard::new(
                    locator,
                    ledger.clone(),
                    reserve.clone(),
                    i,
                ))
            })
            .collect();
        Self {
            shards,
            reserve,
            ledger,
            locator,
            leases: Mutex::new(Leases::default()),
            grace: LEASE_GRACE,
            lease_released_assets: AtomicU64::new(0),
            lease_released_bytes: AtomicU64::new(0),
            epoch: Instant::now(),
            sweep_due_ms: AtomicU64::new(0),
            expiring: AtomicU64::new(0),
            storage: super::StorageGauge::default(),
            serves_storage: std::sync::atomic::AtomicBool::new(false),
            proxies: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// What the shards hold, and what leases released, for `stats`.
    pub fn totals(&self) -> MemoryTotals {
        let (mut assets, mut bytes) = (0, 0);
        for shard in self.shards.iter() {
            let shard = lock(shard);
            assets += shard.len() as u64;
            bytes += shard.bytes_held;
        }
        MemoryTotals {
            assets,
            bytes,
            owners: lock(&self.leases).owners.len() as u64,
            lease_released_assets: self.lease_released_assets.load(Ordering::Relaxed),
            lease_released_bytes: self.lease_released_bytes.load(Ordering::Relaxed),
            storage: self.storage.load(),
        }
    }

    /// The control plane serves storage assets from now on.
    pub fn set_serves_storage(&self) {
        self.serves_storage.store(true, Ordering::Relaxed);
    }

    pub fn serves_storage(&self) -> bool {
        self.serves_storage.load(Ordering::Relaxed)
    }

    /// The control plane proxies requests for other locators from now on
    /// (to the member that holds each).
    pub fn set_proxies(&self) {
        self.proxies.store(true, Ordering::Relaxed);
    }

    pub fn proxies(&self) -> bool {
        self.proxies.load(Ordering::Relaxed)
    }

    /// Where the control plane publishes the storage assets' totals.
    pub fn storage_gauge(&self) -> &super::StorageGauge {
        &self.storage
    }

    /// The same with a lease grace other than [`LEASE_GRACE`] (tests).
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    pub fn ledger(&self) -> &QuotaLedger {
        &self.ledger
    }

    pub fn locator(&self) -> Locator {
        self.locator
    }

    /// Allocate in `worker`'s shard (the caller's: no contention).
    pub fn alloc(
        &self,
        worker: usize,
        owner: &Owner,
        size: u64,
    ) -> Result<AssetAddress, AssetError> {
        let shard = &self.shards[worker % self.shards.len()];
        lock(shard).alloc(owner, size)
    }

    /// Run `f` on the shard that holds `address`.
    pub fn with<R>(
        &self,
        address: AssetAddress,
        f: impl FnOnce(&mut MemoryShard) -> Result<R, AssetError>,
    ) -> Result<R, AssetError> {
        if address.locator != self.locator {
            return Err(AssetError::Elsewhere {
                address,
                locator: address.locator,
            });
        }
        match self.reserve.shard_of(address.id) {
            Some(shard) => f(&mut lock(&self.shards[shard])),
            None if address.id.node() == self.reserve.node.get() => {
                // Of an earlier run of this node: memory does not survive.
                Err(AssetError::Released(address))
            }
            None => Err(AssetError::Unknown(address)),
        }
    }

    /// What `owner` holds on this node, by address: the first
    /// [`LIST_LEN_MAX`].
    pub fn list(&self, owner: &Owner) -> Vec<MemoryAssetInfo> {
        let mut all: Vec<MemoryAssetInfo> = self
            .shards
            .iter()
            .flat_map(|shard| lock(shard).list(owner))
            .collect();
        all.sort_by_key(|a| a.address);
        all.truncate(LIST_LEN_MAX);
        all
    }

    /// A connection of `owner` opened: its assets stay while it is open.
    pub fn connected(&self, owner: &Owner) {
        let mut leases = lock(&self.leases);
        let lease = leases.owners.entry(*owner).or_insert(Lease::Connected(0));
        *lease = match *lease {
            Lease::Connected(n) => Lease::Connected(n + 1),
            Lease::Since(_) => {
                self.expiring.fetch_sub(1, Ordering::Relaxed);
                Lease::Connected(1)
            }
        };
    }

    /// A connection of `owner` closed; with its last one, the grace starts.
    pub fn disconnected(&self, owner: &Owner, now: Instant) {
        let mut leases = lock(&self.leases);
        if let Some(lease) = leases.owners.get_mut(owner) {
            *lease = match *lease {
                Lease::Connected(n) if n > 1 => Lease::Connected(n - 1),
                Lease::Connected(_) => {
                    self.expiring.fetch_add(1, Ordering::Relaxed);
                    Lease::Since(now)
                }
                since @ Lease::Since(_) => since,
            };
        }
    }

    /// When a worker should next call [`Self::poll_leases`]: while some
    /// owner's grace runs, at the next sweep.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (self.expiring.load(Ordering::Relaxed) > 0)
            .then(|| self.epoch + Duration::from_millis(self.sweep_due_ms.load(Ordering::Relaxed)))
    }

    /// Release the assets of owners whose grace has passed. At most one
    /// sweep per [`SWEEP_INTERVAL`] runs, on whichever worker calls first;
    /// the others return without a lock, so every worker may call it on
    /// every poll.
    pub fn poll_leases(&self, now: Instant) {
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        let due = self.sweep_due_ms.load(Ordering::Relaxed);
        if now_ms < due
            || self.expiring.load(Ordering::Relaxed) == 0
            || self
                .sweep_due_ms
                .compare_exchange(
                    due,
                    now_ms + SWEEP_INTERVAL.as_millis() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return;
        }
        // Released with the lease table locked: an owner that connects
        // again meanwhile waits, and keeps what it allocates after.
        let mut leases = lock(&self.leases);
        let grace = self.grace;
        let expired: Vec<Owner> = leases
            .owners
            .iter()
            .filter(
                |(_, l)| matches!(l, Lease::Since(t) if now.saturating_duration_since(*t) >= grace),
            )
            .map(|(o, _)| *o)
            .collect();
        for owner in &expired {
            leases.owners.remove(owner);
        }
        self.expiring
            .fetch_sub(expired.len() as u64, Ordering::Relaxed);
        for owner in expired {
            let (mut assets, mut bytes) = (0, 0);
            for shard in self.shards.iter() {
                let (a, b) = lock(shard).release_owner(&owner);
                assets += a;
                bytes += b;
            }
            self.lease_released_assets
                .fetch_add(assets, Ordering::Relaxed);
            self.lease_released_bytes
                .fetch_add(bytes, Ordering::Relaxed);
        }
    }
}

impl std::fmt::Debug for MemoryAssets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryAssets")
            .field("locator", &self.locator)
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a shard leaves it consistent: every method
    // checks before it changes anything.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The bytes `offset..offset + len` of `region`, or why not.
fn span(
    address: AssetAddress,
    region: &Region,
    offset: u64,
    len: u64,
) -> Result<std::ops::Range<usize>, AssetError> {
    let size = region.bytes.len() as u64;
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(offset as usize..end as usize),
        end => Err(AssetError::OutOfRange {
            address,
            offset,
            end: end.unwrap_or(u64::MAX),
            size,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: Owner = Owner([1; 32]);
    const BOB: Owner = Owner([2; 32]);

    fn node() -> NodeNumber {
        NodeNumber::new(3).unwrap()
    }

    fn locator() -> Locator {
        Locator::in_ula("fd71:7e57::".parse().unwrap(), node())
    }

    fn shards(n: usize, quota: u64, blocks: u64) -> (Arc<QuotaLedger>, Vec<MemoryShard>) {
        let ledger = Arc::new(QuotaLedger::new(quota, u64::MAX));
        let reserve = Arc::new(BlockReserve::new(node(), 10, n, 10 + blocks));
        let shards = (0..n)
            .map(|i| MemoryShard::new(locator(), ledger.clone(), reserve.clone(), i))
            .collect();
        (ledger, shards)
    }

    #[test]
    fn an_owner_writes_reads_back_and_frees() {
        let (ledger, mut s) = shards(1, 1 << 20, 4);
        let s = &mut s[0];
        let a = s.alloc(&ALICE, 4096).unwrap();
        assert_eq!(a.locator, locator());
        assert_eq!(s.read(&ALICE, a, 0, 4096).unwrap().to_vec(), &[0; 4096][..]);
        s.write(&ALICE, a, 100, b"hello").unwrap();
        assert_eq!(s.read(&ALICE, a, 98, 9).unwrap().to_vec(), b"\0\0hello\0\0");
        assert_eq!(ledger.usage(&ALICE).bytes(), 4096 + ASSET_OVERHEAD_BYTES);
        assert_eq!(s.list(&ALICE).len(), 1);
        assert_eq!(s.free(&ALICE, a), Ok(4096));
        assert_eq!(ledger.usage(&ALICE).bytes(), 0);
        assert_eq!(ledger.usage(&ALICE).assets(), 0);
        assert_eq!(
            s.read(&ALICE, a, 0, 1).map(|r| r.to_vec()),
            Err(AssetError::Released(a))
        );
        assert_eq!(s.free(&ALICE, a), Err(AssetError::Released(a)));
        assert!(s.is_empty());
    }

    #[test]
    fn bad_ranges_sizes_and_addresses_change_nothing() {
        let (ledger, mut s) = shards(1, 1 << 20, 4);
        let s = &mut s[0];
        let a = s.alloc(&ALICE, 16).unwrap();
        s.write(&ALICE, a, 0, b"0123456789abcdef").unwrap();
        for (offset, len) in [(0, 17), (16, 1), (u64::MAX, 1), (1, u64::MAX)] {
            assert!(
                matches!(
                    s.read(&ALICE, a, offset, len).map(|r| r.to_vec()),
                    Err(AssetError::OutOfRange { .. })
                ),
                "{offset} {len}"
            );
        }
        assert!(matches!(
            s.write(&ALICE, a, 10, b"0123456789"),
            Err(AssetError::OutOfRange {
                end: 20,
                size: 16,
                ..
            })
        ));
        assert_eq!(
            s.read(&ALICE, a, 0, 16).unwrap().to_vec(),
            b"0123456789abcdef"
        );
        assert_eq!(s.alloc(&ALICE, 0), Err(AssetError::Size(0)));
        assert_eq!(
            s.alloc(&ALICE, REGION_BYTES_MAX + 1),
            Err(AssetError::Size(REGION_BYTES_MAX + 1))
        );
        // Another node's identifier, one never handed out, another locator.
        let other_node = AssetAddress {
            locator: locator(),
            id: AssetId::new(NodeNumber::new(4).unwrap(), 10, 0),
        };
        let unused_block = AssetAddress {
            locator: locator(),
            id: AssetId::new(node(), 14, 0),
        };
        for forged in [other_node, unused_block] {
            assert_eq!(
                s.read(&ALICE, forged, 0, 1).map(|r| r.to_vec()),
                Err(AssetError::Unknown(forged))
            );
        }
        let moved = AssetAddress {
            locator: Locator(7),
            ..a
        };
        assert!(matches!(
            s.write(&ALICE, moved, 0, b"x"),
            Err(AssetError::Elsewhere { .. })
        ));
        assert_eq!(ledger.usage(&ALICE).bytes(), 16 + ASSET_OVERHEAD_BYTES);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn strangers_need_a_grant_and_only_get_what_it_says() {
        let (_, mut s) = shards(1, 1 << 20, 4);
        let s = &mut s[0];
        let a = s.alloc(&ALICE, 8).unwrap();
        let forbidden = Err(AssetError::Forbidden(a));
        assert_eq!(s.read(&BOB, a, 0, 1).map(|r| r.to_vec()), forbidden.clone());
        assert_eq!(
            s.write(&BOB, a, 0, b"x"),
            forbidden.clone().map(|_: Vec<u8>| ())
        );
        assert_eq!(s.free(&BOB, a), Err(AssetError::Forbidden(a)));
        assert_eq!(
            s.grant(&BOB, a, BOB, Access::Write),
            Err(AssetError::Forbidden(a))
        );
        assert!(s.list(&BOB).is_empty());

        assert_eq!(s.grant(&ALICE, a, BOB, Access::Read), Ok(true));
        assert_eq!(
            s.grant(&ALICE, a, BOB, Access::Read),
            Ok(false),
            "the same grant again"
        );
        assert_eq!(s.read(&BOB, a, 0, 1).unwrap().to_vec(), b"\0");
        assert_eq!(s.write(&BOB, a, 0, b"x"), Err(AssetError::Forbidden(a)));
        s.grant(&ALICE, a, BOB, Access::Write).unwrap();
        s.write(&BOB, a, 0, b"x").unwrap();
        assert_eq!(
            s.free(&BOB, a),
            Err(AssetError::Forbidden(a)),
            "a writer is not the owner"
        );
        assert_eq!(s.revoke_grant(&ALICE, a, &BOB), Ok(true));
        assert_eq!(s.revoke_grant(&ALICE, a, &BOB), Ok(false));
        assert_eq!(
            s.read(&BOB, a, 0, 1).map(|r| r.to_vec()),
            Err(AssetError::Forbidden(a))
        );
        assert_eq!(s.read(&ALICE, a, 0, 1).unwrap().to_vec(), b"x");
        for n in 0..GRANTS_PER_ASSET_MAX {
            s.grant(&ALICE, a, Owner([n as u8 + 10; 32]), Access::Read)
                .unwrap();
        }
        assert_eq!(
            s.grant(&ALICE, a, Owner([200; 32]), Access::Read),
            Err(AssetError::TooManyGrants)
        );
    }

    #[test]
    fn a_quota_holds_across_shards_and_frees_give_it_back() {
        const O: u64 = ASSET_OVERHEAD_BYTES;
        let (ledger, mut s) = shards(2, 2000, 4);
        let a = s[0].alloc(&ALICE, 600).unwrap();
        assert_eq!(
            s[1].alloc(&ALICE, 1000),
            Err(AssetError::QuotaExceeded {
                limit: 2000,
                used: 600 + O,
                asked: 1000 + O
            })
        );
        assert_eq!(ledger.usage(&ALICE).assets(), 1, "a refusal takes nothing");
        s[1].alloc(&BOB, 1000).unwrap();
        ledger.set_limits(HashMap::from([(ALICE, 4000)]));
        let b = s[1].alloc(&ALICE, 1400).unwrap();
        // A grant is charged too, and given back when withdrawn.
        s[1].grant(&ALICE, b, BOB, Access::Read).unwrap();
        assert_eq!(
            ledger.usage(&ALICE).bytes(),
            600 + 1400 + 2 * O + GRANT_OVERHEAD_BYTES
        );
        s[0].free(&ALICE, a).unwrap();
        assert_eq!(
            ledger.usage(&ALICE).bytes(),
            1400 + O + GRANT_OVERHEAD_BYTES
        );
        assert_eq!(s[1].release_owner(&ALICE), (1, 1400));
        assert_eq!(
            s[1].read(&ALICE, b, 0, 1).map(|r| r.to_vec()),
            Err(AssetError::Released(b))
        );
        assert_eq!(ledger.usage(&ALICE).bytes(), 0);
        assert_eq!(ledger.usage(&BOB).bytes(), 1000 + O);
        assert!(s[1].list(&ALICE).is_empty());
    }

    #[test]
    fn the_node_limit_holds_across_owners() {
        let ledger = Arc::new(QuotaLedger::new(10_000, 3 * (1000 + ASSET_OVERHEAD_BYTES)));
        let reserve = Arc::new(BlockReserve::new(node(), 0, 1, 4));
        let mut s = MemoryShard::new(locator(), ledger.clone(), reserve, 0);
        for owner in [ALICE, BOB, Owner([3; 32])] {
            s.alloc(&owner, 1000).unwrap();
        }
        let limit = 3 * (1000 + ASSET_OVERHEAD_BYTES);
        assert_eq!(
            s.alloc(&Owner([4; 32]), 1),
            Err(AssetError::NodeFull { limit })
        );
        assert_eq!(
            ledger.usage(&Owner([4; 32])).bytes(),
            0,
            "a refusal takes nothing"
        );
        assert_eq!(s.release_owner(&BOB), (1, 1000));
        s.alloc(&Owner([4; 32]), 1000).unwrap();
    }

    #[test]
    fn identifiers_are_never_handed_out_twice_and_run_out_cleanly() {
        let (ledger, mut s) = shards(2, u64::MAX, 4);
        let mut seen = std::collections::HashSet::new();
        // Four blocks between two shards: each shard takes whole blocks,
        // and an identifier names the shard that handed it out.
        for i in 0..(4 * BLOCK_LEN) {
            let shard = &mut s[(i % 2) as usize];
            let a = shard.alloc(&ALICE, 1).unwrap();
            assert!(seen.insert(a.id), "{a:?} handed out twice");
            assert_eq!(shard.reserve.shard_of(a.id), Some((i % 2) as usize));
            shard.free(&ALICE, a).unwrap();
        }
        let older_run = AssetId::new(node(), 9, 0);
        assert_eq!(s[0].reserve.shard_of(older_run), None);
        let exhausted = (0..BLOCK_LEN)
            .map(|i| s[(i % 2) as usize].alloc(&ALICE, 1))
            .find(Result::is_err);
        assert_eq!(exhausted, Some(Err(AssetError::IdsExhausted)));
        assert_eq!(ledger.usage(&ALICE).bytes(), ledger.usage(&ALICE).assets());
        let held = ledger.usage(&ALICE).assets();
        s[0].reserve.extend(16);
        let a = s[1].alloc(&ALICE, 1).unwrap();
        assert!(seen.insert(a.id));
        assert_eq!(a.id.block(), 15, "shard 1's third block");
        assert_eq!(ledger.usage(&ALICE).assets(), held + 1);
    }

    fn assets(workers: usize) -> MemoryAssets {
        MemoryAssets::new(
            node(),
            locator(),
            workers,
            (20, 1 << 20),
            (1 << 20, u64::MAX),
        )
        .with_grace(Duration::from_secs(30))
    }

    #[test]
    fn a_request_reaches_the_shard_that_holds_the_asset() {
        let all = assets(3);
        let on: Vec<AssetAddress> = (0..3).map(|w| all.alloc(w, &ALICE, 10).unwrap()).collect();
        for (w, a) in on.iter().enumerate() {
            all.with(*a, |s| s.write(&ALICE, *a, 0, &[w as u8; 10]))
                .unwrap();
        }
        for (w, a) in on.iter().enumerate() {
            let read = all.with(*a, |s| s.read(&ALICE, *a, 0, 10).map(|r| r.to_vec()));
            assert_eq!(read.unwrap(), vec![w as u8; 10]);
        }
        assert_eq!(all.list(&ALICE).len(), 3);
        let totals = all.totals();
        assert_eq!((totals.assets, totals.bytes), (3, 30));

        let earlier_run = AssetAddress {
            locator: locator(),
            id: AssetId::new(node(), 19, 5),
        };
        let other_node = AssetAddress {
            locator: locator(),
            id: AssetId::new(NodeNumber::new(9).unwrap(), 20, 5),
        };
        let elsewhere = AssetAddress {
            locator: Locator(1),
            ..on[0]
        };
        let read = |a: AssetAddress| all.with(a, |s| s.read(&ALICE, a, 0, 1).map(|r| r.to_vec()));
        assert_eq!(read(earlier_run), Err(AssetError::Released(earlier_run)));
        assert_eq!(read(other_node), Err(AssetError::Unknown(other_node)));
        assert!(matches!(read(elsewhere), Err(AssetError::Elsewhere { .. })));
    }

    #[test]
    fn an_owners_assets_outlive_its_connections_by_the_grace_only() {
        let all = assets(2);
        let t0 = Instant::now();
        all.connected(&ALICE);
        all.connected(&ALICE);
        all.connected(&BOB);
        let a = all.alloc(0, &ALICE, 100).unwrap();
        let b = all.alloc(1, &BOB, 200).unwrap();
        all.disconnected(&ALICE, t0);
        all.poll_leases(t0 + Duration::from_secs(60));
        assert_eq!(all.totals().assets, 2, "one of Alice's connections is open");
        all.disconnected(&ALICE, t0 + Duration::from_secs(61));
        all.poll_leases(t0 + Duration::from_secs(62));
        assert_eq!(all.totals().assets, 2, "within the grace");
        // Back within the grace: the lease holds again.
        all.connected(&ALICE);
        all.poll_leases(t0 + Duration::from_secs(200));
        assert_eq!(all.totals().assets, 2);
        all.disconnected(&ALICE, t0 + Duration::from_secs(201));
        all.poll_leases(t0 + Duration::from_secs(231));
        let totals = all.totals();
        assert_eq!((totals.assets, totals.bytes), (1, 200));
        assert_eq!(
            (totals.lease_released_assets, totals.lease_released_bytes),
            (1, 100)
        );
        assert_eq!(
            all.with(a, |s| s.read(&ALICE, a, 0, 1).map(|r| r.to_vec())),
            Err(AssetError::Released(a))
        );
        assert_eq!(all.ledger().usage(&ALICE).bytes(), 0);
        assert!(
            all.with(b, |s| s.read(&BOB, b, 0, 1).map(|r| r.to_vec()))
                .is_ok()
        );
    }

    #[test]
    fn compare_and_swap_swaps_only_what_it_expected() {
        let (_, mut s) = shards(1, 1 << 20, 1);
        let s = &mut s[0];
        let a = s.alloc(&ALICE, 8).unwrap();
        assert_eq!(
            s.compare_and_swap(&ALICE, a, 2, b"\0\0", b"ab"),
            Ok((true, b"\0\0".to_vec()))
        );
        assert_eq!(
            s.compare_and_swap(&ALICE, a, 2, b"\0\0", b"cd"),
            Ok((false, b"ab".to_vec()))
        );
        assert_eq!(
            s.compare_and_swap(&ALICE, a, 2, b"ab", b"c"),
            Err(AssetError::CasLength {
                expected: 2,
                new: 1
            })
        );
        assert!(matches!(
            s.compare_and_swap(&ALICE, a, 7, b"ab", b"cd"),
            Err(AssetError::OutOfRange { .. })
        ));
        assert_eq!(s.read(&ALICE, a, 0, 8).unwrap().to_vec(), b"\0\0ab\0\0\0\0");
    }
}
