//! The fake Binance: the recording prepared for replay, and the handle a test holds.

mod rest;
mod ws;

use super::http::*;
use super::*;
use rest::*;
use ws::*;

/// One entry of the recording, parsed once.
pub(crate) struct Prepared {
    /// Its stream name; `None` when the entry is not an envelope (it then goes
    /// to every connection as it is).
    pub(crate) stream: Option<String>,
    /// Byte range of `data` in the entry, sent alone to raw (`/ws/…`) connections.
    pub(crate) data: Range<usize>,
    /// Withheld by [`BinanceScript::without_trades`].
    pub(crate) withheld: bool,
}

/// A REST row and the time it is filtered by.
pub(crate) struct Row {
    /// Trade time (`T`), ms.
    pub(crate) time: i64,
    /// The row as Binance renders it, keys in Binance's order.
    pub(crate) json: String,
}

/// The recording, parsed: what the socket sends and what REST serves.
pub(crate) struct Replay {
    /// One per message of the script.
    pub(crate) items: Vec<Prepared>,
    /// `historicalTrades` rows per SYMBOL by trade id, from every `@trade` message.
    pub(crate) trades: HashMap<String, BTreeMap<i64, Row>>,
    /// `aggTrades` rows per SYMBOL by aggregate id, from every `@aggTrade` message.
    pub(crate) aggs: HashMap<String, BTreeMap<i64, Row>>,
    /// Every SYMBOL of the recording and of the klines, for `exchangeInfo` and
    /// `-1121 Invalid symbol.`.
    pub(crate) symbols: BTreeSet<String>,
}

/// A combined-stream envelope, borrowing the recorded text.
#[derive(Deserialize)]
pub(crate) struct Envelope<'a> {
    /// Stream name, e.g. `btcusdt@trade`.
    #[serde(borrow)]
    pub(crate) stream: Cow<'a, str>,
    /// The payload, exactly as recorded.
    #[serde(borrow)]
    pub(crate) data: &'a RawValue,
}

/// Parses the recording; panics on a trade message without its fields (a
/// broken recording is a test bug).
pub(crate) fn prepare(script: &BinanceScript) -> Replay {
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

/// A Binance impersonator: a WebSocket server and a REST server on two loopback
/// ports, replaying one [`BinanceScript`]. Dropping it stops both.
pub struct FakeBinance {
    /// State shared with the server tasks, read by the accessors.
    shared: Arc<BinanceShared>,
    /// The WebSocket and REST servers.
    servers: Servers,
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
        let app = Router::new().fallback(binance_rest).with_state(Arc::new(BinanceRest {
            script: script.clone(),
            replay: replay.clone(),
            shared: shared.clone(),
        }));
        let servers = Servers::start(&shared, app, binance_connection).await;
        shared.owned.spawn(broadcast(script, replay, shared.clone()));
        FakeBinance { shared, servers }
    }

    /// `ws://127.0.0.1:PORT`; clients append `/stream?streams=…` or `/ws/<stream>`.
    pub fn ws_url(&self) -> String {
        self.servers.ws_url()
    }

    /// `http://127.0.0.1:PORT`; clients append `/api/v3/…`.
    pub fn rest_url(&self) -> String {
        self.servers.rest_url()
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
