//! eBPF flow steering: the SO_REUSEPORT program (`ebpf/reuseport_steer.c`)
//! that hands each datagram to the socket of the worker owning its
//! connection, so the handoff queue is only a fallback.
//!
//! Loaded with aya from the object committed beside its source (built by
//! `cargo xtask build-ebpf`, checked in CI). The program is attached to the
//! reuseport group of the worker sockets: it lives exactly as long as those
//! sockets, so a crashed server leaves nothing behind and a restarted one
//! attaches to its new group.

use aya::maps::{MapData, PerCpuArray, ReusePortSockArray};
use aya::programs::SkReuseport;
use aya::{Ebpf, EbpfLoader};
use serde::{Deserialize, Serialize};
use std::net::UdpSocket;
use std::sync::Mutex;

/// The compiled program (see `ebpf/reuseport_steer.c`).
static PROGRAM: &[u8] = aya::include_bytes_aligned!("../../ebpf/reuseport_steer.o");

/// `[dataplane] steering`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SteeringMode {
    /// Attach when the kernel and privileges allow; otherwise log one line
    /// and rely on the handoff queue.
    Auto,
    /// Attach or refuse to start.
    On,
    /// Never attach (the kernel's 4-tuple hash plus handoff).
    Off,
}

#[derive(Debug, thiserror::Error)]
pub enum SteeringError {
    #[error("loading the reuseport program failed (needs CAP_BPF or root): {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the reuseport program or its maps are unusable: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("the reuseport program's maps are unusable: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("the object lacks {0}")]
    Missing(&'static str),
}

/// Per-reason counts of the program's decisions (summed over CPUs), in the
/// order of `enum reason` in the C source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SteeringCounters {
    /// Short-header packets sent to the worker named in their CID.
    pub short: u64,
    /// Long-header packets sent to the worker named by their DCID.
    pub long: u64,
    /// Too short to route: left to the kernel's hash.
    pub truncated: u64,
    /// Fixed bit clear: left to the kernel's hash.
    pub not_quic: u64,
    /// The header could not be read: left to the kernel's hash.
    pub load_fail: u64,
    /// The worker's socket slot was empty: left to the kernel's hash.
    pub no_socket: u64,
}

/// An attached steering program and its counters.
pub struct ReuseportSteering {
    counters: Mutex<PerCpuArray<MapData, u64>>,
    // Held so the loaded program and socket map stay referenced by us too.
    _ebpf: Ebpf,
    _sockets: ReusePortSockArray<MapData>,
}

impl ReuseportSteering {
    /// Load the program for `sockets` (all bound to one address and port with
    /// SO_REUSEPORT, index = worker), fill its socket map and attach it.
    pub fn attach(sockets: &[&UdpSocket]) -> Result<Self, SteeringError> {
        let workers = sockets.len() as u32;
        let mut ebpf = EbpfLoader::new()
            .override_global("worker_count", &workers, true)
            .load(PROGRAM)?;
        let mut socket_map: ReusePortSockArray<MapData> = ebpf
            .take_map("workers")
            .ok_or(SteeringError::Missing("map `workers`"))?
            .try_into()?;
        let counters: PerCpuArray<MapData, u64> = ebpf
            .take_map("counters")
            .ok_or(SteeringError::Missing("map `counters`"))?
            .try_into()?;
        let program: &mut SkReuseport = ebpf
            .program_mut("steer_to_owner")
            .ok_or(SteeringError::Missing("program `steer_to_owner`"))?
            .try_into()?;
        program.load()?;
        for (index, socket) in sockets.iter().enumerate() {
            socket_map.set(index as u32, *socket, 0)?;
        }
        // One attach covers the whole reuseport group.
        program.attach(sockets[0])?;
        Ok(Self {
            counters: Mutex::new(counters),
            _ebpf: ebpf,
            _sockets: socket_map,
        })
    }

    /// Current counters. Takes a lock: for `stats` requests, never the hot path.
    pub fn counters(&self) -> SteeringCounters {
        let counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let [short, long, truncated, not_quic, load_fail, no_socket] = per_cpu_sums(&counters);
        SteeringCounters {
            short,
            long,
            truncated,
            not_quic,
            load_fail,
            no_socket,
        }
    }
}

/// Each slot of a per-CPU counter array, summed over CPUs (a slot that
/// cannot be read counts as 0).
pub(crate) fn per_cpu_sums<const N: usize>(map: &PerCpuArray<MapData, u64>) -> [u64; N] {
    std::array::from_fn(|slot| {
        map.get(&(slot as u32), 0)
            .map_or(0, |values| values.iter().sum())
    })
}

impl std::fmt::Debug for ReuseportSteering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReuseportSteering").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_object_has_the_program_and_maps() {
        // Parsing needs no privileges: a broken or stale object fails here,
        // before any server tries to load it.
        let loaded = EbpfLoader::new()
            .override_global("worker_count", &2u32, true)
            .load(PROGRAM);
        match loaded {
            Ok(mut ebpf) => {
                assert!(ebpf.take_map("workers").is_some());
                assert!(ebpf.take_map("counters").is_some());
                assert!(ebpf.program("steer_to_owner").is_some());
            }
            // Without CAP_BPF the maps cannot be created; the ELF was parsed.
            Err(aya::EbpfError::MapError(_)) => {}
            Err(e) => panic!("the committed object does not load: {e}"),
        }
    }
}
