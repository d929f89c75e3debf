//! No exchange message can panic the producer or wrap a number: Binance
//! frames (trade, aggTrade, kline), data.binance.vision rows and CoinCap rows
//! built with values at the edges (longs at and past i64, exponents, more
//! digits than a decimal holds, wrong JSON types) go through the path the
//! sources run: parse, validate, encode. Each ends as a record that encodes or
//! as a reject with a reason, never a panic.

use proptest::prelude::*;
use tickpipe_producer::item::Item;
use tickpipe_producer::sources::binance::parse::{
    agg_trade_csv_row, kline_row, trade_csv_row, ws_message, Origin, WsEvent,
};
use tickpipe_producer::sources::coincap::parse::{self as coincap, Times};
use tickpipe_schemas::validate::Rules;
use tickpipe_schemas::{Codec, Source, WriteFraming};

const NOW: i64 = 1_767_225_600_000_000;

/// Numbers (and things in their place) at the edges.
fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (1_767_225_000_000_i64..1_767_225_700_000).prop_map(|n| n.to_string()),
        2 => (0_i64..100_000).prop_map(|n| n.to_string()),
        3 => prop::sample::select(vec![
            "0", "-1", "9223372036854775807", "-9223372036854775808", "9223372036854775808",
            "18446744073709551616", "1e400", "-1e400", "1.5", "1e18", "null", "true", "\"\"", "[]", "{}",
            "\"12\"", "1767225600000000", "99999999999999999999999",
        ])
        .prop_map(str::to_owned),
    ]
}

/// Decimal strings (and things in their place) at the edges.
fn decimal() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (1_u64..10_000_000, 0_u32..9).prop_map(|(m, s)| format!("\"{}\"", rust_decimal::Decimal::new(m as i64, s))),
        3 => prop::sample::select(vec![
            "\"0\"", "\"-1\"", "\"0.00000000\"", "\"1e5\"", "\"NaN\"", "\"inf\"", "\"\"", "\" 1\"",
            "\"79228162514264337593543950335\"", "\"79228162514264337593543950336\"",
            "\"0.0000000000000000000000000001\"", "\"0.00000000000000000000000000001\"",
            "\"99999999999999999999.999999999999999999\"", "\"1.000000000000000000000000000000000000\"",
            "1.5", "null", "\"abc\"", "\"--1\"", "\"1,5\"",
        ])
        .prop_map(str::to_owned),
    ]
}

fn boolean() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["true", "false", "null", "1", "\"true\""]).prop_map(str::to_owned)
}

fn interval() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "\"1m\"",
        "\"1s\"",
        "\"1d\"",
        "\"1w\"",
        "\"1M\"",
        "\"288230376151711744s\"",
        "\"0m\"",
        "\"x\"",
        "1",
    ])
    .prop_map(str::to_owned)
}

fn frame() -> impl Strategy<Value = String> {
    let trade = (number(), number(), decimal(), decimal(), number(), boolean()).prop_map(|(e, t, p, q, tt, m)| {
        format!(
            r#"{{"stream":"btcusdt@trade","data":{{"e":"trade","E":{e},"s":"BTCUSDT","t":{t},"p":{p},"q":{q},"T":{tt},"m":{m},"M":true}}}}"#
        )
    });
    let agg = (number(), number(), decimal(), decimal(), number(), number(), number(), boolean()).prop_map(
        |(e, a, p, q, f, l, tt, m)| {
            format!(
                r#"{{"stream":"btcusdt@aggTrade","data":{{"e":"aggTrade","E":{e},"s":"BTCUSDT","a":{a},"p":{p},"q":{q},"f":{f},"l":{l},"T":{tt},"m":{m},"M":true}}}}"#
            )
        },
    );
    let kline = (
        (number(), number(), number(), interval(), number(), number()),
        (decimal(), decimal(), decimal(), decimal(), decimal()),
        (number(), boolean(), decimal(), decimal(), decimal()),
    )
        .prop_map(|((e, t, tt, i, f, l), (o, c, h, lo, v), (n, x, q, vv, qq))| {
            format!(
                r#"{{"stream":"btcusdt@kline_1m","data":{{"e":"kline","E":{e},"s":"BTCUSDT","k":{{"t":{t},"T":{tt},"s":"BTCUSDT","i":{i},"f":{f},"L":{l},"o":{o},"c":{c},"h":{h},"l":{lo},"v":{v},"n":{n},"x":{x},"q":{q},"V":{vv},"Q":{qq},"B":"0"}}}}}}"#
            )
        });
    prop_oneof![trade, agg, kline]
}

fn unquoted(s: String) -> String {
    s.trim_matches('"').to_owned()
}

/// What a source does with a record: validate, then encode what passed.
fn publishable(item: Item, raw: &str) -> Result<(), TestCaseError> {
    let codec = Codec::new(WriteFraming::SingleObject);
    let encoded = match item.validated(&Rules::at(NOW), "test", raw.as_bytes()) {
        Item::Record(r) => r.encode(&codec).map(|_| r.key()),
        Item::Reject(r) => {
            prop_assert!(!r.reason.is_empty(), "a reject without a reason");
            return Ok(());
        }
    };
    prop_assert!(
        encoded.is_ok(),
        "a validated record does not encode: {encoded:?} from {raw}"
    );
    Ok(())
}

fn origin() -> Origin<'static> {
    Origin {
        venue: "binance",
        source: Source::Binance,
        ingest_time: NOW,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3_000, ..ProptestConfig::default() })]

    #[test]
    fn binance_frames_become_records_or_rejects(text in frame()) {
        match ws_message(&text, origin()) {
            Ok(WsEvent::Trade(t)) => publishable(Item::from(t), &text)?,
            Ok(WsEvent::Candle(c)) => publishable(Item::from(c), &text)?,
            Ok(_) => {}
            Err(reason) => prop_assert!(!reason.is_empty()),
        }
    }

    #[test]
    fn binance_files_rows_become_records_or_rejects(
        fields in prop::collection::vec(prop_oneof![number(), decimal().prop_map(unquoted), boolean()], 0..13),
    ) {
        let f: Vec<&str> = fields.iter().map(String::as_str).collect();
        let raw = fields.join(",");
        if let Ok(t) = trade_csv_row(&f, "BTCUSDT", origin()) {
            publishable(Item::from(t), &raw)?;
        }
        if let Ok(t) = agg_trade_csv_row(&f, "BTCUSDT", origin()) {
            publishable(Item::from(t), &raw)?;
        }
        for now in [NOW, i64::MAX] {
            if let Ok(Some(c)) = kline_row(&f, "BTCUSDT", "1m", origin(), now) {
                publishable(Item::from(c), &raw)?;
            }
        }
    }

    #[test]
    fn coincap_rows_become_records_or_rejects(
        ts in number(),
        (a, b, c, d) in (decimal(), decimal(), decimal(), number()),
        (e, f, g) in (number(), decimal(), number()),
    ) {
        let body = format!(
            r#"{{"timestamp":{ts},"data":[{{"id":"bitcoin","rank":{d},"symbol":"BTC","name":"Bitcoin","supply":{a},"maxSupply":{b},"marketCapUsd":{c},"volumeUsd24Hr":{f},"priceUsd":{a},"changePercent24Hr":{b},"vwap24Hr":{c},"exchangeId":"binance","percentTotalVolume":{f},"volumeUsd":{c},"tradingPairs":{e},"socket":true,"updated":{g},"baseSymbol":"ETH","baseId":"ethereum","quoteSymbol":"BTC","quoteId":"bitcoin","priceQuote":{a},"tradesCount24Hr":{e},"currencySymbol":"$","type":"fiat","rateUsd":{b}}}]}}"#
        );
        let Ok((rows, response)) = coincap::envelope(body.as_bytes()) else { return Ok(()) };
        let t = Times { response, ingest: NOW, source: Source::Coincap };
        for row in &rows {
            if let Ok(r) = coincap::asset(row, t) { publishable(Item::from(r), &body)?; }
            if let Ok(r) = coincap::rate(row, t) { publishable(Item::from(r), &body)?; }
            if let Ok(r) = coincap::exchange(row, t) { publishable(Item::from(r), &body)?; }
            if let Ok(r) = coincap::market(row, t) { publishable(Item::from(r), &body)?; }
        }
        let prices = format!(r#"{{"bitcoin":{a},"ethereum":{b}}}"#);
        if let Ok(all) = coincap::prices(&prices, Times { response: NOW, ingest: NOW, source: Source::Coincap }) {
            for p in all.into_iter().flatten() {
                publishable(Item::from(p), &prices)?;
            }
        }
    }
}
