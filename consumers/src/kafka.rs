//! Kafka settings shared by the consumers.

use rdkafka::config::ClientConfig;

/// Settings for a consumer whose offsets move only after its output is durable:
/// no automatic commit and no automatic offset store (the sink stores offsets
/// itself, after the write succeeded), reading from the earliest offset when the
/// group has none.
pub fn consumer_config(brokers: &str, group: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed");
    c
}
