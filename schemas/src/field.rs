//! How each Rust field type is written to and read from an Avro body.
//!
//! One implementation per Avro type the schemas use. The record macro calls these
//! in field order; `tests/conformance.rs` proves the bytes equal apache-avro's for
//! the same values.

use std::collections::BTreeMap;

use rust_decimal::Decimal;

use crate::decimal::{self, DecimalError};
use crate::wire::{self, Reader, WireError};

/// A value with a fixed Avro encoding.
pub trait AvroField: Sized {
    fn write(&self, out: &mut Vec<u8>) -> Result<(), DecimalError>;
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError>;
    /// The value without its Rust type, for writers that map records by their
    /// schema (the BigQuery sink's rows).
    fn value(&self) -> Value<'_>;
}

/// A field's value by Avro type, borrowed from the record. Which logical type a
/// `Long` carries (a `timestamp-micros`, say) is the schema's to tell.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Null,
    Boolean(bool),
    Int(i32),
    Long(i64),
    String(&'a str),
    Bytes(&'a [u8]),
    Decimal(Decimal),
    /// An enum symbol.
    Enum(&'static str),
    Array(Vec<Value<'a>>),
    /// Map entries in key order.
    Map(Vec<(&'a str, Value<'a>)>),
}

impl AvroField for i64 {
    #[inline]
    fn write(&self, out: &mut Vec<u8>) -> Result<(), DecimalError> {
        wire::put_long(out, *self);
        Ok(())
    }
    #[inline]
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        r.long()
    }
    #[inline]
    fn value(&self) -> Value<'_> {
        Value::Long(*self)
    }
}

impl AvroField for i32 {
    #[inline]
    fn write(&self, out: &mut Vec<u8>) -> Result<(), DecimalError> {
        wire::put_long(out, i64::from(*self));
        Ok(())
    }
    #[inline]
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        r.int()
    }
    #[inline]
    fn value(&self) -> Value<'_> {
        Value::Int(*self)
    }
}

impl AvroField for bool {
    #[inline]
    fn write(&self, out: &mut Vec<u8>) -> Result<(), DecimalError> {
        out.push(u8::from(*self));
        Ok(())
    }
    #[inline]
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        r.boolean()
    }
    #[inline]
    fn value(&self) -> Value<'_> {
        Value::Boolean(*self)
    }
}

impl AvroField for String {
    #[inline]
    fn write(&self, out: &mut Vec<u8>) -> Result<(), DecimalError> {
        wire::put_bytes(out, self.as_bytes());
        Ok(())
    }
    #[inline]
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        r.str().map(str::to_owned)
    }
    #[inline]
    fn value(&self) -> Value<'_> {
        Value::String(self)
    }
}

impl AvroField for Vec<u8> {
    #[inline]
    fn write(&self, out: &mut Vec<u8>) -> Result<(), DecimalError> {
        wire::put_bytes(out, self);
        Ok(())
    }
    #[inline]
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        r.bytes().map(<[u8]>::to_vec)
    }
    #[inline]
    fn value(&self) -> Value<'_> {
        Value::Bytes(self)
    }
}

/// `bytes` with logical type `decimal(38, 18)`.
impl AvroField for Decimal {
    #[inline]
    fn write(&self, out: &mut Vec<u8>) -> Result<(), DecimalError> {
        decimal::put_unscaled(out, decimal::to_unscaled(self)?);
        Ok(())
    }
    #[inline]
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let start = r.position();
        let raw = r.bytes()?;
        decimal::unscaled_from_bytes(raw)
            .and_then(decimal::from_unscaled)
            .ok_or_else(|| WireError::invalid(start, "decimal out of range for decimal(38, 18)"))
    }
    #[inline]
    fn value(&self) -> Value<'_> {
        Value::Decimal(*self)
    }
}

/// The union `["null", T]`: null is branch 0.
impl<T: AvroField> AvroField for Option<T> {
    #[inline]
    fn write(&self, out: &mut Vec<u8>) -> Result<(), DecimalError> {
        match self {
            None => {
                out.push(0);
                Ok(())
            }
            Some(v) => {
                out.push(2);
                v.write(out)
            }
        }
    }
    #[inline]
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        match r.union_index(2)? {
            0 => Ok(None),
            _ => T::read(r).map(Some),
        }
    }
    #[inline]
    fn value(&self) -> Value<'_> {
        self.as_ref().map_or(Value::Null, AvroField::value)
    }
}

impl<T: AvroField> AvroField for Vec<T>
where
    T: ArrayItem,
{
    fn write(&self, out: &mut Vec<u8>) -> Result<(), DecimalError> {
        if !self.is_empty() {
            wire::put_long(out, self.len() as i64);
            for item in self {
                item.write(out)?;
            }
        }
        out.push(0);
        Ok(())
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let mut items = Vec::new();
        loop {
            let n = r.block_count()?;
            if n == 0 {
                return Ok(items);
            }
            items.reserve(n);
            for _ in 0..n {
                items.push(T::read(r)?);
            }
        }
    }
    #[inline]
    fn value(&self) -> Value<'_> {
        Value::Array(self.iter().map(AvroField::value).collect())
    }
}

/// Marks the types that may be array items, so that `Vec<u8>` stays `bytes`.
pub trait ArrayItem {}
impl ArrayItem for String {}

impl<V: AvroField> AvroField for BTreeMap<String, V> {
    fn write(&self, out: &mut Vec<u8>) -> Result<(), DecimalError> {
        if !self.is_empty() {
            wire::put_long(out, self.len() as i64);
            for (k, v) in self {
                wire::put_bytes(out, k.as_bytes());
                v.write(out)?;
            }
        }
        out.push(0);
        Ok(())
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let mut map = BTreeMap::new();
        loop {
            let n = r.block_count()?;
            if n == 0 {
                return Ok(map);
            }
            for _ in 0..n {
                let k = r.str()?.to_owned();
                let v = V::read(r)?;
                map.insert(k, v);
            }
        }
    }
    #[inline]
    fn value(&self) -> Value<'_> {
        Value::Map(self.iter().map(|(k, v)| (k.as_str(), v.value())).collect())
    }
}
