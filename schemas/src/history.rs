//! Released older versions of the schemas.
//!
//! When a schema in `avro/` changes, its previous text is kept as
//! `avro/history/<name>.v<N>.avsc` and listed in [`RELEASED`], so that records
//! written by older producers in single-object encoding stay decodable and the
//! evolution tests check every released version against the current one in both
//! directions. No schema has changed since the first release yet.

use crate::record::CompiledSchema;

/// `(file, text)` of every released older schema version.
pub const RELEASED: &[(&str, &str)] = &[];

/// The released older versions, parsed.
pub fn released() -> Vec<CompiledSchema> {
    RELEASED
        .iter()
        .map(|(file, json)| {
            CompiledSchema::parse(json).unwrap_or_else(|e| panic!("schema history {file} is invalid: {e}"))
        })
        .collect()
}
