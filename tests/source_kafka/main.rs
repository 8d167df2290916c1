//! The Kafka source against the real Apache Kafka broker of the test bed (`scripts/testbed up
//! kafka`, 127.0.0.1:19092 or `MQC_KAFKA_BOOTSTRAP`). Each test creates its own topic and consumer
//! group, plays the pipeline itself (receives copies, acknowledges some, drops others) and checks
//! what the broker ends up with: the committed offset never passes an unfinished copy, and a
//! restart or a rebalance delivers again exactly what was not finished. The source's
//! membership: lag per partition, partitions held, rebalances, joining with or without
//! partitions; the stall detector fed by the source's readings.
//!
//! An unreachable broker fails the tests with a hint; they never skip.

#[path = "../common/mod.rs"]
mod common;
mod security;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mq_cutover::config::{IdSource, KafkaSideConfig, SideConfig, SideKind};
use mq_cutover::message::Message;
use mq_cutover::source::kafka::{self, KafkaWriter};
use mq_cutover::source::{Membership, SourceContext, SourceError};
use mq_cutover::telemetry::metrics::Metrics;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

fn bootstrap() -> String {
    std::env::var("MQC_KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

fn unreachable(what: &str, e: &dyn std::fmt::Display) -> ! {
    panic!(
        "the test Kafka at {} is not reachable ({what}: {e}). Start it with `scripts/testbed up \
         kafka` (the README's test command does it for you).",
        bootstrap()
    )
}

fn logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "mq_cutover=info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Deletes a test's topic and consumer group when dropped (at the end of the test, after its
/// sources have stopped), so the broker keeps nothing behind.
struct Cleanup {
    topic: String,
    group: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Ok(admin) = ClientConfig::new()
            .set("bootstrap.servers", bootstrap())
            .create::<AdminClient<DefaultClientContext>>()
        else {
            return;
        };
        let opts = AdminOptions::new()
            .request_timeout(Some(Duration::from_secs(5)))
            .operation_timeout(Some(Duration::from_secs(5)));
        // rdkafka's admin futures need no runtime; a failed cleanup leaves a topic, no more.
        let _ = futures::executor::block_on(admin.delete_groups(&[&self.group], &opts));
        let _ = futures::executor::block_on(admin.delete_topics(&[&self.topic], &opts));
    }
}

/// A fresh topic with `partitions` partitions, a consumer group of its own, and the guard that
/// deletes both.
async fn topic(test: &str, partitions: i32) -> (String, String, Cleanup) {
    logs();
    let name = common::unique_prefix(test);
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .expect("admin client");
    let opts = AdminOptions::new()
        .request_timeout(Some(Duration::from_secs(10)))
        .operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(
            &[NewTopic::new(&name, partitions, TopicReplication::Fixed(1))],
            &opts,
        )
        .await
        .unwrap_or_else(|e| unreachable("creating a topic", &e));
    for r in results {
        if let Err((topic, code)) = r {
            unreachable(&format!("creating topic {topic}"), &code);
        }
    }
    let group = format!("{name}-group");
    let cleanup = Cleanup {
        topic: name.clone(),
        group: group.clone(),
    };
    (name, group, cleanup)
}

/// A producer that writes to explicit partitions and reports offsets, so tests know exactly
/// where each record is.
struct Producer(FutureProducer);

impl Producer {
    fn new() -> Producer {
        let p: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap())
            .set("linger.ms", "0")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "20000")
            .create()
            .expect("producer");
        Producer(p)
    }

    async fn put(&self, topic: &str, partition: i32, id: Option<&str>, body: Option<&[u8]>) -> i64 {
        let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic).partition(partition);
        if let Some(id) = id {
            record = record.headers(OwnedHeaders::new().insert(Header {
                key: "msg-id",
                value: Some(id),
            }));
        }
        if let Some(body) = body {
            record = record.payload(body);
        }
        match self.0.send(record, Duration::from_secs(5)).await {
            Ok(d) => d.offset,
            Err((e, _)) => unreachable("producing", &e),
        }
    }

    /// A well-formed record: header `msg-id = id`, body `{"user_id":"u-<id>"}`.
    async fn good(&self, topic: &str, partition: i32, id: &str) -> i64 {
        let body = format!(r#"{{"user_id":"u-{id}"}}"#);
        self.put(topic, partition, Some(id), Some(body.as_bytes()))
            .await
    }
}

fn side(topic: &str, group: &str) -> SideConfig {
    side_with(topic, group, &[])
}

/// A side reading `msg-id` from a header and `/user_id` from the body, with extra librdkafka
/// properties.
fn side_with(topic: &str, group: &str, extra: &[(&str, &str)]) -> SideConfig {
    SideConfig {
        name: "kafka".into(),
        kind: SideKind::Kafka,
        message_id: IdSource::Header("msg-id".into()),
        business_id: IdSource::JsonPointer("/user_id".into()),
        kafka: Some(KafkaSideConfig {
            bootstrap_servers: bootstrap(),
            topics: vec![topic.into()],
            group_id: group.into(),
            properties: [("fetch.wait.max.ms", "100")]
                .iter()
                .chain(extra)
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            secret_files: Default::default(),
        }),
        rocketmq: None,
    }
}

/// A running source, with the test as its pipeline.
struct Running {
    rx: mpsc::Receiver<Message>,
    paused: watch::Sender<bool>,
    cancel: CancellationToken,
    task: JoinHandle<Result<(), SourceError>>,
    /// This source's own metrics (one registry per source, as one daemon per instance).
    metrics: Arc<Metrics>,
    membership: Membership,
}

/// How often the tests' sources measure lag (the daemon: every 5 s).
const TEST_LAG_INTERVAL: Duration = Duration::from_millis(250);

/// How long the tests' sources may read nothing while messages wait (the daemon: 60 s).
const TEST_STALL_AFTER: Duration = Duration::from_secs(2);

fn start(side: &SideConfig, capacity: usize) -> Running {
    let source = match kafka::build(side) {
        Ok(s) => s,
        Err(e) => panic!("build: {e}"),
    };
    let (out, rx) = mpsc::channel(capacity);
    let (paused, paused_rx) = watch::channel(false);
    let cancel = CancellationToken::new();
    let metrics = Arc::new(Metrics::default());
    let membership = Membership::new(side.name.as_str().into(), &metrics, TEST_LAG_INTERVAL)
        .watch_stalls(TEST_STALL_AFTER, paused_rx.clone());
    let cx = SourceContext {
        side: side.name.as_str().into(),
        out: mq_cutover::source::outlet::Outlet::new(
            out,
            mq_cutover::source::outlet::ByteBudget::new(64 << 20, None),
        ),
        cancel: cancel.clone(),
        paused: paused_rx,
        membership: membership.clone(),
        max_message_bytes: 4 << 20,
    };
    Running {
        rx,
        paused,
        cancel,
        task: tokio::spawn(source.run(cx)),
        metrics,
        membership,
    }
}

impl Running {
    /// The lag series of this source as `/metrics` shows them: `queue` label → messages.
    fn lags(&self) -> BTreeMap<String, i64> {
        common::lag_series(&self.metrics)
    }

    fn assigned(&self) -> i64 {
        self.metrics.assigned.with_label_values(&["kafka"]).get()
    }

    fn rebalances(&self) -> u64 {
        self.metrics.rebalances.with_label_values(&["kafka"]).get()
    }

    /// Waits until the lag series are exactly `want`; fails with the last ones seen.
    async fn lags_become(&self, want: &BTreeMap<String, i64>, limit: Duration) -> Duration {
        common::lags_become(&self.metrics, want, limit).await
    }

    /// The next `n` copies, failing the test if they do not all come within `limit`.
    async fn take(&mut self, n: usize, limit: Duration) -> Vec<Message> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(m)) => got.push(m),
                Ok(None) => panic!("the source stopped after {} of {n} copies", got.len()),
                Err(_) => panic!("only {} of {n} copies within {limit:?}", got.len()),
            }
        }
        got
    }

    /// Copies until one whose id starts with `prefix` has arrived from each of `partitions`.
    async fn take_until_markers(
        &mut self,
        prefix: &str,
        partitions: usize,
        limit: Duration,
    ) -> Vec<Message> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut got = Vec::new();
        let mut seen = BTreeSet::new();
        while seen.len() < partitions {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(m)) => {
                    if id(&m).starts_with(prefix) {
                        seen.insert(m.origin.partition);
                    }
                    got.push(m);
                }
                Ok(None) => panic!("the source stopped"),
                Err(_) => panic!(
                    "markers `{prefix}` from {} of {partitions} partitions within {limit:?}",
                    seen.len()
                ),
            }
        }
        got
    }

    /// Fails if any copy arrives within `span`.
    async fn quiet(&mut self, span: Duration) {
        if let Ok(Some(m)) = tokio::time::timeout(span, self.rx.recv()).await {
            panic!(
                "expected nothing, got {} at {}[{}]@{}",
                id(&m),
                m.origin.topic,
                m.origin.partition,
                m.origin.offset
            );
        }
    }

    /// Cancels and waits for the source to return; copies still arriving are dropped unacked
    /// (handed back). Returns how long `run` took to return after the cancel.
    async fn stop(self) -> Duration {
        let Running {
            mut rx,
            cancel,
            mut task,
            ..
        } = self;
        let started = Instant::now();
        cancel.cancel();
        let result = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                tokio::select! {
                    r = &mut task => break r.expect("source task panicked"),
                    m = rx.recv() => drop(m),
                }
            }
        })
        .await
        .expect("the source returns within 20 s of the cancel");
        if let Err(e) = result {
            panic!("the source failed: {e}");
        }
        started.elapsed()
    }
}

fn id(m: &Message) -> String {
    match &m.identity {
        Ok(i) => i.id.clone(),
        Err(e) => format!("<bad: {e}>"),
    }
}

/// The committed offset of each partition `0..partitions` for `group` (-1: none).
async fn committed(topic: &str, group: &str, partitions: i32) -> Vec<i64> {
    let (topic, group) = (topic.to_owned(), group.to_owned());
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap())
            .set("group.id", &group)
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(&topic, p);
        }
        let got = c
            .committed_offsets(tpl, Duration::from_secs(10))
            .unwrap_or_else(|e| unreachable("reading committed offsets", &e));
        (0..partitions)
            .map(
                |p| match got.find_partition(&topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => -1,
                },
            )
            .collect()
    })
    .await
    .expect("committed offsets")
}

/// Waits until the committed offsets equal `want` (auto-commit runs every second).
async fn committed_becomes(topic: &str, group: &str, want: &[i64]) {
    let n = want.len() as i32;
    let mut last = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        last = committed(topic, group, n).await;
        if last == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("committed offsets stayed {last:?}, expected {want:?}");
}

const TAKE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_arrives_with_its_identity_and_origin_and_acked_ones_are_not_read_again() {
    let (t, g, _cleanup) = topic("kafka_all", 3).await;
    let p = Producer::new();
    for n in 0..300i64 {
        let offset = p.good(&t, (n % 3) as i32, &format!("m-{n}")).await;
        assert_eq!(offset, n / 3, "fresh topic: record {n}");
    }
    let s = side(&t, &g);
    let mut src = start(&s, 1000);
    let got = src.take(300, TAKE).await;
    let mut seen = BTreeSet::new();
    for m in got {
        let ident = m.identity.as_ref().expect("a well-formed record");
        let n: i64 = ident.id.strip_prefix("m-").unwrap().parse().unwrap();
        assert_eq!(ident.business_id, format!("u-m-{n}"));
        assert_eq!(&*m.origin.side, "kafka");
        assert_eq!(&*m.origin.topic, t);
        assert_eq!(m.origin.partition, (n % 3) as i32, "record {n}");
        assert_eq!(m.origin.offset, n / 3, "record {n}");
        assert_eq!(
            m.payload,
            format!(r#"{{"user_id":"u-m-{n}"}}"#).into_bytes()
        );
        assert!(seen.insert(n), "record {n} twice");
        m.ack.done();
    }
    assert_eq!(seen.len(), 300);
    let took = src.stop().await;
    eprintln!("cancel with everything acked returned in {took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert_eq!(committed(&t, &g, 3).await, vec![100, 100, 100]);

    // The same group again: nothing old, only what is written now.
    let mut again = start(&s, 1000);
    for part in 0..3 {
        p.good(&t, part, &format!("mark-{part}")).await;
    }
    let got = again.take_until_markers("mark-", 3, TAKE).await;
    let ids: Vec<String> = got.iter().map(id).collect();
    assert_eq!(got.len(), 3, "only the markers: {ids:?}");
    got.into_iter().for_each(|m| m.ack.done());
    again.quiet(Duration::from_secs(1)).await;
    again.stop().await;
    assert_eq!(committed(&t, &g, 3).await, vec![101, 101, 101]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_at_the_first_unfinished_offset_of_each_partition() {
    let (t, g, _cleanup) = topic("kafka_gap", 3).await;
    let p = Producer::new();
    for part in 0..3 {
        for i in 0..10 {
            p.good(&t, part, &format!("r-{part}-{i}")).await;
        }
    }
    let s = side(&t, &g);
    let mut src = start(&s, 100);
    // Partition 0: all finished. 1: a gap at 5. 2: the tail from 7 unfinished.
    let unfinished = |part: i32, off: i64| (part == 1 && off == 5) || (part == 2 && off >= 7);
    for m in src.take(30, TAKE).await {
        if unfinished(m.origin.partition, m.origin.offset) {
            drop(m); // handed back without a fate
        } else {
            m.ack.done();
        }
    }
    let took = src.stop().await;
    eprintln!("cancel returned in {took:?}");
    assert_eq!(
        committed(&t, &g, 3).await,
        vec![10, 5, 7],
        "each partition committed up to its first unfinished copy, not past it"
    );

    let mut again = start(&s, 100);
    for part in 0..3 {
        p.good(&t, part, &format!("mark-{part}")).await;
    }
    let got = again.take_until_markers("mark-", 3, TAKE).await;
    let mut per_part: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for m in &got {
        if !id(m).starts_with("mark-") {
            per_part
                .entry(m.origin.partition)
                .or_default()
                .push(m.origin.offset);
        }
    }
    let want: BTreeMap<i32, Vec<i64>> = [(1, (5..10).collect()), (2, (7..10).collect())]
        .into_iter()
        .collect();
    assert_eq!(
        per_part, want,
        "exactly the records from the first unfinished offset on, in order"
    );
    got.into_iter().for_each(|m| m.ack.done());
    again.stop().await;
    assert_eq!(committed(&t, &g, 3).await, vec![11, 11, 11]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_without_ids_arrive_as_bad_input_and_their_acks_move_the_offset() {
    let (t, g, _cleanup) = topic("kafka_bad", 1).await;
    let p = Producer::new();
    p.put(&t, 0, None, Some(br#"{"user_id":"u-1"}"#)).await;
    p.put(&t, 0, Some("b-2"), Some(b"not json")).await;
    p.put(&t, 0, Some("b-3"), None).await;
    p.good(&t, 0, "b-4").await;
    let mut src = start(&side(&t, &g), 100);
    let got = src.take(4, TAKE).await;
    let offsets: Vec<i64> = got.iter().map(|m| m.origin.offset).collect();
    assert_eq!(offsets, vec![0, 1, 2, 3]);
    let reason = |m: &Message| m.identity.as_ref().expect_err("bad input").0.clone();
    assert_eq!(reason(&got[0]), "message id: no header `msg-id`");
    assert!(
        reason(&got[1]).starts_with("business id: body is not JSON"),
        "{}",
        reason(&got[1])
    );
    assert!(reason(&got[2]).contains("no value"), "{}", reason(&got[2]));
    assert_eq!(got[1].payload, b"not json");
    assert_eq!(got[3].identity.as_ref().unwrap().id, "b-4");
    got.into_iter().for_each(|m| m.ack.done());
    // The periodic store plus librdkafka's auto-commit, without a shutdown.
    committed_becomes(&t, &g, &[4]).await;
    src.stop().await;
    assert_eq!(committed(&t, &g, 1).await, vec![4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_stops_delivery_and_resuming_continues_where_it_stopped() {
    let (t, g, _cleanup) = topic("kafka_pause", 1).await;
    let p = Producer::new();
    p.good(&t, 0, "w-0").await;
    let mut src = start(&side(&t, &g), 100);
    src.take(1, TAKE)
        .await
        .into_iter()
        .for_each(|m| m.ack.done());

    src.paused.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 1..=10 {
        p.good(&t, 0, &format!("w-{i}")).await;
    }
    src.quiet(Duration::from_secs(3)).await;

    src.paused.send(false).unwrap();
    let started = Instant::now();
    let got = src.take(10, TAKE).await;
    eprintln!("10 copies within {:?} of the resume", started.elapsed());
    let offsets: Vec<i64> = got.iter().map(|m| m.origin.offset).collect();
    assert_eq!(offsets, (1..=10).collect::<Vec<_>>());
    got.into_iter().for_each(|m| m.ack.done());
    src.stop().await;
    assert_eq!(committed(&t, &g, 1).await, vec![11]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pipeline_holds_records_back_without_losing_or_repeating_any() {
    let (t, g, _cleanup) = topic("kafka_full", 2).await;
    let w = KafkaWriter::connect(&bootstrap()).unwrap_or_else(|e| unreachable("connecting", &e));
    for i in 0..200 {
        let (id, body) = (format!("f-{i}"), format!(r#"{{"user_id":"u-{i}"}}"#));
        w.send(&t, &format!("k-{i}"), &[("msg-id", &id)], body.as_bytes())
            .await
            .unwrap();
    }
    w.flush().await;
    let mut src = start(&side(&t, &g), 4);
    // The pipeline takes nothing for a while: the source must hold back, not drop.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = src.take(200, TAKE).await;
    let mut per_part: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    let mut ids = BTreeSet::new();
    for m in &got {
        per_part
            .entry(m.origin.partition)
            .or_default()
            .push(m.origin.offset);
        assert!(ids.insert(id(m)), "{} twice", id(m));
    }
    let mut ends = Vec::new();
    for (part, offsets) in &per_part {
        let n = offsets.len() as i64;
        assert_eq!(
            offsets,
            &(0..n).collect::<Vec<_>>(),
            "partition {part} in order, no gap"
        );
        ends.push(n);
    }
    assert_eq!(ends.iter().sum::<i64>(), 200);
    got.into_iter().for_each(|m| m.ack.done());
    src.quiet(Duration::from_millis(500)).await;
    src.stop().await;
    let want: Vec<i64> = (0..2)
        .map(|p| per_part.get(&p).map_or(-1, |o| o.len() as i64))
        .collect();
    assert_eq!(committed(&t, &g, 2).await, want);
}

/// How the group hands partitions over when a member joins.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// Classic protocol, eager assignor (librdkafka's default): every partition is revoked and
    /// assigned again.
    Eager,
    /// Classic protocol, `cooperative-sticky`: only the partitions that move are revoked.
    Cooperative,
    /// KIP-848 (`group.protocol=consumer`): the broker assigns, incrementally.
    Kip848,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_commits_finished_work_and_hands_unfinished_records_to_the_new_owner() {
    rebalance_scenario("kafka_rebalance", Protocol::Eager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cooperative_rebalance_commits_finished_work_and_hands_over_only_what_moves() {
    rebalance_scenario("kafka_rebalance_coop", Protocol::Cooperative).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kip848_rebalance_commits_finished_work_and_hands_over_only_what_moves() {
    rebalance_scenario("kafka_rebalance_848", Protocol::Kip848).await;
}

/// Member A takes 40 records over 4 partitions and finishes those of partitions 0 and 1 only;
/// member B joins. Finished work must be committed on revoke (never read again), unfinished
/// records of a partition that changed hands must reach the new owner, and nothing is committed
/// past an unfinished copy at any time.
async fn rebalance_scenario(test: &str, protocol: Protocol) {
    let (t, g, _cleanup) = topic(test, 4).await;
    let p = Producer::new();
    let mut end = [0i64; 4];
    for part in 0..4 {
        for i in 0..10 {
            end[part as usize] = p.good(&t, part, &format!("e-{part}-{i}")).await + 1;
        }
    }
    let props: &[(&str, &str)] = match protocol {
        Protocol::Eager => &[],
        Protocol::Cooperative => &[("partition.assignment.strategy", "cooperative-sticky")],
        Protocol::Kip848 => &[("group.protocol", "consumer")],
    };
    let s = side_with(&t, &g, props);
    let mut a = start(&s, 1000);
    // A finishes partitions 0 and 1 and holds 2 and 3 unfinished.
    let mut held_by_a = Vec::new();
    for m in a.take(40, TAKE).await {
        if m.origin.partition < 2 {
            m.ack.done();
        } else {
            held_by_a.push(m);
        }
    }

    // B joins. Markers go to every partition until B receives something (the rebalance is
    // done), then one end marker per partition; everything is acked as it comes except the
    // redelivered originals of partitions 2 and 3.
    let started = Instant::now();
    let mut b = start(&s, 1000);
    let mut log: Vec<(char, i32, i64, String)> = Vec::new();
    let mut held_new: Vec<(char, Message)> = Vec::new();
    let mut owner_of_end: BTreeMap<i32, char> = BTreeMap::new();
    let (mut b_live, mut ends_sent, mut round) = (false, false, 0);
    let mut next_marker = Instant::now();
    while owner_of_end.len() < 4 {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "rebalance did not settle: {log:?}"
        );
        if !ends_sent && Instant::now() >= next_marker {
            for part in 0..4 {
                let what = if b_live {
                    format!("end-{part}")
                } else {
                    format!("mk-{part}-{round}")
                };
                end[part as usize] = p.good(&t, part, &what).await + 1;
            }
            ends_sent = b_live;
            round += 1;
            next_marker = Instant::now() + Duration::from_millis(500);
        }
        let (who, m) = tokio::select! {
            Some(m) = a.rx.recv() => ('A', m),
            Some(m) = b.rx.recv() => ('B', m),
            () = tokio::time::sleep(Duration::from_millis(100)) => continue,
        };
        b_live |= who == 'B';
        let mid = id(&m);
        log.push((who, m.origin.partition, m.origin.offset, mid.clone()));
        if mid.starts_with("end-") {
            owner_of_end.insert(m.origin.partition, who);
        }
        if mid.starts_with("e-") {
            assert!(
                m.origin.partition >= 2,
                "{mid} was finished before the rebalance and committed on revoke: it must not come again"
            );
            held_new.push((who, m));
        } else {
            m.ack.done();
        }
    }
    eprintln!(
        "rebalance settled in {:?}; owners {owner_of_end:?}",
        started.elapsed()
    );
    let owners: BTreeSet<char> = owner_of_end.values().copied().collect();
    assert_eq!(
        owners,
        BTreeSet::from(['A', 'B']),
        "both members own partitions"
    );

    // Every unfinished original of a partition that was revoked came again, to the partition's
    // owner. Eager revokes all (A gets its share back from the last commit); incremental
    // protocols revoke only what moves to B, and A keeps its copies of the rest in flight.
    let mut again: BTreeSet<(i32, i64)> = BTreeSet::new();
    for (who, m) in &held_new {
        assert_eq!(
            Some(who),
            owner_of_end.get(&m.origin.partition),
            "{} delivered by a member that does not own its partition",
            id(m)
        );
        again.insert((m.origin.partition, m.origin.offset));
    }
    let revoked = |p: i32| protocol == Protocol::Eager || owner_of_end.get(&p) == Some(&'B');
    let want: BTreeSet<(i32, i64)> = (2..4)
        .filter(|p| revoked(*p))
        .flat_map(|p| (0..10).map(move |o| (p, o)))
        .collect();
    assert_eq!(
        again, want,
        "unfinished records of revoked partitions come again"
    );

    // Finished work is committed; nothing past the unfinished originals is, although markers
    // after them were acked.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = committed(&t, &g, 4).await;
        assert!(
            now[2] <= 0 && now[3] <= 0,
            "committed past unfinished copies: {now:?}"
        );
        if now[..2] == end[..2] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "finished partitions not committed: {now:?}, want {end:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Past a few more commit rounds, still not past them.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let now = committed(&t, &g, 4).await;
    assert!(now[2] <= 0 && now[3] <= 0, "{now:?}");

    // The new owners finish them; the old member's acks arrive late and change nothing wrong.
    held_new.into_iter().for_each(|(_, m)| m.ack.done());
    held_by_a.into_iter().for_each(|m| m.ack.done());
    committed_becomes(&t, &g, &end).await;
    let (ta, tb) = (a.stop().await, b.stop().await);
    eprintln!("cancel returned in {ta:?} (A) and {tb:?} (B)");
    assert_eq!(committed(&t, &g, 4).await, end.to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_while_the_pipeline_is_full_loses_nothing_and_commits_to_the_end() {
    let (t, g, _cleanup) = topic("kafka_rebalance_full", 4).await;
    let p = Producer::new();
    let mut end = [0i64; 4];
    for part in 0..4 {
        for i in 0..25 {
            end[part as usize] = p.good(&t, part, &format!("e-{part}-{i}")).await + 1;
        }
    }
    let s = side(&t, &g);
    // A's pipeline is tiny and stalls: A holds copies back and pauses its partitions.
    let mut a = start(&s, 2);
    let first = a.take(1, TAKE).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // B joins while A is paused with copies held; every partition is revoked (eager), A's held
    // copies are dropped, and whoever owns their partition now reads them again. A stays stalled
    // until B has its share.
    let started = Instant::now();
    let mut b = start(&s, 1000);
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut by: BTreeMap<char, usize> = BTreeMap::new();
    let m = b.take(1, TAKE).await.pop().unwrap();
    eprintln!("B's first copy after {:?}", started.elapsed());
    for m in first.into_iter().chain([m]) {
        *seen.entry(id(&m)).or_default() += 1;
        m.ack.done();
    }
    by.insert('B', 1);
    while seen.len() < 100 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{} of 100 records, deliveries per member {by:?}",
            seen.len()
        );
        let (who, m) = tokio::select! {
            Some(m) = a.rx.recv() => ('A', m),
            Some(m) = b.rx.recv() => ('B', m),
            () = tokio::time::sleep(Duration::from_millis(100)) => continue,
        };
        *by.entry(who).or_default() += 1;
        *seen.entry(id(&m)).or_default() += 1;
        m.ack.done();
    }
    eprintln!(
        "all 100 records within {:?}; deliveries per member {by:?}",
        started.elapsed()
    );
    // Nothing held back forever: the commit reaches the end of every partition.
    committed_becomes(&t, &g, &end).await;
    a.stop().await;
    b.stop().await;
    assert_eq!(committed(&t, &g, 4).await, end.to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_waits_for_in_flight_acks_then_commits_them() {
    let (t, g, _cleanup) = topic("kafka_cancel_wait", 1).await;
    let p = Producer::new();
    p.good(&t, 0, "c-0").await;
    let mut src = start(&side(&t, &g), 100);
    let mut got = src.take(1, TAKE).await;
    let m = got.pop().unwrap();
    let started = Instant::now();
    src.cancel.cancel();
    tokio::time::sleep(Duration::from_millis(700)).await;
    m.ack.done(); // the pipeline finishes it during the grace period
    let result = tokio::time::timeout(Duration::from_secs(10), src.task)
        .await
        .expect("returns")
        .expect("no panic");
    let took = started.elapsed();
    eprintln!("cancel with one copy in flight returned in {took:?}");
    assert!(result.is_ok(), "{result:?}");
    assert!(
        took < Duration::from_secs(3),
        "returned {took:?} after the cancel"
    );
    assert_eq!(committed(&t, &g, 1).await, vec![1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_gives_up_on_acks_that_never_come_and_leaves_them_uncommitted() {
    let (t, g, _cleanup) = topic("kafka_cancel_grace", 1).await;
    let p = Producer::new();
    p.good(&t, 0, "c-0").await;
    p.good(&t, 0, "c-1").await;
    let mut src = start(&side(&t, &g), 100);
    let mut got = src.take(2, TAKE).await;
    got.remove(0).ack.done();
    let stuck = got.pop().unwrap(); // never finished, never dropped
    let started = Instant::now();
    src.cancel.cancel();
    let result = tokio::time::timeout(Duration::from_secs(15), src.task)
        .await
        .expect("returns")
        .expect("no panic");
    let took = started.elapsed();
    eprintln!("cancel with a stuck copy returned in {took:?}");
    assert!(result.is_ok(), "{result:?}");
    assert!(
        took >= kafka::DRAIN_TIMEOUT && took < kafka::DRAIN_TIMEOUT + Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(
        committed(&t, &g, 1).await,
        vec![1],
        "stops before the stuck copy"
    );
    drop(stuck);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_fails_the_start_with_the_address() {
    logs();
    let mut s = side("nowhere", "nowhere-group");
    let port = common::free_port();
    s.kafka.as_mut().unwrap().bootstrap_servers = format!("127.0.0.1:{port}");
    let src = start(&s, 1);
    let result = tokio::time::timeout(Duration::from_secs(30), src.task)
        .await
        .expect("gives up within 30 s")
        .expect("no panic");
    match result {
        Err(SourceError::Start { reason, .. }) => {
            assert!(reason.contains(&port.to_string()), "{reason}")
        }
        other => panic!("expected a start error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_properties_fail_the_build() {
    let mut s = side("t", "g");
    s.kafka
        .as_mut()
        .unwrap()
        .properties
        .insert("enable.auto.offset.store".into(), "true".into());
    match kafka::build(&s) {
        Err(SourceError::Start { reason, .. }) => {
            assert!(reason.contains("enable.auto.offset.store"), "{reason}")
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("accepted enable.auto.offset.store=true"),
    }
}

/// The lag series `topic/partition` → messages for partitions `0..` of `topic`.
fn lag_map(topic: &str, per_partition: &[i64]) -> BTreeMap<String, i64> {
    per_partition
        .iter()
        .enumerate()
        .map(|(p, n)| (format!("{topic}/{p}"), *n))
        .collect()
}

/// Waits until the source has received its first assignment.
async fn joined(src: &Running) {
    let mut joined = src.membership.joined();
    tokio::time::timeout(TAKE, joined.wait_for(|j| *j))
        .await
        .expect("the source joins its group")
        .expect("membership alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_counts_unfinished_records_per_partition_and_falls_to_zero_once_they_are_acked() {
    let (t, g, _cleanup) = topic("kafka_lag", 3).await;
    let p = Producer::new();
    for i in 0..4 {
        p.good(&t, 0, &format!("l-0-{i}")).await;
    }
    for i in 0..6 {
        p.good(&t, 1, &format!("l-1-{i}")).await;
    }
    let started = Instant::now();
    let mut src = start(&side(&t, &g), 100);
    joined(&src).await;
    eprintln!("joined after {:?}", started.elapsed());
    assert_eq!(src.assigned(), 3, "every partition of the topic");
    assert_eq!(src.rebalances(), 1);

    // The pipeline holds everything unacknowledged: the committed offsets stay at 0.
    let mut held = src.take(10, TAKE).await;
    src.lags_become(&lag_map(&t, &[4, 6, 0]), Duration::from_secs(10))
        .await;
    for i in 0..2 {
        p.good(&t, 2, &format!("l-2-{i}")).await;
    }
    held.extend(src.take(2, TAKE).await);
    let took = src
        .lags_become(&lag_map(&t, &[4, 6, 2]), Duration::from_secs(10))
        .await;
    eprintln!("new records shown as lag within {took:?}");

    // Half of partition 1 finished (offsets 0-2): its committed offset moves to 3.
    let (done, rest): (Vec<Message>, Vec<Message>) = held
        .into_iter()
        .partition(|m| m.origin.partition == 1 && m.origin.offset < 3);
    done.into_iter().for_each(|m| m.ack.done());
    src.lags_become(&lag_map(&t, &[4, 3, 2]), Duration::from_secs(10))
        .await;
    rest.into_iter().for_each(|m| m.ack.done());
    let took = src
        .lags_become(&lag_map(&t, &[0, 0, 0]), Duration::from_secs(10))
        .await;
    eprintln!("lag 0 within {took:?} of the last ack (auto-commit every second)");

    let metrics = src.metrics.clone();
    src.stop().await;
    assert!(
        !metrics.render().contains("mqc_consumer_lag_messages{"),
        "a stopped source shows no lag"
    );
    assert_eq!(metrics.assigned.with_label_values(&["kafka"]).get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_moves_the_lag_series_with_the_partitions_and_a_member_without_any_has_joined()
{
    let (t, g, _cleanup) = topic("kafka_lag_rebalance", 2).await;
    let p = Producer::new();
    for i in 0..3 {
        p.good(&t, 0, &format!("r-0-{i}")).await;
    }
    for i in 0..5 {
        p.good(&t, 1, &format!("r-1-{i}")).await;
    }
    let s = side(&t, &g);
    let mut a = start(&s, 100);
    let held = a.take(8, TAKE).await; // never acked while the group changes
    a.lags_become(&lag_map(&t, &[3, 5]), Duration::from_secs(10))
        .await;
    assert_eq!(a.assigned(), 2);

    // Two more members for two partitions: one of the three holds none, and has joined.
    let started = Instant::now();
    let members = [a, start(&s, 100), start(&s, 100)];
    for m in &members[1..] {
        joined(m).await;
    }
    let want = lag_map(&t, &[3, 5]);
    loop {
        let assigned: Vec<i64> = members.iter().map(Running::assigned).collect();
        let series: Vec<BTreeMap<String, i64>> = members.iter().map(Running::lags).collect();
        let union: BTreeMap<String, i64> = series
            .iter()
            .flatten()
            .map(|(q, n)| (q.clone(), *n))
            .collect();
        let settled = assigned.iter().sum::<i64>() == 2
            && series.iter().map(BTreeMap::len).sum::<usize>() == 2
            && union == want
            && members
                .iter()
                .all(|m| m.lags().keys().cloned().collect::<Vec<_>>() == m.membership.held());
        if settled {
            eprintln!(
                "settled within {:?}: assigned {assigned:?}, rebalances {:?}",
                started.elapsed(),
                members.iter().map(Running::rebalances).collect::<Vec<_>>()
            );
            assert!(assigned.contains(&0), "{assigned:?}");
            assert_eq!(
                members[0].rebalances(),
                2,
                "the join and the one the newcomers caused"
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "assigned {assigned:?}, lag series {series:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    held.into_iter().for_each(|m| m.ack.done());
    for m in members {
        m.stop().await;
    }
}

/// Adoption reads a copy again by its position: the record at that offset, with its identity,
/// whatever the consumer group did with it; `None` for an offset the log never had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_is_read_again_by_its_position_and_a_missing_one_is_none() {
    let (topic, group, _cleanup) = topic("kafka-refetch", 2).await;
    let producer = Producer::new();
    let mut at = Vec::new();
    for i in 0..5 {
        at.push(producer.good(&topic, 1, &format!("r-{i}")).await);
    }
    let source = kafka::build(&side(&topic, &group)).expect("build");
    let refetch = source
        .refetcher()
        .expect("a Kafka source reads by position");
    let position = |offset| mq_cutover::source::Position {
        topic: topic.as_str().into(),
        partition: 1,
        offset,
        broker: None,
    };
    // Out of order, the same one twice: each read stands alone.
    for i in [3usize, 0, 3, 4] {
        let copy = refetch
            .refetch(&position(at[i]))
            .await
            .expect("broker answers")
            .expect("the record is there");
        let ident = copy.identity.expect("identity");
        assert_eq!(ident.id, format!("r-{i}"));
        assert_eq!(ident.business_id, format!("u-r-{i}"));
        assert_eq!(
            copy.payload,
            format!(r#"{{"user_id":"u-r-{i}"}}"#).into_bytes()
        );
        assert!(copy.born_ms > 0);
    }
    // Past the end of the log: never written.
    let past = refetch
        .refetch(&position(at[4] + 10))
        .await
        .expect("answers");
    assert!(past.is_none(), "{past:?}");
    // Reading again commits nothing for the group.
    assert_eq!(committed(&topic, &group, 2).await, vec![-1, -1]);
}

/// Many positions at once (what a broker outage on the owner's side brings): two partitions,
/// out of order, repeats, gaps long enough to seek over, and offsets never written; one answer
/// per position, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_records_are_read_again_in_one_batch_across_partitions_and_gaps() {
    let (topic, group, _cleanup) = topic("kafka-refetch-many", 2).await;
    let producer = Producer::new();
    let mut at = [Vec::new(), Vec::new()];
    for i in 0..1200 {
        let p = i % 2;
        at[p as usize].push(producer.good(&topic, p, &format!("m-{i}")).await);
    }
    let source = kafka::build(&side(&topic, &group)).expect("build");
    let refetch = source
        .refetcher()
        .expect("a Kafka source reads by position");
    // Partition p's record k holds id m-{2k+p}.
    let wanted: Vec<(i32, usize)> = vec![
        (1, 599),
        (0, 3),
        (1, 0),
        (0, 3),
        (0, 1),
        (1, 2),
        (0, 580),
        (1, 598),
        (0, 2),
    ];
    let mut positions: Vec<mq_cutover::source::Position> = wanted
        .iter()
        .map(|(p, k)| mq_cutover::source::Position {
            topic: topic.as_str().into(),
            partition: *p,
            offset: at[*p as usize][*k],
            broker: None,
        })
        .collect();
    // Never written: past the end of partition 0.
    let mut past = positions[1].clone();
    past.offset = at[0][599] + 5;
    positions.push(past);
    let start = Instant::now();
    let got = refetch.refetch_many(&positions).await;
    let took = start.elapsed();
    assert_eq!(got.len(), positions.len());
    for ((p, k), copy) in wanted.iter().zip(&got) {
        let copy = copy
            .as_ref()
            .expect("broker answers")
            .as_ref()
            .unwrap_or_else(|| panic!("partition {p} record {k} is there"));
        assert_eq!(
            copy.identity.as_ref().expect("identity").id,
            format!("m-{}", 2 * k + *p as usize)
        );
    }
    assert!(
        got.last().unwrap().as_ref().expect("answers").is_none(),
        "never written"
    );
    eprintln!("{} positions read again in {took:?}", positions.len());
}

/// What holds the source's fetching while the group rebalances.
#[derive(Clone, Copy, Debug)]
enum Hold {
    /// The daemon's pause switch (Redis down, circuit open).
    Daemon,
    /// Backpressure: the pipeline takes nothing, the source's channel is full.
    Backpressure,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_pause_lifted_during_a_rebalance_leaves_no_partition_paused() {
    paused_rebalance_scenario("kafka_pause_rebalance", Hold::Daemon).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_lifted_during_a_rebalance_leaves_no_partition_paused() {
    paused_rebalance_scenario("kafka_full_rebalance", Hold::Backpressure).await;
}

/// A group member that joins, takes its share, then stops polling: the next rebalance cannot
/// complete until it is closed, so the other members sit revoked (with nothing assigned) for as
/// long as the test likes.
async fn staller(topic: &str, group: &str) -> BaseConsumer {
    let (topic, group) = (topic.to_owned(), group.to_owned());
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap())
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("session.timeout.ms", "45000")
            .create()
            .expect("consumer");
        c.subscribe(&[&topic]).expect("subscribe");
        let deadline = Instant::now() + TAKE;
        while c.assignment().map(|a| a.count()).unwrap_or(0) == 0 {
            assert!(
                Instant::now() < deadline,
                "the staller never got partitions"
            );
            // Records it reads are never committed: the others read them again.
            let _ = c.poll(Duration::from_millis(100));
        }
        c
    })
    .await
    .expect("staller")
}

/// The order librdkafka does not forgive (confluentinc/librdkafka#1849): fetching is held (the
/// daemon's pause, or backpressure), an eager rebalance revokes every partition, the hold is
/// lifted while nothing is assigned, then the partitions come back. They must come back
/// fetching. A member that stops polling keeps the rebalance open, so the lift lands in that
/// window every time; then it leaves, and later the second member leaves too. Every record of
/// the topic must reach the pipeline.
async fn paused_rebalance_scenario(test: &str, hold: Hold) {
    let (t, g, _cleanup) = topic(test, 4).await;
    let p = Producer::new();
    let mut want: BTreeSet<String> = BTreeSet::new();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let put = |prefix: &'static str| {
        let (p, t) = (&p, &t);
        async move {
            let mut ids = Vec::new();
            for part in 0..4 {
                for i in 0..10 {
                    let id = format!("{prefix}-{part}-{i}");
                    p.good(t, part, &id).await;
                    ids.push(id);
                }
            }
            ids
        }
    };
    let s = side(&t, &g);
    want.extend(put("a").await);
    let mut a = match hold {
        Hold::Daemon => {
            let mut a = start(&s, 1000);
            for m in a.take(40, TAKE).await {
                seen.insert(id(&m));
                m.ack.done();
            }
            a.paused.send(true).unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
            want.extend(put("b").await);
            a
        }
        Hold::Backpressure => {
            // Two copies fill the channel; the rest wait in the source, fetching paused.
            let a = start(&s, 2);
            joined(&a).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            a
        }
    };

    let c = staller(&t, &g).await;
    let settled = common::eventually(TAKE, || async {
        a.membership.held().len() + c.assignment().map(|x| x.count()).unwrap_or(0) == 4
    })
    .await;
    assert!(
        settled.is_some(),
        "A and the staller never shared the partitions"
    );
    // B joins: A is revoked and waits for the staller, which never answers.
    let mut b = start(&s, 1000);
    let revoked = common::eventually(TAKE, || async { a.membership.held().is_empty() }).await;
    assert!(revoked.is_some(), "A was never revoked");
    match hold {
        Hold::Daemon => a.paused.send(false).unwrap(),
        Hold::Backpressure => {
            while let Ok(m) = a.rx.try_recv() {
                seen.insert(id(&m));
                m.ack.done();
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        a.membership.held().is_empty(),
        "the hold must be lifted while A holds nothing, or the test proves nothing"
    );
    // The staller leaves: the rebalance completes, A and B share the partitions.
    tokio::task::spawn_blocking(move || drop(c))
        .await
        .expect("staller closed");

    let started = Instant::now();
    let mut by: BTreeMap<char, usize> = BTreeMap::new();
    while !want.is_subset(&seen) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{hold:?}: {} of {} records within 30 s (deliveries {by:?}; A holds {:?}, B holds {:?}); missing e.g. {:?}",
            want.intersection(&seen).count(),
            want.len(),
            a.membership.held(),
            b.membership.held(),
            want.difference(&seen).take(5).collect::<Vec<_>>()
        );
        let (who, m) = tokio::select! {
            Some(m) = a.rx.recv() => ('A', m),
            Some(m) = b.rx.recv() => ('B', m),
            () = tokio::time::sleep(Duration::from_millis(100)) => continue,
        };
        note(&mut by, &mut seen, who, m);
    }
    assert!(
        !a.membership.held().is_empty(),
        "A holds partitions again, and they flowed"
    );
    eprintln!(
        "{hold:?}: every record within {:?} of the rebalance; deliveries {by:?}",
        started.elapsed()
    );

    // B leaves: A takes every partition, and reads what comes next on each.
    b.stop().await;
    want.extend(put("c").await);
    let started = Instant::now();
    while !want.is_subset(&seen) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{hold:?}: after B left, missing e.g. {:?} (A holds {:?})",
            want.difference(&seen).take(5).collect::<Vec<_>>(),
            a.membership.held()
        );
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(100), a.rx.recv()).await {
            note(&mut by, &mut seen, 'A', m);
        }
    }
    a.stop().await;
}

/// Counts a delivery by `who`, remembers its id and acknowledges it.
fn note(by: &mut BTreeMap<char, usize>, seen: &mut BTreeSet<String>, who: char, m: Message) {
    *by.entry(who).or_default() += 1;
    seen.insert(id(&m));
    m.ack.done();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_side_that_reads_nothing_while_messages_wait_is_stalled_until_it_reads_again() {
    let (t, g, _cleanup) = topic("kafka_stall", 2).await;
    let p = Producer::new();
    let mut want = BTreeSet::new();
    for part in 0..2 {
        for i in 0..50 {
            let id = format!("s-{part}-{i}");
            p.good(&t, part, &id).await;
            want.insert(id);
        }
    }
    // The pipeline takes two copies and then nothing: the source holds back, messages wait.
    let mut src = start(&side(&t, &g), 2);
    joined(&src).await;
    let all = vec![format!("{t}/0"), format!("{t}/1")];
    let flagged = common::eventually(TAKE, || async { src.membership.stalled() == all }).await;
    assert!(
        flagged.is_some(),
        "never stalled: {:?}",
        src.membership.stalled()
    );
    let stalls = src.metrics.stalls.with_label_values(&["kafka"]);
    let gauge = src.metrics.stalled.with_label_values(&["kafka"]);
    assert_eq!((gauge.get(), stalls.get()), (2, 2));
    eprintln!("both partitions stalled {flagged:?} after joining");

    // Paused on purpose: not a stall (that pause has its own readiness reason).
    src.paused.send(true).unwrap();
    assert!(src.membership.stalled().is_empty());
    tokio::time::sleep(TEST_STALL_AFTER * 2).await;
    assert!(src.membership.stalled().is_empty());
    assert_eq!(gauge.get(), 0);
    src.paused.send(false).unwrap();
    let again = common::eventually(TAKE, || async { src.membership.stalled() == all }).await;
    assert!(
        again.is_some(),
        "still holding back after the resume: stalled again"
    );

    // The pipeline takes everything: the stall ends.
    let mut seen = BTreeSet::new();
    while !want.is_subset(&seen) {
        for m in src.take(1, TAKE).await {
            seen.insert(id(&m));
            m.ack.done();
        }
    }
    let over = common::eventually(TAKE, || async { src.membership.stalled().is_empty() }).await;
    assert!(over.is_some(), "{:?}", src.membership.stalled());
    assert_eq!((gauge.get(), stalls.get()), (0, 4));
    src.stop().await;
}
