//! Fetching a backup archive and verifying its SHA-256 before anything is restored.
//!
//! A backup in the local store is read where it is. A backup in a bucket is downloaded
//! to the agent's work directory, because restoring needs random access to the zip.
//! The copy is removed when the restore ends.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::storage::Stores;
use crate::workflows::backup::job::human_bytes;
use crate::workflows::backup::{BackupRecord, Job};

/// A verified archive on local disk; a downloaded copy is deleted on drop.
pub struct FetchedArchive {
    pub path: PathBuf,
    downloaded: bool,
}

impl Drop for FetchedArchive {
    fn drop(&mut self) {
        if self.downloaded {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Makes the backup's archive available locally and checks it against the digest
/// recorded when it was made.
pub async fn fetch_verified(job: &Job, backup: &BackupRecord) -> anyhow::Result<FetchedArchive> {
    let location = backup
        .db_dump_path
        .as_deref()
        .with_context(|| format!("backup {} has no stored archive", backup.backup_id))?;
    let expected = backup
        .digest
        .as_deref()
        .and_then(|digest| digest.strip_prefix("sha256:"))
        .with_context(|| format!("backup {} has no sha256 digest to verify", backup.backup_id))?;

    let archive = match location.strip_prefix("file://") {
        Some(path) => FetchedArchive {
            path: PathBuf::from(path),
            downloaded: false,
        },
        None => download(job, location, backup).await?,
    };
    job.reporter
        .info(format!("Verifying the checksum of {location}"))
        .await;
    let actual = sha256_file(&archive.path).await?;
    if actual != expected {
        bail!("checksum mismatch for {location}: expected sha256:{expected}, found sha256:{actual}; the archive is corrupt or was replaced");
    }
    Ok(archive)
}

async fn download(
    job: &Job,
    location: &str,
    backup: &BackupRecord,
) -> anyhow::Result<FetchedArchive> {
    let stores = Stores::from_settings(&job.settings.storage);
    let (store, key) = stores.resolve(location)?;
    let dir = job.settings.agent.work_dir.join("restores");
    tokio::fs::create_dir_all(&dir)
        .await
        .with_context(|| format!("creating {} failed", dir.display()))?;
    let archive = FetchedArchive {
        path: dir.join(format!("{}.zip", backup.backup_id.simple())),
        downloaded: true,
    };

    job.reporter
        .info(format!(
            "Downloading {location} ({}) to {}",
            human_bytes(backup.size_bytes.unwrap_or(0) as u64),
            archive.path.display()
        ))
        .await;
    let mut reader = store.get(&key).await?;
    let mut file = tokio::fs::File::create(&archive.path)
        .await
        .with_context(|| format!("creating {} failed", archive.path.display()))?;

    let mut buf = vec![0u8; 1 << 20];
    loop {
        let read = tokio::select! {
            read = reader.read(&mut buf) => read.with_context(|| format!("downloading {location} failed"))?,
            _ = job.cancel.cancelled() => bail!("download of {location} was cancelled"),
        };
        if read == 0 {
            break;
        }
        file.write_all(&buf[..read])
            .await
            .with_context(|| format!("writing {} failed", archive.path.display()))?;
    }
    file.flush().await?;
    Ok(archive)
}

/// Hex SHA-256 of a file, computed on a blocking thread.
pub async fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(&path)
            .with_context(|| format!("opening {} failed", path.display()))?;
        let mut hasher = Sha256::new();
        std::io::copy(&mut file, &mut hasher)
            .with_context(|| format!("reading {} failed", path.display()))?;
        Ok(hex::encode(hasher.finalize()))
    })
    .await
    .context("the checksum thread panicked")?
}
