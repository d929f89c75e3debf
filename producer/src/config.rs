//! The producer's configuration: every setting is a flag with an environment
//! variable, and a key in the TOML file given by `--config`
//! (`tickpipe_ops::config`: the variable without `TICKPIPE_`, split into
//! tables). Built-in defaults, then the file, then environment variables,
//! then flags. Each source's section is its own (`sources::SourceConfig`);
//! this file holds only what the whole producer shares.

use tickpipe_ops::{KafkaArgs, RegistryArgs};

use crate::sources::Sources;

/// How the producer publishes: the `[producer]` section.
#[derive(Debug, Clone, clap::Args)]
pub struct ProducerConfig {
    /// Address of /metrics, /healthz and /readyz ("off" to disable).
    #[arg(long, env = "TICKPIPE_PRODUCER_METRICS_ADDR", default_value = "127.0.0.1:9101")]
    pub metrics_addr: String,
    /// Create the entity topics at start when they are missing (false where
    /// topics are managed elsewhere, e.g. by infrastructure code).
    #[arg(long, env = "TICKPIPE_PRODUCER_CREATE_TOPICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub create_topics: bool,
    /// Most records in flight to Kafka (enqueued, not acknowledged); sources
    /// wait beyond it.
    #[arg(long, env = "TICKPIPE_PRODUCER_MAX_IN_FLIGHT", default_value_t = 50_000)]
    pub max_in_flight: usize,
    /// How long librdkafka retries a record before reporting failure, in ms
    /// (`message.timeout.ms`). 0 = forever: nothing is given up while the
    /// broker is away, and memory stays bounded by --max-in-flight.
    #[arg(long, env = "TICKPIPE_PRODUCER_MESSAGE_TIMEOUT_MS", default_value_t = 0)]
    pub message_timeout_ms: u64,
    /// `compression.type` of the records.
    #[arg(long, env = "TICKPIPE_PRODUCER_COMPRESSION", default_value = "lz4")]
    pub compression: String,
    /// `linger.ms`: how long a batch waits for more records.
    #[arg(long, env = "TICKPIPE_PRODUCER_LINGER_MS", default_value_t = 5)]
    pub linger_ms: u64,
}

/// The whole configuration.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub producer: ProducerConfig,
    #[command(flatten)]
    pub schema_registry: RegistryArgs,
    #[command(flatten)]
    pub sources: Sources,
}

impl Default for Config {
    fn default() -> Self {
        tickpipe_ops::config::defaults()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_the_flags_defaults_without_the_environment() {
        let c = Config::default();
        assert_eq!(c.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(c.kafka.partitions, 3);
        assert_eq!(c.producer.max_in_flight, 50_000);
        assert_eq!(c.sources.names, ["auto"]);
        assert_eq!(c.sources.binance.symbols, ["BTCUSDT", "AAVEUSDT", "STXUSDT", "ARBUSDT"]);
        assert_eq!(c.sources.binance.rollover_secs, 23 * 3600);
        assert_eq!(c.sources.replay.speed, 0.0);
        assert!(c.sources.coincap.api_key.is_none());
    }

    #[test]
    fn unknown_sources_are_refused_with_the_list() {
        let mut c = Config::default();
        c.sources.names = vec!["nope".into()];
        let e = c.sources.build().err().expect("refused").to_string();
        assert!(
            e.contains("nope") && e.contains("binance, coincap, replay, simulator"),
            "{e}"
        );
    }

    #[test]
    fn stream_names_are_lowercase() {
        let mut c = Config::default();
        c.sources.binance.symbols = vec!["BTCUSDT".into(), "ArbUsdt".into()];
        c.sources.binance.streams = vec!["trade".into(), "kline_1m".into()];
        c.sources.binance.ws_url = "ws://127.0.0.1:1/".into();
        assert_eq!(
            c.sources.binance.stream_url(),
            "ws://127.0.0.1:1/stream?streams=btcusdt@trade/btcusdt@kline_1m/arbusdt@trade/arbusdt@kline_1m"
        );
    }
}
