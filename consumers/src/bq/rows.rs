//! Records to BigQuery rows: each field's value formatted for its column, as
//! `tabledata.insertAll` takes it, plus the Kafka coordinates. Pure: no I/O.

use base64::Engine;
use serde_json::{Map, Value as Json};
use tickpipe_schemas::field::Value;
use tickpipe_schemas::Micros;

use super::schema::{Field, KAFKA_OFFSET, KAFKA_PARTITION, KAFKA_TOPIC, WRITTEN_AT};

/// Where a record was read, which is its identity in the table.
#[derive(Debug, Clone, Copy)]
pub struct Coordinates<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// One row: the record's fields by the table's columns, then the coordinates.
/// Null values are left out (BigQuery reads a missing column as null).
pub fn row(
    values: &[(&'static str, Value<'_>)],
    columns: &[Field],
    at: Coordinates<'_>,
    written_at: Micros,
) -> Result<Map<String, Json>, String> {
    let mut row = Map::with_capacity(values.len() + 4);
    for (name, value) in values {
        let column = columns
            .iter()
            .find(|c| c.name == *name)
            .ok_or_else(|| format!("the table has no column {name}"))?;
        if let Some(json) = cell(value, column).map_err(|e| format!("{name}: {e}"))? {
            row.insert((*name).to_owned(), json);
        }
    }
    row.insert(KAFKA_TOPIC.into(), Json::from(at.topic));
    row.insert(KAFKA_PARTITION.into(), Json::from(at.partition));
    row.insert(KAFKA_OFFSET.into(), Json::from(at.offset));
    row.insert(WRITTEN_AT.into(), Json::from(timestamp(written_at)?));
    Ok(row)
}

/// A value in the form its column takes; `None` for null.
fn cell(value: &Value<'_>, column: &Field) -> Result<Option<Json>, String> {
    let kind = column.kind();
    Ok(Some(match value {
        Value::Null => return Ok(None),
        Value::Boolean(b) => Json::from(*b),
        Value::Int(i) => Json::from(*i),
        Value::Long(l) if kind == "TIMESTAMP" => Json::from(timestamp(*l)?),
        Value::Long(l) => Json::from(*l),
        Value::String(s) => Json::from(*s),
        Value::Enum(s) => Json::from(*s),
        // Decimals as exact text without trailing zeros, for BIGNUMERIC and
        // STRING columns alike.
        Value::Decimal(d) => Json::from(d.normalize().to_string()),
        Value::Bytes(b) => Json::from(base64::engine::general_purpose::STANDARD.encode(b)),
        Value::Array(items) => Json::Array(
            items
                .iter()
                .map(|v| cell(v, column).map(|c| c.unwrap_or(Json::Null)))
                .collect::<Result<_, _>>()?,
        ),
        Value::Map(entries) => {
            let value_column = column
                .fields
                .iter()
                .find(|f| f.name == "value")
                .ok_or_else(|| format!("column {} has no value field for a map", column.name))?;
            let mut out = Vec::with_capacity(entries.len());
            for (k, v) in entries {
                let mut entry = Map::new();
                entry.insert("key".into(), Json::from(*k));
                if let Some(v) = cell(v, value_column)? {
                    entry.insert("value".into(), v);
                }
                out.push(Json::Object(entry));
            }
            Json::Array(out)
        }
    }))
}

/// RFC 3339 in UTC with microseconds, which BigQuery reads exactly.
pub fn timestamp(micros: Micros) -> Result<String, String> {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .ok_or_else(|| format!("timestamp {micros} µs is out of range"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tickpipe_schemas::{Asset, Decimal, Record, Source, Topic, Trade, TradeKind};

    use super::*;
    use crate::bq::schema::{table_spec, DecimalColumns};

    fn at() -> Coordinates<'static> {
        Coordinates {
            topic: "trades",
            partition: 2,
            offset: 41,
        }
    }

    #[test]
    fn a_trade_becomes_a_row_with_exact_decimals_and_coordinates() {
        let trade = Trade {
            venue: "binance".into(),
            symbol: "BTCUSDT".into(),
            kind: TradeKind::Trade,
            trade_id: 17,
            price: Decimal::from_str_exact("97000.000000000000000001").expect("decimal"),
            quantity: Decimal::from_str_exact("0.00012").expect("decimal"),
            buyer_is_maker: true,
            first_trade_id: None,
            last_trade_id: None,
            source: Source::Binance,
            event_time: 1_704_067_200_123_456,
            ingest_time: 1_704_067_200_200_000,
        };
        let spec = table_spec(Topic::Trades, DecimalColumns::BigNumeric);
        let row = row(&trade.values(), &spec.fields, at(), 1_704_067_201_000_000).expect("row");
        let json = serde_json::to_value(&row).expect("json");
        assert_eq!(json["price"], "97000.000000000000000001");
        assert_eq!(json["quantity"], "0.00012");
        assert_eq!(json["kind"], "trade");
        assert_eq!(json["source"], "binance");
        assert_eq!(json["trade_id"], 17);
        assert_eq!(json["event_time"], "2024-01-01T00:00:00.123456Z");
        assert_eq!(json["written_at"], "2024-01-01T00:00:01.000000Z");
        assert_eq!(json["buyer_is_maker"], true);
        assert!(json.get("first_trade_id").is_none(), "nulls are left out");
        assert_eq!(
            (&json["kafka_topic"], &json["kafka_partition"], &json["kafka_offset"]),
            (&Json::from("trades"), &Json::from(2), &Json::from(41))
        );
        // Every column the row fills exists in the table.
        for k in row.keys() {
            assert!(spec.fields.iter().any(|f| &f.name == k), "{k}");
        }
    }

    #[test]
    fn maps_become_repeated_key_value_records() {
        let mut tokens = BTreeMap::new();
        tokens.insert("ethereum".to_owned(), vec!["0xabc".to_owned(), "0xdef".to_owned()]);
        tokens.insert("solana".to_owned(), Vec::new());
        let asset = Asset {
            id: "bitcoin".into(),
            rank: 1,
            symbol: "BTC".into(),
            name: "Bitcoin".into(),
            supply: Decimal::from(19_000_000),
            max_supply: None,
            market_cap_usd: None,
            volume_usd_24h: None,
            price_usd: Decimal::from(97_000),
            change_percent_24h: None,
            vwap_24h: None,
            explorer: None,
            tokens,
            source: Source::Coincap,
            event_time: 0,
            ingest_time: 0,
        };
        let spec = table_spec(Topic::Assets, DecimalColumns::String);
        let row = row(&asset.values(), &spec.fields, at(), 0).expect("row");
        assert_eq!(
            serde_json::to_value(&row["tokens"]).expect("json"),
            serde_json::json!([
                {"key": "ethereum", "value": ["0xabc", "0xdef"]},
                {"key": "solana", "value": []}
            ])
        );
        assert_eq!(row["event_time"], "1970-01-01T00:00:00.000000Z");
    }

    #[test]
    fn bytes_are_base64_and_impossible_times_are_errors() {
        let column = Field {
            name: "payload".into(),
            kind: "BYTES".into(),
            mode: None,
            precision: None,
            scale: None,
            fields: Vec::new(),
            description: None,
        };
        assert_eq!(cell(&Value::Bytes(&[0, 1, 2]), &column), Ok(Some(Json::from("AAEC"))));
        assert!(timestamp(i64::MAX).is_err());
        assert_eq!(timestamp(-1).as_deref(), Ok("1969-12-31T23:59:59.999999Z"));
    }
}
