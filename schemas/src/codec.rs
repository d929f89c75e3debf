//! Framing and decoding: Confluent wire format and Avro single-object encoding.
//!
//! Pure and synchronous: the codec never does I/O. Schema ids learnt from a
//! Schema Registry are handed to it ([`Codec::add_registry_schema`],
//! [`Codec::set_write_id`]) by the async layer in [`crate::registry`], so the hot
//! path is a hash lookup.
//!
//! Decoding takes one of two paths. When the writer schema is the compiled-in one
//! (same fingerprint), the body is read directly into the typed record. Otherwise
//! (an older or newer writer) apache-avro resolves the writer's data to the
//! compiled-in reader schema per the Avro resolution rules, and the resolved value
//! is then read the same way.

use std::collections::HashMap;
use std::sync::{Arc, Once, RwLock};

use crate::error::{DecodeError, EncodeError};
use crate::record::{CompiledSchema, Record};
use crate::topic::Topic;
use crate::wire::Reader;

/// First byte of the Confluent wire format.
pub const CONFLUENT_MAGIC: u8 = 0;
/// First two bytes of Avro single-object encoding.
pub const SINGLE_OBJECT_MAGIC: [u8; 2] = [0xC3, 0x01];
/// Largest allocation apache-avro may make while resolving a foreign writer schema.
const MAX_ALLOCATION_BYTES: usize = 16 << 20;

/// How this process frames the records it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFraming {
    /// Avro single-object encoding with the compiled-in schemas (no registry).
    SingleObject,
    /// Confluent wire format with ids from a Schema Registry.
    Confluent,
}

/// The framing found at the start of a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Confluent { schema_id: u32 },
    SingleObject { fingerprint: u64 },
}

impl Framing {
    /// Reads the framing header; returns it and the body that follows.
    pub fn split(payload: &[u8]) -> Result<(Framing, &[u8]), DecodeError> {
        match payload {
            [] => Err(DecodeError::Empty),
            [CONFLUENT_MAGIC, rest @ ..] => {
                let (id, body) = header(payload, rest, "Confluent")?;
                Ok((
                    Framing::Confluent {
                        schema_id: u32::from_be_bytes(id),
                    },
                    body,
                ))
            }
            [0xC3, 0x01, rest @ ..] => {
                let (fp, body) = header(payload, rest, "single-object")?;
                Ok((
                    Framing::SingleObject {
                        fingerprint: u64::from_le_bytes(fp),
                    },
                    body,
                ))
            }
            [0xC3] => Err(DecodeError::TruncatedHeader {
                framing: "single-object",
                len: 1,
                need: 10,
            }),
            _ => Err(DecodeError::UnknownFraming {
                prefix: payload
                    .iter()
                    .take(2)
                    .map(|b| format!("{b:#04x}"))
                    .collect::<Vec<_>>()
                    .join(" "),
            }),
        }
    }
}

/// The `N` header bytes that follow a framing's magic in `payload` (`rest` is
/// what follows the magic), and the body after them.
#[inline]
fn header<'a, const N: usize>(
    payload: &[u8],
    rest: &'a [u8],
    framing: &'static str,
) -> Result<([u8; N], &'a [u8]), DecodeError> {
    match rest.split_first_chunk::<N>() {
        Some((header, body)) => Ok((*header, body)),
        None => Err(DecodeError::TruncatedHeader {
            framing,
            len: payload.len(),
            need: payload.len() - rest.len() + N,
        }),
    }
}

/// Encodes records in the configured framing and decodes records in either.
#[derive(Debug)]
pub struct Codec {
    /// How records are framed when written.
    framing: WriteFraming,
    /// Writer schemas known by fingerprint: the compiled-in ones and their history.
    by_fingerprint: HashMap<u64, Arc<CompiledSchema>>,
    /// Writer schemas known by registry id, filled by the registry layer.
    by_id: RwLock<HashMap<u32, Arc<CompiledSchema>>>,
    /// The registry id to write each record with, by record name.
    write_ids: RwLock<HashMap<&'static str, u32>>,
}

impl Codec {
    /// A codec that writes single-object encoding and knows every compiled-in
    /// schema, including released older versions.
    pub fn new(framing: WriteFraming) -> Self {
        static LIMIT: Once = Once::new();
        LIMIT.call_once(|| {
            apache_avro::util::max_allocation_bytes(MAX_ALLOCATION_BYTES);
        });
        let mut by_fingerprint = HashMap::new();
        for topic in Topic::ALL {
            let s = topic.schema();
            by_fingerprint.insert(
                s.fingerprint,
                Arc::new(CompiledSchema::parse(&s.json).unwrap_or_else(|e| panic!("{}: {e}", s.name))),
            );
        }
        for old in crate::history::released() {
            by_fingerprint.insert(old.fingerprint, Arc::new(old));
        }
        Codec {
            framing,
            by_fingerprint,
            by_id: RwLock::default(),
            write_ids: RwLock::default(),
        }
    }

    /// How this codec frames what it writes.
    pub fn framing(&self) -> WriteFraming {
        self.framing
    }

    /// Learns a writer schema fetched from the registry. Returns its full name.
    pub fn add_registry_schema(&self, id: u32, schema_json: &str) -> Result<String, apache_avro::Error> {
        let compiled = CompiledSchema::parse(schema_json)?;
        let name = compiled.name.clone();
        self.by_id
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Arc::new(compiled));
        Ok(name)
    }

    /// Whether a registry id is already known (so no HTTP call is needed).
    pub fn knows_id(&self, id: u32) -> bool {
        self.by_id.read().unwrap_or_else(|p| p.into_inner()).contains_key(&id)
    }

    /// Sets the registry id that records named `name` are written with.
    pub fn set_write_id(&self, name: &'static str, id: u32) {
        self.write_ids
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, id);
    }

    /// Appends the framed record to `out`.
    pub fn encode_into<R: Record>(&self, record: &R, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match self.framing {
            WriteFraming::SingleObject => {
                out.extend_from_slice(&SINGLE_OBJECT_MAGIC);
                out.extend_from_slice(&R::compiled().fingerprint.to_le_bytes());
            }
            WriteFraming::Confluent => {
                let id = self
                    .write_ids
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(R::NAME)
                    .copied()
                    .ok_or(EncodeError::NotRegistered(R::NAME))?;
                out.push(CONFLUENT_MAGIC);
                out.extend_from_slice(&id.to_be_bytes());
            }
        }
        record.write_body(out)
    }

    /// The framed record.
    pub fn encode<R: Record>(&self, record: &R) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::with_capacity(128);
        self.encode_into(record, &mut out)?;
        Ok(out)
    }

    /// Decodes a framed record of type `R`, resolving the writer schema if it is
    /// not the compiled-in one.
    pub fn decode<R: Record>(&self, payload: &[u8]) -> Result<R, DecodeError> {
        let (framing, body) = Framing::split(payload)?;
        let writer = match framing {
            Framing::Confluent { schema_id } => self
                .by_id
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&schema_id)
                .cloned()
                .ok_or(DecodeError::UnknownSchemaId(schema_id))?,
            Framing::SingleObject { fingerprint } => {
                if fingerprint == R::compiled().fingerprint {
                    return read_exact::<R>(body);
                }
                self.by_fingerprint
                    .get(&fingerprint)
                    .cloned()
                    .ok_or(DecodeError::UnknownFingerprint(fingerprint))?
            }
        };
        if writer.name != R::NAME {
            return Err(DecodeError::WrongRecord {
                expected: R::NAME,
                found: writer.name.clone(),
            });
        }
        if writer.same_encoding(R::compiled()) {
            return read_exact::<R>(body);
        }
        resolve::<R>(&writer, body)
    }
}

/// Reads a body written with `R`'s own schema; every byte must be used.
fn read_exact<R: Record>(body: &[u8]) -> Result<R, DecodeError> {
    let mut r = Reader::new(body);
    let rec = R::read_body(&mut r)?;
    match r.remaining() {
        0 => Ok(rec),
        count => Err(DecodeError::TrailingBytes { record: R::NAME, count }),
    }
}

/// Reads a body written with another version of `R`'s schema.
fn resolve<R: Record>(writer: &CompiledSchema, body: &[u8]) -> Result<R, DecodeError> {
    let reader = R::compiled();
    let err = |detail: String| DecodeError::Resolution {
        record: R::NAME,
        writer: format!("{:#018x}", writer.fingerprint),
        detail,
    };
    // A decimal whose scale or precision changed has different bytes for the same
    // number: refuse rather than misread.
    for (path, precision, scale) in &writer.decimals {
        if let Some((_, p, s)) = reader.decimals.iter().find(|(rp, _, _)| rp == path) {
            if (p, s) != (precision, scale) {
                return Err(err(format!(
                    "{path} is decimal({precision}, {scale}) in the writer and decimal({p}, {s}) here"
                )));
            }
        }
    }
    // Every length in the body is checked against the input before apache-avro,
    // which allocates declared lengths up front, reads it.
    crate::skim::check(&writer.underlying, body).map_err(|e| match e {
        crate::wire::WireError::Truncated { .. } => DecodeError::Truncated {
            record: R::NAME,
            field: "(writer schema)",
            detail: e.to_string(),
        },
        crate::wire::WireError::Invalid { .. } => DecodeError::InvalidBody {
            record: R::NAME,
            field: "(writer schema)",
            detail: e.to_string(),
        },
    })?;
    let mut cursor = body;
    let value = apache_avro::from_avro_datum(&writer.underlying, &mut cursor, Some(&reader.underlying))
        .map_err(|e| err(e.to_string()))?;
    if !cursor.is_empty() {
        return Err(DecodeError::TrailingBytes {
            record: R::NAME,
            count: cursor.len(),
        });
    }
    let reencoded = apache_avro::to_avro_datum(&reader.underlying, value).map_err(|e| err(e.to_string()))?;
    read_exact::<R>(&reencoded)
}
