//! The status page an operator keeps open during a cut-over (`GET /` and `/status`), and the one
//! JSON document it reads (`GET /api/status`): the instance, the switches it follows, per-side
//! counts by fate and sink call class, calls in flight, the circuit, Redis, readiness and the
//! newest dead letters.
//!
//! The page is one self-contained HTML document compiled into the binary: no CDN, no external
//! fetch, so it works on a closed network. It refreshes itself from `/api/status` and
//! `/api/parity?since=1h` every two seconds, computes the per-side rates from successive samples,
//! and marks every value it shows with a stable `data-field` attribute. It only reads.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, Request};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use tower::ServiceExt;

use super::AdminState;
use crate::config::{SideKind, Validated};
use crate::control::Control;
use crate::printable::printable;
use crate::telemetry::metrics::SideSnapshot;

/// The page, as served.
pub const STATUS_HTML: &str = include_str!("status.html");

/// How many of the newest dead letters `/api/status` lists.
pub const NEWEST_DEAD_LETTERS: usize = 5;

/// How long `/api/status` waits for Redis (dead letters) before answering without them.
const REDIS_WAIT: Duration = Duration::from_secs(1);

/// Content-Security-Policy of the page: its own inline script and style, requests to this
/// listener only, nothing from anywhere else.
const PAGE_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// One configured side, as the status shows it.
#[derive(Debug, Clone)]
struct SideInfo {
    name: String,
    kind: SideKind,
    /// `old`, `new`, or `other` for a side outside the cut-over pair.
    role: &'static str,
}

/// What does not change while the daemon runs.
#[derive(Debug)]
struct Instance {
    version: &'static str,
    sides: Vec<SideInfo>,
    from: String,
    to: String,
    started: Instant,
    started_ms: u64,
}

/// What the page routes read.
#[derive(Clone)]
pub struct StatusState {
    admin: AdminState,
    /// The admin routes, asked for `/readyz` so that the page and the probe never disagree.
    readiness: Router,
    control: Arc<Control>,
    instance: Arc<Instance>,
}

impl StatusState {
    /// The state of one daemon: its admin state, its operator handle and its config. The uptime
    /// counts from here.
    pub fn new(admin: AdminState, control: Arc<Control>, cfg: &Validated) -> StatusState {
        let role = |name: &str| {
            if name == cfg.cutover.from {
                "old"
            } else if name == cfg.cutover.to {
                "new"
            } else {
                "other"
            }
        };
        let instance = Instance {
            version: env!("CARGO_PKG_VERSION"),
            sides: cfg
                .sides
                .iter()
                .map(|s| SideInfo {
                    name: s.name.clone(),
                    kind: s.kind,
                    role: role(&s.name),
                })
                .collect(),
            from: cfg.cutover.from.clone(),
            to: cfg.cutover.to.clone(),
            started: Instant::now(),
            started_ms: now_ms(),
        };
        StatusState {
            readiness: super::router(admin.clone()),
            admin,
            control,
            instance: Arc::new(instance),
        }
    }
}

/// `/` and `/status`: the page, which holds no data (it asks for a token and reads the API).
pub fn pages() -> Router {
    Router::new()
        .route("/", get(page))
        .route("/status", get(page))
}

/// `/api/status`, unguarded: serve it through [`super::auth::guard`] with the API.
pub fn router(state: StatusState) -> Router {
    Router::new()
        .route("/api/status", get(status))
        .with_state(state)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_SECURITY_POLICY, PAGE_CSP),
        ],
        STATUS_HTML,
    )
        .into_response()
}

/// `ready` and `problems` exactly as `/readyz` answers them now.
async fn readiness(s: &StatusState) -> (bool, Value) {
    let asked = s
        .readiness
        .clone()
        .oneshot(Request::get("/readyz").body(Body::empty()).expect("valid"))
        .await;
    let body = match asked {
        Ok(r) => axum::body::to_bytes(r.into_body(), 64 * 1024).await.ok(),
        Err(never) => match never {},
    };
    let v: Value = body
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    match (v["ready"].as_bool(), v.get("problems")) {
        (Some(ready), Some(problems)) => (ready, problems.clone()),
        _ => (false, json!(["readiness could not be read"])),
    }
}

fn side_json(side: &SideInfo, snap: &SideSnapshot) -> Value {
    let counts = |pairs: &[(&'static str, u64)]| {
        pairs
            .iter()
            .map(|(k, n)| ((*k).to_owned(), json!(n)))
            .collect::<Map<_, _>>()
    };
    json!({
        "name": side.name,
        "kind": side.kind,
        "role": side.role,
        "messages": counts(&snap.messages),
        "calls": counts(&snap.calls),
        "in_flight": snap.in_flight,
        "dead_letters": snap.dead_letters,
        "ambiguous": snap.ambiguous,
        "overlaps": snap.overlaps,
    })
}

/// The dead-letter count and the newest few, or why they are missing.
async fn dead_letters(control: &Control) -> Value {
    let read = tokio::time::timeout(REDIS_WAIT, async {
        tokio::try_join!(
            control.dead_letter_count(),
            control.dead_letters(NEWEST_DEAD_LETTERS)
        )
    })
    .await;
    match read {
        Ok(Ok((count, newest))) => json!({
            "count": count,
            "newest": newest.iter().map(|l| json!({
                "entry": printable(&l.entry),
                "message_id": l.message_id.as_deref().map(printable),
                "side": printable(&l.side),
                "reason": printable(&l.reason),
                "attempts": l.attempts,
            })).collect::<Vec<_>>(),
            "error": null,
        }),
        Ok(Err(e)) => json!({ "count": null, "newest": [], "error": e.to_string() }),
        Err(_) => json!({
            "count": null,
            "newest": [],
            "error": format!("redis did not answer within {REDIS_WAIT:?}"),
        }),
    }
}

async fn status(State(s): State<StatusState>) -> Response {
    let ((ready, problems), dead) = tokio::join!(readiness(&s), dead_letters(&s.control));
    let switches = match s.admin.switches.borrow().clone() {
        Some(sw) => json!({
            "known": true,
            "consume": sw.consume,
            "percent": sw.percent.get(),
            "whitelist_size": sw.whitelist.len(),
            "version": sw.version,
            "changed_at_ms": sw.changed_at_ms,
        }),
        None => json!({ "known": false }),
    };
    let mut in_flight = 0;
    let sides: Vec<Value> = s
        .instance
        .sides
        .iter()
        .map(|side| {
            let snap = s.admin.metrics.snapshot(&side.name);
            in_flight += snap.in_flight;
            side_json(side, &snap)
        })
        .collect();
    let i = &s.instance;
    Json(json!({
        "instance": {
            "version": i.version,
            "from": i.from,
            "to": i.to,
            "sides": i.sides.iter().map(|x| &x.name).collect::<Vec<_>>(),
            "started_ms": i.started_ms,
            "uptime_ms": i.started.elapsed().as_millis() as u64,
            "now_ms": now_ms(),
        },
        "switches": switches,
        "sides": sides,
        "in_flight": in_flight,
        "circuit": s.admin.breaker.state().as_str(),
        "redis_up": s.admin.redis_up.load(std::sync::atomic::Ordering::Relaxed),
        "ready": ready,
        "problems": problems,
        "dead_letters": dead,
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_self_contained() {
        // No resource from anywhere else: the operators' network may be closed.
        for outside in ["http://", "https://", "//cdn", "<link", "src=\"", "@import"] {
            assert!(!STATUS_HTML.contains(outside), "page refers to {outside}");
        }
        assert!(STATUS_HTML.contains("api/status") && STATUS_HTML.contains("api/parity?since=1h"));
    }

    #[test]
    fn the_page_keeps_the_token_in_memory_only() {
        for storage in [
            "localStorage",
            "sessionStorage",
            "document.cookie",
            "indexedDB",
        ] {
            assert!(!STATUS_HTML.contains(storage), "the page uses {storage}");
        }
        // It sends the token it holds, never the browser's credentials.
        assert!(STATUS_HTML.contains("Authorization: 'Bearer ' + token"));
        assert!(STATUS_HTML.contains("credentials: 'omit'"));
    }

    #[test]
    fn every_fate_and_call_class_has_a_row_on_the_page() {
        let snap = crate::telemetry::metrics::Metrics::default().snapshot("kafka");
        for (label, _) in snap.messages.iter().chain(&snap.calls) {
            assert!(
                STATUS_HTML.contains(&format!("'{label}'")),
                "the page does not show {label}"
            );
        }
    }
}
