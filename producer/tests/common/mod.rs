//! Helpers shared by the producer's integration tests: read a topic back in
//! full, decode it, and wait on conditions with a deadline.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use tickpipe_producer::config::Config;
use tickpipe_schemas::{Codec, DeadLetter, Record, Trade, WriteFraming};
use tickpipe_testkit::kafka::read_topic;
use tickpipe_testkit::stack;

/// The producer with `source` alone, publishing to the local broker under
/// `prefix`, without a metrics endpoint.
pub fn local_config(source: &str, prefix: &str) -> Config {
    let mut c = Config::default();
    c.sources.names = vec![source.into()];
    c.producer.metrics_addr = "off".into();
    c.kafka.brokers = stack::kafka_brokers();
    c.kafka.topic_prefix = prefix.into();
    c
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
