//! Kafka settings and topic administration for publishing.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::types::RDKafkaErrorCode;
use tickpipe_schemas::Topic;

/// Settings for a producer that never duplicates on retry and never acknowledges
/// a write the cluster could still lose: idempotence, `acks=all`, lz4 batches.
pub fn producer_config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000");
    c
}

/// Admin failures when preparing topics.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("cannot create a Kafka admin client for {brokers}: {source}")]
    Client {
        brokers: String,
        source: rdkafka::error::KafkaError,
    },
    #[error("creating topics on {brokers} failed: {source}")]
    Request {
        brokers: String,
        source: rdkafka::error::KafkaError,
    },
    #[error("creating topic {topic} failed: {code}")]
    Topic { topic: String, code: RDKafkaErrorCode },
}

/// Creates the given entity topics (with `prefix`) if they do not exist yet.
/// Brokers such as tansu do not auto-create topics, so every service calls this
/// at start.
pub async fn ensure_topics(
    brokers: &str,
    prefix: &str,
    topics: &[Topic],
    partitions: i32,
    replication: i32,
) -> Result<Vec<String>, TopicError> {
    let names: Vec<String> = topics.iter().map(|t| t.name(prefix)).collect();
    ensure_topic_names(brokers, &names, partitions, replication).await?;
    Ok(names)
}

/// Creates topics by name if they do not exist yet.
pub async fn ensure_topic_names(
    brokers: &str,
    names: &[String],
    partitions: i32,
    replication: i32,
) -> Result<(), TopicError> {
    ensure_topics_configured(brokers, names, partitions, replication, &[]).await
}

/// Creates topics by name with the given topic configuration (such as
/// `cleanup.policy=compact`) if they do not exist yet; existing topics are
/// left as they are.
pub async fn ensure_topics_configured(
    brokers: &str,
    names: &[String],
    partitions: i32,
    replication: i32,
    config: &[(&str, &str)],
) -> Result<(), TopicError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(|source| TopicError::Client {
            brokers: brokers.to_owned(),
            source,
        })?;
    let new: Vec<NewTopic<'_>> = names
        .iter()
        .map(|n| {
            config.iter().fold(
                NewTopic::new(n, partitions, TopicReplication::Fixed(replication)),
                |t, (k, v)| t.set(k, v),
            )
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&new, &opts)
        .await
        .map_err(|source| TopicError::Request {
            brokers: brokers.to_owned(),
            source,
        })?;
    // Dropping the client joins rdkafka's polling thread, which looks at its
    // stop flag every 100 ms: done on the side, so that start-up does not wait.
    let _ = std::thread::Builder::new()
        .name("admin-drop".into())
        .spawn(move || drop(admin));
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(TopicError::Topic { topic, code }),
        }
    }
    Ok(())
}
