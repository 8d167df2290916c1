//! Retry policy: which HTTP statuses are worth another call ([`classify_status`]) and how long the
//! owner waits before making it ([`Backoff`]).
//!
//! Both are pure, so the schedule and the classification are tested without a network. The
//! pipeline asks [`Backoff::delay`] with the attempt number from the claim and the `Retry-After`
//! the endpoint sent, if any.

use std::time::Duration;

use super::{ClassifyConfig, RetryConfig};

/// How far a `Retry-After` may push a delay past the configured ceiling: 10 × `max_backoff`.
/// An endpoint asking for an hour is more likely broken than serious, and an id parked that long
/// holds up the operator's view of the migration.
pub const RETRY_AFTER_CAP_FACTOR: u32 = 10;

/// What a status means for the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// 2xx: delivered.
    Success,
    /// A later call may succeed.
    Retryable,
    /// No retry will help.
    Fatal,
}

/// Classifies an HTTP status per `[sink.classify]`: 2xx is success; otherwise the most specific
/// matching entry wins (an exact code beats a class), retryable winning a tie; a status neither
/// list matches is fatal.
pub fn classify_status(status: u16, cfg: &ClassifyConfig) -> Class {
    if (200..300).contains(&status) {
        return Class::Success;
    }
    let best = |list: &[super::StatusPattern]| {
        list.iter()
            .filter(|p| p.matches(status))
            .map(|p| p.specificity())
            .max()
    };
    match (best(&cfg.retryable_statuses), best(&cfg.fatal_statuses)) {
        (Some(r), Some(f)) if f > r => Class::Fatal,
        (Some(_), _) => Class::Retryable,
        (None, _) => Class::Fatal,
    }
}

/// Why a backoff policy was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackoffError {
    /// The first delay is zero.
    #[error("must be more than zero, e.g. `200ms`")]
    ZeroInitial,
    /// The first delay exceeds the ceiling.
    #[error(
        "{initial:?} is more than max_backoff {max:?}; the first delay must not exceed the ceiling"
    )]
    InitialAboveMax {
        /// The first delay asked for.
        initial: Duration,
        /// The ceiling asked for.
        max: Duration,
    },
    /// Delays would shrink (or the factor is not a number).
    #[error("{0} is below 1 (delays would shrink), e.g. `2.0`")]
    MultiplierBelowOne(f64),
    /// The jitter fraction is outside 0..=1.
    #[error("{0} is outside 0..=1; it is a fraction of the delay, e.g. `0.2` for ±20 %")]
    JitterOutOfRange(f64),
}

impl BackoffError {
    /// The `[sink.retry]` key the problem is about.
    pub fn field(&self) -> &'static str {
        match self {
            BackoffError::ZeroInitial | BackoffError::InitialAboveMax { .. } => "initial_backoff",
            BackoffError::MultiplierBelowOne(_) => "multiplier",
            BackoffError::JitterOutOfRange(_) => "jitter",
        }
    }
}

/// Exponential backoff with jitter: attempt 1 (the first retry) waits `initial`, each further
/// attempt `multiplier` times longer, never more than `max`; jitter spreads each delay uniformly
/// over ±`jitter` of itself (then capped at `max` again), so instances that failed together do not
/// retry together.
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    multiplier: f64,
    jitter: f64,
}

impl Backoff {
    /// A policy, refusing a zero or above-ceiling first delay, a multiplier below 1 and a jitter
    /// outside 0..=1.
    pub fn try_new(
        initial: Duration,
        max: Duration,
        multiplier: f64,
        jitter: f64,
    ) -> Result<Backoff, BackoffError> {
        if initial.is_zero() {
            return Err(BackoffError::ZeroInitial);
        }
        if initial > max {
            return Err(BackoffError::InitialAboveMax { initial, max });
        }
        // Written so that NaN fails too.
        if !(multiplier >= 1.0 && multiplier.is_finite()) {
            return Err(BackoffError::MultiplierBelowOne(multiplier));
        }
        if !(0.0..=1.0).contains(&jitter) {
            return Err(BackoffError::JitterOutOfRange(jitter));
        }
        Ok(Backoff {
            initial,
            max,
            multiplier,
            jitter,
        })
    }

    /// The policy of a `[sink.retry]` section.
    pub fn from_config(cfg: &RetryConfig) -> Result<Backoff, BackoffError> {
        Self::try_new(
            cfg.initial_backoff,
            cfg.max_backoff,
            cfg.multiplier,
            cfg.jitter,
        )
    }

    /// The ceiling on computed delays.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The ceiling on an honoured `Retry-After`: [`RETRY_AFTER_CAP_FACTOR`] × `max`.
    pub fn retry_after_cap(&self) -> Duration {
        self.max.saturating_mul(RETRY_AFTER_CAP_FACTOR)
    }

    /// The delay before retry number `attempt` (1 = the first retry; 0 is treated as 1). When the
    /// endpoint sent `Retry-After`, the longer of it (capped at [`Backoff::retry_after_cap`]) and
    /// the computed delay is used: the endpoint knows its own load, but may not shorten our
    /// backoff.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        self.delay_with(attempt, retry_after, rand::random::<f64>())
    }

    /// [`Backoff::delay`] with the random draw given (`unit` in 0..1; 0.5 means no jitter).
    pub fn delay_with(&self, attempt: u32, retry_after: Option<Duration>, unit: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(i32::MAX as u32) as i32;
        // In whole nanoseconds, rounded, so that float noise never shows in a schedule.
        let max = self.max.as_nanos() as f64;
        let base = (self.initial.as_nanos() as f64 * self.multiplier.powi(exponent)).min(max);
        // unit 0 → −jitter, 0.5 → none, 1 → +jitter.
        let factor = 1.0 + self.jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        let computed = Duration::from_nanos((base * factor).clamp(0.0, max).round() as u64);
        match retry_after {
            Some(asked) => computed.max(asked.min(self.retry_after_cap())),
            None => computed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::StatusPattern;
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn no_jitter() -> Backoff {
        Backoff::try_new(ms(200), Duration::from_secs(30), 2.0, 0.0).unwrap()
    }

    #[test]
    fn try_new_refuses_nonsense() {
        let s = Duration::from_secs(1);
        assert_eq!(
            Backoff::try_new(s * 2, s, 2.0, 0.1),
            Err(BackoffError::InitialAboveMax {
                initial: s * 2,
                max: s
            })
        );
        assert_eq!(
            Backoff::try_new(Duration::ZERO, s, 2.0, 0.1),
            Err(BackoffError::ZeroInitial)
        );
        assert_eq!(
            Backoff::try_new(s, s, 0.99, 0.1),
            Err(BackoffError::MultiplierBelowOne(0.99))
        );
        assert!(Backoff::try_new(s, s, f64::NAN, 0.1).is_err());
        assert!(Backoff::try_new(s, s, f64::INFINITY, 0.1).is_err());
        assert!(Backoff::try_new(s, s, 2.0, -0.01).is_err());
        assert!(Backoff::try_new(s, s, 2.0, 1.5).is_err());
        assert!(Backoff::try_new(s, s, 2.0, f64::NAN).is_err());
        assert!(Backoff::try_new(s, s, 1.0, 1.0).is_ok());
    }

    #[test]
    fn delays_grow_exponentially_up_to_the_ceiling() {
        let b = no_jitter();
        let got: Vec<Duration> = (1..=10).map(|a| b.delay(a, None)).collect();
        let want: Vec<Duration> = [200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]
            .into_iter()
            .map(ms)
            .collect();
        assert_eq!(got, want);
        assert_eq!(
            b.delay(0, None),
            ms(200),
            "attempt 0 counts as the first retry"
        );
        assert_eq!(b.delay(u32::MAX, None), Duration::from_secs(30));
    }

    #[test]
    fn jitter_spreads_within_the_fraction_and_under_the_ceiling() {
        let b =
            Backoff::try_new(Duration::from_secs(1), Duration::from_secs(10), 2.0, 0.2).unwrap();
        assert_eq!(b.delay_with(1, None, 0.0), ms(800));
        assert_eq!(b.delay_with(1, None, 0.5), ms(1000));
        assert_eq!(b.delay_with(1, None, 1.0), ms(1200));
        // At the ceiling jitter can only shorten the delay.
        assert_eq!(b.delay_with(9, None, 1.0), Duration::from_secs(10));
        assert_eq!(b.delay_with(9, None, 0.0), Duration::from_secs(8));
        let draws: Vec<Duration> = (0..200).map(|_| b.delay(2, None)).collect();
        assert!(
            draws.iter().all(|d| *d >= ms(1600) && *d <= ms(2400)),
            "{draws:?}"
        );
        assert!(draws.iter().any(|d| *d != draws[0]), "jitter never varied");
    }

    #[test]
    fn retry_after_is_honoured_when_longer_and_capped() {
        let b = no_jitter();
        assert_eq!(
            b.delay(1, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
        // Shorter than our own backoff: ours wins.
        assert_eq!(b.delay(5, Some(ms(100))), ms(3200));
        // Absurd: capped at 10 × max.
        assert_eq!(
            b.delay(1, Some(Duration::from_secs(86_400))),
            Duration::from_secs(300)
        );
        assert_eq!(b.retry_after_cap(), Duration::from_secs(300));
    }

    #[tokio::test(start_paused = true)]
    async fn sleeping_the_schedule_takes_exactly_its_sum() {
        let b = Backoff::try_new(ms(100), Duration::from_secs(1), 3.0, 0.0).unwrap();
        let start = tokio::time::Instant::now();
        for attempt in 1..=5 {
            tokio::time::sleep(b.delay(attempt, None)).await;
        }
        // 100 + 300 + 900 + 1000 + 1000
        assert_eq!(start.elapsed(), ms(3300));
    }

    fn classify(cfg: &ClassifyConfig, status: u16) -> Class {
        classify_status(status, cfg)
    }

    #[test]
    fn default_classification() {
        let cfg = ClassifyConfig::default();
        for s in [200, 201, 204, 299] {
            assert_eq!(classify(&cfg, s), Class::Success, "{s}");
        }
        for s in [408, 429, 500, 502, 503, 504, 599] {
            assert_eq!(classify(&cfg, s), Class::Retryable, "{s}");
        }
        for s in [400, 401, 403, 404, 409, 422, 499] {
            assert_eq!(classify(&cfg, s), Class::Fatal, "{s}");
        }
        // Matched by neither list: fatal (a redirect is a misconfigured URL, not a blip).
        for s in [100, 301, 302, 304, 307] {
            assert_eq!(classify(&cfg, s), Class::Fatal, "{s}");
        }
    }

    #[test]
    fn most_specific_entry_wins_and_retryable_wins_ties() {
        // 404 retryable although 4xx is fatal: exact beats class.
        let cfg = ClassifyConfig {
            retryable_statuses: vec![StatusPattern::Exact(404), StatusPattern::Class(5)],
            fatal_statuses: vec![StatusPattern::Class(4), StatusPattern::Exact(501)],
        };
        assert_eq!(classify(&cfg, 404), Class::Retryable);
        assert_eq!(classify(&cfg, 400), Class::Fatal);
        // 501 fatal although 5xx is retryable.
        assert_eq!(classify(&cfg, 501), Class::Fatal);
        assert_eq!(classify(&cfg, 502), Class::Retryable);
        // Same entry in both lists: retryable.
        let tie = ClassifyConfig {
            retryable_statuses: vec![StatusPattern::Class(4)],
            fatal_statuses: vec![StatusPattern::Class(4)],
        };
        assert_eq!(classify(&tie, 418), Class::Retryable);
        let empty = ClassifyConfig {
            retryable_statuses: vec![],
            fatal_statuses: vec![],
        };
        assert_eq!(classify(&empty, 503), Class::Fatal);
        assert_eq!(classify(&empty, 200), Class::Success);
    }
}
