//! `make bench`: Avro encode and decode throughput for trade records, one core,
//! next to serde_json and to apache-avro's serde path (the newest release,
//! single-object encoding, byte for byte the same output) on the same records
//! measured in the same run.
//!
//! Input: the real Binance spot BTCUSDT and ETHUSDT trade captures in
//! `$TICKPIPE_REAL_DATA/binance_ws_raw_2024-08-08` (default `../shared/data/real`).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tickpipe_schemas::*;
use tickpipe_testkit::{real, stack};

/// The same record for the serde_json baseline (decimals as strings, as JSON
/// pipelines carry them).
#[derive(Serialize, Deserialize)]
struct JsonTrade {
    venue: String,
    symbol: String,
    kind: String,
    trade_id: i64,
    #[serde(with = "rust_decimal::serde::str")]
    price: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    quantity: Decimal,
    buyer_is_maker: bool,
    first_trade_id: Option<i64>,
    last_trade_id: Option<i64>,
    source: String,
    event_time: i64,
    ingest_time: i64,
}

/// The same record for apache-avro's serde path: decimals as their unscaled
/// two's-complement bytes, enums as enums, the compiled-in schema.
#[derive(Serialize, Deserialize, PartialEq, Debug)]
#[serde(rename = "Trade")]
struct SerdeTrade {
    venue: String,
    symbol: String,
    kind: SerdeKind,
    trade_id: i64,
    #[serde(with = "apache_avro_newest::serde::bytes")]
    price: Vec<u8>,
    #[serde(with = "apache_avro_newest::serde::bytes")]
    quantity: Vec<u8>,
    buyer_is_maker: bool,
    first_trade_id: Option<i64>,
    last_trade_id: Option<i64>,
    source: SerdeSource,
    event_time: i64,
    ingest_time: i64,
}

#[derive(Serialize, Deserialize, PartialEq, Debug, Clone, Copy)]
#[allow(non_camel_case_types)]
#[serde(rename = "TradeKind")]
enum SerdeKind {
    trade,
    agg_trade,
}

#[derive(Serialize, Deserialize, PartialEq, Debug, Clone, Copy)]
#[allow(non_camel_case_types)]
#[serde(rename = "Source")]
enum SerdeSource {
    unknown,
    coincap,
    binance,
    replay,
    simulator,
}

impl apache_avro_newest::AvroSchema for SerdeTrade {
    fn get_schema() -> apache_avro_newest::Schema {
        apache_avro_newest::Schema::parse_str(Trade::SCHEMA_JSON).expect("the compiled-in trade schema")
    }
}

/// The single-object header of our encoding (marker and fingerprint).
struct OursHeader(Vec<u8>);

impl apache_avro_newest::headers::HeaderBuilder for OursHeader {
    fn build_header(&self) -> Vec<u8> {
        self.0.clone()
    }
}

fn ours_header(encoded: &[u8]) -> OursHeader {
    OursHeader(encoded[..10].to_vec())
}

fn unscaled_bytes(d: &Decimal) -> Vec<u8> {
    let mut out = Vec::with_capacity(17);
    decimal::put_unscaled(&mut out, decimal::to_unscaled(d).expect("representable"));
    // `put_unscaled` writes Avro's length prefix first; the serde path wants the bytes alone.
    let mut r = wire::Reader::new(&out);
    r.bytes().expect("a length-prefixed value").to_vec()
}

fn to_serde(t: &Trade) -> SerdeTrade {
    SerdeTrade {
        venue: t.venue.clone(),
        symbol: t.symbol.clone(),
        kind: match t.kind {
            TradeKind::Trade => SerdeKind::trade,
            TradeKind::AggTrade => SerdeKind::agg_trade,
        },
        trade_id: t.trade_id,
        price: unscaled_bytes(&t.price),
        quantity: unscaled_bytes(&t.quantity),
        buyer_is_maker: t.buyer_is_maker,
        first_trade_id: t.first_trade_id,
        last_trade_id: t.last_trade_id,
        source: match t.source {
            Source::Unknown => SerdeSource::unknown,
            Source::Coincap => SerdeSource::coincap,
            Source::Binance => SerdeSource::binance,
            Source::Replay => SerdeSource::replay,
            Source::Simulator => SerdeSource::simulator,
        },
        event_time: t.event_time,
        ingest_time: t.ingest_time,
    }
}

fn from_serde(t: SerdeTrade) -> Trade {
    let dec = |b: &[u8]| {
        decimal::unscaled_from_bytes(b)
            .and_then(decimal::from_unscaled)
            .expect("a decimal")
    };
    Trade {
        venue: t.venue,
        symbol: t.symbol,
        kind: match t.kind {
            SerdeKind::trade => TradeKind::Trade,
            SerdeKind::agg_trade => TradeKind::AggTrade,
        },
        trade_id: t.trade_id,
        price: dec(&t.price),
        quantity: dec(&t.quantity),
        buyer_is_maker: t.buyer_is_maker,
        first_trade_id: t.first_trade_id,
        last_trade_id: t.last_trade_id,
        source: match t.source {
            SerdeSource::unknown => Source::Unknown,
            SerdeSource::coincap => Source::Coincap,
            SerdeSource::binance => Source::Binance,
            SerdeSource::replay => Source::Replay,
            SerdeSource::simulator => Source::Simulator,
        },
        event_time: t.event_time,
        ingest_time: t.ingest_time,
    }
}

/// The real spot trades of the 2024-08-08/09 BTCUSDT and ETHUSDT captures.
fn load_trades() -> Vec<Trade> {
    let dir = stack::real_data_dir().join("binance_ws_raw_2024-08-08");
    let trades: Vec<Trade> = real::spot_capture_trades_2024_08_08(&dir);
    assert!(
        trades.len() > 30_000,
        "expected the recorded trades in {}, found {}",
        dir.display(),
        trades.len()
    );
    trades
}

fn to_json(t: &Trade) -> JsonTrade {
    JsonTrade {
        venue: t.venue.clone(),
        symbol: t.symbol.clone(),
        kind: t.kind.to_string(),
        trade_id: t.trade_id,
        price: t.price,
        quantity: t.quantity,
        buyer_is_maker: t.buyer_is_maker,
        first_trade_id: t.first_trade_id,
        last_trade_id: t.last_trade_id,
        source: t.source.to_string(),
        event_time: t.event_time,
        ingest_time: t.ingest_time,
    }
}

/// Best records/s writing each of `items` into a reused buffer, `reps` times
/// per run.
fn encode_rate<T>(items: &[T], reps: usize, runs: usize, mut write: impl FnMut(&T, &mut Vec<u8>)) -> f64 {
    let mut buf = Vec::with_capacity(256);
    measure(items.len() * reps, runs, || {
        for _ in 0..reps {
            for t in items {
                buf.clear();
                write(t, &mut buf);
                std::hint::black_box(&buf);
            }
        }
    })
}

/// Best records/s reading each of `payloads`, `reps` times per run.
fn decode_rate<R>(payloads: &[Vec<u8>], reps: usize, runs: usize, mut read: impl FnMut(&[u8]) -> R) -> f64 {
    measure(payloads.len() * reps, runs, || {
        for _ in 0..reps {
            for b in payloads {
                std::hint::black_box(read(b));
            }
        }
    })
}

/// Best records/s over `runs` runs of `f`, which handles `n` records per call.
fn measure(n: usize, runs: usize, mut f: impl FnMut()) -> f64 {
    let mut best = Duration::MAX;
    for _ in 0..runs {
        let start = Instant::now();
        f();
        best = best.min(start.elapsed());
    }
    n as f64 / best.as_secs_f64()
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing and
    // only wants to know the harness runs.
    let quick = !std::env::args().any(|a| a == "--bench");
    let trades = load_trades();
    let json: Vec<JsonTrade> = trades.iter().map(to_json).collect();
    let codec = Codec::new(WriteFraming::SingleObject);
    let reps = if quick { 1 } else { (1_000_000 / trades.len()).max(1) };
    let runs = if quick { 1 } else { 5 };

    let avro: Vec<Vec<u8>> = trades.iter().map(|t| codec.encode(t).expect("encodable")).collect();
    let jsons: Vec<Vec<u8>> = json
        .iter()
        .map(|t| serde_json::to_vec(t).expect("serialisable"))
        .collect();
    for (t, b) in trades.iter().zip(&avro) {
        assert_eq!(&codec.decode::<Trade>(b).expect("decodable"), t);
    }

    // apache-avro writes the same bytes as ours and reads them back. Its
    // fingerprint of the schema differs from every other implementation's
    // (ARCHITECTURE.md, "A hand-written codec"), so it is given ours.
    let header = ours_header(&avro[0]);
    let writer = apache_avro_newest::SpecificSingleObjectWriter::<SerdeTrade>::new_with_header_builder(&header)
        .expect("a writer");
    let reader = apache_avro_newest::GenericSingleObjectReader::builder()
        .schema(<SerdeTrade as apache_avro_newest::AvroSchema>::get_schema())
        .header(header.0.clone())
        .build()
        .expect("a reader");
    let serde_trades: Vec<SerdeTrade> = trades.iter().map(to_serde).collect();
    for ((t, s), b) in trades.iter().zip(&serde_trades).zip(&avro) {
        let mut out = Vec::new();
        writer.write_ref(s, &mut out).expect("apache-avro encodes");
        assert_eq!(&out, b, "apache-avro writes other bytes than ours");
        let back: SerdeTrade = reader.read_deser(&mut b.as_slice()).expect("apache-avro decodes");
        assert_eq!(&from_serde(back), t);
    }

    let apache_enc = encode_rate(&trades, reps, runs, |t, buf| {
        writer.write_ref(&to_serde(t), buf).expect("encodable");
    });
    // Its best case: the serde records built beforehand, no conversion.
    let apache_enc_ready = encode_rate(&serde_trades, reps, runs, |t, buf| {
        writer.write_ref(t, buf).expect("encodable");
    });
    let apache_dec = decode_rate(&avro, reps, runs, |mut b| {
        from_serde(reader.read_deser(&mut b).expect("decodable"))
    });
    let avro_enc = encode_rate(&trades, reps, runs, |t, buf| {
        codec.encode_into(t, buf).expect("encodable")
    });
    let avro_dec = decode_rate(&avro, reps, runs, |b| codec.decode::<Trade>(b).expect("decodable"));
    let json_enc = encode_rate(&json, reps, runs, |t, buf| {
        serde_json::to_writer(buf, t).expect("serialisable");
    });
    let json_dec = decode_rate(&jsons, reps, runs, |b| {
        serde_json::from_slice::<JsonTrade>(b).expect("parsable")
    });

    let avg = |v: &[Vec<u8>]| v.iter().map(Vec::len).sum::<usize>() as f64 / v.len() as f64;
    println!(
        "codec: {} real Binance spot trades x {reps} per run, best of {runs} runs, one core",
        trades.len()
    );
    println!(
        "  {:<28} {:>14} {:>14} {:>12}",
        "", "records/s", "vs serde_json", "bytes/rec"
    );
    let row = |label: &str, rate: f64, baseline: f64, bytes: Option<f64>| {
        let bytes = bytes.map_or(String::new(), |b| format!("{b:>12.1}"));
        let line = format!("  {label:<28} {rate:>14.0} {:>13.2}x {bytes}", rate / baseline);
        println!("{}", line.trim_end());
    };
    row("avro encode (single-object)", avro_enc, json_enc, Some(avg(&avro)));
    row("avro decode", avro_dec, json_dec, None);
    row("serde_json encode (baseline)", json_enc, json_enc, Some(avg(&jsons)));
    row("serde_json decode (baseline)", json_dec, json_dec, None);
    row("apache-avro 0.22 encode", apache_enc, json_enc, None);
    row("  (serde records ready)", apache_enc_ready, json_enc, None);
    row("apache-avro 0.22 decode", apache_dec, json_dec, None);
    // From our records and back to them, as the services would use it.
    let (enc_ratio, dec_ratio) = (avro_enc / apache_enc, avro_dec / apache_dec);
    println!(
        "  ours vs apache-avro (serde, Trade to bytes and back): encode {enc_ratio:.2}x ({:.2}x with its records \
         ready), decode {dec_ratio:.2}x faster; apache-avro {} within 2x of ours on both",
        avro_enc / apache_enc_ready,
        if enc_ratio <= 2.0 && dec_ratio <= 2.0 {
            "IS"
        } else {
            "is NOT"
        }
    );
    let verdict = |v: f64, baseline: f64| {
        if v >= 1_000_000.0 && v > baseline {
            "met"
        } else {
            "NOT met"
        }
    };
    println!(
        "  goal >= 1,000,000 records/s and faster than serde_json: encode {}, decode {}",
        verdict(avro_enc, json_enc),
        verdict(avro_dec, json_dec)
    );
}
