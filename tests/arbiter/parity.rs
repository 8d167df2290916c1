//! The parity records on real Redis: what the claim script reports as first sights, and what the
//! record script keeps (pairs cancel, in either order; redeliveries do not count; the list is
//! capped and the rest counted), and what the recorder in front of it spares Redis.

use std::time::Duration;

use mq_cutover::arbiter::{Arbiter, ClaimRequest, LeaseTokens, Sighting};
use mq_cutover::config::{AmbiguousPolicy, RedisMode};
use mq_cutover::parity::{Parity, ParityConfig, Recorder, Sight};
use tokio_util::sync::CancellationToken;

use crate::common;

fn sides() -> [String; 2] {
    ["kafka".into(), "rocketmq".into()]
}

fn parity(store: &mq_cutover::store::Store, cap: u64) -> Parity {
    let cfg = ParityConfig {
        // Everything counts as past the grace period at once.
        grace: Duration::from_millis(1),
        max_open_ids: cap,
        ..ParityConfig::default()
    };
    Parity::with(store, sides(), cfg, Duration::from_secs(600))
}

fn first(id: &str) -> Sight<'_> {
    Sight {
        id,
        born_ms: 0,
        pair: false,
    }
}

fn pair(id: &str) -> Sight<'_> {
    Sight {
        id,
        born_ms: 0,
        pair: true,
    }
}

async fn one_sided(p: &Parity) -> Vec<(String, String)> {
    tokio::time::sleep(Duration::from_millis(5)).await;
    let r = p.report(0, 1000).await.expect("report");
    let mut v: Vec<(String, String)> = r.one_sided.into_iter().map(|o| (o.side, o.id)).collect();
    v.sort();
    v
}

async fn claims_report_first_sights(mode: RedisMode) {
    let prefix = common::unique_prefix("parity-sight");
    let store = common::connect(mode, &prefix).await;
    let arbiter = Arbiter::new(
        &store,
        &common::arbiter_config(Duration::from_secs(5), AmbiguousPolicy::AtLeastOnce, 5),
    );
    let tokens = LeaseTokens::default();
    let sighting = |side: &'static str| {
        let arbiter = arbiter.clone();
        let token = tokens.next();
        async move {
            let req = ClaimRequest {
                id: "p-1",
                side,
                routed_owner: "kafka",
                token: &token,
            };
            let mut r = arbiter.claim_batch_sighted(&[req]).await.expect("claim");
            r.pop().unwrap().expect("claim").1
        }
    };
    assert_eq!(sighting("kafka").await, Sighting::First);
    assert_eq!(sighting("kafka").await, Sighting::Again, "a redelivery");
    assert_eq!(sighting("rocketmq").await, Sighting::Pair);
    assert_eq!(sighting("rocketmq").await, Sighting::Again);
    common::cleanup(&store_urls(mode), &prefix);
}

fn store_urls(mode: RedisMode) -> Vec<String> {
    common::testbed_urls(mode)
}

async fn pairs_cancel_in_either_order_and_the_list_is_capped(mode: RedisMode) {
    let prefix = common::unique_prefix("parity-record");
    let store = common::connect(mode, &prefix).await;
    let p = parity(&store, 3);

    // In order: kafka first, then rocketmq completes the pair.
    p.record("kafka", &[first("a"), first("b")]).await.unwrap();
    p.record("rocketmq", &[pair("a")]).await.unwrap();
    assert_eq!(one_sided(&p).await, vec![("kafka".into(), "b".into())]);

    // The race: rocketmq's "pair" record lands before kafka's "first" record of the same id.
    p.record("rocketmq", &[pair("c")]).await.unwrap();
    p.record("kafka", &[first("c")]).await.unwrap();
    assert_eq!(one_sided(&p).await, vec![("kafka".into(), "b".into())]);

    // The other direction.
    p.record("rocketmq", &[first("d")]).await.unwrap();
    assert_eq!(
        one_sided(&p).await,
        vec![
            ("kafka".into(), "b".into()),
            ("rocketmq".into(), "d".into())
        ]
    );

    // The cap: kafka already lists "b"; three more fit up to 3, the rest is counted.
    p.record("kafka", &[first("e"), first("f"), first("g"), first("h")])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await; // past the 1 ms grace
    let r = p.report(0, 1000).await.unwrap();
    assert_eq!(r.one_sided_total["kafka"], 3);
    assert_eq!(r.untracked["kafka"], 2);
    assert_eq!(r.untracked["rocketmq"], 0);
    let gaps = p.gaps().await.unwrap();
    assert_eq!((gaps[0].one_sided, gaps[0].untracked), (3, 2));
    assert_eq!((gaps[1].one_sided, gaps[1].untracked), (1, 0));

    // Counts: kafka first-saw a, b, c, e, f, g, h (7), rocketmq a, c, d (3), all this minute.
    assert_eq!(r.totals["kafka"], 7);
    assert_eq!(r.totals["rocketmq"], 3);
    assert!(!r.is_clean());
    common::cleanup(&store_urls(mode), &prefix);
}

/// One record call applies its ids as if one after the other, in the order given: a pair that
/// comes twice cancels the first sight once and leaves a note for the second, a first sight that
/// comes twice is listed once, and both kinds mix in one call.
async fn a_batch_is_applied_as_if_one_id_after_another(mode: RedisMode) {
    let prefix = common::unique_prefix("parity-batch");
    let store = common::connect(mode, &prefix).await;
    let p = parity(&store, 100);

    p.record("kafka", &[first("a"), first("b"), first("b")])
        .await
        .unwrap();
    assert_eq!(
        one_sided(&p).await,
        vec![("kafka".into(), "a".into()), ("kafka".into(), "b".into())]
    );
    // `a` twice: the first cancels kafka's sight, the second finds nothing to cancel and leaves a
    // note in paired:kafka, exactly as a second call would have.
    p.record("rocketmq", &[pair("a"), first("c"), pair("a"), pair("b")])
        .await
        .unwrap();
    assert_eq!(one_sided(&p).await, vec![("rocketmq".into(), "c".into())]);
    // The note: kafka's next first sight of `a` (a redelivery that claimed as new) is not listed.
    p.record("kafka", &[first("a"), first("d")]).await.unwrap();
    assert_eq!(
        one_sided(&p).await,
        vec![
            ("kafka".into(), "d".into()),
            ("rocketmq".into(), "c".into())
        ]
    );
    common::cleanup(&store_urls(mode), &prefix);
}

/// A first sight per id is one `ZADD` per batch (in chunks of 500), not one per id, and the
/// pairs that cancel them one `ZMSCORE` and one `ZREM` per chunk; batches larger than a chunk
/// lose nothing. A batch larger than a chunk goes in one script call per chunk, so that no call
/// holds Redis long, and its counts are added once.
#[tokio::test]
async fn large_batches_cost_a_few_commands_and_lose_nothing() {
    assert_eq!(mq_cutover::parity::SEND_CHUNK, 500);
    let (_redis, store) = private_store("parity-large").await;
    let p = parity(&store, 5_000);
    let ids: Vec<String> = (0..1_200).map(|i| format!("id-{i}")).collect();
    let firsts: Vec<Sight<'_>> = ids.iter().map(|id| first(id)).collect();
    let pairs: Vec<Sight<'_>> = ids.iter().map(|id| pair(id)).collect();

    p.record("kafka", &firsts).await.unwrap();
    // Each run of the record script asks Redis for the time once.
    assert_eq!(calls(&store, "time").await, 3, "1,200 ids: 3 script calls");
    tokio::time::sleep(Duration::from_millis(5)).await; // past the 1 ms grace
    let r = p.report(0, 10).await.unwrap();
    assert_eq!(r.one_sided_total["kafka"], 1_200);
    assert_eq!(r.totals["kafka"], 1_200, "counted once, not once per call");
    assert_eq!(r.untracked["kafka"], 0);
    assert_eq!(
        calls(&store, "zadd").await,
        3,
        "1,200 first sights: 3 chunks"
    );

    p.record("rocketmq", &pairs).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let r = p.report(0, 10).await.unwrap();
    assert_eq!(
        r.one_sided_total["kafka"], 0,
        "every pair cancelled its sight"
    );
    assert_eq!(r.one_sided_total["rocketmq"], 0);
    assert_eq!(calls(&store, "zmscore").await, 3);
    assert_eq!(calls(&store, "zrem").await, 3);
    assert_eq!(calls(&store, "zadd").await, 3, "no pair needed a note");
    assert_eq!(calls(&store, "time").await, 6);
    assert_eq!(r.totals["rocketmq"], 1_200);
}

async fn counts_fall_in_the_buckets_of_the_broker_timestamp(mode: RedisMode) {
    let prefix = common::unique_prefix("parity-buckets");
    let store = common::connect(mode, &prefix).await;
    let p = parity(&store, 100);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let minute = now - now % 60_000;
    let sights = [
        Sight {
            id: "x",
            born_ms: minute - 120_000 + 5,
            pair: false,
        },
        Sight {
            id: "y",
            born_ms: minute - 120_000 + 50_000,
            pair: false,
        },
        Sight {
            id: "z",
            born_ms: minute - 60_000,
            pair: false,
        },
    ];
    p.record("kafka", &sights).await.unwrap();
    p.record("rocketmq", &[pair("x"), pair("y"), pair("z")])
        .await
        .unwrap();
    let r = p.report((minute - 180_000) as u64, 10).await.unwrap();
    let kafka: Vec<(u64, u64)> = r
        .minutes
        .iter()
        .map(|b| (b.start_ms, b.counts.get("kafka").copied().unwrap_or(0)))
        .collect();
    let m = minute as u64;
    // rocketmq's pairs carry no timestamp here, so they count in the current minute.
    assert_eq!(kafka, vec![(m - 120_000, 2), (m - 60_000, 1), (m, 0)]);
    assert!(r.is_clean(), "{r}");
    common::cleanup(&store_urls(mode), &prefix);
}

#[tokio::test]
async fn claims_report_first_sights_standalone() {
    claims_report_first_sights(RedisMode::Standalone).await;
}

#[tokio::test]
async fn claims_report_first_sights_cluster() {
    claims_report_first_sights(RedisMode::Cluster).await;
}

#[tokio::test]
async fn parity_records_standalone() {
    pairs_cancel_in_either_order_and_the_list_is_capped(RedisMode::Standalone).await;
    a_batch_is_applied_as_if_one_id_after_another(RedisMode::Standalone).await;
    counts_fall_in_the_buckets_of_the_broker_timestamp(RedisMode::Standalone).await;
}

#[tokio::test]
async fn parity_records_cluster() {
    pairs_cancel_in_either_order_and_the_list_is_capped(RedisMode::Cluster).await;
    a_batch_is_applied_as_if_one_id_after_another(RedisMode::Cluster).await;
    counts_fall_in_the_buckets_of_the_broker_timestamp(RedisMode::Cluster).await;
}

/// A store on a Redis of its own (kept alive by the first value), so that its command counts are
/// the test's alone.
async fn private_store(name: &str) -> (common::PrivateRedis, mq_cutover::store::Store) {
    let redis = common::PrivateRedis::start();
    let prefix = common::unique_prefix(name);
    let cfg = common::redis_config_for(RedisMode::Standalone, vec![redis.url()], &prefix);
    let store = mq_cutover::store::Store::connect(&cfg, false)
        .await
        .unwrap();
    (redis, store)
}

/// How many times Redis ran `command` (from `INFO commandstats`).
async fn calls(store: &mq_cutover::store::Store, command: &str) -> u64 {
    let mut conn = store.conn();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
}

#[tokio::test]
async fn the_recorder_pairs_what_it_holds_and_sends_the_rest() {
    let (_redis, store) = private_store("parity-hold").await;
    let p = std::sync::Arc::new(parity(&store, 100));
    let stop = CancellationToken::new();
    let hold = Duration::from_millis(400);
    let rec = Recorder::start(p.clone(), hold, stop.clone());

    // `a` and `b` are paired within the hold (in either order); `c` is not.
    rec.note("kafka", &[first("a"), first("c")]);
    rec.note("rocketmq", &[pair("a"), pair("b")]);
    rec.note("kafka", &[first("b")]);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        one_sided(&p).await.is_empty(),
        "nothing listed within the hold"
    );
    let r = p.report(0, 1000).await.unwrap();
    assert_eq!(
        (r.totals["kafka"], r.totals["rocketmq"]),
        (3, 2),
        "counts go at the next tick"
    );

    tokio::time::sleep(hold * 2).await;
    assert_eq!(one_sided(&p).await, vec![("kafka".into(), "c".into())]);
    assert_eq!(
        (calls(&store, "zadd").await, calls(&store, "zrem").await),
        (1, 0),
        "the held pairs never reached Redis"
    );

    // A partner that comes after the hold is paired by the record script; stopping sends at once.
    rec.note("rocketmq", &[pair("c")]);
    stop.cancel();
    rec.finish(Duration::from_secs(5)).await;
    assert!(one_sided(&p).await.is_empty());
    assert_eq!(calls(&store, "zrem").await, 1);
    let r = p.report(0, 1000).await.unwrap();
    assert_eq!((r.totals["kafka"], r.totals["rocketmq"]), (3, 3));
}
