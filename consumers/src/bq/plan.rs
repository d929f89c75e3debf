//! Planning: a batch into insert requests of bounded size, and rejects. Pure.

use std::collections::{BTreeMap, HashMap};

use serde_json::json;
use tickpipe_schemas::Topic;

use super::rows::{row, Coordinates};
use super::schema::TableSpec;
use crate::decode::{Item, Reject};

/// Rows of one insert request: the batch index of each row and its JSON.
pub struct Chunk<'a> {
    pub table: &'a str,
    pub rows: Vec<(usize, Vec<u8>)>,
}

/// Largest request body (BigQuery's limit is 10 MB).
const MAX_REQUEST_BYTES: usize = 8 << 20;

/// Splits a batch into insert requests and rejects; pure.
pub fn plan<'a>(
    items: &[Item],
    specs: &'a HashMap<Topic, TableSpec>,
    request_rows: usize,
    now: i64,
) -> (Vec<Chunk<'a>>, Vec<(usize, Reject)>) {
    let mut by_table: BTreeMap<&'a str, Vec<(usize, Vec<u8>)>> = BTreeMap::new();
    let mut rejects = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let body = match &item.body {
            Ok(body) => body,
            Err(reject) => {
                rejects.push((i, reject.clone()));
                continue;
            }
        };
        let Some(spec) = specs.get(&body.topic()) else {
            rejects.push((
                i,
                Reject::write(item, format!("no table for {}", body.topic().base_name())),
            ));
            continue;
        };
        let at = Coordinates {
            topic: &item.topic,
            partition: item.partition,
            offset: item.offset,
        };
        match row(&body.values(), &spec.fields, at, now) {
            Ok(json) => {
                let insert_id = format!("{}:{}:{}", item.topic, item.partition, item.offset);
                let bytes = serde_json::to_vec(&json!({"insertId": insert_id, "json": json})).unwrap_or_default();
                by_table.entry(spec.table.as_str()).or_default().push((i, bytes));
            }
            Err(e) => rejects.push((i, Reject::write(item, e))),
        }
    }
    let mut chunks = Vec::new();
    for (table, rows) in by_table {
        let mut current = Chunk {
            table,
            rows: Vec::new(),
        };
        let mut size = 0;
        for (i, bytes) in rows {
            if !current.rows.is_empty()
                && (current.rows.len() >= request_rows.max(1) || size + bytes.len() > MAX_REQUEST_BYTES)
            {
                chunks.push(std::mem::replace(
                    &mut current,
                    Chunk {
                        table,
                        rows: Vec::new(),
                    },
                ));
                size = 0;
            }
            size += bytes.len() + 1;
            current.rows.push((i, bytes));
        }
        if !current.rows.is_empty() {
            chunks.push(current);
        }
    }
    (chunks, rejects)
}

#[cfg(test)]
mod tests {
    use super::super::schema::{table_spec, DecimalColumns};
    use super::*;
    use tickpipe_schemas::{AnyRecord, Stage};
    use tickpipe_schemas::{Decimal, Price, Source};

    fn item(offset: i64, body: Result<AnyRecord, Reject>) -> Item {
        Item {
            topic: "prices".into(),
            partition: 0,
            offset,
            key: None,
            payload: vec![1, 2, 3],
            body,
        }
    }

    fn price(offset: i64) -> Item {
        item(
            offset,
            Ok(AnyRecord::Price(Price {
                asset_id: "bitcoin".into(),
                price_usd: Decimal::from(offset),
                source: Source::Coincap,
                event_time: 1_700_000_000_000_000,
                ingest_time: 1_700_000_000_000_000,
            })),
        )
    }

    #[test]
    fn a_batch_is_planned_into_bounded_requests_and_rejects() {
        let specs: HashMap<Topic, TableSpec> =
            [(Topic::Prices, table_spec(Topic::Prices, DecimalColumns::String))].into();
        let mut items: Vec<Item> = (0..7).map(price).collect();
        items.insert(
            3,
            item(
                100,
                Err(Reject {
                    stage: Stage::Decode,
                    error: "garbage".into(),
                    source: Source::Unknown,
                }),
            ),
        );
        let (chunks, rejects) = plan(&items, &specs, 3, 0);
        assert_eq!(chunks.iter().map(|c| c.rows.len()).collect::<Vec<_>>(), [3, 3, 1]);
        assert!(chunks.iter().all(|c| c.table == "prices_raw"));
        assert_eq!(rejects.len(), 1);
        assert_eq!(rejects[0].0, 3);
        // Rows keep their batch index, skipping the reject.
        let indexes: Vec<usize> = chunks.iter().flat_map(|c| c.rows.iter().map(|(i, _)| *i)).collect();
        assert_eq!(indexes, [0, 1, 2, 4, 5, 6, 7]);
        let first: serde_json::Value = serde_json::from_slice(&chunks[0].rows[0].1).expect("json");
        assert_eq!(first["insertId"], "prices:0:0");
        assert_eq!(first["json"]["price_usd"], "0");
    }

    #[test]
    fn a_record_without_a_table_is_a_write_reject() {
        let specs = HashMap::new();
        let (chunks, rejects) = plan(&[price(1)], &specs, 500, 0);
        assert!(chunks.is_empty());
        assert_eq!(
            (rejects[0].1.stage.as_str(), rejects[0].1.error.as_str()),
            ("write", "no table for prices")
        );
    }
}
