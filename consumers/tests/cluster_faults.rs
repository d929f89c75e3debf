//! Cluster faults on a three-node Apache Kafka cluster (KRaft, every node
//! broker and controller) started by the test: topics with replication factor
//! 3 and `min.insync.replicas=2`, the producer and the sinks as processes.
//!
//! `the_trades_leader_killed_mid_stream_loses_and_duplicates_nothing`: kill -9
//! of the node leading the busiest `trades` partition while the producer replays
//! 500,000 real-shaped trades and `postgres-sink` writes them, then the node
//! comes back: the topic holds every trade once (the idempotent producer's
//! retries to the new leaders add no copy), PostgreSQL holds every trade once,
//! and the sink's stored positions are the partitions' ends.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use tickpipe_schemas::Trade;
use tickpipe_testkit::cluster::KafkaCluster;
use tickpipe_testkit::{kafka, real, stack};
use tokio_postgres::{Client, NoTls};

const TRADES: usize = 500_000;

/// A service process, killed if the test fails while it runs; its log kept
/// for the failure message.
struct Service {
    child: Child,
    log: PathBuf,
}

impl Service {
    fn start(name: &str, args: &[&str], envs: &[(&str, String)]) -> Self {
        let log = std::env::temp_dir().join(format!("{}.log", stack::unique_name(name)));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(stack::workspace_binary(name))
            .args(args)
            .env("RUST_LOG", "warn")
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        Service { child, log }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The trades as data.binance.vision trade CSVs, one file per symbol.
fn csv_files(trades: &[Trade]) -> Vec<PathBuf> {
    let dir = std::env::temp_dir().join(stack::unique_name("cluster-replay"));
    std::fs::create_dir_all(&dir).expect("replay folder");
    let mut files: BTreeMap<String, std::io::BufWriter<std::fs::File>> = BTreeMap::new();
    for t in trades {
        let f = files.entry(t.symbol.clone()).or_insert_with(|| {
            let path = dir.join(format!("{}-trades-2024-08-08.csv", t.symbol));
            std::io::BufWriter::new(std::fs::File::create(path).expect("csv"))
        });
        writeln!(
            f,
            "{},{},{},0,{},{},True",
            t.trade_id,
            t.price,
            t.quantity,
            t.event_time / 1000,
            if t.buyer_is_maker { "True" } else { "False" }
        )
        .expect("csv line");
    }
    for f in files.values_mut() {
        f.flush().expect("flush");
    }
    files
        .keys()
        .map(|s| dir.join(format!("{s}-trades-2024-08-08.csv")))
        .collect()
}

/// Each partition of `topic`: its id, leader, end and number of replicas.
fn partitions(consumer: &BaseConsumer, topic: &str) -> Vec<(i32, i32, i64, usize)> {
    let meta = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    meta.topics()
        .iter()
        .flat_map(|t| t.partitions())
        .map(|p| {
            let end = consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .map_or(-1, |w| w.1);
            (p.id(), p.leader(), end, p.replicas().len())
        })
        .collect()
}

async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.map_or(0, |r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trades_leader_killed_mid_stream_loses_and_duplicates_nothing() {
    let Some(dir) = stack::real_data("binance_ws_raw_2024-08-08") else {
        return;
    };
    // Whole milliseconds, as the CSVs carry them.
    let trades: Vec<Trade> = real::repeated_spot_trades(&dir, TRADES)
        .into_iter()
        .map(|t| Trade {
            event_time: t.event_time / 1000 * 1000,
            ..t
        })
        .collect();
    let mut expected: BTreeMap<String, (i64, i64, i64)> = BTreeMap::new();
    for t in &trades {
        let e = expected.entry(t.symbol.clone()).or_insert((0, i64::MAX, i64::MIN));
        *e = (e.0 + 1, e.1.min(t.trade_id), e.2.max(t.trade_id));
    }
    let files = csv_files(&trades);

    let mut cluster = KafkaCluster::start(3);
    let brokers = cluster.bootstrap();
    let prefix = format!("{}.", stack::unique_name("cluster"));
    let topic = format!("{prefix}trades");
    let url = stack::fresh_database("cluster_leader").await;
    let (client, conn) = tokio_postgres::connect(&url, NoTls).await.expect("postgres");
    tokio::spawn(conn);

    let common = [
        ("TICKPIPE_KAFKA_BROKERS", brokers.clone()),
        ("TICKPIPE_TOPIC_PREFIX", prefix.clone()),
        ("TICKPIPE_TOPIC_PARTITIONS", "3".to_owned()),
    ];
    let mut sink_env = common.to_vec();
    sink_env.extend([
        ("TICKPIPE_POSTGRES_URL", url.clone()),
        ("TICKPIPE_POSTGRES_SINK_GROUP", format!("{prefix}pg")),
        ("TICKPIPE_POSTGRES_SINK_METRICS_ADDR", "off".to_owned()),
        ("TICKPIPE_POSTGRES_SINK_SESSION_TIMEOUT_MS", "6000".to_owned()),
    ]);
    let sink = Service::start("postgres-sink", &[], &sink_env);
    let mut args = vec!["--metrics-addr", "off", "replay", "--venue", "binance"];
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    args.extend(names.iter().map(String::as_str));
    let mut producer = Service::start("producer", &args, &common);

    // The kill lands while the producer publishes and the sink writes.
    let consumer: BaseConsumer = kafka::reader_config(&brokers).create().expect("consumer");
    let deadline = Instant::now() + Duration::from_secs(180);
    let (leader, published_at_kill) = loop {
        let parts = partitions(&consumer, &topic);
        let published: i64 = parts.iter().map(|p| p.2.max(0)).sum();
        if parts.len() == 3 && published >= TRADES as i64 / 5 {
            // The leader of the partition taking the most trades (the key is
            // the symbol: two symbols fill one or two partitions).
            let busiest = parts.iter().max_by_key(|p| p.2).expect("a partition");
            break (busiest.1, published);
        }
        assert!(
            Instant::now() < deadline,
            "the producer published {published} trades in 180 s; its log ends:\n{}",
            producer.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        partitions(&consumer, &topic).iter().all(|p| p.3 == 3),
        "the producer's topics take the cluster's replication factor"
    );
    cluster.kill(leader as u32);
    let written_at_kill = count(&client, "SELECT count(*) FROM trades").await;
    assert!(
        published_at_kill < TRADES as i64 && written_at_kill < TRADES as i64,
        "the kill must land mid-stream: {published_at_kill} published, {written_at_kill} written of {TRADES}"
    );

    // Both go on without the node: new leaders, the ISR of two.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let written = count(&client, "SELECT count(*) FROM trades").await;
        if written >= written_at_kill + TRADES as i64 / 10 || written == TRADES as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no progress without node {leader}: {written} written (was {written_at_kill}); \
             the sink's log ends:\n{}\nthe producer's:\n{}",
            sink.log_tail(),
            producer.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.restart(leader as u32);

    let status = tokio::task::spawn_blocking(move || {
        let status = producer.child.wait().expect("producer");
        (status, producer.log_tail())
    })
    .await
    .expect("join");
    assert!(status.0.success(), "the producer failed: {}", status.1);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let written = count(&client, "SELECT count(*) FROM trades").await;
        if written >= TRADES as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{written} of {TRADES} trades written after 300 s; the sink's log ends:\n{}",
            sink.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The topic: every trade once (nothing the producer retried twice).
    let parts = partitions(&consumer, &topic);
    let ends: i64 = parts.iter().map(|p| p.2).sum();
    assert_eq!(ends, TRADES as i64, "records in {topic}: {parts:?}");
    // PostgreSQL: every trade once, and the positions at the ends.
    let rows = client
        .query(
            "SELECT symbol, count(*), count(DISTINCT trade_id), min(trade_id), max(trade_id) \
             FROM trades GROUP BY symbol ORDER BY symbol",
            &[],
        )
        .await
        .expect("trades");
    let got: BTreeMap<String, (i64, i64, i64)> = rows
        .iter()
        .map(|r| {
            let n: i64 = r.get(1);
            let distinct: i64 = r.get(2);
            assert_eq!(n, distinct, "{}: a trade twice", r.get::<_, String>(0));
            (r.get(0), (n, r.get(3), r.get(4)))
        })
        .collect();
    assert_eq!(got, expected);
    let stored = count(
        &client,
        &format!("SELECT coalesce(sum(next_offset), 0)::bigint FROM sink_offsets WHERE topic = '{topic}'"),
    )
    .await;
    assert_eq!(
        stored, TRADES as i64,
        "the sink's stored positions are the partitions' ends"
    );
    let dead = count(&client, "SELECT count(*) FROM dead_letters").await;
    assert_eq!(dead, 0, "no trade is a dead letter");
    drop(sink);
}
