//! Schema evolution, proven in both directions for every record.
//!
//! The rule (ARCHITECTURE.md, "Schema evolution"): a schema may only change by
//! adding a field with a default, removing a field that has a default, or adding a
//! symbol to an enum that has a default. Then data written with the previous
//! version is read by the new one (BACKWARD) and data written with the new version
//! is read by the previous one (FORWARD). Each allowed change below is checked
//! both ways with real bytes; each forbidden change is shown to fail with a clear
//! error, so the rule has teeth.
//!
//! Released older versions (`schemas::history`) are checked the same way against
//! the current schemas.

mod common;

use apache_avro::types::Value;
use apache_avro::Schema;
use common::*;
use serde_json::json;
use tickpipe_schemas::*;
use tickpipe_testkit::registry::TestRegistry;

/// A schema for apache-avro's generic reader and writer, which play the other
/// side here. They run on the underlying types (decimals as bytes): apache-avro
/// 0.21 cannot resolve bytes-backed decimals (see `record::underlying_json`).
fn generic(json_text: &str) -> Schema {
    Schema::parse_str(&tickpipe_schemas::record::underlying_json(json_text).unwrap()).unwrap()
}

/// The schema text after `change`.
fn evolve(json_text: &str, change: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut v: serde_json::Value = serde_json::from_str(json_text).unwrap();
    change(&mut v);
    v.to_string()
}

/// The field list of a record schema's JSON.
fn fields_mut(schema: &mut serde_json::Value) -> &mut Vec<serde_json::Value> {
    schema["fields"].as_array_mut().unwrap()
}

/// The field named `name` of a record schema's JSON.
fn field_mut<'a>(schema: &'a mut serde_json::Value, name: &str) -> &'a mut serde_json::Value {
    fields_mut(schema).iter_mut().find(|f| f["name"] == name).unwrap()
}

fn fields_of(v: &Value) -> &[(String, Value)] {
    match v {
        Value::Record(fields) => fields,
        other => panic!("not a record: {other:?}"),
    }
}

fn body_of<R: Record>(record: &R) -> Vec<u8> {
    let mut out = Vec::new();
    record.write_body(&mut out).unwrap();
    out
}

/// Frames `body` in the Confluent format with `id`.
fn confluent(id: u32, body: &[u8]) -> Vec<u8> {
    [&[0u8][..], &id.to_be_bytes(), body].concat()
}

/// What the current code reads from `body`, written with the schema `newer`
/// and framed with the registry id `id` it is known by.
fn decode_written_with<R: Record>(newer: &str, id: u32, body: &[u8]) -> Result<R, DecodeError> {
    let codec = Codec::new(WriteFraming::SingleObject);
    codec.add_registry_schema(id, newer).unwrap();
    codec.decode::<R>(&confluent(id, body))
}

/// The sample trade as apache-avro reads it, with `reader` as the reader schema
/// if there is one.
fn trade_datum(reader: Option<&Schema>) -> Result<Value, apache_avro::Error> {
    apache_avro::from_avro_datum(&Trade::compiled().underlying, &mut &body_of(&trade())[..], reader)
}

/// The sample trade's fields as apache-avro reads them.
fn trade_fields() -> Vec<(String, Value)> {
    fields_of(&trade_datum(None).unwrap()).to_vec()
}

/// The allowed changes of a record's schema, with a label. Removal is offered for
/// a nullable field that is null in the sample, so the old reader's default
/// equals the sample's value.
fn allowed_changes<R: Record>(sample: &R) -> Vec<(String, String)> {
    let mut out = vec![
        (
            "add an optional field".to_owned(),
            evolve(R::SCHEMA_JSON, |v| {
                fields_mut(v).push(json!({"name": "added_note", "type": ["null", "string"], "default": null}))
            }),
        ),
        (
            "add a field with a default".to_owned(),
            evolve(R::SCHEMA_JSON, |v| {
                fields_mut(v).insert(1, json!({"name": "added_count", "type": "long", "default": 7}))
            }),
        ),
    ];
    let own = apache_avro::from_avro_datum(&R::compiled().underlying, &mut &body_of(sample)[..], None).unwrap();
    let removable = fields_of(&own)
        .iter()
        .find(|(_, v)| matches!(v, Value::Union(0, b) if **b == Value::Null));
    if let Some((name, _)) = removable {
        let name = name.clone();
        out.push((
            format!("remove the optional field {name}"),
            evolve(R::SCHEMA_JSON, |v| fields_mut(v).retain(|f| f["name"] != json!(name))),
        ));
    }
    out
}

/// Both directions for one record and one newer schema.
fn check_both_ways<R: Record + PartialEq + std::fmt::Debug>(sample: &R, label: &str, newer: &str) {
    let old = &R::compiled().underlying;
    let new = generic(newer);
    let body = body_of(sample);

    // BACKWARD: the new schema reads what the current code wrote.
    let as_old = apache_avro::from_avro_datum(old, &mut &body[..], None).unwrap();
    let as_new = apache_avro::from_avro_datum(old, &mut &body[..], Some(&new))
        .unwrap_or_else(|e| panic!("{}: {label}: the new schema cannot read old data: {e}", R::NAME));
    for (name, value) in fields_of(&as_new) {
        match fields_of(&as_old).iter().find(|(n, _)| n == name) {
            Some((_, old_value)) => assert_eq!(value, old_value, "{}: {label}: field {name}", R::NAME),
            None if name == "added_count" => assert_eq!(value, &Value::Long(7)),
            None => assert_eq!(
                value,
                &Value::Union(0, Box::new(Value::Null)),
                "{}: {label}: field {name}",
                R::NAME
            ),
        }
    }

    // FORWARD: the current code reads what a writer with the new schema wrote.
    let written_by_new = apache_avro::to_avro_datum(&new, as_new).unwrap();
    let read = decode_written_with::<R>(newer, 100, &written_by_new)
        .unwrap_or_else(|e| panic!("{}: {label}: the current code cannot read new data: {e}", R::NAME));
    assert_eq!(&read, sample, "{}: {label}", R::NAME);
}

fn check_record<R: Record + PartialEq + std::fmt::Debug>(sample: R) {
    let changes = allowed_changes(&sample);
    assert!(changes.len() >= 2);
    for (label, newer) in &changes {
        check_both_ways(&sample, label, newer);
    }
    for (file, older) in history::RELEASED {
        let parsed = CompiledSchema::parse(older).unwrap();
        if parsed.name == R::NAME {
            // The released version is the "old" side here: the current schema
            // must read its data and vice versa, which check_both_ways proves
            // with the roles of writer and reader swapped.
            check_both_ways(&sample, file, older);
        }
    }
}

#[test]
fn allowed_changes_work_both_ways_for_every_record() {
    check_record(trade());
    check_record(asset());
    check_record(rate());
    check_record(exchange());
    check_record(market());
    check_record(price());
    check_record(candle());
    check_record(dead_letter());
}

#[test]
fn a_new_source_symbol_reads_as_unknown_in_old_code() {
    let newer = evolve(Trade::SCHEMA_JSON, |v| {
        field_mut(v, "source")["type"]["symbols"]
            .as_array_mut()
            .unwrap()
            .push(json!("kraken"));
    });
    let new = generic(&newer);
    let mut fields = trade_fields();
    let kraken = Source::SYMBOLS.len() as u32;
    fields.iter_mut().find(|(n, _)| n == "source").unwrap().1 = Value::Enum(kraken, "kraken".into());
    let written = apache_avro::to_avro_datum(&new, Value::Record(fields)).unwrap();

    let read = decode_written_with::<Trade>(&newer, 5, &written).unwrap();
    assert_eq!(
        read,
        Trade {
            source: Source::Unknown,
            ..trade()
        }
    );
}

#[test]
fn a_required_field_without_default_breaks_backward() {
    let newer = evolve(Trade::SCHEMA_JSON, |v| {
        fields_mut(v).push(json!({"name": "fee", "type": "string"}))
    });
    let err = trade_datum(Some(&generic(&newer))).unwrap_err();
    assert!(err.to_string().contains("fee"), "{err}");
}

#[test]
fn removing_a_required_field_breaks_forward_with_a_clear_error() {
    let newer = evolve(Trade::SCHEMA_JSON, |v| {
        fields_mut(v).retain(|f| f["name"] != "quantity")
    });
    let new = generic(&newer);
    let as_new = trade_datum(Some(&new)).unwrap();
    let written = apache_avro::to_avro_datum(&new, as_new).unwrap();
    match decode_written_with::<Trade>(&newer, 6, &written) {
        Err(e @ DecodeError::Resolution { .. }) => assert!(e.to_string().contains("quantity"), "{e}"),
        other => panic!("expected a resolution error, got {other:?}"),
    }
}

#[test]
fn changing_a_field_type_breaks_both_ways() {
    let newer = evolve(Trade::SCHEMA_JSON, |v| field_mut(v, "symbol")["type"] = json!("long"));
    let new = generic(&newer);
    assert!(trade_datum(Some(&new)).is_err());
    let mut fields = trade_fields();
    fields.iter_mut().find(|(n, _)| n == "symbol").unwrap().1 = Value::Long(1);
    let written = apache_avro::to_avro_datum(&new, Value::Record(fields)).unwrap();
    assert!(matches!(
        decode_written_with::<Trade>(&newer, 9, &written),
        Err(DecodeError::Resolution { .. })
    ));
}

#[tokio::test]
async fn the_registry_accepts_allowed_changes_and_refuses_breaking_ones_under_full() {
    use tickpipe_schemas::registry::{Compatibility, RegistryClient, RegistryConfig, RegistryError};
    let registry = TestRegistry::start().await.unwrap();
    let c = RegistryClient::new(RegistryConfig::new(&registry.url)).unwrap();
    let subject = format!("{}.trades-value", tickpipe_testkit::stack::unique_name("full"));
    c.set_compatibility(&subject, Compatibility::Full).await.unwrap();
    let v1 = c.register(&subject, Trade::SCHEMA_JSON).await.unwrap();
    let mut last = v1;
    for (label, newer) in allowed_changes(&trade()) {
        let id = c
            .register(&subject, &newer)
            .await
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        assert!(id > last, "{label}: a new version gets a new id");
        last = id;
        // Go back to the base so that each change is judged against it alone.
        c.register(&subject, Trade::SCHEMA_JSON).await.unwrap();
    }
    let breaking = evolve(Trade::SCHEMA_JSON, |v| {
        fields_mut(v).retain(|f| f["name"] != "quantity")
    });
    assert!(matches!(
        c.register(&subject, &breaking).await,
        Err(RegistryError::Incompatible { .. })
    ));
}

#[test]
fn a_changed_decimal_scale_is_refused_not_misread() {
    let newer = evolve(Trade::SCHEMA_JSON, |v| {
        field_mut(v, "price")["type"]["scale"] = json!(8)
    });
    match decode_written_with::<Trade>(&newer, 11, &body_of(&trade())) {
        Err(e @ DecodeError::Resolution { .. }) => {
            assert!(
                e.to_string()
                    .contains(".price is decimal(38, 8) in the writer and decimal(38, 18) here"),
                "{e}"
            )
        }
        other => panic!("expected a resolution error, got {other:?}"),
    }
}
