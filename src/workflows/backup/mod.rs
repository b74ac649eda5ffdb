//! The backup workflow: the environment's database and filestore, streamed as one zip
//! into the configured store, recorded in ops.backups, then pruned by the retention
//! policy.
//!
//! Runs come from ops.create_backup (on demand or from the [`scheduler`]), whose
//! metadata carries `backup_id` and `backup_type`. The deploy workflow calls
//! [`backup_environment`] for its pre-deploy backup.

pub mod dump_rows;
pub mod job;
mod manifest;
pub mod pg;
pub mod process;
pub mod records;
pub mod retention;
pub mod scheduler;
mod stream;

use futures_util::future::BoxFuture;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use crate::workflows::{RunContext, RunResult, StepError, StepResultExt, Workflow};

pub use job::{Job, Reporter};
pub use records::{BackupRecord, EnvironmentRow};

/// Backup types ops.backups accepts.
pub const BACKUP_TYPES: &[&str] = &["manual", "daily", "weekly", "monthly", "pre_deploy"];

/// Runs of workflow "backup".
#[derive(Debug, Default)]
pub struct BackupWorkflow;

#[derive(Debug, Deserialize)]
struct BackupRunMetadata {
    backup_id: Option<Uuid>,
    backup_type: Option<String>,
}

impl Workflow for BackupWorkflow {
    fn execute<'a>(&'a self, ctx: &'a RunContext) -> BoxFuture<'a, RunResult> {
        Box::pin(run(ctx))
    }
}

async fn run(ctx: &RunContext) -> RunResult {
    let metadata: BackupRunMetadata = ctx.metadata()?;
    let backup_type = metadata.backup_type.unwrap_or_else(|| "manual".to_string());
    if !BACKUP_TYPES.contains(&backup_type.as_str()) {
        return Err(StepError::invalid(format!(
            "invalid backup_type {backup_type:?}; expected one of {}",
            BACKUP_TYPES.join(", ")
        )));
    }
    let env = EnvironmentRow::load(ctx.pool(), &ctx.run.env_id)
        .await
        .step("load environment")?;
    let job = Job::for_run(ctx);
    let backup_id = match metadata.backup_id {
        Some(id) => id,
        None => records::insert(
            ctx.pool(),
            &env,
            Some(ctx.run.run_id),
            &backup_type,
            &json!({}),
        )
        .await
        .step("record backup")?,
    };

    let record = job
        .backup(&env, backup_id, &backup_type)
        .await
        .map_err(|err| {
            StepError::new("backup", err).with_metadata(json!({ "backup_id": backup_id }))
        })?;

    let retention = &ctx.settings.backup.for_env(&env.env_id).retention;
    if let Err(err) = retention::apply(&job, &env, retention).await {
        // The backup itself succeeded; pruning is retried after the next one.
        job.reporter
            .warn(format!("Applying the retention policy failed: {err:#}"))
            .await;
    }
    Ok(json!({
        "backup_id": record.backup_id,
        "db_dump_path": record.db_dump_path,
        "size_bytes": record.size_bytes,
        "digest": record.digest,
    }))
}

/// Backs up `env` within another run (the deploy workflow's pre-deploy backup): records
/// a new ops.backups row of `backup_type` tied to the run, streams the backup, and
/// returns the finished row. The row ends 'failed' with the reason when this fails.
pub async fn backup_environment(
    ctx: &RunContext,
    env: &EnvironmentRow,
    backup_type: &str,
) -> anyhow::Result<BackupRecord> {
    if !BACKUP_TYPES.contains(&backup_type) {
        anyhow::bail!(
            "invalid backup type {backup_type:?}; expected one of {}",
            BACKUP_TYPES.join(", ")
        );
    }
    let metadata = json!({ "triggered_by": ctx.run.workflow, "run_id": ctx.run.run_id });
    let backup_id = records::insert(
        ctx.pool(),
        env,
        Some(ctx.run.run_id),
        backup_type,
        &metadata,
    )
    .await?;
    Job::for_run(ctx).backup(env, backup_id, backup_type).await
}
