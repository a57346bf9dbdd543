//! Clients built on the worker machinery: `stoq/1` requests and the `perf`
//! load generator. Each client worker has its own ephemeral socket.

pub mod admit;
pub mod bench;
pub mod load;
pub mod peers;
pub mod rpc;

use crate::cid::WorkerId;
use crate::io::BackendKind;
use crate::io::sockopt::bind_client_socket;
use crate::protocols::stoq::Kind;
use crate::server::{ServeError, make_backend};
use crate::stats::StatsRegistry;
use crate::transport::{
    ClientIdentity, ServerTrust, TlsSetupError, TransportSettings, client_crypto,
};
use crate::worker::{Mailbox, Routing, Service, Worker, WorkerParts};
use bench::{BenchPlan, BenchProgress, BenchReport, BenchService};
use bytes::Bytes;
use quinn_proto::{ClientConfig, EndpointConfig};
use rpc::{RpcOutcome, RpcService};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Socket buffer size of client sockets.
const CLIENT_SOCKET_BUFFER_BYTES: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("only IPv6 servers are served; {0} is IPv4 (or v4-mapped)")]
    Ipv4Target(SocketAddr),
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    #[error("cannot open a client socket: {0}")]
    Socket(std::io::Error),
    #[error(transparent)]
    Setup(#[from] ServeError),
    #[error("client worker failed: {0}")]
    Worker(String),
}

/// How a client reaches and trusts a server.
#[derive(Clone, Debug)]
pub struct ClientTarget {
    pub remote: SocketAddr,
    pub server_name: String,
    pub trust: ServerTrust,
    /// The certificate presented for mutual TLS (`None`: none; the server
    /// then allows enrollment, public DNS and, where configured, `perf`).
    pub identity: Option<ClientIdentity>,
    pub backend: BackendKind,
    pub transport: TransportSettings,
    /// Makes the admission proofs of `stoq/1` connections (with
    /// `identity`); `None` sends none (the server then refuses all but
    /// enrollment where admission is on).
    pub admitter: Option<Arc<dyn crate::admission::Admitter>>,
}

impl ClientTarget {
    fn check(&self) -> Result<SocketAddrV6, ClientError> {
        match self.remote {
            SocketAddr::V6(a) if a.ip().to_ipv4_mapped().is_none() => Ok(a),
            other => Err(ClientError::Ipv4Target(other)),
        }
    }

    /// A QUIC client config for `alpn` (shares one session cache, so later
    /// connections from it resume and may use 0-RTT).
    pub fn client_config(&self, alpn: &[u8]) -> Result<ClientConfig, ClientError> {
        self.client_config_resuming(alpn, true)
    }

    /// `client_config`, or without `resume` one whose every connection is
    /// a full handshake.
    pub fn client_config_resuming(
        &self,
        alpn: &[u8],
        resume: bool,
    ) -> Result<ClientConfig, ClientError> {
        let crypto = client_crypto(&self.trust, self.identity.as_ref(), alpn, resume)?;
        let mut config = ClientConfig::new(crypto);
        config.transport_config(Arc::new(self.transport.build()));
        Ok(config)
    }
}

fn client_worker<S: Service>(
    target: &ClientTarget,
    index: usize,
    service: S,
) -> Result<Worker<S>, ClientError> {
    let mailbox = Arc::new(Mailbox::new(1).map_err(ClientError::Socket)?);
    client_worker_with(target, index, service, mailbox)
}

/// A client worker whose mailbox the caller holds (to wake it from other
/// threads).
fn client_worker_with<S: Service>(
    target: &ClientTarget,
    index: usize,
    service: S,
    mailbox: Arc<Mailbox>,
) -> Result<Worker<S>, ClientError> {
    let remote = target.check()?;
    let local = if remote.ip().is_loopback() {
        Ipv6Addr::LOCALHOST
    } else {
        Ipv6Addr::UNSPECIFIED
    };
    let socket = bind_client_socket(
        SocketAddrV6::new(local, 0, 0, 0),
        CLIENT_SOCKET_BUFFER_BYTES,
    )
    .map_err(ClientError::Socket)?;
    let io = make_backend(
        target.backend,
        socket,
        &mailbox,
        index,
        crate::io::IoBatch::default(),
        target.transport.gso,
    )?;
    // Clients receive into GRO-sized buffers, so they take any datagram
    // a server's MTU discovery finds room for (jumbo frames included).
    let mut endpoint_config = EndpointConfig::default();
    endpoint_config
        .max_udp_payload_size(crate::io::MAX_UDP_PAYLOAD_RECEIVED)
        .expect("within the RFC 9000 limit");
    let endpoint = quinn_proto::Endpoint::new(Arc::new(endpoint_config), None, true, None);
    Ok(Worker::new(WorkerParts {
        id: WorkerId(0),
        endpoint,
        io,
        service,
        routing: Routing::Alone { mailbox },
        stats: Arc::new(StatsRegistry::new(1)),
        gso: target.transport.gso,
        udp_payload_max: target.transport.udp_payload_max(),
        blocklist: None,
    }))
}

/// Send `requests` over one `stoq/1` connection made with `config` and wait
/// for the replies. Reusing `config` for a later call resumes the session.
pub fn rpc(
    target: &ClientTarget,
    config: &ClientConfig,
    requests: Vec<(Kind, Bytes)>,
    timeout: Duration,
) -> Result<RpcOutcome, ClientError> {
    run_rpc_admitted(target, || {
        RpcService::new(
            config.clone(),
            target.remote,
            &target.server_name,
            requests.clone(),
            timeout,
        )
    })
}

/// Send one `stoq/1` request of any kind (the authority's kinds are not
/// idempotent: never sent as 0-RTT data) and wait for its reply.
pub fn rpc_raw(
    target: &ClientTarget,
    config: &ClientConfig,
    kind: u8,
    payload: &[u8],
    timeout: Duration,
) -> Result<RpcOutcome, ClientError> {
    let request = rpc::Request {
        message: crate::protocols::stoq::encode(kind, payload),
        idempotent: false,
    };
    run_rpc_admitted(target, || {
        RpcService::with_framing(
            config.clone(),
            target.remote,
            &target.server_name,
            rpc::Framing::Stoq,
            vec![request.clone()],
            timeout,
        )
    })
}

/// Send already-framed requests (`stoq/1` messages or length-prefixed DNS
/// messages) on parallel streams of one connection with ALPN `alpn`.
pub fn rpc_framed(
    target: &ClientTarget,
    alpn: &[u8],
    framing: rpc::Framing,
    requests: Vec<rpc::Request>,
    timeout: Duration,
) -> Result<RpcOutcome, ClientError> {
    let config = target.client_config(alpn)?;
    run_rpc_admitted(target, || {
        RpcService::with_framing(
            config.clone(),
            target.remote,
            &target.server_name,
            framing,
            requests.clone(),
            timeout,
        )
    })
}

/// Run an RPC connection with the target's admitter. A connection the
/// server closed at its admission deadline before any request went out
/// (a plot built on first use can take longer) is tried once more.
fn run_rpc_admitted(
    target: &ClientTarget,
    make: impl Fn() -> RpcService,
) -> Result<RpcOutcome, ClientError> {
    // Admission proves things about the client certificate: without one
    // there is nothing to prove (the server allows enrollment only).
    let admitter = target
        .admitter
        .clone()
        .filter(|_| target.identity.is_some());
    let outcome = run_rpc(target, make().with_admitter(admitter.clone()))?;
    if outcome.admission_deadline && outcome.admission.is_none() {
        let again = run_rpc(target, make().with_admitter(admitter))?;
        // A second failure says less than the first (the deadline).
        if again.replies.iter().all(|r| matches!(r, rpc::Reply::Ok(_))) {
            return Ok(again);
        }
    }
    Ok(outcome)
}

/// Run a request load (`load::LoadPlan`) over one connection.
pub fn run_load(
    target: &ClientTarget,
    config: &ClientConfig,
    plan: load::LoadPlan,
) -> Result<load::LoadReport, ClientError> {
    let service = load::LoadService::new(config.clone(), target.remote, &target.server_name, plan)
        .with_admitter(
            target
                .admitter
                .clone()
                .filter(|_| target.identity.is_some()),
        );
    let worker = client_worker(target, 0, service)?;
    let (service, _) = worker
        .run()
        .map_err(|e| ClientError::Worker(e.to_string()))?;
    Ok(service.report())
}

/// Run one RPC connection on a client worker to completion.
fn run_rpc(target: &ClientTarget, service: RpcService) -> Result<RpcOutcome, ClientError> {
    let worker = client_worker(target, 0, service)?;
    let (service, _) = worker
        .run()
        .map_err(|e| ClientError::Worker(e.to_string()))?;
    Ok(service.outcome())
}

/// A running bench: one thread per client worker.
pub struct BenchHandle {
    pub progress: Vec<Arc<BenchProgress>>,
    threads: Vec<JoinHandle<Result<BenchReport, String>>>,
}

impl BenchHandle {
    pub fn is_finished(&self) -> bool {
        self.threads.iter().all(JoinHandle::is_finished)
    }

    pub fn join(self) -> Result<Vec<BenchReport>, ClientError> {
        self.threads
            .into_iter()
            .map(|t| {
                t.join()
                    .map_err(|_| ClientError::Worker("bench worker panicked".into()))?
                    .map_err(ClientError::Worker)
            })
            .collect()
    }
}

/// Start `workers` bench workers, splitting connections and active
/// connections of `plan` between them.
pub fn spawn_bench(
    target: &ClientTarget,
    plan: &BenchPlan,
    workers: usize,
    cores: Option<&[usize]>,
) -> Result<BenchHandle, ClientError> {
    let config = target.client_config_resuming(crate::protocols::ALPN_PERF, plan.resume)?;
    spawn_bench_with(target, plan, workers, cores, &config)
}

/// `spawn_bench` with a caller-made QUIC client config (tests use it to
/// choose initial connection IDs, and so the worker a handshake lands on).
pub fn spawn_bench_with(
    target: &ClientTarget,
    plan: &BenchPlan,
    workers: usize,
    cores: Option<&[usize]>,
    config: &ClientConfig,
) -> Result<BenchHandle, ClientError> {
    let workers = workers.max(1);
    let mut progress = Vec::new();
    let mut threads = Vec::new();
    for index in 0..workers {
        let share = |total: usize| total / workers + usize::from(index < total % workers);
        let mut worker_plan = plan.clone();
        worker_plan.connections = share(plan.connections);
        worker_plan.active = share(plan.active);
        let p = Arc::new(BenchProgress::default());
        progress.push(p.clone());
        let worker = client_worker(
            target,
            index,
            BenchService::new(worker_plan, config.clone(), p),
        )?;
        let core = cores.and_then(|c| c.get(index).copied());
        let thread = std::thread::Builder::new()
            .name(format!("bench-worker-{index}"))
            .spawn(move || {
                if let Some(core) = core {
                    core_affinity::set_for_current(core_affinity::CoreId { id: core });
                }
                worker
                    .run()
                    .map(|(service, counters)| {
                        let mut report = service.report();
                        report.client_counters = counters;
                        report
                    })
                    .map_err(|e| e.to_string())
            })
            .map_err(ClientError::Socket)?;
        threads.push(thread);
    }
    Ok(BenchHandle { progress, threads })
}

/// What the embedded DNS says about a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedEndpoint {
    /// The name's IPv6 socket addresses (its AAAA records, on `port`).
    pub addresses: Vec<SocketAddrV6>,
    /// The TLSA `3 1 1` pins: SHA-256 of the keys that may answer there
    /// (one per member for a cluster's name), in the order given.
    pub pins: Vec<[u8; 32]>,
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("`{0}` is not a valid DNS name")]
    BadName(String),
    #[error("{name}: the server answered {code}")]
    Negative { name: String, code: String },
    #[error("{name}: {reason}")]
    Failed { name: String, reason: String },
}

/// `resolve_endpoint`: ask the server at `target` (over DNS-over-QUIC) for
/// the AAAA records of `name` and its TLSA pin for `port`.
pub fn resolve_endpoint(
    target: &ClientTarget,
    name: &str,
    port: u16,
    timeout: Duration,
) -> Result<ResolvedEndpoint, ResolveError> {
    use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::{Name, RData, RecordType};
    let fqdn = |n: &str| {
        Name::from_ascii(if n.ends_with('.') {
            n.to_owned()
        } else {
            format!("{n}.")
        })
    };
    let host = fqdn(name).map_err(|_| ResolveError::BadName(name.to_owned()))?;
    let service = fqdn(&format!("_{port}._udp.{host}"))
        .map_err(|_| ResolveError::BadName(name.to_owned()))?;
    let query = |qname: Name, kind: RecordType| {
        // RFC 9250 §4.2.1: message ID 0 over QUIC.
        let mut message = Message::new(0, MessageType::Query, OpCode::Query);
        message.queries.push(Query::query(qname, kind));
        let bytes = message.to_vec().expect("a one-question query encodes");
        let mut framed = Vec::with_capacity(2 + bytes.len());
        framed.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
        framed.extend_from_slice(&bytes);
        rpc::Request {
            message: Bytes::from(framed),
            idempotent: true,
        }
    };
    let requests = vec![
        query(host.clone(), RecordType::AAAA),
        query(service, RecordType::TLSA),
    ];
    let config = target.client_config(crate::protocols::ALPN_DOQ)?;
    let service = RpcService::with_framing(
        config,
        target.remote,
        &target.server_name,
        rpc::Framing::Doq,
        requests,
        timeout,
    );
    let outcome = run_rpc(target, service)?;
    let mut answers = Vec::new();
    for reply in outcome.replies {
        let bytes = match reply {
            rpc::Reply::Ok(bytes) => bytes,
            rpc::Reply::Error { message, .. } | rpc::Reply::Failed(message) => {
                return Err(ResolveError::Failed {
                    name: name.to_owned(),
                    reason: message,
                });
            }
        };
        let message = Message::from_vec(&bytes).map_err(|e| ResolveError::Failed {
            name: name.to_owned(),
            reason: format!("malformed DNS answer: {e}"),
        })?;
        answers.push(message);
    }
    let [aaaa, tlsa] = <[Message; 2]>::try_from(answers).expect("two requests, two replies");
    if aaaa.metadata.response_code != ResponseCode::NoError {
        return Err(ResolveError::Negative {
            name: name.to_owned(),
            code: format!(
                "{:?} ({})",
                aaaa.metadata.response_code, aaaa.metadata.response_code
            ),
        });
    }
    let addresses = aaaa
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::AAAA(a) => Some(SocketAddrV6::new(a.0, port, 0, 0)),
            _ => None,
        })
        .collect();
    let pins = tlsa
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::TLSA(t) => <[u8; 32]>::try_from(t.cert_data.as_slice()).ok(),
            _ => None,
        })
        .collect();
    Ok(ResolvedEndpoint { addresses, pins })
}
