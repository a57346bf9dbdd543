//! A simulated path for congestion controllers (tests only).
//!
//! One always-backlogged sender drives a `quinn_proto::congestion::Controller` through the
//! trait as quinn-proto's connection does: `on_sent` once per send batch (a GSO batch of up to
//! [`GSO_BATCH_DATAGRAMS`]), `on_ack` per newly acknowledged packet then `on_end_acks` per ACK,
//! `on_congestion_event` with the newest lost packet's send time and the lost bytes (or with
//! zero bytes for an ECN-CE increase), the window gating what may be in flight, and pacing at
//! `pacing_rate()` where the controller sets one or, where not, at quinn's published rate of
//! 1.25 windows per smoothed RTT. Loss detection follows RFC 9002 as quinn implements it
//! (packet threshold 3, time threshold 9/8 RTT, PTO probes), less persistent congestion,
//! which the paths here do not produce.
//!
//! The path is one bottleneck of fixed rate with a drop-tail queue bounded in bytes, random
//! loss ahead of it, a fixed propagation delay, and a receiver that acknowledges every second
//! packet, at once after a gap, or after 25 ms. Time is simulated and the randomness seeded:
//! every run of a test sees the same events.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::{Duration, Instant};

use quinn_proto::RttEstimator;
use quinn_proto::congestion::Controller;

use super::bbr3::SplitMix64;

/// Datagram size of the simulated sender (quinn's initial MTU)
pub(crate) const MTU: u16 = 1200;
/// Datagrams per send batch, as quinn's `poll_transmit` builds a GSO batch
const GSO_BATCH_DATAGRAMS: u64 = 10;
/// The receiver's `max_ack_delay` (quinn's default)
const MAX_ACK_DELAY: Duration = Duration::from_millis(25);
/// quinn's `initial_rtt` before the first sample
const INITIAL_RTT: Duration = Duration::from_millis(333);
/// RFC 9002 §6.1: packet and time thresholds, and the timer granularity
const PACKET_THRESHOLD: u64 = 3;
const TIME_THRESHOLD: f64 = 9.0 / 8.0;
const GRANULARITY: Duration = Duration::from_millis(1);
/// quinn's pacer: bursts of 2 ms, 10 to 256 datagrams
const BURST_INTERVAL: Duration = Duration::from_millis(2);
const BURST_DATAGRAMS_MIN: u64 = 10;
const BURST_DATAGRAMS_MAX: u64 = 256;
/// Bound on processed events: a run that exceeds it has a bug, not a slow path.
const EVENTS_MAX: u64 = 50_000_000;

/// The simulated path
#[derive(Debug, Clone)]
pub(crate) struct Path {
    pub(crate) bottleneck_bytes_per_s: u64,
    /// Round-trip propagation delay, half each way
    pub(crate) base_rtt: Duration,
    /// Drop-tail bound of the bottleneck queue, the datagram in service included
    pub(crate) queue_bytes: u64,
    /// Probability that a datagram is lost ahead of the bottleneck
    pub(crate) loss_rate: f64,
    /// From this time on, every datagram leaves the bottleneck marked ECN-CE.
    pub(crate) ce_marks_from: Option<Duration>,
    /// From this time on, the round-trip propagation delay is this (a longer route).
    pub(crate) base_rtt_change: Option<(Duration, Duration)>,
    pub(crate) seed: u64,
}

impl Path {
    /// A clean path: no random loss, no marks
    pub(crate) fn clean(bottleneck_bytes_per_s: u64, base_rtt: Duration, queue_bytes: u64) -> Self {
        Self {
            bottleneck_bytes_per_s,
            base_rtt,
            queue_bytes,
            loss_rate: 0.0,
            ce_marks_from: None,
            base_rtt_change: None,
            seed: 1,
        }
    }

    /// Bandwidth-delay product of the unloaded path
    pub(crate) fn bdp_bytes(&self) -> u64 {
        (self.bottleneck_bytes_per_s as f64 * self.base_rtt.as_secs_f64()) as u64
    }

    fn base_rtt_at(&self, elapsed: Duration) -> Duration {
        match self.base_rtt_change {
            Some((from, rtt)) if elapsed >= from => rtt,
            _ => self.base_rtt,
        }
    }
}

/// What a run measured, over its measurement window
#[derive(Debug, Clone)]
pub(crate) struct Report {
    /// Acknowledged bytes per second
    pub(crate) goodput_bytes_per_s: f64,
    /// Mean and maximum wait in the bottleneck queue of the datagrams sent
    pub(crate) queue_delay_mean: Duration,
    pub(crate) queue_delay_max: Duration,
    pub(crate) datagrams_sent: u64,
    pub(crate) datagrams_lost: u64,
}

/// What an observer sees after each ACK and each loss detection
pub(crate) struct Observation {
    /// Since the start of the run
    pub(crate) elapsed: Duration,
    pub(crate) bytes_in_flight: u64,
}

/// Drives the controller that `build` makes at the start over `path` for `duration`,
/// measuring from `measure_from` on; returns what it measured and the controller.
///
/// `observe` sees the controller after each ACK and each loss detection.
pub(crate) fn run<C: Controller>(
    build: impl FnOnce(Instant) -> C,
    path: &Path,
    duration: Duration,
    measure_from: Duration,
    mut observe: impl FnMut(&C, &Observation),
) -> (Report, C) {
    let start = Instant::now();
    let mut controller = build(start);
    let mut sim = Simulation::new(path.clone(), start, measure_from);
    let end = start + duration;
    let mut events = 0;
    sim.sender
        .try_send(&mut controller, &mut sim.link, &mut sim.queue, start);
    loop {
        events += 1;
        assert!(events < EVENTS_MAX, "the simulation does not advance");
        let next_event = sim.queue.peek().map(|Reverse(event)| event.at);
        let next_timer = sim.next_timer();
        let now = match (next_event, next_timer) {
            (Some(event), Some(timer)) => event.min(timer),
            (Some(at), None) | (None, Some(at)) => at,
            (None, None) => break,
        };
        if now >= end {
            break;
        }
        if next_event == Some(now) {
            let Reverse(event) = sim.queue.pop().expect("peeked");
            sim.handle(&mut controller, event, &mut observe);
        } else {
            sim.handle_timers(&mut controller, now, &mut observe);
        }
        sim.sender
            .try_send(&mut controller, &mut sim.link, &mut sim.queue, now);
    }
    (sim.report(end), controller)
}

struct Simulation {
    start: Instant,
    measure_from: Instant,
    queue: BinaryHeap<Reverse<Event>>,
    link: Link,
    receiver: Receiver,
    sender: Sender,
}

impl Simulation {
    fn new(path: Path, start: Instant, measure_from: Duration) -> Self {
        let measure_from = start + measure_from;
        Self {
            start,
            measure_from,
            queue: BinaryHeap::new(),
            receiver: Receiver::default(),
            sender: Sender::new(start, measure_from),
            link: Link::new(path, start, measure_from),
        }
    }

    fn next_timer(&self) -> Option<Instant> {
        [
            self.receiver.ack_timer,
            self.sender.pacing_wake,
            self.sender.loss_time,
            self.sender.pto_at(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn handle<C: Controller>(
        &mut self,
        controller: &mut C,
        event: Event,
        observe: &mut impl FnMut(&C, &Observation),
    ) {
        match event.kind {
            EventKind::Arrival { pn, ce } => {
                if let Some(ack) = self.receiver.on_arrival(event.at, pn, ce) {
                    self.send_ack(event.at, ack);
                }
            }
            EventKind::Ack(ack) => {
                self.sender.on_ack(controller, event.at, &ack);
                observe(controller, &self.observation(event.at));
            }
        }
    }

    fn handle_timers<C: Controller>(
        &mut self,
        controller: &mut C,
        now: Instant,
        observe: &mut impl FnMut(&C, &Observation),
    ) {
        if self.receiver.ack_timer.is_some_and(|at| at <= now) {
            let ack = self.receiver.ack(now);
            self.send_ack(now, ack);
        }
        if self.sender.pacing_wake.is_some_and(|at| at <= now) {
            self.sender.pacing_wake = None;
        }
        if self.sender.loss_time.is_some_and(|at| at <= now) {
            self.sender.detect_lost(controller, now);
            observe(controller, &self.observation(now));
        }
        if self.sender.pto_at().is_some_and(|at| at <= now) {
            self.sender
                .on_pto(controller, &mut self.link, &mut self.queue, now);
        }
    }

    fn send_ack(&mut self, now: Instant, ack: AckFrame) {
        let one_way = self.link.path.base_rtt_at(now - self.start) / 2;
        self.queue.push(Reverse(Event::new(
            now + one_way,
            &mut self.link.seq,
            EventKind::Ack(ack),
        )));
    }

    fn observation(&self, now: Instant) -> Observation {
        Observation {
            elapsed: now - self.start,
            bytes_in_flight: self.sender.in_flight,
        }
    }

    fn report(&self, end: Instant) -> Report {
        let window = end
            .saturating_duration_since(self.measure_from)
            .as_secs_f64();
        let queued = self.link.queued_datagrams.max(1);
        Report {
            goodput_bytes_per_s: self.sender.acked_bytes_measured as f64 / window,
            queue_delay_mean: self.link.queue_delay_total / queued as u32,
            queue_delay_max: self.link.queue_delay_max,
            datagrams_sent: self.sender.next_pn,
            datagrams_lost: self.sender.lost_datagrams,
        }
    }
}

struct Event {
    at: Instant,
    /// Ties break in the order events were made.
    seq: u64,
    kind: EventKind,
}

impl Event {
    fn new(at: Instant, seq: &mut u64, kind: EventKind) -> Self {
        *seq += 1;
        Self {
            at,
            seq: *seq,
            kind,
        }
    }
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Event {}

impl PartialOrd for Event {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Event {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

enum EventKind {
    /// A datagram reaches the receiver.
    Arrival { pn: u64, ce: bool },
    /// An ACK reaches the sender.
    Ack(AckFrame),
}

/// What an ACK frame tells the sender. The return path loses nothing, so listing the packets
/// received since the previous ACK says what ACK ranges would.
struct AckFrame {
    /// Ascending
    pns: Vec<u64>,
    ack_delay: Duration,
    ce_total: u64,
}

/// The bottleneck: random loss, then a drop-tail queue served at the bottleneck rate
struct Link {
    path: Path,
    start: Instant,
    measure_from: Instant,
    random: SplitMix64,
    /// When the datagram now last in the queue will have left it
    free_at: Instant,
    seq: u64,
    queued_datagrams: u64,
    queue_delay_total: Duration,
    queue_delay_max: Duration,
}

impl Link {
    fn new(path: Path, start: Instant, measure_from: Instant) -> Self {
        Self {
            random: SplitMix64::new(path.seed),
            path,
            start,
            measure_from,
            free_at: start,
            seq: 0,
            queued_datagrams: 0,
            queue_delay_total: Duration::ZERO,
            queue_delay_max: Duration::ZERO,
        }
    }

    /// Returns whether the datagram got through (into the queue).
    fn enqueue(&mut self, queue: &mut BinaryHeap<Reverse<Event>>, now: Instant, pn: u64) -> bool {
        if self.random.unit() < self.path.loss_rate {
            return false;
        }
        let rate = self.path.bottleneck_bytes_per_s as f64;
        let backlog = self.free_at.saturating_duration_since(now);
        let backlog_bytes = (backlog.as_secs_f64() * rate) as u64;
        let size = u64::from(MTU);
        if backlog_bytes + size > self.path.queue_bytes {
            return false;
        }
        let wait = backlog;
        self.free_at = self.free_at.max(now) + Duration::from_secs_f64(size as f64 / rate);
        if now >= self.measure_from {
            self.queued_datagrams += 1;
            self.queue_delay_total += wait;
            self.queue_delay_max = self.queue_delay_max.max(wait);
        }
        let elapsed = self.free_at - self.start;
        let ce = self.path.ce_marks_from.is_some_and(|from| elapsed >= from);
        let arrival = self.free_at + self.path.base_rtt_at(elapsed) / 2;
        queue.push(Reverse(Event::new(
            arrival,
            &mut self.seq,
            EventKind::Arrival { pn, ce },
        )));
        true
    }
}

#[derive(Default)]
struct Receiver {
    largest: Option<u64>,
    pending: Vec<u64>,
    largest_received_at: Option<Instant>,
    ack_timer: Option<Instant>,
    ce_total: u64,
}

impl Receiver {
    /// Returns the ACK to send now, if one is due.
    fn on_arrival(&mut self, now: Instant, pn: u64, ce: bool) -> Option<AckFrame> {
        self.ce_total += u64::from(ce);
        // RFC 9000 §13.2.1: acknowledge at once when packets arrive out of order.
        let out_of_order = self.largest.map_or(pn != 0, |largest| pn != largest + 1);
        self.largest = Some(self.largest.map_or(pn, |largest| largest.max(pn)));
        self.pending.push(pn);
        self.largest_received_at = Some(now);
        if out_of_order || self.pending.len() >= 2 {
            return Some(self.ack(now));
        }
        self.ack_timer.get_or_insert(now + MAX_ACK_DELAY);
        None
    }

    fn ack(&mut self, now: Instant) -> AckFrame {
        self.ack_timer = None;
        let received = self.largest_received_at.unwrap_or(now);
        AckFrame {
            pns: std::mem::take(&mut self.pending),
            ack_delay: now - received,
            ce_total: self.ce_total,
        }
    }
}

struct SentPacket {
    time: Instant,
    size: u64,
}

/// RFC 9002 RTT estimation, as quinn's `RttEstimator::update` does it
struct RttState {
    latest: Duration,
    smoothed: Option<Duration>,
    var: Duration,
    min: Duration,
}

impl RttState {
    fn get(&self) -> Duration {
        self.smoothed.unwrap_or(self.latest)
    }

    fn update(&mut self, ack_delay: Duration, rtt: Duration) {
        self.latest = rtt;
        self.min = self.min.min(rtt);
        match self.smoothed {
            None => {
                self.smoothed = Some(rtt);
                self.var = rtt / 2;
                self.min = rtt;
            }
            Some(smoothed) => {
                let adjusted = if self.min + ack_delay <= rtt {
                    rtt - ack_delay
                } else {
                    rtt
                };
                self.var = (3 * self.var + smoothed.abs_diff(adjusted)) / 4;
                self.smoothed = Some((7 * smoothed + adjusted) / 8);
            }
        }
    }
}

struct Sender {
    measure_from: Instant,
    next_pn: u64,
    sent: BTreeMap<u64, SentPacket>,
    in_flight: u64,
    largest_acked: Option<u64>,
    largest_acked_sent: Instant,
    rtt: RttState,
    pacer: Pacer,
    pacing_wake: Option<Instant>,
    loss_time: Option<Instant>,
    last_ack_eliciting_sent: Instant,
    pto_count: u32,
    ce_seen: u64,
    acked_bytes_measured: u64,
    lost_datagrams: u64,
}

impl Sender {
    fn new(start: Instant, measure_from: Instant) -> Self {
        Self {
            measure_from,
            next_pn: 0,
            sent: BTreeMap::new(),
            in_flight: 0,
            largest_acked: None,
            largest_acked_sent: start,
            rtt: RttState {
                latest: INITIAL_RTT,
                smoothed: None,
                var: INITIAL_RTT / 2,
                min: INITIAL_RTT,
            },
            pacer: Pacer::new(start),
            pacing_wake: None,
            loss_time: None,
            last_ack_eliciting_sent: start,
            pto_count: 0,
            ce_seen: 0,
            acked_bytes_measured: 0,
            lost_datagrams: 0,
        }
    }

    /// Sends while the window and the pacer allow, in batches as quinn's `poll_transmit`.
    fn try_send<C: Controller>(
        &mut self,
        controller: &mut C,
        link: &mut Link,
        queue: &mut BinaryHeap<Reverse<Event>>,
        now: Instant,
    ) {
        if self.pacing_wake.is_some() {
            return;
        }
        let size = u64::from(MTU);
        loop {
            let mut batch = 0;
            while batch < GSO_BATCH_DATAGRAMS {
                // quinn: blocked once one more datagram would reach the window
                if self.in_flight + size >= controller.window() {
                    break;
                }
                let rate = controller.pacing_rate();
                let window = controller.window();
                if let Some(at) = self.pacer.delay(rate, window, self.rtt.get(), now) {
                    self.pacing_wake = Some(at);
                    break;
                }
                self.transmit(link, queue, now);
                batch += 1;
            }
            if batch == 0 {
                return;
            }
            controller.on_sent(now, batch * size, self.next_pn - 1);
            if batch < GSO_BATCH_DATAGRAMS {
                return;
            }
        }
    }

    fn transmit(&mut self, link: &mut Link, queue: &mut BinaryHeap<Reverse<Event>>, now: Instant) {
        let size = u64::from(MTU);
        let pn = self.next_pn;
        self.next_pn += 1;
        self.sent.insert(pn, SentPacket { time: now, size });
        self.in_flight += size;
        self.pacer.on_transmit(size);
        self.last_ack_eliciting_sent = now;
        link.enqueue(queue, now, pn);
    }

    fn on_ack<C: Controller>(&mut self, controller: &mut C, now: Instant, ack: &AckFrame) {
        let Some(&largest) = ack.pns.last() else {
            return;
        };
        let newly_acked: Vec<(u64, SentPacket)> = ack
            .pns
            .iter()
            .filter_map(|pn| Some((*pn, self.sent.remove(pn)?)))
            .collect();
        if newly_acked.is_empty() {
            return;
        }
        let new_largest = self.largest_acked.is_none_or(|acked| largest > acked);
        if new_largest {
            self.largest_acked = Some(largest);
            if let Some((_, packet)) = newly_acked.iter().find(|(pn, _)| *pn == largest) {
                self.largest_acked_sent = packet.time;
            }
        }
        // quinn hands its estimator over as it stood before this ACK's sample.
        let rtt = RttEstimator::new(self.rtt.get());
        for (_, packet) in &newly_acked {
            self.in_flight -= packet.size;
            if now >= self.measure_from {
                self.acked_bytes_measured += packet.size;
            }
            controller.on_ack(now, packet.time, packet.size, false, &rtt);
        }
        controller.on_end_acks(now, self.in_flight, false, self.largest_acked);
        if new_largest {
            let sample = now - self.largest_acked_sent;
            self.rtt.update(ack.ack_delay.min(MAX_ACK_DELAY), sample);
        }
        self.detect_lost(controller, now);
        self.pto_count = 0;
        if new_largest && ack.ce_total > self.ce_seen {
            self.ce_seen = ack.ce_total;
            controller.on_congestion_event(now, self.largest_acked_sent, false, 0);
        }
    }

    /// RFC 9002 §6.1, as quinn's `detect_lost_packets`
    fn detect_lost<C: Controller>(&mut self, controller: &mut C, now: Instant) {
        self.loss_time = None;
        let Some(largest_acked) = self.largest_acked else {
            return;
        };
        let loss_delay = self
            .rtt
            .latest
            .max(self.rtt.get())
            .mul_f64(TIME_THRESHOLD)
            .max(GRANULARITY);
        let lost_send_time = now.checked_sub(loss_delay);
        let mut lost = Vec::new();
        for (&pn, packet) in self.sent.range(..largest_acked) {
            if lost_send_time.is_some_and(|t| packet.time <= t)
                || largest_acked >= pn + PACKET_THRESHOLD
            {
                lost.push(pn);
            } else {
                let at = packet.time + loss_delay;
                self.loss_time = Some(self.loss_time.map_or(at, |t| t.min(at)));
            }
        }
        if lost.is_empty() {
            return;
        }
        let mut lost_bytes = 0;
        let mut newest_lost_sent = None;
        for pn in lost {
            let packet = self.sent.remove(&pn).expect("listed above");
            self.in_flight -= packet.size;
            lost_bytes += packet.size;
            newest_lost_sent = Some(packet.time);
            self.lost_datagrams += 1;
        }
        let sent = newest_lost_sent.expect("some packet was lost");
        controller.on_congestion_event(now, sent, false, lost_bytes);
    }

    fn pto_at(&self) -> Option<Instant> {
        if self.in_flight == 0 {
            return None;
        }
        let pto = self.rtt.get() + (4 * self.rtt.var).max(GRANULARITY) + MAX_ACK_DELAY;
        Some(self.last_ack_eliciting_sent + pto * 2u32.pow(self.pto_count.min(16)))
    }

    /// A probe timeout: one probe datagram, outside the window and the pacer, as quinn sends.
    fn on_pto<C: Controller>(
        &mut self,
        controller: &mut C,
        link: &mut Link,
        queue: &mut BinaryHeap<Reverse<Event>>,
        now: Instant,
    ) {
        self.pto_count += 1;
        self.transmit(link, queue, now);
        controller.on_sent(now, u64::from(MTU), self.next_pn - 1);
    }
}

/// quinn's token-bucket pacer: at the controller's rate where it sets one, else at 1.25
/// windows per smoothed RTT, in bursts of 2 ms (10 to 256 datagrams)
struct Pacer {
    tokens: u64,
    prev: Instant,
}

impl Pacer {
    fn new(now: Instant) -> Self {
        Self {
            tokens: BURST_DATAGRAMS_MIN * u64::from(MTU),
            prev: now,
        }
    }

    fn on_transmit(&mut self, bytes: u64) {
        self.tokens = self.tokens.saturating_sub(bytes);
    }

    /// When the next datagram may leave, if not now
    fn delay(
        &mut self,
        rate: Option<u64>,
        window: u64,
        smoothed_rtt: Duration,
        now: Instant,
    ) -> Option<Instant> {
        let size = u64::from(MTU);
        let bytes_per_s = match rate {
            Some(rate) => rate as f64,
            None if window > u64::from(u32::MAX) || smoothed_rtt.is_zero() => return None,
            None => window as f64 * 1.25 / smoothed_rtt.as_secs_f64(),
        };
        if bytes_per_s <= 0.0 {
            return None;
        }
        let burst = match rate {
            Some(_) => bytes_per_s * BURST_INTERVAL.as_secs_f64(),
            // The published pacer sizes bursts from the window, without the 1.25.
            None => window as f64 * BURST_INTERVAL.as_secs_f64() / smoothed_rtt.as_secs_f64(),
        };
        let mtu = size as f64;
        let capacity = burst.clamp(
            BURST_DATAGRAMS_MIN as f64 * mtu,
            BURST_DATAGRAMS_MAX as f64 * mtu,
        ) as u64;
        self.tokens = self.tokens.min(capacity);
        if self.tokens >= size {
            return None;
        }
        let elapsed = now.saturating_duration_since(self.prev).as_secs_f64();
        self.tokens = (self.tokens + (elapsed * bytes_per_s) as u64).min(capacity);
        self.prev = now;
        if self.tokens >= size {
            return None;
        }
        let missing = capacity.max(size) - self.tokens;
        Some(now + Duration::from_secs_f64(missing as f64 / bytes_per_s))
    }
}
