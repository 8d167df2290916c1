//! The Kafka source against the secured broker of the test bed (`scripts/testbed up
//! kafka-secure`: SASL_SSL, SCRAM-SHA-512, the test bed's CA), and every codec a producer may
//! use on the plain one. A client the brokers refuse (wrong password, a CA that did not sign the
//! broker's certificate, a plaintext client on the TLS listener) stays up, not joined and named
//! refused, and takes nothing.

use super::*;
use common::Secured;
use rdkafka::producer::Producer as _;

/// A side on the secured broker with `properties` (the secured ones unless the test changes
/// them).
fn secure_side(topic: &str, group: &str, properties: Vec<(String, String)>) -> SideConfig {
    let s = Secured::get();
    let mut side = side_with(topic, group, &[]);
    let k = side.kafka.as_mut().unwrap();
    k.bootstrap_servers = s.kafka_bootstrap.clone();
    for (key, value) in properties {
        k.properties.insert(key, value);
    }
    side
}

/// `n` records `{prefix}-0 ..` on the secured broker, as the client user.
async fn produce_secured(topic: &str, prefix: &str, n: usize) {
    let s = Secured::get();
    let w = KafkaWriter::connect_with(&s.kafka_bootstrap, s.kafka_properties())
        .unwrap_or_else(|e| panic!("secured Kafka: {e} (`scripts/testbed up kafka-secure`)"));
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        let body = format!(r#"{{"user_id":"u-{id}"}}"#);
        w.send(topic, &id, &[("msg-id", &id)], body.as_bytes())
            .await
            .expect("send over SASL_SSL");
    }
    w.flush().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_sasl_ssl_with_scram_every_record_arrives_once_and_commits() {
    logs();
    let s = Secured::get();
    let t = common::unique_prefix("kafka_sasl_ssl");
    let g = format!("{t}-group");
    s.kafka_topic(&t, 2).await;
    produce_secured(&t, "s", 100).await;
    let mut src = start(&secure_side(&t, &g, s.kafka_properties()), 1000);
    let got = src.take(100, TAKE).await;
    let ids: BTreeSet<String> = got.iter().map(id).collect();
    assert_eq!(ids.len(), 100, "each id once");
    assert!(src.membership.has_joined());
    assert_eq!(src.membership.refused(), None);
    got.into_iter().for_each(|m| m.ack.done());
    src.quiet(Duration::from_secs(1)).await;
    src.stop().await;
}

/// Starts a source with `properties` against the secured broker's topic `t` (which holds
/// records), and checks that it is refused with `words` in the reason, does not join, takes
/// nothing, keeps running, and stops cleanly.
async fn refused_with(t: &str, properties: Vec<(String, String)>, words: &str) {
    let g = common::unique_prefix("refused-group");
    let mut src = start(&secure_side(t, &g, properties), 100);
    let deadline = Instant::now() + Duration::from_secs(30);
    let why = loop {
        if let Some(why) = src.membership.refused() {
            break why;
        }
        if src.task.is_finished() {
            let r = (&mut src.task).await.expect("source task panicked");
            panic!("the source stopped instead of waiting to be accepted: {r:?}");
        }
        assert!(
            Instant::now() < deadline,
            "never reported as refused ({words})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(why.contains(words), "{why}");
    // Past the start-up probe (10 s): still up, still not joined, nothing taken.
    src.quiet(Duration::from_secs(12)).await;
    assert!(!src.task.is_finished(), "the source stopped: {why}");
    assert!(!src.membership.has_joined());
    assert_eq!(src.assigned(), 0);
    let took = src.stop().await;
    assert!(took < Duration::from_secs(5), "stopping took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_refused_named_and_nothing_is_consumed() {
    logs();
    let s = Secured::get();
    let t = common::unique_prefix("kafka_wrong_pw");
    s.kafka_topic(&t, 1).await;
    produce_secured(&t, "w", 5).await;
    let mut props = s.kafka_properties();
    props.retain(|(k, _)| k != "sasl.password");
    props.push(("sasl.password".into(), "not-the-password".into()));
    refused_with(&t, props, "authentication refused by the brokers").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_ca_is_refused_named_and_nothing_is_consumed() {
    logs();
    let s = Secured::get();
    let t = common::unique_prefix("kafka_other_ca");
    s.kafka_topic(&t, 1).await;
    produce_secured(&t, "c", 5).await;
    let mut props = s.kafka_properties();
    props.retain(|(k, _)| k != "ssl.ca.location");
    props.push(("ssl.ca.location".into(), s.other_ca.clone()));
    refused_with(&t, props, "TLS handshake failed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_client_on_the_tls_listener_is_refused_named_and_nothing_is_consumed() {
    logs();
    let s = Secured::get();
    let t = common::unique_prefix("kafka_plain_on_tls");
    s.kafka_topic(&t, 1).await;
    produce_secured(&t, "p", 5).await;
    refused_with(&t, Vec::new(), "check security.protocol").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_every_producer_codec_arrive_once_each() {
    let (t, g, _cleanup) = topic("kafka_codecs", 2).await;
    let codecs = ["none", "gzip", "snappy", "lz4", "zstd"];
    for codec in codecs {
        let p: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap())
            .set("compression.type", codec)
            // Batches, so that the codec compresses several records together.
            .set("linger.ms", "20")
            .create()
            .unwrap_or_else(|e| panic!("a {codec} producer: {e}"));
        let sends: Vec<_> = (0..50)
            .map(|i| {
                let id = format!("{codec}-{i}");
                let body = format!(r#"{{"user_id":"u-{id}","pad":"{}"}}"#, "x".repeat(200));
                let p = p.clone();
                let t = t.clone();
                async move {
                    let record = FutureRecord::to(&t).key(&id).payload(&body).headers(
                        OwnedHeaders::new().insert(Header {
                            key: "msg-id",
                            value: Some(&id),
                        }),
                    );
                    p.send(record, Duration::from_secs(10))
                        .await
                        .unwrap_or_else(|(e, _)| unreachable("producing", &e));
                }
            })
            .collect();
        futures::future::join_all(sends).await;
        p.flush(Duration::from_secs(10)).expect("flush");
    }
    let mut src = start(&side(&t, &g), 1000);
    let got = src.take(50 * codecs.len(), TAKE).await;
    let mut seen = BTreeMap::<String, u32>::new();
    for m in got {
        let ident = m.identity.as_ref().expect("a well-formed record").clone();
        assert_eq!(ident.business_id, format!("u-{}", ident.id));
        *seen.entry(ident.id).or_default() += 1;
        m.ack.done();
    }
    for codec in codecs {
        for i in 0..50 {
            assert_eq!(seen.get(&format!("{codec}-{i}")), Some(&1), "{codec}-{i}");
        }
    }
    src.quiet(Duration::from_secs(1)).await;
    src.stop().await;
}
