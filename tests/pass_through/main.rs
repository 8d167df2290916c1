//! Pass-through mode (`[pipeline.pass_through]`, for measurement only): the forwarding side sends
//! every copy to the sink, the other side acknowledges its copies without a call, and Redis is
//! never contacted — the Redis address here is a socket that counts the connections made to it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mq_cutover::message::{Ack, BadInput, Finished, Identity, Message, Origin, Side};
use mq_cutover::pipeline::{run_side, Pause, Shared};
use mq_cutover::sink::{CallResult, Sink, SinkRequest, Turn};
use mq_cutover::store::Store;
use mq_cutover::telemetry::metrics::Metrics;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[path = "../common/mod.rs"]
mod common;

/// Records the calls it gets, answering success.
#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<(String, String)>>,
}

#[async_trait::async_trait]
impl Sink for Recorder {
    async fn call_in(&self, _turn: Turn<'_>, req: &SinkRequest<'_>) -> CallResult {
        self.calls
            .lock()
            .unwrap()
            .push((req.message_id.to_owned(), req.side.to_owned()));
        CallResult::Success
    }
}

fn copy(side: &Side, n: i64, id: Option<&str>, acks: &mpsc::UnboundedSender<Finished>) -> Message {
    let topic: Arc<str> = "t".into();
    Message {
        identity: match id {
            Some(id) => Ok(Identity {
                id: id.to_owned(),
                business_id: format!("u-{n}"),
            }),
            None => Err(BadInput("no header `msg-id`".into())),
        },
        payload: b"{}".to_vec(),
        origin: Origin {
            side: side.clone(),
            topic: topic.clone(),
            partition: 0,
            broker: None,
            offset: n,
            born_ms: 0,
        },
        received: std::time::Instant::now(),
        held: mq_cutover::source::outlet::Held::none(),
        ack: Ack::new(
            acks.clone(),
            Finished {
                topic,
                partition: 0,
                offset: n,
            },
        ),
    }
}

#[tokio::test]
async fn pass_through_forwards_every_copy_of_its_side_and_never_touches_redis() {
    // A "Redis" that only counts the connections made to it.
    let redis = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = redis.local_addr().unwrap().port();
    let connections = Arc::new(Mutex::new(0u32));
    let counted = connections.clone();
    tokio::spawn(async move {
        while let Ok((_socket, _)) = redis.accept().await {
            *counted.lock().unwrap() += 1;
        }
    });

    let cfg = common::offline_config(
        &format!("redis://127.0.0.1:{port}"),
        "t-pass-through",
        "claim_batch = 16\n[pipeline.pass_through]\nside = \"kafka\"\nmeasurement_only = true",
    );
    let store = Store::connect(&cfg.redis, true).await.expect("lazy store");
    let (_switches_tx, feed) = watch::channel(None); // never read: routing is not consulted
    let pause = Arc::new(Pause::default());
    let metrics = Arc::new(Metrics::default());
    let mut shared = Shared::build(
        &cfg,
        &store,
        feed,
        pause.clone(),
        CancellationToken::new(),
        metrics.clone(),
    )
    .expect("shared");
    let recorder = Arc::new(Recorder::default());
    shared.sink = recorder.clone();
    let shared = Arc::new(shared);

    let cancel = CancellationToken::new();
    let calls = TaskTracker::new();
    let (kafka, rocketmq): (Side, Side) = ("kafka".into(), "rocketmq".into());
    let (kafka_tx, kafka_rx) = mpsc::channel(64);
    let (rocketmq_tx, rocketmq_rx) = mpsc::channel(64);
    let pipelines = [
        tokio::spawn(run_side(
            shared.clone(),
            kafka.clone(),
            kafka_rx,
            cancel.clone(),
            calls.clone(),
        )),
        tokio::spawn(run_side(
            shared.clone(),
            rocketmq.clone(),
            rocketmq_rx,
            cancel.clone(),
            calls.clone(),
        )),
    ];

    // 200 ids on both sides, one id twice on the forwarding side (a producer's re-send), and one
    // copy without identity on each side.
    let (acks_tx, mut acks_rx) = mpsc::unbounded_channel();
    let mut sent = 0;
    for n in 0..200 {
        let id = format!("pt-{n}");
        kafka_tx
            .send(copy(&kafka, n, Some(&id), &acks_tx))
            .await
            .unwrap();
        rocketmq_tx
            .send(copy(&rocketmq, n, Some(&id), &acks_tx))
            .await
            .unwrap();
        sent += 2;
    }
    kafka_tx
        .send(copy(&kafka, 200, Some("pt-7"), &acks_tx))
        .await
        .unwrap();
    kafka_tx
        .send(copy(&kafka, 201, None, &acks_tx))
        .await
        .unwrap();
    rocketmq_tx
        .send(copy(&rocketmq, 200, None, &acks_tx))
        .await
        .unwrap();
    sent += 3;

    // Every copy is acknowledged.
    for _ in 0..sent {
        tokio::time::timeout(Duration::from_secs(10), acks_rx.recv())
            .await
            .expect("every copy acknowledged in time")
            .expect("ack channel open");
    }

    let got = recorder.calls.lock().unwrap().clone();
    let mut per_id: HashMap<&str, u32> = HashMap::new();
    for (id, side) in &got {
        assert_eq!(side, "kafka", "only the forwarding side calls the sink");
        *per_id.entry(id.as_str()).or_default() += 1;
    }
    assert_eq!(
        got.len(),
        201,
        "every good copy of the forwarding side, duplicate included"
    );
    assert_eq!(per_id.len(), 200);
    assert_eq!(per_id["pt-7"], 2, "no deduplication in pass-through");

    assert_eq!(*connections.lock().unwrap(), 0, "redis was never contacted");
    assert!(
        !*pause.subscribe().borrow(),
        "the sources were never paused"
    );
    assert_eq!(
        metrics.claim_seconds.get_sample_count(),
        0,
        "no claim was made"
    );
    assert_eq!(
        metrics.complete_seconds.get_sample_count(),
        0,
        "no outcome was recorded"
    );

    cancel.cancel();
    for p in pipelines {
        p.await.unwrap();
    }
}
