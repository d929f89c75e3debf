//! tickpipe's data contract in code: the Avro schemas (`avro/*.avsc`, compiled in),
//! the typed records, the codec for both framings, and a Schema Registry client.
//!
//! Everything here except [`registry`] is pure: bytes and structs in, bytes and
//! structs out, no I/O. Only this crate knows how records look on the wire.

pub mod codec;
pub mod decimal;
pub mod error;
pub mod field;
pub mod history;
pub mod interval;
pub mod record;
pub mod records;
pub mod registry;
pub mod skim;
pub mod topic;
pub mod validate;
pub mod wire;

pub use codec::{Codec, Framing, WriteFraming};
pub use error::{DecodeError, EncodeError};
pub use interval::Interval;
pub use record::{CompiledSchema, Record};
pub use records::*;
pub use rust_decimal::Decimal;
pub use topic::{AnyRecord, Topic};
