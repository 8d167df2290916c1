//! The admin listener as the daemon assembles it (`admin::listener`), on real Redis, through
//! `Router::oneshot` (no socket): reads behind the viewer or the operator token, writes behind
//! the operator token (each off without its token), the Host check, the body cap, hostile text
//! escaped, the same validation and audit as the CLI. And `/readyz` against the real brokers: not
//! ready, naming the side, until each source has joined its consumer group.

#[path = "../common/mod.rs"]
mod common;
mod replay;
mod status;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use mq_cutover::admin::AdminState;
use mq_cutover::arbiter::{Arbiter, ClaimRequest, CompleteRequest, LeaseTokens, Outcome};
use mq_cutover::config::{Config, Validated};
use mq_cutover::control::Control;
use mq_cutover::store::Store;
use serde_json::{json, Value};
use tower::ServiceExt;

/// The operator token the tests configure (at least 32 bytes, as validation requires).
const OPERATOR: &str = "op-3f9a1c7e5b2d4f6a8c0e1b3d5f7a9c2e";
/// The viewer token the tests configure.
const VIEWER: &str = "vw-8e6c4a2f0d1b3e5c7a9f8d6b4e2c0a1f";

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

/// The admin state of an instance with nothing running: no sources, Redis up, no switches read.
fn idle_admin_state() -> AdminState {
    let (_tx, feed) = tokio::sync::watch::channel(None);
    AdminState {
        metrics: Arc::new(mq_cutover::telemetry::metrics::Metrics::default()),
        redis_up: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        switches: feed,
        breaker: Arc::new(mq_cutover::sink::breaker::CircuitBreaker::new(
            &Default::default(),
        )),
        sources: Arc::from([]),
        redis_problem: Default::default(),
    }
}

/// The example config on this test's prefix, with the operator token `token` (if any) and the
/// viewer token [`VIEWER`].
async fn api(test: &str, token: Option<&str>) -> Api {
    api_with(test, token, Some(VIEWER), &[]).await
}

/// The listener with these tokens and more environment overrides.
async fn api_with(
    test: &str,
    token: Option<&str>,
    viewer: Option<&str>,
    more: &[(&str, &str)],
) -> Api {
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
    if let Some(t) = viewer {
        env.insert("MQ_CUTOVER__ADMIN__VIEWER_TOKEN".into(), t.into());
    }
    for (k, v) in more {
        env.insert((*k).into(), (*v).into());
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mq-cutover.toml");
    let cfg = Config::load_with_env(&path, env)
        .and_then(Config::validate)
        .unwrap();
    let store = common::connect(mq_cutover::config::RedisMode::Standalone, &prefix).await;
    let control = Arc::new(Control::new(&store, &cfg));
    let router = mq_cutover::admin::listener(idle_admin_state(), control, &cfg);
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
async fn writes_are_off_without_the_operator_token() {
    let a = api("api-off", None).await;
    let (code, body) = call(&a, "GET", "/api/switches", Some(VIEWER), None).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body["percent"], 0);
    for token in [Some("x"), Some(VIEWER)] {
        let (code, body) = call(
            &a,
            "PUT",
            "/api/switches",
            token,
            Some(json!({"percent": 10})),
        )
        .await;
        assert_eq!(code, StatusCode::FORBIDDEN, "{body}");
        assert!(body["error"].as_str().unwrap().contains("admin.token"));
    }
}

/// Every read route of the API, as the status page and an operator call them.
const READS: &[&str] = &[
    "/api/switches",
    "/api/messages/m-1",
    "/api/dead",
    "/api/audit",
    "/api/parity",
    "/api/status",
];

#[tokio::test]
async fn every_api_read_needs_the_viewer_or_the_operator_token() {
    let a = api("api-reads", Some(OPERATOR)).await;
    for path in READS {
        for token in [None, Some("wrong"), Some(&VIEWER[..31])] {
            let (code, _) = call(&a, "GET", path, token, None).await;
            assert_eq!(code, StatusCode::UNAUTHORIZED, "{path} with {token:?}");
        }
        for token in [VIEWER, OPERATOR] {
            let (code, body) = call(&a, "GET", path, Some(token), None).await;
            // /api/messages/m-1: no such id, but the read was let through to say so.
            let want = if path.starts_with("/api/messages/") {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::OK
            };
            assert_eq!(code, want, "{path}: {body}");
        }
    }
    // The viewer token writes nothing.
    let (code, body) = call(
        &a,
        "PUT",
        "/api/switches",
        Some(VIEWER),
        Some(json!({"percent": 10})),
    )
    .await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{body}");
}

#[tokio::test]
async fn without_tokens_the_api_is_off_and_metrics_health_and_the_page_stay_open() {
    let a = api_with("api-none", None, None, &[]).await;
    for path in READS {
        let (code, body) = call(&a, "GET", path, None, None).await;
        assert_eq!(code, StatusCode::FORBIDDEN, "{path}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("admin.viewer_token"),
            "{body}"
        );
    }
    for path in ["/metrics", "/healthz", "/readyz", "/", "/status"] {
        let r = a
            .router
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert!(
            r.status() == StatusCode::OK || r.status() == StatusCode::SERVICE_UNAVAILABLE,
            "{path}: {}",
            r.status()
        );
    }
}

/// `GET path` with `Host: host` and the viewer token.
async fn get_with_host(a: &Api, path: &str, host: &str) -> StatusCode {
    let r = Request::get(path)
        .header("host", host)
        .header("authorization", format!("Bearer {VIEWER}"))
        .body(Body::empty())
        .unwrap();
    a.router.clone().oneshot(r).await.unwrap().status()
}

#[tokio::test]
async fn a_rebound_host_gets_neither_the_page_nor_the_api_but_metrics_stay_open() {
    let a = api_with(
        "api-host",
        Some(OPERATOR),
        Some(VIEWER),
        &[(
            "MQ_CUTOVER__ADMIN__ALLOWED_HOSTS",
            "mq.internal.example,10.1.2.3:9464",
        )],
    )
    .await;
    for path in ["/", "/api/dead", "/api/status"] {
        for host in ["attacker.example:9464", "10.1.2.3:80"] {
            assert_eq!(
                get_with_host(&a, path, host).await,
                StatusCode::FORBIDDEN,
                "{path} {host}"
            );
        }
        for host in [
            "localhost:9464",
            "127.0.0.1:9464",
            "mq.internal.example",
            "10.1.2.3:9464",
        ] {
            assert_eq!(
                get_with_host(&a, path, host).await,
                StatusCode::OK,
                "{path} {host}"
            );
        }
    }
    // Prometheus and the kubelet name the pod's address: the open routes answer any Host.
    for path in ["/metrics", "/healthz"] {
        assert_eq!(
            get_with_host(&a, path, "10.9.8.7:9464").await,
            StatusCode::OK,
            "{path}"
        );
    }
}

#[tokio::test]
async fn the_token_is_checked_before_the_body_and_bodies_are_capped() {
    let a = api("api-body", Some(OPERATOR)).await;
    // A body that fails the test if it is read: refused for its token first.
    let poisoned = || {
        Body::from_stream(futures::stream::once(async {
            panic!("the request body was read before the token was checked");
            #[allow(unreachable_code)]
            Ok::<_, std::io::Error>(axum::body::Bytes::new())
        }))
    };
    for token in [None, Some(VIEWER)] {
        let mut r = Request::put("/api/switches").header("content-type", "application/json");
        if let Some(t) = token {
            r = r.header("authorization", format!("Bearer {t}"));
        }
        let r = a
            .router
            .clone()
            .oneshot(r.body(poisoned()).unwrap())
            .await
            .unwrap();
        assert!(r.status().is_client_error(), "{token:?}: {}", r.status());
    }
    // Past the cap: 413, and nothing changed.
    let mut ids: Vec<String> = Vec::new();
    while ids.iter().map(|i| i.len() + 3).sum::<usize>() <= mq_cutover::admin::auth::MAX_BODY_BYTES
    {
        ids.push(format!("user-{:06}", ids.len()));
    }
    let (code, body) = call(
        &a,
        "POST",
        "/api/switches/whitelist",
        Some(OPERATOR),
        Some(json!({ "add": ids })),
    )
    .await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    let (_, body) = call(&a, "GET", "/api/switches", Some(VIEWER), None).await;
    assert_eq!(body["version"], 0, "nothing changed");
}

#[tokio::test]
async fn hostile_ids_and_reasons_come_back_escaped() {
    use mq_cutover::dead::{DeadLetters, Parking};
    let a = api("api-hostile", Some(OPERATOR)).await;
    let origin = mq_cutover::message::Origin {
        side: "kafka".into(),
        topic: "reward".into(),
        partition: 0,
        broker: None,
        offset: 1,
        born_ms: 0,
    };
    DeadLetters::new(&a.store, 1000)
        .park(&[Parking {
            message_id: Some("id\x1b]0;owned\x07"),
            business_id: Some("u\u{202e}1"),
            reason: "HTTP 400: \x1b[2Jok",
            origin: &origin,
            attempts: 1,
            payload: b"{}",
        }])
        .await
        .unwrap();
    let (_, dead) = call(&a, "GET", "/api/dead", Some(VIEWER), None).await;
    assert_eq!(dead[0]["message_id"], "id\\x1b]0;owned\\x07");
    assert_eq!(dead[0]["business_id"], "u\\u{202e}1");
    assert_eq!(dead[0]["reason"], "HTTP 400: \\x1b[2Jok");
    let (_, st) = call(&a, "GET", "/api/status", Some(VIEWER), None).await;
    let newest = &st["dead_letters"]["newest"][0];
    assert_eq!(newest["message_id"], "id\\x1b]0;owned\\x07");
    assert_eq!(newest["reason"], "HTTP 400: \\x1b[2Jok");
}

#[tokio::test]
async fn writes_need_the_right_token_and_are_audited() {
    let a = api("api-token", Some(OPERATOR)).await;
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
        Some(OPERATOR),
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
    let (_, audit) = call(&a, "GET", "/api/audit?count=1", Some(VIEWER), None).await;
    assert_eq!(audit[0]["by"], "api:unknown");
    assert_eq!(audit[0]["detail"], "v1: consume off -> on; percent 0 -> 10");
}

#[tokio::test]
async fn a_percent_out_of_range_or_an_unknown_field_is_a_bad_request() {
    let a = api("api-bad", Some(OPERATOR)).await;
    let (code, body) = call(
        &a,
        "PUT",
        "/api/switches",
        Some(OPERATOR),
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
        Some(OPERATOR),
        Some(json!({"percnt": 5})),
    )
    .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    let (_, body) = call(&a, "GET", "/api/switches", Some(VIEWER), None).await;
    assert_eq!(body["version"], 0, "nothing changed");
}

#[tokio::test]
async fn the_whitelist_is_edited_through_the_api() {
    let a = api("api-whitelist", Some(OPERATOR)).await;
    let (code, body) = call(
        &a,
        "POST",
        "/api/switches/whitelist",
        Some(OPERATOR),
        Some(json!({"add": ["u2", "u1"]})),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["whitelist"], json!(["u1", "u2"]));
    let (_, body) = call(
        &a,
        "POST",
        "/api/switches/whitelist",
        Some(OPERATOR),
        Some(json!({"remove": ["u1"]})),
    )
    .await;
    assert_eq!(body["whitelist"], json!(["u2"]));
}

#[tokio::test]
async fn one_message_is_shown_and_a_dead_one_released() {
    let a = api("api-message", Some(OPERATOR)).await;
    let (code, _) = call(&a, "GET", "/api/messages/nope", Some(VIEWER), None).await;
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
    let (_, body) = call(&a, "GET", "/api/messages/m1", Some(VIEWER), None).await;
    assert_eq!(
        (body["owner"].clone(), body["state"].clone()),
        (json!("kafka"), json!("in-flight"))
    );
    let (code, _) = call(&a, "POST", "/api/messages/m1/release", Some(OPERATOR), None).await;
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
    let (code, body) = call(&a, "POST", "/api/messages/m1/release", Some(OPERATOR), None).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["was"], "HTTP 400");
    let (_, body) = call(&a, "GET", "/api/messages/m1", Some(VIEWER), None).await;
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
            secret_files: Default::default(),
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
        redis_problem: Default::default(),
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
            out: mq_cutover::source::outlet::Outlet::new(
                out,
                mq_cutover::source::outlet::ByteBudget::new(64 << 20, None),
            ),
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
