//! The circuit breaker in front of the endpoint: after a run of endpoint failures it stops all
//! calls for a while, so that a dead or overloaded downstream is not hammered and the pipeline can
//! pause both sources instead of burning every message's attempts.
//!
//! Closed → Open after `failure_threshold` consecutive endpoint failures (retryable or ambiguous;
//! a fatal answer is the message's fault and proves the endpoint is up, so it neither counts nor
//! resets the run). Open → HalfOpen once `open_for` has passed: `half_open_probes` calls are let
//! through; a success closes the circuit, a failure opens it again. Each call let through holds an
//! [`Admission`]: its outcome is recorded through it, and a probe whose call never happens (the
//! copy's lease lapsed, its task was cancelled) gives its slot back when the admission is dropped.
//! A probe still in flight keeps its slot however long its call takes: no second probe goes out
//! meanwhile.
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
    /// Probes let through in the current half-open round and not reported yet.
    probes_out: u32,
    /// Changes with every state change, so that a probe of an earlier round gives nothing back.
    epoch: u64,
}

/// One call the circuit let through. Report its outcome with [`Admission::record`]; an admission
/// dropped unrecorded (the call never happened) gives its probe slot back, if it held one.
#[derive(Debug)]
#[must_use = "an admission unrecorded gives its probe slot back at once"]
pub struct Admission<'a> {
    breaker: &'a CircuitBreaker,
    /// The half-open round whose probe slot this holds, if any.
    probe: Option<u64>,
}

impl Admission<'_> {
    /// Reports how the call went.
    pub fn record(mut self, result: &CallResult) {
        // Recorded: the slot is settled by the outcome, not given back on drop.
        self.probe = None;
        self.breaker.record(result);
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if let Some(epoch) = self.probe {
            self.breaker.give_back(epoch);
        }
    }
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
                epoch: 0,
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

    /// Lets one call go now, or not. In half-open state the admission holds one probe slot: take
    /// it only right before calling the sink, and report the result through it
    /// ([`Admission::record`]); dropped unrecorded, it gives the slot back.
    pub fn allow(&self) -> Option<Admission<'_>> {
        self.look(true).map(|probe| Admission {
            breaker: self,
            probe,
        })
    }

    /// Whether [`CircuitBreaker::allow`] would let a call go now, without taking a probe slot.
    pub fn would_allow(&self) -> bool {
        self.look(false).is_some()
    }

    /// Whether a call may go now: `None` if not; `Some(None)` if so without a probe (closed),
    /// `Some(Some(epoch))` when it is a probe of the half-open round `epoch`, which `take` takes.
    #[allow(clippy::option_option)]
    fn look(&self, take: bool) -> Option<Option<u64>> {
        let mut inner = self.lock();
        self.advance(&mut inner, Instant::now());
        match inner.state {
            CircuitState::Closed => Some(None),
            CircuitState::Open { .. } => None,
            CircuitState::HalfOpen if inner.probes_out < self.half_open_probes => {
                if take {
                    inner.probes_out += 1;
                }
                Some(Some(inner.epoch))
            }
            CircuitState::HalfOpen => None,
        }
    }

    /// Waits until a call is allowed, and takes its slot (as [`CircuitBreaker::allow`] does).
    pub async fn ready(&self) -> Admission<'_> {
        loop {
            self.callable().await;
            // Another caller may have taken the last probe slot since: then wait again.
            if let Some(admission) = self.allow() {
                return admission;
            }
        }
    }

    /// Waits until a call would be allowed, without taking a probe slot: for a caller that has
    /// more waiting to do before its call and asks [`CircuitBreaker::allow`] right before it.
    pub async fn callable(&self) {
        loop {
            let woken = self.wake.notified();
            tokio::pin!(woken);
            // Registered before looking, so a wake-up between the look and the wait is not lost.
            woken.as_mut().enable();
            if self.look(false).is_some() {
                return;
            }
            let look_again = match self.lock().state {
                CircuitState::Open { until } => Some(until),
                // Every probe is out: a report or a slot given back wakes the waiters.
                CircuitState::HalfOpen => None,
                // Closed since the look: look again at once.
                CircuitState::Closed => Some(Instant::now()),
            };
            match look_again {
                Some(at) => tokio::select! {
                    _ = &mut woken => {}
                    _ = tokio::time::sleep_until(at) => {}
                },
                None => woken.await,
            }
        }
    }

    /// Reports how a call went (through its [`Admission`]).
    fn record(&self, result: &CallResult) {
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

    /// The time-driven change: an open circuit whose time is up turns half-open.
    fn advance(&self, inner: &mut Inner, now: Instant) {
        if let CircuitState::Open { until } = inner.state {
            if now >= until {
                self.set(inner, CircuitState::HalfOpen, now);
            }
        }
    }

    /// A probe of round `epoch` whose call never happened: its slot goes to another call.
    fn give_back(&self, epoch: u64) {
        let mut inner = self.lock();
        if inner.state == CircuitState::HalfOpen && inner.epoch == epoch {
            inner.probes_out = inner.probes_out.saturating_sub(1);
            drop(inner);
            self.wake.notify_waiters();
        }
    }

    fn set(&self, inner: &mut Inner, state: CircuitState, _now: Instant) {
        inner.state = state;
        inner.probes_out = 0;
        inner.epoch += 1;
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
        assert!(b.allow().is_some());
        assert_eq!(b.state(), CircuitState::Closed);
        b.record(&retryable());
        assert!(b.state().is_open());
        assert!(b.allow().is_none());
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
        assert!(b.allow().is_none());
        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert!(b.allow().is_none());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(b.state(), CircuitState::HalfOpen);
        let first = b.allow().expect("probe 1");
        let second = b.allow().expect("probe 2");
        assert!(b.allow().is_none(), "only half_open_probes calls may go");
        first.record(&CallResult::Success);
        assert_eq!(b.state(), CircuitState::Closed);
        // The other probe of that round settles nothing any more.
        drop(second);
        assert!(b.allow().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_another_period() {
        let b = breaker(1, 1);
        b.record(&ambiguous());
        tokio::time::advance(Duration::from_secs(10)).await;
        b.allow().expect("the probe").record(&retryable());
        let CircuitState::Open { until } = b.state() else {
            panic!("not reopened: {:?}", b.state());
        };
        assert_eq!(until, Instant::now() + Duration::from_secs(10));
        assert!(b.allow().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_fatal_probe_frees_its_slot() {
        let b = breaker(1, 1);
        b.record(&retryable());
        tokio::time::advance(Duration::from_secs(10)).await;
        let probe = b.allow().expect("the probe");
        assert!(b.allow().is_none());
        probe.record(&fatal());
        assert_eq!(b.state(), CircuitState::HalfOpen);
        assert!(b.allow().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_whose_call_never_happens_gives_its_slot_back() {
        let b = Arc::new(breaker(1, 1));
        b.record(&retryable());
        tokio::time::advance(Duration::from_secs(10)).await;
        // The copy's lease lapsed before its call, or its task was cancelled.
        let probe = b.allow().expect("the probe");
        assert!(b.allow().is_none());
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.callable().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "the only probe is out");
        drop(probe);
        waiter.await.unwrap();
        assert!(b.allow().is_some(), "the slot is free at once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_in_flight_keeps_its_slot_however_long_its_call_takes() {
        let b = breaker(1, 1);
        b.record(&retryable());
        tokio::time::advance(Duration::from_secs(10)).await;
        let probe = b.allow().expect("the probe");
        // A slow endpoint: the call outlasts several open periods; no second probe goes out.
        for _ in 0..6 {
            tokio::time::advance(Duration::from_secs(10)).await;
            assert!(b.allow().is_none());
        }
        probe.record(&CallResult::Success);
        assert_eq!(b.state(), CircuitState::Closed);
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
        let probe = b.allow().expect("the probe");
        assert_eq!(*rx.borrow_and_update(), CircuitState::HalfOpen);
        probe.record(&CallResult::Success);
        assert_eq!(*rx.borrow_and_update(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn ready_waits_out_the_open_period() {
        let b = breaker(1, 1);
        b.record(&retryable());
        let start = Instant::now();
        let _probe = b.ready().await;
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        assert_eq!(b.state(), CircuitState::HalfOpen);
    }

    /// A probe is out; a waiter (`ready` when `take`, else `callable`) wakes when it succeeds.
    async fn waiter_wakes_when_the_probe_closes_the_circuit(take: bool) {
        let b = Arc::new(breaker(1, 1));
        b.record(&retryable());
        tokio::time::advance(Duration::from_secs(10)).await;
        let probe = b.allow().expect("the probe");
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                if take {
                    drop(b.ready().await);
                } else {
                    b.callable().await;
                }
                start.elapsed()
            })
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!waiter.is_finished());
        probe.record(&CallResult::Success);
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
        let _call = b.ready().await;
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
        let _probe = b.allow().expect("the probe");
        assert!(!b.would_allow(), "the only probe is out");
        assert!(b.allow().is_none());
    }
}
