//! The `postgres-sink` service: entity topics in, rows in PostgreSQL out,
//! exactly once per Kafka offset. The sink runtime ([`crate::sink`]) reads
//! and batches; this sink resumes each partition from the offsets stored in
//! PostgreSQL (`sink_offsets`, moved in the same transaction as the rows) and
//! writes each batch with [`write_batch`].

use std::future::Future;

use deadpool_postgres::Pool;
use rdkafka::TopicPartitionList;

use super::config::with_causes;
pub use super::config::{connect, PgError, SinkConfig};
use super::migrate::migrate;
pub use super::writer::{write_batch, WriteError};
use super::COMPONENT;
use crate::decode::Item;
pub use crate::sink::SinkError;
use crate::sink::{Failure, Opening, Out, Resume, Sink, SinkDefaults, Written};

/// The `postgres-sink` binary's defaults.
pub const DEFAULTS: SinkDefaults = SinkDefaults {
    group: "tickpipe-postgres-sink",
    batch_max: 20_000,
    batch_wait_ms: 200,
    max_backoff_ms: 5_000,
    metrics_addr: "127.0.0.1:9104",
};

/// PostgreSQL as a sink.
struct Postgres {
    pool: Pool,
    group: String,
}

impl Sink for Postgres {
    const NAME: &'static str = COMPONENT;
    const METRICS_PREFIX: &'static str = "tickpipe_postgres_sink";
    const TARGET: &'static str = "Postgres";
    const NOT_READY: &'static str = "not ready: the database is not accepting writes";

    fn resume(&self) -> Resume {
        let (pool, group, runtime) = (self.pool.clone(), self.group.clone(), tokio::runtime::Handle::current());
        Resume::Store(Box::new(move |tpl: &TopicPartitionList| {
            let topics: Vec<String> = tpl.elements().iter().map(|e| e.topic().to_owned()).collect();
            runtime.block_on(async {
                let client = pool.get().await.map_err(|e| e.to_string())?;
                let rows = client
                    .query(
                        "SELECT topic, partition, next_offset FROM sink_offsets \
                         WHERE consumer_group = $1 AND topic = ANY($2)",
                        &[&group, &topics],
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(rows
                    .iter()
                    .map(|r| ((r.get::<_, String>(0), r.get::<_, i32>(1)), r.get::<_, i64>(2)))
                    .collect())
            })
        }))
    }

    /// How an operator starts a partition over: forget its stored position, so
    /// that it is read from its beginning (rows already written stay; a record
    /// read again is not written twice where its table has a natural key).
    fn rebaseline(group: &str, topic: &str, partition: i32) -> String {
        format!(
            "restart the sink with --rebaseline {topic}:{partition}, or run DELETE FROM sink_offsets WHERE \
             consumer_group = '{group}' AND topic = '{topic}' AND partition = {partition}; in its database and \
             restart it"
        )
    }

    async fn write(&self, batch: &[Item], out: &Out<'_>) -> Result<Written, Failure> {
        write_batch(&self.pool, &self.group, batch, Some(out.letters))
            .await
            .map_err(|e| match e {
                // Not an outage: write the batch again at once. Its other
                // partitions are still this instance's to write, and what the
                // other instance wrote is skipped as already written.
                WriteError::Fenced { .. } => Failure::Again(e.to_string()),
                WriteError::Letters(e) => e.into(),
                e => Failure::Outage(e.to_string()),
            })
    }

    async fn probe(&self) -> Option<bool> {
        let answered = async { self.pool.get().await.ok()?.simple_query("SELECT 1").await.ok() };
        Some(answered.await.is_some())
    }
}

/// Forgets the stored positions of `partitions` (full topic names) for the
/// sink's group, so that they are read from their beginning: the re-baseline
/// after a deliberate reset (a recreated topic, another cluster). Returns how
/// many positions were stored. Run it with the sink stopped.
pub async fn rebaseline(config: &SinkConfig, partitions: &[(String, i32)]) -> Result<u64, PgError> {
    let pool = connect(config).await?;
    let mut client = pool.get().await.map_err(|e| PgError::Unreachable {
        target: "pool".into(),
        detail: with_causes(&e),
    })?;
    migrate(&mut client).await?;
    let mut forgotten = 0;
    for (topic, partition) in partitions {
        let n = client
            .execute(
                "DELETE FROM sink_offsets WHERE consumer_group = $1 AND topic = $2 AND partition = $3",
                &[&config.sink.group, topic, partition],
            )
            .await
            .map_err(|source| PgError::Rebaseline {
                topic: topic.clone(),
                partition: *partition,
                source,
            })?;
        tracing::warn!(
            topic,
            partition,
            group = config.sink.group,
            forgotten = n,
            "postgres-sink: re-baselined: the partition is read from its beginning"
        );
        forgotten += n;
    }
    Ok(forgotten)
}

/// Runs until `shutdown` resolves, then writes the batch in hand and returns.
pub async fn run(config: SinkConfig, shutdown: impl Future<Output = ()>) -> Result<(), SinkError> {
    let open = |_: Opening| async {
        let pool = connect(&config).await?;
        let mut client = pool.get().await.map_err(|e| PgError::Unreachable {
            target: "pool".into(),
            detail: with_causes(&e),
        })?;
        let applied = migrate(&mut client).await.map_err(PgError::from)?;
        drop(client);
        tracing::info!(applied, "postgres-sink: schema ready");
        Ok(Postgres {
            pool,
            group: config.sink.group.clone(),
        })
    };
    crate::sink::run(config.sink.clone(), open, shutdown).await
}
