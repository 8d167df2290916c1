//! The check of a Kafka side's security settings (`security.protocol`, `sasl.*`, `ssl.*` in
//! `[side.kafka.properties]`), run by `check-config` and at start: every missing or
//! contradictory piece is explained in one line naming the property, before librdkafka would
//! fail with a connection error (or, worse, silently connect without the credentials).
//!
//! No network I/O: the only look outside the config is whether the named certificate and key
//! files exist.

use std::collections::BTreeMap;
use std::path::Path;

use crate::settings::ConfigError;

/// The SASL mechanisms librdkafka implements (built with `ssl` and `sasl`).
pub const MECHANISMS: &[&str] = &[
    "SCRAM-SHA-512",
    "SCRAM-SHA-256",
    "PLAIN",
    "OAUTHBEARER",
    "GSSAPI",
];

/// librdkafka's `security.protocol` values, as it spells them in its docs.
const PROTOCOLS: &[&str] = &["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"];

/// Properties naming files librdkafka reads at start (`ssl.ca.location` may be a directory).
const FILE_PROPERTIES: &[&str] = &[
    "ssl.ca.location",
    "ssl.certificate.location",
    "ssl.key.location",
    "ssl.keystore.location",
    "ssl.crl.location",
];

/// What a side's properties ask for, as the check and the summary of `check-config` see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Security {
    /// `PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL`.
    pub protocol: &'static str,
    /// The SASL mechanism, for the SASL protocols.
    pub mechanism: Option<String>,
}

impl Security {
    /// Whether TLS is on.
    pub fn tls(&self) -> bool {
        self.protocol.ends_with("SSL")
    }

    /// Whether SASL is on.
    pub fn sasl(&self) -> bool {
        self.protocol.starts_with("SASL")
    }
}

/// Checks the security settings of side `index`'s `properties` (secrets read from files are in
/// them already); errors name the property as `side[0].kafka.properties."sasl.password"`.
pub fn check(index: usize, properties: &BTreeMap<String, String>) -> Result<Security, ConfigError> {
    let key = |name: &str| format!("side[{index}].kafka.properties.\"{name}\"");
    let get = |name: &str| value(properties, name);
    let protocol = match get("security.protocol") {
        None => "PLAINTEXT",
        Some(p) => PROTOCOLS
            .iter()
            .copied()
            .find(|known| known.eq_ignore_ascii_case(p))
            .ok_or_else(|| {
                ConfigError::new(
                    key("security.protocol"),
                    format!("`{p}` is not one of: {}", PROTOCOLS.join(", ")),
                )
            })?,
    };
    let mut security = Security {
        protocol,
        mechanism: None,
    };
    let mechanism_key = match (get("sasl.mechanism"), get("sasl.mechanisms")) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                key("sasl.mechanisms"),
                "`sasl.mechanism` is set too (they are one setting): keep `sasl.mechanism`",
            ))
        }
        (_, Some(_)) => "sasl.mechanisms",
        _ => "sasl.mechanism",
    };
    if !security.sasl() {
        // Credentials that would silently not be sent are a mistake, not a choice.
        if let Some(name) = [mechanism_key, "sasl.username", "sasl.password"]
            .into_iter()
            .find(|n| get(n).is_some())
        {
            return Err(ConfigError::new(
                key("security.protocol"),
                format!(
                    "`{name}` is set but security.protocol is {protocol}, so SASL is off and it \
                     would not be used: set `\"security.protocol\" = \"{}\"`",
                    if security.tls() {
                        "SASL_SSL"
                    } else {
                        "SASL_SSL` (or `SASL_PLAINTEXT"
                    }
                ),
            ));
        }
    } else {
        let mechanism = get(mechanism_key).ok_or_else(|| {
            ConfigError::new(
                key("sasl.mechanism"),
                format!(
                    "security.protocol {protocol} needs a SASL mechanism, one of: {}",
                    MECHANISMS.join(", ")
                ),
            )
        })?;
        let known = MECHANISMS.iter().copied().find(|m| *m == mechanism);
        let Some(mechanism) = known else {
            let hint = match MECHANISMS
                .iter()
                .find(|m| m.eq_ignore_ascii_case(mechanism))
            {
                Some(m) => format!(" (librdkafka wants it in capitals: `{m}`)"),
                None => String::new(),
            };
            return Err(ConfigError::new(
                key(mechanism_key),
                format!(
                    "`{mechanism}` is not a SASL mechanism librdkafka knows{hint}; one of: {}",
                    MECHANISMS.join(", ")
                ),
            ));
        };
        security.mechanism = Some(mechanism.to_owned());
        match mechanism {
            "PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512" => {
                for (name, what) in [("sasl.username", "a user"), ("sasl.password", "a password")] {
                    if get(name).is_none() {
                        return Err(ConfigError::new(
                            key(name),
                            format!(
                                "{mechanism} needs {what}: set `{name}`{}",
                                if name == "sasl.password" {
                                    ", or read it from a file in `[side.kafka.secret_files]`"
                                } else {
                                    ""
                                }
                            ),
                        ));
                    }
                }
            }
            "OAUTHBEARER" => check_oauthbearer(&key, properties)?,
            _ => {}
        }
    }
    for name in FILE_PROPERTIES {
        let Some(path) = get(name) else { continue };
        if !security.tls() {
            return Err(ConfigError::new(
                key(name),
                format!(
                    "is set but security.protocol is {protocol}, so TLS is off and it would not \
                     be used: set `\"security.protocol\" = \"{}\"`",
                    if security.sasl() { "SASL_SSL" } else { "SSL" }
                ),
            ));
        }
        // `probe`: librdkafka looks for the system's CA bundle itself.
        if *name == "ssl.ca.location" && path == "probe" {
            continue;
        }
        let p = Path::new(path);
        let ok = if *name == "ssl.ca.location" {
            p.exists()
        } else {
            p.is_file()
        };
        if !ok {
            return Err(ConfigError::new(
                key(name),
                format!("`{path}` does not exist (or is not a file)"),
            ));
        }
    }
    let has = |name: &str| get(name).is_some();
    if has("ssl.certificate.location") && !has("ssl.key.location") && !has("ssl.key.pem") {
        return Err(ConfigError::new(
            key("ssl.key.location"),
            "a client certificate (ssl.certificate.location) needs its private key: set \
             `ssl.key.location`",
        ));
    }
    Ok(security)
}

/// The trimmed value of property `name`, if set and not blank.
fn value<'a>(properties: &'a BTreeMap<String, String>, name: &str) -> Option<&'a str> {
    properties
        .get(name)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
}

/// OAUTHBEARER: mq-cutover has no token callback of its own, so either librdkafka's OIDC client
/// fetches tokens (`sasl.oauthbearer.method = oidc`) or the unsecured test tokens are asked for.
fn check_oauthbearer(
    key: &dyn Fn(&str) -> String,
    properties: &BTreeMap<String, String>,
) -> Result<(), ConfigError> {
    let get = |name: &str| value(properties, name);
    let oidc = get("sasl.oauthbearer.method").is_some_and(|m| m.eq_ignore_ascii_case("oidc"));
    if !oidc {
        if get("enable.sasl.oauthbearer.unsecure.jwt").is_some_and(|v| v == "true") {
            return Ok(());
        }
        return Err(ConfigError::new(
            key("sasl.oauthbearer.method"),
            "OAUTHBEARER needs `\"sasl.oauthbearer.method\" = \"oidc\"` with \
             `sasl.oauthbearer.token.endpoint.url`, `sasl.oauthbearer.client.id` and \
             `sasl.oauthbearer.client.secret` (mq-cutover fetches no tokens by itself)",
        ));
    }
    let jwt_bearer = get("sasl.oauthbearer.grant.type").is_some_and(|g| g.ends_with(":jwt-bearer"));
    let needed: &[&str] = if jwt_bearer {
        &["sasl.oauthbearer.token.endpoint.url"]
    } else {
        &[
            "sasl.oauthbearer.token.endpoint.url",
            "sasl.oauthbearer.client.id",
            "sasl.oauthbearer.client.secret",
        ]
    };
    if let Some(missing) = needed.iter().find(|n| get(n).is_none()) {
        return Err(ConfigError::new(
            key(missing),
            format!(
                "OAUTHBEARER with the oidc method needs `{missing}`{}",
                if missing.ends_with("secret") {
                    " (or read it from a file in `[side.kafka.secret_files]`)"
                } else {
                    ""
                }
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn refused(pairs: &[(&str, &str)]) -> ConfigError {
        check(0, &props(pairs)).expect_err("accepted")
    }

    #[test]
    fn no_security_settings_mean_plaintext() {
        let s = check(0, &props(&[])).unwrap();
        assert_eq!(s.protocol, "PLAINTEXT");
        assert!(!s.tls() && !s.sasl());
    }

    #[test]
    fn a_complete_sasl_ssl_scram_setting_passes_in_any_letter_case_of_the_protocol() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "x").unwrap();
        let s = check(
            1,
            &props(&[
                ("security.protocol", "sasl_ssl"),
                ("sasl.mechanism", "SCRAM-SHA-512"),
                ("sasl.username", "mqc"),
                ("sasl.password", "pw"),
                ("ssl.ca.location", ca.to_str().unwrap()),
            ]),
        )
        .unwrap();
        assert_eq!(s.protocol, "SASL_SSL");
        assert_eq!(s.mechanism.as_deref(), Some("SCRAM-SHA-512"));
    }

    #[test]
    fn sasl_ssl_without_a_mechanism_names_sasl_mechanism() {
        let e = refused(&[("security.protocol", "SASL_SSL")]);
        assert_eq!(e.key, "side[0].kafka.properties.\"sasl.mechanism\"");
        assert!(e.problem.contains("SCRAM-SHA-512"), "{e}");
    }

    #[test]
    fn scram_without_a_password_names_the_password_and_the_file_form() {
        let e = refused(&[
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-256"),
            ("sasl.username", "u"),
        ]);
        assert_eq!(e.key, "side[0].kafka.properties.\"sasl.password\"");
        assert!(e.problem.contains("secret_files"), "{e}");
        let e = refused(&[
            ("security.protocol", "SASL_PLAINTEXT"),
            ("sasl.mechanism", "PLAIN"),
        ]);
        assert_eq!(e.key, "side[0].kafka.properties.\"sasl.username\"");
    }

    #[test]
    fn an_unknown_mechanism_and_one_in_small_letters_are_explained() {
        let e = refused(&[
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-1"),
        ]);
        assert!(
            e.problem.contains("`SCRAM-SHA-1` is not a SASL mechanism"),
            "{e}"
        );
        let e = refused(&[
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanisms", "scram-sha-512"),
        ]);
        assert_eq!(e.key, "side[0].kafka.properties.\"sasl.mechanisms\"");
        assert!(e.problem.contains("`SCRAM-SHA-512`"), "{e}");
    }

    #[test]
    fn an_unknown_protocol_is_refused() {
        let e = refused(&[("security.protocol", "TLS")]);
        assert_eq!(e.key, "side[0].kafka.properties.\"security.protocol\"");
        assert!(e.problem.contains("SASL_SSL"), "{e}");
    }

    #[test]
    fn credentials_without_sasl_are_refused_rather_than_ignored() {
        let e = refused(&[("sasl.username", "u"), ("sasl.password", "p")]);
        assert_eq!(e.key, "side[0].kafka.properties.\"security.protocol\"");
        assert!(e.problem.contains("SASL is off"), "{e}");
    }

    #[test]
    fn a_missing_ca_file_or_one_without_tls_is_named() {
        let e = refused(&[
            ("security.protocol", "SSL"),
            ("ssl.ca.location", "/nonexistent/ca.pem"),
        ]);
        assert_eq!(e.key, "side[0].kafka.properties.\"ssl.ca.location\"");
        assert!(e.problem.contains("/nonexistent/ca.pem"), "{e}");
        let e = refused(&[("ssl.ca.location", "probe")]);
        assert!(e.problem.contains("TLS is off"), "{e}");
        check(
            0,
            &props(&[("security.protocol", "SSL"), ("ssl.ca.location", "probe")]),
        )
        .unwrap();
    }

    #[test]
    fn a_client_certificate_needs_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        std::fs::write(&cert, "x").unwrap();
        let e = refused(&[
            ("security.protocol", "SSL"),
            ("ssl.certificate.location", cert.to_str().unwrap()),
        ]);
        assert_eq!(e.key, "side[0].kafka.properties.\"ssl.key.location\"");
    }

    #[test]
    fn oauthbearer_needs_the_oidc_client_settings() {
        let base = [
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "OAUTHBEARER"),
        ];
        let e = refused(&base);
        assert_eq!(
            e.key,
            "side[0].kafka.properties.\"sasl.oauthbearer.method\""
        );
        let mut p = base.to_vec();
        p.extend([
            ("sasl.oauthbearer.method", "oidc"),
            ("sasl.oauthbearer.token.endpoint.url", "https://idp/token"),
            ("sasl.oauthbearer.client.id", "mqc"),
        ]);
        let e = refused(&p);
        assert_eq!(
            e.key,
            "side[0].kafka.properties.\"sasl.oauthbearer.client.secret\""
        );
        p.push(("sasl.oauthbearer.client.secret", "s"));
        check(0, &props(&p)).unwrap();
    }
}
