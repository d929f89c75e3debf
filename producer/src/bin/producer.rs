//! `producer`: parses flags, environment and the config file, then calls the
//! library's `run` (or `run_backfill`). Everything else is in the library.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use tickpipe_producer::config::{Config, RegistrySection, Secret};
use tickpipe_producer::metrics::Metrics;
use tickpipe_producer::service;
use tickpipe_producer::sources::binance::backfill::{parse_span, BackfillJob};

/// Records are built on the reader's thread and freed on the publisher's;
/// mimalloc handles that hand-over with less work than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Publishes Binance and CoinCap market data (live, replayed or simulated) to
/// per-entity Kafka topics as Avro.
///
/// Settings come from built-in defaults, then the TOML file given by --config,
/// then environment variables, then flags.
#[derive(Debug, Parser)]
#[command(version, after_help = tickpipe_kafka::PROPERTIES_HELP)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Args)]
struct Common {
    /// TOML configuration file (sections kafka, schema_registry, binance, coincap, replay, simulator,
    /// librdkafka).
    #[arg(long, env = "TICKPIPE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers [default: 127.0.0.1:9092].
    #[arg(long, env = "TICKPIPE_KAFKA_BROKERS", global = true)]
    brokers: Option<String>,
    /// Prefix of every topic name, so that several pipelines share a cluster.
    #[arg(long, env = "TICKPIPE_TOPIC_PREFIX", global = true)]
    topic_prefix: Option<String>,
    /// Partitions of the topics created at start [default: 3].
    #[arg(long, env = "TICKPIPE_TOPIC_PARTITIONS", global = true)]
    partitions: Option<i32>,
    /// Replication factor of the topics created at start; -1 = the cluster's
    /// `default.replication.factor` (Kafka 2.4 and later; give a number for
    /// older clusters) [default: -1].
    #[arg(
        long,
        env = "TICKPIPE_TOPIC_REPLICATION",
        global = true,
        allow_negative_numbers = true
    )]
    replication: Option<i32>,
    /// How far ahead of this machine's clock an event time may be, in ms; a
    /// record further ahead is a dead letter (a wrong clock or unit) [default: 10000].
    #[arg(long, env = "TICKPIPE_MAX_AHEAD_MS", global = true)]
    max_ahead_ms: Option<u64>,
    /// Most records in flight to Kafka; sources wait beyond it [default: 50000].
    #[arg(long, env = "TICKPIPE_PRODUCER_MAX_IN_FLIGHT", global = true)]
    max_in_flight: Option<usize>,
    /// How long librdkafka retries a record, in ms; 0 = forever [default: 0].
    #[arg(long, env = "TICKPIPE_PRODUCER_MESSAGE_TIMEOUT_MS", global = true)]
    message_timeout_ms: Option<u64>,
    /// Address of /metrics, /healthz and /readyz ("off" to disable) [default: 127.0.0.1:9101].
    #[arg(long, env = "TICKPIPE_PRODUCER_METRICS_ADDR", global = true)]
    metrics_addr: Option<String>,
    /// Confluent Schema Registry URL; without it records use Avro single-object encoding.
    #[arg(long, env = "TICKPIPE_SCHEMA_REGISTRY_URL", global = true)]
    schema_registry_url: Option<String>,
    /// Schema Registry basic-auth user.
    #[arg(long, env = "TICKPIPE_SCHEMA_REGISTRY_USERNAME", global = true)]
    schema_registry_username: Option<String>,
    /// Schema Registry basic-auth password (never printed).
    #[arg(
        long,
        env = "TICKPIPE_SCHEMA_REGISTRY_PASSWORD",
        global = true,
        hide_env_values = true
    )]
    schema_registry_password: Option<String>,
    /// Binance REST base URL [default: https://api.binance.com].
    #[arg(long, env = "TICKPIPE_BINANCE_REST_URL", global = true)]
    binance_rest_url: Option<String>,
    /// Binance symbols, comma-separated [default: BTCUSDT,AAVEUSDT,STXUSDT,ARBUSDT].
    #[arg(long, env = "TICKPIPE_BINANCE_SYMBOLS", value_delimiter = ',', global = true)]
    symbols: Option<Vec<String>>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the live, simulated or replayed sources (the default command).
    Run(RunArgs),
    /// Publish Binance klines history over REST, resumably.
    Backfill(BackfillArgs),
    /// Publish recorded files (data.binance.vision CSVs, WebSocket captures).
    Replay(ReplayArgs),
}

#[derive(Debug, Args, Default)]
struct RunArgs {
    /// Sources, comma-separated: auto, binance, coincap, replay, simulator [default: auto:
    /// live sources when Binance answers, otherwise the simulator].
    #[arg(long, env = "TICKPIPE_PRODUCER_SOURCES", value_delimiter = ',')]
    sources: Option<Vec<String>>,
    /// Binance WebSocket base URL [default: wss://data-stream.binance.vision].
    #[arg(long, env = "TICKPIPE_BINANCE_WS_URL")]
    binance_ws_url: Option<String>,
    /// Binance streams per symbol: trade, aggTrade, kline_<interval> [default: trade,kline_1m].
    #[arg(long, env = "TICKPIPE_BINANCE_STREAMS", value_delimiter = ',')]
    streams: Option<Vec<String>>,
    /// Seconds of silence after which a Binance socket is reopened [default: 60].
    #[arg(long, env = "TICKPIPE_BINANCE_WATCHDOG_SECS")]
    watchdog_secs: Option<u64>,
    /// Seconds after which a Binance connection is replaced [default: 82800].
    #[arg(long, env = "TICKPIPE_BINANCE_ROLLOVER_SECS")]
    rollover_secs: Option<u64>,
    /// CoinCap v3 REST base URL [default: https://rest.coincap.io/v3].
    #[arg(long, env = "TICKPIPE_COINCAP_REST_URL")]
    coincap_rest_url: Option<String>,
    /// CoinCap WebSocket base URL [default: wss://wss.coincap.io].
    #[arg(long, env = "TICKPIPE_COINCAP_WS_URL")]
    coincap_ws_url: Option<String>,
    /// CoinCap API key (never printed).
    #[arg(long, env = "TICKPIPE_COINCAP_API_KEY", hide_env_values = true)]
    coincap_api_key: Option<String>,
    /// Simulator seed [default: 42].
    #[arg(long, env = "TICKPIPE_SIMULATOR_SEED")]
    simulator_seed: Option<u64>,
    /// Simulated trades per second, 0 = as fast as possible [default: 50].
    #[arg(long, env = "TICKPIPE_SIMULATOR_RATE")]
    simulator_rate: Option<f64>,
    /// Stop the simulator after this many trades.
    #[arg(long, env = "TICKPIPE_SIMULATOR_MAX_TRADES")]
    simulator_max_trades: Option<u64>,
}

#[derive(Debug, Args)]
struct BackfillArgs {
    /// Kline intervals, comma-separated (1m, 1h, 1d, ...).
    #[arg(
        long,
        env = "TICKPIPE_BACKFILL_INTERVALS",
        value_delimiter = ',',
        default_value = "1d"
    )]
    interval: Vec<String>,
    /// How far back: <n>m, <n>h, <n>d, <n>w or <n>y.
    #[arg(long, env = "TICKPIPE_BACKFILL_SINCE", default_value = "5y")]
    since: String,
    /// Run again after this long (e.g. 24h) until stopped.
    #[arg(long, env = "TICKPIPE_BACKFILL_EVERY")]
    every: Option<String>,
    /// Where the resume checkpoints are kept.
    #[arg(long, env = "TICKPIPE_BACKFILL_STATE_DIR", default_value = ".local/backfill")]
    state_dir: PathBuf,
}

#[derive(Debug, Args)]
struct ReplayArgs {
    /// Files to publish, in order (.csv or .gz).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Recorded pace times this factor, or "max" for as fast as possible.
    #[arg(long, env = "TICKPIPE_REPLAY_SPEED", default_value = "max")]
    speed: String,
    /// Venue carried in the records.
    #[arg(long, env = "TICKPIPE_REPLAY_VENUE")]
    venue: Option<String>,
    /// Symbol of CSV files whose name does not start with it.
    #[arg(long, env = "TICKPIPE_REPLAY_SYMBOL")]
    symbol: Option<String>,
    /// Interval of kline CSV files whose name does not say it.
    #[arg(long, env = "TICKPIPE_REPLAY_INTERVAL")]
    interval: Option<String>,
}

fn set<T>(slot: &mut T, v: Option<T>) {
    if let Some(v) = v {
        *slot = v;
    }
}

fn layered(c: &Common) -> anyhow::Result<Config> {
    let mut config = match &c.config {
        Some(p) => Config::from_file(p).map_err(anyhow::Error::msg)?,
        None => Config::default(),
    };
    let properties =
        tickpipe_ops::config::librdkafka_table(&config.librdkafka.0).map_err(|e| anyhow::anyhow!("config: {e}"))?;
    tickpipe_ops::config::set_librdkafka_properties(properties);
    let k = &mut config.kafka;
    set(&mut k.brokers, c.brokers.clone());
    set(&mut k.topic_prefix, c.topic_prefix.clone());
    set(&mut k.partitions, c.partitions);
    set(&mut k.replication, c.replication);
    set(&mut k.max_in_flight, c.max_in_flight);
    set(&mut k.message_timeout_ms, c.message_timeout_ms);
    set(&mut config.metrics_addr, c.metrics_addr.clone());
    if let Some(url) = &c.schema_registry_url {
        config.schema_registry = Some(RegistrySection {
            url: url.clone(),
            username: c.schema_registry_username.clone(),
            password: c.schema_registry_password.clone().map(Secret::new),
        });
    }
    set(&mut config.binance.rest_url, c.binance_rest_url.clone());
    set(&mut config.binance.symbols, c.symbols.clone());
    Ok(config)
}

fn apply_run(config: &mut Config, r: RunArgs) {
    set(&mut config.sources, r.sources);
    let b = &mut config.binance;
    set(&mut b.ws_url, r.binance_ws_url);
    set(&mut b.streams, r.streams);
    set(&mut b.watchdog_secs, r.watchdog_secs);
    set(&mut b.rollover_secs, r.rollover_secs);
    let cc = &mut config.coincap;
    set(&mut cc.rest_url, r.coincap_rest_url);
    set(&mut cc.ws_url, r.coincap_ws_url);
    if let Some(k) = r.coincap_api_key {
        cc.api_key = Some(Secret::new(k));
    }
    let s = &mut config.simulator;
    set(&mut s.seed, r.simulator_seed);
    set(&mut s.rate, r.simulator_rate);
    if r.simulator_max_trades.is_some() {
        s.max_trades = r.simulator_max_trades;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let shutdown = tickpipe_ops::shutdown_signal()?;
    tickpipe_ops::init_logging();
    let cli = Cli::parse();
    if let Some(ms) = cli.common.max_ahead_ms {
        tickpipe_schemas::validate::set_max_ahead(i64::try_from(ms.saturating_mul(1000)).unwrap_or(i64::MAX));
    }
    let mut config = layered(&cli.common)?;
    let metrics = Metrics::new();
    match cli.command.unwrap_or(Command::Run(RunArgs::default())) {
        Command::Run(r) => {
            apply_run(&mut config, r);
            service::run(config, metrics, shutdown).await?;
        }
        Command::Replay(r) => {
            config.sources = vec!["replay".into()];
            config.replay.files = r.files;
            config.replay.speed = match r.speed.as_str() {
                "max" => 0.0,
                s => s
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--speed {s:?}: a factor such as 1 or 10, or max"))?,
            };
            set(&mut config.replay.venue, r.venue);
            if r.symbol.is_some() {
                config.replay.symbol = r.symbol;
            }
            if r.interval.is_some() {
                config.replay.interval = r.interval;
            }
            service::run(config, metrics, shutdown).await?;
        }
        Command::Backfill(b) => {
            let job = BackfillJob {
                symbols: config.binance.symbols.clone(),
                intervals: b.interval,
                since: parse_span(&b.since).map_err(|e| anyhow::anyhow!("--since {e}"))?,
                state_dir: b.state_dir,
                every: b
                    .every
                    .as_deref()
                    .map(parse_span)
                    .transpose()
                    .map_err(|e| anyhow::anyhow!("--every {e}"))?,
            };
            let n = service::run_backfill(config, job, metrics, shutdown).await?;
            tracing::info!(candles = n, "backfill finished");
        }
    }
    Ok(())
}
