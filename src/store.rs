//! The Redis connection shared by the arbiter and the switches: one standalone server through a
//! reconnecting `ConnectionManager`, or a Redis Cluster through the cluster client, behind one
//! type that both can send commands and pipelines to.
//!
//! Both connections reconnect by themselves with backoff; a call made while Redis is away fails
//! fast with [`StoreError::Unavailable`], which callers treat as "stop taking messages".

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, IntoConnectionInfo, Pipeline, RedisError, RedisFuture, Value};

use crate::config::{RedisConfig, RedisMode};

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

/// A connection to standalone Redis or a Redis Cluster; cheap to clone (both multiplex).
#[derive(Clone)]
pub enum Conn {
    /// One server.
    Standalone(ConnectionManager),
    /// Redis Cluster.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Standalone(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
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
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Standalone(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The Redis handle: a command connection, a way to open subscriptions, and the key prefix.
#[derive(Clone)]
pub struct Store {
    conn: Conn,
    /// A plain client to one node, for pub/sub (in a cluster, PUBLISH reaches every node).
    subscriber: redis::Client,
    prefix: Arc<str>,
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
        let conn = match cfg.mode {
            RedisMode::Standalone => {
                let mgr_cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(cfg.connect_timeout))
                    .set_response_timeout(Some(cfg.response_timeout))
                    // Reconnect attempts inside one call stay short: the caller decides to pause.
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_secs(2));
                let mgr = if lazy {
                    ConnectionManager::new_lazy_with_config(subscriber.clone(), mgr_cfg)
                        .map_err(StoreError::Setup)?
                } else {
                    ConnectionManager::new_with_config(subscriber.clone(), mgr_cfg).await?
                };
                Conn::Standalone(mgr)
            }
            RedisMode::Cluster => {
                let mut b = redis::cluster::ClusterClientBuilder::new(infos)
                    .connection_timeout(cfg.connect_timeout)
                    .response_timeout(cfg.response_timeout)
                    .retries(2);
                if let Some(u) = &cfg.username {
                    b = b.username(u);
                }
                if let Some(p) = &cfg.password {
                    b = b.password(p.expose());
                }
                if let Some(c) = certs {
                    b = b.certs(c);
                }
                let client = b.build().map_err(StoreError::Setup)?;
                let conn = if lazy {
                    client.get_pending_async_connection_with_config(Default::default())
                } else {
                    client.get_async_connection().await?
                };
                Conn::Cluster(conn)
            }
        };
        Ok(Store {
            conn,
            subscriber,
            prefix: cfg.key_prefix.as_str().into(),
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
        Ok(self.subscriber.get_async_pubsub().await?)
    }

    /// One PING: is Redis answering right now?
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.conn();
        let _: String = redis::cmd("PING").query_async(&mut c).await?;
        Ok(())
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
