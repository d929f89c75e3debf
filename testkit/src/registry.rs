//! The real Schema Registry of the local stack (Apicurio Registry, its
//! Confluent-compatible API at `TICKPIPE_TEST_REGISTRY_URL`), seen through a
//! recording proxy of the test's own on loopback.
//!
//! The proxy forwards every request as it came (method, path, query, body,
//! content type, authorisation) and the answer as it went, and keeps the
//! list of requests, so that a test can check that a hot path makes no call
//! or that an id is asked once. `stop` and `resume` make the registry
//! unreachable and reachable again at the same address: an outage.
//!
//! The registry is shared by every test of a run (and by runs until
//! `make stack-down`): a test names its subjects uniquely (`stack::unique_name`)
//! and asks for ids the registry cannot hold (above 2^30) where it wants a
//! missing one.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;

/// An id no registry of a test run reaches: ids count registered schemas.
pub const MISSING_ID: u32 = 1 << 30;

/// Where the local stack's registry serves its Confluent-compatible API.
pub fn registry_url() -> String {
    std::env::var("TICKPIPE_TEST_REGISTRY_URL").unwrap_or_else(|_| "http://127.0.0.1:8081/apis/ccompat/v7".to_owned())
}

struct Inner {
    upstream: String,
    http: reqwest::Client,
    /// Every request seen, as `METHOD /path`.
    requests: Mutex<Vec<String>>,
}

/// The registry behind a recording proxy.
pub struct TestRegistry {
    /// Base URL of the proxy, e.g. `http://127.0.0.1:41234`: what a client is
    /// configured with.
    pub url: String,
    state: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl TestRegistry {
    /// Starts the proxy on a free loopback port, in front of the stack's
    /// registry; fails loudly when that registry does not answer.
    pub async fn start() -> std::io::Result<Self> {
        let upstream = registry_url();
        let http = reqwest::Client::new();
        let probe = http.get(format!("{upstream}/subjects")).send().await;
        if !matches!(&probe, Ok(r) if r.status().is_success()) {
            panic!(
                "no Schema Registry answers at TICKPIPE_TEST_REGISTRY_URL={upstream} ({probe:?}): run the \
                 tests through `make test`, or `make stack-up` and `eval \"$(deploy/local/stack.sh env)\"`"
            );
        }
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let state = Arc::new(Inner {
            upstream,
            http,
            requests: Mutex::default(),
        });
        let task = serve(listener, state.clone());
        Ok(TestRegistry { url, state, task })
    }

    /// Stops answering (connections are refused); the registry keeps its
    /// schemas: an outage.
    pub fn stop(&mut self) {
        self.task.abort();
    }

    /// Answers again on the same address.
    pub async fn resume(&mut self) -> std::io::Result<()> {
        let addr: SocketAddr = self
            .url
            .trim_start_matches("http://")
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{e}")))?;
        let listener = tokio::net::TcpListener::bind(addr).await?;
        self.task = serve(listener, self.state.clone());
        Ok(())
    }

    /// The requests served so far, as `METHOD /path` (the path below the API's base).
    pub fn requests(&self) -> Vec<String> {
        self.state.requests.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn serve(listener: tokio::net::TcpListener, state: Arc<Inner>) -> tokio::task::JoinHandle<()> {
    let app = Router::new().fallback(forward).with_state(state);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    })
}

async fn forward(State(state): State<Arc<Inner>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    state
        .requests
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(format!("{} {}", parts.method, parts.uri.path()));
    let target = format!(
        "{}{}",
        state.upstream,
        parts.uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let body = match axum::body::to_bytes(body, 64 << 20).await {
        Ok(b) => b,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("request body: {e}")).into_response(),
    };
    let mut out = state.http.request(parts.method, target).body(body);
    for name in [header::CONTENT_TYPE, header::ACCEPT, header::AUTHORIZATION] {
        if let Some(v) = parts.headers.get(&name) {
            out = out.header(name, v);
        }
    }
    let answer = match out.send().await {
        Ok(a) => a,
        Err(e) => return (StatusCode::BAD_GATEWAY, format!("registry: {e}")).into_response(),
    };
    let status = answer.status();
    let content_type = answer.headers().get(header::CONTENT_TYPE).cloned();
    let bytes = answer.bytes().await.unwrap_or_default();
    let mut response = Response::new(Body::from(bytes));
    *response.status_mut() = status;
    if let Some(ct) = content_type {
        response.headers_mut().insert(header::CONTENT_TYPE, ct);
    } else {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    response
}
