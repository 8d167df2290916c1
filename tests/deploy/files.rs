//! Reading the deploy files into the few facts the checks compare: the Dockerfile's
//! instructions, the compose services (as the compose loader resolves them), the Kubernetes
//! objects, the URLs in healthchecks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml::Value;

/// The repository root.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A file's text; panics naming the file when it cannot be read.
pub fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: cannot read: {e}"))
}

/// Every document of a YAML file; panics naming the file and the problem when one does not parse.
pub fn yaml_documents(rel: &str) -> Vec<Value> {
    let text = read(rel);
    serde_yaml::Deserializer::from_str(&text)
        .enumerate()
        .map(|(i, doc)| {
            Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{rel}: document {} is not valid YAML: {e}", i + 1))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// A single-document YAML file.
pub fn yaml(rel: &str) -> Value {
    let mut docs = yaml_documents(rel);
    assert_eq!(docs.len(), 1, "{rel}: expected one YAML document");
    docs.remove(0)
}

/// Files under `dir` (relative to the root) whose name ends with one of `exts`, as relative
/// paths, sorted.
pub fn files_under(dir: &str, exts: &[&str]) -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let mut found = Vec::new();
    walk(&root().join(dir), &mut found);
    let mut rel: Vec<String> = found
        .into_iter()
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            exts.iter().any(|e| name.ends_with(e))
        })
        .map(|p| {
            p.strip_prefix(root())
                .expect("under the root")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    rel.sort();
    rel
}

/// `v[key]` as a string, if it is one (numbers and booleans as their text).
pub fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A YAML sequence of scalars as strings (a missing value is an empty list).
pub fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| s.iter().filter_map(text).collect())
        .unwrap_or_default()
}

/// `http://host:port/path` somewhere in `s`: the port and the path.
pub fn http_port_and_path(s: &str) -> Option<(u16, String)> {
    let start = s.find("http://")? + "http://".len();
    let rest = &s[start..];
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '"' || c == '\'')
        .unwrap_or(rest.len());
    let url = &rest[..end];
    let (authority, path) = match url.find('/') {
        Some(i) => (&url[..i], &url[i..]),
        None => (url, "/"),
    };
    let port = authority.rsplit_once(':')?.1.parse().ok()?;
    Some((port, path.to_owned()))
}

/// Whether an image reference names an explicit version: a digest, or a tag that is not
/// `latest` and carries a version number. `Err` says what is wrong.
pub fn pinned(image: &str) -> Result<(), String> {
    if image.contains("@sha256:") {
        return Ok(());
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.split_once(':') {
        None => Err("has no tag (it means `latest`)".into()),
        Some((_, "latest")) => Err("is tagged `latest`".into()),
        Some((_, tag)) if !tag.chars().any(|c| c.is_ascii_digit()) => {
            Err(format!("tag `{tag}` names no version"))
        }
        Some(_) => Ok(()),
    }
}

/// The variables a compose `.env` file sets.
pub type Vars = BTreeMap<String, String>;

/// Every `${NAME}` of `s`: the name and what follows it inside the braces (`:?message`,
/// `:-default`, or nothing).
pub fn interpolations(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        let body = &rest[i + 2..];
        let Some(close) = body.find('}') else { break };
        let inner = &body[..close];
        let name_end = inner
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(inner.len());
        out.push((inner[..name_end].to_owned(), inner[name_end..].to_owned()));
        rest = &body[close + 1..];
    }
    out
}

/// A `KEY=VALUE` file (`.env`), comments and blank lines left out.
pub fn dotenv(rel: &str) -> Vars {
    read(rel)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("{rel}: `{l}` is not KEY=VALUE"));
            (k.trim().to_owned(), v.trim().to_owned())
        })
        .collect()
}

/// A secret as a user would make one (`openssl rand -hex 32`): 64 hex digits, the same for the
/// same name, different for different names.
pub fn strong_secret(name: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut out = String::new();
    for round in 0u8..4 {
        for b in name.bytes().chain([round]) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        out.push_str(&format!("{h:016x}"));
    }
    out
}

/// One instruction of a Dockerfile: its keyword (upper case) and the rest of its line, with
/// continuation lines joined.
#[derive(Debug, Clone)]
pub struct Instruction {
    /// `FROM`, `RUN`, `HEALTHCHECK`, …
    pub keyword: String,
    /// Everything after the keyword.
    pub args: String,
}

/// The instructions of a Dockerfile, comments dropped.
pub fn dockerfile(rel: &str) -> Vec<Instruction> {
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in read(rel).lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') {
            continue;
        }
        if let Some(part) = trimmed.strip_suffix('\\') {
            current.push_str(part);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        if !current.trim().is_empty() {
            logical.push(std::mem::take(&mut current));
        }
        current.clear();
    }
    logical
        .into_iter()
        .map(|l| {
            let (k, a) = l.trim().split_once(char::is_whitespace).unwrap_or((&l, ""));
            Instruction {
                keyword: k.to_ascii_uppercase(),
                args: a.trim().to_owned(),
            }
        })
        .collect()
}

/// A Dockerfile's exec-form argument (`["a", "b"]`) as a list.
pub fn exec_form(rel: &str, keyword: &str, args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|e| {
        panic!("{rel}: {keyword} {args} is not in exec form (a JSON array of strings): {e}")
    })
}

/// A tool `scripts/deploy-tools` installs, by the variable its `env` command sets; panics with
/// what to run when it is missing (a check never skips).
pub fn tool(var: &str) -> PathBuf {
    let path = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        panic!("{var} is not set: run `eval \"$(scripts/deploy-tools env)\"` after `scripts/deploy-tools` (scripts/test does)")
    });
    assert!(
        path.is_file(),
        "{var}={}: no such file; run scripts/deploy-tools",
        path.display()
    );
    path
}

/// The compose file as Docker Compose loads it (tools/compose-check: compose-go, the loader
/// `docker compose` uses) with `vars` as its `.env` and nothing from the environment: the
/// resolved project (interpolated, normalised: long-form ports and volumes, absolute bind
/// sources), or the loader's refusal.
pub fn compose_load(rel: &str, vars: &Vars) -> Result<Value, String> {
    let env = tempfile::NamedTempFile::new().expect("temporary .env");
    let text: String = vars.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    std::fs::write(env.path(), text).expect("write the temporary .env");
    let out = std::process::Command::new(tool("MQC_COMPOSE_CHECK"))
        .arg("--env-file")
        .arg(env.path())
        .arg(root().join(rel))
        .output()
        .expect("run compose-check");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("compose-check printed no project: {e}"))
}

/// The compose project's services by name.
pub fn compose_services(compose: &Value) -> BTreeMap<String, Value> {
    compose["services"]
        .as_mapping()
        .expect("docker-compose.yml: no `services` mapping")
        .iter()
        .map(|(k, v)| (text(k).expect("service name"), v.clone()))
        .collect()
}

/// A loaded compose service's environment (interpolated by the loader).
pub fn compose_environment(service: &Value) -> BTreeMap<String, String> {
    service["environment"]
        .as_mapping()
        .into_iter()
        .flatten()
        .map(|(k, v)| (text(k).expect("variable name"), text(v).unwrap_or_default()))
        .collect()
}

/// A loaded compose service's bind mounts of files in this repository: container path -> host
/// path relative to the root.
pub fn compose_mounts(service: &Value) -> BTreeMap<String, String> {
    service["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter(|v| text(&v["type"]).as_deref() == Some("bind"))
        .filter_map(|v| {
            let source = PathBuf::from(text(&v["source"])?);
            let rel = source.strip_prefix(root()).ok()?;
            Some((text(&v["target"])?, rel.to_string_lossy().into_owned()))
        })
        .collect()
}

/// A loaded compose service's command as a list of arguments.
pub fn compose_command(service: &Value) -> Vec<String> {
    strings(&service["command"])
}

/// The container side of a loaded compose service's published ports.
pub fn compose_container_ports(service: &Value) -> Vec<u16> {
    service["ports"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|p| text(&p["target"])?.parse().ok())
        .collect()
}

/// The value after `flag` in an argument list.
pub fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// The `host` part of `scheme://host:port/…` or `host:port`.
pub fn host_of(address: &str) -> &str {
    let no_scheme = address.split_once("://").map_or(address, |(_, r)| r);
    let authority = no_scheme.split('/').next().unwrap_or(no_scheme);
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolations_are_found_with_their_operators() {
        assert_eq!(
            interpolations("${A:-x} ${R:?set R (see .env)}"),
            vec![
                ("A".into(), ":-x".into()),
                ("R".into(), ":?set R (see .env)".into())
            ]
        );
    }

    #[test]
    fn strong_secrets_pass_the_token_rules() {
        let s = strong_secret("MQ_CUTOVER_ADMIN_TOKEN");
        assert_eq!(s.len(), 64);
        assert_ne!(s, strong_secret("MQ_CUTOVER_VIEWER_TOKEN"));
        assert!(mq_cutover::config::placeholder(&s).is_none());
    }

    #[test]
    fn pinning_rules() {
        assert!(pinned("redis:7.4.2").is_ok());
        assert!(pinned("prom/prometheus:v3.5.0").is_ok());
        assert!(pinned("localhost:5000/x@sha256:abc").is_ok());
        assert!(pinned("redis").is_err());
        assert!(pinned("redis:latest").is_err());
        assert!(pinned("debian:bookworm-slim").is_err());
        assert!(pinned("localhost:5000/redis").is_err());
    }

    #[test]
    fn urls_and_hosts() {
        assert_eq!(
            http_port_and_path("curl -fsS http://127.0.0.1:9464/healthz || exit 1"),
            Some((9464, "/healthz".into()))
        );
        assert_eq!(host_of("redis://:pw@redis:6379/0"), "redis");
        assert_eq!(host_of("kafka:9092"), "kafka");
    }
}
