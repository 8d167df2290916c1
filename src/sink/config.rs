//! `[sink]`: the downstream endpoint, the headers sent to it, and the policies around calls —
//! timeout, concurrency, retry backoff, status classification, circuit breaker, rate ceiling —
//! with the checks they pass before the daemon starts.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::retry;
use crate::settings::ConfigError;

/// `[sink]`: the downstream HTTP endpoint and the policies around calls to it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// The endpoint, `http://` or `https://`, e.g. `http://127.0.0.1:18080/grant`.
    pub url: String,
    /// The HTTP method: `GET`, `POST`, `PUT`, `PATCH` or `DELETE`.
    #[serde(default = "default_method")]
    pub method: String,
    /// Extra headers sent with every call (e.g. an API key or `Content-Type`). The sink's own
    /// headers (`Idempotency-Key`, `X-Mq-Cutover-Side`, `X-Mq-Cutover-Attempt`) may not be set.
    /// Their values never show in `Debug` or serialized output.
    #[serde(default)]
    pub headers: SinkHeaders,
    /// `[sink.header_files]`: headers whose values are read from files at load time (an API
    /// key in a mounted Secret), by header name; a header is given here or in `headers`.
    #[serde(default)]
    pub header_files: BTreeMap<String, PathBuf>,
    /// `[sink.tls]`: the CA to trust for an `https://` endpoint, and a client certificate for
    /// an endpoint that requires mutual TLS.
    #[serde(default)]
    pub tls: crate::tls::TlsFiles,
    /// How long one call may take, connecting included; a call that has sent its request and
    /// times out is ambiguous.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Calls in flight at once, across both sides.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: u32,
    /// How long an idle kept-alive connection stays in the pool. Keep it below the endpoint's
    /// own keep-alive timeout: a call sent on a connection the server is just closing ends
    /// ambiguous.
    #[serde(default = "default_pool_idle_timeout", with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// Backoff between the owner's calls for one id.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Which HTTP statuses are worth a retry.
    #[serde(default)]
    pub classify: ClassifyConfig,
    /// When to stop calling an endpoint that keeps failing.
    #[serde(default)]
    pub circuit: CircuitConfig,
    /// A ceiling on calls started per second, across both sides; absent means no ceiling.
    #[serde(default)]
    pub rate_limit_per_second: Option<u32>,
}

/// `[sink.headers]`: header name to value. Reads like the map it wraps; every value shows as
/// `***` in `Debug` and serialized output (an `Authorization` or API key header is a secret).
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SinkHeaders(BTreeMap<String, String>);

impl Deref for SinkHeaders {
    type Target = BTreeMap<String, String>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for SinkHeaders {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl<'a> IntoIterator for &'a SinkHeaders {
    type Item = (&'a String, &'a String);
    type IntoIter = std::collections::btree_map::Iter<'a, String, String>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl FromIterator<(String, String)> for SinkHeaders {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        SinkHeaders(BTreeMap::from_iter(iter))
    }
}

impl fmt::Debug for SinkHeaders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, crate::secrets::REDACTED)))
            .finish()
    }
}

impl Serialize for SinkHeaders {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.keys().map(|k| (k, crate::secrets::REDACTED)))
    }
}

fn default_method() -> String {
    "POST".to_owned()
}
fn default_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_max_concurrency() -> u32 {
    64
}
fn default_pool_idle_timeout() -> Duration {
    Duration::from_secs(90)
}

/// `[sink.retry]`: exponential backoff with jitter, the delay before the owner's next call.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Delay before the first retry.
    #[serde(default = "default_initial_backoff", with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Ceiling on the computed delay (a `Retry-After` may ask for up to 10 × this).
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Growth factor per retry, ≥ 1.
    #[serde(default = "default_multiplier")]
    pub multiplier: f64,
    /// Random spread as a fraction of the delay, 0 to 1: `0.2` means ±20 %.
    #[serde(default = "default_jitter")]
    pub jitter: f64,
}

fn default_initial_backoff() -> Duration {
    Duration::from_millis(200)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}
fn default_multiplier() -> f64 {
    2.0
}
fn default_jitter() -> f64 {
    0.2
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
            multiplier: default_multiplier(),
            jitter: default_jitter(),
        }
    }
}

/// `[sink.classify]`: how a non-2xx status is treated. Entries are exact codes (`"503"` or
/// `503`) or classes (`"5xx"`). The most specific match wins (an exact code beats a class); at
/// equal specificity retryable wins; a status matched by neither list is fatal. 2xx is always
/// success and may not be listed.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyConfig {
    /// Statuses a later call may fix.
    #[serde(default = "default_retryable_statuses")]
    pub retryable_statuses: Vec<StatusPattern>,
    /// Statuses no retry will fix (the message's fault).
    #[serde(default = "default_fatal_statuses")]
    pub fatal_statuses: Vec<StatusPattern>,
}

fn default_retryable_statuses() -> Vec<StatusPattern> {
    vec![
        StatusPattern::Exact(408),
        StatusPattern::Exact(429),
        StatusPattern::Class(5),
    ]
}
fn default_fatal_statuses() -> Vec<StatusPattern> {
    vec![StatusPattern::Class(4)]
}

impl Default for ClassifyConfig {
    fn default() -> Self {
        Self {
            retryable_statuses: default_retryable_statuses(),
            fatal_statuses: default_fatal_statuses(),
        }
    }
}

/// One entry of a status list: an exact code or a whole class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatusPattern {
    /// One status, 100..=599.
    Exact(u16),
    /// All statuses of a class: `Class(5)` is `5xx`.
    Class(u8),
}

impl StatusPattern {
    /// Whether `status` matches.
    pub fn matches(self, status: u16) -> bool {
        match self {
            StatusPattern::Exact(code) => code == status,
            StatusPattern::Class(class) => status / 100 == u16::from(class),
        }
    }

    /// How specific the pattern is: an exact code beats a class.
    pub fn specificity(self) -> u8 {
        match self {
            StatusPattern::Exact(_) => 2,
            StatusPattern::Class(_) => 1,
        }
    }

    fn covers_success(self) -> bool {
        match self {
            StatusPattern::Exact(code) => (200..300).contains(&code),
            StatusPattern::Class(class) => class == 2,
        }
    }
}

impl FromStr for StatusPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let bad = || format!("`{s}` is not a status or a class, e.g. `503` or `5xx`");
        if let Some(class) = t
            .strip_suffix("xx")
            .or_else(|| t.strip_suffix("XX"))
            .filter(|c| c.len() == 1)
        {
            let class: u8 = class.parse().map_err(|_| bad())?;
            if !(1..=5).contains(&class) {
                return Err(bad());
            }
            return Ok(StatusPattern::Class(class));
        }
        let code: u16 = t.parse().map_err(|_| bad())?;
        if !(100..=599).contains(&code) {
            return Err(format!("`{s}` is outside 100..=599, e.g. `503`"));
        }
        Ok(StatusPattern::Exact(code))
    }
}

impl fmt::Display for StatusPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StatusPattern::Exact(code) => write!(f, "{code}"),
            StatusPattern::Class(class) => write!(f, "{class}xx"),
        }
    }
}

impl Serialize for StatusPattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for StatusPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // TOML lets a list hold `503` and `"5xx"` side by side; environment overrides are strings.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(v) => v.to_string().parse(),
            Raw::Str(s) => s.parse(),
        }
        .map_err(serde::de::Error::custom)
    }
}

/// `[sink.circuit]`: the circuit breaker (see [`super::breaker::CircuitBreaker`]).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitConfig {
    /// Consecutive endpoint failures (retryable or ambiguous; fatal ones do not count) that open
    /// the circuit.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    /// How long the circuit stays open before probe calls are let through.
    #[serde(default = "default_open_for", with = "humantime_serde")]
    pub open_for: Duration,
    /// Probe calls let through while half-open; one success closes the circuit.
    #[serde(default = "default_half_open_probes")]
    pub half_open_probes: u32,
}

fn default_failure_threshold() -> u32 {
    20
}
fn default_open_for() -> Duration {
    Duration::from_secs(10)
}
fn default_half_open_probes() -> u32 {
    1
}

impl Default for CircuitConfig {
    fn default() -> Self {
        Self {
            failure_threshold: default_failure_threshold(),
            open_for: default_open_for(),
            half_open_probes: default_half_open_probes(),
        }
    }
}

/// Headers the sink sets itself on every call; configuring them would break identity.
pub const RESERVED_HEADERS: [&str; 3] = [
    "idempotency-key",
    "x-mq-cutover-side",
    "x-mq-cutover-attempt",
];

fn problem(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        problem: problem.into(),
    }
}

impl SinkConfig {
    /// A config with every default and this endpoint.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            method: default_method(),
            headers: SinkHeaders::default(),
            header_files: BTreeMap::new(),
            tls: Default::default(),
            timeout: default_timeout(),
            max_concurrency: default_max_concurrency(),
            pool_idle_timeout: default_pool_idle_timeout(),
            retry: RetryConfig::default(),
            classify: ClassifyConfig::default(),
            circuit: CircuitConfig::default(),
            rate_limit_per_second: None,
        }
    }

    /// Reads the values of `[sink.header_files]` into `headers` (load time). A header named in
    /// both tables (in any letter case) is refused.
    pub fn read_header_files(&mut self) -> Result<(), ConfigError> {
        for (name, path) in &self.header_files {
            let key = format!("sink.header_files.{name}");
            if let Some(other) = self.headers.keys().find(|h| h.eq_ignore_ascii_case(name)) {
                return Err(crate::secrets::both(&format!("sink.headers.{other}"), &key));
            }
            let value = crate::secrets::read_secret_file(&key, path)?;
            self.headers.insert(name.clone(), value.expose().to_owned());
        }
        Ok(())
    }

    /// Checks every rule that needs no network I/O (the TLS files must exist); the first problem
    /// found is returned, naming its key (`sink.url`, `sink.retry.jitter`, …).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let url = self.parse_url()?;
        self.parse_method()?;
        self.parse_headers()?;
        self.tls.check("sink.tls")?;
        if !self.tls.is_empty() && url.scheme() != "https" {
            return Err(problem(
                "sink.tls",
                format!(
                    "`[sink.tls]` is set but sink.url `{}` is not https://: TLS would not be used",
                    crate::secrets::redact_url(&self.url)
                ),
            ));
        }
        if self.timeout.is_zero() {
            return Err(problem("sink.timeout", "must be more than zero, e.g. `5s`"));
        }
        if self.max_concurrency == 0 {
            return Err(problem(
                "sink.max_concurrency",
                "must be at least 1, e.g. `64`",
            ));
        }
        retry::Backoff::from_config(&self.retry)
            .map_err(|e| problem(format!("sink.retry.{}", e.field()), e.to_string()))?;
        for (list, patterns) in [
            ("retryable_statuses", &self.classify.retryable_statuses),
            ("fatal_statuses", &self.classify.fatal_statuses),
        ] {
            if let Some(i) = patterns.iter().position(|p| p.covers_success()) {
                return Err(problem(
                    format!("sink.classify.{list}[{i}]"),
                    format!(
                        "`{}` is a success status; 2xx is always success, e.g. list `5xx` or `429`",
                        patterns[i]
                    ),
                ));
            }
        }
        let c = &self.circuit;
        if c.failure_threshold == 0 {
            return Err(problem(
                "sink.circuit.failure_threshold",
                "must be at least 1, e.g. `20`",
            ));
        }
        if c.open_for.is_zero() {
            return Err(problem(
                "sink.circuit.open_for",
                "must be more than zero, e.g. `10s`",
            ));
        }
        if c.half_open_probes == 0 {
            return Err(problem(
                "sink.circuit.half_open_probes",
                "must be at least 1, e.g. `1`",
            ));
        }
        if self.rate_limit_per_second == Some(0) {
            return Err(problem(
                "sink.rate_limit_per_second",
                "must be at least 1 (leave it out for no limit), e.g. `500`",
            ));
        }
        Ok(())
    }

    pub(crate) fn parse_url(&self) -> Result<reqwest::Url, ConfigError> {
        let example = "e.g. `http://127.0.0.1:18080/grant`";
        let url = reqwest::Url::parse(self.url.trim()).map_err(|e| {
            problem(
                "sink.url",
                format!(
                    "`{}` is not a URL ({e}), {example}",
                    crate::secrets::redact_url(&self.url)
                ),
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
            return Err(problem(
                "sink.url",
                format!(
                    "`{}` must be an http:// or https:// URL with a host, {example}",
                    crate::secrets::redact_url(&self.url)
                ),
            ));
        }
        Ok(url)
    }

    pub(crate) fn parse_method(&self) -> Result<reqwest::Method, ConfigError> {
        const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];
        let upper = self.method.trim().to_ascii_uppercase();
        if !METHODS.contains(&upper.as_str()) {
            return Err(problem(
                "sink.method",
                format!("`{}` is not one of: {}", self.method, METHODS.join(", ")),
            ));
        }
        reqwest::Method::from_bytes(upper.as_bytes())
            .map_err(|e| problem("sink.method", e.to_string()))
    }

    pub(crate) fn parse_headers(&self) -> Result<reqwest::header::HeaderMap, ConfigError> {
        use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
        let mut map = HeaderMap::with_capacity(self.headers.len());
        for (name, value) in &self.headers {
            let key = format!("sink.headers.{name}");
            let header = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| {
                problem(
                    &key,
                    format!("`{name}` is not an HTTP header name, e.g. `X-Api-Key`"),
                )
            })?;
            if RESERVED_HEADERS.contains(&header.as_str()) {
                return Err(problem(
                    &key,
                    format!("`{name}` is set by the sink itself for every call and may not be configured"),
                ));
            }
            let mut value = HeaderValue::from_str(value).map_err(|_| {
                problem(&key, "the value must be visible ASCII without line breaks")
            })?;
            // Sensitive: hyper's `Debug` hides it, and HTTP/2 never puts it in its header table.
            value.set_sensitive(true);
            map.append(header, value);
        }
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses a `[sink]` table the way the config file is read.
    fn parse(toml: &str) -> Result<SinkConfig, String> {
        crate::settings::parse_section(toml)
    }

    fn good() -> SinkConfig {
        SinkConfig::new("http://127.0.0.1:18080/grant")
    }

    fn key_of(cfg: &SinkConfig) -> String {
        cfg.validate().expect_err("must be refused").key
    }

    #[test]
    fn defaults_are_as_documented_and_valid() {
        let cfg = parse("url = \"http://127.0.0.1:18080/grant\"").unwrap();
        assert_eq!(cfg.method, "POST");
        assert!(cfg.headers.is_empty());
        assert_eq!(cfg.timeout, Duration::from_secs(5));
        assert_eq!(cfg.max_concurrency, 64);
        assert_eq!(cfg.pool_idle_timeout, Duration::from_secs(90));
        assert_eq!(cfg.retry.initial_backoff, Duration::from_millis(200));
        assert_eq!(cfg.retry.max_backoff, Duration::from_secs(30));
        assert_eq!(cfg.retry.multiplier, 2.0);
        assert_eq!(cfg.retry.jitter, 0.2);
        assert_eq!(
            cfg.classify.retryable_statuses,
            vec![
                StatusPattern::Exact(408),
                StatusPattern::Exact(429),
                StatusPattern::Class(5)
            ]
        );
        assert_eq!(cfg.classify.fatal_statuses, vec![StatusPattern::Class(4)]);
        assert_eq!(cfg.circuit.failure_threshold, 20);
        assert_eq!(cfg.circuit.open_for, Duration::from_secs(10));
        assert_eq!(cfg.circuit.half_open_probes, 1);
        assert_eq!(cfg.rate_limit_per_second, None);
        cfg.validate().unwrap();
    }

    #[test]
    fn full_table_parses_with_mixed_status_entries() {
        let cfg = parse(
            r#"
url = "https://rewards.internal/v1/grant"
method = "put"
timeout = "2s"
max_concurrency = 8
pool_idle_timeout = "30s"
rate_limit_per_second = 500
[headers]
X-Api-Key = "k"
[retry]
initial_backoff = "100ms"
max_backoff = "5s"
multiplier = 3
jitter = 0
[classify]
retryable_statuses = [404, "5XX", "429"]
fatal_statuses = ["4xx", 501]
[circuit]
failure_threshold = 5
open_for = "1s"
half_open_probes = 2
"#,
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.parse_method().unwrap(), reqwest::Method::PUT);
        assert_eq!(cfg.retry.multiplier, 3.0);
        assert_eq!(cfg.retry.jitter, 0.0);
        assert_eq!(
            cfg.classify.retryable_statuses,
            vec![
                StatusPattern::Exact(404),
                StatusPattern::Class(5),
                StatusPattern::Exact(429)
            ]
        );
        assert_eq!(cfg.rate_limit_per_second, Some(500));
        assert_eq!(cfg.parse_headers().unwrap().len(), 1);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = parse("url = \"http://x/\"\nretries = 3").unwrap_err();
        assert!(err.contains("retries"), "{err}");
        let err = parse("url = \"http://x/\"\n[retry]\nbackoff = \"1s\"").unwrap_err();
        assert!(err.contains("backoff"), "{err}");
    }

    #[test]
    fn status_entries_must_parse() {
        for bad in ["50x", "6xx", "0xx", "99", "600", "abc", "", "5xxx"] {
            assert!(bad.parse::<StatusPattern>().is_err(), "`{bad}` accepted");
        }
        assert_eq!("503".parse(), Ok(StatusPattern::Exact(503)));
        assert_eq!(" 4xx ".parse(), Ok(StatusPattern::Class(4)));
        let err =
            parse("url = \"http://x/\"\n[classify]\nretryable_statuses = [\"5x\"]").unwrap_err();
        assert!(err.contains("`5x`"), "{err}");
        let err = parse("url = \"http://x/\"\n[classify]\nfatal_statuses = [700]").unwrap_err();
        assert!(err.contains("700"), "{err}");
    }

    #[test]
    fn status_patterns_round_trip_through_text() {
        for p in [StatusPattern::Exact(429), StatusPattern::Class(5)] {
            assert_eq!(p.to_string().parse(), Ok(p));
        }
        assert_eq!(
            serde_json::to_string(&StatusPattern::Class(5)).unwrap(),
            "\"5xx\""
        );
    }

    #[test]
    fn success_statuses_may_not_be_classified() {
        let mut cfg = good();
        cfg.classify
            .retryable_statuses
            .push(StatusPattern::Exact(204));
        assert_eq!(key_of(&cfg), "sink.classify.retryable_statuses[3]");
        let mut cfg = good();
        cfg.classify.fatal_statuses = vec![StatusPattern::Class(2)];
        assert_eq!(key_of(&cfg), "sink.classify.fatal_statuses[0]");
    }

    #[test]
    fn url_must_be_http_with_a_host() {
        for bad in [
            "",
            "127.0.0.1:18080/grant",
            "ftp://host/x",
            "http://",
            "grant",
            "redis://h:1",
        ] {
            let mut cfg = good();
            cfg.url = bad.into();
            assert_eq!(key_of(&cfg), "sink.url", "`{bad}` accepted");
        }
        for ok in [
            "http://localhost/grant",
            "https://rewards.example.com:8443/v1/grant?x=1",
        ] {
            let mut cfg = good();
            cfg.url = ok.into();
            cfg.validate().unwrap();
        }
    }

    #[test]
    fn method_must_be_one_of_five() {
        for bad in ["HEAD", "OPTIONS", "CONNECT", "", "POSTX"] {
            let mut cfg = good();
            cfg.method = bad.into();
            let err = cfg.validate().unwrap_err();
            assert_eq!(err.key, "sink.method", "`{bad}` accepted");
            assert!(err.problem.contains("GET, POST, PUT, PATCH, DELETE"));
        }
        for ok in ["GET", "post", "Put", "PATCH", "DELETE"] {
            let mut cfg = good();
            cfg.method = ok.into();
            cfg.validate().unwrap();
        }
    }

    #[test]
    fn headers_must_be_valid_and_not_the_sinks_own() {
        let mut cfg = good();
        cfg.headers.insert("Bad Name".into(), "v".into());
        assert_eq!(key_of(&cfg), "sink.headers.Bad Name");
        let mut cfg = good();
        cfg.headers.insert("X-Token".into(), "line\nbreak".into());
        assert_eq!(key_of(&cfg), "sink.headers.X-Token");
        for reserved in [
            "Idempotency-Key",
            "x-mq-cutover-side",
            "X-MQ-Cutover-Attempt",
        ] {
            let mut cfg = good();
            cfg.headers.insert(reserved.into(), "v".into());
            assert_eq!(key_of(&cfg), format!("sink.headers.{reserved}"));
        }
    }

    #[test]
    fn timeout_must_be_positive() {
        let mut cfg = good();
        cfg.timeout = Duration::ZERO;
        assert_eq!(key_of(&cfg), "sink.timeout");
    }

    #[test]
    fn max_concurrency_must_be_at_least_one() {
        let mut cfg = good();
        cfg.max_concurrency = 0;
        assert_eq!(key_of(&cfg), "sink.max_concurrency");
        cfg.max_concurrency = 1;
        cfg.validate().unwrap();
    }

    #[test]
    fn backoff_rules_name_their_key() {
        let mut cfg = good();
        cfg.retry.initial_backoff = Duration::from_secs(60);
        assert_eq!(key_of(&cfg), "sink.retry.initial_backoff");
        let mut cfg = good();
        cfg.retry.initial_backoff = Duration::ZERO;
        assert_eq!(key_of(&cfg), "sink.retry.initial_backoff");
        let mut cfg = good();
        cfg.retry.multiplier = 0.5;
        assert_eq!(key_of(&cfg), "sink.retry.multiplier");
        let mut cfg = good();
        cfg.retry.multiplier = f64::NAN;
        assert_eq!(key_of(&cfg), "sink.retry.multiplier");
        for jitter in [-0.1, 1.01, f64::NAN] {
            let mut cfg = good();
            cfg.retry.jitter = jitter;
            assert_eq!(key_of(&cfg), "sink.retry.jitter");
        }
        let mut cfg = good();
        cfg.retry.jitter = 1.0;
        cfg.retry.multiplier = 1.0;
        cfg.retry.initial_backoff = cfg.retry.max_backoff;
        cfg.validate().unwrap();
    }

    #[test]
    fn circuit_rules_name_their_key() {
        let mut cfg = good();
        cfg.circuit.failure_threshold = 0;
        assert_eq!(key_of(&cfg), "sink.circuit.failure_threshold");
        let mut cfg = good();
        cfg.circuit.open_for = Duration::ZERO;
        assert_eq!(key_of(&cfg), "sink.circuit.open_for");
        let mut cfg = good();
        cfg.circuit.half_open_probes = 0;
        assert_eq!(key_of(&cfg), "sink.circuit.half_open_probes");
    }

    #[test]
    fn rate_limit_must_be_at_least_one_when_set() {
        let mut cfg = good();
        cfg.rate_limit_per_second = Some(0);
        assert_eq!(key_of(&cfg), "sink.rate_limit_per_second");
        cfg.rate_limit_per_second = Some(1);
        cfg.validate().unwrap();
    }
}
