//! The server's TLS session store: single-use resumption (so 0-RTT data is
//! never accepted twice for one ticket, RFC 8446 §8) in bounded memory, with
//! every operation O(1) whatever the number of stored sessions.
//!
//! rustls' `ServerSessionMemoryCache` finds the entry to remove on `take`
//! with a linear scan of its insertion order: each resumed handshake then
//! costs O(sessions stored), which showed up as most of a worker's time at
//! 40 000 connections. Here entries live in a hash map; the insertion order
//! is a queue of (key, sequence number) whose stale entries (taken or
//! replaced) are skipped when evicting and dropped when the queue grows
//! past twice the capacity, so both stay O(1) amortised.
//!
//! All workers share one store (a ticket issued on one worker may come back
//! on another), split into shards by key so workers rarely wait on each
//! other.

use rustls::server::StoresServerSessions;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};

/// Shards of the store; a power of two.
const SHARDS: usize = 16;

#[derive(Debug, Default)]
struct Shard {
    /// Session id → (session value, its sequence number).
    entries: HashMap<Vec<u8>, (Vec<u8>, u64)>,
    /// Insertion order; an element is live when `entries` holds its key with
    /// the same sequence number.
    order: VecDeque<(Vec<u8>, u64)>,
    next_seq: u64,
}

impl Shard {
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>, capacity: usize) {
        if !self.entries.contains_key(&key) {
            while self.entries.len() >= capacity && self.evict_oldest() {}
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.push_back((key.clone(), seq));
        self.entries.insert(key, (value, seq));
        if self.order.len() > 2 * capacity + 16 {
            let entries = &self.entries;
            self.order
                .retain(|(key, seq)| entries.get(key).is_some_and(|(_, live)| live == seq));
        }
    }

    /// Remove the oldest live entry; false when there is none.
    fn evict_oldest(&mut self) -> bool {
        while let Some((key, seq)) = self.order.pop_front() {
            if self.entries.get(&key).is_some_and(|(_, live)| *live == seq) {
                self.entries.remove(&key);
                return true;
            }
        }
        false
    }
}

/// A bounded, sharded, single-use session store (see the module doc).
#[derive(Debug)]
pub struct SessionStore {
    shards: Box<[Mutex<Shard>]>,
    capacity_per_shard: usize,
    hasher: RandomState,
}

impl SessionStore {
    /// A store for about `capacity` sessions (at least one per shard).
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            capacity_per_shard: capacity.div_ceil(SHARDS).max(1),
            hasher: RandomState::new(),
        })
    }

    /// Sessions stored now.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).entries.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, key: &[u8]) -> std::sync::MutexGuard<'_, Shard> {
        let index = self.hasher.hash_one(key) as usize & (SHARDS - 1);
        lock(&self.shards[index])
    }
}

/// A poisoned shard only means a panic elsewhere while it was held; its
/// map is still consistent (every mutation is a single call).
fn lock(shard: &Mutex<Shard>) -> std::sync::MutexGuard<'_, Shard> {
    shard
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl StoresServerSessions for SessionStore {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.shard(&key).put(key, value, self.capacity_per_shard);
        true
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.shard(key)
            .entries
            .get(key)
            .map(|(value, _)| value.clone())
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.shard(key).entries.remove(key).map(|(value, _)| value)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_resumes_once() {
        let store = SessionStore::new(64);
        assert!(store.put(b"ticket".to_vec(), b"state".to_vec()));
        assert_eq!(store.get(b"ticket").as_deref(), Some(&b"state"[..]));
        assert_eq!(store.take(b"ticket").as_deref(), Some(&b"state"[..]));
        assert_eq!(store.take(b"ticket"), None, "a replay finds nothing");
        assert_eq!(store.get(b"ticket"), None);
        assert!(store.is_empty());
    }

    #[test]
    fn the_oldest_sessions_are_evicted_first_and_memory_stays_bounded() {
        let mut shard = Shard::default();
        for n in 0u32..10 {
            shard.put(n.to_be_bytes().to_vec(), vec![0; 8], 4);
        }
        let mut kept: Vec<u32> = shard
            .entries
            .keys()
            .map(|k| u32::from_be_bytes(k[..].try_into().unwrap()))
            .collect();
        kept.sort();
        assert_eq!(kept, [6, 7, 8, 9]);
        // Taking and re-putting leaves stale order entries; they never let
        // the queue grow past its bound, and never evict a live entry early.
        for round in 0u32..1000 {
            let key = (6 + round % 4).to_be_bytes();
            assert!(shard.entries.remove(&key[..]).is_some());
            shard.put(key.to_vec(), vec![1; 8], 4);
            assert_eq!(shard.entries.len(), 4);
            assert!(shard.order.len() <= 2 * 4 + 16);
        }
        shard.put(100u32.to_be_bytes().to_vec(), vec![], 4);
        assert_eq!(shard.entries.len(), 4);
        // The least recently put of 6..=9 went (round 996..=999 re-put 6..=9
        // in order, so 6 is the oldest).
        assert!(!shard.entries.contains_key(&6u32.to_be_bytes()[..]));
    }

    #[test]
    fn the_whole_store_holds_about_its_capacity() {
        let store = SessionStore::new(1024);
        for n in 0u32..100_000 {
            store.put(n.to_be_bytes().to_vec(), vec![0; 16]);
        }
        assert!(store.len() <= 1024 + SHARDS, "{}", store.len());
        assert!(store.len() >= 1024 / 2, "{}", store.len());
    }

    #[test]
    fn many_clients_resume_concurrently_and_each_ticket_once() {
        let store = SessionStore::new(100_000);
        for n in 0u32..40_000 {
            store.put(n.to_be_bytes().to_vec(), n.to_le_bytes().to_vec());
        }
        // Four threads race to take every ticket: each is taken exactly once.
        let taken: Vec<Vec<u32>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        (0u32..40_000)
                            .filter(|n| {
                                store
                                    .take(&n.to_be_bytes())
                                    .is_some_and(|v| v == n.to_le_bytes())
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut all: Vec<u32> = taken.into_iter().flatten().collect();
        all.sort();
        assert_eq!(all, (0u32..40_000).collect::<Vec<_>>());
        assert!(store.is_empty());
    }
}
