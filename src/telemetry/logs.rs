//! Log output: human text or one JSON object per line, filtered by `log.level` (or `RUST_LOG`),
//! with the RocketMQ client's chatter held to warnings.

use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;

use crate::settings::{named_choices, ConfigError};

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

named_choices!(LogFormat { Text = "text", Json = "json" });

impl LogConfig {
    /// Refuses a level that is not a tracing filter.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.level.trim().is_empty() || EnvFilter::try_new(&self.level).is_err() {
            return Err(ConfigError::new(
                "log.level",
                format!(
                    "`{}` is not a log filter, e.g. `info` or `mq_cutover=debug,info`",
                    self.level
                ),
            ));
        }
        Ok(())
    }
}

/// The RocketMQ client logs every connection step and every offset it persists at info (up to
/// five lines a second per queue at the source's commit interval); keep it to warnings unless
/// the configured filter says something about it.
fn quiet_clients(level: &str) -> String {
    if level.contains("rocketmq_") {
        level.to_owned()
    } else {
        format!(
            "{level},rocketmq_client_rust=warn,rocketmq_transport=warn,rocketmq_runtime=warn,\
             rocketmq_protocol=warn,rocketmq_model=warn,rocketmq_auth=warn"
        )
    }
}

/// Installs the global subscriber; logs go to stderr so that command output stays clean.
pub fn init(cfg: &LogConfig) {
    let wanted = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| cfg.level.clone());
    let filter = EnvFilter::try_new(quiet_clients(&wanted))
        .unwrap_or_else(|_| EnvFilter::new(quiet_clients(&cfg.level)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    // A second init (tests) is harmless: the first subscriber stays.
    let _ = match cfg.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rocketmq_client_is_held_to_warnings_unless_the_filter_names_it() {
        let quiet = quiet_clients("info");
        assert!(
            quiet.starts_with("info,rocketmq_client_rust=warn,"),
            "{quiet}"
        );
        assert!(EnvFilter::try_new(&quiet).is_ok());
        assert_eq!(
            quiet_clients("info,rocketmq_client_rust=debug"),
            "info,rocketmq_client_rust=debug"
        );
        // Our own module path names rocketmq too, but not a client crate.
        assert!(quiet_clients("mq_cutover::source::rocketmq=debug").contains("=warn"));
    }

    #[test]
    fn bad_log_level_is_rejected() {
        let cfg = LogConfig {
            level: "=[".into(),
            ..LogConfig::default()
        };
        assert_eq!(cfg.validate().unwrap_err().key, "log.level");
        LogConfig::default().validate().unwrap();
    }
}
