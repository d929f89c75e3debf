//! `make bench`: the `candles` service end to end through the local broker.
//! Publishes the real spot BTCUSDT/ETHUSDT trades (repeated with shifted times
//! and ids) to a fresh `trades` topic, runs the service until every expected
//! candle has arrived on `candles`, and reports trades/s in, next to the pure
//! builder on the same trades measured in the same run. The candle output is
//! verified: every candle the pure builder makes is published, with the same
//! content. Twice: as the service runs by default, and with `--transactions`
//! (a transaction per state interval, read `read_committed`; the last
//! candles arrive when the last transaction commits, up to a state interval
//! after the last trade), each on topics of its own.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use tickpipe_consumers::candles::service::{run, ServiceConfig};
use tickpipe_consumers::candles::{CandleBuilder, CandleConfig, Output};
use tickpipe_kafka::consumer_config;
use tickpipe_kafka::{ensure_topics, producer_config};
use tickpipe_schemas::{Candle, Codec, Record, Topic, Trade, WriteFraming};
use tickpipe_testkit::{real, stack};

fn config() -> CandleConfig {
    CandleConfig {
        intervals: ["1s", "5s", "1m", "5m", "1h", "1d"]
            .iter()
            .map(|i| i.parse().expect("interval"))
            .collect(),
        allowed_lateness: 0,
        fill_empty: true,
        max_fill: 100_000,
    }
}

fn load(target: usize) -> Vec<Trade> {
    let ws = stack::real_data_dir().join("binance_ws_raw_2024-08-08");
    let base: Vec<Trade> = real::spot_capture_trades_2024_08_08(&ws);
    let lo = base.iter().map(|t| t.event_time).min().unwrap_or(0);
    let hi = base.iter().map(|t| t.event_time).max().unwrap_or(0);
    let span = hi - lo + 1_000_000;
    let ids = base.iter().map(|t| t.trade_id).max().unwrap_or(0) + 1;
    let reps = target.div_ceil(base.len());
    let mut out = Vec::with_capacity(reps * base.len());
    for r in 0..reps as i64 {
        out.extend(base.iter().map(|t| Trade {
            event_time: t.event_time + r * span,
            trade_id: t.trade_id + r * ids,
            ..t.clone()
        }));
    }
    out
}

#[tokio::main]
async fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let trades = load(if quick { 10_000 } else { 1_000_000 });
    let n = trades.len();

    // The pure builder on the same trades: the expected output and the baseline.
    let start = Instant::now();
    let mut builder = CandleBuilder::new(config());
    let mut out = Vec::new();
    for t in &trades {
        builder.push(t, &mut out);
    }
    let expected: HashMap<(String, String, i64), Candle> = out
        .into_iter()
        .filter_map(|o| match builder.resolve(o) {
            Output::Candle(c) => Some(((c.symbol.clone(), c.interval.clone(), c.open_time), c)),
            _ => None,
        })
        .collect();
    let pure = start.elapsed();

    let brokers = stack::kafka_brokers();
    let plain = run_service(&brokers, &trades, &expected, false).await;
    let txn = run_service(&brokers, &trades, &expected, true).await;

    let e2e_rate = n as f64 / plain.as_secs_f64();
    let txn_rate = n as f64 / txn.as_secs_f64();
    let pure_rate = n as f64 / pure.as_secs_f64();
    println!("candles end to end: {n} real spot trades through the local broker, intervals 1s,5s,1m,5m,1h,1d");
    println!("  {:<44} {:>12} {:>8}", "", "trades/s", "ratio");
    println!(
        "  {:<44} {:>12.0} {:>7.3}x",
        "candles service (decode, build, publish, state)",
        e2e_rate,
        e2e_rate / pure_rate
    );
    println!(
        "  {:<44} {:>12.0} {:>7.3}x",
        "the same in Kafka transactions (--transactions)",
        txn_rate,
        txn_rate / pure_rate
    );
    println!(
        "  {:<44} {:>12.0} {:>7.3}x",
        "pure builder on the same trades (baseline)", pure_rate, 1.0
    );
    println!(
        "  transactions cost: {:.3}x the plain service's rate",
        txn_rate / e2e_rate
    );
    println!(
        "  output verified: {} candles in each run, each equal to the pure builder's",
        expected.len()
    );
}

/// Publishes the trades to a fresh `trades` topic, runs the service until
/// every expected candle is on its `candles` topic, checks each, and returns
/// how long the service took (from its start to the last candle).
async fn run_service(
    brokers: &str,
    trades: &[Trade],
    expected: &HashMap<(String, String, i64), Candle>,
    transactions: bool,
) -> Duration {
    let prefix = format!("{}.", stack::unique_name("bench_candles"));
    ensure_topics(brokers, &prefix, &Topic::ALL, 3, 1)
        .await
        .expect("the broker is up (make kafka)");
    let codec = Codec::new(WriteFraming::SingleObject);
    let producer: FutureProducer = producer_config(brokers).create().expect("producer");
    let topic = Topic::Trades.name(&prefix);
    let mut pending = Vec::with_capacity(trades.len());
    for t in trades {
        let payload = codec.encode(t).expect("encodable");
        loop {
            match producer.send_result(FutureRecord::to(&topic).key(&t.key()).payload(&payload)) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err((_, _)) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }
    for p in pending {
        p.await.expect("delivered").expect("acknowledged");
    }

    // read_committed, as every consumer of ours: in transactions, a candle
    // arrives when its transaction commits.
    let reader: StreamConsumer = consumer_config(brokers, &stack::unique_name("bench-reader"))
        .create()
        .expect("consumer");
    reader.subscribe(&[&Topic::Candles.name(&prefix)]).expect("subscribe");
    let service_config = ServiceConfig {
        brokers: brokers.to_owned(),
        topic_prefix: prefix.clone(),
        candles: config(),
        group: format!("{prefix}bench-candles"),
        batch_max: 10_000,
        batch_wait: Duration::from_millis(50),
        // The binary's default.
        state_interval: Duration::from_secs(5),
        lease_session_timeout: Duration::from_secs(6),
        instance_id: None,
        transactions,
        partitions: 3,
        replication: 1,
        metrics_addr: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let start = Instant::now();
    let service = tokio::spawn(run(service_config, async {
        let _ = stopped.await;
    }));
    let mut seen: HashMap<(String, String, i64), Candle> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    while seen.len() < expected.len() {
        let msg = tokio::time::timeout_at(deadline, reader.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {} candles within 600 s", seen.len(), expected.len()))
            .expect("candle record");
        let c: Candle = codec
            .decode(msg.payload().unwrap_or_default())
            .expect("decodable candle");
        assert_eq!(msg.key(), Some(c.key().as_bytes()));
        seen.insert((c.symbol.clone(), c.interval.clone(), c.open_time), c);
    }
    let took = start.elapsed();
    let _ = stop.send(());
    service.await.expect("joined").expect("clean stop");
    for (k, c) in expected {
        assert_eq!(seen.get(k), Some(c), "candle {k:?}");
    }
    took
}
