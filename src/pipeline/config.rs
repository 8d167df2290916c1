//! `[pipeline]`: how copies move from the sources through the arbiter to the sink — batch
//! sizes, in-flight limits, memory bounds, the shutdown deadline — and the measurement-only
//! pass-through mode.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::settings::{positive, ConfigError};

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

impl PipelineConfig {
    /// Checks the limits, the timeouts and the memory bounds against each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let p = self;
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
        let shortest = crate::source::stall::LAG_INTERVAL * 2;
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
        Ok(())
    }
}

impl PassThroughConfig {
    /// Refuses the mode unless it was asked for explicitly; whether the side exists is the whole
    /// file's check.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.measurement_only {
            return Err(ConfigError::new(
                "pipeline.pass_through.measurement_only",
                "pass-through forwards every copy without arbitration (duplicates included): \
                 it is for benchmarks only; set `measurement_only = true` to ask for it",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::parse_section;

    /// The `[pipeline]` table made of `lines`, checked.
    fn validated(lines: &str) -> Result<PipelineConfig, ConfigError> {
        let p: PipelineConfig = parse_section(lines).unwrap();
        p.validate().map(|()| p)
    }

    fn err_of(lines: &str) -> ConfigError {
        validated(lines).expect_err("must be refused")
    }

    #[test]
    fn zero_claim_batch_is_rejected() {
        let e = err_of("claim_batch = 0\n");
        assert_eq!(e.key, "pipeline.claim_batch");
    }

    #[test]
    fn stall_after_defaults_to_a_minute_and_must_span_two_lag_measurements() {
        let cfg = validated("").unwrap();
        assert_eq!(cfg.stall_after, Duration::from_secs(60));
        for bad in ["0s", "9s"] {
            let e = err_of(&format!("stall_after = \"{bad}\"\n"));
            assert_eq!(e.key, "pipeline.stall_after");
            assert!(e.problem.contains("10s"), "{}", e.problem);
        }
        let cfg = validated("stall_after = \"10s\"\n").unwrap();
        assert_eq!(cfg.stall_after, Duration::from_secs(10));
    }

    #[test]
    fn claims_in_flight_defaults_to_two_and_is_bounded() {
        let cfg = validated("").unwrap();
        assert_eq!(cfg.claims_in_flight, 2);
        for bad in [0, 17] {
            let e = err_of(&format!("claims_in_flight = {bad}\n"));
            assert_eq!(e.key, "pipeline.claims_in_flight");
            assert!(e.to_string().contains("outside 1..=16"), "{e}");
        }
    }

    #[test]
    fn max_message_bytes_defaults_to_4_mib_and_is_bounded() {
        let cfg = validated("").unwrap();
        assert_eq!(cfg.max_message_bytes, 4 * 1024 * 1024);
        for bad in ["0", "1023", "268435457"] {
            let e = err_of(&format!("max_message_bytes = {bad}\n"));
            assert_eq!(e.key, "pipeline.max_message_bytes", "{bad}");
            assert!(e.problem.contains("outside"), "{e}");
        }
        let cfg =
            validated("max_message_bytes = 268435456\nmax_buffered_bytes = 268435456\n").unwrap();
        assert_eq!(cfg.max_message_bytes, MAX_MESSAGE_BYTES_LIMIT);
    }

    #[test]
    fn max_buffered_bytes_defaults_to_64_mib_and_holds_the_largest_message() {
        let cfg = validated("").unwrap();
        assert_eq!(cfg.max_buffered_bytes, 64 * 1024 * 1024);
        for lines in [
            "max_buffered_bytes = 4194303",
            "max_message_bytes = 8388608\nmax_buffered_bytes = 4194304",
            "max_buffered_bytes = 68719476737",
        ] {
            let e = err_of(lines);
            assert_eq!(e.key, "pipeline.max_buffered_bytes", "{lines}");
            assert!(e.problem.contains("pipeline.max_message_bytes"), "{e}");
        }
        let cfg = validated("max_message_bytes = 65536\nmax_buffered_bytes = 65536\n").unwrap();
        assert_eq!(cfg.max_buffered_bytes, 65536);
    }

    #[test]
    fn pass_through_is_refused_without_the_measurement_flag() {
        let pt: PassThroughConfig = parse_section("side = \"kafka\"").unwrap();
        let e = pt.validate().unwrap_err();
        assert_eq!(e.key, "pipeline.pass_through.measurement_only");
        let pt: PassThroughConfig =
            parse_section("side = \"kafka\"\nmeasurement_only = true").unwrap();
        pt.validate().unwrap();
    }
}
