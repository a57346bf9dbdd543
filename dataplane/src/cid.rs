//! Server connection-ID layout: which worker owns a datagram.
//!
//! Every CID a worker issues is `CID_LEN` bytes: byte 0 is the worker index,
//! the rest is CSPRNG output. Routing is a pure function of the datagram's
//! destination CID (`owner_of`), so every packet carrying one DCID reaches one
//! worker. A client-chosen DCID (first Initials) routes by its own first
//! byte, which is uniformly random: the handshake lands on a random worker,
//! and from then on the client uses that worker's CIDs. The reuseport eBPF
//! program mirrors this function.

use quinn_proto::{ConnectionId, ConnectionIdGenerator};
use ring::rand::{SecureRandom, SystemRandom};
use std::time::Duration;

/// Length of every server-issued connection ID.
pub const CID_LEN: usize = 8;
/// Workers are addressed by one CID byte.
pub const WORKERS_MAX: usize = 256;
/// Byte offset of the worker field inside a CID.
pub const WORKER_FIELD: usize = 0;

const _: () = assert!(WORKER_FIELD < CID_LEN && WORKERS_MAX <= 256);

/// Index of a dataplane worker (also its CID field value).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(pub u16);

impl std::fmt::Display for WorkerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "worker-{}", self.0)
    }
}

/// Issues CIDs carrying one worker's index.
pub struct WorkerCidGenerator {
    worker: WorkerId,
    rng: SystemRandom,
}

impl WorkerCidGenerator {
    pub fn new(worker: WorkerId) -> Self {
        assert!(
            (worker.0 as usize) < WORKERS_MAX,
            "worker index fits the CID field"
        );
        Self {
            worker,
            rng: SystemRandom::new(),
        }
    }
}

impl ConnectionIdGenerator for WorkerCidGenerator {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut bytes = [0u8; CID_LEN];
        self.rng
            .fill(&mut bytes)
            .expect("the kernel CSPRNG is available");
        bytes[WORKER_FIELD] = self.worker.0 as u8;
        ConnectionId::new(&bytes)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// Why a datagram could not be routed at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteError {
    /// Shorter than any QUIC header that could name a destination CID.
    Truncated,
    /// The QUIC fixed bit (RFC 9000 §17.2) is clear: not QUIC v1.
    NotQuic,
}

/// The worker that owns `datagram`, out of `workers`.
///
/// RFC 9000 §17.2: a long header carries the DCID length at byte 5 and the
/// DCID from byte 6; RFC 9000 §17.3: a short header carries our fixed-length
/// DCID from byte 1.
pub fn owner_of(datagram: &[u8], workers: u16) -> Result<WorkerId, RouteError> {
    debug_assert!(workers > 0);
    let first = *datagram.first().ok_or(RouteError::Truncated)?;
    let field = if first & 0x80 != 0 {
        let dcid_len = *datagram.get(5).ok_or(RouteError::Truncated)? as usize;
        if dcid_len == 0 {
            0
        } else {
            if datagram.len() < 6 + dcid_len {
                return Err(RouteError::Truncated);
            }
            // A client DCID shorter than our field position still routes.
            if WORKER_FIELD < dcid_len {
                datagram[6 + WORKER_FIELD]
            } else {
                datagram[6]
            }
        }
    } else {
        if first & 0x40 == 0 {
            return Err(RouteError::NotQuic);
        }
        if datagram.len() < 1 + CID_LEN {
            return Err(RouteError::Truncated);
        }
        datagram[1 + WORKER_FIELD]
    };
    Ok(WorkerId(u16::from(field) % workers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_cids_route_to_their_worker() {
        for w in 0..4u16 {
            let mut generator = WorkerCidGenerator::new(WorkerId(w));
            let cid = generator.generate_cid();
            let mut short = vec![0x40u8];
            short.extend_from_slice(&cid);
            short.extend_from_slice(&[0u8; 20]);
            assert_eq!(owner_of(&short, 4), Ok(WorkerId(w)));
            let mut long = vec![0xc0u8, 0, 0, 0, 1, CID_LEN as u8];
            long.extend_from_slice(&cid);
            long.push(0);
            assert_eq!(owner_of(&long, 4), Ok(WorkerId(w)));
        }
    }

    #[test]
    fn cids_are_random_beyond_the_worker_field() {
        let mut generator = WorkerCidGenerator::new(WorkerId(1));
        let a = generator.generate_cid();
        let b = generator.generate_cid();
        assert_ne!(a[1..], b[1..]);
    }

    #[test]
    fn garbage_is_classified() {
        assert_eq!(owner_of(&[], 2), Err(RouteError::Truncated));
        assert_eq!(
            owner_of(&[0x00, 1, 2, 3, 4, 5, 6, 7, 8], 2),
            Err(RouteError::NotQuic)
        );
        assert_eq!(owner_of(&[0x40, 1, 2], 2), Err(RouteError::Truncated));
        assert_eq!(
            owner_of(&[0xc0, 0, 0, 0, 1, 20, 1], 2),
            Err(RouteError::Truncated)
        );
        assert_eq!(owner_of(&[0xc0, 0, 0, 0, 1, 0], 3), Ok(WorkerId(0)));
    }
}
