//! BigQuery tables from the Avro schemas: each entity's columns, partitioning
//! and clustering, the de-duplicating view over it, and which changes to an
//! existing table may be applied. Pure: no I/O.
//!
//! Every entity has an append-only table `<entity>_raw` (one row per Kafka
//! record written, so a retried or replayed write can leave a second copy) and
//! a view `<entity>` that keeps one row per Kafka coordinate
//! `(kafka_topic, kafka_partition, kafka_offset)`. Readers query the view.
//! Candles also have `candles_latest`, the newest version of each candle.

use apache_avro::schema::Schema;
use serde::{Deserialize, Serialize};
use tickpipe_schemas::Topic;

/// How Avro decimals are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecimalColumns {
    /// `BIGNUMERIC(38, 18)`: the Avro type exactly (NUMERIC keeps only 9
    /// decimal places, too few for crypto quantities).
    BigNumeric,
    /// The exact decimal text in a `STRING` column, for the emulator, which
    /// cannot create `BIGNUMERIC` columns (DuckDB decimals stop at 38 digits).
    String,
}

impl std::str::FromStr for DecimalColumns {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "bignumeric" => Ok(DecimalColumns::BigNumeric),
            "string" => Ok(DecimalColumns::String),
            other => Err(format!(
                "unknown decimal column type {other:?}; expected bignumeric or string"
            )),
        }
    }
}

/// A column as the BigQuery REST API describes it (`TableFieldSchema`).
/// Unset members are left out of the JSON: some servers refuse `null`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Field {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<Field>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl Field {
    fn new(name: &str, kind: &str, mode: &str) -> Field {
        Field {
            name: name.to_owned(),
            kind: kind.to_owned(),
            mode: Some(mode.to_owned()),
            precision: None,
            scale: None,
            fields: Vec::new(),
            description: None,
        }
    }

    /// The type under its legacy REST name, which is what BigQuery answers with.
    pub fn kind(&self) -> &str {
        match self.kind.to_ascii_uppercase().as_str() {
            "INT64" => "INTEGER",
            "FLOAT64" => "FLOAT",
            "BOOL" => "BOOLEAN",
            "STRUCT" => "RECORD",
            "BIGDECIMAL" => "BIGNUMERIC",
            "DECIMAL" => "NUMERIC",
            _ => self.kind.as_str(),
        }
    }

    /// `NULLABLE` when unset, as BigQuery reads it.
    pub fn mode(&self) -> &str {
        self.mode.as_deref().unwrap_or("NULLABLE")
    }
}

/// The Kafka coordinates and write time every row carries.
pub const KAFKA_TOPIC: &str = "kafka_topic";
pub const KAFKA_PARTITION: &str = "kafka_partition";
pub const KAFKA_OFFSET: &str = "kafka_offset";
pub const WRITTEN_AT: &str = "written_at";

/// One entity's table and view.
#[derive(Debug, Clone)]
pub struct TableSpec {
    pub topic: Topic,
    /// The append-only table, e.g. `trades_raw`.
    pub table: String,
    /// The de-duplicated view, e.g. `trades`.
    pub view: String,
    /// The record's columns (schema order), then the Kafka coordinates.
    pub fields: Vec<Field>,
    /// Day partitions by this column.
    pub partition_by: &'static str,
    /// Clustering columns (at most four).
    pub cluster_by: &'static [&'static str],
}

/// The table of an entity topic, from its compiled-in Avro schema.
pub fn table_spec(topic: Topic, decimals: DecimalColumns) -> TableSpec {
    let view = topic.base_name().replace('-', "_");
    let mut fields = record_fields(&topic.schema().schema, decimals);
    fields.push(described(
        Field::new(KAFKA_TOPIC, "STRING", "REQUIRED"),
        "Kafka topic the row was read from.",
    ));
    fields.push(described(
        Field::new(KAFKA_PARTITION, "INTEGER", "REQUIRED"),
        "Kafka partition the row was read from.",
    ));
    fields.push(described(
        Field::new(KAFKA_OFFSET, "INTEGER", "REQUIRED"),
        "Kafka offset of the record; with topic and partition, the row's identity.",
    ));
    fields.push(described(
        Field::new(WRITTEN_AT, "TIMESTAMP", "REQUIRED"),
        "When bigquery-sink wrote the row.",
    ));
    TableSpec {
        topic,
        table: format!("{view}_raw"),
        view,
        fields,
        partition_by: "event_time",
        cluster_by: cluster_by(topic),
    }
}

fn described(mut f: Field, doc: &str) -> Field {
    f.description = Some(doc.to_owned());
    f
}

/// Clustering follows how each entity is looked up: by symbol or by id.
fn cluster_by(topic: Topic) -> &'static [&'static str] {
    match topic {
        Topic::Assets | Topic::Rates => &["id"],
        Topic::Exchanges => &["exchange_id"],
        Topic::Markets => &["exchange_id", "base_symbol", "quote_symbol"],
        Topic::Prices => &["asset_id"],
        Topic::Trades => &["venue", "symbol"],
        Topic::Candles => &["venue", "symbol", "interval"],
        Topic::DeadLetters => &["component", "stage"],
    }
}

/// The columns of an Avro record schema.
pub fn record_fields(schema: &Schema, decimals: DecimalColumns) -> Vec<Field> {
    let Schema::Record(r) = schema else {
        return Vec::new();
    };
    r.fields
        .iter()
        .map(|f| {
            let mut column = column(&f.name, &f.schema, decimals);
            column.description = f.doc.clone();
            column
        })
        .collect()
}

fn column(name: &str, schema: &Schema, decimals: DecimalColumns) -> Field {
    match schema {
        Schema::Union(u) if u.is_nullable() => {
            let inner = u.variants().iter().find(|s| !matches!(s, Schema::Null));
            let mut f = inner.map_or_else(|| Field::new(name, "STRING", "NULLABLE"), |s| column(name, s, decimals));
            if f.mode() == "REQUIRED" {
                f.mode = Some("NULLABLE".into());
            }
            f
        }
        Schema::Array(a) => {
            let mut f = column(name, &a.items, decimals);
            f.mode = Some("REPEATED".into());
            f
        }
        // BigQuery's own mapping of an Avro map: repeated key/value records.
        Schema::Map(m) => {
            let mut f = Field::new(name, "RECORD", "REPEATED");
            f.fields = vec![
                Field::new("key", "STRING", "REQUIRED"),
                column("value", &m.types, decimals),
            ];
            f
        }
        Schema::Decimal(d) => match decimals {
            DecimalColumns::BigNumeric => {
                let mut f = Field::new(name, "BIGNUMERIC", "REQUIRED");
                f.precision = Some(d.precision.to_string());
                f.scale = Some(d.scale.to_string());
                f
            }
            DecimalColumns::String => Field::new(name, "STRING", "REQUIRED"),
        },
        Schema::TimestampMicros | Schema::TimestampMillis | Schema::TimestampNanos => {
            Field::new(name, "TIMESTAMP", "REQUIRED")
        }
        Schema::Int | Schema::Long => Field::new(name, "INTEGER", "REQUIRED"),
        Schema::Float | Schema::Double => Field::new(name, "FLOAT", "REQUIRED"),
        Schema::Boolean => Field::new(name, "BOOLEAN", "REQUIRED"),
        Schema::Bytes | Schema::Fixed(_) => Field::new(name, "BYTES", "REQUIRED"),
        Schema::Record(_) => {
            let mut f = Field::new(name, "RECORD", "REQUIRED");
            f.fields = record_fields(schema, decimals);
            f
        }
        // Strings, enums (their symbol) and anything else as text.
        _ => Field::new(name, "STRING", "REQUIRED"),
    }
}

/// The view that keeps one row per Kafka coordinate. The table's partitioning
/// column leads the window's `PARTITION BY`: copies of a record share it, so
/// the result is the same, and a filter on it in a query of the view can then
/// be applied below the window, which prunes the table's day partitions
/// (without it, every query of the view reads the whole table).
pub fn view_query(project: &str, dataset: &str, spec: &TableSpec) -> String {
    format!(
        "SELECT * EXCEPT (_copy) FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY {day}, {KAFKA_TOPIC}, \
         {KAFKA_PARTITION}, {KAFKA_OFFSET} ORDER BY {WRITTEN_AT}) AS _copy FROM `{project}.{dataset}.{table}`) \
         WHERE _copy = 1",
        day = spec.partition_by,
        table = spec.table
    )
}

/// The view over `candles` with the newest version of each candle.
pub const LATEST_CANDLES: &str = "candles_latest";

/// The query of [`LATEST_CANDLES`]: per (venue, symbol, interval, origin, open
/// time) the last record in Kafka order, since a candle is published again
/// when it closes or a late trade corrects it, and the newer version replaces
/// the older downstream. A candle's versions share a Kafka key, hence a
/// partition, whose offsets order them; copies of one record are alike. (The
/// event time is no part of the window: a kline from the WebSocket carries
/// the time of its message, one from REST its close time. So a filter on
/// `event_time` does not prune partitions here; `open_time` is what candles
/// are looked up by.)
pub fn latest_candles_query(project: &str, dataset: &str, spec: &TableSpec) -> String {
    format!(
        "SELECT * EXCEPT (_version) FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY venue, symbol, `interval`, \
         origin, open_time ORDER BY {KAFKA_OFFSET} DESC, {WRITTEN_AT}) AS _version FROM `{project}.{dataset}.{table}`) \
         WHERE _version = 1",
        table = spec.table
    )
}

/// The view over `dead_letters` with one row per refusal.
pub const DISTINCT_LETTERS: &str = "dead_letters_distinct";

/// The query of [`DISTINCT_LETTERS`]: one letter per component and refused
/// record (its topic, partition and offset), as a service that crashed after
/// publishing its letters publishes them again; a letter without coordinates
/// (a producer's parse reject) is identified by its own Kafka coordinates.
/// The first written is kept. (No day in the window: a copy is stamped when it
/// was published again, so the event time does not prune partitions here.)
pub fn distinct_letters_query(project: &str, dataset: &str, spec: &TableSpec) -> String {
    format!(
        "SELECT * EXCEPT (_copy) FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY component, \
         IFNULL(topic, {KAFKA_TOPIC}), IFNULL(`partition`, {KAFKA_PARTITION}), IFNULL(`offset`, {KAFKA_OFFSET}) \
         ORDER BY {WRITTEN_AT}, {KAFKA_OFFSET}) AS _copy FROM `{project}.{dataset}.{table}`) WHERE _copy = 1",
        table = spec.table
    )
}

/// Compares a table's columns with the ones wanted. `Ok(None)`: nothing to
/// do. `Ok(Some(fields))`: the columns to patch the table to (missing ones
/// added, as `NULLABLE`, because BigQuery adds no `REQUIRED` column to a table
/// with rows; `REQUIRED` relaxed where the data may now be null). `Err`: a
/// change BigQuery cannot apply in place, named.
pub fn evolve(table: &str, existing: &[Field], wanted: &[Field]) -> Result<Option<Vec<Field>>, String> {
    let mut merged: Vec<Field> = Vec::with_capacity(existing.len().max(wanted.len()));
    let mut changed = false;
    for e in existing {
        let Some(w) = wanted.iter().find(|w| w.name.eq_ignore_ascii_case(&e.name)) else {
            if e.mode() == "REQUIRED" {
                return Err(format!(
                    "table {table} has a REQUIRED column {} that the records do not have; make it NULLABLE or use \
                     another dataset",
                    e.name
                ));
            }
            merged.push(e.clone());
            continue;
        };
        if e.kind() != w.kind() {
            return Err(format!(
                "table {table} column {} is {} but the records need {}; BigQuery cannot change a column's type in \
                 place: migrate the table or use another dataset",
                e.name,
                e.kind(),
                w.kind()
            ));
        }
        if (e.mode() == "REPEATED") != (w.mode() == "REPEATED") {
            return Err(format!(
                "table {table} column {} is {} but the records need {}; use another dataset",
                e.name,
                e.mode(),
                w.mode()
            ));
        }
        for (what, have, want) in [("precision", &e.precision, &w.precision), ("scale", &e.scale, &w.scale)] {
            if let (Some(have), Some(want)) = (have, want) {
                if have != want {
                    return Err(format!(
                        "table {table} column {} has {what} {have} but the records need {want}; use another dataset",
                        e.name
                    ));
                }
            }
        }
        let mut m = e.clone();
        if e.mode() == "REQUIRED" && w.mode() == "NULLABLE" {
            m.mode = Some("NULLABLE".into());
            changed = true;
        }
        if e.kind() == "RECORD" {
            if let Some(inner) = evolve(&format!("{table}.{}", e.name), &e.fields, &w.fields)? {
                m.fields = inner;
                changed = true;
            }
        }
        merged.push(m);
    }
    for w in wanted {
        if !existing.iter().any(|e| e.name.eq_ignore_ascii_case(&w.name)) {
            let mut added = w.clone();
            if added.mode() == "REQUIRED" {
                added.mode = Some("NULLABLE".into());
            }
            merged.push(added);
            changed = true;
        }
    }
    Ok(changed.then_some(merged))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(fields: &[Field]) -> Vec<&str> {
        fields.iter().map(|f| f.name.as_str()).collect()
    }

    #[test]
    fn every_entity_gets_its_avro_fields_then_the_kafka_coordinates() {
        for topic in Topic::ALL {
            let spec = table_spec(topic, DecimalColumns::BigNumeric);
            let avro: Vec<String> = match &topic.schema().schema {
                Schema::Record(r) => r.fields.iter().map(|f| f.name.clone()).collect(),
                _ => panic!("{topic:?} is not a record"),
            };
            let n = avro.len();
            assert_eq!(
                names(&spec.fields[..n]),
                avro.iter().map(String::as_str).collect::<Vec<_>>()
            );
            assert_eq!(
                names(&spec.fields[n..]),
                [KAFKA_TOPIC, KAFKA_PARTITION, KAFKA_OFFSET, WRITTEN_AT]
            );
            assert!(spec
                .fields
                .iter()
                .any(|f| f.name == spec.partition_by && f.kind() == "TIMESTAMP"));
            for c in spec.cluster_by {
                assert!(
                    spec.fields.iter().any(|f| f.name == *c),
                    "{topic:?} clusters by missing {c}"
                );
            }
            assert_eq!(spec.table, format!("{}_raw", spec.view));
        }
    }

    #[test]
    fn avro_types_map_to_bigquery_types() {
        let trade = table_spec(Topic::Trades, DecimalColumns::BigNumeric);
        let get = |n: &str| trade.fields.iter().find(|f| f.name == n).cloned().expect(n);
        let price = get("price");
        assert_eq!((price.kind(), price.mode()), ("BIGNUMERIC", "REQUIRED"));
        assert_eq!(
            (price.precision.as_deref(), price.scale.as_deref()),
            (Some("38"), Some("18"))
        );
        assert_eq!(get("event_time").kind(), "TIMESTAMP");
        assert_eq!(
            (get("first_trade_id").kind(), get("first_trade_id").mode()),
            ("INTEGER", "NULLABLE")
        );
        assert_eq!(get("kind").kind(), "STRING");
        assert_eq!(get("buyer_is_maker").kind(), "BOOLEAN");

        let as_text = table_spec(Topic::Trades, DecimalColumns::String);
        let price = as_text
            .fields
            .iter()
            .find(|f| f.name == "price")
            .cloned()
            .expect("price");
        assert_eq!((price.kind(), price.precision.as_deref()), ("STRING", None));

        let asset = table_spec(Topic::Assets, DecimalColumns::BigNumeric);
        let tokens = asset.fields.iter().find(|f| f.name == "tokens").expect("tokens");
        assert_eq!((tokens.kind(), tokens.mode()), ("RECORD", "REPEATED"));
        assert_eq!(names(&tokens.fields), ["key", "value"]);
        assert_eq!(
            (tokens.fields[1].kind(), tokens.fields[1].mode()),
            ("STRING", "REPEATED")
        );
        let letter = table_spec(Topic::DeadLetters, DecimalColumns::BigNumeric);
        assert_eq!(letter.view, "dead_letters");
        assert!(letter.fields.iter().any(|f| f.name == "payload" && f.kind() == "BYTES"));
    }

    #[test]
    fn unset_members_are_left_out_of_the_json() {
        let json = serde_json::to_string(&Field::new("a", "STRING", "REQUIRED")).expect("json");
        assert_eq!(json, r#"{"name":"a","type":"STRING","mode":"REQUIRED"}"#);
    }

    /// `name:TYPE:MODE` of the patched columns, if any.
    fn check(existing: Vec<Field>, wanted: Vec<Field>) -> Result<Option<Vec<String>>, String> {
        evolve("t", &existing, &wanted).map(|o| {
            o.map(|fs| {
                fs.iter()
                    .map(|f| format!("{}:{}:{}", f.name, f.kind(), f.mode()))
                    .collect()
            })
        })
    }

    #[test]
    fn evolution_adds_nullable_columns_and_refuses_type_changes() {
        let a = || Field::new("a", "STRING", "REQUIRED");
        let b = || Field::new("b", "INTEGER", "NULLABLE");
        let c_req = || Field::new("c", "TIMESTAMP", "REQUIRED");
        // Same columns, legacy and standard type names alike.
        assert_eq!(
            check(vec![a(), b()], vec![a(), Field::new("b", "INT64", "NULLABLE")]),
            Ok(None)
        );
        // A new column is added, NULLABLE even when the records always have it.
        assert_eq!(
            check(vec![a()], vec![a(), c_req()]),
            Ok(Some(vec!["a:STRING:REQUIRED".into(), "c:TIMESTAMP:NULLABLE".into()]))
        );
        // A column the records no longer have is kept when it may be null...
        assert_eq!(check(vec![a(), b()], vec![a()]), Ok(None));
        // ...and refused when it is REQUIRED (every insert would fail).
        assert!(check(vec![a(), c_req()], vec![a()])
            .unwrap_err()
            .contains("REQUIRED column c"));
        // A type change is refused with both types named.
        let err = check(vec![a()], vec![Field::new("a", "INTEGER", "REQUIRED")]).unwrap_err();
        assert!(err.contains("column a is STRING but the records need INTEGER"), "{err}");
        // REQUIRED relaxed to NULLABLE.
        assert_eq!(
            check(vec![a()], vec![Field::new("a", "STRING", "NULLABLE")]),
            Ok(Some(vec!["a:STRING:NULLABLE".into()]))
        );
        // Repeated-ness cannot change.
        assert!(check(vec![a()], vec![Field::new("a", "STRING", "REPEATED")]).is_err());
    }

    #[test]
    fn evolution_reaches_into_records_and_checks_decimal_parameters() {
        let mut map = Field::new("tokens", "RECORD", "REPEATED");
        map.fields = vec![Field::new("key", "STRING", "REQUIRED")];
        let mut wanted = map.clone();
        wanted.fields.push(Field::new("value", "STRING", "REPEATED"));
        let patched = evolve("t", &[map], &[wanted]).expect("compatible").expect("changed");
        assert_eq!(names(&patched[0].fields), ["key", "value"]);

        let mut narrow = Field::new("p", "BIGNUMERIC", "REQUIRED");
        narrow.scale = Some("9".into());
        let mut wide = narrow.clone();
        wide.scale = Some("18".into());
        assert!(evolve("t", &[narrow], &[wide.clone()]).unwrap_err().contains("scale 9"));
        // A server that does not report parameters is not held against it.
        let mut plain = wide.clone();
        plain.scale = None;
        plain.precision = None;
        assert_eq!(evolve("t", &[plain], &[wide]), Ok(None));
    }

    #[test]
    fn the_view_keeps_one_row_per_kafka_coordinate() {
        let spec = table_spec(Topic::Trades, DecimalColumns::BigNumeric);
        let q = view_query("p", "d", &spec);
        assert!(
            q.contains("PARTITION BY event_time, kafka_topic, kafka_partition, kafka_offset"),
            "{q}"
        );
        assert!(q.contains("FROM `p.d.trades_raw`"), "{q}");
    }
}
