//! The small HTTP and WebSocket toolkit both fakes share.

use super::*;

/// Locks a mutex, ignoring poisoning: a panicking test thread must not turn
/// every later assertion into a second panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Wall-clock milliseconds, for event times and envelopes.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A JSON string literal.
pub(crate) fn json_str(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

/// A query string with the value of `apiKey` replaced, for logs.
pub(crate) fn redact_query(query: &str) -> String {
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
pub(crate) fn percent_decode(s: &str) -> Option<String> {
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
pub(crate) fn query_params(uri: &Uri) -> Option<HashMap<String, String>> {
    Query::<HashMap<String, String>>::try_from_uri(uri).ok().map(|q| q.0)
}

/// A refused WebSocket handshake: a plain HTTP answer with this status.
pub(crate) fn refuse(status: WsStatus, body: &str) -> ErrorResponse {
    let mut e = ErrorResponse::new(Some(body.to_owned()));
    *e.status_mut() = status;
    e
}

/// Tasks and connections a fake owns: aborted when the fake is dropped, so that
/// nothing of it outlives the test that started it.
#[derive(Default)]
pub(crate) struct Owned {
    pub(crate) handles: Mutex<Vec<AbortHandle>>,
}

impl Owned {
    /// Spawns a task that ends with the fake.
    pub(crate) fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut handles = lock(&self.handles);
        handles.retain(|h| !h.is_finished());
        handles.push(tokio::spawn(fut).abort_handle());
    }

    /// Aborts everything.
    pub(crate) fn abort_all(&self) {
        for h in lock(&self.handles).drain(..) {
            h.abort();
        }
    }
}

/// An HTTP answer before the fake's own headers are added. Small, so that
/// `Result<_, Answer>` stays cheap.
pub(crate) struct Answer {
    /// The HTTP status.
    pub(crate) status: StatusCode,
    /// The body; JSON unless empty.
    pub(crate) body: String,
    /// A `Retry-After` header, in seconds.
    pub(crate) retry_after: Option<u64>,
}

impl Answer {
    /// A 200 with this JSON body.
    pub(crate) fn ok(body: String) -> Answer {
        Answer {
            status: StatusCode::OK,
            body,
            retry_after: None,
        }
    }

    /// Any status with this JSON body.
    pub(crate) fn status(status: u16, body: String) -> Answer {
        Answer {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            body,
            retry_after: None,
        }
    }

    /// A Binance error body `{"code":…,"msg":…}` with this status.
    pub(crate) fn binance(status: u16, code: i32, msg: &str) -> Answer {
        Answer::status(status, json!({"code": code, "msg": msg}).to_string())
    }

    /// The HTTP response, with `extra` headers.
    pub(crate) fn respond(self, extra: &[(&'static str, String)]) -> Response {
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

/// The state a fake shares with its tasks, which it owns.
pub(crate) trait Owner: Send + Sync + 'static {
    /// The fake's tasks and connections.
    fn owned(&self) -> &Owned;
}

/// A fake's two loopback servers: REST, shut down gracefully when this is
/// dropped, and WebSocket, whose connections are tasks the fake owns.
pub(crate) struct Servers {
    /// Where the REST server listens.
    rest_addr: SocketAddr,
    /// Where the WebSocket server listens.
    ws_addr: SocketAddr,
    /// Dropping it shuts the REST server down gracefully.
    _stop_rest: oneshot::Sender<()>,
}

impl Servers {
    /// Serves `rest` on a free port, and on another every WebSocket connection
    /// with `connection`, each as a task `shared` owns.
    pub(crate) async fn start<S, F>(
        shared: &Arc<S>,
        rest: Router,
        connection: impl Fn(TcpStream, Arc<S>) -> F + Send + 'static,
    ) -> Servers
    where
        S: Owner,
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let (rest_listener, rest_addr) = bind().await;
        let (ws_listener, ws_addr) = bind().await;
        let (stop_rest, stop) = oneshot::channel();
        serve(rest_listener, rest, stop);
        let s = shared.clone();
        shared.owned().spawn(async move {
            while let Ok((tcp, _)) = ws_listener.accept().await {
                let conn = connection(tcp, s.clone());
                s.owned().spawn(conn);
            }
        });
        Servers {
            rest_addr,
            ws_addr,
            _stop_rest: stop_rest,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub(crate) fn rest_url(&self) -> String {
        format!("http://{}", self.rest_addr)
    }

    /// `ws://127.0.0.1:PORT`.
    pub(crate) fn ws_url(&self) -> String {
        format!("ws://{}", self.ws_addr)
    }
}

/// Binds a loopback listener on a free port; failing is a broken test machine.
pub(crate) async fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local address");
    (listener, addr)
}

/// Serves `app` on `listener` until `stop` fires or is dropped, then closes idle
/// keep-alive connections (graceful shutdown), so a dropped fake answers no more.
pub(crate) fn serve(listener: TcpListener, app: Router, stop: oneshot::Receiver<()>) {
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop.await;
            })
            .await;
    });
}

/// Reads until the peer answers a close frame (or gives up after the grace
/// period), so the close handshake completes.
pub(crate) async fn drain_close(ws: &mut WebSocketStream<TcpStream>) {
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async { while let Some(Ok(_)) = ws.next().await {} }).await;
}
