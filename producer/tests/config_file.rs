//! The producer reads `--config` (or `TICKPIPE_CONFIG`) in the dialect of
//! every tickpipe binary: a key is a flag's environment variable without
//! `TICKPIPE_`, split into tables. The file's values become the flags'
//! defaults, shown by `--help`, in the program and in its commands; a key that
//! names no flag stops it with the key; a secret never shows.

use std::path::PathBuf;
use std::process::Output;

use tickpipe_testkit::binary::{self, help_of};
use tickpipe_testkit::stack::unique_name;

const PRODUCER: &str = env!("CARGO_BIN_EXE_producer");

fn write(text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("{}.toml", unique_name("tickpipe-producer-config")));
    std::fs::write(&path, text).expect("write the file");
    path
}

/// Runs the producer with `args` and no TICKPIPE_ variable from the test's environment.
fn run(args: &[&str]) -> Output {
    binary::run(PRODUCER, args, &[])
}

#[test]
fn the_file_presets_the_programs_and_its_commands_flags() {
    let path = write(
        "[kafka]\nbrokers = \"127.0.0.1:19092\"\n[topic]\nprefix = \"lab.\"\n[producer]\nmax_in_flight = 1234\n\
         sources = [\"simulator\", \"coincap\"]\n[binance]\nsymbols = [\"ETHUSDT\", \"SOLUSDT\"]\n\
         [coincap]\napi_key = \"hunter2\"\n[backfill]\nsince = \"1w\"\n",
    );
    let path = path.to_str().expect("utf-8 path");
    let out = run(&["--config", path, "--help"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let help = String::from_utf8_lossy(&out.stdout);
    for (flag, default) in [
        ("--brokers", "[default: 127.0.0.1:19092]"),
        ("--topic-prefix", "[default: lab.]"),
        ("--max-in-flight", "[default: 1234]"),
        ("--sources", "[default: simulator,coincap]"),
        ("--binance-symbols", "[default: ETHUSDT,SOLUSDT]"),
    ] {
        assert!(help_of(&help, flag).contains(default), "{}", help_of(&help, flag));
    }
    assert!(!help.contains("hunter2"), "a secret from the file shows in --help");
    let out = run(&["--config", path, "backfill", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help_of(&help, "--since").contains("[default: 1w]"), "{help}");
}

#[test]
fn an_unknown_key_stops_the_producer_with_the_key_and_the_known_ones() {
    let path = write("[kafka]\ntopic_prefix = \"lab.\"\n");
    let out = run(&["--config", path.to_str().expect("utf-8 path"), "run"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the producer ran with an unknown key");
    assert!(
        stderr.contains("unknown key \"kafka_topic_prefix\"") && stderr.contains("topic_prefix"),
        "{stderr}"
    );
}

#[test]
fn the_example_file_is_accepted() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/config/producer.toml");
    let out = run(&["--config", example, "--help"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
