//! The daemon end to end against real Apache Kafka, real Apache RocketMQ, real Redis and the real
//! reward service: dual-written traffic, two daemon processes, the switches moving, faults in the
//! downstream, a daemon killed or stopped mid-run, Redis stopped mid-run, malformed messages.
//!
//! Every test owns its topics, consumer groups, key prefix and reward service.

mod adopt;
#[path = "../common/mod.rs"]
mod common;
mod durability;
mod fates;
mod harness;
mod hostile;
mod outages;
mod page;
mod parity;
mod secured;
mod sentinel;
mod stall;

use std::collections::HashSet;
use std::time::Duration;

use harness::{Bed, Setup};
use mq_cutover::arbiter::routing::bucket;
use mq_cutover::arbiter::State;
use mq_cutover::config::RedisMode;
use mqc_testkit::reward::FaultPlan;

const SETTLE: Duration = Duration::from_secs(240);

/// For each id of a phase: granted exactly once; the owner is the side its phase's percentage
/// routes it to.
async fn check_phase(
    bed: &Bed,
    prefix: &str,
    count: u64,
    percent: u8,
    users: &[String],
) -> (u64, u64) {
    let grants = bed.grants();
    let (mut to_new, mut to_old) = (0, 0);
    for i in 0..count {
        let id = format!("{prefix}-{i}");
        let r = bed.record(&id).await.expect("record");
        assert_eq!(
            grants.get(&id).copied().unwrap_or(0),
            1,
            "{id} granted {:?} times: {r}",
            grants.get(&id)
        );
        let want = if bucket(&users[i as usize]) < percent {
            "rocketmq"
        } else {
            "kafka"
        };
        assert_eq!(
            r.owner,
            want,
            "{id}: user {} bucket {} at {percent}%",
            users[i as usize],
            bucket(&users[i as usize])
        );
        if r.owner == "rocketmq" {
            to_new += 1;
        } else {
            to_old += 1;
        }
    }
    (to_old, to_new)
}

/// The users the producer picks for a phase (same seed and order as `produce`).
fn users_of(bed: &Bed, manifest: &std::path::Path) -> Vec<String> {
    let _ = bed;
    std::fs::read_to_string(manifest)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["user"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_id_is_granted_once_while_the_percentage_moves_with_two_daemons() {
    let bed = Bed::new("e2e-move", certain()).await;
    percentage_moves(bed, &[0, 10, 50, 100], 2500).await;
}

/// The production lease, and a downstream timeout a busy test host does not reach: no call's
/// outcome is ever in doubt, so every id must be granted exactly once (with a 5 s lease and a 1 s
/// timeout, a host busy with other tests makes a few calls ambiguous, and those may be granted
/// twice, as `at_least_once` allows).
fn certain() -> Setup {
    Setup {
        lease: "30s",
        sink_timeout: "5s",
        ..Setup::default()
    }
}

/// The same cut-over on the Redis Cluster, under load: more ids per step, and the percentage
/// moving forth and back (the load under which the cluster client once timed out for good; the
/// daemons now replace a connection that wedges, `mqc_redis_reconnects_total`). The test bed's
/// cluster by default; `MQC_E2E_CLUSTER_URLS` (seed URLs, comma-separated) and
/// `MQC_E2E_CLUSTER_IDS` (ids per step) run it elsewhere or heavier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_id_is_granted_once_while_the_percentage_moves_with_two_daemons_on_the_cluster() {
    let count = std::env::var("MQC_E2E_CLUSTER_IDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(6000);
    let setup = Setup {
        redis_url: std::env::var("MQC_E2E_CLUSTER_URLS")
            .unwrap_or_else(|_| common::cluster_urls().join(",")),
        redis_mode: RedisMode::Cluster,
        ..certain()
    };
    let bed = Bed::new("e2e-move-cluster", setup).await;
    percentage_moves(bed, &[0, 5, 50, 100, 50, 0], count).await;
}

/// Two daemons; for each step, sets the percentage, dual-writes `count` ids (5 % duplicated on
/// each side) and checks that each is granted exactly once, by the side the step routes it to.
async fn percentage_moves(mut bed: Bed, steps: &[u8], count: u64) {
    bed.start_daemon();
    bed.start_daemon();
    let mut total_new = 0;
    let mut total = 0;
    let last = *steps.last().expect("at least one step");
    for (phase, &percent) in steps.iter().enumerate() {
        bed.switch(&["set", "--consume", "on", "--percent", &percent.to_string()]);
        // Every instance follows within a second.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let prefix = format!("p{phase}");
        let manifest = bed.dir.path().join(format!("{prefix}.jsonl"));
        let started = std::time::Instant::now();
        bed.produce(&prefix, count, |a| {
            a.duplicates_old = 0.05;
            a.duplicates_new = 0.05;
            a.seed = phase as u64 + 1;
            a.manifest = Some(manifest.clone());
        })
        .await;
        bed.wait_all_settled(&prefix, count, SETTLE).await;
        let users = users_of(&bed, &manifest);
        let (old, new) = check_phase(&bed, &prefix, count, percent, &users).await;
        eprintln!(
            "phase {phase} at {percent}%: kafka handled {old}, rocketmq handled {new} ({:?})",
            started.elapsed()
        );
        total_new += new;
        total += count;
        match percent {
            0 => assert_eq!(new, 0),
            100 => assert_eq!(old, 0),
            p => {
                let share = new as f64 / count as f64 * 100.0;
                assert!(
                    (share - p as f64).abs() < 6.0,
                    "{share:.1}% went new at {p}%"
                );
            }
        }
    }
    // Each id granted exactly once (checked per phase), nothing else granted.
    let grants = bed.grants();
    assert_eq!(grants.len() as u64, total, "unexpected ids granted");
    assert!(total_new > 0);
    // Both daemons did work, and their metrics add up to what the reward service saw.
    let (mut successes, mut proceeds, mut not_called) = (0.0, 0.0, 0.0);
    for (i, d) in bed.daemons.iter().enumerate() {
        assert!(
            d.log_text().contains("mq-cutover running"),
            "daemon {i} did not start:\n{}",
            bed.logs()
        );
        let (code, ready) = d.admin("readyz").await;
        assert_eq!(code, 200, "daemon {i} not ready: {ready}");
        for side in ["kafka", "rocketmq"] {
            successes += d
                .metric(&format!(
                    "mqc_sink_calls_total{{class=\"success\",side=\"{side}\"}}"
                ))
                .await;
            proceeds += d
                .metric(&format!(
                    "mqc_messages_total{{fate=\"proceed\",side=\"{side}\"}}"
                ))
                .await;
            // A copy that proceeded but whose lease could not be confirmed before its call (a
            // Redis connection replaced meanwhile) or had lapsed is claimed again and proceeds
            // a second time: each is counted.
            for name in ["mqc_unconfirmed_total", "mqc_lapsed_total"] {
                not_called += d.metric(&format!("{name}{{side=\"{side}\"}}")).await;
            }
        }
        assert_eq!(d.metric("mqc_switch_percent").await, f64::from(last));
        eprintln!(
            "daemon {i}: {} redis connection(s) replaced, {} pause(s)",
            d.metric("mqc_redis_reconnects_total{reason=\"stalled\"}")
                .await,
            d.metric("mqc_pauses_total").await
        );
    }
    assert_eq!(successes, total as f64, "sink successes in /metrics");
    assert_eq!(
        proceeds,
        total as f64 + not_called,
        "proceeds in /metrics: one per id, plus one per copy claimed again without a call"
    );
}

async fn faults_scenario(policy: &'static str) {
    let setup = Setup {
        policy,
        sink_timeout: "500ms",
        faults: FaultPlan {
            error_rate: 0.2,
            commit_then_timeout_rate: 0.02,
            hang: Duration::from_secs(2),
            ..FaultPlan::default()
        },
        ..Setup::default()
    };
    let mut bed = Bed::new(&format!("e2e-faults-{policy}"), setup).await;
    bed.switch(&["set", "--consume", "on", "--percent", "50"]);
    bed.start_daemon();
    let count = 2000;
    bed.produce("f", count, |_| {}).await;
    bed.wait_all_settled("f", count, SETTLE).await;
    let grants = bed.grants();
    let (mut once, mut more, mut parked, mut ambiguous_ids) = (0, 0, 0, 0);
    for i in 0..count {
        let id = format!("f-{i}");
        let g = grants.get(&id).copied().unwrap_or(0);
        let r = bed.record(&id).await.expect("record");
        if r.ambiguous > 0 {
            ambiguous_ids += 1;
        }
        match policy {
            "at_least_once" => {
                assert_eq!(r.state, State::Done, "{id}: {r}");
                assert!(g >= 1, "{id} lost");
                if g > 1 {
                    assert!(
                        r.ambiguous > 0,
                        "{id} granted {g} times without a counted ambiguity: {r}"
                    );
                    more += 1;
                } else {
                    once += 1;
                }
            }
            _ => {
                assert!(g <= 1, "{id} granted {g} times under at_most_once");
                match r.state {
                    State::Done => once += 1,
                    State::Dead => {
                        let reason = r.reason.clone().unwrap_or_default();
                        assert!(reason.starts_with("in doubt"), "{id}: {reason}");
                        parked += 1;
                    }
                    other => panic!("{id} ended {other}"),
                }
            }
        }
    }
    eprintln!("{policy}: {once} granted once, {more} more than once, {parked} in doubt, {ambiguous_ids} with ambiguity");
    assert!(
        ambiguous_ids > 0,
        "the fault plan should have produced ambiguous calls"
    );
    if policy == "at_most_once" {
        assert_eq!(
            parked, ambiguous_ids,
            "every ambiguous id is parked in doubt"
        );
        let letters = bed.dead_letters().await;
        let in_doubt: HashSet<_> = letters
            .iter()
            .filter(|l| l.reason.starts_with("in doubt"))
            .filter_map(|l| l.message_id.clone())
            .collect();
        assert_eq!(
            in_doubt.len() as u64,
            parked,
            "each in-doubt id has a dead letter"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_downstream_loses_nothing_and_duplicates_only_counted_ids_at_least_once() {
    faults_scenario("at_least_once").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_downstream_never_grants_twice_at_most_once() {
    faults_scenario("at_most_once").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_mid_run_loses_nothing_and_duplicates_only_counted_ids() {
    let setup = Setup {
        lease: "3s",
        faults: FaultPlan {
            latency: Duration::from_millis(5),
            ..FaultPlan::default()
        },
        ..Setup::default()
    };
    let mut bed = Bed::new("e2e-kill", setup).await;
    bed.switch(&["set", "--consume", "on", "--percent", "50"]);
    bed.start_daemon();
    bed.start_daemon();
    let count = 3000;
    let produced = {
        let bed = &bed;
        async move { bed.produce("k", count, |a| a.rate = 1000).await }
    };
    let killer = async {
        // Kill once the daemons are well into the traffic.
        let busy = common::eventually(Duration::from_secs(60), || async {
            bed.reward.state().stats().grants >= 300
        })
        .await;
        assert!(
            busy.is_some(),
            "nothing granted before the kill:\n{}",
            bed.logs()
        );
        bed.reward.state().stats().grants
    };
    let (_, before) = tokio::join!(produced, killer);
    bed.daemons[0].kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    bed.daemons[0].restart();
    bed.wait_all_settled("k", count, SETTLE).await;
    let grants = bed.grants();
    let mut doubles = 0;
    for i in 0..count {
        let id = format!("k-{i}");
        let g = grants.get(&id).copied().unwrap_or(0);
        assert!(g >= 1, "{id} lost after the kill");
        if g > 1 {
            let r = bed.record(&id).await.unwrap();
            assert!(
                r.ambiguous > 0 || r.overlaps > 0,
                "{id} granted {g} times, uncounted: {r}"
            );
            doubles += 1;
        }
    }
    eprintln!("killed after {before} grants; {doubles} counted duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_mid_run_pauses_the_daemon_which_recovers_without_loss_or_duplicate() {
    let mut redis = common::PrivateRedis::start_persistent();
    let setup = Setup {
        redis_url: redis.url(),
        faults: FaultPlan {
            latency: Duration::from_millis(2),
            ..FaultPlan::default()
        },
        ..Setup::default()
    };
    let mut bed = Bed::new("e2e-redis", setup).await;
    bed.switch(&["set", "--consume", "on", "--percent", "50"]);
    bed.start_daemon();
    let count = 3000;
    let produced = {
        let bed = &bed;
        async move { bed.produce("r", count, |a| a.rate = 1000).await }
    };
    let outage = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        redis.stop();
        // Calls claimed before the outage may still finish (they hold valid leases); after
        // that, nothing may reach the downstream until Redis is back.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let during = bed.reward.state().stats().grants;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after = bed.reward.state().stats().grants;
        assert_eq!(
            after,
            during,
            "{} grants while redis was down",
            after - during
        );
        redis.restart();
    };
    tokio::join!(produced, outage);
    bed.wait_all_settled("r", count, SETTLE).await;
    let grants = bed.grants();
    for i in 0..count {
        let id = format!("r-{i}");
        assert_eq!(grants.get(&id).copied().unwrap_or(0), 1, "{id}");
    }
    let log = bed.daemons[0].log_text();
    assert!(log.contains("redis unavailable: pausing"), "{}", bed.logs());
    assert!(log.contains("resuming the sources"), "{}", bed.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_dead_lettered_with_reasons_and_the_rest_flows() {
    let mut bed = Bed::new("e2e-malformed", Setup::default()).await;
    // A key of another type where the record of id `poison-0` belongs: Redis refuses that id's
    // claims for good, so each side parks its copy (nothing is called, nothing lost).
    let mut conn = bed.store.conn();
    let _: () = redis::cmd("RPUSH")
        .arg(mq_cutover::arbiter::record_key(&bed.prefix, "poison-0"))
        .arg("not a record")
        .query_async(&mut conn)
        .await
        .unwrap();
    bed.switch(&["set", "--consume", "on", "--percent", "50"]);
    bed.start_daemon();
    let count = 1000;
    bed.produce("g", count, |a| a.malformed = 10).await;
    bed.produce("poison", 1, |_| {}).await;
    bed.wait_all_settled("g", count, SETTLE).await;
    let grants = bed.grants();
    for i in 0..count {
        assert_eq!(grants.get(&format!("g-{i}")).copied(), Some(1), "g-{i}");
    }
    // 10 malformed per side and the poisoned id's two copies; the dead letters are written
    // before the offsets move, so wait a little.
    let letters = common::eventually(Duration::from_secs(20), || async {
        bed.dead_letters().await.len() >= 22
    })
    .await;
    let all_letters = bed.dead_letters().await;
    assert!(letters.is_some(), "{} dead letters", all_letters.len());
    assert_eq!(all_letters.len(), 22, "{all_letters:?}");
    assert_eq!(
        grants.get("poison-0"),
        None,
        "a refused claim is never called"
    );
    let (refused, letters_now): (Vec<_>, Vec<_>) = all_letters
        .into_iter()
        .partition(|l| l.message_id.as_deref() == Some("poison-0"));
    assert_eq!(refused.len(), 2, "{refused:?}");
    for l in &refused {
        assert!(
            l.reason.starts_with("claim refused by redis:") && l.reason.contains("WRONGTYPE"),
            "{l:?}"
        );
    }
    let refused_sides: HashSet<_> = refused.iter().map(|l| l.side.clone()).collect();
    assert_eq!(refused_sides.len(), 2, "each side parks its own copy");
    for l in &letters_now {
        assert_eq!(l.reason, "message id: no header `msg-id`", "{l:?}");
        assert!(l.message_id.is_none());
        assert!(String::from_utf8_lossy(&l.payload).starts_with("malformed payload"));
    }
    let sides: HashSet<_> = letters_now.iter().map(|l| l.side.clone()).collect();
    assert_eq!(sides.len(), 2, "both sides park their malformed copies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_cleanly_within_the_deadline_and_the_restart_grants_nothing_again() {
    let setup = Setup {
        drain_timeout: "5s",
        faults: FaultPlan {
            latency: Duration::from_millis(20),
            ..FaultPlan::default()
        },
        ..Setup::default()
    };
    let mut bed = Bed::new("e2e-sigterm", setup).await;
    bed.switch(&["set", "--consume", "on", "--percent", "50"]);
    bed.start_daemon();
    let count = 2000;
    let produced = {
        let bed = &bed;
        async move { bed.produce("s", count, |a| a.rate = 800).await }
    };
    let stopper = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        bed.daemons[0].signal("TERM");
    };
    tokio::join!(produced, stopper);
    let (code, took) = bed.daemons[0]
        .wait_exit(Duration::from_secs(25))
        .expect("exited");
    assert_eq!(code, 0, "{}", bed.logs());
    // drain_timeout 5s + the sources' commit grace.
    assert!(took < Duration::from_secs(16), "took {took:?} to stop");
    let granted_before = bed.grants();
    bed.daemons[0].restart();
    bed.wait_all_settled("s", count, SETTLE).await;
    let grants = bed.grants();
    for i in 0..count {
        let id = format!("s-{i}");
        assert_eq!(grants.get(&id).copied().unwrap_or(0), 1, "{id}");
    }
    assert!(granted_before.values().all(|&g| g == 1));
}

/// Redis stops answering (SIGSTOP) while calls are in flight and copies are claimed; then a
/// SIGTERM. The drain cannot record anything, yet the daemon exits within `drain_timeout` plus
/// `SHUTDOWN_MARGIN`, with 0 (what it could not record stays unacknowledged). Once Redis goes on
/// and the daemon is started again, nothing is lost: every id is granted, and an id granted twice
/// is one whose call outcome could not be recorded (counted as ambiguous).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_the_daemon_in_time_while_redis_does_not_answer_and_nothing_is_lost() {
    let redis = common::PrivateRedis::start();
    let setup = Setup {
        redis_url: redis.url(),
        drain_timeout: "5s",
        sink_timeout: "10s",
        // Few call slots: most claimed copies wait for one when Redis stops and the signal comes.
        max_in_flight: 8,
        faults: FaultPlan {
            latency: Duration::from_secs(2),
            ..FaultPlan::default()
        },
        ..Setup::default()
    };
    let mut bed = Bed::new("e2e-sigterm-frozen", setup).await;
    bed.switch(&["set", "--consume", "on", "--percent", "50"]);
    bed.start_daemon();
    let count = 200;
    bed.produce("z", count, |_| {}).await;
    let calling = common::eventually(Duration::from_secs(60), || async {
        bed.daemons[0].metric("mqc_in_flight{side=\"kafka\"}").await
            + bed.daemons[0]
                .metric("mqc_in_flight{side=\"rocketmq\"}")
                .await
            > 0.0
    })
    .await;
    assert!(calling.is_some(), "no call started:\n{}", bed.logs());
    redis.freeze();
    tokio::time::sleep(Duration::from_millis(500)).await;
    bed.daemons[0].signal("TERM");
    let limit = Duration::from_secs(5) + mq_cutover::app::SHUTDOWN_MARGIN;
    let exited = bed.daemons[0].wait_exit(limit + Duration::from_secs(3));
    redis.thaw();
    let (code, took) = exited.unwrap_or_else(|| {
        panic!(
            "still running {:?} after SIGTERM with redis frozen:\n{}",
            limit + Duration::from_secs(3),
            bed.logs()
        )
    });
    assert_eq!(code, 0, "{}", bed.logs());
    assert!(took <= limit, "took {took:?} to stop:\n{}", bed.logs());
    let log = bed.daemons[0].log_text();
    assert!(
        log.matches("redis unavailable: pausing").count() <= 2,
        "the outage is logged once, not per copy:\n{}",
        bed.logs()
    );
    eprintln!("exited {code} {took:?} after SIGTERM with redis frozen");

    bed.daemons[0].restart();
    bed.wait_all_settled("z", count, SETTLE).await;
    let grants = bed.grants();
    let mut doubles = 0;
    for i in 0..count {
        let id = format!("z-{i}");
        let g = grants.get(&id).copied().unwrap_or(0);
        assert!(g >= 1, "{id} lost");
        if g > 1 {
            let r = bed.record(&id).await.unwrap();
            assert!(
                r.ambiguous > 0 || r.overlaps > 0,
                "{id} granted {g} times, uncounted: {r}"
            );
            doubles += 1;
        }
    }
    eprintln!("{doubles} ids granted twice, each counted as ambiguous");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_slower_than_the_lease_keep_it_by_renewal_and_are_never_doubled() {
    // Every call takes 2.5 s with a 1 s lease: without renewal the lease would run out during
    // each call and a duplicate copy (5 % on each side, two daemons) would call again.
    let setup = Setup {
        lease: "1s",
        sink_timeout: "10s",
        faults: FaultPlan {
            latency: Duration::from_millis(2500),
            ..FaultPlan::default()
        },
        ..Setup::default()
    };
    let mut bed = Bed::new("e2e-renew", setup).await;
    bed.switch(&["set", "--consume", "on", "--percent", "50"]);
    bed.start_daemon();
    bed.start_daemon();
    let count = 300;
    bed.produce("l", count, |a| {
        a.duplicates_old = 0.3;
        a.duplicates_new = 0.3;
    })
    .await;
    bed.wait_all_settled("l", count, SETTLE).await;
    let grants = bed.grants();
    for i in 0..count {
        let id = format!("l-{i}");
        assert_eq!(grants.get(&id).copied().unwrap_or(0), 1, "{id}");
        let r = bed.record(&id).await.unwrap();
        assert_eq!(
            (r.ambiguous, r.overlaps, r.attempts),
            (0, 0, 1),
            "{id}: {r}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_circuit_pauses_the_sources_and_everything_flows_once_the_downstream_heals() {
    let setup = Setup {
        circuit_threshold: 10,
        circuit_open_for: "3s",
        faults: FaultPlan {
            error_rate: 1.0,
            ..FaultPlan::default()
        },
        ..Setup::default()
    };
    let mut bed = Bed::new("e2e-circuit", setup).await;
    bed.switch(&["set", "--consume", "on", "--percent", "50"]);
    bed.start_daemon();
    let count = 500;
    bed.produce("c", count, |_| {}).await;
    // The downstream fails every call: the circuit opens and both sources pause.
    let paused = common::eventually(Duration::from_secs(30), || async {
        bed.daemons[0]
            .log_text()
            .contains("pausing the sources reason=CircuitOpen")
    })
    .await;
    assert!(
        paused.is_some(),
        "the circuit never paused the sources:\n{}",
        bed.logs()
    );
    // Calls let through before the circuit opened (up to the sink's 64 slots) may still be on
    // their way to the service; on a loaded machine that takes a moment. Wait until they are in.
    let settled = common::eventually(Duration::from_secs(2), || async {
        let before = bed.reward.state().stats().calls;
        tokio::time::sleep(Duration::from_millis(150)).await;
        bed.reward.state().stats().calls == before
    })
    .await;
    assert!(
        settled.is_some(),
        "calls kept coming after the circuit opened"
    );
    let calls_open = bed.reward.state().stats().calls;
    tokio::time::sleep(Duration::from_millis(700)).await;
    // While open, calls stop (only half-open probes get through).
    let calls_later = bed.reward.state().stats().calls;
    assert!(
        calls_later - calls_open <= 5,
        "{} calls while the circuit was open",
        calls_later - calls_open
    );
    bed.reward.state().set_faults(FaultPlan::default()).unwrap();
    bed.wait_all_settled("c", count, SETTLE).await;
    let grants = bed.grants();
    for i in 0..count {
        assert_eq!(grants.get(&format!("c-{i}")).copied(), Some(1), "c-{i}");
    }
    assert!(bed.daemons[0].log_text().contains("resuming the sources"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once_while_draining() {
    let setup = Setup {
        drain_timeout: "30s",
        sink_timeout: "20s",
        faults: FaultPlan {
            latency: Duration::from_secs(10),
            ..FaultPlan::default()
        },
        ..Setup::default()
    };
    let mut bed = Bed::new("e2e-second-signal", setup).await;
    bed.switch(&["set", "--consume", "on", "--percent", "50"]);
    bed.start_daemon();
    bed.produce("x", 20, |_| {}).await;
    // Calls are in flight (10 s each: the reward service counts a call when it answers); the
    // first signal starts a drain that would wait for them.
    let started = common::eventually(Duration::from_secs(30), || async {
        let in_flight = bed.daemons[0].metric("mqc_in_flight{side=\"kafka\"}").await
            + bed.daemons[0]
                .metric("mqc_in_flight{side=\"rocketmq\"}")
                .await;
        in_flight > 0.0
    })
    .await;
    assert!(started.is_some(), "no call started:\n{}", bed.logs());
    assert_eq!(bed.reward.state().stats().calls, 0, "no call answered yet");
    bed.daemons[0].signal("TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    bed.daemons[0].signal("TERM");
    let (code, took) = bed.daemons[0]
        .wait_exit(Duration::from_secs(5))
        .expect("exited at once");
    assert_eq!(code, 130, "{}", bed.logs());
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fatal_answers_are_dead_lettered_and_a_replay_delivers_them_once() {
    let setup = Setup {
        faults: FaultPlan {
            bad_request_rate: 1.0,
            ..FaultPlan::default()
        },
        ..Setup::default()
    };
    let mut bed = Bed::new("e2e-replay", setup).await;
    bed.switch(&["set", "--consume", "on", "--percent", "50"]);
    bed.start_daemon();
    let count = 50;
    bed.produce("d", count, |_| {}).await;
    // Every call answers 400: fatal, so every id is parked after one call.
    let parked = common::eventually(Duration::from_secs(60), || async {
        bed.dead_letters().await.len() as u64 >= count
    })
    .await;
    assert!(
        parked.is_some(),
        "{} dead letters:\n{}",
        bed.dead_letters().await.len(),
        bed.logs()
    );
    let letters = bed.dead_letters().await;
    assert_eq!(letters.len() as u64, count);
    for l in &letters {
        assert!(l.reason.starts_with("HTTP 400"), "{l:?}");
        assert_eq!(l.attempts, 1);
        assert!(l.message_id.is_some() && l.business_id.is_some());
    }
    assert!(bed.grants().is_empty());

    // The downstream is fixed; an operator replays everything.
    bed.reward.state().set_faults(FaultPlan::default()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mq-cutover"))
        .arg("--config")
        .arg(&bed.config_path)
        .args(["dead", "replay", "--all"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "replayed: {count} delivered, 0 parked again, 0 skipped"
        )),
        "{stdout}"
    );
    let grants = bed.grants();
    for i in 0..count {
        assert_eq!(grants.get(&format!("d-{i}")).copied(), Some(1), "d-{i}");
        assert_eq!(
            bed.record(&format!("d-{i}")).await.unwrap().state,
            State::Done
        );
    }
    assert!(
        bed.dead_letters().await.is_empty(),
        "replayed letters are removed"
    );
    // A second replay finds nothing to do, and the duplicates still in the brokers stay DONE.
    let audit = std::process::Command::new(env!("CARGO_BIN_EXE_mq-cutover"))
        .arg("--config")
        .arg(&bed.config_path)
        .args(["audit", "--count", "100"])
        .output()
        .unwrap();
    let audit = String::from_utf8_lossy(&audit.stdout);
    assert_eq!(audit.matches("replay").count() as u64, count, "{audit}");
}
