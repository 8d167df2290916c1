//! Adoption end to end (DESIGN.md invariant 2): the producers drop 1 % of each side's copies, as
//! non-atomic dual writes do, and two daemons still grant every id that reached at least one
//! broker exactly once (or count why twice): an id whose routed owner never gets its copy is
//! adopted by the side that did, which reads its copy again from its own broker.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::harness::{Bed, Setup};

/// What the producer did, per id: copies written to the old and the new side.
fn manifest(path: &std::path::Path) -> BTreeMap<String, (u64, u64)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["id"].as_str().unwrap().to_owned(),
                (v["old"].as_u64().unwrap(), v["new"].as_u64().unwrap()),
            )
        })
        .collect()
}

/// Sums `sample` over every daemon's `/metrics`.
async fn total(bed: &Bed, sample: &str) -> f64 {
    let mut sum = 0.0;
    for d in &bed.daemons {
        sum += d.metric(sample).await;
    }
    sum
}

async fn dropped_copies_at(percent: u8, name: &str) {
    let setup = Setup {
        adopt_after: "3s",
        initial_percent: percent,
        ..Setup::default()
    };
    let mut bed = Bed::new(name, setup).await;
    bed.start_daemon();
    bed.start_daemon();
    let path = bed.dir.path().join("manifest.jsonl");
    let count = 3000;
    bed.produce("a", count, |a| {
        a.missing_old = 0.01;
        a.missing_new = 0.01;
        a.duplicates_old = 0.02;
        a.duplicates_new = 0.02;
        a.seed = u64::from(percent) + 3;
        a.rate = 1500;
        a.manifest = Some(path.clone());
    })
    .await;
    let sent = manifest(&path);
    let reached: BTreeSet<&String> = sent
        .iter()
        .filter(|(_, (old, new))| old + new > 0)
        .map(|(id, _)| id)
        .collect();
    let only_old: Vec<&String> = sent
        .iter()
        .filter(|(_, c)| c.0 > 0 && c.1 == 0)
        .map(|(id, _)| id)
        .collect();
    let only_new: Vec<&String> = sent
        .iter()
        .filter(|(_, c)| c.0 == 0 && c.1 > 0)
        .map(|(id, _)| id)
        .collect();
    assert!(
        only_old.len() >= 10 && only_new.len() >= 10,
        "the seed should drop about 1% of each side: {} {}",
        only_old.len(),
        only_new.len()
    );

    // Every id that reached a broker is granted: the adopted ones after `adopt_after` (3 s) and
    // the adoption index's first check (5 s).
    let limit = Duration::from_secs(180);
    let start = std::time::Instant::now();
    loop {
        let grants = bed.grants();
        let missing: Vec<&&String> = reached
            .iter()
            .filter(|id| !grants.contains_key(id.as_str()))
            .collect();
        if missing.is_empty() {
            break;
        }
        if start.elapsed() > limit {
            let mut why = String::new();
            for id in missing.iter().take(5) {
                why.push_str(&format!("{:?}\n", bed.record(id).await));
            }
            panic!(
                "{} ids that reached a broker were never granted, e.g.:\n{why}{}",
                missing.len(),
                bed.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    let grants = bed.grants();
    assert_eq!(
        grants.len(),
        reached.len(),
        "granted an id that reached no broker"
    );
    for (id, n) in &grants {
        if *n > 1 {
            let r = bed.record(id).await.expect("record");
            assert!(
                r.ambiguous > 0 || r.overlaps > 0,
                "{id} granted {n} times with nothing counted: {r}"
            );
        }
    }
    // Exactly the ids whose routed owner never got a copy were adopted, each by the other side.
    let mut adopted = 0;
    for id in only_old.iter().chain(&only_new) {
        let r = bed.record(id).await.expect("record");
        let observer = if only_old.contains(id) {
            "kafka"
        } else {
            "rocketmq"
        };
        assert_eq!(r.owner, observer, "{r}");
        adopted += u64::from(r.adopted);
    }
    for id in reached
        .iter()
        .filter(|id| !only_old.contains(id) && !only_new.contains(id))
    {
        let r = bed.record(id).await.expect("record");
        assert!(!r.adopted, "an id both sides got was adopted: {r}");
    }
    let counted = total(&bed, "mqc_adopted_total{side=\"kafka\"}").await
        + total(&bed, "mqc_adopted_total{side=\"rocketmq\"}").await;
    assert_eq!(counted as u64, adopted, "mqc_adopted_total");
    let kafka = total(&bed, "mqc_adopted_total{side=\"kafka\"}").await as u64;
    let rocketmq = total(&bed, "mqc_adopted_total{side=\"rocketmq\"}").await as u64;
    match percent {
        // Everything routed to the new side: the old side adopts what the new side never got;
        // what only the new side got is its own.
        100 => {
            assert_eq!(adopted as usize, only_old.len());
            assert_eq!(rocketmq, 0);
        }
        // Both sides own ids, so both adopt some.
        _ => assert!(
            kafka > 0 && rocketmq > 0,
            "kafka {kafka}, rocketmq {rocketmq}"
        ),
    }
    eprintln!(
        "at {percent}%: {} ids, {} only on kafka, {} only on rocketmq, {adopted} adopted",
        reached.len(),
        only_old.len(),
        only_new.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_whose_owner_copy_never_comes_are_adopted_and_granted_once_at_100_percent() {
    dropped_copies_at(100, "e2e-adopt-100").await;
}

/// At 50 % both sides own ids, so both adopt: Kafka reads its copies again with a partition
/// assigned at the offset, RocketMQ pulls its queue at the offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_whose_owner_copy_never_comes_are_adopted_and_granted_once_at_50_percent() {
    dropped_copies_at(50, "e2e-adopt-50").await;
}
