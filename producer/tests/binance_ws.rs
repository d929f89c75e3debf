//! The live Binance path against a local server replaying the real spot
//! BTCUSDT capture, with the faults Binance really produces: a dropped
//! connection that loses trades, ids that never arrive on the socket, a
//! malformed frame, a ping, a `serverShutdown` with overlapping connections, a
//! silent socket, a 429 on the repair endpoint and empty answers from it (REST
//! behind the socket), more trades during a repair than its queue holds.
//! Afterwards `trades` holds every id of the recording
//! exactly once. With the ETHUSDT capture of the same day merged in, a
//! repair that waits holds up only its own symbol.

mod common;

use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tickpipe_producer::config::Config;
use tickpipe_producer::metrics::Metrics;
use tickpipe_producer::service::{self, ServiceError, Summary};
use tickpipe_schemas::Trade;
use tickpipe_testkit::exchange::{capture_messages, BinanceScript, FakeBinance, RestFault, WsFault};
use tickpipe_testkit::{real, stack};

use common::{total, wait_for};

/// How a trade frame of the capture starts.
const TRADE_FRAME: &str = r#"{"stream":"btcusdt@trade""#;

/// The real spot BTCUSDT capture, or `None` (said loudly) without the data.
fn capture() -> Option<PathBuf> {
    stack::real_data("binance_ws_raw_2024-08-08").map(|dir| dir.join("spot_btcusdt_20240808.ts_json.txt.gz"))
}

/// Trades among some of the capture's messages (it interleaves depth and
/// bookTicker updates).
fn trades_among(messages: &[String], range: Range<usize>) -> u64 {
    messages[range].iter().filter(|m| m.starts_with(TRADE_FRAME)).count() as u64
}

/// The producer with only the live Binance source, BTCUSDT trades, pointed at
/// `fake`; and the fresh topic prefix it publishes under.
fn live_config(name: &str, fake: &FakeBinance) -> (String, Config) {
    let prefix = format!("{}.", stack::unique_name(name));
    let mut config = common::local_config("binance", &prefix);
    config.sources.binance.ws_url = fake.ws_url();
    config.sources.binance.rest_url = fake.rest_url();
    config.sources.binance.symbols = vec!["BTCUSDT".into()];
    config.sources.binance.streams = vec!["trade".into()];
    (prefix, config)
}

/// A 429 on the repair endpoint whose Retry-After (100 s) outlasts any test:
/// a repair Binance will not serve for a long while.
fn repair_refused_for_100_s() -> RestFault {
    RestFault::TooMany {
        path: "/api/v3/historicalTrades".into(),
        times: 1,
        retry_after_secs: 100,
    }
}

/// The capture's `messages` with `faults`, BTCUSDT's `withheld` ids never on
/// the socket, and a repair endpoint that refuses for 100 s
/// ([`repair_refused_for_100_s`]).
fn repair_refused(messages: Vec<String>, faults: Vec<WsFault>, withheld: RangeInclusive<i64>) -> BinanceScript {
    BinanceScript {
        messages,
        faults,
        rate: 0,
        rest_faults: vec![repair_refused_for_100_s()],
        ..BinanceScript::default()
    }
    .without_trades("BTCUSDT", withheld)
}

/// The trade frames of the capture.
fn trade_frames(file: &Path) -> Vec<String> {
    capture_messages(file)
        .into_iter()
        .filter(|m| m.starts_with(TRADE_FRAME))
        .collect()
}

/// The ids in `trades` under `prefix`, sorted.
fn sorted_ids(prefix: &str) -> Vec<i64> {
    let mut ids: Vec<i64> = common::trades(&stack::kafka_brokers(), prefix)
        .iter()
        .map(|t| t.trade_id)
        .collect();
    ids.sort_unstable();
    ids
}

/// Runs the producer until every recorded trade is acknowledged, stops it,
/// and asserts that `trades` under `prefix` holds every id of the recording
/// once; returns its metrics.
async fn publish_every_id_once(config: Config, prefix: &str, recorded: &[Trade]) -> Metrics {
    let producer = Producer::start(config);
    producer
        .wait_published("every recorded trade to be acknowledged", 120, recorded.len() as u64)
        .await;
    let metrics = producer.stop().await;
    let (first, last) = (recorded[0].trade_id, recorded[recorded.len() - 1].trade_id);
    let (missing, repeated) = common::id_discrepancies(&sorted_ids(prefix), first, last);
    assert!(
        missing.is_empty() && repeated.is_empty(),
        "missing {missing:?}, repeated {repeated:?}"
    );
    metrics
}

/// The producer running in this process until stopped.
struct Producer {
    metrics: Metrics,
    stop: tokio::sync::oneshot::Sender<()>,
    run: tokio::task::JoinHandle<Result<Summary, ServiceError>>,
}

impl Producer {
    fn start(config: Config) -> Self {
        let metrics = Metrics::new();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(service::run(config, metrics.clone(), async move {
            let _ = stopped.await;
        }));
        Producer { metrics, stop, run }
    }

    /// Waits until at least `want` trades are acknowledged.
    async fn wait_published(&self, what: &str, secs: u64, want: u64) {
        let published = self.metrics.published.with_label_values(&["trades"]);
        wait_for(what, Duration::from_secs(secs), || published.get() >= want).await;
    }

    /// Waits until at least `frames` frames have arrived.
    async fn wait_received(&self, frames: u64) {
        wait_for("every frame to arrive", Duration::from_secs(60), || {
            total(&self.metrics.received) >= frames
        })
        .await;
    }

    /// Stops it the way SIGTERM does and expects a clean stop; returns its metrics.
    async fn stop(self) -> Metrics {
        self.stop.send(()).ok();
        tokio::time::timeout(Duration::from_secs(60), self.run)
            .await
            .expect("SIGTERM-style stop returns")
            .expect("task")
            .expect("clean stop");
        self.metrics
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_trade_id_exactly_once_through_disconnects_gaps_and_rollover() {
    let Some(file) = capture() else { return };
    let recorded = real::ws_capture_trades(&file, "binance");
    let first = recorded[0].trade_id;
    let last = recorded[recorded.len() - 1].trade_id;
    assert_eq!(recorded.len() as i64, last - first + 1, "the recording has no gaps");
    let messages = capture_messages(&file);
    let n = messages.len();
    // Trades among the messages the drop loses.
    let lost_trades = trades_among(&messages, n / 10..n / 10 + 3000);
    assert!(lost_trades > 100);
    let script = BinanceScript {
        messages,
        faults: vec![
            WsFault::Ping {
                at: n / 20,
                payload: b"tickpipe".to_vec(),
            },
            WsFault::Drop { at: n / 10, lose: 3000 },
            WsFault::Malformed {
                at: n / 5,
                text: r#"{"stream":"btcusdt@trade","data":{"e":"trade","#.into(),
            },
            WsFault::ServerShutdown {
                at: n / 3,
                overlap: 300,
            },
            WsFault::Stall {
                at: n / 2,
                millis: 2500,
            },
        ],
        rate: 0,
        rest_faults: vec![
            RestFault::TooMany {
                path: "/api/v3/historicalTrades".into(),
                times: 1,
                retry_after_secs: 1,
            },
            // Then REST has not caught up with the socket yet.
            RestFault::Lagging {
                path: "/api/v3/historicalTrades".into(),
                times: 2,
            },
        ],
        klines: Default::default(),
        skip_trades: Vec::new(),
    }
    .without_trades("BTCUSDT", first + 6000..=first + 6099);
    let fake = FakeBinance::start(script).await;

    let (prefix, mut config) = live_config("binance_ws", &fake);
    config.sources.binance.watchdog_secs = 1;
    let metrics = publish_every_id_once(config, &prefix, &recorded).await;

    // What happened on the way, as the metrics tell it.
    assert!(total(&metrics.gaps) >= 2, "the drop and the skipped ids are gaps");
    assert!(
        total(&metrics.backfilled) >= lost_trades + 100,
        "lost and skipped trades came back over REST: {} of {}",
        total(&metrics.backfilled),
        lost_trades + 100
    );
    assert_eq!(total(&metrics.unrepaired), 0);
    assert!(total(&metrics.reconnects) >= 2, "the drop and the stall reconnect");
    // The initial connection, one after the drop, and the replacement opened
    // on `serverShutdown` while the old one still streamed (whatever both
    // delivered was published once: the id check above). The stall adds a
    // fourth unless the socket buffers carried the client to it before the
    // replacement took over (the fake runs ahead of a client busy repairing),
    // in which case the replacement already open is the reconnect.
    assert!(fake.connections() >= 3, "{} connections", fake.connections());
    assert_eq!(fake.refused_connections(), 0);
    assert!(
        fake.pongs().iter().any(|p| p == b"tickpipe"),
        "the ping was answered with its payload"
    );
    let log = fake.rest_log();
    let repairs: Vec<_> = log.iter().filter(|r| r.path == "/api/v3/historicalTrades").collect();
    assert!(repairs.len() >= 2);
    assert!(
        repairs[1].at.duration_since(repairs[0].at) >= Duration::from_millis(950),
        "the 429's Retry-After was honoured"
    );
    let dead = common::dead_letters(&stack::kafka_brokers(), &prefix);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].stage, "parse");
    assert!(dead[0].error.contains("not a Binance message"), "{}", dead[0].error);
}

/// A repair Binance will not serve for a long while (a 429 whose Retry-After
/// is 100 s) holds up the symbol's trades only for the repair's time budget:
/// the lost trades are counted as unrepaired and every later trade is
/// published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_that_cannot_finish_gives_way_to_the_live_stream() {
    let Some(file) = capture() else { return };
    let recorded = real::ws_capture_trades(&file, "binance");
    let messages = capture_messages(&file);
    let n = messages.len();
    let lost = trades_among(&messages, n / 10..n / 10 + 3000);
    let script = BinanceScript {
        messages,
        faults: vec![WsFault::Drop { at: n / 10, lose: 3000 }],
        rate: 0,
        rest_faults: vec![repair_refused_for_100_s()],
        ..BinanceScript::default()
    };
    let fake = FakeBinance::start(script).await;
    let (prefix, mut config) = live_config("binance_budget", &fake);
    config.sources.binance.repair_budget_secs = 2;
    let producer = Producer::start(config);
    let expected = recorded.len() as u64 - lost;
    producer
        .wait_published(
            "every trade but the lost ones, well before the Retry-After ends",
            60,
            expected,
        )
        .await;
    let metrics = producer.stop().await;
    assert_eq!(total(&metrics.unrepaired), lost, "the lost trades are counted");
    assert_eq!(total(&metrics.backfilled), 0);
    let ids = common::trades(&stack::kafka_brokers(), &prefix);
    assert_eq!(ids.len() as u64, expected, "every other trade once");
}

/// Trades keep coming while a repair waits (a 429 with a 2 s Retry-After),
/// more than the symbol's queue holds (`repair_queue` 300): those that find it
/// full are not held, and the symbol's next repair, revealed by the first trade
/// after the queue drained (the last one, sent after a 4 s stall), fetches them
/// over REST. Every id once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trades_a_full_repair_queue_does_not_hold_come_back_with_the_next_repair() {
    let Some(file) = capture() else { return };
    let recorded = real::ws_capture_trades(&file, "binance");
    let first = recorded[0].trade_id;
    let messages = trade_frames(&file);
    let n = messages.len();
    let script = BinanceScript {
        messages,
        faults: vec![WsFault::Stall {
            at: n - 1,
            millis: 4000,
        }],
        rate: 0,
        rest_faults: vec![RestFault::TooMany {
            path: "/api/v3/historicalTrades".into(),
            times: 1,
            retry_after_secs: 2,
        }],
        ..BinanceScript::default()
    }
    .without_trades("BTCUSDT", first + 1000..=first + 1099);
    let fake = FakeBinance::start(script).await;
    let (prefix, mut config) = live_config("binance_queue", &fake);
    config.sources.binance.repair_queue = 300;
    let metrics = publish_every_id_once(config, &prefix, &recorded).await;
    assert_eq!(total(&metrics.unrepaired), 0);
    assert!(total(&metrics.gaps) >= 2, "the withheld ids, then the trades not held");
    // Only the 100 withheld ids if the queue had held everything the socket
    // delivered.
    assert!(
        total(&metrics.backfilled) > 100,
        "trades the socket delivered to a full queue came back over REST: {} backfilled",
        total(&metrics.backfilled)
    );
}

/// A stop while trades wait for a repair that does not come (a 429 whose
/// Retry-After is 100 s) and the queue (`repair_queue` 300) is full: the queued
/// trades are published, and the ids after them, which nothing newer reveals
/// as a gap, are counted as unrepaired with the withheld ones. Every id of the
/// recording is published once or counted, none both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trades_left_to_a_repair_at_a_stop_are_counted_as_unrepaired() {
    let Some(file) = capture() else { return };
    let recorded = real::ws_capture_trades(&file, "binance");
    let (first, last) = (recorded[0].trade_id, recorded[recorded.len() - 1].trade_id);
    assert_eq!(recorded.len() as i64, last - first + 1, "the recording has no gaps");
    let messages = trade_frames(&file);
    let withheld = first + 1000..=first + 1099;
    let fake = FakeBinance::start(repair_refused(messages, Vec::new(), withheld.clone())).await;
    let (prefix, mut config) = live_config("binance_stop_full", &fake);
    config.sources.binance.repair_queue = 300;
    config.sources.binance.repair_budget_secs = 90;
    let producer = Producer::start(config);
    producer.wait_received(recorded.len() as u64 - 100).await;
    assert_eq!(total(&producer.metrics.unrepaired), 0, "the repair still waits");
    let metrics = producer.stop().await;

    let ids = sorted_ids(&prefix);
    assert_eq!(total(&metrics.backfilled), 0);
    // Published once each: the ids before the first gap and what the lane
    // held behind its refused repair (the trade in its hand and the full
    // queue); counted: the withheld ids and the rest. The first gap is
    // usually the withheld one; on a loaded machine the lane's queue can fill
    // before it, and the ids it leaves are then a gap of their own, whose
    // repair is the one refused.
    let newest = *ids.last().expect("trades");
    let mut unique = ids.clone();
    unique.dedup();
    assert_eq!(unique, ids, "no id published twice");
    assert!(ids
        .iter()
        .all(|id| (first..=last).contains(id) && !withheld.contains(id)));
    assert_eq!(ids[0], first);
    let before_gap = ids.iter().zip(first..).take_while(|(id, want)| *id == want).count();
    assert!(
        before_gap <= 1000,
        "the first gap is at the withheld ids or before: {before_gap} ids before it"
    );
    let behind_repair = ids.len() - before_gap;
    assert!(
        behind_repair > 300,
        "the trade in the lane's hand and its full queue are published at the stop: {behind_repair} after the gap"
    );
    assert!(newest < last, "the queue filled");
    assert_eq!(
        total(&metrics.unrepaired),
        (recorded.len() - ids.len()) as u64,
        "every id not published is counted, none both"
    );
}

/// A trade Binance leaves out of its klines (here `X: "NA"`) arrives in place
/// of a real one: it is a dead letter, and its id counts as seen, so the next
/// trade is no gap and nothing is fetched over REST for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_excluded_trade_is_a_dead_letter_not_a_gap() {
    let Some(file) = capture() else { return };
    let recorded = real::ws_capture_trades(&file, "binance");
    let messages = capture_messages(&file);
    let at = (messages.len() / 2..messages.len())
        .find(|&i| messages[i].starts_with(TRADE_FRAME))
        .expect("a trade after the middle");
    let frame: serde_json::Value = serde_json::from_str(&messages[at]).expect("json");
    let id = frame["data"]["t"].as_i64().expect("trade id");
    let mut data = frame["data"].clone();
    data["X"] = "NA".into();
    let excluded = serde_json::json!({"stream": "btcusdt@trade", "data": data}).to_string();
    let script = BinanceScript {
        messages,
        faults: vec![WsFault::Malformed { at, text: excluded }],
        rate: 0,
        rest_faults: Vec::new(),
        klines: Default::default(),
        skip_trades: Vec::new(),
    }
    .without_trades("BTCUSDT", id..=id);
    let fake = FakeBinance::start(script).await;
    let (prefix, config) = live_config("binance_excluded", &fake);
    let producer = Producer::start(config);
    let expected = recorded.len() as u64 - 1;
    producer.wait_published("every other trade", 60, expected).await;
    let metrics = producer.stop().await;
    assert_eq!(total(&metrics.gaps), 0, "no false gap");
    assert!(fake.rest_log().is_empty(), "nothing asked over REST");
    let ids: Vec<i64> = common::trades(&stack::kafka_brokers(), &prefix)
        .iter()
        .map(|t| t.trade_id)
        .collect();
    assert_eq!(ids.len() as u64, expected);
    assert!(!ids.contains(&id));
    let dead = common::dead_letters(&stack::kafka_brokers(), &prefix);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].error.contains("not a MARKET trade"), "{}", dead[0].error);
}

/// Two symbols on one connection (the real BTCUSDT and ETHUSDT captures of the
/// same day, merged by receive time), and a BTCUSDT repair Binance will not
/// serve for a long while (a 429 whose Retry-After is 100 s): ETHUSDT's trades
/// keep flowing and the socket's ping is answered while the repair waits
/// (its trades queue in their lane), and on stop the queued BTCUSDT trades
/// are published, the withheld ones counted as unrepaired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_holds_up_only_its_own_symbol() {
    let Some(btc) = capture() else { return };
    let eth = btc.with_file_name("spot_ethusdt_20240808.ts_json.txt.gz");
    let btc_trades = real::ws_capture_trades(&btc, "binance");
    let eth_trades = real::ws_capture_trades(&eth, "binance");
    for trades in [&btc_trades, &eth_trades] {
        let span = trades[trades.len() - 1].trade_id - trades[0].trade_id + 1;
        assert_eq!(trades.len() as i64, span, "the recording has no gaps");
    }
    let mut lines = real::ws_capture_lines(&btc);
    lines.extend(real::ws_capture_lines(&eth));
    lines.sort_by_key(|(ns, _)| *ns);
    let messages: Vec<String> = lines
        .into_iter()
        .map(|(_, json)| json)
        .filter(|json| json.starts_with(r#"{"stream":"#))
        .collect();
    let first = btc_trades[0].trade_id;
    let withheld = first + 1000..=first + 1099;
    // The ping goes out 6,000 trades after the gap shows (the first BTCUSDT
    // trade after it): more than a stalled reader's buffers hold.
    let is_trade = |m: &String| m.starts_with(TRADE_FRAME) || m.starts_with(r#"{"stream":"ethusdt@trade""#);
    let after_gap = messages
        .iter()
        .position(|m| m.starts_with(TRADE_FRAME) && m.contains(&format!(r#""t":{},"#, first + 1100)))
        .expect("the trade after the gap");
    let ping_at = (after_gap..messages.len())
        .filter(|&i| is_trade(&messages[i]))
        .nth(6000)
        .expect("6,000 trades after the gap");
    let ping = WsFault::Ping {
        at: ping_at,
        payload: b"lanes".to_vec(),
    };
    let fake = FakeBinance::start(repair_refused(messages, vec![ping], withheld.clone())).await;
    let (prefix, mut config) = live_config("binance_lanes", &fake);
    config.sources.binance.symbols = vec!["BTCUSDT".into(), "ETHUSDT".into()];
    config.sources.binance.repair_budget_secs = 90;
    let producer = Producer::start(config);

    // Every ETHUSDT trade and the BTCUSDT ones before the gap, while the
    // repair still waits for the Retry-After (nothing given up yet).
    let before_gap = 1000;
    producer
        .wait_published(
            "ETHUSDT's trades during the BTCUSDT repair",
            60,
            eth_trades.len() as u64 + before_gap,
        )
        .await;
    assert_eq!(total(&producer.metrics.unrepaired), 0, "the repair still waits");
    assert_eq!(total(&producer.metrics.backfilled), 0);
    assert!(
        fake.pongs().iter().any(|p| p == b"lanes"),
        "the ping was answered during the repair"
    );
    // Every frame has arrived (the BTCUSDT ones wait in their lane): stop.
    producer
        .wait_received((btc_trades.len() + eth_trades.len()) as u64 - 100)
        .await;
    let metrics = producer.stop().await;
    assert_eq!(total(&metrics.unrepaired), 100, "the withheld ids");
    assert_eq!(total(&metrics.gaps), 1);

    let trades = common::trades(&stack::kafka_brokers(), &prefix);
    for (symbol, recorded) in [("BTCUSDT", &btc_trades), ("ETHUSDT", &eth_trades)] {
        let mut ids: Vec<i64> = trades
            .iter()
            .filter(|t| t.symbol == symbol)
            .map(|t| t.trade_id)
            .collect();
        ids.sort_unstable();
        let (missing, repeated) =
            common::id_discrepancies(&ids, recorded[0].trade_id, recorded[recorded.len() - 1].trade_id);
        assert!(repeated.is_empty(), "{symbol}: repeated {repeated:?}");
        if symbol == "BTCUSDT" {
            // In range, once each, and the right count: every id but the withheld.
            assert_eq!(ids.len(), recorded.len() - 100, "{symbol}");
            assert!(ids.iter().all(|id| !withheld.contains(id)), "{symbol}");
        } else {
            assert!(missing.is_empty(), "{symbol}: missing {missing:?}");
        }
    }
}
