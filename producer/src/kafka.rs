//! Kafka settings and topic administration for publishing.

use std::time::Duration;

use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, ConfigSource, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::types::RDKafkaErrorCode;
use tickpipe_schemas::Topic;

/// Environment variables with this prefix are librdkafka properties for every
/// Kafka client of every service: the rest of the name, lowercased, with `_`
/// for `.` and `__` for `_` (`TICKPIPE_LIBRDKAFKA_SASL_USERNAME` sets
/// `sasl.username`). This is how security settings (SASL, TLS) and tuning
/// reach a real cluster.
pub const PROPERTY_ENV_PREFIX: &str = "TICKPIPE_LIBRDKAFKA_";

/// What every binary's `--help` says about `PROPERTY_ENV_PREFIX`.
pub const PROPERTIES_HELP: &str = "librdkafka properties for every Kafka client (SASL, TLS, tuning) come from \
the configuration file's [librdkafka] table (security.protocol = \"SASL_SSL\") and, over it, from \
TICKPIPE_LIBRDKAFKA_<NAME> variables: the name lowercased, _ for . and __ for _ \
(TICKPIPE_LIBRDKAFKA_SECURITY_PROTOCOL=SASL_SSL sets security.protocol). They may change \
anything but the settings the delivery guarantees rest on (producer: enable.idempotence, acks; \
consumers: enable.auto.commit, enable.auto.offset.store, isolation.level).";

/// The librdkafka properties named by `PROPERTY_ENV_PREFIX` variables among
/// `vars`, sorted by name.
pub fn properties_from_env(vars: impl IntoIterator<Item = (String, String)>) -> Vec<(String, String)> {
    let mut props: Vec<(String, String)> = vars
        .into_iter()
        .filter_map(|(k, v)| {
            let rest = k.strip_prefix(PROPERTY_ENV_PREFIX)?;
            let name = rest
                .to_ascii_lowercase()
                .split("__")
                .map(|part| part.replace('_', "."))
                .collect::<Vec<_>>()
                .join("_");
            (!name.is_empty()).then_some((name, v))
        })
        .collect();
    props.sort();
    props
}

/// A client for `brokers` with the user's librdkafka properties: the
/// configuration file's `[librdkafka]` table, then the environment (see
/// `PROPERTY_ENV_PREFIX`).
pub fn client_config(brokers: &str) -> ClientConfig {
    // `vars_os`: `vars` would panic on a variable that is not UTF-8.
    let vars = std::env::vars_os().filter_map(|(k, v)| match (k.into_string(), v.into_string()) {
        (Ok(k), Ok(v)) => Some((k, v)),
        (Ok(k), Err(_)) if k.starts_with(PROPERTY_ENV_PREFIX) => {
            tracing::warn!(variable = k, "ignored: its value is not UTF-8");
            None
        }
        _ => None,
    });
    // The configuration file's properties first, so the environment's win.
    let mut properties = tickpipe_ops::config::librdkafka_properties().to_vec();
    properties.extend(properties_from_env(vars));
    let mut c = with_properties(brokers, &properties);
    let openssl_env = ["SSL_CERT_FILE", "SSL_CERT_DIR"]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
    trust_system_roots(&mut c, openssl_env);
    c
}

/// The OpenSSL inside librdkafka is built from source and looks for CA
/// certificates under its own prefix (`/usr/local/ssl`), where no system keeps
/// them: TLS to a cluster with a public certificate would fail. `probe` makes
/// librdkafka use the system's store (the first of the usual paths that
/// exists), unless the user named the CAs (`ssl.ca.location`, `ssl.ca.pem`)
/// or pointed OpenSSL at them (`SSL_CERT_FILE`, `SSL_CERT_DIR`: `openssl_env`).
fn trust_system_roots(c: &mut ClientConfig, openssl_env: bool) {
    if !openssl_env && c.get("ssl.ca.pem").is_none() {
        default_to(c, "ssl.ca.location", "probe");
    }
}

fn with_properties(brokers: &str, props: &[(String, String)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in props {
        c.set(k, v);
    }
    c
}

/// Asks the cluster for metadata twice, from a thread of its own, so that an
/// idempotent producer gets its producer id at once. librdkafka asks for the
/// id when a metadata answer arrives; the first one comes from the bootstrap
/// connection, which it then replaces by a connection to the broker the answer
/// named, and finding no broker up at that instant it waits 500 ms before
/// asking again, holding every record back. The second answer comes from the
/// named broker, which is up. Nothing waits on this thread: records enqueued
/// meanwhile wait in librdkafka's queue as they would anyway. `fetch` asks
/// once and says whether the client is still there.
pub fn warm_up(fetch: impl Fn() -> bool + Send + 'static) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("kafka-warm-up".into())
        .spawn(move || {
            for _ in 0..2 {
                if !fetch() {
                    return;
                }
            }
        })
        .map(drop)
}

/// A `FutureProducer` for `brokers` (`producer_config`), warmed up on
/// `topic`: the consumers' producers of candles and dead letters.
pub fn future_producer(brokers: &str, topic: &str) -> Result<FutureProducer, KafkaError> {
    let producer: FutureProducer = producer_config(brokers).create()?;
    let (client, topic) = (producer.clone(), topic.to_owned());
    warm_up(move || {
        if let Err(e) = client.client().fetch_metadata(Some(&topic), Duration::from_secs(2)) {
            tracing::debug!(error = %e, "metadata at start");
        }
        true
    })
    .map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
    Ok(producer)
}

/// Sets `key` unless the user's properties already did.
pub fn default_to(c: &mut ClientConfig, key: &str, value: &str) {
    if c.get(key).is_none() {
        c.set(key, value);
    }
}

/// Sets `key` to what the delivery guarantees need; a user's property that
/// says otherwise is overruled, with a warning.
pub fn require(c: &mut ClientConfig, key: &str, value: &str) {
    if let Some(v) = c.get(key).filter(|v| *v != value) {
        tracing::warn!(
            property = key,
            given = v,
            kept = value,
            "a librdkafka property the delivery guarantees depend on was overruled"
        );
    }
    c.set(key, value);
}

/// Settings for a producer that never duplicates on retry and never acknowledges
/// a write the cluster could still lose: idempotence, `acks=all`, lz4 batches.
/// The user's properties may change anything but the first two.
pub fn producer_config(brokers: &str) -> ClientConfig {
    producer_config_tuned(brokers, &[])
}

/// `producer_config` with the caller's tuning (such as the producer's own
/// `linger.ms` setting) in place of the built-in defaults; the user's
/// librdkafka properties still win over both.
pub fn producer_config_tuned(brokers: &str, tuning: &[(&str, String)]) -> ClientConfig {
    producer_settings(client_config(brokers), tuning)
}

fn producer_settings(mut c: ClientConfig, tuning: &[(&str, String)]) -> ClientConfig {
    require(&mut c, "enable.idempotence", "true");
    require(&mut c, "acks", "all");
    for (key, value) in tuning {
        default_to(&mut c, key, value);
    }
    default_to(&mut c, "compression.type", "lz4");
    default_to(&mut c, "linger.ms", "5");
    default_to(&mut c, "message.timeout.ms", "30000");
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

    #[test]
    fn environment_names_become_property_names() {
        let props = properties_from_env(vars(&[
            ("TICKPIPE_LIBRDKAFKA_SASL_USERNAME", "user"),
            ("TICKPIPE_LIBRDKAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            ("TICKPIPE_LIBRDKAFKA_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM", "https"),
            ("TICKPIPE_LIBRDKAFKA_SOME__UNDERSCORED_NAME", "x"),
            ("TICKPIPE_LIBRDKAFKA_", "ignored: no name"),
            ("TICKPIPE_KAFKA_BROKERS", "not a property"),
            ("SASL_PASSWORD", "not ours"),
        ]));
        assert_eq!(
            props,
            vars(&[
                ("sasl.username", "user"),
                ("security.protocol", "SASL_SSL"),
                ("some_underscored.name", "x"),
                ("ssl.endpoint.identification.algorithm", "https"),
            ])
        );
    }

    #[test]
    fn tls_trusts_the_systems_roots_unless_told_otherwise() {
        let mut c = with_properties("b:9092", &[]);
        trust_system_roots(&mut c, false);
        assert_eq!(c.get("ssl.ca.location"), Some("probe"));
        let mut c = with_properties("b:9092", &vars(&[("ssl.ca.location", "/ca.pem")]));
        trust_system_roots(&mut c, false);
        assert_eq!(c.get("ssl.ca.location"), Some("/ca.pem"), "the user's file");
        let mut c = with_properties("b:9092", &vars(&[("ssl.ca.pem", "-----BEGIN")]));
        trust_system_roots(&mut c, false);
        assert_eq!(c.get("ssl.ca.location"), None, "only the user's PEM");
        let mut c = with_properties("b:9092", &[]);
        trust_system_roots(&mut c, true);
        assert_eq!(c.get("ssl.ca.location"), None, "OpenSSL's SSL_CERT_FILE");
    }

    #[test]
    fn user_properties_tune_but_never_weaken_the_producer() {
        let user = vars(&[
            ("linger.ms", "50"),
            ("acks", "1"),
            ("enable.idempotence", "false"),
            ("sasl.mechanisms", "PLAIN"),
        ]);
        let tuning = [("linger.ms", "7".to_owned()), ("message.timeout.ms", "0".to_owned())];
        let c = producer_settings(with_properties("b:9092", &user), &tuning);
        assert_eq!(c.get("bootstrap.servers"), Some("b:9092"));
        assert_eq!(c.get("linger.ms"), Some("50"), "tuning is the user's");
        assert_eq!(c.get("sasl.mechanisms"), Some("PLAIN"));
        assert_eq!(c.get("acks"), Some("all"), "acks=all is kept");
        assert_eq!(c.get("enable.idempotence"), Some("true"), "idempotence is kept");
        assert_eq!(
            c.get("compression.type"),
            Some("lz4"),
            "our default where the user said nothing"
        );
        assert_eq!(
            c.get("message.timeout.ms"),
            Some("0"),
            "the caller's tuning over the built-in default"
        );
    }
}
