//! The producer: exchange sources, validation, Avro encoding and publishing to
//! the per-entity Kafka topics.
//!
//! - [`sources`]: one module per upstream, registered in one list; the pure
//!   parsers of every wire format live beside their I/O.
//! - [`item`]: what sources emit (a record or a reject) and the exact-decimal helpers.
//! - [`publish`]: encoding and the bounded, backpressured Kafka enqueue.
//! - [`service`]: topics, registry, endpoint, sources, shutdown.
//! - [`config`], [`metrics`], [`events`] (occurrences logged and counted
//!   together); Kafka itself is `tickpipe_kafka`.

pub mod config;
pub mod events;
pub mod item;
pub mod metrics;
pub mod publish;
pub mod service;
pub mod sources;
