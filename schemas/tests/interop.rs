//! Interoperability with the ecosystem, proven by a real third-party client:
//! confluent-kafka (Python) with its Schema Registry client, AvroSerializer and
//! AvroDeserializer (fastavro underneath), talking to the stack's registry over
//! HTTP. The interpreter comes from `deploy/local/python-env.sh` (exported as
//! TICKPIPE_INTEROP_PYTHON by `make test`).
//!
//! (a) what tickpipe writes in Confluent framing, confluent-kafka reads field for
//!     field; (b) what confluent-kafka writes, tickpipe reads field for field;
//! (c) the single-object header equals the one fastavro's fingerprint gives.

mod common;

use std::path::PathBuf;
use std::process::Command;

use apache_avro::types::Value;
use common::*;
use serde_json::{json, Value as Json};
use tickpipe_schemas::registry::{RegistryClient, RegistryConfig};
use tickpipe_schemas::*;
use tickpipe_testkit::registry::TestRegistry;
use tickpipe_testkit::stack;

/// A record in the normalised JSON form the Python side also produces: decimals
/// as plain strings, timestamps as microseconds, bytes as hex, enums as symbols.
fn normalised<R: Record>(record: &R) -> Json {
    let mut body = Vec::new();
    record.write_body(&mut body).unwrap();
    let value = apache_avro::from_avro_datum(&R::compiled().schema, &mut &body[..], None).unwrap();
    to_json(&value)
}

fn to_json(v: &Value) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::Boolean(b) => json!(b),
        Value::Int(i) => json!(i),
        Value::Long(i) | Value::TimestampMicros(i) => json!(i),
        Value::String(s) | Value::Enum(_, s) => json!(s),
        Value::Bytes(b) => json!(b.iter().map(|x| format!("{x:02x}")).collect::<String>()),
        Value::Union(_, inner) => to_json(inner),
        Value::Array(items) => Json::Array(items.iter().map(to_json).collect()),
        Value::Map(m) => Json::Object(m.iter().map(|(k, v)| (k.clone(), to_json(v))).collect()),
        Value::Record(fields) => Json::Object(fields.iter().map(|(k, v)| (k.clone(), to_json(v))).collect()),
        Value::Decimal(d) => {
            let raw = Vec::<u8>::try_from(d).unwrap();
            let unscaled = decimal::unscaled_from_bytes(&raw).unwrap();
            json!(decimal::from_unscaled(unscaled).unwrap().to_string())
        }
        other => panic!("no JSON form for {other:?}"),
    }
}

fn python() -> PathBuf {
    let py = stack::interop_python();
    let probe = Command::new(&py)
        .args(["-c", "import confluent_kafka.schema_registry.avro, fastavro"])
        .output();
    match probe {
        Ok(o) if o.status.success() => py,
        _ => panic!(
            "{} cannot import confluent_kafka and fastavro; run `make test`, or set \
             TICKPIPE_INTEROP_PYTHON=$(deploy/local/python-env.sh)",
            py.display()
        ),
    }
}

/// Runs the Python client off the async threads (the registry proxy it talks
/// to is served by this test's runtime).
async fn python_client(mode: &'static str, registry: &str, input: Json) -> Vec<Json> {
    let registry = registry.to_owned();
    tokio::task::spawn_blocking(move || run_python(mode, &registry, &input))
        .await
        .unwrap()
}

/// Runs the Python client in `mode` on `input`; returns its output.
fn run_python(mode: &str, registry: &str, input: &Json) -> Vec<Json> {
    let dir = std::env::temp_dir();
    let name = stack::unique_name("interop");
    let src = dir.join(format!("{name}-in.json"));
    let dst = dir.join(format!("{name}-out.json"));
    std::fs::write(&src, input.to_string()).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/confluent_client.py");
    let out = Command::new(python())
        .arg(script)
        .args([mode, registry])
        .arg(&src)
        .arg(&dst)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "confluent_client.py {mode} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Vec<Json> = serde_json::from_str(&std::fs::read_to_string(&dst).unwrap()).unwrap();
    let _ = std::fs::remove_file(src);
    let _ = std::fs::remove_file(dst);
    result
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// One sample of every record: (topic, normalised JSON, payload, schema).
type Sample = (String, Json, Vec<u8>, &'static str);

fn one<R: Record>(topic: Topic, prefix: &str, codec: &Codec, record: R) -> Sample {
    (
        topic.name(prefix),
        normalised(&record),
        codec.encode(&record).unwrap(),
        R::SCHEMA_JSON,
    )
}

fn samples(prefix: &str, codec: &Codec) -> Vec<Sample> {
    let agg = Trade {
        kind: TradeKind::AggTrade,
        first_trade_id: Some(1),
        last_trade_id: Some(3),
        price: dec("-0.000000000000000001"),
        quantity: dec("99999999999999999999.999999"),
        ..trade()
    };
    vec![
        one(Topic::Trades, prefix, codec, trade()),
        one(Topic::Trades, prefix, codec, agg),
        one(Topic::Assets, prefix, codec, asset()),
        one(Topic::Rates, prefix, codec, rate()),
        one(Topic::Exchanges, prefix, codec, exchange()),
        one(Topic::Markets, prefix, codec, market()),
        one(Topic::Prices, prefix, codec, price()),
        one(Topic::Candles, prefix, codec, candle()),
        one(Topic::DeadLetters, prefix, codec, dead_letter()),
    ]
}

/// Decodes a payload as the record of its topic, in normalised form.
async fn decode_normalised(client: &RegistryClient, codec: &Codec, topic: &str, payload: &[u8]) -> Json {
    let base = topic.rsplit('.').next().unwrap();
    match Topic::from_base_name(base).unwrap() {
        Topic::Trades => normalised(&client.decode::<Trade>(codec, payload).await.unwrap()),
        Topic::Assets => normalised(&client.decode::<Asset>(codec, payload).await.unwrap()),
        Topic::Rates => normalised(&client.decode::<Rate>(codec, payload).await.unwrap()),
        Topic::Exchanges => normalised(&client.decode::<Exchange>(codec, payload).await.unwrap()),
        Topic::Markets => normalised(&client.decode::<Market>(codec, payload).await.unwrap()),
        Topic::Prices => normalised(&client.decode::<Price>(codec, payload).await.unwrap()),
        Topic::Candles => normalised(&client.decode::<Candle>(codec, payload).await.unwrap()),
        Topic::DeadLetters => normalised(&client.decode::<DeadLetter>(codec, payload).await.unwrap()),
    }
}

#[tokio::test]
async fn confluent_kafka_reads_what_tickpipe_writes() {
    let registry = TestRegistry::start().await.unwrap();
    let client = RegistryClient::new(RegistryConfig::new(&registry.url)).unwrap();
    let codec = Codec::new(WriteFraming::Confluent);
    client.register_topics(&codec, "interop.", &Topic::ALL).await.unwrap();
    let samples = samples("interop.", &codec);

    let input = Json::Array(
        samples
            .iter()
            .map(|(topic, _, payload, _)| json!({"topic": topic, "hex": hex(payload)}))
            .collect(),
    );
    let decoded = python_client("read", &registry.url, input).await;
    assert_eq!(decoded.len(), samples.len());
    for ((topic, expected, _, _), got) in samples.iter().zip(&decoded) {
        assert_eq!(&got["record"], expected, "{topic}");
    }
}

#[tokio::test]
async fn tickpipe_reads_what_confluent_kafka_writes() {
    let registry = TestRegistry::start().await.unwrap();
    // Samples only provide the expected values here; Python registers the schemas.
    let samples = samples("py.", &Codec::new(WriteFraming::SingleObject));
    let input = Json::Array(
        samples
            .iter()
            .map(|(topic, record, _, schema)| json!({"topic": topic, "schema": schema, "record": record}))
            .collect(),
    );
    let written = python_client("write", &registry.url, input).await;
    assert_eq!(written.len(), samples.len());

    // A consumer that has never seen these ids fetches them from the registry.
    let client = RegistryClient::new(RegistryConfig::new(&registry.url)).unwrap();
    let codec = Codec::new(WriteFraming::SingleObject);
    for ((topic, expected, _, _), item) in samples.iter().zip(&written) {
        let payload = unhex(item["hex"].as_str().unwrap());
        assert_eq!(payload[0], 0, "{topic}: Confluent magic byte");
        assert_eq!(
            &decode_normalised(&client, &codec, topic, &payload).await,
            expected,
            "{topic}"
        );
    }
    assert!(registry.requests().iter().any(|r| r.starts_with("GET /schemas/ids/")));
}

#[test]
fn single_object_header_matches_fastavro() {
    let codec = Codec::new(WriteFraming::SingleObject);
    let samples = samples("", &codec);
    let input = Json::Array(
        samples
            .iter()
            .map(|(topic, _, _, schema)| json!({"topic": topic, "schema": schema}))
            .collect(),
    );
    let headers = run_python("fingerprint", "http://127.0.0.1:9", &input);
    for ((topic, _, payload, _), header) in samples.iter().zip(&headers) {
        assert_eq!(hex(&payload[..10]), header["hex"].as_str().unwrap(), "{topic}");
    }
}
