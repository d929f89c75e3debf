//! The one place records leave the producer: encode (Avro, via `schemas`), then
//! enqueue to Kafka with a bound on what is in flight, so that a slow or absent
//! broker blocks the sources (backpressure) instead of growing memory.
//!
//! Delivery: librdkafka retries inside the idempotent producer (no duplicates,
//! order kept) for `message.timeout.ms` (default: forever); an error that still
//! surfaces is re-enqueued by us a bounded number of times and counted. A
//! record's in-flight permit is released only when it is acknowledged or given
//! up on, so the bound covers retries too.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{DeliveryResult, Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use tickpipe_schemas::{AnyRecord, Codec, DeadLetter, Origin, Stage, Topic};
use tokio::sync::{Notify, Semaphore, TryAcquireError};

use crate::events::Undelivered;
use crate::item::{now_micros, Item, Reject};
use crate::metrics::Metrics;

/// How often a record whose delivery failed is enqueued again before it counts
/// as a delivery failure.
const MAX_REDELIVERIES: u8 = 5;

/// Settings of the publisher.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// The librdkafka settings (from `kafka::producer_config` plus overrides).
    pub kafka: ClientConfig,
    /// Prefix of every topic name.
    pub topic_prefix: String,
    /// Most records enqueued and not yet acknowledged; sources wait beyond it.
    pub max_in_flight: usize,
}

/// What travels with each record to its delivery report.
struct Meta {
    enqueued: Instant,
    topic: Topic,
    attempts: u8,
}

/// A delivery that failed and is to be enqueued again.
struct Redelivery {
    topic: Topic,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: Option<OwnedHeaders>,
    attempts: u8,
}

/// A dead letter's Kafka Connect headers (`DeadLetter::connect_headers`).
fn letter_headers(letter: &DeadLetter) -> OwnedHeaders {
    let headers = letter.connect_headers();
    headers
        .iter()
        .fold(OwnedHeaders::new_with_capacity(headers.len()), |h, (k, v)| {
            h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            })
        })
}

struct Context {
    metrics: Metrics,
    /// `published` and `bytes` per topic, resolved once (a label lookup per
    /// delivery would cost more than the rest of the callback).
    per_topic: Vec<(prometheus::IntCounter, prometheus::IntCounter)>,
    permits: Arc<Semaphore>,
    unacked: Arc<AtomicU64>,
    /// Woken when the last unacknowledged record is settled (see `flush`).
    idle: Notify,
    redeliver: std::sync::mpsc::Sender<Redelivery>,
}

impl ClientContext for Context {}

impl ProducerContext for Context {
    type DeliveryOpaque = Box<Meta>;

    fn delivery(&self, result: &DeliveryResult<'_>, meta: Box<Meta>) {
        let topic = meta.topic.base_name();
        match result {
            Ok(m) => {
                let (published, bytes) = &self.per_topic[topic_index(meta.topic)];
                published.inc();
                bytes.inc_by(m.payload_len() as u64);
                self.metrics
                    .produce_latency
                    .observe(meta.enqueued.elapsed().as_secs_f64());
                self.release();
            }
            Err((e, m)) => {
                let permanent = matches!(
                    e,
                    KafkaError::MessageProduction(
                        RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidRecord
                    )
                );
                if permanent || meta.attempts >= MAX_REDELIVERIES {
                    Undelivered {
                        topic,
                        error: &e,
                        again: false,
                    }
                    .emit(&self.metrics);
                    self.release();
                    return;
                }
                Undelivered {
                    topic,
                    error: &e,
                    again: true,
                }
                .emit(&self.metrics);
                let again = Redelivery {
                    topic: meta.topic,
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                    headers: m.headers().map(|h| h.detach()),
                    attempts: meta.attempts + 1,
                };
                if self.redeliver.send(again).is_err() {
                    let error = "the publisher stopped before the record could be enqueued again";
                    Undelivered {
                        topic,
                        error: &error,
                        again: false,
                    }
                    .emit(&self.metrics);
                    self.release();
                }
            }
        }
    }
}

impl Context {
    fn release(&self) {
        self.metrics.queue_depth.dec();
        self.permits.add_permits(1);
        if self.unacked.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }
}

/// Encodes and publishes items; cheap to clone and shared by every source.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    producer: Arc<BaseProducer<Context>>,
    /// The thread that serves delivery reports (see `poll_deliveries`), and
    /// the flag that stops it when the publisher is dropped.
    poller: Option<std::thread::JoinHandle<()>>,
    stop_polling: Arc<AtomicBool>,
    codec: Codec,
    names: Vec<String>,
    permits: Arc<Semaphore>,
    unacked: Arc<AtomicU64>,
    metrics: Metrics,
    /// The most bytes of key and value a record may have: librdkafka's
    /// `message.max.bytes` less room for the record's framing. A larger record
    /// would be refused at enqueue and lost; it becomes a dead letter instead.
    max_record: usize,
}

/// Bytes of a Kafka message besides its key and value (record and batch
/// headers), left free below `message.max.bytes`.
const FRAMING_ALLOWANCE: usize = 1024;

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop_polling.store(true, Ordering::Release);
        if let Some(poller) = self.poller.take() {
            let _ = poller.join();
        }
    }
}

/// How long the delivery thread waits for a report before looking at its stop
/// flag: short, so that dropping a publisher (at exit) does not wait long.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Serves delivery reports until `stop` is set (what rdkafka's
/// `ThreadedProducer` does with a 100 ms wait, which every exit paid).
fn poll_deliveries(
    producer: Arc<BaseProducer<Context>>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("deliveries".into()).spawn(move || {
        while !stop.load(Ordering::Acquire) {
            producer.poll(POLL_INTERVAL);
        }
    })
}

thread_local! {
    static BUF: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
}

impl Publisher {
    /// Creates the Kafka producer. Topics must exist (see `kafka::ensure_topics`).
    pub fn new(config: &PublisherConfig, codec: Codec, metrics: Metrics) -> Result<Self, KafkaError> {
        let permits = Arc::new(Semaphore::new(config.max_in_flight));
        let unacked = Arc::new(AtomicU64::new(0));
        let (tx, rx) = std::sync::mpsc::channel::<Redelivery>();
        let mut kafka = config.kafka.clone();
        // librdkafka's default, which brokers' own default (1 MB) matches.
        let max_record = kafka
            .get("message.max.bytes")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(1_000_000)
            .saturating_sub(FRAMING_ALLOWANCE);
        // Our own bound is the real one; librdkafka's queue must never be the
        // smaller, or `send` would fail where it should wait.
        let queue = (config.max_in_flight * 2).max(1000).to_string();
        kafka.set("queue.buffering.max.messages", &queue);
        let per_topic = Topic::ALL
            .iter()
            .map(|t| {
                (
                    metrics.published.with_label_values(&[t.base_name()]),
                    metrics.bytes.with_label_values(&[t.base_name()]),
                )
            })
            .collect();
        let producer: BaseProducer<Context> = kafka.create_with_context(Context {
            per_topic,
            metrics: metrics.clone(),
            permits: permits.clone(),
            unacked: unacked.clone(),
            idle: Notify::new(),
            redeliver: tx,
        })?;
        let producer = Arc::new(producer);
        let stop_polling = Arc::new(AtomicBool::new(false));
        let poller = poll_deliveries(producer.clone(), stop_polling.clone())
            .map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
        let names: Vec<String> = Topic::ALL.iter().map(|t| t.name(&config.topic_prefix)).collect();
        {
            let (weak, topic) = (Arc::downgrade(&producer), names[topic_index(Topic::Trades)].clone());
            tickpipe_kafka::warm_up(move || {
                let Some(producer) = weak.upgrade() else { return false };
                if let Err(e) = producer.client().fetch_metadata(Some(&topic), Duration::from_secs(2)) {
                    tracing::debug!(error = %e, "metadata at start");
                }
                true
            })
            .map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
        }
        let weak = Arc::downgrade(&producer);
        let redeliver_names = names.clone();
        std::thread::Builder::new()
            .name("redeliver".into())
            .spawn(move || {
                while let Ok(r) = rx.recv() {
                    let Some(producer) = weak.upgrade() else { break };
                    let name = &redeliver_names[topic_index(r.topic)];
                    let meta = Box::new(Meta {
                        enqueued: Instant::now(),
                        topic: r.topic,
                        attempts: r.attempts,
                    });
                    let mut record: BaseRecord<'_, [u8], Vec<u8>, Box<Meta>> =
                        BaseRecord::with_opaque_to(name, meta).payload(&r.payload);
                    if let Some(k) = &r.key {
                        record = record.key(k.as_slice());
                    }
                    if let Some(h) = r.headers {
                        record = record.headers(h);
                    }
                    enqueue_blocking(&producer, record);
                }
            })
            .map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
        Ok(Publisher {
            inner: Arc::new(Inner {
                producer,
                poller: Some(poller),
                stop_polling,
                codec,
                names,
                permits,
                unacked,
                metrics,
                max_record,
            }),
        })
    }

    /// The metrics this publisher counts into.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Records enqueued and not yet acknowledged.
    pub fn in_flight(&self) -> u64 {
        self.inner.unacked.load(Ordering::Acquire)
    }

    /// True while no more records can be enqueued (the broker is behind).
    pub fn saturated(&self) -> bool {
        self.inner.permits.available_permits() == 0
    }

    /// The fatal error librdkafka raised, if any (for example the idempotent
    /// producer refused its producer id): the client can deliver nothing more,
    /// and the process must stop so that an orchestrator starts it afresh.
    pub fn fatal_error(&self) -> Option<String> {
        self.inner
            .producer
            .client()
            .fatal_error()
            .map(|(code, reason)| format!("{code:?}: {reason}"))
    }

    /// Resolves with the fatal error once librdkafka raises one (checked every
    /// 200 ms).
    pub async fn fatal(&self) -> String {
        loop {
            if let Some(e) = self.fatal_error() {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Publishes one item: a record to its entity topic, a reject to the dead
    /// letters. Waits while `max_in_flight` records are unacknowledged. Never
    /// fails: what cannot be encoded becomes a dead letter itself.
    pub async fn publish(&self, item: Item) {
        self.publish_one(item, &mut None).await;
    }

    /// Publishes items in order, as `publish` does each, reading the clock
    /// (for the produce latency) once for the batch, and again after any wait
    /// for room, instead of once per record.
    pub async fn publish_batch(&self, items: impl IntoIterator<Item = Item>) {
        let mut since = Some(Instant::now());
        for item in items {
            self.publish_one(item, &mut since).await;
        }
    }

    /// `since`: when the batch being published started, or `None` to read the
    /// clock for this record.
    async fn publish_one(&self, item: Item, since: &mut Option<Instant>) {
        let permit = match self.inner.permits.try_acquire() {
            Ok(permit) => permit,
            Err(TryAcquireError::Closed) => return,
            Err(TryAcquireError::NoPermits) => {
                let Ok(permit) = self.inner.permits.acquire().await else {
                    return;
                };
                // Waiting for room is not produce latency.
                if since.is_some() {
                    *since = Some(Instant::now());
                }
                permit
            }
        };
        permit.forget();
        let enqueued = since.unwrap_or_else(Instant::now);
        let inner = &self.inner;
        inner.unacked.fetch_add(1, Ordering::AcqRel);
        inner.metrics.queue_depth.inc();
        let topic = item.topic();
        let mut headers = None;
        let encoded = match &item {
            Item::Record(r) => self.encode(r),
            Item::Reject(r) => {
                inner
                    .metrics
                    .rejected
                    .with_label_values(&[r.component, r.stage.as_str()])
                    .inc();
                let letter = self.dead_letter(r);
                headers = Some(letter_headers(&letter));
                self.encode(&letter.into())
            }
        };
        // Nothing we built should fail to encode (validation ran first); if it
        // does, the record itself is the dead letter's payload. A record too
        // large for Kafka (a CoinCap asset with a huge token map, say) is one
        // too, with its encoding as the payload.
        let encoded = match encoded {
            Ok(key) if topic != Topic::DeadLetters => {
                let len = BUF.with(|b| b.borrow().len());
                if len + key.len() > inner.max_record {
                    Err((
                        format!(
                            "the encoded record is {len} bytes and its key {} bytes, more than the {} bytes a \
                             Kafka message may carry here (message.max.bytes)",
                            key.len(),
                            inner.max_record
                        ),
                        BUF.with(|b| b.borrow().clone()),
                    ))
                } else {
                    Ok(key)
                }
            }
            Ok(key) => Ok(key),
            Err(reason) => Err((reason, format!("{item:?}").into_bytes())),
        };
        match encoded {
            Ok(key) => self.enqueue(topic, &key, headers, enqueued).await,
            Err((reason, raw)) => {
                let reject = Reject {
                    component: "producer",
                    stage: Stage::Encode,
                    reason,
                    raw,
                    topic: Some(topic),
                    source: tickpipe_schemas::Source::Unknown,
                };
                inner
                    .metrics
                    .rejected
                    .with_label_values(&["producer", Stage::Encode.as_str()])
                    .inc();
                let letter = self.dead_letter(&reject);
                let headers = letter_headers(&letter);
                match self.encode(&letter.into()) {
                    Ok(key) => self.enqueue(Topic::DeadLetters, &key, Some(headers), enqueued).await,
                    Err(e) => {
                        tracing::error!(error = %e, "dead letter could not be encoded");
                        inner
                            .metrics
                            .delivery_failures
                            .with_label_values(&["dead-letters"])
                            .inc();
                        self.release();
                    }
                }
            }
        }
    }

    fn release(&self) {
        self.inner.producer.context().release();
    }

    /// Encodes into this thread's buffer (read by the `enqueue` that follows
    /// on the same thread, before any await) and returns the key.
    fn encode(&self, record: &AnyRecord) -> Result<String, String> {
        BUF.with(|b| {
            let mut buf = b.borrow_mut();
            buf.clear();
            record
                .encode_into(&self.inner.codec, &mut buf)
                .map_err(|e| e.to_string())
        })
    }

    fn dead_letter(&self, r: &Reject) -> DeadLetter {
        let topic = r.topic.map(|t| self.inner.names[topic_index(t)].as_str());
        let origin = topic.map_or_else(Origin::default, Origin::meant_for);
        DeadLetter::new(
            r.component,
            r.stage,
            r.reason.clone(),
            r.raw.clone(),
            r.source,
            origin,
            now_micros(),
        )
    }

    /// Enqueues the record just encoded into this thread's buffer. librdkafka
    /// copies the payload, so the buffer is reused; only when its queue is full
    /// is the payload copied out to wait.
    async fn enqueue(&self, topic: Topic, key: &str, headers: Option<OwnedHeaders>, enqueued: Instant) {
        let name = &self.inner.names[topic_index(topic)];
        let meta = Box::new(Meta {
            enqueued,
            topic,
            attempts: 0,
        });
        let first = BUF.with(|b| {
            let buf = b.borrow();
            let mut record = BaseRecord::with_opaque_to(name.as_str(), meta)
                .key(key)
                .payload(buf.as_slice());
            record.headers = headers;
            match self.inner.producer.send(record) {
                Ok(()) => None,
                Err((e, r)) => Some((e, r.delivery_opaque, r.headers, buf.clone())),
            }
        });
        let Some((mut error, mut meta, mut headers, payload)) = first else {
            return;
        };
        loop {
            match error {
                KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                e => {
                    tracing::error!(topic = topic.base_name(), error = %e, "record could not be enqueued");
                    self.inner
                        .metrics
                        .delivery_failures
                        .with_label_values(&[topic.base_name()])
                        .inc();
                    self.release();
                    return;
                }
            }
            let mut record = BaseRecord::with_opaque_to(name.as_str(), meta)
                .key(key)
                .payload(payload.as_slice());
            record.headers = headers;
            match self.inner.producer.send(record) {
                Ok(()) => return,
                Err((e, r)) => {
                    error = e;
                    meta = r.delivery_opaque;
                    headers = r.headers;
                }
            }
        }
    }

    /// Waits until every enqueued record is acknowledged (or given up on) or
    /// `timeout` passes; returns how many are still unacknowledged. Waits on
    /// our own count, woken by the delivery report that settles the last one.
    pub async fn flush(&self, timeout: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + timeout;
        let idle = &self.inner.producer.context().idle;
        loop {
            let settled = idle.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            if self.in_flight() == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, settled).await.is_err() {
                return self.in_flight();
            }
        }
    }
}

/// Enqueues from a plain thread, waiting while librdkafka's queue is full.
fn enqueue_blocking(producer: &BaseProducer<Context>, mut record: BaseRecord<'_, [u8], Vec<u8>, Box<Meta>>) {
    loop {
        match producer.send(record) {
            Ok(()) => return,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, r)) => {
                tracing::error!(error = %e, "record could not be enqueued again");
                producer
                    .context()
                    .metrics
                    .delivery_failures
                    .with_label_values(&[r.delivery_opaque.topic.base_name()])
                    .inc();
                producer.context().release();
                return;
            }
        }
    }
}

fn topic_index(t: Topic) -> usize {
    Topic::ALL.iter().position(|x| *x == t).unwrap_or(0)
}
