//! Where the services of the local stack are, read from the environment that
//! `deploy/local/stack.sh env` prints (the Makefile exports it for tests).
//!
//! A test that needs a service calls one of these and then connects; if the
//! service is not there the connection fails loudly. Nothing here skips a test.

use std::path::PathBuf;

fn var(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// Kafka bootstrap servers (the local Apache Kafka or a real cluster).
pub fn kafka_brokers() -> String {
    var("TICKPIPE_KAFKA_BROKERS", "127.0.0.1:9092")
}

/// A loopback address no one listens on now (the port is released for the
/// caller's server to take).
pub fn free_loopback_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// A service's `/metrics` page (Prometheus text), or an empty string while it
/// does not answer.
pub async fn scrape(addr: std::net::SocketAddr) -> String {
    match reqwest::get(format!("http://{addr}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Polls a service's `/metrics` until it holds the line `line` (a sample
/// with its value), or fails after `secs` with the page it saw last.
pub async fn wait_metric(addr: std::net::SocketAddr, line: &str, secs: u64) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let page = scrape(addr).await;
        if page.lines().any(|l| l == line) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {line:?} after {secs} s in:\n{page}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Polls `sql` (one bigint) until it answers `want`, or fails after `secs`.
/// An error counts as not yet (the tables appear when a sink has migrated).
pub async fn wait_count(client: &tokio_postgres::Client, sql: &str, want: i64, secs: u64) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let got = client
            .query_one(sql, &[])
            .await
            .ok()
            .and_then(|r| r.try_get::<_, i64>(0).ok());
        if got == Some(want) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{sql}: {got:?} after {secs} s, want {want}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A broker of a test's own: one Apache Kafka node listening on a free
/// loopback port and advertising `advertised` to clients (for example a TLS
/// proxy in front of it). Killed on drop.
pub struct ScratchBroker {
    _cluster: crate::cluster::KafkaCluster,
    /// Where it listens (plaintext).
    pub addr: std::net::SocketAddr,
}

impl ScratchBroker {
    /// Starts the broker; panics with the reason when it cannot.
    pub fn start(advertised: std::net::SocketAddr) -> Self {
        let cluster = crate::cluster::KafkaCluster::start_with(&[Some(advertised)], &[]);
        let addr = cluster.listener(1);
        ScratchBroker {
            _cluster: cluster,
            addr,
        }
    }
}

/// A libpq URL of a database the tests may create databases from.
pub fn postgres_admin_url() -> String {
    var("TICKPIPE_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres")
}

/// The BigQuery emulator's REST endpoint.
pub fn bigquery_rest_url() -> String {
    var("TICKPIPE_BIGQUERY_REST", "http://127.0.0.1:9050")
}

/// The BigQuery emulator's project id.
pub fn bigquery_project() -> String {
    var("TICKPIPE_BIGQUERY_PROJECT", "tickpipe-local")
}

/// The S3-compatible server of the local stack (moto), for the lake tests.
pub fn s3_endpoint() -> String {
    var("TICKPIPE_S3_ENDPOINT", "http://127.0.0.1:9000")
}

/// The Google Cloud Storage emulator of the local stack (fake-gcs-server).
pub fn gcs_endpoint() -> String {
    var("TICKPIPE_GCS_ENDPOINT", "http://127.0.0.1:4443")
}

/// A Python interpreter with DuckDB and pyarrow, which read the lake in the
/// tests and the benchmark.
pub fn lake_python() -> PathBuf {
    PathBuf::from(var("TICKPIPE_LAKE_PYTHON", "python3"))
}

/// The Python interpreter of the project's interop virtualenv.
pub fn interop_python() -> PathBuf {
    PathBuf::from(var("TICKPIPE_INTEROP_PYTHON", "python3"))
}

/// The folder of real recorded market data: `$TICKPIPE_REAL_DATA`, else the
/// first `shared/data/real` found beside this checkout or above it (the
/// workplace keeps it at `../shared/data/real`).
pub fn real_data_dir() -> PathBuf {
    if let Ok(p) = std::env::var("TICKPIPE_REAL_DATA") {
        return PathBuf::from(p);
    }
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .map(|a| a.join("shared/data/real"))
        .find(|p| p.is_dir())
        .unwrap_or_else(|| here.join("../../shared/data/real"))
}

/// A sub-folder of the real data, for the real-data suites. Missing data fails
/// the test when `CI=true`; elsewhere the test says loudly that it did not run
/// and how to point it at the data, and returns `None`.
pub fn real_data(sub: &str) -> Option<PathBuf> {
    let dir = real_data_dir().join(sub);
    if dir.is_dir() {
        return Some(dir);
    }
    let msg = format!(
        "REAL-DATA TEST NOT RUN: {} is missing; set TICKPIPE_REAL_DATA to the folder of recorded market data",
        dir.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}");
    }
    eprintln!("\n*** {msg} ***\n");
    None
}

/// A binary of the workspace (`producer`, `candles`, `postgres-sink`, ...) as
/// `cargo test --workspace` builds it, next to the test's own folder
/// (`target/<profile>/deps/<test>` runs beside `target/<profile>/<binary>`).
pub fn workspace_binary(name: &str) -> PathBuf {
    let path = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join(name)))
        .unwrap_or_else(|| PathBuf::from(name));
    assert!(
        path.exists(),
        "{} is missing: build the workspace (cargo build --workspace) before this test",
        path.display()
    );
    path
}

/// A name no other test run uses, for databases, topics and datasets.
pub fn unique_name(prefix: &str) -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}_{}_{nanos}", std::process::id())
}

/// Creates an empty database on the local PostgreSQL and returns its URL, so
/// each test has its own tables, and drops the ones earlier runs of the same
/// test left. Fails loudly when PostgreSQL is not there.
pub async fn fresh_database(prefix: &str) -> String {
    let admin = postgres_admin_url();
    let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {admin} is not reachable (make stack-up): {e}"));
    tokio::spawn(conn);
    let name = unique_name(prefix).to_lowercase();
    // Databases earlier runs of this test left behind (names carry the pid).
    let own = format!("{}_{}_%", prefix.to_lowercase(), std::process::id());
    let stale = client
        .query(
            "SELECT datname FROM pg_database WHERE datname LIKE $1 || '\\_%' AND datname NOT LIKE $2",
            &[&prefix.to_lowercase(), &own],
        )
        .await
        .map(|rows| rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>())
        .unwrap_or_default();
    for db in stale {
        let _ = client
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
            .await;
    }
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
    match admin.rfind('/') {
        Some(i) if !admin[..i].ends_with('/') => format!("{}/{name}", &admin[..i]),
        _ => format!("{}/{name}", admin.trim_end_matches('/')),
    }
}

/// A PostgreSQL server of its own, for tests that stop and restart the
/// database: initdb'd in a temporary folder from the Debian server binaries,
/// listening on a free loopback port, run as the `postgres` user when the tests
/// run as root. Stopped and removed on drop.
pub struct ScratchPostgres {
    bin: PathBuf,
    data: PathBuf,
    pub port: u16,
    /// Extra `-c name=value` server settings.
    settings: Vec<String>,
}

impl ScratchPostgres {
    /// Creates and starts the server; panics with the reason when it cannot.
    pub fn start() -> Self {
        let pg = Self::init();
        pg.ctl("start");
        pg
    }

    /// A server that speaks TLS with `server`'s certificate, trusts client
    /// certificates issued by `ca_pem`, and authenticates by `hba` (the whole
    /// `pg_hba.conf`).
    pub fn start_tls(server: &crate::tls::Issued, ca_pem: &str, hba: &str) -> Self {
        let mut pg = Self::init();
        for (name, text) in [
            ("server.crt", server.cert_pem.as_str()),
            ("server.key", server.key_pem.as_str()),
            ("root.crt", ca_pem),
            ("pg_hba.conf", hba),
        ] {
            let path = pg.data.join(name);
            std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
        // The server refuses a key that others can read.
        let key = pg.data.join("server.key");
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("key permissions");
        if is_root() {
            pg.run(
                "chown",
                &["-R", "postgres", pg.data.to_str().unwrap_or_default()],
                false,
            );
        }
        pg.settings = [
            "ssl=on",
            "ssl_cert_file=server.crt",
            "ssl_key_file=server.key",
            "ssl_ca_file=root.crt",
        ]
        .iter()
        .map(|s| format!("-c {s}"))
        .collect();
        pg.ctl("start");
        pg
    }

    fn init() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("initdb").is_file())
            .max_by_key(|p| {
                p.parent()
                    .and_then(|v| v.file_name())
                    .and_then(|v| v.to_str())
                    .and_then(|v| v.parse::<u32>().ok())
                    .unwrap_or(0)
            })
            .expect("PostgreSQL server binaries under /usr/lib/postgresql (make stack-up installs them)");
        let port = free_loopback_addr().port();
        let data = std::env::temp_dir().join(unique_name("tickpipe-scratch-pg"));
        std::fs::create_dir_all(&data).expect("scratch folder");
        let pg = ScratchPostgres {
            bin,
            data,
            port,
            settings: Vec::new(),
        };
        if is_root() {
            pg.run("chown", &["postgres", pg.data.to_str().unwrap_or_default()], false);
        }
        let initdb = pg.bin.join("initdb");
        pg.run(
            initdb.to_str().unwrap_or_default(),
            &[
                "-D",
                pg.data.to_str().unwrap_or_default(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
            ],
            true,
        );
        pg
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server (fast shutdown: sessions are cut, as in a real restart).
    pub fn stop(&self) {
        self.ctl("stop");
    }

    /// Starts it again on the same port and data.
    pub fn start_again(&self) {
        self.ctl("start");
    }

    fn ctl(&self, action: &str) {
        let pg_ctl = self.bin.join("pg_ctl");
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} {}",
            self.port,
            self.data.display(),
            self.settings.join(" ")
        );
        let log = self.data.join("server.log");
        let mut args = vec![
            "-D",
            self.data.to_str().unwrap_or_default(),
            "-w",
            "-t",
            "30",
            "-m",
            "fast",
        ];
        if action == "start" {
            args.extend(["-o", &opts, "-l", log.to_str().unwrap_or_default()]);
        }
        args.push(action);
        self.run(pg_ctl.to_str().unwrap_or_default(), &args, true);
    }

    fn run(&self, program: &str, args: &[&str], as_postgres: bool) {
        let mut cmd = if as_postgres && is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--", program]);
            c
        } else {
            std::process::Command::new(program)
        };
        let out = cmd.args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for ScratchPostgres {
    fn drop(&mut self) {
        let pg_ctl = self.bin.join("pg_ctl");
        let data = self.data.to_str().unwrap_or_default().to_owned();
        let mut cmd = if is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&pg_ctl);
            c
        } else {
            std::process::Command::new(&pg_ctl)
        };
        let _ = cmd.args(["-D", &data, "-m", "immediate", "stop"]).output();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}
