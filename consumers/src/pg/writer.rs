//! `postgres-sink`'s writer: one batch per transaction, exactly once per
//! Kafka offset.
//!
//! A batch locks its partitions' rows in `sink_offsets`, drops records below
//! the stored offsets (already written), writes the rest, records rejects in
//! `dead_letters` (and publishes them to the dead-letters topic), moves the
//! offsets, and commits. Because the offsets move in the same transaction as
//! the rows and every write first locks and checks them, a crash at any
//! instant, a rebalance, or a zombie instance still writing a revoked
//! partition never writes an offset twice.

use std::collections::BTreeMap;

use deadpool_postgres::Pool;
use tickpipe_ops::now_micros;
use tickpipe_schemas::{DeadLetter, Stage};

use super::rows::{reject_letter, write_items, Item, Reject};
use crate::sink::{LetterError, Letters, Written};

/// Why a batch write failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("postgres pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error(transparent)]
    Letters(#[from] LetterError),
    #[error("another instance started {topic}[{partition}] while this batch was written")]
    Fenced { topic: String, partition: i32 },
}

/// Writes one batch in one transaction, exactly once per offset.
pub async fn write_batch(
    pool: &Pool,
    group: &str,
    items: &[Item],
    dead_letters: Option<&Letters>,
) -> Result<Written, WriteError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let mut out = Written::default();

    // Lock each partition's offset and learn where it stands.
    let mut stored: BTreeMap<(String, i32), Option<i64>> = BTreeMap::new();
    for item in items {
        stored.entry((item.topic.clone(), item.partition)).or_insert(None);
    }
    let select = tx
        .prepare(
            "SELECT next_offset FROM sink_offsets WHERE consumer_group = $1 AND topic = $2 AND partition = $3 \
             FOR UPDATE",
        )
        .await?;
    for ((topic, partition), at) in stored.iter_mut() {
        *at = tx
            .query_opt(&select, &[&group, topic, partition])
            .await?
            .map(|r| r.get::<_, i64>(0));
    }

    // Keep what was not written yet.
    let mut fresh: Vec<&Item> = Vec::with_capacity(items.len());
    let mut first_fresh: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for item in items {
        let tp = (item.topic.clone(), item.partition);
        let from = stored.get(&tp).copied().flatten().unwrap_or(0);
        // Below the stored position, or read twice into this batch: a partition
        // revoked and given back while the batch was open is read again from
        // the stored position, after the copies the batch already holds.
        let repeated = out.next.get(&tp).is_some_and(|next| item.offset < *next);
        if item.offset < from || repeated {
            *out.already_written.entry(item.topic.clone()).or_default() += 1;
            continue;
        }
        first_fresh.entry(tp.clone()).or_insert(item.offset);
        let next = out.next.entry(tp).or_insert(0);
        *next = (*next).max(item.offset + 1);
        fresh.push(item);
    }
    for (tp, first) in &first_fresh {
        if let Some(Some(at)) = stored.get(tp) {
            if first > at {
                tracing::warn!(
                    topic = tp.0,
                    partition = tp.1,
                    stored = at,
                    first,
                    "postgres-sink: offsets {at}..{first} were never delivered to this sink"
                );
                out.gaps.push(tp.0.clone());
            }
        }
    }

    let refused = write_items(&tx, &fresh).await?;
    let now = now_micros();
    let mut letters: Vec<DeadLetter> = Vec::new();
    let refused_offsets: Vec<(&str, i32, i64)> = refused
        .iter()
        .map(|(i, _)| (i.topic.as_str(), i.partition, i.offset))
        .collect();
    for item in &fresh {
        match &item.body {
            Err(reject) => letters.push(reject_letter(item, reject, now)),
            Ok(body) if !super::rows::is_own_letter(body) => {
                if !refused_offsets.contains(&(item.topic.as_str(), item.partition, item.offset)) {
                    *out.written.entry(item.topic.clone()).or_default() += 1;
                    out.event_times.push((item.topic.clone(), body.event_time()));
                }
            }
            Ok(_) => {}
        }
    }
    for (item, reason) in &refused {
        letters.push(reject_letter(item, &Reject::write(item, reason.clone()), now));
    }
    if !letters.is_empty() {
        super::rows::dead_letters(&tx, &letters.iter().collect::<Vec<_>>()).await?;
        for l in &letters {
            out.rejected
                .push((l.topic.clone().unwrap_or_default(), stage_label(&l.stage)));
        }
    }

    // Move the offsets. A partition without a row had nothing to lock: if
    // another instance created the row meanwhile, the update finds a value it
    // did not expect, and the whole batch is written again (locking that row).
    let update = tx
        .prepare(
            "INSERT INTO sink_offsets AS o (consumer_group, topic, partition, next_offset) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (consumer_group, topic, partition) DO UPDATE SET next_offset = EXCLUDED.next_offset, \
             updated_at = now() WHERE o.next_offset = $5",
        )
        .await?;
    for ((topic, partition), next) in &out.next {
        let expected = stored
            .get(&(topic.clone(), *partition))
            .copied()
            .flatten()
            .unwrap_or(-1);
        let n = tx
            .execute(&update, &[&group, topic, partition, next, &expected])
            .await?;
        if n != 1 {
            return Err(WriteError::Fenced {
                topic: topic.clone(),
                partition: *partition,
            });
        }
    }
    // The letters go to Kafka once the fence check passed: a batch written
    // again would publish them twice.
    if let Some(dead_letters) = dead_letters {
        dead_letters.publish(&letters).await?;
    }
    tx.commit().await?;
    Ok(out)
}

/// The metric label of a letter's stage (this sink's letters are decode,
/// validate or write).
fn stage_label(stage: &str) -> &'static str {
    Stage::from_name(stage).map_or(Stage::Write.as_str(), Stage::as_str)
}
