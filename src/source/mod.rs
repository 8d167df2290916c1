//! Sources: one per side, each a broker consumer that turns the broker's records into
//! [`Message`]s for the pipeline and commits offsets only for copies the pipeline has finished.
//!
//! Both brokers share one rule, kept by [`OffsetTracker`]: a partition's (queue's) committed
//! offset never passes a copy whose fate is not recorded yet, so a crash or a rebalance can only
//! cause a copy to be seen again (which the arbiter answers DONE / NOT_MINE), never skipped.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::message::{Finished, Message, Side};

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
    /// Consumes until `cx.cancel` fires, then commits what is finished and returns.
    fn run(self: Box<Self>, cx: SourceContext) -> BoxFuture<'static, Result<(), SourceError>>;
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
