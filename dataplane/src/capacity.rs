//! What this machine's cores can carry: the packet cipher's speed measured
//! at start, the CPU's AES instructions, and the goodput per worker core
//! estimated from them (`[stoq_transport] target_throughput_gbps` sizes the
//! server with it).
//!
//! The estimate is the cipher's measured rate times [`GOODPUT_PER_CIPHER`]:
//! a bulk sender spends a fixed share of its CPU sealing packets, the rest
//! in the kernel's UDP path and quinn-proto's packet assembly, and those
//! scale with the same core. It is a start-up estimate to size workers and
//! buffers from, not a measurement of the transport: `cargo xtask
//! bench-40g` measures that.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rustls::crypto::aws_lc_rs::cipher_suite;
use rustls::quic::{Keys, Version};

/// Goodput per core over the packet cipher's rate on one core, measured on
/// this project's 2-core machine (2026-12-07, one script): 10.6 Gbit/s of
/// goodput per server core at MTU 1500 (`bench-40g --netns --runs 3
/// --congestion cubic`, the median) against 54.3 Gbit/s of AES-128-GCM
/// sealing 1452-byte payloads right after (this module's measurement, the
/// median of 3). The rest of a bulk sender's CPU is the kernel's UDP path
/// and quinn-proto's packet assembly.
pub const GOODPUT_PER_CIPHER: f64 = 0.20;

/// A datagram's payload at MTU 1500 over IPv6 (the default path).
const PAYLOAD: usize = 1452;
/// How long each of the measurement's rounds seals packets.
const ROUND: Duration = Duration::from_millis(3);
const ROUNDS: usize = 5;

/// What the CPU offers the packet cipher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AesHardware {
    /// AES round instructions with carry-less multiply (AES-NI and PCLMUL,
    /// or the ARMv8 crypto extension): AES-GCM in hardware.
    pub aes: bool,
    /// Vector AES (VAES with VPCLMULQDQ): several blocks per instruction.
    pub vaes: bool,
}

impl AesHardware {
    /// This CPU's.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            Self {
                aes: std::arch::is_x86_feature_detected!("aes")
                    && std::arch::is_x86_feature_detected!("pclmulqdq"),
                vaes: std::arch::is_x86_feature_detected!("vaes")
                    && std::arch::is_x86_feature_detected!("vpclmulqdq"),
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            Self {
                aes: std::arch::is_aarch64_feature_detected!("aes"),
                vaes: false,
            }
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            Self {
                aes: false,
                vaes: false,
            }
        }
    }
}

/// The rate one core sealed packets at, and the goodput estimated from it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PerCore {
    /// Gbit/s of payload sealed (the best of a few short rounds).
    pub cipher_gbps: f64,
    /// `cipher_gbps` × [`GOODPUT_PER_CIPHER`].
    pub goodput_gbps: f64,
}

/// [`measure`] once per process and suite: a reload, an operator command
/// and the start of the server see the same figure.
pub fn measured(aes_first: bool) -> PerCore {
    static AES: OnceLock<PerCore> = OnceLock::new();
    static CHACHA: OnceLock<PerCore> = OnceLock::new();
    let cell = if aes_first { &AES } else { &CHACHA };
    *cell.get_or_init(|| measure(aes_first))
}

/// Seals 1452-byte packets with the suite the server runs (AES-128-GCM
/// with `aes_first`, else ChaCha20-Poly1305) for about 15 ms on the calling
/// thread.
pub fn measure(aes_first: bool) -> PerCore {
    let suite = if aes_first {
        cipher_suite::TLS13_AES_128_GCM_SHA256
    } else {
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256
    };
    let suite = suite.tls13().expect("a TLS 1.3 suite");
    let quic = suite.quic.expect("a QUIC suite");
    let keys = Keys::initial(Version::V1, suite, quic, b"capacity", rustls::Side::Server);
    let header = [0x40u8; 20];
    let mut payload = vec![0u8; PAYLOAD];
    let mut best = 0.0f64;
    let mut packet = 0u64;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let mut sealed = 0u64;
        while start.elapsed() < ROUND {
            for _ in 0..16 {
                keys.local
                    .packet
                    .encrypt_in_place(packet, &header, &mut payload)
                    .expect("sealing a packet");
                packet += 1;
                sealed += PAYLOAD as u64;
            }
        }
        let gbps = sealed as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9;
        best = best.max(gbps);
    }
    PerCore {
        cipher_gbps: best,
        goodput_gbps: best * GOODPUT_PER_CIPHER,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_suites_seal_and_the_estimate_follows_the_cipher() {
        for aes_first in [true, false] {
            let measured = measure(aes_first);
            assert!(measured.cipher_gbps > 0.0, "{measured:?}");
            let expected = measured.cipher_gbps * GOODPUT_PER_CIPHER;
            assert!((measured.goodput_gbps - expected).abs() < 1e-9);
            // Once per process: the same figure every time after.
            assert_eq!(super::measured(aes_first), super::measured(aes_first));
        }
    }
}
