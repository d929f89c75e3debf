//! Exactly-once ordering of one venue's trades: per (symbol, kind) the next id
//! expected. A trade below it was already published (connection overlap, or
//! repaired over REST); one above it reveals a gap to fill. Pure state.

use std::collections::HashMap;

use tickpipe_schemas::{Candle, Micros, TradeKind};

/// Where a trade id stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// The first id seen for this symbol: nothing to compare with.
    First,
    /// Exactly the id expected.
    Next,
    /// Already published.
    Duplicate,
    /// Ids `from..=to` are missing before this one.
    Gap { from: i64, to: i64 },
}

/// The next expected id per (symbol, kind), and the newest closed kline per
/// (symbol, interval).
#[derive(Debug, Default)]
pub struct Sequencer {
    next: HashMap<(String, TradeKind), i64>,
    candles: HashMap<(String, String), Micros>,
}

impl Sequencer {
    pub fn check(&self, symbol: &str, kind: TradeKind, id: i64) -> Order {
        // Lookups with a borrowed key would need a custom key type; symbols are
        // few and short, so the small allocation is not worth more code.
        match self.next.get(&(symbol.to_owned(), kind)) {
            None => Order::First,
            Some(&next) if id == next => Order::Next,
            Some(&next) if id < next => Order::Duplicate,
            Some(&next) => Order::Gap { from: next, to: id - 1 },
        }
    }

    /// Records `id` as published: the next expected is `id + 1`.
    pub fn advance(&mut self, symbol: &str, kind: TradeKind, id: i64) {
        let after = id.saturating_add(1);
        let next = self.next.entry((symbol.to_owned(), kind)).or_insert(after);
        *next = (*next).max(after);
    }

    /// The next expected id, if any trade of the symbol was seen.
    pub fn expected(&self, symbol: &str, kind: TradeKind) -> Option<i64> {
        self.next.get(&(symbol.to_owned(), kind)).copied()
    }

    /// True the first time a closed kline is seen (a kline repeats when two
    /// connections overlap).
    pub fn candle_is_new(&mut self, c: &Candle) -> bool {
        let last = self
            .candles
            .entry((c.symbol.clone(), c.interval.clone()))
            .or_insert(Micros::MIN);
        if c.open_time > *last {
            *last = c.open_time;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_in_order_duplicates_and_gaps() {
        let mut s = Sequencer::default();
        let k = TradeKind::Trade;
        assert_eq!(s.check("BTCUSDT", k, 100), Order::First);
        s.advance("BTCUSDT", k, 100);
        assert_eq!(s.check("BTCUSDT", k, 101), Order::Next);
        assert_eq!(s.check("BTCUSDT", k, 100), Order::Duplicate);
        assert_eq!(s.check("BTCUSDT", k, 105), Order::Gap { from: 101, to: 104 });
        assert_eq!(s.check("BTCUSDT", TradeKind::AggTrade, 101), Order::First);
        assert_eq!(s.check("ETHUSDT", k, 101), Order::First);
        s.advance("BTCUSDT", k, 105);
        assert_eq!(s.check("BTCUSDT", k, 103), Order::Duplicate);
        // Advancing never goes back.
        s.advance("BTCUSDT", k, 90);
        assert_eq!(s.expected("BTCUSDT", k), Some(106));
        // An id at the end of the range (outside input) does not overflow.
        s.advance("ETHUSDT", k, i64::MAX);
        assert_eq!(s.check("ETHUSDT", k, 5), Order::Duplicate);
    }
}
