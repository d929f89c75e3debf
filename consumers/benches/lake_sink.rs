//! `make bench`: lake-sink into a local folder (Parquet, zstd), against the
//! usual Python job measured in the same run on the same records: a consumer
//! that decodes with fastavro and writes the same columns with pyarrow
//! (`benches/baseline/lake_sink.py`). Printed: rows/s, Parquet bytes per row
//! (against the records' Avro bytes in Kafka) and CPU per row of each.
//!
//! The trades are the real spot BTCUSDT/ETHUSDT captures, repeated with shifted
//! ids and times to `TICKPIPE_BENCH_LAKE_TRADES` (default 1,000,000); the
//! Python job reads the first `TICKPIPE_BENCH_LAKE_PYTHON_TRADES` (default
//! 300,000) of them.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tickpipe_consumers::lake::sink::{run, LakeSinkConfig};
use tickpipe_consumers::lake::store::Target;
use tickpipe_consumers::sink::SinkSettings;
use tickpipe_kafka::ensure_topics;
use tickpipe_schemas::{Codec, Topic, WriteFraming};
use tickpipe_testkit::{real, stack};

mod common;

/// Bytes and number of the Parquet files under `dir`.
fn parquet_bytes(dir: &Path) -> (u64, usize) {
    let mut stack = vec![dir.to_owned()];
    let (mut bytes, mut files) = (0, 0);
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
                files += 1;
            }
        }
    }
    (bytes, files)
}

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = env_count("TICKPIPE_BENCH_LAKE_TRADES", 1_000_000);
    let python_n = env_count("TICKPIPE_BENCH_LAKE_PYTHON_TRADES", 300_000).min(n);
    let trades = real::repeated_spot_trades(&stack::real_data_dir().join("binance_ws_raw_2024-08-08"), n);
    let codec = Codec::new(WriteFraming::SingleObject);
    let avro_bytes: usize = trades.iter().map(|t| codec.encode(t).map_or(0, |b| b.len())).sum();
    let brokers = stack::kafka_brokers();
    let prefix = format!("{}.", stack::unique_name("bench_lake"));
    ensure_topics(&brokers, &prefix, &[Topic::Trades, Topic::DeadLetters], 3, 1)
        .await
        .expect("broker up");
    let topic = Topic::Trades.name(&prefix);
    common::preload(&brokers, &topic, &trades).await;

    // lake-sink into a fresh folder, with its default file size; stopped once
    // it has read every record, so the time includes writing the last files.
    let dir = std::env::temp_dir().join(stack::unique_name("bench_lake"));
    let metrics = stack::free_loopback_addr();
    let config = LakeSinkConfig::new(
        SinkSettings {
            max_backoff: Duration::from_secs(1),
            metrics_addr: Some(metrics),
            ..SinkSettings::new(&brokers, &prefix, &[Topic::Trades], &format!("{prefix}lake"))
        },
        Target::Local(dir.clone()),
    );
    let cpu_before = common::cpu_seconds("self");
    let started = Instant::now();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let sink = tokio::spawn(run(config, async {
        let _ = stopped.await;
    }));
    loop {
        let text = stack::scrape(metrics).await;
        let consumed: f64 = text
            .lines()
            .filter(|l| l.starts_with("tickpipe_lake_sink_records_consumed_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if consumed as usize >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(());
    sink.await.expect("sink task").expect("sink");
    let secs = started.elapsed().as_secs_f64();
    let cpu = common::cpu_seconds("self") - cpu_before;
    let (bytes, files) = parquet_bytes(&dir);
    let _ = std::fs::remove_dir_all(&dir);

    // The Python job on the first records of the same topic.
    let out = std::env::temp_dir().join(format!("{}.parquet", stack::unique_name("bench_lake_py")));
    let python = Command::new(stack::interop_python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/benches/baseline/lake_sink.py"))
        .args([&brokers, &topic, &format!("{prefix}python")])
        .arg(&Topic::Trades.schema().json)
        .arg(python_n.to_string())
        .arg(&out)
        .output()
        .expect("the Python baseline");
    let _ = std::fs::remove_file(&out);
    assert!(
        python.status.success(),
        "the Python baseline failed: {}",
        String::from_utf8_lossy(&python.stderr)
    );
    let figures: Vec<f64> = String::from_utf8_lossy(&python.stdout)
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    let [py_rate, py_cpu, py_bytes] = figures[..] else {
        panic!(
            "the Python baseline printed {:?}",
            String::from_utf8_lossy(&python.stdout)
        );
    };

    let rate = n as f64 / secs;
    let per_row = |b: f64, rows: usize| b / rows as f64;
    println!("lake-sink into a local folder, {n} real-shaped trades preloaded in Kafka ({files} files):");
    println!("  lake-sink                {rate:>10.0} rows/s  ({secs:.2} s, start-up and last files included)");
    println!(
        "  Python (fastavro+pyarrow) {py_rate:>9.0} rows/s  on {python_n} records  (lake-sink: {:.1}x)",
        rate / py_rate.max(1e-9)
    );
    println!(
        "  lake-sink CPU            {:>10.2} µs/row  (decode, validate, columns, Parquet, Kafka client)",
        cpu / n as f64 * 1e6
    );
    println!(
        "  Python CPU               {py_cpu:>10.2} µs/row  (lake-sink uses {:.0}% of it)",
        100.0 * cpu / n as f64 * 1e6 / py_cpu.max(1e-9)
    );
    println!(
        "  Parquet bytes per row    {:>10.1}         (Python's file {:.1}; Avro in Kafka {:.1})",
        per_row(bytes as f64, n),
        per_row(py_bytes, python_n),
        per_row(avro_bytes as f64, n)
    );
}
