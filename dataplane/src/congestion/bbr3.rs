//! BBRv3, as draft-ietf-ccwg-bbr-06 specifies it, behind quinn-proto's `Controller`.
//!
//! State variables keep the draft's names (`max_bw`, `inflight_longterm`, `bw_shortterm`, …)
//! so that each can be looked up there, rather than names with units last; earlier drafts
//! (BBRv2) called `inflight_longterm`, `bw_shortterm` and `inflight_shortterm` `inflight_hi`,
//! `bw_lo` and `inflight_lo`. Volumes are in bytes and rates in bytes per second throughout;
//! the draft's "Infinity" is `u64::MAX` (`UNBOUNDED`) or `None`.
//!
//! # What quinn tells a controller, and what the draft needs
//!
//! The draft samples the delivery rate from per-packet state (§4.1.2.1.2) taken when a packet
//! is sent and read when it is acknowledged. quinn's `Controller` interface hands over the
//! send time of each acknowledged packet but no packet number, and the losses of a detection
//! batch as one total with the send time of the newest lost packet. So this controller keeps
//! its own per-send records ([`SendRecords`]), one per `on_sent` call (a GSO batch: the draft's
//! "aggregate", §4.1.3.1), found again by send time. We keep them here rather than patch quinn
//! to carry a per-packet payload: the records need nothing from quinn that the interface does
//! not already give, and they cost nothing to connections with other controllers.
//!
//! The records are bounded ([`SEND_RECORDS_MAX`]): a peer that never acknowledges (or a flow
//! of ACK-only packets, which quinn also reports through `on_sent`) cannot grow them. Records
//! older than the newest acknowledged or lost one are dropped, since quinn reports an
//! acknowledgement, or declares a loss, in send order within each batch.
//!
//! # Left out, and why
//!
//! - Undo after a spurious loss recovery (§5.5.11): quinn does not tell a controller that a
//!   recovery was spurious.
//! - The "discontiguous lost ranges" of the Startup loss exit (§5.3.1.3) are counted as loss
//!   detection events, one per `on_congestion_event`: quinn reports losses in batches, not
//!   ranges.
//! - ECN: the draft asks only that CE marks count as congestion (§3.7). quinn reports a CE
//!   increase as `on_congestion_event` with `lost_bytes == 0`; this controller counts it as
//!   one lost datagram in its loss model (not in its in-flight count). Marks then act as
//!   losses do: a round with marks cuts the short-term model (§5.5.10.3), and marks past the
//!   2% loss threshold end a bandwidth probe and lower `inflight_longterm` (§5.5.10.2).

use std::any::Any;
use std::collections::VecDeque;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn_proto::RttEstimator;
use quinn_proto::congestion::{Controller, ControllerFactory, ControllerMetrics};

/// §2.5: the smallest pacing gain that doubles the sending rate each round (4 ln 2).
const STARTUP_PACING_GAIN: f64 = 2.77;
/// §2.5 and §5.3.2: drains the Startup queue in less than one round.
const DRAIN_PACING_GAIN: f64 = 0.5;
/// §2.6: the cwnd gain of most states.
const DEFAULT_CWND_GAIN: f64 = 2.0;
/// §5.3.3.1: ProbeBW_DOWN sends at 90% of `bw`.
const PROBE_BW_DOWN_PACING_GAIN: f64 = 0.9;
/// §5.3.3.5: ProbeBW_UP sends 25% faster than `bw`, with room in cwnd to do so.
const PROBE_BW_UP_PACING_GAIN: f64 = 1.25;
const PROBE_BW_UP_CWND_GAIN: f64 = 2.25;
/// §5.3.4.1: ProbeRTT holds in flight to half the estimated BDP.
const PROBE_RTT_CWND_GAIN: f64 = 0.5;
/// §2.5: pace 1% below `bw` (`BBR.PacingMarginPercent`).
const PACING_MARGIN: f64 = 0.99;
/// §2.8: the per-round loss rate above which in flight counts as too high.
const LOSS_THRESH: f64 = 0.02;
/// §2.8: the multiplicative decrease per round with loss.
const BETA: f64 = 0.7;
/// §2.8: the share of `inflight_longterm` left free for other flows.
const HEADROOM: f64 = 0.15;
/// §2.8: the cwnd floor, in datagrams (`BBR.MinPipeCwnd`).
const MIN_PIPE_CWND_DATAGRAMS: u64 = 4;
/// §5.3.1.2: rounds without 25% growth that mean the pipe is full.
const FULL_BW_GROWTH: f64 = 1.25;
const FULL_BW_ROUNDS: u32 = 3;
/// §5.3.1.3: loss events in a round that may end Startup.
const STARTUP_FULL_LOSS_COUNT: u32 = 6;
/// §5.3.2: Drain gives up after this many rounds.
const DRAIN_ROUNDS_MAX: u64 = 3;
/// §2.16.1: the `min_rtt` filter window.
const MIN_RTT_FILTER_LEN: Duration = Duration::from_secs(10);
/// §2.16.2: a ProbeRTT is due when `probe_rtt_min_delay` is this old.
const PROBE_RTT_INTERVAL: Duration = Duration::from_secs(5);
/// §2.16.2: the least time ProbeRTT holds in flight down.
const PROBE_RTT_DURATION: Duration = Duration::from_millis(200);
/// §2.12: the `extra_acked` filter window after Startup, in rounds.
const EXTRA_ACKED_FILTER_LEN: u64 = 10;
/// §5.3.3.9: the cap on the doubling of `inflight_longterm` growth in ProbeBW_UP.
const BW_PROBE_UP_ROUNDS_MAX: u32 = 30;
/// §5.3.3.8.3: the Reno-coexistence bound on rounds between bandwidth probes.
const RENO_PROBE_ROUNDS_MAX: u64 = 63;
/// §5.3.3.8.2: the wall-clock wait between probes is 2 s plus up to 1 s at random.
const PROBE_WAIT_BASE: Duration = Duration::from_secs(2);
const PROBE_WAIT_RANDOM: Duration = Duration::from_secs(1);
/// §5.6.3: the send quantum is 1 ms at the pacing rate, at most 64 KiB.
const SEND_QUANTUM_INTERVAL: Duration = Duration::from_millis(1);
const SEND_QUANTUM_MAX: u64 = 64 * 1024;
/// §5.6.2: the rate assumed before the first RTT sample (`InitialCwnd / 1 ms`).
const PACING_RTT_BEFORE_SAMPLE: Duration = Duration::from_millis(1);

/// Send records kept at most. With one record per `on_sent` call (a GSO batch of up to tens
/// of datagrams) this covers several thousand batches in flight; past it, new sends join the
/// newest record (see [`SendRecords::on_sent`]). At most 96 bytes each: 384 KiB at worst.
const SEND_RECORDS_MAX: usize = 4096;
const _: () = assert!(size_of::<SendRecord>() <= 96);

/// The draft's "Infinity" for volumes and rates.
const UNBOUNDED: u64 = u64::MAX;

/// quinn's default initial window: `min(10 * 1200, max(2 * 1200, 14720))` bytes.
const INITIAL_WINDOW_DEFAULT: u64 = 12_000;

/// Configuration and factory of [`Bbr3`] controllers
///
/// `Arc::new(Bbr3Config::default())` is a `quinn_proto::congestion::ControllerFactory` for
/// `TransportConfig::congestion_controller_factory`.
#[derive(Debug, Clone)]
pub struct Bbr3Config {
    initial_window: u64,
    /// Seed of the controller's random choices (probe timing, §5.3.3.8); `None` draws one.
    seed: Option<u64>,
}

impl Bbr3Config {
    /// The congestion window before any measurement (the draft's `C.InitialCwnd`, §5.6.4.1)
    ///
    /// Defaults to quinn's: 12 000 bytes.
    pub fn initial_window(&mut self, bytes: u64) -> &mut Self {
        self.initial_window = bytes;
        self
    }

    /// Makes the controller's random choices repeatable (tests).
    #[cfg(test)]
    pub(crate) fn seed(&mut self, seed: u64) -> &mut Self {
        self.seed = Some(seed);
        self
    }
}

impl Default for Bbr3Config {
    fn default() -> Self {
        Self {
            initial_window: INITIAL_WINDOW_DEFAULT,
            seed: None,
        }
    }
}

impl ControllerFactory for Bbr3Config {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Bbr3::new(self, now, current_mtu))
    }
}

/// The states of the BBR state machine (§5.1.1), ProbeBW's phases each their own
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bbr3State {
    /// Doubling the sending rate each round to find the bandwidth (§5.3.1)
    Startup,
    /// Draining the queue Startup built (§5.3.2)
    Drain,
    /// Sending below the bandwidth to drain the queue and leave headroom (§5.3.3.1)
    ProbeBwDown,
    /// Sending at the bandwidth (§5.3.3.2)
    ProbeBwCruise,
    /// Filling the pipe for one round before probing (§5.3.3.3)
    ProbeBwRefill,
    /// Sending above the bandwidth to probe for more (§5.3.3.4)
    ProbeBwUp,
    /// Holding in flight down to measure the propagation delay (§5.3.4)
    ProbeRtt,
}

impl Bbr3State {
    /// §5.6.1, the table's "Pacing Gain" column
    fn pacing_gain(self) -> f64 {
        match self {
            Self::Startup => STARTUP_PACING_GAIN,
            Self::Drain => DRAIN_PACING_GAIN,
            Self::ProbeBwDown => PROBE_BW_DOWN_PACING_GAIN,
            Self::ProbeBwCruise | Self::ProbeBwRefill | Self::ProbeRtt => 1.0,
            Self::ProbeBwUp => PROBE_BW_UP_PACING_GAIN,
        }
    }

    /// §5.6.1, the table's "Cwnd Gain" column
    fn cwnd_gain(self) -> f64 {
        match self {
            Self::ProbeBwUp => PROBE_BW_UP_CWND_GAIN,
            Self::ProbeRtt => PROBE_RTT_CWND_GAIN,
            _ => DEFAULT_CWND_GAIN,
        }
    }

    /// One of the four ProbeBW phases
    pub fn is_probe_bw(self) -> bool {
        matches!(
            self,
            Self::ProbeBwDown | Self::ProbeBwCruise | Self::ProbeBwRefill | Self::ProbeBwUp
        )
    }

    /// §5.3.3.9 `IsProbingBW`: the states that accelerate on purpose
    fn is_probing_bw(self) -> bool {
        matches!(self, Self::Startup | Self::ProbeBwRefill | Self::ProbeBwUp)
    }
}

/// §2.14 `BBR.ack_phase`: what the ACKs now arriving say about a bandwidth probe
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckPhase {
    Init,
    Refilling,
    ProbeStarting,
    ProbeFeedback,
    ProbeStopping,
}

/// A BBRv3 congestion controller (draft-ietf-ccwg-bbr-06)
///
/// Built by [`Bbr3Config`]; the module documentation says how it maps the draft onto quinn.
#[derive(Debug, Clone)]
pub struct Bbr3 {
    config: Arc<Bbr3Config>,
    mtu: u64,
    random: SplitMix64,

    // Connection delivery state (§2.2, §4.1.2.1.1)
    delivery: DeliveryState,
    records: SendRecords,
    /// The rate sample of the ACK being processed (§2.3, §4.1.2.1.3)
    rs: RateSample,
    ack_open: bool,
    /// Lifetime minimum RTT (`C.min_rtt`): rate samples over a shorter interval are noise.
    lifetime_min_rtt: Option<Duration>,
    cwnd_limited_this_round: bool,
    cwnd_limited_last_round: bool,
    /// When the current loss recovery episode began
    recovery_start: Option<Instant>,
    recovery_exited: bool,

    // Output control parameters (§2.4)
    cwnd: u64,
    pacing_rate: u64,
    pacing_rate_from_rtt: bool,
    send_quantum: u64,

    // General algorithm state (§2.7)
    state: Bbr3State,
    round_count: u64,
    round_start: bool,
    next_round_delivered: u64,
    idle_restart: bool,
    drain_start_round: u64,

    // Path model (§2.9–2.12)
    max_bw_filter: MaxBwFilter,
    cycle_count: u64,
    max_bw: u64,
    bw_shortterm: u64,
    bw: u64,
    min_rtt: Option<Duration>,
    min_rtt_stamp: Instant,
    extra_acked: u64,
    extra_acked_filter: RoundMaxFilter,
    extra_acked_interval_start: Instant,
    extra_acked_delivered: u64,
    max_inflight: u64,
    inflight_longterm: u64,
    inflight_shortterm: u64,
    bw_latest: u64,
    inflight_latest: u64,

    // Congestion signals (§2.10, §5.5.10)
    loss_round_delivered: u64,
    loss_round_start: bool,
    is_loss_in_round: bool,
    loss_round: LossRound,

    // Startup (§2.13)
    full_bw_reached: bool,
    full_bw_now: bool,
    full_bw: u64,
    full_bw_count: u32,

    // ProbeBW (§2.14)
    ack_phase: AckPhase,
    is_bw_probe_sample: bool,
    bw_probe_up_acked: u64,
    probe_up_acked_per_inc: u64,
    bw_probe_up_rounds: u32,
    rounds_since_probe_up: u64,
    bw_probe_wait: Duration,
    cycle_stamp: Instant,
    prev_probe_too_high: bool,
    prev_probe_precautionary: bool,

    // ProbeRTT (§2.16)
    prior_cwnd: u64,
    probe_rtt_min_delay: Option<Duration>,
    probe_rtt_min_stamp: Instant,
    probe_rtt_expired: bool,
    probe_rtt_done_stamp: Option<Instant>,
    probe_rtt_round_done: bool,
}

impl Bbr3 {
    /// A controller in Startup (§5.2.1 `OnInit`), at `now`, for datagrams of `current_mtu`
    pub fn new(config: Arc<Bbr3Config>, now: Instant, current_mtu: u16) -> Self {
        let seed = config
            .seed
            .unwrap_or_else(|| RandomState::new().hash_one(now));
        let initial_window = config.initial_window;
        let mut bbr = Self {
            config,
            mtu: u64::from(current_mtu),
            random: SplitMix64::new(seed),
            delivery: DeliveryState::new(now),
            records: SendRecords::default(),
            rs: RateSample::default(),
            ack_open: false,
            lifetime_min_rtt: None,
            cwnd_limited_this_round: false,
            cwnd_limited_last_round: false,
            recovery_start: None,
            recovery_exited: false,
            cwnd: initial_window,
            pacing_rate: 0,
            pacing_rate_from_rtt: false,
            send_quantum: 0,
            state: Bbr3State::Startup,
            round_count: 0,
            round_start: false,
            next_round_delivered: 0,
            idle_restart: false,
            drain_start_round: 0,
            max_bw_filter: MaxBwFilter::default(),
            cycle_count: 0,
            max_bw: 0,
            bw_shortterm: UNBOUNDED,
            bw: 0,
            min_rtt: None,
            min_rtt_stamp: now,
            extra_acked: 0,
            extra_acked_filter: RoundMaxFilter::default(),
            extra_acked_interval_start: now,
            extra_acked_delivered: 0,
            max_inflight: 0,
            inflight_longterm: UNBOUNDED,
            inflight_shortterm: UNBOUNDED,
            bw_latest: 0,
            inflight_latest: 0,
            loss_round_delivered: 0,
            loss_round_start: false,
            is_loss_in_round: false,
            loss_round: LossRound::default(),
            full_bw_reached: false,
            full_bw_now: false,
            full_bw: 0,
            full_bw_count: 0,
            ack_phase: AckPhase::Init,
            is_bw_probe_sample: false,
            bw_probe_up_acked: 0,
            probe_up_acked_per_inc: UNBOUNDED,
            bw_probe_up_rounds: 0,
            rounds_since_probe_up: 0,
            bw_probe_wait: Duration::ZERO,
            cycle_stamp: now,
            prev_probe_too_high: false,
            prev_probe_precautionary: false,
            prior_cwnd: 0,
            probe_rtt_min_delay: None,
            probe_rtt_min_stamp: now,
            probe_rtt_expired: false,
            probe_rtt_done_stamp: None,
            probe_rtt_round_done: false,
        };
        bbr.init_pacing_rate(PACING_RTT_BEFORE_SAMPLE);
        bbr.set_send_quantum();
        bbr
    }

    /// The state machine's current state
    pub fn state(&self) -> Bbr3State {
        self.state
    }

    /// `BBR.bw`: the bandwidth the model sends at (before the pacing gain), bytes per second
    pub fn bw(&self) -> u64 {
        self.bw
    }

    /// `BBR.min_rtt`: the windowed minimum RTT, once there is a sample
    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt
    }

    fn min_pipe_cwnd(&self) -> u64 {
        MIN_PIPE_CWND_DATAGRAMS * self.mtu
    }

    fn is_cwnd_limited(&self) -> bool {
        self.cwnd_limited_this_round || self.cwnd_limited_last_round
    }

    // ---- Per-ACK steps (§5.2.3) ----

    /// The first acknowledged packet of an ACK: start its rate sample, and note an
    /// application-limited phase (§4.1.2.4) as the draft does at the start of ACK processing.
    fn begin_ack(&mut self, app_limited: bool) {
        self.rs = RateSample::default();
        self.ack_open = true;
        if app_limited {
            self.delivery.mark_app_limited();
        }
    }

    /// §4.1.2.3 `UpdateRateSample`, for one packet of the ACK
    fn update_rate_sample(&mut self, now: Instant, sent: Instant, bytes: u64) {
        self.delivery.delivered += bytes;
        self.delivery.delivered_time = now;
        self.delivery.inflight = self.delivery.inflight.saturating_sub(bytes);
        self.rs.newly_acked += bytes;
        if self.recovery_start.is_some_and(|start| sent > start) {
            self.recovery_start = None;
            self.recovery_exited = true;
        }
        let Some(record) = self.records.take_through(sent) else {
            return;
        };
        // quinn acknowledges packets in send order within an ACK, so a later packet is newer.
        if !self.rs.has_data || sent >= self.delivery.first_send_time {
            self.rs.has_data = true;
            self.rs.prior_delivered = record.delivered;
            self.rs.is_app_limited = record.is_app_limited;
            self.rs.send_elapsed = sent.saturating_duration_since(record.first_send_time);
            self.rs.ack_elapsed = now.saturating_duration_since(record.delivered_time);
            self.rs.tx_in_flight = record.tx_in_flight;
            self.rs.lost = self.delivery.lost - record.lost;
            self.rs.rtt = Some(now.saturating_duration_since(sent));
            self.delivery.first_send_time = sent;
        }
    }

    /// §4.1.2.3 `GenerateRateSample`
    fn generate_rate_sample(&mut self) {
        if self.delivery.app_limited != 0 && self.delivery.delivered > self.delivery.app_limited {
            self.delivery.app_limited = 0;
        }
        if !self.rs.has_data {
            return;
        }
        if let Some(rtt) = self.rs.rtt {
            self.lifetime_min_rtt = Some(self.lifetime_min_rtt.map_or(rtt, |m| m.min(rtt)));
        }
        let interval = self.rs.send_elapsed.max(self.rs.ack_elapsed);
        self.rs.delivered = self.delivery.delivered - self.rs.prior_delivered;
        if self.lifetime_min_rtt.is_some_and(|min| interval < min) || interval.is_zero() {
            return; // no reliable rate sample
        }
        self.rs.delivery_rate = rate(self.rs.delivered, interval);
    }

    /// §5.2.3 `UpdateModelAndState`
    fn update_model_and_state(&mut self, now: Instant) {
        self.update_latest_delivery_signals();
        self.update_congestion_signals();
        self.update_ack_aggregation(now);
        self.check_full_bw_reached();
        self.check_startup_done();
        self.check_drain_done(now);
        self.update_probe_bw_cycle_phase(now);
        self.update_min_rtt(now);
        self.check_probe_rtt(now);
        self.advance_latest_delivery_signals();
        self.bound_bw_for_model();
    }

    /// §5.2.3 `UpdateControlParameters`
    fn update_control_parameters(&mut self) {
        self.set_pacing_rate();
        self.set_send_quantum();
        self.set_cwnd();
    }

    // ---- Round counting (§5.5.1) ----

    fn update_round(&mut self) {
        if self.rs.has_data && self.rs.prior_delivered >= self.next_round_delivered {
            self.start_round();
            self.round_count += 1;
            self.rounds_since_probe_up += 1;
            self.round_start = true;
            self.cwnd_limited_last_round = self.cwnd_limited_this_round;
            self.cwnd_limited_this_round = false;
        } else {
            self.round_start = false;
        }
    }

    fn start_round(&mut self) {
        self.next_round_delivered = self.delivery.delivered;
    }

    // ---- Bandwidth model (§5.5.2–5.5.6) ----

    fn update_max_bw(&mut self) {
        self.update_round();
        let rate = self.rs.delivery_rate;
        if rate > 0 && (rate >= self.max_bw || !self.rs.is_app_limited) {
            self.max_bw = self.max_bw_filter.update(self.cycle_count, rate);
        }
    }

    fn advance_max_bw_filter(&mut self) {
        self.cycle_count += 1;
        self.max_bw = self.max_bw_filter.advance(self.cycle_count);
    }

    fn bound_bw_for_model(&mut self) {
        self.bw = self.max_bw.min(self.bw_shortterm);
    }

    // ---- Congestion signals and the short-term model (§5.5.10.3) ----

    fn update_latest_delivery_signals(&mut self) {
        self.loss_round_start = false;
        self.bw_latest = self.bw_latest.max(self.rs.delivery_rate);
        self.inflight_latest = self.inflight_latest.max(self.rs.delivered);
        if self.rs.has_data && self.rs.prior_delivered >= self.loss_round_delivered {
            self.loss_round_delivered = self.delivery.delivered;
            self.loss_round_start = true;
        }
    }

    fn advance_latest_delivery_signals(&mut self) {
        if self.loss_round_start {
            self.bw_latest = self.rs.delivery_rate;
            self.inflight_latest = self.rs.delivered;
        }
    }

    fn reset_congestion_signals(&mut self) {
        self.is_loss_in_round = false;
        self.bw_latest = 0;
        self.inflight_latest = 0;
    }

    fn update_congestion_signals(&mut self) {
        self.update_max_bw();
        if !self.loss_round_start {
            return; // wait until the end of the round trip
        }
        self.adapt_lower_bounds_from_congestion();
        self.is_loss_in_round = false;
    }

    fn adapt_lower_bounds_from_congestion(&mut self) {
        if self.state.is_probing_bw() || !self.is_loss_in_round {
            return;
        }
        // InitLowerBounds: the first congestion episode in this cycle
        if self.bw_shortterm == UNBOUNDED {
            self.bw_shortterm = self.max_bw;
        }
        if self.inflight_shortterm == UNBOUNDED {
            self.inflight_shortterm = self.cwnd;
        }
        // LossLowerBounds
        self.bw_shortterm = self.bw_latest.max(scale(self.bw_shortterm, BETA));
        self.inflight_shortterm = self
            .inflight_latest
            .max(scale(self.inflight_shortterm, BETA));
    }

    fn reset_short_term_model(&mut self) {
        self.bw_shortterm = UNBOUNDED;
        self.inflight_shortterm = UNBOUNDED;
    }

    // ---- ACK aggregation (§5.5.9) ----

    fn update_ack_aggregation(&mut self, now: Instant) {
        let interval = now.saturating_duration_since(self.extra_acked_interval_start);
        let mut expected_delivered = volume(self.bw, interval);
        if self.extra_acked_delivered <= expected_delivered {
            self.extra_acked_delivered = 0;
            self.extra_acked_interval_start = now;
            expected_delivered = 0;
        }
        self.extra_acked_delivered += self.rs.newly_acked;
        let extra = (self.extra_acked_delivered - expected_delivered).min(self.cwnd);
        let filter_len = if self.full_bw_reached {
            EXTRA_ACKED_FILTER_LEN
        } else {
            1 // in Startup, just remember one round
        };
        self.extra_acked = self
            .extra_acked_filter
            .update(self.round_count, extra, filter_len);
    }

    // ---- Startup and Drain (§5.3.1, §5.3.2) ----

    fn reset_full_bw(&mut self) {
        self.full_bw = 0;
        self.full_bw_count = 0;
        self.full_bw_now = false;
    }

    fn check_full_bw_reached(&mut self) {
        if self.full_bw_now || !self.round_start || self.rs.is_app_limited {
            return;
        }
        if self.rs.delivery_rate as f64 >= self.full_bw as f64 * FULL_BW_GROWTH {
            self.reset_full_bw();
            self.full_bw = self.rs.delivery_rate;
            return;
        }
        self.full_bw_count += 1;
        self.full_bw_now = self.full_bw_count >= FULL_BW_ROUNDS;
        if self.full_bw_now {
            self.full_bw_reached = true;
        }
    }

    fn check_startup_done(&mut self) {
        self.check_startup_high_loss();
        if self.state == Bbr3State::Startup && self.full_bw_reached {
            self.enter_drain();
        }
    }

    /// §5.3.1.3, once per loss round: enough loss events, and a loss rate over the threshold
    fn check_startup_high_loss(&mut self) {
        if !self.loss_round_start {
            return;
        }
        let round = std::mem::take(&mut self.loss_round);
        self.loss_round.delivered_at_start = self.delivery.delivered;
        if self.state != Bbr3State::Startup || round.events < STARTUP_FULL_LOSS_COUNT {
            return;
        }
        let delivered = self.delivery.delivered - round.delivered_at_start;
        if (round.lost as f64) <= LOSS_THRESH * (delivered + round.lost) as f64 {
            return;
        }
        self.full_bw_reached = true;
        self.inflight_longterm = self.bdp().max(self.inflight_latest);
    }

    fn enter_startup(&mut self) {
        self.state = Bbr3State::Startup;
    }

    fn enter_drain(&mut self) {
        self.state = Bbr3State::Drain;
        self.drain_start_round = self.round_count;
    }

    fn check_drain_done(&mut self, now: Instant) {
        if self.state == Bbr3State::Drain
            && (self.delivery.inflight <= self.inflight_at(self.bw, 1.0)
                || self.round_count > self.drain_start_round + DRAIN_ROUNDS_MAX)
        {
            self.enter_probe_bw(now);
        }
    }

    // ---- ProbeBW (§5.3.3) ----

    fn enter_probe_bw(&mut self, now: Instant) {
        self.start_probe_bw_down(now);
    }

    fn start_probe_bw_down(&mut self, now: Instant) {
        self.reset_congestion_signals();
        self.probe_up_acked_per_inc = UNBOUNDED;
        self.pick_probe_wait();
        self.cycle_stamp = now;
        self.ack_phase = AckPhase::ProbeStopping;
        self.start_round();
        self.state = Bbr3State::ProbeBwDown;
    }

    fn start_probe_bw_cruise(&mut self) {
        self.state = Bbr3State::ProbeBwCruise;
    }

    fn start_probe_bw_refill(&mut self) {
        self.reset_short_term_model();
        self.bw_probe_up_rounds = 0;
        self.bw_probe_up_acked = 0;
        self.prev_probe_precautionary = false;
        self.ack_phase = AckPhase::Refilling;
        self.start_round();
        self.state = Bbr3State::ProbeBwRefill;
    }

    fn start_probe_bw_up(&mut self) {
        self.ack_phase = AckPhase::ProbeStarting;
        self.start_round();
        self.reset_full_bw();
        self.full_bw = self.rs.delivery_rate;
        self.state = Bbr3State::ProbeBwUp;
        self.raise_inflight_longterm_slope();
    }

    fn update_probe_bw_cycle_phase(&mut self, now: Instant) {
        if !self.full_bw_reached {
            return; // only steady-state behaviour here
        }
        if self.adapt_long_term_model() || !self.state.is_probe_bw() {
            return;
        }
        match self.state {
            Bbr3State::ProbeBwDown => {
                if !self.is_time_to_probe_bw(now) && self.is_time_to_cruise() {
                    self.start_probe_bw_cruise();
                }
            }
            Bbr3State::ProbeBwCruise => {
                self.is_time_to_probe_bw(now);
            }
            Bbr3State::ProbeBwRefill => {
                // After one round of REFILL, start UP.
                if self.round_start {
                    self.is_bw_probe_sample = true;
                    self.start_probe_bw_up();
                }
            }
            Bbr3State::ProbeBwUp => {
                if self.is_time_to_go_down() {
                    self.prev_probe_too_high = false;
                    self.start_probe_bw_down(now);
                }
            }
            Bbr3State::Startup | Bbr3State::Drain | Bbr3State::ProbeRtt => {}
        }
    }

    /// Returns whether it decided a state transition.
    fn adapt_long_term_model(&mut self) -> bool {
        if self.ack_phase == AckPhase::ProbeStarting && self.round_start {
            self.ack_phase = AckPhase::ProbeFeedback; // bandwidth probe samples arrive
        }
        if self.ack_phase == AckPhase::ProbeStopping && self.round_start {
            // The samples of the bandwidth probe have all arrived.
            self.is_bw_probe_sample = false;
            self.ack_phase = AckPhase::Init;
            if self.state.is_probe_bw() && !self.rs.is_app_limited {
                self.advance_max_bw_filter();
            }
            // §5.3.3.6: a precautionary probe that stayed under the loss threshold
            if self.state.is_probe_bw()
                && self.prev_probe_precautionary
                && !self.prev_probe_too_high
            {
                self.start_probe_bw_refill();
                return true;
            }
        }
        if is_inflight_too_high(self.rs.lost, self.rs.tx_in_flight)
            || self.inflight_longterm == UNBOUNDED
        {
            return false;
        }
        // The loss rate is safe: raise the upper bounds.
        self.inflight_longterm = self.inflight_longterm.max(self.rs.tx_in_flight);
        if self.state == Bbr3State::ProbeBwUp {
            self.probe_inflight_longterm_upward();
        }
        false
    }

    fn is_time_to_probe_bw(&mut self, now: Instant) -> bool {
        let waited = now.saturating_duration_since(self.cycle_stamp) > self.bw_probe_wait;
        if waited || self.is_reno_coexistence_probe_time() {
            self.start_probe_bw_refill();
            return true;
        }
        false
    }

    fn pick_probe_wait(&mut self) {
        self.rounds_since_probe_up = self.random.next_u64() & 1;
        self.bw_probe_wait = PROBE_WAIT_BASE + PROBE_WAIT_RANDOM.mul_f64(self.random.unit());
    }

    /// §5.3.3.8.2: probe at least as often as a Reno flow of this BDP would, in rounds
    fn is_reno_coexistence_probe_time(&self) -> bool {
        let reno_rounds = self.target_inflight() / self.mtu;
        self.rounds_since_probe_up >= reno_rounds.min(RENO_PROBE_ROUNDS_MAX)
    }

    fn target_inflight(&self) -> u64 {
        self.bdp().min(self.cwnd)
    }

    fn is_time_to_cruise(&self) -> bool {
        self.delivery.inflight <= self.inflight_with_headroom()
            && self.delivery.inflight <= self.inflight_at(self.max_bw, 1.0)
    }

    fn is_time_to_go_down(&mut self) -> bool {
        // §5.3.3.6, precautionary deceleration
        if self.prev_probe_too_high && self.delivery.inflight >= self.inflight_longterm {
            self.prev_probe_precautionary = true;
            return true;
        }
        if self.is_cwnd_limited() && self.cwnd >= self.inflight_longterm {
            // bw is limited by inflight_longterm, not by the path
            self.reset_full_bw();
            self.full_bw = self.rs.delivery_rate;
            false
        } else {
            self.full_bw_now
        }
    }

    fn inflight_with_headroom(&self) -> u64 {
        if self.inflight_longterm == UNBOUNDED {
            return UNBOUNDED;
        }
        let headroom = self.mtu.max(scale(self.inflight_longterm, HEADROOM));
        self.inflight_longterm
            .saturating_sub(headroom)
            .max(self.min_pipe_cwnd())
    }

    fn raise_inflight_longterm_slope(&mut self) {
        let growth_this_round = 1u64 << self.bw_probe_up_rounds;
        self.bw_probe_up_rounds = (self.bw_probe_up_rounds + 1).min(BW_PROBE_UP_ROUNDS_MAX);
        self.probe_up_acked_per_inc = (self.cwnd / growth_this_round).max(self.mtu);
    }

    fn probe_inflight_longterm_upward(&mut self) {
        if !self.is_cwnd_limited() || self.cwnd < self.inflight_longterm {
            return; // not fully using inflight_longterm, so don't grow it
        }
        self.bw_probe_up_acked += self.rs.newly_acked;
        if self.bw_probe_up_acked >= self.probe_up_acked_per_inc {
            let delta = self.bw_probe_up_acked / self.probe_up_acked_per_inc;
            self.bw_probe_up_acked -= delta * self.probe_up_acked_per_inc;
            self.inflight_longterm = self
                .inflight_longterm
                .saturating_add(delta.saturating_mul(self.mtu));
        }
        if self.round_start {
            self.raise_inflight_longterm_slope();
        }
    }

    // ---- Loss (§5.5.10) ----

    fn note_loss(&mut self) {
        if !self.is_loss_in_round {
            self.loss_round_delivered = self.delivery.delivered;
        }
        self.is_loss_in_round = true;
    }

    /// §5.5.10.2 `HandleLostPacket`, for the newest packet of a loss batch
    fn handle_lost_packet(&mut self, now: Instant, sent: Instant) {
        self.note_loss();
        if !self.is_bw_probe_sample {
            return; // not a packet sent while probing bandwidth
        }
        let Some(record) = self.records.take_through(sent) else {
            return;
        };
        let lost = self.delivery.lost - record.lost;
        if is_inflight_too_high(lost, record.tx_in_flight) {
            let tx_in_flight = inflight_at_loss(record.bytes, record.tx_in_flight, lost);
            self.handle_inflight_too_high(now, tx_in_flight, record.is_app_limited);
        }
    }

    fn handle_inflight_too_high(&mut self, now: Instant, tx_in_flight: u64, app_limited: bool) {
        self.prev_probe_too_high = true;
        self.is_bw_probe_sample = false; // only react once per bandwidth probe
        if !app_limited {
            self.inflight_longterm = tx_in_flight.max(scale(self.target_inflight(), BETA));
        }
        if self.state == Bbr3State::ProbeBwUp {
            self.start_probe_bw_down(now);
        }
    }

    // ---- min_rtt and ProbeRTT (§5.3.4) ----

    fn update_min_rtt(&mut self, now: Instant) {
        self.probe_rtt_expired = now > self.probe_rtt_min_stamp + PROBE_RTT_INTERVAL;
        if let Some(rtt) = self.rs.rtt
            && (self.probe_rtt_min_delay.is_none_or(|min| rtt < min) || self.probe_rtt_expired)
        {
            self.probe_rtt_min_delay = Some(rtt);
            self.probe_rtt_min_stamp = now;
        }
        let min_rtt_expired = now > self.min_rtt_stamp + MIN_RTT_FILTER_LEN;
        let lower = match (self.probe_rtt_min_delay, self.min_rtt) {
            (Some(delay), Some(min)) => delay < min,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if lower || min_rtt_expired {
            self.min_rtt = self.probe_rtt_min_delay;
            self.min_rtt_stamp = self.probe_rtt_min_stamp;
        }
    }

    fn check_probe_rtt(&mut self, now: Instant) {
        if self.state != Bbr3State::ProbeRtt && self.probe_rtt_expired && !self.idle_restart {
            self.state = Bbr3State::ProbeRtt;
            self.save_cwnd();
            self.probe_rtt_done_stamp = None;
            self.ack_phase = AckPhase::ProbeStopping;
            self.start_round();
        }
        if self.state == Bbr3State::ProbeRtt {
            self.handle_probe_rtt(now);
        }
        if self.rs.delivered > 0 {
            self.idle_restart = false;
        }
    }

    fn handle_probe_rtt(&mut self, now: Instant) {
        // Samples while in flight is held down say nothing of the path's bandwidth.
        self.delivery.mark_app_limited();
        if self.probe_rtt_done_stamp.is_none() && self.delivery.inflight <= self.probe_rtt_cwnd() {
            // Hold for at least ProbeRTTDuration and at least one round.
            self.probe_rtt_done_stamp = Some(now + PROBE_RTT_DURATION);
            self.probe_rtt_round_done = false;
            self.start_round();
        } else if self.probe_rtt_done_stamp.is_some() {
            if self.round_start {
                self.probe_rtt_round_done = true;
            }
            if self.probe_rtt_round_done {
                self.check_probe_rtt_done(now);
            }
        }
    }

    fn check_probe_rtt_done(&mut self, now: Instant) {
        if self.probe_rtt_done_stamp.is_some_and(|done| now > done) {
            self.probe_rtt_min_stamp = now; // schedules the next ProbeRTT
            self.restore_cwnd();
            self.exit_probe_rtt(now);
        }
    }

    fn exit_probe_rtt(&mut self, now: Instant) {
        self.reset_short_term_model();
        if self.full_bw_reached {
            // In flight is already under the BDP: skip DOWN.
            self.start_probe_bw_down(now);
            self.start_probe_bw_cruise();
        } else {
            self.enter_startup();
        }
    }

    fn probe_rtt_cwnd(&self) -> u64 {
        self.bdp_multiple(self.bw, PROBE_RTT_CWND_GAIN)
            .max(self.min_pipe_cwnd())
    }

    // ---- Control parameters (§5.6) ----

    fn init_pacing_rate(&mut self, srtt: Duration) {
        let nominal = rate(self.config.initial_window, srtt);
        self.pacing_rate = scale(nominal, STARTUP_PACING_GAIN).max(1);
    }

    fn set_pacing_rate_with_gain(&mut self, gain: f64) {
        let rate = scale(self.bw, gain * PACING_MARGIN);
        if rate > 0 && (self.full_bw_reached || rate > self.pacing_rate) {
            self.pacing_rate = rate;
        }
    }

    fn set_pacing_rate(&mut self) {
        self.set_pacing_rate_with_gain(self.state.pacing_gain());
    }

    fn set_send_quantum(&mut self) {
        let quantum = volume(self.pacing_rate, SEND_QUANTUM_INTERVAL);
        self.send_quantum = quantum.min(SEND_QUANTUM_MAX).max(2 * self.mtu);
    }

    /// The estimated BDP at `bw` times `gain`; the initial window before any RTT sample
    fn bdp_multiple(&self, bw: u64, gain: f64) -> u64 {
        match self.min_rtt {
            None => self.config.initial_window,
            Some(min_rtt) => scale(volume(bw, min_rtt), gain),
        }
    }

    fn bdp(&self) -> u64 {
        self.bdp_multiple(self.bw, 1.0)
    }

    /// §5.6.4.2 `QuantizationBudget`: room for the offload (here: send) quantum
    fn quantization_budget(&self, inflight_cap: u64) -> u64 {
        let mut cap = inflight_cap
            .max(self.send_quantum)
            .max(self.min_pipe_cwnd());
        if self.state == Bbr3State::ProbeBwUp {
            cap = cap.saturating_add(2 * self.mtu);
        }
        cap
    }

    fn inflight_at(&self, bw: u64, gain: f64) -> u64 {
        self.quantization_budget(self.bdp_multiple(bw, gain))
    }

    fn update_max_inflight(&mut self) {
        let cap = self
            .bdp_multiple(self.bw, self.state.cwnd_gain())
            .saturating_add(self.extra_acked);
        self.max_inflight = self.quantization_budget(cap);
    }

    fn set_cwnd(&mut self) {
        if std::mem::take(&mut self.recovery_exited) {
            self.restore_cwnd();
        }
        self.update_max_inflight();
        let acked = self.rs.newly_acked;
        if self.full_bw_reached {
            self.cwnd = self.cwnd.saturating_add(acked).min(self.max_inflight);
        } else if self.cwnd < self.max_inflight
            || self.delivery.delivered < self.config.initial_window
        {
            self.cwnd = self.cwnd.saturating_add(acked);
        }
        self.cwnd = self.cwnd.max(self.min_pipe_cwnd());
        if self.state == Bbr3State::ProbeRtt {
            self.cwnd = self.cwnd.min(self.probe_rtt_cwnd());
        }
        self.bound_cwnd_for_model();
    }

    /// §5.6.4.7 and the "Volume Cap" column of §5.6.1
    fn bound_cwnd_for_model(&mut self) {
        let mut cap = if self.state.is_probe_bw() && self.state != Bbr3State::ProbeBwCruise {
            self.inflight_longterm
        } else if matches!(self.state, Bbr3State::ProbeRtt | Bbr3State::ProbeBwCruise) {
            self.inflight_with_headroom()
        } else {
            UNBOUNDED
        };
        cap = cap.min(self.inflight_shortterm).max(self.min_pipe_cwnd());
        self.cwnd = self.cwnd.min(cap);
    }

    /// §5.6.4.4: the last cwnd not lowered by loss recovery or ProbeRTT
    fn save_cwnd(&mut self) {
        if self.recovery_start.is_none() && self.state != Bbr3State::ProbeRtt {
            self.prior_cwnd = self.cwnd;
        } else {
            self.prior_cwnd = self.prior_cwnd.max(self.cwnd);
        }
    }

    fn restore_cwnd(&mut self) {
        self.cwnd = self.cwnd.max(self.prior_cwnd);
    }

    /// §5.4 `HandleRestartFromIdle`, before a send
    fn handle_restart_from_idle(&mut self, now: Instant) {
        if self.delivery.inflight != 0 || self.delivery.app_limited == 0 {
            return;
        }
        self.idle_restart = true;
        self.extra_acked_interval_start = now;
        if self.state.is_probe_bw() {
            self.set_pacing_rate_with_gain(1.0);
        } else if self.state == Bbr3State::ProbeRtt {
            self.check_probe_rtt_done(now);
        }
    }
}

impl Controller for Bbr3 {
    fn on_sent(&mut self, now: Instant, bytes: u64, _last_packet_number: u64) {
        self.handle_restart_from_idle(now);
        // §4.1.2.2 `OnPacketSent`
        if self.delivery.inflight == 0 {
            self.delivery.first_send_time = now;
            self.delivery.delivered_time = now;
        }
        self.delivery.inflight = self.delivery.inflight.saturating_add(bytes);
        self.records.on_sent(SendRecord {
            send_time: now,
            bytes,
            delivered: self.delivery.delivered,
            delivered_time: self.delivery.delivered_time,
            first_send_time: self.delivery.first_send_time,
            lost: self.delivery.lost,
            tx_in_flight: self.delivery.inflight,
            is_app_limited: self.delivery.app_limited != 0,
        });
        // quinn stops sending once one more datagram would reach the window.
        if self.delivery.inflight + self.mtu >= self.cwnd {
            self.cwnd_limited_this_round = true;
        }
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        _rtt: &RttEstimator,
    ) {
        if !self.ack_open {
            self.begin_ack(app_limited);
        }
        self.update_rate_sample(now, sent, bytes);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        _app_limited: bool,
        _largest_packet_num_acked: Option<u64>,
    ) {
        // quinn's count is exact; ours drifts with ACK-only datagrams between ACKs.
        self.delivery.inflight = in_flight;
        if !std::mem::take(&mut self.ack_open) {
            return; // no ack-eliciting packet acknowledged: nothing to sample
        }
        self.generate_rate_sample();
        if !self.pacing_rate_from_rtt
            && let Some(rtt) = self.rs.rtt
        {
            // §5.6.2: the initial rate uses the first RTT sample when there is one.
            self.pacing_rate_from_rtt = true;
            if self.max_bw == 0 && !rtt.is_zero() {
                self.init_pacing_rate(rtt);
            }
        }
        self.update_model_and_state(now);
        self.update_control_parameters();
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        let congested_bytes = if lost_bytes == 0 {
            // ECN-CE (module documentation): one datagram's worth of congestion; the marked
            // packet itself was delivered.
            self.mtu
        } else {
            self.delivery.inflight = self.delivery.inflight.saturating_sub(lost_bytes);
            lost_bytes
        };
        self.delivery.lost += congested_bytes;
        self.loss_round.events += 1;
        self.loss_round.lost += congested_bytes;
        if self.recovery_start.is_none_or(|start| sent > start) {
            // A new recovery episode (§5.5.11.1 `SaveStateUponLoss`, less the undo state); it
            // ends when a packet sent from now on is acknowledged, as in quinn's controllers.
            self.save_cwnd();
            self.recovery_start = Some(now);
        }
        self.handle_lost_packet(now, sent);
        if is_persistent_congestion {
            // §5.6.4.4 `OnEnterRTO`: down to the floor; restored when recovery ends.
            self.save_cwnd();
            self.cwnd = self.min_pipe_cwnd();
        }
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = u64::from(new_mtu);
        self.cwnd = self.cwnd.max(self.min_pipe_cwnd());
    }

    fn window(&self) -> u64 {
        self.cwnd.max(self.min_pipe_cwnd())
    }

    fn pacing_rate(&self) -> Option<u64> {
        Some(self.pacing_rate.max(1))
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut metrics = ControllerMetrics::default();
        metrics.congestion_window = self.window();
        metrics.pacing_rate = Some(self.pacing_rate.saturating_mul(8));
        metrics
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.config.initial_window
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// §5.5.10.2 `IsInflightTooHigh` (QUIC always has selective ACKs)
fn is_inflight_too_high(lost: u64, tx_in_flight: u64) -> bool {
    lost as f64 > tx_in_flight as f64 * LOSS_THRESH
}

/// §5.5.10.2 `InflightAtLoss`: where, within the aggregate of `size` bytes, losses crossed
/// the threshold
fn inflight_at_loss(size: u64, tx_in_flight: u64, lost: u64) -> u64 {
    let inflight_prev = tx_in_flight.saturating_sub(size) as f64;
    let lost_prev = lost.saturating_sub(size) as f64;
    let lost_prefix = ((LOSS_THRESH * inflight_prev - lost_prev) / (1.0 - LOSS_THRESH)).max(0.0);
    (inflight_prev + lost_prefix) as u64
}

/// `bytes` over `interval`, in bytes per second
fn rate(bytes: u64, interval: Duration) -> u64 {
    let nanos = interval.as_nanos().max(1);
    (u128::from(bytes) * 1_000_000_000 / nanos).min(u128::from(u64::MAX)) as u64
}

/// What `bytes_per_second` delivers in `interval`
fn volume(bytes_per_second: u64, interval: Duration) -> u64 {
    (u128::from(bytes_per_second) * interval.as_nanos() / 1_000_000_000).min(u128::from(u64::MAX))
        as u64
}

/// `value * gain`, where `UNBOUNDED` stays unbounded
fn scale(value: u64, gain: f64) -> u64 {
    if value == UNBOUNDED {
        return UNBOUNDED;
    }
    (value as f64 * gain) as u64
}

/// Connection delivery state (§2.2, §4.1.2.1.1)
#[derive(Debug, Clone)]
struct DeliveryState {
    delivered: u64,
    delivered_time: Instant,
    first_send_time: Instant,
    /// `C.app_limited`: the delivered count that ends an application-limited phase, or 0
    app_limited: u64,
    lost: u64,
    /// `C.inflight`: quinn's count at the last ACK, kept up to date between ACKs
    inflight: u64,
}

impl DeliveryState {
    fn new(now: Instant) -> Self {
        Self {
            delivered: 0,
            delivered_time: now,
            first_send_time: now,
            app_limited: 0,
            lost: 0,
            inflight: 0,
        }
    }

    /// §4.1.2.4 `MarkConnectionAppLimited`
    fn mark_app_limited(&mut self) {
        self.app_limited = (self.delivered + self.inflight).max(1);
    }
}

/// The rate sample of one ACK (§2.3, §4.1.2.1.3)
#[derive(Debug, Clone, Default)]
struct RateSample {
    has_data: bool,
    prior_delivered: u64,
    is_app_limited: bool,
    send_elapsed: Duration,
    ack_elapsed: Duration,
    newly_acked: u64,
    delivered: u64,
    delivery_rate: u64,
    rtt: Option<Duration>,
    tx_in_flight: u64,
    lost: u64,
}

/// The delivery state when an aggregate was sent (§4.1.2.1.2)
#[derive(Debug, Clone, Copy)]
struct SendRecord {
    send_time: Instant,
    bytes: u64,
    delivered: u64,
    delivered_time: Instant,
    first_send_time: Instant,
    lost: u64,
    tx_in_flight: u64,
    is_app_limited: bool,
}

/// Send records in send order, at most [`SEND_RECORDS_MAX`] (module documentation)
#[derive(Debug, Clone, Default)]
struct SendRecords {
    records: VecDeque<SendRecord>,
}

impl SendRecords {
    /// Records an aggregate; when full, merges it into the newest record.
    ///
    /// The merged sends keep the older snapshot: their samples then span a little more time
    /// and data than their own, a coarser but still sound sample (§4.1.3.1 treats aggregates
    /// the same way).
    fn on_sent(&mut self, record: SendRecord) {
        if self.records.len() >= SEND_RECORDS_MAX
            && let Some(newest) = self.records.back_mut()
        {
            newest.bytes += record.bytes;
            newest.tx_in_flight = record.tx_in_flight;
            return;
        }
        self.records.push_back(record);
    }

    /// The record of the aggregate that held a packet sent at `sent`, dropping every older
    /// one: quinn reports acknowledgements and losses in send order, so they are done with.
    fn take_through(&mut self, sent: Instant) -> Option<SendRecord> {
        let after = self.records.partition_point(|r| r.send_time <= sent);
        let index = after.checked_sub(1)?;
        self.records.drain(..index);
        self.records.front().copied()
    }
}

/// `BBR.max_bw_filter` (§5.5.3): the maximum over the current and the previous ProbeBW cycle
#[derive(Debug, Clone, Default)]
struct MaxBwFilter {
    /// Indexed by the parity of `BBR.cycle_count`
    cycles: [u64; 2],
}

impl MaxBwFilter {
    fn update(&mut self, cycle_count: u64, sample: u64) -> u64 {
        let slot = &mut self.cycles[(cycle_count & 1) as usize];
        *slot = (*slot).max(sample);
        self.get()
    }

    /// Starts cycle `cycle_count`, forgetting the one before the previous.
    fn advance(&mut self, cycle_count: u64) -> u64 {
        self.cycles[(cycle_count & 1) as usize] = 0;
        self.get()
    }

    fn get(&self) -> u64 {
        self.cycles[0].max(self.cycles[1])
    }
}

/// A windowed maximum over the last few rounds (`BBR.extra_acked_filter`, §5.5.9)
#[derive(Debug, Clone, Default)]
struct RoundMaxFilter {
    /// Per-round maxima, indexed by round modulo the longest window
    rounds: [u64; EXTRA_ACKED_FILTER_LEN as usize],
    latest_round: u64,
}

impl RoundMaxFilter {
    /// Adds `sample` to `round` and returns the maximum over the last `window` rounds.
    fn update(&mut self, round: u64, sample: u64, window: u64) -> u64 {
        let len = self.rounds.len() as u64;
        debug_assert!((1..=len).contains(&window));
        if round > self.latest_round {
            // Forget the rounds that passed without a sample, at most a window's worth.
            for skipped in (self.latest_round + 1)..=round.min(self.latest_round + len) {
                self.rounds[(skipped % len) as usize] = 0;
            }
            self.rounds[(round % len) as usize] = 0;
            self.latest_round = round;
        }
        let slot = &mut self.rounds[(self.latest_round % len) as usize];
        *slot = (*slot).max(sample);
        (0..window.min(self.latest_round + 1))
            .map(|back| self.rounds[((self.latest_round - back) % len) as usize])
            .max()
            .unwrap_or(0)
    }
}

/// Per loss round counters for the Startup loss exit (§5.3.1.3)
#[derive(Debug, Clone, Default)]
struct LossRound {
    events: u32,
    lost: u64,
    delivered_at_start: u64,
}

/// A small, seedable generator (SplitMix64) for the draft's random probe timing; no
/// cryptographic use.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1)
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use quinn_proto::congestion::{Cubic, CubicConfig};

    use super::*;
    use crate::congestion::sim::{self, MTU, Observation, Path, Report};

    /// Bytes per second in one Mbit/s
    const MBIT_PER_S: u64 = 1_000_000 / 8;
    const MIN_WINDOW: u64 = MIN_PIPE_CWND_DATAGRAMS * MTU as u64;

    fn bbr3(now: Instant) -> Bbr3 {
        let mut config = Bbr3Config::default();
        config.seed(7);
        Bbr3::new(Arc::new(config), now, MTU)
    }

    fn cubic(now: Instant) -> Cubic {
        Cubic::new(Arc::new(CubicConfig::default()), now, MTU)
    }

    /// Every BBR run checks the window floor at every step.
    fn window_floor(bbr: &Bbr3, _: &Observation) {
        assert!(bbr.window() >= MIN_WINDOW, "window {}", bbr.window());
    }

    fn describe(name: &str, path: &Path, report: &Report) -> String {
        format!(
            "{name}: {:.1} of {:.1} Mbit/s, queueing delay mean {:?} max {:?}, {} of {} datagrams lost",
            report.goodput_bytes_per_s / MBIT_PER_S as f64,
            path.bottleneck_bytes_per_s as f64 / MBIT_PER_S as f64,
            report.queue_delay_mean,
            report.queue_delay_max,
            report.datagrams_lost,
            report.datagrams_sent,
        )
    }

    /// 50 Mbit/s, 40 ms, a drop-tail buffer of two BDPs: Cubic fills the buffer, BBR keeps
    /// the link busy with a short queue.
    #[test]
    fn on_a_clean_path_bbr3_fills_the_link_with_a_fraction_of_cubics_queue() {
        let mut path = Path::clean(50 * MBIT_PER_S, Duration::from_millis(40), 0);
        path.queue_bytes = 2 * path.bdp_bytes();
        let duration = Duration::from_secs(20);
        let measure_from = Duration::from_secs(5);
        let (bbr, _) = sim::run(bbr3, &path, duration, measure_from, window_floor);
        let (cubic, _) = sim::run(cubic, &path, duration, measure_from, |_, _| {});
        println!("{}", describe("bbr3", &path, &bbr));
        println!("{}", describe("cubic", &path, &cubic));

        let link = path.bottleneck_bytes_per_s as f64;
        assert!(bbr.goodput_bytes_per_s >= 0.9 * link);
        assert!(
            cubic.goodput_bytes_per_s >= 0.9 * link,
            "the comparison is fair"
        );
        assert!(bbr.queue_delay_mean * 5 <= cubic.queue_delay_mean);
        assert!(bbr.queue_delay_mean <= path.base_rtt / 4);
    }

    /// 50 Mbit/s, 20 ms, 1% random loss: Cubic takes every loss for congestion, BBR responds
    /// only to loss rates above 2% per round.
    #[test]
    fn on_a_lossy_path_bbr3_keeps_most_of_the_link_where_cubic_collapses() {
        let mut path = Path::clean(50 * MBIT_PER_S, Duration::from_millis(20), 0);
        path.queue_bytes = 2 * path.bdp_bytes();
        path.loss_rate = 0.01;
        let duration = Duration::from_secs(20);
        let measure_from = Duration::from_secs(2);
        let (bbr, _) = sim::run(bbr3, &path, duration, measure_from, window_floor);
        let (cubic, _) = sim::run(cubic, &path, duration, measure_from, |_, _| {});
        println!("{}", describe("bbr3", &path, &bbr));
        println!("{}", describe("cubic", &path, &cubic));

        let link = path.bottleneck_bytes_per_s as f64;
        assert!(bbr.goodput_bytes_per_s >= 3.0 * cubic.goodput_bytes_per_s);
        assert!(bbr.goodput_bytes_per_s >= 0.6 * link);
    }

    /// Startup, Drain, then the ProbeBW cycle; ProbeRTT once `probe_rtt_min_delay` has gone
    /// unrefreshed for ProbeRTTInterval (5 s, §5.3.4.1), holding in flight at half a BDP for
    /// at least 200 ms and a round, then back to ProbeBW.
    #[test]
    fn bbr3_starts_up_drains_probes_bandwidth_and_probes_rtt_when_min_rtt_goes_stale() {
        let mut path = Path::clean(50 * MBIT_PER_S, Duration::from_millis(40), 0);
        path.queue_bytes = 2 * path.bdp_bytes();
        let mut transitions: Vec<(Duration, Bbr3State)> = Vec::new();
        let mut probe_rtt_in_flight_min = u64::MAX;
        let mut min_rtts = Vec::new();
        let (_, bbr) = sim::run(
            bbr3,
            &path,
            Duration::from_secs(20),
            Duration::ZERO,
            |bbr: &Bbr3, seen: &Observation| {
                window_floor(bbr, seen);
                if transitions
                    .last()
                    .is_none_or(|(_, state)| *state != bbr.state())
                {
                    transitions.push((seen.elapsed, bbr.state()));
                }
                if bbr.state() == Bbr3State::ProbeRtt {
                    probe_rtt_in_flight_min = probe_rtt_in_flight_min.min(seen.bytes_in_flight);
                }
                min_rtts.extend(bbr.min_rtt());
            },
        );
        let states: Vec<Bbr3State> = transitions.iter().map(|(_, state)| *state).collect();
        println!("{transitions:?}");

        // Drain ends in ProbeBW_DOWN, which may pass to CRUISE on the same ACK (§5.2.3).
        assert_eq!(states[..2], [Bbr3State::Startup, Bbr3State::Drain]);
        assert!(matches!(
            states[2],
            Bbr3State::ProbeBwDown | Bbr3State::ProbeBwCruise
        ));
        assert!(transitions[1].0 < Duration::from_secs(1), "Startup ends");
        for phase in [
            Bbr3State::ProbeBwCruise,
            Bbr3State::ProbeBwRefill,
            Bbr3State::ProbeBwUp,
        ] {
            assert!(states.contains(&phase), "{phase:?} never entered");
        }
        // The state machine cycles through the phases in their order (§5.1.1).
        for pair in states[2..].windows(2) {
            let allowed = match pair[0] {
                Bbr3State::ProbeBwDown => [Bbr3State::ProbeBwCruise, Bbr3State::ProbeBwRefill],
                Bbr3State::ProbeBwCruise => [Bbr3State::ProbeBwRefill, Bbr3State::ProbeRtt],
                Bbr3State::ProbeBwRefill => [Bbr3State::ProbeBwUp, Bbr3State::ProbeRtt],
                Bbr3State::ProbeBwUp => [Bbr3State::ProbeBwDown, Bbr3State::ProbeRtt],
                Bbr3State::ProbeRtt => [Bbr3State::ProbeBwCruise, Bbr3State::ProbeBwCruise],
                other => panic!("{other:?} after Startup"),
            };
            assert!(
                allowed.contains(&pair[1]) || pair[1] == Bbr3State::ProbeRtt,
                "{:?} -> {:?}",
                pair[0],
                pair[1]
            );
        }

        // ProbeRTT: first once the RTT minimum of the first round is 5 s old, then every 5 s
        // after the previous one ends; each at least 200 ms long.
        let mut previous_end = Duration::ZERO;
        let mut probe_rtts = 0;
        for (i, (entered, state)) in transitions.iter().enumerate() {
            if *state != Bbr3State::ProbeRtt {
                continue;
            }
            probe_rtts += 1;
            let waited = *entered - previous_end;
            assert!(
                waited >= PROBE_RTT_INTERVAL && waited < PROBE_RTT_INTERVAL + path.base_rtt * 4,
                "ProbeRTT at {entered:?}, {waited:?} after the last"
            );
            let Some((left, _)) = transitions.get(i + 1) else {
                continue;
            };
            assert!(*left - *entered >= PROBE_RTT_DURATION);
            previous_end = *left;
        }
        assert!(probe_rtts >= 3, "{probe_rtts} ProbeRTTs in 20 s");
        let half_bdp = path.bdp_bytes() / 2;
        assert!(
            probe_rtt_in_flight_min <= half_bdp + MIN_WINDOW,
            "in flight held at {probe_rtt_in_flight_min}, half a BDP is {half_bdp}"
        );
        // The minimum it measured is the path's, from first to last.
        let propagation = path.base_rtt..path.base_rtt + Duration::from_millis(1);
        assert!(min_rtts.iter().all(|rtt| propagation.contains(rtt)));
        assert!(bbr.state().is_probe_bw() || bbr.state() == Bbr3State::ProbeRtt);
    }

    /// A longer route (40 → 80 ms at 6 s): the min_rtt filter keeps the old minimum for its
    /// 10 s window (§5.5.7.2), then takes the new one that a ProbeRTT measured (§5.3.4.3).
    #[test]
    fn bbr3_min_rtt_follows_a_longer_route_after_its_filter_window() {
        let mut path = Path::clean(50 * MBIT_PER_S, Duration::from_millis(40), 0);
        path.queue_bytes = 2 * path.bdp_bytes();
        path.base_rtt_change = Some((Duration::from_secs(6), Duration::from_millis(80)));
        let mut min_rtt_at = Vec::new();
        sim::run(
            bbr3,
            &path,
            Duration::from_secs(20),
            Duration::ZERO,
            |bbr: &Bbr3, seen: &Observation| min_rtt_at.push((seen.elapsed, bbr.min_rtt())),
        );
        let min_rtt = |at: Duration| {
            min_rtt_at
                .iter()
                .take_while(|(elapsed, _)| *elapsed <= at)
                .last()
                .and_then(|(_, rtt)| *rtt)
                .unwrap()
        };
        // The last 40 ms sample is from the ProbeRTT at about 5.2 s; it expires at about
        // 15.2 s, when the 80 ms sample of the ProbeRTT at about 10.3 s takes over. A shorter
        // filter would switch at 10.3 s, none at 6 s.
        let old = Duration::from_millis(40)..Duration::from_millis(41);
        let new = Duration::from_millis(80)..Duration::from_millis(81);
        let (before, after) = (Duration::from_secs(14), Duration::from_secs(16));
        assert!(old.contains(&min_rtt(before)), "{:?}", min_rtt(before));
        assert!(new.contains(&min_rtt(after)), "{:?}", min_rtt(after));
    }

    /// ECN-CE marks on every datagram from 8 s on. quinn reports them as congestion events
    /// of 0 lost bytes, which BBR takes as congestion (§3.7): its bandwidth probes stop at
    /// once, and it keeps less in flight than the same flow unmarked.
    #[test]
    fn bbr3_ecn_ce_marks_shrink_what_it_keeps_in_flight() {
        let mut path = Path::clean(50 * MBIT_PER_S, Duration::from_millis(40), 0);
        path.queue_bytes = 2 * path.bdp_bytes();
        let marks_from = Duration::from_secs(8);
        let before = Duration::from_secs(6)..marks_from;
        let after = marks_from + Duration::from_secs(1)..Duration::from_secs(16);

        // Mean and maximum in flight before and after the marks begin
        let in_flight = |path: &Path| {
            let mut sums = [(0u64, 0u64, 0u64); 2];
            sim::run(
                bbr3,
                path,
                after.end,
                Duration::ZERO,
                |bbr: &Bbr3, seen: &Observation| {
                    window_floor(bbr, seen);
                    for (range, sum) in [&before, &after].into_iter().zip(&mut sums) {
                        if range.contains(&seen.elapsed) {
                            sum.0 += seen.bytes_in_flight;
                            sum.1 += 1;
                            sum.2 = sum.2.max(seen.bytes_in_flight);
                        }
                    }
                },
            );
            sums.map(|(sum, count, max)| (sum / count, max))
        };

        let [unmarked_before, unmarked_after] = in_flight(&path);
        path.ce_marks_from = Some(marks_from);
        let [marked_before, marked_after] = in_flight(&path);
        println!(
            "in flight (mean, max): unmarked {unmarked_before:?} then {unmarked_after:?}, \
             marked {marked_before:?} then {marked_after:?}, BDP {}",
            path.bdp_bytes()
        );
        assert_eq!(
            marked_before, unmarked_before,
            "the same run until the marks"
        );
        assert!(marked_after.0 * 10 <= unmarked_after.0 * 8);
        assert!(marked_after.1 * 10 <= unmarked_after.1 * 8);
    }

    /// 2 Mbit/s, 10 ms (a BDP of two datagrams), 20% loss, a queue of three datagrams: the
    /// window never falls under four datagrams (§5.6.4.3), nor after persistent congestion.
    #[test]
    fn bbr3_window_never_falls_under_four_datagrams() {
        let mut path = Path::clean(2 * MBIT_PER_S, Duration::from_millis(10), 3 * MTU as u64);
        path.loss_rate = 0.2;
        let mut lowest = u64::MAX;
        let (_, mut bbr) = sim::run(
            bbr3,
            &path,
            Duration::from_secs(10),
            Duration::ZERO,
            |bbr: &Bbr3, _: &Observation| lowest = lowest.min(bbr.window()),
        );
        println!("lowest window {lowest}");
        assert_eq!(lowest, MIN_WINDOW, "the floor is reached, and held");

        let now = Instant::now();
        bbr.on_congestion_event(now, now, true, 10 * MTU as u64);
        assert_eq!(bbr.window(), MIN_WINDOW);
        bbr.on_mtu_update(1452);
        assert_eq!(bbr.window(), 4 * 1452);
    }

    /// A peer that never acknowledges cannot grow the send records past their bound.
    #[test]
    fn bbr3_send_records_stay_bounded_without_acknowledgements() {
        let start = Instant::now();
        let mut bbr = bbr3(start);
        for i in 0..3 * SEND_RECORDS_MAX as u64 {
            bbr.on_sent(start + Duration::from_micros(i), MTU as u64, i);
            assert!(bbr.records.records.len() <= SEND_RECORDS_MAX);
        }
        assert_eq!(bbr.records.records.len(), SEND_RECORDS_MAX);
        // The newest record took the sends past the bound, and an ACK of one of them drops
        // every older record.
        let newest = start + Duration::from_micros(3 * SEND_RECORDS_MAX as u64 - 1);
        let rtt = RttEstimator::new(Duration::from_millis(10));
        bbr.on_ack(newest, newest, MTU as u64, false, &rtt);
        bbr.on_end_acks(newest, 0, false, None);
        assert_eq!(bbr.records.records.len(), 1);
        assert_eq!(
            bbr.records.records[0].bytes,
            (2 * SEND_RECORDS_MAX as u64 + 1) * MTU as u64
        );
    }
}
