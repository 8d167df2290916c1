//! Prometheus metrics: names as constants, every handle registered once in one registry and
//! looked up by label once per side, never per message.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Copies by side and what the arbiter (or the identity check) said of them.
pub const MESSAGES_TOTAL: &str = "mqc_messages_total";
/// Sink calls by side and outcome class.
pub const SINK_CALLS_TOTAL: &str = "mqc_sink_calls_total";
/// Duration of one sink call.
pub const SINK_CALL_SECONDS: &str = "mqc_sink_call_seconds";
/// Duration of one arbiter round trip, by operation (claim, complete).
pub const ARBITER_SECONDS: &str = "mqc_arbiter_seconds";
/// Time from a copy's hand-off by its source to the pipeline's decision on it (its call starts, or
/// it is acknowledged without one), by side: what arbitration adds in front of the call.
pub const DECISION_SECONDS: &str = "mqc_decision_seconds";
/// Sink calls in flight, by side.
pub const IN_FLIGHT: &str = "mqc_in_flight";
/// Gauge by `side`: claim batches sent to Redis and not answered yet (at most
/// `pipeline.claims_in_flight`).
pub const CLAIMS_IN_FLIGHT: &str = "mqc_claims_in_flight";
/// Gauge by side: bytes of message bodies held between the source and the fate of each copy,
/// under `pipeline.max_buffered_bytes`.
pub const BUFFERED_BYTES: &str = "mqc_buffered_bytes";
/// Gauge by side: the highest [`BUFFERED_BYTES`] since the daemon started.
pub const BUFFERED_BYTES_PEAK: &str = "mqc_buffered_bytes_peak";
/// Copies parked in dead letters, by side.
pub const DEAD_LETTERS_TOTAL: &str = "mqc_dead_letters_total";
/// Dead letters the stream's cap (`dead_letters.max_len`) removed to make room for newer ones;
/// their ids stay dead in the arbiter.
pub const DEAD_LETTERS_TRIMMED_TOTAL: &str = "mqc_dead_letters_trimmed_total";
/// Ambiguous outcomes (timeouts after sending, expired leases taken over), by side.
pub const AMBIGUOUS_TOTAL: &str = "mqc_ambiguous_total";
/// Successes recorded after their lease was lost, by side.
pub const OVERLAPS_TOTAL: &str = "mqc_overlaps_total";
/// Calls not made because the lease lapsed while the copy waited and another worker held the id,
/// by side.
pub const LAPSED_TOTAL: &str = "mqc_lapsed_total";
/// Calls not made because the lease could not be confirmed right before the call (Redis did not
/// answer); the copy is claimed again, by side.
pub const UNCONFIRMED_TOTAL: &str = "mqc_unconfirmed_total";
/// Ids adopted by a side because their routed owner never observed them, by side.
pub const ADOPTED_TOTAL: &str = "mqc_adopted_total";
/// Copies acknowledged with their position kept for adoption (the owner had not observed the id
/// yet), by side.
pub const ADOPTION_KEPT_TOTAL: &str = "mqc_adoption_kept_total";
/// Gauge by side: copies in the adoption index, waiting for their owner's copy.
pub const ADOPTION_WAITING: &str = "mqc_adoption_waiting";
/// Copies an adopting side could not read again from its broker (gone, or the broker away), by
/// side and reason (`gone`, `error`).
pub const REFETCH_FAILURES_TOTAL: &str = "mqc_refetch_failures_total";
/// Copies older than `arbiter.retention` by their broker timestamp, parked without a claim, by
/// side.
pub const TOO_OLD_TOTAL: &str = "mqc_too_old_total";
/// The switches this instance follows.
pub const SWITCH_CONSUME: &str = "mqc_switch_consume";
/// The percentage routed to the new side.
pub const SWITCH_PERCENT: &str = "mqc_switch_percent";
/// Whitelisted business ids.
pub const SWITCH_WHITELIST_SIZE: &str = "mqc_switch_whitelist_size";
/// 1 while the sink's circuit is open.
pub const CIRCUIT_OPEN: &str = "mqc_circuit_open";
/// 1 while Redis answers.
pub const REDIS_UP: &str = "mqc_redis_up";
/// Times the sources were paused (Redis away, circuit open).
pub const PAUSES_TOTAL: &str = "mqc_pauses_total";
/// Redis command connections replaced, by reason (`stalled`: no call answered for a while
/// although the servers answered a fresh connection; `failover`: the sentinels named another
/// primary).
pub const REDIS_RECONNECTS_TOTAL: &str = "mqc_redis_reconnects_total";
/// Messages behind the end of the log, by side and partition (Kafka) or queue (RocketMQ).
pub const CONSUMER_LAG: &str = "mqc_consumer_lag_messages";
/// Partitions or queues assigned to this instance, by side.
pub const ASSIGNED_QUEUES: &str = "mqc_assigned_queues";
/// Rebalances (assignment changes) seen, by side.
pub const REBALANCES_TOTAL: &str = "mqc_rebalances_total";
/// Partitions or queues of a side stalled now: messages waiting, the side not paused on purpose,
/// nothing handed to the pipeline for `pipeline.stall_after`.
pub const STALLED_QUEUES: &str = "mqc_stalled_queues";
/// Stalls begun, by side: one per partition or queue that became stalled.
pub const STALLS_TOTAL: &str = "mqc_stalls_total";
/// Ids first observed by this instance, by side (the parity counts, as this instance saw them).
pub const PARITY_OBSERVED_TOTAL: &str = "mqc_parity_observed_total";
/// Ids seen by this side only, for longer than the grace period (the parity gap), by side.
pub const PARITY_ONE_SIDED: &str = "mqc_parity_one_sided_ids";
/// One-sided ids past the tracking cap, counted but not listed, by side.
pub const PARITY_UNTRACKED: &str = "mqc_parity_untracked_ids";

/// Every metric family the daemon exports (histograms add `_bucket`, `_sum`, `_count`).
pub const NAMES: &[&str] = &[
    MESSAGES_TOTAL,
    SINK_CALLS_TOTAL,
    SINK_CALL_SECONDS,
    ARBITER_SECONDS,
    DECISION_SECONDS,
    IN_FLIGHT,
    CLAIMS_IN_FLIGHT,
    BUFFERED_BYTES,
    BUFFERED_BYTES_PEAK,
    DEAD_LETTERS_TOTAL,
    DEAD_LETTERS_TRIMMED_TOTAL,
    AMBIGUOUS_TOTAL,
    OVERLAPS_TOTAL,
    LAPSED_TOTAL,
    UNCONFIRMED_TOTAL,
    ADOPTED_TOTAL,
    ADOPTION_KEPT_TOTAL,
    ADOPTION_WAITING,
    REFETCH_FAILURES_TOTAL,
    TOO_OLD_TOTAL,
    SWITCH_CONSUME,
    SWITCH_PERCENT,
    SWITCH_WHITELIST_SIZE,
    CIRCUIT_OPEN,
    REDIS_UP,
    PAUSES_TOTAL,
    REDIS_RECONNECTS_TOTAL,
    CONSUMER_LAG,
    ASSIGNED_QUEUES,
    REBALANCES_TOTAL,
    STALLED_QUEUES,
    STALLS_TOTAL,
    PARITY_OBSERVED_TOTAL,
    PARITY_ONE_SIDED,
    PARITY_UNTRACKED,
];

/// What a copy came to, for [`MESSAGES_TOTAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// This side owns it and called the sink.
    Proceed,
    /// The other side owns it.
    NotMine,
    /// Already delivered.
    Duplicate,
    /// Another worker holds the lease.
    Busy,
    /// Parked.
    Dead,
    /// No readable identity.
    BadInput,
}

impl Fate {
    const ALL: [Fate; 6] = [
        Fate::Proceed,
        Fate::NotMine,
        Fate::Duplicate,
        Fate::Busy,
        Fate::Dead,
        Fate::BadInput,
    ];

    fn label(self) -> &'static str {
        match self {
            Fate::Proceed => "proceed",
            Fate::NotMine => "not_mine",
            Fate::Duplicate => "duplicate",
            Fate::Busy => "busy",
            Fate::Dead => "dead",
            Fate::BadInput => "bad_input",
        }
    }
}

/// Sink outcome classes, for [`SINK_CALLS_TOTAL`].
pub const CALL_CLASSES: [&str; 4] = ["success", "retryable", "fatal", "ambiguous"];

/// The handles of one side, resolved once.
#[derive(Clone)]
pub struct SideMetrics {
    messages: [IntCounter; 6],
    calls: [IntCounter; 4],
    /// Calls in flight.
    pub in_flight: IntGauge,
    /// Claim batches in flight.
    pub claims_in_flight: IntGauge,
    /// Bytes of bodies held under `pipeline.max_buffered_bytes`.
    pub buffered_bytes: IntGauge,
    /// The highest `buffered_bytes` so far.
    pub buffered_bytes_peak: IntGauge,
    /// Parked copies.
    pub dead_letters: IntCounter,
    /// Ambiguous outcomes.
    pub ambiguous: IntCounter,
    /// Late successes.
    pub overlaps: IntCounter,
    /// Calls not made: the lease lapsed before the call and another worker held the id.
    pub lapsed: IntCounter,
    /// Calls not made: the lease could not be confirmed before the call; claimed again.
    pub unconfirmed: IntCounter,
    /// Ids this side observed for the first time.
    pub parity_observed: IntCounter,
    /// Ids this side adopted.
    pub adopted: IntCounter,
    /// Copies acknowledged with their position kept for adoption.
    pub adoption_kept: IntCounter,
    /// Copies in this side's adoption index.
    pub adoption_waiting: IntGauge,
    /// Adopted copies that were gone from the broker.
    pub refetch_gone: IntCounter,
    /// Adopted copies the broker could not hand over now (tried again later).
    pub refetch_error: IntCounter,
    /// Copies too old to arbitrate.
    pub too_old: IntCounter,
    decision_seconds: Histogram,
}

impl SideMetrics {
    /// Counts `n` copies with this fate.
    pub fn message(&self, fate: Fate, n: u64) {
        let i = Fate::ALL.iter().position(|f| *f == fate).expect("listed");
        self.messages[i].inc_by(n);
    }

    /// Counts one copy with this fate and observes its hand-off-to-decision time
    /// ([`DECISION_SECONDS`]); `received` is when its source handed it over.
    pub fn decided(&self, fate: Fate, received: std::time::Instant) {
        self.message(fate, 1);
        self.decision_seconds
            .observe(received.elapsed().as_secs_f64());
    }

    /// Counts one sink call of this class (`success`, `retryable`, `fatal`, `ambiguous`).
    pub fn call(&self, class: &str) {
        if let Some(i) = CALL_CLASSES.iter().position(|c| *c == class) {
            self.calls[i].inc();
        }
    }
}

/// Every metric of the daemon.
pub struct Metrics {
    registry: Registry,
    messages: IntCounterVec,
    calls: IntCounterVec,
    in_flight: prometheus::IntGaugeVec,
    claims_in_flight: prometheus::IntGaugeVec,
    buffered_bytes: IntGaugeVec,
    buffered_bytes_peak: IntGaugeVec,
    dead: IntCounterVec,
    ambiguous: IntCounterVec,
    overlaps: IntCounterVec,
    lapsed: IntCounterVec,
    unconfirmed: IntCounterVec,
    adopted: IntCounterVec,
    adoption_kept: IntCounterVec,
    adoption_waiting: IntGaugeVec,
    refetch_failures: IntCounterVec,
    too_old: IntCounterVec,
    /// Sink call durations.
    pub sink_seconds: Histogram,
    /// Claim round trips.
    pub claim_seconds: Histogram,
    /// Completion round trips.
    pub complete_seconds: Histogram,
    decision: HistogramVec,
    /// Consume switch, 0 / 1.
    pub switch_consume: IntGauge,
    /// Percentage.
    pub switch_percent: IntGauge,
    /// Whitelist size.
    pub switch_whitelist: IntGauge,
    /// Circuit open, 0 / 1.
    pub circuit_open: IntGauge,
    /// Redis answering, 0 / 1.
    pub redis_up: Gauge,
    /// Pauses of the sources.
    pub pauses: IntCounter,
    /// Dead letters removed by the stream's cap.
    pub dead_trimmed: IntCounter,
    /// Redis connections the watchdog replaced because they stalled.
    pub redis_reconnects_stalled: IntCounter,
    /// Redis connections moved to the primary the sentinels named after a failover.
    pub redis_reconnects_failover: IntCounter,
    /// Lag by side and partition / queue.
    pub consumer_lag: IntGaugeVec,
    /// Assigned partitions / queues by side.
    pub assigned: IntGaugeVec,
    /// Rebalances by side.
    pub rebalances: IntCounterVec,
    /// Stalled partitions / queues by side.
    pub stalled: IntGaugeVec,
    /// Stalls begun by side.
    pub stalls: IntCounterVec,
    /// Ids newly observed by side.
    pub parity_observed: IntCounterVec,
    /// One-sided ids past the grace period, by side.
    pub parity_one_sided: IntGaugeVec,
    /// One-sided ids past the tracking cap, by side.
    pub parity_untracked: IntGaugeVec,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

impl Default for Metrics {
    fn default() -> Self {
        let r = Registry::new();
        let latency = vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0,
        ];
        let arbiter = HistogramVec::new(
            HistogramOpts::new(
                ARBITER_SECONDS,
                "Duration of one arbiter round trip to Redis.",
            )
            .buckets(latency.clone()),
            &["op"],
        )
        .expect("valid");
        let arbiter = reg(&r, arbiter);
        let redis_reconnects = reg(
            &r,
            IntCounterVec::new(
                Opts::new(
                    REDIS_RECONNECTS_TOTAL,
                    "Redis command connections replaced, by reason (stalled: no call answered \
                     although the servers answered a fresh connection; failover: the sentinels \
                     named another primary).",
                ),
                &["reason"],
            )
            .expect("valid"),
        );
        let decision = HistogramVec::new(
            HistogramOpts::new(
                DECISION_SECONDS,
                "Time from a copy's hand-off by its source to the pipeline's decision on it \
                 (its call starts, or it is acknowledged without one), by side.",
            )
            .buckets(vec![
                0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01,
                0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["side"],
        )
        .expect("valid");
        let decision = reg(&r, decision);
        Metrics {
            messages: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(MESSAGES_TOTAL, "Copies received, by side and fate."),
                    &["side", "fate"],
                )
                .expect("valid"),
            ),
            calls: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(SINK_CALLS_TOTAL, "Sink calls, by side and outcome class."),
                    &["side", "class"],
                )
                .expect("valid"),
            ),
            in_flight: reg(
                &r,
                prometheus::IntGaugeVec::new(
                    Opts::new(IN_FLIGHT, "Sink calls in flight, by side."),
                    &["side"],
                )
                .expect("valid"),
            ),
            buffered_bytes: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        BUFFERED_BYTES,
                        "Bytes of message bodies held between the source and each copy's fate \
                         (pipeline.max_buffered_bytes), by side.",
                    ),
                    &["side"],
                )
                .expect("valid"),
            ),
            buffered_bytes_peak: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        BUFFERED_BYTES_PEAK,
                        "The highest mqc_buffered_bytes since the daemon started, by side.",
                    ),
                    &["side"],
                )
                .expect("valid"),
            ),
            claims_in_flight: reg(
                &r,
                prometheus::IntGaugeVec::new(
                    Opts::new(
                        CLAIMS_IN_FLIGHT,
                        "Claim batches sent to Redis and not answered yet, by side.",
                    ),
                    &["side"],
                )
                .expect("valid"),
            ),
            dead: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        DEAD_LETTERS_TOTAL,
                        "Copies parked in dead letters, by side.",
                    ),
                    &["side"],
                )
                .expect("valid"),
            ),
            ambiguous: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(AMBIGUOUS_TOTAL, "Calls whose outcome is unknown, by side."),
                    &["side"],
                )
                .expect("valid"),
            ),
            overlaps: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        OVERLAPS_TOTAL,
                        "Successes recorded after their lease was lost.",
                    ),
                    &["side"],
                )
                .expect("valid"),
            ),
            lapsed: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        LAPSED_TOTAL,
                        "Calls not made because the lease lapsed before the call and another worker held the id.",
                    ),
                    &["side"],
                )
                .expect("valid"),
            ),
            unconfirmed: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        UNCONFIRMED_TOTAL,
                        "Calls not made because Redis did not confirm the lease right before the call; the copy is claimed again.",
                    ),
                    &["side"],
                )
                .expect("valid"),
            ),
            adopted: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        ADOPTED_TOTAL,
                        "Ids adopted by this side because their routed owner never observed them.",
                    ),
                    &["side"],
                )
                .expect("valid"),
            ),
            adoption_kept: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        ADOPTION_KEPT_TOTAL,
                        "Copies acknowledged with their position kept for adoption (owner unseen).",
                    ),
                    &["side"],
                )
                .expect("valid"),
            ),
            adoption_waiting: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        ADOPTION_WAITING,
                        "Copies in the side's adoption index, waiting for their owner's copy.",
                    ),
                    &["side"],
                )
                .expect("valid"),
            ),
            refetch_failures: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        REFETCH_FAILURES_TOTAL,
                        "Adopted copies not read again from the broker, by reason (gone, error).",
                    ),
                    &["side", "reason"],
                )
                .expect("valid"),
            ),
            too_old: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        TOO_OLD_TOTAL,
                        "Copies older than arbiter.retention, parked without a claim.",
                    ),
                    &["side"],
                )
                .expect("valid"),
            ),
            sink_seconds: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(SINK_CALL_SECONDS, "Duration of one sink call.")
                        .buckets(latency),
                )
                .expect("valid"),
            ),
            claim_seconds: arbiter.with_label_values(&["claim"]),
            complete_seconds: arbiter.with_label_values(&["complete"]),
            decision,
            switch_consume: reg(
                &r,
                IntGauge::new(
                    SWITCH_CONSUME,
                    "The consume switch this instance follows (1 on).",
                )
                .expect("valid"),
            ),
            switch_percent: reg(
                &r,
                IntGauge::new(
                    SWITCH_PERCENT,
                    "Percentage of buckets routed to the new side.",
                )
                .expect("valid"),
            ),
            switch_whitelist: reg(
                &r,
                IntGauge::new(SWITCH_WHITELIST_SIZE, "Business ids on the whitelist.")
                    .expect("valid"),
            ),
            circuit_open: reg(
                &r,
                IntGauge::new(CIRCUIT_OPEN, "1 while the sink's circuit is open.").expect("valid"),
            ),
            redis_up: reg(
                &r,
                Gauge::new(REDIS_UP, "1 while Redis answers.").expect("valid"),
            ),
            pauses: reg(
                &r,
                IntCounter::new(PAUSES_TOTAL, "Times the sources were paused.").expect("valid"),
            ),
            dead_trimmed: reg(
                &r,
                IntCounter::new(
                    DEAD_LETTERS_TRIMMED_TOTAL,
                    "Dead letters the stream's cap removed (their ids stay dead).",
                )
                .expect("valid"),
            ),
            redis_reconnects_stalled: redis_reconnects.with_label_values(&["stalled"]),
            redis_reconnects_failover: redis_reconnects.with_label_values(&["failover"]),
            consumer_lag: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        CONSUMER_LAG,
                        "Messages between the committed position and the end of the log, by side \
                         and partition (Kafka topic/partition) or queue (RocketMQ broker/topic/queue).",
                    ),
                    &["side", "queue"],
                )
                .expect("valid"),
            ),
            assigned: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        ASSIGNED_QUEUES,
                        "Partitions (Kafka) or queues (RocketMQ) assigned to this instance.",
                    ),
                    &["side"],
                )
                .expect("valid"),
            ),
            rebalances: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(REBALANCES_TOTAL, "Assignment changes seen, by side."),
                    &["side"],
                )
                .expect("valid"),
            ),
            stalled: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        STALLED_QUEUES,
                        "Partitions (Kafka) or queues (RocketMQ) of a side with messages waiting \
                         and nothing handed to the pipeline for pipeline.stall_after, the side \
                         not paused on purpose.",
                    ),
                    &["side"],
                )
                .expect("valid"),
            ),
            stalls: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        STALLS_TOTAL,
                        "Stalls begun, by side: one per partition or queue that became stalled.",
                    ),
                    &["side"],
                )
                .expect("valid"),
            ),
            parity_observed: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        PARITY_OBSERVED_TOTAL,
                        "Ids this instance saw a side observe for the first time.",
                    ),
                    &["side"],
                )
                .expect("valid"),
            ),
            parity_one_sided: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        PARITY_ONE_SIDED,
                        "Ids seen by this side only for longer than the parity grace period.",
                    ),
                    &["side"],
                )
                .expect("valid"),
            ),
            parity_untracked: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        PARITY_UNTRACKED,
                        "One-sided ids beyond the tracking cap: counted, not listed.",
                    ),
                    &["side"],
                )
                .expect("valid"),
            ),
            registry: r,
        }
    }
}

impl Metrics {
    /// The handles of one side (call once per side, keep the result).
    pub fn side(&self, side: &str) -> SideMetrics {
        SideMetrics {
            messages: Fate::ALL.map(|f| self.messages.with_label_values(&[side, f.label()])),
            calls: CALL_CLASSES.map(|c| self.calls.with_label_values(&[side, c])),
            in_flight: self.in_flight.with_label_values(&[side]),
            claims_in_flight: self.claims_in_flight.with_label_values(&[side]),
            buffered_bytes: self.buffered_bytes.with_label_values(&[side]),
            buffered_bytes_peak: self.buffered_bytes_peak.with_label_values(&[side]),
            dead_letters: self.dead.with_label_values(&[side]),
            ambiguous: self.ambiguous.with_label_values(&[side]),
            overlaps: self.overlaps.with_label_values(&[side]),
            lapsed: self.lapsed.with_label_values(&[side]),
            unconfirmed: self.unconfirmed.with_label_values(&[side]),
            parity_observed: self.parity_observed.with_label_values(&[side]),
            adopted: self.adopted.with_label_values(&[side]),
            adoption_kept: self.adoption_kept.with_label_values(&[side]),
            adoption_waiting: self.adoption_waiting.with_label_values(&[side]),
            refetch_gone: self.refetch_failures.with_label_values(&[side, "gone"]),
            refetch_error: self.refetch_failures.with_label_values(&[side, "error"]),
            too_old: self.too_old.with_label_values(&[side]),
            decision_seconds: self.decision.with_label_values(&[side]),
        }
    }

    /// The text exposition format, for `/metrics`.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding never fails");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

/// One side's counters as they are now: what `/metrics` renders for that side, read from the
/// same handles (for `/api/status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SideSnapshot {
    /// Copies by fate, labelled as in [`MESSAGES_TOTAL`].
    pub messages: [(&'static str, u64); 6],
    /// Sink calls by class, labelled as in [`SINK_CALLS_TOTAL`].
    pub calls: [(&'static str, u64); 4],
    /// Calls in flight.
    pub in_flight: i64,
    /// Copies parked.
    pub dead_letters: u64,
    /// Ambiguous outcomes.
    pub ambiguous: u64,
    /// Late successes.
    pub overlaps: u64,
}

impl Metrics {
    /// The counters of one side now. Not for the hot path: it resolves the labels on each call.
    pub fn snapshot(&self, side: &str) -> SideSnapshot {
        let h = self.side(side);
        SideSnapshot {
            messages: std::array::from_fn(|i| (Fate::ALL[i].label(), h.messages[i].get())),
            calls: std::array::from_fn(|i| (CALL_CLASSES[i], h.calls[i].get())),
            in_flight: h.in_flight.get(),
            dead_letters: h.dead_letters.get(),
            ambiguous: h.ambiguous.get(),
            overlaps: h.overlaps.get(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn side_handles_count_under_their_labels() {
        let m = Metrics::default();
        let k = m.side("kafka");
        k.message(Fate::NotMine, 3);
        k.decided(Fate::NotMine, std::time::Instant::now());
        k.call("ambiguous");
        k.call("not-a-class");
        m.claim_seconds.observe(0.0012);
        let text = m.render();
        assert!(
            text.contains("mqc_messages_total{fate=\"not_mine\",side=\"kafka\"} 4"),
            "{text}"
        );
        assert!(
            text.contains("mqc_sink_calls_total{class=\"ambiguous\",side=\"kafka\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("mqc_arbiter_seconds_count{op=\"claim\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("mqc_decision_seconds_count{side=\"kafka\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn every_exported_family_is_listed_in_names() {
        let m = Metrics::default();
        let k = m.side("kafka");
        for f in Fate::ALL {
            k.message(f, 1);
        }
        k.call("success");
        k.in_flight.inc();
        k.dead_letters.inc();
        k.ambiguous.inc();
        k.overlaps.inc();
        k.lapsed.inc();
        k.unconfirmed.inc();
        m.sink_seconds.observe(0.1);
        m.claim_seconds.observe(0.1);
        m.consumer_lag.with_label_values(&["kafka", "t/0"]).set(1);
        m.assigned.with_label_values(&["kafka"]).set(1);
        m.rebalances.with_label_values(&["kafka"]).inc();
        m.stalled.with_label_values(&["kafka"]).set(0);
        m.stalls.with_label_values(&["kafka"]).inc();
        m.parity_observed.with_label_values(&["kafka"]).inc();
        m.parity_one_sided.with_label_values(&["kafka"]).set(1);
        m.parity_untracked.with_label_values(&["kafka"]).set(1);
        let families: Vec<String> = m
            .registry
            .gather()
            .iter()
            .map(|f| f.name().to_owned())
            .collect();
        let mut listed: Vec<&str> = NAMES.to_vec();
        listed.sort();
        let mut got: Vec<&str> = families.iter().map(String::as_str).collect();
        got.sort();
        assert_eq!(got, listed);
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        for name in [
            MESSAGES_TOTAL,
            SINK_CALLS_TOTAL,
            DEAD_LETTERS_TOTAL,
            AMBIGUOUS_TOTAL,
            OVERLAPS_TOTAL,
            LAPSED_TOTAL,
            PAUSES_TOTAL,
            REBALANCES_TOTAL,
            PARITY_OBSERVED_TOTAL,
        ] {
            assert!(
                name.starts_with("mqc_") && name.ends_with("_total"),
                "{name}"
            );
        }
        for name in [SINK_CALL_SECONDS, ARBITER_SECONDS] {
            assert!(name.ends_with("_seconds"), "{name}");
        }
    }

    #[test]
    fn a_snapshot_reads_what_the_side_counted() {
        let m = Metrics::default();
        let k = m.side("kafka");
        k.message(Fate::Duplicate, 4);
        k.call("fatal");
        k.in_flight.inc();
        let s = m.snapshot("kafka");
        assert_eq!(s.messages[2], ("duplicate", 4));
        assert_eq!(s.messages.iter().map(|(_, n)| n).sum::<u64>(), 4);
        assert_eq!(s.calls[2], ("fatal", 1));
        assert_eq!(s.in_flight, 1);
        assert_eq!(m.snapshot("rocketmq").messages[0], ("proceed", 0));
    }
}
