//! The fake Binance's WebSocket: connections, subscriptions and the broadcaster.

use super::*;

/// What the broadcaster asks a connection task to do.
pub(crate) enum Out {
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
pub(crate) struct Sub {
    /// Streams it receives (from its URL and `SUBSCRIBE`), sorted for
    /// `LIST_SUBSCRIPTIONS`.
    pub(crate) streams: BTreeSet<String>,
    /// A `/ws/…` connection, sent the bare `data` objects.
    pub(crate) raw: bool,
    /// Its unbounded queue: delivery never drops a message.
    pub(crate) tx: mpsc::UnboundedSender<Out>,
    /// Messages of the recording delivered to it, for `serverShutdown` overlap.
    pub(crate) received: usize,
    /// Announced by `serverShutdown`: closes once a newer connection has
    /// received this many messages.
    pub(crate) doomed: Option<usize>,
    /// Pinged by a `Ping` fault and not answered yet.
    pub(crate) awaiting_pong: bool,
}

/// WebSocket bookkeeping of [`FakeBinance`].
#[derive(Default)]
pub(crate) struct WsState {
    /// Open connections by id (ids grow: a larger id is a newer connection).
    pub(crate) subs: BTreeMap<u64, Sub>,
    /// The last id handed out.
    pub(crate) last_id: u64,
    /// Times of recent connection attempts, for the 300-per-5-minutes rule.
    pub(crate) attempts: VecDeque<Instant>,
    /// Every connection attempt.
    pub(crate) connections: usize,
    /// Attempts refused with 429.
    pub(crate) refused: usize,
    /// Connections dropped for sending more than 5 messages in a second.
    pub(crate) too_fast: usize,
    /// Payloads of the Pongs received.
    pub(crate) pongs: Vec<Vec<u8>>,
}

/// State shared by the tasks of [`FakeBinance`].
pub(crate) struct BinanceShared {
    /// WebSocket bookkeeping.
    pub(crate) ws: Mutex<WsState>,
    /// Woken when a connection subscribes, so that a paused broadcaster resumes.
    pub(crate) joined: Notify,
    /// Woken when a Pong arrives or a connection goes, so that a `Ping` fault
    /// stops waiting.
    pub(crate) ponged: Notify,
    /// Number of Pongs received, for [`FakeBinance::wait_pongs`].
    pub(crate) pong_count: watch::Sender<usize>,
    /// True once every message has been emitted.
    pub(crate) finished: watch::Sender<bool>,
    /// REST bookkeeping.
    pub(crate) rest: Mutex<RestState>,
    /// Connection tasks and timers, aborted with the fake.
    pub(crate) owned: Owned,
}

impl Owner for BinanceShared {
    fn owned(&self) -> &Owned {
        &self.owned
    }
}

impl BinanceShared {
    /// Waits until at least one connection is subscribed.
    pub(crate) async fn wait_subscriber(&self) {
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
    pub(crate) fn deliver(&self, msg: &str, item: &Prepared) -> bool {
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
    pub(crate) async fn wait_pongs(&self) {
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
    pub(crate) fn remove(&self, id: u64) -> Option<Sub> {
        let sub = lock(&self.ws).subs.remove(&id);
        self.ponged.notify_waiters();
        sub
    }

    /// Sends `out` to every open connection.
    pub(crate) fn to_all(&self, out: impl Fn() -> Out) {
        for sub in lock(&self.ws).subs.values() {
            let _ = sub.tx.send(out());
        }
    }
}

/// Closes the connections announced by `serverShutdown` that a newer
/// connection has overlapped by their `overlap` messages.
pub(crate) fn close_superseded(ws: &mut WsState) {
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
pub(crate) async fn broadcast(script: Arc<BinanceScript>, replay: Arc<Replay>, shared: Arc<BinanceShared>) {
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
pub(crate) struct Route {
    /// Streams named in the URL.
    pub(crate) streams: BTreeSet<String>,
    /// `/ws/…`: bare payloads instead of envelopes.
    pub(crate) raw: bool,
}

/// Reads `/stream?streams=a/b` or `/ws/a/b`; `Err` is the status and body of
/// the refusal.
pub(crate) fn route_of(uri: &Uri) -> Result<Route, (WsStatus, &'static str)> {
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
pub(crate) async fn binance_connection(tcp: TcpStream, shared: Arc<BinanceShared>) {
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

/// The answer to a control message (`SUBSCRIBE`, `UNSUBSCRIBE`,
/// `LIST_SUBSCRIPTIONS`), shaped like Binance's (keys in its order), errors
/// included.
pub(crate) fn control_reply(shared: &BinanceShared, conn: u64, text: &str) -> String {
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
