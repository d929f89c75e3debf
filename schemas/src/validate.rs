//! What a record must mean: the checks the schema cannot express. The producer
//! runs them before publishing and the sinks again before writing (a topic may
//! hold records from other writers). Pure functions; a failure is the reason
//! stored with the dead letter.

use crate::interval::{Interval, MAX_INTERVAL_MICROS};
use crate::records::{Asset, Candle, DeadLetter, Exchange, Market, Micros, Price, Rate, Trade};
use rust_decimal::Decimal;
use std::sync::atomic::{AtomicI64, Ordering};

/// 2009-01-03, the first block of the first cryptocurrency: nothing we carry is older.
pub const EARLIEST_MICROS: Micros = 1_230_940_800_000_000;
/// How far ahead of this machine's clock an event time may be, unless the
/// service is told otherwise (`--max-ahead-ms`): 10 s. Exchange clocks and
/// ours are NTP-synchronised to well under a second; a time further ahead is a
/// wrong clock or a wrong unit, and it must not reach `candles`, whose
/// watermark never moves back (one trade a day ahead made every later trade of
/// its symbol late), nor the sinks' newest-wins rows. 10 s leaves room for a
/// laptop's drifting clock while bounding what such a record can hold up.
pub const DEFAULT_MAX_AHEAD_MICROS: Micros = 10_000_000;

static MAX_AHEAD: AtomicI64 = AtomicI64::new(DEFAULT_MAX_AHEAD_MICROS);

/// Sets how far ahead of the clock an event time may be, process-wide; the
/// binaries call it once from their configuration.
pub fn set_max_ahead(micros: Micros) {
    MAX_AHEAD.store(micros.max(0), Ordering::Relaxed);
}

/// The bound [`Rules::at`] applies.
pub fn max_ahead() -> Micros {
    MAX_AHEAD.load(Ordering::Relaxed)
}

/// The times every sink can store: 0001-01-01 to 9999-12-31 UTC (BigQuery's
/// `TIMESTAMP` range, inside PostgreSQL's).
pub const STORABLE_MICROS: std::ops::RangeInclusive<Micros> = -62_135_596_800_000_000..=253_402_300_799_999_999;

/// Validation against the clock `now` (microseconds since the epoch).
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub now: Micros,
    /// How far ahead of `now` an event time may be.
    pub max_ahead: Micros,
}

type Check = Result<(), String>;

/// Whether `v` fits the wire's `decimal(38, 18)` exactly: at most 20 integer
/// digits and 18 fractional ones (trailing zeros aside). Checked here, with
/// the field's name, so that the input is kept with the reason; encoding would
/// refuse it too, but without the input.
fn fits(field: &str, v: &Decimal) -> Check {
    // On the hot path: no normalisation unless the scale is past 18.
    let n = if v.scale() > 18 { v.normalize() } else { *v };
    if n.scale() > 18 {
        return Err(format!(
            "{field} {v} has more than 18 decimal places, more than decimal(38, 18) holds"
        ));
    }
    // |mantissa| < 10^(20 + scale); a mantissa holds less than 10^29.
    let digits = 20 + n.scale();
    if digits < 29 && n.mantissa().unsigned_abs() >= 10u128.pow(digits) {
        return Err(format!(
            "{field} {v} has more than 20 integer digits, more than decimal(38, 18) holds"
        ));
    }
    Ok(())
}

fn positive(field: &str, v: &Decimal) -> Check {
    fits(field, v)?;
    if v.is_sign_positive() && !v.is_zero() {
        Ok(())
    } else {
        Err(format!("{field} must be positive, got {v}"))
    }
}

fn not_negative(field: &str, v: &Decimal) -> Check {
    fits(field, v)?;
    if v.is_sign_negative() && !v.is_zero() {
        Err(format!("{field} must not be negative, got {v}"))
    } else {
        Ok(())
    }
}

fn opt(field: &str, v: &Option<Decimal>, f: fn(&str, &Decimal) -> Check) -> Check {
    v.as_ref().map_or(Ok(()), |v| f(field, v))
}

/// A count or an id, which is never negative.
fn count(field: &str, v: impl Into<i64>) -> Check {
    let v = v.into();
    if v < 0 {
        Err(format!("{field} must not be negative, got {v}"))
    } else {
        Ok(())
    }
}

/// A rank, which starts at 1.
fn rank(v: i32) -> Check {
    if v < 1 {
        Err(format!("rank must be at least 1, got {v}"))
    } else {
        Ok(())
    }
}

/// Longest name (venue, symbol, id, topic) accepted, in bytes. Real ones are
/// a few dozen bytes (Kafka caps topic names at 249); a longer one is garbage,
/// and a sink's keys are indexed, where Postgres refuses entries past 2.7 kB.
pub const MAX_NAME_BYTES: usize = 255;

fn name(field: &str, v: &str) -> Check {
    if v.trim().is_empty() {
        Err(format!("{field} is empty"))
    } else {
        short(field, v)
    }
}

fn short(field: &str, v: &str) -> Check {
    if v.len() > MAX_NAME_BYTES {
        Err(format!("{field} is {} bytes long, more than {MAX_NAME_BYTES}", v.len()))
    } else {
        Ok(())
    }
}

impl Rules {
    /// The rules at `now`, with the process-wide bound on times ahead.
    pub fn at(now: Micros) -> Self {
        Rules {
            now,
            max_ahead: max_ahead(),
        }
    }

    fn time(&self, field: &str, t: Micros) -> Check {
        if t < EARLIEST_MICROS {
            Err(format!("{field} {t} µs is before 2009-01-03"))
        } else if t > self.now.saturating_add(self.max_ahead) {
            Err(format!(
                "{field} {t} µs is {} ms ahead of this machine's clock, more than the {} ms allowed \
                 (--max-ahead-ms): a wrong clock or unit",
                (t - self.now) / 1000,
                self.max_ahead / 1000
            ))
        } else {
            Ok(())
        }
    }

    fn times(&self, event_time: Micros, ingest_time: Micros) -> Check {
        self.time("event_time", event_time)?;
        self.time("ingest_time", ingest_time)
    }

    pub fn trade(&self, t: &Trade) -> Check {
        name("venue", &t.venue)?;
        name("symbol", &t.symbol)?;
        count("trade_id", t.trade_id)?;
        positive("price", &t.price)?;
        positive("quantity", &t.quantity)?;
        if let (Some(first), Some(last)) = (t.first_trade_id, t.last_trade_id) {
            if first > last {
                return Err(format!("first_trade_id {first} is after last_trade_id {last}"));
            }
        }
        self.times(t.event_time, t.ingest_time)
    }

    pub fn candle(&self, c: &Candle) -> Check {
        name("venue", &c.venue)?;
        name("symbol", &c.symbol)?;
        // Binance's calendar intervals (weeks start on Monday, months vary) are
        // known but not epoch-aligned; every other interval must be.
        if !matches!(c.interval.as_str(), "1w" | "1M") {
            let interval: Interval = c
                .interval
                .parse()
                .map_err(|e| format!("unknown interval {:?}: {e}", c.interval))?;
            if interval.checked_open_of(c.open_time) != Some(c.open_time) {
                return Err(format!(
                    "open_time {} is not aligned to a {} window",
                    c.open_time, c.interval
                ));
            }
            if c.close_time >= c.open_time.saturating_add(interval.micros()) {
                return Err(format!(
                    "close_time {} is after the {} window opening at {}",
                    c.close_time, c.interval, c.open_time
                ));
            }
        }
        if c.close_time <= c.open_time {
            return Err(format!(
                "close_time {} is not after open_time {}",
                c.close_time, c.open_time
            ));
        }
        if c.close_time.saturating_sub(c.open_time) > MAX_INTERVAL_MICROS {
            return Err(format!(
                "close_time {} is more than 366 days after open_time {}",
                c.close_time, c.open_time
            ));
        }
        for (name, v) in [
            ("open", &c.open),
            ("high", &c.high),
            ("low", &c.low),
            ("close", &c.close),
        ] {
            positive(name, v)?;
        }
        if c.low > c.high || c.open > c.high || c.close > c.high || c.open < c.low || c.close < c.low {
            return Err(format!(
                "prices are inconsistent: open {} high {} low {} close {}",
                c.open, c.high, c.low, c.close
            ));
        }
        for (name, v) in [
            ("volume", &c.volume),
            ("quote_volume", &c.quote_volume),
            ("taker_buy_base_volume", &c.taker_buy_base_volume),
            ("taker_buy_quote_volume", &c.taker_buy_quote_volume),
        ] {
            not_negative(name, v)?;
        }
        count("trade_count", c.trade_count)?;
        self.time("open_time", c.open_time)?;
        // A candle's event time is its close time, which may be ahead of the
        // clock by up to its interval (a `1d` candle opened an hour ago).
        if c.event_time > c.close_time {
            self.time("event_time", c.event_time)?;
        } else if c.event_time < EARLIEST_MICROS {
            return Err(format!("event_time {} µs is before 2009-01-03", c.event_time));
        }
        self.time("ingest_time", c.ingest_time)
    }

    pub fn asset(&self, a: &Asset) -> Check {
        name("id", &a.id)?;
        name("symbol", &a.symbol)?;
        rank(a.rank)?;
        positive("price_usd", &a.price_usd)?;
        not_negative("supply", &a.supply)?;
        opt("max_supply", &a.max_supply, not_negative)?;
        opt("market_cap_usd", &a.market_cap_usd, not_negative)?;
        opt("volume_usd_24h", &a.volume_usd_24h, not_negative)?;
        opt("vwap_24h", &a.vwap_24h, not_negative)?;
        opt("change_percent_24h", &a.change_percent_24h, fits)?;
        self.times(a.event_time, a.ingest_time)
    }

    pub fn rate(&self, r: &Rate) -> Check {
        name("id", &r.id)?;
        name("symbol", &r.symbol)?;
        positive("rate_usd", &r.rate_usd)?;
        self.times(r.event_time, r.ingest_time)
    }

    pub fn exchange(&self, e: &Exchange) -> Check {
        name("exchange_id", &e.exchange_id)?;
        rank(e.rank)?;
        count("trading_pairs", e.trading_pairs)?;
        opt("percent_total_volume", &e.percent_total_volume, not_negative)?;
        opt("volume_usd", &e.volume_usd, not_negative)?;
        self.times(e.event_time, e.ingest_time)
    }

    pub fn market(&self, m: &Market) -> Check {
        name("exchange_id", &m.exchange_id)?;
        name("base_symbol", &m.base_symbol)?;
        name("quote_symbol", &m.quote_symbol)?;
        positive("price_quote", &m.price_quote)?;
        positive("price_usd", &m.price_usd)?;
        opt("volume_usd_24h", &m.volume_usd_24h, not_negative)?;
        opt("percent_exchange_volume", &m.percent_exchange_volume, not_negative)?;
        if m.trades_count_24h.is_some_and(|n| n < 0) {
            return Err("trades_count_24h must not be negative".into());
        }
        self.times(m.event_time, m.ingest_time)
    }

    /// A dead letter may come from another writer, and its names become a
    /// sink's indexed columns and its times timestamps; anything else in it is
    /// kept as it came.
    pub fn dead_letter(&self, d: &DeadLetter) -> Check {
        short("component", &d.component)?;
        d.topic.as_deref().map_or(Ok(()), |t| short("topic", t))?;
        for (field, t) in [("event_time", d.event_time), ("ingest_time", d.ingest_time)] {
            if !STORABLE_MICROS.contains(&t) {
                return Err(format!("{field} {t} µs is outside the years 1 to 9999"));
            }
        }
        Ok(())
    }

    pub fn price(&self, p: &Price) -> Check {
        name("asset_id", &p.asset_id)?;
        positive("price_usd", &p.price_usd)?;
        self.times(p.event_time, p.ingest_time)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{Source, TradeKind};

    const NOW: Micros = 1_767_225_600_000_000;

    fn trade(symbol: &str) -> Trade {
        Trade {
            venue: "binance".into(),
            symbol: symbol.into(),
            kind: TradeKind::Trade,
            trade_id: 1,
            price: Decimal::new(68_000, 0),
            quantity: Decimal::new(1, 3),
            buyer_is_maker: false,
            first_trade_id: None,
            last_trade_id: None,
            source: Source::Binance,
            event_time: NOW,
            ingest_time: NOW,
        }
    }

    fn letter(component: &str, topic: Option<&str>) -> DeadLetter {
        DeadLetter {
            stage: "parse".into(),
            error: "x".repeat(10_000),
            component: component.into(),
            topic: topic.map(str::to_owned),
            partition: None,
            offset: None,
            key: None,
            payload: vec![0; 10_000],
            source: Source::Unknown,
            event_time: NOW,
            ingest_time: NOW,
        }
    }

    #[test]
    fn times_ahead_of_the_clock_are_bounded() {
        let rules = Rules {
            now: NOW,
            max_ahead: DEFAULT_MAX_AHEAD_MICROS,
        };
        let mut t = trade("BTCUSDT");
        t.event_time = NOW + 9_999_000;
        assert_eq!(rules.trade(&t), Ok(()));
        t.event_time = NOW + 23 * 3_600_000_000;
        assert!(rules
            .trade(&t)
            .is_err_and(|e| e.contains("82800000 ms ahead") && e.contains("--max-ahead-ms")));
        let wider = Rules {
            max_ahead: 86_400_000_000,
            ..rules
        };
        assert_eq!(wider.trade(&t), Ok(()));
        // A candle's event time is its close time, which may be ahead by its interval.
        let mut c = Candle {
            venue: "binance".into(),
            symbol: "BTCUSDT".into(),
            interval: "1d".into(),
            origin: crate::records::CandleOrigin::Aggregated,
            open_time: NOW,
            close_time: NOW + 86_399_999_000,
            open: Decimal::ONE,
            high: Decimal::ONE,
            low: Decimal::ONE,
            close: Decimal::ONE,
            volume: Decimal::ONE,
            quote_volume: Decimal::ONE,
            trade_count: 1,
            taker_buy_base_volume: Decimal::ONE,
            taker_buy_quote_volume: Decimal::ONE,
            first_trade_id: Some(1),
            last_trade_id: Some(1),
            closed: false,
            source: Source::Binance,
            event_time: NOW + 86_399_999_000,
            ingest_time: NOW,
        };
        assert_eq!(rules.candle(&c), Ok(()));
        c.event_time += 1;
        assert!(rules.candle(&c).is_err());
    }

    #[test]
    fn decimals_must_fit_the_wire_type() {
        let rules = Rules::at(NOW);
        let mut t = trade("BTCUSDT");
        t.price = "99999999999999999999.99999999".parse().unwrap();
        assert_eq!(rules.trade(&t), Ok(()));
        t.price = "100000000000000000000".parse().unwrap();
        assert!(rules
            .trade(&t)
            .is_err_and(|e| e.contains("price") && e.contains("20 integer digits")));
        t.price = "0.0000000000000000001".parse().unwrap();
        assert!(rules.trade(&t).is_err_and(|e| e.contains("18 decimal places")));
        t.price = "1.0000000000000000000000".parse().unwrap();
        assert_eq!(rules.trade(&t), Ok(()), "trailing zeros are not places");
    }

    #[test]
    fn names_are_present_and_short() {
        let rules = Rules::at(NOW);
        let longest = "A".repeat(MAX_NAME_BYTES);
        let too_long = "A".repeat(MAX_NAME_BYTES + 1);
        assert_eq!(rules.trade(&trade("BTCUSDT")), Ok(()));
        assert_eq!(rules.trade(&trade(&longest)), Ok(()));
        assert_eq!(rules.trade(&trade(" ")), Err("symbol is empty".to_owned()));
        assert_eq!(
            rules.trade(&trade(&too_long)),
            Err("symbol is 256 bytes long, more than 255".to_owned())
        );
    }

    #[test]
    fn dead_letters_are_kept_as_they_came_but_for_long_names() {
        let rules = Rules::at(NOW);
        // Another writer's letter: empty names and long bodies are its own business.
        assert_eq!(rules.dead_letter(&letter("", None)), Ok(()));
        assert_eq!(rules.dead_letter(&letter("producer", Some("trades"))), Ok(()));
        assert!(rules
            .dead_letter(&letter("producer", Some(&"t".repeat(300))))
            .is_err_and(|e| e.starts_with("topic is 300 bytes")));
        assert!(rules
            .dead_letter(&letter(&"c".repeat(300), None))
            .is_err_and(|e| e.starts_with("component is 300 bytes")));
        let mut far = letter("producer", None);
        far.event_time = i64::MAX;
        assert!(rules
            .dead_letter(&far)
            .is_err_and(|e| e.contains("outside the years 1 to 9999")));
    }
}
