//! Sends first sights to the parity records, holding each for a moment first.
//!
//! Both sides of one instance report here. When the two sights of one id (one side's first, the
//! other side's pair) both arrive while held, the pair is complete and nothing about it has to be
//! listed: neither goes to Redis, only the counts do. That is the usual case for live traffic,
//! whose two copies reach the daemon milliseconds apart; it saves the `ZADD` that would list the
//! id as one-sided and the `ZREM` that would take it off again. A sight whose partner does not
//! come within the hold (the other copy is late, or consumed by another instance) goes to Redis
//! as before, where the record script pairs it. Every flush is one script call per side (per
//! [`super::SEND_CHUNK`] sights), not one per claim batch.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{now_ms, Counts, Parity, Sight};

/// How long the pipeline holds a sight for its partner: the two copies of live traffic arrive
/// well within it, most of a drained backlog's too, and it is far below any sensible
/// `parity.grace`.
pub const HOLD: Duration = Duration::from_secs(5);
/// How often held sights are looked at.
const TICK: Duration = Duration::from_millis(250);
/// Most sights held at once (about 150 bytes each with a 30-byte id); past it the oldest go out
/// early.
const MAX_HELD: usize = 100_000;

/// Holds the sights of both sides and flushes them from a task of its own.
pub struct Recorder {
    parity: Arc<Parity>,
    held: Arc<Mutex<Held>>,
    wake: Arc<Notify>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Recorder {
    /// Starts the flushing task. Once `stop` fires it sends everything held and ends; await
    /// [`Recorder::finish`] to know that it has.
    pub fn start(parity: Arc<Parity>, hold: Duration, stop: CancellationToken) -> Recorder {
        let held = Arc::new(Mutex::new(Held::new(hold, MAX_HELD)));
        let wake = Arc::new(Notify::new());
        let task = tokio::spawn(flush(parity.clone(), held.clone(), wake.clone(), stop));
        Recorder {
            parity,
            held,
            wake,
            task: Mutex::new(Some(task)),
        }
    }

    /// The parity records.
    pub fn parity(&self) -> &Arc<Parity> {
        &self.parity
    }

    /// Takes what one claim batch of `side` saw first.
    pub fn note(&self, side: &str, sights: &[Sight<'_>]) {
        let side = self.parity.index(side);
        let full = {
            let mut held = self.held.lock().expect("parity hold poisoned");
            held.note(side, sights, now_ms(), Instant::now());
            held.is_full()
        };
        if full {
            self.wake.notify_one();
        }
    }

    /// Waits until the task has sent what it held (after `stop`), up to `limit`.
    pub async fn finish(&self, limit: Duration) {
        let task = self.task.lock().expect("parity task poisoned").take();
        if let Some(task) = task {
            if tokio::time::timeout(limit, task).await.is_err() {
                tracing::warn!("parity: the last first sights were not recorded within {limit:?}");
            }
        }
    }
}

async fn flush(
    parity: Arc<Parity>,
    held: Arc<Mutex<Held>>,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let last = tokio::select! {
            _ = tick.tick() => false,
            _ = wake.notified() => false,
            _ = stop.cancelled() => true,
        };
        let due = held
            .lock()
            .expect("parity hold poisoned")
            .take(Instant::now(), last);
        for (i, (counts, marks, held)) in due.into_iter().enumerate() {
            let side = &parity.sides()[i];
            let view: Vec<(&str, bool)> = marks.iter().map(|(id, p)| (&**id, *p)).collect();
            if let Err(e) = parity.send(side, &counts, &view, held).await {
                tracing::warn!(side = %side, ids = view.len(), error = %e,
                    "parity: could not record first sights; the parity report may show these ids as one-sided");
            }
        }
        if last {
            return;
        }
    }
}

/// One held sight.
#[derive(Debug)]
struct Entry {
    side: usize,
    pair: bool,
    seq: u64,
}

/// Sights waiting for their partner, and counts not yet sent.
#[derive(Debug)]
struct Held {
    hold: Duration,
    max: usize,
    ids: HashMap<Arc<str>, Entry>,
    /// Arrival order; entries whose id was paired meanwhile are skipped when they come up.
    queue: VecDeque<(Instant, u64, Arc<str>)>,
    counts: [Counts; 2],
    next: u64,
}

/// What one side has to send: counts, held sights (`pair` true: this side completed the pair),
/// and how long the most recent of those sights was held.
type Due = (Counts, Vec<(Arc<str>, bool)>, Duration);

impl Held {
    fn new(hold: Duration, max: usize) -> Held {
        Held {
            hold,
            max,
            ids: HashMap::new(),
            queue: VecDeque::new(),
            counts: Default::default(),
            next: 0,
        }
    }

    fn note(&mut self, side: usize, sights: &[Sight<'_>], now_ms: u64, now: Instant) {
        for s in sights {
            self.counts[side].add(s.born_ms, now_ms);
            match self.ids.get(s.id) {
                // Both sides have seen the id: there is nothing to list.
                Some(e) if e.side != side => {
                    self.ids.remove(s.id);
                }
                // A side's first sight comes once; should it come again, the first one stands.
                Some(_) => {}
                None => {
                    self.next += 1;
                    let id: Arc<str> = s.id.into();
                    let e = Entry {
                        side,
                        pair: s.pair,
                        seq: self.next,
                    };
                    self.ids.insert(id.clone(), e);
                    self.queue.push_back((now, self.next, id));
                }
            }
        }
    }

    fn is_full(&self) -> bool {
        self.ids.len() > self.max
    }

    /// Per side: the counts so far, and the sights held for `hold` already (every one when
    /// `all`, and the oldest beyond `max`).
    fn take(&mut self, now: Instant, all: bool) -> [Due; 2] {
        let mut due: [Due; 2] = Default::default();
        for (d, c) in due.iter_mut().zip(&mut self.counts) {
            d.0 = std::mem::take(c);
        }
        while let Some((at, _, _)) = self.queue.front() {
            if !all && now.duration_since(*at) < self.hold && !self.is_full() {
                break;
            }
            let (at, seq, id) = self.queue.pop_front().expect("a front");
            if self.ids.get(&id).is_some_and(|e| e.seq == seq) {
                let e = self.ids.remove(&id).expect("present");
                let d = &mut due[e.side];
                // Oldest first: the last one taken was held the shortest.
                d.2 = now.saturating_duration_since(at);
                d.1.push((id, e.pair));
            }
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sight(id: &str, pair: bool) -> Sight<'_> {
        Sight {
            id,
            born_ms: 0,
            pair,
        }
    }

    fn ids(d: &Due) -> Vec<(&str, bool)> {
        d.1.iter().map(|(id, p)| (&**id, *p)).collect()
    }

    fn total(c: &Counts) -> u64 {
        c.minutes.iter().map(|(_, n)| n).sum()
    }

    #[test]
    fn a_pair_seen_within_the_hold_is_counted_but_never_listed() {
        let t0 = Instant::now();
        let mut h = Held::new(Duration::from_secs(2), 100);
        h.note(0, &[sight("a", false), sight("b", false)], 1_000, t0);
        // The other side's pair for `a`; and for `c` the pair comes before the first sight.
        h.note(1, &[sight("a", true), sight("c", true)], 1_000, t0);
        h.note(0, &[sight("c", false)], 1_000, t0);
        let due = h.take(t0 + Duration::from_secs(3), false);
        assert_eq!(ids(&due[0]), [("b", false)]);
        assert!(ids(&due[1]).is_empty());
        assert_eq!((total(&due[0].0), total(&due[1].0)), (3, 2));
        assert!(h.ids.is_empty() && h.queue.is_empty());
    }

    #[test]
    fn sights_wait_for_the_hold_unless_flushed_for_good_or_too_many() {
        let t0 = Instant::now();
        let mut h = Held::new(Duration::from_secs(2), 2);
        h.note(0, &[sight("a", false)], 1_000, t0);
        h.note(1, &[sight("b", true)], 1_000, t0 + Duration::from_secs(1));
        let due = h.take(t0 + Duration::from_millis(2_500), false);
        assert_eq!(ids(&due[0]), [("a", false)], "held 2.5 s");
        assert_eq!(due[0].2, Duration::from_millis(2_500));
        assert!(ids(&due[1]).is_empty(), "held 1.5 s");
        assert_eq!(total(&due[0].0) + total(&due[1].0), 2, "counts go at once");

        // Past `max` the oldest go early; `all` empties the hold.
        h.note(0, &[sight("c", false), sight("d", false)], 1_000, t0);
        assert!(h.is_full());
        let due = h.take(t0 + Duration::from_secs(1), false);
        assert_eq!(ids(&due[1]), [("b", true)]);
        assert!(ids(&due[0]).is_empty());
        let due = h.take(t0 + Duration::from_secs(1), true);
        assert_eq!(ids(&due[0]), [("c", false), ("d", false)]);
        assert!(h.ids.is_empty() && h.queue.is_empty());
    }

    #[test]
    fn the_same_side_twice_keeps_the_first_sight() {
        let t0 = Instant::now();
        let mut h = Held::new(Duration::from_secs(2), 100);
        h.note(0, &[sight("a", false)], 1_000, t0);
        h.note(0, &[sight("a", true)], 1_000, t0);
        let due = h.take(t0, true);
        assert_eq!(ids(&due[0]), [("a", false)]);
    }
}
