//! Hostile records on the real Kafka broker: whatever a producer writes costs one dead letter,
//! never the daemon, and the records after it flow.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

use crate::common;
use crate::harness::{kafka_bootstrap, Bed, Setup};

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
