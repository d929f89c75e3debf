//! Embedded schema migrations, applied at start, idempotently, by whichever
//! instance gets the advisory lock first.

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

/// Every migration, in order. A released migration never changes; add a new one.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "init", include_str!("../../migrations/0001_init.sql")),
    (
        2,
        "dead_letter_identity",
        include_str!("../../migrations/0002_dead_letter_identity.sql"),
    ),
];

/// Advisory lock key held while migrating ("tickpipe" in ASCII).
const LOCK_KEY: i64 = 0x7469_636b_7069_7065;

/// Why the schema could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "the database user lacks the rights to create the sink's tables ({detail}); \
         grant it CREATE on the database and schema, or run the migrations as an owner"
    )]
    Rights { detail: String },
    #[error("migration {version} ({name}) failed: {source}")]
    Failed {
        version: i32,
        name: &'static str,
        source: tokio_postgres::Error,
    },
    #[error("preparing the migrations table failed: {0}")]
    Setup(tokio_postgres::Error),
}

fn classify(version: i32, name: &'static str, e: tokio_postgres::Error) -> MigrateError {
    match e.code() {
        Some(c) if *c == SqlState::INSUFFICIENT_PRIVILEGE => MigrateError::Rights {
            detail: e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_default(),
        },
        _ => MigrateError::Failed {
            version,
            name,
            source: e,
        },
    }
}

/// Applies the migrations not applied yet; returns how many it applied.
pub async fn migrate(client: &mut Client) -> Result<usize, MigrateError> {
    let setup = |e: tokio_postgres::Error| match e.code() {
        Some(c) if *c == SqlState::INSUFFICIENT_PRIVILEGE => classify(0, "setup", e),
        _ => MigrateError::Setup(e),
    };
    let tx = client.transaction().await.map_err(setup)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await
        .map_err(setup)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS tickpipe_migrations (
             version integer PRIMARY KEY,
             name text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .map_err(setup)?;
    let done: Vec<i32> = tx
        .query("SELECT version FROM tickpipe_migrations", &[])
        .await
        .map_err(setup)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut applied = 0;
    for (version, name, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        tx.batch_execute(sql).await.map_err(|e| classify(*version, name, e))?;
        tx.execute(
            "INSERT INTO tickpipe_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await
        .map_err(|e| classify(*version, name, e))?;
        applied += 1;
    }
    tx.commit().await.map_err(setup)?;
    Ok(applied)
}
