//! [`HttpSink`]: the downstream endpoint over HTTP, with kept-alive connections, a cap on calls in
//! flight and an optional rate ceiling.
//!
//! Every call carries the message body unchanged and three headers: `Idempotency-Key` (the
//! cross-broker message id, so a downstream that does honour idempotency keys can), and
//! `X-Mq-Cutover-Side` / `X-Mq-Cutover-Attempt` (for the downstream's logs).
//!
//! The classification is the heart of it, because it decides whether the other side may ever be
//! involved and whether a reward might be granted twice:
//! - a status: 2xx success; otherwise per `[sink.classify]` (see [`classify_status`]);
//! - no connection (refused, DNS, connect timeout): retryable — nothing was sent;
//! - a timeout, or the connection cut, once the request may have been sent: ambiguous — the
//!   endpoint may have granted the reward.

use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use tokio::sync::Semaphore;

use super::rate::RateLimit;
use super::retry::{classify_status, Class};
use super::{CallResult, ClassifyConfig, Sink, SinkConfig, SinkRequest, Turn};
use crate::settings::ConfigError;

/// `Idempotency-Key`: the cross-broker message id.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// `X-Mq-Cutover-Side`: the side making the call.
pub const SIDE_HEADER: HeaderName = HeaderName::from_static("x-mq-cutover-side");
/// `X-Mq-Cutover-Attempt`: which call this is for the id, 1-based.
pub const ATTEMPT_HEADER: HeaderName = HeaderName::from_static("x-mq-cutover-attempt");

/// How much of an error answer's body goes into the reason.
const REASON_BODY_BYTES: usize = 200;
/// How much of an answer's body is read so its connection can go back to the pool; past this the
/// connection is dropped instead (cheaper than reading a runaway body).
const DRAIN_LIMIT_BYTES: usize = 64 * 1024;

/// Why an [`HttpSink`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The `[sink]` section is invalid (run [`SinkConfig::validate`] first to get this earlier).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The HTTP client could not be set up (TLS roots, resolver).
    #[error("cannot set up the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

/// The HTTP sink. Cheap to share behind an `Arc<dyn Sink>`; one connection pool for all callers.
pub struct HttpSink {
    client: reqwest::Client,
    url: reqwest::Url,
    method: reqwest::Method,
    classify: ClassifyConfig,
    max_concurrency: u32,
    in_flight: Semaphore,
    rate: Option<RateLimit>,
    /// `timeout after 5s`, formatted once.
    timeout_reason: String,
}

impl std::fmt::Debug for HttpSink {
    // Not derived: the client holds the configured headers (an API key) and the URL may hold a
    // password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSink")
            .field("url", &crate::secrets::redact_url(self.url.as_str()))
            .field("method", &self.method)
            .field("max_concurrency", &self.max_concurrency)
            .finish_non_exhaustive()
    }
}

impl HttpSink {
    /// Builds the client from a `[sink]` section, validating it first.
    pub fn new(cfg: &SinkConfig) -> Result<Self, BuildError> {
        cfg.validate()?;
        let url = cfg.parse_url()?;
        let method = cfg.parse_method()?;
        let headers: HeaderMap = cfg.parse_headers()?;
        // reqwest is built without a bundled crypto provider (it would pull in aws-lc); use
        // ring, which rustls-webpki already compiles. Installing fails only if one is already
        // installed, which is just as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder();
        let tls = cfg.tls.read("sink.tls")?;
        if let Some(ca) = &tls.ca {
            // Only the configured CA: a private endpoint's certificate must chain to it.
            let roots = reqwest::Certificate::from_pem_bundle(ca).map_err(|e| {
                ConfigError::new(
                    "sink.tls.ca_file",
                    format!("not a PEM certificate bundle: {e}"),
                )
            })?;
            builder = builder.tls_certs_only(roots);
        }
        if let Some((cert, key)) = &tls.client {
            let mut pem = cert.clone();
            pem.push(b'\n');
            pem.extend_from_slice(key);
            let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
                ConfigError::new(
                    "sink.tls.cert_file",
                    format!("the certificate and key_file are not a PEM certificate and private key: {e}"),
                )
            })?;
            builder = builder.identity(identity);
        }
        let client = builder
            .default_headers(headers)
            .user_agent(concat!("mq-cutover/", env!("CARGO_PKG_VERSION")))
            .timeout(cfg.timeout)
            // Half the budget for connecting: a connect that times out is reported as a connect
            // error (retryable, nothing sent) before the whole-call timeout (ambiguous) can fire.
            .connect_timeout((cfg.timeout / 2).max(Duration::from_millis(1)))
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_max_idle_per_host(cfg.max_concurrency as usize)
            // A redirect would silently change the endpoint (and turn a POST into a GET); report
            // it as the status it is instead.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(BuildError::Client)?;
        Ok(Self {
            client,
            url,
            method,
            classify: cfg.classify.clone(),
            max_concurrency: cfg.max_concurrency,
            in_flight: Semaphore::new(cfg.max_concurrency as usize),
            rate: cfg.rate_limit_per_second.map(RateLimit::new),
            timeout_reason: format!("timeout after {}", humantime::format_duration(cfg.timeout)),
        })
    }

    /// Calls in flight right now (for a gauge).
    pub fn in_flight(&self) -> usize {
        (self.max_concurrency as usize).saturating_sub(self.in_flight.available_permits())
    }

    async fn classify_response(&self, resp: reqwest::Response) -> CallResult {
        let status = resp.status().as_u16();
        match classify_status(status, &self.classify) {
            Class::Success => {
                // The answer is in; reading the body only lets the connection be reused.
                let _ = read_body(resp, 0).await;
                CallResult::Success
            }
            Class::Retryable => {
                let retry_after = resp
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, SystemTime::now()));
                CallResult::Retryable {
                    reason: status_reason(status, read_body(resp, REASON_BODY_BYTES).await),
                    retry_after,
                }
            }
            Class::Fatal => CallResult::Fatal {
                reason: status_reason(status, read_body(resp, REASON_BODY_BYTES).await),
            },
        }
    }

    fn classify_error(&self, e: &reqwest::Error) -> CallResult {
        // Order matters: a connect timeout is both `is_connect` and `is_timeout`, and nothing was
        // sent in that case.
        if e.is_connect() {
            CallResult::Retryable {
                reason: format!("connect failed: {}", root_cause(e)),
                retry_after: None,
            }
        } else if e.is_timeout() {
            CallResult::Ambiguous {
                reason: self.timeout_reason.clone(),
            }
        } else {
            // Everything else happens on a live connection once the request is (being) written:
            // the endpoint may have acted on it. hyper itself re-sends a request whose pooled
            // connection closed before any byte of it went out.
            CallResult::Ambiguous {
                reason: format!("connection cut after sending: {}", root_cause(e)),
            }
        }
    }
}

#[async_trait::async_trait]
impl Sink for HttpSink {
    async fn turn(&self) -> Turn<'_> {
        // The semaphore is never closed, so acquiring cannot fail.
        let Ok(slot) = self.in_flight.acquire().await else {
            unreachable!("the in-flight semaphore is never closed")
        };
        if let Some(rate) = &self.rate {
            rate.acquire().await;
        }
        Turn::holding(slot)
    }

    async fn call_in(&self, turn: Turn<'_>, req: &SinkRequest<'_>) -> CallResult {
        let _turn = turn;
        let Ok(id) = HeaderValue::from_str(req.message_id) else {
            return CallResult::Fatal {
                reason: "message id is not a valid HTTP header value (visible ASCII only)".into(),
            };
        };
        let Ok(side) = HeaderValue::from_str(req.side) else {
            return CallResult::Fatal {
                reason: "side name is not a valid HTTP header value".into(),
            };
        };
        let sent = self
            .client
            .request(self.method.clone(), self.url.clone())
            .header(IDEMPOTENCY_KEY, id)
            .header(SIDE_HEADER, side)
            .header(ATTEMPT_HEADER, HeaderValue::from(req.attempt))
            .body(req.body.to_vec())
            .send()
            .await;
        match sent {
            Ok(resp) => self.classify_response(resp).await,
            Err(e) => self.classify_error(&e),
        }
    }
}

/// `HTTP 400: <start of body>`, or `HTTP 400` when the body is empty.
fn status_reason(status: u16, body: Result<Vec<u8>, String>) -> String {
    match body {
        Ok(bytes) if bytes.is_empty() => format!("HTTP {status}"),
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            // One line in the log and the dead letter, whatever the endpoint sent.
            let text: String = text
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            format!("HTTP {status}: {}", text.trim())
        }
        Err(e) => format!("HTTP {status} (body unreadable: {e})"),
    }
}

/// Reads the body up to [`DRAIN_LIMIT_BYTES`], keeping its first `keep` bytes.
async fn read_body(mut resp: reqwest::Response, keep: usize) -> Result<Vec<u8>, String> {
    let mut kept = Vec::new();
    let mut read = 0usize;
    while read < DRAIN_LIMIT_BYTES {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if kept.len() < keep {
                    let take = (keep - kept.len()).min(chunk.len());
                    kept.extend_from_slice(&chunk[..take]);
                }
                read += chunk.len();
            }
            Ok(None) => break,
            Err(e) => return Err(root_cause(&e)),
        }
    }
    Ok(kept)
}

/// The innermost error's message (`Connection refused (os error 111)`), without reqwest's
/// wrapping that repeats the URL.
fn root_cause(e: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    cause.to_string()
}

/// Parses a `Retry-After` value: delay-seconds (`120`) or an HTTP date (`Wed, 21 Oct 2015
/// 07:28:00 GMT`, taken relative to `now`; a date in the past means no wait).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_000);
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        // 1_445_412_480 is Wed, 21 Oct 2015 07:28:00 GMT.
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(Duration::from_secs(480))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("-1", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
    }

    fn http_date() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let wkday =
            prop::sample::select(&["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun", "Xyz"][..]);
        let month = prop::sample::select(
            &[
                "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
                "Foo",
            ][..],
        );
        (
            wkday,
            0u32..40,
            month,
            prop_oneof![1900u32..2200, 0u32..100_000],
            0u32..30,
            0u32..70,
            0u32..70,
        )
            .prop_map(|(w, d, m, y, h, mi, s)| {
                format!("{w}, {d:02} {m} {y:04} {h:02}:{mi:02}:{s:02} GMT")
            })
    }

    proptest::proptest! {
        #![proptest_config(crate::fuzzing::config(1))]

        /// Whatever an endpoint sends as `Retry-After`, the wait it asks for is a value (or none)
        /// and the retry waits no longer than the cap.
        #[test]
        fn fuzz_retry_after(
            value in proptest::prop_oneof![
                crate::fuzzing::number_text(),
                http_date(),
                "(?s).{0,40}",
            ],
            now_secs in proptest::prop_oneof![0u64..4_102_444_800, proptest::prelude::any::<u64>()],
            attempt in proptest::prelude::any::<u32>(),
            unit in proptest::prelude::any::<f64>(),
        ) {
            let Some(now) = SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(now_secs)) else {
                return Ok(());
            };
            let asked = parse_retry_after(&value, now);
            let b = crate::sink::retry::Backoff::try_new(
                Duration::from_millis(200),
                Duration::from_secs(30),
                2.0,
                0.2,
            )
            .unwrap();
            let wait = b.delay_with(attempt, asked, unit);
            proptest::prop_assert!(wait <= b.retry_after_cap().max(b.max()));
        }
    }

    #[test]
    fn status_reason_is_one_line_with_the_start_of_the_body() {
        assert_eq!(status_reason(400, Ok(Vec::new())), "HTTP 400");
        assert_eq!(
            status_reason(400, Ok(b"{\"error\":\n\"bad user\"}\r\n".to_vec())),
            "HTTP 400: {\"error\": \"bad user\"}"
        );
        assert_eq!(
            status_reason(503, Err("reset".into())),
            "HTTP 503 (body unreadable: reset)"
        );
    }

    #[test]
    fn builds_from_a_valid_config_and_refuses_a_bad_one() {
        let mut cfg = SinkConfig::new("https://rewards.example.com/grant");
        cfg.rate_limit_per_second = Some(10);
        let sink = HttpSink::new(&cfg).unwrap();
        assert_eq!(sink.in_flight(), 0);
        assert_eq!(sink.timeout_reason, "timeout after 5s");
        cfg.max_concurrency = 0;
        let Err(BuildError::Config(e)) = HttpSink::new(&cfg) else {
            panic!("zero concurrency accepted");
        };
        assert_eq!(e.key, "sink.max_concurrency");
        let cfg = SinkConfig::new("ftp://x/");
        assert!(matches!(HttpSink::new(&cfg), Err(BuildError::Config(_))));
    }

    #[tokio::test]
    async fn ids_that_cannot_be_headers_are_fatal_without_a_call() {
        // Port 9 on loopback: nothing is sent anyway, the check comes first.
        let sink = HttpSink::new(&SinkConfig::new("http://127.0.0.1:9/grant")).unwrap();
        let got = sink
            .call(&SinkRequest {
                message_id: "line\nbreak",
                side: "kafka",
                attempt: 1,
                body: b"{}",
            })
            .await;
        assert!(matches!(got, CallResult::Fatal { .. }), "{got:?}");
    }
}
