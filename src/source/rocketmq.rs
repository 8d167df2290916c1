//! The RocketMQ side: a cluster-mode lite pull consumer (`DefaultLitePullConsumer` of
//! rocketmq-client-rust) that hands every message to the pipeline as a [`Message`] and commits a
//! queue's offset only up to the first copy whose fate is not recorded yet, plus
//! [`RocketMqWriter`], a thin producer for the traffic generator and the tests.
//!
//! The loop is poll → hand over (bounded: backpressure) → track; acknowledgements come back on an
//! unbounded channel that the same loop drains, and every [`COMMIT_INTERVAL`] (and at shutdown)
//! the committable offsets of [`OffsetTracker`] go to the broker. Auto-commit is off: the client's
//! own notion of "consumed" (everything `poll` returned) is never written. docs/rocketmq.md
//! explains the commit rule, rebalances, restarts and the client gaps worked around here.
//!
//! The rebalance listener keeps the source's [`Membership`] (joined, queues held, rebalances);
//! beside the consume loop, on the same thread, a second future measures each held queue's lag
//! every [`Membership::lag_interval`]: the broker's max offset against the committed offset
//! (docs/rocketmq.md, "Lag").

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use rocketmq_client_rust::{
    ClientError, ClientRuntime, ClientRuntimeConfig, DefaultLitePullConsumer, DefaultMQProducer,
    MessageQueueListener, ReadOffsetType, TelemetryHandle,
};
use rocketmq_model::common::consumer::consume_from_where::ConsumeFromWhere;
use rocketmq_model::common::message::message_ext::MessageExt;
use rocketmq_model::common::message::message_queue::MessageQueue;
use rocketmq_model::common::message::message_single::Message as RmqMessage;
use rocketmq_model::result::SendStatus;
use rocketmq_protocol::protocol::heartbeat::message_model::MessageModel;
use rocketmq_runtime::shutdown_report::ShutdownReport;
use rocketmq_runtime::{RuntimeConfig, RuntimeOwner};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{IdSource, RocketMqSideConfig, SideConfig};
use crate::message::{read_identity, Ack, Finished, Message, Origin, Side};
use crate::source::{Membership, OffsetTracker, Source, SourceContext, SourceError};

/// How long one `poll` waits for messages; also the loop's worst-case reaction time to a cancel
/// or a pause while no message arrives.
const POLL_TIMEOUT: Duration = Duration::from_millis(100);
/// How often finished offsets are committed to the broker.
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(200);
/// How long a cancelled source waits for the acknowledgements of copies already handed over.
pub const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// How long a stopping source may spend making sure the broker has its last commit.
const CONFIRM_GRACE: Duration = Duration::from_secs(3);
/// How long the broker may hold a pull request open when there is nothing new.
const LONG_POLL: Duration = Duration::from_millis(1_000);
/// How long the client waits for the answer to a held pull. The broker looks for expired held
/// pulls only every 5 s (`PullRequestHoldService`), so one is answered 1-6 s after it was sent;
/// a shorter wait turns every idle pull into a timeout, an ERROR line and a reconnect.
const PULL_TIMEOUT: Duration = Duration::from_millis(8_000);
/// Messages fetched per pull request (the client's default is 10).
const PULL_BATCH_SIZE: i32 = 32;
/// Messages the client may hold fetched but not yet polled, over all queues. Bounds memory while
/// the source is paused; the pipeline's bounded channel is the real backpressure.
///
/// The client also takes it as the number of fetched batches its hand-over queue admits per
/// second. A pull whose batch finds that rate spent fails (`Pull error … Argument is invalid`),
/// and the client leaves the queue alone for 1 s before it pulls again (docs/rocketmq.md, gap
/// 11). Live traffic comes a message or two per pull, so with 2,000 a side taking more than about
/// 2,000 messages/s stalled for a second at a time, and a drain stalled at its start. 10,000 (the
/// Java lite pull consumer's default) leaves room for 10,000 pulls a second.
const PREFETCH_LIMIT: i64 = 10_000;

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
    }))
}

/// A RocketMQ consumer group (cluster mode) on one topic and tag expression.
pub struct RocketMqSource {
    side: Side,
    rocketmq: RocketMqSideConfig,
    message_id: IdSource,
    business_id: IdSource,
}

impl Source for RocketMqSource {
    fn run(self: Box<Self>, cx: SourceContext) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            let side = self.side.clone();
            let (done_tx, done_rx) = oneshot::channel();
            // The consumer's futures cannot be proven `Send` within the compiler's default
            // recursion limit (E0275 deep inside rocketmq-client-rust), so the whole loop runs
            // on a thread of its own, blocking on the client's runtime; only channels and the
            // cancellation token cross over.
            std::thread::Builder::new()
                .name(format!("rmq-{side}"))
                .spawn(move || {
                    let _ = done_tx.send(self.run_blocking(cx));
                })
                .map_err(|e| SourceError::Start {
                    side: side.clone(),
                    reason: format!("cannot start the consumer thread: {e}"),
                })?;
            done_rx.await.unwrap_or_else(|_| {
                Err(SourceError::Failed {
                    side,
                    reason: "the rocketmq consumer thread panicked".to_owned(),
                })
            })
        })
    }
}

impl RocketMqSource {
    /// Runs the source to the end on the calling (dedicated) thread.
    fn run_blocking(&self, cx: SourceContext) -> Result<(), SourceError> {
        let home = ClientHome::new("source").map_err(|reason| SourceError::Start {
            side: self.side.clone(),
            reason,
        })?;
        let result = home.owner.block_on(self.consume(&home, cx));
        home.shutdown_blocking();
        tracing::info!(side = %self.side, "rocketmq consumer stopped");
        result
    }

    async fn consume(&self, home: &ClientHome, cx: SourceContext) -> Result<(), SourceError> {
        let (reassigned_tx, reassigned_rx) = mpsc::unbounded_channel();
        let membership = cx.membership.clone();
        let listener = Reassigned {
            tx: reassigned_tx,
            membership: membership.clone(),
        };
        let consumer = self
            .start_consumer(home, listener.clone())
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
            "rocketmq consumer started"
        );
        // `start` ran the first rebalance (after registering with the broker), so what is
        // assigned now is this instance's first assignment, even if it is empty: joined.
        match consumer.assignment().await {
            Ok(queues) => listener.apply(&queues),
            Err(e) => {
                tracing::warn!(side = %self.side, error = %e, "cannot read the first rocketmq assignment; waiting for the next rebalance")
            }
        }
        let mut run = Consuming::new(self, consumer, reassigned_rx);
        let lag_stop = CancellationToken::new();
        let lag = follow_lag(
            run.consumer.clone(),
            membership.clone(),
            run.committed.clone(),
            lag_stop.clone(),
        );
        let consume = async {
            let result = run.consume(cx).await;
            lag_stop.cancel();
            result
        };
        // Both on this thread: the lag future never holds the consume loop up (its requests
        // are awaited, not blocked on), and it ends as soon as the loop has.
        let (result, ()) = tokio::join!(consume, lag);
        run.consumer.shutdown().await;
        membership.left();
        result
    }

    /// Creates, subscribes and starts the consumer, then checks that the topic has a route.
    async fn start_consumer(
        &self,
        home: &ClientHome,
        reassigned: Reassigned,
    ) -> Result<DefaultLitePullConsumer, String> {
        let cfg = &self.rocketmq;
        let consumer = DefaultLitePullConsumer::builder(home.runtime.clone())
            .consumer_group(cfg.group.as_str())
            .name_server_addr(cfg.name_server.as_str())
            .message_model(MessageModel::Clustering)
            // A group with no committed offset starts at the oldest message still stored: the
            // arbiter answers DONE / NOT_MINE for what the other side already handled, while
            // starting at the tail could skip what this side owns (DESIGN.md invariant 2).
            .consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset)
            .auto_commit(false)
            .pull_batch_size(PULL_BATCH_SIZE)
            .pull_threshold_for_all(PREFETCH_LIMIT)
            .poll_timeout_millis(POLL_TIMEOUT.as_millis() as u64)
            // A pull task notices shutdown only between two pulls, and the client waits up to
            // 5 s per queue, one queue after the other, before it aborts one held by the broker
            // (20 s by default). A short hold bounds the shutdown; a new message still wakes a
            // held pull at once.
            .broker_suspend_max_time_millis(LONG_POLL.as_millis() as u64)
            .consumer_timeout_millis_when_suspend(PULL_TIMEOUT.as_millis() as u64)
            .build()
            .map_err(|e| format!("bad consumer settings: {e}"))?;
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
                    "cannot start group `{}` via name server {}: {}",
                    cfg.group,
                    cfg.name_server,
                    explain(&e)
                )
            })?;
            // start() succeeds even when the topic does not exist: say so now rather than
            // consume nothing in silence.
            let queues = consumer
                .fetch_message_queues(&cfg.topic)
                .await
                .map_err(|e| {
                    format!(
                        "topic `{}` has no route on name server {}: {}",
                        cfg.topic,
                        cfg.name_server,
                        explain(&e)
                    )
                })?;
            if queues.is_empty() {
                return Err(format!("topic `{}` has no readable queue", cfg.topic));
            }
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
}

impl Reassigned {
    /// Reports a (possibly unchanged) assignment: the membership at once, so that the lag of a
    /// queue that left is gone before the next measurement, and one log line per change; the
    /// offset books through the consume loop.
    fn apply(&self, assigned: &HashSet<MessageQueue>) {
        let labels: BTreeSet<String> = assigned.iter().map(queue_label).collect();
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

/// The `queue` label of a queue in the lag metric: `broker/topic/queueId`.
fn queue_label(mq: &MessageQueue) -> String {
    format!("{}/{}/{}", mq.broker_name(), mq.topic(), mq.queue_id())
}

/// The offsets the source committed last, per queue, shared with the lag measurement.
type Committed = Arc<Mutex<HashMap<MessageQueue, i64>>>;

/// Measures the lag of every assigned queue every [`Membership::lag_interval`] until `stop`.
/// A failed request leaves that queue's last value; the next measurement replaces it.
async fn follow_lag(
    consumer: DefaultLitePullConsumer,
    membership: Membership,
    committed: Committed,
    stop: CancellationToken,
) {
    // The broker's committed offset of queues this source has committed nothing for since they
    // were assigned; constant while this instance holds them (no one else commits them).
    let mut resting: HashMap<MessageQueue, i64> = HashMap::new();
    let mut tick = tokio::time::interval(membership.lag_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // The requests are plain queries: dropping them half-way on `stop` loses nothing.
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = measure_lag(&consumer, &membership, &committed, &mut resting) => {}
        }
    }
}

/// One measurement: for each assigned queue, the broker's max offset (the next offset it will
/// write: one request per queue) minus the committed offset (local, see below).
async fn measure_lag(
    consumer: &DefaultLitePullConsumer,
    membership: &Membership,
    committed: &Committed,
    resting: &mut HashMap<MessageQueue, i64>,
) {
    let Ok(queues) = consumer.assignment().await else {
        return;
    };
    resting.retain(|mq, _| queues.contains(mq));
    let store = consumer.offset_store().await;
    for mq in queues {
        let end = match consumer.max_offset(&mq).await {
            Ok(end) => end,
            Err(e) => {
                tracing::debug!(side = %membership.side(), queue = %mq, error = %e, "cannot read the rocketmq max offset now");
                continue;
            }
        };
        let ours = committed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&mq)
            .copied();
        let from = match ours {
            // What this source committed last (the copies below it are finished).
            Some(offset) => offset,
            None => match resting.get(&mq) {
                Some(offset) => *offset,
                None => {
                    // Nothing committed here since the queue was assigned: the offset the client
                    // loaded from the broker on assignment, from its memory, else from the broker
                    // (read once per assignment: the client keeps only queues it was last told
                    // to commit). -1: the group never committed this queue.
                    let Some(store) = &store else { continue };
                    let mut offset = store.read_offset(&mq, ReadOffsetType::ReadFromMemory).await;
                    if offset < 0 {
                        offset = store.read_offset(&mq, ReadOffsetType::ReadFromStore).await;
                    }
                    if offset == -2 {
                        continue; // the broker did not answer; try again next time
                    }
                    resting.insert(mq.clone(), offset);
                    offset
                }
            },
        };
        let from = if from >= 0 {
            from
        } else {
            // Never committed: a new group starts at the oldest stored message.
            match consumer.min_offset(&mq).await {
                Ok(min) => min,
                Err(_) => continue,
            }
        };
        membership.record_lag(&queue_label(&mq), end - from);
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
    message_id: IdSource,
    business_id: IdSource,
    consumer: DefaultLitePullConsumer,
    positions: Positions,
    acks_tx: Option<mpsc::UnboundedSender<Finished>>,
    acks: mpsc::UnboundedReceiver<Finished>,
    reassigned: mpsc::UnboundedReceiver<HashSet<MessageQueue>>,
    next_commit: Instant,
    /// What the last commit sent, for the lag measurement.
    committed: Committed,
}

impl Consuming {
    fn new(
        src: &RocketMqSource,
        consumer: DefaultLitePullConsumer,
        reassigned: mpsc::UnboundedReceiver<HashSet<MessageQueue>>,
    ) -> Consuming {
        let (acks_tx, acks) = mpsc::unbounded_channel();
        Consuming {
            side: src.side.clone(),
            topic: src.rocketmq.topic.as_str().into(),
            message_id: src.message_id.clone(),
            business_id: src.business_id.clone(),
            consumer,
            positions: Positions::new(&src.rocketmq.topic),
            acks_tx: Some(acks_tx),
            acks,
            reassigned,
            next_commit: Instant::now() + COMMIT_INTERVAL,
            committed: Committed::default(),
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
        out: &mpsc::Sender<Message>,
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
            self.reassign(&assigned);
        }
        if Instant::now() >= self.next_commit {
            self.commit().await;
        }
    }

    /// Hands a polled batch over in order, waiting for room (committing meanwhile) for as much of
    /// it at once as the channel holds. While the pipeline is behind and the channel full, this
    /// thread then wakes once per batch the pipeline has made room for, not once per copy it takes
    /// (and acknowledgements wait in their channel for the next commit instead of waking it).
    async fn hand_over(
        &mut self,
        copies: Vec<(Message, Arc<str>, i32, i64)>,
        out: &mpsc::Sender<Message>,
        cancel: &CancellationToken,
    ) -> Result<(), Stop> {
        let mut copies = copies.into_iter();
        while copies.len() > 0 {
            let reserve = out.reserve_many(copies.len().min(out.max_capacity()));
            tokio::pin!(reserve);
            let permits = loop {
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return Err(Stop::Cancelled),
                    permits = &mut reserve => break permits.map_err(|_| Stop::PipelineGone)?,
                    _ = tokio::time::sleep_until(self.next_commit) => self.commit().await,
                }
            };
            for (permit, (msg, key, queue, offset)) in permits.zip(copies.by_ref()) {
                // Tracked before it can be acknowledged; an undelivered copy is never tracked,
                // so no commit can pass it.
                self.positions.delivered(&key, queue, offset);
                permit.send(msg);
            }
        }
        Ok(())
    }

    /// Turns one polled message into a pipeline [`Message`]; a message whose ids cannot be read
    /// still goes, as bad input, so that it is dead-lettered and its offset can move on.
    fn pipeline_message(&mut self, ext: &MessageExt) -> (Message, Arc<str>) {
        let inner = ext.message_inner();
        let body = inner.body_slice();
        let identity = read_identity(
            &self.message_id,
            &self.business_id,
            |name| inner.property(name).map(str::as_bytes),
            body,
        );
        let key = self.positions.key(ext.broker_name());
        let acks_tx = self
            .acks_tx
            .clone()
            .expect("the ack sender lives until the loop has stopped");
        let msg = Message {
            identity,
            payload: body.to_vec(),
            origin: Origin {
                side: self.side.clone(),
                topic: self.topic.clone(),
                partition: ext.queue_id(),
                offset: ext.queue_offset(),
                born_ms: ext.born_timestamp(),
            },
            received: std::time::Instant::now(),
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
    fn reassign(&mut self, assigned: &HashSet<MessageQueue>) {
        // The listener logged the rebalance; this is the books' side of it.
        for mq in self.positions.reassign(assigned) {
            tracing::debug!(side = %self.side, queue = %mq, "rocketmq queue moved away: its offsets are forgotten");
        }
        self.committed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|mq, _| assigned.contains(mq));
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
            self.consumer.commit_with_map(offsets, true).await;
        }
    }

    /// At shutdown: sends the last committed offset of every queue still assigned once more, as a
    /// request the broker answers. A commit goes out as a oneway request (gap 4 in
    /// docs/rocketmq.md), and the client marks the offset persisted once it is written to the
    /// connection, so the consumer's shutdown right after it could close the connection with the
    /// last commit unsent, and nothing would send that offset again: the next consumer of the
    /// group would start that queue from an older offset. Bounded by [`CONFIRM_GRACE`]; a failure
    /// is logged and leaves a redelivery, never a skip.
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
        let side = &self.side;
        let confirm = async {
            for (mq, offset) in offsets.iter().filter(|(mq, _)| assigned.contains(*mq)) {
                let mut tries = 0;
                while let Err(e) = store
                    .update_consume_offset_to_broker(mq, *offset, false)
                    .await
                {
                    tries += 1;
                    if tries == 3 {
                        tracing::warn!(side = %side, queue = %mq, offset, error = %e,
                            "rocketmq shutdown: the broker did not confirm the last commit; \
                             copies below it may be delivered again");
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        if tokio::time::timeout(CONFIRM_GRACE, confirm).await.is_err() {
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
    /// committed offset of every queue. The whole map, because the client's `persist_all` drops
    /// from its in-memory offset table every queue missing from the map it is given (it skips
    /// unchanged offsets, and ignores queues no longer assigned to it).
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

/// The runtime a RocketMQ client lives in: rocketmq-client-rust wants its own tokio runtime
/// (through [`RuntimeOwner`]) and a [`ClientRuntime`] built on it, both shut down explicitly.
struct ClientHome {
    owner: RuntimeOwner,
    runtime: Arc<ClientRuntime>,
}

impl ClientHome {
    fn new(scope: &'static str) -> Result<ClientHome, String> {
        let owner = RuntimeOwner::plan(RuntimeConfig {
            thread_name: format!("rocketmq-{scope}"),
            ..RuntimeConfig::default()
        })
        .map_err(|e| format!("bad rocketmq runtime settings: {e}"))?
        .build()
        .map_err(|e| format!("cannot start the rocketmq client runtime: {e}"))?;
        // The no-op telemetry handle: the client must not install telemetry of its own, the
        // daemon's tracing subscriber already receives the client's log events.
        let runtime = ClientRuntime::try_new(
            owner.root_context().component(scope),
            ClientRuntimeConfig {
                shutdown_timeout: Duration::from_secs(10),
                ..ClientRuntimeConfig::default()
            },
            TelemetryHandle::noop(),
        )
        .map_err(|e| format!("cannot create the rocketmq client runtime: {e}"))?;
        Ok(ClientHome { owner, runtime })
    }

    /// Shuts down from inside another runtime (the writer's caller's).
    async fn shutdown(self) {
        report("client", self.runtime.shutdown().await);
        report("tasks", self.owner.shutdown_tasks().await);
        // Non-blocking, so allowed inside the caller's runtime.
        report("runtime", self.owner.shutdown_background());
    }

    /// Shuts down from a thread that is not inside any runtime (the source's own thread).
    fn shutdown_blocking(self) {
        report("client", self.owner.block_on(self.runtime.shutdown()));
        match self.owner.shutdown_runtime_blocking() {
            Ok(r) => report("runtime", r),
            Err(e) => tracing::warn!(error = %e, "rocketmq runtime shutdown failed"),
        }
    }
}

fn report(what: &str, r: ShutdownReport) {
    if !r.is_healthy() {
        tracing::warn!(report = %r.to_json(), "rocketmq {what} shut down uncleanly");
    }
}

/// Why [`RocketMqWriter`] could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    /// The producer could not start (bad settings, name server unreachable).
    #[error("rocketmq producer cannot start: {0}")]
    Start(String),
    /// The message cannot be built, e.g. a property name reserved by RocketMQ (`KEYS`, `TAGS`).
    #[error("rocketmq message is invalid: {0}")]
    Invalid(String),
    /// The broker did not store the message (or did not say so in time).
    #[error("rocketmq send failed: {0}")]
    Send(String),
}

impl WriterError {
    /// Whether sending the same message again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, WriterError::Send(_))
    }
}

/// A thin RocketMQ producer: one message at a time, sent synchronously, with user properties
/// (which carry the cross-broker message id, as the source reads it).
pub struct RocketMqWriter {
    home: ClientHome,
    producer: DefaultMQProducer,
}

impl RocketMqWriter {
    /// Starts a producer in `group` against the name server(s) `name_server` (`host:port[;…]`).
    pub async fn connect(name_server: &str, group: &str) -> Result<RocketMqWriter, WriterError> {
        let home = ClientHome::new("writer").map_err(WriterError::Start)?;
        let mut producer = DefaultMQProducer::builder(home.runtime.clone())
            .producer_group(group)
            .name_server_addr(name_server)
            .build();
        if let Err(e) = boxed(producer.start()).await {
            boxed(home.shutdown()).await;
            return Err(WriterError::Start(format!(
                "group `{group}` via name server {name_server}: {}",
                explain(&e)
            )));
        }
        Ok(RocketMqWriter { home, producer })
    }

    /// Sends one message and waits until the broker stored it. `keys` (may be empty) is the
    /// message key the broker indexes; `properties` are user properties.
    pub async fn send(
        &self,
        topic: &str,
        tag: Option<&str>,
        keys: &str,
        properties: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(), WriterError> {
        let mut builder = RmqMessage::builder().topic(topic).body_slice(body);
        if let Some(tag) = tag {
            builder = builder.tags(tag);
        }
        if !keys.is_empty() {
            builder = builder.key(keys);
        }
        for (name, value) in properties {
            builder = builder
                .raw_property(*name, *value)
                .map_err(|e| WriterError::Invalid(e.to_string()))?;
        }
        let msg = builder
            .build()
            .map_err(|e| WriterError::Invalid(e.to_string()))?;
        match boxed(self.producer.send(msg)).await {
            Ok(Some(result)) if result.send_status == SendStatus::SendOk => Ok(()),
            Ok(Some(result)) => Err(WriterError::Send(format!(
                "topic `{topic}`: broker answered {:?}",
                result.send_status
            ))),
            Ok(None) => Err(WriterError::Send(format!(
                "topic `{topic}`: no send result"
            ))),
            Err(e) => Err(WriterError::Send(format!(
                "topic `{topic}`: {}",
                explain(&e)
            ))),
        }
    }

    /// Stops the producer and its runtime.
    pub async fn shutdown(mut self) {
        boxed(self.producer.shutdown()).await;
        boxed(self.home.shutdown()).await;
    }
}

/// A client error with the broker's response code spelled out. The client keeps the code but
/// drops the broker's remark, so "Broker operation failed" alone would not say why.
fn explain(e: &ClientError) -> String {
    match e.broker_response_code() {
        Some(code) => format!("{e} (broker response code {code}: {})", response_code(code)),
        None => e.to_string(),
    }
}

/// What a RocketMQ remoting response code means (org.apache.rocketmq.remoting.protocol.ResponseCode).
fn response_code(code: i32) -> &'static str {
    match code {
        1 => "SYSTEM_ERROR",
        2 => "SYSTEM_BUSY: the broker's send queue or page cache is busy; try again",
        3 => "REQUEST_CODE_NOT_SUPPORTED",
        10 => "FLUSH_DISK_TIMEOUT",
        11 => "SLAVE_NOT_AVAILABLE",
        12 => "FLUSH_SLAVE_TIMEOUT",
        13 => "MESSAGE_ILLEGAL",
        14 => {
            "SERVICE_NOT_AVAILABLE: the broker is not writable (its store's disk is over \
             diskSpaceWarningLevelRatio, at most 90 %; or it is a slave or shutting down)"
        }
        15 => "VERSION_NOT_SUPPORTED",
        16 => "NO_PERMISSION: the broker or topic does not allow this (brokerPermission, perm)",
        17 => "TOPIC_NOT_EXIST",
        24 => "SUBSCRIPTION_PARSE_FAILED",
        25 => "SUBSCRIPTION_NOT_EXIST",
        26 => "SUBSCRIPTION_NOT_LATEST",
        27 => "SUBSCRIPTION_GROUP_NOT_EXIST",
        _ => "see ResponseCode in the RocketMQ sources",
    }
}

/// Erases the type of one of the client's futures. They nest so deeply that a caller's future
/// holding one overflows the compiler's default query depth (`recursion_limit`) when its layout
/// is computed; behind a `dyn Future` the caller's layout no longer contains them.
fn boxed<'a, T>(
    f: impl Future<Output = T> + Send + 'a,
) -> Pin<Box<dyn Future<Output = T> + Send + 'a>> {
    Box::pin(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broker_failure_names_its_response_code() {
        let e = ClientError::broker_operation_failed("SEND", 14, "service not available now");
        let text = explain(&e);
        assert!(
            text.contains("broker response code 14: SERVICE_NOT_AVAILABLE"),
            "{text}"
        );
        assert!(text.contains("diskSpaceWarningLevelRatio"), "{text}");
        let other = ClientError::not_started();
        assert_eq!(explain(&other), other.to_string());
    }

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
        // Queue 1 did not move but is in the map: the client forgets queues left out of it.
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
}
