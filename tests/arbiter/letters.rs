//! The dead-letter stream on real Redis: its cap removes the oldest letters to make room, and
//! what it removed is counted, never silent.

use mq_cutover::config::RedisMode;
use mq_cutover::dead::{DeadLetters, Parking};
use mq_cutover::message::Origin;

use super::common;

#[tokio::test]
async fn a_full_stream_counts_every_letter_it_trims() {
    let prefix = common::unique_prefix("trim");
    let store = common::connect(RedisMode::Standalone, &prefix).await;
    let letters = DeadLetters::new(&store, 10);
    let origin = Origin {
        side: "kafka".into(),
        topic: "t".into(),
        partition: 0,
        broker: None,
        offset: 1,
        born_ms: 0,
    };
    let mut reported = 0;
    for n in 0..350 {
        let id = format!("d-{n}");
        let (entries, trimmed) = letters
            .park(&[Parking {
                message_id: Some(&id),
                business_id: None,
                reason: "HTTP 400",
                origin: &origin,
                attempts: 1,
                payload: b"{}",
            }])
            .await
            .expect("the test Redis (scripts/testbed up) answers");
        assert_eq!(entries.len(), 1);
        reported += trimmed;
    }
    let kept = letters.count().await.unwrap();
    let trimmed = letters.trimmed().await.unwrap();
    assert!(kept < 350 && trimmed > 0, "kept {kept}, trimmed {trimmed}");
    assert_eq!(
        kept + trimmed,
        350,
        "every letter is either kept or counted"
    );
    assert_eq!(reported, trimmed, "each park reports what it trimmed");
    common::cleanup(&[common::redis_url()], &prefix);
}

/// A copy stamped longer ago than `arbiter.retention` cannot be arbitrated (its id's record may
/// have expired): it is parked as too old, never claimed as a new message; fresh copies and copies
/// without a timestamp flow as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_older_than_the_retention_are_parked_not_claimed() {
    use std::sync::Arc;
    use std::time::Duration;

    use mq_cutover::message::Side;
    use tokio::sync::mpsc;

    use super::pipelined::{copy, instance, start_side, stop_side, CountingSink, Instance};

    let prefix = common::unique_prefix("too-old");
    let cfg = common::offline_config(
        &common::redis_url(),
        &prefix,
        "claim_batch = 8\n[arbiter]\nretention = \"1h\"",
    );
    let store = mq_cutover::store::Store::connect(&cfg.redis, false)
        .await
        .expect("the test Redis (scripts/testbed up) answers");
    let sink = Arc::new(CountingSink::default());
    let Instance {
        shared,
        metrics,
        stop,
        switches: _switches,
    } = instance(&cfg, &store, 0, sink.clone());
    let kafka: Side = "kafka".into();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let (acks_tx, mut acks_rx) = mpsc::unbounded_channel();
    let (tx, rx) = mpsc::channel(8);
    // pl-0: two hours old; pl-1: a minute old; pl-2: no timestamp.
    for (n, born) in [(0, now - 2 * 3_600_000), (1, now - 60_000), (2, 0)] {
        let mut c = copy(&kafka, n, &acks_tx);
        c.origin.born_ms = born;
        tx.send(c).await.unwrap();
    }
    let (cancel, _tracker, pipeline) = start_side(&shared, &kafka, rx);
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(10), acks_rx.recv())
            .await
            .expect("every copy acknowledged")
            .expect("ack channel open");
    }
    let calls = sink.state.lock().unwrap().calls.clone();
    assert_eq!(calls.get("pl-0"), None, "a too-old copy was called");
    assert_eq!((calls.get("pl-1"), calls.get("pl-2")), (Some(&1), Some(&1)));
    assert!(
        shared.arbiter.inspect("pl-0").await.unwrap().is_none(),
        "a too-old copy was claimed"
    );
    let letters = shared.dead.all().await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].message_id.as_deref(), Some("pl-0"));
    assert!(
        letters[0].reason.starts_with("too old to arbitrate"),
        "{}",
        letters[0].reason
    );
    assert_eq!(metrics.side("kafka").too_old.get(), 1);

    stop_side(&cancel, pipeline).await;
    drop(tx);
    stop.cancel();
    common::cleanup(&[common::redis_url()], &prefix);
}
