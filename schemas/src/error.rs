//! Codec errors. Each variant names one distinct failure so that dead letters and
//! metrics can tell them apart; none of them is ever a panic.

use crate::decimal::DecimalError;
use crate::wire::WireError;

/// Why bytes could not be decoded into a record.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty payload: expected an Avro record in Confluent or single-object framing")]
    Empty,
    #[error("unknown framing: payload starts with {prefix}; expected 0x00 (Confluent wire format) or 0xC3 0x01 (Avro single-object encoding)")]
    UnknownFraming { prefix: String },
    #[error("truncated {framing} header: {len} bytes, need {need}")]
    TruncatedHeader {
        framing: &'static str,
        len: usize,
        need: usize,
    },
    #[error("unknown schema id {0}: it is not in the registry cache; fetch it from the Schema Registry")]
    UnknownSchemaId(u32),
    #[error("unknown schema fingerprint {0:#018x}: no compiled-in schema has it; the writer uses a schema this build does not know")]
    UnknownFingerprint(u64),
    #[error("payload holds a {found} record, expected {expected}")]
    WrongRecord { expected: &'static str, found: String },
    #[error("truncated {record} body: field {field} runs past the end ({detail})")]
    Truncated {
        record: &'static str,
        field: &'static str,
        detail: String,
    },
    #[error("invalid {record} body: field {field}: {detail}")]
    InvalidBody {
        record: &'static str,
        field: &'static str,
        detail: String,
    },
    #[error("{count} unexpected bytes after the {record} record")]
    TrailingBytes { record: &'static str, count: usize },
    #[error("cannot read {record} written with schema {writer}: {detail}")]
    Resolution {
        record: &'static str,
        writer: String,
        detail: String,
    },
}

impl DecodeError {
    pub(crate) fn body(record: &'static str, field: &'static str, e: WireError) -> Self {
        match e {
            WireError::Truncated { .. } => DecodeError::Truncated {
                record,
                field,
                detail: e.to_string(),
            },
            WireError::Invalid { .. } => DecodeError::InvalidBody {
                record,
                field,
                detail: e.to_string(),
            },
        }
    }

    /// A short stable label for metrics and dead letters (`error_type`).
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty",
            DecodeError::UnknownFraming { .. } => "unknown_framing",
            DecodeError::TruncatedHeader { .. } => "truncated_header",
            DecodeError::UnknownSchemaId(_) => "unknown_schema_id",
            DecodeError::UnknownFingerprint(_) => "unknown_fingerprint",
            DecodeError::WrongRecord { .. } => "wrong_record",
            DecodeError::Truncated { .. } => "truncated",
            DecodeError::InvalidBody { .. } => "invalid_body",
            DecodeError::TrailingBytes { .. } => "trailing_bytes",
            DecodeError::Resolution { .. } => "schema_resolution",
        }
    }
}

/// Why a record could not be encoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EncodeError {
    #[error("{record}.{field}: {source}")]
    Decimal {
        record: &'static str,
        field: &'static str,
        source: DecimalError,
    },
    #[error("no Schema Registry id for {0}: register the schemas at start (Codec::set_write_id) before encoding in Confluent framing")]
    NotRegistered(&'static str),
}
