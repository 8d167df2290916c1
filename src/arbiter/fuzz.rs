//! Structured fuzzing of what the arbiter reads back from Redis: the one-string answers of the
//! many-id scripts (`<code><flag><attempts>,<len>:<extra>` per id), a record's fields, the
//! switches and the audit trail. A reply that is wrong in any way is an error value for the
//! batch or the id, never a panic, and a declared length is never trusted to size anything.

use proptest::prelude::*;
use redis::Value;

use super::switches::{audit_entries, parse_switches};
use super::{entries, parse_claim, parse_completion, parse_record};
use crate::fuzzing;

/// One answer of a many-id reply, possibly lying about its length.
#[derive(Debug, Clone)]
struct Answer {
    code: u8,
    flag: u8,
    attempts: String,
    declared: Option<u64>,
    extra: Vec<u8>,
}

impl Answer {
    fn write(&self, out: &mut Vec<u8>) {
        out.extend([self.code, self.flag]);
        out.extend(self.attempts.as_bytes());
        out.push(b',');
        let len = self.declared.unwrap_or(self.extra.len() as u64);
        out.extend(len.to_string().as_bytes());
        out.push(b':');
        out.extend(&self.extra);
    }

    /// Whether the answer is well formed, so that the batch must split.
    fn splits(&self) -> bool {
        self.declared.is_none_or(|d| d == self.extra.len() as u64)
            && self.attempts.bytes().all(|b| b.is_ascii_digit())
            && self.attempts.parse::<u64>().is_ok()
    }
}

fn answer(codes: &'static [u8], flags: &'static [u8]) -> impl Strategy<Value = Answer> {
    (
        prop_oneof![4 => prop::sample::select(codes), 1 => any::<u8>()],
        prop_oneof![4 => prop::sample::select(flags), 1 => any::<u8>()],
        prop_oneof![4 => any::<u32>().prop_map(|n| n.to_string()), 1 => fuzzing::number_text()],
        prop_oneof![
            6 => Just(None),
            1 => Just(Some(1u64 << 60)),
            1 => Just(Some(u64::MAX)),
            1 => any::<u64>().prop_map(Some),
            1 => (0u64..8).prop_map(Some),
        ],
        fuzzing::bytes(16),
    )
        .prop_map(|(code, flag, attempts, declared, extra)| Answer {
            code,
            flag,
            attempts,
            declared,
            extra,
        })
}

const CLAIM_CODES: &[u8] = b"0123456";
const CLAIM_FLAGS: &[u8] = b"0123";
const COMPLETION_CODES: &[u8] = b"012345";
const COMPLETION_FLAGS: &[u8] = b"pfdx-?";

#[test]
fn a_length_prefix_of_two_to_the_sixtieth_is_an_error_not_an_allocation() {
    for reply in [
        &b"501,1152921504606846976:x"[..],
        b"501,18446744073709551615:",
        b"101,1:1501,1152921504606846976:in doubt",
    ] {
        let e = entries(reply, 2, parse_claim).unwrap_err();
        assert!(e.to_string().contains("malformed reply"), "{e}");
    }
}

proptest! {
    #![proptest_config(fuzzing::config(1))]

    #[test]
    fn fuzz_claim_replies_of_any_bytes(reply in fuzzing::bytes(64), n in 0usize..6) {
        if let Ok(answers) = entries(&reply, n, parse_claim) {
            prop_assert_eq!(answers.len(), n);
        }
        if let Ok(answers) = entries(&reply, n, parse_completion) {
            prop_assert_eq!(answers.len(), n);
        }
    }

    #[test]
    fn fuzz_structured_claim_replies(
        answers in prop::collection::vec(answer(CLAIM_CODES, CLAIM_FLAGS), 0..6),
        skew in prop_oneof![4 => Just(0i64), 1 => -1i64..=1],
    ) {
        let mut reply = Vec::new();
        answers.iter().for_each(|a| a.write(&mut reply));
        let n = (answers.len() as i64 + skew).max(0) as usize;
        match entries(&reply, n, parse_claim) {
            Ok(got) => prop_assert_eq!(got.len(), n),
            Err(_) => prop_assert!(skew != 0 || !answers.iter().all(Answer::splits)),
        }
    }

    #[test]
    fn fuzz_structured_completion_replies(
        answers in prop::collection::vec(answer(COMPLETION_CODES, COMPLETION_FLAGS), 0..6),
    ) {
        let mut reply = Vec::new();
        answers.iter().for_each(|a| a.write(&mut reply));
        match entries(&reply, answers.len(), parse_completion) {
            Ok(got) => prop_assert_eq!(got.len(), answers.len()),
            Err(_) => prop_assert!(!answers.iter().all(Answer::splits)),
        }
    }

    #[test]
    fn fuzz_record_fields(
        id in "(?s).{0,12}",
        fields in prop::collection::vec(
            (
                prop_oneof![
                    prop::sample::select(&["o", "s", "a", "t", "e", "m", "v", "r", "f", "@kafka", "@"][..])
                        .prop_map(str::to_owned),
                    "(?s).{0,4}",
                ],
                prop_oneof![fuzzing::number_text(), "(?s).{0,8}", Just("i".to_owned())],
            ),
            0..14,
        ),
        pttl in any::<i64>(),
        now_ms in any::<u64>(),
    ) {
        let _ = parse_record(&id, fields, pttl, now_ms);
    }

    #[test]
    fn fuzz_switch_replies(reply in fuzzing::redis_value()) {
        let _ = parse_switches(reply);
    }

    #[test]
    fn fuzz_switch_replies_of_the_right_shape(
        items in prop::collection::vec(
            prop_oneof![
                fuzzing::number_text().prop_map(|n| Value::BulkString(n.into_bytes())),
                fuzzing::bytes(12).prop_map(Value::BulkString),
                any::<i64>().prop_map(Value::Int),
                Just(Value::Nil),
            ],
            0..8,
        ),
    ) {
        let _ = parse_switches(Value::Array(items));
    }

    #[test]
    fn fuzz_audit_replies(reply in fuzzing::redis_value()) {
        let _ = audit_entries(reply);
    }
}

proptest! {
    #![proptest_config(fuzzing::config(4))]

    #[test]
    fn fuzz_audit_entries(entries in prop::collection::vec(
        fuzzing::stream_entry(&["by", "action", "detail"]), 0..6,
    )) {
        let n = entries.len();
        if let Ok(got) = audit_entries(Value::Array(entries)) {
            prop_assert_eq!(got.len(), n);
        }
    }
}
