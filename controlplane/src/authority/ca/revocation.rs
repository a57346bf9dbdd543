//! The revocation list as an immutable value workers can check without locks.

use super::Serial;
use std::sync::Arc;

/// The revoked serials at one point in time. Cloning shares the list; a
/// new revocation makes a new snapshot with a higher generation, so holders
/// can tell whether theirs is current.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RevocationSnapshot {
    generation: u64,
    /// Sorted, no duplicates.
    serials: Arc<[Serial]>,
}

impl RevocationSnapshot {
    /// `serials` must be sorted and without duplicates.
    pub(super) fn new(generation: u64, serials: Vec<Serial>) -> Self {
        debug_assert!(serials.windows(2).all(|w| w[0] < w[1]));
        Self {
            generation,
            serials: serials.into(),
        }
    }

    /// Whether the certificate with this serial (its raw INTEGER bytes) is revoked.
    pub fn is_revoked(&self, serial: &[u8]) -> bool {
        self.serials
            .binary_search_by(|s| s.as_bytes().cmp(serial))
            .is_ok()
    }

    /// Increases with every revocation; 0 when nothing was ever revoked.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn serials(&self) -> &[Serial] {
        &self.serials
    }

    pub fn len(&self) -> usize {
        self.serials.len()
    }

    pub fn is_empty(&self) -> bool {
        self.serials.is_empty()
    }
}
