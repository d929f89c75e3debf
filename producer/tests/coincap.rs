//! CoinCap against a local server serving the real recorded CoinCap lists:
//! every row becomes a record (or a dead letter with its reason), a 429 is
//! waited out, and a wrong key or the retired v2 API stop with a clear message.

mod common;

use std::time::Duration;

use tickpipe_ops::Secret;
use tickpipe_producer::config::Config;
use tickpipe_producer::metrics::Metrics;
use tickpipe_producer::service::{self, ServiceError};
use tickpipe_schemas::{Asset, Exchange, Market, Price};
use tickpipe_testkit::exchange::{coincap_v2_lists, CoinCapScript, FakeCoinCap};
use tickpipe_testkit::stack;

use common::{decode, wait_for};
use tickpipe_testkit::kafka::read_topic;

fn config(prefix: &str, fake: &FakeCoinCap, key: &str) -> Config {
    let mut c = common::local_config("coincap", prefix);
    c.kafka.partitions = 1;
    c.sources.coincap.rest_url = fake.rest_url();
    c.sources.coincap.ws_url = fake.ws_url();
    c.sources.coincap.api_key = Some(Secret::new(key));
    c.sources.coincap.page_size = 50;
    c.sources.coincap.price_assets = vec!["bitcoin".into(), "ethereum".into()];
    c
}

/// The error a producer with `key` stops with against a fake CoinCap playing
/// `script`, under a fresh prefix named after `name`; panics with `why` if it
/// does not stop with one.
async fn fatal_error(script: CoinCapScript, name: &str, key: &str, why: &str) -> ServiceError {
    let fake = FakeCoinCap::start(script).await;
    let prefix = format!("{}.", stack::unique_name(name));
    service::run(config(&prefix, &fake, key), Metrics::new(), std::future::pending())
        .await
        .expect_err(why)
}

fn script() -> Option<CoinCapScript> {
    let dir = stack::real_data("coincap_v2")?;
    let (assets, rates, exchanges, markets) = coincap_v2_lists(&dir);
    Some(CoinCapScript {
        api_key: "right-key".into(),
        assets,
        rates,
        exchanges,
        markets,
        deprecated: false,
        too_many: 2,
        price_frames: vec![
            r#"{"bitcoin":"68051.2231","ethereum":"3621.0817"}"#.into(),
            r#"{"bitcoin":"68052.0000000000000000000000000000000"}"#.into(),
            r#"{"bitcoin":"-5"}"#.into(),
        ],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recorded_lists_become_records_and_dead_letters() {
    let Some(script) = script() else { return };
    let fake = FakeCoinCap::start(script).await;
    let prefix = format!("{}.", stack::unique_name("coincap"));
    let metrics = Metrics::new();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(service::run(
        config(&prefix, &fake, "right-key"),
        metrics.clone(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    let published = |t: &str| metrics.published.with_label_values(&[t]).get();
    // 4 assets, 169 rates, 62 exchanges (two pages of 50), 2 markets, 2 + 1
    // prices; the negative price is a dead letter.
    let counts = || ["assets", "rates", "exchanges", "markets", "prices", "dead-letters"].map(|t| (t, published(t)));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    wait_for("every entity to arrive", Duration::from_secs(61), || {
        if std::time::Instant::now() >= deadline {
            let dead = common::dead_letters(&stack::kafka_brokers(), &prefix);
            let reasons: Vec<&str> = dead.iter().map(|d| d.error.as_str()).collect();
            panic!("published so far: {:?}; dead letters: {reasons:?}", counts());
        }
        published("assets") >= 4
            && published("rates") >= 169
            && published("exchanges") >= 62
            && published("markets") >= 2
            && published("prices") >= 3
            && published("dead-letters") >= 1
    })
    .await;
    stop_tx.send(()).ok();
    run.await.expect("task").expect("clean stop");

    let brokers = stack::kafka_brokers();
    let assets: Vec<Asset> = decode(&read_topic(&brokers, &format!("{prefix}assets")));
    let btcp = assets
        .iter()
        .find(|a| a.id == "bitcoin-private")
        .expect("bitcoin-private");
    assert_eq!(btcp.price_usd.to_string(), "3.0796037735108296");
    assert_eq!(btcp.supply.to_string(), "20524490");
    assert_eq!(btcp.rank, 88);
    let exchanges: Vec<Exchange> = decode(&read_topic(&brokers, &format!("{prefix}exchanges")));
    let binance = exchanges.iter().find(|e| e.exchange_id == "binance").expect("binance");
    assert_eq!(binance.trading_pairs, 375);
    assert_eq!(
        binance.percent_total_volume.map(|d| d.to_string()).as_deref(),
        Some("16.903027981466749702")
    );
    let markets: Vec<Market> = decode(&read_topic(&brokers, &format!("{prefix}markets")));
    assert!(markets
        .iter()
        .all(|m| m.exchange_id == "binance" && m.base_symbol == "ETH"));
    let prices: Vec<Price> = decode(&read_topic(&brokers, &format!("{prefix}prices")));
    assert!(prices
        .iter()
        .any(|p| p.asset_id == "bitcoin" && p.price_usd.to_string() == "68052"));
    let dead = common::dead_letters(&brokers, &prefix);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        dead[0].error.contains("price_usd must be positive"),
        "{}",
        dead[0].error
    );
    assert_eq!(dead[0].component, "coincap-ws");
    // The key went as a bearer token on every call and the 429s were waited out.
    let log = fake.rest_log();
    assert!(log.iter().all(|r| r.authorized));
    assert_eq!(log.iter().filter(|r| r.status == 429).count(), 2);
    assert!(
        log.iter()
            .any(|r| r.path == "/v3/exchanges" && r.query.contains("offset=50")),
        "the second page was fetched"
    );
}

#[tokio::test]
async fn a_wrong_key_stops_with_the_variable_to_set() {
    let Some(script) = script() else { return };
    let script = CoinCapScript { too_many: 0, ..script };
    let err = fatal_error(script, "coincap_key", "wrong-key", "a 401 is fatal").await;
    assert!(matches!(err, ServiceError::Source { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("TICKPIPE_COINCAP_API_KEY"), "{msg}");
    assert!(!msg.contains("wrong-key"), "the key is never printed: {msg}");
}

#[tokio::test]
async fn the_retired_v2_api_is_named() {
    let Some(script) = script() else { return };
    let script = CoinCapScript {
        deprecated: true,
        too_many: 0,
        ..script
    };
    let err = fatal_error(script, "coincap_v2", "right-key", "the deprecation notice is fatal").await;
    assert!(err.to_string().contains("retired CoinCap v2"), "{err}");
}
