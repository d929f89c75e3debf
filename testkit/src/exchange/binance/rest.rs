//! The fake Binance's REST endpoints, with weights, limits and faults.

use super::*;

/// REST bookkeeping of [`FakeBinance`].
#[derive(Default)]
pub(crate) struct RestState {
    /// Every request so far.
    pub(crate) log: Vec<RestCall>,
    /// Requests seen, per index of a counted fault (`TooMany`: 429s given; `Outage`: all).
    pub(crate) faults_used: HashMap<usize, u32>,
    /// The minute (since the epoch) the weight counter is for.
    pub(crate) minute: i64,
    /// Weight used in that minute.
    pub(crate) used: u32,
}

/// What the REST handler needs.
pub(crate) struct BinanceRest {
    /// The faults and klines.
    pub(crate) script: Arc<BinanceScript>,
    /// The trades and symbols.
    pub(crate) replay: Arc<Replay>,
    /// The log and weight counter.
    pub(crate) shared: Arc<BinanceShared>,
}

/// The request weight of an endpoint, as Binance counts it.
pub(crate) fn weight_of(path: &str) -> u32 {
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
pub(crate) async fn binance_rest(State(rest): State<Arc<BinanceRest>>, headers: HeaderMap, uri: Uri) -> Response {
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
    pub(crate) fn answer(&self, path: &str, uri: &Uri) -> (u32, Answer) {
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
    pub(crate) fn serve(&self, path: &str, uri: &Uri) -> Result<Answer, Answer> {
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
    pub(crate) fn symbol(&self, q: &HashMap<String, String>) -> Result<String, Answer> {
        let s = required(q, "symbol")?;
        if self.replay.symbols.contains(s) {
            Ok(s.to_owned())
        } else {
            Err(Answer::binance(400, -1121, "Invalid symbol."))
        }
    }

    /// `GET /api/v3/aggTrades`: by `fromId`, or by `startTime`/`endTime` (less
    /// than an hour apart), or the most recent.
    pub(crate) fn agg_trades(&self, q: &HashMap<String, String>) -> Result<Answer, Answer> {
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
    pub(crate) fn klines(&self, q: &HashMap<String, String>) -> Result<Answer, Answer> {
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
    pub(crate) fn exchange_info(&self, q: &HashMap<String, String>) -> Result<Answer, Answer> {
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
pub(crate) fn split_symbol(s: &str) -> (&str, &str) {
    const QUOTES: [&str; 12] = [
        "FDUSD", "USDT", "USDC", "BUSD", "TUSD", "BTC", "ETH", "BNB", "EUR", "TRY", "BRL", "USD",
    ];
    QUOTES
        .iter()
        .find_map(|q| s.strip_suffix(q).filter(|b| !b.is_empty()).map(|b| (b, *q)))
        .unwrap_or((s, ""))
}

/// A mandatory parameter, or Binance's `-1102`.
pub(crate) fn required<'a>(q: &'a HashMap<String, String>, name: &str) -> Result<&'a str, Answer> {
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
pub(crate) fn int_param(q: &HashMap<String, String>, name: &str) -> Result<Option<i64>, Answer> {
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
pub(crate) fn limit_param(q: &HashMap<String, String>, default: usize, max: usize) -> Result<usize, Answer> {
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
pub(crate) fn first_rows(rows: Option<&BTreeMap<i64, Row>>, ids: std::ops::RangeFrom<i64>, limit: usize) -> Vec<&str> {
    rows.map(|r| r.range(ids).take(limit).map(|(_, row)| row.json.as_str()).collect())
        .unwrap_or_default()
}

/// The last `limit` rows, ascending: what Binance answers without `fromId`.
pub(crate) fn last_rows(rows: Option<&BTreeMap<i64, Row>>, limit: usize) -> Vec<&str> {
    let mut page: Vec<&str> = rows
        .map(|r| r.values().rev().take(limit).map(|row| row.json.as_str()).collect())
        .unwrap_or_default();
    page.reverse();
    page
}

/// A JSON array of pre-rendered rows.
pub(crate) fn rows_answer(rows: Vec<&str>) -> Answer {
    Answer::ok(format!("[{}]", rows.join(",")))
}
