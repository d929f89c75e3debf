//! The consumers: `postgres-sink`, `bigquery-sink` and `candles` read the entity
//! topics, decode and validate records, and write them on.
//!
//! Today this holds the Kafka settings every consumer shares; the binaries arrive
//! with their own work.

pub mod candles;
pub mod kafka;
