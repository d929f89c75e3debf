//! Records to rows, derived from the schemas: a table's columns are its
//! record's fields (their PostgreSQL types from the Avro types), so each table
//! says only its key and how a new row merges with a stored one ([`TABLES`]).
//! Rows go in by binary `COPY` (into the table itself, or into a
//! per-connection staging table followed by one set-based upsert), with
//! poison isolation by bisection.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apache_avro::schema::Schema;
use bytes::BytesMut;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use tokio_postgres::{Error, Transaction};

use tickpipe_schemas::field::Value;
use tickpipe_schemas::{Asset, DeadLetter, Micros, Record, Topic};

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

/// How a new row merges with a stored one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Merge {
    /// Immutable rows: the first copy wins. `direct` copies straight into the
    /// table first, and through staging only when a row is already stored.
    Keep { direct: bool },
    /// The last version in Kafka order wins (a correction replaces the row
    /// it corrects).
    LastWins,
    /// Current state: the newest event time wins, so a record replayed or
    /// delivered late never overwrites a newer one.
    NewerWins,
}

/// A table: what is not derived from its record's schema.
struct Table {
    topic: Topic,
    name: &'static str,
    /// The columns a row is identified by (for `LastWins` and `NewerWins`).
    key: &'static [&'static str],
    merge: Merge,
    /// Text without NUL (dead letters keep the rest of a text Postgres
    /// could not hold; elsewhere such a value is refused as data).
    clean: bool,
}

/// Every table the sink writes.
const TABLES: &[Table] = &[
    Table {
        topic: Topic::Trades,
        name: "trades",
        key: &[],
        merge: Merge::Keep { direct: true },
        clean: false,
    },
    Table {
        topic: Topic::Prices,
        name: "prices",
        key: &[],
        merge: Merge::Keep { direct: false },
        clean: false,
    },
    Table {
        topic: Topic::Candles,
        name: "candles",
        key: &["venue", "symbol", "interval", "open_time", "origin"],
        merge: Merge::LastWins,
        clean: false,
    },
    Table {
        topic: Topic::Assets,
        name: "assets",
        key: &["id"],
        merge: Merge::NewerWins,
        clean: false,
    },
    Table {
        topic: Topic::Rates,
        name: "rates",
        key: &["id"],
        merge: Merge::NewerWins,
        clean: false,
    },
    Table {
        topic: Topic::Exchanges,
        name: "exchanges",
        key: &["exchange_id"],
        merge: Merge::NewerWins,
        clean: false,
    },
    Table {
        topic: Topic::Markets,
        name: "markets",
        key: &["exchange_id", "base_symbol", "quote_symbol"],
        merge: Merge::NewerWins,
        clean: false,
    },
    Table {
        topic: Topic::DeadLetters,
        name: "dead_letters",
        key: &[],
        merge: Merge::Keep { direct: false },
        clean: true,
    },
];

fn table_of(topic: Topic) -> &'static Table {
    TABLES
        .iter()
        .find(|t| t.topic == topic)
        .unwrap_or_else(|| panic!("no table for {topic:?}"))
}

/// A table's columns: its record's fields in schema order, with their types.
struct Columns {
    names: Vec<String>,
    types: Vec<Type>,
    /// The names, quoted, comma-separated.
    list: String,
}

/// The PostgreSQL type of an Avro field.
fn pg_type(schema: &Schema) -> Type {
    match schema {
        Schema::Union(u) => u
            .variants()
            .iter()
            .find(|v| !matches!(v, Schema::Null))
            .map_or(Type::TEXT, pg_type),
        Schema::Boolean => Type::BOOL,
        Schema::Int => Type::INT4,
        Schema::Long => Type::INT8,
        Schema::TimestampMicros | Schema::TimestampMillis => Type::TIMESTAMPTZ,
        Schema::Bytes | Schema::Fixed(_) => Type::BYTEA,
        Schema::Decimal(_) => Type::NUMERIC,
        Schema::Map(_) | Schema::Array(_) | Schema::Record(_) => Type::JSONB,
        // Strings, enums and named references (the shared enums).
        _ => Type::TEXT,
    }
}

fn columns(topic: Topic) -> &'static Columns {
    static ALL: OnceLock<HashMap<Topic, Columns>> = OnceLock::new();
    let all = ALL.get_or_init(|| {
        Topic::ALL
            .into_iter()
            .map(|t| {
                let Schema::Record(record) = &t.schema().schema else {
                    panic!("the {t:?} schema is not a record");
                };
                let names: Vec<String> = record.fields.iter().map(|f| f.name.clone()).collect();
                let types = record.fields.iter().map(|f| pg_type(&f.schema)).collect();
                let list = names.iter().map(|n| format!("\"{n}\"")).collect::<Vec<_>>().join(", ");
                (t, Columns { names, types, list })
            })
            .collect()
    });
    &all[&topic]
}

/// One value as `COPY` takes it.
#[derive(Debug)]
enum Cell<'a> {
    Null,
    Bool(bool),
    Int(i32),
    Long(i64),
    Time(SystemTime),
    Text(&'a str),
    Owned(String),
    Bytes(&'a [u8]),
    Decimal(rust_decimal::Decimal),
    Json(serde_json::Value),
}

impl ToSql for Cell<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Cell::Null => Ok(IsNull::Yes),
            Cell::Bool(v) => v.to_sql(ty, out),
            Cell::Int(v) => v.to_sql(ty, out),
            Cell::Long(v) => v.to_sql(ty, out),
            Cell::Time(v) => v.to_sql(ty, out),
            Cell::Text(v) => v.to_sql(ty, out),
            Cell::Owned(v) => v.to_sql(ty, out),
            Cell::Bytes(v) => v.to_sql(ty, out),
            Cell::Decimal(v) => v.to_sql(ty, out),
            Cell::Json(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// A value as JSON (for map and array columns).
fn json(value: &Value<'_>) -> serde_json::Value {
    match value {
        Value::Null => serde_json::Value::Null,
        Value::Boolean(b) => (*b).into(),
        Value::Int(i) => (*i).into(),
        Value::Long(l) => (*l).into(),
        Value::String(s) => (*s).into(),
        Value::Enum(s) => (*s).into(),
        Value::Decimal(d) => d.normalize().to_string().into(),
        Value::Bytes(b) => b.iter().map(|x| serde_json::Value::from(*x)).collect(),
        Value::Array(items) => items.iter().map(json).collect(),
        Value::Map(entries) => entries.iter().map(|(k, v)| ((*k).to_owned(), json(v))).collect(),
    }
}

fn cell<'a>(value: &Value<'a>, ty: &Type, clean_text: bool) -> Cell<'a> {
    match value {
        Value::Null => Cell::Null,
        Value::Boolean(b) => Cell::Bool(*b),
        Value::Int(i) => Cell::Int(*i),
        Value::Long(l) if *ty == Type::TIMESTAMPTZ => Cell::Time(ts(*l)),
        Value::Long(l) => Cell::Long(*l),
        Value::String(s) if clean_text && s.contains('\0') => Cell::Owned(clean(s)),
        Value::String(s) => Cell::Text(s),
        Value::Enum(s) => Cell::Text(s),
        Value::Bytes(b) => Cell::Bytes(b),
        Value::Decimal(d) => Cell::Decimal(*d),
        Value::Array(_) | Value::Map(_) => Cell::Json(json(value)),
    }
}

/// Streams rows (each a record's values in schema order) into
/// `COPY <target> (<columns>) FROM STDIN BINARY`.
async fn copy_rows(
    tx: &Transaction<'_>,
    target: &str,
    table: &Table,
    rows: &[Vec<(&'static str, Value<'_>)>],
) -> Result<u64, Error> {
    let columns = columns(table.topic);
    let sink = tx
        .copy_in(&format!("COPY {target} ({}) FROM STDIN BINARY", columns.list))
        .await?;
    let writer = BinaryCopyInWriter::new(sink, &columns.types);
    futures_util::pin_mut!(writer);
    // One buffer of cells for every row.
    let mut cells: Vec<Cell<'_>> = Vec::with_capacity(columns.types.len());
    for row in rows {
        for ((_, v), ty) in row.iter().zip(&columns.types) {
            cells.push(cell(v, ty, table.clean));
        }
        writer.as_mut().write_raw(cells.drain(..)).await?;
    }
    writer.finish().await
}

async fn write_table(tx: &Transaction<'_>, topic: Topic, items: &[&Item]) -> Result<(), Error> {
    let records: Vec<&AnyRecord> = items.iter().filter_map(|i| i.body.as_ref().ok()).collect();
    if topic == Topic::Assets {
        asset_history(tx, &records).await?;
    }
    let rows: Vec<Vec<(&'static str, Value<'_>)>> = records.iter().map(|r| r.values()).collect();
    write_rows(tx, table_of(topic), rows).await
}

/// Writes a table's rows (values in schema order) by its merge policy.
async fn write_rows(
    tx: &Transaction<'_>,
    table: &Table,
    rows: Vec<Vec<(&'static str, Value<'_>)>>,
) -> Result<(), Error> {
    let name = table.name;
    let list = &columns(table.topic).list;
    let rows = match table.merge {
        Merge::Keep { .. } => rows,
        Merge::LastWins => latest(rows, table.key, |_, _| true),
        Merge::NewerWins => latest(rows, table.key, |kept, new| new >= kept),
    };
    if table.merge == (Merge::Keep { direct: true }) {
        tx.batch_execute("SAVEPOINT direct").await?;
        match copy_rows(tx, name, table, &rows).await {
            Ok(_) => return tx.batch_execute("RELEASE SAVEPOINT direct").await,
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                tx.batch_execute("ROLLBACK TO SAVEPOINT direct; RELEASE SAVEPOINT direct")
                    .await?;
            }
            Err(e) => return Err(e),
        }
    }
    let staged = stage(tx, name, list).await?;
    copy_rows(tx, &staged, table, &rows).await?;
    let sql = match table.merge {
        Merge::Keep { .. } => format!("INSERT INTO {name} ({list}) SELECT {list} FROM {staged} ON CONFLICT DO NOTHING"),
        Merge::LastWins => upsert_sql(table, &staged, ""),
        Merge::NewerWins => upsert_sql(table, &staged, "WHERE t.event_time <= EXCLUDED.event_time"),
    };
    tx.batch_execute(&sql).await
}

/// A per-connection staging table with `columns` of `table`, emptied at
/// commit. (`LIKE` would also carry an identity column's NOT NULL without
/// its default.)
async fn stage(tx: &Transaction<'_>, table: &str, columns: &str) -> Result<String, Error> {
    let name = format!("stage_{table}");
    tx.batch_execute(&format!(
        "CREATE TEMP TABLE IF NOT EXISTS {name} ON COMMIT DELETE ROWS AS SELECT {columns} FROM {table} WITH NO DATA; \
         TRUNCATE {name}"
    ))
    .await?;
    Ok(name)
}

/// A row's `event_time` (every record has one).
fn event_time(row: &[(&'static str, Value<'_>)]) -> Micros {
    row.iter()
        .find_map(|(name, value)| match (*name, value) {
            ("event_time", Value::Long(t)) => Some(*t),
            _ => None,
        })
        .unwrap_or(Micros::MIN)
}

/// Keeps one row per key: the last one for which `newer(kept, candidate)`
/// holds of their event times.
fn latest<'v>(
    rows: Vec<Vec<(&'static str, Value<'v>)>>,
    key: &[&str],
    newer: impl Fn(Micros, Micros) -> bool,
) -> Vec<Vec<(&'static str, Value<'v>)>> {
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut out: Vec<(Vec<(&'static str, Value<'v>)>, Micros)> = Vec::new();
    for row in rows {
        let t = event_time(&row);
        let k = format!(
            "{:?}",
            row.iter()
                .filter(|(n, _)| key.contains(n))
                .map(|(_, v)| v)
                .collect::<Vec<_>>()
        );
        match index.get(&k) {
            Some(&i) => {
                if newer(out[i].1, t) {
                    out[i] = (row, t);
                }
            }
            None => {
                index.insert(k, out.len());
                out.push((row, t));
            }
        }
    }
    out.into_iter().map(|(row, _)| row).collect()
}

/// Builds `INSERT INTO table (cols) SELECT cols FROM staged ON CONFLICT (key)
/// DO UPDATE SET every other column [WHERE guard]`.
fn upsert_sql(table: &Table, staged: &str, guard: &str) -> String {
    let columns = columns(table.topic);
    let set: Vec<String> = columns
        .names
        .iter()
        .filter(|c| !table.key.contains(&c.as_str()))
        .map(|c| format!("\"{c}\" = EXCLUDED.\"{c}\""))
        .collect();
    let key = table
        .key
        .iter()
        .map(|k| format!("\"{k}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "INSERT INTO {} AS t ({}) SELECT {} FROM {staged} ON CONFLICT ({key}) DO UPDATE SET {} {guard}",
        table.name,
        columns.list,
        columns.list,
        set.join(", ")
    )
}

/// Asset history first, every state in event-time order (SCD2, kept by the
/// `tickpipe_asset_history_apply` function of the migrations).
async fn asset_history(tx: &Transaction<'_>, records: &[&AnyRecord]) -> Result<(), Error> {
    let mut ordered: Vec<&Asset> = records
        .iter()
        .filter_map(|r| match r {
            AnyRecord::Asset(a) => Some(&**a),
            _ => None,
        })
        .collect();
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
    Ok(())
}

/// Appends dead letters (another service's, or the sink's own rejects); a
/// letter already stored (same component and record coordinates, published
/// again after a crash) is not stored twice.
pub async fn dead_letters(tx: &Transaction<'_>, rows: &[&DeadLetter]) -> Result<(), Error> {
    let values = rows.iter().map(|d| d.values()).collect();
    write_rows(tx, table_of(Topic::DeadLetters), values).await
}
