//! `postgres-sink` against the real broker and the real PostgreSQL: poison
//! records of every kind end in dead letters with their reason while the records
//! around them are written; CoinCap state never regresses and the SCD2 history
//! is exact whatever the arrival order.

mod common;

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use tickpipe_consumers::decode::{Item, Reject};
use tickpipe_consumers::pg::sink::{run, write_batch, SinkConfig};
use tickpipe_kafka::consumer_config;
use tickpipe_kafka::{ensure_topics, producer_config};
use tickpipe_schemas::decimal::put_unscaled;
use tickpipe_schemas::field::AvroField;
use tickpipe_schemas::registry::{RegistryClient, RegistryConfig};
use tickpipe_schemas::{AnyRecord, Stage};
use tickpipe_schemas::{
    Asset, Candle, CandleOrigin, Codec, DeadLetter, Decimal, Exchange, Market, Price, Rate, RateType, Record, Source,
    Topic, Trade, TradeKind, WriteFraming,
};
use tickpipe_testkit::stack;
use tickpipe_testkit::stack::wait_count;
use tokio_postgres::types::FromSqlOwned;
use tokio_postgres::{Client, NoTls};

const T0: i64 = 1_741_046_400_000_000; // 2025-03-04T00:00:00Z

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn trade(id: i64, price: &str) -> Trade {
    Trade {
        venue: "binance".into(),
        symbol: "TRXUSDT".into(),
        kind: TradeKind::Trade,
        trade_id: id,
        price: dec(price),
        quantity: dec("1234.5"),
        buyer_is_maker: id % 2 == 0,
        first_trade_id: None,
        last_trade_id: None,
        source: Source::Replay,
        event_time: T0 + id * 1000,
        ingest_time: T0 + id * 1000 + 7,
    }
}

fn config(prefix: &str, url: &str) -> SinkConfig {
    common::quick_pg_config(prefix, &Topic::ALL, url)
}

async fn setup(name: &str) -> (String, String, Client) {
    let prefix = format!("{}.", stack::unique_name(name));
    ensure_topics(&stack::kafka_brokers(), &prefix, &Topic::ALL, 3, 1)
        .await
        .unwrap_or_else(|e| panic!("is the broker up (make stack-up)? {e}"));
    let url = stack::fresh_database(name).await;
    let (client, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(conn);
    (prefix, url, client)
}

async fn publish(topic: &str, records: &[(String, Vec<u8>)]) {
    let producer: FutureProducer = producer_config(&stack::kafka_brokers()).create().unwrap();
    for (key, payload) in records {
        producer
            .send(
                FutureRecord::to(topic).key(key).payload(payload),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
}

/// Every trade id in `trades`, in order.
/// The first column of the one row `sql` answers.
async fn value<T: FromSqlOwned>(client: &Client, sql: &str) -> T {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

async fn trade_ids(client: &Client) -> Vec<i64> {
    client
        .query("SELECT trade_id FROM trades ORDER BY trade_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A trade body whose price is a 38-digit decimal: valid Avro decimal(38, 18),
/// but beyond the 28 digits the pipeline carries exactly.
fn overflowing_trade(codec: &Codec) -> Vec<u8> {
    let t = trade(7, "1");
    let mut out = codec.encode(&t).unwrap()[..10].to_vec();
    t.venue.write(&mut out).unwrap();
    t.symbol.write(&mut out).unwrap();
    0i32.write(&mut out).unwrap(); // kind: trade
    t.trade_id.write(&mut out).unwrap();
    put_unscaled(&mut out, 12_345_678_901_234_567_890_123_456_789_012_345_678);
    t.quantity.write(&mut out).unwrap();
    t.buyer_is_maker.write(&mut out).unwrap();
    t.first_trade_id.write(&mut out).unwrap();
    t.last_trade_id.write(&mut out).unwrap();
    2i32.write(&mut out).unwrap(); // source: binance
    t.event_time.write(&mut out).unwrap();
    t.ingest_time.write(&mut out).unwrap();
    out
}

/// A payload and, for a poison record, the stage and words its reason must hold.
type Case = (Vec<u8>, Option<(&'static str, &'static str)>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_land_in_dead_letters_and_the_rest_is_written() {
    let (prefix, url, client) = setup("pgsink_poison").await;
    let codec = Codec::new(WriteFraming::SingleObject);
    let key = "binance:TRXUSDT".to_string();
    let asset = Asset {
        id: "bitcoin".into(),
        rank: 1,
        symbol: "BTC".into(),
        name: "Bitcoin".into(),
        supply: dec("19800000"),
        max_supply: None,
        market_cap_usd: None,
        volume_usd_24h: None,
        price_usd: dec("90000"),
        change_percent_24h: None,
        vwap_24h: None,
        explorer: None,
        tokens: BTreeMap::new(),
        source: Source::Coincap,
        event_time: T0,
        ingest_time: T0,
    };
    let mut nul = trade(8, "0.25");
    nul.symbol = "TRX\0USDT".into();
    let mut unknown_id = vec![0u8, 0, 0, 0x03, 0xe7];
    unknown_id.extend_from_slice(&codec.encode(&trade(5, "1")).unwrap()[10..]);
    // (payload, stage, words the reason must contain); None = a valid trade.
    let cases: Vec<Case> = vec![
        (codec.encode(&trade(1, "0.2391")).unwrap(), None),
        (b"not avro at all".to_vec(), Some(("decode", "unknown_framing"))),
        (codec.encode(&trade(2, "0.2392")).unwrap(), None),
        (unknown_id, Some(("decode", "schema id 999"))),
        (codec.encode(&asset).unwrap(), Some(("decode", "Asset"))),
        (
            codec.encode(&trade(6, "-0.5")).unwrap(),
            Some(("validate", "price must be positive")),
        ),
        (overflowing_trade(&codec), Some(("decode", "price"))),
        (codec.encode(&nul).unwrap(), Some(("write", "postgres 22021"))),
        (codec.encode(&trade(3, "0.2393")).unwrap(), None),
    ];
    let topic = Topic::Trades.name(&prefix);
    publish(
        &topic,
        &cases.iter().map(|(p, _)| (key.clone(), p.clone())).collect::<Vec<_>>(),
    )
    .await;

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let sink = tokio::spawn(run(config(&prefix, &url), async {
        let _ = stopped.await;
    }));
    wait_count(&client, "SELECT count(*) FROM dead_letters", 6, 60).await;
    wait_count(&client, "SELECT count(*) FROM trades", 3, 10).await;
    let offsets = |topic: Topic| {
        format!(
            "SELECT coalesce(sum(next_offset), 0)::bigint FROM sink_offsets WHERE topic = '{}'",
            topic.name(&prefix)
        )
    };
    wait_count(&client, &offsets(Topic::Trades), cases.len() as i64, 10).await;
    // Its own letters come back on the dead-letters topic: read past, not
    // written twice.
    wait_count(&client, &offsets(Topic::DeadLetters), 6, 30).await;
    wait_count(&client, "SELECT count(*) FROM dead_letters", 6, 1).await;
    let _ = stop.send(());
    sink.await.unwrap().unwrap();

    let prices: Vec<(i64, Decimal)> = client
        .query("SELECT trade_id, price FROM trades ORDER BY trade_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(prices, vec![(1, dec("0.2391")), (2, dec("0.2392")), (3, dec("0.2393"))]);
    let letters = client
        .query(
            "SELECT component, stage, error, topic, \"offset\", key, payload FROM dead_letters ORDER BY \"offset\"",
            &[],
        )
        .await
        .unwrap();
    let bad: Vec<(usize, &Case)> = cases.iter().enumerate().filter(|(_, c)| c.1.is_some()).collect();
    assert_eq!(letters.len(), bad.len());
    for (row, (offset, (payload, expect))) in letters.iter().zip(bad) {
        let (stage, words) = expect.unwrap();
        let error: String = row.get(2);
        assert_eq!(row.get::<_, String>(0), "postgres-sink");
        assert_eq!(row.get::<_, String>(1), stage, "offset {offset}: {error}");
        assert!(error.contains(words), "offset {offset}: {error:?} lacks {words:?}");
        assert_eq!(row.get::<_, Option<String>>(3).as_deref(), Some(topic.as_str()));
        assert_eq!(row.get::<_, Option<i64>>(4), Some(offset as i64));
        assert_eq!(row.get::<_, Option<Vec<u8>>>(5), Some(key.clone().into_bytes()));
        assert_eq!(&row.get::<_, Vec<u8>>(6), payload, "the raw bytes are kept");
    }

    // The same rejects were published to the dead-letters topic.
    let consumer: StreamConsumer = consumer_config(&stack::kafka_brokers(), &stack::unique_name("dl-reader"))
        .create()
        .unwrap();
    consumer.subscribe(&[&Topic::DeadLetters.name(&prefix)]).unwrap();
    let mut seen = Vec::new();
    while seen.len() < 6 {
        let msg = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("dead letters on the topic")
            .unwrap();
        let d: DeadLetter = codec.decode(msg.payload().unwrap()).unwrap();
        assert_eq!(d.component, "postgres-sink");
        // The Kafka Connect dead-letter headers, for the DLQ tools built for it.
        let headers = tickpipe_testkit::kafka::headers(&msg);
        assert_eq!(headers.get("__connect.errors.topic"), d.topic.as_ref(), "{headers:?}");
        assert_eq!(
            headers.get("__connect.errors.offset"),
            d.offset.map(|o| o.to_string()).as_ref()
        );
        assert_eq!(
            headers.get("__connect.errors.partition"),
            d.partition.map(|p| p.to_string()).as_ref()
        );
        assert_eq!(headers.get("__connect.errors.exception.message"), Some(&d.error));
        assert_eq!(
            headers.get("__connect.errors.exception.class.name"),
            Some(&format!("tickpipe.{}", d.stage))
        );
        assert!(
            ["VALUE_CONVERTER", "TRANSFORMATION", "TASK_PUT"].contains(&headers["__connect.errors.stage"].as_str()),
            "{headers:?}"
        );
        seen.push(d.offset.unwrap());
    }
    seen.sort();
    assert_eq!(seen, vec![1, 3, 4, 5, 6, 7]);
}

/// `t` seconds after [`T0`], in microseconds.
fn at(t: i64) -> i64 {
    T0 + t * 1_000_000
}

fn asset_at(t: i64, price: &str, rank: i32) -> Asset {
    Asset {
        id: "bitcoin".into(),
        rank,
        symbol: "BTC".into(),
        name: "Bitcoin".into(),
        supply: dec("19800000.5"),
        max_supply: Some(dec("21000000")),
        market_cap_usd: None,
        volume_usd_24h: Some(dec("1000000.123456789012345678")),
        price_usd: dec(price),
        change_percent_24h: None,
        vwap_24h: None,
        explorer: Some("https://blockchain.info/".into()),
        tokens: BTreeMap::from([("eth".into(), vec!["0xabc".into()])]),
        source: Source::Coincap,
        event_time: at(t),
        ingest_time: at(t) + 5,
    }
}

fn rate_at(t: i64, usd: &str) -> Rate {
    Rate {
        id: "euro".into(),
        symbol: "EUR".into(),
        currency_symbol: Some("€".into()),
        rate_type: RateType::Fiat,
        rate_usd: dec(usd),
        source: Source::Coincap,
        event_time: at(t),
        ingest_time: at(t),
    }
}

fn exchange_at(t: i64, volume: &str) -> Exchange {
    Exchange {
        exchange_id: "binance".into(),
        name: "Binance".into(),
        rank: 1,
        percent_total_volume: Some(dec("21.370000000000000000")),
        volume_usd: Some(dec(volume)),
        trading_pairs: 1400,
        socket: Some(true),
        exchange_url: None,
        source: Source::Coincap,
        event_time: at(t),
        ingest_time: at(t),
    }
}

fn market_at(t: i64, price: &str) -> Market {
    Market {
        exchange_id: "binance".into(),
        rank: 1,
        base_symbol: "BTC".into(),
        base_id: "bitcoin".into(),
        quote_symbol: "USDT".into(),
        quote_id: "tether".into(),
        price_quote: dec(price),
        price_usd: dec(price),
        volume_usd_24h: None,
        percent_exchange_volume: None,
        trades_count_24h: Some(1_000_000),
        source: Source::Coincap,
        event_time: at(t),
        ingest_time: at(t),
    }
}

fn candle_version(volume: &str, count: i64) -> Candle {
    Candle {
        venue: "binance".into(),
        symbol: "TRXUSDT".into(),
        interval: "1m".into(),
        origin: CandleOrigin::Aggregated,
        open_time: T0,
        close_time: T0 + 59_999_000,
        open: dec("0.24"),
        high: dec("0.25"),
        low: dec("0.23"),
        close: dec("0.245"),
        volume: dec(volume),
        quote_volume: dec("10"),
        trade_count: count,
        taker_buy_base_volume: dec("1"),
        taker_buy_quote_volume: dec("0.24"),
        first_trade_id: Some(1),
        last_trade_id: Some(count),
        closed: true,
        source: Source::Binance,
        event_time: T0 + 60_000_000,
        ingest_time: T0 + 60_000_000,
    }
}

async fn publish_records<R: Record>(prefix: &str, topic: Topic, records: &[R]) {
    let codec = Codec::new(WriteFraming::SingleObject);
    let encoded: Vec<(String, Vec<u8>)> = records.iter().map(|r| (r.key(), codec.encode(r).unwrap())).collect();
    publish(&topic.name(prefix), &encoded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coincap_state_never_regresses_and_asset_history_is_exact() {
    let (prefix, url, client) = setup("pgsink_state").await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let sink = tokio::spawn(run(config(&prefix, &url), async {
        let _ = stopped.await;
    }));

    // First batch: the state at t=20.
    publish_records(&prefix, Topic::Assets, &[asset_at(20, "100", 1)]).await;
    publish_records(&prefix, Topic::Rates, &[rate_at(20, "1.05")]).await;
    wait_count(&client, "SELECT count(*) FROM asset_history", 1, 60).await;

    // Then, out of order, replayed and unchanged states, in later batches.
    publish_records(&prefix, Topic::Assets, &[asset_at(10, "90", 1)]).await; // older: history only
    wait_count(&client, "SELECT count(*) FROM asset_history", 2, 30).await;
    publish_records(
        &prefix,
        Topic::Assets,
        &[
            asset_at(30, "100", 1), // same values as at 20: no new version
            asset_at(20, "100", 1), // replay
            asset_at(50, "120", 2),
            asset_at(40, "110", 1), // late, between 30 and 50
            asset_at(45, "120", 2), // same as 50, arriving later: the 50 version starts at 45
        ],
    )
    .await;
    publish_records(&prefix, Topic::Rates, &[rate_at(10, "0.99"), rate_at(15, "1.01")]).await;
    publish_records(
        &prefix,
        Topic::Exchanges,
        &[exchange_at(20, "500"), exchange_at(10, "400")],
    )
    .await;
    publish_records(
        &prefix,
        Topic::Markets,
        &[market_at(10, "90000"), market_at(20, "91000")],
    )
    .await;
    publish_records(
        &prefix,
        Topic::Candles,
        &[candle_version("5", 5), candle_version("6", 6)],
    )
    .await;
    let price = Price {
        asset_id: "bitcoin".into(),
        price_usd: dec("90123.45"),
        source: Source::Coincap,
        event_time: T0,
        ingest_time: T0,
    };
    publish_records(&prefix, Topic::Prices, &[price.clone(), price]).await;
    wait_count(&client, "SELECT count(*) FROM prices", 1, 30).await;
    wait_count(&client, "SELECT trade_count FROM candles", 6, 30).await;
    wait_count(&client, "SELECT count(*) FROM markets WHERE price_usd = 91000", 1, 30).await;
    wait_count(&client, "SELECT count(*) FROM asset_history", 4, 30).await;
    let _ = stop.send(());
    sink.await.unwrap().unwrap();

    let current = client
        .query_one(
            "SELECT price_usd, rank, extract(epoch FROM event_time)::bigint, tokens::text FROM assets",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(current.get::<_, Decimal>(0), dec("120"));
    assert_eq!(current.get::<_, i32>(1), 2);
    assert_eq!(current.get::<_, i64>(2), T0 / 1_000_000 + 50);
    assert_eq!(current.get::<_, String>(3), r#"{"eth": ["0xabc"]}"#);

    let history: Vec<(i64, Option<i64>, Decimal)> = client
        .query(
            "SELECT extract(epoch FROM valid_from)::bigint - $1, extract(epoch FROM valid_to)::bigint - $1, price_usd \
             FROM asset_history ORDER BY valid_from",
            &[&(T0 / 1_000_000)],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        history,
        vec![
            (10, Some(20), dec("90")),
            (20, Some(40), dec("100")),
            (40, Some(45), dec("110")),
            (45, None, dec("120")),
        ]
    );
    let volume: Decimal = value(
        &client,
        "SELECT volume_usd_24h FROM asset_history WHERE valid_to IS NULL",
    )
    .await;
    assert_eq!(volume, dec("1000000.123456789012345678"), "exact to 18 decimals");

    let rate: Decimal = value(&client, "SELECT rate_usd FROM rates").await;
    assert_eq!(rate, dec("1.05"), "older rates never overwrite a newer one");
    let volume: Decimal = value(&client, "SELECT volume_usd FROM exchanges").await;
    assert_eq!(volume, dec("500"));
    let candle: Decimal = value(&client, "SELECT volume FROM candles").await;
    assert_eq!(candle, dec("6"), "the corrected candle replaces the first version");
}

/// The stack's registry holding the trade schema under `prefix`'s subject, a
/// codec that writes Confluent-framed trades with its id, and the id.
async fn registered_trades(prefix: &str) -> (tickpipe_testkit::registry::TestRegistry, Codec, u32) {
    let double = tickpipe_testkit::registry::TestRegistry::start().await.unwrap();
    let registry = RegistryClient::new(RegistryConfig::new(double.url.clone())).unwrap();
    let id = registry
        .register(&Topic::Trades.value_subject(prefix), &Trade::compiled().json)
        .await
        .unwrap();
    let writer = Codec::new(WriteFraming::Confluent);
    writer.set_write_id(Trade::NAME, id);
    (double, writer, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confluent_framed_records_decode_with_schemas_from_the_registry() {
    let (prefix, url, client) = setup("pgsink_registry").await;
    let (double, writer, id) = registered_trades(&prefix).await;
    let framed = writer.encode(&trade(11, "0.2411")).unwrap();
    assert_eq!(
        &framed[..5],
        &[0, (id >> 24) as u8, (id >> 16) as u8, (id >> 8) as u8, id as u8]
    );
    let mut unknown = framed.clone();
    let missing = tickpipe_testkit::registry::MISSING_ID;
    unknown[1..5].copy_from_slice(&missing.to_be_bytes());
    let key = "binance:TRXUSDT".to_string();
    publish(&Topic::Trades.name(&prefix), &[(key.clone(), framed), (key, unknown)]).await;

    let mut config = config(&prefix, &url);
    config.sink.registry = Some(RegistryConfig::new(double.url.clone()));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let sink = tokio::spawn(run(config, async {
        let _ = stopped.await;
    }));
    wait_count(&client, "SELECT count(*) FROM trades WHERE price = 0.2411", 1, 60).await;
    wait_count(&client, "SELECT count(*) FROM dead_letters", 1, 10).await;
    let _ = stop.send(());
    sink.await.unwrap().unwrap();
    let error: String = value(&client, "SELECT error FROM dead_letters").await;
    assert!(error.contains(&format!("schema id {missing}")), "{error}");
    let lookups: Vec<String> = double
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("GET /schemas/ids/"))
        .collect();
    assert_eq!(
        lookups,
        vec![format!("GET /schemas/ids/{id}"), format!("GET /schemas/ids/{missing}")],
        "one lookup per id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_or_missing_rights_stop_the_sink_with_a_clear_error() {
    let (prefix, url, client) = setup("pgsink_errors").await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let unreachable = format!("postgres://postgres:secret-password@127.0.0.1:{port}/postgres");
    let err = run(config(&prefix, &unreachable), std::future::pending())
        .await
        .expect_err("no database there")
        .to_string();
    assert!(err.contains("cannot reach PostgreSQL"), "{err}");
    assert!(err.contains(&format!("{port}")), "names where it tried: {err}");
    assert!(!err.contains("secret-password"), "never shows the password: {err}");

    // A user that may connect but not create tables (PUBLIC has no CREATE on
    // the public schema since PostgreSQL 15; revoked here for older servers).
    let role = stack::unique_name("pgsink_reader").to_lowercase();
    client
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; REVOKE CREATE ON SCHEMA public FROM PUBLIC"
        ))
        .await
        .unwrap();
    let as_reader = url.replacen("postgres@", &format!("{role}@"), 1);
    assert_ne!(as_reader, url, "the test URL names the postgres user");
    let err = run(config(&prefix, &as_reader), std::future::pending())
        .await
        .expect_err("no rights to create the tables")
        .to_string();
    assert!(err.contains("lacks the rights"), "{err}");
    let _ = client.batch_execute(&format!("DROP ROLE {role}")).await;
}

/// A batch handed to `write_batch` as the consumer builds one after a partition
/// was revoked and given back while the batch was open: the partition is read
/// again from the stored position, so the batch holds offsets 0 and 1 twice.
/// Each offset is written once (the candle keeps its latest version, the
/// poison record one dead letter), and a value Postgres refuses for a limit
/// (an index entry past its size) is isolated like any refused value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_read_twice_into_one_batch_are_written_once() {
    let (prefix, url, mut client) = setup("pgsink_twice").await;
    tickpipe_consumers::pg::migrate::migrate(&mut client).await.unwrap();
    let pool = tickpipe_consumers::pg::sink::connect(&config(&prefix, &url))
        .await
        .unwrap();
    let candles = Topic::Candles.name(&prefix);
    let trades = Topic::Trades.name(&prefix);
    let item = |topic: &str, offset: i64, body: Result<AnyRecord, Reject>| Item {
        topic: topic.to_owned(),
        partition: 0,
        offset,
        key: Some(b"binance:TRXUSDT".to_vec()),
        payload: format!("payload {offset}").into_bytes(),
        body,
    };
    let poison = || Reject {
        stage: Stage::Validate,
        error: "price must be positive, got -1".into(),
        source: Source::Binance,
    };
    // An incompressible 3,000-byte symbol: the trades key index refuses it (54000).
    let mut x: u64 = 7;
    let huge: String = (0..3000)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            char::from(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"[(x >> 33) as usize % 62])
        })
        .collect();
    let mut too_long = trade(1, "0.2391");
    too_long.symbol = huge;
    let items = vec![
        item(&candles, 0, Ok(AnyRecord::from(candle_version("1", 1)))),
        item(&candles, 1, Ok(AnyRecord::from(candle_version("2", 2)))),
        item(&candles, 2, Err(poison())),
        // Given back and read again up to offset 1.
        item(&candles, 0, Ok(AnyRecord::from(candle_version("1", 1)))),
        item(&candles, 1, Ok(AnyRecord::from(candle_version("2", 2)))),
        item(&trades, 0, Ok(AnyRecord::Trade(too_long))),
        item(&trades, 1, Ok(AnyRecord::Trade(trade(2, "0.2392")))),
        item(&trades, 0, Ok(AnyRecord::Trade(trade(1, "0.2391")))),
    ];
    let written = write_batch(&pool, "g", &items, None).await.unwrap();
    assert_eq!(written.already_written.get(&candles), Some(&2));
    assert_eq!(written.already_written.get(&trades), Some(&1));
    assert_eq!(written.written.get(&candles), Some(&2));
    assert_eq!(written.written.get(&trades), Some(&1));
    assert_eq!(written.next.get(&(candles.clone(), 0)), Some(&3));
    assert_eq!(written.next.get(&(trades.clone(), 0)), Some(&2));

    let row = client
        .query_one("SELECT volume, trade_count FROM candles", &[])
        .await
        .unwrap();
    assert_eq!((row.get::<_, Decimal>(0), row.get::<_, i64>(1)), (dec("2"), 2));
    assert_eq!(trade_ids(&client).await, vec![2]);
    let letters: Vec<(String, i64, String, String)> = client
        .query(
            "SELECT topic, \"offset\", stage, error FROM dead_letters ORDER BY topic, \"offset\"",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert_eq!(letters[0].0, candles);
    assert_eq!((letters[0].1, letters[0].2.as_str()), (2, "validate"));
    assert_eq!(letters[1].0, trades);
    assert_eq!((letters[1].1, letters[1].2.as_str()), (0, "write"));
    assert!(letters[1].3.contains("postgres 54000"), "{}", letters[1].3);
}

/// Two instances race for a partition nobody has written yet: while this
/// sink's batch (partitions 0 and 1) is being written, another instance
/// creates partition 1's row (held open here in a transaction, then
/// committed as if it had written offsets 0..4). The batch is written again,
/// not dropped: partition 0 loses nothing and partition 1 continues at 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_started_elsewhere_mid_batch_costs_the_batch_nothing() {
    let (prefix, url, mut client) = setup("pgsink_race").await;
    tickpipe_consumers::pg::migrate::migrate(&mut client).await.unwrap();
    let topic = Topic::Trades.name(&prefix);
    let codec = Codec::new(WriteFraming::SingleObject);
    let producer: FutureProducer = producer_config(&stack::kafka_brokers()).create().unwrap();
    for (partition, first) in [(0, 0), (1, 100)] {
        for id in first..first + 20 {
            let t = trade(id, "0.24");
            producer
                .send(
                    FutureRecord::to(&topic)
                        .partition(partition)
                        .key(&t.key())
                        .payload(&codec.encode(&t).unwrap()),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
        }
    }
    // And a poison record: its dead letter must be published once, though the
    // batch is written twice.
    producer
        .send(
            FutureRecord::to(&topic).partition(0).key("x").payload(&b"garbage"[..]),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let mut cfg = config(&prefix, &url);
    cfg.sink.topics = vec![Topic::Trades];
    // One batch for all forty-one records.
    cfg.sink.batch_wait = Duration::from_secs(2);
    let group = cfg.sink.group.clone();

    let (mut other, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(conn);
    let other = other.transaction().await.unwrap();
    other
        .execute(
            "INSERT INTO sink_offsets (consumer_group, topic, partition, next_offset) VALUES ($1, $2, 1, 5)",
            &[&group, &topic],
        )
        .await
        .unwrap();

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let sink = tokio::spawn(run(cfg, async {
        let _ = stopped.await;
    }));
    // The sink's offset update waits on the other instance's row.
    wait_count(
        &client,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        1,
        60,
    )
    .await;
    other.commit().await.unwrap();

    wait_count(&client, "SELECT count(*) FROM trades", 35, 60).await;
    let offsets = format!(
        "SELECT (sum(next_offset) FILTER (WHERE partition = 0) * 100 + sum(next_offset) FILTER (WHERE partition = 1))::bigint \
         FROM sink_offsets WHERE topic = '{topic}'"
    );
    wait_count(&client, &offsets, 21 * 100 + 20, 10).await;
    let _ = stop.send(());
    sink.await.unwrap().unwrap();
    wait_count(&client, "SELECT count(*) FROM dead_letters", 1, 1).await;
    let reader: rdkafka::consumer::BaseConsumer = consumer_config(&stack::kafka_brokers(), &stack::unique_name("wm"))
        .create()
        .unwrap();
    let letters: i64 = (0..3)
        .map(|p| {
            let (low, high) = reader
                .fetch_watermarks(&Topic::DeadLetters.name(&prefix), p, Duration::from_secs(10))
                .unwrap();
            high - low
        })
        .sum();
    assert_eq!(letters, 1, "the dead letter was published once");
    let want: Vec<i64> = (0..20).chain(105..120).collect();
    assert_eq!(trade_ids(&client).await, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_published_again_after_a_crash_is_stored_once() {
    let (prefix, url, client) = setup("pgsink_letter_twice").await;
    let codec = Codec::new(WriteFraming::SingleObject);
    let letter = |component: &str, offset: Option<i64>| DeadLetter {
        stage: "validate".into(),
        error: "price must be positive".into(),
        component: component.into(),
        topic: Some(Topic::Trades.name(&prefix)),
        partition: offset.map(|_| 0),
        offset,
        key: None,
        payload: b"raw".to_vec(),
        source: Source::Binance,
        event_time: T0,
        ingest_time: T0,
    };
    // The same refusal twice (candles crashed before storing its position),
    // another component's refusal of the same record, and two letters without
    // coordinates, which are all kept.
    let letters = [
        letter("candles", Some(5)),
        letter("candles", Some(5)),
        letter("bigquery-sink", Some(5)),
        letter("producer", None),
        letter("producer", None),
    ];
    let records: Vec<(String, Vec<u8>)> = letters
        .iter()
        .map(|l| (l.topic.clone().unwrap_or_default(), codec.encode(l).unwrap()))
        .collect();
    publish(&Topic::DeadLetters.name(&prefix), &records).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let sink = tokio::spawn(run(config(&prefix, &url), async {
        let _ = stopped.await;
    }));
    let stored = format!(
        "SELECT coalesce(sum(next_offset), 0)::bigint FROM sink_offsets WHERE topic = '{}'",
        Topic::DeadLetters.name(&prefix)
    );
    wait_count(&client, &stored, letters.len() as i64, 60).await;
    let _ = stop.send(());
    sink.await.unwrap().unwrap();
    let rows: Vec<(String, Option<i64>)> = client
        .query(
            "SELECT component, \"offset\" FROM dead_letters ORDER BY component, id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        rows,
        vec![
            ("bigquery-sink".to_owned(), Some(5)),
            ("candles".to_owned(), Some(5)),
            ("producer".to_owned(), None),
            ("producer".to_owned(), None),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_outage_shows_on_readyz_and_the_record_is_written_once_it_answers() {
    let (prefix, url, client) = setup("pgsink_registry_down").await;
    let (mut double, writer, _) = registered_trades(&prefix).await;
    let key = "binance:TRXUSDT".to_string();
    publish(
        &Topic::Trades.name(&prefix),
        &[(key, writer.encode(&trade(12, "0.2412")).unwrap())],
    )
    .await;
    double.stop();

    let metrics = stack::free_loopback_addr();
    let mut config = config(&prefix, &url);
    config.sink.registry = Some(RegistryConfig::new(double.url.clone()));
    config.sink.metrics_addr = Some(metrics);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let sink = tokio::spawn(run(config, async {
        let _ = stopped.await;
    }));
    let readyz = || async move {
        match reqwest::get(format!("http://{metrics}/readyz")).await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(_) => (0, String::new()),
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = readyz().await;
        if status == 503 && body.contains("schema registry does not answer") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "/readyz: {status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing is dead-lettered for an outage: once the registry answers, the
    // record is written.
    double.resume().await.unwrap();
    wait_count(&client, "SELECT count(*) FROM trades WHERE price = 0.2412", 1, 60).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while readyz().await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "/readyz stays unready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(value::<i64>(&client, "SELECT count(*) FROM dead_letters").await, 0);
    let _ = stop.send(());
    sink.await.unwrap().unwrap();
}
