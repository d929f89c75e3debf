//! The `candles` service: reads `trades`, builds candles, writes `candles`.
//!
//! Delivery: every trade is counted exactly once across crashes. After each
//! batch the service (1) produces the batch's candles and dead letters and waits
//! for the broker's acknowledgement, (2) once `state_interval` has passed since
//! the last time (and when it stops), writes, per input partition that moved, a
//! snapshot of the builder and the next input offset to the state topic and
//! waits again, (3) commits the group offsets for monitoring. At start it
//! restores each partition's builder from the newest snapshot and resumes at
//! the offset stored with it (the state topic, not the group offset, is the
//! authority). A crash replays the trades after the last snapshot: a builder's
//! outputs depend only on its partition's trades, in order, not on how they
//! were batched, so the same trades build the same candles; the topic may hold
//! a candle version twice, identical, and consumers that upsert by candle
//! identity see it once. No broker transactions are needed (why they are not
//! used: ARCHITECTURE.md, "candles").
//!
//! Input partitions are assigned to this process explicitly (all of them), by
//! the one instance that holds the lease ([`super::lease`]); any other
//! instance stands by until it is free.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tickpipe_ops::now_micros;

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::Producer;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Message, Offset, Statistics, TopicPartitionList};
use tickpipe_kafka::{ensure_topic_names, ensure_topics_configured, future_producer, producer_config, TopicError};
use tickpipe_ops::metrics::register;
use tickpipe_schemas::validate::Rules;
use tickpipe_schemas::{Codec, DeadLetter, Origin, Record, Source, Stage, Topic, Trade, WriteFraming};

use super::aggregate::{CandleBuilder, CandleConfig, Output};
use super::lease::Lease;
use super::state::{self, Generation, Stored};
use tickpipe_kafka::{
    consumer_config, consumer_lag_gauge, judge_position, letter_records, record_consumer_lag, record_ends, send_all,
    send_each, send_letters, EndVerdict, Ends, STATISTICS_INTERVAL_MS,
};

/// Everything the service needs.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// Prefix of every topic name (may be empty).
    pub topic_prefix: String,
    /// How candles are built.
    pub candles: CandleConfig,
    /// Consumer group used to report progress (lag); offsets come from the state.
    pub group: String,
    /// Most trades handled per batch.
    pub batch_max: usize,
    /// Longest wait for a batch to fill.
    pub batch_wait: Duration,
    /// Shortest time between two state snapshots of a partition (zero: after
    /// every batch). Longer means fewer state records, more trades replayed
    /// after a crash.
    pub state_interval: Duration,
    /// Partitions for topics this service creates.
    pub partitions: i32,
    /// Replication factor of the topics it creates when they are missing.
    pub replication: i32,
    /// Where `/metrics`, `/healthz` and `/readyz` are served, if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    /// How long the lease group waits for a silent holder before a standby
    /// takes over (see [`super::lease`]).
    pub lease_session_timeout: Duration,
    /// Static membership of the lease group: a restarted instance with the
    /// same id takes its lease back at once.
    pub instance_id: Option<String>,
    /// Candles, dead letters and state written in Kafka transactions, one per
    /// state interval (see [`Transactions`]).
    pub transactions: bool,
}

impl ServiceConfig {
    fn topic(&self, t: Topic) -> String {
        t.name(&self.topic_prefix)
    }

    /// The topic holding builder snapshots.
    pub fn state_topic(&self) -> String {
        format!("{}candles-state", self.topic_prefix)
    }

    /// The one-partition topic whose assignment makes an instance the active one.
    pub fn lease_topic(&self) -> String {
        format!("{}candles-lease", self.topic_prefix)
    }
}

/// Why the service stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Topics(#[from] TopicError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("{0}")]
    State(String),
    #[error("metrics endpoint: {0}")]
    Metrics(std::io::Error),
}

/// The service's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    trades_in: IntCounter,
    already_counted: IntCounter,
    candles_out: IntCounterVec,
    late: IntCounter,
    rejected: IntCounterVec,
    watermark_lag: IntGauge,
    lag: IntGaugeVec,
    refused: IntGauge,
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let trades_in = register(
            &registry,
            IntCounter::new("tickpipe_candles_trades_in_total", "Trades read from the trades topic."),
        );
        let already_counted = register(
            &registry,
            IntCounter::new(
                "tickpipe_candles_records_already_counted_total",
                "Trades skipped on re-reading because the restored state already holds them.",
            ),
        );
        let candles_out = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "tickpipe_candles_candles_out_total",
                    "Candle versions published, by interval.",
                ),
                &["interval"],
            ),
        );
        let late = register(
            &registry,
            IntCounter::new(
                "tickpipe_candles_late_trades_total",
                "Trades behind the watermark (dead letters).",
            ),
        );
        let rejected = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "tickpipe_candles_rejected_total",
                    "Input sent to dead letters, by error type.",
                ),
                &["error_type"],
            ),
        );
        let watermark_lag = register(
            &registry,
            IntGauge::new(
                "tickpipe_candles_watermark_lag_seconds",
                "Wall clock minus the oldest watermark of the symbols seen.",
            ),
        );
        let lag = consumer_lag_gauge(&registry, "tickpipe_candles");
        let refused = register(
            &registry,
            IntGauge::new(
                "tickpipe_candles_refused_partitions",
                "Trades partitions paused because the stored position is above the partition's end.",
            ),
        );
        Metrics {
            registry,
            trades_in,
            already_counted,
            candles_out,
            late,
            rejected,
            watermark_lag,
            lag,
            refused,
        }
    }
}

/// The state reader's client: a partition's end is how the read finishes, so
/// librdkafka's report of it is not logged as the error rdkafka's default
/// context calls it.
struct StateReader;

impl ClientContext for StateReader {
    fn error(&self, error: KafkaError, reason: &str) {
        if is_partition_eof(&error) {
            return;
        }
        tracing::error!(%error, reason, "reading the candles state");
    }
}

impl ConsumerContext for StateReader {}

/// The input consumer's client: its statistics set the lag gauge.
struct InputContext {
    lag: IntGaugeVec,
    ends: Ends,
}

impl ClientContext for InputContext {
    fn stats(&self, statistics: Statistics) {
        record_consumer_lag(&self.lag, &statistics);
        record_ends(&self.ends, &statistics);
    }
}

impl ConsumerContext for InputContext {}

fn is_partition_eof(error: &KafkaError) -> bool {
    matches!(
        error,
        KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
    )
}

/// How long reading the state topic at start may go without a record.
const STATE_READ_STALL: Duration = Duration::from_secs(60);

/// Reads the newest snapshot of every input partition from the state topic.
///
/// The end of each partition is found from the fetch responses (partition EOF),
/// which is where the reader stands, whatever the topic's compaction did.
fn read_state(config: &ServiceConfig) -> Result<(HashMap<i32, Stored>, Vec<String>), ServiceError> {
    let topic = config.state_topic();
    let mut cc = consumer_config(&config.brokers, &format!("{}-state-reader", config.group));
    cc.set("enable.partition.eof", "true");
    let consumer: BaseConsumer<StateReader> = cc.create_with_context(StateReader)?;
    let meta = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    let mut open: HashSet<i32> = HashSet::new();
    for p in meta.topics().iter().flat_map(|t| t.partitions()) {
        tpl.add_partition_offset(&topic, p.id(), Offset::Beginning)?;
        open.insert(p.id());
    }
    let mut reader = state::Reader::default();
    let mut reads = 0;
    consumer.assign(&tpl)?;
    // A deadline on progress, not on the whole read: a state topic the broker
    // has not compacted yet (Kafka leaves the active segment alone) can take longer than any fixed limit to read, and
    // failing then would fail every restart after it.
    let mut deadline = std::time::Instant::now() + STATE_READ_STALL;
    while !open.is_empty() {
        if std::time::Instant::now() > deadline {
            return Err(ServiceError::State(format!(
                "reading {topic} made no progress for {} s ({reads} records read)",
                STATE_READ_STALL.as_secs()
            )));
        }
        let msg = match consumer.poll(Duration::from_millis(200)) {
            None => continue,
            Some(Err(KafkaError::PartitionEOF(p))) => {
                open.remove(&p);
                continue;
            }
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(m)) => m,
        };
        reads += 1;
        deadline = std::time::Instant::now() + STATE_READ_STALL;
        if let Some(key) = msg.key() {
            reader.record(key, msg.payload());
        }
    }
    let (state, orphans) = reader.finish(&topic).map_err(ServiceError::State)?;
    let state_offsets: Vec<(i32, i64)> = state.iter().map(|(p, s)| (*p, s.next)).collect();
    tracing::info!(records_read = reads, ?state_offsets, "candles: state read");
    Ok((state, orphans))
}

/// Starts trades partitions over: a tombstone on each one's state head, so
/// that the next start reads them from their beginning and builds their
/// candles again. The re-baseline after a deliberate reset (a recreated
/// topic, another cluster); run it with the service stopped.
pub async fn rebaseline(config: &ServiceConfig, partitions: &[i32]) -> Result<(), ServiceError> {
    let topic = config.state_topic();
    let producer = future_producer(&config.brokers, &topic)?;
    let keys: Vec<String> = partitions.iter().map(|p| state::head_key(*p)).collect();
    send_each(
        &producer,
        keys.iter().map(|k| (topic.as_str(), k.as_str(), None, &[][..])),
    )
    .await?;
    for p in partitions {
        tracing::warn!(
            partition = p,
            "candles: re-baselined: the partition is read from its beginning"
        );
    }
    Ok(())
}

/// Runs until `shutdown` resolves, then finishes the batch in hand and returns.
pub async fn run(config: ServiceConfig, shutdown: impl Future<Output = ()>) -> Result<(), ServiceError> {
    let metrics = Metrics::new();
    let trades_topic = config.topic(Topic::Trades);
    let candles_topic = config.topic(Topic::Candles);
    let dead_topic = config.topic(Topic::DeadLetters);
    ensure_topic_names(
        &config.brokers,
        &[trades_topic.clone(), candles_topic.clone(), dead_topic.clone()],
        config.partitions,
        config.replication,
    )
    .await?;
    // Only the newest snapshot of each input partition matters: compaction
    // keeps the state topic (and the read at start) from growing with time.
    ensure_topics_configured(
        &config.brokers,
        &[config.state_topic()],
        config.partitions,
        config.replication,
        &[("cleanup.policy", "compact")],
    )
    .await?;

    // Ready once the state is restored and the input assigned.
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(addr) = config.metrics_addr {
        crate::ops::serve(
            addr,
            metrics.registry.clone(),
            ready.clone(),
            "not ready: standing by for the lease, or restoring the aggregation state",
        )
        .await
        .map_err(ServiceError::Metrics)?;
    }

    // One active instance per state topic: a standby waits here until the
    // group gives it the lease.
    let mut shutdown = std::pin::pin!(shutdown);
    let lease_topic = config.lease_topic();
    ensure_topic_names(
        &config.brokers,
        std::slice::from_ref(&lease_topic),
        1,
        config.replication,
    )
    .await?;
    let lease = Lease::join(
        &config.brokers,
        &format!("{}-lease", config.group),
        &lease_topic,
        config.lease_session_timeout,
        config.instance_id.as_deref(),
    )?;
    if !lease.held() {
        tracing::info!("candles: standing by until the lease is free");
    }
    while !lease.held() {
        tokio::select! {
            _ = &mut shutdown => {
                tracing::info!("candles: stopped while standing by");
                return Ok(());
            }
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }

    let restore_config = config.clone();
    let (stored, orphans) = tokio::task::spawn_blocking(move || read_state(&restore_config))
        .await
        .map_err(|e| ServiceError::State(e.to_string()))??;
    // What each partition's next state write replaces.
    let mut generations: HashMap<i32, Generation> = stored.iter().map(|(p, s)| (*p, s.generation)).collect();

    let mut cc = consumer_config(&config.brokers, &config.group);
    cc.set("statistics.interval.ms", STATISTICS_INTERVAL_MS);
    let ends = Ends::default();
    let consumer: StreamConsumer<InputContext> = cc.create_with_context(InputContext {
        lag: metrics.lag.clone(),
        ends: ends.clone(),
    })?;
    let meta = consumer.fetch_metadata(Some(&trades_topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    let mut builders: HashMap<i32, CandleBuilder> = HashMap::new();
    // The next offset each builder expects: a message below it is already in
    // the builder's state (a broker that resets the position to the earliest
    // offset would otherwise make it count trades twice).
    let mut positions: HashMap<i32, i64> = HashMap::new();
    for p in meta.topics().iter().flat_map(|t| t.partitions()) {
        let (offset, builder) = match stored.get(&p.id()) {
            Some(s) => (
                {
                    positions.insert(p.id(), s.next);
                    Offset::Offset(s.next)
                },
                CandleBuilder::restore(config.candles.clone(), &s.snapshot).map_err(ServiceError::State)?,
            ),
            None => (Offset::Beginning, CandleBuilder::new(config.candles.clone())),
        };
        tracing::info!(partition = p.id(), ?offset, "candles: resuming");
        tpl.add_partition_offset(&trades_topic, p.id(), offset)?;
        builders.insert(p.id(), builder);
    }
    consumer.assign(&tpl)?;
    let mut checks = EndChecks {
        unchecked: positions.keys().copied().collect(),
        ..EndChecks::default()
    };
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        partitions = builders.len(),
        restored = stored.len(),
        "candles: consuming {trades_topic}"
    );

    let producer = if config.transactions {
        transactional_producer(&config)?
    } else {
        future_producer(&config.brokers, &candles_topic)?
    };
    let mut txn = Transactions::start(producer.clone(), config.transactions).await?;
    // Chunks of a state write that stopped before its head: deleted.
    if !orphans.is_empty() {
        let topic = config.state_topic();
        send_each(
            &producer,
            orphans.iter().map(|k| (topic.as_str(), k.as_str(), None, &[][..])),
        )
        .await?;
    }
    let codec = Codec::new(WriteFraming::SingleObject);
    let mut stopping = false;
    let mut bars = Vec::new();
    let mut outputs = Vec::new();
    // Next input offsets whose trades are counted in a builder but not yet in
    // a stored snapshot, and when the state was last stored.
    let mut unsaved: HashMap<i32, i64> = HashMap::new();
    let mut saved_at = tokio::time::Instant::now();
    while !stopping {
        if lease.lost() {
            // Another instance builds from the last stored state now; what
            // this one did since is built again, the same, over there.
            return Err(ServiceError::State(
                "the lease was taken over by another candles instance (this one was silent past \
                 the lease session); stopping without storing the state"
                    .into(),
            ));
        }
        txn.begin()?;
        // Collect one batch.
        let mut next_offsets: HashMap<i32, i64> = HashMap::new();
        let mut dead: Vec<DeadLetter> = Vec::new();
        let deadline = tokio::time::Instant::now() + config.batch_wait;
        if !checks.unchecked.is_empty() {
            check_ends(&consumer, &config, &trades_topic, &positions, &ends, &mut checks);
            metrics.refused.set(checks.refused.len() as i64);
        }
        // One clock reading per batch: a batch lasts at most `batch_wait`.
        let rules = Rules::at(now_micros());
        let mut n = 0;
        while n < config.batch_max {
            tokio::select! {
                _ = &mut shutdown, if !stopping => { stopping = true; break; }
                _ = tokio::time::sleep_until(deadline) => break,
                msg = consumer.recv() => {
                    let msg = msg?;
                    let partition = msg.partition();
                    if checks.refused.contains(&partition) {
                        continue;
                    }
                    let position = positions.entry(partition).or_insert(0);
                    if msg.offset() < *position {
                        metrics.already_counted.inc();
                        continue;
                    }
                    *position = msg.offset() + 1;
                    n += 1;
                    metrics.trades_in.inc();
                    next_offsets.insert(partition, msg.offset() + 1);
                    let payload = msg.payload().unwrap_or_default();
                    match codec.decode::<Trade>(payload) {
                        Ok(trade) => {
                            // A trade from another writer, or stamped in the
                            // wrong unit, must not move a watermark (a day
                            // ahead would close a day of windows at once).
                            if let Err(reason) = rules.trade(&trade) {
                                metrics.rejected.with_label_values(&["invalid_trade"]).inc();
                                dead.push(dead_letter(Stage::Validate, reason, Some(&msg), payload.to_vec(), trade.source));
                                continue;
                            }
                            if let Some(b) = builders.get_mut(&partition) {
                                b.push(&trade, &mut bars);
                                outputs.extend(bars.drain(..).map(|o| b.resolve(o)));
                            }
                        }
                        Err(e) => {
                            metrics.rejected.with_label_values(&[e.kind()]).inc();
                            dead.push(dead_letter(Stage::Decode, e.to_string(), Some(&msg), payload.to_vec(), Source::Unknown));
                        }
                    }
                }
            }
        }
        if next_offsets.is_empty() {
            // Idle: the watermarks stand still and their lag grows.
            set_watermark_lag(&metrics.watermark_lag, &builders);
            if saved_at.elapsed() >= config.state_interval {
                write_state(
                    &producer,
                    &config,
                    &builders,
                    &mut generations,
                    &mut unsaved,
                    &mut saved_at,
                )
                .await?;
                txn.commit().await?;
            }
            continue;
        }

        // (1) Candles and dead letters, acknowledged.
        let mut pending = Vec::new();
        for o in outputs.drain(..) {
            match o {
                Output::Candle(c) => {
                    metrics.candles_out.with_label_values(&[&c.interval]).inc();
                    let bytes = codec.encode(&c).map_err(|e| ServiceError::State(e.to_string()))?;
                    pending.push((candles_topic.clone(), c.key(), bytes));
                }
                Output::Late {
                    trade,
                    interval,
                    watermark,
                } => {
                    metrics.late.inc();
                    let reason = format!(
                        "late: event time {} is behind the {interval} watermark {watermark}",
                        trade.event_time
                    );
                    dead.push(trade_dead_letter(&codec, &trade, reason));
                }
                Output::Invalid { trade, reason } => {
                    metrics.rejected.with_label_values(&["invalid_trade"]).inc();
                    dead.push(trade_dead_letter(&codec, &trade, reason));
                }
                Output::Unrepresentable {
                    key,
                    interval,
                    open_time,
                } => {
                    metrics.rejected.with_label_values(&["unrepresentable"]).inc();
                    let reason = format!(
                        "{key} {interval} candle at {open_time}: sums exceed 28 significant digits or the trade count exceeds i64"
                    );
                    dead.push(dead_letter(
                        Stage::Aggregate,
                        reason,
                        None,
                        key.into_bytes(),
                        Source::Unknown,
                    ));
                }
            }
        }
        let letters = letter_records(&dead_topic, &codec, &dead).map_err(|e| ServiceError::State(e.to_string()))?;
        send_all(&producer, pending).await?;
        send_letters(&producer, &letters).await?;

        // (2) The state that goes with those outputs, when it is due.
        unsaved.extend(&next_offsets);
        if stopping || saved_at.elapsed() >= config.state_interval {
            write_state(
                &producer,
                &config,
                &builders,
                &mut generations,
                &mut unsaved,
                &mut saved_at,
            )
            .await?;
            txn.commit().await?;
        }

        // (3) Progress for lag monitoring.
        let mut commit = TopicPartitionList::new();
        for (p, next) in &next_offsets {
            commit.add_partition_offset(&trades_topic, *p, Offset::Offset(*next))?;
        }
        consumer.commit(&commit, rdkafka::consumer::CommitMode::Async)?;

        set_watermark_lag(&metrics.watermark_lag, &builders);
    }
    // A stop that came while idle: the trades since the last snapshot.
    txn.begin()?;
    write_state(
        &producer,
        &config,
        &builders,
        &mut generations,
        &mut unsaved,
        &mut saved_at,
    )
    .await?;
    txn.commit().await?;
    tracing::info!("candles: stopped after storing its state");
    Ok(())
}

/// Writes a snapshot of each builder in `unsaved` with its next input offset
/// (in chunks, then the heads that name them, then tombstones for the chunks
/// they replace: `state`), waits for the acknowledgements, empties `unsaved`
/// and sets `saved_at` to now (also when there was nothing to write). Call it
/// only once the outputs of every trade the builders hold are acknowledged.
async fn write_state(
    producer: &rdkafka::producer::FutureProducer,
    config: &ServiceConfig,
    builders: &HashMap<i32, CandleBuilder>,
    generations: &mut HashMap<i32, Generation>,
    unsaved: &mut HashMap<i32, i64>,
    saved_at: &mut tokio::time::Instant,
) -> Result<(), ServiceError> {
    if !unsaved.is_empty() {
        let topic = config.state_topic();
        let writes: Vec<(i32, state::Write)> = unsaved
            .iter()
            .filter_map(|(p, next)| {
                let b = builders.get(p)?;
                Some((*p, state::write(*p, *next, &b.snapshot(), generations.get(p).copied())))
            })
            .collect();
        let chunks = writes.iter().flat_map(|(_, w)| &w.chunks);
        send_each(
            producer,
            chunks.map(|(k, v)| (topic.as_str(), k.as_str(), Some(v.as_slice()), &[][..])),
        )
        .await?;
        let heads = writes.iter().map(|(_, w)| &w.head);
        send_each(
            producer,
            heads.map(|(k, v)| (topic.as_str(), k.as_str(), Some(v.as_slice()), &[][..])),
        )
        .await?;
        let obsolete = writes.iter().flat_map(|(_, w)| &w.obsolete);
        send_each(producer, obsolete.map(|k| (topic.as_str(), k.as_str(), None, &[][..]))).await?;
        for (p, w) in &writes {
            generations.insert(*p, w.stored);
        }
        tracing::debug!(?unsaved, "candles: state written");
        unsaved.clear();
    }
    *saved_at = tokio::time::Instant::now();
    Ok(())
}

/// The transactional producer of the active instance. Its id is the lease's
/// (`<group>-candles`), the same whichever instance holds it, so that a new
/// holder's `init_transactions` aborts what a dead one left open and fences a
/// holder that hung past its lease.
fn transactional_producer(config: &ServiceConfig) -> Result<rdkafka::producer::FutureProducer, KafkaError> {
    let mut c = producer_config(&config.brokers);
    c.set("transactional.id", format!("{}-candles", config.group))
        // One transaction spans a state interval; the broker aborts one that
        // outlives this (its own ceiling, transaction.max.timeout.ms, is 15 min).
        .set(
            "transaction.timeout.ms",
            (config.state_interval.as_millis() as u64 + 60_000)
                .min(900_000)
                .to_string(),
        );
    c.create()
}

/// Kafka transactions around everything the service writes between two
/// state writes: the candles and dead letters of the batches, then the state
/// that holds their input positions, committed together. A crash aborts what
/// came after the last commit, and the restart, resuming from the state of
/// that commit, writes it again: `read_committed` readers see every candle
/// version once. Off: the same writes without transactions, where a crash
/// leaves identical copies of what it replays. Timeouts of the blocking
/// calls: 60 s.
struct Transactions {
    producer: rdkafka::producer::FutureProducer,
    on: bool,
    open: bool,
}

const TRANSACTION_CALL: Duration = Duration::from_secs(60);

impl Transactions {
    async fn start(producer: rdkafka::producer::FutureProducer, on: bool) -> Result<Self, ServiceError> {
        if on {
            let p = producer.clone();
            tokio::task::spawn_blocking(move || p.init_transactions(TRANSACTION_CALL))
                .await
                .map_err(|e| ServiceError::State(e.to_string()))??;
            tracing::info!("candles: writing in Kafka transactions");
        }
        let mut t = Transactions {
            producer,
            on,
            open: false,
        };
        t.begin()?;
        Ok(t)
    }

    /// Opens a transaction unless one is open.
    fn begin(&mut self) -> Result<(), ServiceError> {
        if self.on && !self.open {
            self.producer.begin_transaction()?;
            self.open = true;
        }
        Ok(())
    }

    /// Commits the open transaction, if any.
    async fn commit(&mut self) -> Result<(), ServiceError> {
        if self.on && self.open {
            let p = self.producer.clone();
            tokio::task::spawn_blocking(move || p.commit_transaction(TRANSACTION_CALL))
                .await
                .map_err(|e| ServiceError::State(e.to_string()))??;
            self.open = false;
        }
        Ok(())
    }
}

/// Restored positions still to be checked against their partition's end,
/// those a report put above it once (judged again on the next), and the
/// partitions refused because theirs lies above it.
#[derive(Default)]
struct EndChecks {
    unchecked: HashSet<i32>,
    above_once: HashSet<i32>,
    refused: HashSet<i32>,
}

/// Checks the restored positions in `unchecked` against their partitions'
/// ends, once the statistics report the end a fetch response gave; pauses
/// each partition whose position lies above it and adds it to `refused`.
fn check_ends(
    consumer: &StreamConsumer<InputContext>,
    config: &ServiceConfig,
    topic: &str,
    positions: &HashMap<i32, i64>,
    ends: &Ends,
    checks: &mut EndChecks,
) {
    let mut pause = TopicPartitionList::new();
    let EndChecks {
        unchecked,
        above_once,
        refused,
    } = checks;
    unchecked.retain(|p| {
        let Some(&next) = positions.get(p) else {
            return false;
        };
        let verdict = judge_position(ends, &(topic.to_owned(), *p), next, above_once.contains(p));
        if let EndVerdict::Refuse(why) = verdict {
            tracing::error!(
                partition = p,
                "candles: {topic}[{p}]: {why}. This partition is not read until the position is fixed. To start \
                 it over from its beginning (its candles are built again), restart the service with --rebaseline \
                 {p}, or publish a tombstone (key trades-{p}, no value) to {} and restart it",
                config.state_topic()
            );
            refused.insert(*p);
            let _ = pause.add_partition_offset(topic, *p, Offset::Invalid);
            return false;
        }
        match verdict {
            EndVerdict::Unknown => true,
            EndVerdict::Again => {
                above_once.insert(*p);
                true
            }
            _ => false,
        }
    });
    if pause.count() > 0 {
        if let Err(e) = consumer.pause(&pause) {
            tracing::error!("candles: pausing refused partitions failed: {e}");
        }
    }
}

/// Wall clock minus the oldest watermark of the symbols seen, set every batch
/// and every idle `batch_wait`.
fn set_watermark_lag(gauge: &IntGauge, builders: &HashMap<i32, CandleBuilder>) {
    if let Some(w) = builders.values().filter_map(|b| b.min_watermark()).min() {
        gauge.set((now_micros() - w) / 1_000_000);
    }
}

fn dead_letter(
    stage: Stage,
    error: String,
    msg: Option<&rdkafka::message::BorrowedMessage<'_>>,
    payload: Vec<u8>,
    source: Source,
) -> DeadLetter {
    let origin = msg.map_or_else(Origin::default, |m| {
        Origin::kafka(m.topic(), m.partition(), m.offset(), m.key())
    });
    DeadLetter::new("candles", stage, error, payload, source, origin, now_micros())
}

fn trade_dead_letter(codec: &Codec, trade: &Trade, reason: String) -> DeadLetter {
    let payload = codec.encode(trade).unwrap_or_default();
    let key = trade.key();
    let origin = Origin {
        key: Some(key.as_bytes()),
        ..Origin::default()
    };
    DeadLetter::new(
        "candles",
        Stage::Aggregate,
        reason,
        payload,
        trade.source,
        origin,
        now_micros(),
    )
}
