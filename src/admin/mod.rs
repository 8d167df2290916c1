//! The admin listener: `/metrics` (Prometheus), `/healthz` (alive), `/readyz` (ready to take
//! messages: Redis answers, the switches are known, the sink's circuit is not open; each problem
//! named in the JSON body), the operator API under `/api` ([`api`]), and the status page with the
//! `/api/status` document it reads ([`page`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

pub mod api;
pub mod page;

use crate::arbiter::switches::SwitchFeed;
use crate::sink::breaker::CircuitBreaker;
use crate::telemetry::metrics::Metrics;

/// What the admin routes read.
#[derive(Clone)]
pub struct AdminState {
    /// All metrics.
    pub metrics: Arc<Metrics>,
    /// Set by the Redis health task.
    pub redis_up: Arc<AtomicBool>,
    /// The switches this instance follows.
    pub switches: SwitchFeed,
    /// The sink's circuit.
    pub breaker: Arc<CircuitBreaker>,
}

/// The admin routes.
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
    let mut problems = Vec::new();
    if !s.redis_up.load(Ordering::Relaxed) {
        problems.push("redis unreachable: no message can be claimed");
    }
    if s.switches.borrow().is_none() {
        problems.push("switches not read yet");
    }
    if s.breaker.state().is_open() {
        problems.push("sink circuit open: the sources are paused");
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
            switches: rx,
            breaker: Arc::new(CircuitBreaker::new(&Default::default())),
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
