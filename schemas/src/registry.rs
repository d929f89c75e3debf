//! A client for the Confluent Schema Registry REST API (the subset a producer and
//! a consumer need), with an id cache so that the hot path makes no HTTP call.
//!
//! This is the only module of the crate that does I/O.
//!
//! Endpoints used, as documented by Confluent:
//! - `POST /subjects/{subject}/versions` registers a schema (idempotent: the same
//!   schema gets the same id) and returns `{"id": N}`.
//! - `GET /schemas/ids/{id}` returns `{"schema": "..."}`.
//! - `POST /compatibility/subjects/{subject}/versions/latest` returns
//!   `{"is_compatible": bool}` (404 with error code 40401 when the subject is new).
//! - `PUT /config/{subject}` sets the compatibility level.
//!
//! Requests and responses use `application/vnd.schemaregistry.v1+json`; errors
//! carry `{"error_code": N, "message": "..."}`.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;

use crate::codec::{Codec, Framing};
use crate::error::DecodeError;
use crate::record::Record;
use crate::topic::Topic;

/// The Schema Registry media type.
pub const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// Where the registry is and how to authenticate.
#[derive(Clone)]
pub struct RegistryConfig {
    /// Base URL, e.g. `http://127.0.0.1:8081`.
    pub url: String,
    /// Basic-auth user (Confluent Cloud API key), if any.
    pub username: Option<String>,
    /// Basic-auth password (API secret); never printed.
    pub password: Option<String>,
    /// Per-request timeout.
    pub timeout: Duration,
}

impl RegistryConfig {
    pub fn new(url: impl Into<String>) -> Self {
        RegistryConfig {
            url: url.into(),
            username: None,
            password: None,
            timeout: Duration::from_secs(10),
        }
    }
}

impl fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Compatibility levels of the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compatibility {
    None,
    Backward,
    BackwardTransitive,
    Forward,
    ForwardTransitive,
    Full,
    FullTransitive,
}

impl Compatibility {
    pub fn as_str(self) -> &'static str {
        match self {
            Compatibility::None => "NONE",
            Compatibility::Backward => "BACKWARD",
            Compatibility::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Compatibility::Forward => "FORWARD",
            Compatibility::ForwardTransitive => "FORWARD_TRANSITIVE",
            Compatibility::Full => "FULL",
            Compatibility::FullTransitive => "FULL_TRANSITIVE",
        }
    }
}

/// Registry failures.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("schema registry at {url} is unreachable: {source}")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("schema registry rejected the credentials (HTTP {status}); check the registry username and password")]
    Unauthorized { status: u16 },
    #[error("schema registry: {message} (HTTP {status}, error code {code})")]
    Api { status: u16, code: i64, message: String },
    #[error("schema for {subject} is incompatible with the registered one: {message}")]
    Incompatible { subject: String, message: String },
    #[error("schema registry returned an unreadable response: {0}")]
    BadResponse(String),
    #[error("schema id {id} from the registry is not valid Avro: {message}")]
    InvalidSchema { id: u32, message: String },
    #[error("invalid schema registry URL {0:?}")]
    BadUrl(String),
}

impl RegistryError {
    /// Whether retrying the same call may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            RegistryError::Unreachable { .. } => true,
            RegistryError::Api { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}

#[derive(Deserialize)]
struct IdResponse {
    id: u32,
}

#[derive(Deserialize)]
struct SchemaResponse {
    schema: String,
}

#[derive(Deserialize)]
struct CompatibilityResponse {
    is_compatible: bool,
    /// Confluent's reasons (`verbose=true`).
    #[serde(default)]
    messages: Vec<String>,
    /// Apicurio's Confluent-compatible API gives its reason here instead.
    #[serde(default)]
    reason: Option<String>,
}

impl CompatibilityResponse {
    fn verdict(self) -> Result<(), String> {
        match (self.is_compatible, self.messages.is_empty(), self.reason) {
            (true, _, _) => Ok(()),
            (false, false, _) => Err(self.messages.join("; ")),
            (false, true, Some(reason)) => Err(reason),
            (false, true, None) => Err("not compatible".to_owned()),
        }
    }
}

#[derive(Deserialize)]
struct ErrorResponse {
    error_code: i64,
    message: String,
}

/// A Schema Registry client with an id → schema cache.
pub struct RegistryClient {
    base: String,
    http: reqwest::Client,
    config: RegistryConfig,
    /// Schemas already fetched by id; ids are immutable in a registry.
    by_id: Mutex<HashMap<u32, Arc<str>>>,
    /// Ids the registry said it does not have (404), and when: not asked
    /// again for [`MISSING_ID_TTL`], so that records naming such an id
    /// become dead letters at the pace they come instead of one HTTP call each.
    missing: Mutex<HashMap<u32, std::time::Instant>>,
}

/// How long an id the registry does not have is remembered as missing (a
/// schema registered meanwhile is found after this).
pub const MISSING_ID_TTL: std::time::Duration = std::time::Duration::from_secs(300);

impl fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryClient")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl RegistryClient {
    pub fn new(config: RegistryConfig) -> Result<Self, RegistryError> {
        let base = config.url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(RegistryError::BadUrl(config.url.clone()));
        }
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .map_err(|e| RegistryError::BadResponse(e.to_string()))?;
        Ok(RegistryClient {
            base,
            http,
            config,
            by_id: Mutex::default(),
            missing: Mutex::default(),
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .header(reqwest::header::ACCEPT, CONTENT_TYPE);
        if let Some(user) = &self.config.username {
            req = req.basic_auth(user, self.config.password.as_deref());
        }
        req
    }

    async fn send<T: for<'de> Deserialize<'de>>(&self, req: reqwest::RequestBuilder) -> Result<T, RegistryError> {
        let resp = req.send().await.map_err(|source| RegistryError::Unreachable {
            url: self.base.clone(),
            source,
        })?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(|source| RegistryError::Unreachable {
            url: self.base.clone(),
            source,
        })?;
        if status == 401 || status == 403 {
            return Err(RegistryError::Unauthorized { status });
        }
        if !(200..300).contains(&status) {
            return Err(match serde_json::from_slice::<ErrorResponse>(&body) {
                Ok(e) => RegistryError::Api {
                    status,
                    code: e.error_code,
                    message: e.message,
                },
                Err(_) => RegistryError::Api {
                    status,
                    code: i64::from(status),
                    message: String::from_utf8_lossy(&body).into_owned(),
                },
            });
        }
        serde_json::from_slice(&body)
            .map_err(|e| RegistryError::BadResponse(format!("{e}: {}", String::from_utf8_lossy(&body))))
    }

    fn json_body(req: reqwest::RequestBuilder, body: &serde_json::Value) -> reqwest::RequestBuilder {
        req.header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .body(body.to_string())
    }

    /// Registers `schema` under `subject` (or finds it if already there); returns its id.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let req = self.request(
            reqwest::Method::POST,
            &format!("/subjects/{}/versions", encode_path(subject)),
        );
        let req = Self::json_body(req, &serde_json::json!({ "schema": schema }));
        match self.send::<IdResponse>(req).await {
            Ok(r) => {
                self.by_id
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(r.id, Arc::from(schema));
                Ok(r.id)
            }
            Err(RegistryError::Api {
                status: 409, message, ..
            }) => Err(RegistryError::Incompatible {
                subject: subject.to_owned(),
                message,
            }),
            Err(e) => Err(e),
        }
    }

    /// The schema text for an id; cached after the first call.
    pub async fn schema_by_id(&self, id: u32) -> Result<Arc<str>, RegistryError> {
        if let Some(s) = self.by_id.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
            return Ok(s.clone());
        }
        let r: SchemaResponse = self
            .send(self.request(reqwest::Method::GET, &format!("/schemas/ids/{id}")))
            .await?;
        let schema: Arc<str> = Arc::from(r.schema);
        self.by_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, schema.clone());
        Ok(schema)
    }

    /// Whether `schema` may be registered under `subject` given its compatibility
    /// level. A subject with no versions accepts anything.
    pub async fn check_compatibility(&self, subject: &str, schema: &str) -> Result<Result<(), String>, RegistryError> {
        let req = self.request(
            reqwest::Method::POST,
            &format!(
                "/compatibility/subjects/{}/versions/latest?verbose=true",
                encode_path(subject)
            ),
        );
        let req = Self::json_body(req, &serde_json::json!({ "schema": schema }));
        match self.send::<CompatibilityResponse>(req).await {
            Ok(r) => Ok(r.verdict()),
            Err(RegistryError::Api {
                code: 40401 | 40402, ..
            }) => Ok(Ok(())),
            Err(e) => Err(e),
        }
    }

    /// Sets a subject's compatibility level.
    pub async fn set_compatibility(&self, subject: &str, level: Compatibility) -> Result<(), RegistryError> {
        let req = self.request(reqwest::Method::PUT, &format!("/config/{}", encode_path(subject)));
        let req = Self::json_body(req, &serde_json::json!({ "compatibility": level.as_str() }));
        self.send::<serde_json::Value>(req).await.map(|_| ())
    }

    /// Checks, then registers the compiled-in schema of each topic under
    /// `<prefix><topic>-value`, and tells the codec which id to write with.
    pub async fn register_topics(&self, codec: &Codec, prefix: &str, topics: &[Topic]) -> Result<(), RegistryError> {
        for topic in topics {
            let subject = topic.value_subject(prefix);
            let schema = topic.schema();
            if let Err(message) = self.check_compatibility(&subject, &schema.json).await? {
                return Err(RegistryError::Incompatible { subject, message });
            }
            let id = self.register(&subject, &schema.json).await?;
            codec
                .add_registry_schema(id, &schema.json)
                .map_err(|e| RegistryError::InvalidSchema {
                    id,
                    message: e.to_string(),
                })?;
            codec.set_write_id(schema.name.as_str(), id);
        }
        Ok(())
    }

    /// Teaches the codec the writer schema of a Confluent-framed payload whose
    /// id it does not know yet: one HTTP call per id, ever. Payloads in another
    /// framing, or with a known id, need nothing.
    pub async fn learn(&self, codec: &Codec, payload: &[u8]) -> Result<(), RegistryError> {
        let Ok((Framing::Confluent { schema_id }, _)) = Framing::split(payload) else {
            return Ok(());
        };
        if codec.knows_id(schema_id) {
            return Ok(());
        }
        let missing_since = self
            .missing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&schema_id)
            .copied();
        if missing_since.is_some_and(|t| t.elapsed() < MISSING_ID_TTL) {
            // Left for the decoder, which refuses the unknown id.
            return Ok(());
        }
        let schema = match self.schema_by_id(schema_id).await {
            Err(e @ RegistryError::Api { status: 404, .. }) => {
                self.missing
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(schema_id, std::time::Instant::now());
                return Err(e);
            }
            other => other?,
        };
        codec
            .add_registry_schema(schema_id, &schema)
            .map_err(|e| RegistryError::InvalidSchema {
                id: schema_id,
                message: e.to_string(),
            })?;
        Ok(())
    }

    /// Decodes a record, fetching its writer schema from the registry the first
    /// time an id is seen.
    pub async fn decode<R: Record>(&self, codec: &Codec, payload: &[u8]) -> Result<R, DecodeOrRegistryError> {
        self.learn(codec, payload).await?;
        Ok(codec.decode::<R>(payload)?)
    }
}

/// A decode that needed the registry failed either way.
#[derive(Debug, thiserror::Error)]
pub enum DecodeOrRegistryError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// Percent-encodes a path segment (subjects may contain '.', '-', and more).
fn encode_path(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::CompatibilityResponse;

    fn verdict(body: &str) -> Result<(), String> {
        serde_json::from_str::<CompatibilityResponse>(body)
            .expect("a compatibility answer")
            .verdict()
    }

    #[test]
    fn both_registries_reasons_are_read() {
        // Confluent's server (verbose=true).
        assert_eq!(
            verdict(r#"{"is_compatible":false,"messages":["READER_FIELD_MISSING_DEFAULT_VALUE fee"]}"#),
            Err("READER_FIELD_MISSING_DEFAULT_VALUE fee".to_owned())
        );
        // Apicurio's Confluent-compatible API.
        assert_eq!(
            verdict(r#"{"is_compatible":false,"reason":"Incompatible artifact: fee at /fields/1"}"#),
            Err("Incompatible artifact: fee at /fields/1".to_owned())
        );
        assert_eq!(verdict(r#"{"is_compatible":false}"#), Err("not compatible".to_owned()));
        assert_eq!(verdict(r#"{"is_compatible":true}"#), Ok(()));
    }
}
