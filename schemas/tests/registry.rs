//! The Schema Registry client against the registry double (the published REST
//! API, served over real HTTP on loopback).

mod common;

use common::*;
use tickpipe_schemas::registry::{Compatibility, RegistryClient, RegistryConfig, RegistryError};
use tickpipe_schemas::*;
use tickpipe_testkit::registry::RegistryDouble;

fn client(url: &str) -> RegistryClient {
    RegistryClient::new(RegistryConfig::new(url)).unwrap()
}

#[tokio::test]
async fn topics_are_registered_once_and_encoding_makes_no_http_call() {
    let registry = RegistryDouble::start().await.unwrap();
    let producer_codec = Codec::new(WriteFraming::Confluent);
    let producer_side = client(&registry.url);
    producer_side
        .register_topics(&producer_codec, "dev.", &Topic::ALL)
        .await
        .unwrap();

    // Registering again (a restart) gives the same ids.
    let again = Codec::new(WriteFraming::Confluent);
    producer_side
        .register_topics(&again, "dev.", &Topic::ALL)
        .await
        .unwrap();
    assert_eq!(
        producer_codec.encode(&trade()).unwrap(),
        again.encode(&trade()).unwrap()
    );

    let before = registry.requests().len();
    let bytes: Vec<Vec<u8>> = (0..100).map(|_| producer_codec.encode(&trade()).unwrap()).collect();
    assert_eq!(registry.requests().len(), before, "encoding must not call the registry");
    assert_eq!(bytes[0][0], 0, "Confluent magic byte");

    // A consumer with an empty cache fetches the writer schema once.
    let consumer_codec = Codec::new(WriteFraming::SingleObject);
    let consumer_side = client(&registry.url);
    for b in &bytes {
        assert_eq!(
            consumer_side.decode::<Trade>(&consumer_codec, b).await.unwrap(),
            trade()
        );
    }
    let fetched: Vec<String> = registry.requests()[before..].to_vec();
    let id = u32::from_be_bytes([bytes[0][1], bytes[0][2], bytes[0][3], bytes[0][4]]);
    assert_eq!(fetched, vec![format!("GET /schemas/ids/{id}")]);

    let subjects = reqwest::get(format!("{}/subjects", registry.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        subjects,
        r#"["dev.assets-value","dev.candles-value","dev.dead-letters-value","dev.exchanges-value","dev.markets-value","dev.prices-value","dev.rates-value","dev.trades-value"]"#
    );
}

#[tokio::test]
async fn an_incompatible_schema_is_refused_with_the_reason() {
    let registry = RegistryDouble::start().await.unwrap();
    let c = client(&registry.url);
    c.set_compatibility("trades-value", Compatibility::Backward)
        .await
        .unwrap();
    c.register("trades-value", Trade::SCHEMA_JSON).await.unwrap();

    // A new required field without a default: new readers cannot read old data.
    let mut v: serde_json::Value = serde_json::from_str(Trade::SCHEMA_JSON).unwrap();
    v["fields"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({ "name": "fee", "type": "string" }));
    let breaking = v.to_string();

    let verdict = c.check_compatibility("trades-value", &breaking).await.unwrap();
    assert!(verdict.unwrap_err().contains("fee"), "the reason names the field");
    match c.register("trades-value", &breaking).await {
        Err(RegistryError::Incompatible { subject, message }) => {
            assert_eq!(subject, "trades-value");
            assert!(message.contains("incompatible"), "{message}");
        }
        other => panic!("expected Incompatible, got {other:?}"),
    }
    // A subject with no versions accepts anything.
    assert_eq!(c.check_compatibility("new-value", &breaking).await.unwrap(), Ok(()));
}

#[tokio::test]
async fn registry_failures_are_typed_and_clear() {
    let registry = RegistryDouble::start().await.unwrap();
    let c = client(&registry.url);
    match c.schema_by_id(999).await {
        Err(
            e @ RegistryError::Api {
                status: 404,
                code: 40403,
                ..
            },
        ) => {
            assert!(!e.is_retriable());
            assert_eq!(
                e.to_string(),
                "schema registry: Schema 999 not found (HTTP 404, error code 40403)"
            );
        }
        other => panic!("expected 40403, got {other:?}"),
    }
    match c.register("x-value", "{\"type\": \"nope\"}").await {
        Err(RegistryError::Api {
            status: 422,
            code: 42201,
            ..
        }) => {}
        other => panic!("expected 42201, got {other:?}"),
    }
    // Nothing listens on port 9 of loopback.
    let down = client("http://127.0.0.1:9");
    let err = down.schema_by_id(1).await.unwrap_err();
    assert!(err.is_retriable());
    assert!(
        err.to_string()
            .starts_with("schema registry at http://127.0.0.1:9 is unreachable"),
        "{err}"
    );
    assert!(matches!(
        RegistryClient::new(RegistryConfig::new("127.0.0.1:8081")),
        Err(RegistryError::BadUrl(_))
    ));
}

#[test]
fn the_password_is_never_printed() {
    let mut config = RegistryConfig::new("https://psrc.example");
    config.username = Some("KEY".into());
    config.password = Some("s3cret".into());
    let shown = format!("{config:?} {:?}", RegistryClient::new(config.clone()).unwrap());
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(shown.contains("***"));
}

#[tokio::test]
async fn an_id_the_registry_lacks_is_asked_once_and_each_record_naming_it_is_refused() {
    let registry = RegistryDouble::start().await.unwrap();
    let consumer = client(&registry.url);
    let codec = Codec::new(WriteFraming::SingleObject);
    let mut payload = vec![0u8, 0, 0, 0x03, 0xe7]; // schema id 999
    payload.extend_from_slice(&Codec::new(WriteFraming::SingleObject).encode(&trade()).unwrap()[10..]);
    let first = consumer.learn(&codec, &payload).await;
    assert!(
        matches!(first, Err(RegistryError::Api { status: 404, .. })),
        "{first:?}"
    );
    for _ in 0..100 {
        // Remembered as missing: no further call, and the decoder refuses it.
        assert!(consumer.learn(&codec, &payload).await.is_ok());
        let err = codec.decode::<Trade>(&payload).unwrap_err();
        assert!(err.to_string().contains("999"), "{err}");
    }
    assert_eq!(registry.requests(), vec!["GET /schemas/ids/999".to_owned()]);
}
