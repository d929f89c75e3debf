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

/// A record Kafka did not acknowledge. Enqueued `again`: counted in
/// `tickpipe_producer_delivery_retries_total`, logged as a warning. Given up
/// (too large, invalid, or failing through every redelivery): counted in
/// `tickpipe_producer_delivery_failures_total`, logged as an error.
pub struct Undelivered<'a> {
    pub topic: &'a str,
    pub error: &'a dyn std::fmt::Display,
    pub again: bool,
}

impl Undelivered<'_> {
    pub fn emit(&self, metrics: &Metrics) {
        let (topic, error) = (self.topic, self.error);
        if self.again {
            metrics.delivery_retries.with_label_values(&[topic]).inc();
            tracing::warn!(topic, error = %error, "delivery failed, enqueueing again");
        } else {
            metrics.delivery_failures.with_label_values(&[topic]).inc();
            tracing::error!(topic, error = %error, "record could not be delivered");
        }
    }
}

/// A trade-id gap seen on a live stream: counted in
/// `tickpipe_producer_trade_gaps_total`, logged; the repair follows.
pub struct TradeGap<'a> {
    pub symbol: &'a str,
    pub from: i64,
    pub to: i64,
}

impl TradeGap<'_> {
    pub fn emit(&self, metrics: &Metrics) {
        metrics.gaps.with_label_values(&[self.symbol]).inc();
        tracing::info!(
            symbol = self.symbol,
            from = self.from,
            to = self.to,
            "trade-id gap: repairing over REST"
        );
    }
}

/// A span the exchange has no klines for (an outage; none are invented):
/// counted in `tickpipe_producer_kline_gaps_total`, logged as a warning.
pub struct KlinesMissing<'a> {
    pub symbol: &'a str,
    pub interval: &'a str,
    /// The first missing open time and the next one present, RFC 3339.
    pub from: String,
    pub to: String,
    pub missing_hours: f64,
}

impl KlinesMissing<'_> {
    pub fn emit(&self, metrics: &Metrics) {
        metrics
            .kline_gaps
            .with_label_values(&[self.symbol, self.interval])
            .inc();
        tracing::warn!(
            symbol = self.symbol,
            interval = self.interval,
            from = %self.from,
            to = %self.to,
            missing_hours = self.missing_hours,
            "no klines from the exchange for this span (an outage); none are invented"
        );
    }
}

/// A periodic backfill of one symbol and interval that Binance failed through
/// every retry: counted in `tickpipe_producer_backfill_failures_total`,
/// logged as a warning; the run is repeated from its checkpoint.
pub struct BackfillFailed<'a> {
    pub symbol: &'a str,
    pub interval: &'a str,
    pub error: &'a dyn std::fmt::Display,
}

impl BackfillFailed<'_> {
    pub fn emit(&self, metrics: &Metrics) {
        metrics
            .backfill_failures
            .with_label_values(&[self.symbol, self.interval])
            .inc();
        tracing::warn!(
            symbol = self.symbol,
            interval = self.interval,
            error = %self.error,
            "backfill failed; it is repeated from its checkpoint"
        );
    }
}

/// Binance answered 429 or 418: counted in
/// `tickpipe_producer_rest_requests_total{outcome="rate_limited"}`, logged as
/// a warning; every request pauses for `wait`.
pub struct RateLimited {
    pub api: &'static str,
    pub status: u16,
    pub wait: std::time::Duration,
}

impl RateLimited {
    pub fn emit(&self, metrics: &Metrics) {
        metrics
            .rest_requests
            .with_label_values(&[self.api, "rate_limited"])
            .inc();
        tracing::warn!(
            api = self.api,
            status = self.status,
            retry_after_s = self.wait.as_secs(),
            "Binance rate limit: pausing every request"
        );
    }
}
