//! The `Record` trait that ties a Rust struct to its compiled-in `.avsc`, and the
//! macros that write the field-by-field codec for each record and enum.

use std::sync::OnceLock;

use apache_avro::rabin::Rabin;
use apache_avro::Schema;

use crate::error::{DecodeError, EncodeError};
use crate::wire::Reader;

/// A parsed schema with the identities the framings need.
#[derive(Debug)]
pub struct CompiledSchema {
    /// Full name, e.g. `tickpipe.Trade`.
    pub name: String,
    /// The schema text as shipped (with docs), as registered in a Schema Registry.
    pub json: String,
    /// Parsed form, for resolving older or newer writer schemas.
    pub schema: Schema,
    /// CRC-64-AVRO of the Parsing Canonical Form, as single-object encoding uses it
    /// (checked against fastavro by the interop test).
    pub fingerprint: u64,
    /// The same schema without logical-type annotations, for resolution (see
    /// [`underlying_json`]).
    pub underlying: Schema,
    /// `(field path, precision, scale)` of every decimal in the schema.
    pub decimals: Vec<(String, u64, u64)>,
}

impl CompiledSchema {
    /// Parses a schema; returns an error message naming what is wrong.
    pub fn parse(json: &str) -> Result<Self, apache_avro::Error> {
        let schema = Schema::parse_str(json)?;
        let name = match &schema {
            Schema::Record(r) => r.name.fullname(None),
            other => format!("{:?}", apache_avro::schema::SchemaKind::from(other)),
        };
        let (underlying, decimals) = match serde_json::from_str::<serde_json::Value>(json) {
            Ok(mut v) => {
                let mut decimals = Vec::new();
                strip_logical_types(&mut v, "", &mut decimals);
                (Schema::parse(&v)?, decimals)
            }
            Err(_) => (schema.clone(), Vec::new()),
        };
        // The Parsing Canonical Form strips logical types; apache-avro 0.21 keeps
        // their attributes and the `{"type": "long"}` wrapping, so it is taken from
        // the underlying schema, which fastavro and Java agree with.
        Ok(CompiledSchema {
            name,
            json: json.to_owned(),
            fingerprint: fingerprint(&underlying),
            schema,
            underlying,
            decimals,
        })
    }
}

impl CompiledSchema {
    /// Whether data written with `self` can be read as written with `other`
    /// byte for byte: same canonical form and same decimal annotations (the
    /// canonical form, and so the fingerprint, ignores logical types).
    pub fn same_encoding(&self, other: &CompiledSchema) -> bool {
        self.fingerprint == other.fingerprint && self.decimals == other.decimals
    }
}

/// The schema text with every logical-type annotation removed, defaults and docs
/// kept.
///
/// Resolution runs on these underlying types: the bytes of a `decimal` are the
/// bytes of its `bytes`, and of a `timestamp-micros` those of its `long`. Java
/// Avro's `SchemaCompatibility` compares underlying types the same way. The
/// reason to do it here is that apache-avro 0.21 refuses to resolve a
/// bytes-backed decimal whose value is shorter than the largest value its
/// precision allows, and cannot check decimal schemas for compatibility at all.
/// Decimal annotations are compared separately ([`CompiledSchema::decimals`]).
pub fn underlying_json(json: &str) -> Result<String, serde_json::Error> {
    let mut v: serde_json::Value = serde_json::from_str(json)?;
    strip_logical_types(&mut v, "", &mut Vec::new());
    Ok(v.to_string())
}

fn strip_logical_types(v: &mut serde_json::Value, path: &str, decimals: &mut Vec<(String, u64, u64)>) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            if let Some(Value::String(kind)) = map.remove("logicalType") {
                if kind == "decimal" {
                    let num = |k: &str| map.get(k).and_then(Value::as_u64).unwrap_or(0);
                    decimals.push((path.to_owned(), num("precision"), num("scale")));
                }
                map.remove("precision");
                map.remove("scale");
            }
            let here = match map.get("name").and_then(Value::as_str) {
                Some(n) if map.contains_key("type") && !map.contains_key("fields") => format!("{path}.{n}"),
                _ => path.to_owned(),
            };
            for (k, child) in map.iter_mut() {
                if k != "default" {
                    strip_logical_types(child, &here, decimals);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| strip_logical_types(i, path, decimals)),
        _ => {}
    }
}

/// CRC-64-AVRO (Rabin) fingerprint of a schema's Parsing Canonical Form.
pub fn fingerprint(schema: &Schema) -> u64 {
    let fp = schema.fingerprint::<Rabin>();
    let mut le = [0u8; 8];
    le.copy_from_slice(&fp.bytes[..8]);
    u64::from_le_bytes(le)
}

/// A typed record with a compiled-in schema and a hand-written Avro body codec.
pub trait Record: Sized + Send + Sync + 'static {
    /// Full Avro name, e.g. `tickpipe.Trade`.
    const NAME: &'static str;
    /// The `.avsc` text compiled into the binary.
    const SCHEMA_JSON: &'static str;
    /// Field names in schema order (checked against the `.avsc` by a test).
    const FIELDS: &'static [&'static str];

    /// The parsed compiled-in schema (parsed once).
    fn compiled() -> &'static CompiledSchema;

    /// The Kafka message key, per the data contract.
    fn key(&self) -> String;

    /// Appends the Avro binary body (no framing).
    fn write_body(&self, out: &mut Vec<u8>) -> Result<(), EncodeError>;

    /// Reads one Avro binary body written with exactly this record's schema.
    fn read_body(r: &mut Reader<'_>) -> Result<Self, DecodeError>;

    /// Every field's name and value, in schema order.
    fn values(&self) -> Vec<(&'static str, crate::field::Value<'_>)>;
}

/// Parses a compiled-in schema once. A parse failure is a bug in the `.avsc` files,
/// caught by every test, so it panics with the schema's name.
pub(crate) fn compile_once(cell: &'static OnceLock<CompiledSchema>, json: &str, file: &str) -> &'static CompiledSchema {
    cell.get_or_init(|| {
        CompiledSchema::parse(json).unwrap_or_else(|e| panic!("compiled-in schema {file} is invalid: {e}"))
    })
}

/// Declares a record struct whose field order is the `.avsc` field order and
/// implements [`Record`] for it.
macro_rules! avro_record {
    (
        $(#[$meta:meta])*
        pub struct $name:ident : $file:literal, key = |$this:ident| $key:expr;
        {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl $crate::record::Record for $name {
            const NAME: &'static str = concat!("tickpipe.", stringify!($name));
            const SCHEMA_JSON: &'static str = include_str!(concat!("../avro/", $file));
            const FIELDS: &'static [&'static str] = &[$(stringify!($field)),*];

            fn compiled() -> &'static $crate::record::CompiledSchema {
                static CELL: std::sync::OnceLock<$crate::record::CompiledSchema> = std::sync::OnceLock::new();
                $crate::record::compile_once(&CELL, Self::SCHEMA_JSON, $file)
            }

            fn key(&self) -> String {
                let $this = self;
                $key
            }

            #[inline]
            fn write_body(&self, out: &mut Vec<u8>) -> Result<(), $crate::error::EncodeError> {
                $(
                    $crate::field::AvroField::write(&self.$field, out).map_err(|source| {
                        $crate::error::EncodeError::Decimal { record: Self::NAME, field: stringify!($field), source }
                    })?;
                )*
                Ok(())
            }

            fn values(&self) -> Vec<(&'static str, $crate::field::Value<'_>)> {
                vec![$( (stringify!($field), $crate::field::AvroField::value(&self.$field)), )*]
            }

            #[inline]
            fn read_body(r: &mut $crate::wire::Reader<'_>) -> Result<Self, $crate::error::DecodeError> {
                Ok($name {
                    $(
                        $field: $crate::field::AvroField::read(r).map_err(|e| {
                            $crate::error::DecodeError::body(Self::NAME, stringify!($field), e)
                        })?,
                    )*
                })
            }
        }
    };
}

/// Declares an Avro enum: Rust variants in symbol order.
macro_rules! avro_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident { $( $(#[$vmeta:meta])* $variant:ident = $symbol:literal, )* }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $( $(#[$vmeta])* $variant, )* }

        impl $name {
            /// Every symbol, in schema order.
            pub const SYMBOLS: &'static [&'static str] = &[$($symbol),*];
            const ALL: &'static [$name] = &[$($name::$variant),*];

            /// The Avro symbol.
            pub fn as_str(self) -> &'static str {
                match self { $( $name::$variant => $symbol, )* }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $( $symbol => Ok($name::$variant), )*
                    other => Err(format!("unknown {} {:?}; expected one of {:?}", stringify!($name), other, Self::SYMBOLS)),
                }
            }
        }

        impl $crate::field::AvroField for $name {
            #[inline]
            fn write(&self, out: &mut Vec<u8>) -> Result<(), $crate::decimal::DecimalError> {
                $crate::wire::put_long(out, *self as i64);
                Ok(())
            }
            #[inline]
            fn value(&self) -> $crate::field::Value<'_> {
                $crate::field::Value::Enum(self.as_str())
            }
            #[inline]
            fn read(r: &mut $crate::wire::Reader<'_>) -> Result<Self, $crate::wire::WireError> {
                let at = r.position();
                let idx = r.long()?;
                usize::try_from(idx)
                    .ok()
                    .and_then(|i| Self::ALL.get(i).copied())
                    .ok_or_else(|| $crate::wire::WireError::invalid(at, format!("{} index {idx} out of range", stringify!($name))))
            }
        }
    };
}

pub(crate) use {avro_enum, avro_record};
