//! The operator API under `/api`: the same actions as the CLI (both go through
//! [`crate::control::Control`]), so validation and the audit trail are the same. Who may call it
//! is decided before these handlers run ([`super::auth::guard`]): reads need the viewer or the
//! operator token, writes the operator token.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::arbiter::config::Percent;
use crate::arbiter::switches::{SwitchChange, WhitelistEdit};
use crate::control::{Control, ControlError};
use crate::printable::{printable, printable_parity, printable_record};

/// What the API needs.
#[derive(Clone)]
pub struct ApiState {
    /// The operator actions.
    pub control: Arc<Control>,
}

/// The `/api` routes, unguarded: serve them through [`super::auth::guard`].
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/api/switches", get(get_switches).put(put_switches))
        .route("/api/switches/whitelist", post(edit_whitelist))
        .route("/api/messages/{id}", get(get_message))
        .route("/api/messages/{id}/release", post(release))
        .route("/api/dead", get(dead))
        .route("/api/dead/{entry}/replay", post(replay))
        .route("/api/audit", get(audit))
        .route("/api/parity", get(parity))
        .with_state(state)
}

fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, Json(json!({ "error": msg.into() }))).into_response()
}

fn control_error(e: ControlError) -> Response {
    let code = match &e {
        ControlError::Store(s) if s.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
        ControlError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        ControlError::UnknownId(_) => StatusCode::NOT_FOUND,
        ControlError::NotDead { .. } => StatusCode::CONFLICT,
        ControlError::UnknownDeadLetter(_) => StatusCode::NOT_FOUND,
        ControlError::NoReplay => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(code, e.to_string())
}

/// The caller's address, when the listener records it (it does in the daemon).
#[derive(Debug, Clone, Copy)]
pub struct Peer(Option<SocketAddr>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(a)| *a),
        ))
    }
}

/// The JSON body of a write, or the 400 that says what is wrong with it.
fn write_body<T>(
    body: Result<Json<T>, axum::extract::rejection::JsonRejection>,
) -> Result<T, Box<Response>> {
    body.map(|Json(b)| b).map_err(|e| {
        let code = match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        Box::new(error(code, e.body_text()))
    })
}

fn actor(addr: Option<SocketAddr>) -> String {
    format!(
        "api:{}",
        addr.map_or("unknown".into(), |a| a.ip().to_string())
    )
}

async fn get_switches(State(s): State<ApiState>) -> Response {
    match s.control.switches().await {
        Ok(sw) => {
            let mut wl: Vec<_> = sw
                .whitelist
                .iter()
                .map(|id| printable(id).into_owned())
                .collect();
            wl.sort();
            Json(json!({
                "consume": sw.consume,
                "percent": sw.percent.get(),
                "whitelist": wl,
                "version": sw.version,
            }))
            .into_response()
        }
        Err(e) => control_error(e),
    }
}

/// `PUT /api/switches` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchBody {
    /// New consume switch.
    pub consume: Option<bool>,
    /// New percentage, 0-100.
    pub percent: Option<i64>,
}

async fn put_switches(
    State(s): State<ApiState>,
    peer: Peer,
    body: Result<Json<SwitchBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let body = match write_body(body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let percent = match body.percent.map(Percent::try_from).transpose() {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    if body.consume.is_none() && percent.is_none() {
        return error(StatusCode::BAD_REQUEST, "give consume and/or percent");
    }
    let change = SwitchChange {
        consume: body.consume,
        percent,
        whitelist: None,
    };
    write_switches(&s, &change, peer).await
}

async fn write_switches(s: &ApiState, change: &SwitchChange, peer: Peer) -> Response {
    match s.control.set_switches(change, &actor(peer.0)).await {
        Ok(v) => {
            let after = get_switches(State(s.clone())).await;
            if v.is_none() {
                return (StatusCode::OK, after).into_response();
            }
            after
        }
        Err(e) => control_error(e),
    }
}

/// `POST /api/switches/whitelist` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WhitelistBody {
    /// Business ids to add.
    #[serde(default)]
    pub add: Vec<String>,
    /// Business ids to remove.
    #[serde(default)]
    pub remove: Vec<String>,
}

async fn edit_whitelist(
    State(s): State<ApiState>,
    peer: Peer,
    body: Result<Json<WhitelistBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let body = match write_body(body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    if body
        .add
        .iter()
        .chain(&body.remove)
        .any(|id| id.trim().is_empty())
    {
        return error(StatusCode::BAD_REQUEST, "business ids must not be empty");
    }
    for (ids, edit) in [
        (
            body.add,
            WhitelistEdit::Add as fn(Vec<String>) -> WhitelistEdit,
        ),
        (body.remove, WhitelistEdit::Remove),
    ] {
        if ids.is_empty() {
            continue;
        }
        let change = SwitchChange {
            whitelist: Some(edit(ids)),
            ..Default::default()
        };
        let r = write_switches(&s, &change, peer).await;
        if !r.status().is_success() {
            return r;
        }
    }
    get_switches(State(s)).await
}

async fn get_message(State(s): State<ApiState>, Path(id): Path<String>) -> Response {
    match s.control.inspect(&id).await.map(printable_record) {
        Ok(r) => Json(json!({
            "id": r.id,
            "owner": r.owner,
            "state": r.state.as_str(),
            "attempts": r.attempts,
            "lease": r.lease.map(|(t, left)| json!({ "token": t, "ms_left": left.as_millis() as u64 })),
            "seen_by": r.seen,
            "ambiguous": r.ambiguous,
            "overlaps": r.overlaps,
            "reason": r.reason,
            "first_seen_ms": r.first_seen_ms,
        }))
        .into_response(),
        Err(e) => control_error(e),
    }
}

async fn release(State(s): State<ApiState>, peer: Peer, Path(id): Path<String>) -> Response {
    match s.control.release(&id, &actor(peer.0)).await {
        Ok(reason) => {
            Json(json!({ "released": printable(&id), "was": printable(&reason) })).into_response()
        }
        Err(e) => control_error(e),
    }
}

/// `?count=N`.
#[derive(Debug, Deserialize)]
pub struct Count {
    /// How many entries (default 50, at most 1000).
    pub count: Option<usize>,
}

async fn dead(State(s): State<ApiState>, Query(q): Query<Count>) -> Response {
    match s
        .control
        .dead_letters(q.count.unwrap_or(50).min(1000))
        .await
    {
        Ok(letters) => Json(
            letters
                .into_iter()
                .map(|l| {
                    json!({
                        "entry": printable(&l.entry),
                        "message_id": l.message_id.as_deref().map(printable),
                        "business_id": l.business_id.as_deref().map(printable),
                        "reason": printable(&l.reason), "side": printable(&l.side),
                        "topic": printable(&l.topic),
                        "partition": l.partition, "offset": l.offset, "attempts": l.attempts,
                        "payload": String::from_utf8_lossy(&l.payload),
                    })
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => control_error(e),
    }
}

/// `POST /api/dead/{entry}/replay`: the CLI's `dead replay ENTRY`. Answers 200 with what the
/// replay came to (`delivered`, `parked_again`, `skipped` and why), 404 for an unknown entry.
async fn replay(State(s): State<ApiState>, peer: Peer, Path(entry): Path<String>) -> Response {
    // On a task of its own: a caller that hangs up does not cut a sink call off halfway.
    let control = s.control.clone();
    let by = actor(peer.0);
    let replayed = tokio::spawn(async move {
        let letter = control.dead_letter(&entry).await?;
        let outcome = control.replay(&letter, &by).await?;
        Ok::<_, ControlError>((letter, outcome))
    })
    .await;
    match replayed {
        Ok(Ok((letter, outcome))) => Json(json!({
            "entry": printable(&letter.entry),
            "message_id": letter.message_id.as_deref().map(printable),
            "outcome": outcome.as_str(),
            "detail": printable(&outcome.to_string()),
        }))
        .into_response(),
        Ok(Err(e)) => control_error(e),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("replay failed: {e}"),
        ),
    }
}

async fn audit(State(s): State<ApiState>, Query(q): Query<Count>) -> Response {
    match s.control.audit(q.count.unwrap_or(50).min(1000)).await {
        Ok(entries) => Json(
            entries
                .into_iter()
                .map(|e| {
                    json!({
                        "at_ms": e.at_ms,
                        "by": printable(&e.by),
                        "action": printable(&e.action),
                        "detail": printable(&e.detail),
                    })
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => control_error(e),
    }
}

/// `?since=30m&limit=100` for `GET /api/parity`.
#[derive(Debug, Deserialize)]
struct ParityQuery {
    since: Option<String>,
    limit: Option<usize>,
}

async fn parity(State(s): State<ApiState>, Query(q): Query<ParityQuery>) -> Response {
    let span = match q.since.as_deref().map(humantime::parse_duration) {
        None => std::time::Duration::from_secs(3_600),
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("since: {e}; give a duration such as `30m` or `6h`"),
            )
        }
    };
    match s
        .control
        .parity(span, q.limit.unwrap_or(100).min(10_000))
        .await
    {
        Ok(report) => Json(printable_parity(report)).into_response(),
        Err(e) => control_error(e),
    }
}
