//! Requests to other servers over long-lived `stoq/1` connections: how the
//! control plane talks to the cluster's other members (Raft messages,
//! forwarded requests). One client worker thread holds one connection per
//! peer address, opened on the first request and again after it is lost;
//! each request is one bidirectional stream. Callers on any thread queue a
//! request with a callback that receives its reply (on the peer thread), so
//! the dataplane stays free of async and the caller chooses how to wait.

use super::rpc::{Framing, Reply};
use super::{ClientError, ClientTarget, client_worker_with};
use crate::protocols::stoq::{self, RESPONSE_PAYLOAD_MAX};
use crate::protocols::{ReadState, read_stream};
use crate::stats::Counters;
use crate::worker::{
    Actions, ConnectRequest, Delivered, Delivery, Mailbox, Service, WorkerControl,
};
use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use quinn_proto::{ClientConfig, Connection, ConnectionHandle, Dir, Event, StreamEvent, StreamId};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Requests queued for the peer thread at once; past it `send` hands the
/// request back (the caller answers as if the peer were unreachable).
const QUEUE_LEN: usize = 4096;

/// How long a connection may take to complete its handshake before it is
/// abandoned (a peer not listening yet, or down) and the next request
/// connects again.
const CONNECT_GIVE_UP: Duration = Duration::from_secs(2);

/// How a request to a peer ended.
#[derive(Debug)]
pub enum PeerReply {
    /// The peer answered (an answer or an error response).
    Answered(Reply),
    /// It never left this node (no connection, queue full, timed out
    /// before it was sent): the peer cannot have acted on it.
    NotSent(String),
    /// It was sent, and no answer came (timed out, connection lost): the
    /// peer may have acted on it.
    Unknown(String),
}

/// What receives a request's reply, called once on the peer thread.
pub type OnReply = Box<dyn FnOnce(PeerReply) + Send>;

/// The certificate a connected peer showed, read once per connection.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    /// Its leaf certificate (DER).
    pub leaf: Vec<u8>,
    /// SHA-256 of the leaf's SubjectPublicKeyInfo: its key's pin.
    pub spki_sha256: [u8; 32],
}

/// A check of the peer's certificate, run each time the request is about
/// to be sent: `Err` says why this peer is not the one meant, and the
/// request fails as not sent. The handshake proves the name and the
/// issuer; this is where a caller pins a key (a cluster member's id).
pub type PeerCheck = Box<dyn Fn(&PeerIdentity) -> Result<(), String> + Send>;

/// One request for a peer.
pub struct PeerRequest {
    pub remote: SocketAddr,
    /// The name the peer's certificate must carry (an IP address works).
    pub server_name: String,
    pub kind: u8,
    pub payload: Bytes,
    /// When it fails as timed out if no reply came.
    pub deadline: Instant,
    /// Run on the peer's certificate before the request is sent.
    pub check: Option<PeerCheck>,
    pub on_reply: OnReply,
}

/// The handle callers use; dropping it stops the thread.
pub struct Peers {
    queue: Arc<ArrayQueue<PeerRequest>>,
    mailbox: Arc<Mailbox>,
    thread: Option<JoinHandle<()>>,
}

impl Peers {
    /// Start the peer thread with `target`'s identity, trust, backend and
    /// transport (its `remote` only picks the local address family: use
    /// any peer's).
    pub fn spawn(target: &ClientTarget) -> Result<Self, ClientError> {
        let config = target.client_config(crate::protocols::ALPN_STOQ)?;
        let queue = Arc::new(ArrayQueue::new(QUEUE_LEN));
        let mailbox = Arc::new(Mailbox::new(1).map_err(ClientError::Socket)?);
        let service = PeerService {
            config,
            queue: queue.clone(),
            links: HashMap::new(),
            by_handle: HashMap::new(),
            in_flight: HashMap::new(),
            connects: Vec::new(),
            unsent: HashMap::new(),
            abandoned: Vec::new(),
            handshake_failures: HashMap::new(),
            next_id: 0,
        };
        let worker = client_worker_with(target, 0, service, mailbox.clone())?;
        let thread = std::thread::Builder::new()
            .name("cluster-peers".into())
            .spawn(move || {
                if let Err(e) = worker.run() {
                    tracing::error!(error = %e, "the cluster's peer connections stopped");
                }
            })
            .map_err(ClientError::Socket)?;
        Ok(Self {
            queue,
            mailbox,
            thread: Some(thread),
        })
    }

    /// Queue a request; hands it back when the queue is full.
    pub fn send(&self, request: PeerRequest) -> Result<(), Box<PeerRequest>> {
        self.queue.push(request).map_err(Box::new)?;
        self.mailbox.waker.wake();
        Ok(())
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        let _ = self.mailbox.send_control(WorkerControl::Shutdown {
            drain: Duration::ZERO,
        });
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The connection to one peer address.
#[derive(Default)]
struct Link {
    /// Set once the worker opened the connection.
    handle: Option<ConnectionHandle>,
    conn_id: u64,
    /// Since when a connect was asked for and the connection not opened.
    connecting: Option<Instant>,
    connected: bool,
    /// The peer's certificate, once connected.
    peer: Option<PeerIdentity>,
    /// Whether a request on this connection was refused by its check
    /// (logged once per connection, not once per Raft heartbeat).
    refusal_logged: bool,
    waiting: VecDeque<PeerRequest>,
}

struct InFlight {
    buf: Vec<u8>,
    deadline: Instant,
    on_reply: OnReply,
}

struct PeerService {
    config: ClientConfig,
    queue: Arc<ArrayQueue<PeerRequest>>,
    links: HashMap<SocketAddr, Link>,
    by_handle: HashMap<ConnectionHandle, SocketAddr>,
    in_flight: HashMap<(ConnectionHandle, StreamId), InFlight>,
    /// Connections to ask the worker for at its next `poll`.
    connects: Vec<ConnectRequest>,
    /// What is left to write of requests flow control held back.
    unsent: HashMap<(ConnectionHandle, StreamId), Bytes>,
    /// Streams of requests that timed out, to stop and reset.
    abandoned: Vec<(ConnectionHandle, StreamId)>,
    next_id: u64,
    /// The last handshake failure logged for each peer, and when: a peer
    /// that keeps failing the same way (an impostor's certificate, a member
    /// down) is named once until it connects, and a new reason at most
    /// once per `HANDSHAKE_FAILURE_LOG_EVERY` (a peer picks its close
    /// reason's text).
    handshake_failures: HashMap<SocketAddr, (String, Instant)>,
}

/// Peers whose last handshake failure is remembered (the cluster's members
/// are a handful; past this the memory starts over).
const HANDSHAKE_FAILURES_REMEMBERED: usize = 256;
const HANDSHAKE_FAILURE_LOG_EVERY: Duration = Duration::from_secs(1);
/// The most of a failure's reason a log line carries.
const HANDSHAKE_FAILURE_REASON_MAX: usize = 200;

/// A connection's state: its peer address.
pub struct PeerConn {
    remote: SocketAddr,
    id: u64,
}

impl PeerService {
    /// Move queued requests to their links, asking for a connection where
    /// there is none. Called first in every worker step (from
    /// `poll_deliveries`), so a request to a connected peer goes out in the
    /// step its wake-up started.
    fn take_queued(&mut self, now: Instant) {
        while let Some(request) = self.queue.pop() {
            let link = self.links.entry(request.remote).or_default();
            if link.handle.is_none() && link.connecting.is_none() {
                link.connecting = Some(now);
                self.connects.push(ConnectRequest {
                    config: self.config.clone(),
                    remote: request.remote,
                    server_name: request.server_name.clone(),
                });
            }
            link.waiting.push_back(request);
        }
    }

    /// The connection is gone: every request on it or waiting for it
    /// fails with `why` (Raft sends again; a forwarded request's client
    /// retries).
    fn lost(&mut self, handle: ConnectionHandle, remote: SocketAddr, why: &str) {
        let gone: Vec<_> = self
            .in_flight
            .keys()
            .filter(|(h, _)| *h == handle)
            .copied()
            .collect();
        for key in gone {
            self.unsent.remove(&key);
            if let Some(request) = self.in_flight.remove(&key) {
                (request.on_reply)(PeerReply::Unknown(why.to_owned()));
            }
        }
        self.by_handle.remove(&handle);
        if let Some(link) = self.links.remove(&remote) {
            for request in link.waiting {
                (request.on_reply)(PeerReply::NotSent(why.to_owned()));
            }
        }
    }

    /// Log that the handshake with `remote` failed: not again for the same
    /// reason until the peer connected, nor for another within
    /// `HANDSHAKE_FAILURE_LOG_EVERY` of the last line.
    fn handshake_failed(&mut self, remote: SocketAddr, why: &str, now: Instant) {
        // Escaped and cut: part of the reason may be the peer's own text.
        let why: String = why
            .chars()
            .flat_map(char::escape_debug)
            .take(HANDSHAKE_FAILURE_REASON_MAX)
            .collect();
        if let Some((last, at)) = self.handshake_failures.get(&remote)
            && (*last == why || now.duration_since(*at) < HANDSHAKE_FAILURE_LOG_EVERY)
        {
            return;
        }
        tracing::warn!(peer = %remote, "the peer failed its handshake: {why}");
        if self.handshake_failures.len() >= HANDSHAKE_FAILURES_REMEMBERED {
            self.handshake_failures.clear();
        }
        self.handshake_failures.insert(remote, (why, now));
    }

    /// Open a stream for each waiting request, as far as the peer allows.
    fn send_waiting(
        &mut self,
        handle: ConnectionHandle,
        remote: SocketAddr,
        conn: &mut Connection,
    ) {
        loop {
            let Some(link) = self.links.get_mut(&remote) else {
                return;
            };
            let Some(request) = link.waiting.pop_front() else {
                return;
            };
            if let Some(check) = &request.check {
                let checked = match &link.peer {
                    Some(peer) => check(peer),
                    None => Err(format!(
                        "the peer at {remote} presented no certificate that can be read"
                    )),
                };
                if let Err(why) = checked {
                    if !link.refusal_logged {
                        link.refusal_logged = true;
                        tracing::warn!(peer = %remote, "requests to this peer are not sent: {why}");
                    }
                    (request.on_reply)(PeerReply::NotSent(why));
                    continue;
                }
            }
            let Some(id) = conn.streams().open(Dir::Bi) else {
                link.waiting.push_front(request);
                return;
            };
            self.unsent
                .insert((handle, id), stoq::encode(request.kind, &request.payload));
            self.write(handle, conn, id);
            self.in_flight.insert(
                (handle, id),
                InFlight {
                    buf: Vec::new(),
                    deadline: request.deadline,
                    on_reply: request.on_reply,
                },
            );
        }
    }

    /// Write what is left of a request (flow control may take it in
    /// parts), and end the stream once all of it is written.
    fn write(&mut self, handle: ConnectionHandle, conn: &mut Connection, id: StreamId) {
        let Some(rest) = self.unsent.get_mut(&(handle, id)) else {
            return;
        };
        let mut send = conn.send_stream(id);
        match send.write(rest) {
            Ok(written) => {
                let _ = rest.split_to(written);
            }
            Err(quinn_proto::WriteError::Blocked) => return,
            // Stopped or closed: the answer (a reset) says why.
            Err(_) => {
                self.unsent.remove(&(handle, id));
                return;
            }
        }
        if rest.is_empty() {
            self.unsent.remove(&(handle, id));
            let _ = send.finish();
        }
    }

    fn read(&mut self, handle: ConnectionHandle, conn: &mut Connection, id: StreamId) {
        let Some(request) = self.in_flight.get_mut(&(handle, id)) else {
            // The answer to a request that timed out: nobody waits for it.
            // Stop the stream, or it stays open and uses up the peer's
            // stream credit.
            let _ = conn
                .recv_stream(id)
                .stop(quinn_proto::VarInt::from_u32(super::rpc::CLOSE_DONE));
            return;
        };
        let limit = stoq::HEADER_LEN + RESPONSE_PAYLOAD_MAX;
        let reply = match read_stream(conn, id, &mut request.buf, limit) {
            _ if request.buf.len() > limit => {
                PeerReply::Unknown("the peer's answer exceeds the size limit".into())
            }
            ReadState::Reset => PeerReply::Unknown("the peer reset the stream".into()),
            ReadState::Finished => match Framing::Stoq.decode(&request.buf) {
                Reply::Failed(why) => PeerReply::Unknown(why),
                answered => PeerReply::Answered(answered),
            },
            ReadState::Open => return,
        };
        if let Some(request) = self.in_flight.remove(&(handle, id)) {
            (request.on_reply)(reply);
        }
    }
}

impl Service for PeerService {
    type Conn = PeerConn;

    fn on_open(
        &mut self,
        conn: &mut Connection,
        handle: ConnectionHandle,
        _now: Instant,
    ) -> PeerConn {
        let remote = conn.remote_address();
        self.next_id += 1;
        let link = self.links.entry(remote).or_default();
        link.handle = Some(handle);
        link.conn_id = self.next_id;
        // What was learnt of a previous connection is not this one's.
        link.connected = false;
        link.peer = None;
        link.refusal_logged = false;
        self.by_handle.insert(handle, remote);
        PeerConn {
            remote,
            id: self.next_id,
        }
    }

    fn on_event(
        &mut self,
        st: &mut PeerConn,
        conn: &mut Connection,
        event: Event,
        now: Instant,
        _counters: &mut Counters,
    ) {
        let Some(handle) = self
            .links
            .get(&st.remote)
            .filter(|link| link.conn_id == st.id)
            .and_then(|link| link.handle)
        else {
            return;
        };
        match event {
            Event::Connected => {
                self.handshake_failures.remove(&st.remote);
                if let Some(link) = self.links.get_mut(&st.remote) {
                    link.connected = true;
                    link.connecting = None;
                    link.peer = conn
                        .crypto_session()
                        .peer_identity()
                        .and_then(|any| {
                            any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                                .ok()
                        })
                        .and_then(|chain| chain.into_iter().next())
                        .and_then(|leaf| {
                            Some(PeerIdentity {
                                spki_sha256: crate::trust::spki_sha256(&leaf)?,
                                leaf: leaf.to_vec(),
                            })
                        });
                }
                self.send_waiting(handle, st.remote, conn);
            }
            Event::Stream(StreamEvent::Readable { id }) => self.read(handle, conn, id),
            Event::Stream(StreamEvent::Writable { id }) => self.write(handle, conn, id),
            Event::Stream(StreamEvent::Available { dir: Dir::Bi }) => {
                self.send_waiting(handle, st.remote, conn);
            }
            Event::ConnectionLost { reason } => {
                let connected = self
                    .links
                    .get(&st.remote)
                    .is_some_and(|link| link.conn_id == st.id && link.connected);
                if !connected {
                    self.handshake_failed(st.remote, &super::rpc::describe(&reason), now);
                }
                let why = format!(
                    "the connection to the peer was lost: {}",
                    super::rpc::describe(&reason)
                );
                self.lost(handle, st.remote, &why);
            }
            _ => {}
        }
    }

    fn on_close(&mut self, st: PeerConn, _conn: &Connection, _counters: &mut Counters) {
        let current = self
            .links
            .get(&st.remote)
            .filter(|link| link.conn_id == st.id)
            .and_then(|link| link.handle);
        if let Some(handle) = current {
            self.lost(handle, st.remote, "the connection to the peer closed");
        }
    }

    fn poll(&mut self, now: Instant, actions: &mut Actions) {
        self.take_queued(now);
        actions.connect.append(&mut self.connects);
        // Requests past their deadline fail, waiting or in flight (a late
        // answer then finds nobody and is dropped).
        for link in self.links.values_mut() {
            let (late, on_time): (VecDeque<_>, VecDeque<_>) = link
                .waiting
                .drain(..)
                .partition(|request| request.deadline <= now);
            link.waiting = on_time;
            for request in late {
                (request.on_reply)(PeerReply::NotSent("timed out waiting for the peer".into()));
            }
        }
        let late: Vec<_> = self
            .in_flight
            .iter()
            .filter(|(_, request)| request.deadline <= now)
            .map(|(key, _)| *key)
            .collect();
        for key in late {
            if let Some(request) = self.in_flight.remove(&key) {
                (request.on_reply)(PeerReply::Unknown(
                    "timed out waiting for the peer's answer".into(),
                ));
            }
            // Its stream is ended from both sides on the next step (it
            // would hold one of the peer's stream slots otherwise).
            self.abandoned.push(key);
        }
        // A connect the worker never opened (it refused it) is asked for
        // again by the next request; one opened but without a handshake is
        // closed by `on_delivery`.
        for link in self.links.values_mut() {
            if link.handle.is_none()
                && link
                    .connecting
                    .is_some_and(|since| now.duration_since(since) > CONNECT_GIVE_UP)
            {
                link.connecting = None;
            }
        }
        self.links.retain(|_, link| {
            link.handle.is_some() || link.connecting.is_some() || !link.waiting.is_empty()
        });
    }

    fn poll_timeout(&self) -> Option<Instant> {
        let waiting = self
            .links
            .values()
            .flat_map(|link| link.waiting.iter().map(|r| r.deadline));
        let in_flight = self.in_flight.values().map(|r| r.deadline);
        let handshakes = self
            .links
            .values()
            .filter_map(|link| link.connecting.map(|since| since + CONNECT_GIVE_UP));
        waiting.chain(in_flight).chain(handshakes).min()
    }

    fn poll_deliveries(&mut self, now: Instant, out: &mut Vec<Delivery>) {
        self.take_queued(now);
        for (handle, _) in &self.abandoned {
            if let Some(link) = self.by_handle.get(handle).and_then(|r| self.links.get(r)) {
                out.push(Delivery {
                    handle: *handle,
                    conn_id: link.conn_id,
                    what: Delivered::Wake,
                });
            }
        }
        for link in self.links.values() {
            if let Some(handle) = link.handle
                && !link.connected
                && link
                    .connecting
                    .is_some_and(|since| now.duration_since(since) > CONNECT_GIVE_UP)
            {
                out.push(Delivery {
                    handle,
                    conn_id: link.conn_id,
                    what: Delivered::Wake,
                });
            }
        }
        for link in self.links.values() {
            // A blocked link is tried again too: opening is cheap, and the
            // peer's new credit may come without an event.
            if let Some(handle) = link.handle
                && link.connected
                && !link.waiting.is_empty()
            {
                out.push(Delivery {
                    handle,
                    conn_id: link.conn_id,
                    what: Delivered::Wake,
                });
            }
        }
    }

    fn on_delivery(
        &mut self,
        st: &mut PeerConn,
        conn: &mut Connection,
        delivery: Delivery,
        now: Instant,
        _counters: &mut Counters,
    ) {
        if !matches!(delivery.what, Delivered::Wake) || delivery.conn_id != st.id {
            return;
        }
        let code = quinn_proto::VarInt::from_u32(super::rpc::CLOSE_DONE);
        let handle = delivery.handle;
        for (_, id) in self.abandoned.iter().filter(|(h, _)| *h == handle) {
            let _ = conn.recv_stream(*id).stop(code);
            let _ = conn.send_stream(*id).reset(code);
            self.unsent.remove(&(handle, *id));
        }
        self.abandoned.retain(|(h, _)| *h != handle);
        let late = self.links.get(&st.remote).is_some_and(|link| {
            !link.connected
                && link
                    .connecting
                    .is_some_and(|since| now.duration_since(since) > CONNECT_GIVE_UP)
        });
        if late {
            self.handshake_failed(st.remote, "no handshake in time", now);
            conn.close(
                now,
                quinn_proto::VarInt::from_u32(super::rpc::CLOSE_DONE),
                Bytes::from_static(b"no handshake in time"),
            );
            self.lost(
                delivery.handle,
                st.remote,
                "no handshake with the peer in time",
            );
            return;
        }
        self.send_waiting(delivery.handle, st.remote, conn);
    }
}
