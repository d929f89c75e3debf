//! The event-time rules of the candle builder, one scripted case each.

use std::str::FromStr;

use tickpipe_consumers::candles::{aggregate, CandleBuilder, CandleConfig, Output};
use tickpipe_schemas::{Candle, Decimal, Source, Trade, TradeKind};

const S: i64 = 1_000_000;

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// A trade written `<symbol> <second> #<id> <price>`, then `x<quantity>`
/// unless it is 1 and `sold` if the taker sold (the buyer was the maker):
/// `A 0.5 #2 12 x2 sold`.
fn trade(text: &str) -> Trade {
    let words: Vec<&str> = text.split_whitespace().collect();
    let [symbol, secs, id, price, rest @ ..] = words.as_slice() else {
        panic!("not a trade: {text:?}")
    };
    let secs: f64 = secs.parse().unwrap_or_else(|_| panic!("second in {text:?}"));
    let id = id.strip_prefix('#').and_then(|i| i.parse().ok());
    let (mut quantity, mut buyer_is_maker) = ("1", false);
    for word in rest {
        match (word.strip_prefix('x'), *word) {
            (Some(q), _) => quantity = q,
            (None, "sold") => buyer_is_maker = true,
            _ => panic!("{word:?} in {text:?}"),
        }
    }
    Trade {
        venue: "binance".into(),
        symbol: (*symbol).into(),
        kind: TradeKind::Trade,
        trade_id: id.unwrap_or_else(|| panic!("#id in {text:?}")),
        price: dec(price),
        quantity: dec(quantity),
        buyer_is_maker,
        first_trade_id: None,
        last_trade_id: None,
        source: Source::Simulator,
        event_time: (secs * S as f64) as i64,
        ingest_time: 0,
    }
}

fn cfg(intervals: &[&str], lateness_secs: i64, fill_empty: bool) -> CandleConfig {
    CandleConfig {
        intervals: intervals.iter().map(|i| i.parse().unwrap()).collect(),
        allowed_lateness: lateness_secs * S,
        fill_empty,
        max_fill: 100_000,
    }
}

/// A candle as (interval, open second, O, H, L, C, volume, count, closed).
fn short(c: &Candle) -> (String, i64, String, String, String, String, String, i64, bool) {
    (
        c.interval.clone(),
        c.open_time / S,
        c.open.to_string(),
        c.high.to_string(),
        c.low.to_string(),
        c.close.to_string(),
        c.volume.to_string(),
        c.trade_count,
        c.closed,
    )
}

/// The trades written as in [`trade`].
fn trades(texts: &[&str]) -> Vec<Trade> {
    texts.iter().map(|t| trade(t)).collect()
}

/// Feeds `trades` (written as in [`trade`]) in order and compares every
/// output with `expected`, written as in [`rendered`].
fn check(config: CandleConfig, trades: &[&str], expected: &[&str]) {
    assert_eq!(rendered(config, &self::trades(trades)), expected);
}

/// Every output of `trades` fed in order: candles in `short` form,
/// `late <id> <interval>` or `invalid <id>`.
fn rendered(config: CandleConfig, trades: &[Trade]) -> Vec<String> {
    aggregate(trades, config)
        .iter()
        .map(|o| match o {
            Output::Candle(c) => {
                let (i, open, o, h, l, cl, v, n, closed) = short(c);
                format!(
                    "{i} {open} {o} {h} {l} {cl} v{v} n{n}{}",
                    if closed { "" } else { " open" }
                )
            }
            Output::Late { trade, interval, .. } => format!("late {} {interval}", trade.trade_id),
            Output::Invalid { trade, .. } => format!("invalid {}", trade.trade_id),
            Output::Unrepresentable {
                key,
                interval,
                open_time,
            } => format!("unrepresentable {key} {interval} {}", open_time / S),
        })
        .collect()
}

#[test]
fn a_window_closes_when_a_later_trade_arrives_and_gaps_are_filled() {
    check(
        cfg(&["1s"], 0, true),
        &["A 0.1 #1 10", "A 0.5 #2 12 x2 sold", "A 0.9 #3 11", "A 3.2 #4 9"],
        &[
            "1s 0 10 12 10 11 v4 n3",
            "1s 1 11 11 11 11 v0 n0",
            "1s 2 11 11 11 11 v0 n0",
            "1s 3 9 9 9 9 v1 n1 open",
        ],
    );
}

#[test]
fn without_filling_empty_windows_are_skipped() {
    check(
        cfg(&["1s"], 0, false),
        &["A 0.1 #1 10", "A 3.2 #2 9"],
        &["1s 0 10 10 10 10 v1 n1", "1s 3 9 9 9 9 v1 n1 open"],
    );
}

#[test]
fn a_late_trade_within_the_lateness_corrects_the_candle() {
    check(
        cfg(&["1s"], 2, true),
        &[
            "A 0.5 #2 12",
            "A 1.1 #3 13",
            // Earlier than trade 2 by event time, arriving after the window
            // was published: it becomes the open, and the candle is published again.
            "A 0.2 #1 10",
            "A 2.5 #4 14",
        ],
        &[
            "1s 0 12 12 12 12 v1 n1",
            "1s 0 10 12 10 12 v2 n2",
            "1s 1 13 13 13 13 v1 n1",
            "1s 2 14 14 14 14 v1 n1 open",
        ],
    );
}

#[test]
fn a_trade_behind_the_watermark_is_late() {
    check(
        cfg(&["1s", "1m"], 1, true),
        &["A 0.5 #1 10", "A 5.0 #2 11", "A 0.7 #3 99"],
        // The 1s window of second 0 is final (watermark 4 s); the 1m window is not.
        &[
            "1s 0 10 10 10 10 v1 n1",
            "1s 1 10 10 10 10 v0 n0",
            "1s 2 10 10 10 10 v0 n0",
            "1s 3 10 10 10 10 v0 n0",
            "1s 4 10 10 10 10 v0 n0",
            "late 3 1s",
            "1s 5 11 11 11 11 v1 n1 open",
            "1m 0 10 99 10 11 v3 n3 open",
        ],
    );
}

#[test]
fn a_trade_in_an_empty_window_behind_the_watermark_is_late() {
    // Second 2 never had a trade (filled or not), but the watermark (4 s) has
    // passed its end: the trade is late, not a new candle for a final window.
    for fill in [false, true] {
        let trades = trades(&["A 0.5 #1 10", "A 5.0 #2 11", "A 2.5 #3 99"]);
        let mut out = rendered(cfg(&["1s"], 1, fill), &trades);
        // The empty candles of seconds 1 to 4, when filling.
        out.retain(|o| !o.ends_with(" n0"));
        assert_eq!(
            out,
            ["1s 0 10 10 10 10 v1 n1", "late 3 1s", "1s 5 11 11 11 11 v1 n1 open"],
            "fill {fill}"
        );
    }
}

#[test]
fn a_late_trade_that_changes_a_close_publishes_the_empty_candles_after_it_again() {
    check(
        cfg(&["1s"], 5, true),
        &[
            "A 0.5 #1 10",
            "A 3.2 #2 9",
            // Later than trade 1 in window 0: the new close, which the empty
            // windows 1 and 2 carry.
            "A 0.8 #3 11",
            // Earlier than both: a new open and low, the close stays, and so
            // do the empty candles.
            "A 0.1 #4 8",
        ],
        &[
            "1s 0 10 10 10 10 v1 n1",
            "1s 1 10 10 10 10 v0 n0",
            "1s 2 10 10 10 10 v0 n0",
            "1s 0 10 11 10 11 v2 n2",
            "1s 1 11 11 11 11 v0 n0",
            "1s 2 11 11 11 11 v0 n0",
            "1s 0 8 11 8 11 v3 n3",
            "1s 3 9 9 9 9 v1 n1 open",
        ],
    );
}

#[test]
fn a_late_trade_in_an_empty_window_makes_it_a_candle_and_carries_its_close_on() {
    check(
        cfg(&["1s"], 5, true),
        &["A 0.5 #1 10", "A 4.2 #2 9", "A 2.5 #3 12"],
        &[
            "1s 0 10 10 10 10 v1 n1",
            "1s 1 10 10 10 10 v0 n0",
            "1s 2 10 10 10 10 v0 n0",
            "1s 3 10 10 10 10 v0 n0",
            "1s 2 12 12 12 12 v1 n1",
            "1s 3 12 12 12 12 v0 n0",
            "1s 4 9 9 9 9 v1 n1 open",
        ],
    );
}

#[test]
fn symbols_are_independent_and_bad_prices_are_refused() {
    check(
        cfg(&["1s"], 0, true),
        &["A 0.1 #1 10", "B 0.2 #1 20", "B 0.3 #2 0", "A 1.5 #2 11"],
        &[
            "invalid 2",
            "1s 0 10 10 10 10 v1 n1",
            "1s 1 11 11 11 11 v1 n1 open",
            "1s 0 20 20 20 20 v1 n1 open",
        ],
    );
}

#[test]
fn sums_are_exact_and_taker_volumes_follow_the_maker_flag() {
    let trades = trades(&[
        "A 0.1 #1 0.1 x0.3",      // taker bought
        "A 0.2 #2 0.2 x0.7 sold", // taker sold
    ]);
    let mut b = CandleBuilder::new(cfg(&["1m"], 0, true));
    let mut out = Vec::new();
    for tr in &trades {
        b.push(tr, &mut out);
    }
    b.finish(&mut out);
    let Output::Candle(c) = b.resolve(out[0].clone()) else {
        panic!("{out:?}")
    };
    assert_eq!(c.quote_volume, dec("0.17"));
    assert_eq!(c.volume, dec("1.0"));
    assert_eq!(
        (c.taker_buy_base_volume, c.taker_buy_quote_volume),
        (dec("0.3"), dec("0.03"))
    );
    assert_eq!((c.first_trade_id, c.last_trade_id), (Some(1), Some(2)));
    assert_eq!(c.close_time - c.open_time, 59_999_000);
    assert_eq!(b.watermark("binance", "A"), Some(200_000));
}

#[test]
fn a_gap_longer_than_the_fill_limit_is_not_filled() {
    let mut config = cfg(&["1s"], 0, true);
    config.max_fill = 2;
    check(
        config,
        &["A 0.1 #1 10", "A 2.5 #2 11", "A 9.5 #3 12"],
        &[
            "1s 0 10 10 10 10 v1 n1",
            "1s 1 10 10 10 10 v0 n0",
            "1s 2 11 11 11 11 v1 n1",
            "1s 9 12 12 12 12 v1 n1 open",
        ],
    );
}

#[test]
fn a_late_trade_in_an_unfilled_gap_fills_the_sides_within_the_limit() {
    let mut config = cfg(&["1s"], 3, true);
    config.max_fill = 2;
    // Seconds 1 to 4 are one gap of four, too long to fill. Trade 4, at second
    // 3 and within the lateness, splits it into gaps of two and one, which
    // candles in order would have filled: so does the late trade, from the
    // close of second 0 although that window is final by then.
    check(
        config.clone(),
        &["A 0.5 #1 10", "A 5.5 #2 11", "A 6.5 #3 12", "A 3.2 #4 13"],
        &[
            "1s 0 10 10 10 10 v1 n1",
            "1s 5 11 11 11 11 v1 n1",
            "1s 3 13 13 13 13 v1 n1",
            "1s 1 10 10 10 10 v0 n0",
            "1s 2 10 10 10 10 v0 n0",
            "1s 4 13 13 13 13 v0 n0",
            "1s 6 12 12 12 12 v1 n1 open",
        ],
    );
    // Before the first window there is nothing to fill from; after it, the
    // gap to the next window is filled.
    check(
        config,
        &["A 5.5 #1 11", "A 6.5 #2 12", "A 3.5 #3 13"],
        &[
            "1s 5 11 11 11 11 v1 n1",
            "1s 3 13 13 13 13 v1 n1",
            "1s 4 13 13 13 13 v0 n0",
            "1s 6 12 12 12 12 v1 n1 open",
        ],
    );
}

#[test]
fn sums_beyond_28_digits_are_reported_not_rounded() {
    // 99 x 9999999999.999999999999999999 = 989999999999.999999999999999901: 30
    // significant digits.
    check(
        cfg(&["1s"], 0, true),
        &["A 0.1 #1 99 x9999999999.999999999999999999"],
        &["unrepresentable binance:A 1s 0"],
    );
}

#[test]
fn a_lateness_raised_at_a_restore_reopens_no_final_window() {
    let mut b = CandleBuilder::new(cfg(&["1s"], 1, true));
    let mut out = Vec::new();
    for tr in trades(&["A 0.5 #1 10", "A 0.7 #2 11", "A 3.5 #3 12"]) {
        b.push(&tr, &mut out);
    }
    // Window 0 is final (watermark 2.5 s); with a lateness of 5 s it would not be.
    let mut b = CandleBuilder::restore(cfg(&["1s"], 5, true), &b.snapshot()).unwrap();
    let mut out = Vec::new();
    b.push(&trade("A 0.9 #4 9"), &mut out);
    let out: Vec<Output> = out.into_iter().map(|o| b.resolve(o)).collect();
    assert!(
        matches!(out.as_slice(), [Output::Late { trade, .. }] if trade.trade_id == 4),
        "{out:?}"
    );
    assert_eq!(b.watermark("binance", "A"), Some(2_500_000));
}

#[test]
fn a_restored_snapshot_continues_exactly() {
    let trades = trades(&[
        "A 0.5 #1 10",
        "B 0.6 #1 20",
        "A 1.5 #2 11 x2 sold",
        "A 1.7 #3 9",
        "B 2.1 #2 21",
        "A 4.2 #4 12",
    ]);
    let config = || cfg(&["1s", "1m"], 1, true);
    let whole = aggregate(&trades, config());
    for cut in 0..trades.len() {
        let mut first = CandleBuilder::new(config());
        let mut bars = Vec::new();
        for tr in &trades[..cut] {
            first.push(tr, &mut bars);
        }
        let mut out: Vec<Output> = bars.drain(..).map(|o| first.resolve(o)).collect();
        let mut second = CandleBuilder::restore(config(), &first.snapshot()).unwrap();
        for tr in &trades[cut..] {
            second.push(tr, &mut bars);
        }
        second.finish(&mut bars);
        out.extend(bars.into_iter().map(|o| second.resolve(o)));
        assert_eq!(out, whole, "cut after {cut} trades");
    }
    let other = CandleBuilder::restore(cfg(&["5m"], 1, true), &CandleBuilder::new(config()).snapshot());
    assert!(other.unwrap_err().contains("intervals"));
}
