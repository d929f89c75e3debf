//! Provisioning: the dataset, a table per entity (derived from its Avro
//! schema, partitioned by event day) and the views that keep one row per
//! Kafka record; columns the records gained are added.

use std::collections::HashMap;

use serde_json::json;
use tickpipe_schemas::Topic;

use super::client::{BigQuery, BqError, TableInfo};
use super::schema::{
    distinct_letters_query, evolve, latest_candles_query, table_spec, view_query, DecimalColumns, TableSpec,
    DISTINCT_LETTERS, LATEST_CANDLES,
};

/// Why the tables could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error(transparent)]
    BigQuery(#[from] BqError),
    #[error("{0}")]
    Schema(String),
}

impl TableError {
    /// Whether waiting may help (quota, 5xx, the network).
    pub fn is_retriable(&self) -> bool {
        matches!(self, TableError::BigQuery(e) if e.is_retriable())
    }
}

/// Creates the dataset, the tables and the views that are missing, and adds
/// columns the records gained; refuses a table it cannot write to.
pub async fn prepare_tables(
    bq: &BigQuery,
    dataset: &str,
    location: &str,
    topics: &[Topic],
    decimals: DecimalColumns,
) -> Result<HashMap<Topic, TableSpec>, TableError> {
    bq.ensure_dataset(dataset, location).await?;
    let mut specs = HashMap::new();
    for topic in topics {
        let spec = table_spec(*topic, decimals);
        let mut refresh_view = false;
        match bq.table(dataset, &spec.table).await? {
            None => {
                let resource = json!({
                    "tableReference": {"projectId": bq.project(), "datasetId": dataset, "tableId": spec.table},
                    "description": format!(
                        "Every {} record bigquery-sink wrote, possibly twice after a retry; query the view {} \
                         for one row per Kafka offset.",
                        topic.base_name(),
                        spec.view
                    ),
                    "schema": {"fields": spec.fields},
                    "timePartitioning": {"type": "DAY", "field": spec.partition_by},
                    "clustering": {"fields": spec.cluster_by},
                });
                bq.create_table(dataset, &resource).await?;
                tracing::info!(table = spec.table, "bigquery-sink: created");
            }
            Some(info) => {
                let existing = info.schema.map(|s| s.fields).unwrap_or_default();
                if let Some(fields) =
                    evolve(&format!("{dataset}.{}", spec.table), &existing, &spec.fields).map_err(TableError::Schema)?
                {
                    bq.patch_table(dataset, &spec.table, &json!({"schema": {"fields": fields}}))
                        .await?;
                    tracing::info!(table = spec.table, "bigquery-sink: added the records' new columns");
                    refresh_view = true;
                }
            }
        }
        let description = format!(
            "{}: one row per Kafka record (de-duplicated {}).",
            topic.base_name(),
            spec.table
        );
        let query = view_query(bq.project(), dataset, &spec);
        ensure_view(bq, dataset, &spec.view, &description, &query, refresh_view).await?;
        if *topic == Topic::Candles {
            let description = "candles: the newest version of each candle (the last in Kafka order for its venue, \
                               symbol, interval, origin and open time).";
            let query = latest_candles_query(bq.project(), dataset, &spec);
            ensure_view(bq, dataset, LATEST_CANDLES, description, &query, refresh_view).await?;
        }
        if *topic == Topic::DeadLetters {
            let description = "dead_letters: one letter per component and refused record (a service that crashed \
                               publishes its letters again).";
            let query = distinct_letters_query(bq.project(), dataset, &spec);
            ensure_view(bq, dataset, DISTINCT_LETTERS, description, &query, refresh_view).await?;
        }
        specs.insert(*topic, spec);
    }
    Ok(specs)
}

/// Creates the view `name` over `query`, or saves the query again when the
/// view holds another one (or `refresh`, after its table gained columns);
/// refuses a table of that name that is not a view.
async fn ensure_view(
    bq: &BigQuery,
    dataset: &str,
    name: &str,
    description: &str,
    query: &str,
    refresh: bool,
) -> Result<(), TableError> {
    let definition = json!({"query": query, "useLegacySql": false});
    match bq.table(dataset, name).await? {
        None => {
            let view = json!({
                "tableReference": {"projectId": bq.project(), "datasetId": dataset, "tableId": name},
                "description": description,
                "view": definition,
            });
            bq.create_table(dataset, &view).await?;
        }
        Some(info) if info.kind != "VIEW" => {
            return Err(TableError::Schema(format!(
                "{dataset}.{name} exists and is a {}, not the view this sink keeps there; rename it or use another \
                 dataset",
                info.kind
            )))
        }
        Some(info) if refresh || !saved_as(&info, query) => {
            bq.patch_table(dataset, name, &json!({"view": definition})).await?;
            tracing::info!(view = name, "bigquery-sink: view query saved");
        }
        Some(_) => {}
    }
    Ok(())
}

/// Whether a view may stay as it is. BigQuery reports a view's query, and a
/// view an older release created is saved again with the current one. The
/// emulator reports none: its views are left alone rather than written again
/// at every start. (Re-saving also makes BigQuery pick up a table's new
/// columns; that is decided apart.)
fn saved_as(view: &TableInfo, query: &str) -> bool {
    view.view.as_ref().is_none_or(|v| v.query == query)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_is_saved_again_when_it_holds_another_query() {
        let query = "SELECT 1";
        let view = |json: serde_json::Value| serde_json::from_value::<TableInfo>(json).expect("tables.get answer");
        // As BigQuery's tables.get answers for a view.
        let same = view(json!({"type": "VIEW", "view": {"query": "SELECT 1", "useLegacySql": false}}));
        let older = view(json!({"type": "VIEW", "view": {"query": "SELECT 0", "useLegacySql": false}}));
        // As the emulator answers: no definition, left alone.
        let unknown = view(json!({"type": "VIEW"}));
        assert!(saved_as(&same, query));
        assert!(!saved_as(&older, query));
        assert!(saved_as(&unknown, query));
    }
}
