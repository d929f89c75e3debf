//! Validation is fuzzed, not only decoding: arbitrary records of every schema
//! (values at the edges of what the schema admits, built from the `.avsc`
//! files by `testkit::hostile`) and arbitrary bytes go through the path the
//! services run: `decode_item` (framing, schema, `Rules`), then for what is
//! accepted the BigQuery row and, for trades, the candle builder with its
//! snapshot; for what is refused the dead letter. Each case ends in records or
//! dead letters, never a panic (release builds check overflow too, see
//! ARCHITECTURE.md "Hostile input").

use std::collections::HashMap;

use proptest::prelude::*;
use rdkafka::message::{OwnedMessage, Timestamp};
use tickpipe_consumers::bq::rows::{row, Coordinates};
use tickpipe_consumers::bq::schema::{table_spec, DecimalColumns};
use tickpipe_consumers::candles::{CandleBuilder, CandleConfig, Output};
use tickpipe_consumers::decode::{decode_item, reject_letter, Item};
use tickpipe_schemas::validate::Rules;
use tickpipe_schemas::AnyRecord;
use tickpipe_schemas::{Codec, DeadLetter, Record, Topic, WriteFraming};
use tickpipe_testkit::hostile::{any_body, single_object, NOW};

fn topic_of() -> HashMap<String, Topic> {
    Topic::ALL.iter().map(|t| (t.name(""), *t)).collect()
}

fn item(codec: &Codec, topic: Topic, payload: Vec<u8>, offset: i64) -> Item {
    let msg = OwnedMessage::new(
        Some(payload),
        Some(b"key".to_vec()),
        topic.name(""),
        Timestamp::NotAvailable,
        0,
        offset,
        None,
    );
    decode_item(codec, &Rules::at(NOW), &topic_of(), &msg)
}

/// What a sink does with one item: a row for BigQuery, or a dead letter that
/// the codec can write.
fn sink(codec: &Codec, item: &Item) -> Result<(), TestCaseError> {
    match &item.body {
        Ok(body) => {
            let spec = table_spec(body.topic(), DecimalColumns::BigNumeric);
            let at = Coordinates {
                topic: &item.topic,
                partition: item.partition,
                offset: item.offset,
            };
            // An accepted record's times are within the rules, so its row is too.
            let r = row(&body.values(), &spec.fields, at, NOW);
            prop_assert!(r.is_ok(), "an accepted record has no BigQuery row: {r:?} for {body:?}");
        }
        Err(reject) => {
            prop_assert!(!reject.error.is_empty(), "a reject without a reason");
            letter_is_writable(codec, &reject_letter("test", item, reject, NOW))?;
        }
    }
    Ok(())
}

fn letter_is_writable(codec: &Codec, letter: &DeadLetter) -> Result<(), TestCaseError> {
    let bytes = codec.encode(letter);
    prop_assert!(bytes.is_ok(), "a dead letter cannot be encoded: {bytes:?}");
    Ok(())
}

fn config() -> CandleConfig {
    CandleConfig {
        intervals: ["1s", "1m", "1h", "1d"]
            .iter()
            .map(|i| i.parse().expect("interval"))
            .collect(),
        allowed_lateness: 5_000_000,
        fill_empty: true,
        max_fill: 100,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn every_record_of_every_schema_is_written_or_a_dead_letter(
        (topic, body) in prop::sample::select(Topic::ALL.to_vec()).prop_flat_map(|t| (Just(t), any_body(t))),
    ) {
        let codec = Codec::new(WriteFraming::SingleObject);
        sink(&codec, &item(&codec, topic, single_object(topic, &body), 1))?;
    }

    #[test]
    fn arbitrary_bytes_on_any_topic_are_dead_letters(
        topic in prop::sample::select(Topic::ALL.to_vec()),
        framed in any::<bool>(),
        bytes in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let codec = Codec::new(WriteFraming::SingleObject);
        let payload = if framed { single_object(topic, &bytes) } else { bytes };
        let item = item(&codec, topic, payload, 7);
        sink(&codec, &item)?;
    }

    #[test]
    fn trades_become_candles_or_dead_letters(
        bodies in prop::collection::vec(any_body(Topic::Trades), 1..40),
    ) {
        let codec = Codec::new(WriteFraming::SingleObject);
        let mut builder = CandleBuilder::new(config());
        let mut bars = Vec::new();
        let mut outputs = Vec::new();
        for (offset, body) in bodies.iter().enumerate() {
            let item = item(&codec, Topic::Trades, single_object(Topic::Trades, body), offset as i64);
            match &item.body {
                Ok(AnyRecord::Trade(trade)) => {
                    builder.push(trade, &mut bars);
                    outputs.extend(bars.drain(..).map(|o| builder.resolve(o)));
                }
                Ok(other) => prop_assert!(false, "a trade decoded as {other:?}"),
                Err(_) => sink(&codec, &item)?,
            }
        }
        // The state survives a snapshot, and what it then builds is the same.
        let restored = CandleBuilder::restore(config(), &builder.snapshot());
        prop_assert!(restored.is_ok(), "snapshot does not restore: {:?}", restored.err());
        builder.finish(&mut bars);
        outputs.extend(bars.drain(..).map(|o| builder.resolve(o)));
        for o in outputs {
            match o {
                // Our own candles must pass the rules the sinks apply to them.
                Output::Candle(c) => {
                    let bytes = codec.encode(&c);
                    prop_assert!(bytes.is_ok(), "a candle cannot be encoded: {bytes:?}");
                    let item = item(&codec, Topic::Candles, bytes.unwrap_or_default(), 0);
                    prop_assert!(item.body.is_ok(), "the sinks refuse our candle {c:?}: {:?}", item.body.err());
                    sink(&codec, &item)?;
                }
                Output::Late { trade, .. } | Output::Invalid { trade, .. } => {
                    let bytes = codec.encode(&trade);
                    prop_assert!(bytes.is_ok(), "a refused trade cannot be encoded: {bytes:?}");
                    prop_assert!(!trade.key().is_empty());
                }
                Output::Unrepresentable { key, .. } => prop_assert!(!key.is_empty()),
            }
        }
    }
}
