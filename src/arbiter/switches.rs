//! The switches (consume on/off, percentage, whitelist), kept in Redis so every instance shares
//! them, changed atomically with an audit entry, and followed by every instance through pub/sub
//! with a periodic re-read as the safety net.
//!
//! Keys (all with the `{ctl}` hash tag, one cluster slot): `<prefix>:{ctl}:switches` (hash:
//! consume, percent, version, at, by), `<prefix>:{ctl}:whitelist` (set),
//! `<prefix>:{ctl}:audit` (stream, capped). Channel: `<prefix>:switches`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use redis::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::arbiter::config::{InitialSwitches, Percent};
use crate::store::{Store, StoreError};

/// How many audit entries are kept (approximately: Redis trims in whole nodes).
pub const AUDIT_CAP: u32 = 10_000;

/// The switches as one instance knows them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Switches {
    /// Off: everything goes to the old side.
    pub consume: bool,
    /// Share of business-id buckets routed to the new side.
    pub percent: Percent,
    /// Business ids routed to the new side whatever the percentage (while consume is on).
    pub whitelist: HashSet<String>,
    /// Bumped on every change; 0 means nothing was ever set.
    pub version: u64,
    /// When the last change was made, ms since the Unix epoch (Redis clock); 0 if never.
    pub changed_at_ms: u64,
}

impl Switches {
    /// What identifies this state of the switches for a cheap "changed?" check.
    fn stamp(&self) -> String {
        format!("{}:{}", self.version, self.changed_at_ms)
    }
}

impl std::fmt::Display for Switches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "consume {}, percent {}, whitelist {} id(s) (version {})",
            if self.consume { "on" } else { "off" },
            self.percent,
            self.whitelist.len(),
            self.version
        )
    }
}

/// A change to the switches; `None` fields stay as they are.
#[derive(Debug, Clone, Default)]
pub struct SwitchChange {
    /// New consume switch.
    pub consume: Option<bool>,
    /// New percentage.
    pub percent: Option<Percent>,
    /// Whitelist edit.
    pub whitelist: Option<WhitelistEdit>,
}

/// An edit of the whitelist.
#[derive(Debug, Clone)]
pub enum WhitelistEdit {
    /// Add these business ids.
    Add(Vec<String>),
    /// Remove these business ids.
    Remove(Vec<String>),
}

/// One audit trail entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// Milliseconds since the Unix epoch (from the stream entry id).
    pub at_ms: u64,
    /// Who and from where.
    pub by: String,
    /// `switches`, `release`, …
    pub action: String,
    /// What changed, old → new.
    pub detail: String,
}

/// Reads and writes the switches of one deployment (one key prefix).
#[derive(Clone)]
pub struct SwitchStore {
    store: Store,
    keys: Arc<[String; 3]>,
    channel: Arc<str>,
    set_script: redis::Script,
    get_script: redis::Script,
}

impl SwitchStore {
    /// The switches under `store`'s key prefix.
    pub fn new(store: &Store) -> Self {
        let p = store.prefix();
        Self {
            store: store.clone(),
            keys: Arc::new([
                format!("{p}:{{ctl}}:switches"),
                format!("{p}:{{ctl}}:whitelist"),
                format!("{p}:{{ctl}}:audit"),
            ]),
            channel: format!("{p}:switches").into(),
            set_script: redis::Script::new(include_str!("scripts/switch_set.lua")),
            get_script: redis::Script::new(include_str!("scripts/switch_get.lua")),
        }
    }

    /// The pub/sub channel changes are announced on.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Reads the switches in one round trip.
    pub async fn get(&self) -> Result<Switches, StoreError> {
        Ok(self
            .get_if_changed(None)
            .await?
            .expect("an unknown version always reads in full"))
    }

    /// Reads the switches unless they are still those of `known` (then `None`).
    pub async fn get_if_changed(
        &self,
        known: Option<&Switches>,
    ) -> Result<Option<Switches>, StoreError> {
        let mut conn = self.store.conn();
        let reply: Value = self
            .get_script
            .key(&self.keys[0])
            .key(&self.keys[1])
            .arg(known.map(Switches::stamp).unwrap_or_default())
            .invoke_async(&mut conn)
            .await?;
        parse_switches(reply)
    }

    /// Applies `change` atomically, audited as done `by` (who, from where). Returns the new
    /// version, or `None` when nothing actually changed (no audit entry, no notification).
    pub async fn set(&self, change: &SwitchChange, by: &str) -> Result<Option<u64>, StoreError> {
        let (op, ids): (&str, &[String]) = match &change.whitelist {
            None => ("", &[]),
            Some(WhitelistEdit::Add(ids)) => ("add", ids),
            Some(WhitelistEdit::Remove(ids)) => ("remove", ids),
        };
        self.run_set(
            by,
            change.consume.map(|c| if c { "1" } else { "0" }),
            change.percent.map(|p| p.get().to_string()),
            op,
            ids,
        )
        .await
    }

    /// Writes `initial` only if no switches exist yet (a brand-new deployment); audited.
    pub async fn seed(
        &self,
        initial: &InitialSwitches,
        by: &str,
    ) -> Result<Option<u64>, StoreError> {
        self.run_set(
            by,
            Some(if initial.consume { "1" } else { "0" }),
            Some(initial.percent.get().to_string()),
            "seed",
            &initial.whitelist,
        )
        .await
    }

    async fn run_set(
        &self,
        by: &str,
        consume: Option<&str>,
        percent: Option<String>,
        op: &str,
        ids: &[String],
    ) -> Result<Option<u64>, StoreError> {
        let mut inv = self.set_script.prepare_invoke();
        for k in self.keys.iter() {
            inv.key(k);
        }
        inv.arg(by)
            .arg(&*self.channel)
            .arg(AUDIT_CAP)
            .arg(consume.unwrap_or(""))
            .arg(percent.unwrap_or_default())
            .arg(op);
        for id in ids {
            inv.arg(id);
        }
        let mut conn = self.store.conn();
        let (version, changed): (u64, i64) = inv.invoke_async(&mut conn).await?;
        Ok((changed == 1).then_some(version))
    }

    /// Appends an entry to the audit trail (for actions that are not switch changes).
    pub async fn audit(&self, by: &str, action: &str, detail: &str) -> Result<(), StoreError> {
        let mut conn = self.store.conn();
        let _: String = redis::cmd("XADD")
            .arg(&self.keys[2])
            .arg("MAXLEN")
            .arg("~")
            .arg(AUDIT_CAP)
            .arg("*")
            .arg("by")
            .arg(by)
            .arg("action")
            .arg(action)
            .arg("detail")
            .arg(detail)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// The newest `count` audit entries, newest first.
    pub async fn audit_log(&self, count: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let mut conn = self.store.conn();
        let reply: Value = redis::cmd("XREVRANGE")
            .arg(&self.keys[2])
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut conn)
            .await?;
        audit_entries(reply)
    }
}

/// The audit entries of an `XREVRANGE` reply; anything but stream entries is an error.
pub(super) fn audit_entries(reply: Value) -> Result<Vec<AuditEntry>, StoreError> {
    let entries: Vec<(String, Vec<(String, String)>)> =
        redis::FromRedisValue::from_redis_value(reply)
            .map_err(|e| StoreError::Reply(format!("audit trail: {e}")))?;
    Ok(entries
        .into_iter()
        .map(|(id, fields)| {
            let mut e = AuditEntry {
                at_ms: id
                    .split('-')
                    .next()
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(0),
                by: String::new(),
                action: String::new(),
                detail: String::new(),
            };
            for (k, v) in fields {
                match k.as_str() {
                    "by" => e.by = v,
                    "action" => e.action = v,
                    "detail" => e.detail = v,
                    _ => {}
                }
            }
            e
        })
        .collect())
}

pub(super) fn parse_switches(reply: Value) -> Result<Option<Switches>, StoreError> {
    let bad = |what: &str| StoreError::Reply(format!("switches: {what}"));
    let Value::Array(items) = reply else {
        return Err(bad("not an array"));
    };
    if items.len() == 1 {
        return Ok(None);
    }
    let text = |v: &Value| -> Option<String> {
        match v {
            Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
            Value::Int(n) => Some(n.to_string()),
            Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        }
    };
    let mut it = items.iter();
    let version = it
        .next()
        .and_then(text)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| bad("version"))?;
    let consume = it.next().and_then(text).ok_or_else(|| bad("consume"))? == "1";
    let percent = it
        .next()
        .and_then(text)
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| bad("percent"))?;
    let changed_at_ms = it
        .next()
        .and_then(text)
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| bad("changed_at_ms"))?;
    let whitelist = it.filter_map(text).collect();
    Ok(Some(Switches {
        consume,
        percent,
        whitelist,
        version,
        changed_at_ms,
    }))
}

/// Who is acting, for the audit trail: `<what>:<user>@<host>`.
pub fn actor(what: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown-host".into());
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("{what}:{user}@{host}")
}

/// Follows the switches for one instance: `None` until first read, then the latest known.
pub type SwitchFeed = watch::Receiver<Option<Arc<Switches>>>;

/// Starts following the switches: a pub/sub subscription for prompt changes plus a re-read every
/// `refresh` as a safety net. While Redis is away, or if it comes back without the switches, the
/// last known switches stay in force. Stops when `cancel` fires.
pub fn follow(
    switches: SwitchStore,
    refresh: Duration,
    cancel: CancellationToken,
) -> (SwitchFeed, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(None);
    let task = tokio::spawn(follow_loop(switches, refresh, cancel, tx));
    (rx, task)
}

async fn follow_loop(
    switches: SwitchStore,
    refresh: Duration,
    cancel: CancellationToken,
    tx: watch::Sender<Option<Arc<Switches>>>,
) {
    let mut tick = tokio::time::interval(refresh);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut notes: Option<redis::aio::PubSubStream> = None;
    let mut next_subscribe = Instant::now();
    let mut failing = false;
    loop {
        if notes.is_none() && Instant::now() >= next_subscribe {
            match subscribe(&switches).await {
                Ok(s) => notes = Some(s),
                Err(e) => {
                    tracing::debug!(error = %e, "switch notifications unavailable; re-reading every {:?}", refresh);
                    next_subscribe = Instant::now() + refresh.max(Duration::from_secs(1));
                }
            }
        }
        let notified = async {
            match notes.as_mut() {
                Some(s) => s.next().await.is_some(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            got = notified => {
                if !got {
                    // The subscription connection dropped; re-read now, re-subscribe soon.
                    notes = None;
                }
            }
            _ = tick.tick() => {}
        }
        let known = tx.borrow().clone();
        match switches.get_if_changed(known.as_deref()).await {
            Ok(Some(new)) if new.version == 0 && known.as_ref().is_some_and(|k| k.version > 0) => {
                // Redis came back without its data. Falling back to "all off" would reroute new
                // ids behind the operator's back: keep what was in force and say so.
                if !failing {
                    tracing::error!(
                        "switches vanished from redis (data lost?); keeping the last known; \
                         set them again with `mq-cutover switch set`"
                    );
                    failing = true;
                }
            }
            Ok(Some(new)) => {
                if failing {
                    tracing::info!("switches readable again");
                    failing = false;
                }
                let old = tx.borrow().clone();
                if old.as_deref() != Some(&new) {
                    match old {
                        Some(old) => tracing::info!(from = %old, to = %new, "switches changed"),
                        None => tracing::info!(switches = %new, "switches loaded"),
                    }
                    tx.send_replace(Some(Arc::new(new)));
                }
            }
            Ok(None) => {
                if failing {
                    tracing::info!("switches readable again");
                    failing = false;
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot read switches; keeping the last known");
                    failing = true;
                }
            }
        }
    }
}

async fn subscribe(switches: &SwitchStore) -> Result<redis::aio::PubSubStream, StoreError> {
    let mut ps = switches.store.pubsub().await?;
    ps.subscribe(switches.channel()).await?;
    Ok(ps.into_on_message())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn unchanged_version_reads_as_none() {
        assert_eq!(
            parse_switches(Value::Array(vec![Value::Int(4)])).unwrap(),
            None
        );
    }

    #[test]
    fn full_reply_reads_all_fields() {
        let s = parse_switches(Value::Array(vec![
            Value::Int(7),
            bulk("1"),
            bulk("25"),
            bulk("1700000000000"),
            bulk("u1"),
            bulk("u2"),
        ]))
        .unwrap()
        .unwrap();
        assert!(s.consume);
        assert_eq!(s.percent.get(), 25);
        assert_eq!(s.version, 7);
        assert_eq!(s.whitelist.len(), 2);
        assert!(s.whitelist.contains("u2"));
    }

    #[test]
    fn out_of_range_percent_in_redis_is_an_error() {
        assert!(parse_switches(Value::Array(vec![
            Value::Int(1),
            bulk("1"),
            bulk("250"),
            bulk("0")
        ]))
        .is_err());
    }
}
