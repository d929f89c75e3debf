//! `candles`: event-time OHLCV candles from the `trades` topic into `candles`.
//! Parses its configuration and calls `run`; everything else is in the library.

use std::time::Duration;

use clap::Parser;
use tickpipe_consumers::candles::service::{rebaseline, run, ServiceConfig};
use tickpipe_consumers::candles::{CandleConfig, Interval};
use tickpipe_consumers::ops::config::ConfigArg;
use tickpipe_consumers::ops::{self, KafkaArgs, ValidationArgs};

/// Builds OHLCV candles from trades in event time and publishes them.
#[derive(Debug, Parser)]
#[command(version, after_help = tickpipe_kafka::PROPERTIES_HELP)]
struct Args {
    #[command(flatten)]
    config: ConfigArg,
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    validation: ValidationArgs,
    /// Trades partitions to read from their beginning, forgetting their
    /// stored state first (repeatable or comma-separated), as the error that
    /// refuses a partition suggests. For a deliberate reset only.
    #[arg(long, env = "TICKPIPE_CANDLES_REBASELINE", value_delimiter = ',')]
    rebaseline: Vec<i32>,
    /// Candle intervals, comma-separated (<n>s, <n>m, <n>h, <n>d).
    #[arg(
        long,
        env = "TICKPIPE_CANDLES_INTERVALS",
        value_delimiter = ',',
        default_value = "1s,5s,1m,5m,1h,1d"
    )]
    intervals: Vec<Interval>,
    /// How late (ms of event time behind the newest trade) a trade may arrive and
    /// still correct its candle; later ones go to dead letters.
    #[arg(long, env = "TICKPIPE_CANDLES_ALLOWED_LATENESS_MS", default_value_t = 2000,
          value_parser = clap::value_parser!(i64).range(0..i64::MAX / 1000))]
    allowed_lateness_ms: i64,
    /// Fill windows without trades with Binance-style empty candles.
    #[arg(long, env = "TICKPIPE_CANDLES_FILL_EMPTY", default_value_t = true, action = clap::ArgAction::Set)]
    fill_empty: bool,
    /// Longest run of empty windows filled at once.
    #[arg(long, env = "TICKPIPE_CANDLES_MAX_FILL", default_value_t = 100_000)]
    max_fill: usize,
    /// Consumer group (for lag monitoring; positions are kept in the state topic).
    #[arg(long, env = "TICKPIPE_CANDLES_GROUP", default_value = "tickpipe-candles")]
    group: String,
    /// Most trades per batch.
    #[arg(long, env = "TICKPIPE_CANDLES_BATCH_MAX", default_value_t = 10_000)]
    batch_max: usize,
    /// Longest wait for a batch to fill, in ms.
    #[arg(long, env = "TICKPIPE_CANDLES_BATCH_WAIT_MS", default_value_t = 200)]
    batch_wait_ms: u64,
    /// Shortest time between two snapshots of the aggregation state, in ms
    /// (0: after every batch). A crash replays the trades since the last one.
    #[arg(long, env = "TICKPIPE_CANDLES_STATE_INTERVAL_MS", default_value_t = 5000)]
    state_interval_ms: u64,
    /// How long a silent active instance keeps the lease before a standby
    /// takes over, in ms (the lease group's session timeout).
    #[arg(long, env = "TICKPIPE_CANDLES_LEASE_SESSION_TIMEOUT_MS", default_value_t = 10_000)]
    lease_session_timeout_ms: u64,
    /// Static membership of the lease group (`group.instance.id`): an instance
    /// restarted with the same id takes its lease back at once. Give each
    /// instance its own.
    #[arg(long, env = "TICKPIPE_CANDLES_INSTANCE_ID")]
    instance_id: Option<String>,
    /// Write candles, dead letters and state in Kafka transactions, one per
    /// state interval: `read_committed` readers then see no candle twice after
    /// a crash, and see candles up to a state interval later.
    #[arg(long, env = "TICKPIPE_CANDLES_TRANSACTIONS", default_value_t = false, action = clap::ArgAction::Set)]
    transactions: bool,
    /// Address of /metrics, /healthz and /readyz ("off" to disable).
    #[arg(long, env = "TICKPIPE_CANDLES_METRICS_ADDR", default_value = "127.0.0.1:9103")]
    metrics_addr: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (shutdown, args) = ops::start::<Args>()?;
    args.validation.apply();
    let metrics_addr = ops::metrics_addr(&args.metrics_addr).map_err(anyhow::Error::msg)?;
    let config = ServiceConfig {
        brokers: args.kafka.brokers,
        topic_prefix: args.kafka.topic_prefix,
        candles: CandleConfig {
            intervals: args.intervals,
            allowed_lateness: args.allowed_lateness_ms * 1000,
            fill_empty: args.fill_empty,
            max_fill: args.max_fill,
        },
        group: args.group,
        batch_max: args.batch_max,
        batch_wait: Duration::from_millis(args.batch_wait_ms),
        state_interval: Duration::from_millis(args.state_interval_ms),
        lease_session_timeout: Duration::from_millis(args.lease_session_timeout_ms),
        instance_id: args.instance_id,
        transactions: args.transactions,
        partitions: args.kafka.partitions,
        replication: args.kafka.replication,
        metrics_addr,
    };
    if !args.rebaseline.is_empty() {
        rebaseline(&config, &args.rebaseline).await?;
    }
    run(config, shutdown).await?;
    Ok(())
}
