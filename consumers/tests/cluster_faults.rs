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
//!
//! `three_sinks_in_one_group_killed_restarted_and_added_write_every_trade_once`:
//! up to three `postgres-sink` instances in one group while 1,000,000 trades
//! of eight symbols flow; at ten random moments (a seeded generator, the seed
//! in the output) an instance is added, killed with SIGKILL or started again:
//! every trade is in PostgreSQL once and the stored positions are the ends.
//!
//! `two_bigquery_sinks_killed_and_restarted_leave_every_trade_once_in_the_view`:
//! two `bigquery-sink` instances in one group, one killed and started again at
//! random moments, against the emulator: every trade once in the view.

mod common;

use common::{bq_count, pg_count as count};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use tickpipe_consumers::bq::client::{Auth, BigQuery, Endpoint};
use tickpipe_schemas::Trade;
use tickpipe_testkit::cluster::KafkaCluster;
use tickpipe_testkit::{kafka, real, stack};
use tokio_postgres::{Client, NoTls};

const TRADES: usize = 500_000;
const GROUP_TRADES: usize = 1_000_000;

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

/// What every test here starts with: a three-node cluster, a topic prefix of
/// its own and the environment every process of the test shares.
struct Run {
    cluster: KafkaCluster,
    brokers: String,
    prefix: String,
    common: Vec<(&'static str, String)>,
}

impl Run {
    fn start(name: &str, partitions: u32) -> Self {
        let cluster = KafkaCluster::start(3);
        let brokers = cluster.bootstrap();
        let prefix = format!("{}.", stack::unique_name(name));
        let common = vec![
            ("TICKPIPE_KAFKA_BROKERS", brokers.clone()),
            ("TICKPIPE_TOPIC_PREFIX", prefix.clone()),
            ("TICKPIPE_TOPIC_PARTITIONS", partitions.to_string()),
        ];
        Run {
            cluster,
            brokers,
            prefix,
            common,
        }
    }

    fn trades_topic(&self) -> String {
        format!("{}trades", self.prefix)
    }

    /// The environment of a sink: the shared one, then `own`.
    fn env(&self, own: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
        self.common.iter().chain(own).cloned().collect()
    }

    /// `postgres-sink`'s environment, writing into `url`.
    fn postgres_env(&self, url: &str) -> Vec<(&'static str, String)> {
        self.env(&[
            ("TICKPIPE_POSTGRES_URL", url.to_owned()),
            ("TICKPIPE_POSTGRES_SINK_GROUP", format!("{}pg", self.prefix)),
            ("TICKPIPE_POSTGRES_SINK_METRICS_ADDR", "off".to_owned()),
            ("TICKPIPE_POSTGRES_SINK_SESSION_TIMEOUT_MS", "6000".to_owned()),
        ])
    }

    /// The producer replaying `files` as fast as it can.
    fn replay(&self, files: &[PathBuf]) -> Service {
        let mut args = vec!["--metrics-addr", "off", "replay", "--venue", "binance"];
        let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        args.extend(names.iter().map(String::as_str));
        Service::start("producer", &args, &self.common)
    }
}

/// A fresh database and a client of it.
async fn database(name: &str) -> (String, Client) {
    let url = stack::fresh_database(name).await;
    let (client, conn) = tokio_postgres::connect(&url, NoTls).await.expect("postgres");
    tokio::spawn(conn);
    (url, client)
}

/// The generator of a test's random moments, seeded by `TICKPIPE_TEST_SEED`
/// or at random (the seed printed either way).
fn seeded_rng() -> rand::rngs::StdRng {
    let seed: u64 = std::env::var("TICKPIPE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("seed {seed} (TICKPIPE_TEST_SEED={seed} runs the same moments again)");
    rand::rngs::StdRng::seed_from_u64(seed)
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
    let expected = summary(&trades);
    let files = csv_files(&trades);

    let mut run = Run::start("cluster", 3);
    let (brokers, topic) = (run.brokers.clone(), run.trades_topic());
    let (url, client) = database("cluster_leader").await;
    let sink = Service::start("postgres-sink", &[], &run.postgres_env(&url));
    let mut producer = run.replay(&files);

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
    run.cluster.kill(leader as u32);
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
    run.cluster.restart(leader as u32);

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
    check_written(&client, &topic, &expected, TRADES).await;
    drop(sink);
}

/// Per symbol: how many trades, the lowest and the highest id.
type Summary = BTreeMap<String, (i64, i64, i64)>;

fn summary(trades: &[Trade]) -> Summary {
    let mut out = Summary::new();
    for t in trades {
        let e = out.entry(t.symbol.clone()).or_insert((0, i64::MAX, i64::MIN));
        *e = (e.0 + 1, e.1.min(t.trade_id), e.2.max(t.trade_id));
    }
    out
}

/// The sum of the sinks' stored positions of `topic`.
async fn stored_positions(client: &Client, topic: &str) -> i64 {
    count(
        client,
        &format!("SELECT coalesce(sum(next_offset), 0)::bigint FROM sink_offsets WHERE topic = '{topic}'"),
    )
    .await
}

/// PostgreSQL holds every trade once, no dead letter, and the sinks' stored
/// positions of `topic` add up to the `n` records it holds.
async fn check_written(client: &Client, topic: &str, expected: &Summary, n: usize) {
    let rows = client
        .query(
            "SELECT symbol, count(*), count(DISTINCT trade_id), min(trade_id), max(trade_id) \
             FROM trades GROUP BY symbol ORDER BY symbol",
            &[],
        )
        .await
        .expect("trades");
    let got: Summary = rows
        .iter()
        .map(|r| {
            let n: i64 = r.get(1);
            let distinct: i64 = r.get(2);
            assert_eq!(n, distinct, "{}: a trade twice", r.get::<_, String>(0));
            (r.get(0), (n, r.get(3), r.get(4)))
        })
        .collect();
    assert_eq!(&got, expected);
    assert_eq!(
        stored_positions(client, topic).await,
        n as i64,
        "the sinks' stored positions are the partitions' ends"
    );
    let dead = count(client, "SELECT count(*) FROM dead_letters").await;
    assert_eq!(dead, 0, "no trade is a dead letter");
}

/// Polls until `written` trades are in PostgreSQL, or fails after `secs` with
/// what `context` says.
async fn wait_written(client: &Client, written: i64, secs: u64, context: impl Fn(i64) -> String) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let now = count(client, "SELECT count(*) FROM trades").await;
        if now >= written {
            return;
        }
        assert!(Instant::now() < deadline, "after {secs} s: {}", context(now));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sinks_in_one_group_killed_restarted_and_added_write_every_trade_once() {
    let Some(dir) = stack::real_data("binance_ws_raw_2024-08-08") else {
        return;
    };
    let trades = real::repeated_spot_trades_over(&dir, GROUP_TRADES, &real::SPOT_SYMBOLS);
    let expected = summary(&trades);
    let files = csv_files(&trades);
    let mut rng = seeded_rng();
    let run = Run::start("group", 6);
    let (brokers, topic) = (run.brokers.clone(), run.trades_topic());
    let (url, client) = database("cluster_group").await;
    let mut sink_env = run.postgres_env(&url);
    sink_env.push(("TICKPIPE_POSTGRES_SINK_BATCH_MAX", "5000".to_owned()));
    let start_sink = || Service::start("postgres-sink", &[], &sink_env);
    let mut sinks: Vec<Option<Service>> = vec![Some(start_sink()), None, None];
    let mut producer = run.replay(&files);

    // Ten moments spread over the stream, each at a random point of its
    // slot: an instance added while fewer than three run, else one killed
    // (SIGKILL) or one killed before started again.
    let slot = GROUP_TRADES as i64 / 12;
    let moments: Vec<i64> = (0..10)
        .map(|i| slot * (i + 1) + rng.random_range(0..slot / 2))
        .collect();
    let mut events: Vec<String> = Vec::new();
    for at in moments {
        wait_written(&client, at, 180, |now| {
            format!("{now} written, waiting for {at}; events so far {events:?}")
        })
        .await;
        let written = count(&client, "SELECT count(*) FROM trades").await;
        let running: Vec<usize> = (0..3).filter(|i| sinks[*i].is_some()).collect();
        let stopped: Vec<usize> = (0..3).filter(|i| sinks[*i].is_none()).collect();
        if running.len() > 1 && (stopped.is_empty() || rng.random_bool(0.5)) {
            let i = running[rng.random_range(0..running.len())];
            sinks[i] = None;
            events.push(format!("{written}: killed {i}"));
        } else {
            let i = stopped[rng.random_range(0..stopped.len())];
            sinks[i] = Some(start_sink());
            events.push(format!("{written}: started {i}"));
        }
    }
    eprintln!("events: {events:?}");
    assert!(events.iter().any(|e| e.contains("killed")), "{events:?}");

    let (status, log) = tokio::task::spawn_blocking(move || (producer.child.wait(), producer.log_tail()))
        .await
        .expect("join");
    assert!(status.is_ok_and(|s| s.success()), "the producer failed: {log}");
    wait_written(&client, GROUP_TRADES as i64, 300, |now| {
        let logs: Vec<String> = sinks.iter().flatten().map(Service::log_tail).collect();
        format!(
            "{now} of {GROUP_TRADES} trades written (events {events:?}); the sinks' logs end:\n{}",
            logs.join("\n---\n")
        )
    })
    .await;
    let consumer: BaseConsumer = kafka::reader_config(&brokers).create().expect("consumer");
    let parts = partitions(&consumer, &topic);
    assert!(
        parts.iter().filter(|p| p.2 > 0).count() >= 4,
        "the trades fill most partitions: {parts:?}"
    );
    assert_eq!(parts.iter().map(|p| p.2).sum::<i64>(), GROUP_TRADES as i64);
    // The rows of a batch and its positions commit together: once every row
    // is there, so are the positions.
    check_written(&client, &topic, &expected, GROUP_TRADES).await;
    drop(run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_bigquery_sinks_killed_and_restarted_leave_every_trade_once_in_the_view() {
    const N: usize = 60_000;
    let Some(dir) = stack::real_data("binance_ws_raw_2024-08-08") else {
        return;
    };
    let trades = real::repeated_spot_trades_over(&dir, N, &real::SPOT_SYMBOLS);
    let files = csv_files(&trades);
    let mut rng = seeded_rng();
    let run = Run::start("bqgroup", 6);
    let dataset = stack::unique_name("bqgroup");
    let project = stack::bigquery_project();
    let bq = BigQuery::connect(
        Endpoint {
            api_url: stack::bigquery_rest_url(),
            project: project.clone(),
            auth: Auth::None,
        },
        None,
    )
    .await
    .unwrap_or_else(|e| panic!("the BigQuery emulator (make stack-up): {e}"));
    let sink_env = run.env(&[
        ("TICKPIPE_BIGQUERY_EMULATOR", stack::bigquery_rest_url()),
        ("TICKPIPE_BIGQUERY_PROJECT", project.clone()),
        ("TICKPIPE_BIGQUERY_DATASET", dataset.clone()),
        ("TICKPIPE_BIGQUERY_SINK_GROUP", format!("{}bq", run.prefix)),
        ("TICKPIPE_BIGQUERY_SINK_METRICS_ADDR", "off".to_owned()),
        ("TICKPIPE_BIGQUERY_SINK_SESSION_TIMEOUT_MS", "6000".to_owned()),
        ("TICKPIPE_BIGQUERY_SINK_BATCH_WAIT_MS", "100".to_owned()),
    ]);
    let start_sink = || Service::start("bigquery-sink", &[], &sink_env);
    let mut sinks: Vec<Option<Service>> = vec![Some(start_sink()), Some(start_sink())];
    let mut producer = run.replay(&files);

    // Raw rows, which kills may have written twice, and the view, which keeps
    // one row per Kafka coordinate.
    let raw = format!("SELECT COUNT(*) FROM `{project}.{dataset}.trades_raw`");
    let view = format!("SELECT COUNT(*) FROM `{project}.{dataset}.trades`");
    // Four moments at random points of their slots: one of the two killed,
    // or the killed one started again.
    let slot = N as i64 / 6;
    let moments: Vec<i64> = (0..4).map(|i| slot * (i + 1) + rng.random_range(0..slot / 2)).collect();
    let mut events: Vec<String> = Vec::new();
    for at in moments {
        let deadline = Instant::now() + Duration::from_secs(180);
        let written = loop {
            let written = bq_count(&bq, &raw).await;
            if written >= at {
                break written;
            }
            assert!(
                Instant::now() < deadline,
                "{written} raw rows, waiting for {at}, after 180 s; events so far {events:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        match (0..2).find(|i| sinks[*i].is_none()) {
            Some(i) => {
                sinks[i] = Some(start_sink());
                events.push(format!("{written}: started {i}"));
            }
            None => {
                let i = rng.random_range(0..2);
                sinks[i] = None;
                events.push(format!("{written}: killed {i}"));
            }
        }
    }
    eprintln!("events: {events:?}");
    let (status, log) = tokio::task::spawn_blocking(move || (producer.child.wait(), producer.log_tail()))
        .await
        .expect("join");
    assert!(status.is_ok_and(|s| s.success()), "the producer failed: {log}");
    // Both run to the end.
    for s in sinks.iter_mut().filter(|s| s.is_none()) {
        *s = Some(start_sink());
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let rows = bq_count(&bq, &view).await;
        if rows >= N as i64 {
            break;
        }
        let logs: Vec<String> = sinks.iter().flatten().map(Service::log_tail).collect();
        assert!(
            Instant::now() < deadline,
            "{rows} of {N} trades in the view after 300 s (events {events:?}); the sinks' logs end:\n{}",
            logs.join("\n---\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let distinct = bq_count(
        &bq,
        &format!(
            "SELECT COUNT(DISTINCT CONCAT(symbol, ':', CAST(trade_id AS STRING))) FROM `{project}.{dataset}.trades`"
        ),
    )
    .await;
    assert_eq!(distinct, N as i64, "every trade once in the view");
    assert_eq!(bq_count(&bq, &view).await, N as i64, "no trade twice in the view");
    drop(sinks);
    drop(run);
}
