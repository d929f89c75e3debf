//! librdkafka properties from the environment (and the configuration file's
//! `[librdkafka]` table, under it) reach the Kafka clients: an
//! invalid value set through a `TICKPIPE_LIBRDKAFKA_*` variable stops the
//! binary with librdkafka's own message naming the property (and a variable
//! whose value is not UTF-8 does not make it panic first); and such a property
//! wins over the producer's own tuning of the same setting.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "the producer started with an invalid property: {stderr}"
    );
    stderr
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
    assert!(
        stderr.contains("security.protocol") && stderr.contains("no-such-protocol"),
        "the error names the property and its value: {stderr}"
    );
}

#[test]
fn a_property_from_the_environment_wins_over_the_producers_own_tuning() {
    // Topics are not created, so the first Kafka client is the publishing
    // producer, whose compression is also the producer's own setting (lz4).
    let dir = std::env::temp_dir().join(format!("tickpipe-props-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("producer.toml");
    std::fs::write(&config, "[producer]\ncreate_topics = false\n").expect("config file");
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
    assert!(
        stderr.contains("compression.type") && stderr.contains("no-such-codec"),
        "the error names the property and its value: {stderr}"
    );
}

#[test]
fn the_config_files_librdkafka_table_reaches_librdkafka_under_the_environment() {
    let dir = std::env::temp_dir().join(format!("tickpipe-file-props-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("producer.toml");
    std::fs::write(
        &config,
        "[librdkafka]\nsecurity.protocol = \"from-the-file\"\nsasl.password = \"hunter2\"\n",
    )
    .expect("config file");
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
