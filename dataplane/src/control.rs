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
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

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
    /// Set by a VM thread alone ([`ControlPort::ask`]): the request asks as
    /// this VM's owner, without a certificate. A worker's request never
    /// carries it. (Boxed: the queues move a `Forwarded` by value.)
    pub vm_owner: Option<Box<crate::assets::memory::Owner>>,
}

/// The worker index of the requests a VM thread waits on
/// ([`ControlPort::ask`]): their replies go to the thread's callback.
pub const ASKER: usize = usize::MAX;

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

/// Where the answer to a request of a VM thread goes (a proxied one, or
/// one for the control plane): no worker waits for it.
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

/// Takes a `VM_CALL` straight to the VM threads when the control plane's
/// checks of the same caller and VM still hold (nothing changed since);
/// hands the request back when they must run again.
pub type VmFront = Arc<dyn Fn(Forwarded) -> Result<(), Forwarded> + Send + Sync>;

/// Answers a storage read (`ASSET_READ`'s payload, from the caller with
/// this certificate) from the store when the control plane's checks of
/// the same caller and asset still hold; None when they must run again.
pub type StorageReads = Arc<dyn Fn(&[u8], &[u8]) -> Option<Vec<u8>> + Send + Sync>;

pub struct ControlPort {
    requests: ArrayQueue<Forwarded>,
    replies: Box<[ArrayQueue<Returned>]>,
    control: OnceLock<Arc<dyn Fn() + Send + Sync>>,
    mailboxes: OnceLock<Arc<[Mailbox]>>,
    resolver: OnceLock<Resolver>,
    asset_proxy: OnceLock<AssetProxy>,
    vm_front: OnceLock<VmFront>,
    storage_reads: OnceLock<StorageReads>,
    /// The requests VM threads wait on, by the id [`Self::ask`] gave them.
    asked: Mutex<HashMap<u64, ProxyAnswer>>,
    next_ask: AtomicU64,
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
            vm_front: OnceLock::new(),
            storage_reads: OnceLock::new(),
            asked: Mutex::default(),
            next_ask: AtomicU64::new(0),
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

    /// Plug in the VM threads' front door (at most once).
    pub fn set_vm_front(&self, front: VmFront) {
        let _ = self.vm_front.set(front);
    }

    /// Plug in the storage reads the workers answer (at most once).
    pub fn set_storage_reads(&self, reads: StorageReads) {
        let _ = self.storage_reads.set(reads);
    }

    /// Worker side: the answer to a storage read (`payload`, from the
    /// caller with `certificate`), read from the store on this thread;
    /// None when the control plane must answer it.
    pub fn read_storage(&self, certificate: &[u8], payload: &[u8]) -> Option<Vec<u8>> {
        self.storage_reads.get()?(certificate, payload)
    }

    /// Worker side: a `VM_CALL` to the VM threads directly (true), or else
    /// to the control plane ([`Self::forward`], false); hands it back when
    /// the queue is full.
    pub fn call_vm(&self, request: Forwarded) -> Result<bool, Forwarded> {
        let request = match self.vm_front.get() {
            Some(front) => match front(request) {
                Ok(()) => return Ok(true),
                Err(request) => request,
            },
            None => request,
        };
        self.forward(request).map(|()| false)
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

    /// VM thread side: queue `request` for the control plane, whose reply
    /// goes to `answer` (on the thread that sends it); the request's id,
    /// for [`Self::forget`]. Hands `answer` back when the queue is full.
    pub fn ask(&self, mut request: Forwarded, answer: ProxyAnswer) -> Result<u64, ProxyAnswer> {
        let id = self.next_ask.fetch_add(1, Ordering::Relaxed);
        request.worker = ASKER;
        request.ticket.conn_id = id;
        self.asked().insert(id, answer);
        match self.forward(request) {
            Ok(()) => Ok(id),
            Err(_) => Err(self.asked().remove(&id).expect("inserted above")),
        }
    }

    /// VM thread side: stop waiting on request `id` (its reply, if it
    /// comes, is dropped).
    pub fn forget(&self, id: u64) {
        self.asked().remove(&id);
    }

    fn asked(&self) -> std::sync::MutexGuard<'_, HashMap<u64, ProxyAnswer>> {
        self.asked.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn give_back(&self, worker: usize, returned: Returned) -> Result<(), Returned> {
        if worker == ASKER {
            if let Returned::Stoq(reply) = returned {
                let answer = self.asked().remove(&reply.ticket.conn_id);
                if let Some(answer) = answer {
                    answer(reply.result);
                }
            }
            return Ok(());
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use quinn_proto::{Dir, Side};

    fn request(kind: u8) -> Forwarded {
        Forwarded {
            worker: 0,
            ticket: Ticket {
                handle: 0,
                conn_id: 0,
                stream: StreamId::new(Side::Client, Dir::Bi, 0),
            },
            kind,
            payload: Bytes::new(),
            peer: None,
            vm_owner: None,
        }
    }

    #[test]
    fn a_vm_threads_request_is_answered_to_its_callback_not_a_worker() {
        let port = ControlPort::new(1);
        let (tx, rx) = std::sync::mpsc::channel();
        let answer = move |id: u8| -> ProxyAnswer {
            let tx = tx.clone();
            Box::new(move |result| tx.send((id, result)).unwrap())
        };
        assert!(port.ask(request(1), answer(1)).is_ok());
        let Ok(forgotten) = port.ask(request(2), answer(2)) else {
            panic!("the queue has room");
        };
        port.forget(forgotten);
        for _ in 0..2 {
            let asked = port.next_request().unwrap();
            assert_eq!(asked.worker, ASKER);
            let reply = Reply {
                ticket: asked.ticket,
                kind: asked.kind,
                result: Ok(vec![asked.kind]),
            };
            port.reply(asked.worker, reply).unwrap();
        }
        // The first is answered; the forgotten one's reply is dropped, and
        // no worker got either.
        assert_eq!(rx.try_recv().unwrap(), (1, Ok(vec![1])));
        assert!(rx.try_recv().is_err());
        assert!(port.take_reply(0).is_none());
    }

    #[test]
    fn a_full_queue_hands_the_callback_back() {
        let port = ControlPort::new(1);
        for _ in 0..REQUEST_QUEUE_LEN {
            port.forward(request(0)).unwrap();
        }
        assert!(port.ask(request(1), Box::new(|_| {})).is_err());
        assert!(port.asked().is_empty());
    }
}
