//! Who may use the admin listener, and how much of it: the guards around the status page and the
//! operator API. `/metrics`, `/healthz` and `/readyz` stay outside them (Prometheus and the
//! kubelet must reach them, and they hold no payload, id or switch).
//!
//! From the outside in, each request to a guarded route meets:
//!
//! 1. the `Host` check: the status page and `/api` answer only to `localhost`, `127.0.0.1`,
//!    `[::1]`, the listen address and `admin.allowed_hosts` (`*`: any), so a web page whose name
//!    an attacker re-points at the listener (DNS rebinding) is refused, whatever it asks for;
//! 2. the bearer token, on `/api` only, before any of the body is read: a safe method (`GET`,
//!    `HEAD`) needs the viewer or the operator token, anything else the operator token; tokens
//!    are compared in constant time, every configured one every time;
//! 3. a cap on requests in progress, shared by all guarded routes: past it the listener answers
//!    503 at once rather than queueing;
//! 4. a cap on the body a handler may read (413 beyond it).

use std::net::IpAddr;
use std::sync::Arc;

use axum::error_handling::HandleErrorLayer;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use subtle::ConstantTimeEq;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::ServiceBuilder;

use crate::admin::config::AdminConfig;
use crate::printable::printable;
use crate::secrets::Secret;

/// Most bytes of a request body a guarded route reads (a whitelist edit of some ten thousand
/// ids fits).
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// Most requests to guarded routes in progress at once, across all of them; the status page
/// makes two every two seconds.
pub const MAX_CONCURRENT_REQUESTS: usize = 32;

/// What a request may do under `/api`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    /// Reads: the viewer token, or the operator token.
    Read,
    /// Writes (and reads): the operator token.
    Write,
}

impl Access {
    /// What `method` needs: reads for `GET` / `HEAD`, writes for anything else.
    pub fn needed_for(method: &Method) -> Access {
        if method == Method::GET || method == Method::HEAD {
            Access::Read
        } else {
            Access::Write
        }
    }
}

/// The `Host` values the guarded routes answer to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum AllowedHosts {
    /// `admin.allowed_hosts = ["*"]`.
    Any,
    /// Host names (lower case, no trailing dot), each with a port if the entry named one.
    Only(Vec<(String, Option<u16>)>),
}

/// The guards' settings, from `[admin]`.
#[derive(Clone)]
pub struct AdminAuth {
    operator: Option<Secret>,
    viewer: Option<Secret>,
    hosts: Arc<AllowedHosts>,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminAuth")
            .field("operator", &self.operator.is_some())
            .field("viewer", &self.viewer.is_some())
            .field("hosts", &self.hosts)
            .finish()
    }
}

impl AdminAuth {
    /// The guards of a validated `[admin]` section.
    pub fn new(cfg: &AdminConfig) -> AdminAuth {
        let hosts = if cfg.allowed_hosts.iter().any(|h| h == "*") {
            AllowedHosts::Any
        } else {
            let mut hosts: Vec<_> = ["localhost", "127.0.0.1", "[::1]"]
                .into_iter()
                .map(|h| (h.to_owned(), None))
                .collect();
            if !cfg.listen.ip().is_unspecified() {
                hosts.push((bracketed(cfg.listen.ip()), None));
            }
            hosts.extend(cfg.allowed_hosts.iter().filter_map(|h| split_host(h)));
            AllowedHosts::Only(hosts)
        };
        AdminAuth {
            operator: cfg.token.clone(),
            viewer: cfg.viewer_token.clone(),
            hosts: Arc::new(hosts),
        }
    }

    /// Whether a request with this `Host` (and URI authority) may reach a guarded route. No
    /// `Host` at all is let through: browsers always send one, so such a request is no rebinding.
    fn host_allowed(&self, host: Option<&str>) -> bool {
        let AllowedHosts::Only(allowed) = &*self.hosts else {
            return true;
        };
        let Some(host) = host else {
            return true;
        };
        let Some((name, port)) = split_host(host) else {
            return false;
        };
        allowed
            .iter()
            .any(|(n, p)| *n == name && (p.is_none() || *p == port))
    }

    /// What the bearer token `given` grants, comparing it with every configured token in
    /// constant time (only the lengths may show).
    fn granted(&self, given: &[u8]) -> Option<Access> {
        let eq = |t: &Option<Secret>| {
            t.as_ref().map_or(subtle::Choice::from(0), |t| {
                t.expose().as_bytes().ct_eq(given)
            })
        };
        let (operator, viewer) = (eq(&self.operator), eq(&self.viewer));
        if bool::from(operator) {
            Some(Access::Write)
        } else if bool::from(viewer) {
            Some(Access::Read)
        } else {
            None
        }
    }

    /// `None` if a request needing `need` with this `Authorization` header may go on, else the
    /// answer that refuses it.
    fn refusal(&self, need: Access, authorization: Option<&HeaderValue>) -> Option<Response> {
        if self.operator.is_none() && (need == Access::Write || self.viewer.is_none()) {
            let msg = match need {
                Access::Write => "write routes are off: set admin.token to enable them",
                Access::Read => {
                    "the API is off: set admin.viewer_token (reads) or admin.token (reads and \
                     writes) to enable it"
                }
            };
            return Some(refuse(StatusCode::FORBIDDEN, msg));
        }
        let given = authorization.and_then(|v| bearer(v.as_bytes()));
        match given.and_then(|g| self.granted(g)) {
            Some(granted) if granted >= need => None,
            Some(_) => Some(refuse(
                StatusCode::FORBIDDEN,
                "the viewer token reads only; writes need admin.token",
            )),
            None => {
                let mut r = refuse(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"mq-cutover\""),
                );
                Some(r)
            }
        }
    }
}

/// The token of an `Authorization: Bearer <token>` value (the scheme in any case).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
}

/// An address as it appears in a `Host` header: IPv6 in brackets.
fn bracketed(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// `host[:port]` (IPv6 in brackets) → the host in lower case without a trailing dot, and the
/// port; `None` when it is no such thing.
fn split_host(value: &str) -> Option<(String, Option<u16>)> {
    let value = value.trim();
    let (host, port) = if value.starts_with('[') {
        let end = value.find(']')?;
        let (host, rest) = value.split_at(end + 1);
        match rest {
            "" => (host, None),
            _ => (host, Some(rest.strip_prefix(':')?.parse().ok()?)),
        }
    } else {
        match value.rsplit_once(':') {
            Some((h, p)) => (h, Some(p.parse().ok()?)),
            None => (value, None),
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    (!host.is_empty() && !host.contains(['/', '@', ' '])).then_some((host, port))
}

fn refuse(code: StatusCode, msg: &str) -> Response {
    (code, Json(serde_json::json!({ "error": msg }))).into_response()
}

/// The `Host` check (every guarded route).
async fn check_host(State(auth): State<AdminAuth>, req: Request, next: Next) -> Response {
    let host = req.headers().get(header::HOST);
    let named = match host.map(|h| h.to_str()) {
        Some(Ok(h)) => Some(h),
        Some(Err(_)) => return refuse(StatusCode::FORBIDDEN, "the Host header is not text"),
        None => None,
    };
    let authority = req.uri().authority().map(|a| a.as_str());
    for name in [named, authority].into_iter().flatten() {
        if !auth.host_allowed(Some(name)) {
            let msg = format!(
                "Host `{}` is not served here; add it to admin.allowed_hosts",
                printable(name)
            );
            return refuse(StatusCode::FORBIDDEN, &msg);
        }
    }
    next.run(req).await
}

/// The token check (`/api`), before the handler reads anything of the body.
async fn check_token(State(auth): State<AdminAuth>, req: Request, next: Next) -> Response {
    let need = Access::needed_for(req.method());
    if let Some(r) = auth.refusal(need, req.headers().get(header::AUTHORIZATION)) {
        return r;
    }
    next.run(req).await
}

async fn overloaded(_: tower::BoxError) -> Response {
    refuse(
        StatusCode::SERVICE_UNAVAILABLE,
        "too many requests in progress; try again",
    )
}

/// Puts `pages` (served without a token) and `api` (the `/api` routes, behind the token) behind
/// the guards of the module documentation.
pub fn guard(pages: Router, api: Router, auth: AdminAuth) -> Router {
    // One semaphore for every route: the layer is cloned per route, its permits are not.
    let limit = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(overloaded))
        .load_shed()
        .layer(GlobalConcurrencyLimitLayer::new(MAX_CONCURRENT_REQUESTS));
    // route_layer: the guards wrap the routes only (an unknown path is a plain 404), and the
    // last one added runs first.
    let api = match api.has_routes() {
        true => api.route_layer(middleware::from_fn_with_state(auth.clone(), check_token)),
        false => api,
    };
    pages
        .merge(api)
        .route_layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .route_layer(limit)
        .route_layer(middleware::from_fn_with_state(auth, check_host))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use axum::routing::get;
    use std::time::Duration;
    use tower::ServiceExt;

    const OPERATOR: &str = "op-9f1c2e7a4b6d8f0a1c3e5b7d9f2a4c6e";
    const VIEWER: &str = "vw-0b8d6f4a2c1e3b5d7f9a8c6e4b2d0f1a";

    fn cfg(operator: Option<&str>, viewer: Option<&str>, hosts: &[&str]) -> AdminConfig {
        AdminConfig {
            listen: "0.0.0.0:9464".parse().unwrap(),
            token: operator.map(|t| serde_json::from_value(t.into()).unwrap()),
            viewer_token: viewer.map(|t| serde_json::from_value(t.into()).unwrap()),
            allowed_hosts: hosts.iter().map(|h| h.to_string()).collect(),
            token_file: None,
            viewer_token_file: None,
        }
    }

    /// A page, one API read and one API write that reads its whole body, behind the guards.
    fn app(c: &AdminConfig) -> Router {
        let pages = Router::new().route("/", get(|| async { "page" }));
        let api = Router::new().route(
            "/api/thing",
            get(|| async { "read" }).post(|body: axum::body::Bytes| async move {
                format!("wrote {} bytes", body.len())
            }),
        );
        guard(pages, api, AdminAuth::new(c))
    }

    async fn send(router: &Router, req: Request<Body>) -> (StatusCode, String) {
        let r = router.clone().oneshot(req).await.unwrap();
        let code = r.status();
        let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        (code, String::from_utf8_lossy(&body).into_owned())
    }

    fn req(method: &str, path: &str, token: Option<&str>) -> axum::http::request::Builder {
        let mut b = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        b
    }

    #[tokio::test]
    async fn api_reads_need_the_viewer_or_the_operator_token() {
        let app = app(&cfg(Some(OPERATOR), Some(VIEWER), &[]));
        for token in [None, Some("wrong"), Some(&OPERATOR[..20]), Some("")] {
            let (code, _) = send(
                &app,
                req("GET", "/api/thing", token).body(Body::empty()).unwrap(),
            )
            .await;
            assert_eq!(code, StatusCode::UNAUTHORIZED, "{token:?}");
        }
        for token in [OPERATOR, VIEWER] {
            let (code, body) = send(
                &app,
                req("GET", "/api/thing", Some(token))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
            assert_eq!((code, body.as_str()), (StatusCode::OK, "read"));
        }
        // The scheme in any case, as RFC 9110 has it.
        let r = Request::get("/api/thing")
            .header("authorization", format!("bearer {VIEWER}"))
            .body(Body::empty())
            .unwrap();
        assert_eq!(send(&app, r).await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn api_writes_need_the_operator_token() {
        let app = app(&cfg(Some(OPERATOR), Some(VIEWER), &[]));
        let post = |t| req("POST", "/api/thing", t).body(Body::from("x")).unwrap();
        let (code, body) = send(&app, post(Some(VIEWER))).await;
        assert_eq!(code, StatusCode::FORBIDDEN, "{body}");
        assert!(body.contains("viewer token reads only"), "{body}");
        assert_eq!(send(&app, post(None)).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(send(&app, post(Some(OPERATOR))).await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn without_tokens_the_api_is_off_and_the_page_still_served() {
        let app = app(&cfg(None, None, &[]));
        let (code, body) = send(
            &app,
            req("GET", "/api/thing", None).body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(code, StatusCode::FORBIDDEN);
        assert!(body.contains("admin.viewer_token"), "{body}");
        let (code, body) = send(&app, req("GET", "/", None).body(Body::empty()).unwrap()).await;
        assert_eq!((code, body.as_str()), (StatusCode::OK, "page"));
        // A viewer token alone: reads, and writes are off.
        let app = super::tests::app(&cfg(None, Some(VIEWER), &[]));
        let r = req("GET", "/api/thing", Some(VIEWER))
            .body(Body::empty())
            .unwrap();
        assert_eq!(send(&app, r).await.0, StatusCode::OK);
        let r = req("POST", "/api/thing", Some(VIEWER))
            .body(Body::empty())
            .unwrap();
        let (code, body) = send(&app, r).await;
        assert_eq!(code, StatusCode::FORBIDDEN);
        assert!(body.contains("set admin.token"), "{body}");
    }

    /// A body that fails the test if anything reads it.
    fn poisoned_body() -> Body {
        Body::from_stream(futures::stream::once(async {
            panic!("the body was read before the token was checked");
            #[allow(unreachable_code)]
            Ok::<_, std::io::Error>(axum::body::Bytes::new())
        }))
    }

    #[tokio::test]
    async fn the_token_is_checked_before_the_body_is_read() {
        let app = app(&cfg(Some(OPERATOR), Some(VIEWER), &[]));
        for token in [None, Some(VIEWER)] {
            let r = req("POST", "/api/thing", token)
                .body(poisoned_body())
                .unwrap();
            assert!(send(&app, r).await.0.is_client_error());
        }
    }

    #[tokio::test]
    async fn bodies_past_the_cap_are_refused() {
        let app = app(&cfg(Some(OPERATOR), None, &[]));
        let at_cap = vec![b'x'; MAX_BODY_BYTES];
        let r = req("POST", "/api/thing", Some(OPERATOR))
            .body(Body::from(at_cap))
            .unwrap();
        assert_eq!(send(&app, r).await.0, StatusCode::OK);
        let past = vec![b'x'; MAX_BODY_BYTES + 1];
        let r = req("POST", "/api/thing", Some(OPERATOR))
            .body(Body::from(past))
            .unwrap();
        assert_eq!(send(&app, r).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn requests_past_the_concurrency_cap_are_shed() {
        let (release, released) = tokio::sync::watch::channel(false);
        let pages = Router::new().route(
            "/",
            get(move || {
                let mut released = released.clone();
                async move {
                    let _ = released.wait_for(|r| *r).await;
                    "page"
                }
            }),
        );
        let app = guard(pages, Router::new(), AdminAuth::new(&cfg(None, None, &[])));
        let held: Vec<_> = (0..MAX_CONCURRENT_REQUESTS)
            .map(|_| tokio::spawn(send_owned(app.clone())))
            .collect();
        // Every permit is taken once the held requests are parked in the handler.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (code, body) = send(&app, Request::get("/").body(Body::empty()).unwrap()).await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        release.send(true).unwrap();
        for h in held {
            assert_eq!(h.await.unwrap(), StatusCode::OK);
        }
        // The permits came back.
        let (code, _) = send(&app, Request::get("/").body(Body::empty()).unwrap()).await;
        assert_eq!(code, StatusCode::OK);
    }

    async fn send_owned(app: Router) -> StatusCode {
        send(&app, Request::get("/").body(Body::empty()).unwrap())
            .await
            .0
    }

    #[tokio::test]
    async fn a_host_not_allowed_is_refused_on_the_page_and_the_api() {
        let app = app(&cfg(
            Some(OPERATOR),
            None,
            &["mq.example.net", "10.0.0.5:9464"],
        ));
        let with_host = |path: &str, host: &str| {
            req("GET", path, Some(OPERATOR))
                .header("host", host)
                .body(Body::empty())
                .unwrap()
        };
        for host in [
            "localhost:9464",
            "LOCALHOST.",
            "127.0.0.1:9464",
            "[::1]:9464",
            "mq.example.net",
            "mq.example.net:8080",
            "10.0.0.5:9464",
        ] {
            for path in ["/", "/api/thing"] {
                assert_eq!(
                    send(&app, with_host(path, host)).await.0,
                    StatusCode::OK,
                    "{host} {path}"
                );
            }
        }
        for host in [
            "evil.example.com:9464",
            "10.0.0.5:80",
            "127.0.0.1.evil.net",
            "localhost:x",
        ] {
            for path in ["/", "/api/thing"] {
                let (code, body) = send(&app, with_host(path, host)).await;
                assert_eq!(code, StatusCode::FORBIDDEN, "{host} {path}");
                assert!(body.contains("admin.allowed_hosts"), "{body}");
            }
        }
        // An absolute-form request names its authority in the URI: checked the same way.
        let r = Request::get("http://evil.example.com:9464/")
            .body(Body::empty())
            .unwrap();
        assert_eq!(send(&app, r).await.0, StatusCode::FORBIDDEN);
        // A star lets any host through.
        let any = super::tests::app(&cfg(Some(OPERATOR), None, &["*"]));
        assert_eq!(
            send(&any, with_host("/", "evil.example.com")).await.0,
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn the_listen_address_is_an_allowed_host() {
        let mut c = cfg(None, None, &[]);
        c.listen = "192.0.2.7:9464".parse().unwrap();
        let app = app(&c);
        let r = Request::get("/")
            .header("host", "192.0.2.7:9464")
            .body(Body::empty())
            .unwrap();
        assert_eq!(send(&app, r).await.0, StatusCode::OK);
    }

    #[test]
    fn hosts_split_into_name_and_port() {
        assert_eq!(
            split_host("Example.COM:80"),
            Some(("example.com".into(), Some(80)))
        );
        assert_eq!(split_host("[::1]:9464"), Some(("[::1]".into(), Some(9464))));
        assert_eq!(split_host("[::1]"), Some(("[::1]".into(), None)));
        assert_eq!(split_host("host."), Some(("host".into(), None)));
        for bad in [
            "",
            ":80",
            "host:port",
            "[::1",
            "[::1]x",
            "a@b",
            "host:99999",
        ] {
            assert_eq!(split_host(bad), None, "{bad}");
        }
    }
}
