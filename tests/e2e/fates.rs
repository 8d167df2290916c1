//! Every fate visible (DESIGN.md invariant 6): a daemon killed while its calls are in flight
//! under `at_most_once` leaves those ids in doubt, and each of them — parked by the claim of its
//! redelivered copy, with no call made — has its dead letter, reachable by `dead list`.

use std::collections::HashSet;
use std::time::Duration;

use mq_cutover::arbiter::State;
use mqc_testkit::reward::FaultPlan;

use crate::common;
use crate::harness::{Bed, Setup};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_mid_call_at_most_once_leaves_every_in_doubt_id_with_its_letter() {
    let setup = Setup {
        policy: "at_most_once",
        lease: "2s",
        // Calls take long enough that many are in flight when the daemon dies.
        faults: FaultPlan {
            latency: Duration::from_millis(300),
            ..FaultPlan::default()
        },
        ..Setup::default()
    };
    let mut bed = Bed::new("e2e-doubt", setup).await;
    bed.start_daemon();
    let count = 600;
    bed.produce("q", count, |a| a.seed = 9).await;
    let busy = common::eventually(Duration::from_secs(90), || async {
        bed.reward.state().stats().grants >= 50
    })
    .await;
    assert!(busy.is_some(), "nothing granted:\n{}", bed.logs());
    bed.daemons[0].kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    bed.daemons[0].restart();
    bed.wait_all_settled("q", count, Duration::from_secs(240))
        .await;

    let grants = bed.grants();
    let letters: HashSet<String> = bed
        .dead_letters()
        .await
        .into_iter()
        .filter_map(|l| l.message_id)
        .collect();
    let mut in_doubt = 0;
    for i in 0..count {
        let id = format!("q-{i}");
        let r = bed.record(&id).await.expect("every id has a record");
        let g = grants.get(&id).copied().unwrap_or(0);
        match r.state {
            State::Done => assert_eq!(g, 1, "{id} granted {g} times at most once: {r}"),
            State::Dead => {
                in_doubt += 1;
                assert!(
                    r.reason.as_deref().unwrap_or("").starts_with("in doubt"),
                    "{r}"
                );
                assert!(g <= 1, "{id} granted {g} times: {r}");
                assert!(letters.contains(&id), "{id} is dead without a letter: {r}");
                assert!(r.letter, "{id}'s letter is not noted: {r}");
            }
            other => panic!("{id} is {other}: {r}"),
        }
    }
    assert!(
        in_doubt > 0,
        "the kill left no call in flight: the test did not test anything\n{}",
        bed.logs()
    );
    eprintln!("{in_doubt} ids in doubt after the kill, each with its letter");
}
