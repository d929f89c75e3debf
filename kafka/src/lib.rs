//! Kafka for every tickpipe service, producer and consumers alike: one place
//! for what the delivery guarantees rest on.
//!
//! - [`client`]: the user's librdkafka properties and the `require` /
//!   `default_to` rules every configuration below is built with.
//! - [`produce`]: an idempotent `acks=all` producer and the awaited sends.
//! - [`consume`]: a consumer whose offsets follow its output, its lag gauge,
//!   and the check of a written position against the partition's end.
//! - [`admin`]: topic creation and configuration at start.

pub mod admin;
pub mod client;
pub mod consume;
pub mod produce;

pub use admin::{ensure_topic_names, ensure_topics, ensure_topics_configured, ConfigMismatch, TopicError};
pub use client::{client_config, default_to, require, warm_up, PROPERTIES_HELP, PROPERTY_ENV_PREFIX};
pub use consume::{
    consumer_config, consumer_lag_gauge, judge_position, position_above_end, record_consumer_lag, record_ends,
    EndVerdict, Ends, STATISTICS_INTERVAL_MS,
};
pub use produce::{
    future_producer, letter_records, producer_config, producer_config_tuned, send_all, send_each, send_letters,
    Headers, LetterRecord,
};
