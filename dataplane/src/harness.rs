//! An adversarial, sans-IO test harness: a real server worker
//! ([`crate::server::single_worker`], every ALPN's stream handlers) and a
//! hostile client (a bare `quinn_proto::Endpoint`) joined by an in-memory
//! link ([`crate::io::memory`]) on a simulated clock. Public behind the
//! `harness` feature for the fuzz target; the property test and the
//! regression cases are in `harness/tests.rs`.
//!
//! An input is a [`Sequence`] of [`Op`]s: open connections and streams,
//! write data, finish, reset, stop, close, let time pass, and lose,
//! duplicate, reorder or hold datagrams on the link (which is how data
//! reaches the server at any offset and in any order through quinn's own
//! API). [`run`] applies them, then checks what a user would notice:
//!
//! - no panic escaped the worker, and none was contained either
//!   (`connection_panics` stays 0: a contained panic is still a bug);
//! - the worker never stays busy without input (a bounded number of steps
//!   settles it);
//! - a fresh honest client still completes a request on every ALPN within
//!   a bounded number of datagrams and simulated seconds;
//! - once every client connection is closed and the idle timeout passed,
//!   the worker holds no connection.
//!
//! The clock is simulated: the worker and the client only see the `now`
//! the harness passes them, so a sixty-second jump costs nothing.

mod client;
mod fixtures;
mod messages;
pub mod op;
#[cfg(test)]
mod tests;

pub use op::{Op, Sequence, Settings};

use crate::admission::{AdmissionGate, KIND_ADMISSION_SUBMIT};
use crate::control::{ControlPort, Reply};
use crate::io::memory::{Datagram, MemoryBackend, MemoryQueues};
use crate::protocols::doq::ZoneStore;
use crate::protocols::{Alpn, stoq};
use crate::server::{ServerService, ServerSettings, single_worker};
use crate::stats::Counters;
use crate::steering::SteeringMode;
use crate::transport::{Resumption, ServerIdentity, TransportSettings};
use crate::trust::{CertificateStore, SnapshotClientVerifier, TrustSnapshot, TrustStore};
use crate::worker::Worker;
use bytes::Bytes;
use client::Client;
use fixtures::{HarnessGate, Pki, client_config, zone};
use messages::{check_honest_response, honest_request, request_bytes};
use quinn_proto::{ClientConfig, Dir, VarInt};
use std::collections::VecDeque;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// The name in the server's certificate.
pub const SERVER_NAME: &str = "server.internet2.test";
/// The name the zone answers AAAA for, and its address.
pub const DNS_NAME: &str = "node1.internet2.test.";
pub const DNS_ADDRESS: Ipv6Addr = Ipv6Addr::new(0xfd71, 0x7e57, 0, 0, 0, 0, 0, 1);
/// The admission bundle the harness's gate accepts (any other is refused).
pub const GOOD_BUNDLE: &[u8] = b"harness bundle";

/// Connections the input may hold open at once (a Connect past it does
/// nothing): well under the server's limit, so the honest checks get in.
const HOSTILE_CONNECTIONS_MAX: usize = 8;
const SERVER_CONNECTIONS_MAX: usize = 64;
/// New handshakes per second served without Retry: low, so bursts of
/// Connects meet Retry too.
const HANDSHAKES_PER_S: u32 = 6;
/// Datagrams in flight each way; past it the oldest is lost (a bounded
/// link, as a real one).
const LINK_QUEUE_MAX: usize = 2048;
/// Consecutive worker steps that may each report more work without any
/// new input; past it the worker is spinning.
const SERVER_STEPS_MAX: usize = 64;
/// What a handshake driven by Connect may take.
const HANDSHAKE_HORIZON: Duration = Duration::from_secs(2);
const HANDSHAKE_DATAGRAMS_MAX: usize = 256;
/// What `Deliver { n: 0 }` may move before it stops.
const SETTLE_DATAGRAMS_MAX: usize = 4096;
/// What the honest client's three requests may take, together.
const HONEST_HORIZON: Duration = Duration::from_secs(10);
const HONEST_DATAGRAMS_MAX: usize = 20_000;
/// Loop iterations `run_until` may take (each moves data or time).
const RUN_ITERATIONS_MAX: usize = 100_000;
/// How long the drain check lets the clock run. The idle timeout is at
/// least three PTOs (RFC 9000 §10.1), and so is the draining period; an
/// input that holds datagrams while time jumps inflates the RTT estimate
/// and with it the PTO. What the check asserts is that every connection
/// ends without further input, so the horizon is wide (the clock jumps
/// from timer to timer, so it costs nothing).
const DRAIN_HORIZON: Duration = Duration::from_secs(24 * 3600);

/// An invariant the run broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("{0} connection panics were contained: a panic is reachable from peer input")]
    ContainedPanic(u64),
    #[error("the worker kept reporting work after {SERVER_STEPS_MAX} steps with no new input")]
    Spinning,
    #[error("the honest {alpn:?} request did not complete: {detail}")]
    Honest { alpn: Alpn, detail: String },
    #[error("{0} connections remain after every client closed and the idle timeout passed")]
    Leaked(usize),
}

/// Run one input: decode, apply every op, check the invariants. Returns
/// the worker's counters (for assertions on what the input did).
pub fn run(data: &[u8]) -> Result<Counters, Violation> {
    run_sequence(&Sequence::decode(data))
}

/// [`run`] for a decoded sequence.
pub fn run_sequence(sequence: &Sequence) -> Result<Counters, Violation> {
    let mut harness = Harness::new(sequence.settings);
    for op in &sequence.ops {
        harness.apply(*op)?;
    }
    harness.check()?;
    Ok(*harness.counters())
}

/// The server worker, the client, the link between them and the clock.
pub struct Harness {
    now: Instant,
    settings: Settings,
    server: Worker<ServerService>,
    server_io: Arc<MemoryQueues>,
    server_addr: SocketAddr,
    control: Arc<ControlPort>,
    client: Client,
    to_server: VecDeque<Datagram>,
    to_client: VecDeque<Datagram>,
    /// One client config per (ALPN, with certificate): later connections
    /// made with one resume its session (and may send 0-RTT data).
    configs: [[Option<ClientConfig>; 2]; 3],
    spinning: bool,
}

impl Harness {
    pub fn new(settings: Settings) -> Self {
        let pki = Pki::get();
        let now = Instant::now();
        let server_addr = SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1),
            4433,
            0,
            0,
        ));
        let client_addr = SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2),
            40000,
            0,
            0,
        ));
        let trust = TrustStore::new(
            TrustSnapshot::new(1, std::slice::from_ref(&pki.ca), Vec::new())
                .expect("the harness CA is a usable root"),
        );
        let identity = ServerIdentity {
            certificates: CertificateStore::new(vec![pki.server.clone()], &pki.server_key())
                .expect("the harness server key loads"),
            client_verifier: Some(SnapshotClientVerifier::new(trust.clone())),
            // The production store: single-use tickets, so 0-RTT data is
            // accepted once per ticket.
            resumption: Resumption::SingleUseWithZeroRtt(crate::session_store::SessionStore::new(
                256,
            )),
        };
        let control = ControlPort::new(1);
        let server_settings = ServerSettings {
            listen: match server_addr {
                SocketAddr::V6(a) => a,
                SocketAddr::V4(_) => unreachable!("the harness is IPv6"),
            },
            workers: 1,
            worker_cores: None,
            backend: crate::BackendKind::Socket,
            zone: Some(ZoneStore::new(zone())),
            io_batch: Default::default(),
            steering: SteeringMode::Off,
            socket_buffer_bytes: 0,
            handoff_queue_len: 64,
            connections_per_worker_max: SERVER_CONNECTIONS_MAX,
            handshake_rate_retry_per_s: HANDSHAKES_PER_S,
            transport: TransportSettings::default(),
            aes_first: true,
            xdp: None,
            front_door: None,
            control: Some(control.clone()),
            trust: Some(trust),
            perf_without_certificate: false,
            dns_without_certificate: true,
            blocklist: None,
            admission: settings
                .admission
                .then(|| Arc::new(HarnessGate) as Arc<dyn AdmissionGate>),
            assets: None,
        };
        let server_io = MemoryQueues::new(server_addr);
        let (server, _stats) = single_worker(
            &server_settings,
            &identity,
            Box::new(MemoryBackend::new(server_io.clone())),
            (now, SystemTime::now()),
        )
        .expect("the harness server builds");
        Self {
            now,
            settings,
            server,
            server_io,
            server_addr,
            control,
            client: Client::new(client_addr),
            to_server: VecDeque::new(),
            to_client: VecDeque::new(),
            configs: Default::default(),
            spinning: false,
        }
    }

    /// The worker's counters as of its last step.
    pub fn counters(&self) -> &Counters {
        self.server.counters()
    }

    /// Connections the worker holds.
    pub fn server_connections(&self) -> usize {
        self.server.connections()
    }

    /// Apply one op, then let both sides act on it (no datagram crosses
    /// the link unless the op says so).
    pub fn apply(&mut self, op: Op) -> Result<(), Violation> {
        match op {
            Op::Connect {
                alpn,
                with_cert,
                zero_rtt,
            } => self.connect(alpn, with_cert, zero_rtt),
            Op::OpenStream { conn } => {
                if let Some(c) = self.client.hostile(conn)
                    && let Some(id) = c.conn.streams().open(Dir::Bi)
                {
                    c.streams.push(id);
                }
            }
            Op::Write {
                conn,
                stream,
                len,
                byte,
            } => self.write(conn, stream, &vec![byte; usize::from(len)]),
            Op::Request {
                conn,
                stream,
                variant,
            } => {
                if let Some(alpn) = self.client.hostile(conn).map(|c| c.alpn) {
                    self.write(conn, stream, &request_bytes(alpn, variant & 0x7f));
                    if variant & 0x80 != 0 {
                        self.finish(conn, stream);
                    }
                }
            }
            Op::Finish { conn, stream } => self.finish(conn, stream),
            Op::Reset { conn, stream, code } => {
                if let Some(c) = self.client.hostile(conn)
                    && let Some(id) = c.stream(stream)
                {
                    let _ = c.conn.send_stream(id).reset(VarInt::from(code));
                }
            }
            Op::StopSending { conn, stream, code } => {
                if let Some(c) = self.client.hostile(conn)
                    && let Some(id) = c.stream(stream)
                {
                    let _ = c.conn.recv_stream(id).stop(VarInt::from(code));
                }
            }
            Op::CloseConnection { conn, code } => {
                let now = self.now;
                if let Some(c) = self.client.hostile(conn) {
                    c.conn
                        .close(now, VarInt::from(code), Bytes::from_static(b"harness"));
                }
            }
            Op::ToggleReading { conn } => {
                if let Some(c) = self.client.hostile(conn) {
                    c.reading = !c.reading;
                }
            }
            Op::AdvanceTime { ms } => {
                self.now += Duration::from_millis(u64::from(ms));
                self.step_server();
            }
            Op::DropNext { to_server } => {
                self.queue(to_server).pop_front();
            }
            Op::Duplicate { to_server } => {
                let queue = self.queue(to_server);
                if let Some(front) = queue.front().cloned() {
                    queue.push_front(front);
                }
            }
            Op::Reorder { to_server, depth } => {
                let queue = self.queue(to_server);
                if let Some(front) = queue.pop_front() {
                    let at = match usize::from(depth) {
                        0 => queue.len(),
                        depth => depth.min(queue.len()),
                    };
                    queue.insert(at, front);
                }
            }
            Op::Deliver { n: 0 } => {
                self.settle(SETTLE_DATAGRAMS_MAX);
            }
            Op::Deliver { n } => {
                self.deliver(usize::from(n));
            }
            Op::Authority => self.answer_authority(),
            Op::KeyUpdate { conn } => {
                if let Some(c) = self.client.hostile(conn) {
                    c.conn.force_key_update();
                }
            }
        }
        self.drive_client();
        self.step_server();
        self.violation()
    }

    /// The checks after a sequence: no contained panic, an honest client
    /// is served on every ALPN, and everything drains.
    pub fn check(&mut self) -> Result<(), Violation> {
        self.violation()?;
        self.check_honest()?;
        self.violation()?;
        self.check_drains()?;
        self.violation()
    }

    fn violation(&self) -> Result<(), Violation> {
        if self.spinning {
            return Err(Violation::Spinning);
        }
        match self.counters().connection_panics {
            0 => Ok(()),
            n => Err(Violation::ContainedPanic(n)),
        }
    }

    fn connect(&mut self, alpn: Alpn, with_cert: bool, zero_rtt: bool) {
        if self.client.conns.iter().filter(|c| !c.honest).count() >= HOSTILE_CONNECTIONS_MAX {
            return;
        }
        let config = self.configs[alpn_index(alpn)][usize::from(with_cert)]
            .get_or_insert_with(|| client_config(alpn, with_cert))
            .clone();
        let Some(index) =
            self.client
                .connect(self.now, config, self.server_addr, SERVER_NAME, alpn)
        else {
            return;
        };
        if zero_rtt {
            return;
        }
        let handle = self.client.conns[index].handle;
        self.run_until(HANDSHAKE_HORIZON, HANDSHAKE_DATAGRAMS_MAX, |h| {
            h.client
                .conns
                .iter()
                .find(|c| c.handle == handle)
                .is_none_or(|c| c.connected || c.lost)
        });
    }

    fn write(&mut self, conn: u8, stream: u8, data: &[u8]) {
        if let Some(c) = self.client.hostile(conn)
            && let Some(id) = c.stream(stream)
        {
            let _ = c.conn.send_stream(id).write(data);
        }
    }

    fn finish(&mut self, conn: u8, stream: u8) {
        if let Some(c) = self.client.hostile(conn)
            && let Some(id) = c.stream(stream)
        {
            let _ = c.conn.send_stream(id).finish();
        }
    }

    fn queue(&mut self, to_server: bool) -> &mut VecDeque<Datagram> {
        if to_server {
            &mut self.to_server
        } else {
            &mut self.to_client
        }
    }

    /// Step the worker until it has nothing more to do at `now`, then put
    /// what it sent on the link.
    fn step_server(&mut self) {
        let mut settled = false;
        for _ in 0..SERVER_STEPS_MAX {
            if !self
                .server
                .step(self.now)
                .expect("the memory backend does not fail")
            {
                settled = true;
                break;
            }
        }
        self.spinning |= !settled;
        let sent = self.server_io.take_outbound();
        push_bounded(&mut self.to_client, sent);
    }

    fn drive_client(&mut self) {
        let mut out = Vec::new();
        self.client.drive(self.now, &mut out);
        push_bounded(&mut self.to_server, out);
    }

    /// Move up to `n` datagrams each way and let both sides act on them.
    /// Returns how many moved.
    fn deliver(&mut self, n: usize) -> usize {
        let to_server = self.to_server.len().min(n);
        for d in self.to_server.drain(..to_server) {
            self.server_io.push_inbound(d);
        }
        if to_server > 0 {
            self.step_server();
        }
        let to_client = self.to_client.len().min(n);
        let mut answers = Vec::new();
        for d in self.to_client.drain(..to_client) {
            self.client.handle(self.now, d, &mut answers);
        }
        push_bounded(&mut self.to_server, answers);
        self.drive_client();
        to_server + to_client
    }

    /// Deliver until the link is empty (at most `max` datagrams), without
    /// letting time pass.
    fn settle(&mut self, max: usize) -> usize {
        let mut moved = 0;
        while moved < max && !(self.to_server.is_empty() && self.to_client.is_empty()) {
            moved += self.deliver(max - moved);
        }
        moved
    }

    /// Exchange datagrams losslessly, jumping the clock to the next timer
    /// whenever the link is empty, until `done`, `horizon` of simulated
    /// time or `datagrams_max` moved. Returns whether `done` held.
    fn run_until(
        &mut self,
        horizon: Duration,
        datagrams_max: usize,
        mut done: impl FnMut(&mut Self) -> bool,
    ) -> bool {
        let deadline = self.now + horizon;
        let mut moved = 0;
        self.drive_client();
        self.step_server();
        for _ in 0..RUN_ITERATIONS_MAX {
            moved += self.settle(datagrams_max.saturating_sub(moved));
            if done(self) {
                return true;
            }
            if moved >= datagrams_max {
                return false;
            }
            let next = [self.server.poll_timeout(), self.client.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            match next {
                Some(at) if at <= deadline => {
                    // A timer due now that fired without moving its
                    // deadline must not stall the loop.
                    self.now = at.max(self.now + Duration::from_micros(100));
                    self.step_server();
                    self.drive_client();
                }
                _ => return false,
            }
        }
        false
    }

    /// The fake control plane: answer every forwarded request (an echo of
    /// its payload, or an error for odd kinds).
    fn answer_authority(&mut self) {
        while let Some(request) = self.control.next_request() {
            let result = if request.kind % 2 == 0 {
                Ok(request.payload.to_vec())
            } else {
                Err((0x10, "the harness authority refuses odd kinds".to_owned()))
            };
            let reply = Reply {
                ticket: request.ticket,
                kind: request.kind,
                result,
            };
            // The reply queue holds more than one worker can forward.
            let _ = self.control.reply(request.worker, reply);
        }
    }

    /// A fresh client with a certificate makes one request on every ALPN
    /// while the input's connections stay open (no longer read, so what
    /// the server sends them is bounded by their windows).
    fn check_honest(&mut self) -> Result<(), Violation> {
        self.answer_authority();
        for c in &mut self.client.conns {
            c.reading = false;
        }
        let mut honest = Vec::new();
        for alpn in [Alpn::Stoq, Alpn::Doq, Alpn::Perf] {
            let Some(index) = self.client.connect(
                self.now,
                client_config(alpn, true),
                self.server_addr,
                SERVER_NAME,
                alpn,
            ) else {
                return Err(Violation::Honest {
                    alpn,
                    detail: "the client refused to connect".into(),
                });
            };
            self.client.conns[index].honest = true;
            honest.push((alpn, self.client.conns[index].handle, Vec::new()));
        }
        self.drive_client();
        let handles: Vec<_> = honest.iter().map(|(_, h, _)| *h).collect();
        let connected = |h: &mut Self| {
            handles.iter().all(|handle| {
                h.client
                    .conns
                    .iter()
                    .find(|c| c.handle == *handle)
                    .is_none_or(|c| c.connected || c.lost)
            })
        };
        self.run_until(HONEST_HORIZON, HONEST_DATAGRAMS_MAX, connected);
        for (alpn, handle, streams) in &mut honest {
            let Some(c) = self.client.conns.iter_mut().find(|c| c.handle == *handle) else {
                continue;
            };
            if !c.connected {
                continue;
            }
            let mut requests = Vec::new();
            if *alpn == Alpn::Stoq && self.settings.admission {
                requests.push(stoq::encode(KIND_ADMISSION_SUBMIT, GOOD_BUNDLE).to_vec());
            }
            requests.push(honest_request(*alpn));
            for request in requests {
                let Some(id) = c.conn.streams().open(Dir::Bi) else {
                    break;
                };
                c.streams.push(id);
                let mut send = c.conn.send_stream(id);
                // Far below the stream and connection windows.
                let written = send.write(&request);
                debug_assert_eq!(written.ok(), Some(request.len()));
                let _ = send.finish();
                streams.push(id);
            }
        }
        self.drive_client();
        self.run_until(HONEST_HORIZON, HONEST_DATAGRAMS_MAX, |h| {
            handles.iter().all(|handle| {
                h.client
                    .conns
                    .iter()
                    .find(|c| c.handle == *handle)
                    .is_none_or(|c| {
                        c.lost
                            || c.streams
                                .iter()
                                .all(|id| c.received.get(id).is_some_and(|r| r.fin || r.reset))
                    })
            })
        });
        for (alpn, handle, streams) in honest {
            let fail = |detail: String| Violation::Honest { alpn, detail };
            let c = self
                .client
                .conns
                .iter()
                .find(|c| c.handle == handle)
                .ok_or_else(|| fail("the connection is gone".into()))?;
            if c.lost {
                return Err(fail(format!(
                    "the connection was lost: {}",
                    c.lost_reason.as_deref().unwrap_or("?")
                )));
            }
            for id in streams {
                let received = c
                    .received
                    .get(&id)
                    .ok_or_else(|| fail(format!("nothing came back on {id}")))?;
                if !received.fin {
                    return Err(fail(format!(
                        "stream {id}: {} bytes, reset: {}, no FIN within {HONEST_HORIZON:?}",
                        received.len, received.reset
                    )));
                }
                check_honest_response(alpn, &received.bytes, received.len).map_err(fail)?;
            }
        }
        Ok(())
    }

    /// Close every client connection, let the idle timeout pass (see
    /// [`DRAIN_HORIZON`]), and expect the worker to hold nothing.
    fn check_drains(&mut self) -> Result<(), Violation> {
        let now = self.now;
        for c in &mut self.client.conns {
            c.reading = true;
            c.conn
                .close(now, VarInt::from_u32(0), Bytes::from_static(b"done"));
        }
        self.drive_client();
        self.run_until(DRAIN_HORIZON, usize::MAX, |h| h.server.connections() == 0);
        match self.server.connections() {
            0 => Ok(()),
            n => Err(Violation::Leaked(n)),
        }
    }
}

fn push_bounded(queue: &mut VecDeque<Datagram>, datagrams: Vec<Datagram>) {
    queue.extend(datagrams);
    let excess = queue.len().saturating_sub(LINK_QUEUE_MAX);
    queue.drain(..excess);
}

fn alpn_index(alpn: Alpn) -> usize {
    match alpn {
        Alpn::Stoq => 0,
        Alpn::Doq => 1,
        Alpn::Perf => 2,
    }
}
