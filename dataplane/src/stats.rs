//! Per-worker counters.
//!
//! Each worker counts into plain integers it owns and publishes them once per
//! loop iteration into its own cache-padded block of atomics. Readers (the
//! `stats` request, the bench) sum the blocks; nothing on the hot path takes a
//! lock or shares a cache line with another worker.

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// A worker's counters, owned by the worker thread.
        ///
        /// Read back by clients of any version: unknown fields are ignored and
        /// missing ones read as zero.
        #[derive(Clone, Copy, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
        #[serde(default)]
        pub struct Counters { $($(#[$doc])* pub $name: u64,)* }

        /// The published copy of one worker's [`Counters`].
        #[derive(Debug, Default)]
        #[repr(align(128))]
        pub struct PublishedCounters { $($name: AtomicU64,)* }

        impl PublishedCounters {
            pub fn publish(&self, c: &Counters) {
                $(self.$name.store(c.$name, Ordering::Relaxed);)*
            }
            pub fn load(&self) -> Counters {
                Counters { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }

        impl Counters {
            /// Field-wise sum, for totals over workers.
            pub fn add(&mut self, o: &Counters) {
                $(self.$name += o.$name;)*
            }
        }
    };
}

counters! {
    /// Connections currently owned by the worker.
    connections,
    /// Connections accepted since start.
    accepted,
    /// Handshakes completed since start.
    handshakes,
    /// Connections closed since start, for any reason.
    closed,
    /// UDP datagrams received from the socket (after GRO splitting).
    datagrams_rx,
    /// UDP datagrams sent (counting each GSO segment).
    datagrams_tx,
    /// UDP payload bytes received.
    bytes_rx,
    /// UDP payload bytes sent.
    bytes_tx,
    /// Application stream bytes received by stream handlers.
    stream_bytes_rx,
    /// Application stream bytes written by stream handlers.
    stream_bytes_tx,
    /// Datagrams this worker received but handed to their owning worker.
    handoffs_out,
    /// Datagrams handed to this worker by another.
    handoffs_in,
    /// Incoming handshakes answered with Retry (address validation).
    retries,
    /// Incoming handshakes refused: connection limit or shutdown.
    refused,
    /// Dropped: too short to carry a QUIC header.
    drop_truncated,
    /// Dropped: not a QUIC v1 packet (fixed bit clear).
    drop_not_quic,
    /// Dropped: IPv4 or v4-mapped peer address.
    drop_ipv4,
    /// Dropped: the source is on the blocklist.
    drop_blocked,
    /// Dropped by the QUIC endpoint: unknown connection ID or undecryptable.
    drop_unknown_cid,
    /// Dropped: the owning worker's handoff queue was full.
    drop_handoff_full,
    /// Handshakes that failed because no ALPN protocol matched.
    refused_alpn,
    /// Handshakes that failed for another TLS or transport reason.
    failed_handshakes,
    /// Connections closed because their ALPN needs a client certificate.
    refused_certificate,
    /// stoq/1 requests answered.
    stoq_requests,
    /// stoq/1 requests answered with an error code.
    stoq_errors,
    /// VM calls handed to the VM threads directly, on the control plane's
    /// earlier check of the same caller and VM.
    vm_direct_calls,
    /// Storage reads answered by the worker from the store, on the control
    /// plane's earlier check of the same caller and asset.
    storage_direct_reads,
    /// Streams served by the perf handler.
    perf_streams,
    /// perf uploads whose bytes did not match the documented pattern.
    perf_upload_mismatch,
    /// Requests that arrived in 0-RTT and were held until the handshake completed.
    zero_rtt_deferred,
    /// Sends that hit a full socket buffer and waited.
    send_blocked,
    /// stoq/1 connections admitted (a valid proof bundle).
    admitted,
    /// stoq/1 connections closed for an invalid proof bundle.
    admission_refused,
    /// stoq/1 connections closed for no valid bundle before the deadline.
    admission_deadline,
    /// DNS-over-QUIC queries answered.
    doq_queries,
    /// DNS-over-QUIC queries for names outside the zone handed to the
    /// resolver (phase0's system resolver).
    doq_forwarded,
    /// DNS-over-QUIC connections closed for a protocol error.
    doq_errors,
    /// DNS-over-QUIC connections closed for asking nothing within the idle
    /// deadline.
    doq_idle_closed,
    /// Panics caught at a connection boundary: that connection was closed
    /// with CLOSE_INTERNAL_ERROR, every other one kept being served.
    connection_panics,
    /// Connections closed because their handshake did not complete within
    /// the handshake deadline.
    handshake_deadline,
    /// Resumed connections closed at once because their certificate is
    /// revoked or no longer valid.
    resumed_refused,
    /// AF_XDP: frames taken from the RX ring.
    xdp_rx_frames,
    /// AF_XDP: received frames that were not IPv6/UDP to our address and
    /// port (truncated, extension headers, bad lengths), dropped.
    xdp_rx_invalid,
    /// AF_XDP: frames put on the TX ring.
    xdp_tx_frames,
    /// AF_XDP: datagrams sent through the kernel socket instead, because the
    /// next hop's MAC was not known yet (the kernel then resolves it).
    xdp_tx_kernel,
    /// AF_XDP: sends deferred because no frame or TX slot was free.
    xdp_tx_full,
    /// AF_XDP: `sendto` kicks that asked the kernel to transmit.
    xdp_tx_kicks,
    /// AF_XDP: netlink queries for next-hop MACs (cache misses and refreshes).
    xdp_neighbour_queries,
    /// AF_XDP: UMEM frames owned by the worker (gauge).
    xdp_frames_total,
    /// AF_XDP: frames on the free list, ready to send (gauge).
    xdp_frames_free,
    /// AF_XDP: frames on the fill ring, ready to receive (gauge).
    xdp_frames_fill,
    /// AF_XDP: frames on the TX ring or awaiting completion (gauge).
    xdp_frames_tx,
}

/// All workers' published counters.
pub struct StatsRegistry {
    workers: Vec<PublishedCounters>,
    /// The steering program, once attached.
    pub steering: std::sync::OnceLock<crate::steering::ReuseportSteering>,
    /// The XDP front door, once attached.
    pub front_door: std::sync::OnceLock<std::sync::Arc<crate::front_door::FrontDoor>>,
    /// The admission gate, when there is one (its status goes into `stats`).
    pub admission: std::sync::OnceLock<std::sync::Arc<dyn crate::admission::AdmissionGate>>,
    /// The memory assets, when asset addressing is on (their totals go
    /// into `stats`).
    pub assets: std::sync::OnceLock<std::sync::Arc<crate::assets::memory::MemoryAssets>>,
}

impl std::fmt::Debug for StatsRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatsRegistry")
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

impl StatsRegistry {
    pub fn new(workers: usize) -> Self {
        Self {
            workers: (0..workers).map(|_| PublishedCounters::default()).collect(),
            steering: std::sync::OnceLock::new(),
            front_door: std::sync::OnceLock::new(),
            admission: std::sync::OnceLock::new(),
            assets: std::sync::OnceLock::new(),
        }
    }

    pub fn worker(&self, index: usize) -> &PublishedCounters {
        &self.workers[index]
    }

    /// A consistent-enough copy for reporting (each worker's block is read
    /// field by field; totals may be a loop iteration apart).
    pub fn snapshot(&self) -> StatsSnapshot {
        let workers: Vec<Counters> = self.workers.iter().map(PublishedCounters::load).collect();
        let mut total = Counters::default();
        for w in &workers {
            total.add(w);
        }
        let steering = self
            .steering
            .get()
            .map(crate::steering::ReuseportSteering::counters);
        let front_door = self.front_door.get().map(|f| f.counters());
        let admission = self.admission.get().map(|gate| gate.status());
        let assets = self.assets.get().map(|assets| assets.totals());
        StatsSnapshot {
            total,
            workers,
            steering,
            front_door,
            admission,
            assets,
        }
    }
}

/// The admission status lists that name sources and identities: shown to
/// the operator only (their counts are public).
const OPERATOR_ONLY_LISTS: [&str; 3] = ["isolated", "suspended", "configured"];

impl StatsSnapshot {
    /// Drop what only the operator may see: which prefixes are isolated
    /// or configured blocked, which identities are suspended.
    pub fn without_operator_lists(mut self) -> Self {
        if let Some(serde_json::Value::Object(map)) = &mut self.admission {
            for key in OPERATOR_ONLY_LISTS {
                map.remove(key);
            }
        }
        self
    }
}

/// What `stats` answers with.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub total: Counters,
    pub workers: Vec<Counters>,
    /// The reuseport program's decisions; absent when steering is off.
    #[serde(default)]
    pub steering: Option<crate::steering::SteeringCounters>,
    /// The XDP front door's decisions; absent when no interface is configured.
    #[serde(default)]
    pub front_door: Option<crate::front_door::FrontDoorCounters>,
    /// Admission: the mode in force, difficulty, beacon, isolation lists;
    /// absent on a server without a gate.
    #[serde(default)]
    pub admission: Option<serde_json::Value>,
    /// Memory assets held and released (`assets::memory::MemoryTotals`);
    /// absent when asset addressing is off.
    #[serde(default)]
    pub assets: Option<crate::assets::memory::MemoryTotals>,
}
