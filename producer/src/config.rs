//! The producer's configuration, in layers: built-in defaults, then a TOML file
//! (`--config`), then environment variables and flags (applied by the binary).
//! Unknown keys are errors, and secrets never print.

use std::fmt;
use std::path::Path;

use serde::Deserialize;

use crate::sources::binance::BinanceConfig;
use crate::sources::coincap::CoinCapConfig;
use crate::sources::replay::ReplayConfig;
use crate::sources::simulator::SimulatorConfig;

/// A value that must not appear in logs: `Debug` and `Display` print `***`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The `[librdkafka]` table: librdkafka properties for every Kafka client of
/// the process. The binary applies them at start
/// (`tickpipe_ops::config::set_librdkafka_properties`), under the
/// `TICKPIPE_LIBRDKAFKA_*` variables; `service::run` does not read them.
/// `Debug` shows the names only (a value may be a password).
#[derive(Clone, Default, Deserialize, PartialEq)]
#[serde(transparent)]
pub struct LibrdkafkaTable(pub toml::Table);

impl fmt::Debug for LibrdkafkaTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

/// The `[kafka]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers.
    pub brokers: String,
    /// Prefix of every topic name.
    pub topic_prefix: String,
    /// Create the entity topics at start when they are missing (off where
    /// topics are managed elsewhere, e.g. by infrastructure code).
    pub create_topics: bool,
    /// Partitions of topics created at start.
    pub partitions: i32,
    /// Replication factor of topics created at start; -1 = the cluster's
    /// `default.replication.factor`.
    pub replication: i32,
    /// Most records in flight (enqueued, not acknowledged); sources wait beyond.
    pub max_in_flight: usize,
    /// librdkafka's `message.timeout.ms`: how long it retries a record before
    /// reporting failure. 0 = forever (nothing is given up while the broker is
    /// away; memory stays bounded by `max_in_flight`).
    pub message_timeout_ms: u64,
    /// `compression.type`.
    pub compression: String,
    /// `linger.ms`.
    pub linger_ms: u64,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            topic_prefix: String::new(),
            create_topics: true,
            partitions: 3,
            replication: -1,
            max_in_flight: 50_000,
            message_timeout_ms: 0,
            compression: "lz4".into(),
            linger_ms: 5,
        }
    }
}

/// The `[schema_registry]` section (absent: single-object encoding).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrySection {
    pub url: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Which sources run: names from the source list, or `auto` (live Binance,
    /// and CoinCap when a key is set, if Binance answers; else the simulator).
    pub sources: Vec<String>,
    pub kafka: KafkaConfig,
    pub schema_registry: Option<RegistrySection>,
    /// Address of /metrics, /healthz, /readyz; `off` for none.
    pub metrics_addr: String,
    pub binance: BinanceConfig,
    pub coincap: CoinCapConfig,
    pub replay: ReplayConfig,
    pub simulator: SimulatorConfig,
    pub librdkafka: LibrdkafkaTable,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            sources: vec!["auto".into()],
            kafka: KafkaConfig::default(),
            schema_registry: None,
            metrics_addr: "127.0.0.1:9101".into(),
            binance: BinanceConfig::default(),
            coincap: CoinCapConfig::default(),
            replay: ReplayConfig::default(),
            simulator: SimulatorConfig::default(),
            librdkafka: LibrdkafkaTable::default(),
        }
    }
}

impl Config {
    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("config {}: {e}", path.display()))?;
        Self::from_toml(&text).map_err(|e| format!("config {}: {e}", path.display()))
    }

    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Turns the `sources` list into each section's `enabled` flag. `auto` is
    /// resolved by the service (it needs the network) before this is called.
    pub fn enable_sources(&mut self) -> Result<(), String> {
        for s in &self.sources {
            match s.trim() {
                "binance" => self.binance.enabled = true,
                "coincap" => self.coincap.enabled = true,
                "simulator" => self.simulator.enabled = true,
                "replay" => {
                    if self.replay.files.is_empty() {
                        return Err("the replay source needs files (replay.files or --replay-file)".into());
                    }
                }
                "auto" => {}
                other => {
                    return Err(format!(
                        "unknown source {other:?}: choose from auto, binance, coincap, replay, simulator"
                    ))
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_overrides_defaults_and_unknown_keys_fail() {
        let c = Config::from_toml(
            r#"
            sources = ["binance", "coincap"]
            [kafka]
            brokers = "k1:9092,k2:9092"
            [binance]
            symbols = ["ETHUSDT"]
            streams = ["aggTrade", "kline_1h"]
            [coincap]
            api_key = "s3cret"
            "#,
        )
        .unwrap();
        assert_eq!(c.kafka.brokers, "k1:9092,k2:9092");
        assert_eq!(c.kafka.partitions, 3);
        assert_eq!(c.binance.symbols, vec!["ETHUSDT"]);
        assert!(!format!("{c:?}").contains("s3cret"));
        assert_eq!(c.coincap.api_key.as_ref().map(Secret::expose), Some("s3cret"));
        assert!(Config::from_toml("[kafka]\nbrokerz = \"x\"")
            .unwrap_err()
            .contains("brokerz"));
        let mut c = Config::from_toml("sources = [\"nope\"]").unwrap();
        assert!(c.enable_sources().unwrap_err().contains("nope"));
    }

    #[test]
    fn stream_names_are_lowercase() {
        let c = Config::from_toml("[binance]\nsymbols = [\"BTCUSDT\", \"ArbUsdt\"]\nstreams = [\"trade\", \"kline_1m\"]\nws_url = \"ws://127.0.0.1:1/\"").unwrap();
        assert_eq!(
            c.binance.stream_url(),
            "ws://127.0.0.1:1/stream?streams=btcusdt@trade/btcusdt@kline_1m/arbusdt@trade/arbusdt@kline_1m"
        );
    }
}
