//! Candles built from recorded real trades equal the exchange's own klines for
//! the same minutes, field for field, with exact decimals (see the README of the
//! real-data folder for where the recordings come from).

use std::str::FromStr;

use tickpipe_consumers::candles::{aggregate, CandleConfig, Interval, Output};
use tickpipe_schemas::{Candle, Decimal, Trade};
use tickpipe_testkit::{real, stack};

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

fn config(intervals: &[&str]) -> CandleConfig {
    CandleConfig {
        intervals: intervals.iter().map(|i| i.parse().unwrap()).collect(),
        allowed_lateness: 0,
        fill_empty: true,
        max_fill: 100_000,
    }
}

/// The final version of each candle of `interval`, in open-time order.
fn final_candles(out: &[Output], interval: &str) -> Vec<Candle> {
    let mut by_open = std::collections::BTreeMap::new();
    for o in out {
        if let Output::Candle(c) = o {
            if c.interval == interval {
                by_open.insert(c.open_time, c.clone());
            }
        }
    }
    by_open.into_values().collect()
}

#[test]
fn spot_xrpeth_1m_and_5m_candles_equal_binance_klines() {
    let Some(dir) = stack::real_data("binance_spot_xrpeth_2019-10-11") else {
        return;
    };
    let trades = real::agg_trades_csv(&dir.join("XRPETH-aggTrades-2019-10-11_2019-10-13.csv"), "XRPETH");
    assert_eq!(trades.len(), 12_477);
    let out = aggregate(&trades, config(&["1m", "5m"]));
    assert!(
        !out.iter().any(|o| !matches!(o, Output::Candle(_))),
        "no trade may be late or invalid"
    );

    for (interval, file, rows, empty) in [
        ("1m", "XRPETH-1m-2019-10-11_2019-10-13.csv", 3_560, 1_091),
        ("5m", "XRPETH-5m-2019-10-11_2019-10-13.csv", 712, 6),
    ] {
        let ours = final_candles(&out, interval);
        let klines = real::csv_rows(&dir.join(file));
        assert_eq!(klines.len(), rows);
        assert_eq!(ours.len(), rows, "{interval}: one candle per kline");
        for (c, k) in ours.iter().zip(&klines) {
            let at = format!("{interval} kline at {}", k[0]);
            assert_eq!(c.open_time, k[0].parse::<i64>().unwrap() * 1000, "{at}");
            assert_eq!(
                [c.open, c.high, c.low, c.close, c.volume],
                [dec(&k[1]), dec(&k[2]), dec(&k[3]), dec(&k[4]), dec(&k[5])],
                "{at}: open, high, low, close, volume"
            );
        }
        assert_eq!(
            ours.iter().filter(|c| c.trade_count == 0).count(),
            empty,
            "{interval}: empty windows"
        );
    }
    // Trade counts come from the aggregate trades' id ranges: every underlying
    // trade (15373518..=15388189) is counted once.
    let minutes = final_candles(&out, "1m");
    assert_eq!(minutes.iter().map(|c| c.trade_count).sum::<i64>(), 14_672);
    assert_eq!(minutes[0].first_trade_id, Some(15_373_518));
}

#[test]
fn usdm_trxusdt_minutes_equal_binance_klines_on_all_fields() {
    let Some(dir) = stack::real_data("binance_trxusdt_2025-03-04") else {
        return;
    };
    let rows = real::trade_stream_csv(
        &dir.join("usdm_futures_TRXUSDT_trade_stream_2025-03-04.csv"),
        "binance-usdm",
    );
    assert_eq!(rows.len(), 10_000);
    let non_market: Vec<i64> = rows
        .iter()
        .filter(|(_, x)| x != "MARKET")
        .map(|(t, _)| t.trade_id)
        .collect();
    assert_eq!(non_market, [548_331_095], "the one non-MARKET trade of the recording");
    let trades: Vec<Trade> = rows.into_iter().map(|(t, _)| t).collect();

    let out = aggregate(&trades, config(&["1m"]));
    // The non-MARKET trade has price 0: excluded, as in Binance's kline, and reported.
    let invalid: Vec<i64> = out
        .iter()
        .filter_map(|o| match o {
            Output::Invalid { trade, .. } => Some(trade.trade_id),
            _ => None,
        })
        .collect();
    assert_eq!(invalid, [548_331_095]);

    let ours = final_candles(&out, "1m");
    let klines = real::csv_rows(&dir.join("usdm_futures_TRXUSDT-1m-2025-03-04_0000-0016.csv"));
    assert_eq!(klines.len(), 17);
    // 00:00 to 00:15 are complete in the recording; 00:16 is cut off at 00:16:44.
    for (c, k) in ours.iter().zip(&klines).take(16) {
        let at = format!("kline at {}", k[0]);
        assert!(c.closed, "{at}");
        assert_eq!(c.open_time, k[0].parse::<i64>().unwrap() * 1000, "{at}: open time");
        assert_eq!(
            [c.open, c.high, c.low, c.close, c.volume],
            [dec(&k[1]), dec(&k[2]), dec(&k[3]), dec(&k[4]), dec(&k[5])],
            "{at}: OHLCV"
        );
        assert_eq!(c.close_time, k[6].parse::<i64>().unwrap() * 1000, "{at}: close time");
        assert_eq!(c.quote_volume, dec(&k[7]), "{at}: quote volume");
        assert_eq!(c.trade_count, k[8].parse::<i64>().unwrap(), "{at}: count");
        assert_eq!(c.taker_buy_base_volume, dec(&k[9]), "{at}: taker buy volume");
        assert_eq!(c.taker_buy_quote_volume, dec(&k[10]), "{at}: taker buy quote volume");
        assert_eq!(k[11], "0", "{at}: the unused field");
    }
    let last = &ours[16];
    assert!(
        !last.closed,
        "the 00:16 window is still forming when the recording ends"
    );
    assert_eq!(last.open, dec(&klines[16][1]));
    assert!(last.volume < dec(&klines[16][5]));
}

#[test]
fn interval_names_follow_binance() {
    let i: Interval = "5m".parse().unwrap();
    assert_eq!(i.micros(), 300_000_000);
}
