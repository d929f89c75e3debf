//! The `candles` stage: OHLCV candles from trades, in event time.
//!
//! `aggregate` is the pure core (trades in, candles out); the binary around it
//! reads `trades` and writes `candles`.

pub mod aggregate;
pub mod lease;
pub mod service;
pub mod state;

pub use aggregate::{aggregate, Bar, CandleBuilder, CandleConfig, Output};
pub use tickpipe_schemas::interval::{self, Interval};
