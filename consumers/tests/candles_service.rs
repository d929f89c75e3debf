//! The `candles` service through the real broker: it publishes exactly the
//! candles the pure builder makes from the same trades, killing it with
//! SIGKILL at any moment neither drops nor double-counts a trade, and a
//! standby takes over from an active instance that dies.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::process::{Child, Command};
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use tickpipe_consumers::candles::service::{rebaseline, run, ServiceConfig, ServiceError};
use tickpipe_consumers::candles::{state, CandleBuilder, CandleConfig, Output};
use tickpipe_consumers::ops::now_micros;
use tickpipe_kafka::consumer_config;
use tickpipe_kafka::{ensure_topics, ensure_topics_configured, producer_config};
use tickpipe_schemas::{Candle, Codec, Record, Topic, Trade, WriteFraming};
use tickpipe_testkit::stack::wait_metric;
use tickpipe_testkit::{kafka, real, stack};

type Key = (String, i64);

fn candle_config() -> CandleConfig {
    CandleConfig {
        intervals: vec!["1m".parse().unwrap(), "5m".parse().unwrap()],
        allowed_lateness: 0,
        fill_empty: true,
        max_fill: 100_000,
    }
}

/// The recorded XRPETH aggregate trades, or `None` (said loudly) without the data.
fn trades() -> Option<Vec<Trade>> {
    let dir = stack::real_data("binance_spot_xrpeth_2019-10-11")?;
    Some(real::agg_trades_csv(
        &dir.join("XRPETH-aggTrades-2019-10-11_2019-10-13.csv"),
        "XRPETH",
    ))
}

/// What a test on the recorded trades starts with: the trades, the candles
/// the pure builder makes of them, the local broker and a fresh topic prefix.
type Recorded = (Vec<Trade>, BTreeMap<Key, Candle>, String, String);

/// The [`Recorded`] start of the test `name` (its prefix named after it);
/// `None` (said loudly) without the data.
fn recorded(name: &str) -> Option<Recorded> {
    let trades = trades()?;
    let expected = expected(&trades);
    Some((
        trades,
        expected,
        stack::kafka_brokers(),
        format!("{}.", stack::unique_name(name)),
    ))
}

/// How many candle records the pure builder emits for the trades (versions
/// included): what a run without copies publishes.
fn expected_records(trades: &[Trade]) -> usize {
    let mut b = CandleBuilder::new(candle_config());
    let mut out = Vec::new();
    for t in trades {
        b.push(t, &mut out);
    }
    out.into_iter()
        .map(|o| b.resolve(o))
        .filter(|o| matches!(o, Output::Candle(_)))
        .count()
}

/// What the service must publish while streaming: the pure builder's candles.
fn expected(trades: &[Trade]) -> BTreeMap<Key, Candle> {
    let mut b = CandleBuilder::new(candle_config());
    let mut out = Vec::new();
    for t in trades {
        b.push(t, &mut out);
    }
    out.into_iter()
        .filter_map(|o| match b.resolve(o) {
            Output::Candle(c) => Some(((c.interval.clone(), c.open_time), c)),
            _ => None,
        })
        .collect()
}

async fn publish_trades(brokers: &str, prefix: &str, trades: &[Trade]) {
    ensure_topics(brokers, prefix, &Topic::ALL, 3, 1)
        .await
        .unwrap_or_else(|e| panic!("is the broker up? {e}"));
    let codec = Codec::new(WriteFraming::SingleObject);
    let producer: FutureProducer = producer_config(brokers).create().unwrap();
    let topic = Topic::Trades.name(prefix);
    let mut pending = Vec::new();
    for t in trades {
        let payload = codec.encode(t).unwrap();
        pending.push(
            producer
                .send_result(FutureRecord::to(&topic).key(&t.key()).payload(&payload))
                .unwrap(),
        );
    }
    for p in pending {
        p.await.unwrap().unwrap();
    }
}

/// Reads the candles topic; every distinct version seen per candle.
struct CandleReader {
    consumer: StreamConsumer,
    codec: Codec,
    versions: BTreeMap<Key, BTreeSet<String>>,
    latest: BTreeMap<Key, Candle>,
    records: usize,
}

impl CandleReader {
    fn new(brokers: &str, prefix: &str) -> Self {
        let consumer: StreamConsumer = consumer_config(brokers, &stack::unique_name("candle-reader"))
            .create()
            .unwrap();
        consumer.subscribe(&[&Topic::Candles.name(prefix)]).unwrap();
        CandleReader {
            consumer,
            codec: Codec::new(WriteFraming::SingleObject),
            versions: BTreeMap::new(),
            latest: BTreeMap::new(),
            records: 0,
        }
    }

    /// Reads until `done` holds, or fails after `secs`.
    async fn read_until(&mut self, secs: u64, what: &str, done: impl Fn(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        while !done(self) {
            let msg = match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Ok(m) => m.unwrap(),
                Err(_) => panic!(
                    "{what}: not reached within {secs} s ({} candle records read)",
                    self.records
                ),
            };
            let c: Candle = self.codec.decode(msg.payload().unwrap()).unwrap();
            assert_eq!(msg.key(), Some(c.key().as_bytes()));
            self.records += 1;
            let key = (c.interval.clone(), c.open_time);
            self.versions.entry(key.clone()).or_default().insert(format!("{c:?}"));
            self.latest.insert(key, c);
        }
    }

    fn complete(&self, expected: &BTreeMap<Key, Candle>) -> bool {
        self.latest.len() >= expected.len()
    }

    /// Every candle seen has exactly one content, the expected one.
    fn check(&self, expected: &BTreeMap<Key, Candle>) {
        assert_eq!(
            self.latest.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>()
        );
        for (key, want) in expected {
            let seen = &self.versions[key];
            assert_eq!(
                seen.len(),
                1,
                "{key:?}: {} different versions were published: {seen:#?}",
                seen.len()
            );
            assert_eq!(&self.latest[key], want, "{key:?}");
        }
    }
}

fn service_config(prefix: &str, group: &str) -> ServiceConfig {
    ServiceConfig {
        brokers: stack::kafka_brokers(),
        topic_prefix: prefix.to_owned(),
        candles: candle_config(),
        group: group.to_owned(),
        batch_max: 1000,
        batch_wait: Duration::from_millis(100),
        // Longer than the test: the state is stored once, when it stops.
        state_interval: Duration::from_secs(3600),
        lease_session_timeout: Duration::from_secs(6),
        instance_id: None,
        transactions: false,
        partitions: 3,
        replication: 1,
        metrics_addr: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_what_the_pure_builder_makes() {
    let Some((trades, expected, brokers, prefix)) = recorded("candles") else {
        return;
    };
    // One trade stamped 23 hours ahead of this clock (another writer's clock
    // or unit gone wrong) is a dead letter: it moves no watermark, or every
    // window up to then would close at once and every later trade of its
    // symbol would be late.
    let mut published = trades.clone();
    let mut ahead = trades[trades.len() / 2].clone();
    let now = now_micros();
    ahead.event_time = now + 23 * 3_600_000_000;
    published.insert(trades.len() / 2 + 1, ahead);
    publish_trades(&brokers, &prefix, &published).await;

    run_until_complete(service_config(&prefix, "candles-it"), &expected)
        .await
        .check(&expected);
    let state_topic = format!("{prefix}candles-state");
    assert_eq!(
        state_topic_cleanup(&brokers, &state_topic).await,
        "compact",
        "the state topic keeps only the newest snapshot per key"
    );
    // Many batches, one snapshot: the state is stored at the interval (here
    // longer than the run) and when the service stops, not after every batch.
    // It holds the position after the last trade (one symbol: one partition,
    // offsets 0 to n - 1): one head and its chunk.
    let records = kafka::read_topic(&brokers, &state_topic);
    assert_eq!(
        records.len(),
        2,
        "{:?}",
        records.iter().map(|r| &r.0).collect::<Vec<_>>()
    );
    let (states, orphans) = read_states(&state_topic, &records);
    assert!(orphans.is_empty());
    assert_eq!(states.len(), 1, "{:?}", states.keys());
    let stored = states.values().next().expect("one state");
    assert_eq!(stored.next, published.len() as i64);
    assert!(CandleBuilder::restore(candle_config(), &stored.snapshot).is_ok());
    assert_eq!(
        expected.len(),
        3_560 + 712 - 1 - 1,
        "all but the last 1m and 5m windows are complete"
    );
}

#[tokio::test]
async fn a_state_topic_made_without_compaction_is_altered_to_compact() {
    let brokers = stack::kafka_brokers();
    let topic = format!("{}.candles-state", stack::unique_name("candles_policy"));
    // Made by hand (or by an older release): snapshots would expire with
    // retention, and a restart would then count trades again.
    configure_topic(&brokers, &topic, &[("retention.ms", "86400000")], "create").await;
    assert_ne!(
        topic_config(&brokers, &topic, "cleanup.policy").await.as_deref(),
        Some("compact")
    );
    configure_topic(
        &brokers,
        &topic,
        &[("cleanup.policy", "compact")],
        "the broker alters the topic's configuration",
    )
    .await;
    // Compacted, the topic's own retention kept. (The controller takes the
    // change; a broker describes it once its metadata caught up.)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while topic_config(&brokers, &topic, "cleanup.policy").await.as_deref() != Some("compact") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{topic} is not compacted after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        topic_config(&brokers, &topic, "retention.ms").await.as_deref(),
        Some("86400000")
    );
}

/// Creates `topic` (3 partitions) with `config`, or alters it to that;
/// panics with `what`.
async fn configure_topic(brokers: &str, topic: &str, config: &[(&str, &str)], what: &str) {
    ensure_topics_configured(brokers, &[topic.to_owned()], 3, 1, config)
        .await
        .expect(what);
}

/// The states stored in `records` of the state topic `topic`, and the
/// orphaned records' keys.
fn read_states(topic: &str, records: &[(Vec<u8>, Vec<u8>)]) -> (HashMap<i32, state::Stored>, Vec<String>) {
    let mut reader = state::Reader::default();
    for (key, value) in records {
        reader.record(key, Some(value));
    }
    reader.finish(topic).expect("state")
}

/// The sum of a topic's partition ends: how many records were ever written.
fn topic_end(brokers: &str, topic: &str) -> i64 {
    use rdkafka::consumer::BaseConsumer;
    let consumer: BaseConsumer = kafka::reader_config(brokers).create().unwrap();
    let meta = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    meta.topics()
        .iter()
        .flat_map(|t| t.partitions())
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .unwrap()
                .1
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_compacts_the_state_topic_and_a_restart_restores_from_what_is_left() {
    let Some((trades, expected, brokers, prefix)) = recorded("candles_compacted") else {
        return;
    };
    let state_topic = format!("{prefix}candles-state");
    // Segments that roll after 100 ms and a cleaner that takes any dirty
    // share, tombstones included: the broker compacts what the service writes
    // within the test (the local stack's cleaner looks every second).
    configure_topic(
        &brokers,
        &state_topic,
        &[
            ("cleanup.policy", "compact"),
            ("segment.ms", "100"),
            ("min.cleanable.dirty.ratio", "0.01"),
            ("min.compaction.lag.ms", "0"),
            ("delete.retention.ms", "0"),
        ],
        "state topic",
    )
    .await;
    let mut config = service_config(&prefix, "candles-compacted");
    config.state_interval = Duration::from_millis(20);

    // The first half in ten parts, each once the state of the one before is
    // stored and its segment old enough to roll: many snapshots, over many
    // segments.
    let half = trades.len() / 2;
    let service = Running::start(config.clone());
    for part in trades[..half].chunks(half / 10 + 1) {
        let before = topic_end(&brokers, &state_topic);
        let published = std::time::Instant::now();
        publish_trades(&brokers, &prefix, part).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while topic_end(&brokers, &state_topic) <= before || published.elapsed() < Duration::from_millis(150) {
            assert!(std::time::Instant::now() < deadline, "no state stored within 60 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    service.stop().await.unwrap();
    let written = topic_end(&brokers, &state_topic);

    // The broker removes superseded heads, chunks and tombstones.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let left = kafka::read_topic(&brokers, &state_topic).len() as i64;
        if left < written / 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the broker did not compact {state_topic}: {left} of {written} records left after 90 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // A restart on what compaction left, with the second half: exactly the
    // candles of every trade, each counted once.
    publish_trades(&brokers, &prefix, &trades[half..]).await;
    run_until_complete(config, &expected).await.check(&expected);
}

/// The service running in this process until [`Running::stop`].
struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    service: tokio::task::JoinHandle<Result<(), ServiceError>>,
}

impl Running {
    fn start(config: ServiceConfig) -> Running {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = tokio::spawn(run(config, async {
            let _ = stopped.await;
        }));
        Running { stop, service }
    }

    /// Starts it serving its metrics on a fresh loopback address, returned too.
    fn start_with_metrics(mut config: ServiceConfig) -> (Running, SocketAddr) {
        let metrics = stack::free_loopback_addr();
        config.metrics_addr = Some(metrics);
        (Running::start(config), metrics)
    }

    /// Stops it; how its run ended.
    async fn stop(self) -> Result<(), ServiceError> {
        self.stop.send(()).unwrap();
        self.service.await.unwrap()
    }
}

/// Runs the service in this process until every expected candle is on the
/// candles topic, then stops it; returns what was read.
async fn run_until_complete(config: ServiceConfig, expected: &BTreeMap<Key, Candle>) -> CandleReader {
    let mut reader = CandleReader::new(&config.brokers, &config.topic_prefix);
    let service = Running::start(config);
    reader.read_until(120, "all candles", |r| r.complete(expected)).await;
    service.stop().await.unwrap();
    reader
}

/// Now, and the start of the minute an hour ago (µs).
fn now_and_the_minute_an_hour_ago() -> (i64, i64) {
    let now = now_micros();
    (now, (now - 3_600_000_000) / 60_000_000 * 60_000_000)
}

/// The broker's `cleanup.policy` of a topic.
async fn state_topic_cleanup(brokers: &str, topic: &str) -> String {
    topic_config(brokers, topic, "cleanup.policy")
        .await
        .unwrap_or_else(|| panic!("no cleanup.policy for {topic}"))
}

/// A topic's configuration value as the broker describes it.
async fn topic_config(brokers: &str, topic: &str, key: &str) -> Option<String> {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::ClientConfig;
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    let described = admin
        .describe_configs(&[ResourceSpecifier::Topic(topic)], &AdminOptions::new())
        .await
        .unwrap();
    let resource = described.into_iter().next().unwrap().unwrap();
    resource.get(key).and_then(|e| e.value.clone())
}

/// The service binary, killed if a failing test leaves it running.
struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_service(prefix: &str, metrics: Option<SocketAddr>) -> Service {
    spawn_instance(prefix, metrics, "candles-test", false)
}

/// An instance with its own id in the lease group, writing in Kafka
/// transactions or not.
fn spawn_instance(prefix: &str, metrics: Option<SocketAddr>, id: &str, transactions: bool) -> Service {
    let metrics = metrics.map_or_else(|| "off".to_owned(), |a| a.to_string());
    let child = Command::new(env!("CARGO_BIN_EXE_candles"))
        .env("TICKPIPE_KAFKA_BROKERS", stack::kafka_brokers())
        .env("TICKPIPE_TOPIC_PREFIX", prefix)
        .env("TICKPIPE_CANDLES_INTERVALS", "1m,5m")
        .env("TICKPIPE_CANDLES_ALLOWED_LATENESS_MS", "0")
        .env("TICKPIPE_CANDLES_BATCH_MAX", "150")
        .env("TICKPIPE_CANDLES_BATCH_WAIT_MS", "20")
        // Several batches per snapshot: a kill replays more than one batch.
        .env("TICKPIPE_CANDLES_STATE_INTERVAL_MS", "100")
        .env("TICKPIPE_CANDLES_METRICS_ADDR", metrics)
        // Restarted at once after a kill: the same id takes the lease back.
        .env("TICKPIPE_CANDLES_INSTANCE_ID", id)
        .env("TICKPIPE_CANDLES_LEASE_SESSION_TIMEOUT_MS", "6000")
        .env("TICKPIPE_CANDLES_TRANSACTIONS", transactions.to_string())
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    Service(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_any_moment_loses_and_double_counts_nothing() {
    let Some((trades, expected, brokers, prefix)) = recorded("candles_kill") else {
        return;
    };
    // Two thirds of the trades first: the kills happen while they are consumed.
    // The rest arrives before the last run, which therefore has work to do when
    // it gets SIGTERM.
    let split = trades.len() * 2 / 3;
    let first_part = self::expected(&trades[..split]).len();
    publish_trades(&brokers, &prefix, &trades[..split]).await;
    let mut reader = CandleReader::new(&brokers, &prefix);

    // Kill it each time it has made some progress, at varying points of its
    // batch cycle.
    for i in 0..6 {
        let threshold = first_part * (i + 1) / 8;
        let mut child = spawn_service(&prefix, None);
        reader
            .read_until(120, &format!("run {i}: {threshold} candle records"), |r| {
                r.records >= threshold
            })
            .await;
        // A little more progress, different each time, so that kills land in
        // different phases (producing candles, writing state, committing).
        let target = reader.records + (i * 37) % 120;
        reader
            .read_until(60, "extra progress", |r| {
                r.records >= target || r.latest.len() >= first_part
            })
            .await;
        child.0.kill().unwrap();
        let status = child.0.wait().unwrap();
        assert!(!status.success(), "run {i} was killed");
    }

    publish_trades(&brokers, &prefix, &trades[split..]).await;
    let metrics = stack::free_loopback_addr();
    let mut child = spawn_service(&prefix, Some(metrics));
    reader
        .read_until(120, "all candles after the kills", |r| r.complete(&expected))
        .await;
    // Once everything is committed, the lag of the input partition (one
    // symbol: one partition) is zero, and no trade was a dead letter.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let text = stack::scrape(metrics).await;
        let values = |name: &str| -> Vec<f64> {
            text.lines()
                .filter(|l| l.starts_with(name))
                .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
                .collect()
        };
        let skipped = values("tickpipe_candles_records_already_counted_total ");
        let dead = values("tickpipe_candles_rejected_total{");
        let lags = values("tickpipe_candles_consumer_lag_records{");
        if !lags.is_empty() && lags.iter().all(|l| *l == 0.0) {
            assert!(dead.is_empty(), "no trade of the recording is a dead letter: {dead:?}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "after 60 s: already counted {skipped:?}, lag per partition {lags:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Idle now: the watermarks stand still, so their lag keeps growing.
    let watermark_lag = || async {
        let text = stack::scrape(metrics).await;
        text.lines()
            .find_map(|l| l.strip_prefix("tickpipe_candles_watermark_lag_seconds "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    let first = watermark_lag().await.expect("the watermark lag is exported");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = watermark_lag().await.expect("the watermark lag is exported");
        if now > first {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the idle watermark lag stays at {now} s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let pid = child.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = child.0.wait().unwrap();
    assert!(status.success(), "SIGTERM must stop it cleanly, got {status}");
    reader.check(&expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_position_above_the_partition_end_is_refused_until_a_tombstone_starts_it_over() {
    let brokers = stack::kafka_brokers();
    let prefix = format!("{}.", stack::unique_name("candles_recreated"));
    // Ten trades of one symbol (so on one partition) in one minute an hour
    // ago, then one in the next minute that closes it.
    let (now, minute) = now_and_the_minute_an_hour_ago();
    let trades: Vec<Trade> = (0..11)
        .map(|i| {
            let price = tickpipe_schemas::Decimal::new(68_000 + i, 0);
            replayed_trade("BTCUSDT".into(), i, price, minute + i * 6_000_000 + 1, now)
        })
        .collect();
    publish_trades(&brokers, &prefix, &trades).await;
    let partition = {
        let read = kafka::read_topic(&brokers, &Topic::Trades.name(&prefix));
        assert_eq!(read.len(), trades.len());
        // The symbol's partition: the one its key hashes to (read back).
        let consumer: StreamConsumer = consumer_config(&brokers, &stack::unique_name("which"))
            .create()
            .unwrap();
        consumer.subscribe(&[&Topic::Trades.name(&prefix)]).unwrap();
        let msg = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("a trade")
            .unwrap();
        msg.partition()
    };

    // The state says that partition was read up to 6,106: the topic was
    // recreated since.
    let state_topic = format!("{prefix}candles-state");
    configure_topic(
        &brokers,
        &state_topic,
        &[("cleanup.policy", "compact")],
        "the state topic",
    )
    .await;
    let producer: FutureProducer = producer_config(&brokers).create().unwrap();
    let mut value = 6106_i64.to_be_bytes().to_vec();
    value.extend(CandleBuilder::new(candle_config()).snapshot());
    let key = format!("trades-{partition}");
    producer
        .send(
            FutureRecord::to(&state_topic).key(&key).payload(&value),
            Duration::from_secs(10),
        )
        .await
        .unwrap();

    let config = service_config(&prefix, "candles-recreated");
    let (service, metrics) = Running::start_with_metrics(config.clone());
    wait_metric(metrics, "tickpipe_candles_refused_partitions 1", 60).await;
    wait_metric(metrics, "tickpipe_candles_trades_in_total 0", 60).await;
    service.stop().await.unwrap();

    // The re-baseline the error names (`--rebaseline <p>`): a tombstone for
    // the partition's state.
    rebaseline(&config, &[partition]).await.expect("re-baseline");
    let (service, metrics) = Running::start_with_metrics(config);
    wait_metric(metrics, "tickpipe_candles_refused_partitions 0", 60).await;
    wait_metric(
        metrics,
        &format!("tickpipe_candles_trades_in_total {}", trades.len()),
        60,
    )
    .await;
    let mut reader = CandleReader::new(&brokers, &prefix);
    reader
        .read_until(60, "the 1m candle of the first ten trades", |r| {
            r.latest.values().any(|c| c.interval == "1m" && c.trade_count == 10)
        })
        .await;
    service.stop().await.unwrap();
}

/// A replayed Binance trade of `symbol`: `id`, 0.001 at `price`, the taker
/// bought.
fn replayed_trade(
    symbol: String,
    id: i64,
    price: tickpipe_schemas::Decimal,
    event_time: i64,
    ingest_time: i64,
) -> Trade {
    Trade {
        venue: "binance".into(),
        symbol,
        kind: tickpipe_schemas::TradeKind::Trade,
        trade_id: id,
        price,
        quantity: tickpipe_schemas::Decimal::new(1, 3),
        buyer_is_maker: false,
        first_trade_id: None,
        last_trade_id: None,
        source: tickpipe_schemas::Source::Replay,
        event_time,
        ingest_time,
    }
}

/// One trade of each symbol `SYM0000USDT`..., at `t` plus its index in µs.
fn one_trade_each(symbols: usize, t: i64, id: i64) -> Vec<Trade> {
    (0..symbols)
        .map(|s| {
            let price = tickpipe_schemas::Decimal::new(100 + s as i64, 2);
            replayed_trade(format!("SYM{s:04}USDT"), id, price, t + s as i64, t)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_of_5000_symbols_is_stored_in_chunks_and_restored() {
    let brokers = stack::kafka_brokers();
    let prefix = format!("{}.", stack::unique_name("candles_5000"));
    let (_, minute) = now_and_the_minute_an_hour_ago();
    // One trades partition: all 5,000 symbols in one builder's state.
    ensure_topics(&brokers, &prefix, &Topic::ALL, 1, 1).await.unwrap();
    publish_trades(&brokers, &prefix, &one_trade_each(5_000, minute, 1)).await;

    // The first run holds one open window per symbol and interval, and stores
    // them when it stops: megabytes, more than one Kafka message may carry.
    let config = service_config(&prefix, "candles-5000");
    let (service, metrics) = Running::start_with_metrics(config.clone());
    wait_metric(metrics, "tickpipe_candles_trades_in_total 5000", 60).await;
    service.stop().await.expect("the state of 5,000 symbols is stored");
    let state_topic = format!("{prefix}candles-state");
    let records = kafka::read_topic(&brokers, &state_topic);
    let (states, _) = read_states(&state_topic, &records);
    assert_eq!(states.len(), 1, "one trades partition");
    assert_eq!(states.values().map(|s| s.next).sum::<i64>(), 5_000);
    let largest = states.values().map(|s| s.snapshot.len()).max().unwrap_or(0);
    assert!(
        largest > 1_000_000,
        "a snapshot of {largest} bytes would fit one message"
    );
    assert!(records.iter().all(|(_, v)| v.len() <= state::CHUNK));

    // The second run restores it and reads only what came after: a trade of
    // each symbol in the next minute closes the first minute's candle, which
    // holds the trade only the restored state knows.
    publish_trades(&brokers, &prefix, &one_trade_each(5_000, minute + 60_000_000, 2)).await;
    let (service, metrics) = Running::start_with_metrics(config);
    wait_metric(metrics, "tickpipe_candles_trades_in_total 5000", 60).await;
    wait_metric(metrics, "tickpipe_candles_candles_out_total{interval=\"1m\"} 5000", 60).await;
    service.stop().await.unwrap();
    let codec = Codec::new(WriteFraming::SingleObject);
    let firsts: BTreeSet<String> = kafka::read_topic(&brokers, &Topic::Candles.name(&prefix))
        .iter()
        .map(|(_, v)| codec.decode::<Candle>(v).unwrap())
        .filter(|c| c.interval == "1m" && c.open_time == minute && c.trade_count == 1 && c.first_trade_id == Some(1))
        .map(|c| c.symbol)
        .collect();
    assert_eq!(firsts.len(), 5_000);
}

/// The status of a service's `/readyz`, 0 while it does not answer.
async fn readyz(addr: SocketAddr) -> u16 {
    match reqwest::get(format!("http://{addr}/readyz")).await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// Polls `/readyz` until it answers `status`, or fails after `secs` saying `what`.
async fn wait_readyz(addr: SocketAddr, status: u16, secs: u64, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while readyz(addr).await != status {
        assert!(tokio::time::Instant::now() < deadline, "not so after {secs} s: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `tickpipe_candles_trades_in_total` of an instance, 0 until it answers.
async fn trades_in(addr: SocketAddr) -> u64 {
    stack::scrape(addr)
        .await
        .lines()
        .find_map(|l| l.strip_prefix("tickpipe_candles_trades_in_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_active_instance_dies() {
    let Some((trades, expected, brokers, prefix)) = recorded("candles_standby") else {
        return;
    };
    let half = trades.len() / 2;
    publish_trades(&brokers, &prefix, &trades[..half]).await;
    let (at_a, at_b) = (stack::free_loopback_addr(), stack::free_loopback_addr());
    let mut a = spawn_instance(&prefix, Some(at_a), "a", false);
    wait_readyz(at_a, 200, 60, "the first instance is ready").await;
    let b = spawn_instance(&prefix, Some(at_b), "b", false);
    let mut reader = CandleReader::new(&brokers, &prefix);
    let first = self::expected(&trades[..half]).len();
    reader
        .read_until(120, "the first half's candles", |r| r.latest.len() >= first)
        .await;
    // The second stands by: serving its endpoints, not ready, reading nothing.
    wait_readyz(at_b, 503, 30, "the standby answers /readyz, not ready").await;
    assert_eq!(trades_in(at_b).await, 0, "a standby reads no trade");
    assert!(trades_in(at_a).await > 0);

    a.0.kill().unwrap();
    a.0.wait().unwrap();
    publish_trades(&brokers, &prefix, &trades[half..]).await;
    // Once the lease session of the dead one is over, the standby restores
    // the stored state and builds the rest.
    reader.read_until(120, "all candles", |r| r.complete(&expected)).await;
    assert_eq!(readyz(at_b).await, 200, "the standby took over");
    assert!(trades_in(at_b).await > 0);
    reader.check(&expected);
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_transactions_sigkills_leave_no_candle_twice_for_committed_readers() {
    let Some((trades, expected, brokers, prefix)) = recorded("candles_txn") else {
        return;
    };
    let records = expected_records(&trades);
    publish_trades(&brokers, &prefix, &trades).await;
    // The reader is read_committed, as every consumer of ours.
    let mut reader = CandleReader::new(&brokers, &prefix);
    for i in 0..4 {
        let mut child = spawn_instance(&prefix, None, "txn", true);
        let threshold = expected.len() * (i + 1) / 6;
        reader
            .read_until(120, &format!("run {i}: {threshold} candles"), |r| {
                r.latest.len() >= threshold
            })
            .await;
        child.0.kill().unwrap();
        child.0.wait().unwrap();
    }
    let last = spawn_instance(&prefix, None, "txn", true);
    reader.read_until(120, "all candles", |r| r.complete(&expected)).await;
    drop(last);
    reader.check(&expected);
    // What each killed run wrote after its last commit was aborted; the next
    // one wrote it again, once.
    assert_eq!(reader.records, records, "candle records read, against the builder's");
}
