//! Binance: live trades, aggregate trades and closed klines over the combined
//! WebSocket stream, with trade-id gap repair over REST; and the klines history
//! backfill (`backfill.rs`).
//!
//! Connections: one live connection at a time, replaced before Binance's 24 h
//! limit (and on `serverShutdown`) by opening the new one first and closing the
//! old one once the new one delivers data; the overlap is removed by the
//! [`Sequencer`] of each lane and by [`ClosedKlines`]. A lost connection is
//! reopened with exponential backoff and jitter, never more often than the
//! attempt limit allows, and a socket silent for longer than the watchdog is
//! treated as lost. Trades go to a lane per (symbol, kind), a task that
//! sequences them: after any reconnect the first trade of each symbol reveals
//! what was missed, and the lane fetches the gap over REST before it publishes
//! anything newer, so `trades` holds every id exactly once. A repair holds up
//! only its own lane, whose trades queue meanwhile; the sockets are read (and
//! their pings answered) throughout.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Deserialize;
use tickpipe_schemas::{Source as RecordSource, Stage, Trade, TradeKind};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use self::parse::{Origin, RestAggTrade, RestTrade, WsEvent};
use self::rest::BinanceRest;
use self::sequencer::{ClosedKlines, Order, Sequencer};
use super::backoff::{AttemptLimit, Backoff};
use super::{Source, SourceError, Stop};
use crate::config::Config;
use crate::item::{now_micros, rules_now, Item, Reject};
use crate::publish::Publisher;

pub mod backfill;
pub mod parse;
pub mod rest;
pub mod sequencer;

const COMPONENT: &str = "binance-ws";

/// The `[binance]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BinanceConfig {
    /// Run the live WebSocket source.
    pub enabled: bool,
    /// WebSocket base; the source appends `/stream?streams=...`.
    pub ws_url: String,
    /// REST base for gap repair and backfill (`historicalTrades` is not served by
    /// the market-data-only host).
    pub rest_url: String,
    /// The venue name carried in records and keys.
    pub venue: String,
    /// Symbols (any case; stream names are lowercased, records uppercase).
    pub symbols: Vec<String>,
    /// Streams per symbol: `trade`, `aggTrade`, `kline_<interval>`.
    pub streams: Vec<String>,
    /// Replace a connection after this long (Binance closes them at 24 h).
    pub rollover_secs: u64,
    /// A connection silent (no data, no ping) for this long is reopened.
    pub watchdog_secs: u64,
    /// Most connection attempts per 5 minutes (Binance allows 300 per IP).
    pub max_connects_per_5min: usize,
    /// Longest wait between reconnection attempts, and between retries of a
    /// failing REST call.
    pub max_backoff_ms: u64,
    /// The REST weight limit per minute (Binance: 6,000).
    pub weight_limit: u32,
    /// Fill trade-id gaps over REST.
    pub gap_repair: bool,
    /// Most seconds per minute that gap repairs may hold up the live trades
    /// of one symbol (queued meanwhile; a rate limit's `Retry-After` can be
    /// long). What is not repaired within the budget is counted in
    /// `tickpipe_producer_trades_unrepaired_total`.
    pub repair_budget_secs: u64,
    /// Most trades of one symbol held while a repair runs (about a minute of
    /// BTCUSDT at its busiest, a few MB); newer ones are not held but fetched
    /// by the symbol's next repair, once the queue has room again.
    pub repair_queue: usize,
}

impl Default for BinanceConfig {
    fn default() -> Self {
        BinanceConfig {
            enabled: false,
            ws_url: "wss://data-stream.binance.vision".into(),
            rest_url: "https://api.binance.com".into(),
            venue: "binance".into(),
            symbols: ["BTCUSDT", "AAVEUSDT", "STXUSDT", "ARBUSDT"].map(String::from).into(),
            streams: ["trade", "kline_1m"].map(String::from).into(),
            rollover_secs: 23 * 3600,
            watchdog_secs: 60,
            max_connects_per_5min: 300,
            max_backoff_ms: 30_000,
            weight_limit: 6000,
            gap_repair: true,
            repair_budget_secs: 30,
            repair_queue: 20_000,
        }
    }
}

impl BinanceConfig {
    /// The combined-stream URL: lowercase stream names (an uppercase one fails
    /// silently at Binance).
    pub fn stream_url(&self) -> String {
        let names: Vec<String> = self
            .symbols
            .iter()
            .flat_map(|s| self.streams.iter().map(move |k| format!("{}@{k}", s.to_lowercase())))
            .collect();
        format!(
            "{}/stream?streams={}",
            self.ws_url.trim_end_matches('/'),
            names.join("/")
        )
    }
}

pub fn build(config: &Config) -> Result<Option<Box<dyn Source>>, SourceError> {
    let c = &config.binance;
    if !c.enabled {
        return Ok(None);
    }
    if c.symbols.is_empty() || c.streams.is_empty() {
        return Err(SourceError::User(
            "[binance] needs at least one symbol and one stream".into(),
        ));
    }
    for s in &c.streams {
        if !(s == "trade" || s == "aggTrade" || s.starts_with("kline_")) {
            return Err(SourceError::User(format!(
                "[binance] streams: {s:?} is not one of trade, aggTrade, kline_<interval>"
            )));
        }
    }
    Ok(Some(Box::new(BinanceWs { config: c.clone() })))
}

/// The live WebSocket source.
pub struct BinanceWs {
    config: BinanceConfig,
}

impl Source for BinanceWs {
    fn name(&self) -> &'static str {
        COMPONENT
    }

    fn run(
        self: Box<Self>,
        publisher: Publisher,
        stop: Stop,
    ) -> Pin<Box<dyn Future<Output = Result<(), SourceError>> + Send>> {
        Box::pin(run_ws(self.config, publisher, stop))
    }
}

/// What a connection task reports to the manager. Frames dominate and are
/// moved once, so they are not boxed.
#[allow(clippy::large_enum_variant)]
enum Report {
    /// A text frame, parsed, with the frame kept for dead letters.
    Frame(Result<WsEvent, String>, Utf8Bytes),
    /// The handshake succeeded.
    Opened,
    /// The connection ended, with why.
    Closed(String),
}

struct Conn {
    task: tokio::task::JoinHandle<()>,
    opened_at: Option<Instant>,
}

/// A connection open for at least this long that delivered data was healthy:
/// the next one opens at once and the backoff starts over. A shorter one (a
/// server that accepts, answers once and hangs up) counts as a failed attempt,
/// or reconnects would follow each other as fast as the attempt limit allows.
const HEALTHY: Duration = Duration::from_secs(10);

/// The time gap repairs may hold up a lane: `per_minute` in any window of a
/// minute, shared by the repairs that follow each other. Pure, with the clock
/// passed in.
struct RepairBudget {
    per_minute: Duration,
    window_start: Instant,
    spent: Duration,
}

impl RepairBudget {
    fn new(per_minute: Duration, now: Instant) -> Self {
        RepairBudget {
            per_minute,
            window_start: now,
            spent: Duration::ZERO,
        }
    }

    /// When a repair starting at `now` must give up.
    fn deadline(&mut self, now: Instant) -> Instant {
        if now.duration_since(self.window_start) >= Duration::from_secs(60) {
            self.window_start = now;
            self.spent = Duration::ZERO;
        }
        now + self.per_minute.saturating_sub(self.spent)
    }

    fn spend(&mut self, took: Duration) {
        self.spent += took;
    }
}

/// When the manager opens connections. Pure, so the policy is unit-tested.
struct Redial {
    backoff: Backoff,
    /// No replacement (rollover) before this: the last one failed.
    replace_after: Option<Instant>,
}

impl Redial {
    /// The pause before reopening after the active connection closed, given
    /// how long it had been open if it delivered data.
    fn after_close(&mut self, delivered_for: Option<Duration>) -> Duration {
        if delivered_for.is_some_and(|d| d >= HEALTHY) {
            self.backoff.reset();
            Duration::ZERO
        } else {
            self.backoff.next_delay()
        }
    }

    /// A replacement closed before delivering: the next one waits its turn in
    /// the backoff instead of following at once (its due time has passed).
    fn replacement_failed(&mut self, now: Instant) {
        self.replace_after = Some(now + self.backoff.next_delay());
    }

    fn replaced(&mut self) {
        self.replace_after = None;
    }

    /// When the connection opened at `opened` is replaced.
    fn rollover_at(&self, opened: Instant, rollover: Duration) -> Instant {
        let due = opened + rollover;
        self.replace_after.map_or(due, |after| after.max(due))
    }
}

async fn run_ws(config: BinanceConfig, publisher: Publisher, mut stop: Stop) -> Result<(), SourceError> {
    let metrics = publisher.metrics().clone();
    let rest = Arc::new(BinanceRest::new(
        &config.rest_url,
        config.weight_limit,
        Duration::from_millis(config.max_backoff_ms),
        metrics.clone(),
    )?);
    let symbols: HashSet<String> = config.symbols.iter().map(|s| s.to_uppercase()).collect();
    let url = config.stream_url();
    let (tx, mut rx) = mpsc::channel::<(u64, Report)>(4096);
    let mut conns: HashMap<u64, Conn> = HashMap::new();
    let mut next_id = 0u64;
    let mut redial = Redial {
        backoff: Backoff::new(Duration::from_millis(500), Duration::from_millis(config.max_backoff_ms)),
        replace_after: None,
    };
    let mut limit = AttemptLimit::new(config.max_connects_per_5min, Duration::from_secs(300));
    let watchdog = Duration::from_secs(config.watchdog_secs.max(1));
    let rollover = Duration::from_secs(config.rollover_secs.max(1));
    let mut klines = ClosedKlines::default();
    let mut lanes = Lanes {
        shared: LaneShared {
            rest: config.gap_repair.then(|| rest.clone()),
            budget: Duration::from_secs(config.repair_budget_secs.max(1)),
            venue: config.venue.clone(),
            publisher: publisher.clone(),
            stop: stop.clone(),
        },
        queue: config.repair_queue.max(1),
        lanes: HashMap::new(),
        tasks: JoinSet::new(),
    };
    // Resolved once: every frame counts here.
    let received = metrics.received.with_label_values(&[COMPONENT]);
    let mut spawn = |delay: Duration, conns: &mut HashMap<u64, Conn>, limit: &mut AttemptLimit| -> u64 {
        let wait = limit.reserve(Instant::now() + delay) + delay;
        next_id += 1;
        let id = next_id;
        let task = tokio::spawn(connection(
            id,
            url.clone(),
            wait,
            watchdog,
            config.venue.clone(),
            tx.clone(),
        ));
        conns.insert(id, Conn { task, opened_at: None });
        id
    };
    let mut active = spawn(Duration::ZERO, &mut conns, &mut limit);
    let mut replacing: Option<u64> = None;
    let mut got_data = false;

    loop {
        let rollover_at = conns
            .get(&active)
            .and_then(|c| c.opened_at)
            .filter(|_| replacing.is_none())
            .map(|t| redial.rollover_at(t, rollover));
        let report = tokio::select! {
            r = rx.recv() => r,
            _ = stop.wait() => break,
            _ = sleep_until(rollover_at) => {
                tracing::info!("rolling the Binance connection over before its 24 h limit");
                replacing = Some(spawn(Duration::ZERO, &mut conns, &mut limit));
                continue;
            }
        };
        let Some((id, report)) = report else { break };
        match report {
            Report::Opened => {
                if let Some(c) = conns.get_mut(&id) {
                    c.opened_at = Some(Instant::now());
                }
            }
            Report::Closed(why) => {
                let Some(conn) = conns.remove(&id) else { continue };
                conn.task.abort();
                tracing::warn!(connection = id, reason = %why, "Binance connection closed");
                if id == active {
                    metrics.reconnects.with_label_values(&[COMPONENT]).inc();
                    match replacing.take() {
                        Some(r) => active = r,
                        None => {
                            let lived = conn.opened_at.map(|t| t.elapsed());
                            let delay = redial.after_close(lived.filter(|_| got_data));
                            active = spawn(delay, &mut conns, &mut limit);
                        }
                    }
                    got_data = false;
                } else if Some(id) == replacing {
                    replacing = None;
                    redial.replacement_failed(Instant::now());
                }
            }
            Report::Frame(parsed, raw) => {
                received.inc();
                if Some(id) == replacing {
                    // The replacement delivers: close the old connection.
                    if let Some(old) = conns.remove(&active) {
                        old.task.abort();
                    }
                    active = id;
                    replacing = None;
                    redial.replaced();
                }
                if id == active {
                    got_data = true;
                }
                // An excluded trade is sequenced like any other (its id is
                // real) and published as a dead letter.
                let (parsed, excluded) = match parsed {
                    Ok(WsEvent::Excluded(t, reason)) => (Ok(WsEvent::Trade(t)), Some(reason)),
                    other => (other, None),
                };
                match parsed {
                    Err(reason) => {
                        publisher
                            .publish(Item::Reject(Reject::parse(
                                COMPONENT,
                                RecordSource::Binance,
                                raw.as_bytes(),
                                reason,
                            )))
                            .await;
                    }
                    Ok(WsEvent::Trade(t)) => {
                        if !symbols.contains(&t.symbol) {
                            let reason = format!("symbol {} is not configured", t.symbol);
                            publisher
                                .publish(Item::Reject(validate_reject(raw.as_bytes(), reason)))
                                .await;
                            continue;
                        }
                        lanes.send(LiveTrade {
                            trade: t,
                            excluded,
                            raw,
                        })?;
                    }
                    Ok(WsEvent::Candle(c)) => {
                        if klines.is_new(&c.symbol, &c.interval, c.open_time) {
                            publisher
                                .publish(Item::from(c).validated(&rules_now(), COMPONENT, raw.as_bytes()))
                                .await;
                        } else {
                            metrics.duplicates.with_label_values(&[COMPONENT]).inc();
                        }
                    }
                    Ok(WsEvent::ServerShutdown) => {
                        if id == active && replacing.is_none() {
                            tracing::info!("Binance announced a server shutdown: opening a replacement connection");
                            replacing = Some(spawn(Duration::ZERO, &mut conns, &mut limit));
                        }
                    }
                    // Excluded trades were turned into trades above.
                    Ok(WsEvent::OpenKline | WsEvent::Reply | WsEvent::Other | WsEvent::Excluded(..)) => {}
                }
            }
        }
    }
    for (_, c) in conns {
        c.task.abort();
    }
    // What the lanes hold is published (a repair under way ends at the stop).
    lanes.finish().await;
    Ok(())
}

/// A live trade on its way to its lane, with the frame it came in (for dead
/// letters) and, for a trade Binance excludes, why.
struct LiveTrade {
    trade: Trade,
    excluded: Option<String>,
    raw: Utf8Bytes,
}

/// What every lane shares.
#[derive(Clone)]
struct LaneShared {
    /// `None`: gaps are not repaired.
    rest: Option<Arc<BinanceRest>>,
    /// The repair budget per minute.
    budget: Duration,
    venue: String,
    publisher: Publisher,
    stop: Stop,
}

struct Lane {
    tx: mpsc::Sender<LiveTrade>,
    /// The queue was full at the last trade (logged once per episode).
    full: bool,
    /// The newest id queued.
    queued: i64,
    /// The newest id left to the next repair because the queue was full.
    left: i64,
}

/// One task per (symbol, kind), started with its first trade, that sequences
/// the live trades and repairs their gaps: a repair waiting on REST holds up
/// neither the sockets (whose pings must be answered within a minute) nor the
/// other symbols. A trade that finds its lane's queue full is not queued; like
/// any trade the socket missed, the lane's next repair fetches it over REST.
struct Lanes {
    shared: LaneShared,
    /// Trades a lane holds before newer ones are left to its next repair.
    queue: usize,
    lanes: HashMap<(String, TradeKind), Lane>,
    tasks: JoinSet<()>,
}

impl Lanes {
    /// Hands a trade to its lane; fails when the lane ended, which only a
    /// bug can cause before a stop: its symbol would go silent.
    fn send(&mut self, t: LiveTrade) -> Result<(), SourceError> {
        let key = (t.trade.symbol.clone(), t.trade.kind);
        let (shared, tasks) = (&self.shared, &mut self.tasks);
        let lane = self.lanes.entry(key).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(self.queue);
            tasks.spawn(lane(rx, shared.clone()));
            Lane {
                tx,
                full: false,
                queued: i64::MIN,
                left: i64::MIN,
            }
        });
        let id = t.trade.trade_id;
        match lane.tx.try_send(t) {
            Ok(()) => {
                lane.full = false;
                lane.queued = lane.queued.max(id);
            }
            Err(mpsc::error::TrySendError::Full(t)) => {
                lane.left = lane.left.max(id);
                if !lane.full {
                    tracing::warn!(
                        symbol = %t.trade.symbol,
                        queued = self.queue,
                        "trades queue behind a gap repair; newer ones are left to the next repair"
                    );
                }
                lane.full = true;
            }
            Err(mpsc::error::TrySendError::Closed(t)) => {
                return Err(SourceError::Internal(format!(
                    "the {:?} lane of {} ended unexpectedly; stopping so that the producer is restarted \
                     rather than leave the symbol silent",
                    t.trade.kind, t.trade.symbol
                )));
            }
        }
        Ok(())
    }

    /// Closes the queues and waits until the lanes have published what they
    /// hold. Ids after a lane's newest queued trade that were left to a
    /// repair that will not come are counted as unrepaired (nothing newer
    /// reveals them as a gap).
    async fn finish(self) {
        let metrics = self.shared.publisher.metrics();
        for ((symbol, _), lane) in &self.lanes {
            if lane.left > lane.queued {
                let missing = lane.left.abs_diff(lane.queued);
                metrics.unrepaired.with_label_values(&[symbol]).inc_by(missing);
                tracing::error!(
                    symbol = %symbol,
                    from = lane.queued.saturating_add(1),
                    to = lane.left,
                    missing,
                    "trades left to a repair when the producer stopped are not published"
                );
            }
        }
        drop(self.lanes);
        let mut tasks = self.tasks;
        while tasks.join_next().await.is_some() {}
    }
}

/// A lane: sequences and publishes the trades of one (symbol, kind) until its
/// queue is closed.
async fn lane(mut rx: mpsc::Receiver<LiveTrade>, shared: LaneShared) {
    let LaneShared {
        rest,
        budget,
        venue,
        publisher,
        mut stop,
    } = shared;
    let mut seq = Sequencer::default();
    let mut budget = RepairBudget::new(budget, Instant::now());
    while let Some(t) = rx.recv().await {
        let repair = rest.as_deref().map(|r| (r, &mut budget));
        sequence_trade(&mut seq, t, repair, &venue, &publisher, &mut stop).await;
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

fn validate_reject(raw: &[u8], reason: String) -> Reject {
    Reject {
        component: COMPONENT,
        stage: Stage::Validate,
        reason,
        raw: raw.to_vec(),
        topic: Some(tickpipe_schemas::Topic::Trades),
        source: RecordSource::Binance,
    }
}

/// Publishes a live trade of a lane in id order: drops what was already
/// published, and fills a gap before it over REST (when `repair` is given). An
/// excluded trade is sequenced the same way but published as a dead letter:
/// its id is real, and skipping it would make the next one a gap.
async fn sequence_trade(
    seq: &mut Sequencer,
    live: LiveTrade,
    repair: Option<(&BinanceRest, &mut RepairBudget)>,
    venue: &str,
    publisher: &Publisher,
    stop: &mut Stop,
) {
    let LiveTrade {
        trade: t,
        excluded,
        raw,
    } = live;
    // After a stop the lane only publishes what it holds.
    let repair = repair.filter(|_| !stop.is_stopped());
    let metrics = publisher.metrics();
    match seq.check(t.trade_id) {
        Order::Duplicate => {
            metrics.duplicates.with_label_values(&[COMPONENT]).inc();
            return;
        }
        Order::Gap { from, to } => {
            metrics.gaps.with_label_values(&[&t.symbol]).inc();
            tracing::info!(symbol = %t.symbol, from, to, "trade-id gap: repairing over REST");
            let (filled, skipped) = match repair {
                Some((rest, budget)) => {
                    let started = Instant::now();
                    let deadline = budget.deadline(started).into();
                    let filled = fill_gap(rest, &t.symbol, t.kind, from, to, deadline, venue, publisher, stop).await;
                    budget.spend(started.elapsed());
                    filled
                }
                None => (from, 0),
            };
            let missing = (to - filled + 1).max(0) as u64 + skipped;
            if missing > 0 {
                metrics.unrepaired.with_label_values(&[&t.symbol]).inc_by(missing);
                tracing::error!(symbol = %t.symbol, from, to, missing, "trade ids could not be repaired");
            }
        }
        Order::First | Order::Next => {}
    }
    seq.advance(t.trade_id);
    let raw = raw.as_bytes();
    let item = match excluded {
        Some(reason) => Item::Reject(Reject::parse(COMPONENT, RecordSource::Binance, raw, reason)),
        None => Item::from(t).validated(&rules_now(), COMPONENT, raw),
    };
    publisher.publish(item).await;
}

/// How often an empty answer is asked again before the rest of a gap is given
/// up: the live trade after the gap proves its ids exist, and REST may serve
/// the newest ones a moment later than the socket.
const EMPTY_PAGE_RETRIES: u32 = 3;

/// Fetches and publishes trades `from..=to` in pages until `deadline`;
/// returns the first id not published (`to + 1` when the gap is closed) and
/// how many ids before it Binance's answers skipped.
#[allow(clippy::too_many_arguments)]
async fn fill_gap(
    rest: &BinanceRest,
    symbol: &str,
    kind: TradeKind,
    from: i64,
    to: i64,
    deadline: tokio::time::Instant,
    venue: &str,
    publisher: &Publisher,
    stop: &mut Stop,
) -> (i64, u64) {
    let origin = Origin {
        venue,
        source: RecordSource::Binance,
        ingest_time: now_micros(),
    };
    let mut next = from;
    let mut skipped = 0u64;
    let mut empty = 0;
    while next <= to {
        let limit = (to - next + 1).min(1000);
        let (api, path, weight) = match kind {
            TradeKind::Trade => (
                "historicalTrades",
                format!("/api/v3/historicalTrades?symbol={symbol}&fromId={next}&limit={limit}"),
                25,
            ),
            TradeKind::AggTrade => (
                "aggTrades",
                format!("/api/v3/aggTrades?symbol={symbol}&fromId={next}&limit={limit}"),
                4,
            ),
        };
        let body = match tokio::time::timeout_at(deadline, rest.get(api, &path, weight, stop)).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                tracing::error!(symbol, error = %e, "gap repair request failed");
                return (next, skipped);
            }
            Err(_) => {
                tracing::error!(
                    symbol,
                    "gap repair ran out of its time budget; the symbol's queued trades go on"
                );
                return (next, skipped);
            }
        };
        let page = match serde_json::from_slice::<Vec<serde_json::Value>>(&body) {
            Ok(page) => page,
            Err(e) => {
                publish_bad_page(publisher, &body, format!("{api} answer is not a list: {e}")).await;
                return (next, skipped);
            }
        };
        if page.is_empty() {
            empty += 1;
            if empty > EMPTY_PAGE_RETRIES || !stop.sleep(Duration::from_millis(500)).await {
                // Binance has nothing from this id on: the rest cannot be repaired.
                return (next, skipped);
            }
            continue;
        }
        let rows = page.into_iter().map(|row| {
            let raw = row.to_string().into_bytes();
            let parsed = match kind {
                TradeKind::Trade => {
                    serde_json::from_value::<RestTrade>(row).map(|r| (r.id, r.into_trade(symbol, origin)))
                }
                TradeKind::AggTrade => {
                    serde_json::from_value::<RestAggTrade>(row).map(|r| (r.a, r.into_trade(symbol, origin)))
                }
            };
            match parsed {
                Ok((id, trade)) => (id, trade, raw),
                Err(e) => (-1, Err(format!("{api} row: {e}")), raw),
            }
        });
        let before = next;
        for (id, trade, raw) in rows {
            if id >= 0 && (id < next || id > to) {
                continue;
            }
            match trade {
                Ok(t) => {
                    publisher.metrics().backfilled.with_label_values(&[symbol]).inc();
                    skipped += (t.trade_id - next).max(0) as u64;
                    next = t.trade_id + 1;
                    publisher
                        .publish(Item::from(t).validated(&rules_now(), "binance-rest", &raw))
                        .await;
                }
                Err(reason) => {
                    if id >= 0 {
                        skipped += (id - next).max(0) as u64;
                        next = id + 1;
                    }
                    publisher
                        .publish(Item::Reject(Reject {
                            component: "binance-rest",
                            stage: Stage::Parse,
                            reason,
                            raw,
                            topic: Some(tickpipe_schemas::Topic::Trades),
                            source: RecordSource::Binance,
                        }))
                        .await;
                }
            }
        }
        if next == before {
            // Rows, but none of the ids asked for: asking again would not help.
            return (next, skipped);
        }
        // Progress: the next page gets its own retries if it comes back empty.
        empty = 0;
    }
    (next, skipped)
}

async fn publish_bad_page(publisher: &Publisher, body: &[u8], reason: String) {
    publisher
        .publish(Item::Reject(Reject::parse(
            "binance-rest",
            RecordSource::Binance,
            body,
            reason,
        )))
        .await;
}

/// One WebSocket connection: waits `delay`, connects, forwards parsed frames,
/// answers pings (tungstenite queues the pong and sends it on the next read),
/// and reports when it ends.
async fn connection(
    id: u64,
    url: String,
    delay: Duration,
    watchdog: Duration,
    venue: String,
    tx: mpsc::Sender<(u64, Report)>,
) {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let connect = tokio::time::timeout(Duration::from_secs(15), tokio_tungstenite::connect_async(url.as_str()));
    let mut ws = match connect.await {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(e)) => {
            let _ = tx.send((id, Report::Closed(format!("connect failed: {e}")))).await;
            return;
        }
        Err(_) => {
            let _ = tx.send((id, Report::Closed("connect timed out".into()))).await;
            return;
        }
    };
    if tx.send((id, Report::Opened)).await.is_err() {
        return;
    }
    let why = loop {
        let msg = match tokio::time::timeout(watchdog, ws.next()).await {
            Err(_) => break format!("silent for {} s (watchdog)", watchdog.as_secs()),
            Ok(None) => break "closed by the server".to_owned(),
            Ok(Some(Err(e))) => break format!("read failed: {e}"),
            Ok(Some(Ok(m))) => m,
        };
        match msg {
            Message::Text(text) => {
                let origin = Origin {
                    venue: &venue,
                    source: RecordSource::Binance,
                    ingest_time: now_micros(),
                };
                let parsed = parse::ws_message(&text, origin);
                if tx.send((id, Report::Frame(parsed, text))).await.is_err() {
                    return;
                }
            }
            Message::Binary(b) => {
                let text = String::from_utf8_lossy(&b).into_owned();
                let parsed = Err("binary frame: Binance sends text".to_owned());
                if tx.send((id, Report::Frame(parsed, text.into()))).await.is_err() {
                    return;
                }
            }
            Message::Close(frame) => break format!("close frame: {frame:?}"),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    };
    let _ = ws.close(None).await;
    let _ = tx.send((id, Report::Closed(why))).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redial() -> Redial {
        Redial {
            backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
            replace_after: None,
        }
    }

    #[test]
    fn only_a_connection_that_delivered_for_a_while_reconnects_at_once() {
        let mut r = redial();
        // Answered once and hung up, again and again: the pauses grow.
        let pauses: Vec<Duration> = (0..4).map(|_| r.after_close(Some(Duration::from_millis(50)))).collect();
        assert!(pauses[0] >= Duration::from_millis(250), "{pauses:?}");
        assert!(pauses[3] >= Duration::from_secs(2), "{pauses:?}");
        // Never delivered at all: the same.
        assert!(r.after_close(None) >= Duration::from_secs(4));
        // A healthy connection ends: reopen at once, and start over.
        assert_eq!(r.after_close(Some(HEALTHY)), Duration::ZERO);
        assert!(r.after_close(None) <= Duration::from_millis(500));
    }

    #[test]
    fn repairs_share_their_budget_within_a_minute() {
        let t0 = Instant::now();
        let mut b = RepairBudget::new(Duration::from_secs(30), t0);
        assert_eq!(b.deadline(t0), t0 + Duration::from_secs(30));
        b.spend(Duration::from_secs(20));
        // The next symbol's repair right after gets what is left.
        let t1 = t0 + Duration::from_secs(20);
        assert_eq!(b.deadline(t1), t1 + Duration::from_secs(10));
        b.spend(Duration::from_secs(10));
        let t2 = t1 + Duration::from_secs(10);
        assert_eq!(b.deadline(t2), t2, "spent: nothing until the minute is over");
        // A new minute, a new budget.
        let t3 = t0 + Duration::from_secs(60);
        assert_eq!(b.deadline(t3), t3 + Duration::from_secs(30));
    }

    #[test]
    fn a_failed_replacement_is_retried_after_a_pause_not_at_once() {
        let mut r = redial();
        let opened = Instant::now();
        let day = Duration::from_secs(23 * 3600);
        assert_eq!(r.rollover_at(opened, day), opened + day);
        // The replacement failed a day later: the due time has passed, but the
        // next attempt waits for the backoff.
        let failed = opened + day + Duration::from_secs(1);
        r.replacement_failed(failed);
        let next = r.rollover_at(opened, day);
        assert!(next >= failed + Duration::from_millis(250), "{:?}", next - failed);
        r.replacement_failed(next);
        let after = r.rollover_at(opened, day);
        assert!(after >= next + Duration::from_millis(500), "the pauses grow");
        r.replaced();
        assert_eq!(r.rollover_at(opened, day), opened + day);
    }
}
