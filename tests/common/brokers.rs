//! Private brokers for the tests that stop them on purpose: an Apache Kafka, or an Apache
//! RocketMQ name server and broker, of one test's own, started by `scripts/testbed` in a
//! temporary directory on free ports, so the shared test bed is never disturbed.
//!
//! Each is stopped and its data deleted on drop (a failing test too: drop runs while a panic
//! unwinds), and by a watchdog process should the test process die without dropping it.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TESTBED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/testbed");

/// JVM heaps of the private brokers (the shared test bed's are larger).
const PRIVATE_HEAPS: [(&str, &str); 3] = [
    ("MQC_KAFKA_HEAP", "-Xms64m -Xmx384m"),
    ("MQC_ROCKETMQ_NAMESRV_HEAP", "-Xms32m -Xmx128m"),
    (
        "MQC_ROCKETMQ_BROKER_HEAP",
        "-Xms128m -Xmx384m -XX:MaxDirectMemorySize=256m",
    ),
];

/// A loopback port that was free a moment ago, with `also` ports around it free too (a RocketMQ
/// broker listens on its port - 2 and + 1 as well).
fn free_port_with(also: &[i32]) -> u16 {
    for _ in 0..200 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let around_free = also.iter().all(|d| {
            u16::try_from(i32::from(port) + d)
                .ok()
                .filter(|p| *p > 1024)
                .is_some_and(|p| TcpListener::bind(("127.0.0.1", p)).is_ok())
        });
        if around_free {
            return port;
        }
    }
    panic!("no free port with {also:?} around it free too");
}

/// One component of a private test bed: its directory, the environment `scripts/testbed` reads
/// (the directory and the ports), and the watchdog.
struct PrivateBed {
    component: &'static str,
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    watchdog: Option<Child>,
}

impl PrivateBed {
    /// Starts `component` with these port variables, waiting until it is ready; fails loudly
    /// with the script's output.
    async fn start(component: &'static str, ports: Vec<(&str, u16)>) -> PrivateBed {
        let dir = tempfile::Builder::new()
            .prefix(&format!("mqc-private-{component}-"))
            .tempdir()
            .expect("a temporary directory");
        let mut env: Vec<(String, String)> =
            vec![("MQC_TESTBED_DIR".into(), dir.path().display().to_string())];
        env.extend(
            ports
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_string())),
        );
        // Small heaps: the machine that runs the tests also runs the shared test bed, the
        // daemons and the compiler (2 cores); a private broker carries one test's traffic.
        env.extend(
            PRIVATE_HEAPS
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        let mut bed = PrivateBed {
            component,
            dir,
            env,
            watchdog: None,
        };
        bed.watchdog = Some(bed.watch());
        bed.run(&["up", component]).await;
        bed
    }

    /// A process that waits for this test process to end and then stops and deletes the
    /// private bed: the clean-up for a test killed before it could drop it. Its own process
    /// group, so a Ctrl-C to the test does not end it first.
    fn watch(&self) -> Child {
        use std::os::unix::process::CommandExt as _;
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             for p in kafka rocketmq-broker rocketmq-namesrv; do \"$0\" signal $p KILL >/dev/null 2>&1; done; \
             exec \"$0\" down --purge {component} >/dev/null 2>&1",
            pid = std::process::id(),
            component = self.component,
        );
        Command::new("bash")
            .args(["-c", &script, TESTBED])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start the private test bed's watchdog")
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(TESTBED);
        cmd.args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `scripts/testbed ARGS` against this bed; fails loudly with its output.
    async fn run(&self, args: &[&str]) -> String {
        self.try_run(args).await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs `scripts/testbed ARGS` against this bed: its output, or why it failed.
    async fn try_run(&self, args: &[&str]) -> Result<String, String> {
        let out = self
            .command(args)
            .output()
            .await
            .expect("run scripts/testbed");
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        Err(format!(
            "scripts/testbed {} on the private test bed at {} failed:\n{}{}",
            args.join(" "),
            self.dir.path().display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    /// Sends `signal` (`KILL`, `TERM`, `STOP`, `CONT`) to one of this bed's processes; for
    /// `KILL` and `TERM`, returns once it has exited.
    async fn signal(&self, process: &str, signal: &str) {
        self.run(&["signal", process, signal]).await;
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PrivateBed {
    fn drop(&mut self) {
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        // A throw-away bed: killed, not stopped gracefully (the RocketMQ broker takes ~15 s).
        for p in ["kafka", "rocketmq-broker", "rocketmq-namesrv"] {
            let _ = Command::new(TESTBED)
                .args(["signal", p, "KILL"])
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = Command::new(TESTBED)
            .args(["down", "--purge", self.component])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A private Apache Kafka broker (KRaft, one node) on free ports.
pub struct PrivateKafka {
    bed: PrivateBed,
    port: u16,
}

impl PrivateKafka {
    /// Starts one and waits until it answers (about 15 s on 2 cores).
    pub async fn start() -> PrivateKafka {
        let (port, controller) = (free_port_with(&[]), free_port_with(&[]));
        let bed = PrivateBed::start(
            "kafka",
            vec![
                ("MQC_KAFKA_PORT", port),
                ("MQC_KAFKA_CONTROLLER_PORT", controller),
            ],
        )
        .await;
        PrivateKafka { bed, port }
    }

    /// `127.0.0.1:<port>`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Sends `signal` to the broker; for `KILL` and `TERM`, returns once it has exited.
    pub async fn signal(&self, signal: &str) {
        self.bed.signal("kafka", signal).await;
    }

    /// Starts the broker again on its data and waits until it answers; returns how long that
    /// took. After a SIGKILL the controller refuses the broker until its old registration
    /// times out (about 13 s instead of 4).
    pub async fn restart(&self) -> Duration {
        let started = Instant::now();
        self.bed.run(&["up", "kafka"]).await;
        started.elapsed()
    }

    /// Whether something accepts connections on the broker's port.
    pub fn listening(&self) -> bool {
        std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
    }

    /// The broker's own log, for a failing test's message.
    pub fn log_tail(&self) -> String {
        tail(&self.bed.dir().join("kafka/logs/kafka.out"), 30)
    }
}

/// A private Apache RocketMQ: a name server and one broker, on free ports.
pub struct PrivateRocketMq {
    bed: PrivateBed,
    namesrv_port: u16,
    broker_port: u16,
}

impl PrivateRocketMq {
    /// Starts both and waits until the broker is registered (about 30 s on 2 cores).
    pub async fn start() -> PrivateRocketMq {
        let namesrv_port = free_port_with(&[]);
        let broker_port = free_port_with(&[-2, 1]);
        let bed = PrivateBed::start(
            "rocketmq",
            vec![
                ("MQC_ROCKETMQ_NAMESRV_PORT", namesrv_port),
                ("MQC_ROCKETMQ_BROKER_PORT", broker_port),
            ],
        )
        .await;
        PrivateRocketMq {
            bed,
            namesrv_port,
            broker_port,
        }
    }

    /// The name server, `127.0.0.1:<port>`: what clients are given.
    pub fn namesrv(&self) -> String {
        format!("127.0.0.1:{}", self.namesrv_port)
    }

    /// The broker's port.
    pub fn broker_port(&self) -> u16 {
        self.broker_port
    }

    /// The name server's port.
    pub fn namesrv_port(&self) -> u16 {
        self.namesrv_port
    }

    /// The environment that points `scripts/testbed` at this bed.
    pub fn testbed_env(&self) -> Vec<(String, String)> {
        self.bed.env.clone()
    }

    /// Creates a topic with `queues` queues (or sets its queue count).
    pub async fn topic(&self, name: &str, queues: u32) {
        self.bed
            .run(&["topic", "rocketmq", name, &queues.to_string()])
            .await;
    }

    /// Sends `signal` to the broker; for `KILL` and `TERM`, returns once it has exited.
    pub async fn signal_broker(&self, signal: &str) {
        self.bed.signal("rocketmq-broker", signal).await;
    }

    /// Sends `signal` to the name server; for `KILL` and `TERM`, returns once it has exited.
    pub async fn signal_namesrv(&self, signal: &str) {
        self.bed.signal("rocketmq-namesrv", signal).await;
    }

    /// Starts whatever of the two is down, on its data, and waits until the broker is
    /// registered and the topics are routed; returns how long that took.
    /// A broker re-registers with a restarted name server on its own period (30 s), which a
    /// loaded machine stretches past the test bed's 30 s routing check: up to three tries.
    pub async fn restart(&self) -> Duration {
        let started = Instant::now();
        for attempt in 1.. {
            match self.bed.try_run(&["up", "rocketmq"]).await {
                Ok(_) => break,
                Err(e) if attempt >= 3 => panic!("{e}"),
                Err(e) => eprintln!("private RocketMQ not ready yet, trying again: {e}"),
            }
        }
        started.elapsed()
    }

    /// Whether something accepts connections on the broker's port.
    pub fn broker_listening(&self) -> bool {
        std::net::TcpStream::connect(("127.0.0.1", self.broker_port)).is_ok()
    }

    /// Whether something accepts connections on the name server's port.
    pub fn namesrv_listening(&self) -> bool {
        std::net::TcpStream::connect(("127.0.0.1", self.namesrv_port)).is_ok()
    }

    /// The broker's and the name server's own logs, for a failing test's message.
    pub fn log_tail(&self) -> String {
        let dir = self.bed.dir().join("rocketmq");
        format!(
            "{}{}",
            tail(&dir.join("logs/namesrv.out"), 15),
            tail(&dir.join("broker/logs/rocketmqlogs/broker.log"), 30)
        )
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let from = all.len().saturating_sub(lines);
    format!(
        "--- {} (last {lines} lines)\n{}\n",
        path.display(),
        all[from..].join("\n")
    )
}
