//! The stall detector: finds the partitions (queues) a side has stopped reading although
//! messages wait in them, without the daemon having paused it on purpose.
//!
//! A source reports, on its lag timer, a [`Reading`] per held partition: where its reading for
//! the pipeline stands, and how many messages wait in the broker past it. A partition is stalled
//! once messages have waited in it for [`StallDetector::after`] with that position unchanged,
//! counted from the last reading that saw progress, nothing waiting, or the side paused on
//! purpose (those pauses have readiness reasons of their own, and a resume starts the clock
//! again). Pure: the caller passes the time, so tests need no clock.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// How often the daemon's sources measure their lag: a few small broker requests per interval,
/// never anything per message.
pub const LAG_INTERVAL: Duration = Duration::from_secs(5);

/// One partition's (queue's) state, measured by its source on the lag timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    /// Messages between the group's committed offset and the end of the log (the lag metric).
    pub lag: i64,
    /// Messages in the log past [`Reading::position`] (past the committed offset, if that is
    /// later or there is no position): what the side has not read yet.
    pub waiting: i64,
    /// Where the source's reading stands: one past the last copy it took from the broker for
    /// the pipeline since it got the partition (copies go to the pipeline in that order);
    /// `None` while it has taken none. Any value that moves with every copy taken works: the
    /// detector only compares it with the previous reading.
    pub position: Option<i64>,
}

/// What changed in one observation.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// Partitions stalled from now on.
    pub began: Vec<String>,
    /// Partitions no longer stalled (moving again, nothing waiting, or the side paused).
    pub ended: Vec<String>,
}

#[derive(Debug)]
struct Watch {
    position: Option<i64>,
    /// The last reading that saw progress, nothing waiting, or the side paused.
    since: Instant,
}

/// The per-partition clocks of one side; see the module documentation.
#[derive(Debug)]
pub struct StallDetector {
    after: Duration,
    watched: BTreeMap<String, Watch>,
    stalled: BTreeSet<String>,
}

impl StallDetector {
    /// A detector that flags a partition after `after` without progress.
    pub fn new(after: Duration) -> StallDetector {
        StallDetector {
            after,
            watched: BTreeMap::new(),
            stalled: BTreeSet::new(),
        }
    }

    /// How long a partition may wait without progress.
    pub fn after(&self) -> Duration {
        self.after
    }

    /// Changes the threshold; the clocks keep running.
    pub fn set_after(&mut self, after: Duration) {
        self.after = after;
    }

    /// The partitions stalled as of the last observation.
    pub fn stalled(&self) -> &BTreeSet<String> {
        &self.stalled
    }

    /// Takes the readings of one measurement at `now`. `paused` is true if the side was paused
    /// on purpose at any time since the previous observation: every clock starts again. A
    /// partition without a reading this time keeps its clock and its state.
    pub fn observe<'a>(
        &mut self,
        now: Instant,
        paused: bool,
        readings: impl IntoIterator<Item = (&'a str, Reading)>,
    ) -> Change {
        if paused {
            for w in self.watched.values_mut() {
                w.since = now;
            }
        }
        let mut change = Change::default();
        for (queue, r) in readings {
            let w = match self.watched.get_mut(queue) {
                Some(w) => w,
                None => self.watched.entry(queue.to_owned()).or_insert(Watch {
                    position: r.position,
                    since: now,
                }),
            };
            if paused || r.waiting <= 0 || w.position != r.position {
                w.position = r.position;
                w.since = now;
            }
            let stalled = now.saturating_duration_since(w.since) >= self.after;
            if stalled && !self.stalled.contains(queue) {
                self.stalled.insert(queue.to_owned());
                change.began.push(queue.to_owned());
            } else if !stalled && self.stalled.remove(queue) {
                change.ended.push(queue.to_owned());
            }
        }
        if paused {
            change.ended.extend(std::mem::take(&mut self.stalled));
        }
        change
    }

    /// The partition was taken away: forgets it. Returns whether it was stalled.
    pub fn forget(&mut self, queue: &str) -> bool {
        self.watched.remove(queue);
        self.stalled.remove(queue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_secs(60);
    const TICK: Duration = Duration::from_secs(5);

    fn reading(waiting: i64, position: Option<i64>) -> Reading {
        Reading {
            lag: waiting,
            waiting,
            position,
        }
    }

    /// Feeds `queue` the same reading every 5 s for `span`, from `*now`; returns every change.
    fn hold(
        d: &mut StallDetector,
        now: &mut Instant,
        span: Duration,
        queue: &str,
        r: Reading,
    ) -> Vec<Change> {
        let end = *now + span;
        let mut changes = Vec::new();
        while *now < end {
            *now += TICK;
            let c = d.observe(*now, false, [(queue, r)]);
            if c != Change::default() {
                changes.push(c);
            }
        }
        changes
    }

    #[test]
    fn waiting_messages_without_progress_stall_once_after_the_threshold() {
        let mut d = StallDetector::new(AFTER);
        let mut now = Instant::now();
        assert_eq!(
            d.observe(now, false, [("t/0", reading(8_195, None))]),
            Change::default()
        );
        let changes = hold(&mut d, &mut now, AFTER - TICK, "t/0", reading(8_195, None));
        assert!(changes.is_empty(), "not before the threshold: {changes:?}");
        let changes = hold(&mut d, &mut now, TICK * 6, "t/0", reading(9_000, None));
        assert_eq!(
            changes,
            vec![Change {
                began: vec!["t/0".into()],
                ended: vec![]
            }],
            "one change when it begins, none per check after"
        );
        assert!(d.stalled().contains("t/0"));
    }

    #[test]
    fn progress_restarts_the_clock_and_ends_a_stall() {
        let mut d = StallDetector::new(AFTER);
        let mut now = Instant::now();
        d.observe(now, false, [("t/0", reading(10, Some(100)))]);
        hold(&mut d, &mut now, AFTER, "t/0", reading(10, Some(100)));
        assert!(d.stalled().contains("t/0"));
        now += TICK;
        let c = d.observe(now, false, [("t/0", reading(10, Some(101)))]);
        assert_eq!(c.ended, vec!["t/0".to_string()]);
        assert!(d.stalled().is_empty());
        // Moving every reading: never stalled, however long messages wait.
        for i in 0..100 {
            now += TICK;
            let c = d.observe(now, false, [("t/0", reading(10, Some(200 + i)))]);
            assert_eq!(c, Change::default());
        }
    }

    #[test]
    fn nothing_waiting_is_never_a_stall() {
        let mut d = StallDetector::new(AFTER);
        let mut now = Instant::now();
        // Copies handed over long ago and still unacknowledged: lag, but nothing left to read.
        let idle = Reading {
            lag: 500,
            waiting: 0,
            position: Some(42),
        };
        d.observe(now, false, [("t/0", idle)]);
        assert!(hold(&mut d, &mut now, AFTER * 10, "t/0", idle).is_empty());
        // Messages arrive: the clock starts with them, not with the last hand-over.
        let changes = hold(&mut d, &mut now, AFTER - TICK, "t/0", reading(3, Some(42)));
        assert!(changes.is_empty(), "{changes:?}");
        now += TICK;
        let c = d.observe(now, false, [("t/0", reading(3, Some(42)))]);
        assert_eq!(c.began, vec!["t/0".to_string()]);
    }

    #[test]
    fn a_pause_on_purpose_ends_a_stall_and_restarts_every_clock() {
        let mut d = StallDetector::new(AFTER);
        let mut now = Instant::now();
        let stuck = reading(7, None);
        d.observe(now, false, [("t/0", stuck), ("t/1", stuck)]);
        hold(&mut d, &mut now, AFTER, "t/0", stuck);
        assert_eq!(d.stalled().len(), 1, "t/1 had no reading since");
        now += TICK;
        // Paused since the last reading (t/1 not even read this time).
        let c = d.observe(now, true, [("t/0", stuck)]);
        assert_eq!(c.ended, vec!["t/0".to_string()]);
        assert!(d.stalled().is_empty());
        // Resumed: a full threshold again before either is flagged.
        let changes = hold(&mut d, &mut now, AFTER - TICK, "t/0", stuck);
        assert!(changes.is_empty(), "{changes:?}");
        now += TICK;
        let c = d.observe(now, false, [("t/0", stuck), ("t/1", stuck)]);
        assert_eq!(c.began, vec!["t/0".to_string(), "t/1".to_string()]);
    }

    #[test]
    fn a_forgotten_partition_starts_over_when_it_comes_back() {
        let mut d = StallDetector::new(AFTER);
        let mut now = Instant::now();
        d.observe(now, false, [("t/0", reading(5, None))]);
        hold(&mut d, &mut now, AFTER, "t/0", reading(5, None));
        assert!(d.forget("t/0"), "it was stalled");
        assert!(!d.forget("t/0"));
        now += TICK;
        assert_eq!(
            d.observe(now, false, [("t/0", reading(5, None))]),
            Change::default()
        );
        assert!(d.stalled().is_empty());
    }
}
