//! A Redis outage seen by a pipeline on a Redis Cluster, where each id is its own call: with one
//! node frozen, the batch round trips are answered but the ids in that node's slots are not.
//! The sources pause as they do on standalone Redis when nothing answers (same pause reason,
//! same `mqc_pauses_total`), the side stops taking copies while its claims go unanswered, the
//! unanswered copies are claimed again, and once the node goes on every id is called exactly
//! once and the sources resume.

use std::sync::Arc;
use std::time::Duration;

use mq_cutover::config::RedisMode;
use mq_cutover::message::Side;
use mq_cutover::pipeline::{Pause, Shared};
use mq_cutover::store::Store;
use mq_cutover::telemetry::metrics::Metrics;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::common::{self, PrivateCluster};
use super::pipelined::{copy, start_side, stop_side, CountingSink};

const COPIES: i64 = 300;
/// `pipeline.claim_batch` here; `claims_in_flight` is 2.
const BATCH: i64 = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_cluster_node_pauses_the_sources_until_it_answers_again() {
    let cluster = PrivateCluster::start(3);
    let urls = cluster.urls();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let prefix = common::unique_prefix("outage-cluster");
    let cfg = common::offline_config_on(
        RedisMode::Cluster,
        &urls,
        &prefix,
        &format!("claim_batch = {BATCH}"),
    );
    let store = Store::connect(&cfg.redis, false)
        .await
        .expect("the private cluster answers");
    let metrics = Arc::new(Metrics::default());
    let pause = Arc::new(Pause::counted(&metrics));
    let mut paused = pause.subscribe();
    let (_switches, feed) =
        watch::channel(Some(Arc::new(mq_cutover::arbiter::switches::Switches {
            consume: true,
            percent: mq_cutover::config::Percent::try_from(0).unwrap(),
            whitelist: Default::default(),
            version: 1,
            changed_at_ms: 0,
        })));
    let stop = CancellationToken::new();
    let mut shared =
        Shared::build(&cfg, &store, feed, pause, stop.clone(), metrics.clone()).expect("shared");
    let sink = Arc::new(CountingSink::default());
    shared.sink = sink.clone();
    let shared = Arc::new(shared);

    let kafka: Side = "kafka".into();
    let (acks_tx, mut acks_rx) = mpsc::unbounded_channel();
    let (tx, rx) = mpsc::channel(COPIES as usize);
    let (cancel, _tracker, pipeline) = start_side(&shared, &kafka, rx);

    cluster.freeze(1);
    for n in 0..COPIES {
        tx.send(copy(&kafka, n, &acks_tx)).await.unwrap();
    }
    let went = tokio::time::timeout(Duration::from_secs(15), paused.wait_for(|p| *p))
        .await
        .map(|_| ());
    assert!(
        went.is_ok(),
        "the sources were never paused while a node did not answer"
    );
    assert_eq!(metrics.pauses.get(), 1);
    // Copies whose node answers are called meanwhile; the others wait.
    let some = common::eventually(Duration::from_secs(10), || async {
        !sink.state.lock().unwrap().calls.is_empty()
    })
    .await;
    assert!(some.is_some(), "no copy of the answering nodes was called");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let called_while_frozen = sink.state.lock().unwrap().calls.len() as i64;
    // Its first two batches' answered copies, no more: once both batches' leftovers wait for
    // the node, the side takes nothing new (its source would be paused too).
    assert!(
        called_while_frozen <= 2 * BATCH,
        "{called_while_frozen} copies called while a node was frozen: the side kept taking \
         copies while its claims went unanswered"
    );
    assert!(*paused.borrow(), "resumed while the node was still frozen");

    cluster.thaw(1);
    for _ in 0..COPIES {
        tokio::time::timeout(Duration::from_secs(30), acks_rx.recv())
            .await
            .expect("every copy acknowledged once the node answers")
            .expect("ack channel open");
    }
    let resumed = tokio::time::timeout(Duration::from_secs(5), paused.wait_for(|p| !*p))
        .await
        .map(|_| ());
    assert!(resumed.is_ok(), "the sources stayed paused");
    assert_eq!(metrics.pauses.get(), 1, "one outage, one pause");
    {
        let state = sink.state.lock().unwrap();
        assert_eq!(state.calls.len(), COPIES as usize, "every id was called");
        assert!(state.calls.values().all(|&n| n == 1), "no id called twice");
    }
    eprintln!("{called_while_frozen} of {COPIES} called while one of three nodes was frozen");

    stop_side(&cancel, pipeline).await;
    drop(tx);
    stop.cancel();
}
