//! A directory on the agent's disk.
//!
//! A streamed object is written to `<key>.partial` next to its final path and renamed
//! into place after an fsync, so a reader never sees half an object and a failed write
//! leaves nothing behind.

use std::path::{Component, Path, PathBuf};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{ObjectReader, ObjectStore, StorageError, StoredObject, UploadPart};

pub struct LocalStore {
    root: PathBuf,
}

/// Removes a partial file unless disarmed, also when the upload future is dropped.
struct PartialFile {
    path: PathBuf,
    armed: bool,
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl LocalStore {
    pub fn new(root: PathBuf) -> LocalStore {
        LocalStore { root }
    }

    /// The file of a key. Keys are relative paths without `..`, checked here so that no
    /// key can point outside the root.
    fn path(&self, key: &str) -> Result<PathBuf, StorageError> {
        let relative = Path::new(key);
        let safe = !key.is_empty()
            && relative
                .components()
                .all(|part| matches!(part, Component::Normal(_)));
        if !safe {
            return Err(self.failed("resolving", key, "key must be a relative path without '..'"));
        }
        Ok(self.root.join(relative))
    }

    fn failed(&self, operation: &'static str, key: &str, message: impl ToString) -> StorageError {
        StorageError::Failed {
            operation,
            location: self.location(key),
            message: message.to_string(),
        }
    }

    async fn write_parts(
        &self,
        key: &str,
        mut parts: mpsc::Receiver<UploadPart>,
        cancel: CancellationToken,
    ) -> Result<StoredObject, StorageError> {
        let path = self.path(key)?;
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|err| self.failed("creating the directory for", key, err))?;
        }
        let mut partial = PartialFile {
            path: path.with_extension(format!("{}.partial", extension(&path))),
            armed: true,
        };
        let mut file = tokio::fs::File::create(&partial.path)
            .await
            .map_err(|err| self.failed("creating", key, err))?;
        let mut size = 0u64;
        loop {
            let part = tokio::select! {
                part = parts.recv() => part,
                _ = cancel.cancelled() => {
                    return Err(StorageError::Cancelled { location: self.location(key) })
                }
            };
            match part {
                Some(UploadPart::Data(data)) => {
                    file.write_all(&data)
                        .await
                        .map_err(|err| self.failed("writing", key, err))?;
                    size += data.len() as u64;
                }
                Some(UploadPart::End) => break,
                None => {
                    return Err(StorageError::Incomplete {
                        location: self.location(key),
                    })
                }
            }
        }
        file.sync_all()
            .await
            .map_err(|err| self.failed("syncing", key, err))?;
        drop(file);
        tokio::fs::rename(&partial.path, &path)
            .await
            .map_err(|err| self.failed("renaming into place", key, err))?;
        partial.armed = false;
        Ok(StoredObject {
            location: self.location(key),
            size_bytes: size,
        })
    }
}

fn extension(path: &Path) -> String {
    path.extension()
        .map(|ext| ext.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Writes to a file gain nothing from larger pieces.
const LOCAL_PART_SIZE: usize = 8 * 1024 * 1024;

impl ObjectStore for LocalStore {
    fn part_size(&self, _number: i32) -> usize {
        LOCAL_PART_SIZE
    }

    fn location(&self, key: &str) -> String {
        format!("file://{}", self.root.join(key).display())
    }

    fn key_of(&self, location: &str) -> Option<String> {
        let path = Path::new(location.strip_prefix("file://")?);
        let key = path.strip_prefix(&self.root).ok()?;
        Some(key.to_string_lossy().into_owned())
    }

    fn put_stream<'a>(
        &'a self,
        key: &'a str,
        parts: mpsc::Receiver<UploadPart>,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<StoredObject, StorageError>> {
        Box::pin(self.write_parts(key, parts, cancel))
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        data: Bytes,
    ) -> BoxFuture<'a, Result<StoredObject, StorageError>> {
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(2);
            tx.send(UploadPart::Data(data))
                .await
                .expect("receiver is alive");
            tx.send(UploadPart::End).await.expect("receiver is alive");
            self.write_parts(key, rx, CancellationToken::new()).await
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<ObjectReader, StorageError>> {
        Box::pin(async move {
            let path = self.path(key)?;
            match tokio::fs::File::open(&path).await {
                Ok(file) => Ok(Box::pin(file) as ObjectReader),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                    Err(StorageError::NotFound {
                        location: self.location(key),
                    })
                }
                Err(err) => Err(self.failed("opening", key, err)),
            }
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            let path = self.path(key)?;
            match tokio::fs::remove_file(&path).await {
                Ok(()) => Ok(()),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(err) => Err(self.failed("deleting", key, err)),
            }
        })
    }
}
