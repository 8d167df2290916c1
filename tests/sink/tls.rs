//! The HTTP sink over HTTPS: the reward service behind a TLS front with the test bed's server
//! certificate (`scripts/testbed up` makes it; see `tb_tls_material`), trusted through
//! `[sink.tls] ca_file`, with and without the client certificate a mutual-TLS endpoint requires.

use super::*;
use common::Secured;

#[path = "../common/tls_front.rs"]
mod tls_front;
use tls_front::TlsFront;

fn tls_sink(url: String, ca: &str, client: Option<(&str, &str)>) -> Arc<dyn Sink> {
    sink_to(url, |c| {
        c.tls.ca_file = Some(ca.into());
        if let Some((cert, key)) = client {
            c.tls.cert_file = Some(cert.into());
            c.tls.key_file = Some(key.into());
        }
    })
}

#[tokio::test]
async fn https_with_the_configured_ca_and_a_client_certificate_delivers() {
    let s = Secured::get();
    let (reward, _stop) = reward_service(FaultPlan::default()).await;
    // The endpoint requires a client certificate signed by the test bed's CA.
    let front = TlsFront::start(
        &format!("{}/server.pem", s.tls_dir()),
        &format!("{}/server.key", s.tls_dir()),
        Some(&s.ca),
        reward.addr(),
    )
    .await;
    let sink = tls_sink(
        front.url("/grant"),
        &s.ca,
        Some((&s.client_cert, &s.client_key)),
    );
    for i in 0..5 {
        let id = format!("tls-{i}");
        assert_eq!(sink.call(&request(&id, b"{}")).await, CallResult::Success);
    }
    let grants = reward.state().grant_counts();
    assert_eq!(grants.len(), 5, "{grants:?}");
    assert!(grants.values().all(|n| *n == 1), "{grants:?}");
    // Kept alive: one connection for five calls.
    assert_eq!(front.handshakes.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_endpoint_whose_certificate_the_configured_ca_did_not_sign_is_never_sent_to() {
    let s = Secured::get();
    let (reward, _stop) = reward_service(FaultPlan::default()).await;
    let front = TlsFront::start(
        &format!("{}/server.pem", s.tls_dir()),
        &format!("{}/server.key", s.tls_dir()),
        None,
        reward.addr(),
    )
    .await;
    let sink = tls_sink(front.url("/grant"), &s.other_ca, None);
    let got = sink.call(&request("tls-untrusted", b"{}")).await;
    let CallResult::Retryable { reason, .. } = &got else {
        panic!("not a retryable connect failure: {got:?}");
    };
    assert!(
        reason.starts_with("connect failed") && reason.contains("UnknownIssuer"),
        "{reason}"
    );
    assert_eq!(front.handshakes.load(Ordering::SeqCst), 0);
    assert!(reward.state().grant_counts().is_empty());
    // Without `[sink.tls]` the system's roots do not know the test bed's CA either.
    let plain = sink_to(front.url("/grant"), |_| {});
    let got = plain.call(&request("tls-system-roots", b"{}")).await;
    assert!(
        matches!(&got, CallResult::Retryable { reason, .. } if reason.starts_with("connect failed")),
        "{got:?}"
    );
}

#[tokio::test]
async fn a_tls_setting_for_a_plain_url_or_a_certificate_without_its_key_is_refused() {
    let s = Secured::get();
    let mut cfg = SinkConfig::new("http://127.0.0.1:1/grant");
    cfg.tls.ca_file = Some(s.ca.clone().into());
    assert_eq!(cfg.validate().unwrap_err().key, "sink.tls");
    let mut cfg = SinkConfig::new("https://127.0.0.1:1/grant");
    cfg.tls.cert_file = Some(s.client_cert.clone().into());
    assert_eq!(cfg.validate().unwrap_err().key, "sink.tls.key_file");
    // A key file that is not a key: the build names the setting.
    let mut cfg = SinkConfig::new("https://127.0.0.1:1/grant");
    cfg.tls.cert_file = Some(s.client_cert.clone().into());
    cfg.tls.key_file = Some(s.ca.clone().into());
    let e = HttpSink::new(&cfg).unwrap_err().to_string();
    assert!(e.contains("sink.tls.cert_file"), "{e}");
}

#[tokio::test]
async fn header_values_never_show_in_debug() {
    let sink = HttpSink::new(&{
        let mut c = SinkConfig::new("https://user:url-S3CRET@127.0.0.1:1/grant");
        c.headers.insert("X-Api-Key".into(), "hdr-S3CRET".into());
        c
    })
    .unwrap();
    let mut cfg = SinkConfig::new("http://127.0.0.1:1/grant");
    cfg.headers
        .insert("Authorization".into(), "Bearer hdr-S3CRET".into());
    let shown = format!("{sink:?} {cfg:?} {}", serde_json::to_string(&cfg).unwrap());
    assert!(!shown.contains("S3CRET"), "{shown}");
}
