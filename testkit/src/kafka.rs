//! Reading a topic back in full, for tests on both sides of the broker.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

/// Every record of `topic` up to its current end, as (key, payload). The end
/// is where each partition reports EOF, so a compacted topic reads as what it
/// still holds.
pub fn read_topic(brokers: &str, topic: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    let consumer: BaseConsumer = reader_config(brokers).create().expect("consumer");
    read_with(&consumer, topic)
}

/// The settings of `read_topic`'s consumer, for a caller that adds its own
/// (security, say) and reads with `read_with`.
pub fn reader_config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("group.id", "tickpipe-test-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true");
    c
}

/// `read_topic` with a consumer of the caller's (made from `reader_config`).
pub fn read_with(consumer: &BaseConsumer, topic: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let partitions: Vec<i32> = md.topics()[0].partitions().iter().map(|p| p.id()).collect();
    assert!(!partitions.is_empty(), "topic {topic} has no partitions");
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let mut open: BTreeSet<i32> = partitions.into_iter().collect();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !open.is_empty() {
        assert!(
            Instant::now() < deadline,
            "reading {topic} timed out, partitions left: {open:?}"
        );
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Ok(m)) => out.push((
                m.key().unwrap_or_default().to_vec(),
                m.payload().unwrap_or_default().to_vec(),
            )),
            Some(Err(KafkaError::PartitionEOF(p))) => {
                open.remove(&p);
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
        }
    }
    out
}

/// A record's headers as text, by name (the Kafka Connect dead-letter
/// headers, say).
pub fn headers(msg: &impl Message) -> std::collections::BTreeMap<String, String> {
    use rdkafka::message::Headers;
    msg.headers()
        .map(|h| {
            h.iter()
                .map(|x| {
                    (
                        x.key.to_owned(),
                        String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}
