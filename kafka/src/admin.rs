//! Topic administration: every service creates the topics it uses at start.

use std::time::Duration;

use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, ConfigSource, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use tickpipe_schemas::Topic;

use crate::client::client_config;

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
    #[error("{0}")]
    Config(Box<ConfigMismatch>),
}

/// An existing topic's configuration that could not be set.
#[derive(Debug, thiserror::Error)]
#[error(
    "topic {topic} exists with {key}={found}, and setting {key}={wanted} failed ({reason}); set it on the \
     broker, e.g. kafka-configs.sh --bootstrap-server {brokers} --alter --entity-type topics --entity-name \
     {topic} --add-config {key}={wanted}"
)]
pub struct ConfigMismatch {
    pub brokers: String,
    pub topic: String,
    pub key: String,
    pub found: String,
    pub wanted: String,
    pub reason: String,
}

/// Creates the given entity topics (with `prefix`) if they do not exist yet.
/// Brokers should not auto-create topics (ours do not: a typo would make one),
/// so every service calls this at start.
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
/// `cleanup.policy=compact`) if they do not exist yet. An existing topic whose
/// configuration differs gets the given values, its other per-topic settings
/// kept (the non-incremental AlterConfigs call replaces them all, so they are
/// sent again); a broker that refuses is an error that names the fix.
pub async fn ensure_topics_configured(
    brokers: &str,
    names: &[String],
    partitions: i32,
    replication: i32,
    config: &[(&str, &str)],
) -> Result<(), TopicError> {
    let admin: AdminClient<DefaultClientContext> =
        client_config(brokers).create().map_err(|source| TopicError::Client {
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
    let mut existing = Vec::new();
    for r in results {
        match r {
            Ok(_) => {}
            Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => existing.push(topic),
            Err((topic, code)) => return Err(TopicError::Topic { topic, code }),
        }
    }
    let outcome = async {
        if !config.is_empty() {
            for topic in &existing {
                configure_existing(&admin, &opts, brokers, topic, config).await?;
            }
        }
        Ok(())
    }
    .await;
    // Dropping the client joins rdkafka's polling thread, which looks at its
    // stop flag every 100 ms: done on the side, so that start-up does not wait.
    let _ = std::thread::Builder::new()
        .name("admin-drop".into())
        .spawn(move || drop(admin));
    outcome
}

/// A topic's configuration as the broker describes it: name -> (value, source);
/// no value for a sensitive setting, which brokers do not show.
type Described = std::collections::BTreeMap<String, (Option<String>, ConfigSource)>;

/// The first of `config` that `current` does not have: (key, value found, value wanted).
fn first_difference(current: &Described, config: &[(&str, &str)]) -> Option<(String, String, String)> {
    config.iter().find_map(|(k, v)| {
        let found = current.get(*k).and_then(|(value, _)| value.as_deref());
        (found != Some(*v)).then(|| ((*k).to_owned(), found.unwrap_or("(unset)").to_owned(), (*v).to_owned()))
    })
}

/// What a (non-incremental, replace-all) AlterConfigs request must carry so
/// that `config` is set and the topic's other own settings stay; `Err` names
/// a setting of the topic whose value the broker hides (a replacement would
/// lose it).
fn replacement(current: &Described, config: &[(&str, &str)]) -> Result<Vec<(String, String)>, String> {
    let mut entries = Vec::new();
    for (k, (v, source)) in current {
        if *source != ConfigSource::DynamicTopic || config.iter().any(|(c, _)| c == k) {
            continue;
        }
        let v = v
            .clone()
            .ok_or_else(|| format!("the topic's {k} is hidden and would be lost"))?;
        entries.push((k.clone(), v));
    }
    entries.extend(config.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    Ok(entries)
}

/// Sets `config` on an existing topic where it differs, keeping the topic's
/// other dynamic settings.
async fn configure_existing(
    admin: &AdminClient<DefaultClientContext>,
    opts: &AdminOptions,
    brokers: &str,
    topic: &str,
    config: &[(&str, &str)],
) -> Result<(), TopicError> {
    let spec = [ResourceSpecifier::Topic(topic)];
    // The topic's configuration; `None` when the broker will not describe it
    // (no DescribeConfigs permission, an old broker): then nothing is known
    // and nothing is changed.
    let described = async {
        let resource = admin
            .describe_configs(&spec, opts)
            .await
            .ok()?
            .into_iter()
            .next()?
            .ok()?;
        let entries = resource.entries.into_iter();
        Some(entries.map(|e| (e.name, (e.value, e.source))).collect::<Described>())
    };
    let Some(before) = described.await else {
        tracing::warn!(
            topic,
            ?config,
            "cannot read the topic's configuration; make sure it has these settings"
        );
        return Ok(());
    };
    let Some((key, found, wanted)) = first_difference(&before, config) else {
        return Ok(());
    };
    tracing::warn!(topic, key, found, wanted, "topic configuration differs; setting it");
    let refused = match replacement(&before, config) {
        Err(hidden) => Some(hidden),
        Ok(entries) => {
            let alter = entries
                .iter()
                .fold(AlterConfig::new(ResourceSpecifier::Topic(topic)), |a, (k, v)| {
                    a.set(k, v)
                });
            match admin.alter_configs(&[alter], opts).await {
                Err(e) => Some(e.to_string()),
                Ok(results) => results
                    .into_iter()
                    .find_map(|r| r.err())
                    .map(|(_, code)| code.to_string()),
            }
        }
    };
    // Accepted is done: brokers apply the change asynchronously, so reading
    // it back at once could see the old value.
    match refused {
        None => Ok(()),
        Some(reason) => Err(TopicError::Config(Box::new(ConfigMismatch {
            brokers: brokers.to_owned(),
            topic: topic.to_owned(),
            key,
            found,
            wanted,
            reason,
        }))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replacement_sets_the_config_and_keeps_the_topics_own_settings() {
        let current: Described = [
            ("cleanup.policy", "delete", ConfigSource::Default),
            ("retention.ms", "86400000", ConfigSource::DynamicTopic),
            ("segment.bytes", "1073741824", ConfigSource::StaticBroker),
            ("max.message.bytes", "2000000", ConfigSource::DynamicTopic),
        ]
        .into_iter()
        .map(|(k, v, s)| (k.to_owned(), (Some(v.to_owned()), s)))
        .collect();
        let config = [("cleanup.policy", "compact"), ("max.message.bytes", "3000000")];
        assert_eq!(
            first_difference(&current, &config),
            Some(("cleanup.policy".into(), "delete".into(), "compact".into()))
        );
        assert_eq!(
            replacement(&current, &config),
            Ok(vars(&[
                ("retention.ms", "86400000"),
                ("cleanup.policy", "compact"),
                ("max.message.bytes", "3000000"),
            ]))
        );
        // A hidden (sensitive) setting of the topic cannot be sent again.
        let mut hidden = current;
        hidden.insert("some.secret".into(), (None, ConfigSource::DynamicTopic));
        assert_eq!(
            replacement(&hidden, &config),
            Err("the topic's some.secret is hidden and would be lost".into())
        );
        assert_eq!(
            first_difference(&Described::new(), &[("cleanup.policy", "compact")]),
            Some(("cleanup.policy".into(), "(unset)".into(), "compact".into()))
        );
        let done = [("cleanup.policy", "compact"), ("max.message.bytes", "3000000")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), (Some(v.to_owned()), ConfigSource::DynamicTopic)))
            .collect();
        assert_eq!(first_difference(&done, &config), None);
    }

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }
}
