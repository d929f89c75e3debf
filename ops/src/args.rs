//! The flags more than one binary takes, each declared once: the Kafka
//! cluster and topics, the Schema Registry, the event-time bound, the
//! operations address. A flag's environment variable is `TICKPIPE_` and its
//! section and name; its key in a configuration file is that variable without
//! `TICKPIPE_` (`config`).

use std::fmt;
use std::net::SocketAddr;

use tickpipe_schemas::registry::RegistryConfig;

/// A value that must not appear in logs: `Debug` and `Display` print `***`.
#[derive(Clone, PartialEq, Eq)]
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

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
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

/// The Kafka cluster and the topics every binary uses.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "TICKPIPE_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Prefix of every topic name, so that several pipelines share a cluster.
    #[arg(long, env = "TICKPIPE_TOPIC_PREFIX", default_value = "")]
    pub topic_prefix: String,
    /// Partitions of the topics this service creates when they are missing.
    #[arg(long, env = "TICKPIPE_TOPIC_PARTITIONS", default_value_t = 3)]
    pub partitions: i32,
    /// Replication factor of the topics this service creates when they are
    /// missing; -1 = the cluster's `default.replication.factor` (Kafka 2.4 and
    /// later; give a number for older clusters).
    #[arg(long, env = "TICKPIPE_TOPIC_REPLICATION", default_value_t = -1, allow_negative_numbers = true)]
    pub replication: i32,
}

/// The Schema Registry: where the producer registers its schemas and the
/// consumers find the writer schemas of Confluent-framed records.
#[derive(Debug, Clone, clap::Args)]
pub struct RegistryArgs {
    /// Schema Registry URL. Without it the producer writes Avro single-object
    /// encoding, and the consumers decode only that (and ids already known).
    #[arg(long, env = "TICKPIPE_SCHEMA_REGISTRY_URL")]
    pub schema_registry_url: Option<String>,
    /// Basic-auth user of the Schema Registry (Confluent Cloud API key).
    #[arg(long, env = "TICKPIPE_SCHEMA_REGISTRY_USERNAME")]
    pub schema_registry_username: Option<String>,
    /// Basic-auth password of the Schema Registry; never printed.
    #[arg(long, env = "TICKPIPE_SCHEMA_REGISTRY_PASSWORD", hide_env_values = true)]
    pub schema_registry_password: Option<Secret>,
}

impl RegistryArgs {
    /// The registry's client settings, when a URL is given.
    pub fn config(&self) -> Option<RegistryConfig> {
        self.schema_registry_url.as_ref().map(|url| RegistryConfig {
            username: self.schema_registry_username.clone(),
            password: self.schema_registry_password.as_ref().map(|p| p.expose().to_owned()),
            ..RegistryConfig::new(url.clone())
        })
    }
}

/// How far ahead of this machine's clock a record's event time may be.
#[derive(Debug, Clone, clap::Args)]
pub struct ValidationArgs {
    /// How far ahead of this machine's clock an event time may be (ms); a
    /// record further ahead is a dead letter (a wrong clock or unit must not
    /// close every candle window up to it, nor win newest-wins rows).
    #[arg(long, env = "TICKPIPE_MAX_AHEAD_MS", default_value_t = 10_000)]
    pub max_ahead_ms: u64,
}

impl ValidationArgs {
    /// Sets the process-wide bound (`validate::set_max_ahead`).
    pub fn apply(&self) {
        let micros = i64::try_from(self.max_ahead_ms.saturating_mul(1000)).unwrap_or(i64::MAX);
        tickpipe_schemas::validate::set_max_ahead(micros);
    }
}

/// The `--metrics-addr` value: an address, or `off` for no endpoint.
pub fn metrics_addr(value: &str) -> Result<Option<SocketAddr>, String> {
    match value {
        "off" => Ok(None),
        a => a
            .parse::<SocketAddr>()
            .map(Some)
            .map_err(|e| format!("--metrics-addr {a:?}: {e}")),
    }
}

/// Declares a configuration section of its own: a `clap::Args` struct whose
/// field `name` in section `s` is the flag `--s-name`, the variable
/// `TICKPIPE_S_NAME` and the key `name` under `[s]` in a configuration file,
/// and its `Default` (every flag at its default, the environment unread).
/// Each field gives its type and, in brackets, the rest of its `#[arg]`.
///
/// ```ignore
/// tickpipe_ops::section! {
///     /// The `[simulator]` section.
///     pub struct SimulatorConfig in "simulator" {
///         /// The same seed gives the same market.
///         seed: u64 [default_value_t = 42],
///     }
/// }
/// ```
#[macro_export]
macro_rules! section {
    (
        $(#[$meta:meta])*
        pub struct $name:ident in $section:literal {
            $( $(#[doc = $doc:literal])* $field:ident : $ty:ty [$($arg:tt)*] ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, clap::Args)]
        pub struct $name {
            $(
                $(#[doc = $doc])*
                #[arg(
                    id = concat!($section, "-", stringify!($field)),
                    long = $crate::args::flag_name(concat!($section, "-", stringify!($field))),
                    env = $crate::args::env_name(concat!($section, "-", stringify!($field))),
                    value_name = $crate::args::value_name(stringify!($field)),
                    $($arg)*
                )]
                pub $field: $ty,
            )*
        }

        impl Default for $name {
            fn default() -> Self {
                $crate::config::defaults()
            }
        }
    };
}

/// The flag of a section's field: `binance-ws_url` is `binance-ws-url`.
#[doc(hidden)]
pub fn flag_name(id: &str) -> String {
    id.replace('_', "-")
}

/// The environment variable of a section's field: `binance-ws_url` is
/// `TICKPIPE_BINANCE_WS_URL`.
#[doc(hidden)]
pub fn env_name(id: &str) -> String {
    format!("TICKPIPE_{}", id.replace('-', "_").to_uppercase())
}

/// The placeholder of a field's value in `--help`: `ws_url` is `WS_URL`.
#[doc(hidden)]
pub fn value_name(field: &str) -> String {
    field.to_uppercase()
}
