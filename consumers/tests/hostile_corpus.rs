//! The hostile corpus: the producer and the three consumers run as processes
//! on the local stack while bad records of 28 kinds (24 on the topics, 4 in
//! the producer's input) are interleaved with 100,000 good trades and good records of every other entity, and each
//! consumer is killed with SIGKILL three times meanwhile. Afterwards every
//! good record is in PostgreSQL and BigQuery exactly once, the candles equal
//! the pure builder's over the good trades, every bad record is exactly one
//! dead letter with a reason from each consumer that reads its topic, and
//! every service is ready.

mod common;

use common::{bq_count, pg_count as count, quiet_service, Fresh};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use tickpipe_consumers::bq::client::{Auth, BigQuery, Endpoint};
use tickpipe_consumers::candles::{CandleBuilder, CandleConfig, Output};
use tickpipe_consumers::ops::now_micros;
use tickpipe_kafka::producer_config;
use tickpipe_schemas::decimal::put_unscaled;
use tickpipe_schemas::field::AvroField;
use tickpipe_schemas::{
    Asset, Candle, CandleOrigin, Codec, DeadLetter, Decimal, Exchange, Market, Price, Rate, RateType, Record, Source,
    Topic, Trade, TradeKind, WriteFraming,
};
use tickpipe_testkit::stack;
use tokio_postgres::{Client, NoTls};

const SYMBOLS: usize = 20;
/// The sinks' group session: how long the broker keeps a killed member.
const SESSION_TIMEOUT: Duration = Duration::from_secs(6);
/// Good trades the test publishes itself; the producer replays `REPLAYED` more.
const PUBLISHED: usize = 90_000;
const REPLAYED: usize = 10_000;

/// A service process, killed if the test fails before it stops it.
struct Service {
    name: &'static str,
    child: Child,
    metrics: SocketAddr,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Setup {
    prefix: String,
    url: String,
    dataset: String,
}

impl Setup {
    fn start(&self, name: &'static str) -> Service {
        let metrics = stack::free_loopback_addr();
        let log = std::env::temp_dir().join(format!("{}.log", stack::unique_name(name)));
        let log = std::fs::File::create(log).expect("log file");
        let mut cmd = quiet_service(stack::workspace_binary(name), &stack::kafka_brokers(), &self.prefix);
        cmd.stderr(log);
        // The variables of `name`'s flags start with `var`; its group ends in `group`.
        let (var, group, batch_max, batch_wait_ms) = match name {
            "candles" => ("TICKPIPE_CANDLES", "candles", "2000", "20"),
            "postgres-sink" => ("TICKPIPE_POSTGRES_SINK", "pg", "2000", "20"),
            "bigquery-sink" => ("TICKPIPE_BIGQUERY_SINK", "bq", "5000", "50"),
            other => panic!("no service {other}"),
        };
        cmd.env(format!("{var}_GROUP"), format!("{}{group}", self.prefix))
            .env(format!("{var}_BATCH_MAX"), batch_max)
            .env(format!("{var}_BATCH_WAIT_MS"), batch_wait_ms)
            .env(format!("{var}_METRICS_ADDR"), metrics.to_string());
        if name == "candles" {
            cmd.env("TICKPIPE_CANDLES_INTERVALS", "1m,5m")
                .env("TICKPIPE_CANDLES_ALLOWED_LATENESS_MS", "0")
                .env("TICKPIPE_CANDLES_STATE_INTERVAL_MS", "300")
                // Restarted at once after a kill: the same id takes the lease back.
                .env("TICKPIPE_CANDLES_INSTANCE_ID", "hostile");
        } else {
            cmd.env(
                format!("{var}_SESSION_TIMEOUT_MS"),
                SESSION_TIMEOUT.as_millis().to_string(),
            );
        }
        if name == "postgres-sink" {
            cmd.env("TICKPIPE_POSTGRES_URL", &self.url);
        } else if name == "bigquery-sink" {
            cmd.env("TICKPIPE_BIGQUERY_EMULATOR", stack::bigquery_rest_url())
                .env("TICKPIPE_BIGQUERY_PROJECT", stack::bigquery_project())
                .env("TICKPIPE_BIGQUERY_DATASET", &self.dataset);
        }
        Service {
            name,
            child: cmd.spawn().unwrap_or_else(|e| panic!("{name} starts: {e}")),
            metrics,
        }
    }
}

/// How far a consumer got: trades counted by this `candles` process, or
/// trades in the sink's store.
async fn progress(s: &Service, pg: &Client, bq: &BigQuery, dataset: &str) -> i64 {
    match s.name {
        "candles" => candles_in(s.metrics).await,
        "postgres-sink" => count(pg, "SELECT count(*) FROM trades").await,
        _ => {
            bq_count(
                bq,
                &format!("SELECT COUNT(*) FROM `{}.{dataset}.trades`", stack::bigquery_project()),
            )
            .await
        }
    }
}

/// `tickpipe_candles_trades_in_total` of a running `candles`, 0 until it answers.
async fn candles_in(addr: SocketAddr) -> i64 {
    let Ok(r) = reqwest::get(format!("http://{addr}/metrics")).await else {
        return 0;
    };
    let page = r.text().await.unwrap_or_default();
    page.lines()
        .find_map(|l| l.strip_prefix("tickpipe_candles_trades_in_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

async fn ready(addr: SocketAddr) -> bool {
    reqwest::get(format!("http://{addr}/readyz"))
        .await
        .is_ok_and(|r| r.status().is_success())
}

fn dec(s: &str) -> Decimal {
    s.parse().expect("decimal")
}

fn symbol(s: usize) -> String {
    format!("H{s:02}USDT")
}

/// The good trades: `SYMBOLS` symbols with consecutive ids, 30 ms apart in
/// event time per symbol (a few minutes, so that windows close), from `t0`
/// (a whole millisecond, as Binance's times are).
fn good_trades(t0: i64, n: usize) -> Vec<Trade> {
    (0..n)
        .map(|i| {
            let s = i % SYMBOLS;
            let k = (i / SYMBOLS) as i64;
            Trade {
                venue: "binance".into(),
                symbol: symbol(s),
                kind: TradeKind::Trade,
                trade_id: k,
                price: Decimal::new(10_000 + (k * 7 + s as i64) % 500, 2),
                quantity: Decimal::new(1 + k % 9, 3),
                buyer_is_maker: k % 2 == 0,
                first_trade_id: None,
                last_trade_id: None,
                source: Source::Replay,
                event_time: t0 + k * 30_000,
                ingest_time: t0,
            }
        })
        .collect()
}

/// A trade as a line of a WebSocket capture, as the producer replays it.
fn capture_line(n: usize, t: &Trade) -> String {
    format!(
        "{} {{\"stream\":\"{}@trade\",\"data\":{{\"e\":\"trade\",\"E\":{},\"s\":\"{}\",\"t\":{},\"p\":\"{}\",\"q\":\"{}\",\"T\":{},\"m\":{},\"M\":true}}}}\n",
        1_767_225_600_000_000_000_i64 + n as i64,
        t.symbol.to_lowercase(),
        t.event_time / 1000,
        t.symbol,
        t.trade_id,
        t.price,
        t.quantity,
        t.event_time / 1000,
        t.buyer_is_maker
    )
}

/// A trade body whose price has 38 digits: valid Avro decimal(38, 18), more
/// than the 28 digits carried exactly.
fn overflowing_trade(codec: &Codec, t: &Trade) -> Vec<u8> {
    let mut out = codec.encode(t).expect("encode")[..10].to_vec();
    t.venue.write(&mut out).expect("venue");
    t.symbol.write(&mut out).expect("symbol");
    0i32.write(&mut out).expect("kind");
    t.trade_id.write(&mut out).expect("id");
    put_unscaled(&mut out, 12_345_678_901_234_567_890_123_456_789_012_345_678);
    t.quantity.write(&mut out).expect("quantity");
    t.buyer_is_maker.write(&mut out).expect("maker");
    t.first_trade_id.write(&mut out).expect("first");
    t.last_trade_id.write(&mut out).expect("last");
    2i32.write(&mut out).expect("source");
    t.event_time.write(&mut out).expect("event");
    t.ingest_time.write(&mut out).expect("ingest");
    out
}

/// Good records of every other entity topic, each with a distinct identity.
struct Others {
    assets: Vec<Asset>,
    rates: Vec<Rate>,
    exchanges: Vec<Exchange>,
    markets: Vec<Market>,
    prices: Vec<Price>,
    klines: Vec<Candle>,
    letters: Vec<DeadLetter>,
}

fn others(t0: i64) -> Others {
    let asset = |i: usize| Asset {
        id: format!("asset-{i}"),
        rank: i as i32 + 1,
        symbol: format!("A{i}"),
        name: format!("Asset {i}"),
        supply: dec("1000000"),
        max_supply: None,
        market_cap_usd: Some(dec("123456789.5")),
        volume_usd_24h: None,
        price_usd: Decimal::new(100 + i as i64, 2),
        change_percent_24h: Some(dec("-1.25")),
        vwap_24h: None,
        explorer: None,
        tokens: BTreeMap::new(),
        source: Source::Coincap,
        event_time: t0,
        ingest_time: t0,
    };
    let kline = |i: usize| {
        let open_time = (t0 - 86_400_000_000) / 60_000_000 * 60_000_000 + i as i64 * 60_000_000;
        Candle {
            venue: "binance".into(),
            symbol: "KLINEUSDT".into(),
            interval: "1m".into(),
            origin: CandleOrigin::ExchangeKline,
            open_time,
            close_time: open_time + 59_999_000,
            open: dec("10"),
            high: dec("12"),
            low: dec("9"),
            close: dec("11"),
            volume: dec("5"),
            quote_volume: dec("52.5"),
            trade_count: 7,
            taker_buy_base_volume: dec("2"),
            taker_buy_quote_volume: dec("21"),
            first_trade_id: Some(i as i64 * 7),
            last_trade_id: Some(i as i64 * 7 + 6),
            closed: true,
            source: Source::Binance,
            event_time: open_time + 60_000_000,
            ingest_time: t0,
        }
    };
    Others {
        assets: (0..100).map(asset).collect(),
        rates: (0..50_usize)
            .map(|i| Rate {
                id: format!("rate-{i}"),
                symbol: format!("R{i}"),
                currency_symbol: None,
                rate_type: RateType::Fiat,
                rate_usd: Decimal::new(1 + i as i64, 1),
                source: Source::Coincap,
                event_time: t0,
                ingest_time: t0,
            })
            .collect(),
        exchanges: (0..50_usize)
            .map(|i| Exchange {
                exchange_id: format!("exchange-{i}"),
                name: format!("Exchange {i}"),
                rank: i as i32 + 1,
                percent_total_volume: Some(dec("1.5")),
                volume_usd: None,
                trading_pairs: 10,
                socket: Some(true),
                exchange_url: None,
                source: Source::Coincap,
                event_time: t0,
                ingest_time: t0,
            })
            .collect(),
        markets: (0..50_usize)
            .map(|i| Market {
                exchange_id: "binance".into(),
                rank: i as i32 + 1,
                base_symbol: format!("B{i}"),
                base_id: format!("base-{i}"),
                quote_symbol: "USDT".into(),
                quote_id: "tether".into(),
                price_quote: dec("2.5"),
                price_usd: dec("2.5"),
                volume_usd_24h: None,
                percent_exchange_volume: None,
                trades_count_24h: Some(3),
                source: Source::Coincap,
                event_time: t0,
                ingest_time: t0,
            })
            .collect(),
        prices: (0..500)
            .map(|i| Price {
                asset_id: format!("asset-{}", i % 100),
                price_usd: Decimal::new(1000 + i as i64, 2),
                source: Source::Coincap,
                event_time: t0 - 1_000_000 * i as i64,
                ingest_time: t0,
            })
            .collect(),
        klines: (0..200).map(kline).collect(),
        letters: (0..20)
            .map(|i| DeadLetter {
                stage: "parse".into(),
                error: format!("another writer's reject {i}"),
                component: "elsewhere".into(),
                topic: None,
                partition: None,
                offset: None,
                key: None,
                payload: vec![i as u8; 3],
                source: Source::Unknown,
                event_time: t0,
                ingest_time: t0,
            })
            .collect(),
    }
}

/// The bad records, by topic: 24 kinds, each named.
fn bad_records(codec: &Codec, t0: i64) -> Vec<(&'static str, Topic, Option<Vec<u8>>)> {
    let trade = good_trades(t0, 1).remove(0);
    let with = |f: &dyn Fn(&mut Trade)| {
        let mut t = trade.clone();
        t.trade_id = 900_000_000;
        f(&mut t);
        Some(codec.encode(&t).expect("encode"))
    };
    let encoded_trade = codec.encode(&trade).expect("encode");
    let mut unknown_id = vec![0u8, 0, 0, 0x03, 0xe7];
    unknown_id.extend_from_slice(&encoded_trade[10..]);
    let mut unknown_fingerprint = encoded_trade.clone();
    unknown_fingerprint[2..10].copy_from_slice(&[0xAB; 8]);
    let o = others(t0);
    let candle = |f: &dyn Fn(&mut Candle)| {
        let mut c = o.klines[0].clone();
        c.symbol = "BADUSDT".into();
        f(&mut c);
        Some(codec.encode(&c).expect("encode"))
    };
    let mut letter = o.letters[0].clone();
    letter.event_time = i64::MAX;
    vec![
        ("not Avro at all", Topic::Trades, Some(b"not avro at all".to_vec())),
        ("an empty payload", Topic::Trades, Some(Vec::new())),
        ("no payload (a tombstone)", Topic::Trades, None),
        (
            "a truncated body",
            Topic::Trades,
            Some(encoded_trade[..encoded_trade.len() - 5].to_vec()),
        ),
        ("an unknown fingerprint", Topic::Trades, Some(unknown_fingerprint)),
        ("a registry id without a registry", Topic::Trades, Some(unknown_id)),
        (
            "another entity's record",
            Topic::Trades,
            Some(codec.encode(&o.assets[0]).expect("encode")),
        ),
        ("900 kB of garbage", Topic::Trades, Some(vec![0xC3; 900_000])),
        ("a negative price", Topic::Trades, with(&|t| t.price = dec("-1"))),
        (
            "a time at the end of i64",
            Topic::Trades,
            with(&|t| t.event_time = i64::MAX),
        ),
        ("a time before 2009", Topic::Trades, with(&|t| t.event_time = 1_000)),
        (
            "a 300-byte symbol",
            Topic::Trades,
            with(&|t| t.symbol = "S".repeat(300)),
        ),
        ("an empty venue", Topic::Trades, with(&|t| t.venue = " ".into())),
        (
            "a 38-digit price",
            Topic::Trades,
            Some(overflowing_trade(codec, &trade)),
        ),
        (
            "an interval of 2^58 seconds",
            Topic::Candles,
            candle(&|c| c.interval = "288230376151711744s".into()),
        ),
        ("open above high", Topic::Candles, candle(&|c| c.open = dec("13"))),
        (
            "close time before open time",
            Topic::Candles,
            candle(&|c| c.close_time = c.open_time - 1),
        ),
        (
            "an unknown interval",
            Topic::Candles,
            candle(&|c| c.interval = "7x".into()),
        ),
        ("an asset ranked 0", Topic::Assets, {
            let mut a = o.assets[0].clone();
            a.rank = 0;
            Some(codec.encode(&a).expect("encode"))
        }),
        ("a rate of 0", Topic::Rates, {
            let mut r = o.rates[0].clone();
            r.rate_usd = Decimal::ZERO;
            Some(codec.encode(&r).expect("encode"))
        }),
        ("negative trading pairs", Topic::Exchanges, {
            let mut e = o.exchanges[0].clone();
            e.trading_pairs = -1;
            Some(codec.encode(&e).expect("encode"))
        }),
        ("a market without an exchange", Topic::Markets, {
            let mut m = o.markets[0].clone();
            m.exchange_id = String::new();
            Some(codec.encode(&m).expect("encode"))
        }),
        ("a negative price update", Topic::Prices, {
            let mut p = o.prices[0].clone();
            p.price_usd = dec("-3");
            Some(codec.encode(&p).expect("encode"))
        }),
        (
            "a dead letter from the year 292 million",
            Topic::DeadLetters,
            Some(codec.encode(&letter).expect("encode")),
        ),
    ]
}

/// The replayed capture: `REPLAYED` good trades and the producer's own bad
/// kinds among them. Returns the file and how many bad lines it holds.
fn replay_file(trades: &[Trade]) -> (PathBuf, usize) {
    let bad = [
        "{\"stream\":\"h00usdt@trade\",\"data\":{\"e\":\"trade\",".to_owned(),
        "{\"stream\":\"h00usdt@trade\",\"data\":{\"e\":\"trade\",\"E\":1,\"s\":\"H00USDT\",\"t\":1,\"p\":\"six\",\"q\":\"1\",\"T\":1767225600100,\"m\":false}}".to_owned(),
        format!("{{\"stream\":\"{}", "x".repeat(2_000_000)),
        "y".repeat(17 << 20),
    ];
    let mut text = String::new();
    for (n, t) in trades.iter().enumerate() {
        if n % 2_500 == 1_000 {
            let b = &bad[(n / 2_500) % bad.len()];
            text.push_str(&format!("{} {b}\n", 1_767_225_600_000_000_000_i64 + n as i64));
        }
        text.push_str(&capture_line(n, t));
    }
    let path = std::env::temp_dir().join(format!("{}.txt", stack::unique_name("hostile-capture")));
    std::fs::write(&path, text).expect("capture file");
    (path, trades.len().div_ceil(2_500).min(4))
}

/// Records as keys and payloads (`None`: a tombstone).
type Keyed = Vec<(String, Option<Vec<u8>>)>;

fn keyed<R: Record>(codec: &Codec, records: &[R]) -> Keyed {
    records
        .iter()
        .map(|r| (r.key(), Some(codec.encode(r).expect("encode"))))
        .collect()
}

async fn publish(producer: &FutureProducer, topic: &str, records: &[(String, Option<Vec<u8>>)]) -> Vec<(i32, i64)> {
    let mut pending = Vec::with_capacity(records.len());
    for (key, payload) in records {
        let mut r = FutureRecord::to(topic).key(key);
        if let Some(p) = payload {
            r = r.payload(p);
        }
        pending.push(producer.send_result(r).expect("enqueue"));
    }
    let mut at = Vec::with_capacity(pending.len());
    for p in pending {
        let d = p.await.expect("delivery").expect("delivered");
        at.push((d.partition, d.offset));
    }
    at
}

fn candle_config() -> CandleConfig {
    CandleConfig {
        intervals: vec!["1m".parse().expect("1m"), "5m".parse().expect("5m")],
        allowed_lateness: 0,
        fill_empty: true,
        max_fill: 100_000,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_corpus_under_sigkill_loses_nothing_duplicates_nothing_and_letters_every_bad_record() {
    let Fresh { brokers, prefix, url } = Fresh::create("hostile").await;
    let (pg, conn) = tokio_postgres::connect(&url, NoTls).await.expect("postgres");
    tokio::spawn(conn);
    let setup = Setup {
        prefix: prefix.clone(),
        url: url.clone(),
        dataset: stack::unique_name("hostile"),
    };
    let bq = BigQuery::connect(
        Endpoint {
            api_url: stack::bigquery_rest_url(),
            project: stack::bigquery_project(),
            auth: Auth::None,
        },
        None,
    )
    .await
    .unwrap_or_else(|e| panic!("the BigQuery emulator (make stack-up): {e}"));
    let codec = Codec::new(WriteFraming::SingleObject);
    let t0 = (now_micros() - 600_000_000) / 1000 * 1000;
    let trades = good_trades(t0, PUBLISHED + REPLAYED);
    let o = others(t0);
    let bad = bad_records(&codec, t0);
    assert!(bad.len() >= 20);

    let mut services: Vec<Service> = ["candles", "postgres-sink", "bigquery-sink"]
        .into_iter()
        .map(|n| setup.start(n))
        .collect();

    // The test publishes the rest in chunks, the bad records among them,
    // while the consumers are killed.
    let kafka: FutureProducer = producer_config(&brokers).create().expect("producer");
    let mut entity: Vec<(Topic, Keyed)> = vec![
        (Topic::Assets, keyed(&codec, &o.assets)),
        (Topic::Rates, keyed(&codec, &o.rates)),
        (Topic::Exchanges, keyed(&codec, &o.exchanges)),
        (Topic::Markets, keyed(&codec, &o.markets)),
        (Topic::Prices, keyed(&codec, &o.prices)),
        (Topic::Candles, keyed(&codec, &o.klines)),
        (Topic::DeadLetters, keyed(&codec, &o.letters)),
    ];
    let mut bad_at: Vec<(&'static str, Topic, i32, i64)> = Vec::new();
    let chunks: Vec<&[Trade]> = trades[..PUBLISHED].chunks(PUBLISHED / bad.len()).collect();
    let mut kills: BTreeMap<&'static str, Vec<(i64, i64)>> = BTreeMap::new();
    let mut starts = [0_i64; 3];
    for (n, chunk) in chunks.iter().enumerate() {
        let mut records: Vec<(String, Option<Vec<u8>>)> = chunk
            .iter()
            .map(|t| (t.key(), Some(codec.encode(t).expect("e"))))
            .collect();
        let mut bad_here = Vec::new();
        if let Some((what, topic, payload)) = bad.get(n) {
            if *topic == Topic::Trades {
                records.insert(records.len() / 2, ("binance:H00USDT".into(), payload.clone()));
                bad_here.push((*what, records.len() / 2));
            } else {
                let at = publish(&kafka, &topic.name(&prefix), &[("bad".into(), payload.clone())]).await;
                bad_at.push((what, *topic, at[0].0, at[0].1));
            }
        }
        let at = publish(&kafka, &Topic::Trades.name(&prefix), &records).await;
        for (what, i) in bad_here {
            bad_at.push((what, Topic::Trades, at[i].0, at[i].1));
        }
        // A slice of every other entity with each chunk.
        for (topic, recs) in &mut entity {
            let take = recs.len().div_ceil(chunks.len() - n).min(recs.len());
            let slice: Vec<_> = recs.drain(..take).collect();
            publish(&kafka, &topic.name(&prefix), &slice).await;
        }
        // Kill one consumer every other chunk, three times each, once it has
        // made progress since it (re)started: mid-stream, not mid-start.
        if n % 2 == 1 && n / 2 < 9 {
            let i = (n / 2) % 3;
            let name = services[i].name;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
            let done = loop {
                let done = progress(&services[i], &pg, &bq, &setup.dataset).await;
                if done > starts[i] {
                    break done;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{name} made no progress in 90 s"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            services[i].child.kill().expect("SIGKILL");
            services[i].child.wait().expect("reaped");
            kills.entry(name).or_default().push((n as i64, done));
            // Restarted at once: the group moves the killed member's
            // partitions to the new one once its session expires.
            services[i] = setup.start(name);
            starts[i] = match name {
                "candles" => 0,
                _ => done,
            };
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Then the producer replays the last REPLAYED trades (the newest of each
    // symbol, so none is late), with its own bad lines.
    let (capture, replay_bad) = replay_file(&trades[PUBLISHED..]);
    let replay = quiet_service(stack::workspace_binary("producer"), &brokers, &prefix)
        .args(["replay", "--venue", "binance"])
        .arg(&capture)
        .env("TICKPIPE_TOPIC_PARTITIONS", "3")
        .env("TICKPIPE_PRODUCER_METRICS_ADDR", "off")
        .spawn()
        .expect("the producer starts");
    let status = tokio::task::spawn_blocking(move || {
        let mut replay = replay;
        replay.wait()
    })
    .await
    .expect("join")
    .expect("wait");
    assert!(status.success(), "the producer's replay exits 0, got {status}");
    std::fs::remove_file(&capture).ok();
    assert_eq!(kills.values().map(Vec::len).sum::<usize>(), 9, "{kills:?}");

    // Everything arrives: every good record once in PostgreSQL and BigQuery.
    let total = (PUBLISHED + REPLAYED) as i64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    let project = stack::bigquery_project();
    let view = |name: &str| format!("`{project}.{}.{name}`", setup.dataset);
    let expect_pg = [
        ("SELECT count(*) FROM trades", total),
        ("SELECT count(DISTINCT (symbol, trade_id)) FROM trades", total),
        ("SELECT count(*) FROM assets", 100),
        ("SELECT count(*) FROM rates", 50),
        ("SELECT count(*) FROM exchanges", 50),
        ("SELECT count(*) FROM markets", 50),
        ("SELECT count(*) FROM prices", 500),
        ("SELECT count(*) FROM candles WHERE origin = 'exchange_kline'", 200),
    ];
    for (sql, want) in expect_pg {
        loop {
            let n = count(&pg, sql).await;
            if n == want {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{sql}: {n}, want {want}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let expect_bq = [
        (format!("SELECT COUNT(*) FROM {}", view("trades")), total),
        (
            format!(
                "SELECT COUNT(*) FROM (SELECT DISTINCT symbol, trade_id FROM {})",
                view("trades")
            ),
            total,
        ),
        (format!("SELECT COUNT(*) FROM {}", view("assets")), 100),
        (format!("SELECT COUNT(*) FROM {}", view("rates")), 50),
        (format!("SELECT COUNT(*) FROM {}", view("exchanges")), 50),
        (format!("SELECT COUNT(*) FROM {}", view("markets")), 50),
        (format!("SELECT COUNT(*) FROM {}", view("prices")), 500),
        (
            format!(
                "SELECT COUNT(*) FROM {} WHERE origin = 'exchange_kline'",
                view("candles")
            ),
            200,
        ),
    ];
    for (sql, want) in &expect_bq {
        loop {
            let n = bq_count(&bq, sql).await;
            if n == *want {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{sql}: {n}, want {want}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    // The candles equal the pure builder's over the good trades, in the order
    // each symbol's trades were published.
    let mut builder = CandleBuilder::new(candle_config());
    let mut out = Vec::new();
    let mut in_order: Vec<&Trade> = trades.iter().collect();
    in_order.sort_by_key(|t| (t.symbol.clone(), t.trade_id));
    for t in in_order {
        builder.push(t, &mut out);
    }
    let mut expected: BTreeMap<(String, String, i64), String> = BTreeMap::new();
    for o in out {
        if let Output::Candle(c) = builder.resolve(o) {
            expected.insert(
                (c.symbol.clone(), c.interval.clone(), c.open_time),
                format!(
                    "{} {} {} {} {} {}",
                    c.open, c.high, c.low, c.close, c.volume, c.trade_count
                ),
            );
        }
    }
    // Each symbol's trades span minutes: candles close while they stream.
    assert!(expected.len() >= SYMBOLS * 2, "{} candles", expected.len());
    let aggregated = "SELECT count(*) FROM candles WHERE origin = 'aggregated'";
    loop {
        let n = count(&pg, aggregated).await;
        if n == expected.len() as i64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{aggregated}: {n}, want {}",
            expected.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stored: BTreeMap<(String, String, i64), String> = pg
        .query(
            "SELECT symbol, \"interval\", (extract(epoch FROM open_time) * 1000000)::bigint, open, high, low, \
             close, volume, trade_count FROM candles WHERE origin = 'aggregated'",
            &[],
        )
        .await
        .expect("candles")
        .iter()
        .map(|r| {
            let d = |i: usize| r.get::<_, Decimal>(i).normalize().to_string();
            (
                (r.get(0), r.get(1), r.get(2)),
                format!("{} {} {} {} {} {}", d(3), d(4), d(5), d(6), d(7), r.get::<_, i64>(8)),
            )
        })
        .collect();
    let normalized: BTreeMap<_, _> = expected
        .into_iter()
        .map(|(k, v)| {
            let mut parts: Vec<String> = v.split(' ').map(str::to_owned).collect();
            for p in parts.iter_mut().take(5) {
                *p = dec(p).normalize().to_string();
            }
            (k, parts.join(" "))
        })
        .collect();
    assert!(
        stored == normalized,
        "the stored candles differ from the pure builder's"
    );

    // Every bad record is exactly one dead letter, with a reason, from each
    // consumer that reads its topic.
    let components = |topic: Topic| -> BTreeSet<&'static str> {
        if topic == Topic::Trades {
            ["bigquery-sink", "candles", "postgres-sink"].into()
        } else {
            ["bigquery-sink", "postgres-sink"].into()
        }
    };
    let want_letters: i64 = bad_at.iter().map(|(_, t, _, _)| components(*t).len() as i64).sum();
    loop {
        let mut n = 0;
        for (_, topic, p, off) in &bad_at {
            n += count(
                &pg,
                &format!(
                    "SELECT count(*) FROM dead_letters WHERE topic = '{}' AND partition = {p} AND \"offset\" = {off}",
                    topic.name(&prefix)
                ),
            )
            .await;
        }
        if n >= want_letters {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} dead letters of bad records, want {want_letters}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for (what, topic, p, off) in &bad_at {
        let rows = pg
            .query(
                "SELECT component, stage, error FROM dead_letters WHERE topic = $1 AND partition = $2 AND \"offset\" = $3 \
                 ORDER BY component",
                &[&topic.name(&prefix), p, off],
            )
            .await
            .expect("letters");
        let got: Vec<&str> = rows.iter().map(|r| r.get::<_, &str>(0)).collect();
        let want: Vec<&str> = components(*topic).into_iter().collect();
        assert_eq!(got, want, "{what} ({topic:?} {p}/{off}): one letter from each consumer");
        for r in &rows {
            let (stage, error): (&str, &str) = (r.get(1), r.get(2));
            assert!(["decode", "validate"].contains(&stage), "{what}: stage {stage}");
            assert!(!error.is_empty(), "{what}: a reason");
        }
    }
    // BigQuery too: one letter per bad record and refusing consumer in the
    // view of distinct letters (its raw view may hold a letter a crashed
    // service published again).
    let want: BTreeSet<(String, i64, i64, String)> = bad_at
        .iter()
        .flat_map(|(_, topic, p, off)| {
            let name = topic.name(&prefix);
            components(*topic)
                .into_iter()
                .map(move |c| (name.clone(), i64::from(*p), *off, c.to_owned()))
        })
        .collect();
    let sql = format!(
        "SELECT topic, `partition`, `offset`, component FROM {} WHERE component IN ('postgres-sink', \
         'bigquery-sink', 'candles') AND `offset` IS NOT NULL",
        view("dead_letters_distinct")
    );
    loop {
        let rows = bq.query(&sql).await.unwrap_or_default();
        let got: Vec<(String, i64, i64, String)> = rows
            .iter()
            .map(|r| {
                let cell = |i: usize| r.get(i).cloned().flatten().unwrap_or_default();
                (
                    cell(0),
                    cell(1).parse().unwrap_or(-1),
                    cell(2).parse().unwrap_or(-1),
                    cell(3),
                )
            })
            .filter(|(t, ..)| t.starts_with(&prefix))
            .collect();
        let distinct: BTreeSet<_> = got.iter().cloned().collect();
        if distinct == want {
            assert_eq!(got.len(), want.len(), "one BigQuery letter per bad record and consumer");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "BigQuery letters: {} of {}",
            distinct.intersection(&want).count(),
            want.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The producer's own rejects, once each.
    assert_eq!(
        count(&pg, "SELECT count(*) FROM dead_letters WHERE component = 'replay'").await,
        replay_bad as i64
    );
    assert_eq!(
        count(&pg, "SELECT count(*) FROM dead_letters WHERE component = 'elsewhere'").await,
        20
    );

    // Every service is ready at the end, and each was killed mid-stream.
    for s in &services {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !ready(s.metrics).await {
            assert!(tokio::time::Instant::now() < deadline, "{} is not ready", s.name);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    for (name, at) in &kills {
        assert_eq!(at.len(), 3, "{name}: {at:?}");
    }
    for name in ["postgres-sink", "bigquery-sink"] {
        let at = &kills[name];
        assert!(
            at.iter().all(|(_, written)| *written > 0 && *written < total),
            "{name} was killed mid-stream: {at:?}"
        );
    }
}
