//! `docker-compose.yml` checked offline (no Docker engine runs here): every
//! service has an image or a build of a real Dockerfile stage, a health check,
//! loopback-only ports and well-formed `depends_on` conditions; the tickpipe
//! services get only environment variables the binaries read; the mounted
//! files exist; and Prometheus scrapes exactly the services' metrics ports.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

fn repo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn load(path: &Path) -> Yaml {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    YamlLoader::load_from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()))
        .remove(0)
}

fn key(k: &str) -> Yaml {
    Yaml::String(k.to_owned())
}

/// The `TICKPIPE_*` variables the binaries read: clap `env = "..."` attributes
/// and `std::env::var` calls in the crates they are built from, and what the
/// binaries' `--help` names.
fn variables_read() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack: Vec<PathBuf> = ["producer/src", "consumers/src", "ops/src", "schemas/src"]
        .iter()
        .map(|d| repo().join(d))
        .collect();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("source folder") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("source");
                let mut rest = text.as_str();
                while let Some(i) = rest.find("\"TICKPIPE_") {
                    let tail = &rest[i + 1..];
                    let end = tail.find('"').unwrap_or(0);
                    out.insert(tail[..end].to_owned());
                    rest = &tail[end..];
                }
            }
        }
    }
    // Flags declared through a macro name their variables with `concat!`:
    // the binaries' own help lists every flag's variable.
    for binary in ["producer", "candles", "postgres-sink", "bigquery-sink", "lake-sink"] {
        let help = std::process::Command::new(tickpipe_testkit::stack::workspace_binary(binary))
            .arg("--help")
            .output()
            .expect("the binary's --help");
        let help = String::from_utf8_lossy(&help.stdout);
        for at in help.match_indices("[env: ").map(|(i, _)| i + "[env: ".len()) {
            let name: String = help[at..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            out.insert(name);
        }
    }
    assert!(out.len() > 40, "the scan found too few variables: {out:?}");
    out
}

/// `KEY=value` lines of an env file.
fn env_file(path: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn dockerfile_stages(path: &Path) -> BTreeSet<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .filter_map(|l| l.split(" AS ").nth(1).map(|s| s.trim().to_owned()))
        .collect()
}

#[test]
fn compose_services_are_complete_and_consistent() {
    let compose = load(&repo().join("docker-compose.yml"));
    let services = compose["services"].as_hash().expect("services");
    let names: BTreeSet<String> = services.keys().filter_map(|k| k.as_str().map(str::to_owned)).collect();
    for wanted in [
        "kafka",
        "schema-registry",
        "postgres",
        "bigquery",
        "prometheus",
        "grafana",
        "producer",
        "candles",
        "postgres-sink",
        "bigquery-sink",
        "lake-sink",
        "backfill",
    ] {
        assert!(names.contains(wanted), "no service {wanted}");
    }
    // One Apache Kafka version: the local stack's is the compose image's.
    let stack = std::fs::read_to_string(repo().join("deploy/local/stack.sh")).expect("stack.sh");
    let version = stack
        .lines()
        .find_map(|l| l.strip_prefix("KAFKA_VERSION="))
        .expect("KAFKA_VERSION in stack.sh");
    assert_eq!(
        services[&key("kafka")]["image"].as_str(),
        Some(format!("apache/kafka:{version}").as_str()),
        "docker-compose.yml and deploy/local/stack.sh run different Kafka versions"
    );
    let read = variables_read();
    let mut metrics_ports: BTreeMap<String, String> = BTreeMap::new();

    for (name, s) in services {
        let name = name.as_str().expect("service name");
        // Image or build of a stage that exists.
        let image = s["image"].as_str();
        let build = &s["build"];
        assert!(
            image.is_some() == build.is_badvalue(),
            "{name}: exactly one of image and build"
        );
        if !build.is_badvalue() {
            let dockerfile = repo().join(build["dockerfile"].as_str().expect("build.dockerfile"));
            let target = build["target"].as_str().expect("build.target");
            assert!(
                dockerfile_stages(&dockerfile).contains(target),
                "{name}: {} has no stage {target}",
                dockerfile.display()
            );
        }
        // A health check.
        let test = s["healthcheck"]["test"]
            .as_vec()
            .unwrap_or_else(|| panic!("{name}: no healthcheck"));
        assert!(test.len() >= 2, "{name}: empty healthcheck");
        // Ports on loopback only.
        for p in s["ports"].as_vec().into_iter().flatten() {
            let p = p.as_str().expect("port string");
            assert!(p.starts_with("127.0.0.1:"), "{name}: port {p} is not bound to loopback");
        }
        // depends_on with conditions on services that exist (and are healthy-checked).
        if let Some(deps) = s["depends_on"].as_hash() {
            for (dep, cond) in deps {
                let dep = dep.as_str().expect("dependency");
                let condition = cond["condition"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{name} -> {dep}: no condition"));
                assert!(names.contains(dep), "{name} depends on unknown {dep}");
                assert!(
                    ["service_healthy", "service_started", "service_completed_successfully"].contains(&condition),
                    "{name} -> {dep}: {condition}"
                );
                if condition == "service_healthy" {
                    assert!(
                        !services[&key(dep)]["healthcheck"].is_badvalue(),
                        "{dep} has no healthcheck"
                    );
                }
            }
        }
        // Mounted files exist.
        for v in s["volumes"].as_vec().into_iter().flatten() {
            let v = v.as_str().expect("volume");
            if let Some(local) = v.strip_prefix("./") {
                let local = local.split(':').next().unwrap_or("");
                assert!(repo().join(local).exists(), "{name}: mounts missing {local}");
            }
        }
        // The tickpipe services: every variable they get is one they read.
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        for f in s["env_file"].as_vec().into_iter().flatten() {
            let (path, required) = match f {
                Yaml::String(p) => (p.clone(), true),
                other => (
                    other["path"].as_str().expect("env_file.path").to_owned(),
                    other["required"].as_bool().unwrap_or(true),
                ),
            };
            let path = repo().join(path);
            if required || path.exists() {
                env.extend(env_file(&path));
            }
        }
        for (k, v) in s["environment"].as_hash().into_iter().flatten() {
            let k = k.as_str().expect("variable").to_owned();
            let v = match v {
                Yaml::String(s) => s.clone(),
                Yaml::Integer(i) => i.to_string(),
                Yaml::Boolean(b) => b.to_string(),
                _ => String::new(),
            };
            env.insert(k, v);
        }
        for k in env.keys().filter(|k| k.starts_with("TICKPIPE_")) {
            assert!(read.contains(k), "{name}: {k} is set but no binary reads it");
        }
        if !build.is_badvalue() {
            assert!(env.contains_key("TICKPIPE_KAFKA_BROKERS"), "{name}: no broker address");
            // Its metrics port, from its own variable.
            let var = match build["target"].as_str() {
                Some("producer") => "TICKPIPE_PRODUCER_METRICS_ADDR",
                Some("candles") => "TICKPIPE_CANDLES_METRICS_ADDR",
                Some("postgres-sink") => "TICKPIPE_POSTGRES_SINK_METRICS_ADDR",
                Some("bigquery-sink") => "TICKPIPE_BIGQUERY_SINK_METRICS_ADDR",
                Some("lake-sink") => "TICKPIPE_LAKE_SINK_METRICS_ADDR",
                other => panic!("{name}: unknown target {other:?}"),
            };
            let addr = env.get(var).unwrap_or_else(|| panic!("{name}: {var} unset"));
            assert!(
                addr.starts_with("0.0.0.0:"),
                "{name}: {var}={addr} is unreachable from Prometheus"
            );
            let port = addr.rsplit(':').next().unwrap_or("").to_owned();
            let healthcheck: Vec<&str> = test.iter().filter_map(Yaml::as_str).collect();
            assert!(
                healthcheck.iter().any(|t| t.contains(&format!(":{port}/healthz"))),
                "{name}: the healthcheck does not ask /healthz on {port}"
            );
            metrics_ports.insert(name.to_owned(), port);
        }
    }

    // Prometheus scrapes the services that serve metrics, on their ports.
    let prometheus = load(&repo().join("deploy/prometheus/prometheus.yml"));
    let mut scraped: BTreeMap<String, String> = BTreeMap::new();
    for job in prometheus["scrape_configs"].as_vec().expect("scrape_configs") {
        for sc in job["static_configs"].as_vec().into_iter().flatten() {
            for t in sc["targets"].as_vec().into_iter().flatten() {
                let (host, port) = t.as_str().and_then(|t| t.split_once(':')).expect("host:port");
                if host != "localhost" {
                    assert!(
                        names.contains(host),
                        "Prometheus scrapes {host}, which is not a service"
                    );
                    scraped.insert(host.to_owned(), port.to_owned());
                }
            }
        }
    }
    assert_eq!(
        scraped, metrics_ports,
        "scrape targets equal the services' metrics ports"
    );
}
