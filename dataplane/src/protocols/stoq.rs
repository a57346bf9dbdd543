//! `stoq/1`: the native request/response protocol (docs/PROTOCOL.md).
//!
//! One request per bidirectional stream: the client writes one message and
//! FIN; the server answers with one message and FIN. A message is an 8-byte
//! header (version, kind, two reserved zero bytes, big-endian u32 payload
//! length) and the payload.

use crate::admission::{
    AdmissionEvent, AdmissionGate, AdmissionStage, KIND_ADMISSION_PARAMS, KIND_ADMISSION_SUBMIT,
    KIND_PLOT_REGISTER, binding_of,
};
use crate::assets::serve::Answer;
use crate::control::{ControlPort, Forwarded, Ticket};
use crate::protocols::stoq_registry::ASSET_PROXY;
use crate::stats::{Counters, StatsRegistry};
use bytes::{BufMut, Bytes, BytesMut};
use quinn_proto::{Connection, Dir, StreamId, VarInt};
use rustls::pki_types::CertificateDer;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 8;
/// Largest request payload a server accepts.
pub const REQUEST_PAYLOAD_MAX: usize = 64 * 1024;
/// Largest response payload a client accepts.
pub const RESPONSE_PAYLOAD_MAX: usize = 16 * 1024 * 1024;
/// Largest ping payload (echoed back).
pub const PING_PAYLOAD_MAX: usize = 1024;
/// Set on the kind of every successful response.
pub const RESPONSE_FLAG: u8 = 0x80;
/// Kind of an error response: u16 code, then a UTF-8 message.
pub const KIND_ERROR: u8 = 0xff;
/// Stream error code used when the server stops reading a bad request.
pub const STREAM_ERROR_BAD_REQUEST: u32 = 0x2;
/// Request kinds answered by the control plane's authority (forwarded as
/// they are; docs/PROTOCOL.md lists them).
pub const AUTHORITY_KINDS: std::ops::RangeInclusive<u8> = 0x10..=0x3f;
/// Enrollment: an authority kind a connection without a client
/// certificate may send.
pub const KIND_ENROLL: u8 = super::stoq_registry::ENROLL;

/// Request kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Ping = super::stoq_registry::PING,
    Stats = super::stoq_registry::STATS,
}

impl Kind {
    pub fn from_u8(value: u8) -> Option<Kind> {
        match value {
            super::stoq_registry::PING => Some(Kind::Ping),
            super::stoq_registry::STATS => Some(Kind::Stats),
            _ => None,
        }
    }

    /// Whether a replay is harmless, so it may be served from 0-RTT data
    /// (RFC 9001 §9.2, RFC 8446 §8: 0-RTT data can be replayed).
    pub fn idempotent(self) -> bool {
        match self {
            Kind::Ping | Kind::Stats => true,
        }
    }
}

/// The memory-asset request kinds (`crate::assets::wire`), answered by the
/// worker; none is idempotent enough for 0-RTT data.
pub const ASSET_KINDS: std::ops::RangeInclusive<u8> =
    super::stoq_registry::ASSET_ALLOC..=super::stoq_registry::ASSET_GRANT;

/// The VM request kinds, handed to the control plane like storage asset
/// requests; not idempotent (a call spends fuel and may write assets).
pub const VM_KINDS: std::ops::RangeInclusive<u8> =
    super::stoq_registry::VM_CALL..=super::stoq_registry::VM_LIST;

/// Error codes carried in error responses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    UnsupportedVersion = 1,
    UnknownMessage = 2,
    MessageTooLarge = 3,
    Malformed = 4,
    /// The request needs a client certificate the connection lacks.
    CertificateRequired = 5,
    /// The control plane's queue is full: retry later.
    Busy = 6,
    /// The connection is not admitted yet: it may only fetch its admission
    /// parameters, register its plot and submit its bundle.
    NotAdmitted = 7,
    /// An admission request that does not fit the connection's state (a
    /// second bundle, or parameters after admission).
    AdmissionState = 8,
    /// Admission is off on this server: no bundle is needed.
    AdmissionOff = 9,
    /// No such asset (never allocated here, or a forged address).
    AssetUnknown = 10,
    /// The asset was freed, its lease ended, or the node restarted.
    AssetReleased = 11,
    /// The address's locator is another node's.
    AssetElsewhere = 12,
    /// Neither the asset's owner nor granted that access.
    AssetForbidden = 13,
    /// Bytes outside the asset, or a compare-and-swap of unequal lengths.
    AssetRange = 14,
    /// The owner's quota (bytes or assets) is used up.
    AssetQuota = 15,
    /// A size, grant count or identifier supply this node does not allow.
    AssetLimit = 16,
    /// Asset addressing is off on this server (`nat_addressing = false`).
    AssetsOff = 17,
    /// An asset's name is another's already (or the server has no zone).
    AssetName = 18,
    /// Not a module this server runs: not WebAssembly, an import outside
    /// the VM ABI, a missing export, or not a VM asset.
    VmModule = 19,
    /// VM execution is off on this server (`enable_vm_execution = false`).
    VmOff = 20,
}

impl ErrorCode {
    pub fn from_u16(value: u16) -> Option<ErrorCode> {
        match value {
            1 => Some(ErrorCode::UnsupportedVersion),
            2 => Some(ErrorCode::UnknownMessage),
            3 => Some(ErrorCode::MessageTooLarge),
            4 => Some(ErrorCode::Malformed),
            5 => Some(ErrorCode::CertificateRequired),
            6 => Some(ErrorCode::Busy),
            7 => Some(ErrorCode::NotAdmitted),
            8 => Some(ErrorCode::AdmissionState),
            9 => Some(ErrorCode::AdmissionOff),
            10 => Some(ErrorCode::AssetUnknown),
            11 => Some(ErrorCode::AssetReleased),
            12 => Some(ErrorCode::AssetElsewhere),
            13 => Some(ErrorCode::AssetForbidden),
            14 => Some(ErrorCode::AssetRange),
            15 => Some(ErrorCode::AssetQuota),
            16 => Some(ErrorCode::AssetLimit),
            17 => Some(ErrorCode::AssetsOff),
            18 => Some(ErrorCode::AssetName),
            19 => Some(ErrorCode::VmModule),
            20 => Some(ErrorCode::VmOff),
            _ => None,
        }
    }
}

/// A decoded message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub kind: u8,
    pub payload: Bytes,
}

/// Why bytes are not a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message needs more bytes")]
    Incomplete,
    #[error("unsupported protocol version {0} (this build speaks {VERSION})")]
    UnsupportedVersion(u8),
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("reserved header bytes are not zero")]
    Malformed,
    #[error("bytes after the end of the message")]
    TrailingBytes,
}

impl DecodeError {
    fn code(self) -> ErrorCode {
        match self {
            DecodeError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            DecodeError::TooLarge { .. } => ErrorCode::MessageTooLarge,
            DecodeError::Incomplete | DecodeError::Malformed | DecodeError::TrailingBytes => {
                ErrorCode::Malformed
            }
        }
    }
}

pub fn encode(kind: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER_LEN + payload.len());
    put_header(&mut out, kind, payload.len());
    out.put_slice(payload);
    out.freeze()
}

/// The header of a message of `kind` whose payload of `len` bytes follows.
pub fn put_header(out: &mut impl BufMut, kind: u8, len: usize) {
    out.put_u8(VERSION);
    out.put_u8(kind);
    out.put_u16(0);
    out.put_u32(u32::try_from(len).expect("payloads are bounded far below 4 GiB"));
}

pub fn encode_error(code: ErrorCode, message: &str) -> Bytes {
    encode_error_code(code as u16, message)
}

/// An error response with any code (the authority's codes are its own).
pub fn encode_error_code(code: u16, message: &str) -> Bytes {
    let mut payload = Vec::with_capacity(2 + message.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(message.as_bytes());
    encode(KIND_ERROR, &payload)
}

/// The payload length a complete header announces, checked against `max`.
pub fn header_payload_len(header: &[u8], max: usize) -> Result<usize, DecodeError> {
    if header.len() < HEADER_LEN {
        return Err(DecodeError::Incomplete);
    }
    if header[0] != VERSION {
        return Err(DecodeError::UnsupportedVersion(header[0]));
    }
    if header[2] != 0 || header[3] != 0 {
        return Err(DecodeError::Malformed);
    }
    let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
    if len > max {
        return Err(DecodeError::TooLarge { len, max });
    }
    Ok(len)
}

/// Decode exactly one message from `bytes`.
pub fn decode(bytes: &[u8], max: usize) -> Result<Message, DecodeError> {
    let len = header_payload_len(bytes, max)?;
    match bytes.len().cmp(&(HEADER_LEN + len)) {
        std::cmp::Ordering::Less => Err(DecodeError::Incomplete),
        std::cmp::Ordering::Greater => Err(DecodeError::TrailingBytes),
        std::cmp::Ordering::Equal => Ok(Message {
            kind: bytes[1],
            payload: Bytes::copy_from_slice(&bytes[HEADER_LEN..]),
        }),
    }
}

/// An error response's code and message.
pub fn decode_error_payload(payload: &[u8]) -> (u16, String) {
    if payload.len() < 2 {
        return (0, String::new());
    }
    (
        u16::from_be_bytes([payload[0], payload[1]]),
        String::from_utf8_lossy(&payload[2..]).into_owned(),
    )
}

#[derive(Debug, Default)]
struct StoqStream {
    buf: Vec<u8>,
    answered: bool,
    /// The client finished its side: an incomplete message stays so.
    finished: bool,
    /// Complete, and waiting for the connection to be admitted.
    held: bool,
    /// The part of the response the peer's flow control has not taken yet.
    unsent: super::Unsent,
}

/// Server side of a `stoq/1` connection.
#[derive(Debug, Default)]
pub struct StoqServer {
    streams: HashMap<StreamId, StoqStream>,
    /// The connection's asset lease, from its first asset request.
    assets: crate::assets::serve::AssetSession,
    /// Requests forwarded to the control plane and not answered yet.
    forwarded: usize,
    /// Request bytes held for admission.
    held_bytes: usize,
}

/// Requests one connection may have waiting at the control plane; past it,
/// new ones are answered `BUSY` (the control plane also bounds and
/// schedules per caller: `controlplane::runtime::fair_queue`). A group
/// commit's worth (64), so one connection's pipelined storage requests can
/// fill a group's one fsync.
pub const FORWARDED_PER_CONNECTION_MAX: usize = 64;

/// Request bytes an unadmitted connection may have held for after its
/// admission; past it, requests are refused with `NOT_ADMITTED`.
pub const HELD_BYTES_MAX: usize = 16 * 1024;

/// What a request needs from outside the connection.
pub struct StoqContext<'a> {
    pub stats: &'a Arc<StatsRegistry>,
    /// True while the handshake is not complete: data is 0-RTT.
    pub early: bool,
    /// The client certificate the handshake verified (leaf).
    pub peer: Option<&'a CertificateDer<'static>>,
    /// The peer is the operator (its certificate names it).
    pub operator: bool,
    /// The peer is a member of this server's cluster (a node certificate
    /// of this CA, checked like any peer's: revocation, validity).
    pub node: bool,
    /// Where authority requests go, if this server has an authority.
    pub authority: Option<AuthorityRoute<'a>>,
    /// The admission gate, when connections must be admitted.
    pub gate: Option<&'a dyn AdmissionGate>,
    /// The peer's address as the handshake validated it: what admission
    /// outcomes are scored against (not a later, unvalidated path).
    pub validated_remote: Option<std::net::SocketAddr>,
    pub worker: usize,
    pub conn_id: u64,
    /// The worker's clock for this event.
    pub now: Instant,
    /// The memory assets, when asset addressing is on.
    pub assets: Option<&'a Arc<crate::assets::memory::MemoryAssets>>,
}

/// How to forward an authority request of this connection.
#[derive(Clone, Copy)]
pub struct AuthorityRoute<'a> {
    pub port: &'a ControlPort,
    pub worker: usize,
    pub handle: usize,
    pub conn_id: u64,
}

impl AuthorityRoute<'_> {
    /// Where the answer to stream `id`'s request goes back to.
    fn ticket(&self, id: StreamId) -> Ticket {
        Ticket {
            handle: self.handle,
            conn_id: self.conn_id,
            stream: id,
        }
    }
}

impl StoqServer {
    pub fn on_readable(
        &mut self,
        conn: &mut Connection,
        id: Option<StreamId>,
        ctx: &StoqContext<'_>,
        stage: &mut AdmissionStage,
        counters: &mut Counters,
    ) {
        while let Some(id) = conn.streams().accept(Dir::Bi) {
            self.streams.insert(id, StoqStream::default());
            self.read(conn, id, ctx, stage, counters);
        }
        if let Some(id) = id {
            self.read(conn, id, ctx, stage, counters);
        }
    }

    /// Retry requests held back during 0-RTT, once the handshake completed.
    pub fn on_connected(
        &mut self,
        conn: &mut Connection,
        ctx: &StoqContext<'_>,
        stage: &mut AdmissionStage,
        counters: &mut Counters,
    ) {
        let ids: Vec<StreamId> = self.streams.keys().copied().collect();
        for id in ids {
            self.try_answer(conn, id, ctx, stage, counters);
        }
    }

    pub fn on_finished(&mut self, id: StreamId) {
        if let Some(stream) = self.streams.remove(&id)
            && stream.held
        {
            self.held_bytes = self.held_bytes.saturating_sub(stream.buf.len());
        }
    }

    fn read(
        &mut self,
        conn: &mut Connection,
        id: StreamId,
        ctx: &StoqContext<'_>,
        stage: &mut AdmissionStage,
        counters: &mut Counters,
    ) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        let state = super::read_bounded(
            conn,
            id,
            &mut stream.buf,
            HEADER_LEN + REQUEST_PAYLOAD_MAX,
            counters,
        );
        if state == super::ReadState::Reset {
            if stream.held {
                // A held request the client gave up on no longer counts
                // against what this connection may have held.
                self.held_bytes = self.held_bytes.saturating_sub(stream.buf.len());
            }
            self.streams.remove(&id);
            return;
        }
        stream.finished = state == super::ReadState::Finished;
        self.try_answer(conn, id, ctx, stage, counters);
    }

    fn try_answer(
        &mut self,
        conn: &mut Connection,
        id: StreamId,
        ctx: &StoqContext<'_>,
        stage: &mut AdmissionStage,
        counters: &mut Counters,
    ) {
        // What this connection's answers hold that the peer has not taken
        // yet, for an asset read to bound (a read answer can be 16 MiB).
        let queued = match self.streams.get(&id).and_then(|s| s.buf.get(1)) {
            Some(kind) if ASSET_KINDS.contains(kind) || *kind == ASSET_PROXY => {
                self.streams.values().map(|s| s.unsent.len()).sum()
            }
            _ => 0,
        };
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        if stream.answered {
            return;
        }
        // Parse once: past this match, the request is a kind and a payload
        // of the announced length; no code below indexes peer bytes.
        let kind = match framed(&stream.buf, stream.finished) {
            Framing::Incomplete => return,
            Framing::Bad(response) => {
                stream.answered = true;
                counters.stoq_requests += 1;
                Self::respond(stream, conn, id, response, counters);
                return;
            }
            Framing::Complete(kind) => kind,
        };
        let response = match kind {
            _ if ctx.gate.is_some() && matches!(stage, AdmissionStage::Handshaking) => {
                // Admission starts once the handshake completed.
                counters.zero_rtt_deferred += 1;
                return;
            }
            _ if matches!(stage, AdmissionStage::Refused) => return,
            KIND_ADMISSION_PARAMS | KIND_ADMISSION_SUBMIT => {
                if ctx.early {
                    counters.zero_rtt_deferred += 1;
                    return;
                }
                match admission_request(conn, kind, &stream.buf[HEADER_LEN..], ctx, stage, counters)
                {
                    Some(response) => Some(response),
                    None => {
                        // Refused: the connection is closed with the code.
                        stream.answered = true;
                        return;
                    }
                }
            }
            _ if stream.held => return,
            _ if matches!(stage, AdmissionStage::Pending(_))
                && kind != KIND_PLOT_REGISTER
                && self.held_bytes + stream.buf.len() <= HELD_BYTES_MAX =>
            {
                // Sent in 0-RTT, or right behind the bundle: answered once
                // the bundle verifies (or dropped with the connection at
                // the deadline).
                stream.held = true;
                self.held_bytes += stream.buf.len();
                return;
            }
            _ if matches!(stage, AdmissionStage::Pending(_)) && kind != KIND_PLOT_REGISTER => {
                Some(encode_error(
                    ErrorCode::NotAdmitted,
                    "this connection is not admitted yet: fetch the admission parameters and submit a proof bundle first",
                ))
            }
            // VM requests go the same way: their control plane's checks
            // first, then a VM thread.
            _ if AUTHORITY_KINDS.contains(&kind) || VM_KINDS.contains(&kind) => {
                if ctx.early {
                    // Not idempotent: wait for the handshake (and its
                    // verified certificate).
                    counters.zero_rtt_deferred += 1;
                    return;
                }
                match hand_over(&mut self.forwarded, kind, id, stream, ctx, counters) {
                    None => return,
                    refused => refused,
                }
            }
            _ if ctx.peer.is_none() && ctx.early => {
                // Whether this client has a certificate is known once the
                // handshake completes.
                counters.zero_rtt_deferred += 1;
                return;
            }
            _ if ctx.peer.is_none() => Some(encode_error(
                ErrorCode::CertificateRequired,
                "this request needs a client certificate; a connection without one may only enroll",
            )),
            _ if kind == ASSET_PROXY => {
                if ctx.early {
                    counters.zero_rtt_deferred += 1;
                    return;
                }
                let payload = &stream.buf[HEADER_LEN..];
                Some(match ctx.assets {
                    _ if !ctx.node => encode_error(
                        ErrorCode::CertificateRequired,
                        "only the cluster's members may send this (a node certificate)",
                    ),
                    None => {
                        encode_error(ErrorCode::AssetsOff, "this member serves no memory assets")
                    }
                    Some(assets) => crate::assets::serve::answer_proxied(assets, payload, queued),
                })
            }
            _ if ASSET_KINDS.contains(&kind) => {
                if ctx.early {
                    counters.zero_rtt_deferred += 1;
                    return;
                }
                let caller = crate::assets::serve::Caller {
                    assets: ctx.assets,
                    // Present: a request without one was answered above.
                    certificate: ctx.peer.map_or(&[][..], |peer| peer.as_ref()),
                    worker: ctx.worker,
                    queued_response_bytes: queued,
                };
                match self.assets.answer(kind, &stream.buf[HEADER_LEN..], &caller) {
                    Answer::Now(response) => Some(response),
                    Answer::Shared(pieces) => {
                        stream.answered = true;
                        counters.stoq_requests += 1;
                        Self::respond_in(stream, conn, id, pieces, counters);
                        return;
                    }
                    Answer::ControlPlane => {
                        if let Some(bytes) = read_storage(kind, &stream.buf[HEADER_LEN..], ctx) {
                            counters.storage_direct_reads += 1;
                            Some(encode(kind | RESPONSE_FLAG, &bytes))
                        } else {
                            match hand_over(&mut self.forwarded, kind, id, stream, ctx, counters) {
                                None => return,
                                refused => refused,
                            }
                        }
                    }
                    Answer::Proxy { locator, envelope } => {
                        let sent = proxy_over(
                            &mut self.forwarded,
                            (kind, locator, envelope),
                            id,
                            stream,
                            ctx,
                            counters,
                        );
                        match sent {
                            None => return,
                            refused => refused,
                        }
                    }
                }
            }
            _ => match Kind::from_u8(kind) {
                None => Some(encode_error(
                    ErrorCode::UnknownMessage,
                    &format!("unknown message kind {kind:#04x}"),
                )),
                Some(known) if ctx.early && !known.idempotent() => {
                    counters.zero_rtt_deferred += 1;
                    None
                }
                Some(known) => Some(answer(known, &stream.buf[HEADER_LEN..], ctx)),
            },
        };
        let Some(response) = response else { return };
        stream.answered = true;
        counters.stoq_requests += 1;
        let admitted_now = kind == KIND_ADMISSION_SUBMIT && stage.is_admitted();
        Self::respond(stream, conn, id, response, counters);
        if admitted_now {
            // Requests that arrived in 0-RTT or behind the bundle were held
            // for this.
            self.held_bytes = 0;
            for stream in self.streams.values_mut() {
                stream.held = false;
            }
            self.on_connected(conn, ctx, stage, counters);
        }
    }

    /// The control plane's answer to a forwarded request.
    pub fn deliver(
        &mut self,
        conn: &mut Connection,
        id: StreamId,
        response: Bytes,
        counters: &mut Counters,
    ) {
        self.forwarded = self.forwarded.saturating_sub(1);
        if let Some(stream) = self.streams.get_mut(&id) {
            Self::respond(stream, conn, id, response, counters);
        }
    }

    /// The peer's flow control took more: write what is left of a response.
    pub fn on_writable(&mut self, conn: &mut Connection, id: StreamId) {
        if let Some(stream) = self.streams.get_mut(&id) {
            stream.unsent.resume(conn, id);
        }
    }

    /// Send `response` on stream `id` and finish it.
    fn respond(
        stream: &mut StoqStream,
        conn: &mut Connection,
        id: StreamId,
        response: Bytes,
        counters: &mut Counters,
    ) {
        Self::respond_in(stream, conn, id, vec![response], counters);
    }

    /// Send a response made of `pieces` (the first holds its header) on
    /// stream `id` and finish it.
    fn respond_in(
        stream: &mut StoqStream,
        conn: &mut Connection,
        id: StreamId,
        pieces: Vec<Bytes>,
        counters: &mut Counters,
    ) {
        if pieces.first().and_then(|head| head.get(1)) == Some(&KIND_ERROR) {
            counters.stoq_errors += 1;
            // Stop the peer from sending more of a request we rejected.
            let _ = conn
                .recv_stream(id)
                .stop(VarInt::from_u32(STREAM_ERROR_BAD_REQUEST));
        }
        counters.stream_bytes_tx += pieces.iter().map(Bytes::len).sum::<usize>() as u64;
        // The request is answered: its bytes are not needed any more.
        stream.buf = Vec::new();
        stream.unsent = super::Unsent::send(conn, id, pieces);
    }
}

/// Answer an admission request; `None` when the bundle was refused and the
/// connection closed.
fn admission_request(
    conn: &mut Connection,
    kind: u8,
    payload: &[u8],
    ctx: &StoqContext<'_>,
    stage: &mut AdmissionStage,
    counters: &mut Counters,
) -> Option<Bytes> {
    let Some(gate) = ctx.gate else {
        return Some(encode_error(
            ErrorCode::AdmissionOff,
            "admission is off on this server; no bundle is needed",
        ));
    };
    let pending = match stage {
        AdmissionStage::Pending(pending) => pending,
        AdmissionStage::Anonymous => {
            return Some(encode_error(
                ErrorCode::CertificateRequired,
                "admission needs a client certificate; a connection without one may only enroll",
            ));
        }
        _ => {
            return Some(encode_error(
                ErrorCode::AdmissionState,
                "this connection is already admitted",
            ));
        }
    };
    if kind == KIND_ADMISSION_PARAMS {
        return Some(encode(
            KIND_ADMISSION_PARAMS | RESPONSE_FLAG,
            &pending.parameters(),
        ));
    }
    let verdict = match binding_of(conn) {
        Some(binding) => pending.verify(&binding, payload),
        None => Err(crate::admission::Refusal {
            code: crate::admission::CLOSE_ADMISSION_MALFORMED,
            reason: "no TLS exporter on this connection".into(),
        }),
    };
    match verdict {
        Ok(admitted) => {
            counters.admitted += 1;
            gate.report(AdmissionEvent::Admitted {
                worker: ctx.worker,
                conn_id: ctx.conn_id,
                source: ctx
                    .validated_remote
                    .unwrap_or_else(|| conn.remote_address()),
                owner: admitted.identity,
            });
            *stage = AdmissionStage::Admitted(Some(admitted.identity));
            Some(encode(
                KIND_ADMISSION_SUBMIT | RESPONSE_FLAG,
                &admitted.reply,
            ))
        }
        Err(refusal) => {
            counters.admission_refused += 1;
            gate.report(AdmissionEvent::Failed {
                source: ctx
                    .validated_remote
                    .unwrap_or_else(|| conn.remote_address()),
                identity: Some(pending.identity()),
                code: refusal.code,
            });
            *stage = AdmissionStage::Refused;
            conn.close(
                ctx.now,
                VarInt::from_u32(refusal.code),
                Bytes::from(truncate_reason(refusal.reason)),
            );
            None
        }
    }
}

/// A close reason cut to [`crate::admission::REASON_LEN_MAX`] bytes at a
/// character boundary.
pub(crate) fn truncate_reason(mut reason: String) -> Vec<u8> {
    let mut end = reason.len().min(crate::admission::REASON_LEN_MAX);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason.truncate(end);
    reason.into_bytes()
}

/// Where a request stream's bytes stand.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    /// More bytes may come.
    Incomplete,
    /// One whole message of this kind: `buf[HEADER_LEN..]` is its payload.
    Complete(u8),
    /// Never a request: the error response to answer with.
    Bad(Bytes),
}

/// Frame a request from the bytes read so far; `finished` when the client
/// ended its side (an incomplete message then stays incomplete).
fn framed(buf: &[u8], finished: bool) -> Framing {
    let bad = |message: &str| Framing::Bad(encode_error(ErrorCode::Malformed, message));
    match header_payload_len(buf, REQUEST_PAYLOAD_MAX) {
        Err(DecodeError::Incomplete) if finished => {
            bad("the stream ended inside the message header")
        }
        Err(DecodeError::Incomplete) => Framing::Incomplete,
        Err(e) => Framing::Bad(encode_error(e.code(), &e.to_string())),
        Ok(len) => match buf.len().cmp(&(HEADER_LEN + len)) {
            std::cmp::Ordering::Less if finished => {
                bad("the stream ended before the announced payload length")
            }
            std::cmp::Ordering::Less => Framing::Incomplete,
            std::cmp::Ordering::Greater => bad(&DecodeError::TrailingBytes.to_string()),
            // header_payload_len checked HEADER_LEN bytes are there.
            std::cmp::Ordering::Equal => Framing::Complete(buf[1]),
        },
    }
}

/// Forward a request to the control plane within the connection's bound
/// on requests waiting there: `None` once forwarded, else the error
/// response to send.
fn hand_over(
    forwarded: &mut usize,
    kind: u8,
    id: StreamId,
    stream: &mut StoqStream,
    ctx: &StoqContext<'_>,
    counters: &mut Counters,
) -> Option<Bytes> {
    if *forwarded >= FORWARDED_PER_CONNECTION_MAX {
        return Some(too_many_waiting());
    }
    match forward(kind, id, stream, ctx) {
        Ok(direct) => {
            counters.vm_direct_calls += u64::from(direct);
            waiting(forwarded, stream, counters);
            None
        }
        Err(response) => Some(response),
    }
}

fn too_many_waiting() -> Bytes {
    encode_error(
        ErrorCode::Busy,
        "too many requests of this connection are waiting; retry when one is answered",
    )
}

/// `stream`'s request went (with a copy of its payload) to be answered
/// later: one more of the connection's waiting.
fn waiting(forwarded: &mut usize, stream: &mut StoqStream, counters: &mut Counters) {
    stream.answered = true;
    stream.buf = Vec::new();
    *forwarded += 1;
    counters.stoq_requests += 1;
}

/// Send a request for another cluster member's memory asset to that
/// member (`ASSET_PROXY`, `envelope`) through the proxy the control plane
/// plugged into the port, from this thread, within the connection's bound
/// on requests waiting: `None` once sent, else the response to send.
fn proxy_over(
    forwarded: &mut usize,
    (kind, locator, envelope): (u8, crate::assets::address::Locator, Vec<u8>),
    id: StreamId,
    stream: &mut StoqStream,
    ctx: &StoqContext<'_>,
    counters: &mut Counters,
) -> Option<Bytes> {
    let no_proxy = || {
        encode_error(
            ErrorCode::AssetElsewhere,
            "the asset is another node's, and this server proxies to no other",
        )
    };
    let Some(route) = ctx.authority else {
        return Some(no_proxy());
    };
    if *forwarded >= FORWARDED_PER_CONNECTION_MAX {
        return Some(too_many_waiting());
    }
    let request = crate::control::ProxiedRequest {
        worker: route.worker,
        ticket: route.ticket(id),
        kind,
        locator,
        envelope: Bytes::from(envelope),
        answer: None,
    };
    match route.port.proxy_asset(request) {
        None => Some(no_proxy()),
        Some(Ok(())) => {
            waiting(forwarded, stream, counters);
            None
        }
        Some(Err((code, message))) => Some(encode_error_code(code, &message)),
    }
}

/// A storage read answered on this thread, from the store, on the
/// control plane's earlier check of the same caller and asset
/// ([`ControlPort::read_storage`]); None when the control plane answers.
fn read_storage(kind: u8, payload: &[u8], ctx: &StoqContext<'_>) -> Option<Vec<u8>> {
    if kind != super::stoq_registry::ASSET_READ {
        return None;
    }
    let certificate = ctx.peer?;
    ctx.authority?
        .port
        .read_storage(certificate.as_ref(), payload)
}

/// Forward an authority request (true: a VM call went to the VM threads
/// directly); on refusal, the error response to send.
fn forward(
    kind: u8,
    id: StreamId,
    stream: &StoqStream,
    ctx: &StoqContext<'_>,
) -> Result<bool, Bytes> {
    let Some(route) = ctx.authority else {
        return Err(encode_error(
            ErrorCode::UnknownMessage,
            &format!(
                "message kind {kind:#04x} needs the authority, which this server does not run"
            ),
        ));
    };
    let anyone = super::stoq_registry::spec(kind)
        .is_some_and(|spec| spec.access == super::stoq_registry::Access::Anyone);
    if ctx.peer.is_none() && !anyone {
        return Err(encode_error(
            ErrorCode::CertificateRequired,
            "this request needs a client certificate; a connection without one may only enroll",
        ));
    }
    let request = Forwarded {
        worker: route.worker,
        ticket: route.ticket(id),
        kind,
        payload: Bytes::copy_from_slice(&stream.buf[HEADER_LEN..]),
        peer: ctx.peer.cloned(),
        vm_owner: None,
    };
    let sent = if kind == super::stoq_registry::VM_CALL {
        route.port.call_vm(request)
    } else {
        route.port.forward(request).map(|()| false)
    };
    sent.map_err(|_| encode_error(ErrorCode::Busy, "the authority is busy; retry in a moment"))
}

fn answer(kind: Kind, payload: &[u8], ctx: &StoqContext<'_>) -> Bytes {
    match kind {
        Kind::Ping if payload.len() > PING_PAYLOAD_MAX => encode_error(
            ErrorCode::MessageTooLarge,
            &format!(
                "ping payload of {} bytes exceeds {PING_PAYLOAD_MAX}",
                payload.len()
            ),
        ),
        Kind::Ping => encode(Kind::Ping as u8 | RESPONSE_FLAG, payload),
        Kind::Stats => {
            let snapshot = ctx.stats.snapshot();
            let snapshot = if ctx.operator {
                snapshot
            } else {
                snapshot.without_operator_lists()
            };
            let body = serde_json::to_vec(&snapshot).expect("counters serialize");
            encode(Kind::Stats as u8 | RESPONSE_FLAG, &body)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let bytes = encode(Kind::Ping as u8, b"hello");
        let message = decode(&bytes, REQUEST_PAYLOAD_MAX).unwrap();
        assert_eq!(
            message,
            Message {
                kind: 1,
                payload: Bytes::from_static(b"hello")
            }
        );
    }

    #[test]
    fn bad_headers_are_refused() {
        let mut bytes = encode(Kind::Ping as u8, b"x").to_vec();
        assert_eq!(decode(&bytes[..5], 10), Err(DecodeError::Incomplete));
        bytes[0] = 9;
        assert_eq!(decode(&bytes, 10), Err(DecodeError::UnsupportedVersion(9)));
        bytes[0] = VERSION;
        bytes[2] = 1;
        assert_eq!(decode(&bytes, 10), Err(DecodeError::Malformed));
        let big = encode(Kind::Ping as u8, &[0u8; 20]);
        assert_eq!(
            decode(&big, 10),
            Err(DecodeError::TooLarge { len: 20, max: 10 })
        );
        let mut trailing = encode(Kind::Ping as u8, b"x").to_vec();
        trailing.push(0);
        assert_eq!(decode(&trailing, 10), Err(DecodeError::TrailingBytes));
    }

    #[test]
    fn every_prefix_of_a_request_frames_without_panicking() {
        let message = encode(Kind::Ping as u8, b"hello");
        for cut in 0..message.len() {
            let prefix = &message[..cut];
            assert_eq!(framed(prefix, false), Framing::Incomplete, "cut {cut}");
            // An empty or truncated stream that the client finished gets an
            // error response (the empty case once panicked the worker).
            match framed(prefix, true) {
                Framing::Bad(response) => {
                    let error = decode(&response, RESPONSE_PAYLOAD_MAX).unwrap();
                    assert_eq!(error.kind, KIND_ERROR);
                    let (code, _) = decode_error_payload(&error.payload);
                    assert_eq!(code, ErrorCode::Malformed as u16, "cut {cut}");
                }
                other => panic!("cut {cut}: {other:?}"),
            }
        }
        assert_eq!(framed(&message, true), Framing::Complete(Kind::Ping as u8));
        let mut trailing = message.to_vec();
        trailing.push(0);
        assert!(matches!(framed(&trailing, false), Framing::Bad(_)));
    }
}
