//! Event-time aggregation of trades into OHLCV candles: pure, no I/O.
//!
//! For each (venue, symbol) and each configured interval, trades fall into
//! windows aligned to the UTC epoch. A window is published (closed) as soon as a
//! trade at or after its end has been seen, and kept until the watermark (the
//! largest event time seen minus the allowed lateness) passes its end: a late
//! trade arriving before that updates it and the corrected candle is published
//! again (same key, so the newer version wins downstream). Trades for windows the
//! watermark has passed are returned as late. Gaps between windows are filled
//! with empty candles the way Binance fills them (open = high = low = close =
//! previous close, volumes and count zero), unless disabled.
//!
//! Sums are exact: prices and quantities are carried as integers scaled by
//! 10^18, the wire scale, so adding and comparing is integer arithmetic.
//! Trades with a price or quantity that is not positive (such as Binance futures'
//! non-MARKET trades, published with price 0) are excluded, as Binance excludes
//! them from its klines, and returned as invalid.

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use tickpipe_schemas::decimal::{from_unscaled, product_unscaled, to_unscaled};
use tickpipe_schemas::{Candle, CandleOrigin, Decimal, Source, Trade, TradeKind};

use super::interval::Interval;

/// How candles are built.
#[derive(Debug, Clone)]
pub struct CandleConfig {
    /// Window sizes, each producing its own candles.
    pub intervals: Vec<Interval>,
    /// How far behind the largest event time seen a trade may arrive and still
    /// be counted (µs).
    pub allowed_lateness: i64,
    /// Whether windows without trades get Binance-style empty candles.
    pub fill_empty: bool,
    /// The longest run of empty windows filled at once; a longer gap (a symbol
    /// back after a long halt, or a wild timestamp) is left unfilled rather than
    /// flooding the topic, and the next candle simply follows the gap.
    pub max_fill: usize,
}

/// What the builder hands back.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// A candle, new or corrected.
    Candle(Candle),
    /// A trade for a window the watermark had already passed.
    Late {
        trade: Trade,
        interval: String,
        watermark: i64,
    },
    /// A trade that cannot be counted, with the reason.
    Invalid { trade: Trade, reason: String },
    /// A window whose sums exceed 28 significant digits, the most a candle
    /// record carries exactly; reported instead of a rounded candle.
    Unrepresentable {
        key: String,
        interval: String,
        open_time: i64,
    },
}

/// The running sums of one window, integers at scale 18.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Acc {
    open_time: i64,
    open: i128,
    /// (event time, trade id) of the trade that set `open`: the earliest.
    open_key: (i64, i64),
    close: i128,
    /// Of the trade that set `close`: the latest.
    close_key: (i64, i64),
    high: i128,
    low: i128,
    volume: i128,
    quote_volume: i128,
    taker_buy_base: i128,
    taker_buy_quote: i128,
    count: i64,
    first_id: i64,
    last_id: i64,
    /// Largest ingest time of its trades, carried into the candle.
    ingest_time: i64,
    /// Published at least once (so any change is a correction to publish).
    published: bool,
    /// Changed since it was last published.
    dirty: bool,
}

impl Acc {
    /// An empty window carrying the previous close.
    fn empty(open_time: i64, prev_close: i128) -> Acc {
        Acc {
            open_time,
            open: prev_close,
            open_key: (i64::MAX, i64::MAX),
            close: prev_close,
            close_key: (i64::MIN, i64::MIN),
            high: prev_close,
            low: prev_close,
            volume: 0,
            quote_volume: 0,
            taker_buy_base: 0,
            taker_buy_quote: 0,
            count: 0,
            first_id: i64::MAX,
            last_id: i64::MIN,
            ingest_time: i64::MIN,
            published: false,
            dirty: true,
        }
    }

    #[inline]
    fn add(&mut self, t: &Fixed) {
        if self.count == 0 {
            self.high = t.price;
            self.low = t.price;
        } else {
            self.high = self.high.max(t.price);
            self.low = self.low.min(t.price);
        }
        if t.key < self.open_key {
            self.open_key = t.key;
            self.open = t.price;
        }
        if t.key > self.close_key {
            self.close_key = t.key;
            self.close = t.price;
        }
        self.volume += t.qty;
        self.quote_volume += t.quote;
        if t.taker_bought {
            self.taker_buy_base += t.qty;
            self.taker_buy_quote += t.quote;
        }
        self.count += t.trades;
        self.first_id = self.first_id.min(t.first_id);
        self.last_id = self.last_id.max(t.last_id);
        self.ingest_time = self.ingest_time.max(t.ingest_time);
        self.dirty = true;
    }
}

/// One trade in integer form.
struct Fixed {
    key: (i64, i64),
    price: i128,
    qty: i128,
    quote: i128,
    taker_bought: bool,
    trades: i64,
    first_id: i64,
    last_id: i64,
    ingest_time: i64,
}

/// The windows of one (symbol, interval).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Series {
    /// Windows not yet final, by open time.
    windows: VecDeque<Acc>,
    /// Open time of the newest window that is final (the watermark passed it).
    final_upto: Option<i64>,
    /// Open time and close of the newest window published so far, for filling
    /// gaps.
    last_published: Option<(i64, i128)>,
    /// The window of the previous trade, `[open, end)`: most trades fall in it,
    /// which saves a division.
    current: (i64, i64),
}

#[derive(Debug, Serialize, Deserialize)]
struct SymbolState {
    venue: String,
    symbol: String,
    /// Largest event time seen.
    max_event: i64,
    /// Source of the latest trade, carried into the candles.
    #[serde(with = "source_symbol")]
    source: Source,
    series: Vec<Series>,
}

/// Builds candles from trades, one trade at a time.
#[derive(Debug)]
pub struct CandleBuilder {
    config: CandleConfig,
    symbols: Vec<SymbolState>,
    index: HashMap<(String, String), usize>,
    /// The symbol of the previous trade: trades come in runs per symbol.
    last: Option<usize>,
}

impl CandleBuilder {
    pub fn new(config: CandleConfig) -> Self {
        CandleBuilder {
            config,
            symbols: Vec::new(),
            index: HashMap::new(),
            last: None,
        }
    }

    pub fn config(&self) -> &CandleConfig {
        &self.config
    }

    /// The watermark of a symbol: its largest event time minus the lateness.
    pub fn watermark(&self, venue: &str, symbol: &str) -> Option<i64> {
        self.index
            .get(&(venue.to_owned(), symbol.to_owned()))
            .map(|&i| self.symbols[i].max_event.saturating_sub(self.config.allowed_lateness))
    }

    fn state_of(&mut self, trade: &Trade) -> usize {
        if let Some(i) = self.last {
            let s = &self.symbols[i];
            if s.symbol == trade.symbol && s.venue == trade.venue {
                return i;
            }
        }
        let key = (trade.venue.clone(), trade.symbol.clone());
        let n = self.symbols.len();
        let i = *self.index.entry(key).or_insert(n);
        if i == n {
            self.symbols.push(SymbolState {
                venue: trade.venue.clone(),
                symbol: trade.symbol.clone(),
                max_event: i64::MIN,
                source: trade.source,
                series: self.config.intervals.iter().map(|_| Series::default()).collect(),
            });
        }
        self.last = Some(i);
        i
    }

    /// The smallest watermark over the symbols seen, if any.
    pub fn min_watermark(&self) -> Option<i64> {
        self.symbols
            .iter()
            .map(|s| s.max_event.saturating_sub(self.config.allowed_lateness))
            .min()
    }

    /// The builder's whole state, to be stored next to the input position it
    /// corresponds to, so that a restart resumes exactly where this left off.
    pub fn snapshot(&self) -> Vec<u8> {
        let snap = SnapshotRef {
            intervals: self.config.intervals.iter().map(|i| i.name()).collect(),
            symbols: &self.symbols,
        };
        serde_json::to_vec(&snap).unwrap_or_default()
    }

    /// A builder with `config` and the state of a snapshot. Fails when the
    /// snapshot is unreadable or was taken with other intervals.
    pub fn restore(config: CandleConfig, snapshot: &[u8]) -> Result<Self, String> {
        let snap: Snapshot =
            serde_json::from_slice(snapshot).map_err(|e| format!("unreadable candle state snapshot: {e}"))?;
        let ours: Vec<&str> = config.intervals.iter().map(|i| i.name()).collect();
        if snap.intervals != ours {
            return Err(format!(
                "the stored candle state was built for intervals {:?}, not {:?}; keep the intervals, or start with a new state topic",
                snap.intervals, ours
            ));
        }
        let mut builder = CandleBuilder::new(config);
        for (i, s) in snap.symbols.into_iter().enumerate() {
            builder.index.insert((s.venue.clone(), s.symbol.clone()), i);
            builder.symbols.push(s);
        }
        Ok(builder)
    }

    /// Adds one trade; appends what it causes to `out`.
    pub fn push(&mut self, trade: &Trade, out: &mut Vec<Output>) {
        let fixed = match fixed(trade) {
            Ok(f) => f,
            Err(reason) => {
                out.push(Output::Invalid {
                    trade: trade.clone(),
                    reason,
                });
                return;
            }
        };
        let si = self.state_of(trade);
        let lateness = self.config.allowed_lateness;
        let fill = self.config.fill_empty.then_some(self.config.max_fill);
        let state = &mut self.symbols[si];
        state.source = trade.source;
        let t = trade.event_time;
        state.max_event = state.max_event.max(t);
        let watermark = state.max_event.saturating_sub(lateness);
        for (k, interval) in self.config.intervals.iter().enumerate() {
            let series = &mut state.series[k];
            let open = if series.current.0 <= t && t < series.current.1 {
                series.current.0
            } else {
                let open = interval.open_of(t);
                series.current = (open, open + interval.micros());
                open
            };
            if series.final_upto.is_some_and(|f| open <= f) {
                out.push(Output::Late {
                    trade: trade.clone(),
                    interval: interval.name().to_owned(),
                    watermark,
                });
                continue;
            }
            window_for(series, open, &fixed).add(&fixed);
            let target = Target {
                venue: &state.venue,
                symbol: &state.symbol,
                source: state.source,
                interval,
            };
            emit_ready(&target, series, state.max_event, watermark, fill, out);
        }
    }

    /// Publishes every window still open, as not closed (end of input).
    pub fn finish(&mut self, out: &mut Vec<Output>) {
        let fill = self.config.fill_empty.then_some(self.config.max_fill);
        for state in &mut self.symbols {
            for (k, interval) in self.config.intervals.iter().enumerate() {
                let series = &mut state.series[k];
                let target = Target {
                    venue: &state.venue,
                    symbol: &state.symbol,
                    source: state.source,
                    interval,
                };
                // Everything complete up to the largest event time is closed;
                // the window holding it is still forming.
                emit_ready(&target, series, state.max_event, state.max_event, fill, out);
                while let Some(mut acc) = series.windows.pop_front() {
                    if acc.dirty {
                        target.fill(series, acc.open_time, fill, acc.ingest_time, out);
                        target.publish(&mut series.last_published, &mut acc, false, out);
                    }
                }
            }
        }
    }
}

#[derive(Serialize)]
struct SnapshotRef<'a> {
    intervals: Vec<&'a str>,
    symbols: &'a [SymbolState],
}

#[derive(Deserialize)]
struct Snapshot {
    intervals: Vec<String>,
    symbols: Vec<SymbolState>,
}

/// `Source` as its Avro symbol in snapshots.
mod source_symbol {
    use serde::{Deserialize, Deserializer, Serializer};
    use tickpipe_schemas::Source;

    pub fn serialize<S: Serializer>(s: &Source, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(s.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<Source, D::Error> {
        let s = String::deserialize(de)?;
        Ok(s.parse().unwrap_or(Source::Unknown))
    }
}

/// Aggregates a whole sequence of trades: every candle published, in order, the
/// last window of each series included as not closed. Late and invalid trades
/// are returned too.
pub fn aggregate<'a>(trades: impl IntoIterator<Item = &'a Trade>, config: CandleConfig) -> Vec<Output> {
    let mut builder = CandleBuilder::new(config);
    let mut out = Vec::new();
    for t in trades {
        builder.push(t, &mut out);
    }
    builder.finish(&mut out);
    out
}

fn fixed(trade: &Trade) -> Result<Fixed, String> {
    if trade.price <= Decimal::ZERO || trade.quantity <= Decimal::ZERO {
        return Err(format!(
            "price {} and quantity {} must be positive (Binance excludes such trades from klines)",
            trade.price, trade.quantity
        ));
    }
    let price = to_unscaled(&trade.price).map_err(|e| e.to_string())?;
    let qty = to_unscaled(&trade.quantity).map_err(|e| e.to_string())?;
    let quote = product_unscaled(&trade.price, &trade.quantity).ok_or_else(|| {
        format!(
            "price x quantity {} x {} does not fit decimal(38, 18) exactly",
            trade.price, trade.quantity
        )
    })?;
    let (first_id, last_id) = match (trade.kind, trade.first_trade_id, trade.last_trade_id) {
        (TradeKind::AggTrade, Some(f), Some(l)) if l >= f => (f, l),
        _ => (trade.trade_id, trade.trade_id),
    };
    Ok(Fixed {
        key: (trade.event_time, trade.trade_id),
        price,
        qty,
        quote,
        taker_bought: !trade.buyer_is_maker,
        trades: last_id - first_id + 1,
        first_id,
        last_id,
        ingest_time: trade.ingest_time,
    })
}

/// The window opening at `open`, created in order if new.
fn window_for<'s>(series: &'s mut Series, open: i64, t: &Fixed) -> &'s mut Acc {
    let pos = series.windows.iter().rposition(|w| w.open_time <= open);
    match pos {
        Some(i) if series.windows[i].open_time == open => &mut series.windows[i],
        _ => {
            let at = pos.map_or(0, |i| i + 1);
            series.windows.insert(at, Acc::empty(open, t.price));
            &mut series.windows[at]
        }
    }
}

/// Where a series' candles go: the identity every candle carries.
struct Target<'a> {
    venue: &'a str,
    symbol: &'a str,
    source: Source,
    interval: &'a Interval,
}

impl Target<'_> {
    fn emit(&self, acc: &Acc, closed: bool, out: &mut Vec<Output>) {
        out.push(match candle(self, acc, closed) {
            Some(c) => Output::Candle(c),
            None => Output::Unrepresentable {
                key: format!("{}:{}", self.venue, self.symbol),
                interval: self.interval.name().to_owned(),
                open_time: acc.open_time,
            },
        });
    }

    /// Emits empty candles after the newest published window, for every window
    /// opening before `until`, when filling is on.
    fn fill(&self, series: &mut Series, until: i64, fill: Option<usize>, ingest_time: i64, out: &mut Vec<Output>) {
        let Some(max_fill) = fill else { return };
        let len = self.interval.micros();
        if let Some((mut open, close)) = series.last_published {
            open += len;
            if (until - open) / len > max_fill as i64 {
                return;
            }
            while open < until {
                let mut empty = Acc::empty(open, close);
                empty.ingest_time = ingest_time;
                self.emit(&empty, true, out);
                series.last_published = Some((open, close));
                open += len;
            }
        }
    }

    /// Publishes `acc` and advances the newest published window.
    fn publish(&self, series_last: &mut Option<(i64, i128)>, acc: &mut Acc, closed: bool, out: &mut Vec<Output>) {
        self.emit(acc, closed, out);
        acc.published = true;
        acc.dirty = false;
        if series_last.is_none_or(|(o, _)| o < acc.open_time) {
            *series_last = Some((acc.open_time, acc.close));
        }
    }
}

/// Publishes the windows that `max_event` has passed (new ones, corrections and
/// the empty ones between), then finalises those the watermark has passed.
fn emit_ready(
    target: &Target<'_>,
    series: &mut Series,
    max_event: i64,
    watermark: i64,
    fill: Option<usize>,
    out: &mut Vec<Output>,
) {
    let len = target.interval.micros();
    // The common case: the oldest window still holds the newest trade, so
    // nothing is complete; at most the empty windows before it are due.
    if let Some(front) = series.windows.front() {
        if front.open_time + len > max_event {
            if series.last_published.is_some_and(|(o, _)| o + len < front.open_time) {
                let (open, ingest) = (front.open_time, front.ingest_time);
                target.fill(series, open, fill, ingest, out);
            }
            return;
        }
    }
    let mut i = 0;
    while i < series.windows.len() && series.windows[i].open_time + len <= max_event {
        let (open, dirty, ingest) = {
            let w = &series.windows[i];
            (w.open_time, w.dirty, w.ingest_time)
        };
        if dirty {
            target.fill(series, open, fill, ingest, out);
            let mut last = series.last_published;
            target.publish(&mut last, &mut series.windows[i], true, out);
            series.last_published = last;
        }
        i += 1;
    }
    // Windows after the newest trade's window... up to the one holding max_event.
    let ingest = series.windows.back().map_or(0, |w| w.ingest_time);
    target.fill(series, target.interval.open_of(max_event), fill, ingest, out);
    while let Some(front) = series.windows.front() {
        if front.open_time + len > watermark {
            break;
        }
        series.final_upto = Some(front.open_time);
        series.windows.pop_front();
    }
}

/// The candle of a window; `None` when a sum has more significant digits than
/// a `Decimal` holds (28), which is reported rather than rounded.
fn candle(target: &Target<'_>, acc: &Acc, closed: bool) -> Option<Candle> {
    let interval = target.interval;
    let has_trades = acc.count > 0;
    let dec = from_unscaled;
    Some(Candle {
        venue: target.venue.to_owned(),
        symbol: target.symbol.to_owned(),
        interval: interval.name().to_owned(),
        origin: CandleOrigin::Aggregated,
        open_time: acc.open_time,
        close_time: interval.close_of(acc.open_time),
        open: dec(acc.open)?,
        high: dec(acc.high)?,
        low: dec(acc.low)?,
        close: dec(acc.close)?,
        volume: dec(acc.volume)?,
        quote_volume: dec(acc.quote_volume)?,
        trade_count: acc.count,
        taker_buy_base_volume: dec(acc.taker_buy_base)?,
        taker_buy_quote_volume: dec(acc.taker_buy_quote)?,
        first_trade_id: has_trades.then_some(acc.first_id),
        last_trade_id: has_trades.then_some(acc.last_id),
        closed,
        source: target.source,
        event_time: interval.close_of(acc.open_time),
        ingest_time: acc.ingest_time,
    })
}
