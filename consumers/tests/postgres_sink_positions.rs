//! A written position that cannot be right is refused, never skipped past in
//! silence: `postgres-sink` keeps a stored position above the end of a
//! partition (the topic was deleted and recreated, or the sink now reads
//! another cluster), does not read that partition, says how to re-baseline it
//! and counts it, while the other partitions are written. After the
//! re-baseline the operator is told to run, every record is written.

mod common;

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use tickpipe_consumers::ops::now_micros;
use tickpipe_consumers::pg::sink::{rebaseline, run, SinkConfig};
use tickpipe_consumers::sink::SinkSettings;
use tickpipe_kafka::position_above_end;
use tickpipe_kafka::{ensure_topics, producer_config};
use tickpipe_schemas::{Codec, Decimal, Source, Topic, Trade, TradeKind, WriteFraming};
use tickpipe_testkit::stack;
use tickpipe_testkit::stack::{wait_count, wait_metric};
use tokio_postgres::NoTls;

fn trade(id: i64) -> Trade {
    let now = now_micros();
    Trade {
        venue: "binance".into(),
        symbol: "BTCUSDT".into(),
        kind: TradeKind::Trade,
        trade_id: id,
        price: Decimal::new(68_000, 0),
        quantity: Decimal::new(1, 3),
        buyer_is_maker: false,
        first_trade_id: None,
        last_trade_id: None,
        source: Source::Replay,
        event_time: now,
        ingest_time: now,
    }
}

fn config(prefix: &str, url: &str, metrics: Option<std::net::SocketAddr>) -> SinkConfig {
    let mut config = common::quick_pg_config(prefix, &[Topic::Trades], url);
    config.sink.partitions = 2;
    config.sink.metrics_addr = metrics;
    config
}

type Stop = tokio::sync::oneshot::Sender<()>;
type Running = tokio::task::JoinHandle<Result<(), tickpipe_consumers::pg::sink::SinkError>>;

fn start(config: SinkConfig) -> (Stop, Running) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let sink = tokio::spawn(run(config, async {
        let _ = stopped.await;
    }));
    (stop, sink)
}

async fn stop((stop, sink): (Stop, Running)) {
    let _ = stop.send(());
    sink.await.expect("sink task").expect("sink stops cleanly");
}

#[test]
fn only_positions_above_the_end_are_impossible() {
    assert_eq!(position_above_end(0, 0), None);
    assert_eq!(position_above_end(10, 10), None);
    assert!(position_above_end(11, 10).is_some_and(|e| e.contains("above the partition's end 10")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_position_above_the_partition_end_stops_that_partition_until_re_baselined() {
    let prefix = format!("{}.", stack::unique_name("pgsink_recreated"));
    let brokers = stack::kafka_brokers();
    ensure_topics(&brokers, &prefix, &[Topic::Trades, Topic::DeadLetters], 2, 1)
        .await
        .unwrap_or_else(|e| panic!("is the broker up (make stack-up)? {e}"));
    let url = stack::fresh_database("pgsink_recreated").await;
    let (client, conn) = tokio_postgres::connect(&url, NoTls).await.expect("postgres");
    tokio::spawn(conn);
    let topic = Topic::Trades.name(&prefix);
    let config = config(&prefix, &url, None);
    // Each run serves its metrics on a port of its own (a server outlives its run).
    let with_metrics = |addr| SinkConfig {
        sink: SinkSettings {
            metrics_addr: Some(addr),
            ..config.sink.clone()
        },
        ..config.clone()
    };

    // A first run creates the tables; then the store says partition 0 was
    // written up to 6,106, as it would after the topic was recreated.
    let first = start(config.clone());
    wait_count(&client, "SELECT count(*) FROM sink_offsets", 0, 60).await;
    stop(first).await;
    client
        .execute(
            "INSERT INTO sink_offsets (consumer_group, topic, partition, next_offset) VALUES ($1, $2, 0, 6106)",
            &[&config.sink.group, &topic],
        )
        .await
        .expect("stored position");

    // The new topic: ten trades on each partition.
    let codec = Codec::new(WriteFraming::SingleObject);
    let producer: FutureProducer = producer_config(&brokers).create().expect("producer");
    for id in 0..20 {
        let payload = codec.encode(&trade(id)).expect("encode");
        producer
            .send(
                FutureRecord::to(&topic)
                    .key("binance:BTCUSDT")
                    .payload(&payload)
                    .partition((id % 2) as i32),
                Duration::from_secs(10),
            )
            .await
            .expect("publish");
    }

    let metrics = stack::free_loopback_addr();
    let sink = start(with_metrics(metrics));
    let refused = format!("tickpipe_postgres_sink_refused_partitions{{topic=\"{topic}\"}} 1");
    wait_metric(metrics, &refused, 30).await;
    // Partition 1 flows; partition 0 is neither written nor moved.
    wait_count(&client, "SELECT count(*) FROM trades", 10, 30).await;
    wait_count(&client, "SELECT count(*) FROM trades WHERE trade_id % 2 = 0", 0, 1).await;
    let stored = "SELECT next_offset FROM sink_offsets WHERE partition = 0";
    wait_count(&client, stored, 6106, 1).await;
    stop(sink).await;

    // The re-baseline the error names (`--rebaseline <topic>:0`): forget the
    // position, restart.
    let forgotten = rebaseline(&config, &[(topic.clone(), 0)]).await.expect("re-baseline");
    assert_eq!(forgotten, 1);
    let metrics = stack::free_loopback_addr();
    let sink = start(with_metrics(metrics));
    wait_count(&client, "SELECT count(*) FROM trades", 20, 60).await;
    wait_count(&client, stored, 10, 10).await;
    wait_metric(metrics, &refused.replace("} 1", "} 0"), 30).await;
    stop(sink).await;
}
