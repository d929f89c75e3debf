//! librdkafka properties from the environment reach the Kafka clients: an
//! invalid value set through a `TICKPIPE_LIBRDKAFKA_*` variable stops the
//! binary with librdkafka's own message naming the property (and a variable
//! whose value is not UTF-8 does not make it panic first).

use std::process::Command;

#[test]
fn a_property_from_the_environment_reaches_librdkafka() {
    let out = Command::new(env!("CARGO_BIN_EXE_producer"))
        .args(["--metrics-addr", "off", "run", "--sources", "simulator"])
        // Loopback only; the client is refused before it connects anywhere.
        .args(["--brokers", "127.0.0.1:9"])
        .env("TICKPIPE_LIBRDKAFKA_SECURITY_PROTOCOL", "no-such-protocol")
        // A value that is not UTF-8 is skipped with a warning, not a panic.
        .env(
            "TICKPIPE_LIBRDKAFKA_CLIENT_ID",
            <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"\xff\xfe"),
        )
        .env("RUST_LOG", "off")
        .output()
        .expect("producer binary");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the producer started with an invalid property: {stderr}"
    );
    assert!(
        stderr.contains("security.protocol") && stderr.contains("no-such-protocol"),
        "the error names the property and its value: {stderr}"
    );
}
