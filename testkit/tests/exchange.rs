//! The fake exchanges behave like the real ones: a real client (tokio-tungstenite,
//! reqwest) against `FakeBinance` replaying the real spot BTCUSDT capture and
//! `FakeCoinCap` serving the recorded CoinCap lists, fault by fault.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tickpipe_testkit::exchange::{
    capture_messages, coincap_v2_lists, BinanceScript, CoinCapScript, FakeBinance, FakeCoinCap, RestFault, WsFault,
};
use tickpipe_testkit::stack;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A WebSocket client connection.
type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Fails the test instead of hanging when a fake misbehaves.
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// The spot BTCUSDT capture of 2024-08-08, if the real data is here.
fn capture() -> Option<PathBuf> {
    let dir = stack::real_data("binance_ws_raw_2024-08-08")?;
    Some(dir.join("spot_btcusdt_20240808.ts_json.txt.gz"))
}

async fn connect(url: &str) -> Client {
    within("connect", tokio_tungstenite::connect_async(url))
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"))
        .0
}

/// The next text frame (pings and pongs are skipped; reading answers pings),
/// or `None` when the connection ends.
async fn next_text(c: &mut Client) -> Option<String> {
    loop {
        match within("next frame", c.next()).await {
            Some(Ok(Message::Text(t))) => return Some(t.to_string()),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(_)) | Some(Err(_)) | None => return None,
        }
    }
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

/// Trade ids of the `btcusdt@trade` messages among `messages`.
fn trade_ids(messages: &[String]) -> Vec<i64> {
    messages
        .iter()
        .filter(|m| m.starts_with(r#"{"stream":"btcusdt@trade""#))
        .map(|m| parse(m)["data"]["t"].as_i64().expect("t"))
        .collect()
}

#[test]
fn capture_messages_reads_both_recorders_formats() {
    let Some(file) = capture() else { return };
    let messages = capture_messages(&file);
    // 41,249 lines, one of which is the REST depth snapshot.
    assert_eq!(messages.len(), 41_248);
    assert!(messages.iter().all(|m| m.starts_with(r#"{"stream":"btcusdt@"#)));
    assert_eq!(trade_ids(&messages).len(), 9_757);
    let Some(dir) = stack::real_data("binance_ws_raw_cryptofeed_2021") else {
        return;
    };
    // The URL line and the blank line are skipped: depthUpdate 177, bookTicker
    // 84, aggTrade 2, kline 2.
    assert_eq!(capture_messages(&dir.join("BINANCE.ws.1.0")).len(), 265);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_subscribed_trades_arrive_and_a_drop_loses_exactly_what_it_says() {
    let Some(file) = capture() else { return };
    let messages = capture_messages(&file);
    let (drop_at, lose) = (4_000, 2_000);
    let before = trade_ids(&messages[..drop_at]);
    let lost = trade_ids(&messages[drop_at..drop_at + lose]);
    let after = trade_ids(&messages[drop_at + lose..]);
    assert!(lost.len() > 100);
    let script = BinanceScript {
        faults: vec![
            WsFault::Ping {
                at: 1_000,
                payload: b"hello".to_vec(),
            },
            WsFault::Drop { at: drop_at, lose },
        ],
        rest_faults: vec![RestFault::TooMany {
            path: "/api/v3/historicalTrades".into(),
            times: 1,
            retry_after_secs: 2,
        }],
        ..BinanceScript::from_capture(&file)
    };
    let fake = FakeBinance::start(script).await;
    let url = format!("{}/stream?streams=btcusdt@trade", fake.ws_url());

    let mut first = connect(&url).await;
    let mut got = Vec::new();
    while let Some(text) = next_text(&mut first).await {
        let v = parse(&text);
        assert_eq!(v["stream"], "btcusdt@trade", "{text}");
        assert_eq!(v["data"]["e"], "trade", "{text}");
        got.push(v["data"]["t"].as_i64().expect("t"));
    }
    assert_eq!(got, before, "everything before the drop, nothing after");
    assert_eq!(
        fake.pongs(),
        vec![b"hello".to_vec()],
        "the ping was answered before the drop"
    );

    let mut second = connect(&url).await;
    let resumed: Vec<i64> = {
        let mut ids = Vec::new();
        while ids.len() < 10 {
            let text = next_text(&mut second).await.expect("data after the reconnect");
            ids.push(parse(&text)["data"]["t"].as_i64().expect("t"));
        }
        ids
    };
    assert_eq!(resumed, after[..10], "the stream resumes after the lost messages");
    assert_eq!(fake.connections(), 2);
    assert_eq!(fake.refused_connections(), 0);

    // The lost trades come back over REST, after one 429.
    let http = reqwest::Client::new();
    let repair = format!(
        "{}/api/v3/historicalTrades?symbol=BTCUSDT&fromId={}&limit=1000",
        fake.rest_url(),
        lost[0]
    );
    let refused = http.get(&repair).send().await.expect("send");
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "2");
    assert!(refused.headers().contains_key("x-mbx-used-weight-1m"));
    assert_eq!(refused.json::<Value>().await.expect("json")["code"], -1003);
    let page = http.get(&repair).send().await.expect("send");
    assert_eq!(page.status(), 200);
    let weight: u32 = page.headers()["x-mbx-used-weight-1m"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("number");
    assert!(weight >= 25, "historicalTrades weighs 25: {weight}");
    let rows: Vec<Value> = page.json().await.expect("json");
    assert_eq!(rows.len(), 1000);
    let ids: Vec<i64> = rows.iter().map(|r| r["id"].as_i64().expect("id")).collect();
    assert_eq!(ids[..lost.len()], lost[..], "the lost ids, in order");
    assert_eq!(ids[lost.len()], after[0]);
    // Rows are shaped like Binance's, from the recorded strings.
    let recorded = messages
        .iter()
        .map(|m| parse(m))
        .find(|v| v["data"]["t"] == lost[0])
        .expect("recorded");
    let row = &rows[0];
    assert_eq!(row["price"], recorded["data"]["p"]);
    assert_eq!(row["qty"], recorded["data"]["q"]);
    assert_eq!(row["time"], recorded["data"]["T"]);
    assert_eq!(row["isBuyerMaker"], recorded["data"]["m"]);
    assert_eq!(row["isBestMatch"], true);
    assert!(row["quoteQty"]
        .as_str()
        .is_some_and(|q| q.split('.').nth(1).map(str::len) == Some(8)));
    let log = fake.rest_log();
    assert_eq!(log.len(), 2);
    assert!(log.iter().all(|c| c.path == "/api/v3/historicalTrades"));
    assert_eq!(log[0].status, 429);
    assert_eq!(log[1].query, format!("symbol=BTCUSDT&fromId={}&limit=1000", lost[0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withheld_ids_never_reach_the_socket_but_rest_has_them() {
    let Some(file) = capture() else { return };
    let mut messages = capture_messages(&file);
    messages.truncate(3_000);
    let ids = trade_ids(&messages);
    let gap = ids[10]..=ids[19];
    let script = BinanceScript {
        messages,
        ..BinanceScript::default()
    }
    .without_trades("btcusdt", gap.clone());
    let fake = FakeBinance::start(script).await;
    let mut c = connect(&format!("{}/stream?streams=btcusdt@trade", fake.ws_url())).await;
    let mut got = Vec::new();
    while got.len() < ids.len() - 10 {
        let text = next_text(&mut c).await.expect("trade");
        got.push(parse(&text)["data"]["t"].as_i64().expect("t"));
    }
    within("finish", fake.wait_finished()).await;
    assert!(fake.finished());
    let expected: Vec<i64> = ids.iter().copied().filter(|t| !gap.contains(t)).collect();
    assert_eq!(got, expected);
    let rows: Vec<Value> = reqwest::get(format!(
        "{}/api/v3/historicalTrades?symbol=BTCUSDT&fromId={}&limit=10",
        fake.rest_url(),
        gap.start()
    ))
    .await
    .expect("send")
    .json()
    .await
    .expect("json");
    let served: Vec<i64> = rows.iter().map(|r| r["id"].as_i64().expect("id")).collect();
    assert_eq!(served, gap.collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_streams_and_control_messages() {
    let Some(file) = capture() else { return };
    let mut messages = capture_messages(&file);
    messages.truncate(2_000);
    let first_trade = messages
        .iter()
        .find(|m| m.starts_with(r#"{"stream":"btcusdt@trade""#))
        .cloned()
        .expect("a trade");
    // The Ping fault holds the stream until the client has answered, and the
    // client's SUBSCRIBE goes out before its Pong: bookTickers follow it.
    let script = BinanceScript {
        messages,
        faults: vec![WsFault::Ping {
            at: 1_000,
            payload: b"p".to_vec(),
        }],
        ..BinanceScript::default()
    };
    let fake = FakeBinance::start(script).await;
    let mut c = connect(&format!("{}/ws/btcusdt@trade", fake.ws_url())).await;
    c.send(Message::text(
        r#"{"method":"SUBSCRIBE","params":["btcusdt@bookTicker"],"id":7}"#,
    ))
    .await
    .expect("send");
    c.send(Message::text(r#"{"method":"LIST_SUBSCRIPTIONS","id":8}"#))
        .await
        .expect("send");
    c.send(Message::Ping(b"client".to_vec().into())).await.expect("ping");
    let mut texts = Vec::new();
    let mut pong = None;
    let mut pinged = false;
    let mut tickers_after_ping = 0;
    while tickers_after_ping < 3 {
        match within("next frame", c.next()).await {
            Some(Ok(Message::Text(t))) => {
                if pinged && t.contains(r#""A":"#) {
                    tickers_after_ping += 1;
                }
                texts.push(t.to_string());
            }
            Some(Ok(Message::Pong(p))) => pong = Some(p.to_vec()),
            Some(Ok(Message::Ping(_))) => pinged = true,
            other => panic!("connection ended: {other:?}"),
        }
    }
    // A raw stream sends the bare payload, byte for byte.
    let data_at = first_trade.find(r#""data":"#).expect("envelope") + 7;
    let first_data = &first_trade[data_at..first_trade.len() - 1];
    let received = texts.iter().find(|t| t.contains(r#""e":"trade""#)).expect("a trade");
    assert_eq!(received, first_data);
    assert!(texts.iter().all(|t| !t.starts_with(r#"{"stream""#)));
    assert!(
        texts.iter().any(|t| t == r#"{"result":null,"id":7}"#),
        "{:?}",
        &texts[..5]
    );
    assert!(texts
        .iter()
        .any(|t| t == r#"{"result":["btcusdt@bookTicker","btcusdt@trade"],"id":8}"#));
    assert_eq!(pong.as_deref(), Some(&b"client"[..]), "client pings are answered");
    assert_eq!(fake.pongs(), vec![b"p".to_vec()]);
    assert_eq!(fake.too_fast_connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_more_than_five_messages_a_second_is_dropped() {
    let fake = FakeBinance::start(BinanceScript::default()).await;
    let mut c = connect(&format!("{}/ws/btcusdt@trade", fake.ws_url())).await;
    for n in 0..6 {
        c.send(Message::text(format!(r#"{{"method":"LIST_SUBSCRIPTIONS","id":{n}}}"#)))
            .await
            .expect("send");
    }
    let mut replies = 0;
    while next_text(&mut c).await.is_some() {
        replies += 1;
    }
    assert_eq!(replies, 5, "the sixth message ends the connection");
    assert_eq!(fake.too_fast_connections(), 1);
    // An unknown path is not a stream.
    let err = tokio_tungstenite::connect_async(format!("{}/nope", fake.ws_url()))
        .await
        .expect_err("404");
    assert!(matches!(err, tokio_tungstenite::tungstenite::Error::Http(r) if r.status() == 404));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_shutdown_closes_the_old_connection_after_the_overlap() {
    let Some(file) = capture() else { return };
    let mut messages = capture_messages(&file);
    messages.truncate(8_000);
    let overlap = 20;
    let script = BinanceScript {
        messages,
        faults: vec![WsFault::ServerShutdown { at: 500, overlap }],
        ..BinanceScript::default()
    };
    let fake = FakeBinance::start(script).await;
    let url = format!("{}/stream?streams=btcusdt@trade", fake.ws_url());
    let mut old = connect(&url).await;
    loop {
        let text = next_text(&mut old).await.expect("data before the announcement");
        if text.starts_with(r#"{"e":"serverShutdown","E":"#) {
            break;
        }
    }
    let mut new = connect(&url).await;
    let mut new_ids = Vec::new();
    while new_ids.len() < overlap {
        let text = next_text(&mut new).await.expect("data on the new connection");
        new_ids.push(parse(&text)["data"]["t"].as_i64().expect("t"));
    }
    // The old connection streams on until the new one has `overlap` messages,
    // then gets a close frame.
    let mut old_last = None;
    let close = loop {
        match within("old connection", old.next()).await {
            Some(Ok(Message::Text(t))) => old_last = parse(&t)["data"]["t"].as_i64(),
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => {}
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(close.map(|f| f.code), Some(CloseCode::Away));
    assert_eq!(
        old_last,
        new_ids.last().copied(),
        "both saw the overlap, nothing is missing"
    );
    assert!(next_text(&mut new).await.is_some(), "the new connection lives on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_is_silence_and_a_malformed_frame_is_sent_as_is() {
    let Some(file) = capture() else { return };
    let mut messages = capture_messages(&file);
    messages.truncate(300);
    let truncated = r#"{"stream":"btcusdt@trade","data":{"e":"trade","#;
    let script = BinanceScript {
        messages: messages.clone(),
        faults: vec![
            WsFault::Malformed {
                at: 100,
                text: truncated.into(),
            },
            WsFault::Stall { at: 200, millis: 400 },
        ],
        ..BinanceScript::default()
    };
    let fake = FakeBinance::start(script).await;
    let all = "btcusdt@trade/btcusdt@bookTicker/btcusdt@depth@100ms";
    let start = Instant::now();
    let mut c = connect(&format!("{}/stream?streams={all}", fake.ws_url())).await;
    let mut got = Vec::new();
    let mut times = Vec::new();
    while got.len() < messages.len() + 1 {
        got.push(next_text(&mut c).await.expect("frame"));
        times.push(start.elapsed());
    }
    assert_eq!(got[..100], messages[..100]);
    assert_eq!(got[100], truncated);
    assert_eq!(got[101..], messages[100..], "all streams, exactly as recorded");
    // Message 200 is frame 201; the stall began after the connection.
    assert!(times[201] >= Duration::from_millis(400), "{:?}", times[201]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_300_connections_in_5_minutes_are_refused() {
    let fake = FakeBinance::start(BinanceScript::default()).await;
    let url = format!("{}/stream?streams=btcusdt@trade", fake.ws_url());
    for _ in 0..300 {
        let mut c = connect(&url).await;
        c.close(None).await.expect("close");
    }
    let err = tokio_tungstenite::connect_async(&url)
        .await
        .expect_err("the 301st is refused");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 429),
        other => panic!("not an HTTP refusal: {other}"),
    }
    assert_eq!(fake.connections(), 301);
    assert_eq!(fake.refused_connections(), 1);
}

/// Real data.binance.vision ADABTC 1m klines as REST rows (12 values, numbers
/// where Binance sends numbers).
fn adabtc_klines() -> Option<Vec<Value>> {
    let dir = stack::real_data("binance_vision_format_samples")?;
    let mut rows = Vec::new();
    for day in ["27", "28"] {
        let text = std::fs::read_to_string(dir.join(format!("ADABTC-1m-2021-11-{day}.csv"))).expect("read");
        for line in text.lines() {
            let row: Vec<Value> = line
                .split(',')
                .enumerate()
                .map(|(i, f)| match i {
                    0 | 6 | 8 => Value::from(f.parse::<i64>().expect("integer")),
                    _ => Value::from(f),
                })
                .collect();
            rows.push(Value::Array(row));
        }
    }
    Some(rows)
}

async fn get(url: String) -> (u16, reqwest::header::HeaderMap, Value) {
    let resp = reqwest::get(&url).await.unwrap_or_else(|e| panic!("{url}: {e}"));
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.expect("body");
    (status, headers, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// GETs `url` and expects Binance's refusal of a bad request: a 400 with the
/// error `code`.
async fn refused(url: String, code: i64) {
    let (status, _, body) = get(url.clone()).await;
    assert_eq!((status, body["code"].as_i64()), (400, Some(code)), "{url}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_endpoints_answer_like_binance() {
    let Some(klines) = adabtc_klines() else { return };
    let Some(dir) = stack::real_data("binance_ws_raw_cryptofeed_2021") else {
        return;
    };
    let script = BinanceScript {
        messages: capture_messages(&dir.join("BINANCE_FUTURES.ws.1.0")),
        klines: BTreeMap::from([(("ADABTC".to_owned(), "1m".to_owned()), klines.clone())]),
        rest_faults: vec![RestFault::Status {
            path: "/api/v3/ticker/price".into(),
            status: 451,
            body: r#"{"code":0,"msg":"Service unavailable from a restricted location"}"#.into(),
        }],
        ..BinanceScript::default()
    };
    let fake = FakeBinance::start(script).await;
    let base = format!("{}/api/v3", fake.rest_url());

    // Klines: within [startTime, endTime], or the latest without startTime.
    let (status, headers, body) = get(format!(
        "{base}/klines?symbol=ADABTC&interval=1m&startTime=1637971260000&endTime=1637971500000&limit=3"
    ))
    .await;
    assert_eq!(status, 200);
    assert!(headers.contains_key("x-mbx-used-weight-1m"));
    assert_eq!(body, Value::Array(klines[1..4].to_vec()));
    let (_, _, body) = get(format!("{base}/klines?symbol=ADABTC&interval=1m&limit=2")).await;
    assert_eq!(body, Value::Array(klines[klines.len() - 2..].to_vec()));
    refused(format!("{base}/klines?symbol=ADABTC&interval=1m&limit=1001"), -1130).await;
    refused(format!("{base}/klines?symbol=ADABTC&interval=7m"), -1120).await;
    refused(format!("{base}/klines?interval=1m"), -1102).await;
    refused(format!("{base}/klines?symbol=NOPE&interval=1m"), -1121).await;

    // aggTrades from the recorded @aggTrade messages.
    let (status, _, body) = get(format!("{base}/aggTrades?symbol=SUSHIUSDT&limit=1000")).await;
    assert_eq!(status, 200);
    let rows = body.as_array().expect("list");
    assert_eq!(rows.len(), 40);
    let keys: Vec<&str> = rows[0]
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys.len(), 8);
    for k in ["a", "p", "q", "f", "l", "T", "m", "M"] {
        assert!(keys.contains(&k), "{k} in {:?}", rows[0]);
    }
    let a5 = rows[5]["a"].as_i64().expect("a");
    let (_, _, body) = get(format!("{base}/aggTrades?symbol=SUSHIUSDT&fromId={a5}&limit=2")).await;
    assert_eq!(body, Value::Array(rows[5..7].to_vec()));
    let t = rows[5]["T"].as_i64().expect("T");
    let (_, _, body) = get(format!("{base}/aggTrades?symbol=SUSHIUSDT&startTime={t}&endTime={t}")).await;
    assert!(body
        .as_array()
        .is_some_and(|r| !r.is_empty() && r.iter().all(|r| r["T"] == t)));
    refused(
        format!("{base}/aggTrades?symbol=SUSHIUSDT&startTime=0&endTime=3600001"),
        -1127,
    )
    .await;
    refused(format!("{base}/aggTrades?symbol=SUSHIUSDT&fromId=x"), -1100).await;

    // exchangeInfo: the weight limit and the symbols, all trading.
    let (status, headers, body) = get(format!("{base}/exchangeInfo")).await;
    assert_eq!(status, 200);
    let weight: u32 = headers["x-mbx-used-weight-1m"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("number");
    assert!(weight >= 20);
    assert_eq!(body["rateLimits"][0]["rateLimitType"], "REQUEST_WEIGHT");
    assert_eq!(body["rateLimits"][0]["limit"], 6000);
    let symbols: Vec<&str> = body["symbols"]
        .as_array()
        .expect("symbols")
        .iter()
        .map(|s| s["symbol"].as_str().expect("symbol"))
        .collect();
    for s in ["ADABTC", "AKROUSDT", "CTKUSDT", "KEEPUSDT", "SUSHIUSDT"] {
        assert!(symbols.contains(&s), "{s} in {symbols:?}");
    }
    assert!(body["symbols"]
        .as_array()
        .expect("symbols")
        .iter()
        .all(|s| s["status"] == "TRADING"));
    let (_, _, body) = get(format!("{base}/exchangeInfo?symbol=SUSHIUSDT")).await;
    assert_eq!(body["symbols"][0]["baseAsset"], "SUSHI");
    assert_eq!(body["symbols"][0]["quoteAsset"], "USDT");

    // A scripted status, and the log.
    let (status, _, body) = get(format!("{base}/ticker/price")).await;
    assert_eq!(status, 451);
    assert_eq!(body["msg"], "Service unavailable from a restricted location");
    let log = fake.rest_log();
    assert_eq!(log.len(), 14);
    assert_eq!(log[0].path, "/api/v3/klines");
    assert_eq!(
        log[0].query,
        "symbol=ADABTC&interval=1m&startTime=1637971260000&endTime=1637971500000&limit=3"
    );
    assert!(log.windows(2).all(|w| w[0].at <= w[1].at));
}

fn coincap_script() -> Option<CoinCapScript> {
    let dir = stack::real_data("coincap_v2")?;
    let (assets, rates, exchanges, markets) = coincap_v2_lists(&dir);
    Some(CoinCapScript {
        api_key: "s3cret-key".into(),
        assets,
        rates,
        exchanges,
        markets,
        ..CoinCapScript::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coincap_serves_the_recorded_lists_behind_the_key() {
    let Some(script) = coincap_script() else { return };
    assert!(
        !format!("{script:?}").contains("s3cret-key"),
        "Debug never shows the key"
    );
    let fake = FakeCoinCap::start(CoinCapScript { too_many: 1, ..script }).await;
    let http = reqwest::Client::new();
    let call = |path: &str, key: Option<&str>| {
        let mut req = http.get(format!("{}{path}", fake.rest_url()));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        async move {
            let resp = req.send().await.expect("send");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.expect("json"))
        }
    };
    let key = Some("s3cret-key");
    let (status, body) = call("/exchanges", key).await;
    assert_eq!(status, 429);
    assert!(body["error"].is_string() && body["timestamp"].is_i64());
    let (status, body) = call("/exchanges?limit=50", key).await;
    assert_eq!(status, 200);
    assert_eq!(body["data"].as_array().map(Vec::len), Some(50));
    assert!(body["timestamp"].is_i64());
    let (_, body) = call("/exchanges?limit=50&offset=50", key).await;
    assert_eq!(body["data"].as_array().map(Vec::len), Some(12), "62 exchanges in all");
    let (status, body) = call("/exchanges?limit=2001", key).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("limit exceeds 2000")));
    let (_, body) = call("/rates", key).await;
    assert_eq!(body["data"].as_array().map(Vec::len), Some(169));
    let (_, body) = call("/assets?ids=bitcoinz,bitcoindark", key).await;
    assert_eq!(body["data"].as_array().map(Vec::len), Some(2));
    let (_, body) = call("/assets/bitcoinz", key).await;
    assert_eq!(body["data"]["id"], "bitcoinz");
    let (status, _) = call("/assets/nope", key).await;
    assert_eq!(status, 404);
    let (_, body) = call("/markets?baseSymbol=ETH", key).await;
    assert_eq!(body["data"].as_array().map(Vec::len), Some(2));
    let (status, body) = call("/assets", Some("wrong")).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("Unauthorized")));
    let (status, _) = call("/assets", None).await;
    assert_eq!(status, 401);
    let (status, _) = call("/assets?apiKey=s3cret-key", None).await;
    assert_eq!(status, 200, "the key may come in the query");

    let log = fake.rest_log();
    assert_eq!(log.len(), 12);
    assert!(
        !format!("{log:?}").contains("s3cret-key"),
        "the log never shows the key"
    );
    assert_eq!(log[11].query, "apiKey=<redacted>");
    assert!(log[11].authorized && !log[11].auth_header);
    assert!(log[..9].iter().all(|c| c.authorized && c.auth_header));
    assert!(!log[9].authorized && log[9].auth_header);
    assert!(!log[10].authorized && !log[10].auth_header);
    assert_eq!(log[0].status, 429);
    assert_eq!(log[2].query, "limit=50&offset=50");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coincap_v2_answers_its_deprecation_notice() {
    let Some(script) = coincap_script() else { return };
    let fake = FakeCoinCap::start(CoinCapScript {
        deprecated: true,
        ..script
    })
    .await;
    let body: Value = reqwest::get(format!("{}/assets", fake.rest_url()))
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert!(body["data"].is_object(), "data is an object, not the list");
    assert!(body["data"]["message"].as_str().is_some_and(|m| m.contains("V3")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coincap_prices_only_for_the_asked_assets_and_only_with_the_key() {
    let script = CoinCapScript {
        api_key: "k".into(),
        price_frames: vec![
            r#"{"bitcoin":"68051.2231","ethereum":"3621.0817"}"#.into(),
            r#"{"ethereum":"3622.0000"}"#.into(),
            r#"{"bitcoin":"68052.0000"}"#.into(),
        ],
        ..CoinCapScript::default()
    };
    let fake = FakeCoinCap::start(script).await;
    let mut c = connect(&format!("{}/prices?assets=bitcoin&apiKey=k", fake.ws_url())).await;
    assert_eq!(next_text(&mut c).await.as_deref(), Some(r#"{"bitcoin":"68051.2231"}"#));
    assert_eq!(next_text(&mut c).await.as_deref(), Some(r#"{"bitcoin":"68052.0000"}"#));
    let mut all = connect(&format!("{}/prices?assets=ALL&apiKey=k", fake.ws_url())).await;
    for _ in 0..3 {
        assert!(next_text(&mut all).await.is_some());
    }
    let mut wrong = connect(&format!("{}/prices?assets=bitcoin&apiKey=nope", fake.ws_url())).await;
    let text = next_text(&mut wrong).await.expect("a frame");
    assert!(text.starts_with("Unauthorized"), "{text}");
    assert_eq!(next_text(&mut wrong).await, None, "then the socket closes");
    assert_eq!(fake.ws_connections(), 3);
}
