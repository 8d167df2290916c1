//! Configuration: a TOML file plus `MQ_CUTOVER__SECTION__KEY` environment overrides, parsed into
//! serde structs that refuse unknown keys, then validated without any I/O.
//!
//! Every error names the key it is about (`side[1].name`, `switches.initial.percent`) and says
//! what a good value looks like, in one line. Each section's struct and its own checks live
//! with the component that uses it (`store::config` for `[redis]`, `source::config` for
//! `[[side]]`, …); this module loads the file, holds the top-level [`Config`], checks what spans
//! sections, and re-exports the section types under their old paths.

use std::collections::{BTreeMap, HashSet};
use std::ops::Deref;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::admin::config::{AdminConfig, MIN_TOKEN_BYTES};
pub use crate::arbiter::config::{
    AmbiguousPolicy, ArbiterConfig, InitialSwitches, Percent, RecordLayout, SwitchesConfig,
};
pub use crate::dead::DeadLettersConfig;
pub use crate::parity::config::ParityConfig;
pub use crate::pipeline::config::{
    PassThroughConfig, PipelineConfig, MAX_BUFFERED_BYTES_LIMIT, MAX_MESSAGE_BYTES_LIMIT,
};
pub use crate::secrets::Secret;
use crate::secrets::{fill_from_file, read_secret_file, redact_url};
pub use crate::settings::{placeholder, ConfigError};
pub use crate::sink::config::SinkConfig;
pub use crate::source::config::{
    refused_kafka_property, IdSource, KafkaProperties, KafkaSideConfig, RocketMqSideConfig,
    SideConfig, SideKind, KAFKA_SECRET_PROPERTIES,
};
pub use crate::store::config::{RedisConfig, RedisMode, SentinelConfig};
pub use crate::telemetry::logs::{LogConfig, LogFormat};

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
    pub sink: SinkConfig,
    /// Batching, in-flight limits and the shutdown deadline.
    #[serde(default)]
    pub pipeline: PipelineConfig,
    /// Where parked messages are kept.
    #[serde(default)]
    pub dead_letters: DeadLettersConfig,
    /// The dual-read check: per-side counts and one-sided ids.
    #[serde(default)]
    pub parity: ParityConfig,
    /// Log format and filter.
    #[serde(default)]
    pub log: LogConfig,
    /// The admin listener: metrics and health.
    #[serde(default)]
    pub admin: AdminConfig,
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
            if let Some(r) = side.rocketmq.as_mut() {
                fill_from_file(
                    &format!("side[{i}].rocketmq.secret_key"),
                    &mut r.secret_key,
                    &format!("side[{i}].rocketmq.secret_key_file"),
                    r.secret_key_file.as_deref(),
                )?;
            }
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

    /// Checks every rule that needs no I/O: each section's own (its `validate()`), then those
    /// that span sections. The first problem found is returned.
    pub fn validate(self) -> Result<Validated, ConfigError> {
        self.redis.validate()?;
        self.arbiter.validate()?;
        self.validate_replication()?;
        self.switches.validate()?;
        self.validate_sides()?;
        self.pipeline.validate()?;
        if let Some(pt) = &self.pipeline.pass_through {
            if !self.sides.iter().any(|s| s.name == pt.side) {
                return Err(ConfigError::new(
                    "pipeline.pass_through.side",
                    format!("`{}` is not a configured side name, e.g. `kafka`", pt.side),
                ));
            }
            pt.validate()?;
        }
        self.dead_letters.validate()?;
        self.admin.validate()?;
        self.sink.validate()?;
        self.parity.validate()?;
        self.log.validate()?;
        Ok(Validated(self))
    }

    /// `WAIT` for replicas against the Redis it runs on: not on a Cluster, and answered before
    /// the reply times out.
    fn validate_replication(&self) -> Result<(), ConfigError> {
        let a = &self.arbiter;
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
        Ok(())
    }

    /// Each side on its own, then the names against each other and against `[cutover]`.
    fn validate_sides(&self) -> Result<(), ConfigError> {
        if self.sides.is_empty() {
            return Err(ConfigError::new(
                "side",
                "no sides configured: add `[[side]]` tables for the old and the new broker",
            ));
        }
        let mut names = HashSet::new();
        for (i, side) in self.sides.iter().enumerate() {
            side.validate_name(i)?;
            if !names.insert(side.name.as_str()) {
                return Err(ConfigError::new(
                    format!("side[{i}].name"),
                    format!("`{}` names two sides; side names must be unique", side.name),
                ));
            }
            side.validate(i)?;
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
            if let Some(r) = side.rocketmq.as_ref().filter(|r| r.secret_key.is_some()) {
                out.push(format!(
                    "side[{i}].rocketmq.secret_key{}",
                    from(r.secret_key_file.as_deref())
                ));
            }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
    fn side_outside_the_cutover_is_rejected() {
        let extra = "\n[[side]]\nname = \"third\"\nkind = \"kafka\"\nmessage_id = { header = \"m\" }\nbusiness_id = { header = \"b\" }\n[side.kafka]\nbootstrap_servers = \"x:1\"\ntopics = [\"t\"]\ngroup_id = \"g\"\n";
        let e = err_of(&format!("{GOOD}{extra}"));
        assert_eq!(e.key, "side[2].name");
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
    fn the_rocketmq_secret_key_is_read_from_its_file_and_never_shown() {
        let body = GOOD.replace(
            "[side.rocketmq]\n",
            "[side.rocketmq]\naccess_key = \"mqc\"\nsecret_key_file = \"DIR/sk\"\n",
        );
        assert_ne!(body, GOOD, "the example has a [side.rocketmq] table");
        let (_dir, path) = with_files(&body, &[("sk", "rmq-sk-1\n")]);
        let c = Config::load_with_env(&path, BTreeMap::new())
            .unwrap()
            .validate()
            .unwrap();
        let r = c.sides[1].rocketmq.as_ref().unwrap();
        assert_eq!(r.secret_key.as_ref().unwrap().expose(), "rmq-sk-1");
        let listed = c.secret_keys();
        assert!(
            listed
                .iter()
                .any(|k| k.starts_with("side[1].rocketmq.secret_key (file ")),
            "{listed:?}"
        );
        let shown = format!(
            "{c:?}{}{}",
            serde_json::to_string(&*c).unwrap(),
            listed.join(",")
        );
        assert!(!shown.contains("rmq-sk-1"), "{shown}");
        // Both ways at once is refused, naming both keys.
        let body = body.replace(
            "access_key = \"mqc\"\n",
            "access_key = \"mqc\"\nsecret_key = \"x\"\n",
        );
        let (_dir, path) = with_files(&body, &[("sk", "rmq-sk-1")]);
        let e = Config::load_with_env(&path, BTreeMap::new()).unwrap_err();
        assert_eq!(e.key, "side[1].rocketmq.secret_key_file");
        assert!(e.problem.contains("`side[1].rocketmq.secret_key`"), "{e}");
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
}
