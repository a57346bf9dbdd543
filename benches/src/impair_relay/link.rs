//! One direction of the impaired path, sans-IO: datagrams arrive with
//! `handle_datagram(now, len)` and get a verdict (lost, dropped by the
//! queue or the relay's buffer bound, or the time to deliver them); the
//! caller reports each delivery with `handle_delivered`. Time is
//! nanoseconds on the caller's clock, so tests drive it on a simulated one.
//!
//! The model, in the order a datagram meets it:
//! 1. random loss with probability `loss` (seeded): a lost datagram takes
//!    no capacity, as netem's loss does;
//! 2. a bottleneck of `rate_bit_per_s` with a drop-tail queue: the
//!    datagram starts serialising at `max(now, free_at)` and occupies the
//!    link for its wire size (payload plus IPv6 and UDP headers) over the
//!    rate; one that would wait longer than `queue_ns` for the link is
//!    dropped, so the queue never holds more than `queue_ns` of traffic;
//! 3. a fixed one-way `delay_ns` after serialisation.
//!
//! The link is FIFO and the delay fixed, so deliveries come out in arrival
//! order.

use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// IPv6 (40) and UDP (8) headers: what a datagram costs on the wire beyond
/// its payload, so the rate is the link's, not the application's.
pub const WIRE_OVERHEAD_BYTES: usize = 48;
/// What one scheduled datagram costs the relay beyond its payload (the
/// heap entry and the allocation), counted against `buffer_bytes_max`.
pub const ENTRY_OVERHEAD_BYTES: usize = 64;
/// The queueing-delay histogram's range: 1 µs to 100 s (the longest queue
/// the relay accepts), 3 significant digits.
const QUEUE_US_HISTOGRAM_MAX: u64 = 100_000_000;

/// One direction's settings.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// The bottleneck; `None`: no bottleneck (and no queue).
    pub rate_bit_per_s: Option<u64>,
    /// The longest a datagram may wait for the bottleneck (only with a rate).
    pub queue_ns: u64,
    /// One-way delay after the bottleneck.
    pub delay_ns: u64,
    /// Probability that a datagram is lost, in [0, 1].
    pub loss: f64,
    /// Seed of the loss sequence: the same seed loses the same datagrams.
    pub seed: u64,
    /// The most bytes (payloads plus `ENTRY_OVERHEAD_BYTES` each) scheduled
    /// but not yet delivered; past it datagrams are dropped. The queue bound
    /// keeps a rate-limited link far below it; it bounds a fast link with a
    /// long delay.
    pub buffer_bytes_max: usize,
}

#[cfg(test)]
impl LinkConfig {
    /// No impairment at all: the tests' starting point.
    pub fn plain() -> Self {
        Self {
            rate_bit_per_s: None,
            queue_ns: 0,
            delay_ns: 0,
            loss: 0.0,
            seed: 1,
            buffer_bytes_max: 64 << 20,
        }
    }
}

/// What becomes of one datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Random loss.
    Lost,
    /// It would have waited longer than the queue bound.
    QueueFull,
    /// The relay's buffer bound (`buffer_bytes_max`) was reached.
    BufferFull,
    /// Deliver it at `at_ns`; it waited `queued_ns` for the bottleneck.
    Deliver { at_ns: u64, queued_ns: u64 },
}

/// The counters and the queueing-delay histogram of one direction.
#[derive(Clone, Debug)]
pub struct LinkStats {
    pub datagrams_in: u64,
    pub bytes_in: u64,
    pub dropped_loss: u64,
    pub dropped_queue: u64,
    pub dropped_buffer: u64,
    pub delivered: u64,
    pub delivered_bytes: u64,
    /// Scheduled datagrams whose send failed (socket buffer full, too big
    /// for the path, peer gone).
    pub send_errors: u64,
    /// Time waited before serialisation of every scheduled datagram, µs.
    pub queue_us: Histogram<u64>,
    /// The exact longest wait (the histogram rounds), ns.
    pub queued_ns_max: u64,
}

impl LinkStats {
    fn new() -> LinkStats {
        LinkStats {
            datagrams_in: 0,
            bytes_in: 0,
            dropped_loss: 0,
            dropped_queue: 0,
            dropped_buffer: 0,
            delivered: 0,
            delivered_bytes: 0,
            send_errors: 0,
            queue_us: Histogram::new_with_bounds(1, QUEUE_US_HISTOGRAM_MAX, 3)
                .expect("valid histogram bounds"),
            queued_ns_max: 0,
        }
    }

    pub fn to_json(&self) -> Value {
        let ms = |us: u64| us as f64 / 1000.0;
        let scheduled = !self.queue_us.is_empty();
        // The histogram reports a bucket's highest value, which can lie a
        // little above the exact longest wait (above --queue-ms): cap it.
        let max_us = self.queued_ns_max / 1000;
        let quantile =
            |q: f64| scheduled.then(|| ms(self.queue_us.value_at_quantile(q).min(max_us)));
        json!({
            "datagrams_in": self.datagrams_in,
            "bytes_in": self.bytes_in,
            "dropped_loss": self.dropped_loss,
            "dropped_queue": self.dropped_queue,
            "dropped_buffer": self.dropped_buffer,
            "delivered": self.delivered,
            "delivered_bytes": self.delivered_bytes,
            "send_errors": self.send_errors,
            "queue_ms_p50": quantile(0.5),
            "queue_ms_p99": quantile(0.99),
            "queue_ms_max": scheduled.then(|| self.queued_ns_max as f64 / 1e6),
        })
    }
}

/// One direction of the path.
pub struct Link {
    config: LinkConfig,
    /// When the bottleneck finishes the last datagram given to it.
    free_at_ns: u64,
    /// Remainder of the last serialisation time, in ns x rate, so that
    /// rounding to whole nanoseconds never drifts the rate.
    carry: u128,
    rng: SplitMix64,
    buffered_bytes: usize,
    stats: LinkStats,
}

impl Link {
    pub fn new(config: LinkConfig) -> Link {
        assert!((0.0..=1.0).contains(&config.loss), "loss is a probability");
        assert!(config.rate_bit_per_s != Some(0), "a rate is positive");
        Link {
            rng: SplitMix64(config.seed),
            config,
            free_at_ns: 0,
            carry: 0,
            buffered_bytes: 0,
            stats: LinkStats::new(),
        }
    }

    /// Call for every datagram read for this direction, with `now_ns`
    /// never going back. A `Deliver` verdict holds buffer room until
    /// `handle_delivered` is called for it.
    pub fn handle_datagram(&mut self, now_ns: u64, len: usize) -> Verdict {
        self.stats.datagrams_in += 1;
        self.stats.bytes_in += len as u64;
        if self.config.loss > 0.0 && self.rng.next_f64() < self.config.loss {
            self.stats.dropped_loss += 1;
            return Verdict::Lost;
        }
        let cost = len + ENTRY_OVERHEAD_BYTES;
        if self.buffered_bytes + cost > self.config.buffer_bytes_max {
            self.stats.dropped_buffer += 1;
            return Verdict::BufferFull;
        }
        let (departure_ns, queued_ns) = match self.config.rate_bit_per_s {
            None => (now_ns, 0),
            Some(rate) => {
                let start_ns = now_ns.max(self.free_at_ns);
                let queued_ns = start_ns - now_ns;
                if queued_ns > self.config.queue_ns {
                    self.stats.dropped_queue += 1;
                    return Verdict::QueueFull;
                }
                let bits = ((len + WIRE_OVERHEAD_BYTES) * 8) as u128;
                let scaled = bits * 1_000_000_000 + self.carry;
                self.carry = scaled % rate as u128;
                self.free_at_ns = start_ns + (scaled / rate as u128) as u64;
                (self.free_at_ns, queued_ns)
            }
        };
        self.buffered_bytes += cost;
        self.stats.queue_us.saturating_record(queued_ns / 1000);
        self.stats.queued_ns_max = self.stats.queued_ns_max.max(queued_ns);
        Verdict::Deliver {
            at_ns: departure_ns + self.config.delay_ns,
            queued_ns,
        }
    }

    /// Call once for every `Deliver` verdict, when its datagram was handed
    /// to the socket (`sent`) or failed to be.
    pub fn handle_delivered(&mut self, len: usize, sent: bool) {
        self.buffered_bytes -= len + ENTRY_OVERHEAD_BYTES;
        if sent {
            self.stats.delivered += 1;
            self.stats.delivered_bytes += len as u64;
        } else {
            self.stats.send_errors += 1;
        }
    }

    pub fn stats(&self) -> &LinkStats {
        &self.stats
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): a seeded generator good enough
/// for loss decisions, so the relay needs no RNG crate.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn config() -> LinkConfig {
        LinkConfig::plain()
    }

    /// 10 Mbit/s and a 1202-byte payload: 1250 bytes on the wire, 1 ms.
    const MS_PAYLOAD: usize = 1250 - WIRE_OVERHEAD_BYTES;

    #[test]
    fn burst_beyond_the_queue_bound_drops_the_excess() {
        let mut link = Link::new(LinkConfig {
            rate_bit_per_s: Some(10_000_000),
            queue_ns: 10 * MS,
            ..config()
        });
        let verdicts: Vec<Verdict> = (0..100)
            .map(|_| link.handle_datagram(0, MS_PAYLOAD))
            .collect();
        // The k-th waits k ms: those that wait 0..=10 ms fit, the rest do not.
        for (k, v) in verdicts.iter().enumerate() {
            if k <= 10 {
                let k = k as u64;
                assert_eq!(
                    *v,
                    Verdict::Deliver {
                        at_ns: (k + 1) * MS,
                        queued_ns: k * MS
                    },
                    "datagram {k}"
                );
            } else {
                assert_eq!(*v, Verdict::QueueFull, "datagram {k}");
            }
        }
        assert_eq!(link.stats().dropped_queue, 89);
        // Once the queue has drained, the link takes datagrams again.
        assert_eq!(
            link.handle_datagram(11 * MS, MS_PAYLOAD),
            Verdict::Deliver {
                at_ns: 12 * MS,
                queued_ns: 0
            }
        );
    }

    #[test]
    fn a_saturated_link_delivers_at_the_configured_rate() {
        // 7 Mbit/s offered 14 Mbit/s of mixed sizes for 10 simulated
        // seconds: the deliveries leave at exactly the link's rate.
        let rate = 7_000_000;
        let mut link = Link::new(LinkConfig {
            rate_bit_per_s: Some(rate),
            queue_ns: 50 * MS,
            delay_ns: 20 * MS,
            ..config()
        });
        let sizes = [1200, 80, 1452, 33, 600];
        let mut now = 0;
        let mut i = 0;
        let mut delivered = Vec::new();
        while now < 10_000 * MS {
            let len = sizes[i % sizes.len()];
            i += 1;
            if let Verdict::Deliver { at_ns, .. } = link.handle_datagram(now, len) {
                delivered.push((at_ns, len));
            }
            // The offered load: this datagram's wire time at twice the rate.
            now += ((len + WIRE_OVERHEAD_BYTES) * 8) as u64 * 1_000_000_000 / (2 * rate);
        }
        assert!(link.stats().dropped_queue > 0, "the link was not saturated");
        // From the first departure to the last, the link carried every
        // wire bit after the first datagram's.
        let (first_at, _) = delivered[0];
        let (last_at, _) = *delivered.last().unwrap();
        let bits: usize = delivered[1..]
            .iter()
            .map(|(_, len)| (len + WIRE_OVERHEAD_BYTES) * 8)
            .sum();
        let measured = bits as f64 / ((last_at - first_at) as f64 / 1e9);
        let error = (measured - rate as f64).abs() / rate as f64;
        assert!(
            error < 1e-6,
            "delivered {measured} bit/s on a {rate} bit/s link"
        );
        // Deliveries keep arrival order.
        assert!(delivered.windows(2).all(|w| w[0].0 <= w[1].0));
    }

    #[test]
    fn delay_is_added_after_serialisation() {
        let mut plain = Link::new(LinkConfig {
            delay_ns: 10 * MS,
            ..config()
        });
        assert_eq!(
            plain.handle_datagram(3 * MS, 1400),
            Verdict::Deliver {
                at_ns: 13 * MS,
                queued_ns: 0
            }
        );
        let mut bottleneck = Link::new(LinkConfig {
            rate_bit_per_s: Some(10_000_000),
            queue_ns: 50 * MS,
            delay_ns: 10 * MS,
            ..config()
        });
        // 1 ms on the wire, then 10 ms of delay.
        assert_eq!(
            bottleneck.handle_datagram(3 * MS, MS_PAYLOAD),
            Verdict::Deliver {
                at_ns: 14 * MS,
                queued_ns: 0
            }
        );
    }

    #[test]
    fn loss_follows_the_probability_and_the_seed() {
        let run = |loss, seed| {
            let mut link = Link::new(LinkConfig {
                loss,
                seed,
                ..config()
            });
            let lost: Vec<bool> = (0..100_000)
                .map(|_| link.handle_datagram(0, 100) == Verdict::Lost)
                .collect();
            // Lost datagrams hold no buffer room; give the rest back.
            for _ in lost.iter().filter(|l| !**l) {
                link.handle_delivered(100, true);
            }
            lost
        };
        let count = |v: &[bool]| v.iter().filter(|l| **l).count();
        let one_percent = run(0.01, 7);
        // 1000 expected, sigma about 31: five sigma either way.
        let lost = count(&one_percent);
        assert!((843..=1157).contains(&lost), "lost {lost} of 100000 at 1%");
        assert_eq!(run(0.01, 7), one_percent, "the same seed, the same losses");
        assert_ne!(run(0.01, 8), one_percent, "another seed, other losses");
        assert_eq!(count(&run(0.0, 7)), 0);
        assert_eq!(count(&run(1.0, 7)), 100_000);
    }

    #[test]
    fn queueing_delay_never_exceeds_the_bound() {
        // Random sizes (up to the largest datagram) at random gaps that
        // overload a 2 Mbit/s link with a 30 ms queue.
        let queue_ns = 30 * MS;
        let mut link = Link::new(LinkConfig {
            rate_bit_per_s: Some(2_000_000),
            queue_ns,
            delay_ns: 5 * MS,
            ..config()
        });
        let mut rng = SplitMix64(42);
        let mut now = 0;
        let mut scheduled = 0;
        for _ in 0..20_000 {
            now += rng.next_u64() % (4 * MS);
            let len = (rng.next_u64() % 65_536) as usize;
            match link.handle_datagram(now, len) {
                Verdict::Deliver { at_ns, queued_ns } => {
                    assert!(queued_ns <= queue_ns, "waited {queued_ns} ns");
                    assert!(at_ns >= now + queued_ns + 5 * MS);
                    link.handle_delivered(len, true);
                    scheduled += 1;
                }
                Verdict::QueueFull => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        let stats = link.stats();
        assert!(scheduled > 0 && stats.dropped_queue > 0);
        assert!(stats.queued_ns_max <= queue_ns);
        assert!(stats.queued_ns_max > queue_ns / 2, "the queue never filled");
        let json = stats.to_json();
        assert!(json["queue_ms_p99"].as_f64().unwrap() <= 30.0);
        assert!(json["queue_ms_max"].as_f64().unwrap() <= 30.0);
    }

    #[test]
    fn buffered_bytes_are_bounded_and_given_back() {
        // No bottleneck, a long delay: only the buffer bound holds memory.
        let mut link = Link::new(LinkConfig {
            delay_ns: 1000 * MS,
            buffer_bytes_max: 10 * (1000 + ENTRY_OVERHEAD_BYTES),
            ..config()
        });
        for _ in 0..10 {
            assert!(matches!(
                link.handle_datagram(0, 1000),
                Verdict::Deliver { .. }
            ));
        }
        assert_eq!(link.handle_datagram(0, 1000), Verdict::BufferFull);
        link.handle_delivered(1000, false);
        assert!(matches!(
            link.handle_datagram(0, 1000),
            Verdict::Deliver { .. }
        ));
        let stats = link.stats();
        assert_eq!(
            (stats.dropped_buffer, stats.send_errors, stats.datagrams_in),
            (1, 1, 12)
        );
    }

    #[test]
    fn empty_and_largest_datagrams_are_modelled() {
        let mut link = Link::new(LinkConfig {
            rate_bit_per_s: Some(1_000_000),
            queue_ns: 1000 * MS,
            ..config()
        });
        assert!(matches!(
            link.handle_datagram(0, 0),
            Verdict::Deliver { .. }
        ));
        // 65535 + 48 bytes at 1 Mbit/s: 524.664 ms on the wire, after the
        // empty datagram's 0.384 ms.
        assert_eq!(
            link.handle_datagram(0, 65_535),
            Verdict::Deliver {
                at_ns: 384_000 + 524_664_000,
                queued_ns: 384_000
            }
        );
        assert_eq!(link.stats().bytes_in, 65_535);
    }
}
