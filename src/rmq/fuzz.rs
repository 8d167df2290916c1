//! Structured fuzzing of what the RocketMQ client reads from a name server or a broker: routes
//! (fastjson), remoting frames, pull bodies (messages, properties, compressed bodies) and tag
//! expressions. Any input is a value or an error; nothing is sized by a number the peer chose.

use proptest::prelude::*;

use super::remoting::Command;
use super::wire::{decode_messages, parse_properties, quote_number_keys, Route, TagFilter};
use crate::fuzzing;

/// One stored message as a broker writes it, with fields a hostile broker may bend.
fn message() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![
            Just(0xdaa3_20a7u32 as i32),
            Just(-626_843_481i32),
            any::<i32>()
        ],
        any::<i32>(),
        any::<i64>(),
        prop_oneof![
            Just(0i32),
            Just(1),
            Just(1 | 0x100),
            Just(1 | 0x200),
            any::<i32>()
        ],
        prop_oneof![
            fuzzing::bytes(24),
            Just(vec![0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01])
        ],
        prop_oneof![Just(None), any::<i32>().prop_map(Some)],
        fuzzing::bytes(12),
        prop_oneof![Just(b"msg-id\x01m-1\x02".to_vec()), fuzzing::bytes(24),],
        prop_oneof![Just(None), any::<i32>().prop_map(Some)],
    )
        .prop_map(
            |(magic, queue, offset, sys_flag, body, body_len, topic, props, size)| {
                let mut m = Vec::new();
                m.extend(0i32.to_be_bytes()); // size, set below
                m.extend(magic.to_be_bytes());
                m.extend(0i32.to_be_bytes()); // body crc
                m.extend(queue.to_be_bytes());
                m.extend(0i32.to_be_bytes()); // flag
                m.extend(offset.to_be_bytes());
                m.extend(0i64.to_be_bytes()); // physical offset
                m.extend(sys_flag.to_be_bytes());
                m.extend(0i64.to_be_bytes()); // born timestamp
                m.extend([0u8; 8]); // born host (v4)
                m.extend(0i64.to_be_bytes()); // store timestamp
                m.extend([0u8; 8]); // store host (v4)
                m.extend(0i32.to_be_bytes()); // reconsume times
                m.extend(0i64.to_be_bytes()); // prepared offset
                m.extend(body_len.unwrap_or(body.len() as i32).to_be_bytes());
                m.extend(&body);
                m.push(topic.len() as u8);
                m.extend(&topic);
                m.extend((props.len() as i16).to_be_bytes());
                m.extend(&props);
                let n = size.unwrap_or(m.len() as i32);
                m[..4].copy_from_slice(&n.to_be_bytes());
                m
            },
        )
}

#[test]
fn a_route_with_too_many_queues_in_all_is_refused() {
    let brokers: Vec<String> = (0..40)
        .map(|i| format!(r#"{{"brokerName":"b{i}","brokerAddrs":{{0:"h:1"}}}}"#))
        .collect();
    let queues: Vec<String> = (0..40)
        .map(|i| {
            format!(r#"{{"brokerName":"b{i}","readQueueNums":4096,"writeQueueNums":1,"perm":6}}"#)
        })
        .collect();
    let json = format!(
        r#"{{"brokerDatas":[{}],"queueDatas":[{}]}}"#,
        brokers.join(","),
        queues.join(",")
    );
    let e = Route::parse("t", json.as_bytes()).unwrap_err();
    assert!(e.contains("in all"), "{e}");
}

#[test]
fn a_route_with_billions_of_queues_is_refused_not_allocated() {
    let json = br#"{"brokerDatas":[{"brokerName":"b","brokerAddrs":{0:"h:1"}}],
        "queueDatas":[{"brokerName":"b","readQueueNums":2147483647,"writeQueueNums":4,"perm":6}]}"#;
    let e = Route::parse("t", json).unwrap_err();
    assert!(e.contains("more than"), "{e}");
}

proptest! {
    #![proptest_config(fuzzing::config(1))]

    #[test]
    fn fuzz_pull_bodies(messages in prop::collection::vec(message(), 0..4), tail in fuzzing::bytes(8)) {
        let mut body: Vec<u8> = messages.concat();
        let _ = decode_messages(&body);
        body.extend(tail);
        let _ = decode_messages(&body);
    }

    #[test]
    fn fuzz_pull_bodies_of_any_bytes(body in fuzzing::bytes(96)) {
        let _ = decode_messages(&body);
    }

    #[test]
    fn fuzz_remoting_frames(
        header in prop_oneof![
            Just(br#"{"code":0,"flag":1,"opaque":7,"extFields":{"a":"1"}}"#.to_vec()),
            fuzzing::bytes(48),
        ],
        declared in prop_oneof![Just(None), any::<u32>().prop_map(Some)],
        body in fuzzing::bytes(16),
    ) {
        let mut frame = Vec::new();
        frame.extend(declared.unwrap_or(header.len() as u32).to_be_bytes());
        frame.extend(&header);
        frame.extend(&body);
        if let Ok(c) = Command::decode(frame) {
            let _ = (c.number("a"), c.remark(), c.is_response());
        }
    }

    #[test]
    fn fuzz_routes(
        json in prop_oneof![
            (0i32..3, prop_oneof![0i32..20, any::<i32>()], any::<i32>(), "[ -~]{0,8}").prop_map(
                |(n, read, perm, name)| format!(
                    r#"{{"brokerDatas":[{{"brokerName":"b","brokerAddrs":{{{n}:"h:1"}}}}],
                    "queueDatas":[{{"brokerName":"b","readQueueNums":{read},"writeQueueNums":{read},"perm":{perm}}},
                                  {{"brokerName":{name:?},"readQueueNums":1,"writeQueueNums":1,"perm":6}}]}}"#
                ).into_bytes()
            ),
            fuzzing::bytes(64),
        ],
    ) {
        let _ = quote_number_keys(&json);
        if let Ok(route) = Route::parse("t", &json) {
            prop_assert!(route.read.len() <= super::wire::MAX_ROUTE_QUEUES);
        }
    }

    #[test]
    fn fuzz_properties_and_tags(text in "(?s).{0,40}") {
        let _ = parse_properties(&text);
        let f = TagFilter::parse(&text);
        let _ = (f.accepts(Some(&text)), f.accepts(None), f.codes());
    }
}
