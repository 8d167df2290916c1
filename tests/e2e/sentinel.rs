//! Issue 25, Redis failover: `redis.mode = "sentinel"` against a private primary, one replica
//! and three sentinels. The primary is SIGKILLed mid-run, the sentinels promote the replica, and
//! the daemon follows by itself: nothing lost, every double grant counted, and the move is in
//! its log and in `mqc_redis_reconnects_total{reason="failover"}`. The same with
//! `arbiter.replicas = 1` (every claim and completion confirmed by `WAIT 1`), and with that
//! setting and the replica stopped: no call starts, and `/readyz` says why.

use std::time::{Duration, Instant};

use mq_cutover::config::RedisMode;
use tokio_util::sync::CancellationToken;

use crate::common::{self, PrivateSentinels};
use crate::durability::settle;
use crate::harness::{Bed, Setup};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_follows_a_sentinel_failover_by_itself_without_loss_or_uncounted_double() {
    failover("e2e-sentinel", 0).await;
}

/// With `arbiter.replicas = 1` the promoted replica has every claim a call started on and every
/// completion acknowledged. It has no replica of its own until the old primary comes back as
/// one: until then nothing is claimed (no call starts on an unconfirmed claim), then the rest
/// flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_replicas_1_a_failover_loses_nothing_and_grants_nothing_twice_uncounted() {
    failover("e2e-sentinel-wait", 1).await;
}

async fn failover(test: &str, replicas: u32) {
    let mut redis = PrivateSentinels::start();
    let setup = Setup {
        replicas,
        redis_url: redis.urls().join(","),
        redis_mode: RedisMode::Sentinel,
        sentinel_master: Some(redis.master_name.clone()),
        ..Setup::redis_outage()
    };
    let mut bed = Bed::new(test, setup).await;
    // The test's own connection (its inspections) follows the failover the same way.
    let stop = CancellationToken::new();
    tokio::spawn(bed.store.clone().watchdog(
        prometheus::IntCounter::new("stalled", "test").unwrap(),
        prometheus::IntCounter::new("failover", "test").unwrap(),
        stop.clone(),
    ));
    bed.switch(&["set", "--consume", "on", "--percent", "50"]);
    bed.start_daemon();
    let count = 4000;
    let producer = bed.produce_in_background("f", count, |a| {
        a.rate = 800;
        a.duplicates_old = 0.02;
        a.duplicates_new = 0.02;
        a.lag_new = Some(Duration::from_secs(1));
    });
    let busy = common::eventually(Duration::from_secs(60), || async {
        bed.reward.state().stats().grants >= 800
    })
    .await;
    assert!(busy.is_some(), "nothing granted:\n{}", bed.logs());

    redis.primary.stop();
    let killed = Instant::now();
    let grants_at_kill = bed.reward.state().stats().grants;
    let promoted = redis.wait_promoted(Duration::from_secs(30));
    if replicas > 0 {
        // The new primary has no replica: no claim can be confirmed, so nothing is granted
        // (calls started on confirmed claims before the kill may still end).
        tokio::time::sleep(Duration::from_secs(2)).await;
        let stopped = bed.reward.state().stats().grants;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let later = bed.reward.state().stats().grants;
        assert_eq!(
            later,
            stopped,
            "{} grants on unconfirmed claims:\n{}",
            later - stopped,
            bed.logs()
        );
        // The old primary comes back empty; the sentinels make it the new primary's replica.
        redis.primary.restart();
    }
    // Calls claimed before the kill may finish; then grants resume only on the new primary.
    let resumed = common::eventually(Duration::from_secs(60), || async {
        bed.reward.state().stats().grants > grants_at_kill + 200
    })
    .await;
    assert!(
        resumed.is_some(),
        "no grants after the failover:\n{}",
        bed.logs()
    );
    eprintln!(
        "primary killed after {grants_at_kill} grants; replica promoted after {promoted:?}; \
         200 more grants {:?} after the kill",
        killed.elapsed()
    );
    producer.await.expect("producer");
    let t = settle(&bed, "f", count).await;
    eprintln!("sentinel failover, arbiter.replicas = {replicas}: {t:?}");
    assert_eq!(t.lost, 0, "{t:?}\n{}", bed.logs());
    assert_eq!(t.doubled_uncounted, 0, "{t:?}\n{}", bed.logs());

    let d = &bed.daemons[0];
    let moved = d
        .metric("mqc_redis_reconnects_total{reason=\"failover\"}")
        .await;
    assert!(moved >= 1.0, "no failover counted:\n{}", bed.logs());
    let log = d.log_text();
    assert!(
        log.contains("redis sentinel: the primary changed")
            && log.contains(&format!("127.0.0.1:{}", redis.replica.port)),
        "the move to the new primary is not logged:\n{}",
        bed.logs()
    );
    let (code, ready) = d.admin("readyz").await;
    assert_eq!(code, 200, "not ready after the failover: {ready}");
    stop.cancel();
}

/// `arbiter.replicas = 1` and the replica stopped: the daemon starts no call (every claim waits
/// for a confirmation that cannot come), `/readyz` answers 503 naming the replicas, and once the
/// replica is back every id is granted exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_replicas_1_and_the_replica_stopped_no_call_starts_and_readyz_says_why() {
    let mut redis = PrivateSentinels::start();
    let setup = Setup {
        redis_url: redis.urls().join(","),
        redis_mode: RedisMode::Sentinel,
        sentinel_master: Some(redis.master_name.clone()),
        replicas: 1,
        ..Setup::default()
    };
    let mut bed = Bed::new("e2e-replica-down", setup).await;
    bed.switch(&["set", "--consume", "on", "--percent", "50"]);
    bed.start_daemon();
    let count = 300;
    bed.produce("w", count, |_| {}).await;
    bed.wait_all_settled("w", count, Duration::from_secs(120))
        .await;

    redis.replica.stop();
    let d = &bed.daemons[0];
    let said = common::eventually(Duration::from_secs(20), || async {
        let (code, body) = d.admin("readyz").await;
        code == 503 && body.contains("arbiter.replicas")
    })
    .await;
    assert!(
        said.is_some(),
        "/readyz does not name the missing replica: {:?}\n{}",
        d.admin("readyz").await,
        bed.logs()
    );
    let before = bed.reward.state().stats().calls;
    bed.produce("x", count, |_| {}).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        bed.reward.state().stats().calls,
        before,
        "calls started without a replica:\n{}",
        bed.logs()
    );
    assert!(
        d.log_text().contains("write not confirmed by the replicas"),
        "the pause does not say why:\n{}",
        bed.logs()
    );

    redis.replica.restart();
    bed.wait_all_settled("x", count, Duration::from_secs(120))
        .await;
    let grants = bed.grants();
    for p in ["w", "x"] {
        for i in 0..count {
            let id = format!("{p}-{i}");
            assert_eq!(grants.get(&id).copied(), Some(1), "{id}");
        }
    }
    let (code, ready) = d.admin("readyz").await;
    assert_eq!(code, 200, "not ready with the replica back: {ready}");
}
