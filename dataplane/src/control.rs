//! The workers' link to the control plane: `stoq/1` requests that need the
//! authority go out on one bounded queue, replies come back on one bounded
//! queue per worker. Neither side blocks: a full request queue answers the
//! client "busy", and a reply that finds its connection gone is dropped.
//!
//! The dataplane does not know what the requests mean: it forwards the
//! kind, the payload and the client certificate the handshake verified, and
//! writes back whatever bytes (or error) the control plane answers.
//!
//! DNS queries for names outside the zone take the same way back when a
//! resolver is plugged in ([`ControlPort::set_resolver`], phase0's system
//! resolver): a worker hands the query over, the resolver answers the
//! worker's reply queue with the DNS message to write on the stream.

use crate::worker::Mailbox;
use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use quinn_proto::StreamId;
use rustls::pki_types::CertificateDer;
use std::sync::{Arc, OnceLock};

/// Requests waiting for the control plane, all workers together.
pub const REQUEST_QUEUE_LEN: usize = 4096;
/// Replies waiting for one worker.
pub const REPLY_QUEUE_LEN: usize = 4096;

/// Where a reply goes: the connection (its handle and the id the worker
/// gave it, so a reused handle never gets another connection's reply) and
/// the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    pub handle: usize,
    pub conn_id: u64,
    pub stream: StreamId,
}

/// A request on its way to the control plane.
#[derive(Debug)]
pub struct Forwarded {
    pub worker: usize,
    pub ticket: Ticket,
    pub kind: u8,
    pub payload: Bytes,
    /// The client certificate the handshake verified (leaf), if any.
    pub peer: Option<CertificateDer<'static>>,
}

/// The control plane's answer: a response payload, or an error code and a
/// message for the client.
#[derive(Debug)]
pub struct Reply {
    pub ticket: Ticket,
    /// The request's kind (the response carries kind | 0x80).
    pub kind: u8,
    pub result: Result<Vec<u8>, (u16, String)>,
}

/// A DNS query (the whole message, as the client sent it) for a name
/// outside the zone, on its way to the resolver.
#[derive(Debug)]
pub struct DnsQuery {
    pub worker: usize,
    pub ticket: Ticket,
    /// The client's address, as the handshake validated it (the resolver
    /// shares its upstream slots out by site).
    pub source: std::net::IpAddr,
    pub message: Vec<u8>,
}

/// What comes back to a worker.
#[derive(Debug)]
pub enum Returned {
    /// The control plane's answer to a `stoq/1` request.
    Stoq(Reply),
    /// The DNS message answering a [`DnsQuery`].
    Dns { ticket: Ticket, message: Vec<u8> },
}

/// Takes a query for the resolver; hands it back when it cannot (full).
pub type Resolver = Arc<dyn Fn(DnsQuery) -> Result<(), DnsQuery> + Send + Sync>;

/// A memory asset request for another cluster member's asset, sent to
/// that member from the worker's thread (`ASSET_PROXY`); its answer comes
/// back as a [`Reply`] to `ticket`, or to `answer` where it is given.
pub struct ProxiedRequest {
    pub worker: usize,
    pub ticket: Ticket,
    /// The client's request kind (its answer's).
    pub kind: u8,
    /// The locator the asset's address carries.
    pub locator: crate::assets::address::Locator,
    /// The `ASSET_PROXY` payload (`crate::assets::wire::encode_proxied`).
    pub envelope: Bytes,
    /// Takes the answer instead of `worker`'s reply queue: a VM thread
    /// waiting for it (called once, on the thread the answer arrives on).
    pub answer: Option<ProxyAnswer>,
}

/// Where a proxied request's answer goes when no worker waits for it.
pub type ProxyAnswer = Box<dyn FnOnce(Result<Vec<u8>, (u16, String)>) + Send>;

impl std::fmt::Debug for ProxiedRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxiedRequest")
            .field("worker", &self.worker)
            .field("kind", &self.kind)
            .field("locator", &self.locator)
            .field("envelope_bytes", &self.envelope.len())
            .field("answer", &self.answer.is_some())
            .finish()
    }
}

/// Sends a proxied request on, or says why not (an error code and a
/// message for the client, answered at once).
pub type AssetProxy = Arc<dyn Fn(ProxiedRequest) -> Result<(), (u16, String)> + Send + Sync>;

pub struct ControlPort {
    requests: ArrayQueue<Forwarded>,
    replies: Box<[ArrayQueue<Returned>]>,
    control: OnceLock<Arc<dyn Fn() + Send + Sync>>,
    mailboxes: OnceLock<Arc<[Mailbox]>>,
    resolver: OnceLock<Resolver>,
    asset_proxy: OnceLock<AssetProxy>,
}

impl ControlPort {
    pub fn new(workers: usize) -> Arc<Self> {
        Arc::new(Self {
            requests: ArrayQueue::new(REQUEST_QUEUE_LEN),
            replies: (0..workers)
                .map(|_| ArrayQueue::new(REPLY_QUEUE_LEN))
                .collect(),
            control: OnceLock::new(),
            mailboxes: OnceLock::new(),
            resolver: OnceLock::new(),
            asset_proxy: OnceLock::new(),
        })
    }

    /// What wakes the thread that serves requests (called for each one).
    pub fn set_control_waker(&self, wake: Arc<dyn Fn() + Send + Sync>) {
        let _ = self.control.set(wake);
    }

    pub(crate) fn set_mailboxes(&self, mailboxes: Arc<[Mailbox]>) {
        let _ = self.mailboxes.set(mailboxes);
    }

    pub fn workers(&self) -> usize {
        self.replies.len()
    }

    /// Worker side: queue a request; hands it back when the queue is full.
    pub fn forward(&self, request: Forwarded) -> Result<(), Forwarded> {
        self.requests.push(request)?;
        if let Some(wake) = self.control.get() {
            wake();
        }
        Ok(())
    }

    /// Control-plane side: the next request, if any.
    pub fn next_request(&self) -> Option<Forwarded> {
        self.requests.pop()
    }

    /// Control-plane side: answer `worker`; hands the reply back when its
    /// queue is full (the caller retries after serving others).
    pub fn reply(&self, worker: usize, reply: Reply) -> Result<(), Reply> {
        self.give_back(worker, Returned::Stoq(reply))
            .map_err(|back| match back {
                Returned::Stoq(reply) => reply,
                Returned::Dns { .. } => unreachable!("handed back what was given"),
            })
    }

    /// Plug in the resolver for names outside the zone (at most once).
    pub fn set_resolver(&self, resolver: Resolver) {
        let _ = self.resolver.set(resolver);
    }

    /// Worker side: hand a query to the resolver; hands it back when there
    /// is none or it is full (the worker answers SERVFAIL or REFUSED).
    pub fn resolve(&self, query: DnsQuery) -> Result<(), DnsQuery> {
        match self.resolver.get() {
            Some(resolver) => resolver(query),
            None => Err(query),
        }
    }

    /// Plug in the proxy for other members' assets (at most once).
    pub fn set_asset_proxy(&self, proxy: AssetProxy) {
        let _ = self.asset_proxy.set(proxy);
    }

    /// Worker side: send a request for another member's asset on; `None`
    /// when no proxy is plugged in.
    pub fn proxy_asset(&self, request: ProxiedRequest) -> Option<Result<(), (u16, String)>> {
        self.asset_proxy.get().map(|proxy| proxy(request))
    }

    /// Whether a resolver is plugged in.
    pub fn resolves(&self) -> bool {
        self.resolver.get().is_some()
    }

    /// Resolver side: the DNS answer to a query `worker` handed over; hands
    /// it back when the worker's queue is full.
    pub fn answer_dns(
        &self,
        worker: usize,
        ticket: Ticket,
        message: Vec<u8>,
    ) -> Result<(), Vec<u8>> {
        self.give_back(worker, Returned::Dns { ticket, message })
            .map_err(|back| match back {
                Returned::Dns { message, .. } => message,
                Returned::Stoq(_) => unreachable!("handed back what was given"),
            })
    }

    fn give_back(&self, worker: usize, returned: Returned) -> Result<(), Returned> {
        let Some(queue) = self.replies.get(worker) else {
            return Ok(());
        };
        queue.push(returned)?;
        if let Some(mailbox) = self.mailboxes.get().and_then(|m| m.get(worker)) {
            mailbox.waker.wake();
        }
        Ok(())
    }

    /// Worker side: whether a reply waits for `worker`.
    pub fn has_reply(&self, worker: usize) -> bool {
        self.replies
            .get(worker)
            .is_some_and(|queue| !queue.is_empty())
    }

    /// Worker side: the next reply for `worker`.
    pub fn take_reply(&self, worker: usize) -> Option<Returned> {
        self.replies.get(worker)?.pop()
    }
}

impl std::fmt::Debug for ControlPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPort")
            .field("requests", &self.requests.len())
            .field("workers", &self.replies.len())
            .finish()
    }
}
