//! The message both sources hand to the pipeline: its identity (or why it has none), the payload,
//! where it came from, and the acknowledgement handle that only the pipeline uses.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::source::config::IdSource;

/// A side's name, cheap to clone.
pub type Side = Arc<str>;

/// The identity of a logical message, the same in both brokers' copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The cross-broker message id: the arbitration key.
    pub id: String,
    /// The business id: hashed for the percentage, matched by the whitelist.
    pub business_id: String,
}

/// Why a message cannot be processed: it goes to the dead letters with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

/// Where a copy came from: enough to find it in its broker again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The side (broker consumer) that received it.
    pub side: Side,
    /// Kafka topic / RocketMQ topic.
    pub topic: Arc<str>,
    /// Kafka partition / RocketMQ queue id.
    pub partition: i32,
    /// The RocketMQ broker holding the queue (a topic's queue ids repeat on every broker);
    /// `None` for Kafka, where topic and partition name the log.
    pub broker: Option<Arc<str>>,
    /// Kafka offset / RocketMQ queue offset.
    pub offset: i64,
    /// When the producer (or the broker, per the topic's timestamp type) stamped the message, ms
    /// since the epoch; 0 when unknown. Parity counts by this time, so that the two copies of one
    /// dual-written message fall in the same bucket however far apart the sides consume them.
    pub born_ms: i64,
}

/// One copy of a message, as received by one side.
#[derive(Debug)]
pub struct Message {
    /// The ids, or why they could not be read.
    pub identity: Result<Identity, BadInput>,
    /// The body, forwarded to the sink unchanged.
    pub payload: Vec<u8>,
    /// Where it came from.
    pub origin: Origin,
    /// Acknowledges the copy to its source once its fate is recorded.
    pub ack: Ack,
    /// When the source handed the copy to its pipeline (for `mqc_decision_seconds`).
    pub received: std::time::Instant,
    /// The share of `pipeline.max_buffered_bytes` its body holds, given back when the copy is
    /// dropped ([`crate::source::outlet`]); set by the source's outlet, none elsewhere.
    pub held: crate::source::outlet::Held,
}

/// A position whose message is finished, sent back to the source that owns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// Topic.
    pub topic: Arc<str>,
    /// Partition / queue id.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

/// The acknowledgement handle of one copy. Calling [`Ack::done`] tells the source the copy's fate
/// is recorded and its offset may be committed; dropping it without `done` hands the copy back
/// (its offset is never committed, so the broker delivers it again after a restart).
#[derive(Debug)]
pub struct Ack {
    tx: mpsc::UnboundedSender<Finished>,
    position: Finished,
}

impl Ack {
    /// A handle reporting to `tx`.
    pub fn new(tx: mpsc::UnboundedSender<Finished>, position: Finished) -> Ack {
        Ack { tx, position }
    }

    /// The copy's fate is recorded in Redis: its offset may be committed.
    pub fn done(self) {
        // A closed channel means the source is gone (rebalanced away or shut down): the offset
        // will not be committed by this consumer, which is the safe side.
        let _ = self.tx.send(self.position);
    }
}

/// Reads the identity of a message: `header` looks a header / user property up by name, `body`
/// is the payload. A JSON body is parsed at most once, and only if a pointer needs it.
pub fn read_identity<'h>(
    message_id: &IdSource,
    business_id: &IdSource,
    header: impl Fn(&str) -> Option<&'h [u8]>,
    body: &[u8],
) -> Result<Identity, BadInput> {
    let mut json: Option<Result<serde_json::Value, String>> = None;
    let mut read = |what: &str, src: &IdSource| -> Result<String, BadInput> {
        let value = match src {
            IdSource::Header(name) => {
                let raw =
                    header(name).ok_or_else(|| BadInput(format!("{what}: no header `{name}`")))?;
                std::str::from_utf8(raw)
                    .map_err(|_| BadInput(format!("{what}: header `{name}` is not UTF-8")))?
                    .to_owned()
            }
            IdSource::JsonPointer(ptr) => {
                let doc = json
                    .get_or_insert_with(|| serde_json::from_slice(body).map_err(|e| e.to_string()));
                let doc = doc
                    .as_ref()
                    .map_err(|e| BadInput(format!("{what}: body is not JSON ({e})")))?;
                match doc.pointer(ptr) {
                    Some(serde_json::Value::String(s)) => s.clone(),
                    Some(serde_json::Value::Number(n)) => integer(n).ok_or_else(|| {
                        BadInput(format!(
                            "{what}: `{ptr}` is the number {n}, not an integer within 64 bits; \
                             give ids that are not such integers as strings"
                        ))
                    })?,
                    Some(other) => {
                        return Err(BadInput(format!(
                            "{what}: `{ptr}` is {}, not a string or number",
                            kind(other)
                        )))
                    }
                    None => return Err(BadInput(format!("{what}: no `{ptr}` in the body"))),
                }
            }
        };
        if value.trim().is_empty() {
            return Err(BadInput(format!("{what} is empty")));
        }
        Ok(value)
    };
    let id = read("message id", message_id)?;
    let business_id = read("business id", business_id)?;
    Ok(Identity { id, business_id })
}

/// The decimal text of an integer that fits in 64 bits (signed or not), exactly as it reads.
/// Anything else (a fraction, an exponent, a larger integer) is parsed by serde_json into an
/// `f64`, which rounds: two different large ids would become one, and `1.0` would differ from `1`.
fn integer(n: &serde_json::Number) -> Option<String> {
    if let Some(u) = n.as_u64() {
        Some(u.to_string())
    } else {
        n.as_i64().map(|i| i.to_string())
    }
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
        _ => "a scalar",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn h(name: &str) -> IdSource {
        IdSource::Header(name.into())
    }
    fn p(ptr: &str) -> IdSource {
        IdSource::JsonPointer(ptr.into())
    }

    fn headers<'a>(pairs: &'a [(&'a str, &'a [u8])]) -> impl Fn(&str) -> Option<&'a [u8]> {
        move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
    }

    #[test]
    fn ids_from_a_header_and_a_json_pointer() {
        let hs: &[(&str, &[u8])] = &[("msg-id", b"m-1")];
        let id = read_identity(
            &h("msg-id"),
            &p("/user/id"),
            headers(hs),
            br#"{"user":{"id":42}}"#,
        )
        .unwrap();
        assert_eq!(
            id,
            Identity {
                id: "m-1".into(),
                business_id: "42".into()
            }
        );
    }

    #[test]
    fn both_ids_from_the_body() {
        let id = read_identity(
            &p("/id"),
            &p("/uid"),
            headers(&[]),
            br#"{"id":"a","uid":"u"}"#,
        )
        .unwrap();
        assert_eq!(id.id, "a");
        assert_eq!(id.business_id, "u");
    }

    #[test]
    fn a_missing_header_is_bad_input_with_its_name() {
        let e = read_identity(&h("msg-id"), &p("/u"), headers(&[]), b"{}").unwrap_err();
        assert_eq!(e.0, "message id: no header `msg-id`");
    }

    #[test]
    fn a_body_that_is_not_json_is_bad_input() {
        let hs: &[(&str, &[u8])] = &[("msg-id", b"m-1")];
        let e = read_identity(&h("msg-id"), &p("/u"), headers(hs), b"not json").unwrap_err();
        assert!(e.0.starts_with("business id: body is not JSON"), "{e}");
    }

    #[test]
    fn a_pointer_to_an_object_or_nothing_is_bad_input() {
        let e = read_identity(&p("/a"), &p("/b"), headers(&[]), br#"{"a":{"x":1}}"#).unwrap_err();
        assert_eq!(e.0, "message id: `/a` is an object, not a string or number");
        let e = read_identity(&p("/a"), &p("/b"), headers(&[]), br#"{"a":"1"}"#).unwrap_err();
        assert_eq!(e.0, "business id: no `/b` in the body");
    }

    #[test]
    fn empty_or_non_utf8_ids_are_bad_input() {
        let hs: &[(&str, &[u8])] = &[("m", b""), ("n", b"\xff\xfe")];
        assert_eq!(
            read_identity(&h("m"), &h("m"), headers(hs), b"")
                .unwrap_err()
                .0,
            "message id is empty"
        );
        assert_eq!(
            read_identity(&h("n"), &h("m"), headers(hs), b"")
                .unwrap_err()
                .0,
            "message id: header `n` is not UTF-8"
        );
    }

    fn body_id(body: &str) -> Result<String, String> {
        read_identity(&p("/id"), &p("/id"), headers(&[]), body.as_bytes())
            .map(|i| i.id)
            .map_err(|e| e.0)
    }

    #[test]
    fn numeric_ids_are_taken_exactly_as_64_bit_integers() {
        for (body, id) in [
            (r#"{"id":42}"#, "42"),
            (r#"{"id":-7}"#, "-7"),
            (r#"{"id":18446744073709551615}"#, "18446744073709551615"),
            (r#"{"id":-9223372036854775808}"#, "-9223372036854775808"),
            // Past 2^53 an f64 can no longer tell neighbours apart: these two must stay two.
            (r#"{"id":9007199254740993}"#, "9007199254740993"),
            (r#"{"id":9007199254740992}"#, "9007199254740992"),
        ] {
            assert_eq!(body_id(body).as_deref(), Ok(id), "{body}");
        }
    }

    #[test]
    fn non_integer_or_out_of_range_numeric_ids_are_bad_input() {
        // Each of these went through an f64: `1.0` became an id other than `1`, and the two
        // 23-digit ids below became one and the same id.
        for body in [
            r#"{"id":1.0}"#,
            r#"{"id":1.5}"#,
            r#"{"id":1e3}"#,
            r#"{"id":12345678901234567890123}"#,
            r#"{"id":12345678901234567890124}"#,
            r#"{"id":-9223372036854775809}"#,
        ] {
            let e = body_id(body).unwrap_err();
            assert!(
                e.starts_with("message id: `/id` is the number ")
                    && e.contains("not an integer within 64 bits"),
                "{body}: {e}"
            );
        }
    }

    /// A JSON document with ids in the places the fuzzed pointers look, of every JSON type.
    fn json_doc() -> impl Strategy<Value = serde_json::Value> {
        let scalar = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(|n| serde_json::json!(n)),
            any::<u64>().prop_map(|n| serde_json::json!(n)),
            any::<f64>().prop_map(|n| serde_json::json!(n)),
            "(?s).{0,12}".prop_map(serde_json::Value::String),
        ];
        scalar.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("id".to_owned()),
                        Just("u".to_owned()),
                        "[a-z~/0-9]{0,3}"
                    ],
                    inner,
                    0..4
                )
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn id_source() -> impl Strategy<Value = IdSource> {
        prop_oneof![
            prop_oneof![Just("msg-id".to_owned()), "(?s).{0,6}"].prop_map(IdSource::Header),
            prop_oneof![
                Just("/id".to_owned()),
                Just("/u".to_owned()),
                Just("/id/0".to_owned()),
                "/[a-z~0-9/]{0,8}",
                "(?s).{0,8}",
            ]
            .prop_map(IdSource::JsonPointer),
        ]
    }

    proptest! {
        #![proptest_config(crate::fuzzing::config(1))]

        /// Whatever a producer sends, identity extraction answers with ids or a reason: no
        /// panic, no empty id, and a numeric id only as the exact integer it is.
        #[test]
        fn fuzz_identity_extraction(
            message_id in id_source(),
            business_id in id_source(),
            headers in prop::collection::vec(
                (prop_oneof![Just("msg-id".to_owned()), "(?s).{0,6}"], crate::fuzzing::bytes(24)),
                0..4,
            ),
            body in prop_oneof![
                json_doc().prop_map(|d| serde_json::to_vec(&d).unwrap()),
                crate::fuzzing::bytes(64),
            ],
        ) {
            let lookup = |name: &str| {
                headers.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
            };
            match read_identity(&message_id, &business_id, lookup, &body) {
                Ok(id) => {
                    prop_assert!(!id.id.trim().is_empty());
                    prop_assert!(!id.business_id.trim().is_empty());
                    if let IdSource::JsonPointer(ptr) = &message_id {
                        let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
                        if let Some(serde_json::Value::Number(n)) = doc.pointer(ptr) {
                            prop_assert!(n.is_i64() || n.is_u64());
                            prop_assert_eq!(&id.id, &n.to_string());
                        }
                    }
                }
                Err(BadInput(reason)) => prop_assert!(!reason.is_empty()),
            }
        }
    }

    #[test]
    fn ack_reports_its_position_and_a_dropped_ack_reports_nothing() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let pos = |o| Finished {
            topic: "t".into(),
            partition: 1,
            offset: o,
        };
        Ack::new(tx.clone(), pos(7)).done();
        drop(Ack::new(tx, pos(8)));
        assert_eq!(rx.try_recv().unwrap(), pos(7));
        assert!(rx.try_recv().is_err());
    }
}
