//! Helpers shared by the consumers' integration tests: recorded trades,
//! counts from PostgreSQL and BigQuery, stored positions, and sink settings
//! that react fast.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::process::{Command, Stdio};
use std::time::Duration;

use tickpipe_consumers::bq::client::BigQuery;
use tickpipe_consumers::pg::sink::SinkConfig;
use tickpipe_consumers::sink::SinkSettings;
use tickpipe_kafka::ensure_topics;
use tickpipe_schemas::{Topic, Trade};
use tickpipe_testkit::{real, stack};
use tokio_postgres::Client;

/// The recorded trades of two symbols (so two partitions), or `None` (said
/// loudly) without the data.
pub fn recorded_trades() -> Option<Vec<Trade>> {
    let xrp = stack::real_data("binance_spot_xrpeth_2019-10-11")?;
    let trx = stack::real_data("binance_trxusdt_2025-03-04")?;
    let mut trades = real::agg_trades_csv(&xrp.join("XRPETH-aggTrades-2019-10-11_2019-10-13.csv"), "XRPETH");
    trades.extend(
        real::trade_stream_csv(&trx.join("spot_TRXUSDT_trade_stream_2025-03-04.csv"), "binance")
            .into_iter()
            .map(|(t, _)| t),
    );
    Some(trades)
}

/// A test's own part of the local stack: every topic (3 partitions) under a
/// fresh prefix named after the test, and a fresh database of the same name.
pub struct Fresh {
    pub brokers: String,
    pub prefix: String,
    pub url: String,
}

impl Fresh {
    /// Creates the topics and the database for the test `name`.
    pub async fn create(name: &str) -> Fresh {
        let brokers = stack::kafka_brokers();
        let prefix = format!("{}.", stack::unique_name(name));
        ensure_topics(&brokers, &prefix, &Topic::ALL, 3, 1)
            .await
            .unwrap_or_else(|e| panic!("is the broker up (make stack-up)? {e}"));
        let url = stack::fresh_database(name).await;
        Fresh { brokers, prefix, url }
    }
}

/// The command for the service binary `bin` on `brokers` under the topic
/// `prefix`, logging warnings, its stdout and stderr discarded.
pub fn quiet_service(bin: impl AsRef<OsStr>, brokers: &str, prefix: &str) -> Command {
    let mut cmd = Command::new(bin);
    cmd.env("TICKPIPE_KAFKA_BROKERS", brokers)
        .env("TICKPIPE_TOPIC_PREFIX", prefix)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// The count `sql` answers in PostgreSQL, 0 while it cannot (no table yet).
pub async fn pg_count(client: &Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .ok()
        .and_then(|r| r.try_get::<_, i64>(0).ok())
        .unwrap_or(0)
}

/// The count `sql` answers in BigQuery, 0 while it cannot (no table yet).
pub async fn bq_count(bq: &BigQuery, sql: &str) -> i64 {
    bq.query(sql)
        .await
        .ok()
        .and_then(|rows| rows.first().and_then(|r| r.first().cloned().flatten()))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The positions `postgres-sink` stored, by partition.
pub async fn stored_positions(client: &Client) -> BTreeMap<i32, i64> {
    client
        .query("SELECT partition, next_offset FROM sink_offsets", &[])
        .await
        .expect("sink_offsets")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Sink settings for `topics` under `prefix` on the local broker that react
/// fast: small batches, short waits and backoffs, a short session.
pub fn quick_settings(prefix: &str, topics: &[Topic], group: &str) -> SinkSettings {
    SinkSettings {
        batch_max: 1000,
        batch_wait: Duration::from_millis(50),
        max_backoff: Duration::from_millis(500),
        session_timeout: Duration::from_secs(6),
        ..SinkSettings::new(&stack::kafka_brokers(), prefix, topics, group)
    }
}

/// `postgres-sink` into `url` with [`quick_settings`] and a pool of two.
pub fn quick_pg_config(prefix: &str, topics: &[Topic], url: &str) -> SinkConfig {
    SinkConfig {
        sink: quick_settings(prefix, topics, &format!("{prefix}sink")),
        postgres_url: url.into(),
        pool_size: 2,
    }
}
