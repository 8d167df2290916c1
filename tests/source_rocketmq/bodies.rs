//! Message bodies: compressed the ways producers really compress them (the Java client's zlib,
//! zstd and LZ4 frames, rocketmq-client-rust's zlib, zstd and LZ4 blocks), every one arriving
//! intact and once; and bodies over `pipeline.max_message_bytes`, as stored or once
//! uncompressed, dead-lettered with the reason while their offset moves on.

use super::*;

use mq_cutover::source::rocketmq::{Codec, Compression};

/// The body both producers send for id N (MqcJavaProduce.java builds the same).
fn padded_body(n: u32, pad: usize) -> String {
    let unit = format!("pad-{n}-");
    let padding: String = unit.chars().cycle().take(pad).collect();
    format!(r#"{{"user_id":"u-{n}","pad":"{padding}"}}"#)
}

/// A producer of this side's broker that compresses as `compression` says.
async fn compressing_writer(group: &str, compression: Compression) -> RocketMqWriter {
    RocketMqWriter::connect_side(
        &RocketMqSideConfig::plain(&name_server(), "", ""),
        &format!("{group}-{:?}", compression.codec),
        Some(compression),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Sends ids `range` with the Apache RocketMQ Java client, compressed with `codec`.
async fn java_produce(topic: &str, codec: &str, range: std::ops::Range<u32>, pad: usize) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/rocketmq-java-produce");
    let out = tokio::process::Command::new(script)
        .args([
            &name_server(),
            topic,
            codec,
            &range.start.to_string(),
            &range.end.to_string(),
            &pad.to_string(),
        ])
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    assert!(
        out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains(&format!("sent {}", range.len())),
        "{script} {codec} failed (Java 17 and the test bed's RocketMQ jars are needed):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn bodies_compressed_by_java_and_rust_producers_arrive_intact_and_once() {
    let t0 = Instant::now();
    let (topic, group) = fresh_topic("codecs", 2).await;
    const PAD: usize = 2_000;
    // Who compressed which ids, with what: the Java client writes LZ4 frames, this client LZ4
    // blocks; both also zstd and zlib.
    let plan: [(&str, Codec, std::ops::Range<u32>); 6] = [
        ("java", Codec::Lz4, 0..10),
        ("java", Codec::Zstd, 10..20),
        ("java", Codec::Zlib, 20..30),
        ("rust", Codec::Lz4, 30..40),
        ("rust", Codec::Zstd, 40..50),
        ("rust", Codec::Zlib, 50..60),
    ];
    for (who, codec, range) in plan.iter().cloned() {
        if who == "java" {
            let name = match codec {
                Codec::Lz4 => "LZ4",
                Codec::Zstd => "ZSTD",
                Codec::Zlib => "ZLIB",
            };
            java_produce(&topic, name, range, PAD).await;
        } else {
            let w = compressing_writer(
                &group,
                Compression {
                    codec,
                    over_bytes: 1024,
                },
            )
            .await;
            for n in range {
                let id = format!("m-{n}");
                w.send(
                    &topic,
                    None,
                    &id,
                    &[("msg-id", &id)],
                    padded_body(n, PAD).as_bytes(),
                )
                .await
                .unwrap_or_else(|e| panic!("send {id}: {e}"));
            }
            w.shutdown().await;
        }
    }

    // Intact and once.
    let mut src = start(&side(&topic, &group), false);
    let got = src.take(60, ARRIVAL).await;
    assert!(src.quiet(Duration::from_secs(1)).await.is_empty());
    let mut ids = BTreeSet::new();
    for m in &got {
        let id = id_of(m);
        let n: u32 = id[2..].parse().unwrap();
        assert!(ids.insert(n), "{id} twice");
        assert_eq!(
            String::from_utf8_lossy(&m.payload),
            padded_body(n, PAD),
            "{id}"
        );
        assert_eq!(m.identity.as_ref().unwrap().business_id, format!("u-{n}"));
    }
    assert_eq!(ids, (0..60).collect());
    done(got);
    src.stop().await;

    // They were stored compressed, each with the codec planned: a second group reading with a
    // limit below the uncompressed size (but above the stored one) is told, per copy, which
    // codec inflated past it.
    let mut strict = start_with(&side(&topic, &format!("{group}-strict")), false, 64, 1_500);
    let got = strict.take(60, ARRIVAL).await;
    for m in &got {
        let reason = &m.identity.as_ref().expect_err("over the limit").0;
        let codec = reason
            .rsplit_once("once uncompressed (")
            .and_then(|(_, c)| c.split_once(')'))
            .map(|(c, _)| c.to_owned())
            .unwrap_or_else(|| panic!("not an uncompressed-size refusal: {reason}"));
        assert!(
            reason.ends_with("is over pipeline.max_message_bytes = 1500"),
            "{reason}"
        );
        assert!(m.payload.is_empty(), "no payload for a refused body");
        assert!(
            ["LZ4", "zstd", "zlib"].contains(&codec.as_str()),
            "{reason}"
        );
    }
    let mut by_codec: BTreeMap<String, usize> = BTreeMap::new();
    for m in &got {
        let reason = &m.identity.as_ref().unwrap_err().0;
        for c in ["LZ4", "zstd", "zlib"] {
            if reason.contains(&format!("({c})")) {
                *by_codec.entry(c.to_owned()).or_default() += 1;
            }
        }
    }
    assert_eq!(
        by_codec,
        BTreeMap::from([("LZ4".into(), 20), ("zstd".into(), 20), ("zlib".into(), 20)])
    );
    // LZ4 frames (Java) are refused while inflating; LZ4 blocks (this client) declare their
    // size first and are refused on it.
    let lz4_frames = got
        .iter()
        .map(|m| &m.identity.as_ref().unwrap_err().0)
        .filter(|r| r.contains("(LZ4)") && r.starts_with("body of more than"))
        .count();
    assert_eq!(lz4_frames, 10);
    done(got);
    strict.stop().await;
    eprintln!("codecs: whole test {:?}", t0.elapsed());
}

#[tokio::test]
async fn bodies_over_max_message_bytes_are_dead_lettered_with_the_reason_and_the_offset_moves_on() {
    let t0 = Instant::now();
    let (topic, group) = fresh_topic("max-bytes", 1).await;
    const MAX: usize = 64 * 1024;
    let plain = compressing_writer(
        &group,
        Compression {
            codec: Codec::Zlib,
            over_bytes: u32::MAX,
        },
    )
    .await;
    let zlib = compressing_writer(
        &group,
        Compression {
            codec: Codec::Zlib,
            over_bytes: 1024,
        },
    )
    .await;
    let lz4 = compressing_writer(
        &group,
        Compression {
            codec: Codec::Lz4,
            over_bytes: 1024,
        },
    )
    .await;
    let ok = |n: u32| format!(r#"{{"user_id": "u-{n}"}}"#).into_bytes();
    let send = |w: &'static str, n: u32, body: Vec<u8>| {
        let id = format!("m-{n}");
        let topic = topic.clone();
        let w = match w {
            "plain" => &plain,
            "zlib" => &zlib,
            _ => &lz4,
        };
        async move {
            w.send(&topic, None, &id, &[("msg-id", &id)], &body)
                .await
                .unwrap_or_else(|e| panic!("send {id}: {e}"))
        }
    };
    send("plain", 0, ok(0)).await;
    // Stored at 70,000 bytes: over the limit before anything is inflated.
    send("plain", 1, vec![b'x'; 70_000]).await;
    // 1 MiB of zeros stored as about 1 KiB of zlib: refused while inflating, at the limit.
    send("zlib", 2, vec![0; 1 << 20]).await;
    // An LZ4 block declares its size first: refused on the declaration.
    send("lz4", 3, vec![0; 1 << 20]).await;
    // Within the limit once uncompressed: handed on.
    let fits = format!(r#"{{"user_id": "u-4", "pad": "{}"}}"#, "z".repeat(50_000));
    send("zlib", 4, fits.clone().into_bytes()).await;
    send("plain", 5, ok(5)).await;

    let mut src = start_with(&side(&topic, &group), false, 64, MAX);
    let got = src.take(6, ARRIVAL).await;
    assert_eq!(
        got.iter().map(|m| m.origin.offset).collect::<Vec<_>>(),
        (0..6).collect::<Vec<_>>()
    );
    let outcome: Vec<String> = got
        .iter()
        .map(|m| match &m.identity {
            Ok(id) => format!("ok {} {}", id.id, m.payload.len()),
            Err(e) => {
                assert!(m.payload.is_empty(), "a refused body is not handed on");
                e.0.clone()
            }
        })
        .collect();
    assert_eq!(
        outcome,
        vec![
            format!("ok m-0 {}", ok(0).len()),
            format!("body of 70000 bytes is over pipeline.max_message_bytes = {MAX}"),
            format!(
                "body of more than {MAX} bytes once uncompressed (zlib) is over \
                 pipeline.max_message_bytes = {MAX}"
            ),
            format!(
                "body of {} bytes once uncompressed (LZ4) is over pipeline.max_message_bytes = {MAX}",
                1 << 20
            ),
            format!("ok m-4 {}", fits.len()),
            format!("ok m-5 {}", ok(5).len()),
        ]
    );
    let finished = per_queue(got.iter().map(|m| (m.origin.partition, m.origin.offset)));
    done(got);
    src.stop().await;
    // Acknowledged (as the pipeline does once the dead letter is written): the offset moved on.
    assert_nothing_lost_after_restart(&side(&topic, &group), &plain, &topic, &finished).await;
    plain.shutdown().await;
    zlib.shutdown().await;
    lz4.shutdown().await;
    eprintln!("max-bytes: whole test {:?}", t0.elapsed());
}
