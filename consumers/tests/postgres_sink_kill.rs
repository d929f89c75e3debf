//! Killing `postgres-sink` with SIGKILL at random moments while trades stream in
//! loses nothing and writes nothing twice: afterwards every trade is in
//! `trades`, every poison record is in `dead_letters` exactly once, and the
//! stored offsets equal the ends of the partitions (the witness that no
//! offset was written twice: `dead_letters` holds back a second copy of a
//! letter since migration 0002).

mod common;

use common::{quiet_service, recorded_trades, stored_positions, Fresh};
use std::collections::BTreeMap;
use std::process::{Child, Command};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tickpipe_kafka::producer_config;
use tickpipe_schemas::{Codec, Record, Topic, WriteFraming};
use tickpipe_testkit::stack;
use tokio_postgres::{Client, NoTls};

/// The sink process, killed if the test fails before it does.
struct Sink(Child);

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_sink(url: &str, prefix: &str, group: &str) -> Sink {
    Sink(
        quiet_service(env!("CARGO_BIN_EXE_postgres-sink"), &stack::kafka_brokers(), prefix)
            .env("TICKPIPE_POSTGRES_URL", url)
            .env("TICKPIPE_POSTGRES_SINK_GROUP", group)
            .env("TICKPIPE_POSTGRES_SINK_TOPICS", "trades")
            .env("TICKPIPE_POSTGRES_SINK_BATCH_MAX", "700")
            .env("TICKPIPE_POSTGRES_SINK_BATCH_WAIT_MS", "20")
            .env("TICKPIPE_POSTGRES_SINK_SESSION_TIMEOUT_MS", "6000")
            .env("TICKPIPE_POSTGRES_SINK_METRICS_ADDR", "off")
            .spawn()
            .expect("the postgres-sink binary starts"),
    )
}

async fn stored_total(client: &Client) -> i64 {
    client
        .query_one("SELECT coalesce(sum(next_offset), 0)::bigint FROM sink_offsets", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_and_duplicates_nothing() {
    let Some(mut trades) = recorded_trades() else { return };
    // As the replaying producer does: ingest time is when it was read.
    let now = tickpipe_consumers::ops::now_micros();
    for t in &mut trades {
        t.ingest_time = now;
    }
    let Fresh { brokers, prefix, url } = Fresh::create("pgsink_kill").await;
    let group = format!("{prefix}sink");
    let (client, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(conn);

    // Stream the recording (with a poison record every 500 trades) in chunks,
    // while the sink is killed over and over.
    let topic = Topic::Trades.name(&prefix);
    let publisher = tokio::spawn(async move {
        let codec = Codec::new(WriteFraming::SingleObject);
        let producer: FutureProducer = producer_config(&brokers).create().unwrap();
        let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
        let mut poison = 0;
        for (n, chunk) in trades.chunks(500).enumerate() {
            let mut pending = Vec::new();
            for (i, t) in chunk.iter().enumerate() {
                let key = t.key();
                let payload = if i == 250 {
                    poison += 1;
                    format!("poison {n}/{i}").into_bytes()
                } else {
                    codec.encode(t).unwrap()
                };
                let record = FutureRecord::to(&topic).key(&key).payload(&payload);
                pending.push(producer.send_result(record).unwrap());
            }
            for p in pending {
                let delivery = p.await.unwrap().unwrap();
                let (partition, offset) = (delivery.partition, delivery.offset);
                let end = ends.entry(partition).or_default();
                *end = (*end).max(offset + 1);
            }
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        (ends, poison)
    });

    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7469636b);
    let mut progress = Vec::new();
    for round in 0..12 {
        let before = stored_total(&client).await;
        let mut sink = start_sink(&url, &prefix, &group);
        // Most rounds die mid-batch after writing something; every third dies
        // wherever start-up happens to be (connecting, migrating, joining).
        if round % 3 != 2 {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while stored_total(&client).await <= before {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "round {round}: no progress in 60 s"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..800))).await;
        sink.0.kill().unwrap();
        sink.0.wait().unwrap();
        progress.push(stored_total(&client).await);
    }
    let (ends, poison) = publisher.await.unwrap();
    let total: i64 = ends.values().sum();
    assert!(
        progress.iter().any(|p| *p > 0 && *p < total),
        "the kills must land mid-stream: stored offsets after each kill {progress:?}, total {total}"
    );

    // A last run finishes the stream and stops cleanly on SIGTERM.
    let mut sink = start_sink(&url, &prefix, &group);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while stored_total(&client).await < total {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sink did not catch up: {} of {total}",
            stored_total(&client).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = sink.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = sink.0.wait().unwrap();
    assert!(status.success(), "SIGTERM must end the sink with 0, got {status}");

    let stored = stored_positions(&client).await;
    assert_eq!(stored, ends, "stored offsets equal the partition ends");
    let written: i64 = client
        .query_one("SELECT count(*) FROM trades", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(written, total - poison, "every trade written");
    let letters = client
        .query_one(
            "SELECT count(*), count(DISTINCT (partition, \"offset\")) FROM dead_letters",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (letters.get::<_, i64>(0), letters.get::<_, i64>(1)),
        (poison, poison),
        "every poison record recorded exactly once across {} kills",
        progress.len()
    );
}
