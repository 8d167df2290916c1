//! Parity end to end: dual-written traffic with 1% of the ids missing from the new side (and
//! 0.5% from the old side); once both sides have consumed everything and the grace period has
//! passed, `mq-cutover parity`, `GET /api/parity` and the gap metric name exactly those ids; and
//! the ids the old side (their owner, at percent 0) never got are adopted by the new side, so that
//! every id that reached a broker is granted once.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use mq_cutover::parity::ParityReport;

use crate::common;
use crate::harness::{Bed, Setup};

fn parity_cli(bed: &Bed, extra: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mq-cutover"))
        .arg("--config")
        .arg(&bed.config_path)
        .args(["parity", "--since", "30m"])
        .args(extra)
        .output()
        .expect("run mq-cutover parity");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn one_sided(report: &ParityReport) -> BTreeSet<(String, String)> {
    report
        .one_sided
        .iter()
        .map(|o| (o.side.clone(), o.id.clone()))
        .collect()
}

/// Waits until the first daemon's `metric{side="kafka"}` and `{side="rocketmq"}` read `want`.
async fn per_side_becomes(bed: &Bed, metric: &str, want: (u64, u64), limit: Duration) {
    let start = Instant::now();
    loop {
        let mut got = (0, 0);
        for (side, slot) in [("kafka", &mut got.0), ("rocketmq", &mut got.1)] {
            *slot = bed.daemons[0]
                .metric(&format!("{metric}{{side=\"{side}\"}}"))
                .await as u64;
        }
        if got == want {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "{metric}: kafka, rocketmq = {got:?}, expected {want:?}\n{}",
            bed.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_parity_report_names_exactly_the_ids_one_side_never_got() {
    let setup = Setup {
        adopt_after: "3s",
        ..Setup::default()
    };
    let mut bed = Bed::new("parity", setup).await;
    bed.start_daemon();
    let prefix = format!("{}-p", bed.prefix);
    let manifest = bed.dir.path().join("manifest.jsonl");
    let count = 2_000u64;
    bed.produce(&prefix, count, |a| {
        a.missing_new = 0.01;
        a.missing_old = 0.005;
        a.duplicates_new = 0.02;
        a.seed = 11;
        a.manifest = Some(manifest.clone());
    })
    .await;

    // What the producer did: ids with no copy on one side, and how many ids each side got.
    let mut expected = BTreeSet::new();
    let (mut on_old, mut on_new) = (0u64, 0u64);
    for line in std::fs::read_to_string(&manifest).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let id = v["id"].as_str().unwrap().to_owned();
        let (old, new) = (v["old"].as_u64().unwrap(), v["new"].as_u64().unwrap());
        on_old += u64::from(old > 0);
        on_new += u64::from(new > 0);
        match (old > 0, new > 0) {
            (true, false) => expected.insert(("kafka".to_owned(), id)),
            (false, true) => expected.insert(("rocketmq".to_owned(), id)),
            _ => false,
        };
    }
    let only_old = expected.iter().filter(|(s, _)| s == "kafka").count();
    let only_new = expected.len() - only_old;
    assert!(
        (10..=35).contains(&only_old) && (3..=20).contains(&only_new),
        "the seed should leave about 1% and 0.5% one-sided: {only_old}, {only_new}"
    );

    // Both sides have seen every id they will ever get (each side counts an id once, its
    // duplicates and redeliveries not).
    let daemon = &bed.daemons[0];
    let start = Instant::now();
    let healthz = format!("http://127.0.0.1:{}/healthz", daemon.admin_port);
    while reqwest::get(&healthz).await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "admin listener never came up\n{}",
            bed.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    per_side_becomes(
        &bed,
        "mqc_parity_observed_total",
        (on_old, on_new),
        Duration::from_secs(180),
    )
    .await;
    // Past the grace period (2 s in the test config), and past the daemon's hold on sights
    // (`parity::HOLD`) that it sends to Redis only if their pair has not come meanwhile.
    let start = Instant::now();
    let report = loop {
        let (code, json) = parity_cli(&bed, &["--json", "--limit", "1000"]);
        assert_eq!(code, 0, "{json}");
        let report: ParityReport = serde_json::from_str(&json).expect("parity --json parses");
        if one_sided(&report) == expected || start.elapsed() > Duration::from_secs(20) {
            break report;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(one_sided(&report), expected, "{report}");
    assert!(!report.truncated);
    assert_eq!(report.one_sided_total["kafka"], only_old as u64);
    assert_eq!(report.one_sided_total["rocketmq"], only_new as u64);
    assert_eq!(report.totals["kafka"], on_old, "{report}");
    assert_eq!(report.totals["rocketmq"], on_new, "{report}");
    assert_eq!(report.untracked["kafka"] + report.untracked["rocketmq"], 0);

    // The text report lists the same ids; --fail-on-gap turns the gap into exit code 2.
    let (code, text) = parity_cli(&bed, &["--limit", "1000", "--fail-on-gap"]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains(&format!("only on kafka: {only_old}")),
        "{text}"
    );
    for (_, id) in &expected {
        assert!(text.contains(id.as_str()), "{id} missing from\n{text}");
    }

    // The API returns the same report.
    let (status, body) = daemon.admin("api/parity?since=30m&limit=1000").await;
    assert_eq!(status, 200, "{body}");
    let api: ParityReport = serde_json::from_str(&body).unwrap();
    assert_eq!(one_sided(&api), expected);

    // The gap metric, refreshed every 500 ms.
    per_side_becomes(
        &bed,
        "mqc_parity_one_sided_ids",
        (only_old as u64, only_new as u64),
        Duration::from_secs(10),
    )
    .await;
    assert!(
        daemon.log_text().contains("parity gap"),
        "a log line says the gap opened"
    );

    // Every id that reached a broker is delivered once: the ones only the new side got are owned
    // by the old side (the percentage is 0), which never observes them, so the new side adopts
    // them after `adopt_after`; the report counts them (and still lists them as one-sided: the
    // old broker lacks them).
    let want = on_old + only_new as u64;
    let all = common::eventually(Duration::from_secs(90), || async {
        bed.grants().len() as u64 == want
    })
    .await;
    let grants = bed.grants();
    assert!(
        all.is_some(),
        "{} of {want} ids granted\n{}",
        grants.len(),
        bed.logs()
    );
    assert!(grants.values().all(|n| *n == 1), "a duplicate grant");
    for (_, id) in expected.iter().filter(|(side, _)| side == "rocketmq") {
        let r = bed.record(id).await.expect("record");
        assert!(r.adopted && r.owner == "rocketmq", "{r}");
    }
    let (code, json) = parity_cli(&bed, &["--json", "--limit", "1000"]);
    assert_eq!(code, 0, "{json}");
    let report: ParityReport = serde_json::from_str(&json).unwrap();
    assert_eq!(
        report.adopted.get("rocketmq").copied(),
        Some(only_new as u64)
    );
    assert_eq!(report.adopted.get("kafka").copied().unwrap_or(0), 0);
}
