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

/// The [`AvroField`] of types written as one Avro primitive: how `v` is
/// appended to `out`, read from `r`, and shown as a [`Value`].
macro_rules! primitive_fields {
    ($(
        $(#[$doc:meta])*
        $ty:ty => write |$v:ident, $out:ident| $write:expr, read |$r:ident| $read:expr, value $value:expr;
    )*) => {$(
        $(#[$doc])*
        impl AvroField for $ty {
            #[inline]
            fn write(&self, $out: &mut Vec<u8>) -> Result<(), DecimalError> {
                let $v = self;
                $write;
                Ok(())
            }
            #[inline]
            fn read($r: &mut Reader<'_>) -> Result<Self, WireError> {
                $read
            }
            #[inline]
            fn value(&self) -> Value<'_> {
                let $v = self;
                $value
            }
        }
    )*};
}

primitive_fields! {
    i64 => write |v, out| wire::put_long(out, *v), read |r| r.long(), value Value::Long(*v);
    i32 => write |v, out| wire::put_long(out, i64::from(*v)), read |r| r.int(), value Value::Int(*v);
    bool => write |v, out| out.push(u8::from(*v)), read |r| r.boolean(), value Value::Boolean(*v);
    String => write |v, out| wire::put_bytes(out, v.as_bytes()),
        read |r| r.str().map(str::to_owned),
        value Value::String(v);
    Vec<u8> => write |v, out| wire::put_bytes(out, v), read |r| r.bytes().map(<[u8]>::to_vec), value Value::Bytes(v);
    /// `bytes` with logical type `decimal(38, 18)`.
    Decimal => write |v, out| decimal::put_unscaled(out, decimal::to_unscaled(v)?),
        read |r| {
            let start = r.position();
            let raw = r.bytes()?;
            decimal::unscaled_from_bytes(raw)
                .and_then(decimal::from_unscaled)
                .ok_or_else(|| WireError::invalid(start, "decimal out of range for decimal(38, 18)"))
        },
        value Value::Decimal(*v);
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

/// Writes `items` as Avro blocks: one block of them all (none when there are
/// none), then the terminating 0.
fn write_blocks<I: ExactSizeIterator>(
    out: &mut Vec<u8>,
    items: I,
    mut write: impl FnMut(I::Item, &mut Vec<u8>) -> Result<(), DecimalError>,
) -> Result<(), DecimalError> {
    let n = items.len();
    if n != 0 {
        wire::put_long(out, n as i64);
        for item in items {
            write(item, out)?;
        }
    }
    out.push(0);
    Ok(())
}

/// Reads Avro blocks into `into` up to the terminating 0: `reserve` makes room
/// for each block's count, `item` reads one item into it.
fn read_blocks<C>(
    r: &mut Reader<'_>,
    mut into: C,
    reserve: fn(&mut C, usize),
    mut item: impl FnMut(&mut Reader<'_>, &mut C) -> Result<(), WireError>,
) -> Result<C, WireError> {
    loop {
        let n = r.block_count()?;
        if n == 0 {
            return Ok(into);
        }
        reserve(&mut into, n);
        for _ in 0..n {
            item(r, &mut into)?;
        }
    }
}

impl<T: AvroField> AvroField for Vec<T>
where
    T: ArrayItem,
{
    fn write(&self, out: &mut Vec<u8>) -> Result<(), DecimalError> {
        write_blocks(out, self.iter(), T::write)
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        read_blocks(r, Vec::new(), Vec::reserve, |r, items| {
            items.push(T::read(r)?);
            Ok(())
        })
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
        write_blocks(out, self.iter(), |(k, v), out| {
            wire::put_bytes(out, k.as_bytes());
            v.write(out)
        })
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        read_blocks(
            r,
            BTreeMap::new(),
            |_, _| {},
            |r, map| {
                let k = r.str()?.to_owned();
                let v = V::read(r)?;
                map.insert(k, v);
                Ok(())
            },
        )
    }
    #[inline]
    fn value(&self) -> Value<'_> {
        Value::Map(self.iter().map(|(k, v)| (k.as_str(), v.value())).collect())
    }
}
