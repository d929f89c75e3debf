//! Where the services of the local stack are, read from the environment that
//! `deploy/local/stack.sh env` prints (the Makefile exports it for tests).
//!
//! A test that needs a service calls one of these and then connects; if the
//! service is not there the connection fails loudly. Nothing here skips a test.

use std::path::PathBuf;

fn var(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// Kafka bootstrap servers (tansu or a real cluster).
pub fn kafka_brokers() -> String {
    var("TICKPIPE_KAFKA_BROKERS", "127.0.0.1:9092")
}

/// A libpq URL of a database the tests may create databases from.
pub fn postgres_admin_url() -> String {
    var("TICKPIPE_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres")
}

/// The BigQuery emulator's REST endpoint.
pub fn bigquery_rest_url() -> String {
    var("TICKPIPE_BIGQUERY_REST", "http://127.0.0.1:9050")
}

/// The BigQuery emulator's project id.
pub fn bigquery_project() -> String {
    var("TICKPIPE_BIGQUERY_PROJECT", "tickpipe-local")
}

/// The Python interpreter of the project's interop virtualenv.
pub fn interop_python() -> PathBuf {
    PathBuf::from(var("TICKPIPE_INTEROP_PYTHON", "python3"))
}

/// The folder of real recorded market data: `$TICKPIPE_REAL_DATA`, else the
/// first `shared/data/real` found beside this checkout or above it (the
/// workplace keeps it at `../shared/data/real`).
pub fn real_data_dir() -> PathBuf {
    if let Ok(p) = std::env::var("TICKPIPE_REAL_DATA") {
        return PathBuf::from(p);
    }
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .map(|a| a.join("shared/data/real"))
        .find(|p| p.is_dir())
        .unwrap_or_else(|| here.join("../../shared/data/real"))
}

/// A sub-folder of the real data, for the real-data suites. Missing data fails
/// the test when `CI=true`; elsewhere the test says loudly that it did not run
/// and how to point it at the data, and returns `None`.
pub fn real_data(sub: &str) -> Option<PathBuf> {
    let dir = real_data_dir().join(sub);
    if dir.is_dir() {
        return Some(dir);
    }
    let msg = format!(
        "REAL-DATA TEST NOT RUN: {} is missing; set TICKPIPE_REAL_DATA to the folder of recorded market data",
        dir.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}");
    }
    eprintln!("\n*** {msg} ***\n");
    None
}

/// A name no other test run uses, for databases, topics and datasets.
pub fn unique_name(prefix: &str) -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}_{}_{nanos}", std::process::id())
}

/// Creates an empty database on the local PostgreSQL and returns its URL, so
/// each test has its own tables. Fails loudly when PostgreSQL is not there.
pub async fn fresh_database(prefix: &str) -> String {
    let admin = postgres_admin_url();
    let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {admin} is not reachable (make stack-up): {e}"));
    tokio::spawn(conn);
    let name = unique_name(prefix).to_lowercase();
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
    match admin.rfind('/') {
        Some(i) if !admin[..i].ends_with('/') => format!("{}/{name}", &admin[..i]),
        _ => format!("{}/{name}", admin.trim_end_matches('/')),
    }
}
