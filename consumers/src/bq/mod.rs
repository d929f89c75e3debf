//! The `bigquery-sink`: every entity topic into BigQuery, one row per Kafka
//! offset as read through the views. `schema` derives the tables from the Avro
//! schemas, `rows` formats records as rows, `client` is the REST API (the only
//! BigQuery I/O), `sink` the service.

pub mod client;
pub mod rows;
pub mod schema;
pub mod sink;

/// The name this service signs its dead letters with.
pub const COMPONENT: &str = "bigquery-sink";
