//! Both sides' pipelines (`run_side`) on real Redis reached through a proxy that holds every reply
//! back for a while, so that each claim round trip is long and the claim loop's overlap shows:
//! with `pipeline.claims_in_flight = n`, exactly up to `n` claim batches of a side are in Redis at
//! once (`mqc_claims_in_flight`), and every id is still called exactly once, never twice at once.
//! And a copy that waited past its lease before its call does not call on the lapsed lease, nor
//! one that queued for a call slot while the circuit opened.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mq_cutover::arbiter::switches::Switches;
use mq_cutover::arbiter::{
    Claim, ClaimRequest, CompleteRequest, Completion, LeaseTokens, Outcome, State,
};
use mq_cutover::config::Percent;
use mq_cutover::message::{Ack, Finished, Identity, Message, Origin, Side};
use mq_cutover::pipeline::{run_side, Pause, Shared};
use mq_cutover::sink::breaker::CircuitBreaker;
use mq_cutover::sink::{CallResult, CircuitConfig, Sink, SinkRequest, Turn};
use mq_cutover::store::Store;
use mq_cutover::telemetry::metrics::Metrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::common;

/// How long the proxy holds each reply from Redis.
const REPLY_DELAY: Duration = Duration::from_millis(30);
const IDS: i64 = 400;

/// A loopback proxy to `upstream` that forwards requests at once and every reply `delay` later,
/// in order. Returns its address.
async fn delaying_proxy(upstream: String, delay: Duration) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let server = TcpStream::connect(&upstream).await.unwrap();
                let (mut client_r, mut client_w) = client.into_split();
                let (mut server_r, mut server_w) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_r, &mut server_w).await;
                });
                let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = server_r.read(&mut buf).await {
                        if n == 0 || tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                });
                while let Some((at, bytes)) = rx.recv().await {
                    tokio::time::sleep_until((at + delay).into()).await;
                    if client_w.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    format!("redis://{addr}")
}

/// Counts calls per id and the most calls of one id in flight at once.
#[derive(Default)]
pub(super) struct CountingSink {
    pub(super) state: Mutex<SinkState>,
}

#[derive(Default)]
pub(super) struct SinkState {
    pub(super) calls: HashMap<String, u32>,
    running: HashMap<String, u32>,
    pub(super) most_at_once: u32,
}

#[async_trait::async_trait]
impl Sink for CountingSink {
    async fn call_in(&self, _turn: Turn<'_>, req: &SinkRequest<'_>) -> CallResult {
        {
            let mut s = self.state.lock().unwrap();
            *s.calls.entry(req.message_id.to_owned()).or_default() += 1;
            let running = s.running.entry(req.message_id.to_owned()).or_default();
            *running += 1;
            let now = *running;
            s.most_at_once = s.most_at_once.max(now);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        *self
            .state
            .lock()
            .unwrap()
            .running
            .get_mut(req.message_id)
            .unwrap() -= 1;
        CallResult::Success
    }
}

/// One instance's shared pipeline state on `store`: switches consume at `percent`, calls go to
/// `sink`. Cancel `stop` at the end; keep `switches` as long as the pipelines run (sending on it
/// moves them).
pub(super) struct Instance {
    pub(super) shared: Arc<Shared>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) stop: CancellationToken,
    pub(super) switches: watch::Sender<Option<Arc<Switches>>>,
}

pub(super) fn instance(
    cfg: &mq_cutover::config::Validated,
    store: &Store,
    percent: i64,
    sink: Arc<dyn Sink>,
) -> Instance {
    let (switches, feed) = watch::channel(Some(Arc::new(Switches {
        consume: true,
        percent: Percent::try_from(percent).unwrap(),
        whitelist: Default::default(),
        version: 1,
        changed_at_ms: 0,
    })));
    let metrics = Arc::new(Metrics::default());
    let stop = CancellationToken::new();
    let mut shared = Shared::build(
        cfg,
        store,
        feed,
        Arc::new(Pause::default()),
        stop.clone(),
        metrics.clone(),
    )
    .expect("shared");
    shared.sink = sink;
    Instance {
        shared: Arc::new(shared),
        metrics,
        stop,
        switches,
    }
}

pub(super) fn copy(side: &Side, n: i64, acks: &mpsc::UnboundedSender<Finished>) -> Message {
    let topic: Arc<str> = "t".into();
    Message {
        identity: Ok(Identity {
            id: format!("pl-{n}"),
            business_id: format!("u-{n}"),
        }),
        payload: b"{}".to_vec(),
        origin: Origin {
            side: side.clone(),
            topic: topic.clone(),
            partition: 0,
            broker: None,
            offset: n,
            born_ms: 0,
        },
        received: Instant::now(),
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

/// Runs `side`'s pipeline over `rx` in a task of its own; cancel the token to stop it.
pub(super) fn start_side(
    shared: &Arc<Shared>,
    side: &Side,
    rx: mpsc::Receiver<Message>,
) -> (CancellationToken, TaskTracker, tokio::task::JoinHandle<()>) {
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let pipeline = tokio::spawn(run_side(
        shared.clone(),
        side.clone(),
        rx,
        cancel.clone(),
        tracker.clone(),
    ));
    (cancel, tracker, pipeline)
}

/// Cancels a side's pipeline started by [`start_side`] and waits for it to stop.
pub(super) async fn stop_side(cancel: &CancellationToken, pipeline: tokio::task::JoinHandle<()>) {
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(10), pipeline)
        .await
        .expect("the pipeline stops on cancel")
        .unwrap();
}

/// Runs both sides over `IDS` ids (one copy each) with `claims_in_flight` batches allowed per
/// side; returns the most claim batches the Kafka side had in Redis at once.
async fn run(claims_in_flight: usize) -> i64 {
    let upstream = common::redis_url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let url = delaying_proxy(upstream, REPLY_DELAY).await;
    let prefix = common::unique_prefix("pipelined");
    let cfg = common::offline_config(
        &url,
        &prefix,
        &format!("claim_batch = 8\nclaims_in_flight = {claims_in_flight}"),
    );
    let store = Store::connect(&cfg.redis, false)
        .await
        .expect("the test Redis (scripts/testbed up) answers through the proxy");
    let sink = Arc::new(CountingSink::default());
    let Instance {
        shared,
        metrics,
        stop,
        switches: _switches,
    } = instance(&cfg, &store, 50, sink.clone());

    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (kafka, rocketmq): (Side, Side) = ("kafka".into(), "rocketmq".into());
    let (acks_tx, mut acks_rx) = mpsc::unbounded_channel();
    let mut pipelines = Vec::new();
    let mut sources = Vec::new(); // kept open until the end: a closed source stops its pipeline
    for side in [&kafka, &rocketmq] {
        let (tx, rx) = mpsc::channel(IDS as usize);
        for n in 0..IDS {
            tx.send(copy(side, n, &acks_tx)).await.unwrap();
        }
        pipelines.push(tokio::spawn(run_side(
            shared.clone(),
            side.clone(),
            rx,
            cancel.clone(),
            tracker.clone(),
        )));
        sources.push(tx);
    }

    // Watch the Kafka side's gauge while the copies go through.
    let gauge = metrics.side("kafka").claims_in_flight;
    let watched = gauge.clone();
    let watching = CancellationToken::new();
    let watcher = {
        let watching = watching.clone();
        tokio::spawn(async move {
            let mut most = 0;
            while !watching.is_cancelled() {
                most = most.max(watched.get());
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
            most
        })
    };
    for _ in 0..2 * IDS {
        tokio::time::timeout(Duration::from_secs(30), acks_rx.recv())
            .await
            .expect("every copy acknowledged in time")
            .expect("ack channel open");
    }
    watching.cancel();
    let most = watcher.await.unwrap();

    {
        let state = sink.state.lock().unwrap();
        assert_eq!(state.calls.len(), IDS as usize, "every id was called");
        assert!(
            state.calls.values().all(|&n| n == 1),
            "no id was called twice"
        );
        assert_eq!(state.most_at_once, 1);
    }

    cancel.cancel();
    for p in pipelines {
        tokio::time::timeout(Duration::from_secs(10), p)
            .await
            .expect("the pipeline stops on cancel")
            .unwrap();
    }
    assert_eq!(gauge.get(), 0, "no claim batch left counted in flight");
    drop(sources);
    stop.cancel();
    common::cleanup(&[common::redis_url()], &prefix);
    most
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_side_keeps_two_claim_batches_in_redis_while_replies_are_slow() {
    assert_eq!(run(2).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_claim_batch_in_flight_means_one() {
    assert_eq!(run(1).await, 1);
}

/// Holds every call of `blocked` until `open` is notified; counts calls per id.
struct GateSink {
    blocked: String,
    open: tokio::sync::Notify,
    calls: Mutex<HashMap<String, u32>>,
}

#[async_trait::async_trait]
impl Sink for GateSink {
    async fn call_in(&self, _turn: Turn<'_>, req: &SinkRequest<'_>) -> CallResult {
        *self
            .calls
            .lock()
            .unwrap()
            .entry(req.message_id.to_owned())
            .or_default() += 1;
        if req.message_id == self.blocked {
            self.open.notified().await;
        }
        CallResult::Success
    }
}

/// A copy claimed in the same batch as another but kept from its call (one call slot, held by the
/// other copy's long call) loses its lease anyway (its renewals failed; here the lease is made to
/// run out in Redis) and another worker takes the id over. When the slot frees, the copy must not
/// call on the lapsed lease: it renews first, finds the id another's, and goes back through the
/// pipeline, where it is acknowledged once that worker has recorded the id done. Without the
/// renewal before the call, the id would be granted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_whose_lease_lapsed_while_it_waited_does_not_call() {
    let prefix = common::unique_prefix("lapsed");
    let cfg = common::offline_config(
        &common::redis_url(),
        &prefix,
        "claim_batch = 8\nmax_in_flight = 1\n[arbiter]\nlease = \"1500ms\"",
    );
    let store = Store::connect(&cfg.redis, false)
        .await
        .expect("the test Redis (scripts/testbed up) answers");
    let sink = Arc::new(GateSink {
        blocked: "pl-0".into(),
        open: tokio::sync::Notify::new(),
        calls: Mutex::default(),
    });
    // Percent 0: every id is the old side's (kafka).
    let Instance {
        shared,
        metrics,
        stop,
        switches: _switches,
    } = instance(&cfg, &store, 0, sink.clone());
    let kafka: Side = "kafka".into();
    let lapsed = metrics.side("kafka").lapsed;

    let (acks_tx, mut acks_rx) = mpsc::unbounded_channel();
    let (tx, rx) = mpsc::channel(8);
    tx.send(copy(&kafka, 0, &acks_tx)).await.unwrap();
    tx.send(copy(&kafka, 1, &acks_tx)).await.unwrap();
    let (cancel, _tracker, pipeline) = start_side(&shared, &kafka, rx);

    // pl-0's call holds the only slot; pl-1 is claimed and waits for it.
    let calling = common::eventually(Duration::from_secs(10), || async {
        sink.calls.lock().unwrap().contains_key("pl-0")
    })
    .await;
    assert!(calling.is_some(), "pl-0 was called");
    let record = shared
        .arbiter
        .inspect("pl-1")
        .await
        .unwrap()
        .expect("pl-1 claimed");
    assert_eq!(
        record.state,
        State::InFlight,
        "pl-1 is claimed while it waits"
    );

    // pl-1's lease runs out (as if its renewals had failed); another worker takes it over.
    common::set_record_field(
        &store,
        &mq_cutover::arbiter::record_key(&prefix, "pl-1"),
        "e",
        "0",
    )
    .await;
    let other = LeaseTokens::default().next();
    let taken = shared
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
        matches!(taken, Claim::Proceed { takeover: true, .. }),
        "the lapsed lease is taken over: {taken:?}"
    );

    // The renewals of the waiting copies (every 500 ms) find pl-1's lease another's; then the
    // slot frees: pl-1 confirms its lease before calling, finds the id another's, and does not
    // call. (A copy whose renewals all succeeded calls without confirming: its lease cannot have
    // lapsed.)
    tokio::time::sleep(Duration::from_millis(700)).await;
    sink.open.notify_one();
    let decided = common::eventually(Duration::from_secs(10), || async {
        lapsed.get() == 1 || sink.calls.lock().unwrap().contains_key("pl-1")
    })
    .await;
    assert!(
        decided.is_some(),
        "pl-1 neither called nor given up in time"
    );
    assert_eq!(
        sink.calls.lock().unwrap().get("pl-1"),
        None,
        "pl-1 was called on a lapsed lease another worker held: the id would be granted twice"
    );
    assert_eq!(lapsed.get(), 1, "the lapsed lease is counted");
    let done = shared
        .arbiter
        .complete(&CompleteRequest {
            id: "pl-1",
            side: "kafka",
            token: &other,
            outcome: &Outcome::Success,
        })
        .await
        .unwrap();
    assert_eq!(done, Completion::Recorded(State::Done));

    // Both copies are acknowledged: pl-0 after its call, pl-1 once its re-claim answers DONE.
    let mut acked = Vec::new();
    for _ in 0..2 {
        let f = tokio::time::timeout(Duration::from_secs(10), acks_rx.recv())
            .await
            .expect("both copies acknowledged in time")
            .expect("ack channel open");
        acked.push(f.offset);
    }
    acked.sort();
    assert_eq!(acked, [0, 1]);
    assert_eq!(
        sink.calls.lock().unwrap().get("pl-1"),
        None,
        "pl-1 was never called by this worker: the worker that took it over decided"
    );
    assert_eq!(sink.calls.lock().unwrap().get("pl-0"), Some(&1));

    stop_side(&cancel, pipeline).await;
    drop(tx);
    stop.cancel();
    common::cleanup(&[common::redis_url()], &prefix);
}

/// An endpoint that fails every call after `CALL_TIME`, with `SLOTS` calls in flight at most.
struct FailingSink {
    slots: tokio::sync::Semaphore,
    calls: Mutex<u32>,
}

const SLOTS: usize = 2;
const CALL_TIME: Duration = Duration::from_millis(50);

#[async_trait::async_trait]
impl Sink for FailingSink {
    async fn turn(&self) -> Turn<'_> {
        Turn::holding(self.slots.acquire().await.unwrap())
    }

    async fn call_in(&self, _turn: Turn<'_>, _req: &SinkRequest<'_>) -> CallResult {
        *self.calls.lock().unwrap() += 1;
        tokio::time::sleep(CALL_TIME).await;
        CallResult::Retryable {
            reason: "HTTP 500".into(),
            retry_after: None,
        }
    }
}

/// Many claimed copies queue for the endpoint's few call slots while it fails every call. Once
/// the circuit opens, no copy still waiting for a slot may call: only the calls that had already
/// been let through before it opened (at most one per slot) reach the endpoint. Letting the
/// queued copies through would hammer a dead endpoint with every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_queued_for_a_call_slot_do_not_call_once_the_circuit_opens() {
    const THRESHOLD: u32 = 3;
    const COPIES: i64 = 200;
    let prefix = common::unique_prefix("circuit");
    let cfg = common::offline_config(&common::redis_url(), &prefix, "claim_batch = 50");
    let store = Store::connect(&cfg.redis, false)
        .await
        .expect("the test Redis (scripts/testbed up) answers");
    let sink = Arc::new(FailingSink {
        slots: tokio::sync::Semaphore::new(SLOTS),
        calls: Mutex::default(),
    });
    let Instance {
        mut shared,
        metrics: _,
        stop,
        switches: _switches,
    } = instance(&cfg, &store, 0, sink.clone());
    let breaker = Arc::new(CircuitBreaker::new(&CircuitConfig {
        failure_threshold: THRESHOLD,
        open_for: Duration::from_secs(60),
        half_open_probes: 1,
    }));
    Arc::get_mut(&mut shared).expect("not shared yet").breaker = breaker.clone();
    let kafka: Side = "kafka".into();
    let (acks_tx, _acks_rx) = mpsc::unbounded_channel();
    let (tx, rx) = mpsc::channel(COPIES as usize);
    for n in 0..COPIES {
        tx.send(copy(&kafka, n, &acks_tx)).await.unwrap();
    }
    let (cancel, tracker, pipeline) = start_side(&shared, &kafka, rx);

    let opened = common::eventually(Duration::from_secs(10), || async {
        breaker.state().is_open()
    })
    .await;
    assert!(opened.is_some(), "the circuit never opened");
    // Long enough for every queued copy to get a slot several times over (40 calls' worth).
    tokio::time::sleep(CALL_TIME * 20).await;
    let calls = *sink.calls.lock().unwrap();
    assert!(
        calls <= THRESHOLD + SLOTS as u32,
        "{calls} calls: the circuit opened after {THRESHOLD}, so at most {SLOTS} more were \
         already let through"
    );

    stop_side(&cancel, pipeline).await;
    tracker.close();
    tokio::time::timeout(Duration::from_secs(10), tracker.wait())
        .await
        .expect("every copy's task ends on cancel");
    drop(tx);
    stop.cancel();
    common::cleanup(&[common::redis_url()], &prefix);
}
