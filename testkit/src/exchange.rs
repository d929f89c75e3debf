//! Local servers on 127.0.0.1 that impersonate Binance and CoinCap, replaying
//! real recordings with scripted faults, so the producer's live code paths are
//! tested without the internet.
//!
//! [`FakeBinance`] streams recorded combined-stream messages to every connected
//! WebSocket subscriber (only the streams it asked for), and serves the REST
//! endpoints the producer uses from the same recording. It emits only while a
//! subscriber is connected, so a test loses exactly what its faults say.
//! [`FakeCoinCap`] serves recorded lists with v3 paging and key checks, and
//! price frames on its WebSocket.

// Handlers return ready HTTP responses as their error values; their size does
// not matter in test servers.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::{SinkExt, StreamExt};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response as WsResponse};
use tokio_tungstenite::tungstenite::Message;

/// What [`FakeBinance`] replays and how it misbehaves.
#[derive(Debug, Clone, Default)]
pub struct BinanceScript {
    /// Raw combined-stream messages in order, as recorded (all streams; each
    /// connection gets only the ones it subscribed to).
    pub messages: Vec<String>,
    /// Faults, by index into `messages` (a fault fires just before that message).
    pub faults: Vec<WsFault>,
    /// Messages emitted per second; 0 = as fast as the subscribers take them.
    pub rate: u32,
    /// Scripted REST failures.
    pub rest_faults: Vec<RestFault>,
    /// Klines served by `/api/v3/klines` per (SYMBOL, interval): 12-value rows.
    pub klines: BTreeMap<(String, String), Vec<Value>>,
    /// `@trade` ids never sent on the socket (REST still has them), per symbol.
    pub skip_trades: Vec<(String, RangeInclusive<i64>)>,
}

impl BinanceScript {
    /// Leaves these trade ids of `symbol` out of the WebSocket stream: a gap
    /// without a disconnect, which only REST can fill.
    pub fn without_trades(mut self, symbol: &str, ids: RangeInclusive<i64>) -> Self {
        self.skip_trades.push((symbol.to_uppercase(), ids));
        self
    }
}

/// A WebSocket misbehaviour.
#[derive(Debug, Clone)]
pub enum WsFault {
    /// Close every connection abruptly (no close frame) and skip `lose`
    /// messages: they were sent while the client was away.
    Drop { at: usize, lose: usize },
    /// Send a text frame that is not a valid message.
    Malformed { at: usize, text: String },
    /// Send a Ping with this payload (the Pongs received are in `pongs()`).
    Ping { at: usize, payload: Vec<u8> },
    /// Announce `serverShutdown` on the open connections, and close them once a
    /// newer connection has received `overlap` messages (or after 10 s).
    ServerShutdown { at: usize, overlap: usize },
    /// Send nothing for this long, keeping the sockets open.
    Stall { at: usize, millis: u64 },
}

impl WsFault {
    fn at(&self) -> usize {
        match self {
            WsFault::Drop { at, .. }
            | WsFault::Malformed { at, .. }
            | WsFault::Ping { at, .. }
            | WsFault::ServerShutdown { at, .. }
            | WsFault::Stall { at, .. } => *at,
        }
    }
}

/// A REST misbehaviour.
#[derive(Debug, Clone)]
pub enum RestFault {
    /// The next `times` requests to `path` answer 429 with `Retry-After`.
    TooMany {
        path: String,
        times: u32,
        retry_after_secs: u64,
    },
    /// Every request to `path` answers `status` with `body`.
    Status { path: String, status: u16, body: String },
}

/// One REST request as the server saw it.
#[derive(Debug, Clone)]
pub struct RestCall {
    pub path: String,
    /// The query string, without any `apiKey`.
    pub query: String,
    pub status: u16,
    /// An API key came with the request (header or query); the key itself is not kept.
    pub authorized: bool,
    pub at: Instant,
}

enum Out {
    Text(String),
    Ping(Vec<u8>),
    /// Drop the socket without a close frame.
    Kill,
}

struct Sub {
    streams: HashSet<String>,
    tx: mpsc::UnboundedSender<Out>,
    received: usize,
    /// Set by `serverShutdown`: close after a newer connection got this many messages.
    doomed: Option<(usize, Instant)>,
}

#[derive(Default)]
struct WsState {
    subs: HashMap<u64, Sub>,
    next_id: u64,
    attempts: Vec<Instant>,
    connections: usize,
    refused: usize,
    pongs: Vec<Vec<u8>>,
    finished: bool,
}

struct Shared {
    ws: Mutex<WsState>,
    joined: Notify,
    rest: Mutex<RestState>,
}

#[derive(Default)]
struct RestState {
    log: Vec<RestCall>,
    too_many_left: HashMap<String, u32>,
    weight_minute: u64,
    weight_used: u32,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A Binance impersonator on two loopback ports (WebSocket and REST).
pub struct FakeBinance {
    ws_addr: SocketAddr,
    rest_addr: SocketAddr,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for FakeBinance {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The JSON `data` of a combined-stream message and its stream name.
fn split_stream(msg: &str) -> Option<(String, Value)> {
    let v: Value = serde_json::from_str(msg).ok()?;
    Some((v.get("stream")?.as_str()?.to_owned(), v.get("data")?.clone()))
}

impl FakeBinance {
    pub async fn start(script: BinanceScript) -> FakeBinance {
        let shared = Arc::new(Shared {
            ws: Mutex::new(WsState::default()),
            joined: Notify::new(),
            rest: Mutex::new(RestState::default()),
        });
        let ws_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind ws");
        let rest_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind rest");
        let ws_addr = ws_listener.local_addr().expect("addr");
        let rest_addr = rest_listener.local_addr().expect("addr");
        let script = Arc::new(script);
        let mut tasks = Vec::new();
        let s = shared.clone();
        tasks.push(tokio::spawn(async move {
            while let Ok((tcp, _)) = ws_listener.accept().await {
                tokio::spawn(binance_connection(tcp, s.clone()));
            }
        }));
        tasks.push(tokio::spawn(broadcast(script.clone(), shared.clone())));
        let app = binance_rest(script, shared.clone());
        tasks.push(tokio::spawn(async move {
            let _ = axum::serve(rest_listener, app).await;
        }));
        FakeBinance {
            ws_addr,
            rest_addr,
            shared,
            tasks,
        }
    }

    /// `ws://127.0.0.1:PORT`; clients append `/stream?streams=...`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.ws_addr)
    }

    /// `http://127.0.0.1:PORT`; clients append `/api/v3/...`.
    pub fn rest_url(&self) -> String {
        format!("http://{}", self.rest_addr)
    }

    /// Payloads of the Pongs received.
    pub fn pongs(&self) -> Vec<Vec<u8>> {
        lock(&self.shared.ws).pongs.clone()
    }

    /// WebSocket handshakes accepted.
    pub fn connections(&self) -> usize {
        lock(&self.shared.ws).connections
    }

    /// Handshakes refused for exceeding 300 attempts in 5 minutes.
    pub fn refused_connections(&self) -> usize {
        lock(&self.shared.ws).refused
    }

    /// True once every message has been emitted.
    pub fn finished(&self) -> bool {
        lock(&self.shared.ws).finished
    }

    /// Every REST request so far.
    pub fn rest_log(&self) -> Vec<RestCall> {
        lock(&self.shared.rest).log.clone()
    }
}

/// Emits the recording to the subscribers, applying the faults.
async fn broadcast(script: Arc<BinanceScript>, shared: Arc<Shared>) {
    let gap = (script.rate > 0).then(|| Duration::from_secs_f64(1.0 / script.rate as f64));
    let mut skip_until = 0usize;
    for (i, msg) in script.messages.iter().enumerate() {
        // Emit only while someone listens.
        loop {
            let joined = shared.joined.notified();
            if !lock(&shared.ws).subs.is_empty() {
                break;
            }
            joined.await;
        }
        for fault in script.faults.iter().filter(|f| f.at() == i) {
            match fault {
                WsFault::Drop { lose, .. } => {
                    let mut ws = lock(&shared.ws);
                    for (_, sub) in ws.subs.drain() {
                        let _ = sub.tx.send(Out::Kill);
                    }
                    skip_until = i + lose;
                }
                WsFault::Malformed { text, .. } => {
                    for sub in lock(&shared.ws).subs.values() {
                        let _ = sub.tx.send(Out::Text(text.clone()));
                    }
                }
                WsFault::Ping { payload, .. } => {
                    for sub in lock(&shared.ws).subs.values() {
                        let _ = sub.tx.send(Out::Ping(payload.clone()));
                    }
                }
                WsFault::ServerShutdown { overlap, .. } => {
                    let now = Instant::now();
                    let text = json!({"e": "serverShutdown", "E": now_ms()}).to_string();
                    for sub in lock(&shared.ws).subs.values_mut() {
                        let _ = sub.tx.send(Out::Text(text.clone()));
                        sub.doomed = Some((*overlap, now));
                    }
                }
                WsFault::Stall { millis, .. } => tokio::time::sleep(Duration::from_millis(*millis)).await,
            }
        }
        if i < skip_until {
            continue;
        }
        if let Some((stream, data)) = split_stream(msg) {
            let skipped = data.get("e").and_then(Value::as_str) == Some("trade")
                && script.skip_trades.iter().any(|(sym, ids)| {
                    data.get("s").and_then(Value::as_str) == Some(sym.as_str())
                        && data.get("t").and_then(Value::as_i64).is_some_and(|t| ids.contains(&t))
                });
            let mut ws = lock(&shared.ws);
            if !skipped {
                for sub in ws.subs.values_mut() {
                    if sub.streams.contains(&stream) {
                        sub.received += 1;
                        let _ = sub.tx.send(Out::Text(msg.clone()));
                    }
                }
            }
            // Close announced connections once a newer one has taken over.
            let fresh_max = ws
                .subs
                .values()
                .filter(|s| s.doomed.is_none())
                .map(|s| s.received)
                .max();
            let ids: Vec<u64> = ws
                .subs
                .iter()
                .filter(|(_, s)| {
                    s.doomed.is_some_and(|(overlap, since)| {
                        fresh_max.is_some_and(|m| m >= overlap) || since.elapsed() >= Duration::from_secs(10)
                    })
                })
                .map(|(id, _)| *id)
                .collect();
            for id in ids {
                if let Some(sub) = ws.subs.remove(&id) {
                    let _ = sub.tx.send(Out::Kill);
                }
            }
        }
        if let Some(gap) = gap {
            tokio::time::sleep(gap).await;
        } else if i % 256 == 0 {
            tokio::task::yield_now().await;
        }
    }
    lock(&shared.ws).finished = true;
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// One WebSocket client of [`FakeBinance`].
async fn binance_connection(tcp: tokio::net::TcpStream, shared: Arc<Shared>) {
    let mut uri: Option<Uri> = None;
    let limited = {
        let mut ws = lock(&shared.ws);
        let now = Instant::now();
        ws.attempts
            .retain(|t| now.duration_since(*t) < Duration::from_secs(300));
        ws.attempts.push(now);
        ws.attempts.len() > 300
    };
    let callback = |req: &Request, resp: WsResponse| -> Result<WsResponse, ErrorResponse> {
        uri = Some(req.uri().clone());
        if limited {
            let mut e = ErrorResponse::new(Some("too many connection attempts".into()));
            *e.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            return Err(e);
        }
        Ok(resp)
    };
    let ws = tokio_tungstenite::accept_hdr_async(tcp, callback).await;
    if limited {
        lock(&shared.ws).refused += 1;
        return;
    }
    let Ok(mut ws) = ws else { return };
    let streams: HashSet<String> = uri
        .as_ref()
        .and_then(|u| u.query())
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("streams=")))
        .map(|s| s.split('/').map(str::to_owned).collect())
        .unwrap_or_default();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let id = {
        let mut st = lock(&shared.ws);
        st.connections += 1;
        st.next_id += 1;
        let id = st.next_id;
        st.subs.insert(
            id,
            Sub {
                streams,
                tx,
                received: 0,
                doomed: None,
            },
        );
        id
    };
    shared.joined.notify_waiters();
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(Out::Text(t)) => {
                    if ws.send(Message::text(t)).await.is_err() {
                        break;
                    }
                }
                Some(Out::Ping(p)) => {
                    if ws.send(Message::Ping(p.into())).await.is_err() {
                        break;
                    }
                }
                // Dropping the stream closes the TCP connection without a close frame.
                Some(Out::Kill) | None => break,
            },
            incoming = ws.next() => match incoming {
                Some(Ok(Message::Pong(p))) => lock(&shared.ws).pongs.push(p.to_vec()),
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                    if v.get("method").is_some() {
                        let reply = json!({"result": null, "id": v.get("id").cloned().unwrap_or(Value::Null)});
                        if ws.send(Message::text(reply.to_string())).await.is_err() {
                            break;
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
        }
    }
    lock(&shared.ws).subs.remove(&id);
}

type Params = Query<HashMap<String, String>>;

/// Binance's REST endpoints, served from the recording.
fn binance_rest(script: Arc<BinanceScript>, shared: Arc<Shared>) -> axum::Router {
    // Every @trade and @aggTrade of the recording, by symbol, in id order.
    let mut trades: HashMap<String, BTreeMap<i64, Value>> = HashMap::new();
    let mut aggs: HashMap<String, BTreeMap<i64, Value>> = HashMap::new();
    for m in &script.messages {
        let Some((_, d)) = split_stream(m) else { continue };
        let sym = d.get("s").and_then(Value::as_str).unwrap_or_default().to_owned();
        match d.get("e").and_then(Value::as_str) {
            Some("trade") => {
                let (Some(id), Some(p), Some(q)) = (
                    d.get("t").and_then(Value::as_i64),
                    d.get("p").and_then(Value::as_str),
                    d.get("q").and_then(Value::as_str),
                ) else {
                    continue;
                };
                let quote = match (p.parse::<Decimal>(), q.parse::<Decimal>()) {
                    (Ok(p), Ok(q)) => (p * q).normalize().to_string(),
                    _ => "0".into(),
                };
                let row = json!({
                    "id": id, "price": p, "qty": q, "quoteQty": quote,
                    "time": d.get("T"), "isBuyerMaker": d.get("m"), "isBestMatch": d.get("M").cloned().unwrap_or(Value::Bool(true)),
                });
                trades.entry(sym).or_default().insert(id, row);
            }
            Some("aggTrade") => {
                let Some(id) = d.get("a").and_then(Value::as_i64) else {
                    continue;
                };
                let row = json!({
                    "a": id, "p": d.get("p"), "q": d.get("q"), "f": d.get("f"), "l": d.get("l"),
                    "T": d.get("T"), "m": d.get("m"), "M": d.get("M").cloned().unwrap_or(Value::Bool(true)),
                });
                aggs.entry(sym).or_default().insert(id, row);
            }
            _ => {}
        }
    }
    let symbols: Vec<String> = trades
        .keys()
        .chain(aggs.keys())
        .cloned()
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let ctx = Arc::new(RestCtx {
        script,
        shared,
        trades,
        aggs,
        symbols,
    });
    axum::Router::new()
        .route("/api/v3/historicalTrades", get(historical_trades))
        .route("/api/v3/aggTrades", get(agg_trades))
        .route("/api/v3/klines", get(klines))
        .route("/api/v3/exchangeInfo", get(exchange_info))
        .route("/api/v3/ping", get(ping))
        .with_state(ctx)
}

struct RestCtx {
    script: Arc<BinanceScript>,
    shared: Arc<Shared>,
    trades: HashMap<String, BTreeMap<i64, Value>>,
    aggs: HashMap<String, BTreeMap<i64, Value>>,
    symbols: Vec<String>,
}

impl RestCtx {
    /// Applies scripted faults and the weight budget; `Err` is the response to send.
    fn admit(&self, path: &str, query: &str, weight: u32) -> Result<u32, Response> {
        let mut rest = lock(&self.shared.rest);
        let minute = (now_ms() / 60_000) as u64;
        if rest.weight_minute != minute {
            rest.weight_minute = minute;
            rest.weight_used = 0;
        }
        rest.weight_used += weight;
        let used = rest.weight_used;
        let mut status = 200;
        let mut fault: Option<Response> = None;
        for f in &self.script.rest_faults {
            match f {
                RestFault::TooMany {
                    path: p,
                    times,
                    retry_after_secs,
                } if p == path => {
                    let left = rest.too_many_left.entry(p.clone()).or_insert(*times);
                    if *left > 0 {
                        *left -= 1;
                        status = 429;
                        fault = Some(
                            (
                                StatusCode::TOO_MANY_REQUESTS,
                                [("retry-after", retry_after_secs.to_string()), ("x-mbx-used-weight-1m", used.to_string())],
                                json!({"code": -1003, "msg": "Too many requests; current limit of IP is 6000 requests per minute."}).to_string(),
                            )
                                .into_response(),
                        );
                    }
                }
                RestFault::Status {
                    path: p,
                    status: s,
                    body,
                } if p == path => {
                    status = *s;
                    let code = StatusCode::from_u16(*s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                    fault = Some((code, body.clone()).into_response());
                }
                _ => {}
            }
        }
        rest.log.push(RestCall {
            path: path.to_owned(),
            query: query.to_owned(),
            status,
            authorized: false,
            at: Instant::now(),
        });
        match fault {
            Some(r) => Err(r),
            None => Ok(used),
        }
    }
}

fn query_string(q: &HashMap<String, String>) -> String {
    let mut kv: Vec<String> = q.iter().map(|(k, v)| format!("{k}={v}")).collect();
    kv.sort();
    kv.join("&")
}

fn bad_request(msg: &str) -> Response {
    (StatusCode::BAD_REQUEST, json!({"code": -1100, "msg": msg}).to_string()).into_response()
}

fn limit_of(q: &HashMap<String, String>, default: usize) -> Result<usize, Response> {
    match q.get("limit").map(|l| l.parse::<usize>()) {
        None => Ok(default),
        Some(Ok(l)) if (1..=1000).contains(&l) => Ok(l),
        Some(_) => Err(bad_request(
            "Illegal characters found in parameter 'limit'; legal range is '1..1000'.",
        )),
    }
}

fn ok_json(used: u32, body: Value) -> Response {
    (
        StatusCode::OK,
        [("x-mbx-used-weight-1m", used.to_string())],
        body.to_string(),
    )
        .into_response()
}

fn from_id_page(rows: Option<&BTreeMap<i64, Value>>, q: &HashMap<String, String>) -> Result<Value, Response> {
    let limit = limit_of(q, 500)?;
    let from = match q.get("fromId").map(|f| f.parse::<i64>()) {
        None => 0,
        Some(Ok(f)) => f,
        Some(Err(_)) => return Err(bad_request("Illegal characters found in parameter 'fromId'.")),
    };
    let page: Vec<Value> = rows
        .map(|r| r.range(from..).take(limit).map(|(_, v)| v.clone()).collect())
        .unwrap_or_default();
    Ok(Value::Array(page))
}

async fn historical_trades(State(ctx): State<Arc<RestCtx>>, Query(q): Params) -> Response {
    let used = match ctx.admit("/api/v3/historicalTrades", &query_string(&q), 25) {
        Ok(u) => u,
        Err(r) => return r,
    };
    let sym = q.get("symbol").cloned().unwrap_or_default();
    match from_id_page(ctx.trades.get(&sym), &q) {
        Ok(v) => ok_json(used, v),
        Err(r) => r,
    }
}

async fn agg_trades(State(ctx): State<Arc<RestCtx>>, Query(q): Params) -> Response {
    let used = match ctx.admit("/api/v3/aggTrades", &query_string(&q), 4) {
        Ok(u) => u,
        Err(r) => return r,
    };
    let sym = q.get("symbol").cloned().unwrap_or_default();
    match from_id_page(ctx.aggs.get(&sym), &q) {
        Ok(v) => ok_json(used, v),
        Err(r) => r,
    }
}

async fn klines(State(ctx): State<Arc<RestCtx>>, Query(q): Params) -> Response {
    let used = match ctx.admit("/api/v3/klines", &query_string(&q), 2) {
        Ok(u) => u,
        Err(r) => return r,
    };
    let limit = match limit_of(&q, 500) {
        Ok(l) => l,
        Err(r) => return r,
    };
    let num = |k: &str| q.get(k).and_then(|v| v.parse::<i64>().ok());
    let (start, end) = (num("startTime").unwrap_or(0), num("endTime").unwrap_or(i64::MAX));
    let key = (
        q.get("symbol").cloned().unwrap_or_default(),
        q.get("interval").cloned().unwrap_or_default(),
    );
    let rows: Vec<Value> = ctx
        .script
        .klines
        .get(&key)
        .map(|rows| {
            rows.iter()
                .filter(|r| r.get(0).and_then(Value::as_i64).is_some_and(|t| t >= start && t <= end))
                .take(limit)
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    ok_json(used, Value::Array(rows))
}

async fn exchange_info(State(ctx): State<Arc<RestCtx>>) -> Response {
    let used = match ctx.admit("/api/v3/exchangeInfo", "", 20) {
        Ok(u) => u,
        Err(r) => return r,
    };
    let symbols: Vec<Value> = ctx
        .symbols
        .iter()
        .map(|s| json!({"symbol": s, "status": "TRADING"}))
        .collect();
    ok_json(
        used,
        json!({
            "timezone": "UTC",
            "serverTime": now_ms(),
            "rateLimits": [{"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 6000}],
            "symbols": symbols,
        }),
    )
}

async fn ping(State(ctx): State<Arc<RestCtx>>) -> Response {
    match ctx.admit("/api/v3/ping", "", 1) {
        Ok(u) => ok_json(u, json!({})),
        Err(r) => r,
    }
}

/// The messages of a raw WebSocket capture, in either recorder's format:
/// `<ns> <json>` (hftbacktest) or `<secs>: <json>` (cryptofeed, whose first line
/// is the URL). Lines that are not stream messages (the URL line, a REST
/// snapshot) are left out.
pub fn capture_messages(path: &Path) -> Vec<String> {
    crate::real::lines(path)
        .into_iter()
        .filter_map(|line| {
            let (ts, json) = line.split_once(' ')?;
            ts.trim_end_matches(':').parse::<f64>().ok()?;
            let json = json.trim_start();
            (json.starts_with('{') && json.contains("\"stream\"")).then(|| json.to_owned())
        })
        .collect()
}

/// What [`FakeCoinCap`] serves.
#[derive(Debug, Clone, Default)]
pub struct CoinCapScript {
    /// The key the server accepts (`Authorization: Bearer` or `?apiKey=`).
    pub api_key: String,
    /// The `data` lists of `/assets`, `/rates`, `/exchanges`, `/markets`.
    pub assets: Vec<Value>,
    pub rates: Vec<Value>,
    pub exchanges: Vec<Value>,
    pub markets: Vec<Value>,
    /// Answer every call with the retired v2 API's deprecation notice.
    pub deprecated: bool,
    /// The next `too_many` calls answer 429.
    pub too_many: u32,
    /// Frames sent in order on `/prices`, after which the socket stays open.
    pub price_frames: Vec<String>,
}

/// A CoinCap v3 impersonator: REST on one loopback port, prices on another.
pub struct FakeCoinCap {
    rest_addr: SocketAddr,
    ws_addr: SocketAddr,
    log: Arc<Mutex<Vec<RestCall>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for FakeCoinCap {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct CoinCapCtx {
    script: CoinCapScript,
    too_many_left: Mutex<u32>,
    log: Arc<Mutex<Vec<RestCall>>>,
}

impl FakeCoinCap {
    pub async fn start(script: CoinCapScript) -> FakeCoinCap {
        let rest_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind rest");
        let ws_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind ws");
        let rest_addr = rest_listener.local_addr().expect("addr");
        let ws_addr = ws_listener.local_addr().expect("addr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let ctx = Arc::new(CoinCapCtx {
            too_many_left: Mutex::new(script.too_many),
            script,
            log: log.clone(),
        });
        let app = axum::Router::new()
            .route("/v3/{entity}", get(coincap_list))
            .with_state(ctx.clone());
        let mut tasks = vec![tokio::spawn(async move {
            let _ = axum::serve(rest_listener, app).await;
        })];
        tasks.push(tokio::spawn(async move {
            while let Ok((tcp, _)) = ws_listener.accept().await {
                tokio::spawn(coincap_prices(tcp, ctx.clone()));
            }
        }));
        FakeCoinCap {
            rest_addr,
            ws_addr,
            log,
            tasks,
        }
    }

    /// `http://127.0.0.1:PORT/v3`.
    pub fn rest_url(&self) -> String {
        format!("http://{}/v3", self.rest_addr)
    }

    /// `ws://127.0.0.1:PORT`; clients append `/prices?assets=...&apiKey=...`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.ws_addr)
    }

    pub fn rest_log(&self) -> Vec<RestCall> {
        lock(&self.log).clone()
    }
}

async fn coincap_list(
    State(ctx): State<Arc<CoinCapCtx>>,
    axum::extract::Path(entity): axum::extract::Path<String>,
    headers: HeaderMap,
    Query(q): Params,
) -> Response {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let key = bearer.or_else(|| q.get("apiKey").cloned());
    let mut shown = q.clone();
    shown.remove("apiKey");
    let ts = now_ms();
    let key_ok = key.as_deref() == Some(ctx.script.api_key.as_str());
    let throttled = key_ok && take_one(&ctx.too_many_left);
    let (status, body) = if !key_ok {
        (401, json!({"error": "Unauthorized", "timestamp": ts}))
    } else if throttled {
        (429, json!({"error": "Too many requests", "timestamp": ts}))
    } else if ctx.script.deprecated {
        (
            200,
            json!({"data": {"message": "We have deprecated this API (v2). Please use https://rest.coincap.io/v3"}, "timestamp": ts}),
        )
    } else {
        let list = match entity.as_str() {
            "assets" => &ctx.script.assets,
            "rates" => &ctx.script.rates,
            "exchanges" => &ctx.script.exchanges,
            "markets" => &ctx.script.markets,
            _ => {
                let body = json!({"error": format!("{entity} not found"), "timestamp": ts});
                lock(&ctx.log).push(RestCall {
                    path: format!("/v3/{entity}"),
                    query: query_string(&shown),
                    status: 404,
                    authorized: key.is_some(),
                    at: Instant::now(),
                });
                return (StatusCode::NOT_FOUND, body.to_string()).into_response();
            }
        };
        // `/rates` has no paging; the others default to 100 rows.
        let paged = entity != "rates";
        let limit = q
            .get("limit")
            .and_then(|l| l.parse::<usize>().ok())
            .unwrap_or(if paged { 100 } else { usize::MAX });
        let offset = q.get("offset").and_then(|o| o.parse::<usize>().ok()).unwrap_or(0);
        if paged && limit > 2000 {
            (400, json!({"error": "limit exceeds 2000", "timestamp": ts}))
        } else {
            let page: Vec<Value> = list.iter().skip(offset).take(limit).cloned().collect();
            (200, json!({"data": page, "timestamp": ts}))
        }
    };
    lock(&ctx.log).push(RestCall {
        path: format!("/v3/{entity}"),
        query: query_string(&shown),
        status,
        authorized: key.is_some(),
        at: Instant::now(),
    });
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, body.to_string()).into_response()
}

/// Takes one from a countdown; false once it is at zero.
fn take_one(left: &Mutex<u32>) -> bool {
    let mut left = lock(left);
    let hit = *left > 0;
    *left = left.saturating_sub(1);
    hit
}

async fn coincap_prices(tcp: tokio::net::TcpStream, ctx: Arc<CoinCapCtx>) {
    let mut uri: Option<Uri> = None;
    let callback = |req: &Request, resp: WsResponse| -> Result<WsResponse, ErrorResponse> {
        uri = Some(req.uri().clone());
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else {
        return;
    };
    let key = uri
        .as_ref()
        .and_then(|u| u.query())
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("apiKey=")))
        .map(str::to_owned);
    if key.as_deref() != Some(ctx.script.api_key.as_str()) {
        let _ = ws.send(Message::text("Unauthorized: invalid API key")).await;
        let _ = ws.close(None).await;
        return;
    }
    for f in &ctx.script.price_frames {
        if ws.send(Message::text(f.clone())).await.is_err() {
            return;
        }
    }
    while let Some(Ok(m)) = ws.next().await {
        if m.is_close() {
            break;
        }
    }
}

/// The recorded CoinCap v2 lists in `dir` (`coincap_v2`): assets, rates,
/// exchanges, markets (their `data` arrays; v3 rows have the same fields).
pub fn coincap_v2_lists(dir: &Path) -> (Vec<Value>, Vec<Value>, Vec<Value>, Vec<Value>) {
    let list = |name: &str| -> Vec<Value> {
        let path = dir.join(format!("solipsis_coincapV2_{name}.json"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        v["data"]
            .as_array()
            .cloned()
            .unwrap_or_else(|| panic!("{}: no data list", path.display()))
    };
    (list("assets"), list("rates"), list("exchange"), list("markets"))
}
