//! The SQL of restores: rows of ops.restores.

use anyhow::Context;
use deadpool_postgres::Pool;
use serde_json::Value;
use uuid::Uuid;

use crate::workflows::backup::EnvironmentRow;

/// Kind of restore, by its treatment of the target database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreKind {
    /// Into a database that must not exist yet.
    Restore,
    /// Over an existing database, replacing it (a rollback, or an explicit overwrite).
    Replace,
    /// Into a scratch database, verified and dropped.
    Drill,
}

impl RestoreKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RestoreKind::Restore => "restore",
            RestoreKind::Replace => "replace",
            RestoreKind::Drill => "drill",
        }
    }
}

pub async fn start(
    pool: &Pool,
    env: &EnvironmentRow,
    backup_id: Uuid,
    run_id: Option<Uuid>,
    kind: RestoreKind,
    target_db: &str,
) -> anyhow::Result<Uuid> {
    let client = pool
        .get()
        .await
        .context("connecting to the control plane failed")?;
    let row = client
        .query_one(
            "INSERT INTO ops.restores (backup_id, project_id, env_id, run_id, kind, target_db) \
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING restore_id",
            &[
                &backup_id,
                &env.project_id,
                &env.env_id,
                &run_id,
                &kind.as_str(),
                &target_db,
            ],
        )
        .await
        .context("recording the restore failed")?;
    Ok(row.get(0))
}

/// Records how a restore ended: success when `error` is `None`.
pub async fn finish(
    pool: &Pool,
    restore_id: Uuid,
    neutralized: bool,
    checks: &Value,
    error: Option<&str>,
) -> anyhow::Result<()> {
    let status = if error.is_none() { "success" } else { "failed" };
    let client = pool
        .get()
        .await
        .context("connecting to the control plane failed")?;
    client
        .execute(
            "UPDATE ops.restores SET status = $2, neutralized = $3, checks = $4, error = $5, \
                    finished_at = now() \
              WHERE restore_id = $1",
            &[&restore_id, &status, &neutralized, checks, &error],
        )
        .await
        .with_context(|| format!("could not record the end of restore {restore_id}"))?;
    Ok(())
}
