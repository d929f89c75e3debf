//! The sink runtime: what every sink shares. A sink says where its writes
//! stand, writes a batch and classifies its failures ([`Sink`]); [`run`] owns
//! the rest: the operations endpoint, the topics, the dead-letters producer,
//! the consumer thread, retries with backoff, the hand-back of written
//! offsets for commit, and a clean stop.
//!
//! Two halves joined by a bounded channel:
//!
//! - the **consumer thread** ([`consumer`]) is a consumer-group member. It
//!   polls, decodes and validates records into batches (by size and time) and
//!   hands them over, waiting while the writer is behind. On assignment it asks
//!   the sink where each partition's writes stand ([`Resume`]) and seeks there.
//! - the **writer** (this loop) writes each batch through the sink until it is
//!   written or the sink must stop, then hands the next offsets back, which the
//!   consumer thread commits to the group (for lag monitoring, and as the
//!   position of sinks that resume from the group).
//!
//! Offsets are never handed back before the sink says the batch is written,
//! so nothing is lost; whether a crash can write a record twice is the sink's
//! to say (its [`Resume`]).

mod consumer;
mod metrics;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::Registry;
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use tickpipe_kafka::{ensure_topic_names, future_producer, letter_records, send_letters, TopicError};
use tickpipe_schemas::registry::RegistryConfig;
use tickpipe_schemas::{AnyRecord, Codec, DeadLetter, EncodeError, Micros, Topic, WriteFraming};
use tokio::sync::mpsc;

pub use consumer::{ConsumeError, Positions, ReadPositions, Resume};
pub use metrics::SinkMetrics;

use crate::decode::{reject_letter, Item, Reject};
use consumer::{spawn_consumer, ConsumerSettings};

/// A sink's defaults for the flags every sink takes (`sink_args!`).
#[derive(Debug, Clone, Copy)]
pub struct SinkDefaults {
    pub group: &'static str,
    pub batch_max: usize,
    pub batch_wait_ms: u64,
    pub max_backoff_ms: u64,
    pub metrics_addr: &'static str,
}

/// What every sink is configured with: where it reads, how it batches and
/// retries, where it reports.
#[derive(Debug, Clone)]
pub struct SinkSettings {
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// Prefix of every topic name (may be empty).
    pub topic_prefix: String,
    /// The entity topics to consume.
    pub topics: Vec<Topic>,
    /// Consumer group.
    pub group: String,
    /// Most records per batch.
    pub batch_max: usize,
    /// Longest wait for a batch to fill.
    pub batch_wait: Duration,
    /// Longest pause between retries.
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

impl SinkSettings {
    /// Settings for reading `topics` (with `topic_prefix`) from `brokers` as
    /// `group`, for tests and embedding: batches of 10,000 within 200 ms,
    /// backoff up to 5 s, a 10 s session, and topics it creates with 3
    /// partitions and one replica (a local broker). The binaries take their
    /// own defaults from their flags.
    pub fn new(brokers: &str, topic_prefix: &str, topics: &[Topic], group: &str) -> Self {
        SinkSettings {
            brokers: brokers.to_owned(),
            topic_prefix: topic_prefix.to_owned(),
            topics: topics.to_vec(),
            group: group.to_owned(),
            batch_max: 10_000,
            batch_wait: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            session_timeout: Duration::from_secs(10),
            instance_id: None,
            partitions: 3,
            replication: 1,
            metrics_addr: None,
            registry: None,
        }
    }
}

/// Why a sink stopped.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Topics(#[from] TopicError),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("metrics endpoint: {0}")]
    Metrics(std::io::Error),
    #[error("stopping with a batch not written: {0}")]
    Unwritten(String),
    #[error("the consumer thread failed: {0}")]
    Consumer(String),
    #[error(transparent)]
    Consume(#[from] ConsumeError),
    /// The sink's own: its target refused to start, or refused for good.
    #[error(transparent)]
    Target(Box<dyn std::error::Error + Send + Sync>),
}

/// What one written batch did, for the metrics and the commit.
#[derive(Debug, Default)]
pub struct Written {
    /// Next offset per (topic, partition): handed back for commit.
    pub next: BTreeMap<(String, i32), i64>,
    /// Records written, per topic.
    pub written: HashMap<String, u64>,
    /// Records dead-lettered: (topic, stage).
    pub rejected: Vec<(String, &'static str)>,
    /// Records skipped because they were written before, per topic.
    pub already_written: HashMap<String, u64>,
    /// Topics of partitions whose batch started after the written position.
    pub gaps: Vec<String>,
    /// (topic, event time) of every record written, for end-to-end latency.
    pub event_times: Vec<(String, Micros)>,
}

impl Written {
    /// The next offset of every partition in `batch`.
    pub fn next_offsets(batch: &[Item]) -> BTreeMap<(String, i32), i64> {
        let mut next = BTreeMap::new();
        for item in batch {
            let n = next.entry((item.topic.clone(), item.partition)).or_insert(0);
            *n = (*n).max(item.offset + 1);
        }
        next
    }
}

/// How a failed attempt is handled.
#[derive(Debug)]
pub enum Failure {
    /// Try again at once: nothing is wrong with the target (another instance
    /// moved a position meanwhile).
    Again(String),
    /// The target or the broker failed, maybe for a while: try again after a
    /// backoff, with `/readyz` saying not ready meanwhile.
    Outage(String),
    /// The operator must act: the sink stops with this error.
    Fatal(SinkError),
}

/// A sink: where it resumes, how it writes a batch. One implementation per
/// target (PostgreSQL, BigQuery); [`run`] drives it.
pub trait Sink: Send + Sync + Sized {
    /// Its name: log lines, the consumer thread's name, the component of its
    /// dead letters.
    const NAME: &'static str;
    /// Prefix of its metrics (`<prefix>_records_written_total`, ...).
    const METRICS_PREFIX: &'static str;
    /// Where rows go ("Postgres"), in the metrics' help texts.
    const TARGET: &'static str;
    /// What `/readyz` says while writes fail.
    const NOT_READY: &'static str;

    /// Where the writes of each partition stand.
    fn resume(&self) -> Resume;

    /// What an operator does to start a partition over from its beginning
    /// (group, topic, partition), for the error that refuses a position.
    fn rebaseline(group: &str, topic: &str, partition: i32) -> String;

    /// Writes one batch: its records, and its rejects through `out.letters`.
    fn write(&self, batch: &[Item], out: &Out<'_>) -> impl Future<Output = Result<Written, Failure>> + Send;

    /// Whether it holds records back across batches (a sink that gathers
    /// them into files), to be written by [`Sink::flush`].
    const HOLDS_BACK: bool = false;

    /// Writes what the sink holds back: called every second when it
    /// [holds back](Sink::HOLDS_BACK), and with `all` once the last batch is
    /// written when the sink stops. Its `next` offsets are committed like a
    /// batch's.
    fn flush(&self, all: bool, out: &Out<'_>) -> impl Future<Output = Result<Written, Failure>> + Send {
        let _ = (all, out);
        async { Ok(Written::default()) }
    }

    /// Whether the target answers, asked between batches now and then so that
    /// `/readyz` tells an outage while nothing is written; `None`: not known.
    fn probe(&self) -> impl Future<Output = Option<bool>> + Send {
        async { None }
    }
}

/// What a sink's start-up gets: the metrics registry (for the sink's own
/// metrics) and the core metrics.
pub struct Opening {
    pub registry: Registry,
    pub metrics: SinkMetrics,
    pub max_backoff: Duration,
}

/// Where a sink's dead letters go: the dead-letters topic, signed with the
/// sink's name.
pub struct Letters {
    component: &'static str,
    producer: FutureProducer,
    topic: String,
    codec: Codec,
}

/// Why dead letters were not published.
#[derive(Debug, thiserror::Error)]
pub enum LetterError {
    #[error("encoding a dead letter: {0}")]
    Encode(#[from] EncodeError),
    #[error("publishing dead letters: {0}")]
    Kafka(#[from] KafkaError),
}

impl From<SinkError> for Failure {
    fn from(e: SinkError) -> Self {
        Failure::Fatal(e)
    }
}

impl From<LetterError> for Failure {
    fn from(e: LetterError) -> Self {
        match e {
            LetterError::Encode(_) => Failure::Fatal(SinkError::Unwritten(e.to_string())),
            LetterError::Kafka(_) => Failure::Outage(e.to_string()),
        }
    }
}

impl Letters {
    /// The dead letter of a record this sink could not write.
    pub fn letter(&self, item: &Item, reject: &Reject, now: Micros) -> DeadLetter {
        reject_letter(self.component, item, reject, now)
    }

    /// Publishes `letters` and waits until every one is acknowledged.
    pub async fn publish(&self, letters: &[DeadLetter]) -> Result<(), LetterError> {
        if letters.is_empty() {
            return Ok(());
        }
        let records = letter_records(&self.topic, &self.codec, letters)?;
        send_letters(&self.producer, &records).await?;
        Ok(())
    }
}

/// What the runtime lends a sink's write: the core metrics, the dead
/// letters, and retries that honour a stop.
pub struct Out<'a> {
    pub metrics: &'a SinkMetrics,
    pub letters: &'a Letters,
    name: &'static str,
    ready: &'a AtomicBool,
    stop: &'a AtomicBool,
    max_backoff: Duration,
}

/// How long a stopping sink keeps retrying a write before it gives up.
const STOPPING_GRACE: Duration = Duration::from_secs(30);

impl Out<'_> {
    /// Runs `op` until it succeeds or fails for good: at once again after
    /// [`Failure::Again`], after a doubling backoff (up to `max_backoff`, with
    /// `/readyz` not ready) after [`Failure::Outage`], and not at all once the
    /// sink has been stopping for 30 s. Every retry is counted. It ends only
    /// with the value or the error the sink stops with; its success says the
    /// target answers (`/readyz` ready).
    pub async fn retrying<T, F, Fut>(&self, what: &str, op: F) -> Result<T, SinkError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        self.retry(what, op, true).await
    }

    /// [`Out::retrying`], with success saying nothing of the target when
    /// `answers` is false: for a call that may not have reached it (a sink
    /// that holds records back reaches its target only in the retries of its
    /// own listings and uploads).
    async fn retry<T, F, Fut>(&self, what: &str, mut op: F, answers: bool) -> Result<T, SinkError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let name = self.name;
        let mut backoff = Duration::from_millis(100);
        let mut stopping_since: Option<Instant> = None;
        loop {
            match op().await {
                Ok(v) => {
                    if answers {
                        self.ready.store(true, Ordering::Relaxed);
                    }
                    return Ok(v);
                }
                Err(Failure::Again(why)) => {
                    self.metrics.retries.inc();
                    tracing::info!("{name}: {why}; {what} again");
                }
                Err(Failure::Outage(why)) => {
                    self.ready.store(false, Ordering::Relaxed);
                    self.metrics.retries.inc();
                    tracing::warn!("{name}: {what} failed, retrying in {backoff:?}: {why}");
                    if self.stop.load(Ordering::Relaxed)
                        && stopping_since.get_or_insert_with(Instant::now).elapsed() > STOPPING_GRACE
                    {
                        return Err(SinkError::Unwritten(why));
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.max_backoff);
                }
                Err(Failure::Fatal(e)) => return Err(e),
            }
        }
    }
}

impl Out<'_> {
    /// Publishes the dead letters of a batch's rejects (`(index in the batch,
    /// why)`, each counted in `written.rejected`) and waits until Kafka has
    /// them. A reject that is one of this sink's own letters is logged and
    /// stays in Kafka only: publishing it again would loop.
    pub async fn reject(
        &self,
        batch: &[Item],
        rejects: &[(usize, Reject)],
        written: &mut Written,
        now: Micros,
    ) -> Result<(), SinkError> {
        let name = self.name;
        let mut letters = Vec::with_capacity(rejects.len());
        for (i, reject) in rejects {
            let item = &batch[*i];
            written.rejected.push((item.topic.clone(), reject.stage.as_str()));
            if matches!(&item.body, Ok(AnyRecord::DeadLetter(d)) if d.component == name) {
                tracing::error!(
                    topic = item.topic,
                    partition = item.partition,
                    offset = item.offset,
                    "{name}: one of this sink's own dead letters cannot be written; it stays in Kafka only: {}",
                    reject.error
                );
                continue;
            }
            letters.push(self.letters.letter(item, reject, now));
        }
        self.retrying("dead letters", || async { Ok(self.letters.publish(&letters).await?) })
            .await
    }
}

/// A sink's own error as the reason it stopped.
pub fn target(e: impl std::error::Error + Send + Sync + 'static) -> SinkError {
    SinkError::Target(Box::new(e))
}

/// A failure that ends the sink, from the sink's own error.
pub fn fatal(e: impl std::error::Error + Send + Sync + 'static) -> Failure {
    Failure::Fatal(target(e))
}

/// How often an idle sink asks its target whether it answers.
const PROBE_EVERY: Duration = Duration::from_secs(5);

/// How often a sink is asked to write what it holds back ([`Sink::flush`]).
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Runs a sink until `shutdown` resolves, then writes the batch in hand and
/// returns. `open` starts the sink (connects, prepares its tables) once the
/// operations endpoint answers; a shutdown meanwhile returns at once.
pub async fn run<S, F>(
    settings: SinkSettings,
    open: impl FnOnce(Opening) -> F,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SinkError>
where
    S: Sink,
    F: Future<Output = Result<S, SinkError>>,
{
    let name = S::NAME;
    let registry = Registry::new();
    let metrics = SinkMetrics::new(&registry, S::METRICS_PREFIX, S::TARGET);
    let ready = Arc::new(AtomicBool::new(false));
    let registry_answers = Arc::new(AtomicBool::new(true));
    if let Some(addr) = settings.metrics_addr {
        tickpipe_ops::serve_conditions(
            addr,
            registry.clone(),
            vec![
                (ready.clone(), S::NOT_READY),
                (
                    registry_answers.clone(),
                    "not ready: the schema registry does not answer (retrying)",
                ),
            ],
        )
        .await
        .map_err(SinkError::Metrics)?;
    }
    let mut shutdown = std::pin::pin!(shutdown);
    let opening = Opening {
        registry,
        metrics: metrics.clone(),
        max_backoff: settings.max_backoff,
    };
    let sink = tokio::select! {
        sink = open(opening) => sink?,
        _ = &mut shutdown => return Ok(()),
    };

    let (topic_of, dead_topic) = sink_topics(&settings).await?;
    let letters = Letters {
        component: name,
        producer: future_producer(&settings.brokers, &dead_topic)?,
        topic: dead_topic,
        codec: Codec::new(WriteFraming::SingleObject),
    };

    let stop = Arc::new(AtomicBool::new(false));
    let (batches_tx, mut batches) = mpsc::channel::<Vec<Item>>(2);
    let (commits_tx, commits_rx) = std::sync::mpsc::channel::<TopicPartitionList>();
    let consumer_settings = ConsumerSettings {
        component: name,
        sink: settings.clone(),
        registry_answers,
        rebaseline: S::rebaseline,
    };
    let consumer_thread = spawn_consumer(
        consumer_settings,
        topic_of,
        sink.resume(),
        stop.clone(),
        metrics.clone(),
        batches_tx,
        commits_rx,
    )?;
    ready.store(true, Ordering::Relaxed);

    let out = Out {
        metrics: &metrics,
        letters: &letters,
        name,
        ready: &ready,
        stop: &stop,
        max_backoff: settings.max_backoff,
    };
    let mut result = Ok(());
    // Between batches (an idle sink writes nothing that could fail), the
    // target is asked now and then, so that `/readyz` tells an outage.
    let mut probe = tokio::time::interval(PROBE_EVERY);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut flush = tokio::time::interval(FLUSH_EVERY);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let begin_stop = || {
        tracing::info!("{name}: stopping");
        stop.store(true, Ordering::Relaxed);
    };
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        let batch = tokio::select! {
            _ = &mut shutdown, if !stopping => {
                begin_stop();
                continue;
            }
            b = batches.recv() => match b { Some(b) => b, None => break },
            _ = flush.tick(), if S::HOLDS_BACK && !stopping => {
                let started = Instant::now();
                let flushed = watching(out.retry("flush", || sink.flush(false, &out), false), &mut shutdown, &stop, name);
                match flushed.await {
                    Ok(w) => hand_back(&metrics, &[], &w, started, &commits_tx),
                    Err(e) => {
                        stop.store(true, Ordering::Relaxed);
                        result = Err(e);
                        break;
                    }
                }
                continue;
            }
            _ = probe.tick() => {
                let up = match tokio::time::timeout(PROBE_EVERY, sink.probe()).await {
                    Ok(None) => continue,
                    Ok(Some(up)) => up,
                    Err(_) => false,
                };
                match (up, ready.swap(up, Ordering::Relaxed)) {
                    (false, true) => tracing::warn!("{name}: {}", S::NOT_READY),
                    (true, false) => tracing::info!("{name}: ready again"),
                    _ => {}
                }
                continue;
            }
        };
        let started = Instant::now();
        // The shutdown is watched while the batch is written, so that retries
        // know the sink is stopping.
        let written = watching(
            out.retry("write", || sink.write(&batch, &out), !S::HOLDS_BACK),
            &mut shutdown,
            &stop,
            name,
        );
        match written.await {
            Ok(w) => hand_back(&metrics, &batch, &w, started, &commits_tx),
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                result = Err(e);
                break;
            }
        }
    }
    // What the sink holds back is written before the last commits.
    if result.is_ok() && S::HOLDS_BACK {
        // Stopping: an outage is retried for the grace period, then given up
        // (the records are read again at the next start).
        stop.store(true, Ordering::Relaxed);
        let started = Instant::now();
        match out.retry("flush", || sink.flush(true, &out), false).await {
            Ok(w) => hand_back(&metrics, &[], &w, started, &commits_tx),
            Err(e) => result = Err(e),
        }
    }
    drop(batches);
    drop(commits_tx);
    match tokio::task::spawn_blocking(move || consumer_thread.join()).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return result.and(Err(e.into())),
        _ => return Err(SinkError::Consumer("the consumer thread panicked".into())),
    }
    tracing::info!("{name}: stopped");
    result
}

/// The topics a sink reads, by name with the prefix, and the dead-letters
/// topic's name; creates those missing.
async fn sink_topics(settings: &SinkSettings) -> Result<(HashMap<String, Topic>, String), TopicError> {
    let prefix = &settings.topic_prefix;
    let topic_of: HashMap<String, Topic> = settings.topics.iter().map(|t| (t.name(prefix), *t)).collect();
    let dead_topic = Topic::DeadLetters.name(prefix);
    let mut names: Vec<String> = topic_of.keys().cloned().collect();
    if !names.contains(&dead_topic) {
        names.push(dead_topic.clone());
    }
    ensure_topic_names(&settings.brokers, &names, settings.partitions, settings.replication).await?;
    Ok((topic_of, dead_topic))
}

/// Runs `work` while watching `shutdown`, which sets `stop` (so that retries
/// know the sink is stopping) but does not interrupt the work.
async fn watching<T>(
    work: impl Future<Output = T>,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    stop: &AtomicBool,
    name: &str,
) -> T {
    let mut work = std::pin::pin!(work);
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = shutdown.as_mut(), if !stop.load(Ordering::Relaxed) => {
                tracing::info!("{name}: stopping");
                stop.store(true, Ordering::Relaxed);
            }
        }
    }
}

/// Records what a write or flush did in the metrics and hands its next
/// offsets to the consumer thread for commit.
fn hand_back(
    metrics: &SinkMetrics,
    batch: &[Item],
    w: &Written,
    started: Instant,
    commits: &std::sync::mpsc::Sender<TopicPartitionList>,
) {
    record(metrics, batch, w, started.elapsed());
    if w.next.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), next) in &w.next {
        let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next));
    }
    let _ = commits.send(tpl);
}

/// The core metrics of a written batch (or of a flush, with no batch).
fn record(m: &SinkMetrics, batch: &[Item], w: &Written, took: Duration) {
    if !batch.is_empty() {
        m.batch_size.observe(batch.len() as f64);
        m.write_seconds.observe(took.as_secs_f64());
    }
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
