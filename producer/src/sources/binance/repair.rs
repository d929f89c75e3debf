//! Gap repair over REST: the ids a lane missed, fetched page by page within
//! a per-minute budget before the lane publishes anything newer.

use super::*;

/// The time gap repairs may hold up a lane: `per_minute` in any window of a
/// minute, shared by the repairs that follow each other. Pure, with the clock
/// passed in.
pub(super) struct RepairBudget {
    pub(super) per_minute: Duration,
    pub(super) window_start: Instant,
    pub(super) spent: Duration,
}

impl RepairBudget {
    pub(super) fn new(per_minute: Duration, now: Instant) -> Self {
        RepairBudget {
            per_minute,
            window_start: now,
            spent: Duration::ZERO,
        }
    }

    /// When a repair starting at `now` must give up.
    pub(super) fn deadline(&mut self, now: Instant) -> Instant {
        if now.duration_since(self.window_start) >= Duration::from_secs(60) {
            self.window_start = now;
            self.spent = Duration::ZERO;
        }
        now + self.per_minute.saturating_sub(self.spent)
    }

    pub(super) fn spend(&mut self, took: Duration) {
        self.spent += took;
    }
}

/// How often an empty answer is asked again before the rest of a gap is given
/// up: the live trade after the gap proves its ids exist, and REST may serve
/// the newest ones a moment later than the socket.
pub(super) const EMPTY_PAGE_RETRIES: u32 = 3;

/// Fetches and publishes trades `from..=to` in pages until `deadline`;
/// returns the first id not published (`to + 1` when the gap is closed) and
/// how many ids before it Binance's answers skipped.
#[allow(clippy::too_many_arguments)]
pub(super) async fn fill_gap(
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

pub(super) async fn publish_bad_page(publisher: &Publisher, body: &[u8], reason: String) {
    publisher
        .publish(Item::unparsed("binance-rest", RecordSource::Binance, body, reason))
        .await;
}
