//! The server: N pinned workers sharing one IPv6 address and port, each
//! with its own socket (SO_REUSEPORT) and endpoint, serving `perf` and
//! `stoq/1` streams.

use crate::admission::{AdmissionEvent, AdmissionGate, AdmissionStage, CLOSE_ADMISSION_DEADLINE};
use crate::cid::{WorkerCidGenerator, WorkerId};
use crate::control::{ControlPort, Returned};
use crate::front_door::FrontDoor;
use crate::io::socket::SocketBackend;
use crate::io::sockopt::bind_worker_socket;
use crate::io::uring::UringBackend;
use crate::io::xdp::{XdpBackend, XdpError, XdpSettings, ZeroCopy};
use crate::io::{Backend, BackendKind, IoBatch};
use crate::protocols::doq::{DoqServer, ZoneStore};
use crate::protocols::perf::PerfServer;
use crate::protocols::stoq::{self, AuthorityRoute, StoqContext, StoqServer};
use crate::protocols::{Alpn, SERVED_ALPNS};
use crate::stats::{Counters, StatsRegistry};
use crate::steering::{ReuseportSteering, SteeringMode};
use crate::transport::{ServerIdentity, TlsSetupError, TransportSettings, server_crypto};
use crate::trust::{PeerCertificate, PeerRefusal, TrustStore};
use crate::worker::{
    Actions, Admission, Delivered, Delivery, Mailbox, Routing, Service, Worker, WorkerControl,
    WorkerParts,
};
use bytes::Bytes;
use quinn_proto::{
    Connection, ConnectionHandle, Dir, EndpointConfig, Event, Incoming, ServerConfig, StreamEvent,
    VarInt,
};
use rustls::pki_types::CertificateDer;
use std::net::SocketAddrV6;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// Everything the dataplane needs to serve, validated by the caller.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    pub listen: SocketAddrV6,
    pub workers: usize,
    /// Core each worker is pinned to; `None` leaves placement to the kernel.
    pub worker_cores: Option<Vec<usize>>,
    pub backend: BackendKind,
    /// The DNS zone answered over `doq` (an immutable snapshot); without
    /// one, `doq` queries are refused.
    pub zone: Option<Arc<ZoneStore>>,
    pub io_batch: IoBatch,
    pub steering: SteeringMode,
    pub socket_buffer_bytes: usize,
    pub handoff_queue_len: usize,
    pub connections_per_worker_max: usize,
    /// New handshakes per second (whole server) served without Retry; past
    /// it, unvalidated clients must answer a Retry first. 0 = always Retry.
    pub handshake_rate_retry_per_s: u32,
    pub transport: TransportSettings,
    /// AES-128-GCM first (ChaCha20 for clients that list it first); false:
    /// ChaCha20-Poly1305 first for every client, the suite for a CPU
    /// without AES instructions or with hardware acceleration turned off.
    pub aes_first: bool,
    /// AF_XDP sockets, for `backend = xdp`.
    pub xdp: Option<XdpPlan>,
    /// The attached XDP front door (its counters go into `stats`; the `xdp`
    /// backend registers its sockets in it).
    pub front_door: Option<Arc<FrontDoor>>,
    /// Where `stoq/1` authority requests go (none: they are refused).
    pub control: Option<Arc<ControlPort>>,
    /// Client-certificate roots and revocations; open connections whose
    /// certificate gets revoked are closed.
    pub trust: Option<Arc<TrustStore>>,
    /// Serve `perf` to clients without a certificate (benchmarks).
    pub perf_without_certificate: bool,
    /// Serve `doq` to clients without a certificate (public DNS).
    pub dns_without_certificate: bool,
    /// Sources the workers drop at the first packet.
    pub blocklist: Option<Arc<crate::blocklist::BlocklistStore>>,
    /// Four-proof admission of `stoq/1` connections (none: admitted at the
    /// handshake).
    pub admission: Option<Arc<dyn AdmissionGate>>,
    /// The memory assets the workers hold (none: asset addressing off, and
    /// asset requests are refused with `ASSETS_OFF`).
    pub assets: Option<Arc<crate::assets::memory::MemoryAssets>>,
}

/// Application close code: a `perf` connection without a client
/// certificate where the config requires one (docs/PROTOCOL.md).
pub const CLOSE_CERTIFICATE_REQUIRED: u32 = 0x101;
/// Application close code: the client certificate was revoked.
pub const CLOSE_CERTIFICATE_REVOKED: u32 = 0x102;
/// Application close code: the client certificate (of a resumed session,
/// or of an open connection) is outside its validity period.
pub const CLOSE_CERTIFICATE_INVALID: u32 = 0x104;
/// A `doq` connection that has asked nothing for this long is closed with
/// DOQ_NO_ERROR (RFC 9250 §5.5), whatever keep-alives it sends: an idle
/// peer must not hold server memory forever.
pub const DOQ_IDLE_DEADLINE: Duration = Duration::from_secs(10);
/// A connection still handshaking this long after it was accepted is
/// closed: a client that never sends its Finished (keeping the connection
/// alive with 0-RTT or Handshake packets) must not hold a slot, or the data
/// it sent early, forever.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// How often open connections are checked against their certificate's
/// validity even when no revocation happened (a certificate expires on its
/// own).
const VALIDITY_CHECK_INTERVAL: Duration = Duration::from_secs(60);
/// How long after a revocation open connections are checked (replies in
/// flight go out first).
const REVOCATION_GRACE: Duration = Duration::from_millis(20);

/// How the `xdp` backend's workers map onto the NIC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdpPlan {
    pub interface: String,
    /// The NIC queue of each worker.
    pub queues: Vec<u32>,
    pub zero_copy: ZeroCopy,
    /// UMEM frames per worker.
    pub frames: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot bind worker {worker} socket on [{addr}]:{port}: {source}", addr = listen.ip(), port = listen.port())]
    Bind {
        worker: usize,
        listen: SocketAddrV6,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    #[error("cannot set up worker {worker}: {source}")]
    Setup {
        worker: usize,
        source: std::io::Error,
    },
    #[error("steering = \"on\" but the program cannot be attached: {0}")]
    Steering(crate::steering::SteeringError),
    #[error("worker count {0} is outside 1..={max}", max = crate::cid::WORKERS_MAX)]
    Workers(usize),
    #[error("worker {worker}: {source}")]
    Xdp { worker: usize, source: XdpError },
    #[error(
        "backend = \"xdp\" needs the XDP front door ([dataplane] xdp_interface) and one NIC queue per worker"
    )]
    XdpUnconfigured,
    #[error("registering worker {worker}'s AF_XDP socket in the front door: {source}")]
    XdpRegister {
        worker: usize,
        source: crate::front_door::FrontDoorError,
    },
}

/// A running server.
pub struct ServerHandle {
    pub stats: Arc<StatsRegistry>,
    mailboxes: Arc<[Mailbox]>,
    threads: Vec<JoinHandle<()>>,
    /// Which backend each worker runs.
    pub backends: Vec<&'static str>,
}

impl ServerHandle {
    /// Ask every worker to drain: refuse new handshakes, close connections
    /// with `CLOSE_SHUTDOWN`, exit within `drain`.
    pub fn shutdown(&self, drain: Duration) {
        for mailbox in self.mailboxes.iter() {
            let mut message = WorkerControl::Shutdown { drain };
            while let Err(back) = mailbox.send_control(message) {
                message = back;
                std::thread::yield_now();
            }
        }
    }

    /// Wait for every worker thread.
    pub fn join(self) {
        for thread in self.threads {
            let _ = thread.join();
        }
    }

    /// Thread ids (kernel TIDs are read from /proc by tests; this is the
    /// count for sanity checks).
    pub fn worker_count(&self) -> usize {
        self.threads.len()
    }
}

/// Bind every worker socket, then start the workers. Nothing is served if
/// any step fails.
pub fn serve(
    settings: &ServerSettings,
    identity: &ServerIdentity,
) -> Result<ServerHandle, ServeError> {
    if settings.workers == 0 || settings.workers > crate::cid::WORKERS_MAX {
        return Err(ServeError::Workers(settings.workers));
    }
    let server_config = shared_server_config(settings, identity)?;
    let reset_key = Arc::new(reset_key());
    crate::worker::install_panic_hook();

    let stats = Arc::new(StatsRegistry::new(settings.workers));
    let mailboxes: Arc<[Mailbox]> = (0..settings.workers)
        .map(|worker| {
            Mailbox::new(settings.handoff_queue_len)
                .map_err(|source| ServeError::Setup { worker, source })
        })
        .collect::<Result<Vec<_>, _>>()?
        .into();

    // Bind all sockets before starting any thread: a bad address fails whole.
    let sockets = (0..settings.workers)
        .map(|index| {
            bind_worker_socket(settings.listen, settings.socket_buffer_bytes).map_err(|source| {
                ServeError::Bind {
                    worker: index,
                    listen: settings.listen,
                    source,
                }
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    attach_steering(settings.steering, &sockets, &stats)?;
    if let Some(front_door) = &settings.front_door {
        let _ = stats.front_door.set(front_door.clone());
    }
    if let Some(gate) = &settings.admission {
        let _ = stats.admission.set(gate.clone());
    }
    if let Some(assets) = &settings.assets {
        let _ = stats.assets.set(assets.clone());
    }
    let mut workers = Vec::with_capacity(settings.workers);
    for (index, socket) in sockets.into_iter().enumerate() {
        let id = WorkerId(index as u16);
        let io = match settings.backend {
            BackendKind::Xdp => xdp_backend(settings, socket, index)?,
            kind => make_backend(
                kind,
                socket,
                &mailboxes[index],
                index,
                settings.io_batch,
                settings.transport.gso,
            )?,
        };
        workers.push(server_worker(
            id,
            settings,
            io,
            worker_endpoint(id, &reset_key, &server_config, &settings.transport),
            &stats,
            &mailboxes,
            (Instant::now(), WallClock::System),
        ));
    }

    if let Some(control) = &settings.control {
        control.set_mailboxes(mailboxes.clone());
    }
    let backends = workers.iter().map(|w| w.backend_name()).collect();
    let mut threads = Vec::with_capacity(settings.workers);
    // Each worker reports once it is pinned: serve() returns (and the
    // process says it is listening) only when every worker runs where the
    // config put it.
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    for (index, worker) in workers.into_iter().enumerate() {
        let core = settings.worker_cores.as_ref().map(|cores| cores[index]);
        let started = started_tx.clone();
        let thread = std::thread::Builder::new()
            .name(format!("stoq-worker-{index}"))
            .spawn(move || run_worker(index, core, worker, started))
            .map_err(|source| ServeError::Setup {
                worker: index,
                source,
            })?;
        threads.push(thread);
    }
    drop(started_tx);
    // A worker that dies before reporting closes its sender; the loop ends.
    for _ in started_rx.iter().take(threads.len()) {}
    Ok(ServerHandle {
        stats,
        mailboxes,
        threads,
        backends,
    })
}

/// A server of one worker on a backend the caller owns, built as [`serve`]
/// builds each of its workers but not started: the caller drives it with
/// [`Worker::step`] at the times it chooses (the in-memory harness does, on
/// a simulated clock; see `crate::harness`). `clock` is the worker's `now`
/// at start and the wall-clock time it stands for.
pub fn single_worker(
    settings: &ServerSettings,
    identity: &ServerIdentity,
    io: Box<dyn Backend>,
    clock: (Instant, SystemTime),
) -> Result<(Worker<ServerService>, Arc<StatsRegistry>), ServeError> {
    let server_config = shared_server_config(settings, identity)?;
    let stats = Arc::new(StatsRegistry::new(1));
    let mailboxes: Arc<[Mailbox]> = [Mailbox::new(settings.handoff_queue_len)
        .map_err(|source| ServeError::Setup { worker: 0, source })?]
    .into();
    if let Some(control) = &settings.control {
        control.set_mailboxes(mailboxes.clone());
    }
    let id = WorkerId(0);
    let endpoint = worker_endpoint(
        id,
        &Arc::new(reset_key()),
        &server_config,
        &settings.transport,
    );
    let (now, wall) = clock;
    let worker = server_worker(
        id,
        settings,
        io,
        endpoint,
        &stats,
        &mailboxes,
        (now, WallClock::Mapped(now, wall)),
    );
    Ok((worker, stats))
}

/// The QUIC server config all workers share (one Retry token key, so a
/// Retry issued by one worker validates on any).
fn shared_server_config(
    settings: &ServerSettings,
    identity: &ServerIdentity,
) -> Result<Arc<ServerConfig>, ServeError> {
    let crypto = server_crypto(identity, &SERVED_ALPNS, settings.aes_first)?;
    let mut server_config = ServerConfig::new(crypto, token_key());
    server_config.transport_config(Arc::new(settings.transport.build_server()));
    server_config.max_incoming(settings.connections_per_worker_max.max(1));
    Ok(Arc::new(server_config))
}

/// Worker `id`'s endpoint: the connection IDs it issues name it.
fn worker_endpoint(
    id: WorkerId,
    reset_key: &Arc<ring::hmac::Key>,
    server_config: &Arc<ServerConfig>,
    transport: &TransportSettings,
) -> quinn_proto::Endpoint {
    let mut endpoint_config = EndpointConfig::new(reset_key.clone());
    // What the workers receive whole: advertised to clients, so their MTU
    // discovery stays within it.
    endpoint_config
        .max_udp_payload_size(
            transport
                .udp_payload_max()
                .clamp(1200, usize::from(crate::io::MAX_UDP_PAYLOAD_RECEIVED)) as u16,
        )
        .expect("clamped to RFC 9000's range");
    endpoint_config.cid_generator(move || Box::new(WorkerCidGenerator::new(id)));
    // RFC 9287: without advertising grease_quic_bit, every valid packet
    // has the fixed bit set, so the router and the XDP program can drop
    // those that do not before any decryption.
    endpoint_config.grease_quic_bit(false);
    quinn_proto::Endpoint::new(
        Arc::new(endpoint_config),
        Some(server_config.clone()),
        true,
        None,
    )
}

/// Worker `id` of a server, on `io`, sharing `mailboxes` with the others;
/// `clock` as in [`single_worker`].
fn server_worker(
    id: WorkerId,
    settings: &ServerSettings,
    io: Box<dyn Backend>,
    endpoint: quinn_proto::Endpoint,
    stats: &Arc<StatsRegistry>,
    mailboxes: &Arc<[Mailbox]>,
    (now, wall_clock): (Instant, WallClock),
) -> Worker<ServerService> {
    let service = ServerService::new(usize::from(id.0), stats.clone(), settings, now, wall_clock);
    Worker::new(WorkerParts {
        id,
        endpoint,
        io,
        service,
        routing: Routing::Shared {
            mailboxes: mailboxes.clone(),
        },
        stats: stats.clone(),
        gso: settings.transport.gso,
        udp_payload_max: settings.transport.udp_payload_max(),
        blocklist: settings.blocklist.clone(),
    })
}

/// Attach the reuseport steering program per `mode`. With one worker there
/// is nothing to steer.
fn attach_steering(
    mode: SteeringMode,
    sockets: &[std::net::UdpSocket],
    stats: &StatsRegistry,
) -> Result<(), ServeError> {
    if mode == SteeringMode::Off || sockets.len() < 2 {
        tracing::info!(
            ?mode,
            workers = sockets.len(),
            "eBPF steering not attached (off, or a single worker)"
        );
        return Ok(());
    }
    let refs: Vec<&std::net::UdpSocket> = sockets.iter().collect();
    match ReuseportSteering::attach(&refs) {
        Ok(steering) => {
            tracing::info!(
                workers = sockets.len(),
                "eBPF reuseport steering attached: datagrams go to their owning worker"
            );
            let _ = stats.steering.set(steering);
            Ok(())
        }
        Err(e) if mode == SteeringMode::Auto => {
            tracing::warn!(error = %e, "eBPF steering unavailable; the handoff queue routes datagrams instead");
            Ok(())
        }
        Err(e) => Err(ServeError::Steering(e)),
    }
}

fn run_worker(
    index: usize,
    core: Option<usize>,
    worker: Worker<ServerService>,
    started: std::sync::mpsc::Sender<()>,
) {
    if let Some(core) = core {
        if core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
            tracing::info!(
                worker = index,
                core,
                backend = worker.backend_name(),
                "worker pinned"
            );
        } else {
            tracing::warn!(
                worker = index,
                core,
                "could not pin worker to its core; running unpinned"
            );
        }
    } else {
        tracing::info!(
            worker = index,
            backend = worker.backend_name(),
            "worker started (unpinned)"
        );
    }
    let _ = started.send(());
    drop(started);
    // Never a half-alive server: panics are contained per connection, so one
    // that escapes the worker's own loop (or an I/O error that ends it)
    // takes the whole process down for the service manager to restart.
    // (The profile keeps `panic = "unwind"` for that containment.)
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.run())) {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::error!(worker = index, error = %e, "worker stopped on an I/O error; exiting");
            std::process::exit(70);
        }
        Err(_) => {
            tracing::error!(
                worker = index,
                "worker thread panicked; aborting the process"
            );
            std::process::abort();
        }
    }
}

/// One worker's AF_XDP socket on its queue, registered in the front door so
/// that the queue's traffic to our port reaches it.
fn xdp_backend(
    settings: &ServerSettings,
    socket: std::net::UdpSocket,
    worker: usize,
) -> Result<Box<dyn Backend>, ServeError> {
    let (Some(plan), Some(front_door)) = (&settings.xdp, &settings.front_door) else {
        return Err(ServeError::XdpUnconfigured);
    };
    let queue = *plan.queues.get(worker).ok_or(ServeError::XdpUnconfigured)?;
    let kernel =
        SocketBackend::new(socket).map_err(|source| ServeError::Setup { worker, source })?;
    let xdp = XdpSettings {
        interface: plan.interface.clone(),
        queue,
        zero_copy: plan.zero_copy,
        frames: plan.frames,
    };
    let backend = XdpBackend::open(&xdp, settings.listen, kernel)
        .map_err(|source| ServeError::Xdp { worker, source })?;
    front_door
        .register_socket(queue, backend.raw_fd())
        .map_err(|source| ServeError::XdpRegister { worker, source })?;
    tracing::info!(
        worker,
        interface = plan.interface,
        queue,
        zero_copy = backend.zero_copy(),
        frames = plan.frames,
        "backend xdp (chosen in config)"
    );
    Ok(Box::new(backend))
}

/// Build the configured backend, falling back from uring to socket with a
/// logged reason where the kernel refuses io_uring. `offload` false turns
/// the kernel's UDP receive offload (GRO) off, as `gso = false` turns
/// segmentation off on the send side.
pub fn make_backend(
    kind: BackendKind,
    socket: std::net::UdpSocket,
    mailbox: &Mailbox,
    worker: usize,
    batch: IoBatch,
    offload: bool,
) -> Result<Box<dyn Backend>, ServeError> {
    let setup = |source| ServeError::Setup { worker, source };
    match kind {
        BackendKind::Xdp => Err(ServeError::XdpUnconfigured),
        BackendKind::Socket => {
            tracing::info!(worker, "backend socket (chosen in config)");
            let same = socket.try_clone().map_err(setup)?;
            // quinn-udp's state turns GRO on: off after it, where asked.
            let backend = SocketBackend::new(socket).map_err(setup)?;
            if !offload {
                crate::io::set_gro(&same, false).map_err(setup)?;
            }
            Ok(Box::new(backend))
        }
        BackendKind::Uring => {
            // quinn-udp's state sets GRO, PKTINFO, TCLASS and DONTFRAG and
            // probes GSO; the ring then owns the socket.
            let probe = quinn_udp::UdpSocketState::new((&socket).into()).map_err(setup)?;
            if !offload {
                crate::io::set_gro(&socket, false).map_err(setup)?;
            }
            let fallback = socket.try_clone().map_err(setup)?;
            match UringBackend::new(socket, &mailbox.waker, probe.max_gso_segments(), batch) {
                Ok(backend) => {
                    tracing::info!(worker, "backend uring (chosen in config)");
                    Ok(Box::new(backend))
                }
                Err(e) => {
                    tracing::warn!(worker, error = %e, "io_uring unavailable; backend socket instead");
                    fallback.set_nonblocking(true).map_err(setup)?;
                    let same = fallback.try_clone().map_err(setup)?;
                    let backend = SocketBackend::new(fallback).map_err(setup)?;
                    if !offload {
                        crate::io::set_gro(&same, false).map_err(setup)?;
                    }
                    Ok(Box::new(backend))
                }
            }
        }
    }
}

fn token_key() -> Arc<ring::hkdf::Prk> {
    let mut secret = [0u8; 64];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret).expect("CSPRNG");
    // One key for all workers: a Retry issued by one worker validates on any.
    Arc::new(ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &[]).extract(&secret))
}

fn reset_key() -> ring::hmac::Key {
    ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &ring::rand::SystemRandom::new())
        .expect("CSPRNG")
}

/// A token bucket of handshakes served without Retry.
struct HandshakeBudget {
    rate_per_s: f64,
    tokens: f64,
    last: Instant,
}

impl HandshakeBudget {
    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate_per_s).min(self.rate_per_s.max(1.0));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The server's application side: admission, then per-ALPN handlers.
pub struct ServerService {
    worker: usize,
    stats: Arc<StatsRegistry>,
    zone: Option<Arc<ZoneStore>>,
    connections_max: usize,
    budget: HandshakeBudget,
    control: Option<Arc<ControlPort>>,
    trust: Option<Arc<TrustStore>>,
    /// The trust generation open connections were last checked against.
    trust_seen: u64,
    /// When to check open connections against a new trust snapshot.
    revocation_check: Option<Instant>,
    perf_without_certificate: bool,
    dns_without_certificate: bool,
    next_conn_id: u64,
    /// The admission gate, when `stoq/1` connections must be admitted.
    gate: Option<Arc<dyn AdmissionGate>>,
    assets: Option<Arc<crate::assets::memory::MemoryAssets>>,
    /// Admission deadlines in order (one duration for all, so a queue).
    deadlines: std::collections::VecDeque<(Instant, ConnectionHandle, u64)>,
    /// `doq` idle deadlines in order (one duration for all, so a queue).
    doq_deadlines: std::collections::VecDeque<(Instant, ConnectionHandle, u64)>,
    /// Handshake deadlines in order (one duration for all, so a queue).
    handshake_deadlines: std::collections::VecDeque<(Instant, ConnectionHandle, u64)>,
    /// When open connections are next checked for certificate expiry.
    next_validity_check: Option<Instant>,
    /// Flow-control limits a connection gets once it is trusted (admitted
    /// `stoq/1`, allowed `perf`); until then the transport's small initial
    /// ones hold (`TransportSettings::build_server`).
    trusted_receive_window: VarInt,
    trusted_send_window: u64,
    trusted_streams_bidi: u32,
    /// Where certificate validity checks get the wall-clock time.
    wall_clock: WallClock,
}

/// The wall clock of a worker's validity checks.
#[derive(Clone, Copy, Debug)]
pub(crate) enum WallClock {
    /// The system's, read at each check: a step of the wall clock (an NTP
    /// correction) applies to the next check.
    System,
    /// The worker's `now` mapped onto the wall clock from one moment (the
    /// worker's clock then, and the wall-clock time it stands for): a
    /// simulated clock (the in-memory harness) drives both.
    Mapped(Instant, SystemTime),
}

impl ServerService {
    /// The service of worker `worker`, started at `now` (the worker's
    /// clock), its validity checks on `wall_clock`.
    fn new(
        worker: usize,
        stats: Arc<StatsRegistry>,
        settings: &ServerSettings,
        now: Instant,
        wall_clock: WallClock,
    ) -> Self {
        let rate = f64::from(settings.handshake_rate_retry_per_s) / settings.workers as f64;
        Self {
            worker,
            control: settings.control.clone(),
            trust: settings.trust.clone(),
            trust_seen: settings.trust.as_ref().map_or(0, |t| t.generation()),
            revocation_check: None,
            perf_without_certificate: settings.perf_without_certificate,
            dns_without_certificate: settings.dns_without_certificate,
            next_conn_id: 0,
            gate: settings.admission.clone().filter(|gate| gate.required()),
            assets: settings.assets.clone(),
            deadlines: std::collections::VecDeque::new(),
            doq_deadlines: std::collections::VecDeque::new(),
            handshake_deadlines: std::collections::VecDeque::new(),
            next_validity_check: None,
            trusted_receive_window: VarInt::from_u64(settings.transport.receive_window_bytes)
                .unwrap_or(VarInt::MAX),
            trusted_send_window: settings.transport.send_window_bytes,
            trusted_streams_bidi: settings.transport.streams_bidi_max,
            stats,
            zone: settings.zone.clone(),
            connections_max: settings.connections_per_worker_max,
            budget: HandshakeBudget {
                rate_per_s: rate,
                tokens: rate,
                last: now,
            },
            wall_clock,
        }
    }

    /// The wall-clock time of the worker's `now`.
    fn wall(&self, now: Instant) -> SystemTime {
        match self.wall_clock {
            WallClock::System => SystemTime::now(),
            WallClock::Mapped(base, wall) => wall + now.saturating_duration_since(base),
        }
    }
}

/// Per-connection server state.
pub struct ServerConn {
    id: u64,
    handle: ConnectionHandle,
    alpn: Option<Alpn>,
    /// The client certificate the handshake (or the resumed session)
    /// presented, checked against the trust snapshot when it completed.
    peer: Option<PeerCertificate>,
    /// The trusted flow-control limits were granted.
    widened: bool,
    /// The peer's address as the handshake validated it (RFC 9000 §8.1).
    /// Failures are scored against it, never against an address the
    /// connection migrated to before that path was validated.
    validated_remote: Option<std::net::SocketAddr>,
    perf: PerfServer,
    stoq: StoqServer,
    doq: DoqServer,
    admission: AdmissionStage,
}

impl ServerService {
    /// Where this connection's DNS queries for names outside the zone go,
    /// when a resolver is plugged in.
    fn resolver_route(&self, st: &ServerConn) -> Option<AuthorityRoute<'_>> {
        let port = self.control.as_deref().filter(|port| port.resolves())?;
        Some(AuthorityRoute {
            port,
            worker: self.worker,
            handle: st.handle.0,
            conn_id: st.id,
        })
    }

    /// The handshake completed: take the verified client certificate and
    /// apply the per-ALPN rule for connections without one. Returns false
    /// when the connection was closed.
    fn on_connected(
        &mut self,
        st: &mut ServerConn,
        conn: &mut Connection,
        alpn: Alpn,
        now: Instant,
        counters: &mut Counters,
    ) -> bool {
        st.validated_remote = Some(conn.remote_address());
        st.peer = conn
            .crypto_session()
            .peer_identity()
            .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
            .and_then(|chain| chain.into_iter().next())
            .and_then(PeerCertificate::parse);
        // A resumed session (1-RTT or 0-RTT) carries the certificate of its
        // first handshake without checking it again: check it against the
        // revocation snapshot and its validity before anything is served.
        if let (Some(trust), Some(peer)) = (&self.trust, &st.peer)
            && let Err(refusal) = trust.load().check_peer(peer, self.wall(now))
        {
            counters.resumed_refused += 1;
            close_refused_peer(conn, refusal, now);
            return false;
        }
        if alpn == Alpn::Doq {
            self.doq_deadlines
                .push_back((now + DOQ_IDLE_DEADLINE, st.handle, st.id));
        }
        let allowed_without = match alpn {
            Alpn::Perf => self.perf_without_certificate,
            Alpn::Doq => self.dns_without_certificate,
            // A stoq/1 connection without a certificate may only enroll:
            // the handler refuses everything else.
            Alpn::Stoq => true,
        };
        if st.peer.is_none() && !allowed_without {
            counters.refused_certificate += 1;
            conn.close(
                now,
                VarInt::from_u32(CLOSE_CERTIFICATE_REQUIRED),
                Bytes::from_static(b"this protocol needs a client certificate on this server"),
            );
            return false;
        }
        if alpn == Alpn::Stoq {
            return self.start_admission(st, conn, now, counters);
        }
        true
    }

    /// A `stoq/1` handshake completed: fix the connection's admission
    /// parameters and start its deadline. Returns false when closed.
    fn start_admission(
        &mut self,
        st: &mut ServerConn,
        conn: &mut Connection,
        now: Instant,
        counters: &mut Counters,
    ) -> bool {
        let Some(gate) = &self.gate else {
            return true;
        };
        st.admission = match &st.peer {
            None => AdmissionStage::Anonymous,
            // The cluster's members: the CA issued their certificates to
            // nodes that joined with a join token; they prove nothing more.
            Some(peer) if peer.node => AdmissionStage::Admitted(None),
            Some(peer) => match gate.offer(&peer.der) {
                Ok(pending) => AdmissionStage::Pending(pending),
                Err(refusal) => {
                    counters.admission_refused += 1;
                    gate.report(AdmissionEvent::Failed {
                        source: st.validated_remote.unwrap_or_else(|| conn.remote_address()),
                        identity: None,
                        code: refusal.code,
                    });
                    conn.close(
                        now,
                        VarInt::from_u32(refusal.code),
                        Bytes::from(stoq::truncate_reason(refusal.reason)),
                    );
                    st.admission = AdmissionStage::Refused;
                    return false;
                }
            },
        };
        self.deadlines
            .push_back((now + gate.deadline(), st.handle, st.id));
        true
    }

    /// The deadline passed: close the connection unless it got admitted.
    fn on_deadline(
        &mut self,
        st: &mut ServerConn,
        conn: &mut Connection,
        now: Instant,
        counters: &mut Counters,
    ) {
        let identity = match &st.admission {
            AdmissionStage::Pending(pending) => Some(pending.identity()),
            AdmissionStage::Anonymous => None,
            _ => return,
        };
        counters.admission_deadline += 1;
        // Scored like a refused bundle: a flood of silent connections
        // isolates its source (an enrolling client is long gone by now).
        if let Some(gate) = &self.gate {
            gate.report(AdmissionEvent::Failed {
                source: st.validated_remote.unwrap_or_else(|| conn.remote_address()),
                identity,
                code: CLOSE_ADMISSION_DEADLINE,
            });
        }
        st.admission = AdmissionStage::Refused;
        conn.close(
            now,
            VarInt::from_u32(CLOSE_ADMISSION_DEADLINE),
            Bytes::from_static(b"no valid admission bundle before the deadline"),
        );
    }
}

impl Service for ServerService {
    type Conn = ServerConn;

    fn poll(&mut self, now: Instant, actions: &mut Actions) {
        // A new trust snapshot may revoke certificates of open connections.
        // They are checked a moment later, so that an answer already on
        // its way (the revoke request itself, sent on the connection being
        // revoked) is delivered and sent before the close.
        if let Some(trust) = &self.trust {
            let generation = trust.generation();
            if generation != self.trust_seen {
                self.trust_seen = generation;
                self.revocation_check.get_or_insert(now + REVOCATION_GRACE);
            }
        }
        // Certificates also expire without any snapshot changing.
        let validity_due = self
            .next_validity_check
            .get_or_insert(now + VALIDITY_CHECK_INTERVAL);
        if *validity_due <= now {
            *validity_due = now + VALIDITY_CHECK_INTERVAL;
            self.revocation_check.get_or_insert(now);
        }
        if self.revocation_check.is_some_and(|at| at <= now) {
            self.revocation_check = None;
            actions.visit_all = true;
        }
        if let Some(assets) = &self.assets {
            assets.poll_leases(now);
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        let deadline = self.deadlines.front().map(|(at, _, _)| *at);
        let doq = self.doq_deadlines.front().map(|(at, _, _)| *at);
        let handshake = self.handshake_deadlines.front().map(|(at, _, _)| *at);
        [
            self.revocation_check,
            deadline,
            doq,
            handshake,
            self.next_validity_check,
            self.assets.as_ref().and_then(|a| a.poll_timeout()),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn on_visit(&mut self, st: &mut ServerConn, conn: &mut Connection, now: Instant) {
        let (Some(trust), Some(peer)) = (&self.trust, &st.peer) else {
            return;
        };
        if let Err(refusal) = trust.load().check_peer(peer, self.wall(now)) {
            tracing::info!(
                worker = self.worker,
                %refusal,
                "closing a connection whose client certificate no longer admits it"
            );
            close_refused_peer(conn, refusal, now);
        }
    }

    fn poll_deliveries(&mut self, now: Instant, out: &mut Vec<Delivery>) {
        for (queue, what) in [
            (
                &mut self.deadlines,
                (|| Delivered::AdmissionDeadline) as fn() -> Delivered,
            ),
            (&mut self.doq_deadlines, || Delivered::IdleDeadline),
            (&mut self.handshake_deadlines, || {
                Delivered::HandshakeDeadline
            }),
        ] {
            while let Some(&(at, handle, conn_id)) = queue.front() {
                if at > now {
                    break;
                }
                queue.pop_front();
                out.push(Delivery {
                    handle,
                    conn_id,
                    what: what(),
                });
            }
        }
        let Some(port) = &self.control else { return };
        while let Some(returned) = port.take_reply(self.worker) {
            let (ticket, what) = match returned {
                Returned::Stoq(reply) => {
                    let kind = reply.kind | stoq::RESPONSE_FLAG;
                    let response = match reply.result {
                        Ok(payload) => stoq::encode(kind, &payload),
                        Err((code, message)) => stoq::encode_error_code(code, &message),
                    };
                    let stream = reply.ticket.stream;
                    (reply.ticket, Delivered::Response { stream, response })
                }
                Returned::Dns { ticket, message } => (
                    ticket,
                    Delivered::DnsAnswer {
                        stream: ticket.stream,
                        message,
                    },
                ),
            };
            out.push(Delivery {
                handle: ConnectionHandle(ticket.handle),
                conn_id: ticket.conn_id,
                what,
            });
        }
    }

    fn has_deliveries(&self) -> bool {
        self.control
            .as_ref()
            .is_some_and(|port| port.has_reply(self.worker))
    }

    fn on_delivery(
        &mut self,
        st: &mut ServerConn,
        conn: &mut Connection,
        delivery: Delivery,
        now: Instant,
        counters: &mut Counters,
    ) {
        if st.id != delivery.conn_id {
            return;
        }
        match delivery.what {
            Delivered::Response { stream, response } => {
                st.stoq.deliver(conn, stream, response, counters)
            }
            Delivered::DnsAnswer { stream, message } => {
                st.doq.deliver(conn, stream, &message, now, counters)
            }
            Delivered::AdmissionDeadline => self.on_deadline(st, conn, now, counters),
            Delivered::IdleDeadline if st.doq.take_answered() => {
                self.doq_deadlines
                    .push_back((now + DOQ_IDLE_DEADLINE, st.handle, st.id));
            }
            Delivered::HandshakeDeadline if conn.is_handshaking() => {
                counters.handshake_deadline += 1;
                conn.close(
                    now,
                    VarInt::from_u32(CLOSE_HANDSHAKE_DEADLINE),
                    Bytes::from_static(b"handshake not completed in time"),
                );
            }
            // The server queues nothing for its connections that way.
            Delivered::HandshakeDeadline | Delivered::Wake => {}
            Delivered::IdleDeadline => {
                counters.doq_idle_closed += 1;
                conn.close(
                    now,
                    VarInt::from_u32(crate::protocols::doq::DOQ_NO_ERROR),
                    Bytes::from_static(b"idle"),
                );
            }
        }
        self.widen(st, conn);
    }

    fn on_close(&mut self, st: ServerConn, _conn: &Connection, _counters: &mut Counters) {
        if let (Some(gate), AdmissionStage::Admitted(Some(_))) = (&self.gate, &st.admission) {
            gate.report(AdmissionEvent::Closed {
                worker: self.worker,
                conn_id: st.id,
            });
        }
    }

    fn admit(&mut self, incoming: &Incoming, now: Instant, open: usize) -> Admission {
        if open >= self.connections_max {
            return Admission::Refuse;
        }
        if incoming.remote_address_validated() || self.budget.take(now) {
            Admission::Accept
        } else {
            Admission::Retry
        }
    }

    fn on_open(
        &mut self,
        _conn: &mut Connection,
        handle: ConnectionHandle,
        now: Instant,
    ) -> ServerConn {
        self.next_conn_id += 1;
        self.handshake_deadlines
            .push_back((now + HANDSHAKE_DEADLINE, handle, self.next_conn_id));
        ServerConn {
            id: self.next_conn_id,
            handle,
            alpn: None,
            peer: None,
            widened: false,
            validated_remote: None,
            perf: PerfServer::default(),
            stoq: StoqServer::default(),
            doq: DoqServer::default(),
            // Without a gate a connection is admitted by its handshake.
            admission: if self.gate.is_some() {
                AdmissionStage::Handshaking
            } else {
                AdmissionStage::Admitted(None)
            },
        }
    }

    fn on_event(
        &mut self,
        st: &mut ServerConn,
        conn: &mut Connection,
        event: Event,
        now: Instant,
        counters: &mut Counters,
    ) {
        if st.alpn.is_none() {
            st.alpn = Alpn::of(conn);
        }
        let Some(alpn) = st.alpn else { return };
        if conn.is_closed() {
            // Closed by an earlier event of this drive (a refused resumed
            // certificate, a failed bundle): serve nothing more.
            return;
        }
        if matches!(event, Event::Connected) && !self.on_connected(st, conn, alpn, now, counters) {
            return;
        }
        let early = conn.is_handshaking();
        let ctx = StoqContext {
            stats: &self.stats,
            early,
            peer: st.peer.as_ref().map(|peer| &peer.der),
            operator: st.peer.as_ref().is_some_and(|peer| peer.operator),
            node: st.peer.as_ref().is_some_and(|peer| peer.node),
            authority: self.control.as_deref().map(|port| AuthorityRoute {
                port,
                worker: self.worker,
                handle: st.handle.0,
                conn_id: st.id,
            }),
            gate: self.gate.as_deref(),
            validated_remote: st.validated_remote,
            worker: self.worker,
            conn_id: st.id,
            now,
            assets: self.assets.as_ref(),
        };
        match (alpn, event) {
            (Alpn::Perf, Event::Stream(StreamEvent::Opened { .. })) => {
                if early {
                    // perf requests are not idempotent enough to serve from
                    // replayable 0-RTT data: hold until the handshake is done.
                    counters.zero_rtt_deferred += 1;
                } else {
                    st.perf.on_readable(conn, None, counters);
                }
            }
            (Alpn::Perf, Event::Stream(StreamEvent::Readable { id })) if !early => {
                st.perf.on_readable(conn, Some(id), counters)
            }
            (Alpn::Perf, Event::Stream(StreamEvent::Writable { id })) => {
                st.perf.on_writable(conn, id, counters)
            }
            (
                Alpn::Perf,
                Event::Stream(StreamEvent::Finished { id } | StreamEvent::Stopped { id, .. }),
            ) => {
                tracing::trace!(path = ?conn.stats().path, "perf stream finished");
                st.perf.on_finished(id)
            }
            (Alpn::Perf, Event::Connected) => {
                st.perf.on_readable(conn, None, counters);
                for id in st.perf.stream_ids() {
                    st.perf.on_readable(conn, Some(id), counters);
                }
            }
            (Alpn::Stoq, Event::Stream(StreamEvent::Opened { .. })) => {
                st.stoq
                    .on_readable(conn, None, &ctx, &mut st.admission, counters)
            }
            (Alpn::Stoq, Event::Stream(StreamEvent::Readable { id })) => {
                st.stoq
                    .on_readable(conn, Some(id), &ctx, &mut st.admission, counters)
            }
            (
                Alpn::Stoq,
                Event::Stream(StreamEvent::Finished { id } | StreamEvent::Stopped { id, .. }),
            ) => st.stoq.on_finished(id),
            (Alpn::Stoq, Event::Connected) => {
                st.stoq
                    .on_connected(conn, &ctx, &mut st.admission, counters)
            }
            (Alpn::Stoq, Event::Stream(StreamEvent::Writable { id })) => {
                st.stoq.on_writable(conn, id)
            }
            (Alpn::Doq, Event::Stream(StreamEvent::Writable { id })) => {
                st.doq.on_writable(conn, id)
            }
            // DNS queries are idempotent and public (RFC 9250 §4.5): served
            // from 0-RTT data too, unless this server wants a certificate
            // for DNS (checked when the handshake completes).
            (
                Alpn::Doq,
                Event::Stream(StreamEvent::Opened { .. } | StreamEvent::Readable { .. }),
            ) if early && !self.dns_without_certificate => {
                counters.zero_rtt_deferred += 1;
            }
            (Alpn::Doq, Event::Connected) if !self.dns_without_certificate => {
                let zone = self.zone.as_ref().map(|z| z.load());
                let resolver = self.resolver_route(st);
                st.doq
                    .on_readable(conn, None, zone.as_ref(), resolver.as_ref(), now, counters)
            }
            (Alpn::Doq, Event::Stream(StreamEvent::Opened { .. })) => {
                let zone = self.zone.as_ref().map(|z| z.load());
                let resolver = self.resolver_route(st);
                st.doq
                    .on_readable(conn, None, zone.as_ref(), resolver.as_ref(), now, counters)
            }
            (Alpn::Doq, Event::Stream(StreamEvent::Readable { id })) => {
                let zone = self.zone.as_ref().map(|z| z.load());
                let resolver = self.resolver_route(st);
                st.doq.on_readable(
                    conn,
                    Some(id),
                    zone.as_ref(),
                    resolver.as_ref(),
                    now,
                    counters,
                )
            }
            (
                Alpn::Doq,
                Event::Stream(StreamEvent::Finished { id } | StreamEvent::Stopped { id, .. }),
            ) => st.doq.on_finished(id),
            _ => {}
        }
        self.widen(st, conn);
    }
}

impl ServerService {
    /// Grant a connection the configured receive window once it is
    /// trusted (a `perf` connection its ALPN rule allowed, a `stoq/1`
    /// connection with a certificate once admitted), and more streams as it
    /// uses them, up to the configured maximum. Everyone else (`doq`,
    /// enrolling and unadmitted `stoq/1`) keeps the small receive window
    /// and grows to at most `UNTRUSTED_STREAMS_BIDI_MAX` streams
    /// (`DOQ_STREAMS_BIDI_MAX` for `doq`), so what an unauthenticated peer
    /// can make the server buffer is bounded.
    fn widen(&self, st: &mut ServerConn, conn: &mut Connection) {
        if conn.is_handshaking() || conn.is_closed() {
            return;
        }
        let trusted = st.widened
            || match st.alpn {
                Some(Alpn::Perf) => true,
                Some(Alpn::Stoq) => st.peer.is_some() && st.admission.is_admitted(),
                Some(Alpn::Doq) | None => false,
            };
        if trusted && !st.widened {
            st.widened = true;
            conn.set_receive_window(self.trusted_receive_window);
            conn.set_send_window(self.trusted_send_window);
        }
        // Streams grow with use: quinn-proto keeps state for every stream
        // the peer may open, so a held connection that never uses many
        // keeps the small initial count. Once the peer has half its limit
        // open, the limit doubles (up to the untrusted or the configured
        // maximum), a round trip before the peer could run out.
        let limit = conn.max_concurrent_streams(Dir::Bi);
        let open = conn.streams().remote_open_streams(Dir::Bi);
        let max = match (trusted, st.alpn) {
            (true, _) => self.trusted_streams_bidi,
            (false, Some(Alpn::Doq)) => self
                .trusted_streams_bidi
                .min(crate::transport::DOQ_STREAMS_BIDI_MAX),
            (false, _) => self
                .trusted_streams_bidi
                .min(crate::transport::UNTRUSTED_STREAMS_BIDI_MAX),
        };
        let max = u64::from(max);
        if limit < max && open * 2 >= limit {
            let grown = (limit * 2).clamp(1, max);
            conn.set_max_concurrent_streams(
                Dir::Bi,
                VarInt::from_u64(grown).unwrap_or(VarInt::MAX),
            );
        }
    }
}

/// Application close code: the handshake did not complete within
/// [`HANDSHAKE_DEADLINE`].
pub const CLOSE_HANDSHAKE_DEADLINE: u32 = 0x105;

/// Close a connection whose client certificate no longer admits it.
fn close_refused_peer(conn: &mut Connection, refusal: PeerRefusal, now: Instant) {
    let code = match refusal {
        PeerRefusal::Revoked => CLOSE_CERTIFICATE_REVOKED,
        PeerRefusal::OutsideValidity => CLOSE_CERTIFICATE_INVALID,
    };
    conn.close(
        now,
        VarInt::from_u32(code),
        Bytes::from(refusal.to_string()),
    );
}
