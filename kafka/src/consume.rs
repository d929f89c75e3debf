//! Consuming: the settings of a consumer whose offsets follow its output,
//! the lag gauge, and the check of a written position against the
//! partition's end.

use prometheus::{IntGaugeVec, Opts, Registry};
use rdkafka::config::ClientConfig;
use rdkafka::Statistics;
use tickpipe_ops::metrics::register;

use crate::client::{client_config, default_to, require};

/// Settings for a consumer whose offsets move only after its output is durable:
/// no automatic commit and no automatic offset store (the sink stores offsets
/// itself, after the write succeeded), reading from the earliest offset when the
/// group has none. The user's librdkafka properties (see
/// `tickpipe_producer::kafka::PROPERTY_ENV_PREFIX`) may change anything else.
pub fn consumer_config(brokers: &str, group: &str) -> ClientConfig {
    let mut c = client_config(brokers);
    c.set("group.id", group);
    require(&mut c, "enable.auto.commit", "false");
    require(&mut c, "enable.auto.offset.store", "false");
    require(&mut c, "isolation.level", "read_committed");
    default_to(&mut c, "auto.offset.reset", "earliest");
    c
}

/// How often librdkafka reports its statistics, from which the consumer lag
/// gauge is set.
pub const STATISTICS_INTERVAL_MS: &str = "5000";

/// `<prefix>_consumer_lag_records{topic, partition}` in `registry`, set by
/// [`record_consumer_lag`].
pub fn consumer_lag_gauge(registry: &Registry, prefix: &str) -> IntGaugeVec {
    register(
        registry,
        IntGaugeVec::new(
            Opts::new(
                format!("{prefix}_consumer_lag_records"),
                "Records behind the partition's end (from the committed offset).",
            ),
            &["topic", "partition"],
        ),
    )
}

/// Sets the lag gauge from a statistics report: per partition, the records
/// between the group's committed offset and the partition's (last stable) end.
/// Partitions whose lag librdkafka does not know yet (nothing committed) are
/// left out.
pub fn record_consumer_lag(lag: &IntGaugeVec, statistics: &Statistics) {
    for (topic, t) in &statistics.topics {
        for (partition, p) in &t.partitions {
            if *partition >= 0 && p.consumer_lag >= 0 {
                lag.with_label_values(&[topic.as_str(), &partition.to_string()])
                    .set(p.consumer_lag);
            }
        }
    }
}

/// Why a written position cannot be right, if it cannot: it is above `end`,
/// the partition's end as the broker's fetch responses report it (no request
/// of its own: the end the consumer reads to). Nothing
/// can have been written there, so the topic was deleted and recreated, or the
/// reader now reads another cluster; reading on from the position would skip
/// the partition's records in silence.
pub fn position_above_end(next: i64, end: i64) -> Option<String> {
    (next > end).then(|| {
        format!(
            "the written position {next} is above the partition's end {end}: the topic was deleted and \
             recreated, or this reader now reads another cluster"
        )
    })
}

/// Partition ends (high watermarks) as the broker's fetch responses report
/// them, by (topic, partition): kept from librdkafka's statistics by
/// [`record_ends`].
pub type Ends = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<(String, i32), i64>>>;

/// Keeps the partition ends of a statistics report (those known: fetched at
/// least once).
pub fn record_ends(ends: &Ends, statistics: &Statistics) {
    let mut ends = ends.lock().unwrap_or_else(|p| p.into_inner());
    for (topic, t) in &statistics.topics {
        for (partition, p) in &t.partitions {
            if *partition >= 0 && p.hi_offset >= 0 {
                ends.insert((topic.clone(), *partition), p.hi_offset);
            }
        }
    }
}

/// What a written position's check against its partition's end says.
#[derive(Debug, PartialEq, Eq)]
pub enum EndVerdict {
    /// No end reported yet: ask again later.
    Unknown,
    /// At or below the end.
    Fine,
    /// Above the end for the first time: judged again on a later report.
    Again,
    /// Above the end twice: the reason (see [`position_above_end`]).
    Refuse(String),
}

/// Judges the written position `next` of `tp` against the end `ends` holds.
/// A new leader can report an end below what its predecessor served for a
/// moment after a failover (its high watermark catches up with its
/// followers' next fetch), so a position above the end is refused only when
/// a later report says so again: the first time (`above_before` false) the
/// end is taken out of `ends`, and the next verdict waits for a new report
/// (the statistics come every `STATISTICS_INTERVAL_MS`).
pub fn judge_position(ends: &Ends, tp: &(String, i32), next: i64, above_before: bool) -> EndVerdict {
    let mut ends = ends.lock().unwrap_or_else(|p| p.into_inner());
    let Some(&end) = ends.get(tp) else {
        return EndVerdict::Unknown;
    };
    match position_above_end(next, end) {
        None => EndVerdict::Fine,
        Some(_) if !above_before => {
            ends.remove(tp);
            EndVerdict::Again
        }
        Some(why) => EndVerdict::Refuse(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_above_the_end_is_refused_only_when_a_later_report_agrees() {
        let ends = Ends::default();
        let tp = ("trades".to_owned(), 0);
        assert_eq!(judge_position(&ends, &tp, 100, false), EndVerdict::Unknown);
        ends.lock().unwrap().insert(tp.clone(), 100);
        assert_eq!(judge_position(&ends, &tp, 100, false), EndVerdict::Fine);
        // A new leader's end, low for a moment: judged again on the next report.
        ends.lock().unwrap().insert(tp.clone(), 90);
        assert_eq!(judge_position(&ends, &tp, 100, false), EndVerdict::Again);
        assert_eq!(judge_position(&ends, &tp, 100, true), EndVerdict::Unknown);
        ends.lock().unwrap().insert(tp.clone(), 120);
        assert_eq!(judge_position(&ends, &tp, 100, true), EndVerdict::Fine);
        // Above twice: refused, with the reason.
        ends.lock().unwrap().insert(tp.clone(), 90);
        assert_eq!(judge_position(&ends, &tp, 100, false), EndVerdict::Again);
        ends.lock().unwrap().insert(tp.clone(), 90);
        match judge_position(&ends, &tp, 100, true) {
            EndVerdict::Refuse(why) => assert!(why.contains("100") && why.contains("90"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
