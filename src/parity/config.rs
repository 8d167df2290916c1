//! `[parity]`: how the dual-read check counts and how long it remembers.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::settings::ConfigError;

/// `[parity]`: how the dual-read check counts and how long it remembers.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ParityConfig {
    /// Record sights at all (one Redis call per side every 250 ms).
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// How long an id may be seen by one side only before it counts as a gap: longer than the
    /// usual lag between the two sides' consumers.
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub grace: Duration,
    /// Most one-sided ids listed per side; beyond it they are counted, not listed.
    #[serde(default = "default_max_open_ids")]
    pub max_open_ids: u64,
    /// How long the per-minute counts are kept.
    #[serde(default = "default_minute_retention", with = "humantime_serde")]
    pub minute_retention: Duration,
    /// How long the per-day counts are kept.
    #[serde(default = "default_day_retention", with = "humantime_serde")]
    pub day_retention: Duration,
    /// How often the gap metrics are read from Redis.
    #[serde(default = "default_refresh", with = "humantime_serde")]
    pub refresh: Duration,
}

fn default_enabled() -> bool {
    true
}
fn default_grace() -> Duration {
    Duration::from_secs(300)
}
fn default_max_open_ids() -> u64 {
    100_000
}
fn default_minute_retention() -> Duration {
    Duration::from_secs(2 * 86_400)
}
fn default_day_retention() -> Duration {
    Duration::from_secs(35 * 86_400)
}
fn default_refresh() -> Duration {
    Duration::from_secs(15)
}

impl Default for ParityConfig {
    fn default() -> Self {
        Self {
            enabled: default_enabled(),
            grace: default_grace(),
            max_open_ids: default_max_open_ids(),
            minute_retention: default_minute_retention(),
            day_retention: default_day_retention(),
            refresh: default_refresh(),
        }
    }
}

impl ParityConfig {
    /// Checks the values; errors name the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let problem = |key: &str, p: &str| ConfigError {
            key: format!("parity.{key}"),
            problem: p.to_owned(),
        };
        if self.grace.is_zero() {
            return Err(problem("grace", "must be more than zero, e.g. `5m`"));
        }
        if self.max_open_ids == 0 || self.max_open_ids > 10_000_000 {
            return Err(problem(
                "max_open_ids",
                "must be within 1..=10000000, e.g. `100000`",
            ));
        }
        if self.minute_retention < Duration::from_secs(3_600) {
            return Err(problem("minute_retention", "must be at least `1h`"));
        }
        if self.day_retention < Duration::from_secs(86_400) {
            return Err(problem("day_retention", "must be at least `1d`"));
        }
        if self.refresh.is_zero() {
            return Err(problem("refresh", "must be more than zero, e.g. `15s`"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_validate_and_bad_values_name_the_key() {
        assert!(ParityConfig::default().validate().is_ok());
        let bad = ParityConfig {
            max_open_ids: 0,
            ..ParityConfig::default()
        };
        assert_eq!(bad.validate().unwrap_err().key, "parity.max_open_ids");
        let bad = ParityConfig {
            grace: Duration::ZERO,
            ..ParityConfig::default()
        };
        assert_eq!(bad.validate().unwrap_err().key, "parity.grace");
    }
}
