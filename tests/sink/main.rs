//! The HTTP sink against real local servers: the reward service (for grants and faults) and a
//! tiny scripted HTTP server (for exact answers, raw requests and cut connections). Everything
//! listens on 127.0.0.1, port 0; nothing outside this process is needed.

#[path = "../common/mod.rs"]
mod common;
mod tls;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mq_cutover::sink::http::HttpSink;
use mq_cutover::sink::{CallResult, Sink, SinkConfig, SinkRequest, StatusPattern};
use mqc_testkit::reward::{self, Answer, FaultPlan, RewardServer, Stats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------------
// Helpers

/// A reward service on a fresh loopback port.
async fn reward_service(plan: FaultPlan) -> (RewardServer, CancellationToken) {
    let cancel = CancellationToken::new();
    let server = reward::serve_local(plan, cancel.clone()).await.unwrap();
    (server, cancel)
}

/// An HTTP sink to `url` with defaults changed by `tweak`.
fn sink_to(url: String, tweak: impl FnOnce(&mut SinkConfig)) -> Arc<dyn Sink> {
    let mut cfg = SinkConfig::new(url);
    tweak(&mut cfg);
    Arc::new(HttpSink::new(&cfg).expect("sink builds"))
}

fn request<'a>(id: &'a str, body: &'a [u8]) -> SinkRequest<'a> {
    SinkRequest {
        message_id: id,
        side: "kafka",
        attempt: 1,
        body,
    }
}

/// A plain HTTP client for the reward service's own routes.
fn http_client() -> reqwest::Client {
    // reqwest is built without a bundled crypto provider; HttpSink installs ring the same way.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// `GET url`, parsed as JSON.
async fn get_json<T: serde::de::DeserializeOwned>(http: &reqwest::Client, url: String) -> T {
    let resp = http.get(url).send().await.unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap()
}

/// `PUT url` with a JSON body; the status.
async fn put_json(http: &reqwest::Client, url: String, body: &serde_json::Value) -> u16 {
    http.put(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// One request as the scripted server received it.
#[derive(Debug, Clone)]
struct RawRequest {
    method: String,
    path: String,
    /// Names lowercased.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawRequest {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What the scripted server does with each request.
#[derive(Clone, Copy)]
enum Reply {
    /// Writes this raw HTTP response (it must carry Content-Length) and keeps the connection.
    Answer(&'static str),
    /// Reads the request and closes the connection without a word.
    CloseAfterRead,
}

/// A minimal HTTP/1.1 server: records requests and connections, answers per `Reply`.
struct Scripted {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<RawRequest>>>,
    connections: Arc<AtomicUsize>,
}

impl Scripted {
    async fn start(reply: Reply) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (reqs, conns) = (requests.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                conns.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve_connection(stream, reply, reqs.clone()));
            }
        });
        Scripted {
            addr,
            requests,
            connections,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/grant", self.addr)
    }

    fn requests(&self) -> Vec<RawRequest> {
        self.requests.lock().unwrap().clone()
    }
}

async fn serve_connection(
    mut stream: TcpStream,
    reply: Reply,
    requests: Arc<Mutex<Vec<RawRequest>>>,
) {
    let mut buf = Vec::new();
    while let Some(req) = read_request(&mut stream, &mut buf).await {
        requests.lock().unwrap().push(req);
        match reply {
            Reply::Answer(text) => {
                if stream.write_all(text.as_bytes()).await.is_err() {
                    return;
                }
            }
            Reply::CloseAfterRead => return,
        }
    }
}

async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<RawRequest> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let mut lines = head.split("\r\n");
            let mut first = lines.next()?.split(' ');
            let (method, path) = (first.next()?.to_owned(), first.next()?.to_owned());
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            let len: usize = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .map_or(0, |(_, v)| v.parse().unwrap());
            if buf.len() >= end + 4 + len {
                let body = buf[end + 4..end + 4 + len].to_vec();
                buf.drain(..end + 4 + len);
                return Some(RawRequest {
                    method,
                    path,
                    headers,
                    body,
                });
            }
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

// ---------------------------------------------------------------------------------------------
// The sink against the reward service

#[tokio::test]
async fn success_delivers_the_body_unchanged_with_identity_headers() {
    let (server, cancel) = reward_service(FaultPlan::none()).await;
    let sink = sink_to(server.url("/grant"), |_| {});
    let body = br#"{"user_id":"u-7","points":10}"#;
    let got = sink
        .call(&SinkRequest {
            message_id: "m-ok-1",
            side: "rocketmq",
            attempt: 3,
            body,
        })
        .await;
    assert_eq!(got, CallResult::Success);
    let h = server.state().history("m-ok-1");
    assert_eq!((h.calls, h.grants), (1, 1));
    let call = &h.recent[0];
    assert_eq!(call.side.as_deref(), Some("rocketmq"));
    assert_eq!(call.attempt, Some(3));
    assert_eq!(call.body.as_bytes(), body);
    assert_eq!(call.answer, Answer::Granted);
    cancel.cancel();
}

#[tokio::test]
async fn server_error_is_retryable_and_grants_nothing() {
    let (server, cancel) = reward_service(FaultPlan {
        error_rate: 1.0,
        ..FaultPlan::none()
    })
    .await;
    let sink = sink_to(server.url("/grant"), |_| {});
    let got = sink.call(&request("m-500", b"{}")).await;
    let CallResult::Retryable {
        reason,
        retry_after,
    } = got
    else {
        panic!("not retryable: {got:?}");
    };
    assert_eq!(reason, "HTTP 500: injected error");
    assert_eq!(retry_after, None);
    assert_eq!(server.state().grants_of("m-500"), 0);
    assert_eq!(server.state().stats().errors_injected, 1);
    cancel.cancel();
}

#[tokio::test]
async fn bad_request_is_fatal_with_the_answer_in_the_reason() {
    let (server, cancel) = reward_service(FaultPlan {
        bad_request_rate: 1.0,
        ..FaultPlan::none()
    })
    .await;
    let sink = sink_to(server.url("/grant"), |_| {});
    let got = sink.call(&request("m-400", b"{}")).await;
    assert_eq!(
        got,
        CallResult::Fatal {
            reason: "HTTP 400: injected bad request".into()
        }
    );
    assert_eq!(server.state().grants_of("m-400"), 0);
    cancel.cancel();
}

#[tokio::test]
async fn commit_then_timeout_is_ambiguous_and_the_reward_was_granted() {
    let (server, cancel) = reward_service(FaultPlan {
        commit_then_timeout_rate: 1.0,
        hang: Duration::from_secs(30),
        ..FaultPlan::none()
    })
    .await;
    let sink = sink_to(server.url("/grant"), |c| {
        c.timeout = Duration::from_millis(300)
    });
    let start = Instant::now();
    let got = sink.call(&request("m-hang", b"{}")).await;
    assert_eq!(
        got,
        CallResult::Ambiguous {
            reason: "timeout after 300ms".into()
        }
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    // The reason the outcome is ambiguous: the endpoint did grant it.
    assert_eq!(server.state().grants_of("m-hang"), 1);
    assert_eq!(server.state().stats().commit_then_timeout, 1);
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_flight_are_capped_by_max_concurrency() {
    let (server, cancel) = reward_service(FaultPlan {
        latency: Duration::from_millis(200),
        ..FaultPlan::none()
    })
    .await;
    let sink = sink_to(server.url("/grant"), |c| c.max_concurrency = 2);
    let start = Instant::now();
    let calls: Vec<_> = (0..6)
        .map(|i| {
            let sink = sink.clone();
            tokio::spawn(async move { sink.call(&request(&format!("m-cc-{i}"), b"{}")).await })
        })
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap(), CallResult::Success);
    }
    // Three waves of two: at least 3 × 200 ms (six at once would take about 200 ms).
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(590), "took {took:?}");
    assert_eq!(server.state().stats().grants, 6);
    cancel.cancel();
}

#[tokio::test]
async fn rate_limit_spaces_calls() {
    let (server, cancel) = reward_service(FaultPlan::none()).await;
    let sink = sink_to(server.url("/grant"), |c| c.rate_limit_per_second = Some(20));
    let start = Instant::now();
    for i in 0..11 {
        assert_eq!(
            sink.call(&request(&format!("m-rate-{i}"), b"{}")).await,
            CallResult::Success
        );
    }
    // 10 gaps of 50 ms.
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(490), "took {took:?}");
    cancel.cancel();
}

// ---------------------------------------------------------------------------------------------
// The sink against exact answers

#[tokio::test]
async fn configured_method_and_headers_are_sent_with_the_sinks_own() {
    let srv = Scripted::start(Reply::Answer(
        "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
    ))
    .await;
    let sink = sink_to(srv.url(), |c| {
        c.method = "PUT".into();
        c.headers.insert("X-Api-Key".into(), "secret-1".into());
        c.headers
            .insert("Content-Type".into(), "application/json".into());
    });
    let got = sink
        .call(&SinkRequest {
            message_id: "m-hdr",
            side: "kafka",
            attempt: 12,
            body: b"\x00binary\xffbody",
        })
        .await;
    assert_eq!(got, CallResult::Success);
    let reqs = srv.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!((r.method.as_str(), r.path.as_str()), ("PUT", "/grant"));
    assert_eq!(r.header("idempotency-key"), Some("m-hdr"));
    assert_eq!(r.header("x-mq-cutover-side"), Some("kafka"));
    assert_eq!(r.header("x-mq-cutover-attempt"), Some("12"));
    assert_eq!(r.header("x-api-key"), Some("secret-1"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.body, b"\x00binary\xffbody");
}

#[tokio::test]
async fn connections_are_kept_alive_between_calls() {
    let srv = Scripted::start(Reply::Answer(
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ))
    .await;
    let sink = sink_to(srv.url(), |_| {});
    for i in 0..5 {
        assert_eq!(
            sink.call(&request(&format!("m-ka-{i}"), b"{}")).await,
            CallResult::Success
        );
    }
    assert_eq!(srv.requests().len(), 5);
    assert_eq!(srv.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn service_unavailable_with_retry_after_reports_the_wait() {
    let srv = Scripted::start(Reply::Answer(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 2\r\nContent-Length: 4\r\n\r\nbusy",
    ))
    .await;
    let sink = sink_to(srv.url(), |_| {});
    let got = sink.call(&request("m-503", b"{}")).await;
    assert_eq!(
        got,
        CallResult::Retryable {
            reason: "HTTP 503: busy".into(),
            retry_after: Some(Duration::from_secs(2)),
        }
    );
}

#[tokio::test]
async fn retry_after_as_a_past_http_date_means_no_wait() {
    let srv = Scripted::start(Reply::Answer(
        "HTTP/1.1 429 Too Many Requests\r\nRetry-After: Wed, 21 Oct 2015 07:28:00 GMT\r\nContent-Length: 0\r\n\r\n",
    ))
    .await;
    let sink = sink_to(srv.url(), |_| {});
    let got = sink.call(&request("m-429", b"{}")).await;
    assert_eq!(
        got,
        CallResult::Retryable {
            reason: "HTTP 429".into(),
            retry_after: Some(Duration::ZERO),
        }
    );
}

#[tokio::test]
async fn not_found_is_fatal_by_default_and_retryable_when_configured() {
    let srv = Scripted::start(Reply::Answer(
        "HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nno route!",
    ))
    .await;
    let default = sink_to(srv.url(), |_| {});
    assert_eq!(
        default.call(&request("m-404", b"{}")).await,
        CallResult::Fatal {
            reason: "HTTP 404: no route!".into()
        }
    );
    let lenient = sink_to(srv.url(), |c| {
        c.classify
            .retryable_statuses
            .push(StatusPattern::Exact(404));
    });
    assert_eq!(
        lenient.call(&request("m-404", b"{}")).await,
        CallResult::Retryable {
            reason: "HTTP 404: no route!".into(),
            retry_after: None,
        }
    );
}

#[tokio::test]
async fn a_long_error_body_is_cut_to_200_bytes_in_the_reason() {
    const ANSWER: &str = concat!(
        "HTTP/1.1 422 Unprocessable Entity\r\nContent-Length: 300\r\n\r\n",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
    );
    let srv = Scripted::start(Reply::Answer(ANSWER)).await;
    let sink = sink_to(srv.url(), |_| {});
    let got = sink.call(&request("m-422", b"{}")).await;
    let CallResult::Fatal { reason } = got else {
        panic!("not fatal: {got:?}");
    };
    assert_eq!(reason, format!("HTTP 422: {}", "a".repeat(200)));
}

#[tokio::test]
async fn a_redirect_is_not_followed_and_is_fatal() {
    let srv = Scripted::start(Reply::Answer(
        "HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:9/elsewhere\r\nContent-Length: 0\r\n\r\n",
    ))
    .await;
    let sink = sink_to(srv.url(), |_| {});
    assert_eq!(
        sink.call(&request("m-302", b"{}")).await,
        CallResult::Fatal {
            reason: "HTTP 302".into()
        }
    );
    assert_eq!(srv.requests().len(), 1);
}

#[tokio::test]
async fn connection_refused_is_retryable() {
    let port = common::free_port();
    let sink = sink_to(format!("http://127.0.0.1:{port}/grant"), |_| {});
    let got = sink.call(&request("m-refused", b"{}")).await;
    let CallResult::Retryable {
        reason,
        retry_after,
    } = &got
    else {
        panic!("not retryable: {got:?}");
    };
    assert!(reason.starts_with("connect failed: "), "{reason}");
    assert!(reason.to_lowercase().contains("refused"), "{reason}");
    assert_eq!(*retry_after, None);
}

#[tokio::test]
async fn connection_cut_after_sending_is_ambiguous() {
    let srv = Scripted::start(Reply::CloseAfterRead).await;
    let sink = sink_to(srv.url(), |_| {});
    let got = sink.call(&request("m-cut", b"{\"x\":1}")).await;
    let CallResult::Ambiguous { reason } = &got else {
        panic!("not ambiguous: {got:?}");
    };
    assert!(
        reason.starts_with("connection cut after sending"),
        "{reason}"
    );
    // The server did read the whole request: the endpoint could have acted on it.
    let reqs = srv.requests();
    assert!(!reqs.is_empty());
    assert_eq!(reqs[0].body, b"{\"x\":1}");
}

// ---------------------------------------------------------------------------------------------
// The reward service's own routes

#[tokio::test]
async fn reward_service_refuses_a_call_without_idempotency_key() {
    let (server, cancel) = reward_service(FaultPlan::none()).await;
    let http = http_client();
    let resp = http
        .post(server.url("/grant"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let stats = server.state().stats();
    assert_eq!((stats.calls, stats.grants, stats.missing_key), (1, 0, 1));
    cancel.cancel();
}

#[tokio::test]
async fn reward_service_reports_grants_duplicates_and_resets() {
    let (server, cancel) = reward_service(FaultPlan::none()).await;
    let sink = sink_to(server.url("/grant"), |_| {});
    for id in ["a", "b", "b", "c", "c", "c"] {
        assert_eq!(sink.call(&request(id, b"{}")).await, CallResult::Success);
    }
    let http = http_client();
    let stats: serde_json::Value = get_json(&http, server.url("/stats")).await;
    assert_eq!(
        stats,
        serde_json::json!({
            "calls": 6, "grants": 6, "ids_granted": 3, "granted_once": 1,
            "granted_twice_or_more": 2, "errors_injected": 0, "commit_then_timeout": 0,
            "bad_requests": 0, "missing_key": 0
        })
    );
    let grants: serde_json::Value = get_json(&http, server.url("/grants")).await;
    assert_eq!(grants, serde_json::json!({ "a": 1, "b": 2, "c": 3 }));
    let calls: serde_json::Value = get_json(&http, server.url("/calls?id=b")).await;
    assert_eq!(calls["calls"], 2);
    assert_eq!(calls["recent"].as_array().unwrap().len(), 2);
    assert_eq!(calls["recent"][0]["side"], "kafka");
    assert_eq!(calls["recent"][0]["answer"], "granted");

    let resp = http.post(server.url("/reset")).send().await.unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(server.state().stats(), Stats::default());
    cancel.cancel();
}

#[tokio::test]
async fn reward_faults_change_at_runtime_and_bad_plans_are_refused() {
    let (server, cancel) = reward_service(FaultPlan::none()).await;
    let sink = sink_to(server.url("/grant"), |_| {});
    let http = http_client();
    let status = put_json(
        &http,
        server.url("/faults"),
        &serde_json::json!({ "error_rate": 1.0, "seed": 5 }),
    )
    .await;
    assert_eq!(status, 200);
    assert!(matches!(
        sink.call(&request("m-f", b"{}")).await,
        CallResult::Retryable { .. }
    ));
    let current: FaultPlan = get_json(&http, server.url("/faults")).await;
    assert_eq!(current.error_rate, 1.0);
    assert_eq!(current.seed, 5);

    for bad in [
        serde_json::json!({ "error_rate": 2.0 }),
        serde_json::json!({ "error_rat": 0.1 }),
    ] {
        let status = put_json(&http, server.url("/faults"), &bad).await;
        assert!((400..500).contains(&status), "{bad} accepted: {status}");
    }
    assert_eq!(
        server.state().faults().error_rate,
        1.0,
        "a bad plan replaced the plan"
    );
    cancel.cancel();
}

#[tokio::test]
async fn reward_decisions_repeat_with_the_same_seed() {
    let plan = FaultPlan {
        error_rate: 0.3,
        bad_request_rate: 0.2,
        seed: 42,
        ..FaultPlan::none()
    };
    let mut runs = Vec::new();
    for _ in 0..2 {
        let (server, cancel) = reward_service(plan.clone()).await;
        let sink = sink_to(server.url("/grant"), |_| {});
        let mut kinds = Vec::new();
        for i in 0..40 {
            kinds.push(
                sink.call(&request(&format!("m-seed-{i}"), b"{}"))
                    .await
                    .kind(),
            );
        }
        runs.push(kinds);
        cancel.cancel();
    }
    assert_eq!(runs[0], runs[1]);
    assert!(
        runs[0].contains(&"fatal")
            && runs[0].contains(&"retryable")
            && runs[0].contains(&"success")
    );
}

#[tokio::test]
async fn reward_service_stops_promptly_on_cancel_even_with_a_hanging_call() {
    let (server, cancel) = reward_service(FaultPlan {
        commit_then_timeout_rate: 1.0,
        hang: Duration::from_secs(600),
        ..FaultPlan::none()
    })
    .await;
    let sink = sink_to(server.url("/grant"), |c| {
        c.timeout = Duration::from_secs(60)
    });
    let call = tokio::spawn(async move { sink.call(&request("m-stop", b"{}")).await });
    let state = server.state().clone();
    let committed = common::eventually(Duration::from_secs(5), || {
        let state = state.clone();
        async move { state.grants_of("m-stop") == 1 }
    })
    .await;
    assert!(committed.is_some(), "the call never reached the service");
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), server.stopped())
        .await
        .expect("the service did not stop within 5s")
        .unwrap();
    // The hanging call was answered 503 at shutdown: retryable for the client.
    let got = call.await.unwrap();
    assert!(matches!(got, CallResult::Retryable { .. }), "{got:?}");
}

#[tokio::test]
async fn reward_run_serves_on_the_given_address_until_cancelled() {
    use clap::Parser as _;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: reward::RewardArgs,
    }
    let port = common::free_port();
    let cli = Cli::try_parse_from(["x", "--listen", &format!("127.0.0.1:{port}")]).unwrap();
    let cancel = CancellationToken::new();
    let running = tokio::spawn(reward::run(cli.args, cancel.clone()));
    let sink = sink_to(format!("http://127.0.0.1:{port}/grant"), |_| {});
    let up = common::eventually(Duration::from_secs(5), || {
        let sink = sink.clone();
        async move { sink.call(&request("m-run", b"{}")).await == CallResult::Success }
    })
    .await;
    assert!(up.is_some(), "reward-service never answered on port {port}");
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .expect("run did not return after cancel")
        .unwrap()
        .unwrap();
}
