//! The typed records, one per entity topic, field for field as in `avro/*.avsc`.
//!
//! Times are microseconds since the Unix epoch (UTC), Avro `timestamp-micros`.
//! Money and quantities are [`Decimal`], carried as `decimal(38, 18)`.

use std::collections::BTreeMap;

use rust_decimal::Decimal;

use crate::record::{avro_enum, avro_record};

/// Microseconds since the Unix epoch, UTC (Avro `timestamp-micros`).
pub type Micros = i64;

avro_enum! {
    /// Where a record came from.
    pub enum Source {
        /// A symbol this build does not know (Avro enum default).
        Unknown = "unknown",
        Coincap = "coincap",
        Binance = "binance",
        Replay = "replay",
        Simulator = "simulator",
    }
}

avro_enum! {
    /// CoinCap rate type.
    pub enum RateType {
        Unknown = "unknown",
        Crypto = "crypto",
        Fiat = "fiat",
    }
}

avro_enum! {
    /// Single trade (`@trade`) or aggregate trade (`@aggTrade`).
    pub enum TradeKind {
        Trade = "trade",
        AggTrade = "agg_trade",
    }
}

avro_enum! {
    /// Who built a candle.
    pub enum CandleOrigin {
        /// A closed kline published by the exchange.
        ExchangeKline = "exchange_kline",
        /// Built by tickpipe's `candles` from trades.
        Aggregated = "aggregated",
    }
}

avro_record! {
    /// A CoinCap asset.
    pub struct Asset: "asset.avsc", key = |a| a.id.clone();
    {
        pub id: String,
        pub rank: i32,
        pub symbol: String,
        pub name: String,
        pub supply: Decimal,
        pub max_supply: Option<Decimal>,
        pub market_cap_usd: Option<Decimal>,
        pub volume_usd_24h: Option<Decimal>,
        pub price_usd: Decimal,
        pub change_percent_24h: Option<Decimal>,
        pub vwap_24h: Option<Decimal>,
        pub explorer: Option<String>,
        /// Contract addresses by chain.
        pub tokens: BTreeMap<String, Vec<String>>,
        pub source: Source,
        pub event_time: Micros,
        pub ingest_time: Micros,
    }
}

avro_record! {
    /// A CoinCap conversion rate.
    pub struct Rate: "rate.avsc", key = |r| r.id.clone();
    {
        pub id: String,
        pub symbol: String,
        pub currency_symbol: Option<String>,
        pub rate_type: RateType,
        pub rate_usd: Decimal,
        pub source: Source,
        pub event_time: Micros,
        pub ingest_time: Micros,
    }
}

avro_record! {
    /// A CoinCap exchange.
    pub struct Exchange: "exchange.avsc", key = |e| e.exchange_id.clone();
    {
        pub exchange_id: String,
        pub name: String,
        pub rank: i32,
        pub percent_total_volume: Option<Decimal>,
        pub volume_usd: Option<Decimal>,
        pub trading_pairs: i32,
        pub socket: Option<bool>,
        pub exchange_url: Option<String>,
        pub source: Source,
        pub event_time: Micros,
        pub ingest_time: Micros,
    }
}

avro_record! {
    /// A CoinCap market (one pair on one exchange).
    pub struct Market: "market.avsc", key = |m| format!("{}/{}/{}", m.exchange_id, m.base_symbol, m.quote_symbol);
    {
        pub exchange_id: String,
        pub rank: i32,
        pub base_symbol: String,
        pub base_id: String,
        pub quote_symbol: String,
        pub quote_id: String,
        pub price_quote: Decimal,
        pub price_usd: Decimal,
        pub volume_usd_24h: Option<Decimal>,
        pub percent_exchange_volume: Option<Decimal>,
        pub trades_count_24h: Option<i64>,
        pub source: Source,
        pub event_time: Micros,
        pub ingest_time: Micros,
    }
}

avro_record! {
    /// A CoinCap WebSocket price tick.
    pub struct Price: "price.avsc", key = |p| p.asset_id.clone();
    {
        pub asset_id: String,
        pub price_usd: Decimal,
        pub source: Source,
        pub event_time: Micros,
        pub ingest_time: Micros,
    }
}

avro_record! {
    /// One exchange trade or aggregate trade.
    pub struct Trade: "trade.avsc", key = |t| format!("{}:{}", t.venue, t.symbol);
    {
        pub venue: String,
        pub symbol: String,
        pub kind: TradeKind,
        pub trade_id: i64,
        pub price: Decimal,
        pub quantity: Decimal,
        pub buyer_is_maker: bool,
        pub first_trade_id: Option<i64>,
        pub last_trade_id: Option<i64>,
        pub source: Source,
        pub event_time: Micros,
        pub ingest_time: Micros,
    }
}

avro_record! {
    /// An OHLCV candle, from the exchange or aggregated by tickpipe.
    pub struct Candle: "candle.avsc", key = |c| format!("{}:{}", c.venue, c.symbol);
    {
        pub venue: String,
        pub symbol: String,
        pub interval: String,
        pub origin: CandleOrigin,
        pub open_time: Micros,
        pub close_time: Micros,
        pub open: Decimal,
        pub high: Decimal,
        pub low: Decimal,
        pub close: Decimal,
        pub volume: Decimal,
        pub quote_volume: Decimal,
        pub trade_count: i64,
        pub taker_buy_base_volume: Decimal,
        pub taker_buy_quote_volume: Decimal,
        pub first_trade_id: Option<i64>,
        pub last_trade_id: Option<i64>,
        pub closed: bool,
        pub source: Source,
        pub event_time: Micros,
        pub ingest_time: Micros,
    }
}

avro_record! {
    /// Input that could not be processed, with the reason. Keyed by the topic it
    /// came from or was meant for, so one topic's rejects stay in order.
    pub struct DeadLetter: "dead_letter.avsc", key = |d| d.topic.clone().unwrap_or_else(|| d.component.clone());
    {
        pub stage: String,
        pub error: String,
        pub component: String,
        pub topic: Option<String>,
        pub partition: Option<i32>,
        pub offset: Option<i64>,
        pub key: Option<Vec<u8>>,
        pub payload: Vec<u8>,
        pub source: Source,
        pub event_time: Micros,
        pub ingest_time: Micros,
    }
}
