//! Kafka records to typed records, for the sinks: the framing and schema of
//! each payload, the meaning checks, and what went wrong if either failed.
//! No I/O except asking the Schema Registry for a writer schema it has not
//! seen ([`learn_schema`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::Message;
use tickpipe_schemas::registry::RegistryClient;
use tickpipe_schemas::validate::Rules;
use tickpipe_schemas::{AnyRecord, Codec, DeadLetter, Micros, Origin, Source, Stage, Topic};

/// Why a record was not written.
#[derive(Debug, Clone)]
pub struct Reject {
    /// `Decode`, `Validate` or `Write`.
    pub stage: Stage,
    pub error: String,
    pub source: Source,
}

impl Reject {
    /// The sink's target refused `item` (a decoded record, or one already
    /// rejected whose source is then unknown).
    pub fn write(item: &Item, error: impl Into<String>) -> Reject {
        Reject {
            stage: Stage::Write,
            error: error.into(),
            source: item.body.as_ref().map_or(Source::Unknown, AnyRecord::source),
        }
    }
}

/// One Kafka record, decoded or rejected.
#[derive(Debug, Clone)]
pub struct Item {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub body: Result<AnyRecord, Reject>,
}

/// Decodes and validates one Kafka record.
pub fn decode_item(codec: &Codec, rules: &Rules, topic_of: &HashMap<String, Topic>, msg: &impl Message) -> Item {
    let payload = msg.payload().unwrap_or_default();
    let reject = |stage, error: String, source| Reject { stage, error, source };
    let body = match topic_of.get(msg.topic()) {
        None => Err(reject(
            Stage::Decode,
            format!("no entity for topic {}", msg.topic()),
            Source::Unknown,
        )),
        Some(topic) => topic
            .decode(codec, payload)
            .map_err(|e| reject(Stage::Decode, format!("{}: {e}", e.kind()), Source::Unknown))
            .and_then(|body| match body.validate(rules) {
                Ok(()) => Ok(body),
                Err(e) => Err(reject(Stage::Validate, e, body.source())),
            }),
    };
    Item {
        topic: msg.topic().to_owned(),
        partition: msg.partition(),
        offset: msg.offset(),
        key: msg.key().map(<[u8]>::to_vec),
        payload: payload.to_vec(),
        body,
    }
}

/// Teaches the codec the writer schema of a Confluent-framed payload it has not
/// seen ([`RegistryClient::learn`]). While the registry is unreachable this
/// waits with backoff (records are not dead-lettered for an outage) and
/// `answering` is false, which `/readyz` reports; an id the registry does not
/// have is left for the decoder to reject (and remembered by the client).
pub fn learn_schema(
    runtime: &tokio::runtime::Handle,
    registry: &RegistryClient,
    codec: &Codec,
    payload: &[u8],
    stop: &AtomicBool,
    answering: &AtomicBool,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match runtime.block_on(registry.learn(codec, payload)) {
            Err(e) if e.is_retriable() && !stop.load(Ordering::Relaxed) => {
                answering.store(false, Ordering::Relaxed);
                tracing::warn!("sink: schema registry: {e}; retrying in {backoff:?}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            outcome => {
                answering.store(true, Ordering::Relaxed);
                if let Err(e) = outcome {
                    tracing::warn!("sink: {e}");
                }
                return;
            }
        }
    }
}

/// A record a sink (`component`) could not write, as a dead letter (bounded:
/// [`DeadLetter::bounded`]).
pub fn reject_letter(component: &str, item: &Item, reject: &Reject, now: Micros) -> DeadLetter {
    let origin = Origin::kafka(&item.topic, item.partition, item.offset, item.key.as_deref());
    DeadLetter::new(
        component,
        reject.stage,
        reject.error.clone(),
        item.payload.clone(),
        reject.source,
        origin,
        now,
    )
}
