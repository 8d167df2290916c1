//! Copies that wait inside the pipeline, on real Redis: a claimed copy waiting for a call slot
//! keeps its lease, so a second copy of its id (a producer's duplicate) never takes it over
//! uncalled — under `at_most_once` that would park the id "in doubt" although no call was made;
//! and a completion Redis refuses for one id (its key overwritten) parks that copy while the
//! rest of the batch is recorded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mq_cutover::arbiter::{record_key, Claim, ClaimRequest, LeaseTokens, State};
use mq_cutover::config::Validated;
use mq_cutover::message::{Finished, Message, Side};
use mq_cutover::sink::{CallResult, Sink, SinkRequest, Turn};
use mq_cutover::store::Store;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use super::common;
use super::pipelined::{copy, instance, start_side, stop_side, Instance};

/// Every call waits for a permit of `gate` (none at first); counts calls per id.
struct HeldSink {
    gate: Semaphore,
    calls: Mutex<HashMap<String, u32>>,
}

impl HeldSink {
    fn new() -> Arc<HeldSink> {
        Arc::new(HeldSink {
            gate: Semaphore::new(0),
            calls: Mutex::default(),
        })
    }

    fn calls(&self, id: &str) -> u32 {
        self.calls.lock().unwrap().get(id).copied().unwrap_or(0)
    }
}

#[async_trait::async_trait]
impl Sink for HeldSink {
    async fn call_in(&self, _turn: Turn<'_>, req: &SinkRequest<'_>) -> CallResult {
        *self
            .calls
            .lock()
            .unwrap()
            .entry(req.message_id.to_owned())
            .or_default() += 1;
        self.gate.acquire().await.unwrap().forget();
        CallResult::Success
    }
}

/// One instance's Kafka side, every call held by a [`HeldSink`], fed copies `pl-0` … and started.
struct HeldSide {
    sink: Arc<HeldSink>,
    instance: Instance,
    acks: mpsc::UnboundedReceiver<Finished>,
    /// Kept open until the test ends: a closed feed stops the pipeline.
    feed: mpsc::Sender<Message>,
    cancel: CancellationToken,
    pipeline: tokio::task::JoinHandle<()>,
}

/// Starts a [`HeldSide`] on `copies` copies and returns once `pl-0`'s call holds the only slot
/// (`max_in_flight = 1` in `cfg`), the others claimed with it and waiting for it.
async fn held_side(cfg: &Validated, copies: i64) -> HeldSide {
    let store = Store::connect(&cfg.redis, false)
        .await
        .expect("the test's Redis answers");
    let sink = HeldSink::new();
    let instance = instance(cfg, &store, 0, sink.clone());
    let kafka: Side = "kafka".into();
    let (acks_tx, acks) = mpsc::unbounded_channel();
    let (feed, rx) = mpsc::channel(copies as usize);
    for n in 0..copies {
        feed.send(copy(&kafka, n, &acks_tx)).await.unwrap();
    }
    let (cancel, _tracker, pipeline) = start_side(&instance.shared, &kafka, rx);
    let calling = common::eventually(Duration::from_secs(10), || async {
        sink.calls("pl-0") == 1
    })
    .await;
    assert!(calling.is_some(), "pl-0 was called");
    HeldSide {
        sink,
        instance,
        acks,
        feed,
        cancel,
        pipeline,
    }
}

impl HeldSide {
    /// Waits for `n` acknowledgements; their offsets, sorted.
    async fn acked(&mut self, n: usize) -> Vec<i64> {
        let mut acked = Vec::new();
        for _ in 0..n {
            let f = tokio::time::timeout(Duration::from_secs(10), self.acks.recv())
                .await
                .expect("every copy acknowledged in time")
                .expect("ack channel open");
            acked.push(f.offset);
        }
        acked.sort();
        acked
    }

    /// Stops the pipeline and the instance.
    async fn stop(self) {
        stop_side(&self.cancel, self.pipeline).await;
        drop(self.feed);
        self.instance.stop.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_waiting_for_a_call_slot_keeps_its_lease_and_is_never_parked_in_doubt() {
    let prefix = common::unique_prefix("slot-wait");
    let cfg = common::offline_config(
        &common::redis_url(),
        &prefix,
        "claim_batch = 8\nmax_in_flight = 1\n\
         [arbiter]\nlease = \"600ms\"\nambiguous = \"at_most_once\"",
    );
    let mut side = held_side(&cfg, 2).await;
    let (shared, sink) = (&side.instance.shared, &side.sink);

    // pl-0's call holds the only slot; pl-1 is claimed and waits for it, three leases long.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    // Another instance's copy of pl-1 (a redelivery after a rebalance, a producer's duplicate in
    // another partition) is claimed meanwhile: it must find the lease alive, not take it over.
    let other = LeaseTokens::default().next();
    let theirs = shared
        .arbiter
        .claim(&ClaimRequest {
            id: "pl-1",
            side: "kafka",
            routed_owner: "kafka",
            token: &other,
        })
        .await
        .unwrap();
    assert!(
        matches!(theirs, Claim::Busy { .. }),
        "pl-1 lost its lease while it waited for a call slot: {theirs:?}"
    );
    let r = shared.arbiter.inspect("pl-1").await.unwrap().unwrap();
    assert_eq!(r.state, State::InFlight, "{r}");

    // The slot frees: pl-1 is called once, and every copy is acknowledged.
    sink.gate.add_permits(10);
    assert_eq!(side.acked(2).await, [0, 1]);
    assert_eq!(side.sink.calls("pl-1"), 1);
    let r = side
        .instance
        .shared
        .arbiter
        .inspect("pl-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((r.state, r.ambiguous), (State::Done, 0), "{r}");
    assert_eq!(side.instance.metrics.side("kafka").dead_letters.get(), 0);
    side.stop().await;
    common::cleanup(&[common::redis_url()], &prefix);
}

/// Copies that waited a moment for a call slot — far less than a third of their lease, so no
/// renewal was due — call without confirming their leases one by one. Each such confirmation is a
/// `renew.lua` round trip per copy: in a drain, where nearly every batch waits for a slot, they
/// were half of Redis's script calls. A private Redis, watched with `MONITOR`, counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_that_waited_briefly_for_a_call_slot_call_without_a_renewal_each() {
    const COPIES: i64 = 24;
    let redis = common::PrivateRedis::start();
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut monitor = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "monitor"])
        .stdout(log.reopen().unwrap())
        .spawn()
        .expect("redis-cli (scripts/testbed installs it) runs");
    let prefix = common::unique_prefix("slot-brief");
    let cfg = common::offline_config(
        &redis.url(),
        &prefix,
        "claim_batch = 32\nmax_in_flight = 1\n[arbiter]\nlease = \"30s\"",
    );
    let mut side = held_side(&cfg, COPIES).await;
    // pl-0's call holds the only slot while the others, claimed with it, wait for it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    side.sink.gate.add_permits(COPIES as usize);
    assert_eq!(
        side.acked(COPIES as usize).await,
        (0..COPIES).collect::<Vec<_>>()
    );
    for n in 0..COPIES {
        assert_eq!(side.sink.calls(&format!("pl-{n}")), 1, "pl-{n}");
    }
    side.stop().await;
    let _ = monitor.kill();
    let _ = monitor.wait();

    // renew.lua is the only script called with one key and two arguments (token, lease length):
    // `"EVALSHA" "<sha>" "1" "<key>" "<token>" "30000"`.
    let seen = std::fs::read_to_string(log.path()).unwrap();
    let evals: Vec<Vec<&str>> = seen
        .lines()
        .filter(|l| l.contains("\"EVALSHA\"") || l.contains("\"EVAL\""))
        .map(|l| l.split('"').skip(1).step_by(2).collect())
        .collect();
    let renewals = evals
        .iter()
        .filter(|t| t.len() == 6 && t[2] == "1" && t[5] == "30000")
        .count();
    assert!(
        evals.len() >= 2,
        "MONITOR saw the claims and completions: {seen}"
    );
    assert_eq!(
        renewals,
        0,
        "copies renewed their leases one by one before calling ({} script calls in all)",
        evals.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_refused_for_one_id_parks_that_copy_and_records_the_rest() {
    let prefix = common::unique_prefix("refused-completion");
    let cfg = common::offline_config(&common::redis_url(), &prefix, "claim_batch = 8");
    let store = Store::connect(&cfg.redis, false)
        .await
        .expect("the test Redis (scripts/testbed up) answers");
    let sink = HeldSink::new();
    let Instance {
        shared,
        metrics,
        stop,
        switches: _switches,
    } = instance(&cfg, &store, 0, sink.clone());
    let kafka: Side = "kafka".into();
    let (acks_tx, mut acks_rx) = mpsc::unbounded_channel();
    let (tx, rx) = mpsc::channel(8);
    for n in 0..5 {
        tx.send(copy(&kafka, n, &acks_tx)).await.unwrap();
    }
    let (cancel, _tracker, pipeline) = start_side(&shared, &kafka, rx);
    let calling = common::eventually(Duration::from_secs(10), || async {
        (0..5).all(|n| sink.calls(&format!("pl-{n}")) == 1)
    })
    .await;
    assert!(calling.is_some(), "every copy was called");
    // While the calls are out, something else overwrites pl-2's record with a list.
    let mut conn = store.conn();
    let key = record_key(&prefix, "pl-2");
    let _: () = redis::pipe()
        .del(&key)
        .rpush(&key, "not a record")
        .query_async(&mut conn)
        .await
        .unwrap();
    sink.gate.add_permits(10);

    let mut acked = Vec::new();
    for _ in 0..5 {
        let f = tokio::time::timeout(Duration::from_secs(10), acks_rx.recv())
            .await
            .expect("every copy acknowledged: one bad key must not hold up its batch")
            .expect("ack channel open");
        acked.push(f.offset);
    }
    acked.sort();
    assert_eq!(acked, [0, 1, 2, 3, 4]);
    for n in [0, 1, 3, 4] {
        let r = shared
            .arbiter
            .inspect(&format!("pl-{n}"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.state, State::Done);
    }
    let letters = shared.dead.all().await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].message_id.as_deref(), Some("pl-2"));
    assert!(
        letters[0].reason.contains("could not be recorded")
            && letters[0].reason.contains("WRONGTYPE"),
        "{}",
        letters[0].reason
    );
    assert_eq!(metrics.side("kafka").dead_letters.get(), 1);

    stop_side(&cancel, pipeline).await;
    drop(tx);
    stop.cancel();
    common::cleanup(&[common::redis_url()], &prefix);
}
