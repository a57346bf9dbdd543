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
use std::cell::RefCell;
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
/// Queries waiting for upstream answers at once; past it, SERVFAIL at once.
pub const IN_FLIGHT_MAX: usize = 256;
/// Of those, the most from one source /64 (one IPv6 site).
pub const PREFIX_IN_FLIGHT_MAX: usize = 32;
/// The longest one question is worked on, all upstream servers together.
pub const QUESTION_DEADLINE: Duration = Duration::from_secs(3);
/// How long a question no upstream answered is answered SERVFAIL from the
/// cache (RFC 9520 §3.2: at least 1 s).
pub const FAILURE_TTL: u32 = 5;
/// Bytes of answers the cache holds (their wire size), all together.
pub const CACHE_BYTES: usize = 16 << 20;
/// How long one upstream server gets to answer (UDP, then TCP).
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_millis(1500);
/// Answers cached (the oldest goes first).
pub const CACHE_ENTRIES: usize = 10_000;
/// The longest a positive answer is cached (seconds).
pub const TTL_MAX: u32 = 3600;
/// The longest a negative answer (NXDOMAIN, no data) is cached (seconds).
pub const NEGATIVE_TTL_MAX: u32 = 300;
/// The UDP payload the resolver offers upstream in EDNS.
pub const UDP_PAYLOAD_MAX: u16 = 1232;
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
                        asking: RefCell::default(),
                        per_prefix: RefCell::default(),
                        waiting: std::cell::Cell::new(0),
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
    /// Questions being asked upstream, with everyone waiting for each (the
    /// first asker included): one upstream question however many ask it.
    asking: RefCell<HashMap<CacheKey, Vec<Waiter>>>,
    /// Waiters per source /64 (an IPv6 site), bounded by
    /// [`PREFIX_IN_FLIGHT_MAX`].
    per_prefix: RefCell<HashMap<u64, usize>>,
    /// Waiters in all (the sum over `asking`, kept as it changes).
    waiting: std::cell::Cell<usize>,
}

/// A query waiting for an upstream answer.
struct Waiter {
    query: DnsQuery,
    request: Message,
    prefix: u64,
}

impl State {
    /// Answer `query` at once (policy, cache, SERVFAIL past a bound), join
    /// the same question already upstream, or ask upstream on a task of
    /// its own.
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
        if is_local_name(question.name()) {
            // The host's own view (its search domains, mDNS, private
            // reverse zones) is not for the network's clients.
            return self.send(query, respond_code(Some(&request), ResponseCode::Refused));
        }
        let key = CacheKey::of(question);
        if let Some(cached) = self.cache.borrow_mut().get(&key, Instant::now()) {
            return self.send(query, encode(reply_to(&request, cached)));
        }
        let prefix = site(query.source);
        let site_waiting = self.per_prefix.borrow().get(&prefix).copied().unwrap_or(0);
        if self.waiting.get() >= IN_FLIGHT_MAX || site_waiting >= PREFIX_IN_FLIGHT_MAX {
            return self.send(query, respond_code(Some(&request), ResponseCode::ServFail));
        }
        *self.per_prefix.borrow_mut().entry(prefix).or_default() += 1;
        self.waiting.set(self.waiting.get() + 1);
        let waiter = Waiter {
            query,
            request,
            prefix,
        };
        let first = {
            let mut asking = self.asking.borrow_mut();
            let waiters = asking.entry(key.clone()).or_default();
            waiters.push(waiter);
            waiters.len() == 1
        };
        if !first {
            return;
        }
        tokio::task::spawn_local(async move {
            let question = {
                let asking = self.asking.borrow();
                asking[&key][0].request.queries[0].clone()
            };
            let answered = tokio::time::timeout(QUESTION_DEADLINE, self.ask_upstreams(&question))
                .await
                .ok()
                .flatten();
            let answer = match answered {
                Some(answer) => {
                    let answer = only_ipv6(answer);
                    if let Some(ttl) = cache_ttl(&answer, question.query_type()) {
                        self.cache.borrow_mut().put(
                            key.clone(),
                            answer.clone(),
                            ttl,
                            Instant::now(),
                        );
                    }
                    answer
                }
                None => {
                    tracing::warn!(name = %question.name(), upstreams = ?self.upstreams, "no upstream resolver answered in time; SERVFAIL");
                    // RFC 9520: a failure is remembered for a moment, so a
                    // dead upstream is not asked again by every query.
                    let mut failed = Message::response(0, OpCode::Query);
                    failed.metadata.response_code = ResponseCode::ServFail;
                    self.cache.borrow_mut().put(
                        key.clone(),
                        failed.clone(),
                        FAILURE_TTL,
                        Instant::now(),
                    );
                    failed
                }
            };
            let waiters = self.asking.borrow_mut().remove(&key).unwrap_or_default();
            self.waiting.set(self.waiting.get() - waiters.len());
            for waiter in waiters {
                {
                    let mut per_prefix = self.per_prefix.borrow_mut();
                    if let Some(count) = per_prefix.get_mut(&waiter.prefix) {
                        *count -= 1;
                        if *count == 0 {
                            per_prefix.remove(&waiter.prefix);
                        }
                    }
                }
                let message = encode(reply_to(&waiter.request, answer.clone()));
                self.send_later(waiter.query, message).await;
            }
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
    // EDNS: answers up to the size that passes without fragmenting
    // (DNS flag day 2020) come over UDP; larger ones are cut and asked
    // again over TCP.
    let mut edns = hickory_proto::op::Edns::new();
    edns.set_max_payload(UDP_PAYLOAD_MAX);
    query.edns = Some(edns);
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

/// How long `answer` to a question of type `kind` may be cached: the least
/// TTL of its records, and for a negative answer (NXDOMAIN, or no record of
/// the type asked) at most the SOA's negative TTL (RFC 2308 §5) and
/// [`NEGATIVE_TTL_MAX`]; None: not at all (a TTL of 0, or a negative
/// answer without an SOA).
fn cache_ttl(answer: &Message, kind: RecordType) -> Option<u32> {
    let least = answer.answers.iter().map(|r| r.ttl).min();
    let negative = answer.metadata.response_code == ResponseCode::NXDomain
        || !answer.answers.iter().any(|r| r.record_type() == kind);
    let ttl = if negative {
        let soa = answer.authorities.iter().find_map(|r| match &r.data {
            RData::SOA(soa) => Some(soa.minimum.min(r.ttl)),
            _ => None,
        })?;
        least.map_or(soa, |l| l.min(soa)).min(NEGATIVE_TTL_MAX)
    } else {
        least?.min(TTL_MAX)
    };
    (ttl > 0).then_some(ttl)
}

/// The /64 an address is in (IPv4: the address itself).
fn site(source: IpAddr) -> u64 {
    match source {
        IpAddr::V6(v6) => (u128::from(v6) >> 64) as u64,
        IpAddr::V4(v4) => u64::from(u32::from(v4)),
    }
}

/// Names only the host itself should resolve: single labels (its search
/// domains), special-use domains (RFC 6761, RFC 8375, `.internal`,
/// mDNS's `.local`) and the reverse zones of private, loopback and
/// link-local addresses (RFC 6303).
fn is_local_name(name: &hickory_proto::rr::Name) -> bool {
    const LOCAL: [&str; 14] = [
        "local.",
        "localhost.",
        "internal.",
        "invalid.",
        "home.arpa.",
        "10.in-addr.arpa.",
        "168.192.in-addr.arpa.",
        "254.169.in-addr.arpa.",
        "127.in-addr.arpa.",
        "0.in-addr.arpa.",
        "d.f.ip6.arpa.",
        "8.e.f.ip6.arpa.",
        "9.e.f.ip6.arpa.",
        "b.e.f.ip6.arpa.",
    ];
    let text = name.to_lowercase().to_ascii();
    let text = if text.ends_with('.') {
        text
    } else {
        format!("{text}.")
    };
    let in_zone = |zone: &str| text == zone || text.ends_with(&format!(".{zone}"));
    let private_172 = (16..=31).any(|octet| in_zone(&format!("{octet}.172.in-addr.arpa.")));
    let loopback_v6 = in_zone(&format!("1.{}ip6.arpa.", "0.".repeat(31)));
    name.num_labels() <= 1 || LOCAL.iter().any(|zone| in_zone(zone)) || private_172 || loopback_v6
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
    /// The answer's wire size.
    bytes: usize,
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
    /// The wire size of every entry, together (at most [`CACHE_BYTES`]).
    bytes: usize,
}

impl Cache {
    /// The cached answer with its TTLs lowered by the time it was held.
    fn get(&mut self, key: &CacheKey, now: Instant) -> Option<Message> {
        let cached = self.entries.get(key)?;
        let held = u32::try_from(now.duration_since(cached.stored).as_secs()).unwrap_or(u32::MAX);
        if held >= cached.ttl {
            self.remove(key);
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

    /// Cache `answer` for `ttl` seconds; its records' TTLs are capped at it.
    fn put(&mut self, key: CacheKey, mut answer: Message, ttl: u32, now: Instant) {
        for record in answer
            .answers
            .iter_mut()
            .chain(answer.authorities.iter_mut())
            .chain(answer.additionals.iter_mut())
        {
            record.ttl = record.ttl.min(ttl);
        }
        let bytes = answer.to_vec().map_or(0, |wire| wire.len());
        if bytes == 0 || bytes > CACHE_BYTES / 64 {
            return;
        }
        self.remove(&key);
        while self.entries.len() >= CACHE_ENTRIES
            || self.bytes + bytes > CACHE_BYTES
            || self.order.len() >= 2 * CACHE_ENTRIES
        {
            let Some((old, generation)) = self.order.pop_front() else {
                break;
            };
            if self
                .entries
                .get(&old)
                .is_some_and(|c| c.generation == generation)
            {
                self.remove(&old);
            }
        }
        self.next += 1;
        self.bytes += bytes;
        self.order.push_back((key.clone(), self.next));
        self.entries.insert(
            key,
            Cached {
                answer,
                stored: now,
                ttl,
                bytes,
                generation: self.next,
            },
        );
    }

    fn remove(&mut self, key: &CacheKey) {
        if let Some(gone) = self.entries.remove(key) {
            self.bytes -= gone.bytes;
        }
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
        assert_eq!(cache_ttl(&m, RecordType::AAAA), Some(30));

        let mut negative = upstream_answer(1, &q);
        negative.metadata.response_code = ResponseCode::NXDomain;
        let soa = SOA::new(name.clone(), name.clone(), 1, 1, 1, 1, 9000);
        negative
            .authorities
            .push(Record::from_rdata(name.clone(), 600, RData::SOA(soa)));
        assert_eq!(
            cache_ttl(&negative, RecordType::AAAA),
            Some(NEGATIVE_TTL_MAX)
        );
        assert_eq!(
            cache_ttl(&upstream_answer(1, &q), RecordType::AAAA),
            None,
            "no SOA: not cached"
        );
        // A CNAME to a name without the type: negative, however long the
        // CNAME's TTL.
        let mut alias = negative.clone();
        alias.metadata.response_code = ResponseCode::NoError;
        alias.answers.push(Record::from_rdata(
            name.clone(),
            3600,
            RData::CNAME(hickory_proto::rr::rdata::CNAME(name.clone())),
        ));
        assert_eq!(cache_ttl(&alias, RecordType::AAAA), Some(NEGATIVE_TTL_MAX));
        let mut zero = upstream_answer(1, &q);
        zero.answers.push(Record::from_rdata(
            name,
            0,
            RData::AAAA(AAAA(Ipv6Addr::LOCALHOST)),
        ));
        assert_eq!(
            cache_ttl(&zero, RecordType::AAAA),
            None,
            "TTL 0: not cached"
        );
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

    #[test]
    fn the_hosts_own_names_are_not_asked() {
        let local = |n: &str| is_local_name(&Name::from_ascii(n).unwrap());
        for name in [
            "gateway.",
            "printer.local.",
            "db.internal.",
            "x.home.arpa.",
            "localhost.",
            "4.3.2.10.in-addr.arpa.",
            "1.0.20.172.in-addr.arpa.",
            "1.1.168.192.in-addr.arpa.",
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.ip6.arpa.",
            "a.b.d.f.ip6.arpa.",
        ] {
            assert!(local(name), "{name}");
        }
        for name in [
            "www.example.org.",
            "org.example.",
            "1.0.32.172.in-addr.arpa.",
            "8.8.8.8.in-addr.arpa.",
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.",
            "local.example.org.",
        ] {
            assert!(!local(name), "{name}");
        }
        let site_of = |a: &str| site(a.parse().unwrap());
        assert_eq!(site_of("2001:db8:1:2::5"), site_of("2001:db8:1:2:ffff::1"));
        assert_ne!(site_of("2001:db8:1:2::5"), site_of("2001:db8:1:3::5"));
    }

    #[test]
    fn the_cache_keeps_its_byte_bound_and_caps_ttls() {
        let name = Name::from_ascii("big.example.").unwrap();
        let q = Query::query(name.clone(), RecordType::AAAA);
        let mut m = upstream_answer(0, &q);
        for i in 0..200u16 {
            let ip = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i);
            m.answers.push(Record::from_rdata(
                name.clone(),
                7200,
                RData::AAAA(AAAA(ip)),
            ));
        }
        let mut cache = Cache::default();
        let t0 = Instant::now();
        for i in 0..4000 {
            let k = CacheKey {
                name: format!("n{i}.example."),
                kind: 28,
            };
            cache.put(k, m.clone(), 60, t0);
            assert!(cache.bytes <= CACHE_BYTES);
        }
        assert!(cache.entries.len() < 4000, "bounded by bytes, not count");
        assert_eq!(
            cache.bytes,
            cache.entries.values().map(|c| c.bytes).sum::<usize>()
        );
        let last = CacheKey {
            name: "n3999.example.".into(),
            kind: 28,
        };
        assert_eq!(
            cache.get(&last, t0).unwrap().answers[0].ttl,
            60,
            "capped at the entry's TTL"
        );
    }
}
