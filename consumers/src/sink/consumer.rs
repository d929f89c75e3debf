//! The consumer thread that polls, decodes, validates and batches records for
//! a sink's writer, resuming each assigned partition where the sink's writes
//! stand.
//!
//! A written position above its partition's end (the topic was recreated or
//! the cluster changed) cannot be right: once two statistics reports in a row
//! give an end below it (one could come from a new leader catching up), that
//! partition is paused, an error says how to re-baseline it,
//! and a gauge counts it, while the other partitions go on. (A position below
//! the partition's start, records deleted by retention before they were
//! written, shows as an offset gap.)
//!
//! The thread is a consumer-group member. On assignment it asks the sink where
//! each partition's writes stand ([`Resume`]) and seeks there, skipping any
//! record below it that a broker still delivers. It hands full batches to the
//! writer through a bounded channel and waits when the writer is behind.
//! Offsets the writer sends back are committed to the group.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::util::Timeout;
use rdkafka::{ClientContext, Message, Offset, Statistics, TopicPartitionList};
use tickpipe_ops::now_micros;
use tickpipe_schemas::registry::{RegistryClient, RegistryError};
use tickpipe_schemas::validate::Rules;
use tickpipe_schemas::{Codec, Topic, WriteFraming};
use tokio::sync::mpsc;

use super::{SinkMetrics, SinkSettings};
use crate::decode::{decode_item, learn_schema, Item};
use tickpipe_kafka::{consumer_config, record_consumer_lag, STATISTICS_INTERVAL_MS};
use tickpipe_kafka::{judge_position, record_ends, EndVerdict, Ends};

/// The next offsets already written, per partition, as the sink knows them.
pub type Positions = HashMap<(String, i32), i64>;

/// Reads the written positions of some partitions from a sink's store.
pub type ReadPositions = Box<dyn Fn(&TopicPartitionList) -> Result<Positions, String> + Send + Sync>;

/// Where a sink's writes stand.
pub enum Resume {
    /// In the sink's own store (asked again until it answers).
    Store(ReadPositions),
    /// The group's committed offsets, committed only after the writes.
    Committed,
}

/// The consumer thread's settings.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// The sink's name, in log lines and the thread's name.
    pub component: &'static str,
    /// Where it reads, as what group, and how it batches.
    pub sink: SinkSettings,
    /// What an operator does to start a partition over from its beginning
    /// (group, topic, partition), for the error that refuses a position.
    pub rebaseline: fn(&str, &str, i32) -> String,
    /// False while the schema registry does not answer (a readiness condition).
    pub registry_answers: Arc<AtomicBool>,
}

/// Why the consumer thread stopped.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("schema registry: {0}")]
    Registry(#[from] RegistryError),
    #[error("the consumer thread could not start: {0}")]
    Spawn(String),
}

/// Where a partition's reading stands.
#[derive(Debug, Default, Clone, Copy)]
struct Position {
    /// The next offset the broker should deliver, when known.
    expect: Option<i64>,
    /// Records below this offset are written already.
    written_below: Option<i64>,
    /// `written_below` is still to be checked against the partition's end.
    unchecked: bool,
    /// A report put the end below `written_below` once (see
    /// `tickpipe_kafka::judge_position`).
    above_once: bool,
    /// The written position cannot be right: the partition is paused and
    /// nothing of it is handed to the writer.
    refused: bool,
}

/// What the consumer thread shares with the rebalance callback.
struct SinkContext {
    component: &'static str,
    resume: Resume,
    positions: Arc<Mutex<HashMap<(String, i32), Position>>>,
    /// Some position is still to be checked against its partition's end.
    unchecked: Arc<AtomicBool>,
    /// The partitions' ends, from the statistics.
    ends: Ends,
    stop: Arc<AtomicBool>,
    metrics: SinkMetrics,
}

impl SinkContext {
    /// Where the writes of the given partitions stand, asked until the answer
    /// comes; `None` when the sink stops meanwhile.
    fn written(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) -> Option<Positions> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let answer = match &self.resume {
                Resume::Store(read) => read(tpl),
                Resume::Committed => consumer
                    .committed_offsets(tpl.clone(), Timeout::After(Duration::from_secs(10)))
                    .map(|c| {
                        c.elements()
                            .iter()
                            .filter_map(|e| match e.offset() {
                                Offset::Offset(next) => Some(((e.topic().to_owned(), e.partition()), next)),
                                _ => None,
                            })
                            .collect()
                    })
                    .map_err(|e| e.to_string()),
            };
            match answer {
                Ok(written) => return Some(written),
                Err(e) if self.stop.load(Ordering::Relaxed) => {
                    tracing::warn!(
                        component = self.component,
                        "stopping before the written positions were read: {e}"
                    );
                    return None;
                }
                Err(e) => {
                    tracing::warn!(
                        component = self.component,
                        "reading the written positions failed, retrying: {e}"
                    );
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
        record_consumer_lag(&self.metrics.lag, &statistics);
        record_ends(&self.ends, &statistics);
    }
}

impl ConsumerContext for SinkContext {
    /// Eager rebalancing, with the assigned partitions positioned at the
    /// written positions, not at the group's.
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let component = self.component;
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let Some(written) = self.written(consumer, tpl) else {
                    return;
                };
                let mut positioned = TopicPartitionList::new();
                let mut positions = self.positions.lock().unwrap_or_else(|p| p.into_inner());
                for e in tpl.elements() {
                    let tp = (e.topic().to_owned(), e.partition());
                    self.metrics.refused.with_label_values(&[&tp.0]).set(0);
                    // Checked against an end reported after this assignment.
                    self.ends.lock().unwrap_or_else(|p| p.into_inner()).remove(&tp);
                    let (offset, position) = match written.get(&tp) {
                        Some(next) => {
                            let from = *next;
                            let position = Position {
                                expect: Some(from),
                                written_below: Some(*next),
                                unchecked: true,
                                above_once: false,
                                refused: false,
                            };
                            self.unchecked.store(true, Ordering::Release);
                            (Offset::Offset(from), position)
                        }
                        None => (Offset::Beginning, Position::default()),
                    };
                    positions.insert(tp.clone(), position);
                    tracing::info!(component, topic = tp.0, partition = tp.1, ?offset, "assigned");
                    if let Err(e) = positioned.add_partition_offset(&tp.0, tp.1, offset) {
                        tracing::error!(component, "cannot position {}[{}]: {e}", tp.0, tp.1);
                    }
                }
                if let Err(e) = consumer.assign(&positioned) {
                    tracing::error!(component, "assign failed: {e}");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(component, partitions = tpl.count(), "partitions revoked");
                // The next assignment says again which partitions are refused.
                self.metrics.refused.reset();
                if let Err(e) = consumer.unassign() {
                    tracing::error!(component, "unassign failed: {e}");
                }
            }
            other => {
                tracing::error!(component, "rebalance error {other:?}");
                let _ = consumer.unassign();
            }
        }
    }
}

/// Checks the written positions not checked yet against their partitions'
/// ends, once the statistics report the end a fetch response gave (within
/// `statistics.interval.ms` of the assignment); pauses and reports each that
/// lies above it. Returns whether some are still unchecked.
fn check_ends(
    consumer: &BaseConsumer<SinkContext>,
    positions: &Mutex<HashMap<(String, i32), Position>>,
    ends: &Ends,
    settings: &ConsumerSettings,
    metrics: &SinkMetrics,
) -> bool {
    let mut positions = positions.lock().unwrap_or_else(|p| p.into_inner());
    let mut pause = TopicPartitionList::new();
    let mut still = false;
    for ((topic, partition), p) in positions.iter_mut().filter(|(_, p)| p.unchecked) {
        let Some(next) = p.written_below else {
            p.unchecked = false;
            continue;
        };
        let why = match judge_position(ends, &(topic.clone(), *partition), next, p.above_once) {
            EndVerdict::Unknown => {
                still = true;
                continue;
            }
            EndVerdict::Again => {
                p.above_once = true;
                still = true;
                continue;
            }
            EndVerdict::Fine => {
                p.unchecked = false;
                continue;
            }
            EndVerdict::Refuse(why) => why,
        };
        p.unchecked = false;
        p.refused = true;
        tracing::error!(
            component = settings.component,
            topic,
            partition,
            "{topic}[{partition}]: {why}. This partition is not read until the position is fixed. To start it \
             over from its beginning: {}",
            (settings.rebaseline)(&settings.sink.group, topic, *partition)
        );
        metrics.refused.with_label_values(&[topic]).inc();
        if let Err(e) = pause.add_partition_offset(topic, *partition, Offset::Invalid) {
            tracing::error!(component = settings.component, "cannot pause {topic}[{partition}]: {e}");
        }
    }
    if pause.count() > 0 {
        if let Err(e) = consumer.pause(&pause) {
            tracing::error!(component = settings.component, "pausing refused partitions failed: {e}");
        }
    }
    still
}

/// Starts the consumer thread. It stops when `stop` is set (after handing over
/// the batch in hand) or the writer hangs up, and commits what the writer sends
/// back until the writer drops its sender.
pub fn spawn_consumer(
    settings: ConsumerSettings,
    topic_of: HashMap<String, Topic>,
    resume: Resume,
    stop: Arc<AtomicBool>,
    metrics: SinkMetrics,
    batches: mpsc::Sender<Vec<Item>>,
    commits: std::sync::mpsc::Receiver<TopicPartitionList>,
) -> Result<std::thread::JoinHandle<Result<(), ConsumeError>>, ConsumeError> {
    let runtime = tokio::runtime::Handle::current();
    std::thread::Builder::new()
        .name(format!("{}-consumer", settings.component))
        .spawn(move || consume(settings, topic_of, resume, runtime, stop, metrics, batches, commits))
        .map_err(|e| ConsumeError::Spawn(e.to_string()))
}

#[allow(clippy::too_many_arguments)]
fn consume(
    settings: ConsumerSettings,
    topic_of: HashMap<String, Topic>,
    resume: Resume,
    runtime: tokio::runtime::Handle,
    stop: Arc<AtomicBool>,
    metrics: SinkMetrics,
    batches: mpsc::Sender<Vec<Item>>,
    commits: std::sync::mpsc::Receiver<TopicPartitionList>,
) -> Result<(), ConsumeError> {
    let component = settings.component;
    let positions: Arc<Mutex<HashMap<(String, i32), Position>>> = Arc::default();
    let unchecked = Arc::new(AtomicBool::new(false));
    let ends = Ends::default();
    let context = SinkContext {
        ends: ends.clone(),
        component,
        resume,
        positions: positions.clone(),
        unchecked: unchecked.clone(),
        stop: stop.clone(),
        metrics: metrics.clone(),
    };
    let mut cc = consumer_config(&settings.sink.brokers, &settings.sink.group);
    cc.set("statistics.interval.ms", STATISTICS_INTERVAL_MS).set(
        "session.timeout.ms",
        settings.sink.session_timeout.as_millis().to_string(),
    );
    if let Some(id) = &settings.sink.instance_id {
        cc.set("group.instance.id", id);
    }
    let registry = settings.sink.registry.clone().map(RegistryClient::new).transpose()?;
    let consumer: BaseConsumer<SinkContext> = cc.create_with_context(context)?;
    let names: Vec<&str> = topic_of.keys().map(String::as_str).collect();
    consumer.subscribe(&names)?;
    let codec = Codec::new(WriteFraming::SingleObject);

    let mut batch: Vec<Item> = Vec::with_capacity(settings.sink.batch_max);
    let mut ready: Option<Vec<Item>> = None;
    let mut opened = Instant::now();
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        while let Ok(tpl) = commits.try_recv() {
            if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
                tracing::debug!(component, "offset commit failed: {e}");
            }
        }
        if ready.is_none()
            && !batch.is_empty()
            && (batch.len() >= settings.sink.batch_max || opened.elapsed() >= settings.sink.batch_wait || stopping)
        {
            ready = Some(std::mem::replace(
                &mut batch,
                Vec::with_capacity(settings.sink.batch_max),
            ));
        }
        if let Some(mut b) = ready.take() {
            // Wait for the writer; the group keeps us meanwhile (heartbeats run
            // in the background), and past max.poll.interval.ms it moves the
            // partitions, which the written positions keep exact too.
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
            break;
        }
        let polled = consumer.poll(Duration::from_millis(20));
        if unchecked.load(Ordering::Acquire) {
            let still = check_ends(&consumer, &positions, &ends, &settings, &metrics);
            unchecked.store(still, Ordering::Release);
        }
        let Some(polled) = polled else {
            continue;
        };
        let msg = match polled {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(component, "kafka: {e}");
                continue;
            }
        };
        metrics.consumed.with_label_values(&[msg.topic()]).inc();
        let below = {
            let mut positions = positions.lock().unwrap_or_else(|p| p.into_inner());
            let p = positions.entry((msg.topic().to_owned(), msg.partition())).or_default();
            if p.refused {
                continue;
            }
            if p.expect.is_some_and(|e| msg.offset() > e) {
                tracing::warn!(
                    component,
                    topic = msg.topic(),
                    partition = msg.partition(),
                    "the broker skipped offsets {:?}..{}",
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
            learn_schema(
                &runtime,
                registry,
                &codec,
                msg.payload().unwrap_or_default(),
                &stop,
                &settings.registry_answers,
            );
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
            tracing::warn!(component, "final offset commit failed: {e}");
        }
    }
    consumer.unsubscribe();
    Ok(())
}
