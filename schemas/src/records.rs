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

/// The most payload bytes a dead letter carries: a letter must fit the
/// broker's `message.max.bytes` (1 MB by default) whatever it was made from.
pub const MAX_LETTER_PAYLOAD: usize = 256 * 1024;
/// The most bytes of a dead letter's key and of its error text.
pub const MAX_LETTER_TEXT: usize = 16 * 1024;

/// SHA-256 of `bytes`, in lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// `s` cut to at most `max` bytes, at a character boundary.
fn cut(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

impl DeadLetter {
    /// The letter within what any broker takes: a payload longer than
    /// [`MAX_LETTER_PAYLOAD`] keeps its first bytes, and the error says how
    /// long it was and its SHA-256, so that the original can be found and
    /// checked; a key or an error text past [`MAX_LETTER_TEXT`] is cut the
    /// same way. The metadata (stage, component, topic, partition, offset,
    /// times) is kept whole.
    pub fn bounded(mut self) -> Self {
        if self.payload.len() > MAX_LETTER_PAYLOAD {
            let note = format!(
                " [payload truncated to its first {MAX_LETTER_PAYLOAD} of {} bytes; sha256 {}]",
                self.payload.len(),
                sha256_hex(&self.payload)
            );
            self.payload.truncate(MAX_LETTER_PAYLOAD);
            cut(&mut self.error, MAX_LETTER_TEXT);
            self.error.push_str(&note);
        } else if self.error.len() > MAX_LETTER_TEXT {
            let len = self.error.len();
            cut(&mut self.error, MAX_LETTER_TEXT);
            self.error.push_str(&format!(" [error text truncated, {len} bytes]"));
        }
        if let Some(key) = self.key.as_mut().filter(|k| k.len() > MAX_LETTER_TEXT) {
            let note = format!(
                " [key truncated to its first {MAX_LETTER_TEXT} of {} bytes; sha256 {}]",
                key.len(),
                sha256_hex(key)
            );
            key.truncate(MAX_LETTER_TEXT);
            self.error.push_str(&note);
        }
        self
    }
}

impl DeadLetter {
    /// The Kafka Connect dead-letter headers (`errors.deadletterqueue.context.headers.enable`),
    /// so that the DLQ tooling built for Connect reads our letters too. The
    /// stage maps onto Connect's stage names: `parse` onto `TASK_POLL` (reading
    /// the external system), `decode` and `encode` onto `VALUE_CONVERTER`,
    /// `validate` and `aggregate` onto `TRANSFORMATION`, `write` onto
    /// `TASK_PUT`; the exception class is `tickpipe.<stage>`, its message the
    /// error text. Coordinates the letter lacks are left out.
    pub fn connect_headers(&self) -> Vec<(&'static str, String)> {
        let stage = match self.stage.as_str() {
            "parse" => "TASK_POLL",
            "decode" | "encode" => "VALUE_CONVERTER",
            "write" => "TASK_PUT",
            _ => "TRANSFORMATION",
        };
        let mut h = Vec::with_capacity(7);
        if let Some(t) = &self.topic {
            h.push(("__connect.errors.topic", t.clone()));
        }
        if let Some(p) = self.partition {
            h.push(("__connect.errors.partition", p.to_string()));
        }
        if let Some(o) = self.offset {
            h.push(("__connect.errors.offset", o.to_string()));
        }
        h.push(("__connect.errors.connector.name", self.component.clone()));
        h.push(("__connect.errors.stage", stage.to_owned()));
        h.push((
            "__connect.errors.exception.class.name",
            format!("tickpipe.{}", self.stage),
        ));
        h.push(("__connect.errors.exception.message", self.error.clone()));
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letters_carry_the_kafka_connect_headers() {
        let l = letter(vec![1], None, "price must be positive");
        let mut v = l.clone();
        v.stage = "validate".into();
        assert_eq!(
            v.connect_headers(),
            vec![
                ("__connect.errors.topic", "trades".to_owned()),
                ("__connect.errors.partition", "1".to_owned()),
                ("__connect.errors.offset", "42".to_owned()),
                ("__connect.errors.connector.name", "replay".to_owned()),
                ("__connect.errors.stage", "TRANSFORMATION".to_owned()),
                ("__connect.errors.exception.class.name", "tickpipe.validate".to_owned()),
                (
                    "__connect.errors.exception.message",
                    "price must be positive".to_owned()
                ),
            ]
        );
        let mut p = l;
        p.topic = None;
        p.partition = None;
        p.offset = None;
        let h = p.connect_headers();
        assert_eq!(h[0], ("__connect.errors.connector.name", "replay".to_owned()));
        assert_eq!(h[1], ("__connect.errors.stage", "TASK_POLL".to_owned()));
    }

    fn letter(payload: Vec<u8>, key: Option<Vec<u8>>, error: &str) -> DeadLetter {
        DeadLetter {
            stage: "parse".into(),
            error: error.into(),
            component: "replay".into(),
            topic: Some("trades".into()),
            partition: Some(1),
            offset: Some(42),
            key,
            payload,
            source: Source::Replay,
            event_time: 1,
            ingest_time: 2,
        }
    }

    #[test]
    fn small_letters_are_kept_as_they_are() {
        let l = letter(vec![7; MAX_LETTER_PAYLOAD], Some(vec![1; 10]), "bad");
        assert_eq!(l.clone().bounded(), l);
    }

    #[test]
    fn a_long_payload_keeps_its_prefix_size_and_digest() {
        let payload: Vec<u8> = (0..3_000_000_u32).map(|i| i as u8).collect();
        let digest = sha256_hex(&payload);
        let l = letter(payload.clone(), Some(vec![b'k'; 20_000]), "not json").bounded();
        assert_eq!(l.payload, payload[..MAX_LETTER_PAYLOAD]);
        assert!(l
            .error
            .starts_with("not json [payload truncated to its first 262144 of 3000000 bytes; sha256 "));
        assert!(l.error.contains(&digest), "{}", l.error);
        assert_eq!(l.key.as_ref().map(Vec::len), Some(MAX_LETTER_TEXT));
        assert!(
            l.error.contains("[key truncated to its first 16384 of 20000 bytes"),
            "{}",
            l.error
        );
        assert_eq!(
            (l.topic.as_deref(), l.partition, l.offset),
            (Some("trades"), Some(1), Some(42))
        );
        // SHA-256 of "abc", FIPS 180-2.
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn long_error_text_is_cut_at_a_character_boundary() {
        let l = letter(vec![], None, &"é".repeat(10_000)).bounded();
        assert!(l.error.len() < MAX_LETTER_TEXT + 64);
        assert!(
            l.error.ends_with(" [error text truncated, 20000 bytes]"),
            "{}",
            &l.error[l.error.len() - 60..]
        );
    }
}
