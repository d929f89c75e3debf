//! `producer backfill` against a local Binance REST server serving real daily
//! BTCUSDT klines: pages of 1,000, Retry-After honoured, a rerun publishes
//! nothing twice, a 451 is a clear error, outages are reported as gaps, and
//! the daily mode repeats a run that Binance failed.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use tickpipe_producer::config::Config;
use tickpipe_producer::metrics::Metrics;
use tickpipe_producer::service;
use tickpipe_producer::sources::binance::backfill::BackfillJob;
use tickpipe_schemas::{Candle, CandleOrigin};
use tickpipe_testkit::exchange::{BinanceScript, FakeBinance, RestFault};
use tickpipe_testkit::{kafka, stack};

/// A REST kline row (12 values, as `/api/v3/klines` answers) from a CSV row's
/// open time (ms), open/high/low/close/volume and the interval's length (ms);
/// the CSV files have no quote volume, count or taker volumes.
fn rest_kline(open: i64, ohlcv: &[&str], length_ms: i64) -> serde_json::Value {
    serde_json::json!([
        open,
        ohlcv[0],
        ohlcv[1],
        ohlcv[2],
        ohlcv[3],
        ohlcv[4],
        open + length_ms - 1,
        "0",
        0,
        "0",
        "0",
        "0"
    ])
}

/// The reliable rows (up to 2022-03-21, see the data README) as REST kline rows.
fn klines() -> Option<Vec<serde_json::Value>> {
    let dir = stack::real_data("binance_spot_klines_multiyear")?;
    let text = std::fs::read_to_string(dir.join("BTCUSDT_1d.csv")).expect("klines file");
    let cutoff = 1_647_820_800_000i64; // 2022-03-21
    Some(
        text.lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                let open: i64 = f[6].parse().expect("open time");
                (open <= cutoff).then(|| rest_kline(open, &f[1..6], 86_400_000))
            })
            .collect(),
    )
}

/// A fake serving `rows` as BTCUSDT's `interval` klines, with `rest_faults`.
fn serving(interval: &str, rows: Vec<serde_json::Value>, rest_faults: Vec<RestFault>) -> BinanceScript {
    BinanceScript {
        rest_faults,
        klines: BTreeMap::from([(("BTCUSDT".to_owned(), interval.to_owned()), rows)]),
        ..BinanceScript::default()
    }
}

fn setup(prefix: &str, fake: &FakeBinance) -> (Config, BackfillJob) {
    let mut c = Config::default();
    c.producer.metrics_addr = "off".into();
    c.kafka.brokers = stack::kafka_brokers();
    c.kafka.topic_prefix = prefix.into();
    c.kafka.partitions = 1;
    c.sources.binance.rest_url = fake.rest_url();
    let job = BackfillJob {
        symbols: vec!["btcusdt".into()],
        intervals: vec!["1d".into()],
        since: Duration::from_secs(10 * 366 * 86_400),
        state_dir: std::env::temp_dir().join(prefix.trim_end_matches('.')),
        every: None,
    };
    (c, job)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_in_pages_resumes_without_repeating() {
    let Some(rows) = klines() else { return };
    let n = rows.len();
    assert!(n > 1000, "needs more than one page");
    let too_many = RestFault::TooMany {
        path: "/api/v3/klines".into(),
        times: 1,
        retry_after_secs: 1,
    };
    let script = serving("1d", rows, vec![too_many]);
    let fake = FakeBinance::start(script).await;
    let prefix = format!("{}.", stack::unique_name("backfill"));
    let (config, job) = setup(&prefix, &fake);
    let published = service::run_backfill(config.clone(), job.clone(), Metrics::new(), std::future::pending())
        .await
        .expect("backfill");
    assert_eq!(published as usize, n);
    // A rerun starts at the checkpoint: nothing new, nothing twice.
    let again = service::run_backfill(config, job.clone(), Metrics::new(), std::future::pending())
        .await
        .expect("rerun");
    assert_eq!(again, 0);

    let candles: Vec<Candle> = common::decode(&kafka::read_topic(&stack::kafka_brokers(), &format!("{prefix}candles")));
    assert_eq!(candles.len(), n);
    let first = candles.iter().min_by_key(|c| c.open_time).expect("candles");
    // Binance's first BTCUSDT daily candle, exactly.
    assert_eq!(
        (
            first.open.to_string(),
            first.high.to_string(),
            first.low.to_string(),
            first.close.to_string()
        ),
        ("4261.48".into(), "4485.39".into(), "4200.74".into(), "4285.08".into())
    );
    assert!(candles
        .iter()
        .all(|c| c.origin == CandleOrigin::ExchangeKline && c.interval == "1d" && c.closed));
    let log = fake.rest_log();
    let calls: Vec<_> = log.iter().filter(|r| r.path == "/api/v3/klines").collect();
    assert!(calls.len() >= 3, "two pages after a 429, then the rerun");
    assert!(
        calls[1].at.duration_since(calls[0].at) >= Duration::from_millis(950),
        "Retry-After honoured"
    );
    std::fs::remove_dir_all(&job.state_dir).ok();
}

#[tokio::test]
async fn a_restricted_location_is_a_clear_error() {
    let script = BinanceScript {
        rest_faults: vec![RestFault::Status {
            path: "/api/v3/klines".into(),
            status: 451,
            body: r#"{"code":0,"msg":"Service unavailable from a restricted location according to 'b. Eligibility' in https://www.binance.com/en/terms."}"#.into(),
        }],
        ..BinanceScript::default()
    };
    let fake = FakeBinance::start(script).await;
    let prefix = format!("{}.", stack::unique_name("backfill451"));
    let (config, mut job) = setup(&prefix, &fake);
    // Final in the daily mode too: no retry can fix it.
    for every in [None, Some(Duration::from_secs(24 * 3600))] {
        job.every = every;
        let err = service::run_backfill(config.clone(), job.clone(), Metrics::new(), std::future::pending())
            .await
            .expect_err("451 is final");
        assert!(err.to_string().contains("HTTP 451"), "{err}");
        assert!(err.to_string().contains("TICKPIPE_BINANCE_REST_URL"), "{err}");
    }
    std::fs::remove_dir_all(&job.state_dir).ok();
}

/// The BTCUSDT hourly rows (2021-04-04 to 2023-12-30) as REST kline rows. The
/// data's README counts five real Binance outages of 2 to 5 hours in them.
fn hourly_klines() -> Option<Vec<serde_json::Value>> {
    let dir = stack::real_data("binance_spot_klines_multiyear")?;
    let text = std::fs::read_to_string(dir.join("BTCUSDT_1h_2021-04-04_2023-12-30.csv")).expect("hourly klines");
    Some(
        text.lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                let open = chrono::NaiveDateTime::parse_from_str(f[0], "%Y-%m-%d %H:%M:%S")
                    .expect("open time")
                    .and_utc()
                    .timestamp_millis();
                rest_kline(open, &f[1..6], 3_600_000)
            })
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outages_are_reported_as_gaps_across_runs_and_never_filled() {
    let Some(rows) = hourly_klines() else { return };
    let open = |r: &serde_json::Value| r[0].as_i64().expect("open time");
    // The first run's history ends just before the first outage, so the second
    // run meets that outage right at the checkpoint.
    let cut = (1..rows.len())
        .find(|&i| open(&rows[i]) - open(&rows[i - 1]) > 3_600_000)
        .expect("an outage in the data");
    let serve = |rows: &[serde_json::Value]| serving("1h", rows.to_vec(), Vec::new());
    let prefix = format!("{}.", stack::unique_name("backfill_gaps"));
    let first = FakeBinance::start(serve(&rows[..cut])).await;
    let (mut config, mut job) = setup(&prefix, &first);
    job.intervals = vec!["1h".into()];
    let gaps = |m: &Metrics| m.kline_gaps.with_label_values(&["BTCUSDT", "1h"]).get();
    let newest = |m: &Metrics| m.kline_newest.with_label_values(&["BTCUSDT", "1h"]).get();

    let before = Metrics::new();
    let n1 = service::run_backfill(config.clone(), job.clone(), before.clone(), std::future::pending())
        .await
        .expect("first run");
    assert_eq!((n1 as usize, gaps(&before)), (cut, 0));
    assert_eq!(newest(&before), (open(&rows[cut - 1]) + 3_599_999) as f64 / 1e3);

    let second = FakeBinance::start(serve(&rows)).await;
    config.sources.binance.rest_url = second.rest_url();
    let after = Metrics::new();
    let n2 = service::run_backfill(config, job.clone(), after.clone(), std::future::pending())
        .await
        .expect("second run");
    assert_eq!(n1 as usize + n2 as usize, rows.len(), "every kline once");
    assert_eq!(gaps(&after), 5, "the five outages, the first at the checkpoint");
    let last = rows.last().expect("rows");
    assert_eq!(newest(&after), (open(last) + 3_599_999) as f64 / 1e3);
    // As Prometheus sees them (names and labels as in docs/metrics.md).
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&after.registry.gather())
        .expect("metrics text");
    for line in [
        r#"tickpipe_producer_kline_gaps_total{interval="1h",symbol="BTCUSDT"} 5"#,
        r#"tickpipe_producer_kline_newest_close_timestamp_seconds{interval="1h",symbol="BTCUSDT"} 1703966399.999"#,
    ] {
        assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
    }

    // Nothing invented: the topic holds exactly the exchange's klines.
    let candles: Vec<Candle> = common::decode(&kafka::read_topic(&stack::kafka_brokers(), &format!("{prefix}candles")));
    let opens: std::collections::BTreeSet<i64> = candles.iter().map(|c| c.open_time / 1000).collect();
    let want: std::collections::BTreeSet<i64> = rows.iter().map(open).collect();
    assert_eq!((candles.len(), opens), (rows.len(), want));
    std::fs::remove_dir_all(&job.state_dir).ok();
}

/// A Binance answer for each attempt of one call (see `BinanceRest`).
const ATTEMPTS: u32 = 8;

/// Klines served with an outage that starts after `after` answers.
fn with_outage(rows: &[serde_json::Value], after: u32, times: u32) -> BinanceScript {
    let outage = RestFault::Outage {
        path: "/api/v3/klines".into(),
        after,
        times,
    };
    serving("1d", rows.to_vec(), vec![outage])
}

/// An outage longer than a call's retries, after the first page: a single run
/// stops with the error, while the daily mode (`--every`) counts the failure
/// and repeats the run from the checkpoint until the history is complete, each
/// kline once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_ends_a_single_run_and_the_daily_mode_repeats_it() {
    let Some(rows) = klines() else { return };
    let n = rows.len();
    assert!(n > 1000, "needs two pages");
    let prefix = format!("{}.", stack::unique_name("backfill_outage"));

    let single = FakeBinance::start(with_outage(&rows, 1, ATTEMPTS)).await;
    let (mut config, mut job) = setup(&prefix, &single);
    config.sources.binance.max_backoff_ms = 20;
    let metrics = Metrics::new();
    let err = service::run_backfill(config.clone(), job.clone(), metrics.clone(), std::future::pending())
        .await
        .expect_err("a single run cannot wait for the next day");
    assert!(err.to_string().contains("failed 8 times"), "{err}");
    assert_eq!(single.rest_log().len() as u32, 1 + ATTEMPTS);
    let failures = |m: &Metrics| m.backfill_failures.with_label_values(&["BTCUSDT", "1d"]).get();
    assert_eq!(failures(&metrics), 0, "a single run counts no repeats");

    // The daily job resumes after the first page, right into the outage.
    let daily = FakeBinance::start(with_outage(&rows, 0, ATTEMPTS)).await;
    config.sources.binance.rest_url = daily.rest_url();
    job.every = Some(Duration::from_secs(24 * 3600));
    let metrics = Metrics::new();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(service::run_backfill(config, job.clone(), metrics.clone(), async {
        stop_rx.await.ok();
    }));
    let last_close = (rows.last().and_then(|r| r[0].as_i64()).expect("open time") + 86_399_999) as f64 / 1e3;
    let newest = || metrics.kline_newest.with_label_values(&["BTCUSDT", "1d"]).get();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while newest() != last_close {
        if running.is_finished() {
            panic!("the daily job ended during the outage: {:?}", running.await);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the daily job did not complete the history within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_tx.send(()).expect("the job is running");
    let published = running.await.expect("join").expect("the daily job stops cleanly");
    assert_eq!(published as usize, n - 1000, "all but the single run's first page");
    assert_eq!(failures(&metrics), 1);
    let candles: Vec<Candle> = common::decode(&kafka::read_topic(&stack::kafka_brokers(), &format!("{prefix}candles")));
    let opens: std::collections::BTreeSet<i64> = candles.iter().map(|c| c.open_time).collect();
    assert_eq!((candles.len(), opens.len()), (n, n), "every kline once");
    std::fs::remove_dir_all(&job.state_dir).ok();
}

/// A stop while Binance keeps failing ends the daily job cleanly (the service
/// then exits 0) instead of with the interrupted call's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_an_outage_is_a_clean_stop() {
    let Some(rows) = klines() else { return };
    let fake = FakeBinance::start(with_outage(&rows, 0, u32::MAX)).await;
    let prefix = format!("{}.", stack::unique_name("backfill_stop"));
    let (mut config, mut job) = setup(&prefix, &fake);
    config.sources.binance.max_backoff_ms = 20;
    job.every = Some(Duration::from_secs(24 * 3600));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(service::run_backfill(config, job.clone(), Metrics::new(), async {
        stop_rx.await.ok();
    }));
    // Past one failed run, into the retries of the next.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while (fake.rest_log().len() as u32) < ATTEMPTS + 2 {
        assert!(!running.is_finished(), "the daily job ended during the outage");
        assert!(tokio::time::Instant::now() < deadline, "no retries within 30 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop_tx.send(()).expect("the job is running");
    let published = running.await.expect("join").expect("a stop is not an error");
    assert_eq!(published, 0);
    std::fs::remove_dir_all(&job.state_dir).ok();
}

/// A page Kafka refuses for good (after the producer's own retries) is not
/// checkpointed: the run ends with the error, and the next run publishes the
/// page again, so every kline reaches the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_kafka_refuses_is_published_again_not_skipped() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    use tickpipe_schemas::Topic;

    let Some(rows) = klines() else { return };
    let n = rows.len();
    let fake = FakeBinance::start(serving("1d", rows, Vec::new())).await;
    let cluster = MockCluster::new(1).expect("mock cluster");
    let prefix = format!("{}.", stack::unique_name("backfill_refused"));
    for t in Topic::ALL {
        cluster.create_topic(&t.name(&prefix), 1, 1).expect("topic");
    }
    let (mut config, job) = setup(&prefix, &fake);
    config.kafka.brokers = cluster.bootstrap_servers();
    config.producer.create_topics = false;
    // The first produce request is refused as too large: a permanent error.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
    );
    let metrics = Metrics::new();
    let err = service::run_backfill(config.clone(), job.clone(), metrics.clone(), std::future::pending())
        .await
        .expect_err("a refused page ends the run");
    assert!(err.to_string().contains("the checkpoint stays before it"), "{err}");
    assert!(common::total(&metrics.delivery_failures) > 0);

    let again = service::run_backfill(config.clone(), job.clone(), Metrics::new(), std::future::pending())
        .await
        .expect("the rerun");
    assert_eq!(again as usize, n, "the rerun starts before the refused page");
    let candles: Vec<Candle> = common::decode(&kafka::read_topic(
        &cluster.bootstrap_servers(),
        &format!("{prefix}candles"),
    ));
    let distinct: std::collections::BTreeSet<i64> = candles.iter().map(|c| c.open_time).collect();
    assert_eq!(distinct.len(), n, "every kline reached the topic");
    std::fs::remove_dir_all(&job.state_dir).ok();
}
