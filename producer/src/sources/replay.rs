//! Replay of recorded market data from files: data.binance.vision CSVs
//! (trades, aggTrades, klines; with or without a header; ms or µs times told
//! apart by magnitude; plain or gzip) and raw WebSocket captures, one message
//! per line as `<ts> <json>` or `<ts>: <json>`. Records are published at the
//! recorded pace times a factor, or as fast as the broker takes them.
//!
//! Reading and parsing run on their own thread, publishing on the runtime, so
//! the two overlap on a two-core machine.

use std::io::Read;
use std::path::{Path, PathBuf};

use std::time::Duration;

use tickpipe_schemas::validate::Rules;
use tickpipe_schemas::{AnyRecord, Micros, Source as RecordSource};
use tokio::sync::mpsc;

use super::binance::parse::{self, Origin, WsEvent};
use super::{SourceConfig, SourceError, Stop};
use crate::item::{now_micros, Item};
use crate::publish::Publisher;

const COMPONENT: &str = "replay";

tickpipe_ops::section! {
    /// The `[replay]` section: recorded files published as if live.
    pub struct ReplayConfig in "replay" {
        /// Files to publish, in order (.csv or .gz), comma-separated; `producer
        /// replay FILE...` gives them as arguments.
        files: Vec<PathBuf> [value_delimiter = ','],
        /// Recorded pace times this factor, or "max" for as fast as possible.
        speed: f64 [alias = "speed", default_value = "max", value_parser = parse_speed],
        /// Venue carried in the records.
        venue: String [alias = "venue", default_value = "binance"],
        /// Symbol of CSV files whose name does not start with it.
        symbol: Option<String> [],
        /// Interval of kline CSV files whose name does not say it.
        interval: Option<String> [],
    }
}

/// A `--replay-speed`: `max` (0, as fast as possible) or a positive factor.
fn parse_speed(s: &str) -> Result<f64, String> {
    if s == "max" {
        return Ok(0.0);
    }
    match s.parse::<f64>() {
        Ok(f) if f >= 0.0 && f.is_finite() => Ok(f),
        _ => Err(format!(
            "{s:?}: a factor such as 1 or 10 (0: as fast as possible), or max"
        )),
    }
}

impl SourceConfig for ReplayConfig {
    const NAME: &'static str = "replay";

    fn check(&self) -> Result<(), SourceError> {
        if self.files.is_empty() {
            return Err(SourceError::User(
                "the replay source needs files: producer replay FILE..., or --replay-files".into(),
            ));
        }
        if !(self.speed >= 0.0 && self.speed.is_finite()) {
            return Err(SourceError::User(format!(
                "replay speed must be 0 (as fast as possible) or positive, got {}",
                self.speed
            )));
        }
        for f in &self.files {
            if !f.is_file() {
                return Err(SourceError::User(format!("replay file {} does not exist", f.display())));
            }
        }
        Ok(())
    }

    fn finite(&self) -> bool {
        true
    }

    async fn run(self, publisher: Publisher, mut stop: Stop) -> Result<(), SourceError> {
        let config = self;
        let speed = config.speed;
        let (tx, mut rx) = mpsc::channel::<Vec<Item>>(QUEUED_BATCHES);
        let metrics = publisher.metrics().clone();
        let reader = std::thread::Builder::new()
            .name("replay-reader".into())
            .spawn(move || -> Result<(), SourceError> {
                for f in &config.files {
                    read_file(f, &config, &metrics, &tx)?;
                }
                Ok(())
            })
            .map_err(|e| SourceError::Io(format!("cannot start the replay reader: {e}")))?;
        let start = tokio::time::Instant::now();
        let mut first: Option<Micros> = None;
        'batches: while let Some(batch) = rx.recv().await {
            if stop.is_stopped() {
                break;
            }
            if speed == 0.0 {
                publisher.publish_batch(batch).await;
                continue;
            }
            for item in batch {
                if stop.is_stopped() {
                    break 'batches;
                }
                if speed > 0.0 {
                    if let Some(t) = event_time(&item) {
                        let t0 = *first.get_or_insert(t);
                        let due = start + Duration::from_micros(((t - t0).max(0) as f64 / speed) as u64);
                        tokio::select! {
                            _ = tokio::time::sleep_until(due) => {}
                            _ = stop.wait() => break 'batches,
                        }
                    }
                }
                publisher.publish(item).await;
            }
        }
        drop(rx);
        match tokio::task::spawn_blocking(move || reader.join()).await {
            Ok(Ok(r)) => r,
            _ => Err(SourceError::Io("the replay reader panicked".into())),
        }
    }
}

fn event_time(item: &Item) -> Option<Micros> {
    match item {
        Item::Record(AnyRecord::Trade(t)) => Some(t.event_time),
        Item::Record(AnyRecord::Candle(c)) => Some(c.event_time),
        Item::Record(AnyRecord::Price(p)) => Some(p.event_time),
        _ => None,
    }
}

/// What kind of file it is, decided from its name and first data line.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Format {
    Capture,
    Trades { symbol: String },
    AggTrades { symbol: String },
    Klines { symbol: String, interval: String },
}

/// `BTCUSDT-1m-2024-01-01.csv` → (`BTCUSDT`, `1m`); `BTCUSDT-trades-...` → (`BTCUSDT`, `trades`).
fn name_parts(path: &Path) -> (Option<String>, Option<String>) {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let mut parts = name.split('-');
    let symbol = parts
        .next()
        .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric()));
    (symbol.map(|s| s.to_uppercase()), parts.next().map(str::to_owned))
}

fn detect(path: &Path, line: &str, c: &ReplayConfig) -> Result<Format, SourceError> {
    let head = line.split_whitespace().next().unwrap_or("");
    let ts = head.trim_end_matches(':');
    if capture_time(ts) && line[head.len()..].trim_start().starts_with('{') {
        return Ok(Format::Capture);
    }
    let (name_symbol, name_kind) = name_parts(path);
    let symbol = c.symbol.clone().or(name_symbol).ok_or_else(|| {
        SourceError::User(format!(
            "{}: cannot tell the symbol from the file name; set replay.symbol (--replay-symbol)",
            path.display()
        ))
    })?;
    match line.split(',').count() {
        6 | 7 => Ok(Format::Trades { symbol }),
        8 => Ok(Format::AggTrades { symbol }),
        12 => {
            let interval = c
                .interval
                .clone()
                .or(name_kind)
                .ok_or_else(|| SourceError::User(format!("{}: set --replay-interval for this klines file", path.display())))?;
            Ok(Format::Klines { symbol, interval })
        }
        n => Err(SourceError::User(format!(
            "{}: a line with {n} columns is neither a data.binance.vision trades (7), aggTrades (8) or klines (12) row nor a WebSocket capture",
            path.display()
        ))),
    }
}

fn open(path: &Path) -> Result<Box<dyn Read + Send>, SourceError> {
    let file = std::fs::File::open(path).map_err(|e| SourceError::Io(format!("{}: {e}", path.display())))?;
    let r: Box<dyn Read + Send> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else if path.extension().is_some_and(|e| e == "zip") {
        return Err(SourceError::User(format!(
            "{}: unzip data.binance.vision archives first (the CSV inside is what replay reads)",
            path.display()
        )));
    } else {
        Box::new(file)
    };
    Ok(r)
}

/// Items handed to the publisher at a time, and how many such batches may wait:
/// the reader runs at most this far ahead (in memory) of what is published.
const BATCH: usize = 1024;
const QUEUED_BATCHES: usize = 16;

/// Lines read, counted locally and added to the metric per batch (an atomic
/// add per line shows in a profile of a capture, which is mostly skipped lines).
struct Received<'a> {
    counter: &'a prometheus::IntCounter,
    pending: u64,
}

impl Received<'_> {
    fn publish(&mut self) {
        self.counter.inc_by(std::mem::take(&mut self.pending));
    }
}

impl Drop for Received<'_> {
    fn drop(&mut self) {
        self.publish();
    }
}

/// The block read at a time.
const BLOCK: usize = 1 << 20;
/// The longest line read whole; a longer one is not buffered but becomes a
/// dead letter with its first bytes, length and SHA-256, and the file goes on.
const MAX_LINE: usize = 16 << 20;

/// A line, or what is kept of one longer than the bound.
#[derive(Debug, PartialEq)]
enum Line<'a> {
    /// The line with its `\n` (the last one may lack it).
    Whole(&'a [u8]),
    /// A line longer than the bound: its first bytes (at most a dead letter's
    /// payload), its whole length and its SHA-256 in hex.
    Overlong { prefix: Vec<u8>, len: u64, sha256: String },
}

/// Lines of a file, read in large blocks and handed out in place: a capture is
/// mostly depth and bookTicker lines that are skipped, so no line is copied.
struct Lines<R> {
    inner: R,
    buf: Vec<u8>,
    /// Where the next line starts in `buf`.
    start: usize,
    /// End of the bytes read so far.
    end: usize,
    /// How far past `start` is known to hold no newline (a long line is not
    /// searched again from its start after each read).
    searched: usize,
    eof: bool,
    /// The buffer never grows beyond this.
    max: usize,
}

impl<R: Read> Lines<R> {
    fn new(inner: R, block: usize, max: usize) -> Self {
        Lines {
            inner,
            buf: vec![0; block.clamp(1, max)],
            start: 0,
            end: 0,
            searched: 0,
            eof: false,
            max,
        }
    }

    /// The next line, or `None` at the end.
    fn next_line(&mut self) -> std::io::Result<Option<Line<'_>>> {
        loop {
            let from = self.start + self.searched;
            if let Some(i) = memchr::memchr(b'\n', &self.buf[from..self.end]) {
                let line = self.start..from + i + 1;
                self.start = line.end;
                self.searched = 0;
                return Ok(Some(Line::Whole(&self.buf[line])));
            }
            self.searched = self.end - self.start;
            if self.eof {
                if self.start == self.end {
                    return Ok(None);
                }
                let line = self.start..self.end;
                self.start = self.end;
                self.searched = 0;
                return Ok(Some(Line::Whole(&self.buf[line])));
            }
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.end == self.buf.len() {
                if self.buf.len() >= self.max {
                    return self.overlong().map(Some);
                }
                self.buf.resize((self.buf.len() * 2).min(self.max), 0);
            }
            self.fill()?;
        }
    }

    /// Reads more after `end`; sets `eof` at the end of the input.
    fn fill(&mut self) -> std::io::Result<()> {
        loop {
            match self.inner.read(&mut self.buf[self.end..]) {
                Ok(0) => self.eof = true,
                Ok(n) => self.end += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            return Ok(());
        }
    }

    /// The buffer is full with one line: hashes it through to its newline (or
    /// the end of the input) without keeping more than its first bytes.
    fn overlong(&mut self) -> std::io::Result<Line<'static>> {
        use sha2::Digest;
        let prefix = self.buf[..self.end.min(tickpipe_schemas::MAX_LETTER_PAYLOAD)].to_vec();
        let mut hash = sha2::Sha256::new();
        let mut len = 0u64;
        loop {
            match memchr::memchr(b'\n', &self.buf[..self.end]) {
                Some(i) => {
                    hash.update(&self.buf[..=i]);
                    len += i as u64 + 1;
                    self.start = i + 1;
                    self.searched = 0;
                    break;
                }
                None => {
                    hash.update(&self.buf[..self.end]);
                    len += self.end as u64;
                    self.end = 0;
                    if self.eof {
                        self.start = 0;
                        self.searched = 0;
                        break;
                    }
                    self.fill()?;
                }
            }
        }
        let sha256 = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
        Ok(Line::Overlong { prefix, len, sha256 })
    }
}

/// Reads one file into batches of items.
fn read_file(
    path: &Path,
    c: &ReplayConfig,
    metrics: &crate::metrics::Metrics,
    tx: &mpsc::Sender<Vec<Item>>,
) -> Result<(), SourceError> {
    let mut lines = Lines::new(open(path)?, BLOCK, MAX_LINE);
    let mut format: Option<Format> = None;
    let mut batch = Vec::with_capacity(BATCH);
    let counter = metrics.received.with_label_values(&[COMPONENT]);
    let mut received = Received {
        counter: &counter,
        pending: 0,
    };
    // Records of one batch share an ingest time and the clock they are
    // validated against: reading a batch takes well under a millisecond, and
    // the clock costs more than the rest of a line. Both move on with every
    // batch: a replay outlasts --max-ahead-ms, and its later ingest times
    // would be judged against its start.
    let mut ingest = now_micros();
    let mut rules = Rules::at(ingest);
    let mut n = 0u64;
    while let Some(line) = lines
        .next_line()
        .map_err(|e| SourceError::Io(format!("{}:{}: {e}", path.display(), n + 1)))?
    {
        n += 1;
        let bytes = match line {
            Line::Whole(bytes) => bytes,
            Line::Overlong { prefix, len, sha256 } => {
                received.pending += 1;
                let reason = format!(
                    "{}:{n}: a line of {len} bytes, longer than the {MAX_LINE} a line may be; kept its first {} \
                     bytes; sha256 {sha256}",
                    path.display(),
                    prefix.len()
                );
                batch.push(Item::unparsed(COMPONENT, RecordSource::Replay, &prefix, reason));
                continue;
            }
        };
        if format == Some(Format::Capture) && not_published(bytes) {
            // Depth and bookTicker updates: most of a capture, none of ours.
            received.pending += 1;
            continue;
        }
        let text = match std::str::from_utf8(bytes) {
            Ok(t) => t.trim_end_matches(['\n', '\r']),
            Err(e) => {
                received.pending += 1;
                let reason = format!("{}:{n}: not UTF-8 ({e})", path.display());
                batch.push(Item::unparsed(COMPONENT, RecordSource::Replay, bytes, reason));
                continue;
            }
        };
        if text.trim().is_empty() {
            continue;
        }
        let fmt = match &format {
            Some(f) => f,
            None => {
                // A header row (`id,price,...`) or a capture's URL line is metadata.
                let first = text.as_bytes()[0];
                if !(first.is_ascii_digit() || first == b'-') {
                    continue;
                }
                format.insert(detect(path, text, c)?)
            }
        };
        received.pending += 1;
        let origin = Origin {
            venue: &c.venue,
            source: RecordSource::Replay,
            ingest_time: ingest,
        };
        let item = match fmt {
            Format::Capture => {
                let Some((ts, json)) = text.split_once(' ') else {
                    continue;
                };
                if !capture_time(ts.trim_end_matches(':')) {
                    continue;
                }
                match parse::ws_message(json.trim_start(), origin) {
                    Ok(WsEvent::Trade(t)) => Some(Item::from(t)),
                    Ok(WsEvent::Candle(k)) => Some(Item::from(k)),
                    Ok(WsEvent::Excluded(_, reason)) => Some(reject(json, reason, path, n)),
                    Ok(_) => None,
                    Err(reason) => Some(reject(json, reason, path, n)),
                }
            }
            Format::Trades { symbol } => Some(row(text, path, n, |f| {
                parse::trade_csv_row(f, symbol, origin).map(Item::from)
            })),
            Format::AggTrades { symbol } => Some(row(text, path, n, |f| {
                parse::agg_trade_csv_row(f, symbol, origin).map(Item::from)
            })),
            Format::Klines { symbol, interval } => match parse::kline_row(
                &text.split(',').collect::<Vec<_>>(),
                symbol,
                interval,
                origin,
                Micros::MAX,
            ) {
                Ok(Some(k)) => Some(Item::from(k)),
                Ok(None) => None,
                Err(reason) => Some(reject(text, reason, path, n)),
            },
        };
        if let Some(item) = item {
            batch.push(item.validated(&rules, COMPONENT, text.as_bytes()));
        }
        if batch.len() >= BATCH {
            received.publish();
            if tx.blocking_send(std::mem::take(&mut batch)).is_err() {
                return Ok(());
            }
            batch.reserve(BATCH);
            ingest = now_micros();
            rules = Rules::at(ingest);
        }
    }
    if !batch.is_empty() {
        let _ = tx.blocking_send(batch);
    }
    Ok(())
}

/// The time a capture line starts with: digits, with at most one decimal point
/// (`1723161253993183000`, `1634000912.8214064`).
fn capture_time(ts: &str) -> bool {
    let (whole, fraction) = ts.split_once('.').unwrap_or((ts, "0"));
    !whole.is_empty()
        && !fraction.is_empty()
        && whole.bytes().all(|b| b.is_ascii_digit())
        && fraction.bytes().all(|b| b.is_ascii_digit())
}

/// A capture line (`<ts> {"stream":"<name>",...`) of a stream this source
/// does not publish, told without validating or parsing the line.
fn not_published(line: &[u8]) -> bool {
    let Some(space) = line.iter().position(|b| *b == b' ') else {
        return false;
    };
    let json = &line[space + 1..];
    let Some(rest) = json.strip_prefix(b"{\"stream\":\"") else {
        return false;
    };
    let Some(end) = rest.iter().position(|b| *b == b'"') else {
        return false;
    };
    std::str::from_utf8(&rest[..end]).is_ok_and(|stream| !parse::published(stream))
}

fn row(text: &str, path: &Path, n: u64, f: impl FnOnce(&[&str]) -> Result<Item, String>) -> Item {
    let fields: Vec<&str> = text.split(',').collect();
    f(&fields).unwrap_or_else(|reason| reject(text, reason, path, n))
}

fn reject(text: &str, reason: String, path: &Path, n: u64) -> Item {
    Item::unparsed(
        COMPONENT,
        RecordSource::Replay,
        text.as_bytes(),
        format!("{}:{n}: {reason}", path.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that hands out at most `step` bytes per call, as pipes and
    /// decompressors do.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.step.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    fn all_lines(data: &[u8], step: usize, block: usize, max: usize) -> std::io::Result<Vec<Vec<u8>>> {
        let mut lines = Lines::new(Trickle { data, step }, block, max);
        let mut out = Vec::new();
        while let Some(l) = lines.next_line()? {
            match l {
                Line::Whole(l) => out.push(l.to_vec()),
                Line::Overlong { prefix, len, sha256 } => {
                    out.push(format!("overlong {len} {sha256} {}", String::from_utf8_lossy(&prefix)).into_bytes())
                }
            }
        }
        Ok(out)
    }

    #[test]
    fn lines_cross_block_boundaries_and_the_last_may_lack_its_newline() {
        let data = b"a\nbbbbbbbbbb\r\n\ncc\ndddddddddddddddd";
        let want: Vec<Vec<u8>> = [&b"a\n"[..], b"bbbbbbbbbb\r\n", b"\n", b"cc\n", b"dddddddddddddddd"]
            .iter()
            .map(|l| l.to_vec())
            .collect();
        for (step, block) in [(1, 1), (3, 4), (7, 2), (64, 64), (5, 1 << 20)] {
            assert_eq!(
                all_lines(data, step, block, 64).unwrap(),
                want,
                "step {step}, block {block}"
            );
        }
        assert!(all_lines(b"", 3, 4, 64).unwrap().is_empty());
    }

    #[test]
    fn a_line_longer_than_the_bound_is_kept_as_prefix_length_and_digest_and_reading_goes_on() {
        let long = b"0123456789abcdefXYZ\n";
        let digest = tickpipe_schemas::sha256_hex(long);
        for (step, block) in [(4, 2), (1, 1), (64, 64), (3, 16)] {
            let lines = all_lines(b"ok\n0123456789abcdefXYZ\nnext\n", step, block, 16).unwrap();
            assert_eq!(
                lines,
                vec![
                    b"ok\n".to_vec(),
                    format!("overlong 20 {digest} 0123456789abcdef").into_bytes(),
                    b"next\n".to_vec(),
                ],
                "step {step}, block {block}"
            );
        }
        // At the end of the input, without a newline.
        let lines = all_lines(b"0123456789abcdefXY", 5, 4, 16).unwrap();
        let digest = tickpipe_schemas::sha256_hex(b"0123456789abcdefXY");
        assert_eq!(
            lines,
            vec![format!("overlong 18 {digest} 0123456789abcdef").into_bytes()]
        );
        // Exactly at the bound, with its newline, is a line.
        assert_eq!(all_lines(b"0123456789abcde\n", 4, 2, 16).unwrap().len(), 1);
    }

    #[test]
    fn formats_are_told_apart() {
        let c = ReplayConfig::default();
        let p = Path::new("BTCUSDT-1m-2024-01-01.csv");
        assert_eq!(
            detect(
                p,
                "1704067200000,42283.58,42298.62,42261.02,42298.61,35.92724,1704067259999,1519079.0,1327,22.7,960.9,0",
                &c
            )
            .unwrap(),
            Format::Klines {
                symbol: "BTCUSDT".into(),
                interval: "1m".into()
            }
        );
        let p = Path::new("XRPETH-aggTrades-2019-10-11.csv");
        assert_eq!(
            detect(
                p,
                "13519807,0.00141342,23.00000000,15373518,15373518,1570752011620,True,True",
                &c
            )
            .unwrap(),
            Format::AggTrades {
                symbol: "XRPETH".into()
            }
        );
        let p = Path::new("BTCUSDT-trades-2025-01-01.csv");
        assert_eq!(
            detect(p, "4382983747,93576.00,0.00010,9.35760,1735689600052494,true,true", &c).unwrap(),
            Format::Trades {
                symbol: "BTCUSDT".into()
            }
        );
        assert_eq!(
            detect(p, r#"1723161253993183000 {"stream":"btcusdt@trade","data":{}}"#, &c).unwrap(),
            Format::Capture
        );
        assert_eq!(
            detect(p, r#"1634000912.8214064: {"stream":"x","data":{}}"#, &c).unwrap(),
            Format::Capture
        );
        assert!(detect(Path::new("data.csv"), "1,2,3,4,5,6,7", &c).is_err());
        for (ts, want) in [
            ("1723161253993183000", true),
            ("1634000912.8214064", true),
            ("1.", false),
            (".5", false),
            ("1.2.3", false),
            ("-1", false),
            ("1e9", false),
            ("", false),
        ] {
            assert_eq!(capture_time(ts), want, "{ts:?}");
        }
        assert!(detect(p, "1,2,3", &c).is_err());
    }
}
