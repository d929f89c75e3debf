//! postgres-sink over TLS, against a private PostgreSQL server that refuses
//! plaintext: every libpq `sslmode` means what it means to `psql` (encryption,
//! chain check, host-name check), client certificates authenticate, and the
//! sink streams trades into such a server end to end.

use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord};
use rust_decimal::Decimal;
use tickpipe_consumers::pg::sink::{connect, run, SinkConfig, SinkError};
use tickpipe_consumers::sink::SinkSettings;
use tickpipe_kafka::{ensure_topics, producer_config};
use tickpipe_ops::now_micros;
use tickpipe_schemas::{Codec, Record, Source, Topic, Trade, TradeKind, WriteFraming};
use tickpipe_testkit::stack::{self, ScratchPostgres};
use tickpipe_testkit::tls::TestCa;

const HBA: &str = "\
local all all trust
hostssl all certuser 127.0.0.1/32 cert
hostssl all all 127.0.0.1/32 trust
hostnossl all all 127.0.0.1/32 reject
";

fn config(postgres_url: String) -> SinkConfig {
    let brokers = stack::kafka_brokers();
    let prefix = format!("{}.", stack::unique_name("pgsink_tls"));
    SinkConfig {
        sink: SinkSettings {
            batch_max: 100,
            batch_wait: Duration::from_millis(20),
            max_backoff: Duration::from_millis(300),
            session_timeout: Duration::from_secs(6),
            partitions: 1,
            ..SinkSettings::new(&brokers, &prefix, &[Topic::Trades], &format!("{prefix}sink"))
        },
        postgres_url,
        pool_size: 2,
    }
}

/// Connects as the sink does and tells (TLS in use, user), or the error.
async fn probe(url: String) -> Result<(bool, String), SinkError> {
    let pool = connect(&config(url)).await?;
    let client = pool.get().await.expect("a pooled connection");
    let row = client
        .query_one(
            "SELECT ssl, current_user::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl");
    Ok((row.get(0), row.get(1)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sslmode_means_what_it_means_to_libpq() {
    let ca = TestCa::new("pgtls");
    let server = ca.issue("server", "127.0.0.1", &["127.0.0.1"]);
    let client_cert = ca.issue("client", "certuser", &[]);
    let stranger = TestCa::new("pgtls-stranger");
    let pg = ScratchPostgres::start_tls(&server, &ca.cert_pem(), HBA);
    let port = pg.port;
    let root = ca.cert_file().display().to_string();
    let other_root = stranger.cert_file().display().to_string();
    let base = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    // Connected, encrypted; the user it connected as.
    let encrypted = |r: Result<(bool, String), SinkError>, what: &str| -> String {
        let (ssl, user) = r.unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(ssl, "{what}: connected without TLS");
        user
    };
    let refused = |r: Result<(bool, String), SinkError>, what: &str, needle: &str| {
        let err = r.err().unwrap_or_else(|| panic!("{what} connected")).to_string();
        assert!(err.contains(needle), "{what}: {err}");
    };

    // Plaintext is refused by this server; everything else encrypts.
    refused(
        probe(format!("{base}?sslmode=disable")).await,
        "sslmode=disable",
        "cannot reach PostgreSQL",
    );
    encrypted(probe(base.clone()).await, "no sslmode (prefer)");
    encrypted(probe(format!("{base}?sslmode=require")).await, "require");

    // The chain is checked against the named roots only.
    let full = format!("{base}?sslmode=verify-full&sslrootcert={root}");
    encrypted(probe(full).await, "verify-full");
    refused(
        probe(format!("{base}?sslmode=verify-ca&sslrootcert={other_root}")).await,
        "verify-ca with a stranger's root",
        "certificate verify failed",
    );
    refused(
        probe(format!("{base}?sslmode=require&sslrootcert={other_root}")).await,
        "require with a stranger's root (checked, as libpq does)",
        "certificate verify failed",
    );

    // A name the certificate does not carry: verify-ca passes, verify-full not.
    // (`hostaddr` connects to the address and checks the name in `host`.)
    let misnamed = format!(
        "host=db.example hostaddr=127.0.0.1 port={port} user=postgres dbname=postgres \
         sslrootcert='{root}' sslmode="
    );
    encrypted(probe(format!("{misnamed}verify-ca")).await, "verify-ca");
    refused(
        probe(format!("{misnamed}verify-full")).await,
        "verify-full with another host name",
        "certificate verify failed",
    );

    // Certificate authentication: the client certificate names the user.
    let admin = pg.url();
    let (client, conn) = tokio_postgres::connect(
        &format!("{admin}?sslmode=require"),
        postgres_native_tls::MakeTlsConnector::new(
            native_tls::TlsConnector::builder()
                .danger_accept_invalid_certs(true)
                .build()
                .expect("connector"),
        ),
    )
    .await
    .expect("admin connection");
    tokio::spawn(conn);
    client
        .batch_execute("CREATE ROLE certuser LOGIN")
        .await
        .expect("create role");
    let as_certuser = format!("postgres://certuser@127.0.0.1:{port}/postgres?sslmode=verify-full&sslrootcert={root}");
    let with_cert = format!(
        "{as_certuser}&sslcert={}&sslkey={}",
        client_cert.cert_file.display(),
        client_cert.key_file.display()
    );
    assert_eq!(encrypted(probe(with_cert).await, "client certificate"), "certuser");
    refused(
        probe(as_certuser).await,
        "no client certificate",
        "cannot reach PostgreSQL",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_streams_into_a_server_that_requires_verified_tls() {
    let ca = TestCa::new("pgtls-sink");
    let server = ca.issue("server", "localhost", &["127.0.0.1", "localhost"]);
    let pg = ScratchPostgres::start_tls(&server, &ca.cert_pem(), HBA);
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}",
        pg.port,
        ca.cert_file().display()
    );
    let config = config(url.clone());
    let brokers = config.sink.brokers.clone();
    ensure_topics(&brokers, &config.sink.topic_prefix, &[Topic::Trades], 1, 1)
        .await
        .unwrap_or_else(|e| panic!("is the broker up (make stack-up)? {e}"));
    let topic = Topic::Trades.name(&config.sink.topic_prefix);
    let now = now_micros();
    let trades: Vec<Trade> = (1..=500)
        .map(|id| Trade {
            venue: "binance".into(),
            symbol: "BTCUSDT".into(),
            kind: TradeKind::Trade,
            trade_id: id,
            price: Decimal::new(6_500_012 + id, 2),
            quantity: Decimal::new(id, 5),
            buyer_is_maker: id % 2 == 0,
            first_trade_id: None,
            last_trade_id: None,
            source: Source::Replay,
            event_time: now - 1_000_000 + id,
            ingest_time: now,
        })
        .collect();
    let codec = Codec::new(WriteFraming::SingleObject);
    let producer: FutureProducer = producer_config(&brokers).create().expect("producer");
    for t in &trades {
        let payload = codec.encode(t).expect("encode");
        producer
            .send(
                FutureRecord::to(&topic).key(&t.key()).payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .expect("produce");
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let sink = tokio::spawn(run(config, async {
        let _ = stopped.await;
    }));

    // The server refuses plaintext over TCP, so read back over TLS too.
    let pool = connect(&self::config(url)).await.expect("reader");
    let reader = pool.get().await.expect("reader connection");
    let expected: Decimal = trades.iter().map(|t| t.price * t.quantity).sum();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let row = reader
            .query_one("SELECT count(*), coalesce(sum(price * quantity), 0) FROM trades", &[])
            .await;
        if let Ok(row) = row {
            let (n, sum): (i64, Decimal) = (row.get(0), row.get(1));
            if n == trades.len() as i64 {
                assert_eq!(sum, expected, "exact decimals over TLS");
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the sink did not write the trades over TLS in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop.send(());
    sink.await.expect("join").expect("the sink stops cleanly");
}
