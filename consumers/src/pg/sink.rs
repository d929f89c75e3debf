//! The `postgres-sink` service: entity topics in, rows in PostgreSQL out,
//! exactly once per Kafka offset.
//!
//! Two halves joined by a bounded channel:
//!
//! - the **consumer thread** owns the Kafka consumer (a group member, so
//!   instances share partitions). It polls, decodes and validates records into
//!   batches (by size and time) and hands them over; when the writer falls
//!   behind it pauses its partitions instead of buffering. On assignment it reads
//!   the stored offsets from Postgres and seeks there.
//! - the **writer** writes one batch per transaction: it locks the partitions'
//!   rows in `sink_offsets`, drops records below the stored offsets (already
//!   written), writes the rest, records rejects in `dead_letters` (and publishes
//!   them to the dead-letters topic), moves the offsets, and commits. Only then
//!   are the offsets committed to Kafka, for lag monitoring.
//!
//! Because the offsets move in the same transaction as the rows and every write
//! first locks and checks them, a crash at any instant, a rebalance, or a zombie
//! instance still writing a revoked partition never writes an offset twice.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message, Offset, Statistics, TopicPartitionList};
use tickpipe_ops::now_micros;
use tokio::sync::mpsc;
use tokio_postgres::NoTls;

use tickpipe_producer::kafka::{ensure_topic_names, producer_config, TopicError};
use tickpipe_schemas::registry::{RegistryClient, RegistryConfig, RegistryError};
use tickpipe_schemas::{Codec, DeadLetter, Record, Source, Topic, WriteFraming};

use super::migrate::{migrate, MigrateError};
use super::rows::{reject_letter, write_items, Body, Item, Reject};
use super::validate::Rules;
use crate::decode::{decode_item, learn_schema};
use crate::kafka::{consumer_config, send_all};

/// Everything the sink needs.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// Prefix of every topic name (may be empty).
    pub topic_prefix: String,
    /// The entity topics to consume.
    pub topics: Vec<Topic>,
    /// Consumer group; also the key of the stored offsets.
    pub group: String,
    /// libpq-style connection string or URL.
    pub postgres_url: String,
    /// Connections in the pool.
    pub pool_size: usize,
    /// Most records per batch (one transaction).
    pub batch_max: usize,
    /// Longest wait for a batch to fill.
    pub batch_wait: Duration,
    /// How far before its stored offset a partition is re-read on assignment
    /// (the records below are skipped). Needed for brokers that answer a fetch
    /// only with record batches starting at or after the requested offset
    /// (tansu); 0 on Apache Kafka.
    pub resume_rewind: i64,
    /// Longest pause between retries of a failed write.
    pub max_backoff: Duration,
    /// How long the group waits for a silent member before moving its partitions.
    pub session_timeout: Duration,
    /// Static group membership (`group.instance.id`): a restarted instance with
    /// the same id gets its partitions back without a rebalance.
    pub instance_id: Option<String>,
    /// Partitions for topics this service creates when they are missing.
    pub partitions: i32,
    /// Where `/metrics`, `/healthz` and `/readyz` are served, if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    /// The Schema Registry that Confluent-framed records' ids are looked up
    /// in (once per id), if any.
    pub registry: Option<RegistryConfig>,
}

/// Why the sink stopped.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("bad PostgreSQL connection settings: {0}")]
    Url(String),
    #[error("cannot reach PostgreSQL ({target}): {detail}")]
    Unreachable { target: String, detail: String },
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    #[error(transparent)]
    Topics(#[from] TopicError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("metrics endpoint: {0}")]
    Metrics(std::io::Error),
    #[error("stopping with a batch not written: {0}")]
    Unwritten(String),
    #[error("the consumer thread failed: {0}")]
    Consumer(String),
    #[error("schema registry: {0}")]
    Registry(#[from] RegistryError),
}

/// The sink's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    consumed: IntCounterVec,
    written: IntCounterVec,
    rejected: IntCounterVec,
    already_written: IntCounterVec,
    offset_gaps: IntCounterVec,
    retries: IntCounter,
    batch_size: Histogram,
    write_seconds: Histogram,
    end_to_end: HistogramVec,
    lag: IntGaugeVec,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("metric definition: {e}"))
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let p = "tickpipe_postgres_sink";
        let counter = |name: &str, help: &str, labels: &[&str]| {
            must(IntCounterVec::new(Opts::new(format!("{p}_{name}"), help), labels))
        };
        let m = Metrics {
            consumed: counter("records_consumed_total", "Records read from Kafka.", &["topic"]),
            written: counter(
                "records_written_total",
                "Records written to their table (committed).",
                &["topic"],
            ),
            rejected: counter(
                "records_rejected_total",
                "Records sent to dead letters, by stage (decode, validate, write).",
                &["topic", "stage"],
            ),
            already_written: counter(
                "records_already_written_total",
                "Records skipped because their offset was already written.",
                &["topic"],
            ),
            offset_gaps: counter(
                "offset_gaps_total",
                "Batches that started after the stored offset of their partition.",
                &["topic"],
            ),
            retries: must(IntCounter::new(
                format!("{p}_write_retries_total"),
                "Batch writes retried after a database or broker failure.",
            )),
            batch_size: must(Histogram::with_opts(
                HistogramOpts::new(format!("{p}_batch_records"), "Records per written batch.")
                    .buckets(vec![1.0, 10.0, 100.0, 1_000.0, 5_000.0, 10_000.0, 50_000.0]),
            )),
            write_seconds: must(Histogram::with_opts(
                HistogramOpts::new(
                    format!("{p}_write_duration_seconds"),
                    "Time to write and commit a batch.",
                )
                .buckets(prometheus::exponential_buckets(0.001, 2.0, 14).unwrap_or_default()),
            )),
            end_to_end: must(HistogramVec::new(
                HistogramOpts::new(
                    format!("{p}_end_to_end_latency_seconds"),
                    "From the exchange's event time to the commit in Postgres.",
                )
                .buckets(prometheus::exponential_buckets(0.01, 2.0, 16).unwrap_or_default()),
                &["topic"],
            )),
            lag: must(IntGaugeVec::new(
                Opts::new(
                    format!("{p}_consumer_lag_records"),
                    "Records behind the partition's end (from the committed offset).",
                ),
                &["topic", "partition"],
            )),
            registry,
        };
        for c in [
            Box::new(m.consumed.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.written.clone()),
            Box::new(m.rejected.clone()),
            Box::new(m.already_written.clone()),
            Box::new(m.offset_gaps.clone()),
            Box::new(m.retries.clone()),
            Box::new(m.batch_size.clone()),
            Box::new(m.write_seconds.clone()),
            Box::new(m.end_to_end.clone()),
            Box::new(m.lag.clone()),
        ] {
            must(m.registry.register(c));
        }
        m
    }
}

/// Opens the pool and checks that the database answers.
pub async fn connect(config: &SinkConfig) -> Result<Pool, SinkError> {
    let pg: tokio_postgres::Config = config
        .postgres_url
        .parse()
        .map_err(|e: tokio_postgres::Error| SinkError::Url(e.to_string()))?;
    let target = describe(&pg);
    let manager = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager)
        .max_size(config.pool_size.max(1))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| SinkError::Url(e.to_string()))?;
    let client = pool.get().await.map_err(|e| SinkError::Unreachable {
        target: target.clone(),
        detail: e.to_string(),
    })?;
    drop(client);
    Ok(pool)
}

/// Host, port, database and user of a connection, never the password.
fn describe(pg: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = pg
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    format!(
        "host {} port {:?} database {} user {}",
        hosts.join(","),
        pg.get_ports(),
        pg.get_dbname().unwrap_or("(default)"),
        pg.get_user().unwrap_or("(default)")
    )
}

/// What one committed batch did.
#[derive(Debug, Default)]
pub struct Written {
    /// Next offset per (topic, partition), as committed.
    pub next: BTreeMap<(String, i32), i64>,
    pub written: HashMap<String, u64>,
    pub rejected: Vec<(String, &'static str)>,
    pub already_written: HashMap<String, u64>,
    pub gaps: Vec<String>,
    pub event_times: Vec<(String, i64)>,
}

/// Why a batch write failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("postgres pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("publishing dead letters: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("encoding a dead letter: {0}")]
    Encode(String),
    #[error("another instance moved offset {topic}[{partition}] while this batch was written")]
    Fenced { topic: String, partition: i32 },
}

/// Writes one batch in one transaction, exactly once per offset.
pub async fn write_batch(
    pool: &Pool,
    group: &str,
    items: &[Item],
    dead_letters: Option<(&FutureProducer, &str, &Codec)>,
) -> Result<Written, WriteError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let mut out = Written::default();

    // Lock each partition's offset and learn where it stands.
    let mut stored: BTreeMap<(String, i32), Option<i64>> = BTreeMap::new();
    for item in items {
        stored.entry((item.topic.clone(), item.partition)).or_insert(None);
    }
    let select = tx
        .prepare(
            "SELECT next_offset FROM sink_offsets WHERE consumer_group = $1 AND topic = $2 AND partition = $3 \
             FOR UPDATE",
        )
        .await?;
    for ((topic, partition), at) in stored.iter_mut() {
        *at = tx
            .query_opt(&select, &[&group, topic, partition])
            .await?
            .map(|r| r.get::<_, i64>(0));
    }

    // Keep what was not written yet.
    let mut fresh: Vec<&Item> = Vec::with_capacity(items.len());
    let mut first_fresh: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for item in items {
        let tp = (item.topic.clone(), item.partition);
        let from = stored.get(&tp).copied().flatten().unwrap_or(0);
        if item.offset < from {
            *out.already_written.entry(item.topic.clone()).or_default() += 1;
            continue;
        }
        first_fresh.entry(tp.clone()).or_insert(item.offset);
        let next = out.next.entry(tp).or_insert(0);
        *next = (*next).max(item.offset + 1);
        fresh.push(item);
    }
    for (tp, first) in &first_fresh {
        if let Some(Some(at)) = stored.get(tp) {
            if first > at {
                tracing::warn!(
                    topic = tp.0,
                    partition = tp.1,
                    stored = at,
                    first,
                    "postgres-sink: offsets {at}..{first} were never delivered to this sink"
                );
                out.gaps.push(tp.0.clone());
            }
        }
    }

    let refused = write_items(&tx, &fresh).await?;
    let now = now_micros();
    let mut letters: Vec<DeadLetter> = Vec::new();
    let refused_offsets: Vec<(&str, i32, i64)> = refused
        .iter()
        .map(|(i, _)| (i.topic.as_str(), i.partition, i.offset))
        .collect();
    for item in &fresh {
        match &item.body {
            Err(reject) => letters.push(reject_letter(item, reject, now)),
            Ok(body) if !super::rows::is_own_letter(body) => {
                if !refused_offsets.contains(&(item.topic.as_str(), item.partition, item.offset)) {
                    *out.written.entry(item.topic.clone()).or_default() += 1;
                    out.event_times.push((item.topic.clone(), body.event_time()));
                }
            }
            Ok(_) => {}
        }
    }
    for (item, reason) in &refused {
        let source = item.body.as_ref().map(Body::source).unwrap_or(Source::Unknown);
        let reject = Reject {
            stage: "write",
            error: reason.clone(),
            source,
        };
        letters.push(reject_letter(item, &reject, now));
    }
    if !letters.is_empty() {
        super::rows::dead_letters(&tx, &letters.iter().collect::<Vec<_>>()).await?;
        if let Some((producer, topic, codec)) = dead_letters {
            publish(producer, topic, codec, &letters).await?;
        }
        for l in &letters {
            out.rejected
                .push((l.topic.clone().unwrap_or_default(), stage_label(&l.stage)));
        }
    }

    // Move the offsets; a row another instance moved meanwhile fences us off.
    let update = tx
        .prepare(
            "INSERT INTO sink_offsets AS o (consumer_group, topic, partition, next_offset) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (consumer_group, topic, partition) DO UPDATE SET next_offset = EXCLUDED.next_offset, \
             updated_at = now() WHERE o.next_offset = $5",
        )
        .await?;
    for ((topic, partition), next) in &out.next {
        let expected = stored
            .get(&(topic.clone(), *partition))
            .copied()
            .flatten()
            .unwrap_or(-1);
        let n = tx
            .execute(&update, &[&group, topic, partition, next, &expected])
            .await?;
        if n != 1 {
            return Err(WriteError::Fenced {
                topic: topic.clone(),
                partition: *partition,
            });
        }
    }
    tx.commit().await?;
    Ok(out)
}

fn stage_label(stage: &str) -> &'static str {
    match stage {
        "decode" => "decode",
        "validate" => "validate",
        _ => "write",
    }
}

/// Publishes dead letters and waits for the broker's acknowledgement.
async fn publish(
    producer: &FutureProducer,
    topic: &str,
    codec: &Codec,
    letters: &[DeadLetter],
) -> Result<(), WriteError> {
    let mut records = Vec::with_capacity(letters.len());
    for l in letters {
        let bytes = codec.encode(l).map_err(|e| WriteError::Encode(e.to_string()))?;
        records.push((topic.to_owned(), l.key(), bytes));
    }
    Ok(send_all(producer, records).await?)
}

/// Where a partition's reading stands.
#[derive(Debug, Default, Clone, Copy)]
struct Position {
    /// The next offset the broker should deliver, when known.
    expect: Option<i64>,
    /// Records below this offset are in Postgres already.
    written_below: Option<i64>,
}

/// What the consumer thread shares with the rebalance callback.
struct SinkContext {
    runtime: tokio::runtime::Handle,
    pool: Pool,
    group: String,
    rewind: i64,
    /// Per assigned partition: where reading goes on, and below which offset
    /// records are already written (learnt at assignment).
    positions: Arc<Mutex<HashMap<(String, i32), Position>>>,
    stop: Arc<AtomicBool>,
    metrics: Metrics,
}

impl SinkContext {
    /// The stored next offsets of the given partitions, retried until Postgres answers.
    fn stored_offsets(&self, tpl: &TopicPartitionList) -> Option<HashMap<(String, i32), i64>> {
        let topics: Vec<String> = tpl.elements().iter().map(|e| e.topic().to_owned()).collect();
        let mut backoff = Duration::from_millis(100);
        loop {
            let result = self.runtime.block_on(async {
                let client = self.pool.get().await.map_err(|e| e.to_string())?;
                let rows = client
                    .query(
                        "SELECT topic, partition, next_offset FROM sink_offsets \
                         WHERE consumer_group = $1 AND topic = ANY($2)",
                        &[&self.group, &topics],
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(
                    rows.iter()
                        .map(|r| ((r.get::<_, String>(0), r.get::<_, i32>(1)), r.get::<_, i64>(2)))
                        .collect::<HashMap<_, _>>(),
                )
            });
            match result {
                Ok(offsets) => return Some(offsets),
                Err(e) if self.stop.load(Ordering::Relaxed) => {
                    tracing::warn!("postgres-sink: stopping before the stored offsets could be read: {e}");
                    return None;
                }
                Err(e) => {
                    tracing::warn!("postgres-sink: reading stored offsets failed, retrying: {e}");
                    self.metrics.retries.inc();
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

impl ClientContext for SinkContext {
    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition >= 0 && p.consumer_lag >= 0 {
                    self.metrics
                        .lag
                        .with_label_values(&[topic.as_str(), &partition.to_string()])
                        .set(p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for SinkContext {
    /// Eager rebalancing, with the assigned partitions positioned at the
    /// offsets stored in Postgres (minus the rewind), not at the group's.
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let Some(stored) = self.stored_offsets(tpl) else {
                    return;
                };
                let mut positioned = TopicPartitionList::new();
                let mut positions = self.positions.lock().unwrap_or_else(|p| p.into_inner());
                for e in tpl.elements() {
                    let tp = (e.topic().to_owned(), e.partition());
                    let (offset, position) = match stored.get(&tp) {
                        Some(next) => {
                            let from = next.saturating_sub(self.rewind).max(0);
                            let position = Position {
                                expect: Some(from),
                                written_below: Some(*next),
                            };
                            (Offset::Offset(from), position)
                        }
                        None => (Offset::Beginning, Position::default()),
                    };
                    positions.insert(tp.clone(), position);
                    tracing::info!(topic = tp.0, partition = tp.1, ?offset, "postgres-sink: assigned");
                    if let Err(e) = positioned.add_partition_offset(&tp.0, tp.1, offset) {
                        tracing::error!("postgres-sink: cannot position {}[{}]: {e}", tp.0, tp.1);
                    }
                }
                if let Err(e) = consumer.assign(&positioned) {
                    tracing::error!("postgres-sink: assign failed: {e}");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(partitions = tpl.count(), "postgres-sink: partitions revoked");
                if let Err(e) = consumer.unassign() {
                    tracing::error!("postgres-sink: unassign failed: {e}");
                }
            }
            other => {
                tracing::error!("postgres-sink: rebalance error {other:?}");
                let _ = consumer.unassign();
            }
        }
    }
}

/// Runs until `shutdown` resolves, then writes the batch in hand and returns.
pub async fn run(config: SinkConfig, shutdown: impl Future<Output = ()>) -> Result<(), SinkError> {
    let metrics = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));
    if let Some(addr) = config.metrics_addr {
        crate::ops::serve(
            addr,
            metrics.registry.clone(),
            ready.clone(),
            "not ready: the database is not accepting writes",
        )
        .await
        .map_err(SinkError::Metrics)?;
    }

    let pool = connect(&config).await?;
    let mut client = pool.get().await.map_err(|e| SinkError::Unreachable {
        target: "pool".into(),
        detail: e.to_string(),
    })?;
    let applied = migrate(&mut client).await?;
    drop(client);
    tracing::info!(applied, "postgres-sink: schema ready");

    let topic_of: HashMap<String, Topic> = config
        .topics
        .iter()
        .map(|t| (t.name(&config.topic_prefix), *t))
        .collect();
    let dead_topic = Topic::DeadLetters.name(&config.topic_prefix);
    let mut names: Vec<String> = topic_of.keys().cloned().collect();
    if !names.contains(&dead_topic) {
        names.push(dead_topic.clone());
    }
    ensure_topic_names(&config.brokers, &names, config.partitions, 1).await?;
    let producer: FutureProducer = producer_config(&config.brokers).create()?;

    let stop = Arc::new(AtomicBool::new(false));
    let (batches_tx, mut batches) = mpsc::channel::<Vec<Item>>(2);
    let (commits_tx, commits_rx) = std::sync::mpsc::channel::<TopicPartitionList>();
    let context = SinkContext {
        runtime: tokio::runtime::Handle::current(),
        pool: pool.clone(),
        group: config.group.clone(),
        rewind: config.resume_rewind,
        positions: Arc::default(),
        stop: stop.clone(),
        metrics: metrics.clone(),
    };
    let consumer_thread = {
        let config = config.clone();
        let stop = stop.clone();
        let metrics = metrics.clone();
        std::thread::Builder::new()
            .name("postgres-sink-consumer".into())
            .spawn(move || consume(config, topic_of, context, stop, metrics, batches_tx, commits_rx))
            .map_err(|e| SinkError::Consumer(e.to_string()))?
    };
    ready.store(true, Ordering::Relaxed);

    let codec = Codec::new(WriteFraming::SingleObject);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut stopping = false;
    let mut result = Ok(());
    loop {
        let batch = tokio::select! {
            _ = &mut shutdown, if !stopping => {
                tracing::info!("postgres-sink: stopping");
                stopping = true;
                stop.store(true, Ordering::Relaxed);
                continue;
            }
            b = batches.recv() => match b { Some(b) => b, None => break },
        };
        let mut backoff = Duration::from_millis(100);
        let mut stopping_since: Option<Instant> = None;
        loop {
            let started = Instant::now();
            match write_batch(&pool, &config.group, &batch, Some((&producer, &dead_topic, &codec))).await {
                Ok(w) => {
                    ready.store(true, Ordering::Relaxed);
                    record(&metrics, &batch, &w, started.elapsed());
                    let mut tpl = TopicPartitionList::new();
                    for ((topic, partition), next) in &w.next {
                        let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next));
                    }
                    let _ = commits_tx.send(tpl);
                    break;
                }
                Err(WriteError::Fenced { topic, partition }) => {
                    tracing::warn!("postgres-sink: {topic}[{partition}] moved on elsewhere; dropping the batch");
                    break;
                }
                Err(e) => {
                    ready.store(false, Ordering::Relaxed);
                    metrics.retries.inc();
                    tracing::warn!("postgres-sink: write failed, retrying in {backoff:?}: {e}");
                    if stopping || stop.load(Ordering::Relaxed) {
                        let since = *stopping_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > Duration::from_secs(30) {
                            result = Err(SinkError::Unwritten(e.to_string()));
                            break;
                        }
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = &mut shutdown, if !stopping => {
                            stopping = true;
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                    backoff = (backoff * 2).min(config.max_backoff);
                }
            }
        }
        if result.is_err() {
            stop.store(true, Ordering::Relaxed);
            break;
        }
    }
    drop(batches);
    drop(commits_tx);
    match tokio::task::spawn_blocking(move || consumer_thread.join()).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(e),
        _ => return Err(SinkError::Consumer("the consumer thread panicked".into())),
    }
    tracing::info!("postgres-sink: stopped");
    result
}

fn record(metrics: &Metrics, batch: &[Item], w: &Written, took: Duration) {
    metrics.batch_size.observe(batch.len() as f64);
    metrics.write_seconds.observe(took.as_secs_f64());
    for (topic, n) in &w.written {
        metrics.written.with_label_values(&[topic.as_str()]).inc_by(*n);
    }
    for (topic, n) in &w.already_written {
        metrics.already_written.with_label_values(&[topic.as_str()]).inc_by(*n);
    }
    for (topic, stage) in &w.rejected {
        metrics.rejected.with_label_values(&[topic.as_str(), stage]).inc();
    }
    for topic in &w.gaps {
        metrics.offset_gaps.with_label_values(&[topic.as_str()]).inc();
    }
    let now = now_micros();
    let mut by_topic: HashMap<&str, Histogram> = HashMap::new();
    for (topic, t) in &w.event_times {
        let h = by_topic
            .entry(topic.as_str())
            .or_insert_with(|| metrics.end_to_end.with_label_values(&[topic.as_str()]));
        h.observe((now - t).max(0) as f64 / 1e6);
    }
}

/// The consumer thread: poll, decode, batch, hand over; commit what the writer
/// committed; pause while the writer is behind.
fn consume(
    config: SinkConfig,
    topic_of: HashMap<String, Topic>,
    context: SinkContext,
    stop: Arc<AtomicBool>,
    metrics: Metrics,
    batches: mpsc::Sender<Vec<Item>>,
    commits: std::sync::mpsc::Receiver<TopicPartitionList>,
) -> Result<(), SinkError> {
    let positions = context.positions.clone();
    let mut cc = consumer_config(&config.brokers, &config.group);
    cc.set("statistics.interval.ms", "5000")
        .set("session.timeout.ms", config.session_timeout.as_millis().to_string());
    if let Some(id) = &config.instance_id {
        cc.set("group.instance.id", id);
    }
    let runtime = context.runtime.clone();
    let registry = config.registry.clone().map(RegistryClient::new).transpose()?;
    let consumer: BaseConsumer<SinkContext> = cc.create_with_context(context)?;
    let names: Vec<&str> = topic_of.keys().map(String::as_str).collect();
    consumer.subscribe(&names)?;
    let codec = Codec::new(WriteFraming::SingleObject);

    let mut batch: Vec<Item> = Vec::with_capacity(config.batch_max);
    let mut ready: Option<Vec<Item>> = None;
    let mut opened = Instant::now();
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        while let Ok(tpl) = commits.try_recv() {
            if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
                tracing::debug!("postgres-sink: offset commit to Kafka failed (monitoring only): {e}");
            }
        }
        if ready.is_none()
            && !batch.is_empty()
            && (batch.len() >= config.batch_max || opened.elapsed() >= config.batch_wait || stopping)
        {
            ready = Some(std::mem::replace(&mut batch, Vec::with_capacity(config.batch_max)));
        }
        if let Some(b) = ready.take() {
            // Wait for the writer rather than pause the partitions: resuming
            // makes the client fetch from inside a record batch again, which
            // some brokers (tansu) answer by skipping the rest of that batch.
            // The group keeps us while we wait (heartbeats run in the
            // background); past max.poll.interval.ms it moves the partitions,
            // and the stored offsets keep that exact too.
            let mut b = b;
            loop {
                match batches.try_send(b) {
                    Ok(()) => break,
                    Err(mpsc::error::TrySendError::Full(back)) => {
                        b = back;
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
                }
            }
        }
        if stopping {
            if ready.is_none() && batch.is_empty() {
                break;
            }
            // Wait for the writer to take the last batch.
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let Some(polled) = consumer.poll(Duration::from_millis(20)) else {
            continue;
        };
        let msg = match polled {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("postgres-sink: kafka: {e}");
                continue;
            }
        };
        metrics.consumed.with_label_values(&[msg.topic()]).inc();
        let below = {
            let mut positions = positions.lock().unwrap_or_else(|p| p.into_inner());
            let p = positions.entry((msg.topic().to_owned(), msg.partition())).or_default();
            if p.expect.is_some_and(|e| msg.offset() > e) {
                tracing::warn!(
                    topic = msg.topic(),
                    partition = msg.partition(),
                    "postgres-sink: the broker skipped offsets {:?}..{}",
                    p.expect,
                    msg.offset()
                );
                metrics.offset_gaps.with_label_values(&[msg.topic()]).inc();
            }
            p.expect = Some(msg.offset() + 1);
            p.written_below
        };
        if below.is_some_and(|b| msg.offset() < b) {
            metrics.already_written.with_label_values(&[msg.topic()]).inc();
            continue;
        }
        if let Some(registry) = &registry {
            learn_schema(&runtime, registry, &codec, msg.payload().unwrap_or_default(), &stop);
        }
        let rules = Rules::at(now_micros());
        if batch.is_empty() {
            opened = Instant::now();
        }
        batch.push(decode_item(&codec, &rules, &topic_of, &msg));
    }
    // Commit what the writer commits until it is done.
    drop(batches);
    while let Ok(tpl) = commits.recv() {
        let _ = consumer.commit(&tpl, CommitMode::Sync);
    }
    consumer.unsubscribe();
    Ok(())
}
