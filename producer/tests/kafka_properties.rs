//! librdkafka properties from the environment (and the configuration file's
//! `[librdkafka]` table, under it) reach the Kafka clients: an
//! invalid value set through a `TICKPIPE_LIBRDKAFKA_*` variable stops the
//! binary with librdkafka's own message naming the property (and a variable
//! whose value is not UTF-8 does not make it panic first); and such a property
//! wins over the producer's own tuning of the same setting.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tickpipe_testkit::binary::failure_stderr;

/// Runs the producer's simulator with `config` and `env` against a closed
/// loopback port, where an invalid librdkafka property must stop it before any
/// connection; its stderr.
fn refused_by_librdkafka(config: Option<&Path>, env: &[(&str, &OsStr)]) -> String {
    let mut producer = Command::new(env!("CARGO_BIN_EXE_producer"));
    if let Some(config) = config {
        producer.arg("--config").arg(config);
    }
    let out = producer
        .args(["--metrics-addr", "off", "--brokers", "127.0.0.1:9"])
        .args(["run", "--sources", "simulator"])
        .env("RUST_LOG", "off")
        .envs(env.iter().copied())
        .output()
        .expect("producer binary");
    failure_stderr(&out, "the producer started with an invalid property")
}

/// Asserts that the error in `stderr` names `property` and its `value`.
fn assert_names(stderr: &str, property: &str, value: &str) {
    assert!(
        stderr.contains(property) && stderr.contains(value),
        "the error names the property and its value: {stderr}"
    );
}

/// A directory of this test process's own, `tickpipe-<name>-<pid>`, and in it
/// `producer.toml` holding `text`.
fn config_in_temp_dir(name: &str, text: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("tickpipe-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("producer.toml");
    std::fs::write(&config, text).expect("config file");
    (dir, config)
}

#[test]
fn a_property_from_the_environment_reaches_librdkafka() {
    let stderr = refused_by_librdkafka(
        None,
        &[
            ("TICKPIPE_LIBRDKAFKA_SECURITY_PROTOCOL", OsStr::new("no-such-protocol")),
            // A value that is not UTF-8 is skipped with a warning, not a panic.
            ("TICKPIPE_LIBRDKAFKA_CLIENT_ID", OsStr::from_bytes(b"\xff\xfe")),
        ],
    );
    assert_names(&stderr, "security.protocol", "no-such-protocol");
}

#[test]
fn a_property_from_the_environment_wins_over_the_producers_own_tuning() {
    // Topics are not created, so the first Kafka client is the publishing
    // producer, whose compression is also the producer's own setting (lz4).
    let (dir, config) = config_in_temp_dir("props", "[producer]\ncreate_topics = false\n");
    let mut child = Command::new(env!("CARGO_BIN_EXE_producer"))
        .arg("--config")
        .arg(&config)
        .args(["--metrics-addr", "off", "--brokers", "127.0.0.1:9"])
        .args(["run", "--sources", "simulator"])
        .env("TICKPIPE_LIBRDKAFKA_COMPRESSION_TYPE", "no-such-codec")
        .env("RUST_LOG", "off")
        .stderr(Stdio::piped())
        .spawn()
        .expect("producer binary");
    // A producer that replaced the property would start and run on: wait for
    // its exit with a deadline rather than forever.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if Instant::now() > deadline {
            child.kill().ok();
            child.wait().ok();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::fs::remove_dir_all(&dir).ok();
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        std::io::Read::read_to_string(&mut pipe, &mut stderr).ok();
    }
    assert!(
        status.is_some_and(|s| !s.success()),
        "the producer replaced the property with its own setting and started: {stderr}"
    );
    assert_names(&stderr, "compression.type", "no-such-codec");
}

#[test]
fn the_config_files_librdkafka_table_reaches_librdkafka_under_the_environment() {
    let (dir, config) = config_in_temp_dir(
        "file-props",
        "[librdkafka]\nsecurity.protocol = \"from-the-file\"\nsasl.password = \"hunter2\"\n",
    );
    let stderr = refused_by_librdkafka(Some(&config), &[]);
    assert!(
        stderr.contains("security.protocol") && stderr.contains("from-the-file"),
        "the file's property reached librdkafka: {stderr}"
    );
    assert!(!stderr.contains("hunter2"), "a value from the file was shown: {stderr}");
    let stderr = refused_by_librdkafka(
        Some(&config),
        &[("TICKPIPE_LIBRDKAFKA_SECURITY_PROTOCOL", OsStr::new("from-the-env"))],
    );
    assert!(
        stderr.contains("from-the-env") && !stderr.contains("from-the-file"),
        "the environment's value is the one used: {stderr}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
