//! `make bench`: postgres-sink scaling on a three-node Apache Kafka cluster
//! (KRaft, replication factor 3, `min.insync.replicas=2`) started by the
//! bench: 1, 2 and 3 instances in one group over a six-partition `trades`
//! topic of `TICKPIPE_BENCH_GROUP_TRADES` (default 1,000,000) real-shaped
//! trades of eight symbols, each count into a fresh database, on the
//! exactly-once path. Prints rows/s and the ratio against one instance,
//! measured in the same run.

use tickpipe_kafka::ensure_topics;
use tickpipe_schemas::Topic;
use tickpipe_testkit::cluster::KafkaCluster;
use tickpipe_testkit::{real, stack};

mod common;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("TICKPIPE_BENCH_GROUP_TRADES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = stack::real_data_dir().join("binance_ws_raw_2024-08-08");
    let trades = real::repeated_spot_trades_over(&dir, n, &real::SPOT_SYMBOLS);
    let cluster = KafkaCluster::start(3);
    let brokers = cluster.bootstrap();
    let prefix = format!("{}.", stack::unique_name("bench_group"));
    ensure_topics(&brokers, &prefix, &[Topic::Trades], 6, -1)
        .await
        .expect("topics");
    common::preload(&brokers, &Topic::Trades.name(&prefix), &trades).await;

    println!("postgres-sink in one group, {n} trades, 6 partitions, 3 Kafka nodes (RF 3, min ISR 2):");
    println!("| instances | rows/s | against one |");
    println!("|---:|---:|---:|");
    let mut one = 0.0;
    for instances in 1..=3 {
        let group = format!("{prefix}g{instances}");
        let (secs, _) = common::postgres_sinks(&brokers, &prefix, &group, n, instances).await;
        let rate = n as f64 / secs;
        if instances == 1 {
            one = rate;
        }
        println!("| {instances} | {rate:.0} | {:.2} |", rate / one);
    }
    drop(cluster);
}
