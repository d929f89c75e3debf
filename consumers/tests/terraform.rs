//! `deploy/terraform` describes the tables and views bigquery-sink creates:
//! the same entities, column files equal to the schemas the sink derives from
//! Avro (BIGNUMERIC decimals), the same partitioning, clustering and view
//! query. Parsed as HCL, offline (no terraform binary can be installed here).
//!
//! After a schema change, `TICKPIPE_BLESS=1 cargo test -p tickpipe-consumers
//! --test terraform` rewrites the column files.

use std::path::PathBuf;

use hcl::{Block, Body, Expression};
use tickpipe_consumers::bq::schema::{
    distinct_letters_query, latest_candles_query, table_spec, view_query, DecimalColumns, DISTINCT_LETTERS,
    LATEST_CANDLES,
};
use tickpipe_schemas::Topic;

fn dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/terraform"))
}

fn body(file: &str) -> Body {
    let text = std::fs::read_to_string(dir().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    hcl::parse(&text).unwrap_or_else(|e| panic!("{file} is not valid HCL: {e}"))
}

fn resource<'a>(body: &'a Body, kind: &str, name: &str) -> &'a Block {
    body.blocks()
        .find(|b| {
            b.identifier() == "resource"
                && b.labels().first().map(|l| l.as_str()) == Some(kind)
                && b.labels().get(1).map(|l| l.as_str()) == Some(name)
        })
        .unwrap_or_else(|| panic!("no resource {kind}.{name}"))
}

/// The query of `table`'s `view` block, in the project `p` and the dataset `d`.
fn view_query_of(table: &Body) -> String {
    table
        .blocks()
        .find(|b| b.identifier() == "view")
        .map(|b| text(attribute(b.body(), "query")))
        .expect("view block")
        .replace("${var.project}", "p")
        .replace("${var.dataset}", "d")
}

fn attribute<'a>(body: &'a Body, key: &str) -> &'a Expression {
    body.attributes()
        .find(|a| a.key() == key)
        .map(|a| a.expr())
        .unwrap_or_else(|| panic!("no attribute {key}"))
}

fn text(e: &Expression) -> String {
    match e {
        Expression::String(s) => s.clone(),
        Expression::TemplateExpr(t) => t.to_string(),
        // A bare reference, written as the template it equals.
        Expression::Traversal(_) => format!("${{{}}}", hcl::format::to_string(e).expect("format")),
        other => panic!("not a string: {other:?}"),
    }
}

fn strings(e: &Expression) -> Vec<String> {
    match e {
        Expression::Array(items) => items.iter().map(text).collect(),
        other => panic!("not a list: {other:?}"),
    }
}

#[test]
fn terraform_declares_the_tables_the_sink_creates() {
    let main = body("main.tf");
    let locals = main
        .blocks()
        .find(|b| b.identifier() == "locals")
        .expect("a locals block");
    let Expression::Object(entities) = attribute(locals.body(), "entities") else {
        panic!("local.entities is an object");
    };
    let declared: Vec<String> = entities.keys().map(|k| k.to_string()).collect();
    let wanted: Vec<String> = Topic::ALL
        .iter()
        .map(|t| table_spec(*t, DecimalColumns::BigNumeric).view)
        .collect();
    let mut sorted = declared.clone();
    sorted.sort();
    let mut wanted_sorted = wanted.clone();
    wanted_sorted.sort();
    assert_eq!(sorted, wanted_sorted, "one entry per entity topic");

    let bless = std::env::var("TICKPIPE_BLESS").is_ok_and(|v| v == "1");
    for topic in Topic::ALL {
        let spec = table_spec(topic, DecimalColumns::BigNumeric);
        let (_, entry) = entities
            .iter()
            .find(|(k, _)| k.to_string() == spec.view)
            .expect("declared");
        let Expression::Object(entry) = entry else {
            panic!("{} is an object", spec.view)
        };
        let cluster = entry
            .iter()
            .find(|(k, _)| k.to_string() == "cluster")
            .map(|(_, v)| strings(v))
            .expect("cluster");
        assert_eq!(cluster, spec.cluster_by, "{} clustering", spec.view);

        // The column file equals the sink's schema for the table.
        let file = dir().join(format!("schemas/{}.json", spec.table));
        let generated = serde_json::to_string_pretty(&spec.fields).expect("json") + "\n";
        if bless {
            std::fs::write(&file, &generated).expect("write the column file");
        }
        let on_disk = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{}: {e} (TICKPIPE_BLESS=1 writes it)", file.display()));
        let on_disk: serde_json::Value = serde_json::from_str(&on_disk).expect("column file is JSON");
        assert_eq!(
            on_disk,
            serde_json::to_value(&spec.fields).expect("json"),
            "{} differs from the sink's schema; run with TICKPIPE_BLESS=1 after a schema change",
            file.display()
        );
    }

    // Tables: named <entity>_raw, columns from the files, day partitions on
    // event_time; views: the sink's de-duplicating query.
    let raw = resource(&main, "google_bigquery_table", "raw").body();
    assert_eq!(text(attribute(raw, "table_id")), "${each.key}_raw");
    match attribute(raw, "schema") {
        Expression::FuncCall(call) => {
            assert_eq!(call.name.name.as_str(), "file");
            assert_eq!(
                call.args.iter().map(text).collect::<Vec<_>>(),
                ["${path.module}/schemas/${each.key}_raw.json"]
            );
        }
        other => panic!("schema is file(...): {other:?}"),
    }
    let partitioning = raw
        .blocks()
        .find(|b| b.identifier() == "time_partitioning")
        .expect("time_partitioning");
    assert_eq!(text(attribute(partitioning.body(), "type")), "DAY");
    assert_eq!(text(attribute(partitioning.body(), "field")), "event_time");

    let view = resource(&main, "google_bigquery_table", "view").body();
    assert_eq!(text(attribute(view, "table_id")), "${each.key}");
    let query = view_query_of(view);
    for topic in Topic::ALL {
        let spec = table_spec(topic, DecimalColumns::BigNumeric);
        let rendered = query.replace("${each.key}", &spec.view);
        assert_eq!(rendered, view_query("p", "d", &spec));
    }
    let latest = resource(&main, "google_bigquery_table", "candles_latest").body();
    assert_eq!(text(attribute(latest, "table_id")), LATEST_CANDLES);
    let candles = table_spec(Topic::Candles, DecimalColumns::BigNumeric);
    assert_eq!(view_query_of(latest), latest_candles_query("p", "d", &candles));
    let distinct = resource(&main, "google_bigquery_table", "dead_letters_distinct").body();
    assert_eq!(text(attribute(distinct, "table_id")), DISTINCT_LETTERS);
    let letters = table_spec(Topic::DeadLetters, DecimalColumns::BigNumeric);
    assert_eq!(view_query_of(distinct), distinct_letters_query("p", "d", &letters));

    let variables = body("variables.tf");
    let names: Vec<String> = variables
        .blocks()
        .filter(|b| b.identifier() == "variable")
        .filter_map(|b| b.labels().first().map(|l| l.as_str().to_owned()))
        .collect();
    for v in ["project", "location", "dataset"] {
        assert!(names.iter().any(|n| n == v), "variable {v}");
    }
}
