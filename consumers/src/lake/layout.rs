//! Where records go in the lake, and what a file's name says it holds. Pure:
//! no I/O.
//!
//! ```text
//! raw/<entity>/venue=<venue>/date=<YYYY-MM-DD>/<topic>+<partition>+<first offset>+<last offset>.parquet
//! ```
//!
//! Folders are Hive-style partitions (DuckDB, Spark, Athena and BigQuery
//! external tables read `venue` and `date` as columns). `date` is the UTC day
//! of the record's event time; `venue` is its `venue` field (trades, candles)
//! or, for entities without one (CoinCap's, dead letters), its `source`. A
//! file holds every record of one Kafka partition in that folder from its
//! first to its last offset, so its name says exactly what it holds: writing
//! it again writes the same bytes, and the highest last offset in a folder is
//! where that partition's records in it stand. Offsets are zero-padded to 20
//! digits so that names sort by offset.

use std::fmt::Write as _;

use tickpipe_schemas::{AnyRecord, Topic};

/// The layer of the raw files: every record as consumed.
pub const RAW: &str = "raw";

/// The suffix of the lake's Parquet files.
pub const PARQUET: &str = ".parquet";

/// The folder a record goes to, relative to the lake's root, e.g.
/// `raw/trades/venue=binance/date=2024-03-01`.
pub fn folder(layer: &str, topic: Topic, record: &AnyRecord) -> Result<String, String> {
    let day = chrono::DateTime::from_timestamp_micros(record.event_time())
        .ok_or_else(|| format!("event time {} µs is out of range", record.event_time()))?
        .date_naive();
    let venue = venue(record);
    let mut out = format!("{layer}/{}/venue=", topic.base_name());
    escape(venue, &mut out);
    let _ = write!(out, "/date={}", day.format("%Y-%m-%d"));
    Ok(out)
}

/// The record's venue field, or its source where the entity has none.
pub fn venue(record: &AnyRecord) -> &str {
    match record {
        AnyRecord::Trade(t) => &t.venue,
        AnyRecord::Candle(c) => &c.venue,
        other => other.source().as_str(),
    }
}

/// A partition value as Hive escapes it: bytes other than letters, digits,
/// `-`, `_` and `.` as `%XX`, so that no value can make a path (the folder is
/// `venue=<value>`, never `.` or `..`).
fn escape(value: &str, out: &mut String) {
    if value.is_empty() {
        out.push_str("__HIVE_DEFAULT_PARTITION__");
        return;
    }
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// What a file holds: the records of one Kafka partition from `first` to
/// `last` offset (both included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileName {
    pub topic: String,
    pub partition: i32,
    pub first: i64,
    pub last: i64,
}

impl FileName {
    /// `<topic>+<partition>+<first>+<last>.parquet` (Kafka topic names cannot
    /// hold `+`).
    pub fn render(&self) -> String {
        format!(
            "{}+{}+{:020}+{:020}{PARQUET}",
            self.topic, self.partition, self.first, self.last
        )
    }

    /// The name back from a file's name; `None` for a file the sink did not
    /// write (an upload's temporary file, a reader's `_SUCCESS`).
    pub fn parse(name: &str) -> Option<FileName> {
        let stem = name.strip_suffix(PARQUET)?;
        let mut parts = stem.rsplitn(4, '+');
        let last = parts.next()?.parse().ok()?;
        let first = parts.next()?.parse().ok()?;
        let partition = parts.next()?.parse().ok()?;
        let topic = parts.next()?.to_owned();
        (!topic.is_empty() && first <= last).then_some(FileName {
            topic,
            partition,
            first,
            last,
        })
    }
}

#[cfg(test)]
mod tests {
    use tickpipe_schemas::{Decimal, Price, Source, Trade, TradeKind};

    use super::*;

    fn trade(venue: &str, event_time: i64) -> AnyRecord {
        AnyRecord::Trade(Trade {
            venue: venue.into(),
            symbol: "BTCUSDT".into(),
            kind: TradeKind::Trade,
            trade_id: 1,
            price: Decimal::ONE,
            quantity: Decimal::ONE,
            buyer_is_maker: false,
            first_trade_id: None,
            last_trade_id: None,
            source: Source::Replay,
            event_time,
            ingest_time: event_time,
        })
    }

    #[test]
    fn a_record_goes_to_its_entity_venue_and_utc_day() {
        // 2024-03-01T23:59:59.999999Z, then the next day's first microsecond.
        let t = 1_709_337_599_999_999;
        let dir = folder(RAW, Topic::Trades, &trade("binance", t)).expect("folder");
        assert_eq!(dir, "raw/trades/venue=binance/date=2024-03-01");
        let dir = folder(RAW, Topic::Trades, &trade("binance", t + 1)).expect("folder");
        assert_eq!(dir, "raw/trades/venue=binance/date=2024-03-02");
        let price = AnyRecord::Price(Price {
            asset_id: "bitcoin".into(),
            price_usd: Decimal::ONE,
            source: Source::Coincap,
            event_time: t,
            ingest_time: t,
        });
        let dir = folder(RAW, Topic::Prices, &price).expect("folder");
        assert_eq!(dir, "raw/prices/venue=coincap/date=2024-03-01");
    }

    #[test]
    fn no_venue_can_make_a_path() {
        for (venue, want) in [
            ("../etc", "venue=..%2Fetc"),
            ("..", "venue=.."),
            ("a b=c", "venue=a%20b%3Dc"),
            ("", "venue=__HIVE_DEFAULT_PARTITION__"),
            ("coinbase-pro.v2", "venue=coinbase-pro.v2"),
        ] {
            let dir = folder(RAW, Topic::Trades, &trade(venue, 0)).expect("folder");
            assert!(dir.contains(&format!("/{want}/")), "{venue:?} → {dir}");
        }
        assert!(folder(RAW, Topic::Trades, &trade("x", i64::MAX)).is_err());
    }

    #[test]
    fn file_names_say_what_they_hold_and_sort_by_offset() {
        let name = FileName {
            topic: "dev.trades".into(),
            partition: 2,
            first: 9,
            last: 10,
        };
        let text = name.render();
        assert_eq!(text, "dev.trades+2+00000000000000000009+00000000000000000010.parquet");
        assert_eq!(FileName::parse(&text), Some(name));
        let later = FileName {
            topic: "dev.trades".into(),
            partition: 2,
            first: 11,
            last: 1_000,
        };
        assert!(later.render() > text);
        for other in [
            "dev.trades+2+9+10.parquet#1",
            "_SUCCESS",
            "x+1+5+4.parquet",
            "+1+1+2.parquet",
            "x+a+1+2.parquet",
        ] {
            assert_eq!(FileName::parse(other), None, "{other}");
        }
    }
}
