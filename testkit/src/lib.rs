//! Test-only support, never a dependency of a shipped binary.
//!
//! - [`cluster`]: Apache Kafka nodes of a test's own (one behind a proxy, or a
//!   KRaft cluster to kill -9 and restart).
//! - [`registry`]: the stack's real Schema Registry (Apicurio) behind a
//!   recording proxy that can also play an outage.
//! - [`exchange`]: local servers impersonating Binance and CoinCap, replaying
//!   real recordings with scripted faults.
//! - [`hostile`]: proptest strategies for Avro bodies of every schema, with
//!   values at the edges of what the schema admits.
//! - [`kafka`]: reading a topic back in full, to where each partition ends.
//! - [`real`]: loaders for the recorded real market data, for tests and benches.
//! - [`stack`]: where the local stack started by `deploy/local/stack.sh` listens,
//!   and the real-data folder; a private PostgreSQL server (optionally TLS).
//! - [`tls`]: a throwaway certificate authority and a TLS-terminating proxy.

pub mod binary;
pub mod cluster;
pub mod exchange;
pub mod hostile;
pub mod kafka;
pub mod real;
pub mod registry;
pub mod stack;
pub mod tls;
