//! Property tests of the codec: hostile bytes never panic and never make a large
//! allocation; every record survives a round trip; our bytes are exactly what
//! apache-avro writes for the same values.
// The counting allocator below needs `unsafe impl GlobalAlloc`.
#![allow(unsafe_code)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use common::*;
use proptest::prelude::*;
use serde_json::json;
use tickpipe_schemas::wire::put_long;
use tickpipe_schemas::*;

/// Records the largest single allocation made on the current thread while
/// tracking is on.
struct Counting;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = TRACKING.try_with(|t| {
            if t.get() {
                let _ = LARGEST.try_with(|l| l.set(l.get().max(layout.size())));
            }
        });
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = TRACKING.try_with(|t| {
            if t.get() {
                let _ = LARGEST.try_with(|l| l.set(l.get().max(new_size)));
            }
        });
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns the largest single allocation it made.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    TRACKING.with(|t| t.set(true));
    let out = f();
    TRACKING.with(|t| t.set(false));
    (out, LARGEST.with(Cell::get))
}

const CURRENT_ID: u32 = 1;
/// A newer writer schema, so that decoding goes through schema resolution.
const EVOLVED_ID: u32 = 2;

fn evolved(json_text: &str) -> String {
    let mut v: serde_json::Value = serde_json::from_str(json_text).unwrap();
    v["fields"]
        .as_array_mut()
        .unwrap()
        .insert(0, json!({"name": "note", "type": ["null", "string"], "default": null}));
    v.to_string()
}

/// The Confluent header of registry id `id`, followed for the evolved schema
/// by its leading optional field (null), so that what follows is read as the
/// record's first field either way.
fn header(id: u32) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend_from_slice(&id.to_be_bytes());
    if id == EVOLVED_ID {
        out.push(0);
    }
    out
}

fn codec_for<R: Record>() -> Codec {
    let codec = Codec::new(WriteFraming::SingleObject);
    codec.add_registry_schema(CURRENT_ID, R::SCHEMA_JSON).unwrap();
    codec.add_registry_schema(EVOLVED_ID, &evolved(R::SCHEMA_JSON)).unwrap();
    codec
}

/// A payload with one of the framings (or none) in front of arbitrary bytes.
fn framed<R: Record>(how: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match how % 4 {
        0 => {}
        1 => {
            out.extend_from_slice(&[0xC3, 0x01]);
            out.extend_from_slice(&R::compiled().fingerprint.to_le_bytes());
        }
        2 => out.extend_from_slice(&[&[0u8][..], &CURRENT_ID.to_be_bytes()].concat()),
        _ => out.extend_from_slice(&[&[0u8][..], &EVOLVED_ID.to_be_bytes()].concat()),
    }
    out.extend_from_slice(body);
    out
}

fn never_panics_nor_hoards<R: Record>(codec: &Codec, how: u8, body: &[u8]) -> Result<(), TestCaseError> {
    let payload = framed::<R>(how, body);
    let (_, largest) = largest_allocation(|| codec.decode::<R>(&payload));
    prop_assert!(
        largest <= 64 * 1024,
        "{} bytes allocated for a {}-byte payload",
        largest,
        payload.len()
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(how in any::<u8>(), body in prop::collection::vec(any::<u8>(), 0..512)) {
        never_panics_nor_hoards::<Trade>(&codec_for::<Trade>(), how, &body)?;
        never_panics_nor_hoards::<Asset>(&codec_for::<Asset>(), how, &body)?;
        never_panics_nor_hoards::<DeadLetter>(&codec_for::<DeadLetter>(), how, &body)?;
        never_panics_nor_hoards::<Candle>(&codec_for::<Candle>(), how, &body)?;
    }

    #[test]
    fn mutated_records_never_panic(t in any_trade(), a in any_asset(), at in any::<prop::sample::Index>(), byte in any::<u8>(), how in 1u8..4) {
        let mut body = Vec::new();
        t.write_body(&mut body).unwrap();
        let i = at.index(body.len());
        body[i] = byte;
        never_panics_nor_hoards::<Trade>(&codec_for::<Trade>(), how, &body)?;
        let mut body = Vec::new();
        a.write_body(&mut body).unwrap();
        let i = at.index(body.len());
        body[i] = byte;
        never_panics_nor_hoards::<Asset>(&codec_for::<Asset>(), how, &body)?;
    }

    #[test]
    fn records_roundtrip(t in any_trade(), a in any_asset(), d in any_dead_letter()) {
        for framing in [WriteFraming::SingleObject, WriteFraming::Confluent] {
            let codec = Codec::new(framing);
            for (name, json_text) in [(Trade::NAME, Trade::SCHEMA_JSON), (Asset::NAME, Asset::SCHEMA_JSON), (DeadLetter::NAME, DeadLetter::SCHEMA_JSON)] {
                let id = json_text.len() as u32;
                codec.add_registry_schema(id, json_text).unwrap();
                codec.set_write_id(name, id);
            }
            prop_assert_eq!(codec.decode::<Trade>(&codec.encode(&t).unwrap()).unwrap(), t.clone());
            prop_assert_eq!(codec.decode::<Asset>(&codec.encode(&a).unwrap()).unwrap(), a.clone());
            prop_assert_eq!(codec.decode::<DeadLetter>(&codec.encode(&d).unwrap()).unwrap(), d.clone());
        }
    }

    /// apache-avro reads our bytes with the full schema (decimals included) and
    /// writes back exactly the same bytes. (Maps are the exception: apache-avro
    /// writes their entries in hash order, so for assets the check is that our
    /// reader reads apache-avro's bytes back to the same record.)
    #[test]
    fn bytes_equal_apache_avro(t in any_trade(), a in any_asset(), d in any_dead_letter()) {
        prop_assert_eq!(reencoded(&t), body(&t));
        prop_assert_eq!(reencoded(&d), body(&d));
        let theirs = reencoded(&a);
        let mut r = tickpipe_schemas::wire::Reader::new(&theirs);
        prop_assert_eq!(Asset::read_body(&mut r).unwrap(), a.clone());
        prop_assert_eq!(r.remaining(), 0);
    }
}

fn body<R: Record>(r: &R) -> Vec<u8> {
    let mut out = Vec::new();
    r.write_body(&mut out).unwrap();
    out
}

fn reencoded<R: Record>(r: &R) -> Vec<u8> {
    let schema = &R::compiled().schema;
    let bytes = body(r);
    let mut cursor = &bytes[..];
    let value = apache_avro::from_avro_datum(schema, &mut cursor, None).unwrap();
    assert!(cursor.is_empty());
    apache_avro::to_avro_datum(schema, value).unwrap()
}

#[test]
fn every_strict_prefix_of_a_record_is_an_error() {
    let codec = codec_for::<Candle>();
    for framing in [WriteFraming::SingleObject, WriteFraming::Confluent] {
        let c = Codec::new(framing);
        c.set_write_id(Candle::NAME, CURRENT_ID);
        let full = c.encode(&candle()).unwrap();
        assert_eq!(codec.decode::<Candle>(&full).unwrap(), candle());
        for len in 0..full.len() {
            assert!(
                codec.decode::<Candle>(&full[..len]).is_err(),
                "{framing:?}: prefix of {len} bytes decoded"
            );
        }
    }
}

/// Decodes `payload` as an `R`: it must be refused, and nothing on the way may
/// allocate 64 KiB or more at once. `what` names the case.
#[track_caller]
fn refused_without_hoarding<R: Record>(payload: &[u8], what: &str) {
    let codec = codec_for::<R>();
    let (result, largest) = largest_allocation(|| codec.decode::<R>(payload));
    assert!(result.is_err(), "{what}: decoded");
    assert!(largest < 64 * 1024, "{what} allocated {largest} bytes");
}

/// A length prefix of 2^31 (and of 2^62) must not allocate: it is truncation.
#[test]
fn huge_length_prefixes_allocate_nothing() {
    for id in [CURRENT_ID, EVOLVED_ID] {
        for len in [1i64 << 31, 1 << 62] {
            let mut payload = header(id);
            put_long(&mut payload, len); // length of the first string
            payload.extend_from_slice(b"binance");
            refused_without_hoarding::<Trade>(&payload, &format!("id {id}: a length of {len}"));
        }
    }
}

/// The same for an array/map block count (asset tokens), on both paths.
#[test]
fn huge_block_counts_allocate_nothing() {
    let mut a = asset();
    a.tokens.clear();
    let b = body(&a);
    // The tokens map is followed by source, event_time, ingest_time; its empty
    // encoding is the single 0 before them.
    let tail = {
        let mut t = Vec::new();
        put_long(&mut t, a.source as i64);
        put_long(&mut t, a.event_time);
        put_long(&mut t, a.ingest_time);
        t
    };
    let map_at = b.len() - tail.len() - 1;
    assert_eq!(b[map_at], 0);
    for id in [CURRENT_ID, EVOLVED_ID] {
        let mut payload = header(id);
        payload.extend_from_slice(&b[..map_at]);
        put_long(&mut payload, 1 << 31);
        payload.extend_from_slice(&[2, b'k', 0]);
        refused_without_hoarding::<Asset>(&payload, &format!("id {id}: a block count of 2^31"));
    }
}
