//! The Schema Registry client against a real registry (Apicurio's
//! Confluent-compatible API, from the local stack), through testkit's
//! recording proxy.

mod common;

use common::*;
use tickpipe_schemas::registry::{Compatibility, RegistryClient, RegistryConfig, RegistryError};
use tickpipe_schemas::*;
use tickpipe_testkit::registry::{TestRegistry, MISSING_ID};
use tickpipe_testkit::stack::unique_name;

fn client(url: &str) -> RegistryClient {
    RegistryClient::new(RegistryConfig::new(url)).unwrap()
}

#[tokio::test]
async fn topics_are_registered_once_and_encoding_makes_no_http_call() {
    let registry = TestRegistry::start().await.unwrap();
    let producer_codec = Codec::new(WriteFraming::Confluent);
    let producer_side = client(&registry.url);
    let prefix = format!("{}.", unique_name("dev"));
    producer_side
        .register_topics(&producer_codec, &prefix, &Topic::ALL)
        .await
        .unwrap();

    // Registering again (a restart) gives the same ids.
    let again = Codec::new(WriteFraming::Confluent);
    producer_side
        .register_topics(&again, &prefix, &Topic::ALL)
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

    let subjects: Vec<String> = reqwest::get(format!("{}/subjects", registry.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut ours: Vec<String> = subjects
        .into_iter()
        .filter_map(|s| s.strip_prefix(&prefix).map(str::to_owned))
        .collect();
    ours.sort();
    assert_eq!(
        ours,
        [
            "assets-value",
            "candles-value",
            "dead-letters-value",
            "exchanges-value",
            "markets-value",
            "prices-value",
            "rates-value",
            "trades-value"
        ]
    );
}

#[tokio::test]
async fn an_incompatible_schema_is_refused_with_the_reason() {
    let registry = TestRegistry::start().await.unwrap();
    let c = client(&registry.url);
    let subject = format!("{}.trades-value", unique_name("compat"));
    c.set_compatibility(&subject, Compatibility::Backward).await.unwrap();
    c.register(&subject, Trade::SCHEMA_JSON).await.unwrap();

    // A new required field without a default: new readers cannot read old data.
    let mut v: serde_json::Value = serde_json::from_str(Trade::SCHEMA_JSON).unwrap();
    v["fields"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({ "name": "fee", "type": "string" }));
    let breaking = v.to_string();

    let verdict = c.check_compatibility(&subject, &breaking).await.unwrap();
    assert!(verdict.unwrap_err().contains("fee"), "the reason names the field");
    match c.register(&subject, &breaking).await {
        Err(RegistryError::Incompatible {
            subject: refused,
            message,
        }) => {
            assert_eq!(refused, subject);
            assert!(message.contains("incompatible"), "{message}");
        }
        other => panic!("expected Incompatible, got {other:?}"),
    }
    // A subject with no versions accepts anything.
    let new = format!("{}.new-value", unique_name("compat"));
    assert_eq!(c.check_compatibility(&new, &breaking).await.unwrap(), Ok(()));
}

#[tokio::test]
async fn registry_failures_are_typed_and_clear() {
    let registry = TestRegistry::start().await.unwrap();
    let c = client(&registry.url);
    match c.schema_by_id(MISSING_ID).await {
        Err(
            e @ RegistryError::Api {
                status: 404,
                code: 40403,
                ..
            },
        ) => {
            assert!(!e.is_retriable());
            let shown = e.to_string();
            assert!(
                shown.starts_with("schema registry: ")
                    && shown.contains(&MISSING_ID.to_string())
                    && shown.ends_with("(HTTP 404, error code 40403)"),
                "{shown}"
            );
        }
        other => panic!("expected 40403, got {other:?}"),
    }
    match c
        .register(&format!("{}.x-value", unique_name("bad")), "{\"type\": \"nope\"}")
        .await
    {
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
    let registry = TestRegistry::start().await.unwrap();
    let consumer = client(&registry.url);
    let codec = Codec::new(WriteFraming::SingleObject);
    let mut payload = vec![0u8];
    payload.extend_from_slice(&MISSING_ID.to_be_bytes());
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
        assert!(err.to_string().contains(&MISSING_ID.to_string()), "{err}");
    }
    assert_eq!(registry.requests(), vec![format!("GET /schemas/ids/{MISSING_ID}")]);
}
