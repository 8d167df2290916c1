//! The `mq-cutover` binary as an operator uses it: the commands it lists, exit codes, one-line
//! errors naming the key, the switch / inspect / release / audit commands against real Redis, and
//! `run` starting and stopping cleanly on SIGTERM; and the kit's `mqc-kit`, which holds the test
//! and demo tools the daemon does not.

#[path = "../common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use mq_cutover::arbiter::{Arbiter, ClaimRequest, CompleteRequest, LeaseTokens, Outcome};
use mq_cutover::config::{AmbiguousPolicy, RedisMode};

const EXIT_USAGE: i32 = 64;
const EXIT_CONFIG: i32 = 78;
const EXIT_RUNTIME: i32 = 1;

fn example_config() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/mq-cutover.toml")
}

/// The binary with the example config, pointed at `redis_url` under `prefix`.
fn mqc(redis_url: &str, prefix: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mq-cutover"));
    c.arg("--config")
        .arg(example_config())
        .env("MQ_CUTOVER__REDIS__URLS", redis_url)
        .env("MQ_CUTOVER__REDIS__KEY_PREFIX", prefix)
        .env("MQ_CUTOVER__ADMIN__LISTEN", "127.0.0.1:0")
        .env_remove("RUST_LOG");
    c
}

fn run(cmd: &mut Command) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("run mq-cutover");
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

fn config_with(replace: &str, by: &str) -> tempfile::NamedTempFile {
    let text = std::fs::read_to_string(example_config()).unwrap();
    assert!(text.contains(replace), "example config lacks {replace:?}");
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), text.replacen(replace, by, 1)).unwrap();
    f
}

#[test]
fn the_example_config_passes_check_config() {
    let (code, out, err) = run(mqc("redis://127.0.0.1:1", "x").arg("check-config"));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("config OK: sides kafka, rocketmq (from kafka to rocketmq)"),
        "{out}"
    );
}

#[test]
fn bad_configs_exit_78_with_one_line_naming_the_key() {
    let cases = [
        ("percent = 0", "percent = 101", "switches.initial.percent"),
        (
            "lease = \"30s\"",
            "lease = \"30s\"\nleese = 1",
            "arbiter.leese",
        ),
        ("to = \"rocketmq\"", "to = \"kafka\"", "cutover.to"),
        ("name = \"rocketmq\"", "name = \"kafka\"", "side[1].name"),
        (
            "max_attempts = 8",
            "max_attempts = \"many\"",
            "arbiter.max_attempts",
        ),
        (
            "ambiguous = \"at_least_once\"",
            "ambiguous = \"maybe\"",
            "arbiter.ambiguous",
        ),
        (
            "# \"session.timeout.ms\" = \"10000\"",
            "\"enable.auto.commit\" = \"false\"",
            "side[0].kafka.properties.enable.auto.commit",
        ),
    ];
    for (from, to, key) in cases {
        let f = config_with(from, to);
        let (code, _, err) = run(Command::new(env!("CARGO_BIN_EXE_mq-cutover"))
            .arg("--config")
            .arg(f.path())
            .arg("check-config"));
        assert_eq!(code, EXIT_CONFIG, "{from} -> {to}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains(&format!("`{key}`")), "{from} -> {to}: {err}");
    }
}

#[test]
fn an_environment_override_with_a_bad_value_exits_78() {
    let (code, _, err) = run(mqc("redis://127.0.0.1:1", "x")
        .env("MQ_CUTOVER__ARBITER__LEASE", "forever")
        .arg("check-config"));
    assert_eq!(code, EXIT_CONFIG);
    assert!(err.contains("`arbiter.lease`"), "{err}");
}

#[test]
fn check_config_prints_redis_urls_without_their_password() {
    let (code, out, err) = run(mqc("redis://mqc:hunter2@127.0.0.1:1/0", "x").arg("check-config"));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("redis://mqc:***@127.0.0.1:1/0"), "{out}");
    assert!(
        !out.contains("hunter2") && !err.contains("hunter2"),
        "{out}{err}"
    );
}

#[test]
fn a_weak_or_placeholder_admin_token_exits_78_without_showing_it() {
    for (var, token) in [
        ("MQ_CUTOVER__ADMIN__TOKEN", "s3cr3t-but-short"),
        (
            "MQ_CUTOVER__ADMIN__TOKEN",
            "REPLACE-ME-with-openssl-rand-hex-32-output",
        ),
        ("MQ_CUTOVER__ADMIN__VIEWER_TOKEN", "change-me"),
    ] {
        let (code, _, err) = run(mqc("redis://127.0.0.1:1", "x")
            .env(var, token)
            .arg("check-config"));
        assert_eq!(code, EXIT_CONFIG, "{token}: {err}");
        let key = if var.ends_with("VIEWER_TOKEN") {
            "`admin.viewer_token`"
        } else {
            "`admin.token`"
        };
        assert!(err.contains(key) && !err.contains(token), "{err}");
    }
}

#[test]
fn a_missing_config_file_exits_78() {
    let (code, _, err) = run(Command::new(env!("CARGO_BIN_EXE_mq-cutover")).args([
        "--config",
        "/nonexistent/mq.toml",
        "check-config",
    ]));
    assert_eq!(code, EXIT_CONFIG);
    assert!(err.contains("no config file"), "{err}");
}

#[test]
fn bad_usage_exits_64() {
    let (code, _, _) = run(mqc("redis://127.0.0.1:1", "x").arg("frobnicate"));
    assert_eq!(code, EXIT_USAGE);
    let (code, _, err) =
        run(mqc("redis://127.0.0.1:1", "x").args(["switch", "set", "--percent", "200"]));
    assert_eq!(code, EXIT_USAGE);
    assert!(err.contains("between 0 and 100"), "{err}");
}

/// The subcommand names a `--help` page lists, in order.
fn listed_commands(help: &str) -> Vec<&str> {
    help.lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        // A name sits at two spaces' indent; deeper lines continue a description.
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .collect()
}

#[test]
fn help_lists_only_the_commands_an_operator_runs() {
    let (code, out, err) = run(Command::new(env!("CARGO_BIN_EXE_mq-cutover")).arg("--help"));
    assert_eq!(code, 0, "{err}");
    // `help` is clap's own.
    assert_eq!(
        listed_commands(&out),
        [
            "run",
            "check-config",
            "switch",
            "inspect",
            "release",
            "audit",
            "dead",
            "parity",
            "help"
        ],
        "{out}"
    );
    for tool in ["produce", "reward-service", "grant-counter"] {
        let (code, _, _) = run(mqc("redis://127.0.0.1:1", "x").arg(tool));
        assert_eq!(code, EXIT_USAGE, "the daemon still takes `{tool}`");
    }
}

#[test]
fn the_kit_binary_holds_the_test_and_demo_tools() {
    let (code, out, err) = run(Command::new(common::kit_bin()).arg("--help"));
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        listed_commands(&out),
        ["produce", "reward-service", "grant-counter", "help"],
        "{out}"
    );
    let (code, _, _) = run(Command::new(common::kit_bin()).arg("frobnicate"));
    assert_eq!(code, EXIT_USAGE);
    // `produce` reads the daemon's config and refuses a bad one as the daemon does.
    let (code, _, err) = run(Command::new(common::kit_bin()).args([
        "produce",
        "--config",
        "/nonexistent/mq.toml",
        "--count",
        "1",
    ]));
    assert_eq!(code, EXIT_CONFIG, "{err}");
    assert!(err.contains("no config file"), "{err}");
}

/// `GET path` on 127.0.0.1:`port` over plain HTTP/1.0: the whole answer, or None when nothing
/// listens yet.
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    Some(answer)
}

#[test]
fn kit_downstreams_serve_on_the_given_port_and_stop_on_sigterm() {
    for tool in ["reward-service", "grant-counter"] {
        let port = common::free_port();
        let mut child = Command::new(common::kit_bin())
            .args([tool, "--listen", &format!("127.0.0.1:{port}")])
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let stats = loop {
            if let Some(a) = http_get(port, "/stats") {
                break a;
            }
            assert!(Instant::now() < deadline, "{tool} never answered on {port}");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            stats.lines().next().is_some_and(|l| l.contains(" 200 ")),
            "{tool}: {stats}"
        );
        assert!(stats.contains("\"calls\":0"), "{tool}: {stats}");
        let (status, err) = terminate(&mut child);
        assert!(status.success(), "{tool}: exit {status:?}: {err}");
        assert!(err.contains("listening"), "{tool}: {err}");
    }
}

#[test]
fn unreachable_redis_is_a_runtime_error_in_one_line() {
    let port = common::free_port();
    let (code, _, err) =
        run(mqc(&format!("redis://127.0.0.1:{port}"), "x").args(["switch", "show"]));
    assert_eq!(code, EXIT_RUNTIME);
    assert!(err.contains("redis unavailable"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn switch_commands_change_show_and_audit() {
    let url = common::redis_url();
    let prefix = common::unique_prefix("cli-switch");
    let (code, out, err) =
        run(mqc(&url, &prefix).args(["switch", "set", "--consume", "on", "--percent", "10"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("consume on, percent 10"), "{out}");
    let (code, _, _) = run(mqc(&url, &prefix).args(["switch", "whitelist", "add", "u-2", "u-1"]));
    assert_eq!(code, 0);
    let (_, out, _) = run(mqc(&url, &prefix).args(["switch", "whitelist", "list"]));
    assert_eq!(out, "u-1\nu-2\n");
    let (_, out, _) = run(mqc(&url, &prefix).args(["switch", "whitelist", "remove", "u-2"]));
    assert!(out.contains("whitelist 1 id(s)"), "{out}");
    let (_, out, _) = run(mqc(&url, &prefix).args(["switch", "show"]));
    assert!(
        out.contains("consume:   on\npercent:   10\nwhitelist: 1 id(s)\nversion:   3"),
        "{out}"
    );
    assert!(out.contains("v3: whitelist -u-2"), "{out}");
    let (_, out, _) = run(mqc(&url, &prefix).args(["audit", "--count", "2"]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].contains("cli:") && lines[0].ends_with("v3: whitelist -u-2"),
        "{out}"
    );
    assert!(lines[1].ends_with("v2: whitelist +u-2,u-1"), "{out}");
    common::cleanup(&[url], &prefix);
}

#[tokio::test]
async fn inspect_and_release_a_dead_id() {
    let url = common::redis_url();
    let prefix = common::unique_prefix("cli-release");
    let store = common::connect(RedisMode::Standalone, &prefix).await;
    let arbiter = Arbiter::new(
        &store,
        &common::arbiter_config(Duration::from_secs(30), AmbiguousPolicy::AtMostOnce, 8),
    );
    let token = LeaseTokens::default().next();
    arbiter
        .claim(&ClaimRequest {
            id: "order-7",
            side: "rocketmq",
            routed_owner: "rocketmq",
            token: &token,
        })
        .await
        .unwrap();
    arbiter
        .complete(&CompleteRequest {
            id: "order-7",
            side: "rocketmq",
            token: &token,
            outcome: &Outcome::Ambiguous("timeout after 5s".into()),
        })
        .await
        .unwrap();

    let (code, out, err) = run(mqc(&url, &prefix).args(["inspect", "order-7"]));
    assert_eq!(code, 0, "{err}");
    for want in [
        "owner:     rocketmq",
        "state:     dead",
        "attempts:  1",
        "seen by:   rocketmq",
        "reason:    in doubt: timeout after 5s",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    let (code, out, _) = run(mqc(&url, &prefix).args(["release", "order-7"]));
    assert_eq!(code, 0);
    assert_eq!(
        out.trim(),
        "released order-7: dead (in doubt: timeout after 5s) -> pending"
    );
    let (_, out, _) = run(mqc(&url, &prefix).args(["inspect", "order-7"]));
    assert!(
        out.contains("state:     pending") && out.contains("attempts:  0"),
        "{out}"
    );
    // Releasing again is refused: it is no longer dead.
    let (code, _, err) = run(mqc(&url, &prefix).args(["release", "order-7"]));
    assert_eq!(code, EXIT_RUNTIME);
    assert!(err.contains("is pending, not dead"), "{err}");
    let (_, out, _) = run(mqc(&url, &prefix).args(["audit"]));
    assert!(
        out.contains("release")
            && out.contains("order-7: dead (in doubt: timeout after 5s) -> pending"),
        "{out}"
    );
    let (code, _, err) = run(mqc(&url, &prefix).args(["inspect", "never-seen"]));
    assert_eq!(code, EXIT_RUNTIME);
    assert!(
        err.contains("no record of message id `never-seen`"),
        "{err}"
    );
    common::cleanup(&[url], &prefix);
}

/// An id and a reason a hostile producer (or a hostile downstream's error text) chose: clear the
/// screen, set the terminal title, turn the text red, and reverse the rest of the line.
const HOSTILE_ID: &str = "evil\x1b[2J\x1b]0;owned\x07\u{9b}31m\u{202e}di";
const HOSTILE_REASON: &str = "HTTP 400: \x1b[31mgranted\r\nall good";

fn assert_no_terminal_controls(what: &str, out: &str) {
    assert!(
        !out.chars()
            .any(|c| (c.is_control() && c != '\n') || c == '\u{202e}'),
        "{what} prints a terminal control character: {out:?}"
    );
}

#[tokio::test]
async fn dead_letters_and_inspect_print_hostile_ids_and_reasons_escaped() {
    use mq_cutover::dead::{DeadLetters, Parking};
    use mq_cutover::message::Origin;

    let url = common::redis_url();
    let prefix = common::unique_prefix("cli-hostile");
    let store = common::connect(RedisMode::Standalone, &prefix).await;
    let origin = Origin {
        side: "kafka".into(),
        topic: "reward".into(),
        partition: 0,
        broker: None,
        offset: 3,
        born_ms: 0,
    };
    let entry = DeadLetters::new(&store, 1000)
        .park(&[Parking {
            message_id: Some(HOSTILE_ID),
            business_id: Some("u\x1b[1m"),
            reason: HOSTILE_REASON,
            origin: &origin,
            attempts: 1,
            payload: b"{\"x\":\"\x1b[5mblink\"}",
        }])
        .await
        .unwrap()
        .0
        .remove(0);
    let arbiter = Arbiter::new(
        &store,
        &common::arbiter_config(Duration::from_secs(30), AmbiguousPolicy::AtMostOnce, 8),
    );
    let token = LeaseTokens::default().next();
    arbiter
        .claim(&ClaimRequest {
            id: HOSTILE_ID,
            side: "kafka",
            routed_owner: "kafka",
            token: &token,
        })
        .await
        .unwrap();
    arbiter
        .complete(&CompleteRequest {
            id: HOSTILE_ID,
            side: "kafka",
            token: &token,
            outcome: &Outcome::Fatal(HOSTILE_REASON.into()),
        })
        .await
        .unwrap();

    let escaped_id = "evil\\x1b[2J\\x1b]0;owned\\x07\\u{9b}31m\\u{202e}di";
    let escaped_reason = "HTTP 400: \\x1b[31mgranted\\r\\nall good";
    let (code, out, err) = run(mqc(&url, &prefix).args(["dead", "list"]));
    assert_eq!(code, 0, "{err}");
    assert_no_terminal_controls("dead list", &out);
    assert!(
        out.contains(&format!("id={escaped_id}")) && out.contains(escaped_reason),
        "{out}"
    );
    let (code, out, err) = run(mqc(&url, &prefix).args(["dead", "show", &entry]));
    assert_eq!(code, 0, "{err}");
    assert_no_terminal_controls("dead show", &out);
    for want in [
        format!("message id:  {escaped_id}"),
        "business id: u\\x1b[1m".into(),
        format!("reason:      {escaped_reason}"),
        "payload:     {\"x\":\"\\x1b[5mblink\"}".into(),
    ] {
        assert!(out.contains(&want), "missing {want:?} in\n{out}");
    }
    let (code, out, err) = run(mqc(&url, &prefix).args(["inspect", HOSTILE_ID]));
    assert_eq!(code, 0, "{err}");
    assert_no_terminal_controls("inspect", &out);
    assert!(
        out.contains(&format!("message {escaped_id}\n"))
            && out.contains(&format!("reason:    {escaped_reason}")),
        "{out}"
    );
    common::cleanup(&[url], &prefix);
}

#[test]
fn run_seeds_the_switches_and_stops_cleanly_on_sigterm() {
    let url = common::redis_url();
    let prefix = common::unique_prefix("cli-run");
    let mut child = mqc(&url, &prefix)
        .env("MQ_CUTOVER__SWITCHES__INITIAL__PERCENT", "15")
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The seeded switches appear in Redis.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, out, _) = run(mqc(&url, &prefix).args(["switch", "show"]));
        if out.contains("percent:   15") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "run did not seed the switches: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let sent = Instant::now();
    let (status, err) = terminate(&mut child);
    assert!(status.success(), "exit {status:?}: {err}");
    // The drain deadline (15 s by default) bounds the stop; the consumers leaving their
    // groups take a few seconds of it.
    assert!(
        sent.elapsed() < Duration::from_secs(15),
        "slow stop: {:?}",
        sent.elapsed()
    );
    assert!(err.contains("seeded from [switches.initial]"), "{err}");
    assert!(err.contains("SIGTERM"), "{err}");
    common::cleanup(&[url], &prefix);
}

#[test]
fn run_says_when_redis_is_unreachable_and_keeps_running() {
    let port = common::free_port();
    let mut child = mqc(&format!("redis://127.0.0.1:{port}"), "x")
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the daemon must wait for redis, not exit"
    );
    let (status, err) = terminate(&mut child);
    assert!(status.success(), "{err}");
    assert!(
        err.contains("redis unreachable: no message can be claimed until it returns"),
        "{err}"
    );
}

/// The binary with the config at `path`, pointed at `redis_url`.
fn mqc_at(path: &std::path::Path, redis_url: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mq-cutover"));
    c.arg("--config")
        .arg(path)
        .env("MQ_CUTOVER__REDIS__URLS", redis_url)
        .env_remove("RUST_LOG");
    c
}

#[test]
fn check_config_names_the_secrets_it_read_and_never_prints_them() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, value: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, value).unwrap();
        p.display().to_string()
    };
    let kafka_pw = file("kafka-password", "kafka-S3CRET-from-file\n");
    let api_key = file("api-key", "api-S3CRET-from-file\n");
    let token = file("token", "token-S3CRET-from-file-0b8d6f4a2c1e3b5d7f9a");
    let cfg = config_with(
        "[side.kafka.properties]\n",
        "[side.kafka.properties]\n\"security.protocol\" = \"SASL_PLAINTEXT\"\n\
         \"sasl.mechanism\" = \"SCRAM-SHA-512\"\n\"sasl.username\" = \"mqc\"\n",
    );
    let text = std::fs::read_to_string(cfg.path())
        .unwrap()
        .replacen(
            "[side.kafka.secret_files]\n",
            &format!("[side.kafka.secret_files]\n\"sasl.password\" = \"{kafka_pw}\"\n"),
            1,
        )
        .replacen(
            "[sink.header_files]\n",
            &format!("[sink.header_files]\nX-Api-Key = \"{api_key}\"\n"),
            1,
        );
    std::fs::write(
        cfg.path(),
        text.replace("# token = \"...\"", &format!("token_file = \"{token}\"")),
    )
    .unwrap();
    let (code, out, err) = run(mqc_at(cfg.path(), "redis://mqc:url-S3CRET@127.0.0.1:1")
        .env("MQ_CUTOVER__REDIS__PASSWORD", "env-S3CRET")
        .arg("check-config"));
    assert_eq!(code, 0, "{err}");
    for secret in [
        "kafka-S3CRET",
        "api-S3CRET",
        "token-S3CRET",
        "url-S3CRET",
        "env-S3CRET",
    ] {
        assert!(
            !out.contains(secret) && !err.contains(secret),
            "{secret} printed:\n{out}{err}"
        );
    }
    assert!(
        out.contains("side kafka: Kafka SASL_PLAINTEXT SCRAM-SHA-512"),
        "{out}"
    );
    assert!(out.contains("redis://mqc:***@127.0.0.1:1"), "{out}");
    for named in [
        "redis.password",
        "admin.token (file ",
        "side[0].kafka.properties.\"sasl.password\" (file ",
        "sink.headers.X-Api-Key (file ",
    ] {
        assert!(out.contains(named), "{named} not listed:\n{out}");
    }
}

#[test]
fn a_missing_secret_file_or_a_secret_given_twice_exits_78_naming_the_key() {
    let cfg = config_with(
        "# token = \"...\"",
        "token_file = \"/nonexistent/admin-token\"",
    );
    let (code, _, err) = run(mqc_at(cfg.path(), "redis://127.0.0.1:1").arg("check-config"));
    assert_eq!(code, EXIT_CONFIG);
    assert!(
        err.contains("`admin.token_file`") && err.contains("/nonexistent/admin-token"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("pw");
    std::fs::write(&p, "from-file-S3CRET").unwrap();
    let cfg = config_with(
        "# password = \"...\"",
        &format!("password_file = \"{}\"", p.display()),
    );
    let (code, out, err) = run(mqc_at(cfg.path(), "redis://127.0.0.1:1")
        .env("MQ_CUTOVER__REDIS__PASSWORD", "env-S3CRET")
        .arg("check-config"));
    assert_eq!(code, EXIT_CONFIG, "{out}");
    assert!(
        err.contains("`redis.password_file`") && err.contains("`redis.password`"),
        "{err}"
    );
    assert!(!err.contains("S3CRET"), "{err}");
}

#[test]
fn kafka_security_gaps_exit_78_naming_the_property() {
    let cases = [
        (
            "\"security.protocol\" = \"SASL_SSL\"\n",
            "side[0].kafka.properties.\"sasl.mechanism\"",
        ),
        (
            "\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"\n\"sasl.username\" = \"u\"\n",
            "side[0].kafka.properties.\"sasl.password\"",
        ),
        (
            "\"security.protocol\" = \"SSL\"\n\"ssl.ca.location\" = \"/nonexistent/ca.pem\"\n",
            "side[0].kafka.properties.\"ssl.ca.location\"",
        ),
        (
            "\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"SCRAM\"\n",
            "side[0].kafka.properties.\"sasl.mechanism\"",
        ),
    ];
    for (props, key) in cases {
        let cfg = config_with(
            "[side.kafka.properties]\n",
            &format!("[side.kafka.properties]\n{props}"),
        );
        let (code, _, err) = run(mqc_at(cfg.path(), "redis://127.0.0.1:1").arg("check-config"));
        assert_eq!(code, EXIT_CONFIG, "{props}");
        assert!(err.contains(&format!("`{key}`")), "{props}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}

/// Sends SIGTERM to `child`, waits for it to exit, and returns its exit status and stderr.
fn terminate(child: &mut std::process::Child) -> (std::process::ExitStatus, String) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    (status, err)
}
