//! A cluster-mode pull consumer, as the Java `DefaultLitePullConsumer` with auto-commit off:
//!
//! - it registers with every broker of the topic (`HEART_BEAT`), and every [`REBALANCE_INTERVAL`]
//!   or as soon as a broker says the group changed (`NOTIFY_CONSUMER_IDS_CHANGED`) it reads the
//!   route and the group's members and takes its share of the queues
//!   ([`super::wire::allocate`], the same split as `AllocateMessageQueueAveragely`);
//! - each held queue has a task that starts at the group's committed offset (the oldest stored
//!   message if there is none), and long-polls the broker, handing batches to one bounded channel
//!   that [`Consumer::poll`] reads: a consumer that stops polling stops pulling once it is full;
//! - [`Consumer::commit`] hands the offsets to a task that sends the changed ones
//!   (`UPDATE_CONSUMER_OFFSET`, answered by the broker), and [`Consumer::flush`] sends them and
//!   waits for the answers (at shutdown);
//! - a queue that leaves is dropped at once: its task stops, and batches of it still in the
//!   channel are discarded by `poll` (the next owner starts from the last commit).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::remoting::Command;
use super::wire::{allocate, decode_messages, MessageQueue, Route, StoredMessage, TagFilter};
use super::{code, BrokerRequests, Client, RmqError};

/// How often the route is read, the consumer registered and the queues shared out again
/// (the Java client's rebalance interval).
pub const REBALANCE_INTERVAL: Duration = Duration::from_secs(20);
/// How long a queue's task waits after a failed request before it tries again.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// `assigned_from` before the committed offset is read.
const NOT_LOADED: i64 = i64::MIN;
/// Pull request flags: the broker may hold the request; the subscription travels with it.
const PULL_SUSPEND: i32 = 0x2;
const PULL_SUBSCRIPTION: i32 = 0x4;
/// Most messages one `poll` returns.
const POLL_MAX: usize = 1024;

/// What the consumer is and how it pulls.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub name_server: String,
    pub group: String,
    pub topic: String,
    pub tag_expression: String,
    /// Messages asked for per pull.
    pub pull_batch: i32,
    /// How long the broker may hold a pull when there is nothing new.
    pub long_poll: Duration,
    /// How long a pull may wait for its answer (more than `long_poll`: brokers answer an
    /// expired held pull up to 5 s late).
    pub pull_timeout: Duration,
    /// Pulled batches held for `poll` at most (then the queues' tasks wait).
    pub buffered_batches: usize,
}

/// Messages of one queue, in offset order.
#[derive(Debug)]
pub struct Polled {
    pub queue: MessageQueue,
    pub messages: Vec<StoredMessage>,
}

/// Told the queues this instance holds after every rebalance that changed them (and the first).
pub type OnAssigned = Box<dyn Fn(&HashSet<MessageQueue>) + Send + Sync>;

struct Batch {
    queue: MessageQueue,
    token: CancellationToken,
    messages: Vec<StoredMessage>,
}

struct Held {
    token: CancellationToken,
    /// The group's committed offset when the queue was taken (-1: none), or [`NOT_LOADED`].
    from: Arc<AtomicI64>,
}

#[derive(Default)]
struct State {
    route: Route,
    held: HashMap<MessageQueue, Held>,
}

struct Shared {
    client: Arc<Client>,
    cfg: ConsumerConfig,
    filter: TagFilter,
    sub_version: i64,
    /// Stops the queues' tasks, the rebalancing and the committer.
    stop: CancellationToken,
    state: Mutex<State>,
    batches: mpsc::Sender<Batch>,
    on_assigned: OnAssigned,
}

/// The consumer; [`ConsumerHandle`]s share it.
pub struct Consumer {
    shared: Arc<Shared>,
    batches: mpsc::Receiver<Batch>,
    commits: watch::Sender<HashMap<MessageQueue, i64>>,
    committer: Option<JoinHandle<()>>,
    rebalancer: Option<JoinHandle<()>>,
}

/// A view of the consumer for the lag measurement.
#[derive(Clone)]
pub struct ConsumerHandle(Arc<Shared>);

impl Consumer {
    /// Registers with the topic's brokers and takes this instance's first share of its queues
    /// (reported to `on_assigned`, even if empty). Fails if the topic has no route, no readable
    /// queue, or a broker does not answer.
    pub async fn start(cfg: ConsumerConfig, on_assigned: OnAssigned) -> Result<Consumer, RmqError> {
        let (client, requests) = Client::new(&cfg.name_server)?;
        let route = client.route(&cfg.topic).await?;
        if route.read.is_empty() {
            return Err(RmqError::Invalid(format!(
                "topic `{}` has no readable queue",
                cfg.topic
            )));
        }
        let (batches_tx, batches) = mpsc::channel(cfg.buffered_batches.max(1));
        let shared = Arc::new(Shared {
            client,
            filter: TagFilter::parse(&cfg.tag_expression),
            sub_version: now_ms(),
            cfg,
            stop: CancellationToken::new(),
            state: Mutex::new(State {
                route,
                held: HashMap::new(),
            }),
            batches: batches_tx,
            on_assigned,
        });
        let started = async {
            shared.heartbeat().await?;
            shared.rebalance(true).await
        };
        if let Err(e) = started.await {
            shared.client.remoting.close().await;
            return Err(e);
        }
        let (commits, commits_rx) = watch::channel(HashMap::new());
        let committer = tokio::spawn(shared.clone().committer(commits_rx));
        let rebalancer = tokio::spawn(shared.clone().rebalancer(requests));
        Ok(Consumer {
            shared,
            batches,
            commits,
            committer: Some(committer),
            rebalancer: Some(rebalancer),
        })
    }

    pub fn handle(&self) -> ConsumerHandle {
        ConsumerHandle(self.shared.clone())
    }

    /// Waits up to `timeout` for pulled messages, then takes what else is ready (up to about
    /// [`POLL_MAX`]). Messages of queues this instance no longer holds are left out.
    pub async fn poll(&mut self, timeout: Duration) -> Vec<Polled> {
        let mut out = Vec::new();
        let first = tokio::select! {
            b = self.batches.recv() => b,
            _ = tokio::time::sleep(timeout) => None,
        };
        let Some(first) = first else { return out };
        let mut count = 0;
        let mut next = Some(first);
        while let Some(b) = next {
            if !b.token.is_cancelled() {
                count += b.messages.len();
                out.push(Polled {
                    queue: b.queue,
                    messages: b.messages,
                });
            }
            next = if count < POLL_MAX {
                self.batches.try_recv().ok()
            } else {
                None
            };
        }
        out
    }

    /// The queues held now.
    pub fn assignment(&self) -> HashSet<MessageQueue> {
        self.handle().assignment()
    }

    /// Commits `offsets` (the next offset to consume, per queue) in the background: the ones
    /// that changed since they were last sent, for queues still held.
    pub fn commit(&self, offsets: HashMap<MessageQueue, i64>) {
        self.commits.send_replace(offsets);
    }

    /// Stops pulling, rebalancing and background commits (waiting for a commit on its way).
    /// The held queues stay as they were, for [`Consumer::flush`].
    pub async fn stop_fetching(&mut self) {
        self.shared.stop.cancel();
        for task in [self.committer.take(), self.rebalancer.take()]
            .into_iter()
            .flatten()
        {
            let _ = task.await;
        }
    }

    /// Sends every offset of `offsets` for a queue still held and waits for the broker's
    /// answers, each tried up to 3 times. Returns the ones that failed.
    pub async fn flush(
        &self,
        offsets: &HashMap<MessageQueue, i64>,
    ) -> Vec<(MessageQueue, RmqError)> {
        let held = self.assignment();
        let mut failed = Vec::new();
        for (q, offset) in offsets.iter().filter(|(q, _)| held.contains(*q)) {
            let mut tries = 0;
            loop {
                match self.shared.update_offset(q, *offset).await {
                    Ok(()) => break,
                    Err(e) => {
                        tries += 1;
                        if tries == 3 {
                            failed.push((q.clone(), e));
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
        failed
    }

    /// Leaves the group (the others take its queues at once) and closes the connections.
    pub async fn shutdown(mut self) {
        self.stop_fetching().await;
        for addr in self.shared.masters() {
            let req = Command::request(code::UNREGISTER_CLIENT)
                .field("clientID", &self.shared.client.id)
                .field("consumerGroup", &self.shared.cfg.group);
            if let Err(e) = self.shared.client.call("unregister", &addr, req).await {
                tracing::debug!(broker = %addr, error = %e, "rocketmq: unregister failed; the broker drops this consumer within 2 minutes");
            }
        }
        self.shared.client.remoting.close().await;
    }
}

impl ConsumerHandle {
    pub fn assignment(&self) -> HashSet<MessageQueue> {
        self.0.held()
    }

    /// The group's committed offset of `queue` when this instance took it (-1: none); `None`
    /// while it is being read, or if the queue is not held.
    pub fn assigned_from(&self, queue: &MessageQueue) -> Option<i64> {
        let st = self.0.state();
        let from = st.held.get(queue)?.from.load(Ordering::Relaxed);
        (from != NOT_LOADED).then_some(from)
    }

    /// The offset the broker will give the next message of `queue`.
    pub async fn max_offset(&self, queue: &MessageQueue) -> Result<i64, RmqError> {
        self.0.queue_offset(code::GET_MAX_OFFSET, queue).await
    }

    /// The offset of the oldest message of `queue` still stored.
    pub async fn min_offset(&self, queue: &MessageQueue) -> Result<i64, RmqError> {
        self.0.queue_offset(code::GET_MIN_OFFSET, queue).await
    }
}

/// What one pull brought.
enum Pulled {
    Found {
        next: i64,
        messages: Vec<StoredMessage>,
    },
    Nothing {
        next: i64,
    },
    Moved {
        next: i64,
    },
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The queues held now.
    fn held(&self) -> HashSet<MessageQueue> {
        self.state().held.keys().cloned().collect()
    }

    /// The addresses of the topic's brokers (their masters).
    fn masters(&self) -> Vec<String> {
        self.state().route.masters.values().cloned().collect()
    }

    fn master(&self, broker: &str) -> Result<String, RmqError> {
        self.state()
            .route
            .masters
            .get(broker)
            .cloned()
            .ok_or_else(|| {
                RmqError::Invalid(format!("broker `{broker}` has no master in the route"))
            })
    }

    async fn heartbeat(&self) -> Result<(), RmqError> {
        let body = json!({
            "clientID": self.client.id,
            "producerDataSet": [],
            "consumerDataSet": [{
                "groupName": self.cfg.group,
                "consumeType": "CONSUME_ACTIVELY",
                "messageModel": "CLUSTERING",
                "consumeFromWhere": "CONSUME_FROM_FIRST_OFFSET",
                "unitMode": false,
                "subscriptionDataSet": [{
                    "classFilterMode": false,
                    "topic": self.cfg.topic,
                    "subString": self.filter.expression,
                    "tagsSet": self.filter.tags.clone().unwrap_or_default(),
                    "codeSet": self.filter.codes(),
                    "subVersion": self.sub_version,
                    "expressionType": "TAG",
                }],
            }],
        });
        let body = serde_json::to_vec(&body).expect("json");
        for addr in self.masters() {
            let req = Command::request(code::HEART_BEAT).with_body(body.clone());
            self.client.call("heartbeat", &addr, req).await?;
        }
        Ok(())
    }

    /// Takes this instance's share of the queues: starts the tasks of queues gained, stops the
    /// ones of queues lost.
    async fn rebalance(self: &Arc<Self>, first: bool) -> Result<(), RmqError> {
        let (queues, addr) = {
            let st = self.state();
            let mut brokers: Vec<&String> = st.route.masters.keys().collect();
            brokers.sort();
            let addr = brokers
                .first()
                .map(|b| st.route.masters[*b].clone())
                .ok_or_else(|| {
                    RmqError::Invalid(format!("topic `{}` has no broker", self.cfg.topic))
                })?;
            (st.route.read.clone(), addr)
        };
        let req = Command::request(code::GET_CONSUMER_LIST_BY_GROUP)
            .field("consumerGroup", &self.cfg.group);
        let answer = self.client.call("consumer list", &addr, req).await?;
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Ids {
            consumer_id_list: Vec<String>,
        }
        let mut ids = serde_json::from_slice::<Ids>(&answer.body)
            .map_err(|e| RmqError::Invalid(format!("unreadable consumer list: {e}")))?
            .consumer_id_list;
        ids.sort();
        let mine: HashSet<MessageQueue> = allocate(&queues, &ids, &self.client.id)
            .iter()
            .cloned()
            .collect();
        let changed = {
            let mut st = self.state();
            let before = st.held.len();
            st.held.retain(|q, h| {
                let keep = mine.contains(q);
                if !keep {
                    h.token.cancel();
                }
                keep
            });
            let mut changed = st.held.len() != before;
            for q in &mine {
                if st.held.contains_key(q) || self.stop.is_cancelled() {
                    continue;
                }
                changed = true;
                let token = self.stop.child_token();
                let from = Arc::new(AtomicI64::new(NOT_LOADED));
                st.held.insert(
                    q.clone(),
                    Held {
                        token: token.clone(),
                        from: from.clone(),
                    },
                );
                tokio::spawn(self.clone().pull_queue(q.clone(), token, from));
            }
            changed
        };
        if changed || first {
            (self.on_assigned)(&mine);
        }
        Ok(())
    }

    /// Every [`REBALANCE_INTERVAL`], and when a broker says the group changed: route, heartbeat,
    /// rebalance. A failure keeps what is held and is tried again next time.
    async fn rebalancer(self: Arc<Self>, mut requests: BrokerRequests) {
        let mut tick = tokio::time::interval(REBALANCE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is now: start() just did all this
        loop {
            let full = tokio::select! {
                _ = self.stop.cancelled() => return,
                r = requests.recv() => match r {
                    Some((_, cmd)) if cmd.code == code::NOTIFY_CONSUMER_IDS_CHANGED => false,
                    Some(_) => continue,
                    None => return,
                },
                _ = tick.tick() => true,
            };
            let round = async {
                if full {
                    match self.client.route(&self.cfg.topic).await {
                        Ok(route) if !route.read.is_empty() => {
                            self.state().route = route;
                        }
                        Ok(_) => {
                            tracing::warn!(topic = %self.cfg.topic, "rocketmq: the topic's route has no readable queue now; keeping the last one")
                        }
                        Err(e) => {
                            tracing::warn!(topic = %self.cfg.topic, error = %e, "rocketmq: cannot read the topic's route; keeping the last one")
                        }
                    }
                    self.heartbeat().await?;
                }
                self.rebalance(false).await
            };
            let result = tokio::select! {
                _ = self.stop.cancelled() => return,
                r = round => r,
            };
            if let Err(e) = result {
                tracing::warn!(group = %self.cfg.group, error = %e, "rocketmq rebalance failed; the queues held stay as they are until the next one");
            }
        }
    }

    /// Sends the offsets handed to [`Consumer::commit`] that changed, as they change; a failed
    /// one is sent again a second later.
    async fn committer(self: Arc<Self>, mut want: watch::Receiver<HashMap<MessageQueue, i64>>) {
        let mut sent: HashMap<MessageQueue, i64> = HashMap::new();
        let mut failing = false;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                r = want.changed() => if r.is_err() { return },
            }
            let offsets = want.borrow_and_update().clone();
            sent.retain(|q, _| offsets.contains_key(q));
            let held = self.held();
            let mut failed = None;
            for (q, offset) in offsets.iter().filter(|(q, _)| held.contains(*q)) {
                if sent.get(q) == Some(offset) {
                    continue;
                }
                // Not dropped on `stop`: `stop_fetching` waits for it (at most one request
                // timeout), so that no older offset reaches the broker after the last flush.
                match self.update_offset(q, *offset).await {
                    Ok(()) => {
                        sent.insert(q.clone(), *offset);
                    }
                    Err(e) => failed = Some((q.clone(), e)),
                }
            }
            match failed {
                Some((q, e)) => {
                    if !failing {
                        tracing::warn!(queue = %q, error = %e, "rocketmq commit failed; trying again every second");
                    }
                    failing = true;
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = tokio::time::sleep(RETRY_PAUSE) => want.mark_changed(),
                    }
                }
                None => {
                    if failing {
                        tracing::info!(group = %self.cfg.group, "rocketmq commits go through again");
                    }
                    failing = false;
                }
            }
        }
    }

    async fn update_offset(&self, q: &MessageQueue, offset: i64) -> Result<(), RmqError> {
        let addr = self.master(&q.broker)?;
        let req = Command::request(code::UPDATE_CONSUMER_OFFSET)
            .field("consumerGroup", &self.cfg.group)
            .field("topic", &q.topic)
            .field("queueId", q.queue_id)
            .field("commitOffset", offset);
        self.client.call("commit", &addr, req).await.map(|_| ())
    }

    async fn queue_offset(&self, request: i32, q: &MessageQueue) -> Result<i64, RmqError> {
        let addr = self.master(&q.broker)?;
        let req = Command::request(request)
            .field("topic", &q.topic)
            .field("queueId", q.queue_id);
        let answer = self.client.call("queue offset", &addr, req).await?;
        Ok(answer.number("offset")?)
    }

    /// The group's committed offset of `q` (-1: none) and where to start: there, or at the
    /// oldest stored message.
    async fn start_offset(&self, q: &MessageQueue) -> Result<(i64, i64), RmqError> {
        let addr = self.master(&q.broker)?;
        let req = Command::request(code::QUERY_CONSUMER_OFFSET)
            .field("consumerGroup", &self.cfg.group)
            .field("topic", &q.topic)
            .field("queueId", q.queue_id)
            .field("setZeroIfNotFound", false);
        let answer = self
            .client
            .remoting
            .invoke(&addr, req, super::REQUEST_TIMEOUT)
            .await?;
        match answer.code {
            code::SUCCESS => {
                let committed = answer.number("offset")?;
                Ok((committed, committed))
            }
            // Never committed: from the oldest message still stored (DESIGN.md invariant 2).
            code::QUERY_NOT_FOUND => Ok((-1, self.queue_offset(code::GET_MIN_OFFSET, q).await?)),
            _ => Err(RmqError::Refused {
                what: "committed offset",
                code: answer.code,
                remark: answer.remark().to_owned(),
            }),
        }
    }

    async fn pull(&self, q: &MessageQueue, offset: i64) -> Result<Pulled, RmqError> {
        let addr = self.master(&q.broker)?;
        let req = Command::request(code::PULL_MESSAGE)
            .field("consumerGroup", &self.cfg.group)
            .field("topic", &q.topic)
            .field("queueId", q.queue_id)
            .field("queueOffset", offset)
            .field("maxMsgNums", self.cfg.pull_batch)
            .field("sysFlag", PULL_SUSPEND | PULL_SUBSCRIPTION)
            .field("commitOffset", 0)
            .field("suspendTimeoutMillis", self.cfg.long_poll.as_millis())
            .field("subscription", &self.filter.expression)
            .field("subVersion", self.sub_version)
            .field("expressionType", "TAG");
        let answer = self
            .client
            .remoting
            .invoke(&addr, req, self.cfg.pull_timeout)
            .await?;
        match answer.code {
            code::SUCCESS => {
                let next = answer.number("nextBeginOffset")?;
                let mut messages = decode_messages(&answer.body).map_err(RmqError::Invalid)?;
                messages.retain(|m| self.filter.accepts(m.property("TAGS")));
                Ok(Pulled::Found { next, messages })
            }
            code::PULL_NOT_FOUND | code::PULL_RETRY_IMMEDIATELY => Ok(Pulled::Nothing {
                next: answer.number("nextBeginOffset")?,
            }),
            code::PULL_OFFSET_MOVED => Ok(Pulled::Moved {
                next: answer.number("nextBeginOffset")?,
            }),
            _ => Err(RmqError::Refused {
                what: "pull",
                code: answer.code,
                remark: answer.remark().to_owned(),
            }),
        }
    }

    /// One held queue: reads where to start, then pulls until `token` is cancelled.
    async fn pull_queue(
        self: Arc<Self>,
        q: MessageQueue,
        token: CancellationToken,
        from: Arc<AtomicI64>,
    ) {
        let pause = || async {
            tokio::select! {
                _ = token.cancelled() => false,
                _ = tokio::time::sleep(RETRY_PAUSE) => true,
            }
        };
        let mut offset = loop {
            let r = tokio::select! {
                _ = token.cancelled() => return,
                r = self.start_offset(&q) => r,
            };
            match r {
                Ok((committed, start)) => {
                    from.store(committed, Ordering::Relaxed);
                    break start;
                }
                Err(e) => {
                    tracing::warn!(queue = %q, error = %e, "rocketmq: cannot read the committed offset; trying again");
                    if !pause().await {
                        return;
                    }
                }
            }
        };
        let mut failures = 0u32;
        loop {
            let r = tokio::select! {
                _ = token.cancelled() => return,
                r = self.pull(&q, offset) => r,
            };
            match r {
                Ok(Pulled::Found { next, messages }) => {
                    failures = 0;
                    offset = next;
                    if messages.is_empty() {
                        continue;
                    }
                    let batch = Batch {
                        queue: q.clone(),
                        token: token.clone(),
                        messages,
                    };
                    tokio::select! {
                        _ = token.cancelled() => return,
                        r = self.batches.send(batch) => if r.is_err() { return },
                    }
                }
                Ok(Pulled::Nothing { next }) => {
                    failures = 0;
                    offset = next;
                }
                Ok(Pulled::Moved { next }) => {
                    tracing::warn!(queue = %q, from = offset, to = next, "rocketmq: the offset is out of the stored range; the broker moved it");
                    offset = next;
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 {
                        tracing::warn!(queue = %q, offset, error = %e, "rocketmq pull failed; trying again every second");
                    } else {
                        tracing::debug!(queue = %q, offset, failures, error = %e, "rocketmq pull failed again");
                    }
                    if !pause().await {
                        return;
                    }
                }
            }
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
