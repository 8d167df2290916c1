//! The daemon on the secured transports of the test bed (`scripts/testbed up redis-tls
//! kafka-secure`): the Kafka side over SASL_SSL with SCRAM-SHA-512, Redis over TLS as an ACL
//! user with a client certificate, the sink over HTTPS to an endpoint that requires a client
//! certificate, every secret read from a file. The RocketMQ side runs plain here.
//!
//! Then what an operator sees when a setting is wrong: a wrong password, a CA that did not sign
//! the server's certificate, a plaintext client on a TLS port — for Kafka and for Redis, each
//! one clear error naming the side, `/readyz` 503 with the reason, nothing consumed. And no
//! secret ever in the logs, `check-config`, `/api` or the status page.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mq_cutover::arbiter::Arbiter;
use mq_cutover::config::{Config, Validated};
use mq_cutover::source::kafka::KafkaWriter;
use mq_cutover::store::Store;
use mqc_testkit::produce::{produce, ProduceArgs};
use mqc_testkit::reward::FaultPlan;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::common::{self, Secured};
use crate::harness::{rocketmq_namesrv, rocketmq_topic, Daemon};

#[path = "../common/tls_front.rs"]
mod tls_front;
use tls_front::TlsFront;

/// The secrets of a deployment, each written to its own file.
struct Secrets {
    redis: String,
    kafka: String,
    api_key: String,
    admin_token: String,
}

impl Secrets {
    fn all(&self) -> [&str; 4] {
        [&self.redis, &self.kafka, &self.api_key, &self.admin_token]
    }
}

/// What a case changes in the secured deployment.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Wrong {
    Nothing,
    KafkaPassword,
    KafkaCa,
    KafkaPlaintext,
    RedisPassword,
    RedisCa,
    RedisPlaintext,
}

/// One deployment: its directory (config and secret files), names, and the validated config.
struct Deployment {
    dir: tempfile::TempDir,
    config_path: PathBuf,
    config: Validated,
    prefix: String,
    topic: String,
    group: String,
    secrets: Secrets,
}

impl Deployment {
    async fn new(test: &str, wrong: Wrong, sink_url: &str) -> Deployment {
        let s = Secured::get();
        let prefix = common::unique_prefix(test);
        let topic = format!("{prefix}-t");
        let group = format!("{prefix}-g");
        s.kafka_topic(&topic, 2).await;
        rocketmq_topic(&topic, 2).await;
        let dir = tempfile::tempdir().unwrap();
        let secrets = Secrets {
            redis: if wrong == Wrong::RedisPassword {
                "not-the-redis-password".into()
            } else {
                s.redis_password.clone()
            },
            kafka: if wrong == Wrong::KafkaPassword {
                "not-the-kafka-password".into()
            } else {
                s.kafka_password.clone()
            },
            api_key: format!("api-key-{:08x}", rand::random::<u32>()),
            admin_token: format!("admin-token-{:032x}", rand::random::<u128>()),
        };
        let file = |name: &str, value: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, format!("{value}\n")).unwrap();
            p.display().to_string()
        };
        let (redis_pw, kafka_pw, api_key, token) = (
            file("redis-password", &secrets.redis),
            file("kafka-password", &secrets.kafka),
            file("api-key", &secrets.api_key),
            file("admin-token", &secrets.admin_token),
        );
        let redis = match wrong {
            Wrong::RedisPlaintext => s.redis_url.replace("rediss://", "redis://"),
            _ => s.redis_url.clone(),
        };
        let redis_tls = match wrong {
            Wrong::RedisPlaintext => String::new(),
            Wrong::RedisCa => format!("tls = {{ ca_file = \"{}\" }}", s.other_ca),
            _ => format!(
                "tls = {{ ca_file = \"{}\", cert_file = \"{}\", key_file = \"{}\" }}",
                s.ca, s.client_cert, s.client_key
            ),
        };
        let kafka_security =
            match wrong {
                Wrong::KafkaPlaintext => String::new(),
                _ => format!(
                "\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"\n\
                 \"sasl.username\" = \"{}\"\n\"ssl.ca.location\" = \"{}\"\n\
                 [side.kafka.secret_files]\n\"sasl.password\" = \"{kafka_pw}\"\n",
                s.kafka_user,
                if wrong == Wrong::KafkaCa { &s.other_ca } else { &s.ca }
            ),
            };
        let text = format!(
            r#"
[redis]
urls = ["{redis}"]
username = "{redis_user}"
password_file = "{redis_pw}"
{redis_tls}
key_prefix = "{prefix}"
response_timeout = "1s"

[arbiter]
lease = "5s"
retention = "30m"

[switches]
refresh_interval = "200ms"

[switches.initial]
consume = true
percent = 0

[cutover]
from = "kafka"
to = "rocketmq"

[[side]]
name = "kafka"
kind = "kafka"
message_id = {{ header = "msg-id" }}
business_id = {{ json_pointer = "/user_id" }}
[side.kafka]
bootstrap_servers = "{kafka}"
topics = ["{topic}"]
group_id = "{group}"
[side.kafka.properties]
"session.timeout.ms" = "6000"
{kafka_security}

[[side]]
name = "rocketmq"
kind = "rocketmq"
message_id = {{ header = "msg-id" }}
business_id = {{ json_pointer = "/user_id" }}
[side.rocketmq]
name_server = "{namesrv}"
topic = "{topic}"
group = "{group}"

[sink]
url = "{sink_url}"
# Generous: the test process terminates TLS for the reward service, and a debug build's
# handshakes for the first burst of connections can take seconds on a busy host.
timeout = "10s"
[sink.tls]
ca_file = "{ca}"
cert_file = "{client_cert}"
key_file = "{client_key}"
[sink.header_files]
X-Api-Key = "{api_key}"
[sink.retry]
initial_backoff = "20ms"
max_backoff = "300ms"

[parity]
grace = "2s"
refresh = "500ms"

[admin]
token_file = "{token}"
"#,
            redis_user = s.redis_user,
            kafka = s.kafka_bootstrap,
            namesrv = rocketmq_namesrv(),
            ca = s.ca,
            client_cert = s.client_cert,
            client_key = s.client_key,
        );
        let config_path = dir.path().join("mq-cutover.toml");
        std::fs::write(&config_path, text).unwrap();
        let config = Config::load_with_env(&config_path, Default::default())
            .and_then(Config::validate)
            .expect("the secured config is valid");
        Deployment {
            dir,
            config_path,
            config,
            prefix,
            topic,
            group,
            secrets,
        }
    }

    fn start_daemon(&self, n: usize) -> Daemon {
        Daemon::start(
            &self.config_path,
            self.dir.path().join(format!("daemon-{n}.log")),
        )
    }

    /// `count` records `{prefix}-0 ..` on the Kafka side only, as the test bed's good user.
    async fn produce_kafka_only(&self, id_prefix: &str, count: usize) {
        let s = Secured::get();
        let w = KafkaWriter::connect_with(&s.kafka_bootstrap, s.kafka_properties())
            .expect("secured Kafka reachable");
        for i in 0..count {
            let id = format!("{id_prefix}-{i}");
            let body = format!(r#"{{"user_id":"u-{id}"}}"#);
            w.send(&self.topic, &id, &[("msg-id", &id)], body.as_bytes())
                .await
                .expect("send");
        }
        w.flush().await;
    }

    /// The committed offsets of the Kafka group on the topic's two partitions (-1: none).
    async fn committed(&self) -> Vec<i64> {
        let (topic, group) = (self.topic.clone(), self.group.clone());
        tokio::task::spawn_blocking(move || {
            let mut cfg = Secured::get().kafka_client();
            cfg.set("group.id", &group);
            let c: BaseConsumer = cfg.create().expect("consumer");
            let mut tpl = TopicPartitionList::new();
            for p in 0..2 {
                tpl.add_partition(&topic, p);
            }
            let got = c
                .committed_offsets(tpl, Duration::from_secs(10))
                .expect("committed offsets");
            (0..2)
                .map(
                    |p| match got.find_partition(&topic, p).map(|e| e.offset()) {
                        Some(Offset::Offset(o)) => o,
                        _ => -1,
                    },
                )
                .collect()
        })
        .await
        .unwrap()
    }

    /// Deletes this deployment's keys from the TLS Redis.
    async fn cleanup(&self) {
        let s = Secured::get();
        let Ok(store) = Store::connect(&s.redis_config(&self.prefix), false).await else {
            return;
        };
        let mut conn = store.conn();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.prefix))
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        for k in keys {
            let _: Result<i64, _> = redis::cmd("DEL").arg(&k).query_async(&mut conn).await;
        }
    }
}

/// A reward service behind an HTTPS front that requires a client certificate.
async fn https_reward() -> (
    mqc_testkit::reward::RewardServer,
    TlsFront,
    CancellationToken,
) {
    let s = Secured::get();
    let stop = CancellationToken::new();
    let reward = mqc_testkit::reward::serve_local(FaultPlan::default(), stop.clone())
        .await
        .expect("reward service");
    let front = TlsFront::start(
        &format!("{}/server.pem", s.tls_dir()),
        &format!("{}/server.key", s.tls_dir()),
        Some(&s.ca),
        reward.addr(),
    )
    .await;
    (reward, front, stop)
}

/// `/readyz`, or `(0, "")` while the admin listener is not up yet.
async fn readyz(d: &Daemon) -> (u16, String) {
    let url = format!("http://127.0.0.1:{}/readyz", d.admin_port);
    let answer = async {
        let r = reqwest::get(url).await.ok()?;
        Some((r.status().as_u16(), r.text().await.ok()?))
    };
    tokio::time::timeout(Duration::from_secs(2), answer)
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// Every admin answer a person or a scraper can read, concatenated.
async fn everything_the_admin_listener_shows(d: &Daemon) -> String {
    let mut all = String::new();
    for path in [
        "",
        "readyz",
        "healthz",
        "metrics",
        "api/status",
        "api/switches",
        "api/parity",
        "api/dead",
        "api/audit",
    ] {
        let (code, body) = d.admin(path).await;
        all.push_str(&format!("--- /{path} {code}\n{body}\n"));
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_id_is_granted_once_over_sasl_ssl_redis_tls_and_https_with_client_certificates() {
    let (reward, front, stop) = https_reward().await;
    let dep = Deployment::new("e2e-secured", Wrong::Nothing, &front.url("/grant")).await;
    let mut d = dep.start_daemon(0);
    let count = 600u64;
    let args = ProduceArgs {
        count,
        id_prefix: Some("sec".into()),
        users: 100_000,
        duplicates_old: 0.05,
        duplicates_new: 0.05,
        missing_old: 0.0,
        missing_new: 0.0,
        lag_new: None,
        lag_old: None,
        malformed: 0,
        rate: 0,
        seed: 11,
        stamp: false,
        manifest: None,
        give_up_after: None,
    };
    // The producer reaches the Kafka side with the side's own settings (SASL_SSL).
    produce(&dep.config, &args).await.expect("produce");
    let started = Instant::now();
    let grants = loop {
        let grants: HashMap<String, u32> = reward.state().grant_counts().into_iter().collect();
        if (0..count).all(|i| grants.contains_key(&format!("sec-{i}"))) {
            tokio::time::sleep(Duration::from_secs(2)).await;
            break reward.state().grant_counts();
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "{} of {count} granted after 180 s\n{}",
            grants.len(),
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(grants.len() as u64, count, "unexpected ids granted");
    // A call that timed out on a busy host is ambiguous and may be granted again: each such
    // double grant must be counted on the id's record, never silent.
    let store = Store::connect(&dep.config.redis, false)
        .await
        .expect("the secured Redis answers the test");
    let arbiter = Arbiter::new(&store, &dep.config.arbiter);
    let mut doubles = 0;
    for i in 0..count {
        let id = format!("sec-{i}");
        let g = grants.get(&id).copied().unwrap_or(0);
        if g != 1 {
            let r = arbiter
                .inspect(&id)
                .await
                .expect("inspect")
                .expect("a record");
            assert!(
                g == 2 && (r.ambiguous > 0 || r.overlaps > 0),
                "{id} granted {g} times: {r}\n{}",
                d.log_text()
            );
            doubles += 1;
        }
    }
    eprintln!("{doubles} of {count} ids granted twice, each counted as ambiguous");
    let (code, ready) = d.admin("readyz").await;
    assert_eq!(code, 200, "{ready}");
    // The admin token read from its file opens the write routes.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let put = |token: &str| {
        http.put(format!("http://127.0.0.1:{}/api/switches", d.admin_port))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(r#"{"percent": 0}"#)
            .send()
    };
    assert_eq!(put(&dep.secrets.admin_token).await.unwrap().status(), 200);
    assert_eq!(put("wrong").await.unwrap().status(), 401);
    // No secret anywhere: the logs, the admin listener, check-config.
    let shown = everything_the_admin_listener_shows(&d).await;
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_mq-cutover"))
        .arg("--config")
        .arg(&dep.config_path)
        .arg("check-config")
        .output()
        .unwrap();
    assert!(check.status.success());
    d.signal("TERM");
    assert!(
        d.wait_exit(Duration::from_secs(30)).is_some(),
        "daemon did not stop"
    );
    let log = d.log_text();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    for secret in dep.secrets.all() {
        assert!(
            !log.contains(secret),
            "a secret in the daemon's log:\n{log}"
        );
        assert!(
            !shown.contains(secret),
            "a secret in the admin answers:\n{shown}"
        );
        assert!(!out.contains(secret), "a secret in check-config:\n{out}");
    }
    assert!(
        out.contains("side kafka: Kafka SASL_SSL SCRAM-SHA-512"),
        "{out}"
    );
    assert!(front.handshakes.load(std::sync::atomic::Ordering::SeqCst) > 0);
    dep.cleanup().await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_unknown_cas_and_plaintext_on_tls_ports_are_named_and_consume_nothing() {
    let (reward, front, stop) = https_reward().await;
    let cases = [
        (
            Wrong::KafkaPassword,
            "side kafka: authentication refused by the brokers",
            "Kafka brokers refuse this consumer",
        ),
        (
            Wrong::KafkaCa,
            "side kafka: TLS handshake failed",
            "Kafka brokers refuse this consumer",
        ),
        (
            Wrong::KafkaPlaintext,
            "side kafka: the brokers closed the connection unanswered",
            "Kafka brokers refuse this consumer",
        ),
        (
            Wrong::RedisPassword,
            "redis unreachable: no message can be claimed: authentication refused",
            "redis unreachable",
        ),
        (
            Wrong::RedisCa,
            "redis unreachable: no message can be claimed: TLS handshake failed",
            "redis unreachable",
        ),
        (
            Wrong::RedisPlaintext,
            "redis unreachable: no message can be claimed: the server closed the connection",
            "redis unreachable",
        ),
    ];
    let mut running = Vec::new();
    for (i, (wrong, reason, logged)) in cases.into_iter().enumerate() {
        let dep = Deployment::new(&format!("e2e-wrong{i}"), wrong, &front.url("/grant")).await;
        dep.produce_kafka_only(&format!("wrong{i}"), 20).await;
        let d = dep.start_daemon(0);
        running.push((dep, d, wrong, reason, logged));
    }
    // Each one: not ready, with the reason, within 30 s.
    for (_, d, wrong, reason, _) in &running {
        let started = Instant::now();
        loop {
            let (code, body) = readyz(d).await;
            if code == 503 && body.contains(reason) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{wrong:?}: /readyz {code} {body}\n{}",
                d.log_text()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    // Past the Kafka start-up probe: still up, still not ready, nothing granted or committed.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(
        reward.state().grant_counts().is_empty(),
        "something was granted"
    );
    for (dep, d, wrong, reason, logged) in &mut running {
        let (code, body) = d.admin("readyz").await;
        assert!(
            code == 503 && body.contains(*reason),
            "{wrong:?}: {code} {body}"
        );
        // Nothing committed, or the first offset (the next to read): nothing passed over.
        let committed = dep.committed().await;
        assert!(
            committed.iter().all(|o| *o <= 0),
            "{wrong:?}: Kafka offsets committed past unfinished copies: {committed:?}"
        );
        d.signal("TERM");
        assert!(
            d.wait_exit(Duration::from_secs(30)).is_some(),
            "{wrong:?}: no exit"
        );
        let log = d.log_text();
        let errors: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(" ERROR ") && l.contains(*logged))
            .collect();
        assert_eq!(errors.len(), 1, "{wrong:?}: one clear error, got:\n{log}");
        if matches!(
            wrong,
            Wrong::KafkaPassword | Wrong::KafkaCa | Wrong::KafkaPlaintext
        ) {
            assert!(
                errors[0].contains("side=kafka") || errors[0].contains("side=\"kafka\""),
                "{}",
                errors[0]
            );
        }
        for secret in dep.secrets.all() {
            assert!(!log.contains(secret), "{wrong:?}: a secret in the log");
        }
        dep.cleanup().await;
    }
    stop.cancel();
}
