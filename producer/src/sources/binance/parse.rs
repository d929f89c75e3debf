//! Binance's wire formats, bytes in and typed records out: WebSocket messages
//! (combined or raw streams), REST trades, aggregate trades and klines, and the
//! data.binance.vision CSV rows. No I/O; every function here is tested against
//! recorded real messages.

use std::borrow::Cow;

use serde::Deserialize;
use tickpipe_schemas::{Candle, CandleOrigin, Micros, Source, Trade, TradeKind};

use crate::item::{decimal, micros};

/// What one WebSocket text frame said.
#[derive(Debug, Clone, PartialEq)]
pub enum WsEvent {
    /// A trade or aggregate trade.
    Trade(Trade),
    /// A trade Binance leaves out of its klines (see [`excluded_trade`]), with
    /// the reason: a dead letter, but a real id, which counts as seen.
    Excluded(Trade, String),
    /// A closed kline (`x: true`).
    Candle(Candle),
    /// A kline update of a candle still open: not published.
    OpenKline,
    /// `serverShutdown`: this connection will be closed soon.
    ServerShutdown,
    /// A reply to a control message (`{"result":null,"id":7}`).
    Reply,
    /// A stream this source does not publish (depth, bookTicker, ...).
    Other,
}

/// Who and when, for records built from one message.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub venue: &'a str,
    pub source: Source,
    pub ingest_time: Micros,
}

/// A JSON string borrowed from the message when it has no escapes. serde
/// borrows a `Cow<str>` field only when it is the field's own type, not inside
/// an `Option`, where it would allocate every time; this newtype keeps the
/// borrow for optional fields.
#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

impl std::ops::Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Text<'_> {
    fn into_owned(self) -> String {
        self.0.into_owned()
    }
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    stream: Option<Text<'a>>,
    #[serde(borrow)]
    data: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow)]
    e: Option<Text<'a>>,
    id: Option<serde_json::Value>,
}

/// A combined-stream message of a stream this source publishes, read in one
/// pass (the general path reads the envelope, then the payload again).
#[derive(Deserialize)]
struct Combined<'a> {
    #[serde(borrow)]
    stream: Cow<'a, str>,
    #[serde(borrow)]
    data: Payload<'a>,
}

/// True for the event types this source publishes; the payloads of others
/// (depth, bookTicker, ...) reuse field names with other types and are not read.
pub fn published(event_or_stream: &str) -> bool {
    // A plain loop: names are short, and this runs for every line of a capture.
    let kind = match event_or_stream.bytes().rposition(|b| b == b'@') {
        Some(at) => &event_or_stream[at + 1..],
        None => event_or_stream,
    };
    kind == "trade" || kind == "aggTrade" || kind.starts_with("kline")
}

/// The fields of every Binance market payload this source reads; the event type
/// `e` says which are present.
#[derive(Deserialize)]
#[allow(non_snake_case)]
struct Payload<'a> {
    #[serde(borrow)]
    e: Option<Text<'a>>,
    E: Option<i64>,
    #[serde(borrow)]
    s: Option<Text<'a>>,
    t: Option<i64>,
    a: Option<i64>,
    #[serde(borrow)]
    p: Option<Text<'a>>,
    #[serde(borrow)]
    q: Option<Text<'a>>,
    f: Option<i64>,
    l: Option<i64>,
    T: Option<i64>,
    m: Option<bool>,
    /// Futures only: the order type; anything but `MARKET` is not a real trade.
    #[serde(borrow)]
    X: Option<Text<'a>>,
    /// Boxed: most payloads are trades, and this keeps `Payload` small to move.
    #[serde(borrow)]
    k: Option<Box<Kline<'a>>>,
}

#[derive(Deserialize)]
#[allow(non_snake_case)]
struct Kline<'a> {
    t: i64,
    T: i64,
    #[serde(borrow)]
    s: Cow<'a, str>,
    #[serde(borrow)]
    i: Cow<'a, str>,
    f: i64,
    L: i64,
    #[serde(borrow)]
    o: Cow<'a, str>,
    #[serde(borrow)]
    c: Cow<'a, str>,
    #[serde(borrow)]
    h: Cow<'a, str>,
    #[serde(borrow)]
    l: Cow<'a, str>,
    #[serde(borrow)]
    v: Cow<'a, str>,
    n: i64,
    x: bool,
    #[serde(borrow)]
    q: Cow<'a, str>,
    #[serde(borrow)]
    V: Cow<'a, str>,
    #[serde(borrow)]
    Q: Cow<'a, str>,
}

fn need<T>(v: Option<T>, field: &str, event: &str) -> Result<T, String> {
    v.ok_or_else(|| format!("{event} message without field {field:?}"))
}

/// Parses one WebSocket text frame: a combined-stream envelope
/// (`{"stream":…,"data":{…}}`), a raw-stream payload, `serverShutdown`, or a
/// control reply. An error is the reason the frame goes to dead letters.
pub fn ws_message(text: &str, origin: Origin<'_>) -> Result<WsEvent, String> {
    // Binance writes the stream name first: streams this source does not publish
    // (depth updates are most of a capture, and large) are told apart without
    // reading the JSON. Anything else takes the full path below.
    if let Some(rest) = text.strip_prefix("{\"stream\":\"") {
        if let Some((stream, _)) = rest.split_once('"') {
            if !published(stream) {
                return Ok(WsEvent::Other);
            }
            if let Ok(c) = serde_json::from_str::<Combined<'_>>(text) {
                return payload(c.data, Some(&c.stream), origin);
            }
        }
    }
    let env: Envelope<'_> = serde_json::from_str(text).map_err(|e| format!("not a Binance message: {e}"))?;
    if let Some(data) = env.data {
        return match env.stream.as_deref() {
            Some(stream) if !published(stream) => Ok(WsEvent::Other),
            stream => {
                let p: Payload<'_> =
                    serde_json::from_str(data.get()).map_err(|e| format!("not a Binance message: {e}"))?;
                payload(p, stream, origin)
            }
        };
    }
    match env.e.as_deref() {
        Some("serverShutdown") => Ok(WsEvent::ServerShutdown),
        Some(e) if !published(e) => Ok(WsEvent::Other),
        Some(_) => {
            // A raw stream (`/ws/<stream>`): the payload is the whole message.
            let p: Payload<'_> = serde_json::from_str(text).map_err(|e| format!("not a Binance message: {e}"))?;
            payload(p, None, origin)
        }
        None if env.id.is_some() => Ok(WsEvent::Reply),
        None => Err("message has neither a stream, an event type nor a reply id".into()),
    }
}

fn payload(p: Payload<'_>, stream: Option<&str>, origin: Origin<'_>) -> Result<WsEvent, String> {
    let Some(event) = p.e.as_deref() else {
        // bookTicker has no `e`: route by stream name; nothing else is expected here.
        return match stream {
            Some(s) if s.contains('@') => Ok(WsEvent::Other),
            _ => Err("payload without event type".into()),
        };
    };
    match event {
        "trade" | "aggTrade" => {
            let kind = if event == "trade" {
                TradeKind::Trade
            } else {
                TradeKind::AggTrade
            };
            let (id, first, last) = match kind {
                TradeKind::Trade => (need(p.t, "t", event)?, None, None),
                TradeKind::AggTrade => (
                    need(p.a, "a", event)?,
                    Some(need(p.f, "f", event)?),
                    Some(need(p.l, "l", event)?),
                ),
            };
            let trade = Trade {
                venue: origin.venue.to_owned(),
                symbol: need(p.s, "s", event)?.into_owned(),
                kind,
                trade_id: id,
                price: decimal("p", &need(p.p, "p", event)?)?,
                quantity: decimal("q", &need(p.q, "q", event)?)?,
                buyer_is_maker: need(p.m, "m", event)?,
                first_trade_id: first,
                last_trade_id: last,
                source: origin.source,
                event_time: micros(need(p.T, "T", event)?),
                ingest_time: origin.ingest_time,
            };
            match excluded_trade(&trade, p.X.as_deref()) {
                Ok(()) => Ok(WsEvent::Trade(trade)),
                Err(reason) => Ok(WsEvent::Excluded(trade, reason)),
            }
        }
        "kline" => {
            let k = need(p.k, "k", event)?;
            if !k.x {
                return Ok(WsEvent::OpenKline);
            }
            Ok(WsEvent::Candle(Candle {
                venue: origin.venue.to_owned(),
                symbol: k.s.into_owned(),
                interval: k.i.into_owned(),
                origin: CandleOrigin::ExchangeKline,
                open_time: micros(k.t),
                close_time: micros(k.T),
                open: decimal("o", &k.o)?,
                high: decimal("h", &k.h)?,
                low: decimal("l", &k.l)?,
                close: decimal("c", &k.c)?,
                volume: decimal("v", &k.v)?,
                quote_volume: decimal("q", &k.q)?,
                trade_count: k.n,
                taker_buy_base_volume: decimal("V", &k.V)?,
                taker_buy_quote_volume: decimal("Q", &k.Q)?,
                first_trade_id: (k.f >= 0).then_some(k.f),
                last_trade_id: (k.L >= 0).then_some(k.L),
                closed: true,
                source: origin.source,
                event_time: micros(need(p.E, "E", event)?),
                ingest_time: origin.ingest_time,
            }))
        }
        "serverShutdown" => Ok(WsEvent::ServerShutdown),
        _ => Ok(WsEvent::Other),
    }
}

/// Trades Binance itself leaves out of its klines, as errors: old audited
/// aggregate trades (`p = q = 0`, `f = l = -1`) and futures trades whose order
/// type `X` is not `MARKET` (they carry zero price and quantity). Both are
/// reported so they reach the dead letters with this reason.
pub fn excluded_trade(t: &Trade, order_type: Option<&str>) -> Result<(), String> {
    if t.first_trade_id == Some(-1) && t.last_trade_id == Some(-1) {
        return Err(format!(
            "invalid audited aggregate trade {} (first and last trade id -1)",
            t.trade_id
        ));
    }
    match order_type {
        Some("MARKET") | None => Ok(()),
        Some(x) => Err(format!("trade {} is not a MARKET trade (X = {x:?})", t.trade_id)),
    }
}

/// `GET /api/v3/historicalTrades` and `/api/v3/trades` rows.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestTrade {
    pub id: i64,
    pub price: String,
    pub qty: String,
    pub time: i64,
    pub is_buyer_maker: bool,
}

/// `GET /api/v3/aggTrades` rows.
#[derive(Debug, Deserialize)]
#[allow(non_snake_case)]
pub struct RestAggTrade {
    pub a: i64,
    pub p: String,
    pub q: String,
    pub f: i64,
    pub l: i64,
    pub T: i64,
    pub m: bool,
}

impl RestTrade {
    pub fn into_trade(self, symbol: &str, origin: Origin<'_>) -> Result<Trade, String> {
        Ok(Trade {
            venue: origin.venue.to_owned(),
            symbol: symbol.to_owned(),
            kind: TradeKind::Trade,
            trade_id: self.id,
            price: decimal("price", &self.price)?,
            quantity: decimal("qty", &self.qty)?,
            buyer_is_maker: self.is_buyer_maker,
            first_trade_id: None,
            last_trade_id: None,
            source: origin.source,
            event_time: micros(self.time),
            ingest_time: origin.ingest_time,
        })
    }
}

impl RestAggTrade {
    pub fn into_trade(self, symbol: &str, origin: Origin<'_>) -> Result<Trade, String> {
        let t = Trade {
            venue: origin.venue.to_owned(),
            symbol: symbol.to_owned(),
            kind: TradeKind::AggTrade,
            trade_id: self.a,
            price: decimal("p", &self.p)?,
            quantity: decimal("q", &self.q)?,
            buyer_is_maker: self.m,
            first_trade_id: Some(self.f),
            last_trade_id: Some(self.l),
            source: origin.source,
            event_time: micros(self.T),
            ingest_time: origin.ingest_time,
        };
        excluded_trade(&t, None)?;
        Ok(t)
    }
}

/// A kline row (REST `/api/v3/klines` or a data.binance.vision CSV line) as
/// its twelve text fields: open time, open, high, low, close, volume, close
/// time, quote volume, trade count, taker-buy base, taker-buy quote, ignore.
/// Returns `None` for a candle still open at `now` (the last REST row may be).
pub fn kline_row(
    f: &[&str],
    symbol: &str,
    interval: &str,
    origin: Origin<'_>,
    now: Micros,
) -> Result<Option<Candle>, String> {
    if f.len() < 11 {
        return Err(format!("kline row has {} fields, expected 12", f.len()));
    }
    let int = |i: usize, name: &str| -> Result<i64, String> {
        f[i].trim()
            .parse::<i64>()
            .map_err(|e| format!("{name}: {:?} is not an integer ({e})", f[i]))
    };
    let close_time = micros(int(6, "close time")?);
    if close_time > now {
        return Ok(None);
    }
    Ok(Some(Candle {
        venue: origin.venue.to_owned(),
        symbol: symbol.to_owned(),
        interval: interval.to_owned(),
        origin: CandleOrigin::ExchangeKline,
        open_time: micros(int(0, "open time")?),
        close_time,
        open: decimal("open", f[1])?,
        high: decimal("high", f[2])?,
        low: decimal("low", f[3])?,
        close: decimal("close", f[4])?,
        volume: decimal("volume", f[5])?,
        quote_volume: decimal("quote volume", f[7])?,
        trade_count: int(8, "trade count")?,
        taker_buy_base_volume: decimal("taker buy base volume", f[9])?,
        taker_buy_quote_volume: decimal("taker buy quote volume", f[10])?,
        first_trade_id: None,
        last_trade_id: None,
        closed: true,
        source: origin.source,
        event_time: close_time,
        ingest_time: origin.ingest_time,
    }))
}

/// The text fields of one REST kline row (a JSON array of strings and numbers).
pub fn kline_json_fields(row: &serde_json::Value) -> Result<Vec<String>, String> {
    let arr = row.as_array().ok_or("kline row is not an array")?;
    arr.iter()
        .map(|v| match v {
            serde_json::Value::String(s) => Ok(s.clone()),
            serde_json::Value::Number(n) => Ok(n.to_string()),
            other => Err(format!("kline field {other} is neither a string nor a number")),
        })
        .collect()
}

/// A data.binance.vision `trades` CSV row: id, price, qty, quoteQty, time,
/// isBuyerMaker, isBestMatch.
pub fn trade_csv_row(f: &[&str], symbol: &str, origin: Origin<'_>) -> Result<Trade, String> {
    if f.len() < 6 {
        return Err(format!("trade row has {} fields, expected 7", f.len()));
    }
    Ok(Trade {
        venue: origin.venue.to_owned(),
        symbol: symbol.to_owned(),
        kind: TradeKind::Trade,
        trade_id: int_field(f[0], "id")?,
        price: decimal("price", f[1])?,
        quantity: decimal("qty", f[2])?,
        buyer_is_maker: bool_field(f[5], "isBuyerMaker")?,
        first_trade_id: None,
        last_trade_id: None,
        source: origin.source,
        event_time: micros(int_field(f[4], "time")?),
        ingest_time: origin.ingest_time,
    })
}

/// A data.binance.vision `aggTrades` CSV row: aggId, price, qty, firstId,
/// lastId, time, isBuyerMaker, isBestMatch.
pub fn agg_trade_csv_row(f: &[&str], symbol: &str, origin: Origin<'_>) -> Result<Trade, String> {
    if f.len() < 7 {
        return Err(format!("aggTrade row has {} fields, expected 8", f.len()));
    }
    let t = Trade {
        venue: origin.venue.to_owned(),
        symbol: symbol.to_owned(),
        kind: TradeKind::AggTrade,
        trade_id: int_field(f[0], "aggId")?,
        price: decimal("price", f[1])?,
        quantity: decimal("qty", f[2])?,
        buyer_is_maker: bool_field(f[6], "isBuyerMaker")?,
        first_trade_id: Some(int_field(f[3], "firstId")?),
        last_trade_id: Some(int_field(f[4], "lastId")?),
        source: origin.source,
        event_time: micros(int_field(f[5], "time")?),
        ingest_time: origin.ingest_time,
    };
    excluded_trade(&t, None)?;
    Ok(t)
}

fn int_field(s: &str, name: &str) -> Result<i64, String> {
    s.trim()
        .parse()
        .map_err(|e| format!("{name}: {s:?} is not an integer ({e})"))
}

fn bool_field(s: &str, name: &str) -> Result<bool, String> {
    match s.trim() {
        "true" | "True" | "TRUE" | "1" => Ok(true),
        "false" | "False" | "FALSE" | "0" => Ok(false),
        other => Err(format!("{name}: {other:?} is not a boolean")),
    }
}

#[cfg(test)]
mod tests {
    use rust_decimal::Decimal;

    use super::*;

    const ORIGIN: Origin<'static> = Origin {
        venue: "binance",
        source: Source::Binance,
        ingest_time: 1,
    };

    fn check(text: &str, want: Result<&str, &str>) {
        let got = ws_message(text, ORIGIN);
        match (got, want) {
            (Ok(ev), Ok(kind)) => assert!(format!("{ev:?}").starts_with(kind), "{text}: {ev:?}"),
            (Err(e), Err(part)) => assert!(e.contains(part), "{text}: {e}"),
            (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn optional_strings_are_borrowed_unless_escaped() {
        let p: Payload<'_> = serde_json::from_str(r#"{"s":"BTCUSDT","p":"1\u002e5"}"#).unwrap();
        assert!(matches!(p.s.map(|t| t.0), Some(Cow::Borrowed("BTCUSDT"))));
        assert!(matches!(p.p.map(|t| t.0), Some(Cow::Owned(v)) if v == "1.5"));
    }

    #[test]
    fn messages_of_every_shape() {
        // Shaped exactly like the documented examples.
        check(
            r#"{"stream":"btcusdt@trade","data":{"e":"trade","E":1767225600101,"s":"BTCUSDT","t":5123456789,"p":"68040.01000000","q":"0.00150000","T":1767225600100,"m":false,"M":true}}"#,
            Ok("Trade"),
        );
        check(
            r#"{"e":"aggTrade","E":1767225600105,"s":"BTCUSDT","a":3312345678,"p":"68040.01000000","q":"0.01200000","f":5123456790,"l":5123456792,"T":1767225600104,"m":true,"M":true}"#,
            Ok("Trade"),
        );
        check(
            r#"{"stream":"btcusdt@kline_1m","data":{"e":"kline","E":1767225660002,"s":"BTCUSDT","k":{"t":1767225600000,"T":1767225659999,"s":"BTCUSDT","i":"1m","f":5123456700,"L":5123457100,"o":"68010.00000000","c":"68040.01000000","h":"68055.00000000","l":"68001.20000000","v":"12.48100000","n":401,"x":true,"q":"849112.33120000","V":"6.10200000","Q":"415120.88000000","B":"0"}}}"#,
            Ok("Candle"),
        );
        check(
            r#"{"stream":"btcusdt@kline_1m","data":{"e":"kline","E":1767225660002,"s":"BTCUSDT","k":{"t":1767225600000,"T":1767225659999,"s":"BTCUSDT","i":"1m","f":5123456700,"L":5123457100,"o":"68010.00000000","c":"68040.01000000","h":"68055.00000000","l":"68001.20000000","v":"12.48100000","n":401,"x":false,"q":"849112.33120000","V":"6.10200000","Q":"415120.88000000","B":"0"}}}"#,
            Ok("OpenKline"),
        );
        check(r#"{"e":"serverShutdown","E":1767225600000}"#, Ok("ServerShutdown"));
        check(r#"{"result":null,"id":7}"#, Ok("Reply"));
        check(
            r#"{"stream":"btcusdt@bookTicker","data":{"u":1,"s":"BTCUSDT","b":"1","B":"1","a":"1","A":"1"}}"#,
            Ok("Other"),
        );
        check(
            r#"{"stream":"btcusdt@trade","data":{"e":"trade","E":1"#,
            Err("not a Binance message"),
        );
        check(
            r#"{"stream":"btcusdt@trade","data":{"e":"trade","E":1,"s":"BTCUSDT","t":5,"p":"x","q":"1","T":1,"m":false}}"#,
            Err("p: \"x\""),
        );
        check(
            r#"{"stream":"btcusdt@trade","data":{"e":"trade","E":1,"s":"BTCUSDT","p":"1","q":"1","T":1,"m":false}}"#,
            Err("field \"t\""),
        );
        // A string with an escape is read like any other; a field of the wrong
        // type fails the one-pass read and gets the general path's reason.
        check(
            r#"{"stream":"btcusdt@trade","data":{"e":"trade","E":1,"s":"BTC\u0055SDT","t":5,"p":"1","q":"1","T":1,"m":false}}"#,
            Ok("Trade"),
        );
        check(
            r#"{"stream":"btcusdt@trade","data":{"e":"trade","E":1,"s":"BTCUSDT","t":"5","p":"1","q":"1","T":1,"m":false}}"#,
            Err("not a Binance message: invalid type"),
        );
        check(
            r#"{"e":"aggTrade","E":1,"s":"XRPETH","a":1,"p":"0","q":"0","f":-1,"l":-1,"T":1570752011620,"m":true,"M":true}"#,
            Ok("Excluded"),
        );
        check(
            r#"{"e":"trade","E":1,"s":"TRXUSDT","t":548331095,"p":"0.0","q":"0.0","T":1,"m":false,"X":"NA"}"#,
            Ok("Excluded"),
        );
        let excluded = ws_message(
            r#"{"e":"trade","E":1,"s":"TRXUSDT","t":548331095,"p":"0.0","q":"0.0","T":1,"m":false,"X":"NA"}"#,
            ORIGIN,
        );
        assert!(
            matches!(&excluded, Ok(WsEvent::Excluded(t, why)) if t.trade_id == 548_331_095 && why.contains("not a MARKET trade")),
            "{excluded:?}"
        );
        check("Unauthorized", Err("not a Binance message"));
    }

    #[test]
    fn a_trade_keeps_every_field_exactly() {
        let ev = ws_message(
            r#"{"stream":"btcusdt@trade","data":{"e":"trade","E":1767225600101,"s":"BTCUSDT","t":5123456789,"p":"68040.01000000","q":"0.00150000","T":1767225600100,"m":false,"M":true}}"#,
            ORIGIN,
        );
        let Ok(WsEvent::Trade(t)) = ev else { panic!("{ev:?}") };
        assert_eq!(t.symbol, "BTCUSDT");
        assert_eq!(t.trade_id, 5123456789);
        assert_eq!(t.price, Decimal::new(6804001, 2));
        assert_eq!(t.quantity, Decimal::new(15, 4));
        assert!(!t.buyer_is_maker);
        assert_eq!(t.event_time, 1_767_225_600_100_000);
    }

    #[test]
    fn kline_rows_skip_the_open_candle() {
        let row = "1637971200000,0.00002184,0.00002187,0.00002180,0.00002183,63117.00000000,1637971259999,1.37817050,33,28744.00000000,0.62767836,0";
        let f: Vec<&str> = row.split(',').collect();
        let c = kline_row(&f, "ADABTC", "1m", ORIGIN, i64::MAX).unwrap().unwrap();
        assert_eq!(c.trade_count, 33);
        assert_eq!(c.close_time, 1_637_971_259_999_000);
        assert_eq!(kline_row(&f, "ADABTC", "1m", ORIGIN, 1_637_971_259_000_000), Ok(None));
        let json: serde_json::Value = serde_json::from_str(r#"[1499040000000,"0.01634790","0.80000000","0.01575800","0.01577100","148976.11427815",1499644799999,"2434.19055334",308,"1756.87402397","28.46694368","0"]"#).unwrap();
        let fields = kline_json_fields(&json).unwrap();
        let f: Vec<&str> = fields.iter().map(String::as_str).collect();
        assert!(kline_row(&f, "LTCBTC", "1d", ORIGIN, i64::MAX).unwrap().is_some());
    }
}
