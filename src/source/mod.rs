//! Sources: one per side, each a broker consumer that turns the broker's records into
//! [`Message`](crate::message::Message)s for the pipeline and commits offsets only for copies
//! the pipeline has finished. Copies go through the side's [`outlet::Outlet`], bounded in copies
//! (`pipeline.channel`) and in bytes (`pipeline.max_buffered_bytes`).
//!
//! Both brokers share one rule, kept by [`OffsetTracker`]: a partition's (queue's) committed
//! offset never passes a copy whose fate is not recorded yet, so a crash or a rebalance can only
//! cause a copy to be seen again (which the arbiter answers DONE / NOT_MINE), never skipped.
//!
//! Each source also reports its place in its consumer group through a [`Membership`]: whether
//! it has joined (for `/readyz`), the partitions (queues) it holds and how often that changed,
//! and each held one's lag, measured on a timer apart from the consume loop. With the lag, a
//! source reports how far it has read each partition for the pipeline ([`Reading`]): the
//! [`stall`] detector behind the membership flags a partition the side stopped reading.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use prometheus::{IntCounter, IntGauge, IntGaugeVec};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::message::{Finished, Side};
use crate::telemetry::metrics::Metrics;

pub mod config;
pub mod kafka;
pub mod kafka_security;
pub mod outlet;

pub mod rocketmq;

pub mod stall;

use stall::StallDetector;
pub use stall::{Reading, LAG_INTERVAL};

/// What a source needs from the daemon.
pub struct SourceContext {
    /// This source's side.
    pub side: Side,
    /// Where copies go; bounded in copies and in bytes, so a slow pipeline slows the source
    /// down.
    pub out: outlet::Outlet,
    /// Cancelled on shutdown: stop fetching, commit what is finished, leave the group.
    pub cancel: CancellationToken,
    /// True while the daemon wants no new copies (Redis away, circuit open): pause fetching.
    pub paused: watch::Receiver<bool>,
    /// Where the source reports joining its group, its assignment, rebalances and lag.
    pub membership: Membership,
    /// `pipeline.max_message_bytes`: a body larger than this (as stored, or once uncompressed)
    /// is handed over as bad input, with the reason and no payload, never forwarded.
    pub max_message_bytes: usize,
}

/// A source's place in its consumer group, as `/metrics` and `/readyz` see it: whether it has
/// joined, the partitions (Kafka) or queues (RocketMQ) it holds, how often that changed, the
/// lag of each one held, and which of them are stalled. Clones share one state; the lock inside
/// is held for a few map operations, never across an `.await`.
///
/// What a source reports, and when:
/// - [`Membership::rebalanced`] / [`Membership::revoked`] (or [`Membership::reassigned`] for a
///   client that reports the whole assignment) whenever its assignment changes;
/// - on its lag timer ([`Membership::lag_interval`]), [`Membership::measured`] with a
///   [`Reading`] per held partition: the lag, where its reading for the pipeline stands, and
///   what waits in the broker past it. Only partitions reported this way are watched for
///   stalls; [`Membership::record_lag`] sets the lag alone, for a source that cannot say where
///   its reading stands.
#[derive(Clone)]
pub struct Membership {
    inner: Arc<MembershipInner>,
}

struct MembershipInner {
    side: Side,
    lag_interval: Duration,
    joined: watch::Sender<bool>,
    assigned: IntGauge,
    rebalances: IntCounter,
    lag: IntGaugeVec,
    stalled: IntGauge,
    stalls: IntCounter,
    state: Mutex<State>,
    /// Why the brokers refuse this source (credentials, TLS), while they do.
    refused: Mutex<Option<String>>,
    /// Why the source cannot reach its brokers, and since when, while it cannot.
    unreachable: Mutex<Option<(String, tokio::time::Instant)>>,
    /// Whether `unreachable` holds a reason: read on every record, so it is an atomic.
    out_of_reach: AtomicBool,
}

struct State {
    /// Held queues by their `queue` label, with their lag gauge once measured: a series appears
    /// only with a measured value, never as a placeholder 0.
    held: BTreeMap<String, Option<IntGauge>>,
    stall: StallDetector,
    /// The daemon's pause switch (Redis down, circuit open): no stall while it is on.
    paused: Option<watch::Receiver<bool>>,
}

/// How long a partition may wait without progress before it counts as stalled, unless the
/// daemon says otherwise (`pipeline.stall_after`).
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(60);

impl Membership {
    /// The membership of `side`, reporting into `metrics`, measuring lag every `lag_interval`
    /// (the daemon uses [`LAG_INTERVAL`]).
    pub fn new(side: Side, metrics: &Metrics, lag_interval: Duration) -> Membership {
        let (joined, _) = watch::channel(false);
        Membership {
            inner: Arc::new(MembershipInner {
                assigned: metrics.assigned.with_label_values(&[&*side]),
                rebalances: metrics.rebalances.with_label_values(&[&*side]),
                lag: metrics.consumer_lag.clone(),
                stalled: metrics.stalled.with_label_values(&[&*side]),
                stalls: metrics.stalls.with_label_values(&[&*side]),
                side,
                lag_interval,
                joined,
                state: Mutex::new(State {
                    held: BTreeMap::new(),
                    stall: StallDetector::new(DEFAULT_STALL_AFTER),
                    paused: None,
                }),
                refused: Mutex::new(None),
                unreachable: Mutex::new(None),
                out_of_reach: AtomicBool::new(false),
            }),
        }
    }

    /// Watches for stalls with `after` as the threshold (`pipeline.stall_after`), following the
    /// daemon's pause switch: while it is on, nothing is stalled and every clock starts again.
    pub fn watch_stalls(self, after: Duration, paused: watch::Receiver<bool>) -> Membership {
        {
            let mut state = self.lock();
            state.stall.set_after(after);
            state.paused = Some(paused);
        }
        self
    }

    /// How long a partition may wait without progress before it counts as stalled.
    pub fn stall_after(&self) -> Duration {
        self.lock().stall.after()
    }

    /// The side.
    pub fn side(&self) -> &Side {
        &self.inner.side
    }

    /// How often the source measures its lag.
    pub fn lag_interval(&self) -> Duration {
        self.inner.lag_interval
    }

    /// Whether the source has received its first assignment from the group.
    pub fn has_joined(&self) -> bool {
        *self.inner.joined.borrow()
    }

    /// Follows [`Membership::has_joined`]: `wait_for(|j| *j)` waits for the join.
    pub fn joined(&self) -> watch::Receiver<bool> {
        self.inner.joined.subscribe()
    }

    /// The `queue` labels of what the source holds now.
    pub fn held(&self) -> Vec<String> {
        self.lock().held.keys().cloned().collect()
    }

    /// The `queue` labels of the held partitions (queues) stalled now; none while the daemon
    /// pauses the sources on purpose.
    pub fn stalled(&self) -> Vec<String> {
        let state = self.lock();
        if state.paused.as_ref().is_some_and(|p| *p.borrow()) {
            return Vec::new();
        }
        state.stall.stalled().iter().cloned().collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update is one call that leaves the state consistent, even if a holder panicked.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A rebalance round ended: the source now also holds `gained` (an incremental round may
    /// add nothing). Counts the rebalance and marks the source as joined, even with nothing
    /// held: a group with more members than queues legitimately leaves some with none.
    /// Returns how many queues are held now.
    pub fn rebalanced(&self, gained: &[String]) -> usize {
        let held = {
            let held = &mut self.lock().held;
            for queue in gained {
                held.entry(queue.clone()).or_insert(None);
            }
            held.len()
        };
        self.inner.assigned.set(held as i64);
        self.inner.rebalances.inc();
        self.inner.joined.send_replace(true);
        held
    }

    /// `lost` queues were taken away: their lag series go at once, so that an instance never
    /// shows a lag for a queue it no longer reads. Returns how many queues are held now.
    pub fn revoked(&self, lost: &[String]) -> usize {
        let (held, moved, stalled) = {
            let mut state = self.lock();
            let mut moved = Vec::new();
            for queue in lost {
                if let Some(Some(_)) = state.held.remove(queue) {
                    let _ = self
                        .inner
                        .lag
                        .remove_label_values(&[&*self.inner.side, queue]);
                }
                if state.stall.forget(queue) {
                    moved.push(queue.clone());
                }
            }
            (state.held.len(), moved, state.stall.stalled().len())
        };
        self.inner.assigned.set(held as i64);
        if !moved.is_empty() {
            self.inner.stalled.set(stalled as i64);
            tracing::info!(side = %self.inner.side, partitions = ?moved, stalled, "stalled partitions taken away by a rebalance");
        }
        held
    }

    /// For clients that report the whole assignment (RocketMQ): the source now holds exactly
    /// `now`. Returns what was gained and lost, or `None` if nothing changed and the source had
    /// joined already; a change (and the first assignment) counts as a rebalance.
    pub fn reassigned(&self, now: &BTreeSet<String>) -> Option<(Vec<String>, Vec<String>)> {
        let (gained, lost) = {
            let state = self.lock();
            let held = &state.held;
            let gained: Vec<String> = now
                .iter()
                .filter(|q| !held.contains_key(*q))
                .cloned()
                .collect();
            let lost: Vec<String> = held.keys().filter(|q| !now.contains(*q)).cloned().collect();
            (gained, lost)
        };
        if gained.is_empty() && lost.is_empty() && self.has_joined() {
            return None;
        }
        self.revoked(&lost);
        self.rebalanced(&gained);
        Some((gained, lost))
    }

    /// Sets the lag of a held queue; ignored (returns false) if the queue is not held any more,
    /// so a measurement that raced with a revocation cannot bring a stale series back.
    pub fn record_lag(&self, queue: &str, messages: i64) -> bool {
        self.set_lag(&mut self.lock(), queue, messages)
    }

    fn set_lag(&self, state: &mut State, queue: &str, messages: i64) -> bool {
        let Some(gauge) = state.held.get_mut(queue) else {
            return false;
        };
        gauge
            .get_or_insert_with(|| {
                self.inner
                    .lag
                    .with_label_values(&[&*self.inner.side, queue])
            })
            .set(messages.max(0));
        true
    }

    /// One lag measurement: sets the lag of each held partition (queue) read, as
    /// [`Membership::record_lag`] does, and feeds the stall detector. Readings of partitions
    /// not held any more are ignored. Logs one WARN line when partitions become stalled and one
    /// INFO line when they stop being stalled; never one per measurement.
    pub fn measured(&self, readings: &[(String, Reading)]) {
        // Tokio's clock, so that tests can move it (`tokio::time::pause`); the wall clock
        // outside a runtime.
        let now = tokio::time::Instant::now().into_std();
        let (change, stalled, after) = {
            let mut state = self.lock();
            let state = &mut *state;
            // A pause that came and went since the last measurement counts too.
            let paused = state.paused.as_mut().is_some_and(|p| {
                let flipped = p.has_changed().unwrap_or(false);
                flipped | *p.borrow_and_update()
            });
            let mut read = Vec::with_capacity(readings.len());
            for (queue, r) in readings {
                if self.set_lag(state, queue, r.lag) {
                    read.push((queue.as_str(), *r));
                }
            }
            let change = state.stall.observe(now, paused, read);
            (change, state.stall.stalled().len(), state.stall.after())
        };
        self.inner.stalled.set(stalled as i64);
        if !change.began.is_empty() {
            self.inner.stalls.inc_by(change.began.len() as u64);
            tracing::warn!(
                side = %self.inner.side,
                partitions = ?change.began,
                stalled,
                "side stalled: messages wait in these partitions (queues) and nothing was read \
                 from them for the pipeline for {}, the side not paused on purpose; /readyz \
                 answers 503 (docs/operations.md, MqCutoverSourceStalled)",
                humantime::format_duration(after)
            );
        }
        if !change.ended.is_empty() {
            tracing::info!(
                side = %self.inner.side,
                partitions = ?change.ended,
                stalled,
                "stall over: these partitions (queues) are read again, have nothing waiting, or the side is paused on purpose"
            );
        }
    }

    /// The brokers refuse the source (`Some(why)`: wrong credentials, an untrusted certificate,
    /// a plaintext client on a TLS port) or accept it again (`None`); `/readyz` names the reason
    /// while it lasts. Returns whether the source went from accepted to refused or back.
    pub fn set_refused(&self, why: Option<String>) -> bool {
        let mut refused = self
            .inner
            .refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let flipped = refused.is_some() != why.is_some();
        *refused = why;
        flipped
    }

    /// Why the brokers refuse the source, while they do.
    pub fn refused(&self) -> Option<String> {
        self.inner
            .refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The source cannot reach its brokers (`Some(why)`: every connection down, the broker
    /// process gone) or reaches them again (`None`); `/readyz` names the reason, and how long
    /// it has lasted, while it does. A repeated report keeps the time of the first. Returns
    /// whether the source went from reachable to unreachable or back.
    pub fn set_unreachable(&self, why: Option<String>) -> bool {
        let mut unreachable = self
            .inner
            .unreachable
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let flipped = unreachable.is_some() != why.is_some();
        *unreachable = why.map(|why| {
            let since = unreachable
                .as_ref()
                .map_or_else(tokio::time::Instant::now, |(_, since)| *since);
            (why, since)
        });
        self.inner
            .out_of_reach
            .store(unreachable.is_some(), Ordering::Release);
        flipped
    }

    /// A broker answered a request: any outage is over. Returns how long the one that ended
    /// lasted. Cheap when there was none (an atomic load): sources call it after every answered
    /// lag query.
    pub fn reached(&self) -> Option<Duration> {
        if !self.inner.out_of_reach.load(Ordering::Acquire) {
            return None;
        }
        let lasted = self.unreachable().map(|(_, lasted)| lasted);
        self.set_unreachable(None).then_some(lasted).flatten()
    }

    /// Why the source cannot reach its brokers, and for how long it has not, while it cannot.
    pub fn unreachable(&self) -> Option<(String, Duration)> {
        self.inner
            .unreachable
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|(why, since)| (why.clone(), since.elapsed()))
    }

    /// The source left its group (shutdown): every lag series goes and nothing is held.
    pub fn left(&self) {
        let all: Vec<String> = self.held();
        self.revoked(&all);
    }
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("side", &self.inner.side)
            .field("joined", &self.has_joined())
            .field("held", &self.held())
            .finish()
    }
}

/// Why a source stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The consumer could not be created or subscribed (bad settings, broker unreachable).
    #[error("{side}: cannot start the consumer: {reason}")]
    Start {
        /// The side.
        side: Side,
        /// What went wrong.
        reason: String,
    },
    /// The consumer failed while running and could not recover.
    #[error("{side}: consumer failed: {reason}")]
    Failed {
        /// The side.
        side: Side,
        /// What went wrong.
        reason: String,
    },
}

/// Builds the source a side's config describes.
pub fn build(side: &config::SideConfig) -> Result<Box<dyn Source>, SourceError> {
    match side.kind {
        config::SideKind::Kafka => kafka::build(side),
        config::SideKind::Rocketmq => rocketmq::build(side),
    }
}

/// A broker consumer.
pub trait Source: Send {
    /// A reader of single copies by position on this side's broker, for adoption (DESIGN.md
    /// invariant 2): built before [`Source::run`] takes the source, and used beside it.
    fn refetcher(&self) -> Result<Arc<dyn Refetch>, SourceError>;

    /// Consumes until `cx.cancel` fires, then commits what is finished and returns.
    fn run(self: Box<Self>, cx: SourceContext) -> BoxFuture<'static, Result<(), SourceError>>;
}

/// Where one copy sits in its broker: enough to read it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// Kafka topic / RocketMQ topic.
    pub topic: Arc<str>,
    /// Kafka partition / RocketMQ queue id.
    pub partition: i32,
    /// Kafka offset / RocketMQ queue offset.
    pub offset: i64,
    /// The RocketMQ broker holding the queue; `None` for Kafka.
    pub broker: Option<Arc<str>>,
}

impl Position {
    /// The position of a copy as its source described it.
    pub fn of(origin: &crate::message::Origin) -> Position {
        Position {
            topic: origin.topic.clone(),
            partition: origin.partition,
            offset: origin.offset,
            broker: origin.broker.clone(),
        }
    }
}

/// A copy read again from its broker: what the pipeline needs to deliver it.
#[derive(Debug, Clone)]
pub struct Refetched {
    /// The ids as read from the copy's headers / body (the caller checks the message id).
    pub identity: Result<crate::message::Identity, crate::message::BadInput>,
    /// The body.
    pub payload: Vec<u8>,
    /// The broker's timestamp of the copy, ms since the epoch (0 when unknown).
    pub born_ms: i64,
}

/// Reads single copies again by position (adoption): the copy of an id whose owner never
/// observed it was acknowledged long ago, and only its position was kept.
#[async_trait::async_trait]
pub trait Refetch: Send + Sync {
    /// The copy at `at`; `Ok(None)` when the broker no longer has it (retention, compaction).
    /// An unreachable broker is an error: the caller tries again later.
    async fn refetch(&self, at: &Position) -> Result<Option<Refetched>, SourceError> {
        let mut one = self.refetch_many(std::slice::from_ref(at)).await;
        one.pop().unwrap_or(Ok(None))
    }

    /// The copies at `at`, one answer per position in order, as [`Refetch::refetch`] answers:
    /// a broker reads many positions of one partition (queue) faster together than one by one
    /// (a broker outage on the owner's side makes for many adoptions at once).
    async fn refetch_many(&self, at: &[Position]) -> Vec<Result<Option<Refetched>, SourceError>>;
}

/// Tracks, per topic-partition (queue), which delivered offsets are not finished yet, and so
/// which offset may be committed: the lowest unfinished one, or one past the highest finished.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    parts: HashMap<(Arc<str>, i32), Partition>,
}

#[derive(Debug, Default)]
struct Partition {
    open: BTreeSet<i64>,
    /// One past the highest offset handed out.
    next: Option<i64>,
    /// The last offset reported by `committable` and committed.
    committed: Option<i64>,
}

impl OffsetTracker {
    /// A copy at `offset` was handed to the pipeline.
    pub fn delivered(&mut self, topic: &Arc<str>, partition: i32, offset: i64) {
        let p = self.parts.entry((topic.clone(), partition)).or_default();
        p.open.insert(offset);
        p.next = Some(p.next.map_or(offset + 1, |n| n.max(offset + 1)));
    }

    /// The pipeline finished the copy at this position. Positions of partitions no longer
    /// tracked (revoked meanwhile) are ignored.
    pub fn finished(&mut self, f: &Finished) {
        if let Some(p) = self.parts.get_mut(&(f.topic.clone(), f.partition)) {
            p.open.remove(&f.offset);
        }
    }

    /// Offsets to commit now (Kafka's "next offset to read" convention), one per partition whose
    /// committable offset moved since the last call; they are marked committed.
    pub fn take_commits(&mut self) -> Vec<(Arc<str>, i32, i64)> {
        let mut out = Vec::new();
        for ((topic, partition), p) in &mut self.parts {
            let Some(next) = p.next else { continue };
            let at = p.open.first().copied().unwrap_or(next);
            if p.committed != Some(at) {
                p.committed = Some(at);
                out.push((topic.clone(), *partition, at));
            }
        }
        out
    }

    /// Copies handed out and not finished yet.
    pub fn in_flight(&self) -> usize {
        self.parts.values().map(|p| p.open.len()).sum()
    }

    /// Forgets a partition (revoked in a rebalance): its unfinished copies will be delivered to
    /// whichever consumer gets it, from the last commit.
    pub fn forget(&mut self, topic: &Arc<str>, partition: i32) {
        self.parts.remove(&(topic.clone(), partition));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fin(t: &Arc<str>, p: i32, o: i64) -> Finished {
        Finished {
            topic: t.clone(),
            partition: p,
            offset: o,
        }
    }

    #[test]
    fn commit_stops_at_the_lowest_unfinished_offset() {
        let t: Arc<str> = "t".into();
        let mut tr = OffsetTracker::default();
        for o in 10..15 {
            tr.delivered(&t, 0, o);
        }
        tr.finished(&fin(&t, 0, 10));
        tr.finished(&fin(&t, 0, 12));
        tr.finished(&fin(&t, 0, 13));
        // 11 is unfinished: commit 11 (the next offset to read), not 14.
        assert_eq!(tr.take_commits(), vec![(t.clone(), 0, 11)]);
        assert_eq!(tr.take_commits(), vec![], "nothing moved");
        tr.finished(&fin(&t, 0, 11));
        tr.finished(&fin(&t, 0, 14));
        assert_eq!(tr.take_commits(), vec![(t.clone(), 0, 15)]);
        assert_eq!(tr.in_flight(), 0);
    }

    #[test]
    fn nothing_finished_commits_the_first_delivered_offset_only() {
        let t: Arc<str> = "t".into();
        let mut tr = OffsetTracker::default();
        tr.delivered(&t, 3, 100);
        tr.delivered(&t, 3, 101);
        assert_eq!(tr.take_commits(), vec![(t.clone(), 3, 100)]);
    }

    /// The lag series of `queue` as `/metrics` shows it (looking a series up would create it).
    fn lag_of(m: &Metrics, queue: &str) -> Option<i64> {
        let head = format!("mqc_consumer_lag_messages{{queue=\"{queue}\",side=\"kafka\"}} ");
        m.render()
            .lines()
            .find_map(|l| l.strip_prefix(&head).map(|v| v.parse().unwrap()))
    }

    #[test]
    fn an_empty_first_assignment_joins_and_counts_one_rebalance() {
        let m = Metrics::default();
        let ms = Membership::new("kafka".into(), &m, LAG_INTERVAL);
        let joined = ms.joined();
        assert!(!ms.has_joined() && !*joined.borrow());
        assert_eq!(ms.rebalanced(&[]), 0);
        assert!(ms.has_joined() && *joined.borrow());
        assert_eq!(m.rebalances.with_label_values(&["kafka"]).get(), 1);
        assert_eq!(m.assigned.with_label_values(&["kafka"]).get(), 0);
    }

    #[test]
    fn a_revoked_queue_loses_its_lag_series_and_late_measurements_are_ignored() {
        let m = Metrics::default();
        let ms = Membership::new("kafka".into(), &m, LAG_INTERVAL);
        ms.rebalanced(&["t/0".into(), "t/1".into()]);
        assert_eq!(m.assigned.with_label_values(&["kafka"]).get(), 2);
        assert_eq!(lag_of(&m, "t/0"), None, "no series before a measurement");
        assert!(ms.record_lag("t/0", 7));
        assert!(ms.record_lag("t/1", -3));
        assert_eq!(lag_of(&m, "t/0"), Some(7));
        assert_eq!(lag_of(&m, "t/1"), Some(0), "never negative");
        assert_eq!(ms.revoked(&["t/0".into()]), 1);
        assert_eq!(lag_of(&m, "t/0"), None);
        assert!(!ms.record_lag("t/0", 9), "not held any more");
        assert_eq!(lag_of(&m, "t/0"), None);
        ms.left();
        assert_eq!(lag_of(&m, "t/1"), None);
        assert_eq!(m.assigned.with_label_values(&["kafka"]).get(), 0);
    }

    #[test]
    fn a_whole_assignment_counts_only_changes() {
        let m = Metrics::default();
        let ms = Membership::new("kafka".into(), &m, LAG_INTERVAL);
        let set = |q: &[&str]| q.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(ms.reassigned(&set(&[])), Some((vec![], vec![])), "the join");
        assert_eq!(ms.reassigned(&set(&[])), None);
        assert_eq!(
            ms.reassigned(&set(&["b/t/0", "b/t/1"])),
            Some((vec!["b/t/0".into(), "b/t/1".into()], vec![]))
        );
        assert_eq!(ms.reassigned(&set(&["b/t/1", "b/t/0"])), None);
        assert_eq!(
            ms.reassigned(&set(&["b/t/1"])),
            Some((vec![], vec!["b/t/0".into()]))
        );
        assert_eq!(m.rebalances.with_label_values(&["kafka"]).get(), 3);
        assert_eq!(m.assigned.with_label_values(&["kafka"]).get(), 1);
    }

    fn stuck(queue: &str) -> (String, Reading) {
        let r = Reading {
            lag: 9,
            waiting: 9,
            position: None,
        };
        (queue.to_string(), r)
    }

    fn moving(queue: &str, position: i64) -> (String, Reading) {
        let r = Reading {
            lag: 9,
            waiting: 9,
            position: Some(position),
        };
        (queue.to_string(), r)
    }

    #[tokio::test(start_paused = true)]
    async fn a_partition_without_progress_stalls_once_and_a_pause_or_a_revocation_clears_it() {
        let m = Metrics::default();
        let (pause, paused) = watch::channel(false);
        let ms = Membership::new("kafka".into(), &m, LAG_INTERVAL)
            .watch_stalls(Duration::from_secs(20), paused);
        ms.rebalanced(&["t/0".into(), "t/1".into()]);
        let (gauge, counter) = (
            m.stalled.with_label_values(&["kafka"]),
            m.stalls.with_label_values(&["kafka"]),
        );
        for i in 0..=4 {
            if i > 0 {
                tokio::time::advance(LAG_INTERVAL).await;
            }
            assert!(ms.stalled().is_empty(), "not before 20 s (reading {i})");
            ms.measured(&[stuck("t/0"), moving("t/1", i), stuck("t/9")]);
        }
        assert_eq!(
            ms.stalled(),
            vec!["t/0".to_string()],
            "t/1 moves, t/9 is not held"
        );
        assert_eq!((gauge.get(), counter.get()), (1, 1));
        assert_eq!(lag_of(&m, "t/0"), Some(9), "the readings set the lag too");
        assert_eq!(lag_of(&m, "t/9"), None);
        tokio::time::advance(LAG_INTERVAL).await;
        ms.measured(&[stuck("t/0"), moving("t/1", 9)]);
        assert_eq!(counter.get(), 1, "one stall, not one per measurement");

        // A pause on purpose hides it at once, ends it at the next measurement, and restarts
        // the clock.
        pause.send_replace(true);
        assert!(ms.stalled().is_empty());
        ms.measured(&[stuck("t/0")]);
        assert_eq!(gauge.get(), 0);
        pause.send_replace(false);
        // The first measurement after the resume still sees the pause: the clock starts there.
        for _ in 0..4 {
            tokio::time::advance(LAG_INTERVAL).await;
            ms.measured(&[stuck("t/0")]);
            assert!(ms.stalled().is_empty());
        }
        tokio::time::advance(LAG_INTERVAL).await;
        ms.measured(&[stuck("t/0")]);
        assert_eq!(
            (gauge.get(), counter.get()),
            (1, 2),
            "stalled again 20 s after the first measurement since the resume"
        );

        // A pause and resume between two measurements restarts the clock as well.
        pause.send_replace(true);
        pause.send_replace(false);
        tokio::time::advance(LAG_INTERVAL).await;
        ms.measured(&[stuck("t/0")]);
        assert_eq!(gauge.get(), 0);

        tokio::time::advance(Duration::from_secs(20)).await;
        ms.measured(&[stuck("t/0")]);
        assert_eq!(gauge.get(), 1);
        ms.revoked(&["t/0".into()]);
        assert!(ms.stalled().is_empty());
        assert_eq!(
            gauge.get(),
            0,
            "a revoked partition is not stalled here any more"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_partition_reported_by_lag_alone_is_never_stalled() {
        let m = Metrics::default();
        let ms = Membership::new("rocketmq".into(), &m, LAG_INTERVAL);
        ms.rebalanced(&["b/t/0".into()]);
        for _ in 0..30 {
            ms.record_lag("b/t/0", 100);
            tokio::time::advance(LAG_INTERVAL).await;
        }
        assert!(ms.stalled().is_empty());
        assert_eq!(ms.stall_after(), DEFAULT_STALL_AFTER);
    }

    #[test]
    fn partitions_are_independent_and_a_forgotten_one_ignores_late_acks() {
        let t: Arc<str> = "t".into();
        let mut tr = OffsetTracker::default();
        tr.delivered(&t, 0, 5);
        tr.delivered(&t, 1, 7);
        tr.finished(&fin(&t, 1, 7));
        tr.forget(&t, 0);
        tr.finished(&fin(&t, 0, 5));
        assert_eq!(tr.take_commits(), vec![(t.clone(), 1, 8)]);
        assert_eq!(tr.in_flight(), 0);
    }
}
