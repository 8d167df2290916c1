//! Sources: one per side, each a broker consumer that turns the broker's records into
//! [`Message`]s for the pipeline and commits offsets only for copies the pipeline has finished.
//!
//! Both brokers share one rule, kept by [`OffsetTracker`]: a partition's (queue's) committed
//! offset never passes a copy whose fate is not recorded yet, so a crash or a rebalance can only
//! cause a copy to be seen again (which the arbiter answers DONE / NOT_MINE), never skipped.
//!
//! Each source also reports its place in its consumer group through a [`Membership`]: whether
//! it has joined (for `/readyz`), the partitions (queues) it holds and how often that changed,
//! and each held one's lag, measured on a timer apart from the consume loop.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use prometheus::{IntCounter, IntGauge, IntGaugeVec};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::message::{Finished, Message, Side};
use crate::telemetry::metrics::Metrics;

pub mod kafka;

pub mod rocketmq;

/// What a source needs from the daemon.
pub struct SourceContext {
    /// This source's side.
    pub side: Side,
    /// Where copies go; bounded, so a slow pipeline slows the source down.
    pub out: mpsc::Sender<Message>,
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

/// How often the daemon's sources measure their lag: a few small broker requests per interval,
/// never anything per message.
pub const LAG_INTERVAL: Duration = Duration::from_secs(5);

/// A source's place in its consumer group, as `/metrics` and `/readyz` see it: whether it has
/// joined, the partitions (Kafka) or queues (RocketMQ) it holds, how often that changed, and the
/// lag of each one held. Clones share one state; the lock inside is held for a few map
/// operations, never across an `.await`.
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
    /// Held queues by their `queue` label, with their lag gauge once measured: a series appears
    /// only with a measured value, never as a placeholder 0.
    held: Mutex<BTreeMap<String, Option<IntGauge>>>,
}

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
                side,
                lag_interval,
                joined,
                held: Mutex::new(BTreeMap::new()),
            }),
        }
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
        self.lock().keys().cloned().collect()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Option<IntGauge>>> {
        // Every update is one call that leaves the map consistent, even if a holder panicked.
        self.inner
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A rebalance round ended: the source now also holds `gained` (an incremental round may
    /// add nothing). Counts the rebalance and marks the source as joined, even with nothing
    /// held: a group with more members than queues legitimately leaves some with none.
    /// Returns how many queues are held now.
    pub fn rebalanced(&self, gained: &[String]) -> usize {
        let held = {
            let mut held = self.lock();
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
        let held = {
            let mut held = self.lock();
            for queue in lost {
                if let Some(Some(_)) = held.remove(queue) {
                    let _ = self
                        .inner
                        .lag
                        .remove_label_values(&[&*self.inner.side, queue]);
                }
            }
            held.len()
        };
        self.inner.assigned.set(held as i64);
        held
    }

    /// For clients that report the whole assignment (RocketMQ): the source now holds exactly
    /// `now`. Returns what was gained and lost, or `None` if nothing changed and the source had
    /// joined already; a change (and the first assignment) counts as a rebalance.
    pub fn reassigned(&self, now: &BTreeSet<String>) -> Option<(Vec<String>, Vec<String>)> {
        let (gained, lost) = {
            let held = self.lock();
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
        let mut held = self.lock();
        let Some(gauge) = held.get_mut(queue) else {
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
pub fn build(side: &crate::config::SideConfig) -> Result<Box<dyn Source>, SourceError> {
    match side.kind {
        crate::config::SideKind::Kafka => kafka::build(side),
        crate::config::SideKind::Rocketmq => rocketmq::build(side),
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
#[derive(Debug)]
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
    async fn refetch(&self, at: &Position) -> Result<Option<Refetched>, SourceError>;
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
