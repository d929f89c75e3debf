//! Client settings every service shares: the user's librdkafka properties
//! (configuration file, then environment) and the two rules for our own
//! settings, [`default_to`] (the user may change it) and [`require`] (the
//! delivery guarantees rest on it).

use rdkafka::config::ClientConfig;

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

pub(crate) fn with_properties(brokers: &str, props: &[(String, String)]) -> ClientConfig {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
