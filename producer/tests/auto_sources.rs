//! `auto`, the default source list and what `make demo` runs: the live sources
//! when Binance's REST answers `ping`, the built-in simulator when it does not
//! (no internet, a refused connection, a restricted location's 451).

use tickpipe_ops::Secret;
use tickpipe_producer::config::Config;
use tickpipe_producer::service::resolve_auto;
use tickpipe_testkit::exchange::{BinanceScript, FakeBinance, RestFault};
use tickpipe_testkit::stack;

async fn resolved(rest_url: String, coincap_key: Option<&str>) -> Vec<String> {
    let mut config = Config::default();
    assert_eq!(config.sources.names, ["auto"], "auto is the default");
    config.sources.binance.rest_url = rest_url;
    config.sources.coincap.api_key = coincap_key.map(Secret::new);
    resolve_auto(&mut config).await;
    config.sources.names
}

#[tokio::test]
async fn live_sources_when_binance_answers() {
    let binance = FakeBinance::start(BinanceScript::default()).await;
    assert_eq!(resolved(binance.rest_url(), None).await, ["binance"]);
    // CoinCap needs a key: it joins only when one is set.
    assert_eq!(resolved(binance.rest_url(), Some("k")).await, ["binance", "coincap"]);
    let asked: Vec<String> = binance.rest_log().into_iter().map(|c| c.path).collect();
    assert_eq!(asked, ["/api/v3/ping", "/api/v3/ping"]);
}

#[tokio::test]
async fn the_simulator_when_binance_does_not_answer() {
    // Nobody listens.
    let closed = format!("http://{}", stack::free_loopback_addr());
    assert_eq!(resolved(closed, Some("k")).await, ["simulator"]);

    // Binance refuses the location.
    let binance = FakeBinance::start(BinanceScript {
        rest_faults: vec![RestFault::Status {
            path: "/api/v3/ping".into(),
            status: 451,
            body: r#"{"code":0,"msg":"Service unavailable from a restricted location."}"#.into(),
        }],
        ..BinanceScript::default()
    })
    .await;
    assert_eq!(resolved(binance.rest_url(), None).await, ["simulator"]);
}

#[tokio::test]
async fn named_sources_are_left_alone() {
    let mut config = Config::default();
    config.sources.names = vec!["replay".into()];
    config.sources.binance.rest_url = format!("http://{}", stack::free_loopback_addr());
    resolve_auto(&mut config).await;
    assert_eq!(config.sources.names, ["replay"]);
}
