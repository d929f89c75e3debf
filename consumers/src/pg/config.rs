//! `postgres-sink`'s configuration and its connection to PostgreSQL.

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};

use super::migrate::MigrateError;
use super::tls;
use crate::sink::{SinkError, SinkSettings};

/// Everything the sink needs.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// What every sink is configured with; its group is also the key of the
    /// stored offsets.
    pub sink: SinkSettings,
    /// libpq-style connection string or URL.
    pub postgres_url: String,
    /// Connections in the pool.
    pub pool_size: usize,
}

/// Why PostgreSQL could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("bad PostgreSQL connection settings: {0}")]
    Url(String),
    #[error("cannot reach PostgreSQL ({target}): {detail}")]
    Unreachable { target: String, detail: String },
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    #[error("re-baselining {topic}[{partition}]: {source}")]
    Rebaseline {
        topic: String,
        partition: i32,
        source: tokio_postgres::Error,
    },
}

impl From<PgError> for SinkError {
    fn from(e: PgError) -> Self {
        crate::sink::target(e)
    }
}

/// Opens the pool and checks that the database answers.
pub async fn connect(config: &SinkConfig) -> Result<Pool, PgError> {
    let (conn, tls) = tls::split(&config.postgres_url).map_err(|e| PgError::Url(e.to_string()))?;
    let pg: tokio_postgres::Config = conn
        .parse()
        .map_err(|e: tokio_postgres::Error| PgError::Url(e.to_string()))?;
    let target = describe(&pg);
    let connector = tls::connector(&tls).map_err(|e| PgError::Url(e.to_string()))?;
    let manager = Manager::from_config(
        pg,
        connector,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager)
        .max_size(config.pool_size.max(1))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| PgError::Url(e.to_string()))?;
    let client = pool.get().await.map_err(|e| PgError::Unreachable {
        target: target.clone(),
        detail: with_causes(&e),
    })?;
    drop(client);
    Ok(pool)
}

/// An error and its causes ("error performing TLS handshake: certificate
/// verify failed"): the pool's own message names none of them.
pub(crate) fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        cause = c.source();
    }
    text
}

/// Host, port, database and user of a connection, never the password.
fn describe(pg: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = pg
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    format!(
        "host {} port {:?} database {} user {}",
        hosts.join(","),
        pg.get_ports(),
        pg.get_dbname().unwrap_or("(default)"),
        pg.get_user().unwrap_or("(default)")
    )
}
