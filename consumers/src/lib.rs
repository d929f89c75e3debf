//! The consumers: `postgres-sink`, `bigquery-sink`, `lake-sink` and `candles` read the entity
//! topics, decode and validate records, and write them on.

pub mod args;
pub mod bq;
pub mod candles;
pub mod decode;
pub mod lake;
pub use tickpipe_ops as ops;
pub mod pg;
pub mod sink;
