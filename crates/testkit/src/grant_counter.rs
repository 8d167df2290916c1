//! The grant counter: the lean downstream the benchmark forwards to. It answers every call 200 at
//! once and only counts — calls, grants per message id (so an id granted twice shows), which side
//! granted, and, when the body carries the producer's send time (`mqc-kit produce --stamp`),
//! the end-to-end time from send to grant, in all and per granting side.
//!
//! Unlike the demo reward service ([`crate::reward`]) it keeps no call records and injects no
//! faults, so that it costs the machine as little as possible and the benchmark measures
//! mq-cutover, not its downstream. `GET /stats` answers the totals and the end-to-end percentiles
//! as JSON; `POST /reset` forgets everything (between benchmark runs).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// `mqc-kit grant-counter` options.
#[derive(Debug, Clone, clap::Args)]
pub struct GrantCounterArgs {
    /// Address to listen on; every path except `/stats` and `/reset` is a grant.
    #[arg(long, default_value = "127.0.0.1:18090")]
    pub listen: SocketAddr,
}

/// The end-to-end times of stamped grants, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latency {
    /// How many grants carried a send time.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Largest.
    pub max_us: u64,
}

/// What `GET /stats` answers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantStats {
    /// Calls received (all granted).
    pub calls: u64,
    /// Distinct ids granted.
    pub ids_granted: u64,
    /// Ids granted more than once.
    pub granted_twice_or_more: u64,
    /// Calls without an `Idempotency-Key` header (granted, not counted per id).
    pub missing_key: u64,
    /// Grants per `X-Mq-Cutover-Side`.
    pub by_side: HashMap<String, u64>,
    /// First and last grant, milliseconds since the Unix epoch (0: none yet).
    pub first_ms: u64,
    /// See `first_ms`.
    pub last_ms: u64,
    /// Send-to-grant times of the stamped grants.
    pub end_to_end: Latency,
    /// The same per `X-Mq-Cutover-Side`: which broker's copy the granted id came through.
    #[serde(default)]
    pub end_to_end_by_side: HashMap<String, Latency>,
}

/// The producer's send time, if the body carries one.
#[derive(Deserialize)]
struct Stamp {
    sent_us: Option<u64>,
}

#[derive(Default)]
struct Tally {
    stats: GrantStats,
    per_id: HashMap<Box<str>, u32>,
    /// Send-to-grant times per granting side; all of them together are the overall times.
    by_side_us: HashMap<String, Vec<u32>>,
}

type Shared = Arc<Mutex<Tally>>;

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

async fn grant(State(tally): State<Shared>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let now = now_us();
    // Parsed outside the lock: the body is the only part that costs anything.
    let sent = serde_json::from_slice::<Stamp>(&body)
        .ok()
        .and_then(|s| s.sent_us);
    let id = headers.get("idempotency-key").and_then(|v| v.to_str().ok());
    let side = headers
        .get("x-mq-cutover-side")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut t = tally.lock().unwrap_or_else(PoisonError::into_inner);
    let t = &mut *t;
    let s = &mut t.stats;
    s.calls += 1;
    if s.first_ms == 0 {
        s.first_ms = now / 1000;
    }
    s.last_ms = now / 1000;
    match s.by_side.get_mut(side) {
        Some(n) => *n += 1,
        None => {
            s.by_side.insert(side.to_owned(), 1);
        }
    }
    match id {
        None => s.missing_key += 1,
        Some(id) => {
            // Look up first so that an id seen before costs no allocation.
            let n = match t.per_id.get_mut(id) {
                Some(n) => {
                    *n += 1;
                    *n
                }
                None => {
                    t.per_id.insert(id.into(), 1);
                    1
                }
            };
            match n {
                1 => s.ids_granted += 1,
                2 => s.granted_twice_or_more += 1,
                _ => {}
            }
        }
    }
    if let Some(sent) = sent {
        let us = now.saturating_sub(sent).min(u64::from(u32::MAX)) as u32;
        match t.by_side_us.get_mut(side) {
            Some(v) => v.push(us),
            None => {
                t.by_side_us.insert(side.to_owned(), vec![us]);
            }
        }
    }
    StatusCode::OK
}

async fn stats(State(tally): State<Shared>) -> Json<GrantStats> {
    let (mut stats, by_side) = {
        let t = tally.lock().unwrap_or_else(PoisonError::into_inner);
        (t.stats.clone(), t.by_side_us.clone())
    };
    let mut all: Vec<u32> = by_side.values().flatten().copied().collect();
    stats.end_to_end = percentiles(&mut all);
    stats.end_to_end_by_side = by_side
        .into_iter()
        .map(|(side, mut v)| (side, percentiles(&mut v)))
        .collect();
    Json(stats)
}

async fn reset(State(tally): State<Shared>) -> StatusCode {
    *tally.lock().unwrap_or_else(PoisonError::into_inner) = Tally::default();
    StatusCode::NO_CONTENT
}

/// Exact percentiles (nearest rank) of `samples`, which it sorts.
fn percentiles(samples: &mut [u32]) -> Latency {
    if samples.is_empty() {
        return Latency::default();
    }
    samples.sort_unstable();
    let rank = |q: f64| {
        let i = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
        u64::from(samples[i])
    };
    Latency {
        count: samples.len() as u64,
        p50_us: rank(0.50),
        p99_us: rank(0.99),
        max_us: u64::from(samples[samples.len() - 1]),
    }
}

/// The router: `GET /stats`, `POST /reset`, and a grant on any other path.
pub fn router() -> Router {
    Router::new()
        .route("/stats", get(stats))
        .route("/reset", post(reset))
        .fallback(grant)
        .with_state(Shared::default())
}

/// Serves until `cancel`.
pub async fn run(args: GrantCounterArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(addr = %args.listen, "grant counter listening");
    axum::serve(listener, router())
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
        .context("grant counter stopped")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt as _;

    fn call(id: &str, body: &str) -> Request<Body> {
        call_from("kafka", id, body)
    }

    fn call_from(side: &str, id: &str, body: &str) -> Request<Body> {
        Request::post("/grant")
            .header("idempotency-key", id)
            .header("x-mq-cutover-side", side)
            .body(Body::from(body.to_owned()))
            .unwrap()
    }

    async fn stats_of(app: &Router) -> GrantStats {
        let res = app
            .clone()
            .oneshot(Request::get("/stats").body(Body::empty()).unwrap())
            .await
            .unwrap();
        let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn counts_grants_per_id_and_duplicates() {
        let app = router();
        for id in ["a", "b", "a", "a"] {
            let res = app.clone().oneshot(call(id, "{}")).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
        }
        let s = stats_of(&app).await;
        assert_eq!(s.calls, 4);
        assert_eq!(s.ids_granted, 2);
        assert_eq!(s.granted_twice_or_more, 1);
        assert_eq!(s.by_side.get("kafka"), Some(&4));
        assert_eq!(s.end_to_end.count, 0);
        assert!(s.end_to_end_by_side.is_empty());
    }

    #[tokio::test]
    async fn end_to_end_times_are_split_by_the_granting_side() {
        let app = router();
        let now = now_us();
        let stamped = |ago_us: u64| format!("{{\"sent_us\":{}}}", now - ago_us);
        // Kafka's grants 1 ms after the send, RocketMQ's 1 s after; one unstamped grant.
        for (side, id, body) in [
            ("kafka", "a", stamped(1_000)),
            ("kafka", "b", stamped(1_000)),
            ("rocketmq", "c", stamped(1_000_000)),
            ("rocketmq", "d", "{}".to_owned()),
        ] {
            app.clone()
                .oneshot(call_from(side, id, &body))
                .await
                .unwrap();
        }
        let s = stats_of(&app).await;
        assert_eq!(s.end_to_end.count, 3);
        let (k, r) = (
            s.end_to_end_by_side["kafka"],
            s.end_to_end_by_side["rocketmq"],
        );
        assert_eq!((k.count, r.count), (2, 1));
        assert!(k.max_us >= 1_000 && k.max_us < 1_000_000, "{k:?}");
        assert!(r.p50_us >= 1_000_000, "{r:?}");
        assert_eq!(s.end_to_end.max_us, r.max_us);
    }

    #[tokio::test]
    async fn stamped_bodies_give_end_to_end_times_and_reset_forgets() {
        let app = router();
        let sent = now_us() - 1_000;
        let body = format!("{{\"amount\":10,\"sent_us\":{sent}}}");
        app.clone().oneshot(call("a", &body)).await.unwrap();
        let s = stats_of(&app).await;
        assert_eq!(s.end_to_end.count, 1);
        assert!(s.end_to_end.max_us >= 1_000, "{:?}", s.end_to_end);
        app.clone()
            .oneshot(Request::post("/reset").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(stats_of(&app).await, GrantStats::default());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<u32> = (1..=100).rev().collect();
        let l = percentiles(&mut v);
        assert_eq!((l.p50_us, l.p99_us, l.max_us, l.count), (50, 99, 100, 100));
    }
}
