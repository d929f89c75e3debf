//! The `bigquery-sink` service: entity topics in, rows in BigQuery out, one
//! row per Kafka offset as read through the views. The sink runtime
//! ([`crate::sink`]) reads and batches, resuming from the group's committed
//! offsets; this sink turns a batch into rows ([`super::plan`]), inserts them
//! table by table in requests of bounded size (each retried on its own until
//! BigQuery acknowledges it, refused rows isolated), and publishes the
//! rejects to the dead-letters topic; only then are the offsets committed.
//!
//! A crash between an acknowledged insert and the offset commit makes the
//! rows be written again on restart: the tables are append-only logs that may
//! hold a row twice, and the views keep one row per Kafka coordinate. Offsets
//! are never committed before the rows are acknowledged, so nothing is lost.

use std::collections::{HashMap, HashSet};
use std::future::Future;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use tickpipe_ops::metrics::register;
use tickpipe_ops::now_micros;
use tickpipe_schemas::Topic;

use super::client::{BigQuery, BqError, Endpoint};
use super::plan::plan;
use super::schema::{DecimalColumns, TableSpec};
use super::tables::prepare_tables;
use super::COMPONENT;
use crate::decode::{Item, Reject};
pub use crate::sink::SinkError;
use crate::sink::{fatal, target, Failure, Opening, Out, Resume, Sink, SinkDefaults, SinkSettings, Written};

/// The `bigquery-sink` binary's defaults.
pub const DEFAULTS: SinkDefaults = SinkDefaults {
    group: "tickpipe-bigquery-sink",
    batch_max: 10_000,
    batch_wait_ms: 500,
    max_backoff_ms: 10_000,
    metrics_addr: "127.0.0.1:9105",
};

/// Everything the sink needs.
#[derive(Debug, Clone)]
pub struct BqSinkConfig {
    /// What every sink is configured with; its group's committed offsets are
    /// where reading resumes.
    pub sink: SinkSettings,
    /// BigQuery's address, project and credentials.
    pub endpoint: Endpoint,
    /// Dataset of the tables and views (created if missing).
    pub dataset: String,
    /// Location of a dataset this sink creates.
    pub location: String,
    /// Column type of decimals.
    pub decimals: DecimalColumns,
    /// Most rows per insert request (BigQuery recommends about 500).
    pub request_rows: usize,
}

/// The sink's own metrics, besides the core set.
struct Metrics {
    rows: IntCounterVec,
    bytes: IntCounterVec,
    requests: HistogramVec,
}

impl Metrics {
    fn new(registry: &Registry) -> Self {
        let p = "tickpipe_bigquery_sink";
        let counter = |name: &str, help: &str| {
            register(
                registry,
                IntCounterVec::new(Opts::new(format!("{p}_{name}"), help), &["table"]),
            )
        };
        let m = Metrics {
            rows: counter("rows_written_total", "Rows acknowledged by BigQuery, per table."),
            bytes: counter(
                "bytes_written_total",
                "Bytes of row JSON acknowledged by BigQuery, per table.",
            ),
            requests: register(
                registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        format!("{p}_request_duration_seconds"),
                        "BigQuery API request latency, by operation.",
                    )
                    .buckets(prometheus::exponential_buckets(0.001, 2.0, 15).unwrap_or_default()),
                    &["operation"],
                ),
            ),
        };
        m
    }
}

/// BigQuery as a sink.
struct BigQuerySink {
    bq: BigQuery,
    dataset: String,
    request_rows: usize,
    specs: HashMap<Topic, TableSpec>,
    metrics: Metrics,
}

/// A BigQuery failure as the runtime handles it.
fn failure(e: BqError) -> Failure {
    if e.is_fatal() {
        fatal(e)
    } else {
        Failure::Outage(e.to_string())
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

impl Sink for BigQuerySink {
    const NAME: &'static str = COMPONENT;
    const METRICS_PREFIX: &'static str = "tickpipe_bigquery_sink";
    const TARGET: &'static str = "BigQuery";
    const NOT_READY: &'static str = "not ready: BigQuery is not accepting rows";

    fn resume(&self) -> Resume {
        Resume::Committed
    }

    /// How an operator starts a partition over: the sink's position is the
    /// group's committed offset, so reset it (or use a new group, which reads
    /// every partition again; the views hide the copies).
    fn rebaseline(group: &str, topic: &str, partition: i32) -> String {
        format!(
            "stop the sink, reset the group's offset (kafka-consumer-groups.sh --bootstrap-server <brokers> --group \
             {group} --reset-offsets --to-earliest --topic {topic}:{partition} --execute) and restart it; or restart \
             it with a new --group, which reads every partition from its beginning (the views hide the copies)"
        )
    }

    async fn write(&self, batch: &[Item], out: &Out<'_>) -> Result<Written, Failure> {
        let now = now_micros();
        let (chunks, mut rejects) = plan(batch, &self.specs, self.request_rows, now);
        for chunk in &chunks {
            let refused = out
                .retrying("insert", || async {
                    insert_isolating(&self.bq, &self.dataset, chunk.table, &chunk.rows)
                        .await
                        .map_err(failure)
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
                rejects.push((i, Reject::write(&batch[i], reason)));
            }
        }

        // Rejects go to the dead-letters topic (and from there, like every
        // dead letter, into the dead_letters table), except a letter of this
        // sink that BigQuery refused: publishing it again would loop.
        let mut written = Written {
            next: Written::next_offsets(batch),
            ..Written::default()
        };
        out.reject(batch, &rejects, &mut written, now).await?;

        let rejected: HashSet<usize> = rejects.iter().map(|(i, _)| *i).collect();
        for (i, item) in batch.iter().enumerate() {
            if let (Ok(body), false) = (&item.body, rejected.contains(&i)) {
                *written.written.entry(item.topic.clone()).or_default() += 1;
                written.event_times.push((item.topic.clone(), body.event_time()));
            }
        }
        Ok(written)
    }
}

/// Runs until `shutdown` resolves, then writes the batch in hand and returns.
pub async fn run(config: BqSinkConfig, shutdown: impl Future<Output = ()>) -> Result<(), SinkError> {
    let settings = config.sink.clone();
    let open = |opening: Opening| async move {
        let metrics = Metrics::new(&opening.registry);
        let bq = BigQuery::connect(config.endpoint.clone(), Some(metrics.requests.clone()))
            .await
            .map_err(target)?;
        // BigQuery failing for a while at start (quota, 5xx, the network) is
        // waited out like it is when writing; other errors need the operator.
        let mut backoff = std::time::Duration::from_millis(200);
        let specs = loop {
            match prepare_tables(
                &bq,
                &config.dataset,
                &config.location,
                &config.sink.topics,
                config.decimals,
            )
            .await
            {
                Ok(specs) => break specs,
                Err(e) if e.is_retriable() => {
                    opening.metrics.retries.inc();
                    tracing::warn!("bigquery-sink: preparing the tables failed, retrying in {backoff:?}: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(opening.max_backoff);
                }
                Err(e) => return Err(target(e)),
            }
        };
        tracing::info!(
            dataset = config.dataset,
            tables = specs.len(),
            "bigquery-sink: tables ready"
        );
        Ok(BigQuerySink {
            bq,
            dataset: config.dataset.clone(),
            request_rows: config.request_rows,
            specs,
            metrics,
        })
    };
    crate::sink::run(settings, open, shutdown).await
}
