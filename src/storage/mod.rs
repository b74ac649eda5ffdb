//! Object storage for backups and artifacts: a local directory or an S3-compatible bucket.
//!
//! Stores work on keys relative to their root (the directory, or the bucket and prefix)
//! and describe stored objects by a location: `file:///abs/path` or `s3://bucket/key`.
//! That location is what ops.backups.db_dump_path records, so a backup stays readable
//! after the default backend changes, as long as its store is still configured.

pub mod local;
pub mod s3;

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::io::AsyncRead;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::storage::{StorageBackend, StorageSettings};

/// One piece of a streamed object, in order.
#[derive(Debug)]
pub enum UploadPart {
    Data(Bytes),
    /// Every part was sent: the object may be completed. A stream that closes without
    /// it is incomplete, and its upload is aborted.
    End,
}

/// A stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    pub location: String,
    pub size_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{operation} {location} failed: {message}")]
    Failed {
        operation: &'static str,
        location: String,
        message: String,
    },
    #[error("{location} was not found")]
    NotFound { location: String },
    #[error("upload of {location} was cancelled")]
    Cancelled { location: String },
    #[error("upload of {location} stopped before its last part; nothing was stored")]
    Incomplete { location: String },
    #[error("no configured store holds {location}")]
    UnknownLocation { location: String },
}

/// A stream of an object's bytes.
pub type ObjectReader = Pin<Box<dyn AsyncRead + Send>>;

/// A place to keep objects.
pub trait ObjectStore: Send + Sync {
    /// Location of `key` in this store.
    fn location(&self, key: &str) -> String;

    /// Key of a location in this store, or `None` when it belongs elsewhere.
    fn key_of(&self, location: &str) -> Option<String>;

    /// Size of part `number` (from 1) for [`ObjectStore::put_stream`]; every part but the
    /// last must have this size.
    fn part_size(&self, number: i32) -> usize;

    /// Stores an object from parts received in order. The object appears only after
    /// [`UploadPart::End`]; on any error, on `cancel`, or when the channel closes early,
    /// everything written so far is removed and no existing object is touched.
    fn put_stream<'a>(
        &'a self,
        key: &'a str,
        parts: mpsc::Receiver<UploadPart>,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<StoredObject, StorageError>>;

    /// Stores a small object in one piece.
    fn put<'a>(
        &'a self,
        key: &'a str,
        data: Bytes,
    ) -> BoxFuture<'a, Result<StoredObject, StorageError>>;

    /// Opens an object for reading.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<ObjectReader, StorageError>>;

    /// Deletes an object; deleting a missing object succeeds.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StorageError>>;

    /// Aborts the in-progress multipart uploads whose key starts with `key_prefix` and
    /// contains `marker`, and returns their locations. Stores without multipart uploads
    /// (the local directory) have none to abort.
    fn abort_stale_uploads<'a>(
        &'a self,
        key_prefix: &'a str,
        marker: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, StorageError>> {
        let _ = (key_prefix, marker);
        Box::pin(async { Ok(Vec::new()) })
    }
}

/// The configured stores: the default one new objects go to, and any other that may
/// hold older objects.
#[derive(Clone)]
pub struct Stores {
    pub default: Arc<dyn ObjectStore>,
    all: Vec<Arc<dyn ObjectStore>>,
}

impl Stores {
    pub fn from_settings(settings: &StorageSettings) -> Stores {
        let local: Arc<dyn ObjectStore> =
            Arc::new(local::LocalStore::new(settings.local_dir.clone()));
        let s3: Option<Arc<dyn ObjectStore>> = settings
            .s3
            .as_ref()
            .map(|s3| Arc::new(s3::S3Store::new(s3)) as Arc<dyn ObjectStore>);
        let default = match (settings.backend, &s3) {
            (StorageBackend::S3, Some(s3)) => s3.clone(),
            _ => local.clone(),
        };
        let mut all = vec![local];
        all.extend(s3);
        Stores { default, all }
    }

    /// The store holding `location`, and the object's key in it.
    pub fn resolve(&self, location: &str) -> Result<(Arc<dyn ObjectStore>, String), StorageError> {
        self.all
            .iter()
            .find_map(|store| store.key_of(location).map(|key| (store.clone(), key)))
            .ok_or_else(|| StorageError::UnknownLocation {
                location: location.to_string(),
            })
    }
}

/// A run artifact stored whole, with the digest ops.artifacts records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredArtifact {
    pub location: String,
    pub size_bytes: u64,
    /// SHA-256 of the stored bytes as `sha256:<hex>`.
    pub digest: String,
}

/// Stores a small artifact (a run's log, a deploy's evidence) in the default store.
pub async fn put_artifact(
    settings: &StorageSettings,
    key: &str,
    data: Bytes,
) -> Result<StoredArtifact, StorageError> {
    use sha2::{Digest, Sha256};

    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
    let stored = Stores::from_settings(settings)
        .default
        .put(key, data)
        .await?;
    Ok(StoredArtifact {
        location: stored.location,
        size_bytes: stored.size_bytes,
        digest,
    })
}
