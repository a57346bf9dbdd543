//! What other threads send a worker: datagrams it owns, and control messages.

use crate::io::Waker;
use bytes::BytesMut;
use crossbeam_queue::ArrayQueue;
use quinn_proto::EcnCodepoint;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// A datagram that reached the wrong worker, on its way to the owner.
#[derive(Debug)]
pub struct Handoff {
    pub data: BytesMut,
    pub remote: SocketAddr,
    pub local_ip: Option<IpAddr>,
    pub ecn: Option<EcnCodepoint>,
}

/// Messages from the control plane (or the process) to a worker.
#[derive(Debug)]
pub enum WorkerControl {
    /// Refuse new handshakes, close every connection with `CLOSE_SHUTDOWN`,
    /// and exit once they drained or `drain` passed.
    Shutdown { drain: Duration },
}

/// Control messages a worker may have queued at once.
pub const CONTROL_QUEUE_LEN: usize = 64;

/// A worker's inbound queues (bounded; a full queue hands the value back).
#[derive(Debug)]
pub struct Mailbox {
    pub handoffs: ArrayQueue<Handoff>,
    pub control: ArrayQueue<WorkerControl>,
    pub waker: Waker,
}

impl Mailbox {
    pub fn new(handoff_queue_len: usize) -> io::Result<Self> {
        Ok(Self {
            handoffs: ArrayQueue::new(handoff_queue_len.max(1)),
            control: ArrayQueue::new(CONTROL_QUEUE_LEN),
            waker: Waker::new()?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.handoffs.is_empty() && self.control.is_empty()
    }

    /// Queue a control message and wake the worker. Hands the message back
    /// when the queue is full.
    pub fn send_control(&self, message: WorkerControl) -> Result<(), WorkerControl> {
        self.control.push(message)?;
        self.waker.wake();
        Ok(())
    }
}
