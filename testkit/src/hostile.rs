//! Hostile records: proptest strategies that build an Avro body for any of our
//! schemas by walking its JSON, with values chosen at the edges of what the
//! schema admits (longs at their extremes and around the test's clock, strings
//! of any content and length, decimals up to and past 38 digits, every enum
//! symbol and union branch, and sometimes an index past the last one).
//!
//! Driven by the schema rather than by the typed records, so that a field added
//! to an `.avsc` file is fuzzed without touching the tests.

use std::collections::HashMap;

use proptest::prelude::*;
use serde_json::Value as Json;
use tickpipe_schemas::wire::{put_bytes, put_long};
use tickpipe_schemas::Topic;

/// A clock for the generated times: 2026-01-01T00:00:00Z in µs. Tests validate
/// with `Rules::at(NOW)` so that plausible times pass and reach the code after
/// validation.
pub const NOW: i64 = 1_767_225_600_000_000;

/// An Avro body of the topic's compiled-in schema.
pub fn any_body(topic: Topic) -> BoxedStrategy<Vec<u8>> {
    let schema: Json = serde_json::from_str(&topic.schema().json).expect("compiled-in schemas are JSON");
    let mut names = HashMap::new();
    strategy(&schema, "", &mut names)
}

/// The body in Avro single-object encoding, as the services write without a
/// registry.
pub fn single_object(topic: Topic, body: &[u8]) -> Vec<u8> {
    let mut out = vec![0xC3, 0x01];
    out.extend_from_slice(&topic.schema().fingerprint.to_le_bytes());
    out.extend_from_slice(body);
    out
}

fn encoded_long(s: impl Strategy<Value = i64> + 'static) -> BoxedStrategy<Vec<u8>> {
    s.prop_map(|v| {
        let mut out = Vec::with_capacity(10);
        put_long(&mut out, v);
        out
    })
    .boxed()
}

/// Avro `bytes` (a length, then the bytes) of each value of `s`: strings and
/// decimals are written so too.
fn encoded_bytes<T: AsRef<[u8]> + std::fmt::Debug>(s: impl Strategy<Value = T> + 'static) -> BoxedStrategy<Vec<u8>> {
    s.prop_map(|b| {
        let b = b.as_ref();
        let mut out = Vec::with_capacity(b.len() + 3);
        put_bytes(&mut out, b);
        out
    })
    .boxed()
}

fn edge_longs() -> impl Strategy<Value = i64> {
    prop::sample::select(vec![
        i64::MIN,
        i64::MIN + 1,
        -1,
        0,
        1,
        i64::MAX - 1,
        i64::MAX,
        i64::from(i32::MAX),
        i64::from(i32::MIN),
    ])
}

fn long_for(field: &str, logical: Option<&str>) -> BoxedStrategy<Vec<u8>> {
    if logical.is_some_and(|l| l.starts_with("timestamp")) || field.ends_with("_time") {
        // Mostly within the three days before the test's clock, so that most
        // records pass validation and reach what comes after it (windows, rows);
        // sometimes aligned to a minute, around the future limit, or anywhere.
        let day = 86_400_000_000_i64;
        encoded_long(prop_oneof![
            12 => (NOW - 3 * day)..NOW,
            2 => ((NOW - 3 * day)..NOW).prop_map(|t| t - t.rem_euclid(60_000_000)),
            1 => (NOW + day - 2)..(NOW + day + 2),
            1 => edge_longs(),
            1 => any::<i64>(),
        ])
    } else {
        encoded_long(prop_oneof![12 => 0..1_000_i64, 2 => edge_longs(), 1 => any::<i64>()])
    }
}

fn int_strategy() -> BoxedStrategy<Vec<u8>> {
    encoded_long(prop_oneof![
        3 => 0..100_i64,
        1 => prop::sample::select(vec![i64::from(i32::MIN), -1, i64::from(i32::MAX)]),
        1 => any::<i32>().prop_map(i64::from),
    ])
}

fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => prop::sample::select(vec![
            "binance", "coincap", "BTCUSDT", "ETHUSDT", "ethereum", "1s", "5s", "1m", "1h", "1d",
        ])
        .prop_map(str::to_owned),
        2 => prop::sample::select(vec![
            "1w", "1M", "0s", "-1m", "288230376151711744s", "9223372036854775807s", "2562047788015216h",
            "153722867280912931m", "366d", "", " ", "\0", "é",
        ])
        .prop_map(str::to_owned),
        1 => ".{0,40}",
        1 => (250_usize..300).prop_map(|n| "A".repeat(n)),
    ]
}

fn string_strategy() -> BoxedStrategy<Vec<u8>> {
    encoded_bytes(any_text())
}

/// The fewest two's-complement bytes of `v`, as Avro decimals are written.
fn minimal_be(v: i128) -> Vec<u8> {
    let bytes = v.to_be_bytes();
    let mut start = 0;
    while start < 15 {
        let (b, next) = (bytes[start], bytes[start + 1]);
        if (b == 0 && next & 0x80 == 0) || (b == 0xFF && next & 0x80 != 0) {
            start += 1;
        } else {
            break;
        }
    }
    bytes[start..].to_vec()
}

fn decimal_strategy() -> BoxedStrategy<Vec<u8>> {
    let max38 = 10_i128.pow(38) - 1;
    encoded_bytes(prop_oneof![
        // Plausible prices and quantities: up to 10^12 with at most 8
        // fractional digits, as exchanges send them.
        12 => (1_i128..1_000_000_000_000, 10_u32..=18).prop_map(|(m, k)| minimal_be(m * 10_i128.pow(k))),
        2 => (1_i128..100_000_000_000_000_000_000_000_000).prop_map(minimal_be),
        2 => prop::sample::select(vec![0, 1, -1, max38, -max38, max38 + 1, i128::MAX, i128::MIN]).prop_map(minimal_be),
        1 => any::<i128>().prop_map(minimal_be),
        1 => prop::collection::vec(any::<u8>(), 0..20),
    ])
}

fn bytes_strategy() -> BoxedStrategy<Vec<u8>> {
    encoded_bytes(prop_oneof![
        4 => prop::collection::vec(any::<u8>(), 0..64),
        1 => prop::collection::vec(any::<u8>(), 1_000..3_000),
    ])
}

/// An index into `n` choices, and sometimes one past them (a writer that does
/// not follow the schema).
fn index(n: usize) -> impl Strategy<Value = usize> {
    prop_oneof![50 => 0..n, 1 => n..n + 2]
}

fn tagged(n: usize, branches: Vec<BoxedStrategy<Vec<u8>>>) -> BoxedStrategy<Vec<u8>> {
    (index(n), branches)
        .prop_map(|(i, mut bodies)| {
            let mut out = Vec::new();
            put_long(&mut out, i as i64);
            if i < bodies.len() {
                out.append(&mut bodies[i]);
            }
            out
        })
        .boxed()
}

/// Array or map blocks: one block of the items, then the terminating 0.
fn blocks(item: BoxedStrategy<Vec<u8>>) -> BoxedStrategy<Vec<u8>> {
    prop::collection::vec(item, 0..4)
        .prop_map(|items| {
            let mut out = Vec::new();
            if !items.is_empty() {
                put_long(&mut out, items.len() as i64);
                for mut i in items {
                    out.append(&mut i);
                }
            }
            out.push(0);
            out
        })
        .boxed()
}

fn strategy(schema: &Json, field: &str, names: &mut HashMap<String, Json>) -> BoxedStrategy<Vec<u8>> {
    match schema {
        Json::String(kind) => match kind.as_str() {
            "null" => Just(Vec::new()).boxed(),
            "boolean" => any::<bool>().prop_map(|b| vec![u8::from(b)]).boxed(),
            "int" => int_strategy(),
            "long" => long_for(field, None),
            "string" => string_strategy(),
            "bytes" => bytes_strategy(),
            name => {
                let named = names
                    .get(name)
                    .or_else(|| names.get(&format!("tickpipe.{name}")))
                    .cloned()
                    .unwrap_or_else(|| panic!("unknown type {name} in a compiled-in schema"));
                strategy(&named, field, names)
            }
        },
        Json::Array(branches) => {
            let branches: Vec<_> = branches.iter().map(|b| strategy(b, field, names)).collect();
            tagged(branches.len(), branches)
        }
        Json::Object(o) => {
            let kind = o.get("type").cloned().unwrap_or(Json::Null);
            let logical = o.get("logicalType").and_then(Json::as_str);
            if let Some(name) = o.get("name").and_then(Json::as_str) {
                names.insert(name.to_owned(), schema.clone());
                if let Some(ns) = o.get("namespace").and_then(Json::as_str) {
                    names.insert(format!("{ns}.{name}"), schema.clone());
                }
            }
            match kind.as_str() {
                Some("record") => {
                    let fields: Vec<_> = o
                        .get("fields")
                        .and_then(Json::as_array)
                        .map(Vec::as_slice)
                        .unwrap_or_default()
                        .iter()
                        .map(|f| {
                            let name = f.get("name").and_then(Json::as_str).unwrap_or_default();
                            strategy(f.get("type").unwrap_or(&Json::Null), name, names)
                        })
                        .collect();
                    fields.prop_map(|parts| parts.concat()).boxed()
                }
                Some("enum") => {
                    let n = o.get("symbols").and_then(Json::as_array).map_or(0, Vec::len);
                    encoded_long(index(n).prop_map(|i| i as i64))
                }
                Some("array") => blocks(strategy(o.get("items").unwrap_or(&Json::Null), field, names)),
                Some("map") => {
                    let value = strategy(o.get("values").unwrap_or(&Json::Null), field, names);
                    blocks(
                        (string_strategy(), value)
                            .prop_map(|(mut k, mut v)| {
                                k.append(&mut v);
                                k
                            })
                            .boxed(),
                    )
                }
                Some("bytes") if logical == Some("decimal") => decimal_strategy(),
                Some("long") => long_for(field, logical),
                Some(_) => strategy(&kind, field, names),
                None => strategy(&kind, field, names),
            }
        }
        other => panic!("unexpected schema node {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_bytes_are_twos_complement() {
        assert_eq!(minimal_be(0), vec![0]);
        assert_eq!(minimal_be(127), vec![0x7F]);
        assert_eq!(minimal_be(128), vec![0x00, 0x80]);
        assert_eq!(minimal_be(-1), vec![0xFF]);
        assert_eq!(minimal_be(-129), vec![0xFF, 0x7F]);
    }
}
