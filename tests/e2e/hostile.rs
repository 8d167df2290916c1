//! Hostile records on the real Kafka broker: whatever a producer writes costs one dead letter,
//! never the daemon, and the records after it flow.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::time::Duration;

use futures::StreamExt;

use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

use mq_cutover::source::rocketmq::RocketMqWriter;
use mqc_testkit::reward::FaultPlan;

use crate::common;
use crate::harness::{kafka_bootstrap, rocketmq_namesrv, Bed, Setup};

/// Writes one record to partition 0 of `topic` with `kcat`, headers given as raw bytes
/// (`name=value`): kcat hands its argv bytes to librdkafka unchanged, so a header key may be any
/// bytes, which rdkafka's own producer API (keys are `&str`) cannot write.
fn kcat_produce(topic: &str, headers: &[&[u8]], body: &[u8]) {
    use std::io::Write;
    let mut args: Vec<OsString> = ["-b", &kafka_bootstrap(), "-P", "-t", topic, "-p", "0"]
        .iter()
        .map(OsString::from)
        .collect();
    for h in headers {
        args.push("-H".into());
        args.push(OsString::from_vec(h.to_vec()));
    }
    let mut child = std::process::Command::new("kcat")
        .args(&args)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("`kcat` is missing: run `scripts/testbed deps` (Debian package kcat)");
    child.stdin.take().unwrap().write_all(body).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kcat failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_key_that_is_not_utf8_costs_a_dead_letter_not_the_daemon() {
    let mut bed = Bed::new("e2e-hdrkey", Setup::default()).await;
    let topic = format!("{}-t", bed.prefix);
    kcat_produce(
        &topic,
        &[b"\xff\xfe=x", b"msg-id=hdr-bad-0"],
        br#"{"user_id":"u-1"}"#,
    );
    bed.start_daemon();
    let count = 200;
    bed.produce("hk", count, |a| a.seed = 11).await;
    bed.wait_all_settled("hk", count, Duration::from_secs(120))
        .await;
    assert!(bed.daemons[0].running(), "the daemon died:\n{}", bed.logs());
    let grants = bed.grants();
    for i in 0..count {
        assert_eq!(grants.get(&format!("hk-{i}")).copied(), Some(1), "hk-{i}");
    }
    assert_eq!(grants.get("hdr-bad-0"), None);
    let letters = common::eventually(Duration::from_secs(20), || async {
        !bed.dead_letters().await.is_empty()
    })
    .await;
    assert!(letters.is_some(), "no dead letter:\n{}", bed.logs());
    let letters = bed.dead_letters().await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let l = &letters[0];
    assert_eq!(
        l.reason,
        "header 1 of 2 has a key that is not UTF-8; the record's headers cannot be read"
    );
    assert_eq!((l.side.as_str(), l.partition, l.offset), ("kafka", 0, 0));
    assert_eq!(l.payload, br#"{"user_id":"u-1"}"#);
    assert!(
        !bed.daemons[0].log_text().contains("panicked"),
        "the contained panic is kept out of the log"
    );

    // Its offset was committed past it: a restarted daemon does not read it again.
    bed.daemons[0].signal("TERM");
    assert!(bed.daemons[0].wait_exit(Duration::from_secs(30)).is_some());
    bed.daemons[0].restart();
    bed.produce("hk2", 20, |a| a.seed = 12).await;
    bed.wait_all_settled("hk2", 20, Duration::from_secs(120))
        .await;
    assert_eq!(bed.dead_letters().await.len(), 1, "{}", bed.logs());
    assert!(bed.daemons[0].running(), "{}", bed.logs());
}

/// Writes one record of `body` with header `msg-id: id` to partition 0 of `topic`, compressed
/// with `codec` (librdkafka's `compression.type`).
async fn produce_compressed(topic: &str, codec: &str, id: &str, body: &[u8]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .set("compression.type", codec)
        // The producer checks a record's size before compressing it.
        .set("message.max.bytes", "100000000")
        .create()
        .expect("kafka producer");
    let headers = OwnedHeaders::new().insert(Header {
        key: "msg-id",
        value: Some(id),
    });
    producer
        .send(
            FutureRecord::<(), [u8]>::to(topic)
                .partition(0)
                .payload(body)
                .headers(headers),
            Duration::from_secs(30),
        )
        .await
        .unwrap_or_else(|(e, _)| panic!("producing {id} ({codec}): {e}"));
}

/// A JSON body with a business id, `len` bytes long, padded with zeros.
fn padded(len: usize) -> Vec<u8> {
    let mut body = br#"{"user_id":"u-2","pad":""#.to_vec();
    body.resize(len - 2, b'0');
    body.extend_from_slice(br#""}"#);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_bodies_over_max_message_bytes_plain_or_inflated_are_dead_lettered() {
    let max = 64 * 1024;
    let setup = Setup {
        max_message_bytes: max,
        max_buffered_bytes: max,
        ..Setup::default()
    };
    let mut bed = Bed::new("e2e-kbig", setup).await;
    let topic = format!("{}-t", bed.prefix);
    // Good JSON, over the bound as sent; then 32 MiB of mostly zeros, some 32 KiB on the wire
    // once compressed; and one of exactly the bound, compressed, which is forwarded.
    produce_compressed(&topic, "none", "big-plain", &padded(100_000)).await;
    let bomb = padded(32 << 20);
    produce_compressed(&topic, "gzip", "big-gzip", &bomb).await;
    produce_compressed(&topic, "zstd", "big-zstd", &bomb).await;
    produce_compressed(&topic, "gzip", "fits-0", &padded(max)).await;
    bed.start_daemon();
    let count = 200;
    bed.produce("kb", count, |a| a.seed = 13).await;
    bed.wait_all_settled("kb", count, Duration::from_secs(120))
        .await;
    assert!(bed.daemons[0].running(), "the daemon died:\n{}", bed.logs());
    let grants = bed.grants();
    for i in 0..count {
        assert_eq!(grants.get(&format!("kb-{i}")).copied(), Some(1), "kb-{i}");
    }
    assert_eq!(grants.get("fits-0").copied(), Some(1));
    let letters = common::eventually(Duration::from_secs(20), || async {
        bed.dead_letters().await.len() >= 3
    })
    .await;
    assert!(letters.is_some(), "dead letters missing:\n{}", bed.logs());
    let mut letters: Vec<(i64, String)> = bed
        .dead_letters()
        .await
        .into_iter()
        .map(|l| {
            assert!(
                l.payload.is_empty(),
                "no body is kept: {} bytes, {}",
                l.payload.len(),
                l.reason
            );
            assert_eq!((l.side.as_str(), l.partition), ("kafka", 0));
            (l.offset, l.reason)
        })
        .collect();
    letters.sort();
    assert_eq!(
        letters,
        vec![
            (
                0,
                format!("body of 100000 bytes is over pipeline.max_message_bytes = {max}")
            ),
            (
                1,
                format!("body of 33554432 bytes is over pipeline.max_message_bytes = {max}")
            ),
            (
                2,
                format!("body of 33554432 bytes is over pipeline.max_message_bytes = {max}")
            ),
        ]
    );
    for id in ["big-plain", "big-gzip", "big-zstd"] {
        assert_eq!(grants.get(id), None, "{id}");
    }
    // librdkafka inflated each bomb whole before the source saw it (docs/kafka.md).
    eprintln!(
        "daemon peak RSS {} KiB",
        bed.daemons[0].memory_kib("VmHWM").unwrap_or(0)
    );
}

/// A JSON body of `len` bytes for business id `user`.
fn padded_for(user: &str, len: usize) -> Vec<u8> {
    let mut body = format!(r#"{{"user_id":"{user}","pad":""#).into_bytes();
    body.resize(len - 2, b'0');
    body.extend_from_slice(br#""}"#);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_one_mib_messages_per_side_stay_within_the_byte_bound() {
    let budget: usize = 32 << 20;
    let setup = Setup {
        max_buffered_bytes: budget,
        initial_percent: 50,
        // 1 MiB bodies on a busy test machine: no call may time out (an ambiguous outcome is
        // retried under at_least_once, and could be granted twice).
        sink_timeout: "30s",
        // A downstream slower than the brokers: a backlog builds up in front of it.
        max_in_flight: 16,
        faults: FaultPlan {
            latency: Duration::from_millis(20),
            ..FaultPlan::default()
        },
        ..Setup::default()
    };
    let mut bed = Bed::new("e2e-bytes", setup).await;
    let topic = format!("{}-t", bed.prefix);
    let count: usize = 2000;
    let size: usize = 1 << 20;
    // Both sides written in full before the daemon starts: each has 2,000 MiB waiting for it.
    // Kafka's records go uncompressed (a compressed batch is inflated by librdkafka beyond any
    // bound of ours, docs/kafka.md), into a topic that takes 1 MiB records and is deleted at the
    // end; RocketMQ's bodies are zlib-compressed by the client (its default), kept small on disk
    // and inflated by the source, under max_message_bytes.
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .create()
        .expect("kafka admin client");
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    let larger =
        AlterConfig::new(ResourceSpecifier::Topic(&topic)).set("max.message.bytes", "4194304");
    for r in admin
        .alter_configs([&larger], &opts)
        .await
        .expect("alter the topic")
    {
        r.expect("the topic takes 4 MiB records");
    }
    let kafka = async {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", kafka_bootstrap())
            .set("message.max.bytes", "4000000")
            .set("linger.ms", "20")
            .create()
            .expect("kafka producer");
        let sends = (0..count).map(|i| {
            let producer = &producer;
            let topic = &topic;
            async move {
                let id = format!("mb-{i}");
                let body = padded_for(&format!("u-{i}"), size);
                let headers = OwnedHeaders::new().insert(Header {
                    key: "msg-id",
                    value: Some(&id),
                });
                producer
                    .send(
                        FutureRecord::<(), [u8]>::to(topic)
                            .payload(&body)
                            .headers(headers),
                        Duration::from_secs(60),
                    )
                    .await
                    .unwrap_or_else(|(e, _)| panic!("producing {id}: {e}"));
            }
        });
        futures::stream::iter(sends)
            .buffer_unordered(64)
            .collect::<Vec<()>>()
            .await;
    };
    let rocketmq = async {
        let writer = RocketMqWriter::connect(&rocketmq_namesrv(), &format!("{}-p", bed.prefix))
            .await
            .expect("rocketmq producer");
        for i in 0..count {
            let id = format!("mb-{i}");
            let body = padded_for(&format!("u-{i}"), size);
            // A send the broker did not confirm in time is tried again, as `produce` does.
            let mut tries = 0;
            while let Err(e) = writer
                .send(&topic, None, "", &[("msg-id", &id)], &body)
                .await
            {
                tries += 1;
                assert!(
                    e.is_retryable() && tries < 10,
                    "producing {id} to rocketmq: {e}"
                );
            }
        }
        writer.shutdown().await;
    };
    kafka.await;
    rocketmq.await;
    bed.start_daemon();
    bed.wait_all_settled("mb", count as u64, Duration::from_secs(400))
        .await;
    let peak_rss_kib = bed.daemons[0].memory_kib("VmHWM").expect("the daemon runs");
    let grants = bed.grants();
    for i in 0..count {
        assert_eq!(grants.get(&format!("mb-{i}")).copied(), Some(1), "mb-{i}");
    }
    for side in ["kafka", "rocketmq"] {
        let peak = bed.daemons[0]
            .metric(&format!("mqc_buffered_bytes_peak{{side=\"{side}\"}}"))
            .await as usize;
        eprintln!("{side}: peak buffered {} KiB", peak >> 10);
        assert!(peak <= budget, "{side}: {peak} bytes buffered at once");
        // The bound was reached: the backlog did press against it.
        assert!(
            peak >= budget / 2,
            "{side}: only {peak} bytes buffered at most"
        );
    }
    eprintln!("daemon peak RSS {peak_rss_kib} KiB");
    // Two sides' budgets, the clients' buffers and the daemon itself, under the 512 Mi of
    // deploy/k8s; unbounded, the 4,000 MiB waiting would flow into the channels.
    let _ = admin.delete_topics(&[&topic], &opts).await;
    assert!(
        peak_rss_kib < 480 * 1024,
        "daemon peak RSS {peak_rss_kib} KiB\n{}",
        bed.logs()
    );
}
