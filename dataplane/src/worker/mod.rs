//! The thread-per-core worker: one `quinn_proto::Endpoint`, its connections,
//! one I/O backend, and a [`Service`] that gives the connections meaning.
//!
//! One loop iteration: control messages and handed-over datagrams → receive
//! everything ready → fire timers → let the service act → drive every
//! connection that changed (events, stream handlers, `poll_transmit` with
//! GSO-sized batches) → flush sends → publish counters → sleep until the next
//! timer, a datagram or a wake. The only blocking call is the backend's wait.

mod mailbox;

pub use mailbox::{Handoff, Mailbox, WorkerControl};

use crate::cid::{RouteError, WorkerId, owner_of};
use crate::io::{Backend, RecvDatagram, SendHeader};
use crate::stats::{Counters, StatsRegistry};
use bytes::{Bytes, BytesMut};
use quinn_proto::{
    ClientConfig, Connection, ConnectionError, ConnectionHandle, DatagramEvent, EcnCodepoint,
    Endpoint, Event, Incoming, Transmit, VarInt,
};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Application error code sent to every peer when the server drains
/// (documented in docs/PROTOCOL.md).
pub const CLOSE_SHUTDOWN: u32 = 0x100;
/// Application error code of a connection whose handling panicked (a bug
/// in the server, contained to that connection; documented in
/// docs/PROTOCOL.md and docs/SECURITY.md).
pub const CLOSE_INTERNAL_ERROR: u32 = 0x103;
/// Largest GSO batch handed to the kernel in one send (the kernel's
/// UDP_MAX_SEGMENTS is 64 on older kernels).
pub const GSO_SEGMENTS_MAX: usize = 64;
/// A GSO send is one UDP datagram to the kernel before segmentation, so its
/// whole payload must fit a UDP length field (65535 less the UDP header);
/// larger batches fail with EMSGSIZE and every segment is lost.
pub const GSO_BYTES_MAX: usize = 65_535 - 8;
/// quinn-proto's default path-MTU discovery ceiling (UDP payload bytes).
pub const UDP_PAYLOAD_MAX: usize = 1452;

/// What the worker does with a new incoming handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    Accept,
    /// Answer with a Retry packet: the client must prove its address first.
    Retry,
    /// Answer with CONNECTION_REFUSED.
    Refuse,
}

/// Requests a service makes of its worker from `poll`.
#[derive(Default)]
pub struct Actions {
    pub connect: Vec<ConnectRequest>,
    /// Close every connection and end the loop once they drained or this
    /// long passed (zero: send the closes and exit).
    pub stop: Option<Duration>,
    /// Call `Service::on_visit` once for every connection (O(n): for phase
    /// changes, not every iteration).
    pub visit_all: bool,
}

pub struct ConnectRequest {
    pub config: ClientConfig,
    pub remote: SocketAddr,
    pub server_name: String,
}

/// The application side of a worker: server stream handlers or a client.
pub trait Service: Send {
    /// Per-connection state.
    type Conn: Send;

    /// Decide on a new incoming handshake. `open` is this worker's count of
    /// connections. Clients never see one.
    fn admit(&mut self, _incoming: &Incoming, _now: Instant, _open: usize) -> Admission {
        Admission::Refuse
    }
    /// A connection was accepted or initiated; `handle` names it in
    /// [`Delivery`]s.
    fn on_open(
        &mut self,
        conn: &mut Connection,
        handle: ConnectionHandle,
        now: Instant,
    ) -> Self::Conn;
    /// One quinn-proto event of a connection, after the worker counted it.
    fn on_event(
        &mut self,
        state: &mut Self::Conn,
        conn: &mut Connection,
        event: Event,
        now: Instant,
        counters: &mut Counters,
    );
    /// Called each time the worker drives a connection (a datagram, timer
    /// or delivery reached it), after its events: for what a service
    /// watches in the connection's state rather than in an event.
    fn on_driven(&mut self, _state: &mut Self::Conn, _conn: &mut Connection, _now: Instant) {}
    /// The connection drained and is gone.
    fn on_close(&mut self, _state: Self::Conn, _conn: &Connection, _counters: &mut Counters) {}
    /// Called once per loop iteration.
    fn poll(&mut self, _now: Instant, _actions: &mut Actions) {}
    /// Called for every connection when `poll` asked for `visit_all`.
    fn on_visit(&mut self, _state: &mut Self::Conn, _conn: &mut Connection, _now: Instant) {}
    /// When `poll` next wants to run, if no packet arrives before.
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }
    /// Collect what other threads sent to connections (control-plane
    /// replies) and the service's own deadlines due at `now`; called once
    /// per loop iteration.
    fn poll_deliveries(&mut self, _now: Instant, _out: &mut Vec<Delivery>) {}
    /// Whether another thread queued something [`Self::poll_deliveries`]
    /// would collect: checked after the worker announced it will sleep, so
    /// a reply queued just before that is not left waiting.
    fn has_deliveries(&self) -> bool {
        false
    }
    /// One delivery for a live connection (those for closed connections are
    /// dropped by the worker).
    fn on_delivery(
        &mut self,
        _state: &mut Self::Conn,
        _conn: &mut Connection,
        _delivery: Delivery,
        _now: Instant,
        _counters: &mut Counters,
    ) {
    }
}

/// A response from another thread for one stream of one connection.
#[derive(Debug)]
pub struct Delivery {
    pub handle: ConnectionHandle,
    /// The service's own id for the connection, so a reused handle is
    /// recognised.
    pub conn_id: u64,
    pub what: Delivered,
}

/// What a [`Delivery`] brings.
#[derive(Debug)]
pub enum Delivered {
    /// The whole response message to write on `stream` and finish it with.
    Response {
        stream: quinn_proto::StreamId,
        response: Bytes,
    },
    /// The resolver's answer to a DNS query forwarded from `stream`.
    DnsAnswer {
        stream: quinn_proto::StreamId,
        message: Vec<u8>,
    },
    /// The connection's admission deadline passed.
    AdmissionDeadline,
    /// The connection's idle deadline passed.
    IdleDeadline,
    /// The connection's handshake deadline passed.
    HandshakeDeadline,
    /// The service has work queued for the connection (a client's
    /// requests from other threads).
    Wake,
}

struct Conn<T> {
    conn: Connection,
    app: T,
    timer: Option<Instant>,
    queued: bool,
    /// The handshake completed.
    connected: bool,
}

/// A transmit the socket would not take yet.
struct PendingSend {
    header: SendHeader,
    contents: Vec<u8>,
}

/// How a worker finds the owner of a datagram.
#[derive(Clone)]
pub enum Routing {
    /// A server worker among `mailboxes.len()` workers sharing one port.
    Shared { mailboxes: Arc<[Mailbox]> },
    /// A client worker with a socket of its own.
    Alone { mailbox: Arc<Mailbox> },
}

pub struct WorkerParts<S> {
    pub id: WorkerId,
    pub endpoint: Endpoint,
    pub io: Box<dyn Backend>,
    pub service: S,
    pub routing: Routing,
    pub stats: Arc<StatsRegistry>,
    pub gso: bool,
    /// Largest UDP payload a connection may send (MTU ceiling).
    pub udp_payload_max: usize,
    /// Sources dropped at the first packet (servers; None for clients).
    pub blocklist: Option<Arc<crate::blocklist::BlocklistStore>>,
}

pub struct Worker<S: Service> {
    io: Box<dyn Backend>,
    core: Core<S>,
}

struct Core<S: Service> {
    id: WorkerId,
    endpoint: Endpoint,
    service: S,
    routing: Routing,
    conns: Vec<Option<Conn<S::Conn>>>,
    open: usize,
    dirty: Vec<ConnectionHandle>,
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    counters: Counters,
    stats: Arc<StatsRegistry>,
    send_buf: Vec<u8>,
    resp_buf: Vec<u8>,
    incoming: Vec<Incoming>,
    responses: Vec<PendingSend>,
    wake_targets: Vec<bool>,
    pending: Option<PendingSend>,
    max_gso: usize,
    stopping_until: Option<Instant>,
    deliveries: Vec<Delivery>,
    blocklist_store: Option<Arc<crate::blocklist::BlocklistStore>>,
    /// The blocklist as loaded at the top of this loop iteration.
    blocklist: Arc<crate::blocklist::Blocklist>,
}

impl<S: Service> Worker<S> {
    pub fn new(parts: WorkerParts<S>) -> Self {
        let by_size = GSO_BYTES_MAX / parts.udp_payload_max.max(1200);
        let max_gso = if parts.gso {
            parts
                .io
                .max_gso_segments()
                .min(GSO_SEGMENTS_MAX)
                .min(by_size)
                .max(1)
        } else {
            1
        };
        let targets = match &parts.routing {
            Routing::Shared { mailboxes } => mailboxes.len(),
            Routing::Alone { .. } => 1,
        };
        let core = Core {
            id: parts.id,
            endpoint: parts.endpoint,
            service: parts.service,
            routing: parts.routing,
            conns: Vec::new(),
            open: 0,
            dirty: Vec::new(),
            timers: BinaryHeap::new(),
            counters: Counters::default(),
            stats: parts.stats,
            send_buf: Vec::with_capacity(max_gso * 1500),
            resp_buf: Vec::with_capacity(1500),
            incoming: Vec::new(),
            responses: Vec::new(),
            wake_targets: vec![false; targets],
            pending: None,
            max_gso,
            stopping_until: None,
            deliveries: Vec::new(),
            blocklist: parts
                .blocklist
                .as_ref()
                .map_or_else(Default::default, |b| b.load()),
            blocklist_store: parts.blocklist,
        };
        Self { io: parts.io, core }
    }

    pub fn backend_name(&self) -> &'static str {
        self.io.name()
    }

    /// Run until stopped (shutdown message or the service's `stop`) and every
    /// connection drained or the drain deadline passed. Returns the service
    /// and the worker's final counters.
    pub fn run(mut self) -> io::Result<(S, Counters)> {
        loop {
            let now = Instant::now();
            let again = self.step(now)?;
            if self.core.finished(now) {
                return Ok((self.core.service, self.core.counters));
            }
            if !again {
                self.sleep()?;
            }
        }
    }

    /// One loop iteration at `now`: control messages, received datagrams,
    /// timers, the service, every connection that changed, the sends.
    /// Returns true when there is more to do at once (call again before
    /// waiting); otherwise the next call is due at [`Worker::poll_timeout`],
    /// a datagram or a wake. Tests drive a worker through this on a
    /// simulated clock; [`Worker::run`] drives it on the real one.
    pub fn step(&mut self, now: Instant) -> io::Result<bool> {
        if let Some(store) = &self.core.blocklist_store {
            self.core.blocklist = store.load();
        }
        let mut busy = self.core.drain_mailbox(now);
        busy |= self.core.deliver(now);
        busy |= self.receive(now)?;
        self.core.fire_timers(now);
        self.core.poll_service(now);
        self.drive(now);
        self.io.flush()?;
        self.io.publish(&mut self.core.counters);
        self.core
            .stats
            .worker(self.core.id.0 as usize)
            .publish(&self.core.counters);
        Ok(busy || (!self.core.dirty.is_empty() && self.core.pending.is_none()))
    }

    /// When [`Worker::step`] is next due if nothing arrives before: the
    /// earliest connection timer, service deadline or drain deadline.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        self.core.next_deadline()
    }

    /// The worker's counters as of the last step.
    pub fn counters(&self) -> &Counters {
        &self.core.counters
    }

    /// Connections the worker holds (handshaking, open or draining).
    pub fn connections(&self) -> usize {
        self.core.open
    }

    fn receive(&mut self, now: Instant) -> io::Result<bool> {
        let core = &mut self.core;
        let got = self.io.poll_recv(&mut |d| core.on_datagram(now, d))?;
        self.core.wake_handoff_targets();
        for response in std::mem::take(&mut self.core.responses) {
            send_or_drop(&mut *self.io, &response);
        }
        for incoming in std::mem::take(&mut self.core.incoming) {
            self.core.on_incoming(&mut *self.io, incoming, now);
        }
        Ok(got > 0)
    }

    fn drive(&mut self, now: Instant) {
        if let Some(pending) = self.core.pending.take() {
            match self.io.send(&pending.header.with(&pending.contents)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.core.pending = Some(pending);
                    return;
                }
                _ => {}
            }
        }
        let mut dirty = std::mem::take(&mut self.core.dirty);
        let mut next = 0;
        while next < dirty.len() {
            let ch = dirty[next];
            next += 1;
            if !self.core.drive_conn(&mut *self.io, ch, now) {
                // The socket is full: keep the rest (and this one) for later.
                dirty.drain(..next - 1);
                self.core.dirty.append(&mut dirty);
                return;
            }
        }
        // Keep the allocation for the next iteration.
        dirty.clear();
        if self.core.dirty.is_empty() {
            self.core.dirty = dirty;
        }
    }

    fn sleep(&mut self) -> io::Result<()> {
        // The edge: the only clock read besides the loop's own.
        let now = Instant::now();
        let deadline = self.core.next_deadline();
        let timeout = deadline.map(|d| d.saturating_duration_since(now));
        if timeout == Some(Duration::ZERO) {
            return Ok(());
        }
        let mailbox = self.core.own_mailbox();
        mailbox.waker.prepare_sleep();
        if !mailbox.is_empty() || self.core.service.has_deliveries() {
            mailbox.waker.woke();
            return Ok(());
        }
        let result = self
            .io
            .wait(&mailbox.waker, timeout, self.core.pending.is_some());
        mailbox.waker.woke();
        result
    }
}

fn send_or_drop(io: &mut dyn Backend, t: &PendingSend) {
    // Stateless responses (resets, version negotiation, refusals) are
    // best-effort: the peer retransmits if one is lost.
    let _ = io.send(&t.header.with(&t.contents));
}

impl PendingSend {
    fn from_transmit(t: &Transmit, contents: Vec<u8>) -> Self {
        Self {
            header: SendHeader::from(t),
            contents,
        }
    }
}

impl<S: Service> Core<S> {
    fn own_mailbox(&self) -> &Mailbox {
        match &self.routing {
            Routing::Shared { mailboxes } => &mailboxes[self.id.0 as usize],
            Routing::Alone { mailbox } => mailbox,
        }
    }

    fn drain_mailbox(&mut self, now: Instant) -> bool {
        let mut busy = false;
        while let Some(control) = self.own_mailbox().control.pop() {
            busy = true;
            match control {
                WorkerControl::Shutdown { drain } => self.stop(now, drain),
            }
        }
        let Routing::Shared { mailboxes } = &self.routing else {
            return busy;
        };
        let mailboxes = mailboxes.clone();
        while let Some(h) = mailboxes[self.id.0 as usize].handoffs.pop() {
            busy = true;
            self.counters.handoffs_in += 1;
            self.handle_owned(now, h.remote, h.local_ip, h.ecn, h.data);
        }
        busy
    }

    /// Hand the service's deliveries to their connections.
    fn deliver(&mut self, now: Instant) -> bool {
        let mut deliveries = std::mem::take(&mut self.deliveries);
        self.service.poll_deliveries(now, &mut deliveries);
        let busy = !deliveries.is_empty();
        for delivery in deliveries.drain(..) {
            let ch = delivery.handle;
            self.contained(ch, now, |core| {
                if let Some(c) = core.conns.get_mut(ch.0).and_then(Option::as_mut) {
                    core.service.on_delivery(
                        &mut c.app,
                        &mut c.conn,
                        delivery,
                        now,
                        &mut core.counters,
                    );
                }
            });
            self.mark_dirty(ch);
        }
        self.deliveries = deliveries;
        busy
    }

    fn stop(&mut self, now: Instant, drain: Duration) {
        if self.stopping_until.is_some() {
            return;
        }
        self.stopping_until = Some(now + drain);
        for (index, slot) in self.conns.iter_mut().enumerate() {
            if let Some(c) = slot {
                c.conn.close(
                    now,
                    VarInt::from_u32(CLOSE_SHUTDOWN),
                    Bytes::from_static(b"server shutting down"),
                );
                if !c.queued {
                    c.queued = true;
                    self.dirty.push(ConnectionHandle(index));
                }
            }
        }
    }

    fn finished(&self, now: Instant) -> bool {
        match self.stopping_until {
            Some(deadline) => (self.open == 0 || now >= deadline) && self.dirty.is_empty(),
            None => false,
        }
    }

    fn next_deadline(&mut self) -> Option<Instant> {
        // Drop timer entries that no longer match their connection.
        while let Some(Reverse((at, index))) = self.timers.peek().copied() {
            match self.conns.get(index).and_then(Option::as_ref) {
                Some(c) if c.timer == Some(at) => break,
                _ => {
                    self.timers.pop();
                }
            }
        }
        let timer = self.timers.peek().map(|Reverse((at, _))| *at);
        [timer, self.service.poll_timeout(), self.stopping_until]
            .into_iter()
            .flatten()
            .min()
    }

    fn on_datagram(&mut self, now: Instant, d: RecvDatagram<'_>) {
        for segment in d.segments() {
            self.counters.datagrams_rx += 1;
            self.counters.bytes_rx += segment.len() as u64;
            if !is_ipv6_peer(&d.remote) {
                self.counters.drop_ipv4 += 1;
                continue;
            }
            if self.blocklist.blocks(&d.remote) {
                self.counters.drop_blocked += 1;
                continue;
            }
            let owner = match &self.routing {
                Routing::Alone { .. } => Ok(self.id),
                Routing::Shared { mailboxes } => owner_of(segment, mailboxes.len() as u16),
            };
            match owner {
                Err(RouteError::Truncated) => self.counters.drop_truncated += 1,
                Err(RouteError::NotQuic) => self.counters.drop_not_quic += 1,
                Ok(owner) => {
                    let data = self.copy_segment(segment);
                    if owner == self.id {
                        self.handle_owned(now, d.remote, d.local_ip, d.ecn, data);
                    } else {
                        self.hand_off(
                            owner,
                            Handoff {
                                data,
                                remote: d.remote,
                                local_ip: d.local_ip,
                                ecn: d.ecn,
                            },
                        );
                    }
                }
            }
        }
    }

    /// Each datagram gets an allocation of its own: quinn-proto keeps
    /// slices of it for out-of-order stream data, and a slice of a shared
    /// receive block would keep the whole block alive (a peer sending one
    /// retained byte per block could pin megabytes). One small allocation
    /// per datagram is the price.
    fn copy_segment(&mut self, segment: &[u8]) -> BytesMut {
        BytesMut::from(segment)
    }

    fn hand_off(&mut self, owner: WorkerId, handoff: Handoff) {
        let Routing::Shared { mailboxes } = &self.routing else {
            unreachable!("only shared workers route")
        };
        match mailboxes[owner.0 as usize].handoffs.push(handoff) {
            Ok(()) => {
                self.counters.handoffs_out += 1;
                self.wake_targets[owner.0 as usize] = true;
            }
            Err(_) => self.counters.drop_handoff_full += 1,
        }
    }

    fn wake_handoff_targets(&mut self) {
        let Routing::Shared { mailboxes } = &self.routing else {
            return;
        };
        for (index, wake) in self.wake_targets.iter_mut().enumerate() {
            if std::mem::take(wake) {
                mailboxes[index].waker.wake();
            }
        }
    }

    fn handle_owned(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        local_ip: Option<IpAddr>,
        ecn: Option<EcnCodepoint>,
        data: BytesMut,
    ) {
        self.resp_buf.clear();
        match self
            .endpoint
            .handle(now, remote, local_ip, ecn, data, &mut self.resp_buf)
        {
            Some(DatagramEvent::ConnectionEvent(ch, event)) => {
                self.contained(ch, now, |core| {
                    if let Some(c) = core.conns.get_mut(ch.0).and_then(Option::as_mut) {
                        c.conn.handle_event(event);
                    }
                });
                self.mark_dirty(ch);
            }
            Some(DatagramEvent::NewConnection(incoming)) => self.incoming.push(incoming),
            Some(DatagramEvent::Response(t)) => {
                let contents = self.resp_buf[..t.size].to_vec();
                self.responses
                    .push(PendingSend::from_transmit(&t, contents));
            }
            None => self.counters.drop_unknown_cid += 1,
        }
    }

    fn on_incoming(&mut self, io: &mut dyn Backend, incoming: Incoming, now: Instant) {
        let admission = if self.stopping_until.is_some() {
            Admission::Refuse
        } else {
            self.service.admit(&incoming, now, self.open)
        };
        self.resp_buf.clear();
        let response = match admission {
            Admission::Accept => match self
                .endpoint
                .accept(incoming, now, &mut self.resp_buf, None)
            {
                Ok((ch, conn)) => {
                    self.counters.accepted += 1;
                    self.insert(ch, conn, now);
                    None
                }
                Err(e) => {
                    if is_alpn_refusal(&e.cause) {
                        self.counters.refused_alpn += 1;
                    } else {
                        self.counters.failed_handshakes += 1;
                    }
                    e.response
                }
            },
            Admission::Retry => match self.endpoint.retry(incoming, &mut self.resp_buf) {
                Ok(t) => {
                    self.counters.retries += 1;
                    Some(t)
                }
                Err(e) => {
                    // Already retried once: refuse rather than loop.
                    self.counters.refused += 1;
                    Some(self.endpoint.refuse(e.into_incoming(), &mut self.resp_buf))
                }
            },
            Admission::Refuse => {
                self.counters.refused += 1;
                Some(self.endpoint.refuse(incoming, &mut self.resp_buf))
            }
        };
        if let Some(t) = response {
            let contents = self.resp_buf[..t.size].to_vec();
            send_or_drop(io, &PendingSend::from_transmit(&t, contents));
        }
    }

    fn insert(&mut self, ch: ConnectionHandle, mut conn: Connection, now: Instant) {
        let app = self.service.on_open(&mut conn, ch, now);
        if self.conns.len() <= ch.0 {
            self.conns.resize_with(ch.0 + 1, || None);
        }
        debug_assert!(
            self.conns[ch.0].is_none(),
            "quinn-proto reuses a handle only after Drained"
        );
        self.conns[ch.0] = Some(Conn {
            conn,
            app,
            timer: None,
            queued: false,
            connected: false,
        });
        self.open += 1;
        self.counters.connections = self.open as u64;
        self.mark_dirty(ch);
    }

    fn mark_dirty(&mut self, ch: ConnectionHandle) {
        if let Some(c) = self.conns.get_mut(ch.0).and_then(Option::as_mut)
            && !c.queued
        {
            c.queued = true;
            self.dirty.push(ch);
        }
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(Reverse((at, index))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let ch = ConnectionHandle(index);
            let fired = self.contained(ch, now, |core| {
                match core.conns.get_mut(index).and_then(Option::as_mut) {
                    Some(c) if c.timer == Some(at) => {
                        c.timer = None;
                        c.conn.handle_timeout(now);
                        true
                    }
                    _ => false,
                }
            });
            if fired != Some(false) {
                self.mark_dirty(ch);
            }
        }
    }

    fn poll_service(&mut self, now: Instant) {
        let mut actions = Actions::default();
        self.service.poll(now, &mut actions);
        for request in actions.connect {
            match self
                .endpoint
                .connect(now, request.config, request.remote, &request.server_name)
            {
                Ok((ch, conn)) => self.insert(ch, conn, now),
                Err(e) => {
                    tracing::warn!(remote = %request.remote, error = %e, "cannot start connection");
                    self.counters.failed_handshakes += 1;
                }
            }
        }
        if actions.visit_all {
            for index in 0..self.conns.len() {
                if self.conns[index].is_some() {
                    let ch = ConnectionHandle(index);
                    self.contained(ch, now, |core| {
                        if let Some(c) = core.conns[index].as_mut() {
                            core.service.on_visit(&mut c.app, &mut c.conn, now);
                        }
                    });
                    self.mark_dirty(ch);
                }
            }
        }
        if let Some(drain) = actions.stop {
            self.stop(now, drain);
        }
    }

    /// Process one connection's events and send what it has. Returns false
    /// when the socket would not take more.
    fn drive_conn(&mut self, io: &mut dyn Backend, ch: ConnectionHandle, now: Instant) -> bool {
        self.contained(ch, now, |core| core.drive_conn_unguarded(io, ch, now))
            .unwrap_or(true)
    }

    /// Run `f`, which touches connection `ch` only. A panic inside it (a
    /// server bug; no peer input is meant to reach one) is contained to that
    /// connection: it is counted, logged with its backtrace by the panic hook
    /// ([`install_panic_hook`]), and the connection is closed with
    /// [`CLOSE_INTERNAL_ERROR`]; every other connection keeps being served.
    fn contained<R>(
        &mut self,
        ch: ConnectionHandle,
        now: Instant,
        f: impl FnOnce(&mut Self) -> R,
    ) -> Option<R> {
        match catch_unwind(AssertUnwindSafe(|| f(self))) {
            Ok(result) => Some(result),
            Err(_) => {
                self.counters.connection_panics += 1;
                let c = self.conns.get_mut(ch.0).and_then(Option::as_mut)?;
                c.queued = false;
                let closed = catch_unwind(AssertUnwindSafe(|| {
                    c.conn.close(
                        now,
                        VarInt::from_u32(CLOSE_INTERNAL_ERROR),
                        Bytes::from_static(b"internal error"),
                    )
                }));
                tracing::error!(
                    worker = self.id.0,
                    connection = ch.0,
                    "a panic in one connection's handling was contained; closing that connection"
                );
                if closed.is_err() {
                    // Its state cannot even close: forget it (its peer
                    // times out; its CIDs stay routed to an empty slot).
                    self.conns[ch.0] = None;
                    self.open -= 1;
                    self.counters.connections = self.open as u64;
                    self.counters.closed += 1;
                } else {
                    self.mark_dirty(ch);
                }
                None
            }
        }
    }

    fn drive_conn_unguarded(
        &mut self,
        io: &mut dyn Backend,
        ch: ConnectionHandle,
        now: Instant,
    ) -> bool {
        let Some(c) = self.conns.get_mut(ch.0).and_then(Option::as_mut) else {
            return true;
        };
        c.queued = false;
        pump_endpoint_events(&mut self.endpoint, ch, &mut c.conn);
        while let Some(event) = c.conn.poll() {
            count_event(&mut self.counters, &event, &mut c.connected);
            self.service
                .on_event(&mut c.app, &mut c.conn, event, now, &mut self.counters);
        }
        self.service.on_driven(&mut c.app, &mut c.conn, now);
        let mut writable = true;
        loop {
            self.send_buf.clear();
            let Some(t) = c.conn.poll_transmit(now, self.max_gso, &mut self.send_buf) else {
                break;
            };
            let segments = t.segment_size.map_or(1, |s| t.size.div_ceil(s));
            self.counters.datagrams_tx += segments as u64;
            self.counters.bytes_tx += t.size as u64;
            self.send_buf.truncate(t.size);
            match io.send_owned(&SendHeader::from(&t), &mut self.send_buf) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.counters.send_blocked += 1;
                    let mut contents = std::mem::replace(
                        &mut self.send_buf,
                        Vec::with_capacity(self.max_gso * 1500),
                    );
                    contents.truncate(t.size);
                    self.pending = Some(PendingSend::from_transmit(&t, contents));
                    c.queued = true;
                    writable = false;
                    break;
                }
                Err(e) => tracing::debug!(error = %e, "send failed; treated as loss"),
            }
        }
        pump_endpoint_events(&mut self.endpoint, ch, &mut c.conn);
        let timer = c.conn.poll_timeout();
        if timer != c.timer {
            c.timer = timer;
            if let Some(at) = timer {
                self.timers.push(Reverse((at, ch.0)));
            }
        }
        if c.conn.is_drained() {
            let c = self.conns[ch.0].take().expect("present above");
            self.open -= 1;
            self.counters.connections = self.open as u64;
            self.counters.closed += 1;
            self.service.on_close(c.app, &c.conn, &mut self.counters);
        }
        writable
    }
}

fn pump_endpoint_events(endpoint: &mut Endpoint, ch: ConnectionHandle, conn: &mut Connection) {
    while let Some(event) = conn.poll_endpoint_events() {
        if let Some(reply) = endpoint.handle_event(ch, event) {
            conn.handle_event(reply);
        }
    }
}

fn count_event(counters: &mut Counters, event: &Event, connected: &mut bool) {
    match event {
        Event::Connected => {
            *connected = true;
            counters.handshakes += 1;
        }
        Event::ConnectionLost { reason } if is_alpn_refusal(reason) => counters.refused_alpn += 1,
        // Lost before it was established through our own error or a
        // timeout: the handshake failed (a refused client certificate, a
        // bad signature). A peer that closes first is not a failure.
        Event::ConnectionLost {
            reason: ConnectionError::TransportError(_) | ConnectionError::TimedOut,
        } if !*connected => counters.failed_handshakes += 1,
        _ => {}
    }
}

/// RFC 9001 §4.8: TLS alert 120 (no_application_protocol) is carried as
/// CRYPTO_ERROR 0x0178.
fn is_alpn_refusal(reason: &ConnectionError) -> bool {
    matches!(reason, ConnectionError::TransportError(e) if u64::from(e.code) == 0x178)
}

fn is_ipv6_peer(addr: &SocketAddr) -> bool {
    match addr {
        SocketAddr::V4(_) => false,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_none(),
    }
}

/// Log every panic once, with its backtrace, through `tracing` (the default
/// hook prints a backtrace only when RUST_BACKTRACE is set). Workers contain
/// panics per connection ([`Core::contained`]); one that escapes a worker
/// ends the process (see `server::run_worker`).
pub fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let thread = std::thread::current();
            let message = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(
                thread = thread.name().unwrap_or("?"),
                location = %info.location().map_or_else(String::new, ToString::to_string),
                message,
                backtrace = %std::backtrace::Backtrace::force_capture(),
                "panic"
            );
        }));
    });
}
