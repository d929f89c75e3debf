//! Occurrences the producer reports, each one type whose `emit` logs it and
//! counts it together, so that a log line and its metric never disagree.

use crate::metrics::Metrics;

/// Trade ids that stay missing: counted in
/// `tickpipe_producer_trades_unrepaired_total` and logged as an error.
pub struct TradesUnrepaired<'a> {
    pub symbol: &'a str,
    /// The first and last id of the run that stays missing.
    pub from: i64,
    pub to: i64,
    /// How many ids of it are missing.
    pub missing: u64,
    /// Why, in words a user can act on.
    pub why: &'static str,
}

impl TradesUnrepaired<'_> {
    pub fn emit(&self, metrics: &Metrics) {
        metrics
            .unrepaired
            .with_label_values(&[self.symbol])
            .inc_by(self.missing);
        tracing::error!(
            symbol = self.symbol,
            from = self.from,
            to = self.to,
            missing = self.missing,
            "{}",
            self.why
        );
    }
}
