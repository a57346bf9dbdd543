//! A `stoq/1` request load: one established connection, the same request
//! sent `total` times with up to `concurrency` in flight, each request's
//! latency (stream opened → response complete) recorded. Measures what the
//! server's request path costs, without handshakes in the figures.

use crate::protocols::stoq::{self, KIND_ERROR, RESPONSE_PAYLOAD_MAX};
use crate::protocols::{ReadState, read_stream};
use crate::stats::Counters;
use crate::worker::{Actions, ConnectRequest, Service};
use bytes::Bytes;
use hdrhistogram::Histogram;
use quinn_proto::{
    ClientConfig, Connection, ConnectionHandle, Dir, Event, StreamEvent, StreamId, VarInt,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// What to send, how often, how many at once.
#[derive(Clone, Debug)]
pub struct LoadPlan {
    /// `stoq/1` (a message of `kind` around `payload`) or DNS over QUIC
    /// (`payload` is a DNS message, length-prefixed here; `kind` unused).
    pub framing: super::rpc::Framing,
    pub kind: u8,
    pub payload: Bytes,
    pub total: u64,
    pub concurrency: usize,
    pub timeout: Duration,
}

/// What the run measured.
#[derive(Debug)]
pub struct LoadReport {
    /// Latency of each successful request, microseconds.
    pub latency_us: Histogram<u64>,
    pub ok: u64,
    /// Error responses, with the first one's code and message.
    pub errors: u64,
    pub first_error: Option<(u16, String)>,
    /// From the first request sent to the last response.
    pub elapsed: Duration,
    /// Why the run stopped early, if it did.
    pub failure: Option<String>,
    /// Requests the server answered `BUSY` (too many of the connection's
    /// requests waiting), sent again once one was answered.
    pub busy: u64,
    /// Requests in flight at the end: the plan's concurrency, less one for
    /// each `BUSY` (the server's bound on one connection).
    pub window: usize,
}

impl LoadReport {
    pub fn per_second(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The report, or why it is not a figure: the run stopped early, or a
    /// request was answered with an error.
    pub fn complete(self) -> Result<Self, String> {
        if let Some(why) = &self.failure {
            return Err(format!("the load stopped: {why}"));
        }
        if let Some((code, message)) = &self.first_error {
            return Err(format!(
                "{} requests failed; the first with {code:#x}: {message}",
                self.errors
            ));
        }
        Ok(self)
    }

    /// The figures as JSON: requests, per second, latency (p50, p99, max),
    /// and the `BUSY` answers retried.
    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "requests": self.ok,
            "per_second": self.per_second(),
            "latency_us_p50": self.latency_us.value_at_quantile(0.50),
            "latency_us_p99": self.latency_us.value_at_quantile(0.99),
            "latency_us_max": self.latency_us.max(),
            "busy_retried": self.busy,
            "in_flight_at_end": self.window,
        })
    }
}

pub struct LoadService {
    target: Option<ConnectRequest>,
    plan: LoadPlan,
    message: Bytes,
    sent: u64,
    report: LoadReport,
    first_sent: Option<Instant>,
    deadline: Instant,
    done: bool,
    admitter: Option<std::sync::Arc<dyn crate::admission::Admitter>>,
    /// Requests kept in flight: `concurrency`, shrunk by `BUSY` answers.
    window: usize,
}

pub struct LoadConn {
    /// Streams in flight: when sent, and the response so far.
    streams: HashMap<StreamId, (Instant, Vec<u8>)>,
    /// Handshake done and (where the server asks) admitted.
    connected: bool,
    admission: Option<super::admit::ClientAdmission>,
}

impl LoadService {
    pub fn new(
        config: ClientConfig,
        remote: SocketAddr,
        server_name: &str,
        plan: LoadPlan,
    ) -> Self {
        Self {
            target: Some(ConnectRequest {
                config,
                remote,
                server_name: server_name.to_owned(),
            }),
            message: match plan.framing {
                super::rpc::Framing::Stoq => stoq::encode(plan.kind, &plan.payload),
                super::rpc::Framing::Doq => {
                    let mut framed = Vec::with_capacity(2 + plan.payload.len());
                    framed.extend_from_slice(&(plan.payload.len() as u16).to_be_bytes());
                    framed.extend_from_slice(&plan.payload);
                    Bytes::from(framed)
                }
            },
            deadline: Instant::now() + plan.timeout,
            window: plan.concurrency,
            plan,
            sent: 0,
            report: LoadReport {
                latency_us: Histogram::new(3).expect("3 significant figures is valid"),
                ok: 0,
                errors: 0,
                first_error: None,
                elapsed: Duration::ZERO,
                failure: None,
                busy: 0,
                window: 0,
            },
            first_sent: None,
            done: false,
            admitter: None,
        }
    }

    /// Be admitted (`stoq/1` only) before the load starts.
    pub fn with_admitter(
        mut self,
        admitter: Option<std::sync::Arc<dyn crate::admission::Admitter>>,
    ) -> Self {
        if self.plan.framing == super::rpc::Framing::Stoq {
            self.admitter = admitter;
        }
        self
    }

    fn on_admission(
        &mut self,
        st: &mut LoadConn,
        conn: &mut Connection,
        progress: super::admit::Progress,
    ) {
        match progress {
            // The load waits for the answer: its requests would exceed what
            // the server holds for an unadmitted connection.
            super::admit::Progress::Pending | super::admit::Progress::Submitted => {}
            super::admit::Progress::Admitted => {
                st.connected = true;
                self.fill(st, conn);
            }
            super::admit::Progress::Failed(why) => {
                self.report.failure = Some(why);
                self.finish(conn);
            }
        }
    }

    pub fn report(mut self) -> LoadReport {
        self.report.window = self.window;
        self.report
    }

    /// Open streams until `concurrency` are in flight or all were sent.
    fn fill(&mut self, st: &mut LoadConn, conn: &mut Connection) {
        while st.streams.len() < self.window && self.sent < self.plan.total {
            let Some(id) = conn.streams().open(Dir::Bi) else {
                return; // the server's stream limit: more when some finish
            };
            let now = Instant::now();
            self.first_sent.get_or_insert(now);
            let mut send = conn.send_stream(id);
            let _ = send.write_chunks(&mut [self.message.clone()]);
            let _ = send.finish();
            st.streams.insert(id, (now, Vec::new()));
            self.sent += 1;
        }
    }

    fn read(&mut self, st: &mut LoadConn, conn: &mut Connection, id: StreamId) {
        let Some((_, buf)) = st.streams.get_mut(&id) else {
            return;
        };
        // A reset or an oversized answer ends the request too (counted as
        // an error below: it does not decode).
        let limit = stoq::HEADER_LEN + RESPONSE_PAYLOAD_MAX;
        let open = read_stream(conn, id, buf, limit) == ReadState::Open;
        if open && buf.len() <= limit {
            // Room for the whole answer once its header says how long it
            // is, so that a large one is not copied as the buffer grows.
            if self.plan.framing == super::rpc::Framing::Stoq
                && let Ok(len) = stoq::header_payload_len(buf, RESPONSE_PAYLOAD_MAX)
            {
                buf.reserve_exact((stoq::HEADER_LEN + len).saturating_sub(buf.len()));
            }
            return;
        }
        let (sent_at, buf) = st.streams.remove(&id).expect("present above");
        if self.plan.framing == super::rpc::Framing::Doq {
            let whole = buf.len() >= 2
                && usize::from(u16::from_be_bytes([buf[0], buf[1]])) == buf.len() - 2;
            if whole {
                self.report.ok += 1;
                let us = sent_at.elapsed().as_micros() as u64;
                let _ = self.report.latency_us.record(us.max(1));
            } else {
                self.report.errors += 1;
                self.report
                    .first_error
                    .get_or_insert((0, "malformed DNS-over-QUIC answer".into()));
            }
            if self.report.ok + self.report.errors == self.plan.total {
                self.finish(conn);
            } else {
                self.fill(st, conn);
            }
            return;
        }
        // A whole answer that is not an error counts without copying its
        // payload out; an error is decoded for its code.
        let whole = stoq::header_payload_len(&buf, RESPONSE_PAYLOAD_MAX)
            .is_ok_and(|len| buf.len() == stoq::HEADER_LEN + len);
        if whole && buf[1] != KIND_ERROR {
            self.report.ok += 1;
            let us = sent_at.elapsed().as_micros() as u64;
            let _ = self.report.latency_us.record(us.max(1));
        } else {
            match stoq::decode(&buf, RESPONSE_PAYLOAD_MAX) {
                Ok(message) => {
                    let error = stoq::decode_error_payload(&message.payload);
                    if error.0 == stoq::ErrorCode::Busy as u16 {
                        // As the server asks: send it again once one of the
                        // connection's requests is answered, and keep one
                        // fewer in flight from now on.
                        self.report.busy += 1;
                        self.sent -= 1;
                        self.window = self.window.saturating_sub(1).max(1);
                        if st.streams.is_empty() {
                            self.fill(st, conn);
                        }
                        return;
                    }
                    self.report.errors += 1;
                    self.report.first_error.get_or_insert(error);
                }
                Err(e) => {
                    self.report.errors += 1;
                    self.report
                        .first_error
                        .get_or_insert((0, format!("malformed response: {e}")));
                }
            }
        }
        if self.report.ok + self.report.errors == self.plan.total {
            self.finish(conn);
        } else {
            self.fill(st, conn);
        }
    }

    fn finish(&mut self, conn: &mut Connection) {
        self.done = true;
        self.report.elapsed = self.first_sent.map_or(Duration::ZERO, |t| t.elapsed());
        conn.close(
            Instant::now(),
            VarInt::from_u32(super::rpc::CLOSE_DONE),
            Bytes::from_static(b"done"),
        );
    }
}

impl Service for LoadService {
    type Conn = LoadConn;

    fn on_open(
        &mut self,
        _conn: &mut Connection,
        _handle: ConnectionHandle,
        _now: Instant,
    ) -> LoadConn {
        LoadConn {
            streams: HashMap::new(),
            connected: false,
            admission: None,
        }
    }

    fn on_event(
        &mut self,
        st: &mut LoadConn,
        conn: &mut Connection,
        event: Event,
        _now: Instant,
        _counters: &mut Counters,
    ) {
        match event {
            Event::Connected => match &self.admitter {
                Some(admitter) => {
                    let (admission, progress) =
                        super::admit::ClientAdmission::start(admitter.clone(), conn);
                    st.admission = Some(admission);
                    self.on_admission(st, conn, progress);
                }
                None => {
                    st.connected = true;
                    self.fill(st, conn);
                }
            },
            Event::Stream(StreamEvent::Readable { id }) => {
                match super::admit::ClientAdmission::on_stream(&mut st.admission, conn, id) {
                    Some(progress) => self.on_admission(st, conn, progress),
                    None => self.read(st, conn, id),
                }
            }
            Event::Stream(StreamEvent::Available { dir: Dir::Bi }) if st.connected => {
                self.fill(st, conn)
            }
            Event::ConnectionLost { reason } => {
                if !self.done {
                    self.report.failure = Some(super::rpc::describe(&reason));
                    self.report.elapsed = self.first_sent.map_or(Duration::ZERO, |t| t.elapsed());
                }
                self.done = true;
            }
            _ => {}
        }
    }

    fn poll(&mut self, now: Instant, actions: &mut Actions) {
        if let Some(target) = self.target.take() {
            actions.connect.push(target);
        }
        if now >= self.deadline && !self.done {
            self.report
                .failure
                .get_or_insert_with(|| "timed out before every request was answered".to_owned());
            self.report.elapsed = self.first_sent.map_or(Duration::ZERO, |t| t.elapsed());
            self.done = true;
        }
        if self.done {
            actions.stop = Some(Duration::ZERO);
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        Some(self.deadline)
    }
}
