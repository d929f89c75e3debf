//! The `lake-sink`: every entity topic as Parquet files in object storage (a
//! local folder, S3 or an S3-compatible store, Google Cloud Storage), exactly
//! once per Kafka offset. `layout` names the folders and files, `columns`
//! turns records into Arrow columns and Parquet bytes, `store` opens the
//! target (the only I/O besides the sink), `sink` the service on the sink
//! runtime: it gathers each partition's records into files and rolls them
//! over by size and by time.

pub mod columns;
pub mod layout;
pub mod sink;
pub mod store;

/// The name this service signs its dead letters with.
pub const COMPONENT: &str = "lake-sink";
