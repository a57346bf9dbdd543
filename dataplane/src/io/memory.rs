//! An in-memory backend: datagrams enter and leave through queues the
//! caller owns, for tests that drive a worker on a simulated clock
//! (`crate::harness`). Nothing here touches a socket or a clock.
//!
//! A GSO send is split into its segments on the way out, so the peer sees
//! the individual datagrams a kernel would put on the wire.

use super::{Backend, RecvDatagram, SendDatagram, Waker};
use quinn_proto::EcnCodepoint;
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Segments per GSO send the backend accepts (more than one, so the
/// worker's batching and the split above are exercised).
pub const MEMORY_GSO_SEGMENTS: usize = 8;

/// One datagram on an in-memory link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram {
    /// Where it came from.
    pub source: SocketAddr,
    /// Where it goes.
    pub destination: SocketAddr,
    pub ecn: Option<EcnCodepoint>,
    pub contents: Vec<u8>,
}

/// The two queues of one backend, shared with whoever plays the network.
#[derive(Debug)]
pub struct MemoryQueues {
    /// The address the backend's socket would be bound to.
    pub local: SocketAddr,
    inbound: Mutex<VecDeque<Datagram>>,
    outbound: Mutex<VecDeque<Datagram>>,
}

impl MemoryQueues {
    pub fn new(local: SocketAddr) -> Arc<Self> {
        Arc::new(Self {
            local,
            inbound: Mutex::new(VecDeque::new()),
            outbound: Mutex::new(VecDeque::new()),
        })
    }

    /// Hand the backend a datagram to receive.
    pub fn push_inbound(&self, datagram: Datagram) {
        lock(&self.inbound).push_back(datagram);
    }

    /// Take everything the backend sent, oldest first.
    pub fn take_outbound(&self) -> Vec<Datagram> {
        lock(&self.outbound).drain(..).collect()
    }
}

/// A poisoned queue only means a test panicked while holding it; the data
/// is still a plain queue.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A [`Backend`] over [`MemoryQueues`].
#[derive(Debug)]
pub struct MemoryBackend {
    queues: Arc<MemoryQueues>,
}

impl MemoryBackend {
    pub fn new(queues: Arc<MemoryQueues>) -> Self {
        Self { queues }
    }
}

impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn poll_recv(&mut self, sink: &mut dyn FnMut(RecvDatagram<'_>)) -> io::Result<usize> {
        let ready: Vec<Datagram> = lock(&self.queues.inbound).drain(..).collect();
        for d in &ready {
            sink(RecvDatagram {
                remote: d.source,
                local_ip: Some(self.queues.local.ip()),
                ecn: d.ecn,
                data: &d.contents,
                stride: d.contents.len(),
            });
        }
        Ok(ready.len())
    }

    fn send(&mut self, transmit: &SendDatagram<'_>) -> io::Result<()> {
        let source = match transmit.src_ip {
            Some(ip) => SocketAddr::new(ip, self.queues.local.port()),
            None => self.queues.local,
        };
        let segment = transmit
            .segment_size
            .unwrap_or(transmit.contents.len())
            .max(1);
        let mut out = lock(&self.queues.outbound);
        for contents in transmit.contents.chunks(segment) {
            out.push_back(Datagram {
                source,
                destination: transmit.destination,
                ecn: transmit.ecn,
                contents: contents.to_vec(),
            });
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn max_gso_segments(&self) -> usize {
        MEMORY_GSO_SEGMENTS
    }

    /// Never blocks: whoever drives the worker decides when time passes.
    fn wait(
        &mut self,
        _waker: &Waker,
        _timeout: Option<Duration>,
        _want_write: bool,
    ) -> io::Result<()> {
        Ok(())
    }
}
