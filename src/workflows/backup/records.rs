//! The SQL of backups: ops.environments as backups need it, and ops.backups rows.

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde::Serialize;
use serde_json::Value;
use tokio_postgres::Row;
use uuid::Uuid;

use anyhow::Context;

/// An environment as ops.environments stores it.
#[derive(Debug, Clone, Serialize)]
pub struct EnvironmentRow {
    pub env_id: String,
    pub project_id: String,
    /// dev, staging or prod.
    pub env_type: String,
    pub db_name: String,
    pub config: Value,
}

impl EnvironmentRow {
    pub fn is_production(&self) -> bool {
        self.env_type == "prod"
    }

    pub async fn load(pool: &Pool, env_id: &str) -> anyhow::Result<EnvironmentRow> {
        let client = pool
            .get()
            .await
            .context("connecting to the control plane failed")?;
        let row = client
            .query_opt(
                "SELECT env_id, project_id, env_type, db_name, config FROM ops.environments \
                 WHERE env_id = $1",
                &[&env_id],
            )
            .await
            .with_context(|| format!("reading environment {env_id} failed"))?
            .with_context(|| format!("environment {env_id} does not exist"))?;
        Ok(EnvironmentRow {
            env_id: row.get("env_id"),
            project_id: row.get("project_id"),
            env_type: row.get("env_type"),
            db_name: row.get("db_name"),
            config: row.get("config"),
        })
    }
}

/// A row of ops.backups.
#[derive(Debug, Clone, Serialize)]
pub struct BackupRecord {
    pub backup_id: Uuid,
    pub project_id: String,
    pub env_id: String,
    pub run_id: Option<Uuid>,
    pub backup_type: String,
    pub status: String,
    pub db_dump_path: Option<String>,
    pub size_bytes: Option<i64>,
    /// `sha256:<hex>` of the whole archive.
    pub digest: Option<String>,
    pub format: Option<String>,
    pub manifest: Option<Value>,
    pub keep: bool,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "backup_id, project_id, env_id, run_id, backup_type, status, db_dump_path, \
     size_bytes, digest, format, manifest, keep, created_at, started_at, finished_at, expires_at";

impl BackupRecord {
    fn from_row(row: &Row) -> BackupRecord {
        BackupRecord {
            backup_id: row.get("backup_id"),
            project_id: row.get("project_id"),
            env_id: row.get("env_id"),
            run_id: row.get("run_id"),
            backup_type: row.get("backup_type"),
            status: row.get("status"),
            db_dump_path: row.get("db_dump_path"),
            size_bytes: row.get("size_bytes"),
            digest: row.get("digest"),
            format: row.get("format"),
            manifest: row.get("manifest"),
            keep: row.get("keep"),
            created_at: row.get("created_at"),
            started_at: row.get("started_at"),
            finished_at: row.get("finished_at"),
            expires_at: row.get("expires_at"),
        }
    }
}

/// Name of the archive format in ops.backups.format.
pub const FORMAT: &str = "odoo-zip";

async fn client(pool: &Pool) -> anyhow::Result<deadpool_postgres::Object> {
    pool.get()
        .await
        .context("connecting to the control plane failed")
}

pub async fn get(pool: &Pool, backup_id: Uuid) -> anyhow::Result<BackupRecord> {
    let sql = format!("SELECT {COLUMNS} FROM ops.backups WHERE backup_id = $1");
    let row = client(pool)
        .await?
        .query_opt(&sql, &[&backup_id])
        .await
        .with_context(|| format!("reading backup {backup_id} failed"))?
        .with_context(|| format!("backup {backup_id} does not exist"))?;
    Ok(BackupRecord::from_row(&row))
}

/// Loads the newest successful backup of an environment.
pub async fn latest_success(pool: &Pool, env_id: &str) -> anyhow::Result<Option<BackupRecord>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM ops.backups WHERE env_id = $1 AND status = 'success' \
         ORDER BY created_at DESC LIMIT 1"
    );
    let row = client(pool)
        .await?
        .query_opt(&sql, &[&env_id])
        .await
        .with_context(|| format!("reading the backups of {env_id} failed"))?;
    Ok(row.as_ref().map(BackupRecord::from_row))
}

/// Loads all backups of an environment, newest first.
pub async fn list(pool: &Pool, env_id: &str) -> anyhow::Result<Vec<BackupRecord>> {
    let sql =
        format!("SELECT {COLUMNS} FROM ops.backups WHERE env_id = $1 ORDER BY created_at DESC");
    let rows = client(pool)
        .await?
        .query(&sql, &[&env_id])
        .await
        .with_context(|| format!("reading the backups of {env_id} failed"))?;
    Ok(rows.iter().map(BackupRecord::from_row).collect())
}

/// Records a backup that no ops.create_backup call announced (a pre-deploy backup, or a
/// backup run queued without a backup_id).
pub async fn insert(
    pool: &Pool,
    env: &EnvironmentRow,
    run_id: Option<Uuid>,
    backup_type: &str,
    metadata: &Value,
) -> anyhow::Result<Uuid> {
    let row = client(pool)
        .await?
        .query_one(
            "INSERT INTO ops.backups (project_id, env_id, run_id, backup_type, metadata) \
             VALUES ($1, $2, $3, $4, $5) RETURNING backup_id",
            &[
                &env.project_id,
                &env.env_id,
                &run_id,
                &backup_type,
                metadata,
            ],
        )
        .await
        .with_context(|| format!("recording a {backup_type} backup of {} failed", env.env_id))?;
    Ok(row.get(0))
}

/// Marks a backup running. A backup that already succeeded is not run again.
pub async fn start(pool: &Pool, backup_id: Uuid, run_id: Option<Uuid>) -> anyhow::Result<()> {
    let updated = client(pool)
        .await?
        .execute(
            "UPDATE ops.backups SET status = 'running', started_at = now(), finished_at = NULL, \
                    error = NULL, run_id = coalesce($2, run_id), format = $3 \
              WHERE backup_id = $1 AND status IN ('pending', 'running', 'failed')",
            &[&backup_id, &run_id, &FORMAT],
        )
        .await
        .with_context(|| format!("marking backup {backup_id} running failed"))?;
    if updated == 0 {
        let record = get(pool, backup_id).await?;
        anyhow::bail!(
            "backup {backup_id} is {}; only a pending or failed backup can run",
            record.status
        );
    }
    Ok(())
}

/// Outcome of a successful backup, for its row.
pub struct Stored<'a> {
    pub location: &'a str,
    pub size_bytes: u64,
    pub sha256: &'a str,
    pub manifest: &'a Value,
    pub expires_at: Option<DateTime<Utc>>,
}

pub async fn succeed(
    pool: &Pool,
    backup_id: Uuid,
    stored: Stored<'_>,
) -> anyhow::Result<BackupRecord> {
    let sql = format!(
        "UPDATE ops.backups SET status = 'success', db_dump_path = $2, size_bytes = $3, \
                digest = $4, manifest = $5, expires_at = $6, finished_at = now(), error = NULL \
          WHERE backup_id = $1 RETURNING {COLUMNS}"
    );
    let digest = format!("sha256:{}", stored.sha256);
    let row = client(pool)
        .await?
        .query_one(
            &sql,
            &[
                &backup_id,
                &stored.location,
                &(stored.size_bytes as i64),
                &digest,
                stored.manifest,
                &stored.expires_at,
            ],
        )
        .await
        .with_context(|| format!("could not record the success of backup {backup_id}"))?;
    Ok(BackupRecord::from_row(&row))
}

pub async fn fail(pool: &Pool, backup_id: Uuid, error: &str) -> anyhow::Result<()> {
    client(pool)
        .await?
        .execute(
            "UPDATE ops.backups SET status = 'failed', error = $2, finished_at = now() \
              WHERE backup_id = $1",
            &[&backup_id, &error],
        )
        .await
        .with_context(|| format!("could not record the failure of backup {backup_id}"))?;
    Ok(())
}
