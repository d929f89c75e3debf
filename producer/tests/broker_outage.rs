//! Fault injection with librdkafka's MockCluster: the only broker goes down
//! while the simulator publishes flat out. The sources must block on the
//! in-flight bound (memory stays bounded), and once the broker is back every
//! trade arrives exactly once. A fatal error of the idempotent producer
//! stops the producer with an error instead of leaving it running blind.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use tickpipe_producer::config::Config;
use tickpipe_producer::metrics::Metrics;
use tickpipe_producer::service;
use tickpipe_schemas::Topic;

use common::{rss_bytes, total, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_loses_nothing_and_memory_stays_bounded() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    let brokers = cluster.bootstrap_servers();
    for t in Topic::ALL {
        cluster.create_topic(&t.name(""), 2, 1).expect("topic");
    }
    const TRADES: u64 = 60_000;
    const BOUND: usize = 2_000;
    let mut config = Config::default();
    config.sources.names = vec!["simulator".into()];
    config.producer.metrics_addr = "off".into();
    config.kafka.brokers = brokers.clone();
    config.producer.create_topics = false;
    config.producer.max_in_flight = BOUND;
    config.sources.simulator.rate = 0.0;
    config.sources.simulator.max_trades = Some(TRADES);
    config.sources.simulator.start_ms = Some(1_767_225_600_000);
    let metrics = Metrics::new();
    let run = tokio::spawn(service::run(config, metrics.clone(), std::future::pending()));

    wait_for("the first acknowledgements", Duration::from_secs(30), || {
        total(&metrics.published) > 5_000
    })
    .await;
    let rss_before = rss_bytes();
    cluster.broker_down(1).expect("broker down");
    // With the broker away the queue fills to the bound, and no further.
    let mut deepest = 0;
    wait_for("the in-flight bound to be reached", Duration::from_secs(30), || {
        deepest = deepest.max(metrics.queue_depth.get());
        deepest >= BOUND as i64
    })
    .await;
    let published_during = total(&metrics.published);
    wait_for("the simulator to block on the bound", Duration::from_secs(10), || {
        let d = metrics.queue_depth.get();
        deepest = deepest.max(d);
        d == BOUND as i64
    })
    .await;
    assert!(
        deepest <= BOUND as i64,
        "queue depth {deepest} exceeded the bound {BOUND}"
    );
    let rss_down = rss_bytes();
    assert!(
        rss_down < rss_before + 64 * 1024 * 1024,
        "memory grew from {rss_before} to {rss_down} bytes while the broker was down"
    );
    assert!(
        published_during < TRADES,
        "everything was acknowledged before the outage"
    );
    cluster.broker_up(1).expect("broker up");

    let summary = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the run ends after the last trade")
        .expect("task")
        .expect("clean run");
    assert_eq!(summary.unacknowledged, 0);
    assert_eq!(total(&metrics.delivery_failures), 0);

    let trades = common::trades(&brokers, "");
    assert_eq!(trades.len() as u64, TRADES, "every trade exactly once");
    let mut by_symbol: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for t in &trades {
        by_symbol.entry(t.symbol.clone()).or_default().push(t.trade_id);
    }
    for (symbol, mut ids) in by_symbol {
        ids.sort_unstable();
        let n = ids.len() as i64;
        assert_eq!(ids, (1..=n).collect::<Vec<_>>(), "{symbol}: ids 1..={n} each once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_kafka_error_fails_readiness_and_stops_the_producer_with_an_error() {
    // The cluster refuses the idempotent producer its id: librdkafka raises a
    // fatal error and can deliver nothing more.
    let cluster = MockCluster::new(1).expect("mock cluster");
    for t in Topic::ALL {
        cluster.create_topic(&t.name(""), 1, 1).expect("topic");
    }
    cluster.request_errors(
        RDKafkaApiKey::InitProducerId,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_CLUSTER_AUTHORIZATION_FAILED; 8],
    );
    let addr = tickpipe_testkit::stack::free_loopback_addr();
    let mut config = Config::default();
    config.sources.names = vec!["simulator".into()];
    config.producer.metrics_addr = addr.to_string();
    config.kafka.brokers = cluster.bootstrap_servers();
    config.producer.create_topics = false;
    let run = tokio::spawn(service::run(config, Metrics::new(), std::future::pending()));
    let readyz = || async move {
        reqwest::get(format!("http://{addr}/readyz"))
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    let error = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the producer stops on its own")
        .expect("task")
        .expect_err("a fatal error is an error");
    let text = error.to_string();
    assert!(text.contains("fatal error"), "{text}");
    assert!(
        text.contains("ClusterAuthorizationFailed") || text.contains("authoriz"),
        "{text}"
    );
    assert_ne!(readyz().await, 200, "not ready once fatal");
}
