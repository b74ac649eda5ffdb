//! Loading an archive: dump.sql into a new database through psql, and filestore/ into a
//! directory that appears under its final name only when complete.

use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::archive::ArchiveReader;
use crate::workflows::backup::process::PgRunner;

/// dump.sql is fed to psql in pieces of this size.
const SCRIPT_CHUNK: usize = 256 * 1024;

/// Opens an archive on a blocking thread.
pub async fn open_archive(path: &Path) -> anyhow::Result<Arc<ArchiveReader>> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        ArchiveReader::open(&path)
            .with_context(|| format!("reading the zip {} failed", path.display()))
    })
    .await
    .context("the archive thread panicked")?
    .map(Arc::new)
}

/// Reads manifest.json from the archive.
pub fn read_manifest(archive: &ArchiveReader) -> anyhow::Result<serde_json::Value> {
    let entry = archive
        .entry("manifest.json")
        .context("the archive has no manifest.json")?;
    let mut text = String::new();
    archive
        .open_entry(entry)?
        .read_to_string(&mut text)
        .context("reading manifest.json failed")?;
    serde_json::from_str(&text).context("manifest.json is not valid JSON")
}

/// Runs dump.sql from the archive into the existing empty database `db`.
pub async fn load_dump(
    pg: &PgRunner,
    archive: Arc<ArchiveReader>,
    db: &str,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let entry = archive
        .entry("dump.sql")
        .context("the archive has no dump.sql")?
        .clone();
    let mut psql = pg.start_script(db).await?;
    let mut stdin = psql.stdin.take().expect("psql stdin is piped");
    let (tx, mut rx) = mpsc::channel::<std::io::Result<Bytes>>(8);
    let reader = tokio::task::spawn_blocking(move || {
        let mut contents = match archive.open_entry(&entry) {
            Ok(contents) => contents,
            Err(err) => return tx.blocking_send(Err(err)).map_err(|_| ()),
        };
        loop {
            if stop.load(Ordering::Relaxed) {
                return Err(());
            }
            let mut chunk = vec![0u8; SCRIPT_CHUNK];
            match contents.read(&mut chunk) {
                Ok(0) => return Ok(()),
                Ok(read) => {
                    chunk.truncate(read);
                    tx.blocking_send(Ok(Bytes::from(chunk))).map_err(|_| ())?;
                }
                Err(err) => return tx.blocking_send(Err(err)).map_err(|_| ()),
            }
        }
    });

    let mut fed = Ok(());
    while let Some(chunk) = rx.recv().await {
        let written = match chunk {
            Ok(data) => stdin
                .write_all(&data)
                .await
                .map_err(|err| anyhow!("psql stopped reading: {err}")),
            Err(err) => Err(anyhow!("reading dump.sql from the archive failed: {err}")),
        };
        if let Err(err) = written {
            fed = Err(err);
            break;
        }
    }
    drop(rx);
    let _ = stdin.shutdown().await;
    drop(stdin);
    let _ = reader.await;
    let exited = psql.wait().await;
    // psql's own error explains a broken pipe better than the pipe does.
    exited.context("loading dump.sql with psql failed")?;
    fed
}

/// Extracts every `filestore/` entry into `<root>/<name>`, through a staging directory
/// renamed into place at the end. Returns the number of files.
pub async fn extract_filestore(
    archive: Arc<ArchiveReader>,
    root: PathBuf,
    name: String,
    owner: Option<(u32, u32)>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<u64> {
    tokio::task::spawn_blocking(move || extract_blocking(&archive, &root, &name, owner, &stop))
        .await
        .context("the extraction thread panicked")?
}

fn extract_blocking(
    archive: &ArchiveReader,
    root: &Path,
    name: &str,
    owner: Option<(u32, u32)>,
    stop: &AtomicBool,
) -> anyhow::Result<u64> {
    let target = root.join(name);
    if target.exists() {
        bail!("filestore {} already exists", target.display());
    }
    let staging = root.join(format!(".{name}.partial"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)
        .with_context(|| format!("creating {} failed", staging.display()))?;
    let result = extract_entries(archive, &staging, owner, stop);
    match result {
        Ok(files) => {
            std::fs::rename(&staging, &target).with_context(|| {
                format!(
                    "renaming {} to {} failed",
                    staging.display(),
                    target.display()
                )
            })?;
            chown(&target, owner)?;
            Ok(files)
        }
        Err(err) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(err)
        }
    }
}

fn extract_entries(
    archive: &ArchiveReader,
    staging: &Path,
    owner: Option<(u32, u32)>,
    stop: &AtomicBool,
) -> anyhow::Result<u64> {
    let mut files = 0;
    for entry in archive.entries() {
        let Some(relative) = entry.name.strip_prefix("filestore/") else {
            continue;
        };
        if relative.is_empty() || relative.ends_with('/') {
            continue;
        }
        if stop.load(Ordering::Relaxed) {
            bail!("the restore was stopped");
        }
        let path = safe_join(staging, relative)?;
        if let Some(parent) = path.parent() {
            if !parent.exists() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {} failed", parent.display()))?;
                chown(parent, owner)?;
            }
        }
        let mut out = std::fs::File::create(&path)
            .with_context(|| format!("creating {} failed", path.display()))?;
        std::io::copy(&mut archive.open_entry(entry)?, &mut out)
            .with_context(|| format!("extracting {} failed", entry.name))?;
        chown(&path, owner)?;
        files += 1;
    }
    Ok(files)
}

/// Joins an archive path below `root`, rejecting absolute paths and `..`.
fn safe_join(root: &Path, relative: &str) -> anyhow::Result<PathBuf> {
    let path = Path::new(relative);
    if !path
        .components()
        .all(|part| matches!(part, Component::Normal(_)))
    {
        bail!("archive entry filestore/{relative} points outside the filestore");
    }
    Ok(root.join(path))
}

fn chown(path: &Path, owner: Option<(u32, u32)>) -> anyhow::Result<()> {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).with_context(|| {
            format!(
                "changing the owner of {} to {uid}:{gid} failed",
                path.display()
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_paths_outside_the_filestore_are_rejected() {
        let root = Path::new("/srv/filestore/db");
        assert!(safe_join(root, "../etc/passwd").is_err());
        assert!(safe_join(root, "/etc/passwd").is_err());
        assert!(safe_join(root, "ab/../../x").is_err());
        assert_eq!(
            safe_join(root, "ab/abcdef").unwrap(),
            root.join("ab/abcdef")
        );
    }
}
