//! Issue 22, item 1: two daemons in one group, one killed and restarted (the group rebalances),
//! Redis restarted meanwhile, under load. Fetching was held (the daemon's pause for Redis, or
//! backpressure) when the rebalance revoked the survivor's partitions, and lifted while it held
//! none; librdkafka gave the same partitions back still paused, and they never moved again
//! while `/readyz` said ready. Now every id must be granted, no partition may be left with lag,
//! and a stall would show in `/readyz` (the test fails at once if it does).

use std::time::{Duration, Instant};

use mq_cutover::arbiter::Arbiter;
use mq_cutover::store::Store;
use mqc_testkit::reward::FaultPlan;

use crate::common;
use crate::harness::{Bed, Daemon, Setup};

/// The Kafka lag series of a daemon: (`queue`, messages).
async fn kafka_lags(d: &Daemon) -> Vec<(String, f64)> {
    let (_, text) = d.admin("metrics").await;
    text.lines()
        .filter(|l| l.starts_with("mqc_consumer_lag_messages{") && l.contains("side=\"kafka\""))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_then_a_redis_restart_under_load_leaves_no_partition_behind() {
    // A private Redis: this test stops it.
    let mut redis = common::PrivateRedis::start_persistent();
    let setup = Setup {
        redis_url: redis.url(),
        // A slow downstream and a short channel: the Kafka sources hold their fetching back for
        // backpressure now and then too.
        faults: FaultPlan {
            latency: Duration::from_millis(50),
            ..FaultPlan::default()
        },
        channel: 64,
        stall_after: "10s",
        // The killed daemon stays in the group this long: the rebalance its restart starts
        // waits for it, with the survivor's partitions revoked, across the Redis restart.
        kafka_session_timeout_ms: 20_000,
        ..Setup::default()
    };
    let mut bed = Bed::new("e2e-stall", setup).await;
    bed.switch(&["set", "--consume", "on", "--percent", "50"]);
    bed.start_daemon();
    bed.start_daemon();
    let count = 6_000;
    let producer = bed.produce_in_background("st", count, |a| a.rate = 800);
    let busy = common::eventually(Duration::from_secs(60), || async {
        bed.reward.state().stats().grants >= 300
    })
    .await;
    assert!(busy.is_some(), "nothing granted:\n{}", bed.logs());
    // The group has settled: two partitions each.
    let shared = common::eventually(Duration::from_secs(30), || async {
        let mut each = Vec::new();
        for d in &bed.daemons {
            each.push(d.metric("mqc_assigned_queues{side=\"kafka\"}").await);
        }
        each == [2.0, 2.0]
    })
    .await;
    assert!(
        shared.is_some(),
        "the daemons never shared the partitions:\n{}",
        bed.logs()
    );

    // Daemon 0 is killed; Redis goes down a second later, so the survivor (daemon 1) pauses
    // its sources with its partitions assigned; daemon 0 comes back and its consumer joins the
    // group, which revokes the survivor's partitions and waits for the killed member's session
    // to end; Redis comes back while the survivor holds nothing, so its resume reaches no
    // partition, and then the group assigns them.
    let started = Instant::now();
    bed.daemons[0].kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    bed.daemons[0].restart();
    let survivor = &bed.daemons[1];
    let revoked = common::eventually(Duration::from_secs(15), || async {
        survivor.metric("mqc_assigned_queues{side=\"kafka\"}").await == 0.0
    })
    .await;
    assert!(
        revoked.is_some(),
        "the restarted daemon's join never revoked the survivor's partitions\n{}",
        bed.logs()
    );
    redis.restart();
    eprintln!(
        "survivor revoked and redis back {:?} after the kill",
        started.elapsed()
    );
    producer.await.expect("producer");

    // Every id granted; a stalled side fails the test at once, naming it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let grants = bed.grants();
        let missing = (0..count)
            .filter(|i| grants.get(&format!("st-{i}")).copied().unwrap_or(0) == 0)
            .count();
        if missing == 0 {
            break;
        }
        for (i, d) in bed.daemons.iter().enumerate() {
            let (code, body) = d.admin("readyz").await;
            assert!(
                !body.contains("stalled"),
                "daemon {i}: /readyz {code} {body}; {missing} ids not granted\n{}",
                bed.logs()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {count} ids not granted {:?} after the kill\n{}",
            started.elapsed(),
            bed.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("every id granted {:?} after the kill", started.elapsed());
    let grants = bed.grants();
    let mut doubles = 0;
    // The bed's own connection did not live through the Redis restart.
    let store = Store::connect(&bed.config.redis, false)
        .await
        .expect("redis reachable");
    let arbiter = Arbiter::new(&store, &bed.config.arbiter);
    for i in 0..count {
        let id = format!("st-{i}");
        let g = grants[&id];
        if g > 1 {
            let r = arbiter
                .inspect(&id)
                .await
                .expect("inspect")
                .expect("record");
            assert!(
                r.ambiguous > 0 || r.overlaps > 0,
                "{id} granted {g} times, uncounted: {r}"
            );
            doubles += 1;
        }
    }

    // No partition left behind: the four are held, their lag falls to zero, both daemons are
    // ready and see no stall.
    let last = std::sync::Mutex::new(Vec::new());
    let settled = common::eventually(Duration::from_secs(30), || {
        let (bed, last) = (&bed, &last);
        async move {
            let mut all = Vec::new();
            for d in &bed.daemons {
                all.extend(kafka_lags(d).await);
            }
            let held: f64 = {
                let mut n = 0.0;
                for d in &bed.daemons {
                    n += d.metric("mqc_assigned_queues{side=\"kafka\"}").await;
                }
                n
            };
            let done = held == 4.0 && all.len() == 4 && all.iter().all(|(_, v)| *v == 0.0);
            *last.lock().unwrap() = all;
            done
        }
    })
    .await;
    assert!(
        settled.is_some(),
        "Kafka partitions left behind: {:?}\n{}",
        last.lock().unwrap(),
        bed.logs()
    );
    for (i, d) in bed.daemons.iter().enumerate() {
        let (code, body) = d.admin("readyz").await;
        assert_eq!(code, 200, "daemon {i}: {body}");
        assert_eq!(d.metric("mqc_stalled_queues{side=\"kafka\"}").await, 0.0);
    }
    let log = bed.daemons[1].log_text();
    assert!(
        log.contains("pausing the sources reason=RedisDown"),
        "the survivor paused for Redis:\n{}",
        bed.logs()
    );
    eprintln!("{doubles} counted duplicates");
}
