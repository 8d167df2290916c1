//! Each transition of the claim protocol, one test each, on the real Redis test bed: every one
//! runs against the standalone server and against the 3-master Redis Cluster.

use std::time::Duration;

use mq_cutover::arbiter::{
    record_key, Adopt, AdoptRequest, Arbiter, Claim, ClaimRequest, CompleteRequest, Completion,
    LeaseToken, LeaseTokens, Outcome, State,
};
use mq_cutover::config::{AmbiguousPolicy, RecordLayout, RedisMode};
use mq_cutover::store::StoreError;

use crate::common;

const OLD: &str = "kafka";
const NEW: &str = "rocketmq";

/// Where a scenario runs: the Redis topology, and the layout new records are written in.
#[derive(Debug, Clone, Copy)]
struct Topo {
    mode: RedisMode,
    layout: RecordLayout,
}

struct Bed {
    arbiter: Arbiter,
    store: mq_cutover::store::Store,
    tokens: LeaseTokens,
    prefix: String,
    mode: RedisMode,
}

impl Bed {
    async fn new(
        topo: Topo,
        name: &str,
        lease: Duration,
        policy: AmbiguousPolicy,
        max_attempts: u32,
    ) -> Bed {
        let prefix = common::unique_prefix(name);
        let store = common::connect(topo.mode, &prefix).await;
        let mut cfg = common::arbiter_config(lease, policy, max_attempts);
        cfg.record_layout = topo.layout;
        Bed {
            arbiter: Arbiter::new(&store, &cfg),
            store,
            tokens: LeaseTokens::default(),
            prefix,
            mode: topo.mode,
        }
    }

    async fn standard(mode: Topo, name: &str) -> Bed {
        Bed::new(
            mode,
            name,
            Duration::from_secs(30),
            AmbiguousPolicy::AtLeastOnce,
            3,
        )
        .await
    }

    async fn claim(&self, id: &str, side: &str, routed: &str) -> (Claim, LeaseToken) {
        let token = self.tokens.next();
        let c = self
            .arbiter
            .claim(&ClaimRequest {
                id,
                side,
                routed_owner: routed,
                token: &token,
            })
            .await
            .expect("claim");
        (c, token)
    }

    async fn complete(
        &self,
        id: &str,
        side: &str,
        token: &LeaseToken,
        outcome: Outcome,
    ) -> Completion {
        self.arbiter
            .complete(&CompleteRequest {
                id,
                side,
                token: &token.clone(),
                outcome: &outcome,
            })
            .await
            .expect("complete")
    }

    async fn state(&self, id: &str) -> mq_cutover::arbiter::Record {
        self.arbiter
            .inspect(id)
            .await
            .expect("inspect")
            .expect("record exists")
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let urls = common::testbed_urls(self.mode);
        common::cleanup(&urls, &self.prefix);
    }
}

fn proceeds(c: &Claim) -> bool {
    matches!(c, Claim::Proceed { .. })
}

async fn first_observer_decides_the_owner_for_both_sides(mode: Topo) {
    let b = Bed::standard(mode, "first-observer").await;
    // The new side sees the id first, and its switches route it to the new side.
    let (c, _) = b.claim("m1", NEW, NEW).await;
    assert_eq!(
        c,
        Claim::Proceed {
            attempt: 1,
            takeover: false
        }
    );
    // The old side's switches say "old" (e.g. the percentage moved meanwhile): the stored
    // decision wins, the old copy is not processed.
    let (c, _) = b.claim("m1", OLD, OLD).await;
    assert_eq!(
        c,
        Claim::NotMine {
            owner: NEW.into(),
            owner_seen: true
        }
    );
    let r = b.state("m1").await;
    assert_eq!(r.owner, NEW);
    assert_eq!(r.seen, vec![OLD, NEW]);
}

async fn non_owner_first_observer_still_records_the_routed_owner(mode: Topo) {
    let b = Bed::standard(mode, "non-owner-first").await;
    let (c, _) = b.claim("m1", OLD, NEW).await;
    assert_eq!(
        c,
        Claim::NotMine {
            owner: NEW.into(),
            owner_seen: false
        }
    );
    let (c, _) = b.claim("m1", NEW, OLD).await;
    assert!(proceeds(&c), "{c:?}");
}

async fn other_side_never_proceeds_once_owner_decided(mode: Topo) {
    let b = Bed::standard(mode, "never-other").await;
    let (c, t) = b.claim("m1", OLD, OLD).await;
    assert!(proceeds(&c));
    for state_maker in 0..3 {
        let (c, _) = b.claim("m1", NEW, NEW).await;
        assert_eq!(
            c,
            Claim::NotMine {
                owner: OLD.into(),
                owner_seen: true
            },
            "round {state_maker}"
        );
    }
    b.complete("m1", OLD, &t, Outcome::Retryable("503".into()))
        .await;
    let (c, _) = b.claim("m1", NEW, NEW).await;
    assert_eq!(
        c,
        Claim::NotMine {
            owner: OLD.into(),
            owner_seen: true
        }
    );
}

async fn success_marks_done_and_duplicates_are_acknowledged(mode: Topo) {
    let b = Bed::standard(mode, "done").await;
    let (_, t) = b.claim("m1", OLD, OLD).await;
    assert_eq!(
        b.complete("m1", OLD, &t, Outcome::Success).await,
        Completion::Recorded(State::Done)
    );
    assert_eq!(b.claim("m1", OLD, OLD).await.0, Claim::Done);
    assert_eq!(b.claim("m1", NEW, NEW).await.0, Claim::Done);
    assert_eq!(b.state("m1").await.state, State::Done);
}

async fn owner_retries_after_retryable_failure(mode: Topo) {
    let b = Bed::standard(mode, "reentrant").await;
    let (_, t1) = b.claim("m1", OLD, OLD).await;
    assert_eq!(
        b.complete("m1", OLD, &t1, Outcome::Retryable("HTTP 503".into()))
            .await,
        Completion::Recorded(State::Pending)
    );
    let (c, t2) = b.claim("m1", OLD, OLD).await;
    assert_eq!(
        c,
        Claim::Proceed {
            attempt: 2,
            takeover: false
        }
    );
    assert_eq!(
        b.complete("m1", OLD, &t2, Outcome::Success).await,
        Completion::Recorded(State::Done)
    );
    assert_eq!(b.state("m1").await.attempts, 2);
}

async fn exhausted_retries_park_the_id_as_dead(mode: Topo) {
    let b = Bed::standard(mode, "exhausted").await; // max_attempts = 3
    for attempt in 1..=3 {
        let (c, t) = b.claim("m1", OLD, OLD).await;
        assert_eq!(
            c,
            Claim::Proceed {
                attempt,
                takeover: false
            }
        );
        b.complete("m1", OLD, &t, Outcome::Retryable("HTTP 500".into()))
            .await;
    }
    match b.claim("m1", OLD, OLD).await.0 {
        Claim::Dead { reason, .. } => {
            assert!(
                reason.contains("retries exhausted after 3 attempts: HTTP 500"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        b.claim("m1", NEW, NEW).await.0,
        Claim::Dead { .. }
    ));
}

async fn fatal_outcome_parks_the_id_with_its_reason(mode: Topo) {
    let b = Bed::standard(mode, "fatal").await;
    let (_, t) = b.claim("m1", OLD, OLD).await;
    assert_eq!(
        b.complete("m1", OLD, &t, Outcome::Fatal("HTTP 400: bad user".into()))
            .await,
        Completion::Recorded(State::Dead)
    );
    let r = b.state("m1").await;
    assert_eq!(r.state, State::Dead);
    assert_eq!(r.reason.as_deref(), Some("HTTP 400: bad user"));
}

async fn second_worker_of_the_owner_is_busy_while_the_lease_lives(mode: Topo) {
    let b = Bed::standard(mode, "busy").await;
    let (_, _t1) = b.claim("m1", OLD, OLD).await;
    match b.claim("m1", OLD, OLD).await.0 {
        Claim::Busy { retry_in } => {
            assert!(retry_in > Duration::from_secs(25) && retry_in <= Duration::from_secs(30))
        }
        other => panic!("{other:?}"),
    }
}

async fn the_same_token_claiming_again_gets_the_same_answer(mode: Topo) {
    let b = Bed::standard(mode, "same-token").await;
    let token = b.tokens.next();
    let req = ClaimRequest {
        id: "m1",
        side: OLD,
        routed_owner: OLD,
        token: &token,
    };
    let first = b.arbiter.claim(&req).await.unwrap();
    let again = b.arbiter.claim(&req).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(b.state("m1").await.attempts, 1);
}

async fn expired_lease_is_taken_over_and_counted_under_at_least_once(mode: Topo) {
    let b = Bed::new(
        mode,
        "takeover",
        Duration::from_millis(200),
        AmbiguousPolicy::AtLeastOnce,
        5,
    )
    .await;
    let (_, crashed) = b.claim("m1", OLD, OLD).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (c, t2) = b.claim("m1", OLD, OLD).await;
    assert_eq!(
        c,
        Claim::Proceed {
            attempt: 2,
            takeover: true
        }
    );
    assert_eq!(b.state("m1").await.ambiguous, 1);
    // The crashed worker comes back with a failure: fenced, it cannot reset the id.
    assert_eq!(
        b.complete("m1", OLD, &crashed, Outcome::Retryable("late".into()))
            .await,
        Completion::Fenced
    );
    assert_eq!(b.state("m1").await.state, State::InFlight);
    assert_eq!(
        b.complete("m1", OLD, &t2, Outcome::Success).await,
        Completion::Recorded(State::Done)
    );
}

async fn expired_lease_parks_the_id_in_doubt_under_at_most_once(mode: Topo) {
    let b = Bed::new(
        mode,
        "in-doubt",
        Duration::from_millis(200),
        AmbiguousPolicy::AtMostOnce,
        5,
    )
    .await;
    let _ = b.claim("m1", OLD, OLD).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    match b.claim("m1", OLD, OLD).await.0 {
        Claim::Dead { reason, .. } => assert!(reason.starts_with("in doubt"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(b.state("m1").await.ambiguous, 1);
}

async fn ambiguous_outcome_retries_under_at_least_once(mode: Topo) {
    let b = Bed::standard(mode, "ambiguous-retry").await;
    let (_, t) = b.claim("m1", OLD, OLD).await;
    assert_eq!(
        b.complete("m1", OLD, &t, Outcome::Ambiguous("timeout after 5s".into()))
            .await,
        Completion::Recorded(State::Pending)
    );
    let r = b.state("m1").await;
    assert_eq!(r.ambiguous, 1);
    assert!(proceeds(&b.claim("m1", OLD, OLD).await.0));
}

async fn ambiguous_outcome_parks_in_doubt_under_at_most_once(mode: Topo) {
    let b = Bed::new(
        mode,
        "ambiguous-park",
        Duration::from_secs(30),
        AmbiguousPolicy::AtMostOnce,
        5,
    )
    .await;
    let (_, t) = b.claim("m1", OLD, OLD).await;
    assert_eq!(
        b.complete("m1", OLD, &t, Outcome::Ambiguous("timeout after 5s".into()))
            .await,
        Completion::Recorded(State::Dead)
    );
    let r = b.state("m1").await;
    assert_eq!(r.reason.as_deref(), Some("in doubt: timeout after 5s"));
    assert!(matches!(
        b.claim("m1", OLD, OLD).await.0,
        Claim::Dead { .. }
    ));
}

async fn stale_worker_success_is_recorded_and_counted_as_overlap(mode: Topo) {
    let b = Bed::new(
        mode,
        "late-success",
        Duration::from_millis(200),
        AmbiguousPolicy::AtLeastOnce,
        5,
    )
    .await;
    let (_, stale) = b.claim("m1", OLD, OLD).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (c, fresh) = b.claim("m1", OLD, OLD).await;
    assert!(proceeds(&c));
    // The stale worker's call did succeed: the reward happened, so it is recorded.
    assert_eq!(
        b.complete("m1", OLD, &stale, Outcome::Success).await,
        Completion::Late
    );
    let r = b.state("m1").await;
    assert_eq!(r.state, State::Done);
    assert_eq!(r.overlaps, 1);
    // The fresh worker's call succeeded too: a second overlap, still visible.
    assert_eq!(
        b.complete("m1", OLD, &fresh, Outcome::Success).await,
        Completion::Late
    );
    assert_eq!(b.state("m1").await.overlaps, 2);
}

async fn repeated_completion_changes_nothing(mode: Topo) {
    let b = Bed::standard(mode, "repeated").await;
    let (_, t) = b.claim("m1", OLD, OLD).await;
    b.complete("m1", OLD, &t, Outcome::Retryable("503".into()))
        .await;
    assert_eq!(
        b.complete("m1", OLD, &t, Outcome::Retryable("503".into()))
            .await,
        Completion::Repeated(State::Pending)
    );
    let r = b.state("m1").await;
    assert_eq!((r.state, r.attempts, r.overlaps), (State::Pending, 1, 0));
}

async fn renew_extends_a_live_lease_and_reports_a_lost_one(mode: Topo) {
    let b = Bed::new(
        mode,
        "renew",
        Duration::from_millis(300),
        AmbiguousPolicy::AtLeastOnce,
        5,
    )
    .await;
    let (_, t) = b.claim("m1", OLD, OLD).await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(b.arbiter.renew("m1", &t).await.unwrap());
    }
    // 600 ms after the claim, the lease is still live thanks to the renewals.
    assert!(matches!(
        b.claim("m1", OLD, OLD).await.0,
        Claim::Busy { .. }
    ));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (c, _) = b.claim("m1", OLD, OLD).await;
    assert!(proceeds(&c));
    assert!(
        !b.arbiter.renew("m1", &t).await.unwrap(),
        "a lost lease must not renew"
    );
}

async fn release_hands_a_dead_id_back_to_pending_with_its_owner(mode: Topo) {
    let b = Bed::standard(mode, "release").await;
    let (_, t) = b.claim("m1", NEW, NEW).await;
    b.complete("m1", NEW, &t, Outcome::Fatal("HTTP 404".into()))
        .await;
    assert_eq!(
        b.arbiter.release("m1").await.unwrap().as_deref(),
        Some("HTTP 404")
    );
    let r = b.state("m1").await;
    assert_eq!(
        (r.state, r.attempts, r.owner.as_str()),
        (State::Pending, 0, NEW)
    );
    assert!(r.reason.is_none());
    // Like a claim, a release sets the whole TTL: the retention (600 s) plus the slack (60 s).
    let ttl = r.expires_in.expect("a record always has a TTL");
    assert!(ttl > Duration::from_secs(650), "{ttl:?}");
    assert_eq!(
        b.claim("m1", OLD, OLD).await.0,
        Claim::NotMine {
            owner: NEW.into(),
            owner_seen: true
        }
    );
    assert!(proceeds(&b.claim("m1", NEW, OLD).await.0));
    // Only dead ids can be released.
    assert_eq!(b.arbiter.release("m1").await.unwrap(), None);
}

async fn records_outlive_their_last_claim_by_the_retention(mode: Topo) {
    let b = Bed::standard(mode, "retention").await;
    let ttl = |r: mq_cutover::arbiter::Record| r.expires_in.expect("a record always has a TTL");
    // The retention is 600 s; every TTL set adds the 60 s (`EXPIRY_SLACK`) within which later
    // claims leave it alone.
    let full = |t: Duration| t > Duration::from_secs(650) && t <= Duration::from_secs(660);
    let _ = b.claim("m1", OLD, OLD).await;
    let first = ttl(b.state("m1").await);
    assert!(full(first), "first claim: {first:?}");

    // The other side's copy a moment later: the first claim's expiry covers it and stays.
    let key = record_key(&b.prefix, "m1");
    let mut conn = b.store.conn();
    let _: () = redis::cmd("PEXPIRE")
        .arg(&key)
        .arg(100_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let (c, _) = b.claim("m1", NEW, NEW).await;
    assert_eq!(
        c,
        Claim::NotMine {
            owner: OLD.into(),
            owner_seen: true
        }
    );
    let kept = ttl(b.state("m1").await);
    assert!(
        kept <= Duration::from_secs(100),
        "within the slack: {kept:?}"
    );

    // A claim a minute or more after the first sets the expiry again.
    let (_, fields) = common::raw_record(&b.store, &key).await.unwrap();
    let at: u64 = fields
        .iter()
        .find(|(k, _)| k == "f")
        .unwrap()
        .1
        .parse()
        .unwrap();
    common::set_record_field(&b.store, &key, "f", &(at - 61_000).to_string()).await;
    let (c, _) = b.claim("m1", NEW, NEW).await;
    assert_eq!(
        c,
        Claim::NotMine {
            owner: OLD.into(),
            owner_seen: true
        }
    );
    let again = ttl(b.state("m1").await);
    assert!(full(again), "after the slack: {again:?}");
}

async fn batch_claims_answer_each_id_in_order(mode: Topo) {
    let b = Bed::standard(mode, "batch").await;
    let (_, t) = b.claim("done", OLD, OLD).await;
    b.complete("done", OLD, &t, Outcome::Success).await;
    let _ = b.claim("theirs", NEW, NEW).await;
    let tokens: Vec<LeaseToken> = (0..3).map(|_| b.tokens.next()).collect();
    let reqs = [
        ClaimRequest {
            id: "fresh",
            side: OLD,
            routed_owner: OLD,
            token: &tokens[0],
        },
        ClaimRequest {
            id: "done",
            side: OLD,
            routed_owner: OLD,
            token: &tokens[1],
        },
        ClaimRequest {
            id: "theirs",
            side: OLD,
            routed_owner: OLD,
            token: &tokens[2],
        },
    ];
    let out: Vec<Claim> = b
        .arbiter
        .claim_batch(&reqs)
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        out,
        vec![
            Claim::Proceed {
                attempt: 1,
                takeover: false
            },
            Claim::Done,
            Claim::NotMine {
                owner: NEW.into(),
                owner_seen: true
            },
        ]
    );
}

/// A key of the wrong type under the prefix (nothing of ours writes one) fails its own id in a
/// batch, never its neighbours: they are claimed and completed as if alone.
async fn a_foreign_key_fails_only_its_own_id_in_a_batch(mode: Topo) {
    let b = Bed::standard(mode, "foreign").await;
    let mut conn = b.store.conn();
    let _: () = redis::cmd("RPUSH")
        .arg(record_key(&b.prefix, "poison"))
        .arg("not a record")
        .query_async(&mut conn)
        .await
        .unwrap();
    let ids = ["before", "poison", "after"];
    let tokens: Vec<LeaseToken> = ids.iter().map(|_| b.tokens.next()).collect();
    let claims = claims_by_old(&ids, &tokens);
    let got = b.arbiter.claim_batch(&claims).await.unwrap();
    let first = Claim::Proceed {
        attempt: 1,
        takeover: false,
    };
    assert_eq!(got[0].as_ref().unwrap(), &first);
    assert!(
        matches!(&got[1], Err(StoreError::Rejected(e)) if e.to_string().contains("WRONGTYPE")),
        "{:?}",
        got[1]
    );
    assert_eq!(got[2].as_ref().unwrap(), &first);

    let outcome = Outcome::Success;
    let completions: Vec<CompleteRequest> = ids
        .iter()
        .zip(&tokens)
        .map(|(id, token)| CompleteRequest {
            id,
            side: OLD,
            token,
            outcome: &outcome,
        })
        .collect();
    let got = b.arbiter.complete_batch(&completions).await.unwrap();
    assert_eq!(got[0].as_ref().unwrap(), &Completion::Recorded(State::Done));
    assert!(
        matches!(&got[1], Err(StoreError::Rejected(_))),
        "{:?}",
        got[1]
    );
    assert_eq!(got[2].as_ref().unwrap(), &Completion::Recorded(State::Done));
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A new record is written in the configured layout with every field of the protocol, and
/// keeps that layout through every later step.
async fn a_new_record_takes_the_configured_layout_and_keeps_it(mode: Topo) {
    let b = Bed::standard(mode, "layout").await;
    let packed = matches!(mode.layout, RecordLayout::Packed);
    let key = record_key(&b.prefix, "m1");
    let (c, token) = b.claim("m1", OLD, OLD).await;
    assert!(proceeds(&c));
    let (is_packed, fields) = common::raw_record(&b.store, &key).await.unwrap();
    assert_eq!(is_packed, packed, "{fields:?}");
    assert_eq!(field(&fields, "o"), Some(OLD));
    assert_eq!(field(&fields, "s"), Some("i"));
    assert_eq!(field(&fields, "t"), Some(token.as_str()));
    assert_eq!(field(&fields, "a"), Some("1"));
    assert!(field(&fields, "e").is_some() && field(&fields, "f").is_some());
    assert_eq!(field(&fields, &format!("@{OLD}")), Some("1"));
    assert_eq!(field(&fields, &format!("@{NEW}")), None);

    let (c, _) = b.claim("m1", NEW, NEW).await;
    assert_eq!(
        c,
        Claim::NotMine {
            owner: OLD.into(),
            owner_seen: true
        }
    );
    b.complete("m1", OLD, &token, Outcome::Success).await;
    let (is_packed, fields) = common::raw_record(&b.store, &key).await.unwrap();
    assert_eq!(is_packed, packed, "{fields:?}");
    assert_eq!(field(&fields, "s"), Some("d"));
    assert_eq!(field(&fields, &format!("@{NEW}")), Some("1"));
    let r = b.state("m1").await;
    assert_eq!((r.state, r.attempts, r.seen.len()), (State::Done, 1, 2));
}

/// A record in the other layout (a hash left by a version that only knew hashes, or a packed
/// record written by an instance configured differently) is read, advanced and kept in its own
/// layout: the layouts never fork an id into two records.
async fn a_record_in_the_other_layout_is_honoured_in_place(mode: Topo) {
    let b = Bed::new(
        mode,
        "other-layout",
        Duration::from_secs(30),
        AmbiguousPolicy::AtLeastOnce,
        2,
    )
    .await;
    let other_is_packed = matches!(mode.layout, RecordLayout::Hash);
    let key = record_key(&b.prefix, "m1");
    let mut conn = b.store.conn();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    // What the owner's first claim wrote: in flight under a live lease of another worker.
    let theirs = LeaseTokens::default().next();
    let fields: Vec<(String, String)> = [
        ("o", OLD.to_owned()),
        ("s", "i".to_owned()),
        ("t", theirs.as_str().to_owned()),
        ("e", (now_ms + 30_000).to_string()),
        ("a", "1".to_owned()),
        ("f", now_ms.to_string()),
        ("@kafka", "1".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    if other_is_packed {
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(common::pack_record(&fields))
            .arg("PX")
            .arg(600_000)
            .query_async(&mut conn)
            .await
            .unwrap();
    } else {
        let mut c = redis::cmd("HSET");
        c.arg(&key);
        for (k, v) in &fields {
            c.arg(k).arg(v);
        }
        let _: () = c.query_async(&mut conn).await.unwrap();
        let _: () = redis::cmd("PEXPIRE")
            .arg(&key)
            .arg(600_000)
            .query_async(&mut conn)
            .await
            .unwrap();
    }

    // The other side's copy: not its id; a second worker of the owner: busy.
    assert_eq!(
        b.claim("m1", NEW, NEW).await.0,
        Claim::NotMine {
            owner: OLD.into(),
            owner_seen: true
        }
    );
    assert!(matches!(
        b.claim("m1", OLD, OLD).await.0,
        Claim::Busy { .. }
    ));
    // The lease holder's call failed: pending again, and its owner calls once more.
    assert_eq!(
        b.complete("m1", OLD, &theirs, Outcome::Retryable("503".into()))
            .await,
        Completion::Recorded(State::Pending)
    );
    let (c, token) = b.claim("m1", OLD, OLD).await;
    assert_eq!(
        c,
        Claim::Proceed {
            attempt: 2,
            takeover: false
        }
    );
    assert_eq!(
        b.complete("m1", OLD, &token, Outcome::Success).await,
        Completion::Recorded(State::Done)
    );
    assert_eq!(b.claim("m1", NEW, NEW).await.0, Claim::Done);

    let (is_packed, fields) = common::raw_record(&b.store, &key).await.unwrap();
    assert_eq!(is_packed, other_is_packed, "{fields:?}");
    assert_eq!(field(&fields, "s"), Some("d"));
    assert_eq!(field(&fields, "t"), Some(token.as_str()));
    assert_eq!(field(&fields, "a"), Some("2"));
    assert_eq!(field(&fields, &format!("@{NEW}")), Some("1"));
    let r = b.state("m1").await;
    assert_eq!(r.seen, vec![OLD.to_owned(), NEW.to_owned()]);
    let ttl = r.expires_in.expect("kept its TTL");
    assert!(ttl > Duration::from_secs(500), "{ttl:?}");
}

/// A string under the prefix that is not a record (nothing of ours writes one) is refused for
/// its own id and left as it is, never taken for an empty record and overwritten.
async fn a_foreign_string_is_refused_and_left_alone(mode: Topo) {
    let b = Bed::standard(mode, "foreign-string").await;
    let key = record_key(&b.prefix, "poison");
    let mut conn = b.store.conn();
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("not a record")
        .query_async(&mut conn)
        .await
        .unwrap();
    let token = b.tokens.next();
    let got = b
        .arbiter
        .claim(&ClaimRequest {
            id: "poison",
            side: OLD,
            routed_owner: OLD,
            token: &token,
        })
        .await;
    assert!(
        matches!(&got, Err(StoreError::Rejected(e)) if e.to_string().contains("is not a record")),
        "{got:?}"
    );
    assert!(b.arbiter.inspect("poison").await.is_err());
    let kept: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(kept, "not a record");
}

/// Under at most once, a lease that ran out parks the id in doubt and forgets the stale worker's
/// token: should that worker's call have succeeded after all, its completion is recorded (LATE,
/// counted as an overlap), never answered REPEATED and lost (a later replay would grant twice).
async fn in_doubt_forgets_the_stale_token_so_its_late_success_is_recorded(mode: Topo) {
    let b = Bed::new(
        mode,
        "in-doubt-late",
        Duration::from_millis(200),
        AmbiguousPolicy::AtMostOnce,
        5,
    )
    .await;
    let (_, stale) = b.claim("m1", OLD, OLD).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(
        b.claim("m1", OLD, OLD).await.0,
        Claim::Dead { letter: false, .. }
    ));
    assert_eq!(
        b.complete("m1", OLD, &stale, Outcome::Success).await,
        Completion::Late
    );
    let r = b.state("m1").await;
    assert_eq!((r.state, r.overlaps, r.ambiguous), (State::Done, 1, 1));
    // Replaying it now finds it delivered.
    assert_eq!(b.arbiter.release("m1").await.unwrap(), None);
}

/// A dead id asks every copy for its letter (DEAD, letter not written) until one is noted; a new
/// dead state (after a release) asks again.
async fn a_dead_id_asks_for_its_letter_until_it_is_written(mode: Topo) {
    let b = Bed::standard(mode, "letter").await;
    assert!(!b.arbiter.letter_written("m1").await.unwrap(), "no record");
    let (_, t) = b.claim("m1", OLD, OLD).await;
    assert!(!b.arbiter.letter_written("m1").await.unwrap(), "not dead");
    b.complete("m1", OLD, &t, Outcome::Fatal("HTTP 400".into()))
        .await;
    for side in [OLD, NEW] {
        assert_eq!(
            b.claim("m1", side, side).await.0,
            Claim::Dead {
                reason: "HTTP 400".into(),
                letter: false
            }
        );
    }
    assert!(!b.state("m1").await.letter);
    assert!(b.arbiter.letter_written("m1").await.unwrap());
    assert!(b.arbiter.letter_written("m1").await.unwrap(), "idempotent");
    assert!(b.state("m1").await.letter);
    assert_eq!(
        b.claim("m1", NEW, NEW).await.0,
        Claim::Dead {
            reason: "HTTP 400".into(),
            letter: true
        }
    );
    // Released and dead again: a new letter is due.
    b.arbiter.release("m1").await.unwrap();
    assert!(!b.state("m1").await.letter);
    let (_, t) = b.claim("m1", OLD, OLD).await;
    b.complete("m1", OLD, &t, Outcome::Fatal("HTTP 410".into()))
        .await;
    assert!(matches!(
        b.claim("m1", OLD, OLD).await.0,
        Claim::Dead { letter: false, .. }
    ));
}

/// NOT_MINE says whether the owner has observed the id: only a copy whose owner has not keeps
/// its position for adoption.
async fn not_mine_says_whether_the_owner_has_observed_the_id(mode: Topo) {
    let b = Bed::standard(mode, "owner-seen").await;
    let (c, _) = b.claim("m1", OLD, NEW).await;
    assert_eq!(
        c,
        Claim::NotMine {
            owner: NEW.into(),
            owner_seen: false
        }
    );
    // Again (a redelivery): still unseen.
    assert_eq!(
        b.claim("m1", OLD, OLD).await.0,
        Claim::NotMine {
            owner: NEW.into(),
            owner_seen: false
        }
    );
    assert!(proceeds(&b.claim("m1", NEW, OLD).await.0));
    assert_eq!(
        b.claim("m1", OLD, OLD).await.0,
        Claim::NotMine {
            owner: NEW.into(),
            owner_seen: true
        }
    );
}

/// Moves an id's first sighting `ms` into the past.
async fn age(b: &Bed, id: &str, ms: u64) {
    let key = record_key(&b.prefix, id);
    let (_, fields) = common::raw_record(&b.store, &key).await.unwrap();
    let f: u64 = field(&fields, "f").unwrap().parse().unwrap();
    common::set_record_field(&b.store, &key, "f", &(f - ms).to_string()).await;
}

async fn adopt(b: &Bed, id: &str, side: &str) -> (Adopt, LeaseToken) {
    let token = b.tokens.next();
    let a = b
        .arbiter
        .adopt_batch(&[AdoptRequest {
            id,
            side,
            token: &token,
        }])
        .await
        .expect("adopt")
        .pop()
        .unwrap()
        .expect("adopt answer");
    (a, token)
}

/// The owner's copy never comes: once `adopt_after` (60 s in these tests) has passed since the
/// first sighting, the side that observed the id takes it over, atomically; the record says so,
/// and the owner's late copy is then NOT_MINE (while the adopter works) or DONE — never a second
/// grant.
async fn an_observer_adopts_an_id_whose_owner_never_observed_it(mode: Topo) {
    let b = Bed::standard(mode, "adopt").await;
    let _ = b.claim("m1", OLD, NEW).await;
    match adopt(&b, "m1", OLD).await.0 {
        Adopt::NotYet { wait } => assert!(wait > Duration::from_secs(55), "{wait:?}"),
        other => panic!("adopted too early: {other:?}"),
    }
    age(&b, "m1", 61_000).await;
    // The routed owner cannot adopt what it never observed; the observer can.
    assert_eq!(adopt(&b, "m1", NEW).await.0, Adopt::OwnerSeen);
    let (a, token) = adopt(&b, "m1", OLD).await;
    assert_eq!(
        a,
        Adopt::Proceed {
            attempt: 1,
            takeover: false,
            adopted: true
        }
    );
    let r = b.state("m1").await;
    assert_eq!(
        (r.owner.as_str(), r.state, r.adopted),
        (OLD, State::InFlight, true)
    );
    assert!(b
        .state("m1")
        .await
        .to_string()
        .contains("adopted:   by kafka"));
    // A second sweep meanwhile: the lease is live.
    assert!(matches!(adopt(&b, "m1", OLD).await.0, Adopt::Busy { .. }));
    // The owner's copy comes late, while the adopter calls: not its id any more.
    assert_eq!(
        b.claim("m1", NEW, NEW).await.0,
        Claim::NotMine {
            owner: OLD.into(),
            owner_seen: true
        }
    );
    assert_eq!(
        b.complete("m1", OLD, &token, Outcome::Success).await,
        Completion::Recorded(State::Done)
    );
    assert_eq!(b.claim("m1", NEW, NEW).await.0, Claim::Done);
    assert_eq!(adopt(&b, "m1", OLD).await.0, Adopt::Done);
}

/// Once the owner has observed the id, nobody adopts it, however long it takes.
async fn an_id_whose_owner_observed_it_is_never_adopted(mode: Topo) {
    let b = Bed::standard(mode, "no-adopt").await;
    let _ = b.claim("m1", OLD, NEW).await;
    let (_, t) = b.claim("m1", NEW, NEW).await;
    b.complete("m1", NEW, &t, Outcome::Retryable("503".into()))
        .await;
    age(&b, "m1", 3_600_000).await;
    assert_eq!(adopt(&b, "m1", OLD).await.0, Adopt::OwnerSeen);
    let r = b.state("m1").await;
    assert_eq!((r.owner.as_str(), r.adopted), (NEW, false));
    // An expired record: nothing to adopt.
    assert_eq!(adopt(&b, "gone", OLD).await.0, Adopt::Gone);
}

/// An adopter whose call failed retries as the owner (the adoption stands); one that crashed
/// mid-call is taken over like any owner's lease.
async fn an_adopted_id_is_retried_by_its_adopter(mode: Topo) {
    let b = Bed::new(
        mode,
        "adopt-retry",
        Duration::from_millis(300),
        AmbiguousPolicy::AtLeastOnce,
        5,
    )
    .await;
    let _ = b.claim("m1", NEW, OLD).await;
    age(&b, "m1", 61_000).await;
    let (_, t) = adopt(&b, "m1", NEW).await;
    b.complete("m1", NEW, &t, Outcome::Retryable("503".into()))
        .await;
    assert_eq!(
        adopt(&b, "m1", NEW).await.0,
        Adopt::Proceed {
            attempt: 2,
            takeover: false,
            adopted: false
        }
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        adopt(&b, "m1", NEW).await.0,
        Adopt::Proceed {
            attempt: 3,
            takeover: true,
            adopted: false
        }
    );
    assert_eq!(b.state("m1").await.ambiguous, 1);
}

/// Runs each named scenario as its own test: on the standalone server and on the Cluster with
/// packed records (the default), and on the standalone server with hash records.
macro_rules! on_both_topologies {
    ($($name:ident),+ $(,)?) => {
        mod standalone {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Topo {
                    mode: mq_cutover::config::RedisMode::Standalone,
                    layout: mq_cutover::config::RecordLayout::Packed,
                })
                .await
            })+
        }
        mod cluster {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Topo {
                    mode: mq_cutover::config::RedisMode::Cluster,
                    layout: mq_cutover::config::RecordLayout::Packed,
                })
                .await
            })+
        }
        mod hash_layout {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Topo {
                    mode: mq_cutover::config::RedisMode::Standalone,
                    layout: mq_cutover::config::RecordLayout::Hash,
                })
                .await
            })+
        }
    };
}

on_both_topologies!(
    first_observer_decides_the_owner_for_both_sides,
    non_owner_first_observer_still_records_the_routed_owner,
    other_side_never_proceeds_once_owner_decided,
    success_marks_done_and_duplicates_are_acknowledged,
    owner_retries_after_retryable_failure,
    exhausted_retries_park_the_id_as_dead,
    fatal_outcome_parks_the_id_with_its_reason,
    second_worker_of_the_owner_is_busy_while_the_lease_lives,
    the_same_token_claiming_again_gets_the_same_answer,
    expired_lease_is_taken_over_and_counted_under_at_least_once,
    expired_lease_parks_the_id_in_doubt_under_at_most_once,
    ambiguous_outcome_retries_under_at_least_once,
    ambiguous_outcome_parks_in_doubt_under_at_most_once,
    stale_worker_success_is_recorded_and_counted_as_overlap,
    repeated_completion_changes_nothing,
    renew_extends_a_live_lease_and_reports_a_lost_one,
    release_hands_a_dead_id_back_to_pending_with_its_owner,
    records_outlive_their_last_claim_by_the_retention,
    batch_claims_answer_each_id_in_order,
    a_foreign_key_fails_only_its_own_id_in_a_batch,
    a_new_record_takes_the_configured_layout_and_keeps_it,
    a_record_in_the_other_layout_is_honoured_in_place,
    a_foreign_string_is_refused_and_left_alone,
    in_doubt_forgets_the_stale_token_so_its_late_success_is_recorded,
    a_dead_id_asks_for_its_letter_until_it_is_written,
    not_mine_says_whether_the_owner_has_observed_the_id,
    an_observer_adopts_an_id_whose_owner_never_observed_it,
    an_id_whose_owner_observed_it_is_never_adopted,
    an_adopted_id_is_retried_by_its_adopter,
);

/// One claim per id by the old side, which the switches route every id to.
fn claims_by_old<'a>(ids: &'a [&'a str], tokens: &'a [LeaseToken]) -> Vec<ClaimRequest<'a>> {
    ids.iter()
        .zip(tokens)
        .map(|(id, token)| ClaimRequest {
            id,
            side: OLD,
            routed_owner: OLD,
            token,
        })
        .collect()
}

/// An arbiter on a Redis of the test's own (to flush its scripts, fill it, or stop it).
async fn private_arbiter(prefix: &str) -> (common::PrivateRedis, Arbiter) {
    let redis = common::PrivateRedis::start();
    let cfg = common::redis_config_for(RedisMode::Standalone, vec![redis.url()], prefix);
    let store = mq_cutover::store::Store::connect(&cfg, false)
        .await
        .unwrap();
    let arbiter = Arbiter::new(
        &store,
        &common::arbiter_config(Duration::from_secs(30), AmbiguousPolicy::AtLeastOnce, 3),
    );
    (redis, arbiter)
}

#[tokio::test]
async fn scripts_are_reloaded_after_redis_forgets_them() {
    let (redis, arbiter) = private_arbiter("noscript").await;
    let tokens = LeaseTokens::default();
    let claim = |id: &'static str, token: LeaseToken| {
        let arbiter = arbiter.clone();
        async move {
            arbiter
                .claim(&ClaimRequest {
                    id,
                    side: OLD,
                    routed_owner: OLD,
                    token: &token,
                })
                .await
        }
    };
    assert!(proceeds(&claim("a", tokens.next()).await.unwrap()));
    let mut raw = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut raw).unwrap();
    assert!(proceeds(&claim("b", tokens.next()).await.unwrap()));
    assert!(proceeds(&claim("c", tokens.next()).await.unwrap()));

    // Every other script too, each sent right after Redis forgot them all: renew, complete,
    // inspect (read.lua) and release.
    let mut flush = || {
        let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut raw).unwrap();
    };
    let d = tokens.next();
    assert!(proceeds(&claim("d", d.clone()).await.unwrap()));
    flush();
    assert!(arbiter.renew("d", &d).await.unwrap());
    flush();
    let parked = arbiter
        .complete(&CompleteRequest {
            id: "d",
            side: OLD,
            token: &d,
            outcome: &Outcome::Fatal("HTTP 400".into()),
        })
        .await
        .unwrap();
    assert_eq!(parked, Completion::Recorded(State::Dead));
    flush();
    let record = arbiter.inspect("d").await.unwrap().expect("a record");
    assert_eq!(record.state, State::Dead);
    flush();
    assert_eq!(
        arbiter.release("d").await.unwrap().as_deref(),
        Some("HTTP 400")
    );
}

#[tokio::test]
async fn a_redis_out_of_memory_fails_claims_as_retryable_not_refused() {
    let (redis, arbiter) = private_arbiter("oom").await;
    let tokens = LeaseTokens::default();
    let mut raw = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1")
        .query(&mut raw)
        .unwrap();
    let ids = ["x", "y"];
    let batch: Vec<LeaseToken> = ids.iter().map(|_| tokens.next()).collect();
    let reqs = claims_by_old(&ids, &batch);
    // Each id's own write fails inside the batch script: a full Redis is a wait, not a refusal
    // (a refusal parks the copy in the dead letters).
    for got in arbiter.claim_batch(&reqs).await.unwrap() {
        match got {
            Err(e @ StoreError::Unavailable(_)) => {
                assert!(e.to_string().contains("OOM"), "{e}")
            }
            other => panic!("expected unavailable (OOM), got {other:?}"),
        }
    }
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query(&mut raw)
        .unwrap();
    for got in arbiter.claim_batch(&reqs).await.unwrap() {
        assert!(proceeds(&got.unwrap()));
    }
}

#[tokio::test]
async fn unreachable_redis_fails_the_claim_as_retryable_and_never_proceeds() {
    let (mut redis, arbiter) = private_arbiter("down").await;
    let tokens = LeaseTokens::default();
    redis.stop();
    for i in 0..3 {
        let token = tokens.next();
        let id = format!("m{i}");
        let r = arbiter
            .claim(&ClaimRequest {
                id: &id,
                side: OLD,
                routed_owner: OLD,
                token: &token,
            })
            .await;
        match r {
            Err(e @ StoreError::Unavailable(_)) => assert!(e.is_retryable()),
            other => panic!("claim without redis must fail as unavailable, got {other:?}"),
        }
    }
    // When Redis returns, claims work again without a new client.
    redis.restart();
    let ok = common::eventually(Duration::from_secs(10), || {
        let arbiter = arbiter.clone();
        let token = tokens.next();
        async move {
            let r = arbiter
                .claim(&ClaimRequest {
                    id: "after",
                    side: OLD,
                    routed_owner: OLD,
                    token: &token,
                })
                .await;
            matches!(r, Ok(Claim::Proceed { .. }))
        }
    })
    .await;
    assert!(
        ok.is_some(),
        "the arbiter did not reconnect after redis came back"
    );
}
