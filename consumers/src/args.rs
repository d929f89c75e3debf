//! Flags the sink binaries share, flattened into each one's `Args`.

use tickpipe_schemas::registry::RegistryConfig;
use tickpipe_schemas::Topic;

/// The Schema Registry of Confluent-framed records.
#[derive(Debug, Clone, clap::Args)]
pub struct RegistryArgs {
    /// Schema Registry URL; Confluent-framed records are decoded with the
    /// writer schemas it holds. Without it only single-object encoding (and
    /// ids already known) decode.
    #[arg(long, env = "TICKPIPE_SCHEMA_REGISTRY_URL")]
    pub schema_registry_url: Option<String>,
    /// Basic-auth user of the Schema Registry (Confluent Cloud API key).
    #[arg(long, env = "TICKPIPE_SCHEMA_REGISTRY_USERNAME")]
    pub schema_registry_username: Option<String>,
    /// Basic-auth password of the Schema Registry; never logged.
    #[arg(long, env = "TICKPIPE_SCHEMA_REGISTRY_PASSWORD", hide_env_values = true)]
    pub schema_registry_password: Option<String>,
}

impl RegistryArgs {
    pub fn config(self) -> Option<RegistryConfig> {
        self.schema_registry_url.map(|url| RegistryConfig {
            username: self.schema_registry_username,
            password: self.schema_registry_password,
            ..RegistryConfig::new(url)
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

/// Entity topics by their names without prefix, or which name is unknown.
pub fn entity_topics(names: &[String]) -> Result<Vec<Topic>, String> {
    names
        .iter()
        .map(|t| Topic::from_base_name(t.trim()).ok_or_else(|| format!("--topics: no entity topic {t:?}")))
        .collect()
}
