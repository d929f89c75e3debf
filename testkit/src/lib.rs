//! Test-only support, never a dependency of a shipped binary.
//!
//! - [`registry`]: an in-memory double of the Confluent Schema Registry REST API,
//!   because no registry server can be installed on the project's machines.
//! - [`stack`]: where the local stack started by `deploy/local/stack.sh` listens,
//!   and the real-data folder.

pub mod registry;
pub mod stack;
