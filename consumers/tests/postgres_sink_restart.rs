//! PostgreSQL restarting under `postgres-sink` mid-stream: the sink reports not
//! ready while the database is away, retries, and afterwards every trade is
//! written once and the stored offsets equal the ends of the partitions; an
//! idle sink reports an outage too.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use tickpipe_consumers::ops::now_micros;
use tickpipe_consumers::pg::sink::{run, SinkConfig};
use tickpipe_consumers::sink::SinkSettings;
use tickpipe_kafka::{ensure_topics, producer_config};
use tickpipe_schemas::{Codec, Record, Topic, WriteFraming};
use tickpipe_testkit::stack::ScratchPostgres;
use tickpipe_testkit::{real, stack};
use tokio_postgres::NoTls;

async fn stored_total(url: &str) -> Option<i64> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.ok()?;
    tokio::spawn(conn);
    client
        .query_one("SELECT coalesce(sum(next_offset), 0)::bigint FROM sink_offsets", &[])
        .await
        .ok()
        .map(|r| r.get(0))
}

async fn readyz(addr: &str) -> u16 {
    reqwest::get(format!("http://{addr}/readyz"))
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Polls `/readyz` until it answers `status`, or fails with `failure` after 30 s.
async fn wait_readyz(addr: &str, status: u16, failure: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while readyz(addr).await != status {
        assert!(tokio::time::Instant::now() < deadline, "{failure}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_mid_stream_loses_and_duplicates_nothing() {
    let Some(dir) = stack::real_data("binance_trxusdt_2025-03-04") else {
        return;
    };
    let mut trades: Vec<_> = real::trade_stream_csv(
        &dir.join("usdm_futures_TRXUSDT_trade_stream_2025-03-04.csv"),
        "binance-usdm",
    )
    .into_iter()
    .map(|(t, _)| t)
    .filter(|t| t.price.is_sign_positive() && !t.price.is_zero())
    .collect();
    let now = now_micros();
    for t in &mut trades {
        t.ingest_time = now;
    }
    let pg = ScratchPostgres::start();
    let url = pg.url();
    let brokers = stack::kafka_brokers();
    let prefix = format!("{}.", stack::unique_name("pgsink_restart"));
    ensure_topics(&brokers, &prefix, &Topic::ALL, 3, 1)
        .await
        .unwrap_or_else(|e| panic!("is the broker up (make stack-up)? {e}"));
    let topic = Topic::Trades.name(&prefix);
    let metrics = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let config = SinkConfig {
        sink: SinkSettings {
            batch_max: 500,
            batch_wait: Duration::from_millis(20),
            max_backoff: Duration::from_millis(300),
            session_timeout: Duration::from_secs(6),
            metrics_addr: Some(metrics),
            ..SinkSettings::new(&brokers, &prefix, &[Topic::Trades], &format!("{prefix}sink"))
        },
        postgres_url: url.clone(),
        pool_size: 2,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let sink = tokio::spawn(run(config, async {
        let _ = stopped.await;
    }));

    let codec = Codec::new(WriteFraming::SingleObject);
    let producer: FutureProducer = producer_config(&brokers).create().unwrap();
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    let publish = |chunk: &[tickpipe_schemas::Trade]| {
        let pending: Vec<_> = chunk
            .iter()
            .map(|t| {
                let payload = codec.encode(t).unwrap();
                producer
                    .send_result(FutureRecord::to(&topic).key(&t.key()).payload(&payload))
                    .unwrap()
            })
            .collect();
        pending
    };
    let (first, rest) = trades.split_at(trades.len() / 3);
    let (during, after) = rest.split_at(rest.len() / 2);
    for d in publish(first) {
        let d = d.await.unwrap().unwrap();
        ends.insert(d.partition, d.offset + 1);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while stored_total(&url).await.unwrap_or(0) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no progress before the restart");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Postgres goes away while trades keep coming.
    pg.stop();
    for d in publish(during) {
        let d = d.await.unwrap().unwrap();
        ends.insert(d.partition, d.offset + 1);
    }
    wait_readyz(&metrics.to_string(), 503, "/readyz never reported the database outage").await;
    pg.start_again();
    for d in publish(after) {
        let d = d.await.unwrap().unwrap();
        ends.insert(d.partition, d.offset + 1);
    }
    let total: i64 = ends.values().sum();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while stored_total(&url).await.unwrap_or(0) < total {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sink did not catch up after the restart: {:?} of {total}",
            stored_total(&url).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(readyz(&metrics.to_string()).await, 200, "ready again");

    // An outage while nothing arrives (no write to fail) is told too.
    pg.stop();
    wait_readyz(
        &metrics.to_string(),
        503,
        "/readyz never reported the outage of an idle sink",
    )
    .await;
    pg.start_again();
    wait_readyz(&metrics.to_string(), 200, "/readyz never recovered").await;
    let text = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let retries: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("tickpipe_postgres_sink_write_retries_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the retry counter is exported");
    assert!(retries >= 1.0, "the outage was retried: {retries}");
    let _ = stop.send(());
    sink.await.unwrap().unwrap();

    let (client, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(conn);
    let counts = client
        .query_one("SELECT count(*), count(DISTINCT trade_id) FROM trades", &[])
        .await
        .unwrap();
    assert_eq!(
        (counts.get::<_, i64>(0), counts.get::<_, i64>(1)),
        (trades.len() as i64, trades.len() as i64),
        "every trade once"
    );
    let stored = common::stored_positions(&client).await;
    assert_eq!(stored, ends);
    let letters: i64 = client
        .query_one("SELECT count(*) FROM dead_letters", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(letters, 0, "an outage is not a reason to dead-letter anything");
}
