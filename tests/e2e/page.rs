//! The status page in a real browser (headless Chromium): served by the real daemon after real
//! traffic, every value it shows (read back by its `data-field`) equals what `/api/status`,
//! `/api/switches` and `/api/parity` answer at the same moment; and, against a scripted
//! listener, the rates it computes from successive samples and the parity it renders are right.
//!
//! Chromium is required: a machine without it fails these tests with the command that installs
//! it (`scripts/testbed deps`); they never skip.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::harness::{Bed, Daemon, Setup, VIEWER_TOKEN};

/// Virtual time the page gets in the browser: room for three refreshes (every 2 s).
const PAGE_BUDGET_MS: u64 = 5000;

/// The Chromium binary: `MQC_CHROMIUM`, else `chromium` on the PATH. Panics when neither exists.
fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("MQC_CHROMIUM") {
        return PathBuf::from(p);
    }
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("chromium"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "chromium is not installed, and the status page tests need it: run \
             `scripts/testbed deps` (it runs `apt-get install chromium`), or point MQC_CHROMIUM \
             at a Chromium binary"
        )
    })
}

/// Loads `url` in headless Chromium, lets the page run for `budget_ms` of virtual time (network
/// waits do not count against it), and returns the DOM as it is then.
async fn rendered_dom(url: &str, budget_ms: u64) -> String {
    let profile = tempfile::tempdir().unwrap();
    let run = tokio::process::Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-extensions",
            "--no-first-run",
            "--no-default-browser-check",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .arg("--dump-dom")
        .arg(url)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("chromium did not finish within 90 s")
        .expect("chromium could not be started");
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && dom.contains("</html>"),
        "chromium failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    dom
}

fn unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}

/// Every `data-field` of the DOM and the text of its element (the page puts nothing but text in
/// them), scripts left out. Panics on a field shown twice.
fn fields(dom: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut markup = String::with_capacity(dom.len());
    let mut rest = dom;
    while let Some(at) = rest.find("<script") {
        markup.push_str(&rest[..at]);
        let end = rest[at..].find("</script>").expect("script closed");
        rest = &rest[at + end + "</script>".len()..];
    }
    markup.push_str(rest);
    let mut rest = markup.as_str();
    while let Some(at) = rest.find("data-field=\"") {
        rest = &rest[at + "data-field=\"".len()..];
        let name = &rest[..rest.find('"').expect("attribute closed")];
        let open = rest.find('>').expect("tag closed");
        let text = &rest[open + 1..];
        let text = &text[..text.find('<').expect("element closed")];
        let before = out.insert(name.to_owned(), unescape(text));
        assert!(before.is_none(), "data-field {name} shown twice");
    }
    out
}

/// The page's value of `name`, panicking with every field when it is missing.
fn shown<'a>(page: &'a BTreeMap<String, String>, name: &str) -> &'a str {
    page.get(name)
        .unwrap_or_else(|| panic!("the page shows no `{name}`; it shows {page:#?}"))
}

/// A JSON scalar as the page prints it.
fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "–".into(),
        other => other.to_string(),
    }
}

async fn admin_json(d: &Daemon, path: &str) -> (u16, Value) {
    let (code, body) = d.admin(path).await;
    (code, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// The parts of `/api/status` that must not move once traffic stops (the clocks do).
fn settled(st: &Value) -> Value {
    let mut st = st.clone();
    let i = st["instance"].as_object_mut().expect("instance");
    i.remove("uptime_ms");
    i.remove("now_ms");
    st
}

fn copies_arbitrated(side: &Value) -> u64 {
    let m = side["messages"].as_object().expect("messages");
    // A BUSY copy is claimed again later: count each copy once, by its final answer.
    m.iter()
        .filter(|(fate, _)| *fate != "busy")
        .map(|(_, n)| n.as_u64().unwrap())
        .sum()
}

/// Waits until each side has arbitrated `want[side]` copies, nothing is in flight, and two
/// samples a second apart agree.
async fn until_quiet(bed: &Bed, want: &[(&str, u64)]) -> Value {
    let d = &bed.daemons[0];
    let start = Instant::now();
    let mut last: Option<Value> = None;
    loop {
        let (code, st) = admin_json(d, "api/status").await;
        assert_eq!(
            code,
            200,
            "GET /api/status on the daemon {} (is the binary this checkout's?)",
            env!("CARGO_BIN_EXE_mq-cutover")
        );
        let done = want.iter().all(|(name, n)| {
            st["sides"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["name"] == *name && copies_arbitrated(s) >= *n)
        });
        let still = last.as_ref().is_some_and(|l| settled(l) == settled(&st));
        if done && st["in_flight"] == 0 && still {
            return st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the daemon did not settle: want {want:?}, status {st:#}\n{}",
            bed.logs()
        );
        last = Some(st);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_what_the_api_says_once_traffic_has_stopped() {
    chromium(); // before building anything: no browser, no test
    let setup = Setup {
        initial_percent: 50,
        ..Setup::default()
    };
    let mut bed = Bed::new("e2e-page", setup).await;
    bed.start_daemon();
    let count = 200;
    // Dual-written, so each id's second copy finds it owned (not mine) or done (duplicate);
    // a few duplicates on each side; one malformed message per side, parked as bad input.
    let (old, new) = bed
        .produce("s", count, |a| {
            a.duplicates_old = 0.05;
            a.duplicates_new = 0.05;
            a.malformed = 1;
        })
        .await;
    bed.wait_all_settled("s", count, Duration::from_secs(240))
        .await;
    let st = until_quiet(
        &bed,
        &[("kafka", old.copies + 1), ("rocketmq", new.copies + 1)],
    )
    .await;
    for side in st["sides"].as_array().unwrap() {
        let m = &side["messages"];
        assert!(m["proceed"].as_u64().unwrap() > 0, "{side}");
        assert!(
            m["not_mine"].as_u64().unwrap() + m["duplicate"].as_u64().unwrap() > 0,
            "{side}"
        );
        assert_eq!(m["bad_input"], 1, "{side}");
    }
    assert_eq!(st["dead_letters"]["count"], 2, "{st:#}");

    let d = &bed.daemons[0];
    // Without a token the page asks for one and shows nothing of the API.
    let url = format!("http://127.0.0.1:{}/", d.admin_port);
    let dom = rendered_dom(&url, PAGE_BUDGET_MS).await;
    assert!(
        dom.contains("data-auth=\"needed\"") && !dom.contains("data-state=\"loaded\""),
        "the page did not ask for a token:\n{dom}"
    );
    assert!(
        fields(&dom)["error"].contains("/api/status refused: missing or wrong bearer token"),
        "{dom}"
    );
    // The token in the address's fragment, as an operator's bookmark or script would pass it.
    let url = format!("http://127.0.0.1:{}/#token={VIEWER_TOKEN}", d.admin_port);
    let (before, switches, parity) = (
        admin_json(d, "api/status").await.1,
        admin_json(d, "api/switches").await.1,
        admin_json(d, "api/parity?since=1h").await,
    );
    let dom = rendered_dom(&url, PAGE_BUDGET_MS).await;
    let (after, switches_after, parity_after) = (
        admin_json(d, "api/status").await.1,
        admin_json(d, "api/switches").await.1,
        admin_json(d, "api/parity?since=1h").await,
    );
    assert_eq!(
        settled(&before),
        settled(&after),
        "the status moved meanwhile"
    );
    assert_eq!(switches, switches_after, "the switches moved meanwhile");
    let page = fields(&dom);
    assert!(
        dom.contains("data-state=\"loaded\""),
        "the page never loaded /api/status:\n{dom}"
    );
    assert_eq!(shown(&page, "error"), "", "{dom}");

    // The instance and the switches.
    let st = &after;
    assert_eq!(shown(&page, "instance.version"), st["instance"]["version"]);
    assert_eq!(
        shown(&page, "instance.sides"),
        "kafka (old) → rocketmq (new)"
    );
    let on = |b: &Value| if b.as_bool().unwrap() { "on" } else { "off" };
    assert_eq!(shown(&page, "switches.consume"), on(&switches["consume"]));
    assert_eq!(
        shown(&page, "switches.percent"),
        switches["percent"].to_string()
    );
    assert_eq!(
        shown(&page, "switches.whitelist_size"),
        switches["whitelist"].as_array().unwrap().len().to_string()
    );
    assert_eq!(
        shown(&page, "switches.version"),
        switches["version"].to_string()
    );

    // Health.
    let ready = if st["ready"].as_bool().unwrap() {
        "ready"
    } else {
        "not ready"
    };
    assert_eq!(shown(&page, "ready"), ready);
    let problems: Vec<&str> = st["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let problems = if problems.is_empty() {
        "none".to_owned()
    } else {
        problems.join("; ")
    };
    assert_eq!(shown(&page, "problems"), problems);
    let up = if st["redis_up"].as_bool().unwrap() {
        "up"
    } else {
        "down"
    };
    assert_eq!(shown(&page, "redis_up"), up);
    assert_eq!(shown(&page, "circuit"), st["circuit"].as_str().unwrap());
    assert_eq!(shown(&page, "in_flight"), st["in_flight"].to_string());

    // Every count of every side.
    let mut compared = 0;
    for side in st["sides"].as_array().unwrap() {
        let name = side["name"].as_str().unwrap();
        for group in ["messages", "calls"] {
            for (key, n) in side[group].as_object().unwrap() {
                let f = format!("sides.{name}.{group}.{key}");
                assert_eq!(shown(&page, &f), n.to_string(), "{f}");
                compared += 1;
            }
        }
        for key in ["in_flight", "dead_letters", "ambiguous", "overlaps"] {
            let f = format!("sides.{name}.{key}");
            assert_eq!(shown(&page, &f), side[key].to_string(), "{f}");
            compared += 1;
        }
        // Traffic stopped: no rate yet (samples too close on the daemon's clock) or zero.
        for key in ["copies_rate", "calls_rate"] {
            let f = format!("sides.{name}.{key}");
            assert!(matches!(shown(&page, &f), "–" | "0.0"), "{f}: {page:#?}");
        }
    }
    assert_eq!(compared, 2 * (6 + 4 + 4));

    // Dead letters: the count and the newest ones, newest first.
    let dead = &st["dead_letters"];
    assert_eq!(
        shown(&page, "dead_letters.count"),
        dead["count"].to_string()
    );
    let newest = dead["newest"].as_array().unwrap();
    assert_eq!(newest.len(), 2);
    for (n, l) in newest.iter().enumerate() {
        for key in ["entry", "side", "reason"] {
            let f = format!("dead_letters.newest.{n}.{key}");
            assert_eq!(shown(&page, &f), text_of(&l[key]), "{f}");
        }
        assert_eq!(
            shown(&page, &format!("dead_letters.newest.{n}.message_id")),
            "(none)"
        );
    }

    // Parity: whatever /api/parity says, the page says the same (or that it is not there).
    match (parity, parity_after) {
        ((404, _), (404, _)) => {
            assert_eq!(shown(&page, "parity.state"), "parity: not available");
        }
        ((200, p), (200, p_after)) => {
            assert_eq!(p["totals"], p_after["totals"], "parity moved meanwhile");
            check_parity(&page, &p);
        }
        (a, b) => panic!("/api/parity answered {} then {}", a.0, b.0),
    }
}

/// The page shows the parity report `p` (totals, one-sided and untracked per side, the first
/// one-sided ids).
fn check_parity(page: &BTreeMap<String, String>, p: &Value) {
    assert!(
        !shown(page, "parity.state").starts_with("parity:"),
        "{page:#?}"
    );
    for side in p["sides"].as_array().unwrap() {
        let side = side.as_str().unwrap();
        for key in ["totals", "one_sided_total", "untracked"] {
            let want = p[key][side].as_u64().unwrap_or(0).to_string();
            assert_eq!(
                shown(page, &format!("parity.{key}.{side}")),
                want,
                "{key} {side}"
            );
        }
    }
    let listed = p["one_sided"].as_array().unwrap();
    for (n, o) in listed.iter().take(10).enumerate() {
        assert_eq!(
            shown(page, &format!("parity.one_sided.{n}.id")),
            o["id"].as_str().unwrap()
        );
        assert_eq!(
            shown(page, &format!("parity.one_sided.{n}.side")),
            o["side"].as_str().unwrap()
        );
    }
    assert!(!page.contains_key(&format!("parity.one_sided.{}.id", listed.len().min(10))));
}

/// The token the scripted listener wants.
const SCRIPTED_TOKEN: &str = "scripted-0f2e4d6c8b0a1f3e5d7c9b1a3f5e7d9c";

/// Whether a request carries the scripted listener's token.
fn authorized(headers: &axum::http::HeaderMap) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {SCRIPTED_TOKEN}"))
}

/// A scripted listener: the page, a `/api/status` whose counts grow by a fixed step per sample
/// (one second apart on the daemon's clock), and a fixed `/api/parity`; both API routes answer
/// 401 without `Authorization: Bearer SCRIPTED_TOKEN`. The page's address carries the token.
async fn scripted(parity: Option<Value>) -> (String, tokio_util::sync::CancellationToken) {
    let samples = Arc::new(AtomicU64::new(0));
    let status = move |headers: axum::http::HeaderMap| {
        let n = if authorized(&headers) {
            samples.fetch_add(1, Ordering::SeqCst)
        } else {
            u64::MAX
        };
        async move {
            if n == u64::MAX {
                return (StatusCode::UNAUTHORIZED, Json(json!({"error": "no token"})))
                    .into_response();
            }
            let side = |name: &str, role: &str, step: u64| {
                json!({
                    "name": name, "kind": name, "role": role,
                    "messages": {"proceed": n * step, "not_mine": n * step / 2, "duplicate": 0,
                                 "busy": 7, "dead": 0, "bad_input": 0},
                    "calls": {"success": n * step, "retryable": 0, "fatal": 0, "ambiguous": 0},
                    "in_flight": 0, "dead_letters": 0, "ambiguous": 0, "overlaps": 0,
                })
            };
            Json(json!({
                "instance": {"version": "9.9.9", "from": "kafka", "to": "rocketmq",
                             "sides": ["kafka", "rocketmq"], "started_ms": 0,
                             "uptime_ms": 10_000 + n * 1000, "now_ms": 1_700_000_000_000u64 + n * 1000},
                "switches": {"known": true, "consume": true, "percent": 10, "whitelist_size": 3,
                             "version": 2, "changed_at_ms": 1},
                "sides": [side("kafka", "old", 100), side("rocketmq", "new", 20)],
                "in_flight": 0, "circuit": "half_open", "redis_up": true, "ready": false,
                "problems": ["sink circuit <open>: the sources are paused"],
                "dead_letters": {"count": 1, "newest": [{"entry": "1-0", "message_id": "m<1>",
                    "side": "kafka", "reason": "HTTP 400 & more", "attempts": 1}], "error": null},
            }))
            .into_response()
        }
    };
    let parity = move |headers: axum::http::HeaderMap| {
        let parity = parity.clone();
        async move {
            if !authorized(&headers) {
                return StatusCode::UNAUTHORIZED.into_response();
            }
            match parity {
                Some(p) => Json(p).into_response(),
                None => StatusCode::NOT_FOUND.into_response(),
            }
        }
    };
    let app = Router::new()
        .route(
            "/",
            get(|| async { Html(mq_cutover::admin::page::STATUS_HTML) }),
        )
        .route("/api/status", get(status))
        .route("/api/parity", get(parity));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/#token={SCRIPTED_TOKEN}",
        listener.local_addr().unwrap()
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let until = stop.clone();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { until.cancelled().await })
            .await
    });
    (url, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_computes_rates_from_successive_samples_and_renders_parity() {
    chromium();
    let p = json!({
        "since_ms": 1_700_000_000_000u64, "until_ms": 1_700_003_600_000u64, "grace_ms": 30_000,
        "sides": ["kafka", "rocketmq"],
        "totals": {"kafka": 1200, "rocketmq": 1187},
        "minutes": [], "days": [],
        "one_sided": (0..12).map(|i| json!({"side": "kafka", "id": format!("id-{i}"),
                                             "first_seen_ms": 1_700_000_000_000u64})).collect::<Vec<_>>(),
        "one_sided_total": {"kafka": 13, "rocketmq": 0},
        "untracked": {"kafka": 1},
        "truncated": true,
    });
    let (url, stop) = scripted(Some(p.clone())).await;
    let dom = rendered_dom(&url, PAGE_BUDGET_MS).await;
    stop.cancel();
    let page = fields(&dom);
    // Each sample is one second later with 100 more proceeds and 50 more not-mine on kafka.
    assert_eq!(shown(&page, "sides.kafka.copies_rate"), "150.0");
    assert_eq!(shown(&page, "sides.kafka.calls_rate"), "100.0");
    assert_eq!(shown(&page, "sides.rocketmq.copies_rate"), "30.0");
    assert_eq!(shown(&page, "sides.rocketmq.calls_rate"), "20.0");
    assert_eq!(shown(&page, "sides.kafka.messages.busy"), "7");
    // Text from the daemon is shown as text, never as markup.
    assert_eq!(
        shown(&page, "problems"),
        "sink circuit <open>: the sources are paused"
    );
    assert_eq!(shown(&page, "dead_letters.newest.0.message_id"), "m<1>");
    assert_eq!(
        shown(&page, "dead_letters.newest.0.reason"),
        "HTTP 400 & more"
    );
    assert_eq!(shown(&page, "ready"), "not ready");
    assert_eq!(shown(&page, "circuit"), "half_open");
    assert_eq!(shown(&page, "switches.whitelist_size"), "3");
    check_parity(&page, &p);
    assert!(shown(&page, "parity.state").contains("grace 30 s, one-sided list truncated"));

    // Without the parity route the page says so and shows everything else.
    let (url, stop) = scripted(None).await;
    let dom = rendered_dom(&url, PAGE_BUDGET_MS).await;
    stop.cancel();
    let page = fields(&dom);
    assert_eq!(shown(&page, "parity.state"), "parity: not available");
    assert!(!page.contains_key("parity.totals.kafka"));
    assert_eq!(shown(&page, "switches.percent"), "10");
}
