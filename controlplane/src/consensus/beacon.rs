//! The time beacon: a hash chain of ticks, one a second, each signed with
//! the node key.
//!
//! `tick[n].hash = SHA-256("i2-beacon" ‖ tick[n-1].hash ‖ n_be ‖ unix_s_be)`,
//! and the signature is Ed25519 over `"i2-beacon-sig" ‖ tick[n].hash` (its
//! own domain, so the node key's signatures on other objects can never pass
//! for a tick). A proof that names a tick could not have been made before
//! the tick was published; the freshness window bounds how long after.

use super::sha256;
use crate::authority::ct::Hash;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use std::collections::VecDeque;

const DOMAIN: &[u8] = b"i2-beacon";
const SIGNATURE_DOMAIN: &[u8] = b"i2-beacon-sig";

/// Ed25519 signature length.
pub const TICK_SIGNATURE_LEN: usize = 64;

/// Recent ticks a [`Beacon`] keeps for lookup.
pub const RECENT_TICKS_LEN: usize = 64;

/// Default freshness window of a named tick, in seconds.
pub const WINDOW_S_DEFAULT: u64 = 5;

// A tick still inside the window must still be in the ring.
const _: () = assert!(WINDOW_S_DEFAULT < RECENT_TICKS_LEN as u64);

/// One signed beacon value.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Tick {
    pub index: u64,
    pub unix_s: u64,
    /// The previous tick's hash (the genesis value for index 0).
    pub prev: Hash,
    pub hash: Hash,
    pub signature: [u8; TICK_SIGNATURE_LEN],
}

fn tick_hash(prev: &Hash, index: u64, unix_s: u64) -> Hash {
    sha256(&[DOMAIN, prev, &index.to_be_bytes(), &unix_s.to_be_bytes()])
}

fn signed_message(hash: &Hash) -> [u8; 13 + 32] {
    let mut message = [0u8; 13 + 32];
    message[..13].copy_from_slice(SIGNATURE_DOMAIN);
    message[13..].copy_from_slice(hash);
    message
}

/// Why a tick is not a valid beacon value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TickError {
    #[error("tick {index}: its hash is not SHA-256 of its predecessor, index and time")]
    Hash { index: u64 },
    #[error("tick {index}: the signature does not verify under the node key given")]
    Signature { index: u64 },
    #[error("tick {index} does not follow tick {prev_index} (index, hash or time out of order)")]
    Chain { index: u64, prev_index: u64 },
}

/// Check that `tick` is well formed and signed by the node whose raw
/// Ed25519 public key is `public_key`.
pub fn verify_tick(tick: &Tick, public_key: &[u8]) -> Result<(), TickError> {
    if tick_hash(&tick.prev, tick.index, tick.unix_s) != tick.hash {
        return Err(TickError::Hash { index: tick.index });
    }
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(&signed_message(&tick.hash), &tick.signature)
        .map_err(|_| TickError::Signature { index: tick.index })
}

/// Check that `next` directly follows `prev` in the chain.
pub fn verify_chain(prev: &Tick, next: &Tick) -> Result<(), TickError> {
    let follows = next.index == prev.index.wrapping_add(1)
        && next.prev == prev.hash
        && next.unix_s > prev.unix_s;
    if follows {
        Ok(())
    } else {
        Err(TickError::Chain {
            index: next.index,
            prev_index: prev.index,
        })
    }
}

/// How a named tick's time compares with `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    Fresh,
    /// Older than the window.
    Stale,
    /// Later than now: made by a clock that runs ahead, or forged.
    Future,
}

/// A tick from `tick_unix_s` is fresh at `now_unix_s` when it is at most
/// `window_s` old and not from the future.
pub fn freshness(tick_unix_s: u64, now_unix_s: u64, window_s: u64) -> Freshness {
    if tick_unix_s > now_unix_s {
        Freshness::Future
    } else if now_unix_s - tick_unix_s > window_s {
        Freshness::Stale
    } else {
        Freshness::Fresh
    }
}

/// The node's beacon: produces the chain and keeps the last
/// [`RECENT_TICKS_LEN`] ticks.
#[derive(Debug)]
pub struct Beacon {
    key: Ed25519KeyPair,
    prev: Hash,
    next_index: u64,
    recent: VecDeque<Tick>,
}

impl Beacon {
    /// Start a chain whose first tick follows `genesis` (for a cluster, a
    /// value every node agrees on; for a restart, the last persisted tick's
    /// hash with `next_index` after it).
    pub fn new(key: Ed25519KeyPair, genesis: Hash, next_index: u64) -> Self {
        Self {
            key,
            prev: genesis,
            next_index,
            recent: VecDeque::with_capacity(RECENT_TICKS_LEN),
        }
    }

    /// The raw public key that verifies this beacon's ticks.
    pub fn public_key(&self) -> &[u8] {
        self.key.public_key().as_ref()
    }

    /// Continue the chain after `last`, the latest tick this node made
    /// before a restart: the next tick has index `last.index + 1`, links to
    /// `last.hash` and must be from a later second. `None` when `last` does
    /// not verify under `key` (the key or the stored tick was replaced).
    pub fn resume(key: Ed25519KeyPair, last: Tick) -> Option<Self> {
        verify_tick(&last, key.public_key().as_ref()).ok()?;
        let mut beacon = Self::new(key, last.hash, last.index.wrapping_add(1));
        beacon.recent.push_back(last);
        Some(beacon)
    }

    /// Produce the next signed tick if `now_unix_s` is past the latest
    /// tick's second; `None` otherwise (already ticked this second, or the
    /// clock stepped back). Call at least once a second.
    pub fn tick(&mut self, now_unix_s: u64) -> Option<&Tick> {
        let tick = self.next(now_unix_s)?;
        self.push(tick);
        self.recent.back()
    }

    /// The tick [`Self::tick`] would produce at `now_unix_s`, without
    /// producing it: a caller that must persist a tick before handing it
    /// out signs it here, writes it, then [`Self::push`]es it.
    pub fn next(&self, now_unix_s: u64) -> Option<Tick> {
        if self.latest().is_some_and(|t| t.unix_s >= now_unix_s) {
            return None;
        }
        let index = self.next_index;
        let hash = tick_hash(&self.prev, index, now_unix_s);
        let mut signature = [0u8; TICK_SIGNATURE_LEN];
        signature.copy_from_slice(self.key.sign(&signed_message(&hash)).as_ref());
        Some(Tick {
            index,
            unix_s: now_unix_s,
            prev: self.prev,
            hash,
            signature,
        })
    }

    /// Whether `tick` is the next link of this chain (index and previous
    /// hash; [`Self::next`] made on this beacon, with nothing pushed since,
    /// is).
    pub fn follows(&self, tick: &Tick) -> bool {
        tick.index == self.next_index && tick.prev == self.prev
    }

    /// Append `tick`, which must come from [`Self::next`] on this beacon
    /// with nothing pushed in between.
    pub fn push(&mut self, tick: Tick) {
        assert!(self.follows(&tick), "a beacon tick pushed out of order");
        if self.recent.len() == RECENT_TICKS_LEN {
            self.recent.pop_front();
        }
        self.prev = tick.hash;
        self.next_index = tick.index.wrapping_add(1);
        self.recent.push_back(tick);
    }

    pub fn latest(&self) -> Option<&Tick> {
        self.recent.back()
    }

    /// A recent tick by index; `None` once it left the ring.
    pub fn get(&self, index: u64) -> Option<&Tick> {
        let first = self.recent.front()?.index;
        let offset = usize::try_from(index.checked_sub(first)?).ok()?;
        self.recent.get(offset)
    }
}

#[cfg(test)]
pub(crate) fn test_beacon() -> Beacon {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    Beacon::new(
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap(),
        [0; 32],
        0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_chain_verify_and_one_per_second() {
        let mut beacon = test_beacon();
        let first = beacon.tick(1_000).unwrap().clone();
        assert!(beacon.tick(1_000).is_none(), "second tick in one second");
        assert!(beacon.tick(999).is_none(), "clock stepped back");
        let second = beacon.tick(1_001).unwrap().clone();
        verify_tick(&first, beacon.public_key()).unwrap();
        verify_tick(&second, beacon.public_key()).unwrap();
        verify_chain(&first, &second).unwrap();
        assert!(verify_chain(&second, &first).is_err());
        assert_eq!(beacon.get(1), Some(&second));
    }

    #[test]
    fn forged_tick_is_refused() {
        let mut beacon = test_beacon();
        let mut tick = beacon.tick(5).unwrap().clone();
        // Another node's key.
        let other = test_beacon();
        assert_eq!(
            verify_tick(&tick, other.public_key()),
            Err(TickError::Signature { index: 0 })
        );
        // A moved time breaks the hash.
        tick.unix_s += 10;
        assert_eq!(
            verify_tick(&tick, beacon.public_key()),
            Err(TickError::Hash { index: 0 })
        );
        // Re-hashed but not re-signed breaks the signature.
        tick.hash = tick_hash(&tick.prev, tick.index, tick.unix_s);
        assert_eq!(
            verify_tick(&tick, beacon.public_key()),
            Err(TickError::Signature { index: 0 })
        );
    }

    #[test]
    fn ring_is_bounded() {
        let mut beacon = test_beacon();
        for s in 1..=(RECENT_TICKS_LEN as u64 + 10) {
            beacon.tick(s);
        }
        assert!(beacon.get(0).is_none());
        assert!(beacon.get(9).is_none());
        assert_eq!(beacon.get(10).unwrap().unix_s, 11);
        assert_eq!(beacon.latest().unwrap().index, RECENT_TICKS_LEN as u64 + 9);
    }

    #[test]
    fn freshness_window() {
        assert_eq!(freshness(100, 100, 5), Freshness::Fresh);
        assert_eq!(freshness(100, 105, 5), Freshness::Fresh);
        assert_eq!(freshness(100, 106, 5), Freshness::Stale);
        assert_eq!(freshness(101, 100, 5), Freshness::Future);
    }
}
