//! The claim protocol as pure functions over one record: the executable specification of
//! `scripts/claim.lua`, `complete.lua`, `adopt.lua`, `renew.lua`, `release.lua` and
//! `letter.lua`.
//!
//! Redis runs the scripts (that is what makes them atomic across instances); this model is what
//! they are checked against. The unit tests here pin each transition without a server, and
//! `tests/arbiter/model.rs` replays random histories on both and requires identical answers and
//! identical stored records.

use std::collections::BTreeSet;

use super::{Adopt, Claim, Completion, Outcome, Sighting, State};
use crate::arbiter::config::AmbiguousPolicy;

/// The protocol settings the scripts receive.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// Lease length, ms.
    pub lease_ms: u64,
    /// What to do with unknown outcomes.
    pub policy: AmbiguousPolicy,
    /// Calls allowed before an id is parked.
    pub max_attempts: u32,
}

/// Everything stored about one id (the fields of the Redis hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rec {
    /// `o`.
    pub owner: String,
    /// `s`.
    pub state: State,
    /// `t`.
    pub token: Option<String>,
    /// `e`: lease expiry, ms (present while in flight; read only then, and left in place when
    /// the lease holder records a success).
    pub expiry: Option<u64>,
    /// `a`.
    pub attempts: u32,
    /// `@<side>` fields.
    pub seen: BTreeSet<String>,
    /// `m`.
    pub ambiguous: u32,
    /// `v`.
    pub overlaps: u32,
    /// `r`.
    pub reason: Option<String>,
    /// `^a`: the owner was changed by adoption.
    pub adopted: bool,
    /// `^l`: the dead letter of the current dead state is written.
    pub letter: bool,
}

impl Rec {
    /// A fresh record: owned by `owner`, pending, nothing else yet.
    pub fn new(owner: &str) -> Rec {
        Rec {
            owner: owner.to_owned(),
            state: State::Pending,
            token: None,
            expiry: None,
            attempts: 0,
            seen: BTreeSet::new(),
            ambiguous: 0,
            overlaps: 0,
            reason: None,
            adopted: false,
            letter: false,
        }
    }

    fn park(&mut self, reason: String) {
        self.state = State::Dead;
        self.reason = Some(reason);
        self.expiry = None;
        self.letter = false;
    }

    /// The owner's claim (`owner.lua`): at most one live lease.
    fn owner_step(&mut self, token: &str, now_ms: u64, p: Params) -> Claim {
        let mut takeover = false;
        if self.state == State::InFlight {
            if self.token.as_deref() == Some(token) {
                return Claim::Proceed {
                    attempt: self.attempts,
                    takeover: false,
                };
            }
            if let Some(e) = self.expiry.filter(|&e| e > now_ms) {
                return Claim::Busy {
                    retry_in: std::time::Duration::from_millis(e - now_ms),
                };
            }
            self.ambiguous += 1;
            if p.policy == AmbiguousPolicy::AtMostOnce {
                let reason = format!(
                    "in doubt: lease of attempt {} expired before its outcome was recorded",
                    self.attempts
                );
                self.park(reason.clone());
                // The stale worker's late success is then LATE, never REPEATED.
                self.token = None;
                return Claim::Dead {
                    reason,
                    letter: false,
                };
            }
            takeover = true;
        }
        self.attempts += 1;
        self.state = State::InFlight;
        self.token = Some(token.to_owned());
        self.expiry = Some(now_ms + p.lease_ms);
        Claim::Proceed {
            attempt: self.attempts,
            takeover,
        }
    }
}

/// The parity sighting `claim.lua` reports for `side`'s copy: read before [`claim`] applies it.
pub fn sighting(rec: &Option<Rec>, side: &str) -> Sighting {
    match rec {
        Some(r) if r.seen.contains(side) => Sighting::Again,
        Some(r) if !r.seen.is_empty() => Sighting::Pair,
        _ => Sighting::First,
    }
}

/// `claim.lua`.
pub fn claim(
    rec: &mut Option<Rec>,
    side: &str,
    routed_owner: &str,
    token: &str,
    now_ms: u64,
    p: Params,
) -> Claim {
    let r = rec.get_or_insert_with(|| Rec::new(routed_owner));
    r.seen.insert(side.to_owned());
    match r.state {
        State::Done => Claim::Done,
        State::Dead => Claim::Dead {
            reason: r.reason.clone().unwrap_or_default(),
            letter: r.letter,
        },
        _ if r.owner != side => Claim::NotMine {
            owner: r.owner.clone(),
            owner_seen: r.seen.contains(&r.owner),
        },
        _ => r.owner_step(token, now_ms, p),
    }
}

/// `adopt.lua`: `side`, which observed the id, takes it over if its owner has not observed it
/// within `adopt_after_ms` of the first sighting (`first_ms`), then claims it as owner.
pub fn adopt(
    rec: &mut Option<Rec>,
    side: &str,
    token: &str,
    now_ms: u64,
    first_ms: u64,
    adopt_after_ms: u64,
    p: Params,
) -> Adopt {
    let Some(r) = rec.as_mut() else {
        return Adopt::Gone;
    };
    match r.state {
        State::Done => return Adopt::Done,
        State::Dead => {
            return Adopt::Dead {
                reason: r.reason.clone().unwrap_or_default(),
                letter: r.letter,
            }
        }
        _ => {}
    }
    if !r.seen.contains(side) {
        return Adopt::OwnerSeen;
    }
    let mut adopted = false;
    if r.owner != side {
        if r.seen.contains(&r.owner) {
            return Adopt::OwnerSeen;
        }
        if let Some(e) = r
            .expiry
            .filter(|&e| r.state == State::InFlight && e > now_ms)
        {
            return Adopt::Busy {
                retry_in: std::time::Duration::from_millis(e - now_ms),
            };
        }
        let since = now_ms.saturating_sub(first_ms);
        if since < adopt_after_ms {
            return Adopt::NotYet {
                wait: std::time::Duration::from_millis(adopt_after_ms - since),
            };
        }
        r.owner = side.to_owned();
        r.adopted = true;
        adopted = true;
    }
    match r.owner_step(token, now_ms, p) {
        Claim::Proceed { attempt, takeover } => Adopt::Proceed {
            attempt,
            takeover,
            adopted,
        },
        Claim::Busy { retry_in } => Adopt::Busy { retry_in },
        Claim::Dead { reason, letter } => Adopt::Dead { reason, letter },
        other => unreachable!("the owner's step answers {other:?}"),
    }
}

/// `letter.lua`: notes that the dead letter is written; false if the id is not dead.
pub fn letter_written(rec: &mut Option<Rec>) -> bool {
    match rec {
        Some(r) if r.state == State::Dead => {
            r.letter = true;
            true
        }
        _ => false,
    }
}

/// `complete.lua`.
pub fn complete(
    rec: &mut Option<Rec>,
    side: &str,
    token: &str,
    outcome: &Outcome,
    p: Params,
) -> Completion {
    let held = rec
        .as_ref()
        .is_some_and(|r| r.token.as_deref() == Some(token));
    if let Some(r) = rec.as_ref().filter(|r| held && r.state != State::InFlight) {
        return Completion::Repeated(r.state);
    }
    if !held || rec.as_ref().is_some_and(|r| r.state != State::InFlight) {
        if *outcome != Outcome::Success {
            return Completion::Fenced;
        }
        let r = rec.get_or_insert_with(|| {
            let mut r = Rec::new(side);
            r.attempts = 1;
            r
        });
        r.state = State::Done;
        r.token = Some(token.to_owned());
        r.expiry = None;
        r.reason = None;
        r.overlaps += 1;
        return Completion::Late;
    }
    let r = rec.as_mut().expect("held implies a record");
    let retry_or_park = |r: &mut Rec, reason: String| {
        if r.attempts >= p.max_attempts {
            r.park(format!(
                "retries exhausted after {} attempts: {reason}",
                r.attempts
            ));
        } else {
            r.state = State::Pending;
            r.expiry = None;
        }
    };
    match outcome {
        Outcome::Success => {
            // The lease's expiry stays: nothing reads it once the id is done.
            r.state = State::Done;
            r.reason = None;
        }
        Outcome::Retryable(reason) => retry_or_park(r, reason.clone()),
        Outcome::Fatal(reason) => r.park(reason.clone()),
        Outcome::NotCalled => {
            r.state = State::Pending;
            r.attempts = r.attempts.saturating_sub(1);
            r.expiry = None;
        }
        Outcome::Ambiguous(reason) => {
            r.ambiguous += 1;
            if p.policy == AmbiguousPolicy::AtMostOnce {
                r.park(format!("in doubt: {reason}"));
            } else {
                retry_or_park(r, format!("ambiguous: {reason}"));
            }
        }
    }
    Completion::Recorded(r.state)
}

/// `renew.lua`.
pub fn renew(rec: &mut Option<Rec>, token: &str, now_ms: u64, p: Params) -> bool {
    match rec {
        Some(r) if r.state == State::InFlight && r.token.as_deref() == Some(token) => {
            r.expiry = Some(now_ms + p.lease_ms);
            true
        }
        _ => false,
    }
}

/// `release.lua`: the reason the id had been parked for, or `None` if it was not dead.
pub fn release(rec: &mut Option<Rec>) -> Option<String> {
    let r = rec.as_mut().filter(|r| r.state == State::Dead)?;
    r.state = State::Pending;
    r.attempts = 0;
    r.expiry = None;
    r.letter = false;
    Some(r.reason.take().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: Params = Params {
        lease_ms: 1000,
        policy: AmbiguousPolicy::AtLeastOnce,
        max_attempts: 3,
    };
    const STRICT: Params = Params {
        policy: AmbiguousPolicy::AtMostOnce,
        ..P
    };

    fn proceed(attempt: u32) -> Claim {
        Claim::Proceed {
            attempt,
            takeover: false,
        }
    }

    #[test]
    fn first_observer_stores_its_routing_and_binds_the_other_side() {
        let mut r = None;
        assert_eq!(
            claim(&mut r, "b", "a", "t1", 0, P),
            Claim::NotMine {
                owner: "a".into(),
                owner_seen: false
            }
        );
        assert_eq!(claim(&mut r, "a", "b", "t2", 0, P), proceed(1));
        assert_eq!(r.as_ref().unwrap().seen.len(), 2);
    }

    #[test]
    fn live_lease_makes_other_workers_busy_until_it_expires() {
        let mut r = None;
        claim(&mut r, "a", "a", "t1", 0, P);
        assert!(matches!(
            claim(&mut r, "a", "a", "t2", 999, P),
            Claim::Busy { .. }
        ));
        assert_eq!(
            claim(&mut r, "a", "a", "t2", 1000, P),
            Claim::Proceed {
                attempt: 2,
                takeover: true
            }
        );
        assert_eq!(r.unwrap().ambiguous, 1);
    }

    #[test]
    fn expired_lease_under_at_most_once_parks_in_doubt() {
        let mut r = None;
        claim(&mut r, "a", "a", "t1", 0, STRICT);
        assert!(
            matches!(claim(&mut r, "a", "a", "t2", 5000, STRICT), Claim::Dead { reason, letter: false } if reason.starts_with("in doubt"))
        );
    }

    #[test]
    fn retryable_returns_to_pending_until_attempts_run_out() {
        let mut r = None;
        for n in 1..=3 {
            let t = format!("t{n}");
            assert_eq!(claim(&mut r, "a", "a", &t, 0, P), proceed(n));
            let c = complete(&mut r, "a", &t, &Outcome::Retryable("503".into()), P);
            let want = if n < 3 { State::Pending } else { State::Dead };
            assert_eq!(c, Completion::Recorded(want));
        }
        assert_eq!(
            r.unwrap().reason.as_deref(),
            Some("retries exhausted after 3 attempts: 503")
        );
    }

    #[test]
    fn ambiguous_follows_the_policy() {
        let mut r = None;
        claim(&mut r, "a", "a", "t1", 0, P);
        assert_eq!(
            complete(&mut r, "a", "t1", &Outcome::Ambiguous("timeout".into()), P),
            Completion::Recorded(State::Pending)
        );
        let mut r = None;
        claim(&mut r, "a", "a", "t1", 0, STRICT);
        assert_eq!(
            complete(
                &mut r,
                "a",
                "t1",
                &Outcome::Ambiguous("timeout".into()),
                STRICT
            ),
            Completion::Recorded(State::Dead)
        );
        assert_eq!(r.unwrap().reason.as_deref(), Some("in doubt: timeout"));
    }

    #[test]
    fn fenced_failure_changes_nothing_and_late_success_is_counted() {
        let mut r = None;
        claim(&mut r, "a", "a", "old", 0, P);
        claim(&mut r, "a", "a", "new", 2000, P);
        let before = r.clone();
        assert_eq!(
            complete(&mut r, "a", "old", &Outcome::Fatal("x".into()), P),
            Completion::Fenced
        );
        assert_eq!(r, before);
        assert_eq!(
            complete(&mut r, "a", "old", &Outcome::Success, P),
            Completion::Late
        );
        let rec = r.unwrap();
        assert_eq!((rec.state, rec.overlaps), (State::Done, 1));
    }

    #[test]
    fn success_on_a_vanished_record_is_recorded() {
        let mut r = None;
        assert_eq!(
            complete(&mut r, "a", "t", &Outcome::Success, P),
            Completion::Late
        );
        assert_eq!(r.unwrap().owner, "a");
    }

    #[test]
    fn a_lease_handed_back_unused_does_not_count_as_an_attempt() {
        let mut r = None;
        claim(&mut r, "a", "a", "t1", 0, P);
        assert_eq!(
            complete(&mut r, "a", "t1", &Outcome::NotCalled, P),
            Completion::Recorded(State::Pending)
        );
        let rec = r.as_ref().unwrap();
        assert_eq!(
            (rec.state, rec.attempts, rec.ambiguous),
            (State::Pending, 0, 0)
        );
        assert_eq!(claim(&mut r, "a", "a", "t2", 0, P), proceed(1));
    }

    #[test]
    fn renew_only_for_the_holder() {
        let mut r = None;
        claim(&mut r, "a", "a", "t1", 0, P);
        assert!(renew(&mut r, "t1", 900, P));
        assert_eq!(r.as_ref().unwrap().expiry, Some(1900));
        assert!(!renew(&mut r, "t2", 900, P));
    }

    #[test]
    fn release_only_dead_ids() {
        let mut r = None;
        claim(&mut r, "a", "a", "t1", 0, P);
        assert_eq!(release(&mut r), None);
        complete(&mut r, "a", "t1", &Outcome::Fatal("400".into()), P);
        assert_eq!(release(&mut r), Some("400".into()));
        let rec = r.unwrap();
        assert_eq!(
            (rec.state, rec.attempts, rec.owner.as_str()),
            (State::Pending, 0, "a")
        );
    }

    #[derive(Debug, Clone)]
    enum Ev {
        Claim { side: u8, routed: u8, worker: u8 },
        Complete { worker: u8, outcome: u8 },
        Tick(u16),
    }

    fn ev() -> impl Strategy<Value = Ev> {
        prop_oneof![
            (0u8..2, 0u8..2, 0u8..4).prop_map(|(side, routed, worker)| Ev::Claim {
                side,
                routed,
                worker
            }),
            (0u8..4, 0u8..5).prop_map(|(worker, outcome)| Ev::Complete { worker, outcome }),
            (0u16..1500).prop_map(Ev::Tick),
        ]
    }

    proptest! {
        /// Whatever happens: the owner never changes, only the owner proceeds, at most one live
        /// lease exists, and done never goes back.
        #[test]
        fn protocol_invariants_hold_for_any_history(events in proptest::collection::vec(ev(), 1..80), strict in any::<bool>()) {
            let p = if strict { STRICT } else { P };
            let sides = ["a", "b"];
            let mut rec = None;
            let mut now = 0u64;
            let mut tokens: [Option<(String, &str)>; 4] = Default::default();
            let mut n = 0;
            let mut owner: Option<String> = None;
            let mut was_done = false;
            for e in events {
                match e {
                    Ev::Tick(ms) => now += u64::from(ms),
                    Ev::Claim { side, routed, worker } => {
                        n += 1;
                        let token = format!("t{n}");
                        let side = sides[side as usize];
                        let c = claim(&mut rec, side, sides[routed as usize], &token, now, p);
                        if let Claim::Proceed { .. } = c {
                            prop_assert_eq!(owner.as_deref().unwrap_or(side), side);
                            tokens[worker as usize] = Some((token, side));
                        }
                    }
                    Ev::Complete { worker, outcome } => {
                        if let Some((token, side)) = tokens[worker as usize].take() {
                            let o = match outcome {
                                0 => Outcome::Success,
                                1 => Outcome::Retryable("r".into()),
                                2 => Outcome::Fatal("f".into()),
                                3 => Outcome::NotCalled,
                                _ => Outcome::Ambiguous("a".into()),
                            };
                            complete(&mut rec, side, &token, &o, p);
                        }
                    }
                }
                let Some(r) = rec.as_ref() else { continue };
                let o = owner.get_or_insert_with(|| r.owner.clone());
                prop_assert_eq!(&r.owner, o);
                if was_done {
                    prop_assert_eq!(r.state, State::Done);
                }
                was_done = r.state == State::Done;
                if r.state == State::InFlight {
                    prop_assert!(r.expiry.is_some());
                } else if r.state != State::Done {
                    prop_assert!(r.expiry.is_none());
                }
                if strict {
                    // Under at most once nothing is taken over or retried after an unknown
                    // outcome: the id is parked, unless a late success proved it delivered.
                    prop_assert!(r.ambiguous == 0 || matches!(r.state, State::Dead | State::Done));
                }
            }
        }
    }
}
