//! The circuit breaker in front of the endpoint: after a run of endpoint failures it stops all
//! calls for a while, so that a dead or overloaded downstream is not hammered and the pipeline can
//! pause both sources instead of burning every message's attempts.
//!
//! Closed → Open after `failure_threshold` consecutive endpoint failures (retryable or ambiguous;
//! a fatal answer is the message's fault and proves the endpoint is up, so it neither counts nor
//! resets the run). Open → HalfOpen once `open_for` has passed: `half_open_probes` calls are let
//! through; a success closes the circuit, a failure opens it again. A probe that never reports
//! (its task was cancelled) is presumed lost after another `open_for`, and new probes go out.
//!
//! State is a std `Mutex` held only for a few instructions, never across an `.await`; changes are
//! published on a `watch` channel for whoever pauses the sources.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::{CallResult, CircuitConfig};

/// The breaker's state as published to subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Calls flow.
    Closed,
    /// No calls until `until`; then the circuit turns half-open on the next look.
    Open {
        /// When probes will be let through.
        until: Instant,
    },
    /// A few probe calls are let through to test the endpoint.
    HalfOpen,
}

impl CircuitState {
    /// `closed`, `open` or `half_open`, for logs and metric labels.
    pub fn as_str(&self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open { .. } => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }

    /// Whether no calls are allowed now (sources should pause).
    pub fn is_open(&self) -> bool {
        matches!(self, CircuitState::Open { .. })
    }
}

#[derive(Debug)]
struct Inner {
    state: CircuitState,
    consecutive_failures: u32,
    /// Probes let through in the current half-open round.
    probes_out: u32,
    /// When the current half-open round began (to re-arm lost probes).
    round_started: Instant,
}

/// A circuit breaker shared by every caller of one sink.
#[derive(Debug)]
pub struct CircuitBreaker {
    failure_threshold: u32,
    open_for: Duration,
    half_open_probes: u32,
    inner: Mutex<Inner>,
    published: watch::Sender<CircuitState>,
    /// Wakes `ready()` and `callable()` waiters when a call may have become allowed.
    wake: Notify,
}

impl CircuitBreaker {
    /// A closed breaker with the `[sink.circuit]` settings (zero counts are taken as one).
    pub fn new(cfg: &CircuitConfig) -> Self {
        let (published, _) = watch::channel(CircuitState::Closed);
        Self {
            failure_threshold: cfg.failure_threshold.max(1),
            open_for: cfg.open_for,
            half_open_probes: cfg.half_open_probes.max(1),
            inner: Mutex::new(Inner {
                state: CircuitState::Closed,
                consecutive_failures: 0,
                probes_out: 0,
                round_started: Instant::now(),
            }),
            published,
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state is a few counters that stay consistent even if a holder panicked.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current state (turning Open into HalfOpen if its time is up).
    pub fn state(&self) -> CircuitState {
        let mut inner = self.lock();
        self.advance(&mut inner, Instant::now());
        inner.state
    }

    /// State changes as they happen, for pausing the sources while the circuit is open. The
    /// Open → HalfOpen change is published when a caller next looks (`allow`, `ready`, `state`)
    /// after `open_for`; [`CircuitState::Open`] carries the moment to look again.
    pub fn subscribe(&self) -> watch::Receiver<CircuitState> {
        self.published.subscribe()
    }

    /// Whether one call may go now. In half-open state a `true` takes one probe slot, so call it
    /// only right before calling the sink, and report the result with [`CircuitBreaker::record`].
    pub fn allow(&self) -> bool {
        self.look(true)
    }

    /// Whether [`CircuitBreaker::allow`] would let a call go now, without taking a probe slot.
    pub fn would_allow(&self) -> bool {
        self.look(false)
    }

    fn look(&self, take: bool) -> bool {
        let mut inner = self.lock();
        self.advance(&mut inner, Instant::now());
        match inner.state {
            CircuitState::Closed => true,
            CircuitState::Open { .. } => false,
            CircuitState::HalfOpen if inner.probes_out < self.half_open_probes => {
                if take {
                    inner.probes_out += 1;
                }
                true
            }
            CircuitState::HalfOpen => false,
        }
    }

    /// Waits until a call is allowed, and takes its slot (as [`CircuitBreaker::allow`] does).
    pub async fn ready(&self) {
        self.wait(true).await
    }

    /// Waits until a call would be allowed, without taking a probe slot: for a caller that has
    /// more waiting to do before its call and asks [`CircuitBreaker::allow`] right before it.
    pub async fn callable(&self) {
        self.wait(false).await
    }

    async fn wait(&self, take: bool) {
        loop {
            let woken = self.wake.notified();
            tokio::pin!(woken);
            // Registered before looking, so a wake-up between the look and the wait is not lost.
            woken.as_mut().enable();
            if self.look(take) {
                return;
            }
            let look_again = {
                let inner = self.lock();
                match inner.state {
                    CircuitState::Open { until } => until,
                    CircuitState::HalfOpen => inner.round_started + self.open_for,
                    // Closed since the look: look again at once.
                    CircuitState::Closed => Instant::now(),
                }
            };
            tokio::select! {
                _ = &mut woken => {}
                _ = tokio::time::sleep_until(look_again) => {}
            }
        }
    }

    /// Reports how a call went.
    pub fn record(&self, result: &CallResult) {
        let now = Instant::now();
        let mut inner = self.lock();
        self.advance(&mut inner, now);
        match result {
            CallResult::Success => {
                inner.consecutive_failures = 0;
                if inner.state != CircuitState::Closed {
                    self.set(&mut inner, CircuitState::Closed, now);
                }
            }
            CallResult::Retryable { .. } | CallResult::Ambiguous { .. } => match inner.state {
                CircuitState::Closed => {
                    inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
                    if inner.consecutive_failures >= self.failure_threshold {
                        self.open(&mut inner, now);
                    }
                }
                CircuitState::HalfOpen => self.open(&mut inner, now),
                // A call that started before the circuit opened: it already counted.
                CircuitState::Open { .. } => {}
            },
            CallResult::Fatal { .. } => {
                // The endpoint answered; the message was bad. In half-open state that verdict
                // says nothing about the endpoint, so the probe slot goes to another call.
                if inner.state == CircuitState::HalfOpen {
                    inner.probes_out = inner.probes_out.saturating_sub(1);
                    self.wake.notify_waiters();
                }
            }
        }
    }

    fn open(&self, inner: &mut Inner, now: Instant) {
        tracing::warn!(
            consecutive_failures = inner.consecutive_failures,
            open_for = ?self.open_for,
            "sink circuit opened: calls stop until probes succeed"
        );
        self.set(
            inner,
            CircuitState::Open {
                until: now + self.open_for,
            },
            now,
        );
    }

    /// Time-driven changes: an open circuit whose time is up turns half-open; a half-open round
    /// whose probes never reported is re-armed.
    fn advance(&self, inner: &mut Inner, now: Instant) {
        match inner.state {
            CircuitState::Open { until } if now >= until => {
                self.set(inner, CircuitState::HalfOpen, now);
            }
            CircuitState::HalfOpen
                if inner.probes_out >= self.half_open_probes
                    && now >= inner.round_started + self.open_for =>
            {
                inner.probes_out = 0;
                inner.round_started = now;
            }
            _ => {}
        }
    }

    fn set(&self, inner: &mut Inner, state: CircuitState, now: Instant) {
        inner.state = state;
        inner.probes_out = 0;
        inner.round_started = now;
        if state == CircuitState::Closed {
            inner.consecutive_failures = 0;
        }
        if !state.is_open() {
            tracing::info!(state = state.as_str(), "sink circuit changed");
        }
        self.published.send_replace(state);
        self.wake.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn breaker(threshold: u32, probes: u32) -> CircuitBreaker {
        CircuitBreaker::new(&CircuitConfig {
            failure_threshold: threshold,
            open_for: Duration::from_secs(10),
            half_open_probes: probes,
        })
    }

    fn retryable() -> CallResult {
        CallResult::Retryable {
            reason: "HTTP 503".into(),
            retry_after: None,
        }
    }
    fn ambiguous() -> CallResult {
        CallResult::Ambiguous {
            reason: "timeout".into(),
        }
    }
    fn fatal() -> CallResult {
        CallResult::Fatal {
            reason: "HTTP 400".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_consecutive_endpoint_failures() {
        let b = breaker(3, 1);
        b.record(&retryable());
        b.record(&ambiguous());
        assert!(b.allow());
        assert_eq!(b.state(), CircuitState::Closed);
        b.record(&retryable());
        assert!(b.state().is_open());
        assert!(!b.allow());
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_run() {
        let b = breaker(3, 1);
        b.record(&retryable());
        b.record(&retryable());
        b.record(&CallResult::Success);
        b.record(&retryable());
        b.record(&retryable());
        assert_eq!(b.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn fatal_answers_neither_count_nor_reset() {
        let b = breaker(3, 1);
        for _ in 0..50 {
            b.record(&fatal());
        }
        assert_eq!(b.state(), CircuitState::Closed);
        b.record(&retryable());
        b.record(&retryable());
        b.record(&fatal());
        b.record(&retryable());
        assert!(
            b.state().is_open(),
            "fatal must not reset the run of failures"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_after_open_for_lets_probes_through_and_success_closes() {
        let b = breaker(1, 2);
        b.record(&retryable());
        assert!(!b.allow());
        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert!(!b.allow());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(b.state(), CircuitState::HalfOpen);
        assert!(b.allow());
        assert!(b.allow());
        assert!(!b.allow(), "only half_open_probes calls may go");
        b.record(&CallResult::Success);
        assert_eq!(b.state(), CircuitState::Closed);
        assert!(b.allow());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_another_period() {
        let b = breaker(1, 1);
        b.record(&ambiguous());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(b.allow());
        b.record(&retryable());
        let CircuitState::Open { until } = b.state() else {
            panic!("not reopened: {:?}", b.state());
        };
        assert_eq!(until, Instant::now() + Duration::from_secs(10));
        assert!(!b.allow());
    }

    #[tokio::test(start_paused = true)]
    async fn a_fatal_probe_frees_its_slot() {
        let b = breaker(1, 1);
        b.record(&retryable());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(b.allow());
        assert!(!b.allow());
        b.record(&fatal());
        assert_eq!(b.state(), CircuitState::HalfOpen);
        assert!(b.allow());
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_probe_is_rearmed_after_open_for() {
        let b = breaker(1, 1);
        b.record(&retryable());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(b.allow());
        // The probe's task never reports.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!b.allow());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(b.allow());
    }

    #[tokio::test(start_paused = true)]
    async fn late_failures_while_open_do_not_extend_it() {
        let b = breaker(1, 1);
        b.record(&retryable());
        let first = b.state();
        tokio::time::advance(Duration::from_secs(3)).await;
        b.record(&retryable());
        assert_eq!(b.state(), first);
    }

    #[tokio::test(start_paused = true)]
    async fn subscribers_see_every_change() {
        let b = breaker(2, 1);
        let mut rx = b.subscribe();
        assert_eq!(*rx.borrow_and_update(), CircuitState::Closed);
        b.record(&retryable());
        assert!(!rx.has_changed().unwrap());
        b.record(&retryable());
        assert!(rx.has_changed().unwrap());
        assert!(rx.borrow_and_update().is_open());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(b.allow());
        assert_eq!(*rx.borrow_and_update(), CircuitState::HalfOpen);
        b.record(&CallResult::Success);
        assert_eq!(*rx.borrow_and_update(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn ready_waits_out_the_open_period() {
        let b = breaker(1, 1);
        b.record(&retryable());
        let start = Instant::now();
        b.ready().await;
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        assert_eq!(b.state(), CircuitState::HalfOpen);
    }

    /// A probe is out; a waiter (`ready` when `take`, else `callable`) wakes when it succeeds.
    async fn waiter_wakes_when_the_probe_closes_the_circuit(take: bool) {
        let b = Arc::new(breaker(1, 1));
        b.record(&retryable());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(b.allow(), "the probe");
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                if take {
                    b.ready().await;
                } else {
                    b.callable().await;
                }
                start.elapsed()
            })
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!waiter.is_finished());
        b.record(&CallResult::Success);
        assert_eq!(waiter.await.unwrap(), Duration::from_secs(2));
        assert_eq!(b.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn ready_waiters_wake_when_a_probe_closes_the_circuit() {
        waiter_wakes_when_the_probe_closes_the_circuit(true).await;
    }

    #[tokio::test(start_paused = true)]
    async fn callable_waits_while_the_probe_is_out_and_wakes_when_it_closes_the_circuit() {
        waiter_wakes_when_the_probe_closes_the_circuit(false).await;
    }

    #[tokio::test(start_paused = true)]
    async fn ready_returns_at_once_when_closed() {
        let b = breaker(5, 1);
        let start = Instant::now();
        b.ready().await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn callable_waits_out_the_open_period_and_leaves_the_probe_to_allow() {
        let b = breaker(1, 1);
        b.record(&retryable());
        assert!(!b.would_allow());
        let start = Instant::now();
        b.callable().await;
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        // Looking took nothing: the probe slot is still there, once.
        assert!(b.would_allow());
        b.callable().await;
        assert!(b.allow(), "the probe");
        assert!(!b.would_allow(), "the only probe is out");
        assert!(!b.allow());
    }
}
