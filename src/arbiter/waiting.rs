//! The adoption index: per side, the copies that side acknowledged while their owner had not
//! observed the id yet (a claim answered NOT_MINE with the owner unseen), kept by position so that
//! the side can read the copy again and adopt the id should the owner's copy never come (DESIGN.md
//! invariant 2; docs/arbiter.md, "Adoption").
//!
//! Keys: `<prefix>:{adopt:<side>:<n>}` for `n` in `0..SHARDS`, sorted sets whose members are a
//! copy's position and id, scored by when the entry is next due (ms since the epoch). An id's shard
//! is a hash of the id, so the index spreads over a Cluster's slots and several instances of a side
//! can sweep it apart: each shard is swept by the instance holding its lock
//! (`<prefix>:{adopt:<side>:<n>}:lock`). An entry leaves the index only once the id's fate no
//! longer needs this side: the owner observed it, or it is done, dead (with its letter), or gone.
//!
//! Memory: one member per waiting copy (its id, the topic and a few numbers: roughly 100 bytes
//! with the sorted set's own overhead). In steady operation entries live about [`FIRST_CHECK`]:
//! the owner's copy comes within that and the first check removes the entry. Only ids whose owner
//! is late (a lagging consumer, a broker outage) or whose copy never comes stay until adoption.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::Value;

use crate::source::Position;
use crate::store::{Conn, StoreError};

/// How many sorted sets hold a side's index.
pub const SHARDS: u32 = 16;

/// When a new entry is first looked at: by then the owner's copy has nearly always come.
pub const FIRST_CHECK: Duration = Duration::from_secs(5);

/// The separator of a member's fields; topic and broker names never contain it.
const SEP: char = '\u{1f}';

/// One waiting copy: the id, and where this side's copy of it sits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitEntry {
    /// The cross-broker message id.
    pub id: String,
    /// The copy's position in this side's broker.
    pub position: Position,
}

impl WaitEntry {
    /// The sorted-set member: `offset␟partition␟topic␟broker␟id`, the id last because it may hold
    /// anything (it comes from a producer).
    pub fn member(&self) -> String {
        let p = &self.position;
        format!(
            "{}{SEP}{}{SEP}{}{SEP}{}{SEP}{}",
            p.offset,
            p.partition,
            p.topic,
            p.broker.as_deref().unwrap_or(""),
            self.id
        )
    }

    /// Reads a member back; `None` if it is not one this module wrote.
    pub fn parse(member: &str) -> Option<WaitEntry> {
        let mut parts = member.splitn(5, SEP);
        let offset = parts.next()?.parse().ok()?;
        let partition = parts.next()?.parse().ok()?;
        let topic = parts.next()?;
        let broker = parts.next()?;
        let id = parts.next()?;
        if topic.is_empty() || id.is_empty() {
            return None;
        }
        Some(WaitEntry {
            id: id.to_owned(),
            position: Position {
                topic: topic.into(),
                partition,
                offset,
                broker: (!broker.is_empty()).then(|| broker.into()),
            },
        })
    }
}

/// The shard of an id: FNV-1a of its bytes. Stable across versions (entries written by one
/// version are swept by the next), but nothing else depends on it.
pub fn shard_of(id: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in id.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % SHARDS
}

/// Milliseconds since the epoch, by this machine's clock (the scripts that decide use Redis's).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A side's adoption index.
#[derive(Clone)]
pub struct Waiting {
    conn: Conn,
    prefix: String,
    side: String,
}

impl Waiting {
    /// The index of `side`, next to the records of `arbiter`.
    pub fn new(arbiter: &super::Arbiter, side: &str) -> Waiting {
        let (conn, prefix) = arbiter.conn();
        Waiting {
            conn,
            prefix: prefix.to_owned(),
            side: side.to_owned(),
        }
    }

    /// The side.
    pub fn side(&self) -> &str {
        &self.side
    }

    /// The key of shard `n`.
    pub fn key(&self, n: u32) -> String {
        format!("{}:{{adopt:{}:{n}}}", self.prefix, self.side)
    }

    /// Adds entries, first due at `due_ms`; an entry already there keeps its due time. One
    /// `ZADD` per shard touched, in one round trip on standalone Redis (concurrent on Cluster,
    /// where each shard is its own slot).
    pub async fn add(&self, entries: &[WaitEntry], due_ms: u64) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut by_shard: Vec<Vec<String>> = vec![Vec::new(); SHARDS as usize];
        for e in entries {
            by_shard[shard_of(&e.id) as usize].push(e.member());
        }
        let cmds: Vec<redis::Cmd> = by_shard
            .iter()
            .enumerate()
            .filter(|(_, m)| !m.is_empty())
            .map(|(n, members)| {
                let mut c = redis::cmd("ZADD");
                c.arg(self.key(n as u32)).arg("NX");
                for m in members {
                    c.arg(due_ms).arg(m);
                }
                c
            })
            .collect();
        self.send_all(cmds).await
    }

    /// Takes or keeps shard `n`'s lock for `holder` for `ttl`; true if `holder` has it now.
    pub async fn lock(&self, n: u32, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        // One script keeps the check and the extension together (one slot: the shard's).
        const LOCK: &str = "local v = redis.call('GET', KEYS[1]) \
            if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end \
            if v then return 0 end \
            redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1";
        let mut conn = self.conn.clone();
        let got: i64 = redis::Script::new(LOCK)
            .key(format!("{}:lock", self.key(n)))
            .arg(holder)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await?;
        Ok(got == 1)
    }

    /// Lets shard `n`'s lock go, if `holder` has it (at shutdown, so another instance takes over
    /// at once).
    pub async fn unlock(&self, n: u32, holder: &str) -> Result<(), StoreError> {
        const UNLOCK: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
            redis.call('DEL', KEYS[1]) end return 1";
        let mut conn = self.conn.clone();
        let _: i64 = redis::Script::new(UNLOCK)
            .key(format!("{}:lock", self.key(n)))
            .arg(holder)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Up to `limit` entries of shard `n` due by `now_ms`, earliest first, with their members
    /// (what [`Waiting::resolve`] and [`Waiting::later`] take). Members this version cannot read
    /// are returned as `None` entries, so that the caller can drop them.
    pub async fn due(
        &self,
        n: u32,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<(String, Option<WaitEntry>)>, StoreError> {
        let mut conn = self.conn.clone();
        let members: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.key(n))
            .arg("-inf")
            .arg(now_ms)
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut conn)
            .await?;
        Ok(members
            .into_iter()
            .map(|m| {
                let e = WaitEntry::parse(&m);
                (m, e)
            })
            .collect())
    }

    /// Removes entries of shard `n`: their ids no longer need this side.
    pub async fn resolve(&self, n: u32, members: &[String]) -> Result<(), StoreError> {
        if members.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let _: i64 = redis::cmd("ZREM")
            .arg(self.key(n))
            .arg(members)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Makes entries of shard `n` due again at `at_ms` (only those still there).
    pub async fn later(&self, n: u32, members: &[(String, u64)]) -> Result<(), StoreError> {
        if members.is_empty() {
            return Ok(());
        }
        let mut c = redis::cmd("ZADD");
        c.arg(self.key(n)).arg("XX");
        for (m, at) in members {
            c.arg(*at).arg(m);
        }
        let mut conn = self.conn.clone();
        let _: Value = c.query_async(&mut conn).await?;
        Ok(())
    }

    /// How many entries the whole index holds (every shard).
    pub async fn count(&self) -> Result<u64, StoreError> {
        let cmds = (0..SHARDS)
            .map(|n| {
                let mut c = redis::cmd("ZCARD");
                c.arg(self.key(n));
                c
            })
            .collect();
        let counts = self.query_all::<u64>(cmds).await?;
        Ok(counts.into_iter().sum())
    }

    /// Sends commands whose answers do not matter.
    async fn send_all(&self, cmds: Vec<redis::Cmd>) -> Result<(), StoreError> {
        self.query_all::<Value>(cmds).await.map(drop)
    }

    /// Sends commands to (possibly) different slots: one pipeline on standalone Redis, concurrent
    /// requests on Cluster (a pipeline there must stay within one node).
    async fn query_all<T: redis::FromRedisValue>(
        &self,
        cmds: Vec<redis::Cmd>,
    ) -> Result<Vec<T>, StoreError> {
        if let Conn::Cluster(_) = &self.conn {
            let each = futures::future::join_all(cmds.iter().map(|c| {
                let mut conn = self.conn.clone();
                async move { c.query_async::<T>(&mut conn).await }
            }))
            .await;
            return each
                .into_iter()
                .map(|r| r.map_err(StoreError::from))
                .collect();
        }
        let mut pipe = redis::Pipeline::with_capacity(cmds.len());
        for c in cmds {
            pipe.add_command(c);
        }
        let mut conn = self.conn.clone();
        Ok(pipe.query_async(&mut conn).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, broker: Option<&str>) -> WaitEntry {
        WaitEntry {
            id: id.into(),
            position: Position {
                topic: "reward".into(),
                partition: 3,
                offset: 12_345,
                broker: broker.map(Into::into),
            },
        }
    }

    #[test]
    fn members_read_back_whatever_the_id_holds() {
        for id in ["m-1", "a\u{1f}b", "x y|z", "ü\n"] {
            for broker in [None, Some("broker-a")] {
                let e = entry(id, broker);
                assert_eq!(WaitEntry::parse(&e.member()), Some(e.clone()), "{id:?}");
            }
        }
    }

    #[test]
    fn foreign_members_are_not_entries() {
        for m in [
            "",
            "x",
            "1\u{1f}2",
            "a\u{1f}1\u{1f}t\u{1f}\u{1f}id",
            "1\u{1f}2\u{1f}\u{1f}\u{1f}id",
        ] {
            assert_eq!(WaitEntry::parse(m), None, "{m:?}");
        }
    }

    #[test]
    fn shards_are_stable_and_spread() {
        // Frozen: entries written by one version are swept by the next.
        assert_eq!(shard_of("m-1"), shard_of("m-1"));
        assert_eq!(shard_of(""), 0x811c_9dc5 % SHARDS);
        let used: std::collections::BTreeSet<u32> =
            (0..1000).map(|i| shard_of(&format!("id-{i}"))).collect();
        assert_eq!(used.len(), SHARDS as usize);
    }
}
