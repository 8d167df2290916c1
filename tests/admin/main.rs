//! The operator API on real Redis, through `Router::oneshot` (no socket): reads open, writes
//! behind the bearer token (off without one), the same validation and audit as the CLI. And
//! `/readyz` against the real brokers: not ready, naming the side, until each source has joined
//! its consumer group.

#[path = "../common/mod.rs"]
mod common;
mod replay;
mod status;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use mq_cutover::admin::api::{router, ApiState};
use mq_cutover::arbiter::{Arbiter, ClaimRequest, CompleteRequest, LeaseTokens, Outcome};
use mq_cutover::config::{Config, Validated};
use mq_cutover::control::Control;
use mq_cutover::store::Store;
use serde_json::{json, Value};
use tower::ServiceExt;

struct Api {
    router: Router,
    cfg: Validated,
    store: Store,
    prefix: String,
}

impl Drop for Api {
    fn drop(&mut self) {
        common::cleanup(&[common::redis_url()], &self.prefix);
    }
}

async fn api(test: &str, token: Option<&str>) -> Api {
    let prefix = common::unique_prefix(test);
    let mut env: std::collections::BTreeMap<String, String> = [
        ("MQ_CUTOVER__REDIS__URLS", common::redis_url()),
        ("MQ_CUTOVER__REDIS__KEY_PREFIX", prefix.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    if let Some(t) = token {
        env.insert("MQ_CUTOVER__ADMIN__TOKEN".into(), t.into());
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mq-cutover.toml");
    let cfg = Config::load_with_env(&path, env)
        .and_then(Config::validate)
        .unwrap();
    let store = common::connect(mq_cutover::config::RedisMode::Standalone, &prefix).await;
    let router = router(ApiState {
        control: Arc::new(Control::new(&store, &cfg)),
        token: cfg.admin.token.clone(),
    });
    Api {
        router,
        cfg,
        store,
        prefix,
    }
}

async fn call(
    a: &Api,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = match body {
        Some(b) => req
            .header("content-type", "application/json")
            .body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    }
    .unwrap();
    let r = a.router.clone().oneshot(req).await.unwrap();
    let code = r.status();
    let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
    (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test]
async fn reads_are_open_and_writes_are_off_without_a_token() {
    let a = api("api-off", None).await;
    let (code, body) = call(&a, "GET", "/api/switches", None, None).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body["percent"], 0);
    let (code, body) = call(
        &a,
        "PUT",
        "/api/switches",
        Some("x"),
        Some(json!({"percent": 10})),
    )
    .await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{body}");
    assert!(body["error"].as_str().unwrap().contains("admin.token"));
}

#[tokio::test]
async fn writes_need_the_right_token_and_are_audited() {
    let a = api("api-token", Some("t0ken")).await;
    for token in [None, Some("wrong")] {
        let (code, _) = call(
            &a,
            "PUT",
            "/api/switches",
            token,
            Some(json!({"percent": 10})),
        )
        .await;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "{token:?}");
    }
    let (code, body) = call(
        &a,
        "PUT",
        "/api/switches",
        Some("t0ken"),
        Some(json!({"consume": true, "percent": 10})),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(
        (body["consume"].clone(), body["percent"].clone()),
        (json!(true), json!(10))
    );
    // The CLI's implementation sees the same change, and the audit says it came from the API.
    let control = Control::new(&a.store, &a.cfg);
    assert_eq!(control.switches().await.unwrap().percent.get(), 10);
    let (_, audit) = call(&a, "GET", "/api/audit?count=1", None, None).await;
    assert_eq!(audit[0]["by"], "api:unknown");
    assert_eq!(audit[0]["detail"], "v1: consume off -> on; percent 0 -> 10");
}

#[tokio::test]
async fn a_percent_out_of_range_or_an_unknown_field_is_a_bad_request() {
    let a = api("api-bad", Some("t")).await;
    let (code, body) = call(
        &a,
        "PUT",
        "/api/switches",
        Some("t"),
        Some(json!({"percent": 101})),
    )
    .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("between 0 and 100"),
        "{body}"
    );
    let (code, _) = call(
        &a,
        "PUT",
        "/api/switches",
        Some("t"),
        Some(json!({"percnt": 5})),
    )
    .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    let (_, body) = call(&a, "GET", "/api/switches", None, None).await;
    assert_eq!(body["version"], 0, "nothing changed");
}

#[tokio::test]
async fn the_whitelist_is_edited_through_the_api() {
    let a = api("api-whitelist", Some("t")).await;
    let (code, body) = call(
        &a,
        "POST",
        "/api/switches/whitelist",
        Some("t"),
        Some(json!({"add": ["u2", "u1"]})),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["whitelist"], json!(["u1", "u2"]));
    let (_, body) = call(
        &a,
        "POST",
        "/api/switches/whitelist",
        Some("t"),
        Some(json!({"remove": ["u1"]})),
    )
    .await;
    assert_eq!(body["whitelist"], json!(["u2"]));
}

#[tokio::test]
async fn one_message_is_shown_and_a_dead_one_released() {
    let a = api("api-message", Some("t")).await;
    let (code, _) = call(&a, "GET", "/api/messages/nope", None, None).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    let arbiter = Arbiter::new(
        &a.store,
        &common::arbiter_config(Duration::from_secs(30), a.cfg.arbiter.ambiguous, 8),
    );
    let token = LeaseTokens::default().next();
    arbiter
        .claim(&ClaimRequest {
            id: "m1",
            side: "kafka",
            routed_owner: "kafka",
            token: &token,
        })
        .await
        .unwrap();
    let (_, body) = call(&a, "GET", "/api/messages/m1", None, None).await;
    assert_eq!(
        (body["owner"].clone(), body["state"].clone()),
        (json!("kafka"), json!("in-flight"))
    );
    let (code, _) = call(&a, "POST", "/api/messages/m1/release", Some("t"), None).await;
    assert_eq!(code, StatusCode::CONFLICT, "only dead ids can be released");
    arbiter
        .complete(&CompleteRequest {
            id: "m1",
            side: "kafka",
            token: &token,
            outcome: &Outcome::Fatal("HTTP 400".into()),
        })
        .await
        .unwrap();
    let (code, body) = call(&a, "POST", "/api/messages/m1/release", Some("t"), None).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["was"], "HTTP 400");
    let (_, body) = call(&a, "GET", "/api/messages/m1", None, None).await;
    assert_eq!(body["state"], "pending");
}

/// Runs `scripts/testbed ARGS` (`MQC_TESTBED` points elsewhere), failing the test if it fails.
async fn testbed(args: &[&str]) {
    let script = std::env::var("MQC_TESTBED")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/testbed").into());
    let out = tokio::process::Command::new(&script)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    assert!(
        out.status.success(),
        "`scripts/testbed {}` failed (is the test bed up? `scripts/testbed up`):\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn readyz(router: &Router) -> (StatusCode, Value) {
    let r = router
        .clone()
        .oneshot(Request::get("/readyz").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let code = r.status();
    let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
    (code, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_each_side_until_its_consumer_has_joined_its_group() {
    use mq_cutover::admin::AdminState;
    use mq_cutover::arbiter::switches::Switches;
    use mq_cutover::config::{IdSource, KafkaSideConfig, RocketMqSideConfig, SideConfig, SideKind};
    use mq_cutover::sink::breaker::CircuitBreaker;
    use mq_cutover::source::{Membership, SourceContext};
    use mq_cutover::telemetry::metrics::Metrics;
    use std::sync::atomic::AtomicBool;
    use tokio_util::sync::CancellationToken;

    let name = common::unique_prefix("ready");
    testbed(&["topic", "kafka", &name, "2"]).await;
    testbed(&["topic", "rocketmq", &name, "2"]).await;
    let side = |kind: SideKind| SideConfig {
        name: match kind {
            SideKind::Kafka => "kafka".into(),
            SideKind::Rocketmq => "rocketmq".into(),
        },
        kind,
        message_id: IdSource::Header("msg-id".into()),
        business_id: IdSource::JsonPointer("/user_id".into()),
        kafka: (kind == SideKind::Kafka).then(|| KafkaSideConfig {
            bootstrap_servers: std::env::var("MQC_KAFKA_BOOTSTRAP")
                .unwrap_or_else(|_| "127.0.0.1:19092".into()),
            topics: vec![name.clone()],
            group_id: format!("{name}-group"),
            properties: Default::default(),
        }),
        rocketmq: (kind == SideKind::Rocketmq).then(|| {
            RocketMqSideConfig::plain(
                &std::env::var("MQC_ROCKETMQ_NAMESRV").unwrap_or_else(|_| "127.0.0.1:19876".into()),
                &name,
                &format!("{name}-group"),
            )
        }),
    };
    let sides = [side(SideKind::Kafka), side(SideKind::Rocketmq)];
    let metrics = Arc::new(Metrics::default());
    let memberships: Arc<[Membership]> = sides
        .iter()
        .map(|s| Membership::new(s.name.as_str().into(), &metrics, Duration::from_secs(1)))
        .collect();
    let (_switches, feed) = tokio::sync::watch::channel(Some(Arc::new(Switches::default())));
    let router = mq_cutover::admin::router(AdminState {
        metrics,
        redis_up: Arc::new(AtomicBool::new(true)),
        switches: feed,
        breaker: Arc::new(CircuitBreaker::new(&Default::default())),
        sources: memberships.clone(),
    });

    let (code, body) = readyz(&router).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(
        body["problems"],
        json!([
            "side kafka has not joined its consumer group yet",
            "side rocketmq has not joined its consumer group yet"
        ])
    );

    let cancel = CancellationToken::new();
    let (_paused, paused) = tokio::sync::watch::channel(false);
    let mut outs = Vec::new();
    let mut tasks = Vec::new();
    let started = std::time::Instant::now();
    for (s, m) in sides.iter().zip(memberships.iter()) {
        let (out, rx) = tokio::sync::mpsc::channel(16);
        outs.push(rx);
        let source = mq_cutover::source::build(s).unwrap();
        tasks.push(tokio::spawn(source.run(SourceContext {
            side: s.name.as_str().into(),
            out,
            cancel: cancel.clone(),
            paused: paused.clone(),
            membership: m.clone(),
            max_message_bytes: 4 << 20,
        })));
    }
    let mut joined_at = std::collections::BTreeMap::new();
    loop {
        let (code, body) = readyz(&router).await;
        for side in ["kafka", "rocketmq"] {
            let waiting = body["problems"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p.as_str().unwrap().starts_with(&format!("side {side} ")));
            if !waiting {
                joined_at.entry(side).or_insert_with(|| started.elapsed());
            }
        }
        if code == StatusCode::OK {
            assert_eq!(body, json!({"ready": true, "problems": []}));
            break;
        }
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not ready after 60 s: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("sides joined after {joined_at:?}");
    cancel.cancel();
    for t in tasks {
        let r = tokio::time::timeout(Duration::from_secs(30), t).await;
        assert!(matches!(r, Ok(Ok(Ok(())))), "{r:?}");
    }
    drop(outs);
    // The Kafka topic and group go; RocketMQ keeps its (empty) topic, as in its own tests.
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new()
            .set(
                "bootstrap.servers",
                std::env::var("MQC_KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:19092".into()),
            )
            .create()
            .unwrap();
    let opts = rdkafka::admin::AdminOptions::new();
    let _ = admin
        .delete_groups(&[&format!("{name}-group")], &opts)
        .await;
    let _ = admin.delete_topics(&[&name], &opts).await;
}
