//! Each consumer binary reads `--config` (or `TICKPIPE_CONFIG`): the file's
//! values become the flags' defaults, shown by `--help`, and a key that names
//! no flag stops the program with the key in the message. librdkafka
//! properties come from the file's `[librdkafka]` table and, over it, from
//! `TICKPIPE_LIBRDKAFKA_*` variables.

use std::path::PathBuf;
use tickpipe_testkit::binary::{failure_stderr, help_of, run};
use tickpipe_testkit::stack::unique_name;

const BINARIES: [(&str, &str, &str); 3] = [
    (env!("CARGO_BIN_EXE_candles"), "candles", "--batch-max"),
    (env!("CARGO_BIN_EXE_postgres-sink"), "postgres_sink", "--batch-max"),
    (env!("CARGO_BIN_EXE_bigquery-sink"), "bigquery_sink", "--batch-max"),
];

fn write(text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("{}.toml", unique_name("tickpipe-config")));
    std::fs::write(&path, text).expect("write the file");
    path
}

#[test]
fn the_file_sets_defaults_in_every_binary() {
    for (bin, section, flag) in BINARIES {
        let path = write(&format!(
            "[kafka]\nbrokers = \"127.0.0.1:19092\"\n\n[topic]\nreplication = 3\n\n[{section}]\nbatch_max = 1234\n"
        ));
        let path_text = path.to_str().expect("utf-8 path");

        let out = run(bin, &["--config", path_text, "--help"], &[]);
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{bin}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(
            help_of(&help, flag).contains("[default: 1234]"),
            "{bin}: {}",
            help_of(&help, flag)
        );
        assert!(
            help_of(&help, "--brokers").contains("[default: 127.0.0.1:19092]"),
            "{bin}"
        );
        assert!(
            help_of(&help, "--replication").contains("[default: 3]"),
            "{bin}: {}",
            help_of(&help, "--replication")
        );

        // The same through the environment variable.
        let out = run(bin, &["--help"], &[("TICKPIPE_CONFIG", path_text)]);
        assert!(
            help_of(&String::from_utf8_lossy(&out.stdout), flag).contains("[default: 1234]"),
            "{bin}"
        );
        std::fs::remove_file(&path).ok();
    }
}

#[test]
fn an_unknown_key_or_a_bad_value_stops_the_binary_with_the_reason() {
    for (bin, section, _) in BINARIES {
        let path = write(&format!("[{section}]\nbatch_maximum = 10\n"));
        let out = run(bin, &["--config", path.to_str().expect("utf-8 path")], &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bin} accepted an unknown key");
        assert!(
            err.contains(&format!("unknown key \"{section}_batch_maximum\""))
                && err.contains(&format!("{section}_batch_max")),
            "{bin}: {err}"
        );
        std::fs::remove_file(&path).ok();

        let path = write(&format!("[{section}]\nbatch_max = \"lots\"\n"));
        let out = run(bin, &["--config", path.to_str().expect("utf-8 path")], &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("lots") && err.contains("--batch-max"),
            "{bin}: {err}"
        );
        std::fs::remove_file(&path).ok();
    }
}

#[test]
fn the_example_file_is_accepted() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/config/candles.toml");
    let out = run(env!("CARGO_BIN_EXE_candles"), &["--config", example, "--help"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help_of(&help, "--intervals").contains("[default: 1s,5s,1m,5m,1h,1d]"),
        "{help}"
    );
}

/// Runs candles with `args` and `env` against a closed loopback port, where an
/// invalid librdkafka property must stop it before any connection; its stderr.
fn refused_by_librdkafka(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut all_args = vec!["--brokers", "127.0.0.1:9", "--metrics-addr", "off"];
    all_args.extend_from_slice(args);
    let mut all_env = vec![("RUST_LOG", "off")];
    all_env.extend_from_slice(env);
    let out = run(env!("CARGO_BIN_EXE_candles"), &all_args, &all_env);
    failure_stderr(&out, "candles started with an invalid property")
}

#[test]
fn a_librdkafka_property_from_the_environment_reaches_the_clients() {
    // candles talks only to Kafka, so librdkafka is the first to see the value.
    let stderr = refused_by_librdkafka(&[], &[("TICKPIPE_LIBRDKAFKA_SECURITY_PROTOCOL", "no-such-protocol")]);
    assert!(
        stderr.contains("security.protocol") && stderr.contains("no-such-protocol"),
        "the error names the property and its value: {stderr}"
    );
}

#[test]
fn the_files_librdkafka_table_reaches_the_clients_under_the_environment() {
    let path = write("[librdkafka]\nsecurity.protocol = \"from-the-file\"\n");
    let args = ["--config", path.to_str().expect("utf-8 path")];
    let stderr = refused_by_librdkafka(&args, &[]);
    assert!(
        stderr.contains("security.protocol") && stderr.contains("from-the-file"),
        "the file's property reached librdkafka: {stderr}"
    );
    // The environment wins over the file.
    let stderr = refused_by_librdkafka(&args, &[("TICKPIPE_LIBRDKAFKA_SECURITY_PROTOCOL", "from-the-env")]);
    assert!(
        stderr.contains("from-the-env") && !stderr.contains("from-the-file"),
        "the environment's value is the one used: {stderr}"
    );
    std::fs::remove_file(&path).ok();
}
