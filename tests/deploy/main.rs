//! Static checks of the deploy files (Dockerfile, docker-compose.yml, deploy/): no Docker engine
//! or cluster is needed, so they run with every `cargo test`.
//!
//! They prove that the files parse; that every config file they hand to the daemon passes the
//! real binary's `check-config` with the environment overrides the file sets; that the admin
//! port agrees between the configs, the port mappings, the scrape target, EXPOSE, HEALTHCHECK
//! and the Kubernetes ports and probes; that the probe paths are routes of the real admin router;
//! that every PromQL expression uses only metric names the daemon exports; that every image is
//! pinned; that every command line handed to the image parses with the real CLI; and that the
//! daemon's image holds the daemon only, the kit's tools running from the kit's image. A failure
//! names the file and the offending item.

mod files;
mod promql;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use clap::Parser;
use mq_cutover::admin::{router, AdminState};
use mq_cutover::cli::Cli;
use mq_cutover::config::{Config, Validated};
use mq_cutover::sink::breaker::CircuitBreaker;
use mq_cutover::telemetry::metrics::{Metrics, NAMES};
use serde_yaml::Value;
use tower::ServiceExt;

use files::*;

const COMPOSE: &str = "docker-compose.yml";
const DOCKERFILE: &str = "Dockerfile";
const PROMETHEUS: &str = "deploy/prometheus/prometheus.yml";
const ALERTS: &str = "deploy/prometheus/alerts.yml";
const K8S: &str = "deploy/k8s";
const DASHBOARDS: &str = "deploy/grafana/dashboards";
const RUNBOOK: &str = "docs/operations.md";
/// The image built from the Dockerfile, by name (its tag is the crate's version).
const IMAGE: &str = "mq-cutover";
/// The kit's image (the Dockerfile's `KIT_STAGE` target): the demo's reward service and traffic.
const KIT_IMAGE: &str = "mqc-kit";
/// The Dockerfile stage of the kit's image.
const KIT_STAGE: &str = "kit";

/// The compose file's secrets: from `.env` beside it, which the user makes from this.
const ENV_EXAMPLE: &str = ".env.example";

/// Where the secrets a deploy file hands over come from in a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Secrets {
    /// What a user puts in `.env` / the Secret: a strong random value each.
    User,
    /// The placeholders shipped in `.env.example` / the Secret template.
    Shipped,
}

/// The variables the compose file requires: those the compose loader names when it refuses to
/// load the file with an empty `.env`.
fn compose_required_variables() -> BTreeSet<String> {
    let refusal = compose_load(COMPOSE, &Vars::new())
        .expect_err("docker-compose.yml loads with no .env: it must require the secrets");
    let mut names = BTreeSet::new();
    let mut rest = refusal.as_str();
    while let Some(i) = rest.find("required variable ") {
        rest = &rest[i + "required variable ".len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        names.insert(rest[..end].to_owned());
    }
    assert!(
        !names.is_empty(),
        "the loader refused for another reason: {refusal}"
    );
    names
}

/// The compose project as Docker Compose loads it, with the given secrets in its `.env`.
fn compose(secrets: Secrets) -> Value {
    compose_load(COMPOSE, &compose_vars(secrets))
        .unwrap_or_else(|e| panic!("{COMPOSE}: the compose loader refuses it: {e}"))
}

/// The compose file's `.env` in a check.
fn compose_vars(secrets: Secrets) -> Vars {
    match secrets {
        Secrets::User => compose_required_variables()
            .into_iter()
            .map(|name| {
                let v = strong_secret(&name);
                (name, v)
            })
            .collect(),
        Secrets::Shipped => dotenv(ENV_EXAMPLE),
    }
}

/// A config file the deploy files hand to the daemon, with what comes with it.
struct HandedConfig {
    /// Where it is handed over, e.g. "docker-compose.yml service `mq-cutover`".
    origin: String,
    /// The file on disk (a temporary copy for a ConfigMap's key).
    file: PathBuf,
    /// The `MQ_CUTOVER…` variables set for that container (secrets as placeholders).
    env: BTreeMap<String, String>,
    /// Whether the container runs the daemon (`run`), which serves the admin port.
    daemon: bool,
    _dir: Option<tempfile::TempDir>,
}

impl HandedConfig {
    fn load(&self) -> Validated {
        Config::load_with_env(&self.file, self.env.clone())
            .and_then(Config::validate)
            .unwrap_or_else(|e| panic!("{}: {}: {e}", self.origin, self.file.display()))
    }
}

fn is_our_image(image: &str) -> bool {
    image_name(image) == Some(IMAGE)
}

fn is_kit_image(image: &str) -> bool {
    image_name(image) == Some(KIT_IMAGE)
}

/// `registry/name:tag` → `name`.
fn image_name(image: &str) -> Option<&str> {
    image.rsplit('/').next().unwrap_or(image).split(':').next()
}

/// The compose services running the daemon's or the kit's image with a `--config`.
fn compose_configs(secrets: Secrets) -> Vec<HandedConfig> {
    let compose = compose(secrets);
    let mut out = Vec::new();
    for (name, svc) in compose_services(&compose) {
        let image = text(&svc["image"]).unwrap_or_default();
        let args = compose_command(&svc);
        let Some(path) = flag_value(&args, "--config") else {
            continue;
        };
        if !is_our_image(&image) && !is_kit_image(&image) {
            continue;
        }
        let origin = format!("{COMPOSE} service `{name}`");
        let mounts = compose_mounts(&svc);
        let host = mounts.get(path).unwrap_or_else(|| {
            panic!("{origin}: --config {path} is not a bind mount of the service (volumes: {mounts:?})")
        });
        out.push(HandedConfig {
            origin,
            file: root().join(host),
            env: compose_environment(&svc)
                .into_iter()
                .filter(|(k, _)| k.starts_with("MQ_CUTOVER"))
                .collect(),
            daemon: args.first().map(String::as_str) == Some("run"),
            _dir: None,
        });
    }
    out
}

/// Every Kubernetes document under deploy/k8s, with the file it came from.
fn k8s_documents() -> Vec<(String, Value)> {
    files_under(K8S, &[".yaml", ".yml"])
        .into_iter()
        .flat_map(|f| yaml_documents(&f).into_iter().map(move |d| (f.clone(), d)))
        .filter(|(_, d)| d["kind"].is_string())
        .collect()
}

fn k8s_named<'a>(docs: &'a [(String, Value)], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter()
        .map(|(_, d)| d)
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
}

/// The pod templates of the workloads: (file, workload name, pod spec, pod annotations).
fn k8s_pods(docs: &[(String, Value)]) -> Vec<(String, String, Value, Value)> {
    docs.iter()
        .filter(|(_, d)| {
            matches!(
                d["kind"].as_str(),
                Some("Deployment" | "StatefulSet" | "DaemonSet" | "Job")
            )
        })
        .map(|(f, d)| {
            (
                f.clone(),
                text(&d["metadata"]["name"]).unwrap_or_default(),
                d["spec"]["template"]["spec"].clone(),
                d["spec"]["template"]["metadata"]["annotations"].clone(),
            )
        })
        .collect()
}

/// Whether a Kubernetes container runs the daemon (`mq-cutover run …`).
fn runs_daemon(container: &Value) -> bool {
    is_our_image(&text(&container["image"]).unwrap_or_default())
        && strings(&container["args"]).first().map(String::as_str) == Some("run")
}

fn containers(pod: &Value) -> Vec<Value> {
    ["containers", "initContainers"]
        .iter()
        .flat_map(|k| pod[*k].as_sequence().cloned().unwrap_or_default())
        .collect()
}

/// The Kubernetes containers running the image with a `--config`.
fn k8s_configs(secrets: Secrets) -> Vec<HandedConfig> {
    let docs = k8s_documents();
    let mut out = Vec::new();
    for (file, workload, pod, _) in k8s_pods(&docs) {
        for c in containers(&pod) {
            let image = text(&c["image"]).unwrap_or_default();
            let args = strings(&c["args"]);
            let Some(path) = flag_value(&args, "--config") else {
                continue;
            };
            if !is_our_image(&image) {
                continue;
            }
            let cname = text(&c["name"]).unwrap_or_default();
            let origin = format!("{file} `{workload}` container `{cname}`");
            // The mount that holds the file, and the ConfigMap key behind it.
            let mount = c["volumeMounts"]
                .as_sequence()
                .into_iter()
                .flatten()
                .find(|m| {
                    m["mountPath"]
                        .as_str()
                        .is_some_and(|p| path.starts_with(&format!("{}/", p.trim_end_matches('/'))))
                })
                .unwrap_or_else(|| panic!("{origin}: no volumeMount holds --config {path}"));
            let mount_path = mount["mountPath"]
                .as_str()
                .expect("mountPath")
                .trim_end_matches('/');
            let in_volume = &path[mount_path.len() + 1..];
            let vname = mount["name"].as_str().expect("volumeMount name");
            let volume = pod["volumes"]
                .as_sequence()
                .into_iter()
                .flatten()
                .find(|v| v["name"].as_str() == Some(vname))
                .unwrap_or_else(|| panic!("{origin}: no volume `{vname}`"));
            let cm_name = volume["configMap"]["name"]
                .as_str()
                .unwrap_or_else(|| panic!("{origin}: volume `{vname}` is not a ConfigMap"));
            let key = match volume["configMap"]["items"].as_sequence() {
                Some(items) => items
                    .iter()
                    .find(|i| i["path"].as_str() == Some(in_volume))
                    .and_then(|i| text(&i["key"]))
                    .unwrap_or_else(|| {
                        panic!("{origin}: ConfigMap volume `{vname}` has no item at {in_volume}")
                    }),
                None => in_volume.to_owned(),
            };
            let cm = k8s_named(&docs, "ConfigMap", cm_name)
                .unwrap_or_else(|| panic!("{origin}: ConfigMap `{cm_name}` is not under {K8S}"));
            let toml = text(&cm["data"][key.as_str()])
                .unwrap_or_else(|| panic!("{origin}: ConfigMap `{cm_name}` has no key `{key}`"));
            let dir = tempfile::tempdir().expect("temp dir");
            let tmp = dir.path().join(&key);
            std::fs::write(&tmp, toml).expect("write the ConfigMap's TOML");
            // Literal values as they are; secrets from the Secret under deploy/k8s (placeholders).
            let mut env = BTreeMap::new();
            for e in c["env"].as_sequence().into_iter().flatten() {
                let name = text(&e["name"]).expect("env name");
                if !name.starts_with("MQ_CUTOVER") {
                    continue;
                }
                let value = if let Some(v) = text(&e["value"]) {
                    v
                } else if e["valueFrom"]["secretKeyRef"].is_mapping() {
                    let r = &e["valueFrom"]["secretKeyRef"];
                    let (sname, skey) = (r["name"].as_str().unwrap(), r["key"].as_str().unwrap());
                    let secret = k8s_named(&docs, "Secret", sname).unwrap_or_else(|| {
                        panic!("{origin}: env {name}: Secret `{sname}` is not under {K8S}")
                    });
                    let shipped = text(&secret["stringData"][skey]).unwrap_or_else(|| {
                        panic!("{origin}: env {name}: Secret `{sname}` has no stringData `{skey}`")
                    });
                    match secrets {
                        Secrets::User => strong_secret(skey),
                        Secrets::Shipped => shipped,
                    }
                } else {
                    panic!("{origin}: env {name}: neither a value nor a secretKeyRef")
                };
                env.insert(name, value);
            }
            out.push(HandedConfig {
                origin: format!("{origin} (ConfigMap `{cm_name}` key `{key}`)"),
                file: tmp,
                env,
                daemon: args.first().map(String::as_str) == Some("run"),
                _dir: Some(dir),
            });
        }
    }
    out
}

/// Every config handed to the daemon, with the secrets a user gives it.
fn handed_configs() -> Vec<HandedConfig> {
    handed_configs_with(Secrets::User)
}

fn handed_configs_with(secrets: Secrets) -> Vec<HandedConfig> {
    let mut all = compose_configs(secrets);
    let k8s = k8s_configs(secrets);
    assert!(
        all.iter().any(|c| c.daemon),
        "{COMPOSE}: no service runs `{IMAGE} run --config …`"
    );
    assert!(
        k8s.iter().filter(|c| c.daemon).count() >= 2,
        "{K8S}: expected the Deployment and the sidecar example to run `{IMAGE} run --config …`"
    );
    all.extend(k8s);
    all
}

fn final_stage(instructions: &[Instruction]) -> &[Instruction] {
    let last_from = instructions
        .iter()
        .rposition(|i| i.keyword == "FROM")
        .expect("Dockerfile: no FROM");
    &instructions[last_from..]
}

/// A Dockerfile stage: its name (`AS …`), what it is built `FROM`, its instructions after that.
struct Stage<'a> {
    name: Option<String>,
    base: String,
    body: &'a [Instruction],
}

fn stages(instructions: &[Instruction]) -> Vec<Stage<'_>> {
    let starts: Vec<usize> = instructions
        .iter()
        .enumerate()
        .filter(|(_, i)| i.keyword == "FROM")
        .map(|(n, _)| n)
        .collect();
    starts
        .iter()
        .enumerate()
        .map(|(k, &at)| {
            let words: Vec<&str> = instructions[at]
                .args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let end = starts.get(k + 1).copied().unwrap_or(instructions.len());
            Stage {
                name: match words.as_slice() {
                    [_, as_, name, ..] if as_.eq_ignore_ascii_case("as") => Some(name.to_string()),
                    _ => None,
                },
                base: words.first().map(|w| w.to_string()).unwrap_or_default(),
                body: &instructions[at + 1..end],
            }
        })
        .collect()
}

/// The stage named `name` and the stages it is built on, itself first.
fn stage_chain<'s, 'a>(all: &'s [Stage<'a>], name: Option<&str>) -> Vec<&'s Stage<'a>> {
    let mut chain = Vec::new();
    let mut next = match name {
        Some(n) => all.iter().find(|s| s.name.as_deref() == Some(n)),
        None => all.last(),
    };
    while let Some(stage) = next {
        chain.push(stage);
        next = all
            .iter()
            .find(|s| s.name.as_deref() == Some(stage.base.as_str()));
    }
    chain
}

/// `COPY --from=STAGE SRC… DEST` → (STAGE, the SRC paths).
fn copy_from(i: &Instruction) -> Option<(String, Vec<String>)> {
    let stage = i
        .args
        .split_whitespace()
        .find_map(|w| w.strip_prefix("--from="))?;
    let paths: Vec<String> = i
        .args
        .split_whitespace()
        .filter(|w| !w.starts_with("--"))
        .map(str::to_owned)
        .collect();
    Some((
        stage.to_owned(),
        paths[..paths.len().saturating_sub(1)].to_vec(),
    ))
}

/// The Dockerfile HEALTHCHECK's port and path.
fn dockerfile_healthcheck() -> (u16, String) {
    let ins = dockerfile(DOCKERFILE);
    let hc = final_stage(&ins)
        .iter()
        .find(|i| i.keyword == "HEALTHCHECK")
        .unwrap_or_else(|| panic!("{DOCKERFILE}: the runtime stage has no HEALTHCHECK"));
    http_port_and_path(&hc.args).unwrap_or_else(|| {
        panic!(
            "{DOCKERFILE}: HEALTHCHECK {} calls no http://host:port/path",
            hc.args
        )
    })
}

/// The Kubernetes port a probe or Service names (a number, or a containerPort's name).
fn resolve_port(origin: &str, port: &Value, container: &Value) -> u16 {
    if let Some(n) = port.as_u64() {
        return n as u16;
    }
    let name = port
        .as_str()
        .unwrap_or_else(|| panic!("{origin}: port {port:?} is neither a number nor a name"));
    container["ports"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|p| p["name"].as_str() == Some(name))
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("{origin}: no containerPort named `{name}`")) as u16
}

fn alert_rules() -> Vec<Value> {
    yaml(ALERTS)["groups"]
        .as_sequence()
        .unwrap_or_else(|| panic!("{ALERTS}: no `groups`"))
        .iter()
        .flat_map(|g| g["rules"].as_sequence().cloned().unwrap_or_default())
        .collect()
}

/// Every PromQL expression of a dashboard: (panel title or variable name, expression).
fn dashboard_queries(dash: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(v: &serde_json::Value, title: &str, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(map) => {
                let title = map
                    .get("title")
                    .and_then(|t| t.as_str())
                    .unwrap_or(title)
                    .to_owned();
                for (k, child) in map {
                    match (k.as_str(), child) {
                        ("expr", serde_json::Value::String(e)) => {
                            out.push((title.clone(), e.clone()))
                        }
                        _ => walk(child, &title, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|i| walk(i, title, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], "", &mut out);
    for var in dash["templating"]["list"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().unwrap_or_default();
        let query = var["query"]
            .as_str()
            .or_else(|| var["query"]["query"].as_str());
        if var["type"] == "query" {
            if let Some(q) = query {
                out.push((format!("variable ${name}"), q.to_owned()));
            }
        }
    }
    out
}

/// Metric names the daemon exports, with the histogram series, and Prometheus' own `up`.
fn known_metric_names() -> BTreeSet<String> {
    let m = Metrics::default();
    // The histograms are exported with no observation too, but observe to be sure.
    m.sink_seconds.observe(0.1);
    m.claim_seconds.observe(0.1);
    // Labelled histograms show only once a series exists.
    m.side("kafka").decided(
        mq_cutover::telemetry::metrics::Fate::NotMine,
        std::time::Instant::now(),
    );
    let rendered = m.render();
    let histograms: BTreeSet<&str> = rendered
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" histogram"))
        .collect();
    assert!(!histograms.is_empty(), "the daemon exports no histogram?");
    let mut names: BTreeSet<String> = NAMES.iter().map(|s| (*s).to_owned()).collect();
    for h in histograms {
        assert!(NAMES.contains(&h), "histogram {h} is not listed in NAMES");
        for suffix in ["_bucket", "_sum", "_count"] {
            names.insert(format!("{h}{suffix}"));
        }
    }
    names.insert("up".into());
    names
}

// ---- the checks ------------------------------------------------------------------------------

#[test]
fn deploy_files_parse() {
    compose(Secrets::User);
    let yamls = files_under("deploy", &[".yml", ".yaml"]);
    assert!(
        yamls.len() >= 8,
        "expected the YAML files under deploy/, found {yamls:?}"
    );
    for f in &yamls {
        assert!(!yaml_documents(f).is_empty(), "{f}: empty");
    }
    let jsons = files_under("deploy", &[".json"]);
    assert!(!jsons.is_empty(), "no dashboard JSON under deploy/");
    for f in jsons {
        serde_json::from_str::<serde_json::Value>(&read(&f))
            .unwrap_or_else(|e| panic!("{f}: not valid JSON: {e}"));
    }
    assert!(
        dockerfile(DOCKERFILE)
            .iter()
            .filter(|i| i.keyword == "FROM")
            .count()
            >= 2,
        "{DOCKERFILE}: expected a multi-stage build (a builder and a runtime stage)"
    );
}

#[test]
fn handed_over_configs_pass_check_config() {
    let bin = env!("CARGO_BIN_EXE_mq-cutover");
    for c in handed_configs() {
        let mut cmd = Command::new(bin);
        // Only the overrides the deploy file sets: none from the environment running the test.
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("MQ_CUTOVER")) {
            cmd.env_remove(k);
        }
        let out = cmd
            .arg("--config")
            .arg(&c.file)
            .arg("check-config")
            .envs(&c.env)
            .output()
            .expect("run mq-cutover check-config");
        assert!(
            out.status.success(),
            "{}: `mq-cutover check-config` refused its config ({}) with overrides {:?}: {}{}",
            c.origin,
            c.file.display(),
            c.env.keys().collect::<Vec<_>>(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // The overrides must have taken: a secret given to the container ends up in the config.
        let cfg = c.load();
        if let Some(pw) = c.env.get("MQ_CUTOVER__REDIS__PASSWORD") {
            assert_eq!(
                cfg.redis.password.as_ref().map(|p| p.expose()),
                Some(pw.as_str()),
                "{}: MQ_CUTOVER__REDIS__PASSWORD did not reach redis.password",
                c.origin
            );
        }
        if c.daemon {
            // The daemon gets both admin tokens, so the status page and the API can be used.
            let a = &cfg.admin;
            for (var, token) in [
                ("MQ_CUTOVER__ADMIN__TOKEN", &a.token),
                ("MQ_CUTOVER__ADMIN__VIEWER_TOKEN", &a.viewer_token),
            ] {
                assert_eq!(
                    token.as_ref().map(|t| t.expose()),
                    c.env.get(var).map(String::as_str),
                    "{}: {var} is not handed to the daemon",
                    c.origin
                );
            }
        }
    }
}

/// `mq-cutover check-config` on `c`'s file with exactly the overrides `env`: exit code, stderr.
fn check_config(c: &HandedConfig, env: &BTreeMap<String, String>) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mq-cutover"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("MQ_CUTOVER")) {
        cmd.env_remove(k);
    }
    let out = cmd
        .arg("--config")
        .arg(&c.file)
        .arg("check-config")
        .envs(env)
        .output()
        .expect("run mq-cutover check-config");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `MQ_CUTOVER__ADMIN__VIEWER_TOKEN` → `admin.viewer_token`.
fn config_key(var: &str) -> String {
    var.trim_start_matches("MQ_CUTOVER__")
        .to_ascii_lowercase()
        .replace("__", ".")
}

#[test]
fn every_shipped_placeholder_is_refused_by_the_daemon() {
    let user = handed_configs_with(Secrets::User);
    let shipped = handed_configs_with(Secrets::Shipped);
    assert_eq!(user.len(), shipped.len());
    for (u, s) in user.iter().zip(&shipped) {
        assert_eq!(u.origin, s.origin);
        let secrets: Vec<&String> = u.env.keys().filter(|k| u.env[*k] != s.env[*k]).collect();
        if u.daemon {
            for var in [
                "MQ_CUTOVER__REDIS__PASSWORD",
                "MQ_CUTOVER__ADMIN__TOKEN",
                "MQ_CUTOVER__ADMIN__VIEWER_TOKEN",
            ] {
                assert!(
                    secrets.iter().any(|k| *k == var),
                    "{}: {var} is not a secret the user supplies",
                    u.origin
                );
            }
        }
        // One shipped value at a time, the others as a user would set them: each alone stops
        // the daemon, naming its key.
        for var in secrets {
            let mut env = u.env.clone();
            env.insert(var.clone(), s.env[var].clone());
            let (code, err) = check_config(u, &env);
            let key = config_key(var);
            assert_eq!(
                code, 78,
                "{}: the shipped {var} = {:?} is accepted: {err}",
                u.origin, s.env[var]
            );
            assert!(err.contains(&format!("`{key}`")), "{}: {err}", u.origin);
        }
    }
}

/// Whether a variable's name says it holds a secret.
fn secret_name(name: &str) -> bool {
    let n = name.to_ascii_uppercase();
    ["PASSWORD", "TOKEN", "SECRET"]
        .iter()
        .any(|w| n.contains(w))
        || n.ends_with("_AUTH")
        || n.ends_with("_KEY")
}

/// Whether `raw` (uninterpolated) is exactly one required variable: `${NAME:?message}`.
fn is_required_variable(raw: &str) -> bool {
    let found = interpolations(raw);
    raw.starts_with("${") && raw.ends_with('}') && found.len() == 1 && found[0].1.starts_with(":?")
}

#[test]
fn compose_has_no_default_secret_and_refuses_to_start_without_env() {
    for (name, op) in interpolations(&read(COMPOSE)) {
        assert!(
            !secret_name(&name) || op.starts_with(":?"),
            "{COMPOSE}: ${{{name}{op}}} has a default; a secret must be `${{{name}:?message}}`"
        );
    }
    // The file as written: a secret's value must be a required variable, not only resolve to one.
    let compose = yaml(COMPOSE);
    let mut grafana_password = false;
    for (service, svc) in compose_services(&compose) {
        for (k, v) in svc["environment"].as_mapping().into_iter().flatten() {
            let (k, raw) = (text(k).unwrap_or_default(), text(v).unwrap_or_default());
            if secret_name(&k) {
                assert!(
                    is_required_variable(&raw),
                    "{COMPOSE} service `{service}`: {k} = `{raw}` is not read from .env (`${{NAME:?message}}`)"
                );
            }
            grafana_password |= k == "GF_SECURITY_ADMIN_PASSWORD";
        }
        let args = compose_command(&svc);
        if let Some(pw) = flag_value(&args, "--requirepass") {
            assert!(
                is_required_variable(pw),
                "{COMPOSE} service `{service}`: --requirepass `{pw}` is not read from .env"
            );
        }
    }
    assert!(
        grafana_password,
        "{COMPOSE}: Grafana's admin password is not set (its default is admin / admin)"
    );
    // Compose refuses to start without .env (the loader names each variable it misses), and
    // .env.example says what to put there.
    let required = compose_required_variables();
    assert!(
        required.contains("REDIS_PASSWORD") && required.contains("MQ_CUTOVER_ADMIN_TOKEN"),
        "{required:?}"
    );
    assert_eq!(
        dotenv(ENV_EXAMPLE).keys().cloned().collect::<BTreeSet<_>>(),
        required,
        "{ENV_EXAMPLE} must list exactly the variables {COMPOSE} requires"
    );
    assert!(
        read(".gitignore")
            .lines()
            .any(|l| matches!(l.trim(), "/.env" | ".env")),
        ".gitignore does not keep .env out of version control"
    );
}

#[test]
fn compose_publishes_ports_on_the_hosts_loopback_only() {
    for (service, svc) in compose_services(&compose(Secrets::User)) {
        for p in svc["ports"].as_sequence().into_iter().flatten() {
            let on_loopback = match p {
                Value::Mapping(_) => text(&p["host_ip"]).as_deref() == Some("127.0.0.1"),
                other => text(other).is_some_and(|s| s.starts_with("127.0.0.1:")),
            };
            assert!(
                on_loopback,
                "{COMPOSE} service `{service}`: port {p:?} is published on every interface; \
                 bind it to 127.0.0.1"
            );
        }
    }
}

/// The files `kubectl apply -k deploy/k8s` applies.
fn kustomized() -> BTreeSet<String> {
    strings(&yaml(&format!("{K8S}/kustomization.yaml"))["resources"])
        .into_iter()
        .map(|r| format!("{K8S}/{r}"))
        .collect()
}

#[test]
fn the_kubernetes_secret_is_a_template_with_no_real_value_and_is_not_applied() {
    let docs = k8s_documents();
    let secrets: Vec<_> = docs
        .iter()
        .filter(|(_, d)| d["kind"].as_str() == Some("Secret"))
        .collect();
    assert!(!secrets.is_empty(), "{K8S}: no Secret template");
    for (file, d) in secrets {
        assert!(
            d["data"].is_null(),
            "{file}: a template has stringData placeholders, not data"
        );
        let values = d["stringData"].as_mapping().expect("stringData");
        assert!(!values.is_empty(), "{file}: an empty Secret");
        for (k, v) in values {
            let v = text(v).unwrap_or_default();
            assert!(
                mq_cutover::config::placeholder(&v).is_some(),
                "{file}: {k:?} holds `{v}`, which is not a placeholder the daemon refuses"
            );
        }
        assert!(
            !kustomized().contains(file),
            "{file}: applying the kustomization would overwrite the real Secret with placeholders"
        );
    }
}

/// A label selector's `matchLabels` holds only labels of `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector["matchLabels"].as_mapping().is_some_and(|m| {
        m.iter()
            .all(|(k, v)| labels[k.as_str().unwrap_or("")] == *v)
    })
}

/// A NetworkPolicy peer that names who it lets in: a non-empty pod or namespace selector, no
/// address block.
fn is_narrow_peer(peer: &Value) -> bool {
    let narrow = |s: &Value| {
        s.is_null()
            || s["matchLabels"].as_mapping().is_some_and(|m| !m.is_empty())
            || s["matchExpressions"]
                .as_sequence()
                .is_some_and(|m| !m.is_empty())
    };
    peer["ipBlock"].is_null()
        && !(peer["podSelector"].is_null() && peer["namespaceSelector"].is_null())
        && narrow(&peer["podSelector"])
        && narrow(&peer["namespaceSelector"])
}

#[test]
fn in_kubernetes_only_prometheus_and_operators_reach_the_admin_port() {
    let docs = k8s_documents();
    let policies: Vec<&(String, Value)> = docs
        .iter()
        .filter(|(_, d)| d["kind"].as_str() == Some("NetworkPolicy"))
        .collect();
    let mut checked = 0;
    for (file, d) in &docs {
        let pod = &d["spec"]["template"];
        let daemons: Vec<Value> = containers(&pod["spec"])
            .into_iter()
            .filter(runs_daemon)
            .collect();
        if daemons.is_empty() {
            continue;
        }
        let origin = format!(
            "{file} `{}`",
            text(&d["metadata"]["name"]).unwrap_or_default()
        );
        let labels = &pod["metadata"]["labels"];
        let admin_port: u16 = daemons[0]["ports"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|p| p["name"].as_str() == Some("admin"))
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("{origin}: no container port named admin"))
            as u16;
        let covering: Vec<_> = policies
            .iter()
            .filter(|(_, p)| selects(&p["spec"]["podSelector"], labels))
            .filter(|(_, p)| strings(&p["spec"]["policyTypes"]).contains(&"Ingress".to_owned()))
            .collect();
        assert!(
            !covering.is_empty(),
            "{origin}: no NetworkPolicy restricts who reaches the admin port"
        );
        let mut prometheus = false;
        for (pfile, p) in &covering {
            for rule in p["spec"]["ingress"].as_sequence().into_iter().flatten() {
                let admits_admin = match rule["ports"].as_sequence() {
                    None => true,
                    Some(ports) => ports.iter().any(|port| {
                        port["port"].as_str() == Some("admin")
                            || port["port"].as_u64() == Some(admin_port.into())
                    }),
                };
                if !admits_admin {
                    continue;
                }
                let from = rule["from"].as_sequence().cloned().unwrap_or_default();
                assert!(
                    !from.is_empty(),
                    "{pfile}: an ingress rule lets anyone reach the admin port of {origin}"
                );
                for peer in &from {
                    assert!(
                        is_narrow_peer(peer),
                        "{pfile}: peer {peer:?} reaching the admin port of {origin} is not a \
                         named set of pods"
                    );
                    prometheus |= peer["podSelector"]["matchLabels"]
                        .as_mapping()
                        .is_some_and(|m| m.values().any(|v| v.as_str() == Some("prometheus")));
                }
            }
            if kustomized().contains(file) {
                assert!(
                    kustomized().contains(pfile),
                    "{pfile}: not applied with {file} by the kustomization"
                );
            }
        }
        assert!(
            prometheus,
            "{origin}: Prometheus cannot reach the admin port"
        );
        checked += 1;
    }
    assert!(checked >= 2, "the Deployment and the sidecar example");
}

#[test]
fn command_lines_parse_with_the_real_cli() {
    let mut lines: Vec<(String, Vec<String>)> = Vec::new();
    let ins = dockerfile(DOCKERFILE);
    let stage = final_stage(&ins);
    let get = |k: &str| {
        stage
            .iter()
            .rfind(|i| i.keyword == k)
            .map(|i| exec_form(DOCKERFILE, k, &i.args))
            .unwrap_or_else(|| panic!("{DOCKERFILE}: the runtime stage has no {k}"))
    };
    let entrypoint = get("ENTRYPOINT");
    assert_eq!(
        entrypoint,
        [IMAGE],
        "{DOCKERFILE}: ENTRYPOINT must be [\"{IMAGE}\"]"
    );
    lines.push((format!("{DOCKERFILE} CMD"), get("CMD")));
    let mut kit_lines = Vec::new();
    for (name, svc) in compose_services(&compose(Secrets::User)) {
        let image = text(&svc["image"]).unwrap_or_default();
        let line = (
            format!("{COMPOSE} service `{name}` command"),
            compose_command(&svc),
        );
        if is_our_image(&image) {
            lines.push(line);
        } else if is_kit_image(&image) {
            kit_lines.push(line);
        }
    }
    let docs = k8s_documents();
    for (file, workload, pod, _) in k8s_pods(&docs) {
        for c in containers(&pod) {
            let image = text(&c["image"]).unwrap_or_default();
            if is_our_image(&image) || is_kit_image(&image) {
                assert!(
                    c["command"].is_null(),
                    "{file} `{workload}`: set `args`, not `command`, so the image's entrypoint stays"
                );
                let line = (
                    format!(
                        "{file} `{workload}` container `{}` args",
                        text(&c["name"]).unwrap_or_default()
                    ),
                    strings(&c["args"]),
                );
                if is_our_image(&image) {
                    lines.push(line);
                } else {
                    kit_lines.push(line);
                }
            }
        }
    }
    for (origin, args) in kit_lines {
        let argv = std::iter::once(KIT_IMAGE.to_owned()).chain(args.iter().cloned());
        if let Err(e) = mqc_testkit::cli::Cli::try_parse_from(argv) {
            panic!(
                "{origin}: `{KIT_IMAGE} {}` is not a valid command line: {e}",
                args.join(" ")
            );
        }
    }
    for (origin, args) in lines {
        let argv = std::iter::once(IMAGE.to_owned()).chain(args.iter().cloned());
        if let Err(e) = Cli::try_parse_from(argv) {
            panic!(
                "{origin}: `{IMAGE} {}` is not a valid command line: {e}",
                args.join(" ")
            );
        }
    }
}

#[test]
fn the_daemons_image_holds_the_daemon_only_and_the_kit_runs_from_its_own() {
    use clap::CommandFactory as _;
    let ins = dockerfile(DOCKERFILE);
    let all = stages(&ins);
    let daemon = stage_chain(&all, None);
    let mut copied = Vec::new();
    for stage in &daemon {
        for i in stage.body {
            assert!(
                !i.args.contains(KIT_IMAGE) && !i.args.contains("mqc-testkit"),
                "{DOCKERFILE}: the daemon's image (stage {:?}) names the kit: {} {}",
                stage.name,
                i.keyword,
                i.args
            );
            let Some((from, paths)) = copy_from(i) else {
                continue;
            };
            for p in &paths {
                assert_eq!(
                    std::path::Path::new(p).file_name().and_then(|f| f.to_str()),
                    Some(IMAGE),
                    "{DOCKERFILE}: the daemon's image copies {p} from stage {from}: the daemon only"
                );
            }
            // The stage it copies from builds the daemon's package alone.
            for builder in stage_chain(&all, Some(&from)) {
                for r in builder.body.iter().filter(|r| r.keyword == "RUN") {
                    if r.args.contains("cargo build") {
                        assert!(
                            r.args.contains("-p mq-cutover") && !r.args.contains("--workspace"),
                            "{DOCKERFILE}: stage {from} builds more than the daemon: {}",
                            r.args
                        );
                    }
                }
            }
            copied.extend(paths);
        }
    }
    assert!(
        !copied.is_empty(),
        "{DOCKERFILE}: the daemon's image copies no binary"
    );
    let kit = stage_chain(&all, Some(KIT_STAGE));
    assert!(
        kit.first().and_then(|s| s.name.as_deref()) == Some(KIT_STAGE),
        "{DOCKERFILE}: no `{KIT_STAGE}` stage for the kit's image"
    );
    assert_eq!(
        exec_form(
            DOCKERFILE,
            "ENTRYPOINT",
            &kit[0]
                .body
                .iter()
                .rfind(|i| i.keyword == "ENTRYPOINT")
                .expect("the kit stage's ENTRYPOINT")
                .args
        ),
        [KIT_IMAGE]
    );

    // Compose: a kit subcommand runs from the kit's image, which builds the kit's target; the
    // daemon's image builds the default (final) target.
    let kit_commands: Vec<String> = mqc_testkit::cli::Cli::command()
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .collect();
    assert!(
        kit_commands.iter().any(|c| c == "reward-service"),
        "{kit_commands:?}"
    );
    let mut kit_services = 0;
    // The file as written: the loader leaves out the services of a profile not asked for
    // (`traffic`).
    for (name, svc) in compose_services(&yaml(COMPOSE)) {
        let image = text(&svc["image"]).unwrap_or_default();
        let first = compose_command(&svc).into_iter().next().unwrap_or_default();
        let target = text(&svc["build"]["target"]);
        if kit_commands.contains(&first) {
            assert!(
                is_kit_image(&image),
                "{COMPOSE} service `{name}` runs `{first}` from `{image}`, not the kit's image"
            );
        }
        if is_kit_image(&image) {
            assert_eq!(
                target.as_deref(),
                Some(KIT_STAGE),
                "{COMPOSE} service `{name}`: the kit's image must build target `{KIT_STAGE}`"
            );
            kit_services += 1;
        }
        if is_our_image(&image) {
            assert!(
                target.is_none() || target.as_deref() == daemon[0].name.as_deref(),
                "{COMPOSE} service `{name}`: the daemon's image builds target {target:?}"
            );
        }
    }
    assert!(kit_services >= 2, "the demo's reward service and traffic");
}

#[test]
fn admin_port_agrees_everywhere() {
    let configs = handed_configs();
    let mut ports = BTreeSet::new();
    for c in configs.iter().filter(|c| c.daemon) {
        let listen = c.load().admin.listen;
        assert!(
            listen.ip().is_unspecified(),
            "{}: admin.listen = {listen} is not reachable from outside the container; use 0.0.0.0:{}",
            c.origin,
            listen.port()
        );
        ports.insert(listen.port());
    }
    assert_eq!(
        ports.len(),
        1,
        "the deploy configs disagree on the admin port: {ports:?}"
    );
    let port = *ports.first().unwrap();

    // Dockerfile: EXPOSE and HEALTHCHECK.
    let ins = dockerfile(DOCKERFILE);
    let exposed: Vec<u16> = final_stage(&ins)
        .iter()
        .filter(|i| i.keyword == "EXPOSE")
        .flat_map(|i| {
            i.args
                .split_whitespace()
                .filter_map(|p| p.split('/').next()?.parse().ok())
                .collect::<Vec<u16>>()
        })
        .collect();
    assert!(
        exposed.contains(&port),
        "{DOCKERFILE}: EXPOSE {exposed:?} lacks the admin port {port}"
    );
    let (hc_port, _) = dockerfile_healthcheck();
    assert_eq!(
        hc_port, port,
        "{DOCKERFILE}: HEALTHCHECK calls port {hc_port}, the admin port is {port}"
    );

    // Compose: the daemon's port mapping and healthcheck, the scrape target.
    let compose = compose(Secrets::User);
    let services = compose_services(&compose);
    let mut daemons = Vec::new();
    for c in compose_configs(Secrets::User).iter().filter(|c| c.daemon) {
        let name = c.origin.split('`').nth(1).unwrap().to_owned();
        let svc = &services[&name];
        let published = compose_container_ports(svc);
        assert!(
            published.contains(&port),
            "{}: ports {published:?} do not publish the admin port {port}",
            c.origin
        );
        let hc = strings(&svc["healthcheck"]["test"]).join(" ");
        let (p, _) = http_port_and_path(&hc).unwrap_or_else(|| {
            panic!(
                "{}: healthcheck `{hc}` calls no http://host:port/path",
                c.origin
            )
        });
        assert_eq!(
            p, port,
            "{}: healthcheck calls port {p}, the admin port is {port}",
            c.origin
        );
        daemons.push(name);
    }
    let prom = yaml(PROMETHEUS);
    let job = prom["scrape_configs"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|j| j["job_name"].as_str() == Some(IMAGE))
        .unwrap_or_else(|| {
            panic!("{PROMETHEUS}: no scrape job `{IMAGE}` (the alerts select on it)")
        });
    let targets: Vec<String> = job["static_configs"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|s| strings(&s["targets"]))
        .collect();
    assert!(
        !targets.is_empty(),
        "{PROMETHEUS}: job `{IMAGE}` has no targets"
    );
    for t in &targets {
        let (host, p) = t
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("{PROMETHEUS}: target {t} has no port"));
        assert_eq!(
            p.parse::<u16>().ok(),
            Some(port),
            "{PROMETHEUS}: target {t} is not on the admin port {port}"
        );
        assert!(
            daemons.iter().any(|d| d == host),
            "{PROMETHEUS}: target {t} is not a compose service running the daemon ({daemons:?})"
        );
    }

    // Kubernetes: containerPort, probes, annotations, Services.
    let docs = k8s_documents();
    for (file, workload, pod, annotations) in k8s_pods(&docs) {
        let origin = format!("{file} `{workload}`");
        let mut has_daemon = false;
        for c in containers(&pod) {
            if !runs_daemon(&c) {
                continue;
            }
            has_daemon = true;
            let declared = resolve_port(&origin, &Value::String("admin".into()), &c);
            assert_eq!(
                declared, port,
                "{origin}: containerPort `admin` is {declared}, the admin port is {port}"
            );
            for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
                let p = &c[probe]["httpGet"]["port"];
                if !p.is_null() {
                    let n = resolve_port(&origin, p, &c);
                    assert_eq!(
                        n, port,
                        "{origin}: {probe} probes port {n}, the admin port is {port}"
                    );
                }
            }
        }
        if has_daemon {
            let a = text(&annotations["prometheus.io/port"]);
            assert_eq!(
                a.as_deref(),
                Some(port.to_string().as_str()),
                "{origin}: annotation prometheus.io/port"
            );
        }
    }
    let services: Vec<&(String, Value)> = docs
        .iter()
        .filter(|(_, d)| d["kind"] == "Service")
        .collect();
    assert!(!services.is_empty(), "{K8S}: no Service for the metrics");
    for (file, svc) in services {
        let origin = format!(
            "{file} Service `{}`",
            text(&svc["metadata"]["name"]).unwrap_or_default()
        );
        for p in svc["spec"]["ports"].as_sequence().into_iter().flatten() {
            let target = &p["targetPort"];
            let is_admin = target.as_str() == Some("admin") || target.as_u64() == Some(port.into());
            assert!(
                is_admin,
                "{origin}: port {p:?} does not target the admin port"
            );
            assert_eq!(
                p["port"].as_u64(),
                Some(port.into()),
                "{origin}: Service port is not the admin port {port}"
            );
        }
        let a = text(&svc["metadata"]["annotations"]["prometheus.io/port"]);
        assert_eq!(
            a.as_deref(),
            Some(port.to_string().as_str()),
            "{origin}: annotation prometheus.io/port"
        );
    }
}

#[tokio::test]
async fn probe_paths_are_routes_of_the_daemon() {
    let mut paths: Vec<(String, String)> = Vec::new();
    let (_, hc_path) = dockerfile_healthcheck();
    assert_eq!(
        hc_path, "/healthz",
        "{DOCKERFILE}: HEALTHCHECK should probe liveness, /healthz"
    );
    paths.push((format!("{DOCKERFILE} HEALTHCHECK"), hc_path));

    let services = compose_services(&compose(Secrets::User));
    for c in compose_configs(Secrets::User).iter().filter(|c| c.daemon) {
        let name = c.origin.split('`').nth(1).unwrap();
        let hc = strings(&services[name]["healthcheck"]["test"]).join(" ");
        let (_, path) = http_port_and_path(&hc).expect("checked by admin_port_agrees_everywhere");
        paths.push((format!("{} healthcheck", c.origin), path));
    }
    let prom = yaml(PROMETHEUS);
    for job in prom["scrape_configs"].as_sequence().into_iter().flatten() {
        if job["job_name"].as_str() == Some(IMAGE) {
            let path = text(&job["metrics_path"]).unwrap_or_else(|| "/metrics".into());
            paths.push((format!("{PROMETHEUS} job `{IMAGE}` metrics_path"), path));
        }
    }
    let docs = k8s_documents();
    for (file, workload, pod, annotations) in k8s_pods(&docs) {
        let origin = format!("{file} `{workload}`");
        let all = containers(&pod);
        let daemons: Vec<&Value> = all.iter().filter(|c| runs_daemon(c)).collect();
        for c in &daemons {
            let live = text(&c["livenessProbe"]["httpGet"]["path"]);
            assert_eq!(
                live.as_deref(),
                Some("/healthz"),
                "{origin}: the daemon's livenessProbe must GET /healthz"
            );
            // Alone in its pod, the daemon reports readiness; as a sidecar it must not, or it
            // would take the application out of its Services (see deploy/k8s/sidecar.yaml).
            if all.len() == 1 {
                let ready = text(&c["readinessProbe"]["httpGet"]["path"]);
                assert_eq!(
                    ready.as_deref(),
                    Some("/readyz"),
                    "{origin}: the daemon's readinessProbe must GET /readyz"
                );
            }
            for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
                if let Some(p) = text(&c[probe]["httpGet"]["path"]) {
                    paths.push((format!("{origin} {probe}"), p));
                }
            }
        }
        if !daemons.is_empty() {
            if let Some(p) = text(&annotations["prometheus.io/path"]) {
                paths.push((format!("{origin} annotation prometheus.io/path"), p));
            }
        }
    }
    for (file, svc) in docs.iter().filter(|(_, d)| d["kind"] == "Service") {
        if let Some(p) = text(&svc["metadata"]["annotations"]["prometheus.io/path"]) {
            paths.push((format!("{file} Service annotation prometheus.io/path"), p));
        }
    }

    let (_tx, rx) = tokio::sync::watch::channel(None);
    let state = AdminState {
        metrics: Arc::new(Metrics::default()),
        redis_up: Arc::new(AtomicBool::new(false)),
        redis_problem: Default::default(),
        switches: rx,
        breaker: Arc::new(CircuitBreaker::new(&Default::default())),
        sources: Arc::from([]),
    };
    for (origin, path) in paths {
        let resp = router(state.clone())
            .oneshot(Request::get(path.as_str()).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_ne!(
            resp.status(),
            StatusCode::NOT_FOUND,
            "{origin}: the daemon's admin router does not serve {path}"
        );
    }
}

#[test]
fn promql_uses_only_exported_metric_names() {
    let known = known_metric_names();
    let mut exprs: Vec<(String, String)> = Vec::new();
    for rule in alert_rules() {
        let name = text(&rule["alert"])
            .or_else(|| text(&rule["record"]))
            .unwrap_or_default();
        let expr =
            text(&rule["expr"]).unwrap_or_else(|| panic!("{ALERTS}: rule `{name}` has no expr"));
        exprs.push((format!("{ALERTS} rule `{name}`"), expr));
    }
    for f in files_under(DASHBOARDS, &[".json"]) {
        let dash: serde_json::Value =
            serde_json::from_str(&read(&f)).expect("checked by deploy_files_parse");
        let queries = dashboard_queries(&dash);
        assert!(
            queries.len() >= 10,
            "{f}: only {} queries found; is the dashboard complete?",
            queries.len()
        );
        exprs.extend(
            queries
                .into_iter()
                .map(|(title, e)| (format!("{f} panel `{title}`"), e)),
        );
    }
    for (origin, expr) in exprs {
        let names = promql::metric_names(&expr);
        assert!(
            !names.is_empty(),
            "{origin}: no metric name found in `{expr}`"
        );
        for n in names {
            assert!(
                known.contains(&n),
                "{origin}: `{n}` is not a metric the daemon exports (telemetry::metrics::NAMES, \
                 histograms with _bucket/_sum/_count, or `up`), in `{expr}`"
            );
        }
    }
}

/// Runs promtool with `args`; panics with its output when it refuses.
fn promtool(args: &[&std::ffi::OsStr]) {
    let out = Command::new(tool("MQC_PROMTOOL"))
        .args(args)
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool {args:?} refuses:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_accepts_the_alert_rules_and_prometheus_yml_as_compose_mounts_them() {
    promtool(&[
        "check".as_ref(),
        "rules".as_ref(),
        root().join(ALERTS).as_os_str(),
    ]);
    // prometheus.yml names its rule files by their path in the container: map each through the
    // compose file's mounts, as Prometheus will find them there.
    let services = compose_services(&compose(Secrets::User));
    let mounts = compose_mounts(&services["prometheus"]);
    assert!(
        mounts.values().any(|host| host == PROMETHEUS),
        "{COMPOSE}: the prometheus service does not mount {PROMETHEUS} ({mounts:?})"
    );
    let mut prom = yaml(PROMETHEUS);
    let rule_files: Vec<String> = strings(&prom["rule_files"]);
    assert!(!rule_files.is_empty(), "{PROMETHEUS}: no rule_files");
    let mapped: Vec<Value> = rule_files
        .iter()
        .map(|f| {
            let host = mounts.get(f).unwrap_or_else(|| {
                panic!(
                    "{PROMETHEUS}: rule file {f} is not mounted by the compose file ({mounts:?})"
                )
            });
            Value::String(root().join(host).to_string_lossy().into_owned())
        })
        .collect();
    prom["rule_files"] = Value::Sequence(mapped);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prometheus.yml");
    std::fs::write(&path, serde_yaml::to_string(&prom).unwrap()).unwrap();
    promtool(&["check".as_ref(), "config".as_ref(), path.as_os_str()]);
}

#[test]
fn promtool_accepts_every_dashboard_query() {
    // Grafana's variables, as Grafana fills them in before Prometheus sees the query.
    let grafana = [
        ("$__rate_interval", "1m"),
        ("$__interval", "15s"),
        ("$side", "kafka"),
    ];
    let mut rules = Vec::new();
    for f in files_under(DASHBOARDS, &[".json"]) {
        let dash: serde_json::Value =
            serde_json::from_str(&read(&f)).expect("checked by deploy_files_parse");
        // Template variables' queries (`label_values(…)`) are Grafana's, not PromQL.
        for (title, mut expr) in dashboard_queries(&dash)
            .into_iter()
            .filter(|(title, _)| !title.starts_with("variable "))
        {
            for (var, value) in grafana {
                expr = expr.replace(var, value);
            }
            assert!(
                !expr.contains('$'),
                "{f} panel `{title}`: unknown variable in `{expr}`"
            );
            rules.push(serde_json::json!({
                "record": format!("dashboard:query_{}", rules.len()),
                "expr": expr,
                "labels": {"panel": title},
            }));
        }
    }
    assert!(rules.len() >= 10, "only {} dashboard queries", rules.len());
    // A query checked as a recording rule: promtool parses it with Prometheus's own parser.
    let file = serde_json::json!({"groups": [{"name": "dashboards", "rules": rules}]});
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboards.rules.yml");
    std::fs::write(&path, serde_json::to_string_pretty(&file).unwrap()).unwrap();
    promtool(&["check".as_ref(), "rules".as_ref(), path.as_os_str()]);
}

#[test]
fn every_alert_points_to_its_runbook_entry() {
    let runbook = read(RUNBOOK);
    let section = runbook
        .split_once("\n## Alerts")
        .map(|(_, s)| s.split("\n## ").next().unwrap_or(s))
        .unwrap_or_else(|| panic!("{RUNBOOK}: no `## Alerts` section"));
    let rules = alert_rules();
    assert!(
        rules.len() >= 8,
        "{ALERTS}: expected the alerts of docs/deploy.md, found {}",
        rules.len()
    );
    for rule in rules {
        let Some(alert) = text(&rule["alert"]) else {
            continue;
        };
        let origin = format!("{ALERTS} alert `{alert}`");
        assert!(
            matches!(
                rule["labels"]["severity"].as_str(),
                Some("critical" | "warning" | "info")
            ),
            "{origin}: labels.severity must be critical, warning or info"
        );
        assert!(
            text(&rule["annotations"]["summary"]).is_some(),
            "{origin}: no annotations.summary"
        );
        let want = format!("{RUNBOOK}#{}", alert.to_lowercase());
        assert_eq!(
            text(&rule["annotations"]["runbook_url"]).as_deref(),
            Some(want.as_str()),
            "{origin}: annotations.runbook_url"
        );
        assert!(
            section.contains(&format!("\n### {alert}\n")),
            "{origin}: {RUNBOOK} has no `### {alert}` entry under `## Alerts`"
        );
    }
}

#[test]
fn every_image_is_pinned() {
    let mut images: Vec<(String, String)> = Vec::new();
    let ins = dockerfile(DOCKERFILE);
    let mut stages = BTreeSet::new();
    for i in ins.iter().filter(|i| i.keyword == "FROM") {
        let words: Vec<&str> = i
            .args
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .collect();
        let image = words[0];
        if !stages.contains(image) {
            images.push((format!("{DOCKERFILE} FROM"), image.to_owned()));
        }
        if let (Some(as_), Some(name)) = (words.get(1), words.get(2)) {
            if as_.eq_ignore_ascii_case("as") {
                stages.insert(name.to_string());
            }
        }
    }
    for (name, svc) in compose_services(&compose(Secrets::User)) {
        let image =
            text(&svc["image"]).unwrap_or_else(|| panic!("{COMPOSE} service `{name}`: no `image`"));
        images.push((format!("{COMPOSE} service `{name}`"), image));
    }
    let docs = k8s_documents();
    for (file, workload, pod, _) in k8s_pods(&docs) {
        for c in containers(&pod) {
            let cname = text(&c["name"]).unwrap_or_default();
            let image = text(&c["image"])
                .unwrap_or_else(|| panic!("{file} `{workload}` container `{cname}`: no image"));
            images.push((format!("{file} `{workload}` container `{cname}`"), image));
        }
    }
    for (origin, image) in images {
        if let Err(why) = pinned(&image) {
            panic!("{origin}: image `{image}` {why}; pin an explicit version");
        }
        if is_our_image(&image) || is_kit_image(&image) {
            let tag = image.rsplit(':').next().unwrap();
            assert_eq!(
                tag,
                env!("CARGO_PKG_VERSION"),
                "{origin}: image `{image}` should carry the crate's version"
            );
        }
    }
}

#[test]
fn dockerfile_builds_a_non_root_image_with_a_healthcheck() {
    let ins = dockerfile(DOCKERFILE);
    let stage = final_stage(&ins);
    let user = stage
        .iter()
        .rfind(|i| i.keyword == "USER")
        .unwrap_or_else(|| {
            panic!("{DOCKERFILE}: the runtime stage sets no USER (it would run as root)")
        });
    let uid = user.args.split(':').next().unwrap_or_default();
    assert!(
        uid != "root" && uid != "0",
        "{DOCKERFILE}: USER {} is root",
        user.args
    );
    // A numeric user lets Kubernetes' runAsNonRoot verify it; the manifests use the same id.
    let docs = k8s_documents();
    for (file, workload, pod, _) in k8s_pods(&docs) {
        let run_as = text(&pod["securityContext"]["runAsUser"]);
        assert_eq!(
            run_as.as_deref(),
            Some(uid),
            "{file} `{workload}`: securityContext.runAsUser should be the image's USER"
        );
    }
    assert!(
        stage
            .iter()
            .any(|i| i.keyword == "COPY" && i.args.starts_with("--from=")),
        "{DOCKERFILE}: the runtime stage copies nothing from the builder"
    );
    // Every path copied from the build context must survive .dockerignore's allow-list.
    let ignore = read(".dockerignore");
    let allowed: Vec<&str> = ignore
        .lines()
        .filter_map(|l| l.trim().strip_prefix('!'))
        .map(|l| l.trim_end_matches('/'))
        .collect();
    let excludes_all = ignore.lines().any(|l| l.trim() == "*");
    for i in ins
        .iter()
        .filter(|i| i.keyword == "COPY" && !i.args.starts_with("--from="))
    {
        let words: Vec<&str> = i
            .args
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .collect();
        for src in &words[..words.len() - 1] {
            let src = src.trim_end_matches('/');
            assert!(
                !excludes_all
                    || allowed
                        .iter()
                        .any(|a| src == *a || src.starts_with(&format!("{a}/"))),
                "{DOCKERFILE}: COPY {src} is excluded from the build context by .dockerignore"
            );
        }
    }
}

#[test]
fn compose_daemon_starts_after_what_its_config_names() {
    let compose = compose(Secrets::User);
    let services = compose_services(&compose);
    for c in compose_configs(Secrets::User).iter().filter(|c| c.daemon) {
        let name = c.origin.split('`').nth(1).unwrap();
        let cfg = c.load();
        let mut hosts: Vec<String> = cfg
            .redis
            .urls
            .iter()
            .map(|u| host_of(u).to_owned())
            .collect();
        for side in &cfg.sides {
            if let Some(k) = &side.kafka {
                hosts.extend(
                    k.bootstrap_servers
                        .split(',')
                        .map(|s| host_of(s.trim()).to_owned()),
                );
            }
            if let Some(r) = &side.rocketmq {
                hosts.extend(
                    r.name_server
                        .split(';')
                        .map(|s| host_of(s.trim()).to_owned()),
                );
            }
        }
        hosts.push(host_of(&cfg.sink.url).to_owned());
        // Everything the daemon waits for, directly or through another service (an init job
        // that waits for its broker), with a condition stronger than "started".
        let mut waits: BTreeSet<String> = BTreeSet::new();
        let mut todo = vec![name.to_owned()];
        while let Some(s) = todo.pop() {
            let deps = services[&s]["depends_on"]
                .as_mapping()
                .cloned()
                .unwrap_or_default();
            for (dep, how) in deps {
                let dep = text(&dep).unwrap();
                let cond = how["condition"].as_str().unwrap_or("service_started");
                assert!(
                    services.contains_key(&dep),
                    "{COMPOSE} service `{s}`: depends_on an unknown service `{dep}`"
                );
                match cond {
                    "service_healthy" => {
                        let hc = &services[&dep]["healthcheck"];
                        assert!(
                            hc["test"].is_sequence() || hc["test"].is_string(),
                            "{COMPOSE} service `{s}`: waits for `{dep}` to be healthy, but `{dep}` has no healthcheck"
                        );
                    }
                    "service_completed_successfully" => {}
                    other => panic!("{COMPOSE} service `{s}`: depends_on `{dep}` with condition {other}; wait for healthy or completed"),
                }
                if waits.insert(dep.clone()) {
                    todo.push(dep);
                }
            }
        }
        for h in hosts {
            assert!(
                services.contains_key(&h),
                "{}: its config names host `{h}`, which is no compose service",
                c.origin
            );
            assert!(
                waits.contains(&h),
                "{}: its config names `{h}`, but the service does not wait for it (depends_on)",
                c.origin
            );
        }
    }
    // The image's HEALTHCHECK probes the daemon's admin port: every other use of the image must
    // bring its own healthcheck or disable it, or it is reported unhealthy forever.
    for (name, svc) in &services {
        let image = text(&svc["image"]).unwrap_or_default();
        let args = compose_command(svc);
        if is_our_image(&image) && args.first().map(String::as_str) != Some("run") {
            let hc = &svc["healthcheck"];
            assert!(
                hc["test"].is_sequence() || hc["disable"].as_bool() == Some(true),
                "{COMPOSE} service `{name}`: runs `{}`, not the daemon, so the image's healthcheck does not fit; set or disable one",
                args.first().map(String::as_str).unwrap_or("")
            );
        }
    }
}

#[test]
fn compose_mounts_exist_and_provisioning_agrees() {
    let compose = compose(Secrets::User);
    let services = compose_services(&compose);
    for (name, svc) in &services {
        for (target, host) in compose_mounts(svc) {
            assert!(
                root().join(&host).exists(),
                "{COMPOSE} service `{name}`: mounts ./{host} at {target}, which does not exist"
            );
        }
    }
    // Prometheus loads its rules from a path that the compose file mounts from deploy/.
    let prom = yaml(PROMETHEUS);
    let prom_mounts = compose_mounts(&services["prometheus"]);
    for rule_file in strings(&prom["rule_files"]) {
        assert_eq!(
            prom_mounts.get(&rule_file).map(String::as_str),
            Some(ALERTS),
            "{PROMETHEUS}: rule file {rule_file} is not {ALERTS} mounted by {COMPOSE}"
        );
    }
    // The dashboards name the provisioned datasource by uid.
    let uids: BTreeSet<String> = files_under(
        "deploy/grafana/provisioning/datasources",
        &[".yml", ".yaml"],
    )
    .iter()
    .flat_map(|f| {
        yaml(f)["datasources"]
            .as_sequence()
            .cloned()
            .unwrap_or_default()
    })
    .filter_map(|d| text(&d["uid"]))
    .collect();
    for f in files_under(DASHBOARDS, &[".json"]) {
        let text = read(&f);
        let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
        fn walk(v: &serde_json::Value, out: &mut BTreeSet<String>) {
            match v {
                serde_json::Value::Object(m) => {
                    if let Some(uid) = m
                        .get("datasource")
                        .and_then(|d| d.get("uid"))
                        .and_then(|u| u.as_str())
                    {
                        out.insert(uid.to_owned());
                    }
                    m.values().for_each(|c| walk(c, out));
                }
                serde_json::Value::Array(a) => a.iter().for_each(|c| walk(c, out)),
                _ => {}
            }
        }
        let mut used = BTreeSet::new();
        walk(&dash, &mut used);
        for uid in used {
            assert!(
                uids.contains(&uid),
                "{f}: datasource uid `{uid}` is not provisioned ({uids:?})"
            );
        }
    }
}
