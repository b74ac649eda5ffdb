//! The artifact store: where run logs, backups and other files produced by runs are kept.
//!
//! Workflows see only the [`ArtifactStore`] trait. Objects are named by a key, a relative
//! `/`-separated path such as `<run_id>/build.log.gz`; [`ArtifactStore::location`] turns
//! a key into the address recorded in ops.artifacts.storage_path (`file:///...` for the
//! local backend). [`open`] builds the backend that the `[storage]` config section selects.

mod local;

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::io::AsyncRead;

use crate::config::{StorageBackend, StorageSettings};
pub use local::LocalStore;

/// A byte stream handed to or returned by a store.
pub type ByteReader = Pin<Box<dyn AsyncRead + Send>>;

/// What a store reports about an object it wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    /// The address to record in ops.artifacts.storage_path.
    pub location: String,
    pub size_bytes: u64,
    /// SHA-256 of the stored bytes as `sha256:<hex>`, the form ops.artifacts.digest uses.
    pub digest: String,
}

/// Why a store operation failed. Variants name the key or location, never credentials.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("invalid storage key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    #[error("object {location} not found")]
    NotFound { location: String },
    #[error("{operation} {location} failed: {source}")]
    Io {
        operation: &'static str,
        location: String,
        source: std::io::Error,
    },
    /// An error reported by a remote backend such as S3.
    #[error("{operation} {location} failed: {message}")]
    Backend {
        operation: &'static str,
        location: String,
        message: String,
    },
}

/// A place to keep the files that runs produce.
///
/// Writes are atomic: a reader sees either no object or the whole object, never a part of
/// one, and a failed write leaves nothing behind under the key.
pub trait ArtifactStore: Send + Sync + 'static {
    /// Stores everything `body` yields under `key`, replacing an existing object.
    fn put_stream<'a>(
        &'a self,
        key: &'a str,
        body: ByteReader,
    ) -> BoxFuture<'a, Result<StoredObject, StorageError>>;

    /// Stores the file at `path` under `key`, replacing an existing object.
    fn put_file<'a>(
        &'a self,
        key: &'a str,
        path: &'a Path,
    ) -> BoxFuture<'a, Result<StoredObject, StorageError>>;

    /// Opens the object under `key` for reading; [`StorageError::NotFound`] when absent.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<ByteReader, StorageError>>;

    /// Deletes the object under `key`. Deleting an absent object succeeds.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StorageError>>;

    /// Returns the address of `key` as recorded in ops.artifacts.storage_path.
    fn location(&self, key: &str) -> String;
}

/// Opens the store that the settings select.
pub fn open(settings: &StorageSettings) -> Result<Arc<dyn ArtifactStore>, StorageError> {
    match &settings.backend {
        StorageBackend::Local { dir } => Ok(Arc::new(LocalStore::new(dir.clone()))),
    }
}

/// Checks that a key is a relative path of plain names: no empty, `.` or `..` segment, no
/// leading or trailing `/`, no backslash or control character, at most 1024 bytes (the
/// S3 limit). Both backends apply it, so a key valid for one is valid for the other.
pub fn validate_key(key: &str) -> Result<(), StorageError> {
    let invalid = |reason| StorageError::InvalidKey {
        key: key.to_string(),
        reason,
    };
    if key.is_empty() || key.len() > 1024 {
        return Err(invalid("must be 1 to 1024 bytes long"));
    }
    if key.chars().any(|c| c.is_control() || c == '\\') {
        return Err(invalid(
            "must not contain control characters or backslashes",
        ));
    }
    if key
        .split('/')
        .any(|segment| matches!(segment, "" | "." | ".."))
    {
        return Err(invalid(
            "must be a relative path without empty, . or .. segments",
        ));
    }
    Ok(())
}

/// Joins a validated key to a directory.
fn key_path(root: &Path, key: &str) -> Result<PathBuf, StorageError> {
    validate_key(key)?;
    Ok(root.join(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_log_key_is_valid() {
        assert!(validate_key("3f2c/build.log.gz").is_ok());
    }

    #[test]
    fn keys_escaping_the_root_are_rejected() {
        for key in [
            "../etc/passwd",
            "a/../../b",
            "/abs",
            "a//b",
            "a/",
            ".",
            "a/./b",
            "",
        ] {
            let err = validate_key(key).unwrap_err();
            assert!(
                matches!(err, StorageError::InvalidKey { .. }),
                "{key:?}: {err}"
            );
        }
    }

    #[test]
    fn control_characters_and_backslashes_are_rejected() {
        assert!(validate_key("a\nb").is_err());
        assert!(validate_key("a\\b").is_err());
    }

    #[test]
    fn overlong_key_is_rejected() {
        assert!(validate_key(&"a".repeat(1025)).is_err());
        assert!(validate_key(&"a".repeat(1024)).is_ok());
    }
}
