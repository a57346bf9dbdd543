//! Fair scheduling of the requests the workers forward to the control
//! plane: one queue per caller, served round-robin, each bounded.
//!
//! The workers' shared request queue is first come, first served: a client
//! that floods it with plot registrations, issuances, zone updates or list
//! scans would make everyone else wait behind its backlog. The control plane
//! therefore moves what the workers queued into one FIFO per caller (the
//! public key of its client certificate, or the VM owner a VM thread asks
//! for; all certificate-less connections together are one caller) and
//! serves one request of each caller in turn.
//! A caller past [`CALLER_PENDING_MAX`] queued requests, or a new caller
//! past [`CALLERS_MAX`], is answered `BUSY`
//! at once and costs nothing more. Sans-IO: it only orders values.

use dataplane::control::Forwarded;
use std::collections::{HashMap, VecDeque};

/// Requests one caller may have waiting at the control plane.
pub const CALLER_PENDING_MAX: usize = 64;
/// Callers with requests waiting at once (memory bound: at most
/// `CALLERS_MAX * CALLER_PENDING_MAX` queued requests, each at most one
/// request payload).
pub const CALLERS_MAX: usize = 4096;

/// Who a request is charged to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CallerKey {
    /// SHA-256 of the client certificate's public key: every connection
    /// and every certificate of one key share one queue.
    Key([u8; 32]),
    /// Every certificate-less connection (enrollment) together: opening
    /// more connections buys an anonymous flood no more queue, and it can
    /// never crowd out certificate holders.
    Anonymous,
}

impl CallerKey {
    pub fn of(request: &Forwarded) -> Self {
        // A VM thread's request is its VM owner's.
        if let Some(owner) = request.vm_owner.as_deref() {
            return CallerKey::Key(owner.0);
        }
        let Some(cert) = &request.peer else {
            return CallerKey::Anonymous;
        };
        // The worker's handshake parsed this certificate; if it somehow does
        // not parse here, charge the whole certificate instead.
        let spki = x509_parser::parse_x509_certificate(cert.as_ref())
            .map(|(_, parsed)| parsed.public_key().raw.to_vec())
            .unwrap_or_else(|_| cert.as_ref().to_vec());
        let digest = ring::digest::digest(&ring::digest::SHA256, &spki);
        let mut key = [0u8; 32];
        key.copy_from_slice(digest.as_ref());
        CallerKey::Key(key)
    }
}

/// Per-caller FIFOs served round-robin.
#[derive(Default)]
pub struct FairQueue {
    by_caller: HashMap<CallerKey, VecDeque<Forwarded>>,
    /// Callers with something queued, in serving order; each appears once.
    turn: VecDeque<CallerKey>,
}

impl FairQueue {
    /// Queue `request`; hands it back when its caller (or the table of
    /// callers) is full, to be answered `BUSY`.
    pub fn push(&mut self, request: Forwarded) -> Result<(), Forwarded> {
        let key = CallerKey::of(&request);
        let callers = self.by_caller.len();
        match self.by_caller.get_mut(&key) {
            Some(queue) if queue.len() >= CALLER_PENDING_MAX => Err(request),
            Some(queue) => {
                queue.push_back(request);
                Ok(())
            }
            None if callers >= CALLERS_MAX => Err(request),
            None => {
                self.turn.push_back(key.clone());
                self.by_caller.insert(key, VecDeque::from([request]));
                Ok(())
            }
        }
    }

    /// The next request: the oldest of the caller whose turn it is.
    pub fn pop(&mut self) -> Option<Forwarded> {
        let key = self.turn.pop_front()?;
        let queue = self.by_caller.get_mut(&key)?;
        let request = queue.pop_front();
        if queue.is_empty() {
            self.by_caller.remove(&key);
        } else {
            self.turn.push_back(key);
        }
        request
    }

    pub fn is_empty(&self) -> bool {
        self.turn.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataplane::control::Ticket;
    use quinn_proto::{Dir, Side, StreamId};
    use rustls::pki_types::CertificateDer;

    fn request(peer: &[u8], n: u64) -> Forwarded {
        Forwarded {
            worker: 0,
            ticket: Ticket {
                handle: 0,
                conn_id: n,
                stream: StreamId::new(Side::Client, Dir::Bi, n),
            },
            kind: 0x14,
            payload: bytes::Bytes::new(),
            peer: Some(CertificateDer::from(peer.to_vec())),
            vm_owner: None,
        }
    }

    #[test]
    fn a_flooding_caller_waits_its_turn() {
        let mut queue = FairQueue::default();
        for n in 0..CALLER_PENDING_MAX as u64 {
            queue.push(request(b"flooder", n)).unwrap();
        }
        // Past its bound the flooder is handed back (answered BUSY).
        assert!(queue.push(request(b"flooder", 999)).is_err());
        queue.push(request(b"honest", 1000)).unwrap();
        // The honest request is served second, not after the backlog.
        let first = queue.pop().unwrap();
        let second = queue.pop().unwrap();
        assert_eq!(first.peer.unwrap().as_ref(), b"flooder");
        assert_eq!(second.ticket.conn_id, 1000);
        // The flooder's requests keep their order.
        let rest: Vec<u64> = std::iter::from_fn(|| queue.pop())
            .map(|r| r.ticket.conn_id)
            .collect();
        assert_eq!(rest, (1..CALLER_PENDING_MAX as u64).collect::<Vec<_>>());
        assert!(queue.is_empty());
    }

    #[test]
    fn anonymous_connections_share_one_queue_and_never_crowd_out_others() {
        let mut queue = FairQueue::default();
        for n in 0..CALLER_PENDING_MAX as u64 {
            let mut r = request(b"", n);
            r.peer = None;
            queue.push(r).unwrap();
        }
        // A thousand more connections without a certificate buy nothing.
        for n in 0..1000 {
            let mut r = request(b"", 10_000 + n);
            r.peer = None;
            assert!(queue.push(r).is_err());
        }
        queue.push(request(b"someone", 1)).unwrap();
        assert!(queue.pop().unwrap().peer.is_none());
        assert_eq!(queue.pop().unwrap().ticket.conn_id, 1);
    }

    #[test]
    fn callers_are_bounded() {
        let mut queue = FairQueue::default();
        for n in 0..CALLERS_MAX as u64 {
            queue.push(request(&n.to_be_bytes(), n)).unwrap();
        }
        assert!(queue.push(request(b"one more", 1)).is_err());
        assert_eq!(std::iter::from_fn(|| queue.pop()).count(), CALLERS_MAX);
        queue.push(request(b"one more", 1)).unwrap();
        assert!(queue.pop().is_some());
    }
}
