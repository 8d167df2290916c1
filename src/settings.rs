//! What every section of the configuration shares: [`ConfigError`], which names the key it is
//! about, and the small checks each section's `validate()` builds its errors from.
//!
//! Each component owns its section's struct and `validate()` (`store::config` the `[redis]`
//! table, `sink::config` the `[sink]` one, …); `config` loads the file and checks what spans
//! sections. They all depend on this module and it on none of them.

use std::time::Duration;

/// A configuration problem: the key it is about and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config error at `{key}`: {problem}")]
pub struct ConfigError {
    /// The dotted path of the offending key (`redis.urls`, `side[0].kafka.topics`).
    pub key: String,
    /// What is wrong, with an example of a good value where that helps.
    pub problem: String,
}

impl ConfigError {
    /// A problem with `key`.
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// Words that mark a value as a placeholder someone forgot to replace, matched anywhere in the
/// value, ignoring case.
const PLACEHOLDER_MARKS: &[&str] = &[
    "change-me",
    "change_me",
    "changeme",
    "replace-me",
    "replace_me",
    "replaceme",
    "placeholder",
    "example",
    "your-token",
    "your_token",
];

/// Well-known default secrets, matched as the whole value, ignoring case.
const PLACEHOLDER_VALUES: &[&str] = &[
    "secret", "token", "password", "passwd", "admin", "default", "test", "demo", "xxx", "todo",
];

/// Why `value` looks like a placeholder rather than a secret, if it does.
pub fn placeholder(value: &str) -> Option<&'static str> {
    let lower = value.trim().to_ascii_lowercase();
    if lower.is_empty() {
        return Some("it is empty");
    }
    if PLACEHOLDER_VALUES.contains(&lower.as_str()) {
        return Some("it is a well-known default");
    }
    PLACEHOLDER_MARKS
        .iter()
        .any(|m| lower.contains(m))
        .then_some("it is a placeholder (it says to change or replace it)")
}

/// Refuses a zero duration at `key`.
pub fn positive(key: &str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        return Err(ConfigError::new(key, "must be more than zero, e.g. `1s`"));
    }
    Ok(())
}

/// Refuses a blank `v` at `key`, showing `example` as a good value.
pub fn nonempty(key: &str, v: &str, example: &str) -> Result<(), ConfigError> {
    if v.trim().is_empty() {
        return Err(ConfigError::new(
            key,
            format!("must not be empty, e.g. `{example}`"),
        ));
    }
    Ok(())
}

/// Deserializes a unit enum from its snake_case name, listing the choices when the name is
/// unknown (the config crate's own message does not).
macro_rules! named_choices {
    ($ty:ident { $($variant:ident = $name:literal),+ $(,)? }) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                match s.as_str() {
                    $($name => Ok($ty::$variant),)+
                    other => Err(serde::de::Error::custom(format!(
                        "`{other}` is not one of: {}",
                        [$($name),+].join(", ")
                    ))),
                }
            }
        }
    };
}
pub(crate) use named_choices;

/// Parses one section's table the way the config file is read, for the sections' unit tests.
#[cfg(test)]
pub(crate) fn parse_section<T: serde::de::DeserializeOwned>(toml: &str) -> Result<T, String> {
    let v: serde_json::Value = config::Config::builder()
        .add_source(config::File::from_str(toml, config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| e.to_string())?;
    serde_json::from_value(v).map_err(|e| e.to_string())
}
