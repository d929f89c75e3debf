//! `bigquery-sink`: the entity topics into BigQuery, de-duplicated by Kafka
//! coordinates. Parses its configuration and calls `run`; everything else is in
//! the library.

use std::path::PathBuf;

use clap::Parser;
use tickpipe_consumers::bq::client::{Auth, Endpoint};
use tickpipe_consumers::bq::schema::DecimalColumns;
use tickpipe_consumers::bq::sink::{run, BqSinkConfig};
use tickpipe_consumers::ops;

tickpipe_consumers::sink_args!(
    SinkArgs,
    env = "BIGQUERY_SINK",
    defaults = tickpipe_consumers::bq::sink::DEFAULTS
);

/// Writes every entity topic into BigQuery: an append-only table per entity,
/// partitioned by event day, and a view with one row per Kafka record.
#[derive(Debug, Parser)]
#[command(version, after_help = tickpipe_kafka::PROPERTIES_HELP)]
struct Args {
    #[command(flatten)]
    sink: SinkArgs,
    /// Google Cloud project of the dataset.
    #[arg(long, env = "TICKPIPE_BIGQUERY_PROJECT", default_value = "tickpipe-local")]
    project: String,
    /// Dataset of the tables and views; created when missing.
    #[arg(long, env = "TICKPIPE_BIGQUERY_DATASET", default_value = "tickpipe")]
    dataset: String,
    /// Location of a dataset this sink creates.
    #[arg(long, env = "TICKPIPE_BIGQUERY_LOCATION", default_value = "US")]
    location: String,
    /// REST URL of a BigQuery emulator (no authentication), e.g.
    /// http://127.0.0.1:9050. Unset: Google's BigQuery.
    #[arg(long, env = "TICKPIPE_BIGQUERY_EMULATOR")]
    emulator: Option<String>,
    /// API root of BigQuery itself, for private endpoints.
    #[arg(
        long,
        env = "TICKPIPE_BIGQUERY_API_URL",
        default_value = "https://bigquery.googleapis.com"
    )]
    api_url: String,
    /// Service-account key file (JSON). Unset: Application Default
    /// Credentials (GOOGLE_APPLICATION_CREDENTIALS, gcloud's login, or the
    /// metadata server). The key is never logged.
    #[arg(long, env = "TICKPIPE_BIGQUERY_CREDENTIALS")]
    credentials: Option<PathBuf>,
    /// Column type of decimals: bignumeric (exact, BIGNUMERIC(38, 18)) or
    /// string (exact text). Default: bignumeric, or string with --emulator,
    /// which cannot create BIGNUMERIC columns.
    #[arg(long, env = "TICKPIPE_BIGQUERY_DECIMALS")]
    decimals: Option<DecimalColumns>,
    /// Most rows per insert request.
    #[arg(long, env = "TICKPIPE_BIGQUERY_SINK_REQUEST_ROWS", default_value_t = 500)]
    request_rows: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (shutdown, args) = ops::start::<Args>()?;
    let endpoint = match (&args.emulator, args.credentials) {
        (Some(url), None) => Endpoint {
            api_url: url.clone(),
            project: args.project,
            auth: Auth::None,
        },
        (Some(url), Some(key)) => Endpoint {
            api_url: url.clone(),
            project: args.project,
            auth: Auth::KeyFile(key),
        },
        (None, key) => Endpoint {
            api_url: args.api_url,
            project: args.project,
            auth: key.map_or(Auth::ApplicationDefault, Auth::KeyFile),
        },
    };
    let decimals = args.decimals.unwrap_or(if args.emulator.is_some() {
        DecimalColumns::String
    } else {
        DecimalColumns::BigNumeric
    });
    let config = BqSinkConfig {
        sink: args.sink.settings().map_err(anyhow::Error::msg)?,
        endpoint,
        dataset: args.dataset,
        location: args.location,
        decimals,
        request_rows: args.request_rows,
    };
    run(config, shutdown).await?;
    Ok(())
}
