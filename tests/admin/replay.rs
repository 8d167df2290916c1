//! `POST /api/dead/{entry}/replay` on real Redis with the demo reward service as the sink: the
//! same implementation as the CLI's `dead replay` (both call `Control::replay`), behind the token,
//! audited, the letter removed once its fate is recorded.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use mq_cutover::arbiter::{Arbiter, ClaimRequest, CompleteRequest, LeaseTokens, Outcome, State};
use mq_cutover::config::{Config, RedisMode};
use mq_cutover::control::Control;
use mq_cutover::dead::{DeadLetters, Parking};
use mq_cutover::message::Origin;
use mq_cutover::pipeline::{Pause, Shared};

use super::OPERATOR;
use mq_cutover::telemetry::metrics::Metrics;
use mqc_testkit::reward::{FaultPlan, RewardServer};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{call, common, Api};

/// An API whose control can replay, through a pipeline whose sink is a fresh reward service.
struct ReplayApi {
    api: Api,
    reward: RewardServer,
    stop: CancellationToken,
}

impl Drop for ReplayApi {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn replay_api(test: &str, token: &str) -> ReplayApi {
    let stop = CancellationToken::new();
    let reward = mqc_testkit::reward::serve_local(FaultPlan::default(), stop.clone())
        .await
        .expect("reward service");
    let prefix = common::unique_prefix(test);
    let env = [
        ("MQ_CUTOVER__REDIS__URLS", common::redis_url()),
        ("MQ_CUTOVER__REDIS__KEY_PREFIX", prefix.clone()),
        ("MQ_CUTOVER__ADMIN__TOKEN", token.to_owned()),
        ("MQ_CUTOVER__ADMIN__VIEWER_TOKEN", super::VIEWER.to_owned()),
        ("MQ_CUTOVER__SINK__URL", reward.url("/grant")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mq-cutover.toml");
    let cfg = Config::load_with_env(&path, env)
        .and_then(Config::validate)
        .unwrap();
    let store = common::connect(RedisMode::Standalone, &prefix).await;
    let (_tx, feed) = tokio::sync::watch::channel(None);
    let shared = Arc::new(
        Shared::build(
            &cfg,
            &store,
            feed,
            Arc::new(Pause::default()),
            stop.clone(),
            Arc::new(Metrics::default()),
        )
        .unwrap(),
    );
    let control = Arc::new(Control::new(&store, &cfg).with_replay(shared, stop.clone()));
    let router = mq_cutover::admin::listener(super::idle_admin_state(), control, &cfg);
    ReplayApi {
        api: Api {
            router,
            cfg,
            store,
            prefix,
        },
        reward,
        stop,
    }
}

/// Parks `id` the way the pipeline does after a fatal answer: the id dead in Redis, a letter in
/// the stream. Returns the letter's entry id.
async fn park_fatal(a: &Api, id: &str) -> String {
    let arbiter = Arbiter::new(
        &a.store,
        &common::arbiter_config(Duration::from_secs(30), a.cfg.arbiter.ambiguous, 8),
    );
    let token = LeaseTokens::default().next();
    arbiter
        .claim(&ClaimRequest {
            id,
            side: "kafka",
            routed_owner: "kafka",
            token: &token,
        })
        .await
        .unwrap();
    arbiter
        .complete(&CompleteRequest {
            id,
            side: "kafka",
            token: &token,
            outcome: &Outcome::Fatal("HTTP 400".into()),
        })
        .await
        .unwrap();
    park(a, Some(id), "HTTP 400: bad request").await
}

async fn park(a: &Api, id: Option<&str>, reason: &str) -> String {
    let origin = Origin {
        side: "kafka".into(),
        topic: "reward".into(),
        partition: 1,
        broker: None,
        offset: 42,
        born_ms: 0,
    };
    DeadLetters::new(&a.store, 1000)
        .park(&[Parking {
            message_id: id,
            business_id: Some("u7"),
            reason,
            origin: &origin,
            attempts: 1,
            payload: br#"{"user_id":"u7"}"#,
        }])
        .await
        .unwrap()
        .0
        .remove(0)
}

#[tokio::test]
async fn a_dead_letter_replayed_through_the_api_is_delivered_once_removed_and_audited() {
    let r = replay_api("api-replay", OPERATOR).await;
    let a = &r.api;
    let entry = park_fatal(a, "m-replay").await;
    let path = format!("/api/dead/{entry}/replay");

    for token in [None, Some("wrong")] {
        let (code, _) = call(a, "POST", &path, token, None).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "{token:?}");
    }
    assert!(r.reward.state().grant_counts().is_empty(), "nothing sent");

    let (code, body) = call(a, "POST", &path, Some(OPERATOR), None).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"entry": entry, "message_id": "m-replay", "outcome": "delivered", "detail": "delivered"})
    );
    assert_eq!(
        r.reward.state().grant_counts().get("m-replay").copied(),
        Some(1)
    );
    let control = Control::new(&a.store, &a.cfg);
    assert_eq!(
        control.inspect("m-replay").await.unwrap().state,
        State::Done
    );
    assert_eq!(control.dead_letter_count().await.unwrap(), 0, "removed");
    let (_, audit) = call(a, "GET", "/api/audit?count=1", Some(super::VIEWER), None).await;
    assert_eq!(audit[0]["action"], "replay");
    assert_eq!(audit[0]["by"], "api:unknown");
    assert_eq!(audit[0]["detail"], format!("m-replay ({entry}): delivered"));

    // The letter is gone: a second replay is a 404, and nothing is sent again.
    let (code, body) = call(a, "POST", &path, Some(OPERATOR), None).await;
    assert_eq!(code, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(r.reward.state().grant_counts().len(), 1);
}

#[tokio::test]
async fn a_letter_without_a_message_id_is_skipped_and_kept() {
    let r = replay_api("api-replay-noid", OPERATOR).await;
    let a = &r.api;
    let entry = park(a, None, "no message id: header `msg-id` missing").await;
    let (code, body) = call(
        a,
        "POST",
        &format!("/api/dead/{entry}/replay"),
        Some(OPERATOR),
        None,
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["outcome"], "skipped");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("no message id (no message id: header `msg-id` missing)"),
        "{body}"
    );
    let (_, dead) = call(a, "GET", "/api/dead", Some(super::VIEWER), None).await;
    assert_eq!(dead[0]["entry"], entry.as_str(), "the letter stays");
    assert!(r.reward.state().grant_counts().is_empty());
}

#[tokio::test]
async fn replay_is_a_write_route_and_needs_a_pipeline() {
    // No token configured: off, like every write.
    let a = super::api("api-replay-off", None).await;
    let (code, _) = call(&a, "POST", "/api/dead/1-0/replay", Some(OPERATOR), None).await;
    assert_eq!(code, StatusCode::FORBIDDEN);
    // A control built without a pipeline refuses instead of pretending.
    let a = super::api("api-replay-nopipe", Some(OPERATOR)).await;
    let entry = park_fatal(&a, "m-nopipe").await;
    let (code, body) = call(
        &a,
        "POST",
        &format!("/api/dead/{entry}/replay"),
        Some(OPERATOR),
        None,
    )
    .await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let (code, _) = call(&a, "POST", "/api/dead/1-0/replay", Some(OPERATOR), None).await;
    assert_eq!(
        code,
        StatusCode::NOT_FOUND,
        "an unknown entry is named first"
    );
}
