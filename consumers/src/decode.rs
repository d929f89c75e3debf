//! Kafka records to typed records, for the sinks: the framing and schema of
//! each payload, the meaning checks, and what went wrong if either failed.
//! No I/O except asking the Schema Registry for a writer schema it has not
//! seen ([`learn_schema`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::Message;
use tickpipe_schemas::field::Value;
use tickpipe_schemas::registry::RegistryClient;
use tickpipe_schemas::validate::Rules;
use tickpipe_schemas::Record;
use tickpipe_schemas::{
    Asset, Candle, Codec, DeadLetter, DecodeError, Exchange, Market, Micros, Price, Rate, Source, Topic, Trade,
};

/// A decoded record.
#[derive(Debug, Clone)]
pub enum Body {
    Asset(Asset),
    Rate(Rate),
    Exchange(Exchange),
    Market(Market),
    Price(Price),
    Trade(Trade),
    Candle(Candle),
    /// Another service's reject, read from the dead-letters topic.
    DeadLetter(DeadLetter),
}

impl Body {
    /// The exchange's event time, for end-to-end latency.
    pub fn event_time(&self) -> Micros {
        match self {
            Body::Asset(r) => r.event_time,
            Body::Rate(r) => r.event_time,
            Body::Exchange(r) => r.event_time,
            Body::Market(r) => r.event_time,
            Body::Price(r) => r.event_time,
            Body::Trade(r) => r.event_time,
            Body::Candle(r) => r.event_time,
            Body::DeadLetter(r) => r.event_time,
        }
    }

    pub fn source(&self) -> Source {
        match self {
            Body::Asset(r) => r.source,
            Body::Rate(r) => r.source,
            Body::Exchange(r) => r.source,
            Body::Market(r) => r.source,
            Body::Price(r) => r.source,
            Body::Trade(r) => r.source,
            Body::Candle(r) => r.source,
            Body::DeadLetter(r) => r.source,
        }
    }

    /// The entity topic this record belongs to (one table, or two for assets).
    /// Every field by name, in schema order.
    pub fn values(&self) -> Vec<(&'static str, Value<'_>)> {
        match self {
            Body::Asset(r) => r.values(),
            Body::Rate(r) => r.values(),
            Body::Exchange(r) => r.values(),
            Body::Market(r) => r.values(),
            Body::Price(r) => r.values(),
            Body::Trade(r) => r.values(),
            Body::Candle(r) => r.values(),
            Body::DeadLetter(r) => r.values(),
        }
    }

    pub fn topic(&self) -> Topic {
        match self {
            Body::Asset(_) => Topic::Assets,
            Body::Rate(_) => Topic::Rates,
            Body::Exchange(_) => Topic::Exchanges,
            Body::Market(_) => Topic::Markets,
            Body::Price(_) => Topic::Prices,
            Body::Trade(_) => Topic::Trades,
            Body::Candle(_) => Topic::Candles,
            Body::DeadLetter(_) => Topic::DeadLetters,
        }
    }
}

/// Why a record was not written.
#[derive(Debug, Clone)]
pub struct Reject {
    /// `decode`, `validate` or `write`.
    pub stage: &'static str,
    pub error: String,
    pub source: Source,
}

/// One Kafka record, decoded or rejected.
#[derive(Debug, Clone)]
pub struct Item {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub body: Result<Body, Reject>,
}

/// Decodes and validates one Kafka record.
pub fn decode_item(codec: &Codec, rules: &Rules, topic_of: &HashMap<String, Topic>, msg: &impl Message) -> Item {
    let payload = msg.payload().unwrap_or_default();
    let reject = |stage, error: String, source| Reject { stage, error, source };
    let body = match topic_of.get(msg.topic()) {
        None => Err(reject(
            "decode",
            format!("no entity for topic {}", msg.topic()),
            Source::Unknown,
        )),
        Some(topic) => decode_body(codec, *topic, payload)
            .map_err(|e| reject("decode", format!("{}: {e}", e.kind()), Source::Unknown))
            .and_then(|body| {
                let checked = match &body {
                    Body::Trade(r) => rules.trade(r),
                    Body::Candle(r) => rules.candle(r),
                    Body::Asset(r) => rules.asset(r),
                    Body::Rate(r) => rules.rate(r),
                    Body::Exchange(r) => rules.exchange(r),
                    Body::Market(r) => rules.market(r),
                    Body::Price(r) => rules.price(r),
                    Body::DeadLetter(r) => rules.dead_letter(r),
                };
                match checked {
                    Ok(()) => Ok(body),
                    Err(e) => Err(reject("validate", e, body.source())),
                }
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

fn decode_body(codec: &Codec, topic: Topic, payload: &[u8]) -> Result<Body, DecodeError> {
    Ok(match topic {
        Topic::Assets => Body::Asset(codec.decode::<Asset>(payload)?),
        Topic::Rates => Body::Rate(codec.decode::<Rate>(payload)?),
        Topic::Exchanges => Body::Exchange(codec.decode::<Exchange>(payload)?),
        Topic::Markets => Body::Market(codec.decode::<Market>(payload)?),
        Topic::Prices => Body::Price(codec.decode::<Price>(payload)?),
        Topic::Trades => Body::Trade(codec.decode::<Trade>(payload)?),
        Topic::Candles => Body::Candle(codec.decode::<Candle>(payload)?),
        Topic::DeadLetters => Body::DeadLetter(codec.decode::<DeadLetter>(payload)?),
    })
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
    DeadLetter {
        stage: reject.stage.to_owned(),
        error: reject.error.clone(),
        component: component.to_owned(),
        topic: Some(item.topic.clone()),
        partition: Some(item.partition),
        offset: Some(item.offset),
        key: item.key.clone(),
        payload: item.payload.clone(),
        source: reject.source,
        event_time: now,
        ingest_time: now,
    }
    .bounded()
}
