//! Configuration: a TOML file plus `MQ_CUTOVER__SECTION__KEY` environment overrides, parsed into
//! serde structs that refuse unknown keys, then validated without any I/O.
//!
//! Every error names the key it is about (`side[1].name`, `switches.initial.percent`) and says
//! what a good value looks like, in one line.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::num::NonZeroU32;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::secrets::Secret;
use crate::secrets::{fill_from_file, read_secret_file, redact_url, REDACTED};
use crate::tls::TlsFiles;

/// A configuration problem: the key it is about and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config error at `{key}`: {problem}")]
pub struct ConfigError {
    /// The dotted path of the offending key (`redis.urls`, `side[0].kafka.topics`).
    pub key: String,
    /// What is wrong, with an example of a good value where that helps.
    pub problem: String,
}

impl ConfigError {
    /// A problem with `key`.
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// The whole configuration file, as parsed. Use [`Config::validate`] before acting on it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the arbitration state and the switches live.
    pub redis: RedisConfig,
    /// Leases, retention, retries and the policy for outcomes nobody can know.
    #[serde(default)]
    pub arbiter: ArbiterConfig,
    /// How switches propagate, and the values to start from on an empty Redis.
    #[serde(default)]
    pub switches: SwitchesConfig,
    /// Which side is old and which is new.
    pub cutover: CutoverConfig,
    /// The consuming sides, one `[[side]]` table each.
    #[serde(rename = "side")]
    pub sides: Vec<SideConfig>,
    /// The downstream endpoint every winning message is forwarded to.
    pub sink: crate::sink::SinkConfig,
    /// Batching, in-flight limits and the shutdown deadline.
    #[serde(default)]
    pub pipeline: PipelineConfig,
    /// Where parked messages are kept.
    #[serde(default)]
    pub dead_letters: DeadLettersConfig,
    /// The dual-read check: per-side counts and one-sided ids.
    #[serde(default)]
    pub parity: crate::parity::ParityConfig,
    /// Log format and filter.
    #[serde(default)]
    pub log: LogConfig,
    /// The admin listener: metrics and health.
    #[serde(default)]
    pub admin: AdminConfig,
}

/// `[admin]`: where `/metrics`, `/healthz`, `/readyz`, the status page and the operator API are
/// served, and who may use the API.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address to listen on, e.g. `0.0.0.0:9464` in a container.
    #[serde(default = "default_admin_listen")]
    pub listen: std::net::SocketAddr,
    /// The operator's bearer token: every route under `/api`, reads and writes. At least
    /// [`MIN_TOKEN_BYTES`] bytes, no placeholder. Prefer `MQ_CUTOVER__ADMIN__TOKEN`. Never logged.
    #[serde(default)]
    pub token: Option<Secret>,
    /// The read-only bearer token: the `/api` reads (the status page's). Same rules as `token`,
    /// and different from it. Prefer `MQ_CUTOVER__ADMIN__VIEWER_TOKEN`. Never logged.
    #[serde(default)]
    pub viewer_token: Option<Secret>,
    /// `Host` header values the status page and `/api` answer to, besides `localhost`,
    /// `127.0.0.1`, `[::1]` and the listen address (a defence against DNS rebinding); `host` or
    /// `host:port`; `["*"]` answers to any.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// A file holding the operator token (a mounted Secret), read at load time; instead of
    /// `token`.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// A file holding the viewer token, read at load time; instead of `viewer_token`.
    #[serde(default)]
    pub viewer_token_file: Option<PathBuf>,
}

/// Shortest operator or viewer token accepted, in bytes (`openssl rand -hex 32` gives 64).
pub const MIN_TOKEN_BYTES: usize = 32;

/// Words that mark a value as a placeholder someone forgot to replace, matched anywhere in the
/// value, ignoring case.
const PLACEHOLDER_MARKS: &[&str] = &[
    "change-me",
    "change_me",
    "changeme",
    "replace-me",
    "replace_me",
    "replaceme",
    "placeholder",
    "example",
    "your-token",
    "your_token",
];

/// Well-known default secrets, matched as the whole value, ignoring case.
const PLACEHOLDER_VALUES: &[&str] = &[
    "secret", "token", "password", "passwd", "admin", "default", "test", "demo", "xxx", "todo",
];

/// Why `value` looks like a placeholder rather than a secret, if it does.
pub fn placeholder(value: &str) -> Option<&'static str> {
    let lower = value.trim().to_ascii_lowercase();
    if lower.is_empty() {
        return Some("it is empty");
    }
    if PLACEHOLDER_VALUES.contains(&lower.as_str()) {
        return Some("it is a well-known default");
    }
    PLACEHOLDER_MARKS
        .iter()
        .any(|m| lower.contains(m))
        .then_some("it is a placeholder (it says to change or replace it)")
}

/// Checks an operator or viewer token; the error never shows the token.
fn validate_token(key: &str, token: &Secret) -> Result<(), ConfigError> {
    let t = token.expose();
    let refuse = |why: String| {
        Err(ConfigError::new(
            key,
            format!("{why}; make one with `openssl rand -hex 32`"),
        ))
    };
    if let Some(why) = placeholder(t) {
        return refuse(format!("refused because {why}"));
    }
    if t.len() < MIN_TOKEN_BYTES {
        return refuse(format!(
            "is {} bytes; a token must be at least {MIN_TOKEN_BYTES}",
            t.len()
        ));
    }
    // What a client can send in `Authorization: Bearer …` (RFC 9110 visible characters).
    if !t.bytes().all(|b| b.is_ascii_graphic()) {
        return refuse("must be printable ASCII without spaces".into());
    }
    let distinct: HashSet<u8> = t.bytes().collect();
    if distinct.len() < 8 {
        return refuse(format!(
            "has only {} distinct characters: not a random token",
            distinct.len()
        ));
    }
    Ok(())
}

fn default_admin_listen() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 9464))
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            token: None,
            viewer_token: None,
            allowed_hosts: Vec::new(),
            token_file: None,
            viewer_token_file: None,
        }
    }
}

/// `[redis]`: the server (or cluster) holding claims and switches.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `standalone` (one server, or a proxy), `cluster` (Redis Cluster) or `sentinel` (a
    /// primary with replicas, its address asked of Redis Sentinel).
    #[serde(default)]
    pub mode: RedisMode,
    /// `redis://host:port[/db]` or `rediss://…` for TLS; one URL for standalone, seed nodes for
    /// cluster, the sentinels for sentinel (`rediss://` ones: TLS to the sentinels and to the
    /// primary). A password inside a URL is shown as `***` wherever the URL is printed.
    #[serde(serialize_with = "redacted_urls")]
    pub urls: Vec<String>,
    /// ACL user name (Redis 6+); may also be given in the URL.
    #[serde(default)]
    pub username: Option<String>,
    /// Password; prefer `MQ_CUTOVER__REDIS__PASSWORD` or `password_file` over writing it in the
    /// file. Never logged.
    #[serde(default)]
    pub password: Option<Secret>,
    /// A file holding the password (a mounted Secret), read at load time; instead of `password`.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// `[redis.tls]`: the CA to trust and a client certificate, for `rediss://` URLs.
    #[serde(default)]
    pub tls: TlsFiles,
    /// `[redis.sentinel]`: the primary's name and the sentinels' own credentials
    /// (`mode = "sentinel"` only).
    #[serde(default)]
    pub sentinel: SentinelConfig,
    /// Prefix of every key this daemon writes, so several migrations can share one Redis.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// How long to wait for a connection to be set up.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long to wait for one reply before the call counts as failed (and Redis as unreachable).
    #[serde(default = "default_response_timeout", with = "humantime_serde")]
    pub response_timeout: Duration,
}

fn redacted_urls<S: serde::Serializer>(urls: &[String], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(urls.iter().map(|u| redact_url(u)))
}

impl fmt::Debug for RedisConfig {
    // Not derived: a URL may carry a password (`rediss://user:pw@host`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("mode", &self.mode)
            .field(
                "urls",
                &self.urls.iter().map(|u| redact_url(u)).collect::<Vec<_>>(),
            )
            .field("username", &self.username)
            .field("password", &self.password)
            .field("password_file", &self.password_file)
            .field("tls", &self.tls)
            .field("sentinel", &self.sentinel)
            .field("key_prefix", &self.key_prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .finish()
    }
}

fn default_key_prefix() -> String {
    "mqc".to_owned()
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_response_timeout() -> Duration {
    Duration::from_secs(1)
}

/// Standalone server, Redis Cluster, or a primary found through Redis Sentinel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisMode {
    /// One server (or a proxy in front of several).
    #[default]
    Standalone,
    /// Redis Cluster; `urls` are seed nodes.
    Cluster,
    /// A primary and its replicas watched by Redis Sentinel; `urls` are the sentinels, and the
    /// daemon follows a failover to the promoted replica by itself.
    Sentinel,
}

/// `[redis.sentinel]`: which primary to ask the sentinels for, and how to log in to them.
#[derive(Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SentinelConfig {
    /// The name the sentinels monitor the primary under (`sentinel monitor <name> …`).
    #[serde(default)]
    pub master_name: String,
    /// ACL user on the sentinels, when they require one (`redis.username` is the data nodes').
    #[serde(default)]
    pub username: Option<String>,
    /// The sentinels' password (`requirepass` in sentinel.conf); never logged.
    #[serde(default)]
    pub password: Option<Secret>,
    /// A file holding the sentinels' password, instead of `password`.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

impl fmt::Debug for SentinelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SentinelConfig")
            .field("master_name", &self.master_name)
            .field("username", &self.username)
            .field("password", &self.password)
            .field("password_file", &self.password_file)
            .finish()
    }
}

/// Deserializes a unit enum from its snake_case name, listing the choices when the name is
/// unknown (the config crate's own message does not).
macro_rules! named_choices {
    ($ty:ident { $($variant:ident = $name:literal),+ $(,)? }) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                match s.as_str() {
                    $($name => Ok($ty::$variant),)+
                    other => Err(serde::de::Error::custom(format!(
                        "`{other}` is not one of: {}",
                        [$($name),+].join(", ")
                    ))),
                }
            }
        }
    };
}

named_choices!(RedisMode {
    Standalone = "standalone",
    Cluster = "cluster",
    Sentinel = "sentinel",
});
named_choices!(AmbiguousPolicy { AtLeastOnce = "at_least_once", AtMostOnce = "at_most_once" });
named_choices!(RecordLayout { Packed = "packed", Hash = "hash" });
named_choices!(SideKind { Kafka = "kafka", Rocketmq = "rocketmq" });
named_choices!(LogFormat { Text = "text", Json = "json" });

/// `[arbiter]`: the claim protocol's knobs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ArbiterConfig {
    /// How long a claim holds an id without renewal; a crashed worker's id is free after this.
    #[serde(default = "default_lease", with = "humantime_serde")]
    pub lease: Duration,
    /// How long an id's state is kept after its last claim (keep it ≥ the brokers' retention).
    #[serde(default = "default_retention", with = "humantime_serde")]
    pub retention: Duration,
    /// What to do when a call's outcome is unknown (timeout after sending, expired lease).
    #[serde(default)]
    pub ambiguous: AmbiguousPolicy,
    /// Calls the owner may make for one id before it is parked as dead.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: NonZeroU32,
    /// How a new id's record is stored; existing records keep theirs (docs/arbiter.md).
    #[serde(default)]
    pub record_layout: RecordLayout,
    /// How long, from an id's first sighting, its owner has to observe it before a side that did
    /// observe it adopts it (the owner's copy may never come: dual writes are not atomic). Longer
    /// than the usual lag between the two sides' consumers.
    #[serde(default = "default_adopt_after", with = "humantime_serde")]
    pub adopt_after: Duration,
    /// Replicas that must have each claim, adoption and completion (Redis `WAIT`) before a call
    /// starts on it or its copy is acknowledged; 0: none asked (the default). Standalone and
    /// sentinel only.
    #[serde(default)]
    pub replicas: u32,
    /// How long `WAIT` waits for those replicas; a write they have not confirmed by then counts
    /// as Redis unavailable (pause, try again). Shorter than `redis.response_timeout`.
    #[serde(default = "default_replica_timeout", with = "humantime_serde")]
    pub replica_timeout: Duration,
}

fn default_replica_timeout() -> Duration {
    Duration::from_millis(500)
}

fn default_adopt_after() -> Duration {
    Duration::from_secs(300)
}
fn default_lease() -> Duration {
    Duration::from_secs(30)
}
fn default_retention() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_max_attempts() -> NonZeroU32 {
    NonZeroU32::new(8).expect("8 is not zero")
}

impl Default for ArbiterConfig {
    fn default() -> Self {
        Self {
            lease: default_lease(),
            retention: default_retention(),
            ambiguous: AmbiguousPolicy::default(),
            max_attempts: default_max_attempts(),
            record_layout: RecordLayout::default(),
            adopt_after: default_adopt_after(),
            replicas: 0,
            replica_timeout: default_replica_timeout(),
        }
    }
}

/// How a new id's record is stored in Redis. Every version that knows this setting reads both.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordLayout {
    /// One string per id: the cheaper layout for Redis.
    #[default]
    Packed,
    /// One hash per id, the only layout versions before the packed one read: keep it while
    /// such instances still run beside this one (a rolling upgrade), then switch to packed.
    Hash,
}

/// The policy for a call whose outcome nobody can know (DESIGN.md, "ambiguous").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AmbiguousPolicy {
    /// The owner calls again: the reward may be granted twice, and each such id is counted.
    #[default]
    AtLeastOnce,
    /// The id is parked as dead, "in doubt", for a person to decide.
    AtMostOnce,
}

/// `[switches]`: propagation and the starting values.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchesConfig {
    /// How often each instance re-reads the switches, as a safety net under pub/sub.
    #[serde(default = "default_refresh_interval", with = "humantime_serde")]
    pub refresh_interval: Duration,
    /// Values written to Redis by `run` only when no switches exist there yet.
    #[serde(default)]
    pub initial: InitialSwitches,
}

fn default_refresh_interval() -> Duration {
    Duration::from_secs(1)
}

impl Default for SwitchesConfig {
    fn default() -> Self {
        Self {
            refresh_interval: default_refresh_interval(),
            initial: InitialSwitches::default(),
        }
    }
}

/// `[switches.initial]`: the switches a brand-new deployment starts from.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InitialSwitches {
    /// Consume switch: off sends everything to the old side.
    #[serde(default)]
    pub consume: bool,
    /// Share of business-id buckets routed to the new side.
    #[serde(default)]
    pub percent: Percent,
    /// Business ids always routed to the new side while the consume switch is on.
    #[serde(default)]
    pub whitelist: Vec<String>,
}

/// A percentage, 0 to 100 inclusive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Percent(u8);

impl Percent {
    /// 100 %.
    pub const ALL: Percent = Percent(100);

    /// The value, 0..=100.
    pub fn get(self) -> u8 {
        self.0
    }
}

impl TryFrom<i64> for Percent {
    type Error = String;
    fn try_from(v: i64) -> Result<Self, String> {
        if (0..=100).contains(&v) {
            Ok(Percent(v as u8))
        } else {
            Err(format!("percent must be between 0 and 100, got {v}"))
        }
    }
}

impl std::str::FromStr for Percent {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let v: i64 =
            s.trim().trim_end_matches('%').parse().map_err(|_| {
                format!("percent must be a whole number 0-100, e.g. `10`, got `{s}`")
            })?;
        Percent::try_from(v)
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Environment overrides arrive as strings, the file gives integers: accept both.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(v) => Percent::try_from(v),
            Raw::Str(s) => s.parse(),
        }
        .map_err(serde::de::Error::custom)
    }
}

/// `[cutover]`: the direction of the migration, by side name.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CutoverConfig {
    /// The old side: it gets everything while the consume switch is off.
    pub from: String,
    /// The new side: it gets the whitelist and the percentage.
    pub to: String,
}

/// One `[[side]]`: a broker consumer and how to read message identity from its messages.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SideConfig {
    /// The side's name, used in `cutover`, in Redis state and in metrics (`[a-z0-9_-]`, ≤ 32).
    pub name: String,
    /// Which broker this side consumes.
    pub kind: SideKind,
    /// Where the cross-broker message id is read from.
    pub message_id: IdSource,
    /// Where the business id (hashed for the percentage, matched by the whitelist) is read from.
    pub business_id: IdSource,
    /// Kafka consumer settings; required when `kind = "kafka"`.
    #[serde(default)]
    pub kafka: Option<KafkaSideConfig>,
    /// RocketMQ consumer settings; required when `kind = "rocketmq"`.
    #[serde(default)]
    pub rocketmq: Option<RocketMqSideConfig>,
}

/// The broker behind a side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SideKind {
    /// Apache Kafka.
    Kafka,
    /// Apache RocketMQ.
    Rocketmq,
}

impl SideKind {
    fn section(self) -> &'static str {
        match self {
            SideKind::Kafka => "kafka",
            SideKind::Rocketmq => "rocketmq",
        }
    }
}

/// Where an id is found in a message: `{ header = "msg-id" }` (a Kafka header or a RocketMQ user
/// property) or `{ json_pointer = "/order/id" }` (RFC 6901, into a JSON body).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum IdSource {
    /// A Kafka header or RocketMQ user property of this name.
    #[serde(alias = "property")]
    Header(String),
    /// A JSON pointer into the message body.
    JsonPointer(String),
}

/// `[side.kafka]`: a Kafka consumer group.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSideConfig {
    /// `host:port[,host:port…]`.
    pub bootstrap_servers: String,
    /// Topics to consume.
    pub topics: Vec<String>,
    /// Consumer group id.
    pub group_id: String,
    /// Any further librdkafka property, passed through as is (`security.protocol`,
    /// `sasl.mechanism`, `ssl.ca.location`, …), except those the source sets itself and relies
    /// on ([`refused_kafka_property`]). Secret ones show as `***`.
    #[serde(default)]
    pub properties: KafkaProperties,
    /// `[side.kafka.secret_files]`: librdkafka properties whose values are read from files at
    /// load time (`"sasl.password" = "/etc/mq-cutover/secrets/kafka-password"`); a property is
    /// given here or in `properties`, not both.
    #[serde(default)]
    pub secret_files: BTreeMap<String, PathBuf>,
}

/// librdkafka properties whose values are secrets: the ones librdkafka itself marks sensitive
/// (and redacts in its own logs).
pub const KAFKA_SECRET_PROPERTIES: &[&str] = &[
    "sasl.username",
    "sasl.password",
    "sasl.oauthbearer.config",
    "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.assertion.private.key.passphrase",
    "sasl.oauthbearer.assertion.private.key.pem",
    "ssl.key.password",
    "ssl.key.pem",
    "ssl_key",
    "ssl.keystore.password",
];

/// `[side.kafka.properties]`: librdkafka properties by name. Values of secret properties (those
/// in [`KAFKA_SECRET_PROPERTIES`], and every one read from a file) show as `***` in `Debug` and
/// serialized output. Reads like the map it wraps.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(from = "BTreeMap<String, String>")]
pub struct KafkaProperties {
    values: BTreeMap<String, String>,
    from_files: BTreeSet<String>,
}

impl KafkaProperties {
    /// Whether the value of `key` is a secret.
    pub fn is_secret(&self, key: &str) -> bool {
        KAFKA_SECRET_PROPERTIES.contains(&key) || self.from_files.contains(key)
    }

    /// Sets a property; returns the value it had.
    pub fn insert(&mut self, key: String, value: String) -> Option<String> {
        self.values.insert(key, value)
    }

    /// Sets a property whose value is a secret, whatever its name.
    pub fn insert_secret(&mut self, key: impl Into<String>, value: &Secret) {
        let key = key.into();
        self.from_files.insert(key.clone());
        self.values.insert(key, value.expose().to_owned());
    }

    fn redacted(&self) -> BTreeMap<&str, &str> {
        self.values
            .iter()
            .map(|(k, v)| {
                let v = if self.is_secret(k) { REDACTED } else { v };
                (k.as_str(), v)
            })
            .collect()
    }
}

impl From<BTreeMap<String, String>> for KafkaProperties {
    fn from(values: BTreeMap<String, String>) -> Self {
        KafkaProperties {
            values,
            from_files: BTreeSet::new(),
        }
    }
}

impl FromIterator<(String, String)> for KafkaProperties {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        BTreeMap::from_iter(iter).into()
    }
}

impl Deref for KafkaProperties {
    type Target = BTreeMap<String, String>;
    fn deref(&self) -> &Self::Target {
        &self.values
    }
}

impl<'a> IntoIterator for &'a KafkaProperties {
    type Item = (&'a String, &'a String);
    type IntoIter = std::collections::btree_map::Iter<'a, String, String>;
    fn into_iter(self) -> Self::IntoIter {
        self.values.iter()
    }
}

impl fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.redacted()).finish()
    }
}

impl Serialize for KafkaProperties {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.redacted())
    }
}

/// librdkafka consumer properties the Kafka side sets itself and depends on, each with why a
/// `[side.kafka.properties]` entry may not change it.
const MANAGED_KAFKA_PROPERTIES: &[(&str, &str)] = &[
    ("bootstrap.servers", "set it with `bootstrap_servers`"),
    (
        "metadata.broker.list",
        "an alias of bootstrap.servers: set `bootstrap_servers`",
    ),
    ("group.id", "set it with `group_id`"),
    (
        "enable.auto.commit",
        "the source stores each offset once its copy's fate is recorded, and librdkafka's \
         auto-commit sends what is stored (docs/kafka.md)",
    ),
    (
        "auto.commit.enable",
        "a legacy alias of enable.auto.commit, which the source manages",
    ),
    (
        "enable.auto.offset.store",
        "only the source may store offsets: librdkafka would store the offset of every record \
         as soon as it is read, before its fate is recorded, and a crash would skip it",
    ),
    (
        "auto.commit.interval.ms",
        "the source's commit cadence bounds redelivery after a crash; 0 would turn commits off",
    ),
    (
        "enable.partition.eof",
        "the consume loop takes every event from the consumer as a record or an error",
    ),
    (
        "offset.store.method",
        "offsets are committed to the group, never to a file or nowhere",
    ),
    (
        "offset.store.path",
        "offsets are committed to the group, never to a file",
    ),
    (
        "offset.store.sync.interval.ms",
        "offsets are committed to the group, never to a file",
    ),
    (
        "plugin.library.paths",
        "it loads native code into the daemon; the source uses no plugin",
    ),
];

/// Why the Kafka source refuses `[side.kafka.properties]` key `key`, if it does: a property it
/// sets itself and relies on. Others (security, timeouts, `auto.offset.reset`, `client.id`, the
/// assignment strategy) pass through to librdkafka, which checks them.
pub fn refused_kafka_property(key: &str) -> Option<&'static str> {
    let key = key.trim();
    MANAGED_KAFKA_PROPERTIES
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, why)| *why)
}

/// `[side.rocketmq]`: a RocketMQ consumer group in cluster mode.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RocketMqSideConfig {
    /// Name server address(es), `host:port[;host:port…]`.
    pub name_server: String,
    /// Topic to consume.
    pub topic: String,
    /// Tag expression, `*` or `tagA || tagB`.
    #[serde(default = "default_tag_expression")]
    pub tag_expression: String,
    /// Consumer group.
    pub group: String,
    /// ACL access key (RocketMQ 5 ACL 2.0: the user name); set together with `secret_key`.
    #[serde(default)]
    pub access_key: Option<String>,
    /// ACL secret key (ACL 2.0: the user's password). Prefer
    /// `MQ_CUTOVER__SIDE__<i>__ROCKETMQ__SECRET_KEY` over the file. Never logged.
    #[serde(default)]
    pub secret_key: Option<Secret>,
    /// Namespace the topic and group live in (cloud instances, shared clusters); the broker
    /// sees `namespace%topic`. Absent: none.
    #[serde(default)]
    pub namespace: Option<String>,
    /// TLS to the name servers and brokers (the broker's `tls.server.mode` is `enforcing` or
    /// `permissive`).
    #[serde(default)]
    pub tls: bool,
    /// PEM file of the CA(s) that signed the brokers' certificates; absent: the system's roots.
    #[serde(default)]
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate, for brokers that ask for one (`tls.server.need.client.auth`);
    /// set together with `tls_key_file`.
    #[serde(default)]
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// PEM private key of `tls_cert_file` (PKCS#8, PKCS#1 or SEC1, unencrypted).
    #[serde(default)]
    pub tls_key_file: Option<std::path::PathBuf>,
}

impl RocketMqSideConfig {
    /// A plain (no ACL, no TLS, no namespace) consumer of `topic` in `group`, every tag.
    pub fn plain(name_server: &str, topic: &str, group: &str) -> RocketMqSideConfig {
        RocketMqSideConfig {
            name_server: name_server.to_owned(),
            topic: topic.to_owned(),
            tag_expression: default_tag_expression(),
            group: group.to_owned(),
            access_key: None,
            secret_key: None,
            namespace: None,
            tls: false,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

fn default_tag_expression() -> String {
    "*".to_owned()
}

/// `[pipeline]`: how copies move from the sources through the arbiter to the sink.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Most copies claimed in one Redis round trip.
    #[serde(default = "default_claim_batch")]
    pub claim_batch: usize,
    /// Claim batches a side may have in Redis at once: with 2, the next batch goes out while
    /// one round trip is still out, so a copy arriving meanwhile does not wait for it.
    #[serde(default = "default_claims_in_flight")]
    pub claims_in_flight: usize,
    /// Most sink calls in flight per side; when reached, the side stops fetching.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Copies buffered between a source and its pipeline.
    #[serde(default = "default_channel")]
    pub channel: usize,
    /// Shortest wait before a copy answered BUSY is claimed again.
    #[serde(default = "default_busy_retry", with = "humantime_serde")]
    pub busy_retry: Duration,
    /// On SIGTERM: how long in-flight calls may take to finish before the daemon exits anyway.
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// How long a side may hand nothing to the pipeline from a partition (queue) that has
    /// messages waiting, while not paused on purpose, before it counts as stalled: `/readyz`
    /// answers 503 naming it (docs/operations.md, `MqCutoverSourceStalled`).
    #[serde(default = "default_stall_after", with = "humantime_serde")]
    pub stall_after: Duration,
    /// The largest message body a source hands on, in bytes, checked as stored and again once
    /// uncompressed; a larger one is dead-lettered with the reason and never forwarded.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Bytes of message bodies one side may hold between its source and the fate of each copy
    /// (the channel, claim batches, calls in flight, retries), and the size of the RocketMQ
    /// client's pull buffer; when reached, the side stops fetching. At least
    /// `max_message_bytes`, so that any copy fits.
    #[serde(default = "default_max_buffered_bytes")]
    pub max_buffered_bytes: usize,
    /// For measurement only: one side forwards every copy with no claim, the other acks every
    /// copy unread. No arbitration, no deduplication. Absent: normal operation.
    #[serde(default)]
    pub pass_through: Option<PassThroughConfig>,
}

/// `[pipeline.pass_through]`: the baseline the benchmark compares arbitration against. Every copy
/// of `side` goes to the sink without a Redis claim (duplicates included); the other sides
/// acknowledge theirs without calling. Never for production traffic.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PassThroughConfig {
    /// The side whose copies are all forwarded.
    pub side: String,
    /// Must be `true`: the explicit request for a mode that delivers without arbitration.
    #[serde(default)]
    pub measurement_only: bool,
}

fn default_claim_batch() -> usize {
    256
}
fn default_claims_in_flight() -> usize {
    2
}
fn default_max_in_flight() -> usize {
    256
}
fn default_channel() -> usize {
    // Deep enough to outlast a Kafka resume after backpressure paused the fetch (measured at about
    // half a second): 1024 capped the Kafka side near 2,000 copies/s (docs/benchmarks.md).
    16_384
}
fn default_busy_retry() -> Duration {
    Duration::from_millis(100)
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_stall_after() -> Duration {
    Duration::from_secs(60)
}
fn default_max_message_bytes() -> usize {
    // RocketMQ's own default maxMessageSize.
    4 * 1024 * 1024
}
fn default_max_buffered_bytes() -> usize {
    // Two sides at this, plus the brokers' clients' buffers, stay well inside a 512 Mi container
    // (docs/pipeline.md, "Memory").
    64 * 1024 * 1024
}
/// The largest `pipeline.max_buffered_bytes` accepted.
pub const MAX_BUFFERED_BYTES_LIMIT: usize = 64 * 1024 * 1024 * 1024;
/// The largest `pipeline.max_message_bytes` accepted. Below 0x184D2204 bytes, the size an LZ4
/// block body would declare if its first four bytes were the LZ4 frame magic, so the RocketMQ
/// side tells the two LZ4 formats apart without guessing.
pub const MAX_MESSAGE_BYTES_LIMIT: usize = 256 * 1024 * 1024;

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            claim_batch: default_claim_batch(),
            claims_in_flight: default_claims_in_flight(),
            max_in_flight: default_max_in_flight(),
            channel: default_channel(),
            busy_retry: default_busy_retry(),
            drain_timeout: default_drain_timeout(),
            stall_after: default_stall_after(),
            max_message_bytes: default_max_message_bytes(),
            max_buffered_bytes: default_max_buffered_bytes(),
            pass_through: None,
        }
    }
}

/// `[dead_letters]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLettersConfig {
    /// About how many parked messages the stream keeps (the oldest go first).
    #[serde(default = "default_dead_max_len")]
    pub max_len: u64,
}

fn default_dead_max_len() -> u64 {
    100_000
}

impl Default for DeadLettersConfig {
    fn default() -> Self {
        Self {
            max_len: default_dead_max_len(),
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` for people, `json` for log pipelines.
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `mq_cutover=debug,info`; `RUST_LOG` wins when set.
    #[serde(default = "default_log_level")]
    pub level: String,
}

fn default_log_level() -> String {
    "info".to_owned()
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::default(),
            level: default_log_level(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// A configuration that passed [`Config::validate`].
#[derive(Debug, Clone)]
pub struct Validated(Config);

impl Deref for Validated {
    type Target = Config;
    fn deref(&self) -> &Config {
        &self.0
    }
}

/// Environment variables starting with this (then `SECTION__KEY`) override the file.
pub const ENV_PREFIX: &str = "MQ_CUTOVER";

/// Keys whose environment overrides are comma-separated lists.
const ENV_LIST_KEYS: &[&str] = &[
    "redis.urls",
    "admin.allowed_hosts",
    "switches.initial.whitelist",
    "sink.classify.retryable_statuses",
    "sink.classify.fatal_statuses",
];

/// Whether the environment override of `key` (`redis.password`) is taken as the text it is:
/// secrets, user names and file paths are never parsed as numbers or booleans (`007` stays
/// `007`, `TRUE` stays `TRUE`).
fn env_verbatim(key: &str) -> bool {
    let last = key.rsplit('.').next().unwrap_or(key);
    matches!(
        last,
        "password" | "token" | "username" | "access_key" | "secret_key" | "master_name"
    ) || last.ends_with("_file")
}

impl Config {
    /// Reads `path`, applies environment overrides, parses (does not validate), and reads the
    /// secrets named by `*_file` keys.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let env: BTreeMap<String, String> = std::env::vars()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        Self::load_with_env(path, env)
    }

    /// [`Config::load`] with the environment given explicitly (for tests).
    pub fn load_with_env(
        path: &Path,
        env: BTreeMap<String, String>,
    ) -> Result<Config, ConfigError> {
        if !path.is_file() {
            return Err(ConfigError::new(
                "--config",
                format!(
                    "no config file at `{}` (start from config/mq-cutover.toml)",
                    path.display()
                ),
            ));
        }
        // `MQ_CUTOVER__` alone, or with an empty segment (`MQ_CUTOVER__REDIS____X`), names no
        // key; the config crate would report an unknown field without a name.
        if let Some(var) = env.keys().find(|k| {
            k.strip_prefix(ENV_PREFIX)
                .and_then(|rest| rest.strip_prefix("__"))
                .is_some_and(|path| path.split("__").any(str::is_empty))
        }) {
            return Err(ConfigError::new(
                var.as_str(),
                "names no config key; use MQ_CUTOVER__<SECTION>__<KEY>, e.g. \
                 MQ_CUTOVER__REDIS__PASSWORD",
            ));
        }
        // The config crate parses every variable that looks like a number or a boolean; the
        // verbatim ones go in as overrides instead, which keep their text.
        let env_prefix = format!("{}__", ENV_PREFIX.to_lowercase());
        let (verbatim, parsed): (Vec<_>, Vec<_>) = env.into_iter().partition(|(k, _)| {
            k.to_lowercase()
                .strip_prefix(&env_prefix)
                .is_some_and(|rest| env_verbatim(&rest.replace("__", ".")))
        });
        let mut envsrc = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .list_separator(",")
            .try_parsing(true)
            .source(Some(parsed.into_iter().collect()));
        for key in ENV_LIST_KEYS {
            envsrc = envsrc.with_list_parse_key(key);
        }
        let mut builder = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(envsrc);
        for (name, value) in verbatim {
            let key = name.to_lowercase()[env_prefix.len()..].replace("__", ".");
            builder = builder
                .set_override(key.as_str(), value)
                .map_err(|e| ConfigError::new(key, e.to_string()))?;
        }
        let merged = builder
            .build()
            .map_err(|e| ConfigError::new("(file)", e.to_string()))?;
        Self::from_merged(merged)
    }

    /// Parses a TOML document (no environment overrides).
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let merged = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .map_err(|e| ConfigError::new("(file)", e.to_string()))?;
        Self::from_merged(merged)
    }

    fn from_merged(merged: config::Config) -> Result<Config, ConfigError> {
        // serde_path_to_error tracks where in the tree a type error happened, so the message can
        // name the key; the config crate's own messages only sometimes do.
        let mut cfg: Config = serde_path_to_error::deserialize(merged).map_err(|e| {
            let path = e.path().to_string();
            let key = if path == "." || path.is_empty() {
                "(top level)".to_owned()
            } else {
                path
            };
            let problem = e.into_inner().to_string();
            // The config crate appends its own " for key `…`" suffix; the key is named already.
            let problem = match problem.find(" for key `") {
                Some(i) => problem[..i].to_owned(),
                None => problem,
            };
            ConfigError::new(key, problem)
        })?;
        cfg.read_secret_files()?;
        Ok(cfg)
    }

    /// Reads every secret named by a `*_file` key into its place (the value form stays empty
    /// in the file: giving both is refused). Errors name the key and the path.
    fn read_secret_files(&mut self) -> Result<(), ConfigError> {
        let r = &mut self.redis;
        fill_from_file(
            "redis.password",
            &mut r.password,
            "redis.password_file",
            r.password_file.as_deref(),
        )?;
        fill_from_file(
            "redis.sentinel.password",
            &mut r.sentinel.password,
            "redis.sentinel.password_file",
            r.sentinel.password_file.as_deref(),
        )?;
        let a = &mut self.admin;
        fill_from_file(
            "admin.token",
            &mut a.token,
            "admin.token_file",
            a.token_file.as_deref(),
        )?;
        fill_from_file(
            "admin.viewer_token",
            &mut a.viewer_token,
            "admin.viewer_token_file",
            a.viewer_token_file.as_deref(),
        )?;
        for (i, side) in self.sides.iter_mut().enumerate() {
            let Some(k) = side.kafka.as_mut() else {
                continue;
            };
            for (property, path) in &k.secret_files {
                let key = format!("side[{i}].kafka.secret_files.\"{property}\"");
                if k.properties.contains_key(property) {
                    return Err(crate::secrets::both(
                        &format!("side[{i}].kafka.properties.\"{property}\""),
                        &key,
                    ));
                }
                let value = read_secret_file(&key, path)?;
                k.properties.insert_secret(property.as_str(), &value);
            }
        }
        self.sink.read_header_files()
    }

    /// Checks every rule that needs no I/O. The first problem found is returned.
    pub fn validate(self) -> Result<Validated, ConfigError> {
        self.validate_redis()?;
        self.validate_arbiter()?;
        self.validate_sides()?;
        self.validate_pipeline()?;
        self.validate_admin()?;
        self.sink.validate()?;
        self.parity.validate()?;
        if self.log.level.trim().is_empty()
            || tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err()
        {
            return Err(ConfigError::new(
                "log.level",
                format!(
                    "`{}` is not a log filter, e.g. `info` or `mq_cutover=debug,info`",
                    self.log.level
                ),
            ));
        }
        Ok(Validated(self))
    }

    fn validate_redis(&self) -> Result<(), ConfigError> {
        let r = &self.redis;
        if r.urls.is_empty() {
            return Err(ConfigError::new(
                "redis.urls",
                "needs at least one URL, e.g. `[\"redis://127.0.0.1:6379\"]`",
            ));
        }
        if r.mode == RedisMode::Standalone && r.urls.len() > 1 {
            return Err(ConfigError::new(
                "redis.urls",
                "standalone mode takes exactly one URL; set `redis.mode = \"cluster\"` for seed nodes",
            ));
        }
        self.validate_sentinel()?;
        for (i, u) in r.urls.iter().enumerate() {
            if !(u.starts_with("redis://") || u.starts_with("rediss://"))
                || u.len() <= "rediss://".len()
            {
                return Err(ConfigError::new(
                    format!("redis.urls[{i}]"),
                    "must be `redis://host:port` or `rediss://host:port` (TLS)",
                ));
            }
        }
        if r.key_prefix.is_empty()
            || !r
                .key_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b))
        {
            return Err(ConfigError::new(
                "redis.key_prefix",
                format!(
                    "`{}` must be non-empty letters, digits, `_-.:` (no braces: they pick the cluster slot), e.g. `mqc`",
                    r.key_prefix
                ),
            ));
        }
        if let Some(why) = r.password.as_ref().and_then(|p| placeholder(p.expose())) {
            return Err(ConfigError::new(
                "redis.password",
                format!("refused because {why}; set the password Redis requires"),
            ));
        }
        positive("redis.connect_timeout", r.connect_timeout)?;
        positive("redis.response_timeout", r.response_timeout)?;
        r.tls.check("redis.tls")?;
        if !r.tls.is_empty() && !r.urls.iter().any(|u| u.starts_with("rediss://")) {
            return Err(ConfigError::new(
                "redis.tls",
                "`[redis.tls]` is set but no URL is rediss://, so TLS would not be used: write \
                 `rediss://host:port`",
            ));
        }
        Ok(())
    }

    fn validate_sentinel(&self) -> Result<(), ConfigError> {
        let r = &self.redis;
        let s = &r.sentinel;
        if r.mode != RedisMode::Sentinel {
            let set = !s.master_name.is_empty()
                || s.username.is_some()
                || s.password.is_some()
                || s.password_file.is_some();
            if set {
                return Err(ConfigError::new(
                    "redis.sentinel",
                    "`[redis.sentinel]` is set but `redis.mode` is not \"sentinel\", so it would \
                     not be used: set `redis.mode = \"sentinel\"` or remove it",
                ));
            }
            return Ok(());
        }
        let name = s.master_name.trim();
        if name.is_empty()
            || name.len() != s.master_name.len()
            || name.contains(char::is_whitespace)
        {
            return Err(ConfigError::new(
                "redis.sentinel.master_name",
                "sentinel mode needs the primary's name as the sentinels monitor it, without \
                 spaces, e.g. `mymaster`",
            ));
        }
        let tls = r.urls.iter().filter(|u| u.starts_with("rediss://")).count();
        if tls != 0 && tls != r.urls.len() {
            return Err(ConfigError::new(
                "redis.urls",
                "sentinel mode takes the sentinels all redis:// or all rediss:// (one TLS \
                 setting for the sentinels and the primary)",
            ));
        }
        if let Some(why) = s.password.as_ref().and_then(|p| placeholder(p.expose())) {
            return Err(ConfigError::new(
                "redis.sentinel.password",
                format!("refused because {why}; set the password the sentinels require"),
            ));
        }
        Ok(())
    }

    fn validate_admin(&self) -> Result<(), ConfigError> {
        let a = &self.admin;
        if let Some(t) = &a.token {
            validate_token("admin.token", t)?;
        }
        if let Some(t) = &a.viewer_token {
            validate_token("admin.viewer_token", t)?;
            if a.token.as_ref() == Some(t) {
                return Err(ConfigError::new(
                    "admin.viewer_token",
                    "equals admin.token: a viewer would have the operator's rights; give each its own",
                ));
            }
        }
        for (i, h) in a.allowed_hosts.iter().enumerate() {
            let bad = h.is_empty()
                || (h.contains('*') && h != "*")
                || h.contains("://")
                || h.bytes()
                    .any(|b| !b.is_ascii_graphic() || b"/?#@,".contains(&b));
            if bad {
                return Err(ConfigError::new(
                    format!("admin.allowed_hosts[{i}]"),
                    format!(
                        "`{h}` is not a host name, e.g. `mq-cutover.example.com`, \
                         `10.0.0.5:9464`, or `*` for any"
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate_arbiter(&self) -> Result<(), ConfigError> {
        let a = &self.arbiter;
        if a.lease < Duration::from_millis(100) || a.lease > Duration::from_secs(3600) {
            return Err(ConfigError::new(
                "arbiter.lease",
                format!(
                    "{} is outside 100ms..1h; the lease must outlast one sink call, e.g. `30s`",
                    humantime::format_duration(a.lease)
                ),
            ));
        }
        if a.retention < Duration::from_secs(60) {
            return Err(ConfigError::new(
                "arbiter.retention",
                "must be at least 1m and should cover the brokers' retention, e.g. `7d`",
            ));
        }
        if a.retention <= a.lease {
            return Err(ConfigError::new(
                "arbiter.retention",
                "must be longer than arbiter.lease",
            ));
        }
        if a.adopt_after < Duration::from_secs(1) || a.adopt_after * 2 > a.retention {
            return Err(ConfigError::new(
                "arbiter.adopt_after",
                format!(
                    "{} is outside 1s..(arbiter.retention / 2); give the owner's copy time to \
                     come, e.g. `5m`",
                    humantime::format_duration(a.adopt_after)
                ),
            ));
        }
        if a.replicas > 0 && self.redis.mode == RedisMode::Cluster {
            return Err(ConfigError::new(
                "arbiter.replicas",
                "is for standalone and sentinel mode: on a Redis Cluster each id's node would \
                 need its own WAIT; set it to 0 or use `redis.mode = \"sentinel\"`",
            ));
        }
        if a.replicas > 16 {
            return Err(ConfigError::new(
                "arbiter.replicas",
                format!("{} replicas is more than 16; usually 1", a.replicas),
            ));
        }
        if a.replica_timeout.is_zero() || a.replica_timeout >= self.redis.response_timeout {
            return Err(ConfigError::new(
                "arbiter.replica_timeout",
                format!(
                    "{} must be above 0 and below redis.response_timeout ({}), or the reply \
                     times out before WAIT answers, e.g. `500ms`",
                    humantime::format_duration(a.replica_timeout),
                    humantime::format_duration(self.redis.response_timeout)
                ),
            ));
        }
        let s = &self.switches;
        if s.refresh_interval.is_zero() || s.refresh_interval > Duration::from_secs(60) {
            return Err(ConfigError::new(
                "switches.refresh_interval",
                "must be between 1ms and 60s, e.g. `1s`",
            ));
        }
        if let Some(i) = s.initial.whitelist.iter().position(|w| w.trim().is_empty()) {
            return Err(ConfigError::new(
                format!("switches.initial.whitelist[{i}]"),
                "business ids must not be empty",
            ));
        }
        Ok(())
    }

    fn validate_pipeline(&self) -> Result<(), ConfigError> {
        let p = &self.pipeline;
        for (key, v, max) in [
            ("pipeline.claim_batch", p.claim_batch, 10_000),
            ("pipeline.claims_in_flight", p.claims_in_flight, 16),
            ("pipeline.max_in_flight", p.max_in_flight, 100_000),
            ("pipeline.channel", p.channel, 1_000_000),
        ] {
            if v == 0 || v > max {
                return Err(ConfigError::new(key, format!("{v} is outside 1..={max}")));
            }
        }
        positive("pipeline.busy_retry", p.busy_retry)?;
        positive("pipeline.drain_timeout", p.drain_timeout)?;
        // Progress is seen once per lag measurement: anything shorter than two would flag a
        // side between two readings.
        let shortest = crate::source::LAG_INTERVAL * 2;
        if p.stall_after < shortest {
            return Err(ConfigError::new(
                "pipeline.stall_after",
                format!(
                    "must be at least {} (two lag measurements), e.g. `60s`",
                    humantime::format_duration(shortest)
                ),
            ));
        }
        if p.max_message_bytes < 1024 || p.max_message_bytes > MAX_MESSAGE_BYTES_LIMIT {
            return Err(ConfigError::new(
                "pipeline.max_message_bytes",
                format!(
                    "{} is outside 1024..={MAX_MESSAGE_BYTES_LIMIT} (1 KiB to 256 MiB), e.g. `4194304` (4 MiB)",
                    p.max_message_bytes
                ),
            ));
        }
        if p.max_buffered_bytes < p.max_message_bytes
            || p.max_buffered_bytes > MAX_BUFFERED_BYTES_LIMIT
        {
            return Err(ConfigError::new(
                "pipeline.max_buffered_bytes",
                format!(
                    "{} is outside {}..={MAX_BUFFERED_BYTES_LIMIT}: at least \
                     pipeline.max_message_bytes, so that any message fits, and at most 64 GiB, \
                     e.g. `67108864` (64 MiB)",
                    p.max_buffered_bytes, p.max_message_bytes
                ),
            ));
        }
        if let Some(pt) = &p.pass_through {
            if !self.sides.iter().any(|s| s.name == pt.side) {
                return Err(ConfigError::new(
                    "pipeline.pass_through.side",
                    format!("`{}` is not a configured side name, e.g. `kafka`", pt.side),
                ));
            }
            if !pt.measurement_only {
                return Err(ConfigError::new(
                    "pipeline.pass_through.measurement_only",
                    "pass-through forwards every copy without arbitration (duplicates included): \
                     it is for benchmarks only; set `measurement_only = true` to ask for it",
                ));
            }
        }
        if self.dead_letters.max_len < 100 {
            return Err(ConfigError::new(
                "dead_letters.max_len",
                "must be at least 100, e.g. `100000`",
            ));
        }
        Ok(())
    }

    fn validate_sides(&self) -> Result<(), ConfigError> {
        if self.sides.is_empty() {
            return Err(ConfigError::new(
                "side",
                "no sides configured: add `[[side]]` tables for the old and the new broker",
            ));
        }
        let mut names = HashSet::new();
        for (i, side) in self.sides.iter().enumerate() {
            let at = |k: &str| format!("side[{i}].{k}");
            if side.name.is_empty()
                || side.name.len() > 32
                || !side
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
            {
                return Err(ConfigError::new(
                    at("name"),
                    format!(
                        "`{}` must be 1-32 of `a-z 0-9 _ -`, e.g. `kafka`",
                        side.name
                    ),
                ));
            }
            if !names.insert(side.name.as_str()) {
                return Err(ConfigError::new(
                    at("name"),
                    format!("`{}` names two sides; side names must be unique", side.name),
                ));
            }
            validate_id_source(&at("message_id"), &side.message_id)?;
            validate_id_source(&at("business_id"), &side.business_id)?;
            let (present, absent) = match side.kind {
                SideKind::Kafka => (side.kafka.is_some(), side.rocketmq.is_none()),
                SideKind::Rocketmq => (side.rocketmq.is_some(), side.kafka.is_none()),
            };
            if !present {
                return Err(ConfigError::new(
                    at(side.kind.section()),
                    format!(
                        "kind = \"{0}\" needs a `[side.{0}]` table",
                        side.kind.section()
                    ),
                ));
            }
            if !absent {
                return Err(ConfigError::new(
                    at("kind"),
                    format!(
                        "kind = \"{}\" but the side has a table for the other broker",
                        side.kind.section()
                    ),
                ));
            }
            if let Some(k) = &side.kafka {
                nonempty(
                    &at("kafka.bootstrap_servers"),
                    &k.bootstrap_servers,
                    "127.0.0.1:9092",
                )?;
                nonempty(&at("kafka.group_id"), &k.group_id, "reward-consumer")?;
                if k.topics.is_empty() || k.topics.iter().any(|t| t.trim().is_empty()) {
                    return Err(ConfigError::new(
                        at("kafka.topics"),
                        "needs one or more non-empty topic names, e.g. `[\"reward\"]`",
                    ));
                }
                for key in k.properties.keys() {
                    if let Some(why) = refused_kafka_property(key) {
                        return Err(ConfigError::new(
                            at(&format!("kafka.properties.{key}")),
                            format!("`{key}` is managed by mq-cutover and may not be set: {why}"),
                        ));
                    }
                }
                crate::source::kafka_security::check(i, &k.properties)?;
            }
            if let Some(r) = &side.rocketmq {
                nonempty(
                    &at("rocketmq.name_server"),
                    &r.name_server,
                    "127.0.0.1:9876",
                )?;
                nonempty(&at("rocketmq.topic"), &r.topic, "reward")?;
                nonempty(&at("rocketmq.group"), &r.group, "reward-consumer")?;
                nonempty(&at("rocketmq.tag_expression"), &r.tag_expression, "*")?;
                validate_rocketmq_security(&at, r)?;
            }
        }
        let c = &self.cutover;
        for (key, name) in [("cutover.from", &c.from), ("cutover.to", &c.to)] {
            if !names.contains(name.as_str()) {
                return Err(ConfigError::new(
                    key,
                    format!(
                        "`{name}` is not a configured side (sides: {})",
                        self.side_names().join(", ")
                    ),
                ));
            }
        }
        if c.from == c.to {
            return Err(ConfigError::new(
                "cutover.to",
                format!(
                    "`{}` is also cutover.from; the new side must differ from the old",
                    c.to
                ),
            ));
        }
        if let Some(i) = self
            .sides
            .iter()
            .position(|s| s.name != c.from && s.name != c.to)
        {
            return Err(ConfigError::new(
                format!("side[{i}].name"),
                format!(
                    "`{}` is neither cutover.from nor cutover.to; every side must take part",
                    self.sides[i].name
                ),
            ));
        }
        Ok(())
    }

    /// The secrets this config sets, by key, each with where it was read from when that was a
    /// file (`redis.password (file /run/secrets/redis)`): what `check-config` lists, never
    /// the values.
    pub fn secret_keys(&self) -> Vec<String> {
        let from = |file: Option<&Path>| match file {
            Some(p) => format!(" (file {})", p.display()),
            None => String::new(),
        };
        let mut out = Vec::new();
        if self.redis.password.is_some() {
            out.push(format!(
                "redis.password{}",
                from(self.redis.password_file.as_deref())
            ));
        }
        if self.redis.sentinel.password.is_some() {
            out.push(format!(
                "redis.sentinel.password{}",
                from(self.redis.sentinel.password_file.as_deref())
            ));
        }
        if self.redis.urls.iter().any(|u| redact_url(u) != *u) {
            out.push("redis.urls (a password in a URL)".to_owned());
        }
        if self.admin.token.is_some() {
            out.push(format!(
                "admin.token{}",
                from(self.admin.token_file.as_deref())
            ));
        }
        for (i, side) in self.sides.iter().enumerate() {
            let Some(k) = &side.kafka else { continue };
            for name in k.properties.keys().filter(|n| k.properties.is_secret(n)) {
                out.push(format!(
                    "side[{i}].kafka.properties.\"{name}\"{}",
                    from(k.secret_files.get(name).map(PathBuf::as_path))
                ));
            }
        }
        for name in self.sink.headers.keys() {
            out.push(format!(
                "sink.headers.{name}{}",
                from(self.sink.header_files.get(name).map(PathBuf::as_path))
            ));
        }
        out
    }

    fn side_names(&self) -> Vec<&str> {
        self.sides.iter().map(|s| s.name.as_str()).collect()
    }
}

fn positive(key: &str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        return Err(ConfigError::new(key, "must be more than zero, e.g. `1s`"));
    }
    Ok(())
}

fn nonempty(key: &str, v: &str, example: &str) -> Result<(), ConfigError> {
    if v.trim().is_empty() {
        return Err(ConfigError::new(
            key,
            format!("must not be empty, e.g. `{example}`"),
        ));
    }
    Ok(())
}

/// ACL keys in pairs, a namespace RocketMQ accepts, TLS files only with `tls = true` (no I/O:
/// the files are read when the side starts).
fn validate_rocketmq_security(
    at: &dyn Fn(&str) -> String,
    r: &RocketMqSideConfig,
) -> Result<(), ConfigError> {
    match (&r.access_key, &r.secret_key) {
        (Some(_), None) => {
            return Err(ConfigError::new(
                at("rocketmq.secret_key"),
                "access_key is set but secret_key is not: ACL needs both (ACL 2.0: user name and password)",
            ))
        }
        (None, Some(_)) => {
            return Err(ConfigError::new(
                at("rocketmq.access_key"),
                "secret_key is set but access_key is not: ACL needs both, e.g. `access_key = \"mqc\"`",
            ))
        }
        (Some(ak), Some(sk)) => {
            nonempty(&at("rocketmq.access_key"), ak, "mqc")?;
            if sk.expose().is_empty() {
                return Err(ConfigError::new(
                    at("rocketmq.secret_key"),
                    "must not be empty",
                ));
            }
        }
        (None, None) => {}
    }
    if let Some(ns) = &r.namespace {
        if ns.is_empty()
            || ns.len() > 64
            || !ns
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(ConfigError::new(
                at("rocketmq.namespace"),
                format!("`{ns}` must be 1-64 of `A-Z a-z 0-9 _ -`, e.g. `MQ_INST_1234_abcd`"),
            ));
        }
    }
    for (key, file) in [
        ("rocketmq.tls_ca_file", &r.tls_ca_file),
        ("rocketmq.tls_cert_file", &r.tls_cert_file),
        ("rocketmq.tls_key_file", &r.tls_key_file),
    ] {
        match file {
            Some(path) if !r.tls => {
                return Err(ConfigError::new(
                    at(key),
                    format!(
                        "`{}` is set but tls is false: set `tls = true` or remove it",
                        path.display()
                    ),
                ))
            }
            Some(path) if path.as_os_str().is_empty() => {
                return Err(ConfigError::new(
                    at(key),
                    "must not be empty, e.g. `/etc/mq-cutover/ca.pem`",
                ))
            }
            _ => {}
        }
    }
    match (&r.tls_cert_file, &r.tls_key_file) {
        (Some(_), None) => Err(ConfigError::new(
            at("rocketmq.tls_key_file"),
            "tls_cert_file is set but tls_key_file is not: a client certificate needs its key",
        )),
        (None, Some(_)) => Err(ConfigError::new(
            at("rocketmq.tls_cert_file"),
            "tls_key_file is set but tls_cert_file is not: a client key needs its certificate",
        )),
        _ => Ok(()),
    }
}

fn validate_id_source(key: &str, src: &IdSource) -> Result<(), ConfigError> {
    match src {
        IdSource::Header(h) if h.trim().is_empty() => Err(ConfigError::new(
            key,
            "header name must not be empty, e.g. `{ header = \"msg-id\" }`",
        )),
        IdSource::JsonPointer(p) if !p.starts_with('/') => Err(ConfigError::new(
            key,
            format!("`{p}` is not a JSON pointer; it starts with `/`, e.g. `{{ json_pointer = \"/order/id\" }}`"),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[redis]
urls = ["redis://127.0.0.1:6379"]

[cutover]
from = "kafka"
to = "rocketmq"

[[side]]
name = "kafka"
kind = "kafka"
message_id = { header = "msg-id" }
business_id = { json_pointer = "/user_id" }
[side.kafka]
bootstrap_servers = "127.0.0.1:9092"
topics = ["reward"]
group_id = "reward"

[[side]]
name = "rocketmq"
kind = "rocketmq"
message_id = { property = "msg-id" }
business_id = { json_pointer = "/user_id" }
[side.rocketmq]
name_server = "127.0.0.1:9876"
topic = "reward"
group = "reward"

[sink]
url = "http://127.0.0.1:8080/grant"
"#;

    fn err_of(text: &str) -> ConfigError {
        match Config::from_toml_str(text).and_then(Config::validate) {
            Ok(_) => panic!("config was accepted:\n{text}"),
            Err(e) => e,
        }
    }

    fn with(replace: &str, by: &str) -> String {
        assert!(GOOD.contains(replace), "test fixture lacks {replace:?}");
        GOOD.replacen(replace, by, 1)
    }

    #[test]
    fn good_config_validates_with_defaults() {
        let c = Config::from_toml_str(GOOD).unwrap().validate().unwrap();
        assert_eq!(c.arbiter.lease, Duration::from_secs(30));
        assert_eq!(c.arbiter.retention, Duration::from_secs(7 * 86400));
        assert_eq!(c.arbiter.ambiguous, AmbiguousPolicy::AtLeastOnce);
        assert_eq!(c.redis.key_prefix, "mqc");
        assert_eq!(c.sides[1].message_id, IdSource::Header("msg-id".into()));
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err_of(&with("[redis]\n", "[redis]\nurll = 1\n"));
        assert_eq!(e.key, "redis.urll");
        assert!(e.problem.contains("unknown field `urll`"), "{e}");
    }

    #[test]
    fn wrong_type_is_named() {
        let e = err_of(&with("group_id = \"reward\"", "group_id = [1]"));
        assert_eq!(e.key, "side[0].kafka.group_id");
        assert!(e.problem.contains("invalid type"), "{e}");
    }

    #[test]
    fn percent_above_100_is_rejected() {
        let e = err_of(&format!("{GOOD}\n[switches.initial]\npercent = 101\n"));
        assert_eq!(e.key, "switches.initial.percent");
        assert!(e.problem.contains("between 0 and 100"), "{e}");
    }

    #[test]
    fn negative_percent_is_rejected() {
        let e = err_of(&format!("{GOOD}\n[switches.initial]\npercent = -1\n"));
        assert_eq!(e.key, "switches.initial.percent");
    }

    #[test]
    fn duplicate_side_name_is_rejected() {
        let e = err_of(&with("name = \"rocketmq\"", "name = \"kafka\""));
        assert_eq!(e.key, "side[1].name");
        assert!(e.problem.contains("unique"), "{e}");
    }

    #[test]
    fn cutover_from_equal_to_is_rejected() {
        let e = err_of(&with("to = \"rocketmq\"", "to = \"kafka\""));
        assert_eq!(e.key, "cutover.to");
    }

    #[test]
    fn cutover_naming_unknown_side_is_rejected() {
        let e = err_of(&with("from = \"kafka\"", "from = \"pulsar\""));
        assert_eq!(e.key, "cutover.from");
        assert!(e.problem.contains("not a configured side"), "{e}");
    }

    #[test]
    fn human_durations_parse() {
        let c = Config::from_toml_str(&format!(
            "{GOOD}\n[arbiter]\nlease = \"500ms\"\nretention = \"2d\"\n"
        ))
        .unwrap();
        assert_eq!(c.arbiter.lease, Duration::from_millis(500));
        assert_eq!(c.arbiter.retention, Duration::from_secs(2 * 86400));
    }

    #[test]
    fn bad_duration_is_named() {
        let e = err_of(&format!("{GOOD}\n[arbiter]\nlease = \"soon\"\n"));
        assert_eq!(e.key, "arbiter.lease");
    }

    #[test]
    fn lease_too_short_is_rejected() {
        let e = err_of(&format!("{GOOD}\n[arbiter]\nlease = \"10ms\"\n"));
        assert_eq!(e.key, "arbiter.lease");
    }

    #[test]
    fn zero_max_attempts_is_rejected() {
        let e = err_of(&format!("{GOOD}\n[arbiter]\nmax_attempts = 0\n"));
        assert_eq!(e.key, "arbiter.max_attempts");
    }

    #[test]
    fn unknown_policy_is_rejected() {
        let e = err_of(&format!("{GOOD}\n[arbiter]\nambiguous = \"sometimes\"\n"));
        assert_eq!(e.key, "arbiter.ambiguous");
        assert!(e.problem.contains("at_least_once"), "{e}");
    }

    #[test]
    fn record_layout_defaults_to_packed_and_names_its_choices() {
        let c = Config::from_toml_str(GOOD).unwrap().validate().unwrap();
        assert_eq!(c.arbiter.record_layout, RecordLayout::Packed);
        let c = Config::from_toml_str(&format!("{GOOD}\n[arbiter]\nrecord_layout = \"hash\"\n"))
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(c.arbiter.record_layout, RecordLayout::Hash);
        let e = err_of(&format!("{GOOD}\n[arbiter]\nrecord_layout = \"json\"\n"));
        assert_eq!(e.key, "arbiter.record_layout");
        assert!(e.problem.contains("packed, hash"), "{e}");
    }

    #[test]
    fn sentinel_mode_takes_the_sentinels_and_a_master_name() {
        let sentinel = |extra: &str| {
            with(
                "[redis]\nurls = [\"redis://127.0.0.1:6379\"]\n",
                &format!(
                    "[redis]\nmode = \"sentinel\"\nurls = [\"redis://s1:26379\", \
                     \"redis://s2:26379\"]\n{extra}"
                ),
            )
        };
        let c = Config::from_toml_str(&sentinel(
            "[redis.sentinel]\nmaster_name = \"mq\"\npassword = \"s3cret-sentinel\"\n",
        ))
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(c.redis.mode, RedisMode::Sentinel);
        assert_eq!(c.redis.sentinel.master_name, "mq");
        assert!(!format!("{:?}", c.redis).contains("s3cret"));
        assert_eq!(c.secret_keys(), vec!["redis.sentinel.password"]);

        let e = err_of(&sentinel(""));
        assert_eq!(e.key, "redis.sentinel.master_name");
        let e = err_of(&sentinel("[redis.sentinel]\nmaster_name = \"my master\"\n"));
        assert_eq!(e.key, "redis.sentinel.master_name");
        let e = err_of(&sentinel(
            "[redis.sentinel]\nmaster_name = \"mq\"\npassword = \"change-me\"\n",
        ));
        assert_eq!(e.key, "redis.sentinel.password");
        let e = err_of(&with(
            "[redis]\nurls = [\"redis://127.0.0.1:6379\"]\n",
            "[redis]\nmode = \"sentinel\"\nurls = [\"redis://s1:1\", \"rediss://s2:1\"]\n\
             [redis.sentinel]\nmaster_name = \"mq\"\n",
        ));
        assert_eq!(e.key, "redis.urls");
        // Sentinel settings without sentinel mode would be silently ignored: refused.
        let e = err_of(&with(
            "[redis]\n",
            "[redis.sentinel]\nmaster_name = \"mq\"\n[redis]\n",
        ));
        assert_eq!(e.key, "redis.sentinel");
    }

    #[test]
    fn arbiter_replicas_need_a_wait_shorter_than_the_reply_timeout_and_no_cluster() {
        let c = Config::from_toml_str(&with("[redis]\n", "[arbiter]\nreplicas = 1\n[redis]\n"))
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(c.arbiter.replicas, 1);
        assert_eq!(c.arbiter.replica_timeout, Duration::from_millis(500));
        let e = err_of(&with(
            "[redis]\n",
            "[arbiter]\nreplicas = 1\nreplica_timeout = \"1s\"\n[redis]\n",
        ));
        assert_eq!(e.key, "arbiter.replica_timeout");
        let e = err_of(&with(
            "[redis]\nurls = [\"redis://127.0.0.1:6379\"]\n",
            "[arbiter]\nreplicas = 1\n[redis]\nmode = \"cluster\"\nurls = [\"redis://a:1\"]\n",
        ));
        assert_eq!(e.key, "arbiter.replicas");
        let e = err_of(&with("[redis]\n", "[arbiter]\nreplicas = 17\n[redis]\n"));
        assert_eq!(e.key, "arbiter.replicas");
    }

    #[test]
    fn bad_redis_url_is_rejected() {
        let e = err_of(&with("redis://127.0.0.1:6379", "http://127.0.0.1:6379"));
        assert_eq!(e.key, "redis.urls[0]");
    }

    #[test]
    fn standalone_with_two_urls_is_rejected() {
        let e = err_of(&with(
            "[\"redis://127.0.0.1:6379\"]",
            "[\"redis://a:1\", \"redis://b:2\"]",
        ));
        assert_eq!(e.key, "redis.urls");
    }

    #[test]
    fn empty_redis_urls_is_rejected() {
        let e = err_of(&with("[\"redis://127.0.0.1:6379\"]", "[]"));
        assert_eq!(e.key, "redis.urls");
    }

    #[test]
    fn key_prefix_with_braces_is_rejected() {
        let e = err_of(&with("[redis]\n", "[redis]\nkey_prefix = \"{x}\"\n"));
        assert_eq!(e.key, "redis.key_prefix");
    }

    #[test]
    fn side_kind_without_its_table_is_rejected() {
        let e = err_of(&with("kind = \"rocketmq\"", "kind = \"kafka\""));
        assert_eq!(e.key, "side[1].kafka");
    }

    #[test]
    fn bad_side_name_is_rejected() {
        let e = err_of(&with("name = \"kafka\"", "name = \"Kafka Old\""));
        assert_eq!(e.key, "side[0].name");
    }

    #[test]
    fn json_pointer_must_start_with_slash() {
        let e = err_of(&with(
            "business_id = { json_pointer = \"/user_id\" }",
            "business_id = { json_pointer = \"user_id\" }",
        ));
        assert_eq!(e.key, "side[0].business_id");
    }

    #[test]
    fn empty_topic_list_is_rejected() {
        let e = err_of(&with("topics = [\"reward\"]", "topics = []"));
        assert_eq!(e.key, "side[0].kafka.topics");
    }

    #[test]
    fn side_outside_the_cutover_is_rejected() {
        let extra = "\n[[side]]\nname = \"third\"\nkind = \"kafka\"\nmessage_id = { header = \"m\" }\nbusiness_id = { header = \"b\" }\n[side.kafka]\nbootstrap_servers = \"x:1\"\ntopics = [\"t\"]\ngroup_id = \"g\"\n";
        let e = err_of(&format!("{GOOD}{extra}"));
        assert_eq!(e.key, "side[2].name");
    }

    #[test]
    fn zero_claim_batch_is_rejected() {
        let e = err_of(&format!("{GOOD}\n[pipeline]\nclaim_batch = 0\n"));
        assert_eq!(e.key, "pipeline.claim_batch");
    }

    #[test]
    fn stall_after_defaults_to_a_minute_and_must_span_two_lag_measurements() {
        let cfg = Config::from_toml_str(GOOD).unwrap().validate().unwrap();
        assert_eq!(cfg.pipeline.stall_after, Duration::from_secs(60));
        for bad in ["0s", "9s"] {
            let e = err_of(&format!("{GOOD}\n[pipeline]\nstall_after = \"{bad}\"\n"));
            assert_eq!(e.key, "pipeline.stall_after");
            assert!(e.problem.contains("10s"), "{}", e.problem);
        }
        let cfg = Config::from_toml_str(&format!("{GOOD}\n[pipeline]\nstall_after = \"10s\"\n"))
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(cfg.pipeline.stall_after, Duration::from_secs(10));
    }

    #[test]
    fn claims_in_flight_defaults_to_two_and_is_bounded() {
        let cfg = Config::from_toml_str(GOOD).unwrap().validate().unwrap();
        assert_eq!(cfg.pipeline.claims_in_flight, 2);
        for bad in [0, 17] {
            let e = err_of(&format!("{GOOD}\n[pipeline]\nclaims_in_flight = {bad}\n"));
            assert_eq!(e.key, "pipeline.claims_in_flight");
            assert!(e.to_string().contains("outside 1..=16"), "{e}");
        }
    }

    #[test]
    fn tiny_dead_letter_stream_is_rejected() {
        let e = err_of(&format!("{GOOD}\n[dead_letters]\nmax_len = 3\n"));
        assert_eq!(e.key, "dead_letters.max_len");
    }

    #[test]
    fn pass_through_needs_the_explicit_measurement_flag() {
        let e = err_of(&format!(
            "{GOOD}\n[pipeline.pass_through]\nside = \"kafka\"\n"
        ));
        assert_eq!(e.key, "pipeline.pass_through.measurement_only");
        let c = Config::from_toml_str(&format!(
            "{GOOD}\n[pipeline.pass_through]\nside = \"kafka\"\nmeasurement_only = true\n"
        ))
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(c.pipeline.pass_through.as_ref().unwrap().side, "kafka");
    }

    #[test]
    fn pass_through_side_must_exist() {
        let e = err_of(&format!(
            "{GOOD}\n[pipeline.pass_through]\nside = \"kafak\"\nmeasurement_only = true\n"
        ));
        assert_eq!(e.key, "pipeline.pass_through.side");
    }

    #[test]
    fn missing_sink_is_named() {
        let text = GOOD.replace("[sink]\nurl = \"http://127.0.0.1:8080/grant\"\n", "");
        let e = err_of(&text);
        assert!(e.problem.contains("sink"), "{e}");
    }

    #[test]
    fn bad_admin_address_is_named() {
        let e = err_of(&format!("{GOOD}\n[admin]\nlisten = \"localhost\"\n"));
        assert_eq!(e.key, "admin.listen");
    }

    #[test]
    fn bad_log_level_is_rejected() {
        let e = err_of(&format!("{GOOD}\n[log]\nlevel = \"=[\"\n"));
        assert_eq!(e.key, "log.level");
    }

    #[test]
    fn environment_overrides_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, GOOD).unwrap();
        let env = [
            ("MQ_CUTOVER__REDIS__KEY_PREFIX", "blue"),
            ("MQ_CUTOVER__REDIS__PASSWORD", "12345"),
            ("MQ_CUTOVER__ARBITER__LEASE", "5s"),
            ("MQ_CUTOVER__ARBITER__MAX_ATTEMPTS", "3"),
            ("MQ_CUTOVER__SWITCHES__INITIAL__PERCENT", "40"),
            ("MQ_CUTOVER__SWITCHES__INITIAL__CONSUME", "true"),
            ("MQ_CUTOVER__SWITCHES__INITIAL__WHITELIST", "u1,u2"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let c = Config::load_with_env(&path, env)
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(c.redis.key_prefix, "blue");
        assert_eq!(c.redis.password.as_ref().unwrap().expose(), "12345");
        assert_eq!(c.arbiter.lease, Duration::from_secs(5));
        assert_eq!(c.arbiter.max_attempts.get(), 3);
        assert_eq!(c.switches.initial.percent.get(), 40);
        assert!(c.switches.initial.consume);
        assert_eq!(c.switches.initial.whitelist, vec!["u1", "u2"]);
    }

    #[test]
    fn environment_override_with_bad_value_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, GOOD).unwrap();
        let env = [(
            "MQ_CUTOVER__SWITCHES__INITIAL__PERCENT".to_owned(),
            "150".to_owned(),
        )]
        .into_iter()
        .collect();
        let e = Config::load_with_env(&path, env)
            .and_then(Config::validate)
            .unwrap_err();
        assert_eq!(e.key, "switches.initial.percent");
    }

    #[test]
    fn an_environment_variable_naming_no_key_is_named() {
        // Found by fuzz_config_environment_overrides: the error named no key at all.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, GOOD).unwrap();
        for var in [
            "MQ_CUTOVER__",
            "MQ_CUTOVER__REDIS____PASSWORD",
            "MQ_CUTOVER__ADMIN__",
        ] {
            let env = [(var.to_owned(), "x".to_owned())].into_iter().collect();
            let e = Config::load_with_env(&path, env).unwrap_err();
            assert_eq!(e.key, var);
            assert!(e.problem.contains("names no config key"), "{e}");
        }
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let e =
            Config::load_with_env(Path::new("/nonexistent/x.toml"), BTreeMap::new()).unwrap_err();
        assert_eq!(e.key, "--config");
    }

    #[test]
    fn password_never_shows_in_debug() {
        let c =
            Config::from_toml_str(&with("[redis]\n", "[redis]\npassword = \"hunter2\"\n")).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    const OPERATOR: &str = "9f1c2e7a4b6d8f0a1c3e5b7d9f2a4c6e";
    const VIEWER: &str = "0b8d6f4a2c1e3b5d7f9a8c6e4b2d0f1a";

    fn admin(lines: &str) -> Result<Validated, ConfigError> {
        Config::from_toml_str(&format!("{GOOD}\n[admin]\n{lines}\n")).and_then(Config::validate)
    }

    #[test]
    fn good_tokens_are_accepted() {
        let c = admin(&format!(
            "token = \"{OPERATOR}\"\nviewer_token = \"{VIEWER}\""
        ))
        .unwrap();
        assert_eq!(c.admin.token.as_ref().unwrap().expose(), OPERATOR);
        assert_eq!(c.admin.viewer_token.as_ref().unwrap().expose(), VIEWER);
    }

    #[test]
    fn short_placeholder_or_weak_tokens_are_refused_without_showing_them() {
        let long_placeholder = "REPLACE-ME-with-openssl-rand-hex-32-output";
        for (key, bad, says) in [
            ("token", "t0ken", "is 5 bytes; a token must be at least 32"),
            ("token", "change-me", "placeholder"),
            ("token", "CHANGEME", "placeholder"),
            ("token", "Secret", "well-known default"),
            ("viewer_token", "token", "well-known default"),
            ("viewer_token", long_placeholder, "placeholder"),
            ("token", "", "empty"),
            (
                "token",
                "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                "distinct characters",
            ),
            (
                "token",
                "9f1c2e7a4b6d8f0a 1c3e5b7d9f2a4c6e",
                "printable ASCII",
            ),
        ] {
            let e = admin(&format!("{key} = \"{bad}\"")).unwrap_err();
            assert_eq!(e.key, format!("admin.{key}"), "{bad}");
            assert!(e.problem.contains(says), "{bad}: {e}");
            assert!(
                bad.is_empty() || !e.problem.contains(bad),
                "the error shows the token: {e}"
            );
        }
    }

    #[test]
    fn the_viewer_token_must_differ_from_the_operator_token() {
        let e = admin(&format!(
            "token = \"{OPERATOR}\"\nviewer_token = \"{OPERATOR}\""
        ))
        .unwrap_err();
        assert_eq!(e.key, "admin.viewer_token");
    }

    #[test]
    fn allowed_hosts_take_names_addresses_or_a_lone_star() {
        let c =
            admin("allowed_hosts = [\"mq.example.net\", \"10.0.0.5:9464\", \"[::1]:9\"]").unwrap();
        assert_eq!(c.admin.allowed_hosts.len(), 3);
        admin("allowed_hosts = [\"*\"]").unwrap();
        for bad in ["", "*.example.net", "http://x", "a b", "x/y"] {
            let e = admin(&format!("allowed_hosts = [\"ok\", \"{bad}\"]")).unwrap_err();
            assert_eq!(e.key, "admin.allowed_hosts[1]", "{bad}");
        }
    }

    #[test]
    fn a_placeholder_redis_password_is_refused() {
        let e = err_of(&with("[redis]\n", "[redis]\npassword = \"REPLACE-ME\"\n"));
        assert_eq!(e.key, "redis.password");
        assert!(!e.to_string().contains("REPLACE-ME"), "{e}");
    }

    #[test]
    fn kafka_properties_the_source_depends_on_are_refused_by_name() {
        for key in [
            "group.id",
            "bootstrap.servers",
            "metadata.broker.list",
            "enable.auto.commit",
            "auto.commit.enable",
            "enable.auto.offset.store",
            "auto.commit.interval.ms",
            "enable.partition.eof",
            "offset.store.method",
            "plugin.library.paths",
            "Group.Id",
        ] {
            let e = err_of(&with(
                "group_id = \"reward\"\n",
                &format!("group_id = \"reward\"\n[side.kafka.properties]\n\"{key}\" = \"x\"\n"),
            ));
            assert_eq!(e.key, format!("side[0].kafka.properties.{key}"));
            assert!(e.problem.contains("managed by mq-cutover"), "{e}");
        }
    }

    #[test]
    fn other_kafka_properties_pass_through() {
        let c = Config::from_toml_str(&with(
            "group_id = \"reward\"\n",
            "group_id = \"reward\"\n[side.kafka.properties]\n\"auto.offset.reset\" = \"latest\"\n\
             \"client.id\" = \"billing\"\n\"security.protocol\" = \"SSL\"\n\
             \"session.timeout.ms\" = \"10000\"\n",
        ))
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(c.sides[0].kafka.as_ref().unwrap().properties.len(), 4);
    }

    #[test]
    fn urls_are_printed_without_their_password() {
        for (url, shown) in [
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("redis://user@h:1/0", "redis://user@h:1/0"),
            ("redis://user:hunter2@h:1/0", "redis://user:***@h:1/0"),
            ("rediss://:hunter2@h:1", "rediss://:***@h:1"),
            ("redis://u:pa/ss@w@rd@h:1", "redis://u:***@h:1"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(crate::secrets::redact_url(url), shown);
        }
    }

    /// Keys the environment overrides, real ones and near misses.
    fn env_key() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let real = prop::sample::select(
            &[
                "REDIS__URLS",
                "REDIS__PASSWORD",
                "REDIS__KEY_PREFIX",
                "REDIS__MODE",
                "ARBITER__LEASE",
                "ARBITER__MAX_ATTEMPTS",
                "SWITCHES__INITIAL__PERCENT",
                "SWITCHES__INITIAL__WHITELIST",
                "SWITCHES__INITIAL__CONSUME",
                "CUTOVER__FROM",
                "PIPELINE__CHANNEL",
                "SINK__URL",
                "SINK__CLASSIFY__RETRYABLE_STATUSES",
                "ADMIN__TOKEN",
                "ADMIN__VIEWER_TOKEN",
                "ADMIN__ALLOWED_HOSTS",
                "ADMIN__LISTEN",
                "LOG__LEVEL",
                "SIDE",
                "SIDE__0__NAME",
                "",
            ][..],
        )
        .prop_map(str::to_owned);
        prop_oneof![4 => real, 1 => "[A-Z_0-9]{0,12}(__[A-Z_0-9]{0,6}){0,3}"]
            .prop_map(|k| format!("{ENV_PREFIX}__{k}"))
    }

    fn env_value() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            Just("".to_owned()),
            Just("true".to_owned()),
            Just("150".to_owned()),
            Just("-1".to_owned()),
            Just("1e400".to_owned()),
            Just("99999999999999999999999".to_owned()),
            Just("5s".to_owned()),
            Just("redis://u:p@h:1,rediss://x".to_owned()),
            Just("a,,b".to_owned()),
            Just("[1, 2]".to_owned()),
            "(?s).{0,24}",
        ]
    }

    proptest::proptest! {
        #![proptest_config(crate::fuzzing::config(8))]

        /// Whatever the environment says, loading gives a config or an error naming a key.
        #[test]
        fn fuzz_config_environment_overrides(
            env in proptest::collection::btree_map(env_key(), env_value(), 0..6),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("c.toml");
            std::fs::write(&path, GOOD).unwrap();
            if let Err(e) = Config::load_with_env(&path, env).and_then(Config::validate) {
                proptest::prop_assert!(!e.key.is_empty() && !e.problem.is_empty(), "{e:?}");
            }
        }

        /// Any file, and the good one with a line replaced: a config or an error, never a panic.
        #[test]
        fn fuzz_config_files(
            line in 0usize..40,
            replacement in proptest::prop_oneof![
                "(?s).{0,40}",
                "[a-z_]{1,12} = (\"[ -~]{0,12}\"|[0-9-]{1,22}|\\[\\]|\\{\\}|true)",
                "\\[[a-z_.]{0,20}\\]",
            ],
        ) {
            let mut lines: Vec<&str> = GOOD.lines().collect();
            let at = line % lines.len();
            lines[at] = &replacement;
            let text = lines.join("\n");
            let _ = Config::from_toml_str(&text).and_then(Config::validate);
            let _ = Config::from_toml_str(&replacement).and_then(Config::validate);
        }
    }

    /// A config file in a temporary directory beside the secret files it names.
    fn with_files(body: &str, files: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in files {
            std::fs::write(dir.path().join(name), content).unwrap();
        }
        let text = body.replace("DIR", dir.path().to_str().unwrap());
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn secrets_are_read_from_files_at_load_time_without_their_line_break() {
        let body = with(
            "[redis]\n",
            "[redis]\npassword_file = \"DIR/redis\"\n",
        )
        .replace(
            "group_id = \"reward\"",
            "group_id = \"reward\"\n[side.kafka.properties]\n\"security.protocol\" = \"SASL_PLAINTEXT\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"\n\"sasl.username\" = \"mqc\"\n[side.kafka.secret_files]\n\"sasl.password\" = \"DIR/kafka\"",
        ) + "[sink.header_files]\nX-Api-Key = \"DIR/api\"\n[admin]\ntoken_file = \"DIR/token\"\n";
        let (_dir, path) = with_files(
            &body,
            &[
                ("redis", "r-pw\n"),
                ("kafka", "k-pw\n"),
                ("api", "key-1\n"),
                ("token", "t-1-9f1c2e7a4b6d8f0a1c3e5b7d9f2a4c6e"),
            ],
        );
        let c = Config::load_with_env(&path, BTreeMap::new())
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(c.redis.password.as_ref().unwrap().expose(), "r-pw");
        assert_eq!(
            c.admin.token.as_ref().unwrap().expose(),
            "t-1-9f1c2e7a4b6d8f0a1c3e5b7d9f2a4c6e"
        );
        let k = c.sides[0].kafka.as_ref().unwrap();
        assert_eq!(k.properties["sasl.password"], "k-pw");
        assert_eq!(c.sink.headers["X-Api-Key"], "key-1");
        // Nowhere printed: Debug, serialized, the check-config list.
        let shown = format!(
            "{c:?}{}{}",
            serde_json::to_string(&*c).unwrap(),
            c.secret_keys().join(",")
        );
        for secret in ["r-pw", "k-pw", "key-1", "t-1"] {
            assert!(!shown.contains(secret), "{secret} shown in {shown}");
        }
        assert!(
            c.secret_keys()
                .iter()
                .any(|k| k.starts_with("side[0].kafka.properties.\"sasl.password\" (file ")),
            "{:?}",
            c.secret_keys()
        );
    }

    #[test]
    fn a_secret_given_as_value_and_as_file_is_refused_naming_both() {
        let body = with(
            "[redis]\n",
            "[redis]\npassword = \"a\"\npassword_file = \"DIR/redis\"\n",
        );
        let (_dir, path) = with_files(&body, &[("redis", "b")]);
        let e = Config::load_with_env(&path, BTreeMap::new()).unwrap_err();
        assert_eq!(e.key, "redis.password_file");
        assert!(e.problem.contains("`redis.password`"), "{e}");
        // The environment's value counts as the value.
        let body = with("[redis]\n", "[redis]\npassword_file = \"DIR/redis\"\n");
        let (_dir, path) = with_files(&body, &[("redis", "b")]);
        let env = [("MQ_CUTOVER__REDIS__PASSWORD".to_owned(), "c".to_owned())].into();
        let e = Config::load_with_env(&path, env).unwrap_err();
        assert_eq!(e.key, "redis.password_file");
        let body = format!(
            "{}[sink.header_files]\nx-api-key = \"DIR/api\"\n",
            GOOD.replace("[sink]\n", "[sink.headers]\nX-Api-Key = \"v\"\n[sink]\n")
        );
        let (_dir, path) = with_files(&body, &[("api", "b")]);
        let e = Config::load_with_env(&path, BTreeMap::new()).unwrap_err();
        assert_eq!(e.key, "sink.header_files.x-api-key");
    }

    #[test]
    fn a_missing_secret_file_names_the_key_and_the_path() {
        let body = format!("{GOOD}[admin]\ntoken_file = \"DIR/nope\"\n");
        let (_dir, path) = with_files(&body, &[]);
        let e = Config::load_with_env(&path, BTreeMap::new()).unwrap_err();
        assert_eq!(e.key, "admin.token_file");
        assert!(e.problem.contains("nope"), "{e}");
    }

    #[test]
    fn secrets_from_the_environment_keep_their_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, GOOD).unwrap();
        let env = [
            ("MQ_CUTOVER__REDIS__PASSWORD", "007"),
            ("MQ_CUTOVER__ADMIN__TOKEN", "TRUE"),
            ("MQ_CUTOVER__REDIS__USERNAME", "1e3"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let c = Config::load_with_env(&path, env).unwrap();
        assert_eq!(c.redis.password.unwrap().expose(), "007");
        assert_eq!(c.admin.token.unwrap().expose(), "TRUE");
        assert_eq!(c.redis.username.as_deref(), Some("1e3"));
    }

    #[test]
    fn a_password_inside_a_redis_url_is_never_printed() {
        let c = Config::from_toml_str(&with(
            "redis://127.0.0.1:6379",
            "rediss://mqc:url-pw@127.0.0.1:6379",
        ))
        .unwrap()
        .validate()
        .unwrap();
        let shown = format!("{c:?}{}", serde_json::to_string(&*c).unwrap());
        assert!(
            !shown.contains("url-pw") && shown.contains("mqc:***@"),
            "{shown}"
        );
        assert_eq!(c.secret_keys(), vec!["redis.urls (a password in a URL)"]);
    }

    #[test]
    fn secret_kafka_properties_are_redacted_and_others_shown() {
        let c = Config::from_toml_str(&with(
            "group_id = \"reward\"",
            "group_id = \"reward\"\n[side.kafka.properties]\n\"security.protocol\" = \"SASL_PLAINTEXT\"\n\"sasl.mechanism\" = \"PLAIN\"\n\"sasl.username\" = \"u\"\n\"sasl.password\" = \"inline-pw\"\n\"ssl.key.password\" = \"key-pw\"",
        ))
        .unwrap();
        let shown = format!("{c:?}{}", serde_json::to_string(&c).unwrap());
        assert!(
            !shown.contains("inline-pw") && !shown.contains("key-pw"),
            "{shown}"
        );
        assert!(shown.contains("SASL_PLAINTEXT"), "{shown}");
    }

    #[test]
    fn kafka_security_problems_are_named_by_check_config() {
        let e = err_of(&with(
            "group_id = \"reward\"",
            "group_id = \"reward\"\n[side.kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"",
        ));
        assert_eq!(e.key, "side[0].kafka.properties.\"sasl.mechanism\"");
    }

    #[test]
    fn redis_tls_files_must_exist_and_need_a_rediss_url() {
        let e = err_of(&with(
            "[redis]\n",
            "[redis]\ntls = { ca_file = \"/nonexistent/ca.pem\" }\n",
        ));
        assert_eq!(e.key, "redis.tls.ca_file");
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "x").unwrap();
        let e = err_of(&with(
            "[redis]\n",
            &format!("[redis]\ntls = {{ ca_file = \"{}\" }}\n", ca.display()),
        ));
        assert_eq!(e.key, "redis.tls");
        assert!(e.problem.contains("rediss://"), "{e}");
    }

    /// GOOD with `lines` added to its `[side.rocketmq]` table.
    fn rocketmq_with(lines: &str) -> String {
        with(
            "topic = \"reward\"\ngroup = \"reward\"\n",
            &format!("topic = \"reward\"\ngroup = \"reward\"\n{lines}\n"),
        )
    }

    #[test]
    fn rocketmq_security_settings_validate_and_keep_the_secret_out_of_debug() {
        let cfg = Config::from_toml_str(&rocketmq_with(
            "access_key = \"mqc\"\nsecret_key = \"s3cret-sk\"\nnamespace = \"MQ_INST_1_a-b\"\n\
             tls = true\ntls_ca_file = \"/tb/ca.pem\"\ntls_cert_file = \"/tb/c.pem\"\n\
             tls_key_file = \"/tb/c.key\"",
        ))
        .unwrap()
        .validate()
        .unwrap();
        let r = cfg.sides[1].rocketmq.as_ref().unwrap();
        assert_eq!(r.access_key.as_deref(), Some("mqc"));
        assert_eq!(r.secret_key.as_ref().unwrap().expose(), "s3cret-sk");
        assert!(r.tls);
        assert!(!format!("{cfg:?}").contains("s3cret-sk"));
    }

    #[test]
    fn rocketmq_security_mistakes_name_their_key() {
        for (lines, key) in [
            ("access_key = \"mqc\"", "side[1].rocketmq.secret_key"),
            ("secret_key = \"x\"", "side[1].rocketmq.access_key"),
            (
                "access_key = \"\"\nsecret_key = \"x\"",
                "side[1].rocketmq.access_key",
            ),
            (
                "access_key = \"a\"\nsecret_key = \"\"",
                "side[1].rocketmq.secret_key",
            ),
            ("namespace = \"a%b\"", "side[1].rocketmq.namespace"),
            ("namespace = \"\"", "side[1].rocketmq.namespace"),
            ("tls_ca_file = \"/ca.pem\"", "side[1].rocketmq.tls_ca_file"),
            (
                "tls = true\ntls_cert_file = \"/c.pem\"",
                "side[1].rocketmq.tls_key_file",
            ),
            (
                "tls = true\ntls_key_file = \"/c.key\"",
                "side[1].rocketmq.tls_cert_file",
            ),
        ] {
            let e = err_of(&rocketmq_with(lines));
            assert_eq!(e.key, key, "{lines}: {e}");
        }
    }

    #[test]
    fn max_message_bytes_defaults_to_4_mib_and_is_bounded() {
        let cfg = Config::from_toml_str(GOOD).unwrap().validate().unwrap();
        assert_eq!(cfg.pipeline.max_message_bytes, 4 * 1024 * 1024);
        for bad in ["0", "1023", "268435457"] {
            let e = err_of(&format!("{GOOD}\n[pipeline]\nmax_message_bytes = {bad}\n"));
            assert_eq!(e.key, "pipeline.max_message_bytes", "{bad}");
            assert!(e.problem.contains("outside"), "{e}");
        }
        let cfg = Config::from_toml_str(&format!(
            "{GOOD}\n[pipeline]\nmax_message_bytes = 268435456\nmax_buffered_bytes = 268435456\n"
        ))
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(cfg.pipeline.max_message_bytes, MAX_MESSAGE_BYTES_LIMIT);
    }

    #[test]
    fn max_buffered_bytes_defaults_to_64_mib_and_holds_the_largest_message() {
        let cfg = Config::from_toml_str(GOOD).unwrap().validate().unwrap();
        assert_eq!(cfg.pipeline.max_buffered_bytes, 64 * 1024 * 1024);
        for lines in [
            "max_buffered_bytes = 4194303",
            "max_message_bytes = 8388608\nmax_buffered_bytes = 4194304",
            "max_buffered_bytes = 68719476737",
        ] {
            let e = err_of(&format!("{GOOD}\n[pipeline]\n{lines}\n"));
            assert_eq!(e.key, "pipeline.max_buffered_bytes", "{lines}");
            assert!(e.problem.contains("pipeline.max_message_bytes"), "{e}");
        }
        let cfg = Config::from_toml_str(&format!(
            "{GOOD}\n[pipeline]\nmax_message_bytes = 65536\nmax_buffered_bytes = 65536\n"
        ))
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(cfg.pipeline.max_buffered_bytes, 65536);
    }

    #[test]
    fn percent_parses_from_text() {
        assert_eq!("10".parse::<Percent>().unwrap().get(), 10);
        assert_eq!("100%".parse::<Percent>().unwrap().get(), 100);
        assert!("101".parse::<Percent>().is_err());
        assert!("ten".parse::<Percent>().is_err());
    }
}
