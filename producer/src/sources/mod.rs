//! Sources: each turns one upstream (an exchange API, files, the simulator)
//! into [`Item`](crate::item::Item)s for the publisher. Every source has the
//! same shape (a config section, a pure parser, the I/O around it) and is
//! registered in one list, `sources!` below.

use std::future::Future;
use std::pin::Pin;

use tokio::sync::watch;

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

/// A source ready to run (a checked [`SourceConfig`]): runs until its input
/// ends (files) or it is stopped (live feeds).
pub trait Source: Send {
    /// Its name in logs and errors.
    fn name(&self) -> &'static str;
    /// True when the source ends by itself (replay); the service then exits
    /// when every source has ended.
    fn finite(&self) -> bool;
    /// Publishes everything it reads through `publisher` until done or stopped.
    fn run(
        self: Box<Self>,
        publisher: Publisher,
        stop: Stop,
    ) -> Pin<Box<dyn Future<Output = Result<(), SourceError>> + Send>>;
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

/// A source's section of the configuration (its flags, named `--<source>-...`,
/// `TICKPIPE_<SOURCE>_...`, `[<source>]` in the file; `tickpipe_ops::section!`)
/// and the source itself.
pub trait SourceConfig: clap::Args + clap::FromArgMatches + Clone + Default + Send + 'static {
    /// Its name in `--sources`.
    const NAME: &'static str;
    /// What is wrong with the settings, found before anything starts.
    fn check(&self) -> Result<(), SourceError>;
    /// True when the source ends by itself.
    fn finite(&self) -> bool {
        false
    }
    /// Publishes everything it reads through `publisher` until done or stopped.
    fn run(self, publisher: Publisher, stop: Stop) -> impl Future<Output = Result<(), SourceError>> + Send + 'static;
}

/// A checked section, as the [`Source`] the service runs.
struct Checked<C>(C);

impl<C: SourceConfig> Source for Checked<C> {
    fn name(&self) -> &'static str {
        C::NAME
    }

    fn finite(&self) -> bool {
        self.0.finite()
    }

    fn run(
        self: Box<Self>,
        publisher: Publisher,
        stop: Stop,
    ) -> Pin<Box<dyn Future<Output = Result<(), SourceError>> + Send>> {
        Box::pin(self.0.run(publisher, stop))
    }
}

/// Declares [`Sources`]: which sources run and every source's section, from
/// one list of `field: section type`.
macro_rules! sources {
    ($($field:ident: $section:ty),* $(,)?) => {
        /// Which sources run, and each one's settings.
        #[derive(Debug, Clone, clap::Args)]
        pub struct Sources {
            /// Sources, comma-separated: auto, binance, coincap, replay, simulator
            /// (auto: live Binance, and CoinCap when a key is set, if Binance
            /// answers; otherwise the simulator).
            #[arg(
                long = "sources",
                id = "sources",
                env = "TICKPIPE_PRODUCER_SOURCES",
                value_delimiter = ',',
                default_value = "auto"
            )]
            pub names: Vec<String>,
            $(
                #[command(flatten, next_help_heading = <$section as SourceConfig>::NAME)]
                pub $field: $section,
            )*
        }

        impl Sources {
            /// Every source's name.
            pub const NAMES: &[&str] = &[$(<$section as SourceConfig>::NAME),*];

            /// The named sources, each once; `auto` must have been resolved
            /// (`service::resolve_auto`).
            pub fn build(&self) -> Result<Vec<Box<dyn Source>>, SourceError> {
                let mut built: Vec<Box<dyn Source>> = Vec::new();
                let mut seen = Vec::new();
                for name in &self.names {
                    let name = name.trim();
                    if name == "auto" || seen.contains(&name) {
                        continue;
                    }
                    seen.push(name);
                    $(
                        if name == <$section as SourceConfig>::NAME {
                            self.$field.check()?;
                            built.push(Box::new(Checked(self.$field.clone())));
                            continue;
                        }
                    )*
                    return Err(SourceError::User(format!(
                        "unknown source {name:?}: choose from auto, {}",
                        Self::NAMES.join(", ")
                    )));
                }
                Ok(built)
            }
        }
    };
}

sources! {
    binance: binance::BinanceConfig,
    coincap: coincap::CoinCapConfig,
    replay: replay::ReplayConfig,
    simulator: simulator::SimulatorConfig,
}

impl Default for Sources {
    fn default() -> Self {
        tickpipe_ops::config::defaults()
    }
}
