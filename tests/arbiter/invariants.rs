//! The invariants of DESIGN.md under real concurrency against real Redis: two sides × four
//! workers race over many ids, each id offered one to three times per side, with random retryable
//! failures, ambiguous outcomes (half of them "granted, then timed out"), workers that crash
//! holding a lease (half of them after granting), and the percentage flipping between 0 and 100
//! every few milliseconds through the real switches. A simulated downstream counts grants.
//!
//! Afterwards: never two live calls on one id; every id done or dead; each id's owner never
//! changed; nobody but the owner ever proceeded; done = ids − dead; a grant happened twice only
//! where an ambiguity was counted (at least once), or never (at most once).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use mq_cutover::arbiter::routing::{route, Route};
use mq_cutover::arbiter::switches::{self, SwitchChange, SwitchStore};
use mq_cutover::arbiter::{
    Arbiter, Claim, ClaimRequest, CompleteRequest, Completion, LeaseTokens, Outcome, State,
};
use mq_cutover::config::{AmbiguousPolicy, Percent, RedisMode};
use tokio_util::sync::CancellationToken;

use crate::common;

use crate::common::SIDES;
const WORKERS_PER_SIDE: usize = 4;
const LEASE: Duration = Duration::from_millis(1500);
const MAX_ATTEMPTS: u32 = 3;

/// What the simulation saw of one id.
#[derive(Default)]
struct Track {
    /// A call is in flight right now (set on PROCEED, cleared when the call ends).
    in_flight: AtomicBool,
    /// Bit per side: which sides got PROCEED.
    proceeded: AtomicU8,
    /// Bit per side: every owner any reply implied (PROCEED ⇒ this side, NOT_MINE ⇒ its owner).
    owners: AtomicU8,
    /// Successful grants made by the simulated downstream.
    grants: AtomicU32,
}

struct Shared {
    arbiter: Arbiter,
    tokens: LeaseTokens,
    tracks: Vec<Track>,
    queues: [Mutex<VecDeque<u32>>; 2],
    /// Copies not yet acknowledged, on both sides.
    outstanding: AtomicUsize,
    /// PROCEEDs granted while another call on the id was live.
    violations: AtomicUsize,
    /// Unexpected replies (fenced / late / repeated completions of live leases).
    anomalies: Mutex<Vec<String>>,
    policy: AmbiguousPolicy,
}

fn side_bit(side: usize) -> u8 {
    1 << side
}

fn side_index(name: &str) -> usize {
    SIDES.iter().position(|s| *s == name).expect("known side")
}

fn id_name(i: u32) -> String {
    format!("id-{i}")
}

/// Runs the whole simulation and checks every invariant. Returns a one-line summary.
pub async fn run(mode: RedisMode, policy: AmbiguousPolicy, seed: u64, ids: u32) -> String {
    let prefix = common::unique_prefix(&format!("inv-{seed}"));
    let store = common::connect(mode, &prefix).await;
    let arbiter = Arbiter::new(&store, &common::arbiter_config(LEASE, policy, MAX_ATTEMPTS));
    let mut rng = StdRng::seed_from_u64(seed);

    // 1-3 copies of every id on each side, shuffled independently.
    let mut copies: [Vec<u32>; 2] = [Vec::new(), Vec::new()];
    for side in copies.iter_mut() {
        for id in 0..ids {
            for _ in 0..rng.random_range(1..=3) {
                side.push(id);
            }
        }
        side.shuffle(&mut rng);
    }
    let total = copies[0].len() + copies[1].len();
    let shared = Arc::new(Shared {
        arbiter,
        tokens: LeaseTokens::default(),
        tracks: (0..ids).map(|_| Track::default()).collect(),
        queues: copies.map(|c| Mutex::new(c.into())),
        outstanding: AtomicUsize::new(total),
        violations: AtomicUsize::new(0),
        anomalies: Mutex::new(Vec::new()),
        policy,
    });

    // The real switches, flipped 0 ↔ 100 every few ms, followed by the real watcher.
    let switch_store = SwitchStore::new(&store);
    switch_store
        .set(
            &SwitchChange {
                consume: Some(true),
                percent: Some(Percent::default()),
                whitelist: None,
            },
            "test",
        )
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let (feed, _follower) = switches::follow(
        switch_store.clone(),
        Duration::from_millis(20),
        stop.clone(),
    );
    feed.clone()
        .wait_for(|s| s.is_some())
        .await
        .expect("switch follower running");
    let flipper = tokio::spawn({
        let stop = stop.clone();
        let store = switch_store.clone();
        async move {
            let mut flips = 0u32;
            let mut hundred = false;
            while !stop.is_cancelled() {
                hundred = !hundred;
                let p = if hundred {
                    Percent::ALL
                } else {
                    Percent::default()
                };
                let change = SwitchChange {
                    percent: Some(p),
                    ..Default::default()
                };
                if store.set(&change, "flipper").await.is_ok() {
                    flips += 1;
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            flips
        }
    });

    let started = Instant::now();
    let mut workers = Vec::new();
    for side in 0..2 {
        for w in 0..WORKERS_PER_SIDE {
            let shared = shared.clone();
            let feed = feed.clone();
            let seed = seed ^ ((side * 16 + w) as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            // Half the workers claim one id at a time, half in batches.
            let batch = if w % 2 == 0 { 1 } else { 16 };
            workers.push(tokio::spawn(worker(shared, feed, side, batch, seed)));
        }
    }
    for w in workers {
        w.await.expect("worker panicked");
    }
    stop.cancel();
    let flips = flipper.await.unwrap();
    let elapsed = started.elapsed();

    // Check every id's final record against what the workers saw.
    let records: Vec<_> = futures::stream::iter(0..ids)
        .map(|i| {
            let arbiter = shared.arbiter.clone();
            async move { (i, arbiter.inspect(&id_name(i)).await) }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let (mut done, mut dead, mut doubles, mut ambiguous_ids) = (0u32, 0u32, 0u32, 0u32);
    let mut owned = [0u32; 2];
    let mut failures = Vec::new();
    for (i, rec) in records {
        let rec = rec
            .expect("inspect")
            .unwrap_or_else(|| panic!("{} has no record", id_name(i)));
        let t = &shared.tracks[i as usize];
        let owner = side_index(&rec.owner);
        owned[owner] += 1;
        let (proceeded, owners, grants) = (
            t.proceeded.load(Ordering::Relaxed),
            t.owners.load(Ordering::Relaxed),
            t.grants.load(Ordering::Relaxed),
        );
        match rec.state {
            State::Done => done += 1,
            State::Dead => dead += 1,
            other => failures.push(format!("{}: ended {other}", rec.id)),
        }
        if owners != side_bit(owner) {
            failures.push(format!(
                "{}: owners seen {owners:#b}, stored owner {}",
                rec.id, rec.owner
            ));
        }
        if proceeded & !side_bit(owner) != 0 {
            failures.push(format!(
                "{}: a non-owner proceeded ({proceeded:#b})",
                rec.id
            ));
        }
        if rec.state == State::Done && grants == 0 {
            failures.push(format!("{}: done without a grant", rec.id));
        }
        if rec.ambiguous > 0 {
            ambiguous_ids += 1;
        }
        if grants > 1 {
            doubles += 1;
        }
        match policy {
            AmbiguousPolicy::AtLeastOnce => {
                if grants > 1 + rec.ambiguous + rec.overlaps {
                    failures.push(format!(
                        "{}: {grants} grants but only {} ambiguous + {} overlaps counted",
                        rec.id, rec.ambiguous, rec.overlaps
                    ));
                }
            }
            AmbiguousPolicy::AtMostOnce => {
                if grants > 1 {
                    failures.push(format!(
                        "{}: granted {grants} times under at_most_once",
                        rec.id
                    ));
                }
                if rec.ambiguous > 0
                    && !(rec.state == State::Dead
                        && rec
                            .reason
                            .as_deref()
                            .is_some_and(|r| r.starts_with("in doubt")))
                {
                    failures.push(format!("{}: ambiguous but not parked in doubt", rec.id));
                }
            }
        }
    }
    common::cleanup(&common::testbed_urls(mode), &prefix);
    let anomalies = shared.anomalies.lock().unwrap().clone();
    let violations = shared.violations.load(Ordering::Relaxed);
    let summary = format!(
        "{mode:?} {policy:?} seed {seed}: {ids} ids, {total} copies in {elapsed:.1?}; \
         done {done}, dead {dead}; owned {owned:?}; {ambiguous_ids} ids with ambiguity, \
         {doubles} granted twice or more; {flips} switch flips"
    );
    eprintln!("{summary}");
    assert_eq!(violations, 0, "two live calls on one id: {summary}");
    assert!(
        anomalies.is_empty(),
        "{} anomalies, e.g. {:?}",
        anomalies.len(),
        &anomalies[..anomalies.len().min(5)]
    );
    assert!(
        failures.is_empty(),
        "{} failures, e.g. {:?}\n{summary}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert_eq!(done, ids - dead, "{summary}");
    assert!(
        dead > 0,
        "the mix should park some ids (exhausted / in doubt): {summary}"
    );
    // The flips must actually have split ownership, or the test proved little.
    assert!(
        owned[0] > ids / 10 && owned[1] > ids / 10,
        "owners not mixed: {summary}"
    );
    assert!(flips > 10, "{summary}");
    summary
}

async fn worker(
    shared: Arc<Shared>,
    feed: switches::SwitchFeed,
    side: usize,
    batch: usize,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let name = SIDES[side];
    loop {
        let taken: Vec<u32> = {
            let mut q = shared.queues[side].lock().unwrap();
            let n = batch.min(q.len());
            q.drain(..n).collect()
        };
        if taken.is_empty() {
            if shared.outstanding.load(Ordering::Acquire) == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let switches = feed.borrow().clone().expect("switches loaded");
        let names: Vec<String> = taken.iter().map(|&i| id_name(i)).collect();
        let tokens: Vec<_> = taken.iter().map(|_| shared.tokens.next()).collect();
        // The business id is the message id here; route() decides from this worker's view.
        let routed: Vec<&str> = names
            .iter()
            .map(|n| match route(&switches, n) {
                Route::Old => SIDES[0],
                Route::New => SIDES[1],
            })
            .collect();
        let reqs: Vec<ClaimRequest> = (0..taken.len())
            .map(|k| ClaimRequest {
                id: &names[k],
                side: name,
                routed_owner: routed[k],
                token: &tokens[k],
            })
            .collect();
        let claims = shared
            .arbiter
            .claim_batch(&reqs)
            .await
            .expect("claim batch");

        let mut outcomes: Vec<(usize, Outcome)> = Vec::new();
        let mut requeue = Vec::new();
        let mut acked = 0usize;
        let mut busy = false;
        for (k, claim) in claims.into_iter().enumerate() {
            let id = taken[k];
            let t = &shared.tracks[id as usize];
            match claim.expect("claim") {
                Claim::Proceed { .. } => {
                    t.proceeded.fetch_or(side_bit(side), Ordering::Relaxed);
                    t.owners.fetch_or(side_bit(side), Ordering::Relaxed);
                    if t.in_flight.swap(true, Ordering::AcqRel) {
                        shared.violations.fetch_add(1, Ordering::Relaxed);
                    }
                    let roll: f64 = rng.random();
                    if rng.random_ratio(1, 10) {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    if roll < 0.08 {
                        outcomes.push((k, Outcome::Retryable("HTTP 503".into())));
                    } else if roll < 0.12 {
                        if rng.random_bool(0.5) {
                            t.grants.fetch_add(1, Ordering::Relaxed); // committed, then timed out
                        }
                        outcomes.push((k, Outcome::Ambiguous("timeout".into())));
                    } else if roll < 0.125 {
                        // Crash while holding the lease: no completion; the broker redelivers.
                        if rng.random_bool(0.5) {
                            t.grants.fetch_add(1, Ordering::Relaxed);
                        }
                        t.in_flight.store(false, Ordering::Release);
                        requeue.push(id);
                        continue;
                    } else {
                        t.grants.fetch_add(1, Ordering::Relaxed);
                        outcomes.push((k, Outcome::Success));
                    }
                    // The call is over before its outcome is recorded.
                    t.in_flight.store(false, Ordering::Release);
                }
                Claim::NotMine { owner, .. } => {
                    t.owners
                        .fetch_or(side_bit(side_index(&owner)), Ordering::Relaxed);
                    acked += 1;
                }
                Claim::Done | Claim::Dead { .. } => acked += 1,
                Claim::Busy { .. } => {
                    busy = true;
                    requeue.push(id);
                }
            }
        }
        if !outcomes.is_empty() {
            let reqs: Vec<CompleteRequest> = outcomes
                .iter()
                .map(|(k, o)| CompleteRequest {
                    id: &names[*k],
                    side: name,
                    token: &tokens[*k],
                    outcome: o,
                })
                .collect();
            let done = shared
                .arbiter
                .complete_batch(&reqs)
                .await
                .expect("complete batch");
            for ((k, outcome), c) in outcomes.iter().zip(done) {
                let c = c.expect("complete");
                let expected_ok = match (outcome, c) {
                    (Outcome::Success, Completion::Recorded(State::Done)) => true,
                    (_, Completion::Recorded(State::Pending)) => {
                        requeue.push(taken[*k]); // the owner retries: the copy stays unacked
                        true
                    }
                    (_, Completion::Recorded(State::Dead)) => true,
                    _ => false,
                };
                if expected_ok {
                    if !matches!(c, Completion::Recorded(State::Pending)) {
                        acked += 1;
                    }
                } else {
                    shared.anomalies.lock().unwrap().push(format!(
                        "{}: {outcome:?} -> {c:?} (policy {:?})",
                        names[*k], shared.policy
                    ));
                    acked += 1;
                }
            }
        }
        if !requeue.is_empty() {
            shared.queues[side].lock().unwrap().extend(requeue);
        }
        shared.outstanding.fetch_sub(acked, Ordering::AcqRel);
        if busy {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}
