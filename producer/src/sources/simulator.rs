//! A built-in market: a venue with a few symbols whose trades have sequential
//! ids and a random-walk price in whole ticks, closed klines built from those
//! trades (empty windows filled the Binance way), and CoinCap-shaped assets,
//! rates, exchanges, markets and prices derived from the same prices.
//!
//! The market itself ([`Market`]) is a pure, deterministic iterator over a
//! virtual clock: the same seed gives the same records. The source paces it to
//! the wall clock at the configured rate, or runs it flat out as a load
//! generator.

use std::collections::BTreeMap;

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use tickpipe_schemas::{
    AnyRecord, Asset, Candle, CandleOrigin, Exchange, Market as MarketRecord, Micros, Price, Rate, RateType,
    Source as RecordSource, Trade, TradeKind,
};

use super::{SourceConfig, SourceError, Stop};
use crate::item::{now_micros, Item};
use crate::publish::Publisher;

const COMPONENT: &str = "simulator";

tickpipe_ops::section! {
    /// The `[simulator]` section: a seeded market of every entity, for demos and
    /// load, when no exchange is reachable.
    pub struct SimulatorConfig in "simulator" {
        /// Simulator seed: the same seed gives the same market.
        seed: u64 [default_value_t = 42],
        /// Simulated trades per second over all symbols; 0 = as fast as possible.
        rate: f64 [default_value_t = 50.0],
        /// Symbols traded (quote asset USDT), comma-separated.
        symbols: Vec<String> [value_delimiter = ',', default_value = "BTCUSDT,ETHUSDT,AAVEUSDT"],
        /// Venue carried in records and keys.
        venue: String [default_value = "simulator"],
        /// Virtual start time in ms since the epoch [default: now].
        start_ms: Option<i64> [],
        /// Kline interval, in seconds.
        kline_secs: i64 [default_value_t = 60],
        /// Virtual seconds between CoinCap-shaped updates.
        coincap_every_secs: i64 [default_value_t = 10],
        /// Stop after this many trades (then the source ends) [default: never].
        max_trades: Option<u64> [],
    }
}

impl SourceConfig for SimulatorConfig {
    const NAME: &'static str = "simulator";

    fn check(&self) -> Result<(), SourceError> {
        if self.symbols.is_empty()
            || self.kline_secs < 1
            || self.coincap_every_secs < 1
            || !(self.rate >= 0.0 && self.rate.is_finite())
        {
            return Err(SourceError::User(
                "[simulator] needs symbols, kline_secs >= 1, coincap_every_secs >= 1 and a rate >= 0".into(),
            ));
        }
        Ok(())
    }

    fn finite(&self) -> bool {
        self.max_trades.is_some()
    }

    async fn run(self, publisher: Publisher, stop: Stop) -> Result<(), SourceError> {
        let c = self;
        let start = c.start_ms.map(|ms| ms * 1000).unwrap_or_else(now_micros);
        let market = Market::new(&c, start);
        let wall0 = tokio::time::Instant::now();
        let received = publisher.metrics().received.with_label_values(&[COMPONENT]);
        for mut item in market {
            if stop.is_stopped() {
                break;
            }
            if let Item::Record(AnyRecord::Trade(t)) = &item {
                let due = if c.rate > 0.0 {
                    Some(wall0 + Duration::from_micros((t.event_time - start).max(0) as u64))
                } else {
                    // Flat out, virtual time must not run ahead of the wall
                    // clock: the consumers refuse event times more than
                    // `--max-ahead-ms` ahead of theirs.
                    let ahead = t.event_time - now_micros();
                    (ahead > 1_000_000).then(|| tokio::time::Instant::now() + Duration::from_micros(ahead as u64))
                };
                if let Some(due) = due {
                    let mut stop = stop.clone();
                    tokio::select! {
                        _ = tokio::time::sleep_until(due) => {}
                        _ = stop.wait() => break,
                    }
                }
            }
            received.inc();
            set_ingest(&mut item, now_micros());
            publisher.publish(item).await;
        }
        Ok(())
    }
}

fn set_ingest(item: &mut Item, t: Micros) {
    if let Item::Record(r) = item {
        r.set_ingest_time(t);
    }
}

/// One symbol's state.
struct Book {
    symbol: String,
    /// CoinCap-style asset id of the base asset.
    asset: String,
    base: String,
    /// Price in ticks of 0.01.
    ticks: i64,
    start_ticks: i64,
    next_id: i64,
    window: Option<Window>,
    last_close: Option<Decimal>,
}

/// The kline being built.
struct Window {
    open_time: Micros,
    open: Decimal,
    high: Decimal,
    low: Decimal,
    close: Decimal,
    volume: Decimal,
    quote: Decimal,
    count: i64,
    taker_base: Decimal,
    taker_quote: Decimal,
    first_id: i64,
    last_id: i64,
}

/// The simulated market: an endless (or `max_trades`-long) deterministic
/// stream of items in virtual time.
pub struct Market {
    rng: StdRng,
    books: Vec<Book>,
    venue: String,
    now: Micros,
    mean_gap: f64,
    kline: Micros,
    coincap_every: Micros,
    next_coincap: Micros,
    trades_left: Option<u64>,
    pending: std::collections::VecDeque<Item>,
}

fn asset_of(base: &str) -> (&'static str, i64) {
    match base {
        "BTC" => ("bitcoin", 6_800_000),
        "ETH" => ("ethereum", 360_000),
        "AAVE" => ("aave", 15_000),
        "STX" => ("stacks", 180),
        "ARB" => ("arbitrum", 80),
        "SOL" => ("solana", 15_000),
        _ => ("", 10_000),
    }
}

impl Market {
    pub fn new(c: &SimulatorConfig, start: Micros) -> Self {
        let books = c
            .symbols
            .iter()
            .map(|s| {
                let symbol = s.to_uppercase();
                let base = symbol.strip_suffix("USDT").unwrap_or(&symbol).to_owned();
                let (asset, ticks) = asset_of(&base);
                let asset = if asset.is_empty() {
                    base.to_lowercase()
                } else {
                    asset.to_owned()
                };
                Book {
                    symbol,
                    asset,
                    base,
                    ticks,
                    start_ticks: ticks,
                    next_id: 1,
                    window: None,
                    last_close: None,
                }
            })
            .collect();
        Market {
            rng: StdRng::seed_from_u64(c.seed),
            books,
            venue: c.venue.clone(),
            now: start,
            // Flat out: about half a million trades per virtual second, so
            // that virtual time keeps pace with a producer running flat out
            // (the source holds it back should it run ahead of the wall clock).
            mean_gap: if c.rate > 0.0 { 1e6 / c.rate } else { 2.0 },
            kline: c.kline_secs * 1_000_000,
            coincap_every: c.coincap_every_secs * 1_000_000,
            next_coincap: start,
            trades_left: c.max_trades,
            pending: Default::default(),
        }
    }

    fn trade(&mut self) {
        // Exponential gaps between trades, at least 1 µs.
        let u: f64 = self.rng.random_range(f64::EPSILON..1.0);
        self.now += ((-u.ln()) * self.mean_gap).max(1.0) as Micros;
        let i = self.rng.random_range(0..self.books.len());
        let step = self.rng.random_range(-3i64..=3);
        let qty_lots: i64 = self.rng.random_range(1..=5000);
        let buyer_is_maker = self.rng.random_bool(0.5);
        let now = self.now;
        let venue = self.venue.clone();
        let kline = self.kline;
        let b = &mut self.books[i];
        // A walk pulled gently back towards its start, never below one tick.
        let pull = if b.ticks > b.start_ticks * 2 {
            -1
        } else if b.ticks * 2 < b.start_ticks {
            1
        } else {
            0
        };
        b.ticks = (b.ticks + step + pull).max(1);
        let price = Decimal::new(b.ticks, 2);
        let quantity = Decimal::new(qty_lots, 5);
        let id = b.next_id;
        b.next_id += 1;
        let open_time = now - now.rem_euclid(kline);
        // Close the window before this trade's, filling empty ones.
        while let Some(w) = b.window.as_ref().filter(|w| w.open_time < open_time) {
            let next_open = w.open_time + kline;
            let closed = b.window.take().map(|w| candle(&venue, &b.symbol, kline, w));
            if let Some(c) = closed {
                b.last_close = Some(c.close);
                self.pending.push_back(Item::from(c));
            }
            if next_open < open_time {
                let p = b.last_close.unwrap_or(price);
                b.window = Some(Window::empty(next_open, p));
            }
        }
        let w = b.window.get_or_insert_with(|| Window::empty(open_time, price));
        w.add(price, quantity, id, !buyer_is_maker);
        self.pending.push_back(Item::from(Trade {
            venue,
            symbol: b.symbol.clone(),
            kind: TradeKind::Trade,
            trade_id: id,
            price,
            quantity,
            buyer_is_maker,
            first_trade_id: None,
            last_trade_id: None,
            source: RecordSource::Simulator,
            event_time: now,
            ingest_time: now,
        }));
    }

    fn coincap(&mut self) {
        let now = self.now;
        let src = RecordSource::Simulator;
        for (rank, b) in self.books.iter().enumerate() {
            let price = Decimal::new(b.ticks, 2);
            let supply = Decimal::from(21_000_000 / (rank as i64 + 1));
            self.pending.push_back(Item::from(Asset {
                id: b.asset.clone(),
                rank: rank as i32 + 1,
                symbol: b.base.clone(),
                name: b.base.clone(),
                supply,
                max_supply: None,
                market_cap_usd: Some(price * supply),
                volume_usd_24h: None,
                price_usd: price,
                change_percent_24h: Some(Decimal::new(
                    (b.ticks - b.start_ticks) * 10_000 / b.start_ticks.max(1),
                    2,
                )),
                vwap_24h: None,
                explorer: None,
                tokens: BTreeMap::new(),
                source: src,
                event_time: now,
                ingest_time: now,
            }));
            self.pending.push_back(Item::from(Rate {
                id: b.asset.clone(),
                symbol: b.base.clone(),
                currency_symbol: None,
                rate_type: RateType::Crypto,
                rate_usd: price,
                source: src,
                event_time: now,
                ingest_time: now,
            }));
            self.pending.push_back(Item::from(MarketRecord {
                exchange_id: self.venue.clone(),
                rank: rank as i32 + 1,
                base_symbol: b.base.clone(),
                base_id: b.asset.clone(),
                quote_symbol: "USDT".into(),
                quote_id: "tether".into(),
                price_quote: price,
                price_usd: price,
                volume_usd_24h: None,
                percent_exchange_volume: None,
                trades_count_24h: Some(b.next_id - 1),
                source: src,
                event_time: now,
                ingest_time: now,
            }));
            self.pending.push_back(Item::from(Price {
                asset_id: b.asset.clone(),
                price_usd: price,
                source: src,
                event_time: now,
                ingest_time: now,
            }));
        }
        self.pending.push_back(Item::from(Rate {
            id: "united-states-dollar".into(),
            symbol: "USD".into(),
            currency_symbol: Some("$".into()),
            rate_type: RateType::Fiat,
            rate_usd: Decimal::ONE,
            source: src,
            event_time: now,
            ingest_time: now,
        }));
        self.pending.push_back(Item::from(Exchange {
            exchange_id: self.venue.clone(),
            name: "tickpipe simulator".into(),
            rank: 1,
            percent_total_volume: Some(Decimal::ONE_HUNDRED),
            volume_usd: None,
            trading_pairs: self.books.len() as i32,
            socket: Some(true),
            exchange_url: None,
            source: src,
            event_time: now,
            ingest_time: now,
        }));
    }
}

impl Window {
    fn empty(open_time: Micros, p: Decimal) -> Self {
        Window {
            open_time,
            open: p,
            high: p,
            low: p,
            close: p,
            volume: Decimal::ZERO,
            quote: Decimal::ZERO,
            count: 0,
            taker_base: Decimal::ZERO,
            taker_quote: Decimal::ZERO,
            first_id: -1,
            last_id: -1,
        }
    }

    fn add(&mut self, p: Decimal, q: Decimal, id: i64, taker_buy: bool) {
        if self.count == 0 {
            self.open = p;
            self.high = p;
            self.low = p;
            self.first_id = id;
        }
        self.high = self.high.max(p);
        self.low = self.low.min(p);
        self.close = p;
        self.volume += q;
        self.quote += p * q;
        if taker_buy {
            self.taker_base += q;
            self.taker_quote += p * q;
        }
        self.count += 1;
        self.last_id = id;
    }
}

fn candle(venue: &str, symbol: &str, kline: Micros, w: Window) -> Candle {
    let secs = kline / 1_000_000;
    let interval = match secs {
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    };
    let close_time = w.open_time + kline - 1000;
    Candle {
        venue: venue.to_owned(),
        symbol: symbol.to_owned(),
        interval,
        origin: CandleOrigin::ExchangeKline,
        open_time: w.open_time,
        close_time,
        open: w.open,
        high: w.high,
        low: w.low,
        close: w.close,
        volume: w.volume,
        quote_volume: w.quote,
        trade_count: w.count,
        taker_buy_base_volume: w.taker_base,
        taker_buy_quote_volume: w.taker_quote,
        first_trade_id: (w.first_id >= 0).then_some(w.first_id),
        last_trade_id: (w.last_id >= 0).then_some(w.last_id),
        closed: true,
        source: RecordSource::Simulator,
        event_time: close_time,
        ingest_time: close_time,
    }
}

impl Iterator for Market {
    type Item = Item;

    fn next(&mut self) -> Option<Item> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(item);
            }
            if self.now >= self.next_coincap {
                self.next_coincap += self.coincap_every;
                self.coincap();
                continue;
            }
            match &mut self.trades_left {
                Some(0) => return None,
                Some(n) => *n -= 1,
                None => {}
            }
            self.trade();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tickpipe_schemas::validate::Rules;

    use super::*;

    fn config() -> SimulatorConfig {
        SimulatorConfig {
            rate: 20.0,
            max_trades: Some(5000),
            ..SimulatorConfig::default()
        }
    }

    const START: Micros = 1_767_225_600_000_000;

    #[test]
    fn flat_out_the_virtual_clock_keeps_pace_with_the_wall() {
        let c = SimulatorConfig {
            rate: 0.0,
            max_trades: Some(200_000),
            ..config()
        };
        let last = Market::new(&c, START)
            .filter_map(|i| match i {
                Item::Record(AnyRecord::Trade(t)) => Some(t.event_time),
                _ => None,
            })
            .max()
            .expect("trades");
        // 200,000 trades take well under a second of wall time flat out.
        assert!(last - START < 1_000_000, "{} µs of virtual time", last - START);
    }

    #[test]
    fn the_same_seed_gives_the_same_market() {
        let a: Vec<Item> = Market::new(&config(), START).collect();
        let b: Vec<Item> = Market::new(&config(), START).collect();
        assert_eq!(a, b);
        let other = SimulatorConfig { seed: 7, ..config() };
        assert_ne!(a, Market::new(&other, START).collect::<Vec<_>>());
    }

    #[test]
    fn trades_are_sequential_valid_and_klines_sum_them() {
        let items: Vec<Item> = Market::new(&config(), START).collect();
        let rules = Rules::at(START + 86_400_000_000 * 3);
        let mut next: HashMap<String, i64> = HashMap::new();
        let mut counted: HashMap<String, i64> = HashMap::new();
        let mut trades = 0;
        for item in &items {
            let check = match item {
                Item::Record(AnyRecord::Trade(t)) => {
                    trades += 1;
                    let n = next.entry(t.symbol.clone()).or_insert(1);
                    assert_eq!(t.trade_id, *n, "ids are sequential per symbol");
                    *n += 1;
                    rules.trade(t)
                }
                Item::Record(AnyRecord::Candle(c)) => {
                    *counted.entry(c.symbol.clone()).or_default() += c.trade_count;
                    assert_eq!(c.open_time % 60_000_000, 0);
                    rules.candle(c)
                }
                Item::Record(r) => r.validate(&rules),
                Item::Reject(r) => Err(r.reason.clone()),
            };
            assert_eq!(check, Ok(()), "{item:?}");
        }
        assert_eq!(trades, 5000);
        // Every trade but those of each symbol's still-open window is in a kline.
        for (symbol, n) in &next {
            let in_klines = counted.get(symbol).copied().unwrap_or(0);
            assert!(
                in_klines < n - 1 && in_klines > (n - 1) / 2,
                "{symbol}: {in_klines} of {}",
                n - 1
            );
        }
        assert!(items.iter().any(|i| matches!(i, Item::Record(AnyRecord::Exchange(_)))));
    }
}
