//! `lake-sink` on the sink runtime: each Kafka partition's records gathered
//! per lake folder ([`layout`](super::layout)) into a buffer, written as one
//! Parquet file when it is big enough, old enough, when the buffers together
//! hold too much, or when the sink stops.
//!
//! Exactly once, without a store of its own:
//!
//! - A file holds every record of one Kafka partition in its folder from its
//!   first to its last offset, and its name says so. It is uploaded in one
//!   request and becomes visible complete or not at all (a local file is
//!   written aside and renamed).
//! - Before a file is written, the folder is listed again and the buffer
//!   trimmed to the records above the highest last offset of that partition's
//!   files there: what another instance (after a rebalance) or an earlier run
//!   wrote is not written twice. When a folder is first met, the same listing
//!   says which records it holds already.
//! - The offset committed for a partition is the first offset of its oldest
//!   open buffer (every record below it is in a file or a dead letter), or
//!   the next offset when nothing is open. A restart reads from there and
//!   skips what the files hold.
//!
//! A crash therefore loses nothing and duplicates nothing; it rewrites the
//! open buffers' records into files of the same names and contents or,
//! cut differently, into files that start after the ones written. One race
//! remains: two instances writing the same partition's folder at the same
//! moment during a rebalance (each listed before the other's upload) can each
//! write a file over the same offsets. The `kafka_*` columns identify a row,
//! so readers that must be exact can keep one row per coordinate.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_schema::SchemaRef;
use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tickpipe_ops::metrics::register;
use tickpipe_ops::now_micros;
use tickpipe_schemas::Topic;
use tokio::sync::Mutex;

use super::columns::{self, Row};
use super::layout::{self, FileName};
use super::store::{self, Target};
use super::COMPONENT;
use crate::decode::{Item, Reject};
pub use crate::sink::SinkError;
use crate::sink::{fatal, target, Failure, Opening, Out, Resume, Sink, SinkDefaults, SinkSettings, Written};

/// The `lake-sink` binary's defaults.
pub const DEFAULTS: SinkDefaults = SinkDefaults {
    group: "tickpipe-lake-sink",
    batch_max: 10_000,
    batch_wait_ms: 500,
    max_backoff_ms: 10_000,
    metrics_addr: "127.0.0.1:9107",
};

/// The largest file size allowed: a file's string columns must stay below
/// Arrow's 2 GiB per array.
pub const FILE_MAX_BYTES: usize = 1 << 30;

/// Everything the sink needs.
#[derive(Debug, Clone)]
pub struct LakeSinkConfig {
    /// What every sink is configured with; its group's committed offsets are
    /// where reading resumes.
    pub sink: SinkSettings,
    /// Where the lake is.
    pub target: Target,
    /// A file is written once its records take this many bytes (as encoded
    /// in Kafka; the Parquet file is several times smaller); at most
    /// [`FILE_MAX_BYTES`].
    pub file_max_bytes: usize,
    /// A file is written once its first record has waited this long.
    pub file_max_age: Duration,
    /// When all open files together hold more than this (encoded bytes), the
    /// largest is written.
    pub buffer_max_bytes: usize,
}

impl LakeSinkConfig {
    /// The binary's defaults: files of up to 64 MiB of records or 5 minutes,
    /// 256 MiB held in all.
    pub fn new(sink: SinkSettings, target: Target) -> Self {
        LakeSinkConfig {
            sink,
            target,
            file_max_bytes: 64 << 20,
            file_max_age: Duration::from_secs(300),
            buffer_max_bytes: 256 << 20,
        }
    }
}

/// Why a file was written.
#[derive(Debug, Clone, Copy)]
enum Roll {
    Size,
    Age,
    Memory,
    Stop,
}

impl Roll {
    fn as_str(self) -> &'static str {
        match self {
            Roll::Size => "size",
            Roll::Age => "time",
            Roll::Memory => "memory",
            Roll::Stop => "stop",
        }
    }
}

/// The sink's own metrics, besides the core set.
struct Metrics {
    files: IntCounterVec,
    bytes: IntCounterVec,
    rows: IntCounterVec,
    upload_retries: IntCounter,
    upload_seconds: Histogram,
    buffered_records: IntGauge,
    buffered_bytes: IntGauge,
}

impl Metrics {
    fn new(registry: &Registry) -> Self {
        let p = "tickpipe_lake_sink";
        let counter = |name: &str, help: &str, labels: &[&str]| {
            register(
                registry,
                IntCounterVec::new(Opts::new(format!("{p}_{name}"), help), labels),
            )
        };
        let gauge = |name: &str, help: &str| register(registry, IntGauge::new(format!("{p}_{name}"), help));
        Metrics {
            files: counter(
                "files_written_total",
                "Parquet files written, per entity and why the file was rolled over (size, time, memory, stop).",
                &["table", "reason"],
            ),
            bytes: counter(
                "bytes_written_total",
                "Bytes of Parquet files written, per entity.",
                &["table"],
            ),
            rows: counter(
                "rows_written_total",
                "Rows in the Parquet files written, per entity.",
                &["table"],
            ),
            upload_retries: register(
                registry,
                IntCounter::new(format!("{p}_upload_retries_total"), "Uploads and listings retried."),
            ),
            upload_seconds: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(format!("{p}_upload_duration_seconds"), "Time to upload one file.")
                        .buckets(prometheus::exponential_buckets(0.001, 2.0, 16).unwrap_or_default()),
                ),
            ),
            buffered_records: gauge("buffered_records", "Records held in files not written yet."),
            buffered_bytes: gauge("buffered_bytes", "Encoded bytes of the records held in open files."),
        }
    }
}

/// One Kafka partition's records in one folder: what a file holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Stream {
    folder: String,
    topic: String,
    partition: i32,
}

/// A file being gathered.
struct Buffer {
    entity: Topic,
    rows: Vec<Row>,
    bytes: usize,
    opened: Instant,
}

#[derive(Default)]
struct State {
    open: HashMap<Stream, Buffer>,
    /// The last offset in each stream's files, as last listed (`None`: no file).
    filed: HashMap<Stream, Option<i64>>,
    /// The last offset seen of each partition.
    seen: HashMap<(String, i32), i64>,
    buffered_bytes: usize,
}

impl State {
    /// Forgets what is held of a partition that is read again from an earlier
    /// offset (it was assigned anew): the records come again.
    fn forget(&mut self, topic: &str, partition: i32) {
        let of = |s: &Stream| s.topic == topic && s.partition == partition;
        let dropped: usize = self.open.iter().filter(|(s, _)| of(s)).map(|(_, b)| b.bytes).sum();
        self.open.retain(|s, _| !of(s));
        self.filed.retain(|s, _| !of(s));
        self.buffered_bytes -= dropped;
    }

    /// The offset to commit for a partition: the first of its open buffers,
    /// or the one after the last seen.
    fn next(&self, topic: &str, partition: i32) -> Option<i64> {
        let open = self
            .open
            .iter()
            .filter(|(s, _)| s.topic == topic && s.partition == partition)
            .filter_map(|(_, b)| b.rows.first().map(|r| r.offset))
            .min();
        open.or_else(|| self.seen.get(&(topic.to_owned(), partition)).map(|s| s + 1))
    }
}

/// The lake as a sink.
struct LakeSink {
    store: Arc<dyn ObjectStore>,
    schemas: HashMap<Topic, SchemaRef>,
    file_max_bytes: usize,
    file_max_age: Duration,
    buffer_max_bytes: usize,
    state: Mutex<State>,
    metrics: Metrics,
}

/// A storage failure: waited out, as the store may answer again.
fn outage(what: &str, e: object_store::Error) -> Failure {
    Failure::Outage(format!("{what}: {e}"))
}

impl LakeSink {
    /// The last offset of a stream's files in its folder.
    async fn filed(&self, stream: &Stream) -> Result<Option<i64>, Failure> {
        let folder = Path::parse(&stream.folder).map_err(fatal)?;
        let listed = match self.store.list_with_delimiter(Some(&folder)).await {
            Ok(listed) => listed,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => {
                self.metrics.upload_retries.inc();
                return Err(outage(&format!("listing {folder}"), e));
            }
        };
        Ok(listed
            .objects
            .iter()
            .filter_map(|o| o.location.filename().and_then(FileName::parse))
            .filter(|f| f.topic == stream.topic && f.partition == stream.partition)
            .map(|f| f.last)
            .max())
    }

    /// Writes a stream's buffer as one file (what the folder does not hold
    /// yet), adding what it wrote to `written`.
    async fn write_file(
        &self,
        state: &mut State,
        stream: Stream,
        buffer: Buffer,
        roll: Roll,
        out: &Out<'_>,
        written: &mut Written,
    ) -> Result<(), SinkError> {
        state.buffered_bytes -= buffer.bytes;
        let filed = out.retrying("list", || self.filed(&stream)).await?;
        state.filed.insert(stream.clone(), filed);
        let total = buffer.rows.len();
        let rows: Vec<Row> = buffer
            .rows
            .into_iter()
            .filter(|r| filed.is_none_or(|f| r.offset > f))
            .collect();
        if rows.len() < total {
            *written.already_written.entry(stream.topic.clone()).or_default() += (total - rows.len()) as u64;
        }
        let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
            return Ok(());
        };
        let name = FileName {
            topic: stream.topic.clone(),
            partition: stream.partition,
            first: first.offset,
            last: last.offset,
        };
        let path = Path::parse(format!("{}/{}", stream.folder, name.render())).map_err(target)?;
        let schema = self
            .schemas
            .get(&buffer.entity)
            .ok_or_else(|| SinkError::Unwritten(format!("no columns for {}", buffer.entity.base_name())))?;
        let file = columns::batch(schema, &stream.topic, stream.partition, &rows)
            .and_then(|b| columns::parquet(&b))
            .map_err(|e| SinkError::Unwritten(format!("{path}: {e}")))?;
        let file = Bytes::from(file);
        let started = Instant::now();
        out.retrying("upload", || async {
            // Same name, same records, same bytes: a file that exists already
            // was written by an earlier attempt or run.
            let create = PutOptions {
                mode: PutMode::Create,
                ..PutOptions::default()
            };
            match self.store.put_opts(&path, PutPayload::from(file.clone()), create).await {
                Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
                Err(e) => {
                    self.metrics.upload_retries.inc();
                    Err(outage(&format!("uploading {path}"), e))
                }
            }
        })
        .await?;
        self.metrics.upload_seconds.observe(started.elapsed().as_secs_f64());
        state.filed.insert(stream.clone(), Some(last.offset));

        let entity = buffer.entity.base_name();
        self.metrics.files.with_label_values(&[entity, roll.as_str()]).inc();
        self.metrics
            .bytes
            .with_label_values(&[entity])
            .inc_by(file.len() as u64);
        self.metrics.rows.with_label_values(&[entity]).inc_by(rows.len() as u64);
        *written.written.entry(stream.topic.clone()).or_default() += rows.len() as u64;
        written
            .event_times
            .extend(rows.iter().map(|r| (stream.topic.clone(), r.record.event_time())));
        tracing::debug!(%path, rows = rows.len(), bytes = file.len(), reason = roll.as_str(), "lake-sink: file written");
        Ok(())
    }

    /// Writes the buffers that `pick` picks, then the commit positions of
    /// their partitions (and of `touched`).
    async fn roll_over(
        &self,
        state: &mut State,
        pick: impl Fn(&State) -> Vec<(Stream, Roll)>,
        mut touched: BTreeSet<(String, i32)>,
        out: &Out<'_>,
        written: &mut Written,
    ) -> Result<(), SinkError> {
        loop {
            let picked = pick(state);
            if picked.is_empty() {
                break;
            }
            for (stream, roll) in picked {
                if let Some(buffer) = state.open.remove(&stream) {
                    touched.insert((stream.topic.clone(), stream.partition));
                    self.write_file(state, stream, buffer, roll, out, written).await?;
                }
            }
        }
        for (topic, partition) in touched {
            if let Some(next) = state.next(&topic, partition) {
                written.next.insert((topic, partition), next);
            }
        }
        // What the files of folders without an open buffer hold is listed
        // again when a record comes for them: kept bounded over a long run.
        if state.filed.len() > 4 * state.open.len() + 1024 {
            let State { open, filed, .. } = state;
            filed.retain(|s, _| open.contains_key(s));
        }
        let held: usize = state.open.values().map(|b| b.rows.len()).sum();
        self.metrics.buffered_records.set(held as i64);
        self.metrics.buffered_bytes.set(state.buffered_bytes as i64);
        Ok(())
    }

    /// The buffers past their size, then the largest while all together hold
    /// too much.
    fn too_big(&self, state: &State) -> Vec<(Stream, Roll)> {
        let mut picked: Vec<(Stream, Roll)> = state
            .open
            .iter()
            .filter(|(_, b)| b.bytes >= self.file_max_bytes)
            .map(|(s, _)| (s.clone(), Roll::Size))
            .collect();
        if picked.is_empty() && state.buffered_bytes > self.buffer_max_bytes {
            if let Some((s, _)) = state.open.iter().max_by_key(|(_, b)| b.bytes) {
                picked.push((s.clone(), Roll::Memory));
            }
        }
        picked
    }
}

impl Sink for LakeSink {
    const NAME: &'static str = COMPONENT;
    const METRICS_PREFIX: &'static str = "tickpipe_lake_sink";
    const TARGET: &'static str = "the lake";
    const NOT_READY: &'static str = "not ready: the lake's store is not answering";
    const HOLDS_BACK: bool = true;

    fn resume(&self) -> Resume {
        Resume::Committed
    }

    /// The position is the group's committed offset; the files say the rest.
    fn rebaseline(group: &str, topic: &str, partition: i32) -> String {
        format!(
            "stop the sink, reset the group's offset (kafka-consumer-groups.sh --bootstrap-server <brokers> --group \
             {group} --reset-offsets --to-earliest --topic {topic}:{partition} --execute) and restart it (records \
             the lake's files hold already are not written again; after a recreated topic, move its folders away \
             first)"
        )
    }

    async fn write(&self, batch: &[Item], out: &Out<'_>) -> Result<Written, Failure> {
        let now = now_micros();
        let mut state = self.state.lock().await;
        let mut written = Written::default();
        let mut rejects: Vec<(usize, Reject)> = Vec::new();
        let mut touched = BTreeSet::new();
        for (i, item) in batch.iter().enumerate() {
            let tp = (item.topic.clone(), item.partition);
            if state.seen.get(&tp).is_some_and(|seen| item.offset <= *seen) {
                tracing::info!(
                    topic = item.topic,
                    partition = item.partition,
                    offset = item.offset,
                    "lake-sink: the partition is read again from an earlier offset; its open files start over"
                );
                state.forget(&item.topic, item.partition);
            }
            state.seen.insert(tp.clone(), item.offset);
            touched.insert(tp);
            let record = match &item.body {
                Ok(record) => record,
                Err(reject) => {
                    rejects.push((i, reject.clone()));
                    continue;
                }
            };
            let entity = record.topic();
            let folder = match columns::fits(record).and_then(|()| layout::folder(layout::RAW, entity, record)) {
                Ok(folder) => folder,
                Err(e) => {
                    rejects.push((i, Reject::write(item, e)));
                    continue;
                }
            };
            let stream = Stream {
                folder,
                topic: item.topic.clone(),
                partition: item.partition,
            };
            let filed = match state.filed.get(&stream) {
                Some(filed) => *filed,
                None => {
                    let filed = out.retrying("list", || self.filed(&stream)).await?;
                    state.filed.insert(stream.clone(), filed);
                    filed
                }
            };
            let last = state
                .open
                .get(&stream)
                .and_then(|b| b.rows.last().map(|r| r.offset))
                .or(filed);
            if last.is_some_and(|last| item.offset <= last) {
                *written.already_written.entry(item.topic.clone()).or_default() += 1;
                continue;
            }
            let buffer = state.open.entry(stream).or_insert_with(|| Buffer {
                entity,
                rows: Vec::new(),
                bytes: 0,
                opened: Instant::now(),
            });
            buffer.rows.push(Row {
                offset: item.offset,
                record: record.clone(),
            });
            buffer.bytes += item.payload.len();
            state.buffered_bytes += item.payload.len();
        }
        self.roll_over(&mut state, |s| self.too_big(s), touched, out, &mut written)
            .await?;

        out.reject(batch, &rejects, &mut written, now).await?;
        Ok(written)
    }

    async fn flush(&self, all: bool, out: &Out<'_>) -> Result<Written, Failure> {
        let mut state = self.state.lock().await;
        let mut written = Written::default();
        let max_age = self.file_max_age;
        let pick = |s: &State| -> Vec<(Stream, Roll)> {
            s.open
                .iter()
                .filter(|(_, b)| all || b.opened.elapsed() >= max_age)
                .map(|(s, _)| (s.clone(), if all { Roll::Stop } else { Roll::Age }))
                .collect()
        };
        self.roll_over(&mut state, pick, BTreeSet::new(), out, &mut written)
            .await?;
        Ok(written)
    }

    async fn probe(&self) -> Option<bool> {
        Some(self.store.list_with_delimiter(None).await.is_ok())
    }
}

/// Runs until `shutdown` resolves, then writes every open file and returns.
pub async fn run(config: LakeSinkConfig, shutdown: impl Future<Output = ()>) -> Result<(), SinkError> {
    let settings = config.sink.clone();
    let open = |opening: Opening| async move {
        let store = store::open(&config.target).map_err(target)?;
        tracing::info!(target = %config.target, "lake-sink: writing to the lake");
        Ok(LakeSink {
            store,
            schemas: Topic::ALL.iter().map(|t| (*t, columns::arrow_schema(*t))).collect(),
            file_max_bytes: config.file_max_bytes.clamp(1, FILE_MAX_BYTES),
            file_max_age: config.file_max_age,
            buffer_max_bytes: config.buffer_max_bytes,
            state: Mutex::new(State::default()),
            metrics: Metrics::new(&opening.registry),
        })
    };
    crate::sink::run(settings, open, shutdown).await
}
