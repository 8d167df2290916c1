//! The Lua scripts on real Redis against the pure model (`src/arbiter/model.rs`): random
//! histories of claims, completions, renewals, releases and lease expiries, applied to both;
//! every answer and the stored record after every step must match.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use mq_cutover::arbiter::model::{self, Params, Rec};
use mq_cutover::arbiter::{
    record_key, Arbiter, Claim, ClaimRequest, CompleteRequest, LeaseToken, LeaseTokens, Outcome,
    State,
};
use mq_cutover::config::{AmbiguousPolicy, RedisMode};
use mq_cutover::store::Store;

use crate::common;

const LEASE: Duration = Duration::from_secs(60);
const SIDES: [&str; 2] = ["kafka", "rocketmq"];

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Busy's time left depends on the clock of the moment: compare only that it is Busy.
fn normalise(c: Claim) -> Claim {
    match c {
        Claim::Busy { .. } => Claim::Busy {
            retry_in: Duration::ZERO,
        },
        other => other,
    }
}

/// The record as Redis holds it, in the model's shape.
async fn stored(store: &Store, prefix: &str, id: &str) -> Option<Rec> {
    let mut conn = store.conn();
    let fields: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(record_key(prefix, id))
        .query_async(&mut conn)
        .await
        .unwrap();
    if fields.is_empty() {
        return None;
    }
    let mut r = Rec::new("");
    for (k, v) in fields {
        match k.as_str() {
            "o" => r.owner = v,
            "s" => {
                r.state = match v.as_str() {
                    "p" => State::Pending,
                    "i" => State::InFlight,
                    "d" => State::Done,
                    "x" => State::Dead,
                    other => panic!("state {other}"),
                }
            }
            "t" => r.token = Some(v),
            "e" => r.expiry = Some(v.parse().unwrap()),
            "a" => r.attempts = v.parse().unwrap(),
            "m" => r.ambiguous = v.parse().unwrap(),
            "v" => r.overlaps = v.parse().unwrap(),
            "r" => r.reason = Some(v),
            "f" => {}
            s if s.starts_with('@') => {
                r.seen.insert(s[1..].to_owned());
            }
            other => panic!("unexpected field {other}"),
        }
    }
    Some(r)
}

/// Expiry instants come from two clocks; compare their presence, not their value.
fn comparable(r: Option<Rec>) -> Option<Rec> {
    r.map(|mut r| {
        r.expiry = r.expiry.map(|_| 0);
        r
    })
}

async fn replay(mode: RedisMode, seed: u64, histories: usize) {
    let prefix = common::unique_prefix(&format!("model-{seed}"));
    let store = common::connect(mode, &prefix).await;
    let mut rng = StdRng::seed_from_u64(seed);
    for h in 0..histories {
        let policy = if rng.random_bool(0.5) {
            AmbiguousPolicy::AtLeastOnce
        } else {
            AmbiguousPolicy::AtMostOnce
        };
        let max_attempts = rng.random_range(1..=4);
        let arbiter = Arbiter::new(&store, &common::arbiter_config(LEASE, policy, max_attempts));
        let p = Params {
            lease_ms: LEASE.as_millis() as u64,
            policy,
            max_attempts,
        };
        let tokens = LeaseTokens::default();
        let id = format!("h{h}");
        let mut rec: Option<Rec> = None;
        // Up to three workers; each remembers the token and side of the claim it holds.
        let mut held: [Option<(LeaseToken, &str)>; 3] = Default::default();
        for step in 0..rng.random_range(5..40) {
            let what = rng.random_range(0..100);
            let context =
                format!("seed {seed} history {h} step {step} ({policy:?}, max {max_attempts})");
            if what < 40 {
                let w = rng.random_range(0..3);
                let side = SIDES[rng.random_range(0..2)];
                let routed = SIDES[rng.random_range(0..2)];
                // Now and then a worker re-sends its own claim with the same token.
                let token = match &held[w] {
                    Some((t, s)) if *s == side && rng.random_bool(0.1) => t.clone(),
                    _ => tokens.next(),
                };
                let got = arbiter
                    .claim(&ClaimRequest {
                        id: &id,
                        side,
                        routed_owner: routed,
                        token: &token,
                    })
                    .await
                    .unwrap();
                let want = model::claim(&mut rec, side, routed, token.as_str(), now_ms(), p);
                assert_eq!(normalise(got.clone()), normalise(want), "claim: {context}");
                if matches!(got, Claim::Proceed { .. }) {
                    held[w] = Some((token, side));
                }
            } else if what < 75 {
                let w = rng.random_range(0..3);
                let Some((token, side)) = held[w].clone() else {
                    continue;
                };
                let outcome = match rng.random_range(0..5) {
                    0 => Outcome::Success,
                    1 => Outcome::Retryable("HTTP 503".into()),
                    2 => Outcome::Fatal("HTTP 400".into()),
                    3 => Outcome::NotCalled,
                    _ => Outcome::Ambiguous("timeout".into()),
                };
                let got = arbiter
                    .complete(&CompleteRequest {
                        id: &id,
                        side,
                        token: &token,
                        outcome: &outcome,
                    })
                    .await
                    .unwrap();
                let want = model::complete(&mut rec, side, token.as_str(), &outcome, p);
                assert_eq!(got, want, "complete {outcome:?}: {context}");
                if rng.random_bool(0.7) {
                    held[w] = None; // most workers move on; some complete twice
                }
            } else if what < 85 {
                let w = rng.random_range(0..3);
                let Some((token, _)) = held[w].clone() else {
                    continue;
                };
                let got = arbiter.renew(&id, &token).await.unwrap();
                let want = model::renew(&mut rec, token.as_str(), now_ms(), p);
                assert_eq!(got, want, "renew: {context}");
            } else if what < 92 {
                // The lease runs out: move the expiry into the past on both.
                if let Some(r) = rec.as_mut().filter(|r| r.state == State::InFlight) {
                    r.expiry = Some(0);
                    let mut conn = store.conn();
                    let _: () = redis::cmd("HSET")
                        .arg(record_key(&prefix, &id))
                        .arg("e")
                        .arg(0)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                }
            } else {
                let got = arbiter.release(&id).await.unwrap();
                let want = model::release(&mut rec);
                assert_eq!(got, want, "release: {context}");
            }
            assert_eq!(
                comparable(stored(&store, &prefix, &id).await),
                comparable(rec.clone()),
                "stored record: {context}"
            );
        }
    }
    let urls = match mode {
        RedisMode::Standalone => vec![common::redis_url()],
        RedisMode::Cluster => common::cluster_urls(),
    };
    common::cleanup(&urls, &prefix);
}

#[tokio::test]
async fn lua_scripts_match_the_model_on_random_histories() {
    for seed in 1..=3 {
        replay(RedisMode::Standalone, seed, 150).await;
    }
}

#[tokio::test]
async fn lua_scripts_match_the_model_on_redis_cluster() {
    replay(RedisMode::Cluster, 11, 150).await;
}
