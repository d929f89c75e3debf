//! Sample records and proptest strategies shared by the schema tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::str::FromStr;

use proptest::prelude::*;
use tickpipe_schemas::*;

pub fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).expect("test decimal")
}

pub fn trade() -> Trade {
    Trade {
        venue: "binance".into(),
        symbol: "BTCUSDT".into(),
        kind: TradeKind::Trade,
        trade_id: 5_123_456_789,
        price: dec("68040.01000000"),
        quantity: dec("0.00150000"),
        buyer_is_maker: false,
        first_trade_id: None,
        last_trade_id: None,
        source: Source::Binance,
        event_time: 1_767_225_600_100_000,
        ingest_time: 1_767_225_600_101_234,
    }
}

pub fn asset() -> Asset {
    Asset {
        id: "bitcoin".into(),
        rank: 1,
        symbol: "BTC".into(),
        name: "Bitcoin".into(),
        supply: dec("19873412.0000000000000000"),
        max_supply: Some(dec("21000000")),
        market_cap_usd: Some(dec("1352211932712.4411")),
        volume_usd_24h: Some(dec("9183412231.2231")),
        price_usd: dec("68042.1183201"),
        change_percent_24h: Some(dec("-1.2043")),
        vwap_24h: None,
        explorer: Some("https://blockchain.info/".into()),
        tokens: BTreeMap::from([("ethereum".to_owned(), vec!["0xabc".to_owned(), "0xdef".to_owned()])]),
        source: Source::Coincap,
        event_time: 1_767_225_600_123_000,
        ingest_time: 1_767_225_600_200_000,
    }
}

pub fn rate() -> Rate {
    Rate {
        id: "euro".into(),
        symbol: "EUR".into(),
        currency_symbol: Some("€".into()),
        rate_type: RateType::Fiat,
        rate_usd: dec("1.0832000000000000"),
        source: Source::Coincap,
        event_time: 1,
        ingest_time: 2,
    }
}

pub fn exchange() -> Exchange {
    Exchange {
        exchange_id: "binance".into(),
        name: "Binance".into(),
        rank: 1,
        percent_total_volume: Some(dec("16.903027981466749702")),
        volume_usd: None,
        trading_pairs: 375,
        socket: Some(true),
        exchange_url: None,
        source: Source::Coincap,
        event_time: 1_536_336_916_333_000,
        ingest_time: 1_536_336_928_185_000,
    }
}

pub fn market() -> Market {
    Market {
        exchange_id: "binance".into(),
        rank: 4,
        base_symbol: "ETH".into(),
        base_id: "ethereum".into(),
        quote_symbol: "BTC".into(),
        quote_id: "bitcoin".into(),
        price_quote: dec("0.0338800000000000"),
        price_usd: dec("218.1934525554543856"),
        volume_usd_24h: Some(dec("57626585.5284415014432962")),
        percent_exchange_volume: Some(dec("5.6111904082846202")),
        trades_count_24h: Some(12_345),
        source: Source::Replay,
        event_time: 3,
        ingest_time: 4,
    }
}

pub fn price() -> Price {
    Price {
        asset_id: "ethereum".into(),
        price_usd: dec("3621.0817"),
        source: Source::Coincap,
        event_time: 5,
        ingest_time: 6,
    }
}

pub fn candle() -> Candle {
    Candle {
        venue: "binance".into(),
        symbol: "BTCUSDT".into(),
        interval: "1m".into(),
        origin: CandleOrigin::ExchangeKline,
        open_time: 1_767_225_600_000_000,
        close_time: 1_767_225_659_999_000,
        open: dec("68010.00000000"),
        high: dec("68055.00000000"),
        low: dec("68001.20000000"),
        close: dec("68040.01000000"),
        volume: dec("12.48100000"),
        quote_volume: dec("849112.33120000"),
        trade_count: 401,
        taker_buy_base_volume: dec("6.10200000"),
        taker_buy_quote_volume: dec("415120.88000000"),
        first_trade_id: Some(5_123_456_700),
        last_trade_id: Some(5_123_457_100),
        closed: true,
        source: Source::Binance,
        event_time: 1_767_225_660_002_000,
        ingest_time: 1_767_225_660_010_000,
    }
}

pub fn dead_letter() -> DeadLetter {
    DeadLetter {
        stage: "parse".into(),
        error: "expected value at line 1 column 1".into(),
        component: "producer".into(),
        topic: Some("trades".into()),
        partition: None,
        offset: None,
        key: Some(b"binance:BTCUSDT".to_vec()),
        payload: b"{not json".to_vec(),
        source: Source::Binance,
        event_time: 7,
        ingest_time: 8,
    }
}

/// Any decimal that decimal(38, 18) can carry exactly.
pub fn any_decimal() -> impl Strategy<Value = Decimal> {
    (any::<i64>(), 0u32..=18, any::<i32>()).prop_map(|(lo, scale, hi)| {
        // Up to ~ 2^94 mantissa, scaled so that the integer part stays below 10^20.
        let m = (i128::from(hi % 1000) << 64) | i128::from(lo as u64);
        Decimal::from_i128_with_scale(m % 10_i128.pow((20 + scale).min(28)), scale)
    })
}

pub fn any_string() -> impl Strategy<Value = String> {
    ".{0,24}"
}

pub fn any_source() -> impl Strategy<Value = Source> {
    prop::sample::select(vec![
        Source::Unknown,
        Source::Coincap,
        Source::Binance,
        Source::Replay,
        Source::Simulator,
    ])
}

prop_compose! {
    pub fn any_trade()(
        venue in any_string(), symbol in any_string(),
        agg in any::<bool>(), trade_id in any::<i64>(),
        price in any_decimal(), quantity in any_decimal(),
        buyer_is_maker in any::<bool>(),
        first_trade_id in any::<Option<i64>>(), last_trade_id in any::<Option<i64>>(),
        source in any_source(), event_time in any::<i64>(), ingest_time in any::<i64>(),
    ) -> Trade {
        Trade { venue, symbol, kind: if agg { TradeKind::AggTrade } else { TradeKind::Trade }, trade_id, price, quantity,
                buyer_is_maker, first_trade_id, last_trade_id, source, event_time, ingest_time }
    }
}

prop_compose! {
    pub fn any_asset()(
        id in any_string(), rank in any::<i32>(), symbol in any_string(), name in any_string(),
        supply in any_decimal(), max_supply in prop::option::of(any_decimal()),
        market_cap_usd in prop::option::of(any_decimal()), volume_usd_24h in prop::option::of(any_decimal()),
        price_usd in any_decimal(), change_percent_24h in prop::option::of(any_decimal()),
        vwap_24h in prop::option::of(any_decimal()), explorer in prop::option::of(any_string()),
        tokens in prop::collection::btree_map(any_string(), prop::collection::vec(any_string(), 0..3), 0..3),
        source in any_source(), event_time in any::<i64>(), ingest_time in any::<i64>(),
    ) -> Asset {
        Asset { id, rank, symbol, name, supply, max_supply, market_cap_usd, volume_usd_24h, price_usd,
                change_percent_24h, vwap_24h, explorer, tokens, source, event_time, ingest_time }
    }
}

prop_compose! {
    pub fn any_dead_letter()(
        stage in any_string(), error in any_string(), component in any_string(),
        topic in prop::option::of(any_string()), partition in any::<Option<i32>>(), offset in any::<Option<i64>>(),
        key in prop::option::of(prop::collection::vec(any::<u8>(), 0..16)),
        payload in prop::collection::vec(any::<u8>(), 0..64),
        source in any_source(), event_time in any::<i64>(), ingest_time in any::<i64>(),
    ) -> DeadLetter {
        DeadLetter { stage, error, component, topic, partition, offset, key, payload, source, event_time, ingest_time }
    }
}
