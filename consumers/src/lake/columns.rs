//! Records as Arrow columns and Parquet bytes. Pure: no I/O.
//!
//! Every field of the entity's Avro schema is a column, in schema order:
//! strings and enum symbols as UTF-8, `int` and `long` as 32- and 64-bit
//! integers, `timestamp-micros` as timestamps in microseconds with time zone
//! UTC, decimals as Parquet decimals of the schema's precision and scale
//! (exact: the unscaled integer, never a float), bytes as binary, nullable
//! unions as nullable columns, arrays as lists and maps as maps. Then the
//! Kafka coordinates: `kafka_topic`, `kafka_partition`, `kafka_offset`. No
//! column holds the time of writing, so a file's bytes depend only on the
//! records it holds.

use std::sync::Arc;

use apache_avro::schema::Schema as Avro;
use arrow_array::{
    ArrayRef, BinaryArray, BooleanArray, Decimal128Array, Int32Array, Int64Array, ListArray, MapArray, RecordBatch,
    StringArray, StructArray, TimestampMicrosecondArray,
};
use arrow_buffer::{NullBuffer, OffsetBuffer};
use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use tickpipe_schemas::decimal::{to_unscaled, SCALE};
use tickpipe_schemas::field::Value;
use tickpipe_schemas::{AnyRecord, Topic};

/// The Kafka coordinates every row carries; with them a row is one offset.
pub const KAFKA_TOPIC: &str = "kafka_topic";
pub const KAFKA_PARTITION: &str = "kafka_partition";
pub const KAFKA_OFFSET: &str = "kafka_offset";

/// The zstd level of the files: 3, zstd's default, about as fast as snappy
/// and a third smaller on market data.
const ZSTD_LEVEL: i32 = 3;

/// The columns of an entity's files.
pub fn arrow_schema(topic: Topic) -> SchemaRef {
    let Avro::Record(record) = &topic.schema().schema else {
        return Arc::new(Schema::empty());
    };
    let mut fields: Vec<Field> = record.fields.iter().map(|f| column(&f.name, &f.schema)).collect();
    fields.push(Field::new(KAFKA_TOPIC, DataType::Utf8, false));
    fields.push(Field::new(KAFKA_PARTITION, DataType::Int32, false));
    fields.push(Field::new(KAFKA_OFFSET, DataType::Int64, false));
    Arc::new(Schema::new(fields))
}

fn column(name: &str, schema: &Avro) -> Field {
    match schema {
        Avro::Union(u) if u.is_nullable() => u
            .variants()
            .iter()
            .find(|s| !matches!(s, Avro::Null))
            .map_or_else(|| Field::new(name, DataType::Utf8, true), |s| column(name, s))
            .with_nullable(true),
        Avro::Array(a) => Field::new(name, DataType::List(Arc::new(column("item", &a.items))), false),
        Avro::Map(m) => {
            let entries = Fields::from(vec![
                Field::new("key", DataType::Utf8, false),
                column("value", &m.types),
            ]);
            let entries = Field::new("entries", DataType::Struct(entries), false);
            Field::new(name, DataType::Map(Arc::new(entries), false), false)
        }
        Avro::Decimal(d) => Field::new(name, DataType::Decimal128(d.precision as u8, d.scale as i8), false),
        Avro::TimestampMicros => Field::new(
            name,
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Avro::Int => Field::new(name, DataType::Int32, false),
        Avro::Long => Field::new(name, DataType::Int64, false),
        Avro::Boolean => Field::new(name, DataType::Boolean, false),
        Avro::Bytes | Avro::Fixed(_) => Field::new(name, DataType::Binary, false),
        // Strings, enums (their symbol) and anything else as text.
        _ => Field::new(name, DataType::Utf8, false),
    }
}

/// Whether every value of a record fits its column: a decimal must have at
/// most 38 digits at scale 18. A record that does not is dead-lettered
/// before it is buffered, so that a file is never refused for one row.
pub fn fits(record: &AnyRecord) -> Result<(), String> {
    fn value(name: &str, v: &Value<'_>) -> Result<(), String> {
        match v {
            Value::Decimal(d) => to_unscaled(d).map(drop).map_err(|e| format!("{name}: {e}")),
            Value::Array(items) => items.iter().try_for_each(|v| value(name, v)),
            Value::Map(entries) => entries.iter().try_for_each(|(_, v)| value(name, v)),
            _ => Ok(()),
        }
    }
    record.values().iter().try_for_each(|(name, v)| value(name, v))
}

/// One Kafka record of a file.
#[derive(Debug, Clone)]
pub struct Row {
    pub offset: i64,
    pub record: AnyRecord,
}

/// The rows of one Kafka partition as a record batch of `schema`
/// ([`arrow_schema`]).
pub fn batch(schema: &SchemaRef, topic: &str, partition: i32, rows: &[Row]) -> Result<RecordBatch, String> {
    let values: Vec<Vec<(&'static str, Value<'_>)>> = rows.iter().map(|r| r.record.values()).collect();
    let record_columns = schema.fields().len().saturating_sub(3);
    let mut arrays: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for (i, field) in schema.fields().iter().take(record_columns).enumerate() {
        let column: Vec<&Value<'_>> = values
            .iter()
            .map(|row| match row.get(i) {
                Some((name, v)) if name == field.name() => Ok(v),
                _ => row
                    .iter()
                    .find(|(name, _)| name == field.name())
                    .map(|(_, v)| v)
                    .ok_or_else(|| format!("a record has no field {}", field.name())),
            })
            .collect::<Result<_, _>>()?;
        arrays.push(array(field, &column)?);
    }
    arrays.push(Arc::new(StringArray::from(vec![topic; rows.len()])));
    arrays.push(Arc::new(Int32Array::from(vec![partition; rows.len()])));
    arrays.push(Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.offset))));
    RecordBatch::try_new(schema.clone(), arrays).map_err(|e| e.to_string())
}

/// One column's values as an array of the field's type.
fn array(field: &Field, values: &[&Value<'_>]) -> Result<ArrayRef, String> {
    let wrong = |v: &Value<'_>| format!("{}: {v:?} in a {} column", field.name(), field.data_type());
    let array: ArrayRef = match field.data_type() {
        DataType::Utf8 => Arc::new(
            values
                .iter()
                .map(|v| match v {
                    Value::Null => Ok(None),
                    Value::String(s) => Ok(Some(*s)),
                    Value::Enum(s) => Ok(Some(*s)),
                    v => Err(wrong(v)),
                })
                .collect::<Result<StringArray, _>>()?,
        ),
        DataType::Int32 => Arc::new(
            values
                .iter()
                .map(|v| match v {
                    Value::Null => Ok(None),
                    Value::Int(i) => Ok(Some(*i)),
                    v => Err(wrong(v)),
                })
                .collect::<Result<Int32Array, _>>()?,
        ),
        DataType::Int64 | DataType::Timestamp(TimeUnit::Microsecond, _) => {
            let longs = values
                .iter()
                .map(|v| match v {
                    Value::Null => Ok(None),
                    Value::Long(l) => Ok(Some(*l)),
                    v => Err(wrong(v)),
                })
                .collect::<Result<Vec<Option<i64>>, _>>()?;
            match field.data_type() {
                DataType::Timestamp(_, tz) => {
                    Arc::new(TimestampMicrosecondArray::from(longs).with_timezone_opt(tz.clone()))
                }
                _ => Arc::new(Int64Array::from(longs)),
            }
        }
        DataType::Boolean => Arc::new(
            values
                .iter()
                .map(|v| match v {
                    Value::Null => Ok(None),
                    Value::Boolean(b) => Ok(Some(*b)),
                    v => Err(wrong(v)),
                })
                .collect::<Result<BooleanArray, _>>()?,
        ),
        DataType::Binary => {
            let bytes = values
                .iter()
                .map(|v| match v {
                    Value::Null => Ok(None),
                    Value::Bytes(b) => Ok(Some(*b)),
                    v => Err(wrong(v)),
                })
                .collect::<Result<Vec<Option<&[u8]>>, _>>()?;
            Arc::new(BinaryArray::from(bytes))
        }
        DataType::Decimal128(precision, scale) => {
            if *scale as u32 != SCALE {
                return Err(format!("{}: decimals of scale {scale} are not supported", field.name()));
            }
            let unscaled = values
                .iter()
                .map(|v| match v {
                    Value::Null => Ok(None),
                    Value::Decimal(d) => to_unscaled(d).map(Some).map_err(|e| format!("{}: {e}", field.name())),
                    v => Err(wrong(v)),
                })
                .collect::<Result<Decimal128Array, _>>()?;
            Arc::new(
                unscaled
                    .with_precision_and_scale(*precision, *scale)
                    .map_err(|e| e.to_string())?,
            )
        }
        DataType::List(item) => {
            let mut offsets = Vec::with_capacity(values.len() + 1);
            offsets.push(0i32);
            let mut children: Vec<&Value<'_>> = Vec::new();
            let mut valid = Vec::with_capacity(values.len());
            for v in values {
                match v {
                    Value::Array(items) => children.extend(items.iter()),
                    Value::Null => {}
                    v => return Err(wrong(v)),
                }
                valid.push(!matches!(v, Value::Null));
                offsets.push(offset(children.len())?);
            }
            let child = array(item, &children)?;
            Arc::new(
                ListArray::try_new(item.clone(), OffsetBuffer::new(offsets.into()), child, nulls(valid))
                    .map_err(|e| e.to_string())?,
            )
        }
        DataType::Map(entries, sorted) => {
            let DataType::Struct(kv) = entries.data_type() else {
                return Err(format!("{}: a map without entries", field.name()));
            };
            let [_, value_field] = &kv.iter().collect::<Vec<_>>()[..] else {
                return Err(format!("{}: a map's entries are a key and a value", field.name()));
            };
            let mut offsets = Vec::with_capacity(values.len() + 1);
            offsets.push(0i32);
            let mut keys: Vec<&str> = Vec::new();
            let mut items: Vec<&Value<'_>> = Vec::new();
            let mut valid = Vec::with_capacity(values.len());
            for v in values {
                match v {
                    Value::Map(m) => {
                        for (k, item) in m {
                            keys.push(k);
                            items.push(item);
                        }
                    }
                    Value::Null => {}
                    v => return Err(wrong(v)),
                }
                valid.push(!matches!(v, Value::Null));
                offsets.push(offset(keys.len())?);
            }
            let entries_array = StructArray::try_new(
                kv.clone(),
                vec![Arc::new(StringArray::from(keys)), array(value_field, &items)?],
                None,
            )
            .map_err(|e| e.to_string())?;
            Arc::new(
                MapArray::try_new(
                    entries.clone(),
                    OffsetBuffer::new(offsets.into()),
                    entries_array,
                    nulls(valid),
                    *sorted,
                )
                .map_err(|e| e.to_string())?,
            )
        }
        other => return Err(format!("{}: no column type {other}", field.name())),
    };
    Ok(array)
}

fn offset(n: usize) -> Result<i32, String> {
    i32::try_from(n).map_err(|_| format!("{n} items are too many for one file"))
}

fn nulls(valid: Vec<bool>) -> Option<NullBuffer> {
    valid.iter().any(|v| !v).then(|| NullBuffer::from(valid))
}

/// A record batch as the bytes of a Parquet file: zstd, with statistics per
/// page and row group (so that readers skip what a filter excludes), and the
/// Arrow schema in its metadata (time zones and decimals read back exactly).
pub fn parquet(batch: &RecordBatch) -> Result<Vec<u8>, String> {
    let level = ZstdLevel::try_new(ZSTD_LEVEL).map_err(|e| e.to_string())?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(level))
        .set_statistics_enabled(EnabledStatistics::Page)
        .build();
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, batch.schema(), Some(props)).map_err(|e| e.to_string())?;
    writer.write(batch).map_err(|e| e.to_string())?;
    writer.close().map_err(|e| e.to_string())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use arrow_array::cast::AsArray;
    use arrow_array::types::{Decimal128Type, Int32Type, Int64Type, TimestampMicrosecondType};
    use arrow_array::Array;
    use bytes::Bytes;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use proptest::strategy::Strategy;
    use tickpipe_schemas::{Asset, Decimal, Source, Trade, TradeKind};

    use super::*;

    fn read_back(file: Vec<u8>) -> RecordBatch {
        let reader = ParquetRecordBatchReaderBuilder::try_new(Bytes::from(file))
            .expect("a parquet file")
            .build()
            .expect("a reader");
        let mut batches: Vec<RecordBatch> = reader.collect::<Result<_, _>>().expect("batches");
        assert_eq!(batches.len(), 1, "one row group of a small file");
        batches.remove(0)
    }

    fn trade(id: i64, price: &str) -> AnyRecord {
        AnyRecord::Trade(Trade {
            venue: "binance".into(),
            symbol: "BTCUSDT".into(),
            kind: TradeKind::AggTrade,
            trade_id: id,
            price: Decimal::from_str_exact(price).expect("decimal"),
            quantity: Decimal::from_str_exact("0.000000000000000001").expect("decimal"),
            buyer_is_maker: id % 2 == 0,
            first_trade_id: (id % 2 == 0).then_some(id * 10),
            last_trade_id: None,
            source: Source::Binance,
            event_time: 1_709_337_599_999_999 + id,
            ingest_time: 1_709_337_600_000_000,
        })
    }

    #[test]
    fn trades_read_back_exactly_with_nulls_times_and_coordinates() {
        let schema = arrow_schema(Topic::Trades);
        let rows = vec![
            Row {
                offset: 7,
                record: trade(1, "97000.000000000000000001"),
            },
            Row {
                offset: 9,
                record: trade(2, "12345678901.123456789012345678"),
            },
        ];
        let file = parquet(&batch(&schema, "dev.trades", 4, &rows).expect("batch")).expect("parquet");
        let back = read_back(file);
        assert_eq!(back.num_rows(), 2);
        assert_eq!(back.schema().fields(), schema.fields(), "the Arrow schema is kept");

        let price = back
            .column_by_name("price")
            .expect("price")
            .as_primitive::<Decimal128Type>();
        assert_eq!(price.value_as_string(0), "97000.000000000000000001");
        assert_eq!(price.value_as_string(1), "12345678901.123456789012345678");
        let quantity = back
            .column_by_name("quantity")
            .expect("quantity")
            .as_primitive::<Decimal128Type>();
        assert_eq!(quantity.value(0), 1, "one unit at scale 18");

        let first = back
            .column_by_name("first_trade_id")
            .expect("column")
            .as_primitive::<Int64Type>();
        assert!(first.is_null(0));
        assert_eq!(first.value(1), 20);
        assert_eq!(back.column_by_name("last_trade_id").expect("column").null_count(), 2);

        let time = back
            .column_by_name("event_time")
            .expect("column")
            .as_primitive::<TimestampMicrosecondType>();
        assert_eq!(time.value(0), 1_709_337_600_000_000);
        assert!(
            matches!(time.data_type(), DataType::Timestamp(TimeUnit::Microsecond, Some(tz)) if tz.as_ref() == "UTC")
        );

        let kind = back.column_by_name("kind").expect("column").as_string::<i32>();
        assert_eq!(kind.value(0), "agg_trade");
        let topic = back.column_by_name(KAFKA_TOPIC).expect("column").as_string::<i32>();
        assert_eq!(topic.value(1), "dev.trades");
        let partition = back
            .column_by_name(KAFKA_PARTITION)
            .expect("column")
            .as_primitive::<Int32Type>();
        assert_eq!(partition.value(0), 4);
        let offset = back
            .column_by_name(KAFKA_OFFSET)
            .expect("column")
            .as_primitive::<Int64Type>();
        assert_eq!((offset.value(0), offset.value(1)), (7, 9));
    }

    #[test]
    fn an_asset_keeps_its_token_map() {
        let tokens = BTreeMap::from([
            ("ethereum".to_owned(), vec!["0xa0b8".to_owned()]),
            ("tron".to_owned(), vec!["T1".to_owned(), "T2".to_owned()]),
        ]);
        let asset = |tokens: BTreeMap<String, Vec<String>>| {
            AnyRecord::Asset(Box::new(Asset {
                id: "usd-coin".into(),
                rank: 7,
                symbol: "USDC".into(),
                name: "USDC".into(),
                supply: Decimal::ONE,
                max_supply: None,
                market_cap_usd: Some(Decimal::TEN),
                volume_usd_24h: None,
                price_usd: Decimal::ONE,
                change_percent_24h: None,
                vwap_24h: None,
                explorer: Some("https://etherscan.io".into()),
                tokens,
                source: Source::Coincap,
                event_time: 0,
                ingest_time: 0,
            }))
        };
        let rows = vec![
            Row {
                offset: 0,
                record: asset(tokens),
            },
            Row {
                offset: 1,
                record: asset(BTreeMap::new()),
            },
        ];
        let schema = arrow_schema(Topic::Assets);
        let back = read_back(parquet(&batch(&schema, "assets", 0, &rows).expect("batch")).expect("parquet"));
        let map = back.column_by_name("tokens").expect("tokens").as_map();
        assert_eq!(map.value_length(0), 2);
        assert_eq!(map.value_length(1), 0);
        let keys = map.keys().as_string::<i32>();
        assert_eq!((keys.value(0), keys.value(1)), ("ethereum", "tron"));
        let lists = map.values().as_list::<i32>();
        assert_eq!(lists.value_length(1), 2);
        let market_cap = back
            .column_by_name("market_cap_usd")
            .expect("column")
            .as_primitive::<Decimal128Type>();
        assert_eq!(market_cap.value_as_string(0), "10.000000000000000000");
        assert!(back.column_by_name("max_supply").expect("column").is_null(0));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

        /// Any record of any entity at the edges of its schema either does
        /// not fit (and becomes a dead letter) or becomes a file that reads
        /// back as one row.
        #[test]
        fn any_record_that_fits_reads_back_from_its_file(
            (topic, body) in (0..Topic::ALL.len()).prop_flat_map(|i| {
                (proptest::strategy::Just(Topic::ALL[i]), tickpipe_testkit::hostile::any_body(Topic::ALL[i]))
            })
        ) {
            let codec = tickpipe_schemas::Codec::new(tickpipe_schemas::WriteFraming::SingleObject);
            let payload = tickpipe_testkit::hostile::single_object(topic, &body);
            let Ok(record) = topic.decode(&codec, &payload) else { return Ok(()) };
            if fits(&record).is_err() {
                return Ok(());
            }
            let rows = vec![Row { offset: 3, record }];
            let file = parquet(&batch(&arrow_schema(topic), "t", 1, &rows).expect("a batch"))
                .expect("a Parquet file");
            let back = read_back(file);
            proptest::prop_assert_eq!(back.num_rows(), 1);
            let offset = back.column_by_name(KAFKA_OFFSET).expect("column").as_primitive::<Int64Type>();
            proptest::prop_assert_eq!(offset.value(0), 3);
        }
    }

    #[test]
    fn every_entity_has_columns_and_a_decimal_too_large_does_not_fit() {
        for topic in Topic::ALL {
            let schema = arrow_schema(topic);
            assert!(schema.fields().len() > 3, "{topic:?}");
            assert!(schema.field_with_name("event_time").is_ok(), "{topic:?}");
        }
        assert!(fits(&trade(1, "1.5")).is_ok());
        let huge = Decimal::MAX;
        let mut record = trade(1, "1");
        if let AnyRecord::Trade(t) = &mut record {
            t.price = huge;
        }
        assert!(fits(&record).is_err_and(|e| e.starts_with("price")));
    }
}
