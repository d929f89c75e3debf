//! What the sink benchmarks share: the topic preload, a timed postgres-sink
//! run on the exactly-once path, and a process's CPU time.

use std::time::{Duration, Instant};

use rdkafka::producer::FutureProducer;
use tickpipe_consumers::pg::sink::{run, SinkConfig};
use tickpipe_consumers::sink::SinkSettings;
use tickpipe_kafka::producer_config;
use tickpipe_kafka::send_all;
use tickpipe_schemas::{Codec, Record, Topic, Trade, WriteFraming};
use tickpipe_testkit::stack;
use tokio_postgres::NoTls;

/// CPU seconds (user + system) of a process, from `/proc/<pid>/stat`
/// (`"self"` for this one).
#[allow(dead_code)] // not every bench that shares this module measures CPU
pub fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // `getconf CLK_TCK` is 100 on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

/// Publishes the trades to `topic`, every one acknowledged, in chunks.
pub async fn preload(brokers: &str, topic: &str, trades: &[Trade]) {
    let codec = Codec::new(WriteFraming::SingleObject);
    let producer: FutureProducer = producer_config(brokers).create().expect("producer");
    for chunk in trades.chunks(100_000) {
        let records = chunk
            .iter()
            .map(|t| (topic.to_owned(), t.key(), codec.encode(t).expect("encode")))
            .collect();
        send_all(&producer, records).await.expect("delivered");
    }
}

/// Runs postgres-sink over the `trades` of `prefix` into a fresh database
/// until `n` offsets are stored; returns the seconds it took (start-up
/// included) and the database URL.
#[allow(dead_code)] // not every bench that shares this module runs it
pub async fn postgres_sink(brokers: &str, prefix: &str, group: &str, n: usize) -> (f64, String) {
    postgres_sinks(brokers, prefix, group, n, 1).await
}

/// [`postgres_sink`] with `instances` sinks in one group, in this process.
pub async fn postgres_sinks(brokers: &str, prefix: &str, group: &str, n: usize, instances: usize) -> (f64, String) {
    let url = stack::fresh_database("bench_pg").await;
    let (client, conn) = tokio_postgres::connect(&url, NoTls).await.expect("postgres");
    tokio::spawn(conn);
    let config = SinkConfig {
        sink: SinkSettings {
            batch_max: 20_000,
            batch_wait: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            ..SinkSettings::new(brokers, prefix, &[Topic::Trades], group)
        },
        postgres_url: url.clone(),
        pool_size: 2,
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let sinks: Vec<_> = (0..instances)
        .map(|_| {
            let mut stopped = stopped.clone();
            tokio::spawn(run(config.clone(), async move {
                let _ = stopped.wait_for(|s| *s).await;
            }))
        })
        .collect();
    loop {
        let done: i64 = client
            .query_one("SELECT coalesce(sum(next_offset), 0)::bigint FROM sink_offsets", &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        if done as usize >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = stop.send(true);
    for sink in sinks {
        sink.await.expect("sink task").expect("sink");
    }
    (secs, url)
}
