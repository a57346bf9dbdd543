//! A `stoq/1` client: one connection, a list of requests sent on parallel
//! streams, their responses collected. 0-RTT is used when the session
//! cache holds a ticket for the server, for idempotent requests only.

use super::admit::{ClientAdmission, Progress};
use crate::admission::Admitter;
use crate::protocols::stoq::{self, KIND_ERROR, Kind, Message, RESPONSE_PAYLOAD_MAX};
use crate::protocols::{ReadState, read_stream};
use crate::stats::Counters;
use crate::worker::{Actions, ConnectRequest, Service};
use bytes::Bytes;
use quinn_proto::{
    ClientConfig, Connection, ConnectionError, Dir, Event, StreamEvent, StreamId, VarInt,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Application close code of a client that is done.
pub const CLOSE_DONE: u32 = 0;

/// One response, or what went wrong with its request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Ok(Bytes),
    /// An error response: code and message.
    Error {
        code: u16,
        message: String,
    },
    /// The connection failed before an answer came.
    Failed(String),
}

#[derive(Debug)]
pub struct RpcOutcome {
    pub replies: Vec<Reply>,
    /// Time from starting the connection to the handshake completing.
    pub handshake: Option<Duration>,
    /// Time from starting the connection to the last reply.
    pub latency: Option<Duration>,
    /// Whether the connection was resumed with 0-RTT that the server accepted.
    pub zero_rtt_accepted: bool,
    /// Why the connection ended, if not by us.
    pub error: Option<String>,
    /// How long admission took (parameters to admitted), when it ran.
    pub admission: Option<Duration>,
    /// The server closed the connection at its admission deadline.
    pub admission_deadline: bool,
    /// The application close code the server ended the connection with.
    pub closed_with: Option<u64>,
}

/// How requests and replies are framed on a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// `stoq/1` messages (docs/PROTOCOL.md).
    Stoq,
    /// RFC 9250: a 2-byte length prefix, then a DNS message.
    Doq,
}

/// One request, framed, and whether it may ride in 0-RTT.
#[derive(Clone, Debug)]
pub struct Request {
    pub message: Bytes,
    pub idempotent: bool,
}

pub struct RpcService {
    target: Option<ConnectRequest>,
    framing: Framing,
    requests: Vec<Request>,
    replies: Vec<Option<Reply>>,
    started: Option<Instant>,
    handshake: Option<Duration>,
    replied: Option<Instant>,
    zero_rtt_accepted: bool,
    deadline: Instant,
    error: Option<String>,
    done: bool,
    admitter: Option<Arc<dyn Admitter>>,
    admission: Option<Duration>,
    admission_deadline: bool,
    closed_with: Option<u64>,
}

pub struct RpcConn {
    streams: HashMap<StreamId, (usize, Vec<u8>)>,
    sent: bool,
    sent_early: bool,
    admission: Option<ClientAdmission>,
}

impl RpcService {
    pub fn new(
        config: ClientConfig,
        remote: SocketAddr,
        server_name: &str,
        requests: Vec<(Kind, Bytes)>,
        timeout: Duration,
    ) -> Self {
        let requests = requests
            .into_iter()
            .map(|(kind, payload)| Request {
                message: stoq::encode(kind as u8, &payload),
                idempotent: kind.idempotent(),
            })
            .collect();
        Self::with_framing(
            config,
            remote,
            server_name,
            Framing::Stoq,
            requests,
            timeout,
        )
    }

    /// Requests already framed per `framing`.
    pub fn with_framing(
        config: ClientConfig,
        remote: SocketAddr,
        server_name: &str,
        framing: Framing,
        requests: Vec<Request>,
        timeout: Duration,
    ) -> Self {
        let count = requests.len();
        Self {
            framing,
            target: Some(ConnectRequest {
                config,
                remote,
                server_name: server_name.to_owned(),
            }),
            requests,
            replies: vec![None; count],
            started: None,
            handshake: None,
            replied: None,
            zero_rtt_accepted: false,
            deadline: Instant::now() + timeout,
            error: None,
            done: false,
            admitter: None,
            admission: None,
            admission_deadline: false,
            closed_with: None,
        }
    }

    /// Run the admission exchange (`stoq/1` only) before the requests.
    pub fn with_admitter(mut self, admitter: Option<Arc<dyn Admitter>>) -> Self {
        if self.framing == Framing::Stoq {
            self.admitter = admitter;
        }
        self
    }

    /// Admission failed: every request fails with `why`.
    fn fail_all(&mut self, conn: &mut Connection, why: String) {
        for reply in &mut self.replies {
            reply.get_or_insert_with(|| Reply::Failed(why.clone()));
        }
        self.error = Some(why);
        self.done = true;
        conn.close(
            Instant::now(),
            VarInt::from_u32(CLOSE_DONE),
            Bytes::from_static(b"admission failed"),
        );
    }

    fn on_admission(&mut self, st: &mut RpcConn, conn: &mut Connection, progress: Progress) {
        match progress {
            Progress::Pending => {}
            Progress::Submitted => {
                // Right behind the bundle (saving a round trip) when the
                // server will hold them all.
                let bytes: usize = self.requests.iter().map(|r| r.message.len()).sum();
                if !st.sent && bytes <= stoq::HELD_BYTES_MAX {
                    self.send_requests(st, conn);
                }
            }
            Progress::Admitted => {
                self.admission = st.admission.as_ref().and_then(|a| a.elapsed);
                if !st.sent {
                    self.send_requests(st, conn);
                }
            }
            Progress::Failed(why) => self.fail_all(conn, why),
        }
    }

    pub fn outcome(self) -> RpcOutcome {
        let failure = self.error.clone().unwrap_or_else(|| "timed out".to_owned());
        RpcOutcome {
            replies: self
                .replies
                .into_iter()
                .map(|r| r.unwrap_or_else(|| Reply::Failed(failure.clone())))
                .collect(),
            handshake: self.handshake,
            latency: self.replied.zip(self.started).map(|(r, s)| r - s),
            zero_rtt_accepted: self.zero_rtt_accepted,
            error: self.error,
            admission: self.admission,
            admission_deadline: self.admission_deadline,
            closed_with: self.closed_with,
        }
    }

    /// Open a stream for every request not answered or in flight yet, as
    /// far as the server's stream limit allows; the rest go out when it
    /// grants more (`StreamEvent::Available`). A server keeps untrusted
    /// connections to a few streams until they are admitted.
    fn send_requests(&mut self, st: &mut RpcConn, conn: &mut Connection) {
        for (index, request) in self.requests.iter().enumerate() {
            if self.replies[index].is_some() || st.streams.values().any(|(i, _)| *i == index) {
                continue;
            }
            let Some(id) = conn.streams().open(Dir::Bi) else {
                break;
            };
            let mut send = conn.send_stream(id);
            let _ = send.write_chunks(&mut [request.message.clone()]);
            let _ = send.finish();
            st.streams.insert(id, (index, Vec::new()));
        }
        st.sent = true;
    }

    fn read(&mut self, st: &mut RpcConn, conn: &mut Connection, id: StreamId) {
        let Some((index, buf)) = st.streams.get_mut(&id) else {
            return;
        };
        let limit = self.framing.reply_len_max();
        let state = read_stream(conn, id, buf, limit);
        let finished = match state {
            _ if buf.len() > limit => {
                self.replies[*index] =
                    Some(Reply::Failed("response exceeds the size limit".into()));
                false
            }
            ReadState::Reset => {
                self.replies[*index] = Some(Reply::Failed(
                    "the server reset the stream before answering".into(),
                ));
                false
            }
            ReadState::Finished => true,
            ReadState::Open => false,
        };
        if finished {
            self.replies[*index] = Some(self.framing.decode(buf));
        }
        if self.replies.iter().all(Option::is_some) {
            self.done = true;
            self.replied = Some(Instant::now());
            // The server answers the bundle before the requests it held
            // behind it: take that answer too (for `admission`).
            if let Some(admission) = st.admission.as_mut().filter(|a| !a.is_done())
                && let Some(stream) = admission.stream()
                && admission.on_readable(conn, stream) == Progress::Admitted
            {
                self.admission = admission.elapsed;
            }
            conn.close(
                Instant::now(),
                VarInt::from_u32(CLOSE_DONE),
                Bytes::from_static(b"done"),
            );
        }
    }
}

impl Service for RpcService {
    type Conn = RpcConn;

    fn on_open(
        &mut self,
        conn: &mut Connection,
        _handle: quinn_proto::ConnectionHandle,
        now: Instant,
    ) -> RpcConn {
        self.started = Some(now);
        let mut st = RpcConn {
            streams: HashMap::new(),
            sent: false,
            sent_early: false,
            admission: None,
        };
        // With a session ticket the requests ride in 0-RTT; only idempotent
        // ones may (docs/PROTOCOL.md). Where admission is on, the server
        // holds them until the bundle verifies.
        if conn.has_0rtt() && self.requests.iter().all(|r| r.idempotent) {
            self.send_requests(&mut st, conn);
            st.sent_early = true;
        }
        st
    }

    fn on_event(
        &mut self,
        st: &mut RpcConn,
        conn: &mut Connection,
        event: Event,
        now: Instant,
        _counters: &mut Counters,
    ) {
        match event {
            Event::Connected => {
                self.handshake = self.started.map(|s| now - s);
                self.zero_rtt_accepted = st.sent_early && conn.accepted_0rtt();
                if st.sent_early && !conn.accepted_0rtt() {
                    // Rejected 0-RTT streams are gone: send again in 1-RTT.
                    st.streams.clear();
                    st.sent = false;
                }
                if let Some(admitter) = &self.admitter {
                    let (admission, progress) = ClientAdmission::start(admitter.clone(), conn);
                    st.admission = Some(admission);
                    self.on_admission(st, conn, progress);
                } else if !st.sent {
                    self.send_requests(st, conn);
                }
            }
            Event::Stream(StreamEvent::Readable { id }) => {
                match ClientAdmission::on_stream(&mut st.admission, conn, id) {
                    Some(progress) => self.on_admission(st, conn, progress),
                    None => self.read(st, conn, id),
                }
            }
            Event::Stream(StreamEvent::Available { dir: Dir::Bi }) if st.sent => {
                self.send_requests(st, conn)
            }
            Event::ConnectionLost { reason } => {
                self.admission_deadline = is_admission_deadline(&reason);
                if let ConnectionError::ApplicationClosed(close) = &reason {
                    self.closed_with = Some(close.error_code.into_inner());
                }
                if !self.done {
                    self.error = Some(describe(&reason));
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
            self.error
                .get_or_insert_with(|| "timed out waiting for the server".to_owned());
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

impl Framing {
    fn reply_len_max(self) -> usize {
        match self {
            Framing::Stoq => stoq::HEADER_LEN + RESPONSE_PAYLOAD_MAX,
            Framing::Doq => 2 + crate::protocols::doq::MESSAGE_MAX,
        }
    }

    pub(crate) fn decode(self, buf: &[u8]) -> Reply {
        match self {
            Framing::Stoq => match stoq::decode(buf, RESPONSE_PAYLOAD_MAX) {
                Ok(Message {
                    kind: KIND_ERROR,
                    payload,
                }) => {
                    let (code, message) = stoq::decode_error_payload(&payload);
                    Reply::Error { code, message }
                }
                Ok(Message { payload, .. }) => Reply::Ok(payload),
                Err(e) => Reply::Failed(format!("malformed response: {e}")),
            },
            Framing::Doq => match buf {
                [hi, lo, message @ ..]
                    if usize::from(u16::from_be_bytes([*hi, *lo])) == message.len() =>
                {
                    Reply::Ok(Bytes::copy_from_slice(message))
                }
                _ => Reply::Failed("malformed DNS-over-QUIC answer (length prefix)".into()),
            },
        }
    }
}

/// Whether the server closed the connection at its admission deadline.
pub fn is_admission_deadline(reason: &ConnectionError) -> bool {
    matches!(reason, ConnectionError::ApplicationClosed(c)
        if c.error_code == VarInt::from_u32(crate::admission::CLOSE_ADMISSION_DEADLINE))
}

/// The name of an admission close code (docs/ADMISSION.md).
pub fn admission_code_name(code: u64) -> Option<&'static str> {
    Some(match code {
        0x201 => "WORK",
        0x202 => "TIME",
        0x203 => "STAKE",
        0x204 => "SPACE",
        0x205 => "MALFORMED",
        0x206 => "STALE",
        0x207 => "DEADLINE",
        0x208 => "SUSPENDED",
        0x209 => "UNAVAILABLE",
        _ => return None,
    })
}

/// A connection error in words a user can act on.
pub fn describe(reason: &ConnectionError) -> String {
    match reason {
        ConnectionError::ApplicationClosed(c)
            if admission_code_name(c.error_code.into_inner()).is_some() =>
        {
            format!(
                "admission refused: {} ({:#x}): {}",
                admission_code_name(c.error_code.into_inner()).unwrap_or_default(),
                c.error_code.into_inner(),
                String::from_utf8_lossy(&c.reason)
            )
        }
        ConnectionError::TimedOut => "no answer from the server (timed out)".to_owned(),
        ConnectionError::ConnectionClosed(c) if u64::from(c.error_code) == 0x178 => {
            "the server does not speak this protocol (TLS no_application_protocol)".to_owned()
        }
        ConnectionError::ApplicationClosed(c)
            if c.error_code == VarInt::from_u32(crate::worker::CLOSE_SHUTDOWN) =>
        {
            "the server is shutting down".to_owned()
        }
        other => other.to_string(),
    }
}
