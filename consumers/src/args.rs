//! Flags the sink binaries share, flattened into each one's `Args` (those
//! every binary takes are in `tickpipe_ops::args`).

use tickpipe_schemas::Topic;

/// Entity topics by their names without prefix, or which name is unknown.
pub fn entity_topics(names: &[String]) -> Result<Vec<Topic>, String> {
    names
        .iter()
        .map(|t| Topic::from_base_name(t.trim()).ok_or_else(|| format!("--topics: no entity topic {t:?}")))
        .collect()
}

/// Declares the flags every sink binary takes, their environment variables
/// named after the binary (`TICKPIPE_<SINK>_GROUP`, ...), with its defaults
/// (a [`crate::sink::SinkDefaults`]);
/// `settings` turns them into the runtime's [`crate::sink::SinkSettings`].
#[macro_export]
macro_rules! sink_args {
    ($name:ident, env = $env:literal, defaults = $defaults:expr) => {
        /// The flags every sink takes.
        #[derive(Debug, Clone, clap::Args)]
        pub struct $name {
            #[command(flatten)]
            pub config: $crate::ops::config::ConfigArg,
            #[command(flatten)]
            pub kafka: $crate::ops::KafkaArgs,
            #[command(flatten)]
            pub validation: $crate::ops::ValidationArgs,
            /// Entity topics to consume (names without prefix), comma-separated.
            #[arg(
                                long,
                                env = concat!("TICKPIPE_", $env, "_TOPICS"),
                                value_delimiter = ',',
                                default_value = "assets,rates,exchanges,markets,prices,trades,candles,dead-letters"
                            )]
            pub topics: Vec<String>,
            /// Consumer group; where this sink's positions are kept.
            #[arg(long, env = concat!("TICKPIPE_", $env, "_GROUP"), default_value = $defaults.group)]
            pub group: String,
            /// Most records per batch.
            #[arg(long, env = concat!("TICKPIPE_", $env, "_BATCH_MAX"), default_value_t = $defaults.batch_max)]
            pub batch_max: usize,
            /// Longest wait for a batch to fill, in ms.
            #[arg(long, env = concat!("TICKPIPE_", $env, "_BATCH_WAIT_MS"), default_value_t = $defaults.batch_wait_ms)]
            pub batch_wait_ms: u64,
            /// Longest pause between retries of a failed write, in ms.
            #[arg(long, env = concat!("TICKPIPE_", $env, "_MAX_BACKOFF_MS"), default_value_t = $defaults.max_backoff_ms)]
            pub max_backoff_ms: u64,
            /// Milliseconds the group waits for a silent member before moving its partitions.
            #[arg(long, env = concat!("TICKPIPE_", $env, "_SESSION_TIMEOUT_MS"), default_value_t = 10_000)]
            pub session_timeout_ms: u64,
            /// Static group membership id (e.g. the pod name): a restarted instance
            /// with the same id gets its partitions back without a rebalance.
            #[arg(long, env = concat!("TICKPIPE_", $env, "_INSTANCE_ID"))]
            pub instance_id: Option<String>,
            #[command(flatten)]
            pub registry: $crate::ops::RegistryArgs,
            /// Address of /metrics, /healthz and /readyz ("off" to disable).
            #[arg(long, env = concat!("TICKPIPE_", $env, "_METRICS_ADDR"), default_value = $defaults.metrics_addr)]
            pub metrics_addr: String,
        }

        impl $name {
            /// The runtime's settings; sets the process-wide validation bound.
            pub fn settings(self) -> Result<$crate::sink::SinkSettings, String> {
                self.validation.apply();
                Ok($crate::sink::SinkSettings {
                    brokers: self.kafka.brokers,
                    topic_prefix: self.kafka.topic_prefix,
                    topics: $crate::args::entity_topics(&self.topics)?,
                    group: self.group,
                    batch_max: self.batch_max,
                    batch_wait: std::time::Duration::from_millis(self.batch_wait_ms),
                    max_backoff: std::time::Duration::from_millis(self.max_backoff_ms),
                    session_timeout: std::time::Duration::from_millis(self.session_timeout_ms),
                    instance_id: self.instance_id,
                    partitions: self.kafka.partitions,
                    replication: self.kafka.replication,
                    metrics_addr: $crate::ops::metrics_addr(&self.metrics_addr)?,
                    registry: self.registry.config(),
                })
            }
        }
    };
}
