//! `lake-sink`: the entity topics as Parquet files in a lake (a local folder,
//! S3 or Google Cloud Storage), exactly once per Kafka offset. Parses its
//! configuration and calls `run`; everything else is in the library.

use std::time::Duration;

use clap::Parser;
use tickpipe_consumers::lake::sink::{run, LakeSinkConfig};
use tickpipe_consumers::lake::store::Target;
use tickpipe_consumers::ops;

tickpipe_consumers::sink_args!(
    SinkArgs,
    env = "LAKE_SINK",
    defaults = tickpipe_consumers::lake::sink::DEFAULTS
);

/// Writes every entity topic as Parquet files:
/// raw/<entity>/venue=<venue>/date=<YYYY-MM-DD>/<topic>+<partition>+<first offset>+<last offset>.parquet,
/// each written whole and named after what it holds.
#[derive(Debug, Parser)]
#[command(version, after_help = tickpipe_kafka::PROPERTIES_HELP)]
struct Args {
    #[command(flatten)]
    sink: SinkArgs,
    /// Where the lake is: a folder (file://<folder> too), s3://<bucket>/<prefix>
    /// (credentials, region and AWS_ENDPOINT for S3-compatible stores from the
    /// AWS_* variables or the instance's role) or gs://<bucket>/<prefix>
    /// (GOOGLE_SERVICE_ACCOUNT key file, or Application Default Credentials).
    /// Credentials are never logged.
    #[arg(long, env = "TICKPIPE_LAKE_SINK_TARGET", default_value = ".local/lake")]
    target: Target,
    /// A file is written once its records take this many MiB (as encoded in
    /// Kafka; the Parquet file is several times smaller); at most 1024.
    #[arg(long, env = "TICKPIPE_LAKE_SINK_FILE_MAX_MIB", default_value_t = 64)]
    file_max_mib: usize,
    /// A file is written once its oldest record has waited this many seconds.
    #[arg(long, env = "TICKPIPE_LAKE_SINK_FILE_MAX_SECS", default_value_t = 300)]
    file_max_secs: u64,
    /// When the open files together hold more than this many MiB, the largest
    /// is written.
    #[arg(long, env = "TICKPIPE_LAKE_SINK_BUFFER_MAX_MIB", default_value_t = 256)]
    buffer_max_mib: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (shutdown, args) = ops::start::<Args>()?;
    let config = LakeSinkConfig {
        file_max_bytes: args.file_max_mib.saturating_mul(1 << 20),
        file_max_age: Duration::from_secs(args.file_max_secs),
        buffer_max_bytes: args.buffer_max_mib.saturating_mul(1 << 20),
        ..LakeSinkConfig::new(args.sink.settings().map_err(anyhow::Error::msg)?, args.target)
    };
    run(config, shutdown).await?;
    Ok(())
}
