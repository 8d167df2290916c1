//! Dead letters: copies parked for a person — bad input, a fatal answer, retries exhausted, or an
//! outcome in doubt under `at_most_once` — kept in a capped Redis stream with their reason, where
//! they came from, and the payload, so they can be read and replayed.
//!
//! Keys: `<prefix>:{dead}:letters` (a stream; trimmed to about `cap` entries, oldest first) and
//! `<prefix>:{dead}:trimmed` (how many letters the trimming removed, ever). A trimmed letter's id
//! stays dead in the arbiter (`inspect` shows it); only its copy and reason are gone from the
//! stream, and `dead list` says how many went that way.

use std::sync::Arc;

use redis::Value;
use serde::{Deserialize, Serialize};

use crate::message::Origin;
use crate::settings::ConfigError;
use crate::store::{Store, StoreError};

/// `[dead_letters]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLettersConfig {
    /// About how many parked messages the stream keeps (the oldest go first).
    #[serde(default = "default_dead_max_len")]
    pub max_len: u64,
}

fn default_dead_max_len() -> u64 {
    100_000
}

impl Default for DeadLettersConfig {
    fn default() -> Self {
        Self {
            max_len: default_dead_max_len(),
        }
    }
}

impl DeadLettersConfig {
    /// Refuses a stream too short to hold a burst of parked messages.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_len < 100 {
            return Err(ConfigError::new(
                "dead_letters.max_len",
                "must be at least 100, e.g. `100000`",
            ));
        }
        Ok(())
    }
}

/// One parked copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The stream entry id (`<ms>-<seq>`): the handle for `dead show` / `dead replay`.
    pub entry: String,
    /// The message id, if one could be read.
    pub message_id: Option<String>,
    /// The business id, if one could be read.
    pub business_id: Option<String>,
    /// Why it was parked.
    pub reason: String,
    /// The side that parked it.
    pub side: String,
    /// Topic / queue.
    pub topic: String,
    /// Partition / queue id.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Calls made for it.
    pub attempts: u32,
    /// The body, as received.
    pub payload: Vec<u8>,
}

/// What is parked, before it has a stream entry id.
#[derive(Debug, Clone, Copy)]
pub struct Parking<'a> {
    /// The message id, if known.
    pub message_id: Option<&'a str>,
    /// The business id, if known.
    pub business_id: Option<&'a str>,
    /// Why.
    pub reason: &'a str,
    /// Where it came from.
    pub origin: &'a Origin,
    /// Calls made.
    pub attempts: u32,
    /// The body.
    pub payload: &'a [u8],
}

/// The dead-letter stream of one deployment.
#[derive(Clone)]
pub struct DeadLetters {
    store: Store,
    key: Arc<str>,
    trimmed_key: Arc<str>,
    cap: u64,
}

impl DeadLetters {
    /// The stream under `store`'s prefix, kept to about `cap` entries.
    pub fn new(store: &Store, cap: u64) -> Self {
        Self {
            store: store.clone(),
            key: format!("{}:{{dead}}:letters", store.prefix()).into(),
            trimmed_key: format!("{}:{{dead}}:trimmed", store.prefix()).into(),
            cap,
        }
    }

    /// Parks copies, all in one round trip; returns their entry ids and how many old letters
    /// the stream's cap removed to make room (counted in Redis, see [`DeadLetters::trimmed`]).
    pub async fn park(&self, letters: &[Parking<'_>]) -> Result<(Vec<String>, u64), StoreError> {
        if letters.is_empty() {
            return Ok((Vec::new(), 0));
        }
        let mut pipe = redis::pipe();
        for l in letters {
            pipe.cmd("XADD")
                .arg(&*self.key)
                .arg("*")
                .arg("id")
                .arg(l.message_id.unwrap_or(""))
                .arg("bid")
                .arg(l.business_id.unwrap_or(""))
                .arg("reason")
                .arg(l.reason)
                .arg("side")
                .arg(&*l.origin.side)
                .arg("topic")
                .arg(&*l.origin.topic)
                .arg("partition")
                .arg(l.origin.partition)
                .arg("offset")
                .arg(l.origin.offset)
                .arg("attempts")
                .arg(l.attempts)
                .arg("payload")
                .arg(l.payload);
        }
        // Trimmed apart from the XADDs, so that the number removed is known and kept: a letter
        // that vanished silently would be a dead id nobody can find.
        pipe.cmd("XTRIM")
            .arg(&*self.key)
            .arg("MAXLEN")
            .arg("~")
            .arg(self.cap);
        let mut conn = self.store.conn();
        let mut replies: Vec<Value> = pipe.query_async(&mut conn).await?;
        let trimmed = match replies.pop() {
            Some(Value::Int(n)) if n > 0 => n as u64,
            _ => 0,
        };
        if trimmed > 0 {
            let _: i64 = redis::cmd("INCRBY")
                .arg(&*self.trimmed_key)
                .arg(trimmed)
                .query_async(&mut conn)
                .await?;
        }
        let entries = replies
            .into_iter()
            .map(|v| {
                redis::from_redis_value(v)
                    .map_err(|e| StoreError::Reply(format!("dead letters: {e}")))
            })
            .collect::<Result<Vec<String>, _>>()?;
        Ok((entries, trimmed))
    }

    /// How many letters the stream's cap has removed so far.
    pub async fn trimmed(&self) -> Result<u64, StoreError> {
        let mut conn = self.store.conn();
        let n: Option<u64> = redis::cmd("GET")
            .arg(&*self.trimmed_key)
            .query_async(&mut conn)
            .await?;
        Ok(n.unwrap_or(0))
    }

    /// The cap the stream is trimmed to.
    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// The newest `count` letters, newest first.
    pub async fn list(&self, count: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let mut conn = self.store.conn();
        let v: Value = redis::cmd("XREVRANGE")
            .arg(&*self.key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut conn)
            .await?;
        parse_entries(v)
    }

    /// All letters, oldest first (for `replay --all`).
    pub async fn all(&self) -> Result<Vec<DeadLetter>, StoreError> {
        let mut conn = self.store.conn();
        let v: Value = redis::cmd("XRANGE")
            .arg(&*self.key)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await?;
        parse_entries(v)
    }

    /// One letter by its entry id.
    pub async fn get(&self, entry: &str) -> Result<Option<DeadLetter>, StoreError> {
        let mut conn = self.store.conn();
        let v: Value = redis::cmd("XRANGE")
            .arg(&*self.key)
            .arg(entry)
            .arg(entry)
            .query_async(&mut conn)
            .await?;
        Ok(parse_entries(v)?.pop())
    }

    /// Removes a letter (after a successful replay).
    pub async fn remove(&self, entry: &str) -> Result<bool, StoreError> {
        let mut conn = self.store.conn();
        let n: i64 = redis::cmd("XDEL")
            .arg(&*self.key)
            .arg(entry)
            .query_async(&mut conn)
            .await?;
        Ok(n == 1)
    }

    /// How many letters the stream holds.
    pub async fn count(&self) -> Result<u64, StoreError> {
        let mut conn = self.store.conn();
        Ok(redis::cmd("XLEN")
            .arg(&*self.key)
            .query_async(&mut conn)
            .await?)
    }
}

fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn parse_entries(v: Value) -> Result<Vec<DeadLetter>, StoreError> {
    let bad = |what: &str| StoreError::Reply(format!("dead letters: {what}"));
    let Value::Array(entries) = v else {
        return Err(bad("not an array"));
    };
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let Value::Array(parts) = e else {
            return Err(bad("entry"));
        };
        let [id, Value::Array(fields)] = parts.as_slice() else {
            return Err(bad("entry shape"));
        };
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let mut l = DeadLetter {
            entry: bytes(id).map(text).ok_or_else(|| bad("entry id"))?,
            message_id: None,
            business_id: None,
            reason: String::new(),
            side: String::new(),
            topic: String::new(),
            partition: 0,
            offset: 0,
            attempts: 0,
            payload: Vec::new(),
        };
        for pair in fields.chunks(2) {
            let (Some(k), Some(v)) = (pair.first().and_then(bytes), pair.get(1).and_then(bytes))
            else {
                continue;
            };
            let s = || text(v);
            match k {
                b"id" if !v.is_empty() => l.message_id = Some(s()),
                b"bid" if !v.is_empty() => l.business_id = Some(s()),
                b"reason" => l.reason = s(),
                b"side" => l.side = s(),
                b"topic" => l.topic = s(),
                b"partition" => l.partition = s().parse().unwrap_or(0),
                b"offset" => l.offset = s().parse().unwrap_or(0),
                b"attempts" => l.attempts = s().parse().unwrap_or(0),
                b"payload" => l.payload = v.to_vec(),
                _ => {}
            }
        }
        out.push(l);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing;
    use proptest::prelude::*;

    const FIELDS: &[&str] = &[
        "id",
        "bid",
        "reason",
        "side",
        "topic",
        "partition",
        "offset",
        "attempts",
        "payload",
    ];

    #[test]
    fn entries_read_back_with_numbers_that_do_not_fit_as_zero() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("1-0"),
            Value::Array(
                [
                    ("id", "m-1"),
                    ("bid", ""),
                    ("reason", "HTTP 400"),
                    ("partition", "99999999999"),
                    ("offset", "-3"),
                    ("attempts", "x"),
                    ("payload", "{}"),
                    ("lonely", ""),
                ]
                .iter()
                .flat_map(|(k, v)| [bulk(k), bulk(v)])
                .chain([bulk("odd")])
                .collect(),
            ),
        ])]);
        let l = parse_entries(reply).unwrap().remove(0);
        assert_eq!(
            (l.message_id.as_deref(), l.business_id, l.reason.as_str()),
            (Some("m-1"), None, "HTTP 400")
        );
        assert_eq!((l.partition, l.offset, l.attempts), (0, -3, 0));
        assert_eq!(l.payload, b"{}");
    }

    proptest! {
        #![proptest_config(fuzzing::config(1))]

        /// Whatever Redis answers (a foreign key of the same name, a newer server, a bug), reading
        /// dead letters gives letters or an error, never a panic.
        #[test]
        fn fuzz_dead_letter_replies(reply in fuzzing::redis_value()) {
            let _ = parse_entries(reply);
        }

    }

    proptest! {
        #![proptest_config(fuzzing::config(4))]

        /// Entries of the right shape always read, one letter each, whatever their fields hold.
        #[test]
        fn fuzz_dead_letter_entries(entries in prop::collection::vec(fuzzing::stream_entry(FIELDS), 0..6)) {
            let n = entries.len();
            let letters = parse_entries(Value::Array(entries)).unwrap();
            prop_assert_eq!(letters.len(), n);
        }
    }

    #[test]
    fn tiny_dead_letter_stream_is_rejected() {
        let e = DeadLettersConfig { max_len: 3 }.validate().unwrap_err();
        assert_eq!(e.key, "dead_letters.max_len");
        DeadLettersConfig { max_len: 100 }.validate().unwrap();
    }
}
