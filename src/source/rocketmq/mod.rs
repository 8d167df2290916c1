//! The RocketMQ side: a cluster-mode lite pull consumer (`DefaultLitePullConsumer` of
//! rocketmq-client-rust) that hands every message to the pipeline as a [`Message`] and commits a
//! queue's offset only up to the first copy whose fate is not recorded yet, plus
//! [`RocketMqWriter`], a thin producer for the traffic generator and the tests, and a reader of
//! single copies by position for adoption ([`Source::refetcher`]).
//!
//! The loop is poll → hand over (bounded: backpressure) → track; acknowledgements come back on an
//! unbounded channel that the same loop drains, and every [`COMMIT_INTERVAL`] (and at shutdown)
//! the committable offsets of [`OffsetTracker`] go to the broker. Auto-commit is off: the client's
//! own notion of "consumed" (everything `poll` returned) is never written. Bodies arrive as
//! stored and are uncompressed here, bounded by `pipeline.max_message_bytes` ([`body`]).
//! docs/rocketmq.md explains the commit rule, rebalances, restarts and the client's gaps that
//! are worked around here.
//!
//! The rebalance listener keeps the source's [`Membership`] (joined, queues held, rebalances);
//! beside the consume loop a second future measures each held queue's lag every
//! [`Membership::lag_interval`]: the broker's max offset against the committed offset.

mod body;
mod client;
mod refetch;
mod writer;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use rocketmq_client_rust::{DefaultLitePullConsumer, MessageQueueListener};
use rocketmq_model::common::consumer::consume_from_where::ConsumeFromWhere;
use rocketmq_model::common::message::message_ext::MessageExt;
use rocketmq_model::common::message::message_queue::MessageQueue;
use rocketmq_protocol::protocol::heartbeat::message_model::MessageModel;
use rocketmq_protocol::protocol::namespace_util::NamespaceUtil;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::message::{read_identity, Ack, BadInput, Finished, Message, Origin, Side};
use crate::source::config::{IdSource, RocketMqSideConfig, SideConfig};
use crate::source::outlet::Outlet;
use crate::source::{Membership, OffsetTracker, Reading, Source, SourceContext, SourceError};

pub use body::Codec;
use client::{boxed, explain, ClientHome};
pub use writer::{Compression, RocketMqWriter, WriterError};

/// How long one `poll` waits for messages; also the loop's worst-case reaction time to a cancel
/// or a pause while no message arrives.
const POLL_TIMEOUT: Duration = Duration::from_millis(100);
/// How often finished offsets are committed to the broker.
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(200);
/// How long a cancelled source waits for the acknowledgements of copies already handed over.
pub const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// How long a stopping source may spend making sure the broker has its last commit.
const CONFIRM_GRACE: Duration = Duration::from_secs(3);
/// How long the broker may hold a pull request open when there is nothing new. A new message
/// answers a held pull at once; a short hold bounds how long a stop waits for the held pulls.
const LONG_POLL: Duration = Duration::from_millis(1_000);
/// How long the client waits for the answer to a held pull. The broker looks for expired held
/// pulls only every 5 s (`PullRequestHoldService`), so one is answered 1-6 s after it was sent;
/// a shorter wait turns every idle pull into a timeout, an ERROR line and a reconnect.
const PULL_TIMEOUT: Duration = Duration::from_millis(8_000);
/// Messages fetched per pull request (the client's default is 10; brokers give at most 32 from
/// memory, `maxTransferCountOnMessageInMemory`).
const PULL_BATCH_SIZE: i32 = 32;
/// `pull_threshold_for_all`. The client takes it as the capacity of the queue that hands
/// fetched batches to `poll` *and* as a rate: at most that many batches admitted per second.
/// A batch over the rate fails its pull (`ERROR … Pull error … Argument is invalid`) and the
/// queue waits [`PULL_DELAY_ON_ERROR`] before pulling again. Live traffic comes a message or two
/// per pull, so 2,000 stalled a side taking more than about 2,000 messages/s (docs/rocketmq.md,
/// "Pull settings"). 65,536 is the client's ceiling: a rate no pull loop reaches. What a paused
/// source holds is bounded per queue instead ([`PULL_THRESHOLD_FOR_QUEUE`], and in MiB by
/// [`pull_mib_per_queue`]), by flow control that waits 50 ms without an error.
const PULL_THRESHOLD_FOR_ALL: i64 = 65_536;
/// Messages held fetched but not polled, per queue, before the queue's pulls wait (50 ms at a
/// time, without an error).
const PULL_THRESHOLD_FOR_QUEUE: i64 = 1_000;
/// How long a queue waits after a failed pull. With the rate above out of reach and the bytes
/// held bounded by flow control, what fails a pull is a broker away or refusing: one try (and
/// one ERROR line) per queue per second, the client's default.
const PULL_DELAY_ON_ERROR: Duration = Duration::from_millis(1000);

/// `pull_threshold_size_for_queue` (MiB of bodies held per queue before its pulls wait). The
/// client also refuses a fetched batch, as a pull error, once the bodies waiting for `poll`
/// pass 1/16 of its memory budget (itself a quarter of the process's memory limit: 16 MiB in a
/// 1 GiB container). Flow control must stop the pulls first, so each queue gets an eighth of
/// that (eight queues per instance before a refusal is possible), 1 to 32 MiB; and no more than
/// an eighth of `pipeline.max_buffered_bytes`, so that eight queues buffer about that much in
/// the client (docs/pipeline.md, "Memory").
fn pull_mib_per_queue(budget_bytes: usize, max_buffered_bytes: usize) -> i32 {
    ((budget_bytes / 16 / 8).min(max_buffered_bytes / 8) >> 20).clamp(1, 32) as i32
}

/// Builds the RocketMQ source of a validated `[[side]]` with `kind = "rocketmq"`.
pub fn build(side: &SideConfig) -> Result<Box<dyn Source>, SourceError> {
    let name: Side = side.name.as_str().into();
    let rocketmq = side.rocketmq.clone().ok_or_else(|| SourceError::Start {
        side: name.clone(),
        reason: "no [side.rocketmq] section".to_owned(),
    })?;
    Ok(Box::new(RocketMqSource {
        side: name,
        rocketmq,
        message_id: side.message_id.clone(),
        business_id: side.business_id.clone(),
        max_message_bytes: Arc::new(AtomicUsize::new(
            crate::pipeline::config::PipelineConfig::default().max_message_bytes,
        )),
    }))
}

/// A RocketMQ consumer group (cluster mode) on one topic and tag expression.
pub struct RocketMqSource {
    side: Side,
    rocketmq: RocketMqSideConfig,
    message_id: IdSource,
    business_id: IdSource,
    /// `pipeline.max_message_bytes` from the context once the source runs, for its refetchers
    /// too (they are built before).
    max_message_bytes: Arc<AtomicUsize>,
}

impl Source for RocketMqSource {
    fn refetcher(&self) -> Result<Arc<dyn super::Refetch>, SourceError> {
        Ok(Arc::new(refetch::RocketMqRefetch::new(
            self.side.clone(),
            self.rocketmq.clone(),
            self.message_id.clone(),
            self.business_id.clone(),
            self.max_message_bytes.clone(),
        )))
    }

    fn run(self: Box<Self>, cx: SourceContext) -> BoxFuture<'static, Result<(), SourceError>> {
        // On the daemon's runtime, like the Kafka side: the crate's `recursion_limit` lets the
        // compiler prove the client's deep futures `Send` (upstream sets the same on its crates,
        // mxsm/rocketmq-rust#3696, #9144, #9150).
        Box::pin(async move {
            self.max_message_bytes
                .store(cx.max_message_bytes, Ordering::Relaxed);
            let home = ClientHome::new("source", 2).map_err(|reason| SourceError::Start {
                side: self.side.clone(),
                reason,
            })?;
            let result = self.consume(&home, cx).await;
            home.shutdown().await;
            tracing::info!(side = %self.side, "rocketmq consumer stopped");
            result
        })
    }
}

impl RocketMqSource {
    async fn consume(&self, home: &ClientHome, cx: SourceContext) -> Result<(), SourceError> {
        let (reassigned_tx, reassigned_rx) = mpsc::unbounded_channel();
        let membership = cx.membership.clone();
        let listener = Reassigned {
            tx: reassigned_tx,
            membership: membership.clone(),
            topic: self.rocketmq.topic.as_str().into(),
            started: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        let consumer = self
            .start_consumer(home, listener.clone(), cx.out.budget().total())
            .await
            .map_err(|reason| SourceError::Start {
                side: self.side.clone(),
                reason,
            })?;
        tracing::info!(
            side = %self.side,
            topic = %self.rocketmq.topic,
            group = %self.rocketmq.group,
            name_server = %self.rocketmq.name_server,
            connection = %client::describe(&self.rocketmq),
            "rocketmq consumer started"
        );
        // `start` ran the first rebalance (after registering with the broker), so what is
        // assigned now is this instance's first assignment, even if it is empty: joined.
        listener.started.store(true, Ordering::Release);
        match consumer.assignment().await {
            Ok(queues) => listener.apply(&queues),
            Err(e) => {
                tracing::warn!(side = %self.side, error = %explain(&e), "cannot read the first rocketmq assignment; waiting for the next rebalance")
            }
        }
        let mut run = Consuming::new(self, consumer, reassigned_rx, cx.max_message_bytes);
        let lag_stop = CancellationToken::new();
        let lag = FollowLag {
            consumer: run.consumer.clone(),
            membership: membership.clone(),
            committed: run.committed.clone(),
            handed: run.handed.clone(),
            stop: lag_stop.clone(),
        };
        let consume = async {
            let result = run.consume(cx).await;
            lag_stop.cancel();
            result
        };
        // Both in this task: the lag future never holds the consume loop up (its requests are
        // awaited, not blocked on), and it ends as soon as the loop has.
        let (result, ()) = tokio::join!(consume, lag.run());
        run.consumer.shutdown().await;
        membership.left();
        result
    }

    /// Creates, subscribes and starts the consumer, then checks that the topic has a route and
    /// that a broker of it answers this client (TLS, ACL), so that a wrong setting fails the
    /// start with one error instead of an idle source logging pull errors.
    async fn start_consumer(
        &self,
        home: &ClientHome,
        reassigned: Reassigned,
        max_buffered_bytes: usize,
    ) -> Result<DefaultLitePullConsumer, String> {
        let cfg = &self.rocketmq;
        let how = client::describe(cfg);
        let mib_per_queue = pull_mib_per_queue(
            home.runtime.resource_budget().limit().capacity.bytes,
            max_buffered_bytes,
        );
        let mut builder = DefaultLitePullConsumer::builder(home.runtime.clone())
            .client_options(client::client_config(cfg).into())
            .consumer_group(cfg.group.as_str())
            .name_server_addr(cfg.name_server.as_str())
            .use_tls(cfg.tls)
            .message_model(MessageModel::Clustering)
            // A group with no committed offset starts at the oldest message still stored: the
            // arbiter answers DONE / NOT_MINE for what the other side already handled, while
            // starting at the tail could skip what this side owns (DESIGN.md invariant 2).
            .consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset)
            .auto_commit(false)
            .pull_batch_size(PULL_BATCH_SIZE)
            .pull_threshold_for_all(PULL_THRESHOLD_FOR_ALL)
            .pull_threshold_for_queue(PULL_THRESHOLD_FOR_QUEUE)
            .pull_threshold_size_for_queue(mib_per_queue)
            .pull_time_delay_millis_when_exception(PULL_DELAY_ON_ERROR.as_millis() as u64)
            .poll_timeout_millis(POLL_TIMEOUT.as_millis() as u64)
            .broker_suspend_max_time_millis(LONG_POLL.as_millis() as u64)
            .consumer_timeout_millis_when_suspend(PULL_TIMEOUT.as_millis() as u64);
        if let Some(ns) = &cfg.namespace {
            builder = builder.namespace(ns.as_str());
        }
        if let Some(hook) = client::acl_hook(cfg) {
            builder = builder.rpc_hook(hook);
        }
        let consumer = builder
            .build()
            .map_err(|e| format!("bad consumer settings: {}", explain(&e)))?;
        let started = async {
            consumer
                .subscribe_with_listener(&cfg.topic, &cfg.tag_expression, reassigned)
                .await
                .map_err(|e| {
                    format!(
                        "cannot subscribe to `{}` with `{}`: {}",
                        cfg.topic,
                        cfg.tag_expression,
                        explain(&e)
                    )
                })?;
            consumer.start().await.map_err(|e| {
                format!(
                    "cannot start group `{}` via name server {} ({how}): {}",
                    cfg.group,
                    cfg.name_server,
                    explain(&e)
                )
            })?;
            // start() succeeds even when the topic does not exist, or when the name server
            // cannot be reached: say so now rather than consume nothing in silence.
            let queues = consumer
                .fetch_message_queues(&cfg.topic)
                .await
                .map_err(|e| {
                    // The client logs why a connection failed and answers "no route": say both
                    // things it can mean.
                    format!(
                        "topic `{}` has no route on name server {} ({how}): {}. Either the topic \
                         does not exist there, or the name server was not reached: a TLS-only \
                         name server refuses a plaintext client (tls = false), and with tls = true \
                         the servers' certificates must be signed by a CA in tls_ca_file (or the \
                         system's roots)",
                        cfg.topic,
                        cfg.name_server,
                        explain(&e)
                    )
                })?;
            let Some(first) = queues.iter().min() else {
                return Err(format!("topic `{}` has no readable queue", cfg.topic));
            };
            // The name server does not check ACL credentials; a broker does, on every request.
            consumer.max_offset(first).await.map_err(|e| {
                format!(
                    "broker `{}` of topic `{}` refused this client ({how}): {}",
                    first.broker_name(),
                    cfg.topic,
                    explain(&e)
                )
            })?;
            Ok(())
        };
        match started.await {
            Ok(()) => Ok(consumer),
            Err(reason) => {
                consumer.shutdown().await;
                Err(reason)
            }
        }
    }
}

/// Receives the client's rebalance results (the queues now assigned to this instance).
#[derive(Clone)]
struct Reassigned {
    tx: mpsc::UnboundedSender<HashSet<MessageQueue>>,
    membership: Membership,
    /// The topic as configured (the client's queues carry `namespace%topic`).
    topic: Arc<str>,
    /// Set once the start's checks passed: a rebalance the client runs inside `start` is not a
    /// join yet (the start may still fail, and `/readyz` must not say ready meanwhile).
    started: Arc<std::sync::atomic::AtomicBool>,
}

impl Reassigned {
    /// Reports a (possibly unchanged) assignment: the membership at once, so that the lag of a
    /// queue that left is gone before the next measurement, and one log line per change; the
    /// offset books through the consume loop.
    fn apply(&self, assigned: &HashSet<MessageQueue>) {
        if !self.started.load(Ordering::Acquire) {
            return;
        }
        let labels: BTreeSet<String> = assigned
            .iter()
            .map(|mq| queue_label(&self.topic, mq))
            .collect();
        if let Some((gained, lost)) = self.membership.reassigned(&labels) {
            tracing::info!(
                side = %self.membership.side(),
                assigned = ?gained,
                revoked = ?lost,
                held = labels.len(),
                "rocketmq rebalance"
            );
        }
        let _ = self.tx.send(assigned.clone());
    }
}

impl MessageQueueListener for Reassigned {
    fn message_queue_changed(
        &self,
        _topic: &str,
        _all: &HashSet<MessageQueue>,
        assigned: &HashSet<MessageQueue>,
    ) {
        // Runs on a client task; the consume loop applies it between two polls.
        self.apply(assigned);
    }
}

/// The `queue` label of a queue in the lag metric: `broker/topic/queueId`, with the topic as
/// configured (no namespace).
fn queue_label(topic: &str, mq: &MessageQueue) -> String {
    format!("{}/{topic}/{}", mq.broker_name(), mq.queue_id())
}

/// The offsets the source committed last, per queue (as configured, no namespace), shared
/// with the lag measurement.
type Committed = Arc<Mutex<HashMap<MessageQueue, i64>>>;

/// One past the last offset handed to the pipeline, per queue (as configured), shared with the
/// lag measurement for the stall detector ([`Reading::position`]). Updated once per handed-over
/// batch, never per copy.
type Handed = Arc<Mutex<HashMap<MessageQueue, i64>>>;

/// Measures the lag of every assigned queue every [`Membership::lag_interval`] until `stop`.
/// A failed request leaves that queue's last value; the next measurement replaces it.
struct FollowLag {
    consumer: DefaultLitePullConsumer,
    membership: Membership,
    committed: Committed,
    handed: Handed,
    stop: CancellationToken,
}

impl FollowLag {
    async fn run(self) {
        // The group's committed offset of queues this source has committed nothing for since
        // they were assigned; constant while this instance holds them (no one else commits
        // them).
        let mut resting: HashMap<MessageQueue, i64> = HashMap::new();
        let mut tick = tokio::time::interval(self.membership.lag_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            // The requests are plain queries: dropping them half-way on `stop` loses nothing.
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = boxed(self.measure(&mut resting)) => {}
            }
        }
    }

    /// One measurement: for each assigned queue, the broker's max offset (the next offset it
    /// will write: one request per queue) minus the committed offset, and, for the stall
    /// detector, how far the source has handed the queue over and what waits past that.
    async fn measure(&self, resting: &mut HashMap<MessageQueue, i64>) {
        let Ok(queues) = self.consumer.assignment().await else {
            return;
        };
        resting.retain(|mq, _| queues.contains(mq));
        self.handed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|mq, _| queues.contains(mq));
        let side = self.membership.side();
        let mut readings = Vec::with_capacity(queues.len());
        let mut reach = Reach::default();
        for mq in queues {
            let end = match self.consumer.max_offset(&mq).await {
                Ok(end) => {
                    reach.answered(mq.broker_name());
                    end
                }
                Err(e) => {
                    let why = explain(&e);
                    tracing::debug!(side = %side, queue = %mq, error = %why, "cannot read the rocketmq max offset now");
                    reach.failed(mq.broker_name(), why);
                    continue;
                }
            };
            let ours = self
                .committed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&mq)
                .copied();
            let from = match (ours, resting.get(&mq)) {
                // What this source committed last (the copies below it are finished).
                (Some(offset), _) => offset,
                (None, Some(offset)) => *offset,
                // Nothing committed here since the queue was assigned: the offset the client
                // loaded when it took the queue (its memory; a queue this source committed is
                // always there, so this never reads the broker's older value over ours), -1 if
                // the group never committed it. Read once per assignment.
                (None, None) => match self.consumer.committed(&mq).await {
                    Ok(offset) => *resting.entry(mq.clone()).or_insert(offset),
                    Err(_) => continue,
                },
            };
            let from = if from >= 0 {
                from
            } else {
                // Never committed: a new group starts at the oldest stored message.
                match self.consumer.min_offset(&mq).await {
                    Ok(min) => min,
                    Err(_) => continue,
                }
            };
            let position = self
                .handed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&mq)
                .copied();
            readings.push((
                queue_label(mq.topic_str(), &mq),
                Reading {
                    lag: end - from,
                    waiting: end - position.unwrap_or(from).max(from),
                    position,
                },
            ));
        }
        self.membership.measured(&readings);
        reach.report(&self.membership);
    }
}

/// Which brokers answered one lag measurement: a broker none of whose queues answered is out
/// of reach (its process gone, its port closed), and `/readyz` says so until one answers again.
/// The name server is not asked here: the client keeps the routes it has while it is out.
#[derive(Default)]
struct Reach {
    /// Per broker name: `None` once one of its queues answered, else the last error.
    brokers: HashMap<String, Option<String>>,
}

impl Reach {
    fn answered(&mut self, broker: &str) {
        self.brokers.insert(broker.to_owned(), None);
    }

    fn failed(&mut self, broker: &str, why: String) {
        if let Some(last) = self
            .brokers
            .entry(broker.to_owned())
            .or_insert(Some(String::new()))
        {
            *last = why;
        }
    }

    /// Marks the side unreachable (naming the brokers out and their last error) or reached.
    /// A measurement that asked no broker (no queue held) changes nothing.
    fn report(self, membership: &Membership) {
        if self.brokers.is_empty() {
            return;
        }
        let mut out: Vec<String> = self
            .brokers
            .into_iter()
            .filter_map(|(broker, why)| why.map(|why| format!("broker {broker}: {why}")))
            .collect();
        let side = membership.side();
        if out.is_empty() {
            if let Some(lasted) = membership.reached() {
                tracing::info!(side = %side, after = %humantime::format_duration(Duration::from_secs(lasted.as_secs())), "RocketMQ brokers reachable again");
            }
            return;
        }
        out.sort();
        let why = out.join("; ");
        if membership.set_unreachable(Some(why.clone())) {
            tracing::error!(side = %side, "RocketMQ brokers unreachable: {why}; not ready, nothing is read from them until they answer (the client reconnects by itself)");
        }
    }
}

/// How the loop ended.
enum Stop {
    /// `cx.cancel` fired.
    Cancelled,
    /// The pipeline dropped its receiver.
    PipelineGone,
}

/// The state of a running source.
struct Consuming {
    side: Side,
    topic: Arc<str>,
    /// `namespace%topic`, the topic the client's own queues (and its offset table) carry.
    client_topic: Arc<str>,
    message_id: IdSource,
    business_id: IdSource,
    max_message_bytes: usize,
    consumer: DefaultLitePullConsumer,
    positions: Positions,
    acks_tx: Option<mpsc::UnboundedSender<Finished>>,
    acks: mpsc::UnboundedReceiver<Finished>,
    reassigned: mpsc::UnboundedReceiver<HashSet<MessageQueue>>,
    /// The queues assigned now, as the client names them.
    held: HashSet<MessageQueue>,
    next_commit: Instant,
    /// What the last commit sent, for the lag measurement.
    committed: Committed,
    /// How far each queue was handed over, for the lag measurement.
    handed: Handed,
}

impl Consuming {
    fn new(
        src: &RocketMqSource,
        consumer: DefaultLitePullConsumer,
        reassigned: mpsc::UnboundedReceiver<HashSet<MessageQueue>>,
        max_message_bytes: usize,
    ) -> Consuming {
        let (acks_tx, acks) = mpsc::unbounded_channel();
        let cfg = &src.rocketmq;
        let client_topic: Arc<str> = match &cfg.namespace {
            Some(ns) => NamespaceUtil::wrap_namespace(ns.as_str(), cfg.topic.as_str())
                .as_str()
                .into(),
            None => cfg.topic.as_str().into(),
        };
        Consuming {
            side: src.side.clone(),
            topic: cfg.topic.as_str().into(),
            client_topic,
            message_id: src.message_id.clone(),
            business_id: src.business_id.clone(),
            max_message_bytes,
            consumer,
            positions: Positions::new(&cfg.topic),
            acks_tx: Some(acks_tx),
            acks,
            reassigned,
            held: HashSet::new(),
            next_commit: Instant::now() + COMMIT_INTERVAL,
            committed: Committed::default(),
            handed: Handed::default(),
        }
    }

    async fn consume(&mut self, cx: SourceContext) -> Result<(), SourceError> {
        let SourceContext {
            out,
            cancel,
            mut paused,
            ..
        } = cx;
        let stop = self.deliver_until_stopped(&out, &cancel, &mut paused).await;
        // Paused queues issue no new pull once the one the broker holds returns (1-6 s), so the
        // consumer's shutdown, which waits for pull tasks, is quick if the drain took that long.
        if let Ok(queues) = self.consumer.assignment().await {
            self.consumer.pause(queues.into_iter().collect()).await;
        }
        self.drain_in_flight().await;
        self.commit().await;
        self.confirm_commits().await;
        match stop {
            Stop::Cancelled => Ok(()),
            Stop::PipelineGone if cancel.is_cancelled() => Ok(()),
            Stop::PipelineGone => Err(SourceError::Failed {
                side: self.side.clone(),
                reason: "the pipeline stopped taking messages".to_owned(),
            }),
        }
    }

    async fn deliver_until_stopped(
        &mut self,
        out: &Outlet,
        cancel: &CancellationToken,
        paused: &mut watch::Receiver<bool>,
    ) -> Stop {
        // A dropped pause sender leaves the last value in force; stop watching it then.
        let mut pause_open = true;
        loop {
            if cancel.is_cancelled() {
                return Stop::Cancelled;
            }
            self.housekeeping().await;
            if *paused.borrow_and_update() {
                // Paused: fetch nothing new, keep acknowledging and committing.
                tokio::select! {
                    _ = cancel.cancelled() => return Stop::Cancelled,
                    changed = paused.changed(), if pause_open => pause_open = changed.is_ok(),
                    Some(f) = self.acks.recv() => self.positions.tracker.finished(&f),
                    _ = tokio::time::sleep_until(self.next_commit) => {}
                }
                continue;
            }
            // Never inside a select!: a poll dropped half-way loses the batch it already took
            // from the client's cache, and the commit would then skip over it.
            let batch = self
                .consumer
                .poll_with_timeout_zero_copy(POLL_TIMEOUT.as_millis() as u64)
                .await;
            // Each copy's hand-off time is taken here, before any wait for room in the channel.
            let mut copies = Vec::with_capacity(batch.len());
            for ext in &batch {
                let (msg, key) = self.pipeline_message(ext);
                copies.push((msg, key, ext.queue_id(), ext.queue_offset()));
            }
            if let Err(stop) = self.hand_over(copies, out, cancel).await {
                return stop;
            }
        }
    }

    /// Acks, rebalance results and a due commit.
    async fn housekeeping(&mut self) {
        while let Ok(f) = self.acks.try_recv() {
            self.positions.tracker.finished(&f);
        }
        while let Ok(assigned) = self.reassigned.try_recv() {
            self.reassign(assigned);
        }
        if Instant::now() >= self.next_commit {
            self.commit().await;
        }
    }

    /// Hands a polled batch over in order, waiting for room (committing meanwhile) for as much of
    /// it at once as the channel and the byte budget hold. While the pipeline is behind and the
    /// channel full, this task then wakes once per batch the pipeline has made room for, not once
    /// per copy it takes (and acknowledgements wait in their channel for the next commit instead
    /// of waking it).
    async fn hand_over(
        &mut self,
        copies: Vec<(Message, Arc<str>, i32, i64)>,
        out: &Outlet,
        cancel: &CancellationToken,
    ) -> Result<(), Stop> {
        let mut copies = copies.into_iter();
        while copies.len() > 0 {
            // The longest run from the front that fits the channel and the budget (one at least:
            // a body never holds more than the whole budget).
            let (mut sizes, mut bytes) = (Vec::new(), 0usize);
            for (msg, ..) in copies.as_slice().iter().take(out.max_capacity()) {
                let size = msg.payload.len().min(out.budget().total());
                if !sizes.is_empty() && bytes + size > out.budget().total() {
                    break;
                }
                sizes.push(size);
                bytes += size;
            }
            let reserve = out.reserve_many(&sizes);
            tokio::pin!(reserve);
            let (permits, mut held) = loop {
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return Err(Stop::Cancelled),
                    permits = &mut reserve => break permits.map_err(|_| Stop::PipelineGone)?,
                    _ = tokio::time::sleep_until(self.next_commit) => self.commit().await,
                }
            };
            // One past the highest offset handed over per queue in this round (a batch holds one
            // or a few queues), published once for the stall detector.
            let mut reached: Vec<(Arc<str>, i32, i64)> = Vec::new();
            for ((permit, size), (mut msg, key, queue, offset)) in
                permits.zip(&sizes).zip(copies.by_ref())
            {
                // Tracked before it can be acknowledged; an undelivered copy is never tracked,
                // so no commit can pass it.
                self.positions.delivered(&key, queue, offset);
                msg.held = held.split(*size);
                permit.send(msg);
                match reached
                    .iter_mut()
                    .find(|(k, q, _)| Arc::ptr_eq(k, &key) && *q == queue)
                {
                    Some((_, _, next)) => *next = (*next).max(offset + 1),
                    None => reached.push((key, queue, offset + 1)),
                }
            }
            let mut handed = self.handed.lock().unwrap_or_else(PoisonError::into_inner);
            for (key, queue, next) in reached {
                if let Some(mq) = self.positions.queue(&key, queue) {
                    let at = handed.entry(mq).or_insert(next);
                    *at = (*at).max(next);
                }
            }
        }
        Ok(())
    }

    /// Turns one polled message into a pipeline [`Message`]. One whose ids or body cannot be
    /// read (a codec it does not know, a body over `pipeline.max_message_bytes`) still goes, as
    /// bad input without a payload, so that it is dead-lettered and its offset can move on.
    fn pipeline_message(&mut self, ext: &MessageExt) -> (Message, Arc<str>) {
        let inner = ext.message_inner();
        let (identity, payload) =
            match body::read(ext.sys_flag(), inner.body_slice(), self.max_message_bytes) {
                Ok(body) => (
                    read_identity(
                        &self.message_id,
                        &self.business_id,
                        |name| inner.property(name).map(str::as_bytes),
                        &body,
                    ),
                    body,
                ),
                Err(why) => (Err(why), Vec::new()),
            };
        let broker = ext.broker_name();
        let key = self.positions.key(broker);
        let acks_tx = self
            .acks_tx
            .clone()
            .expect("the ack sender lives until the loop has stopped");
        let msg = Message {
            identity,
            payload,
            origin: Origin {
                side: self.side.clone(),
                topic: self.topic.clone(),
                partition: ext.queue_id(),
                broker: Some(self.positions.broker_of(&key)),
                offset: ext.queue_offset(),
                born_ms: ext.born_timestamp(),
            },
            received: std::time::Instant::now(),
            held: crate::source::outlet::Held::none(),
            ack: Ack::new(
                acks_tx,
                Finished {
                    topic: key.clone(),
                    partition: ext.queue_id(),
                    offset: ext.queue_offset(),
                },
            ),
        };
        (msg, key)
    }

    /// A rebalance moved queues: forget the ones that left, so that no commit is made for them
    /// from this instance (their unfinished copies go to the new owner from the last commit).
    fn reassign(&mut self, assigned: HashSet<MessageQueue>) {
        let plain: HashSet<MessageQueue> = assigned
            .iter()
            .map(|mq| MessageQueue::from_parts(&*self.topic, mq.broker_name(), mq.queue_id()))
            .collect();
        // The listener logged the rebalance; this is the books' side of it.
        for mq in self.positions.reassign(&plain) {
            tracing::debug!(side = %self.side, queue = %mq, "rocketmq queue moved away: its offsets are forgotten");
        }
        self.committed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|mq, _| plain.contains(mq));
        self.held = assigned.iter().map(|mq| self.client_queue(mq)).collect();
    }

    /// Commits what is finished (see [`Positions::commits`]).
    async fn commit(&mut self) {
        self.next_commit = Instant::now() + COMMIT_INTERVAL;
        while let Ok(f) = self.acks.try_recv() {
            self.positions.tracker.finished(&f);
        }
        if let Some(offsets) = self.positions.commits() {
            tracing::debug!(side = %self.side, ?offsets, "rocketmq commit");
            self.committed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone_from(&offsets);
            boxed(self.send_commits(offsets)).await;
        }
    }

    /// Puts `offsets` in the client's offset table and sends the ones that changed to the
    /// broker, one way (the client's `UPDATE_CONSUMER_OFFSET` is not answered).
    ///
    /// Not `commit_with_map(…, persist = true)`: that persists only the queues in the map and
    /// drops every other queue from the client's offset table, assigned or not, so a queue this
    /// source had delivered nothing from yet would lose the offset the client loaded for it.
    /// Persisting every queue held keeps the table whole.
    async fn send_commits(&self, offsets: HashMap<MessageQueue, i64>) {
        self.consumer.commit_with_map(offsets, false).await;
        if self.held.is_empty() {
            return;
        }
        if let Some(store) = self.consumer.offset_store().await {
            store.persist_all(&self.held).await;
        }
    }

    /// The queue `mq` (as configured) as the client's offset table names it.
    fn client_queue(&self, mq: &MessageQueue) -> MessageQueue {
        MessageQueue::from_parts(&*self.client_topic, mq.broker_name(), mq.queue_id())
    }

    /// At shutdown: sends the last committed offset of every queue still assigned once more, as
    /// a request the broker answers. The client sends commits one way and marks an offset
    /// persisted once it is written to the connection, so the consumer's shutdown right after
    /// it could close the connection with the last commit unsent, and nothing would send it
    /// again: the next consumer of the group would start that queue from an older offset. The
    /// offsets also go into the client's table again first, so that the consumer's own last
    /// persist at shutdown sends nothing older. Bounded by [`CONFIRM_GRACE`]; a failure is
    /// logged and leaves a redelivery, never a skip.
    async fn confirm_commits(&mut self) {
        let offsets = self
            .committed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if offsets.is_empty() {
            return;
        }
        let (Ok(assigned), Some(store)) = (
            self.consumer.assignment().await,
            self.consumer.offset_store().await,
        ) else {
            return;
        };
        let offsets: HashMap<MessageQueue, i64> = offsets
            .into_iter()
            .filter(|(mq, _)| assigned.contains(mq))
            .collect();
        self.consumer.commit_with_map(offsets.clone(), false).await;
        let side = &self.side;
        let confirm = async {
            for (mq, offset) in &offsets {
                let client_mq = self.client_queue(mq);
                let mut tries = 0;
                while let Err(e) = store
                    .update_consume_offset_to_broker(&client_mq, *offset, false)
                    .await
                {
                    tries += 1;
                    if tries == 3 {
                        tracing::warn!(side = %side, queue = %mq, offset, error = %explain(&e),
                            "rocketmq shutdown: the broker did not confirm the last commit; \
                             copies below it may be delivered again");
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        if tokio::time::timeout(CONFIRM_GRACE, boxed(confirm))
            .await
            .is_err()
        {
            tracing::warn!(side = %self.side, "rocketmq shutdown: confirming the last commits took \
                longer than {CONFIRM_GRACE:?}; copies below them may be delivered again");
        }
    }

    /// After the last hand-over: waits up to [`DRAIN_GRACE`] for the copies in flight to be
    /// acknowledged. Dropping our own sender lets `recv` end as soon as every [`Ack`] is either
    /// done or dropped (a dropped ack hands its copy back: it stays uncommitted).
    async fn drain_in_flight(&mut self) {
        self.acks_tx = None;
        let deadline = Instant::now() + DRAIN_GRACE;
        while self.positions.tracker.in_flight() > 0 {
            tokio::select! {
                f = self.acks.recv() => match f {
                    Some(f) => self.positions.tracker.finished(&f),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(
                        side = %self.side,
                        in_flight = self.positions.tracker.in_flight(),
                        "rocketmq shutdown: copies still unacknowledged after the grace period; \
                         they stay uncommitted and will be delivered again"
                    );
                    break;
                }
            }
        }
    }
}

/// Where this side stands in each queue: what was handed over, what is finished, what was
/// committed. Pure bookkeeping around [`OffsetTracker`], kept apart from the client.
#[derive(Debug)]
struct Positions {
    topic: Arc<str>,
    tracker: OffsetTracker,
    /// Broker name → the key its queues have in `tracker` and in [`Finished`] positions. Queue
    /// ids repeat across brokers (broker-a and broker-b both have queue 0), so the tracker's
    /// "topic" is `topic@broker`.
    keys: Vec<(Arc<str>, Arc<str>)>,
    /// Queues (key, queue id) something was handed over from since they were last assigned.
    live: HashSet<(Arc<str>, i32)>,
    /// The last offset committed per queue.
    committed: HashMap<MessageQueue, i64>,
}

impl Positions {
    fn new(topic: &str) -> Positions {
        Positions {
            topic: topic.into(),
            tracker: OffsetTracker::default(),
            keys: Vec::new(),
            live: HashSet::new(),
            committed: HashMap::new(),
        }
    }

    /// The key of `broker`'s queues (one allocation per broker, then shared).
    fn key(&mut self, broker: &str) -> Arc<str> {
        if let Some((_, key)) = self.keys.iter().find(|(b, _)| &**b == broker) {
            return key.clone();
        }
        let key: Arc<str> = format!("{}@{broker}", self.topic).into();
        self.keys.push((broker.into(), key.clone()));
        key
    }

    /// The broker name of a key from [`Positions::key`] (shared, not copied).
    fn broker_of(&self, key: &Arc<str>) -> Arc<str> {
        self.keys
            .iter()
            .find(|(_, k)| k == key)
            .map(|(b, _)| b.clone())
            .expect("keys are made by Positions::key")
    }

    fn queue(&self, key: &Arc<str>, queue_id: i32) -> Option<MessageQueue> {
        let (broker, _) = self.keys.iter().find(|(_, k)| k == key)?;
        Some(MessageQueue::from_parts(&*self.topic, &**broker, queue_id))
    }

    /// The copy at `offset` of queue (`key`, `queue_id`) was handed to the pipeline.
    fn delivered(&mut self, key: &Arc<str>, queue_id: i32, offset: i64) {
        self.tracker.delivered(key, queue_id, offset);
        if !self.live.contains(&(key.clone(), queue_id)) {
            self.live.insert((key.clone(), queue_id));
        }
    }

    /// Applies a rebalance result: queues that left are forgotten (no commit for them from
    /// here, late acks ignored). Returns them.
    fn reassign(&mut self, assigned: &HashSet<MessageQueue>) -> Vec<MessageQueue> {
        let gone: Vec<(Arc<str>, i32)> = self
            .live
            .iter()
            .filter(|(key, queue_id)| {
                self.queue(key, *queue_id)
                    .is_none_or(|mq| !assigned.contains(&mq))
            })
            .cloned()
            .collect();
        let mut left = Vec::with_capacity(gone.len());
        for (key, queue_id) in gone {
            self.tracker.forget(&key, queue_id);
            self.live.remove(&(key.clone(), queue_id));
            left.extend(self.queue(&key, queue_id));
        }
        self.committed.retain(|mq, _| assigned.contains(mq));
        left
    }

    /// What to commit now: `None` if no queue's committable offset moved, else the last
    /// committed offset of every queue (the client skips unchanged ones when persisting).
    fn commits(&mut self) -> Option<HashMap<MessageQueue, i64>> {
        let moved = self.tracker.take_commits();
        if moved.is_empty() {
            return None;
        }
        for (key, queue_id, offset) in moved {
            if let Some(mq) = self.queue(&key, queue_id) {
                self.committed.insert(mq, offset);
            }
        }
        Some(self.committed.clone())
    }
}

/// The identity and body of a message read by position (adoption), as [`Consuming`] would
/// have handed it over.
fn refetched(
    ext: &MessageExt,
    message_id: &IdSource,
    business_id: &IdSource,
    max: usize,
) -> (Result<crate::message::Identity, BadInput>, Vec<u8>) {
    let inner = ext.message_inner();
    match body::read(ext.sys_flag(), inner.body_slice(), max) {
        Ok(body) => (
            read_identity(
                message_id,
                business_id,
                |name| inner.property(name).map(str::as_bytes),
                &body,
            ),
            body,
        ),
        Err(why) => (Err(why), Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mq(broker: &str, queue_id: i32) -> MessageQueue {
        MessageQueue::from_parts("t", broker, queue_id)
    }

    fn finish(p: &mut Positions, key: &Arc<str>, queue_id: i32, offset: i64) {
        p.tracker.finished(&Finished {
            topic: key.clone(),
            partition: queue_id,
            offset,
        });
    }

    #[test]
    fn commits_stop_at_the_first_unfinished_copy_and_repeat_every_queue() {
        let mut p = Positions::new("t");
        let a = p.key("broker-a");
        for o in 0..5 {
            p.delivered(&a, 0, o);
        }
        p.delivered(&a, 1, 40);
        finish(&mut p, &a, 0, 0);
        finish(&mut p, &a, 0, 1);
        finish(&mut p, &a, 0, 3);
        finish(&mut p, &a, 1, 40);
        let c = p.commits().unwrap();
        assert_eq!(
            c,
            HashMap::from([(mq("broker-a", 0), 2), (mq("broker-a", 1), 41)])
        );
        assert_eq!(p.commits(), None, "nothing moved");
        finish(&mut p, &a, 0, 2);
        let c = p.commits().unwrap();
        assert_eq!(
            c,
            HashMap::from([(mq("broker-a", 0), 4), (mq("broker-a", 1), 41)])
        );
    }

    #[test]
    fn the_same_queue_id_on_two_brokers_is_two_queues() {
        let mut p = Positions::new("t");
        let a = p.key("broker-a");
        let b = p.key("broker-b");
        assert!(Arc::ptr_eq(&a, &p.key("broker-a")), "one key per broker");
        assert_ne!(a, b);
        assert_eq!(&*p.broker_of(&b), "broker-b");
        p.delivered(&a, 0, 7);
        p.delivered(&b, 0, 7);
        finish(&mut p, &b, 0, 7);
        let c = p.commits().unwrap();
        assert_eq!(
            c,
            HashMap::from([(mq("broker-a", 0), 7), (mq("broker-b", 0), 8)])
        );
    }

    #[test]
    fn a_queue_that_moved_away_gets_no_commit_and_ignores_late_acks() {
        let mut p = Positions::new("t");
        let a = p.key("broker-a");
        p.delivered(&a, 0, 10);
        p.delivered(&a, 1, 20);
        assert_eq!(p.commits().unwrap().len(), 2);
        let left = p.reassign(&HashSet::from([mq("broker-a", 1)]));
        assert_eq!(left, vec![mq("broker-a", 0)]);
        assert_eq!(p.tracker.in_flight(), 1, "queue 0's open copy is forgotten");
        finish(&mut p, &a, 0, 10);
        finish(&mut p, &a, 1, 20);
        let c = p.commits().unwrap();
        assert_eq!(c, HashMap::from([(mq("broker-a", 1), 21)]));
    }

    #[tokio::test]
    async fn a_broker_none_of_whose_queues_answers_is_named_until_one_answers() {
        let m = crate::telemetry::metrics::Metrics::default();
        let ms = Membership::new("rocketmq".into(), &m, Duration::from_secs(5));
        let mut reach = Reach::default();
        reach.failed("broker-a", "refused".into());
        reach.answered("broker-b");
        reach.failed("broker-b", "timeout".into());
        reach.failed("broker-a", "connection refused".into());
        reach.report(&ms);
        let (why, _) = ms.unreachable().expect("broker-a is out");
        assert_eq!(
            why, "broker broker-a: connection refused",
            "the last error, not broker-b"
        );
        Reach::default().report(&ms);
        assert!(
            ms.unreachable().is_some(),
            "a measurement that asked no broker changes nothing"
        );
        let mut reach = Reach::default();
        reach.answered("broker-a");
        reach.report(&ms);
        assert!(ms.unreachable().is_none(), "one answer ends it");
    }

    #[test]
    fn bytes_held_per_queue_stay_within_what_the_client_admits() {
        // A 1 GiB container: the client's budget is 256 MiB, its hand-over queue 16 MiB.
        let plenty = 1 << 40;
        assert_eq!(pull_mib_per_queue(256 << 20, plenty), 2);
        assert_eq!(pull_mib_per_queue(64 << 20, plenty), 1, "never below 1 MiB");
        assert_eq!(
            pull_mib_per_queue(24 << 30, plenty),
            32,
            "a large host: 32 MiB"
        );
        // pipeline.max_buffered_bytes: an eighth of it per queue.
        assert_eq!(pull_mib_per_queue(24 << 30, 64 << 20), 8);
        assert_eq!(pull_mib_per_queue(24 << 30, 4 << 20), 1);
    }

    #[test]
    fn lag_labels_name_the_broker_the_configured_topic_and_the_queue() {
        let client_mq = MessageQueue::from_parts("ns1%reward", "broker-a", 3);
        assert_eq!(queue_label("reward", &client_mq), "broker-a/reward/3");
    }
}
