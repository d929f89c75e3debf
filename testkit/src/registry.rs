//! An in-memory double of the Confluent Schema Registry REST API, for tests only.
//!
//! It follows the published API (docs.confluent.io, "Schema Registry API
//! Reference") for the endpoints clients use: paths, request and response bodies,
//! the `application/vnd.schemaregistry.v1+json` content type, HTTP statuses and
//! Confluent error codes (40401 subject not found, 40402 version not found, 40403
//! schema not found, 409 incompatible, 42201 invalid schema, 42202 invalid version,
//! 42203 invalid compatibility level). Ids are global and stable: the same schema
//! (by Parsing Canonical Form) gets the same id under every subject. Compatibility
//! is checked with apache-avro's schema resolution rules on the underlying types,
//! ignoring logical types as Java Avro's `SchemaCompatibility` (which Confluent's
//! server uses) does; the default level is BACKWARD, as in Confluent's server.
//!
//! Only AVRO schemas without references are supported; anything else is refused
//! with 42201, as a server without that schema type would.

// Handlers return the error response itself; its size does not matter in a test double.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

#[derive(Default)]
struct Inner {
    /// Schema text by id - 1, with its identity (normalised JSON) and its underlying-type
    /// schema (what compatibility is judged on).
    schemas: Vec<(String, String, Schema)>,
    /// Versions of each subject: `None` marks a deleted version.
    subjects: BTreeMap<String, Vec<Option<u32>>>,
    /// Global compatibility level.
    global_level: Option<String>,
    /// Per-subject compatibility levels.
    levels: BTreeMap<String, String>,
    /// Every request seen, as `METHOD path`, for tests that check the hot path
    /// makes no call.
    requests: Vec<String>,
}

type Shared = Arc<Mutex<Inner>>;

/// A running registry double.
pub struct RegistryDouble {
    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    state: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl RegistryDouble {
    /// Starts the double on a free loopback port.
    pub async fn start() -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let state: Shared = Arc::default();
        let app = router(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(RegistryDouble { url, state, task })
    }

    /// Stops answering (connections are refused), keeping the schemas: a
    /// registry outage.
    pub fn stop(&mut self) {
        self.task.abort();
    }

    /// Answers again on the same address, with the same schemas.
    pub async fn resume(&mut self) -> std::io::Result<()> {
        let addr: SocketAddr = self
            .url
            .trim_start_matches("http://")
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{e}")))?;
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let app = router(self.state.clone());
        self.task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(())
    }

    /// The requests served so far, as `METHOD /path`.
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for RegistryDouble {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn router(state: Shared) -> Router {
    Router::new()
        .route("/subjects", get(list_subjects))
        .route("/subjects/{subject}", post(lookup).delete(delete_subject))
        .route("/subjects/{subject}/versions", get(list_versions).post(register))
        .route("/subjects/{subject}/versions/{version}", get(get_version))
        .route("/subjects/{subject}/versions/{version}/schema", get(get_version_schema))
        .route("/schemas/ids/{id}", get(get_by_id))
        .route("/schemas/ids/{id}/schema", get(get_by_id_raw))
        .route("/schemas/ids/{id}/versions", get(get_id_versions))
        .route(
            "/schemas/types",
            get(|| async { reply(StatusCode::OK, json!(["AVRO"])) }),
        )
        .route(
            "/compatibility/subjects/{subject}/versions/{version}",
            post(compatibility),
        )
        .route("/config", get(get_global_config).put(put_global_config))
        .route("/config/{subject}", get(get_subject_config).put(put_subject_config))
        .fallback(|| async { error(StatusCode::NOT_FOUND, 404, "HTTP 404 Not Found") })
        .layer(axum::middleware::from_fn_with_state(state.clone(), log_request))
        .with_state(state)
}

async fn log_request(
    State(state): State<Shared>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let line = format!("{} {}", req.method(), req.uri().path());
    state.lock().unwrap_or_else(|p| p.into_inner()).requests.push(line);
    next.run(req).await
}

fn reply(status: StatusCode, body: Value) -> Response {
    (status, [(header::CONTENT_TYPE, CONTENT_TYPE)], body.to_string()).into_response()
}

fn error(status: StatusCode, code: i64, message: &str) -> Response {
    reply(status, json!({ "error_code": code, "message": message }))
}

fn subject_not_found(subject: &str) -> Response {
    error(StatusCode::NOT_FOUND, 40401, &format!("Subject '{subject}' not found."))
}

fn lock(state: &Shared) -> std::sync::MutexGuard<'_, Inner> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Accepts the media types Confluent's server accepts for request bodies.
fn check_content_type(headers: &HeaderMap) -> Result<(), Response> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let base = ct.split(';').next().unwrap_or("").trim();
    match base {
        "application/vnd.schemaregistry.v1+json"
        | "application/vnd.schemaregistry+json"
        | "application/json"
        | "application/octet-stream" => Ok(()),
        _ => Err(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            415,
            "HTTP 415 Unsupported Media Type",
        )),
    }
}

/// The schema on its underlying types (see `tickpipe_schemas::record::underlying_json`).
fn underlying(text: &str) -> Schema {
    tickpipe_schemas::record::underlying_json(text)
        .ok()
        .and_then(|t| Schema::parse_str(&t).ok())
        .unwrap_or(Schema::Null)
}

/// Reads `{"schema": "...", "schemaType"?, "references"?}` and parses the schema.
fn parse_request(headers: &HeaderMap, body: &Bytes) -> Result<(String, String, Schema), Response> {
    check_content_type(headers)?;
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::UNPROCESSABLE_ENTITY,
            422,
            &format!("Unrecognized request body: {e}"),
        )
    })?;
    let text = v
        .get("schema")
        .and_then(Value::as_str)
        .ok_or_else(|| error(StatusCode::UNPROCESSABLE_ENTITY, 42201, "Empty schema"))?;
    if let Some(t) = v.get("schemaType").and_then(Value::as_str) {
        if t != "AVRO" {
            return Err(error(
                StatusCode::UNPROCESSABLE_ENTITY,
                42201,
                &format!("Invalid schema type {t}"),
            ));
        }
    }
    if v.get("references")
        .and_then(Value::as_array)
        .is_some_and(|r| !r.is_empty())
    {
        return Err(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            42201,
            "Schema references are not supported by this registry",
        ));
    }
    let invalid = |e: String| {
        error(
            StatusCode::UNPROCESSABLE_ENTITY,
            42201,
            &format!("Invalid schema {text}, details: {e}"),
        )
    };
    Schema::parse_str(text).map_err(|e| invalid(e.to_string()))?;
    // Identity is the parsed JSON (keys sorted, whitespace gone): equal schemas
    // get one id, but docs, defaults and logical types still tell versions apart.
    let identity = serde_json::from_str::<Value>(text)
        .map_err(|e| invalid(e.to_string()))?
        .to_string();
    Ok((text.to_owned(), identity, underlying(text)))
}

fn level_of(inner: &Inner, subject: &str) -> String {
    inner
        .levels
        .get(subject)
        .or(inner.global_level.as_ref())
        .cloned()
        .unwrap_or_else(|| "BACKWARD".to_owned())
}

/// Checks `new` (underlying types) against the subject's live versions under `level`; returns the
/// reasons it is incompatible (empty when compatible).
fn incompatibilities(inner: &Inner, subject: &str, new: &Schema, level: &str) -> Vec<String> {
    let live: Vec<&Schema> = inner
        .subjects
        .get(subject)
        .map(|vs| {
            vs.iter()
                .flatten()
                .map(|id| &inner.schemas[*id as usize - 1].2)
                .collect()
        })
        .unwrap_or_default();
    let against: Vec<&Schema> = if level.ends_with("_TRANSITIVE") {
        live
    } else {
        live.last().copied().into_iter().collect()
    };
    let mut reasons = Vec::new();
    for old in against {
        let backward = || {
            SchemaCompatibility::can_read(old, new)
                .err()
                .map(|e| format!("new schema cannot read old data: {e}"))
        };
        let forward = || {
            SchemaCompatibility::can_read(new, old)
                .err()
                .map(|e| format!("old schema cannot read new data: {e}"))
        };
        match level.trim_end_matches("_TRANSITIVE") {
            "BACKWARD" => reasons.extend(backward()),
            "FORWARD" => reasons.extend(forward()),
            "FULL" => {
                reasons.extend(backward());
                reasons.extend(forward());
            }
            _ => {}
        }
    }
    reasons
}

fn registered(inner: &Inner, subject: &str, version: usize, id: u32) -> Value {
    json!({ "subject": subject, "version": version, "id": id, "schema": inner.schemas[id as usize - 1].0 })
}

async fn list_subjects(State(s): State<Shared>) -> Response {
    let inner = lock(&s);
    let names: Vec<&String> = inner
        .subjects
        .iter()
        .filter(|(_, v)| v.iter().any(Option::is_some))
        .map(|(k, _)| k)
        .collect();
    reply(StatusCode::OK, json!(names))
}

async fn register(State(s): State<Shared>, Path(subject): Path<String>, headers: HeaderMap, body: Bytes) -> Response {
    let (text, canonical, schema) = match parse_request(&headers, &body) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let mut inner = lock(&s);
    let existing = inner
        .schemas
        .iter()
        .position(|(_, c, _)| *c == canonical)
        .map(|i| i as u32 + 1);
    if let Some(id) = existing {
        if inner.subjects.get(&subject).is_some_and(|vs| vs.contains(&Some(id))) {
            return reply(StatusCode::OK, json!({ "id": id }));
        }
    }
    let level = level_of(&inner, &subject);
    let reasons = incompatibilities(&inner, &subject, &schema, &level);
    if !reasons.is_empty() {
        return error(
            StatusCode::CONFLICT,
            409,
            &format!(
                "Schema being registered is incompatible with an earlier schema for subject \"{subject}\", details: {}",
                reasons.join("; ")
            ),
        );
    }
    let id = match existing {
        Some(id) => id,
        None => {
            inner.schemas.push((text, canonical, schema));
            inner.schemas.len() as u32
        }
    };
    inner.subjects.entry(subject).or_default().push(Some(id));
    reply(StatusCode::OK, json!({ "id": id }))
}

async fn lookup(State(s): State<Shared>, Path(subject): Path<String>, headers: HeaderMap, body: Bytes) -> Response {
    let (_, canonical, _) = match parse_request(&headers, &body) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let inner = lock(&s);
    let Some(versions) = inner.subjects.get(&subject) else {
        return subject_not_found(&subject);
    };
    for (i, id) in versions.iter().enumerate() {
        if let Some(id) = id {
            if inner.schemas[*id as usize - 1].1 == canonical {
                return reply(StatusCode::OK, registered(&inner, &subject, i + 1, *id));
            }
        }
    }
    error(StatusCode::NOT_FOUND, 40403, "Schema not found")
}

async fn delete_subject(State(s): State<Shared>, Path(subject): Path<String>) -> Response {
    let mut inner = lock(&s);
    let Some(versions) = inner.subjects.get_mut(&subject) else {
        return subject_not_found(&subject);
    };
    let deleted: Vec<usize> = versions
        .iter()
        .enumerate()
        .filter(|(_, v)| v.is_some())
        .map(|(i, _)| i + 1)
        .collect();
    versions.iter_mut().for_each(|v| *v = None);
    reply(StatusCode::OK, json!(deleted))
}

async fn list_versions(State(s): State<Shared>, Path(subject): Path<String>) -> Response {
    let inner = lock(&s);
    match inner.subjects.get(&subject) {
        Some(vs) if vs.iter().any(Option::is_some) => {
            let list: Vec<usize> = vs
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_some())
                .map(|(i, _)| i + 1)
                .collect();
            reply(StatusCode::OK, json!(list))
        }
        _ => subject_not_found(&subject),
    }
}

/// Resolves a version path segment (`latest`, `-1` or a number ≥ 1).
fn find_version(inner: &Inner, subject: &str, version: &str) -> Result<(usize, u32), Response> {
    let Some(vs) = inner.subjects.get(subject).filter(|vs| vs.iter().any(Option::is_some)) else {
        return Err(subject_not_found(subject));
    };
    let index = match version {
        "latest" | "-1" => vs.iter().rposition(Option::is_some),
        n => match n.parse::<usize>() {
            Ok(n) if n >= 1 => vs.get(n - 1).and_then(|v| v.map(|_| n - 1)),
            _ => {
                return Err(error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    42202,
                    &format!("The specified version '{n}' is not a valid version id. Allowed values are between [1, 2^31-1] and the string \"latest\""),
                ))
            }
        },
    };
    match index.and_then(|i| vs[i].map(|id| (i + 1, id))) {
        Some(found) => Ok(found),
        None => Err(error(
            StatusCode::NOT_FOUND,
            40402,
            &format!("Version {version} not found."),
        )),
    }
}

async fn get_version(State(s): State<Shared>, Path((subject, version)): Path<(String, String)>) -> Response {
    let inner = lock(&s);
    match find_version(&inner, &subject, &version) {
        Ok((v, id)) => reply(StatusCode::OK, registered(&inner, &subject, v, id)),
        Err(r) => r,
    }
}

async fn get_version_schema(State(s): State<Shared>, Path((subject, version)): Path<(String, String)>) -> Response {
    let inner = lock(&s);
    match find_version(&inner, &subject, &version) {
        Ok((_, id)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, CONTENT_TYPE)],
            inner.schemas[id as usize - 1].0.clone(),
        )
            .into_response(),
        Err(r) => r,
    }
}

fn schema_by_id(inner: &Inner, id: &str) -> Result<String, Response> {
    id.parse::<usize>()
        .ok()
        .and_then(|i| i.checked_sub(1))
        .and_then(|i| inner.schemas.get(i))
        .map(|(text, _, _)| text.clone())
        .ok_or_else(|| error(StatusCode::NOT_FOUND, 40403, &format!("Schema {id} not found")))
}

async fn get_by_id(
    State(s): State<Shared>,
    Path(id): Path<String>,
    Query(_q): Query<BTreeMap<String, String>>,
) -> Response {
    match schema_by_id(&lock(&s), &id) {
        Ok(text) => reply(StatusCode::OK, json!({ "schema": text })),
        Err(r) => r,
    }
}

async fn get_by_id_raw(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    match schema_by_id(&lock(&s), &id) {
        Ok(text) => (StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(r) => r,
    }
}

async fn get_id_versions(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    let inner = lock(&s);
    if let Err(r) = schema_by_id(&inner, &id) {
        return r;
    }
    let id: u32 = id.parse().unwrap_or(0);
    let mut out = Vec::new();
    for (subject, vs) in &inner.subjects {
        for (i, v) in vs.iter().enumerate() {
            if *v == Some(id) {
                out.push(json!({ "subject": subject, "version": i + 1 }));
            }
        }
    }
    reply(StatusCode::OK, json!(out))
}

async fn compatibility(
    State(s): State<Shared>,
    Path((subject, version)): Path<(String, String)>,
    Query(q): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (_, _, schema) = match parse_request(&headers, &body) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let inner = lock(&s);
    let (_, id) = match find_version(&inner, &subject, &version) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let level = level_of(&inner, &subject);
    // Against one named version, transitivity does not apply.
    let old = &inner.schemas[id as usize - 1].2;
    let mut probe = Inner::default();
    probe.schemas.push((String::new(), String::new(), old.clone()));
    probe.subjects.insert(subject.clone(), vec![Some(1)]);
    let reasons = incompatibilities(&probe, &subject, &schema, level.trim_end_matches("_TRANSITIVE"));
    let mut body = json!({ "is_compatible": reasons.is_empty() });
    if q.get("verbose").is_some_and(|v| v == "true") {
        body["messages"] = json!(reasons);
    }
    reply(StatusCode::OK, body)
}

const LEVELS: [&str; 7] = [
    "NONE",
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
];

fn parse_level(headers: &HeaderMap, body: &Bytes) -> Result<String, Response> {
    check_content_type(headers)?;
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::UNPROCESSABLE_ENTITY,
            422,
            &format!("Unrecognized request body: {e}"),
        )
    })?;
    match v.get("compatibility").and_then(Value::as_str) {
        Some(l) if LEVELS.contains(&l) => Ok(l.to_owned()),
        _ => Err(error(StatusCode::UNPROCESSABLE_ENTITY, 42203, "Invalid compatibility level. Valid values are none, backward, forward, full, backward_transitive, forward_transitive, and full_transitive")),
    }
}

async fn get_global_config(State(s): State<Shared>) -> Response {
    let inner = lock(&s);
    reply(
        StatusCode::OK,
        json!({ "compatibilityLevel": inner.global_level.clone().unwrap_or_else(|| "BACKWARD".to_owned()) }),
    )
}

async fn put_global_config(State(s): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    match parse_level(&headers, &body) {
        Ok(l) => {
            lock(&s).global_level = Some(l.clone());
            reply(StatusCode::OK, json!({ "compatibility": l }))
        }
        Err(r) => r,
    }
}

async fn get_subject_config(
    State(s): State<Shared>,
    Path(subject): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let inner = lock(&s);
    match inner.levels.get(&subject) {
        Some(l) => reply(StatusCode::OK, json!({ "compatibilityLevel": l })),
        None if q.get("defaultToGlobal").is_some_and(|v| v == "true") => reply(
            StatusCode::OK,
            json!({ "compatibilityLevel": level_of(&inner, &subject) }),
        ),
        None => error(
            StatusCode::NOT_FOUND,
            40408,
            &format!("Subject '{subject}' does not have subject-level compatibility configured"),
        ),
    }
}

async fn put_subject_config(
    State(s): State<Shared>,
    Path(subject): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match parse_level(&headers, &body) {
        Ok(l) => {
            lock(&s).levels.insert(subject, l.clone());
            reply(StatusCode::OK, json!({ "compatibility": l }))
        }
        Err(r) => r,
    }
}
