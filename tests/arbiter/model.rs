//! The Lua scripts on real Redis against the pure model (`src/arbiter/model.rs`): random
//! histories of claims, completions, renewals, releases and lease expiries, applied to both;
//! every answer and the stored record after every step must match.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use mq_cutover::arbiter::model::{self, Params, Rec};
use mq_cutover::arbiter::{
    record_key, Adopt, AdoptRequest, Arbiter, Claim, ClaimRequest, CompleteRequest, LeaseToken,
    LeaseTokens, Outcome, State,
};
use mq_cutover::config::{AmbiguousPolicy, RecordLayout, RedisMode};
use mq_cutover::store::Store;

use crate::common;

const LEASE: Duration = Duration::from_secs(60);
use crate::common::SIDES;

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

/// The same for adoption's waits.
fn normalise_adopt(a: Adopt) -> Adopt {
    match a {
        Adopt::Busy { .. } => Adopt::Busy {
            retry_in: Duration::ZERO,
        },
        Adopt::NotYet { .. } => Adopt::NotYet {
            wait: Duration::ZERO,
        },
        other => other,
    }
}

/// The record's first sighting (`f`, ms by Redis's clock), if it has a record.
async fn first_seen(store: &Store, prefix: &str, id: &str) -> Option<u64> {
    let (_, fields) = common::raw_record(store, &record_key(prefix, id)).await?;
    fields
        .into_iter()
        .find(|(k, _)| k == "f")
        .map(|(_, v)| v.parse().unwrap())
}

/// The record as Redis holds it (either layout, read with plain commands), in the model's shape.
async fn stored(store: &Store, prefix: &str, id: &str) -> Option<Rec> {
    let (_, fields) = common::raw_record(store, &record_key(prefix, id)).await?;
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
            "@^a" => r.adopted = true,
            "@^l" => r.letter = true,
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

/// Moves the lease expiry of `id` into the past, as if the lease had run out.
async fn expire_lease(store: &Store, prefix: &str, id: &str) {
    common::set_record_field(store, &record_key(prefix, id), "e", "0").await;
}

fn clean_up(mode: RedisMode, prefix: &str) {
    let urls = common::testbed_urls(mode);
    common::cleanup(&urls, prefix);
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
        let layout = if rng.random_bool(0.5) {
            RecordLayout::Packed
        } else {
            RecordLayout::Hash
        };
        let mut cfg = common::arbiter_config(LEASE, policy, max_attempts);
        cfg.record_layout = layout;
        let arbiter = Arbiter::new(&store, &cfg);
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
            let context = format!(
                "seed {seed} history {h} step {step} ({policy:?}, max {max_attempts}, {layout:?})"
            );
            if what < 36 {
                let w = rng.random_range(0..3);
                let side = SIDES[rng.random_range(0..2)];
                let routed = SIDES[rng.random_range(0..2)];
                // Now and then a worker re-sends its own claim with the same token.
                let token = match &held[w] {
                    Some((t, s)) if *s == side && rng.random_bool(0.1) => t.clone(),
                    _ => tokens.next(),
                };
                let (got, seen) = arbiter
                    .claim_batch_sighted(&[ClaimRequest {
                        id: &id,
                        side,
                        routed_owner: routed,
                        token: &token,
                    }])
                    .await
                    .unwrap()
                    .pop()
                    .unwrap()
                    .unwrap();
                assert_eq!(seen, model::sighting(&rec, side), "sighting: {context}");
                let want = model::claim(&mut rec, side, routed, token.as_str(), now_ms(), p);
                assert_eq!(normalise(got.clone()), normalise(want), "claim: {context}");
                if matches!(got, Claim::Proceed { .. }) {
                    held[w] = Some((token, side));
                }
            } else if what < 64 {
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
            } else if what < 72 {
                let w = rng.random_range(0..3);
                let Some((token, _)) = held[w].clone() else {
                    continue;
                };
                let got = arbiter.renew(&id, &token).await.unwrap();
                let want = model::renew(&mut rec, token.as_str(), now_ms(), p);
                assert_eq!(got, want, "renew: {context}");
            } else if what < 78 {
                // The lease runs out: move the expiry into the past on both.
                if let Some(r) = rec.as_mut().filter(|r| r.state == State::InFlight) {
                    r.expiry = Some(0);
                    expire_lease(&store, &prefix, &id).await;
                }
            } else if what < 82 {
                let got = arbiter.release(&id).await.unwrap();
                let want = model::release(&mut rec);
                assert_eq!(got, want, "release: {context}");
            } else if what < 86 {
                let got = arbiter.letter_written(&id).await.unwrap();
                let want = model::letter_written(&mut rec);
                assert_eq!(got, want, "letter: {context}");
            } else if what < 90 {
                // Time passes beyond `adopt_after` (60 s) since the first sighting.
                if let Some(f) = first_seen(&store, &prefix, &id).await {
                    let aged = f.saturating_sub(61_000).to_string();
                    common::set_record_field(&store, &record_key(&prefix, &id), "f", &aged).await;
                }
            } else {
                let w = rng.random_range(0..3);
                let side = SIDES[rng.random_range(0..2)];
                let token = tokens.next();
                let first = first_seen(&store, &prefix, &id).await.unwrap_or(0);
                let got = arbiter
                    .adopt_batch(&[AdoptRequest {
                        id: &id,
                        side,
                        token: &token,
                    }])
                    .await
                    .unwrap()
                    .pop()
                    .unwrap()
                    .unwrap();
                let want = model::adopt(&mut rec, side, token.as_str(), now_ms(), first, 60_000, p);
                assert_eq!(
                    normalise_adopt(got.clone()),
                    normalise_adopt(want),
                    "adopt: {context}"
                );
                if matches!(got, Adopt::Proceed { .. }) {
                    held[w] = Some((token, side));
                }
            }
            assert_eq!(
                comparable(stored(&store, &prefix, &id).await),
                comparable(rec.clone()),
                "stored record: {context}"
            );
        }
    }
    clean_up(mode, &prefix);
}

/// Batches as the pipeline sends them — one script call for many claims or many completions, the
/// same id possibly more than once in a batch — against the model applied one request at a time.
async fn replay_batches(mode: RedisMode, seed: u64, rounds: usize) {
    let prefix = common::unique_prefix(&format!("model-batch-{seed}"));
    let store = common::connect(mode, &prefix).await;
    let mut rng = StdRng::seed_from_u64(seed);
    let policy = if seed.is_multiple_of(2) {
        AmbiguousPolicy::AtMostOnce
    } else {
        AmbiguousPolicy::AtLeastOnce
    };
    let max_attempts = 3;
    // Seeds 21 and 22 (and the Cluster's 25) write packed records, 23 and 24 hash records.
    let mut cfg = common::arbiter_config(LEASE, policy, max_attempts);
    if seed == 23 || seed == 24 {
        cfg.record_layout = RecordLayout::Hash;
    }
    let layout = cfg.record_layout;
    let arbiter = Arbiter::new(&store, &cfg);
    let p = Params {
        lease_ms: LEASE.as_millis() as u64,
        policy,
        max_attempts,
    };
    let tokens = LeaseTokens::default();
    let ids: Vec<String> = (0..6).map(|i| format!("b{i}")).collect();
    let mut recs: Vec<Option<Rec>> = vec![None; ids.len()];
    // Leases granted and not yet completed: (id index, side, token).
    let mut held: Vec<(usize, &str, LeaseToken)> = Vec::new();
    for round in 0..rounds {
        let context = format!("seed {seed} round {round} ({policy:?}, {layout:?})");
        if held.is_empty() || rng.random_bool(0.5) {
            let n = rng.random_range(1..=12);
            let picks: Vec<(usize, &str, &str, LeaseToken)> = (0..n)
                .map(|_| {
                    let i = rng.random_range(0..ids.len());
                    let side = SIDES[rng.random_range(0..2)];
                    let token = match held.iter().find(|(h, s, _)| *h == i && *s == side) {
                        Some((_, _, t)) if rng.random_bool(0.2) => t.clone(),
                        _ => tokens.next(),
                    };
                    (i, side, SIDES[rng.random_range(0..2)], token)
                })
                .collect();
            let reqs: Vec<ClaimRequest> = picks
                .iter()
                .map(|(i, side, routed, token)| ClaimRequest {
                    id: &ids[*i],
                    side,
                    routed_owner: routed,
                    token,
                })
                .collect();
            let got = arbiter.claim_batch_sighted(&reqs).await.unwrap();
            assert_eq!(got.len(), picks.len(), "{context}");
            for (k, ((i, side, routed, token), answer)) in picks.iter().zip(got).enumerate() {
                let (claim, seen) = answer.unwrap();
                assert_eq!(
                    seen,
                    model::sighting(&recs[*i], side),
                    "sighting {k}: {context}"
                );
                let want = model::claim(&mut recs[*i], side, routed, token.as_str(), now_ms(), p);
                assert_eq!(
                    normalise(claim.clone()),
                    normalise(want),
                    "claim {k}: {context}"
                );
                if matches!(claim, Claim::Proceed { .. })
                    && !held.iter().any(|(_, _, t)| t == token)
                {
                    held.push((*i, side, token.clone()));
                }
            }
        } else {
            let n = rng.random_range(1..=held.len().min(8));
            // Mostly leases still held; now and then one completed twice or a lost one.
            let picks: Vec<(usize, &str, LeaseToken, Outcome)> = (0..n)
                .map(|_| {
                    let (i, side, token) = held[rng.random_range(0..held.len())].clone();
                    let outcome = match rng.random_range(0..5) {
                        0 | 1 => Outcome::Success,
                        2 => Outcome::Retryable("HTTP 503".into()),
                        3 => Outcome::Fatal("HTTP 400".into()),
                        _ => Outcome::Ambiguous("timeout".into()),
                    };
                    (i, side, token, outcome)
                })
                .collect();
            let reqs: Vec<CompleteRequest> = picks
                .iter()
                .map(|(i, side, token, outcome)| CompleteRequest {
                    id: &ids[*i],
                    side,
                    token,
                    outcome,
                })
                .collect();
            let got = arbiter.complete_batch(&reqs).await.unwrap();
            for (k, ((i, side, token, outcome), answer)) in picks.iter().zip(got).enumerate() {
                let want = model::complete(&mut recs[*i], side, token.as_str(), outcome, p);
                assert_eq!(answer.unwrap(), want, "complete {k} {outcome:?}: {context}");
            }
            held.retain(|(_, _, t)| !picks.iter().any(|(_, _, done, _)| done == t));
        }
        if rng.random_bool(0.1) {
            // A lease runs out: its expiry moves into the past on both.
            if let Some(i) = (0..ids.len())
                .find(|&i| recs[i].as_ref().is_some_and(|r| r.state == State::InFlight))
            {
                recs[i].as_mut().unwrap().expiry = Some(0);
                expire_lease(&store, &prefix, &ids[i]).await;
            }
        }
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(
                comparable(stored(&store, &prefix, id).await),
                comparable(recs[i].clone()),
                "stored record of {id}: {context}"
            );
        }
    }
    clean_up(mode, &prefix);
}

#[tokio::test]
async fn batched_scripts_match_the_model_applied_one_by_one() {
    for seed in 21..=24 {
        replay_batches(RedisMode::Standalone, seed, 300).await;
    }
}

#[tokio::test]
async fn batched_scripts_match_the_model_on_redis_cluster() {
    replay_batches(RedisMode::Cluster, 25, 150).await;
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
