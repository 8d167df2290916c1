//! Shared helpers for the integration tests: addresses of the real test bed (started by
//! `scripts/testbed up`), a unique key prefix per test, private throw-away Redis servers for the
//! tests that stop Redis on purpose, cleanup, and where the kit's binary (`mqc-kit`) is.
//!
//! A test that needs the test bed and cannot reach it fails with a message saying how to start
//! it; it never skips.
#![allow(dead_code)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mq_cutover::config::{AmbiguousPolicy, ArbiterConfig, RecordLayout, RedisConfig, RedisMode};
use mq_cutover::store::Store;

/// The single-node test Redis.
pub fn redis_url() -> String {
    std::env::var("MQC_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:16379".into())
}

/// The seed nodes of the 3-master test Redis Cluster.
pub fn cluster_urls() -> Vec<String> {
    std::env::var("MQC_REDIS_CLUSTER_URLS")
        .unwrap_or_else(|_| {
            "redis://127.0.0.1:17001,redis://127.0.0.1:17002,redis://127.0.0.1:17003".into()
        })
        .split(',')
        .map(str::to_owned)
        .collect()
}

/// The shared test bed's URLs for `mode` (standalone or cluster: it runs no sentinels).
pub fn testbed_urls(mode: RedisMode) -> Vec<String> {
    match mode {
        RedisMode::Standalone => vec![redis_url()],
        RedisMode::Cluster => cluster_urls(),
        RedisMode::Sentinel => panic!("the shared test bed has no sentinels: see PrivateSentinels"),
    }
}

/// A key prefix no other test (or run) uses.
pub fn unique_prefix(test: &str) -> String {
    format!("t-{test}-{:08x}", rand::random::<u32>())
}

/// Redis settings for a topology and prefix, with short timeouts suited to loopback.
pub fn redis_config(mode: RedisMode, prefix: &str) -> RedisConfig {
    redis_config_for(mode, testbed_urls(mode), prefix)
}

/// Redis settings for explicit URLs.
pub fn redis_config_for(mode: RedisMode, urls: Vec<String>, prefix: &str) -> RedisConfig {
    let text = format!(
        "mode = \"{}\"\nurls = [{}]\nkey_prefix = \"{prefix}\"\nconnect_timeout = \"1s\"\nresponse_timeout = \"2s\"\n",
        mode_name(mode),
        urls.iter()
            .map(|u| format!("\"{u}\""))
            .collect::<Vec<_>>()
            .join(",")
    );
    toml_section(&text)
}

/// `redis.mode`'s name for `mode`.
pub fn mode_name(mode: RedisMode) -> &'static str {
    match mode {
        RedisMode::Standalone => "standalone",
        RedisMode::Cluster => "cluster",
        RedisMode::Sentinel => "sentinel",
    }
}

fn toml_section<T: serde::de::DeserializeOwned>(text: &str) -> T {
    let v: serde_json::Value = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize())
        .expect("test config parses");
    serde_json::from_value(v).expect("test config fits")
}

/// The two sides the arbiter tests' records are marked by, old first.
pub const SIDES: [&str; 2] = ["kafka", "rocketmq"];

/// A whole daemon config for tests that drive `pipeline::run_side` by hand: Redis at
/// `redis_url` under `prefix`, both sides and the sink at addresses nothing listens on (the tests
/// feed copies and a sink of their own), and `pipeline` as the `[pipeline]` section's body.
pub fn offline_config(
    redis_url: &str,
    prefix: &str,
    pipeline: &str,
) -> mq_cutover::config::Validated {
    offline_config_on(RedisMode::Standalone, &[redis_url], prefix, pipeline)
}

/// [`offline_config`] on Redis in `mode` at `urls` (a cluster's seed nodes).
pub fn offline_config_on(
    mode: RedisMode,
    urls: &[&str],
    prefix: &str,
    pipeline: &str,
) -> mq_cutover::config::Validated {
    let mode = mode_name(mode);
    let urls = urls
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(",");
    let mut side_sections = String::new();
    for (name, broker) in [
        (
            "kafka",
            "bootstrap_servers = \"127.0.0.1:1\"\ntopics = [\"t\"]\ngroup_id = \"g\"",
        ),
        (
            "rocketmq",
            "name_server = \"127.0.0.1:1\"\ntopic = \"t\"\ngroup = \"g\"",
        ),
    ] {
        side_sections.push_str(&format!(
            "[[side]]\nname = \"{name}\"\nkind = \"{name}\"\n\
             message_id = {{ header = \"msg-id\" }}\n\
             business_id = {{ json_pointer = \"/user_id\" }}\n[side.{name}]\n{broker}\n"
        ));
    }
    mq_cutover::config::Config::from_toml_str(&format!(
        "[redis]\nmode = \"{mode}\"\nurls = [{urls}]\nkey_prefix = \"{prefix}\"\n\
         [cutover]\nfrom = \"kafka\"\nto = \"rocketmq\"\n\
         {side_sections}\
         [sink]\nurl = \"http://127.0.0.1:1/grant\"\n\
         [pipeline]\n{pipeline}\n"
    ))
    .expect("test config parses")
    .validate()
    .expect("test config is valid")
}

/// Arbiter settings for tests: explicit lease and policy, short retention so leftovers vanish.
pub fn arbiter_config(
    lease: Duration,
    policy: AmbiguousPolicy,
    max_attempts: u32,
) -> ArbiterConfig {
    ArbiterConfig {
        lease,
        retention: Duration::from_secs(600),
        ambiguous: policy,
        max_attempts: max_attempts.try_into().expect("max_attempts > 0"),
        record_layout: RecordLayout::default(),
        adopt_after: Duration::from_secs(60),
        replicas: 0,
        replica_timeout: Duration::from_millis(500),
    }
}

/// The fields of the packed record layout, in their order after the version (`1|`).
const PACKED_FIELDS: [&str; 10] = ["o", "s", "t", "e", "a", "f", "m", "v", "marks", "r"];

/// A packed record's fields under the hash layout's names (`@side` per observing side), read
/// here without the daemon's scripts so that the tests check the layout docs/arbiter.md gives.
pub fn unpack_record(raw: &str) -> Vec<(String, String)> {
    let rest = raw
        .strip_prefix("1|")
        .unwrap_or_else(|| panic!("not a packed record: {raw:?}"));
    let parts: Vec<&str> = rest.splitn(PACKED_FIELDS.len(), '|').collect();
    assert_eq!(parts.len(), PACKED_FIELDS.len(), "packed record {raw:?}");
    let mut out = Vec::new();
    for (name, value) in PACKED_FIELDS.iter().zip(parts) {
        if value.is_empty() {
            continue;
        }
        if *name == "marks" {
            assert!(
                value.starts_with(',') && value.ends_with(','),
                "marks {value:?}"
            );
            out.extend(
                value
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| (format!("@{s}"), "1".to_owned())),
            );
        } else {
            out.push((name.to_string(), value.to_owned()));
        }
    }
    out
}

/// The packed layout of `fields` (the hash layout's names), the inverse of [`unpack_record`].
pub fn pack_record(fields: &[(String, String)]) -> String {
    let get = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    };
    let marks: String = fields
        .iter()
        .filter_map(|(k, _)| k.strip_prefix('@'))
        .map(|s| format!("{s},"))
        .collect();
    let marks = if marks.is_empty() {
        marks
    } else {
        format!(",{marks}")
    };
    let values: Vec<&str> = PACKED_FIELDS
        .iter()
        .map(|name| if *name == "marks" { &marks } else { get(name) })
        .collect();
    format!("1|{}", values.join("|"))
}

/// An id's record as Redis holds it, read with plain commands: whether it is packed, and its
/// fields under the hash layout's names. `None`: no record.
pub async fn raw_record(store: &Store, key: &str) -> Option<(bool, Vec<(String, String)>)> {
    let mut conn = store.conn();
    let kind: String = redis::cmd("TYPE")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap();
    match kind.as_str() {
        "none" => None,
        "string" => {
            let raw: String = redis::cmd("GET")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap();
            Some((true, unpack_record(&raw)))
        }
        "hash" => {
            let fields: Vec<(String, String)> = redis::cmd("HGETALL")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap();
            Some((false, fields))
        }
        other => panic!("{key} is a {other}, not a record"),
    }
}

/// Sets one field of an existing record in place, in whichever layout it is, keeping its TTL
/// (a test's way of moving a clock: a lease end, a first claim's time).
pub async fn set_record_field(store: &Store, key: &str, field: &str, value: &str) {
    let mut conn = store.conn();
    match raw_record(store, key).await {
        Some((true, mut fields)) => {
            match fields.iter_mut().find(|(k, _)| k == field) {
                Some(f) => f.1 = value.to_owned(),
                None => fields.push((field.to_owned(), value.to_owned())),
            }
            let _: () = redis::cmd("SET")
                .arg(key)
                .arg(pack_record(&fields))
                .arg("KEEPTTL")
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        Some((false, _)) => {
            let _: () = redis::cmd("HSET")
                .arg(key)
                .arg(field)
                .arg(value)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        None => panic!("no record at {key}"),
    }
}

/// Connects to the test bed's Redis (standalone or cluster), failing loudly if it is not up.
pub async fn connect(mode: RedisMode, prefix: &str) -> Store {
    let cfg = redis_config(mode, prefix);
    match Store::connect(&cfg, false).await {
        Ok(store) => {
            store
                .ping()
                .await
                .unwrap_or_else(|e| testbed_missing(&cfg.urls, &e));
            store
        }
        Err(e) => testbed_missing(&cfg.urls, &e),
    }
}

fn testbed_missing(urls: &[String], e: &dyn std::fmt::Display) -> ! {
    panic!(
        "the test Redis at {} is not reachable ({e}). Start the test bed with `scripts/testbed up` \
         (the README's test command does it for you).",
        urls.join(",")
    )
}

/// Deletes every key under `prefix`, on every node given.
pub fn cleanup(urls: &[String], prefix: &str) {
    for url in urls {
        let Ok(client) = redis::Client::open(url.as_str()) else {
            continue;
        };
        let Ok(mut conn) = client.get_connection() else {
            continue;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}:*"))
            .query(&mut conn)
            .unwrap_or_default();
        for k in keys {
            let _: Result<i64, _> = redis::cmd("DEL").arg(&k).query(&mut conn);
        }
    }
}

/// A private redis-server on a free loopback port, for tests that stop or flush Redis on purpose
/// without disturbing the shared test bed. Killed on drop.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    persistent: bool,
    /// `appendfsync` when persistent: `always` or `everysec`.
    fsync: &'static str,
    /// More `redis-server` arguments (`--replicaof …`).
    extra: Vec<String>,
    password: Option<String>,
}

impl PrivateRedis {
    /// Starts one and waits until it answers PING.
    pub fn start() -> PrivateRedis {
        Self::launch(false, None)
    }

    /// Like [`PrivateRedis::start`], requiring this password (`requirepass`).
    pub fn start_with_password(password: &str) -> PrivateRedis {
        Self::launch(false, Some(password.to_owned()))
    }

    /// Like [`PrivateRedis::start`], with an append-only file fsynced every write, so a restart
    /// keeps the data (as a production Redis would).
    pub fn start_persistent() -> PrivateRedis {
        Self::launch(true, None)
    }

    /// Like [`PrivateRedis::start_persistent`] with `appendfsync` set to `fsync` (`always`,
    /// `everysec`).
    pub fn start_aof(fsync: &'static str) -> PrivateRedis {
        let mut r = Self::new(true, None);
        r.fsync = fsync;
        r.restart();
        r
    }

    /// A server started with these extra arguments (`--replicaof 127.0.0.1 <port>`), AOF
    /// `always` when `persistent`.
    pub fn start_with_args(persistent: bool, extra: &[String]) -> PrivateRedis {
        let mut r = Self::new(persistent, None);
        r.extra = extra.to_vec();
        r.restart();
        r
    }

    fn new(persistent: bool, password: Option<String>) -> PrivateRedis {
        PrivateRedis {
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().expect("tempdir"),
            persistent,
            fsync: "always",
            extra: Vec::new(),
            password,
        }
    }

    fn launch(persistent: bool, password: Option<String>) -> PrivateRedis {
        let mut r = Self::new(persistent, password);
        r.restart();
        r
    }

    /// The append-only file Redis appends to now (the last `incr` file of its manifest).
    pub fn aof_tail_file(&self) -> std::path::PathBuf {
        let dir = self.dir.path().join("appendonlydir");
        let manifest = std::fs::read_to_string(dir.join("appendonly.aof.manifest"))
            .expect("an AOF manifest (is appendonly on?)");
        let name = manifest
            .lines()
            .filter(|l| l.ends_with("type i"))
            .filter_map(|l| l.split_whitespace().nth(1))
            .next_back()
            .expect("an incr file in the AOF manifest");
        dir.join(name)
    }

    /// Whether the process is running (not stopped by [`PrivateRedis::stop`]).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered, as with a
    /// server that hangs or a network that drops every packet.
    pub fn freeze(&self) {
        signal(self.child.as_ref().expect("running").id(), "STOP");
    }

    /// Lets a frozen server go on (SIGCONT).
    pub fn thaw(&self) {
        signal(self.child.as_ref().expect("running").id(), "CONT");
    }

    /// Stops the server (SIGKILL: as abrupt as a crash).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port (empty unless persistent).
    pub fn restart(&mut self) {
        self.stop();
        let mut cmd = Command::new("redis-server");
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        let child = cmd
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                if self.persistent { "yes" } else { "no" },
                "--appendfsync",
                self.fsync,
                "--dir",
            ])
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not installed: run `scripts/testbed up` (it installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let url = match &self.password {
                Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
                None => self.url(),
            };
            let up = redis::Client::open(url)
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_ok();
            if up {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "private redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            signal(c.id(), "CONT"); // a frozen server does not die of SIGKILL before it runs
        }
        self.stop();
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid} failed");
}

/// A private primary, one replica and three Redis Sentinels watching them (quorum 2, the primary
/// down after 1 s), on free loopback ports: for tests that kill the primary and let the sentinels
/// promote the replica. Killed on drop.
pub struct PrivateSentinels {
    /// The name the sentinels monitor the primary under.
    pub master_name: String,
    pub primary: PrivateRedis,
    pub replica: PrivateRedis,
    /// The sentinels' ports.
    pub ports: Vec<u16>,
    sentinels: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl PrivateSentinels {
    /// Starts them and waits until every sentinel knows the replica and the other two.
    pub fn start() -> PrivateSentinels {
        // The first sync at once, not after the default 5 s of waiting for more replicas.
        let quick_sync = ["--repl-diskless-sync-delay".to_owned(), "0".to_owned()];
        let primary = PrivateRedis::start_with_args(false, &quick_sync);
        let mut replica_args = quick_sync.to_vec();
        replica_args.extend([
            "--replicaof".into(),
            "127.0.0.1".into(),
            primary.port.to_string(),
        ]);
        let replica = PrivateRedis::start_with_args(false, &replica_args);
        let dir = tempfile::tempdir().expect("tempdir");
        let master_name = "mqc-test".to_owned();
        let mut ports = Vec::new();
        let mut sentinels = Vec::new();
        for i in 0..3 {
            let port = free_port();
            // A sentinel rewrites its config file: each gets its own, in a directory of its own.
            let conf = dir.path().join(format!("sentinel-{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndaemonize no\ndir {}\n\
                     sentinel monitor {master_name} 127.0.0.1 {} 2\n\
                     sentinel down-after-milliseconds {master_name} 1000\n\
                     sentinel failover-timeout {master_name} 5000\n\
                     sentinel parallel-syncs {master_name} 1\n",
                    dir.path().display(),
                    primary.port
                ),
            )
            .unwrap();
            let child = Command::new("redis-sentinel")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect(
                    "redis-sentinel not installed: run `scripts/testbed deps` (it installs it)",
                );
            ports.push(port);
            sentinels.push(child);
        }
        let s = PrivateSentinels {
            master_name,
            primary,
            replica,
            ports,
            sentinels,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = s.ports.iter().all(|p| {
                let info = s.sentinel_cli(*p, &["sentinel", "master", &s.master_name]);
                let field = |name: &str| {
                    let mut lines = info.lines();
                    lines
                        .by_ref()
                        .find(|l| l.trim() == name)
                        .and_then(|_| lines.next())
                        .map(|v| v.trim().to_owned())
                };
                field("num-slaves").as_deref() == Some("1")
                    && field("num-other-sentinels").as_deref() == Some("2")
            }) && s
                .sentinel_cli(s.replica.port, &["info", "replication"])
                .contains("master_link_status:up");
            if ready {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "private sentinels never saw the replica and each other"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The sentinels' URLs (`redis.urls` in sentinel mode).
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    fn sentinel_cli(&self, port: u16, args: &[&str]) -> String {
        Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// The primary's port as every sentinel names it now; `None` while they disagree.
    pub fn named_primary(&self) -> Option<u16> {
        let named: Vec<Option<u16>> = self
            .ports
            .iter()
            .map(|p| {
                let out = self.sentinel_cli(
                    *p,
                    &["sentinel", "get-master-addr-by-name", &self.master_name],
                );
                out.lines().nth(1).and_then(|l| l.trim().parse().ok())
            })
            .collect();
        (named.iter().all(|n| *n == named[0]))
            .then_some(named[0])
            .flatten()
    }

    /// Waits until every sentinel names the replica as the primary; how long that took.
    pub fn wait_promoted(&self, limit: Duration) -> Duration {
        let started = Instant::now();
        while self.named_primary() != Some(self.replica.port) {
            assert!(
                started.elapsed() < limit,
                "the sentinels did not promote the replica within {limit:?} (they name {:?})",
                self.named_primary()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        started.elapsed()
    }
}

impl Drop for PrivateSentinels {
    fn drop(&mut self) {
        for c in &mut self.sentinels {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A private Redis Cluster of masters on free loopback ports (each with its bus port, +10000,
/// free too), for tests that stop a node on purpose. Killed on drop.
pub struct PrivateCluster {
    /// The nodes' ports, in the order given to `redis-cli --cluster create`.
    pub ports: Vec<u16>,
    children: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl PrivateCluster {
    /// `n` masters (1, or 3 and more), all slots assigned, `cluster_state:ok` on every node.
    pub fn start(n: usize) -> PrivateCluster {
        Self::launch(n, None)
    }

    /// Like [`PrivateCluster::start`], each node announcing `announce[i]` as its port (a proxy in
    /// front of it): the cluster's topology, and so its clients, name those ports.
    pub fn start_announcing(announce: &[u16]) -> PrivateCluster {
        Self::launch(announce.len(), Some(announce))
    }

    fn launch(n: usize, announce: Option<&[u16]>) -> PrivateCluster {
        assert!(
            n == 1 || n >= 3,
            "redis-cli creates clusters of 3 masters or more"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let ports: Vec<u16> = (0..n).map(|_| free_cluster_port()).collect();
        let mut children = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let node_dir = dir.path().join(port.to_string());
            std::fs::create_dir_all(&node_dir).unwrap();
            let mut cmd = Command::new("redis-server");
            cmd.args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "5000",
                "--cluster-announce-ip",
                "127.0.0.1",
                "--dir",
            ])
            .arg(&node_dir);
            if let Some(announce) = announce {
                cmd.args([
                    "--cluster-announce-port",
                    &announce[i].to_string(),
                    "--cluster-announce-bus-port",
                    &(port + 10000).to_string(),
                ]);
            }
            let child = cmd
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server not installed: run `scripts/testbed up` (it installs it)");
            children.push(child);
        }
        let c = PrivateCluster {
            ports,
            children,
            _dir: dir,
        };
        for port in &c.ports {
            c.wait_ping(*port);
        }
        if n == 1 {
            c.cli(c.ports[0], &["cluster", "addslotsrange", "0", "16383"]);
        } else {
            let nodes: Vec<String> = c.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
            let out = Command::new("redis-cli")
                .args(["--cluster", "create"])
                .args(&nodes)
                .args(["--cluster-replicas", "0", "--cluster-yes"])
                .output()
                .expect("redis-cli");
            assert!(
                out.status.success(),
                "redis-cli --cluster create: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !c
            .ports
            .iter()
            .all(|p| c.cli(*p, &["cluster", "info"]).contains("cluster_state:ok"))
        {
            assert!(Instant::now() < deadline, "private cluster never got ok");
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    fn wait_ping(&self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.cli(port, &["ping"]).contains("PONG") {
            assert!(
                Instant::now() < deadline,
                "private cluster node {port} did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis-cli -p port args…`, its output (empty if it failed).
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// The seed URLs of the nodes (their own ports).
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// Freezes node `i` (SIGSTOP).
    pub fn freeze(&self, i: usize) {
        signal(self.children[i].id(), "STOP");
    }

    /// Lets node `i` go on (SIGCONT).
    pub fn thaw(&self, i: usize) {
        signal(self.children[i].id(), "CONT");
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A free loopback port whose cluster bus port (+10000) is free too.
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port < 55000 && TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
}

/// A loopback TCP proxy to one server that can stall: the connections it holds at that moment
/// stop forwarding in both directions but stay open (a server that stopped answering on them,
/// or packets lost on the way), while connections made afterwards forward as before.
pub struct StallingProxy {
    /// The port clients connect to.
    pub port: u16,
    generation: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
}

impl StallingProxy {
    /// Listens on a free port (or `port`, if given) and forwards to 127.0.0.1:`upstream`.
    pub async fn start(upstream: u16, port: Option<u16>) -> StallingProxy {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port.unwrap_or(0)))
            .await
            .expect("proxy port");
        let port = listener.local_addr().unwrap().port();
        let generation = std::sync::Arc::new(tokio::sync::watch::channel(0u64).0);
        let gen = generation.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let mut stalled = gen.subscribe();
                let born = *stalled.borrow_and_update();
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let forward = async {
                        tokio::select! {
                            _ = tokio::io::copy(&mut cr, &mut sw) => {}
                            _ = tokio::io::copy(&mut sr, &mut cw) => {}
                        }
                    };
                    let stall = stalled.wait_for(|g| *g != born);
                    tokio::select! {
                        _ = forward => return,
                        _ = stall => {}
                    }
                    // Stalled: keep both sockets open (a closed one would be noticed), read and
                    // drop what the client sends, send it nothing.
                    let _held = (cw, sr, sw);
                    let _ = tokio::io::copy(&mut cr, &mut tokio::io::sink()).await;
                });
            }
        });
        StallingProxy { port, generation }
    }

    /// Stalls every connection open now.
    pub fn stall(&self) {
        self.generation.send_modify(|g| *g += 1);
    }
}

/// The kit's binary (`mqc-kit`, crates/testkit), next to the daemon's in the target directory.
/// A test of another package's binary gets no `CARGO_BIN_EXE_` variable, so it is found by
/// place; panics, saying how to build it, when it is not there.
pub fn kit_bin() -> std::path::PathBuf {
    let daemon = std::path::Path::new(env!("CARGO_BIN_EXE_mq-cutover"));
    let kit = daemon.with_file_name(format!("mqc-kit{}", std::env::consts::EXE_SUFFIX));
    assert!(
        kit.is_file(),
        "{} is missing: build the workspace with the tests' profile (`cargo test --workspace`, \
         `cargo build --workspace`), not `-p mq-cutover` alone",
        kit.display()
    );
    kit
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Polls `f` every 10 ms until it returns true or `limit` passes; returns the time it took.
pub async fn eventually<F, Fut>(limit: Duration, mut f: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if f().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// The consumer lag series `metrics` shows: `queue` label → messages.
pub fn lag_series(
    metrics: &mq_cutover::telemetry::metrics::Metrics,
) -> std::collections::BTreeMap<String, i64> {
    metrics
        .render()
        .lines()
        .filter_map(|l| l.strip_prefix("mqc_consumer_lag_messages{queue=\""))
        .map(|l| {
            let (queue, rest) = l.split_once('"').unwrap();
            (
                queue.to_owned(),
                rest.rsplit(' ').next().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

/// Waits until the lag series are exactly `want`; fails with the last ones seen.
pub async fn lags_become(
    metrics: &mq_cutover::telemetry::metrics::Metrics,
    want: &std::collections::BTreeMap<String, i64>,
    limit: Duration,
) -> Duration {
    let started = Instant::now();
    while lag_series(metrics) != *want {
        assert!(
            started.elapsed() < limit,
            "lag stayed {:?}, expected {want:?}",
            lag_series(metrics)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

/// The secured components of the test bed (`scripts/testbed up redis-tls kafka-secure`): the
/// CA, the client certificate, the users and their passwords, from `scripts/testbed env`'s
/// variables or else from the test bed's directory. Fails loudly when they are not there.
#[derive(Debug, Clone)]
pub struct Secured {
    /// The test bed's CA (PEM).
    pub ca: String,
    /// A CA that signed nothing of the test bed's.
    pub other_ca: String,
    /// A client certificate and key the test bed's CA signed.
    pub client_cert: String,
    pub client_key: String,
    /// `rediss://127.0.0.1:16380`, its ACL user and password.
    pub redis_url: String,
    pub redis_user: String,
    pub redis_password: String,
    /// The SASL_SSL listener of the secured Kafka broker, its SCRAM user and password.
    pub kafka_bootstrap: String,
    pub kafka_user: String,
    pub kafka_password: String,
}

impl Secured {
    pub fn get() -> Secured {
        let dir = std::env::var("MQC_TESTBED_DIR")
            .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/.testbed").into());
        let tls = std::env::var("MQC_TLS_DIR").unwrap_or_else(|_| format!("{dir}/tls"));
        let file = |name: &str| {
            let p = format!("{tls}/{name}");
            assert!(
                std::path::Path::new(&p).is_file(),
                "{p} is missing: start the secured test bed with `scripts/testbed up redis-tls \
                 kafka-secure` (the README's test command does it for you)"
            );
            p
        };
        let secret = |var: &str, name: &str| {
            std::env::var(var).unwrap_or_else(|_| {
                std::fs::read_to_string(file(&format!("{name}.secret")))
                    .unwrap()
                    .trim()
                    .to_owned()
            })
        };
        let var =
            |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
        Secured {
            ca: file("ca.pem"),
            other_ca: file("other-ca.pem"),
            client_cert: file("client.pem"),
            client_key: file("client.key"),
            redis_url: var("MQC_REDIS_TLS_URL", "rediss://127.0.0.1:16380"),
            redis_user: var("MQC_REDIS_TLS_USER", "mqc"),
            redis_password: secret("MQC_REDIS_TLS_PASSWORD", "redis-tls"),
            kafka_bootstrap: var("MQC_KAFKA_SECURE_BOOTSTRAP", "127.0.0.1:19094"),
            kafka_user: var("MQC_KAFKA_SECURE_USER", "mqc"),
            kafka_password: secret("MQC_KAFKA_SECURE_PASSWORD", "kafka-secure"),
        }
    }

    /// The directory of the test bed's CA and certificates.
    pub fn tls_dir(&self) -> String {
        std::path::Path::new(&self.ca)
            .parent()
            .unwrap()
            .display()
            .to_string()
    }

    /// librdkafka settings for the secured broker: SASL_SSL, SCRAM-SHA-512, the CA.
    pub fn kafka_properties(&self) -> Vec<(String, String)> {
        [
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", self.kafka_user.as_str()),
            ("sasl.password", self.kafka_password.as_str()),
            ("ssl.ca.location", self.ca.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// An rdkafka client config for the secured broker (admin clients, producers).
    pub fn kafka_client(&self) -> rdkafka::ClientConfig {
        let mut c = rdkafka::ClientConfig::new();
        c.set("bootstrap.servers", &self.kafka_bootstrap);
        for (k, v) in self.kafka_properties() {
            c.set(k, v);
        }
        c
    }

    /// Creates a topic on the secured broker, failing loudly when it does not answer.
    pub async fn kafka_topic(&self, name: &str, partitions: i32) {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        let admin: AdminClient<rdkafka::client::DefaultClientContext> =
            self.kafka_client().create().expect("admin client");
        let opts = AdminOptions::new()
            .request_timeout(Some(Duration::from_secs(15)))
            .operation_timeout(Some(Duration::from_secs(15)));
        let results = admin
            .create_topics(
                &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
                &opts,
            )
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "the secured Kafka at {} does not answer ({e}): `scripts/testbed up kafka-secure`",
                    self.kafka_bootstrap
                )
            });
        for r in results {
            r.unwrap_or_else(|(t, e)| panic!("creating topic {t} on the secured Kafka: {e}"));
        }
    }

    /// `[redis]` settings for the TLS Redis as the ACL user, with the test bed's CA.
    pub fn redis_config(&self, prefix: &str) -> RedisConfig {
        let mut cfg = redis_config_for(RedisMode::Standalone, vec![self.redis_url.clone()], prefix);
        cfg.username = Some(self.redis_user.clone());
        cfg.password = Some(mq_cutover::config::Secret::new(self.redis_password.clone()));
        cfg.tls.ca_file = Some(self.ca.clone().into());
        cfg
    }
}
