//! The sink: where a message goes once the arbiter said PROCEED — the downstream "grant reward"
//! endpoint, which has no idempotency field of its own.
//!
//! [`Sink`] is the one call the pipeline makes per attempt, made in a [`Turn`] (a call slot) that
//! the pipeline takes first, asking the circuit breaker in between; [`CallResult`] says what came
//! of it in the terms the arbiter records ([`Outcome`]). The HTTP implementation is
//! [`http::HttpSink`]; the policies around it are separate objects the pipeline owns:
//! [`retry::Backoff`] (when the owner calls again), [`breaker::CircuitBreaker`] (stop calling a
//! dead endpoint, pause the sources) and [`rate::RateLimit`] (a ceiling on calls per second,
//! applied inside `HttpSink` when it hands out a turn).
//!
//! [`SinkConfig`] is the `[sink]` section of the config file.

pub mod breaker;
pub mod config;
pub mod http;
pub mod rate;
pub mod retry;

use std::time::Duration;

use crate::arbiter::Outcome;

pub use config::{
    CircuitConfig, ClassifyConfig, RetryConfig, SinkConfig, SinkHeaders, StatusPattern,
    RESERVED_HEADERS,
};

/// One call to the sink: the message as the owner side hands it over.
#[derive(Debug, Clone, Copy)]
pub struct SinkRequest<'a> {
    /// The cross-broker message id; sent as the `Idempotency-Key` header.
    pub message_id: &'a str,
    /// The side making the call; sent as `X-Mq-Cutover-Side`.
    pub side: &'a str,
    /// Which call this is for the id, 1-based (from the claim); sent as `X-Mq-Cutover-Attempt`.
    pub attempt: u32,
    /// The message payload, forwarded unchanged as the request body.
    pub body: &'a [u8],
}

/// What came of one call, with what the pipeline needs to act on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallResult {
    /// The endpoint accepted the message (2xx).
    Success,
    /// Not delivered, and a later call by the owner may succeed (5xx, 429, connection refused).
    Retryable {
        /// What went wrong, for the dead letter and the log.
        reason: String,
        /// How long the endpoint asked us to wait (`Retry-After`), if it said.
        retry_after: Option<Duration>,
    },
    /// Not delivered, and no retry will change that (4xx): the message's fault.
    Fatal {
        /// What went wrong, including the start of the endpoint's answer.
        reason: String,
    },
    /// The request was sent and no answer came: the reward may or may not have been granted.
    Ambiguous {
        /// What happened (`timeout after 5s`, `connection cut after sending`).
        reason: String,
    },
}

impl CallResult {
    /// The outcome to record with the arbiter (copies the reason).
    pub fn outcome(&self) -> Outcome {
        match self {
            CallResult::Success => Outcome::Success,
            CallResult::Retryable { reason, .. } => Outcome::Retryable(reason.clone()),
            CallResult::Fatal { reason } => Outcome::Fatal(reason.clone()),
            CallResult::Ambiguous { reason } => Outcome::Ambiguous(reason.clone()),
        }
    }

    /// The outcome to record with the arbiter, moving the reason instead of copying it.
    pub fn into_outcome(self) -> Outcome {
        match self {
            CallResult::Success => Outcome::Success,
            CallResult::Retryable { reason, .. } => Outcome::Retryable(reason),
            CallResult::Fatal { reason } => Outcome::Fatal(reason),
            CallResult::Ambiguous { reason } => Outcome::Ambiguous(reason),
        }
    }

    /// A short fixed label for metrics and logs: `success`, `retryable`, `fatal`, `ambiguous`.
    pub fn kind(&self) -> &'static str {
        match self {
            CallResult::Success => "success",
            CallResult::Retryable { .. } => "retryable",
            CallResult::Fatal { .. } => "fatal",
            CallResult::Ambiguous { .. } => "ambiguous",
        }
    }

    /// The reason, for every result but success.
    pub fn reason(&self) -> Option<&str> {
        match self {
            CallResult::Success => None,
            CallResult::Retryable { reason, .. }
            | CallResult::Fatal { reason }
            | CallResult::Ambiguous { reason } => Some(reason),
        }
    }

    /// The wait the endpoint asked for (`Retry-After` on a retryable answer), if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            CallResult::Retryable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Whether the result says something is wrong with the endpoint rather than the message
    /// (retryable or ambiguous): what the circuit breaker counts.
    pub fn is_endpoint_failure(&self) -> bool {
        matches!(
            self,
            CallResult::Retryable { .. } | CallResult::Ambiguous { .. }
        )
    }
}

/// A turn to call an endpoint: a slot under its concurrency limit, taken at a moment its rate
/// limit allows. The slot is held until the turn is dropped or the call made in it ends.
#[derive(Debug)]
#[must_use = "a turn holds a call slot until it is dropped"]
pub struct Turn<'a> {
    _slot: Option<tokio::sync::SemaphorePermit<'a>>,
}

impl<'a> Turn<'a> {
    /// A turn of an endpoint with no concurrency limit.
    pub fn unlimited() -> Self {
        Self { _slot: None }
    }

    /// A turn that holds `slot` of the endpoint's concurrency limit.
    pub fn holding(slot: tokio::sync::SemaphorePermit<'a>) -> Self {
        Self { _slot: Some(slot) }
    }
}

/// A downstream endpoint. Implementations classify every failure; they never panic or return
/// an error the caller has to interpret.
///
/// A call is two steps so that the caller can look at the circuit breaker between them: waiting
/// for a turn ([`Sink::turn`]) may take long when calls queue for the endpoint's slots, and the
/// circuit may open meanwhile; a caller that then gives its turn back has sent nothing.
#[async_trait::async_trait]
pub trait Sink: Send + Sync {
    /// Waits for a turn to call (a free slot under the concurrency limit, then the rate limit's
    /// next moment). Cancel-safe: dropping the future takes no slot. Default: at once.
    async fn turn(&self) -> Turn<'_> {
        Turn::unlimited()
    }

    /// Makes one call in `turn`, which it holds until the call ends. Cancel-safe in the sense
    /// that dropping the future abandons the call; the caller must then treat it as ambiguous,
    /// since the request may have gone out.
    async fn call_in(&self, turn: Turn<'_>, req: &SinkRequest<'_>) -> CallResult;

    /// Waits for a turn and makes one call in it, with no look at a circuit breaker between.
    async fn call(&self, req: &SinkRequest<'_>) -> CallResult {
        let turn = self.turn().await;
        self.call_in(turn, req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_results_map_to_arbiter_outcomes() {
        let r = CallResult::Retryable {
            reason: "HTTP 503".into(),
            retry_after: Some(Duration::from_secs(2)),
        };
        assert_eq!(r.outcome(), Outcome::Retryable("HTTP 503".into()));
        assert_eq!(CallResult::Success.outcome(), Outcome::Success);
        assert_eq!(
            CallResult::Fatal {
                reason: "HTTP 400".into()
            }
            .into_outcome(),
            Outcome::Fatal("HTTP 400".into())
        );
        assert_eq!(
            CallResult::Ambiguous {
                reason: "timeout".into()
            }
            .outcome(),
            Outcome::Ambiguous("timeout".into())
        );
        assert!(r.is_endpoint_failure());
        assert!(!CallResult::Fatal {
            reason: String::new()
        }
        .is_endpoint_failure());
        assert_eq!(r.kind(), "retryable");
        assert_eq!(r.reason(), Some("HTTP 503"));
        assert_eq!(r.retry_after(), Some(Duration::from_secs(2)));
        assert_eq!(CallResult::Success.retry_after(), None);
        assert_eq!(CallResult::Success.reason(), None);
    }
}
