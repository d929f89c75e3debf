//! The producer against a broker and a Schema Registry that speak only TLS,
//! configured the way a managed cluster is
//! (`TICKPIPE_LIBRDKAFKA_SECURITY_PROTOCOL=SSL`, the CA file through OpenSSL's
//! `SSL_CERT_FILE`, zstd batches): it verifies the certificates, publishes
//! every record, and what it wrote is read back over TLS. The broker is an
//! Apache Kafka node of the test's own behind a rustls proxy (a TLS implementation other
//! than the OpenSSL inside librdkafka). Also: the librdkafka the binaries
//! carry has the security and compression features managed clusters need.

mod common;

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tickpipe_schemas::registry::{RegistryClient, RegistryConfig};
use tickpipe_schemas::{Codec, Record, Trade, WriteFraming};
use tickpipe_testkit::kafka;
use tickpipe_testkit::registry::TestRegistry;
use tickpipe_testkit::stack::{self, ScratchBroker};
use tickpipe_testkit::tls::{TestCa, TlsProxy};

#[test]
fn librdkafka_carries_tls_sasl_and_every_codec() {
    let native = ClientConfig::new().create_native_config().expect("native config");
    let features = native.get("builtin.features").expect("builtin.features");
    for wanted in ["ssl", "sasl_plain", "sasl_scram", "zstd", "lz4", "snappy", "gzip"] {
        assert!(
            features.split(',').any(|f| f == wanted),
            "librdkafka lacks {wanted}: {features}"
        );
    }
    // Confluent Cloud's settings are accepted by a real client.
    let producer: Result<rdkafka::producer::BaseProducer, _> = ClientConfig::new()
        .set("bootstrap.servers", "127.0.0.1:9")
        .set("security.protocol", "SASL_SSL")
        .set("sasl.mechanisms", "SCRAM-SHA-512")
        .set("sasl.username", "key")
        .set("sasl.password", "secret")
        .set("compression.type", "zstd")
        .create();
    assert!(producer.is_ok(), "{:?}", producer.err());
}

fn tls_consumer(brokers: &str, ca: Option<&std::path::Path>) -> BaseConsumer {
    let mut c = kafka::reader_config(brokers);
    c.set("security.protocol", "SSL");
    // `probe`: the system's store, as the services trust by default.
    let ca = ca.map_or("probe", |p| p.to_str().expect("utf-8 path"));
    c.set("ssl.ca.location", ca);
    c.create().expect("consumer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_publishes_through_verified_tls_with_zstd() {
    let ca = TestCa::new("kafka-tls");
    let server = ca.issue("broker", "127.0.0.1", &["127.0.0.1"]);
    // The proxy's port first: the broker advertises it, so every connection
    // a client opens (bootstrap and broker alike) goes through TLS.
    let proxy = TlsProxy::bind(&server);
    let broker = ScratchBroker::start(proxy.addr);
    let proxy = proxy.forward_to(broker.addr);
    let brokers = proxy.addr.to_string();
    // The Schema Registry over HTTPS too (rustls on the client side, trusting
    // the same CA through the same variable).
    let registry = TestRegistry::start().await.expect("registry proxy");
    let registry_addr = registry
        .url
        .trim_start_matches("http://")
        .parse()
        .expect("registry address");
    let registry_proxy = TlsProxy::bind(&server).forward_to(registry_addr);
    let registry_url = format!("https://127.0.0.1:{}", registry_proxy.addr.port());

    // A few thousand trades as data.binance.vision writes them.
    let dir = ca.dir().join("replay");
    std::fs::create_dir_all(&dir).expect("replay folder");
    let csv = dir.join("BTCUSDT-trades-2024-08-08.csv");
    let n = 3_000i64;
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&csv).expect("csv"));
        for id in 1..=n {
            let price = format!("{}.{:02}", 61_000 + id % 97, id % 100);
            writeln!(
                f,
                "{id},{price},0.00{:03},0,{},{},True",
                id % 1000 + 1,
                1_723_075_200_000i64 + id,
                if id % 3 == 0 { "True" } else { "False" }
            )
            .expect("csv line");
        }
    }
    let prefix = format!("{}.", stack::unique_name("tls"));
    let mut producer = Command::new(env!("CARGO_BIN_EXE_producer"));
    producer
        .args(["--metrics-addr", "off", "replay"])
        .arg(&csv)
        .args(["--brokers", &brokers, "--topic-prefix", &prefix])
        .args(["--schema-registry-url", &registry_url])
        .args(["--partitions", "2", "--replication", "1"])
        .env("TICKPIPE_LIBRDKAFKA_SECURITY_PROTOCOL", "SSL")
        // OpenSSL's own variable, as a user of any OpenSSL program sets it
        // (the read-back below names the file as a property instead).
        .env("SSL_CERT_FILE", ca.cert_file())
        .env("TICKPIPE_LIBRDKAFKA_COMPRESSION_TYPE", "zstd")
        .env("RUST_LOG", "warn");
    let out = tokio::task::spawn_blocking(move || producer.output())
        .await
        .expect("join")
        .expect("producer binary");
    assert!(
        out.status.success(),
        "the producer failed over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(proxy.handshakes() > 0, "nothing went through TLS");
    assert!(registry_proxy.handshakes() > 0, "the registry was not reached over TLS");
    let subject = format!("{prefix}trades-value");
    assert!(
        registry
            .requests()
            .iter()
            .any(|r| r.starts_with("POST") && r.contains(&subject)),
        "{subject} was not registered: {:?}",
        registry.requests()
    );

    // Read back over TLS (the only way in), zstd batches decompressed.
    let consumer = tls_consumer(&brokers, Some(&ca.cert_file()));
    let topic = format!("{prefix}trades");
    // Confluent framing: the ids come from the registry.
    let codec = Codec::new(WriteFraming::Confluent);
    let lookup = RegistryClient::new(RegistryConfig::new(registry.url.clone())).expect("client");
    let mut ids = Vec::new();
    for (key, payload) in kafka::read_with(&consumer, &topic) {
        let t: Trade = lookup.decode(&codec, &payload).await.expect("a trade");
        assert_eq!(key, t.key().as_bytes());
        ids.push(t.trade_id);
    }
    ids.sort_unstable();
    assert_eq!(ids, (1..=n).collect::<Vec<_>>(), "every trade exactly once");

    // With only the system's roots the broker's certificate is refused: the
    // check is on.
    let failed_before = proxy.failed_handshakes();
    let stranger = tls_consumer(&brokers, None);
    let md = stranger.fetch_metadata(Some(&topic), Duration::from_secs(3));
    assert!(md.is_err(), "metadata over TLS without trusting the CA");
    assert!(proxy.failed_handshakes() > failed_before);
}
