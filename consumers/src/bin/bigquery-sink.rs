//! `bigquery-sink`: the entity topics into BigQuery, de-duplicated by Kafka
//! coordinates. Parses its configuration and calls `run`; everything else is in
//! the library.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tickpipe_consumers::args::{entity_topics, RegistryArgs, ValidationArgs};
use tickpipe_consumers::bq::client::{Auth, Endpoint};
use tickpipe_consumers::bq::schema::DecimalColumns;
use tickpipe_consumers::bq::sink::{run, BqSinkConfig};
use tickpipe_consumers::ops::config::ConfigArg;
use tickpipe_consumers::ops::{self, KafkaArgs};
use tickpipe_consumers::sink::SinkSettings;

/// Writes every entity topic into BigQuery: an append-only table per entity,
/// partitioned by event day, and a view with one row per Kafka record.
#[derive(Debug, Parser)]
#[command(version, after_help = tickpipe_kafka::PROPERTIES_HELP)]
struct Args {
    #[command(flatten)]
    config: ConfigArg,
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    validation: ValidationArgs,
    /// Entity topics to consume (names without prefix), comma-separated.
    #[arg(
        long,
        env = "TICKPIPE_BIGQUERY_SINK_TOPICS",
        value_delimiter = ',',
        default_value = "assets,rates,exchanges,markets,prices,trades,candles,dead-letters"
    )]
    topics: Vec<String>,
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
    /// Consumer group; its committed offsets are where reading resumes.
    #[arg(long, env = "TICKPIPE_BIGQUERY_SINK_GROUP", default_value = "tickpipe-bigquery-sink")]
    group: String,
    /// Most records per batch.
    #[arg(long, env = "TICKPIPE_BIGQUERY_SINK_BATCH_MAX", default_value_t = 10_000)]
    batch_max: usize,
    /// Longest wait for a batch to fill, in ms.
    #[arg(long, env = "TICKPIPE_BIGQUERY_SINK_BATCH_WAIT_MS", default_value_t = 500)]
    batch_wait_ms: u64,
    /// Most rows per insert request.
    #[arg(long, env = "TICKPIPE_BIGQUERY_SINK_REQUEST_ROWS", default_value_t = 500)]
    request_rows: usize,
    /// Longest pause between retries, in ms.
    #[arg(long, env = "TICKPIPE_BIGQUERY_SINK_MAX_BACKOFF_MS", default_value_t = 10_000)]
    max_backoff_ms: u64,
    /// Milliseconds the group waits for a silent member before moving its partitions.
    #[arg(long, env = "TICKPIPE_BIGQUERY_SINK_SESSION_TIMEOUT_MS", default_value_t = 10_000)]
    session_timeout_ms: u64,
    /// Static group membership id (e.g. the pod name): a restarted instance
    /// with the same id gets its partitions back without a rebalance.
    #[arg(long, env = "TICKPIPE_BIGQUERY_SINK_INSTANCE_ID")]
    instance_id: Option<String>,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Address of /metrics, /healthz and /readyz ("off" to disable).
    #[arg(long, env = "TICKPIPE_BIGQUERY_SINK_METRICS_ADDR", default_value = "127.0.0.1:9105")]
    metrics_addr: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Installed before anything else, so a SIGTERM during start-up is a clean stop too.
    let shutdown = ops::shutdown_signal()?;
    ops::init_logging();
    let args: Args = ops::config::parse()?;
    args.validation.apply();
    let metrics_addr = ops::metrics_addr(&args.metrics_addr).map_err(anyhow::Error::msg)?;
    let topics = entity_topics(&args.topics).map_err(anyhow::Error::msg)?;
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
        sink: SinkSettings {
            brokers: args.kafka.brokers,
            topic_prefix: args.kafka.topic_prefix,
            topics,
            group: args.group,
            batch_max: args.batch_max,
            batch_wait: Duration::from_millis(args.batch_wait_ms),
            max_backoff: Duration::from_millis(args.max_backoff_ms),
            session_timeout: Duration::from_millis(args.session_timeout_ms),
            instance_id: args.instance_id,
            partitions: args.kafka.partitions,
            replication: args.kafka.replication,
            metrics_addr,
            registry: args.registry.config(),
        },
        endpoint,
        dataset: args.dataset,
        location: args.location,
        decimals,
        request_rows: args.request_rows,
    };
    run(config, shutdown).await?;
    Ok(())
}
