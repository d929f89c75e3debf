//! A bounds-checked walk over an Avro body against any writer schema, without
//! building values.
//!
//! Bodies written with a schema other than the compiled-in one are handed to
//! apache-avro for resolution; apache-avro allocates a string's or array's
//! declared length before it finds out the input is shorter. Walking the body
//! here first, where every length and count is checked against the bytes that
//! remain, means apache-avro only ever sees bodies whose lengths are real.

use std::collections::HashMap;

use apache_avro::schema::{Name, Schema};

use crate::wire::{Reader, WireError};

/// Deepest nesting accepted (recursive schemas could otherwise recurse without
/// consuming input).
const MAX_DEPTH: usize = 64;

/// Checks that `body` is exactly one datum of `schema`.
pub fn check(schema: &Schema, body: &[u8]) -> Result<(), WireError> {
    let mut names = HashMap::new();
    collect_names(schema, &mut names);
    let mut r = Reader::new(body);
    skim(schema, &names, &mut r, 0)?;
    match r.remaining() {
        0 => Ok(()),
        n => Err(WireError::invalid(r.position(), format!("{n} bytes after the datum"))),
    }
}

fn collect_names<'a>(schema: &'a Schema, names: &mut HashMap<&'a Name, &'a Schema>) {
    match schema {
        Schema::Record(r) if names.insert(&r.name, schema).is_none() => {
            r.fields.iter().for_each(|f| collect_names(&f.schema, names));
        }
        Schema::Enum(e) => {
            names.insert(&e.name, schema);
        }
        Schema::Fixed(f) => {
            names.insert(&f.name, schema);
        }
        Schema::Decimal(d) => collect_names(&d.inner, names),
        Schema::Array(a) => collect_names(&a.items, names),
        Schema::Map(m) => collect_names(&m.types, names),
        Schema::Union(u) => u.variants().iter().for_each(|v| collect_names(v, names)),
        _ => {}
    }
}

fn skim(schema: &Schema, names: &HashMap<&Name, &Schema>, r: &mut Reader<'_>, depth: usize) -> Result<(), WireError> {
    if depth > MAX_DEPTH {
        return Err(WireError::invalid(r.position(), "schema nesting too deep"));
    }
    match schema {
        Schema::Null => Ok(()),
        Schema::Boolean => r.boolean().map(drop),
        Schema::Int | Schema::Date | Schema::TimeMillis => r.int().map(drop),
        Schema::Long
        | Schema::TimeMicros
        | Schema::TimestampMillis
        | Schema::TimestampMicros
        | Schema::TimestampNanos
        | Schema::LocalTimestampMillis
        | Schema::LocalTimestampMicros
        | Schema::LocalTimestampNanos => r.long().map(drop),
        Schema::Float => r.skip(4),
        Schema::Double => r.skip(8),
        Schema::Bytes | Schema::BigDecimal => r.bytes().map(drop),
        Schema::String | Schema::Uuid => r.str().map(drop),
        Schema::Duration => r.skip(12),
        Schema::Fixed(f) => r.skip(f.size),
        Schema::Decimal(d) => skim(&d.inner, names, r, depth + 1),
        Schema::Enum(e) => {
            let at = r.position();
            let i = r.long()?;
            if i < 0 || i as u64 >= e.symbols.len() as u64 {
                return Err(WireError::invalid(at, format!("enum index {i} out of range")));
            }
            Ok(())
        }
        Schema::Union(u) => {
            let i = r.union_index(u.variants().len())?;
            skim(&u.variants()[i], names, r, depth + 1)
        }
        Schema::Array(a) => loop {
            let n = r.block_count()?;
            if n == 0 {
                return Ok(());
            }
            for _ in 0..n {
                skim(&a.items, names, r, depth + 1)?;
            }
        },
        Schema::Map(m) => loop {
            let n = r.block_count()?;
            if n == 0 {
                return Ok(());
            }
            for _ in 0..n {
                r.str()?;
                skim(&m.types, names, r, depth + 1)?;
            }
        },
        Schema::Record(rec) => rec.fields.iter().try_for_each(|f| skim(&f.schema, names, r, depth + 1)),
        Schema::Ref { name } => match names.get(name) {
            Some(s) => skim(s, names, r, depth + 1),
            None => Err(WireError::invalid(
                r.position(),
                format!("unknown type {}", name.fullname(None)),
            )),
        },
    }
}
