//! The producer's Prometheus metrics, registered once. Label sets are fixed:
//! `component` (which source), `topic`, `stage`, `symbol` (configured symbols
//! only), `interval`, `api`, `outcome`.

use prometheus::{GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};
use tickpipe_ops::metrics::register;

/// Every metric the producer exports.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Messages (frames, rows, lines) received from a source, before parsing.
    pub received: IntCounterVec,
    /// Records acknowledged by Kafka, per topic.
    pub published: IntCounterVec,
    /// Encoded bytes acknowledged by Kafka, per topic.
    pub bytes: IntCounterVec,
    /// Inputs sent to dead letters, by component and stage.
    pub rejected: IntCounterVec,
    /// Delivery errors librdkafka gave up on, re-enqueued by us.
    pub delivery_retries: IntCounterVec,
    /// Records that could not be delivered even after retries.
    pub delivery_failures: IntCounterVec,
    /// Time from enqueue to acknowledgement.
    pub produce_latency: Histogram,
    /// Records enqueued and not yet acknowledged (bounded by `max_in_flight`).
    pub queue_depth: IntGauge,
    /// WebSocket connections opened after the first, by component.
    pub reconnects: IntCounterVec,
    /// Trade-id gaps detected, by symbol.
    pub gaps: IntCounterVec,
    /// Trades fetched over REST to fill gaps, by symbol.
    pub backfilled: IntCounterVec,
    /// Trade ids that stayed missing after repair, by symbol.
    pub unrepaired: IntCounterVec,
    /// Records seen twice (connection overlap, repair) and published once.
    pub duplicates: IntCounterVec,
    /// REST calls by api and outcome (`ok`, `rate_limited`, `error`).
    pub rest_requests: IntCounterVec,
    /// REST latency by api.
    pub rest_latency: HistogramVec,
    /// Klines backfill: holes between consecutive klines (exchange outages),
    /// by symbol and interval.
    pub kline_gaps: IntCounterVec,
    /// Klines backfill: close time of the newest kline published or
    /// checkpointed, in Unix seconds, by symbol and interval (how fresh the
    /// history is).
    pub kline_newest: GaugeVec,
    /// Klines backfill with `--every`: times a (symbol, interval) stopped
    /// because Binance kept failing; it is repeated.
    pub backfill_failures: IntCounterVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(registry, IntCounterVec::new(Opts::new(name, help), labels))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let produce_latency = register(
            r,
            Histogram::with_opts(
                HistogramOpts::new(
                    "tickpipe_producer_produce_latency_seconds",
                    "Time from enqueue to the broker's acknowledgement.",
                )
                .buckets(prometheus::exponential_buckets(0.0005, 2.0, 16).expect("buckets")),
            ),
        );
        let queue_depth = register(
            r,
            IntGauge::new(
                "tickpipe_producer_queue_depth_records",
                "Records enqueued and not yet acknowledged.",
            ),
        );
        let rest_latency = register(
            r,
            HistogramVec::new(
                HistogramOpts::new("tickpipe_producer_rest_latency_seconds", "REST request latency.")
                    .buckets(prometheus::exponential_buckets(0.005, 2.0, 12).expect("buckets")),
                &["api"],
            ),
        );
        let kline_newest = register(
            r,
            GaugeVec::new(
                Opts::new(
                    "tickpipe_producer_kline_newest_close_timestamp_seconds",
                    "Close time (Unix seconds) of the newest kline the backfill published or finds checkpointed.",
                ),
                &["symbol", "interval"],
            ),
        );
        Metrics {
            received: counter(
                r,
                "tickpipe_producer_messages_received_total",
                "Messages received from a source, before parsing.",
                &["component"],
            ),
            published: counter(
                r,
                "tickpipe_producer_records_published_total",
                "Records acknowledged by Kafka.",
                &["topic"],
            ),
            bytes: counter(
                r,
                "tickpipe_producer_published_bytes_total",
                "Encoded bytes acknowledged by Kafka.",
                &["topic"],
            ),
            rejected: counter(
                r,
                "tickpipe_producer_records_rejected_total",
                "Inputs sent to dead letters.",
                &["component", "stage"],
            ),
            delivery_retries: counter(
                r,
                "tickpipe_producer_delivery_retries_total",
                "Records re-enqueued after a delivery error.",
                &["topic"],
            ),
            delivery_failures: counter(
                r,
                "tickpipe_producer_delivery_failures_total",
                "Records that could not be delivered.",
                &["topic"],
            ),
            produce_latency,
            queue_depth,
            reconnects: counter(
                r,
                "tickpipe_producer_reconnects_total",
                "WebSocket connections opened after the first.",
                &["component"],
            ),
            gaps: counter(
                r,
                "tickpipe_producer_trade_gaps_total",
                "Trade-id gaps detected.",
                &["symbol"],
            ),
            backfilled: counter(
                r,
                "tickpipe_producer_trades_backfilled_total",
                "Trades fetched over REST to fill gaps.",
                &["symbol"],
            ),
            unrepaired: counter(
                r,
                "tickpipe_producer_trades_unrepaired_total",
                "Trade ids still missing after repair.",
                &["symbol"],
            ),
            duplicates: counter(
                r,
                "tickpipe_producer_duplicates_dropped_total",
                "Records received twice and published once.",
                &["component"],
            ),
            rest_requests: counter(
                r,
                "tickpipe_producer_rest_requests_total",
                "REST requests by outcome.",
                &["api", "outcome"],
            ),
            rest_latency,
            kline_gaps: counter(
                r,
                "tickpipe_producer_kline_gaps_total",
                "Holes between consecutive klines the backfill received (exchange outages).",
                &["symbol", "interval"],
            ),
            kline_newest,
            backfill_failures: counter(
                r,
                "tickpipe_producer_backfill_failures_total",
                "Klines backfill (--every): symbol and interval runs Binance failed, repeated later.",
                &["symbol", "interval"],
            ),
            registry,
        }
    }
}
