//! `[admin]`: where the admin listener serves, the tokens of its API and the hosts it answers
//! to, with the rules a token must meet.

use std::collections::HashSet;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::secrets::Secret;
use crate::settings::{placeholder, ConfigError};

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

impl AdminConfig {
    /// Checks the tokens and the allowed hosts; errors never show a token.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let a = self;
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::parse_section;

    const OPERATOR: &str = "9f1c2e7a4b6d8f0a1c3e5b7d9f2a4c6e";
    const VIEWER: &str = "0b8d6f4a2c1e3b5d7f9a8c6e4b2d0f1a";

    /// The `[admin]` table made of `lines`, checked.
    fn admin(lines: &str) -> Result<AdminConfig, ConfigError> {
        let a: AdminConfig = parse_section(lines).unwrap();
        a.validate().map(|()| a)
    }

    #[test]
    fn good_tokens_are_accepted() {
        let c = admin(&format!(
            "token = \"{OPERATOR}\"\nviewer_token = \"{VIEWER}\""
        ))
        .unwrap();
        assert_eq!(c.token.as_ref().unwrap().expose(), OPERATOR);
        assert_eq!(c.viewer_token.as_ref().unwrap().expose(), VIEWER);
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
        assert_eq!(c.allowed_hosts.len(), 3);
        admin("allowed_hosts = [\"*\"]").unwrap();
        for bad in ["", "*.example.net", "http://x", "a b", "x/y"] {
            let e = admin(&format!("allowed_hosts = [\"ok\", \"{bad}\"]")).unwrap_err();
            assert_eq!(e.key, "admin.allowed_hosts[1]", "{bad}");
        }
    }
}
