//! Lanes: one task per (symbol, kind) that sequences live trades, so that
//! `trades` holds every id exactly once; a repair holds up only its own lane.

use super::*;
use crate::events::{TradeGap, TradesUnrepaired};

/// A live trade on its way to its lane, with the frame it came in (for dead
/// letters) and, for a trade Binance excludes, why.
pub(super) struct LiveTrade {
    pub(super) trade: Trade,
    pub(super) excluded: Option<String>,
    pub(super) raw: Utf8Bytes,
}

/// What every lane shares.
#[derive(Clone)]
pub(super) struct LaneShared {
    /// `None`: gaps are not repaired.
    pub(super) rest: Option<Arc<BinanceRest>>,
    /// The repair budget per minute.
    pub(super) budget: Duration,
    pub(super) venue: String,
    pub(super) publisher: Publisher,
    pub(super) stop: Stop,
}

pub(super) struct Lane {
    pub(super) tx: mpsc::Sender<LiveTrade>,
    /// The queue was full at the last trade (logged once per episode).
    pub(super) full: bool,
    /// The newest id queued.
    pub(super) queued: i64,
    /// The newest id left to the next repair because the queue was full.
    pub(super) left: i64,
}

/// One task per (symbol, kind), started with its first trade, that sequences
/// the live trades and repairs their gaps: a repair waiting on REST holds up
/// neither the sockets (whose pings must be answered within a minute) nor the
/// other symbols. A trade that finds its lane's queue full is not queued; like
/// any trade the socket missed, the lane's next repair fetches it over REST.
pub(super) struct Lanes {
    pub(super) shared: LaneShared,
    /// Trades a lane holds before newer ones are left to its next repair.
    pub(super) queue: usize,
    pub(super) lanes: HashMap<(String, TradeKind), Lane>,
    pub(super) tasks: JoinSet<()>,
}

impl Lanes {
    /// Hands a trade to its lane; fails when the lane ended, which only a
    /// bug can cause before a stop: its symbol would go silent.
    pub(super) fn send(&mut self, t: LiveTrade) -> Result<(), SourceError> {
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
    pub(super) async fn finish(self) {
        let metrics = self.shared.publisher.metrics();
        for ((symbol, _), lane) in &self.lanes {
            if lane.left > lane.queued {
                TradesUnrepaired {
                    symbol,
                    from: lane.queued.saturating_add(1),
                    to: lane.left,
                    missing: lane.left.abs_diff(lane.queued),
                    why: "trades left to a repair when the producer stopped are not published",
                }
                .emit(metrics);
            }
        }
        drop(self.lanes);
        let mut tasks = self.tasks;
        while tasks.join_next().await.is_some() {}
    }
}

/// A lane: sequences and publishes the trades of one (symbol, kind) until its
/// queue is closed.
pub(super) async fn lane(mut rx: mpsc::Receiver<LiveTrade>, shared: LaneShared) {
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

pub(super) fn validate_reject(raw: &[u8], reason: String) -> Reject {
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
pub(super) async fn sequence_trade(
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
            TradeGap {
                symbol: &t.symbol,
                from,
                to,
            }
            .emit(metrics);
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
                TradesUnrepaired {
                    symbol: &t.symbol,
                    from,
                    to,
                    missing,
                    why: "trade ids could not be repaired",
                }
                .emit(metrics);
            }
        }
        Order::First | Order::Next => {}
    }
    seq.advance(t.trade_id);
    let raw = raw.as_bytes();
    let item = match excluded {
        Some(reason) => Item::unparsed(COMPONENT, RecordSource::Binance, raw, reason),
        None => Item::from(t).validated(&rules_now(), COMPONENT, raw),
    };
    publisher.publish(item).await;
}
