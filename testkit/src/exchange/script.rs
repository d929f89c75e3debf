//! What a test scripts: the recording each fake replays and the faults it injects.

use super::*;

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
    pub(crate) fn at(&self) -> usize {
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
