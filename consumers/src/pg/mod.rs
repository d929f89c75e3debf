//! The `postgres-sink`: every entity topic into PostgreSQL, exactly once per
//! Kafka offset. `migrate` holds the embedded schema, `validate` the meaning
//! checks, `rows` the table writes, `sink` the service, `tls` the
//! connection's TLS with libpq's `sslmode` meanings.

pub mod migrate;
pub mod rows;
pub mod sink;
pub mod tls;
pub use tickpipe_schemas::validate;

/// The name this service signs its dead letters with.
pub const COMPONENT: &str = "postgres-sink";
