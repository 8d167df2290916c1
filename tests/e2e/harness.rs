//! The end-to-end test bed of one test: fresh topics on the real Kafka and RocketMQ brokers, a
//! key prefix of its own in Redis, the reward service on a free port, a config file, daemon
//! processes (the real binary) that can be stopped, killed and restarted, and the producer.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mq_cutover::arbiter::{Arbiter, Record};
use mq_cutover::config::{Config, RedisMode, Validated};
use mq_cutover::store::Store;
use mqc_testkit::produce::{produce, ProduceArgs, Sent};
use mqc_testkit::reward::{FaultPlan, RewardServer};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;

use crate::common;

/// The viewer token every daemon of these tests is started with (`admin.viewer_token`): what the
/// status page and [`Daemon::admin`] read the API with.
pub const VIEWER_TOKEN: &str = "e2e-viewer-6f3a9c1e7b5d2f8a4c0e6b2d9f7a5c3e";

/// Knobs of one test's deployment.
#[derive(Clone)]
pub struct Setup {
    pub policy: &'static str,
    pub lease: &'static str,
    pub sink_timeout: &'static str,
    pub faults: FaultPlan,
    /// One URL for standalone; the seed nodes, comma-separated, for a cluster; the sentinels
    /// for sentinel.
    pub redis_url: String,
    pub redis_mode: RedisMode,
    /// `redis.sentinel.master_name`, with `RedisMode::Sentinel`.
    pub sentinel_master: Option<String>,
    /// `arbiter.replicas`.
    pub replicas: u32,
    pub initial_percent: u8,
    pub drain_timeout: &'static str,
    pub circuit_threshold: u32,
    pub circuit_open_for: &'static str,
    /// `arbiter.adopt_after`: long by default, so that a side that is merely slow (a rebalance
    /// on a busy machine) keeps its ids; the adoption tests make it short.
    pub adopt_after: &'static str,
    /// `pipeline.channel`: copies buffered between a source and its pipeline.
    pub channel: usize,
    /// `pipeline.stall_after`.
    pub stall_after: &'static str,
    /// The Kafka consumer's `session.timeout.ms`: how long a killed daemon stays in the group.
    pub kafka_session_timeout_ms: u32,
    /// The Kafka brokers: the shared test bed's, or a private one a test stops.
    pub kafka_bootstrap: String,
    /// The RocketMQ name server: the shared test bed's, or a private one a test stops.
    pub rocketmq_namesrv: String,
    /// The environment that points `scripts/testbed topic rocketmq` at `rocketmq_namesrv`'s test
    /// bed (empty: the shared one).
    pub rocketmq_testbed_env: Vec<(String, String)>,
    pub max_in_flight: usize,
    /// `pipeline.max_message_bytes`.
    pub max_message_bytes: usize,
    /// `pipeline.max_buffered_bytes`.
    pub max_buffered_bytes: usize,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            policy: "at_least_once",
            lease: "5s",
            // Long enough that a busy host (a debug build, other tests beside) does not turn
            // plain calls into ambiguous ones; the tests that want timeouts set their own.
            sink_timeout: "5s",
            faults: FaultPlan::default(),
            redis_url: common::redis_url(),
            redis_mode: RedisMode::Standalone,
            sentinel_master: None,
            replicas: 0,
            initial_percent: 0,
            drain_timeout: "5s",
            circuit_threshold: 100_000,
            circuit_open_for: "10s",
            adopt_after: "2m",
            channel: 16_384,
            stall_after: "60s",
            kafka_session_timeout_ms: 6000,
            kafka_bootstrap: kafka_bootstrap(),
            rocketmq_namesrv: rocketmq_namesrv(),
            rocketmq_testbed_env: Vec::new(),
            max_in_flight: 256,
            max_message_bytes: 4 * 1024 * 1024,
            max_buffered_bytes: 64 * 1024 * 1024,
        }
    }
}

impl Setup {
    /// The Redis outage tests' set-up (durability, Sentinel): short leases and adoption, so that
    /// what an outage costs shows within the test, and a downstream that fails 5 % of calls and
    /// commits then times out on 1 %.
    pub fn redis_outage() -> Setup {
        Setup {
            lease: "3s",
            sink_timeout: "500ms",
            // Short, so that an owner decision lost with Redis's data is adopted within the test.
            adopt_after: "10s",
            faults: FaultPlan {
                error_rate: 0.05,
                commit_then_timeout_rate: 0.01,
                hang: Duration::from_secs(1),
                latency: Duration::from_millis(2),
                ..FaultPlan::default()
            },
            ..Setup::default()
        }
    }
}

pub struct Bed {
    pub prefix: String,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub config: Validated,
    pub reward: RewardServer,
    reward_stop: CancellationToken,
    pub daemons: Vec<Daemon>,
    pub arbiter: Arbiter,
    pub store: Store,
}

pub fn kafka_bootstrap() -> String {
    std::env::var("MQC_KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

pub fn rocketmq_namesrv() -> String {
    std::env::var("MQC_ROCKETMQ_NAMESRV").unwrap_or_else(|_| "127.0.0.1:19876".into())
}

async fn kafka_topic(bootstrap: &str, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("kafka admin client");
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    let res = admin
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &opts,
        )
        .await
        .unwrap_or_else(|e| {
            panic!("kafka at {bootstrap} unreachable ({e}): run `scripts/testbed up`")
        });
    for r in res {
        r.unwrap_or_else(|(t, e)| panic!("creating kafka topic {t}: {e}"));
    }
}

pub async fn rocketmq_topic(name: &str, queues: u32) {
    rocketmq_topic_in(&[], name, queues).await
}

/// [`rocketmq_topic`] on the test bed `env` points `scripts/testbed` at.
pub async fn rocketmq_topic_in(env: &[(String, String)], name: &str, queues: u32) {
    let testbed = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/testbed");
    let out = tokio::process::Command::new(testbed)
        .args(["topic", "rocketmq", name, &queues.to_string()])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .await
        .expect("run scripts/testbed");
    assert!(
        out.status.success(),
        "creating rocketmq topic {name} failed (is the test bed up? `scripts/testbed up`):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Bed {
    pub async fn new(test: &str, setup: Setup) -> Bed {
        let name = common::unique_prefix(test);
        let prefix = name.clone();
        let topic = format!("{name}-t");
        let (_, _) = tokio::join!(
            kafka_topic(&setup.kafka_bootstrap, &topic, 4),
            rocketmq_topic_in(&setup.rocketmq_testbed_env, &topic, 4)
        );
        let reward_stop = CancellationToken::new();
        let reward = mqc_testkit::reward::serve_local(setup.faults.clone(), reward_stop.clone())
            .await
            .expect("reward service");
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("mq-cutover.toml");
        let text = format!(
            r#"
[redis]
mode = "{redis_mode}"
urls = [{redis}]
key_prefix = "{prefix}"
response_timeout = "1s"
{sentinel}
[arbiter]
lease = "{lease}"
retention = "30m"
ambiguous = "{policy}"
max_attempts = 30
adopt_after = "{adopt_after}"
replicas = {replicas}

[switches]
refresh_interval = "200ms"

[switches.initial]
consume = true
percent = {percent}

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
group_id = "{name}-g"
[side.kafka.properties]
"session.timeout.ms" = "{session_timeout}"

[[side]]
name = "rocketmq"
kind = "rocketmq"
message_id = {{ header = "msg-id" }}
business_id = {{ json_pointer = "/user_id" }}
[side.rocketmq]
name_server = "{namesrv}"
topic = "{topic}"
group = "{name}-g"

[sink]
url = "{sink}"
timeout = "{sink_timeout}"
max_concurrency = 64
[sink.retry]
initial_backoff = "20ms"
max_backoff = "300ms"
[sink.circuit]
failure_threshold = {threshold}
open_for = "{open_for}"

[pipeline]
drain_timeout = "{drain}"
channel = {channel}
stall_after = "{stall_after}"
max_in_flight = {max_in_flight}
max_message_bytes = {max_message_bytes}
max_buffered_bytes = {max_buffered_bytes}

[parity]
grace = "2s"
refresh = "500ms"

[log]
level = "info"
"#,
            redis = setup
                .redis_url
                .split(',')
                .map(|u| format!("\"{u}\""))
                .collect::<Vec<_>>()
                .join(","),
            redis_mode = common::mode_name(setup.redis_mode),
            sentinel = match &setup.sentinel_master {
                Some(name) => format!("[redis.sentinel]\nmaster_name = \"{name}\"\n"),
                None => String::new(),
            },
            lease = setup.lease,
            policy = setup.policy,
            percent = setup.initial_percent,
            kafka = setup.kafka_bootstrap,
            namesrv = setup.rocketmq_namesrv,
            sink = reward.url("/grant"),
            sink_timeout = setup.sink_timeout,
            drain = setup.drain_timeout,
            threshold = setup.circuit_threshold,
            open_for = setup.circuit_open_for,
            adopt_after = setup.adopt_after,
            replicas = setup.replicas,
            session_timeout = setup.kafka_session_timeout_ms,
            channel = setup.channel,
            stall_after = setup.stall_after,
            max_in_flight = setup.max_in_flight,
            max_message_bytes = setup.max_message_bytes,
            max_buffered_bytes = setup.max_buffered_bytes,
        );
        std::fs::write(&config_path, text).unwrap();
        let config = Config::load_with_env(&config_path, Default::default())
            .and_then(Config::validate)
            .expect("e2e config is valid");
        let store = Store::connect(&config.redis, false)
            .await
            .expect("redis reachable");
        let arbiter = Arbiter::new(&store, &config.arbiter);
        Bed {
            prefix,
            dir,
            config_path,
            config,
            reward,
            reward_stop,
            daemons: Vec::new(),
            arbiter,
            store,
        }
    }

    /// Starts one more daemon process; returns its index.
    pub fn start_daemon(&mut self) -> usize {
        let n = self.daemons.len();
        let log = self.dir.path().join(format!("daemon-{n}.log"));
        let d = Daemon::start(&self.config_path, log);
        self.daemons.push(d);
        n
    }

    /// Dual-writes `count` ids with this prefix and these options.
    pub async fn produce(
        &self,
        id_prefix: &str,
        count: u64,
        tweak: impl FnOnce(&mut ProduceArgs),
    ) -> (Sent, Sent) {
        let mut args = ProduceArgs {
            count,
            id_prefix: Some(id_prefix.to_owned()),
            users: 100_000,
            duplicates_old: 0.0,
            duplicates_new: 0.0,
            missing_old: 0.0,
            missing_new: 0.0,
            lag_new: None,
            lag_old: None,
            malformed: 0,
            rate: 0,
            seed: 7,
            stamp: false,
            manifest: None,
            give_up_after: None,
        };
        tweak(&mut args);
        produce(&self.config, &args).await.expect("produce")
    }

    /// Like [`Bed::produce`], on a thread of its own, so that the test can kill and restart
    /// daemons meanwhile. A plain thread, not the runtime's blocking pool: a test that fails
    /// while the producer still waits for a broker it stopped must not wait for it to end.
    pub fn produce_in_background(
        &self,
        id_prefix: &str,
        count: u64,
        tweak: impl FnOnce(&mut ProduceArgs),
    ) -> tokio::sync::oneshot::Receiver<(Sent, Sent)> {
        let mut args = ProduceArgs {
            count,
            id_prefix: Some(id_prefix.to_owned()),
            users: 100_000,
            duplicates_old: 0.0,
            duplicates_new: 0.0,
            missing_old: 0.0,
            missing_new: 0.0,
            lag_new: None,
            lag_old: None,
            malformed: 0,
            rate: 0,
            seed: 7,
            stamp: false,
            manifest: None,
            give_up_after: None,
        };
        tweak(&mut args);
        let config = self.config.clone();
        // A runtime of its own: `produce`'s future is not `Send` (a higher-ranked closure
        // inside), so it cannot be spawned on the test's.
        let (done, sent) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let sent = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(produce(&config, &args))
                .expect("produce");
            let _ = done.send(sent);
        });
        sent
    }

    pub fn grants(&self) -> HashMap<String, u32> {
        self.reward.state().grant_counts().into_iter().collect()
    }

    /// Waits until every id `{prefix}-0 .. {prefix}-{count-1}` has a grant (or is dead, when
    /// `dead_ok`), then a little longer for stragglers. Panics with the daemons' logs on timeout.
    pub async fn wait_all_settled(&self, prefix: &str, count: u64, limit: Duration) {
        let start = Instant::now();
        loop {
            let grants = self.grants();
            let missing: Vec<String> = (0..count)
                .map(|i| format!("{prefix}-{i}"))
                .filter(|id| grants.get(id).copied().unwrap_or(0) == 0)
                .collect();
            let mut unsettled = 0;
            if !missing.is_empty() {
                // Not granted: settled only if parked dead.
                for id in missing.iter().take(2000) {
                    match self.arbiter.inspect(id).await {
                        Ok(Some(r)) if r.state == mq_cutover::arbiter::State::Dead => {}
                        _ => unsettled += 1,
                    }
                }
            }
            if unsettled == 0 {
                tokio::time::sleep(Duration::from_secs(2)).await;
                return;
            }
            if start.elapsed() > limit {
                panic!(
                    "{unsettled} of {count} ids neither granted nor dead after {limit:?}, e.g. {:?}\n{}",
                    &missing[..missing.len().min(5)],
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub async fn record(&self, id: &str) -> Option<Record> {
        self.arbiter.inspect(id).await.expect("inspect")
    }

    pub async fn dead_letters(&self) -> Vec<mq_cutover::dead::DeadLetter> {
        mq_cutover::dead::DeadLetters::new(&self.store, 100_000)
            .all()
            .await
            .unwrap()
    }

    /// `mq-cutover switch set …` through the real CLI.
    pub fn switch(&self, args: &[&str]) {
        let out = Command::new(env!("CARGO_BIN_EXE_mq-cutover"))
            .arg("--config")
            .arg(&self.config_path)
            .arg("switch")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "switch {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        for (i, d) in self.daemons.iter().enumerate() {
            let text = std::fs::read_to_string(&d.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            s.push_str(&format!("--- daemon {i} (last 40 lines)\n"));
            for l in tail.into_iter().rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            d.kill();
        }
        // MQC_E2E_KEEP_LOGS=DIR keeps the daemons' whole logs for a look after the test.
        if let Ok(keep) = std::env::var("MQC_E2E_KEEP_LOGS") {
            let _ = std::fs::create_dir_all(&keep);
            for d in &self.daemons {
                if let Some(name) = d.log.file_name() {
                    let to = std::path::Path::new(&keep).join(format!(
                        "{}-{}",
                        self.prefix,
                        name.to_string_lossy()
                    ));
                    let _ = std::fs::copy(&d.log, to);
                }
            }
        }
        self.reward_stop.cancel();
        common::cleanup(&self.config.redis.urls, &self.prefix);
    }
}

pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
    config: PathBuf,
    /// The admin listener's port (kept across restarts).
    pub admin_port: u16,
}

impl Daemon {
    pub fn start(config: &std::path::Path, log: PathBuf) -> Daemon {
        let mut d = Daemon {
            admin_port: common::free_port(),
            child: None,
            log,
            config: config.to_path_buf(),
        };
        d.restart();
        d
    }

    /// Starts the process again (appending to the same log).
    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_mq-cutover"))
            .arg("--config")
            .arg(&self.config)
            .arg("run")
            .env("RUST_LOG", "info")
            .env(
                "MQ_CUTOVER__ADMIN__LISTEN",
                format!("127.0.0.1:{}", self.admin_port),
            )
            .env("MQ_CUTOVER__ADMIN__VIEWER_TOKEN", VIEWER_TOKEN)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start mq-cutover run");
        self.child = Some(child);
    }

    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([&format!("-{sig}"), &c.id().to_string()])
                .status();
        }
    }

    /// SIGKILL: as abrupt as a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit; its exit code and how long it took, or None on timeout.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<(i32, Duration)> {
        let start = Instant::now();
        let child = self.child.as_mut()?;
        while start.elapsed() < limit {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Some((status.code().unwrap_or(-1), start.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Like [`Daemon::admin`], `None` while the admin listener does not answer (starting).
    pub async fn try_admin(&self, path: &str) -> Option<(u16, String)> {
        let r = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/{path}", self.admin_port))
            .bearer_auth(VIEWER_TOKEN)
            .send()
            .await
            .ok()?;
        Some((r.status().as_u16(), r.text().await.ok()?))
    }

    /// `GET /<path>` on the admin listener, with the viewer token: status and body.
    pub async fn admin(&self, path: &str) -> (u16, String) {
        let r = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/{path}", self.admin_port))
            .bearer_auth(VIEWER_TOKEN)
            .send()
            .await
            .expect("admin listener answers");
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// The value of one sample of `/metrics` (0 when absent).
    pub async fn metric(&self, sample: &str) -> f64 {
        let (_, text) = self.admin("metrics").await;
        text.lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }

    /// A field of the process's `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`: the peak), while
    /// it runs.
    pub fn memory_kib(&self, field: &str) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status.lines().find_map(|l| {
            l.strip_prefix(field)?
                .strip_prefix(':')?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
    }

    /// Whether the process is still running (false once it has exited).
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
