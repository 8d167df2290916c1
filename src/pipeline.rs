//! The pipeline of one side: receive → claim → call the sink → record the fate → acknowledge.
//! This is the only place a copy is acknowledged, and only after its fate is in Redis
//! (DESIGN.md invariant 4); a copy whose fate cannot be recorded is handed back, never acked.
//!
//! Claims are batched: everything the source has ready (up to `claim_batch`) goes to Redis in one
//! round trip; completions from all calls in flight are batched the same way by the completer.
//! A copy answered BUSY waits beside the stream, not in it. While Redis is unreachable the
//! sources are paused and the batch in hand waits; nothing proceeds without a claim. An outage is
//! logged when it starts, every [`OUTAGE_REPORT_EVERY`] while it lasts, and when it ends
//! ([`Outage`]), never per copy.

pub mod adopt;
pub mod config;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::arbiter::routing::{route, Route};
use crate::arbiter::switches::{SwitchFeed, Switches};
use crate::arbiter::waiting::{self, WaitEntry};
use crate::arbiter::{
    Arbiter, Claim, ClaimRequest, CompleteRequest, Completion, LeaseToken, LeaseTokens, Outcome,
    Sighting, State,
};
use crate::dead::{DeadLetters, Parking};
use crate::message::{Identity, Message, Side};
use crate::sink::breaker::{Admission, CircuitBreaker};
use crate::sink::retry::Backoff;
use crate::sink::{CallResult, Sink, SinkRequest, Turn};
use crate::source::Position;
use crate::store::StoreError;
use crate::telemetry::metrics::{Fate, Metrics, SideMetrics};

/// Why the sources are paused; each reason is set and cleared on its own.
#[derive(Debug, Clone, Copy)]
pub enum PauseReason {
    /// Redis cannot be reached: nothing can be claimed or recorded.
    RedisDown = 1,
    /// The sink's circuit is open: calls would fail anyway.
    CircuitOpen = 2,
}

/// The pause switch the sources follow: paused while any reason holds.
#[derive(Debug)]
pub struct Pause {
    reasons: Mutex<u8>,
    tx: watch::Sender<bool>,
    pauses: Option<prometheus::IntCounter>,
}

impl Default for Pause {
    fn default() -> Self {
        Self {
            reasons: Mutex::new(0),
            tx: watch::channel(false).0,
            pauses: None,
        }
    }
}

impl Pause {
    /// A pause switch that counts its pauses in `metrics`.
    pub fn counted(metrics: &Metrics) -> Pause {
        Pause {
            pauses: Some(metrics.pauses.clone()),
            ..Pause::default()
        }
    }

    /// Sets or clears one reason; logs when the overall state changes.
    pub fn set(&self, reason: PauseReason, on: bool) {
        let mut r = self.reasons.lock().expect("pause lock");
        let before = *r != 0;
        if on {
            *r |= reason as u8;
        } else {
            *r &= !(reason as u8);
        }
        let after = *r != 0;
        drop(r);
        if before != after {
            if after {
                if let Some(p) = &self.pauses {
                    p.inc();
                }
                tracing::warn!(?reason, "pausing the sources");
            } else {
                tracing::info!("resuming the sources");
            }
            self.tx.send_replace(after);
        }
    }

    /// For the sources: true while paused.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }
}

/// How often a Redis outage that goes on is logged again, with what waits for it.
pub const OUTAGE_REPORT_EVERY: Duration = Duration::from_secs(10);

/// A Redis outage as the pipelines meet it: whatever waits for Redis registers a [`Waiter`]; the
/// first one pauses the sources (`PauseReason::RedisDown`), the last one to go resumes them. One
/// line when it starts (with the error), one every [`OUTAGE_REPORT_EVERY`] while it lasts (with
/// what waits), one when it ends (with how long it took): never one per copy.
#[derive(Debug)]
pub struct Outage {
    pause: Arc<Pause>,
    state: Mutex<OutageState>,
    report_every: Duration,
}

#[derive(Debug, Default)]
struct OutageState {
    /// Since when something waits (None: nothing does).
    since: Option<Instant>,
    reported: Option<Instant>,
    waiters: usize,
    copies: usize,
    outcomes: usize,
}

/// What a [`Waiter`] holds back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// Copies whose claim (or dead letter) Redis has not answered.
    Copies,
    /// Outcomes of calls not recorded yet.
    Outcomes,
}

impl Outage {
    /// An outage tracker that pauses and resumes `pause`.
    pub fn new(pause: Arc<Pause>) -> Outage {
        Outage {
            pause,
            state: Mutex::default(),
            report_every: OUTAGE_REPORT_EVERY,
        }
    }

    /// Registers `n` items of `kind` waiting for Redis after `error`; the first waiter of an
    /// outage pauses the sources and says why.
    pub fn wait(self: &Arc<Self>, kind: Waiting, n: usize, error: &StoreError) -> Waiter {
        let mut s = self.state.lock().expect("outage lock");
        s.waiters += 1;
        *s.count(kind) += n;
        if s.since.is_none() {
            let now = Instant::now();
            s.since = Some(now);
            s.reported = Some(now);
            tracing::error!(%error, "redis unavailable: pausing; nothing proceeds without a claim");
            // Under the lock, so that the pause follows the waiters in the order they come and go.
            self.pause.set(PauseReason::RedisDown, true);
        }
        drop(s);
        Waiter {
            outage: self.clone(),
            kind,
            n,
            answered: false,
        }
    }

    /// Copies and outcomes waiting for Redis right now.
    pub fn waiting(&self) -> (usize, usize) {
        let s = self.state.lock().expect("outage lock");
        (s.copies, s.outcomes)
    }
}

impl OutageState {
    fn count(&mut self, kind: Waiting) -> &mut usize {
        match kind {
            Waiting::Copies => &mut self.copies,
            Waiting::Outcomes => &mut self.outcomes,
        }
    }
}

/// Something waiting for Redis in an [`Outage`]; dropping it ends its wait.
#[derive(Debug)]
pub struct Waiter {
    outage: Arc<Outage>,
    kind: Waiting,
    n: usize,
    answered: bool,
}

impl Waiter {
    /// Another attempt failed; `n` items still wait. Says the outage goes on, once per
    /// [`OUTAGE_REPORT_EVERY`] across all waiters; true when it did.
    pub fn again(&mut self, n: usize, error: &StoreError) -> bool {
        let mut s = self.outage.state.lock().expect("outage lock");
        let count = s.count(self.kind);
        *count = *count + n - self.n;
        self.n = n;
        let due = s
            .reported
            .is_none_or(|at| at.elapsed() >= self.outage.report_every);
        if !due {
            return false;
        }
        s.reported = Some(Instant::now());
        let (since, copies, outcomes) = (s.since, s.copies, s.outcomes);
        drop(s);
        tracing::warn!(
            paused_for = ?since.map(|t| t.elapsed()).unwrap_or_default(),
            copies_waiting = copies,
            outcomes_waiting = outcomes,
            %error,
            "redis still unavailable: sources paused"
        );
        true
    }

    /// Redis answered what this waiter waited for.
    pub fn answered(mut self) {
        self.answered = true;
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut s = self.outage.state.lock().expect("outage lock");
        s.waiters -= 1;
        let count = s.count(self.kind);
        *count -= self.n;
        if s.waiters > 0 {
            return;
        }
        let took = s.since.take().map(|t| t.elapsed()).unwrap_or_default();
        s.reported = None;
        if self.answered {
            tracing::info!(after = ?took, "redis answers again: resuming");
        } else {
            // Given up (shutting down): what waited is handed back unacknowledged.
            tracing::debug!(after = ?took, "no longer waiting for redis");
        }
        self.outage.pause.set(PauseReason::RedisDown, false);
    }
}

/// Settings of the pipeline, from `[pipeline]`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Most copies claimed in one round trip.
    pub claim_batch: usize,
    /// Claim batches one side may have in Redis at once.
    pub claims_in_flight: usize,
    /// Most sink calls in flight per side (each holds a lease).
    pub max_in_flight: usize,
    /// Shortest wait before re-claiming a BUSY copy.
    pub busy_retry: Duration,
    /// `arbiter.retention`: a copy older than this (by its broker timestamp) cannot be
    /// arbitrated any more — its record may be gone — and is parked instead of claimed.
    pub retention: Duration,
    /// Measurement only (`[pipeline.pass_through]`): the side that forwards every copy with no
    /// claim; `None` in normal operation.
    pub pass_through: Option<Side>,
}

/// Everything the pipelines of all sides share.
pub struct Shared {
    /// The arbiter.
    pub arbiter: Arbiter,
    /// The downstream.
    pub sink: Arc<dyn Sink>,
    /// Where parked copies go.
    pub dead: DeadLetters,
    /// The switches as this instance knows them.
    pub switches: SwitchFeed,
    /// Lease tokens of this process.
    pub tokens: LeaseTokens,
    /// Delay between retries of one id.
    pub backoff: Backoff,
    /// The sink's circuit breaker.
    pub breaker: Arc<CircuitBreaker>,
    /// The old and the new side.
    pub cutover: (Side, Side),
    /// The sources' pause switch.
    pub pause: Arc<Pause>,
    /// What waits for Redis (pauses the sources while anything does).
    pub outage: Arc<Outage>,
    /// Batches completions.
    pub completer: Completer,
    /// Records first sights for the dual-read check (`None` when `parity.enabled` is off).
    pub parity: Option<Arc<crate::parity::Recorder>>,
    /// Settings.
    pub settings: Settings,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

impl Shared {
    /// Builds the shared parts from the config: the arbiter, the HTTP sink with its breaker and
    /// backoff, the dead letters and the completer.
    pub fn build(
        cfg: &crate::config::Validated,
        store: &crate::store::Store,
        switches: SwitchFeed,
        pause: Arc<Pause>,
        stop: CancellationToken,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Shared> {
        let arbiter = Arbiter::new(store, &cfg.arbiter);
        let sink = crate::sink::http::HttpSink::new(&cfg.sink)
            .map_err(|e| anyhow::anyhow!("building the sink: {e}"))?;
        let backoff = Backoff::from_config(&cfg.sink.retry)
            .map_err(|e| anyhow::anyhow!("sink.retry: {e}"))?;
        let outage = Arc::new(Outage::new(pause.clone()));
        let completer = Completer::start(
            arbiter.clone(),
            outage.clone(),
            cfg.pipeline.claim_batch,
            stop.clone(),
            metrics.complete_seconds.clone(),
        );
        Ok(Shared {
            arbiter,
            sink: Arc::new(sink),
            dead: DeadLetters::new(store, cfg.dead_letters.max_len),
            switches,
            tokens: LeaseTokens::default(),
            backoff,
            breaker: Arc::new(CircuitBreaker::new(&cfg.sink.circuit)),
            cutover: (
                cfg.cutover.from.as_str().into(),
                cfg.cutover.to.as_str().into(),
            ),
            pause,
            outage,
            completer,
            parity: cfg.parity.enabled.then(|| {
                Arc::new(crate::parity::Recorder::start(
                    Arc::new(crate::parity::Parity::new(store, cfg)),
                    crate::parity::HOLD,
                    stop,
                ))
            }),
            settings: Settings {
                claim_batch: cfg.pipeline.claim_batch,
                claims_in_flight: cfg.pipeline.claims_in_flight,
                max_in_flight: cfg.pipeline.max_in_flight,
                busy_retry: cfg.pipeline.busy_retry,
                retention: cfg.arbiter.retention,
                pass_through: cfg
                    .pipeline
                    .pass_through
                    .as_ref()
                    .map(|p| p.side.as_str().into()),
            },
            metrics,
        })
    }
}

/// How a replay of one dead letter ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replayed {
    /// Delivered now (or found delivered already).
    Done,
    /// Parked again, with this reason (a new dead letter was written).
    DeadAgain(String),
    /// Not delivered now: the id is in flight elsewhere or its owner's copy will do it.
    Elsewhere(String),
}

/// Sends one dead letter through the claim / sink path again, as its owner: the id is released
/// (dead → pending), claimed, called and recorded exactly like a copy from a broker.
pub async fn replay(
    shared: &Arc<Shared>,
    letter: &crate::dead::DeadLetter,
    cancel: &CancellationToken,
) -> Result<Replayed, StoreError> {
    let id = letter.message_id.as_deref().ok_or_else(|| {
        StoreError::Reply("no message id: fix the producer and send it again".into())
    })?;
    shared.arbiter.release(id).await?;
    let owner: Side = match shared.arbiter.inspect(id).await? {
        Some(r) => r.owner.as_str().into(),
        None => letter.side.as_str().into(),
    };
    let token = shared.tokens.next();
    let sent = Instant::now();
    let claim = shared
        .arbiter
        .claim(&ClaimRequest {
            id,
            side: &owner,
            routed_owner: &owner,
            token: &token,
        })
        .await?;
    let attempt = match claim {
        Claim::Proceed { attempt, .. } => attempt,
        Claim::Done => return Ok(Replayed::Done),
        Claim::Dead { reason, .. } => return Ok(Replayed::DeadAgain(reason)),
        other => return Ok(Replayed::Elsewhere(format!("{other:?}"))),
    };
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel();
    let origin = crate::message::Origin {
        side: owner.clone(),
        topic: letter.topic.as_str().into(),
        partition: letter.partition,
        broker: None,
        offset: letter.offset,
        born_ms: 0,
    };
    let msg = Message {
        identity: Ok(Identity {
            id: id.to_owned(),
            business_id: letter.business_id.clone().unwrap_or_default(),
        }),
        payload: letter.payload.clone(),
        received: Instant::now(),
        held: crate::source::outlet::Held::none(),
        ack: crate::message::Ack::new(
            ack_tx,
            crate::message::Finished {
                topic: origin.topic.clone(),
                partition: origin.partition,
                offset: origin.offset,
            },
        ),
        origin,
    };
    let (retry_tx, _retry_rx) = mpsc::unbounded_channel();
    let metrics = shared.metrics.side(&owner);
    let lease = Held {
        token,
        attempt,
        confirmed: sent,
    };
    deliver(shared, &owner, &metrics, msg, lease, cancel, &retry_tx).await;
    if ack_rx.try_recv().is_err() {
        return Ok(Replayed::Elsewhere(
            "interrupted before its fate was recorded".into(),
        ));
    }
    Ok(match shared.arbiter.inspect(id).await? {
        Some(r) if r.state == State::Done => Replayed::Done,
        Some(r) if r.state == State::Dead => Replayed::DeadAgain(r.reason.unwrap_or_default()),
        Some(r) => Replayed::Elsewhere(format!("now {}", r.state)),
        None => Replayed::Elsewhere("record vanished".into()),
    })
}

/// Runs the pipeline of `side` until `cancel`; in-flight calls are tracked by `tracker` so the
/// caller can wait for them with a deadline.
///
/// Up to `pipeline.claims_in_flight` claim batches are in Redis at once: while one round trip is
/// out, the copies that arrive meanwhile go out in the next batch instead of waiting for it. The
/// order in which two batches are answered does not matter to the protocol: a copy's claim is
/// atomic in Redis, and a second copy of the same id (a redelivery) claimed meanwhile is answered
/// BUSY or DONE, as it would be from another instance. On `cancel`, or when the source is gone,
/// no new batch starts and the batches already out are answered and decided before it returns.
pub async fn run_side(
    shared: Arc<Shared>,
    side: Side,
    mut rx: mpsc::Receiver<Message>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    if let Some(forwarding) = shared.settings.pass_through.clone() {
        return pass_through(shared, side, forwarding, rx, cancel, tracker).await;
    }
    let calls = Arc::new(Semaphore::new(shared.settings.max_in_flight));
    let metrics = shared.metrics.side(&side);
    let (retry_tx, mut retry_rx) = mpsc::unbounded_channel::<Message>();
    let depth = shared.settings.claims_in_flight.max(1);
    let max = shared.settings.claim_batch;
    let mut claiming = FuturesUnordered::new();
    let mut taking = true;
    let mut batch = Vec::with_capacity(max);
    loop {
        let room = taking && claiming.len() < depth;
        tokio::select! {
            biased;
            _ = cancel.cancelled(), if taking => taking = false,
            Some(claimed) = claiming.next(), if !claiming.is_empty() => {
                metrics.claims_in_flight.dec();
                let unanswered = match claimed {
                    Some(claimed) => {
                        dispatch(&shared, &side, &metrics, claimed, &calls, &retry_tx, &cancel, &tracker)
                            .await
                    }
                    None => None,
                };
                // Claims Redis did not answer go out again after a pause, with their tokens; they
                // count against `claims_in_flight`, so a side whose claims go unanswered stops
                // taking new copies.
                if let Some(again) = unanswered {
                    metrics.claims_in_flight.inc();
                    claiming.push(
                        reclaim(shared.clone(), side.clone(), metrics.clone(), again, cancel.clone())
                            .boxed(),
                    );
                }
                continue;
            }
            Some(m) = retry_rx.recv(), if room => {
                batch.push(m);
                while batch.len() < max {
                    match retry_rx.try_recv() {
                        Ok(m) => batch.push(m),
                        Err(_) => break,
                    }
                }
            }
            n = rx.recv_many(&mut batch, max), if room => {
                if n == 0 {
                    taking = false; // the source is gone
                }
            }
            else => break,
        }
        if !batch.is_empty() {
            let work = std::mem::replace(&mut batch, Vec::with_capacity(max));
            metrics.claims_in_flight.inc();
            claiming.push(
                claim(
                    shared.clone(),
                    side.clone(),
                    metrics.clone(),
                    work,
                    cancel.clone(),
                )
                .boxed(),
            );
        }
    }
    tracing::info!(side = %side, "pipeline stopped taking copies");
}

/// A batch whose claims Redis answered, in the order of its copies.
struct Claimed {
    copies: Vec<Message>,
    tokens: Vec<LeaseToken>,
    claims: Vec<Result<(Claim, Sighting), StoreError>>,
    /// When the claims were sent: no lease granted by them ends before this plus its length.
    sent: Instant,
    /// Set when these are claims sent again after Redis left them unanswered: the outage they
    /// wait in, and the pause before the next attempt.
    again: Option<(Waiter, Duration)>,
}

/// Copies whose claims Redis left unanswered (on a Redis Cluster each id is its own call, so
/// one node away fails some ids of an answered batch), to be claimed again with the same tokens:
/// a claim that did land is answered the same way again.
struct Unanswered {
    copies: Vec<Message>,
    tokens: Vec<LeaseToken>,
    waiter: Waiter,
    wait: Duration,
    /// When these tokens were first sent: a lease granted then (its answer lost) runs from
    /// there, and an answer to the same token again does not extend it.
    sent: Instant,
}

/// Parks a batch's copies without identity and claims the rest in one round trip. `None` when
/// nothing is left to decide, or when cancelled while Redis was away (then the copies are
/// handed back unacknowledged, redelivered after a restart).
async fn claim(
    shared: Arc<Shared>,
    side: Side,
    metrics: SideMetrics,
    batch: Vec<Message>,
    cancel: CancellationToken,
) -> Option<Claimed> {
    let (good, bad): (Vec<_>, Vec<_>) = batch.into_iter().partition(|m| m.identity.is_ok());
    if !bad.is_empty() {
        let n = bad.len() as u64;
        if park_bad_input(&shared, bad, &cancel).await {
            metrics.message(Fate::BadInput, n);
            metrics.dead_letters.inc_by(n);
        }
    }
    let (good, old) = split_too_old(good, shared.settings.retention);
    if !old.is_empty() {
        park_too_old(&shared, &metrics, old, &cancel).await;
    }
    if good.is_empty() {
        return None;
    }
    let tokens: Vec<LeaseToken> = good.iter().map(|_| shared.tokens.next()).collect();
    let claimed = claim_with(&shared, &side, good, tokens, &cancel).await?;
    if let Some(parity) = &shared.parity {
        record_sights(parity, &side, &metrics, &claimed.copies, &claimed.claims);
    }
    Some(claimed)
}

/// Claims `copies` again after `wait`, with their tokens, still in the outage they wait in.
async fn reclaim(
    shared: Arc<Shared>,
    side: Side,
    metrics: SideMetrics,
    again: Unanswered,
    cancel: CancellationToken,
) -> Option<Claimed> {
    let Unanswered {
        copies,
        tokens,
        waiter,
        wait,
        sent,
    } = again;
    tokio::select! {
        _ = tokio::time::sleep(wait) => {}
        _ = cancel.cancelled() => return None, // handed back
    }
    let mut claimed = claim_with(&shared, &side, copies, tokens, &cancel).await?;
    if let Some(parity) = &shared.parity {
        record_sights(parity, &side, &metrics, &claimed.copies, &claimed.claims);
    }
    claimed.again = Some((waiter, (wait * 2).min(MAX_REDIS_WAIT)));
    claimed.sent = sent;
    Some(claimed)
}

/// Claims `copies` under `tokens` in one round trip, waiting for Redis if it does not answer at
/// all. `None` if cancelled first.
async fn claim_with(
    shared: &Shared,
    side: &Side,
    copies: Vec<Message>,
    tokens: Vec<LeaseToken>,
    cancel: &CancellationToken,
) -> Option<Claimed> {
    // Cancelled before the switches were known: hand everything back.
    let switches = current_switches(shared, cancel).await?;
    let reqs: Vec<ClaimRequest> = copies
        .iter()
        .zip(&tokens)
        .map(|(m, token)| {
            let ident = m.identity.as_ref().expect("only good copies are claimed");
            ClaimRequest {
                id: &ident.id,
                side,
                routed_owner: routed_owner(shared, &switches, &ident.business_id),
                token,
            }
        })
        .collect();
    let timer = shared.metrics.claim_seconds.start_timer();
    let sent = Instant::now();
    let claims = until_redis_answers(shared, cancel, reqs.len(), || {
        shared.arbiter.claim_batch_sighted(&reqs)
    })
    .await?;
    timer.observe_duration();
    drop(reqs);
    Some(Claimed {
        copies,
        tokens,
        claims,
        sent,
        again: None,
    })
}

/// Acts on a claimed batch: starts a call for each copy this side may deliver, acknowledges
/// those it must not, and puts BUSY copies back beside the stream. Returns the copies whose
/// claims Redis left unanswered, to be claimed again while the sources are paused.
#[allow(clippy::too_many_arguments)]
async fn dispatch(
    shared: &Arc<Shared>,
    side: &Side,
    metrics: &SideMetrics,
    claimed: Claimed,
    calls: &Arc<Semaphore>,
    retry_tx: &mpsc::UnboundedSender<Message>,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> Option<Unanswered> {
    let Claimed {
        copies,
        tokens,
        claims,
        sent,
        again,
    } = claimed;
    let mut unanswered: (Vec<Message>, Vec<LeaseToken>) = Default::default();
    let mut unanswered_error = None;
    // Copies whose claim Redis refused for good (a foreign key of another type under the prefix):
    // no claim, so no call; parked with the reason so that nothing is lost, once the batch is done.
    let mut refused: Vec<(Message, String)> = Vec::new();
    // Copies of ids whose owner has not observed them yet: acknowledged once their positions are
    // in the adoption index.
    let mut kept: Vec<Message> = Vec::new();
    // Copies of dead ids whose letter is not written yet: acknowledged once it is.
    let mut unlettered: Vec<(Message, String)> = Vec::new();
    // Copies this side may call for, with their leases: started once the others are settled.
    let mut proceeds: Vec<(Message, LeaseToken, u32)> = Vec::new();
    for ((msg, token), claim) in copies.into_iter().zip(tokens).zip(claims) {
        match claim.map(|(claim, _)| claim) {
            Ok(Claim::Proceed { attempt, takeover }) => {
                if takeover {
                    metrics.ambiguous.inc();
                    tracing::warn!(id = %id_of(&msg), side = %side, attempt,
                        "took over an expired lease: the earlier call's outcome is unknown (counted as ambiguous)");
                }
                proceeds.push((msg, token, attempt));
            }
            Ok(Claim::NotMine {
                owner_seen: true, ..
            }) => {
                metrics.decided(Fate::NotMine, msg.received);
                msg.ack.done()
            }
            Ok(Claim::NotMine {
                owner_seen: false, ..
            }) => {
                metrics.decided(Fate::NotMine, msg.received);
                kept.push(msg);
            }
            Ok(Claim::Done) => {
                metrics.decided(Fate::Duplicate, msg.received);
                msg.ack.done()
            }
            Ok(Claim::Dead { letter: true, .. }) => {
                metrics.decided(Fate::Dead, msg.received);
                msg.ack.done()
            }
            Ok(Claim::Dead {
                reason,
                letter: false,
            }) => {
                metrics.decided(Fate::Dead, msg.received);
                unlettered.push((msg, reason));
            }
            Ok(Claim::Busy { retry_in }) => {
                metrics.message(Fate::Busy, 1);
                later(shared, msg, retry_in, retry_tx, cancel, tracker);
            }
            Err(e) if !e.is_retryable() => {
                refused.push((msg, format!("claim refused by redis: {e}")));
            }
            // Shutting down: handed back unacknowledged.
            Err(_) if cancel.is_cancelled() => {}
            Err(e) => {
                unanswered.0.push(msg);
                unanswered.1.push(token);
                unanswered_error.get_or_insert(e);
            }
        }
    }
    start_calls(
        shared, side, metrics, proceeds, sent, calls, retry_tx, cancel, tracker,
    )
    .await;
    if !refused.is_empty() {
        park_refused(shared, metrics, refused, cancel).await;
    }
    if !kept.is_empty() {
        keep_for_adoption(shared, side, metrics, kept, cancel).await;
    }
    for (msg, reason) in unlettered {
        letter_then_ack(shared, metrics, msg, &reason, 0, cancel).await;
    }
    let (copies, tokens) = unanswered;
    match (again, unanswered_error) {
        (Some((waiter, _)), None) => {
            waiter.answered();
            None
        }
        (None, None) => None,
        (Some((mut waiter, wait)), Some(e)) => {
            waiter.again(copies.len(), &e);
            Some(Unanswered {
                copies,
                tokens,
                waiter,
                wait,
                sent,
            })
        }
        (None, Some(e)) => Some(Unanswered {
            waiter: shared.outage.wait(Waiting::Copies, copies.len(), &e),
            copies,
            tokens,
            wait: FIRST_REDIS_WAIT,
            sent,
        }),
    }
}

/// Starts a call for each claimed copy, in order, as call slots (`pipeline.max_in_flight`) free
/// up. While the batch waits for a slot, the leases of every copy still waiting are renewed, so
/// none lapses before its call: a lapsed lease would let a second copy of the id (a producer's
/// duplicate, a redelivery) take it over — as an ambiguous call, or under `at_most_once` parked
/// in doubt — although no call was ever made. Waiting here (and not in a task per copy) keeps the
/// claim loop from taking more copies than there are slots: the backpressure that pauses the
/// source. A copy whose lease was renewed while it waited calls without confirming it again; one
/// whose renewal failed confirms it right before its call (`deliver`). On cancel, the leases not
/// started are handed back unused.
#[allow(clippy::too_many_arguments)]
async fn start_calls(
    shared: &Arc<Shared>,
    side: &Side,
    metrics: &SideMetrics,
    proceeds: Vec<(Message, LeaseToken, u32)>,
    sent: Instant,
    calls: &Arc<Semaphore>,
    retry_tx: &mpsc::UnboundedSender<Message>,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) {
    // Each copy with when its lease was last known to be held: the claim, or its last renewal.
    let mut proceeds: std::collections::VecDeque<_> = proceeds
        .into_iter()
        .map(|(msg, token, attempt)| (msg, token, attempt, sent))
        .collect();
    // Older than a third of the lease: `deliver` confirms the lease before calling.
    let unconfirmed = sent.checked_sub(shared.arbiter.lease()).unwrap_or(sent);
    while let Some((msg, token, attempt, mut confirmed)) = proceeds.pop_front() {
        let permit = match calls.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // This copy and the ones after it keep their leases while they wait.
                let waiting: Vec<(&str, &LeaseToken, Instant)> =
                    std::iter::once((id_of(&msg), &token, confirmed))
                        .chain(proceeds.iter().map(|(m, t, _, c)| (id_of(m), t, *c)))
                        .collect();
                let slot = renewing(shared, &waiting, calls.clone().acquire_owned());
                tokio::select! {
                    (p, held) = slot => {
                        // A renewal can fail (Redis away for a moment) or find the lease gone:
                        // that copy confirms its lease again right before its call.
                        let mut held = held.into_iter().map(|h| h.unwrap_or(unconfirmed));
                        confirmed = held.next().expect("one per lease");
                        for (p, h) in proceeds.iter_mut().zip(held) {
                            p.3 = h;
                        }
                        p.expect("semaphore open")
                    }
                    _ = cancel.cancelled() => {
                        // Shutting down before the calls: give the leases back unused, if Redis
                        // takes them before the completer stops (else the leases run out).
                        drop(waiting);
                        shared.completer.hand_back(id_of(&msg), side, token);
                        for (m, t, _, _) in proceeds {
                            shared.completer.hand_back(id_of(&m), side, t);
                        }
                        return;
                    }
                }
            }
        };
        // Counted once the call is sure to start (not when handed back at shutdown).
        metrics.decided(Fate::Proceed, msg.received);
        let shared = shared.clone();
        let side = side.clone();
        let cancel = cancel.clone();
        let retry_tx = retry_tx.clone();
        let metrics = metrics.clone();
        tracker.spawn(async move {
            let lease = Held {
                token,
                attempt,
                confirmed,
            };
            deliver(&shared, &side, &metrics, msg, lease, &cancel, &retry_tx).await;
            drop(permit);
        });
    }
}

/// Runs `wait` while renewing `leases` (id, token, when the lease was last known to be held)
/// every third of the lease length, in one round trip each time. Also returns, per lease, when it
/// was last known to be held: as given if no renewal was due, else the start of its last renewal
/// round, or `None` if that renewal failed or found the lease no longer this token's.
async fn renewing<F: std::future::Future>(
    shared: &Shared,
    leases: &[(&str, &LeaseToken, Instant)],
    wait: F,
) -> (F::Output, Vec<Option<Instant>>) {
    let every = shared.arbiter.lease() / 3;
    let mut held: Vec<Option<Instant>> = leases.iter().map(|l| Some(l.2)).collect();
    let ids: Vec<(&str, &LeaseToken)> = leases.iter().map(|(id, t, _)| (*id, *t)).collect();
    tokio::pin!(wait);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            out = &mut wait => return (out, held),
            _ = tick.tick() => {
                let asked = Instant::now();
                match shared.arbiter.renew_batch(&ids).await {
                    Ok(answers) => {
                        for (h, a) in held.iter_mut().zip(answers) {
                            *h = matches!(a, Ok(true)).then_some(asked);
                        }
                    }
                    Err(e) => {
                        held.iter_mut().for_each(|h| *h = None);
                        tracing::warn!(error = %e, leases = leases.len(), "cannot renew the leases of copies waiting for a call slot");
                    }
                }
            }
        }
    }
}

/// Puts the positions of copies whose owner has not observed their ids yet into this side's
/// adoption index, then acknowledges them: should the owner's copy never come, this side reads
/// the copy again and adopts the id (`adopt`). Waits for Redis; if cancelled first, the copies
/// are handed back unacknowledged (claimed again after a restart, with the same answer).
async fn keep_for_adoption(
    shared: &Shared,
    side: &Side,
    metrics: &SideMetrics,
    kept: Vec<Message>,
    cancel: &CancellationToken,
) {
    let entries: Vec<WaitEntry> = kept
        .iter()
        .map(|m| WaitEntry {
            id: id_of(m).to_owned(),
            position: Position::of(&m.origin),
        })
        .collect();
    let index = waiting::Waiting::new(&shared.arbiter, side);
    let due = waiting::now_ms() + waiting::FIRST_CHECK.as_millis() as u64;
    if until_redis_answers(shared, cancel, entries.len(), || index.add(&entries, due))
        .await
        .is_none()
    {
        return;
    }
    metrics.adoption_kept.inc_by(kept.len() as u64);
    for m in kept {
        m.ack.done();
    }
}

/// Makes sure the dead letter of a dead id exists (writes one with this copy, then notes it in
/// the record), then acknowledges the copy: every DEAD answer has its letter (DESIGN.md
/// invariant 6). A letter lost between the two steps is written again by the next copy, so an
/// id may have two letters, never none. If cancelled while Redis is away, the copy is handed back.
async fn letter_then_ack(
    shared: &Shared,
    metrics: &SideMetrics,
    msg: Message,
    reason: &str,
    attempts: u32,
    cancel: &CancellationToken,
) {
    let ident = msg.identity.as_ref().ok();
    let letter = [Parking {
        message_id: ident.map(|i| i.id.as_str()),
        business_id: ident.map(|i| i.business_id.as_str()),
        reason,
        origin: &msg.origin,
        attempts,
        payload: &msg.payload,
    }];
    let Some((_, trimmed)) =
        until_redis_answers(shared, cancel, 1, || shared.dead.park(&letter)).await
    else {
        return;
    };
    note_trimmed(shared, trimmed);
    let id = id_of(&msg);
    if until_redis_answers(shared, cancel, 1, || shared.arbiter.letter_written(id))
        .await
        .is_none()
    {
        return;
    }
    metrics.dead_letters.inc();
    tracing::warn!(%id, side = %msg.origin.side, %reason, "parked in dead letters");
    msg.ack.done();
}

/// Splits off the copies older than the retention by their broker timestamp (0: unknown, kept).
fn split_too_old(good: Vec<Message>, retention: Duration) -> (Vec<Message>, Vec<Message>) {
    let now = waiting::now_ms() as i64;
    let limit = retention.as_millis() as i64;
    good.into_iter()
        .partition(|m| m.origin.born_ms <= 0 || now - m.origin.born_ms <= limit)
}

/// Parks copies older than the retention without claiming them: their ids' records may be gone,
/// so a claim could take such a copy for a new message and grant it again (a rollback to a side
/// whose consumer group re-reads weeks of messages). One log line per batch, not per copy.
async fn park_too_old(
    shared: &Shared,
    metrics: &SideMetrics,
    old: Vec<Message>,
    cancel: &CancellationToken,
) {
    let retention = humantime::format_duration(shared.settings.retention).to_string();
    let now = waiting::now_ms() as i64;
    let reasons: Vec<String> = old
        .iter()
        .map(|m| {
            let age = Duration::from_millis((now - m.origin.born_ms).max(0) as u64);
            format!(
                "too old to arbitrate: stamped {} ago by its broker, longer than arbiter.retention ({retention})",
                humantime::format_duration(Duration::from_secs(age.as_secs()))
            )
        })
        .collect();
    let copies: Vec<(&Message, &str)> = old
        .iter()
        .zip(&reasons)
        .map(|(m, r)| (m, r.as_str()))
        .collect();
    if !park_copies(shared, &copies, cancel).await {
        return;
    }
    let n = old.len() as u64;
    metrics.too_old.inc_by(n);
    metrics.dead_letters.inc_by(n);
    metrics.message(Fate::Dead, n);
    tracing::warn!(side = %old[0].origin.side, copies = n, oldest = %reasons[0],
        "copies older than arbiter.retention parked in dead letters without a claim");
    for m in old {
        m.ack.done();
    }
}

/// Parks copies whose claim Redis refused for good; they are acknowledged once parked. A replay
/// (`mq-cutover dead replay`) claims them again once the offending key is gone.
async fn park_refused(
    shared: &Shared,
    metrics: &SideMetrics,
    refused: Vec<(Message, String)>,
    cancel: &CancellationToken,
) {
    let copies: Vec<(&Message, &str)> = refused.iter().map(|(m, r)| (m, r.as_str())).collect();
    if !park_copies(shared, &copies, cancel).await {
        return; // cancelled while Redis was away: handed back, redelivered after a restart
    }
    metrics.dead_letters.inc_by(refused.len() as u64);
    for (m, reason) in refused {
        tracing::error!(id = %id_of(&m), side = %m.origin.side, %reason,
            "claim refused by redis: parked in dead letters");
        metrics.decided(Fate::Dead, m.received);
        m.ack.done();
    }
}

/// Writes one dead letter per copy (with its identity when it has one), waiting for Redis; false
/// if cancelled first.
async fn park_copies(
    shared: &Shared,
    copies: &[(&Message, &str)],
    cancel: &CancellationToken,
) -> bool {
    let letters: Vec<Parking> = copies
        .iter()
        .map(|(m, reason)| {
            let ident = m.identity.as_ref().ok();
            Parking {
                message_id: ident.map(|i| i.id.as_str()),
                business_id: ident.map(|i| i.business_id.as_str()),
                reason,
                origin: &m.origin,
                attempts: 0,
                payload: &m.payload,
            }
        })
        .collect();
    match until_redis_answers(shared, cancel, letters.len(), || shared.dead.park(&letters)).await {
        Some((_, trimmed)) => {
            note_trimmed(shared, trimmed);
            true
        }
        None => false,
    }
}

/// Counts and logs dead letters the stream's cap removed to make room.
fn note_trimmed(shared: &Shared, trimmed: u64) {
    if trimmed > 0 {
        shared.metrics.dead_trimmed.inc_by(trimmed);
        tracing::warn!(
            trimmed,
            max_len = shared.dead.cap(),
            "dead-letter stream full: its oldest letters were trimmed (their ids stay dead; \
             `mq-cutover dead list` counts them, `inspect` shows each)"
        );
    }
}

/// Hands this batch's first sights to the parity recorder, which sends them beside the claims
/// rather than before the next one: parity is an observation, not part of the protocol.
fn record_sights(
    parity: &crate::parity::Recorder,
    side: &Side,
    metrics: &SideMetrics,
    good: &[Message],
    claims: &[Result<(Claim, Sighting), StoreError>],
) {
    let sights: Vec<crate::parity::Sight> = good
        .iter()
        .zip(claims)
        .filter_map(|(m, c)| match c {
            Ok((_, Sighting::Again)) | Err(_) => None,
            Ok((_, s)) => Some(crate::parity::Sight {
                id: &m.identity.as_ref().expect("partitioned on is_ok").id,
                born_ms: m.origin.born_ms,
                pair: *s == Sighting::Pair,
            }),
        })
        .collect();
    if sights.is_empty() {
        return;
    }
    metrics.parity_observed.inc_by(sights.len() as u64);
    parity.note(side, &sights);
}

/// Puts a copy back into this side's pipeline after a pause, without holding up the others.
fn later(
    shared: &Arc<Shared>,
    msg: Message,
    wait: Duration,
    retry_tx: &mpsc::UnboundedSender<Message>,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) {
    let wait = wait.clamp(shared.settings.busy_retry, Duration::from_secs(1));
    let retry_tx = retry_tx.clone();
    let cancel = cancel.clone();
    tracker.spawn(async move {
        tokio::select! {
            _ = tokio::time::sleep(wait) => { let _ = retry_tx.send(msg); }
            _ = cancel.cancelled() => {} // handed back: redelivered after restart
        }
    });
}

fn id_of(m: &Message) -> &str {
    m.identity.as_ref().map(|i| i.id.as_str()).unwrap_or("")
}

fn routed_owner<'a>(shared: &'a Shared, switches: &Switches, business_id: &str) -> &'a str {
    match route(switches, business_id) {
        Route::Old => &shared.cutover.0,
        Route::New => &shared.cutover.1,
    }
}

/// The switches, waiting for the first read if there has been none yet: routing without them
/// could send ids to the wrong side for good.
async fn current_switches(shared: &Shared, cancel: &CancellationToken) -> Option<Arc<Switches>> {
    if let Some(s) = shared.switches.borrow().clone() {
        return Some(s);
    }
    let mut feed = shared.switches.clone();
    tokio::select! {
        r = feed.wait_for(|s| s.is_some()) => r.ok().and_then(|s| s.clone()),
        _ = cancel.cancelled() => None,
    }
}

/// The first pause before trying Redis again, doubling up to [`MAX_REDIS_WAIT`].
const FIRST_REDIS_WAIT: Duration = Duration::from_millis(50);
/// The longest pause between two tries while Redis does not answer.
const MAX_REDIS_WAIT: Duration = Duration::from_secs(2);
/// How long a Redis call already sent may still take once shutting down: its answer (leases
/// granted, outcomes recorded) is worth waiting for, but not for longer than a reply takes.
const CALL_GRACE_AT_SHUTDOWN: Duration = Duration::from_secs(2);

/// Runs `op` (which holds `n` copies or outcomes) until Redis answers, pausing the sources
/// meanwhile. `None` if cancelled first: a call already sent gets [`CALL_GRACE_AT_SHUTDOWN`]
/// to be answered, then it is given up, whatever Redis does.
async fn until_redis_answers<T, F, Fut>(
    shared: &Shared,
    cancel: &CancellationToken,
    n: usize,
    mut op: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut wait = FIRST_REDIS_WAIT;
    let mut waiter: Option<Waiter> = None;
    loop {
        match call_until_cancelled(cancel, op()).await? {
            Ok(v) => {
                if let Some(w) = waiter {
                    w.answered();
                }
                return Some(v);
            }
            Err(e) => match &mut waiter {
                None => waiter = Some(shared.outage.wait(Waiting::Copies, n, &e)),
                Some(w) => {
                    w.again(n, &e);
                }
            },
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => wait = (wait * 2).min(MAX_REDIS_WAIT),
            _ = cancel.cancelled() => return None,
        }
    }
}

/// Awaits a Redis call; once `cancel` fires, for [`CALL_GRACE_AT_SHUTDOWN`] more at most.
async fn call_until_cancelled<T>(
    cancel: &CancellationToken,
    call: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::pin!(call);
    tokio::select! {
        biased;
        out = &mut call => Some(out),
        _ = cancel.cancelled() => tokio::time::timeout(CALL_GRACE_AT_SHUTDOWN, call).await.ok(),
    }
}

/// Parks copies without identity; true when they were parked (and acknowledged).
async fn park_bad_input(shared: &Shared, bad: Vec<Message>, cancel: &CancellationToken) -> bool {
    fn reason(m: &Message) -> &str {
        m.identity
            .as_ref()
            .err()
            .map(|e| e.0.as_str())
            .unwrap_or("bad input")
    }
    let copies: Vec<(&Message, &str)> = bad.iter().map(|m| (m, reason(m))).collect();
    if !park_copies(shared, &copies, cancel).await {
        return false;
    }
    for m in bad {
        tracing::warn!(
            side = %m.origin.side, topic = %m.origin.topic, partition = m.origin.partition,
            offset = m.origin.offset, reason = %reason(&m), "bad input parked in dead letters"
        );
        m.ack.done();
    }
    true
}

/// A lease a worker holds on an id: its token, the attempt it was granted for, and the latest
/// moment Redis is known to have had it live (sent no later than the claim or renewal that
/// granted it).
struct Held {
    token: LeaseToken,
    attempt: u32,
    confirmed: Instant,
}

/// Calls the sink for a claimed copy, and keeps at it (same side, same copy) until its fate is
/// recorded: done, parked, or taken by another worker. Each round: wait for a turn at the sink →
/// make sure the lease is still this worker's → call → record the outcome → act on it (ack,
/// park, put back) or back off and claim the id again.
///
/// A copy may wait between its claim and its call: for a worker slot (`pipeline.max_in_flight`)
/// or for an open circuit to close, which can take longer than the lease. Nothing renews the
/// lease meanwhile (it is renewed only while the copy queues for the sink's own call slot, and
/// during the call), so it may lapse and another worker take the id over and call. So when the
/// lease was last confirmed a third of its length ago or more, it is renewed first, and the call
/// is made only if it is still this worker's; otherwise the copy goes back through the pipeline,
/// where the current holder's claim decides. A copy that calls at once costs no extra round trip.
async fn deliver(
    shared: &Arc<Shared>,
    side: &Side,
    metrics: &SideMetrics,
    msg: Message,
    lease: Held,
    cancel: &CancellationToken,
    retry_tx: &mpsc::UnboundedSender<Message>,
) {
    let Held {
        mut token,
        mut attempt,
        mut confirmed,
    } = lease;
    // Borrowed, not cloned: the copy keeps its identity for as long as this worker holds it.
    let ident: &Identity = msg
        .identity
        .as_ref()
        .expect("only good copies are delivered");
    loop {
        // Wait for a turn at the sink that the circuit lets through; hand the lease back if
        // shutting down.
        // The admission goes with the call: a lapsed lease below drops it, giving a half-open
        // circuit's probe slot back to a call that will happen.
        let Some((turn, admission)) = call_turn(shared, Some((&ident.id, &token)), cancel).await
        else {
            shared.completer.hand_back(&ident.id, side, token);
            return;
        };
        if confirmed.elapsed() >= shared.arbiter.lease() / 3
            && !renew_before_call(shared, side, metrics, &ident.id, &token).await
        {
            let _ = retry_tx.send(msg);
            return;
        }
        let req = SinkRequest {
            message_id: &ident.id,
            side,
            attempt,
            body: &msg.payload,
        };
        let result = call_sink(shared, metrics, turn, &req, &token).await;
        admission.record(&result);
        let retry_after = result.retry_after();
        let outcome = result.outcome();
        match record_outcome(
            shared, side, metrics, &msg, token, attempt, &outcome, cancel,
        )
        .await
        {
            AfterCall::Ack => return msg.ack.done(),
            AfterCall::PutBack => {
                let _ = retry_tx.send(msg);
                return;
            }
            AfterCall::Park(reason) => {
                return letter_then_ack(shared, metrics, msg, &reason, attempt, cancel).await;
            }
            AfterCall::Leave => return,
            AfterCall::Retry => {}
        }
        // Retry on this side, after the backoff; the id stays ours (pending, owner kept).
        let again = claim_again(
            shared,
            side,
            &ident.id,
            attempt,
            retry_after,
            &outcome,
            cancel,
        );
        let Some((next, claimed_at, claim)) = again.await else {
            return;
        };
        token = next;
        confirmed = claimed_at;
        match claim {
            Claim::Proceed { attempt: a, .. } => attempt = a,
            Claim::Busy { .. } => {
                // Another worker of this side holds it now (a redelivered copy): let it be and
                // put this copy back through the pipeline, which will see DONE or BUSY again.
                let _ = retry_tx.send(msg);
                return;
            }
            Claim::Dead {
                reason,
                letter: false,
            } => return letter_then_ack(shared, metrics, msg, &reason, attempt, cancel).await,
            _ => return msg.ack.done(),
        }
    }
}

/// What [`deliver`] does with its copy once the outcome of a call is recorded (or could not be).
enum AfterCall {
    /// Acknowledge it: its fate is recorded (done, or parked already).
    Ack,
    /// Put it back through the pipeline: another worker holds the id now.
    PutBack,
    /// Park it with this reason (the id is dead), then acknowledge it.
    Park(String),
    /// Leave it unacknowledged: shutting down, or it could not be parked.
    Leave,
    /// Call again after the backoff: the id is still this side's, pending.
    Retry,
}

/// Renews a lease last confirmed a third of its length ago or more, before the call. False if it
/// is not known to be this worker's any more: then there is no call, and the copy goes back
/// through the pipeline.
async fn renew_before_call(
    shared: &Shared,
    side: &Side,
    metrics: &SideMetrics,
    id: &str,
    token: &LeaseToken,
) -> bool {
    match shared.arbiter.renew(id, token).await {
        Ok(true) => true, // ours for a whole lease again; the call renews it from here on
        Ok(false) => {
            metrics.lapsed.inc();
            tracing::warn!(id = %id, side = %side,
                "lease lapsed before the call and the id is another worker's now: not calling; the current holder decides");
            false
        }
        Err(e) => {
            // Not known to be ours: no call. The record still names this token, so the claim of
            // the copy put back answers BUSY until the lease ends, then proceeds. Redis away is
            // the outage's to report (the claim of the copy put back waits in it), not this
            // copy's; counted, since the copy's proceed is counted again.
            metrics.unconfirmed.inc();
            if e.is_retryable() {
                tracing::debug!(id = %id, side = %side, error = %e,
                    "cannot confirm the lease before the call: not calling; claiming the copy again");
            } else {
                tracing::warn!(id = %id, side = %side, error = %e,
                    "cannot confirm the lease before the call: not calling; claiming the copy again");
            }
            false
        }
    }
}

/// Makes the call in `turn`, renewing the lease meanwhile, and counts it (in flight, duration,
/// result).
async fn call_sink<'s>(
    shared: &'s Shared,
    metrics: &SideMetrics,
    turn: Turn<'s>,
    req: &SinkRequest<'_>,
    token: &LeaseToken,
) -> CallResult {
    metrics.in_flight.inc();
    let timer = shared.metrics.sink_seconds.start_timer();
    let result = with_renewal(
        shared,
        req.message_id,
        token,
        shared.sink.call_in(turn, req),
    )
    .await;
    timer.observe_duration();
    metrics.in_flight.dec();
    metrics.call(result.kind());
    if matches!(result, CallResult::Ambiguous { .. }) {
        metrics.ambiguous.inc();
    }
    result
}

/// Records the outcome of attempt `attempt` under `token` and says what to do with the copy.
/// An outcome that cannot be kept (the id's key holds something else now) parks the copy here.
#[allow(clippy::too_many_arguments)]
async fn record_outcome(
    shared: &Shared,
    side: &Side,
    metrics: &SideMetrics,
    msg: &Message,
    token: LeaseToken,
    attempt: u32,
    outcome: &Outcome,
    cancel: &CancellationToken,
) -> AfterCall {
    let id = id_of(msg);
    let completion = match shared
        .completer
        .complete(id, side, token, outcome.clone())
        .await
    {
        Some(Ok(c)) => c,
        Some(Err(e)) => {
            // The id's key is not a record any more (overwritten by something else): the
            // outcome cannot be kept, so the copy is parked with what happened.
            let reason = format!(
                "the outcome of attempt {attempt} ({outcome:?}) could not be recorded: {e}"
            );
            let copies = [(msg, reason.as_str())];
            if park_copies(shared, &copies, cancel).await {
                metrics.dead_letters.inc();
                tracing::error!(id = %id, side = %side, %reason, "parked in dead letters");
                return AfterCall::Ack;
            }
            return AfterCall::Leave;
        }
        None => return AfterCall::Leave, // cancelled while Redis was away: handed back unacked
    };
    match completion {
        Completion::Recorded(State::Done) | Completion::Repeated(State::Done) => AfterCall::Ack,
        Completion::Late => {
            metrics.overlaps.inc();
            tracing::warn!(id = %id, side = %side, "call succeeded after its lease was lost: recorded, overlap counted");
            AfterCall::Ack
        }
        Completion::Fenced => {
            // Another worker took the id over. Its copy may be this very broker message (after
            // a rebalance), so do not ack: put the copy back through the pipeline, where the
            // claim answers BUSY while that worker lives, and DONE / DEAD once it decided.
            tracing::warn!(id = %id, side = %side, "lease lost during the call; the current holder decides");
            AfterCall::PutBack
        }
        Completion::Recorded(State::Dead) | Completion::Repeated(State::Dead) => {
            let reason = match shared.arbiter.inspect(id).await {
                Ok(Some(r)) => r.reason.unwrap_or_default(),
                _ => format!("{outcome:?}"),
            };
            AfterCall::Park(reason)
        }
        Completion::Recorded(State::Pending)
        | Completion::Repeated(State::Pending)
        | Completion::Recorded(State::InFlight)
        | Completion::Repeated(State::InFlight) => AfterCall::Retry,
    }
}

/// Waits out the backoff after attempt `attempt`, then claims the id again for this side under a
/// fresh token. The token, when it was taken (the lease counts from then) and the claim; None if
/// cancelled meanwhile (no lease held: the copy is handed back).
async fn claim_again(
    shared: &Shared,
    side: &Side,
    id: &str,
    attempt: u32,
    retry_after: Option<Duration>,
    outcome: &Outcome,
    cancel: &CancellationToken,
) -> Option<(LeaseToken, Instant, Claim)> {
    let delay = shared.backoff.delay(attempt, retry_after);
    tracing::debug!(id = %id, side = %side, attempt, ?delay, ?outcome, "retrying");
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = cancel.cancelled() => return None, // no lease held: hand back
    }
    let token = shared.tokens.next();
    let confirmed = Instant::now();
    let claim = {
        let req = ClaimRequest {
            id,
            side,
            routed_owner: side,
            token: &token,
        };
        until_redis_answers(shared, cancel, 1, || shared.arbiter.claim(&req)).await
    }?;
    Some((token, confirmed, claim))
}

/// Waits for a turn at the sink (a call slot, the rate limit) that the circuit lets through, and
/// takes the circuit's probe slot if it is half-open. The circuit is waited on first, holding no
/// slot, and asked again once the turn is in hand: a copy that queued for a slot while the circuit
/// opened gives the turn back and waits again instead of calling a failing endpoint. While it
/// waits for the circuit or queues for a slot, the copy's `lease` (if it has one) is renewed, as
/// during its call: the wait is part of this worker's work on the id. None if cancelled meanwhile.
async fn call_turn<'s>(
    shared: &'s Shared,
    lease: Option<(&str, &LeaseToken)>,
    cancel: &CancellationToken,
) -> Option<(Turn<'s>, Admission<'s>)> {
    loop {
        if !shared.breaker.would_allow() {
            // The circuit may stay open for longer than a lease: the lease is kept meanwhile,
            // as while queueing for a slot, so no other copy takes the id over uncalled.
            let closed = async {
                match lease {
                    Some((id, token)) => {
                        with_renewal(shared, id, token, shared.breaker.callable()).await
                    }
                    None => shared.breaker.callable().await,
                }
            };
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return None,
                _ = closed => {}
            }
        }
        let queued = async {
            let turn = shared.sink.turn();
            tokio::pin!(turn);
            // A free slot (the usual case) needs no renewal timer.
            if let Some(turn) = turn.as_mut().now_or_never() {
                return turn;
            }
            match lease {
                Some((id, token)) => with_renewal(shared, id, token, turn).await,
                None => turn.await,
            }
        };
        let turn = tokio::select! {
            biased;
            _ = cancel.cancelled() => return None,
            turn = queued => turn,
        };
        if let Some(admission) = shared.breaker.allow() {
            return Some((turn, admission));
        }
    }
}

/// Runs the call (or the wait for its slot) while renewing the lease every third of its length.
async fn with_renewal<F: std::future::Future>(
    shared: &Shared,
    id: &str,
    token: &LeaseToken,
    call: F,
) -> F::Output {
    let every = shared.arbiter.lease() / 3;
    tokio::pin!(call);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            out = &mut call => return out,
            _ = tick.tick() => match shared.arbiter.renew(id, token).await {
                Ok(true) => {}
                Ok(false) => tracing::warn!(%id, "lease lost during a long call or wait for a call slot"),
                // Redis away: the outage is reported once, not per lease.
                Err(e) if e.is_retryable() => tracing::debug!(%id, error = %e, "cannot renew the lease"),
                Err(e) => tracing::warn!(%id, error = %e, "cannot renew the lease"),
            },
        }
    }
}

/// Pass-through, for measurement only (`[pipeline.pass_through]`): the forwarding side calls the
/// sink for every copy with no claim and acknowledges it once the sink accepted it; every other
/// side acknowledges its copies without calling. The arbiter, the completer and the dead letters
/// are never used, so this is the baseline that shows what arbitration costs. It gives none of
/// DESIGN.md's guarantees: duplicates are delivered, bad input and fatal answers are only logged.
async fn pass_through(
    shared: Arc<Shared>,
    side: Side,
    forwarding: Side,
    mut rx: mpsc::Receiver<Message>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let calls = Arc::new(Semaphore::new(shared.settings.max_in_flight));
    let metrics = shared.metrics.side(&side);
    let forwards = side == forwarding;
    let mut batch = Vec::with_capacity(shared.settings.claim_batch);
    'take: loop {
        let n = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            n = rx.recv_many(&mut batch, shared.settings.claim_batch) => n,
        };
        if n == 0 {
            break; // the source is gone
        }
        for msg in batch.drain(..) {
            if !forwards {
                metrics.decided(Fate::NotMine, msg.received);
                msg.ack.done();
                continue;
            }
            if let Err(e) = &msg.identity {
                tracing::warn!(side = %side, reason = %e, "pass-through: bad input acknowledged unparked");
                metrics.message(Fate::BadInput, 1);
                msg.ack.done();
                continue;
            }
            let permit = tokio::select! {
                p = calls.clone().acquire_owned() => p.expect("semaphore open"),
                // Shutting down: the rest of the batch is handed back unacknowledged.
                _ = cancel.cancelled() => break 'take,
            };
            metrics.decided(Fate::Proceed, msg.received);
            let shared = shared.clone();
            let side = side.clone();
            let cancel = cancel.clone();
            let metrics = metrics.clone();
            tracker.spawn(async move {
                forward_unclaimed(&shared, &side, &metrics, msg, &cancel).await;
                drop(permit);
            });
        }
    }
    tracing::info!(side = %side, "pipeline (pass-through) stopped taking copies");
}

/// Calls the sink for one copy until it is accepted (or a fatal answer), with the usual backoff
/// and circuit breaker but no lease and no record; acks it then. Pass-through only.
async fn forward_unclaimed(
    shared: &Shared,
    side: &Side,
    metrics: &SideMetrics,
    msg: Message,
    cancel: &CancellationToken,
) {
    let id = id_of(&msg);
    for attempt in 1.. {
        let Some((turn, admission)) = call_turn(shared, None, cancel).await else {
            return;
        };
        let req = SinkRequest {
            message_id: id,
            side,
            attempt,
            body: &msg.payload,
        };
        metrics.in_flight.inc();
        let timer = shared.metrics.sink_seconds.start_timer();
        let result = shared.sink.call_in(turn, &req).await;
        timer.observe_duration();
        metrics.in_flight.dec();
        metrics.call(result.kind());
        admission.record(&result);
        match result {
            crate::sink::CallResult::Success => break,
            crate::sink::CallResult::Fatal { reason } => {
                tracing::warn!(%id, side = %side, %reason, "pass-through: fatal answer, copy dropped");
                break;
            }
            other => {
                let delay = shared.backoff.delay(attempt, other.retry_after());
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = cancel.cancelled() => return,
                }
            }
        }
    }
    msg.ack.done();
}

/// Batches completions from all calls in flight into one round trip each.
#[derive(Clone)]
pub struct Completer {
    tx: mpsc::Sender<Pending>,
}

struct Pending {
    id: String,
    side: Side,
    token: LeaseToken,
    outcome: Outcome,
    /// None once answered (or for a lease handed back, whose answer nobody waits for).
    reply: Option<oneshot::Sender<Result<Completion, StoreError>>>,
}

impl Completer {
    /// Starts the batching task. It runs until every handle is dropped; once `stop` fires it
    /// gives up on outcomes Redis will not take (the waiting callers then hand their copies
    /// back). While Redis does not answer, the outcomes wait in `outage`. An id Redis refuses for
    /// good (its key overwritten with another type) is answered with the refusal at once, and the
    /// rest of its batch is recorded: one bad key never holds up others.
    pub fn start(
        arbiter: Arbiter,
        outage: Arc<Outage>,
        batch: usize,
        stop: CancellationToken,
        seconds: prometheus::Histogram,
    ) -> Completer {
        let (tx, mut rx) = mpsc::channel::<Pending>(batch * 4);
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(batch);
            while rx.recv_many(&mut buf, batch).await > 0 {
                record(&arbiter, &outage, &mut buf, &stop, &seconds).await;
                // Given up (shutting down with Redis away): the waiting calls hand their copies
                // back when their reply channel closes.
                buf.clear();
            }
        });
        Completer { tx }
    }

    /// Records one outcome (batched with others). `None` if it could not be recorded before
    /// shutdown: the caller must then hand its copy back, unacknowledged. `Some(Err(_))` when
    /// Redis refused this id for good: the caller parks the copy with the reason.
    pub async fn complete(
        &self,
        id: &str,
        side: &Side,
        token: LeaseToken,
        outcome: Outcome,
    ) -> Option<Result<Completion, StoreError>> {
        let (reply, rx) = oneshot::channel();
        let p = Pending {
            id: id.to_owned(),
            side: side.clone(),
            token,
            outcome,
            reply: Some(reply),
        };
        self.tx.send(p).await.ok()?;
        rx.await.ok()
    }

    /// Gives an unused lease back (the call was not made: shutting down) without waiting: it is
    /// recorded if Redis takes it before the completer stops; otherwise the lease runs out.
    pub fn hand_back(&self, id: &str, side: &Side, token: LeaseToken) {
        let _ = self.tx.try_send(Pending {
            id: id.to_owned(),
            side: side.clone(),
            token,
            outcome: Outcome::NotCalled,
            reply: None,
        });
    }
}

/// Records the outcomes in `buf`, answering each caller as soon as its own is recorded; the ones
/// Redis does not answer are sent again after a pause, while the sources are paused, until
/// recorded or `stop`.
async fn record(
    arbiter: &Arbiter,
    outage: &Arc<Outage>,
    buf: &mut [Pending],
    stop: &CancellationToken,
    seconds: &prometheus::Histogram,
) {
    let mut todo: Vec<usize> = (0..buf.len()).collect();
    let mut wait = FIRST_REDIS_WAIT;
    let mut waiter: Option<Waiter> = None;
    loop {
        let reqs: Vec<CompleteRequest> = todo
            .iter()
            .map(|&i| CompleteRequest {
                id: &buf[i].id,
                side: &buf[i].side,
                token: &buf[i].token,
                outcome: &buf[i].outcome,
            })
            .collect();
        let timer = seconds.start_timer();
        let sent = call_until_cancelled(stop, arbiter.complete_batch(&reqs)).await;
        drop(reqs);
        let failure = match sent {
            None => return, // stopped while the call was out
            Some(Ok(answers)) => {
                timer.observe_duration();
                let mut failure = None;
                let mut left = Vec::new();
                for (i, answer) in todo.iter().copied().zip(answers) {
                    match answer {
                        // Redis could not take it now: sent again after a pause.
                        Err(e) if e.is_retryable() => {
                            left.push(i);
                            failure.get_or_insert(e);
                        }
                        // Recorded, or refused for good: the caller decides.
                        answer => {
                            if let Some(reply) = buf[i].reply.take() {
                                let _ = reply.send(answer);
                            }
                        }
                    }
                }
                todo = left;
                failure
            }
            Some(Err(e)) => Some(e),
        };
        let Some(e) = failure else {
            if let Some(w) = waiter {
                w.answered();
            }
            return;
        };
        if stop.is_cancelled() {
            return;
        }
        match &mut waiter {
            None => waiter = Some(outage.wait(Waiting::Outcomes, todo.len(), &e)),
            Some(w) => {
                w.again(todo.len(), &e);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => wait = (wait * 2).min(MAX_REDIS_WAIT),
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn down() -> StoreError {
        StoreError::Unavailable(redis::RedisError::from(std::io::Error::from(
            std::io::ErrorKind::TimedOut,
        )))
    }

    #[test]
    fn an_outage_pauses_once_and_resumes_when_its_last_waiter_is_answered() {
        let metrics = Metrics::default();
        let pause = Arc::new(Pause::counted(&metrics));
        let paused = pause.subscribe();
        let outage = Arc::new(Outage::new(pause));

        let mut claims = outage.wait(Waiting::Copies, 3, &down());
        assert!(*paused.borrow());
        let outcomes = outage.wait(Waiting::Outcomes, 2, &down());
        assert_eq!(outage.waiting(), (3, 2));
        assert_eq!(
            metrics.pauses.get(),
            1,
            "a second waiter does not pause again"
        );

        claims.again(1, &down());
        assert_eq!(outage.waiting(), (1, 2));
        claims.answered();
        assert!(*paused.borrow(), "still paused while outcomes wait");
        assert_eq!(outage.waiting(), (0, 2));

        outcomes.answered();
        assert!(!*paused.borrow(), "resumed with the last waiter");
        assert_eq!(outage.waiting(), (0, 0));
        assert_eq!(metrics.pauses.get(), 1);

        // The next outage is a new pause.
        drop(outage.wait(Waiting::Copies, 1, &down()));
        assert!(!*paused.borrow(), "a waiter given up on resumes too");
        assert_eq!(metrics.pauses.get(), 2);
    }

    #[test]
    fn an_outage_that_goes_on_is_reported_once_per_period_across_its_waiters() {
        let mut outage = Outage::new(Arc::new(Pause::default()));
        outage.report_every = Duration::from_millis(50);
        let outage = Arc::new(outage);
        let mut a = outage.wait(Waiting::Copies, 1, &down());
        let mut b = outage.wait(Waiting::Outcomes, 1, &down());
        assert!(!a.again(1, &down()), "not when it has just begun");
        std::thread::sleep(Duration::from_millis(60));
        assert!(a.again(1, &down()), "once the period has passed");
        assert!(!b.again(1, &down()), "not again for the other waiter");
        std::thread::sleep(Duration::from_millis(60));
        assert!(b.again(1, &down()));
    }

    #[test]
    fn a_circuit_pause_outlives_the_end_of_an_outage() {
        let pause = Arc::new(Pause::default());
        let paused = pause.subscribe();
        let outage = Arc::new(Outage::new(pause.clone()));
        pause.set(PauseReason::CircuitOpen, true);
        outage.wait(Waiting::Copies, 1, &down()).answered();
        assert!(*paused.borrow(), "the open circuit still holds the sources");
        pause.set(PauseReason::CircuitOpen, false);
        assert!(!*paused.borrow());
    }
}
