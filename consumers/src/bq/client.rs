//! The BigQuery REST API, the only I/O of the BigQuery sink besides Kafka:
//! datasets, tables and views, `tabledata.insertAll`, and queries. Requests are
//! plain JSON without `null` members (real BigQuery ignores them; emulators
//! refuse them). Errors say whether a retry can help.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::HistogramVec;
use serde::Deserialize;
use serde_json::{json, Value as Json};

use super::schema::Field;

/// Where BigQuery is and how to authenticate.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// API root, `https://bigquery.googleapis.com` or an emulator's URL.
    pub api_url: String,
    pub project: String,
    pub auth: Auth,
}

/// How requests are authorized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// No credentials: an emulator.
    None,
    /// A service-account key file (its contents are never logged).
    KeyFile(PathBuf),
    /// Application Default Credentials: `GOOGLE_APPLICATION_CREDENTIALS`, the
    /// gcloud user credentials, or the metadata server.
    ApplicationDefault,
}

/// The OAuth scope of BigQuery.
const SCOPE: &str = "https://www.googleapis.com/auth/bigquery";

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum BqError {
    /// No usable credentials or the token service refused them: fatal.
    #[error("bigquery authentication failed: {0}")]
    Auth(String),
    /// The credentials work but may not do this: fatal.
    #[error(
        "bigquery refused {what}: {message} (HTTP {status}); grant the service account BigQuery Data Editor on \
         the dataset (and Job User to create it)"
    )]
    Permission { what: String, status: u16, message: String },
    #[error("bigquery {what}: HTTP {status} {reason}: {message}")]
    Status {
        what: String,
        status: u16,
        reason: String,
        message: String,
    },
    #[error("bigquery {what}: {detail}")]
    Transport { what: String, detail: String },
    #[error("bigquery {what}: unexpected answer: {detail}")]
    Protocol { what: String, detail: String },
}

impl BqError {
    /// Whether the sink must stop: retrying cannot help and the operator must act.
    pub fn is_fatal(&self) -> bool {
        matches!(self, BqError::Auth(_) | BqError::Permission { .. })
    }

    /// Whether the same request may succeed later (quota, server trouble,
    /// the network).
    pub fn is_retriable(&self) -> bool {
        match self {
            BqError::Transport { .. } => true,
            BqError::Status { status, reason, .. } => {
                *status == 429
                    || *status >= 500
                    || matches!(reason.as_str(), "rateLimitExceeded" | "backendError" | "quotaExceeded")
            }
            _ => false,
        }
    }

    /// Whether the server refused the data itself (a whole request refused
    /// as invalid, or an internal error that may be the data's fault, as the
    /// emulator answers bad rows; the writer tells these apart by trying the
    /// rows on their own). A temporary failure (`backendError`, 502, 503,
    /// 504) is never the data: a row is not blamed for an outage that began
    /// while its request was being split.
    pub fn may_be_the_data(&self) -> bool {
        match self {
            BqError::Status { status, reason, .. } => {
                (*status == 500 && reason != "backendError")
                    || (*status == 400 && matches!(reason.as_str(), "invalid" | "invalidQuery"))
            }
            _ => false,
        }
    }

    /// The reason as BigQuery gave it, for a dead letter.
    pub fn reason(&self) -> String {
        match self {
            BqError::Status {
                status,
                reason,
                message,
                ..
            } => format!("bigquery refused the row: HTTP {status} {reason}: {message}"),
            other => other.to_string(),
        }
    }
}

/// A row BigQuery refused in an insert that wrote the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Index in the request's rows.
    pub index: usize,
    pub reason: String,
}

/// A table as `tables.get` describes it.
#[derive(Debug, Clone, Deserialize)]
pub struct TableInfo {
    #[serde(default, rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub schema: Option<SchemaInfo>,
    /// A view's definition.
    #[serde(default)]
    pub view: Option<ViewInfo>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ViewInfo {
    #[serde(default)]
    pub query: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SchemaInfo {
    #[serde(default)]
    pub fields: Vec<Field>,
}

/// A BigQuery client for one project.
pub struct BigQuery {
    http: reqwest::Client,
    root: String,
    endpoint: Endpoint,
    tokens: Option<Arc<dyn gcp_auth::TokenProvider>>,
    latency: Option<HistogramVec>,
}

impl BigQuery {
    /// Prepares the client and, with credentials, fetches a first token so
    /// that bad credentials stop the sink at start with a clear message.
    pub async fn connect(endpoint: Endpoint, latency: Option<HistogramVec>) -> Result<BigQuery, BqError> {
        let tokens: Option<Arc<dyn gcp_auth::TokenProvider>> = match &endpoint.auth {
            Auth::None => None,
            Auth::KeyFile(path) => {
                let account = gcp_auth::CustomServiceAccount::from_file(path).map_err(|e| {
                    BqError::Auth(format!(
                        "cannot use the service-account key file {} ({e}); point TICKPIPE_BIGQUERY_CREDENTIALS at \
                         a JSON key of a service account",
                        path.display()
                    ))
                })?;
                Some(Arc::new(account))
            }
            Auth::ApplicationDefault => Some(gcp_auth::provider().await.map_err(|e| {
                BqError::Auth(format!(
                    "no Application Default Credentials ({e}); set TICKPIPE_BIGQUERY_CREDENTIALS or \
                     GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, run `gcloud auth \
                     application-default login`, or set TICKPIPE_BIGQUERY_EMULATOR for an emulator"
                ))
            })?),
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| BqError::Transport {
                what: "client".into(),
                detail: e.to_string(),
            })?;
        let root = format!(
            "{}/bigquery/v2/projects/{}",
            endpoint.api_url.trim_end_matches('/'),
            endpoint.project
        );
        let client = BigQuery {
            http,
            root,
            endpoint,
            tokens,
            latency,
        };
        client.token().await?;
        Ok(client)
    }

    pub fn project(&self) -> &str {
        &self.endpoint.project
    }

    async fn token(&self) -> Result<Option<String>, BqError> {
        let Some(tokens) = &self.tokens else {
            return Ok(None);
        };
        let token = tokens.token(&[SCOPE]).await.map_err(|e| {
            let source = match &self.endpoint.auth {
                Auth::KeyFile(path) => format!("the service-account key file {}", path.display()),
                _ => "Application Default Credentials".to_owned(),
            };
            BqError::Auth(format!(
                "the token service refused {source}: {e}; check that the key is current and not disabled"
            ))
        })?;
        Ok(Some(token.as_str().to_owned()))
    }

    /// One request; `Ok(None)` for 404.
    async fn call(
        &self,
        operation: &'static str,
        what: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Option<Json>, BqError> {
        let started = Instant::now();
        let mut request = self.http.request(method, format!("{}{path}", self.root));
        if let Some(token) = self.token().await? {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let transport = |e: reqwest::Error| BqError::Transport {
            what: what.to_owned(),
            detail: e.to_string(),
        };
        let response = request.send().await.map_err(transport)?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.map_err(transport)?;
        if let Some(h) = &self.latency {
            h.with_label_values(&[operation])
                .observe(started.elapsed().as_secs_f64());
        }
        if status == 404 {
            return Ok(None);
        }
        let json: Json = if bytes.is_empty() {
            Json::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|e| BqError::Protocol {
                what: what.to_owned(),
                detail: format!(
                    "HTTP {status}, not JSON ({e}): {}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
                ),
            })?
        };
        if (200..300).contains(&status) {
            return Ok(Some(json));
        }
        let error = &json["error"];
        let message = error["message"].as_str().unwrap_or("no message").to_owned();
        let reason = error["errors"][0]["reason"]
            .as_str()
            .or_else(|| error["status"].as_str())
            .unwrap_or("")
            .to_owned();
        Err(match status {
            401 => BqError::Auth(format!("{what}: {message}")),
            403 if !matches!(reason.as_str(), "rateLimitExceeded" | "quotaExceeded") => BqError::Permission {
                what: what.to_owned(),
                status,
                message,
            },
            _ => BqError::Status {
                what: what.to_owned(),
                status,
                reason,
                message,
            },
        })
    }

    /// Creates the dataset unless it exists.
    pub async fn ensure_dataset(&self, dataset: &str, location: &str) -> Result<(), BqError> {
        let what = format!("dataset {dataset}");
        let path = format!("/datasets/{dataset}");
        if self
            .call("datasets.get", &what, reqwest::Method::GET, &path, None)
            .await?
            .is_some()
        {
            return Ok(());
        }
        let body = json!({
            "datasetReference": {"projectId": self.project(), "datasetId": dataset},
            "location": location,
        });
        match self
            .call(
                "datasets.insert",
                &what,
                reqwest::Method::POST,
                "/datasets",
                Some(body.to_string().into_bytes()),
            )
            .await
        {
            Ok(_) => Ok(()),
            // Another instance created it meanwhile.
            Err(BqError::Status { status: 409, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// A table or view, if it exists.
    pub async fn table(&self, dataset: &str, table: &str) -> Result<Option<TableInfo>, BqError> {
        let what = format!("table {dataset}.{table}");
        let path = format!("/datasets/{dataset}/tables/{table}");
        match self
            .call("tables.get", &what, reqwest::Method::GET, &path, None)
            .await?
        {
            None => Ok(None),
            Some(json) => serde_json::from_value(json).map(Some).map_err(|e| BqError::Protocol {
                what,
                detail: e.to_string(),
            }),
        }
    }

    /// Creates a table or view from its full resource; an existing one is left alone.
    pub async fn create_table(&self, dataset: &str, resource: &Json) -> Result<(), BqError> {
        let name = resource["tableReference"]["tableId"].as_str().unwrap_or("?");
        let what = format!("creating {dataset}.{name}");
        let path = format!("/datasets/{dataset}/tables");
        match self
            .call(
                "tables.insert",
                &what,
                reqwest::Method::POST,
                &path,
                Some(resource.to_string().into_bytes()),
            )
            .await
        {
            Ok(_) | Err(BqError::Status { status: 409, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Patches a table or view (its schema, or a view's query).
    pub async fn patch_table(&self, dataset: &str, table: &str, patch: &Json) -> Result<(), BqError> {
        let what = format!("updating {dataset}.{table}");
        let path = format!("/datasets/{dataset}/tables/{table}");
        self.call(
            "tables.patch",
            &what,
            reqwest::Method::PATCH,
            &path,
            Some(patch.to_string().into_bytes()),
        )
        .await?;
        Ok(())
    }

    /// `tabledata.insertAll` of pre-serialized rows (`{"json": {...}, "insertId": ...}`
    /// objects, comma-separated). Rows BigQuery refuses are returned; the others
    /// were written (`skipInvalidRows`).
    pub async fn insert_all(&self, dataset: &str, table: &str, rows: &[&[u8]]) -> Result<Vec<Refused>, BqError> {
        let mut body = Vec::with_capacity(rows.iter().map(|r| r.len() + 1).sum::<usize>() + 64);
        body.extend_from_slice(br#"{"kind":"bigquery#tableDataInsertAllRequest","skipInvalidRows":true,"rows":["#);
        for (i, r) in rows.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(r);
        }
        body.extend_from_slice(b"]}");
        let what = format!("insert into {dataset}.{table}");
        let path = format!("/datasets/{dataset}/tables/{table}/insertAll");
        let answer = self
            .call("tabledata.insertAll", &what, reqwest::Method::POST, &path, Some(body))
            .await?
            .ok_or_else(|| BqError::Status {
                what: what.clone(),
                status: 404,
                reason: "notFound".into(),
                message: format!("table {dataset}.{table} does not exist"),
            })?;
        let mut refused = Vec::new();
        for e in answer["insertErrors"].as_array().into_iter().flatten() {
            let index = e["index"].as_u64().and_then(|i| usize::try_from(i).ok());
            let Some(index) = index.filter(|i| *i < rows.len()) else {
                return Err(BqError::Protocol {
                    what,
                    detail: format!("insert error without a valid row index: {e}"),
                });
            };
            let reasons: Vec<String> = e["errors"]
                .as_array()
                .into_iter()
                .flatten()
                // "stopped": the row was fine but not written because of another.
                .filter(|x| x["reason"].as_str() != Some("stopped"))
                .map(|x| {
                    format!(
                        "{} at {}: {}",
                        x["reason"].as_str().unwrap_or("invalid"),
                        x["location"].as_str().unwrap_or("row"),
                        x["message"].as_str().unwrap_or("")
                    )
                })
                .collect();
            if !reasons.is_empty() {
                refused.push(Refused {
                    index,
                    reason: format!("bigquery refused the row: {}", reasons.join("; ")),
                });
            }
        }
        Ok(refused)
    }

    /// Runs a standard-SQL query and returns its rows as text cells (for
    /// checks and tests; the sink itself never queries).
    pub async fn query(&self, sql: &str) -> Result<Vec<Vec<Option<String>>>, BqError> {
        let body = json!({"query": sql, "useLegacySql": false, "timeoutMs": 60000, "maxResults": 1000000});
        let what = "query".to_owned();
        let answer = self
            .call(
                "jobs.query",
                &what,
                reqwest::Method::POST,
                "/queries",
                Some(body.to_string().into_bytes()),
            )
            .await?
            .unwrap_or_default();
        if let Some(e) = answer["errors"].as_array().and_then(|e| e.first()) {
            return Err(BqError::Status {
                what,
                status: 400,
                reason: e["reason"].as_str().unwrap_or("invalidQuery").to_owned(),
                message: e["message"].as_str().unwrap_or("").to_owned(),
            });
        }
        if answer["jobComplete"].as_bool() == Some(false) {
            return Err(BqError::Protocol {
                what,
                detail: "the query did not complete in 60 s".into(),
            });
        }
        Ok(answer["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                r["f"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|c| match &c["v"] {
                        Json::Null => None,
                        Json::String(s) => Some(s.clone()),
                        other => Some(other.to_string()),
                    })
                    .collect()
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16, reason: &str) -> BqError {
        BqError::Status {
            what: "x".into(),
            status,
            reason: reason.into(),
            message: "m".into(),
        }
    }

    #[test]
    fn errors_are_classified_for_the_retry_loop() {
        assert!(status(503, "backendError").is_retriable());
        assert!(status(429, "").is_retriable());
        assert!(status(400, "rateLimitExceeded").is_retriable());
        assert!(!status(400, "invalid").is_retriable());
        assert!(status(400, "invalid").may_be_the_data());
        assert!(status(500, "internalError").may_be_the_data());
        assert!(!status(500, "backendError").may_be_the_data());
        assert!(!status(503, "backendError").may_be_the_data());
        assert!(!status(502, "").may_be_the_data());
        assert!(!status(404, "notFound").may_be_the_data());
        assert!(BqError::Auth("x".into()).is_fatal());
        assert!(BqError::Permission {
            what: "x".into(),
            status: 403,
            message: "m".into()
        }
        .is_fatal());
        assert!(!status(500, "").is_fatal());
        assert!(status(400, "invalid").reason().contains("HTTP 400 invalid: m"));
    }
}
