//! The switches on real Redis: propagation between instances, the refresh safety net, audit,
//! seeding, and keeping the last known switches through a Redis outage.

#[path = "../common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use mq_cutover::arbiter::routing::{route, Route};
use mq_cutover::arbiter::switches::{self, SwitchChange, SwitchStore, WhitelistEdit};
use mq_cutover::config::{InitialSwitches, Percent, RedisMode};
use mq_cutover::store::Store;
use tokio_util::sync::CancellationToken;

fn percent(p: i64) -> Percent {
    Percent::try_from(p).unwrap()
}

fn urls(mode: RedisMode) -> Vec<String> {
    common::testbed_urls(mode)
}

/// Two instances (separate connections); one changes the percentage ten times, the other must
/// see each change within a second.
async fn propagation(mode: RedisMode) {
    let prefix = common::unique_prefix("propagate");
    let a = SwitchStore::new(&common::connect(mode, &prefix).await);
    let b_store = common::connect(mode, &prefix).await;
    let stop = CancellationToken::new();
    let (mut feed, _task) = switches::follow(
        SwitchStore::new(&b_store),
        Duration::from_secs(1),
        stop.clone(),
    );
    feed.wait_for(|s| s.is_some()).await.unwrap();
    let mut worst = Duration::ZERO;
    for p in [10, 50, 100, 0, 25, 75, 1, 99, 42, 7] {
        let change = SwitchChange {
            consume: Some(true),
            percent: Some(percent(p)),
            whitelist: None,
        };
        let sent = Instant::now();
        a.set(&change, "test:a").await.unwrap().expect("a change");
        let seen = tokio::time::timeout(
            Duration::from_secs(1),
            feed.wait_for(|s| s.as_ref().is_some_and(|s| s.percent.get() == p as u8)),
        )
        .await;
        assert!(
            seen.is_ok(),
            "instance b did not see percent {p} within 1 s"
        );
        worst = worst.max(sent.elapsed());
    }
    stop.cancel();
    common::cleanup(&urls(mode), &prefix);
    eprintln!("{mode:?}: slowest propagation {worst:?}");
}

#[tokio::test]
async fn a_change_on_one_instance_reaches_another_within_a_second() {
    propagation(RedisMode::Standalone).await;
}

#[tokio::test]
async fn a_change_reaches_another_instance_within_a_second_on_redis_cluster() {
    propagation(RedisMode::Cluster).await;
}

#[tokio::test]
async fn the_periodic_refresh_catches_a_change_without_notification() {
    let prefix = common::unique_prefix("refresh");
    let store = common::connect(RedisMode::Standalone, &prefix).await;
    let stop = CancellationToken::new();
    let (mut feed, _task) = switches::follow(
        SwitchStore::new(&store),
        Duration::from_millis(300),
        stop.clone(),
    );
    feed.wait_for(|s| s.is_some()).await.unwrap();
    // Change the hash behind the daemon's back: no PUBLISH, as if the notification were lost.
    let mut conn = store.conn();
    let _: () = redis::cmd("HSET")
        .arg(format!("{prefix}:{{ctl}}:switches"))
        .arg("consume")
        .arg("1")
        .arg("percent")
        .arg("33")
        .arg("version")
        .arg("99")
        .arg("at")
        .arg("1")
        .query_async(&mut conn)
        .await
        .unwrap();
    let seen = tokio::time::timeout(
        Duration::from_secs(1),
        feed.wait_for(|s| {
            s.as_ref()
                .is_some_and(|s| s.version == 99 && s.percent.get() == 33)
        }),
    )
    .await;
    stop.cancel();
    common::cleanup(&[common::redis_url()], &prefix);
    assert!(
        seen.is_ok(),
        "the refresh did not pick up an unannounced change within 1 s"
    );
}

#[tokio::test]
async fn every_change_is_audited_with_old_and_new_values() {
    let prefix = common::unique_prefix("audit");
    let s = SwitchStore::new(&common::connect(RedisMode::Standalone, &prefix).await);
    s.set(
        &SwitchChange {
            consume: Some(true),
            percent: Some(percent(10)),
            whitelist: None,
        },
        "cli:ops@host1",
    )
    .await
    .unwrap();
    s.set(
        &SwitchChange {
            whitelist: Some(WhitelistEdit::Add(vec!["u1".into(), "u2".into()])),
            ..Default::default()
        },
        "cli:ops@host2",
    )
    .await
    .unwrap();
    // Setting what is already set changes nothing and writes no entry.
    let none = s
        .set(
            &SwitchChange {
                percent: Some(percent(10)),
                ..Default::default()
            },
            "cli:ops@host3",
        )
        .await
        .unwrap();
    assert_eq!(none, None);
    s.set(
        &SwitchChange {
            whitelist: Some(WhitelistEdit::Remove(vec!["u1".into()])),
            ..Default::default()
        },
        "cli:ops@host4",
    )
    .await
    .unwrap();
    let log = s.audit_log(10).await.unwrap();
    common::cleanup(&[common::redis_url()], &prefix);
    let lines: Vec<(String, String)> = log
        .iter()
        .map(|e| (e.by.clone(), e.detail.clone()))
        .collect();
    assert_eq!(
        lines,
        vec![
            ("cli:ops@host4".into(), "v3: whitelist -u1".into()),
            ("cli:ops@host2".into(), "v2: whitelist +u1,u2".into()),
            (
                "cli:ops@host1".into(),
                "v1: consume off -> on; percent 0 -> 10".into()
            ),
        ]
    );
    assert!(log
        .iter()
        .all(|e| e.at_ms > 1_700_000_000_000 && e.action == "switches"));
}

#[tokio::test]
async fn initial_switches_seed_only_a_new_deployment() {
    let prefix = common::unique_prefix("seed");
    let s = SwitchStore::new(&common::connect(RedisMode::Standalone, &prefix).await);
    let initial = InitialSwitches {
        consume: true,
        percent: percent(5),
        whitelist: vec!["vip".into()],
    };
    assert_eq!(s.seed(&initial, "config:test").await.unwrap(), Some(1));
    s.set(
        &SwitchChange {
            percent: Some(percent(60)),
            ..Default::default()
        },
        "cli",
    )
    .await
    .unwrap();
    // A restart with the same config must not undo the operator's change.
    assert_eq!(s.seed(&initial, "config:test").await.unwrap(), None);
    let now = s.get().await.unwrap();
    common::cleanup(&[common::redis_url()], &prefix);
    assert!(now.consume);
    assert_eq!(now.percent.get(), 60);
    assert!(now.whitelist.contains("vip"));
}

#[tokio::test]
async fn a_whitelisted_id_routes_new_as_soon_as_the_instance_sees_it() {
    let prefix = common::unique_prefix("whitelist");
    let store = common::connect(RedisMode::Standalone, &prefix).await;
    let s = SwitchStore::new(&store);
    s.set(
        &SwitchChange {
            consume: Some(true),
            percent: Some(percent(0)),
            whitelist: None,
        },
        "t",
    )
    .await
    .unwrap();
    let stop = CancellationToken::new();
    let (mut feed, _task) = switches::follow(s.clone(), Duration::from_secs(1), stop.clone());
    let before = feed
        .wait_for(|x| x.as_ref().is_some_and(|x| x.consume))
        .await
        .unwrap()
        .clone()
        .unwrap();
    assert_eq!(route(&before, "tester-1"), Route::Old);
    s.set(
        &SwitchChange {
            whitelist: Some(WhitelistEdit::Add(vec!["tester-1".into()])),
            ..Default::default()
        },
        "t",
    )
    .await
    .unwrap();
    let after = tokio::time::timeout(
        Duration::from_secs(1),
        feed.wait_for(|x| x.as_ref().is_some_and(|x| !x.whitelist.is_empty())),
    )
    .await
    .expect("whitelist change seen within 1 s")
    .unwrap()
    .clone()
    .unwrap();
    stop.cancel();
    common::cleanup(&[common::redis_url()], &prefix);
    assert_eq!(route(&after, "tester-1"), Route::New);
    assert_eq!(route(&after, "tester-2"), Route::Old);
}

#[tokio::test]
async fn the_last_known_switches_stay_in_force_while_redis_is_away() {
    let mut redis = common::PrivateRedis::start();
    let cfg = common::redis_config_for(RedisMode::Standalone, vec![redis.url()], "outage");
    let store = Store::connect(&cfg, false).await.unwrap();
    let s = SwitchStore::new(&store);
    s.set(
        &SwitchChange {
            consume: Some(true),
            percent: Some(percent(30)),
            whitelist: None,
        },
        "t",
    )
    .await
    .unwrap();
    let stop = CancellationToken::new();
    let (mut feed, _task) = switches::follow(s.clone(), Duration::from_millis(100), stop.clone());
    feed.wait_for(|x| x.as_ref().is_some_and(|x| x.percent.get() == 30))
        .await
        .unwrap();
    redis.stop();
    // Several refreshes fail meanwhile; the switches must not fall back to anything.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = feed.borrow().clone().unwrap();
    assert!(during.consume);
    assert_eq!(during.percent.get(), 30);
    // Redis returns empty (no persistence): "no switches" must not replace the known ones.
    redis.restart();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let after_loss = feed.borrow().clone().unwrap();
    assert_eq!((after_loss.consume, after_loss.percent.get()), (true, 30));
    // A new change is followed again.
    let s2 = SwitchStore::new(&Store::connect(&cfg, false).await.unwrap());
    let ok = common::eventually(Duration::from_secs(10), || {
        let s2 = s2.clone();
        async move {
            s2.set(
                &SwitchChange {
                    consume: Some(true),
                    percent: Some(percent(80)),
                    whitelist: None,
                },
                "t",
            )
            .await
            .is_ok()
        }
    })
    .await;
    assert!(ok.is_some());
    let seen = tokio::time::timeout(
        Duration::from_secs(5),
        feed.wait_for(|x| x.as_ref().is_some_and(|x| x.percent.get() == 80)),
    )
    .await;
    stop.cancel();
    assert!(
        seen.is_ok(),
        "the follower did not recover after redis came back"
    );
}

#[tokio::test]
async fn a_password_from_the_config_authenticates_and_a_wrong_one_is_refused_without_echoing_it() {
    let redis = common::PrivateRedis::start_with_password("s3cret-pw");
    let mut cfg = common::redis_config_for(RedisMode::Standalone, vec![redis.url()], "auth");
    // No password: refused.
    let refused = match Store::connect(&cfg, false).await {
        Err(_) => true,
        Ok(s) => s.ping().await.is_err(),
    };
    assert!(
        refused,
        "a server with requirepass answered without a password"
    );
    cfg.password = Some(serde_json::from_value(serde_json::json!("wrong-pw")).unwrap());
    let err = match Store::connect(&cfg, false).await {
        Err(e) => e.to_string(),
        Ok(s) => s
            .ping()
            .await
            .expect_err("a wrong password must not work")
            .to_string(),
    };
    assert!(
        !err.contains("wrong-pw"),
        "the password leaked into an error: {err}"
    );
    cfg.password = Some(serde_json::from_value(serde_json::json!("s3cret-pw")).unwrap());
    let store = Store::connect(&cfg, false)
        .await
        .expect("the right password connects");
    let s = SwitchStore::new(&store);
    s.set(
        &SwitchChange {
            percent: Some(percent(5)),
            ..Default::default()
        },
        "t",
    )
    .await
    .unwrap();
    assert_eq!(s.get().await.unwrap().percent.get(), 5);
    assert!(
        !format!("{cfg:?}").contains("s3cret-pw"),
        "Debug shows the password"
    );
}
