//! Issue 25, Redis failover: `redis.mode = "sentinel"` against a private primary, one replica
//! and three sentinels. The primary is SIGKILLed mid-run, the sentinels promote the replica, and
//! the daemon follows by itself: nothing lost, every double grant counted, and the move is in
//! its log and in `mqc_redis_reconnects_total{reason="failover"}`.

use std::time::{Duration, Instant};

use mq_cutover::config::RedisMode;
use mq_cutover::reward::FaultPlan;
use tokio_util::sync::CancellationToken;

use crate::common::{self, PrivateSentinels};
use crate::durability::settle;
use crate::harness::{Bed, Setup};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_follows_a_sentinel_failover_by_itself_without_loss_or_uncounted_double() {
    let mut redis = PrivateSentinels::start();
    let setup = Setup {
        redis_url: redis.urls().join(","),
        redis_mode: RedisMode::Sentinel,
        sentinel_master: Some(redis.master_name.clone()),
        lease: "3s",
        sink_timeout: "500ms",
        adopt_after: "10s",
        faults: FaultPlan {
            error_rate: 0.05,
            commit_then_timeout_rate: 0.01,
            hang: Duration::from_secs(1),
            latency: Duration::from_millis(2),
            ..FaultPlan::default()
        },
        ..Setup::default()
    };
    let mut bed = Bed::new("e2e-sentinel", setup).await;
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
    eprintln!("sentinel failover: {t:?}");
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
