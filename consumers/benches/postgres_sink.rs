//! `make bench`: postgres-sink throughput into `trades` on the exactly-once path,
//! against two baselines measured in the same run on the same rows:
//!
//! - the raw limit: psql `\copy` of the same rows (CSV) into an identical table;
//! - the usual pipeline: a Python consumer (confluent-kafka + fastavro + psycopg
//!   `executemany`), on a prefix of the topic (it is two orders of magnitude slower).
//!
//! The trades are the real spot BTCUSDT/ETHUSDT captures, repeated with shifted
//! ids and times to `TICKPIPE_BENCH_PG_TRADES` (default 1,000,000).

use std::io::Write;
use std::process::Command;
use std::time::Instant;

use tickpipe_kafka::ensure_topics;
use tickpipe_schemas::{Record, Topic, Trade};
use tickpipe_testkit::{real, stack};
use tokio_postgres::NoTls;

mod common;

fn load(target: usize) -> Vec<Trade> {
    real::repeated_spot_trades(&stack::real_data_dir().join("binance_ws_raw_2024-08-08"), target)
}

/// ISO 8601 UTC text of microseconds since the epoch (days to civil date after
/// Howard Hinnant's `civil_from_days`).
fn iso(micros: i64) -> String {
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{frac:06}+00",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

fn csv_line(t: &Trade, out: &mut impl Write) -> std::io::Result<()> {
    let time = iso;
    writeln!(
        out,
        "{},{},{},{},{},{},{},,,{},{},{}",
        t.venue,
        t.symbol,
        t.kind.as_str(),
        t.trade_id,
        t.price,
        t.quantity,
        t.buyer_is_maker,
        t.source.as_str(),
        time(t.event_time),
        time(t.ingest_time)
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("TICKPIPE_BENCH_PG_TRADES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let python_n: usize = (n / 10).clamp(1, 100_000);
    let trades = load(n);
    let brokers = stack::kafka_brokers();
    let prefix = format!("{}.", stack::unique_name("bench_pg"));
    ensure_topics(&brokers, &prefix, &[Topic::Trades, Topic::DeadLetters], 3, 1)
        .await
        .expect("broker up");
    let topic = Topic::Trades.name(&prefix);

    common::preload(&brokers, &topic, &trades).await;

    // The sink, on the exactly-once path.
    let (sink_secs, url) = common::postgres_sink(&brokers, &prefix, &format!("{prefix}sink"), n).await;
    let (client, conn) = tokio_postgres::connect(&url, NoTls).await.expect("postgres");
    tokio::spawn(conn);
    let written: i64 = client
        .query_one("SELECT count(*) FROM trades", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(written as usize, n, "every trade written");
    let sink_rate = n as f64 / sink_secs;

    // Raw COPY of the same rows into an identical table.
    client
        .batch_execute(
            "CREATE TABLE trades_raw (LIKE trades INCLUDING ALL); CREATE TABLE trades_python (LIKE trades INCLUDING ALL)",
        )
        .await
        .expect("tables");
    let csv = std::env::temp_dir().join(format!("{}.csv", stack::unique_name("bench_pg")));
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&csv).expect("csv"));
        for t in &trades {
            csv_line(t, &mut f).expect("write csv");
        }
        f.flush().expect("flush csv");
    }
    let started = Instant::now();
    let status = Command::new("psql")
        .args([
            &url,
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            &format!(
                "\\copy trades_raw (venue, symbol, kind, trade_id, price, quantity, buyer_is_maker, \
                 first_trade_id, last_trade_id, source, event_time, ingest_time) FROM '{}' CSV",
                csv.display()
            ),
        ])
        .status()
        .expect("psql runs");
    let copy_secs = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&csv);
    assert!(status.success(), "psql \\copy failed");
    let copied: i64 = client
        .query_one("SELECT count(*) FROM trades_raw", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(copied as usize, n);
    let differ: i64 = client
        .query_one(
            "SELECT count(*) FROM (SELECT * FROM trades EXCEPT SELECT * FROM trades_raw) d",
            &[],
        )
        .await
        .expect("compare")
        .get(0);
    assert_eq!(differ, 0, "the sink's rows equal the raw copy's, value for value");
    let copy_rate = n as f64 / copy_secs;

    // The usual Python consumer, on a prefix.
    let python = Command::new("deploy/local/python-env.sh")
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("python-env.sh runs");
    assert!(python.status.success(), "python-env.sh failed");
    let python = String::from_utf8_lossy(&python.stdout).trim().to_owned();
    let out = Command::new(&python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/benches/baseline/pg_sink.py"))
        .args([
            &brokers,
            &topic,
            &format!("{prefix}python"),
            &url,
            &Trade::compiled().json,
            &python_n.to_string(),
        ])
        .output()
        .expect("python baseline runs");
    assert!(
        out.status.success(),
        "python baseline failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let python_rate: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("python prints rows/s");

    println!("postgres-sink into trades, {n} real-shaped trades preloaded in Kafka (exactly-once path):");
    println!("  postgres-sink           {sink_rate:>12.0} rows/s  ({sink_secs:.2} s, start-up included)");
    println!("  psql \\copy (raw limit)  {copy_rate:>12.0} rows/s  ({copy_secs:.2} s)");
    println!("  python baseline         {python_rate:>12.0} rows/s  (confluent-kafka + fastavro + psycopg executemany, {python_n} rows)");
    println!(
        "  ratio sink / raw COPY   {:>12.2}   (goal >= 0.5, moonshot 0.8)",
        sink_rate / copy_rate
    );
    println!(
        "  ratio sink / python     {:>12.1}x  (goal >= 10x)",
        sink_rate / python_rate
    );
}
