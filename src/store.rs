//! The Redis connection shared by the arbiter and the switches: one standalone server through a
//! reconnecting `ConnectionManager`, a Redis Cluster through the cluster client, or the primary
//! that Redis Sentinel names (a `ConnectionManager` to it, moved to the new primary after a
//! failover), behind one type that all can send commands and pipelines to.
//!
//! The connections reconnect by themselves with backoff; a call made while Redis is away fails
//! fast with [`StoreError::Unavailable`], which callers treat as "stop taking messages".
//!
//! Neither reconnects a connection whose calls only time out, and the cluster client can wedge
//! for good (see [`Store::watchdog`]): the daemon runs a watchdog that replaces a connection on
//! which every call has failed for a while although the servers answer a fresh connection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Cmd, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisError,
    RedisFuture, Value,
};
use tokio_util::sync::CancellationToken;

pub mod config;

use self::config::{RedisConfig, RedisMode};

/// What went wrong talking to Redis, sorted by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis could not be reached or is not serving (I/O, timeout, cluster down, loading):
    /// transient; pause and try again later. Nothing was decided.
    #[error("redis unavailable: {0}")]
    Unavailable(#[source] RedisError),
    /// Redis answered with an error (a script failed, a key has the wrong type): a bug or a
    /// foreign key under our prefix; retrying will not help.
    #[error("redis rejected the command: {0}")]
    Rejected(#[source] RedisError),
    /// Redis answered with something our scripts never return.
    #[error("unexpected reply from redis: {0}")]
    Reply(String),
    /// The Redis settings cannot be turned into a client (bad URL, TLS setup).
    #[error("redis client setup: {0}")]
    Setup(#[source] RedisError),
}

impl StoreError {
    /// True when trying again later can succeed (Redis away), false for errors that will repeat.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// Error codes that Redis answers while it cannot serve for now (loading, failing over, a script
/// running long, out of memory until keys expire or the limit is raised): trying later can work.
const TRANSIENT_CODES: &[&str] = &[
    "LOADING",
    "MASTERDOWN",
    "READONLY",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "BUSY",
    "MOVED",
    "ASK",
    "OOM",
];

impl StoreError {
    /// One id's own failure inside a batch script (an answer with code `0`), sorted like a
    /// whole reply: a transient code (`OOM …`, `READONLY …`) is unavailability, anything else
    /// (`WRONGTYPE …` from a foreign key under the prefix) a rejection.
    pub fn of_script(text: String) -> StoreError {
        let transient = text
            .split_whitespace()
            .next()
            .is_some_and(|code| TRANSIENT_CODES.contains(&code));
        let e = RedisError::from((redis::ErrorKind::Extension, "script error", text));
        if transient {
            StoreError::Unavailable(e)
        } else {
            StoreError::Rejected(e)
        }
    }
}

impl From<RedisError> for StoreError {
    fn from(e: RedisError) -> Self {
        let transient = e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_cluster_error()
            || e.is_unrecoverable_error()
            || matches!(e.kind(), redis::ErrorKind::ClusterConnectionNotFound)
            || e.code().is_some_and(|c| TRANSIENT_CODES.contains(&c));
        if transient {
            StoreError::Unavailable(e)
        } else {
            StoreError::Rejected(e)
        }
    }
}

/// A connection to standalone Redis or a Redis Cluster; cheap to clone (both multiplex). Every
/// clone sends on the connection the store holds at the time of the call: the watchdog may have
/// replaced it since the clone was made.
#[derive(Clone)]
pub enum Conn {
    /// One server.
    Standalone(Watched<ConnectionManager>),
    /// Redis Cluster.
    Cluster(Watched<ClusterConnection>),
    /// The primary the sentinels name (none yet, if they named none so far).
    Sentinel(Watched<Primary>),
}

/// A connection to the primary the sentinels named; `None` while none is known (the daemon
/// started while no sentinel answered): every call then fails as Redis being away.
#[derive(Clone)]
pub struct Primary(Option<ConnectionManager>);

impl Primary {
    fn unknown() -> RedisError {
        std::io::Error::new(
            std::io::ErrorKind::NotConnected,
            "no primary known: no sentinel has named one yet",
        )
        .into()
    }
}

impl ConnectionLike for Primary {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.0 {
            Some(c) => c.req_packed_command(cmd),
            None => Box::pin(async { Err(Primary::unknown()) }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.0 {
            Some(c) => c.req_packed_commands(pipeline, offset, count),
            None => Box::pin(async { Err(Primary::unknown()) }),
        }
    }

    fn get_db(&self) -> i64 {
        self.0.as_ref().map_or(0, ConnectionLike::get_db)
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Standalone(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Sentinel(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Sentinel(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Standalone(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Sentinel(c) => c.get_db(),
        }
    }
}

impl Conn {
    fn health(&self) -> &Health {
        match self {
            Conn::Standalone(c) => &c.link.health,
            Conn::Cluster(c) => &c.link.health,
            Conn::Sentinel(c) => &c.link.health,
        }
    }
}

/// A multiplexed connection the watchdog can swap for a new one under its users, and that notes
/// when its calls were last answered and last went unanswered. Cheap to clone.
pub struct Watched<T> {
    link: Arc<Link<T>>,
}

impl<T> Clone for Watched<T> {
    fn clone(&self) -> Self {
        Watched {
            link: self.link.clone(),
        }
    }
}

struct Link<T> {
    current: ArcSwap<T>,
    health: Health,
}

impl<T> Watched<T> {
    fn new(conn: T) -> Self {
        Watched {
            link: Arc::new(Link {
                current: ArcSwap::from_pointee(conn),
                health: Health::new(),
            }),
        }
    }

    /// Puts `conn` in place of the current connection; calls already sent finish on the old one.
    fn replace(&self, conn: T) {
        self.link.current.store(Arc::new(conn));
        self.link.health.restart();
    }
}

impl<T: ConnectionLike + Clone + Send + Sync + 'static> ConnectionLike for Watched<T> {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        // A clone of the current connection (an Arc and a channel handle), so that no guard on
        // the pointer is held across the call.
        let mut conn = T::clone(&self.link.current.load());
        Box::pin(async move {
            let reply = conn.req_packed_command(cmd).await;
            self.link.health.note(&reply);
            reply
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let mut conn = T::clone(&self.link.current.load());
        Box::pin(async move {
            let reply = conn.req_packed_commands(pipeline, offset, count).await;
            self.link.health.note(&reply);
            reply
        })
    }

    fn get_db(&self) -> i64 {
        self.link.current.load().get_db()
    }
}

/// When calls on the current connection were last answered and last went unanswered, in ms
/// since `epoch` (an answer includes an error reply: the server is there).
struct Health {
    epoch: Instant,
    answered_ms: AtomicU64,
    failed_ms: AtomicU64,
}

impl Health {
    fn new() -> Health {
        Health {
            epoch: Instant::now(),
            answered_ms: AtomicU64::new(0),
            failed_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn note<V>(&self, reply: &Result<V, RedisError>) {
        let stamp = match reply {
            Err(e) if unanswered(e) => &self.failed_ms,
            _ => &self.answered_ms,
        };
        stamp.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Whether the latest call went unanswered (Redis away, or a primary gone).
    fn failing(&self) -> bool {
        self.failed_ms.load(Ordering::Relaxed) > self.answered_ms.load(Ordering::Relaxed)
    }

    /// A new connection starts with a clean slate: it gets a whole stall period of its own.
    fn restart(&self) {
        self.answered_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// How long nothing has been answered, if calls went unanswered throughout `stall_after` and
    /// still do (an idle connection does not stall).
    fn stalled(&self, stall_after: Duration) -> Option<Duration> {
        let now = self.now_ms();
        let answered = self.answered_ms.load(Ordering::Relaxed);
        let failed = self.failed_ms.load(Ordering::Relaxed);
        let window = stall_after.as_millis() as u64;
        let silent = now.saturating_sub(answered);
        (failed > answered && silent >= window && now.saturating_sub(failed) <= window)
            .then(|| Duration::from_millis(silent))
    }
}

/// The call never got an answer from a server: timed out, connection cut or refused, no
/// connection to the node.
fn unanswered(e: &RedisError) -> bool {
    e.is_timeout()
        || e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(e.kind(), redis::ErrorKind::ClusterConnectionNotFound)
}

/// What it takes to open a new connection like the first one, and to ask the servers directly
/// whether they answer.
enum Opener {
    Standalone {
        client: redis::Client,
        config: ConnectionManagerConfig,
    },
    Cluster {
        client: ClusterClient,
        seeds: Vec<ConnectionInfo>,
        /// The TLS settings of `[redis.tls]`, for the fresh connections that probe the seeds.
        certs: Option<redis::TlsCertificates>,
    },
    Sentinel {
        /// Asks the sentinels for the primary; its connections to them are cached inside.
        sentinel: tokio::sync::Mutex<SentinelClient>,
        config: ConnectionManagerConfig,
        /// The address (`host:port`) the command connection goes to now, if any.
        primary: std::sync::Mutex<Option<String>>,
    },
}

/// The Redis handle: a command connection, a way to open subscriptions, and the key prefix.
#[derive(Clone)]
pub struct Store {
    conn: Conn,
    /// A plain client to one node, for pub/sub (in a cluster, PUBLISH reaches every node; with
    /// Sentinel, the primary of the moment).
    subscriber: Arc<ArcSwap<redis::Client>>,
    prefix: Arc<str>,
    opener: Arc<Opener>,
    connect_timeout: Duration,
    response_timeout: Duration,
}

impl Store {
    /// Builds the clients. With `lazy`, no connection is made until the first command (the
    /// daemon starts even while Redis is away, and reports not ready); without, the first
    /// connection is made now and its failure returned (the CLI says so and exits).
    pub async fn connect(cfg: &RedisConfig, lazy: bool) -> Result<Store, StoreError> {
        // `rediss://` needs a rustls crypto provider; the crate set compiles in ring only, so
        // install it (a no-op if something installed one already).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let infos = cfg
            .urls
            .iter()
            .map(|u| node_info(cfg, u))
            .collect::<Result<Vec<_>, _>>()?;
        let certs = tls_certificates(cfg)?;
        let subscriber = match &certs {
            Some(c) => redis::Client::build_with_tls(infos[0].clone(), c.clone()),
            None => redis::Client::open(infos[0].clone()),
        }
        .map_err(StoreError::Setup)?;
        let mgr_cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.connect_timeout))
            .set_response_timeout(Some(cfg.response_timeout))
            // Reconnect attempts inside one call stay short: the caller decides to pause.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(2));
        let mut subscriber = subscriber;
        let (conn, opener) = match cfg.mode {
            RedisMode::Standalone => {
                let mgr = if lazy {
                    ConnectionManager::new_lazy_with_config(subscriber.clone(), mgr_cfg.clone())
                        .map_err(StoreError::Setup)?
                } else {
                    ConnectionManager::new_with_config(subscriber.clone(), mgr_cfg.clone()).await?
                };
                (
                    Conn::Standalone(Watched::new(mgr)),
                    Opener::Standalone {
                        client: subscriber.clone(),
                        config: mgr_cfg,
                    },
                )
            }
            RedisMode::Cluster => {
                let mut b = redis::cluster::ClusterClientBuilder::new(infos.clone())
                    .connection_timeout(cfg.connect_timeout)
                    .response_timeout(cfg.response_timeout)
                    .retries(2);
                if let Some(u) = &cfg.username {
                    b = b.username(u);
                }
                if let Some(p) = &cfg.password {
                    b = b.password(p.expose());
                }
                if let Some(c) = certs.clone() {
                    b = b.certs(c);
                }
                let client = b.build().map_err(StoreError::Setup)?;
                let conn = if lazy {
                    // The config passed here replaces the builder's per-node timeouts: without
                    // them the client's own recovery requests (CLUSTER SLOTS, PING) wait forever
                    // on a node that does not answer, and every call waits behind the recovery.
                    client.get_pending_async_connection_with_config(
                        ClusterConfig::new()
                            .set_connection_timeout(cfg.connect_timeout)
                            .set_response_timeout(cfg.response_timeout),
                    )
                } else {
                    // Bounded: it can hang (redis-rs #1953).
                    bounded(
                        (cfg.connect_timeout + cfg.response_timeout) * 2,
                        client.get_async_connection(),
                    )
                    .await?
                };
                (
                    Conn::Cluster(Watched::new(conn)),
                    Opener::Cluster {
                        client,
                        seeds: infos,
                        certs,
                    },
                )
            }
            RedisMode::Sentinel => {
                let mut sentinel = sentinel_client(cfg, &infos, certs)?;
                let limit = (cfg.connect_timeout + cfg.response_timeout) * 2;
                let primary = match bounded(limit, sentinel.async_get_client()).await {
                    Ok(client) => {
                        let addr = client.get_connection_info().addr().to_string();
                        let mgr = if lazy {
                            ConnectionManager::new_lazy_with_config(client.clone(), mgr_cfg.clone())
                                .map_err(StoreError::Setup)?
                        } else {
                            ConnectionManager::new_with_config(client.clone(), mgr_cfg.clone())
                                .await?
                        };
                        subscriber = client;
                        tracing::info!(primary = %addr, "redis sentinel: primary found");
                        Some((addr, mgr))
                    }
                    // The daemon starts anyway, not ready; the watchdog asks again.
                    Err(e) if lazy => {
                        tracing::warn!(error = %e, "redis sentinel: no primary named yet");
                        None
                    }
                    Err(e) => return Err(e.into()),
                };
                let (addr, mgr) = primary.unzip();
                (
                    Conn::Sentinel(Watched::new(Primary(mgr))),
                    Opener::Sentinel {
                        sentinel: tokio::sync::Mutex::new(sentinel),
                        config: mgr_cfg,
                        primary: std::sync::Mutex::new(addr),
                    },
                )
            }
        };
        Ok(Store {
            conn,
            subscriber: Arc::new(ArcSwap::from_pointee(subscriber)),
            prefix: cfg.key_prefix.as_str().into(),
            opener: Arc::new(opener),
            connect_timeout: cfg.connect_timeout,
            response_timeout: cfg.response_timeout,
        })
    }

    /// A connection handle to send commands on (clones share the underlying connection).
    pub fn conn(&self) -> Conn {
        self.conn.clone()
    }

    /// The key prefix every key of this deployment starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Opens a new pub/sub connection.
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub, StoreError> {
        let client = self.subscriber.load_full();
        Ok(client.get_async_pubsub().await?)
    }

    /// One PING: is Redis answering right now?
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.conn();
        let _: String = redis::cmd("PING").query_async(&mut c).await?;
        Ok(())
    }

    /// One PING, then, with `replicas` > 0, whether at least that many replicas are connected
    /// and in sync with the server (`INFO replication`, `state=online`): without them no claim
    /// can be confirmed (`arbiter.replicas`), which counts as Redis being unavailable.
    pub async fn ready(&self, replicas: u32) -> Result<(), StoreError> {
        self.ping().await?;
        if replicas == 0 {
            return Ok(());
        }
        let mut c = self.conn();
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut c)
            .await?;
        let online = info
            .lines()
            .filter(|l| l.starts_with("slave") && l.contains("state=online"))
            .count();
        if online >= replicas as usize {
            return Ok(());
        }
        Err(StoreError::Unavailable(RedisError::from((
            redis::ErrorKind::Extension,
            "too few replicas",
            format!(
                "{online} replica(s) online, arbiter.replicas asks for {replicas}: no claim can \
                 be confirmed, so no call is started"
            ),
        ))))
    }

    /// How long every call on a connection must have gone unanswered before the watchdog asks
    /// the servers directly: three reply timeouts, at least [`MIN_STALL`].
    pub fn stall_after(&self) -> Duration {
        (self.response_timeout * 3).max(MIN_STALL)
    }

    /// Replaces the command connection when no call on it has been answered for
    /// [`Store::stall_after`] while calls keep failing, and a fresh connection to the servers
    /// answers (`PING` on standalone; `CLUSTER INFO` saying `cluster_state:ok` from a seed node
    /// on a cluster). Counts each replacement in `replaced` and logs it. Runs until `cancel`.
    ///
    /// Why: neither connection type of the redis crate replaces a connection whose calls only
    /// time out. And the cluster client can wedge for good under load: its one task, which routes
    /// every call, waits in a recovery (a slot refresh, or a reconnect to the seed nodes) for the
    /// write lock of its connection map, which a background node repair already queued for (the
    /// repair, registered by redis-rs #2120 for #2092, and the cause of #2277) and which that
    /// task no longer polls while it recovers (redis 1.8.1, `cluster_async`: the comment at
    /// `poll_reconnects` names the same deadlock, #2418). Under the daemons' load that task was
    /// also seen to stop being polled with no recovery under way (its last poll: 100 calls queued
    /// for it, 128 in flight, the connection map locked). Either way every call times out from
    /// then on, the servers see no command at all, and nothing inside the crate ever ends it; a
    /// new connection has a task of its own, and the old task ends with its last handle.
    ///
    /// With Sentinel it also follows a failover: every second while calls go unanswered, and
    /// every [`SENTINEL_ASK_EVERY`] otherwise, it asks the sentinels which server is the primary
    /// now; when that is another one than the connection's, it opens a connection there and puts
    /// it in place (counted in `failover`, logged).
    pub async fn watchdog(
        self,
        replaced: prometheus::IntCounter,
        failover: prometheus::IntCounter,
        cancel: CancellationToken,
    ) {
        let stall_after = self.stall_after();
        let mut tick = tokio::time::interval(WATCH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut asked = Instant::now();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            if matches!(&*self.opener, Opener::Sentinel { .. })
                && (self.conn.health().failing() || asked.elapsed() >= SENTINEL_ASK_EVERY)
            {
                asked = Instant::now();
                match self.follow_primary(false).await {
                    Ok(Some((Some(was), now))) => {
                        failover.inc();
                        tracing::warn!(primary = %now, was = %was,
                            "redis sentinel: the primary changed (a failover); the connection \
                             moved to the new primary");
                    }
                    Ok(Some((None, now))) => {
                        tracing::info!(primary = %now, "redis sentinel: primary found");
                    }
                    Ok(None) => {}
                    Err(e) => tracing::debug!(error = %e,
                        "redis sentinel: no primary named now (a failover under way?)"),
                }
            }
            let Some(silent) = self.conn.health().stalled(stall_after) else {
                continue;
            };
            // Redis itself away: that is an outage, which the pipelines handle by pausing.
            if let Err(e) = self.servers_answer().await {
                tracing::debug!(error = %e, "redis connection stalled and the servers do not answer a fresh connection either");
                continue;
            }
            match self.reopen().await {
                Ok(()) => {
                    replaced.inc();
                    tracing::warn!(
                        silent = ?silent,
                        "redis connection: no call answered for this long while the servers \
                         answer a fresh connection; replaced the connection"
                    );
                }
                Err(e) => tracing::warn!(error = %e,
                    "redis connection stalled; opening a new one failed, trying again"),
            }
        }
    }

    /// Whether the servers answer a connection of their own, made now.
    async fn servers_answer(&self) -> Result<(), StoreError> {
        let fresh = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.response_timeout));
        let limit = self.connect_timeout + self.response_timeout;
        match &*self.opener {
            Opener::Standalone { client, .. } => ping_fresh(client, &fresh, limit).await,
            Opener::Cluster { seeds, certs, .. } => {
                let mut last = None;
                for seed in seeds {
                    let asked = async {
                        let client = match certs {
                            Some(c) => redis::Client::build_with_tls(seed.clone(), c.clone())?,
                            None => redis::Client::open(seed.clone())?,
                        };
                        let mut c = bounded(
                            limit,
                            client.get_multiplexed_async_connection_with_config(&fresh),
                        )
                        .await?;
                        redis::cmd("CLUSTER")
                            .arg("INFO")
                            .query_async::<String>(&mut c)
                            .await
                    };
                    match asked.await {
                        Ok(info) if info.contains("cluster_state:ok") => return Ok(()),
                        Ok(_) => last = Some(StoreError::Reply("cluster_state is not ok".into())),
                        Err(e) => last = Some(e.into()),
                    }
                }
                Err(last.unwrap_or_else(|| StoreError::Reply("no seed node".into())))
            }
            Opener::Sentinel { .. } => ping_fresh(&self.find_primary().await?, &fresh, limit).await,
        }
    }

    /// A client for the primary the sentinels name now (checked by the crate with `ROLE`).
    async fn find_primary(&self) -> Result<redis::Client, StoreError> {
        let Opener::Sentinel { sentinel, .. } = &*self.opener else {
            unreachable!("only asked with sentinel");
        };
        let limit = (self.connect_timeout + self.response_timeout) * 2;
        let mut sentinel = sentinel.lock().await;
        Ok(bounded(limit, sentinel.async_get_client()).await?)
    }

    /// Asks the sentinels for the primary and, when it is another server than the one the
    /// connection goes to (or `force`), opens a connection to it and puts it in place. Returns
    /// the old and new addresses when it moved.
    async fn follow_primary(
        &self,
        force: bool,
    ) -> Result<Option<(Option<String>, String)>, StoreError> {
        let (
            Opener::Sentinel {
                config, primary, ..
            },
            Conn::Sentinel(watched),
        ) = (&*self.opener, &self.conn)
        else {
            unreachable!("only followed with sentinel");
        };
        let client = self.find_primary().await?;
        let now = client.get_connection_info().addr().to_string();
        let was = lock(primary).clone();
        if !force && was.as_deref() == Some(now.as_str()) {
            return Ok(None);
        }
        let limit = self.connect_timeout + self.response_timeout;
        let mgr = bounded(
            limit,
            ConnectionManager::new_with_config(client.clone(), config.clone()),
        )
        .await?;
        watched.replace(Primary(Some(mgr)));
        self.subscriber.store(Arc::new(client));
        *lock(primary) = Some(now.clone());
        Ok(Some((was, now)))
    }

    /// Opens a new command connection and puts it in place of the current one.
    async fn reopen(&self) -> Result<(), StoreError> {
        let limit = self.connect_timeout + self.response_timeout;
        match (&*self.opener, &self.conn) {
            (Opener::Standalone { client, config }, Conn::Standalone(watched)) => {
                let mgr = bounded(
                    limit,
                    ConnectionManager::new_with_config(client.clone(), config.clone()),
                )
                .await?;
                watched.replace(mgr);
            }
            (Opener::Cluster { client, .. }, Conn::Cluster(watched)) => {
                // Bounded: the first connection of a cluster client can hang (redis-rs #1953).
                let conn = bounded(limit * 2, client.get_async_connection()).await?;
                watched.replace(conn);
            }
            (Opener::Sentinel { .. }, Conn::Sentinel(_)) => {
                self.follow_primary(true).await?;
            }
            _ => unreachable!("the opener matches the connection"),
        }
        Ok(())
    }
}

/// The shortest stall the watchdog acts on.
pub const MIN_STALL: Duration = Duration::from_secs(3);
/// How often the watchdog looks at the connection.
const WATCH_EVERY: Duration = Duration::from_secs(1);
/// How often the watchdog asks the sentinels for the primary while calls are answered: a
/// primary demoted to a replica while it was away answers writes with `READONLY`, inside the
/// scripts' per-id answers, which the connection's health does not see.
pub const SENTINEL_ASK_EVERY: Duration = Duration::from_secs(5);

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The client that asks the sentinels at `infos` for the primary named in `[redis.sentinel]`:
/// the data nodes' credentials from `redis.username` / `redis.password`, the sentinels' from
/// `[redis.sentinel]`; with `rediss://` sentinels, TLS (and `[redis.tls]`) to both.
fn sentinel_client(
    cfg: &RedisConfig,
    infos: &[ConnectionInfo],
    certs: Option<redis::TlsCertificates>,
) -> Result<SentinelClient, StoreError> {
    let s = &cfg.sentinel;
    let addrs = infos.iter().map(|i| i.addr().clone());
    let mut b = SentinelClientBuilder::new(addrs, &s.master_name, SentinelServerType::Master)
        .map_err(StoreError::Setup)?;
    if let Some(u) = &cfg.username {
        b = b.set_client_to_redis_username(u);
    }
    if let Some(p) = &cfg.password {
        b = b.set_client_to_redis_password(p.expose());
    }
    if let Some(u) = &s.username {
        b = b.set_client_to_sentinel_username(u);
    }
    if let Some(p) = &s.password {
        b = b.set_client_to_sentinel_password(p.expose());
    }
    if cfg.urls.iter().any(|u| u.starts_with("rediss://")) {
        b = b
            .set_client_to_redis_tls_mode(redis::TlsMode::Secure)
            .set_client_to_sentinel_tls_mode(redis::TlsMode::Secure);
        if let Some(c) = certs {
            b = b
                .set_client_to_redis_certificates(c.clone())
                .set_client_to_sentinel_certificates(c);
        }
    }
    b.build().map_err(StoreError::Setup)
}

/// `fut`, failing with a timeout after `limit`.
async fn bounded<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, RedisError>>,
) -> Result<T, RedisError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()),
    }
}

/// The CA and client certificate of `[redis.tls]`, read now, for `rediss://` URLs; `None`
/// without any (the system's roots are trusted then).
fn tls_certificates(cfg: &RedisConfig) -> Result<Option<redis::TlsCertificates>, StoreError> {
    if cfg.tls.is_empty() {
        return Ok(None);
    }
    let material = cfg.tls.read("redis.tls").map_err(|e| {
        StoreError::Setup(RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "redis TLS files",
            e.to_string(),
        )))
    })?;
    Ok(Some(redis::TlsCertificates {
        client_tls: material
            .client
            .map(|(client_cert, client_key)| redis::ClientTlsConfig {
                client_cert,
                client_key,
            }),
        root_cert: material.ca,
    }))
}

/// Connection info for one node, with the configured credentials added (the URL's own win).
fn node_info(cfg: &RedisConfig, url: &str) -> Result<redis::ConnectionInfo, StoreError> {
    let info = url.into_connection_info().map_err(StoreError::Setup)?;
    let mut redis_settings = info.redis_settings().clone();
    if redis_settings.username().is_none() {
        if let Some(u) = &cfg.username {
            redis_settings = redis_settings.set_username(u);
        }
    }
    if redis_settings.password().is_none() {
        if let Some(p) = &cfg.password {
            redis_settings = redis_settings.set_password(p.expose());
        }
    }
    Ok(info.set_redis_settings(redis_settings))
}

/// A `PING` on a connection of its own, made now, within `limit`.
async fn ping_fresh(
    client: &redis::Client,
    fresh: &AsyncConnectionConfig,
    limit: Duration,
) -> Result<(), StoreError> {
    let mut c = bounded(
        limit,
        client.get_multiplexed_async_connection_with_config(fresh),
    )
    .await?;
    let _: String = redis::cmd("PING").query_async(&mut c).await?;
    Ok(())
}
