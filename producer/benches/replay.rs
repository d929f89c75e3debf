//! `make bench`: the producer end to end. The real spot BTCUSDT WebSocket
//! capture (every line, depth updates included, as recorded), repeated to
//! ≥ 400,000 trades, is replayed by the `producer` binary at maximum speed into
//! the local broker: parse + validate + encode + produce, acknowledged (the run
//! flushes before it exits). Next to it, in the same run, the limit: raw
//! rdkafka production of the same trades pre-encoded, with the same producer
//! settings, warmed first and timed from its first send to its flush (the
//! binary is timed from process start to exit; its start-up and exit, timed
//! on a one-trade file, are also reported and left out in a like-for-like
//! line). Also reports the binary's peak resident memory.

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use tickpipe_kafka::{ensure_topics, producer_config};
use tickpipe_schemas::{Codec, Record, Topic, Trade, WriteFraming};
use tickpipe_testkit::{real, stack};

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let dir = stack::real_data_dir().join("binance_ws_raw_2024-08-08");
    let files = ["spot_btcusdt_20240808", "spot_btcusdt_20240809"].map(|n| dir.join(format!("{n}.ts_json.txt.gz")));
    let base_trades: Vec<Trade> = files
        .iter()
        .flat_map(|f| real::ws_capture_trades(f, "binance"))
        .collect();
    let target: usize = if quick { 20_000 } else { 400_000 };
    let reps = target.div_ceil(base_trades.len());
    let trades_total = reps * base_trades.len();

    // The capture's lines, repeated into one file the binary replays.
    let mut lines = Vec::new();
    for f in &files {
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut flate2::read::GzDecoder::new(std::fs::File::open(f).expect("capture")),
            &mut text,
        )
        .expect("gzip");
        lines.push(text);
    }
    let work = std::env::temp_dir().join(stack::unique_name("producer-bench"));
    std::fs::create_dir_all(&work).expect("work dir");
    let capture = work.join("capture.txt");
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&capture).expect("capture file"));
        for _ in 0..reps {
            for l in &lines {
                out.write_all(l.as_bytes()).expect("write");
            }
        }
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let brokers = stack::kafka_brokers();

    // The binary's fixed cost: start-up (topics, producer id) and exit on a
    // file of one trade.
    let one = work.join("one.txt");
    let first_trade = lines
        .iter()
        .flat_map(|t| t.lines())
        .find(|l| l.contains("\"e\":\"trade\""))
        .expect("a trade line");
    std::fs::write(&one, format!("{first_trade}\n")).expect("one-trade file");
    let (fixed_secs, _) = run_producer(&brokers, "bench_producer_one", &one);

    // The producer binary, as a user runs it.
    let (producer_secs, peak_kb) = run_producer(&brokers, "bench_producer", &capture);

    // The limit: the same trades pre-encoded, produced raw.
    let raw_prefix = format!("{}.", stack::unique_name("bench_raw"));
    rt.block_on(ensure_topics(&brokers, &raw_prefix, &[Topic::Trades], 3, 1))
        .expect("topics");
    let codec = Codec::new(WriteFraming::SingleObject);
    let encoded: Vec<(String, Vec<u8>)> = (0..reps)
        .flat_map(|_| base_trades.iter())
        .map(|t| (t.key(), codec.encode(t).expect("encode")))
        .collect();
    let mut cfg = producer_config(&brokers);
    cfg.set("queue.buffering.max.messages", "200000");
    let producer: ThreadedProducer<DefaultProducerContext> = cfg.create().expect("producer");
    let topic = Topic::Trades.name(&raw_prefix);
    // Warm: one record acknowledged first, so the producer id is acquired and
    // the connection up before the clock starts (the limit leaves out start-up;
    // the binary's figure above includes all of its own).
    let (k, v) = &encoded[0];
    producer
        .send(BaseRecord::to(&topic).key(k.as_str()).payload(v.as_slice()))
        .map_err(|(e, _)| e)
        .expect("warm-up record");
    producer.flush(Duration::from_secs(30)).expect("warm-up flush");
    let started = Instant::now();
    for (k, v) in &encoded {
        let mut rec = BaseRecord::to(&topic).key(k.as_str()).payload(v.as_slice());
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((_, r)) => {
                    rec = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(120)).expect("flush");
    let raw_secs = started.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&work).ok();

    let ours = trades_total as f64 / producer_secs;
    let raw = trades_total as f64 / raw_secs;
    println!("producer replay, real spot BTCUSDT capture x{reps} ({trades_total} trades, every capture line read, trade lines parsed), local broker, acknowledged:");
    println!(
        "  producer binary end to end   {:>10.0} trades/s  ({producer_secs:.2} s, process start to exit)",
        ours
    );
    println!(
        "  raw rdkafka, pre-encoded     {:>10.0} trades/s  ({raw_secs:.2} s)",
        raw
    );
    println!("  ratio to the limit           {:>10.2}  (goal >= 0.7)", ours / raw);
    // Like for like: the raw producer is timed warm, so here the binary's
    // start-up and exit (measured on one trade) are left out too.
    let steady = trades_total as f64 / (producer_secs - fixed_secs).max(1e-3);
    println!(
        "  binary without start-up/exit {:>10.0} trades/s  ({fixed_secs:.2} s fixed, measured on a one-trade file; ratio {:.2})",
        steady,
        steady / raw
    );
    println!(
        "  goal 200,000 trades/s        {}",
        if ours >= 200_000.0 { "met" } else { "NOT met" }
    );
    println!(
        "  peak RSS of the binary       {:>10.1} MB (goal < 100 MB)",
        peak_kb as f64 / 1024.0
    );
}

/// Runs the `producer` binary on `file` into fresh topics; (seconds from
/// process start to exit, peak RSS in KiB).
fn run_producer(brokers: &str, prefix: &str, file: &std::path::Path) -> (f64, u64) {
    let prefix = format!("{}.", stack::unique_name(prefix));
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_producer"))
        .args(["replay", "--speed", "max", "--metrics-addr", "off", "--partitions", "3"])
        .arg("--brokers")
        .arg(brokers)
        .arg("--topic-prefix")
        .arg(&prefix)
        .arg(file)
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("producer binary");
    // Peak memory sampled on the side, so that the exit is timed exactly.
    let status_path = format!("/proc/{}/status", child.id());
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak_kb = 0u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(kb) = std::fs::read_to_string(&status_path).ok().and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("VmHWM:"))
                        .and_then(|l| l.split_whitespace().nth(1))
                        .and_then(|v| v.parse().ok())
                }) {
                    peak_kb = peak_kb.max(kb);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            peak_kb
        })
    };
    let status = child.wait().expect("wait");
    let secs = started.elapsed().as_secs_f64();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak_kb = sampler.join().expect("sampler");
    assert!(status.success(), "producer replay failed: {status}");
    (secs, peak_kb)
}
