//! Proof of work: a hashcash puzzle over the connection binding, and the
//! controller that sets its difficulty from the handshake load.
//!
//! The client searches for `nonce` such that
//! `SHA-256("i2-work" ‖ binding ‖ nonce_be)` starts with at least
//! `difficulty` zero bits: about `2^difficulty` hashes for the client, one
//! for the server.

use super::binding::Binding;
use super::sha256;
use std::time::{Duration, Instant};

const DOMAIN: &[u8] = b"i2-work";

/// Hard ceiling on any difficulty: 2^32 expected hashes is minutes of a
/// core, past any sensible admission deadline.
pub const DIFFICULTY_BITS_MAX: u8 = 32;

/// Required leading zero bits of the work hash.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub struct Difficulty(u8);

impl Difficulty {
    /// `None` when `bits` exceeds [`DIFFICULTY_BITS_MAX`].
    pub const fn new(bits: u8) -> Option<Self> {
        if bits <= DIFFICULTY_BITS_MAX {
            Some(Self(bits))
        } else {
            None
        }
    }

    pub const fn bits(self) -> u8 {
        self.0
    }
}

fn work_hash(binding: &Binding, nonce: u64) -> [u8; 32] {
    sha256(&[DOMAIN, binding.as_bytes(), &nonce.to_be_bytes()])
}

fn leading_zero_bits(hash: &[u8; 32]) -> u32 {
    let mut bits = 0;
    for byte in hash {
        bits += byte.leading_zeros();
        if *byte != 0 {
            break;
        }
    }
    bits
}

/// Client side: the first nonce (counting from 0) that meets `difficulty`,
/// and how many hashes it took. Terminates: [`DIFFICULTY_BITS_MAX`] keeps the
/// expected search far below the 2^64 nonce space.
pub fn solve(binding: &Binding, difficulty: Difficulty) -> (u64, u64) {
    let mut nonce = 0u64;
    loop {
        if verify(binding, difficulty, nonce) {
            return (nonce, nonce + 1);
        }
        nonce += 1;
    }
}

/// Server side: one hash.
pub fn verify(binding: &Binding, difficulty: Difficulty, nonce: u64) -> bool {
    leading_zero_bits(&work_hash(binding, nonce)) >= u32::from(difficulty.bits())
}

/// Settings of the [`DifficultyController`].
#[derive(Clone, Copy, Debug)]
pub struct DifficultyConfig {
    /// Difficulty when idle.
    pub base: Difficulty,
    /// Difficulty never exceeds this, however heavy the flood.
    pub max: Difficulty,
    /// Handshakes per second above which the node counts as flooded.
    pub flood_rate_per_s: u32,
    /// Least time between two raises while flooded.
    pub raise_every: Duration,
    /// Least time below half the flood rate before one step down.
    pub decay_every: Duration,
}

impl Default for DifficultyConfig {
    fn default() -> Self {
        Self {
            base: Difficulty(8),
            max: Difficulty(24),
            flood_rate_per_s: 1_000,
            raise_every: Duration::from_secs(1),
            decay_every: Duration::from_secs(10),
        }
    }
}

/// Adapts the work difficulty to the handshake rate.
///
/// The rule: feed it the measured handshake rate about once a second.
/// - Rate above `flood_rate_per_s`: one bit more (doubling each client's
///   cost), at most once per `raise_every`, never above `max`.
/// - Rate below half of `flood_rate_per_s` for `decay_every` since the last
///   change: one bit less, never below `base`.
/// - In between: unchanged. The gap between the two thresholds is the
///   hysteresis that keeps it from oscillating at the edge of a flood.
#[derive(Debug)]
pub struct DifficultyController {
    config: DifficultyConfig,
    current: Difficulty,
    last_change: Option<Instant>,
}

impl DifficultyController {
    /// `None` when `base > max`.
    pub fn new(config: DifficultyConfig) -> Option<Self> {
        if config.base > config.max {
            return None;
        }
        Some(Self {
            current: config.base,
            config,
            last_change: None,
        })
    }

    pub fn current(&self) -> Difficulty {
        self.current
    }

    /// Report the handshake rate measured up to `now`; returns the
    /// difficulty to hand out from now on. Call about once a second.
    pub fn on_handshakes(&mut self, rate_per_s: u32, now: Instant) -> Difficulty {
        let since = self.last_change.map(|at| now.saturating_duration_since(at));
        let waited = |interval: Duration| since.is_none_or(|s| s >= interval);
        if rate_per_s > self.config.flood_rate_per_s {
            if self.current < self.config.max && waited(self.config.raise_every) {
                self.current = Difficulty(self.current.0 + 1);
                self.last_change = Some(now);
            }
        } else if rate_per_s < self.config.flood_rate_per_s / 2 {
            if self.current > self.config.base && waited(self.config.decay_every) {
                self.current = Difficulty(self.current.0 - 1);
                self.last_change = Some(now);
            }
        } else if self.current > self.config.base {
            // Between the thresholds: hold, and restart the decay wait.
            self.last_change = Some(now);
        }
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Binding = Binding::from_exporter([7; 32]);

    #[test]
    fn solved_nonce_verifies_and_meets_difficulty() {
        let d = Difficulty::new(10).unwrap();
        let (nonce, attempts) = solve(&B, d);
        assert!(verify(&B, d, nonce));
        assert_eq!(attempts, nonce + 1);
        assert!(leading_zero_bits(&work_hash(&B, nonce)) >= 10);
    }

    #[test]
    fn nonce_for_another_binding_is_refused() {
        let d = Difficulty::new(12).unwrap();
        let (nonce, _) = solve(&B, d);
        let other = Binding::from_exporter([8; 32]);
        // The chance that the same nonce also works on `other` is 2^-12;
        // the fixed bindings make the outcome deterministic.
        assert!(!verify(&other, d, nonce));
    }

    #[test]
    fn nonce_below_the_difficulty_is_refused() {
        let low = Difficulty::new(4).unwrap();
        let (nonce, _) = solve(&B, low);
        let bits = leading_zero_bits(&work_hash(&B, nonce));
        let high = Difficulty::new(u8::try_from(bits).unwrap() + 1).unwrap();
        assert!(!verify(&B, high, nonce));
    }

    #[test]
    fn difficulty_above_the_ceiling_is_rejected() {
        assert!(Difficulty::new(DIFFICULTY_BITS_MAX + 1).is_none());
        let bad = DifficultyConfig {
            base: Difficulty(10),
            max: Difficulty(9),
            ..DifficultyConfig::default()
        };
        assert!(DifficultyController::new(bad).is_none());
    }

    #[test]
    fn difficulty_rises_under_flood_and_decays_when_idle() {
        let config = DifficultyConfig {
            base: Difficulty(8),
            max: Difficulty(11),
            flood_rate_per_s: 100,
            raise_every: Duration::from_secs(1),
            decay_every: Duration::from_secs(10),
        };
        let mut c = DifficultyController::new(config).unwrap();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // A flood raises one bit per second up to max.
        for s in 0..10 {
            c.on_handshakes(10_000, at(s));
        }
        assert_eq!(c.current(), Difficulty(11));
        // Two reports within one second raise only once.
        let mut c2 = DifficultyController::new(config).unwrap();
        c2.on_handshakes(10_000, at(0));
        c2.on_handshakes(10_000, at(0));
        assert_eq!(c2.current(), Difficulty(9));
        // Between thresholds it holds.
        c.on_handshakes(70, at(30));
        assert_eq!(c.current(), Difficulty(11));
        // Idle: one step down per decay interval, down to base and no lower.
        c.on_handshakes(0, at(35));
        assert_eq!(c.current(), Difficulty(11));
        c.on_handshakes(0, at(40));
        assert_eq!(c.current(), Difficulty(10));
        for s in 5..20 {
            c.on_handshakes(0, at(40 + s * 10));
        }
        assert_eq!(c.current(), Difficulty(8));
    }
}
