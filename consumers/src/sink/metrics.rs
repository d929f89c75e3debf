//! The metrics every sink exports, named `<prefix>_...`.

use std::collections::HashMap;

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};
use tickpipe_kafka::consumer_lag_gauge;
use tickpipe_ops::metrics::register;
use tickpipe_ops::now_micros;

/// The metrics every sink exports, named `<prefix>_...`.
#[derive(Clone)]
pub struct SinkMetrics {
    pub consumed: IntCounterVec,
    pub written: IntCounterVec,
    pub rejected: IntCounterVec,
    pub already_written: IntCounterVec,
    pub offset_gaps: IntCounterVec,
    pub refused: IntGaugeVec,
    pub retries: IntCounter,
    pub batch_size: Histogram,
    pub write_seconds: Histogram,
    pub end_to_end: HistogramVec,
    pub lag: IntGaugeVec,
}

impl SinkMetrics {
    /// Creates and registers the metrics; `target` names where rows go
    /// ("Postgres", "BigQuery") in the help texts.
    pub fn new(registry: &Registry, prefix: &str, target: &str) -> Self {
        let r = registry;
        let counter = |name: &str, help: String, labels: &[&str]| {
            register(
                r,
                IntCounterVec::new(Opts::new(format!("{prefix}_{name}"), help), labels),
            )
        };
        let m = SinkMetrics {
            consumed: counter("records_consumed_total", "Records read from Kafka.".into(), &["topic"]),
            written: counter(
                "records_written_total",
                format!("Records written to their table (acknowledged by {target})."),
                &["topic"],
            ),
            rejected: counter(
                "records_rejected_total",
                "Records sent to dead letters, by stage (decode, validate, write).".into(),
                &["topic", "stage"],
            ),
            already_written: counter(
                "records_already_written_total",
                "Records skipped because their offset was already written.".into(),
                &["topic"],
            ),
            offset_gaps: counter(
                "offset_gaps_total",
                "Offsets the broker skipped, or batches that started after the written position.".into(),
                &["topic"],
            ),
            refused: register(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        format!("{prefix}_refused_partitions"),
                        "Assigned partitions paused because the written position is above the partition's end; the \
                     log says how to re-baseline.",
                    ),
                    &["topic"],
                ),
            ),
            retries: register(
                r,
                IntCounter::new(
                    format!("{prefix}_write_retries_total"),
                    format!("Writes retried after a {target} or broker failure."),
                ),
            ),
            batch_size: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(format!("{prefix}_batch_records"), "Records per written batch.")
                        .buckets(vec![1.0, 10.0, 100.0, 1_000.0, 5_000.0, 10_000.0, 50_000.0]),
                ),
            ),
            write_seconds: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(format!("{prefix}_write_duration_seconds"), "Time to write a batch.")
                        .buckets(prometheus::exponential_buckets(0.001, 2.0, 14).unwrap_or_default()),
                ),
            ),
            end_to_end: register(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        format!("{prefix}_end_to_end_latency_seconds"),
                        format!("From the exchange's event time to the write in {target}."),
                    )
                    .buckets(prometheus::exponential_buckets(0.01, 2.0, 16).unwrap_or_default()),
                    &["topic"],
                ),
            ),
            lag: consumer_lag_gauge(r, prefix),
        };
        m
    }

    /// Observes the end-to-end latency of records written now, by topic.
    pub fn observe_end_to_end<'a>(&self, event_times: impl IntoIterator<Item = (&'a str, i64)>) {
        let now = now_micros();
        let mut by_topic: HashMap<&str, Histogram> = HashMap::new();
        for (topic, t) in event_times {
            let h = by_topic
                .entry(topic)
                .or_insert_with(|| self.end_to_end.with_label_values(&[topic]));
            h.observe((now - t).max(0) as f64 / 1e6);
        }
    }
}
