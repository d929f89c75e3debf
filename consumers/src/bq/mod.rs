//! The `bigquery-sink`: every entity topic into BigQuery, one row per Kafka
//! offset as read through the views. `schema` derives the tables from the Avro
//! schemas, `tables` provisions them, `rows` formats records as rows, `plan`
//! splits a batch into requests, `client` is the REST API (the only BigQuery
//! I/O), `sink` the service on the sink runtime.

pub mod client;
pub mod plan;
pub mod rows;
pub mod schema;
pub mod sink;
pub mod tables;

pub use tables::prepare_tables;

/// The name this service signs its dead letters with.
pub const COMPONENT: &str = "bigquery-sink";
