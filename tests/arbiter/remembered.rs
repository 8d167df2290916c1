//! The pipeline's memory of decided ids (`pipeline.remember_ids`) on real Redis: the other side's
//! copy of an id this instance claimed first is acknowledged without a claim, and Redis ends up as
//! the claim would have left it (both parity marks, the TTL); the memory is forgotten when Redis
//! fails; and with several instances, both sides, redeliveries and the percentage moving while the
//! copies flow, every id is still called exactly once, never twice at once.

use std::sync::Arc;
use std::time::Duration;

use mq_cutover::arbiter::switches::Switches;
use mq_cutover::arbiter::{
    record_key, Arbiter, ClaimRequest, CompleteRequest, LeaseTokens, Outcome, Sighting,
};
use mq_cutover::config::Percent;
use mq_cutover::config::{AmbiguousPolicy, RedisMode};
use mq_cutover::message::{Finished, Side};
use mq_cutover::pipeline::decided_created;
use mq_cutover::pipeline::Shared;
use mq_cutover::store::Store;
use mq_cutover::telemetry::metrics::Metrics;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;

use super::common;
use super::pipelined::{copy, instance, start_side, CountingSink, Instance};

fn sides() -> (Side, Side) {
    ("kafka".into(), "rocketmq".into())
}

/// Runs `side`'s pipeline over copies `ids` until every one is acknowledged, then stops it.
async fn pass(shared: &Arc<Shared>, side: &Side, ids: std::ops::Range<i64>) {
    let (acks_tx, mut acks_rx) = mpsc::unbounded_channel::<Finished>();
    let (tx, rx) = mpsc::channel(1024);
    let (cancel, tracker, pipeline) = start_side(shared, side, rx);
    let n = ids.end - ids.start;
    let feeding = {
        let (side, acks_tx) = (side.clone(), acks_tx.clone());
        tokio::spawn(async move {
            for i in ids {
                tx.send(copy(&side, i, &acks_tx)).await.unwrap();
            }
            tx
        })
    };
    for _ in 0..n {
        tokio::time::timeout(Duration::from_secs(20), acks_rx.recv())
            .await
            .expect("every copy acknowledged in time")
            .expect("ack channel open");
    }
    let tx = feeding.await.unwrap();
    cancel.cancel();
    pipeline.await.unwrap();
    tracker.close();
    tracker.wait().await;
    drop(tx);
}

fn remembered(metrics: &Metrics, side: &str) -> u64 {
    metrics.side(side).remembered.get()
}

fn observed(metrics: &Metrics, side: &str) -> u64 {
    metrics.side(side).parity_observed.get()
}

fn fate(metrics: &Metrics, side: &str, label: &str) -> u64 {
    metrics
        .snapshot(side)
        .messages
        .iter()
        .find(|(l, _)| *l == label)
        .expect("a fate label")
        .1
}

/// The memory trusts a claim's reply to say whether that claim created the record (a first sight
/// that proceeds or is not the side's): checked here against every other way a claim can meet a
/// record on real Redis, the record a late completion wrote (no marks at all) included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_claim_that_creates_a_record_reads_as_created() {
    let prefix = common::unique_prefix("remembered-created");
    let store = common::connect(RedisMode::Standalone, &prefix).await;
    let arbiter = Arbiter::new(
        &store,
        &common::arbiter_config(Duration::from_secs(5), AmbiguousPolicy::AtLeastOnce, 5),
        common::SIDES,
    );
    let tokens = LeaseTokens::default();
    let claim = |id: &'static str, side: &'static str, routed: &'static str| {
        let arbiter = arbiter.clone();
        let token = tokens.next();
        async move {
            let req = ClaimRequest {
                id,
                side,
                routed_owner: routed,
                token: &token,
            };
            let (c, s) = arbiter
                .claim_batch_sighted(&[req])
                .await
                .unwrap()
                .pop()
                .unwrap()
                .unwrap();
            (decided_created(&c, s), c, s, token)
        }
    };
    let complete = |id: &'static str, side: &'static str, token| {
        let arbiter = arbiter.clone();
        async move {
            let req = CompleteRequest {
                id,
                side,
                token: &token,
                outcome: &Outcome::Success,
            };
            arbiter.complete(&req).await.unwrap()
        }
    };

    // Kafka sees it first and owns it; then every other claim of it.
    let (created, _, _, token) = claim("c-1", "kafka", "kafka").await;
    assert!(created);
    assert!(!claim("c-1", "kafka", "kafka").await.0, "busy redelivery");
    assert!(!claim("c-1", "rocketmq", "rocketmq").await.0, "the pair");
    complete("c-1", "kafka", token).await;
    for side in ["kafka", "rocketmq"] {
        let (created, c, s, _) = claim("c-1", side, side).await;
        assert!(!created, "{side}: {c:?} {s:?}");
    }
    // Kafka sees it first and routes it away; RocketMQ proceeds.
    assert!(claim("c-2", "kafka", "rocketmq").await.0);
    assert!(!claim("c-2", "rocketmq", "rocketmq").await.0);
    assert!(!claim("c-2", "kafka", "kafka").await.0);
    // A record written by a late completion has an owner and no marks: its first claim is a
    // first sight, of a done id, and did not create it.
    let late = tokens.next();
    complete("c-3", "kafka", late).await;
    let (created, c, s, _) = claim("c-3", "rocketmq", "rocketmq").await;
    assert_eq!(s, Sighting::First);
    assert!(!created, "{c:?}");
    common::cleanup(&[common::redis_url()], &prefix);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_other_sides_copy_is_answered_from_memory_and_redis_ends_as_its_claim_would_leave_it() {
    const N: i64 = 300;
    let prefix = common::unique_prefix("remembered");
    let cfg = common::offline_config(&common::redis_url(), &prefix, "claim_batch = 16");
    let store = Store::connect(&cfg.redis, false)
        .await
        .expect("the test Redis (scripts/testbed up) answers");
    let sink = Arc::new(CountingSink::default());
    let Instance {
        shared,
        metrics,
        stop,
        _switches,
    } = instance(&cfg, &store, 50, sink.clone());
    let (kafka, rocketmq) = sides();

    // Kafka first: it creates every record, calls the ids routed to it, and acks the rest.
    pass(&shared, &kafka, 0..N).await;
    let kafka_owned = sink.state.lock().unwrap().calls.len() as u64;
    assert!(kafka_owned > N as u64 / 4 && kafka_owned < 3 * N as u64 / 4);
    assert_eq!(remembered(&metrics, "kafka"), 0);

    // RocketMQ's copies of Kafka's (done) ids are answered from memory; its own are claimed.
    pass(&shared, &rocketmq, 0..N).await;
    {
        let s = sink.state.lock().unwrap();
        assert_eq!(s.calls.len(), N as usize, "every id called");
        assert!(s.calls.values().all(|&c| c == 1), "no id called twice");
    }
    assert_eq!(remembered(&metrics, "rocketmq"), kafka_owned);
    assert_eq!(fate(&metrics, "rocketmq", "duplicate"), kafka_owned);
    assert_eq!(
        fate(&metrics, "rocketmq", "proceed"),
        N as u64 - kafka_owned
    );
    assert_eq!(
        observed(&metrics, "rocketmq"),
        N as u64,
        "each id once a pair"
    );

    // Redis as the claims would have left it: both sides' marks, the TTL of a fresh record.
    let mut conn = store.conn();
    let marked = common::eventually(Duration::from_secs(10), || {
        let mut conn = conn.clone();
        let prefix = prefix.clone();
        async move {
            let mut pipe = redis::pipe();
            for i in 0..N {
                pipe.cmd("HGET")
                    .arg(record_key(&prefix, &format!("pl-{i}")))
                    .arg("@rocketmq");
            }
            let marks: Vec<Option<String>> = pipe.query_async(&mut conn).await.unwrap();
            marks.iter().all(|m| m.as_deref() == Some("1"))
        }
    })
    .await;
    assert!(marked.is_some(), "RocketMQ's mark on every record");
    let mut pipe = redis::pipe();
    for i in 0..N {
        let key = record_key(&prefix, &format!("pl-{i}"));
        pipe.cmd("HGET").arg(&key).arg("@kafka");
        pipe.cmd("PTTL").arg(&key);
    }
    let got: Vec<redis::Value> = pipe.query_async(&mut conn).await.unwrap();
    let retention = cfg.arbiter.retention.as_millis() as i64;
    for pair in got.chunks(2) {
        assert_eq!(pair[0], redis::Value::BulkString(b"1".to_vec()));
        match pair[1] {
            redis::Value::Int(ms) => assert!(ms > retention, "PTTL {ms}"),
            ref other => panic!("PTTL {other:?}"),
        }
    }

    // A redelivery of every Kafka copy: all known, nothing called, not counted again.
    pass(&shared, &kafka, 0..N).await;
    assert_eq!(remembered(&metrics, "kafka"), N as u64);
    assert_eq!(observed(&metrics, "kafka"), N as u64);
    assert_eq!(
        sink.state.lock().unwrap().calls.values().sum::<u32>(),
        N as u32
    );

    // Without the memory, Redis answers the same, and the marks make them redeliveries (not
    // new pairs) for parity.
    shared.decided.as_ref().expect("on by default").forget();
    pass(&shared, &rocketmq, 0..N).await;
    assert_eq!(remembered(&metrics, "rocketmq"), kafka_owned, "claimed");
    assert_eq!(
        fate(&metrics, "rocketmq", "duplicate"),
        kafka_owned + N as u64
    );
    assert_eq!(observed(&metrics, "rocketmq"), N as u64);
    assert_eq!(sink.state.lock().unwrap().most_at_once, 1);

    stop.cancel();
    common::cleanup(&[common::redis_url()], &prefix);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_remember_ids_zero_every_copy_is_claimed() {
    const N: i64 = 100;
    let prefix = common::unique_prefix("remembered-off");
    let cfg = common::offline_config(
        &common::redis_url(),
        &prefix,
        "claim_batch = 16\nremember_ids = 0",
    );
    let store = Store::connect(&cfg.redis, false).await.unwrap();
    let sink = Arc::new(CountingSink::default());
    let inst = instance(&cfg, &store, 50, sink.clone());
    assert!(inst.shared.decided.is_none());
    let (kafka, rocketmq) = sides();
    pass(&inst.shared, &kafka, 0..N).await;
    pass(&inst.shared, &rocketmq, 0..N).await;
    assert_eq!(remembered(&inst.metrics, "rocketmq"), 0);
    assert_eq!(observed(&inst.metrics, "rocketmq"), N as u64);
    assert_eq!(sink.state.lock().unwrap().calls.len(), N as usize);
    inst.stop.cancel();
    common::cleanup(&[common::redis_url()], &prefix);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_redis_call_forgets_everything_remembered() {
    let mut redis = common::PrivateRedis::start();
    let prefix = common::unique_prefix("remembered-lost");
    let cfg = common::offline_config(&redis.url(), &prefix, "claim_batch = 16");
    let store = Store::connect(&cfg.redis, false).await.unwrap();
    let sink = Arc::new(CountingSink::default());
    let inst = instance(&cfg, &store, 50, sink.clone());
    let decided = inst.shared.decided.clone().expect("on by default");
    let (kafka, rocketmq) = sides();
    pass(&inst.shared, &kafka, 0..50).await;
    assert_eq!(decided.len(), 50);

    // Redis goes away (and comes back empty: no persistence). The next claim fails: the memory
    // must not answer for records Redis may have lost.
    redis.stop();
    let (acks_tx, mut acks_rx) = mpsc::unbounded_channel::<Finished>();
    let (tx, rx) = mpsc::channel(16);
    let (cancel, tracker, pipeline) = start_side(&inst.shared, &rocketmq, rx);
    tx.send(copy(&rocketmq, 1_000, &acks_tx)).await.unwrap();
    let forgotten = common::eventually(Duration::from_secs(10), || {
        let decided = decided.clone();
        async move { decided.is_empty() }
    })
    .await;
    assert!(
        forgotten.is_some(),
        "{} ids still remembered",
        decided.len()
    );
    redis.restart();
    tokio::time::timeout(Duration::from_secs(20), acks_rx.recv())
        .await
        .expect("the copy is claimed once Redis is back")
        .unwrap();
    for i in 0..50 {
        tx.send(copy(&rocketmq, i, &acks_tx)).await.unwrap();
    }
    for _ in 0..50 {
        tokio::time::timeout(Duration::from_secs(20), acks_rx.recv())
            .await
            .expect("acknowledged")
            .unwrap();
    }
    assert_eq!(
        remembered(&inst.metrics, "rocketmq"),
        0,
        "all claimed in Redis"
    );
    cancel.cancel();
    pipeline.await.unwrap();
    tracker.close();
    tracker.wait().await;
    inst.stop.cancel();
}

/// Two instances, each running both sides; every id's two copies (and a tenth of them redelivered)
/// go to random instances in a loosely shuffled order, while the percentage moves. Returns how many
/// copies were answered from memory.
async fn two_instances(seed: u64, ids: i64) -> u64 {
    let prefix = common::unique_prefix("remembered-two");
    let cfg = common::offline_config(&common::redis_url(), &prefix, "claim_batch = 32");
    let store = Store::connect(&cfg.redis, false).await.unwrap();
    let sink = Arc::new(CountingSink::default());
    let instances: Vec<Instance> = (0..2)
        .map(|_| instance(&cfg, &store, 50, sink.clone()))
        .collect();
    let (kafka, rocketmq) = sides();
    let mut rng = StdRng::seed_from_u64(seed);

    // The copies, in order of arrival: each id's copies land within a few dozen places of it.
    let mut arrivals: Vec<(f64, usize, Side, i64)> = Vec::new();
    for i in 0..ids {
        for side in [&kafka, &rocketmq] {
            let copies = if rng.random_bool(0.1) { 2 } else { 1 };
            for _ in 0..copies {
                let at = i as f64 + rng.random_range(0.0..40.0);
                arrivals.push((at, rng.random_range(0..2), side.clone(), i));
            }
        }
    }
    arrivals.sort_by(|a, b| a.0.total_cmp(&b.0));

    let (acks_tx, mut acks_rx) = mpsc::unbounded_channel::<Finished>();
    let mut senders = Vec::new();
    let mut running = Vec::new();
    for inst in &instances {
        for side in [&kafka, &rocketmq] {
            let (tx, rx) = mpsc::channel(arrivals.len());
            senders.push(tx);
            running.push(start_side(&inst.shared, side, rx));
        }
    }
    let total = arrivals.len();
    let flips: Vec<usize> = (1..4).map(|k| k * total / 4).collect();
    for (n, (_, to, side, i)) in arrivals.into_iter().enumerate() {
        if flips.contains(&n) {
            let percent = rng.random_range(0..=100);
            for inst in &instances {
                inst._switches.send_replace(Some(Arc::new(Switches {
                    consume: true,
                    percent: Percent::try_from(percent).unwrap(),
                    whitelist: Default::default(),
                    version: n as u64,
                    changed_at_ms: 0,
                })));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let lane = to * 2 + usize::from(side == rocketmq);
        senders[lane].send(copy(&side, i, &acks_tx)).await.unwrap();
        if n % 64 == 0 {
            tokio::task::yield_now().await;
        }
    }
    for _ in 0..total {
        tokio::time::timeout(Duration::from_secs(30), acks_rx.recv())
            .await
            .expect("every copy acknowledged in time")
            .expect("ack channel open");
    }
    {
        let s = sink.state.lock().unwrap();
        assert_eq!(s.calls.len(), ids as usize, "every id called (seed {seed})");
        let twice: Vec<_> = s.calls.iter().filter(|(_, &c)| c != 1).collect();
        assert!(
            twice.is_empty(),
            "called more than once: {twice:?} (seed {seed})"
        );
        assert_eq!(s.most_at_once, 1, "seed {seed}");
    }
    for (cancel, tracker, pipeline) in running {
        cancel.cancel();
        pipeline.await.unwrap();
        tracker.close();
        tracker.wait().await;
    }
    let answered = instances
        .iter()
        .map(|i| remembered(&i.metrics, "kafka") + remembered(&i.metrics, "rocketmq"))
        .sum();
    for inst in &instances {
        inst.stop.cancel();
    }
    drop(senders);
    common::cleanup(&[common::redis_url()], &prefix);
    answered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_with_memory_call_every_id_once_while_the_percentage_moves() {
    let mut answered = 0;
    for seed in 1..=8 {
        answered += two_instances(seed, 1_500).await;
    }
    assert!(answered > 0, "the memory answered no copy at all");
}
