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
//!
//! `script` holds what a test can script and the recordings it replays,
//! `http` the small HTTP and WebSocket toolkit both fakes share, `binance` and
//! `coincap` the two fakes.

mod binance;
mod coincap;
mod http;
mod script;

pub use binance::FakeBinance;
pub use coincap::FakeCoinCap;
pub use script::*;

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
