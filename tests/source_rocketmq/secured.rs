//! The secured broker of the test bed (`scripts/testbed up rocketmq-secure`: TLS enforced, ACL
//! 2.0 on): the right user over TLS consumes (and refetches); wrong credentials, a plaintext
//! client and a CA the client does not trust each stop the start with one error naming the
//! side, and nothing is consumed.

use super::*;

use mq_cutover::source::Position;

fn secure_name_server() -> String {
    std::env::var("MQC_ROCKETMQ_SECURE_NAMESRV").unwrap_or_else(|_| "127.0.0.1:29876".into())
}

/// The secured side's settings as a user would write them: ACL user, TLS with the test bed's CA.
fn secured(topic: &str, group: &str) -> RocketMqSideConfig {
    let mut cfg = RocketMqSideConfig::plain(&secure_name_server(), topic, group);
    cfg.access_key =
        Some(std::env::var("MQC_ROCKETMQ_SECURE_ACCESS_KEY").unwrap_or_else(|_| "mqc".into()));
    cfg.secret_key = Some(
        serde_json::from_value(serde_json::json!(std::env::var(
            "MQC_ROCKETMQ_SECURE_SECRET_KEY"
        )
        .unwrap_or_else(|_| "mqc-secret".into())))
        .unwrap(),
    );
    cfg.tls = true;
    cfg.tls_ca_file = Some(
        std::env::var("MQC_TESTBED_CA")
            .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/.testbed/tls/ca.pem").into())
            .into(),
    );
    cfg
}

/// A fresh topic on the secured broker (created by its super user) and a fresh group.
async fn fresh_secured_topic(test: &str, queues: u32) -> (String, String) {
    let addr = secure_name_server();
    let reachable = addr
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok());
    assert!(
        reachable,
        "the secured RocketMQ name server at {addr} is not reachable. Start it with \
         `scripts/testbed up rocketmq-secure` (`scripts/testbed up` starts it too)."
    );
    let tag = format!("{:08x}", rand::random::<u32>());
    let topic = format!("mqc-s-{test}-{tag}");
    create_topic("rocketmq-secure", &topic, queues).await;
    (topic, format!("mqc-g-{test}-{tag}"))
}

fn secured_side(cfg: RocketMqSideConfig) -> SideConfig {
    let mut s = side(&cfg.topic, &cfg.group);
    s.rocketmq = Some(cfg);
    s
}

/// Starts a source with `cfg` and expects its start to fail; returns the error's text, after
/// checking that nothing was handed over.
async fn start_fails(cfg: RocketMqSideConfig) -> (String, Duration) {
    let t = Instant::now();
    let mut src = start(&secured_side(cfg), false);
    let result = tokio::time::timeout(Duration::from_secs(60), &mut src.task)
        .await
        .expect("run() returns")
        .expect("no panic");
    let took = t.elapsed();
    let e = result.expect_err("the start fails");
    assert!(
        matches!(e, SourceError::Start { .. }),
        "a start error, not {e:?}"
    );
    assert!(src.rx.recv().await.is_none(), "nothing is consumed");
    assert!(!src.membership.has_joined(), "never joined");
    (e.to_string(), took)
}

#[tokio::test]
async fn the_acl_user_consumes_over_tls_and_refetches() {
    let t0 = Instant::now();
    let (topic, group) = fresh_secured_topic("tls", 2).await;
    let cfg = secured(&topic, &group);
    let w = RocketMqWriter::connect_side(&cfg, &format!("{group}-producer"), None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    send_range(&w, &topic, 0..20).await;

    let mut src = start(&secured_side(cfg.clone()), false);
    let got = src.take(20, ARRIVAL).await;
    assert!(src.quiet(Duration::from_secs(1)).await.is_empty());
    let ids: BTreeSet<String> = got.iter().map(id_of).collect();
    assert_eq!(ids, (0..20).map(|n| format!("m-{n}")).collect());
    assert!(got
        .iter()
        .all(|m| m.origin.broker.as_deref() == Some("broker-s")));
    let origin = got[7].origin.clone();
    let id = id_of(&got[7]);
    let finished = per_queue(got.iter().map(|m| (m.origin.partition, m.origin.offset)));
    done(got);
    // The refetch consumer signs and encrypts too.
    let again = src
        .refetch
        .refetch(&Position::of(&origin))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .expect("still there");
    assert_eq!(again.identity.unwrap().id, id);
    src.stop().await;
    assert_nothing_lost_after_restart(&secured_side(cfg), &w, &topic, &finished).await;
    w.shutdown().await;
    eprintln!("secured: whole test {:?}", t0.elapsed());
}

#[tokio::test]
async fn a_wrong_password_fails_the_start_with_one_error_naming_the_side() {
    let (topic, group) = fresh_secured_topic("wrong-pw", 1).await;
    let mut cfg = secured(&topic, &group);
    cfg.secret_key = Some(serde_json::from_value(serde_json::json!("not-the-password")).unwrap());
    let (e, took) = start_fails(cfg).await;
    assert!(
        e.starts_with("rocketmq: cannot start the consumer: "),
        "{e}"
    );
    assert!(
        e.contains("refused this client (TLS, ACL user `mqc`)")
            && e.contains("wrong ACL credentials"),
        "{e}"
    );
    eprintln!("wrong password: {took:?}: {e}");
}

#[tokio::test]
async fn a_plaintext_client_against_the_tls_port_fails_the_start_with_one_error_naming_the_side() {
    let (topic, group) = fresh_secured_topic("plaintext", 1).await;
    let mut cfg = secured(&topic, &group);
    cfg.tls = false;
    cfg.tls_ca_file = None;
    let (e, took) = start_fails(cfg).await;
    assert!(
        e.starts_with("rocketmq: cannot start the consumer: "),
        "{e}"
    );
    assert!(e.contains("(plaintext, ACL user `mqc`)"), "{e}");
    assert!(
        e.contains("a TLS-only name server refuses a plaintext client"),
        "{e}"
    );
    eprintln!("plaintext: {took:?}: {e}");
}

#[tokio::test]
async fn a_broker_certificate_from_an_unknown_ca_fails_the_start_with_one_error_naming_the_side() {
    let (topic, group) = fresh_secured_topic("unknown-ca", 1).await;
    let mut cfg = secured(&topic, &group);
    // The system's roots: the test bed's CA is not among them.
    cfg.tls_ca_file = None;
    let (e, took) = start_fails(cfg).await;
    assert!(
        e.starts_with("rocketmq: cannot start the consumer: "),
        "{e}"
    );
    assert!(e.contains("(TLS, ACL user `mqc`)"), "{e}");
    assert!(e.contains("tls_ca_file"), "{e}");
    eprintln!("unknown CA: {took:?}: {e}");
}
