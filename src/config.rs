//! Configuration: a TOML file plus `MQ_CUTOVER__SECTION__KEY` environment overrides, parsed into
//! serde structs that refuse unknown keys, then validated without any I/O.
//!
//! Every error names the key it is about (`side[1].name`, `switches.initial.percent`) and says
//! what a good value looks like, in one line.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::num::NonZeroU32;
use std::ops::Deref;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

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
    fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
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

/// `[admin]`: where `/metrics`, `/healthz` and `/readyz` are served.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address to listen on, e.g. `0.0.0.0:9464` in a container.
    #[serde(default = "default_admin_listen")]
    pub listen: std::net::SocketAddr,
    /// Bearer token for the API's write routes; without one they are off. Prefer
    /// `MQ_CUTOVER__ADMIN__TOKEN`. Never logged.
    #[serde(default)]
    pub token: Option<Secret>,
}

fn default_admin_listen() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 9464))
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            token: None,
        }
    }
}

/// `[redis]`: the server (or cluster) holding claims and switches.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `standalone` (one server, or a proxy) or `cluster` (Redis Cluster).
    #[serde(default)]
    pub mode: RedisMode,
    /// `redis://host:port[/db]` or `rediss://…` for TLS; one URL for standalone, seed nodes for
    /// cluster.
    pub urls: Vec<String>,
    /// ACL user name (Redis 6+); may also be given in the URL.
    #[serde(default)]
    pub username: Option<String>,
    /// Password; prefer `MQ_CUTOVER__REDIS__PASSWORD` over writing it in the file. Never logged.
    #[serde(default)]
    pub password: Option<Secret>,
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

fn default_key_prefix() -> String {
    "mqc".to_owned()
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_response_timeout() -> Duration {
    Duration::from_secs(1)
}

/// Standalone server or Redis Cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisMode {
    /// One server (or a proxy in front of several).
    #[default]
    Standalone,
    /// Redis Cluster; `urls` are seed nodes.
    Cluster,
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

named_choices!(RedisMode { Standalone = "standalone", Cluster = "cluster" });
named_choices!(AmbiguousPolicy { AtLeastOnce = "at_least_once", AtMostOnce = "at_most_once" });
named_choices!(RecordLayout { Packed = "packed", Hash = "hash" });
named_choices!(SideKind { Kafka = "kafka", Rocketmq = "rocketmq" });
named_choices!(LogFormat { Text = "text", Json = "json" });

/// A string that never shows in `Debug` or logs.
#[derive(Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for handing to the client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

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
    /// Any further librdkafka property, passed through as is.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
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
    /// The largest message body a source hands on, in bytes, checked as stored and again once
    /// uncompressed; a larger one is dead-lettered with the reason and never forwarded.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
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
fn default_max_message_bytes() -> usize {
    // RocketMQ's own default maxMessageSize.
    4 * 1024 * 1024
}
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
            max_message_bytes: default_max_message_bytes(),
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
    "switches.initial.whitelist",
    "sink.classify.retryable_statuses",
    "sink.classify.fatal_statuses",
];

impl Config {
    /// Reads `path`, applies environment overrides, and parses (does not validate).
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
        let mut envsrc = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .list_separator(",")
            .try_parsing(true)
            .source(Some(env.into_iter().collect()));
        for key in ENV_LIST_KEYS {
            envsrc = envsrc.with_list_parse_key(key);
        }
        let merged = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(envsrc)
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
        serde_path_to_error::deserialize(merged).map_err(|e| {
            let path = e.path().to_string();
            let key = if path == "." {
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
        })
    }

    /// Checks every rule that needs no I/O. The first problem found is returned.
    pub fn validate(self) -> Result<Validated, ConfigError> {
        self.validate_redis()?;
        self.validate_arbiter()?;
        self.validate_sides()?;
        self.validate_pipeline()?;
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
        positive("redis.connect_timeout", r.connect_timeout)?;
        positive("redis.response_timeout", r.response_timeout)?;
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
        if p.max_message_bytes < 1024 || p.max_message_bytes > MAX_MESSAGE_BYTES_LIMIT {
            return Err(ConfigError::new(
                "pipeline.max_message_bytes",
                format!(
                    "{} is outside 1024..={MAX_MESSAGE_BYTES_LIMIT} (1 KiB to 256 MiB), e.g. `4194304` (4 MiB)",
                    p.max_message_bytes
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
            "{GOOD}\n[pipeline]\nmax_message_bytes = 268435456\n"
        ))
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(cfg.pipeline.max_message_bytes, MAX_MESSAGE_BYTES_LIMIT);
    }

    #[test]
    fn percent_parses_from_text() {
        assert_eq!("10".parse::<Percent>().unwrap().get(), 10);
        assert_eq!("100%".parse::<Percent>().unwrap().get(), 100);
        assert!("101".parse::<Percent>().is_err());
        assert!("ten".parse::<Percent>().is_err());
    }
}
