//! The RocketMQ source against the real brokers of the test bed (`scripts/testbed up rocketmq
//! rocketmq-secure`): every message arrives once with its identity and origin; only finished
//! copies are committed, so a restart redelivers from the first unfinished offset of each queue
//! (or, when a one-way commit was lost, from an earlier one) and never skips one; unreadable
//! messages come through as bad input and their ack moves the offset; pause, cancel and a
//! rebalance between two instances of one group. The other files: bodies (codecs, sizes),
//! refetch by position and namespaces, the secured broker (TLS, ACL 2.0), and a drain without
//! pull errors.
//!
//! Each test creates its own topic and consumer group (`scripts/testbed topic rocketmq …`). A
//! test that cannot reach the broker fails and says how to start it; none is skipped.

#[path = "../common/mod.rs"]
mod common;

mod bodies;
mod drain;
mod refetch;
mod secured;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mq_cutover::config::{IdSource, RocketMqSideConfig, SideConfig, SideKind};
use mq_cutover::message::{Ack, Message};
use mq_cutover::source::rocketmq::{self, RocketMqWriter};
use mq_cutover::source::{Membership, Refetch, SourceContext, SourceError};
use mq_cutover::telemetry::metrics::Metrics;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long a test waits for messages it expects.
const ARRIVAL: Duration = Duration::from_secs(60);
/// How long a test listens for messages it must not get.
const QUIET: Duration = Duration::from_secs(3);

fn name_server() -> String {
    std::env::var("MQC_ROCKETMQ_NAMESRV").unwrap_or_else(|_| "127.0.0.1:19876".into())
}

fn broker() -> String {
    std::env::var("MQC_ROCKETMQ_BROKER").unwrap_or_else(|_| "127.0.0.1:20911".into())
}

/// Fails loudly unless both the name server and the broker accept connections.
fn require_rocketmq() {
    for (what, addr) in [("name server", name_server()), ("broker", broker())] {
        let reachable = addr
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok());
        assert!(
            reachable,
            "the test RocketMQ {what} at {addr} is not reachable. Start the test bed with \
             `scripts/testbed up rocketmq` (the README's test command does it for you)."
        );
    }
}

/// A fresh topic with `queues` queues and a fresh group name, both unique to this run.
async fn fresh_topic(test: &str, queues: u32) -> (String, String) {
    require_rocketmq();
    let tag = format!("{:08x}", rand::random::<u32>());
    let topic = format!("mqc-t-{test}-{tag}");
    let group = format!("mqc-g-{test}-{tag}");
    create_topic("rocketmq", &topic, queues).await;
    (topic, group)
}

/// `scripts/testbed topic COMPONENT TOPIC QUEUES`.
async fn create_topic(component: &str, topic: &str, queues: u32) {
    let out = tokio::process::Command::new(testbed())
        .args(["topic", component, topic, &queues.to_string()])
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", testbed()));
    assert!(
        out.status.success(),
        "`scripts/testbed topic {component} {topic} {queues}` failed (is {component} up? \
         `scripts/testbed up {component}`):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn testbed() -> String {
    std::env::var("MQC_TESTBED")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/testbed").into())
}

fn side(topic: &str, group: &str) -> SideConfig {
    SideConfig {
        name: "rocketmq".into(),
        kind: SideKind::Rocketmq,
        message_id: IdSource::Header("msg-id".into()),
        business_id: IdSource::JsonPointer("/user_id".into()),
        kafka: None,
        rocketmq: Some(RocketMqSideConfig::plain(&name_server(), topic, group)),
    }
}

async fn writer(group: &str) -> RocketMqWriter {
    RocketMqWriter::connect(&name_server(), &format!("{group}-producer"))
        .await
        .unwrap_or_else(|e| panic!("{e} (is rocketmq up? `scripts/testbed up rocketmq`)"))
}

/// Sends `m-N` with body `{"user_id": "u-N"}` for every N in `ids`.
async fn send_range(w: &RocketMqWriter, topic: &str, ids: std::ops::Range<u32>) {
    for n in ids {
        let id = format!("m-{n}");
        let body = format!(r#"{{"user_id": "u-{n}"}}"#);
        w.send(topic, None, &id, &[("msg-id", &id)], body.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("send {id}: {e}"));
    }
}

/// A source running in a task, with the daemon's side of its context.
struct Running {
    rx: mpsc::Receiver<Message>,
    cancel: CancellationToken,
    paused: watch::Sender<bool>,
    task: JoinHandle<Result<(), SourceError>>,
    /// This source's own metrics (one registry per source, as one daemon per instance).
    metrics: std::sync::Arc<Metrics>,
    membership: Membership,
    /// The source's reader of single copies, made before it ran.
    refetch: Arc<dyn Refetch>,
}

/// How often the tests' sources measure lag (the daemon: every 5 s).
const TEST_LAG_INTERVAL: Duration = Duration::from_millis(250);

/// Every ERROR line the RocketMQ client logged in this test process (its pull errors name the
/// queue, and so the test's topic).
static CLIENT_ERRORS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Records the client's ERROR events in [`CLIENT_ERRORS`], whatever `RUST_LOG` says.
struct ClientErrors;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for ClientErrors {
    fn on_event(&self, event: &tracing::Event<'_>, _cx: tracing_subscriber::layer::Context<'_, S>) {
        let meta = event.metadata();
        if *meta.level() != tracing::Level::ERROR || !meta.target().starts_with("rocketmq") {
            return;
        }
        struct Text(String);
        impl tracing::field::Visit for Text {
            fn record_debug(&mut self, _f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                use std::fmt::Write;
                let _ = write!(self.0, "{v:?} ");
            }
        }
        let mut text = Text(String::new());
        event.record(&mut text);
        CLIENT_ERRORS.lock().unwrap().push(text.0);
    }
}

/// The client's ERROR lines so far that mention `needle` (a topic).
fn client_errors_about(needle: &str) -> Vec<String> {
    CLIENT_ERRORS
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains(needle))
        .cloned()
        .collect()
}

/// Client and source logs in the test output, filtered by `RUST_LOG` (errors only by default),
/// and the client's errors recorded.
fn logs() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_test_writer()
                .with_filter(tracing_subscriber::EnvFilter::from_default_env()),
        )
        .with(ClientErrors)
        .try_init();
}

fn start(side: &SideConfig, paused: bool) -> Running {
    start_with_channel(side, paused, 64)
}

/// [`start`] with a pipeline channel of `capacity` copies.
fn start_with_channel(side: &SideConfig, paused: bool, capacity: usize) -> Running {
    start_with(side, paused, capacity, 4 << 20)
}

/// [`start`] with a pipeline channel of `capacity` copies and a `pipeline.max_message_bytes`.
fn start_with(side: &SideConfig, paused: bool, capacity: usize, max: usize) -> Running {
    logs();
    let source = rocketmq::build(side).expect("build");
    let refetch = source.refetcher().expect("a refetcher");
    let (out, rx) = mpsc::channel(capacity);
    let cancel = CancellationToken::new();
    let (paused_tx, paused_rx) = watch::channel(paused);
    let metrics = std::sync::Arc::new(Metrics::default());
    let membership = Membership::new(side.name.as_str().into(), &metrics, TEST_LAG_INTERVAL);
    let cx = SourceContext {
        side: side.name.as_str().into(),
        out: mq_cutover::source::outlet::Outlet::new(
            out,
            mq_cutover::source::outlet::ByteBudget::new(64 << 20, None),
        ),
        cancel: cancel.clone(),
        paused: paused_rx,
        membership: membership.clone(),
        max_message_bytes: max,
    };
    let task = tokio::spawn(source.run(cx));
    Running {
        rx,
        cancel,
        paused: paused_tx,
        task,
        metrics,
        membership,
        refetch,
    }
}

impl Running {
    /// The lag series of this source as `/metrics` shows them: `queue` label → messages.
    fn lags(&self) -> BTreeMap<String, i64> {
        common::lag_series(&self.metrics)
    }

    fn assigned(&self) -> i64 {
        self.metrics.assigned.with_label_values(&["rocketmq"]).get()
    }

    /// Waits until the lag series are exactly `want`; fails with the last ones seen.
    async fn lags_become(&self, want: &BTreeMap<String, i64>, limit: Duration) -> Duration {
        common::lags_become(&self.metrics, want, limit).await
    }

    /// The next `n` messages; fails if they do not all arrive within `limit`.
    async fn take(&mut self, n: usize, limit: Duration) -> Vec<Message> {
        let deadline = Instant::now() + limit;
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(m)) => got.push(m),
                Ok(None) => panic!(
                    "the source stopped after {} of {n} messages: {:?}",
                    got.len(),
                    (&mut self.task).await
                ),
                Err(_) => panic!(
                    "only {} of {n} messages arrived within {limit:?}",
                    got.len()
                ),
            }
        }
        got
    }

    /// Waits until the lag series add up to `want` messages; fails with the last ones seen.
    async fn total_lag_becomes(&self, want: i64, limit: Duration) {
        let started = Instant::now();
        while self.lags().values().sum::<i64>() != want {
            assert!(
                started.elapsed() < limit,
                "lag stayed {:?}, expected {want} in all",
                self.lags()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Everything that arrives within `d`.
    async fn quiet(&mut self, d: Duration) -> Vec<Message> {
        let deadline = tokio::time::Instant::now() + d;
        let mut got = Vec::new();
        while let Ok(Some(m)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            got.push(m);
        }
        got
    }

    /// Cancels the source and waits for `run` to return; returns how long that took.
    async fn stop(self) -> Duration {
        let t = Instant::now();
        self.cancel.cancel();
        let result = tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("run() returns after cancel")
            .expect("the source task does not panic");
        assert!(result.is_ok(), "run() after cancel: {result:?}");
        t.elapsed()
    }
}

fn id_of(m: &Message) -> String {
    m.identity
        .as_ref()
        .unwrap_or_else(|e| panic!("no identity at {:?}: {e}", m.origin))
        .id
        .clone()
}

fn done(msgs: Vec<Message>) {
    for m in msgs {
        m.ack.done();
    }
}

/// Per queue, the offsets `got` holds must be one unbroken run that ends at the queue's last
/// offset in `all` and starts at or below `at_most[queue]`: what a restart may deliver again.
/// Commits are of finished copies only and contiguous, so the committed offset is never above
/// the first unfinished copy; a one-way commit lost at shutdown leaves it lower (the client
/// sends commits without an answer: docs/rocketmq.md), which redelivers more, never less.
/// Returns how many copies came below `at_most` (redelivered because of a lost commit).
fn assert_redelivered_suffixes(
    got: &BTreeMap<i32, BTreeSet<i64>>,
    all: &BTreeMap<i32, BTreeSet<i64>>,
    at_most: &BTreeMap<i32, i64>,
) -> usize {
    let mut below = 0;
    for (q, offsets) in all {
        let last = *offsets.last().unwrap();
        let bound = at_most.get(q).copied().unwrap_or(last + 1);
        let seen = got.get(q).cloned().unwrap_or_default();
        let from = seen.first().copied().unwrap_or(last + 1);
        assert!(
            from <= bound,
            "queue {q}: redelivered from {from}, above {bound}: a copy was skipped"
        );
        let want: BTreeSet<i64> = offsets.range(from..).copied().collect();
        assert_eq!(
            seen, want,
            "queue {q}: what came again is not every offset from {from} on"
        );
        below += seen.range(..bound).count();
    }
    below
}

/// Offsets per queue of `msgs`.
fn per_queue(msgs: impl IntoIterator<Item = (i32, i64)>) -> BTreeMap<i32, BTreeSet<i64>> {
    let mut out: BTreeMap<i32, BTreeSet<i64>> = BTreeMap::new();
    for (q, o) in msgs {
        out.entry(q).or_default().insert(o);
    }
    out
}

/// Restarts a source in `group`, sends one sentinel message and asserts that it arrives, and
/// that whatever else arrives is a redelivery of finished copies (`finished`: their positions)
/// that a lost one-way commit explains: per queue an unbroken run up to the queue's end. With
/// the commit confirmed at shutdown, that is normally nothing. Returns how many came again.
async fn assert_nothing_lost_after_restart(
    s: &SideConfig,
    w: &RocketMqWriter,
    topic: &str,
    finished: &BTreeMap<i32, BTreeSet<i64>>,
) -> usize {
    let mut again = start(s, false);
    w.send(
        topic,
        None,
        "sentinel",
        &[("msg-id", "sentinel")],
        br#"{"user_id": "u-s"}"#,
    )
    .await
    .expect("send sentinel");
    let mut got = Vec::new();
    while !got.iter().any(|m: &Message| id_of(m) == "sentinel") {
        got.extend(again.take(1, ARRIVAL).await);
    }
    got.extend(again.quiet(QUIET).await);
    let sentinel: Vec<&Message> = got.iter().filter(|m| id_of(m) == "sentinel").collect();
    assert_eq!(sentinel.len(), 1, "the sentinel once");
    let sentinel_at = (sentinel[0].origin.partition, sentinel[0].origin.offset);
    let redelivered = per_queue(
        got.iter()
            .map(|m| (m.origin.partition, m.origin.offset))
            .filter(|p| *p != sentinel_at),
    );
    assert!(
        redelivered.keys().all(|q| finished.contains_key(q)),
        "copies of queues nothing was finished in: {redelivered:?}"
    );
    let come_again = assert_redelivered_suffixes(&redelivered, finished, &BTreeMap::new());
    done(got);
    again.stop().await;
    if come_again > 0 {
        eprintln!("after a restart, {come_again} finished copies came again (a lost commit)");
    }
    come_again
}

#[tokio::test]
async fn every_message_arrives_once_with_identity_and_origin_and_none_is_lost_after_restart() {
    let t0 = Instant::now();
    let (topic, group) = fresh_topic("all", 4).await;
    let s = side(&topic, &group);
    let w = writer(&group).await;
    send_range(&w, &topic, 0..200).await;

    let mut src = start(&s, false);
    let got = src.take(200, ARRIVAL).await;
    let extra = src.quiet(Duration::from_secs(1)).await;
    assert!(
        extra.is_empty(),
        "{} messages beyond the 200 sent",
        extra.len()
    );

    let mut ids = BTreeSet::new();
    let mut positions = BTreeSet::new();
    for m in &got {
        let identity = m.identity.as_ref().expect("identity");
        let n = identity.id.strip_prefix("m-").expect("m-N");
        assert_eq!(identity.business_id, format!("u-{n}"));
        assert!(ids.insert(identity.id.clone()), "{} twice", identity.id);
        assert_eq!(&*m.origin.side, "rocketmq");
        assert_eq!(&*m.origin.topic, topic);
        assert!((0..4).contains(&m.origin.partition), "{:?}", m.origin);
        assert!(m.origin.offset >= 0);
        assert_eq!(
            m.origin.broker.as_deref(),
            Some("broker-a"),
            "{:?}",
            m.origin
        );
        assert!(m.origin.born_ms > 0, "{:?}", m.origin);
        assert!(positions.insert((m.origin.partition, m.origin.offset)));
        assert_eq!(m.payload, format!(r#"{{"user_id": "u-{n}"}}"#).as_bytes());
    }
    assert_eq!(ids, (0..200).map(|n| format!("m-{n}")).collect());
    done(got);
    let stop = src.stop().await;

    let again = assert_nothing_lost_after_restart(&s, &w, &topic, &per_queue(positions)).await;
    w.shutdown().await;
    eprintln!(
        "all-once: stop {stop:?}, {again} came again after the restart, whole test {:?}",
        t0.elapsed()
    );
}

#[tokio::test]
async fn a_full_channel_holds_the_polled_batch_back_in_order_while_acks_still_commit() {
    let t0 = Instant::now();
    let (topic, group) = fresh_topic("full", 2).await;
    let s = side(&topic, &group);
    let w = writer(&group).await;
    send_range(&w, &topic, 0..120).await;

    // A channel of 5, smaller than one pull batch: the source hands each polled batch over a
    // few copies at a time and waits for room in between.
    let mut src = start_with_channel(&s, false, 5);
    joined(&src).await;
    let first = src.take(5, ARRIVAL).await;
    // The source refills the channel at once and waits again; the acks of the first five reach
    // the broker meanwhile (the lag counts only what is unacknowledged).
    let mut got = first.iter().map(|m| m.origin.clone()).collect::<Vec<_>>();
    done(first);
    src.total_lag_becomes(115, Duration::from_secs(10)).await;

    // The rest, a few at a time, each acknowledged as it arrives.
    while got.len() < 120 {
        let some = src.take(3.min(120 - got.len()), ARRIVAL).await;
        got.extend(some.iter().map(|m| m.origin.clone()));
        done(some);
    }
    let extra = src.quiet(Duration::from_secs(1)).await;
    assert!(
        extra.is_empty(),
        "{} copies beyond the 120 sent",
        extra.len()
    );
    // Every offset of every queue once, in the order the queue holds them.
    let mut per_queue: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for o in &got {
        per_queue.entry(o.partition).or_default().push(o.offset);
    }
    for (q, offsets) in &per_queue {
        let want: Vec<i64> = (0..offsets.len() as i64).collect();
        assert_eq!(offsets, &want, "queue {q}");
    }
    assert_eq!(per_queue.values().map(Vec::len).sum::<usize>(), 120);
    src.total_lag_becomes(0, Duration::from_secs(10)).await;
    src.stop().await;

    let finished = self::per_queue(got.iter().map(|o| (o.partition, o.offset)));
    assert_nothing_lost_after_restart(&s, &w, &topic, &finished).await;
    w.shutdown().await;
    eprintln!("full channel: whole test {:?}", t0.elapsed());
}

#[tokio::test]
async fn restart_redelivers_from_the_first_unfinished_offset_of_each_queue_never_below() {
    let t0 = Instant::now();
    let (topic, group) = fresh_topic("gap", 2).await;
    let s = side(&topic, &group);
    let w = writer(&group).await;
    send_range(&w, &topic, 0..200).await;

    let mut src = start(&s, false);
    let got = src.take(200, ARRIVAL).await;
    // Finish offsets below 30, leave 30 unfinished (the gap), finish every 4th one above it
    // and leave the rest unfinished (dropped acks hand the copy back).
    let mut first_open: HashMap<i32, i64> = HashMap::new();
    let mut by_position = BTreeMap::new();
    for m in got {
        let (q, o) = (m.origin.partition, m.origin.offset);
        by_position.insert((q, o), id_of(&m));
        if o < 30 || (o > 30 && o % 4 == 0) {
            m.ack.done();
        } else {
            let e = first_open.entry(q).or_insert(o);
            *e = (*e).min(o);
        }
    }
    assert_eq!(
        first_open.len(),
        2,
        "both queues got messages: {first_open:?}"
    );
    assert!(first_open.values().all(|&o| o == 30), "{first_open:?}");
    let stop = src.stop().await;

    let expected: BTreeSet<(i32, i64)> = by_position
        .keys()
        .filter(|(q, o)| *o >= first_open[q])
        .copied()
        .collect();
    let mut again = start(&s, false);
    // Every copy at and above the gap comes again (no loss); copies below it only if the last
    // one-way commit of the stopped source was lost (then from an earlier committed offset).
    let mut redelivered: Vec<Message> = Vec::new();
    let mut seen: BTreeMap<(i32, i64), String> = BTreeMap::new();
    while !expected.iter().all(|p| seen.contains_key(p)) {
        for m in again.take(1, ARRIVAL).await {
            let at = (m.origin.partition, m.origin.offset);
            assert!(
                seen.insert(at, id_of(&m)).is_none(),
                "{at:?} came twice after the restart"
            );
            redelivered.push(m);
        }
    }
    for m in again.quiet(QUIET).await {
        let at = (m.origin.partition, m.origin.offset);
        assert!(seen.insert(at, id_of(&m)).is_none(), "{at:?} came twice");
        redelivered.push(m);
    }
    for (at, id) in &seen {
        assert_eq!(Some(id), by_position.get(at), "the copy at {at:?}");
    }
    let below = assert_redelivered_suffixes(
        &per_queue(seen.keys().copied()),
        &per_queue(by_position.keys().copied()),
        &first_open.iter().map(|(q, o)| (*q, *o)).collect(),
    );
    done(redelivered);
    again.stop().await;
    w.shutdown().await;
    eprintln!(
        "gap: {} redelivered of 200 ({below} of them below the gap), stop {stop:?}, whole test {:?}",
        seen.len(),
        t0.elapsed()
    );
}

#[tokio::test]
async fn unreadable_messages_come_as_bad_input_and_their_ack_moves_the_offset() {
    let t0 = Instant::now();
    let (topic, group) = fresh_topic("bad", 1).await;
    let s = side(&topic, &group);
    let w = writer(&group).await;
    w.send(&topic, None, "", &[], br#"{"user_id": "u-1"}"#)
        .await
        .expect("send without msg-id");
    w.send(&topic, None, "m-2", &[("msg-id", "m-2")], b"not json")
        .await
        .expect("send non-JSON");
    send_range(&w, &topic, 3..4).await;

    let mut src = start(&s, false);
    let got = src.take(3, ARRIVAL).await;
    let reasons: Vec<String> = got
        .iter()
        .map(|m| match &m.identity {
            Ok(id) => format!("ok {}", id.id),
            Err(e) => e.0.clone(),
        })
        .collect();
    assert_eq!(reasons[0], "message id: no header `msg-id`");
    assert!(
        reasons[1].starts_with("business id: body is not JSON"),
        "{}",
        reasons[1]
    );
    assert_eq!(reasons[2], "ok m-3");
    assert_eq!(
        got.iter().map(|m| m.origin.offset).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    let finished = per_queue(got.iter().map(|m| (m.origin.partition, m.origin.offset)));
    done(got);
    src.stop().await;

    assert_nothing_lost_after_restart(&s, &w, &topic, &finished).await;
    w.shutdown().await;
    eprintln!("bad-input: whole test {:?}", t0.elapsed());
}

#[tokio::test]
async fn pause_stops_delivery_and_resume_continues_it() {
    let t0 = Instant::now();
    let (topic, group) = fresh_topic("pause", 2).await;
    let s = side(&topic, &group);
    let w = writer(&group).await;

    // Started paused: nothing arrives.
    let mut src = start(&s, true);
    send_range(&w, &topic, 0..10).await;
    let early = src.quiet(QUIET).await;
    assert!(early.is_empty(), "{} delivered while paused", early.len());
    src.paused.send(false).unwrap();
    let resumed_at = Instant::now();
    done(src.take(10, ARRIVAL).await);
    let resume = resumed_at.elapsed();

    // Paused while running: nothing more until resumed.
    src.paused.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    send_range(&w, &topic, 10..30).await;
    let held = src.quiet(QUIET).await;
    assert!(held.is_empty(), "{} delivered while paused", held.len());
    src.paused.send(false).unwrap();
    let got = src.take(20, ARRIVAL).await;
    let ids: BTreeSet<String> = got.iter().map(id_of).collect();
    assert_eq!(ids, (10..30).map(|n| format!("m-{n}")).collect());
    done(got);
    src.stop().await;
    w.shutdown().await;
    eprintln!(
        "pause: first delivery {resume:?} after resume, whole test {:?}",
        t0.elapsed()
    );
}

#[tokio::test]
async fn cancel_returns_ok_within_seconds_and_an_unfinished_copy_stays_uncommitted() {
    let t0 = Instant::now();
    let (topic, group) = fresh_topic("cancel", 1).await;
    let s = side(&topic, &group);
    let w = writer(&group).await;

    // Idle: nothing in flight.
    let src = start(&s, false);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = src.stop().await;
    // The client waits for pulls held by the broker; those end 1-6 s after they were sent
    // (docs/rocketmq.md, "How the source consumes", Cancel).
    assert!(idle < Duration::from_secs(8), "idle stop took {idle:?}");

    // One copy held (neither done nor dropped): run() waits for it, bounded, and does not
    // commit it.
    send_range(&w, &topic, 0..10).await;
    let mut src = start(&s, false);
    let mut got = src.take(10, ARRIVAL).await;
    let held: Ack = got.remove(5).ack;
    done(got);
    let busy = src.stop().await;
    assert!(
        busy >= rocketmq::DRAIN_GRACE - Duration::from_millis(100),
        "run() returned after {busy:?}, before the grace period for the held copy"
    );
    assert!(
        busy < rocketmq::DRAIN_GRACE + Duration::from_secs(8),
        "stop with a held copy took {busy:?}"
    );
    drop(held);

    // The held copy (offset 5) and everything after it come again, in order; below it only
    // if the last one-way commit was lost.
    let mut again = start(&s, false);
    let mut back = Vec::new();
    while !back.iter().any(|m: &Message| m.origin.offset == 9) {
        back.extend(again.take(1, ARRIVAL).await);
    }
    back.extend(again.quiet(Duration::from_secs(1)).await);
    let offsets: Vec<i64> = back.iter().map(|m| m.origin.offset).collect();
    let from = offsets[0];
    assert!(
        from <= 5,
        "redelivered from {from}: the held copy was skipped"
    );
    assert_eq!(offsets, (from..10).collect::<Vec<_>>());
    done(back);
    let after = again.stop().await;
    w.shutdown().await;
    eprintln!(
        "cancel: idle stop {idle:?}, stop with a held copy {busy:?}, stop {after:?}, whole test {:?}",
        t0.elapsed()
    );
}

#[tokio::test]
async fn a_second_instance_takes_over_queues_without_losing_a_message() {
    let t0 = Instant::now();
    let (topic, group) = fresh_topic("rebalance", 4).await;
    let s = side(&topic, &group);
    let w = writer(&group).await;

    let mut a = start(&s, false);
    send_range(&w, &topic, 0..40).await;
    let first = a.take(40, ARRIVAL).await;
    let mut seen: HashMap<String, u32> = HashMap::new();
    for m in &first {
        *seen.entry(id_of(m)).or_default() += 1;
    }
    done(first);

    // B joins: the group rebalances and each instance keeps some of the four queues.
    let mut b = start(&s, false);
    tokio::time::sleep(Duration::from_secs(5)).await;
    send_range(&w, &topic, 40..140).await;
    let deadline = Instant::now() + ARRIVAL;
    let (mut from_a, mut from_b) = (0, 0);
    while (40..140).any(|n| !seen.contains_key(&format!("m-{n}"))) {
        assert!(
            Instant::now() < deadline,
            "messages missing after the rebalance"
        );
        tokio::select! {
            Some(m) = a.rx.recv() => { from_a += 1; *seen.entry(id_of(&m)).or_default() += 1; m.ack.done(); }
            Some(m) = b.rx.recv() => { from_b += 1; *seen.entry(id_of(&m)).or_default() += 1; m.ack.done(); }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    assert!(
        from_a > 0 && from_b > 0,
        "both instances consume: a {from_a}, b {from_b}"
    );
    // Each queue's lag series is shown by the instance that holds it, and only by it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (la, lb) = (a.lags(), b.lags());
        let both: BTreeSet<&String> = la.keys().chain(lb.keys()).collect();
        if a.assigned() + b.assigned() == 4
            && la.len() + lb.len() == 4
            && both.len() == 4
            && la.keys().cloned().collect::<Vec<_>>() == a.membership.held()
            && lb.keys().cloned().collect::<Vec<_>>() == b.membership.held()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "assigned {} + {}, lag series {la:?} {lb:?}",
            a.assigned(),
            b.assigned()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A leaves: B gets every queue, from A's last commit.
    let a_metrics = a.metrics.clone();
    a.stop().await;
    assert!(
        !a_metrics.render().contains("mqc_consumer_lag_messages{"),
        "an instance that left shows no lag"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    send_range(&w, &topic, 140..160).await;
    let deadline = Instant::now() + ARRIVAL;
    while (140..160).any(|n| !seen.contains_key(&format!("m-{n}"))) {
        assert!(Instant::now() < deadline, "messages missing after A left");
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(100), b.rx.recv()).await {
            *seen.entry(id_of(&m)).or_default() += 1;
            m.ack.done();
        }
    }
    assert_eq!(b.assigned(), 4, "B holds every queue once A left");
    b.stop().await;
    w.shutdown().await;
    assert_eq!(seen.len(), 160, "every message arrived at least once");
    // RocketMQ's rebalance is not coordinated: B may read a queue's offset before A's last
    // commit for it lands, so copies A finished just before B joined can come again (the
    // arbiter answers DONE). Copies sent after the group settled must not.
    let twice: Vec<u32> = seen
        .iter()
        .filter(|(_, &c)| c > 1)
        .map(|(id, _)| id[2..].parse().unwrap())
        .collect();
    assert!(
        twice.iter().all(|&n| n < 40),
        "duplicates outside the hand-over window: {twice:?}"
    );
    eprintln!(
        "rebalance: a {from_a}, b {from_b} of 100 while both ran; {} of the 40 copies finished \
         just before B joined came again; whole test {:?}",
        twice.len(),
        t0.elapsed()
    );
}

#[tokio::test]
async fn a_topic_without_a_route_fails_to_start_and_says_so() {
    require_rocketmq();
    let tag = format!("{:08x}", rand::random::<u32>());
    let topic = format!("mqc-t-missing-{tag}");
    let s = side(&topic, &format!("mqc-g-missing-{tag}"));
    let src = start(&s, false);
    let result = tokio::time::timeout(Duration::from_secs(30), src.task)
        .await
        .expect("run() returns")
        .expect("no panic");
    match result {
        Err(SourceError::Start { reason, .. }) => {
            assert!(
                reason.contains(&topic) && reason.contains("no route"),
                "{reason}"
            )
        }
        other => panic!("expected a start error, got {other:?}"),
    }
}

/// Waits until the source has received its first assignment.
async fn joined(src: &Running) {
    let mut joined = src.membership.joined();
    tokio::time::timeout(ARRIVAL, joined.wait_for(|j| *j))
        .await
        .expect("the source joins its group")
        .expect("membership alive");
}

/// The lag series `broker/topic/queueId` of the queues `held`, from messages per queue id.
fn lag_map(held: &[String], per_queue: &BTreeMap<i32, i64>) -> BTreeMap<String, i64> {
    held.iter()
        .map(|label| {
            let q: i32 = label.rsplit('/').next().unwrap().parse().unwrap();
            (label.clone(), per_queue.get(&q).copied().unwrap_or(0))
        })
        .collect()
}

#[tokio::test]
async fn lag_counts_unfinished_messages_per_queue_and_falls_to_zero_once_they_are_acked() {
    let t0 = Instant::now();
    let (topic, group) = fresh_topic("lag", 2).await;
    let s = side(&topic, &group);
    let w = writer(&group).await;
    send_range(&w, &topic, 0..12).await;

    let mut src = start(&s, false);
    joined(&src).await;
    let joined_after = t0.elapsed();
    let held_queues = src.membership.held();
    assert_eq!(
        src.assigned(),
        2,
        "every queue of the topic: {held_queues:?}"
    );
    assert!(
        held_queues
            .iter()
            .all(|q| q.contains(&format!("/{topic}/"))),
        "{held_queues:?}"
    );
    // Everything held unacknowledged: each queue's lag is what it has.
    let got = src.take(12, ARRIVAL).await;
    let mut per_queue: BTreeMap<i32, i64> = BTreeMap::new();
    for m in &got {
        *per_queue.entry(m.origin.partition).or_default() += 1;
    }
    src.lags_become(&lag_map(&held_queues, &per_queue), Duration::from_secs(10))
        .await;
    // Finish the lowest two offsets of one queue: its lag drops by two.
    let q = *per_queue.keys().next().unwrap();
    let (done_now, rest): (Vec<Message>, Vec<Message>) = got
        .into_iter()
        .partition(|m| m.origin.partition == q && m.origin.offset < 2);
    done(done_now);
    *per_queue.get_mut(&q).unwrap() -= 2;
    src.lags_become(&lag_map(&held_queues, &per_queue), Duration::from_secs(10))
        .await;
    done(rest);
    let zero = src
        .lags_become(
            &lag_map(&held_queues, &BTreeMap::new()),
            Duration::from_secs(10),
        )
        .await;
    let metrics = src.metrics.clone();
    src.stop().await;
    assert!(
        !metrics.render().contains("mqc_consumer_lag_messages{"),
        "a stopped source shows no lag"
    );
    w.shutdown().await;
    eprintln!(
        "lag: joined after {joined_after:?}, lag 0 within {zero:?} of the last ack, whole test {:?}",
        t0.elapsed()
    );
}

#[tokio::test]
async fn an_instance_left_without_queues_has_joined_and_shows_no_lag() {
    let t0 = Instant::now();
    let (topic, group) = fresh_topic("lag-empty", 1).await;
    let s = side(&topic, &group);
    let w = writer(&group).await;
    send_range(&w, &topic, 0..3).await;
    let mut a = start(&s, false);
    joined(&a).await;
    let held = a.take(3, ARRIVAL).await; // unacknowledged: lag 3 wherever the queue goes
    let b = start(&s, false);
    joined(&b).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (la, lb) = (a.lags(), b.lags());
        let assigned = (a.assigned(), b.assigned());
        let settled = assigned.0 + assigned.1 == 1
            && la.len() + lb.len() == 1
            && la.values().chain(lb.values()).all(|n| *n == 3)
            && la.keys().cloned().collect::<Vec<_>>() == a.membership.held()
            && lb.keys().cloned().collect::<Vec<_>>() == b.membership.held();
        if settled {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "assigned {assigned:?}, lag series {la:?} {lb:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done(held);
    a.stop().await;
    b.stop().await;
    w.shutdown().await;
    eprintln!("lag-empty: whole test {:?}", t0.elapsed());
}
