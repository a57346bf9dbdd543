//! Failure scoring and isolation, sans IO (`docs/ADMISSION.md`, "Isolation
//! and the honest client behind a liar").
//!
//! Each refused admission is scored against its source *prefix* (IPv6
//! only: the server serves IPv6 only) and, when the certificate named one,
//! its [`Identity`]. A prefix that reaches `threshold` failures within one
//! `window` is blocked for `ttl`; an identity that reaches
//! `identity_threshold` is suspended for `ttl`. The transport enforces the
//! lists ([`Isolation::blocked`], [`Isolation::is_suspended`]) and reloads
//! them when [`Isolation::generation`] moves.
//!
//! Windows are fixed, not sliding: a window opens at a key's first failure
//! and the count restarts at the first failure after it closes. A burst
//! split across two windows can so reach almost twice the threshold before
//! a block; the threshold is a rate bound, and the cost is one counter per
//! key instead of a timestamp per failure.
//!
//! It never reads a clock: every call takes `now`, and the caller arms a
//! timer for [`Isolation::next_expiry`] and then calls [`Isolation::expire`].
//! Memory is bounded by [`SCORES_MAX`], [`BLOCKED_MAX`] and
//! [`SUSPENDED_MAX`]; a full table drops its oldest entry, so a flood of
//! distinct sources costs `O(log n)` per failure and no more memory.

use super::stake::Identity;
use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

/// Prefixes, and separately identities, whose failures are being counted.
pub const SCORES_MAX: usize = 65_536;
/// Prefixes blocked at once. Below the front door's map of 65 536 entries,
/// which also holds the operator's static list.
pub const BLOCKED_MAX: usize = 16_384;
/// Identities suspended at once.
pub const SUSPENDED_MAX: usize = 16_384;
/// Exempt prefixes a configuration may list.
pub const EXEMPT_LEN_MAX: usize = 1_024;
/// Shortest IPv6 prefix that may be blocked: a /16 is already a large
/// share of an RIR's allocation.
pub const IPV6_PREFIX_LEN_MIN: u8 = 16;
/// Longest score window.
pub const WINDOW_MAX: Duration = Duration::from_secs(24 * 3_600);
/// Longest block or suspension; it also keeps `now + ttl` far from the
/// end of any clock's range.
pub const TTL_MAX: Duration = Duration::from_secs(30 * 24 * 3_600);

/// Settings of [`Isolation`], from the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IsolationConfig {
    /// Failures of one prefix within `window` that block it.
    pub threshold: u32,
    /// Failures of one identity within `window` that suspend it.
    pub identity_threshold: u32,
    pub window: Duration,
    /// How long a block or a suspension lasts.
    pub ttl: Duration,
    /// Length of the blocked prefix around a failing source address.
    pub ipv6_prefix_len: u8,
    /// Prefixes never blocked (an operator's own hosts). Their failures
    /// still count, and their identities can still be suspended.
    pub exempt: Vec<(Ipv6Addr, u8)>,
}

impl Default for IsolationConfig {
    fn default() -> Self {
        Self {
            threshold: 8,
            identity_threshold: 8,
            window: Duration::from_secs(10),
            ttl: Duration::from_secs(300),
            ipv6_prefix_len: 64,
            exempt: Vec::new(),
        }
    }
}

impl IsolationConfig {
    /// The error names the setting and the values it allows.
    pub fn check(&self) -> Result<(), String> {
        if self.threshold == 0 {
            return Err("isolation threshold = 0; allowed: 1 or more failures".into());
        }
        if self.identity_threshold == 0 {
            return Err("isolation identity_threshold = 0; allowed: 1 or more failures".into());
        }
        if self.window.is_zero() || self.window > WINDOW_MAX {
            return Err(format!(
                "isolation window = {:?}; allowed: more than 0 and at most {} s",
                self.window,
                WINDOW_MAX.as_secs()
            ));
        }
        if self.ttl.is_zero() || self.ttl > TTL_MAX {
            return Err(format!(
                "isolation ttl = {:?}; allowed: more than 0 and at most {} s",
                self.ttl,
                TTL_MAX.as_secs()
            ));
        }
        if !(IPV6_PREFIX_LEN_MIN..=128).contains(&self.ipv6_prefix_len) {
            return Err(format!(
                "isolation ipv6_prefix_len = {}; allowed: {IPV6_PREFIX_LEN_MIN}..=128",
                self.ipv6_prefix_len
            ));
        }
        if self.exempt.len() > EXEMPT_LEN_MAX {
            return Err(format!(
                "isolation exempt lists {} prefixes; allowed: at most {EXEMPT_LEN_MAX}",
                self.exempt.len()
            ));
        }
        match self.exempt.iter().find(|(_, len)| *len > 128) {
            Some((addr, len)) => Err(format!(
                "isolation exempt prefix {addr}/{len}; allowed lengths: 0..=128"
            )),
            None => Ok(()),
        }
    }
}

/// Something a failure newly isolated.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Isolated {
    /// `addr/len` is blocked until `until` (`addr` has its host bits clear).
    Prefix {
        addr: Ipv6Addr,
        len: u8,
        until: Instant,
    },
    Identity {
        identity: Identity,
        until: Instant,
    },
}

/// The high `len` bits of `addr`. Lengths above 128 keep every bit.
fn mask(addr: u128, len: u8) -> u128 {
    addr & u128::MAX
        .checked_shl(128u32.saturating_sub(u32::from(len)))
        .unwrap_or(0)
}

/// Failures counted in one fixed window per key.
#[derive(Debug)]
struct Scores<K> {
    scores: HashMap<K, Score>,
    /// `(window start, key)`, earliest first: the order of eviction and of
    /// sweeping.
    by_start: BTreeSet<(Instant, K)>,
}

#[derive(Clone, Copy, Debug)]
struct Score {
    started: Instant,
    count: u32,
}

impl<K: Copy + Ord + Hash> Scores<K> {
    fn new() -> Self {
        Self {
            scores: HashMap::new(),
            by_start: BTreeSet::new(),
        }
    }

    /// Count one failure of `key` at `now`; returns the failures in its
    /// current window. When `cap` keys are tracked, a new key evicts the
    /// one whose window started earliest.
    fn add(&mut self, key: K, now: Instant, window: Duration, cap: usize) -> u32 {
        if let Some(score) = self.scores.get_mut(&key) {
            if now.saturating_duration_since(score.started) < window {
                score.count = score.count.saturating_add(1);
                return score.count;
            }
            self.by_start.remove(&(score.started, key));
        } else if self.scores.len() >= cap
            && let Some((_, oldest)) = self.by_start.pop_first()
        {
            self.scores.remove(&oldest);
        }
        self.scores.insert(
            key,
            Score {
                started: now,
                count: 1,
            },
        );
        self.by_start.insert((now, key));
        1
    }

    fn remove(&mut self, key: &K) {
        if let Some(score) = self.scores.remove(key) {
            self.by_start.remove(&(score.started, *key));
        }
    }

    /// Drop the scores whose window closed by `now`.
    fn sweep(&mut self, now: Instant, window: Duration) {
        while let Some(&(started, key)) = self.by_start.first()
            && now.saturating_duration_since(started) >= window
        {
            self.by_start.pop_first();
            self.scores.remove(&key);
        }
    }
}

/// Keys isolated until some instant.
#[derive(Debug)]
struct Expiring<K> {
    until: HashMap<K, Instant>,
    /// `(until, key)`, soonest first.
    by_until: BTreeSet<(Instant, K)>,
}

impl<K: Copy + Ord + Hash> Expiring<K> {
    fn new() -> Self {
        Self {
            until: HashMap::new(),
            by_until: BTreeSet::new(),
        }
    }

    fn is_active(&self, key: &K, now: Instant) -> bool {
        self.until.get(key).is_some_and(|until| *until > now)
    }

    /// Isolate `key` until `until`. When `cap` keys are held, a new key
    /// evicts the one that would expire soonest.
    fn insert(&mut self, key: K, until: Instant, cap: usize) {
        if let Some(old) = self.until.get(&key) {
            self.by_until.remove(&(*old, key));
        } else if self.until.len() >= cap
            && let Some((_, soonest)) = self.by_until.pop_first()
        {
            self.until.remove(&soonest);
        }
        self.until.insert(key, until);
        self.by_until.insert((until, key));
    }

    fn remove(&mut self, key: &K) -> bool {
        let Some(until) = self.until.remove(key) else {
            return false;
        };
        self.by_until.remove(&(until, *key));
        true
    }

    /// Drop what expired by `now`; true when anything did.
    fn expire(&mut self, now: Instant) -> bool {
        let mut changed = false;
        while let Some(&(until, key)) = self.by_until.first()
            && until <= now
        {
            self.by_until.pop_first();
            self.until.remove(&key);
            changed = true;
        }
        changed
    }

    fn soonest(&self) -> Option<Instant> {
        self.by_until.first().map(|(until, _)| *until)
    }

    fn sorted(&self) -> Vec<(K, Instant)> {
        let mut out: Vec<_> = self.until.iter().map(|(k, until)| (*k, *until)).collect();
        out.sort_unstable();
        out
    }
}

/// The failure scores, the blocked prefixes and the suspended identities.
#[derive(Debug)]
pub struct Isolation {
    config: IsolationConfig,
    /// Keyed by the masked source address.
    prefix_scores: Scores<u128>,
    identity_scores: Scores<Identity>,
    blocked: Expiring<u128>,
    suspended: Expiring<Identity>,
    generation: u64,
}

impl Isolation {
    /// Empty lists; the error is [`IsolationConfig::check`]'s.
    pub fn new(config: IsolationConfig) -> Result<Self, String> {
        config.check()?;
        Ok(Self {
            config,
            prefix_scores: Scores::new(),
            identity_scores: Scores::new(),
            blocked: Expiring::new(),
            suspended: Expiring::new(),
            generation: 0,
        })
    }

    pub fn config(&self) -> &IsolationConfig {
        &self.config
    }

    /// Score one refused admission from `source`, by `identity` when the
    /// certificate named one. Returns what it newly isolated: nothing, the
    /// prefix, the identity or both. A failure of a prefix or identity
    /// that is already isolated counts, but neither repeats nor extends
    /// the isolation.
    pub fn record_failure(
        &mut self,
        source: Ipv6Addr,
        identity: Option<Identity>,
        now: Instant,
    ) -> Vec<Isolated> {
        let mut isolated = Vec::new();
        let (window, ttl, len) = (
            self.config.window,
            self.config.ttl,
            self.config.ipv6_prefix_len,
        );
        let prefix = mask(u128::from(source), len);
        let count = self.prefix_scores.add(prefix, now, window, SCORES_MAX);
        if count >= self.config.threshold
            && !self.blocked.is_active(&prefix, now)
            && !self.is_exempt(prefix)
        {
            let until = now + ttl;
            self.blocked.insert(prefix, until, BLOCKED_MAX);
            isolated.push(Isolated::Prefix {
                addr: Ipv6Addr::from(prefix),
                len,
                until,
            });
        }
        if let Some(identity) = identity {
            let count = self.identity_scores.add(identity, now, window, SCORES_MAX);
            if count >= self.config.identity_threshold && !self.suspended.is_active(&identity, now)
            {
                let until = now + ttl;
                self.suspended.insert(identity, until, SUSPENDED_MAX);
                isolated.push(Isolated::Identity { identity, until });
            }
        }
        if !isolated.is_empty() {
            self.generation += 1;
        }
        isolated
    }

    /// Whether blocking `prefix` would block any address of an exempt
    /// prefix: blocking the /64 around an exempt /128 would shut the
    /// operator's host out as surely as blocking the host.
    fn is_exempt(&self, prefix: u128) -> bool {
        let len = self.config.ipv6_prefix_len;
        self.config.exempt.iter().any(|(addr, exempt_len)| {
            let shorter = len.min(*exempt_len);
            mask(u128::from(*addr), shorter) == mask(prefix, shorter)
        })
    }

    /// Drop the blocks and suspensions that expired by `now`, and the
    /// scores whose window closed. True when the blocked or the suspended
    /// set changed (and so [`Self::generation`] moved). Call at
    /// [`Self::next_expiry`].
    pub fn expire(&mut self, now: Instant) -> bool {
        let unblocked = self.blocked.expire(now);
        let unsuspended = self.suspended.expire(now);
        self.prefix_scores.sweep(now, self.config.window);
        self.identity_scores.sweep(now, self.config.window);
        let changed = unblocked || unsuspended;
        if changed {
            self.generation += 1;
        }
        changed
    }

    /// Blocked prefixes (address with host bits clear, length, until),
    /// sorted by address. Entries past their time stay until
    /// [`Self::expire`] removes them.
    pub fn blocked(&self) -> Vec<(Ipv6Addr, u8, Instant)> {
        let len = self.config.ipv6_prefix_len;
        self.blocked
            .sorted()
            .into_iter()
            .map(|(prefix, until)| (Ipv6Addr::from(prefix), len, until))
            .collect()
    }

    /// Suspended identities and until when, sorted by identity.
    pub fn suspended(&self) -> Vec<(Identity, Instant)> {
        self.suspended.sorted()
    }

    /// Whether `source` lies in a prefix blocked at `now`.
    pub fn is_blocked(&self, source: Ipv6Addr, now: Instant) -> bool {
        let prefix = mask(u128::from(source), self.config.ipv6_prefix_len);
        self.blocked.is_active(&prefix, now)
    }

    pub fn is_suspended(&self, identity: &Identity, now: Instant) -> bool {
        self.suspended.is_active(identity, now)
    }

    /// Lift the block of `addr/len` (host bits of `addr` are ignored; `len`
    /// must be the configured prefix length to match) and forget its score.
    /// True if it was blocked.
    pub fn remove_prefix(&mut self, addr: Ipv6Addr, len: u8) -> bool {
        if len != self.config.ipv6_prefix_len {
            return false;
        }
        let prefix = mask(u128::from(addr), len);
        self.prefix_scores.remove(&prefix);
        let removed = self.blocked.remove(&prefix);
        if removed {
            self.generation += 1;
        }
        removed
    }

    /// Lift the suspension of `identity` and forget its score. True if it
    /// was suspended.
    pub fn remove_identity(&mut self, identity: &Identity) -> bool {
        self.identity_scores.remove(identity);
        let removed = self.suspended.remove(identity);
        if removed {
            self.generation += 1;
        }
        removed
    }

    /// When the next block or suspension ends; `None` when none is held.
    /// Stale scores need no timer: [`Self::expire`] sweeps them, and full
    /// tables evict them first.
    pub fn next_expiry(&self) -> Option<Instant> {
        [self.blocked.soonest(), self.suspended.soonest()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Moves whenever the blocked or the suspended set changes: the
    /// transport reloads the lists it enforces when it differs from the
    /// one it last loaded.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Entries in each internal table, index included.
    #[cfg(test)]
    fn table_lens(&self) -> [usize; 8] {
        [
            self.prefix_scores.scores.len(),
            self.prefix_scores.by_start.len(),
            self.identity_scores.scores.len(),
            self.identity_scores.by_start.len(),
            self.blocked.until.len(),
            self.blocked.by_until.len(),
            self.suspended.until.len(),
            self.suspended.by_until.len(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: Identity = Identity([1; 32]);
    const BOB: Identity = Identity([2; 32]);

    fn addr(text: &str) -> Ipv6Addr {
        text.parse().unwrap()
    }

    fn isolation(threshold: u32) -> Isolation {
        Isolation::new(IsolationConfig {
            threshold,
            identity_threshold: threshold,
            ..IsolationConfig::default()
        })
        .unwrap()
    }

    fn clock() -> impl Fn(u64) -> Instant {
        let t0 = Instant::now();
        move |ms| t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_prefix_is_blocked_at_the_threshold_and_not_before() {
        let at = clock();
        let mut iso = isolation(4);
        // Two addresses in one /64 add up; another /64 counts apart.
        for (i, source) in ["2001:db8:0:1::1", "2001:db8:0:1::2", "2001:db8:0:1::1"]
            .iter()
            .enumerate()
        {
            assert!(
                iso.record_failure(addr(source), None, at(i as u64))
                    .is_empty()
            );
        }
        assert!(
            iso.record_failure(addr("2001:db8:0:2::1"), None, at(3))
                .is_empty()
        );
        assert!(iso.blocked().is_empty());
        assert_eq!(iso.generation(), 0);

        let got = iso.record_failure(addr("2001:db8:0:1:ffff::9"), None, at(4));
        let until = at(4) + Duration::from_secs(300);
        assert_eq!(
            got,
            vec![Isolated::Prefix {
                addr: addr("2001:db8:0:1::"),
                len: 64,
                until,
            }]
        );
        assert_eq!(iso.blocked(), vec![(addr("2001:db8:0:1::"), 64, until)]);
        assert!(iso.is_blocked(addr("2001:db8:0:1::abcd"), at(5)));
        assert!(!iso.is_blocked(addr("2001:db8:0:2::1"), at(5)));
        assert_eq!(iso.generation(), 1);
        assert_eq!(iso.next_expiry(), Some(until));

        // Already blocked: it counts, but neither repeats nor extends.
        assert!(
            iso.record_failure(addr("2001:db8:0:1::1"), None, at(6))
                .is_empty()
        );
        assert_eq!(iso.blocked(), vec![(addr("2001:db8:0:1::"), 64, until)]);
        assert_eq!(iso.generation(), 1);
    }

    #[test]
    fn an_identity_is_suspended_across_prefixes() {
        let at = clock();
        let mut iso = isolation(3);
        let sources = ["2001:db8:1::1", "2001:db8:2::1", "2001:db8:3::1"];
        for (i, source) in sources[..2].iter().enumerate() {
            let got = iso.record_failure(addr(source), Some(ALICE), at(i as u64));
            assert!(got.is_empty());
        }
        assert!(!iso.is_suspended(&ALICE, at(2)));
        let got = iso.record_failure(addr(sources[2]), Some(ALICE), at(2));
        let until = at(2) + Duration::from_secs(300);
        assert_eq!(
            got,
            vec![Isolated::Identity {
                identity: ALICE,
                until
            }]
        );
        assert!(iso.is_suspended(&ALICE, at(3)));
        assert!(!iso.is_suspended(&BOB, at(3)));
        assert!(!iso.is_suspended(&ALICE, until));
        assert_eq!(iso.suspended(), vec![(ALICE, until)]);
        assert!(iso.blocked().is_empty(), "each prefix failed once");
    }

    #[test]
    fn one_failure_can_block_and_suspend() {
        let at = clock();
        let mut iso = isolation(1);
        let got = iso.record_failure(addr("2001:db8::1"), Some(BOB), at(0));
        assert_eq!(got.len(), 2);
        assert_eq!(iso.generation(), 1, "one change of the lists");
    }

    #[test]
    fn blocks_and_suspensions_expire_after_the_ttl() {
        let at = clock();
        let mut iso = isolation(1);
        iso.record_failure(addr("2001:db8::1"), Some(ALICE), at(0));
        iso.record_failure(addr("2001:db8:1::1"), None, at(1_000));
        let generation = iso.generation();
        assert_eq!(iso.next_expiry(), Some(at(300_000)));

        assert!(!iso.expire(at(299_999)));
        assert_eq!(iso.generation(), generation);
        assert!(iso.expire(at(300_000)));
        assert_eq!(iso.generation(), generation + 1);
        assert_eq!(iso.blocked(), vec![(addr("2001:db8:1::"), 64, at(301_000))]);
        assert!(iso.suspended().is_empty());
        assert_eq!(iso.next_expiry(), Some(at(301_000)));

        assert!(iso.expire(at(400_000)));
        assert!(iso.blocked().is_empty());
        assert_eq!(iso.next_expiry(), None);
        assert_eq!(iso.table_lens(), [0; 8], "stale scores are swept too");
    }

    #[test]
    fn a_lapsed_block_that_was_not_expired_yet_is_renewed() {
        let at = clock();
        let mut iso = isolation(1);
        iso.record_failure(addr("2001:db8::1"), None, at(0));
        assert!(!iso.is_blocked(addr("2001:db8::1"), at(300_000)));
        let got = iso.record_failure(addr("2001:db8::1"), None, at(300_000));
        assert_eq!(got.len(), 1);
        assert_eq!(iso.blocked(), vec![(addr("2001:db8::"), 64, at(600_000))]);
    }

    #[test]
    fn operator_removal() {
        let at = clock();
        let mut iso = isolation(2);
        for i in 0..2 {
            iso.record_failure(addr("2001:db8::7"), Some(ALICE), at(i));
        }
        let generation = iso.generation();
        assert!(!iso.remove_prefix(addr("2001:db8::"), 48), "another length");
        assert!(iso.remove_prefix(addr("2001:db8::1234"), 64));
        assert!(
            !iso.remove_prefix(addr("2001:db8::"), 64),
            "already removed"
        );
        assert!(iso.remove_identity(&ALICE));
        assert!(!iso.remove_identity(&ALICE));
        assert_eq!(iso.generation(), generation + 2);
        assert!(iso.blocked().is_empty() && iso.suspended().is_empty());
        // The scores went too: the next failure starts from one.
        assert!(
            iso.record_failure(addr("2001:db8::7"), Some(ALICE), at(3))
                .is_empty()
        );
    }

    #[test]
    fn a_closed_window_restarts_the_count() {
        let at = clock();
        let mut iso = isolation(3);
        let source = addr("2001:db8::1");
        iso.record_failure(source, Some(BOB), at(0));
        iso.record_failure(source, Some(BOB), at(9_999));
        // The window opened at 0 closes at 10 s: this is failure one again.
        assert!(iso.record_failure(source, Some(BOB), at(10_000)).is_empty());
        assert!(iso.record_failure(source, Some(BOB), at(10_001)).is_empty());
        assert_eq!(iso.record_failure(source, Some(BOB), at(10_002)).len(), 2);
    }

    #[test]
    fn exempt_prefixes_are_scored_but_never_blocked() {
        let at = clock();
        let mut iso = Isolation::new(IsolationConfig {
            threshold: 1,
            identity_threshold: 1,
            exempt: vec![
                (addr("2001:db8:0:1::53"), 128),
                (addr("2001:db8:ff00::"), 40),
            ],
            ..IsolationConfig::default()
        })
        .unwrap();
        // The exempt host, a neighbour in its /64, a /64 inside the exempt
        // /40: none is blocked, but the identity still is suspended.
        let got = iso.record_failure(addr("2001:db8:0:1::53"), Some(ALICE), at(0));
        assert_eq!(got.len(), 1);
        assert!(matches!(got[0], Isolated::Identity { .. }));
        assert!(
            iso.record_failure(addr("2001:db8:0:1::54"), None, at(1))
                .is_empty()
        );
        assert!(
            iso.record_failure(addr("2001:db8:ff12::1"), None, at(2))
                .is_empty()
        );
        assert!(iso.blocked().is_empty());
        // Outside both: blocked.
        assert_eq!(
            iso.record_failure(addr("2001:db8:0:2::1"), None, at(3))
                .len(),
            1
        );
    }

    #[test]
    fn wider_prefixes_gather_more_sources() {
        let at = clock();
        let mut iso = Isolation::new(IsolationConfig {
            threshold: 2,
            ipv6_prefix_len: 48,
            ..IsolationConfig::default()
        })
        .unwrap();
        iso.record_failure(addr("2001:db8:5:1::1"), None, at(0));
        let got = iso.record_failure(addr("2001:db8:5:2::1"), None, at(1));
        assert!(matches!(
            got[..],
            [Isolated::Prefix { addr: a, len: 48, .. }] if a == addr("2001:db8:5::")
        ));
    }

    #[test]
    fn memory_stays_bounded_under_a_flood_of_distinct_sources() {
        let at = clock();
        let mut iso = isolation(1);
        let sources = 200_000u64;
        for i in 0..sources {
            let source = Ipv6Addr::from((u128::from(i) + 1) << 64);
            let mut identity = [0u8; 32];
            identity[..8].copy_from_slice(&i.to_be_bytes());
            let got = iso.record_failure(source, Some(Identity(identity)), at(i));
            assert_eq!(got.len(), 2);
        }
        let caps = [
            SCORES_MAX,
            SCORES_MAX,
            SCORES_MAX,
            SCORES_MAX,
            BLOCKED_MAX,
            BLOCKED_MAX,
            SUSPENDED_MAX,
            SUSPENDED_MAX,
        ];
        assert_eq!(iso.table_lens(), caps, "full, and not beyond");
        // The newest are kept, the oldest dropped.
        let last = Ipv6Addr::from(u128::from(sources) << 64);
        assert!(iso.is_blocked(last, at(sources)));
        assert!(!iso.is_blocked(Ipv6Addr::from(1u128 << 64), at(sources)));
    }

    #[test]
    fn config_is_checked() {
        type Change = fn(&mut IsolationConfig);
        let with = |f: Change| {
            let mut config = IsolationConfig::default();
            f(&mut config);
            config.check()
        };
        assert_eq!(with(|_| {}), Ok(()));
        assert_eq!(with(|c| c.ipv6_prefix_len = 16), Ok(()));
        assert_eq!(with(|c| c.ipv6_prefix_len = 128), Ok(()));
        let refused: [(&str, Change); 9] = [
            ("ipv6_prefix_len = 0", |c| c.ipv6_prefix_len = 0),
            ("ipv6_prefix_len = 8", |c| c.ipv6_prefix_len = 8),
            ("ipv6_prefix_len = 129", |c| c.ipv6_prefix_len = 129),
            ("threshold = 0", |c| c.threshold = 0),
            ("identity_threshold = 0", |c| c.identity_threshold = 0),
            ("window = 0ns", |c| c.window = Duration::ZERO),
            ("ttl = ", |c| c.ttl = TTL_MAX + Duration::from_secs(1)),
            ("exempt prefix ::/129", |c| {
                c.exempt = vec![(Ipv6Addr::UNSPECIFIED, 129)]
            }),
            ("exempt lists 1025", |c| {
                c.exempt = vec![(Ipv6Addr::UNSPECIFIED, 0); EXEMPT_LEN_MAX + 1]
            }),
        ];
        for (want, f) in refused {
            let err = with(f).unwrap_err();
            assert!(err.contains(want), "{err:?} should say {want:?}");
            assert!(err.contains("allowed"), "{err:?} names no allowed values");
        }
        let bad = IsolationConfig {
            ipv6_prefix_len: 129,
            ..IsolationConfig::default()
        };
        assert!(Isolation::new(bad).is_err());
    }
}
