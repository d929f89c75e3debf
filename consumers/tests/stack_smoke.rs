//! The local stack works end to end: topics through the Admin API, Avro records
//! through the real broker, a row through PostgreSQL and one through the
//! BigQuery emulator. Needs `deploy/local/stack.sh up` (done by `make test`);
//! fails loudly when a service is not there.

use std::str::FromStr;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use serde_json::{json, Value};
use tickpipe_kafka::consumer_config;
use tickpipe_kafka::{ensure_topics, producer_config};
use tickpipe_schemas::{Codec, Decimal, Record, Source, Topic, Trade, TradeKind, WriteFraming};
use tickpipe_testkit::stack;

fn trade(i: i64) -> Trade {
    Trade {
        venue: "binance".into(),
        symbol: "BTCUSDT".into(),
        kind: TradeKind::Trade,
        trade_id: 1000 + i,
        price: Decimal::from_str("68040.01").unwrap() + Decimal::new(i, 2),
        quantity: Decimal::from_str("0.0015").unwrap(),
        buyer_is_maker: i % 2 == 0,
        first_trade_id: None,
        last_trade_id: None,
        source: Source::Simulator,
        event_time: 1_767_225_600_000_000 + i,
        ingest_time: 1_767_225_600_000_500 + i,
    }
}

#[tokio::test]
async fn avro_records_go_through_the_real_broker() {
    let brokers = stack::kafka_brokers();
    let prefix = format!("{}.", stack::unique_name("smoke"));
    let names = ensure_topics(&brokers, &prefix, &Topic::ALL, 3, 1)
        .await
        .unwrap_or_else(|e| panic!("is the broker up (make stack-up)? {e}"));
    assert_eq!(names.len(), 8);
    // Creating them again is not an error.
    ensure_topics(&brokers, &prefix, &[Topic::Trades], 3, 1).await.unwrap();

    let topic = Topic::Trades.name(&prefix);
    let codec = Codec::new(WriteFraming::SingleObject);
    let producer: FutureProducer = producer_config(&brokers).create().unwrap();
    let sent: Vec<Trade> = (0..200).map(trade).collect();
    for t in &sent {
        let payload = codec.encode(t).unwrap();
        let key = t.key();
        producer
            .send(
                FutureRecord::to(&topic).key(&key).payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("produce failed: {e}"));
    }

    let consumer: StreamConsumer = consumer_config(&brokers, &stack::unique_name("smoke-group"))
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let mut received = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while received.len() < sent.len() {
        let msg = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {} records arrived within 60 s", received.len(), sent.len()))
            .unwrap();
        assert_eq!(msg.key(), Some(&b"binance:BTCUSDT"[..]));
        received.push(codec.decode::<Trade>(msg.payload().unwrap()).unwrap());
    }
    // One key, so one partition, so the order is kept.
    assert_eq!(received, sent);
}

#[tokio::test]
async fn a_row_roundtrips_through_postgres() {
    let admin_url = stack::postgres_admin_url();
    let (admin, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("is PostgreSQL up at {admin_url} (make stack-up)? {e}"));
    tokio::spawn(conn);
    let db = stack::unique_name("tickpipe_smoke");
    admin.batch_execute(&format!("CREATE DATABASE {db}")).await.unwrap();

    let url = format!("{}/{db}", admin_url.rsplit_once('/').unwrap().0);
    let result = async {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        let task = tokio::spawn(conn);
        client
            .batch_execute("CREATE TABLE t (symbol text PRIMARY KEY, price numeric(38,18) NOT NULL)")
            .await?;
        client
            .execute(
                "INSERT INTO t VALUES ($1, $2::text::numeric)",
                &[&"BTCUSDT", &"68040.010000000000000001"],
            )
            .await?;
        let row = client.query_one("SELECT symbol, price::text FROM t", &[]).await?;
        drop(client);
        let _ = task.await;
        Ok::<_, tokio_postgres::Error>((row.get::<_, String>(0), row.get::<_, String>(1)))
    }
    .await;
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
    assert_eq!(
        result.unwrap(),
        ("BTCUSDT".to_owned(), "68040.010000000000000001".to_owned())
    );
}

async fn bq(http: &reqwest::Client, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
    let url = format!(
        "{}/bigquery/v2/projects/{}{path}",
        stack::bigquery_rest_url(),
        stack::bigquery_project()
    );
    let mut req = http.request(method, &url);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("is the BigQuery emulator up (make stack-up)? {e}"));
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert!(status.is_success(), "{url}: HTTP {status}: {text}");
    if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap()
    }
}

#[tokio::test]
async fn a_row_roundtrips_through_the_bigquery_emulator() {
    let http = reqwest::Client::new();
    let project = stack::bigquery_project();
    let dataset = stack::unique_name("smoke");
    bq(
        &http,
        reqwest::Method::POST,
        "/datasets",
        Some(json!({ "datasetReference": { "projectId": project, "datasetId": dataset } })),
    )
    .await;
    bq(
        &http,
        reqwest::Method::POST,
        &format!("/datasets/{dataset}/tables"),
        Some(json!({
            "tableReference": { "projectId": project, "datasetId": dataset, "tableId": "trades" },
            "schema": { "fields": [
                { "name": "symbol", "type": "STRING", "mode": "REQUIRED" },
                { "name": "trade_id", "type": "INTEGER", "mode": "REQUIRED" },
                { "name": "price", "type": "NUMERIC", "mode": "REQUIRED" }
            ]}
        })),
    )
    .await;
    let insert = bq(
        &http,
        reqwest::Method::POST,
        &format!("/datasets/{dataset}/tables/trades/insertAll"),
        Some(json!({ "rows": [
            { "json": { "symbol": "BTCUSDT", "trade_id": 1, "price": "68040.010000001" } },
            { "json": { "symbol": "BTCUSDT", "trade_id": 2, "price": "0.000000001" } }
        ]})),
    )
    .await;
    assert!(insert["insertErrors"].as_array().is_none_or(Vec::is_empty), "{insert}");
    let result = bq(
        &http,
        reqwest::Method::POST,
        "/queries",
        Some(json!({
            "query": format!("SELECT COUNT(*) AS n, CAST(SUM(price) AS STRING) AS total FROM `{project}.{dataset}.trades`"),
            "useLegacySql": false
        })),
    )
    .await;
    bq(
        &http,
        reqwest::Method::DELETE,
        &format!("/datasets/{dataset}?deleteContents=true"),
        None,
    )
    .await;
    let row = &result["rows"][0]["f"];
    assert_eq!(row[0]["v"], json!("2"), "{result}");
    assert_eq!(row[1]["v"], json!("68040.010000002"), "{result}");
}
