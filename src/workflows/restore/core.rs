//! One restore from start to recorded result: fetch and verify the archive, load it
//! into a database that did not exist, extract the filestore, neutralize, verify, and
//! then keep it (restore), swap it in (replace) or drop it (drill).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::fetch::fetch_verified;
use super::load::{extract_filestore, load_dump, open_archive, read_manifest};
use super::neutralize::neutralize;
use super::records::{self, RestoreKind};
use super::verify;
use crate::workflows::backup::pg::validate_db_name;
use crate::workflows::backup::process::PgRunner;
use crate::workflows::backup::{BackupRecord, EnvironmentRow, Job};

/// A restore to run: which backup, into which database of which environment.
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    /// The environment whose database server and data directory receive the restore.
    pub env: EnvironmentRow,
    pub backup: BackupRecord,
    pub target_db: String,
    pub kind: RestoreKind,
    pub neutralize: bool,
}

/// A finished restore.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub restore_id: Uuid,
    pub backup_id: Uuid,
    pub target_db: String,
    pub neutralized: bool,
    pub filestore_files: u64,
    pub checks: Value,
    pub elapsed_s: f64,
}

/// Runs a restore and records it in ops.restores.
pub async fn restore(job: &Job, request: RestoreRequest) -> anyhow::Result<RestoreReport> {
    validate_db_name(&request.target_db)?;
    if request.backup.status != "success" {
        bail!(
            "backup {} is {}; only a successful backup can be restored",
            request.backup.backup_id,
            request.backup.status
        );
    }
    let restore_id = records::start(
        &job.pool,
        &request.env,
        request.backup.backup_id,
        job.run_id,
        request.kind,
        &request.target_db,
    )
    .await?;
    let started = Instant::now();
    tracing::info!(restore.id = %restore_id, backup.id = %request.backup.backup_id, kind = request.kind.as_str(), "restore started");
    let outcome = execute(job, &request, restore_id).await;
    let elapsed_s = started.elapsed().as_secs_f64();
    match outcome {
        Ok((checks, files)) => {
            records::finish(&job.pool, restore_id, request.neutralize, &checks, None).await?;
            tracing::info!(restore.id = %restore_id, elapsed_s, "restore finished");
            Ok(RestoreReport {
                restore_id,
                backup_id: request.backup.backup_id,
                target_db: request.target_db,
                neutralized: request.neutralize,
                filestore_files: files,
                checks,
                elapsed_s,
            })
        }
        Err(err) => {
            let message = format!("{err:#}");
            tracing::warn!(restore.id = %restore_id, error = %message, "restore failed");
            if let Err(record_err) =
                records::finish(&job.pool, restore_id, false, &json!({}), Some(&message)).await
            {
                tracing::error!(restore.id = %restore_id, error = %format!("{record_err:#}"), "recording the failure failed");
            }
            Err(err)
        }
    }
}

/// Returns the directory for restored filestores: Odoo's data directory, or the work
/// directory for drills so that a drill never writes next to the environment's own.
fn filestore_root(job: &Job, request: &RestoreRequest) -> PathBuf {
    match request.kind {
        RestoreKind::Drill => job.settings.agent.work_dir.join("drills"),
        _ => job
            .settings
            .backup
            .for_env(&request.env.env_id)
            .data_dir
            .join("filestore"),
    }
}

/// Builds the name of a database that stands in for the target during a replacement.
fn staging_name(target: &str, restore_id: Uuid, suffix: &str) -> String {
    let id = restore_id.simple().to_string();
    let keep = target.len().min(63 - suffix.len() - 9);
    format!("{}_{suffix}{}", &target[..keep], &id[..8])
}

async fn execute(
    job: &Job,
    request: &RestoreRequest,
    restore_id: Uuid,
) -> anyhow::Result<(Value, u64)> {
    let pg = job.pg_runner(&request.env.env_id).await?;
    let root = filestore_root(job, request);
    let target = &request.target_db;
    if request.kind != RestoreKind::Replace {
        reject_existing(&pg, &root, target).await?;
    }
    let load_db = match request.kind {
        RestoreKind::Replace => staging_name(target, restore_id, "restoring"),
        _ => target.clone(),
    };

    let archive_file = fetch_verified(job, &request.backup).await?;
    let archive = open_archive(&archive_file.path).await?;
    let manifest = read_manifest(&archive)?;

    let loaded = load(job, &pg, request, archive, &root, &load_db).await;
    let mut checks = match loaded {
        Ok(found) => found,
        Err(err) => {
            discard(&pg, &root, &load_db).await;
            return Err(err);
        }
    };
    drop(archive_file);
    let verified =
        verify::row_counts(&pg, &load_db, &manifest, request.kind == RestoreKind::Drill).await;
    let (rows, files) = match verified {
        Ok(rows) => (rows, checks["filestore_files"].as_u64().unwrap_or(0)),
        Err(err) => {
            discard(&pg, &root, &load_db).await;
            return Err(err);
        }
    };
    checks["rows"] = rows;
    match request.kind {
        RestoreKind::Restore => {}
        RestoreKind::Replace => replace(job, &pg, &root, &load_db, target, restore_id).await?,
        RestoreKind::Drill => {
            let attachments = verify::attachments(&pg, &load_db, &root.join(&load_db)).await;
            discard(&pg, &root, &load_db).await;
            checks["attachments"] = attachments?;
            job.reporter
                .info(format!("Dropped scratch database {load_db}"))
                .await;
        }
    }
    Ok((checks, files))
}

async fn reject_existing(pg: &PgRunner, root: &Path, target: &str) -> anyhow::Result<()> {
    if pg.database_exists(target).await? {
        bail!(
            "database {target} already exists on {}; choose another target_db, or set \
             overwrite to replace it",
            pg.describe()
        );
    }
    let dir = root.join(target);
    if tokio::fs::metadata(&dir).await.is_ok() {
        bail!(
            "filestore {} already exists; remove it or choose another target_db",
            dir.display()
        );
    }
    Ok(())
}

/// Creates `load_db`, loads the dump and the filestore, and neutralizes when asked.
async fn load(
    job: &Job,
    pg: &PgRunner,
    request: &RestoreRequest,
    archive: Arc<crate::archive::ArchiveReader>,
    root: &Path,
    load_db: &str,
) -> anyhow::Result<Value> {
    let stop = Arc::new(AtomicBool::new(false));
    let stop_on_cancel = stop.clone();
    let cancel = job.cancel.clone();
    let watcher = tokio::spawn(async move {
        cancel.cancelled().await;
        stop_on_cancel.store(true, std::sync::atomic::Ordering::Relaxed);
    });

    pg.create_database(load_db).await?;
    job.reporter
        .info(format!(
            "Loading dump.sql into {load_db} with psql on {}",
            pg.describe()
        ))
        .await;
    let started = Instant::now();
    load_dump(pg, archive.clone(), load_db, stop.clone()).await?;
    job.reporter
        .info(format!(
            "Loaded dump.sql in {:.1} s",
            started.elapsed().as_secs_f64()
        ))
        .await;

    tokio::fs::create_dir_all(root)
        .await
        .with_context(|| format!("creating {} failed", root.display()))?;
    let owner = job
        .settings
        .backup
        .for_env(&request.env.env_id)
        .filestore_owner;
    let owner = if request.kind == RestoreKind::Drill {
        None
    } else {
        owner
    };
    let files = extract_filestore(
        archive,
        root.to_path_buf(),
        load_db.to_string(),
        owner,
        stop,
    )
    .await?;
    job.reporter
        .info(format!(
            "Extracted {files} filestore files to {}",
            root.join(load_db).display()
        ))
        .await;
    watcher.abort();

    let mut checks = json!({ "filestore_files": files });
    if request.neutralize {
        let env_settings = job.settings.backup.for_env(&request.env.env_id);
        checks["neutralization"] = neutralize(job, pg, env_settings, load_db).await?;
    }
    Ok(checks)
}

/// Drops a database and filestore made by this restore; failures are only logged
/// because the restore is already failing or finished.
async fn discard(pg: &PgRunner, root: &Path, db: &str) {
    if let Err(err) = pg.drop_database(db).await {
        tracing::error!(db, error = %err, "dropping the restored database failed");
    }
    let dir = root.join(db);
    if let Err(err) = tokio::fs::remove_dir_all(&dir).await {
        if err.kind() != std::io::ErrorKind::NotFound {
            tracing::error!(path = %dir.display(), error = %err, "removing the restored filestore failed");
        }
    }
}

/// Swaps the loaded database and filestore in for the target's, then drops the old ones.
async fn replace(
    job: &Job,
    pg: &PgRunner,
    root: &Path,
    load_db: &str,
    target: &str,
    restore_id: Uuid,
) -> anyhow::Result<()> {
    let old = staging_name(target, restore_id, "replaced");
    let had_target = pg.database_exists(target).await?;
    if had_target {
        pg.rename_database(target, &old).await?;
    }
    if let Err(err) = pg.rename_database(load_db, target).await {
        if had_target {
            let _ = pg.rename_database(&old, target).await;
        }
        return Err(err).context("putting the restored database in place failed");
    }
    let (target_dir, old_dir) = (root.join(target), root.join(&old));
    let had_filestore = tokio::fs::metadata(&target_dir).await.is_ok();
    if had_filestore {
        tokio::fs::rename(&target_dir, &old_dir)
            .await
            .with_context(|| format!("moving {} aside failed", target_dir.display()))?;
    }
    tokio::fs::rename(root.join(load_db), &target_dir)
        .await
        .with_context(|| {
            format!(
                "putting the restored filestore at {} failed",
                target_dir.display()
            )
        })?;
    job.reporter
        .info(format!("Replaced database {target} and its filestore"))
        .await;
    if had_target {
        discard(pg, root, &old).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_names_stay_within_63_characters() {
        let id = Uuid::new_v4();
        let long = "a".repeat(63);
        let name = staging_name(&long, id, "restoring");
        assert!(name.len() <= 63, "{name}");
        assert!(validate_db_name(&name).is_ok());
        assert!(staging_name("odoo_prod", id, "replaced").starts_with("odoo_prod_replaced"));
    }
}
