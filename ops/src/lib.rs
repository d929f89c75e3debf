//! What every tickpipe service shares, so the producer and the consumers behave
//! alike: the operations endpoint (`/metrics` in Prometheus text, `/healthz`
//! while the process answers, `/readyz` 200 while `ready` holds and 503 with
//! `not_ready` otherwise), the flags every binary takes (`args`), the
//! configuration file (`config`),
//! the shutdown signal and the logging set-up.

pub mod args;
pub mod config;
pub mod metrics;

pub use args::{metrics_addr, KafkaArgs, RegistryArgs, Secret, ValidationArgs};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::http::StatusCode;
use axum::routing::get;
use prometheus::Registry;

/// The Prometheus text exposition of a registry.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    let _ = prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut out);
    out
}

/// Binds `addr` and serves the three endpoints in the background.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    ready: Arc<AtomicBool>,
    not_ready: &'static str,
) -> std::io::Result<()> {
    serve_conditions(addr, registry, vec![(ready, not_ready)]).await
}

/// [`serve`] with several readiness conditions: `/readyz` answers 200 while
/// every flag holds, else 503 with the reasons of those that do not.
pub async fn serve_conditions(
    addr: SocketAddr,
    registry: Registry,
    conditions: Vec<(Arc<AtomicBool>, &'static str)>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let conditions = Arc::new(conditions);
    let app = axum::Router::new()
        .route("/metrics", get(move || async move { render(&registry) }))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || async move {
                let failing: Vec<&str> = conditions
                    .iter()
                    .filter(|(ok, _)| !ok.load(Ordering::Relaxed))
                    .map(|(_, why)| *why)
                    .collect();
                if failing.is_empty() {
                    (StatusCode::OK, "ready".to_owned())
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, failing.join("; "))
                }
            }),
        );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(())
}

/// The wall clock in microseconds since the epoch (the unit of every record time).
pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Why a binary could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot install the SIGTERM handler: {0}")]
    Signal(#[from] std::io::Error),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
}

/// What every binary does first, in this order: installs the SIGTERM handler
/// (so that a stop during start-up is clean too), sets up logging, and parses
/// its flags over the configuration file (`config::parse`). Returns the
/// future that resolves on SIGTERM or Ctrl-C, and the flags.
pub fn start<T: clap::Parser>() -> Result<(impl std::future::Future<Output = ()> + Send + 'static, T), StartError> {
    let shutdown = shutdown_signal()?;
    init_logging();
    Ok((shutdown, config::parse()?))
}

/// Installs the SIGTERM handler now (so a SIGTERM during start-up is a clean stop
/// too) and returns a future that resolves on SIGTERM or Ctrl-C.
pub fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    })
}

/// Logs to stderr (stdout stays free for a command's output), at the level
/// `RUST_LOG` sets, `info` when it is unset or unreadable; colours only on a
/// terminal and without `NO_COLOR`, so log files and container logs stay
/// plain text.
pub fn init_logging() {
    use std::io::IsTerminal;
    let colours = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(colours)
        .init();
}
