//! TLS material named in the configuration, shared by Redis (`[redis.tls]`) and the HTTP sink
//! (`[sink.tls]`): a CA bundle to trust instead of the system's roots, and an optional client
//! certificate with its key for mutual TLS. All PEM files.
//!
//! [`TlsFiles::check`] is part of validation (the files exist; a certificate comes with its key);
//! [`TlsFiles::read`] reads them when the client is built. The key's bytes never show in `Debug`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::settings::ConfigError;

/// `[redis.tls]` / `[sink.tls]`: PEM files for TLS connections.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The CA certificate(s) to trust, PEM; when set, only servers whose certificate chains to
    /// one of them are accepted (the system's roots are not used).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// This client's certificate (chain), PEM, for servers that require mutual TLS; needs
    /// `key_file`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// The private key of `cert_file`, PEM (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// The contents of [`TlsFiles`], read.
#[derive(Clone, Default)]
pub struct TlsMaterial {
    /// The CA bundle, PEM.
    pub ca: Option<Vec<u8>>,
    /// The client certificate (PEM) and its key (PEM).
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca", &self.ca.as_ref().map(Vec::len))
            .field("client", &self.client.as_ref().map(|_| "cert and key"))
            .finish()
    }
}

impl TlsFiles {
    /// Checks, without reading them, that each named file exists and that a client certificate
    /// comes with its key; `section` is the table's key (`redis.tls`).
    pub fn check(&self, section: &str) -> Result<(), ConfigError> {
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => {
                return Err(ConfigError::new(
                    format!("{section}.key_file"),
                    "a client certificate (cert_file) needs its private key, e.g. `key_file = \"/etc/mq-cutover/tls/client.key\"`",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    format!("{section}.cert_file"),
                    "a private key (key_file) needs its certificate, e.g. `cert_file = \"/etc/mq-cutover/tls/client.pem\"`",
                ))
            }
            _ => {}
        }
        for (name, path) in self.named() {
            exists(&format!("{section}.{name}"), path)?;
        }
        Ok(())
    }

    /// Whether any file is named.
    pub fn is_empty(&self) -> bool {
        self.named().next().is_none()
    }

    /// Reads the files (errors name the key and the path).
    pub fn read(&self, section: &str) -> Result<TlsMaterial, ConfigError> {
        let read = |name: &str, path: &Path| {
            std::fs::read(path).map_err(|e| {
                ConfigError::new(
                    format!("{section}.{name}"),
                    format!("cannot read `{}`: {e}", path.display()),
                )
            })
        };
        let ca = self
            .ca_file
            .as_deref()
            .map(|p| read("ca_file", p))
            .transpose()?;
        let client = match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => Some((read("cert_file", c)?, read("key_file", k)?)),
            _ => None,
        };
        Ok(TlsMaterial { ca, client })
    }

    fn named(&self) -> impl Iterator<Item = (&'static str, &Path)> {
        [
            ("ca_file", &self.ca_file),
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
        ]
        .into_iter()
        .filter_map(|(n, p)| p.as_deref().map(|p| (n, p)))
    }
}

/// `path` (the value of config key `key`) is an existing regular file.
pub fn exists(key: &str, path: &Path) -> Result<(), ConfigError> {
    if path.is_file() {
        return Ok(());
    }
    let why = if path.exists() {
        "is not a regular file"
    } else {
        "does not exist"
    };
    Err(ConfigError::new(key, format!("`{}` {why}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_without_its_key_and_a_missing_file_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "x").unwrap();
        let mut t = TlsFiles {
            ca_file: Some(ca.clone()),
            ..Default::default()
        };
        t.check("redis.tls").unwrap();
        t.cert_file = Some(ca.clone());
        assert_eq!(t.check("redis.tls").unwrap_err().key, "redis.tls.key_file");
        t.key_file = Some(dir.path().join("gone.key"));
        let e = t.check("sink.tls").unwrap_err();
        assert_eq!(e.key, "sink.tls.key_file");
        assert!(
            e.problem.contains("gone.key") && e.problem.contains("does not exist"),
            "{e}"
        );
        t.key_file = Some(dir.path().to_path_buf());
        assert!(t
            .check("sink.tls")
            .unwrap_err()
            .problem
            .contains("not a regular file"));
    }

    #[test]
    fn the_key_never_shows_in_debug() {
        let m = TlsMaterial {
            ca: Some(b"ca".to_vec()),
            client: Some((b"cert".to_vec(), b"PRIVATE KEY".to_vec())),
        };
        assert!(!format!("{m:?}").contains("PRIVATE"));
    }
}
