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
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use prometheus::Registry;
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use tickpipe_ops::now_micros;
use tokio::sync::mpsc;

use tickpipe_kafka::{future_producer, TopicError};
use tickpipe_schemas::registry::{RegistryConfig, RegistryError};
use tickpipe_schemas::{Codec, DeadLetter, Source, Topic, WriteFraming};

use super::migrate::{migrate, MigrateError};
use super::rows::{reject_letter, write_items, Body, Item, Reject};
use super::tls;
use super::COMPONENT;
use crate::sink::{sink_topics, spawn_consumer, ConsumeError, ConsumerSettings, Resume, SinkMetrics};
use tickpipe_kafka::{letter_records, send_letters};

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
    /// Longest pause between retries of a failed write.
    pub max_backoff: Duration,
    /// How long the group waits for a silent member before moving its partitions.
    pub session_timeout: Duration,
    /// Static group membership (`group.instance.id`): a restarted instance with
    /// the same id gets its partitions back without a rebalance.
    pub instance_id: Option<String>,
    /// Partitions for topics this service creates when they are missing.
    pub partitions: i32,
    /// Replication factor of the topics it creates when they are missing.
    pub replication: i32,
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
    #[error("re-baselining {topic}[{partition}]: {source}")]
    Rebaseline {
        topic: String,
        partition: i32,
        source: tokio_postgres::Error,
    },
    #[error("the consumer thread failed: {0}")]
    Consumer(String),
    #[error("schema registry: {0}")]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Consume(#[from] ConsumeError),
}

/// The sink's metrics: the core set every sink exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    sink: SinkMetrics,
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let sink = SinkMetrics::new(&registry, "tickpipe_postgres_sink", "Postgres");
        Metrics { registry, sink }
    }
}

/// Opens the pool and checks that the database answers.
pub async fn connect(config: &SinkConfig) -> Result<Pool, SinkError> {
    let (conn, tls) = tls::split(&config.postgres_url).map_err(|e| SinkError::Url(e.to_string()))?;
    let pg: tokio_postgres::Config = conn
        .parse()
        .map_err(|e: tokio_postgres::Error| SinkError::Url(e.to_string()))?;
    let target = describe(&pg);
    let connector = tls::connector(&tls).map_err(|e| SinkError::Url(e.to_string()))?;
    let manager = Manager::from_config(
        pg,
        connector,
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
        detail: with_causes(&e),
    })?;
    drop(client);
    Ok(pool)
}

/// An error and its causes ("error performing TLS handshake: certificate
/// verify failed"): the pool's own message names none of them.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        cause = c.source();
    }
    text
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
    #[error("another instance started {topic}[{partition}] while this batch was written")]
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
        // Below the stored position, or read twice into this batch: a partition
        // revoked and given back while the batch was open is read again from
        // the stored position, after the copies the batch already holds.
        let repeated = out.next.get(&tp).is_some_and(|next| item.offset < *next);
        if item.offset < from || repeated {
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
        for l in &letters {
            out.rejected
                .push((l.topic.clone().unwrap_or_default(), stage_label(&l.stage)));
        }
    }

    // Move the offsets. A partition without a row had nothing to lock: if
    // another instance created the row meanwhile, the update finds a value it
    // did not expect, and the whole batch is written again (locking that row).
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
    // The letters go to Kafka once the fence check passed: a batch written
    // again would publish them twice.
    if let Some((producer, topic, codec)) = dead_letters.filter(|_| !letters.is_empty()) {
        let records = letter_records(topic, codec, &letters).map_err(|e| WriteError::Encode(e.to_string()))?;
        send_letters(producer, &records).await?;
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

/// How an operator starts a partition over: forget its stored position, so
/// that it is read from its beginning (rows already written stay; a record
/// read again is not written twice where its table has a natural key).
fn rebaseline_sql(group: &str, topic: &str, partition: i32) -> String {
    format!(
        "restart the sink with --rebaseline {topic}:{partition}, or run DELETE FROM sink_offsets WHERE \
         consumer_group = '{group}' AND topic = '{topic}' AND partition = {partition}; in its database and restart it"
    )
}

/// Forgets the stored positions of `partitions` (full topic names) for the
/// sink's group, so that they are read from their beginning: the re-baseline
/// after a deliberate reset (a recreated topic, another cluster). Returns how
/// many positions were stored. Run it with the sink stopped.
pub async fn rebaseline(config: &SinkConfig, partitions: &[(String, i32)]) -> Result<u64, SinkError> {
    let pool = connect(config).await?;
    let mut client = pool.get().await.map_err(|e| SinkError::Unreachable {
        target: "pool".into(),
        detail: with_causes(&e),
    })?;
    migrate(&mut client).await?;
    let mut forgotten = 0;
    for (topic, partition) in partitions {
        let n = client
            .execute(
                "DELETE FROM sink_offsets WHERE consumer_group = $1 AND topic = $2 AND partition = $3",
                &[&config.group, topic, partition],
            )
            .await
            .map_err(|source| SinkError::Rebaseline {
                topic: topic.clone(),
                partition: *partition,
                source,
            })?;
        tracing::warn!(
            topic,
            partition,
            group = config.group,
            forgotten = n,
            "postgres-sink: re-baselined: the partition is read from its beginning"
        );
        forgotten += n;
    }
    Ok(forgotten)
}

/// How often an idle sink asks the database whether it answers.
const PROBE_EVERY: Duration = Duration::from_secs(5);

/// Runs until `shutdown` resolves, then writes the batch in hand and returns.
pub async fn run(config: SinkConfig, shutdown: impl Future<Output = ()>) -> Result<(), SinkError> {
    let metrics = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));
    let registry_answers = Arc::new(AtomicBool::new(true));
    if let Some(addr) = config.metrics_addr {
        crate::ops::serve_conditions(
            addr,
            metrics.registry.clone(),
            vec![
                (ready.clone(), "not ready: the database is not accepting writes"),
                (
                    registry_answers.clone(),
                    "not ready: the schema registry does not answer (retrying)",
                ),
            ],
        )
        .await
        .map_err(SinkError::Metrics)?;
    }

    let pool = connect(&config).await?;
    let mut client = pool.get().await.map_err(|e| SinkError::Unreachable {
        target: "pool".into(),
        detail: with_causes(&e),
    })?;
    let applied = migrate(&mut client).await?;
    drop(client);
    tracing::info!(applied, "postgres-sink: schema ready");

    let (topic_of, dead_topic) = sink_topics(
        &config.brokers,
        &config.topic_prefix,
        &config.topics,
        config.partitions,
        config.replication,
    )
    .await?;
    let producer = future_producer(&config.brokers, &dead_topic)?;

    let stop = Arc::new(AtomicBool::new(false));
    let (batches_tx, mut batches) = mpsc::channel::<Vec<Item>>(2);
    let (commits_tx, commits_rx) = std::sync::mpsc::channel::<TopicPartitionList>();
    let resume = {
        let (pool, group, runtime) = (pool.clone(), config.group.clone(), tokio::runtime::Handle::current());
        Resume::Store(Box::new(move |tpl: &TopicPartitionList| {
            let topics: Vec<String> = tpl.elements().iter().map(|e| e.topic().to_owned()).collect();
            runtime.block_on(async {
                let client = pool.get().await.map_err(|e| e.to_string())?;
                let rows = client
                    .query(
                        "SELECT topic, partition, next_offset FROM sink_offsets \
                         WHERE consumer_group = $1 AND topic = ANY($2)",
                        &[&group, &topics],
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(rows
                    .iter()
                    .map(|r| ((r.get::<_, String>(0), r.get::<_, i32>(1)), r.get::<_, i64>(2)))
                    .collect())
            })
        }))
    };
    let settings = ConsumerSettings {
        component: COMPONENT,
        brokers: config.brokers.clone(),
        group: config.group.clone(),
        session_timeout: config.session_timeout,
        instance_id: config.instance_id.clone(),
        batch_max: config.batch_max,
        batch_wait: config.batch_wait,
        registry: config.registry.clone(),
        registry_answers: registry_answers.clone(),
        rebaseline: rebaseline_sql,
    };
    let consumer_thread = spawn_consumer(
        settings,
        topic_of,
        resume,
        stop.clone(),
        metrics.sink.clone(),
        batches_tx,
        commits_rx,
    )?;
    ready.store(true, Ordering::Relaxed);

    let codec = Codec::new(WriteFraming::SingleObject);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut stopping = false;
    let mut result = Ok(());
    // Between batches (an idle sink writes nothing that could fail), the
    // database is asked now and then, so that `/readyz` tells an outage.
    let mut probe = tokio::time::interval(PROBE_EVERY);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let batch = tokio::select! {
            _ = &mut shutdown, if !stopping => {
                tracing::info!("postgres-sink: stopping");
                stopping = true;
                stop.store(true, Ordering::Relaxed);
                continue;
            }
            b = batches.recv() => match b { Some(b) => b, None => break },
            _ = probe.tick() => {
                let answered = tokio::time::timeout(PROBE_EVERY, async {
                    pool.get().await.ok()?.simple_query("SELECT 1").await.ok()
                })
                .await;
                let up = matches!(answered, Ok(Some(_)));
                match (up, ready.swap(up, Ordering::Relaxed)) {
                    (false, true) => tracing::warn!("postgres-sink: the database does not answer"),
                    (true, false) => tracing::info!("postgres-sink: the database answers again"),
                    _ => {}
                }
                continue;
            }
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
                Err(e @ WriteError::Fenced { .. }) => {
                    // Not an outage: write the batch again at once. Its other
                    // partitions are still this instance's to write, and what
                    // the other instance wrote is skipped as already written.
                    metrics.sink.retries.inc();
                    tracing::info!("postgres-sink: {e}; writing the batch again");
                }
                Err(e) => {
                    ready.store(false, Ordering::Relaxed);
                    metrics.sink.retries.inc();
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
        Ok(Ok(Err(e))) => return Err(e.into()),
        _ => return Err(SinkError::Consumer("the consumer thread panicked".into())),
    }
    tracing::info!("postgres-sink: stopped");
    result
}

fn record(metrics: &Metrics, batch: &[Item], w: &Written, took: Duration) {
    let m = &metrics.sink;
    m.batch_size.observe(batch.len() as f64);
    m.write_seconds.observe(took.as_secs_f64());
    for (topic, n) in &w.written {
        m.written.with_label_values(&[topic.as_str()]).inc_by(*n);
    }
    for (topic, n) in &w.already_written {
        m.already_written.with_label_values(&[topic.as_str()]).inc_by(*n);
    }
    for (topic, stage) in &w.rejected {
        m.rejected.with_label_values(&[topic.as_str(), stage]).inc();
    }
    for topic in &w.gaps {
        m.offset_gaps.with_label_values(&[topic.as_str()]).inc();
    }
    m.observe_end_to_end(w.event_times.iter().map(|(topic, t)| (topic.as_str(), *t)));
}
