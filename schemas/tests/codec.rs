//! Round trips through both framings, and one distinct error per way a payload
//! can be wrong.

mod common;

use apache_avro::rabin::Rabin;
use apache_avro::Schema;
use common::*;
use tickpipe_schemas::*;

fn roundtrip<R: Record + std::fmt::Debug + PartialEq>(record: R) {
    for framing in [WriteFraming::SingleObject, WriteFraming::Confluent] {
        let codec = Codec::new(framing);
        codec.add_registry_schema(42, R::SCHEMA_JSON).unwrap();
        codec.set_write_id(R::NAME, 42);
        let bytes = codec.encode(&record).unwrap();
        match framing {
            WriteFraming::SingleObject => {
                assert_eq!(&bytes[..2], &[0xC3, 0x01]);
                assert_eq!(&bytes[2..10], &R::compiled().fingerprint.to_le_bytes());
            }
            WriteFraming::Confluent => assert_eq!(&bytes[..5], &[0, 0, 0, 0, 42]),
        }
        assert_eq!(codec.decode::<R>(&bytes).unwrap(), record, "{framing:?}");
    }
}

#[test]
fn every_record_roundtrips_in_both_framings() {
    roundtrip(trade());
    roundtrip(asset());
    roundtrip(rate());
    roundtrip(exchange());
    roundtrip(market());
    roundtrip(price());
    roundtrip(candle());
    roundtrip(dead_letter());
}

#[test]
fn rust_fields_follow_the_avsc_field_order() {
    fn check<R: Record>() {
        let Schema::Record(rs) = &R::compiled().schema else {
            panic!("{} is not a record", R::NAME)
        };
        let names: Vec<&str> = rs.fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, R::FIELDS, "{}", R::NAME);
        assert_eq!(rs.name.fullname(None), R::NAME);
        let common = &names[names.len() - 3..];
        assert_eq!(
            common,
            ["source", "event_time", "ingest_time"],
            "{} lacks the common fields",
            R::NAME
        );
    }
    check::<Asset>();
    check::<Rate>();
    check::<Exchange>();
    check::<Market>();
    check::<Price>();
    check::<Trade>();
    check::<Candle>();
    check::<DeadLetter>();
}

#[test]
fn topics_map_to_their_records_and_subjects() {
    assert_eq!(Topic::Trades.name("dev."), "dev.trades");
    assert_eq!(Topic::DeadLetters.value_subject(""), "dead-letters-value");
    assert_eq!(Topic::Trades.schema().name, Trade::NAME);
    assert_eq!(Topic::Assets.schema().name, Asset::NAME);
    for t in Topic::ALL {
        assert_eq!(Topic::from_base_name(t.base_name()), Some(t));
    }
    assert_eq!(trade().key(), "binance:BTCUSDT");
    assert_eq!(market().key(), "binance/ETH/BTC");
    assert_eq!(candle().key(), "binance:BTCUSDT");
    assert_eq!(asset().key(), "bitcoin");
}

#[test]
fn fingerprint_is_crc64_avro_of_the_canonical_form() {
    // Vectors as fastavro computes them (`fingerprint(s, "CRC-64-AVRO")` gives the
    // little-endian bytes in hex: "8f5c393f1ad57572" for `"int"`).
    let int = Schema::parse_str(r#""int""#).unwrap();
    assert_eq!(tickpipe_schemas::record::fingerprint(&int), 0x7275_d51a_3f39_5c8f);
    assert_eq!(
        0x7275_d51a_3f39_5c8f_u64.to_le_bytes(),
        [0x8f, 0x5c, 0x39, 0x3f, 0x1a, 0xd5, 0x75, 0x72]
    );
    let string = Schema::parse_str(r#""string""#).unwrap();
    assert_eq!(tickpipe_schemas::record::fingerprint(&string), 0x8f01_4872_6345_03c7);
    // And the header carries it little-endian, as apache-avro's own digest does.
    let fp = Trade::compiled().underlying.fingerprint::<Rabin>();
    assert_eq!(fp.bytes, Trade::compiled().fingerprint.to_le_bytes());
}

/// One bad payload and the error it must give.
fn check(payload: &[u8], expected: DecodeError) {
    let codec = Codec::new(WriteFraming::SingleObject);
    codec.add_registry_schema(7, Trade::SCHEMA_JSON).unwrap();
    codec.add_registry_schema(8, Asset::SCHEMA_JSON).unwrap();
    assert_eq!(codec.decode::<Trade>(payload), Err(expected));
}

#[test]
fn each_bad_payload_gets_its_own_error() {
    let good = Codec::new(WriteFraming::SingleObject).encode(&trade()).unwrap();
    let body = &good[10..];
    let confluent = |id: u32, body: &[u8]| [&[0u8][..], &id.to_be_bytes(), body].concat();

    check(&[], DecodeError::Empty);
    check(
        b"{\"e\":\"trade\"}",
        DecodeError::UnknownFraming {
            prefix: "0x7b 0x22".into(),
        },
    );
    check(
        &[0x00, 0, 0],
        DecodeError::TruncatedHeader {
            framing: "Confluent",
            len: 3,
            need: 5,
        },
    );
    check(
        &[0xC3],
        DecodeError::TruncatedHeader {
            framing: "single-object",
            len: 1,
            need: 10,
        },
    );
    check(
        &[0xC3, 0x01, 1, 2],
        DecodeError::TruncatedHeader {
            framing: "single-object",
            len: 4,
            need: 10,
        },
    );
    check(&confluent(99, body), DecodeError::UnknownSchemaId(99));
    check(
        &[&[0xC3, 0x01][..], &0x1234_u64.to_le_bytes(), body].concat(),
        DecodeError::UnknownFingerprint(0x1234),
    );
    check(
        &confluent(8, body),
        DecodeError::WrongRecord {
            expected: "tickpipe.Trade",
            found: "tickpipe.Asset".into(),
        },
    );
    let fp = Asset::compiled().fingerprint.to_le_bytes();
    check(
        &[&[0xC3, 0x01][..], &fp, body].concat(),
        DecodeError::WrongRecord {
            expected: "tickpipe.Trade",
            found: "tickpipe.Asset".into(),
        },
    );
    check(
        &good[..good.len() - 3],
        DecodeError::Truncated {
            record: "tickpipe.Trade",
            field: "ingest_time",
            detail: format!("input ends at byte {}", body.len() - 3),
        },
    );
    check(
        &[&good[..], &[0]].concat(),
        DecodeError::TrailingBytes {
            record: "tickpipe.Trade",
            count: 1,
        },
    );
    // The kind enum (third field) has two symbols; index 5 is invalid.
    let mut bad_enum = confluent(7, body);
    let kind_at = 5 + 1 + "binance".len() + 1 + "BTCUSDT".len();
    bad_enum[kind_at] = 10;
    check(
        &bad_enum,
        DecodeError::InvalidBody {
            record: "tickpipe.Trade",
            field: "kind",
            detail: "TradeKind index 5 out of range at byte 16".into(),
        },
    );
}

#[test]
fn errors_read_clearly() {
    assert_eq!(
        DecodeError::UnknownFraming { prefix: "0x7b 0x22".into() }.to_string(),
        "unknown framing: payload starts with 0x7b 0x22; expected 0x00 (Confluent wire format) or 0xC3 0x01 (Avro single-object encoding)"
    );
    assert_eq!(DecodeError::UnknownSchemaId(99).kind(), "unknown_schema_id");
}

#[test]
fn confluent_encoding_needs_a_registered_id() {
    let codec = Codec::new(WriteFraming::Confluent);
    assert_eq!(
        codec.encode(&trade()),
        Err(EncodeError::NotRegistered("tickpipe.Trade"))
    );
}

#[test]
fn decimals_that_cannot_be_carried_exactly_are_refused() {
    let mut t = trade();
    t.price = dec("0.0000000000000000001");
    let err = Codec::new(WriteFraming::SingleObject).encode(&t).unwrap_err();
    assert_eq!(
        err.to_string(),
        "tickpipe.Trade.price: 0.0000000000000000001 has more than 18 fractional digits"
    );
}
