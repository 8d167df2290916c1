//! The RocketMQ side: a cluster-mode pull consumer ([`crate::rmq::consumer`], the project's own
//! client of the broker's remoting protocol) that hands every message to the pipeline as a
//! [`Message`] and commits a queue's offset only up to the first copy whose fate is not recorded
//! yet, plus [`RocketMqWriter`], a thin producer for the traffic generator and the tests.
//!
//! The loop is poll → hand over (bounded: backpressure) → track; acknowledgements come back on an
//! unbounded channel that the same loop drains, and every [`COMMIT_INTERVAL`] (and at shutdown)
//! the committable offsets of [`OffsetTracker`] go to the broker. The client never commits on its
//! own. docs/rocketmq.md explains the commit rule, rebalances and restarts.
//!
//! Every rebalance result updates the source's [`Membership`] (joined, queues held, rebalances);
//! beside the consume loop a second future measures each held queue's lag every
//! [`Membership::lag_interval`]: the broker's max offset against the committed offset
//! (docs/rocketmq.md, "Lag").

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{IdSource, RocketMqSideConfig, SideConfig};
use crate::message::{read_identity, Ack, BadInput, Finished, Message, Origin, Side};
use crate::rmq::consumer::{Consumer, ConsumerConfig, ConsumerHandle};
use crate::rmq::producer::{Outgoing, Producer, SendError};
use crate::rmq::wire::StoredMessage;
use crate::rmq::{MessageQueue, RmqError};
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
/// How long the broker may hold a pull request open when there is nothing new; a new message
/// answers a held pull at once. A stopping source drops its held pulls, so this does not delay
/// a shutdown.
const LONG_POLL: Duration = Duration::from_millis(5_000);
/// How long a pull waits for its answer. The broker looks for expired held pulls only every
/// 5 s (`PullRequestHoldService`), so an idle pull is answered up to 5 s after it expired.
const PULL_TIMEOUT: Duration = Duration::from_millis(15_000);
/// Messages asked for per pull (brokers give at most 32 from memory, `maxTransferCountOnMessageInMemory`).
const PULL_BATCH_SIZE: i32 = 32;
/// Pulled batches held for the loop, over all queues; then the queues' pulls wait. With
/// [`PULL_BATCH_SIZE`] this bounds what a paused source holds (about 8,000 messages, plus one
/// batch per queue); the pipeline's bounded channel is the real backpressure.
const BUFFERED_BATCHES: usize = 256;

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
    fn refetcher(&self) -> Result<Arc<dyn super::Refetch>, SourceError> {
        // The remoting client of `crate::rmq` has no single-message pull; the source moves to
        // rocketmq-client-rust, whose pull consumer reads by offset.
        Err(SourceError::Start {
            side: self.side.clone(),
            reason: "reading a copy again by offset is not supported by this RocketMQ client"
                .into(),
        })
    }

    fn run(self: Box<Self>, cx: SourceContext) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            let result = self.consume(cx).await;
            tracing::info!(side = %self.side, "rocketmq consumer stopped");
            result
        })
    }
}

impl RocketMqSource {
    async fn consume(&self, cx: SourceContext) -> Result<(), SourceError> {
        let (reassigned_tx, reassigned_rx) = mpsc::unbounded_channel();
        let membership = cx.membership.clone();
        let listener = Reassigned {
            tx: reassigned_tx,
            membership: membership.clone(),
        };
        let cfg = &self.rocketmq;
        let consumer = Consumer::start(
            ConsumerConfig {
                name_server: cfg.name_server.clone(),
                group: cfg.group.clone(),
                topic: cfg.topic.clone(),
                tag_expression: cfg.tag_expression.clone(),
                pull_batch: PULL_BATCH_SIZE,
                long_poll: LONG_POLL,
                pull_timeout: PULL_TIMEOUT,
                buffered_batches: BUFFERED_BATCHES,
            },
            // The first rebalance (in `start`, after registering with the brokers) reports this
            // instance's first assignment, even if it is empty: joined.
            Box::new(move |queues| listener.apply(queues)),
        )
        .await
        .map_err(|e| SourceError::Start {
            side: self.side.clone(),
            reason: match &e {
                RmqError::Refused {
                    code: crate::rmq::code::TOPIC_NOT_EXIST,
                    ..
                } => format!(
                    "topic `{}` has no route on name server {}: {e}",
                    cfg.topic, cfg.name_server
                ),
                _ => format!(
                    "cannot start group `{}` on topic `{}` via name server {}: {e}",
                    cfg.group, cfg.topic, cfg.name_server
                ),
            },
        })?;
        tracing::info!(
            side = %self.side,
            topic = %cfg.topic,
            group = %cfg.group,
            name_server = %cfg.name_server,
            "rocketmq consumer started"
        );
        let lag_stop = CancellationToken::new();
        let committed = Committed::default();
        let lag = FollowLag {
            consumer: consumer.handle(),
            membership: membership.clone(),
            committed: committed.clone(),
            stop: lag_stop.clone(),
        };
        let mut run = Consuming::new(self, consumer, reassigned_rx, committed);
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
}

/// Receives the client's rebalance results (the queues now assigned to this instance).
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

/// The `queue` label of a queue in the lag metric: `broker/topic/queueId`.
fn queue_label(mq: &MessageQueue) -> String {
    mq.to_string()
}

/// The offsets the source committed last, per queue, shared with the lag measurement.
type Committed = Arc<Mutex<HashMap<MessageQueue, i64>>>;

/// Measures the lag of every assigned queue every [`Membership::lag_interval`] until `stop`.
/// A failed request leaves that queue's last value; the next measurement replaces it.
struct FollowLag {
    consumer: ConsumerHandle,
    membership: Membership,
    committed: Committed,
    stop: CancellationToken,
}

impl FollowLag {
    async fn run(self) {
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
                _ = self.measure() => {}
            }
        }
    }

    /// One measurement: for each assigned queue, the broker's max offset (the next offset it
    /// will write: one request per queue) minus the committed offset (local, see below).
    async fn measure(&self) {
        for mq in self.consumer.assignment() {
            let end = match self.consumer.max_offset(&mq).await {
                Ok(end) => end,
                Err(e) => {
                    tracing::debug!(side = %self.membership.side(), queue = %mq, error = %e, "cannot read the rocketmq max offset now");
                    continue;
                }
            };
            let ours = self
                .committed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&mq)
                .copied();
            // What this source committed last (the copies below it are finished), else the
            // group's committed offset when the queue was taken (-1: never committed).
            let Some(from) = ours.or_else(|| self.consumer.assigned_from(&mq)) else {
                continue; // being read; next time
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
            self.membership.record_lag(&queue_label(&mq), end - from);
        }
    }
}

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
    consumer: Consumer,
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
        consumer: Consumer,
        reassigned: mpsc::UnboundedReceiver<HashSet<MessageQueue>>,
        committed: Committed,
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
            committed,
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
        // No more pulls or rebalances; the queues held stay held for the last commit.
        self.consumer.stop_fetching().await;
        self.drain_in_flight().await;
        self.commit();
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
            let polled = self.consumer.poll(POLL_TIMEOUT).await;
            // Each copy's hand-off time is taken here, before any wait for room in the channel.
            let mut copies = Vec::with_capacity(polled.iter().map(|p| p.messages.len()).sum());
            for p in polled {
                for m in p.messages {
                    let (queue, offset) = (m.queue_id, m.queue_offset);
                    let (msg, key) = self.pipeline_message(&p.queue.broker, m);
                    copies.push((msg, key, queue, offset));
                }
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
            self.commit();
        }
    }

    /// Hands a polled batch over in order, waiting for room (committing meanwhile) for as much of
    /// it at once as the channel holds. While the pipeline is behind and the channel full, this
    /// task then wakes once per batch the pipeline has made room for, not once per copy it takes
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
                    _ = tokio::time::sleep_until(self.next_commit) => self.commit(),
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
    fn pipeline_message(&mut self, broker: &str, mut m: StoredMessage) -> (Message, Arc<str>) {
        let (identity, body) = match std::mem::replace(&mut m.body, Ok(Vec::new())) {
            Ok(body) => (
                read_identity(
                    &self.message_id,
                    &self.business_id,
                    |name| m.property(name).map(str::as_bytes),
                    &body,
                ),
                body,
            ),
            // A body this client cannot uncompress is never forwarded: dead-lettered, with why.
            Err(why) => (Err(BadInput(why)), Vec::new()),
        };
        let key = self.positions.key(broker);
        let acks_tx = self
            .acks_tx
            .clone()
            .expect("the ack sender lives until the loop has stopped");
        let msg = Message {
            identity,
            payload: body,
            origin: Origin {
                side: self.side.clone(),
                topic: self.topic.clone(),
                partition: m.queue_id,
                broker: None,
                offset: m.queue_offset,
                born_ms: m.born_timestamp,
            },
            received: std::time::Instant::now(),
            ack: Ack::new(
                acks_tx,
                Finished {
                    topic: key.clone(),
                    partition: m.queue_id,
                    offset: m.queue_offset,
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
    fn commit(&mut self) {
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
            self.consumer.commit(offsets);
        }
    }

    /// At shutdown, once the background commits have stopped: sends the last committed offset
    /// of every queue still held and waits for the broker's answers, so that the next consumer
    /// of the group starts where this one finished. Bounded by [`CONFIRM_GRACE`]; a failure is
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
        match tokio::time::timeout(CONFIRM_GRACE, self.consumer.flush(&offsets)).await {
            Ok(failed) => {
                for (mq, e) in failed {
                    tracing::warn!(side = %self.side, queue = %mq, offset = offsets[&mq], error = %e,
                        "rocketmq shutdown: the broker did not confirm the last commit; \
                         copies below it may be delivered again");
                }
            }
            Err(_) => {
                tracing::warn!(side = %self.side, "rocketmq shutdown: confirming the last commits took \
                longer than {CONFIRM_GRACE:?}; copies below them may be delivered again")
            }
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
        Some(MessageQueue::new(&self.topic, broker, queue_id))
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
    /// committed offset of every queue (the client sends only the ones that changed, and only
    /// for queues it still holds; the lag measurement reads the whole map).
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
    producer: Producer,
}

impl RocketMqWriter {
    /// Starts a producer in `group` against the name server(s) `name_server` (`host:port[;…]`).
    pub async fn connect(name_server: &str, group: &str) -> Result<RocketMqWriter, WriterError> {
        let producer = Producer::start(name_server, group).await.map_err(|e| {
            WriterError::Start(format!(
                "group `{group}` via name server {name_server}: {e}"
            ))
        })?;
        Ok(RocketMqWriter { producer })
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
        let m = Outgoing {
            topic,
            tag,
            keys,
            properties,
            body,
        };
        match self.producer.send(&m).await {
            Ok(_) => Ok(()),
            Err(SendError::Invalid(e)) => Err(WriterError::Invalid(e)),
            Err(SendError::Failed(e)) => Err(WriterError::Send(format!("topic `{topic}`: {e}"))),
        }
    }

    /// Stops the producer.
    pub async fn shutdown(self) {
        self.producer.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broker_failure_names_its_response_code() {
        let e = RmqError::Refused {
            what: "send",
            code: 14,
            remark: "service not available now".into(),
        };
        let text = e.to_string();
        assert!(
            text.contains("response code 14 (SERVICE_NOT_AVAILABLE"),
            "{text}"
        );
        assert!(text.contains("diskSpaceWarningLevelRatio"), "{text}");
        assert!(text.ends_with(": service not available now"), "{text}");
    }

    fn mq(broker: &str, queue_id: i32) -> MessageQueue {
        MessageQueue::new("t", broker, queue_id)
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
