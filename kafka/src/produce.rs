//! Producing: the settings of a producer that neither duplicates nor loses,
//! and the awaited sends (records, tombstones, dead letters).

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tickpipe_schemas::{Codec, DeadLetter, EncodeError, Record};

use crate::client::{client_config, default_to, require, warm_up};

/// Settings for a producer that never duplicates on retry and never acknowledges
/// a write the cluster could still lose: idempotence, `acks=all`, lz4 batches.
/// The user's properties may change anything but the first two.
pub fn producer_config(brokers: &str) -> ClientConfig {
    producer_config_tuned(brokers, &[])
}

/// `producer_config` with the caller's tuning (such as the producer's own
/// `linger.ms` setting) in place of the built-in defaults; the user's
/// librdkafka properties still win over both.
pub fn producer_config_tuned(brokers: &str, tuning: &[(&str, String)]) -> ClientConfig {
    producer_settings(client_config(brokers), tuning)
}

fn producer_settings(mut c: ClientConfig, tuning: &[(&str, String)]) -> ClientConfig {
    require(&mut c, "enable.idempotence", "true");
    require(&mut c, "acks", "all");
    for (key, value) in tuning {
        default_to(&mut c, key, value);
    }
    default_to(&mut c, "compression.type", "lz4");
    default_to(&mut c, "linger.ms", "5");
    default_to(&mut c, "message.timeout.ms", "30000");
    c
}

/// A `FutureProducer` for `brokers` (`producer_config`), warmed up on
/// `topic`: the consumers' producers of candles and dead letters.
pub fn future_producer(brokers: &str, topic: &str) -> Result<FutureProducer, KafkaError> {
    let producer: FutureProducer = producer_config(brokers).create()?;
    let (client, topic) = (producer.clone(), topic.to_owned());
    warm_up(move || {
        if let Err(e) = client.client().fetch_metadata(Some(&topic), Duration::from_secs(2)) {
            tracing::debug!(error = %e, "metadata at start");
        }
        true
    })
    .map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
    Ok(producer)
}

/// Produces records and waits until the broker acknowledged every one. All are
/// enqueued first, so that librdkafka batches them, then awaited.
pub async fn send_all(producer: &FutureProducer, records: Vec<(String, String, Vec<u8>)>) -> Result<(), KafkaError> {
    send_each(
        producer,
        records
            .iter()
            .map(|(t, k, v)| (t.as_str(), k.as_str(), Some(v.as_slice()), &[][..])),
    )
    .await
}

/// A record's headers, as (name, value).
pub type Headers = [(&'static str, String)];

/// [`send_all`] for records that may be tombstones (no value) or carry headers.
pub async fn send_each<'a>(
    producer: &FutureProducer,
    records: impl Iterator<Item = (&'a str, &'a str, Option<&'a [u8]>, &'a Headers)>,
) -> Result<(), KafkaError> {
    let mut deliveries = Vec::new();
    for (topic, key, value, headers) in records {
        let mut record = FutureRecord::to(topic).key(key);
        if let Some(v) = value {
            record = record.payload(v);
        }
        if !headers.is_empty() {
            let owned = headers
                .iter()
                .fold(OwnedHeaders::new_with_capacity(headers.len()), |h, (k, v)| {
                    h.insert(Header {
                        key: k,
                        value: Some(v.as_bytes()),
                    })
                });
            record = record.headers(owned);
        }
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    deliveries.push(delivery);
                    break;
                }
                // The local queue is full: let deliveries drain, then retry.
                Err((KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((e, _)) => return Err(e),
            }
        }
    }
    for d in deliveries {
        match d.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(e),
            Err(_) => return Err(KafkaError::Canceled),
        }
    }
    Ok(())
}

/// A dead letter ready to publish: encoded, keyed, with the Kafka Connect
/// headers (`DeadLetter::connect_headers`).
#[derive(Debug, Clone)]
pub struct LetterRecord {
    pub topic: String,
    pub key: String,
    pub value: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
}

/// Dead letters as records for [`send_letters`], bound for `topic`.
pub fn letter_records(topic: &str, codec: &Codec, letters: &[DeadLetter]) -> Result<Vec<LetterRecord>, EncodeError> {
    letters
        .iter()
        .map(|l| {
            Ok(LetterRecord {
                topic: topic.to_owned(),
                key: l.key(),
                value: codec.encode(l)?,
                headers: l.connect_headers(),
            })
        })
        .collect()
}

/// Publishes dead letters and waits until every one is acknowledged.
pub async fn send_letters(producer: &FutureProducer, letters: &[LetterRecord]) -> Result<(), KafkaError> {
    send_each(
        producer,
        letters.iter().map(|l| {
            (
                l.topic.as_str(),
                l.key.as_str(),
                Some(l.value.as_slice()),
                l.headers.as_slice(),
            )
        }),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::with_properties;

    #[test]
    fn user_properties_tune_but_never_weaken_the_producer() {
        let user = vars(&[
            ("linger.ms", "50"),
            ("acks", "1"),
            ("enable.idempotence", "false"),
            ("sasl.mechanisms", "PLAIN"),
        ]);
        let tuning = [("linger.ms", "7".to_owned()), ("message.timeout.ms", "0".to_owned())];
        let c = producer_settings(with_properties("b:9092", &user), &tuning);
        assert_eq!(c.get("bootstrap.servers"), Some("b:9092"));
        assert_eq!(c.get("linger.ms"), Some("50"), "tuning is the user's");
        assert_eq!(c.get("sasl.mechanisms"), Some("PLAIN"));
        assert_eq!(c.get("acks"), Some("all"), "acks=all is kept");
        assert_eq!(c.get("enable.idempotence"), Some("true"), "idempotence is kept");
        assert_eq!(
            c.get("compression.type"),
            Some("lz4"),
            "our default where the user said nothing"
        );
        assert_eq!(
            c.get("message.timeout.ms"),
            Some("0"),
            "the caller's tuning over the built-in default"
        );
    }

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }
}
