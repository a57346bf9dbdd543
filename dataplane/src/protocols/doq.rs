//! DNS over QUIC (RFC 9250, ALPN `doq`): one query per bidirectional
//! stream, a 2-byte length prefix, message ID 0. Answers come from an
//! immutable [`Zone`] snapshot, so a query never leaves its worker.
//!
//! The zone is authoritative and IPv6-only: SOA and NS at the apex, AAAA
//! for each name, and a TLSA `3 1 1` (DANE-EE, SPKI, SHA-256) pin at
//! `_PORT._udp.NAME`. A queries get NOERROR with no data; unknown names in the
//! zone get NXDOMAIN with the SOA; names outside it get REFUSED, or, where a
//! resolver is plugged into the control port (phase0's system resolver),
//! are handed to it and answered when it answers.

use super::stoq::AuthorityRoute;
use crate::control::{DnsQuery, Ticket};
use crate::stats::Counters;
use bytes::{BufMut, Bytes, BytesMut};
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::tlsa::{CertUsage, Matching, Selector};
use hickory_proto::rr::rdata::{AAAA, NS, SOA, TLSA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use quinn_proto::{Connection, Dir, StreamId, VarInt};
use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::sync::Arc;
use std::time::Instant;

/// RFC 9250 §4.3: error codes.
pub const DOQ_NO_ERROR: u32 = 0x0;
pub const DOQ_PROTOCOL_ERROR: u32 = 0x2;
/// RFC 9250 §4.3: DOQ_EXCESSIVE_LOAD.
pub const DOQ_EXCESSIVE_LOAD: u32 = 0x4;
/// Bytes of unanswered (incomplete) queries one connection may have the
/// server hold: two maximum-size messages. Honest queries are a few hundred
/// bytes; past it the connection is closed with DOQ_EXCESSIVE_LOAD.
pub const PENDING_QUERY_BYTES_MAX: usize = 2 * (2 + MESSAGE_MAX);
/// Bytes of answers one connection may leave unread: written, but beyond
/// what the peer's flow control took. A peer that never reads, or grants
/// a few bytes at a time, holds at most this much of the server's memory
/// beside the untrusted send window; past it the connection is closed with
/// DOQ_EXCESSIVE_LOAD. Eight maximum-size answers (those come from
/// upstream over TCP): an honest client with 64 large answers in flight
/// and a small window is not closed for one round trip's backlog.
pub const UNREAD_ANSWER_BYTES_MAX: usize = 8 * (2 + MESSAGE_MAX);
/// RFC 9250 §4.3: DOQ_INTERNAL_ERROR.
pub const DOQ_INTERNAL_ERROR: u32 = 0x1;
/// Largest DNS message (the 2-byte length prefix).
pub const MESSAGE_MAX: usize = u16::MAX as usize;
/// TTL of every record (seconds).
pub const TTL: u32 = 60;

#[derive(Debug, thiserror::Error)]
pub enum ZoneError {
    #[error("`{name}` is not a valid DNS name: {detail}")]
    BadName { name: String, detail: String },
}

/// The records of one name.
#[derive(Debug, Default, Clone)]
struct NameRecords {
    aaaa: Vec<Record>,
    tlsa: Vec<Record>,
    /// The `_PORT._udp` names this (published) name's pins made: what a
    /// change of the name removes with it.
    services: Vec<Name>,
}

/// Shards of a zone's names (by a hash of the name). A change copies the
/// shards its names fall in (their names and pointers to the records,
/// which it shares) and shares the other shards with the zone before it,
/// so publishing a change costs the shard table and a few shards, not
/// the zone: about 128 names a shard for the largest zone the control
/// plane allows (65 536 names, each with its pins' name).
const NAME_SHARDS: usize = 1024;

type Shard = HashMap<Name, Arc<NameRecords>>;

/// An immutable authoritative zone.
#[derive(Debug, Clone)]
pub struct Zone {
    apex: Name,
    /// The SOA MNAME and the NS.
    primary: Name,
    soa: Record,
    ns: Record,
    shards: Vec<Arc<Shard>>,
    /// Which shard a name is in: seeded per zone built whole, so no one
    /// can choose names that all fall in one shard.
    sharding: std::collections::hash_map::RandomState,
}

fn parse_name(name: &str) -> Result<Name, ZoneError> {
    let fqdn = if name.ends_with('.') {
        name.to_owned()
    } else {
        format!("{name}.")
    };
    Name::from_ascii(&fqdn)
        .map(|n| n.to_lowercase())
        .map_err(|e| ZoneError::BadName {
            name: name.to_owned(),
            detail: e.to_string(),
        })
}

/// The zone's SOA record: `primary` the MNAME, serial `serial`.
fn soa_record(apex: &Name, primary: &Name, serial: u32) -> Result<Record, ZoneError> {
    let soa = SOA::new(
        primary.clone(),
        parse_name(&format!("hostmaster.{apex}"))?,
        serial,
        3600,
        600,
        86400,
        TTL,
    );
    Ok(Record::from_rdata(apex.clone(), TTL, RData::SOA(soa)))
}

/// Check the apex and the server's name as the zone will need them.
pub fn validate_names(apex: &str, name: &str) -> Result<(), ZoneError> {
    let apex = parse_name(apex)?;
    if !name.ends_with('.') {
        parse_name(&format!("{name}.{apex}"))?;
    } else if !apex.zone_of(&parse_name(name)?) {
        return Err(ZoneError::BadName {
            name: name.to_owned(),
            detail: format!("not inside the zone {apex}"),
        });
    }
    Ok(())
}

impl Zone {
    /// The zone as the control plane publishes it: apex `apex`, primary
    /// server `primary` (the SOA MNAME and the NS), SOA serial `serial`,
    /// and every name's AAAA addresses and TLSA `3 1 1` pins by UDP port.
    /// An error is the apex's or the primary's; a name that is not a DNS
    /// name (or whose pin's name is not) is left out and logged.
    pub fn from_records(
        apex: &str,
        primary: &str,
        serial: u32,
        names: &[PublishedName],
    ) -> Result<Zone, ZoneError> {
        let apex = parse_name(apex)?;
        let primary = if primary.ends_with('.') {
            parse_name(primary)?
        } else {
            parse_name(&format!("{primary}.{apex}"))?
        };
        let mut zone = Zone {
            soa: soa_record(&apex, &primary, serial)?,
            ns: Record::from_rdata(apex.clone(), TTL, RData::NS(NS(primary.clone()))),
            primary,
            apex,
            // One empty shard, shared until a name lands in each.
            shards: std::iter::repeat_n(Arc::new(Shard::new()), NAME_SHARDS).collect(),
            sharding: std::collections::hash_map::RandomState::new(),
        };
        for published in names {
            zone.publish(published);
        }
        Ok(zone)
    }

    /// This zone with `changes` made and SOA serial `serial`: each is a
    /// published name (absolute) and its records, or `None` where the name
    /// is gone. A name's records replace what it had, its pins' `_PORT._udp`
    /// names included. The result answers as [`Self::from_records`] over
    /// the names after the changes would; only the shards the changed
    /// names fall in are copied.
    pub fn with_changes(
        &self,
        serial: u32,
        changes: &[(String, Option<PublishedName>)],
    ) -> Result<Zone, ZoneError> {
        let mut zone = self.clone();
        zone.soa = soa_record(&zone.apex, &zone.primary, serial)?;
        for (name, records) in changes {
            // A name that does not parse was never published.
            if let Ok(name) = parse_name(name)
                && let Some(old) = zone.shard_mut(&name).remove(&name)
            {
                for service in &old.services {
                    zone.shard_mut(service).remove(service);
                }
            }
            if let Some(records) = records {
                zone.publish(records);
            }
        }
        Ok(zone)
    }

    /// Add `published`'s records: its AAAA at its name, each pin at
    /// `_PORT._udp.NAME`. A name that is not a DNS name here (the control
    /// plane checks names, but a pin's name is longer than its name) is
    /// left out whole and logged, so one name cannot stop every other
    /// change from being published.
    fn publish(&mut self, published: &PublishedName) {
        let parsed = parse_name(&published.name).and_then(|name| {
            let services = published
                .tlsa
                .iter()
                .map(|(port, _)| parse_name(&format!("_{port}._udp.{name}")))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((name, services))
        });
        let (name, services) = match parsed {
            Ok(parsed) => parsed,
            Err(e) => {
                tracing::warn!(error = %e, "a name of the zone is left out of its answers");
                return;
            }
        };
        let mut made = Vec::new();
        for ((_, pin), service) in published.tlsa.iter().zip(services) {
            let tlsa = TLSA::new(
                CertUsage::DaneEe,
                Selector::Spki,
                Matching::Sha256,
                pin.to_vec(),
            );
            let record = Record::from_rdata(service.clone(), TTL, RData::TLSA(tlsa));
            Arc::make_mut(self.shard_mut(&service).entry(service.clone()).or_default())
                .tlsa
                .push(record);
            if !made.contains(&service) {
                made.push(service);
            }
        }
        let records = Arc::make_mut(self.shard_mut(&name).entry(name.clone()).or_default());
        for address in &published.aaaa {
            records.aaaa.push(Record::from_rdata(
                name.clone(),
                TTL,
                RData::AAAA(AAAA::from(*address)),
            ));
        }
        records.services.extend(made);
    }

    fn shard_of(&self, name: &Name) -> usize {
        use std::hash::BuildHasher;
        (self.sharding.hash_one(name) % NAME_SHARDS as u64) as usize
    }

    fn shard_mut(&mut self, name: &Name) -> &mut Shard {
        let at = self.shard_of(name);
        Arc::make_mut(&mut self.shards[at])
    }

    fn records(&self, name: &Name) -> Option<&NameRecords> {
        self.shards[self.shard_of(name)].get(name).map(|r| &**r)
    }

    pub fn apex(&self) -> &Name {
        &self.apex
    }
}

/// One name's records in the form the control plane publishes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedName {
    /// Fully qualified, inside the apex.
    pub name: String,
    pub aaaa: Vec<Ipv6Addr>,
    /// (UDP port, SHA-256 of the SubjectPublicKeyInfo).
    pub tlsa: Vec<(u16, [u8; 32])>,
}

/// The zone the workers answer from, swapped by the control plane after
/// every change for a zone that shares the unchanged shards of the one
/// before ([`Zone::with_changes`]): a query reads one snapshot (an atomic
/// load).
pub struct ZoneStore {
    current: arc_swap::ArcSwap<Zone>,
}

impl ZoneStore {
    pub fn new(zone: Zone) -> Arc<Self> {
        Arc::new(Self {
            current: arc_swap::ArcSwap::from_pointee(zone),
        })
    }

    pub fn load(&self) -> Arc<Zone> {
        self.current.load_full()
    }

    pub fn swap(&self, zone: Zone) {
        self.current.store(Arc::new(zone));
    }
}

impl std::fmt::Debug for ZoneStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZoneStore")
            .field("apex", &self.current.load().apex)
            .finish()
    }
}

/// What to do with one query.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Send this DNS message.
    Response(Vec<u8>),
    /// RFC 9250 §4.2.1: a non-zero message ID is a protocol error; close the
    /// connection with DOQ_PROTOCOL_ERROR.
    ProtocolError(&'static str),
}

/// Answer one DNS query message from `zone` (DNS over QUIC rules).
pub fn answer(zone: &Zone, query: &[u8]) -> Answer {
    answer_with(zone, query, Transport::Quic)
}

/// Where a query came from: the rules on message IDs and sizes differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// RFC 9250: ID 0, messages up to 65535 bytes.
    Quic,
    /// Plain UDP (the legacy gateway): the query's ID is echoed, answers
    /// over 512 bytes are truncated with TC set (RFC 1035 §4.2.1).
    Udp,
}

/// The largest plain-UDP answer without EDNS (RFC 1035 §4.2.1).
pub const UDP_ANSWER_MAX: usize = 512;

/// Answer one DNS query arriving over `transport`.
pub fn answer_with(zone: &Zone, query: &[u8], transport: Transport) -> Answer {
    match decide(zone, query, transport, false) {
        Decision::Answer(answer) => answer,
        Decision::Forward => refuse(query),
    }
}

/// An answer, or: the question is for a name outside the zone and goes to
/// the resolver.
enum Decision {
    Answer(Answer),
    Forward,
}

fn decide(zone: &Zone, query: &[u8], transport: Transport, forward: bool) -> Decision {
    let request = match Message::from_vec(query) {
        Ok(request) => request,
        Err(_) => {
            // The ID is the first two bytes, if there are two.
            let id = match (transport, query) {
                (Transport::Udp, [hi, lo, ..]) => u16::from_be_bytes([*hi, *lo]),
                _ => 0,
            };
            return Decision::Answer(respond(Message::error_msg(
                id,
                OpCode::Query,
                ResponseCode::FormErr,
            )));
        }
    };
    let id = match transport {
        Transport::Quic if request.metadata.id != 0 => {
            return Decision::Answer(Answer::ProtocolError(
                "DNS message ID must be 0 over QUIC (RFC 9250 §4.2.1)",
            ));
        }
        Transport::Quic => 0,
        Transport::Udp => request.metadata.id,
    };
    if forward && outside(zone, &request) {
        return Decision::Forward;
    }
    let answer = answer_request(zone, &request, id);
    Decision::Answer(match (transport, answer) {
        (Transport::Udp, Answer::Response(bytes)) if bytes.len() > UDP_ANSWER_MAX => {
            let mut truncated = Message::response(id, request.metadata.op_code);
            truncated.queries = request.queries.clone();
            truncated.metadata.truncation = true;
            truncated.metadata.authoritative = true;
            respond(truncated)
        }
        (_, answer) => answer,
    })
}

/// A well-formed standard query with one IN question for a name outside
/// the zone: what a resolver may answer instead of REFUSED.
fn outside(zone: &Zone, request: &Message) -> bool {
    match request.queries.as_slice() {
        [question] => {
            request.metadata.message_type == MessageType::Query
                && request.metadata.op_code == OpCode::Query
                && question.query_class() == DNSClass::IN
                && !zone.apex.zone_of(&question.name().to_lowercase())
        }
        _ => false,
    }
}

fn answer_request(zone: &Zone, request: &Message, id: u16) -> Answer {
    let mut response = Message::response(id, request.metadata.op_code);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.queries = request.queries.clone();
    if request.metadata.message_type != MessageType::Query
        || request.metadata.op_code != OpCode::Query
    {
        response.metadata.response_code = ResponseCode::NotImp;
        return respond(response);
    }
    let [question] = request.queries.as_slice() else {
        response.metadata.response_code = ResponseCode::FormErr;
        return respond(response);
    };
    let name = question.name().to_lowercase();
    if question.query_class() != DNSClass::IN || !zone.apex.zone_of(&name) {
        response.metadata.response_code = ResponseCode::Refused;
        return respond(response);
    }
    response.metadata.authoritative = true;
    let answers: Vec<Record> = if name == zone.apex {
        // A cluster's apex also has its members' AAAA and TLSA records.
        let records = zone.records(&name);
        match question.query_type() {
            RecordType::SOA => vec![zone.soa.clone()],
            RecordType::NS => vec![zone.ns.clone()],
            RecordType::AAAA => records.map(|r| r.aaaa.clone()).unwrap_or_default(),
            _ => Vec::new(),
        }
    } else if let Some(records) = zone.records(&name) {
        match question.query_type() {
            RecordType::AAAA => records.aaaa.clone(),
            RecordType::TLSA => records.tlsa.clone(),
            _ => Vec::new(),
        }
    } else {
        response.metadata.response_code = ResponseCode::NXDomain;
        Vec::new()
    };
    if answers.is_empty() {
        // RFC 2308: negative answers carry the SOA.
        response.authorities.push(zone.soa.clone());
    }
    response.answers = answers;
    respond(response)
}

/// SERVFAIL for `query` (the resolver could not take it), ID 0.
pub fn server_failure(query: &[u8]) -> Answer {
    let mut response = Message::error_msg(0, OpCode::Query, ResponseCode::ServFail);
    if let Ok(request) = Message::from_vec(query) {
        response.queries = request.queries;
        response.metadata.recursion_desired = request.metadata.recursion_desired;
    }
    respond(response)
}

/// REFUSED for every query (no zone configured).
pub fn refuse(query: &[u8]) -> Answer {
    match Message::from_vec(query) {
        Ok(request) if request.metadata.id != 0 => {
            Answer::ProtocolError("DNS message ID must be 0 over QUIC (RFC 9250 §4.2.1)")
        }
        Ok(request) => {
            let mut response = Message::error_msg(0, OpCode::Query, ResponseCode::Refused);
            response.queries = request.queries;
            respond(response)
        }
        Err(_) => respond(Message::error_msg(0, OpCode::Query, ResponseCode::FormErr)),
    }
}

fn respond(message: Message) -> Answer {
    match message.to_vec() {
        Ok(bytes) => Answer::Response(bytes),
        Err(_) => Answer::ProtocolError("the answer could not be encoded"),
    }
}

/// Close the connection with a DoQ error code (RFC 9250 §4.3), counted.
fn close_with(
    conn: &mut Connection,
    now: Instant,
    code: u32,
    reason: &'static [u8],
    counters: &mut Counters,
) {
    counters.doq_errors += 1;
    conn.close(now, VarInt::from_u32(code), Bytes::from_static(reason));
}

#[derive(Debug, Default)]
struct DoqStream {
    buf: Vec<u8>,
    answered: bool,
    /// The part of the answer the peer's flow control has not taken yet.
    unsent: super::Unsent,
}

/// Server side of a `doq` connection.
#[derive(Debug, Default)]
pub struct DoqServer {
    streams: HashMap<StreamId, DoqStream>,
    /// A query was answered since [`DoqServer::take_answered`].
    answered_since: bool,
}

impl DoqServer {
    /// Read what arrived; `resolver` is where queries for names outside
    /// the zone go (None: they are REFUSED).
    pub fn on_readable(
        &mut self,
        conn: &mut Connection,
        id: Option<StreamId>,
        zone: Option<&Arc<Zone>>,
        resolver: Option<&AuthorityRoute<'_>>,
        now: Instant,
        counters: &mut Counters,
    ) {
        while let Some(id) = conn.streams().accept(Dir::Bi) {
            self.streams.insert(id, DoqStream::default());
            self.read(conn, id, zone, resolver, now, counters);
        }
        if let Some(id) = id {
            self.read(conn, id, zone, resolver, now, counters);
        }
    }

    /// The resolver's answer to the query on `id`: write it (a stream the
    /// peer gave up on meanwhile is gone, and so is the answer).
    pub fn deliver(
        &mut self,
        conn: &mut Connection,
        id: StreamId,
        message: &[u8],
        now: Instant,
        counters: &mut Counters,
    ) {
        if let Some(stream) = self.streams.get_mut(&id) {
            write_answer(
                conn,
                id,
                stream,
                message,
                &mut self.answered_since,
                counters,
            );
            self.bound_unread(conn, now, counters);
        }
    }

    /// Close a connection whose peer leaves more than
    /// [`UNREAD_ANSWER_BYTES_MAX`] of answers unread.
    fn bound_unread(&self, conn: &mut Connection, now: Instant, counters: &mut Counters) {
        let unread: usize = self.streams.values().map(|s| s.unsent.len()).sum();
        if unread > UNREAD_ANSWER_BYTES_MAX && !conn.is_closed() {
            close_with(
                conn,
                now,
                DOQ_EXCESSIVE_LOAD,
                b"answers left unread",
                counters,
            );
        }
    }

    pub fn on_finished(&mut self, id: StreamId) {
        self.streams.remove(&id);
    }

    /// The peer's flow control took more: write what is left of an answer.
    pub fn on_writable(&mut self, conn: &mut Connection, id: StreamId) {
        if let Some(stream) = self.streams.get_mut(&id) {
            stream.unsent.resume(conn, id);
        }
    }

    /// Bytes held for queries not answered yet, over all streams (at most
    /// the transport's stream limit of them).
    fn pending_query_bytes(&self) -> usize {
        self.streams
            .values()
            .filter(|s| !s.answered)
            .map(|s| s.buf.len())
            .sum()
    }

    /// Whether a query was answered on this connection since the last call.
    pub fn take_answered(&mut self) -> bool {
        std::mem::take(&mut self.answered_since)
    }

    fn read(
        &mut self,
        conn: &mut Connection,
        id: StreamId,
        zone: Option<&Arc<Zone>>,
        resolver: Option<&AuthorityRoute<'_>>,
        now: Instant,
        counters: &mut Counters,
    ) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        let state = super::read_bounded(conn, id, &mut stream.buf, 2 + MESSAGE_MAX, counters);
        if state == super::ReadState::Reset {
            self.streams.remove(&id);
            return;
        }
        let stream = if self.pending_query_bytes() > PENDING_QUERY_BYTES_MAX {
            close_with(
                conn,
                now,
                DOQ_EXCESSIVE_LOAD,
                b"too many unfinished queries",
                counters,
            );
            return;
        } else {
            match self.streams.get_mut(&id) {
                Some(stream) => stream,
                None => return,
            }
        };
        let answered = &mut self.answered_since;
        if stream.answered {
            // The query's bytes were released with its answer; any byte
            // after it is a second message on the stream (RFC 9250 §4.2).
            if !stream.buf.is_empty() {
                close_with(
                    conn,
                    now,
                    DOQ_PROTOCOL_ERROR,
                    b"one DNS message per stream",
                    counters,
                );
            }
            return;
        }
        let whole = match stream.buf.as_slice() {
            [hi, lo, ..] => 2 + usize::from(u16::from_be_bytes([*hi, *lo])),
            _ => usize::MAX,
        };
        if state == super::ReadState::Finished && !stream.answered && stream.buf.len() < whole {
            // RFC 9250 §4.3.3: the stream ended inside a message.
            close_with(
                conn,
                now,
                DOQ_PROTOCOL_ERROR,
                b"stream ended before its DNS message was complete",
                counters,
            );
            return;
        }
        if stream.buf.len() < 2 {
            return;
        }
        if stream.buf.len() > whole {
            // RFC 9250 §4.2: one query per stream; anything more is a
            // protocol error for the connection. (A later event with no new
            // bytes, such as the FIN arriving on its own, is not.)
            close_with(
                conn,
                now,
                DOQ_PROTOCOL_ERROR,
                b"one DNS message per stream",
                counters,
            );
            return;
        }
        if stream.buf.len() < whole || stream.answered {
            return;
        }
        stream.answered = true;
        let query = std::mem::take(&mut stream.buf);
        let query = &query[2..whole];
        let result = match (zone, resolver) {
            (Some(zone), Some(route)) => match decide(zone, query, Transport::Quic, true) {
                Decision::Answer(answer) => answer,
                Decision::Forward => {
                    let handed = DnsQuery {
                        worker: route.worker,
                        ticket: Ticket {
                            handle: route.handle,
                            conn_id: route.conn_id,
                            stream: id,
                        },
                        source: conn.remote_address().ip(),
                        message: query.to_vec(),
                    };
                    match route.port.resolve(handed) {
                        Ok(()) => {
                            counters.doq_forwarded += 1;
                            // Asked: the connection is not idle while the
                            // answer is on its way.
                            *answered = true;
                            return;
                        }
                        Err(_) => server_failure(query),
                    }
                }
            },
            (Some(zone), None) => answer(zone, query),
            (None, _) => refuse(query),
        };
        match result {
            Answer::Response(message) => {
                write_answer(conn, id, stream, &message, answered, counters);
                self.bound_unread(conn, now, counters);
            }
            Answer::ProtocolError(reason) => {
                close_with(conn, now, DOQ_PROTOCOL_ERROR, reason.as_bytes(), counters)
            }
        }
    }
}

/// Write `message` on `id` with its length prefix and finish the stream.
fn write_answer(
    conn: &mut Connection,
    id: StreamId,
    stream: &mut DoqStream,
    message: &[u8],
    answered: &mut bool,
    counters: &mut Counters,
) {
    // RFC 9250 §4.2: a two-byte length prefix; answers are built far below
    // it, and one that is not is not sent cut.
    let Ok(len) = u16::try_from(message.len()) else {
        counters.doq_errors += 1;
        let _ = conn
            .send_stream(id)
            .reset(VarInt::from_u32(DOQ_INTERNAL_ERROR));
        return;
    };
    counters.doq_queries += 1;
    *answered = true;
    let mut framed = BytesMut::with_capacity(2 + message.len());
    framed.put_u16(len);
    framed.put_slice(message);
    counters.stream_bytes_tx += framed.len() as u64;
    stream.unsent = super::Unsent::send(conn, id, vec![framed.freeze()]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;

    fn zone() -> Zone {
        Zone::from_records(
            "internet2.test",
            "node1",
            1,
            &[PublishedName {
                name: "node1.internet2.test.".into(),
                aaaa: vec!["fd71:7e57::1".parse().unwrap()],
                tlsa: vec![(4433, [7; 32])],
            }],
        )
        .unwrap()
    }

    /// Every name a zone answers for with its records (and the pins'
    /// names it made), sorted: what two zones must agree on.
    fn dump(zone: &Zone) -> std::collections::BTreeMap<String, [Vec<String>; 3]> {
        let sorted = |items: Vec<String>| {
            let mut items = items;
            items.sort();
            items
        };
        zone.shards
            .iter()
            .flat_map(|shard| shard.iter())
            .map(|(name, r)| {
                let text = |records: &[Record]| records.iter().map(|r| r.to_string()).collect();
                (
                    name.to_string(),
                    [
                        sorted(text(&r.aaaa)),
                        sorted(text(&r.tlsa)),
                        sorted(r.services.iter().map(|n| n.to_string()).collect()),
                    ],
                )
            })
            .collect()
    }

    #[test]
    fn a_zone_changed_in_place_answers_as_one_built_from_its_names() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |below: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % below
        };
        let mut names = std::collections::BTreeMap::new();
        let mut zone = Zone::from_records("internet2.test", "node1", 0, &[]).unwrap();
        for serial in 1..400u32 {
            let mut changes = Vec::new();
            for _ in 0..=next(4) {
                let name = format!("n{}.internet2.test.", next(40));
                let records = (next(4) != 0).then(|| PublishedName {
                    name: name.clone(),
                    aaaa: (0..next(3))
                        .map(|i| format!("fd71:7e57::{:x}", next(9) + i).parse().unwrap())
                        .collect(),
                    tlsa: (0..next(3))
                        .map(|_| (4430 + next(3) as u16, [next(250) as u8; 32]))
                        .collect(),
                });
                match &records {
                    Some(records) => names.insert(name.clone(), records.clone()),
                    None => names.remove(&name),
                };
                changes.push((name, records));
            }
            zone = zone.with_changes(serial, &changes).unwrap();
            let published: Vec<PublishedName> = names.values().cloned().collect();
            let built = Zone::from_records("internet2.test", "node1", serial, &published).unwrap();
            assert_eq!(dump(&zone), dump(&built), "after change {serial}");
            assert_eq!(zone.soa, built.soa);
        }
        assert!(names.len() > 10, "the model held {} names", names.len());
    }

    /// A name whose pin's name is not a DNS name (too long) is left out;
    /// every other name, and every other change, is still published.
    #[test]
    fn a_name_that_cannot_be_answered_does_not_hold_back_the_others() {
        let label = "a".repeat(63);
        let long = format!("{label}.{label}.{label}.{}.internet2.test.", "b".repeat(46));
        let name = |name: &str, pins: Vec<(u16, [u8; 32])>| PublishedName {
            name: name.to_owned(),
            aaaa: vec!["fd71:7e57::1".parse().unwrap()],
            tlsa: pins,
        };
        let good = name("good.internet2.test.", vec![(443, [1; 32])]);
        let zone = Zone::from_records(
            "internet2.test",
            "node1",
            1,
            &[name(&long, vec![(443, [2; 32])]), good.clone()],
        )
        .unwrap();
        let names: Vec<String> = dump(&zone).into_keys().collect();
        assert_eq!(
            names,
            ["_443._udp.good.internet2.test.", "good.internet2.test."]
        );
        let other = name("other.internet2.test.", Vec::new());
        let changed = zone
            .with_changes(
                2,
                &[
                    (long.clone(), Some(name(&long, vec![(443, [3; 32])]))),
                    (other.name.clone(), Some(other.clone())),
                ],
            )
            .unwrap();
        assert!(dump(&changed).contains_key("other.internet2.test."));
        let built = Zone::from_records("internet2.test", "node1", 2, &[good, other]).unwrap();
        assert_eq!(dump(&changed), dump(&built));
    }

    fn ask(name: &str, kind: RecordType, id: u16) -> Answer {
        let mut q = Message::new(id, MessageType::Query, OpCode::Query);
        q.queries
            .push(Query::query(Name::from_ascii(name).unwrap(), kind));
        answer(&zone(), &q.to_vec().unwrap())
    }

    fn response(answer: Answer) -> Message {
        match answer {
            Answer::Response(bytes) => Message::from_vec(&bytes).unwrap(),
            other => panic!("expected a response, got {other:?}"),
        }
    }

    #[test]
    fn answers_follow_the_zone_rules() {
        let aaaa = response(ask("node1.internet2.test.", RecordType::AAAA, 0));
        assert_eq!(aaaa.metadata.response_code, ResponseCode::NoError);
        assert_eq!(aaaa.answers.len(), 1);
        let tlsa = response(ask("_4433._udp.node1.internet2.test.", RecordType::TLSA, 0));
        assert_eq!(tlsa.answers.len(), 1);
        let a = response(ask("node1.internet2.test.", RecordType::A, 0));
        assert_eq!(
            (
                a.metadata.response_code,
                a.answers.len(),
                a.authorities.len()
            ),
            (ResponseCode::NoError, 0, 1)
        );
        let unknown = response(ask("nope.internet2.test.", RecordType::AAAA, 0));
        assert_eq!(unknown.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(unknown.authorities.len(), 1);
        let outside = response(ask("example.com.", RecordType::AAAA, 0));
        assert_eq!(outside.metadata.response_code, ResponseCode::Refused);
        let case = response(ask("NODE1.Internet2.TEST.", RecordType::AAAA, 0));
        assert_eq!(case.answers.len(), 1);
    }

    #[test]
    fn bad_queries_get_the_rfc_answers() {
        assert!(matches!(
            ask("node1.internet2.test.", RecordType::AAAA, 7),
            Answer::ProtocolError(_)
        ));
        let garbage = response(answer(&zone(), &[0, 0, 1, 2, 3]));
        assert_eq!(garbage.metadata.response_code, ResponseCode::FormErr);
        let mut two = Message::new(0, MessageType::Query, OpCode::Query);
        two.queries.push(Query::query(
            Name::from_ascii("a.internet2.test.").unwrap(),
            RecordType::AAAA,
        ));
        two.queries.push(Query::query(
            Name::from_ascii("b.internet2.test.").unwrap(),
            RecordType::AAAA,
        ));
        let formerr = response(answer(&zone(), &two.to_vec().unwrap()));
        assert_eq!(formerr.metadata.response_code, ResponseCode::FormErr);
    }
}
