//! Broker outages (issue 25): a side's broker stopped mid-run and started again — Kafka with
//! SIGTERM and with SIGKILL, the RocketMQ broker and the RocketMQ name server with SIGKILL — on a
//! private instance of the test's own (tests/common/brokers.rs), the other side on the shared
//! test bed, traffic dual-written throughout by a producer that keeps trying.
//!
//! While its broker is out, the side hands nothing new to the downstream and `/readyz` says why;
//! the other side goes on with the ids it owns. Afterwards every id is granted exactly once (more
//! only with a counted ambiguity), and the side resumed within [`RESUME_BOUND`] of its broker
//! answering again. Each test prints one `outage:` line with its times: docs/reliability.md's
//! measurements are made of them.

use std::time::{Duration, Instant};

use mqc_testkit::reward::FaultPlan;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

#[path = "../common/brokers.rs"]
mod brokers;

use crate::common;
use crate::harness::{Bed, Setup};
use brokers::{PrivateKafka, PrivateRocketMq};

/// One outage test at a time: each starts brokers of its own, and two at once on 2 cores
/// would measure the machine, not the daemon.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How soon after its broker answers again a side must hand copies to the downstream again:
/// what docs/reliability.md promises, with room for a busy 2-core machine.
const RESUME_BOUND: Duration = Duration::from_secs(30);

/// How soon after the kill `/readyz` must name the outage.
const NAMED_WITHIN: Duration = Duration::from_secs(30);

/// Ids per test, and how fast they are written: about 30 s of traffic, through the outage.
const COUNT: u64 = 9_000;
const RATE: u64 = 300;

/// Successful calls of `side` across the bed's daemons.
async fn successes(bed: &Bed, side: &str) -> f64 {
    let mut n = 0.0;
    for d in &bed.daemons {
        n += d
            .metric(&format!(
                "mqc_sink_calls_total{{class=\"success\",side=\"{side}\"}}"
            ))
            .await;
    }
    n
}

/// The bed's first daemon's `/readyz`: status and body.
async fn readyz(bed: &Bed) -> (u16, String) {
    bed.daemons[0].admin("readyz").await
}

/// Starts the traffic (`count` ids at 300/s, 5 % duplicates on each side) and waits until both
/// sides are granting and the daemon is ready.
async fn traffic(
    bed: &Bed,
    prefix: &str,
    count: u64,
) -> tokio::sync::oneshot::Receiver<(mqc_testkit::produce::Sent, mqc_testkit::produce::Sent)> {
    let producer = bed.produce_in_background(prefix, count, |a| {
        a.rate = RATE;
        a.duplicates_old = 0.05;
        a.duplicates_new = 0.05;
        // Longer than any outage here: a copy is never given up.
        a.give_up_after = Some(Duration::from_secs(180));
    });
    let busy = common::eventually(Duration::from_secs(90), || async {
        // The daemon's admin listener opens a moment after it starts.
        bed.daemons[0].try_admin("readyz").await.is_some()
            && successes(bed, "kafka").await >= 100.0
            && successes(bed, "rocketmq").await >= 100.0
            && readyz(bed).await.0 == 200
    })
    .await;
    assert!(busy.is_some(), "the sides never got going:\n{}", bed.logs());
    producer
}

/// After the kill: `/readyz` names the outage of `side` (with `reason`), the side hands
/// nothing to the downstream for 3 s while the other side does. Returns the side's successes
/// and how long after `killed` `/readyz` named the outage.
async fn out(bed: &Bed, side: &str, other: &str, reason: &str, killed: Instant) -> (f64, Duration) {
    let want = format!("side {side}: {reason}");
    let named = common::eventually(NAMED_WITHIN, || async {
        let (code, body) = readyz(bed).await;
        code == 503 && body.contains(&want)
    })
    .await;
    let (code, body) = readyz(bed).await;
    assert!(
        named.is_some(),
        "/readyz never said `{want}`: {code} {body}\n{}",
        bed.logs()
    );
    let named = killed.elapsed();
    // Copies read before the kill may still be finishing: let them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (frozen, other_before) = (successes(bed, side).await, successes(bed, other).await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (after, other_after) = (successes(bed, side).await, successes(bed, other).await);
    assert_eq!(
        after,
        frozen,
        "side {side} handed copies to the downstream with its broker out\n{}",
        bed.logs()
    );
    assert!(
        other_after > other_before,
        "side {other} stopped too ({other_before} -> {other_after})\n{}",
        bed.logs()
    );
    (frozen, named)
}

/// When the broker counts as back, as a client sees it.
enum Back {
    /// The Kafka broker answers a metadata request with a leader for every partition of the
    /// topic.
    KafkaAnswers { bootstrap: String, topic: String },
    /// Something accepts connections on the port.
    Listening(u16),
}

impl Back {
    async fn check(&self) -> bool {
        match self {
            Back::KafkaAnswers { bootstrap, topic } => {
                let (bootstrap, topic) = (bootstrap.clone(), topic.clone());
                tokio::task::spawn_blocking(move || {
                    let Ok(c) = ClientConfig::new()
                        .set("bootstrap.servers", &bootstrap)
                        .create::<BaseConsumer>()
                    else {
                        return false;
                    };
                    c.fetch_metadata(Some(&topic), Duration::from_secs(1))
                        .is_ok_and(|m| {
                            m.topics().iter().any(|t| {
                                t.error().is_none()
                                    && !t.partitions().is_empty()
                                    && t.partitions().iter().all(|p| p.leader() >= 0)
                            })
                        })
                })
                .await
                .unwrap_or(false)
            }
            Back::Listening(port) => std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok(),
        }
    }
}

/// Times of one outage, for the `outage:` line.
struct Recovery {
    /// From the kill to the broker answering again.
    back: Duration,
    /// From the broker answering to the side's first new success.
    resumed: Duration,
    /// From the broker answering to `/readyz` 200.
    ready: Duration,
}

/// Waits, while `restart` runs, for the broker to be back, the side to resume (its successes
/// pass `frozen`) and the daemon to be ready.
async fn recovery(
    bed: &Bed,
    side: &str,
    frozen: f64,
    killed: Instant,
    back: Back,
    restart: impl std::future::Future<Output = Duration>,
) -> Recovery {
    let watch = async {
        let limit = Duration::from_secs(180);
        let mut back_at = None;
        let (mut resumed_at, mut ready_at) = (None, None);
        loop {
            if back_at.is_none() && back.check().await {
                back_at = Some(Instant::now());
            }
            if resumed_at.is_none() && successes(bed, side).await > frozen {
                resumed_at = Some(Instant::now());
            }
            if back_at.is_some() && ready_at.is_none() && readyz(bed).await.0 == 200 {
                ready_at = Some(Instant::now());
            }
            if let (Some(b), Some(r), Some(y)) = (back_at, resumed_at, ready_at) {
                return (b, r, y);
            }
            assert!(
                killed.elapsed() < limit,
                "side {side} not recovered {limit:?} after the kill: broker back {:?}, resumed \
                 {:?}, ready {:?}; /readyz {:?}\n{}",
                back_at.map(|t| t - killed),
                resumed_at.map(|t| t - killed),
                ready_at.map(|t| t - killed),
                readyz(bed).await,
                bed.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (took, (back_at, resumed_at, ready_at)) = tokio::join!(restart, watch);
    eprintln!("restart of the broker took {took:?} (the test bed's readiness checks included)");
    let since = |t: Instant| t.saturating_duration_since(back_at);
    Recovery {
        back: back_at - killed,
        resumed: since(resumed_at),
        ready: since(ready_at),
    }
}

/// Every id granted; more than once only with a counted ambiguity or overlap. Returns how many
/// were granted more than once.
async fn granted_once(bed: &Bed, prefix: &str, count: u64) -> u64 {
    bed.wait_all_settled(prefix, count, Duration::from_secs(240))
        .await;
    let grants = bed.grants();
    let mut doubles = 0;
    for i in 0..count {
        let id = format!("{prefix}-{i}");
        let g = grants.get(&id).copied().unwrap_or(0);
        assert!(g >= 1, "{id} lost:\n{}", bed.logs());
        if g > 1 {
            let r = bed.record(&id).await.expect("record");
            assert!(
                r.ambiguous > 0 || r.overlaps > 0,
                "{id} granted {g} times, uncounted: {r}\n{}",
                bed.logs()
            );
            // Which count explains it, for the test's output (docs/reliability.md).
            eprintln!(
                "{id} granted {g} times: ambiguous {}, overlaps {}",
                r.ambiguous, r.overlaps
            );
            doubles += 1;
        }
    }
    doubles
}

fn report(what: &str, named: Duration, r: &Recovery, doubles: u64) {
    eprintln!(
        "outage: {what}: /readyz named it {:.1}s after the kill; broker back {:.1}s after the \
         kill; side resumed {:.1}s and ready {:.1}s after that; {COUNT} ids granted, {doubles} \
         more than once (counted)",
        named.as_secs_f64(),
        r.back.as_secs_f64(),
        r.resumed.as_secs_f64(),
        r.ready.as_secs_f64()
    );
    assert!(
        r.resumed <= RESUME_BOUND,
        "{what}: the side resumed {:?} after its broker was back (bound {RESUME_BOUND:?})",
        r.resumed
    );
}

fn setup() -> Setup {
    Setup {
        faults: FaultPlan {
            latency: Duration::from_millis(2),
            ..FaultPlan::default()
        },
        // Longer than any outage here: the other side never adopts the out side's ids, so the
        // out side's pause shows (adoption is tested in adopt.rs).
        adopt_after: "5m",
        ..Setup::default()
    }
}

async fn kafka_outage(signal: &str) {
    let _one = ONE_AT_A_TIME.lock().await;
    let kafka = PrivateKafka::start().await;
    let setup = Setup {
        kafka_bootstrap: kafka.bootstrap(),
        ..setup()
    };
    let mut bed = Bed::new(&format!("out-kafka-{}", signal.to_lowercase()), setup).await;
    bed.switch(&["set", "--consume", "on", "--percent", "50"]);
    bed.start_daemon();
    let producer = traffic(&bed, "ko", COUNT).await;

    let killed = Instant::now();
    kafka.signal(signal).await;
    let (frozen, named) = out(&bed, "kafka", "rocketmq", "brokers unreachable", killed).await;
    let back = Back::KafkaAnswers {
        bootstrap: kafka.bootstrap(),
        topic: format!("{}-t", bed.prefix),
    };
    let r = recovery(&bed, "kafka", frozen, killed, back, kafka.restart()).await;
    let sent = producer.await.expect("producer");
    assert_eq!(
        (sent.0.given_up, sent.1.given_up),
        (0, 0),
        "the producer gave copies up"
    );
    let doubles = granted_once(&bed, "ko", COUNT).await;
    let log = bed.daemons[0].log_text();
    assert!(
        log.contains("Kafka brokers unreachable") && log.contains("Kafka brokers reachable again"),
        "the outage's start and end are logged\n{}\n{}",
        bed.logs(),
        kafka.log_tail()
    );
    report(&format!("kafka SIG{signal}"), named, &r, doubles);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_killed_mid_run_pauses_its_side_which_resumes_without_loss_or_duplicate() {
    kafka_outage("KILL").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_stopped_mid_run_pauses_its_side_which_resumes_without_loss_or_duplicate() {
    kafka_outage("TERM").await;
}

/// A private RocketMQ (name server and broker) as the new side, Kafka on the shared test bed.
async fn rocketmq_bed(rocketmq: &PrivateRocketMq, test: &str) -> Bed {
    let setup = Setup {
        rocketmq_namesrv: rocketmq.namesrv(),
        rocketmq_testbed_env: rocketmq.testbed_env(),
        ..setup()
    };
    let mut bed = Bed::new(test, setup).await;
    bed.switch(&["set", "--consume", "on", "--percent", "50"]);
    bed.start_daemon();
    bed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rocketmq_broker_killed_mid_run_pauses_its_side_which_resumes_without_loss_or_duplicate() {
    let _one = ONE_AT_A_TIME.lock().await;
    let rocketmq = PrivateRocketMq::start().await;
    let bed = rocketmq_bed(&rocketmq, "out-rmq-broker").await;
    let producer = traffic(&bed, "rb", COUNT).await;

    let killed = Instant::now();
    rocketmq.signal_broker("KILL").await;
    let (frozen, named) = out(&bed, "rocketmq", "kafka", "brokers unreachable", killed).await;
    let back = Back::Listening(rocketmq.broker_port());
    let r = recovery(&bed, "rocketmq", frozen, killed, back, rocketmq.restart()).await;
    let sent = producer.await.expect("producer");
    assert_eq!(
        (sent.0.given_up, sent.1.given_up),
        (0, 0),
        "the producer gave copies up"
    );
    let doubles = granted_once(&bed, "rb", COUNT).await;
    report("rocketmq broker SIGKILL", named, &r, doubles);
}

/// Ids of the name server test: about 50 s of traffic, so that it runs through the outage,
/// which is longer than the client's route refresh period (30 s).
const NAMESRV_COUNT: u64 = 15_000;

/// How long the name server stays down: longer than the client's route refresh period.
const NAMESRV_OUT: Duration = Duration::from_secs(35);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rocketmq_name_server_killed_mid_run_leaves_its_side_reading_and_ready() {
    let _one = ONE_AT_A_TIME.lock().await;
    let rocketmq = PrivateRocketMq::start().await;
    let bed = rocketmq_bed(&rocketmq, "out-rmq-namesrv").await;
    let producer = traffic(&bed, "rn", NAMESRV_COUNT).await;

    let killed = Instant::now();
    rocketmq.signal_namesrv("KILL").await;
    let closed = common::eventually(Duration::from_secs(10), || async {
        !rocketmq.namesrv_listening()
    })
    .await;
    assert!(
        closed.is_some(),
        "the name server's port is still open\n{}",
        rocketmq.log_tail()
    );
    // The client keeps the routes it has and reads from the broker: the side never stops and
    // stays ready (there is nothing for a person to do about it from this daemon).
    let (mut last, mut progressed) = (successes(&bed, "rocketmq").await, Instant::now());
    let mut longest_pause = Duration::ZERO;
    while killed.elapsed() < NAMESRV_OUT {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = successes(&bed, "rocketmq").await;
        if now > last {
            (last, progressed) = (now, Instant::now());
        }
        longest_pause = longest_pause.max(progressed.elapsed());
        let (code, body) = readyz(&bed).await;
        assert_eq!(
            code,
            200,
            "not ready {:?} after the name server was killed: {body}\n{}",
            killed.elapsed(),
            bed.logs()
        );
    }
    assert!(
        longest_pause < Duration::from_secs(5),
        "the side paused {longest_pause:?} with its name server down\n{}",
        bed.logs()
    );
    let took = rocketmq.restart().await;
    let sent = producer.await.expect("producer");
    assert_eq!(
        (sent.0.given_up, sent.1.given_up),
        (0, 0),
        "the producer gave copies up"
    );
    let doubles = granted_once(&bed, "rn", NAMESRV_COUNT).await;
    eprintln!(
        "outage: rocketmq name server SIGKILL: down {:.1}s, side never paused longer than \
         {:.1}s and stayed ready; restart took {:.1}s; {NAMESRV_COUNT} ids granted, {doubles} \
         more than once (counted)",
        NAMESRV_OUT.as_secs_f64(),
        longest_pause.as_secs_f64(),
        took.as_secs_f64()
    );
}

/// The chaos run's producer (`produce --give-up-after`): a copy its broker does not take in
/// time is given up, counted and recorded in the rewritten manifest as not written, and the run
/// goes on; the other broker's copies all go. scripts/chaos explains an id never granted by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_gives_up_copies_a_dead_broker_does_not_take_and_says_so_in_its_manifest() {
    let _one = ONE_AT_A_TIME.lock().await;
    let kafka = PrivateKafka::start().await;
    let setup = Setup {
        kafka_bootstrap: kafka.bootstrap(),
        ..setup()
    };
    let bed = Bed::new("out-give-up", setup).await;
    let path = bed.dir.path().join("manifest.jsonl");
    // 10 s of traffic, the broker killed after 8: about 200 copies left for it. librdkafka
    // gives a queued copy up after `message.timeout.ms` (30 s), then the producer does; 64
    // copies are in flight at a time, so each 64 more take 30 s.
    let count = 1_000;
    let producer = bed.produce_in_background("gu", count, |a| {
        a.rate = 100;
        a.give_up_after = Some(Duration::from_secs(3));
        a.manifest = Some(path.clone());
    });
    tokio::time::sleep(Duration::from_secs(8)).await;
    kafka.signal("KILL").await;
    let (old, new) = tokio::time::timeout(Duration::from_secs(180), producer)
        .await
        .expect("the producer ends although its Kafka broker is gone")
        .expect("producer");
    assert!(old.given_up > 0, "nothing given up: {old:?}");
    assert_eq!((new.given_up, new.copies), (0, count), "{new:?}");
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len() as u64, count);
    let sum = |key: &str| rows.iter().map(|r| r[key].as_u64().unwrap()).sum::<u64>();
    assert_eq!(sum("old_sent"), old.copies, "the manifest's written copies");
    assert_eq!(sum("old") - sum("old_sent"), old.given_up);
    assert_eq!(sum("new_sent"), sum("new"));
    assert!(
        rows.iter().any(|r| r["old"] == 1 && r["old_sent"] == 0),
        "an id whose copy was given up"
    );
    eprintln!(
        "give-up: {} of {count} Kafka copies given up after the broker was killed",
        old.given_up
    );
}
