//! `bigquery-sink` against the BigQuery emulator and the real broker: a real
//! recording streamed through, compared row for row with what was produced;
//! poison and rows BigQuery refuses in the dead letters; SIGKILL during
//! streaming; BigQuery failing at start; tables that evolve or cannot;
//! credentials that fail; the newest version of each candle.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use tickpipe_consumers::bq::client::{Auth, BigQuery, Endpoint};
use tickpipe_consumers::bq::prepare_tables;
use tickpipe_consumers::bq::schema::{table_spec, DecimalColumns, TableSpec, LATEST_CANDLES};
use tickpipe_consumers::bq::sink::{run, BqSinkConfig};
use tickpipe_consumers::sink::SinkSettings;
use tickpipe_kafka::{ensure_topics, producer_config};
use tickpipe_schemas::{Candle, CandleOrigin, Codec, DeadLetter, Decimal, Record, Source, Topic, Trade, WriteFraming};
use tickpipe_testkit::stack;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn emulator() -> Endpoint {
    Endpoint {
        api_url: stack::bigquery_rest_url(),
        project: stack::bigquery_project(),
        auth: Auth::None,
    }
}

async fn client() -> BigQuery {
    BigQuery::connect(emulator(), None)
        .await
        .unwrap_or_else(|e| panic!("the BigQuery emulator (make stack-up): {e}"))
}

fn config(prefix: &str, dataset: &str) -> BqSinkConfig {
    BqSinkConfig {
        sink: SinkSettings {
            batch_max: 5_000,
            max_backoff: Duration::from_secs(1),
            session_timeout: Duration::from_secs(6),
            ..SinkSettings::new(
                &stack::kafka_brokers(),
                prefix,
                &[Topic::Trades, Topic::DeadLetters],
                &format!("{prefix}bq"),
            )
        },
        endpoint: emulator(),
        dataset: dataset.to_owned(),
        location: "US".into(),
        decimals: DecimalColumns::String,
        request_rows: 500,
    }
}

/// The recorded trades of two symbols, received now, or `None` (said loudly)
/// without the data.
fn recorded_trades() -> Option<Vec<Trade>> {
    let mut trades = common::recorded_trades()?;
    let now = tickpipe_consumers::ops::now_micros();
    for t in &mut trades {
        t.ingest_time = now;
    }
    Some(trades)
}

async fn count(bq: &BigQuery, sql: &str) -> i64 {
    // The tables may not exist yet.
    try_count(bq, sql).await.unwrap_or(0)
}

/// The count `sql` answers, or the emulator's error.
async fn try_count(bq: &BigQuery, sql: &str) -> Result<i64, String> {
    let rows = bq.query(sql).await.map_err(|e| e.to_string())?;
    rows.first()
        .and_then(|r| r.first().cloned().flatten())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no count in {rows:?}"))
}

/// Waits until `sql` counts `want` rows, failing after `secs`.
async fn wait_for_count(bq: &BigQuery, sql: &str, want: i64, secs: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let n = count(bq, sql).await;
        if n == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{sql}: {n} rows, want {want}, after {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `(symbol, trade_id, price, quantity)` of every trade, as exact text.
fn identities(trades: &[Trade]) -> BTreeSet<(String, i64, String, String)> {
    trades
        .iter()
        .map(|t| {
            (
                t.symbol.clone(),
                t.trade_id,
                t.price.normalize().to_string(),
                t.quantity.normalize().to_string(),
            )
        })
        .collect()
}

/// The rows `sql` answers, a NULL as empty text; panics with `what` on an error.
async fn text_rows(bq: &BigQuery, sql: &str, what: &str) -> Vec<Vec<String>> {
    bq.query(sql)
        .await
        .expect(what)
        .into_iter()
        .map(|r| r.into_iter().map(Option::unwrap_or_default).collect())
        .collect()
}

async fn stored_trades(bq: &BigQuery, dataset: &str, from: &str) -> Vec<(String, i64, String, String)> {
    let project = stack::bigquery_project();
    let sql = format!("SELECT symbol, trade_id, price, quantity FROM `{project}.{dataset}.{from}`");
    text_rows(bq, &sql, "query the trades")
        .await
        .into_iter()
        .map(|r| {
            let cell = |i: usize| r.get(i).cloned().unwrap_or_default();
            (cell(0), cell(1).parse().unwrap_or(-1), cell(2), cell(3))
        })
        .collect()
}

/// Fresh topics (all entities, 3 partitions) under a prefix, and a dataset
/// name, both from `name`.
async fn setup(name: &str) -> (String, String) {
    let prefix = format!("{}.", stack::unique_name(name));
    ensure_topics(&stack::kafka_brokers(), &prefix, &Topic::ALL, 3, 1)
        .await
        .unwrap_or_else(|e| panic!("is the broker up (make stack-up)? {e}"));
    (prefix, stack::unique_name(name))
}

/// Records as (key, single-object payload).
fn encoded<R: Record>(codec: &Codec, records: &[R]) -> Vec<(String, Vec<u8>)> {
    records
        .iter()
        .map(|r| (r.key(), codec.encode(r).expect("encode")))
        .collect()
}

/// Publishes records and returns the next offset of each partition touched.
async fn publish(producer: &FutureProducer, topic: &str, records: &[(String, Vec<u8>)]) -> BTreeMap<i32, i64> {
    let mut pending = Vec::with_capacity(records.len());
    for (key, payload) in records {
        pending.push(
            producer
                .send_result(FutureRecord::to(topic).key(key).payload(payload))
                .expect("enqueue"),
        );
    }
    let mut ends = BTreeMap::new();
    for p in pending {
        let d = p.await.expect("delivery").expect("delivered");
        let e = ends.entry(d.partition).or_insert(0);
        *e = (*e).max(d.offset + 1);
    }
    ends
}

fn letter(component: &str, event_time: i64, error: &str) -> DeadLetter {
    DeadLetter {
        stage: "validate".into(),
        error: error.into(),
        component: component.into(),
        topic: Some("elsewhere".into()),
        partition: Some(0),
        offset: Some(7),
        key: None,
        payload: b"raw".to_vec(),
        source: Source::Binance,
        event_time,
        ingest_time: 1_700_000_000_000_000,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_arrives_exactly_and_refused_rows_become_dead_letters() {
    let Some(trades) = recorded_trades() else { return };
    let brokers = stack::kafka_brokers();
    let (prefix, dataset) = setup("bqsink").await;
    let codec = Codec::new(WriteFraming::SingleObject);
    let producer: FutureProducer = producer_config(&brokers).create().expect("producer");

    // The recording, with two poison records: garbage and a negative price.
    let mut records = encoded(&codec, &trades);
    records.insert(100, ("binance:XRPETH".into(), b"not avro at all".to_vec()));
    let mut negative = trades[0].clone();
    negative.trade_id = 9_000_000_000;
    negative.price = Decimal::from(-1);
    records.insert(200, (negative.key(), codec.encode(&negative).expect("encode")));
    publish(&producer, &Topic::Trades.name(&prefix), &records).await;

    // Another service's dead letters, one of them with a time BigQuery cannot
    // hold (year 10000), between two it can.
    let letters = [
        letter("candles", 1_700_000_000_000_000, "late"),
        letter("candles", 253_402_300_800_000_000, "from the far future"),
        letter("candles", 1_700_000_000_000_001, "late too"),
    ];
    let encoded: Vec<(String, Vec<u8>)> = letters
        .iter()
        .map(|l| ("elsewhere".to_owned(), codec.encode(l).expect("encode")))
        .collect();
    publish(&producer, &Topic::DeadLetters.name(&prefix), &encoded).await;

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let sink = tokio::spawn(run(config(&prefix, &dataset), async {
        let _ = stopped.await;
    }));
    let bq = client().await;
    let project = stack::bigquery_project();
    let view = |name: &str| format!("`{project}.{dataset}.{name}`");
    wait_for_count(
        &bq,
        &format!("SELECT COUNT(*) FROM {}", view("trades")),
        trades.len() as i64,
        300,
    )
    .await;
    // Two letters of candles, and of this sink: garbage, negative price, and
    // the far-future letter, refused before BigQuery sees it.
    wait_for_count(&bq, &format!("SELECT COUNT(*) FROM {}", view("dead_letters")), 5, 60).await;
    let _ = stop.send(());
    sink.await.expect("join").expect("the sink stops cleanly");

    let stored = stored_trades(&bq, &dataset, "trades").await;
    assert_eq!(stored.len(), trades.len());
    let stored: BTreeSet<_> = stored.into_iter().collect();
    let want = identities(&trades);
    assert_eq!(stored.len(), want.len(), "one row per trade");
    assert!(
        stored == want,
        "the rows differ from the recording: {} missing",
        want.difference(&stored).count()
    );
    // The same through BigQuery's own arithmetic: counts and id sums per symbol.
    let per_symbol = text_rows(
        &bq,
        &format!(
            "SELECT symbol, COUNT(*), SUM(trade_id) FROM {} GROUP BY symbol ORDER BY symbol",
            view("trades")
        ),
        "aggregate",
    )
    .await;
    let mut expected: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for t in &trades {
        let e = expected.entry(t.symbol.clone()).or_default();
        e.0 += 1;
        e.1 += t.trade_id;
    }
    let got: BTreeMap<String, (i64, i64)> = per_symbol
        .iter()
        .map(|r| {
            let n = |i: usize| r[i].parse().unwrap_or(-1);
            (r[0].clone(), (n(1), n(2)))
        })
        .collect();
    assert_eq!(got, expected);

    let rejects: Vec<(String, String)> = text_rows(
        &bq,
        &format!(
            "SELECT stage, error FROM {} WHERE component = 'bigquery-sink' ORDER BY stage, error",
            view("dead_letters")
        ),
        "dead letters",
    )
    .await
    .into_iter()
    .map(|r| (r[0].clone(), r[1].clone()))
    .collect();
    assert_eq!(
        rejects.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
        ["decode", "validate", "validate"],
        "{rejects:?}"
    );
    assert!(
        rejects[1]
            .1
            .contains("event_time 253402300800000000 µs is outside the years 1 to 9999"),
        "{rejects:?}"
    );
    assert!(rejects[2].1.contains("price"), "{rejects:?}");
    let kept = text_rows(
        &bq,
        &format!(
            "SELECT error FROM {} WHERE component = 'candles' ORDER BY error",
            view("dead_letters")
        ),
        "letters",
    )
    .await;
    assert_eq!(
        kept.into_iter().map(|r| r[0].clone()).collect::<Vec<_>>(),
        ["late", "late too"]
    );
}

/// `candles_latest` keeps the newest version of each candle: a minute published
/// open, then closed, then corrected (in Kafka order) is its correction;
/// Binance's own kline of the same minute is a candle of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candles_latest_holds_the_newest_version_of_each_candle() {
    let (prefix, dataset) = setup("bqlatest").await;
    let codec = Codec::new(WriteFraming::SingleObject);
    let producer: FutureProducer = producer_config(&stack::kafka_brokers()).create().expect("producer");
    let minute = 1_700_000_040_000_000i64;
    let candle = |open_time: i64, origin: CandleOrigin, price: i64, count: i64, closed: bool| {
        let price = Decimal::from(price);
        Candle {
            venue: "binance".into(),
            symbol: "BTCUSDT".into(),
            interval: "1m".into(),
            origin,
            open_time,
            close_time: open_time + 59_999_000,
            open: price,
            high: price,
            low: price,
            close: price,
            volume: Decimal::from(count),
            quote_volume: price * Decimal::from(count),
            trade_count: count,
            taker_buy_base_volume: Decimal::ZERO,
            taker_buy_quote_volume: Decimal::ZERO,
            first_trade_id: Some(1),
            last_trade_id: Some(count),
            closed,
            source: Source::Binance,
            event_time: open_time + 59_999_000,
            ingest_time: open_time + 60_000_000,
        }
    };
    let versions = [
        candle(minute, CandleOrigin::Aggregated, 10, 1, false),
        candle(minute, CandleOrigin::Aggregated, 11, 2, true),
        candle(minute, CandleOrigin::ExchangeKline, 13, 3, true),
        candle(minute, CandleOrigin::Aggregated, 12, 3, true),
        candle(minute + 60_000_000, CandleOrigin::Aggregated, 14, 1, false),
    ];
    publish(&producer, &Topic::Candles.name(&prefix), &encoded(&codec, &versions)).await;

    let mut config = config(&prefix, &dataset);
    config.sink.topics = vec![Topic::Candles, Topic::DeadLetters];
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let sink = tokio::spawn(run(config, async {
        let _ = stopped.await;
    }));
    let bq = client().await;
    let project = stack::bigquery_project();
    let all = format!("SELECT COUNT(*) FROM `{project}.{dataset}.candles`");
    wait_for_count(&bq, &all, versions.len() as i64, 120).await;
    let _ = stop.send(());
    sink.await.expect("join").expect("the sink stops cleanly");

    let latest = format!("SELECT origin, close, trade_count, closed FROM `{project}.{dataset}.{LATEST_CANDLES}`");
    let mut got = text_rows(&bq, &latest, "query candles_latest").await;
    got.sort();
    assert_eq!(
        got,
        [
            ["aggregated", "12", "3", "true"],
            ["aggregated", "14", "1", "false"],
            ["exchange_kline", "13", "3", "true"],
        ]
    );
}

/// The sink process, killed if the test fails before it does, with its log
/// (stderr at info) in a file that a failing round shows.
struct Sink(Child, std::path::PathBuf);

impl Sink {
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.1).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.1);
        }
    }
}

/// The sink's group session: how long the broker keeps a killed member.
const SESSION_TIMEOUT: Duration = Duration::from_secs(6);

fn start_sink(prefix: &str, dataset: &str) -> Sink {
    let log = std::env::temp_dir().join(format!("{}.log", stack::unique_name("bigquery-sink")));
    let log_file = std::fs::File::create(&log).expect("a log file for the sink");
    Sink(
        Command::new(env!("CARGO_BIN_EXE_bigquery-sink"))
            .env("TICKPIPE_KAFKA_BROKERS", stack::kafka_brokers())
            .env("TICKPIPE_TOPIC_PREFIX", prefix)
            .env("TICKPIPE_BIGQUERY_EMULATOR", stack::bigquery_rest_url())
            .env("TICKPIPE_BIGQUERY_PROJECT", stack::bigquery_project())
            .env("TICKPIPE_BIGQUERY_DATASET", dataset)
            .env("TICKPIPE_BIGQUERY_SINK_GROUP", format!("{prefix}bq"))
            .env("TICKPIPE_BIGQUERY_SINK_TOPICS", "trades")
            .env("TICKPIPE_BIGQUERY_SINK_BATCH_MAX", "1000")
            .env("TICKPIPE_BIGQUERY_SINK_BATCH_WAIT_MS", "50")
            .env("TICKPIPE_BIGQUERY_SINK_REQUEST_ROWS", "250")
            .env(
                "TICKPIPE_BIGQUERY_SINK_SESSION_TIMEOUT_MS",
                SESSION_TIMEOUT.as_millis().to_string(),
            )
            .env("TICKPIPE_BIGQUERY_SINK_METRICS_ADDR", "off")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("the bigquery-sink binary starts"),
        log,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_streaming_leaves_the_view_exact() {
    let Some(trades) = recorded_trades() else { return };
    let brokers = stack::kafka_brokers();
    let (prefix, dataset) = setup("bqkill").await;
    let topic = Topic::Trades.name(&prefix);
    let codec = Codec::new(WriteFraming::SingleObject);
    let producer: FutureProducer = producer_config(&brokers).create().expect("producer");
    // A part of the recording per round, published as the round starts: a
    // round always has rows to write (a stream published ahead of the kills
    // could be written and committed whole, leaving a later round nothing).
    const ROUNDS: usize = 5;
    let mut parts = trades.chunks(trades.len().div_ceil(ROUNDS + 1));

    let bq = client().await;
    let project = stack::bigquery_project();
    let raw = format!("SELECT COUNT(*) FROM `{project}.{dataset}.trades_raw`");
    let mut kills = 0;
    let mut progress = Vec::new();
    for round in 0..ROUNDS {
        let before = count(&bq, &raw).await;
        let part = parts.next().expect("a part per round");
        publish(&producer, &topic, &encoded(&codec, part)).await;
        let mut sink = start_sink(&prefix, &dataset);
        let started = tokio::time::Instant::now();
        let mut last = Ok(before);
        while !last.as_ref().is_ok_and(|n| *n > before) {
            if let Some(status) = sink.0.try_wait().expect("try_wait") {
                panic!(
                    "round {round}: the sink exited with {status}; its log ends:\n{}",
                    sink.log_tail()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "round {round}: no rows written in 90 s (raw rows before: {before}, last count: {last:?}); \
                 the sink's log ends:\n{}",
                sink.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            last = try_count(&bq, &raw).await;
        }
        eprintln!("round {round}: rows after {:?}", started.elapsed());
        sink.0.kill().expect("kill");
        sink.0.wait().expect("wait");
        // The next run starts at once, while the killed member's session is
        // still open: the group hands it the partitions when that expires.
        kills += 1;
        progress.push(count(&bq, &raw).await);
    }
    for rest in parts {
        publish(&producer, &topic, &encoded(&codec, rest)).await;
    }
    let total = trades.len() as i64;
    assert!(
        progress.iter().any(|p| *p < total),
        "the kills must land mid-stream: raw rows after each kill {progress:?} of {total}"
    );

    // A last run catches up and stops cleanly on SIGTERM.
    let mut sink = start_sink(&prefix, &dataset);
    wait_for_count(
        &bq,
        &format!("SELECT COUNT(*) FROM `{project}.{dataset}.trades`"),
        total,
        300,
    )
    .await;
    let pid = sink.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    let status = sink.0.wait().expect("wait");
    assert!(status.success(), "SIGTERM must end the sink with 0, got {status}");

    let stored = stored_trades(&bq, &dataset, "trades").await;
    let distinct: BTreeSet<_> = stored.iter().cloned().collect();
    assert_eq!(stored.len(), distinct.len(), "the view holds each trade once");
    assert!(
        distinct == identities(&trades),
        "the view equals the input after {kills} kills"
    );
    let copies = count(&bq, &raw).await;
    assert!(
        copies >= total,
        "the raw table holds every row at least once: {copies} < {total}"
    );
    eprintln!("{kills} kills: {copies} raw rows for {total} trades");
}

/// Creates `spec`'s raw table (`prices_raw`, …) in `dataset` with `spec`'s
/// columns, as another version of the sink would have; panics with `what`.
async fn create_raw_table(bq: &BigQuery, dataset: &str, spec: &TableSpec, what: &str) {
    let project = stack::bigquery_project();
    bq.create_table(
        dataset,
        &json!({
            "tableReference": {"projectId": project, "datasetId": dataset, "tableId": spec.table},
            "schema": {"fields": spec.fields},
        }),
    )
    .await
    .expect(what);
}

#[tokio::test]
async fn tables_gain_new_columns_and_refuse_changed_ones() {
    let bq = client().await;
    let dataset = stack::unique_name("bqschema");
    bq.ensure_dataset(&dataset, "US").await.expect("dataset");
    // An older prices table, without a column the records now have.
    let mut older = table_spec(Topic::Prices, DecimalColumns::String);
    older.fields.retain(|f| f.name != "ingest_time");
    create_raw_table(&bq, &dataset, &older, "create the older table").await;
    prepare_tables(&bq, &dataset, "US", &[Topic::Prices], DecimalColumns::String)
        .await
        .expect("a new column is added");
    let table = bq.table(&dataset, "prices_raw").await.expect("get").expect("exists");
    let fields = table.schema.expect("schema").fields;
    let added = fields
        .iter()
        .find(|f| f.name == "ingest_time")
        .expect("ingest_time added");
    assert_eq!((added.kind(), added.mode()), ("TIMESTAMP", "NULLABLE"));
    assert_eq!(
        bq.table(&dataset, "prices").await.expect("get").expect("view").kind,
        "VIEW"
    );

    // A rates table whose rate is a number cannot take the records' text.
    let mut changed = table_spec(Topic::Rates, DecimalColumns::String);
    for f in &mut changed.fields {
        if f.name == "rate_usd" {
            f.kind = "INTEGER".into();
        }
    }
    create_raw_table(&bq, &dataset, &changed, "create the changed table").await;
    let err = prepare_tables(&bq, &dataset, "US", &[Topic::Rates], DecimalColumns::String)
        .await
        .expect_err("an incompatible table is refused")
        .to_string();
    assert!(
        err.contains("rates_raw column rate_usd is INTEGER but the records need STRING"),
        "{err}"
    );
}

/// A token endpoint that refuses every grant the way Google's does, and
/// returns the first request it saw.
async fn refusing_token_service() -> (u16, tokio::task::JoinHandle<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.expect("accept");
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        // Read the headers and the form body (its length is in the headers).
        loop {
            let n = socket.read(&mut buf).await.expect("read");
            request.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&request).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().to_owned())
                    })
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0);
                if request.len() >= end + 4 + length || n == 0 {
                    break;
                }
            } else if n == 0 {
                break;
            }
        }
        let body = r#"{"error":"invalid_grant","error_description":"Invalid JWT Signature."}"#;
        let answer = format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = socket.write_all(answer.as_bytes()).await;
        let _ = socket.shutdown().await;
        String::from_utf8_lossy(&request).to_string()
    });
    (port, seen)
}

#[tokio::test]
async fn credentials_that_fail_stop_the_sink_with_a_clear_message() {
    // A key file that is not there.
    let missing = std::env::temp_dir().join("tickpipe-no-such-key.json");
    let out = Command::new(env!("CARGO_BIN_EXE_bigquery-sink"))
        .env("TICKPIPE_BIGQUERY_CREDENTIALS", &missing)
        .env("TICKPIPE_BIGQUERY_API_URL", stack::bigquery_rest_url())
        .env("TICKPIPE_BIGQUERY_SINK_METRICS_ADDR", "off")
        .output()
        .expect("run the binary");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot use the service-account key file") && stderr.contains("TICKPIPE_BIGQUERY_CREDENTIALS"),
        "{stderr}"
    );

    // A key the token service refuses.
    let (port, seen) = refusing_token_service().await;
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/throwaway-service-account.json"
    );
    let mut key: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture).expect("fixture")).expect("json");
    key["token_uri"] = json!(format!("http://127.0.0.1:{port}/token"));
    let path = std::env::temp_dir().join(format!("{}.json", stack::unique_name("tickpipe-key")));
    std::fs::write(&path, key.to_string()).expect("write the key");
    let endpoint = Endpoint {
        auth: Auth::KeyFile(path.clone()),
        ..emulator()
    };
    let err = match BigQuery::connect(endpoint, None).await {
        Ok(_) => panic!("a refused key must stop the sink"),
        Err(e) => e,
    };
    let _ = std::fs::remove_file(&path);
    let message = err.to_string();
    assert!(err.is_fatal());
    assert!(
        message.starts_with("bigquery authentication failed: the token service refused the service-account key file"),
        "{message}"
    );
    assert!(!message.contains("PRIVATE KEY"), "the key is never shown: {message}");
    let request = seen.await.expect("the token service was asked");
    assert!(request.starts_with("POST /token"), "{request}");
    assert!(request.contains("jwt-bearer"), "a signed JWT grant was sent: {request}");
}

/// BigQuery unreachable when the sink starts (here: the first two connections
/// to it are cut) is waited out like an outage while writing, not a reason to
/// exit: once it answers, the tables are made and the rows arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bigquery_failing_at_start_is_waited_for() {
    let Some(mut trades) = recorded_trades() else { return };
    trades.truncate(100);
    let brokers = stack::kafka_brokers();
    let (prefix, dataset) = setup("bqstart").await;

    // A proxy in front of the emulator that cuts its first two connections.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let upstream = stack::bigquery_rest_url()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let cut = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = cut.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                return;
            };
            if counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 {
                drop(inbound);
                continue;
            }
            let upstream = upstream.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    let mut cfg = config(&prefix, &dataset);
    cfg.endpoint.api_url = format!("http://127.0.0.1:{port}");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let sink = tokio::spawn(run(cfg, async {
        let _ = stopped.await;
    }));

    let codec = Codec::new(WriteFraming::SingleObject);
    let producer: FutureProducer = producer_config(&brokers).create().expect("producer");
    publish(&producer, &Topic::Trades.name(&prefix), &encoded(&codec, &trades)).await;
    let bq = client().await;
    wait_for_count(
        &bq,
        &format!("SELECT COUNT(*) FROM `{}.{dataset}.trades`", stack::bigquery_project()),
        trades.len() as i64,
        120,
    )
    .await;
    assert!(
        cut.load(std::sync::atomic::Ordering::SeqCst) > 2,
        "the cut connections were retried"
    );
    assert!(!sink.is_finished(), "the sink kept running");
    let _ = stop.send(());
    sink.await.unwrap().expect("a clean stop");
}
