//! The producer: exchange sources, validation, Avro encoding and publishing to
//! the per-entity Kafka topics.
//!
//! Today this holds the Kafka side every source publishes through; the sources
//! themselves arrive with the producer's own work.

pub mod kafka;
