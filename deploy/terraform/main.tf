# The dataset, tables and views bigquery-sink writes, the same ones it creates
# when they are missing (consumers/src/bq/schema.rs; a test keeps the two
# equal). Each entity has an append-only table `<entity>_raw`, partitioned by
# event day and clustered by what it is looked up by, and a view `<entity>`
# with one row per Kafka record: query the views. `candles_latest` keeps the
# newest version of each candle.

locals {
  entities = {
    assets       = { cluster = ["id"] }
    rates        = { cluster = ["id"] }
    exchanges    = { cluster = ["exchange_id"] }
    markets      = { cluster = ["exchange_id", "base_symbol", "quote_symbol"] }
    prices       = { cluster = ["asset_id"] }
    trades       = { cluster = ["venue", "symbol"] }
    candles      = { cluster = ["venue", "symbol", "interval"] }
    dead_letters = { cluster = ["component", "stage"] }
  }
}

resource "google_bigquery_dataset" "tickpipe" {
  project     = var.project
  dataset_id  = var.dataset
  location    = var.location
  description = "Crypto market data written by tickpipe's bigquery-sink."
}

resource "google_bigquery_table" "raw" {
  for_each = local.entities

  project             = var.project
  dataset_id          = google_bigquery_dataset.tickpipe.dataset_id
  table_id            = "${each.key}_raw"
  description         = "Every ${each.key} record bigquery-sink wrote, possibly twice after a retry; query the view ${each.key} for one row per Kafka offset."
  schema              = file("${path.module}/schemas/${each.key}_raw.json")
  clustering          = each.value.cluster
  deletion_protection = var.deletion_protection

  time_partitioning {
    type  = "DAY"
    field = "event_time"
  }
}

resource "google_bigquery_table" "view" {
  for_each = local.entities

  project             = var.project
  dataset_id          = google_bigquery_dataset.tickpipe.dataset_id
  table_id            = each.key
  description         = "${each.key}: one row per Kafka record (de-duplicated ${each.key}_raw)."
  deletion_protection = false

  view {
    query          = "SELECT * EXCEPT (_copy) FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY event_time, kafka_topic, kafka_partition, kafka_offset ORDER BY written_at) AS _copy FROM `${var.project}.${var.dataset}.${each.key}_raw`) WHERE _copy = 1"
    use_legacy_sql = false
  }

  depends_on = [google_bigquery_table.raw]
}

# The newest version of each candle: a candle is published again when it
# closes or a late trade corrects it (schema.rs, latest_candles_query).
resource "google_bigquery_table" "candles_latest" {
  project             = var.project
  dataset_id          = google_bigquery_dataset.tickpipe.dataset_id
  table_id            = "candles_latest"
  description         = "candles: the newest version of each candle (the last in Kafka order for its venue, symbol, interval, origin and open time)."
  deletion_protection = false

  view {
    query          = "SELECT * EXCEPT (_version) FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY venue, symbol, `interval`, origin, open_time ORDER BY kafka_offset DESC, written_at) AS _version FROM `${var.project}.${var.dataset}.candles_raw`) WHERE _version = 1"
    use_legacy_sql = false
  }

  depends_on = [google_bigquery_table.raw]
}

# One letter per component and refused record: a service that crashed after
# publishing its letters publishes them again (schema.rs, distinct_letters_query).
resource "google_bigquery_table" "dead_letters_distinct" {
  project             = var.project
  dataset_id          = google_bigquery_dataset.tickpipe.dataset_id
  table_id            = "dead_letters_distinct"
  description         = "dead_letters: one letter per component and refused record (a service that crashed publishes its letters again)."
  deletion_protection = false

  view {
    query          = "SELECT * EXCEPT (_copy) FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY component, IFNULL(topic, kafka_topic), IFNULL(`partition`, kafka_partition), IFNULL(`offset`, kafka_offset) ORDER BY written_at, kafka_offset) AS _copy FROM `${var.project}.${var.dataset}.dead_letters_raw`) WHERE _copy = 1"
    use_legacy_sql = false
  }

  depends_on = [google_bigquery_table.raw]
}

output "dataset" {
  description = "The dataset id."
  value       = google_bigquery_dataset.tickpipe.dataset_id
}

output "views" {
  description = "The de-duplicated views, one per entity, and candles_latest."
  value       = concat([for v in google_bigquery_table.view : v.table_id], [google_bigquery_table.candles_latest.table_id])
}
