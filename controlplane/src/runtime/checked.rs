//! What the control plane's checks of a caller's request found, kept for
//! the workers: a worker answers the caller's next request of the same
//! kind and key itself (or hands it straight to the VM threads) while the
//! machine's count of changes ([`crate::machine::Machine::changes`]) is
//! the one the checks were made at and the caller's certificate has not
//! expired. Every change a check reads moves the count on, and the request
//! after it is checked by the control plane again.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

/// Checked (certificate, key) pairs kept; past it, all are forgotten and
/// the control plane checks each pair's next request again.
pub const CHECKED_MAX: usize = 4096;

/// The checks that passed, by caller certificate and key.
pub struct Checked<K, V> {
    /// The machine's count of changes.
    changes: Arc<AtomicU64>,
    hasher: RandomState,
    entries: Mutex<HashMap<u64, Entry<K, V>>>,
}

struct Entry<K, V> {
    certificate: Vec<u8>,
    key: K,
    /// The count the checks were made at.
    changes: u64,
    /// The certificate's notAfter, Unix seconds.
    not_after_unix_s: i64,
    value: V,
}

impl<K: Hash + Eq, V: Clone> Checked<K, V> {
    /// Checks that hold while `changes` stays.
    pub fn new(changes: Arc<AtomicU64>) -> Self {
        Self {
            changes,
            hasher: RandomState::new(),
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The count now: read it before the checks whose result
    /// [`Self::remember`] keeps.
    pub fn count(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    fn hash(&self, certificate: &[u8], key: &K) -> u64 {
        self.hasher.hash_one((certificate, key))
    }

    /// What the checks of `certificate`'s request for `key` found, if they
    /// still hold.
    pub fn get(&self, certificate: &[u8], key: &K) -> Option<V> {
        let hash = self.hash(certificate, key);
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = entries.get(&hash)?;
        (entry.changes == self.count()
            && entry.certificate == certificate
            && entry.key == *key
            && now_unix_s() <= entry.not_after_unix_s)
            .then(|| entry.value.clone())
    }

    /// Keep `value`, what the checks of `certificate`'s request for `key`
    /// made at count `changes` found. A certificate that does not parse is
    /// not kept.
    pub fn remember(&self, certificate: &[u8], key: K, changes: u64, value: V) {
        let Some(not_after_unix_s) = x509_parser::parse_x509_certificate(certificate)
            .ok()
            .map(|(_, cert)| cert.validity().not_after.timestamp())
        else {
            return;
        };
        let hash = self.hash(certificate, &key);
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= CHECKED_MAX && !entries.contains_key(&hash) {
            entries.clear();
        }
        entries.insert(
            hash,
            Entry {
                certificate: certificate.to_vec(),
                key,
                changes,
                not_after_unix_s,
                value,
            },
        );
    }

    /// Pairs kept.
    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn now_unix_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
