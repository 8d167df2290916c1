//! `[redis]`: the server, cluster or Sentinel-watched primary that holds the arbitration state
//! and the switches, and how to reach it.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::secrets::{redact_url, Secret};
use crate::settings::{named_choices, placeholder, positive, ConfigError};
use crate::tls::TlsFiles;

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

named_choices!(RedisMode {
    Standalone = "standalone",
    Cluster = "cluster",
    Sentinel = "sentinel",
});

impl RedisConfig {
    /// Checks the URLs against the mode, the key prefix, the password and the TLS files (that
    /// they exist; they are read when the store connects).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let r = self;
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
        let r = self;
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::parse_section;

    const GOOD: &str = "urls = [\"redis://127.0.0.1:6379\"]\n";

    fn err_of(toml: &str) -> ConfigError {
        let r: RedisConfig = parse_section(toml).unwrap();
        r.validate().expect_err("must be refused")
    }

    fn with(replace: &str, by: &str) -> String {
        assert!(GOOD.contains(replace), "test fixture lacks {replace:?}");
        GOOD.replacen(replace, by, 1)
    }

    #[test]
    fn good_redis_section_validates_with_defaults() {
        let r: RedisConfig = parse_section(GOOD).unwrap();
        r.validate().unwrap();
        assert_eq!(r.mode, RedisMode::Standalone);
        assert_eq!(r.key_prefix, "mqc");
        assert_eq!(r.connect_timeout, Duration::from_secs(2));
        assert_eq!(r.response_timeout, Duration::from_secs(1));
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
        let e = err_of(&format!("{GOOD}key_prefix = \"{{x}}\"\n"));
        assert_eq!(e.key, "redis.key_prefix");
    }

    #[test]
    fn a_placeholder_redis_password_is_refused() {
        let e = err_of(&format!("{GOOD}password = \"REPLACE-ME\"\n"));
        assert_eq!(e.key, "redis.password");
        assert!(!e.to_string().contains("REPLACE-ME"), "{e}");
    }

    #[test]
    fn redis_tls_files_must_exist_and_need_a_rediss_url() {
        let e = err_of(&format!(
            "{GOOD}tls = {{ ca_file = \"/nonexistent/ca.pem\" }}\n"
        ));
        assert_eq!(e.key, "redis.tls.ca_file");
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "x").unwrap();
        let e = err_of(&format!(
            "{GOOD}tls = {{ ca_file = \"{}\" }}\n",
            ca.display()
        ));
        assert_eq!(e.key, "redis.tls");
        assert!(e.problem.contains("rediss://"), "{e}");
    }
}
