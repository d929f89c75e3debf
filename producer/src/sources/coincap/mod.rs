//! CoinCap v3: assets (paginated), rates, exchanges and markets polled over REST
//! on their own intervals, and live prices over the WebSocket (seeded by the
//! first assets poll). A 401 stops the source with the variable to set; a 429
//! backs off; the retired v2 deprecation answer is a clear error.

use std::time::Duration;

use futures_util::StreamExt;
use tickpipe_ops::Secret;
use tickpipe_schemas::Source as RecordSource;
use tokio_tungstenite::tungstenite::Message;

use self::parse::{Entity, EnvelopeError, Times};
use super::backoff::Backoff;
use super::{SourceConfig, SourceError, Stop};
use crate::item::{now_micros, rules_now, Item};
use crate::publish::Publisher;

pub mod parse;

const REST: &str = "coincap-rest";
const WS: &str = "coincap-ws";

tickpipe_ops::section! {
    /// The `[coincap]` section: assets, rates, exchanges and markets polled over
    /// REST, prices streamed over the WebSocket.
    pub struct CoinCapConfig in "coincap" {
        /// CoinCap v3 REST base.
        rest_url: String [default_value = "https://rest.coincap.io/v3"],
        /// CoinCap WebSocket base; the source appends `/prices?assets=...`.
        ws_url: String [default_value = "wss://wss.coincap.io"],
        /// CoinCap API key, sent as a bearer token (never printed).
        api_key: Option<Secret> [hide_env_values = true],
        /// Seconds between polls of assets.
        assets_every_secs: u64 [default_value_t = 60],
        /// Seconds between polls of rates.
        rates_every_secs: u64 [default_value_t = 60],
        /// Seconds between polls of exchanges.
        exchanges_every_secs: u64 [default_value_t = 300],
        /// Seconds between polls of markets.
        markets_every_secs: u64 [default_value_t = 300],
        /// Rows per page (CoinCap allows up to 2,000; each 2,500 bytes costs a credit).
        page_size: u32 [default_value_t = 2000],
        /// Most pages per poll.
        max_pages: u32 [default_value_t = 5],
        /// Stream live prices over the WebSocket.
        prices: bool [default_value_t = true, action = clap::ArgAction::Set],
        /// Assets whose prices are streamed, comma-separated (`ALL` for every one).
        price_assets: Vec<String> [value_delimiter = ',', default_value = "bitcoin,ethereum,aave,stacks,arbitrum"],
        /// Longest wait after a failure, in ms.
        max_backoff_ms: u64 [default_value_t = 60_000],
    }
}

impl SourceConfig for CoinCapConfig {
    const NAME: &'static str = "coincap";

    fn check(&self) -> Result<(), SourceError> {
        if self.api_key.is_none() {
            return Err(SourceError::User(
                "CoinCap v3 needs an API key: set TICKPIPE_COINCAP_API_KEY (or [coincap] api_key in the config file)"
                    .into(),
            ));
        }
        Ok(())
    }

    async fn run(self, publisher: Publisher, stop: Stop) -> Result<(), SourceError> {
        let c = self;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| SourceError::User(format!("cannot build an HTTP client: {e}")))?;
        let mut tasks = tokio::task::JoinSet::new();
        for entity in Entity::ALL {
            tasks.spawn(poll(entity, c.clone(), http.clone(), publisher.clone(), stop.clone()));
        }
        if c.prices {
            tasks.spawn(prices(c.clone(), publisher.clone(), stop.clone()));
        }
        // The first error (a wrong key, a retired API) stops the whole source.
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tasks.abort_all();
                    return Err(e);
                }
                Err(e) if e.is_cancelled() => {}
                Err(e) => return Err(SourceError::Io(format!("CoinCap task failed: {e}"))),
            }
        }
        Ok(())
    }
}

fn every(c: &CoinCapConfig, e: Entity) -> Duration {
    Duration::from_secs(
        match e {
            Entity::Assets => c.assets_every_secs,
            Entity::Rates => c.rates_every_secs,
            Entity::Exchanges => c.exchanges_every_secs,
            Entity::Markets => c.markets_every_secs,
        }
        .max(1),
    )
}

/// Polls one entity until stopped.
async fn poll(
    entity: Entity,
    c: CoinCapConfig,
    http: reqwest::Client,
    publisher: Publisher,
    mut stop: Stop,
) -> Result<(), SourceError> {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_millis(c.max_backoff_ms));
    loop {
        let wait = match poll_once(entity, &c, &http, &publisher, &mut stop).await {
            Ok(()) => {
                backoff.reset();
                every(&c, entity)
            }
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Retry(why, after)) => {
                let d = after.unwrap_or_else(|| backoff.next_delay());
                tracing::warn!(entity = entity.path(), reason = %why, retry_in_ms = d.as_millis() as u64, "CoinCap poll failed");
                d
            }
        };
        if !stop.sleep(wait).await {
            return Ok(());
        }
    }
}

enum Failure {
    Fatal(SourceError),
    Retry(String, Option<Duration>),
}

async fn poll_once(
    entity: Entity,
    c: &CoinCapConfig,
    http: &reqwest::Client,
    publisher: &Publisher,
    stop: &mut Stop,
) -> Result<(), Failure> {
    let metrics = publisher.metrics();
    let key = c.api_key.as_ref().map(Secret::expose).unwrap_or_default();
    let paged = matches!(entity, Entity::Assets | Entity::Exchanges | Entity::Markets);
    let pages = if paged { c.max_pages.max(1) } else { 1 };
    for page in 0..pages {
        if stop.is_stopped() {
            return Ok(());
        }
        let mut url = format!("{}/{}", c.rest_url.trim_end_matches('/'), entity.path());
        if paged {
            url.push_str(&format!("?limit={}&offset={}", c.page_size, page * c.page_size));
        }
        let started = std::time::Instant::now();
        let resp = http.get(&url).bearer_auth(key).send().await;
        metrics
            .rest_latency
            .with_label_values(&["coincap"])
            .observe(started.elapsed().as_secs_f64());
        let resp = resp.map_err(|e| {
            metrics.rest_requests.with_label_values(&["coincap", "error"]).inc();
            Failure::Retry(e.to_string(), None)
        })?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            // Clamped: a bad header must not park the poller for years.
            .map(|s| Duration::from_secs(s.min(3600)));
        match status.as_u16() {
            200..=299 => metrics.rest_requests.with_label_values(&["coincap", "ok"]).inc(),
            401 | 403 => {
                metrics.rest_requests.with_label_values(&["coincap", "error"]).inc();
                return Err(Failure::Fatal(SourceError::User(format!(
                    "CoinCap rejected the API key (HTTP {status}); set TICKPIPE_COINCAP_API_KEY to a valid key from https://pro.coincap.io"
                ))));
            }
            429 => {
                metrics
                    .rest_requests
                    .with_label_values(&["coincap", "rate_limited"])
                    .inc();
                return Err(Failure::Retry("rate limited (HTTP 429)".into(), retry_after));
            }
            _ => {
                metrics.rest_requests.with_label_values(&["coincap", "error"]).inc();
                let body = resp.text().await.unwrap_or_default();
                return Err(Failure::Retry(
                    format!("HTTP {status}: {}", body.chars().take(200).collect::<String>()),
                    None,
                ));
            }
        }
        let body = resp.bytes().await.map_err(|e| Failure::Retry(e.to_string(), None))?;
        metrics.received.with_label_values(&[REST]).inc();
        let (rows, ts) = match parse::envelope(&body) {
            Ok(v) => v,
            Err(e @ EnvelopeError::Deprecated(_)) => return Err(Failure::Fatal(SourceError::External(e.to_string()))),
            Err(e) => {
                publisher
                    .publish(Item::unparsed(REST, RecordSource::Coincap, &body, e.to_string()))
                    .await;
                return Err(Failure::Retry(e.to_string(), None));
            }
        };
        let times = Times {
            response: ts,
            ingest: now_micros(),
            source: RecordSource::Coincap,
        };
        let rules = rules_now();
        let n = rows.len();
        for row in rows {
            let parsed = match entity {
                Entity::Assets => parse::asset(&row, times).map(Item::from),
                Entity::Rates => parse::rate(&row, times).map(Item::from),
                Entity::Exchanges => parse::exchange(&row, times).map(Item::from),
                Entity::Markets => parse::market(&row, times).map(Item::from),
            };
            let raw = row.to_string().into_bytes();
            let item = match parsed {
                Ok(item) => item.validated(&rules, REST, &raw),
                Err(reason) => Item::unparsed(REST, RecordSource::Coincap, &raw, reason),
            };
            publisher.publish(item).await;
        }
        if n < c.page_size as usize {
            break;
        }
    }
    Ok(())
}

/// Streams prices until stopped, reconnecting with backoff.
async fn prices(c: CoinCapConfig, publisher: Publisher, mut stop: Stop) -> Result<(), SourceError> {
    let metrics = publisher.metrics().clone();
    let key = c.api_key.as_ref().map(Secret::expose).unwrap_or_default();
    let assets = if c.price_assets.is_empty() {
        "ALL".to_owned()
    } else {
        c.price_assets.join(",")
    };
    let url = format!("{}/prices?assets={assets}&apiKey={key}", c.ws_url.trim_end_matches('/'));
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_millis(c.max_backoff_ms));
    let mut first = true;
    loop {
        if !first {
            metrics.reconnects.with_label_values(&[WS]).inc();
        }
        first = false;
        let connected = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(15), tokio_tungstenite::connect_async(url.as_str())) => r,
            _ = stop.wait() => return Ok(()),
        };
        let mut ws = match connected {
            Ok(Ok((ws, _))) => ws,
            // The error text may contain the URL, and with it the key: say less.
            Ok(Err(_)) | Err(_) => {
                let d = backoff.next_delay();
                tracing::warn!(
                    retry_in_ms = d.as_millis() as u64,
                    "CoinCap prices socket: connect failed"
                );
                if !stop.sleep(d).await {
                    return Ok(());
                }
                continue;
            }
        };
        loop {
            let msg = tokio::select! {
                m = ws.next() => m,
                _ = stop.wait() => return Ok(()),
            };
            let text = match msg {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => continue,
            };
            backoff.reset();
            metrics.received.with_label_values(&[WS]).inc();
            let times = Times {
                response: now_micros(),
                ingest: now_micros(),
                source: RecordSource::Coincap,
            };
            match parse::prices(&text, times) {
                Err(reason) if text.trim_start().starts_with("Unauthorized") => {
                    return Err(SourceError::User(reason));
                }
                Err(reason) => {
                    publisher
                        .publish(Item::unparsed(WS, RecordSource::Coincap, text.as_bytes(), reason))
                        .await
                }
                Ok(prices) => {
                    let rules = rules_now();
                    for p in prices {
                        let item = match p {
                            Ok(p) => Item::from(p).validated(&rules, WS, text.as_bytes()),
                            Err(reason) => Item::unparsed(WS, RecordSource::Coincap, text.as_bytes(), reason),
                        };
                        publisher.publish(item).await;
                    }
                }
            }
        }
        let d = backoff.next_delay();
        tracing::warn!(retry_in_ms = d.as_millis() as u64, "CoinCap prices socket closed");
        if !stop.sleep(d).await {
            return Ok(());
        }
    }
}
