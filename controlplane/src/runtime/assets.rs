//! The control plane's side of the asset requests: storage assets, which
//! the workers hand over (`dataplane::assets::serve`), and the operator's
//! quotas (`QUOTAS`). Each change is a [`Command::Asset`] applied in
//! the request's group commit, so its answer leaves only once it is
//! durable; a read sees what the group applied before it.
//!
//! [`Command::Asset`]: crate::machine::Command::Asset

use crate::assets::{AssetApplied, AssetChange, Quota, StorageError};
use crate::authority::api::{MALFORMED_REQUEST, STORAGE, UNAUTHORIZED};
use crate::authority::logged::AuthorityError;
use crate::dns::{RecordSet, ZoneChange};
use crate::machine::Machine;
use dataplane::assets::address::{AssetAddress, AssetId, Locator, NodeNumber};
use dataplane::assets::memory::{MemoryAssets, Owner};
use dataplane::assets::wire::{AllocKind, AssetRequest, STORAGE_WRITE_LEN_MAX};
use dataplane::protocols::stoq::{ASSET_KINDS, ErrorCode};
use dataplane::protocols::stoq_registry::{ASSET_READ, ASSET_WRITE};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Where named storage assets are published: `NAME.assets.APEX`.
pub const ASSET_NAMES: &str = "assets";

/// Request kind (operator): set, reset or list asset quotas.
pub const QUOTAS: u8 = dataplane::protocols::stoq_registry::QUOTAS;

/// What a request answers: its payload, or an error code and message.
type Answer = Result<Vec<u8>, (u16, String)>;

/// An `QUOTAS` request (JSON).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum QuotaRequest {
    /// Set the limits given (bytes); a limit not given stays as it is.
    Set {
        identity: String,
        memory: Option<u64>,
        storage: Option<u64>,
        /// The fuel each VM call may be given.
        #[serde(default)]
        fuel: Option<u64>,
    },
    /// Back to the node's defaults.
    Reset {
        identity: String,
    },
    List,
}

/// One identity's quotas as `quota list` shows them.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct QuotaEntry {
    pub identity: String,
    /// The limits in force (the operator's or the default), bytes.
    pub memory: u64,
    pub storage: u64,
    /// Whether each was set by the operator.
    pub memory_set: bool,
    pub storage_set: bool,
    /// Storage bytes charged now.
    pub storage_used: u64,
    /// The fuel each VM call may be given, and whether the operator set it.
    #[serde(default)]
    pub fuel: u64,
    #[serde(default)]
    pub fuel_set: bool,
}

/// The node's part in the asset requests.
pub struct AssetsRuntime {
    node: NodeNumber,
    locator: Locator,
    /// The workers' memory assets, whose quota ledger takes the operator's
    /// memory limits.
    memory: Option<Arc<MemoryAssets>>,
    /// The sequence number this node's next allocation takes at least:
    /// past those it proposed that are not applied yet.
    cursor: std::cell::Cell<u64>,
    /// The storage reads the workers answer themselves, once plugged in.
    reads: Option<Arc<Reads>>,
}

/// Storage reads a worker answers from the store itself: a caller whose
/// read of an asset the control plane checked (its certificate, its
/// access) reads that asset again on the worker's thread, while the
/// machine's count of changes stays (a grant, a free, a revocation moves
/// it; a write of the asset's bytes does not). The worker reads what is
/// committed and on disk: a read that could see a commit not yet fsynced
/// (a group's, whose answers wait for its fsync) goes to the control
/// plane, whose answer waits too. A single node's only: a cluster member
/// answers a read once it knows it applied everything the cluster
/// committed before the read arrived, which only its control plane can
/// learn (`ClusterAuthority::read_fence`).
pub struct Reads {
    checked: super::checked::Checked<AssetAddress, Readable>,
}

/// What a worker needs to read an asset it may: which, how long, where.
#[derive(Clone)]
struct Readable {
    id: AssetId,
    size: u64,
    store: Arc<redb::Database>,
    /// Whether a commit not yet on disk may be in what a read sees.
    unsynced: Arc<std::sync::atomic::AtomicBool>,
}

impl Reads {
    /// Let `port`'s workers answer the reads checked here (while this
    /// lives).
    fn plug(self: &Arc<Self>, port: &dataplane::control::ControlPort) {
        let reads = Arc::downgrade(self);
        port.set_storage_reads(Arc::new(move |certificate, payload| {
            reads.upgrade()?.answer(certificate, payload)
        }));
    }

    /// `ASSET_READ`'s answer from the store, if the checks of the same
    /// caller's read of the same asset hold and the range lies inside it;
    /// None sends the read to the control plane (which answers any error).
    fn answer(&self, certificate: &[u8], payload: &[u8]) -> Option<Vec<u8>> {
        let Ok(AssetRequest::Read {
            address,
            offset,
            len,
        }) = AssetRequest::decode(ASSET_READ, payload)
        else {
            return None;
        };
        let readable = self.checked.get(certificate, &address)?;
        let end = offset.checked_add(u64::from(len))?;
        if u64::from(len) > crate::assets::STORAGE_READ_LEN_MAX || end > readable.size {
            return None;
        }
        // The read first, then the checks again: a change committed before
        // the read began moved the count before its commit, and a commit
        // not yet on disk set `unsynced` before it.
        let txn = redb::ReadableDatabase::begin_read(&*readable.store).ok()?;
        if readable.unsynced.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        self.checked.get(certificate, &address)?;
        crate::assets::read_in(&txn, readable.id, offset, len as usize).ok()
    }
}

impl AssetsRuntime {
    /// The node `node` with `locator`; `memory` is the workers' (None when
    /// asset addressing is off, then every asset request is refused by
    /// the worker before it gets here).
    pub fn new(
        machine: &Machine,
        node: NodeNumber,
        locator: Locator,
        memory: Option<Arc<MemoryAssets>>,
    ) -> Self {
        if let Some(memory) = &memory {
            memory.set_serves_storage();
        }
        let runtime = Self {
            node,
            locator,
            memory,
            cursor: std::cell::Cell::new(0),
            reads: None,
        };
        runtime.publish_memory_limits(machine);
        runtime.publish(machine);
        runtime
    }

    /// Let `port`'s workers answer storage reads this node checked, from
    /// `machine`'s store ([`Reads`]).
    pub fn serve_reads_from_workers(
        &mut self,
        machine: &Machine,
        port: &dataplane::control::ControlPort,
    ) {
        let reads = Arc::new(Reads {
            checked: super::checked::Checked::new(machine.changes()),
        });
        reads.plug(port);
        self.reads = Some(reads);
    }

    /// Publish the storage totals for `stats` (after each group commit).
    pub fn publish(&self, machine: &Machine) {
        if let Some(memory) = &self.memory {
            memory.storage_gauge().store(machine.assets().totals());
        }
    }

    /// Hand the operator's memory limits to the workers (after a quota
    /// change is applied, whoever proposed it).
    pub fn publish_memory_limits(&self, machine: &Machine) {
        if let Some(memory) = &self.memory {
            memory.ledger().set_limits(machine.assets().memory_limits());
        }
    }

    /// Answer `kind` now if it is an asset request (a single node: a
    /// change is applied in the request's group).
    pub fn handle(
        &self,
        machine: &mut Machine,
        kind: u8,
        asker: Asker<'_>,
        payload: &[u8],
    ) -> Option<Answer> {
        let ours = |locator: Locator| locator == self.locator;
        let plan = self.plan(machine, kind, asker, payload, &ours)?;
        Some(plan.and_then(|plan| match plan {
            Plan::Now(answer) => Ok(answer),
            Plan::Change(change) => {
                let asked = Asked::of(&change);
                let applied = machine
                    .change_assets(change)
                    .map_err(|e| self.refusal(&e))?;
                self.answer(machine, asked, applied)
            }
        }))
    }

    /// What asset request `kind` needs, if it is one: an answer now, or a
    /// change to commit first (then [`Self::answer`]). `ours` says which
    /// locators' storage assets this node's store holds.
    pub fn plan(
        &self,
        machine: &Machine,
        kind: u8,
        asker: Asker<'_>,
        payload: &[u8],
        ours: &dyn Fn(Locator) -> bool,
    ) -> Option<Result<Plan, (u16, String)>> {
        let changes = self.reads.as_ref().map(|reads| reads.checked.count());
        let (verified, operator) = match asker {
            Asker::Vm(owner) if kind == ASSET_READ || kind == ASSET_WRITE => {
                if let Ok(AssetRequest::Write {
                    address,
                    offset,
                    data,
                }) = AssetRequest::decode(kind, payload)
                    && super::vm::writes_a_vm(machine, address.id, offset, data)
                {
                    return Some(Err((
                        ErrorCode::AssetForbidden as u16,
                        "a VM writes no VM asset".into(),
                    )));
                }
                return Some(self.plan_storage(machine, &owner, kind, payload, ours));
            }
            Asker::Vm(_) => {
                return Some(Err((
                    ErrorCode::Malformed as u16,
                    "a VM reads and writes storage assets, nothing more".into(),
                )));
            }
            Asker::Client { verified, operator } => (verified, operator),
        };
        if kind == QUOTAS {
            if !operator {
                return Some(Err((
                    UNAUTHORIZED,
                    "only the operator may set asset quotas".into(),
                )));
            }
            return Some(self.plan_quota(machine, payload));
        }
        if !ASSET_KINDS.contains(&kind) {
            return None;
        }
        let Some((certificate, owner)) =
            verified.and_then(|der| Some((der, dataplane::trust::spki_sha256(der)?)))
        else {
            return Some(Err((
                ErrorCode::CertificateRequired as u16,
                "asset requests need a valid client certificate of this authority (revoked or expired ones are refused)".into(),
            )));
        };
        let plan = self.plan_storage(machine, &Owner(owner), kind, payload, ours);
        // A read the checks let through: the caller's next reads of the
        // asset are the workers' while nothing changes.
        if let (Some(reads), Some(changes), Ok(Plan::Now(_)), true) =
            (&self.reads, changes, &plan, kind == ASSET_READ)
            && let Ok(AssetRequest::Read { address, .. }) = AssetRequest::decode(kind, payload)
            && let Some((_, size)) = machine.assets().owner_and_size(address.id)
        {
            let (store, unsynced) = machine.committed_store();
            let readable = Readable {
                id: address.id,
                size,
                store,
                unsynced,
            };
            reads
                .checked
                .remember(certificate, address, changes, readable);
        }
        Some(plan)
    }

    fn plan_storage(
        &self,
        machine: &Machine,
        owner: &Owner,
        kind: u8,
        payload: &[u8],
        ours: &dyn Fn(Locator) -> bool,
    ) -> Result<Plan, (u16, String)> {
        let request = AssetRequest::decode(kind, payload)
            .map_err(|e| (ErrorCode::Malformed as u16, e.to_string()))?;
        if request.asset_kind() != AllocKind::Storage {
            return Err((
                ErrorCode::Malformed as u16,
                "memory asset requests are answered by the workers".into(),
            ));
        }
        let id = match request.address() {
            Some(address) if !ours(address.locator) => {
                return Err((
                    ErrorCode::AssetElsewhere as u16,
                    format!(
                        "{address}: held by the node of locator {}, not this one",
                        address.locator
                    ),
                ));
            }
            Some(address) => address.id,
            None => AssetId(0),
        };
        let caller = *owner;
        Ok(Plan::Change(match request {
            AssetRequest::Alloc { size, name, .. } => {
                // Past what this node proposed and what was applied: a
                // member has several allocations in flight.
                let seq = self.cursor.get().max(machine.assets().next_sequence());
                self.cursor.set(seq + 1);
                let id = crate::assets::storage_id(self.node, seq);
                let (name, zone) = match name {
                    None => (None, None),
                    Some(label) => {
                        let (name, zone) = publish(machine, owner, label, self.address(id))?;
                        (Some(name), Some(zone))
                    }
                };
                AssetChange::Alloc {
                    owner: caller,
                    size,
                    id,
                    name,
                    zone,
                    limits: machine.assets().limits().into(),
                }
            }
            AssetRequest::Read { offset, len, .. } => {
                return machine
                    .read_storage(owner, id, offset, u64::from(len))
                    .map(Plan::Now)
                    .map_err(|e| self.refusal(&e));
            }
            AssetRequest::Write { data, .. } if data.len() > STORAGE_WRITE_LEN_MAX => {
                return Err((
                    ErrorCode::AssetRange as u16,
                    format!(
                        "a storage write carries at most {STORAGE_WRITE_LEN_MAX} bytes, not {} (write more as several)",
                        data.len()
                    ),
                ));
            }
            AssetRequest::Write { offset, data, .. } => AssetChange::Write {
                caller,
                id,
                offset,
                data: data.to_vec(),
            },
            AssetRequest::Cas { expected, new, .. }
                if expected.len() + new.len() > STORAGE_WRITE_LEN_MAX =>
            {
                return Err((
                    ErrorCode::AssetRange as u16,
                    format!(
                        "a storage compare-and-swap carries at most {STORAGE_WRITE_LEN_MAX} bytes of expected and new together"
                    ),
                ));
            }
            AssetRequest::Cas {
                offset,
                expected,
                new,
                ..
            } => AssetChange::Cas {
                caller,
                id,
                offset,
                expected: expected.to_vec(),
                new: new.to_vec(),
            },
            AssetRequest::Free { .. } => AssetChange::Free {
                caller,
                id,
                zone: unpublish(machine, owner, id)?,
            },
            AssetRequest::Grant {
                grantee, access, ..
            } => AssetChange::Grant {
                caller,
                id,
                grantee,
                access,
                limits: machine.assets().limits().into(),
            },
            AssetRequest::List { .. } => {
                let listed: Vec<serde_json::Value> = machine
                    .assets()
                    .list(owner)
                    .iter()
                    .map(|a| {
                        serde_json::json!({
                            "address": self.address(a.id).to_string(),
                            "kind": "storage",
                            "size": a.size,
                            "grants": a.grants,
                            "name": a.name,
                        })
                    })
                    .collect();
                return Ok(Plan::Now(
                    serde_json::to_vec(&listed).expect("a list serializes"),
                ));
            }
        }))
    }

    /// The answer to what `asked` for, once applying it did `applied`.
    pub fn answer(&self, machine: &Machine, asked: Asked, applied: AssetApplied) -> Answer {
        Ok(match (asked, applied) {
            (Asked::Alloc, AssetApplied::Allocated(id)) => self.address(id).octets().to_vec(),
            (Asked::Swap, AssetApplied::Swapped(swapped, was)) => {
                [&[u8::from(swapped)][..], &was].concat()
            }
            (Asked::Free, AssetApplied::Freed(bytes)) => bytes.to_be_bytes().to_vec(),
            (Asked::Grant, AssetApplied::Granted(changed)) => vec![u8::from(changed)],
            (Asked::Quota(owner, quota), AssetApplied::Quota) => {
                self.publish_memory_limits(machine);
                let used = machine.assets().used_by(&owner);
                let entry = self.entry(machine, &owner, quota, used);
                serde_json::to_vec(&entry).expect("a quota serializes")
            }
            (Asked::Write, AssetApplied::Written) => Vec::new(),
            (asked, applied) => {
                return Err((STORAGE, format!("{asked:?} was applied as {applied:?}")));
            }
        })
    }

    /// This node's locator.
    pub fn locator(&self) -> Locator {
        self.locator
    }

    pub(crate) fn address(&self, id: AssetId) -> AssetAddress {
        AssetAddress {
            locator: self.locator,
            id,
        }
    }

    /// An error as the client sees it; the messages name addresses.
    pub fn refusal(&self, e: &AuthorityError) -> (u16, String) {
        let e = match e {
            AuthorityError::Asset(e) => e,
            // The zone moved since the change was planned (another change
            // to it came first): nothing was done; ask again.
            AuthorityError::Stale(_) => return (ErrorCode::Busy as u16, e.to_string()),
            _ => return (STORAGE, e.to_string()),
        };
        let code = match e {
            StorageError::Unknown(_) => ErrorCode::AssetUnknown,
            StorageError::Released(_) => ErrorCode::AssetReleased,
            StorageError::Forbidden(_) => ErrorCode::AssetForbidden,
            StorageError::OutOfRange { .. } | StorageError::CasLength { .. } => {
                ErrorCode::AssetRange
            }
            StorageError::QuotaExceeded { .. } | StorageError::TooManyAssets => {
                ErrorCode::AssetQuota
            }
            StorageError::NodeFull { .. }
            | StorageError::NodeAssetsFull
            | StorageError::Size(_)
            | StorageError::TooManyGrants
            | StorageError::IdsExhausted
            | StorageError::TooManyNames => ErrorCode::AssetLimit,
            StorageError::ReadLen(_) => ErrorCode::AssetRange,
            // Another member's allocation took the identifier first.
            StorageError::Stale => ErrorCode::Busy,
            StorageError::Corrupt(_) | StorageError::Storage(_) => {
                return (STORAGE, e.to_string());
            }
        };
        (code as u16, e.to_string())
    }

    fn plan_quota(&self, machine: &Machine, payload: &[u8]) -> Result<Plan, (u16, String)> {
        let request: QuotaRequest = serde_json::from_slice(payload)
            .map_err(|e| (MALFORMED_REQUEST, format!("not a quota request: {e}")))?;
        let identity = |text: &str| -> Result<Owner, (u16, String)> {
            super::admission::parse_identity(text)
                .map(|id| Owner(id.0))
                .map_err(|e| (MALFORMED_REQUEST, e))
        };
        let (owner, quota) = match request {
            QuotaRequest::List => {
                let entries: Vec<QuotaEntry> = machine
                    .assets()
                    .quotas()
                    .into_iter()
                    .map(|(owner, quota, used)| self.entry(machine, &owner, quota, used))
                    .collect();
                return Ok(Plan::Now(
                    serde_json::to_vec(&entries).expect("quotas serialize"),
                ));
            }
            QuotaRequest::Reset { identity: text } => (identity(&text)?, Quota::default()),
            QuotaRequest::Set {
                identity: text,
                memory,
                storage,
                fuel,
            } => {
                if memory.is_none() && storage.is_none() && fuel.is_none() {
                    return Err((
                        MALFORMED_REQUEST,
                        "a quota set names at least one of --memory, --storage and --fuel".into(),
                    ));
                }
                let owner = identity(&text)?;
                let now = machine.assets().quota_of(&owner);
                let quota = Quota {
                    memory: memory.or(now.memory),
                    storage: storage.or(now.storage),
                    fuel: fuel.or(now.fuel),
                };
                (owner, quota)
            }
        };
        Ok(Plan::Change(AssetChange::Quota { owner, quota }))
    }

    fn entry(&self, machine: &Machine, owner: &Owner, quota: Quota, used: u64) -> QuotaEntry {
        let (memory, storage) = machine.assets().effective(owner);
        QuotaEntry {
            identity: crate::authority::api::hex(&owner.0),
            memory,
            storage,
            memory_set: quota.memory.is_some(),
            storage_set: quota.storage.is_some(),
            storage_used: used,
            fuel: machine.assets().fuel_quota(owner),
            fuel_set: quota.fuel.is_some(),
        }
    }
}

/// Who asks for an asset request.
#[derive(Clone, Copy, Debug)]
pub enum Asker<'a> {
    /// A client: its certificate, checked again (chain, validity,
    /// revocation), and whether it is the operator's.
    Client {
        verified: Option<&'a [u8]>,
        operator: bool,
    },
    /// A VM thread, as the VM's owner: storage reads and writes only.
    Vm(Owner),
}

impl<'a> Asker<'a> {
    /// The asker of `request`, whose certificate was checked as `verified`.
    pub fn of(
        request: &dataplane::control::Forwarded,
        verified: Option<&'a [u8]>,
        operator: bool,
    ) -> Self {
        match request.vm_owner.as_deref() {
            Some(owner) => Asker::Vm(*owner),
            None => Asker::Client { verified, operator },
        }
    }
}

/// What an asset request needs.
#[derive(Debug)]
pub enum Plan {
    /// Its answer, now (a read, a list).
    Now(Vec<u8>),
    /// A change to commit; its answer comes from what applying it did.
    Change(AssetChange),
}

/// What a change's answer is made of (the change itself goes to be
/// applied).
#[derive(Debug)]
pub enum Asked {
    Alloc,
    Write,
    Swap,
    Free,
    Grant,
    Quota(Owner, Quota),
}

impl Asked {
    pub fn of(change: &AssetChange) -> Self {
        match change {
            AssetChange::Alloc { .. } => Asked::Alloc,
            AssetChange::Write { .. } => Asked::Write,
            AssetChange::Cas { .. } => Asked::Swap,
            AssetChange::Free { .. } => Asked::Free,
            AssetChange::Grant { .. } => Asked::Grant,
            AssetChange::Quota { owner, quota } => Asked::Quota(*owner, *quota),
        }
    }
}

/// The zone change that publishes `address` at `LABEL.assets.APEX` for
/// `owner`, and that name; refused when the server has no zone or the name
/// holds records already.
fn publish(
    machine: &Machine,
    owner: &Owner,
    label: &str,
    address: AssetAddress,
) -> Result<(String, ZoneChange), (u16, String)> {
    let no_zone = || {
        (
            ErrorCode::AssetName as u16,
            "this server serves no DNS zone to publish an asset's name in".to_owned(),
        )
    };
    let zone = machine.zone().ok_or_else(no_zone)?;
    let name = zone
        .qualify(&format!("{label}.{ASSET_NAMES}"))
        .map_err(|e| (ErrorCode::Malformed as u16, e.to_string()))?;
    if zone.get(&name).is_some() {
        return Err((
            ErrorCode::AssetName as u16,
            format!("{name} is taken; choose another name"),
        ));
    }
    let records = RecordSet::new(vec![address.into()], Vec::new(), Some(owner.0))
        .map_err(|e| (ErrorCode::Malformed as u16, e.to_string()))?;
    let change = zone
        .plan(vec![(name.clone(), Some(records))])
        .map_err(|e| (STORAGE, e.to_string()))?
        .ok_or_else(no_zone)?;
    Ok((name, change))
}

/// The zone change that removes `id`'s name, if it has one and the name
/// still holds what the asset published (one address with its identifier,
/// under whichever member's locator allocated it, and its owner's key): a
/// name the operator changed since is left as it is.
fn unpublish(
    machine: &Machine,
    owner: &Owner,
    id: AssetId,
) -> Result<Option<ZoneChange>, (u16, String)> {
    let (Some(name), Some(zone)) = (machine.assets().name_of(id), machine.zone()) else {
        return Ok(None);
    };
    let published = zone.get(name).is_some_and(|records| {
        records.owner() == Some(owner.0)
            && matches!(records.aaaa(), [one] if AssetAddress::from(*one).id == id)
    });
    if !published {
        return Ok(None);
    }
    zone.plan(vec![(name.to_owned(), None)])
        .map_err(|e| (STORAGE, e.to_string()))
}
