//! Binance REST, politely: every response's `X-MBX-USED-WEIGHT-1M` is read and
//! requests wait for the next minute before the limit is reached; 429 and 418
//! stop all requests for `Retry-After` seconds (continuing after a 429 earns an
//! IP ban); 451 is a clear, final error; 5xx and network errors are retried
//! with backoff (every call here is a GET, so retrying is safe).

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::StatusCode;

use super::super::backoff::Backoff;
use super::super::{SourceError, Stop};
use crate::events::RateLimited;
use crate::metrics::Metrics;

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl RateState {
    /// How long to wait, at `now_ms`, before spending `weight`: until the next
    /// wall-clock minute (Binance's window) when this one's budget is nearly
    /// spent. What was used in an earlier minute no longer counts, since no
    /// answer may come to say so: nothing is asked while waiting.
    fn budget_wait(&self, weight: u32, now_ms: u64) -> Duration {
        let used = if self.used_minute == now_ms / 60_000 {
            self.used
        } else {
            0
        };
        // Nothing used yet: go, whatever the weight (a call heavier than the
        // budget would otherwise wait for ever).
        if used > 0 && used.saturating_add(weight) > self.limit / 10 * 9 {
            Duration::from_millis(60_000 - now_ms % 60_000 + 50)
        } else {
            Duration::ZERO
        }
    }
}

/// The longest `Retry-After` honoured: Binance's longest IP ban (418) is
/// 3 days; anything longer is a bad header.
pub const MAX_RETRY_AFTER_SECS: u64 = 3 * 24 * 3600;

/// How long every request waits after a 429 or 418: the `Retry-After` header
/// (seconds), 60 s without one, never more than [`MAX_RETRY_AFTER_SECS`] (a
/// larger value would also overflow the clock).
pub fn rate_limit_wait(retry_after: Option<u64>) -> Duration {
    Duration::from_secs(retry_after.unwrap_or(60).min(MAX_RETRY_AFTER_SECS))
}

/// A Binance REST client shared by gap repair and the klines backfill.
pub struct BinanceRest {
    http: reqwest::Client,
    base: String,
    metrics: Metrics,
    state: Mutex<RateState>,
    /// Most attempts per call before it fails (429 waits do not count).
    max_attempts: u32,
    /// Longest pause between two attempts.
    max_backoff: Duration,
}

#[derive(Debug)]
struct RateState {
    /// No request before this instant (a 429/418 `Retry-After`).
    blocked_until: Option<Instant>,
    /// The weight Binance last reported as used, and the wall-clock minute
    /// (since the epoch) it was reported in: a new minute starts from zero.
    used: u32,
    used_minute: u64,
    /// The weight limit per minute (6,000 unless configured otherwise).
    limit: u32,
}

impl BinanceRest {
    /// `max_backoff` is the longest pause between retries of a failing call.
    pub fn new(base: &str, weight_limit: u32, max_backoff: Duration, metrics: Metrics) -> Result<Self, SourceError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| SourceError::User(format!("cannot build an HTTP client: {e}")))?;
        Ok(BinanceRest {
            http,
            base: base.trim_end_matches('/').to_owned(),
            metrics,
            state: Mutex::new(RateState {
                blocked_until: None,
                used: 0,
                used_minute: 0,
                limit: weight_limit,
            }),
            max_attempts: 8,
            max_backoff,
        })
    }

    /// How long to wait before spending `weight`.
    fn wait_for(&self, weight: u32) -> Duration {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(until) = s.blocked_until {
            let d = until.saturating_duration_since(Instant::now());
            if !d.is_zero() {
                return d;
            }
        }
        s.budget_wait(weight, now_millis())
    }

    /// GETs `path` (with its query) and returns the body; `api` names the call
    /// in metrics, `weight` is its documented cost.
    pub async fn get(
        &self,
        api: &'static str,
        path: &str,
        weight: u32,
        stop: &mut Stop,
    ) -> Result<Vec<u8>, SourceError> {
        let url = format!("{}{}", self.base, path);
        let ceiling = self.max_backoff.max(Duration::from_millis(10));
        let mut backoff = Backoff::new(Duration::from_millis(250).min(ceiling), ceiling);
        let mut attempts = 0;
        loop {
            let wait = self.wait_for(weight);
            if !wait.is_zero() {
                tracing::info!(
                    api,
                    wait_ms = wait.as_millis() as u64,
                    "waiting for the Binance request budget"
                );
                if !stop.sleep(wait).await {
                    return Err(SourceError::Io("stopped".into()));
                }
                continue;
            }
            attempts += 1;
            let started = Instant::now();
            let result = self.http.get(&url).send().await;
            self.metrics
                .rest_latency
                .with_label_values(&[api])
                .observe(started.elapsed().as_secs_f64());
            let retry = match result {
                Ok(resp) => {
                    let status = resp.status();
                    let header = |name: &str| {
                        resp.headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.trim().parse::<u64>().ok())
                    };
                    if let Some(used) = header("x-mbx-used-weight-1m") {
                        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                        s.used = u32::try_from(used).unwrap_or(u32::MAX);
                        s.used_minute = now_millis() / 60_000;
                    }
                    let retry_after = header("retry-after");
                    match status {
                        s if s.is_success() => match resp.bytes().await {
                            Ok(body) => {
                                self.metrics.rest_requests.with_label_values(&[api, "ok"]).inc();
                                return Ok(body.to_vec());
                            }
                            // Cut off or timed out mid-answer: as retryable as a failed send.
                            Err(e) => format!("reading the answer: {e}"),
                        },
                        StatusCode::TOO_MANY_REQUESTS | StatusCode::IM_A_TEAPOT => {
                            let wait = rate_limit_wait(retry_after);
                            RateLimited {
                                api,
                                status: status.as_u16(),
                                wait,
                            }
                            .emit(&self.metrics);
                            self.state.lock().unwrap_or_else(|e| e.into_inner()).blocked_until =
                                Some(Instant::now() + wait);
                            attempts -= 1;
                            continue;
                        }
                        StatusCode::UNAVAILABLE_FOR_LEGAL_REASONS => {
                            self.metrics.rest_requests.with_label_values(&[api, "error"]).inc();
                            return Err(SourceError::External(format!(
                                "Binance refuses requests from this location (HTTP 451 at {url}); set \
                                 TICKPIPE_BINANCE_REST_URL (and TICKPIPE_BINANCE_WS_URL) to an endpoint you are allowed to use"
                            )));
                        }
                        s if s.is_server_error() => format!("HTTP {s}"),
                        s => {
                            self.metrics.rest_requests.with_label_values(&[api, "error"]).inc();
                            let body = resp.text().await.unwrap_or_default();
                            return Err(SourceError::External(format!(
                                "Binance {api} answered HTTP {s}: {body}"
                            )));
                        }
                    }
                }
                Err(e) => e.to_string(),
            };
            self.metrics.rest_requests.with_label_values(&[api, "error"]).inc();
            if attempts >= self.max_attempts {
                return Err(SourceError::Unavailable(format!(
                    "Binance {api} failed {attempts} times, last: {retry}"
                )));
            }
            let d = backoff.next_delay();
            tracing::warn!(api, error = %retry, retry_in_ms = d.as_millis() as u64, "Binance request failed");
            if !stop.sleep(d).await {
                return Err(SourceError::Io("stopped".into()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_waits_are_clamped() {
        assert_eq!(rate_limit_wait(None), Duration::from_secs(60));
        assert_eq!(rate_limit_wait(Some(7)), Duration::from_secs(7));
        assert_eq!(
            rate_limit_wait(Some(u64::MAX)),
            Duration::from_secs(MAX_RETRY_AFTER_SECS)
        );
    }

    #[test]
    fn the_weight_budget_is_per_wall_clock_minute() {
        let minute = 29_000_000u64;
        let at = |second: u64| minute * 60_000 + second * 1000;
        let state = RateState {
            blocked_until: None,
            used: 5_390,
            used_minute: minute,
            limit: 6_000,
        };
        // 5,390 + 25 passes 90% of 6,000: wait for the next minute, 50 ms in.
        assert_eq!(state.budget_wait(25, at(20)), Duration::from_millis(40_050));
        assert_eq!(state.budget_wait(4, at(20)), Duration::ZERO);
        // In the next minute (and any later one) the old figure is spent.
        assert_eq!(state.budget_wait(25, at(60)), Duration::ZERO);
        assert_eq!(state.budget_wait(25, at(3_600)), Duration::ZERO);
        // Even a figure past the limit (a 429's header) waits only for the minute.
        let over = RateState {
            used: u32::MAX,
            ..state
        };
        assert_eq!(over.budget_wait(25, at(59)), Duration::from_millis(1_050));
        assert_eq!(over.budget_wait(25, at(61)), Duration::ZERO);
        // A limit below one call's weight does not stop every call.
        let tiny = RateState {
            used: 0,
            limit: 20,
            ..state
        };
        assert_eq!(tiny.budget_wait(25, at(20)), Duration::ZERO);
    }
}
