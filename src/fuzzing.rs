//! What the structured fuzz tests share (test builds only): how many cases each runs, and the
//! strategies for the inputs a broker, Redis or an operator can hand the daemon's parsers.
//!
//! Every parser that sees such input has a `fuzz_*` proptest beside it, asserting that it never
//! panics and answers every input with a value (an error included). `scripts/test` runs them
//! with [`DEFAULT_CASES`] cases each; `PROPTEST_CASES=N` (which `scripts/fuzz` sets) runs N.

use proptest::prelude::*;
use proptest::test_runner::Config;
use redis::Value;

/// Cases per fuzz test in an ordinary test run: enough to find the shallow bugs, quick enough
/// for every `cargo test`.
pub const DEFAULT_CASES: u32 = 512;

/// The proptest config of a fuzz test: `PROPTEST_CASES` if set, else [`DEFAULT_CASES`] divided
/// by `cost` (a test whose case is expensive runs fewer).
pub fn config(cost: u32) -> Config {
    let cases = match std::env::var("PROPTEST_CASES") {
        Ok(n) => n.parse().expect("PROPTEST_CASES is a number"),
        Err(_) => (DEFAULT_CASES / cost.max(1)).max(16),
    };
    // A failure is shrunk and saved under proptest-regressions/, and tried first next time.
    Config {
        cases,
        ..Config::default()
    }
}

/// Bytes that are often text, sometimes the separators and digits the daemon's formats use,
/// sometimes anything.
pub fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..max),
        proptest::collection::vec(
            prop_oneof![
                Just(b'0'),
                Just(b'1'),
                Just(b'9'),
                Just(b','),
                Just(b':'),
                Just(b'-'),
                Just(b'@'),
                b'a'..=b'z',
                any::<u8>()
            ],
            0..max
        ),
        "[ -~]{0,40}".prop_map(String::into_bytes),
    ]
}

/// A decimal number as Redis or a broker might write one, including the ones that do not fit.
pub fn number_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        Just("18446744073709551616".to_owned()),
        Just("1152921504606846976".to_owned()),
        Just("-0".to_owned()),
        Just("".to_owned()),
        "[0-9]{1,40}",
        "[-+ 0-9a-z.]{0,12}",
    ]
}

/// Any RESP value, nested a few levels deep.
pub fn redis_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Nil),
        any::<i64>().prop_map(Value::Int),
        bytes(24).prop_map(Value::BulkString),
        "[ -~]{0,16}".prop_map(Value::SimpleString),
        Just(Value::Okay),
        any::<f64>().prop_map(Value::Double),
        any::<bool>().prop_map(Value::Boolean),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Set),
            proptest::collection::vec((inner.clone(), inner), 0..4).prop_map(Value::Map),
        ]
    })
}

/// A Redis stream entry as XRANGE answers it, `[id, [field, value, …]]`, with fields from
/// `names` (and others), values often numbers, sometimes the wrong RESP type.
pub fn stream_entry(names: &'static [&'static str]) -> impl Strategy<Value = Value> {
    let odd = prop_oneof![
        Just(Value::Nil),
        any::<i64>().prop_map(Value::Int),
        Just(Value::Array(vec![Value::Okay])),
    ];
    let field = prop_oneof![
        6 => proptest::sample::select(names).prop_map(|n| Value::BulkString(n.into())),
        1 => odd.clone(),
    ];
    let value = prop_oneof![
        3 => bytes(24).prop_map(Value::BulkString),
        3 => number_text().prop_map(|n| Value::BulkString(n.into_bytes())),
        1 => odd,
    ];
    let id = prop_oneof![
        3 => (any::<u64>(), any::<u64>()).prop_map(|(a, b)| format!("{a}-{b}")),
        1 => "[ -~]{0,24}",
    ];
    (id, proptest::collection::vec((field, value), 0..12)).prop_map(|(id, pairs)| {
        let fields = pairs.into_iter().flat_map(|(k, v)| [k, v]).collect();
        Value::Array(vec![
            Value::BulkString(id.into_bytes()),
            Value::Array(fields),
        ])
    })
}
