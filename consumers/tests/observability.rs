//! Observability, checked with the real parts: the running services export
//! exactly the metrics contract (`docs/metrics.md`); Prometheus's own
//! `promtool` accepts the configuration, the alert rules and every dashboard
//! expression, which name only contract metrics; a real Prometheus scrapes a
//! running service and answers a query about it; every SQL panel of the market
//! dashboard runs against the real schema.
//!
//! `promtool` and `prometheus` come from Debian's package, installed by
//! `deploy/local/prometheus.sh` (the Makefile exports its directory as
//! `TICKPIPE_PROMETHEUS_BIN`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use tickpipe_consumers::bq::client::{Auth, Endpoint};
use tickpipe_consumers::bq::schema::DecimalColumns;
use tickpipe_consumers::bq::sink::BqSinkConfig;
use tickpipe_consumers::candles::aggregate::CandleConfig;
use tickpipe_consumers::candles::service::ServiceConfig;
use tickpipe_consumers::lake::sink::LakeSinkConfig;
use tickpipe_consumers::lake::store::Target;
use tickpipe_consumers::pg::sink::SinkConfig;
use tickpipe_consumers::sink::SinkSettings;
use tickpipe_kafka::ensure_topics;
use tickpipe_producer::config::Config;
use tickpipe_producer::metrics::Metrics;
use tickpipe_schemas::Topic;
use tickpipe_testkit::stack;
use tokio_postgres::NoTls;

use common::Fresh;

fn repo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// A Prometheus tool, from `TICKPIPE_PROMETHEUS_BIN` or the PATH; fails loudly.
fn tool(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("TICKPIPE_PROMETHEUS_BIN") {
        return PathBuf::from(dir).join(name);
    }
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|p| p.is_file()))
        .unwrap_or_else(|| panic!("{name} is not installed: run deploy/local/prometheus.sh (make test does)"))
}

/// One contract row: type and label names.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Spec {
    kind: String,
    labels: BTreeSet<String>,
    appears: String,
}

fn contract() -> BTreeMap<String, Spec> {
    let text = std::fs::read_to_string(repo().join("docs/metrics.md")).expect("docs/metrics.md");
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("| `tickpipe_")) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let name = cells[0].trim_matches('`').to_owned();
        let labels = cells[2]
            .split(',')
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        let spec = Spec {
            kind: cells[1].to_owned(),
            labels,
            appears: cells[3].to_owned(),
        };
        assert!(out.insert(name.clone(), spec).is_none(), "{name} is listed twice");
    }
    assert!(out.len() > 30, "the contract table was not found");
    out
}

/// The metric families of a scrape: type and label names (without `le`).
fn families(text: &str) -> BTreeMap<String, Spec> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(n), Some(t)) = (parts.next(), parts.next()) {
                types.insert(n.to_owned(), t.to_owned());
            }
        }
    }
    let mut out: BTreeMap<String, Spec> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let series = line.split_whitespace().next().unwrap_or("");
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|b| types.get(*b).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(name);
        let labels: BTreeSet<String> = labels
            .split(',')
            .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.to_owned()))
            .filter(|k| k != "le")
            .collect();
        out.insert(
            family.to_owned(),
            Spec {
                kind: types.get(family).cloned().unwrap_or_default(),
                labels,
                appears: String::new(),
            },
        );
    }
    out
}

fn simulator_config(prefix: &str, metrics: SocketAddr) -> Config {
    let mut c = Config::default();
    c.sources.names = vec!["simulator".into()];
    c.producer.metrics_addr = metrics.to_string();
    c.kafka.brokers = stack::kafka_brokers();
    c.kafka.topic_prefix = prefix.into();
    c.sources.simulator.rate = 400.0;
    c.sources.simulator.coincap_every_secs = 1;
    c
}

/// A sink's settings for `topics` under `prefix`, in the group `<prefix><group>`,
/// serving metrics on `metrics`: batches of 1,000, backoffs up to 1 s, a 6 s session.
fn sink_settings(brokers: &str, prefix: &str, topics: &[Topic], group: &str, metrics: SocketAddr) -> SinkSettings {
    SinkSettings {
        batch_max: 1000,
        max_backoff: Duration::from_secs(1),
        session_timeout: Duration::from_secs(6),
        metrics_addr: Some(metrics),
        ..SinkSettings::new(brokers, prefix, topics, &format!("{prefix}{group}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_services_export_exactly_the_metrics_contract() {
    let contract = contract();
    // Naming: service prefix, counters in _total, units in the other names.
    for (name, spec) in &contract {
        assert!(
            [
                "tickpipe_producer_",
                "tickpipe_candles_",
                "tickpipe_postgres_sink_",
                "tickpipe_bigquery_sink_",
                "tickpipe_lake_sink_"
            ]
            .iter()
            .any(|p| name.starts_with(p)),
            "{name}: no service prefix"
        );
        match spec.kind.as_str() {
            "counter" => assert!(name.ends_with("_total"), "{name}: a counter ends in _total"),
            "histogram" | "gauge" => assert!(
                ["_seconds", "_records", "_bytes", "_partitions"]
                    .iter()
                    .any(|u| name.ends_with(u)),
                "{name}: the unit belongs in the name"
            ),
            other => panic!("{name}: unknown type {other}"),
        }
    }

    let Fresh { brokers, prefix, url } = Fresh::create("contract").await;
    let addrs: BTreeMap<&str, SocketAddr> = [
        ("producer", stack::free_loopback_addr()),
        ("candles", stack::free_loopback_addr()),
        ("postgres_sink", stack::free_loopback_addr()),
        ("bigquery_sink", stack::free_loopback_addr()),
        ("lake_sink", stack::free_loopback_addr()),
    ]
    .into();

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let producer = tokio::spawn(tickpipe_producer::service::run(
        simulator_config(&prefix, addrs["producer"]),
        Metrics::new(),
        until_stopped(stopped.clone()),
    ));
    let candles = tokio::spawn(tickpipe_consumers::candles::service::run(
        ServiceConfig {
            brokers: brokers.clone(),
            topic_prefix: prefix.clone(),
            candles: CandleConfig {
                intervals: vec!["1s".parse().expect("interval")],
                allowed_lateness: 0,
                fill_empty: true,
                max_fill: 1000,
            },
            group: format!("{prefix}candles"),
            batch_max: 1000,
            batch_wait: Duration::from_millis(100),
            state_interval: Duration::from_secs(1),
            lease_session_timeout: Duration::from_secs(6),
            instance_id: None,
            transactions: false,
            partitions: 3,
            replication: 1,
            metrics_addr: Some(addrs["candles"]),
        },
        until_stopped(stopped.clone()),
    ));
    let pg = tokio::spawn(tickpipe_consumers::pg::sink::run(
        SinkConfig {
            sink: SinkSettings {
                batch_wait: Duration::from_millis(100),
                ..sink_settings(&brokers, &prefix, &Topic::ALL, "pg", addrs["postgres_sink"])
            },
            postgres_url: url,
            pool_size: 2,
        },
        until_stopped(stopped.clone()),
    ));
    let bq = tokio::spawn(tickpipe_consumers::bq::sink::run(
        BqSinkConfig {
            sink: sink_settings(
                &brokers,
                &prefix,
                &[Topic::Trades, Topic::DeadLetters],
                "bq",
                addrs["bigquery_sink"],
            ),
            endpoint: Endpoint {
                api_url: stack::bigquery_rest_url(),
                project: stack::bigquery_project(),
                auth: Auth::None,
            },
            dataset: stack::unique_name("contract"),
            location: "US".into(),
            decimals: DecimalColumns::String,
            request_rows: 500,
        },
        until_stopped(stopped.clone()),
    ));
    let lake_dir = std::env::temp_dir().join(stack::unique_name("contract-lake"));
    let lake = tokio::spawn(tickpipe_consumers::lake::sink::run(
        LakeSinkConfig {
            file_max_age: Duration::from_secs(1),
            ..LakeSinkConfig::new(
                sink_settings(
                    &brokers,
                    &prefix,
                    &[Topic::Trades, Topic::DeadLetters],
                    "lake",
                    addrs["lake_sink"],
                ),
                Target::Local(lake_dir.clone()),
            )
        },
        until_stopped(stopped.clone()),
    ));
    // A record nobody can decode, so that every consumer rejects something.
    let kafka: FutureProducer = producer_config_for(&brokers);
    kafka
        .send(
            FutureRecord::to(&Topic::Trades.name(&prefix))
                .key("simulator:BTCUSDT")
                .payload("not avro"),
            Duration::from_secs(10),
        )
        .await
        .expect("publish the garbage");

    // What the scenario must make appear, besides the metrics without labels.
    let driven: &[&str] = &[
        "tickpipe_producer_messages_received_total",
        "tickpipe_producer_records_published_total",
        "tickpipe_producer_published_bytes_total",
        "tickpipe_candles_candles_out_total",
        "tickpipe_candles_rejected_total",
        "tickpipe_candles_consumer_lag_records",
        "tickpipe_postgres_sink_records_consumed_total",
        "tickpipe_postgres_sink_records_written_total",
        "tickpipe_postgres_sink_records_rejected_total",
        "tickpipe_postgres_sink_end_to_end_latency_seconds",
        "tickpipe_postgres_sink_consumer_lag_records",
        "tickpipe_postgres_sink_refused_partitions",
        "tickpipe_bigquery_sink_records_consumed_total",
        "tickpipe_bigquery_sink_refused_partitions",
        "tickpipe_bigquery_sink_records_written_total",
        "tickpipe_bigquery_sink_records_rejected_total",
        "tickpipe_bigquery_sink_end_to_end_latency_seconds",
        "tickpipe_bigquery_sink_consumer_lag_records",
        "tickpipe_bigquery_sink_rows_written_total",
        "tickpipe_bigquery_sink_bytes_written_total",
        "tickpipe_lake_sink_records_consumed_total",
        "tickpipe_lake_sink_refused_partitions",
        "tickpipe_lake_sink_records_written_total",
        "tickpipe_lake_sink_records_rejected_total",
        "tickpipe_lake_sink_end_to_end_latency_seconds",
        "tickpipe_lake_sink_consumer_lag_records",
        "tickpipe_lake_sink_files_written_total",
        "tickpipe_lake_sink_bytes_written_total",
        "tickpipe_lake_sink_rows_written_total",
    ];
    let expected: BTreeSet<&str> = contract
        .iter()
        .filter(|(_, s)| s.appears == "start")
        .map(|(n, _)| n.as_str())
        .chain(driven.iter().copied())
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let exported = loop {
        let mut all = BTreeMap::new();
        for addr in addrs.values() {
            all.extend(families(&stack::scrape(*addr).await));
        }
        let missing: Vec<&&str> = expected.iter().filter(|n| !all.contains_key(**n)).collect();
        if missing.is_empty() {
            break all;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "after 120 s these contract metrics were still not exported: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // Every service says it is ready once it runs (candles: state restored).
    for (name, addr) in &addrs {
        let status = reqwest::get(format!("http://{addr}/readyz"))
            .await
            .map(|r| r.status().as_u16());
        assert_eq!(status.ok(), Some(200), "{name} /readyz");
    }
    let _ = stop.send(true);
    for (name, task) in [("producer", producer)] {
        task.await.expect("join").unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    candles.await.expect("join").expect("candles");
    pg.await.expect("join").expect("postgres-sink");
    bq.await.expect("join").expect("bigquery-sink");
    lake.await.expect("join").expect("lake-sink");
    let _ = std::fs::remove_dir_all(&lake_dir);

    for (name, got) in &exported {
        let Some(want) = contract.get(name) else {
            panic!("{name} is exported but not in docs/metrics.md");
        };
        assert_eq!(got.kind, want.kind, "{name}: type");
        assert_eq!(got.labels, want.labels, "{name}: labels");
    }
}

fn producer_config_for(brokers: &str) -> FutureProducer {
    tickpipe_kafka::producer_config(brokers).create().expect("producer")
}

/// Every PromQL expression of the alert rules and the dashboards.
fn expressions() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let rules = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).expect("alerts.yml");
    let docs = yaml_rust2::YamlLoader::load_from_str(&rules).expect("alerts.yml is YAML");
    for group in docs[0]["groups"].as_vec().into_iter().flatten() {
        for rule in group["rules"].as_vec().into_iter().flatten() {
            let expr = rule["expr"].as_str().expect("every rule has an expr");
            out.push(("alerts.yml".to_owned(), expr.trim().to_owned()));
        }
    }
    let dir = repo().join("deploy/grafana/dashboards");
    for entry in std::fs::read_dir(&dir).expect("dashboards") {
        let path = entry.expect("entry").path();
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("dashboard JSON");
        for panel in json["panels"].as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push((path.display().to_string(), expr.to_owned()));
                }
            }
        }
    }
    out
}

fn names_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("tickpipe_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

/// Panics with `what` and the output of a run that failed.
fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_accepts_the_config_rules_and_every_dashboard_expression() {
    let promtool = tool("promtool");
    let dir = repo().join("deploy/prometheus");
    for args in [
        vec!["check", "config", "prometheus.yml"],
        vec!["check", "rules", "alerts.yml"],
    ] {
        let out = Command::new(&promtool)
            .args(&args)
            .current_dir(&dir)
            .output()
            .expect("promtool");
        assert_success(&out, &format!("promtool {args:?}"));
    }

    // Dashboard expressions, as recording rules, so promtool parses each one.
    let exprs = expressions();
    assert!(
        exprs.iter().any(|(f, _)| f.ends_with(".json")),
        "no dashboard expressions found"
    );
    let mut rules = String::from("groups:\n  - name: dashboards\n    rules:\n");
    for (i, (_, e)) in exprs.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard_expr_{i}\n        expr: {}\n",
            serde_json::to_string(e).expect("quote")
        ));
    }
    let file = std::env::temp_dir().join(format!("{}.yml", stack::unique_name("dashboard-rules")));
    std::fs::write(&file, rules).expect("write");
    let out = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("promtool");
    let _ = std::fs::remove_file(&file);
    assert_success(&out, "a dashboard expression does not parse");

    // Every metric named is in the contract (histogram series by their family).
    let contract = contract();
    for (file, expr) in &exprs {
        for name in names_in(expr) {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|b| contract.get(*b).is_some_and(|c| c.kind == "histogram"))
                })
                .unwrap_or(&name);
            assert!(
                contract.contains_key(family),
                "{file}: {name} is not in docs/metrics.md ({expr})"
            );
        }
    }
}

/// A Prometheus server of the test's own, stopped on drop.
struct Prometheus(Child, PathBuf);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

async fn query(prometheus: SocketAddr, q: &str) -> Vec<serde_json::Value> {
    let url = format!("http://{prometheus}/api/v1/query");
    let Ok(r) = reqwest::Client::new().get(url).query(&[("query", q)]).send().await else {
        return Vec::new();
    };
    let json: serde_json::Value = r.json().await.unwrap_or_default();
    json["data"]["result"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_a_running_service() {
    let prefix = format!("{}.", stack::unique_name("scrape"));
    ensure_topics(&stack::kafka_brokers(), &prefix, &Topic::ALL, 1, 1)
        .await
        .unwrap_or_else(|e| panic!("is the broker up (make stack-up)? {e}"));
    let metrics = stack::free_loopback_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let producer = tokio::spawn(tickpipe_producer::service::run(
        simulator_config(&prefix, metrics),
        Metrics::new(),
        async {
            let _ = stopped.await;
        },
    ));

    let dir = std::env::temp_dir().join(stack::unique_name("prometheus"));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: producer\n    static_configs:\n      - targets: [\"{metrics}\"]\n"
        ),
    )
    .expect("config");
    let listen = stack::free_loopback_addr();
    let server = Prometheus(
        Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={listen}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus starts"),
        dir.clone(),
    );

    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let published = loop {
        let r = query(listen, "sum(tickpipe_producer_records_published_total)").await;
        let value = r
            .first()
            .and_then(|s| s["value"][1].as_str())
            .and_then(|v| v.parse::<f64>().ok());
        if let Some(v) = value.filter(|v| *v > 0.0) {
            break v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Prometheus at {listen} did not report the producer's records within 90 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let up = query(listen, "up{job=\"producer\"}").await;
    assert_eq!(up.first().and_then(|s| s["value"][1].as_str()), Some("1"), "{up:?}");
    assert!(published >= 1.0);
    drop(server);
    let _ = stop.send(());
    producer.await.expect("join").expect("producer");
}

/// Grafana's macros, replaced by what Grafana would send for the last hour.
fn expand_macros(sql: &str) -> String {
    let mut out = sql.replace("$__timeFrom()", "(now() - interval '1 hour')");
    out = out.replace("$__timeTo()", "now()");
    for (name, f) in [
        ("$__timeFilter(", "time_filter"),
        ("$__timeGroupAlias(", "time_group_alias"),
        ("$__timeGroup(", "time_group"),
    ] {
        while let Some(i) = out.find(name) {
            let start = i + name.len();
            let end = start + out[start..].find(')').expect("closing parenthesis");
            let args: Vec<String> = out[start..end].split(',').map(|a| a.trim().to_owned()).collect();
            let column = &args[0];
            let bucket = "date_trunc('minute', ".to_owned() + column + ")";
            let replacement = match f {
                "time_filter" => format!("{column} BETWEEN now() - interval '1 hour' AND now()"),
                "time_group_alias" => format!("{bucket} AS time"),
                _ => bucket,
            };
            out.replace_range(i..=end, &replacement);
        }
    }
    out.replace("$symbol", "BTCUSDT").replace("${symbol}", "BTCUSDT")
}

fn sql_panels(path: &Path) -> Vec<String> {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("dashboard JSON");
    let mut out: Vec<String> = json["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["rawSql"].as_str().map(str::to_owned))
        .collect();
    for v in json["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(q) = v["query"]
            .as_str()
            .filter(|q| q.to_ascii_uppercase().contains("SELECT"))
        {
            out.push(q.to_owned());
        }
    }
    out
}

#[tokio::test]
async fn every_sql_panel_runs_against_the_real_schema() {
    let url = stack::fresh_database("dashboards").await;
    let (mut client, conn) = tokio_postgres::connect(&url, NoTls).await.expect("postgres");
    tokio::spawn(conn);
    tickpipe_consumers::pg::migrate::migrate(&mut client)
        .await
        .expect("migrate");
    let mut ran = 0;
    for entry in std::fs::read_dir(repo().join("deploy/grafana/dashboards")).expect("dashboards") {
        let path = entry.expect("entry").path();
        for sql in sql_panels(&path) {
            let expanded = expand_macros(&sql);
            client
                .query(expanded.as_str(), &[])
                .await
                .unwrap_or_else(|e| panic!("{}: {e}\n{expanded}", path.display()));
            ran += 1;
        }
    }
    assert!(ran >= 5, "only {ran} SQL panels found");
}

/// The jobs of a Prometheus configuration and the port each scrapes.
fn scrape_ports(path: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc = yaml_rust2::YamlLoader::load_from_str(&text).expect("yaml").remove(0);
    let mut out = BTreeMap::new();
    for job in doc["scrape_configs"].as_vec().expect("scrape_configs") {
        let name = job["job_name"].as_str().expect("job_name").to_owned();
        for sc in job["static_configs"].as_vec().into_iter().flatten() {
            for t in sc["targets"].as_vec().into_iter().flatten() {
                let (_, port) = t.as_str().and_then(|t| t.split_once(':')).expect("host:port");
                out.insert(name.clone(), port.to_owned());
            }
        }
    }
    out
}

/// `make demo` starts Prometheus on a configuration of its own: promtool
/// accepts it, it scrapes only loopback, and its jobs are those of
/// deploy/prometheus/prometheus.yml on the same ports (less the backfill the
/// demo does not run), with the same alert rules.
#[test]
fn the_demo_prometheus_scrapes_what_compose_does_on_loopback() {
    let dir = std::env::temp_dir().join(stack::unique_name("demo-prometheus"));
    let out = Command::new(repo().join("deploy/local/demo.sh"))
        .args(["prometheus-config"])
        .arg(&dir)
        .output()
        .expect("demo.sh");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config = dir.join("prometheus.yml");
    let check = Command::new(tool("promtool"))
        .args(["check", "config"])
        .arg(&config)
        .output()
        .expect("promtool");
    assert_success(&check, "promtool check config");
    let text = std::fs::read_to_string(&config).expect("config");
    let targets: Vec<&str> = text.lines().filter(|l| l.contains("targets:")).collect();
    assert!(
        !targets.is_empty() && targets.iter().all(|l| l.contains("\"127.0.0.1:")),
        "{targets:?}"
    );
    let mut compose = scrape_ports(&repo().join("deploy/prometheus/prometheus.yml"));
    compose.remove("backfill");
    assert_eq!(scrape_ports(&config), compose);
    assert_eq!(
        std::fs::read(dir.join("alerts.yml")).expect("alerts"),
        std::fs::read(repo().join("deploy/prometheus/alerts.yml")).expect("alerts")
    );
    let _ = std::fs::remove_dir_all(dir);
}
