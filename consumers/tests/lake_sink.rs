//! `lake-sink` against the real broker and real stores: a recording streamed
//! into a local folder and into S3 (the moto server), read back with DuckDB
//! and compared row for row with what was produced; recordings replayed by the
//! producer, the same in the lake as in PostgreSQL (trades row for row, the
//! newest version of each candle); poison in the dead letters; a restart that
//! writes nothing twice; a store that refuses (not ready, retried, then the
//! files); SIGKILL at random moments during a load of a million records, after
//! which the lake holds every record exactly once and every file it lists is
//! whole.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures_util::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::{ObjectStore, ObjectStoreExt};
use rand::Rng;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tickpipe_consumers::lake::layout::FileName;
use tickpipe_consumers::lake::sink::{run, LakeSinkConfig};
use tickpipe_consumers::lake::store::Target;
use tickpipe_kafka::{ensure_topics, producer_config};
use tickpipe_schemas::{AnyRecord, Codec, Decimal, Record, Topic, Trade, WriteFraming};
use tickpipe_testkit::{kafka, real, stack};

/// Runs `sql` in DuckDB and returns its rows, every value as text (`None`
/// for NULL).
fn duckdb(sql: &str) -> Vec<Vec<Option<String>>> {
    let script = "import duckdb, json, sys\n\
                  for row in duckdb.sql(sys.argv[1]).fetchall():\n    \
                  print(json.dumps([None if v is None else str(v) for v in row]))";
    let out = Command::new(stack::lake_python())
        .args(["-c", script, sql])
        .output()
        .unwrap_or_else(|e| panic!("{} (make stack-up): {e}", stack::lake_python().display()));
    assert!(
        out.status.success(),
        "duckdb: {sql}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a row as JSON"))
        .collect()
}

/// The raw trades under the lake folder `dir`, as a DuckDB table expression.
fn raw_trades(dir: &Path) -> String {
    format!(
        "read_parquet('{}/raw/trades/*/*/*.parquet', hive_partitioning = true, filename = true)",
        dir.display()
    )
}

/// `(symbol, trade_id, price, quantity)` of every trade, decimals normalised.
fn identities(trades: &[Trade]) -> BTreeSet<(String, i64, Decimal, Decimal)> {
    trades
        .iter()
        .map(|t| {
            (
                t.symbol.clone(),
                t.trade_id,
                t.price.normalize(),
                t.quantity.normalize(),
            )
        })
        .collect()
}

fn cell(row: &[Option<String>], i: usize) -> String {
    row.get(i).cloned().flatten().unwrap_or_default()
}

fn decimal(s: &str) -> Decimal {
    Decimal::from_str_exact(s)
        .unwrap_or_else(|e| panic!("{s:?}: {e}"))
        .normalize()
}

/// Checks that the lake under `dir` holds exactly `trades`, each once, in
/// whole files named after what they hold, in the folder of their venue and
/// UTC day; returns the number of files.
fn assert_lake_holds(dir: &Path, trades: &[Trade]) -> usize {
    let lake = raw_trades(dir);
    let n = trades.len();
    let counts = duckdb(&format!(
        "SELECT COUNT(*), COUNT(DISTINCT (kafka_partition, kafka_offset)), COUNT(DISTINCT filename) FROM {lake}"
    ));
    let count = |i| cell(&counts[0], i).parse::<usize>().expect("a count");
    assert_eq!(count(0), n, "rows in the lake");
    assert_eq!(count(1), n, "one row per Kafka offset");
    let files = count(2);

    let stored: BTreeSet<_> = duckdb(&format!("SELECT symbol, trade_id, price, quantity FROM {lake}"))
        .iter()
        .map(|r| {
            (
                cell(r, 0),
                cell(r, 1).parse::<i64>().expect("an id"),
                decimal(&cell(r, 2)),
                decimal(&cell(r, 3)),
            )
        })
        .collect();
    let want = identities(trades);
    assert_eq!(stored.len(), want.len(), "one row per trade");
    assert!(
        stored == want,
        "the rows differ from the recording: {} missing",
        want.difference(&stored).count()
    );

    // DuckDB's own arithmetic on the exact decimals equals ours.
    let mut sums: BTreeMap<String, (usize, Decimal)> = BTreeMap::new();
    for t in trades {
        let s = sums.entry(t.symbol.clone()).or_insert((0, Decimal::ZERO));
        s.0 += 1;
        s.1 += t.quantity;
    }
    let theirs: BTreeMap<String, (usize, Decimal)> = duckdb(&format!(
        "SELECT symbol, COUNT(*), SUM(quantity) FROM {lake} GROUP BY symbol"
    ))
    .iter()
    .map(|r| (cell(r, 0), (cell(r, 1).parse().expect("a count"), decimal(&cell(r, 2)))))
    .collect();
    let ours: BTreeMap<_, _> = sums.into_iter().map(|(k, (c, q))| (k, (c, q.normalize()))).collect();
    assert_eq!(theirs, ours, "counts and quantity sums per symbol");

    // Partition columns: the venue, and the UTC day of the event time.
    let misplaced = duckdb(&format!(
        "SELECT COUNT(*) FROM {lake} WHERE venue <> 'binance' OR \
         CAST(date AS VARCHAR) <> strftime(CAST(event_time AS TIMESTAMP), '%Y-%m-%d')"
    ));
    assert_eq!(
        cell(&misplaced[0], 0),
        "0",
        "rows outside their venue's or day's folder"
    );

    // Every file holds exactly the offsets its name says, and no two files of
    // a folder and partition overlap.
    let per_file = duckdb(&format!(
        "SELECT filename, MIN(kafka_offset), MAX(kafka_offset), COUNT(*), MIN(kafka_partition), \
         MAX(kafka_partition) FROM {lake} GROUP BY filename ORDER BY filename"
    ));
    let mut ranges: BTreeMap<(String, i32), Vec<(i64, i64)>> = BTreeMap::new();
    for r in &per_file {
        let path = PathBuf::from(cell(r, 0));
        let name = path.file_name().and_then(|n| n.to_str()).expect("a file name");
        let name = FileName::parse(name).unwrap_or_else(|| panic!("{name} is not a lake file name"));
        let (lo, hi): (i64, i64) = (cell(r, 1).parse().expect("min"), cell(r, 2).parse().expect("max"));
        assert_eq!((lo, hi), (name.first, name.last), "{}: offsets", path.display());
        assert_eq!(cell(r, 4), name.partition.to_string(), "{}: partition", path.display());
        assert_eq!(cell(r, 5), name.partition.to_string(), "{}: partition", path.display());
        let folder = path.parent().map(|p| p.display().to_string()).unwrap_or_default();
        ranges.entry((folder, name.partition)).or_default().push((lo, hi));
    }
    for ((folder, partition), mut r) in ranges {
        r.sort();
        for pair in r.windows(2) {
            assert!(
                pair[0].1 < pair[1].0,
                "{folder} partition {partition}: files overlap: {pair:?}"
            );
        }
    }
    files
}

/// Fresh topics (all entities, 3 partitions) under a prefix from `name`.
async fn setup(name: &str) -> String {
    let prefix = format!("{}.", stack::unique_name(name));
    ensure_topics(&stack::kafka_brokers(), &prefix, &Topic::ALL, 3, 1)
        .await
        .unwrap_or_else(|e| panic!("is the broker up (make stack-up)? {e}"));
    prefix
}

/// Publishes (key, payload) records to `topic`, waiting for every delivery.
async fn publish(topic: &str, records: &[(String, Vec<u8>)]) {
    let producer: FutureProducer = producer_config(&stack::kafka_brokers())
        .set("linger.ms", "20")
        .create()
        .expect("producer");
    for chunk in records.chunks(50_000) {
        let mut pending = Vec::with_capacity(chunk.len());
        for (key, payload) in chunk {
            loop {
                match producer.send_result(FutureRecord::to(topic).key(key).payload(payload)) {
                    Ok(delivery) => {
                        pending.push(delivery);
                        break;
                    }
                    Err((e, _)) => {
                        assert!(
                            matches!(e, rdkafka::error::KafkaError::MessageProduction(_)),
                            "enqueue: {e}"
                        );
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        }
        for p in pending {
            p.await.expect("delivery").expect("delivered");
        }
    }
}

fn encoded(trades: &[Trade]) -> Vec<(String, Vec<u8>)> {
    let codec = Codec::new(WriteFraming::SingleObject);
    trades
        .iter()
        .map(|t| (t.key(), codec.encode(t).expect("encode")))
        .collect()
}

/// Waits until the lake under `dir` holds `want` trade rows.
fn wait_for_rows(dir: &Path, want: usize, secs: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let n = lake_rows(dir);
        if n >= want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{n} rows in the lake, want {want}, after {secs} s"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The trade rows in the lake under `dir` (0 before the first file).
fn lake_rows(dir: &Path) -> usize {
    if !dir.join("raw/trades").is_dir() {
        return 0;
    }
    cell(&duckdb(&format!("SELECT COUNT(*) FROM {}", raw_trades(dir)))[0], 0)
        .parse()
        .expect("a count")
}

fn quick_config(prefix: &str, dir: &Path) -> LakeSinkConfig {
    LakeSinkConfig {
        // Files of a few hundred records, so that a run writes many.
        file_max_bytes: 32 << 10,
        file_max_age: Duration::from_millis(500),
        buffer_max_bytes: 1 << 20,
        ..LakeSinkConfig::new(
            common::quick_settings(prefix, &[Topic::Trades], &format!("{prefix}lake")),
            Target::Local(dir.to_owned()),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_lands_once_per_offset_across_a_restart_and_poison_becomes_a_dead_letter() {
    let Some(trades) = common::recorded_trades() else {
        return;
    };
    let prefix = setup("lake").await;
    let dir = tempdir("lake-local");
    let mut records = encoded(&trades);
    records.insert(100, ("binance:XRPETH".into(), b"not avro at all".to_vec()));
    let half = records.len() / 2;
    publish(&Topic::Trades.name(&prefix), &records[..half]).await;

    // A first run writes part of it and stops; a second run goes on.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let sink = tokio::spawn(run(quick_config(&prefix, &dir), async {
        let _ = stopped.await;
    }));
    let d = dir.clone();
    tokio::task::spawn_blocking(move || wait_for_rows(&d, 1, 120))
        .await
        .expect("join");
    let _ = stop.send(());
    sink.await.expect("join").expect("the sink stops cleanly");
    let after_first = lake_rows(&dir);

    publish(&Topic::Trades.name(&prefix), &records[half..]).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let sink = tokio::spawn(run(quick_config(&prefix, &dir), async {
        let _ = stopped.await;
    }));
    let (d, n) = (dir.clone(), trades.len());
    tokio::task::spawn_blocking(move || wait_for_rows(&d, n, 300))
        .await
        .expect("join");
    let _ = stop.send(());
    sink.await.expect("join").expect("the sink stops cleanly");

    assert!(after_first > 0, "the first run wrote files before it stopped");
    let files = assert_lake_holds(&dir, &trades);
    assert!(files > 10, "files roll over by size: {files}");

    // The poison is a dead letter of this sink, with its reason.
    let letters: Vec<_> = kafka::read_topic(&stack::kafka_brokers(), &Topic::DeadLetters.name(&prefix))
        .into_iter()
        .filter_map(
            |(_, payload)| match Topic::DeadLetters.decode(&Codec::new(WriteFraming::SingleObject), &payload) {
                Ok(AnyRecord::DeadLetter(d)) => Some(d),
                _ => None,
            },
        )
        .collect();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].component, "lake-sink");
    assert_eq!(letters[0].stage, "decode");
    assert_eq!(letters[0].payload, b"not avro at all");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A fresh folder under the system's temporary folder.
fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(stack::unique_name(name));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Copies every object of `store` into `dir`, keeping their paths.
async fn download(store: &dyn ObjectStore, dir: &Path) -> usize {
    let objects: Vec<_> = store.list(None).try_collect().await.expect("list the bucket");
    for o in &objects {
        let bytes = store.get(&o.location).await.expect("get").bytes().await.expect("bytes");
        let path = dir.join(o.location.as_ref());
        std::fs::create_dir_all(path.parent().expect("a folder")).expect("mkdir");
        std::fs::write(&path, &bytes).expect("write");
    }
    objects.len()
}

/// The variables that point the sink at the stack's S3 server (moto takes any
/// key and secret).
fn moto_env(s3: &str) -> [(&'static str, &str); 5] {
    [
        ("AWS_ENDPOINT", s3),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", "tickpipe"),
        ("AWS_SECRET_ACCESS_KEY", "tickpipe"),
        ("AWS_REGION", "us-east-1"),
    ]
}

/// The lake the sink writes to `s3://<bucket>/lake` on the stack's S3 server,
/// read with the same credentials as [`moto_env`].
fn moto_lake(s3: &str, bucket: &str) -> object_store::prefix::PrefixStore<object_store::aws::AmazonS3> {
    let store = AmazonS3Builder::new()
        .with_endpoint(s3)
        .with_allow_http(true)
        .with_bucket_name(bucket)
        .with_access_key_id("tickpipe")
        .with_secret_access_key("tickpipe")
        .with_region("us-east-1")
        .build()
        .expect("s3 client");
    object_store::prefix::PrefixStore::new(store, "lake")
}

/// Creates `bucket` on the stack's S3 server.
async fn create_bucket(s3: &str, bucket: &str) {
    let made = reqwest::Client::new()
        .put(format!("{s3}/{bucket}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("the S3 server at {s3} (make stack-up): {e}"));
    assert!(made.status().is_success(), "create bucket: {}", made.status());
}

/// The sink process, killed if the test fails before it stops it.
struct LakeSink(Child);

impl Drop for LakeSink {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `lake-sink` binary on the local broker under `prefix`, writing to
/// `target` with small files, with `env` set; its warnings go to the test's
/// output.
fn lake_sink(prefix: &str, target: &str, env: &[(&str, &str)]) -> LakeSink {
    let mut cmd = common::quiet_service(env!("CARGO_BIN_EXE_lake-sink"), &stack::kafka_brokers(), prefix);
    cmd.env("TICKPIPE_LAKE_SINK_TARGET", target)
        .env("TICKPIPE_LAKE_SINK_TOPICS", "trades")
        .env("TICKPIPE_LAKE_SINK_GROUP", format!("{prefix}lake"))
        .env("TICKPIPE_LAKE_SINK_FILE_MAX_SECS", "1")
        .env("TICKPIPE_LAKE_SINK_METRICS_ADDR", "off")
        .env("TICKPIPE_LAKE_SINK_BATCH_WAIT_MS", "50")
        .envs(env.iter().copied())
        .stderr(Stdio::inherit());
    LakeSink(cmd.spawn().expect("start lake-sink"))
}

/// Stops the sink with SIGTERM and waits for it to exit cleanly.
fn terminate(mut sink: LakeSink) {
    let pid = sink.0.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let status = sink.0.wait().expect("wait");
    assert!(status.success(), "lake-sink exited with {status}");
}

/// Waits until `store` holds files of `want` rows in all (by their names).
async fn wait_for_filed(store: &dyn ObjectStore, want: usize, secs: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let objects: Vec<_> = store.list(None).try_collect().await.unwrap_or_default();
        let rows: i64 = objects
            .iter()
            .filter_map(|o| o.location.filename().and_then(FileName::parse))
            .map(|f| f.last - f.first + 1)
            .sum();
        // The names count offsets; the rows themselves are checked after.
        if rows as usize >= want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{rows} offsets filed, want {want}, after {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_lands_in_s3() {
    let Some(trades) = common::recorded_trades() else {
        return;
    };
    let prefix = setup("lakecloud").await;
    publish(&Topic::Trades.name(&prefix), &encoded(&trades)).await;
    let bucket = stack::unique_name("lake").replace('_', "-");

    // The bucket is made first.
    let s3 = stack::s3_endpoint();
    create_bucket(&s3, &bucket).await;
    let sink = lake_sink(&prefix, &format!("s3://{bucket}/lake"), &moto_env(&s3));
    let store = moto_lake(&s3, &bucket);
    wait_for_filed(&store, trades.len(), 300).await;
    terminate(sink);
    let dir = tempdir("lake-s3");
    assert!(download(&store, &dir).await > 1);
    assert_lake_holds(&dir, &trades);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_during_a_million_records_loses_nothing_and_duplicates_nothing() {
    let Some(data) = stack::real_data("binance_ws_raw_2024-08-08") else {
        return;
    };
    let trades = real::repeated_spot_trades_over(&data, 1_000_000, &real::SPOT_SYMBOLS);
    let prefix = setup("lakekill").await;
    let dir = tempdir("lake-kill");
    let target = dir.display().to_string();
    let topic = Topic::Trades.name(&prefix);

    // The load is published while the sink is killed again and again.
    let records = Arc::new(encoded(&trades));
    let publishing = {
        let (topic, records) = (topic.clone(), records.clone());
        tokio::spawn(async move { publish(&topic, &records).await })
    };
    let (mut kills, mut killed_while_writing, mut filed) = (0, 0, 0);
    let mut rng = rand::rng();
    // Static membership: a restarted sink takes the partitions back at once,
    // without waiting for the killed one's session to expire.
    let env = [
        ("TICKPIPE_LAKE_SINK_FILE_MAX_MIB", "1"),
        ("TICKPIPE_LAKE_SINK_INSTANCE_ID", "lake-1"),
    ];
    while kills < 12 {
        let mut sink = lake_sink(&prefix, &target, &env);
        let wait = rng.random_range(500..4_000);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        sink.0.kill().expect("SIGKILL");
        sink.0.wait().expect("wait");
        kills += 1;
        // Whatever the moment, every file the lake lists is whole.
        assert_every_file_reads(&dir);
        let rows = lake_rows(&dir);
        if rows > filed {
            killed_while_writing += 1;
        }
        filed = rows;
    }
    assert!(
        killed_while_writing >= 3,
        "only {killed_while_writing} of {kills} killed sinks had written files"
    );
    publishing.await.expect("join");
    let sink = lake_sink(&prefix, &target, &env);
    let (d, n) = (dir.clone(), trades.len());
    tokio::task::spawn_blocking(move || wait_for_rows(&d, n, 600))
        .await
        .expect("join");
    terminate(sink);
    assert_lake_holds_each_once(&dir, &trades);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every Parquet file under `dir` reads to its end (DuckDB fails on a
/// partial file), is named as the sink names them, and holds no more rows
/// than its name's offsets.
fn assert_every_file_reads(dir: &Path) {
    if !dir.join("raw/trades").is_dir() {
        return;
    }
    let rows = duckdb(&format!(
        "SELECT filename, COUNT(*) FROM {} GROUP BY filename",
        raw_trades(dir)
    ));
    for r in rows {
        let name = PathBuf::from(cell(&r, 0));
        let name = name.file_name().and_then(|n| n.to_str()).expect("a name");
        let f = FileName::parse(name).unwrap_or_else(|| panic!("{name}: not a lake file"));
        let rows: i64 = cell(&r, 1).parse().expect("a count");
        assert!(rows >= 1 && rows <= f.last - f.first + 1, "{name}: {rows} rows");
    }
}

/// The million-record check, in SQL: the count, one row per offset and per
/// trade identity, and the sums.
fn assert_lake_holds_each_once(dir: &Path, trades: &[Trade]) {
    let lake = raw_trades(dir);
    let row = &duckdb(&format!(
        "SELECT COUNT(*), COUNT(DISTINCT (kafka_partition, kafka_offset)), \
         COUNT(DISTINCT (symbol, trade_id)), SUM(trade_id), SUM(quantity) FROM {lake}"
    ))[0];
    let n = trades.len();
    assert_eq!(cell(row, 0), n.to_string(), "rows");
    assert_eq!(cell(row, 1), n.to_string(), "distinct offsets");
    let distinct: BTreeSet<(&str, i64)> = trades.iter().map(|t| (t.symbol.as_str(), t.trade_id)).collect();
    assert_eq!(cell(row, 2), distinct.len().to_string(), "distinct trades");
    let ids: i128 = trades.iter().map(|t| i128::from(t.trade_id)).sum();
    assert_eq!(cell(row, 3), ids.to_string(), "sum of ids");
    let quantity: Decimal = trades.iter().map(|t| t.quantity).sum();
    assert_eq!(decimal(&cell(row, 4)), quantity.normalize(), "sum of quantities");
}

/// The rows `sql` answers in PostgreSQL, every value as text.
async fn pg_rows(client: &tokio_postgres::Client, sql: &str) -> Vec<Vec<Option<String>>> {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
            }
            _ => None,
        })
        .collect()
}

/// Rows as PostgreSQL's text and DuckDB's (through Python) compare: decimals
/// as normalised numbers, booleans as `true` and `false`, NULL as empty.
fn normalised(rows: Vec<Vec<Option<String>>>) -> BTreeSet<Vec<String>> {
    rows.into_iter()
        .map(|r| {
            r.into_iter()
                .map(|c| {
                    let c = c.unwrap_or_default();
                    match c.as_str() {
                        "t" | "True" => return "true".to_owned(),
                        "f" | "False" => return "false".to_owned(),
                        _ => {}
                    }
                    match Decimal::from_str_exact(&c) {
                        Ok(d) if c.contains('.') => d.normalize().to_string(),
                        _ => c,
                    }
                })
                .collect()
        })
        .collect()
}

/// Fails with the first rows that only one side has.
fn assert_same(what: &str, pg: &BTreeSet<Vec<String>>, lake: &BTreeSet<Vec<String>>) {
    assert!(
        pg == lake,
        "{what}: {} rows, {} in the lake; only in PostgreSQL: {:?}; only in the lake: {:?}",
        pg.len(),
        lake.len(),
        pg.difference(lake).next(),
        lake.difference(pg).next()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recordings_replayed_through_the_producer_read_the_same_in_the_lake_as_in_postgres() {
    let Some(xrp) = stack::real_data("binance_spot_xrpeth_2019-10-11") else {
        return;
    };
    let Some(klines) = stack::real_data("binance_vision_format_samples") else {
        return;
    };
    let common::Fresh { brokers, prefix, url } = common::Fresh::create("lakepg").await;
    let replay = common::quiet_service(stack::workspace_binary("producer"), &brokers, &prefix)
        .args(["--metrics-addr", "off", "replay"])
        .arg(xrp.join("XRPETH-aggTrades-2019-10-11_2019-10-13.csv"))
        .args(["ADABTC-1m-2021-11-27.csv", "ADABTC-1m-2021-11-28.csv"].map(|f| klines.join(f)))
        .status()
        .expect("producer replay");
    assert!(replay.success(), "producer replay: {replay}");
    let trades = kafka::read_topic(&brokers, &Topic::Trades.name(&prefix)).len();
    let candles = kafka::read_topic(&brokers, &Topic::Candles.name(&prefix)).len();
    assert!(
        trades > 10_000 && candles >= 20,
        "{trades} trades, {candles} candles replayed"
    );

    let topics = [Topic::Trades, Topic::Candles];
    let dir = tempdir("lake-pg");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let pg = tokio::spawn(tickpipe_consumers::pg::sink::run(
        common::quick_pg_config(&prefix, &topics, &url),
        until(stopped.clone()),
    ));
    let lake = tokio::spawn(run(
        LakeSinkConfig {
            sink: common::quick_settings(&prefix, &topics, &format!("{prefix}lake")),
            ..quick_config(&prefix, &dir)
        },
        until(stopped.clone()),
    ));
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("postgres");
    tokio::spawn(connection);
    let d = dir.clone();
    tokio::task::spawn_blocking(move || wait_for_rows(&d, trades, 300))
        .await
        .expect("join");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while common::pg_count(&client, "SELECT count(*) FROM trades").await < trades as i64 {
        assert!(tokio::time::Instant::now() < deadline, "postgres-sink is behind");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = stop.send(true);
    pg.await.expect("join").expect("postgres-sink");
    lake.await.expect("join").expect("lake-sink");

    // Trades, row for row.
    let lake_trades = raw_trades(&dir);
    let columns = "venue, symbol, kind, trade_id, price, quantity, buyer_is_maker, first_trade_id, last_trade_id";
    let in_pg = normalised(pg_rows(&client, &format!("SELECT {columns} FROM trades")).await);
    let in_lake = normalised(duckdb(&format!("SELECT {columns} FROM {lake_trades}")));
    assert_eq!(in_pg.len(), trades);
    assert_same("trades", &in_pg, &in_lake);
    // DuckDB's sums equal PostgreSQL's.
    let sums = "SELECT symbol, count(*), sum(trade_id), sum(price), sum(quantity) FROM";
    let pg_sums = normalised(pg_rows(&client, &format!("{sums} trades GROUP BY symbol")).await);
    let lake_sums = normalised(duckdb(&format!("{sums} {lake_trades} GROUP BY symbol")));
    assert_same("sums per symbol", &pg_sums, &lake_sums);

    // Candles: the lake keeps every version; its newest per candle is
    // PostgreSQL's row.
    let columns = "venue, symbol, \"interval\", origin, open, high, low, close, volume, quote_volume, \
                   trade_count, taker_buy_base_volume, taker_buy_quote_volume, closed";
    let in_pg = normalised(pg_rows(&client, &format!("SELECT {columns} FROM candles")).await);
    let newest = format!(
        "SELECT {columns} FROM (SELECT *, row_number() OVER (PARTITION BY venue, symbol, \"interval\", origin, \
         open_time ORDER BY kafka_offset DESC) AS version FROM read_parquet('{}/raw/candles/*/*/*.parquet', \
         hive_partitioning = true)) WHERE version = 1",
        dir.display()
    );
    let in_lake = normalised(duckdb(&newest));
    assert_eq!(in_pg.len(), candles, "one version of each candle replayed");
    assert_same("newest candles", &in_pg, &in_lake);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The status `/readyz` answers at `addr`, 0 while nothing answers.
async fn readyz(addr: std::net::SocketAddr) -> u16 {
    reqwest::get(format!("http://{addr}/readyz"))
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Waits until `/readyz` at `addr` answers `want`.
async fn wait_for_readyz(addr: std::net::SocketAddr, want: u16, secs: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let got = readyz(addr).await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz answered {got}, want {want}, after {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_refuses_shows_on_readyz_and_the_files_come_once_it_answers() {
    let Some(trades) = common::recorded_trades() else {
        return;
    };
    let trades = &trades[..2_000];
    let prefix = setup("lakeoutage").await;
    publish(&Topic::Trades.name(&prefix), &encoded(trades)).await;
    // The bucket does not exist yet: every listing and upload is refused.
    let s3 = stack::s3_endpoint();
    let bucket = stack::unique_name("later").replace('_', "-");
    let metrics = stack::free_loopback_addr();
    let addr = metrics.to_string();
    let mut env = moto_env(&s3).to_vec();
    env.extend([
        ("TICKPIPE_LAKE_SINK_METRICS_ADDR", addr.as_str()),
        ("TICKPIPE_LAKE_SINK_MAX_BACKOFF_MS", "300"),
    ]);
    let sink = lake_sink(&prefix, &format!("s3://{bucket}/lake"), &env);
    // The refusals are counted as upload retries, and meanwhile the sink is
    // not ready.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let retried = stack::scrape(metrics)
            .await
            .lines()
            .find_map(|l| {
                l.strip_prefix("tickpipe_lake_sink_upload_retries_total ")?
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(0.0);
        if retried >= 2.0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no upload retried after 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(readyz(metrics).await, 503, "/readyz while the store refuses");

    create_bucket(&s3, &bucket).await;
    wait_for_readyz(metrics, 200, 60).await;
    let store = moto_lake(&s3, &bucket);
    wait_for_filed(&store, trades.len(), 120).await;
    terminate(sink);
    let dir = tempdir("lake-outage");
    download(&store, &dir).await;
    assert_lake_holds(&dir, trades);
    let _ = std::fs::remove_dir_all(&dir);
}
