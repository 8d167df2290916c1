//! A drain (a backlog consumed as fast as the pipeline takes it), then live traffic, without the
//! client's pull errors: `pull_threshold_for_all` is also a rate of batches per second, and a
//! pull over it costs its queue `pull_time_delay_millis_when_exception` (docs/rocketmq.md,
//! "Pull settings").
//!
//! `MQC_DRAIN_MESSAGES` sets the backlog (default 20,000; docs/rocketmq.md quotes 100,000).

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_runs_without_pull_errors_or_stalls() {
    let t0 = Instant::now();
    let n: u32 = std::env::var("MQC_DRAIN_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let (topic, group) = fresh_topic("drain", 4).await;
    let w = Arc::new(writer(&group).await);
    let sent_in = send_concurrently(&w, &topic, 0..n).await;
    // The pipeline's default channel: the source hands over as fast as it can poll.
    let mut src = start_with_channel(&side(&topic, &group), false, 16_384);
    let draining = Instant::now();
    let mut seen = vec![false; n as usize];
    let mut count = 0u32;
    let mut slowest_gap = Duration::ZERO;
    let mut last = Instant::now();
    while count < n {
        let m = match tokio::time::timeout(ARRIVAL, src.rx.recv()).await {
            Ok(Some(m)) => m,
            other => panic!("only {count} of {n} arrived: {other:?}"),
        };
        if count > 0 {
            slowest_gap = slowest_gap.max(last.elapsed());
        }
        last = Instant::now();
        let i: usize = id_of(&m)[2..].parse().unwrap();
        assert!(!std::mem::replace(&mut seen[i], true), "m-{i} twice");
        count += 1;
        m.ack.done();
    }
    let drained_in = draining.elapsed();
    let drain_errors = client_errors_about(&topic).len();

    // Live traffic: a quarter as many again, sent while the source reads them, so that pulls
    // come back with a message or two each (the batch rate is then close to the message rate).
    let live = n / 4;
    let producing = {
        let (w, topic) = (w.clone(), topic.clone());
        tokio::spawn(async move { send_concurrently(&w, &topic, n..n + live).await })
    };
    seen.resize((n + live) as usize, false);
    let mut got_live = 0;
    while got_live < live {
        let m = match tokio::time::timeout(ARRIVAL, src.rx.recv()).await {
            Ok(Some(m)) => m,
            other => panic!("only {got_live} of {live} live copies arrived: {other:?}"),
        };
        let i: usize = id_of(&m)[2..].parse().unwrap();
        assert!(!std::mem::replace(&mut seen[i], true), "m-{i} twice");
        got_live += 1;
        m.ack.done();
    }
    let live_in = producing.await.unwrap();
    // Counted before the stop: every stop ends each queue's held pull with one such line.
    let errors = client_errors_about(&topic);
    src.stop().await;
    Arc::try_unwrap(w).ok().unwrap().shutdown().await;
    eprintln!(
        "drain: {n} sent in {sent_in:?}, drained in {drained_in:?} ({:.0}/s), slowest gap between \
         two copies {slowest_gap:?}, {drain_errors} pull errors; then {live} live in {live_in:?} \
         ({:.0}/s), {} pull errors; whole test {:?}",
        f64::from(n) / drained_in.as_secs_f64(),
        f64::from(live) / live_in.as_secs_f64(),
        errors.len() - drain_errors,
        t0.elapsed()
    );
    assert!(
        errors.is_empty(),
        "pull errors during the drain: {errors:#?}"
    );
    // A queue idled by a refused batch shows as a gap of a pull error delay or more.
    assert!(
        slowest_gap < Duration::from_secs(1),
        "a {slowest_gap:?} stall during the drain"
    );
}

/// Sends `m-i` for every i in `ids`, 64 sends in flight (as the traffic generator does);
/// returns how long that took.
async fn send_concurrently(
    w: &Arc<RocketMqWriter>,
    topic: &str,
    ids: std::ops::Range<u32>,
) -> Duration {
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicU32::new(ids.start));
    let mut senders = Vec::new();
    for _ in 0..64 {
        let (w, next, topic, end) = (w.clone(), next.clone(), topic.to_owned(), ids.end);
        senders.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= end {
                    return;
                }
                let id = format!("m-{i}");
                let body = format!(r#"{{"user_id": "u-{i}"}}"#);
                w.send(&topic, None, &id, &[("msg-id", &id)], body.as_bytes())
                    .await
                    .unwrap_or_else(|e| panic!("send {id}: {e}"));
            }
        }));
    }
    for s in senders {
        s.await.unwrap();
    }
    started.elapsed()
}
