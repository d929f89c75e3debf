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

/// Where a record failed: the `stage` of its dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Reading the upstream's input (an exchange's frame, a file's line).
    Parse,
    /// Reading a Kafka record's framing and schema.
    Decode,
    /// The meaning checks the schema cannot express.
    Validate,
    /// Writing a record's Avro.
    Encode,
    /// Building candles.
    Aggregate,
    /// The sink's target refused it.
    Write,
}

impl Stage {
    /// Every stage.
    pub const ALL: [Stage; 6] = [
        Stage::Parse,
        Stage::Decode,
        Stage::Validate,
        Stage::Encode,
        Stage::Aggregate,
        Stage::Write,
    ];

    /// Its name in letters, metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Parse => "parse",
            Stage::Decode => "decode",
            Stage::Validate => "validate",
            Stage::Encode => "encode",
            Stage::Aggregate => "aggregate",
            Stage::Write => "write",
        }
    }

    /// The stage of a letter's `stage` text.
    pub fn from_name(name: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Kafka Connect's name of the stage: `parse` is `TASK_POLL` (reading the
    /// external system), `decode` and `encode` are `VALUE_CONVERTER`,
    /// `validate` and `aggregate` are `TRANSFORMATION`, `write` is `TASK_PUT`.
    pub fn connect_name(self) -> &'static str {
        match self {
            Stage::Parse => "TASK_POLL",
            Stage::Decode | Stage::Encode => "VALUE_CONVERTER",
            Stage::Validate | Stage::Aggregate => "TRANSFORMATION",
            Stage::Write => "TASK_PUT",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a refused record comes from, as far as it is known.
#[derive(Debug, Clone, Copy, Default)]
pub struct Origin<'a> {
    /// The topic it was read from, or meant for.
    pub topic: Option<&'a str>,
    /// Its partition and offset, when it was read from Kafka.
    pub at: Option<(i32, i64)>,
    /// Its Kafka key.
    pub key: Option<&'a [u8]>,
}

impl<'a> Origin<'a> {
    /// A record read from Kafka.
    pub fn kafka(topic: &'a str, partition: i32, offset: i64, key: Option<&'a [u8]>) -> Self {
        Origin {
            topic: Some(topic),
            at: Some((partition, offset)),
            key,
        }
    }

    /// A record meant for `topic` (full name) that never got there.
    pub fn meant_for(topic: &'a str) -> Self {
        Origin {
            topic: Some(topic),
            ..Origin::default()
        }
    }
}

impl DeadLetter {
    /// The dead letter of a record `component` refused at `stage`, bounded
    /// ([`DeadLetter::bounded`]): every service builds its letters here.
    pub fn new(
        component: &str,
        stage: Stage,
        error: impl Into<String>,
        payload: Vec<u8>,
        source: Source,
        origin: Origin<'_>,
        now: Micros,
    ) -> Self {
        DeadLetter {
            stage: stage.as_str().to_owned(),
            error: error.into(),
            component: component.to_owned(),
            topic: origin.topic.map(str::to_owned),
            partition: origin.at.map(|(p, _)| p),
            offset: origin.at.map(|(_, o)| o),
            key: origin.key.map(<[u8]>::to_vec),
            payload,
            source,
            event_time: now,
            ingest_time: now,
        }
        .bounded()
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
    /// stage is Connect's name of it ([`Stage::connect_name`]; a stage this
    /// release does not know is `TRANSFORMATION`); the exception class is
    /// `tickpipe.<stage>`, its message the error text. Coordinates the letter
    /// lacks are left out.
    pub fn connect_headers(&self) -> Vec<(&'static str, String)> {
        let stage = Stage::from_name(&self.stage).map_or("TRANSFORMATION", Stage::connect_name);
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

    #[test]
    fn stages_have_one_name_each_and_a_connect_name() {
        for stage in Stage::ALL {
            assert_eq!(Stage::from_name(stage.as_str()), Some(stage));
        }
        assert_eq!(Stage::from_name("transform"), None);
        assert_eq!(Stage::Parse.connect_name(), "TASK_POLL");
        assert_eq!(Stage::Write.connect_name(), "TASK_PUT");
    }

    #[test]
    fn a_new_letter_keeps_its_origin_and_is_bounded() {
        let payload = vec![7; MAX_LETTER_PAYLOAD + 1];
        let l = DeadLetter::new(
            "postgres-sink",
            Stage::Write,
            "refused",
            payload,
            Source::Binance,
            Origin::kafka("dev.trades", 2, 41, Some(b"k")),
            5,
        );
        assert_eq!((l.stage.as_str(), l.component.as_str()), ("write", "postgres-sink"));
        assert_eq!(
            (l.topic.as_deref(), l.partition, l.offset, l.key.as_deref()),
            (Some("dev.trades"), Some(2), Some(41), Some(&b"k"[..]))
        );
        assert_eq!(l.payload.len(), MAX_LETTER_PAYLOAD);
        assert!(l.error.starts_with("refused [payload truncated"), "{}", l.error);
        let meant = DeadLetter::new(
            "producer",
            Stage::Encode,
            "x",
            vec![],
            Source::Unknown,
            Origin::meant_for("t"),
            5,
        );
        assert_eq!((meant.topic.as_deref(), meant.partition), (Some("t"), None));
    }
}
