//! The workers' link to the control plane: `stoq/1` requests that need the
//! authority go out on one bounded queue, replies come back on one bounded
//! queue per worker. Neither side blocks: a full request queue answers the
//! client "busy", and a reply that finds its connection gone is dropped.
//!
//! The dataplane does not know what the requests mean: it forwards the
//! kind, the payload and the client certificate the handshake verified, and
//! writes back whatever bytes (or error) the control plane answers.

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

pub struct ControlPort {
    requests: ArrayQueue<Forwarded>,
    replies: Box<[ArrayQueue<Reply>]>,
    control: OnceLock<Arc<dyn Fn() + Send + Sync>>,
    mailboxes: OnceLock<Arc<[Mailbox]>>,
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
        let Some(queue) = self.replies.get(worker) else {
            return Ok(());
        };
        queue.push(reply)?;
        if let Some(mailbox) = self.mailboxes.get().and_then(|m| m.get(worker)) {
            mailbox.waker.wake();
        }
        Ok(())
    }

    /// Worker side: the next reply for `worker`.
    pub fn take_reply(&self, worker: usize) -> Option<Reply> {
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
