//! A producer: one message per request (`SEND_MESSAGE`), queues of the topic's route taken in
//! turn, the route read again every [`ROUTE_REFRESH`] and after a failed send.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::remoting::Command;
use super::wire::{encode_properties, MessageQueue, Route, NAME_VALUE, PROPERTY_END};
use super::{code, Client, RmqError};

/// How long a topic's route is used before it is asked for again.
const ROUTE_REFRESH: Duration = Duration::from_secs(30);
/// The topic a broker with `autoCreateTopicEnable` creates new topics from.
const DEFAULT_TOPIC: &str = "TBW102";
/// Property names the client sets itself (`MessageConst.STRING_HASH_SET`, the ones a sender
/// could confuse with its own).
const RESERVED: &[&str] = &[
    "KEYS",
    "TAGS",
    "WAIT",
    "DELAY",
    "RETRY_TOPIC",
    "REAL_TOPIC",
    "REAL_QID",
    "TRAN_MSG",
    "PGROUP",
    "MIN_OFFSET",
    "MAX_OFFSET",
    "BUYER_ID",
    "ORIGIN_MESSAGE_ID",
    "TRANSFER_FLAG",
    "CORRECTION_FLAG",
    "MQ2_FLAG",
    "RECONSUME_TIME",
    "MSG_REGION",
    "TRACE_ON",
    "UNIQ_KEY",
    "MAX_RECONSUME_TIMES",
    "CONSUME_START_TIME",
    "__STARTDELIVERTIME",
    "TIMER_DELIVER_MS",
    "TIMER_DELAY_SEC",
    "TIMER_DELAY_MS",
    "CLUSTER",
];

/// A message to send.
#[derive(Debug, Default)]
pub struct Outgoing<'a> {
    pub topic: &'a str,
    pub tag: Option<&'a str>,
    /// Indexed message key(s); empty: none.
    pub keys: &'a str,
    pub properties: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
}

/// Where a sent message was stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Sent {
    pub queue: MessageQueue,
    pub queue_offset: i64,
}

/// Why a send failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The message cannot be sent as it is (a reserved property name, a separator inside one).
    #[error("{0}")]
    Invalid(String),
    /// The broker did not store it, or did not say so in time: sending again may work.
    #[error(transparent)]
    Failed(#[from] RmqError),
}

/// The user properties of a message, checked: no name RocketMQ reserves, none empty, no
/// separator character in a name or value.
fn user_properties<'a>(
    properties: &[(&'a str, &'a str)],
) -> Result<Vec<(&'a str, &'a str)>, SendError> {
    let mut props = Vec::with_capacity(properties.len() + 4);
    for &(k, v) in properties {
        if RESERVED.contains(&k) {
            return Err(SendError::Invalid(format!(
                "property `{k}` is reserved by RocketMQ"
            )));
        }
        if k.is_empty()
            || [k, v]
                .iter()
                .any(|s| s.contains(NAME_VALUE) || s.contains(PROPERTY_END))
        {
            return Err(SendError::Invalid(format!(
                "property `{k}` is empty or holds a separator character"
            )));
        }
        props.push((k, v));
    }
    Ok(props)
}

pub struct Producer {
    client: Arc<Client>,
    group: String,
    routes: Mutex<HashMap<String, (Route, Instant)>>,
    turn: AtomicUsize,
    seq: AtomicU64,
}

impl Producer {
    /// A producer in `group`; checks that a name server answers.
    pub async fn start(name_server: &str, group: &str) -> Result<Producer, RmqError> {
        let (client, _requests) = Client::new(name_server)?;
        // Any answer (TOPIC_NOT_EXIST included) shows a name server is there.
        match client.route(DEFAULT_TOPIC).await {
            Ok(_) | Err(RmqError::Refused { .. }) => {}
            Err(e) => return Err(e),
        }
        Ok(Producer {
            client,
            group: group.to_owned(),
            routes: Mutex::new(HashMap::new()),
            turn: AtomicUsize::new(0),
            seq: AtomicU64::new(0),
        })
    }

    async fn route(&self, topic: &str) -> Result<Route, RmqError> {
        if let Some((r, at)) = self
            .routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(topic)
        {
            if at.elapsed() < ROUTE_REFRESH {
                return Ok(r.clone());
            }
        }
        let route = match self.client.route(topic).await {
            Ok(r) if !r.write.is_empty() => r,
            // A new topic: as the Java producer, send through the brokers that may create it.
            Ok(_)
            | Err(RmqError::Refused {
                code: code::TOPIC_NOT_EXIST,
                ..
            }) => {
                let mut r = self.client.route(DEFAULT_TOPIC).await?;
                r.write = r
                    .masters
                    .keys()
                    .flat_map(|b| (0..4).map(move |q| MessageQueue::new(topic, b, q)))
                    .collect();
                r.write.sort();
                if r.write.is_empty() {
                    return Err(RmqError::Invalid(format!(
                        "topic `{topic}` has no writable queue"
                    )));
                }
                r
            }
            Err(e) => return Err(e),
        };
        self.routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(topic.to_owned(), (route.clone(), Instant::now()));
        Ok(route)
    }

    /// Sends one message and waits until the broker says it stored it.
    pub async fn send(&self, m: &Outgoing<'_>) -> Result<Sent, SendError> {
        let mut props = user_properties(m.properties)?;
        let uniq = format!(
            "{:08X}{:016X}",
            std::process::id(),
            self.seq.fetch_add(1, Ordering::Relaxed)
        );
        props.push(("UNIQ_KEY", &uniq));
        props.push(("WAIT", "true"));
        if let Some(tag) = m.tag {
            props.push(("TAGS", tag));
        }
        if !m.keys.is_empty() {
            props.push(("KEYS", m.keys));
        }
        let route = self.route(m.topic).await?;
        let queue = &route.write[self.turn.fetch_add(1, Ordering::Relaxed) % route.write.len()];
        let addr = route
            .masters
            .get(&*queue.broker)
            .ok_or_else(|| RmqError::Invalid(format!("no address for broker {}", queue.broker)))?;
        let born = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let req = Command::request(code::SEND_MESSAGE)
            .field("producerGroup", &self.group)
            .field("topic", m.topic)
            .field("defaultTopic", DEFAULT_TOPIC)
            .field("defaultTopicQueueNums", 4)
            .field("queueId", queue.queue_id)
            .field("sysFlag", 0)
            .field("bornTimestamp", born)
            .field("flag", 0)
            .field("properties", encode_properties(&props))
            .field("reconsumeTimes", 0)
            .field("unitMode", false)
            .field("batch", false)
            .with_body(m.body.to_vec());
        match self.client.call("send", addr, req).await {
            Ok(answer) => Ok(Sent {
                queue: MessageQueue::new(m.topic, &queue.broker, queue.queue_id),
                queue_offset: answer.number("queueOffset").unwrap_or(-1),
            }),
            Err(e) => {
                // The route may be stale (a broker gone): ask again next time.
                self.routes
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(m.topic);
                Err(e.into())
            }
        }
    }

    pub async fn shutdown(&self) {
        self.client.remoting.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_properties_refuse_reserved_names_and_separators() {
        let ok = user_properties(&[("msg-id", "m-1"), ("user", "u-7")]).unwrap();
        assert_eq!(ok, vec![("msg-id", "m-1"), ("user", "u-7")]);
        for bad in [
            vec![("KEYS", "k")],
            vec![("UNIQ_KEY", "x")],
            vec![("", "v")],
            vec![("a\u{1}b", "v")],
            vec![("a", "v\u{2}")],
        ] {
            let e = user_properties(&bad).unwrap_err();
            assert!(matches!(e, SendError::Invalid(_)), "{bad:?}: {e}");
        }
    }
}
