//! A small RocketMQ client over the broker's remoting protocol: the cluster-mode pull consumer
//! the RocketMQ side needs ([`consumer`]), and a producer for the traffic generator and the tests
//! ([`producer`]). It speaks to 4.x and 5.x name servers and brokers the way the Java client's
//! `DefaultLitePullConsumer` and `DefaultMQProducer` do (docs/rocketmq.md, "The client").

pub mod consumer;
#[cfg(test)]
mod fuzz;
pub mod producer;
pub mod remoting;
pub mod wire;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use remoting::{Command, Remoting, RemotingError};
pub use wire::MessageQueue;
use wire::Route;

/// Request codes (`org.apache.rocketmq.remoting.protocol.RequestCode`).
pub mod code {
    pub const SEND_MESSAGE: i32 = 10;
    pub const PULL_MESSAGE: i32 = 11;
    pub const QUERY_CONSUMER_OFFSET: i32 = 14;
    pub const UPDATE_CONSUMER_OFFSET: i32 = 15;
    pub const GET_MAX_OFFSET: i32 = 30;
    pub const GET_MIN_OFFSET: i32 = 31;
    pub const HEART_BEAT: i32 = 34;
    pub const UNREGISTER_CLIENT: i32 = 35;
    pub const GET_CONSUMER_LIST_BY_GROUP: i32 = 38;
    pub const NOTIFY_CONSUMER_IDS_CHANGED: i32 = 40;
    pub const GET_ROUTEINFO_BY_TOPIC: i32 = 105;
    /// Response codes.
    pub const SUCCESS: i32 = 0;
    pub const TOPIC_NOT_EXIST: i32 = 17;
    pub const PULL_NOT_FOUND: i32 = 19;
    pub const PULL_RETRY_IMMEDIATELY: i32 = 20;
    pub const PULL_OFFSET_MOVED: i32 = 21;
    pub const QUERY_NOT_FOUND: i32 = 22;
}

/// How long an ordinary request may wait for its answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a RocketMQ operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RmqError {
    #[error(transparent)]
    Remoting(#[from] RemotingError),
    /// The broker or name server answered with a failure code.
    #[error("{what}: response code {code} ({}){}", response_code(*code), remark_suffix(remark))]
    Refused {
        what: &'static str,
        code: i32,
        remark: String,
    },
    #[error("{0}")]
    Invalid(String),
}

fn remark_suffix(remark: &str) -> String {
    if remark.is_empty() {
        String::new()
    } else {
        format!(": {remark}")
    }
}

impl RmqError {
    fn refused(what: &'static str, answer: &Command) -> RmqError {
        RmqError::Refused {
            what,
            code: answer.code,
            remark: answer.remark().to_owned(),
        }
    }
}

/// What a RocketMQ remoting response code means (org.apache.rocketmq.remoting.protocol.ResponseCode).
pub fn response_code(code: i32) -> &'static str {
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
        19 => "PULL_NOT_FOUND",
        20 => "PULL_RETRY_IMMEDIATELY",
        21 => "PULL_OFFSET_MOVED",
        22 => "QUERY_NOT_FOUND",
        24 => "SUBSCRIPTION_PARSE_FAILED",
        25 => "SUBSCRIPTION_NOT_EXIST",
        26 => "SUBSCRIPTION_NOT_LATEST",
        27 => "SUBSCRIPTION_GROUP_NOT_EXIST",
        _ => "see ResponseCode in the RocketMQ sources",
    }
}

/// Requests brokers send on their own, with the address they came from.
pub type BrokerRequests = tokio::sync::mpsc::UnboundedReceiver<(String, Command)>;

/// What producers and consumers share: the connections and the name servers.
pub struct Client {
    pub remoting: Arc<Remoting>,
    name_servers: Vec<String>,
    /// The name server tried first next time (the last one that answered).
    ns_at: AtomicUsize,
    /// `host@pid#n`: unique per client in this process and across processes of a host.
    pub id: String,
}

impl Client {
    /// A client of the name server(s) `name_server` (`host:port[;host:port…]`). Requests brokers
    /// send on their own come out of the returned channel.
    pub fn new(name_server: &str) -> Result<(Arc<Client>, BrokerRequests), RmqError> {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let name_servers: Vec<String> = name_server
            .split(';')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if name_servers.is_empty() {
            return Err(RmqError::Invalid(format!(
                "no name server address in `{name_server}`"
            )));
        }
        let (remoting, requests) = Remoting::new();
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let id = format!(
            "127.0.0.1@{}#{}-{:x}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            started
        );
        let client = Client {
            remoting,
            name_servers,
            ns_at: AtomicUsize::new(0),
            id,
        };
        Ok((Arc::new(client), requests))
    }

    /// Asks the name servers (the last one that answered first) for `topic`'s route.
    pub async fn route(&self, topic: &str) -> Result<Route, RmqError> {
        let n = self.name_servers.len();
        let first = self.ns_at.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..n {
            let at = (first + i) % n;
            let req = Command::request(code::GET_ROUTEINFO_BY_TOPIC).field("topic", topic);
            match self
                .remoting
                .invoke(&self.name_servers[at], req, REQUEST_TIMEOUT)
                .await
            {
                Ok(answer) if answer.code == code::SUCCESS => {
                    self.ns_at.store(at, Ordering::Relaxed);
                    return Route::parse(topic, &answer.body).map_err(RmqError::Invalid);
                }
                Ok(answer) => {
                    self.ns_at.store(at, Ordering::Relaxed);
                    return Err(RmqError::refused("topic route", &answer));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one name server").into())
    }

    /// Sends a request to a broker and returns its answer if it is `SUCCESS`.
    pub async fn call(
        &self,
        what: &'static str,
        addr: &str,
        req: Command,
    ) -> Result<Command, RmqError> {
        let answer = self.remoting.invoke(addr, req, REQUEST_TIMEOUT).await?;
        if answer.code == code::SUCCESS {
            Ok(answer)
        } else {
            Err(RmqError::refused(what, &answer))
        }
    }
}
