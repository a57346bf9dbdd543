//! Phase0's system resolver: DNS-over-QUIC questions for names outside the
//! zone, answered by asking the upstream servers of the host (the
//! `nameserver` lines of `/etc/resolv.conf`, or the configured list).
//!
//! It runs on its own thread (a current-thread tokio runtime), so a slow
//! or silent upstream never holds up the authority. The workers hand it
//! queries through the control port ([`ControlPort::set_resolver`]); it
//! answers each one on the worker's reply queue, always: with the upstream
//! answer, from its cache, or with SERVFAIL.
//!
//! What it answers: the appliance is IPv6-only, so `A` questions get an
//! empty NOERROR and `A` records are removed from every answer; `ANY` and
//! zone transfers are REFUSED. Upstream answers are accepted only from the
//! server asked (a connected socket), with the query's random ID and the
//! same question; a truncated UDP answer is asked again over TCP.

use dataplane::control::{ControlPort, DnsQuery};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{RData, Record, RecordType};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where the host's resolver configuration is.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";
/// Queries waiting for the resolver thread, all workers together.
pub const QUEUE_LEN: usize = 1024;
/// Questions being asked upstream at once; past it, SERVFAIL at once.
pub const IN_FLIGHT_MAX: usize = 256;
/// How long one upstream server gets to answer (UDP, then TCP).
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_millis(1500);
/// Answers cached (the oldest goes first).
pub const CACHE_ENTRIES: usize = 10_000;
/// The longest a positive answer is cached (seconds).
pub const TTL_MAX: u32 = 3600;
/// The longest a negative answer (NXDOMAIN, no data) is cached (seconds).
pub const NEGATIVE_TTL_MAX: u32 = 300;
/// The most upstream servers asked (resolv.conf's MAXNS).
pub const UPSTREAMS_MAX: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} names no nameserver; list upstream resolvers in the configuration instead")]
    NoNameserver { path: String },
    #[error("the resolver thread cannot start: {0}")]
    Start(std::io::Error),
}

/// The nameservers of a resolv.conf text (port 53), at most
/// [`UPSTREAMS_MAX`], in order. Link-local IPv6 addresses keep their zone
/// (`fe80::1%eth0`); lines that are not nameservers, and addresses that do
/// not parse, are skipped.
pub fn nameservers(text: &str) -> Vec<SocketAddr> {
    let mut found = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(address) = words.next() else {
            continue;
        };
        let parsed = match address.split_once('%') {
            Some((ip, zone)) => ip.parse::<Ipv6Addr>().ok().and_then(|ip| {
                scope_id(zone)
                    .map(|scope| SocketAddr::V6(std::net::SocketAddrV6::new(ip, 53, 0, scope)))
            }),
            None => address
                .parse::<IpAddr>()
                .ok()
                .map(|ip| SocketAddr::new(ip, 53)),
        };
        if let Some(parsed) = parsed
            && found.len() < UPSTREAMS_MAX
            && !found.contains(&parsed)
        {
            found.push(parsed);
        }
    }
    found
}

/// An interface's index by name or number.
fn scope_id(zone: &str) -> Option<u32> {
    if let Ok(index) = zone.parse() {
        return Some(index);
    }
    if zone.is_empty() || zone.contains('/') || zone.starts_with('.') {
        return None;
    }
    std::fs::read_to_string(format!("/sys/class/net/{zone}/ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The host's upstream resolvers, from `path` (normally [`RESOLV_CONF`]).
pub fn system_upstreams(path: &Path) -> Result<Vec<SocketAddr>, ForwardError> {
    let text = std::fs::read_to_string(path).map_err(|source| ForwardError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let found = nameservers(&text);
    if found.is_empty() {
        return Err(ForwardError::NoNameserver {
            path: path.display().to_string(),
        });
    }
    Ok(found)
}

/// The resolver thread; stops when [`Forwarder::stop`] is called or the
/// handle is dropped.
pub struct Forwarder {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Forwarder {
    /// Start the thread and plug it into `port`: from now on the workers
    /// hand it the questions for names outside the zone.
    pub fn start(port: Arc<ControlPort>, upstreams: Vec<SocketAddr>) -> Result<Self, ForwardError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ForwardError::Start)?;
        let (queries, mut incoming) = tokio::sync::mpsc::channel::<DnsQuery>(QUEUE_LEN);
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let resolver_port = port.clone();
        let thread = std::thread::Builder::new()
            .name("resolver".into())
            .spawn(move || {
                let local = tokio::task::LocalSet::new();
                local.block_on(&runtime, async move {
                    let state = Rc::new(State {
                        port: resolver_port,
                        upstreams,
                        cache: RefCell::new(Cache::default()),
                        in_flight: Cell::new(0),
                    });
                    loop {
                        tokio::select! {
                            _ = &mut stopped => break,
                            query = incoming.recv() => match query {
                                Some(query) => state.clone().take(query),
                                None => break,
                            },
                        }
                    }
                });
            })
            .map_err(ForwardError::Start)?;
        port.set_resolver(Arc::new(move |query| {
            queries.try_send(query).map_err(|e| match e {
                tokio::sync::mpsc::error::TrySendError::Full(query)
                | tokio::sync::mpsc::error::TrySendError::Closed(query) => query,
            })
        }));
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn stop(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.shut();
    }
}

struct State {
    port: Arc<ControlPort>,
    upstreams: Vec<SocketAddr>,
    cache: RefCell<Cache>,
    in_flight: Cell<usize>,
}

impl State {
    /// Answer `query` at once (cache, policy, SERVFAIL when too many are
    /// upstream) or ask upstream on a task of its own.
    fn take(self: Rc<Self>, query: DnsQuery) {
        let request = match Message::from_vec(&query.message) {
            Ok(request) => request,
            Err(_) => return self.send(query, respond_code(None, ResponseCode::FormErr)),
        };
        let [question] = request.queries.as_slice() else {
            return self.send(query, respond_code(Some(&request), ResponseCode::FormErr));
        };
        match question.query_type() {
            // IPv6 only: the name may exist, it has no data here.
            RecordType::A => {
                return self.send(query, respond_code(Some(&request), ResponseCode::NoError));
            }
            RecordType::ANY | RecordType::AXFR | RecordType::IXFR => {
                return self.send(query, respond_code(Some(&request), ResponseCode::Refused));
            }
            _ => {}
        }
        let key = CacheKey::of(question);
        if let Some(cached) = self.cache.borrow_mut().get(&key, Instant::now()) {
            return self.send(query, encode(reply_to(&request, cached)));
        }
        if self.in_flight.get() >= IN_FLIGHT_MAX {
            return self.send(query, respond_code(Some(&request), ResponseCode::ServFail));
        }
        self.in_flight.set(self.in_flight.get() + 1);
        tokio::task::spawn_local(async move {
            let question = request.queries[0].clone();
            let answered = self.ask_upstreams(&question).await;
            self.in_flight.set(self.in_flight.get() - 1);
            let message = match answered {
                Some(answer) => {
                    let answer = only_ipv6(answer);
                    if let Some(ttl) = cache_ttl(&answer) {
                        self.cache
                            .borrow_mut()
                            .put(key, answer.clone(), ttl, Instant::now());
                    }
                    encode(reply_to(&request, answer))
                }
                None => respond_code(Some(&request), ResponseCode::ServFail),
            };
            self.send_later(query, message).await;
        });
    }

    /// The first usable answer from the upstream servers, in order.
    async fn ask_upstreams(&self, question: &Query) -> Option<Message> {
        for upstream in &self.upstreams {
            match exchange(*upstream, question).await {
                Ok(answer)
                    if matches!(
                        answer.metadata.response_code,
                        ResponseCode::NoError | ResponseCode::NXDomain
                    ) =>
                {
                    return Some(answer);
                }
                Ok(answer) => tracing::debug!(
                    %upstream, name = %question.name(), rcode = ?answer.metadata.response_code,
                    "upstream resolver could not answer; trying the next"
                ),
                Err(e) => tracing::debug!(
                    %upstream, name = %question.name(), error = %e,
                    "upstream resolver failed; trying the next"
                ),
            }
        }
        tracing::warn!(name = %question.name(), upstreams = ?self.upstreams, "no upstream resolver answered; SERVFAIL");
        None
    }

    fn send(&self, query: DnsQuery, message: Vec<u8>) {
        if self
            .port
            .answer_dns(query.worker, query.ticket, message)
            .is_err()
        {
            tracing::warn!(
                worker = query.worker,
                "worker reply queue full; a DNS answer was dropped"
            );
        }
    }

    async fn send_later(&self, query: DnsQuery, mut message: Vec<u8>) {
        let deadline = Instant::now() + crate::runtime::REPLY_RETRY;
        loop {
            match self.port.answer_dns(query.worker, query.ticket, message) {
                Ok(()) => return,
                Err(back) if Instant::now() < deadline => {
                    message = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(_) => {
                    tracing::warn!(
                        worker = query.worker,
                        "worker reply queue full; a DNS answer was dropped"
                    );
                    return;
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ExchangeError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no answer within {UPSTREAM_TIMEOUT:?}")]
    Timeout,
    #[error("malformed answer: {0}")]
    Malformed(String),
}

/// Ask `upstream` one question: UDP, and TCP when the UDP answer was cut.
async fn exchange(upstream: SocketAddr, question: &Query) -> Result<Message, ExchangeError> {
    let id = random_id();
    let mut query = Message::new(id, MessageType::Query, OpCode::Query);
    query.metadata.recursion_desired = true;
    query.queries.push(question.clone());
    let bytes = query
        .to_vec()
        .map_err(|e| ExchangeError::Malformed(e.to_string()))?;
    let answer = tokio::time::timeout(UPSTREAM_TIMEOUT, over_udp(upstream, &bytes, id, question))
        .await
        .map_err(|_| ExchangeError::Timeout)??;
    if !answer.metadata.truncation {
        return Ok(answer);
    }
    tokio::time::timeout(UPSTREAM_TIMEOUT, over_tcp(upstream, &bytes, id, question))
        .await
        .map_err(|_| ExchangeError::Timeout)?
}

async fn over_udp(
    upstream: SocketAddr,
    query: &[u8],
    id: u16,
    question: &Query,
) -> Result<Message, ExchangeError> {
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    // A fresh socket (a random port) per question, connected: the kernel
    // drops datagrams from anyone but the server asked.
    let socket = tokio::net::UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = socket.recv(&mut buf).await?;
        // Anything that is not the answer to this question is ignored
        // (a spoofed or stale datagram); the timeout bounds the wait.
        if let Some(answer) = answer_to(&buf[..n], id, question) {
            return Ok(answer);
        }
    }
}

async fn over_tcp(
    upstream: SocketAddr,
    query: &[u8],
    id: u16,
    question: &Query,
) -> Result<Message, ExchangeError> {
    let mut stream = tokio::net::TcpStream::connect(upstream).await?;
    let len = u16::try_from(query.len())
        .map_err(|_| ExchangeError::Malformed("query too long".into()))?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(query);
    stream.write_all(&framed).await?;
    let len = stream.read_u16().await?;
    let mut buf = vec![0u8; usize::from(len)];
    stream.read_exact(&mut buf).await?;
    answer_to(&buf, id, question)
        .ok_or_else(|| ExchangeError::Malformed("not the answer to the question asked".into()))
}

/// `bytes` parsed, if it is a response with `id` to exactly `question`.
fn answer_to(bytes: &[u8], id: u16, question: &Query) -> Option<Message> {
    let answer = Message::from_vec(bytes).ok()?;
    let same = answer.metadata.id == id
        && answer.metadata.message_type == MessageType::Response
        && matches!(answer.queries.as_slice(), [q] if q.query_type() == question.query_type()
            && q.query_class() == question.query_class()
            && q.name().to_lowercase() == question.name().to_lowercase());
    same.then_some(answer)
}

fn random_id() -> u16 {
    let mut id = [0u8; 2];
    // The system's randomness cannot fail on Linux once booted; were it
    // to, an ID of 0 still gets an answer matched by question.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id);
    u16::from_be_bytes(id)
}

/// The upstream answer without `A` records (the appliance is IPv6-only)
/// and without its EDNS record (the hop to the client is another one).
fn only_ipv6(mut answer: Message) -> Message {
    let keep = |r: &Record| !matches!(r.record_type(), RecordType::A | RecordType::OPT);
    answer.answers.retain(keep);
    answer.authorities.retain(keep);
    answer.additionals.retain(keep);
    answer.edns = None;
    answer.signature = None;
    answer
}

/// How long `answer` may be cached: the least TTL of its answers, or for a
/// negative answer the SOA's negative TTL (RFC 2308 §5); None: not at all.
fn cache_ttl(answer: &Message) -> Option<u32> {
    if !answer.answers.is_empty() {
        let ttl = answer.answers.iter().map(|r| r.ttl).min()?;
        return (ttl > 0).then_some(ttl.min(TTL_MAX));
    }
    let soa = answer.authorities.iter().find_map(|r| match &r.data {
        RData::SOA(soa) => Some(soa.minimum.min(r.ttl)),
        _ => None,
    })?;
    (soa > 0).then_some(soa.min(NEGATIVE_TTL_MAX))
}

/// The client's answer: its question as it asked it, ID 0 (DoQ), the
/// upstream's code and records.
fn reply_to(request: &Message, answer: Message) -> Message {
    let mut reply = Message::response(0, OpCode::Query);
    reply.queries = request.queries.clone();
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.response_code = answer.metadata.response_code;
    reply.answers = answer.answers;
    reply.authorities = answer.authorities;
    reply.additionals = answer.additionals;
    reply
}

/// A bare answer with `code` (ID 0), echoing the question if there was one.
fn respond_code(request: Option<&Message>, code: ResponseCode) -> Vec<u8> {
    let mut reply = Message::response(0, OpCode::Query);
    reply.metadata.response_code = code;
    reply.metadata.recursion_available = true;
    if let Some(request) = request {
        reply.queries = request.queries.clone();
        reply.metadata.recursion_desired = request.metadata.recursion_desired;
    }
    encode(reply)
}

fn encode(message: Message) -> Vec<u8> {
    message.to_vec().unwrap_or_else(|_| {
        // Records from upstream that do not encode again: SERVFAIL.
        let mut failed = Message::response(0, OpCode::Query);
        failed.metadata.response_code = ResponseCode::ServFail;
        failed.to_vec().unwrap_or_default()
    })
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct CacheKey {
    name: String,
    kind: u16,
}

impl CacheKey {
    fn of(question: &Query) -> Self {
        Self {
            name: question.name().to_lowercase().to_ascii(),
            kind: u16::from(question.query_type()),
        }
    }
}

struct Cached {
    answer: Message,
    stored: Instant,
    ttl: u32,
    /// Which insertion this is (the eviction order holds stale ones too).
    generation: u64,
}

/// Answers by question, dropped when their TTL ran out or, when full,
/// oldest first: every operation costs the same whatever its size.
#[derive(Default)]
struct Cache {
    entries: HashMap<CacheKey, Cached>,
    order: VecDeque<(CacheKey, u64)>,
    next: u64,
}

impl Cache {
    /// The cached answer with its TTLs lowered by the time it was held.
    fn get(&mut self, key: &CacheKey, now: Instant) -> Option<Message> {
        let cached = self.entries.get(key)?;
        let held = u32::try_from(now.duration_since(cached.stored).as_secs()).unwrap_or(u32::MAX);
        if held >= cached.ttl {
            self.entries.remove(key);
            return None;
        }
        let mut answer = cached.answer.clone();
        for record in answer
            .answers
            .iter_mut()
            .chain(answer.authorities.iter_mut())
            .chain(answer.additionals.iter_mut())
        {
            record.ttl = record.ttl.saturating_sub(held);
        }
        Some(answer)
    }

    fn put(&mut self, key: CacheKey, answer: Message, ttl: u32, now: Instant) {
        while self.entries.len() >= CACHE_ENTRIES || self.order.len() >= 2 * CACHE_ENTRIES {
            let Some((old, generation)) = self.order.pop_front() else {
                break;
            };
            if self
                .entries
                .get(&old)
                .is_some_and(|c| c.generation == generation)
            {
                self.entries.remove(&old);
            }
        }
        self.next += 1;
        self.order.push_back((key.clone(), self.next));
        self.entries.insert(
            key,
            Cached {
                answer,
                stored: now,
                ttl,
                generation: self.next,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::Name;
    use hickory_proto::rr::rdata::{A, AAAA, SOA};

    #[test]
    fn resolv_conf_nameservers_in_order_on_port_53() {
        let text = "# comment\nsearch example.org\nnameserver 192.0.2.1\nnameserver  2001:db8::53 \noptions ndots:2\nnameserver fe80::1%1\nnameserver not-an-address\nnameserver 192.0.2.1\nnameserver 192.0.2.9\n";
        let found = nameservers(text);
        assert_eq!(
            found,
            vec![
                "192.0.2.1:53".parse().unwrap(),
                "[2001:db8::53]:53".parse().unwrap(),
                SocketAddr::V6(std::net::SocketAddrV6::new(
                    "fe80::1".parse().unwrap(),
                    53,
                    0,
                    1
                )),
            ]
        );
        assert!(nameservers("search x\n").is_empty());
    }

    fn question(name: &str, kind: RecordType) -> Query {
        Query::query(Name::from_ascii(name).unwrap(), kind)
    }

    fn upstream_answer(id: u16, q: &Query) -> Message {
        let mut m = Message::response(id, OpCode::Query);
        m.queries.push(q.clone());
        m
    }

    #[test]
    fn only_the_answer_to_the_question_asked_is_taken() {
        let q = question("www.example.org.", RecordType::AAAA);
        let good = upstream_answer(7, &q).to_vec().unwrap();
        assert!(answer_to(&good, 7, &q).is_some());
        assert!(answer_to(&good, 8, &q).is_none(), "another ID");
        let other = upstream_answer(7, &question("evil.example.", RecordType::AAAA));
        assert!(
            answer_to(&other.to_vec().unwrap(), 7, &q).is_none(),
            "another name"
        );
        let mut as_query = upstream_answer(7, &q);
        as_query.metadata.message_type = MessageType::Query;
        assert!(
            answer_to(&as_query.to_vec().unwrap(), 7, &q).is_none(),
            "not a response"
        );
        assert!(answer_to(b"\x00\x07junk", 7, &q).is_none());
        let upper = upstream_answer(7, &question("WWW.Example.ORG.", RecordType::AAAA));
        assert!(
            answer_to(&upper.to_vec().unwrap(), 7, &q).is_some(),
            "names compare without case"
        );
    }

    #[test]
    fn a_records_are_removed_and_ttls_decide_caching() {
        let name = Name::from_ascii("www.example.org.").unwrap();
        let q = Query::query(name.clone(), RecordType::AAAA);
        let mut m = upstream_answer(1, &q);
        m.answers.push(Record::from_rdata(
            name.clone(),
            30,
            RData::AAAA(AAAA("2001:db8::1".parse().unwrap())),
        ));
        m.answers.push(Record::from_rdata(
            name.clone(),
            10,
            RData::A(A("192.0.2.1".parse().unwrap())),
        ));
        m.additionals.push(Record::from_rdata(
            name.clone(),
            5,
            RData::A(A("192.0.2.2".parse().unwrap())),
        ));
        let m = only_ipv6(m);
        assert_eq!(m.answers.len(), 1);
        assert!(m.additionals.is_empty());
        assert_eq!(cache_ttl(&m), Some(30));

        let mut negative = upstream_answer(1, &q);
        negative.metadata.response_code = ResponseCode::NXDomain;
        let soa = SOA::new(name.clone(), name.clone(), 1, 1, 1, 1, 9000);
        negative
            .authorities
            .push(Record::from_rdata(name.clone(), 600, RData::SOA(soa)));
        assert_eq!(cache_ttl(&negative), Some(NEGATIVE_TTL_MAX));
        assert_eq!(
            cache_ttl(&upstream_answer(1, &q)),
            None,
            "no SOA: not cached"
        );
        let mut zero = upstream_answer(1, &q);
        zero.answers.push(Record::from_rdata(
            name,
            0,
            RData::AAAA(AAAA(Ipv6Addr::LOCALHOST)),
        ));
        assert_eq!(cache_ttl(&zero), None, "TTL 0: not cached");
    }

    #[test]
    fn the_cache_ages_answers_and_keeps_its_bound() {
        let name = Name::from_ascii("a.example.").unwrap();
        let q = Query::query(name.clone(), RecordType::AAAA);
        let mut m = upstream_answer(0, &q);
        m.answers.push(Record::from_rdata(
            name,
            30,
            RData::AAAA(AAAA(Ipv6Addr::LOCALHOST)),
        ));
        let mut cache = Cache::default();
        let t0 = Instant::now();
        let key = CacheKey::of(&q);
        cache.put(key.clone(), m.clone(), 30, t0);
        assert_eq!(
            cache
                .get(&key, t0 + Duration::from_secs(10))
                .unwrap()
                .answers[0]
                .ttl,
            20
        );
        assert!(
            cache.get(&key, t0 + Duration::from_secs(30)).is_none(),
            "expired"
        );
        assert!(cache.get(&key, t0).is_none(), "an expired entry is gone");
        for i in 0..CACHE_ENTRIES + 10 {
            let k = CacheKey {
                name: format!("n{i}.example."),
                kind: 28,
            };
            cache.put(k, m.clone(), 30, t0);
        }
        assert_eq!(cache.entries.len(), CACHE_ENTRIES);
        assert!(cache.order.len() <= 2 * CACHE_ENTRIES);
        let first = CacheKey {
            name: "n0.example.".into(),
            kind: 28,
        };
        assert!(cache.get(&first, t0).is_none(), "the oldest went first");
        let last = CacheKey {
            name: format!("n{}.example.", CACHE_ENTRIES + 9),
            kind: 28,
        };
        assert!(cache.get(&last, t0).is_some());
    }
}
