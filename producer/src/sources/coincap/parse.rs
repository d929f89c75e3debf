//! CoinCap v3 responses, bytes in and typed records out. Numbers arrive as
//! decimal strings (sometimes as JSON numbers, and some nullable); both become
//! exact decimals. No I/O.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde_json::{Map, Value};
use tickpipe_schemas::{Asset, Exchange, Market, Micros, Price, Rate, RateType, Source};

use crate::item::{decimal, micros};

/// Which list a response holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entity {
    Assets,
    Rates,
    Exchanges,
    Markets,
}

impl Entity {
    pub const ALL: [Entity; 4] = [Entity::Assets, Entity::Rates, Entity::Exchanges, Entity::Markets];

    pub fn path(self) -> &'static str {
        match self {
            Entity::Assets => "assets",
            Entity::Rates => "rates",
            Entity::Exchanges => "exchanges",
            Entity::Markets => "markets",
        }
    }
}

/// A whole response that cannot be used at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// `data` is an object: the retired v2 API's deprecation notice.
    #[error("the server answered with the retired CoinCap v2 deprecation notice ({0}); point TICKPIPE_COINCAP_REST_URL at the v3 API, https://rest.coincap.io/v3")]
    Deprecated(String),
    #[error("not a CoinCap response: {0}")]
    Malformed(String),
}

/// The rows of a list response and its `timestamp` (µs).
pub fn envelope(body: &[u8]) -> Result<(Vec<Value>, Micros), EnvelopeError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
    let ts = v.get("timestamp").and_then(Value::as_i64).map(micros).unwrap_or(0);
    match v.get("data") {
        Some(Value::Array(rows)) => Ok((rows.clone(), ts)),
        Some(Value::Object(o)) => {
            let text = o
                .values()
                .find_map(Value::as_str)
                .unwrap_or("data is an object, not a list")
                .chars()
                .take(200)
                .collect();
            Err(EnvelopeError::Deprecated(text))
        }
        _ => Err(EnvelopeError::Malformed("no \"data\" list".into())),
    }
}

fn obj(row: &Value) -> Result<&Map<String, Value>, String> {
    row.as_object().ok_or_else(|| "row is not an object".to_owned())
}

fn text(o: &Map<String, Value>, k: &str) -> Result<String, String> {
    match o.get(k) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        _ => Err(format!("field {k:?} is missing")),
    }
}

fn opt_text(o: &Map<String, Value>, k: &str) -> Option<String> {
    match o.get(k) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

fn dec(o: &Map<String, Value>, k: &str) -> Result<Decimal, String> {
    opt_dec(o, k)?.ok_or_else(|| format!("field {k:?} is missing"))
}

fn opt_dec(o: &Map<String, Value>, k: &str) -> Result<Option<Decimal>, String> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => decimal(k, s).map(Some),
        // A JSON number: its own digits, never through f64.
        Some(Value::Number(n)) => decimal(k, &n.to_string()).map(Some),
        Some(other) => Err(format!("field {k:?} is not a number: {other}")),
    }
}

/// A percentage CoinCap derives itself (share of volume, 24 h change). It can
/// carry more fractional digits (22 are seen) than the wire's 18; unlike money
/// and quantities, these statistics are rounded half-even to 18 digits rather
/// than refused, so that whole rows are not lost to noise digits.
fn opt_percent(o: &Map<String, Value>, k: &str) -> Result<Option<Decimal>, String> {
    Ok(opt_dec(o, k)?.map(|d| d.round_dp(18)))
}

fn int(o: &Map<String, Value>, k: &str) -> Result<i64, String> {
    opt_int(o, k)?.ok_or_else(|| format!("field {k:?} is missing"))
}

fn opt_int(o: &Map<String, Value>, k: &str) -> Result<Option<i64>, String> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| format!("field {k:?} is not an integer: {n}")),
        Some(Value::String(s)) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|e| format!("field {k:?}: {s:?} is not an integer ({e})")),
        Some(other) => Err(format!("field {k:?} is not an integer: {other}")),
    }
}

fn int32(o: &Map<String, Value>, k: &str) -> Result<i32, String> {
    i32::try_from(int(o, k)?).map_err(|_| format!("field {k:?} is out of range"))
}

/// Timestamps shared by every row of one response.
#[derive(Debug, Clone, Copy)]
pub struct Times {
    /// The response's `timestamp`, the event time of rows without their own.
    pub response: Micros,
    pub ingest: Micros,
    pub source: Source,
}

pub fn asset(row: &Value, t: Times) -> Result<Asset, String> {
    let o = obj(row)?;
    let mut tokens = BTreeMap::new();
    if let Some(Value::Object(m)) = o.get("tokens") {
        for (chain, v) in m {
            let list = match v {
                Value::Array(a) => a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect(),
                Value::String(s) => vec![s.clone()],
                _ => Vec::new(),
            };
            tokens.insert(chain.clone(), list);
        }
    }
    Ok(Asset {
        id: text(o, "id")?,
        rank: int32(o, "rank")?,
        symbol: text(o, "symbol")?,
        name: text(o, "name")?,
        supply: dec(o, "supply")?,
        // "0" means unlimited, like null.
        max_supply: opt_dec(o, "maxSupply")?.filter(|d| !d.is_zero()),
        market_cap_usd: opt_dec(o, "marketCapUsd")?,
        volume_usd_24h: opt_dec(o, "volumeUsd24Hr")?,
        price_usd: dec(o, "priceUsd")?,
        change_percent_24h: opt_percent(o, "changePercent24Hr")?,
        vwap_24h: opt_dec(o, "vwap24Hr")?,
        explorer: opt_text(o, "explorer"),
        tokens,
        source: t.source,
        event_time: t.response,
        ingest_time: t.ingest,
    })
}

pub fn rate(row: &Value, t: Times) -> Result<Rate, String> {
    let o = obj(row)?;
    Ok(Rate {
        id: text(o, "id")?,
        symbol: text(o, "symbol")?,
        currency_symbol: opt_text(o, "currencySymbol"),
        rate_type: match opt_text(o, "type").as_deref() {
            Some("crypto") => RateType::Crypto,
            Some("fiat") => RateType::Fiat,
            _ => RateType::Unknown,
        },
        rate_usd: dec(o, "rateUsd")?,
        source: t.source,
        event_time: t.response,
        ingest_time: t.ingest,
    })
}

pub fn exchange(row: &Value, t: Times) -> Result<Exchange, String> {
    let o = obj(row)?;
    // v3 names the key `exchangeId`; v2-shaped rows call it `id`.
    let id = text(o, "exchangeId").or_else(|_| text(o, "id"))?;
    Ok(Exchange {
        exchange_id: id,
        name: text(o, "name")?,
        rank: int32(o, "rank")?,
        percent_total_volume: opt_percent(o, "percentTotalVolume")?,
        volume_usd: opt_dec(o, "volumeUsd")?,
        trading_pairs: int32(o, "tradingPairs")?,
        socket: o.get("socket").and_then(Value::as_bool),
        exchange_url: opt_text(o, "exchangeUrl"),
        source: t.source,
        event_time: opt_int(o, "updated")?.map(micros).unwrap_or(t.response),
        ingest_time: t.ingest,
    })
}

pub fn market(row: &Value, t: Times) -> Result<Market, String> {
    let o = obj(row)?;
    Ok(Market {
        exchange_id: text(o, "exchangeId")?,
        rank: int32(o, "rank")?,
        base_symbol: text(o, "baseSymbol")?,
        base_id: text(o, "baseId")?,
        quote_symbol: text(o, "quoteSymbol")?,
        quote_id: text(o, "quoteId")?,
        price_quote: dec(o, "priceQuote")?,
        price_usd: dec(o, "priceUsd")?,
        volume_usd_24h: opt_dec(o, "volumeUsd24Hr")?,
        percent_exchange_volume: opt_percent(o, "percentExchangeVolume")?,
        trades_count_24h: opt_int(o, "tradesCount24Hr")?,
        source: t.source,
        event_time: opt_int(o, "updated")?.map(micros).unwrap_or(t.response),
        ingest_time: t.ingest,
    })
}

/// One WebSocket prices frame (`{"bitcoin":"68051.2231",...}`): a price per
/// asset, or per asset the reason it could not be read.
pub fn prices(text: &str, t: Times) -> Result<Vec<Result<Price, String>>, String> {
    if text.trim_start().starts_with("Unauthorized") {
        return Err(
            "CoinCap refused the API key on the prices socket; set TICKPIPE_COINCAP_API_KEY to a valid key".into(),
        );
    }
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not a prices frame: {e}"))?;
    let o = v.as_object().ok_or("prices frame is not an object")?;
    Ok(o.iter()
        .map(|(id, p)| {
            let s = match p {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                other => return Err(format!("price of {id} is not a number: {other}")),
            };
            Ok(Price {
                asset_id: id.clone(),
                price_usd: decimal(id, &s)?,
                source: t.source,
                event_time: t.response,
                ingest_time: t.ingest,
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Times = Times {
        response: 1_767_225_600_123_000,
        ingest: 1_767_225_600_200_000,
        source: Source::Coincap,
    };

    #[test]
    fn the_documented_asset_is_exact() {
        let body = br#"{"data":[{"id":"bitcoin","rank":"1","symbol":"BTC","name":"Bitcoin","supply":"19873412.0000000000000000","maxSupply":"21000000.0000000000000000","marketCapUsd":"1352211932712.4411","volumeUsd24Hr":"9183412231.2231","priceUsd":"68042.1183201","changePercent24Hr":"-1.2043","vwap24Hr":"68510.9921","explorer":"https://blockchain.info/","tokens":{}}],"timestamp":1767225600123}"#;
        let (rows, ts) = envelope(body).unwrap();
        assert_eq!(ts, 1_767_225_600_123_000);
        let a = asset(&rows[0], T).unwrap();
        assert_eq!(a.rank, 1);
        assert_eq!(a.price_usd.to_string(), "68042.1183201");
        assert_eq!(a.supply.to_string(), "19873412");
        assert_eq!(a.max_supply.map(|d| d.to_string()).as_deref(), Some("21000000"));
    }

    #[test]
    fn numbers_nulls_and_zero_max_supply() {
        let row: Value = serde_json::from_str(
            r#"{"id":"x","rank":2,"symbol":"X","name":"X","supply":12.5,"maxSupply":"0","marketCapUsd":null,"volumeUsd24Hr":null,"priceUsd":"0.1","changePercent24Hr":null,"vwap24Hr":null,"explorer":null,"tokens":{"ethereum":["0xabc"]}}"#,
        )
        .unwrap();
        let a = asset(&row, T).unwrap();
        assert_eq!(a.max_supply, None);
        assert_eq!(a.supply.to_string(), "12.5");
        assert_eq!(a.tokens["ethereum"], vec!["0xabc".to_owned()]);
        let bad: Value =
            serde_json::from_str(r#"{"id":"x","rank":"one","symbol":"X","name":"X","supply":"1","priceUsd":"1"}"#)
                .unwrap();
        assert!(asset(&bad, T).unwrap_err().contains("rank"));
    }

    #[test]
    fn percentages_beyond_the_wire_scale_are_rounded_money_is_not() {
        let row: Value = serde_json::from_str(
            r#"{"id":"x","name":"X","rank":"9","percentTotalVolume":"0.0098959513167415543337","volumeUsd":"1.5","tradingPairs":"3","updated":1536336862442}"#,
        )
        .unwrap();
        let e = exchange(&row, T).unwrap();
        assert_eq!(
            e.percent_total_volume.map(|d| d.to_string()).as_deref(),
            Some("0.009895951316741554")
        );
        assert_eq!(e.volume_usd.map(|d| d.to_string()).as_deref(), Some("1.5"));
    }

    #[test]
    fn the_v2_deprecation_notice_is_recognised() {
        let body = br#"{"data":{"message":"We have deprecated this API, please use v3"},"timestamp":1767225600123}"#;
        assert!(matches!(envelope(body), Err(EnvelopeError::Deprecated(m)) if m.contains("deprecated")));
        assert!(matches!(envelope(b"<html>"), Err(EnvelopeError::Malformed(_))));
    }

    #[test]
    fn price_frames() {
        let got = prices(r#"{"bitcoin":"68051.2231","ethereum":"3621.0817","bad":"x"}"#, T).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got.iter().filter(|r| r.is_ok()).count(), 2);
        assert!(prices("Unauthorized: bad key", T)
            .unwrap_err()
            .contains("TICKPIPE_COINCAP_API_KEY"));
        assert!(prices("[1,2", T).is_err());
    }
}
