//! `make bench`: bigquery-sink into the emulator's `trades_raw`, with the same
//! run's postgres-sink figure on the same topic for the record. The emulator is
//! not BigQuery, so the point is the sink's own cost: its CPU time per row is
//! measured (this process's CPU, which is the sink's, against the emulator
//! process's CPU for the same rows) and printed.
//!
//! The trades are the real spot BTCUSDT/ETHUSDT captures, repeated with shifted
//! ids and times to `TICKPIPE_BENCH_BQ_TRADES` (default 50,000).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tickpipe_consumers::bq::client::{Auth, BigQuery, Endpoint};
use tickpipe_consumers::bq::schema::DecimalColumns;
use tickpipe_consumers::bq::sink::{run, BqSinkConfig};
use tickpipe_consumers::sink::SinkSettings;
use tickpipe_kafka::ensure_topics;
use tickpipe_schemas::Topic;
use tickpipe_testkit::{real, stack};

mod common;

use common::cpu_seconds;

fn emulator_pid() -> Option<String> {
    let state = std::env::var("TICKPIPE_STATE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.local")));
    let pid = std::fs::read_to_string(state.join("run/bqemulator.pid")).ok()?;
    let pid = pid.trim().to_owned();
    std::path::Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("TICKPIPE_BENCH_BQ_TRADES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let trades = real::repeated_spot_trades(&stack::real_data_dir().join("binance_ws_raw_2024-08-08"), n);
    let brokers = stack::kafka_brokers();
    let prefix = format!("{}.", stack::unique_name("bench_bq"));
    ensure_topics(&brokers, &prefix, &[Topic::Trades, Topic::DeadLetters], 3, 1)
        .await
        .expect("broker up");
    let topic = Topic::Trades.name(&prefix);
    common::preload(&brokers, &topic, &trades).await;

    // bigquery-sink into the emulator.
    let endpoint = Endpoint {
        api_url: stack::bigquery_rest_url(),
        project: stack::bigquery_project(),
        auth: Auth::None,
    };
    let dataset = stack::unique_name("bench_bq");
    let config = BqSinkConfig {
        sink: SinkSettings {
            max_backoff: Duration::from_secs(1),
            ..SinkSettings::new(&brokers, &prefix, &[Topic::Trades], &format!("{prefix}bq"))
        },
        endpoint: endpoint.clone(),
        dataset: dataset.clone(),
        location: "US".into(),
        decimals: DecimalColumns::String,
        request_rows: 500,
    };
    let bq = BigQuery::connect(endpoint, None).await.expect("emulator up");
    let emulator = emulator_pid();
    let (own_before, emu_before) = (cpu_seconds("self"), emulator.as_deref().map(cpu_seconds));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let sink = tokio::spawn(run(config, async {
        let _ = stopped.await;
    }));
    let count = format!(
        "SELECT COUNT(*) FROM `{}.{dataset}.trades_raw`",
        stack::bigquery_project()
    );
    loop {
        let rows = bq.query(&count).await.unwrap_or_default();
        let done: usize = rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if done >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let bq_secs = started.elapsed().as_secs_f64();
    let own_cpu = cpu_seconds("self") - own_before;
    let emu_cpu = emulator.as_deref().map(cpu_seconds).zip(emu_before).map(|(a, b)| a - b);
    let _ = stop.send(());
    sink.await.expect("sink task").expect("sink");
    let bq_rate = n as f64 / bq_secs;

    // postgres-sink on the same topic, for the record.
    let (pg_secs, _) = common::postgres_sink(&brokers, &prefix, &format!("{prefix}pg"), n).await;
    let pg_rate = n as f64 / pg_secs;

    println!("bigquery-sink into the BigQuery emulator, {n} real-shaped trades preloaded in Kafka:");
    println!("  bigquery-sink -> emulator  {bq_rate:>10.0} rows/s  ({bq_secs:.2} s, start-up included)");
    println!("  postgres-sink (same topic) {pg_rate:>10.0} rows/s");
    println!(
        "  sink CPU                   {:>10.1} µs/row  ({own_cpu:.2} CPU s: decode, validate, rows, HTTP)",
        own_cpu / n as f64 * 1e6
    );
    match emu_cpu {
        Some(emu) => println!(
            "  emulator CPU               {:>10.1} µs/row  (the sink uses {:.1}% of the CPU the emulator spends)",
            emu / n as f64 * 1e6,
            100.0 * own_cpu / emu.max(1e-9)
        ),
        None => println!("  emulator CPU               not measured (no pid file of the local stack's emulator)"),
    }
}
