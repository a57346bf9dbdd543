//! The control plane of a cluster member (`--bootstrap federated`): the
//! authority and admission of [`super`], with every change committed
//! through the cluster's Raft log ([`crate::cluster`]) instead of applied
//! at once, and the cluster's own requests (`RAFT_*` between members,
//! `CLUSTER_JOIN`, `CLUSTER_STATUS`, `CLUSTER_REMOVE`, `CLUSTER_FORWARD`).
//!
//! - A request that changes the state is proposed here (keys, serials and
//!   time decided here) and committed by the leader: this member's own
//!   Raft, or the leader's over `CLUSTER_FORWARD` when this member follows.
//!   It is answered from what applying it did here, after the workers got
//!   the snapshots it changed.
//! - Every member publishes what its state machine applied (trust, zone,
//!   admission) to its workers, whoever proposed it.
//! - The leader alone ticks the beacon, through the log.
//! - The member serves with its node certificate (`Usage::Node`, kept in
//!   the data directory), so a member that restarts serves at once, with
//!   or without a quorum.

use super::admission::{AdmissionRuntime, AdmissionSettings, Blocklists};
use super::{
    AuthorityStartError, NODE_KEY_FILE, OPERATOR_FILE, ZonePublisher, is_operator, operator_of,
    trust_snapshot,
};
use crate::authority::api;
use crate::authority::ca::Usage;
use crate::authority::service::{AuthorityService, Caller, Handled, ServiceConfig};
use crate::cluster::node::{self, JoinAnswer, JoinRequest, NodeRecord};
use crate::cluster::{
    ClusterAuthority, Host, LogStore, Member, Outcome, PeerSlot, Raft, StateMachine,
    network::StoqNetwork,
};
use crate::machine::Command;
use crate::{Control, ControlPlane};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use dataplane::assets::address::Locator;
use dataplane::assets::memory::MemoryAssets;
use dataplane::control::{ControlPort, Forwarded, Reply};
use dataplane::protocols::doq::ZoneStore;
use dataplane::protocols::stoq::{ASSET_KINDS, ErrorCode, VM_KINDS};
use dataplane::protocols::stoq_registry as kinds;
use dataplane::trust::{CertificateStore, TrustStore};
use rustls::pki_types::CertificateDer;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The Raft log, beside the store.
pub const RAFT_LOG_FILE: &str = "raft-log.redb";
/// How long one promotion waits for a learner to catch up before it says
/// so in the log (and the leader's next look starts another).
const PROMOTION_TIMEOUT: Duration = Duration::from_secs(600);
/// How often the admission outcomes and the leader's duties are looked at.
const POLL: Duration = Duration::from_millis(50);
/// How long a connection to another member may go without a packet from
/// it before it is given up.
const PEER_IDLE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a removal may take on the leader: the membership change, then
/// the revocation, which waits for an election when the leader removed
/// itself.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a member's request to the leader may take.
const RELAY_TIMEOUT: Duration = Duration::from_secs(2);

/// What makes a node a member.
pub struct ClusterSettings {
    pub node: NodeRecord,
    /// Start a new cluster with this node as its only voter (ignored once
    /// the node's Raft log holds a membership).
    pub init: bool,
    pub backend: dataplane::io::BackendKind,
    pub transport: dataplane::TransportSettings,
    /// The assets this member serves, if any.
    pub assets: Option<MemberAssets>,
}

/// A member's assets: its memory assets, whose locator is in the
/// membership (requests for the others' are proxied to them), and the
/// cluster's storage assets, replicated in every member's store.
pub struct MemberAssets {
    /// The workers' memory assets.
    pub memory: Arc<MemoryAssets>,
    pub node: dataplane::assets::address::NodeNumber,
    /// This member's configured limits (an allocation carries the
    /// proposer's in its command).
    pub limits: crate::assets::StorageLimits,
    /// The VM threads (None: VM execution is off).
    pub vm: Option<Arc<dyn crate::vm::VmHost>>,
}

/// What the workers read, published by the member's control plane.
pub struct Published {
    pub trust: Arc<TrustStore>,
    pub certificates: Arc<CertificateStore>,
    pub zone: Option<Arc<ZoneStore>>,
    pub gate: Arc<super::admission::Gate>,
}

/// Everything the member's thread is made from (all `Send`).
pub struct MemberStart {
    pub data_dir: PathBuf,
    pub config: ServiceConfig,
    pub port: Arc<ControlPort>,
    pub admission: AdmissionSettings,
    pub blocklists: Arc<Blocklists>,
    pub stats: Arc<OnceLock<Arc<dataplane::StatsRegistry>>>,
    pub cluster: ClusterSettings,
}

/// Start the control-plane thread of a cluster member; returns once the
/// member serves (its node certificate committed) with what the workers
/// read.
pub fn start(
    core: Option<usize>,
    start: MemberStart,
) -> Result<(ControlPlane, Published), AuthorityStartError> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let control = ControlPlane::spawn_async(core, move |control| async move {
        match MemberRuntime::open(start, &control).await {
            Ok((member, published)) => {
                let _ = ready_tx.send(Ok(published));
                member.run(control).await;
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        }
    })
    .map_err(|source| AuthorityStartError::Io {
        path: PathBuf::from("control-plane thread"),
        source,
    })?;
    match ready_rx.recv() {
        Ok(Ok(published)) => Ok((control, published)),
        Ok(Err(e)) => {
            control.stop();
            Err(e)
        }
        Err(_) => Err(AuthorityStartError::Cluster(
            "the control plane stopped while starting".into(),
        )),
    }
}

fn cluster_error(e: impl std::fmt::Display) -> AuthorityStartError {
    AuthorityStartError::Cluster(e.to_string())
}

/// A member's control plane, on its thread.
struct MemberRuntime {
    inner: Rc<Inner>,
}

/// A request waiting for the next read fence: told how it went.
type FenceWaiter = tokio::sync::oneshot::Sender<Result<u64, (u16, String)>>;

/// What the member's tasks share (one thread: no locks).
struct Inner {
    me: NodeRecord,
    data_dir: PathBuf,
    service: Rc<RefCell<AuthorityService>>,
    authority: ClusterAuthority,
    /// When the leader's last append was taken.
    heard: crate::cluster::Heard,
    raft: Raft,
    peers: PeerSlot,
    admission: RefCell<AdmissionRuntime>,
    port: Arc<ControlPort>,
    trust: Arc<TrustStore>,
    published_generation: Cell<u64>,
    /// The zone the workers answer from (the apex answers for the
    /// members).
    zone: Option<RefCell<ZonePublisher>>,
    /// Answers of finished tasks, sent once what they changed is
    /// published.
    outbox: RefCell<Vec<(usize, Reply)>>,
    wake: Arc<tokio::sync::Notify>,
    ticking: Cell<bool>,
    next_tick: Cell<Instant>,
    /// Learners this leader is waiting on to promote
    /// ([`Inner::promote_learners`]), and when it next looks for others.
    promoting: RefCell<BTreeSet<u64>>,
    next_promotion_check: Cell<Instant>,
    /// When this follower may next stand for election on its own
    /// ([`Inner::stand_when_leader_silent`]).
    next_stand: Cell<Instant>,
    /// The applied index a snapshot was asked for at, and when
    /// ([`Inner::snapshot_when_due`]).
    snapshot_asked: Cell<Option<(u64, Instant)>>,
    /// What this member serves with (its node certificate), once serving.
    served: RefCell<Option<Arc<CertificateStore>>>,
    /// When the node certificate is next looked at, and whether its
    /// renewal is under way ([`Inner::renew_identities_when_due`]).
    next_renewal_check: Cell<Instant>,
    renewing: Cell<bool>,
    backend: dataplane::io::BackendKind,
    transport: dataplane::TransportSettings,
    /// This member's memory assets ([`MemberAssets::memory`]).
    assets: Option<Arc<MemoryAssets>>,
    /// Storage assets and quotas, through the log.
    storage: Option<super::assets::AssetsRuntime>,
    /// The VM threads, which run the VMs every member holds.
    vm: Option<Arc<super::vm::Front>>,
    /// The applied index the assets' totals and memory limits were last
    /// published at.
    assets_published: Cell<Option<u64>>,
    /// The workers' proxy to the other members' memory assets, and the
    /// membership and peers it was last given.
    asset_proxy: Option<Arc<crate::cluster::asset_proxy::AssetProxy>>,
    proxy_routes_at: Cell<Option<openraft::LogId<u64>>>,
    proxy_peers: Cell<usize>,
    /// Storage requests answered from this member's state wait for a read
    /// fence ([`Inner::fenced`]): those waiting for the next one, and
    /// whether one is being taken.
    fence_waiting: RefCell<Vec<FenceWaiter>>,
    fencing: Cell<bool>,
}

fn raft_config() -> openraft::Config {
    openraft::Config {
        cluster_name: "internet2".into(),
        // Also how long an append may take before it counts as lost.
        heartbeat_interval: crate::cluster::HEARTBEAT_MS,
        // A follower that last heard from its leader waits the leader's
        // lease (openraft: election_timeout_max) plus a random timeout in
        // this range before it stands: 0.8 to 1.0 s after the leader died.
        election_timeout_min: 300,
        election_timeout_max: 500,
        // A chunk and its framing stay under a request's bound.
        snapshot_max_chunk_size: 48 * 1024,
        max_payload_entries: 64,
        // Snapshots are taken by `Inner::snapshot_when_due`.
        snapshot_policy: openraft::SnapshotPolicy::Never,
        ..Default::default()
    }
}

impl MemberRuntime {
    async fn open(
        start: MemberStart,
        control: &Control,
    ) -> Result<(Self, Published), AuthorityStartError> {
        let MemberStart {
            data_dir,
            config,
            port,
            admission,
            blocklists,
            stats,
            cluster,
        } = start;
        let now = SystemTime::now();
        let zone_config = config.zone.clone();
        let mut service = AuthorityService::open(&data_dir, config, now)?;
        service.machine_mut().set_replicated();
        let operator_path = data_dir.join(OPERATOR_FILE);
        let admission = AdmissionRuntime::open(
            service.machine_mut(),
            admission,
            &data_dir.join(NODE_KEY_FILE),
            operator_of(&operator_path),
            blocklists,
            stats,
        )
        .map_err(AuthorityStartError::Admission)?;
        let ca_path = data_dir.join(super::CA_FILE);
        std::fs::write(&ca_path, service.root_pem()).map_err(|source| AuthorityStartError::Io {
            path: ca_path.clone(),
            source,
        })?;
        let service = Rc::new(RefCell::new(service));
        let host: Host = service.clone();
        let state_machine = StateMachine::new(host);
        let recent = state_machine.recent();
        let peers: PeerSlot = Rc::default();
        let log = LogStore::open(&data_dir.join(RAFT_LOG_FILE)).map_err(cluster_error)?;
        let raft_config = Arc::new(raft_config().validate().map_err(cluster_error)?);
        let acks = crate::cluster::network::Acks::default();
        let network = StoqNetwork {
            peers: peers.clone(),
            acks: acks.clone(),
        };
        let me = cluster.node.clone();
        let raft = Raft::new(me.id, raft_config, network, log, state_machine)
            .await
            .map_err(cluster_error)?;
        if cluster.init && !raft.is_initialized().await.map_err(cluster_error)? {
            let member = Member {
                name: me.name.clone(),
                address: me.address.clone(),
                locator: cluster
                    .assets
                    .as_ref()
                    .map(|assets| assets.memory.locator().0),
            };
            raft.initialize(BTreeMap::from([(me.id, member)]))
                .await
                .map_err(cluster_error)?;
            tracing::info!(id = me.id, name = %me.name, "a new cluster: this node is its first member");
        }
        let locator = cluster
            .assets
            .as_ref()
            .map(|assets| assets.memory.locator().0);
        if let Some(known) = raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&me.id)
            && known.locator != locator
        {
            tracing::warn!(
                known = ?known.locator.map(|l| Locator(l).to_string()),
                configured = ?locator.map(|l| Locator(l).to_string()),
                "the cluster knows this member by another asset locator than its configuration's: the others proxy by the one they know (remove this member and join again to change it)"
            );
        }
        let authority = ClusterAuthority::new(service.clone(), raft.clone())
            .forwarding(peers.clone(), recent)
            .leasing(acks);
        let material = service.borrow().trust();
        let trust = TrustStore::new(trust_snapshot(&material)?);
        let zone = match &zone_config {
            Some(zone) => {
                let service = service.borrow();
                let opened = service.machine().zone().ok_or_else(|| {
                    AuthorityStartError::Zone("the store opened without its zone".into())
                })?;
                Some(RefCell::new(ZonePublisher::start(
                    opened,
                    zone.server_name.clone(),
                    apex_members(&raft),
                )?))
            }
            None => None,
        };
        let gate = admission.gate();
        let heard = authority.heard();
        let storage = cluster.assets.as_ref().map(|assets| {
            let mut service = service.borrow_mut();
            let machine = service.machine_mut();
            machine.set_asset_limits(assets.limits);
            // Its workers answer no storage read: the control plane does,
            // once it knows it is up to date ([`Inner::fenced`]).
            super::assets::AssetsRuntime::new(
                machine,
                assets.node,
                assets.memory.locator(),
                Some(assets.memory.clone()),
            )
        });
        let asset_proxy = cluster
            .assets
            .as_ref()
            .map(|_| crate::cluster::asset_proxy::AssetProxy::install(&port, me.id));
        let vm = cluster.assets.as_ref().and_then(|assets| {
            let front =
                super::vm::Front::new(assets.vm.clone()?, service.borrow().machine().changes());
            front.plug(&port);
            Some(front)
        });
        let inner = Rc::new(Inner {
            me,
            data_dir,
            service,
            authority,
            heard,
            raft,
            peers,
            admission: RefCell::new(admission),
            port,
            trust,
            published_generation: Cell::new(material.generation),
            zone,
            outbox: RefCell::default(),
            wake: control.notifier(),
            ticking: Cell::new(false),
            next_tick: Cell::new(Instant::now()),
            promoting: RefCell::default(),
            next_promotion_check: Cell::new(Instant::now()),
            next_stand: Cell::new(Instant::now()),
            snapshot_asked: Cell::new(None),
            served: RefCell::new(None),
            next_renewal_check: Cell::new(Instant::now()),
            renewing: Cell::new(false),
            backend: cluster.backend,
            transport: cluster.transport,
            assets: cluster.assets.map(|assets| assets.memory),
            storage,
            vm,
            assets_published: Cell::new(None),
            asset_proxy,
            proxy_routes_at: Cell::new(None),
            proxy_peers: Cell::new(0),
            fence_waiting: RefCell::default(),
            fencing: Cell::new(false),
        });
        if let Some(assets) = &inner.assets {
            assets.set_proxies();
        }
        // The node certificate: made now by the first member of a new
        // cluster (it is the leader once its election is over).
        if node::node_identity(&inner.data_dir)
            .map_err(cluster_error)?
            .is_none()
        {
            if !cluster.init {
                return Err(AuthorityStartError::Cluster(format!(
                    "{} holds no node certificate: start with --cluster-init (a new cluster) or --join ADDRESS --join-token TOKEN",
                    inner.data_dir.display()
                )));
            }
            inner.certify_self().await?;
        }
        let identity = node::node_identity(&inner.data_dir)
            .map_err(cluster_error)?
            .ok_or_else(|| cluster_error("the node certificate was not written"))?;
        inner.start_peers(&identity)?;
        let certificates = CertificateStore::new(identity.chain.clone(), &identity.key)
            .map_err(|e| AuthorityStartError::Tls(e.to_string()))?;
        *inner.served.borrow_mut() = Some(certificates.clone());
        let published = Published {
            trust: inner.trust.clone(),
            certificates,
            zone: inner
                .zone
                .as_ref()
                .map(|publisher| publisher.borrow().store()),
            gate,
        };
        // This member's own records in the zone, and (on the first member)
        // the operator's identity and stake: committed once a leader is
        // there, in the background.
        if let Some(zone) = zone_config {
            let inner = inner.clone();
            tokio::task::spawn_local(async move { inner.register_records(zone).await });
        }
        tracing::info!(id = inner.me.id, name = %inner.me.name, address = %inner.me.address, "cluster member serving");
        Ok((Self { inner }, published))
    }

    async fn run(self, control: Control) {
        let inner = self.inner;
        loop {
            while let Some(request) = inner.port.next_request() {
                inner.dispatch(request);
            }
            inner.publish();
            inner.flush();
            let now = Instant::now();
            inner.leader_duties(now);
            inner.promote_learners(now);
            inner.stand_when_leader_silent(now);
            inner.snapshot_when_due(now);
            inner.renew_identities_when_due(now);
            {
                let mut service = inner.service.borrow_mut();
                inner
                    .admission
                    .borrow_mut()
                    .poll(service.machine_mut(), now);
            }
            if !control.wait(POLL).await {
                break;
            }
        }
        let _ = inner.raft.shutdown().await;
        if let Some(proxy) = &inner.asset_proxy {
            proxy.set_peers(None);
        }
        inner.peers.borrow_mut().take();
    }
}

/// `CLUSTER_STATUS`'s request.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusRequest {
    /// This member's own view, not the leader's (which a follower relays).
    #[serde(default)]
    own_view: bool,
}

/// A request's caller, its certificate checked again.
struct Who {
    caller: Caller,
    verified: Option<Vec<u8>>,
    operator: bool,
    /// The Raft id of a member's node certificate: a node certificate
    /// (both usages, `cluster-node.NAME`) of this CA, unrevoked (removing
    /// a member revokes it).
    member: Option<u64>,
}

fn error(code: u16, message: impl Into<String>) -> (u16, String) {
    (code, message.into())
}

fn assets_off() -> (u16, String) {
    error(
        ErrorCode::AssetsOff as u16,
        "this member serves no assets ([hypermesh_assets] node_number is not set)",
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Inner {
    /// The first member's own node certificate: once it leads, through
    /// the log like any change.
    async fn certify_self(self: &Rc<Self>) -> Result<(), AuthorityStartError> {
        self.raft
            .wait(Some(Duration::from_secs(30)))
            .current_leader(self.me.id, "this node leads its new cluster")
            .await
            .map_err(cluster_error)?;
        let serial = self.issue_own_node_certificate().await?;
        tracing::info!(%serial, "node certificate issued and logged");
        // The operator's identity (every member gets a copy when it
        // joins) and, where admission needs it, its stake.
        self.ensure_operator_identity().await?;
        // What the store held before the cluster began (a single node's
        // data directory can start one) is in no log entry: a snapshot of
        // it, and the log purged up to that, make every member that joins
        // start from the whole state.
        let applied = self.raft.metrics().borrow().last_applied;
        if let Some(applied) = applied {
            self.raft
                .trigger()
                .snapshot()
                .await
                .map_err(cluster_error)?;
            self.raft
                .wait(Some(Duration::from_secs(60)))
                .ge(
                    openraft::metrics::Metric::Snapshot(Some(applied)),
                    "the cluster's first snapshot",
                )
                .await
                .map_err(cluster_error)?;
            self.raft
                .trigger()
                .purge_log(applied.index)
                .await
                .map_err(cluster_error)?;
            tracing::info!(
                index = applied.index,
                "the cluster's first snapshot is taken; members join from it"
            );
        }
        Ok(())
    }

    /// Connect to the other members with `identity`.
    fn start_peers(&self, identity: &dataplane::ClientIdentity) -> Result<(), AuthorityStartError> {
        let root = CertificateDer::from(self.service.borrow().trust().root_der);
        let remote = node::check_address(&self.me.address).map_err(cluster_error)?;
        let mut transport = self.transport.clone();
        // Members keep their connections open between heartbeats, and give
        // one up soon once the other end stops answering (a member killed
        // and restarted has forgotten it: waiting out a long idle timeout
        // would keep an election from reaching it).
        transport.keep_alive = Some(Duration::from_millis(500));
        transport.idle_timeout = PEER_IDLE_TIMEOUT;
        let target = dataplane::client::ClientTarget {
            remote,
            server_name: String::new(),
            trust: dataplane::ServerTrust::Roots(vec![root]),
            identity: Some(identity.clone()),
            backend: self.backend,
            transport,
            admitter: None,
        };
        let peers = dataplane::client::peers::Peers::spawn(&target).map_err(cluster_error)?;
        *self.peers.borrow_mut() = Some(Arc::new(peers));
        Ok(())
    }

    /// This member's AAAA and TLSA records, committed once a leader takes
    /// them (retried while none does).
    async fn register_records(self: Rc<Self>, zone: crate::dns::ZoneConfig) {
        for attempt in 0..120 {
            let pending = {
                let service = self.service.borrow();
                match service
                    .server_spki_sha256()
                    .and_then(|pin| service.propose_server_records(&zone, pin))
                {
                    Ok(pending) => pending,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot plan this member's zone records");
                        return;
                    }
                }
            };
            let Some(pending) = pending else { return };
            match self.authority.commit(pending).await {
                Ok(_) => {
                    tracing::info!(name = %zone.server_name, "this member's zone records are set");
                    return;
                }
                Err(e) if attempt % 20 == 0 => {
                    tracing::info!(error = %e, "this member's zone records wait for the leader")
                }
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn is_leader(&self) -> bool {
        let metrics = self.raft.metrics().borrow().clone();
        metrics.current_leader == Some(self.me.id)
    }

    /// The operator's identity in this member's data directory, issued
    /// (through the log) when it is missing or past half its lifetime,
    /// and, where admission needs it, the stake of its key.
    async fn ensure_operator_identity(&self) -> Result<(), AuthorityStartError> {
        let pending = self
            .service
            .borrow()
            .propose_operator_identity(&self.data_dir.join(OPERATOR_FILE), SystemTime::now())?;
        if let Some(pending) = pending {
            self.authority
                .commit(pending)
                .await
                .map_err(cluster_error)?;
        }
        if let Some(operator) = operator_of(&self.data_dir.join(OPERATOR_FILE)) {
            let grant = {
                let service = self.service.borrow();
                service.machine().admission().and_then(|state| {
                    let config = state.config();
                    let held = state.stake(&operator);
                    (config.mode.stake && held < config.stake_min)
                        .then(|| state.propose_grant(operator, config.stake_min - held))
                })
            };
            if let Some(change) = grant {
                let change = change.map_err(|e| cluster_error(e.to_string()))?;
                self.authority
                    .submit(Command::Admission(change))
                    .await
                    .map_err(cluster_error)?;
            }
        }
        Ok(())
    }

    /// A node certificate for this member's own key, committed through
    /// the log and saved as its `cluster-node.pem`; its serial.
    async fn issue_own_node_certificate(
        &self,
    ) -> Result<crate::authority::ca::Serial, AuthorityStartError> {
        let ip = node::check_address(&self.me.address)
            .map_err(cluster_error)?
            .ip();
        let (certificate, certify) =
            self.service
                .borrow()
                .propose_own_member(&self.me.name, ip, SystemTime::now())?;
        match self.authority.submit(Command::Certify(certify)).await {
            Ok(Outcome::Applied(_)) => {}
            Ok(other) => {
                return Err(cluster_error(format!(
                    "the node certificate was not applied: {other:?}"
                )));
            }
            Err(e) => return Err(cluster_error(e)),
        }
        let intermediate = self
            .service
            .borrow()
            .authority()
            .ca()
            .intermediate_der()
            .to_vec();
        node::save_node_certificate(&self.data_dir, &certificate.cert_der, &intermediate)
            .map_err(cluster_error)?;
        Ok(certificate.serial)
    }

    /// Whether this member's copy of the operator identity is fresh.
    fn operator_identity_fresh(&self) -> bool {
        self.service
            .borrow()
            .operator_identity_is_fresh(&self.data_dir.join(OPERATOR_FILE), SystemTime::now())
    }

    /// Past half its lifetime, this member's node certificate is renewed
    /// (same key, a new serial, through the log like any certificate): the
    /// member then serves with it and reaches the others with it. The old
    /// one stays valid until it expires, so connections made with it go
    /// on. Looked at every RENEWAL_CHECK, with this member's copy of the
    /// operator identity (`ensure_operator_identity`).
    fn renew_identities_when_due(self: &Rc<Self>, now: Instant) {
        const RENEWAL_CHECK: Duration = Duration::from_secs(10);
        if now < self.next_renewal_check.get() || self.renewing.get() {
            return;
        }
        self.next_renewal_check.set(now + RENEWAL_CHECK);
        let Some(served) = self.served.borrow().clone() else {
            return;
        };
        if !self.operator_identity_fresh() {
            self.renewing.set(true);
            let inner = self.clone();
            tokio::task::spawn_local(async move {
                match inner.ensure_operator_identity().await {
                    Ok(()) => tracing::info!("operator identity renewed"),
                    Err(e) => {
                        tracing::warn!(error = %e, "the operator identity is due for renewal; trying again shortly")
                    }
                }
                inner.renewing.set(false);
            });
            return;
        }
        // Past half its life, or without one of the server's names (they
        // changed since it was issued).
        let due = node::node_identity(&self.data_dir)
            .ok()
            .flatten()
            .and_then(|identity| {
                let der = identity.chain.first()?;
                let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
                let from = cert.validity().not_before.timestamp();
                let until = cert.validity().not_after.timestamp();
                let now = i64::try_from(unix_now()).ok()?;
                // (At most hourly for the names: one certificate that
                // cannot carry them must not be renewed in a loop.)
                Some(
                    now >= from + (until - from) / 2
                        || (now >= from + 3600 && !self.service.borrow().carries_server_names(der)),
                )
            })
            .unwrap_or(false);
        if !due {
            return;
        }
        self.renewing.set(true);
        let inner = self.clone();
        tokio::task::spawn_local(async move {
            if let Err(e) = inner.renew_node_certificate(&served).await {
                tracing::warn!(error = %e, "the node certificate is due for renewal; trying again shortly");
            }
            inner.renewing.set(false);
        });
    }

    /// Renew this member's node certificate now (same key, a new serial,
    /// through the log) and serve and reach the members with it: the
    /// scheduled renewal, and an operator's `ROTATE` on a member.
    async fn renew_node_certificate(
        &self,
        served: &CertificateStore,
    ) -> Result<api::Rotated, String> {
        let serial = self
            .issue_own_node_certificate()
            .await
            .map_err(|e| e.to_string())?;
        let identity = match node::node_identity(&self.data_dir) {
            Ok(Some(identity)) => identity,
            other => {
                return Err(format!(
                    "the renewed node certificate cannot be read back: {:?}",
                    other.map(|_| ())
                ));
            }
        };
        served
            .swap(identity.chain.clone(), &identity.key)
            .map_err(|e| format!("the renewed node certificate cannot be served: {e}"))?;
        self.start_peers(&identity).map_err(|e| {
            format!("cannot reach the other members with the renewed node certificate: {e}")
        })?;
        let not_after = identity
            .chain
            .first()
            .and_then(|der| x509_parser::parse_x509_certificate(der).ok())
            .map_or(0, |(_, cert)| {
                u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0)
            });
        tracing::info!(%serial, "node certificate renewed: serving and reaching the members with it");
        Ok(api::Rotated {
            serial: serial.to_string(),
            not_after,
        })
    }

    /// `ROTATE` on a member: its certificate is its node certificate, so
    /// that is what is renewed (the scheduled renewal, now). The operator
    /// only, as on a single node.
    fn rotate(self: &Rc<Self>, request: Forwarded, operator: bool) {
        if !operator {
            return self.answer(
                &request,
                Err(error(api::UNAUTHORIZED, "ROTATE is the operator's")),
            );
        }
        if let Err(e) = crate::authority::service::parse::<api::NoArguments>(&request.payload) {
            return self.answer(&request, Err((e.code, e.message)));
        }
        let Some(served) = self.served.borrow().clone() else {
            return self.answer(
                &request,
                Err(error(
                    api::STORAGE,
                    "this member serves no node certificate yet",
                )),
            );
        };
        if self.renewing.replace(true) {
            return self.answer(
                &request,
                Err(error(
                    api::STORAGE,
                    "this member's certificate is being renewed already: ask again in a moment",
                )),
            );
        }
        let inner = self.clone();
        tokio::task::spawn_local(async move {
            let result = inner.renew_node_certificate(&served).await;
            inner.renewing.set(false);
            inner.answer(
                &request,
                result
                    .map(|rotated| serde_json::to_vec(&rotated).expect("JSON"))
                    .map_err(|e| error(api::STORAGE, e)),
            );
        });
    }

    /// Snapshot once the log since the last snapshot is as long as the
    /// log before it (and at least SNAPSHOT_EVERY entries): a snapshot
    /// copies the whole store, so taking one every fixed number of entries
    /// would cost each entry more as the store grows; this way the cost per
    /// entry stays flat. The log is purged up to the snapshot (openraft
    /// keeps its last 1000 entries).
    fn snapshot_when_due(self: &Rc<Self>, now: Instant) {
        let (applied, last) = {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow();
            (
                metrics.last_applied.map_or(0, |id| id.index),
                metrics.snapshot.map_or(0, |id| id.index),
            )
        };
        if let Some((asked, at)) = self.snapshot_asked.get()
            && last < asked
            && now.duration_since(at) < Duration::from_secs(60)
        {
            return;
        }
        if applied.saturating_sub(last) < crate::cluster::SNAPSHOT_EVERY.max(last) {
            return;
        }
        self.snapshot_asked.set(Some((applied, now)));
        tracing::info!(applied, last_snapshot = last, "taking a snapshot");
        let raft = self.raft.clone();
        tokio::task::spawn_local(async move {
            if let Err(e) = raft.trigger().snapshot().await {
                tracing::warn!(error = %e, "could not ask for a snapshot");
            }
        });
    }

    /// A voter that followed a leader and has not heard from it in
    /// [`crate::cluster::heard_lately`]'s window stands for election, at a
    /// random moment in the next STAND_JITTER and then at most every
    /// STAND_EVERY until a leader is heard. Left to openraft's timer
    /// alone, a follower that had lost an earlier election to a longer
    /// log waits an extra twice the election timeout, and failovers took
    /// 1.9 s instead of 1. A member that has not heard a leader since it
    /// started never stands this way (it must not unseat a live leader
    /// while it rejoins).
    fn stand_when_leader_silent(self: &Rc<Self>, now: Instant) {
        const STAND_JITTER: Duration = Duration::from_millis(200);
        const STAND_EVERY: Duration = Duration::from_millis(500);
        if self.heard.get().is_none()
            || crate::cluster::heard_lately(&self.heard)
            || now < self.next_stand.get()
        {
            return;
        }
        let metrics = self.raft.metrics().borrow().clone();
        let voter = metrics
            .membership_config
            .membership()
            .voter_ids()
            .any(|id| id == self.me.id);
        if !voter || metrics.current_leader == Some(self.me.id) {
            return;
        }
        let mut byte = [0u8; 1];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut byte);
        let jitter = STAND_JITTER * u32::from(byte[0]) / 255;
        if self.next_stand.get() + STAND_EVERY < now {
            // The first moment of this silence: wait the jitter first, so
            // the followers do not all stand at once.
            self.next_stand.set(now + jitter);
            return;
        }
        self.next_stand.set(now + STAND_EVERY + jitter);
        tracing::info!(leader = ?self.heard.get().map(|(id, _)| id), "the leader is silent: standing for election");
        let raft = self.raft.clone();
        tokio::task::spawn_local(async move {
            if let Err(e) = raft.trigger().elect().await {
                tracing::warn!(error = %e, "could not stand for election");
            }
        });
    }

    /// The leader ticks the beacon every second, through the log.
    fn leader_duties(self: &Rc<Self>, now: Instant) {
        if now < self.next_tick.get() || self.ticking.get() || !self.is_leader() {
            return;
        }
        self.next_tick.set(now + Duration::from_secs(1));
        let change = self
            .service
            .borrow()
            .machine()
            .admission()
            // The beacon's time never waits for a leader whose clock is
            // behind the one before: it goes on a second per tick.
            .and_then(|state| {
                let next = state.latest_tick().unix_s + 1;
                state.propose_tick(unix_now().max(next))
            });
        let Some(change) = change else { return };
        self.ticking.set(true);
        let inner = self.clone();
        tokio::task::spawn_local(async move {
            let started = Instant::now();
            let result = inner.authority.submit(Command::Admission(change)).await;
            let took = started.elapsed();
            if took > Duration::from_secs(1) {
                tracing::warn!(
                    took_ms = took.as_millis() as u64,
                    "a beacon tick took over a second to commit"
                );
            }
            if let Err(e) = result {
                tracing::warn!(error = %e, "a beacon tick was not committed");
            }
            inner.ticking.set(false);
            inner.wake.notify_one();
        });
    }

    /// Swap in new snapshots for the workers when the state changed.
    fn publish(&self) {
        let service = self.service.borrow();
        let material = service.trust();
        if material.generation != self.published_generation.get() {
            match trust_snapshot(&material) {
                Ok(snapshot) => {
                    self.trust.swap(snapshot);
                    self.published_generation.set(material.generation);
                }
                Err(e) => tracing::error!(error = %e, "could not build a trust snapshot"),
            }
        }
        if let (Some(publisher), Some(zone)) = (&self.zone, service.machine().zone())
            && let Err(e) = publisher
                .borrow_mut()
                .publish(zone, &apex_members(&self.raft))
        {
            tracing::error!(error = %e, "could not publish the zone; the workers keep the one before");
        }
        self.admission.borrow_mut().publish(service.machine());
        if let Some(proxy) = &self.asset_proxy {
            // Looked at after every batch of requests: no copy of the
            // metrics, only the membership's log id compared.
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow();
            let membership = &metrics.membership_config;
            if self.proxy_routes_at.get() != *membership.log_id() {
                proxy.set_members(membership.membership().nodes());
                self.proxy_routes_at.set(*membership.log_id());
            }
            let peers = self.peers.borrow().clone();
            let at = peers.as_ref().map_or(0, |p| Arc::as_ptr(p) as usize);
            if at != self.proxy_peers.get() {
                proxy.set_peers(peers);
                self.proxy_peers.set(at);
            }
        }
        if let Some(storage) = &self.storage {
            let applied = self.raft.metrics().borrow().last_applied.map(|id| id.index);
            if applied != self.assets_published.get() {
                storage.publish(service.machine());
                storage.publish_memory_limits(service.machine());
                self.assets_published.set(applied);
            }
        }
    }

    /// Send the answers of finished tasks (after [`Self::publish`]).
    fn flush(&self) {
        let answers = std::mem::take(&mut *self.outbox.borrow_mut());
        for (worker, reply) in answers {
            super::send_reply(&self.port, worker, reply);
        }
    }

    fn answer(&self, request: &Forwarded, result: Result<Vec<u8>, (u16, String)>) {
        self.outbox.borrow_mut().push((
            request.worker,
            Reply {
                ticket: request.ticket,
                kind: request.kind,
                result,
            },
        ));
        self.wake.notify_one();
    }

    /// The caller of `request`; whether it is a member is worked out only
    /// for the kinds that ask (an issuance need not parse its caller's
    /// certificate once more).
    fn who(&self, request: &Forwarded) -> Who {
        let caller = Caller {
            cert_der: request.peer.as_ref().map(|c| c.as_ref().to_vec()),
        };
        let verified = caller.cert_der.clone().filter(|der| {
            super::caller_checks(self.service.borrow().authority(), der, Usage::Client)
        });
        let operator = is_operator(verified.as_deref());
        let asks_for_member = matches!(
            request.kind,
            kinds::RAFT_APPEND
                | kinds::RAFT_VOTE
                | kinds::RAFT_SNAPSHOT
                | kinds::CLUSTER_FORWARD
                | kinds::CLUSTER_READ_INDEX
                | kinds::CLUSTER_STATUS
                | kinds::CLUSTER_REMOVE
        );
        let member = verified
            .as_deref()
            .filter(|_| asks_for_member)
            .and_then(|der| {
                let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
                dataplane::trust::node_name(&cert)?;
                super::caller_checks(self.service.borrow().authority(), der, Usage::Node)
                    .then_some(())?;
                // Not checked against this member's configuration: one that is
                // catching up does not know the newer members yet. A removed
                // member's certificate is revoked (`remove`).
                Some(node::node_id(cert.public_key().raw))
            });
        Who {
            caller,
            verified,
            operator,
            member,
        }
    }

    /// Answer one forwarded request, now or from a task.
    fn dispatch(self: &Rc<Self>, request: Forwarded) {
        let who = self.who(&request);
        let kind = request.kind;
        let members_only = matches!(
            kind,
            kinds::RAFT_APPEND
                | kinds::RAFT_VOTE
                | kinds::RAFT_SNAPSHOT
                | kinds::CLUSTER_FORWARD
                | kinds::CLUSTER_READ_INDEX
        );
        if members_only && who.member.is_none() {
            let refused = error(
                api::UNAUTHORIZED,
                "only the cluster's members may send this (a node certificate)",
            );
            return self.answer(&request, Err(refused));
        }
        let inner = self.clone();
        match kind {
            kinds::RAFT_APPEND | kinds::RAFT_VOTE | kinds::RAFT_SNAPSHOT => {
                let sender = who.member.expect("members only, checked above");
                tokio::task::spawn_local(async move {
                    let result = inner.raft_message(kind, sender, &request.payload).await;
                    inner.answer(&request, result);
                });
            }
            kinds::CLUSTER_FORWARD => {
                tokio::task::spawn_local(async move {
                    let result = inner.forwarded(&request.payload).await;
                    inner.answer(&request, result);
                });
            }
            kinds::CLUSTER_READ_INDEX if !self.is_leader() => {
                self.answer(&request, Err(self.not_leader()));
            }
            // The leader's own fences and the followers' asks share one
            // confirmation round at a time.
            kinds::CLUSTER_READ_INDEX => {
                tokio::task::spawn_local(async move {
                    let answer = inner
                        .fenced()
                        .await
                        .map(|index| index.to_be_bytes().to_vec());
                    inner.answer(&request, answer);
                });
            }
            kinds::CLUSTER_JOIN => {
                tokio::task::spawn_local(async move {
                    let result = inner.join(&request.payload).await;
                    inner.answer(&request, result);
                });
            }
            kinds::CLUSTER_STATUS => {
                tokio::task::spawn_local(async move {
                    let result = match serde_json::from_slice::<StatusRequest>(&request.payload) {
                        Ok(asked) => inner.status(who.member.is_some() || asked.own_view).await,
                        Err(e) => Err(error(
                            api::MALFORMED_REQUEST,
                            format!("status request: {e}"),
                        )),
                    };
                    inner.answer(&request, result);
                });
            }
            kinds::CLUSTER_REMOVE if who.operator || who.member.is_some() => {
                tokio::task::spawn_local(async move {
                    let result = inner.remove(&request.payload).await;
                    inner.answer(&request, result);
                });
            }
            kinds::CLUSTER_REMOVE => self.answer(
                &request,
                Err(error(
                    api::UNAUTHORIZED,
                    "only the operator may remove a member",
                )),
            ),
            kinds::QUOTAS => self.serve_assets(request, who),
            // Storage requests (the workers answer memory ones, and proxy
            // them to the other members).
            kind if ASSET_KINDS.contains(&kind) => self.serve_assets(request, who),
            kind if VM_KINDS.contains(&kind) => self.serve_vm(request, who),
            _ => self.serve(request, who),
        }
    }

    /// Wait for a read fence (`ClusterAuthority::read_fence`): the index
    /// it waited for. The requests that arrive while one is being taken
    /// share the next one, which starts after they arrived.
    async fn fenced(self: &Rc<Self>) -> Result<u64, (u16, String)> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.fence_waiting.borrow_mut().push(tx);
        if !self.fencing.replace(true) {
            let inner = self.clone();
            tokio::task::spawn_local(async move {
                loop {
                    let waiting = std::mem::take(&mut *inner.fence_waiting.borrow_mut());
                    if waiting.is_empty() {
                        inner.fencing.set(false);
                        return;
                    }
                    let fence = inner
                        .authority
                        .read_fence()
                        .await
                        .map_err(|e| (e.code, e.message));
                    for tx in waiting {
                        let _ = tx.send(fence.clone());
                    }
                }
            });
        }
        rx.await
            .unwrap_or_else(|_| Err(error(api::STORAGE, "the read fence was dropped")))
    }

    /// A VM request: every member holds every VM asset, and runs it on its
    /// own VM threads (which answer the worker).
    fn serve_vm(&self, request: Forwarded, who: Who) {
        let ours = |_: Locator| true;
        let handled = {
            let service = self.service.borrow();
            super::vm::handle(
                service.machine(),
                self.storage.as_ref(),
                self.vm.as_ref(),
                &request,
                who.verified.as_deref(),
                &ours,
            )
        };
        match handled {
            Some(super::vm::Handled::Running) => {}
            Some(super::vm::Handled::Now(result)) => self.answer(&request, result),
            None => self.answer(&request, Err(assets_off())),
        }
    }

    /// A storage asset request or the operator's `QUOTAS`: a read at once
    /// from this member's store (every member holds every storage asset),
    /// a change through the log, answered from this member's apply of it.
    fn serve_assets(self: &Rc<Self>, request: Forwarded, who: Who) {
        self.serve_assets_fenced(request, who, false);
    }

    /// A storage or quota request; `fenced` once this member applied what
    /// the cluster had committed when it arrived.
    fn serve_assets_fenced(self: &Rc<Self>, request: Forwarded, who: Who, fenced: bool) {
        let Some(storage) = &self.storage else {
            return self.answer(&request, Err(assets_off()));
        };
        // Every member holds every storage asset: the locator says which
        // member allocated it, and any member answers it (also once that
        // one has left).
        let ours = |_: Locator| true;
        let plan = {
            let service = self.service.borrow();
            storage.plan(
                service.machine(),
                request.kind,
                super::assets::Asker::of(&request, who.verified.as_deref(), who.operator),
                &request.payload,
                &ours,
            )
        };
        let change = match plan {
            None => return self.answer(&request, Err(assets_off())),
            Some(Ok(super::assets::Plan::Change(change))) => change,
            // Answered from this member's state (a read, a list, or a
            // refusal): first a fence, so that it sees every change the
            // cluster committed before it arrived, wherever that was
            // answered; then planned again.
            _ if !fenced => {
                let inner = self.clone();
                tokio::task::spawn_local(async move {
                    match inner.fenced().await {
                        // Who the caller is, as of the fence: a revocation
                        // answered elsewhere is applied here now.
                        Ok(_) => {
                            let who = inner.who(&request);
                            inner.serve_assets_fenced(request, who, true)
                        }
                        Err(refused) => inner.answer(&request, Err(refused)),
                    }
                });
                return;
            }
            Some(Err(refused)) => return self.answer(&request, Err(refused)),
            Some(Ok(super::assets::Plan::Now(answer))) => {
                return self.answer(&request, Ok(answer));
            }
        };
        let inner = self.clone();
        tokio::task::spawn_local(async move {
            let asked = super::assets::Asked::of(&change);
            let storage = inner.storage.as_ref().expect("checked above");
            let result = match inner.authority.submit(Command::Asset(change)).await {
                Ok(Outcome::Applied(crate::machine::Applied::Asset(applied))) => {
                    let service = inner.service.borrow();
                    storage.answer(service.machine(), asked, applied)
                }
                Ok(Outcome::Refused(refused)) => Err(storage.refusal(&refused)),
                Ok(other) => Err(error(
                    api::STORAGE,
                    format!("an asset change was applied as {other:?}"),
                )),
                Err(e) => Err((e.code, e.message)),
            };
            inner.answer(&request, result);
        });
    }

    /// An authority or admission request.
    fn serve(self: &Rc<Self>, request: Forwarded, who: Who) {
        let proposal = {
            let service = self.service.borrow();
            self.admission.borrow().propose(
                service.machine(),
                request.kind,
                who.verified.as_deref(),
                who.operator,
                &request.payload,
            )
        };
        match proposal {
            Some(Err(refused)) => return self.answer(&request, Err(refused)),
            Some(Ok(proposal)) => {
                let inner = self.clone();
                tokio::task::spawn_local(async move {
                    let applied = match proposal.command {
                        None => Ok(None),
                        Some(command) => match inner.authority.submit(command).await {
                            Ok(Outcome::Applied(applied)) => Ok(Some(applied)),
                            Ok(Outcome::Refused(refused)) => {
                                Err(error(api::MALFORMED_REQUEST, refused.to_string()))
                            }
                            Ok(Outcome::Nothing) => Ok(None),
                            Err(e) => Err((e.code, e.message)),
                        },
                    };
                    let result = applied.and_then(proposal.answer);
                    inner.answer(&request, result);
                });
                return;
            }
            None => {}
        }
        let admission = {
            let mut service = self.service.borrow_mut();
            self.admission.borrow_mut().handle(
                service.machine_mut(),
                request.kind,
                who.verified.as_deref(),
                who.operator,
                &request.payload,
                Instant::now(),
            )
        };
        if let Some(result) = admission {
            return self.answer(&request, result);
        }
        if request.kind == api::ROTATE {
            return self.rotate(request, who.operator);
        }
        let handled = self.service.borrow_mut().handle_request(
            &who.caller,
            request.kind,
            &request.payload,
            SystemTime::now(),
        );
        match handled {
            Handled::Answer(answer) => {
                self.answer(&request, answer.map_err(|e| (e.code, e.message)))
            }
            Handled::Commit(pending) => {
                let inner = self.clone();
                tokio::task::spawn_local(async move {
                    let result = inner.authority.commit(*pending).await;
                    // A rotation's certificate is the workers' only on a
                    // single node; a member serves with its node certificate.
                    inner.service.borrow_mut().take_rotated();
                    inner.answer(&request, result.map_err(|e| (e.code, e.message)));
                });
            }
        }
    }

    /// A Raft message from member `sender`, which must be the leader (or
    /// candidate) it speaks for: one member cannot speak for another.
    async fn raft_message(
        &self,
        kind: u8,
        sender: u64,
        payload: &[u8],
    ) -> Result<Vec<u8>, (u16, String)> {
        use crate::cluster::rpc;
        let impostor = |claimed: u64| {
            error(
                api::UNAUTHORIZED,
                format!("member {sender} sent a message for member {claimed}"),
            )
        };
        let malformed = |what: &str| {
            error(
                api::MALFORMED_REQUEST,
                format!("a malformed {what} message"),
            )
        };
        let failed = |e: &dyn std::fmt::Display| error(api::STORAGE, e.to_string());
        match kind {
            kinds::RAFT_APPEND => {
                let message = rpc::decode_append(payload).ok_or_else(|| malformed("append"))?;
                if message.vote.leader_id().node_id != sender {
                    return Err(impostor(message.vote.leader_id().node_id));
                }
                let response = self
                    .raft
                    .append_entries(message)
                    .await
                    .map_err(|e| failed(&e))?;
                if !matches!(
                    response,
                    openraft::raft::AppendEntriesResponse::HigherVote(_)
                ) {
                    self.heard.set(Some((sender, Instant::now())));
                }
                Ok(rpc::encode_append_response(&response))
            }
            kinds::RAFT_VOTE => {
                let message = rpc::decode_vote_request(payload).ok_or_else(|| malformed("vote"))?;
                if message.vote.leader_id().node_id != sender {
                    return Err(impostor(message.vote.leader_id().node_id));
                }
                let candidate_log = message.last_log_id;
                let response = self.raft.vote(message).await.map_err(|e| failed(&e))?;
                // A candidate refused for a shorter log than this member's,
                // while no leader is heard: stand at once. Left to its
                // timer, this member would wait out the candidate's new
                // term as well (openraft restarts the timer on a vote),
                // which made a failover take about 1.9 s instead of 1.
                if !response.vote_granted
                    && response.last_log_id > candidate_log
                    && !crate::cluster::heard_lately(&self.heard)
                    && !self.is_leader()
                {
                    tracing::info!(
                        candidate = sender,
                        "a candidate with a shorter log stood: standing instead"
                    );
                    if let Err(e) = self.raft.trigger().elect().await {
                        tracing::warn!(error = %e, "could not stand for election");
                    }
                }
                Ok(rpc::encode_vote_response(&response))
            }
            _ => {
                let message = rpc::decode_snapshot(payload).ok_or_else(|| malformed("snapshot"))?;
                if message.vote.leader_id().node_id != sender {
                    return Err(impostor(message.vote.leader_id().node_id));
                }
                let response = self
                    .raft
                    .install_snapshot(message)
                    .await
                    .map_err(|e| failed(&e))?;
                Ok(rpc::encode_snapshot_response(&response))
            }
        }
    }

    /// `CLUSTER_FORWARD` on the leader: append a member's proposal; the
    /// answer is its log index (the member answers from its own apply).
    async fn forwarded(&self, payload: &[u8]) -> Result<Vec<u8>, (u16, String)> {
        let command = crate::machine::codec::decode(payload)
            .ok_or_else(|| error(api::MALFORMED_REQUEST, "a malformed command"))?;
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        match self.raft.client_write(command).await {
            Ok(written) => Ok(written.log_id.index.to_be_bytes().to_vec()),
            Err(_) => Err(self.not_leader()),
        }
    }

    fn not_leader(&self) -> (u16, String) {
        let leader = match self.authority.leader() {
            Some((_, member)) => format!("the leader is {member}"),
            None => "no leader is known yet".to_owned(),
        };
        error(
            api::NOT_LEADER,
            format!("this member is not the cluster's leader; {leader}: ask it, or another member"),
        )
    }

    /// Refused when `locator` is a member's other than `id`.
    fn locator_free(&self, locator: Option<u64>, id: u64) -> Result<(), (u16, String)> {
        let membership = self.raft.metrics().borrow().membership_config.clone();
        if let Some(locator) = locator
            && let Some((_, holder)) = membership
                .membership()
                .nodes()
                .find(|(other, member)| **other != id && member.locator == Some(locator))
        {
            return Err(error(
                api::NAME_TAKEN,
                format!(
                    "the asset locator {} is {holder}'s: give this node another [hypermesh_assets] node_number (or asset_prefix)",
                    Locator(locator)
                ),
            ));
        }
        Ok(())
    }

    /// `CLUSTER_JOIN` on the leader: spend the token with the new node's
    /// certificate, add it as a learner, hand it the cluster's keys.
    async fn join(self: &Rc<Self>, payload: &[u8]) -> Result<Vec<u8>, (u16, String)> {
        let request: JoinRequest = serde_json::from_slice(payload)
            .map_err(|e| error(api::MALFORMED_REQUEST, format!("join request: {e}")))?;
        node::check_name(&request.name).map_err(|e| error(api::MALFORMED_REQUEST, e))?;
        let address =
            node::check_address(&request.address).map_err(|e| error(api::MALFORMED_REQUEST, e))?;
        let spki = STANDARD
            .decode(&request.public_key)
            .map_err(|_| error(api::MALFORMED_REQUEST, "public_key is not base64"))?;
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let id = node::node_id(&spki);
        let membership = self.raft.metrics().borrow().membership_config.clone();
        self.locator_free(request.locator, id)?;
        if let Some((_, taken)) = membership.membership().nodes().find(|(other, member)| {
            **other == id || member.name == request.name || member.address == request.address
        }) {
            return Err(error(
                api::NAME_TAKEN,
                format!(
                    "{taken} is a member already: remove it first (cluster remove {})",
                    taken.name
                ),
            ));
        }
        let (certificate, certify) = self
            .service
            .borrow()
            .propose_member(
                &request.token,
                &request.name,
                address.ip(),
                &request.server_names,
                spki,
                SystemTime::now(),
            )
            .map_err(|e| (e.code, e.message))?;
        match self.authority.submit(Command::Certify(certify)).await {
            Ok(Outcome::Applied(_)) => {}
            Ok(Outcome::Refused(refused)) => {
                return Err(error(api::TOKEN_USED, refused.to_string()));
            }
            Ok(Outcome::Nothing) => {
                return Err(error(api::STORAGE, "the join was applied as nothing"));
            }
            Err(e) => return Err((e.code, e.message)),
        }
        // Again: another join may have taken the locator meanwhile.
        self.locator_free(request.locator, id)?;
        let member = Member {
            name: request.name.clone(),
            address: request.address.clone(),
            locator: request.locator,
        };
        self.raft
            .add_learner(id, member, false)
            .await
            .map_err(|e| error(api::STORAGE, format!("cannot add the learner: {e}")))?;
        tracing::info!(id, name = %request.name, address = %request.address, serial = %certificate.serial, "a node joined as a learner");
        self.start_promotion(id);
        let files = node::shared_files(&self.data_dir).map_err(|e| error(api::STORAGE, e))?;
        let answer = JoinAnswer {
            id,
            node_certificate: STANDARD.encode(&certificate.cert_der),
            files,
        };
        Ok(serde_json::to_vec(&answer).expect("JSON"))
    }

    /// Every second, on the leader: promote every learner of the
    /// membership that no promotion is under way for. A join's promotion
    /// ends when the leader that added the learner loses its leadership,
    /// or when the learner has not caught up in [`PROMOTION_TIMEOUT`];
    /// the leader after it, or the next look, starts it again, so a
    /// learner that catches up becomes a voter whoever leads.
    fn promote_learners(self: &Rc<Self>, now: Instant) {
        if now < self.next_promotion_check.get() || !self.is_leader() {
            return;
        }
        self.next_promotion_check.set(now + Duration::from_secs(1));
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let learners: Vec<u64> = membership
            .nodes()
            .map(|(id, _)| *id)
            .filter(|id| !voters.contains(id))
            .collect();
        for id in learners {
            if !self.promoting.borrow().contains(&id) {
                tracing::info!(
                    id,
                    "a learner is still to be promoted: waiting for it to catch up"
                );
                self.start_promotion(id);
            }
        }
    }

    fn start_promotion(self: &Rc<Self>, id: u64) {
        if !self.promoting.borrow_mut().insert(id) {
            return;
        }
        let inner = self.clone();
        tokio::task::spawn_local(async move {
            inner.clone().promote(id).await;
            inner.promoting.borrow_mut().remove(&id);
        });
    }

    /// Make learner `id` a voter once it caught up with the leader's log.
    async fn promote(self: Rc<Self>, id: u64) {
        let deadline = Instant::now() + PROMOTION_TIMEOUT;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let metrics = self.raft.metrics().borrow().clone();
            if metrics.current_leader != Some(self.me.id) {
                tracing::warn!(
                    id,
                    "no longer the leader: the learner's promotion is the next leader's"
                );
                return;
            }
            let membership = metrics.membership_config.membership();
            if membership.get_node(&id).is_none() || membership.voter_ids().any(|v| v == id) {
                // Removed meanwhile, or a voter already.
                return;
            }
            let matched = metrics
                .replication
                .as_ref()
                .and_then(|r| r.get(&id).cloned().flatten())
                .map(|log_id| log_id.index);
            let caught_up = match (matched, metrics.last_log_index) {
                (Some(matched), Some(last)) => last.saturating_sub(matched) <= 8,
                _ => false,
            };
            if !caught_up {
                continue;
            }
            match self
                .raft
                .change_membership(
                    openraft::ChangeMembers::AddVoterIds(BTreeSet::from([id])),
                    false,
                )
                .await
            {
                Ok(_) => {
                    tracing::info!(id, "the learner caught up and is a voter now");
                    return;
                }
                Err(e) => {
                    tracing::warn!(id, error = %e, "promoting the learner failed; trying again")
                }
            }
        }
        tracing::error!(
            id,
            "the learner did not catch up in time; it stays a learner until it does (or `cluster remove` removes it)"
        );
    }

    /// `CLUSTER_STATUS`: the leader's view (with each member's lag); a
    /// follower relays it, or answers its own view when asked for it or
    /// when the leader is out of reach.
    async fn status(&self, own_view: bool) -> Result<Vec<u8>, (u16, String)> {
        let peers = self.peers.borrow().clone();
        if !self.is_leader()
            && !own_view
            && let Some((leader_id, leader)) = self.authority.leader()
            && let Some(peers) = peers
            && let Ok(answer) = crate::cluster::network::request(
                &peers,
                &leader.address,
                Some(leader_id),
                kinds::CLUSTER_STATUS,
                b"{}".to_vec(),
                RELAY_TIMEOUT,
            )
            .await
        {
            return Ok(answer.to_vec());
        }
        Ok(serde_json::to_vec(&self.local_status()).expect("JSON"))
    }

    fn local_status(&self) -> serde_json::Value {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let leader = metrics
            .current_leader
            .and_then(|id| membership.get_node(&id))
            .map(|m| m.name.clone());
        let last = metrics.last_log_index.unwrap_or(0);
        let members: Vec<serde_json::Value> = membership
            .nodes()
            .map(|(id, member)| {
                let lag = metrics.replication.as_ref().map(|replication| {
                    let matched = replication
                        .get(id)
                        .cloned()
                        .flatten()
                        .map_or(0, |log_id| log_id.index);
                    last.saturating_sub(matched)
                });
                serde_json::json!({
                    "id": id,
                    "name": member.name,
                    "address": member.address,
                    "role": if voters.contains(id) { "voter" } else { "learner" },
                    "lag": lag,
                    "asset_locator": member.locator.map(|l| Locator(l).to_string()),
                })
            })
            .collect();
        serde_json::json!({
            "answered_by": self.me.name,
            "leader": leader,
            "term": metrics.current_term,
            "commit_index": metrics.last_applied.map_or(0, |id| id.index),
            "last_log_index": last,
            "members": members,
        })
    }

    /// `CLUSTER_REMOVE`: the leader takes the member out of the
    /// configuration; a follower relays it.
    async fn remove(&self, payload: &[u8]) -> Result<Vec<u8>, (u16, String)> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Remove {
            name: String,
        }
        let request: Remove = serde_json::from_slice(payload)
            .map_err(|e| error(api::MALFORMED_REQUEST, format!("remove request: {e}")))?;
        if !self.is_leader() {
            let Some((leader_id, leader)) = self.authority.leader() else {
                return Err(self.not_leader());
            };
            let peers = self
                .peers
                .borrow()
                .clone()
                .ok_or_else(|| self.not_leader())?;
            return crate::cluster::network::request(
                &peers,
                &leader.address,
                Some(leader_id),
                kinds::CLUSTER_REMOVE,
                payload.to_vec(),
                REMOVE_TIMEOUT,
            )
            .await
            .map(|answer| answer.to_vec())
            .map_err(|e| match e {
                crate::cluster::network::PeerError::Refused { code, message } => (code, message),
                crate::cluster::network::PeerError::Unreachable(why) => {
                    self.not_leader_because(&why)
                }
                unknown => error(api::STORAGE, unknown.to_string()),
            });
        }
        let membership = self.raft.metrics().borrow().membership_config.clone();
        let Some(id) = membership
            .membership()
            .nodes()
            .find(|(_, member)| member.name == request.name)
            .map(|(id, _)| *id)
        else {
            return Err(error(
                api::NOT_FOUND,
                format!("{:?} is not a member", request.name),
            ));
        };
        let voters: BTreeSet<u64> = membership.membership().voter_ids().collect();
        if voters.len() == 1 && voters.contains(&id) {
            return Err(error(
                api::MALFORMED_REQUEST,
                "the last voter cannot be removed",
            ));
        }
        let change = if voters.contains(&id) {
            openraft::ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            openraft::ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        self.raft
            .change_membership(change, false)
            .await
            .map_err(|e| error(api::STORAGE, format!("the membership change failed: {e}")))?;
        tracing::info!(id, name = %request.name, "member removed");
        // Its node certificates are revoked with it: only an unrevoked
        // node certificate is heard as a member.
        let revoked = self.revoke_member(&request.name, id).await;
        if let Err(e) = &revoked {
            tracing::error!(name = %request.name, error = %e, "the removed member's node certificate is not revoked; revoke it with cert revoke");
        }
        Ok(serde_json::to_vec(&serde_json::json!({
            "removed": request.name,
            "certificates_revoked": revoked.as_ref().ok(),
            "revocation_error": revoked.err(),
        }))
        .expect("JSON"))
    }

    /// Revoke the live node certificates of member `name` whose key is
    /// member `id`'s, through the log; their serials.
    async fn revoke_member(&self, name: &str, id: u64) -> Result<Vec<String>, String> {
        use crate::authority::registry::{CertificateFilter, RevocationReason};
        let serials: Vec<_> = {
            let service = self.service.borrow();
            let records = service
                .authority()
                .certificates(&CertificateFilter::Name(node::node_subject(name)), None)
                .map_err(|e| e.to_string())?;
            records
                .into_iter()
                .filter(|r| r.revocation.is_none() && r.usage == Usage::Node)
                .filter(|r| {
                    x509_parser::parse_x509_certificate(&r.cert_der)
                        .is_ok_and(|(_, cert)| node::node_id(cert.public_key().raw) == id)
                })
                .map(|r| r.serial)
                .collect()
        };
        let mut revoked = Vec::new();
        for serial in serials {
            let revoke = self
                .service
                .borrow()
                .authority()
                .propose_revocation(
                    serial,
                    Some(RevocationReason::CessationOfOperation),
                    SystemTime::now(),
                )
                .map_err(|e| e.to_string())?;
            // Removing the leader itself leaves the others to elect one
            // first: the revocation waits for it.
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                match self.authority.submit(Command::Revoke(revoke.clone())).await {
                    Ok(Outcome::Applied(_)) => {
                        revoked.push(serial.to_string());
                        break;
                    }
                    Ok(other) => return Err(format!("the revocation was not applied: {other:?}")),
                    // A leader that removed itself hears of the next leader
                    // no more: it hands the revocation to the members left,
                    // and the one that leads now appends it.
                    Err(e) if e.code == api::NOT_LEADER && self.handed_over(&revoke).await => {
                        revoked.push(serial.to_string());
                        break;
                    }
                    Err(e) if e.code == api::NOT_LEADER && Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
        }
        Ok(revoked)
    }

    /// When this node is no longer a member: whether one of the members
    /// appended `revoke` (as their leader) when asked.
    async fn handed_over(&self, revoke: &crate::authority::logged::Revoke) -> bool {
        let membership = self.raft.metrics().borrow().membership_config.clone();
        if membership.membership().get_node(&self.me.id).is_some() {
            return false;
        }
        let Ok(bytes) = crate::machine::codec::encode(&Command::Revoke(revoke.clone())) else {
            return false;
        };
        let Some(peers) = self.peers.borrow().clone() else {
            return false;
        };
        let members: Vec<(u64, String)> = membership
            .membership()
            .nodes()
            .map(|(id, member)| (*id, member.address.clone()))
            .collect();
        for (id, address) in members {
            let answer = crate::cluster::network::request(
                &peers,
                &address,
                Some(id),
                kinds::CLUSTER_FORWARD,
                bytes.clone(),
                RELAY_TIMEOUT,
            )
            .await;
            if answer.is_ok() {
                tracing::info!(leader = %address, "this removed member's revocation was handed to the members left");
                return true;
            }
        }
        false
    }

    fn not_leader_because(&self, why: &dyn std::fmt::Display) -> (u16, String) {
        let (code, message) = self.not_leader();
        (code, format!("{message} ({why})"))
    }
}

/// The members (voters and learners) in id order, with the address each
/// serves on: the cluster's name (the apex) answers with them.
fn apex_members(raft: &Raft) -> super::ApexMembers {
    let metrics = raft.metrics();
    let metrics = metrics.borrow();
    let members = metrics
        .membership_config
        .membership()
        .nodes()
        .filter_map(|(id, member)| {
            Some(super::ApexMember {
                id: *id,
                name: member.name.clone(),
                address: member.address.parse().ok()?,
            })
        })
        .collect();
    super::ApexMembers {
        membership_index: metrics
            .membership_config
            .log_id()
            .map_or(0, |log_id| log_id.index),
        members,
    }
}
