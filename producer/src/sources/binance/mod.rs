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
//!
//! This file is the configuration and the connection manager; `socket.rs` is
//! one connection, `lanes.rs` the lanes and their sequencing, `repair.rs` the
//! REST gap repair and its budget.

use std::collections::{HashMap, HashSet};
use std::future::Future;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tickpipe_schemas::{Source as RecordSource, Stage, Trade, TradeKind};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use self::parse::{Origin, RestAggTrade, RestTrade, WsEvent};
use self::rest::BinanceRest;
use self::sequencer::{ClosedKlines, Order, Sequencer};
use super::backoff::{AttemptLimit, Backoff};
use super::{SourceConfig, SourceError, Stop};
use crate::item::{now_micros, rules_now, Item, Reject};
use crate::publish::Publisher;

pub mod backfill;
mod lanes;
pub mod parse;
mod repair;
pub mod rest;
pub mod sequencer;
mod socket;

use lanes::{validate_reject, LaneShared, Lanes, LiveTrade};
use repair::{fill_gap, RepairBudget};
use socket::connection;

const COMPONENT: &str = "binance-ws";

tickpipe_ops::section! {
    /// The `[binance]` section: the live WebSocket source, gap repair, and the
    /// REST client the klines backfill shares.
    pub struct BinanceConfig in "binance" {
        /// Binance WebSocket base; the source appends `/stream?streams=...`.
        ws_url: String [default_value = "wss://data-stream.binance.vision"],
        /// Binance REST base, for gap repair and backfill (`historicalTrades` is
        /// not served by the market-data-only host).
        rest_url: String [default_value = "https://api.binance.com"],
        /// The venue name carried in records and keys.
        venue: String [default_value = "binance"],
        /// Symbols, comma-separated (any case; stream names are lowercased,
        /// records uppercase).
        symbols: Vec<String> [
            visible_alias = "symbols", value_delimiter = ',', default_value = "BTCUSDT,AAVEUSDT,STXUSDT,ARBUSDT"
        ],
        /// Streams per symbol, comma-separated: trade, aggTrade, kline_<interval>.
        streams: Vec<String> [visible_alias = "streams", value_delimiter = ',', default_value = "trade,kline_1m"],
        /// Seconds after which a connection is replaced (Binance closes them at 24 h).
        rollover_secs: u64 [visible_alias = "rollover-secs", default_value_t = 23 * 3600],
        /// Seconds of silence (no data, no ping) after which a connection is reopened.
        watchdog_secs: u64 [visible_alias = "watchdog-secs", default_value_t = 60],
        /// Most connection attempts per 5 minutes (Binance allows 300 per IP).
        max_connects_per_5min: usize [default_value_t = 300],
        /// Longest wait between reconnection attempts, and between retries of a
        /// failing REST call, in ms.
        max_backoff_ms: u64 [default_value_t = 30_000],
        /// The REST weight limit per minute (Binance: 6,000).
        weight_limit: u32 [default_value_t = 6000],
        /// Fill trade-id gaps over REST.
        gap_repair: bool [default_value_t = true, action = clap::ArgAction::Set],
        /// Most seconds per minute that gap repairs may hold up the live trades
        /// of one symbol (queued meanwhile; a rate limit's `Retry-After` can be
        /// long). What is not repaired within the budget is counted in
        /// `tickpipe_producer_trades_unrepaired_total`.
        repair_budget_secs: u64 [default_value_t = 30],
        /// Most trades of one symbol held while a repair runs (about a minute of
        /// BTCUSDT at its busiest, a few MB); newer ones are not held but fetched
        /// by the symbol's next repair, once the queue has room again.
        repair_queue: usize [default_value_t = 20_000],
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

impl SourceConfig for BinanceConfig {
    const NAME: &'static str = "binance";

    fn check(&self) -> Result<(), SourceError> {
        if self.symbols.is_empty() || self.streams.is_empty() {
            return Err(SourceError::User(
                "[binance] needs at least one symbol and one stream".into(),
            ));
        }
        for s in &self.streams {
            if !(s == "trade" || s == "aggTrade" || s.starts_with("kline_")) {
                return Err(SourceError::User(format!(
                    "[binance] streams: {s:?} is not one of trade, aggTrade, kline_<interval>"
                )));
            }
        }
        Ok(())
    }

    fn run(self, publisher: Publisher, stop: Stop) -> impl Future<Output = Result<(), SourceError>> + Send + 'static {
        run_ws(self, publisher, stop)
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
                            .publish(Item::unparsed(COMPONENT, RecordSource::Binance, raw.as_bytes(), reason))
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

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
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
