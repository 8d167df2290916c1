//! What the arbitration protocol costs per id, in isolation: Redis's CPU and this client's, for
//! the three script calls every id of a drain goes through, with nothing else on the connection.
//!
//! ```sh
//! cargo run --release --example arbiter_cost -- redis://127.0.0.1:16379 [IDS] [BATCH] [ROUNDS] [LAYOUT]
//! # a Redis Cluster: every master's URL, comma-separated (each id is its own call there)
//! cargo run --release --example arbiter_cost -- redis://127.0.0.1:17001,redis://127.0.0.1:17002,redis://127.0.0.1:17003
//! ```
//!
//! Each round takes IDS fresh ids (default 100,000) through the daemon's own [`Arbiter`], in
//! batches of BATCH (default 256, `pipeline.claim_batch`'s default), one batch at a time, as a
//! drain at percent 50 does:
//!
//! 1. `claim`: the first side's copies (every id's first sight; half of them are routed to the
//!    other side),
//! 2. `claim`: the second side's copies (the pair; the other half proceed),
//! 3. `complete`: each owner's success.
//!
//! For each phase it prints one JSON line: Redis's CPU µs per id (`INFO cpu` before and after,
//! summed over the servers given; this program is their only client), the commands Redis ran per id (`INFO stats`), and this
//! process's CPU µs per id (`/proc/self/task/*/schedstat`: building the calls, reading the
//! answers, one current-thread runtime). `scripts/bench` runs it against a private Redis and
//! prints the medians. Parity's sorted-set writes (about 0.5 commands per id in a drain) are not
//! part of it: the sightings are read from the claims' answers, not recorded.
//!
//! The Redis must be one nobody else uses while this runs (its `INFO` counts are the measure);
//! the records are deleted after each round.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use mq_cutover::arbiter::routing::{route, Route};
use mq_cutover::arbiter::switches::Switches;
use mq_cutover::arbiter::{
    Arbiter, Claim, ClaimRequest, CompleteRequest, Completion, LeaseToken, LeaseTokens, Outcome,
    State,
};
use mq_cutover::config::{ArbiterConfig, Percent, RecordLayout, RedisConfig};
use mq_cutover::store::Store;
use redis::aio::MultiplexedConnection;

/// The daemon's allocator, so that the client's CPU is the daemon's.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SIDES: [&str; 2] = ["kafka", "rocketmq"];

/// Redis's CPU seconds and the commands it has processed so far, summed over `nodes` (one
/// connection to each server: the standalone one, or every master of a cluster).
async fn redis_counters(nodes: &[MultiplexedConnection]) -> Result<(f64, u64)> {
    let (mut cpu, mut commands) = (0.0, 0);
    for node in nodes {
        let info: String = redis::cmd("INFO")
            .arg("all")
            .query_async(&mut node.clone())
            .await?;
        let field = |name: &str| -> Result<&str> {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
                .with_context(|| format!("INFO has no {name}"))
        };
        cpu += field("used_cpu_sys")?.parse::<f64>()? + field("used_cpu_user")?.parse::<f64>()?;
        commands += field("total_commands_processed")?.parse::<u64>()?;
    }
    Ok((cpu, commands))
}

/// This process's CPU time so far, ns, summed over its threads.
fn own_cpu_ns() -> Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task")? {
        let stat = std::fs::read_to_string(task?.path().join("schedstat"))?;
        total += stat
            .split_whitespace()
            .next()
            .context("empty schedstat")?
            .parse::<u64>()?;
    }
    Ok(total)
}

/// Measures `work` (which handles `ids` ids) and prints one JSON line for it.
async fn phase<F, Fut>(
    nodes: &[MultiplexedConnection],
    round: usize,
    name: &str,
    ids: usize,
    work: F,
) -> Result<()>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let (cpu0, cmds0) = redis_counters(nodes).await?;
    let own0 = own_cpu_ns()?;
    let t = Instant::now();
    work().await?;
    let wall = t.elapsed().as_secs_f64();
    let own1 = own_cpu_ns()?;
    let (cpu1, cmds1) = redis_counters(nodes).await?;
    let n = ids as f64;
    println!(
        "{}",
        serde_json::json!({
            "round": round,
            "phase": name,
            "ids": ids,
            "redis_cpu_us_per_id": (cpu1 - cpu0) * 1e6 / n,
            // The first snapshot's INFOs are counted in the second.
            "redis_commands_per_id": (cmds1 - cmds0 - nodes.len() as u64) as f64 / n,
            "client_cpu_us_per_id": (own1 - own0) as f64 / 1e3 / n,
            "wall_s": wall,
        })
    );
    Ok(())
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> Result<T> {
    match args.get(i) {
        None => Ok(default),
        Some(s) => s
            .parse()
            .map_err(|_| anyhow::anyhow!("argument {i} ({s:?}) is not a number")),
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let Some(urls) = args
        .get(1)
        .map(|u| u.split(',').map(str::to_owned).collect())
    else {
        bail!("usage: arbiter_cost REDIS_URL[,REDIS_URL...] [IDS] [BATCH] [ROUNDS] [packed|hash]");
    };
    let ids: usize = arg(&args, 2, 100_000)?;
    let batch: usize = arg(&args, 3, 256)?;
    let rounds: usize = arg(&args, 4, 3)?;
    let layout = match args.get(5).map_or("packed", String::as_str) {
        "packed" => RecordLayout::Packed,
        "hash" => RecordLayout::Hash,
        other => bail!("LAYOUT {other:?} is not one of: packed, hash"),
    };
    if ids == 0 || batch == 0 {
        bail!("IDS and BATCH must be at least 1");
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(urls, ids, batch, rounds, layout))
}

async fn run(
    urls: Vec<String>,
    ids: usize,
    batch: usize,
    rounds: usize,
    layout: RecordLayout,
) -> Result<()> {
    // Several URLs: a Redis Cluster, every one of them a master (each id is its own call there).
    let mode = if urls.len() > 1 {
        "cluster"
    } else {
        "standalone"
    };
    let mut nodes = Vec::new();
    for url in &urls {
        let client = redis::Client::open(url.as_str())?;
        nodes.push(client.get_multiplexed_async_connection().await?);
    }
    let nodes = &nodes;
    for round in 1..=rounds {
        let prefix = format!("cost{round}-{:08x}", rand::random::<u32>());
        let cfg: RedisConfig = serde_json::from_value(serde_json::json!({
            "mode": mode, "urls": urls, "key_prefix": prefix,
        }))?;
        let store = Store::connect(&cfg, false).await?;
        let arbiter = Arbiter::new(
            &store,
            &ArbiterConfig {
                record_layout: layout,
                ..ArbiterConfig::default()
            },
        );
        let tokens = LeaseTokens::default();
        let names: Vec<String> = (0..ids).map(|i| format!("u{round}-{i}")).collect();
        // The daemon's own routing at percent 50: half the ids to each side.
        let switches = Switches {
            consume: true,
            percent: Percent::try_from(50).map_err(anyhow::Error::msg)?,
            ..Switches::default()
        };
        let owner: Vec<&str> = names
            .iter()
            .map(|id| match route(&switches, id) {
                Route::Old => SIDES[0],
                Route::New => SIDES[1],
            })
            .collect();
        // The token each copy's claim would carry; the owner's is the one its completion names.
        let mut held: Vec<Option<LeaseToken>> = vec![None; ids];

        for (n, side) in SIDES.iter().enumerate() {
            let label = if n == 0 {
                "claim, first side"
            } else {
                "claim, second side"
            };
            let arbiter = &arbiter;
            let (names, owner, held, tokens) = (&names, &owner, &mut held, &tokens);
            phase(nodes, round, label, ids, || async move {
                for start in (0..ids).step_by(batch) {
                    let chunk = start..(start + batch).min(ids);
                    let copy: Vec<LeaseToken> = chunk.clone().map(|_| tokens.next()).collect();
                    let reqs: Vec<ClaimRequest<'_>> = chunk
                        .clone()
                        .zip(&copy)
                        .map(|(i, token)| ClaimRequest {
                            id: &names[i],
                            side,
                            routed_owner: owner[i],
                            token,
                        })
                        .collect();
                    let answers = arbiter.claim_batch(&reqs).await?;
                    for ((i, token), answer) in chunk.zip(copy).zip(answers) {
                        match answer? {
                            Claim::Proceed { .. } => held[i] = Some(token),
                            Claim::NotMine { .. } => {}
                            other => bail!("id {}: unexpected claim answer {other:?}", names[i]),
                        }
                    }
                }
                Ok(())
            })
            .await?;
        }

        let (arbiter_ref, names_ref, owner_ref, held_ref) = (&arbiter, &names, &owner, &held);
        phase(nodes, round, "complete", ids, || async move {
            for start in (0..ids).step_by(batch) {
                let chunk = start..(start + batch).min(ids);
                let mut reqs = Vec::with_capacity(chunk.len());
                for i in chunk.clone() {
                    let token = held_ref[i]
                        .as_ref()
                        .with_context(|| format!("id {}: nobody proceeded", names_ref[i]))?;
                    reqs.push(CompleteRequest {
                        id: &names_ref[i],
                        side: owner_ref[i],
                        token,
                        outcome: &Outcome::Success,
                    });
                }
                for (i, answer) in chunk.zip(arbiter_ref.complete_batch(&reqs).await?) {
                    match answer? {
                        Completion::Recorded(State::Done) => {}
                        other => bail!("id {}: unexpected completion {other:?}", names_ref[i]),
                    }
                }
            }
            Ok(())
        })
        .await?;

        // Leave the server as it was found: one key per command, which a cluster routes too.
        for chunk in names.chunks(1000) {
            let gone = futures::future::join_all(chunk.iter().map(|id| {
                let mut conn = store.conn();
                let key = mq_cutover::arbiter::record_key(&prefix, id);
                async move {
                    redis::cmd("UNLINK")
                        .arg(key)
                        .query_async::<()>(&mut conn)
                        .await
                }
            }))
            .await;
            gone.into_iter().collect::<Result<Vec<()>, _>>()?;
        }
    }
    Ok(())
}
