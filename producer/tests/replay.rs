//! Replay through the real broker: the recorded spot BTCUSDT WebSocket capture
//! arrives in `trades` field for field, every id once; malformed input of every
//! kind lands in `dead-letters` with its reason while the rest flows.

mod common;

use std::path::PathBuf;

use tickpipe_producer::config::Config;
use tickpipe_producer::metrics::Metrics;
use tickpipe_producer::service;
use tickpipe_schemas::{sha256_hex, Source, Trade};
use tickpipe_testkit::{real, stack};

fn replay_config(prefix: &str, files: Vec<PathBuf>) -> Config {
    let mut c = common::local_config("replay", prefix);
    c.kafka.partitions = 2;
    c.sources.replay.files = files;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_btcusdt_capture_arrives_field_for_field() {
    let Some(dir) = stack::real_data("binance_ws_raw_2024-08-08") else {
        return;
    };
    let files: Vec<PathBuf> = ["spot_btcusdt_20240808", "spot_btcusdt_20240809"]
        .iter()
        .map(|n| dir.join(format!("{n}.ts_json.txt.gz")))
        .collect();
    let expected: Vec<Trade> = files
        .iter()
        .flat_map(|f| real::ws_capture_trades(f, "binance"))
        .collect();
    assert_eq!(expected.len(), 19_904);
    // Every line is to be counted as received, the skipped depth and
    // bookTicker updates included.
    let lines: usize = files
        .iter()
        .map(|f| {
            let gz = flate2::read::MultiGzDecoder::new(std::fs::File::open(f).expect("capture"));
            std::io::BufRead::lines(std::io::BufReader::new(gz))
                .map(|l| l.expect("capture line"))
                .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
                .count()
        })
        .sum();
    let prefix = format!("{}.", stack::unique_name("replay"));
    let metrics = Metrics::new();
    service::run(replay_config(&prefix, files), metrics.clone(), std::future::pending())
        .await
        .expect("replay runs to the end");

    let brokers = stack::kafka_brokers();
    let mut got = common::trades(&brokers, &prefix);
    got.sort_by_key(|t| t.trade_id);
    assert_eq!(got.len(), expected.len(), "every trade exactly once");
    for (g, e) in got.iter().zip(&expected) {
        assert_eq!(g.source, Source::Replay);
        let g = Trade {
            ingest_time: 0,
            ..g.clone()
        };
        let e = Trade {
            ingest_time: 0,
            ..e.clone()
        };
        assert_eq!(g, e);
    }
    assert_eq!(common::total(&metrics.received), lines as u64, "lines received");
    // The capture's one REST depth snapshot is not a stream message.
    let dead = common::dead_letters(&brokers, &prefix);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].payload.starts_with(b"{\"lastUpdateId\""));
    assert!(dead[0].error.contains("neither a stream"), "{}", dead[0].error);
    assert_eq!(dead[0].stage, "parse");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_of_every_kind_is_dead_lettered_and_the_rest_flows() {
    let dir = std::env::temp_dir().join(stack::unique_name("replay-bad"));
    std::fs::create_dir_all(&dir).unwrap();
    let trade = |id: i64, p: &str, q: &str| {
        format!(
            r#"{{"stream":"btcusdt@trade","data":{{"e":"trade","E":1767225600101,"s":"BTCUSDT","t":{id},"p":"{p}","q":"{q}","T":1767225600100,"m":false,"M":true}}}}"#
        )
    };
    let capture = [
        trade(1, "68040.01", "0.5"),
        // Truncated JSON.
        r#"{"stream":"btcusdt@trade","data":{"e":"trade","#.to_owned(),
        trade(2, "68040.02", "0.5"),
        // Not a decimal.
        trade(3, "six", "0.5"),
        // Negative price.
        trade(4, "-1", "0.5"),
        // More digits than any exact decimal carries.
        trade(5, "1.00000000000000000000000000001", "0.5"),
        // A field missing.
        r#"{"stream":"btcusdt@trade","data":{"e":"trade","E":1,"s":"BTCUSDT","p":"1","q":"1","T":1767225600100,"m":false}}"#.to_owned(),
        // A time before 2009.
        r#"{"stream":"btcusdt@trade","data":{"e":"trade","E":1,"s":"BTCUSDT","t":6,"p":"1","q":"1","T":1000,"m":false}}"#.to_owned(),
        // A non-MARKET futures trade.
        r#"{"stream":"trxusdt@trade","data":{"e":"trade","E":1,"s":"TRXUSDT","t":7,"p":"0.0","q":"0.0","T":1767225600100,"m":false,"X":"NA"}}"#.to_owned(),
        // 2 MB of garbage: its dead letter keeps a prefix, the size and a digest.
        format!("{{\"stream\":\"{}", "x".repeat(2_000_000)),
        // A line longer than any line is buffered (16 MiB).
        "y".repeat(17 << 20),
        trade(8, "68040.03", "0.5"),
    ]
    .iter()
    .enumerate()
    .map(|(i, json)| format!("{} {json}\n", 1_767_225_600_000_000_000i64 + i as i64))
    .collect::<Vec<String>>();
    let garbage = capture[9].trim_end().split_once(' ').unwrap().1.as_bytes().to_vec();
    let overlong = capture[10].as_bytes().to_vec();
    let capture = capture.concat();
    let capture_path = dir.join("capture.txt");
    std::fs::write(&capture_path, capture).unwrap();
    // data.binance.vision aggTrades rows: valid, audited-invalid, short, bad boolean.
    let csv_path = dir.join("XRPETH-aggTrades-2019-10-11.csv");
    std::fs::write(
        &csv_path,
        "13519807,0.00141342,23.00000000,15373518,15373518,1570752011620,True,True\n\
         13519808,0,0,-1,-1,1570752011621,True,True\n\
         13519809,0.00141342\n\
         13519810,0.00141342,23.00000000,15373519,15373519,1570752011622,maybe,True\n\
         13519811,0.00141343,1.00000000,15373520,15373520,1570752011623,False,True\n",
    )
    .unwrap();
    let prefix = format!("{}.", stack::unique_name("replay_bad"));
    let metrics = Metrics::new();
    service::run(
        replay_config(&prefix, vec![capture_path, csv_path]),
        metrics.clone(),
        std::future::pending(),
    )
    .await
    .expect("replay runs to the end");

    let brokers = stack::kafka_brokers();
    let mut ids: Vec<(String, i64)> = common::trades(&brokers, &prefix)
        .into_iter()
        .map(|t| (t.symbol, t.trade_id))
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        vec![
            ("BTCUSDT".into(), 1),
            ("BTCUSDT".into(), 2),
            ("BTCUSDT".into(), 8),
            ("XRPETH".into(), 13519807),
            ("XRPETH".into(), 13519811)
        ]
    );
    let dead = common::dead_letters(&brokers, &prefix);
    let mut reasons: Vec<String> = dead.iter().map(|d| format!("{}: {}", d.stage, d.error)).collect();
    reasons.sort();
    let expect = [
        "not a Binance message",
        "p: \"six\"",
        "price must be positive",
        "is not an exact decimal",
        "without field \"t\"",
        "before 2009",
        "not a MARKET trade",
        "invalid audited aggregate trade",
        "expected 8",
        "is not a boolean",
        "[payload truncated to its first 262144 of 2000011 bytes; sha256 ",
        "a line of 17825813 bytes, longer than the 16777216 a line may be; kept its first 262144 bytes; sha256 ",
    ];
    assert_eq!(dead.len(), expect.len(), "{reasons:#?}");
    for e in expect {
        assert!(
            reasons.iter().any(|r| r.contains(e)),
            "no dead letter says {e:?}: {reasons:#?}"
        );
    }
    assert!(dead.iter().all(|d| !d.payload.is_empty() && d.component == "replay"));
    // The letters of the long inputs fit any broker, and say how to find and
    // check the original.
    let long = |what: &str| {
        dead.iter()
            .find(|d| d.error.contains(what))
            .unwrap_or_else(|| panic!("no letter says {what:?}"))
    };
    let g = long("of 2000011 bytes");
    assert_eq!(g.payload, garbage[..262_144]);
    assert!(g.error.contains(&sha256_hex(&garbage)), "{}", g.error);
    let o = long("a line of 17825813 bytes");
    assert_eq!(o.payload, overlong[..262_144]);
    assert!(o.error.contains(&sha256_hex(&overlong)), "{}", o.error);
    assert_eq!(common::total(&metrics.rejected), expect.len() as u64);
    // Each letter also carries the Kafka Connect dead-letter headers.
    let consumer: rdkafka::consumer::BaseConsumer = tickpipe_testkit::kafka::reader_config(&brokers)
        .set("group.id", stack::unique_name("letters"))
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    rdkafka::consumer::Consumer::subscribe(&consumer, &[&format!("{prefix}dead-letters")]).expect("subscribe");
    let mut seen = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while seen < dead.len() {
        assert!(std::time::Instant::now() < deadline, "{seen} letters read");
        let Some(Ok(m)) = consumer.poll(std::time::Duration::from_millis(200)) else {
            continue;
        };
        let headers = tickpipe_testkit::kafka::headers(&m);
        let stage = headers.get("__connect.errors.stage").map(String::as_str);
        assert!(matches!(stage, Some("TASK_POLL" | "TRANSFORMATION")), "{headers:?}");
        assert_eq!(
            headers.get("__connect.errors.connector.name").map(String::as_str),
            Some("replay")
        );
        assert!(headers.contains_key("__connect.errors.exception.message"));
        seen += 1;
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A replay that outlasts `--max-ahead-ms` (here 20 ms, against 60,000 lines
/// that take longer than that) publishes every trade: each batch is judged
/// against the clock of its own reading, not of the replay's start (once,
/// every record read after the first 10 s of a replay was a dead letter).
#[test]
fn a_replay_longer_than_the_max_ahead_bound_publishes_every_trade() {
    let dir = std::env::temp_dir().join(stack::unique_name("replay-long"));
    std::fs::create_dir_all(&dir).expect("replay folder");
    let csv = dir.join("BTCUSDT-trades-2024-08-08.csv");
    let n = 60_000i64;
    let mut text = String::new();
    for id in 1..=n {
        text.push_str(&format!(
            "{id},{}.{:02},0.001,0,{},False,True\n",
            61_000 + id % 97,
            id % 100,
            1_723_075_200_000i64 + id
        ));
    }
    std::fs::write(&csv, text).expect("csv");
    let prefix = format!("{}.", stack::unique_name("replay_long"));
    let started = std::time::Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_producer"))
        .args(["--metrics-addr", "off", "replay"])
        .arg(&csv)
        .args(["--topic-prefix", &prefix, "--partitions", "1", "--max-ahead-ms", "20"])
        .env("TICKPIPE_KAFKA_BROKERS", stack::kafka_brokers())
        .env("RUST_LOG", "warn")
        .output()
        .expect("producer binary");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        started.elapsed() > std::time::Duration::from_millis(20),
        "the replay must outlast the bound"
    );
    let brokers = stack::kafka_brokers();
    let dead = common::dead_letters(&brokers, &prefix);
    assert!(
        dead.is_empty(),
        "{} dead letters, the first: {:?}",
        dead.len(),
        dead.first().map(|d| &d.error)
    );
    assert_eq!(common::trades(&brokers, &prefix).len(), n as usize);
}
