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
//! previous close, volumes and count zero), unless disabled, up to
//! `max_fill` windows per gap; when a late trade changes the close an empty
//! candle carries, that candle is published again too, and when it opens a
//! window inside a gap left unfilled, each side of it within `max_fill` is
//! filled then.
//!
//! Sums are exact: prices and quantities are carried as integers scaled by
//! 10^18, the wire scale, so adding and comparing is integer arithmetic.
//! Trades with a price or quantity that is not positive (such as Binance futures'
//! non-MARKET trades, published with price 0) are excluded, as Binance excludes
//! them from its klines, and returned as invalid.

use std::collections::{HashMap, VecDeque};

use rustc_hash::FxBuildHasher;

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

/// What the builder hands back: `Output<Bar>` from [`CandleBuilder::push`],
/// `Output` (with `Candle` records) from [`CandleBuilder::resolve`] and
/// [`aggregate`].
#[derive(Debug, Clone, PartialEq)]
pub enum Output<C = Candle> {
    /// A candle, new or corrected.
    Candle(C),
    /// A trade for a window the watermark had already passed.
    Late {
        trade: Trade,
        interval: String,
        watermark: i64,
    },
    /// A trade that cannot be counted, with the reason.
    Invalid { trade: Trade, reason: String },
    /// A window whose sums exceed 28 significant digits, the most a candle
    /// record carries exactly; reported instead of a rounded candle (found
    /// when a `Bar` is resolved into a `Candle`).
    Unrepresentable {
        key: String,
        interval: String,
        open_time: i64,
    },
}

/// A candle as the builder computes it: the window's exact sums (integers at
/// scale 18) and the indexes of its symbol and interval in the builder that
/// emitted it. Emitting one allocates nothing; [`CandleBuilder::resolve`] turns
/// it into the `Candle` record when it is about to be encoded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bar {
    symbol: u32,
    interval: u32,
    source: Source,
    closed: bool,
    acc: Acc,
}

impl Bar {
    /// Start of the window (µs since the epoch).
    pub fn open_time(&self) -> i64 {
        self.acc.open_time
    }

    /// Whether the window is complete.
    pub fn closed(&self) -> bool {
        self.closed
    }
}

/// The running sums of one window, integers at scale 18.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
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

    /// Adds the trades summed in `o`: a run, or one trade (see [`fixed`]).
    #[inline]
    fn merge(&mut self, o: &Acc) {
        if o.count == 0 {
            return;
        }
        if self.count == 0 {
            self.high = o.high;
            self.low = o.low;
        } else {
            self.high = self.high.max(o.high);
            self.low = self.low.min(o.low);
        }
        if o.open_key < self.open_key {
            self.open_key = o.open_key;
            self.open = o.open;
        }
        if o.close_key > self.close_key {
            self.close_key = o.close_key;
            self.close = o.close;
        }
        // Saturating: a sum past i128 (or a count past i64) is past what a
        // candle carries, and `CandleBuilder::candle` reports it as
        // unrepresentable instead of wrapping into a wrong candle.
        self.volume = self.volume.saturating_add(o.volume);
        self.quote_volume = self.quote_volume.saturating_add(o.quote_volume);
        self.taker_buy_base = self.taker_buy_base.saturating_add(o.taker_buy_base);
        self.taker_buy_quote = self.taker_buy_quote.saturating_add(o.taker_buy_quote);
        self.count = self.count.saturating_add(o.count);
        self.first_id = self.first_id.min(o.first_id);
        self.last_id = self.last_id.max(o.last_id);
        self.ingest_time = self.ingest_time.max(o.ingest_time);
        self.dirty = true;
    }
}

/// The windows of one (symbol, interval).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Series {
    /// Windows not yet final, by open time.
    windows: VecDeque<Acc>,
    /// Open time and carried close of the empty candles published and not yet
    /// final, in order: published again when a late trade changes that close.
    #[serde(default)]
    filled: VecDeque<(i64, i128)>,
    /// Open time of the newest final window, as snapshots of earlier releases
    /// recorded it (read on restore into the symbol's watermark, not written).
    #[serde(default, skip_serializing)]
    final_upto: Option<i64>,
    /// Open time and close of the newest window published so far, for filling
    /// gaps.
    last_published: Option<(i64, i128)>,
    /// Open time and close of the newest window with trades that became final
    /// (and left `windows`): what a late trade in the gap after it fills from
    /// (absent from snapshots of earlier releases, which then leave that side
    /// unfilled).
    #[serde(default)]
    last_final: Option<(i64, i128)>,
    /// The window of the previous trade, `[open, end)`: most trades fall in it,
    /// which saves a division.
    current: (i64, i64),
}

fn no_watermark() -> i64 {
    i64::MIN
}

#[derive(Debug, Serialize, Deserialize)]
struct SymbolState {
    venue: String,
    symbol: String,
    /// Largest event time seen.
    max_event: i64,
    /// The largest watermark so far: a window it passed stays final even if a
    /// restore raises the allowed lateness.
    #[serde(default = "no_watermark")]
    watermark: i64,
    /// Source of the latest trade, carried into the candles.
    #[serde(with = "source_symbol")]
    source: Source,
    series: Vec<Series>,
    /// Trades not yet added to the series (see [`Run`]).
    #[serde(default)]
    run: Option<Run>,
}

impl SymbolState {
    /// The watermark after the largest event time seen: that time minus the
    /// lateness, never behind an earlier one.
    fn advance_watermark(&mut self, lateness: i64) -> i64 {
        self.watermark = self.current_watermark(lateness);
        self.watermark
    }

    /// The watermark `advance_watermark` would set, without setting it.
    fn current_watermark(&self, lateness: i64) -> i64 {
        self.watermark.max(self.max_event.saturating_sub(lateness))
    }
}

/// A run of trades that all fall in the newest window of every interval.
///
/// Most trades land in the same windows as the trade before them, and such a
/// trade can neither close a window nor be late. So instead of updating one
/// window per interval, the builder sums the run once and merges the sum into
/// every interval's window when the run ends: when a trade falls outside
/// `[lo, hi)` (the intersection of the newest windows), or before the state is
/// read (`finish`). The candles are the same, trade for trade; six intervals
/// cost little more than one.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Run {
    lo: i64,
    hi: i64,
    acc: Acc,
}

/// Builds candles from trades, one trade at a time.
#[derive(Debug)]
pub struct CandleBuilder {
    config: CandleConfig,
    symbols: Vec<SymbolState>,
    /// Symbol name to the states of that symbol (one per venue).
    index: HashMap<String, Vec<usize>, FxBuildHasher>,
    /// The symbol of the previous trade: trades come in runs per symbol.
    last: Option<usize>,
    /// Whether trades are summed in runs (always, except in the test that
    /// checks runs change nothing).
    runs: bool,
}

impl CandleBuilder {
    /// A builder with no state; a negative lateness counts as zero.
    pub fn new(mut config: CandleConfig) -> Self {
        config.allowed_lateness = config.allowed_lateness.max(0);
        CandleBuilder {
            config,
            symbols: Vec::new(),
            index: HashMap::default(),
            last: None,
            runs: true,
        }
    }

    pub fn config(&self) -> &CandleConfig {
        &self.config
    }

    /// The watermark of a symbol: its largest event time minus the lateness.
    pub fn watermark(&self, venue: &str, symbol: &str) -> Option<i64> {
        self.find(venue, symbol)
            .map(|i| self.symbols[i].current_watermark(self.config.allowed_lateness))
    }

    fn find(&self, venue: &str, symbol: &str) -> Option<usize> {
        self.index
            .get(symbol)?
            .iter()
            .copied()
            .find(|&i| self.symbols[i].venue == venue)
    }

    fn state_of(&mut self, trade: &Trade) -> usize {
        if let Some(i) = self.last {
            let s = &self.symbols[i];
            if s.symbol == trade.symbol && s.venue == trade.venue {
                return i;
            }
        }
        let i = match self.find(&trade.venue, &trade.symbol) {
            Some(i) => i,
            None => {
                let i = self.symbols.len();
                self.index.entry(trade.symbol.clone()).or_default().push(i);
                self.symbols.push(SymbolState {
                    venue: trade.venue.clone(),
                    symbol: trade.symbol.clone(),
                    max_event: i64::MIN,
                    watermark: i64::MIN,
                    source: trade.source,
                    series: self.config.intervals.iter().map(|_| Series::default()).collect(),
                    run: None,
                });
                i
            }
        };
        self.last = Some(i);
        i
    }

    /// The smallest watermark over the symbols seen, if any.
    pub fn min_watermark(&self) -> Option<i64> {
        self.symbols
            .iter()
            .map(|s| s.current_watermark(self.config.allowed_lateness))
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
        for (i, mut s) in snap.symbols.into_iter().enumerate() {
            for (series, interval) in s.series.iter_mut().zip(&builder.config.intervals) {
                if let Some(f) = series.final_upto.take() {
                    s.watermark = s.watermark.max(f + interval.micros());
                }
            }
            builder.index.entry(s.symbol.clone()).or_default().push(i);
            builder.symbols.push(s);
        }
        Ok(builder)
    }

    /// The `Candle` record of a bar this builder emitted; `None` when a sum has
    /// more significant digits than a `Decimal` holds (28), which is reported
    /// rather than rounded.
    pub fn candle(&self, bar: &Bar) -> Option<Candle> {
        let state = &self.symbols[bar.symbol as usize];
        let interval = &self.config.intervals[bar.interval as usize];
        let acc = &bar.acc;
        let has_trades = acc.count > 0;
        if acc.count == i64::MAX {
            // Saturated by `Acc::merge`: more trades than a count holds.
            return None;
        }
        let dec = from_unscaled;
        Some(Candle {
            venue: state.venue.clone(),
            symbol: state.symbol.clone(),
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
            closed: bar.closed,
            source: bar.source,
            event_time: interval.close_of(acc.open_time),
            ingest_time: acc.ingest_time,
        })
    }

    /// An output of this builder with its bar turned into a `Candle` record
    /// (or into `Unrepresentable`).
    pub fn resolve(&self, output: Output<Bar>) -> Output {
        match output {
            Output::Candle(bar) => match self.candle(&bar) {
                Some(c) => Output::Candle(c),
                None => {
                    let state = &self.symbols[bar.symbol as usize];
                    Output::Unrepresentable {
                        key: format!("{}:{}", state.venue, state.symbol),
                        interval: self.config.intervals[bar.interval as usize].name().to_owned(),
                        open_time: bar.acc.open_time,
                    }
                }
            },
            Output::Late {
                trade,
                interval,
                watermark,
            } => Output::Late {
                trade,
                interval,
                watermark,
            },
            Output::Invalid { trade, reason } => Output::Invalid { trade, reason },
            Output::Unrepresentable {
                key,
                interval,
                open_time,
            } => Output::Unrepresentable {
                key,
                interval,
                open_time,
            },
        }
    }

    /// Adds one trade; appends what it causes to `out`.
    pub fn push(&mut self, trade: &Trade, out: &mut Vec<Output<Bar>>) {
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
        if let Some(run) = &mut state.run {
            // In the run's windows, and so is the largest event time: nothing
            // closes, nothing is late.
            let max_event = state.max_event.max(t);
            if run.lo <= t && max_event < run.hi {
                state.max_event = max_event;
                run.acc.merge(&fixed);
                return;
            }
        }
        end_run(&self.config, si, state, out);
        state.max_event = state.max_event.max(t);
        let watermark = state.advance_watermark(lateness);
        let mut run = self.runs.then_some(Run {
            lo: i64::MIN,
            hi: i64::MAX,
            acc: Acc::empty(t, 0),
        });
        for (k, interval) in self.config.intervals.iter().enumerate() {
            let series = &mut state.series[k];
            let open = if series.current.0 <= t && t < series.current.1 {
                series.current.0
            } else {
                let open = interval.open_of(t);
                series.current = (open, open + interval.micros());
                open
            };
            // Final: the watermark has passed the window's end, whether or not
            // the window held trades.
            if open + interval.micros() <= watermark {
                out.push(Output::Late {
                    trade: trade.clone(),
                    interval: interval.name().to_owned(),
                    watermark,
                });
                run = None;
                continue;
            }
            if let Some(r) = &mut run {
                r.lo = r.lo.max(series.current.0);
                r.hi = r.hi.min(series.current.1);
            }
            window_for(series, open, fixed.open).merge(&fixed);
            let target = Target::new(si, k, state.source, interval);
            emit_ready(&target, series, state.max_event, watermark, fill, out);
        }
        state.run = run;
    }

    /// Publishes every window still open, as not closed (end of input).
    pub fn finish(&mut self, out: &mut Vec<Output<Bar>>) {
        let fill = self.config.fill_empty.then_some(self.config.max_fill);
        for (si, state) in self.symbols.iter_mut().enumerate() {
            end_run(&self.config, si, state, out);
            for (k, interval) in self.config.intervals.iter().enumerate() {
                let series = &mut state.series[k];
                let target = Target::new(si, k, state.source, interval);
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
    out.into_iter().map(|o| builder.resolve(o)).collect()
}

/// One trade in integer form, as the sums of a window holding only it; or why
/// it cannot be counted.
fn fixed(trade: &Trade) -> Result<Acc, String> {
    let positive = |d: &Decimal| !d.is_zero() && d.is_sign_positive();
    if !positive(&trade.price) || !positive(&trade.quantity) {
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
    let count = last_id
        .checked_sub(first_id)
        .and_then(|span| span.checked_add(1))
        .ok_or_else(|| format!("trade ids {first_id} to {last_id} span more trades than a count holds"))?;
    let key = (trade.event_time, trade.trade_id);
    let taker_bought = !trade.buyer_is_maker;
    Ok(Acc {
        open_time: trade.event_time,
        open: price,
        open_key: key,
        close: price,
        close_key: key,
        high: price,
        low: price,
        volume: qty,
        quote_volume: quote,
        taker_buy_base: if taker_bought { qty } else { 0 },
        taker_buy_quote: if taker_bought { quote } else { 0 },
        count,
        first_id,
        last_id,
        ingest_time: trade.ingest_time,
        published: false,
        dirty: true,
    })
}

/// Adds the symbol's run, if any, to the newest window of every interval and
/// publishes what the largest event time now completes, as adding its trades
/// one by one would have.
fn end_run(config: &CandleConfig, si: usize, state: &mut SymbolState, out: &mut Vec<Output<Bar>>) {
    let Some(run) = state.run.take() else { return };
    if run.acc.count == 0 {
        return;
    }
    let fill = config.fill_empty.then_some(config.max_fill);
    let watermark = state.advance_watermark(config.allowed_lateness);
    for (k, interval) in config.intervals.iter().enumerate() {
        let series = &mut state.series[k];
        // The window exists: the run's first trade made it, and the watermark
        // stays before the run's end.
        window_for(series, series.current.0, run.acc.open).merge(&run.acc);
        let target = Target::new(si, k, state.source, interval);
        emit_ready(&target, series, state.max_event, watermark, fill, out);
    }
}

/// The window opening at `open`, created in order if new.
fn window_for(series: &mut Series, open: i64, price: i128) -> &mut Acc {
    let pos = series.windows.iter().rposition(|w| w.open_time <= open);
    match pos {
        Some(i) if series.windows[i].open_time == open => &mut series.windows[i],
        _ => {
            let at = pos.map_or(0, |i| i + 1);
            series.windows.insert(at, Acc::empty(open, price));
            &mut series.windows[at]
        }
    }
}

/// Where a series' candles go: the identity every candle carries.
struct Target<'a> {
    /// Index of the symbol's state.
    symbol: u32,
    /// Index of the interval in the configuration.
    index: u32,
    source: Source,
    interval: &'a Interval,
}

impl<'a> Target<'a> {
    fn new(symbol: usize, index: usize, source: Source, interval: &'a Interval) -> Self {
        Target {
            symbol: symbol as u32,
            index: index as u32,
            source,
            interval,
        }
    }

    fn emit(&self, acc: &Acc, closed: bool, out: &mut Vec<Output<Bar>>) {
        out.push(Output::Candle(Bar {
            symbol: self.symbol,
            interval: self.index,
            source: self.source,
            closed,
            acc: *acc,
        }));
    }

    /// Emits empty candles after the newest published window, for every window
    /// opening before `until`, when filling is on.
    fn fill(&self, series: &mut Series, until: i64, fill: Option<usize>, ingest_time: i64, out: &mut Vec<Output<Bar>>) {
        let Some(max_fill) = fill else { return };
        if let Some((open, close)) = series.last_published {
            if let Some(last) = self.fill_between(series, (open, close), until, max_fill, ingest_time, out) {
                series.last_published = Some((last, close));
            }
        }
    }

    /// Emits the empty candles strictly between the window `from` (open time,
    /// close) and the one opening at `until`, carrying that close, when there
    /// are at most `max_fill` of them, and keeps them in `filled` until final.
    /// Returns the open time of the last one emitted.
    fn fill_between(
        &self,
        series: &mut Series,
        (from, close): (i64, i128),
        until: i64,
        max_fill: usize,
        ingest_time: i64,
        out: &mut Vec<Output<Bar>>,
    ) -> Option<i64> {
        let len = self.interval.micros();
        let empties = (until - from) / len - 1;
        if empties < 1 || empties > max_fill as i64 {
            return None;
        }
        // Appended, or inserted in order when a late trade split a gap.
        let first = series.filled.partition_point(|&(o, _)| o < from);
        for (at, open) in (first..).zip((1..=empties).map(|n| from + n * len)) {
            let mut empty = Acc::empty(open, close);
            empty.ingest_time = ingest_time;
            self.emit(&empty, true, out);
            if at == series.filled.len() {
                series.filled.push_back((open, close));
            } else {
                series.filled.insert(at, (open, close));
            }
        }
        Some(from + empties * len)
    }

    /// After window `i` was published for the first time behind the newest
    /// published window (a late trade in a gap left unfilled because it was
    /// longer than `max_fill`, or before the first window), fills each side of
    /// it that is now at most `max_fill` windows long, as trades in order
    /// would have.
    fn fill_around(&self, series: &mut Series, i: usize, fill: Option<usize>, out: &mut Vec<Output<Bar>>) {
        let Some(max_fill) = fill else { return };
        let w = series.windows[i];
        let Some(next) = series.windows.get(i + 1).map(|n| n.open_time) else {
            return;
        };
        // A filled gap still holds its empty windows from this one on: they
        // are not final, as this one is not.
        let from_here = series.filled.partition_point(|&(o, _)| o < w.open_time);
        if series.filled.get(from_here).is_some_and(|&(o, _)| o < next) {
            return;
        }
        let before = match i {
            0 => series.last_final,
            _ => Some((series.windows[i - 1].open_time, series.windows[i - 1].close)),
        };
        if let Some(before) = before {
            self.fill_between(series, before, w.open_time, max_fill, w.ingest_time, out);
        }
        self.fill_between(series, (w.open_time, w.close), next, max_fill, w.ingest_time, out);
    }

    /// Publishes `acc` and advances the newest published window (or, if it is
    /// that window, updates the close later gaps are filled with).
    fn publish(&self, series_last: &mut Option<(i64, i128)>, acc: &mut Acc, closed: bool, out: &mut Vec<Output<Bar>>) {
        self.emit(acc, closed, out);
        acc.published = true;
        acc.dirty = false;
        if series_last.is_none_or(|(o, _)| o <= acc.open_time) {
            *series_last = Some((acc.open_time, acc.close));
        }
    }

    /// After window `i` was published behind the newest published window (a
    /// correction, or a window a late trade opened in a filled gap), publishes
    /// again the empty candles between it and the next window with trades
    /// whose close was another: their open, high, low and close are its close.
    fn refill(&self, series: &mut Series, i: usize, out: &mut Vec<Output<Bar>>) {
        let w = series.windows[i];
        let next = series.windows.get(i + 1).map_or(i64::MAX, |n| n.open_time);
        let after = |o: i64| w.open_time < o && o < next;
        for (open, close) in series.filled.iter_mut().filter(|(o, _)| after(*o)) {
            if *close != w.close {
                *close = w.close;
                let mut empty = Acc::empty(*open, w.close);
                empty.ingest_time = w.ingest_time;
                self.emit(&empty, true, out);
            }
        }
        if let Some((o, close)) = &mut series.last_published {
            if after(*o) {
                *close = w.close;
            }
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
    out: &mut Vec<Output<Bar>>,
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
            let behind = last.is_some_and(|(o, _)| o > open);
            let new = !series.windows[i].published;
            target.publish(&mut last, &mut series.windows[i], true, out);
            series.last_published = last;
            if behind {
                if new {
                    target.fill_around(series, i, fill, out);
                }
                target.refill(series, i, out);
            }
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
        series.last_final = Some((front.open_time, front.close));
        series.windows.pop_front();
    }
    while series.filled.front().is_some_and(|&(o, _)| o + len <= watermark) {
        series.filled.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};
    use tickpipe_schemas::TradeKind;

    fn all(builder: &mut CandleBuilder, trades: &[Trade]) -> Vec<Output> {
        let mut out = Vec::new();
        for t in trades {
            builder.push(t, &mut out);
        }
        builder.finish(&mut out);
        out.into_iter().map(|o| builder.resolve(o)).collect()
    }

    /// Trades of two symbols whose times mostly advance by small steps and
    /// sometimes jump back (late or out of order) or forward (gaps).
    fn trades() -> impl Strategy<Value = Vec<Trade>> {
        // In tenths of a second, so that trades often fall on window edges.
        let step = prop_oneof![
            6 => 0i64..4,
            1 => -90i64..0,
            1 => 0i64..400,
        ]
        .prop_map(|tenths| tenths * 100_000);
        prop::collection::vec((step, any::<bool>(), 1i64..2_000, 1i64..5_000, any::<bool>()), 1..300).prop_map(
            |steps| {
                let mut now = 1_700_000_000_000_000i64;
                steps
                    .into_iter()
                    .enumerate()
                    .map(|(i, (step, second, price, qty, maker))| {
                        now += step;
                        Trade {
                            venue: "binance".into(),
                            symbol: if second { "B" } else { "A" }.into(),
                            kind: TradeKind::Trade,
                            trade_id: i as i64,
                            price: Decimal::new(price, 2),
                            quantity: Decimal::new(qty, 3),
                            buyer_is_maker: maker,
                            first_trade_id: None,
                            last_trade_id: None,
                            source: Source::Simulator,
                            event_time: now,
                            ingest_time: i as i64,
                        }
                    })
                    .collect()
            },
        )
    }

    fn config() -> impl Strategy<Value = CandleConfig> {
        let names = prop::sample::subsequence(vec!["1s", "3s", "7s", "1m", "5m"], 1..=5);
        (names, 0i64..5_000_000, any::<bool>(), 1usize..20).prop_map(|(names, lateness, fill, max_fill)| CandleConfig {
            intervals: names.iter().map(|n| n.parse().unwrap()).collect(),
            allowed_lateness: lateness,
            fill_empty: fill,
            max_fill,
        })
    }

    /// What a batch computation over the whole input gives, for checking the
    /// incremental builder: per (symbol, interval index, window open) the sums
    /// of the trades the watermark rule accepts, and the (trade id, interval
    /// index) pairs it refuses as late. The rule: a trade is late for an
    /// interval when its window ends at or before its symbol's largest event
    /// time so far (itself included) minus the lateness.
    #[allow(clippy::type_complexity)]
    fn batch(trades: &[Trade], config: &CandleConfig) -> (BTreeMap<(String, usize, i64), Acc>, BTreeSet<(i64, usize)>) {
        let mut windows: BTreeMap<(String, usize, i64), Acc> = BTreeMap::new();
        let mut late = BTreeSet::new();
        let mut max_event: HashMap<&str, i64> = HashMap::new();
        for t in trades {
            let m = max_event.entry(&t.symbol).or_insert(i64::MIN);
            *m = (*m).max(t.event_time);
            let watermark = m.saturating_sub(config.allowed_lateness);
            for (k, interval) in config.intervals.iter().enumerate() {
                let open = interval.open_of(t.event_time);
                if open + interval.micros() <= watermark {
                    late.insert((t.trade_id, k));
                    continue;
                }
                let sums = fixed(t).unwrap();
                windows
                    .entry((t.symbol.to_string(), k, open))
                    .or_insert_with(|| Acc::empty(open, sums.open))
                    .merge(&sums);
            }
        }
        (windows, late)
    }

    /// A snapshot of an earlier release (no `watermark`, no `filled`, the
    /// newest final window as `final_upto`) keeps that window final when
    /// restored with a larger lateness.
    #[test]
    fn an_earlier_snapshot_keeps_its_final_windows() {
        let config = |lateness_s: i64| CandleConfig {
            intervals: vec!["1s".parse().unwrap()],
            allowed_lateness: lateness_s * 1_000_000,
            fill_empty: true,
            max_fill: 100,
        };
        let trade = |id: i64, micros: i64| Trade {
            venue: "binance".into(),
            symbol: "A".into(),
            kind: TradeKind::Trade,
            trade_id: id,
            price: Decimal::new(10 + id, 0),
            quantity: Decimal::ONE,
            buyer_is_maker: false,
            first_trade_id: None,
            last_trade_id: None,
            source: Source::Simulator,
            event_time: micros,
            ingest_time: 0,
        };
        let mut b = CandleBuilder::new(config(1));
        let mut out = Vec::new();
        for t in [trade(1, 500_000), trade(2, 3_500_000)] {
            b.push(&t, &mut out);
        }
        let mut snap: serde_json::Value = serde_json::from_slice(&b.snapshot()).unwrap();
        for symbol in snap["symbols"].as_array_mut().unwrap() {
            symbol.as_object_mut().unwrap().remove("watermark");
            for series in symbol["series"].as_array_mut().unwrap() {
                let series = series.as_object_mut().unwrap();
                series.remove("filled");
                series.insert("final_upto".into(), 0.into());
            }
        }
        let mut b = CandleBuilder::restore(config(5), &serde_json::to_vec(&snap).unwrap()).unwrap();
        let mut out = Vec::new();
        b.push(&trade(3, 900_000), &mut out);
        assert!(matches!(out.as_slice(), [Output::Late { .. }]), "{out:?}");
    }

    proptest! {
        /// Whatever order trades arrive in, the newest version of every candle
        /// equals the batch computation over the accepted trades, and an empty
        /// candle carries the close of the nearest earlier window with trades,
        /// and every gap of at most `max_fill` windows between windows with
        /// trades is filled; the builder refuses as late exactly the trades the
        /// rule refuses.
        #[test]
        fn the_newest_candles_equal_a_batch_computation(trades in trades(), config in config()) {
            let (windows, late) = batch(&trades, &config);
            let out = aggregate(&trades, config.clone());
            let mut newest: BTreeMap<(String, usize, i64), Candle> = BTreeMap::new();
            let mut got_late = BTreeSet::new();
            for o in out {
                match o {
                    Output::Candle(c) => {
                        let k = config.intervals.iter().position(|i| i.name() == c.interval).unwrap();
                        newest.insert((c.symbol.clone(), k, c.open_time), c);
                    }
                    Output::Late { trade, interval, .. } => {
                        let k = config.intervals.iter().position(|i| i.name() == interval).unwrap();
                        got_late.insert((trade.trade_id, k));
                    }
                    other => prop_assert!(false, "unexpected {other:?}"),
                }
            }
            prop_assert_eq!(got_late, late);
            let dec = |v: i128| from_unscaled(v).unwrap();
            for (key, acc) in &windows {
                let c = newest.get(key);
                prop_assert!(c.is_some(), "no candle for {key:?}");
                let c = c.unwrap();
                let got = (c.open, c.high, c.low, c.close, c.volume, c.quote_volume, c.trade_count);
                let want = (dec(acc.open), dec(acc.high), dec(acc.low), dec(acc.close), dec(acc.volume), dec(acc.quote_volume), acc.count);
                prop_assert_eq!(got, want, "candle {:?}", key);
            }
            for (key, c) in &newest {
                if windows.contains_key(key) {
                    continue;
                }
                prop_assert!(config.fill_empty, "an empty candle with filling off: {key:?}");
                let (symbol, k, open) = key;
                let before = windows.range((symbol.clone(), *k, i64::MIN)..(symbol.clone(), *k, *open)).next_back();
                prop_assert!(before.is_some(), "an empty candle before any trade: {key:?}");
                let close = dec(before.unwrap().1.close);
                let got = (c.open, c.high, c.low, c.close, c.trade_count, c.volume.is_zero());
                prop_assert_eq!(got, (close, close, close, close, 0, true), "empty candle {:?}", key);
            }
            // Every gap of at most `max_fill` windows between two windows with
            // trades is filled, whatever order the trades came in.
            if config.fill_empty {
                for (a, b) in windows.keys().zip(windows.keys().skip(1)) {
                    if (&a.0, a.1) != (&b.0, b.1) {
                        continue;
                    }
                    let len = config.intervals[a.1].micros();
                    let empties = (b.2 - a.2) / len - 1;
                    if empties > config.max_fill as i64 {
                        continue;
                    }
                    for open in (1..=empties).map(|n| a.2 + n * len) {
                        let key = (a.0.clone(), a.1, open);
                        prop_assert!(newest.contains_key(&key), "no empty candle for {:?} between {:?} and {:?}", key, a, b);
                    }
                }
            }
        }

        /// Summing runs of trades changes nothing: the output equals adding
        /// every trade to every interval's window, also across a snapshot.
        #[test]
        fn runs_give_the_same_candles(trades in trades(), config in config(), cut in 0usize..300) {
            let mut plain = CandleBuilder::new(config.clone());
            plain.runs = false;
            let expected = all(&mut plain, &trades);

            let cut = cut.min(trades.len());
            let mut first = CandleBuilder::new(config.clone());
            let mut bars = Vec::new();
            for t in &trades[..cut] {
                first.push(t, &mut bars);
            }
            let mut got: Vec<Output> = bars.drain(..).map(|o| first.resolve(o)).collect();
            let mut second = CandleBuilder::restore(config, &first.snapshot()).unwrap();
            got.extend(all(&mut second, &trades[cut..]));
            prop_assert_eq!(got, expected);
        }
    }
}
