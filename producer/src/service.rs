//! The producer service: creates the topics, registers the schemas (with a
//! registry), serves the operations endpoint, runs the configured sources into
//! one publisher, and on stop (SIGTERM) stops the sources, flushes and returns.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tickpipe_schemas::registry::RegistryClient;
use tickpipe_schemas::{Codec, Topic, WriteFraming};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::publish::{Publisher, PublisherConfig};
use crate::sources::binance::backfill::{self, BackfillJob};
use crate::sources::{stop_pair, SourceError};
use tickpipe_kafka::{ensure_topics, producer_config_tuned};

/// Why the service could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("kafka: {0}")]
    Kafka(String),
    #[error("schema registry: {0}")]
    Registry(String),
    #[error("operations endpoint on {addr}: {source}")]
    Endpoint { addr: SocketAddr, source: std::io::Error },
    #[error("source {name}: {source}")]
    Source { name: &'static str, source: SourceError },
    #[error("{0} records were still unacknowledged when the flush timed out")]
    Unflushed(u64),
    #[error(
        "kafka: fatal error, the producer cannot deliver anything more ({0}); it stops so that it can be restarted"
    )]
    Fatal(String),
}

/// What a run did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    /// Records still unacknowledged at exit (0 after a clean flush).
    pub unacknowledged: u64,
}

/// Everything a running producer needs besides its sources.
struct Running {
    publisher: Publisher,
    ready: Arc<AtomicBool>,
}

/// Sets up topics, registry, publisher and endpoint.
async fn start(config: &Config, metrics: Metrics) -> Result<Running, ServiceError> {
    let (k, p) = (&config.kafka, &config.producer);
    if p.create_topics {
        ensure_topics(&k.brokers, &k.topic_prefix, &Topic::ALL, k.partitions, k.replication)
            .await
            .map_err(|e| ServiceError::Kafka(e.to_string()))?;
    }
    let codec = match config.schema_registry.config() {
        None => Codec::new(WriteFraming::SingleObject),
        Some(r) => {
            let client = RegistryClient::new(r).map_err(|e| ServiceError::Registry(e.to_string()))?;
            let codec = Codec::new(WriteFraming::Confluent);
            for t in Topic::ALL {
                let schema = t.schema();
                let id = client
                    .register(&t.value_subject(&k.topic_prefix), &schema.json)
                    .await
                    .map_err(|e| {
                        ServiceError::Registry(format!("registering {}: {e}", t.value_subject(&k.topic_prefix)))
                    })?;
                codec.set_write_id(&schema.name, id);
            }
            codec
        }
    };
    let kafka = producer_config_tuned(
        &k.brokers,
        &[
            ("compression.type", p.compression.clone()),
            ("linger.ms", p.linger_ms.to_string()),
            ("message.timeout.ms", p.message_timeout_ms.to_string()),
        ],
    );
    let publisher = Publisher::new(
        &PublisherConfig {
            kafka,
            topic_prefix: k.topic_prefix.clone(),
            max_in_flight: p.max_in_flight.max(1),
        },
        codec,
        metrics.clone(),
    )
    .map_err(|e| ServiceError::Kafka(e.to_string()))?;
    let ready = Arc::new(AtomicBool::new(true));
    if let Some(addr) = tickpipe_ops::metrics_addr(&config.producer.metrics_addr).map_err(ServiceError::Config)? {
        tickpipe_ops::serve(
            addr,
            metrics.registry.clone(),
            ready.clone(),
            "the Kafka queue is full: the broker is not acknowledging",
        )
        .await
        .map_err(|source| ServiceError::Endpoint { addr, source })?;
        // Readiness follows backpressure: not ready while nothing more can be
        // enqueued, nor after a fatal error (the process is then stopping).
        let (p, r) = (publisher.clone(), ready.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                r.store(!p.saturated() && p.fatal_error().is_none(), Ordering::Relaxed);
            }
        });
    }
    Ok(Running { publisher, ready })
}

/// Resolves `auto`: live Binance (and CoinCap when a key is set) if Binance's
/// REST answers `ping` within 3 s, else the simulator.
pub async fn resolve_auto(config: &mut Config) {
    let sources = &mut config.sources;
    if !sources.names.iter().any(|s| s == "auto") {
        return;
    }
    let url = format!("{}/api/v3/ping", sources.binance.rest_url.trim_end_matches('/'));
    let live = match reqwest::Client::builder().timeout(Duration::from_secs(3)).build() {
        Ok(c) => c.get(&url).send().await.is_ok_and(|r| r.status().is_success()),
        Err(_) => false,
    };
    sources.names.retain(|s| s != "auto");
    if live {
        tracing::info!("Binance answers: running the live sources");
        sources.names.push("binance".into());
        if sources.coincap.api_key.is_some() {
            sources.names.push("coincap".into());
        }
    } else {
        tracing::info!("Binance does not answer: running the built-in market simulator");
        sources.names.push("simulator".into());
    }
}

/// Runs the configured sources until `shutdown` resolves, or until every
/// source has ended when all of them are finite (replay, a bounded simulator).
pub async fn run(
    mut config: Config,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<Summary, ServiceError> {
    resolve_auto(&mut config).await;
    let built = config
        .sources
        .build()
        .map_err(|e| ServiceError::Config(e.to_string()))?;
    if built.is_empty() {
        return Err(ServiceError::Config("no source is enabled".into()));
    }
    let running = start(&config, metrics).await?;
    let publisher = running.publisher.clone();
    let (handle, stop) = stop_pair();
    let all_finite = built.iter().all(|s| s.finite());
    let mut tasks = tokio::task::JoinSet::new();
    for s in built {
        let name = s.name();
        tracing::info!(source = name, "source started");
        let fut = s.run(publisher.clone(), stop.clone());
        tasks.spawn(async move { (name, fut.await) });
    }
    tokio::pin!(shutdown);
    let mut failure = None;
    let fatal = publisher.fatal();
    tokio::pin!(fatal);
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                tracing::info!("stopping: no new input, flushing what is in flight");
                break;
            }
            e = &mut fatal => {
                tracing::error!(error = %e, "kafka: fatal error; stopping");
                failure = Some(ServiceError::Fatal(e));
                break;
            }
            done = tasks.join_next() => match done {
                None => break,
                Some(Ok((name, Ok(())))) => {
                    tracing::info!(source = name, "source ended");
                    if tasks.is_empty() && all_finite {
                        break;
                    }
                }
                Some(Ok((name, Err(source)))) => {
                    tracing::error!(source = name, error = %source, "source failed");
                    failure = Some(ServiceError::Source { name, source });
                    break;
                }
                Some(Err(e)) => {
                    failure = Some(ServiceError::Config(format!("a source task failed: {e}")));
                    break;
                }
            }
        }
    }
    handle.stop();
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(10), drain).await.is_err() {
        tracing::warn!("sources did not stop within 10 s");
    }
    running.ready.store(false, Ordering::Relaxed);
    // After a fatal error nothing more is acknowledged: no flush to wait for.
    if let Some(e @ ServiceError::Fatal(_)) = failure {
        return Err(e);
    }
    let unacknowledged = publisher.flush(Duration::from_secs(30)).await;
    if let Some(e) = failure {
        return Err(e);
    }
    if unacknowledged > 0 {
        return Err(ServiceError::Unflushed(unacknowledged));
    }
    Ok(Summary { unacknowledged })
}

/// Runs a klines backfill job (see [`backfill`]).
pub async fn run_backfill(
    config: Config,
    job: BackfillJob,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<u64, ServiceError> {
    let running = start(&config, metrics).await?;
    let (handle, stop) = stop_pair();
    tokio::spawn(async move {
        shutdown.await;
        handle.stop();
    });
    let published = tokio::select! {
        done = backfill::run(&job, &config.sources.binance, &running.publisher, stop) => {
            done.map_err(|source| ServiceError::Source {
                name: "binance-backfill",
                source,
            })?
        }
        e = running.publisher.fatal() => return Err(ServiceError::Fatal(e)),
    };
    let unacknowledged = running.publisher.flush(Duration::from_secs(30)).await;
    if unacknowledged > 0 {
        return Err(ServiceError::Unflushed(unacknowledged));
    }
    Ok(published)
}
