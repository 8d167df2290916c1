//! `[[side]]`: which broker a side consumes, how it reads the two ids from a message, and its
//! Kafka or RocketMQ consumer settings, with the checks each side passes on its own.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Deref;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::secrets::{Secret, REDACTED};
use crate::settings::{named_choices, nonempty, ConfigError};

named_choices!(SideKind { Kafka = "kafka", Rocketmq = "rocketmq" });

/// One `[[side]]`: a broker consumer and how to read message identity from its messages.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SideConfig {
    /// The side's name, used in `cutover`, in Redis state and in metrics (`[a-z0-9_-]`, ≤ 32).
    pub name: String,
    /// Which broker this side consumes.
    pub kind: SideKind,
    /// Where the cross-broker message id is read from.
    pub message_id: IdSource,
    /// Where the business id (hashed for the percentage, matched by the whitelist) is read from.
    pub business_id: IdSource,
    /// Kafka consumer settings; required when `kind = "kafka"`.
    #[serde(default)]
    pub kafka: Option<KafkaSideConfig>,
    /// RocketMQ consumer settings; required when `kind = "rocketmq"`.
    #[serde(default)]
    pub rocketmq: Option<RocketMqSideConfig>,
}

/// The broker behind a side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SideKind {
    /// Apache Kafka.
    Kafka,
    /// Apache RocketMQ.
    Rocketmq,
}

impl SideKind {
    fn section(self) -> &'static str {
        match self {
            SideKind::Kafka => "kafka",
            SideKind::Rocketmq => "rocketmq",
        }
    }
}

/// Where an id is found in a message: `{ header = "msg-id" }` (a Kafka header or a RocketMQ user
/// property) or `{ json_pointer = "/order/id" }` (RFC 6901, into a JSON body).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum IdSource {
    /// A Kafka header or RocketMQ user property of this name.
    #[serde(alias = "property")]
    Header(String),
    /// A JSON pointer into the message body.
    JsonPointer(String),
}

/// `[side.kafka]`: a Kafka consumer group.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSideConfig {
    /// `host:port[,host:port…]`.
    pub bootstrap_servers: String,
    /// Topics to consume.
    pub topics: Vec<String>,
    /// Consumer group id.
    pub group_id: String,
    /// Any further librdkafka property, passed through as is (`security.protocol`,
    /// `sasl.mechanism`, `ssl.ca.location`, …), except those the source sets itself and relies
    /// on ([`refused_kafka_property`]). Secret ones show as `***`.
    #[serde(default)]
    pub properties: KafkaProperties,
    /// `[side.kafka.secret_files]`: librdkafka properties whose values are read from files at
    /// load time (`"sasl.password" = "/etc/mq-cutover/secrets/kafka-password"`); a property is
    /// given here or in `properties`, not both.
    #[serde(default)]
    pub secret_files: BTreeMap<String, PathBuf>,
}

/// librdkafka properties whose values are secrets: the ones librdkafka itself marks sensitive
/// (and redacts in its own logs).
pub const KAFKA_SECRET_PROPERTIES: &[&str] = &[
    "sasl.username",
    "sasl.password",
    "sasl.oauthbearer.config",
    "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.assertion.private.key.passphrase",
    "sasl.oauthbearer.assertion.private.key.pem",
    "ssl.key.password",
    "ssl.key.pem",
    "ssl_key",
    "ssl.keystore.password",
];

/// `[side.kafka.properties]`: librdkafka properties by name. Values of secret properties (those
/// in [`KAFKA_SECRET_PROPERTIES`], and every one read from a file) show as `***` in `Debug` and
/// serialized output. Reads like the map it wraps.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(from = "BTreeMap<String, String>")]
pub struct KafkaProperties {
    values: BTreeMap<String, String>,
    from_files: BTreeSet<String>,
}

impl KafkaProperties {
    /// Whether the value of `key` is a secret.
    pub fn is_secret(&self, key: &str) -> bool {
        KAFKA_SECRET_PROPERTIES.contains(&key) || self.from_files.contains(key)
    }

    /// Sets a property; returns the value it had.
    pub fn insert(&mut self, key: String, value: String) -> Option<String> {
        self.values.insert(key, value)
    }

    /// Sets a property whose value is a secret, whatever its name.
    pub fn insert_secret(&mut self, key: impl Into<String>, value: &Secret) {
        let key = key.into();
        self.from_files.insert(key.clone());
        self.values.insert(key, value.expose().to_owned());
    }

    fn redacted(&self) -> BTreeMap<&str, &str> {
        self.values
            .iter()
            .map(|(k, v)| {
                let v = if self.is_secret(k) { REDACTED } else { v };
                (k.as_str(), v)
            })
            .collect()
    }
}

impl From<BTreeMap<String, String>> for KafkaProperties {
    fn from(values: BTreeMap<String, String>) -> Self {
        KafkaProperties {
            values,
            from_files: BTreeSet::new(),
        }
    }
}

impl FromIterator<(String, String)> for KafkaProperties {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        BTreeMap::from_iter(iter).into()
    }
}

impl Deref for KafkaProperties {
    type Target = BTreeMap<String, String>;
    fn deref(&self) -> &Self::Target {
        &self.values
    }
}

impl<'a> IntoIterator for &'a KafkaProperties {
    type Item = (&'a String, &'a String);
    type IntoIter = std::collections::btree_map::Iter<'a, String, String>;
    fn into_iter(self) -> Self::IntoIter {
        self.values.iter()
    }
}

impl fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.redacted()).finish()
    }
}

impl Serialize for KafkaProperties {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.redacted())
    }
}

/// librdkafka consumer properties the Kafka side sets itself and depends on, each with why a
/// `[side.kafka.properties]` entry may not change it.
const MANAGED_KAFKA_PROPERTIES: &[(&str, &str)] = &[
    ("bootstrap.servers", "set it with `bootstrap_servers`"),
    (
        "metadata.broker.list",
        "an alias of bootstrap.servers: set `bootstrap_servers`",
    ),
    ("group.id", "set it with `group_id`"),
    (
        "enable.auto.commit",
        "the source stores each offset once its copy's fate is recorded, and librdkafka's \
         auto-commit sends what is stored (docs/kafka.md)",
    ),
    (
        "auto.commit.enable",
        "a legacy alias of enable.auto.commit, which the source manages",
    ),
    (
        "enable.auto.offset.store",
        "only the source may store offsets: librdkafka would store the offset of every record \
         as soon as it is read, before its fate is recorded, and a crash would skip it",
    ),
    (
        "auto.commit.interval.ms",
        "the source's commit cadence bounds redelivery after a crash; 0 would turn commits off",
    ),
    (
        "enable.partition.eof",
        "the consume loop takes every event from the consumer as a record or an error",
    ),
    (
        "offset.store.method",
        "offsets are committed to the group, never to a file or nowhere",
    ),
    (
        "offset.store.path",
        "offsets are committed to the group, never to a file",
    ),
    (
        "offset.store.sync.interval.ms",
        "offsets are committed to the group, never to a file",
    ),
    (
        "plugin.library.paths",
        "it loads native code into the daemon; the source uses no plugin",
    ),
];

/// Why the Kafka source refuses `[side.kafka.properties]` key `key`, if it does: a property it
/// sets itself and relies on. Others (security, timeouts, `auto.offset.reset`, `client.id`, the
/// assignment strategy) pass through to librdkafka, which checks them.
pub fn refused_kafka_property(key: &str) -> Option<&'static str> {
    let key = key.trim();
    MANAGED_KAFKA_PROPERTIES
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, why)| *why)
}

/// `[side.rocketmq]`: a RocketMQ consumer group in cluster mode.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RocketMqSideConfig {
    /// Name server address(es), `host:port[;host:port…]`.
    pub name_server: String,
    /// Topic to consume.
    pub topic: String,
    /// Tag expression, `*` or `tagA || tagB`.
    #[serde(default = "default_tag_expression")]
    pub tag_expression: String,
    /// Consumer group.
    pub group: String,
    /// ACL access key (RocketMQ 5 ACL 2.0: the user name); set together with `secret_key`.
    #[serde(default)]
    pub access_key: Option<String>,
    /// ACL secret key (ACL 2.0: the user's password). Prefer `secret_key_file` over writing it
    /// in the file: `[[side]]` is a list, which no environment variable can address. Never
    /// logged.
    #[serde(default)]
    pub secret_key: Option<Secret>,
    /// A file holding `secret_key` (a mounted Kubernetes Secret), read at start; its trailing
    /// line break is dropped. Not together with `secret_key`.
    #[serde(default)]
    pub secret_key_file: Option<std::path::PathBuf>,
    /// Namespace the topic and group live in (cloud instances, shared clusters); the broker
    /// sees `namespace%topic`. Absent: none.
    #[serde(default)]
    pub namespace: Option<String>,
    /// TLS to the name servers and brokers (the broker's `tls.server.mode` is `enforcing` or
    /// `permissive`).
    #[serde(default)]
    pub tls: bool,
    /// PEM file of the CA(s) that signed the brokers' certificates; absent: the system's roots.
    #[serde(default)]
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate, for brokers that ask for one (`tls.server.need.client.auth`);
    /// set together with `tls_key_file`.
    #[serde(default)]
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// PEM private key of `tls_cert_file` (PKCS#8, PKCS#1 or SEC1, unencrypted).
    #[serde(default)]
    pub tls_key_file: Option<std::path::PathBuf>,
}

impl RocketMqSideConfig {
    /// A plain (no ACL, no TLS, no namespace) consumer of `topic` in `group`, every tag.
    pub fn plain(name_server: &str, topic: &str, group: &str) -> RocketMqSideConfig {
        RocketMqSideConfig {
            name_server: name_server.to_owned(),
            topic: topic.to_owned(),
            tag_expression: default_tag_expression(),
            group: group.to_owned(),
            access_key: None,
            secret_key: None,
            secret_key_file: None,
            namespace: None,
            tls: false,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

fn default_tag_expression() -> String {
    "*".to_owned()
}

/// ACL keys in pairs, a namespace RocketMQ accepts, TLS files only with `tls = true` (no I/O:
/// the files are read when the side starts).
fn validate_rocketmq_security(
    at: &dyn Fn(&str) -> String,
    r: &RocketMqSideConfig,
) -> Result<(), ConfigError> {
    match (&r.access_key, &r.secret_key) {
        (Some(_), None) => {
            return Err(ConfigError::new(
                at("rocketmq.secret_key"),
                "access_key is set but secret_key is not: ACL needs both (ACL 2.0: user name and password)",
            ))
        }
        (None, Some(_)) => {
            return Err(ConfigError::new(
                at("rocketmq.access_key"),
                "secret_key is set but access_key is not: ACL needs both, e.g. `access_key = \"mqc\"`",
            ))
        }
        (Some(ak), Some(sk)) => {
            nonempty(&at("rocketmq.access_key"), ak, "mqc")?;
            if sk.expose().is_empty() {
                return Err(ConfigError::new(
                    at("rocketmq.secret_key"),
                    "must not be empty",
                ));
            }
        }
        (None, None) => {}
    }
    if let Some(ns) = &r.namespace {
        if ns.is_empty()
            || ns.len() > 64
            || !ns
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(ConfigError::new(
                at("rocketmq.namespace"),
                format!("`{ns}` must be 1-64 of `A-Z a-z 0-9 _ -`, e.g. `MQ_INST_1234_abcd`"),
            ));
        }
    }
    for (key, file) in [
        ("rocketmq.tls_ca_file", &r.tls_ca_file),
        ("rocketmq.tls_cert_file", &r.tls_cert_file),
        ("rocketmq.tls_key_file", &r.tls_key_file),
    ] {
        match file {
            Some(path) if !r.tls => {
                return Err(ConfigError::new(
                    at(key),
                    format!(
                        "`{}` is set but tls is false: set `tls = true` or remove it",
                        path.display()
                    ),
                ))
            }
            Some(path) if path.as_os_str().is_empty() => {
                return Err(ConfigError::new(
                    at(key),
                    "must not be empty, e.g. `/etc/mq-cutover/ca.pem`",
                ))
            }
            _ => {}
        }
    }
    match (&r.tls_cert_file, &r.tls_key_file) {
        (Some(_), None) => Err(ConfigError::new(
            at("rocketmq.tls_key_file"),
            "tls_cert_file is set but tls_key_file is not: a client certificate needs its key",
        )),
        (None, Some(_)) => Err(ConfigError::new(
            at("rocketmq.tls_cert_file"),
            "tls_key_file is set but tls_cert_file is not: a client key needs its certificate",
        )),
        _ => Ok(()),
    }
}

fn validate_id_source(key: &str, src: &IdSource) -> Result<(), ConfigError> {
    match src {
        IdSource::Header(h) if h.trim().is_empty() => Err(ConfigError::new(
            key,
            "header name must not be empty, e.g. `{ header = \"msg-id\" }`",
        )),
        IdSource::JsonPointer(p) if !p.starts_with('/') => Err(ConfigError::new(
            key,
            format!("`{p}` is not a JSON pointer; it starts with `/`, e.g. `{{ json_pointer = \"/order/id\" }}`"),
        )),
        _ => Ok(()),
    }
}

impl SideConfig {
    /// Checks the name of side `i` (`[a-z0-9_-]`, ≤ 32); whether it is unique is the whole
    /// file's check.
    pub fn validate_name(&self, i: usize) -> Result<(), ConfigError> {
        if self.name.is_empty()
            || self.name.len() > 32
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            return Err(ConfigError::new(
                format!("side[{i}].name"),
                format!(
                    "`{}` must be 1-32 of `a-z 0-9 _ -`, e.g. `kafka`",
                    self.name
                ),
            ));
        }
        Ok(())
    }

    /// Checks the id sources, that the side has the table of its kind and no other, and that
    /// table's settings; errors name `side[i].…`.
    pub fn validate(&self, i: usize) -> Result<(), ConfigError> {
        let at = |k: &str| format!("side[{i}].{k}");
        validate_id_source(&at("message_id"), &self.message_id)?;
        validate_id_source(&at("business_id"), &self.business_id)?;
        let (present, absent) = match self.kind {
            SideKind::Kafka => (self.kafka.is_some(), self.rocketmq.is_none()),
            SideKind::Rocketmq => (self.rocketmq.is_some(), self.kafka.is_none()),
        };
        if !present {
            return Err(ConfigError::new(
                at(self.kind.section()),
                format!(
                    "kind = \"{0}\" needs a `[side.{0}]` table",
                    self.kind.section()
                ),
            ));
        }
        if !absent {
            return Err(ConfigError::new(
                at("kind"),
                format!(
                    "kind = \"{}\" but the side has a table for the other broker",
                    self.kind.section()
                ),
            ));
        }
        if let Some(k) = &self.kafka {
            nonempty(
                &at("kafka.bootstrap_servers"),
                &k.bootstrap_servers,
                "127.0.0.1:9092",
            )?;
            nonempty(&at("kafka.group_id"), &k.group_id, "reward-consumer")?;
            if k.topics.is_empty() || k.topics.iter().any(|t| t.trim().is_empty()) {
                return Err(ConfigError::new(
                    at("kafka.topics"),
                    "needs one or more non-empty topic names, e.g. `[\"reward\"]`",
                ));
            }
            for key in k.properties.keys() {
                if let Some(why) = refused_kafka_property(key) {
                    return Err(ConfigError::new(
                        at(&format!("kafka.properties.{key}")),
                        format!("`{key}` is managed by mq-cutover and may not be set: {why}"),
                    ));
                }
            }
            super::kafka_security::check(i, &k.properties)?;
        }
        if let Some(r) = &self.rocketmq {
            nonempty(
                &at("rocketmq.name_server"),
                &r.name_server,
                "127.0.0.1:9876",
            )?;
            nonempty(&at("rocketmq.topic"), &r.topic, "reward")?;
            nonempty(&at("rocketmq.group"), &r.group, "reward-consumer")?;
            nonempty(&at("rocketmq.tag_expression"), &r.tag_expression, "*")?;
            validate_rocketmq_security(&at, r)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::parse_section;

    /// Side 0 of the example file; its `[kafka]` table comes last, so lines appended to it
    /// land in that table.
    const KAFKA: &str = r#"
name = "kafka"
kind = "kafka"
message_id = { header = "msg-id" }
business_id = { json_pointer = "/user_id" }
[kafka]
bootstrap_servers = "127.0.0.1:9092"
topics = ["reward"]
group_id = "reward"
"#;

    /// Side 1 of the example file, `[rocketmq]` last.
    const ROCKETMQ: &str = r#"
name = "rocketmq"
kind = "rocketmq"
message_id = { property = "msg-id" }
business_id = { json_pointer = "/user_id" }
[rocketmq]
name_server = "127.0.0.1:9876"
topic = "reward"
group = "reward"
"#;

    /// Side `i` parsed from `toml`, with every check it passes on its own.
    fn side(toml: &str, i: usize) -> Result<SideConfig, ConfigError> {
        let s: SideConfig = parse_section(toml).unwrap();
        s.validate_name(i)?;
        s.validate(i)?;
        Ok(s)
    }

    fn err_of(toml: &str, i: usize) -> ConfigError {
        side(toml, i).expect_err("must be refused")
    }

    fn with(base: &str, replace: &str, by: &str) -> String {
        assert!(base.contains(replace), "test fixture lacks {replace:?}");
        base.replacen(replace, by, 1)
    }

    #[test]
    fn the_example_sides_validate() {
        let k = side(KAFKA, 0).unwrap();
        assert_eq!(k.message_id, IdSource::Header("msg-id".into()));
        let r = side(ROCKETMQ, 1).unwrap();
        assert_eq!(r.message_id, IdSource::Header("msg-id".into()));
        assert_eq!(r.rocketmq.unwrap().tag_expression, "*");
    }

    #[test]
    fn side_kind_without_its_table_is_rejected() {
        let e = err_of(
            &with(ROCKETMQ, "kind = \"rocketmq\"", "kind = \"kafka\""),
            1,
        );
        assert_eq!(e.key, "side[1].kafka");
    }

    #[test]
    fn bad_side_name_is_rejected() {
        let e = err_of(&with(KAFKA, "name = \"kafka\"", "name = \"Kafka Old\""), 0);
        assert_eq!(e.key, "side[0].name");
    }

    #[test]
    fn json_pointer_must_start_with_slash() {
        let e = err_of(
            &with(
                KAFKA,
                "business_id = { json_pointer = \"/user_id\" }",
                "business_id = { json_pointer = \"user_id\" }",
            ),
            0,
        );
        assert_eq!(e.key, "side[0].business_id");
    }

    #[test]
    fn empty_topic_list_is_rejected() {
        let e = err_of(&with(KAFKA, "topics = [\"reward\"]", "topics = []"), 0);
        assert_eq!(e.key, "side[0].kafka.topics");
    }

    #[test]
    fn kafka_properties_the_source_depends_on_are_refused_by_name() {
        for key in [
            "group.id",
            "bootstrap.servers",
            "metadata.broker.list",
            "enable.auto.commit",
            "auto.commit.enable",
            "enable.auto.offset.store",
            "auto.commit.interval.ms",
            "enable.partition.eof",
            "offset.store.method",
            "plugin.library.paths",
            "Group.Id",
        ] {
            let e = err_of(
                &format!("{KAFKA}[kafka.properties]\n\"{key}\" = \"x\"\n"),
                0,
            );
            assert_eq!(e.key, format!("side[0].kafka.properties.{key}"));
            assert!(e.problem.contains("managed by mq-cutover"), "{e}");
        }
    }

    #[test]
    fn other_kafka_properties_pass_through() {
        let s = side(
            &format!(
                "{KAFKA}[kafka.properties]\n\"auto.offset.reset\" = \"latest\"\n\
                 \"client.id\" = \"billing\"\n\"security.protocol\" = \"SSL\"\n\
                 \"session.timeout.ms\" = \"10000\"\n"
            ),
            0,
        )
        .unwrap();
        assert_eq!(s.kafka.as_ref().unwrap().properties.len(), 4);
    }

    #[test]
    fn secret_kafka_properties_are_redacted_and_others_shown() {
        let s: SideConfig = parse_section(&format!(
            "{KAFKA}[kafka.properties]\n\"security.protocol\" = \"SASL_PLAINTEXT\"\n\"sasl.mechanism\" = \"PLAIN\"\n\"sasl.username\" = \"u\"\n\"sasl.password\" = \"inline-pw\"\n\"ssl.key.password\" = \"key-pw\""
        ))
        .unwrap();
        let shown = format!("{s:?}{}", serde_json::to_string(&s).unwrap());
        assert!(
            !shown.contains("inline-pw") && !shown.contains("key-pw"),
            "{shown}"
        );
        assert!(shown.contains("SASL_PLAINTEXT"), "{shown}");
    }

    #[test]
    fn kafka_security_problems_are_named_by_check_config() {
        let e = err_of(
            &format!("{KAFKA}[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\""),
            0,
        );
        assert_eq!(e.key, "side[0].kafka.properties.\"sasl.mechanism\"");
    }

    /// The RocketMQ side with `lines` added to its `[rocketmq]` table.
    fn rocketmq_with(lines: &str) -> String {
        format!("{ROCKETMQ}{lines}\n")
    }

    #[test]
    fn rocketmq_security_settings_validate_and_keep_the_secret_out_of_debug() {
        let s = side(
            &rocketmq_with(
                "access_key = \"mqc\"\nsecret_key = \"s3cret-sk\"\nnamespace = \"MQ_INST_1_a-b\"\n\
                 tls = true\ntls_ca_file = \"/tb/ca.pem\"\ntls_cert_file = \"/tb/c.pem\"\n\
                 tls_key_file = \"/tb/c.key\"",
            ),
            1,
        )
        .unwrap();
        let r = s.rocketmq.as_ref().unwrap();
        assert_eq!(r.access_key.as_deref(), Some("mqc"));
        assert_eq!(r.secret_key.as_ref().unwrap().expose(), "s3cret-sk");
        assert!(r.tls);
        assert!(!format!("{s:?}").contains("s3cret-sk"));
    }

    #[test]
    fn rocketmq_security_mistakes_name_their_key() {
        for (lines, key) in [
            ("access_key = \"mqc\"", "side[1].rocketmq.secret_key"),
            ("secret_key = \"x\"", "side[1].rocketmq.access_key"),
            (
                "access_key = \"\"\nsecret_key = \"x\"",
                "side[1].rocketmq.access_key",
            ),
            (
                "access_key = \"a\"\nsecret_key = \"\"",
                "side[1].rocketmq.secret_key",
            ),
            ("namespace = \"a%b\"", "side[1].rocketmq.namespace"),
            ("namespace = \"\"", "side[1].rocketmq.namespace"),
            ("tls_ca_file = \"/ca.pem\"", "side[1].rocketmq.tls_ca_file"),
            (
                "tls = true\ntls_cert_file = \"/c.pem\"",
                "side[1].rocketmq.tls_key_file",
            ),
            (
                "tls = true\ntls_key_file = \"/c.key\"",
                "side[1].rocketmq.tls_cert_file",
            ),
        ] {
            let e = err_of(&rocketmq_with(lines), 1);
            assert_eq!(e.key, key, "{lines}: {e}");
        }
    }
}
