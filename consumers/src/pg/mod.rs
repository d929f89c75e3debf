//! The `postgres-sink`: every entity topic into PostgreSQL, exactly once per
//! Kafka offset. `config` holds its settings and connection, `migrate` the
//! embedded schema, `rows` the table writes, `writer` one batch per
//! transaction, `sink` the service on the sink runtime, `tls` the
//! connection's TLS with libpq's `sslmode` meanings.

pub mod config;
pub mod migrate;
pub mod rows;
pub mod sink;
pub mod tls;
pub mod writer;
pub use tickpipe_schemas::validate;

/// The name this service signs its dead letters with.
pub const COMPONENT: &str = "postgres-sink";
