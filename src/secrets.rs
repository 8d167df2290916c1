//! Secrets in the configuration: the [`Secret`] string that never shows in `Debug`, logs or
//! serialized output, the `*_file` forms that read a secret from a file at load time (a mounted
//! Kubernetes Secret), and the redaction of credentials inside URLs.
//!
//! A secret comes from exactly one place: the file (`redis.password`), the environment
//! (`MQ_CUTOVER__REDIS__PASSWORD`, which overrides the file like any key), or a file named by the
//! `*_file` form (`redis.password_file`). Giving the value and the file form together is refused,
//! naming both keys, so that nobody wonders which one is used.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::settings::ConfigError;

/// What every redacted value shows instead of itself.
pub const REDACTED: &str = "***";

/// A string that never shows in `Debug`, `Serialize` output or logs; [`Secret::expose`] hands it
/// to the client library that needs it.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for handing to the client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{REDACTED}\"")
    }
}

impl Serialize for Secret {
    // Serialized config (a dump, a status document) must not carry the secret either.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

/// Reads the secret in `path` for the config key `key` (`redis.password_file`): the whole file,
/// less trailing line breaks (as `kubectl create secret --from-file` and editors leave them).
/// An unreadable, non-UTF-8 or empty file is an error naming the key and the path, never the
/// content.
pub fn read_secret_file(key: &str, path: &Path) -> Result<Secret, ConfigError> {
    let bytes = std::fs::read(path).map_err(|e| {
        ConfigError::new(
            key,
            format!("cannot read the secret file `{}`: {e}", path.display()),
        )
    })?;
    let text = String::from_utf8(bytes).map_err(|_| {
        ConfigError::new(
            key,
            format!("the secret file `{}` is not UTF-8 text", path.display()),
        )
    })?;
    let value = text.trim_end_matches(['\n', '\r']);
    if value.is_empty() {
        return Err(ConfigError::new(
            key,
            format!("the secret file `{}` is empty", path.display()),
        ));
    }
    Ok(Secret(value.to_owned()))
}

/// Fills `value` (config key `key`) from the file `file` (config key `file_key`) when one is
/// named. Refuses both at once.
pub fn fill_from_file(
    key: &str,
    value: &mut Option<Secret>,
    file_key: &str,
    file: Option<&Path>,
) -> Result<(), ConfigError> {
    let Some(path) = file else {
        return Ok(());
    };
    if value.is_some() {
        return Err(both(key, file_key));
    }
    *value = Some(read_secret_file(file_key, path)?);
    Ok(())
}

/// The error for a secret given both as a value and as a file.
pub fn both(key: &str, file_key: &str) -> ConfigError {
    ConfigError::new(
        file_key,
        format!(
            "`{key}` is set too (in the file or the environment): give the secret one way, \
             either `{key}` or `{file_key}`"
        ),
    )
}

/// `url` with the password of its user info (`redis://user:pw@host`) replaced by `***`, for
/// printing.
pub fn redact_url(url: &str) -> String {
    // By text, not through a URL parser: everything between `://` and the last `@` counts as the
    // user information, so a password holding `/`, `@` or anything a parser would take for a
    // host is masked whole (failing safe: on a URL with an `@` further on, more is masked).
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let Some(at) = url[scheme_end..].rfind('@').map(|i| scheme_end + i) else {
        return url.to_owned();
    };
    match url[scheme_end..at].find(':') {
        Some(colon) => format!("{}:{REDACTED}{}", &url[..scheme_end + colon], &url[at..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_shows_in_debug_or_serialized_output() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "\"***\"");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"***\"");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn a_secret_file_loses_its_trailing_line_break_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, " pa ss\r\n\n").unwrap();
        assert_eq!(read_secret_file("k_file", &p).unwrap().expose(), " pa ss");
    }

    #[test]
    fn an_empty_or_missing_secret_file_names_the_key_and_path_but_no_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "\n").unwrap();
        let e = read_secret_file("redis.password_file", &p).unwrap_err();
        assert_eq!(e.key, "redis.password_file");
        assert!(
            e.problem.contains("is empty") && e.problem.contains("pw"),
            "{e}"
        );
        let e = read_secret_file("admin.token_file", &dir.path().join("nope")).unwrap_err();
        assert_eq!(e.key, "admin.token_file");
        assert!(e.problem.contains("nope"), "{e}");
    }

    #[test]
    fn value_and_file_together_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "x").unwrap();
        let mut v = Some(Secret::new("y"));
        let e =
            fill_from_file("redis.password", &mut v, "redis.password_file", Some(&p)).unwrap_err();
        assert_eq!(e.key, "redis.password_file");
        let mut v = None;
        fill_from_file("redis.password", &mut v, "redis.password_file", Some(&p)).unwrap();
        assert_eq!(v.unwrap().expose(), "x");
    }

    #[test]
    fn credentials_in_urls_are_redacted() {
        assert_eq!(
            redact_url("rediss://mqc:s3cret@127.0.0.1:6380/0"),
            "rediss://mqc:***@127.0.0.1:6380/0"
        );
        assert_eq!(
            redact_url("redis://:s3cret@127.0.0.1:6379"),
            "redis://:***@127.0.0.1:6379"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(redact_url("redis://a:b@[bad"), "redis://a:***@[bad");
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
            assert_eq!(redact_url(url), shown);
        }
    }
}
