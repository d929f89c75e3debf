//! `postgres-sink`: the entity topics into PostgreSQL, exactly once per offset.
//! Parses its configuration and calls `run`; everything else is in the library.

use std::time::Duration;

use clap::Parser;
use tickpipe_consumers::args::{entity_topics, RegistryArgs, ValidationArgs};
use tickpipe_consumers::ops::config::ConfigArg;
use tickpipe_consumers::ops::{self, KafkaArgs};
use tickpipe_consumers::pg::sink::{rebaseline, run, SinkConfig};
use tickpipe_consumers::sink::SinkSettings;

/// Writes every entity topic into PostgreSQL: current state, SCD2 asset
/// history, append tables and dead letters, exactly once per Kafka offset.
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
        env = "TICKPIPE_POSTGRES_SINK_TOPICS",
        value_delimiter = ',',
        default_value = "assets,rates,exchanges,markets,prices,trades,candles,dead-letters"
    )]
    topics: Vec<String>,
    /// PostgreSQL connection (URL or key=value string, as libpq takes them).
    /// TLS as in libpq: sslmode=disable|allow|prefer|require|verify-ca|verify-full
    /// (default prefer), sslrootcert=<PEM file or "system">, sslcert and sslkey
    /// (PKCS#8) for certificate authentication. The password is never logged.
    #[arg(
        long,
        env = "TICKPIPE_POSTGRES_URL",
        default_value = "postgresql://postgres@127.0.0.1:5432/postgres",
        hide_env_values = true
    )]
    postgres_url: String,
    /// Connections in the pool.
    #[arg(long, env = "TICKPIPE_POSTGRES_POOL_SIZE", default_value_t = 4)]
    pool_size: usize,
    /// Consumer group; also the key of the offsets stored in Postgres.
    #[arg(long, env = "TICKPIPE_POSTGRES_SINK_GROUP", default_value = "tickpipe-postgres-sink")]
    group: String,
    /// Most records per batch (one transaction).
    #[arg(long, env = "TICKPIPE_POSTGRES_SINK_BATCH_MAX", default_value_t = 20_000)]
    batch_max: usize,
    /// Longest wait for a batch to fill, in ms.
    #[arg(long, env = "TICKPIPE_POSTGRES_SINK_BATCH_WAIT_MS", default_value_t = 200)]
    batch_wait_ms: u64,
    /// Longest pause between retries of a failed write, in ms.
    #[arg(long, env = "TICKPIPE_POSTGRES_SINK_MAX_BACKOFF_MS", default_value_t = 5_000)]
    max_backoff_ms: u64,
    /// Milliseconds the group waits for a silent member before moving its partitions.
    #[arg(long, env = "TICKPIPE_POSTGRES_SINK_SESSION_TIMEOUT_MS", default_value_t = 10_000)]
    session_timeout_ms: u64,
    /// Static group membership id (e.g. the pod name): a restarted instance
    /// with the same id gets its partitions back without a rebalance.
    #[arg(long, env = "TICKPIPE_POSTGRES_SINK_INSTANCE_ID")]
    instance_id: Option<String>,
    /// Partitions to read from their beginning, forgetting their stored
    /// positions first (`<topic>:<partition>`, the full topic name, as the
    /// error that refuses a partition names it; repeatable or comma-separated).
    /// For a deliberate reset only: a recreated topic, another cluster.
    #[arg(long, env = "TICKPIPE_POSTGRES_SINK_REBASELINE", value_delimiter = ',', value_parser = topic_partition)]
    rebaseline: Vec<(String, i32)>,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Address of /metrics, /healthz and /readyz ("off" to disable).
    #[arg(long, env = "TICKPIPE_POSTGRES_SINK_METRICS_ADDR", default_value = "127.0.0.1:9104")]
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
    let config = SinkConfig {
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
        postgres_url: args.postgres_url,
        pool_size: args.pool_size,
    };
    if !args.rebaseline.is_empty() {
        rebaseline(&config, &args.rebaseline).await?;
    }
    run(config, shutdown).await?;
    Ok(())
}

/// `<topic>:<partition>`.
fn topic_partition(s: &str) -> Result<(String, i32), String> {
    let (topic, partition) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?}: expected <topic>:<partition>"))?;
    let partition = partition
        .parse()
        .map_err(|_| format!("{s:?}: the partition is not a number"))?;
    Ok((topic.to_owned(), partition))
}

#[cfg(test)]
mod tests {
    use super::topic_partition;

    #[test]
    fn rebaseline_names_a_topic_and_a_partition() {
        assert_eq!(topic_partition("dev.trades:2"), Ok(("dev.trades".to_owned(), 2)));
        assert_eq!(topic_partition("a:b:0"), Ok(("a:b".to_owned(), 0)));
        assert!(topic_partition("trades").is_err_and(|e| e.contains("<topic>:<partition>")));
        assert!(topic_partition("trades:x").is_err_and(|e| e.contains("not a number")));
    }
}
