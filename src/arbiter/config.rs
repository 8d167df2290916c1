//! `[arbiter]` and `[switches]`: the claim protocol's knobs, how switches propagate, and the
//! values a new deployment starts from.

use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::settings::{named_choices, ConfigError};

named_choices!(AmbiguousPolicy { AtLeastOnce = "at_least_once", AtMostOnce = "at_most_once" });
named_choices!(RecordLayout { Packed = "packed", Hash = "hash" });

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

impl ArbiterConfig {
    /// Checks the lease, the retention and the adoption delay against each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let a = self;
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
        Ok(())
    }
}

impl SwitchesConfig {
    /// Checks the refresh interval and the starting whitelist.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = self;
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::parse_section;

    #[test]
    fn lease_too_short_is_rejected() {
        let a: ArbiterConfig = parse_section("lease = \"10ms\"").unwrap();
        assert_eq!(a.validate().unwrap_err().key, "arbiter.lease");
    }

    #[test]
    fn percent_parses_from_text() {
        assert_eq!("10".parse::<Percent>().unwrap().get(), 10);
        assert_eq!("100%".parse::<Percent>().unwrap().get(), 100);
        assert!("101".parse::<Percent>().is_err());
        assert!("ten".parse::<Percent>().is_err());
    }
}
