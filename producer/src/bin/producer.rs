//! `producer`: parses flags, environment and the config file, then calls the
//! library's `run` (or `run_backfill`). Everything else is in the library.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use tickpipe_ops::config::ConfigArg;
use tickpipe_ops::ValidationArgs;
use tickpipe_producer::config::Config;
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
/// Settings come from built-in defaults, then the TOML file given by --config
/// (a flag's key there is its environment variable without TICKPIPE_, e.g.
/// `[binance] symbols = ["BTCUSDT"]`), then environment variables, then flags.
/// Every flag may be given before or after the command.
#[derive(Debug, Parser)]
#[command(version, after_help = tickpipe_kafka::PROPERTIES_HELP)]
struct Cli {
    #[command(flatten)]
    config_file: ConfigArg,
    #[command(flatten)]
    validation: ValidationArgs,
    #[command(flatten)]
    config: Config,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the live, simulated or replayed sources (the default command).
    Run,
    /// Publish Binance klines history over REST, resumably.
    Backfill(BackfillArgs),
    /// Publish recorded files (data.binance.vision CSVs, WebSocket captures):
    /// `run --sources replay` with these files.
    Replay(ReplayArgs),
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
    /// Files to publish, in order (.csv or .gz); instead of --replay-files.
    files: Vec<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (shutdown, cli) = tickpipe_ops::start::<Cli>()?;
    cli.validation.apply();
    let mut config = cli.config;
    let metrics = Metrics::new();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            service::run(config, metrics, shutdown).await?;
        }
        Command::Replay(r) => {
            config.sources.names = vec!["replay".into()];
            if !r.files.is_empty() {
                config.sources.replay.files = r.files;
            }
            service::run(config, metrics, shutdown).await?;
        }
        Command::Backfill(b) => {
            let job = BackfillJob {
                symbols: config.sources.binance.symbols.clone(),
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
