//! The fake CoinCap: recorded lists with v3 paging and key checks, and price frames.

use super::http::*;
use super::*;

/// State shared by the tasks of [`FakeCoinCap`].
pub(crate) struct CoinCapShared {
    /// What to serve.
    pub(crate) script: CoinCapScript,
    /// 429s still to answer.
    pub(crate) too_many_left: Mutex<u32>,
    /// Every REST request so far.
    pub(crate) log: Mutex<Vec<RestCall>>,
    /// WebSocket connection attempts.
    pub(crate) ws_connections: Mutex<usize>,
    /// Connection tasks, aborted with the fake.
    pub(crate) owned: Owned,
}

/// A CoinCap v3 impersonator: REST on one loopback port, the price WebSocket on
/// another. Dropping it stops both.
pub struct FakeCoinCap {
    /// State shared with the server tasks, read by the accessors.
    pub(crate) shared: Arc<CoinCapShared>,
    /// The REST and WebSocket servers.
    pub(crate) servers: Servers,
}

impl Owner for CoinCapShared {
    fn owned(&self) -> &Owned {
        &self.owned
    }
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
        let app = Router::new().fallback(coincap_rest).with_state(shared.clone());
        let servers = Servers::start(&shared, app, coincap_prices).await;
        FakeCoinCap { shared, servers }
    }

    /// `http://127.0.0.1:PORT/v3`; clients append `/assets` etc.
    pub fn rest_url(&self) -> String {
        format!("{}/v3", self.servers.rest_url())
    }

    /// `ws://127.0.0.1:PORT`; clients append `/prices?assets=…&apiKey=…`.
    pub fn ws_url(&self) -> String {
        self.servers.ws_url()
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
pub(crate) fn coincap_error(status: u16, msg: &str) -> Answer {
    Answer::status(status, json!({"error": msg, "timestamp": now_ms()}).to_string())
}

/// Every REST request to [`FakeCoinCap`].
pub(crate) async fn coincap_rest(State(cc): State<Arc<CoinCapShared>>, headers: HeaderMap, uri: Uri) -> Response {
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
pub(crate) fn take_one(left: &Mutex<u32>) -> bool {
    let mut left = lock(left);
    let hit = *left > 0;
    *left = left.saturating_sub(1);
    hit
}

/// Serves a v3 endpoint from the script; `Err` is a CoinCap error answer.
pub(crate) fn coincap_serve(script: &CoinCapScript, path: &str, q: &HashMap<String, String>) -> Result<Answer, Answer> {
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
pub(crate) fn paged<'a>(rows: impl Iterator<Item = &'a Value>, q: &HashMap<String, String>) -> Result<Answer, Answer> {
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
pub(crate) async fn coincap_prices(tcp: TcpStream, cc: Arc<CoinCapShared>) {
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
