//! The `bigquery-sink` service: entity topics in, rows in BigQuery out, one
//! row per Kafka offset as read through the views.
//!
//! Two halves joined by a bounded channel, as in `postgres-sink`:
//!
//! - the **consumer thread** owns the Kafka consumer (a group member). It
//!   polls, decodes and validates records into batches. On assignment it reads
//!   the group's committed offsets and starts a little before them (brokers
//!   such as tansu only answer a fetch from a record-batch boundary), skipping
//!   what is below the committed offset.
//! - the **writer** turns a batch into rows, inserts them table by table in
//!   requests of bounded size (each retried on its own until BigQuery
//!   acknowledges it), publishes the rejects to the dead-letters topic, and only
//!   then hands the next offsets back to the consumer thread to commit.
//!
//! A crash between an acknowledged insert and the offset commit makes the
//! rows be written again on restart: the tables are append-only logs that may
//! hold a row twice, and the views keep one row per Kafka coordinate. Offsets
//! are never committed before the rows are acknowledged, so nothing is lost.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::util::Timeout;
use rdkafka::{ClientContext, Message, Offset, Statistics, TopicPartitionList};
use serde_json::json;
use tickpipe_ops::now_micros;
use tickpipe_producer::kafka::{ensure_topic_names, producer_config, TopicError};
use tickpipe_schemas::registry::{RegistryClient, RegistryConfig, RegistryError};
use tickpipe_schemas::validate::Rules;
use tickpipe_schemas::{Codec, DeadLetter, Record, Source, Topic, WriteFraming};
use tokio::sync::mpsc;

use super::client::{BigQuery, BqError, Endpoint};
use super::rows::{row, Coordinates};
use super::schema::{evolve, table_spec, view_query, DecimalColumns, TableSpec};
use super::COMPONENT;
use crate::decode::{decode_item, learn_schema, Body, Item, Reject};
use crate::kafka::{consumer_config, send_all};

/// Everything the sink needs.
#[derive(Debug, Clone)]
pub struct BqSinkConfig {
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// Prefix of every topic name (may be empty).
    pub topic_prefix: String,
    /// The entity topics to consume.
    pub topics: Vec<Topic>,
    /// Consumer group; its committed offsets are where reading resumes.
    pub group: String,
    /// BigQuery's address, project and credentials.
    pub endpoint: Endpoint,
    /// Dataset of the tables and views (created if missing).
    pub dataset: String,
    /// Location of a dataset this sink creates.
    pub location: String,
    /// Column type of decimals.
    pub decimals: DecimalColumns,
    /// Most records per batch.
    pub batch_max: usize,
    /// Longest wait for a batch to fill.
    pub batch_wait: Duration,
    /// Most rows per insert request (BigQuery recommends about 500).
    pub request_rows: usize,
    /// How far before its committed offset a partition is re-read on
    /// assignment (those records are skipped); see `postgres-sink`.
    pub resume_rewind: i64,
    /// Longest pause between retries.
    pub max_backoff: Duration,
    /// How long the group waits for a silent member.
    pub session_timeout: Duration,
    /// Partitions for topics this service creates when they are missing.
    pub partitions: i32,
    /// Where `/metrics`, `/healthz` and `/readyz` are served, if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    /// The Schema Registry for Confluent-framed records, if any.
    pub registry: Option<RegistryConfig>,
}

/// Why the sink stopped.
#[derive(Debug, thiserror::Error)]
pub enum BqSinkError {
    #[error(transparent)]
    BigQuery(#[from] BqError),
    #[error("{0}")]
    Schema(String),
    #[error(transparent)]
    Topics(#[from] TopicError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("metrics endpoint: {0}")]
    Metrics(std::io::Error),
    #[error("the consumer thread failed: {0}")]
    Consumer(String),
    #[error("schema registry: {0}")]
    Registry(#[from] RegistryError),
    #[error("stopping with a batch not written: {0}")]
    Unwritten(String),
}

/// The sink's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    consumed: IntCounterVec,
    written: IntCounterVec,
    rejected: IntCounterVec,
    already_written: IntCounterVec,
    retries: IntCounter,
    batch_size: Histogram,
    write_seconds: Histogram,
    end_to_end: HistogramVec,
    lag: IntGaugeVec,
    rows: IntCounterVec,
    bytes: IntCounterVec,
    requests: HistogramVec,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("metric definition: {e}"))
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let p = "tickpipe_bigquery_sink";
        let counter = |name: &str, help: &str, labels: &[&str]| {
            must(IntCounterVec::new(Opts::new(format!("{p}_{name}"), help), labels))
        };
        let m = Metrics {
            consumed: counter("records_consumed_total", "Records read from Kafka.", &["topic"]),
            written: counter(
                "records_written_total",
                "Records written to their table (acknowledged by BigQuery).",
                &["topic"],
            ),
            rejected: counter(
                "records_rejected_total",
                "Records sent to dead letters, by stage (decode, validate, write).",
                &["topic", "stage"],
            ),
            already_written: counter(
                "records_already_written_total",
                "Records skipped because their offset was committed already.",
                &["topic"],
            ),
            retries: must(IntCounter::new(
                format!("{p}_write_retries_total"),
                "Insert requests or dead-letter publications retried after a failure.",
            )),
            batch_size: must(Histogram::with_opts(
                HistogramOpts::new(format!("{p}_batch_records"), "Records per written batch.")
                    .buckets(vec![1.0, 10.0, 100.0, 1_000.0, 5_000.0, 10_000.0, 50_000.0]),
            )),
            write_seconds: must(Histogram::with_opts(
                HistogramOpts::new(format!("{p}_write_duration_seconds"), "Time to write a batch.")
                    .buckets(prometheus::exponential_buckets(0.001, 2.0, 14).unwrap_or_default()),
            )),
            end_to_end: must(HistogramVec::new(
                HistogramOpts::new(
                    format!("{p}_end_to_end_latency_seconds"),
                    "From the exchange's event time to BigQuery's acknowledgement.",
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
            rows: counter(
                "rows_written_total",
                "Rows acknowledged by BigQuery, per table.",
                &["table"],
            ),
            bytes: counter(
                "bytes_written_total",
                "Bytes of row JSON acknowledged by BigQuery, per table.",
                &["table"],
            ),
            requests: must(HistogramVec::new(
                HistogramOpts::new(
                    format!("{p}_request_duration_seconds"),
                    "BigQuery API request latency, by operation.",
                )
                .buckets(prometheus::exponential_buckets(0.001, 2.0, 15).unwrap_or_default()),
                &["operation"],
            )),
            registry,
        };
        for c in [
            Box::new(m.consumed.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.written.clone()),
            Box::new(m.rejected.clone()),
            Box::new(m.already_written.clone()),
            Box::new(m.retries.clone()),
            Box::new(m.batch_size.clone()),
            Box::new(m.write_seconds.clone()),
            Box::new(m.end_to_end.clone()),
            Box::new(m.lag.clone()),
            Box::new(m.rows.clone()),
            Box::new(m.bytes.clone()),
            Box::new(m.requests.clone()),
        ] {
            must(m.registry.register(c));
        }
        m
    }
}

/// Creates the dataset, the tables and the views that are missing, and adds
/// columns the records gained; refuses a table it cannot write to.
pub async fn prepare_tables(
    bq: &BigQuery,
    dataset: &str,
    location: &str,
    topics: &[Topic],
    decimals: DecimalColumns,
) -> Result<HashMap<Topic, TableSpec>, BqSinkError> {
    bq.ensure_dataset(dataset, location).await?;
    let mut specs = HashMap::new();
    for topic in topics {
        let spec = table_spec(*topic, decimals);
        let mut refresh_view = false;
        match bq.table(dataset, &spec.table).await? {
            None => {
                let resource = json!({
                    "tableReference": {"projectId": bq.project(), "datasetId": dataset, "tableId": spec.table},
                    "description": format!(
                        "Every {} record bigquery-sink wrote, possibly twice after a retry; query the view {} \
                         for one row per Kafka offset.",
                        topic.base_name(),
                        spec.view
                    ),
                    "schema": {"fields": spec.fields},
                    "timePartitioning": {"type": "DAY", "field": spec.partition_by},
                    "clustering": {"fields": spec.cluster_by},
                });
                bq.create_table(dataset, &resource).await?;
                tracing::info!(table = spec.table, "bigquery-sink: created");
            }
            Some(info) => {
                let existing = info.schema.map(|s| s.fields).unwrap_or_default();
                if let Some(fields) = evolve(&format!("{dataset}.{}", spec.table), &existing, &spec.fields)
                    .map_err(BqSinkError::Schema)?
                {
                    bq.patch_table(dataset, &spec.table, &json!({"schema": {"fields": fields}}))
                        .await?;
                    tracing::info!(table = spec.table, "bigquery-sink: added the records' new columns");
                    refresh_view = true;
                }
            }
        }
        let view = json!({
            "tableReference": {"projectId": bq.project(), "datasetId": dataset, "tableId": spec.view},
            "description": format!("{}: one row per Kafka record (de-duplicated {}).", topic.base_name(), spec.table),
            "view": {"query": view_query(bq.project(), dataset, &spec), "useLegacySql": false},
        });
        match bq.table(dataset, &spec.view).await? {
            None => bq.create_table(dataset, &view).await?,
            Some(info) if info.kind != "VIEW" => {
                return Err(BqSinkError::Schema(format!(
                    "{dataset}.{} exists and is a {}, not the view this sink keeps there; rename it or use \
                     another dataset",
                    spec.view, info.kind
                )))
            }
            // Re-saving the query makes BigQuery pick up the new columns.
            Some(_) if refresh_view => {
                bq.patch_table(dataset, &spec.view, &json!({"view": view["view"]}))
                    .await?
            }
            Some(_) => {}
        }
        specs.insert(*topic, spec);
    }
    Ok(specs)
}

/// Rows of one insert request: the batch index of each row and its JSON.
struct Chunk<'a> {
    table: &'a str,
    rows: Vec<(usize, Vec<u8>)>,
}

/// Largest request body (BigQuery's limit is 10 MB).
const MAX_REQUEST_BYTES: usize = 8 << 20;

/// Splits a batch into insert requests and rejects; pure.
fn plan<'a>(
    items: &[Item],
    specs: &'a HashMap<Topic, TableSpec>,
    request_rows: usize,
    now: i64,
) -> (Vec<Chunk<'a>>, Vec<(usize, Reject)>) {
    let mut by_table: BTreeMap<&'a str, Vec<(usize, Vec<u8>)>> = BTreeMap::new();
    let mut rejects = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let body = match &item.body {
            Ok(body) => body,
            Err(reject) => {
                rejects.push((i, reject.clone()));
                continue;
            }
        };
        let Some(spec) = specs.get(&body.topic()) else {
            rejects.push((
                i,
                write_reject(format!("no table for {}", body.topic().base_name()), body),
            ));
            continue;
        };
        let at = Coordinates {
            topic: &item.topic,
            partition: item.partition,
            offset: item.offset,
        };
        match row(&body.values(), &spec.fields, at, now) {
            Ok(json) => {
                let insert_id = format!("{}:{}:{}", item.topic, item.partition, item.offset);
                let bytes = serde_json::to_vec(&json!({"insertId": insert_id, "json": json})).unwrap_or_default();
                by_table.entry(spec.table.as_str()).or_default().push((i, bytes));
            }
            Err(e) => rejects.push((i, write_reject(e, body))),
        }
    }
    let mut chunks = Vec::new();
    for (table, rows) in by_table {
        let mut current = Chunk {
            table,
            rows: Vec::new(),
        };
        let mut size = 0;
        for (i, bytes) in rows {
            if !current.rows.is_empty()
                && (current.rows.len() >= request_rows.max(1) || size + bytes.len() > MAX_REQUEST_BYTES)
            {
                chunks.push(std::mem::replace(
                    &mut current,
                    Chunk {
                        table,
                        rows: Vec::new(),
                    },
                ));
                size = 0;
            }
            size += bytes.len() + 1;
            current.rows.push((i, bytes));
        }
        if !current.rows.is_empty() {
            chunks.push(current);
        }
    }
    (chunks, rejects)
}

fn write_reject(error: String, body: &Body) -> Reject {
    Reject {
        stage: "write",
        error,
        source: body.source(),
    }
}

/// Inserts one request's rows, isolating rows BigQuery refuses: a refused
/// request is split in halves until the rows it refuses stand alone. A lone
/// row that fails with a server error is blamed only if other rows of the
/// request went through meanwhile (otherwise it is an outage, and the error
/// is returned for the caller to retry).
async fn insert_isolating(
    bq: &BigQuery,
    dataset: &str,
    table: &str,
    rows: &[(usize, Vec<u8>)],
) -> Result<Vec<(usize, String)>, BqError> {
    let mut refused = Vec::new();
    let mut suspects: Vec<(usize, BqError)> = Vec::new();
    let mut some_went_through = false;
    let mut pending = vec![(0, rows.len())];
    while let Some((from, to)) = pending.pop() {
        let slice: Vec<&[u8]> = rows[from..to].iter().map(|(_, b)| b.as_slice()).collect();
        match bq.insert_all(dataset, table, &slice).await {
            Ok(errors) => {
                some_went_through |= errors.len() < slice.len();
                refused.extend(errors.into_iter().map(|r| (rows[from + r.index].0, r.reason)));
            }
            Err(e) if e.may_be_the_data() && to - from > 1 => {
                let mid = from + (to - from) / 2;
                pending.push((mid, to));
                pending.push((from, mid));
            }
            Err(e) if e.may_be_the_data() && !e.is_retriable() => refused.push((rows[from].0, e.reason())),
            Err(e) if e.may_be_the_data() => suspects.push((from, e)),
            Err(e) => return Err(e),
        }
    }
    for (at, first) in suspects {
        // Once more on its own before the row is blamed for a server error.
        let error = match bq.insert_all(dataset, table, &[rows[at].1.as_slice()]).await {
            Ok(errors) => {
                refused.extend(errors.into_iter().map(|r| (rows[at].0, r.reason)));
                continue;
            }
            Err(e) if e.may_be_the_data() => e,
            Err(e) => return Err(e),
        };
        if !some_went_through {
            return Err(first);
        }
        refused.push((rows[at].0, error.reason()));
    }
    Ok(refused)
}

/// Where a partition's reading stands.
#[derive(Debug, Default, Clone, Copy)]
struct Position {
    /// Records below this offset were written (the committed offset at assignment).
    written_below: Option<i64>,
}

/// What the consumer thread shares with the rebalance callback.
struct SinkContext {
    rewind: i64,
    positions: Arc<Mutex<HashMap<(String, i32), Position>>>,
    stop: Arc<AtomicBool>,
    metrics: Metrics,
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
    /// Eager rebalancing, with the assigned partitions positioned a little
    /// before the group's committed offsets.
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut backoff = Duration::from_millis(100);
                let committed = loop {
                    match consumer.committed_offsets(tpl.clone(), Timeout::After(Duration::from_secs(10))) {
                        Ok(c) => break c,
                        Err(e) if self.stop.load(Ordering::Relaxed) => {
                            tracing::warn!("bigquery-sink: stopping before the committed offsets were read: {e}");
                            return;
                        }
                        Err(e) => {
                            tracing::warn!("bigquery-sink: reading committed offsets failed, retrying: {e}");
                            std::thread::sleep(backoff);
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                        }
                    }
                };
                let mut positioned = TopicPartitionList::new();
                let mut positions = self.positions.lock().unwrap_or_else(|p| p.into_inner());
                for e in committed.elements() {
                    let tp = (e.topic().to_owned(), e.partition());
                    let (offset, position) = match e.offset() {
                        Offset::Offset(next) => (
                            Offset::Offset(next.saturating_sub(self.rewind).max(0)),
                            Position {
                                written_below: Some(next),
                            },
                        ),
                        _ => (Offset::Beginning, Position::default()),
                    };
                    positions.insert(tp.clone(), position);
                    tracing::info!(topic = tp.0, partition = tp.1, ?offset, "bigquery-sink: assigned");
                    if let Err(e) = positioned.add_partition_offset(&tp.0, tp.1, offset) {
                        tracing::error!("bigquery-sink: cannot position {}[{}]: {e}", tp.0, tp.1);
                    }
                }
                if let Err(e) = consumer.assign(&positioned) {
                    tracing::error!("bigquery-sink: assign failed: {e}");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(partitions = tpl.count(), "bigquery-sink: partitions revoked");
                if let Err(e) = consumer.unassign() {
                    tracing::error!("bigquery-sink: unassign failed: {e}");
                }
            }
            other => {
                tracing::error!("bigquery-sink: rebalance error {other:?}");
                let _ = consumer.unassign();
            }
        }
    }
}

/// Runs until `shutdown` resolves, then writes the batch in hand and returns.
pub async fn run(config: BqSinkConfig, shutdown: impl Future<Output = ()>) -> Result<(), BqSinkError> {
    let metrics = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));
    if let Some(addr) = config.metrics_addr {
        crate::ops::serve(
            addr,
            metrics.registry.clone(),
            ready.clone(),
            "not ready: BigQuery is not accepting rows",
        )
        .await
        .map_err(BqSinkError::Metrics)?;
    }
    let bq = BigQuery::connect(config.endpoint.clone(), Some(metrics.requests.clone())).await?;
    let specs = prepare_tables(&bq, &config.dataset, &config.location, &config.topics, config.decimals).await?;
    tracing::info!(
        dataset = config.dataset,
        tables = specs.len(),
        "bigquery-sink: tables ready"
    );

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
    let consumer_thread = {
        let config = config.clone();
        let stop = stop.clone();
        let metrics = metrics.clone();
        let runtime = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("bigquery-sink-consumer".into())
            .spawn(move || consume(config, topic_of, runtime, stop, metrics, batches_tx, commits_rx))
            .map_err(|e| BqSinkError::Consumer(e.to_string()))?
    };
    ready.store(true, Ordering::Relaxed);

    let codec = Codec::new(WriteFraming::SingleObject);
    let writer = Writer {
        bq: &bq,
        config: &config,
        specs: &specs,
        producer: &producer,
        dead_topic: &dead_topic,
        codec: &codec,
        metrics: &metrics,
        ready: &ready,
        stop: &stop,
    };
    let mut shutdown = std::pin::pin!(shutdown);
    let mut result = Ok(());
    loop {
        let batch = tokio::select! {
            _ = &mut shutdown, if !stop.load(Ordering::Relaxed) => {
                tracing::info!("bigquery-sink: stopping");
                stop.store(true, Ordering::Relaxed);
                continue;
            }
            b = batches.recv() => match b { Some(b) => b, None => break },
        };
        match writer.write(&batch).await {
            Ok(next) => {
                let mut tpl = TopicPartitionList::new();
                for ((topic, partition), next) in &next {
                    let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next));
                }
                let _ = commits_tx.send(tpl);
            }
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                result = Err(e);
                break;
            }
        }
    }
    drop(batches);
    drop(commits_tx);
    match tokio::task::spawn_blocking(move || consumer_thread.join()).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return result.and(Err(e)),
        _ => return Err(BqSinkError::Consumer("the consumer thread panicked".into())),
    }
    tracing::info!("bigquery-sink: stopped");
    result
}

/// Writes batches: rows to BigQuery, rejects to the dead-letters topic.
struct Writer<'a> {
    bq: &'a BigQuery,
    config: &'a BqSinkConfig,
    specs: &'a HashMap<Topic, TableSpec>,
    producer: &'a FutureProducer,
    dead_topic: &'a str,
    codec: &'a Codec,
    metrics: &'a Metrics,
    ready: &'a AtomicBool,
    stop: &'a AtomicBool,
}

impl Writer<'_> {
    /// Writes a batch and returns the next offset of each partition in it.
    async fn write(&self, batch: &[Item]) -> Result<BTreeMap<(String, i32), i64>, BqSinkError> {
        let started = Instant::now();
        let now = now_micros();
        let (chunks, mut rejects) = plan(batch, self.specs, self.config.request_rows, now);
        for chunk in &chunks {
            let refused = self
                .retrying("insert", || {
                    insert_isolating(self.bq, &self.config.dataset, chunk.table, &chunk.rows)
                })
                .await?;
            let bytes: usize = chunk
                .rows
                .iter()
                .filter(|(i, _)| !refused.iter().any(|(r, _)| r == i))
                .map(|(_, b)| b.len())
                .sum();
            let n = chunk.rows.len() - refused.len();
            self.metrics.rows.with_label_values(&[chunk.table]).inc_by(n as u64);
            self.metrics
                .bytes
                .with_label_values(&[chunk.table])
                .inc_by(bytes as u64);
            for (i, reason) in refused {
                tracing::warn!(table = chunk.table, "bigquery-sink: {reason}");
                let source = batch[i].body.as_ref().map(Body::source).unwrap_or(Source::Unknown);
                rejects.push((
                    i,
                    Reject {
                        stage: "write",
                        error: reason,
                        source,
                    },
                ));
            }
        }

        // Rejects go to the dead-letters topic (and from there, like every
        // dead letter, into the dead_letters table), except a letter of this
        // sink that BigQuery refused: publishing it again would loop.
        let mut letters = Vec::with_capacity(rejects.len());
        for (i, reject) in &rejects {
            let item = &batch[*i];
            self.metrics
                .rejected
                .with_label_values(&[item.topic.as_str(), reject.stage])
                .inc();
            if matches!(&item.body, Ok(Body::DeadLetter(d)) if d.component == COMPONENT) {
                tracing::error!(
                    topic = item.topic,
                    partition = item.partition,
                    offset = item.offset,
                    "bigquery-sink: BigQuery refused one of this sink's own dead letters; it stays in Kafka only: {}",
                    reject.error
                );
                continue;
            }
            letters.push(letter(item, reject, now));
        }
        if !letters.is_empty() {
            let mut records = Vec::with_capacity(letters.len());
            for l in &letters {
                let bytes = self
                    .codec
                    .encode(l)
                    .map_err(|e| BqSinkError::Unwritten(format!("encoding a dead letter: {e}")))?;
                records.push((self.dead_topic.to_owned(), l.key(), bytes));
            }
            self.retrying("dead letters", || async {
                send_all(self.producer, records.clone())
                    .await
                    .map_err(|e| BqError::Transport {
                        what: "publishing dead letters".into(),
                        detail: e.to_string(),
                    })
            })
            .await?;
        }

        let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
        let ack = now_micros();
        for (i, item) in batch.iter().enumerate() {
            let n = next.entry((item.topic.clone(), item.partition)).or_insert(0);
            *n = (*n).max(item.offset + 1);
            if let Ok(body) = &item.body {
                if !rejects.iter().any(|(r, _)| *r == i) {
                    self.metrics.written.with_label_values(&[item.topic.as_str()]).inc();
                    self.metrics
                        .end_to_end
                        .with_label_values(&[item.topic.as_str()])
                        .observe((ack - body.event_time()).max(0) as f64 / 1e6);
                }
            }
        }
        self.metrics.batch_size.observe(batch.len() as f64);
        self.metrics.write_seconds.observe(started.elapsed().as_secs_f64());
        Ok(next)
    }

    /// Retries an operation with backoff until it succeeds, fails for good, or
    /// the sink has been stopping for 30 s.
    async fn retrying<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, BqSinkError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, BqError>>,
    {
        let mut backoff = Duration::from_millis(100);
        let mut stopping_since: Option<Instant> = None;
        loop {
            match op().await {
                Ok(v) => {
                    self.ready.store(true, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(e) if e.is_fatal() => return Err(e.into()),
                Err(e) => {
                    self.ready.store(false, Ordering::Relaxed);
                    self.metrics.retries.inc();
                    tracing::warn!("bigquery-sink: {what} failed, retrying in {backoff:?}: {e}");
                    if self.stop.load(Ordering::Relaxed)
                        && stopping_since.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(30)
                    {
                        return Err(BqSinkError::Unwritten(e.to_string()));
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.config.max_backoff);
                }
            }
        }
    }
}

/// A record this sink could not write, as a dead letter.
fn letter(item: &Item, reject: &Reject, now: i64) -> DeadLetter {
    DeadLetter {
        stage: reject.stage.to_owned(),
        error: reject.error.clone(),
        component: COMPONENT.to_owned(),
        topic: Some(item.topic.clone()),
        partition: Some(item.partition),
        offset: Some(item.offset),
        key: item.key.clone(),
        payload: item.payload.clone(),
        source: reject.source,
        event_time: now,
        ingest_time: now,
    }
}

/// The consumer thread: poll, decode, batch, hand over; commit what the writer
/// wrote.
fn consume(
    config: BqSinkConfig,
    topic_of: HashMap<String, Topic>,
    runtime: tokio::runtime::Handle,
    stop: Arc<AtomicBool>,
    metrics: Metrics,
    batches: mpsc::Sender<Vec<Item>>,
    commits: std::sync::mpsc::Receiver<TopicPartitionList>,
) -> Result<(), BqSinkError> {
    let positions: Arc<Mutex<HashMap<(String, i32), Position>>> = Arc::default();
    let context = SinkContext {
        rewind: config.resume_rewind,
        positions: positions.clone(),
        stop: stop.clone(),
        metrics: metrics.clone(),
    };
    let mut cc = consumer_config(&config.brokers, &config.group);
    cc.set("statistics.interval.ms", "5000")
        .set("session.timeout.ms", config.session_timeout.as_millis().to_string());
    let registry = config.registry.clone().map(RegistryClient::new).transpose()?;
    let consumer: BaseConsumer<SinkContext> = cc.create_with_context(context)?;
    let names: Vec<&str> = topic_of.keys().map(String::as_str).collect();
    consumer.subscribe(&names)?;
    let codec = Codec::new(WriteFraming::SingleObject);

    let mut batch: Vec<Item> = Vec::with_capacity(config.batch_max);
    let mut opened = Instant::now();
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        while let Ok(tpl) = commits.try_recv() {
            if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
                tracing::warn!("bigquery-sink: offset commit failed (the rows may be written again): {e}");
            }
        }
        if !batch.is_empty() && (batch.len() >= config.batch_max || opened.elapsed() >= config.batch_wait || stopping) {
            let mut b = std::mem::replace(&mut batch, Vec::with_capacity(config.batch_max));
            // Wait for the writer; the group keeps us meanwhile (heartbeats
            // run in the background).
            loop {
                match batches.try_send(b) {
                    Ok(()) => break,
                    Err(mpsc::error::TrySendError::Full(back)) => {
                        b = back;
                        std::thread::sleep(Duration::from_millis(2));
                        while let Ok(tpl) = commits.try_recv() {
                            let _ = consumer.commit(&tpl, CommitMode::Async);
                        }
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
                }
            }
        }
        if stopping {
            break;
        }
        let Some(polled) = consumer.poll(Duration::from_millis(20)) else {
            continue;
        };
        let msg = match polled {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("bigquery-sink: kafka: {e}");
                continue;
            }
        };
        metrics.consumed.with_label_values(&[msg.topic()]).inc();
        let below = {
            let positions = positions.lock().unwrap_or_else(|p| p.into_inner());
            positions
                .get(&(msg.topic().to_owned(), msg.partition()))
                .and_then(|p| p.written_below)
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
    // Commit what the writer writes until it is done.
    drop(batches);
    while let Ok(tpl) = commits.recv() {
        if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
            tracing::warn!("bigquery-sink: final offset commit failed (the rows may be written again): {e}");
        }
    }
    consumer.unsubscribe();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tickpipe_schemas::{Decimal, Price};

    fn item(offset: i64, body: Result<Body, Reject>) -> Item {
        Item {
            topic: "prices".into(),
            partition: 0,
            offset,
            key: None,
            payload: vec![1, 2, 3],
            body,
        }
    }

    fn price(offset: i64) -> Item {
        item(
            offset,
            Ok(Body::Price(Price {
                asset_id: "bitcoin".into(),
                price_usd: Decimal::from(offset),
                source: Source::Coincap,
                event_time: 1_700_000_000_000_000,
                ingest_time: 1_700_000_000_000_000,
            })),
        )
    }

    #[test]
    fn a_batch_is_planned_into_bounded_requests_and_rejects() {
        let specs: HashMap<Topic, TableSpec> =
            [(Topic::Prices, table_spec(Topic::Prices, DecimalColumns::String))].into();
        let mut items: Vec<Item> = (0..7).map(price).collect();
        items.insert(
            3,
            item(
                100,
                Err(Reject {
                    stage: "decode",
                    error: "garbage".into(),
                    source: Source::Unknown,
                }),
            ),
        );
        let (chunks, rejects) = plan(&items, &specs, 3, 0);
        assert_eq!(chunks.iter().map(|c| c.rows.len()).collect::<Vec<_>>(), [3, 3, 1]);
        assert!(chunks.iter().all(|c| c.table == "prices_raw"));
        assert_eq!(rejects.len(), 1);
        assert_eq!(rejects[0].0, 3);
        // Rows keep their batch index, skipping the reject.
        let indexes: Vec<usize> = chunks.iter().flat_map(|c| c.rows.iter().map(|(i, _)| *i)).collect();
        assert_eq!(indexes, [0, 1, 2, 4, 5, 6, 7]);
        let first: serde_json::Value = serde_json::from_slice(&chunks[0].rows[0].1).expect("json");
        assert_eq!(first["insertId"], "prices:0:0");
        assert_eq!(first["json"]["price_usd"], "0");
    }

    #[test]
    fn a_record_without_a_table_is_a_write_reject() {
        let specs = HashMap::new();
        let (chunks, rejects) = plan(&[price(1)], &specs, 500, 0);
        assert!(chunks.is_empty());
        assert_eq!(
            (rejects[0].1.stage, rejects[0].1.error.as_str()),
            ("write", "no table for prices")
        );
    }
}
