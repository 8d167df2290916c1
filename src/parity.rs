//! Parity: the dual-read check an operator runs before each cut-over step (DESIGN.md, "Parity").
//!
//! While both brokers carry the same messages, every id reaches both sides. The claim script
//! tells each side whether its copy is its first sight of an id and whether the other side had
//! seen it ([`Sighting`]); after each claim batch the pipeline hands those sights to the
//! [`Recorder`], which pairs what it can itself and sends the rest here, one script call per side
//! and flush (per [`SEND_CHUNK`] sights). Kept in Redis, under `<prefix>:{parity}:` (one Cluster
//! slot):
//!
//! - `min:<minute>` and `day:<day>`: hashes side → ids first seen by that side whose message was
//!   stamped in that minute / day (the broker timestamp, so that both copies of a dual-written
//!   message count in the same bucket however far apart the sides consume them). Minute buckets
//!   live `minute_retention`, day buckets `day_retention`.
//! - `open:<side>`: ids seen by this side only, scored by when they were first seen. The other
//!   side's first sight removes the id. An id still there after `grace` is a parity gap.
//! - `paired:<side>`: ids whose pair completed before this side's first sight was recorded (the
//!   two record calls raced); this side's record then skips them.
//! - `untracked:<side>`: ids left unlisted because `open:<side>` held `max_open_ids` already.
//!
//! Memory is bounded: at most `max_open_ids` members per side in each sorted set, members older
//! than the id retention trimmed on every write, and a fixed number of bucket hashes (one per
//! minute of `minute_retention`, one per day of `day_retention`).

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::store::{Conn, Store, StoreError};

pub use crate::arbiter::Sighting;

pub mod config;
mod recorder;

pub use config::ParityConfig;
pub use recorder::{Recorder, HOLD};

const MINUTE_MS: u64 = 60_000;
const DAY_MS: u64 = 86_400_000;
/// The most minute buckets one report reads (a day); longer reports use the day buckets.
const MAX_REPORT_MINUTES: u64 = 1_440;
/// Most ids one record script call carries. A call holds Redis for its whole run (about 2 µs an
/// id), and every other client of that Redis waits meanwhile: in 500s, a flush of the hold's
/// 100,000 sights at shutdown is 200 calls of about a millisecond each, not one call of 200 ms
/// in which no claim of any instance is answered. It is also the script's own chunk, so each
/// call's variadic commands are one per kind.
pub const SEND_CHUNK: usize = 500;

/// One side's first sight of an id, as the claim reported it.
#[derive(Debug, Clone, Copy)]
pub struct Sight<'a> {
    /// The cross-broker message id.
    pub id: &'a str,
    /// The message's broker timestamp, ms since the epoch (0: unknown, the current time is used).
    pub born_ms: i64,
    /// True when the other side had seen the id already ([`Sighting::Pair`]).
    pub pair: bool,
}

/// The parity records of one deployment (both sides).
#[derive(Clone)]
pub struct Parity {
    conn: Conn,
    base: String,
    sides: [String; 2],
    cfg: ParityConfig,
    retention_ms: u64,
    record: std::sync::Arc<redis::Script>,
}

impl Parity {
    /// The records under `store`'s prefix for the two sides of `cfg.cutover`.
    pub fn new(store: &Store, cfg: &crate::config::Validated) -> Parity {
        Parity::with(
            store,
            [cfg.cutover.from.clone(), cfg.cutover.to.clone()],
            cfg.parity.clone(),
            cfg.arbiter.retention,
        )
    }

    /// The records of `sides` (old first), keeping one-sided ids as long as id records
    /// (`retention`).
    pub fn with(
        store: &Store,
        sides: [String; 2],
        cfg: ParityConfig,
        retention: Duration,
    ) -> Parity {
        Parity {
            conn: store.conn(),
            base: format!("{}:{{parity}}", store.prefix()),
            sides,
            cfg,
            retention_ms: retention.as_millis() as u64,
            record: std::sync::Arc::new(redis::Script::new(include_str!(
                "arbiter/scripts/parity_record.lua"
            ))),
        }
    }

    /// The two sides, old first.
    pub fn sides(&self) -> &[String; 2] {
        &self.sides
    }

    /// The grace period.
    pub fn grace(&self) -> Duration {
        self.cfg.grace
    }

    /// 0 for the old side, 1 for the new one.
    fn index(&self, side: &str) -> usize {
        usize::from(side != self.sides[0])
    }

    fn other(&self, side: &str) -> &str {
        if side == self.sides[0] {
            &self.sides[1]
        } else {
            &self.sides[0]
        }
    }

    /// Records `side`'s first sights at once, without the [`Recorder`]'s hold (the daemon's
    /// sights go through the recorder; this is its direct path).
    pub async fn record(&self, side: &str, sights: &[Sight<'_>]) -> Result<(), StoreError> {
        let mut counts = Counts::default();
        let now = now_ms();
        for s in sights {
            counts.add(s.born_ms, now);
        }
        let marks: Vec<(&str, bool)> = sights.iter().map(|s| (s.id, s.pair)).collect();
        self.send(side, &counts, &marks, Duration::ZERO).await
    }

    /// Sends `side`'s counts, and the ids it saw first (`pair` false) or completed the pair of
    /// (`pair` true) at least `held` ago, in record script calls of at most [`SEND_CHUNK`] ids,
    /// one after the other and in order (the counts go with the first). Each call is atomic on
    /// its own; the script applies its ids as if one after the other, so the chunks in order are
    /// the same as one call. An error stops at that chunk: the ones before it are recorded.
    async fn send(
        &self,
        side: &str,
        counts: &Counts,
        marks: &[(&str, bool)],
        held: Duration,
    ) -> Result<(), StoreError> {
        if counts.is_empty() && marks.is_empty() {
            return Ok(());
        }
        let none = Counts::default();
        let mut chunks = marks.chunks(SEND_CHUNK);
        // No ids but counts: one call that carries only the counts.
        let first = chunks.next().unwrap_or_default();
        let other = self.other(side);
        let mut arg = Vec::with_capacity(64);
        for (counts, marks) in std::iter::once((counts, first)).chain(chunks.map(|c| (&none, c))) {
            let mut inv = self.record.prepare_invoke();
            inv.key(format!("{}:open:{side}", self.base))
                .key(format!("{}:open:{other}", self.base))
                .key(format!("{}:paired:{side}", self.base))
                .key(format!("{}:paired:{other}", self.base))
                .key(format!("{}:untracked:{side}", self.base));
            for (m, _) in &counts.minutes {
                inv.key(format!("{}:min:{m}", self.base));
            }
            for (d, _) in &counts.days {
                inv.key(format!("{}:day:{d}", self.base));
            }
            inv.arg(side)
                .arg(self.cfg.max_open_ids)
                .arg(self.retention_ms)
                .arg(self.cfg.minute_retention.as_millis() as u64)
                .arg(self.cfg.day_retention.as_millis() as u64)
                .arg(counts.minutes.len())
                .arg(held.as_millis() as u64);
            for (_, n) in counts.minutes.iter().chain(&counts.days) {
                inv.arg(*n);
            }
            for (id, pair) in marks {
                arg.clear();
                arg.push(if *pair { b'p' } else { b'f' });
                arg.extend_from_slice(id.as_bytes());
                inv.arg(&arg[..]);
            }
            let mut conn = self.conn.clone();
            let _unlisted: i64 = inv.invoke_async(&mut conn).await?;
        }
        Ok(())
    }

    /// Counts `n` ids adopted by `side` (its routed owner never observed them): the report
    /// shows them beside the one-sided ids they once were.
    pub async fn add_adopted(&self, side: &str, n: u64) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = redis::cmd("HINCRBY")
            .arg(format!("{}:adopted", self.base))
            .arg(side)
            .arg(n)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Ids seen by one side only for longer than the grace period, and ids left unlisted, per
    /// side (for the gap metrics).
    pub async fn gaps(&self) -> Result<Vec<SideGap>, StoreError> {
        let cutoff = now_ms().saturating_sub(self.cfg.grace.as_millis() as u64);
        let mut pipe = redis::pipe();
        for side in &self.sides {
            pipe.zcount(format!("{}:open:{side}", self.base), "-inf", cutoff)
                .get(format!("{}:untracked:{side}", self.base));
        }
        let mut conn = self.conn.clone();
        let replies: Vec<Option<u64>> = pipe.query_async(&mut conn).await?;
        Ok(self
            .sides
            .iter()
            .enumerate()
            .map(|(i, side)| SideGap {
                side: side.clone(),
                one_sided: replies[2 * i].unwrap_or(0),
                untracked: replies[2 * i + 1].unwrap_or(0),
            })
            .collect())
    }

    /// The report since `since_ms`: counts per minute (when the span is a day or less and the
    /// minute buckets still exist) and per day, and the one-sided ids first seen since then,
    /// listing at most `limit` per side.
    pub async fn report(&self, since_ms: u64, limit: usize) -> Result<ParityReport, StoreError> {
        let now = now_ms();
        let since_ms = since_ms.min(now);
        let minute_floor = now.saturating_sub(self.cfg.minute_retention.as_millis() as u64);
        let by_minute =
            since_ms >= minute_floor && (now - since_ms) / MINUTE_MS <= MAX_REPORT_MINUTES;
        let minute_ids: Vec<u64> = if by_minute {
            (since_ms / MINUTE_MS..=now / MINUTE_MS).collect()
        } else {
            Vec::new()
        };
        let day_ids: Vec<u64> = (since_ms / DAY_MS..=now / DAY_MS).collect();
        let cutoff = now.saturating_sub(self.cfg.grace.as_millis() as u64);

        let mut pipe = redis::pipe();
        for m in &minute_ids {
            pipe.hgetall(format!("{}:min:{m}", self.base));
        }
        for d in &day_ids {
            pipe.hgetall(format!("{}:day:{d}", self.base));
        }
        for side in &self.sides {
            let key = format!("{}:open:{side}", self.base);
            pipe.cmd("ZRANGE")
                .arg(&key)
                .arg(since_ms)
                .arg(cutoff)
                .arg("BYSCORE")
                .arg("LIMIT")
                .arg(0)
                .arg(limit)
                .arg("WITHSCORES");
            pipe.zcount(&key, since_ms, cutoff);
            pipe.get(format!("{}:untracked:{side}", self.base));
        }
        pipe.hgetall(format!("{}:adopted", self.base));
        let mut conn = self.conn.clone();
        let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
        let mut replies = replies.into_iter();
        // The next replies, one per bucket, as the non-empty buckets of `unit` ms.
        let mut buckets = |ids: &[u64], unit: u64| -> Result<Vec<Bucket>, StoreError> {
            let mut out = Vec::new();
            for id in ids {
                let counts: BTreeMap<String, u64> = decode(replies.next())?;
                if !counts.is_empty() {
                    out.push(Bucket {
                        start_ms: id * unit,
                        counts,
                    });
                }
            }
            Ok(out)
        };
        let minutes = buckets(&minute_ids, MINUTE_MS)?;
        let days = buckets(&day_ids, DAY_MS)?;
        let mut report = ParityReport {
            since_ms,
            until_ms: now,
            grace_ms: self.cfg.grace.as_millis() as u64,
            sides: self.sides.to_vec(),
            totals_from: if by_minute { "minutes" } else { "days" }.to_owned(),
            totals: BTreeMap::new(),
            minutes,
            days,
            one_sided: Vec::new(),
            one_sided_total: BTreeMap::new(),
            untracked: BTreeMap::new(),
            truncated: false,
            adopted: BTreeMap::new(),
        };
        for side in &self.sides {
            let listed: Vec<(String, f64)> = decode(replies.next())?;
            let total: u64 = decode(replies.next())?;
            let untracked: Option<u64> = decode(replies.next())?;
            report.truncated |= (listed.len() as u64) < total;
            report
                .one_sided
                .extend(listed.into_iter().map(|(id, score)| OneSided {
                    side: side.clone(),
                    id,
                    first_seen_ms: score as u64,
                }));
            report.one_sided_total.insert(side.clone(), total);
            report
                .untracked
                .insert(side.clone(), untracked.unwrap_or(0));
            let source = if by_minute {
                &report.minutes
            } else {
                &report.days
            };
            let sum = source
                .iter()
                .map(|b| b.counts.get(side).copied().unwrap_or(0))
                .sum();
            report.totals.insert(side.clone(), sum);
        }
        report.adopted = decode(replies.next())?;
        Ok(report)
    }
}

fn decode<T: redis::FromRedisValue>(v: Option<redis::Value>) -> Result<T, StoreError> {
    redis::from_redis_value(v.unwrap_or(redis::Value::Nil))
        .map_err(|e| StoreError::Reply(format!("parity: {e}")))
}

/// First sights per minute and per day bucket, of one side.
#[derive(Debug, Default)]
struct Counts {
    minutes: Vec<(u64, u64)>,
    days: Vec<(u64, u64)>,
}

impl Counts {
    /// Counts one first sight of a message stamped `born_ms` (0: unknown, `now` is used).
    fn add(&mut self, born_ms: i64, now: u64) {
        let born = if born_ms > 0 { born_ms as u64 } else { now };
        bump(&mut self.minutes, born / MINUTE_MS);
        bump(&mut self.days, born / DAY_MS);
    }

    fn is_empty(&self) -> bool {
        self.minutes.is_empty()
    }
}

fn bump(buckets: &mut Vec<(u64, u64)>, bucket: u64) {
    match buckets.iter_mut().find(|(b, _)| *b == bucket) {
        Some((_, n)) => *n += 1,
        None => buckets.push((bucket, 1)),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One side's gap, for the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SideGap {
    /// The side.
    pub side: String,
    /// Ids seen by this side only for longer than the grace period.
    pub one_sided: u64,
    /// Ids left unlisted because the list was full.
    pub untracked: u64,
}

/// Counts of one time bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    /// Start of the bucket, ms since the epoch.
    pub start_ms: u64,
    /// Side → ids first seen by that side whose message was stamped in this bucket.
    pub counts: BTreeMap<String, u64>,
}

/// An id seen by one side only for longer than the grace period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OneSided {
    /// The side that saw it.
    pub side: String,
    /// The cross-broker message id.
    pub id: String,
    /// When that side first saw it, ms since the epoch.
    pub first_seen_ms: u64,
}

/// What `mq-cutover parity` prints and `GET /api/parity` returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParityReport {
    /// Start of the span, ms since the epoch.
    pub since_ms: u64,
    /// End of the span (when the report was made).
    pub until_ms: u64,
    /// The grace period, ms.
    pub grace_ms: u64,
    /// The two sides, old first.
    pub sides: Vec<String>,
    /// `minutes` or `days`: which buckets the totals are summed from.
    pub totals_from: String,
    /// Side → ids first seen in the span.
    pub totals: BTreeMap<String, u64>,
    /// Per-minute counts (empty buckets left out).
    pub minutes: Vec<Bucket>,
    /// Per-day counts (empty buckets left out).
    pub days: Vec<Bucket>,
    /// One-sided ids, listed up to the limit per side.
    pub one_sided: Vec<OneSided>,
    /// Side → one-sided ids in the span (listed or not).
    pub one_sided_total: BTreeMap<String, u64>,
    /// Side → ids left unlisted because the list was full (whenever that was).
    pub untracked: BTreeMap<String, u64>,
    /// True when `one_sided` does not list every one-sided id.
    pub truncated: bool,
    /// Side → ids that side adopted because their routed owner never observed them (since the
    /// deployment began; docs/arbiter.md, "Adoption").
    #[serde(default)]
    pub adopted: BTreeMap<String, u64>,
}

impl ParityReport {
    /// No one-sided id and nothing unlisted.
    pub fn is_clean(&self) -> bool {
        self.one_sided_total.values().all(|n| *n == 0) && self.untracked.values().all(|n| *n == 0)
    }
}

fn clock(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

impl fmt::Display for ParityReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b] = [&self.sides[0], &self.sides[1]];
        writeln!(
            f,
            "parity from {} to {} (grace {})",
            clock(self.since_ms),
            clock(self.until_ms),
            humantime::format_duration(Duration::from_millis(self.grace_ms))
        )?;
        let row = |f: &mut fmt::Formatter<'_>, label: &str, c: &BTreeMap<String, u64>| {
            let (x, y) = (
                c.get(a).copied().unwrap_or(0),
                c.get(b).copied().unwrap_or(0),
            );
            writeln!(
                f,
                "  {label:<22} {x:>10} {y:>10} {:>+10}",
                y as i64 - x as i64
            )
        };
        writeln!(f, "  {:<22} {a:>10} {b:>10} {:>10}", "bucket (UTC)", "diff")?;
        let buckets = if self.totals_from == "minutes" {
            &self.minutes
        } else {
            &self.days
        };
        for bucket in buckets {
            let label = clock(bucket.start_ms);
            let label = if self.totals_from == "minutes" {
                &label[..16]
            } else {
                &label[..10]
            };
            row(f, label, &bucket.counts)?;
        }
        row(f, "total", &self.totals)?;
        let total: u64 = self.one_sided_total.values().sum();
        if total == 0 {
            writeln!(
                f,
                "no id seen by one side only for longer than the grace period"
            )?;
        } else {
            writeln!(
                f,
                "{total} id(s) seen by one side only for longer than the grace period:"
            )?;
            for side in &self.sides {
                let n = self.one_sided_total.get(side).copied().unwrap_or(0);
                writeln!(f, "  only on {side}: {n}")?;
                for o in self.one_sided.iter().filter(|o| &o.side == side) {
                    writeln!(f, "    {}  first seen {}", o.id, clock(o.first_seen_ms))?;
                }
            }
            if self.truncated {
                writeln!(f, "  (list truncated: raise --limit to see more)")?;
            }
        }
        for (side, n) in &self.untracked {
            if *n > 0 {
                writeln!(
                    f,
                    "{n} one-sided id(s) on {side} were not listed: the list was full (parity.max_open_ids)"
                )?;
            }
        }
        for (side, n) in &self.adopted {
            if *n > 0 {
                writeln!(
                    f,
                    "{n} id(s) adopted by {side} so far: their routed owner never observed them (`inspect` shows each)"
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> ParityReport {
        let counts = |x: u64, y: u64| BTreeMap::from([("kafka".into(), x), ("rocketmq".into(), y)]);
        ParityReport {
            since_ms: 1_700_000_000_000,
            until_ms: 1_700_000_120_000,
            grace_ms: 300_000,
            sides: vec!["kafka".into(), "rocketmq".into()],
            totals_from: "minutes".into(),
            totals: counts(200, 198),
            minutes: vec![
                Bucket {
                    start_ms: 1_699_999_980_000,
                    counts: counts(100, 100),
                },
                Bucket {
                    start_ms: 1_700_000_040_000,
                    counts: counts(100, 98),
                },
            ],
            days: vec![],
            one_sided: vec![OneSided {
                side: "kafka".into(),
                id: "order-7".into(),
                first_seen_ms: 1_700_000_050_000,
            }],
            one_sided_total: counts(2, 0),
            untracked: counts(0, 0),
            truncated: true,
            adopted: BTreeMap::new(),
        }
    }

    #[test]
    fn the_text_report_names_the_one_sided_ids_and_the_differences() {
        let text = report().to_string();
        assert!(text.contains("2023-11-14T22:14"), "{text}");
        assert!(text.contains("       100         98         -2"), "{text}");
        assert!(text.contains("total"), "{text}");
        assert!(text.contains("only on kafka: 2"), "{text}");
        assert!(
            text.contains("order-7  first seen 2023-11-14T22:14:10Z"),
            "{text}"
        );
        assert!(text.contains("list truncated"), "{text}");
        assert!(!report().is_clean());
    }

    #[test]
    fn buckets_count_per_bucket() {
        let mut b = Vec::new();
        for m in [5, 5, 6, 5] {
            bump(&mut b, m);
        }
        assert_eq!(b, vec![(5, 3), (6, 1)]);
    }
}
