//! `GET /api/status` and the page on real Redis, through `Router::oneshot`: the counts are the
//! ones `/metrics` renders, the switches the ones the instance follows, readiness the one
//! `/readyz` answers, the dead letters the ones in Redis.

use std::collections::HashSet;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use mq_cutover::admin::page::{self, StatusState};
use mq_cutover::admin::AdminState;
use mq_cutover::arbiter::switches::Switches;
use mq_cutover::config::Percent;
use mq_cutover::control::Control;
use mq_cutover::dead::{DeadLetters, Parking};
use mq_cutover::message::Origin;
use mq_cutover::sink::breaker::CircuitBreaker;
use mq_cutover::telemetry::metrics::{Fate, Metrics};
use serde_json::{json, Value};
use tower::ServiceExt;

async fn get(router: &Router, path: &str) -> (StatusCode, Option<String>, String) {
    let r = router
        .clone()
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let code = r.status();
    let csp = r
        .headers()
        .get("content-security-policy")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
    (code, csp, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn the_status_document_carries_the_counts_switches_readiness_and_dead_letters() {
    let a = super::api("api-status", None).await;
    let metrics = Arc::new(Metrics::default());
    let kafka = metrics.side("kafka");
    kafka.message(Fate::Proceed, 7);
    kafka.message(Fate::NotMine, 3);
    kafka.message(Fate::BadInput, 1);
    kafka.call("success");
    kafka.call("retryable");
    kafka.in_flight.inc();
    metrics.side("rocketmq").message(Fate::Duplicate, 2);
    let switches = Switches {
        consume: true,
        percent: "25".parse::<Percent>().unwrap(),
        whitelist: HashSet::from(["u1".to_owned(), "u2".to_owned()]),
        version: 4,
        changed_at_ms: 1,
    };
    let (_tx, feed) = tokio::sync::watch::channel(Some(Arc::new(switches)));
    let admin = AdminState {
        metrics: metrics.clone(),
        // Redis reported away: the status must say not ready, and why, as /readyz does.
        redis_up: Arc::new(AtomicBool::new(false)),
        redis_problem: Default::default(),
        switches: feed,
        breaker: Arc::new(CircuitBreaker::new(&Default::default())),
        sources: Arc::from([]),
    };
    let origin = Origin {
        side: "kafka".into(),
        topic: "reward".into(),
        partition: 0,
        broker: None,
        offset: 9,
        born_ms: 0,
    };
    let letters = DeadLetters::new(&a.store, 1000);
    for n in 0..7 {
        let reason = format!("no message id #{n}");
        letters
            .park(&[Parking {
                message_id: None,
                business_id: None,
                reason: &reason,
                origin: &origin,
                attempts: 0,
                payload: b"?",
            }])
            .await
            .unwrap();
    }
    let control = Arc::new(Control::new(&a.store, &a.cfg));
    let router = page::router(StatusState::new(admin.clone(), control, &a.cfg));

    let (code, _, body) = get(&router, "/api/status").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let st: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(st["instance"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(st["instance"]["sides"], json!(["kafka", "rocketmq"]));
    assert_eq!(
        (st["instance"]["from"].clone(), st["instance"]["to"].clone()),
        (json!("kafka"), json!("rocketmq"))
    );
    assert_eq!(
        st["switches"],
        json!({"known": true, "consume": true, "percent": 25, "whitelist_size": 2,
               "version": 4, "changed_at_ms": 1})
    );
    let k = &st["sides"][0];
    assert_eq!(
        (k["name"].clone(), k["role"].clone()),
        (json!("kafka"), json!("old"))
    );
    assert_eq!(
        k["messages"],
        json!({"proceed": 7, "not_mine": 3, "duplicate": 0, "busy": 0, "dead": 0, "bad_input": 1})
    );
    assert_eq!(
        k["calls"],
        json!({"success": 1, "retryable": 1, "fatal": 0, "ambiguous": 0})
    );
    assert_eq!(st["sides"][1]["messages"]["duplicate"], 2);
    assert_eq!(st["sides"][1]["role"], "new");
    assert_eq!(st["in_flight"], 1);
    assert_eq!(st["circuit"], "closed");
    assert_eq!(st["redis_up"], false);
    assert_eq!(st["ready"], false);
    // The same words as /readyz.
    let (_, _, readyz) = get(&mq_cutover::admin::router(admin), "/readyz").await;
    let readyz: Value = serde_json::from_str(&readyz).unwrap();
    assert_eq!(st["problems"], readyz["problems"]);
    // The dead letters as Redis holds them: all counted, the newest few listed, newest first.
    assert_eq!(st["dead_letters"]["count"], 7);
    let newest = st["dead_letters"]["newest"].as_array().unwrap();
    assert_eq!(newest.len(), page::NEWEST_DEAD_LETTERS);
    assert_eq!(newest[0]["reason"], "no message id #6");
    assert_eq!(newest[0]["message_id"], Value::Null);

    // Every count also appears, with the same value, in /metrics.
    let text = metrics.render();
    assert!(text.contains("mqc_messages_total{fate=\"not_mine\",side=\"kafka\"} 3"));
    assert!(text.contains("mqc_sink_calls_total{class=\"retryable\",side=\"kafka\"} 1"));
}

#[tokio::test]
async fn the_page_is_served_at_the_root_and_at_status_and_loads_nothing_from_elsewhere() {
    let a = super::api("api-page", None).await;
    let (_tx, feed) = tokio::sync::watch::channel(None);
    let admin = AdminState {
        metrics: Arc::new(Metrics::default()),
        redis_up: Arc::new(AtomicBool::new(true)),
        redis_problem: Default::default(),
        switches: feed,
        breaker: Arc::new(CircuitBreaker::new(&Default::default())),
        sources: Arc::from([]),
    };
    let control = Arc::new(Control::new(&a.store, &a.cfg));
    let router = page::router(StatusState::new(admin, control, &a.cfg));
    for path in ["/", "/status"] {
        let (code, csp, body) = get(&page::pages(), path).await;
        assert_eq!(code, StatusCode::OK, "{path}");
        assert_eq!(body, page::STATUS_HTML, "{path}");
        let csp = csp.expect("a content security policy");
        assert!(
            csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
            "{csp}"
        );
    }
    let (_, _, body) = get(&router, "/api/status").await;
    let st: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(st["switches"], json!({"known": false}));
    assert_eq!(st["dead_letters"]["count"], 0);
}
