//! The `perf` load generator that `internet2 bench` and `bench-40g` run.
//!
//! It runs on the same workers as the server (its own sockets, one endpoint
//! per worker), so the client is not the bottleneck of a measurement.

use crate::client::rpc::{CLOSE_DONE, describe};
use crate::protocols::perf::{REQUEST_HEADER_LEN, matches_pattern, write_pattern};
use crate::stats::Counters;
use crate::worker::{Actions, ConnectRequest, Service};
use bytes::Bytes;
use hdrhistogram::Histogram;
use quinn_proto::{ClientConfig, Connection, Dir, Event, ReadError, StreamEvent, StreamId, VarInt};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What one bench worker does.
#[derive(Clone, Debug)]
pub struct BenchPlan {
    pub remote: SocketAddr,
    pub server_name: String,
    /// Connections this worker opens and holds.
    pub connections: usize,
    /// How many of them run perf streams (the rest stay idle but open).
    pub active: usize,
    /// Concurrent streams per active connection.
    pub streams: usize,
    /// Bytes requested per stream request.
    pub download_bytes: u64,
    /// Bytes uploaded per stream request.
    pub upload_bytes: u64,
    /// Stop each stream slot after this many requests (else run until the deadline).
    pub requests_per_stream: Option<u64>,
    pub duration: Duration,
    /// Open, complete and close connections in a loop instead of moving data.
    pub handshake_only: bool,
    /// Check every received byte against the perf pattern.
    pub verify: bool,
    /// Handshakes in flight at once per worker.
    pub handshake_concurrency: usize,
    /// Resume TLS sessions from earlier connections (and offer 0-RTT);
    /// otherwise every connection is a full handshake.
    pub resume: bool,
}

/// Live totals the process prints once a second (single writer per worker).
#[derive(Debug, Default)]
pub struct BenchProgress {
    pub bytes: AtomicU64,
    pub handshakes: AtomicU64,
    pub connections: AtomicU64,
    pub errors: AtomicU64,
}

/// One worker's result.
#[derive(Debug)]
pub struct BenchReport {
    pub bytes: u64,
    pub uploaded: u64,
    pub handshakes: u64,
    /// Handshakes that resumed a session: the server accepted 0-RTT, which
    /// it can only do on a resumed session.
    pub resumed: u64,
    pub errors: u64,
    pub verify_failures: u64,
    pub requests: u64,
    pub connections_peak: u64,
    /// The most requests one connection had in flight at once (what the
    /// server's stream limit allowed of the plan's streams).
    pub streams_peak: u64,
    pub handshake_us: Histogram<u64>,
    /// The measured phase (after every connection was set up).
    pub elapsed: Duration,
    /// Time to set up the connections (with `handshake_only`, the run).
    pub handshake_elapsed: Duration,
    pub first_error: Option<String>,
    /// The client worker's own dataplane counters (drops, datagrams).
    pub client_counters: Counters,
    /// When each handshake completed (at most [`SETUP_TIMES_MAX`]): how the
    /// set-up rate changes as connections accumulate.
    pub connected_at: Vec<Instant>,
}

/// Default keep-alive interval of the load generators' held connections
/// (ours and the quinn baseline's): half the server's default idle timeout
/// (ours: 30 s), so 100 000 held connections send 6 700 keep-alives/s, not
/// 20 000. A longer interval needs a longer server idle timeout.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// A load generator's own idle timeout: longer than the run and than
/// several keep-alive intervals, so only the server's can end a held
/// connection.
pub fn client_idle_timeout(keep_alive: Duration, run: Duration) -> Duration {
    (keep_alive * 4).max(Duration::from_secs(60)) + run
}

/// Handshake completion times kept per client worker.
pub const SETUP_TIMES_MAX: usize = 1 << 20;

/// Handshakes per second over the first and over the last `window`
/// handshakes of `times` (sorted in place); `None` with fewer than two
/// windows' worth. A server whose per-handshake cost grows with its
/// connection count shows a last rate well below the first.
pub fn setup_rates(times: &mut [Instant], window: usize) -> Option<(f64, f64)> {
    if window < 2 || times.len() < 2 * window {
        return None;
    }
    times.sort_unstable();
    let rate = |span: &[Instant]| {
        let seconds = (span[span.len() - 1] - span[0]).as_secs_f64().max(1e-9);
        (span.len() - 1) as f64 / seconds
    };
    Some((rate(&times[..window]), rate(&times[times.len() - window..])))
}

struct StreamState {
    received: u64,
    upload_sent: u64,
    upload_fin: bool,
    response_done: bool,
    /// The server acknowledged the whole upload (our FIN included).
    upload_acked: bool,
}

pub struct BenchConn {
    started: Instant,
    active: bool,
    /// A handshake-only connection that is connected and waits for the
    /// server's HANDSHAKE_DONE before it closes.
    awaiting_confirmation: bool,
    streams: HashMap<StreamId, StreamState>,
    requests: u64,
}

pub struct BenchService {
    plan: BenchPlan,
    config: ClientConfig,
    progress: Arc<BenchProgress>,
    to_open: usize,
    in_handshake: usize,
    opened: usize,
    open: u64,
    started: Option<Instant>,
    /// When every connection was up and the measured phase began.
    measuring: Option<Instant>,
    deadline: Option<Instant>,
    stopped_at: Option<Instant>,
    report: BenchReport,
}

impl BenchService {
    pub fn new(mut plan: BenchPlan, config: ClientConfig, progress: Arc<BenchProgress>) -> Self {
        if plan.handshake_only {
            // The one request a resuming handshake-only connection makes
            // (see `on_event`): one byte down, nothing up.
            plan.download_bytes = 1;
            plan.upload_bytes = 0;
        }
        let report = BenchReport {
            bytes: 0,
            uploaded: 0,
            handshakes: 0,
            resumed: 0,
            errors: 0,
            verify_failures: 0,
            requests: 0,
            connections_peak: 0,
            streams_peak: 0,
            handshake_us: Histogram::new_with_bounds(1, 60_000_000, 3)
                .expect("valid histogram bounds"),
            elapsed: Duration::ZERO,
            handshake_elapsed: Duration::ZERO,
            first_error: None,
            client_counters: Counters::default(),
            connected_at: Vec::new(),
        };
        Self {
            to_open: plan.connections,
            plan,
            config,
            progress,
            in_handshake: 0,
            opened: 0,
            open: 0,
            started: None,
            measuring: None,
            deadline: None,
            stopped_at: None,
            report,
        }
    }

    pub fn report(mut self) -> BenchReport {
        if let (Some(start), Some(measuring), Some(end)) =
            (self.started, self.measuring, self.stopped_at)
        {
            self.report.elapsed = end - measuring;
            self.report.handshake_elapsed = if self.plan.handshake_only {
                end - start
            } else {
                measuring - start
            };
        }
        self.report
    }

    fn error(&mut self, message: String) {
        self.report.errors += 1;
        self.progress.errors.fetch_add(1, Ordering::Relaxed);
        if self.report.first_error.is_none() {
            self.report.first_error = Some(message);
        }
    }

    fn running(&self, now: Instant) -> bool {
        self.stopped_at.is_none() && self.deadline.is_none_or(|d| now < d)
    }

    fn start_request(&mut self, st: &mut BenchConn, conn: &mut Connection) {
        let Some(id) = conn.streams().open(Dir::Bi) else {
            return;
        };
        let header = Bytes::copy_from_slice(&self.plan.download_bytes.to_be_bytes());
        debug_assert_eq!(header.len(), REQUEST_HEADER_LEN);
        let _ = conn.send_stream(id).write_chunks(&mut [header]);
        st.streams.insert(
            id,
            StreamState {
                received: 0,
                upload_sent: 0,
                upload_fin: false,
                response_done: false,
                upload_acked: false,
            },
        );
        self.continue_upload(st, conn, id);
    }

    fn continue_upload(&mut self, st: &mut BenchConn, conn: &mut Connection, id: StreamId) {
        let Some(s) = st.streams.get_mut(&id) else {
            return;
        };
        if s.upload_fin {
            return;
        }
        let mut scratch = Counters::default();
        let before = s.upload_sent;
        write_pattern(
            conn,
            id,
            &mut s.upload_sent,
            self.plan.upload_bytes,
            &mut scratch,
        );
        self.report.uploaded += s.upload_sent - before;
        if s.upload_sent == self.plan.upload_bytes {
            s.upload_fin = conn.send_stream(id).finish().is_ok();
        }
    }

    fn read(&mut self, st: &mut BenchConn, conn: &mut Connection, id: StreamId, now: Instant) {
        let Some(s) = st.streams.get_mut(&id) else {
            return;
        };
        let mut recv = conn.recv_stream(id);
        let Ok(mut chunks) = recv.read(true) else {
            return;
        };
        let mut finished = false;
        let mut failure = None;
        let mut got = 0u64;
        loop {
            match chunks.next(usize::MAX) {
                Ok(Some(chunk)) => {
                    if self.plan.verify && !matches_pattern(s.received, &chunk.bytes) {
                        self.report.verify_failures += 1;
                    }
                    s.received += chunk.bytes.len() as u64;
                    got += chunk.bytes.len() as u64;
                }
                Ok(None) => {
                    finished = true;
                    break;
                }
                Err(ReadError::Blocked) => break,
                Err(ReadError::Reset(code)) => {
                    failure = Some(format!("server reset a perf stream with code {code}"));
                    break;
                }
            }
        }
        let _ = chunks.finalize();
        self.report.bytes += got;
        self.progress.bytes.fetch_add(got, Ordering::Relaxed);
        if finished && s.received != self.plan.download_bytes {
            failure = Some(format!(
                "perf response had {} bytes, asked for {}",
                s.received, self.plan.download_bytes
            ));
        }
        if let Some(message) = failure {
            st.streams.remove(&id);
            self.error(message);
            self.top_up(st, conn, now);
        } else if finished {
            s.response_done = true;
            self.complete_if_done(st, conn, id, now);
        }
    }

    /// A request is done when its response arrived in full and, if it
    /// uploaded, the server acknowledged the whole upload.
    fn complete_if_done(
        &mut self,
        st: &mut BenchConn,
        conn: &mut Connection,
        id: StreamId,
        now: Instant,
    ) {
        let Some(s) = st.streams.get(&id) else { return };
        if !s.response_done || (self.plan.upload_bytes > 0 && !s.upload_acked) {
            return;
        }
        st.streams.remove(&id);
        tracing::trace!(stats = ?conn.stats(), "perf request done");
        self.report.requests += 1;
        st.requests += 1;
        if self.plan.handshake_only {
            self.handshake_only_done(conn, now);
        } else {
            self.top_up(st, conn, now);
        }
    }

    /// Closes a handshake-only connection and keeps the same number of
    /// handshakes in flight: the closed one drains in the background.
    fn handshake_only_done(&mut self, conn: &mut Connection, now: Instant) {
        conn.close(now, VarInt::from_u32(CLOSE_DONE), Bytes::new());
        if self.running(now) {
            self.to_open += 1;
        }
    }

    /// Open requests on an active connection up to the plan: at most
    /// `streams` in flight and never past its fixed number of requests.
    /// Every path that starts requests comes through here: the start of
    /// the data phase, a finished request, and the server granting more
    /// streams as it comes to trust the connection.
    fn top_up(&mut self, st: &mut BenchConn, conn: &mut Connection, now: Instant) {
        let data_phase = !self.plan.handshake_only && self.measuring.is_some();
        if !data_phase
            || !st.active
            || !self.running(now)
            || conn.is_handshaking()
            || conn.is_closed()
        {
            return;
        }
        let budget = self
            .plan
            .requests_per_stream
            .map_or(u64::MAX, |max| max.saturating_mul(self.plan.streams as u64));
        while st.streams.len() < self.plan.streams
            && st.requests + (st.streams.len() as u64) < budget
        {
            let before = st.streams.len();
            self.start_request(st, conn);
            if st.streams.len() == before {
                break;
            }
        }
        self.report.streams_peak = self.report.streams_peak.max(st.streams.len() as u64);
    }
}

impl Service for BenchService {
    type Conn = BenchConn;

    fn on_open(
        &mut self,
        _conn: &mut Connection,
        _handle: quinn_proto::ConnectionHandle,
        now: Instant,
    ) -> BenchConn {
        self.in_handshake += 1;
        self.opened += 1;
        self.open += 1;
        self.report.connections_peak = self.report.connections_peak.max(self.open);
        let active = self.opened <= self.plan.active || self.plan.handshake_only;
        BenchConn {
            started: now,
            active,
            awaiting_confirmation: false,
            streams: HashMap::new(),
            requests: 0,
        }
    }

    fn on_event(
        &mut self,
        st: &mut BenchConn,
        conn: &mut Connection,
        event: Event,
        now: Instant,
        _c: &mut Counters,
    ) {
        match event {
            Event::Connected => {
                self.in_handshake -= 1;
                let us = (now - st.started).as_micros().max(1) as u64;
                let _ = self.report.handshake_us.record(us);
                self.report.handshakes += 1;
                self.report.resumed += u64::from(conn.accepted_0rtt());
                if self.report.connected_at.len() < SETUP_TIMES_MAX {
                    self.report.connected_at.push(now);
                }
                self.progress.handshakes.fetch_add(1, Ordering::Relaxed);
                self.progress
                    .connections
                    .store(self.open, Ordering::Relaxed);
                if self.plan.handshake_only {
                    if self.plan.resume {
                        // The server sends its session tickets after the
                        // handshake: a one-byte request keeps the
                        // connection open until they have arrived.
                        self.start_request(st, conn);
                    }
                    if st.streams.is_empty() {
                        // Closing now would put the close in the datagram
                        // with our Finished, and spare the server its
                        // post-handshake flight (HANDSHAKE_DONE, session
                        // ticket) that every other client gets: close once
                        // that has arrived (`on_driven`).
                        st.awaiting_confirmation = true;
                    }
                }
            }
            Event::Stream(StreamEvent::Readable { id }) => self.read(st, conn, id, now),
            Event::Stream(StreamEvent::Writable { id }) => self.continue_upload(st, conn, id),
            // The server grants streams as it trusts the connection: top
            // the active ones up to the plan.
            Event::Stream(StreamEvent::Available { dir: Dir::Bi }) => self.top_up(st, conn, now),
            Event::Stream(StreamEvent::Finished { id }) => {
                if let Some(s) = st.streams.get_mut(&id) {
                    s.upload_acked = true;
                }
                self.complete_if_done(st, conn, id, now);
            }
            Event::ConnectionLost { reason } => {
                if conn.is_handshaking() {
                    self.in_handshake = self.in_handshake.saturating_sub(1);
                }
                let ours = matches!(&reason, quinn_proto::ConnectionError::LocallyClosed);
                if !ours && self.running(now) {
                    self.error(format!("connection lost: {}", describe(&reason)));
                }
                if std::mem::take(&mut st.awaiting_confirmation) && self.running(now) {
                    // Keep the handshakes in flight: this one ends here.
                    self.to_open += 1;
                }
            }
            _ => {}
        }
    }

    fn on_driven(&mut self, st: &mut BenchConn, conn: &mut Connection, now: Instant) {
        if st.awaiting_confirmation && conn.stats().frame_rx.handshake_done > 0 {
            st.awaiting_confirmation = false;
            self.handshake_only_done(conn, now);
        }
    }

    fn on_close(&mut self, _st: BenchConn, conn: &Connection, _c: &mut Counters) {
        tracing::debug!(stats = ?conn.stats(), "bench connection closed");
        self.open -= 1;
        self.progress
            .connections
            .store(self.open, Ordering::Relaxed);
    }

    fn on_visit(&mut self, st: &mut BenchConn, conn: &mut Connection, now: Instant) {
        self.top_up(st, conn, now);
    }

    fn poll(&mut self, now: Instant, actions: &mut Actions) {
        self.started.get_or_insert(now);
        // Two phases, like the baseline: set up every connection (the
        // handshake rate), then move data for `duration` (the goodput).
        // Handshake-only runs are one measured phase.
        let set_up = self.to_open == 0 && self.in_handshake == 0;
        if self.measuring.is_none() && (self.plan.handshake_only || set_up) {
            self.measuring = Some(now);
            self.deadline = Some(now + self.plan.duration);
            actions.visit_all = !self.plan.handshake_only;
        }
        if !self.running(now) {
            self.stopped_at.get_or_insert(now);
            actions.stop = Some(Duration::ZERO);
            return;
        }
        let fixed_done = self.plan.requests_per_stream.is_some()
            && self.to_open == 0
            && self.in_handshake == 0
            && self.report.requests + self.report.errors
                >= self.plan.requests_per_stream.unwrap_or(0)
                    * (self.plan.active.min(self.plan.connections) * self.plan.streams) as u64;
        // Every connection was opened and every one is gone (the server
        // closed them): nothing left to measure.
        let all_gone = !self.plan.handshake_only && self.to_open == 0 && self.open == 0;
        if fixed_done || all_gone {
            self.stopped_at = Some(now);
            actions.stop = Some(Duration::ZERO);
            return;
        }
        while self.to_open > 0
            && self.in_handshake + actions.connect.len() < self.plan.handshake_concurrency.max(1)
        {
            self.to_open -= 1;
            actions.connect.push(ConnectRequest {
                config: self.config.clone(),
                remote: self.plan.remote,
                server_name: self.plan.server_name.clone(),
            });
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_rates_compare_the_first_and_last_windows() {
        let start = Instant::now();
        // 1000 handshakes a second at first, then 250 a second.
        let mut times: Vec<Instant> = (0..3000u64)
            .map(|i| match i {
                0..1500 => start + Duration::from_millis(i),
                _ => start + Duration::from_millis(1500 + (i - 1500) * 4),
            })
            .rev()
            .collect();
        let (first, last) = setup_rates(&mut times, 1000).unwrap();
        assert!((first - 1000.0).abs() < 1.0, "{first}");
        assert!((last - 250.0).abs() < 1.0, "{last}");
        assert_eq!(setup_rates(&mut times[..1999], 1000), None);
    }
}
