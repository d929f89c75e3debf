//! Exactly-once ordering of the live stream, pure state. [`Sequencer`]: the
//! next trade id expected in one lane (symbol, kind); a trade below it was
//! already published (connection overlap, or repaired over REST), one above it
//! reveals a gap to fill. [`ClosedKlines`]: the newest closed kline per
//! (symbol, interval), so that one delivered by two overlapping connections is
//! published once.

use std::collections::HashMap;

use tickpipe_schemas::Micros;

/// Where a trade id stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// The first id seen in the lane: nothing to compare with.
    First,
    /// Exactly the id expected.
    Next,
    /// Already published.
    Duplicate,
    /// Ids `from..=to` are missing before this one.
    Gap { from: i64, to: i64 },
}

/// The next expected trade id of one lane.
#[derive(Debug, Default)]
pub struct Sequencer {
    next: Option<i64>,
}

impl Sequencer {
    pub fn check(&self, id: i64) -> Order {
        match self.next {
            None => Order::First,
            Some(next) if id == next => Order::Next,
            Some(next) if id < next => Order::Duplicate,
            Some(next) => Order::Gap { from: next, to: id - 1 },
        }
    }

    /// Records `id` as published: the next expected is `id + 1` (never less
    /// than it was).
    pub fn advance(&mut self, id: i64) {
        let after = id.saturating_add(1);
        self.next = Some(self.next.map_or(after, |next| next.max(after)));
    }
}

/// The open time of the newest closed kline per (symbol, interval).
#[derive(Debug, Default)]
pub struct ClosedKlines {
    newest: HashMap<(String, String), Micros>,
}

impl ClosedKlines {
    /// True the first time a closed kline is seen (a kline repeats when two
    /// connections overlap).
    pub fn is_new(&mut self, symbol: &str, interval: &str, open_time: Micros) -> bool {
        let last = self
            .newest
            .entry((symbol.to_owned(), interval.to_owned()))
            .or_insert(Micros::MIN);
        if open_time > *last {
            *last = open_time;
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
        assert_eq!(s.check(100), Order::First);
        s.advance(100);
        assert_eq!(s.check(101), Order::Next);
        assert_eq!(s.check(100), Order::Duplicate);
        assert_eq!(s.check(105), Order::Gap { from: 101, to: 104 });
        s.advance(105);
        assert_eq!(s.check(103), Order::Duplicate);
        // Advancing never goes back.
        s.advance(90);
        assert_eq!(s.check(106), Order::Next);
        // An id at the end of the range (outside input) does not overflow.
        s.advance(i64::MAX);
        assert_eq!(s.check(5), Order::Duplicate);
    }

    #[test]
    fn a_closed_kline_is_new_once_per_symbol_and_interval() {
        let mut k = ClosedKlines::default();
        assert!(k.is_new("BTCUSDT", "1m", 60));
        assert!(!k.is_new("BTCUSDT", "1m", 60), "the overlap repeats it");
        assert!(!k.is_new("BTCUSDT", "1m", 0), "older");
        assert!(k.is_new("BTCUSDT", "1h", 60));
        assert!(k.is_new("ETHUSDT", "1m", 60));
        assert!(k.is_new("BTCUSDT", "1m", 120));
    }
}
