//! The control-plane runtime: what runs on the control-plane thread of a
//! server. [`AuthorityRuntime`] answers the `stoq/1` requests the workers
//! forward, publishes the trust snapshot (roots and revoked serials), the
//! zone and the server certificate the workers' handshakes read, and
//! renews the server certificate every `certificate_rotation_hours` (and
//! on an operator's `ROTATE`); [`admission`] is its four-proof admission;
//! [`fair_queue`] serves callers in turn.
//!
//! Workers never wait for it: a handshake reads the last published
//! snapshot; a forwarded request is answered on the worker's reply queue.

pub mod admission;
pub mod assets;
pub mod checked;
pub mod cluster;
pub mod fair_queue;
pub mod vm;

use crate::authority::ca::Usage;
use crate::authority::service::{
    AuthorityService, Caller, ServerCertificate, ServiceConfig, TrustMaterial,
};
use crate::dns::{NameRecords, Published, Zone as DnsZone, ZoneSnapshot};
use dataplane::control::{ControlPort, Reply};
use dataplane::protocols::doq::{PublishedName, Zone, ZoneStore};
use dataplane::trust::{CertificateStore, TrustSnapshot, TrustStore};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Requests served per wake-up before rotation and the operator identity
/// get a look (the beacon is checked after every request).
const REQUESTS_PER_POLL: usize = 256;
/// How long a full reply queue is retried before the reply is dropped (the
/// client then times out): a worker that stopped reading must not stall
/// the authority.
pub(crate) const REPLY_RETRY: Duration = Duration::from_millis(50);

/// Requests in one group commit (one fsync): bounds how long the first of
/// them waits for its answer.
const GROUP_MAX: usize = 64;

/// The exit status when the store fails to make applied changes durable
/// (EX_IOERR).
const EXIT_STORE_FAILED: i32 = 74;

/// How often the control plane looks at queued admission outcomes.
const ADMISSION_POLL: Duration = Duration::from_millis(50);

/// The root clients trust, beside the server's data (`--ca` points here).
pub const CA_FILE: &str = "ca.pem";
/// A client identity for local operator commands (0600).
pub const OPERATOR_FILE: &str = "operator.pem";

#[derive(Debug, thiserror::Error)]
pub enum AuthorityStartError {
    #[error(transparent)]
    Authority(#[from] crate::authority::logged::AuthorityError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the authority's certificate is unusable for TLS: {0}")]
    Tls(String),
    #[error("the DNS zone cannot be served: {0}")]
    Zone(String),
    #[error("admission cannot start: {0}")]
    Admission(String),
    #[error("the cluster member cannot start: {0}")]
    Cluster(String),
}

pub struct AuthorityRuntime {
    service: AuthorityService,
    port: Arc<ControlPort>,
    trust: Arc<TrustStore>,
    certificates: Arc<CertificateStore>,
    published_generation: u64,
    rotation: Duration,
    next_rotation: Instant,
    operator_path: PathBuf,
    next_operator_check: Instant,
    /// The zone the `doq` workers (and the legacy gateway) answer from.
    zone: Option<ZonePublisher>,
    /// Four-proof admission: state, beacon, isolation.
    admission: self::admission::AdmissionRuntime,
    /// Forwarded requests waiting, per caller.
    fair: self::fair_queue::FairQueue,
    /// Storage assets and quotas (None until [`Self::attach_assets`]:
    /// asset addressing is off).
    assets: Option<self::assets::AssetsRuntime>,
    /// The VM threads (None: VM execution is off).
    vm: Option<Arc<self::vm::Front>>,
}

/// Where admission plugs into the authority at start.
pub struct AdmissionPlug {
    pub settings: self::admission::AdmissionSettings,
    pub blocklists: Arc<self::admission::Blocklists>,
    /// The workers' counters, once they run (the handshake rate).
    pub stats: Arc<std::sync::OnceLock<Arc<dataplane::StatsRegistry>>>,
}

/// Whether `der` chains to `authority`'s CA for `usage` now and is not
/// revoked. Cheap on a caller's repeated requests: the CA remembers the
/// signatures it verified; validity and revocation are checked each time.
pub(crate) fn caller_checks(
    authority: &crate::authority::logged::Authority,
    der: &[u8],
    usage: Usage,
) -> bool {
    authority
        .verify_chain(der, usage, SystemTime::now())
        .is_ok()
}

/// The beacon's node key, beside the authority's store (0600).
pub const NODE_KEY_FILE: &str = "beacon-node.key";

/// The admission identity of the operator identity file's certificate.
fn operator_of(path: &Path) -> Option<crate::consensus::stake::Identity> {
    let leaf = crate::authority::pem::load_cert(path).ok()?;
    self::admission::identity_of_certificate(&leaf).ok()
}

/// Whether `cert_der` is the operator's certificate (the handshake already
/// checked it chains to this CA, which reserves the name).
fn is_operator(cert_der: Option<&[u8]>) -> bool {
    cert_der
        .and_then(|der| x509_parser::parse_x509_certificate(der).ok())
        .is_some_and(|(_, cert)| dataplane::trust::names_operator(&cert))
}

impl AuthorityRuntime {
    /// Open (or create) the CA, log and registry under `data_dir`, issue
    /// the server's certificate and the operator identity, and write the
    /// root to `ca.pem`.
    pub fn start(
        data_dir: &Path,
        config: ServiceConfig,
        rotation: Duration,
        port: Arc<ControlPort>,
        admission: AdmissionPlug,
    ) -> Result<Self, AuthorityStartError> {
        let now = SystemTime::now();
        let zone_config = config.zone.clone();
        let mut service = AuthorityService::open(data_dir, config, now)?;
        // The server publishes itself (its addresses and its key's pin,
        // stable across rotations) before anyone can ask.
        let zone = match &zone_config {
            Some(zone) => {
                let pin = service.server_spki_sha256()?;
                service.register_server(zone, pin, now)?;
                let opened = service.machine().zone().ok_or_else(|| {
                    AuthorityStartError::Zone("the store opened without its zone".into())
                })?;
                Some(ZonePublisher::start(
                    opened,
                    zone.server_name.clone(),
                    ApexMembers::default(),
                )?)
            }
            None => None,
        };
        let ca_path = data_dir.join(CA_FILE);
        std::fs::write(&ca_path, service.root_pem()).map_err(|source| AuthorityStartError::Io {
            path: ca_path.clone(),
            source,
        })?;
        let operator_path = data_dir.join(OPERATOR_FILE);
        service.ensure_operator_identity(&operator_path, now)?;
        let material = service.trust();
        let trust = TrustStore::new(trust_snapshot(&material)?);
        let server = service.issue_server_certificate(now)?;
        tracing::info!(serial = %server.serial, "server certificate issued and logged");
        let (chain, key) = tls_parts(&server);
        let certificates = CertificateStore::new(chain, &key)
            .map_err(|e| AuthorityStartError::Tls(e.to_string()))?;
        let operator = operator_of(&operator_path);
        let admission = self::admission::AdmissionRuntime::open(
            service.machine_mut(),
            admission.settings,
            &data_dir.join(NODE_KEY_FILE),
            operator,
            admission.blocklists,
            admission.stats,
        )
        .map_err(|e| AuthorityStartError::Admission(format!("{e:#}")))?;
        let instant = Instant::now();
        Ok(Self {
            admission,
            fair: self::fair_queue::FairQueue::default(),
            assets: None,
            vm: None,
            service,
            port,
            trust,
            certificates,
            published_generation: material.generation,
            rotation,
            next_rotation: instant + rotation,
            operator_path,
            next_operator_check: instant + rotation,
            zone,
        })
    }

    /// Serve storage assets and the operator's quotas as node `node` with
    /// `locator`, with `limits`; `memory` is the workers' memory assets,
    /// which take the operator's memory quotas from here.
    pub fn attach_assets(
        &mut self,
        node: dataplane::assets::address::NodeNumber,
        locator: dataplane::assets::address::Locator,
        limits: crate::assets::StorageLimits,
        memory: Option<Arc<dataplane::assets::memory::MemoryAssets>>,
    ) {
        let machine = self.service.machine_mut();
        machine.set_asset_limits(limits);
        let mut assets = self::assets::AssetsRuntime::new(machine, node, locator, memory);
        assets.serve_reads_from_workers(machine, &self.port);
        self.assets = Some(assets);
    }

    /// The zone store the workers read (None without a zone).
    pub fn zone(&self) -> Option<Arc<ZoneStore>> {
        self.zone.as_ref().map(ZonePublisher::store)
    }

    /// The gate the workers admit `stoq/1` connections with.
    pub fn admission_gate(&self) -> Arc<self::admission::Gate> {
        self.admission.gate()
    }

    pub fn trust(&self) -> Arc<TrustStore> {
        self.trust.clone()
    }

    pub fn certificates(&self) -> Arc<CertificateStore> {
        self.certificates.clone()
    }

    pub fn root_der(&self) -> Vec<u8> {
        self.service.trust().root_der
    }

    /// Serve what is queued (fairly: one request per caller in turn, see
    /// [`crate::fair_queue`]) in groups that share one fsync, rotate when
    /// due; returns how long to sleep.
    pub fn poll(&mut self, now: Instant) -> Duration {
        let mut served = 0;
        while served < REQUESTS_PER_POLL {
            let group = self.serve_group(REQUESTS_PER_POLL - served);
            if group == 0 {
                break;
            }
            served += group;
        }
        if now >= self.next_rotation {
            self.rotate();
        }
        if now >= self.next_operator_check {
            self.next_operator_check = now + self.rotation;
            if let Err(e) = self
                .service
                .ensure_operator_identity(&self.operator_path, SystemTime::now())
            {
                tracing::error!(error = %e, "could not renew the operator identity");
            }
            if let Some(operator) = operator_of(&self.operator_path) {
                self.admission
                    .ensure_operator(self.service.machine_mut(), operator);
            }
        }
        let next_tick = self.admission.poll(self.service.machine_mut(), now);
        if served == REQUESTS_PER_POLL {
            return Duration::ZERO;
        }
        // Admission outcomes queue without a wake-up: look at them often.
        next_tick
            .min(self.next_rotation.saturating_duration_since(now))
            .min(ADMISSION_POLL)
    }

    /// Move what the workers queued into the per-caller queues; a caller
    /// past its bound is answered `BUSY` at once.
    fn take_forwarded(&mut self) {
        while let Some(request) = self.port.next_request() {
            if let Err(refused) = self.fair.push(request) {
                self.send_reply(
                    refused.worker,
                    Reply {
                        ticket: refused.ticket,
                        kind: refused.kind,
                        result: Err((
                            dataplane::protocols::stoq::ErrorCode::Busy as u16,
                            "too many of your requests are waiting; retry in a moment".into(),
                        )),
                    },
                );
            }
        }
    }

    /// Serve up to `max` (at most [`GROUP_MAX`]) queued requests as one
    /// group commit: every change they make is written into one
    /// transaction as it is made (later requests and reads see it) and
    /// made durable by one commit and one fsync at the end;
    /// only then is anything published or answered, so no client holds an
    /// answer that a crash could take back. Returns how many were served.
    fn serve_group(&mut self, max: usize) -> usize {
        self.service.machine_mut().defer_durability();
        let mut answers = Vec::new();
        while answers.len() < max.min(GROUP_MAX) {
            self.take_forwarded();
            let Some(request) = self.fair.pop() else {
                break;
            };
            answers.extend(self.serve(request));
        }
        if let Err(e) = self.service.machine_mut().make_durable() {
            // What was applied in memory is not on disk: only a restart,
            // which reloads the store, makes them agree again. No answer of
            // the group was sent.
            tracing::error!(error = %e, "the authority's store could not be made durable; stopping");
            std::process::exit(EXIT_STORE_FAILED);
        }
        if let Some(rotated) = self.service.take_rotated() {
            self.publish_certificate(&rotated, "operator request");
            self.next_rotation = Instant::now() + self.rotation;
        }
        // Publish before answering: once a client holds the answer, a
        // revocation applies to the next handshake and an update is in the
        // next DNS answer. Nothing of the group was published before its
        // fsync (stake and plots included).
        self.publish_trust();
        self.publish_zone();
        self.admission.publish(self.service.machine());
        if let Some(assets) = &self.assets {
            assets.publish(self.service.machine());
        }
        // The beacon ticks every second whatever the queue holds: between
        // groups (at most GROUP_MAX requests long), outside them, so a tick
        // is durable before the workers hand it out.
        let at = Instant::now();
        if self.admission.tick_due(at) {
            self.admission.poll(self.service.machine_mut(), at);
        }
        let served = answers.len();
        for (worker, reply) in answers {
            self.send_reply(worker, reply);
        }
        served
    }

    /// Answer one request (the answer waits for the group's fsync); None
    /// when a VM thread answers it.
    fn serve(&mut self, request: dataplane::control::Forwarded) -> Option<(usize, Reply)> {
        let caller = Caller {
            cert_der: request.peer.as_ref().map(|c| c.as_ref().to_vec()),
        };
        // The handshake checked the certificate, but a resumed session
        // skips that check: verify it again (chain, validity, revocation)
        // before it names anyone, as the authority's own requests do.
        let verified = caller
            .cert_der
            .as_deref()
            .filter(|der| caller_checks(self.service.authority(), der, Usage::Client));
        let operator = is_operator(verified);
        let locator = self.assets.as_ref().map(|assets| assets.locator());
        let ours = |l| Some(l) == locator;
        let machine = self.service.machine();
        let vm = self.assets.as_ref();
        match self::vm::handle(machine, vm, self.vm.as_ref(), &request, verified, &ours) {
            None => {}
            Some(self::vm::Handled::Running) => return None,
            Some(self::vm::Handled::Now(result)) => {
                let reply = Reply {
                    ticket: request.ticket,
                    kind: request.kind,
                    result,
                };
                return Some((request.worker, reply));
            }
        }
        let assets = self.assets.as_ref().and_then(|assets| {
            assets.handle(
                self.service.machine_mut(),
                request.kind,
                self::assets::Asker::of(&request, verified, operator),
                &request.payload,
            )
        });
        let result = match assets {
            Some(result) => result,
            None => match self.admission.handle(
                self.service.machine_mut(),
                request.kind,
                verified,
                operator,
                &request.payload,
                Instant::now(),
            ) {
                Some(result) => result,
                None => self
                    .service
                    .handle(&caller, request.kind, &request.payload, SystemTime::now())
                    .map_err(|e| (e.code, e.message)),
            },
        };
        let reply = Reply {
            ticket: request.ticket,
            kind: request.kind,
            result,
        };
        Some((request.worker, reply))
    }

    /// Run VMs on `host` (the VM threads); without one, VM requests are
    /// refused.
    pub fn attach_vm(&mut self, host: Arc<dyn crate::vm::VmHost>) {
        let front = self::vm::Front::new(host, self.service.machine().changes());
        front.plug(&self.port);
        self.vm = Some(front);
    }

    /// Issue a new server certificate (overlapping the current one, which
    /// stays valid until it expires) and publish it.
    pub fn rotate(&mut self) {
        self.next_rotation = Instant::now() + self.rotation;
        match self.service.issue_server_certificate(SystemTime::now()) {
            Ok(server) => self.publish_certificate(&server, "scheduled rotation"),
            // The current certificate stays; try again next period.
            Err(e) => tracing::error!(error = %e, "server certificate rotation failed"),
        }
    }

    fn publish_certificate(&mut self, server: &ServerCertificate, why: &str) {
        let (chain, key) = tls_parts(server);
        match self.certificates.swap(chain, &key) {
            Ok(()) => tracing::info!(serial = %server.serial, why, "server certificate rotated"),
            Err(e) => {
                tracing::error!(error = %e, "a rotated certificate is unusable; kept the old one")
            }
        }
    }

    /// Publish the zone's changes to the workers.
    fn publish_zone(&mut self) {
        let (Some(publisher), Some(zone)) = (&mut self.zone, self.service.machine().zone()) else {
            return;
        };
        if let Err(e) = publisher.publish(zone, &ApexMembers::default()) {
            tracing::error!(error = %e, "could not publish the zone; the workers keep the one before");
        }
    }

    /// Swap in a new trust snapshot when roots or revocations changed.
    fn publish_trust(&mut self) {
        let material = self.service.trust();
        if material.generation == self.published_generation {
            return;
        }
        match trust_snapshot(&material) {
            Ok(snapshot) => {
                tracing::info!(
                    generation = material.generation,
                    revoked = material.revoked.len(),
                    "trust snapshot published (revocations apply to the next handshake and open connections)"
                );
                self.trust.swap(snapshot);
                self.published_generation = material.generation;
            }
            Err(e) => tracing::error!(error = %e, "could not build a trust snapshot"),
        }
    }

    fn send_reply(&self, worker: usize, reply: Reply) {
        send_reply(&self.port, worker, reply);
    }
}

/// Answer `worker`, retrying a full reply queue for a moment: a worker
/// that stopped reading must not stall the control plane (or a VM thread).
pub fn send_reply(port: &ControlPort, worker: usize, mut reply: Reply) {
    {
        let deadline = Instant::now() + REPLY_RETRY;
        loop {
            match port.reply(worker, reply) {
                Ok(()) => return,
                Err(back) if Instant::now() < deadline => {
                    reply = back;
                    std::thread::yield_now();
                }
                Err(_) => {
                    tracing::warn!(worker, "worker reply queue full; a reply was dropped");
                    return;
                }
            }
        }
    }
}

/// A cluster member as the cluster's name publishes it: its id, its name
/// in the zone and the address it serves on (from the membership).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApexMember {
    pub id: u64,
    pub name: String,
    pub address: std::net::SocketAddrV6,
}

/// A cluster's members as its name publishes them, and the log index of
/// the membership they come from: added to the zone's SOA serial, so the
/// serial moves when only the membership (the apex's addresses) does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApexMembers {
    pub membership_index: u64,
    pub members: Vec<ApexMember>,
}

/// Publishes the control plane's zone to the workers' [`ZoneStore`]:
/// whole at start, then what changed. A publication after a change redoes
/// only the names changed since the one before (and, in a cluster, the
/// apex, whose records come from the members and their pins), copying
/// only the shards they fall in ([`Zone::with_changes`]), so its cost does
/// not grow with the zone. The whole zone is published again when what
/// changed is not known: a zone loaded again (a restored snapshot), or
/// more changes than the zone remembers.
pub struct ZonePublisher {
    store: Arc<ZoneStore>,
    /// The server's own name in the zone (SOA primary, NS).
    primary: String,
    published: Published,
    members: ApexMembers,
}

impl ZonePublisher {
    pub fn start(
        zone: &DnsZone,
        primary: String,
        members: ApexMembers,
    ) -> Result<Self, AuthorityStartError> {
        let store = ZoneStore::new(dataplane_zone(&zone.snapshot(), &primary, &members)?);
        Ok(Self {
            store,
            primary,
            published: zone.published(),
            members,
        })
    }

    pub fn store(&self) -> Arc<ZoneStore> {
        self.store.clone()
    }

    /// Publish `zone` with `members` if either changed since the last
    /// publication. On an error the zone the workers have stays.
    pub fn publish(
        &mut self,
        zone: &DnsZone,
        members: &ApexMembers,
    ) -> Result<(), AuthorityStartError> {
        let changed = zone.changed_since(self.published);
        if changed.as_ref().is_some_and(|names| names.is_empty()) && *members == self.members {
            return Ok(());
        }
        // Past half the zone, building it whole costs no more.
        let changed = changed.filter(|names| names.len() <= zone.len() / 2 + 64);
        let (next, names) = match changed {
            Some(names) => {
                let mut changes: Vec<(String, Option<PublishedName>)> = names
                    .into_iter()
                    .map(|name| (name.to_owned(), zone.published_name(name)))
                    .collect();
                if !members.members.is_empty() || !self.members.members.is_empty() {
                    let apex = apex_record(zone.apex(), members, |name| zone.published_name(name));
                    changes.push((zone.apex().to_owned(), apex));
                }
                let serial = zone_serial(zone.serial(), members);
                let next = self
                    .store
                    .load()
                    .with_changes(serial, &changes)
                    .map_err(|e| AuthorityStartError::Zone(e.to_string()))?;
                (next, changes.len())
            }
            None => {
                let snapshot = zone.snapshot();
                tracing::info!(
                    serial = snapshot.serial,
                    names = snapshot.names.len(),
                    "the whole zone is published again"
                );
                let names = snapshot.names.len();
                (dataplane_zone(&snapshot, &self.primary, members)?, names)
            }
        };
        self.store.swap(next);
        self.published = zone.published();
        self.members = members.clone();
        tracing::debug!(serial = zone.serial(), names, "zone published");
        Ok(())
    }
}

/// The control plane's zone in the form the `doq` workers answer from. A
/// cluster's `members` also answer for the apex, the cluster's name (see
/// [`apex_record`]).
fn dataplane_zone(
    snapshot: &ZoneSnapshot,
    primary: &str,
    apex: &ApexMembers,
) -> Result<Zone, AuthorityStartError> {
    let mut names: Vec<PublishedName> = snapshot.names.clone();
    // The snapshot is in name order.
    let records_of = |name: &str| {
        snapshot
            .names
            .binary_search_by(|n| n.name.as_str().cmp(name))
            .ok()
            .map(|at| snapshot.names[at].clone())
    };
    names.extend(apex_record(&snapshot.apex, apex, records_of));
    Zone::from_records(
        &snapshot.apex,
        primary,
        zone_serial(snapshot.serial, apex),
        &names,
    )
    .map_err(|e| AuthorityStartError::Zone(e.to_string()))
}

/// The SOA serial the workers publish: the zone's plus the membership's
/// log index. Both only grow, so their sum does (RFC 1982 arithmetic wraps
/// it).
fn zone_serial(serial: u32, apex: &ApexMembers) -> u32 {
    serial.wrapping_add(apex.membership_index as u32)
}

/// The apex's records in a cluster (`None` outside one): every member's
/// address (from the membership, not from records anyone could set) and,
/// at `_PORT._udp.APEX`, every member's pin (the one among its name's pins
/// for its port whose key is the member's: member ids are derived from
/// their keys). `records_of` looks a name of the zone up.
fn apex_record(
    apex: &str,
    members: &ApexMembers,
    records_of: impl Fn(&str) -> Option<NameRecords>,
) -> Option<PublishedName> {
    if members.members.is_empty() {
        return None;
    }
    let mut cluster = PublishedName {
        name: apex.to_owned(),
        aaaa: Vec::new(),
        tlsa: Vec::new(),
    };
    for member in &members.members {
        cluster.aaaa.push(*member.address.ip());
        let Ok(name) = crate::dns::qualify(apex, &member.name) else {
            continue;
        };
        if let Some(records) = records_of(&name) {
            cluster
                .tlsa
                .extend(records.tlsa.iter().filter(|(port, pin)| {
                    *port == member.address.port()
                        && crate::cluster::node::node_id_of_pin(pin) == member.id
                }));
        }
    }
    cluster.aaaa.sort();
    cluster.aaaa.dedup();
    cluster.tlsa.sort();
    cluster.tlsa.dedup();
    Some(cluster)
}

fn trust_snapshot(material: &TrustMaterial) -> Result<TrustSnapshot, AuthorityStartError> {
    let root = CertificateDer::from(material.root_der.clone());
    let revoked = material
        .revoked
        .serials()
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
    TrustSnapshot::new(material.generation, &[root], revoked)
        .map_err(|e| AuthorityStartError::Tls(e.to_string()))
}

fn tls_parts(server: &ServerCertificate) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let chain = server
        .chain_der
        .iter()
        .map(|der| CertificateDer::from(der.clone()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server.key_pkcs8_der.clone()));
    (chain, key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RData, RecordType};

    /// The SOA serial the workers answer for `apex`.
    fn soa_serial(zone: &Zone) -> u32 {
        let mut query = Message::new(0, MessageType::Query, OpCode::Query);
        query.queries.push(Query::query(
            Name::from_ascii("internet2.test.").unwrap(),
            RecordType::SOA,
        ));
        let dataplane::protocols::doq::Answer::Response(bytes) =
            dataplane::protocols::doq::answer(zone, &query.to_vec().unwrap())
        else {
            panic!("no SOA answer");
        };
        let answer = Message::from_vec(&bytes).unwrap();
        match &answer.answers[0].data {
            RData::SOA(soa) => soa.serial,
            other => panic!("not an SOA: {other:?}"),
        }
    }

    /// The apex's addresses come from the membership, so its SOA serial
    /// moves when only the membership does (and with zone changes as
    /// before).
    #[test]
    fn the_soa_serial_moves_with_the_membership() {
        let snapshot = ZoneSnapshot {
            apex: "internet2.test.".into(),
            serial: 7,
            generation: 7,
            names: Vec::new(),
        };
        let member = |n: u16| ApexMember {
            id: u64::from(n),
            name: format!("m{n}"),
            address: format!("[fd71:7e57:0:3::{n}]:4433").parse().unwrap(),
        };
        let two = ApexMembers {
            membership_index: 12,
            members: vec![member(1), member(2)],
        };
        let three = ApexMembers {
            membership_index: 40,
            members: vec![member(1), member(2), member(3)],
        };
        let before = soa_serial(&dataplane_zone(&snapshot, "m1", &two).unwrap());
        let after = soa_serial(&dataplane_zone(&snapshot, "m1", &three).unwrap());
        assert_eq!(before, 7 + 12);
        assert_eq!(after, 7 + 40);
        let single = soa_serial(&dataplane_zone(&snapshot, "m1", &ApexMembers::default()).unwrap());
        assert_eq!(single, 7, "a single node's serial is the zone's");
    }

    fn ask(zone: &Zone, name: &str, kind: RecordType) -> dataplane::protocols::doq::Answer {
        let mut query = Message::new(0, MessageType::Query, OpCode::Query);
        query
            .queries
            .push(Query::query(Name::from_ascii(name).unwrap(), kind));
        dataplane::protocols::doq::answer(zone, &query.to_vec().unwrap())
    }

    /// A zone published change by change, members and their pins moving
    /// too, answers every question as the whole zone built again does.
    #[test]
    fn a_zone_published_change_by_change_answers_as_the_whole_zone() {
        use crate::dns::{RecordSet, Tlsa, ZoneConfig};
        let tmp = crate::test_support::TempDir::new("zone-publisher");
        std::fs::create_dir_all(&tmp.0).unwrap();
        let db = redb::Database::create(tmp.0.join("zone.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        crate::dns::store::init_in(&txn).unwrap();
        txn.commit().unwrap();
        let apex = "internet2.test.";
        let config = ZoneConfig {
            apex: apex.into(),
            server_name: "m1".into(),
            server_addresses: Vec::new(),
            server_port: 4433,
        };
        let mut zone = DnsZone::open(&db, &config).unwrap();
        let pin = |b: u8| [b; 32];
        let member = |n: u8| ApexMember {
            id: crate::cluster::node::node_id_of_pin(&pin(n)),
            name: format!("m{n}"),
            address: format!("[fd71:7e57:0:3::{n}]:4433").parse().unwrap(),
        };
        let mut members = ApexMembers::default();
        let mut publisher = ZonePublisher::start(&zone, "m1".into(), members.clone()).unwrap();
        let mut names = std::collections::BTreeSet::from([apex.to_owned()]);
        for step in 0..80u8 {
            let name = format!("m{}.{apex}", step % 5);
            let records = (step % 7 != 3).then(|| {
                let address = format!("fd71:7e57::{step:x}").parse().unwrap();
                let pins = vec![
                    Tlsa {
                        port: 4433,
                        spki_sha256: pin(step % 5 + step / 40),
                    },
                    Tlsa {
                        port: 443,
                        spki_sha256: pin(step + 100),
                    },
                ];
                RecordSet::new(vec![address], pins, None).unwrap()
            });
            if let Some(change) = zone.plan(vec![(name.clone(), records)]).unwrap() {
                let txn = db.begin_write().unwrap();
                change.write(&txn).unwrap();
                txn.commit().unwrap();
                zone.apply(change);
            }
            names.insert(name);
            if step % 10 == 4 {
                members = ApexMembers {
                    membership_index: u64::from(step),
                    members: (1..=step / 10 % 3 + 1).map(member).collect(),
                };
            }
            if step == 50 {
                members = ApexMembers::default();
            }
            match step {
                // Further behind than the zone remembers.
                60 => {
                    for i in 0..300u16 {
                        let address = format!("fd71:7e57:1::{i:x}").parse().unwrap();
                        let records = RecordSet::new(vec![address], Vec::new(), None).unwrap();
                        let name = format!("far{}.{apex}", i % 3);
                        let change = zone.plan(vec![(name.clone(), Some(records))]).unwrap();
                        let change = change.expect("a new address");
                        let txn = db.begin_write().unwrap();
                        change.write(&txn).unwrap();
                        txn.commit().unwrap();
                        zone.apply(change);
                        names.insert(name);
                    }
                }
                // The same store loaded again (as a restored snapshot is).
                70 => zone = DnsZone::open(&db, &config).unwrap(),
                _ => {}
            }
            publisher.publish(&zone, &members).unwrap();
            let whole = dataplane_zone(&zone.snapshot(), "m1", &members).unwrap();
            let published = publisher.store().load();
            for name in &names {
                for (question, kind) in [
                    (name.clone(), RecordType::AAAA),
                    (format!("_4433._udp.{name}"), RecordType::TLSA),
                    (format!("_443._udp.{name}"), RecordType::TLSA),
                    (apex.to_owned(), RecordType::SOA),
                ] {
                    assert_eq!(
                        ask(&published, &question, kind),
                        ask(&whole, &question, kind),
                        "step {step}: {question} {kind:?}"
                    );
                }
            }
        }
    }
}
