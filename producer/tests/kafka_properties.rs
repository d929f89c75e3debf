//! librdkafka properties from the environment reach the Kafka clients: an
//! invalid value set through a `TICKPIPE_LIBRDKAFKA_*` variable stops the
//! binary with librdkafka's own message naming the property.

use std::process::Command;

#[test]
fn a_property_from_the_environment_reaches_librdkafka() {
    let out = Command::new(env!("CARGO_BIN_EXE_producer"))
        .args(["--metrics-addr", "off", "run", "--sources", "simulator"])
        // Loopback only; the client is refused before it connects anywhere.
        .args(["--brokers", "127.0.0.1:9"])
        .env("TICKPIPE_LIBRDKAFKA_SECURITY_PROTOCOL", "no-such-protocol")
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
