//! Reading one RocketMQ copy again by position (broker, topic, queue id, offset), for adoption:
//! a lite pull consumer of its own, in *assign* mode, that is pointed at the one queue, sought
//! to the offset, and polled for that one message.
//!
//! Its consumer group is the side's group with `-refetch` appended. A member of the side's own
//! group, even one that only pulls, would count in the group's rebalance and take queues that
//! nobody then reads. (rocketmq-client-rust's classic `DefaultMQPullConsumer` would need no
//! assignment, but cannot use TLS: its builder builds the lite consumer beneath it with TLS
//! always off.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rocketmq_client_rust::DefaultLitePullConsumer;
use rocketmq_model::common::consumer::consume_from_where::ConsumeFromWhere;
use rocketmq_model::common::message::message_queue::MessageQueue;
use rocketmq_protocol::protocol::heartbeat::message_model::MessageModel;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::client::{self, explain, ClientHome};
use crate::message::Side;
use crate::source::config::{IdSource, RocketMqSideConfig};
use crate::source::{Position, Refetch, Refetched, SourceError};

/// How long one refetch may take once the broker said it has the offset.
const REFETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The refetch consumer of a RocketMQ side; started at the first refetch, kept for the next.
pub(super) struct RocketMqRefetch {
    side: Side,
    cfg: RocketMqSideConfig,
    message_id: IdSource,
    business_id: IdSource,
    /// The source's `pipeline.max_message_bytes` once it runs (shared), the default before.
    max_message_bytes: Arc<AtomicUsize>,
    /// One refetch at a time: they are rare (an id whose owner never observed it).
    reader: Mutex<Option<Reader>>,
}

struct Reader {
    consumer: DefaultLitePullConsumer,
    home: ClientHome,
    /// Every queue read so far, all kept assigned: taking a queue out of the assignment waits
    /// for its pull task to end, which a pull the broker holds at the queue's end delays by up
    /// to 5 s; a seek (the next read of a queue) aborts the task at once.
    assigned: Vec<MessageQueue>,
}

impl RocketMqRefetch {
    pub(super) fn new(
        side: Side,
        cfg: RocketMqSideConfig,
        message_id: IdSource,
        business_id: IdSource,
        max_message_bytes: Arc<AtomicUsize>,
    ) -> RocketMqRefetch {
        RocketMqRefetch {
            side,
            cfg,
            message_id,
            business_id,
            max_message_bytes,
            reader: Mutex::new(None),
        }
    }

    fn failed(&self, reason: String) -> SourceError {
        SourceError::Failed {
            side: self.side.clone(),
            reason,
        }
    }

    async fn start(&self) -> Result<Reader, SourceError> {
        let cfg = &self.cfg;
        let home = ClientHome::new("refetch", 1).map_err(|e| self.failed(e))?;
        let mut builder = DefaultLitePullConsumer::builder(home.runtime.clone())
            .client_options(client::client_config(cfg).into())
            .consumer_group(format!("{}-refetch", cfg.group))
            .name_server_addr(cfg.name_server.as_str())
            .use_tls(cfg.tls)
            .message_model(MessageModel::Clustering)
            .consume_from_where(ConsumeFromWhere::ConsumeFromLastOffset)
            .auto_commit(false)
            // One message is what is wanted; the queue's pulls then wait.
            .pull_batch_size(1)
            .pull_threshold_for_queue(1)
            .broker_suspend_max_time_millis(1_000)
            .consumer_timeout_millis_when_suspend(8_000)
            .poll_timeout_millis(100);
        if let Some(ns) = &cfg.namespace {
            builder = builder.namespace(ns.as_str());
        }
        if let Some(hook) = client::acl_hook(cfg) {
            builder = builder.rpc_hook(hook);
        }
        let consumer = builder
            .build()
            .map_err(|e| self.failed(format!("bad refetch consumer settings: {}", explain(&e))))?;
        if let Err(e) = client::boxed(consumer.start()).await {
            home.shutdown().await;
            return Err(self.failed(format!(
                "cannot start the refetch consumer via name server {} ({}): {}",
                cfg.name_server,
                client::describe(cfg),
                explain(&e)
            )));
        }
        Ok(Reader {
            consumer,
            home,
            assigned: Vec::new(),
        })
    }

    async fn read(
        &self,
        reader: &mut Reader,
        at: &Position,
        broker: &str,
    ) -> Result<Option<Refetched>, SourceError> {
        let c = reader.consumer.clone();
        let mq = MessageQueue::from_parts(&*at.topic, broker, at.partition);
        let here = || {
            format!(
                "refetch {broker}/{}/{}@{}",
                at.topic, at.partition, at.offset
            )
        };
        // The topic's route (also how the client learns the broker's address). A queue missing
        // from it is not "gone": its broker may only be away for now.
        let queues = c
            .fetch_message_queues(&at.topic)
            .await
            .map_err(|e| self.failed(format!("{}: {}", here(), explain(&e))))?;
        if !queues.contains(&mq) {
            return Err(self.failed(format!(
                "{}: the topic's route has no such queue (is broker `{broker}` registered?)",
                here()
            )));
        }
        // Gone (retention) or never written: the broker says so by its bounds, at once.
        let min = c
            .min_offset(&mq)
            .await
            .map_err(|e| self.failed(format!("{}: {}", here(), explain(&e))))?;
        let max = c
            .max_offset(&mq)
            .await
            .map_err(|e| self.failed(format!("{}: {}", here(), explain(&e))))?;
        if at.offset < min || at.offset >= max {
            return Ok(None);
        }
        if !reader.assigned.contains(&mq) {
            reader.assigned.push(mq.clone());
            c.assign(reader.assigned.clone())
                .await
                .map_err(|e| self.failed(format!("{}: {}", here(), explain(&e))))?;
        }
        c.seek(&mq, at.offset)
            .await
            .map_err(|e| self.failed(format!("{}: {}", here(), explain(&e))))?;
        let deadline = Instant::now() + REFETCH_TIMEOUT;
        while Instant::now() < deadline {
            for ext in c.poll_with_timeout(100).await {
                if ext.queue_id() != at.partition
                    || ext.broker_name() != broker
                    || ext.queue_offset() < at.offset
                {
                    continue; // left over from an earlier refetch
                }
                if ext.queue_offset() > at.offset {
                    // Past it: the broker skipped the offset (it no longer has it).
                    return Ok(None);
                }
                let (identity, payload) = super::refetched(
                    &ext,
                    &self.message_id,
                    &self.business_id,
                    self.max_message_bytes.load(Ordering::Relaxed),
                );
                return Ok(Some(Refetched {
                    identity,
                    payload,
                    born_ms: ext.born_timestamp(),
                }));
            }
        }
        Err(self.failed(format!(
            "{}: the broker did not hand the message over within {REFETCH_TIMEOUT:?}",
            here()
        )))
    }
}

#[async_trait::async_trait]
impl Refetch for RocketMqRefetch {
    async fn refetch(&self, at: &Position) -> Result<Option<Refetched>, SourceError> {
        let Some(broker) = at.broker.as_deref() else {
            return Err(self.failed(format!(
                "refetch {}/{}@{}: a RocketMQ position needs its broker",
                at.topic, at.partition, at.offset
            )));
        };
        let mut reader = self.reader.lock().await;
        if reader.is_none() {
            *reader = Some(client::boxed(self.start()).await?);
        }
        let found =
            client::boxed(self.read(reader.as_mut().expect("started above"), at, broker)).await;
        if found.is_err() {
            // Started afresh next time: a broken connection or a stuck assignment goes with it.
            if let Some(r) = reader.take() {
                r.consumer.shutdown().await;
                r.home.shutdown().await;
            }
        }
        found
    }

    /// One position after the other: a RocketMQ read is 4–20 ms once the reader runs
    /// (docs/rocketmq.md, "Refetch"), and adoptions come a chunk at a time.
    async fn refetch_many(&self, at: &[Position]) -> Vec<Result<Option<Refetched>, SourceError>> {
        let mut out = Vec::with_capacity(at.len());
        for p in at {
            out.push(self.refetch(p).await);
        }
        out
    }
}
