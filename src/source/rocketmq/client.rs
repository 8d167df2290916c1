//! What every RocketMQ client of the side shares: the runtime rocketmq-client-rust wants, the
//! client settings a `[side.rocketmq]` table turns into (ACL, TLS, namespace, bodies left
//! compressed), and error texts that say what a broker's response code means.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rocketmq_client_rust::{
    AclClientRPCHook, ClientConfig, ClientError, ClientRuntime, ClientRuntimeConfig,
    SessionCredentials, TelemetryHandle,
};
use rocketmq_runtime::shutdown_report::ShutdownReport;
use rocketmq_runtime::{RuntimeConfig, RuntimeOwner};
use rocketmq_transport::api::{RPCHook, TlsConfig};

use crate::source::config::RocketMqSideConfig;

/// The runtime a RocketMQ client lives in: rocketmq-client-rust spawns its own tasks (pulls,
/// rebalances, heartbeats, connections) only on a tokio runtime it is handed through
/// [`RuntimeOwner`], never on the caller's. Our own futures (the consume loop) run on the
/// daemon's runtime and await the client's.
pub(super) struct ClientHome {
    owner: Option<RuntimeOwner>,
    pub(super) runtime: Arc<ClientRuntime>,
}

impl ClientHome {
    /// A runtime named `rmq-<scope>` with `threads` workers.
    pub(super) fn new(scope: &'static str, threads: usize) -> Result<ClientHome, String> {
        // rustls has both ring and aws-lc-rs compiled in (the client's reqwest brings the
        // latter), so it cannot pick a provider by itself and the client's TLS handshake would
        // panic (rustls/rustls#1877); the daemon uses ring everywhere (Redis, the sink).
        // Idempotent.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let owner = RuntimeOwner::plan(RuntimeConfig::for_parallelism(
            format!("rmq-{scope}"),
            threads,
        ))
        .map_err(|e| format!("bad rocketmq runtime settings: {e}"))?
        .build()
        .map_err(|e| format!("cannot start the rocketmq client runtime: {e}"))?;
        // The no-op telemetry handle: the client must not install telemetry of its own; its log
        // events reach the daemon's tracing subscriber.
        let runtime = ClientRuntime::try_new(
            owner.root_context().component(scope),
            ClientRuntimeConfig {
                shutdown_timeout: Duration::from_secs(10),
                ..ClientRuntimeConfig::default()
            },
            TelemetryHandle::noop(),
        )
        .map_err(|e| format!("cannot create the rocketmq client runtime: {e}"))?;
        Ok(ClientHome {
            owner: Some(owner),
            runtime,
        })
    }

    /// Stops the clients and the runtime, from inside another runtime (the daemon's).
    pub(super) async fn shutdown(mut self) {
        report("client", boxed(self.runtime.shutdown()).await);
        if let Some(owner) = self.owner.take() {
            report("tasks", boxed(owner.shutdown_tasks()).await);
            // Non-blocking, so allowed inside the caller's runtime.
            report("runtime", owner.shutdown_background());
        }
    }
}

impl Drop for ClientHome {
    fn drop(&mut self) {
        // Without an explicit shutdown (a refetcher dropped with the daemon): stop at once,
        // without blocking the runtime we are dropped on.
        if let Some(owner) = self.owner.take() {
            let _ = owner.shutdown_background();
        }
    }
}

fn report(what: &str, r: ShutdownReport) {
    if !r.is_healthy() {
        tracing::debug!(report = %r.to_json(), "rocketmq {what} shut down uncleanly");
    }
}

/// Client settings of a side: name server, namespace, TLS (only the table's settings: the
/// client would otherwise also read `/etc/rocketmq/tls.properties`), and bodies handed over as
/// stored, so that the source uncompresses them itself, bounded (`super::body`).
pub(super) fn client_config(cfg: &RocketMqSideConfig) -> ClientConfig {
    let mut c = ClientConfig::default();
    c.set_namesrv_addr(cfg.name_server.as_str().into());
    // The client inflates compressed bodies without a size limit, and a body it cannot
    // inflate ends the decoding of the whole pulled batch: the messages after it are dropped
    // while the queue's pull offset moves past them (see docs/rocketmq.md, "Bodies").
    c.set_decode_decompress_body(false);
    if let Some(ns) = &cfg.namespace {
        c.set_namespace(ns.as_str().into());
    }
    if cfg.tls {
        let mut tls = TlsConfig {
            config_file: String::new(),
            ..TlsConfig::default()
        };
        tls.client.auth_server = true;
        tls.client.trust_cert_path = cfg.tls_ca_file.as_ref().map(|p| p.display().to_string());
        tls.client.cert_path = cfg.tls_cert_file.as_ref().map(|p| p.display().to_string());
        tls.client.key_path = cfg.tls_key_file.as_ref().map(|p| p.display().to_string());
        c.set_tls_config(tls);
    }
    c.set_use_tls(cfg.tls);
    c
}

/// The ACL signature hook (RocketMQ 5 ACL 2.0: access key = user, secret key = password).
pub(super) fn acl_hook(cfg: &RocketMqSideConfig) -> Option<Arc<dyn RPCHook>> {
    match (&cfg.access_key, &cfg.secret_key) {
        (Some(ak), Some(sk)) => Some(Arc::new(AclClientRPCHook::new(
            SessionCredentials::with_keys(ak.as_str(), sk.expose()),
        ))),
        _ => None,
    }
}

/// How the side connects, for error messages: `TLS, ACL user mqc` or `plaintext`.
pub(super) fn describe(cfg: &RocketMqSideConfig) -> String {
    let mut parts = vec![if cfg.tls { "TLS" } else { "plaintext" }.to_owned()];
    if let Some(ak) = &cfg.access_key {
        parts.push(format!("ACL user `{ak}`"));
    }
    if let Some(ns) = &cfg.namespace {
        parts.push(format!("namespace `{ns}`"));
    }
    parts.join(", ")
}

/// A client error with the broker's response code spelled out. The client keeps the code but
/// not always the broker's remark, so "Broker operation failed" alone would not say why.
pub(super) fn explain(e: &ClientError) -> String {
    // The client appends a line pointing at the RocketMQ FAQ to some errors: one line is kept.
    let first_line = |s: String| s.lines().next().unwrap_or_default().to_owned();
    let mut text = first_line(e.to_string());
    let mut source = std::error::Error::source(e);
    // The client wraps transport errors (a refused TLS handshake, a certificate) several deep.
    while let Some(s) = source {
        let line = first_line(s.to_string());
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = s.source();
    }
    match e.broker_response_code() {
        Some(code) => format!(
            "{text} (broker response code {code}: {})",
            response_code(code)
        ),
        None => text,
    }
}

/// What a RocketMQ remoting response code means (org.apache.rocketmq.remoting.protocol.ResponseCode).
pub(super) fn response_code(code: i32) -> &'static str {
    match code {
        1 => "SYSTEM_ERROR",
        2 => "SYSTEM_BUSY: the broker's send queue or page cache is busy; try again",
        3 => "REQUEST_CODE_NOT_SUPPORTED",
        10 => "FLUSH_DISK_TIMEOUT",
        11 => "SLAVE_NOT_AVAILABLE",
        12 => "FLUSH_SLAVE_TIMEOUT",
        13 => "MESSAGE_ILLEGAL",
        14 => {
            "SERVICE_NOT_AVAILABLE: the broker is not writable (its store's disk is over \
             diskSpaceWarningLevelRatio, at most 90 %; or it is a slave or shutting down)"
        }
        15 => "VERSION_NOT_SUPPORTED",
        16 => {
            "NO_PERMISSION: wrong ACL credentials (access_key / secret_key), or an ACL user \
             without Sub and Get on the topic and Sub on the group (Pub to produce), or a topic \
             or broker whose perm forbids it"
        }
        17 => "TOPIC_NOT_EXIST",
        24 => "SUBSCRIPTION_PARSE_FAILED",
        25 => "SUBSCRIPTION_NOT_EXIST",
        26 => "SUBSCRIPTION_NOT_LATEST",
        27 => "SUBSCRIPTION_GROUP_NOT_EXIST",
        _ => "see ResponseCode in the RocketMQ sources",
    }
}

/// Erases the type of one of the client's futures. They nest deeply; behind a `dyn Future`
/// the caller's future (a test's, the traffic generator's) stays shallow, so crates that await
/// ours need no `recursion_limit` of their own.
pub(super) fn boxed<'a, T>(
    f: impl Future<Output = T> + Send + 'a,
) -> Pin<Box<dyn Future<Output = T> + Send + 'a>> {
    Box::pin(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broker_failure_names_its_response_code() {
        let e = ClientError::broker_operation_failed("SEND", 14, "service not available now");
        let text = explain(&e);
        assert!(
            text.contains("broker response code 14: SERVICE_NOT_AVAILABLE"),
            "{text}"
        );
        assert!(text.contains("diskSpaceWarningLevelRatio"), "{text}");
    }

    #[test]
    fn tls_settings_become_the_clients_and_nothing_else() {
        let mut cfg = RocketMqSideConfig::plain("127.0.0.1:29876", "t", "g");
        let plain = client_config(&cfg);
        assert!(!plain.is_use_tls());
        assert!(!plain.is_decode_decompress_body());
        cfg.tls = true;
        cfg.tls_ca_file = Some("/tb/ca.pem".into());
        cfg.namespace = Some("ns1".into());
        let mut c = client_config(&cfg);
        assert!(c.is_use_tls() && c.tls_config().enable);
        assert_eq!(
            c.tls_config().config_file,
            "",
            "no /etc/rocketmq/tls.properties"
        );
        assert!(c.tls_config().client.auth_server);
        assert_eq!(
            c.tls_config().client.trust_cert_path.as_deref(),
            Some("/tb/ca.pem")
        );
        assert_eq!(c.get_namespace().as_deref(), Some("ns1"));
        assert_eq!(describe(&cfg), "TLS, namespace `ns1`");
    }
}
