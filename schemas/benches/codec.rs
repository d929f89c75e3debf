//! `make bench`: Avro encode and decode throughput for trade records, one core,
//! next to serde_json on the same records measured in the same run.
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
    let n = trades.len() * reps;

    let avro: Vec<Vec<u8>> = trades.iter().map(|t| codec.encode(t).expect("encodable")).collect();
    let jsons: Vec<Vec<u8>> = json
        .iter()
        .map(|t| serde_json::to_vec(t).expect("serialisable"))
        .collect();
    for (t, b) in trades.iter().zip(&avro) {
        assert_eq!(&codec.decode::<Trade>(b).expect("decodable"), t);
    }

    let mut buf = Vec::with_capacity(256);
    let avro_enc = measure(n, runs, || {
        for _ in 0..reps {
            for t in &trades {
                buf.clear();
                codec.encode_into(t, &mut buf).expect("encodable");
                std::hint::black_box(&buf);
            }
        }
    });
    let avro_dec = measure(n, runs, || {
        for _ in 0..reps {
            for b in &avro {
                std::hint::black_box(codec.decode::<Trade>(b).expect("decodable"));
            }
        }
    });
    let json_enc = measure(n, runs, || {
        for _ in 0..reps {
            for t in &json {
                buf.clear();
                serde_json::to_writer(&mut buf, t).expect("serialisable");
                std::hint::black_box(&buf);
            }
        }
    });
    let json_dec = measure(n, runs, || {
        for _ in 0..reps {
            for b in &jsons {
                std::hint::black_box(serde_json::from_slice::<JsonTrade>(b).expect("parsable"));
            }
        }
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
    println!(
        "  {:<28} {:>14.0} {:>13.2}x {:>12.1}",
        "avro encode (single-object)",
        avro_enc,
        avro_enc / json_enc,
        avg(&avro)
    );
    println!(
        "  {:<28} {:>14.0} {:>13.2}x",
        "avro decode",
        avro_dec,
        avro_dec / json_dec
    );
    println!(
        "  {:<28} {:>14.0} {:>13.2}x {:>12.1}",
        "serde_json encode (baseline)",
        json_enc,
        1.0,
        avg(&jsons)
    );
    println!(
        "  {:<28} {:>14.0} {:>13.2}x",
        "serde_json decode (baseline)", json_dec, 1.0
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
