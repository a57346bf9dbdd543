//! Four-proof admission on the server (docs/ADMISSION.md):
//!
//! - [`Gate`]: what the workers call. It verifies bundles on the worker
//!   against the last published [`AdmissionSnapshot`] (one atomic load, no
//!   control-plane round trip) and queues outcomes for the control plane.
//! - [`AdmissionRuntime`]: the control plane's side. Its durable state
//!   (ledger, plots, beacon) is in the state machine; it ticks the beacon
//!   every second, adapts the difficulty to the handshake rate, scores
//!   failures and isolates offenders (the blocklist the workers and the
//!   XDP front door enforce), records admitted connections as assets of
//!   their owners, and answers the plot, stake and blocklist requests.
//!
//! The client's side (`KeyAdmitter`, which makes the four proofs) is the
//! binary's (`internet2_server::admission`).

use crate::authority::logged::AuthorityError;
use crate::consensus::ProofBundle;
use crate::consensus::binding::Binding;
use crate::consensus::isolation::{Isolation, IsolationConfig};
use crate::consensus::stake::{ClientKey, Identity};
use crate::consensus::state::{
    AdmissionApplied, AdmissionChange, AdmissionConfig, AdmissionSnapshot, AdmissionState,
};
use crate::consensus::wire::{self, Offer, PlotRegistration};
use crate::machine::Machine;
use arc_swap::ArcSwap;
use crossbeam_queue::ArrayQueue;
use dataplane::admission::{
    AdmissionEvent, AdmissionGate, Admitted, CLOSE_ADMISSION_MALFORMED, CLOSE_ADMISSION_SUSPENDED,
    CLOSE_ADMISSION_UNAVAILABLE, PendingAdmission, Refusal,
};
use dataplane::blocklist::BlocklistStore;
use dataplane::front_door::{FrontDoor, Ipv6Prefix};
use dataplane::stats::StatsRegistry;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

/// Request kind: register the caller's plot (allowed before admission).
pub const PLOT_REGISTER: u8 = dataplane::admission::KIND_PLOT_REGISTER;
/// Request kind (operator): grant, revoke or list stake.
pub const STAKE: u8 = dataplane::protocols::stoq_registry::STAKE;
/// Request kind (operator): list or remove isolation entries.
pub const BLOCKLIST: u8 = dataplane::protocols::stoq_registry::BLOCKLIST;
/// Request kind (operator): the admitted connections, by owner.
pub const ASSETS: u8 = dataplane::protocols::stoq_registry::ASSETS;
/// Connections listed per `ASSETS` answer.
const ASSETS_LISTED_MAX: usize = 10_000;

/// Outcomes queued by the workers; past it they are dropped and counted.
const EVENTS_MAX: usize = 65_536;
/// Outcomes handled per control-plane wake-up.
const EVENTS_PER_POLL: usize = 4_096;
/// Entries of each list shown in `stats` (the CLI lists them all).
const STATUS_LIST_MAX: usize = 32;

/// Admission settings from `[hypermesh_assets]`.
#[derive(Clone, Debug)]
pub struct AdmissionSettings {
    /// What the mode was written as (`"mandatory"`, `"work,time"`, `"off"`).
    pub mode_name: String,
    pub config: AdmissionConfig,
    pub isolation: IsolationConfig,
    pub deadline: Duration,
}

impl AdmissionSettings {
    /// Whether any proof is required.
    pub fn required(&self) -> bool {
        let m = self.config.mode;
        m.work || m.time || m.stake || m.space
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

use crate::authority::api::hex;

/// An identity written as 64 hex digits.
pub fn parse_identity(text: &str) -> Result<Identity, String> {
    crate::authority::api::hex_hash("identity", text.trim())
        .map(Identity)
        .map_err(|e| format!("{e}: the SHA-256 of the certificate's public key"))
}

/// The identity of a certificate (DER).
pub fn identity_of_certificate(der: &[u8]) -> Result<Identity, String> {
    ClientKey::from_certificate_der(der)
        .map(|k| k.identity())
        .map_err(|e| e.to_string())
}

/// The operator command that adds `amount` of stake to `identity` (what
/// under-staked clients are told to ask for).
pub fn stake_grant_command(identity: &Identity, amount: u64) -> String {
    format!("internet2-server stake grant {identity} --amount {amount}")
}

/// Stake an identity holds below a server's minimum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StakeShortfall {
    pub held: u64,
    pub min: u64,
}

impl StakeShortfall {
    /// From a connection's admission parameters (the server's answer to
    /// `KIND_ADMISSION_PARAMS`): `None` when the server does not ask for
    /// stake or the identity holds enough.
    pub fn of_offer(parameters: &[u8]) -> Result<Option<Self>, String> {
        let offer = wire::decode_offer(parameters)
            .map_err(|e| format!("the server's admission parameters: {e}"))?;
        Ok(Self::of(&offer))
    }

    pub fn of(offer: &Offer) -> Option<Self> {
        (offer.params.mode.stake && offer.stake < offer.stake_min).then_some(Self {
            held: offer.stake,
            min: offer.stake_min,
        })
    }

    /// What the operator grants `identity` to cover it.
    pub fn grant_command(&self, identity: &Identity) -> String {
        stake_grant_command(identity, self.min - self.held)
    }
}

// ---------------------------------------------------------------- the gate

/// The beacon's time as this server reckons it, for judging whether a
/// tick is fresh: the latest tick's own time (decided by whoever ticked
/// it: this node, or a cluster's leader) plus how long this server has
/// held it. A member whose wall clock is off from the leader's by up to
/// [`crate::authority::ca::CLOCK_SLACK`] judges ticks as the leader
/// does; a tick older than that by this server's clock when it was taken
/// in (one loaded from the store, or replayed from the log) is aged by
/// this server's clock, so an old tick is never fresh again.
#[derive(Clone, Copy, Debug)]
struct BeaconClock {
    index: u64,
    unix_s: u64,
    age_s: u64,
    seen: Instant,
}

impl BeaconClock {
    fn of(tick: &crate::consensus::beacon::Tick) -> Self {
        let by_wall = unix_now().saturating_sub(tick.unix_s);
        let slack = crate::authority::ca::CLOCK_SLACK.as_secs();
        Self {
            index: tick.index,
            unix_s: tick.unix_s,
            age_s: if by_wall > slack { by_wall } else { 0 },
            seen: Instant::now(),
        }
    }

    /// The beacon's time now.
    fn now_s(&self) -> u64 {
        self.unix_s + self.age_s + self.seen.elapsed().as_secs()
    }
}

/// What the workers hold: the published snapshot and the outcome queue.
pub struct Gate {
    required: bool,
    deadline: Duration,
    snapshot: Arc<ArcSwap<AdmissionSnapshot>>,
    clock: Arc<ArcSwap<BeaconClock>>,
    suspended: ArcSwap<BTreeSet<Identity>>,
    events: ArrayQueue<AdmissionEvent>,
    events_dropped: AtomicU64,
    status: ArcSwap<serde_json::Value>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("required", &self.required)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl AdmissionGate for Gate {
    fn required(&self) -> bool {
        self.required
    }

    fn deadline(&self) -> Duration {
        self.deadline
    }

    fn offer(&self, leaf: &CertificateDer<'static>) -> Result<Box<dyn PendingAdmission>, Refusal> {
        let client = ClientKey::from_certificate_der(leaf).map_err(|e| Refusal {
            code: crate::consensus::CLOSE_ADMISSION_STAKE,
            reason: e.to_string(),
        })?;
        if self.suspended.load().contains(&client.identity()) {
            return Err(Refusal {
                code: CLOSE_ADMISSION_SUSPENDED,
                reason: format!(
                    "identity {} is suspended after repeated admission failures",
                    hex(&client.identity().0)
                ),
            });
        }
        let snapshot = self.snapshot.load_full();
        // A beacon this far behind (a cluster member catching up, or one
        // cut off from the leader) makes every proof of time fail: refuse
        // at once, as this server's fault, not the client's.
        let policy = snapshot.policy();
        if policy.mode.time
            && self
                .clock
                .load()
                .now_s()
                .saturating_sub(snapshot.parameters().tick.unix_s)
                > policy.window_s
        {
            return Err(Refusal {
                code: CLOSE_ADMISSION_UNAVAILABLE,
                reason: "this server's beacon is behind (a cluster member catching up): try another member, or again shortly".into(),
            });
        }
        Ok(Box::new(Pending {
            params: snapshot.parameters().clone(),
            client,
            snapshot: self.snapshot.clone(),
            clock: self.clock.clone(),
            deadline_ms: self.deadline.as_millis() as u64,
        }))
    }

    fn report(&self, event: AdmissionEvent) {
        if self.events.push(event).is_err() {
            self.events_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn status(&self) -> serde_json::Value {
        let mut status = (**self.status.load()).clone();
        if let Some(map) = status.as_object_mut() {
            map.insert(
                "events_dropped".into(),
                self.events_dropped.load(Ordering::Relaxed).into(),
            );
        }
        status
    }
}

/// One connection's fixed parameters.
struct Pending {
    params: crate::consensus::AdmissionParameters,
    client: ClientKey,
    snapshot: Arc<ArcSwap<AdmissionSnapshot>>,
    clock: Arc<ArcSwap<BeaconClock>>,
    deadline_ms: u64,
}

impl PendingAdmission for Pending {
    fn parameters(&self) -> bytes::Bytes {
        let snapshot = self.snapshot.load();
        let identity = self.client.identity();
        let mut beacon_public_key = [0u8; 32];
        let key = snapshot.beacon_public_key();
        if key.len() == 32 {
            beacon_public_key.copy_from_slice(key);
        }
        let offer = Offer {
            params: self.params.clone(),
            beacon_public_key,
            registered_plot: snapshot.plot(&identity),
            stake: snapshot.stake(&identity),
            stake_min: snapshot.policy().stake_min,
            deadline_ms: self.deadline_ms,
        };
        bytes::Bytes::from(wire::encode_offer(&offer))
    }

    fn identity(&self) -> [u8; 32] {
        self.client.identity().0
    }

    fn verify(&self, binding: &[u8; 32], bundle: &[u8]) -> Result<Admitted, Refusal> {
        let bundle = ProofBundle::decode(bundle).map_err(|e| Refusal {
            code: CLOSE_ADMISSION_MALFORMED,
            reason: format!("malformed bundle: {e}"),
        })?;
        // The current snapshot: a plot registered on this connection counts.
        let snapshot = self.snapshot.load();
        let admitted = snapshot
            .verify(
                &self.params,
                &self.client,
                &Binding::from_exporter(*binding),
                &bundle,
                self.clock.load().now_s(),
            )
            .map_err(|e| Refusal {
                code: e.code(),
                reason: e.to_string(),
            })?;
        let identity = admitted.identity();
        Ok(Admitted {
            identity: identity.0,
            reply: bytes::Bytes::from(wire::encode_admitted(&identity, snapshot.stake(&identity))),
        })
    }
}

// ---------------------------------------------------------- the blocklist

/// The blocklist the workers and the front door enforce: the configured
/// prefixes (SIGHUP reloads them) and those isolation added.
pub struct Blocklists {
    configured: Mutex<BTreeSet<Ipv6Prefix>>,
    isolated: Mutex<BTreeSet<Ipv6Prefix>>,
    store: Arc<BlocklistStore>,
    front_door: Option<Arc<FrontDoor>>,
}

impl Blocklists {
    pub fn new(configured: BTreeSet<Ipv6Prefix>, front_door: Option<Arc<FrontDoor>>) -> Arc<Self> {
        Arc::new(Self {
            store: BlocklistStore::new(&configured),
            configured: Mutex::new(configured),
            isolated: Mutex::new(BTreeSet::new()),
            front_door,
        })
    }

    /// What the workers read.
    pub fn store(&self) -> Arc<BlocklistStore> {
        self.store.clone()
    }

    pub fn set_configured(&self, prefixes: BTreeSet<Ipv6Prefix>) {
        *self.configured.lock().expect("not poisoned") = prefixes;
        self.apply();
    }

    fn set_isolated(&self, prefixes: BTreeSet<Ipv6Prefix>) {
        *self.isolated.lock().expect("not poisoned") = prefixes;
        self.apply();
    }

    pub fn configured(&self) -> BTreeSet<Ipv6Prefix> {
        self.configured.lock().expect("not poisoned").clone()
    }

    fn apply(&self) {
        let mut all = self.configured.lock().expect("not poisoned").clone();
        all.extend(self.isolated.lock().expect("not poisoned").iter().copied());
        self.store.set(&all);
        if let Some(front_door) = &self.front_door
            && let Err(e) = front_door.set_blocklist(&all)
        {
            tracing::error!(error = %e, "the XDP front door refused the blocklist; the workers enforce it");
        }
    }
}

// ------------------------------------------------------- the control plane

/// A live admitted connection: an asset of its owner.
#[derive(Clone, Debug)]
struct ConnectionAsset {
    owner: Identity,
    source: SocketAddr,
    since: Instant,
}

/// The control plane's side of admission (see the module documentation).
pub struct AdmissionRuntime {
    settings: AdmissionSettings,
    gate: Arc<Gate>,
    isolation: Isolation,
    blocklists: Arc<Blocklists>,
    stats: Arc<OnceLock<Arc<StatsRegistry>>>,
    /// (when, handshake attempts then), for the rate.
    last_count: Option<(Instant, u64)>,
    next_tick: Instant,
    published: u64,
    isolation_published: u64,
    assets: HashMap<(usize, u64), ConnectionAsset>,
    owners: HashMap<Identity, u32>,
}

/// How a proposed admission change is answered once applied (with what
/// applying it did; `None` when nothing needed applying).
pub type AnswerFn =
    Box<dyn FnOnce(Option<crate::machine::Applied>) -> Result<Vec<u8>, RequestError>>;

/// An admission request's change, to commit through the cluster's log.
pub struct AdmissionProposal {
    pub command: Option<crate::machine::Command>,
    pub answer: AnswerFn,
}

/// Operator requests on [`STAKE`].
#[derive(Debug, Deserialize, Serialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum StakeRequest {
    Grant { identity: String, amount: u64 },
    Revoke { identity: String, amount: u64 },
    List,
}

/// Operator requests on [`BLOCKLIST`].
#[derive(Debug, Deserialize, Serialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum BlocklistRequest {
    List,
    Remove { prefix: String },
    Unsuspend { identity: String },
}

/// An answer code and message for a refused request (the authority's
/// codes, docs/PROTOCOL.md).
type RequestError = (u16, String);

fn bad_request(message: impl Into<String>) -> RequestError {
    (crate::authority::api::MALFORMED_REQUEST, message.into())
}

impl AdmissionRuntime {
    /// Open the durable state in the state machine's store with the node
    /// key at `node_key_path`, and hand it to the machine (which ticks the
    /// beacon); make sure the operator identity can always be admitted.
    pub fn open(
        machine: &mut Machine,
        settings: AdmissionSettings,
        node_key_path: &Path,
        operator: Option<Identity>,
        blocklists: Arc<Blocklists>,
        stats: Arc<OnceLock<Arc<StatsRegistry>>>,
    ) -> Result<Self, String> {
        let state = AdmissionState::open(
            &machine.authority().database(),
            settings.config,
            node_key_path,
        )
        .map_err(|e| format!("cannot open the admission state: {e}"))?;
        if machine.is_replicated() {
            // The leader ticks the beacon, and grants stake, through the
            // cluster's log (see `runtime::cluster`).
            machine.adopt_admission(state);
        } else {
            machine
                .attach_admission(state, unix_now())
                .map_err(|e| format!("cannot start the admission state: {e}"))?;
        }
        if let Some(operator) = operator.filter(|_| !machine.is_replicated()) {
            ensure_stake(machine, operator)
                .map_err(|e| format!("cannot grant the operator its stake: {e}"))?;
        }
        let state = admission_state(machine);
        let isolation = Isolation::new(settings.isolation.clone())
            .map_err(|e| format!("isolation settings: {e}"))?;
        let gate = Arc::new(Gate {
            required: settings.required(),
            deadline: settings.deadline,
            snapshot: Arc::new(ArcSwap::from_pointee(state.snapshot())),
            clock: Arc::new(ArcSwap::from_pointee(BeaconClock::of(state.latest_tick()))),
            suspended: ArcSwap::from_pointee(BTreeSet::new()),
            events: ArrayQueue::new(EVENTS_MAX),
            events_dropped: AtomicU64::new(0),
            status: ArcSwap::from_pointee(serde_json::Value::Null),
        });
        let mut runtime = Self {
            published: state.generation(),
            gate,
            isolation,
            blocklists,
            stats,
            last_count: None,
            next_tick: Instant::now() + Duration::from_secs(1),
            isolation_published: 0,
            settings,
            assets: HashMap::new(),
            owners: HashMap::new(),
        };
        runtime.publish_status(machine, Instant::now());
        tracing::info!(
            mode = runtime.settings.mode_name,
            deadline_ms = runtime.settings.deadline.as_millis() as u64,
            difficulty = admission_state(machine).difficulty().bits(),
            "admission ready"
        );
        Ok(runtime)
    }

    pub fn gate(&self) -> Arc<Gate> {
        self.gate.clone()
    }

    /// Make sure `identity` (the operator's, after a renewal) holds the
    /// minimum stake: the operator reaches its own server in every mode.
    pub fn ensure_operator(&mut self, machine: &mut Machine, identity: Identity) {
        match ensure_stake(machine, identity) {
            Ok(()) => self.publish_snapshot(machine),
            Err(e) => {
                tracing::error!(error = %e, "could not grant the operator identity its stake")
            }
        }
    }

    /// Tick, adapt, score; returns how long until the next tick.
    /// Whether the beacon's next tick is due (cheap; the control plane asks
    /// between requests so a long queue never delays a tick).
    pub fn tick_due(&self, now: Instant) -> bool {
        now >= self.next_tick
    }

    pub fn poll(&mut self, machine: &mut Machine, now: Instant) -> Duration {
        let mut changed = self.drain_events(now);
        if now >= self.next_tick {
            self.next_tick = now + Duration::from_secs(1);
            // A cluster's leader ticks through the log instead.
            if !machine.is_replicated()
                && let Err(e) = machine.tick(unix_now())
            {
                tracing::error!(error = %e, "beacon tick not stored; the last tick stays");
            }
            let rate = self.handshake_rate(now);
            if let Some(state) = machine.admission_mut() {
                state.on_handshakes(rate, now);
            }
            self.isolation.expire(now);
            // The status shows the new tick and difficulty.
            changed = true;
        }
        self.publish_snapshot(machine);
        if changed {
            self.publish_isolation();
            self.publish_status(machine, now);
        }
        self.next_tick.saturating_duration_since(now)
    }

    /// Handshake attempts per second since the last tick (accepted and
    /// answered with Retry: the flood the difficulty answers).
    fn handshake_rate(&mut self, now: Instant) -> u32 {
        let Some(stats) = self.stats.get() else {
            return 0;
        };
        let total = stats.snapshot().total;
        let count = total.accepted + total.retries;
        let rate = match self.last_count {
            Some((at, before)) => {
                let secs = now.saturating_duration_since(at).as_secs_f64().max(0.001);
                (count.saturating_sub(before) as f64 / secs) as u32
            }
            None => 0,
        };
        self.last_count = Some((now, count));
        rate
    }

    fn drain_events(&mut self, now: Instant) -> bool {
        let mut changed = false;
        for _ in 0..EVENTS_PER_POLL {
            let Some(event) = self.gate.events.pop() else {
                break;
            };
            changed = true;
            match event {
                // The server's own unavailability is nobody's failure.
                AdmissionEvent::Failed { code, .. } if code == CLOSE_ADMISSION_UNAVAILABLE => {}
                AdmissionEvent::Failed {
                    source,
                    identity,
                    code,
                } => {
                    let IpAddr::V6(ip) = source.ip() else {
                        continue;
                    };
                    for isolated in self
                        .isolation
                        .record_failure(ip, identity.map(Identity), now)
                    {
                        tracing::warn!(
                            ?isolated,
                            last_code = format!("{code:#x}"),
                            "isolated after repeated admission failures"
                        );
                    }
                }
                AdmissionEvent::Admitted {
                    worker,
                    conn_id,
                    source,
                    owner,
                } => {
                    let owner = Identity(owner);
                    *self.owners.entry(owner).or_default() += 1;
                    self.assets.insert(
                        (worker, conn_id),
                        ConnectionAsset {
                            owner,
                            source,
                            since: now,
                        },
                    );
                }
                AdmissionEvent::Closed { worker, conn_id } => {
                    if let Some(asset) = self.assets.remove(&(worker, conn_id))
                        && let Some(count) = self.owners.get_mut(&asset.owner)
                    {
                        *count -= 1;
                        if *count == 0 {
                            self.owners.remove(&asset.owner);
                        }
                    }
                }
            }
        }
        changed
    }

    /// Hand the workers the admission state as it is now (stake, plots,
    /// the beacon): call once what it holds is durable.
    pub fn publish(&mut self, machine: &Machine) {
        self.publish_snapshot(machine);
    }

    fn publish_snapshot(&mut self, machine: &Machine) {
        let state = admission_state(machine);
        if state.generation() != self.published {
            self.published = state.generation();
            self.gate.snapshot.store(Arc::new(state.snapshot()));
            let tick = state.latest_tick();
            let held = self.gate.clock.load();
            if (tick.index, tick.unix_s) != (held.index, held.unix_s) {
                self.gate.clock.store(Arc::new(BeaconClock::of(tick)));
            }
        }
    }

    fn publish_isolation(&mut self) {
        if self.isolation.generation() == self.isolation_published {
            return;
        }
        self.isolation_published = self.isolation.generation();
        let prefixes = self
            .isolation
            .blocked()
            .into_iter()
            .map(|(addr, len, _)| Ipv6Prefix { addr, len })
            .collect();
        self.blocklists.set_isolated(prefixes);
        self.gate.suspended.store(Arc::new(
            self.isolation
                .suspended()
                .into_iter()
                .map(|(identity, _)| identity)
                .collect(),
        ));
    }

    fn blocklist_json(&self, now: Instant, max: usize) -> serde_json::Value {
        let blocked = self.isolation.blocked();
        let suspended = self.isolation.suspended();
        serde_json::json!({
            "isolated": blocked.iter().take(max).map(|(addr, len, until)| serde_json::json!({
                "prefix": format!("{addr}/{len}"),
                "expires_in_s": until.saturating_duration_since(now).as_secs(),
            })).collect::<Vec<_>>(),
            "isolated_count": blocked.len(),
            "suspended": suspended.iter().take(max).map(|(identity, until)| serde_json::json!({
                "identity": hex(&identity.0),
                "expires_in_s": until.saturating_duration_since(now).as_secs(),
            })).collect::<Vec<_>>(),
            "suspended_count": suspended.len(),
            "configured": self.blocklists.configured().iter().map(|p| format!("{}/{}", p.addr, p.len)).collect::<Vec<_>>(),
        })
    }

    fn publish_status(&mut self, machine: &Machine, now: Instant) {
        let state = admission_state(machine);
        let config = state.config();
        let tick = state.latest_tick();
        let mut status = serde_json::json!({
            "mode": self.settings.mode_name,
            "required": self.settings.required(),
            "difficulty": state.difficulty().bits(),
            "beacon_tick": tick.index,
            "deadline_ms": self.settings.deadline.as_millis() as u64,
            "stake_min": config.stake_min,
            "plot_k": config.space.k(),
            "challenges": config.space.challenges(),
            "staked_identities": state.list().len(),
            "connection_assets": self.assets.len(),
            "asset_owners": self.owners.len(),
        });
        if let (Some(map), serde_json::Value::Object(lists)) = (
            status.as_object_mut(),
            self.blocklist_json(now, STATUS_LIST_MAX),
        ) {
            map.extend(lists);
        }
        self.gate.status.store(Arc::new(status));
    }

    /// Answer an admission request the authority does not know; `None`
    /// when `kind` is not one.
    pub fn handle(
        &mut self,
        machine: &mut Machine,
        kind: u8,
        caller: Option<&[u8]>,
        operator: bool,
        payload: &[u8],
        now: Instant,
    ) -> Option<Result<Vec<u8>, RequestError>> {
        // Outcomes queued before this request count (the caller's own
        // admission among them).
        self.drain_events(now);
        let result = match kind {
            PLOT_REGISTER => self.register_plot(machine, caller, payload),
            STAKE if operator => self.stake(machine, payload),
            BLOCKLIST if operator => self.blocklist(payload, now),
            ASSETS if operator => Ok(self.assets_json(now)),
            STAKE | BLOCKLIST | ASSETS => Err((
                crate::authority::api::UNAUTHORIZED,
                "only the operator may manage stake and the blocklist".into(),
            )),
            _ => return None,
        };
        // The new stake or plot is published by [`Self::publish`] once the
        // request's group is durable.
        self.publish_isolation();
        self.publish_status(machine, now);
        Some(result)
    }

    /// A cluster member's admission request that changes the ledger
    /// (`STAKE` grant or revoke, `PLOT_REGISTER`), as the command to
    /// commit through the log and how to answer once it is applied;
    /// `None` for any other request (answered by [`Self::handle`]).
    pub fn propose(
        &self,
        machine: &Machine,
        kind: u8,
        caller: Option<&[u8]>,
        operator: bool,
        payload: &[u8],
    ) -> Option<Result<AdmissionProposal, RequestError>> {
        let state = machine.admission()?;
        let stake_answer = |identity: Identity| -> AnswerFn {
            Box::new(move |applied| {
                let stake = match applied {
                    Some(crate::machine::Applied::Admission(AdmissionApplied::Stake { total })) => {
                        total
                    }
                    _ => 0,
                };
                Ok(serde_json::to_vec(
                    &serde_json::json!({"identity": hex(&identity.0), "stake": stake}),
                )
                .expect("JSON"))
            })
        };
        let proposal = match kind {
            STAKE if operator => {
                let request: StakeRequest = match serde_json::from_slice(payload) {
                    Ok(request) => request,
                    Err(e) => return Some(Err(bad_request(format!("stake request: {e}")))),
                };
                let (identity, change) = match request {
                    StakeRequest::List => return None,
                    StakeRequest::Grant { identity, amount } => {
                        let id = match parse_identity(&identity) {
                            Ok(id) => id,
                            Err(e) => return Some(Err(bad_request(e))),
                        };
                        if amount == 0 {
                            return Some(Err(bad_request(
                                "granting 0 changes nothing; give an amount of at least 1",
                            )));
                        }
                        match state.propose_grant(id, amount) {
                            Ok(change) => (id, change),
                            Err(e) => return Some(Err(state_error(e.into()))),
                        }
                    }
                    StakeRequest::Revoke { identity, amount } => {
                        let id = match parse_identity(&identity) {
                            Ok(id) => id,
                            Err(e) => return Some(Err(bad_request(e))),
                        };
                        (
                            id,
                            AdmissionChange::StakeWithdraw {
                                identity: id,
                                amount,
                            },
                        )
                    }
                };
                AdmissionProposal {
                    command: Some(crate::machine::Command::Admission(change)),
                    answer: stake_answer(identity),
                }
            }
            PLOT_REGISTER => {
                let Some(cert) = caller else {
                    return Some(Err((
                        crate::authority::api::UNAUTHORIZED,
                        "registering a plot needs a client certificate".into(),
                    )));
                };
                let identity = match identity_of_certificate(cert) {
                    Ok(identity) => identity,
                    Err(e) => return Some(Err(bad_request(e))),
                };
                let registration = match PlotRegistration::decode(payload) {
                    Ok(registration) => registration,
                    Err(e) => return Some(Err(bad_request(e.to_string()))),
                };
                let change =
                    match state.propose_plot(identity, registration.commitment, registration.k) {
                        Ok(change) => change,
                        Err(e) => return Some(Err(state_error(e.into()))),
                    };
                let stake = state.stake(&identity);
                AdmissionProposal {
                    command: change.map(crate::machine::Command::Admission),
                    answer: Box::new(move |applied| {
                        let stake = match applied {
                            Some(crate::machine::Applied::Admission(AdmissionApplied::Stake {
                                total,
                            })) => total,
                            _ => stake,
                        };
                        Ok(serde_json::to_vec(
                            &serde_json::json!({"identity": hex(&identity.0), "stake": stake}),
                        )
                        .expect("JSON"))
                    }),
                }
            }
            _ => return None,
        };
        Some(Ok(proposal))
    }

    fn assets_json(&self, now: Instant) -> Vec<u8> {
        let mut by_owner: std::collections::BTreeMap<String, Vec<serde_json::Value>> =
            std::collections::BTreeMap::new();
        for asset in self.assets.values().take(ASSETS_LISTED_MAX) {
            by_owner
                .entry(hex(&asset.owner.0))
                .or_default()
                .push(serde_json::json!({
                    "source": asset.source.to_string(),
                    "age_s": now.saturating_duration_since(asset.since).as_secs(),
                }));
        }
        serde_json::to_vec(&serde_json::json!({
            "connection_assets": self.assets.len(),
            "owners": by_owner.into_iter().map(|(owner, connections)| serde_json::json!({
                "owner": owner,
                "connections": connections,
            })).collect::<Vec<_>>(),
        }))
        .expect("JSON")
    }

    fn register_plot(
        &mut self,
        machine: &mut Machine,
        caller: Option<&[u8]>,
        payload: &[u8],
    ) -> Result<Vec<u8>, RequestError> {
        let Some(cert) = caller else {
            return Err((
                crate::authority::api::UNAUTHORIZED,
                "registering a plot needs a client certificate".into(),
            ));
        };
        let identity = identity_of_certificate(cert).map_err(bad_request)?;
        let registration =
            PlotRegistration::decode(payload).map_err(|e| bad_request(e.to_string()))?;
        machine
            .register_plot(identity, registration.commitment, registration.k)
            .map_err(state_error)?;
        tracing::info!(
            identity = hex(&identity.0),
            k = registration.k,
            "plot registered"
        );
        Ok(serde_json::to_vec(&serde_json::json!({
            "identity": hex(&identity.0),
            "stake": admission_state(machine).stake(&identity),
        }))
        .expect("JSON"))
    }

    fn stake(&mut self, machine: &mut Machine, payload: &[u8]) -> Result<Vec<u8>, RequestError> {
        let request: StakeRequest = serde_json::from_slice(payload)
            .map_err(|e| bad_request(format!("stake request: {e}")))?;
        let answer = match request {
            StakeRequest::Grant { identity, amount } => {
                let id = parse_identity(&identity).map_err(bad_request)?;
                if amount == 0 {
                    return Err(bad_request(
                        "granting 0 changes nothing; give an amount of at least 1",
                    ));
                }
                let total = machine.grant(id, amount).map_err(state_error)?;
                tracing::info!(identity, amount, total, "stake granted");
                serde_json::json!({"identity": identity, "stake": total})
            }
            StakeRequest::Revoke { identity, amount } => {
                let id = parse_identity(&identity).map_err(bad_request)?;
                let left = machine.withdraw(id, amount).map_err(state_error)?;
                tracing::info!(identity, amount, left, "stake revoked");
                serde_json::json!({"identity": identity, "stake": left})
            }
            StakeRequest::List => {
                let state = admission_state(machine);
                serde_json::json!({
                    "stake_min": state.config().stake_min,
                    "identities": state.list().iter().map(|(id, stake)| serde_json::json!({
                        "identity": hex(&id.0),
                        "stake": stake,
                        "plot": state.plot(id).is_some(),
                    })).collect::<Vec<_>>(),
                })
            }
        };
        Ok(serde_json::to_vec(&answer).expect("JSON"))
    }

    fn blocklist(&mut self, payload: &[u8], now: Instant) -> Result<Vec<u8>, RequestError> {
        let request: BlocklistRequest = serde_json::from_slice(payload)
            .map_err(|e| bad_request(format!("blocklist request: {e}")))?;
        let answer = match request {
            BlocklistRequest::List => self.blocklist_json(now, usize::MAX),
            BlocklistRequest::Remove { prefix } => {
                let parsed: Ipv6Prefix = prefix.parse().map_err(bad_request)?;
                if !self.isolation.remove_prefix(parsed.addr, parsed.len) {
                    let configured = self.blocklists.configured().contains(&parsed);
                    return Err((
                        crate::authority::api::NOT_FOUND,
                        if configured {
                            format!(
                                "{prefix} comes from the configuration file; remove it there and send SIGHUP"
                            )
                        } else {
                            format!("{prefix} is not on the isolation blocklist")
                        },
                    ));
                }
                tracing::info!(prefix, "isolation entry removed by the operator");
                serde_json::json!({"removed": prefix})
            }
            BlocklistRequest::Unsuspend { identity } => {
                let id = parse_identity(&identity).map_err(bad_request)?;
                if !self.isolation.remove_identity(&id) {
                    return Err((
                        crate::authority::api::NOT_FOUND,
                        format!("{identity} is not suspended"),
                    ));
                }
                serde_json::json!({"unsuspended": identity})
            }
        };
        Ok(serde_json::to_vec(&answer).expect("JSON"))
    }
}

/// The admission state [`AdmissionRuntime::open`] handed the machine.
fn admission_state(machine: &Machine) -> &AdmissionState {
    machine
        .admission()
        .expect("the admission runtime attached its state at open")
}

/// A refused change as the request's answer: a storage failure is
/// `STORAGE`, anything else the request's fault.
fn state_error(e: AuthorityError) -> RequestError {
    use crate::consensus::state::StateError;
    match e {
        AuthorityError::Store { .. } | AuthorityError::Admission(StateError::Storage(_)) => {
            (crate::authority::api::STORAGE, e.to_string())
        }
        AuthorityError::Admission(other) => bad_request(other.to_string()),
        other => bad_request(other.to_string()),
    }
}

/// Top `identity` up to the minimum stake when stake is required.
fn ensure_stake(machine: &mut Machine, identity: Identity) -> Result<(), AuthorityError> {
    let config = admission_state(machine).config();
    let held = admission_state(machine).stake(&identity);
    if config.mode.stake && held < config.stake_min {
        let grant = config.stake_min - held;
        machine.grant(identity, grant)?;
        tracing::info!(
            identity = hex(&identity.0),
            grant,
            "operator identity granted the minimum stake"
        );
    }
    Ok(())
}
