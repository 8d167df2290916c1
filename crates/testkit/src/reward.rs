//! The fake downstream "reward service": a real HTTP server standing in for the grant-reward API
//! in the demo and the end-to-end tests, with faults injected on purpose.
//!
//! Like the real thing it has no idempotency of its own: every accepted call grants again, so a
//! message delivered twice shows up as an id granted twice. It records every call (message id,
//! side, attempt, body, time, the answer given) so tests can check DESIGN.md's invariants from the
//! receiving end: `GET /stats` for totals, `GET /grants` for per-id counts, `GET /calls?id=X` for
//! one id's history.
//!
//! Faults (`PUT /faults`): a share of calls answered 500 without granting, a share answered 400
//! without granting, a share granted and then left hanging past the client's timeout (the case
//! that makes an outcome ambiguous), and latency added to every call. Decisions come from a seeded
//! RNG, so a run with the same seed and the same call order makes the same decisions.
//!
//! Memory: per-id counters for every id ever called (under 100 bytes each, fine for millions),
//! full call records (with bodies) only for the last [`RECENT_CALLS`] calls.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Full call records kept (the oldest are dropped first; per-id counts are kept for all).
pub const RECENT_CALLS: usize = 10_000;
/// Bytes of each recorded body kept.
const BODY_KEEP_BYTES: usize = 4096;

/// The faults to inject. Rates are probabilities per call (0 to 1, adding up to at most 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultPlan {
    /// Share of calls answered 500 without granting.
    pub error_rate: f64,
    /// Added to every call before it is decided on.
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
    /// Share of calls granted and then answered only after `hang` (longer than the client's
    /// timeout): the client sees a timeout although the reward was granted.
    pub commit_then_timeout_rate: f64,
    /// How long a commit-then-timeout call hangs before answering.
    #[serde(with = "humantime_serde")]
    pub hang: Duration,
    /// Share of calls answered 400 without granting.
    pub bad_request_rate: f64,
    /// RNG seed; the RNG is re-seeded whenever a plan is set, so runs are reproducible.
    pub seed: u64,
}

impl Default for FaultPlan {
    fn default() -> Self {
        Self {
            error_rate: 0.0,
            latency: Duration::ZERO,
            commit_then_timeout_rate: 0.0,
            hang: Duration::from_secs(10),
            bad_request_rate: 0.0,
            seed: 1,
        }
    }
}

impl FaultPlan {
    /// A plan without faults.
    pub fn none() -> Self {
        Self::default()
    }

    /// Checks the rates: each in 0..=1, together at most 1.
    pub fn validate(&self) -> Result<(), RewardError> {
        let rates = [
            ("error_rate", self.error_rate),
            ("commit_then_timeout_rate", self.commit_then_timeout_rate),
            ("bad_request_rate", self.bad_request_rate),
        ];
        for (name, rate) in rates {
            if !(0.0..=1.0).contains(&rate) {
                return Err(RewardError::InvalidPlan(format!(
                    "{name} = {rate} is outside 0..=1, e.g. 0.02"
                )));
            }
        }
        let sum: f64 = rates.iter().map(|(_, r)| r).sum();
        if sum > 1.0 + 1e-9 {
            return Err(RewardError::InvalidPlan(format!(
                "the rates add up to {sum}, more than 1"
            )));
        }
        Ok(())
    }
}

/// Why the reward service refused to start or to take a plan.
#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    /// A fault plan with impossible rates.
    #[error("invalid fault plan: {0}")]
    InvalidPlan(String),
    /// The listener could not be used.
    #[error("reward service socket: {0}")]
    Io(#[from] std::io::Error),
}

/// The answer given to one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    /// 200, reward granted.
    Granted,
    /// 500 injected, nothing granted.
    ErrorInjected,
    /// Granted, then left hanging past the client's timeout.
    CommitThenTimeout,
    /// 400 injected, nothing granted.
    BadRequest,
    /// 400 because the `Idempotency-Key` header was missing.
    MissingKey,
}

impl Answer {
    /// Whether the reward was granted.
    pub fn granted(self) -> bool {
        matches!(self, Answer::Granted | Answer::CommitThenTimeout)
    }
}

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRecord {
    /// The `Idempotency-Key` header (empty when missing).
    pub id: String,
    /// The `X-Mq-Cutover-Side` header.
    pub side: Option<String>,
    /// The `X-Mq-Cutover-Attempt` header.
    pub attempt: Option<u32>,
    /// The body (lossy UTF-8, first 4 KiB).
    pub body: String,
    /// When the call was decided, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// What was answered.
    pub answer: Answer,
}

/// The totals `GET /stats` answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Calls received on `/grant`.
    pub calls: u64,
    /// Grants made (200s plus commit-then-timeouts), duplicates included.
    pub grants: u64,
    /// Distinct ids granted at least once.
    pub ids_granted: u64,
    /// Ids granted exactly once.
    pub granted_once: u64,
    /// Ids granted more than once: duplicates the migration let through.
    pub granted_twice_or_more: u64,
    /// 500s injected.
    pub errors_injected: u64,
    /// Commit-then-timeouts injected.
    pub commit_then_timeout: u64,
    /// 400s injected.
    pub bad_requests: u64,
    /// Calls refused for a missing `Idempotency-Key`.
    pub missing_key: u64,
}

/// One id's history, as `GET /calls?id=X` answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdHistory {
    /// The id.
    pub id: String,
    /// Calls received for it, ever.
    pub calls: u32,
    /// Grants made for it, ever.
    pub grants: u32,
    /// Its calls still among the last [`RECENT_CALLS`], oldest first.
    pub recent: Vec<CallRecord>,
}

#[derive(Debug, Default, Clone, Copy)]
struct IdCounts {
    calls: u32,
    grants: u32,
}

#[derive(Debug, Default)]
struct Ledger {
    stats: Stats,
    per_id: HashMap<Box<str>, IdCounts>,
    recent: VecDeque<CallRecord>,
}

impl Ledger {
    /// Records one call; returns the id's grant count after it.
    fn record(&mut self, call: CallRecord) -> u32 {
        let s = &mut self.stats;
        s.calls += 1;
        match call.answer {
            Answer::ErrorInjected => s.errors_injected += 1,
            Answer::CommitThenTimeout => s.commit_then_timeout += 1,
            Answer::BadRequest => s.bad_requests += 1,
            Answer::MissingKey => s.missing_key += 1,
            Answer::Granted => {}
        }
        let mut grants = 0;
        if call.answer != Answer::MissingKey {
            // Look up before inserting so a known id costs no allocation.
            if !self.per_id.contains_key(call.id.as_str()) {
                self.per_id
                    .insert(call.id.as_str().into(), IdCounts::default());
            }
            let counts = self
                .per_id
                .get_mut(call.id.as_str())
                .expect("inserted just above");
            counts.calls = counts.calls.saturating_add(1);
            if call.answer.granted() {
                counts.grants = counts.grants.saturating_add(1);
                s.grants += 1;
                // Keep the per-id tallies incrementally: /stats must not scan millions of ids.
                match counts.grants {
                    1 => {
                        s.ids_granted += 1;
                        s.granted_once += 1;
                    }
                    2 => {
                        s.granted_once -= 1;
                        s.granted_twice_or_more += 1;
                    }
                    _ => {}
                }
            }
            grants = counts.grants;
        }
        if self.recent.len() == RECENT_CALLS {
            self.recent.pop_front();
        }
        self.recent.push_back(call);
        grants
    }
}

/// What to do with one call, drawn from the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Decision {
    answer: Answer,
    latency: Duration,
    hang: Duration,
}

#[derive(Debug)]
struct Faults {
    plan: FaultPlan,
    rng: StdRng,
}

impl Faults {
    fn new(plan: FaultPlan) -> Self {
        let rng = StdRng::seed_from_u64(plan.seed);
        Self { plan, rng }
    }

    fn decide(&mut self) -> Decision {
        // One draw per call, split into bands, so a seed fixes the whole sequence.
        let r: f64 = self.rng.random();
        let p = &self.plan;
        let answer = if r < p.bad_request_rate {
            Answer::BadRequest
        } else if r < p.bad_request_rate + p.error_rate {
            Answer::ErrorInjected
        } else if r < p.bad_request_rate + p.error_rate + p.commit_then_timeout_rate {
            Answer::CommitThenTimeout
        } else {
            Answer::Granted
        };
        Decision {
            answer,
            latency: p.latency,
            hang: p.hang,
        }
    }
}

/// The service's shared state: the ledger of calls and the fault plan.
#[derive(Debug)]
pub struct RewardState {
    ledger: Mutex<Ledger>,
    faults: Mutex<Faults>,
    /// Ends hanging calls at shutdown.
    cancel: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Counters stay usable even if a handler panicked mid-update; this is a test service.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl RewardState {
    /// Fresh state with `plan` (not validated here; see [`FaultPlan::validate`]).
    pub fn new(plan: FaultPlan, cancel: CancellationToken) -> Self {
        Self {
            ledger: Mutex::new(Ledger::default()),
            faults: Mutex::new(Faults::new(plan)),
            cancel,
        }
    }

    /// The totals.
    pub fn stats(&self) -> Stats {
        lock(&self.ledger).stats
    }

    /// How many times `id` was granted.
    pub fn grants_of(&self, id: &str) -> u32 {
        lock(&self.ledger).per_id.get(id).map_or(0, |c| c.grants)
    }

    /// Every granted id with its grant count.
    pub fn grant_counts(&self) -> BTreeMap<String, u32> {
        lock(&self.ledger)
            .per_id
            .iter()
            .filter(|(_, c)| c.grants > 0)
            .map(|(id, c)| (id.to_string(), c.grants))
            .collect()
    }

    /// One id's history.
    pub fn history(&self, id: &str) -> IdHistory {
        let ledger = lock(&self.ledger);
        let counts = ledger.per_id.get(id).copied().unwrap_or_default();
        IdHistory {
            id: id.to_owned(),
            calls: counts.calls,
            grants: counts.grants,
            recent: ledger
                .recent
                .iter()
                .filter(|c| c.id == id)
                .cloned()
                .collect(),
        }
    }

    /// The plan in force.
    pub fn faults(&self) -> FaultPlan {
        lock(&self.faults).plan.clone()
    }

    /// Replaces the plan and re-seeds the RNG from it.
    pub fn set_faults(&self, plan: FaultPlan) -> Result<(), RewardError> {
        plan.validate()?;
        tracing::info!(?plan, "reward service faults changed");
        *lock(&self.faults) = Faults::new(plan);
        Ok(())
    }

    /// Forgets every call and grant (the plan stays).
    pub fn reset(&self) {
        *lock(&self.ledger) = Ledger::default();
    }

    fn decide(&self) -> Decision {
        lock(&self.faults).decide()
    }

    fn record(&self, call: CallRecord) -> u32 {
        lock(&self.ledger).record(call)
    }
}

/// The routes, over `state`.
pub fn router(state: Arc<RewardState>) -> Router {
    Router::new()
        .route("/grant", post(grant))
        .route("/stats", get(stats))
        .route("/grants", get(grants))
        .route("/calls", get(calls))
        .route("/faults", get(get_faults).put(put_faults))
        .route("/reset", post(reset))
        .with_state(state)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// `POST /grant`: the reward endpoint.
async fn grant(State(state): State<Arc<RewardState>>, headers: HeaderMap, body: Bytes) -> Response {
    let id = header(&headers, "idempotency-key").filter(|id| !id.is_empty());
    let side = header(&headers, "x-mq-cutover-side").map(str::to_owned);
    let attempt = header(&headers, "x-mq-cutover-attempt").and_then(|a| a.trim().parse().ok());
    let kept = &body[..body.len().min(BODY_KEEP_BYTES)];
    let mut call = CallRecord {
        id: id.unwrap_or_default().to_owned(),
        side,
        attempt,
        body: String::from_utf8_lossy(kept).into_owned(),
        at_ms: 0,
        answer: Answer::MissingKey,
    };
    if id.is_none() {
        call.at_ms = now_ms();
        state.record(call);
        return (StatusCode::BAD_REQUEST, "missing Idempotency-Key header").into_response();
    }
    let decision = state.decide();
    if !decision.latency.is_zero() {
        tokio::select! {
            _ = tokio::time::sleep(decision.latency) => {}
            _ = state.cancel.cancelled() => return shutting_down(),
        }
    }
    call.answer = decision.answer;
    call.at_ms = now_ms();
    let id = call.id.clone();
    let grants = state.record(call);
    match decision.answer {
        Answer::Granted => granted(&id, grants),
        Answer::ErrorInjected => {
            (StatusCode::INTERNAL_SERVER_ERROR, "injected error").into_response()
        }
        Answer::BadRequest => (StatusCode::BAD_REQUEST, "injected bad request").into_response(),
        Answer::CommitThenTimeout => {
            // Granted already; the client gives up before this answer comes.
            tokio::select! {
                _ = tokio::time::sleep(decision.hang) => granted(&id, grants),
                _ = state.cancel.cancelled() => shutting_down(),
            }
        }
        Answer::MissingKey => unreachable!("decide() never answers MissingKey"),
    }
}

fn granted(id: &str, grants: u32) -> Response {
    Json(serde_json::json!({ "granted": true, "id": id, "grants": grants })).into_response()
}

fn shutting_down() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
}

async fn stats(State(state): State<Arc<RewardState>>) -> Json<Stats> {
    Json(state.stats())
}

async fn grants(State(state): State<Arc<RewardState>>) -> Json<BTreeMap<String, u32>> {
    Json(state.grant_counts())
}

#[derive(Deserialize)]
struct CallsQuery {
    id: String,
}

async fn calls(
    State(state): State<Arc<RewardState>>,
    Query(q): Query<CallsQuery>,
) -> Json<IdHistory> {
    Json(state.history(&q.id))
}

async fn get_faults(State(state): State<Arc<RewardState>>) -> Json<FaultPlan> {
    Json(state.faults())
}

async fn put_faults(
    State(state): State<Arc<RewardState>>,
    Json(plan): Json<FaultPlan>,
) -> Response {
    match state.set_faults(plan) {
        Ok(()) => Json(state.faults()).into_response(),
        Err(e) => (StatusCode::UNPROCESSABLE_ENTITY, e.to_string()).into_response(),
    }
}

async fn reset(State(state): State<Arc<RewardState>>) -> StatusCode {
    state.reset();
    StatusCode::NO_CONTENT
}

/// A running reward service: its address, its state, and the task serving it.
#[derive(Debug)]
pub struct RewardServer {
    addr: SocketAddr,
    state: Arc<RewardState>,
    task: JoinHandle<std::io::Result<()>>,
}

impl RewardServer {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr><path>`, e.g. `server.url("/grant")`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The shared state, for in-process tests.
    pub fn state(&self) -> &Arc<RewardState> {
        &self.state
    }

    /// Waits until the server has stopped (after its cancellation token fired).
    pub async fn stopped(self) -> std::io::Result<()> {
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
}

/// Serves on `listener` in a spawned task until `cancel` fires; hanging calls end at once then.
pub async fn serve(
    listener: TcpListener,
    plan: FaultPlan,
    cancel: CancellationToken,
) -> Result<RewardServer, RewardError> {
    plan.validate()?;
    let addr = listener.local_addr()?;
    let state = Arc::new(RewardState::new(plan, cancel.clone()));
    let app = router(state.clone());
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(cancel.cancelled_owned())
            .await
    });
    Ok(RewardServer { addr, state, task })
}

/// [`serve`] on a fresh loopback port (127.0.0.1, chosen by the OS): the reward service the
/// integration tests run in their own process, each on its own port.
pub async fn serve_local(
    plan: FaultPlan,
    cancel: CancellationToken,
) -> Result<RewardServer, RewardError> {
    let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
    serve(listener, plan, cancel).await
}

/// `mqc-kit reward-service`: the fake downstream for the demo and tests.
#[derive(Debug, Clone, clap::Args)]
pub struct RewardArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:18080")]
    pub listen: SocketAddr,
    /// Share of calls answered 500 without granting (0 to 1).
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub error_rate: f64,
    /// Latency added to every call, e.g. `5ms`.
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    pub latency: Duration,
    /// Share of calls granted and then left hanging for `--hang` (0 to 1).
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub commit_then_timeout_rate: f64,
    /// How long a commit-then-timeout call hangs; make it longer than the sink's timeout.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub hang: Duration,
    /// Share of calls answered 400 without granting (0 to 1).
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub bad_request_rate: f64,
    /// Seed of the fault RNG.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number, e.g. `0.02`"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("`{s}` is outside 0..=1, e.g. `0.02`"));
    }
    Ok(v)
}

impl RewardArgs {
    /// The fault plan the flags describe.
    pub fn plan(&self) -> FaultPlan {
        FaultPlan {
            error_rate: self.error_rate,
            latency: self.latency,
            commit_then_timeout_rate: self.commit_then_timeout_rate,
            hang: self.hang,
            bad_request_rate: self.bad_request_rate,
            seed: self.seed,
        }
    }
}

/// Binds, logs the address, and serves until `cancel` fires.
pub async fn run(args: RewardArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    let plan = args.plan();
    plan.validate()?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let server = serve(listener, plan.clone(), cancel).await?;
    tracing::info!(addr = %server.addr(), ?plan, "reward service listening");
    server.stopped().await.context("reward service stopped")?;
    tracing::info!("reward service stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(id: &str, answer: Answer) -> CallRecord {
        CallRecord {
            id: id.into(),
            side: Some("kafka".into()),
            attempt: Some(1),
            body: "{}".into(),
            at_ms: 0,
            answer,
        }
    }

    #[test]
    fn ledger_counts_grants_per_id_and_duplicates() {
        let mut l = Ledger::default();
        assert_eq!(l.record(call("a", Answer::Granted)), 1);
        assert_eq!(l.record(call("b", Answer::ErrorInjected)), 0);
        assert_eq!(l.record(call("b", Answer::CommitThenTimeout)), 1);
        assert_eq!(l.record(call("c", Answer::BadRequest)), 0);
        assert_eq!(l.record(call("a", Answer::Granted)), 2);
        assert_eq!(l.record(call("a", Answer::Granted)), 3);
        assert_eq!(l.record(call("", Answer::MissingKey)), 0);
        assert_eq!(
            l.stats,
            Stats {
                calls: 7,
                grants: 4,
                ids_granted: 2,
                granted_once: 1,
                granted_twice_or_more: 1,
                errors_injected: 1,
                commit_then_timeout: 1,
                bad_requests: 1,
                missing_key: 1,
            }
        );
        assert!(!l.per_id.contains_key(""), "a missing key is not an id");
    }

    #[test]
    fn only_the_recent_calls_keep_their_records_but_counts_stay() {
        let state = RewardState::new(FaultPlan::none(), CancellationToken::new());
        state.record(call("first", Answer::Granted));
        for i in 0..RECENT_CALLS {
            state.record(call(&format!("id-{i}"), Answer::Granted));
        }
        let h = state.history("first");
        assert_eq!((h.calls, h.grants), (1, 1));
        assert!(h.recent.is_empty(), "the oldest record was not dropped");
        let h = state.history("id-9999");
        assert_eq!(h.recent.len(), 1);
        assert_eq!(lock(&state.ledger).recent.len(), RECENT_CALLS);
        assert_eq!(state.grant_counts().len(), RECENT_CALLS + 1);
        state.reset();
        assert_eq!(state.stats(), Stats::default());
        assert_eq!(state.grants_of("first"), 0);
    }

    #[test]
    fn decisions_follow_the_rates_and_the_seed() {
        let plan = FaultPlan {
            error_rate: 0.2,
            commit_then_timeout_rate: 0.05,
            bad_request_rate: 0.1,
            seed: 7,
            ..FaultPlan::none()
        };
        let draw = |plan: &FaultPlan| {
            let mut f = Faults::new(plan.clone());
            (0..20_000).map(|_| f.decide().answer).collect::<Vec<_>>()
        };
        let a = draw(&plan);
        assert_eq!(a, draw(&plan), "same seed, different decisions");
        let share = |x: Answer| a.iter().filter(|&&y| y == x).count() as f64 / a.len() as f64;
        assert!((share(Answer::ErrorInjected) - 0.2).abs() < 0.02);
        assert!((share(Answer::CommitThenTimeout) - 0.05).abs() < 0.01);
        assert!((share(Answer::BadRequest) - 0.1).abs() < 0.015);
        assert!((share(Answer::Granted) - 0.65).abs() < 0.02);
        let other = draw(&FaultPlan { seed: 8, ..plan });
        assert_ne!(a, other, "the seed has no effect");
    }

    #[test]
    fn no_faults_means_every_call_is_granted() {
        let mut f = Faults::new(FaultPlan::none());
        assert!((0..1000).all(|_| f.decide().answer == Answer::Granted));
    }

    #[test]
    fn plans_with_impossible_rates_are_refused() {
        for bad in [
            FaultPlan {
                error_rate: 1.5,
                ..FaultPlan::none()
            },
            FaultPlan {
                bad_request_rate: -0.1,
                ..FaultPlan::none()
            },
            FaultPlan {
                commit_then_timeout_rate: f64::NAN,
                ..FaultPlan::none()
            },
            FaultPlan {
                error_rate: 0.6,
                bad_request_rate: 0.6,
                ..FaultPlan::none()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?} accepted");
        }
        FaultPlan {
            error_rate: 0.5,
            bad_request_rate: 0.5,
            ..FaultPlan::none()
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn fault_plans_parse_from_json_with_defaults() {
        let plan: FaultPlan =
            serde_json::from_str(r#"{"error_rate": 0.1, "latency": "5ms"}"#).unwrap();
        assert_eq!(plan.latency, Duration::from_millis(5));
        assert_eq!(plan.hang, Duration::from_secs(10));
        assert_eq!(plan.seed, 1);
        assert!(serde_json::from_str::<FaultPlan>(r#"{"eror_rate": 0.1}"#).is_err());
    }

    #[test]
    fn flags_parse_into_a_plan() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: RewardArgs,
        }
        let cli = Cli::try_parse_from([
            "x",
            "--error-rate",
            "0.2",
            "--latency",
            "5ms",
            "--commit-then-timeout-rate",
            "0.02",
            "--hang",
            "10s",
            "--seed",
            "3",
        ])
        .unwrap();
        assert_eq!(cli.args.listen, "127.0.0.1:18080".parse().unwrap());
        let plan = cli.args.plan();
        assert_eq!(plan.error_rate, 0.2);
        assert_eq!(plan.latency, Duration::from_millis(5));
        assert_eq!(plan.commit_then_timeout_rate, 0.02);
        assert_eq!(plan.bad_request_rate, 0.0);
        assert_eq!(plan.seed, 3);
        assert!(Cli::try_parse_from(["x", "--error-rate", "2"]).is_err());
    }
}
