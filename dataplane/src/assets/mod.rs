//! HyperMesh assets held by the dataplane: their addresses
//! (identifier-locator addressing, `address`), the memory assets each
//! worker holds (`memory`, their bytes in `region`), the `stoq/1` requests
//! that reach them (`wire`) and a connection's side of serving them
//! (`serve`), including a request for another cluster member's asset.
//!
//! Storage assets live in the control plane's store (`controlplane::assets`);
//! the workers hand their requests on, and the control plane publishes
//! their totals here ([`StorageGauge`]) for `stats`. Compute (the fuel
//! quota) and VMs are the control plane's and the `vm` crate's.
#![forbid(unsafe_code)]

pub mod address;
pub mod memory;
mod region;
pub mod serve;
pub mod wire;

use std::sync::atomic::{AtomicU64, Ordering};

/// The storage assets' totals, for `stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StorageTotals {
    pub assets: u64,
    /// Bytes of all storage assets' sizes.
    pub bytes: u64,
    pub owners: u64,
    /// Assets freed and their bytes, since this process started.
    pub freed_assets: u64,
    pub freed_bytes: u64,
}

/// Where the control plane publishes [`StorageTotals`] after each group
/// commit, for the workers' `stats` to read.
#[derive(Debug, Default)]
pub struct StorageGauge {
    values: [AtomicU64; 5],
}

impl StorageGauge {
    pub fn store(&self, t: StorageTotals) {
        let all = [t.assets, t.bytes, t.owners, t.freed_assets, t.freed_bytes];
        for (slot, value) in self.values.iter().zip(all) {
            slot.store(value, Ordering::Relaxed);
        }
    }

    pub fn load(&self) -> StorageTotals {
        let [assets, bytes, owners, freed_assets, freed_bytes] =
            std::array::from_fn(|i| self.values[i].load(Ordering::Relaxed));
        StorageTotals {
            assets,
            bytes,
            owners,
            freed_assets,
            freed_bytes,
        }
    }
}
