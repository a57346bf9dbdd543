//! The control plane's durable admission state: the stake ledger, the plot
//! commitments and the beacon chain, in tables of the authority's redb
//! database (the file shared with the CT log, the CA registry and the DNS
//! zone), plus the node's beacon key file and the difficulty controller.
//!
//! Tables:
//! - `admission_stake`: identity (SPKI SHA-256, `[u8; 32]`) → stake (u64,
//!   never 0: an identity left with nothing is removed);
//! - `admission_plots`: identity → `version (1) ‖ k u8 ‖ commitment [32]`;
//! - `admission_beacon`: `"latest"` → the latest tick, `version (1) ‖
//!   index u64 ‖ unix_s u64 ‖ prev [32] ‖ hash [32] ‖ signature [64]`
//!   (integers big endian).
//!
//! Every change is an [`AdmissionChange`], decided by its proposer (the
//! amounts, the plot, the signed tick) and applied by the control plane's
//! state machine (`crate::machine`): `AdmissionState::write` checks it
//! against the state and writes its rows in the machine's transaction,
//! `AdmissionState::absorb` takes it into memory once that committed,
//! so a failed write changes nothing. The state is owned by one thread;
//! workers read [`AdmissionSnapshot`]s, immutable values the owner
//! publishes (through an `ArcSwap`) whenever
//! [`AdmissionState::generation`] moves. It takes `now` from the caller and
//! never reads a clock.

use super::beacon::{Beacon, TICK_SIGNATURE_LEN, Tick};

/// The tick of a beacon that has made none yet.
pub const UNTICKED: Tick = Tick {
    index: 0,
    unix_s: 0,
    prev: [0; 32],
    hash: [0; 32],
    signature: [0; TICK_SIGNATURE_LEN],
};
use super::binding::Binding;
use super::space::{PLOT_K_MAX, SpaceParams};
use super::stake::{ClientKey, Identity, LEDGER_LEN_MAX, StakeError, StakeLedger};
use super::work::{Difficulty, DifficultyConfig, DifficultyController};
use super::{
    AdmissionError, AdmissionMode, AdmissionParameters, AdmissionPolicy, Admitted, Connection,
    ProofBundle, sha256, verify_bundle,
};
use crate::authority::ct::Hash;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use ring::signature::{Ed25519KeyPair, KeyPair};
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

pub(crate) const STAKE: TableDefinition<&[u8; 32], u64> = TableDefinition::new("admission_stake");
pub(crate) const PLOTS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("admission_plots");
pub(crate) const BEACON: TableDefinition<&str, &[u8]> = TableDefinition::new("admission_beacon");
const BEACON_LATEST: &str = "latest";
const FORMAT_VERSION: u8 = 1;
const PLOT_RECORD_LEN: usize = 1 + 1 + 32;
const TICK_RECORD_LEN: usize = 1 + 8 + 8 + 32 + 32 + TICK_SIGNATURE_LEN;

/// Identities with a registered plot, at most: one per possible ledger
/// entry.
pub const PLOTS_LEN_MAX: usize = LEDGER_LEN_MAX;

/// The genesis of a node's chain: its first tick links to
/// `SHA-256("i2-beacon-genesis" ‖ node public key)`, so two nodes' chains
/// never share a prefix.
const GENESIS_DOMAIN: &[u8] = b"i2-beacon-genesis";

/// Admission settings, from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct AdmissionConfig {
    pub mode: AdmissionMode,
    /// Oldest tick accepted, in seconds before now.
    pub window_s: u64,
    /// Least stake an identity must hold.
    pub stake_min: u64,
    pub space: SpaceParams,
    pub difficulty: DifficultyConfig,
    /// Development only: registering a plot tops the identity's stake up
    /// to this amount, in the same transaction. `None` in production.
    pub development_stake: Option<u64>,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        let policy = AdmissionPolicy::default();
        Self {
            mode: policy.mode,
            window_s: policy.window_s,
            stake_min: policy.stake_min,
            space: policy.space,
            difficulty: DifficultyConfig::default(),
            development_stake: None,
        }
    }
}

impl AdmissionConfig {
    pub fn policy(&self) -> AdmissionPolicy {
        AdmissionPolicy {
            mode: self.mode,
            window_s: self.window_s,
            stake_min: self.stake_min,
            space: self.space,
        }
    }
}

/// A registered plot: its Merkle root and size exponent.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PlotCommitment {
    pub commitment: Hash,
    pub k: u8,
}

/// A change to the admission state, as its proposer decided it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdmissionChange {
    /// Add `amount` to `identity`'s stake.
    StakeGrant { identity: Identity, amount: u64 },
    /// Withdraw up to `amount` from `identity`'s stake.
    StakeWithdraw { identity: Identity, amount: u64 },
    /// Register `identity`'s plot, replacing any earlier one, and (in
    /// development) lift its stake to `stake_to` if it holds less.
    PlotRegister {
        identity: Identity,
        plot: PlotCommitment,
        stake_to: Option<u64>,
    },
    /// The beacon's next tick, signed by the proposer.
    BeaconTick(Tick),
}

/// What an applied [`AdmissionChange`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdmissionApplied {
    /// The identity's stake after it.
    Stake { total: u64 },
    /// It changed something else.
    Changed,
    /// It changed nothing (the plot was registered, nothing withdrawn).
    Unchanged,
}

/// Why the admission state could not open or change.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("admission storage failed: {0}")]
    Storage(#[from] redb::Error),
    #[error("the admission store is corrupt: {0}; restore the data directory from a backup")]
    Corrupt(String),
    #[error("the beacon node key {path}: {source}")]
    NodeKeyIo {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the beacon node key {path} is not an Ed25519 PKCS#8 v2 key; restore it from a backup (a new key breaks the beacon chain)"
    )]
    NodeKeyFormat { path: PathBuf },
    #[error(
        "the latest beacon tick in the store does not verify under the node key {path}; restore the key that made it"
    )]
    NodeKeyMismatch { path: PathBuf },
    #[error("the admission configuration: {0}")]
    Config(String),
    #[error("stake: {0}")]
    Stake(#[from] StakeError),
    #[error("a plot of k = {got}; this node's plots have k = {want} (admission.space.k)")]
    PlotK { got: u8, want: u8 },
    #[error("the plot table holds its maximum of {max} identities; remove one first")]
    PlotsFull { max: usize },
    #[error("beacon tick {index} does not follow the latest tick (index, hash or time)")]
    TickOutOfOrder { index: u64 },
}

redb_errors_into_storage!(StateError);

/// The durable admission state. See the module documentation.
pub struct AdmissionState {
    /// The beacon's node key, for a reload.
    node_key_path: PathBuf,
    config: AdmissionConfig,
    // Shared with the snapshots handed out; copied on write only while one
    // is still held.
    ledger: Arc<StakeLedger>,
    plots: Arc<BTreeMap<Identity, PlotCommitment>>,
    beacon: Beacon,
    public_key: Arc<[u8]>,
    difficulty: DifficultyController,
    generation: u64,
}

impl std::fmt::Debug for AdmissionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdmissionState")
            .field("identities", &self.ledger.len())
            .field("plots", &self.plots.len())
            .field("tick", &self.latest_tick().index)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl AdmissionState {
    /// Check `config`, load or create the node key at `node_key_path`, and
    /// load the state from `db`, whose tables `init_in` made. The beacon
    /// chain continues from the stored latest tick; its next tick is the
    /// caller's to propose ([`Self::propose_tick`]): the state machine does
    /// so when it takes the state in.
    pub fn open(
        db: &Database,
        config: AdmissionConfig,
        node_key_path: &Path,
    ) -> Result<Self, StateError> {
        check_config(&config)?;
        let difficulty = DifficultyController::new(config.difficulty).ok_or_else(|| {
            StateError::Config(format!(
                "difficulty base {} is above difficulty max {}",
                config.difficulty.base.bits(),
                config.difficulty.max.bits()
            ))
        })?;
        let key = load_or_create_node_key(node_key_path)?;
        let public_key: Arc<[u8]> = key.public_key().as_ref().into();
        let (ledger, plots, latest) = load(db)?;
        let beacon = match latest {
            Some(last) => Beacon::resume(key, last).ok_or_else(|| StateError::NodeKeyMismatch {
                path: node_key_path.to_owned(),
            })?,
            None => Beacon::new(key, sha256(&[GENESIS_DOMAIN, &public_key]), 0),
        };
        Ok(Self {
            node_key_path: node_key_path.to_owned(),
            config,
            ledger: Arc::new(ledger),
            plots: Arc::new(plots),
            beacon,
            public_key,
            difficulty,
            generation: 0,
        })
    }

    pub fn config(&self) -> &AdmissionConfig {
        &self.config
    }

    /// The state loaded again from `db` (after its tables were replaced
    /// wholesale: a snapshot was installed), with this state's settings
    /// and node key; the difficulty starts over.
    pub(crate) fn reloaded(&self, db: &Database) -> Result<Self, StateError> {
        Self::open(db, self.config, &self.node_key_path)
    }

    /// A grant of `amount` to `identity`, checked against the ledger now
    /// (0, an overflow or a full ledger is refused; the state machine
    /// checks again when it applies it).
    pub fn propose_grant(
        &self,
        identity: Identity,
        amount: u64,
    ) -> Result<AdmissionChange, StateError> {
        self.ledger.check_grant(&identity, amount)?;
        Ok(AdmissionChange::StakeGrant { identity, amount })
    }

    /// Every identity with stake, in identity order.
    pub fn list(&self) -> Vec<(Identity, u64)> {
        self.ledger.list().collect()
    }

    pub fn stake(&self, identity: &Identity) -> u64 {
        self.ledger.get(identity)
    }

    /// A registration of `identity`'s plot; `None` when it is registered
    /// so already (and needs no development top-up). `k` must be this
    /// node's plot size. In development
    /// ([`AdmissionConfig::development_stake`]) the registration lifts the
    /// identity's stake to that amount.
    pub fn propose_plot(
        &self,
        identity: Identity,
        commitment: Hash,
        k: u8,
    ) -> Result<Option<AdmissionChange>, StateError> {
        let want = self.config.space.k();
        if k != want {
            return Err(StateError::PlotK { got: k, want });
        }
        let plot = PlotCommitment { commitment, k };
        let known = self.plots.get(&identity);
        if known.is_none() && self.plots.len() >= PLOTS_LEN_MAX {
            return Err(StateError::PlotsFull { max: PLOTS_LEN_MAX });
        }
        let stake_to = self.config.development_stake;
        if known == Some(&plot) && self.top_up(&identity, stake_to)?.is_none() {
            return Ok(None);
        }
        Ok(Some(AdmissionChange::PlotRegister {
            identity,
            plot,
            stake_to,
        }))
    }

    /// The grant (amount, new total) that lifts `identity` to `stake_to`,
    /// if any.
    fn top_up(
        &self,
        identity: &Identity,
        stake_to: Option<u64>,
    ) -> Result<Option<(u64, u64)>, StateError> {
        let Some(target) = stake_to else {
            return Ok(None);
        };
        let held = self.ledger.get(identity);
        if held >= target {
            return Ok(None);
        }
        let amount = target - held;
        Ok(Some((amount, self.ledger.check_grant(identity, amount)?)))
    }

    pub fn plot(&self, identity: &Identity) -> Option<PlotCommitment> {
        self.plots.get(identity).copied()
    }

    /// The next beacon tick, signed, if `now_unix_s` is past the latest
    /// tick's second; `None` otherwise. Call about once a second and apply
    /// what it returns.
    pub fn propose_tick(&self, now_unix_s: u64) -> Option<AdmissionChange> {
        self.beacon
            .next(now_unix_s)
            .map(AdmissionChange::BeaconTick)
    }

    /// Check `change` against the state and write its rows in `txn` (the
    /// state machine's transaction); [`Self::absorb`] it once `txn`
    /// committed, with nothing applied in between. Refused, writing
    /// nothing, when it no longer fits: a grant past the ledger's bounds,
    /// a plot past the table's, a tick that does not follow the latest.
    pub(crate) fn write(
        &self,
        txn: &WriteTransaction,
        change: &AdmissionChange,
    ) -> Result<AdmissionApplied, StateError> {
        match change {
            AdmissionChange::StakeGrant { identity, amount } => {
                let total = self.ledger.check_grant(identity, *amount)?;
                txn.open_table(STAKE)?.insert(&identity.0, total)?;
                Ok(AdmissionApplied::Stake { total })
            }
            AdmissionChange::StakeWithdraw { identity, amount } => {
                let held = self.ledger.get(identity);
                let left = held.saturating_sub(*amount);
                if left != held {
                    let mut table = txn.open_table(STAKE)?;
                    if left == 0 {
                        table.remove(&identity.0)?;
                    } else {
                        table.insert(&identity.0, left)?;
                    }
                }
                Ok(AdmissionApplied::Stake { total: left })
            }
            AdmissionChange::PlotRegister {
                identity,
                plot,
                stake_to,
            } => {
                let known = self.plots.get(identity);
                if known.is_none() && self.plots.len() >= PLOTS_LEN_MAX {
                    return Err(StateError::PlotsFull { max: PLOTS_LEN_MAX });
                }
                let top_up = self.top_up(identity, *stake_to)?;
                if known == Some(plot) && top_up.is_none() {
                    return Ok(AdmissionApplied::Unchanged);
                }
                txn.open_table(PLOTS)?
                    .insert(&identity.0, encode_plot(plot).as_slice())?;
                if let Some((_, total)) = top_up {
                    txn.open_table(STAKE)?.insert(&identity.0, total)?;
                }
                Ok(AdmissionApplied::Changed)
            }
            AdmissionChange::BeaconTick(tick) => {
                let later = self.beacon.latest().is_none_or(|t| tick.unix_s > t.unix_s);
                if !later || !self.beacon.follows(tick) {
                    return Err(StateError::TickOutOfOrder { index: tick.index });
                }
                // Signed by the beacon key every replica holds: a tick
                // under another would not resume after a restart.
                super::beacon::verify_tick(tick, &self.public_key)
                    .map_err(|_| StateError::TickOutOfOrder { index: tick.index })?;
                txn.open_table(BEACON)?
                    .insert(BEACON_LATEST, encode_tick(tick).as_slice())?;
                Ok(AdmissionApplied::Changed)
            }
        }
    }

    /// Take in `change`, which [`Self::write`] wrote (answering `applied`)
    /// in a transaction that committed.
    pub(crate) fn absorb(&mut self, change: AdmissionChange, applied: AdmissionApplied) {
        if applied == AdmissionApplied::Unchanged {
            return;
        }
        match change {
            AdmissionChange::StakeGrant { identity, amount } => {
                Arc::make_mut(&mut self.ledger)
                    .grant(identity, amount)
                    .expect("a grant the write checked");
            }
            AdmissionChange::StakeWithdraw { identity, amount } => {
                let held = self.ledger.get(&identity);
                if held.saturating_sub(amount) == held {
                    // Nothing withdrawn, nothing written.
                    return;
                }
                Arc::make_mut(&mut self.ledger).revoke(&identity, amount);
            }
            AdmissionChange::PlotRegister {
                identity,
                plot,
                stake_to,
            } => {
                let top_up = self
                    .top_up(&identity, stake_to)
                    .expect("a top-up the write checked");
                Arc::make_mut(&mut self.plots).insert(identity, plot);
                if let Some((amount, _)) = top_up {
                    Arc::make_mut(&mut self.ledger)
                        .grant(identity, amount)
                        .expect("a top-up the write checked");
                }
            }
            AdmissionChange::BeaconTick(tick) => self.beacon.push(tick),
        }
        self.generation += 1;
    }

    /// The latest tick. A single node ticks when it takes the state in; a
    /// cluster member has none until the leader's first tick is applied,
    /// and until then this is [`UNTICKED`], which no proof can name as
    /// recent (Unix second 0): admission waits for the first tick.
    pub fn latest_tick(&self) -> &Tick {
        self.beacon.latest().unwrap_or(&UNTICKED)
    }

    /// Whether the beacon has made a tick.
    pub fn has_ticked(&self) -> bool {
        self.beacon.latest().is_some()
    }

    /// The raw Ed25519 public key that verifies this node's ticks.
    pub fn beacon_public_key(&self) -> &[u8] {
        &self.public_key
    }

    /// Feed the handshake rate measured up to `now` (about once a second);
    /// returns the difficulty to hand out from now on.
    pub fn on_handshakes(&mut self, rate_per_s: u32, now: Instant) -> Difficulty {
        let before = self.difficulty.current();
        let after = self.difficulty.on_handshakes(rate_per_s, now);
        if after != before {
            self.generation += 1;
        }
        after
    }

    pub fn difficulty(&self) -> Difficulty {
        self.difficulty.current()
    }

    /// Changes whenever anything in [`Self::snapshot`] changes (in this
    /// process; it restarts at 0 on open).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// An immutable copy of what the workers need. Cheap: the ledger and
    /// the plots are shared, not copied.
    pub fn snapshot(&self) -> AdmissionSnapshot {
        let policy = self.config.policy();
        AdmissionSnapshot {
            generation: self.generation,
            parameters: policy.parameters(self.difficulty.current(), self.latest_tick().clone()),
            policy,
            beacon_public_key: Arc::clone(&self.public_key),
            ledger: Arc::clone(&self.ledger),
            plots: Arc::clone(&self.plots),
        }
    }
}

/// What the workers read: the parameters to hand a new connection, and the
/// stake and plot of every identity, as of [`Self::generation`].
#[derive(Clone, Debug)]
pub struct AdmissionSnapshot {
    generation: u64,
    parameters: AdmissionParameters,
    policy: AdmissionPolicy,
    beacon_public_key: Arc<[u8]>,
    ledger: Arc<StakeLedger>,
    plots: Arc<BTreeMap<Identity, PlotCommitment>>,
}

impl AdmissionSnapshot {
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// What a new connection is told (mode, difficulty, latest tick, plot
    /// size); the connection keeps its copy until it is admitted.
    pub fn parameters(&self) -> &AdmissionParameters {
        &self.parameters
    }

    pub fn policy(&self) -> &AdmissionPolicy {
        &self.policy
    }

    pub fn beacon_public_key(&self) -> &[u8] {
        &self.beacon_public_key
    }

    pub fn stake(&self, identity: &Identity) -> u64 {
        self.ledger.get(identity)
    }

    pub fn plot(&self, identity: &Identity) -> Option<PlotCommitment> {
        self.plots.get(identity).copied()
    }

    /// Check `bundle` from the connection with `binding` and certificate
    /// key `client`, against the `params` that connection was given, with
    /// this snapshot's stake and plot of the client's identity. A plot
    /// registered with another `k` than `params` asks for counts as none.
    pub fn verify(
        &self,
        params: &AdmissionParameters,
        client: &ClientKey,
        binding: &Binding,
        bundle: &ProofBundle,
        now_unix_s: u64,
    ) -> Result<Admitted, AdmissionError> {
        // Only a plot of the size this connection was asked for counts.
        let plot = self
            .plots
            .get(&client.identity())
            .filter(|p| p.k == params.space.k());
        let connection = Connection {
            binding: *binding,
            client,
            plot_commitment: plot.map(|p| &p.commitment),
        };
        verify_bundle(
            params,
            &self.policy,
            &self.ledger,
            &connection,
            bundle,
            now_unix_s,
        )
    }
}

fn check_config(config: &AdmissionConfig) -> Result<(), StateError> {
    if config.development_stake == Some(0) {
        return Err(StateError::Config(
            "development stake 0 grants nothing; leave it unset or give at least 1".into(),
        ));
    }
    if config.mode.stake && config.stake_min == 0 {
        return Err(StateError::Config(
            "stake_min 0 admits every identity; set at least 1 or leave stake out of the mode"
                .into(),
        ));
    }
    Ok(())
}

/// Create the tables in `txn` if missing.
pub(crate) fn init_in(txn: &WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(STAKE)?;
    txn.open_table(PLOTS)?;
    txn.open_table(BEACON)?;
    Ok(())
}

type Loaded = (
    StakeLedger,
    BTreeMap<Identity, PlotCommitment>,
    Option<Tick>,
);

fn load(db: &Database) -> Result<Loaded, StateError> {
    let txn = db.begin_read()?;
    let mut ledger = StakeLedger::default();
    for row in txn.open_table(STAKE)?.iter()? {
        let (identity, stake) = row?;
        let identity = Identity(*identity.value());
        ledger
            .grant(identity, stake.value())
            .map_err(|e| StateError::Corrupt(format!("the stake of {identity}: {e}")))?;
    }
    let mut plots = BTreeMap::new();
    for row in txn.open_table(PLOTS)?.iter()? {
        let (identity, record) = row?;
        let identity = Identity(*identity.value());
        let plot = decode_plot(record.value()).ok_or_else(|| {
            StateError::Corrupt(format!("the plot of {identity} cannot be decoded"))
        })?;
        plots.insert(identity, plot);
    }
    if plots.len() > PLOTS_LEN_MAX {
        return Err(StateError::Corrupt(format!(
            "{} plots, more than the {PLOTS_LEN_MAX} allowed",
            plots.len()
        )));
    }
    let latest = match txn.open_table(BEACON)?.get(BEACON_LATEST)? {
        Some(record) => Some(decode_tick(record.value()).ok_or_else(|| {
            StateError::Corrupt("the latest beacon tick cannot be decoded".into())
        })?),
        None => None,
    };
    Ok((ledger, plots, latest))
}

pub(crate) fn encode_plot(plot: &PlotCommitment) -> [u8; PLOT_RECORD_LEN] {
    let mut out = [0u8; PLOT_RECORD_LEN];
    out[0] = FORMAT_VERSION;
    out[1] = plot.k;
    out[2..].copy_from_slice(&plot.commitment);
    out
}

pub(crate) fn decode_plot(bytes: &[u8]) -> Option<PlotCommitment> {
    let bytes: &[u8; PLOT_RECORD_LEN] = bytes.try_into().ok()?;
    let k = bytes[1];
    if bytes[0] != FORMAT_VERSION || k == 0 || k > PLOT_K_MAX {
        return None;
    }
    Some(PlotCommitment {
        commitment: bytes[2..].try_into().ok()?,
        k,
    })
}

pub(crate) fn encode_tick(tick: &Tick) -> Vec<u8> {
    let mut out = Vec::with_capacity(TICK_RECORD_LEN);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&tick.index.to_be_bytes());
    out.extend_from_slice(&tick.unix_s.to_be_bytes());
    out.extend_from_slice(&tick.prev);
    out.extend_from_slice(&tick.hash);
    out.extend_from_slice(&tick.signature);
    out
}

pub(crate) fn decode_tick(bytes: &[u8]) -> Option<Tick> {
    if bytes.len() != TICK_RECORD_LEN || bytes[0] != FORMAT_VERSION {
        return None;
    }
    let u64_at = |at: usize| Some(u64::from_be_bytes(bytes[at..at + 8].try_into().ok()?));
    Some(Tick {
        index: u64_at(1)?,
        unix_s: u64_at(9)?,
        prev: bytes[17..49].try_into().ok()?,
        hash: bytes[49..81].try_into().ok()?,
        signature: bytes[81..].try_into().ok()?,
    })
}

/// Load the node's beacon key, or make one on first start. An existing
/// key is never rewritten: a new key would break the chain.
fn load_or_create_node_key(path: &Path) -> Result<Ed25519KeyPair, StateError> {
    let io = |source| StateError::NodeKeyIo {
        path: path.to_owned(),
        source,
    };
    let pkcs8 = match std::fs::read(path) {
        Ok(bytes) => {
            let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format_args!("{:o}", mode & 0o777),
                    "the beacon node key is readable by others; chmod 600 it"
                );
            }
            bytes
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let rng = ring::rand::SystemRandom::new();
            let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(|_| io(std::io::Error::other("the system random source failed")))?;
            write_private(path, pkcs8.as_ref()).map_err(io)?;
            pkcs8.as_ref().to_vec()
        }
        Err(e) => return Err(io(e)),
    };
    Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| StateError::NodeKeyFormat {
        path: path.to_owned(),
    })
}

/// Write `bytes` to `path` with mode 0600 through a temporary file, an
/// fsync, a rename and an fsync of the directory, so a crash leaves either
/// no key or the whole key.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    // A leftover from a crash may have another mode; `mode` applies only
    // to a file it creates.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests;
