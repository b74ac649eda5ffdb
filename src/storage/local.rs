//! The local-directory backend: each key is a file under one root directory.

use std::path::{Path, PathBuf};

use futures_util::future::BoxFuture;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{key_path, ArtifactStore, ByteReader, StorageError, StoredObject};

/// Copy buffer size: large enough that a multi-gigabyte backup needs few system calls.
const COPY_BUFFER_BYTES: usize = 256 * 1024;

/// Objects stored as files under `root`, created with mode 0600 because backups hold
/// whole databases. A write goes to a temporary file next to its target and is renamed
/// into place once complete and synced, so readers never see a partial object.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    pub fn new(root: PathBuf) -> LocalStore {
        LocalStore { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn io_error(
        &self,
        operation: &'static str,
        path: &Path,
        source: std::io::Error,
    ) -> StorageError {
        StorageError::Io {
            operation,
            location: file_location(path),
            source,
        }
    }

    async fn write(&self, key: &str, mut body: ByteReader) -> Result<StoredObject, StorageError> {
        let target = key_path(&self.root, key)?;
        let parent = target.parent().expect("a key path has a parent");
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|err| self.io_error("creating directory", parent, err))?;

        let file_name = target.file_name().expect("a key path has a file name");
        let temporary = parent.join(format!(
            ".{}.tmp-{}",
            file_name.to_string_lossy(),
            uuid::Uuid::new_v4().simple()
        ));
        let result = self.copy_into(&temporary, &mut body).await;
        let (size_bytes, digest) = match result {
            Ok(written) => written,
            Err(err) => {
                let _ = tokio::fs::remove_file(&temporary).await;
                return Err(err);
            }
        };
        if let Err(err) = tokio::fs::rename(&temporary, &target).await {
            let _ = tokio::fs::remove_file(&temporary).await;
            return Err(self.io_error("renaming into", &target, err));
        }
        Ok(StoredObject {
            location: file_location(&target),
            size_bytes,
            digest,
        })
    }

    /// Copies `body` into a new file at `path` and syncs it; returns its size and digest.
    async fn copy_into(
        &self,
        path: &Path,
        body: &mut ByteReader,
    ) -> Result<(u64, String), StorageError> {
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .await
            .map_err(|err| self.io_error("creating", path, err))?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut buffer = vec![0u8; COPY_BUFFER_BYTES];
        loop {
            let read = body
                .read(&mut buffer)
                .await
                .map_err(|err| self.io_error("reading the source for", path, err))?;
            if read == 0 {
                break;
            }
            hasher.update(&buffer[..read]);
            file.write_all(&buffer[..read])
                .await
                .map_err(|err| self.io_error("writing", path, err))?;
            size += read as u64;
        }
        file.sync_all()
            .await
            .map_err(|err| self.io_error("syncing", path, err))?;
        Ok((size, format!("sha256:{}", hex::encode(hasher.finalize()))))
    }
}

fn file_location(path: &Path) -> String {
    format!("file://{}", path.display())
}

impl ArtifactStore for LocalStore {
    fn put_stream<'a>(
        &'a self,
        key: &'a str,
        body: ByteReader,
    ) -> BoxFuture<'a, Result<StoredObject, StorageError>> {
        Box::pin(self.write(key, body))
    }

    fn put_file<'a>(
        &'a self,
        key: &'a str,
        path: &'a Path,
    ) -> BoxFuture<'a, Result<StoredObject, StorageError>> {
        Box::pin(async move {
            let file = tokio::fs::File::open(path)
                .await
                .map_err(|err| self.io_error("opening", path, err))?;
            self.write(key, Box::pin(file)).await
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<ByteReader, StorageError>> {
        Box::pin(async move {
            let path = key_path(&self.root, key)?;
            match tokio::fs::File::open(&path).await {
                Ok(file) => Ok(Box::pin(file) as ByteReader),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                    Err(StorageError::NotFound {
                        location: file_location(&path),
                    })
                }
                Err(err) => Err(self.io_error("opening", &path, err)),
            }
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            let path = key_path(&self.root, key)?;
            match tokio::fs::remove_file(&path).await {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(err) => return Err(self.io_error("deleting", &path, err)),
            }
            self.remove_empty_parents(&path).await;
            Ok(())
        })
    }

    fn location(&self, key: &str) -> String {
        file_location(&self.root.join(key))
    }
}

impl LocalStore {
    /// Removes the directories between `path` and the root that became empty, so deleting
    /// a run's last object also deletes the run's directory. A directory that is not empty
    /// stops the walk.
    async fn remove_empty_parents(&self, path: &Path) {
        let mut current = path.parent();
        while let Some(dir) = current {
            if dir == self.root || !dir.starts_with(&self.root) {
                break;
            }
            if tokio::fs::remove_dir(dir).await.is_err() {
                break;
            }
            current = dir.parent();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, LocalStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().join("artifacts"));
        (dir, store)
    }

    async fn read_all(store: &LocalStore, key: &str) -> Vec<u8> {
        let mut reader = store.get(key).await.unwrap();
        let mut bytes = Vec::new();
        reader.read_to_end(&mut bytes).await.unwrap();
        bytes
    }

    #[tokio::test]
    async fn stream_round_trips_with_size_and_digest() {
        let (_dir, store) = store();
        let body: ByteReader = Box::pin(&b"hello"[..]);
        let stored = store.put_stream("run-1/build.log.gz", body).await.unwrap();

        assert_eq!(stored.size_bytes, 5);
        assert_eq!(
            stored.digest,
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert!(
            stored.location.starts_with("file://"),
            "{}",
            stored.location
        );
        assert!(stored.location.ends_with("/artifacts/run-1/build.log.gz"));
        assert_eq!(read_all(&store, "run-1/build.log.gz").await, b"hello");
    }

    #[tokio::test]
    async fn file_is_copied_and_source_kept() {
        let (dir, store) = store();
        let source = dir.path().join("dump");
        std::fs::write(&source, b"dump bytes").unwrap();
        let stored = store.put_file("run-2/db.dump", &source).await.unwrap();

        assert_eq!(stored.size_bytes, 10);
        assert!(source.exists());
        assert_eq!(read_all(&store, "run-2/db.dump").await, b"dump bytes");
    }

    #[tokio::test]
    async fn stored_file_is_private_to_the_owner() {
        use std::os::unix::fs::PermissionsExt;
        let (_dir, store) = store();
        store.put_stream("k/f", Box::pin(&b"x"[..])).await.unwrap();
        let mode = std::fs::metadata(store.root().join("k/f"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[tokio::test]
    async fn missing_object_is_not_found() {
        let (_dir, store) = store();
        let err = store.get("nothing/here").await.err().unwrap();
        assert!(matches!(err, StorageError::NotFound { .. }), "{err}");
    }

    #[tokio::test]
    async fn delete_removes_object_and_empty_run_directory() {
        let (_dir, store) = store();
        store
            .put_stream("run-3/a", Box::pin(&b"a"[..]))
            .await
            .unwrap();
        store.delete("run-3/a").await.unwrap();

        assert!(!store.root().join("run-3").exists());
        assert!(store.root().exists());
        store.delete("run-3/a").await.unwrap();
    }

    #[tokio::test]
    async fn failed_source_leaves_no_object_or_temporary_file() {
        let (_dir, store) = store();
        let failing = tokio::io::BufReader::new(FailingReader);
        let err = store
            .put_stream("run-4/x", Box::pin(failing))
            .await
            .unwrap_err();

        assert!(matches!(err, StorageError::Io { .. }), "{err}");
        let leftovers: Vec<_> = std::fs::read_dir(store.root().join("run-4"))
            .unwrap()
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[tokio::test]
    async fn key_with_parent_segment_is_rejected_before_touching_disk() {
        let (_dir, store) = store();
        let err = store
            .put_stream("../escape", Box::pin(&b"x"[..]))
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::InvalidKey { .. }), "{err}");
        assert!(!store.root().exists());
    }

    struct FailingReader;

    impl tokio::io::AsyncRead for FailingReader {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            _buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Err(std::io::Error::other("source broke")))
        }
    }
}
