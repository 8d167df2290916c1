//! Several instances' pipelines (`run_side`) on one real Redis, as a deployment runs them: both
//! sides on each instance, every id's copies landing on either instance in a loosely shuffled
//! order, some redelivered, while the percentage moves. Every id is called exactly once, never
//! twice at once.

use std::sync::Arc;
use std::time::Duration;

use mq_cutover::arbiter::switches::Switches;
use mq_cutover::config::Percent;
use mq_cutover::message::{Finished, Side};
use mq_cutover::store::Store;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;

use super::common;
use super::pipelined::{copy, instance, start_side, CountingSink, Instance};

/// Two instances, each running both sides; every id's two copies (and a tenth of them redelivered)
/// go to random instances in a loosely shuffled order, while the percentage moves.
async fn two_instances(seed: u64, ids: i64) {
    let prefix = common::unique_prefix("instances");
    let cfg = common::offline_config(&common::redis_url(), &prefix, "claim_batch = 32");
    let store = Store::connect(&cfg.redis, false).await.unwrap();
    let sink = Arc::new(CountingSink::default());
    let instances: Vec<Instance> = (0..2)
        .map(|_| instance(&cfg, &store, 50, sink.clone()))
        .collect();
    let (kafka, rocketmq): (Side, Side) = ("kafka".into(), "rocketmq".into());
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
                inst.switches.send_replace(Some(Arc::new(Switches {
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
    for inst in &instances {
        inst.stop.cancel();
    }
    drop(senders);
    common::cleanup(&[common::redis_url()], &prefix);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_call_every_id_once_while_the_percentage_moves() {
    for seed in 1..=8 {
        two_instances(seed, 1_500).await;
    }
}
