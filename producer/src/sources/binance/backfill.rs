//! `producer backfill`: Binance klines history over REST, in pages of 1,000,
//! resumable, with a progress line on a terminal, and optionally repeated
//! (`--every 24h`) to keep the history current like a daily batch job.
//!
//! Resume: after each page is acknowledged by Kafka, the open time of the next
//! candle is written to a checkpoint file per (venue, symbol, interval); a rerun
//! starts there, so nothing acknowledged is published again. The one window
//! where a page can be published twice is a kill between the acknowledgement
//! and the checkpoint write; downstream the candle key (venue, symbol,
//! interval, open time, origin) makes that repeat harmless.
//!
//! Load checks, after every (symbol, interval): a summary line with the candles
//! published and the gaps found. A gap is a kline that does not open where
//! the previous one closed (or, on a resumed run, at the checkpoint): an
//! exchange outage, for which Binance has no klines. Gaps are reported (log
//! line with the missing span, `tickpipe_producer_kline_gaps_total`), never
//! filled with invented rows. The close time of the newest kline is exported
//! (`tickpipe_producer_kline_newest_close_timestamp_seconds`) so that a stalled
//! daily job raises an alert.
//!
//! Failures: when Binance keeps failing through a call's retries
//! ([`SourceError::Unavailable`]), a single run ends with the error; the daily
//! mode counts it in `tickpipe_producer_backfill_failures_total`, goes on with
//! the other symbols and intervals, and repeats the run from the checkpoints
//! after a backoff, because the next period is too far away. Any other error
//! ends both. A broker that does not acknowledge a page is waited for (the
//! page is not published again); a page with a record Kafka refused for good
//! is not checkpointed and ends the run as `Unavailable`, so it is published
//! again (its delivered candles twice) rather than never. A stop ends the job
//! cleanly at any point.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tickpipe_schemas::{Interval, Micros, Source as RecordSource};

use super::super::backoff::Backoff;
use super::parse::{self, Origin};
use super::rest::BinanceRest;
use super::BinanceConfig;
use crate::events::{BackfillFailed, KlinesMissing};
use crate::item::{now_micros, rules_now, Item};
use crate::publish::Publisher;
use crate::sources::{SourceError, Stop};

const COMPONENT: &str = "binance-backfill";

/// Candles the publisher gave up on so far (read without creating the
/// series, which appears with the first failure).
fn given_up(publisher: &Publisher) -> u64 {
    use prometheus::core::Collector;
    publisher
        .metrics()
        .delivery_failures
        .collect()
        .iter()
        .flat_map(|f| f.get_metric())
        .filter(|m| m.get_label().iter().any(|l| l.value() == "candles"))
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

/// How long after its close time a kline is taken as final (see `one`).
const CLOSE_MARGIN_MICROS: Micros = 10_000_000;

/// What to backfill.
#[derive(Debug, Clone)]
pub struct BackfillJob {
    pub symbols: Vec<String>,
    /// Binance interval names (`1m` … `1d`, `1w`, `1M`).
    pub intervals: Vec<String>,
    /// How far back, e.g. 5 years.
    pub since: Duration,
    /// Where the checkpoints live.
    pub state_dir: PathBuf,
    /// Run again after this long, until stopped.
    pub every: Option<Duration>,
}

/// Parses `5y`, `30d`, `12h`, `90m`, `2w`.
pub fn parse_span(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and a unit (m, h, d, w, y)"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        "y" => 365 * 86_400 + 6 * 3600,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (m, h, d, w, y)")),
    };
    Ok(Duration::from_secs(n * secs))
}

/// The length of a Binance interval, approximate for `1w`/`1M` (only used to
/// estimate progress and to check the name).
fn interval_micros(name: &str) -> Result<Micros, String> {
    match name {
        "1w" => Ok(7 * 86_400_000_000),
        "1M" => Ok(30 * 86_400_000_000),
        _ => name
            .parse::<Interval>()
            .map(|i| i.micros())
            .map_err(|e| format!("interval {name:?}: {e}")),
    }
}

fn checkpoint_path(dir: &Path, venue: &str, symbol: &str, interval: &str) -> PathBuf {
    dir.join(format!("klines-{venue}-{symbol}-{interval}.next"))
}

fn read_checkpoint(path: &Path) -> Result<Option<Micros>, SourceError> {
    match std::fs::read_to_string(path) {
        Ok(s) => s.trim().parse().map(Some).map_err(|e| {
            SourceError::Io(format!(
                "checkpoint {} is damaged ({e}); delete it to start over",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(SourceError::Io(format!("{}: {e}", path.display()))),
    }
}

fn write_checkpoint(path: &Path, next: Micros) -> Result<(), SourceError> {
    // Write then rename, so a kill never leaves half a number.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, next.to_string())
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| SourceError::Io(format!("{}: {e}", path.display())))
}

/// Runs the job (repeatedly with `every`), returning the candles published.
pub async fn run(
    job: &BackfillJob,
    config: &BinanceConfig,
    publisher: &Publisher,
    mut stop: Stop,
) -> Result<u64, SourceError> {
    std::fs::create_dir_all(&job.state_dir)
        .map_err(|e| SourceError::Io(format!("state dir {}: {e}", job.state_dir.display())))?;
    let max_backoff = Duration::from_millis(config.max_backoff_ms);
    let rest = BinanceRest::new(
        &config.rest_url,
        config.weight_limit,
        max_backoff,
        publisher.metrics().clone(),
    )?;
    // With `every`, a (symbol, interval) that Binance kept failing is repeated
    // sooner than the period, from its checkpoint; any other error ends the job.
    let mut retry = Backoff::new(
        max_backoff.max(Duration::from_secs(1)),
        job.every.unwrap_or_default().max(Duration::from_secs(1)),
    );
    let shared = Shared {
        job,
        config,
        rest: &rest,
        publisher,
    };
    let mut total = 0;
    loop {
        let before = total;
        let mut failed = 0;
        for symbol in &job.symbols {
            let symbol = symbol.to_uppercase();
            for interval in &job.intervals {
                let result = one(&shared, &symbol, interval, &mut stop, &mut total).await;
                if stop.is_stopped() {
                    // Whatever was interrupted resumes from its checkpoint.
                    return Ok(total);
                }
                match result {
                    Ok(()) => {}
                    Err(SourceError::Unavailable(e)) if job.every.is_some() => {
                        BackfillFailed {
                            symbol: symbol.as_str(),
                            interval,
                            error: &e,
                        }
                        .emit(publisher.metrics());
                        failed += 1;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let Some(every) = job.every else { return Ok(total) };
        let wait = if failed == 0 {
            retry.reset();
            tracing::info!(
                published = total,
                next_in_s = every.as_secs(),
                "backfill done; waiting for the next run"
            );
            every
        } else {
            if total > before {
                // It advanced: the next attempt starts from the shortest pause.
                retry.reset();
            }
            let wait = retry.next_delay();
            tracing::warn!(
                failed,
                retry_in_s = wait.as_secs(),
                "backfill run incomplete; repeating it"
            );
            wait
        };
        if !stop.sleep(wait).await {
            return Ok(total);
        }
    }
}

/// What every (symbol, interval) of a run shares.
struct Shared<'a> {
    job: &'a BackfillJob,
    config: &'a BinanceConfig,
    rest: &'a BinanceRest,
    publisher: &'a Publisher,
}

/// Backfills one symbol and interval from its checkpoint, adding the candles
/// published to `total` as it goes (a failure keeps what it did).
async fn one(
    shared: &Shared<'_>,
    symbol: &str,
    interval: &str,
    stop: &mut Stop,
    total: &mut u64,
) -> Result<(), SourceError> {
    let Shared {
        job,
        config,
        rest,
        publisher,
    } = *shared;
    let step = interval_micros(interval).map_err(SourceError::User)?;
    let checkpoint = checkpoint_path(&job.state_dir, &config.venue, symbol, interval);
    let now = now_micros();
    let from = now - job.since.as_micros() as Micros;
    let resumed = read_checkpoint(&checkpoint)?.filter(|c| *c >= from);
    let mut next = resumed.unwrap_or(from);
    let total_est = ((now - next) / step).max(1);
    let progress = std::io::stderr().is_terminal();
    let start = *total;
    // Where the next kline must open: after the checkpoint of a resumed run;
    // unknown on a first run (history starts at the listing or `since`).
    let mut expected = resumed;
    let mut gaps = 0u64;
    let labels = [symbol, interval];
    loop {
        if stop.is_stopped() {
            break;
        }
        let path = format!(
            "/api/v3/klines?symbol={symbol}&interval={interval}&startTime={}&limit=1000",
            next / 1000
        );
        let body = rest.get("klines", &path, 2, stop).await?;
        let origin = Origin {
            venue: &config.venue,
            source: RecordSource::Binance,
            ingest_time: now_micros(),
        };
        let rows: Vec<serde_json::Value> = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                publisher
                    .publish(Item::unparsed(
                        COMPONENT,
                        RecordSource::Binance,
                        &body,
                        format!("klines answer is not a list: {e}"),
                    ))
                    .await;
                return Err(SourceError::External(format!(
                    "Binance klines for {symbol} {interval}: unreadable answer ({e})"
                )));
            }
        };
        // A kline counts as closed a little after its close time: with this
        // clock ahead of Binance's, or Binance still folding in the last
        // trades, the newest row may not be final yet, and the checkpoint
        // would move past it for good.
        let now = now_micros() - CLOSE_MARGIN_MICROS;
        let rules = rules_now();
        let mut page_next = next;
        let given_up_before = given_up(publisher);
        for row in &rows {
            let raw = row.to_string();
            let candle = parse::kline_json_fields(row).and_then(|f| {
                let f: Vec<&str> = f.iter().map(String::as_str).collect();
                parse::kline_row(&f, symbol, interval, origin, now)
            });
            match candle {
                Ok(Some(c)) => {
                    if c.open_time < next {
                        continue;
                    }
                    if let Some(at) = expected.filter(|at| c.open_time > *at) {
                        gaps += 1;
                        KlinesMissing {
                            symbol,
                            interval,
                            from: utc(at),
                            to: utc(c.open_time),
                            missing_hours: (c.open_time - at) as f64 / 3.6e9,
                        }
                        .emit(publisher.metrics());
                    }
                    expected = Some(c.close_time + 1000);
                    page_next = c.close_time + 1000;
                    *total += 1;
                    publisher
                        .publish(Item::from(c).validated(&rules, COMPONENT, raw.as_bytes()))
                        .await;
                }
                // The newest candle is still open: it is published by a later run.
                Ok(None) => {}
                Err(reason) => {
                    publisher
                        .publish(Item::unparsed(COMPONENT, RecordSource::Binance, raw.as_bytes(), reason))
                        .await
                }
            }
        }
        if page_next == next {
            break;
        }
        // The checkpoint moves only past an acknowledged page. Publishing the
        // page again would duplicate it (librdkafka keeps retrying the first
        // copy), so a slow or absent broker is waited for, until stopped.
        let mut waited = 0u64;
        loop {
            let unacked = publisher.flush(Duration::from_secs(10)).await;
            if unacked == 0 {
                break;
            }
            if stop.is_stopped() {
                return Ok(());
            }
            waited += 10;
            if waited % 60 == 0 {
                tracing::warn!(
                    symbol,
                    interval,
                    unacked,
                    waited_s = waited,
                    "Kafka has not acknowledged the page yet"
                );
            }
        }
        // A candle Kafka refused for good (after the producer's own retries)
        // was settled, not delivered: the checkpoint stays before the page,
        // and a later run publishes it again (its delivered candles twice,
        // which the sinks' keys absorb) rather than never.
        let failed = given_up(publisher) - given_up_before;
        if failed > 0 {
            return Err(SourceError::Unavailable(format!(
                "Kafka refused {failed} candles of the {symbol} {interval} page from {next}; \
                 the checkpoint stays before it"
            )));
        }
        next = page_next;
        write_checkpoint(&checkpoint, next)?;
        set_newest(publisher, &labels, next);
        if progress {
            let done = total_est - ((now - next) / step).max(0);
            eprint!(
                "\r{symbol} {interval}: {} candles, {:>3}%",
                *total - start,
                (done * 100 / total_est).clamp(0, 100)
            );
        }
        if rows.len() < 1000 {
            break;
        }
    }
    if progress {
        eprintln!();
    }
    // The newest kline known: published now, or before the checkpoint.
    if let Some(after_newest) = expected {
        set_newest(publisher, &labels, after_newest);
    }
    tracing::info!(
        symbol,
        interval,
        published = *total - start,
        gaps,
        newest_close = %expected.map_or_else(|| "none".to_owned(), |e| utc(e - 1000)),
        "klines backfilled"
    );
    Ok(())
}

/// Exports the close time of the newest kline, given the open time of the one
/// after it (1 ms later).
fn set_newest(publisher: &Publisher, labels: &[&str; 2], after_newest: Micros) {
    let gauge = publisher.metrics().kline_newest.with_label_values(labels);
    gauge.set((after_newest - 1000) as f64 / 1e6);
}

/// A time for a log line: RFC 3339, UTC.
fn utc(micros: Micros) -> String {
    chrono::DateTime::from_timestamp_micros(micros).map_or_else(|| format!("{micros} µs"), |t| t.to_rfc3339())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans() {
        assert_eq!(parse_span("5y"), Ok(Duration::from_secs(5 * (365 * 86_400 + 6 * 3600))));
        assert_eq!(parse_span("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert!(parse_span("5").is_err());
        assert!(parse_span("y").is_err());
        assert!(parse_span("3q").is_err());
    }
}
