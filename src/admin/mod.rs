//! The admin listener: `/metrics` (Prometheus), `/healthz` (alive), `/readyz` (ready to take
//! messages: every source has joined its consumer group and none is stalled, Redis answers, the
//! switches are known, the sink's circuit is not open; each problem named in the JSON body), the
//! operator API under `/api` ([`api`]), and the status page with the `/api/status` document it
//! reads ([`page`]). The first three are open; the page and the API are behind the guards of
//! [`auth`] (Host check, tokens, caps on bodies and on requests in progress).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

pub mod api;
pub mod auth;
pub mod config;
pub mod page;

use crate::arbiter::switches::SwitchFeed;
use crate::config::Validated;
use crate::control::Control;
use crate::sink::breaker::CircuitBreaker;
use crate::source::Membership;
use crate::telemetry::metrics::Metrics;

/// What the admin routes read.
#[derive(Clone)]
pub struct AdminState {
    /// All metrics.
    pub metrics: Arc<Metrics>,
    /// Set by the Redis health task.
    pub redis_up: Arc<AtomicBool>,
    /// Why Redis is unreachable, in words, while it is (set by the Redis health task).
    pub redis_problem: Arc<std::sync::Mutex<Option<String>>>,
    /// The switches this instance follows.
    pub switches: SwitchFeed,
    /// The sink's circuit.
    pub breaker: Arc<CircuitBreaker>,
    /// The group membership of each configured source: not ready until every one has joined,
    /// nor while one has stalled partitions.
    pub sources: Arc<[Membership]>,
}

/// Everything the daemon's admin listener serves: [`router`] open, the status page and the
/// operator API (through `control`) behind [`auth::guard`], as `cfg`'s `[admin]` says.
pub fn listener(state: AdminState, control: Arc<Control>, cfg: &Validated) -> Router {
    let status = page::StatusState::new(state.clone(), control.clone(), cfg);
    router(state).merge(auth::guard(
        page::pages(),
        api::router(api::ApiState { control }).merge(page::router(status)),
        auth::AdminAuth::new(&cfg.admin),
    ))
}

/// The open admin routes: `/metrics`, `/healthz`, `/readyz`.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({ "alive": true })) }),
        )
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let mut problems: Vec<String> = Vec::new();
    for source in s.sources.iter().filter(|m| !m.has_joined()) {
        problems.push(format!(
            "side {} has not joined its consumer group yet",
            source.side()
        ));
    }
    for source in s.sources.iter() {
        let stalled = source.stalled();
        if !stalled.is_empty() {
            problems.push(format!(
                "side {} stalled: messages wait and nothing was read for {} from {}",
                source.side(),
                humantime::format_duration(source.stall_after()),
                stalled.join(", ")
            ));
        }
        if let Some(why) = source.refused() {
            problems.push(format!("side {}: {why}", source.side()));
        }
        if let Some((why, out_for)) = source.unreachable() {
            // Whole seconds: the reason is read by people and alert rules, not timed.
            let out_for = Duration::from_secs(out_for.as_secs());
            problems.push(format!(
                "side {}: brokers unreachable for {}, nothing is read from them: {why}",
                source.side(),
                humantime::format_duration(out_for)
            ));
        }
    }
    if !s.redis_up.load(Ordering::Relaxed) {
        let why = s
            .redis_problem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        problems.push(match why {
            Some(why) => format!("redis unreachable: no message can be claimed: {why}"),
            None => "redis unreachable: no message can be claimed".into(),
        });
    }
    if s.switches.borrow().is_none() {
        problems.push("switches not read yet".into());
    }
    if s.breaker.state().is_open() {
        problems.push("sink circuit open: the sources are paused".into());
    }
    let ready = problems.is_empty();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(serde_json::json!({ "ready": ready, "problems": problems })),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arbiter::switches::Switches;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    fn state(
        redis: bool,
        switches: bool,
    ) -> (
        AdminState,
        tokio::sync::watch::Sender<Option<Arc<Switches>>>,
    ) {
        let (tx, rx) = tokio::sync::watch::channel(switches.then(|| Arc::new(Switches::default())));
        let s = AdminState {
            metrics: Arc::new(Metrics::default()),
            redis_up: Arc::new(AtomicBool::new(redis)),
            redis_problem: Default::default(),
            switches: rx,
            breaker: Arc::new(CircuitBreaker::new(&Default::default())),
            sources: Arc::from([]),
        };
        (s, tx)
    }

    async fn get(router: Router, path: &str) -> (StatusCode, String) {
        let r = router
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let code = r.status();
        let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        (code, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn ready_only_with_redis_and_switches() {
        let (s, _tx) = state(true, true);
        assert_eq!(get(router(s), "/readyz").await.0, StatusCode::OK);
        let (s, _tx) = state(false, false);
        let (code, body) = get(router(s), "/readyz").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.contains("redis unreachable") && body.contains("switches not read yet"),
            "{body}"
        );
    }

    #[tokio::test]
    async fn not_ready_until_every_source_has_joined_naming_the_side() {
        let (mut s, _tx) = state(true, true);
        let side = |name: &str| Membership::new(name.into(), &s.metrics, Duration::from_secs(5));
        let (kafka, rocketmq) = (side("kafka"), side("rocketmq"));
        s.sources = Arc::from([kafka.clone(), rocketmq.clone()]);
        let (code, body) = get(router(s.clone()), "/readyz").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.contains("side kafka has not joined its consumer group yet")
                && body.contains("side rocketmq has not joined"),
            "{body}"
        );
        kafka.rebalanced(&[]);
        let (code, body) = get(router(s.clone()), "/readyz").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            !body.contains("side kafka") && body.contains("side rocketmq"),
            "{body}"
        );
        rocketmq.rebalanced(&["broker-a/t/0".into()]);
        assert_eq!(get(router(s), "/readyz").await.0, StatusCode::OK);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_side_is_not_ready_naming_its_partitions_until_they_move() {
        let (mut s, _tx) = state(true, true);
        let (_pause, paused) = tokio::sync::watch::channel(false);
        let kafka = Membership::new("kafka".into(), &s.metrics, Duration::from_secs(5))
            .watch_stalls(Duration::from_secs(10), paused);
        kafka.rebalanced(&["t/0".into(), "t/1".into()]);
        s.sources = Arc::from([kafka.clone()]);
        let reading = |queue: &str, position: Option<i64>| {
            let r = crate::source::Reading {
                lag: 8_195,
                waiting: 8_195,
                position,
            };
            (queue.to_string(), r)
        };
        kafka.measured(&[reading("t/0", None), reading("t/1", Some(1))]);
        assert_eq!(get(router(s.clone()), "/readyz").await.0, StatusCode::OK);
        tokio::time::advance(Duration::from_secs(10)).await;
        kafka.measured(&[reading("t/0", None), reading("t/1", Some(2))]);
        let (code, body) = get(router(s.clone()), "/readyz").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.contains(
                "side kafka stalled: messages wait and nothing was read for 10s from t/0"
            ) && !body.contains("t/1"),
            "{body}"
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        kafka.measured(&[reading("t/0", Some(40)), reading("t/1", Some(3))]);
        assert_eq!(get(router(s), "/readyz").await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn a_refused_source_and_the_redis_reason_are_named() {
        let (mut s, _tx) = state(false, true);
        let kafka = Membership::new("kafka".into(), &s.metrics, Duration::from_secs(5));
        kafka.rebalanced(&[]);
        s.sources = Arc::from([kafka.clone()]);
        *s.redis_problem.lock().unwrap() = Some("authentication refused: WRONGPASS".into());
        assert!(kafka.set_refused(Some("TLS handshake failed: x".into())));
        assert!(
            !kafka.set_refused(Some("TLS handshake failed: y".into())),
            "no flip"
        );
        let (code, body) = get(router(s.clone()), "/readyz").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.contains("side kafka: TLS handshake failed: y")
                && body.contains("redis unreachable: no message can be claimed: authentication refused: WRONGPASS"),
            "{body}"
        );
        assert!(kafka.set_refused(None));
        s.redis_up.store(true, Ordering::Relaxed);
        assert_eq!(get(router(s), "/readyz").await.0, StatusCode::OK);
    }

    #[tokio::test(start_paused = true)]
    async fn a_side_that_cannot_reach_its_brokers_is_not_ready_saying_for_how_long() {
        let (mut s, _tx) = state(true, true);
        let kafka = Membership::new("kafka".into(), &s.metrics, Duration::from_secs(5));
        kafka.rebalanced(&["t/0".into()]);
        s.sources = Arc::from([kafka.clone()]);
        assert_eq!(kafka.reached(), None, "nothing to end");
        assert!(kafka.set_unreachable(Some("1/1 brokers are down".into())));
        tokio::time::advance(Duration::from_millis(12_400)).await;
        assert!(
            !kafka.set_unreachable(Some("1/1 brokers are down (again)".into())),
            "no flip"
        );
        let (code, body) = get(router(s.clone()), "/readyz").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.contains(
                "side kafka: brokers unreachable for 12s, nothing is read from them: 1/1 brokers are down (again)"
            ),
            "the first report's time, the last report's words: {body}"
        );
        assert_eq!(
            kafka.reached(),
            Some(Duration::from_millis(12_400)),
            "a record ends the outage"
        );
        assert_eq!(kafka.reached(), None);
        assert_eq!(get(router(s), "/readyz").await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn healthz_and_metrics_answer() {
        let (s, _tx) = state(false, false);
        s.metrics
            .side("kafka")
            .message(crate::telemetry::metrics::Fate::Proceed, 2);
        assert_eq!(get(router(s.clone()), "/healthz").await.0, StatusCode::OK);
        let (code, body) = get(router(s), "/metrics").await;
        assert_eq!(code, StatusCode::OK);
        assert!(
            body.contains("mqc_messages_total{fate=\"proceed\",side=\"kafka\"} 2"),
            "{body}"
        );
    }
}
