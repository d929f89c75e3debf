//! `postgres-sink`: the entity topics into PostgreSQL, exactly once per offset.
//! Parses its configuration and calls `run`; everything else is in the library.

use clap::Parser;
use tickpipe_consumers::ops;
use tickpipe_consumers::pg::sink::{rebaseline, run, SinkConfig};

tickpipe_consumers::sink_args!(
    SinkArgs,
    env = "POSTGRES_SINK",
    defaults = tickpipe_consumers::pg::sink::DEFAULTS
);

/// Writes every entity topic into PostgreSQL: current state, SCD2 asset
/// history, append tables and dead letters, exactly once per Kafka offset
/// (the group is also the key of the offsets stored in Postgres; a batch is
/// one transaction).
#[derive(Debug, Parser)]
#[command(version, after_help = tickpipe_kafka::PROPERTIES_HELP)]
struct Args {
    #[command(flatten)]
    sink: SinkArgs,
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
    /// Partitions to read from their beginning, forgetting their stored
    /// positions first (`<topic>:<partition>`, the full topic name, as the
    /// error that refuses a partition names it; repeatable or comma-separated).
    /// For a deliberate reset only: a recreated topic, another cluster.
    #[arg(long, env = "TICKPIPE_POSTGRES_SINK_REBASELINE", value_delimiter = ',', value_parser = topic_partition)]
    rebaseline: Vec<(String, i32)>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (shutdown, args) = ops::start::<Args>()?;
    let config = SinkConfig {
        sink: args.sink.settings().map_err(anyhow::Error::msg)?,
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
