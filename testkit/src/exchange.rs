//! Local servers on 127.0.0.1 that impersonate Binance and CoinCap, replaying
//! real recordings with scripted faults, so that the producer's live code paths
//! (reconnects, gap repair over REST, rate limits, key checks) are tested end to
//! end without the internet and with every fault happening exactly when the
//! test says.
//!
//! [`FakeBinance`] streams recorded combined-stream messages to every connected
//! WebSocket subscriber (only the streams it asked for) and serves the REST
//! endpoints the producer uses from the same recording. It emits only while a
//! subscriber is connected, so a test loses exactly what its faults say.
//! [`FakeCoinCap`] serves recorded lists with v3 paging and key checks, and price
//! frames on its WebSocket.
//!
//! Both follow `shared/docs/market-apis.md`; what they cannot reproduce is said
//! where it matters (recorded exchange times are replayed as recorded, not
//! shifted to now).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::ops::{Range, RangeInclusive};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::AbortHandle;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response as WsResponse};
use tokio_tungstenite::tungstenite::http::StatusCode as WsStatus;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Binance's REST weight budget per IP and minute, as `exchangeInfo` announces it.
const WEIGHT_LIMIT: u32 = 6000;
/// Binance refuses a client's connection attempts beyond this many ...
const ATTEMPT_LIMIT: usize = 300;
/// ... within this window.
const ATTEMPT_WINDOW: Duration = Duration::from_secs(300);
/// Binance disconnects a client that sends more messages than this in a second
/// (pings, pongs and control messages all count).
const CLIENT_MESSAGES_PER_SECOND: usize = 5;
/// Binance's limit of streams on one connection.
const MAX_STREAMS: usize = 1024;
/// How long a `Ping` fault waits for the Pongs at most.
const PONG_WAIT: Duration = Duration::from_secs(5);
/// How long a connection announced by `serverShutdown` lives at most.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Binance's kline intervals; anything else is `-1120 Invalid interval.`.
const KLINE_INTERVALS: [&str; 16] = [
    "1s", "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h", "1d", "3d", "1w", "1M",
];
/// The notice the retired CoinCap API 2.0 answers every call with since April
/// 2025, word for word as it was served.
const COINCAP_V2_NOTICE: &str = "We are deprecating this version of the CoinCap API on March 31, 2025. \
                                 Sign up for our new V3 API at https://pro.coincap.io/dashboard";

// ---------------------------------------------------------------------------
// Scripts
// ---------------------------------------------------------------------------

/// What [`FakeBinance`] replays and how it misbehaves.
#[derive(Debug, Clone, Default)]
pub struct BinanceScript {
    /// Raw combined-stream messages in order, exactly as recorded (the JSON text
    /// of each line of a capture, see [`capture_messages`]), including streams a
    /// client may not subscribe to: each connection is sent only the streams it
    /// asked for. An entry that is not a `{"stream":…,"data":…}` envelope goes to
    /// every connection as it is, so a test can inject bare events. The REST
    /// endpoints serve every trade of this list, whatever the socket lost.
    pub messages: Vec<String>,
    /// Faults, by index into `messages`: a fault fires just before message `at`
    /// is emitted (`at == messages.len()` fires after the last one). Several at
    /// the same index fire in list order.
    pub faults: Vec<WsFault>,
    /// Messages delivered per second, so that a test is not a race of buffers;
    /// 0 = as fast as the subscribers' queues take them. Only messages some
    /// connection subscribed to take time.
    pub rate: u32,
    /// Scripted REST failures, checked in list order before a request is served.
    pub rest_faults: Vec<RestFault>,
    /// Klines served by `/api/v3/klines`, per (SYMBOL, interval): rows of 12 JSON
    /// values as Binance returns them, in open-time order.
    pub klines: BTreeMap<(String, String), Vec<Value>>,
    /// `@trade` ids of a SYMBOL never sent on the socket although no connection
    /// dropped (REST still serves them); filled by [`BinanceScript::without_trades`].
    /// The messages stay in `messages`, so fault indices keep pointing into the
    /// recording as it was.
    pub skip_trades: Vec<(String, RangeInclusive<i64>)>,
}

impl BinanceScript {
    /// A script replaying the capture at `path` (see [`capture_messages`]), with
    /// no faults and no pacing.
    pub fn from_capture(path: &Path) -> Self {
        BinanceScript {
            messages: capture_messages(path),
            ..BinanceScript::default()
        }
    }

    /// Withholds these `@trade` ids of `symbol` from the WebSocket while REST
    /// still serves them: a gap in the ids without a disconnect, which only a
    /// `historicalTrades` repair can fill.
    pub fn without_trades(mut self, symbol: &str, ids: RangeInclusive<i64>) -> Self {
        self.skip_trades.push((symbol.to_uppercase(), ids));
        self
    }
}

/// A WebSocket misbehaviour of [`FakeBinance`], fired at an index of
/// [`BinanceScript::messages`] while at least one client is connected.
#[derive(Debug, Clone)]
pub enum WsFault {
    /// Closes every open connection abruptly (TCP close, no close frame) and
    /// skips `lose` messages: they were "sent while the client was away", and
    /// only REST can give them back.
    Drop {
        /// Index of the first message lost.
        at: usize,
        /// How many messages (of all streams) are lost.
        lose: usize,
    },
    /// Sends a text frame that is not a valid message (e.g. a truncated
    /// `{"stream":"btcusdt@trade","data":{"e":"trade",`) to every connection.
    Malformed {
        /// Index of the message the frame precedes.
        at: usize,
        /// The frame's text, sent as it is.
        text: String,
    },
    /// Sends a Ping frame to every connection, and waits (at most 5 s) until
    /// each of them has answered before going on, so that a later fault cannot
    /// race the answer. The Pong payloads are in [`FakeBinance::pongs`].
    Ping {
        /// Index of the message the ping precedes.
        at: usize,
        /// The ping's payload, which Binance expects echoed.
        payload: Vec<u8>,
    },
    /// Sends `{"e":"serverShutdown","E":<now ms>}` (bare, not in an envelope,
    /// like Binance) to every open connection. Those connections are closed
    /// (close frame 1001) once a newer connection has received `overlap`
    /// messages, so the client must open its replacement first, or after 10 s.
    ServerShutdown {
        /// Index of the message the announcement precedes.
        at: usize,
        /// Messages a newer connection must have received before the old ones close.
        overlap: usize,
    },
    /// Sends nothing at all (no data, no pings) for this long while keeping the
    /// sockets open, to test the client's watchdog.
    Stall {
        /// Index of the message the silence precedes.
        at: usize,
        /// Length of the silence.
        millis: u64,
    },
}

impl WsFault {
    /// The message index the fault fires before.
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

/// A REST misbehaviour of [`FakeBinance`].
#[derive(Debug, Clone)]
pub enum RestFault {
    /// The next `times` requests to `path` answer 429 with `Retry-After` and
    /// Binance's `{"code":-1003,"msg":"Too many requests…"}` body.
    TooMany {
        /// Request path, e.g. `/api/v3/historicalTrades`.
        path: String,
        /// How many requests are refused before the endpoint works again.
        times: u32,
        /// The `Retry-After` value the client must honour.
        retry_after_secs: u64,
    },
    /// After `after` good answers, the next `times` requests to `path` answer
    /// 503 with Binance's `{"code":-1001,"msg":"Internal error…"}` body (an
    /// outage).
    Outage {
        /// Request path, e.g. `/api/v3/klines`.
        path: String,
        /// How many requests are answered before the outage.
        after: u32,
        /// How many requests fail before the endpoint works again.
        times: u32,
    },
    /// The next `times` requests to `path` answer an empty list, like an
    /// endpoint that does not serve the newest ids yet.
    Lagging {
        /// Request path, e.g. `/api/v3/historicalTrades`.
        path: String,
        /// How many requests answer `[]` before the endpoint catches up.
        times: u32,
    },
    /// Every request to `path` answers `status` with `body` (e.g. 451 with
    /// Binance's restricted-location body, 418, 500).
    Status {
        /// Request path, e.g. `/api/v3/klines`.
        path: String,
        /// HTTP status of every answer.
        status: u16,
        /// Body of every answer, sent as JSON.
        body: String,
    },
}

/// What [`FakeCoinCap`] serves. Its `Debug` output never shows the key.
#[derive(Clone, Default)]
pub struct CoinCapScript {
    /// The only key accepted, as `Authorization: Bearer <key>` or `?apiKey=`;
    /// anything else answers 401 `{"error":"Unauthorized","timestamp":…}`.
    pub api_key: String,
    /// The `data` list of `/assets` (and `/assets/{slug}`).
    pub assets: Vec<Value>,
    /// The `data` list of `/rates` (and `/rates/{slug}`).
    pub rates: Vec<Value>,
    /// The `data` list of `/exchanges` (and `/exchanges/{id}`).
    pub exchanges: Vec<Value>,
    /// The `data` list of `/markets` (and `/assets/{slug}/markets`).
    pub markets: Vec<Value>,
    /// Answer every call, keyed or not, with the retired v2 API's deprecation
    /// notice (`data` is an object, not a list).
    pub deprecated: bool,
    /// The next `too_many` keyed calls answer 429.
    pub too_many: u32,
    /// Frames sent in order on `/prices` (each a JSON object slug → price
    /// string, cut down to the assets the client asked for; a frame that is not
    /// an object goes out as it is), after which the socket stays open.
    pub price_frames: Vec<String>,
}

impl fmt::Debug for CoinCapScript {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoinCapScript")
            .field("api_key", &"<redacted>")
            .field("assets", &self.assets.len())
            .field("rates", &self.rates.len())
            .field("exchanges", &self.exchanges.len())
            .field("markets", &self.markets.len())
            .field("deprecated", &self.deprecated)
            .field("too_many", &self.too_many)
            .field("price_frames", &self.price_frames.len())
            .finish()
    }
}

/// One REST request as a fake server saw it, for assertions on what the client
/// asked and when.
#[derive(Debug, Clone)]
pub struct RestCall {
    /// The request path, e.g. `/api/v3/historicalTrades` or `/v3/assets`.
    pub path: String,
    /// The raw query string as sent, with the value of any `apiKey` replaced by
    /// `<redacted>` so that no key ever reaches a log.
    pub query: String,
    /// The HTTP status answered.
    pub status: u16,
    /// CoinCap: the right key came with the request (header or query). Binance:
    /// always true, its market-data endpoints need no key.
    pub authorized: bool,
    /// A key header came with the request (`Authorization` for CoinCap,
    /// `X-MBX-APIKEY` for Binance), right or wrong.
    pub auth_header: bool,
    /// When the request arrived, to check that `Retry-After` was honoured.
    pub at: Instant,
}

// ---------------------------------------------------------------------------
// Recordings
// ---------------------------------------------------------------------------

/// The combined-stream messages of a raw Binance WebSocket capture (gzip or
/// plain), in either recorder's format: `<ns> <json>` (hftbacktest) or
/// `<secs>: <json>` (cryptofeed, whose first line is the URL). Lines that are
/// not `{"stream":…}` objects (the URL line, blank lines, a REST depth snapshot)
/// are left out.
pub fn capture_messages(path: &Path) -> Vec<String> {
    #[derive(Deserialize)]
    struct Probe<'a> {
        #[serde(borrow)]
        stream: Option<Cow<'a, str>>,
    }
    crate::real::ws_capture_lines(path)
        .into_iter()
        .filter(|(_, json)| serde_json::from_str::<Probe<'_>>(json).is_ok_and(|p| p.stream.is_some()))
        .map(|(_, json)| json)
        .collect()
}

/// The recorded CoinCap v2 lists in `dir` (the real-data folder `coincap_v2`):
/// the `data` arrays of assets, rates, exchanges and markets. v3 rows have the
/// same fields, so they serve as v3 bodies.
pub fn coincap_v2_lists(dir: &Path) -> (Vec<Value>, Vec<Value>, Vec<Value>, Vec<Value>) {
    let list = |name: &str| -> Vec<Value> {
        let path = dir.join(format!("solipsis_coincapV2_{name}.json"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        match v.get("data") {
            Some(Value::Array(rows)) => rows.clone(),
            _ => panic!("{}: no data list", path.display()),
        }
    };
    (list("assets"), list("rates"), list("exchange"), list("markets"))
}

// ---------------------------------------------------------------------------
// Small shared helpers
// ---------------------------------------------------------------------------

/// Locks a mutex, ignoring poisoning: a panicking test thread must not turn
/// every later assertion into a second panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Wall-clock milliseconds, for event times and envelopes.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A JSON string literal.
fn json_str(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

/// A query string with the value of `apiKey` replaced, for logs.
fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k == "apiKey" => format!("{k}=<redacted>"),
            _ => kv.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Percent-decodes a URL path segment; `None` if it is not valid.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The decoded query parameters of a URI; `None` if the query is malformed.
fn query_params(uri: &Uri) -> Option<HashMap<String, String>> {
    Query::<HashMap<String, String>>::try_from_uri(uri).ok().map(|q| q.0)
}

/// A refused WebSocket handshake: a plain HTTP answer with this status.
fn refuse(status: WsStatus, body: &str) -> ErrorResponse {
    let mut e = ErrorResponse::new(Some(body.to_owned()));
    *e.status_mut() = status;
    e
}

/// Tasks and connections a fake owns: aborted when the fake is dropped, so that
/// nothing of it outlives the test that started it.
#[derive(Default)]
struct Owned {
    handles: Mutex<Vec<AbortHandle>>,
}

impl Owned {
    /// Spawns a task that ends with the fake.
    fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut handles = lock(&self.handles);
        handles.retain(|h| !h.is_finished());
        handles.push(tokio::spawn(fut).abort_handle());
    }

    /// Aborts everything.
    fn abort_all(&self) {
        for h in lock(&self.handles).drain(..) {
            h.abort();
        }
    }
}

/// An HTTP answer before the fake's own headers are added. Small, so that
/// `Result<_, Answer>` stays cheap.
struct Answer {
    /// The HTTP status.
    status: StatusCode,
    /// The body; JSON unless empty.
    body: String,
    /// A `Retry-After` header, in seconds.
    retry_after: Option<u64>,
}

impl Answer {
    /// A 200 with this JSON body.
    fn ok(body: String) -> Answer {
        Answer {
            status: StatusCode::OK,
            body,
            retry_after: None,
        }
    }

    /// Any status with this JSON body.
    fn status(status: u16, body: String) -> Answer {
        Answer {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            body,
            retry_after: None,
        }
    }

    /// A Binance error body `{"code":…,"msg":…}` with this status.
    fn binance(status: u16, code: i32, msg: &str) -> Answer {
        Answer::status(status, json!({"code": code, "msg": msg}).to_string())
    }

    /// The HTTP response, with `extra` headers.
    fn respond(self, extra: &[(&'static str, String)]) -> Response {
        let json = !self.body.is_empty();
        let mut resp = (self.status, self.body).into_response();
        let headers = resp.headers_mut();
        if json {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json;charset=UTF-8"),
            );
        }
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        for (name, value) in extra {
            if let Ok(v) = HeaderValue::from_str(value) {
                headers.insert(*name, v);
            }
        }
        resp
    }
}

/// Binds a loopback listener on a free port; failing is a broken test machine.
async fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local address");
    (listener, addr)
}

/// Serves `app` on `listener` until `stop` fires or is dropped, then closes idle
/// keep-alive connections (graceful shutdown), so a dropped fake answers no more.
fn serve(listener: TcpListener, app: Router, stop: oneshot::Receiver<()>) {
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop.await;
            })
            .await;
    });
}

// ---------------------------------------------------------------------------
// Fake Binance: the recording, prepared
// ---------------------------------------------------------------------------

/// One entry of the recording, parsed once.
struct Prepared {
    /// Its stream name; `None` when the entry is not an envelope (it then goes
    /// to every connection as it is).
    stream: Option<String>,
    /// Byte range of `data` in the entry, sent alone to raw (`/ws/…`) connections.
    data: Range<usize>,
    /// Withheld by [`BinanceScript::without_trades`].
    withheld: bool,
}

/// A REST row and the time it is filtered by.
struct Row {
    /// Trade time (`T`), ms.
    time: i64,
    /// The row as Binance renders it, keys in Binance's order.
    json: String,
}

/// The recording, parsed: what the socket sends and what REST serves.
struct Replay {
    /// One per message of the script.
    items: Vec<Prepared>,
    /// `historicalTrades` rows per SYMBOL by trade id, from every `@trade` message.
    trades: HashMap<String, BTreeMap<i64, Row>>,
    /// `aggTrades` rows per SYMBOL by aggregate id, from every `@aggTrade` message.
    aggs: HashMap<String, BTreeMap<i64, Row>>,
    /// Every SYMBOL of the recording and of the klines, for `exchangeInfo` and
    /// `-1121 Invalid symbol.`.
    symbols: BTreeSet<String>,
}

/// A combined-stream envelope, borrowing the recorded text.
#[derive(Deserialize)]
struct Envelope<'a> {
    /// Stream name, e.g. `btcusdt@trade`.
    #[serde(borrow)]
    stream: Cow<'a, str>,
    /// The payload, exactly as recorded.
    #[serde(borrow)]
    data: &'a RawValue,
}

/// Parses the recording; panics on a trade message without its fields (a
/// broken recording is a test bug).
fn prepare(script: &BinanceScript) -> Replay {
    let mut replay = Replay {
        items: Vec::with_capacity(script.messages.len()),
        trades: HashMap::new(),
        aggs: HashMap::new(),
        symbols: script.klines.keys().map(|(s, _)| s.clone()).collect(),
    };
    for (n, msg) in script.messages.iter().enumerate() {
        let Ok(env) = serde_json::from_str::<Envelope<'_>>(msg) else {
            replay.items.push(Prepared {
                stream: None,
                data: 0..msg.len(),
                withheld: false,
            });
            continue;
        };
        let start = env.data.get().as_ptr() as usize - msg.as_ptr() as usize;
        let data = start..start + env.data.get().len();
        let stream = env.stream.into_owned();
        if let Some((sym, _)) = stream.split_once('@') {
            if !sym.is_empty() && sym.bytes().all(|b| b.is_ascii_alphanumeric()) {
                replay.symbols.insert(sym.to_uppercase());
            }
        }
        let mut withheld = false;
        if stream.ends_with("@trade") || stream.ends_with("@aggTrade") {
            let d: Value = serde_json::from_str(env.data.get()).unwrap_or_else(|e| panic!("message {n}: {e}"));
            let s = |k: &str| {
                d.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_else(|| panic!("message {n}: no string {k}"))
            };
            let i = |k: &str| {
                d.get(k)
                    .and_then(Value::as_i64)
                    .unwrap_or_else(|| panic!("message {n}: no integer {k}"))
            };
            let b = |k: &str| d.get(k).and_then(Value::as_bool);
            let m = b("m").unwrap_or_else(|| panic!("message {n}: no m"));
            let best = b("M").unwrap_or(true);
            let symbol = s("s").to_owned();
            match d.get("e").and_then(Value::as_str) {
                Some("trade") => {
                    let id = i("t");
                    withheld = script
                        .skip_trades
                        .iter()
                        .any(|(sym, ids)| sym.eq_ignore_ascii_case(&symbol) && ids.contains(&id));
                    let (p, q) = (s("p"), s("q"));
                    let dec = |v: &str| {
                        v.parse::<Decimal>()
                            .unwrap_or_else(|e| panic!("message {n}: {v:?} is not a decimal: {e}"))
                    };
                    let mut quote = (dec(p) * dec(q)).round_dp(8);
                    quote.rescale(8);
                    let json = format!(
                        r#"{{"id":{id},"price":{},"qty":{},"quoteQty":"{quote}","time":{},"isBuyerMaker":{m},"isBestMatch":{best}}}"#,
                        json_str(p),
                        json_str(q),
                        i("T"),
                    );
                    replay
                        .trades
                        .entry(symbol)
                        .or_default()
                        .insert(id, Row { time: i("T"), json });
                }
                Some("aggTrade") => {
                    let id = i("a");
                    let json = format!(
                        r#"{{"a":{id},"p":{},"q":{},"f":{},"l":{},"T":{},"m":{m},"M":{best}}}"#,
                        json_str(s("p")),
                        json_str(s("q")),
                        i("f"),
                        i("l"),
                        i("T"),
                    );
                    replay
                        .aggs
                        .entry(symbol)
                        .or_default()
                        .insert(id, Row { time: i("T"), json });
                }
                _ => {}
            }
        }
        replay.items.push(Prepared {
            stream: Some(stream),
            data,
            withheld,
        });
    }
    replay
}

// ---------------------------------------------------------------------------
// Fake Binance: WebSocket state and broadcaster
// ---------------------------------------------------------------------------

/// What the broadcaster asks a connection task to do.
enum Out {
    /// Send this text frame.
    Text(String),
    /// Send a Ping with this payload.
    Ping(Vec<u8>),
    /// Close with a close frame (after `serverShutdown`).
    Close,
    /// Drop the TCP connection without a close frame.
    Kill,
}

/// One subscribed WebSocket connection.
struct Sub {
    /// Streams it receives (from its URL and `SUBSCRIBE`), sorted for
    /// `LIST_SUBSCRIPTIONS`.
    streams: BTreeSet<String>,
    /// A `/ws/…` connection, sent the bare `data` objects.
    raw: bool,
    /// Its unbounded queue: delivery never drops a message.
    tx: mpsc::UnboundedSender<Out>,
    /// Messages of the recording delivered to it, for `serverShutdown` overlap.
    received: usize,
    /// Announced by `serverShutdown`: closes once a newer connection has
    /// received this many messages.
    doomed: Option<usize>,
    /// Pinged by a `Ping` fault and not answered yet.
    awaiting_pong: bool,
}

/// WebSocket bookkeeping of [`FakeBinance`].
#[derive(Default)]
struct WsState {
    /// Open connections by id (ids grow: a larger id is a newer connection).
    subs: BTreeMap<u64, Sub>,
    /// The last id handed out.
    last_id: u64,
    /// Times of recent connection attempts, for the 300-per-5-minutes rule.
    attempts: VecDeque<Instant>,
    /// Every connection attempt.
    connections: usize,
    /// Attempts refused with 429.
    refused: usize,
    /// Connections dropped for sending more than 5 messages in a second.
    too_fast: usize,
    /// Payloads of the Pongs received.
    pongs: Vec<Vec<u8>>,
}

/// State shared by the tasks of [`FakeBinance`].
struct BinanceShared {
    /// WebSocket bookkeeping.
    ws: Mutex<WsState>,
    /// Woken when a connection subscribes, so that a paused broadcaster resumes.
    joined: Notify,
    /// Woken when a Pong arrives or a connection goes, so that a `Ping` fault
    /// stops waiting.
    ponged: Notify,
    /// Number of Pongs received, for [`FakeBinance::wait_pongs`].
    pong_count: watch::Sender<usize>,
    /// True once every message has been emitted.
    finished: watch::Sender<bool>,
    /// REST bookkeeping.
    rest: Mutex<RestState>,
    /// Connection tasks and timers, aborted with the fake.
    owned: Owned,
}

impl BinanceShared {
    /// Waits until at least one connection is subscribed.
    async fn wait_subscriber(&self) {
        loop {
            // Created before the check, so a join in between is not missed.
            let joined = self.joined.notified();
            if !lock(&self.ws).subs.is_empty() {
                return;
            }
            joined.await;
        }
    }

    /// Sends one message of the recording to the connections that subscribed
    /// to its stream; true if any did.
    fn deliver(&self, msg: &str, item: &Prepared) -> bool {
        let mut ws = lock(&self.ws);
        let mut any = false;
        for sub in ws.subs.values_mut() {
            let text = match &item.stream {
                Some(s) if !sub.streams.contains(s) => continue,
                Some(_) if sub.raw => &msg[item.data.clone()],
                _ => msg,
            };
            if sub.tx.send(Out::Text(text.to_owned())).is_ok() {
                sub.received += 1;
                any = true;
            }
        }
        close_superseded(&mut ws);
        any
    }

    /// Waits until every connection pinged by a `Ping` fault has answered or
    /// gone, at most [`PONG_WAIT`].
    async fn wait_pongs(&self) {
        let deadline = tokio::time::Instant::now() + PONG_WAIT;
        loop {
            let ponged = self.ponged.notified();
            if !lock(&self.ws).subs.values().any(|s| s.awaiting_pong) {
                return;
            }
            if tokio::time::timeout_at(deadline, ponged).await.is_err() {
                return;
            }
        }
    }

    /// Forgets a connection (the broadcaster no longer sends to it).
    fn remove(&self, id: u64) -> Option<Sub> {
        let sub = lock(&self.ws).subs.remove(&id);
        self.ponged.notify_waiters();
        sub
    }

    /// Sends `out` to every open connection.
    fn to_all(&self, out: impl Fn() -> Out) {
        for sub in lock(&self.ws).subs.values() {
            let _ = sub.tx.send(out());
        }
    }
}

/// Closes the connections announced by `serverShutdown` that a newer
/// connection has overlapped by their `overlap` messages.
fn close_superseded(ws: &mut WsState) {
    let done: Vec<u64> = ws
        .subs
        .iter()
        .filter(|(id, sub)| {
            sub.doomed.is_some_and(|overlap| {
                ws.subs
                    .range(**id + 1..)
                    .any(|(_, newer)| newer.doomed.is_none() && newer.received >= overlap)
            })
        })
        .map(|(id, _)| *id)
        .collect();
    for id in done {
        if let Some(sub) = ws.subs.remove(&id) {
            let _ = sub.tx.send(Out::Close);
        }
    }
}

/// Emits the recording to the subscribers, applying the faults; pauses while
/// nobody is connected.
async fn broadcast(script: Arc<BinanceScript>, replay: Arc<Replay>, shared: Arc<BinanceShared>) {
    let n = script.messages.len();
    let mut faults: BTreeMap<usize, Vec<&WsFault>> = BTreeMap::new();
    for f in &script.faults {
        faults.entry(f.at()).or_default().push(f);
    }
    let mut ticker = (script.rate > 0).then(|| {
        let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(script.rate)));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let mut lost_until = 0;
    for i in 0..=n {
        for fault in faults.get(&i).map(Vec::as_slice).unwrap_or_default() {
            shared.wait_subscriber().await;
            match fault {
                WsFault::Drop { lose, .. } => {
                    for (_, sub) in std::mem::take(&mut lock(&shared.ws).subs) {
                        let _ = sub.tx.send(Out::Kill);
                    }
                    lost_until = lost_until.max(i + lose);
                }
                WsFault::Malformed { text, .. } => shared.to_all(|| Out::Text(text.clone())),
                WsFault::Ping { payload, .. } => {
                    for sub in lock(&shared.ws).subs.values_mut() {
                        sub.awaiting_pong = sub.tx.send(Out::Ping(payload.clone())).is_ok();
                    }
                    shared.wait_pongs().await;
                }
                WsFault::ServerShutdown { overlap, .. } => {
                    let text = format!(r#"{{"e":"serverShutdown","E":{}}}"#, now_ms());
                    let mut doomed = Vec::new();
                    for (id, sub) in lock(&shared.ws).subs.iter_mut() {
                        let _ = sub.tx.send(Out::Text(text.clone()));
                        if sub.doomed.is_none() {
                            sub.doomed = Some(*overlap);
                            doomed.push(*id);
                        }
                    }
                    let s = shared.clone();
                    shared.owned.spawn(async move {
                        tokio::time::sleep(SHUTDOWN_GRACE).await;
                        for id in doomed {
                            if let Some(sub) = s.remove(id) {
                                let _ = sub.tx.send(Out::Close);
                            }
                        }
                    });
                }
                WsFault::Stall { millis, .. } => tokio::time::sleep(Duration::from_millis(*millis)).await,
            }
        }
        if i == n {
            break;
        }
        let item = &replay.items[i];
        if i < lost_until || item.withheld {
            continue;
        }
        shared.wait_subscriber().await;
        let delivered = shared.deliver(&script.messages[i], item);
        match ticker.as_mut() {
            Some(t) if delivered => {
                t.tick().await;
            }
            _ if i % 64 == 63 => tokio::task::yield_now().await,
            _ => {}
        }
    }
    shared.finished.send_replace(true);
}

/// Where a WebSocket client connected and what it subscribed to in its URL.
struct Route {
    /// Streams named in the URL.
    streams: BTreeSet<String>,
    /// `/ws/…`: bare payloads instead of envelopes.
    raw: bool,
}

/// Reads `/stream?streams=a/b` or `/ws/a/b`; `Err` is the status and body of
/// the refusal.
fn route_of(uri: &Uri) -> Result<Route, (WsStatus, &'static str)> {
    let path = uri.path();
    let (names, raw): (Vec<String>, bool) = if path == "/stream" || path == "/stream/" {
        let q = query_params(uri).ok_or((WsStatus::BAD_REQUEST, "malformed query"))?;
        let names = q
            .get("streams")
            .map(|s| s.split('/').filter(|n| !n.is_empty()).map(str::to_owned).collect())
            .unwrap_or_default();
        (names, false)
    } else if path == "/ws" || path.starts_with("/ws/") {
        let names = path
            .trim_start_matches("/ws")
            .split('/')
            .filter(|n| !n.is_empty())
            .map(percent_decode)
            .collect::<Option<Vec<_>>>()
            .ok_or((WsStatus::BAD_REQUEST, "malformed stream name"))?;
        (names, true)
    } else {
        return Err((WsStatus::NOT_FOUND, ""));
    };
    if names.len() > MAX_STREAMS {
        return Err((WsStatus::BAD_REQUEST, "too many streams"));
    }
    Ok(Route {
        streams: names.into_iter().collect(),
        raw,
    })
}

/// One WebSocket client of [`FakeBinance`], from handshake to close.
async fn binance_connection(tcp: TcpStream, shared: Arc<BinanceShared>) {
    let limited = {
        let mut ws = lock(&shared.ws);
        let now = Instant::now();
        ws.connections += 1;
        while ws
            .attempts
            .front()
            .is_some_and(|t| now.duration_since(*t) >= ATTEMPT_WINDOW)
        {
            ws.attempts.pop_front();
        }
        ws.attempts.push_back(now);
        ws.attempts.len() > ATTEMPT_LIMIT
    };
    let mut route = None;
    // tungstenite fixes the callback's error type (an HTTP response).
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, resp: WsResponse| -> Result<WsResponse, ErrorResponse> {
        if limited {
            return Err(refuse(WsStatus::TOO_MANY_REQUESTS, "Too many connection attempts."));
        }
        let r = route_of(req.uri()).map_err(|(status, body)| refuse(status, body))?;
        route = Some(r);
        Ok(resp)
    };
    let accepted = tokio_tungstenite::accept_hdr_async(tcp, callback).await;
    if limited {
        lock(&shared.ws).refused += 1;
        return;
    }
    let (Ok(mut ws), Some(route)) = (accepted, route) else {
        return;
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let id = {
        let mut st = lock(&shared.ws);
        st.last_id += 1;
        let id = st.last_id;
        st.subs.insert(
            id,
            Sub {
                streams: route.streams,
                raw: route.raw,
                tx,
                received: 0,
                doomed: None,
                awaiting_pong: false,
            },
        );
        close_superseded(&mut st);
        id
    };
    shared.joined.notify_waiters();
    // A `serverShutdown` close at the join may end a `Ping` fault's wait.
    shared.ponged.notify_waiters();
    let mut recent: VecDeque<Instant> = VecDeque::new();
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
                Some(Out::Close) => {
                    let frame = CloseFrame { code: CloseCode::Away, reason: "server shutdown".into() };
                    let _ = ws.close(Some(frame)).await;
                    drain_close(&mut ws).await;
                    break;
                }
                // Dropping the stream closes the TCP connection without a close frame.
                Some(Out::Kill) | None => break,
            },
            incoming = ws.next() => {
                let Some(Ok(msg)) = incoming else { break };
                if msg.is_close() {
                    // tungstenite has queued the close reply; reading on sends it
                    // and then ends the stream.
                    continue;
                }
                let now = Instant::now();
                recent.push_back(now);
                while recent.front().is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1)) {
                    recent.pop_front();
                }
                if recent.len() > CLIENT_MESSAGES_PER_SECOND {
                    // Binance drops a client that talks too much.
                    lock(&shared.ws).too_fast += 1;
                    break;
                }
                match msg {
                    Message::Pong(p) => {
                        {
                            let mut st = lock(&shared.ws);
                            st.pongs.push(p.to_vec());
                            if let Some(sub) = st.subs.get_mut(&id) {
                                sub.awaiting_pong = false;
                            }
                        }
                        shared.pong_count.send_modify(|n| *n += 1);
                        shared.ponged.notify_waiters();
                    }
                    Message::Text(t) => {
                        let reply = control_reply(&shared, id, t.as_str());
                        if ws.send(Message::text(reply)).await.is_err() {
                            break;
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    shared.remove(id);
}

/// Reads until the peer answers a close frame (or gives up after the grace
/// period), so the close handshake completes.
async fn drain_close(ws: &mut WebSocketStream<TcpStream>) {
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async { while let Some(Ok(_)) = ws.next().await {} }).await;
}

/// The answer to a control message (`SUBSCRIBE`, `UNSUBSCRIBE`,
/// `LIST_SUBSCRIPTIONS`), shaped like Binance's (keys in its order), errors
/// included.
fn control_reply(shared: &BinanceShared, conn: u64, text: &str) -> String {
    let v: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            let msg = json_str(&format!("Invalid JSON: {e}"));
            return format!(r#"{{"error":{{"code":3,"msg":{msg}}}}}"#);
        }
    };
    let id = v.get("id").cloned().unwrap_or(Value::Null);
    let error = |code: i32, msg: &str| format!(r#"{{"error":{{"code":{code},"msg":{}}},"id":{id}}}"#, json_str(msg));
    let names = || -> Option<Vec<String>> {
        v.get("params")?
            .as_array()?
            .iter()
            .map(|p| p.as_str().map(str::to_owned))
            .collect()
    };
    let mut ws = lock(&shared.ws);
    let Some(sub) = ws.subs.get_mut(&conn) else {
        return error(2, "Invalid request: connection closing");
    };
    let method = v.get("method").and_then(Value::as_str);
    match method {
        Some("SUBSCRIBE") | Some("UNSUBSCRIBE") => {
            let Some(names) = names() else {
                return error(1, "Invalid value type: expected array of strings");
            };
            if method == Some("SUBSCRIBE") {
                if sub.streams.len() + names.len() > MAX_STREAMS {
                    return error(2, "Invalid request: too many streams");
                }
                sub.streams.extend(names);
            } else {
                for n in &names {
                    sub.streams.remove(n);
                }
            }
            format!(r#"{{"result":null,"id":{id}}}"#)
        }
        Some("LIST_SUBSCRIPTIONS") => format!(r#"{{"result":{},"id":{id}}}"#, json!(sub.streams)),
        _ => error(
            2,
            "Invalid request: unknown variant, expected one of SUBSCRIBE, UNSUBSCRIBE, LIST_SUBSCRIPTIONS, \
             SET_PROPERTY, GET_PROPERTY",
        ),
    }
}

// ---------------------------------------------------------------------------
// Fake Binance: REST
// ---------------------------------------------------------------------------

/// REST bookkeeping of [`FakeBinance`].
#[derive(Default)]
struct RestState {
    /// Every request so far.
    log: Vec<RestCall>,
    /// Requests seen, per index of a counted fault (`TooMany`: 429s given; `Outage`: all).
    faults_used: HashMap<usize, u32>,
    /// The minute (since the epoch) the weight counter is for.
    minute: i64,
    /// Weight used in that minute.
    used: u32,
}

/// What the REST handler needs.
struct BinanceRest {
    /// The faults and klines.
    script: Arc<BinanceScript>,
    /// The trades and symbols.
    replay: Arc<Replay>,
    /// The log and weight counter.
    shared: Arc<BinanceShared>,
}

/// The request weight of an endpoint, as Binance counts it.
fn weight_of(path: &str) -> u32 {
    match path {
        "/api/v3/klines" => 2,
        "/api/v3/aggTrades" => 4,
        "/api/v3/historicalTrades" | "/api/v3/trades" => 25,
        "/api/v3/exchangeInfo" => 20,
        "/api/v3/ping" | "/api/v3/time" => 1,
        _ => 0,
    }
}

/// Every REST request to [`FakeBinance`].
async fn binance_rest(State(rest): State<Arc<BinanceRest>>, headers: HeaderMap, uri: Uri) -> Response {
    let at = Instant::now();
    let path = uri.path().to_owned();
    let (used, answer) = rest.answer(&path, &uri);
    lock(&rest.shared.rest).log.push(RestCall {
        query: uri.query().unwrap_or_default().to_owned(),
        path,
        status: answer.status.as_u16(),
        authorized: true,
        auth_header: headers.contains_key("x-mbx-apikey"),
        at,
    });
    answer.respond(&[
        ("x-mbx-used-weight", used.to_string()),
        ("x-mbx-used-weight-1m", used.to_string()),
    ])
}

impl BinanceRest {
    /// Counts the weight, applies the faults and the weight limit, then serves;
    /// returns the weight used this minute and the answer.
    fn answer(&self, path: &str, uri: &Uri) -> (u32, Answer) {
        let (used, fault) = {
            let mut st = lock(&self.shared.rest);
            let now = now_ms();
            if st.minute != now / 60_000 {
                st.minute = now / 60_000;
                st.used = 0;
            }
            st.used += weight_of(path);
            let used = st.used;
            let mut fault = None;
            for (k, f) in self.script.rest_faults.iter().enumerate() {
                match f {
                    RestFault::Status { path: p, status, body } if p == path => {
                        fault = Some(Answer::status(*status, body.clone()));
                    }
                    RestFault::Outage { path: p, after, times } if p == path => {
                        let n = st.faults_used.entry(k).or_insert(0);
                        *n = n.saturating_add(1);
                        if *n > *after && *n - *after <= *times {
                            fault = Some(Answer::binance(
                                503,
                                -1001,
                                "Internal error; unable to process your request. Please try again.",
                            ));
                        }
                    }
                    RestFault::Lagging { path: p, times } if p == path => {
                        let n = st.faults_used.entry(k).or_insert(0);
                        if *n < *times {
                            *n += 1;
                            fault = Some(Answer::ok("[]".to_owned()));
                        }
                    }
                    RestFault::TooMany {
                        path: p,
                        times,
                        retry_after_secs,
                    } if p == path => {
                        let n = st.faults_used.entry(k).or_insert(0);
                        if *n < *times {
                            *n += 1;
                            let mut a = Answer::binance(
                                429,
                                -1003,
                                "Too many requests; current limit of IP is 6000 requests per minute. Please use the \
                                 websocket for live updates to avoid polling the API.",
                            );
                            a.retry_after = Some(*retry_after_secs);
                            fault = Some(a);
                        }
                    }
                    _ => {}
                }
                if fault.is_some() {
                    break;
                }
            }
            if fault.is_none() && used > WEIGHT_LIMIT {
                let mut a = Answer::binance(
                    429,
                    -1003,
                    "Too much request weight used; current limit is 6000 request weight per 1 MINUTE. Please use \
                     WebSocket Streams for live updates to avoid polling the API.",
                );
                a.retry_after = Some((60 - (now / 1000) % 60) as u64);
                fault = Some(a);
            }
            (used, fault)
        };
        match fault {
            Some(a) => (used, a),
            None => (used, self.serve(path, uri).unwrap_or_else(|e| e)),
        }
    }

    /// Serves an endpoint from the recording; `Err` is a Binance error answer.
    fn serve(&self, path: &str, uri: &Uri) -> Result<Answer, Answer> {
        let q =
            query_params(uri).ok_or_else(|| Answer::binance(400, -1100, "Illegal characters found in a parameter."))?;
        match path {
            "/api/v3/ping" => Ok(Answer::ok("{}".into())),
            "/api/v3/time" => Ok(Answer::ok(json!({"serverTime": now_ms()}).to_string())),
            "/api/v3/exchangeInfo" => self.exchange_info(&q),
            "/api/v3/historicalTrades" => {
                let rows = self.replay.trades.get(&self.symbol(&q)?);
                let limit = limit_param(&q, 500, 1000)?;
                let page = match int_param(&q, "fromId")? {
                    Some(from) => first_rows(rows, from.., limit),
                    None => last_rows(rows, limit),
                };
                Ok(rows_answer(page))
            }
            "/api/v3/trades" => {
                let rows = self.replay.trades.get(&self.symbol(&q)?);
                Ok(rows_answer(last_rows(rows, limit_param(&q, 500, 1000)?)))
            }
            "/api/v3/aggTrades" => self.agg_trades(&q),
            "/api/v3/klines" => self.klines(&q),
            _ => Err(Answer::status(404, String::new())),
        }
    }

    /// The `symbol` parameter, checked against the recording.
    fn symbol(&self, q: &HashMap<String, String>) -> Result<String, Answer> {
        let s = required(q, "symbol")?;
        if self.replay.symbols.contains(s) {
            Ok(s.to_owned())
        } else {
            Err(Answer::binance(400, -1121, "Invalid symbol."))
        }
    }

    /// `GET /api/v3/aggTrades`: by `fromId`, or by `startTime`/`endTime` (less
    /// than an hour apart), or the most recent.
    fn agg_trades(&self, q: &HashMap<String, String>) -> Result<Answer, Answer> {
        let rows = self.replay.aggs.get(&self.symbol(q)?);
        let limit = limit_param(q, 500, 1000)?;
        let (from, start, end) = (
            int_param(q, "fromId")?,
            int_param(q, "startTime")?,
            int_param(q, "endTime")?,
        );
        if let (Some(s), Some(e)) = (start, end) {
            if e - s > 3_600_000 {
                return Err(Answer::binance(
                    400,
                    -1127,
                    "More than 1 hours between startTime and endTime.",
                ));
            }
        }
        let page = match (from, start, end) {
            (Some(from), _, _) => first_rows(rows, from.., limit),
            (None, None, None) => last_rows(rows, limit),
            (None, s, e) => {
                let (s, e) = (s.unwrap_or(i64::MIN), e.unwrap_or(i64::MAX));
                rows.map(|r| {
                    r.values()
                        .filter(|row| (s..=e).contains(&row.time))
                        .take(limit)
                        .map(|row| row.json.as_str())
                        .collect()
                })
                .unwrap_or_default()
            }
        };
        Ok(rows_answer(page))
    }

    /// `GET /api/v3/klines`: rows whose open time is within
    /// [`startTime`, `endTime`], the first `limit` from `startTime`, else the
    /// last `limit`.
    fn klines(&self, q: &HashMap<String, String>) -> Result<Answer, Answer> {
        let symbol = self.symbol(q)?;
        let interval = required(q, "interval")?;
        if !KLINE_INTERVALS.contains(&interval) {
            return Err(Answer::binance(400, -1120, "Invalid interval."));
        }
        let limit = limit_param(q, 500, 1000)?;
        let (start, end) = (int_param(q, "startTime")?, int_param(q, "endTime")?);
        let rows = self
            .script
            .klines
            .get(&(symbol, interval.to_owned()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let within = |row: &&Value| {
            let t = row.get(0).and_then(Value::as_i64).unwrap_or(i64::MIN);
            (start.unwrap_or(i64::MIN)..=end.unwrap_or(i64::MAX)).contains(&t)
        };
        let mut page: Vec<&Value> = if start.is_some() {
            rows.iter().filter(within).take(limit).collect()
        } else {
            rows.iter().rev().filter(within).take(limit).collect()
        };
        if start.is_none() {
            page.reverse();
        }
        Ok(Answer::ok(json!(page).to_string()))
    }

    /// `GET /api/v3/exchangeInfo`: the weight limit and the recording's symbols
    /// (all `TRADING`), optionally only `symbol` or `symbols=["A","B"]`.
    fn exchange_info(&self, q: &HashMap<String, String>) -> Result<Answer, Answer> {
        let wanted: Vec<String> = match (q.get("symbol"), q.get("symbols")) {
            (Some(s), _) => vec![s.clone()],
            (None, Some(list)) => serde_json::from_str(list)
                .map_err(|_| Answer::binance(400, -1100, "Illegal characters found in parameter 'symbols'."))?,
            (None, None) => self.replay.symbols.iter().cloned().collect(),
        };
        if wanted.iter().any(|s| !self.replay.symbols.contains(s)) {
            return Err(Answer::binance(400, -1121, "Invalid symbol."));
        }
        let symbols: Vec<Value> = wanted
            .iter()
            .map(|s| {
                let (base, quote) = split_symbol(s);
                json!({
                    "symbol": s, "status": "TRADING", "baseAsset": base, "baseAssetPrecision": 8,
                    "quoteAsset": quote, "quotePrecision": 8, "quoteAssetPrecision": 8,
                    "isSpotTradingAllowed": true, "isMarginTradingAllowed": false,
                    "permissions": [], "permissionSets": [["SPOT"]], "filters": [],
                })
            })
            .collect();
        Ok(Answer::ok(
            json!({
                "timezone": "UTC",
                "serverTime": now_ms(),
                "rateLimits": [
                    {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": WEIGHT_LIMIT},
                    {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 100},
                    {"rateLimitType": "ORDERS", "interval": "DAY", "intervalNum": 1, "limit": 200000},
                    {"rateLimitType": "RAW_REQUESTS", "interval": "MINUTE", "intervalNum": 5, "limit": 61000},
                ],
                "exchangeFilters": [],
                "symbols": symbols,
            })
            .to_string(),
        ))
    }
}

/// Base and quote asset of a symbol, by the usual quote suffixes.
fn split_symbol(s: &str) -> (&str, &str) {
    const QUOTES: [&str; 12] = [
        "FDUSD", "USDT", "USDC", "BUSD", "TUSD", "BTC", "ETH", "BNB", "EUR", "TRY", "BRL", "USD",
    ];
    QUOTES
        .iter()
        .find_map(|q| s.strip_suffix(q).filter(|b| !b.is_empty()).map(|b| (b, *q)))
        .unwrap_or((s, ""))
}

/// A mandatory parameter, or Binance's `-1102`.
fn required<'a>(q: &'a HashMap<String, String>, name: &str) -> Result<&'a str, Answer> {
    match q.get(name) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(Answer::binance(
            400,
            -1102,
            &format!("Mandatory parameter '{name}' was not sent, was empty/null, or malformed."),
        )),
    }
}

/// An optional non-negative integer parameter, or Binance's `-1100`.
fn int_param(q: &HashMap<String, String>, name: &str) -> Result<Option<i64>, Answer> {
    match q.get(name) {
        None => Ok(None),
        Some(v) => v
            .parse::<u64>()
            .ok()
            .and_then(|v| i64::try_from(v).ok())
            .map(Some)
            .ok_or_else(|| {
                Answer::binance(
                    400,
                    -1100,
                    &format!("Illegal characters found in parameter '{name}'; legal range is '^[0-9]{{1,20}}$'."),
                )
            }),
    }
}

/// The `limit` parameter (1..=`max`, else Binance's error), `default` if absent.
fn limit_param(q: &HashMap<String, String>, default: usize, max: usize) -> Result<usize, Answer> {
    let Some(l) = int_param(q, "limit")? else {
        return Ok(default);
    };
    match usize::try_from(l) {
        Ok(l) if (1..=max).contains(&l) => Ok(l),
        _ => Err(Answer::binance(
            400,
            -1130,
            "Data sent for parameter 'limit' is not valid.",
        )),
    }
}

/// The first `limit` rows with ids in `ids`, ascending.
fn first_rows(rows: Option<&BTreeMap<i64, Row>>, ids: std::ops::RangeFrom<i64>, limit: usize) -> Vec<&str> {
    rows.map(|r| r.range(ids).take(limit).map(|(_, row)| row.json.as_str()).collect())
        .unwrap_or_default()
}

/// The last `limit` rows, ascending: what Binance answers without `fromId`.
fn last_rows(rows: Option<&BTreeMap<i64, Row>>, limit: usize) -> Vec<&str> {
    let mut page: Vec<&str> = rows
        .map(|r| r.values().rev().take(limit).map(|row| row.json.as_str()).collect())
        .unwrap_or_default();
    page.reverse();
    page
}

/// A JSON array of pre-rendered rows.
fn rows_answer(rows: Vec<&str>) -> Answer {
    Answer::ok(format!("[{}]", rows.join(",")))
}

// ---------------------------------------------------------------------------
// Fake Binance: the handle
// ---------------------------------------------------------------------------

/// A Binance impersonator: a WebSocket server and a REST server on two loopback
/// ports, replaying one [`BinanceScript`]. Dropping it stops both.
pub struct FakeBinance {
    /// Where the WebSocket server listens.
    ws_addr: SocketAddr,
    /// Where the REST server listens.
    rest_addr: SocketAddr,
    /// State shared with the server tasks, read by the accessors.
    shared: Arc<BinanceShared>,
    /// Dropping it shuts the REST server down gracefully.
    _stop_rest: oneshot::Sender<()>,
}

impl Drop for FakeBinance {
    fn drop(&mut self) {
        self.shared.owned.abort_all();
    }
}

impl FakeBinance {
    /// Parses the script's recording (panicking on a broken one) and starts both
    /// servers on free loopback ports. The broadcaster waits for the first
    /// subscriber.
    pub async fn start(script: BinanceScript) -> FakeBinance {
        let replay = Arc::new(prepare(&script));
        let script = Arc::new(script);
        let shared = Arc::new(BinanceShared {
            ws: Mutex::new(WsState::default()),
            joined: Notify::new(),
            ponged: Notify::new(),
            pong_count: watch::Sender::new(0),
            finished: watch::Sender::new(false),
            rest: Mutex::new(RestState::default()),
            owned: Owned::default(),
        });
        let (ws_listener, ws_addr) = bind().await;
        let (rest_listener, rest_addr) = bind().await;
        let s = shared.clone();
        shared.owned.spawn(async move {
            while let Ok((tcp, _)) = ws_listener.accept().await {
                let conn = binance_connection(tcp, s.clone());
                s.owned.spawn(conn);
            }
        });
        shared
            .owned
            .spawn(broadcast(script.clone(), replay.clone(), shared.clone()));
        let app = Router::new().fallback(binance_rest).with_state(Arc::new(BinanceRest {
            script,
            replay,
            shared: shared.clone(),
        }));
        let (stop_rest, stop) = oneshot::channel();
        serve(rest_listener, app, stop);
        FakeBinance {
            ws_addr,
            rest_addr,
            shared,
            _stop_rest: stop_rest,
        }
    }

    /// `ws://127.0.0.1:PORT`; clients append `/stream?streams=…` or `/ws/<stream>`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.ws_addr)
    }

    /// `http://127.0.0.1:PORT`; clients append `/api/v3/…`.
    pub fn rest_url(&self) -> String {
        format!("http://{}", self.rest_addr)
    }

    /// WebSocket connection attempts so far, refused ones included.
    pub fn connections(&self) -> usize {
        lock(&self.shared.ws).connections
    }

    /// Attempts refused with 429 for exceeding 300 in 5 minutes.
    pub fn refused_connections(&self) -> usize {
        lock(&self.shared.ws).refused
    }

    /// Connections dropped for sending more than 5 messages in a second.
    pub fn too_fast_connections(&self) -> usize {
        lock(&self.shared.ws).too_fast
    }

    /// Connections currently subscribed (the broadcaster pauses at 0).
    pub fn open_connections(&self) -> usize {
        lock(&self.shared.ws).subs.len()
    }

    /// Payloads of the Pongs received, in order.
    pub fn pongs(&self) -> Vec<Vec<u8>> {
        lock(&self.shared.ws).pongs.clone()
    }

    /// Waits until at least `n` Pongs have been received, and returns them all.
    pub async fn wait_pongs(&self, n: usize) -> Vec<Vec<u8>> {
        let _ = self.shared.pong_count.subscribe().wait_for(|c| *c >= n).await;
        self.pongs()
    }

    /// True once every message has been emitted (or deliberately lost).
    pub fn finished(&self) -> bool {
        *self.shared.finished.borrow()
    }

    /// Waits until every message has been emitted (or deliberately lost).
    pub async fn wait_finished(&self) {
        let _ = self.shared.finished.subscribe().wait_for(|f| *f).await;
    }

    /// Every REST request so far, in arrival order.
    pub fn rest_log(&self) -> Vec<RestCall> {
        lock(&self.shared.rest).log.clone()
    }
}

// ---------------------------------------------------------------------------
// Fake CoinCap
// ---------------------------------------------------------------------------

/// State shared by the tasks of [`FakeCoinCap`].
struct CoinCapShared {
    /// What to serve.
    script: CoinCapScript,
    /// 429s still to answer.
    too_many_left: Mutex<u32>,
    /// Every REST request so far.
    log: Mutex<Vec<RestCall>>,
    /// WebSocket connection attempts.
    ws_connections: Mutex<usize>,
    /// Connection tasks, aborted with the fake.
    owned: Owned,
}

/// A CoinCap v3 impersonator: REST on one loopback port, the price WebSocket on
/// another. Dropping it stops both.
pub struct FakeCoinCap {
    /// Where the REST server listens.
    rest_addr: SocketAddr,
    /// Where the WebSocket server listens.
    ws_addr: SocketAddr,
    /// State shared with the server tasks, read by the accessors.
    shared: Arc<CoinCapShared>,
    /// Dropping it shuts the REST server down gracefully.
    _stop_rest: oneshot::Sender<()>,
}

impl Drop for FakeCoinCap {
    fn drop(&mut self) {
        self.shared.owned.abort_all();
    }
}

impl FakeCoinCap {
    /// Starts both servers on free loopback ports.
    pub async fn start(script: CoinCapScript) -> FakeCoinCap {
        let shared = Arc::new(CoinCapShared {
            too_many_left: Mutex::new(script.too_many),
            script,
            log: Mutex::new(Vec::new()),
            ws_connections: Mutex::new(0),
            owned: Owned::default(),
        });
        let (rest_listener, rest_addr) = bind().await;
        let (ws_listener, ws_addr) = bind().await;
        let (stop_rest, stop) = oneshot::channel();
        serve(
            rest_listener,
            Router::new().fallback(coincap_rest).with_state(shared.clone()),
            stop,
        );
        let s = shared.clone();
        shared.owned.spawn(async move {
            while let Ok((tcp, _)) = ws_listener.accept().await {
                let conn = coincap_prices(tcp, s.clone());
                s.owned.spawn(conn);
            }
        });
        FakeCoinCap {
            rest_addr,
            ws_addr,
            shared,
            _stop_rest: stop_rest,
        }
    }

    /// `http://127.0.0.1:PORT/v3`; clients append `/assets` etc.
    pub fn rest_url(&self) -> String {
        format!("http://{}/v3", self.rest_addr)
    }

    /// `ws://127.0.0.1:PORT`; clients append `/prices?assets=…&apiKey=…`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.ws_addr)
    }

    /// Every REST request so far, in arrival order, keys redacted.
    pub fn rest_log(&self) -> Vec<RestCall> {
        lock(&self.shared.log).clone()
    }

    /// WebSocket connection attempts so far.
    pub fn ws_connections(&self) -> usize {
        *lock(&self.shared.ws_connections)
    }
}

/// A CoinCap error body `{"error":…,"timestamp":…}`.
fn coincap_error(status: u16, msg: &str) -> Answer {
    Answer::status(status, json!({"error": msg, "timestamp": now_ms()}).to_string())
}

/// Every REST request to [`FakeCoinCap`].
async fn coincap_rest(State(cc): State<Arc<CoinCapShared>>, headers: HeaderMap, uri: Uri) -> Response {
    let at = Instant::now();
    let q = query_params(&uri);
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let key = &cc.script.api_key;
    let authorized = bearer == Some(key.as_str()) || q.as_ref().and_then(|q| q.get("apiKey")).is_some_and(|k| k == key);
    let answer = if cc.script.deprecated {
        Answer::ok(json!({"data": {"message": COINCAP_V2_NOTICE}, "timestamp": now_ms()}).to_string())
    } else if !authorized {
        coincap_error(401, "Unauthorized")
    } else if take_one(&cc.too_many_left) {
        coincap_error(429, "Too many requests")
    } else {
        match q {
            Some(q) => coincap_serve(&cc.script, uri.path(), &q).unwrap_or_else(|e| e),
            None => coincap_error(400, "malformed query"),
        }
    };
    lock(&cc.log).push(RestCall {
        path: uri.path().to_owned(),
        query: redact_query(uri.query().unwrap_or_default()),
        status: answer.status.as_u16(),
        authorized,
        auth_header: headers.contains_key(header::AUTHORIZATION),
        at,
    });
    answer.respond(&[])
}

/// Takes one from a countdown; false once it is at zero.
fn take_one(left: &Mutex<u32>) -> bool {
    let mut left = lock(left);
    let hit = *left > 0;
    *left = left.saturating_sub(1);
    hit
}

/// Serves a v3 endpoint from the script; `Err` is a CoinCap error answer.
fn coincap_serve(script: &CoinCapScript, path: &str, q: &HashMap<String, String>) -> Result<Answer, Answer> {
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let field = |row: &Value, k: &str| row.get(k).and_then(Value::as_str).map(str::to_owned);
    let one = |list: &[Value], key: &str, id: &str| -> Result<Answer, Answer> {
        list.iter()
            .find(|row| field(row, key).as_deref() == Some(id))
            .map(|row| Answer::ok(json!({"data": row, "timestamp": now_ms()}).to_string()))
            .ok_or_else(|| coincap_error(404, &format!("{id} not found")))
    };
    let ids: Option<Vec<&str>> = q.get("ids").map(|s| s.split(',').collect());
    let by_ids = |row: &&Value| {
        ids.as_ref()
            .is_none_or(|ids| field(row, "id").is_some_and(|id| ids.contains(&id.as_str())))
    };
    match parts.as_slice() {
        ["v3", "assets"] => {
            let search = q.get("search").map(|s| s.to_lowercase());
            let rows = script.assets.iter().filter(by_ids).filter(|row| {
                search.as_ref().is_none_or(|s| {
                    ["id", "symbol", "name"]
                        .iter()
                        .any(|k| field(row, k).is_some_and(|v| v.to_lowercase().contains(s)))
                })
            });
            paged(rows, q)
        }
        ["v3", "assets", slug] => one(&script.assets, "id", slug),
        ["v3", "assets", slug, "markets"] => paged(
            script
                .markets
                .iter()
                .filter(|m| field(m, "baseId").as_deref() == Some(*slug)),
            q,
        ),
        ["v3", "rates"] => {
            let rows: Vec<&Value> = script.rates.iter().filter(by_ids).collect();
            Ok(Answer::ok(json!({"data": rows, "timestamp": now_ms()}).to_string()))
        }
        ["v3", "rates", slug] => one(&script.rates, "id", slug),
        ["v3", "exchanges"] => paged(script.exchanges.iter(), q),
        ["v3", "exchanges", id] => one(&script.exchanges, "exchangeId", id),
        ["v3", "markets"] => {
            let filters: Vec<(&str, &String)> = ["exchangeId", "baseSymbol", "baseId", "quoteSymbol", "quoteId"]
                .into_iter()
                .filter_map(|k| q.get(k).map(|v| (k, v)))
                .collect();
            let rows = script.markets.iter().filter(|row| {
                filters
                    .iter()
                    .all(|(k, v)| field(row, k).is_some_and(|f| f.eq_ignore_ascii_case(v)))
            });
            paged(rows, q)
        }
        _ => Err(coincap_error(404, "Not found")),
    }
}

/// One page of a list: `limit` (default 100, at most 2000) rows from `offset`,
/// in the `{"data":[…],"timestamp":…}` envelope.
fn paged<'a>(rows: impl Iterator<Item = &'a Value>, q: &HashMap<String, String>) -> Result<Answer, Answer> {
    let num = |k: &str, default: usize| match q.get(k) {
        None => Ok(default),
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| coincap_error(400, &format!("{k} must be a non-negative integer"))),
    };
    let limit = num("limit", 100)?;
    if limit > 2000 {
        return Err(coincap_error(400, "limit exceeds 2000"));
    }
    let offset = num("offset", 0)?;
    let page: Vec<&Value> = rows.skip(offset).take(limit).collect();
    Ok(Answer::ok(json!({"data": page, "timestamp": now_ms()}).to_string()))
}

/// One client of the CoinCap price WebSocket, from handshake to close.
async fn coincap_prices(tcp: TcpStream, cc: Arc<CoinCapShared>) {
    *lock(&cc.ws_connections) += 1;
    let mut params = None;
    // tungstenite fixes the callback's error type (an HTTP response).
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, resp: WsResponse| -> Result<WsResponse, ErrorResponse> {
        if req.uri().path() != "/prices" {
            return Err(refuse(WsStatus::NOT_FOUND, ""));
        }
        params = Some(query_params(req.uri()).ok_or_else(|| refuse(WsStatus::BAD_REQUEST, "malformed query"))?);
        Ok(resp)
    };
    let accepted = tokio_tungstenite::accept_hdr_async(tcp, callback).await;
    let (Ok(mut ws), Some(params)) = (accepted, params) else {
        return;
    };
    if params.get("apiKey") != Some(&cc.script.api_key) {
        let _ = ws.send(Message::text("Unauthorized: invalid or missing apiKey")).await;
        let _ = ws.close(None).await;
        drain_close(&mut ws).await;
        return;
    }
    // `assets=ALL` is everything; otherwise only the listed slugs (none if absent).
    let assets: Option<Vec<String>> = match params.get("assets").map(String::as_str) {
        Some("ALL") => None,
        Some(list) => Some(list.split(',').map(str::to_owned).collect()),
        None => Some(Vec::new()),
    };
    for frame in &cc.script.price_frames {
        let text = match (serde_json::from_str::<serde_json::Map<String, Value>>(frame), &assets) {
            (Ok(mut prices), Some(wanted)) => {
                prices.retain(|slug, _| wanted.contains(slug));
                if prices.is_empty() {
                    continue;
                }
                Value::Object(prices).to_string()
            }
            _ => frame.clone(),
        };
        if ws.send(Message::text(text)).await.is_err() {
            return;
        }
    }
    // Keep the socket open (answering pings) until the client leaves.
    while let Some(Ok(_)) = ws.next().await {}
}
