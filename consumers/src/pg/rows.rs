//! Records to rows: one function per table, each a binary `COPY` (into the table
//! itself, or into a per-connection staging table followed by one set-based
//! upsert), plus poison isolation by bisection.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::{Error, Transaction};

use tickpipe_schemas::{Asset, Candle, DeadLetter, Exchange, Market, Micros, Price, Rate, Topic, Trade};

pub use crate::decode::{Item, Reject};
pub use tickpipe_schemas::AnyRecord;

/// A timestamp for Postgres from microseconds since the epoch.
pub fn ts(micros: Micros) -> SystemTime {
    let d = Duration::from_micros(micros.unsigned_abs());
    if micros >= 0 {
        UNIX_EPOCH + d
    } else {
        UNIX_EPOCH.checked_sub(d).unwrap_or(UNIX_EPOCH)
    }
}

/// Postgres text cannot hold NUL; dead letters keep the rest of the text.
fn clean(s: &str) -> String {
    s.replace('\0', "\\0")
}

/// Whether Postgres refused the data itself (a bad value, a constraint, a
/// value past a limit such as an index entry's size), as opposed to the
/// connection or the server failing: only the former is isolated to the
/// offending rows; the latter retries the whole batch.
pub fn is_data_error(e: &Error) -> bool {
    e.code().is_some_and(|c| {
        let s = c.code();
        s.starts_with("22")
            || s.starts_with("23")
            || s.starts_with("54")
            || *c == SqlState::INVALID_BINARY_REPRESENTATION
    })
}

/// Postgres' reason, with its SQLSTATE.
pub fn db_reason(e: &Error) -> String {
    match e.as_db_error() {
        Some(d) => match d.detail() {
            Some(detail) => format!("postgres {}: {} ({detail})", d.code().code(), d.message()),
            None => format!("postgres {}: {}", d.code().code(), d.message()),
        },
        None => e.to_string(),
    }
}

/// The sink's own rejects come back on the dead-letters topic; they are in the
/// table already (written in the transaction that rejected them), so they only
/// move the offset.
pub fn is_own_letter(body: &AnyRecord) -> bool {
    matches!(body, AnyRecord::DeadLetter(d) if d.component == crate::pg::COMPONENT)
}

/// A row the sink itself rejected, for the `dead_letters` table and topic.
pub fn reject_letter(item: &Item, reject: &Reject, now: Micros) -> DeadLetter {
    crate::decode::reject_letter(crate::pg::COMPONENT, item, reject, now)
}

/// Writes the decoded items, isolating rows Postgres refuses: those are
/// returned with the reason, everything else is written. Errors that are not
/// about the data (connection lost, server shutting down) abort the batch.
pub async fn write_items<'a>(tx: &Transaction<'_>, items: &[&'a Item]) -> Result<Vec<(&'a Item, String)>, Error> {
    let mut by_table: HashMap<Topic, Vec<&'a Item>> = HashMap::new();
    for item in items {
        match &item.body {
            Ok(body) if !is_own_letter(body) => by_table.entry(body.topic()).or_default().push(item),
            _ => {}
        }
    }
    let mut tables: Vec<_> = by_table.into_iter().collect();
    tables.sort_by_key(|(t, _)| Topic::ALL.iter().position(|x| x == t));
    let mut refused = Vec::new();
    for (table, rows) in tables {
        write_isolating(tx, table, &rows, &mut refused).await?;
    }
    Ok(refused)
}

/// Writes `rows` under a savepoint; when Postgres refuses the data, splits the
/// rows in halves until each refused row stands alone.
fn write_isolating<'t, 'a: 't>(
    tx: &'t Transaction<'_>,
    table: Topic,
    rows: &'t [&'a Item],
    refused: &'t mut Vec<(&'a Item, String)>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Error>> + Send + 't>> {
    Box::pin(async move {
        if rows.is_empty() {
            return Ok(());
        }
        tx.batch_execute("SAVEPOINT rows").await?;
        match write_table(tx, table, rows).await {
            Ok(()) => tx.batch_execute("RELEASE SAVEPOINT rows").await,
            Err(e) if is_data_error(&e) => {
                tx.batch_execute("ROLLBACK TO SAVEPOINT rows; RELEASE SAVEPOINT rows")
                    .await?;
                if let [one] = rows {
                    refused.push((*one, db_reason(&e)));
                    return Ok(());
                }
                let (a, b) = rows.split_at(rows.len() / 2);
                write_isolating(tx, table, a, refused).await?;
                write_isolating(tx, table, b, refused).await
            }
            Err(e) => Err(e),
        }
    })
}

async fn write_table(tx: &Transaction<'_>, table: Topic, rows: &[&Item]) -> Result<(), Error> {
    macro_rules! bodies {
        ($variant:ident) => {
            rows.iter()
                .filter_map(|i| match &i.body {
                    Ok(AnyRecord::$variant(r)) => Some::<&tickpipe_schemas::$variant>(r),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
    }
    match table {
        Topic::Trades => trades(tx, &bodies!(Trade)).await,
        Topic::Prices => prices(tx, &bodies!(Price)).await,
        Topic::Candles => candles(tx, &bodies!(Candle)).await,
        Topic::Assets => assets(tx, &bodies!(Asset)).await,
        Topic::Rates => rates(tx, &bodies!(Rate)).await,
        Topic::Exchanges => exchanges(tx, &bodies!(Exchange)).await,
        Topic::Markets => markets(tx, &bodies!(Market)).await,
        Topic::DeadLetters => dead_letters(tx, &bodies!(DeadLetter)).await,
    }
}

/// Streams rows into `COPY <target> (<columns>) FROM STDIN BINARY`.
macro_rules! copy_rows {
    ($tx:expr, $target:expr, $columns:expr, $types:expr, $rows:expr, |$r:ident| $values:expr) => {{
        let sink = $tx
            .copy_in(&format!("COPY {} ({}) FROM STDIN BINARY", $target, $columns))
            .await?;
        let writer = BinaryCopyInWriter::new(sink, $types);
        futures_util::pin_mut!(writer);
        for $r in $rows {
            writer.as_mut().write($values).await?;
        }
        writer.finish().await
    }};
}

/// A per-connection staging table shaped like `table`, emptied at commit.
async fn stage(tx: &Transaction<'_>, table: &str) -> Result<String, Error> {
    let name = format!("stage_{table}");
    tx.batch_execute(&format!(
        "CREATE TEMP TABLE IF NOT EXISTS {name} (LIKE {table}) ON COMMIT DELETE ROWS; TRUNCATE {name}"
    ))
    .await?;
    Ok(name)
}

/// Keeps one row per key: the last one for which `newer(kept, candidate)` holds.
fn latest<'a, T, K: std::hash::Hash + Eq>(
    rows: &[&'a T],
    key: impl Fn(&T) -> K,
    newer: impl Fn(&T, &T) -> bool,
) -> Vec<&'a T> {
    let mut index: HashMap<K, usize> = HashMap::new();
    let mut out: Vec<&'a T> = Vec::new();
    for r in rows {
        match index.get(&key(r)) {
            Some(&i) => {
                if newer(out[i], r) {
                    out[i] = r;
                }
            }
            None => {
                index.insert(key(r), out.len());
                out.push(r);
            }
        }
    }
    out
}

const TRADE_COLUMNS: &str = "venue, symbol, kind, trade_id, price, quantity, buyer_is_maker, \
                             first_trade_id, last_trade_id, source, event_time, ingest_time";
const TRADE_TYPES: &[Type] = &[
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::NUMERIC,
    Type::NUMERIC,
    Type::BOOL,
    Type::INT8,
    Type::INT8,
    Type::TEXT,
    Type::TIMESTAMPTZ,
    Type::TIMESTAMPTZ,
];

async fn copy_trades(tx: &Transaction<'_>, target: &str, rows: &[&Trade]) -> Result<u64, Error> {
    copy_rows!(tx, target, TRADE_COLUMNS, TRADE_TYPES, rows, |t| &[
        &t.venue,
        &t.symbol,
        &t.kind.as_str(),
        &t.trade_id,
        &t.price,
        &t.quantity,
        &t.buyer_is_maker,
        &t.first_trade_id,
        &t.last_trade_id,
        &t.source.as_str(),
        &ts(t.event_time),
        &ts(t.ingest_time),
    ])
}

/// Trades are immutable: the first copy of a trade id wins. The fast path
/// copies straight into `trades`; a batch holding a trade already stored (the
/// same trade published twice) goes through staging and `ON CONFLICT DO NOTHING`.
async fn trades(tx: &Transaction<'_>, rows: &[&Trade]) -> Result<(), Error> {
    tx.batch_execute("SAVEPOINT direct").await?;
    match copy_trades(tx, "trades", rows).await {
        Ok(_) => return tx.batch_execute("RELEASE SAVEPOINT direct").await,
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            tx.batch_execute("ROLLBACK TO SAVEPOINT direct; RELEASE SAVEPOINT direct")
                .await?;
        }
        Err(e) => return Err(e),
    }
    let staged = stage(tx, "trades").await?;
    copy_trades(tx, &staged, rows).await?;
    tx.batch_execute(&format!(
        "INSERT INTO trades ({TRADE_COLUMNS}) SELECT {TRADE_COLUMNS} FROM {staged} ON CONFLICT DO NOTHING"
    ))
    .await
}

async fn prices(tx: &Transaction<'_>, rows: &[&Price]) -> Result<(), Error> {
    const COLUMNS: &str = "asset_id, event_time, price_usd, source, ingest_time";
    let staged = stage(tx, "prices").await?;
    copy_rows!(
        tx,
        staged,
        COLUMNS,
        &[
            Type::TEXT,
            Type::TIMESTAMPTZ,
            Type::NUMERIC,
            Type::TEXT,
            Type::TIMESTAMPTZ
        ],
        rows,
        |p| &[
            &p.asset_id,
            &ts(p.event_time),
            &p.price_usd,
            &p.source.as_str(),
            &ts(p.ingest_time)
        ]
    )?;
    tx.batch_execute(&format!(
        "INSERT INTO prices ({COLUMNS}) SELECT {COLUMNS} FROM {staged} ON CONFLICT DO NOTHING"
    ))
    .await
}

/// Builds `INSERT INTO table (cols) SELECT cols FROM staged ON CONFLICT (key)
/// DO UPDATE SET every other column [WHERE guard]`.
fn upsert_sql(table: &str, staged: &str, columns: &str, key: &str, guard: &str) -> String {
    let keys: Vec<&str> = key.split(',').map(str::trim).collect();
    let set: Vec<String> = columns
        .split(',')
        .map(str::trim)
        .filter(|c| !keys.contains(c))
        .map(|c| format!("{c} = EXCLUDED.{c}"))
        .collect();
    format!(
        "INSERT INTO {table} AS t ({columns}) SELECT {columns} FROM {staged} \
         ON CONFLICT ({key}) DO UPDATE SET {} {guard}",
        set.join(", ")
    )
}

/// Candles: the latest version in Kafka order wins (a correction replaces the
/// candle it corrects).
async fn candles(tx: &Transaction<'_>, rows: &[&Candle]) -> Result<(), Error> {
    const COLUMNS: &str = "venue, symbol, interval, open_time, origin, close_time, open, high, low, close, \
                           volume, quote_volume, trade_count, taker_buy_base_volume, taker_buy_quote_volume, \
                           first_trade_id, last_trade_id, closed, source, event_time, ingest_time";
    let rows = latest(
        rows,
        |c| {
            (
                c.venue.clone(),
                c.symbol.clone(),
                c.interval.clone(),
                c.open_time,
                c.origin,
            )
        },
        |_, _| true,
    );
    let staged = stage(tx, "candles").await?;
    copy_rows!(
        tx,
        staged,
        COLUMNS,
        &[
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::TIMESTAMPTZ,
            Type::TEXT,
            Type::TIMESTAMPTZ,
            Type::NUMERIC,
            Type::NUMERIC,
            Type::NUMERIC,
            Type::NUMERIC,
            Type::NUMERIC,
            Type::NUMERIC,
            Type::INT8,
            Type::NUMERIC,
            Type::NUMERIC,
            Type::INT8,
            Type::INT8,
            Type::BOOL,
            Type::TEXT,
            Type::TIMESTAMPTZ,
            Type::TIMESTAMPTZ,
        ],
        &rows,
        |c| &[
            &c.venue,
            &c.symbol,
            &c.interval,
            &ts(c.open_time),
            &c.origin.as_str(),
            &ts(c.close_time),
            &c.open,
            &c.high,
            &c.low,
            &c.close,
            &c.volume,
            &c.quote_volume,
            &c.trade_count,
            &c.taker_buy_base_volume,
            &c.taker_buy_quote_volume,
            &c.first_trade_id,
            &c.last_trade_id,
            &c.closed,
            &c.source.as_str(),
            &ts(c.event_time),
            &ts(c.ingest_time),
        ]
    )?;
    tx.batch_execute(&upsert_sql(
        "candles",
        &staged,
        COLUMNS,
        "venue, symbol, interval, open_time, origin",
        "",
    ))
    .await
}

/// Current-state upserts: the newest event time wins, so a record replayed or
/// delivered late never overwrites a newer one.
const NEWER_WINS: &str = "WHERE t.event_time <= EXCLUDED.event_time";

async fn assets(tx: &Transaction<'_>, rows: &[&Asset]) -> Result<(), Error> {
    const COLUMNS: &str = "id, rank, symbol, name, supply, max_supply, market_cap_usd, volume_usd_24h, price_usd, \
                           change_percent_24h, vwap_24h, explorer, tokens, source, event_time, ingest_time";
    // History first, every state in event-time order.
    let mut ordered: Vec<&Asset> = rows.to_vec();
    ordered.sort_by(|a, b| (&a.id, a.event_time).cmp(&(&b.id, b.event_time)));
    let apply = tx
        .prepare("SELECT tickpipe_asset_history_apply($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)")
        .await?;
    for a in &ordered {
        tx.execute(
            &apply,
            &[
                &a.id,
                &ts(a.event_time),
                &a.rank,
                &a.symbol,
                &a.name,
                &a.supply,
                &a.max_supply,
                &a.market_cap_usd,
                &a.volume_usd_24h,
                &a.price_usd,
                &a.change_percent_24h,
                &a.vwap_24h,
                &a.explorer,
            ],
        )
        .await?;
    }
    let rows = latest(rows, |a| a.id.clone(), |kept, new| new.event_time >= kept.event_time);
    let staged = stage(tx, "assets").await?;
    let tokens: Vec<serde_json::Value> = rows
        .iter()
        .map(|a| serde_json::to_value(&a.tokens).unwrap_or_default())
        .collect();
    copy_rows!(
        tx,
        staged,
        COLUMNS,
        &[
            Type::TEXT,
            Type::INT4,
            Type::TEXT,
            Type::TEXT,
            Type::NUMERIC,
            Type::NUMERIC,
            Type::NUMERIC,
            Type::NUMERIC,
            Type::NUMERIC,
            Type::NUMERIC,
            Type::NUMERIC,
            Type::TEXT,
            Type::JSONB,
            Type::TEXT,
            Type::TIMESTAMPTZ,
            Type::TIMESTAMPTZ,
        ],
        rows.iter().zip(&tokens),
        |pair| {
            let (a, tokens) = pair;
            &[
                &a.id,
                &a.rank,
                &a.symbol,
                &a.name,
                &a.supply,
                &a.max_supply,
                &a.market_cap_usd,
                &a.volume_usd_24h,
                &a.price_usd,
                &a.change_percent_24h,
                &a.vwap_24h,
                &a.explorer,
                tokens,
                &a.source.as_str(),
                &ts(a.event_time),
                &ts(a.ingest_time),
            ]
        }
    )?;
    tx.batch_execute(&upsert_sql("assets", &staged, COLUMNS, "id", NEWER_WINS))
        .await
}

async fn rates(tx: &Transaction<'_>, rows: &[&Rate]) -> Result<(), Error> {
    const COLUMNS: &str = "id, symbol, currency_symbol, rate_type, rate_usd, source, event_time, ingest_time";
    let rows = latest(rows, |r| r.id.clone(), |kept, new| new.event_time >= kept.event_time);
    let staged = stage(tx, "rates").await?;
    copy_rows!(
        tx,
        staged,
        COLUMNS,
        &[
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::NUMERIC,
            Type::TEXT,
            Type::TIMESTAMPTZ,
            Type::TIMESTAMPTZ,
        ],
        &rows,
        |r| &[
            &r.id,
            &r.symbol,
            &r.currency_symbol,
            &r.rate_type.as_str(),
            &r.rate_usd,
            &r.source.as_str(),
            &ts(r.event_time),
            &ts(r.ingest_time),
        ]
    )?;
    tx.batch_execute(&upsert_sql("rates", &staged, COLUMNS, "id", NEWER_WINS))
        .await
}

async fn exchanges(tx: &Transaction<'_>, rows: &[&Exchange]) -> Result<(), Error> {
    const COLUMNS: &str = "exchange_id, name, rank, percent_total_volume, volume_usd, trading_pairs, socket, \
                           exchange_url, source, event_time, ingest_time";
    let rows = latest(
        rows,
        |e| e.exchange_id.clone(),
        |kept, new| new.event_time >= kept.event_time,
    );
    let staged = stage(tx, "exchanges").await?;
    copy_rows!(
        tx,
        staged,
        COLUMNS,
        &[
            Type::TEXT,
            Type::TEXT,
            Type::INT4,
            Type::NUMERIC,
            Type::NUMERIC,
            Type::INT4,
            Type::BOOL,
            Type::TEXT,
            Type::TEXT,
            Type::TIMESTAMPTZ,
            Type::TIMESTAMPTZ,
        ],
        &rows,
        |e| &[
            &e.exchange_id,
            &e.name,
            &e.rank,
            &e.percent_total_volume,
            &e.volume_usd,
            &e.trading_pairs,
            &e.socket,
            &e.exchange_url,
            &e.source.as_str(),
            &ts(e.event_time),
            &ts(e.ingest_time),
        ]
    )?;
    tx.batch_execute(&upsert_sql("exchanges", &staged, COLUMNS, "exchange_id", NEWER_WINS))
        .await
}

async fn markets(tx: &Transaction<'_>, rows: &[&Market]) -> Result<(), Error> {
    const COLUMNS: &str = "exchange_id, base_symbol, quote_symbol, rank, base_id, quote_id, price_quote, price_usd, \
                           volume_usd_24h, percent_exchange_volume, trades_count_24h, source, event_time, ingest_time";
    let rows = latest(
        rows,
        |m| (m.exchange_id.clone(), m.base_symbol.clone(), m.quote_symbol.clone()),
        |kept, new| new.event_time >= kept.event_time,
    );
    let staged = stage(tx, "markets").await?;
    copy_rows!(
        tx,
        staged,
        COLUMNS,
        &[
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::INT4,
            Type::TEXT,
            Type::TEXT,
            Type::NUMERIC,
            Type::NUMERIC,
            Type::NUMERIC,
            Type::NUMERIC,
            Type::INT8,
            Type::TEXT,
            Type::TIMESTAMPTZ,
            Type::TIMESTAMPTZ,
        ],
        &rows,
        |m| &[
            &m.exchange_id,
            &m.base_symbol,
            &m.quote_symbol,
            &m.rank,
            &m.base_id,
            &m.quote_id,
            &m.price_quote,
            &m.price_usd,
            &m.volume_usd_24h,
            &m.percent_exchange_volume,
            &m.trades_count_24h,
            &m.source.as_str(),
            &ts(m.event_time),
            &ts(m.ingest_time),
        ]
    )?;
    tx.batch_execute(&upsert_sql(
        "markets",
        &staged,
        COLUMNS,
        "exchange_id, base_symbol, quote_symbol",
        NEWER_WINS,
    ))
    .await
}

/// Appends dead letters (another service's, or the sink's own rejects); a
/// letter already stored (same component and record coordinates, published
/// again after a crash) is not stored twice.
pub async fn dead_letters(tx: &Transaction<'_>, rows: &[&DeadLetter]) -> Result<(), Error> {
    const COLUMNS: &str =
        "component, stage, error, topic, partition, \"offset\", key, payload, source, event_time, ingest_time";
    // Not `stage()`: `LIKE` would carry the id's NOT NULL without its default.
    let staged = "stage_dead_letters";
    tx.batch_execute(&format!(
        "CREATE TEMP TABLE IF NOT EXISTS {staged} ON COMMIT DELETE ROWS AS SELECT {COLUMNS} FROM dead_letters \
         WITH NO DATA; TRUNCATE {staged}"
    ))
    .await?;
    let cleaned: Vec<DeadLetter> = rows
        .iter()
        .map(|d| DeadLetter {
            component: clean(&d.component),
            stage: clean(&d.stage),
            error: clean(&d.error),
            topic: d.topic.as_deref().map(clean),
            ..(*d).clone()
        })
        .collect();
    copy_rows!(
        tx,
        staged,
        COLUMNS,
        &[
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::INT4,
            Type::INT8,
            Type::BYTEA,
            Type::BYTEA,
            Type::TEXT,
            Type::TIMESTAMPTZ,
            Type::TIMESTAMPTZ,
        ],
        &cleaned,
        |d| &[
            &d.component,
            &d.stage,
            &d.error,
            &d.topic,
            &d.partition,
            &d.offset,
            &d.key,
            &d.payload,
            &d.source.as_str(),
            &ts(d.event_time),
            &ts(d.ingest_time),
        ]
    )?;
    tx.batch_execute(&format!(
        "INSERT INTO dead_letters ({COLUMNS}) SELECT {COLUMNS} FROM {staged} ON CONFLICT DO NOTHING"
    ))
    .await
}
