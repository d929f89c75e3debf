//! Helpers shared by the producer's integration tests: read a topic back in
//! full, decode it, and wait on conditions with a deadline.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tickpipe_producer::config::Config;
use tickpipe_schemas::{Codec, DeadLetter, Record, Trade, WriteFraming};
use tickpipe_testkit::stack;

/// The producer with `source` alone, publishing to the local broker under
/// `prefix`, without a metrics endpoint.
pub fn local_config(source: &str, prefix: &str) -> Config {
    let mut c = Config {
        sources: vec![source.into()],
        metrics_addr: "off".into(),
        ..Config::default()
    };
    c.kafka.brokers = stack::kafka_brokers();
    c.kafka.topic_prefix = prefix.into();
    c
}

/// Every record of `topic` up to its current end, as (key, payload). The end
/// is where each partition reports EOF: tansu's ListOffsets (watermarks) can
/// report less than the log holds.
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

/// Decodes payloads of one record type; panics on a payload that does not decode.
pub fn decode<R: Record>(records: &[(Vec<u8>, Vec<u8>)]) -> Vec<R> {
    let codec = Codec::new(WriteFraming::SingleObject);
    records
        .iter()
        .map(|(_, v)| codec.decode::<R>(v).expect("decodable record"))
        .collect()
}

pub fn trades(brokers: &str, prefix: &str) -> Vec<Trade> {
    decode(&read_topic(brokers, &format!("{prefix}trades")))
}

pub fn dead_letters(brokers: &str, prefix: &str) -> Vec<DeadLetter> {
    decode(&read_topic(brokers, &format!("{prefix}dead-letters")))
}

/// Waits until `f` holds, polling every 20 ms; panics with `what` at the deadline.
pub async fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Counter value summed over all label sets.
pub fn total(c: &prometheus::IntCounterVec) -> u64 {
    use prometheus::core::Collector;
    c.collect()
        .iter()
        .flat_map(|f| f.get_metric())
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

/// Resident set size of this process, in bytes.
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse::<u64>().ok())
        .unwrap_or(0)
        * 4096
}

/// Ids of `first..=last` absent from sorted `ids`, and ids present more than
/// once (or outside the range), each list cut to 20 for a readable message.
pub fn id_discrepancies(ids: &[i64], first: i64, last: i64) -> (Vec<i64>, Vec<i64>) {
    let mut missing = Vec::new();
    let mut repeated = Vec::new();
    let mut it = ids.iter().peekable();
    for want in first..=last {
        let mut seen = 0;
        while let Some(&&id) = it.peek() {
            if id < want {
                repeated.push(id);
                it.next();
            } else if id == want {
                seen += 1;
                it.next();
            } else {
                break;
            }
        }
        match seen {
            0 => missing.push(want),
            1 => {}
            _ => repeated.push(want),
        }
    }
    repeated.extend(it.copied());
    missing.truncate(20);
    repeated.truncate(20);
    (missing, repeated)
}
