//! Sources: each turns one upstream (an exchange API, files, the simulator)
//! into [`Item`](crate::item::Item)s for the publisher. Every source has the
//! same shape (a config section, a pure parser, the I/O around it) and is
//! registered in one list, [`build`].

use std::future::Future;
use std::pin::Pin;

use tokio::sync::watch;

use crate::config::Config;
use crate::publish::Publisher;

pub mod backoff;
pub mod binance;
pub mod coincap;
pub mod replay;
pub mod simulator;

/// Why a source stopped before it was asked to.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The configuration or the account is wrong; the message says what to change.
    #[error("{0}")]
    User(String),
    /// The upstream refused for good (e.g. a restricted location).
    #[error("{0}")]
    External(String),
    /// The upstream kept failing (server errors, timeouts, dropped
    /// connections) through every retry; a later attempt may succeed.
    #[error("{0}")]
    Unavailable(String),
    /// Reading local input failed.
    #[error("{0}")]
    Io(String),
    /// A part of the source ended when it must not have (a bug): the source
    /// stops, so that the process is restarted rather than run blind.
    #[error("{0}")]
    Internal(String),
}

/// A source: runs until its input ends (files) or it is stopped (live feeds).
pub trait Source: Send {
    /// Its name in logs and metric labels.
    fn name(&self) -> &'static str;
    /// Publishes everything it reads through `publisher` until done or stopped.
    fn run(
        self: Box<Self>,
        publisher: Publisher,
        stop: Stop,
    ) -> Pin<Box<dyn Future<Output = Result<(), SourceError>> + Send>>;
    /// True when the source ends by itself (replay); the service then exits when
    /// every source has ended.
    fn finite(&self) -> bool {
        false
    }
}

/// The stop signal every source watches.
#[derive(Clone)]
pub struct Stop(watch::Receiver<bool>);

/// The sending half of [`Stop`].
pub struct StopHandle(watch::Sender<bool>);

/// A stop signal and its handle.
pub fn stop_pair() -> (StopHandle, Stop) {
    let (tx, rx) = watch::channel(false);
    (StopHandle(tx), Stop(rx))
}

impl StopHandle {
    pub fn stop(&self) {
        let _ = self.0.send(true);
    }
}

impl Stop {
    pub fn is_stopped(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the stop is signalled (or its handle is gone).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|s| *s).await;
    }

    /// Sleeps for `d` unless stopped first; returns false when stopped.
    pub async fn sleep(&mut self, d: std::time::Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => !self.is_stopped(),
            _ = self.wait() => false,
        }
    }
}

/// Every source kind, in one list: its name and how it is built from the
/// configuration (`None` when it is not enabled).
type Builder = fn(&Config) -> Result<Option<Box<dyn Source>>, SourceError>;
pub const SOURCES: &[(&str, Builder)] = &[
    ("binance", binance::build),
    ("coincap", coincap::build),
    ("replay", replay::build),
    ("simulator", simulator::build),
];

/// The enabled sources.
pub fn build(config: &Config) -> Result<Vec<Box<dyn Source>>, SourceError> {
    let mut out = Vec::new();
    for (_, build) in SOURCES {
        if let Some(s) = build(config)? {
            out.push(s);
        }
    }
    Ok(out)
}
