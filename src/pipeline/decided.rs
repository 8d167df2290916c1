//! What this instance saw Redis decide: the owner of each id whose record one of its own claims
//! created less than [`VALID_FOR`] ago, which sides' copies it saw, and whether the id is done.
//!
//! An owner, once stored, never changes (DESIGN.md: decided once, by the first observer; no
//! script rewrites `o`), and done is final. So when the other side's copy of such an id reaches
//! the same instance, the claim would answer NOT_MINE (or DONE) and the pipeline can acknowledge
//! it without asking: one claim per id instead of two when both copies come through one instance,
//! as they do on a single instance or wherever both brokers' partitions of an id land together.
//!
//! It answers only what Redis would answer, in the same window in which that claim would change
//! nothing but the side's parity mark:
//!
//! - only ids whose record was *created* by a claim of this instance (the reply says so: a first
//!   sight that proceeds or is not this side's, [`created`]). Their `f` is that claim's time, so
//!   for [`VALID_FOR`] after the claim was sent a claim would leave the record's TTL as it is
//!   ([`crate::arbiter::EXPIRY_SLACK`], 60 s, is longer);
//! - never the owner's own copies (pending, in flight, retried: Redis decides), except once the
//!   id is known done;
//! - all of it forgotten whenever a Redis call fails (a restart or failover may have lost records
//!   that this memory would otherwise keep answering for).
//!
//! The parity mark the claim would have written for the other side is written by the caller
//! (`HSET` beside the claims, [`crate::arbiter::Arbiter::mark_seen`]), so parity's first-sight
//! test stays exact. At most `pipeline.remember_ids` ids are kept; beyond that the oldest go
//! first (their copies are then claimed in Redis as usual).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::arbiter::{Arbiter, Claim, Sighting, EXPIRY_SLACK};
use crate::message::Side;

/// How long after the claim that created a record this memory answers for it: less than
/// [`EXPIRY_SLACK`], within which a later claim leaves the record's TTL as it is.
pub const VALID_FOR: Duration = Duration::from_secs(EXPIRY_SLACK.as_secs() - 10);

/// What a remembered id tells a copy, without a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    /// The other side owns the id: acknowledge the copy.
    NotMine,
    /// The id is done: acknowledge the duplicate.
    Done,
}

/// True when a claim's reply says that this claim created the id's record: a first sight (no
/// side's mark was there) that proceeds or is not this side's. The only other records without
/// marks are those a late completion wrote, and those are done (the claim answers DONE).
pub fn created(claim: &Claim, sighting: Sighting) -> bool {
    sighting == Sighting::First && matches!(claim, Claim::Proceed { .. } | Claim::NotMine { .. })
}

/// The memory; see the module docs.
pub struct Decided {
    sides: [Arc<str>; 2],
    cap: usize,
    valid_for: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Bumped by every [`Decided::forget`]: replies to claims sent before it teach nothing.
    generation: u64,
    ids: HashMap<Arc<str>, Entry>,
    /// Ids in the order they were remembered, with the moment each stops being valid; an id
    /// remembered again has a later item, and the earlier one no longer matches its entry.
    order: VecDeque<(Instant, Arc<str>)>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    owner: u8,
    /// Bit `1 << side`: the sides whose copies this instance saw (their marks are in Redis or on
    /// their way).
    seen: u8,
    done: bool,
    until: Instant,
}

impl Decided {
    /// A memory for a deployment of `sides` holding at most `cap` ids.
    pub fn new(sides: [&str; 2], cap: usize) -> Self {
        Self::with_validity(sides, cap, VALID_FOR)
    }

    /// [`Decided::new`] with another validity (tests).
    pub fn with_validity(sides: [&str; 2], cap: usize, valid_for: Duration) -> Self {
        Self {
            sides: sides.map(Arc::from),
            cap,
            valid_for: valid_for.min(VALID_FOR),
            inner: Mutex::default(),
        }
    }

    fn index(&self, side: &str) -> Option<u8> {
        self.sides
            .iter()
            .position(|s| &**s == side)
            .map(|i| i as u8)
    }

    /// Answers each of `side`'s copies of `ids` that the memory can answer, in order: `None` for a
    /// copy that must be claimed in Redis. A copy answered is noted as seen, and its sighting is
    /// what the claim would have said ([`Sighting::Pair`]: the caller writes the side's mark).
    pub fn recall<'a>(
        &self,
        side: &str,
        ids: impl Iterator<Item = &'a str>,
    ) -> Vec<Option<(Known, Sighting)>> {
        let Some(me) = self.index(side) else {
            return ids.map(|_| None).collect();
        };
        let now = Instant::now();
        let mut inner = self.inner.lock().expect("decided poisoned");
        ids.map(|id| {
            let e = inner.ids.get_mut(id).filter(|e| e.until > now)?;
            let known = if e.done {
                Known::Done
            } else if e.owner != me {
                Known::NotMine
            } else {
                return None;
            };
            let bit = 1 << me;
            let sighting = if e.seen & bit != 0 {
                Sighting::Again
            } else {
                e.seen |= bit;
                Sighting::Pair
            };
            Some((known, sighting))
        })
        .collect()
    }

    /// What to pass to [`Decided::learn`] for a claim about to be sent.
    pub fn generation(&self) -> u64 {
        self.inner.lock().expect("decided poisoned").generation
    }

    /// Learns from `side`'s claim replies, sent at `sent` when [`Decided::generation`] was
    /// `generation`: remembers the ids whose record a claim created, and for ids already
    /// remembered, that this side has seen them and whether they are done. Nothing is learnt if
    /// the memory was forgotten since (Redis failed meanwhile: those records may be lost).
    pub fn learn<'a>(
        &self,
        side: &str,
        sent: Instant,
        generation: u64,
        replies: impl Iterator<Item = (&'a str, &'a Claim, Sighting)>,
    ) {
        let Some(me) = self.index(side) else { return };
        let until = sent + self.valid_for;
        let now = Instant::now();
        let mut inner = self.inner.lock().expect("decided poisoned");
        if inner.generation != generation {
            return;
        }
        for (id, claim, sighting) in replies {
            if created(claim, sighting) {
                let owner = match claim {
                    Claim::NotMine { owner } => match self.index(owner) {
                        Some(o) => o,
                        None => continue,
                    },
                    _ => me,
                };
                inner.remember(
                    id,
                    Entry {
                        owner,
                        seen: 1 << me,
                        done: false,
                        until,
                    },
                    self.cap,
                    now,
                );
            } else if let Some(e) = inner.ids.get_mut(id) {
                e.seen |= 1 << me;
                e.done |= matches!(claim, Claim::Done);
            }
        }
    }

    /// Notes that `id` is done (its completion was recorded).
    pub fn done(&self, id: &str) {
        if let Some(e) = self.inner.lock().expect("decided poisoned").ids.get_mut(id) {
            e.done = true;
        }
    }

    /// Forgets everything: Redis failed a call, and may have lost records.
    pub fn forget(&self) {
        let mut inner = self.inner.lock().expect("decided poisoned");
        inner.generation += 1;
        inner.ids = HashMap::new();
        inner.order = VecDeque::new();
    }

    /// Ids held (some may have stopped being valid and not been dropped yet).
    pub fn len(&self) -> usize {
        self.inner.lock().expect("decided poisoned").ids.len()
    }

    /// True when no id is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    fn remember(&mut self, id: &str, entry: Entry, cap: usize, now: Instant) {
        while let Some((until, oldest)) = self.order.front() {
            if *until > now && self.ids.len() < cap {
                break;
            }
            let (until, oldest) = (*until, oldest.clone());
            self.order.pop_front();
            if self.ids.get(&oldest).is_some_and(|e| e.until == until) {
                self.ids.remove(&oldest);
            }
        }
        if cap == 0 {
            return;
        }
        let id: Arc<str> = Arc::from(id);
        self.order.push_back((entry.until, id.clone()));
        self.ids.insert(id, entry);
    }
}

/// Writes the parity marks of copies answered from memory ([`Arbiter::mark_seen`]), in batches
/// beside the claims, as parity's sights are: an observation, not part of the protocol, so the
/// copy is acknowledged without waiting for it. A batch Redis refuses is tried three times, then
/// dropped with a warning (such an id's copy, seen again later, counts once more in parity).
pub struct Marks {
    tx: mpsc::UnboundedSender<(Side, Arc<str>)>,
}

impl Marks {
    /// Starts the writer; it runs until every handle is dropped. A failed write makes `decided`
    /// forget what it holds, as every other failed Redis call does.
    pub fn start(arbiter: Arbiter, decided: Arc<Decided>, batch: usize) -> Marks {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Side, Arc<str>)>();
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(batch);
            while rx.recv_many(&mut buf, batch).await > 0 {
                let sides: Vec<Side> = decided.sides.to_vec();
                for side in sides {
                    let ids: Vec<&str> = buf
                        .iter()
                        .filter(|(s, _)| *s == side)
                        .map(|(_, id)| &**id)
                        .collect();
                    if ids.is_empty() {
                        continue;
                    }
                    let mut wait = Duration::from_millis(100);
                    for attempt in 1..=3 {
                        match arbiter.mark_seen(&side, &ids).await {
                            Ok(()) => break,
                            Err(e) => {
                                decided.forget();
                                if attempt == 3 {
                                    tracing::warn!(side = %side, ids = ids.len(), error = %e,
                                        "parity marks of copies answered from memory not written; \
                                         those ids, seen again by this side, count once more in parity");
                                } else {
                                    tokio::time::sleep(wait).await;
                                    wait *= 4;
                                }
                            }
                        }
                    }
                }
                buf.clear();
            }
        });
        Marks { tx }
    }

    /// Queues `side`'s mark on `id`.
    pub fn send(&self, side: &Side, id: &str) {
        let _ = self.tx.send((side.clone(), Arc::from(id)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIDES: [&str; 2] = ["kafka", "rocketmq"];

    fn proceed() -> Claim {
        Claim::Proceed {
            attempt: 1,
            takeover: false,
        }
    }
    fn not_mine(owner: &str) -> Claim {
        Claim::NotMine {
            owner: owner.into(),
        }
    }

    fn one(d: &Decided, side: &str, id: &str) -> Option<(Known, Sighting)> {
        d.recall(side, std::iter::once(id)).pop().flatten()
    }

    #[test]
    fn a_created_record_answers_the_other_sides_copy_once_as_a_pair_then_again() {
        let d = Decided::new(SIDES, 100);
        let c = proceed();
        d.learn(
            "kafka",
            Instant::now(),
            0,
            [("a", &c, Sighting::First)].into_iter(),
        );
        assert_eq!(
            one(&d, "rocketmq", "a"),
            Some((Known::NotMine, Sighting::Pair))
        );
        assert_eq!(
            one(&d, "rocketmq", "a"),
            Some((Known::NotMine, Sighting::Again))
        );
        // The owner's own copy is Redis's to decide until the id is done.
        assert_eq!(one(&d, "kafka", "a"), None);
        d.done("a");
        assert_eq!(one(&d, "kafka", "a"), Some((Known::Done, Sighting::Again)));
        assert_eq!(
            one(&d, "rocketmq", "a"),
            Some((Known::Done, Sighting::Again))
        );
    }

    #[test]
    fn a_first_sight_routed_away_remembers_the_other_owner() {
        let d = Decided::new(SIDES, 100);
        let c = not_mine("rocketmq");
        d.learn(
            "kafka",
            Instant::now(),
            0,
            [("a", &c, Sighting::First)].into_iter(),
        );
        assert_eq!(
            one(&d, "rocketmq", "a"),
            None,
            "the owner's copy is claimed"
        );
        assert_eq!(
            one(&d, "kafka", "a"),
            Some((Known::NotMine, Sighting::Again))
        );
        // The owner's claim said it is a pair: its mark is in Redis, and the memory knows.
        let done = Claim::Done;
        d.learn(
            "rocketmq",
            Instant::now(),
            0,
            [("a", &done, Sighting::Pair)].into_iter(),
        );
        assert_eq!(
            one(&d, "rocketmq", "a"),
            Some((Known::Done, Sighting::Again))
        );
    }

    #[test]
    fn only_claims_that_created_the_record_are_remembered() {
        let d = Decided::new(SIDES, 100);
        let (p, n) = (proceed(), not_mine("kafka"));
        let (done, busy) = (
            Claim::Done,
            Claim::Busy {
                retry_in: Duration::ZERO,
            },
        );
        let replies = [
            ("pair", &p, Sighting::Pair),
            ("again", &n, Sighting::Again),
            ("late", &done, Sighting::First),
            ("busy", &busy, Sighting::Again),
        ];
        d.learn("rocketmq", Instant::now(), 0, replies.into_iter());
        assert!(d.is_empty());
        for id in ["pair", "again", "late", "busy"] {
            assert_eq!(one(&d, "kafka", id), None, "{id}");
        }
    }

    #[test]
    fn an_entry_stops_answering_once_its_validity_ends() {
        let d = Decided::with_validity(SIDES, 100, Duration::from_millis(30));
        let c = proceed();
        d.learn(
            "kafka",
            Instant::now(),
            0,
            [("a", &c, Sighting::First)].into_iter(),
        );
        assert!(one(&d, "rocketmq", "a").is_some());
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(one(&d, "rocketmq", "a"), None);
        // A later insertion drops it.
        d.learn(
            "kafka",
            Instant::now(),
            0,
            [("b", &c, Sighting::First)].into_iter(),
        );
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn validity_is_counted_from_when_the_claim_was_sent_and_never_exceeds_the_slack_margin() {
        let d = Decided::with_validity(SIDES, 100, Duration::from_secs(3_600));
        assert_eq!(d.valid_for, VALID_FOR);
        assert!(VALID_FOR < EXPIRY_SLACK);
        let c = proceed();
        let long_ago = Instant::now() - VALID_FOR;
        d.learn(
            "kafka",
            long_ago,
            0,
            [("a", &c, Sighting::First)].into_iter(),
        );
        assert_eq!(one(&d, "rocketmq", "a"), None);
    }

    #[test]
    fn the_oldest_go_first_beyond_the_cap_and_zero_keeps_nothing() {
        let d = Decided::new(SIDES, 3);
        let c = proceed();
        for id in ["a", "b", "c", "d", "e"] {
            d.learn(
                "kafka",
                Instant::now(),
                0,
                [(id, &c, Sighting::First)].into_iter(),
            );
        }
        assert_eq!(d.len(), 3);
        let got: Vec<bool> = d
            .recall("rocketmq", ["a", "b", "c", "d", "e"].into_iter())
            .iter()
            .map(Option::is_some)
            .collect();
        assert_eq!(got, [false, false, true, true, true]);

        let off = Decided::new(SIDES, 0);
        off.learn(
            "kafka",
            Instant::now(),
            0,
            [("a", &c, Sighting::First)].into_iter(),
        );
        assert!(off.is_empty());
        assert_eq!(one(&off, "rocketmq", "a"), None);
    }

    #[test]
    fn a_record_created_again_replaces_the_entry_and_its_older_order_item_is_ignored() {
        let d = Decided::new(SIDES, 2);
        let (p, n) = (proceed(), not_mine("rocketmq"));
        d.learn(
            "kafka",
            Instant::now(),
            0,
            [("a", &p, Sighting::First)].into_iter(),
        );
        d.done("a");
        // Redis lost the record, and the next claim created it anew (routed the other way).
        d.learn(
            "kafka",
            Instant::now(),
            0,
            [("a", &n, Sighting::First)].into_iter(),
        );
        assert_eq!(
            one(&d, "kafka", "a"),
            Some((Known::NotMine, Sighting::Again))
        );
        d.learn(
            "kafka",
            Instant::now(),
            0,
            [("b", &p, Sighting::First)].into_iter(),
        );
        d.learn(
            "kafka",
            Instant::now(),
            0,
            [("c", &p, Sighting::First)].into_iter(),
        );
        assert_eq!(d.len(), 2, "the cap holds with stale order items");
    }

    #[test]
    fn forgetting_drops_everything_and_unknown_sides_are_never_answered() {
        let d = Decided::new(SIDES, 100);
        let c = proceed();
        d.learn(
            "kafka",
            Instant::now(),
            0,
            [("a", &c, Sighting::First)].into_iter(),
        );
        assert_eq!(one(&d, "pulsar", "a"), None);
        d.learn(
            "pulsar",
            Instant::now(),
            0,
            [("b", &c, Sighting::First)].into_iter(),
        );
        assert_eq!(d.len(), 1);
        d.forget();
        assert!(d.is_empty());
        assert_eq!(one(&d, "rocketmq", "a"), None);
    }

    #[test]
    fn replies_to_claims_sent_before_a_forget_teach_nothing() {
        let d = Decided::new(SIDES, 100);
        let c = proceed();
        let before = d.generation();
        d.forget();
        d.learn(
            "kafka",
            Instant::now(),
            before,
            [("a", &c, Sighting::First)].into_iter(),
        );
        assert!(d.is_empty());
        d.learn(
            "kafka",
            Instant::now(),
            d.generation(),
            [("a", &c, Sighting::First)].into_iter(),
        );
        assert_eq!(
            one(&d, "rocketmq", "a"),
            Some((Known::NotMine, Sighting::Pair))
        );
    }
}
