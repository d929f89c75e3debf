//! The lake's target, from its URL, as an object store: a local folder,
//! Amazon S3 or an S3-compatible store, or Google Cloud Storage. Credentials
//! come the usual way for each cloud (the environment, a profile's web
//! identity, the instance metadata; for Google a service-account key or
//! Application Default Credentials) and are never logged.

use std::path::PathBuf;
use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::ObjectStore;

/// Where the lake is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A local folder (created when missing).
    Local(PathBuf),
    /// `s3://<bucket>/<prefix>`: Amazon S3, or an S3-compatible store at
    /// `AWS_ENDPOINT` (with `AWS_ALLOW_HTTP=true` for plain HTTP).
    S3 { bucket: String, prefix: String },
    /// `gs://<bucket>/<prefix>`: Google Cloud Storage.
    Gcs { bucket: String, prefix: String },
}

impl std::str::FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let cloud = |rest: &str| -> Result<(String, String), String> {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!("{s:?}: no bucket"));
            }
            Ok((bucket.to_owned(), prefix.trim_matches('/').to_owned()))
        };
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = cloud(rest)?;
            Ok(Target::S3 { bucket, prefix })
        } else if let Some(rest) = s.strip_prefix("gs://") {
            let (bucket, prefix) = cloud(rest)?;
            Ok(Target::Gcs { bucket, prefix })
        } else if let Some(path) = s.strip_prefix("file://") {
            Ok(Target::Local(PathBuf::from(path)))
        } else if s.contains("://") {
            Err(format!(
                "{s:?}: unknown target; expected a folder, file://<folder>, s3://<bucket>/<prefix> or gs://<bucket>/<prefix>"
            ))
        } else if s.is_empty() {
            Err("the target is empty".into())
        } else {
            Ok(Target::Local(PathBuf::from(s)))
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Local(path) => write!(f, "{}", path.display()),
            Target::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            Target::Gcs { bucket, prefix } => write!(f, "gs://{bucket}/{prefix}"),
        }
    }
}

/// Why the target could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("lake folder {0}: {1}")]
    Folder(PathBuf, std::io::Error),
    #[error("lake target {target}: {source}")]
    Store {
        target: String,
        #[source]
        source: object_store::Error,
    },
}

/// Opens the target: a store whose paths are relative to the lake's root.
pub fn open(target: &Target) -> Result<Arc<dyn ObjectStore>, StoreError> {
    let failed = |source| StoreError::Store {
        target: target.to_string(),
        source,
    };
    let (store, prefix): (Arc<dyn ObjectStore>, &str) = match target {
        Target::Local(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Folder(dir.clone(), e))?;
            let local = LocalFileSystem::new_with_prefix(dir).map_err(failed)?;
            (Arc::new(local), "")
        }
        Target::S3 { bucket, prefix } => {
            let s3 = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map_err(failed)?;
            (Arc::new(s3), prefix)
        }
        Target::Gcs { bucket, prefix } => {
            let gcs = GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map_err(failed)?;
            (Arc::new(gcs), prefix)
        }
    };
    Ok(if prefix.is_empty() {
        store
    } else {
        Arc::new(PrefixStore::new(store, Path::from(prefix)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_folders_or_buckets_with_a_prefix() {
        let t = |s: &str| s.parse::<Target>();
        assert_eq!(t(".local/lake"), Ok(Target::Local(".local/lake".into())));
        assert_eq!(t("file:///data/lake"), Ok(Target::Local("/data/lake".into())));
        assert_eq!(
            t("s3://my-bucket/tickpipe/lake/"),
            Ok(Target::S3 {
                bucket: "my-bucket".into(),
                prefix: "tickpipe/lake".into()
            })
        );
        assert_eq!(
            t("gs://lake"),
            Ok(Target::Gcs {
                bucket: "lake".into(),
                prefix: String::new()
            })
        );
        assert!(t("s3:///x").is_err_and(|e| e.contains("no bucket")));
        assert!(t("hdfs://x/y").is_err_and(|e| e.contains("unknown target")));
        assert!(t("").is_err());
    }
}
