//! The `bigquery-sink` service: entity topics in, rows in BigQuery out, one
//! row per Kafka offset as read through the views.
//!
//! Two halves joined by a bounded channel, as in `postgres-sink`:
//!
//! - the **consumer thread** owns the Kafka consumer (a group member). It
//!   polls, decodes and validates records into batches. On assignment it reads
//!   the group's committed offsets and starts there.
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
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;
use tickpipe_kafka::{future_producer, TopicError};
use tickpipe_ops::now_micros;
use tickpipe_schemas::registry::RegistryConfig;
use tickpipe_schemas::{Codec, Source, Topic, WriteFraming};
use tokio::sync::mpsc;

use super::client::{BigQuery, BqError, Endpoint, TableInfo};
use super::rows::{row, Coordinates};
use super::schema::{
    distinct_letters_query, evolve, latest_candles_query, table_spec, view_query, DecimalColumns, TableSpec,
    DISTINCT_LETTERS, LATEST_CANDLES,
};
use super::COMPONENT;
use crate::decode::{reject_letter, Body, Item, Reject};
use crate::sink::{must, sink_topics, spawn_consumer, ConsumeError, ConsumerSettings, Resume, SinkMetrics};
use tickpipe_kafka::{letter_records, send_letters};

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
    /// Longest pause between retries.
    pub max_backoff: Duration,
    /// How long the group waits for a silent member.
    pub session_timeout: Duration,
    /// Partitions for topics this service creates when they are missing.
    pub partitions: i32,
    /// Replication factor of the topics it creates when they are missing.
    pub replication: i32,
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
    #[error(transparent)]
    Consume(#[from] ConsumeError),
    #[error("stopping with a batch not written: {0}")]
    Unwritten(String),
}

/// The sink's metrics: the core set every sink exports, and its requests.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    sink: SinkMetrics,
    rows: IntCounterVec,
    bytes: IntCounterVec,
    requests: HistogramVec,
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let p = "tickpipe_bigquery_sink";
        let sink = SinkMetrics::new(&registry, p, "BigQuery");
        let counter =
            |name: &str, help: &str| must(IntCounterVec::new(Opts::new(format!("{p}_{name}"), help), &["table"]));
        let m = Metrics {
            rows: counter("rows_written_total", "Rows acknowledged by BigQuery, per table."),
            bytes: counter(
                "bytes_written_total",
                "Bytes of row JSON acknowledged by BigQuery, per table.",
            ),
            requests: must(HistogramVec::new(
                HistogramOpts::new(
                    format!("{p}_request_duration_seconds"),
                    "BigQuery API request latency, by operation.",
                )
                .buckets(prometheus::exponential_buckets(0.001, 2.0, 15).unwrap_or_default()),
                &["operation"],
            )),
            sink,
            registry,
        };
        must(m.registry.register(Box::new(m.rows.clone())));
        must(m.registry.register(Box::new(m.bytes.clone())));
        must(m.registry.register(Box::new(m.requests.clone())));
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
        let description = format!(
            "{}: one row per Kafka record (de-duplicated {}).",
            topic.base_name(),
            spec.table
        );
        let query = view_query(bq.project(), dataset, &spec);
        ensure_view(bq, dataset, &spec.view, &description, &query, refresh_view).await?;
        if *topic == Topic::Candles {
            let description = "candles: the newest version of each candle (the last in Kafka order for its venue, \
                               symbol, interval, origin and open time).";
            let query = latest_candles_query(bq.project(), dataset, &spec);
            ensure_view(bq, dataset, LATEST_CANDLES, description, &query, refresh_view).await?;
        }
        if *topic == Topic::DeadLetters {
            let description = "dead_letters: one letter per component and refused record (a service that crashed \
                               publishes its letters again).";
            let query = distinct_letters_query(bq.project(), dataset, &spec);
            ensure_view(bq, dataset, DISTINCT_LETTERS, description, &query, refresh_view).await?;
        }
        specs.insert(*topic, spec);
    }
    Ok(specs)
}

/// Creates the view `name` over `query`, or saves the query again when the
/// view holds another one (or `refresh`, after its table gained columns);
/// refuses a table of that name that is not a view.
async fn ensure_view(
    bq: &BigQuery,
    dataset: &str,
    name: &str,
    description: &str,
    query: &str,
    refresh: bool,
) -> Result<(), BqSinkError> {
    let definition = json!({"query": query, "useLegacySql": false});
    match bq.table(dataset, name).await? {
        None => {
            let view = json!({
                "tableReference": {"projectId": bq.project(), "datasetId": dataset, "tableId": name},
                "description": description,
                "view": definition,
            });
            bq.create_table(dataset, &view).await?;
        }
        Some(info) if info.kind != "VIEW" => {
            return Err(BqSinkError::Schema(format!(
                "{dataset}.{name} exists and is a {}, not the view this sink keeps there; rename it or use another \
                 dataset",
                info.kind
            )))
        }
        Some(info) if refresh || !saved_as(&info, query) => {
            bq.patch_table(dataset, name, &json!({"view": definition})).await?;
            tracing::info!(view = name, "bigquery-sink: view query saved");
        }
        Some(_) => {}
    }
    Ok(())
}

/// Whether a view may stay as it is. BigQuery reports a view's query, and a
/// view an older release created is saved again with the current one. The
/// emulator reports none: its views are left alone rather than written again
/// at every start. (Re-saving also makes BigQuery pick up a table's new
/// columns; that is decided apart.)
fn saved_as(view: &TableInfo, query: &str) -> bool {
    view.view.as_ref().is_none_or(|v| v.query == query)
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

/// Runs until `shutdown` resolves, then writes the batch in hand and returns.
/// How an operator starts a partition over: the sink's position is the
/// group's committed offset, so reset it (or use a new group, which reads
/// every partition again; the views hide the copies).
fn rebaseline_group(group: &str, topic: &str, partition: i32) -> String {
    format!(
        "stop the sink, reset the group's offset (kafka-consumer-groups.sh --bootstrap-server <brokers> --group \
         {group} --reset-offsets --to-earliest --topic {topic}:{partition} --execute) and restart it; or restart \
         it with a new --group, which reads every partition from its beginning (the views hide the copies)"
    )
}

pub async fn run(config: BqSinkConfig, shutdown: impl Future<Output = ()>) -> Result<(), BqSinkError> {
    let metrics = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));
    let registry_answers = Arc::new(AtomicBool::new(true));
    if let Some(addr) = config.metrics_addr {
        crate::ops::serve_conditions(
            addr,
            metrics.registry.clone(),
            vec![
                (ready.clone(), "not ready: BigQuery is not accepting rows"),
                (
                    registry_answers.clone(),
                    "not ready: the schema registry does not answer (retrying)",
                ),
            ],
        )
        .await
        .map_err(BqSinkError::Metrics)?;
    }
    let bq = BigQuery::connect(config.endpoint.clone(), Some(metrics.requests.clone())).await?;
    let mut shutdown = std::pin::pin!(shutdown);
    // BigQuery failing for a while at start (quota, 5xx, the network) is
    // waited out like it is when writing; other errors need the operator.
    let mut backoff = Duration::from_millis(200);
    let specs = loop {
        let prepared = tokio::select! {
            p = prepare_tables(&bq, &config.dataset, &config.location, &config.topics, config.decimals) => p,
            _ = &mut shutdown => return Ok(()),
        };
        match prepared {
            Ok(specs) => break specs,
            Err(BqSinkError::BigQuery(e)) if e.is_retriable() => {
                metrics.sink.retries.inc();
                tracing::warn!("bigquery-sink: preparing the tables failed, retrying in {backoff:?}: {e}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = &mut shutdown => return Ok(()),
                }
                backoff = (backoff * 2).min(config.max_backoff);
            }
            Err(e) => return Err(e),
        }
    };
    tracing::info!(
        dataset = config.dataset,
        tables = specs.len(),
        "bigquery-sink: tables ready"
    );

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
    let settings = ConsumerSettings {
        component: COMPONENT,
        brokers: config.brokers.clone(),
        group: config.group.clone(),
        session_timeout: config.session_timeout,
        instance_id: None,
        batch_max: config.batch_max,
        batch_wait: config.batch_wait,
        registry: config.registry.clone(),
        registry_answers: registry_answers.clone(),
        rebaseline: rebaseline_group,
    };
    let consumer_thread = spawn_consumer(
        settings,
        topic_of,
        Resume::Committed,
        stop.clone(),
        metrics.sink.clone(),
        batches_tx,
        commits_rx,
    )?;
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
        Ok(Ok(Err(e))) => return result.and(Err(e.into())),
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
                .sink
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
            letters.push(reject_letter(COMPONENT, item, reject, now));
        }
        if !letters.is_empty() {
            let records = letter_records(self.dead_topic, self.codec, &letters)
                .map_err(|e| BqSinkError::Unwritten(format!("encoding a dead letter: {e}")))?;
            self.retrying("dead letters", || async {
                send_letters(self.producer, &records)
                    .await
                    .map_err(|e| BqError::Transport {
                        what: "publishing dead letters".into(),
                        detail: e.to_string(),
                    })
            })
            .await?;
        }

        let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
        let rejected: std::collections::HashSet<usize> = rejects.iter().map(|(i, _)| *i).collect();
        let mut event_times = Vec::with_capacity(batch.len());
        for (i, item) in batch.iter().enumerate() {
            let n = next.entry((item.topic.clone(), item.partition)).or_insert(0);
            *n = (*n).max(item.offset + 1);
            if let (Ok(body), false) = (&item.body, rejected.contains(&i)) {
                self.metrics
                    .sink
                    .written
                    .with_label_values(&[item.topic.as_str()])
                    .inc();
                event_times.push((item.topic.as_str(), body.event_time()));
            }
        }
        self.metrics.sink.observe_end_to_end(event_times);
        self.metrics.sink.batch_size.observe(batch.len() as f64);
        self.metrics.sink.write_seconds.observe(started.elapsed().as_secs_f64());
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
                    self.metrics.sink.retries.inc();
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

#[cfg(test)]
mod tests {
    use super::*;
    use tickpipe_schemas::{Decimal, Price};

    #[test]
    fn a_view_is_saved_again_when_it_holds_another_query() {
        let query = "SELECT 1";
        let view = |json: serde_json::Value| serde_json::from_value::<TableInfo>(json).expect("tables.get answer");
        // As BigQuery's tables.get answers for a view.
        let same = view(json!({"type": "VIEW", "view": {"query": "SELECT 1", "useLegacySql": false}}));
        let older = view(json!({"type": "VIEW", "view": {"query": "SELECT 0", "useLegacySql": false}}));
        // As the emulator answers: no definition, left alone.
        let unknown = view(json!({"type": "VIEW"}));
        assert!(saved_as(&same, query));
        assert!(!saved_as(&older, query));
        assert!(saved_as(&unknown, query));
    }

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
