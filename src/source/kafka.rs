//! The Kafka side: [`KafkaSource`], a consumer-group member that turns records into
//! [`Message`]s and commits a partition's offset only up to the first copy whose fate is not
//! recorded yet; and [`KafkaWriter`], a thin producer for the traffic generator and the tests.
//!
//! The commit rule (docs/kafka.md has the whole story): librdkafka never stores an offset by
//! itself (`enable.auto.offset.store=false`). Every [`COMMIT_INTERVAL`] the source drains the
//! pipeline's acks into its [`OffsetTracker`] and stores, per partition, the lowest unfinished
//! offset (or one past the highest finished one); librdkafka's auto-commit sends what is stored.
//! When partitions are revoked, and at shutdown, what is finished is committed synchronously and
//! the partitions are forgotten, so a crash or a rebalance can only cause a redelivery, never a
//! skip. Backpressure pauses the assigned partitions instead of not polling, so the consumer keeps
//! its group membership and takes part in rebalances while the pipeline is busy or halted.
//!
//! The rebalance callbacks keep the source's [`Membership`] (joined, partitions held,
//! rebalances) and give newly assigned partitions the loop's wanted pause state; a task beside
//! the consume loop measures each held partition every [`Membership::lag_interval`] on the
//! blocking pool: its lag (the group's committed offset against the end of the log) and, for the
//! stall detector, the consumer's position (docs/kafka.md, "Lag").

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedHeaders, BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::Message as _;
use tokio::sync::mpsc::{self, error::TryRecvError, error::TrySendError};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{Membership, OffsetTracker, Reading, Source, SourceContext, SourceError};
use crate::message::{read_identity, Ack, BadInput, Finished, Message, Origin, Side};
use crate::source::config::{IdSource, SideConfig};

/// How often finished offsets are handed to librdkafka (stored; auto-commit sends them).
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(200);

/// How long shutdown waits for copies already handed to the pipeline to be acknowledged.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the start-up check waits for a broker to answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a source the brokers refuse (credentials, TLS) waits between two tries.
const REFUSED_RETRY: Duration = Duration::from_secs(2);

/// How long leaving the group may take before the source stops waiting for it.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// While paused for backpressure, how often to look whether the pipeline has room again.
const ROOM_RECHECK: Duration = Duration::from_millis(20);

/// How often, while fetching is wanted, the whole assignment is resumed again (see
/// `Fetch::reconcile`).
const RECONCILE_INTERVAL: Duration = Duration::from_secs(5);

/// How long each request of a lag measurement may wait for a broker.
const LAG_TIMEOUT: Duration = Duration::from_secs(2);

/// Set before the user's properties. Only `auto.offset.reset` may be changed by them; the others
/// are what the source depends on, and a property naming one is refused
/// ([`crate::source::config::refused_kafka_property`]).
const DEFAULTS: &[(&str, &str)] = &[
    ("enable.auto.commit", "true"),
    ("auto.commit.interval.ms", "1000"),
    ("auto.offset.reset", "earliest"),
    ("enable.partition.eof", "false"),
    // Only offsets this source stores are committed: the heart of the guarantee.
    ("enable.auto.offset.store", "false"),
];

/// A Kafka consumer-group member feeding the pipeline; see the module documentation.
pub struct KafkaSource {
    side: Side,
    config: ClientConfig,
    bootstrap: String,
    group: String,
    topics: Vec<String>,
    message_id: IdSource,
    business_id: IdSource,
    /// Where a partition without a committed offset starts (`auto.offset.reset`): at the
    /// beginning (true) or at the end; the lag of such a partition is measured from there.
    reset_to_start: bool,
    /// Whether `security.protocol` is SSL or SASL_SSL.
    tls: bool,
    /// `pipeline.max_message_bytes` from the context once the source runs, for its refetcher
    /// too (built before).
    max_message_bytes: Arc<AtomicUsize>,
}

/// Builds the Kafka source of `side` (`kind = "kafka"`); checks the consumer settings without
/// any I/O.
pub fn build(side: &SideConfig) -> Result<Box<dyn Source>, SourceError> {
    Ok(Box::new(KafkaSource::new(side)?))
}

impl KafkaSource {
    /// The source of `side`. Refuses a side without a `[side.kafka]` table, a property the source
    /// sets itself and depends on (as config validation does: `group.id`,
    /// `enable.auto.offset.store`, `enable.auto.commit`, …), and a property librdkafka does not
    /// accept.
    pub fn new(side: &SideConfig) -> Result<KafkaSource, SourceError> {
        let name: Side = side.name.as_str().into();
        let refuse = |reason: String| SourceError::Start {
            side: name.clone(),
            reason,
        };
        let kafka = side
            .kafka
            .as_ref()
            .ok_or_else(|| refuse("the side has no `[side.kafka]` table".into()))?;
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &kafka.bootstrap_servers)
            .set("group.id", &kafka.group_id)
            .set("client.id", format!("mq-cutover-{}", side.name));
        for (key, value) in DEFAULTS {
            config.set(*key, *value);
        }
        for (key, value) in &kafka.properties {
            if let Some(why) = crate::source::config::refused_kafka_property(key) {
                return Err(refuse(format!(
                    "`{key}` is managed by mq-cutover and may not be set: {why}"
                )));
            }
            config.set(key, value);
        }
        // rdkafka takes librdkafka's log level from the `log` filter of a target named
        // `librdkafka`, which a filter like `mq_cutover=info` leaves at errors only: then the
        // info-level line of a TLS listener dropping a plaintext client never comes, and the
        // refusal goes unnamed. The context's `log` filters by our own target instead.
        config.set_log_level(RDKafkaLogLevel::Info);
        // librdkafka's own parser decides what the properties mean (`true`, `1`, aliases).
        let native = config.create_native_config().map_err(|e| match &e {
            // rdkafka's message repeats the value: not for a secret.
            KafkaError::ClientConfig(_, problem, key, _) if kafka.properties.is_secret(key) => {
                refuse(format!(
                    "bad Kafka consumer settings: `{key}`: {problem} (value not shown)"
                ))
            }
            _ => refuse(format!("bad Kafka consumer settings: {e}")),
        })?;
        let effective = |key: &str| {
            native
                .get(key)
                .map_err(|e| refuse(format!("cannot read back `{key}`: {e}")))
        };
        let reset_to_start = matches!(
            effective("auto.offset.reset")?.as_str(),
            "smallest" | "earliest" | "beginning"
        );
        let tls = effective("security.protocol")?.ends_with("ssl");
        Ok(KafkaSource {
            side: name,
            bootstrap: config
                .get("bootstrap.servers")
                .unwrap_or(&kafka.bootstrap_servers)
                .to_owned(),
            group: config.get("group.id").unwrap_or(&kafka.group_id).to_owned(),
            config,
            topics: kafka.topics.clone(),
            message_id: side.message_id.clone(),
            business_id: side.business_id.clone(),
            reset_to_start,
            tls,
            max_message_bytes: Arc::new(AtomicUsize::new(
                crate::pipeline::config::PipelineConfig::default().max_message_bytes,
            )),
        })
    }
}

impl fmt::Debug for KafkaSource {
    // Not derived: the client config may hold credentials (`sasl.password`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSource")
            .field("side", &self.side)
            .field("bootstrap", &self.bootstrap)
            .field("group", &self.group)
            .field("topics", &self.topics)
            .finish_non_exhaustive()
    }
}

impl Source for KafkaSource {
    fn refetcher(&self) -> Result<Arc<dyn super::Refetch>, SourceError> {
        Ok(Arc::new(KafkaRefetch::new(self)?))
    }

    fn run(self: Box<Self>, cx: SourceContext) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin((*self).consume(cx))
    }
}

type KafkaConsumer = StreamConsumer<KafkaContext>;

impl KafkaSource {
    async fn consume(self, cx: SourceContext) -> Result<(), SourceError> {
        self.max_message_bytes
            .store(cx.max_message_bytes, Ordering::Relaxed);
        let SourceContext {
            side,
            out,
            cancel,
            mut paused,
            membership,
            max_message_bytes: cx_max,
            ..
        } = cx;
        let start_error = |reason: String| SourceError::Start {
            side: side.clone(),
            reason,
        };
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        let consumer: Arc<KafkaConsumer> = Arc::new(
            self.config
                .create_with_context(KafkaContext::new(
                    side.clone(),
                    ack_rx,
                    membership.clone(),
                    self.tls,
                ))
                .map_err(|e| start_error(format!("cannot create the Kafka consumer: {e}")))?,
        );

        // Fail at start-up, with the address, rather than log connection errors forever; but
        // brokers that answer and refuse this client (credentials, TLS) keep the source up, not
        // ready and consuming nothing, trying again: the reason is in `/readyz` and logged once.
        loop {
            let probe = {
                let consumer = consumer.clone();
                let topic = self.topics[0].clone();
                tokio::task::spawn_blocking(move || {
                    consumer
                        .fetch_metadata(Some(&topic), PROBE_TIMEOUT)
                        .map(drop)
                })
            };
            tokio::pin!(probe);
            let probed = loop {
                tokio::select! {
                    () = cancel.cancelled() => {
                        close(consumer, &side).await;
                        return Ok(());
                    }
                    probed = &mut probe => break probed,
                    // Serves librdkafka's log and error events meanwhile, so a refusal is seen
                    // (and reported) when it happens, not when the probe gives up.
                    _ = consumer.recv() => {}
                }
            };
            match probed {
                Ok(Ok(())) => break,
                Ok(Err(_)) if membership.refused().is_some() => {
                    tokio::select! {
                        () = cancel.cancelled() => {
                            close(consumer, &side).await;
                            return Ok(());
                        }
                        () = tokio::time::sleep(REFUSED_RETRY) => {}
                    }
                }
                Ok(Err(e)) => {
                    close(consumer, &side).await;
                    return Err(start_error(format!(
                        "no Kafka broker at `{}` answered within {PROBE_TIMEOUT:?}: {e}",
                        self.bootstrap
                    )));
                }
                Err(e) => return Err(start_error(format!("start-up check failed: {e}"))),
            }
        }
        consumer.context().accepted();
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        if let Err(e) = consumer.subscribe(&topics) {
            close(consumer, &side).await;
            return Err(start_error(format!("cannot subscribe to {topics:?}: {e}")));
        }
        info!(side = %side, group = %self.group, topics = ?self.topics, "Kafka consumer subscribed");
        let lag_stop = CancellationToken::new();
        let lag = tokio::spawn(follow_lag(
            consumer.clone(),
            self.topics[0].clone(),
            membership.clone(),
            self.reset_to_start,
            lag_stop.clone(),
        ));

        let mut intake = Intake {
            side: side.clone(),
            message_id: self.message_id,
            business_id: self.business_id,
            max_message_bytes: cx_max,
            topics: Vec::new(),
            acks: ack_tx,
        };
        // Copies taken from the consumer but not yet accepted by the pipeline. Never dropped
        // while this consumer owns their partition: the consumer's position is already past them.
        let mut pending: VecDeque<Message> = VecDeque::new();
        let mut fetch = Fetch::default();
        let mut halted = *paused.borrow_and_update();
        let mut watching = true;
        let mut tick = tokio::time::interval(COMMIT_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reconciled = Instant::now();

        let outcome = loop {
            purge_revoked(&mut pending, consumer.context());
            // Resume fetching only once the pipeline has taken half its queue and half its bytes,
            // not at the first free slot: each pause drops what librdkafka had prefetched, so
            // flapping would refetch a lot.
            let hold = halted || !pending.is_empty() || (fetch.paused && !out.half_free());
            let front = pending.front().map_or(0, |m| m.payload.len());
            if hold != fetch.paused {
                fetch.set(&consumer, &side, hold);
            }
            tokio::select! {
                biased;
                () = cancel.cancelled() => break Ok(()),
                changed = paused.changed(), if watching => match changed {
                    Ok(()) => {
                        halted = *paused.borrow_and_update();
                        info!(side = %side, paused = halted, "Kafka intake {}", if halted { "paused by the daemon" } else { "resumed by the daemon" });
                    }
                    // The daemon dropped the switch: keep the last value.
                    Err(_) => watching = false,
                },
                _ = tick.tick() => {
                    consumer.context().store_finished(&*consumer);
                    if reconciled.elapsed() >= RECONCILE_INTERVAL {
                        reconciled = Instant::now();
                        fetch.reconcile(&consumer, &side);
                    }
                }
                slot = out.reserve(front), if !pending.is_empty() && !halted => match slot {
                    Ok(slot) => {
                        // A revocation may have run since the top of the loop (inside `recv`).
                        purge_revoked(&mut pending, consumer.context());
                        if let Some(msg) = pending.pop_front() {
                            if let Err(msg) = slot.send(msg) {
                                pending.push_front(msg);
                            }
                        }
                    }
                    Err(_) => break Err(pipeline_gone(&side)),
                },
                () = tokio::time::sleep(ROOM_RECHECK), if fetch.paused && !halted && pending.is_empty() => {}
                record = consumer.recv() => match record {
                    Ok(record) => {
                        // Drop held copies of partitions revoked before this record came, and
                        // only those: this record may be of the same partition, assigned again.
                        purge_revoked(&mut pending, consumer.context());
                        let msg = intake.message(&record, consumer.context());
                        if pending.is_empty() && !halted {
                            match out.try_send(msg) {
                                Ok(()) => {}
                                Err(TrySendError::Full(msg)) => pending.push_back(msg),
                                Err(TrySendError::Closed(_)) => break Err(pipeline_gone(&side)),
                            }
                        } else {
                            pending.push_back(msg);
                        }
                    }
                    Err(KafkaError::PartitionEOF(_)) => {}
                    Err(e) => {
                        if let Some((code, reason)) = consumer.client().fatal_error() {
                            break Err(SourceError::Failed {
                                side: side.clone(),
                                reason: format!("fatal Kafka error {code:?}: {reason}"),
                            });
                        }
                        // Transient (broker restart, leader move): librdkafka recovers by itself.
                        warn!(side = %side, error = %e, "Kafka consumer error");
                    }
                },
            }
        };

        // Shutdown. The lag task holds the consumer too: it must be gone before `close`, which
        // destroys the consumer by dropping the last reference.
        lag_stop.cancel();
        let _ = lag.await;
        // Stop taking records; copies not handed over stay uncommitted (their offsets are open
        // in the tracker), so the next owner reads them again.
        drop(pending);
        if !fetch.paused {
            fetch.set(&consumer, &side, true);
        }
        drop(intake); // its ack sender: once every Ack handle is gone too, the channel closes
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            let (all_in, unfinished) = consumer.context().books().drain();
            if all_in {
                break;
            }
            if Instant::now() >= deadline {
                warn!(side = %side, unfinished, "Kafka shutdown: copies still unacknowledged after {DRAIN_TIMEOUT:?}; their offsets stay uncommitted and they will be delivered again");
                break;
            }
            // Keep serving the consumer (a rebalance may arrive); a record that still comes in
            // is not taken, and nothing after it in its partition is either, so the committed
            // offset cannot pass it.
            tokio::select! {
                () = tokio::time::sleep(ROOM_RECHECK) => {}
                _ = consumer.recv() => {}
            }
        }
        consumer.context().hand_back(&*consumer, None);
        consumer.unsubscribe();
        close(consumer, &side).await;
        membership.left();
        info!(side = %side, "Kafka consumer stopped");
        outcome
    }
}

/// Drops held copies of partitions revoked since the last call: their new owner reads them from
/// the commit made on revocation. A dropped copy's ack handle reports nothing.
fn purge_revoked(pending: &mut VecDeque<Message>, context: &KafkaContext) {
    if !context.revoked.swap(false, Ordering::AcqRel) {
        return;
    }
    let gone = context.books().take_revoked();
    pending.retain(|m| {
        !gone
            .iter()
            .any(|(t, p)| *t == m.origin.topic && *p == m.origin.partition)
    });
}

fn pipeline_gone(side: &Side) -> SourceError {
    SourceError::Failed {
        side: side.clone(),
        reason: "the pipeline stopped taking messages (its channel is closed)".into(),
    }
}

/// Leaves the group and destroys the consumer. librdkafka's close blocks (it serves the final
/// revocation, which commits nothing new: `hand_back` already forgot every partition), so it
/// runs on the blocking pool, bounded.
async fn close(consumer: Arc<KafkaConsumer>, side: &Side) {
    let closing = tokio::task::spawn_blocking(move || drop(consumer));
    if tokio::time::timeout(CLOSE_TIMEOUT, closing).await.is_err() {
        warn!(side = %side, "Kafka consumer did not leave the group within {CLOSE_TIMEOUT:?}; the broker will time it out");
    }
}

/// Whether this source has paused its assigned partitions.
#[derive(Default)]
struct Fetch {
    paused: bool,
}

impl Fetch {
    /// Pauses or resumes every assigned partition.
    fn set(&mut self, consumer: &KafkaConsumer, side: &Side, pause: bool) {
        // Partitions assigned later are paused or resumed to match by the rebalance callback.
        consumer.context().paused.store(pause, Ordering::Release);
        self.paused = pause;
        let assigned = match consumer.assignment() {
            Ok(tpl) => tpl,
            Err(e) => {
                warn!(side = %side, error = %e, "cannot read the Kafka assignment to pause or resume it");
                return;
            }
        };
        if assigned.count() > 0 {
            let done = if pause {
                consumer.pause(&assigned)
            } else {
                consumer.resume(&assigned)
            };
            if let Err(e) = done {
                warn!(side = %side, error = %e, pause, "cannot pause or resume Kafka partitions");
            }
        }
        // A daemon-wide pause is logged where the switch flips; this is routine backpressure.
        debug!(side = %side, pause, partitions = assigned.count(), "Kafka fetching {}", if pause { "paused" } else { "resumed" });
    }

    /// While fetching is wanted, resumes the whole assignment again: a safety net behind the
    /// rebalance callback for a partition left paused by any order of events not foreseen
    /// (confluentinc/librdkafka#1849). Resuming a partition that is not paused changes nothing
    /// (librdkafka 2.6 and later, #4686).
    fn reconcile(&self, consumer: &KafkaConsumer, side: &Side) {
        if self.paused {
            return;
        }
        match consumer.assignment() {
            Ok(assigned) if assigned.count() > 0 => {
                if let Err(e) = consumer.resume(&assigned) {
                    debug!(side = %side, error = %e, "cannot resume the Kafka assignment");
                }
            }
            Ok(_) => {}
            Err(e) => debug!(side = %side, error = %e, "cannot read the Kafka assignment"),
        }
    }
}

/// Turns records into messages.
struct Intake {
    side: Side,
    message_id: IdSource,
    business_id: IdSource,
    /// `pipeline.max_message_bytes`.
    max_message_bytes: usize,
    /// Topic names seen so far, so a record costs a reference count, not an allocation.
    topics: Vec<Arc<str>>,
    acks: mpsc::UnboundedSender<Finished>,
}

impl Intake {
    fn message(&mut self, record: &BorrowedMessage<'_>, context: &KafkaContext) -> Message {
        let topic = self.topic(record.topic());
        let (partition, offset) = (record.partition(), record.offset());
        let (identity, payload) = identity_of(
            record,
            &self.message_id,
            &self.business_id,
            self.max_message_bytes,
        );
        context.books().tracker.delivered(&topic, partition, offset);
        Message {
            identity,
            payload,
            origin: Origin {
                side: self.side.clone(),
                topic: topic.clone(),
                partition,
                broker: None,
                offset,
                born_ms: record.timestamp().to_millis().unwrap_or(0),
            },
            received: std::time::Instant::now(),
            held: super::outlet::Held::none(),
            ack: Ack::new(
                self.acks.clone(),
                Finished {
                    topic,
                    partition,
                    offset,
                },
            ),
        }
    }

    fn topic(&mut self, name: &str) -> Arc<str> {
        if let Some(t) = self.topics.iter().find(|t| ***t == *name) {
            return t.clone();
        }
        let t: Arc<str> = name.into();
        self.topics.push(t.clone());
        t
    }
}

/// The ids and the body of a record; a record without a value, or with one larger than `max`
/// bytes (`pipeline.max_message_bytes`), is bad input, the latter without its body.
///
/// librdkafka has already uncompressed the record's batch by then, with no limit for gzip, LZ4
/// and Snappy (docs/kafka.md, "Large and compressed records"): checking here keeps a bomb out of
/// the JSON parser, the pipeline, Redis and the sink, not out of librdkafka's memory.
fn identity_of(
    record: &BorrowedMessage<'_>,
    message_id: &IdSource,
    business_id: &IdSource,
    max: usize,
) -> (Result<crate::message::Identity, BadInput>, Vec<u8>) {
    let headers = record.headers();
    match record.payload() {
        Some(body) if body.len() > max => (
            Err(BadInput(format!(
                "body of {} bytes is over pipeline.max_message_bytes = {max}",
                body.len()
            ))),
            Vec::new(),
        ),
        Some(body) => {
            if let (Some(h), true) = (headers, reads_headers(message_id, business_id)) {
                if let Err(why) = header_keys_readable(h) {
                    return (Err(why), body.to_vec());
                }
            }
            (
                read_identity(
                    message_id,
                    business_id,
                    |name| headers.and_then(|h| last_header(h, name)),
                    body,
                ),
                body.to_vec(),
            )
        }
        None => (
            Err(BadInput("the record has no value (a tombstone)".into())),
            Vec::new(),
        ),
    }
}

/// How long a refetch waits for the broker to hand over the record asked for.
const REFETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads records again by topic, partition and offset (adoption). A consumer of its own, with
/// the side's client settings (so TLS and SASL apply) but outside the group: it `assign`s a
/// partition at the lowest offset asked for and reads forward, picking the offsets asked for
/// (seeking over long gaps), and commits and stores nothing. One batch at a time, on the blocking
/// pool.
struct KafkaRefetch {
    side: Side,
    consumer: Arc<Mutex<BaseConsumer>>,
    message_id: IdSource,
    business_id: IdSource,
    /// The source's `pipeline.max_message_bytes`, read at each refetch.
    max_message_bytes: Arc<AtomicUsize>,
}

/// Reading forward past this many unwanted records costs more than a seek to the next wanted one.
const REFETCH_SEEK_GAP: i64 = 500;

impl KafkaRefetch {
    fn new(source: &KafkaSource) -> Result<KafkaRefetch, SourceError> {
        let mut config = source.config.clone();
        config
            .set("client.id", format!("mq-cutover-{}-refetch", source.side))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // An offset the broker no longer has is an error here, never a jump elsewhere.
            .set("auto.offset.reset", "error")
            .set("enable.partition.eof", "true");
        let consumer: BaseConsumer = config.create().map_err(|e| SourceError::Start {
            side: source.side.clone(),
            reason: format!("cannot create the Kafka refetch consumer: {e}"),
        })?;
        Ok(KafkaRefetch {
            side: source.side.clone(),
            consumer: Arc::new(Mutex::new(consumer)),
            message_id: source.message_id.clone(),
            business_id: source.business_id.clone(),
            max_message_bytes: source.max_message_bytes.clone(),
        })
    }
}

/// What one position came to: the record, gone, or why it could not be read now.
type Read = Result<Option<super::Refetched>, String>;

/// Reads `at` (any order, any partitions, repeats allowed); one answer per position. Blocks.
fn read_positions(
    consumer: &BaseConsumer,
    at: &[super::Position],
    message_id: &IdSource,
    business_id: &IdSource,
    max: usize,
) -> Vec<Read> {
    let mut out: Vec<Option<Read>> = vec![None; at.len()];
    // Positions by partition, each partition's offsets in order.
    let mut parts: BTreeMap<(&str, i32), Vec<(i64, usize)>> = BTreeMap::new();
    for (i, p) in at.iter().enumerate() {
        parts
            .entry((&*p.topic, p.partition))
            .or_default()
            .push((p.offset, i));
    }
    for ((topic, partition), mut wanted) in parts {
        wanted.sort_unstable();
        let answers = read_partition(
            consumer,
            topic,
            partition,
            &wanted,
            message_id,
            business_id,
            max,
        );
        for ((_, i), answer) in wanted.iter().zip(answers) {
            out[*i] = Some(answer);
        }
    }
    out.into_iter()
        .map(|a| a.unwrap_or_else(|| Err("not read".into())))
        .collect()
}

/// Reads the sorted `wanted` offsets of one partition; one answer per entry.
fn read_partition(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    wanted: &[(i64, usize)],
    message_id: &IdSource,
    business_id: &IdSource,
    max: usize,
) -> Vec<Read> {
    let here = |o: i64| format!("refetch {topic}[{partition}]@{o}");
    let mut answers: Vec<Read> = Vec::with_capacity(wanted.len());
    let mut tpl = TopicPartitionList::new();
    let assigned = tpl
        .add_partition_offset(topic, partition, Offset::Offset(wanted[0].0))
        .and_then(|()| consumer.assign(&tpl));
    if let Err(e) = assigned {
        return wanted
            .iter()
            .map(|(o, _)| Err(format!("{}: {e}", here(*o))))
            .collect();
    }
    // A record is answered for every wanted entry of its offset (repeats included).
    let answer_up_to = |answers: &mut Vec<Read>, offset: i64, found: Option<&super::Refetched>| {
        while let Some((o, _)) = wanted.get(answers.len()) {
            match o.cmp(&offset) {
                // Skipped: the log has no record there (compacted away, a transaction marker).
                std::cmp::Ordering::Less => answers.push(Ok(None)),
                std::cmp::Ordering::Equal => answers.push(Ok(found.cloned())),
                std::cmp::Ordering::Greater => break,
            }
        }
    };
    // Longer batches get longer: about a millisecond per record beyond the fixed allowance.
    let deadline = Instant::now() + REFETCH_TIMEOUT + Duration::from_millis(wanted.len() as u64);
    while answers.len() < wanted.len() {
        let next = wanted[answers.len()].0;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            while let Some((o, _)) = wanted.get(answers.len()) {
                answers.push(Err(format!(
                    "{}: no answer within {REFETCH_TIMEOUT:?}",
                    here(*o)
                )));
            }
            break;
        }
        match consumer.poll(left) {
            None => {}
            Some(Ok(record)) => {
                let offset = record.offset();
                if offset < next {
                    continue;
                }
                let copy = (offset == next).then(|| {
                    let (identity, payload) = identity_of(&record, message_id, business_id, max);
                    super::Refetched {
                        identity,
                        payload,
                        born_ms: record.timestamp().to_millis().unwrap_or(0),
                    }
                });
                answer_up_to(&mut answers, offset, copy.as_ref());
                if let Some((o, _)) = wanted.get(answers.len()) {
                    if *o > offset + REFETCH_SEEK_GAP {
                        let _ = consumer.seek(topic, partition, Offset::Offset(*o), LAG_TIMEOUT);
                    }
                }
            }
            // The end of the log came before the rest: never written here.
            Some(Err(KafkaError::PartitionEOF(_))) => {
                while answers.len() < wanted.len() {
                    answers.push(Ok(None));
                }
            }
            // Outside the log (deleted by retention, or past its end): with
            // `auto.offset.reset = error` librdkafka says so instead of jumping. The offset
            // asked for is gone; go on with the next one.
            Some(Err(KafkaError::MessageConsumption(
                rdkafka::types::RDKafkaErrorCode::OffsetOutOfRange
                | rdkafka::types::RDKafkaErrorCode::AutoOffsetReset,
            ))) => {
                answer_up_to(&mut answers, next, None);
                if let Some((o, _)) = wanted.get(answers.len()) {
                    let _ = consumer.seek(topic, partition, Offset::Offset(*o), LAG_TIMEOUT);
                }
            }
            Some(Err(e)) => {
                while let Some((o, _)) = wanted.get(answers.len()) {
                    answers.push(Err(format!("{}: {e}", here(*o))));
                }
            }
        }
    }
    let _ = consumer.unassign();
    answers
}

#[async_trait::async_trait]
impl super::Refetch for KafkaRefetch {
    async fn refetch_many(
        &self,
        at: &[super::Position],
    ) -> Vec<Result<Option<super::Refetched>, SourceError>> {
        if at.is_empty() {
            return Vec::new();
        }
        let consumer = self.consumer.clone();
        let (message_id, business_id) = (self.message_id.clone(), self.business_id.clone());
        let max = self.max_message_bytes.load(Ordering::Relaxed);
        let positions = at.to_vec();
        let read = tokio::task::spawn_blocking(move || {
            let consumer = consumer.lock().unwrap_or_else(PoisonError::into_inner);
            read_positions(&consumer, &positions, &message_id, &business_id, max)
        })
        .await
        .unwrap_or_else(|e| vec![Err(format!("refetch task failed: {e}")); at.len()]);
        read.into_iter()
            .map(|r| {
                r.map_err(|reason| SourceError::Failed {
                    side: self.side.clone(),
                    reason,
                })
            })
            .collect()
    }
}

/// Whether either id is read from a header.
fn reads_headers(message_id: &IdSource, business_id: &IdSource) -> bool {
    matches!(message_id, IdSource::Header(_)) || matches!(business_id, IdSource::Header(_))
}

thread_local! {
    /// Set on this thread while [`header_keys_readable`] expects a panic it contains.
    static CONTAINING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Checks that rdkafka can read every header key of a record, so that [`last_header`] cannot
/// panic on it; a key that is not UTF-8 makes the record bad input.
///
/// rdkafka 0.39 reads a key with `CStr::to_str(..).unwrap()` (`BorrowedHeaders::try_get` in its
/// `src/message.rs`), behind every accessor (`get`, `try_get`, `iter`), and offers none that
/// returns the key's bytes; but any producer may write any bytes as a key. Uncontained, the
/// panic ends the source task, and with it the daemon, on every restart, since the offset is
/// never committed. Not reported upstream (no issue found in fede1024/rust-rdkafka; its PR #639
/// removed the same `unwrap` from error paths only). Without `unsafe` code there is no other
/// way to read the headers, so the panic is caught here, around header reads only, and kept out
/// of the log (the dead letter carries the reason).
fn header_keys_readable(headers: &BorrowedHeaders) -> Result<(), BadInput> {
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CONTAINING.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    let count = headers.count();
    CONTAINING.with(|c| c.set(true));
    let bad = (0..count).find(|&i| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            headers.try_get(i);
        }))
        .is_err()
    });
    CONTAINING.with(|c| c.set(false));
    match bad {
        None => Ok(()),
        Some(i) => Err(BadInput(format!(
            "header {} of {count} has a key that is not UTF-8; the record's headers cannot be \
             read",
            i + 1
        ))),
    }
}

/// The value of the last header called `name` (Kafka allows repeats; the last one wins, as in
/// the Java client's `lastHeader`). A header without a value reads as empty.
fn last_header<'a, H: Headers>(headers: &'a H, name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .filter(|h| h.key == name)
        .last()
        .map(|h| h.value.unwrap_or_default())
}

/// The consumer's context: the offset books shared between the consume loop and librdkafka's
/// rebalance callback. Both run on the task that polls the consumer (the callback from inside
/// `recv`), so the lock is never contended and never held across an await.
struct KafkaContext {
    side: Side,
    books: Mutex<Books>,
    /// Joined, partitions held, rebalances and lag, as the daemon reports them.
    membership: Membership,
    /// `queue` labels revoked since the last assignment, for the one log line per rebalance.
    revoked_labels: Mutex<Vec<String>>,
    /// Whether the loop wants fetching paused: newly assigned partitions are paused or resumed
    /// to match.
    paused: AtomicBool,
    /// Set by a revocation: the loop drops held copies of revoked partitions.
    revoked: AtomicBool,
    /// Whether the client speaks TLS to the brokers.
    tls: bool,
    /// librdkafka's last word on a failed broker connection, for the outage reason.
    last_transport_failure: Mutex<Option<String>>,
}

struct Books {
    tracker: OffsetTracker,
    acks: mpsc::UnboundedReceiver<Finished>,
    /// The offset last stored per partition: what a synchronous commit sends.
    stored: HashMap<(Arc<str>, i32), i64>,
    /// Partitions revoked since the loop last looked.
    revoked: Vec<(Arc<str>, i32)>,
}

impl Books {
    /// Moves arrived acks into the tracker. Returns whether every ack handle is gone (the
    /// channel is closed and empty), and how many delivered copies are unfinished.
    fn drain(&mut self) -> (bool, usize) {
        let closed = loop {
            match self.acks.try_recv() {
                Ok(f) => self.tracker.finished(&f),
                Err(TryRecvError::Empty) => break false,
                Err(TryRecvError::Disconnected) => break true,
            }
        };
        (closed, self.tracker.in_flight())
    }

    /// Drains acks and returns the offsets that moved, remembering them as stored.
    fn advance(&mut self) -> Vec<(Arc<str>, i32, i64)> {
        self.drain();
        let moved = self.tracker.take_commits();
        for (topic, partition, offset) in &moved {
            self.stored.insert((topic.clone(), *partition), *offset);
        }
        moved
    }

    fn take_revoked(&mut self) -> Vec<(Arc<str>, i32)> {
        std::mem::take(&mut self.revoked)
    }
}

impl KafkaContext {
    fn new(
        side: Side,
        acks: mpsc::UnboundedReceiver<Finished>,
        membership: Membership,
        tls: bool,
    ) -> KafkaContext {
        KafkaContext {
            side,
            membership,
            revoked_labels: Mutex::new(Vec::new()),
            books: Mutex::new(Books {
                tracker: OffsetTracker::default(),
                acks,
                stored: HashMap::new(),
                revoked: Vec::new(),
            }),
            paused: AtomicBool::new(false),
            revoked: AtomicBool::new(false),
            tls,
            last_transport_failure: Mutex::new(None),
        }
    }

    fn books(&self) -> MutexGuard<'_, Books> {
        // The books stay consistent even if a holder panicked: every update is one call.
        self.books.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The periodic step: store what is finished (librdkafka's auto-commit sends it).
    fn store_finished<C: Consumer<KafkaContext>>(&self, consumer: &C) {
        let moved = self.books().advance();
        if moved.is_empty() {
            return;
        }
        let tpl = partition_list(&moved);
        if let Err(e) = consumer.store_offsets(&tpl) {
            // A partition revoked a moment ago; the revocation committed it already.
            debug!(side = %self.side, error = %e, "cannot store Kafka offsets");
        }
    }

    /// Commits, synchronously, what is finished in `partitions` (all tracked ones if `None`) and
    /// forgets them: later acks for them are ignored, and the new owner reads from this commit.
    fn hand_back<C: Consumer<KafkaContext>>(
        &self,
        consumer: &C,
        partitions: Option<&TopicPartitionList>,
    ) {
        let (moved, commit) = {
            let mut books = self.books();
            let moved = books.advance();
            let parts: Vec<(Arc<str>, i32)> = match partitions {
                Some(tpl) => tpl
                    .elements()
                    .iter()
                    .map(|e| (Arc::from(e.topic()), e.partition()))
                    .collect(),
                None => books.stored.keys().cloned().collect(),
            };
            let mut commit = Vec::with_capacity(parts.len());
            for (topic, partition) in &parts {
                if let Some(offset) = books.stored.remove(&(topic.clone(), *partition)) {
                    commit.push((topic.clone(), *partition, offset));
                }
                books.tracker.forget(topic, *partition);
            }
            books.revoked.extend(parts);
            self.revoked.store(true, Ordering::Release);
            (moved, commit)
        };
        if !moved.is_empty() {
            // Partitions kept in a cooperative rebalance keep their progress for auto-commit.
            let _ = consumer.store_offsets(&partition_list(&moved));
        }
        if commit.is_empty() {
            return;
        }
        if consumer.assignment_lost() {
            warn!(side = %self.side, partitions = %describe(&commit), "Kafka assignment lost: not committing; copies finished since the last commit will be delivered again");
            return;
        }
        match consumer.commit(&partition_list(&commit), CommitMode::Sync) {
            Ok(()) => {
                info!(side = %self.side, offsets = %describe(&commit), "committed finished Kafka offsets")
            }
            Err(e) => {
                warn!(side = %self.side, error = %e, offsets = %describe(&commit), "cannot commit finished Kafka offsets; those copies will be delivered again")
            }
        }
    }
}

fn partition_list(offsets: &[(Arc<str>, i32, i64)]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::with_capacity(offsets.len());
    for (topic, partition, offset) in offsets {
        // Only fails for an unknown partition of a list built here: impossible.
        let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset));
    }
    tpl
}

fn describe(offsets: &[(Arc<str>, i32, i64)]) -> String {
    offsets
        .iter()
        .map(|(t, p, o)| format!("{t}[{p}]@{o}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `queue` label of a partition in the lag metric: `topic/partition`.
fn queue_label(topic: &str, partition: i32) -> String {
    format!("{topic}/{partition}")
}

fn queue_labels(tpl: &TopicPartitionList) -> Vec<String> {
    tpl.elements()
        .iter()
        .map(|e| queue_label(e.topic(), e.partition()))
        .collect()
}

/// Measures the lag of every assigned partition every [`Membership::lag_interval`], on the
/// blocking pool (librdkafka's queries block), until `stop`. A failed measurement keeps the
/// last values; the next one replaces them. After a failed broker connection, each tick also
/// asks whether any broker answers ([`probe_reach`]).
async fn follow_lag(
    consumer: Arc<KafkaConsumer>,
    topic: String,
    membership: Membership,
    reset_to_start: bool,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(membership.lag_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let c = consumer.clone();
        match tokio::task::spawn_blocking(move || measure_lag(&*c, reset_to_start)).await {
            Ok(Ok(readings)) => {
                // The brokers answered this client's requests: they accept it.
                consumer.context().accepted();
                membership.measured(&readings);
            }
            Ok(Err(e)) => {
                debug!(side = %membership.side(), error = %e, "cannot measure the Kafka lag now")
            }
            Err(e) => warn!(side = %membership.side(), error = %e, "Kafka lag measurement failed"),
        }
        probe_reach(&consumer, &topic).await;
    }
}

/// After a failed broker connection, asks for `topic`'s metadata (any broker answers it): an
/// answer ends the outage, a failure starts it (`/readyz` names it). librdkafka's own
/// `ALL_BROKERS_DOWN` is not enough: it counts the bootstrap connection, which stays idle and
/// is never "down", so with a single broker killed it was not raised (measured on 2.12).
async fn probe_reach(consumer: &Arc<KafkaConsumer>, topic: &str) {
    if consumer.context().transport_failed().is_none() {
        return;
    }
    let (c, t) = (consumer.clone(), topic.to_owned());
    match tokio::task::spawn_blocking(move || c.fetch_metadata(Some(&t), LAG_TIMEOUT)).await {
        Ok(Ok(_)) => consumer.context().reached(),
        Ok(Err(e)) => consumer
            .context()
            .unreachable(&format!("no broker answers: {e}")),
        Err(e) => warn!(side = %consumer.context().side, error = %e, "Kafka reach probe failed"),
    }
}

/// The reading of each assigned partition: its lag (messages between the group's committed
/// offset and the end of the log), and for the stall detector the consumer's position (one past
/// the last record it returned to the consume loop, which hands records over in order; past
/// transaction markers too) and what waits past it. Two kinds of request, batched: one
/// OffsetFetch to the group coordinator for the committed offsets, one ListOffsets per partition
/// leader for the ends; the positions are local. A partition with no committed offset yet is
/// measured from where `auto.offset.reset` starts it. Blocks.
fn measure_lag<C: Consumer<KafkaContext>>(
    consumer: &C,
    reset_to_start: bool,
) -> KafkaResult<Vec<(String, Reading)>> {
    let assigned = consumer.assignment()?;
    if assigned.count() == 0 {
        return Ok(Vec::new());
    }
    // librdkafka forgets a partition's position when it is revoked: `Invalid` until the first
    // record after it is assigned again.
    let positions = consumer.position()?;
    let committed = consumer.committed_offsets(assigned.clone(), LAG_TIMEOUT)?;
    // ListOffsets with the "timestamp" -1 (`Offset::End`) answers the end of the log the way
    // this consumer reads it: the high watermark, or the last stable offset under
    // `isolation.level = read_committed` (librdkafka's default). Unlike the statistics'
    // `hi_offset`, it is fresh even while the partition is paused for backpressure.
    let mut ends = assigned;
    ends.set_all_offsets(Offset::End)?;
    let ends = consumer.offsets_for_times(ends, LAG_TIMEOUT)?;
    let mut unstarted = TopicPartitionList::new();
    for e in committed.elements() {
        if !matches!(e.offset(), Offset::Offset(_)) {
            unstarted.add_partition_offset(e.topic(), e.partition(), Offset::Beginning)?;
        }
    }
    let starts = if reset_to_start && unstarted.count() > 0 {
        Some(consumer.offsets_for_times(unstarted, LAG_TIMEOUT)?)
    } else {
        None
    };
    let offset_in = |tpl: Option<&TopicPartitionList>, topic: &str, partition: i32| match tpl
        .and_then(|t| t.find_partition(topic, partition))
        .map(|e| e.offset())
    {
        Some(Offset::Offset(o)) => Some(o),
        _ => None,
    };
    let mut lags = Vec::with_capacity(ends.count());
    for end in ends.elements() {
        let (topic, partition) = (end.topic(), end.partition());
        let (Offset::Offset(end_at), Ok(())) = (end.offset(), end.error()) else {
            continue;
        };
        let from = match offset_in(Some(&committed), topic, partition) {
            Some(o) => o,
            // Never committed: the consumer starts at the beginning, or at the end.
            None if reset_to_start => match offset_in(starts.as_ref(), topic, partition) {
                Some(o) => o,
                None => continue,
            },
            None => end_at,
        };
        let position = offset_in(Some(&positions), topic, partition);
        let read_to = position.map_or(from, |p| p.max(from));
        lags.push((
            queue_label(topic, partition),
            Reading {
                lag: end_at - from,
                waiting: (end_at - read_to).max(0),
                position,
            },
        ));
    }
    Ok(lags)
}

fn describe_list(tpl: &TopicPartitionList) -> String {
    tpl.elements()
        .iter()
        .map(|e| format!("{}[{}]", e.topic(), e.partition()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A librdkafka message saying the brokers refuse this client for a reason in its own settings
/// (credentials, the CA, TLS on one end only), as the reason `/readyz` gives: what happened and
/// what to check. `None` for everything else (a broker down, a leader move). `tls`: whether the
/// client speaks TLS (`security.protocol` SSL or SASL_SSL).
pub fn why_refused(message: &str, tls: bool) -> Option<String> {
    // A TLS listener drops a plaintext client's first request (ApiVersion) unanswered; librdkafka
    // 2.12 says only "Disconnected … in state APIVERSION_QUERY".
    let dropped_first_request =
        !tls && message.contains("in state APIVERSION_QUERY") && message.contains("Disconnected");
    let text = without_timing(message);
    let check = if text.contains("SASL authentication error")
        || text.contains("Authentication failed")
    {
        "authentication refused by the brokers: {} (check sasl.mechanism, sasl.username and sasl.password)"
    } else if text.contains("SSL handshake failed") {
        "TLS handshake failed: {} (check ssl.ca.location against the brokers' certificate, and security.protocol)"
    } else if text.contains("incorrect security.protocol") || dropped_first_request {
        "the brokers closed the connection unanswered: {} (a PLAINTEXT or SASL_PLAINTEXT client on a TLS listener? check security.protocol)"
    } else {
        return None;
    };
    Some(check.replacen("{}", text, 1))
}

/// A librdkafka message without its thread prefix (`[thrd:sasl_ssl://host:port/bootstrap]: `)
/// and its timing suffix (`(after 12ms in state AUTH_REQ, 1 identical error(s) suppressed)`):
/// the words that stay the same from one reconnect to the next.
fn without_timing(message: &str) -> &str {
    let text = match message.strip_prefix("[thrd:") {
        Some(rest) => rest.split_once("]: ").map_or(message, |(_, t)| t),
        None => message,
    };
    text.split(" (after ").next().unwrap_or(text).trim()
}

impl KafkaContext {
    /// The brokers refuse this consumer: `/readyz` says why; logged when it starts.
    fn refused(&self, why: String) {
        if self.membership.set_refused(Some(why.clone())) {
            error!(side = %self.side, "Kafka brokers refuse this consumer: {why}; not ready, nothing is consumed until they accept it");
        }
    }

    /// The brokers answered a request of this consumer: any refusal is over.
    fn accepted(&self) {
        if self.membership.set_refused(None) {
            info!(side = %self.side, "Kafka brokers accept this consumer again");
        }
    }

    /// librdkafka's last word on a failed broker connection since a broker last answered, if
    /// any: the cue to ask whether the brokers are reachable at all ([`probe_reach`]).
    fn transport_failed(&self) -> Option<String> {
        self.last_transport_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// No broker answers (librdkafka's `ALL_BROKERS_DOWN`, or a metadata request that failed
    /// after a connection did): `/readyz` says so, with librdkafka's last word on a failed
    /// connection; logged when it starts.
    fn unreachable(&self, reason: &str) {
        let why = match self.transport_failed() {
            Some(last) if last != reason => format!("{reason} (last: {last})"),
            _ => reason.to_owned(),
        };
        if self.membership.set_unreachable(Some(why.clone())) {
            error!(side = %self.side, "Kafka brokers unreachable: {why}; not ready, nothing is read until one answers (librdkafka reconnects by itself)");
        }
    }

    /// A broker answered a request (a metadata probe, a rebalance): any outage is over. Not a
    /// record: librdkafka hands over records it fetched before the outage while it lasts.
    fn reached(&self) {
        *self
            .last_transport_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        if let Some(lasted) = self.membership.reached() {
            info!(side = %self.side, after = %humantime::format_duration(Duration::from_secs(lasted.as_secs())), "Kafka brokers reachable again");
        }
    }
}

impl ClientContext for KafkaContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        let side = &*self.side;
        if let Some(why) = why_refused(message, self.tls) {
            // Reported once, in words, by `refused`; librdkafka repeats it on every reconnect.
            debug!(side, facility, "librdkafka: {message}");
            self.refused(why);
            return;
        }
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => error!(side, facility, "librdkafka: {message}"),
            RDKafkaLogLevel::Warning => warn!(side, facility, "librdkafka: {message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                info!(side, facility, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Debug => debug!(side, facility, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(why) = why_refused(reason, self.tls) {
            debug!(side = %self.side, error = %error, "Kafka client error: {reason}");
            self.refused(why);
            return;
        }
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::BrokerTransportFailure) => {
                *self
                    .last_transport_failure
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(without_timing(reason).into());
            }
            Some(RDKafkaErrorCode::AllBrokersDown) => self.unreachable(without_timing(reason)),
            _ => {}
        }
        // Mostly transient (a broker down, a connection reset); librdkafka reconnects by itself.
        warn!(side = %self.side, error = %error, "Kafka client error: {reason}");
    }
}

impl ConsumerContext for KafkaContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                debug!(side = %self.side, partitions = %describe_list(tpl), "Kafka partitions revoked");
                let lost = queue_labels(tpl);
                self.membership.revoked(&lost);
                self.revoked_labels
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend(lost);
                self.hand_back(consumer, Some(tpl));
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => {
                warn!(side = %self.side, error = %e, "Kafka rebalance error")
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // One line per rebalance round: what came, what went (an incremental round may
            // only revoke; an eager one revokes everything and assigns again).
            let gained = queue_labels(tpl);
            self.accepted();
            // The group coordinator answered.
            self.reached();
            let held = self.membership.rebalanced(&gained);
            let lost = std::mem::take(
                &mut *self
                    .revoked_labels
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
            );
            info!(side = %self.side, assigned = ?gained, revoked = ?lost, held, "Kafka rebalance");
            if tpl.count() == 0 {
                return;
            }
            // librdkafka keeps a partition's pause flag across revoke and assign
            // (confluentinc/librdkafka#1849): a partition paused before an eager revocation comes
            // back paused, even if the loop resumed "the assignment" while it was empty. So the
            // wanted state is set on every assigned partition, both ways, eager or incremental.
            let pause = self.paused.load(Ordering::Acquire);
            let done = if pause {
                consumer.pause(tpl)
            } else {
                consumer.resume(tpl)
            };
            if let Err(e) = done {
                warn!(side = %self.side, error = %e, pause, "cannot pause or resume newly assigned Kafka partitions");
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => debug!(side = %self.side, "Kafka offsets committed"),
            // The next commit carries the same or a higher offset; at worst copies are redelivered.
            Err(e) => {
                warn!(side = %self.side, error = %e, partitions = %describe_list(offsets), "Kafka offset commit failed")
            }
        }
    }
}

/// Why a [`KafkaWriter`] could not write.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The producer could not be created (bad settings).
    #[error("cannot create a Kafka producer for `{bootstrap}`: {source}")]
    Create {
        /// The bootstrap servers.
        bootstrap: String,
        /// librdkafka's error.
        source: KafkaError,
    },
    /// No broker answered.
    #[error("no Kafka broker at `{bootstrap}` answered: {source}")]
    Unreachable {
        /// The bootstrap servers.
        bootstrap: String,
        /// librdkafka's error.
        source: KafkaError,
    },
    /// A record was not acknowledged by the broker.
    #[error("record to topic `{topic}` not delivered: {source}")]
    Send {
        /// The topic.
        topic: String,
        /// librdkafka's error.
        source: KafkaError,
    },
}

/// The properties of a consumer's settings that say how to reach and log in to the brokers
/// (`security.protocol`, `sasl.*`, `ssl.*`, socket options), for a producer or admin client of
/// the same cluster; consumer-only properties are left out (librdkafka warns about them).
pub fn connection_properties(
    properties: &crate::source::config::KafkaProperties,
) -> impl Iterator<Item = (&str, &str)> {
    const PREFIXES: &[&str] = &[
        "security.",
        "sasl.",
        "ssl.",
        "ssl_",
        "enable.ssl.",
        "enable.sasl.",
        "socket.",
        "broker.address.family",
        "client.dns.lookup",
    ];
    properties
        .iter()
        .filter(|(k, _)| PREFIXES.iter().any(|p| k.starts_with(p)))
        .map(|(k, v)| (k.as_str(), v.as_str()))
}

/// A thin Kafka producer for the traffic generator and the tests: each `send` waits for the
/// broker's acknowledgement. Idempotent, so a retried send is never written twice.
#[derive(Clone)]
pub struct KafkaWriter {
    producer: FutureProducer,
}

/// How long `connect` waits for a broker to answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a `send` may wait for room in librdkafka's local queue.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long `flush` waits.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);

impl KafkaWriter {
    /// A producer for `bootstrap` (`host:port[,host:port…]`). Blocks until a broker answers a
    /// metadata request (at most 5 s), so an unreachable broker is reported here.
    pub fn connect(bootstrap: &str) -> Result<KafkaWriter, WriteError> {
        Self::connect_with(bootstrap, std::iter::empty::<(&str, &str)>())
    }

    /// [`KafkaWriter::connect`] with further librdkafka producer properties: the side's
    /// [`connection_properties`] (TLS, SASL), or a codec (`compression.type`).
    pub fn connect_with<K: AsRef<str>, V: AsRef<str>>(
        bootstrap: &str,
        properties: impl IntoIterator<Item = (K, V)>,
    ) -> Result<KafkaWriter, WriteError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", bootstrap)
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "30000");
        for (key, value) in properties {
            config.set(key.as_ref(), value.as_ref());
        }
        let producer: FutureProducer = config.create().map_err(|source| WriteError::Create {
            bootstrap: bootstrap.to_owned(),
            source,
        })?;
        producer
            .client()
            .fetch_metadata(None, CONNECT_TIMEOUT)
            .map_err(|source| WriteError::Unreachable {
                bootstrap: bootstrap.to_owned(),
                source,
            })?;
        Ok(KafkaWriter { producer })
    }

    /// Writes one record and waits for the broker's acknowledgement.
    pub async fn send(
        &self,
        topic: &str,
        key: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(), WriteError> {
        let mut owned = OwnedHeaders::new_with_capacity(headers.len());
        for (name, value) in headers {
            owned = owned.insert(Header {
                key: name,
                value: Some(*value),
            });
        }
        let record = FutureRecord::to(topic)
            .key(key)
            .payload(body)
            .headers(owned);
        self.producer
            .send(record, QUEUE_TIMEOUT)
            .await
            .map(drop)
            .map_err(|(source, _)| WriteError::Send {
                topic: topic.to_owned(),
                source,
            })
    }

    /// Waits until every record handed to the producer is acknowledged (at most 30 s).
    pub async fn flush(&self) {
        let producer = self.producer.clone();
        match tokio::task::spawn_blocking(move || producer.flush(FLUSH_TIMEOUT)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "Kafka producer flush incomplete"),
            Err(e) => warn!(error = %e, "Kafka producer flush did not run"),
        }
    }
}

impl fmt::Debug for KafkaWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaWriter").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::config::{KafkaSideConfig, SideKind};

    fn side(properties: &[(&str, &str)]) -> SideConfig {
        SideConfig {
            name: "kafka".into(),
            kind: SideKind::Kafka,
            message_id: IdSource::Header("msg-id".into()),
            business_id: IdSource::JsonPointer("/user_id".into()),
            kafka: Some(KafkaSideConfig {
                bootstrap_servers: "127.0.0.1:9".into(),
                topics: vec!["reward".into()],
                group_id: "g".into(),
                properties: properties
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                secret_files: Default::default(),
            }),
            rocketmq: None,
        }
    }

    fn refusal(properties: &[(&str, &str)]) -> String {
        match KafkaSource::new(&side(properties)) {
            Ok(s) => panic!("accepted: {s:?}"),
            Err(SourceError::Start { reason, .. }) => reason,
            Err(e) => panic!("wrong error: {e}"),
        }
    }

    #[test]
    fn defaults_keep_the_offset_store_manual_and_read_from_the_start() {
        let s = KafkaSource::new(&side(&[])).unwrap();
        assert_eq!(s.config.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(s.config.get("enable.auto.commit"), Some("true"));
        assert_eq!(s.config.get("auto.offset.reset"), Some("earliest"));
        assert_eq!(s.config.get("group.id"), Some("g"));
    }

    #[test]
    fn user_properties_win_over_the_offset_reset_default() {
        let s = KafkaSource::new(&side(&[
            ("auto.offset.reset", "latest"),
            ("session.timeout.ms", "6000"),
        ]))
        .unwrap();
        assert_eq!(s.config.get("auto.offset.reset"), Some("latest"));
        assert!(!s.reset_to_start);
    }

    #[test]
    fn properties_the_source_depends_on_are_refused_whatever_their_value() {
        for (key, value) in [
            ("enable.auto.offset.store", "true"),
            ("enable.auto.offset.store", "false"),
            ("enable.auto.commit", "false"),
            ("group.id", "other"),
            ("plugin.library.paths", "/tmp/x.so"),
        ] {
            let reason = refusal(&[(key, value)]);
            assert!(
                reason.contains(key) && reason.contains("managed by mq-cutover"),
                "{reason}"
            );
        }
    }

    #[test]
    fn an_unknown_or_malformed_property_is_refused_with_its_name() {
        let reason = refusal(&[("no.such.property", "1")]);
        assert!(reason.contains("no.such.property"), "{reason}");
        let reason = refusal(&[("session.timeout.ms", "soon")]);
        assert!(reason.contains("session.timeout.ms"), "{reason}");
    }

    #[test]
    fn a_refused_secret_property_is_named_without_its_value() {
        let reason = refusal(&[("ssl_key", "key-S3CRET")]);
        assert!(
            reason.contains("ssl_key") && !reason.contains("S3CRET"),
            "{reason}"
        );
    }

    #[test]
    fn a_side_without_a_kafka_table_is_refused() {
        let mut s = side(&[]);
        s.kafka = None;
        assert!(matches!(
            KafkaSource::new(&s),
            Err(SourceError::Start { .. })
        ));
    }

    #[test]
    fn refusals_are_told_apart_from_outages_in_words() {
        let auth = why_refused(
            "[thrd:sasl_ssl://127.0.0.1:19094/bootstrap]: sasl_ssl://127.0.0.1:19094/bootstrap: \
             SASL authentication error: Authentication failed during authentication due to invalid \
             credentials with SASL mechanism SCRAM-SHA-512 (after 365ms in state AUTH_REQ)",
            true,
        )
        .unwrap();
        assert!(
            auth.starts_with("authentication refused by the brokers: sasl_ssl://127.0.0.1:19094/bootstrap: SASL authentication error"),
            "{auth}"
        );
        assert!(
            auth.contains("check sasl.mechanism") && !auth.contains("after 365ms"),
            "{auth}"
        );
        let tls = why_refused(
            "ssl://127.0.0.1:19094/bootstrap: SSL handshake failed: error:0A000086:SSL \
             routines::certificate verify failed: broker certificate could not be verified \
             (after 4ms in state SSL_HANDSHAKE)",
            true,
        )
        .unwrap();
        assert!(tls.starts_with("TLS handshake failed"), "{tls}");
        // A plaintext client whose first request a TLS listener drops, in librdkafka 2.12's words.
        let dropped =
            "127.0.0.1:19094/bootstrap: Disconnected: connection closed by peer: receive 0 \
                       after POLLIN (after 0ms in state APIVERSION_QUERY)";
        let plain = why_refused(dropped, false).unwrap();
        assert!(plain.contains("check security.protocol"), "{plain}");
        assert_eq!(why_refused(dropped, true), None, "not a plaintext client");
        let refused = "127.0.0.1:19092/bootstrap: Connect to ipv4#127.0.0.1:19092 failed: \
                       Connection refused (after 0ms in state CONNECT)";
        assert_eq!(
            why_refused(refused, false),
            None,
            "a broker down is no refusal"
        );
    }

    #[test]
    fn the_last_header_of_a_name_wins_and_a_null_value_reads_empty() {
        let h = OwnedHeaders::new()
            .insert(Header {
                key: "msg-id",
                value: Some("a"),
            })
            .insert(Header {
                key: "other",
                value: None::<&str>,
            })
            .insert(Header {
                key: "msg-id",
                value: Some("b"),
            });
        assert_eq!(last_header(&h, "msg-id"), Some(&b"b"[..]));
        assert_eq!(last_header(&h, "other"), Some(&b""[..]));
        assert_eq!(last_header(&h, "none"), None);
    }
}
