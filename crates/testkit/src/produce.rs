//! The traffic generator behind `mqc-kit produce`: dual-writes messages to both brokers the
//! way a migrating producer does, with the faults such producers really show — re-sent
//! duplicates on either side, one side missing some messages, one side lagging, and malformed
//! messages — and writes a manifest of what went where, for tests and the demo to check against.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use mq_cutover::config::{IdSource, SideConfig, SideKind, Validated};
use mq_cutover::source::kafka::KafkaWriter;
use mq_cutover::source::rocketmq::RocketMqWriter;

/// `mqc-kit produce` options.
#[derive(Debug, Clone, clap::Args)]
pub struct ProduceArgs {
    /// How many logical messages (ids) to send.
    #[arg(long, default_value_t = 1000)]
    pub count: u64,
    /// Prefix of the generated message ids (default: `m-<unix seconds>`).
    #[arg(long)]
    pub id_prefix: Option<String>,
    /// How many distinct business ids (users) the messages spread over.
    #[arg(long, default_value_t = 1000)]
    pub users: u64,
    /// Share of messages the old side's producer sends twice (a timed-out send re-sent).
    #[arg(long, default_value_t = 0.0)]
    pub duplicates_old: f64,
    /// Share of messages the new side's producer sends twice.
    #[arg(long, default_value_t = 0.0)]
    pub duplicates_new: f64,
    /// Share of messages the old side never gets.
    #[arg(long, default_value_t = 0.0)]
    pub missing_old: f64,
    /// Share of messages the new side never gets.
    #[arg(long, default_value_t = 0.0)]
    pub missing_new: f64,
    /// Delay the new side's copies by this much (negative skew: use --lag-old).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub lag_new: Option<Duration>,
    /// Delay the old side's copies by this much.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub lag_old: Option<Duration>,
    /// Extra malformed messages (no message id) sent to each side.
    #[arg(long, default_value_t = 0)]
    pub malformed: u64,
    /// Messages per second (0: as fast as the brokers take them).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Seed of the fault decisions, for reproducible runs.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Put the send time in each body as `"sent_us"` (microseconds since the Unix epoch), for
    /// end-to-end times at the receiving end (`mqc-kit grant-counter`).
    #[arg(long)]
    pub stamp: bool,
    /// Write one JSON line per id here: `{"id", "user", "old": copies, "new": copies}` as
    /// planned, before sending; rewritten at the end with `"old_sent"` and `"new_sent"`, the
    /// copies each broker acknowledged.
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// Keep sending a copy that fails for this long (a broker restart), then give it up: it is
    /// counted as not written (`Sent::given_up`, the manifest's `old_sent` / `new_sent`) and the
    /// run goes on. Without it a copy is tried 5 times and the run stops at the first one that
    /// cannot be written.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub give_up_after: Option<Duration>,
}

/// What was sent, per side.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// Copies written (duplicates included).
    pub copies: u64,
    /// Ids that got two copies.
    pub duplicated: u64,
    /// Ids that got none.
    pub missing: u64,
    /// Copies given up after `--give-up-after` of failed tries (not counted in `copies`).
    pub given_up: u64,
}

enum Writer {
    Kafka(Box<KafkaWriter>, String),
    RocketMq(Box<RocketMqWriter>, String),
}

impl Writer {
    async fn connect(side: &SideConfig) -> anyhow::Result<Writer> {
        Ok(match side.kind {
            SideKind::Kafka => {
                let k = side
                    .kafka
                    .as_ref()
                    .context("kafka side without [side.kafka]")?;
                Writer::Kafka(
                    Box::new(
                        KafkaWriter::connect_with(
                            &k.bootstrap_servers,
                            mq_cutover::source::kafka::connection_properties(&k.properties),
                        )
                        .map_err(|e| anyhow::anyhow!("{}: {e}", side.name))?,
                    ),
                    k.topics[0].clone(),
                )
            }
            SideKind::Rocketmq => {
                let r = side
                    .rocketmq
                    .as_ref()
                    .context("rocketmq side without [side.rocketmq]")?;
                Writer::RocketMq(
                    Box::new(
                        RocketMqWriter::connect_side(r, &format!("{}-producer", r.group), None)
                            .await
                            .map_err(|e| anyhow::anyhow!("{}: {e}", side.name))?,
                    ),
                    r.topic.clone(),
                )
            }
        })
    }

    /// Sends one copy; a send that fails is tried again (5 times, or for `give_up_after`), as
    /// a real producer would — which may itself leave a duplicate in the broker, exactly like in
    /// production.
    async fn send(
        &self,
        key: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        give_up_after: Option<Duration>,
    ) -> anyhow::Result<()> {
        let started = tokio::time::Instant::now();
        let mut wait = Duration::from_millis(100);
        for attempt in 1.. {
            match self.send_once(key, headers, body).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let last = match give_up_after {
                        Some(limit) => started.elapsed() + wait > limit,
                        None => attempt >= 5,
                    };
                    if last {
                        return Err(e);
                    }
                    // One line per copy would flood the log through a broker restart.
                    if attempt == 1 || attempt % 10 == 0 {
                        tracing::warn!(error = %e, attempt, "send failed; sending again");
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(MAX_SEND_BACKOFF);
                }
            }
        }
        unreachable!("the loop returns")
    }

    async fn send_once(
        &self,
        key: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> anyhow::Result<()> {
        match self {
            Writer::Kafka(w, topic) => w
                .send(topic, key, headers, body)
                .await
                .map_err(|e| anyhow::anyhow!("kafka send: {e}")),
            Writer::RocketMq(w, topic) => w
                .send(topic, None, key, headers, body)
                .await
                .map_err(|e| anyhow::anyhow!("rocketmq send: {e}")),
        }
    }

    async fn close(self) {
        match self {
            Writer::Kafka(w, _) => w.flush().await,
            Writer::RocketMq(w, _) => (*w).shutdown().await,
        }
    }
}

/// One id's fate: how many copies each side gets.
struct Plan {
    id: String,
    user: String,
    old: u8,
    new: u8,
}

/// The longest wait between two tries of one copy.
const MAX_SEND_BACKOFF: Duration = Duration::from_secs(2);

/// Sends in flight per side when sending as fast as possible. Kafka's producer batches what
/// arrives within `linger.ms` (5 ms), so with 64 a side wrote at most about 12,800 messages/s
/// (10,600 ids/s to both brokers, measured on 2 cores); with 512, 34,000 ids/s.
const SENDS_IN_FLIGHT: usize = 512;
/// Sends in flight per side at a set `--rate`. With 512 there, at 2,500 ids/s the Kafka broker
/// took 18–28 % of the 2 cores instead of 8 %, and the copies' end-to-end p99 went from 10–20 ms
/// to 420–460 ms (the benchmark's latency scenario, 2026-11-30): a load generator that disturbs
/// what it measures.
const SENDS_IN_FLIGHT_AT_RATE: usize = 64;

/// Sends one side's copies (after its lag), then its malformed messages. Returns the copies the
/// broker acknowledged, per plan, and how many were given up.
async fn send_side(
    w: &Writer,
    cfg: &SideConfig,
    plans: &[Plan],
    which: fn(&Plan) -> u8,
    lag: Option<Duration>,
    args: &ProduceArgs,
) -> anyhow::Result<(Vec<u8>, u64)> {
    if let Some(l) = lag {
        tokio::time::sleep(l).await;
    }
    let start = tokio::time::Instant::now();
    let rate = args.rate;
    let jobs = plans
        .iter()
        .enumerate()
        .flat_map(|(i, p)| std::iter::repeat_n((i, p), usize::from(which(p))));
    let mut stream = futures::stream::iter(jobs)
        .map(|(i, p)| async move {
            if rate > 0 {
                let at = start + Duration::from_secs_f64(i as f64 / rate as f64);
                tokio::time::sleep_until(at).await;
            }
            let (headers, body) = encode(cfg, &p.id, &p.user, 10, args.stamp);
            let h: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            (i, w.send(&p.user, &h, &body, args.give_up_after).await)
        })
        .buffer_unordered(if rate > 0 {
            SENDS_IN_FLIGHT_AT_RATE
        } else {
            SENDS_IN_FLIGHT
        });
    let mut sent = vec![0u8; plans.len()];
    let mut given_up = 0;
    while let Some((i, r)) = stream.next().await {
        match r {
            Ok(()) => sent[i] += 1,
            Err(e) if args.give_up_after.is_some() => {
                tracing::warn!(error = %e, id = %plans[i].id, "copy given up");
                given_up += 1;
            }
            Err(e) => return Err(e),
        }
    }
    for n in 0..args.malformed {
        // No message id anywhere: no headers, and not JSON.
        w.send(
            "malformed",
            &[],
            format!("malformed payload {n}").as_bytes(),
            args.give_up_after,
        )
        .await?;
    }
    Ok((sent, given_up))
}

/// Sets `value` at JSON pointer `ptr` in `doc`, creating objects on the way.
fn set_pointer(doc: &mut Value, ptr: &str, value: Value) {
    let mut at = doc;
    let parts: Vec<String> = ptr
        .split('/')
        .skip(1)
        .map(|p| p.replace("~1", "/").replace("~0", "~"))
        .collect();
    for (i, part) in parts.iter().enumerate() {
        if !at.is_object() {
            *at = json!({});
        }
        let obj = at.as_object_mut().expect("made an object");
        if i + 1 == parts.len() {
            obj.insert(part.clone(), value);
            return;
        }
        at = obj.entry(part.clone()).or_insert_with(|| json!({}));
    }
}

/// One copy's headers and body for `side`, carrying the ids where the side reads them.
fn encode(
    side: &SideConfig,
    id: &str,
    user: &str,
    amount: u64,
    stamp: bool,
) -> (Vec<(String, String)>, Vec<u8>) {
    let mut headers = Vec::new();
    let mut body = json!({ "amount": amount });
    if stamp {
        let sent_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        body["sent_us"] = json!(sent_us);
    }
    for (src, v) in [(&side.message_id, id), (&side.business_id, user)] {
        match src {
            IdSource::Header(h) => headers.push((h.clone(), v.to_owned())),
            IdSource::JsonPointer(p) => set_pointer(&mut body, p, Value::String(v.to_owned())),
        }
    }
    (headers, serde_json::to_vec(&body).expect("json"))
}

/// Dual-writes `args.count` messages to the old and the new side of `cfg`. Returns what was
/// sent to (old, new).
pub async fn produce(cfg: &Validated, args: &ProduceArgs) -> anyhow::Result<(Sent, Sent)> {
    let old_cfg = cfg
        .sides
        .iter()
        .find(|s| s.name == cfg.cutover.from)
        .expect("validated");
    let new_cfg = cfg
        .sides
        .iter()
        .find(|s| s.name == cfg.cutover.to)
        .expect("validated");
    let old = Writer::connect(old_cfg).await?;
    let new = Writer::connect(new_cfg).await?;
    let prefix = args.id_prefix.clone().unwrap_or_else(|| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        format!("m-{secs}")
    });
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut manifest = match &args.manifest {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };

    // Decide every id's fate first (reproducible from the seed), then send.
    let copies = |rng: &mut StdRng, missing: f64, dup: f64| -> u8 {
        if rng.random_bool(missing.clamp(0.0, 1.0)) {
            0
        } else if rng.random_bool(dup.clamp(0.0, 1.0)) {
            2
        } else {
            1
        }
    };
    let plans: Vec<Plan> = (0..args.count)
        .map(|n| {
            let old = copies(&mut rng, args.missing_old, args.duplicates_old);
            let new = copies(&mut rng, args.missing_new, args.duplicates_new);
            Plan {
                id: format!("{prefix}-{n}"),
                user: format!("u-{}", rng.random_range(0..args.users.max(1))),
                old,
                new,
            }
        })
        .collect();
    let (mut sent_old, mut sent_new) = (Sent::default(), Sent::default());
    for p in &plans {
        for (n, s) in [(p.old, &mut sent_old), (p.new, &mut sent_new)] {
            s.copies += u64::from(n);
            s.duplicated += u64::from(n == 2);
            s.missing += u64::from(n == 0);
        }
        if let Some(m) = manifest.as_mut() {
            writeln!(
                m,
                "{}",
                json!({"id": p.id, "user": p.user, "old": p.old, "new": p.new})
            )?;
        }
    }
    if let Some(mut m) = manifest.take() {
        m.flush()?;
    }

    let (a, b) = tokio::join!(
        send_side(&old, old_cfg, &plans, |p| p.old, args.lag_old, args),
        send_side(&new, new_cfg, &plans, |p| p.new, args.lag_new, args),
    );
    old.close().await;
    new.close().await;
    let (acked_old, given_up_old) = a.context("writing to the old side")?;
    let (acked_new, given_up_new) = b.context("writing to the new side")?;
    sent_old.given_up = given_up_old;
    sent_old.copies -= given_up_old;
    sent_new.given_up = given_up_new;
    sent_new.copies -= given_up_new;
    if let Some(path) = &args.manifest {
        write_manifest(path, &plans, &acked_old, &acked_new)?;
    }
    Ok((sent_old, sent_new))
}

/// The manifest again, with the copies each broker acknowledged (`old_sent`, `new_sent`);
/// replaced in one rename, so a reader never sees half of it.
fn write_manifest(
    path: &std::path::Path,
    plans: &[Plan],
    acked_old: &[u8],
    acked_new: &[u8],
) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut m = std::io::BufWriter::new(
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
    );
    for ((p, old), new) in plans.iter().zip(acked_old).zip(acked_new) {
        writeln!(
            m,
            "{}",
            json!({"id": p.id, "user": p.user, "old": p.old, "new": p.new, "old_sent": old, "new_sent": new})
        )?;
    }
    m.flush()?;
    drop(m);
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointers_build_nested_objects() {
        let mut v = json!({"amount": 1});
        set_pointer(&mut v, "/order/id", json!("o-1"));
        set_pointer(&mut v, "/user_id", json!("u-1"));
        assert_eq!(
            v,
            json!({"amount": 1, "order": {"id": "o-1"}, "user_id": "u-1"})
        );
    }
}
