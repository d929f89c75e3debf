//! Loaders for the recorded real market data (`../shared/data/real`), for tests
//! and benchmarks. They read the recorders' own formats, so they live here and
//! not in the services; a malformed line is a broken recording and panics with
//! its position.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::str::FromStr;

use rust_decimal::Decimal;
use tickpipe_schemas::{Source, Trade, TradeKind};

fn dec(s: &str, at: &str) -> Decimal {
    Decimal::from_str(s).unwrap_or_else(|e| panic!("{at}: {s:?} is not a decimal: {e}"))
}

fn int(s: &str, at: &str) -> i64 {
    s.parse()
        .unwrap_or_else(|e| panic!("{at}: {s:?} is not an integer: {e}"))
}

fn lines(path: &Path) -> Vec<String> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let reader: Box<dyn std::io::Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    BufReader::new(reader)
        .lines()
        .map(|l| l.unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .collect()
}

/// The lines of a raw WebSocket capture as (local receive time in ns, message
/// text), in either recorder's format: `<ns> <json>` (hftbacktest) or
/// `<seconds.fraction>: <json>` (cryptofeed). Lines without such a timestamp
/// (cryptofeed's first line, `<url> <-> <seconds>`, and blank lines) are left
/// out; the message text is not checked, so a REST snapshot line is kept.
pub fn ws_capture_lines(path: &Path) -> Vec<(i64, String)> {
    lines(path)
        .into_iter()
        .filter_map(|mut line| {
            let space = line.find(' ')?;
            let ns = match line[..space].strip_suffix(':') {
                Some(secs) => secs_to_ns(secs)?,
                None => line[..space].parse().ok()?,
            };
            let json = line.split_off(space + 1);
            Some((ns, json.trim_start().to_owned()))
        })
        .collect()
}

/// Nanoseconds from decimal seconds (`1633998512.0633569`), exactly; `None`
/// when the text is not such a number.
fn secs_to_ns(secs: &str) -> Option<i64> {
    let (whole, frac) = secs.split_once('.').unwrap_or((secs, ""));
    if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: i64 = whole.parse().ok()?;
    let frac: i64 = format!("{frac:0<9}").parse().ok()?;
    whole.checked_mul(1_000_000_000)?.checked_add(frac)
}

/// `@trade` messages of a raw WebSocket capture (either format of
/// [`ws_capture_lines`]); other streams are skipped. Event time is the trade
/// time.
pub fn ws_capture_trades(path: &Path, venue: &str) -> Vec<Trade> {
    let mut out = Vec::new();
    for (n, (recv_ns, json)) in ws_capture_lines(path).iter().enumerate() {
        let at = format!("{} (message {})", path.display(), n + 1);
        let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
            continue;
        };
        let d = &v["data"];
        if d["e"] != "trade" {
            continue;
        }
        let s = |k: &str| d[k].as_str().unwrap_or_else(|| panic!("{at}: no {k}"));
        let i = |k: &str| d[k].as_i64().unwrap_or_else(|| panic!("{at}: no {k}"));
        out.push(Trade {
            venue: venue.into(),
            symbol: s("s").into(),
            kind: TradeKind::Trade,
            trade_id: i("t"),
            price: dec(s("p"), &at),
            quantity: dec(s("q"), &at),
            buyer_is_maker: d["m"].as_bool().unwrap_or_else(|| panic!("{at}: no m")),
            first_trade_id: None,
            last_trade_id: None,
            source: Source::Replay,
            event_time: i("T") * 1000,
            ingest_time: recv_ns / 1000,
        });
    }
    out
}

/// The spot BTCUSDT and ETHUSDT trades of the 2024-08-08/09 raw WebSocket
/// captures in `dir` (`binance_ws_raw_2024-08-08`), in file order.
pub fn spot_capture_trades_2024_08_08(dir: &Path) -> Vec<Trade> {
    [
        "spot_btcusdt_20240808",
        "spot_btcusdt_20240809",
        "spot_ethusdt_20240808",
        "spot_ethusdt_20240809",
    ]
    .iter()
    .flat_map(|n| ws_capture_trades(&dir.join(format!("{n}.ts_json.txt.gz")), "binance"))
    .collect()
}

/// The spot captures of [`spot_capture_trades_2024_08_08`] repeated, with ids
/// and times shifted each round, to `target` trades: real-shaped load for
/// benchmarks.
pub fn repeated_spot_trades(dir: &Path, target: usize) -> Vec<Trade> {
    let base = spot_capture_trades_2024_08_08(dir);
    assert!(!base.is_empty(), "no trades in {}", dir.display());
    let lo = base.iter().map(|t| t.event_time).min().unwrap_or(0);
    let hi = base.iter().map(|t| t.event_time).max().unwrap_or(0);
    let span = hi - lo + 1_000_000;
    let ids = base.iter().map(|t| t.trade_id).max().unwrap_or(0) + 1;
    (0..)
        .flat_map(|r: i64| {
            base.iter().map(move |t| Trade {
                event_time: t.event_time + r * span,
                ingest_time: t.ingest_time + r * span,
                trade_id: t.trade_id + r * ids,
                ..t.clone()
            })
        })
        .take(target)
        .collect()
}

/// Real Binance spot symbols, for [`repeated_spot_trades_over`].
pub const SPOT_SYMBOLS: [&str; 8] = [
    "BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "ADAUSDT", "DOGEUSDT", "TRXUSDT",
];

/// [`repeated_spot_trades`] spread over `symbols` (runs of 5,000 trades take
/// turns), in whole milliseconds as Binance's CSVs carry them: real-shaped
/// load for a topic keyed by symbol that fills many partitions.
pub fn repeated_spot_trades_over(dir: &Path, target: usize, symbols: &[&str]) -> Vec<Trade> {
    repeated_spot_trades(dir, target)
        .into_iter()
        .enumerate()
        .map(|(i, t)| Trade {
            symbol: symbols[(i / 5_000) % symbols.len()].to_owned(),
            event_time: t.event_time / 1000 * 1000,
            ..t
        })
        .collect()
}

/// data.binance.vision aggTrades rows (no header): id, price, quantity, first
/// trade id, last trade id, time (ms), is buyer maker, is best match.
pub fn agg_trades_csv(path: &Path, symbol: &str) -> Vec<Trade> {
    lines(path)
        .iter()
        .enumerate()
        .map(|(n, line)| {
            let at = format!("{}:{}", path.display(), n + 1);
            let f: Vec<&str> = line.split(',').collect();
            assert!(f.len() >= 7, "{at}: expected 8 columns");
            Trade {
                venue: "binance".into(),
                symbol: symbol.into(),
                kind: TradeKind::AggTrade,
                trade_id: int(f[0], &at),
                price: dec(f[1], &at),
                quantity: dec(f[2], &at),
                buyer_is_maker: f[6].eq_ignore_ascii_case("true"),
                first_trade_id: Some(int(f[3], &at)),
                last_trade_id: Some(int(f[4], &at)),
                source: Source::Replay,
                event_time: int(f[5], &at) * 1000,
                // The file does not say when a trade was read: as if at once.
                ingest_time: int(f[5], &at) * 1000,
            }
        })
        .collect()
}

/// A recorder's flattened `@trade` stream CSV with header: receive time, stream,
/// event type, event time, trade time, symbol, trade id, price, quantity, buyer
/// is maker (0/1), then the order type `X` (futures) or `M` (spot). Times in ms
/// (futures) or µs (spot since 2025).
/// Returns each trade with its last column.
pub fn trade_stream_csv(path: &Path, venue: &str) -> Vec<(Trade, String)> {
    lines(path)
        .iter()
        .enumerate()
        .skip(1)
        .map(|(n, line)| {
            let at = format!("{}:{}", path.display(), n + 1);
            let f: Vec<&str> = line.split(',').collect();
            assert!(f.len() >= 11, "{at}: expected 11 columns");
            let trade = Trade {
                venue: venue.into(),
                symbol: f[5].into(),
                kind: TradeKind::Trade,
                trade_id: int(f[6], &at),
                price: dec(f[7], &at),
                quantity: dec(f[8], &at),
                buyer_is_maker: f[9] == "1",
                first_trade_id: None,
                last_trade_id: None,
                source: Source::Replay,
                event_time: micros(int(f[4], &at)),
                ingest_time: micros(int(f[0], &at)),
            };
            (trade, f[10].to_owned())
        })
        .collect()
}

/// Microseconds from a Binance time in ms or µs, told apart by magnitude (spot
/// streams and files switched to µs in 2025; 10^14 ms is in the year 5138).
fn micros(t: i64) -> i64 {
    if t.abs() >= 100_000_000_000_000 {
        t
    } else {
        t * 1000
    }
}

/// Rows of a CSV file with a header line, split on commas.
pub fn csv_rows(path: &Path) -> Vec<Vec<String>> {
    lines(path)
        .iter()
        .skip(1)
        .map(|l| l.split(',').map(str::to_owned).collect())
        .collect()
}
