//! Restores: the 'restore' and 'restore_drill' workflows, the `odooops-agent restore`
//! command, and [`restore_backup_over`] for the deploy workflow's rollbacks.
//!
//! Every restore fetches the backup, checks its SHA-256 against ops.backups.digest, and
//! loads it into a database that did not exist before. A restore into an existing
//! database is rejected unless the caller requests a replacement. A replacement loads
//! the backup under a staging name and swaps it in only once it is loaded and verified. Restores
//! into non-production environments are neutralized before the database gets its final
//! name, so no Odoo process ever sees it un-neutralized.
//!
//! A restore run that replaces its environment's live database (overwrite, with
//! target_db equal to the environment's db_name) waits for the same approvals as a
//! deploy to that environment, and the agent checks them again before it starts.

mod approval;
pub mod command;
mod core;
mod fetch;
mod load;
mod neutralize;
pub mod records;
mod verify;

use anyhow::Context;
use futures_util::future::BoxFuture;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use crate::workflows::backup::{self, EnvironmentRow, Job};
use crate::workflows::{RunContext, RunResult, StepError, StepResultExt, Workflow};

pub use self::core::{restore, RestoreReport, RestoreRequest};
pub use fetch::sha256_file;
pub use records::RestoreKind;

/// Runs of workflow "restore".
#[derive(Debug, Default)]
pub struct RestoreWorkflow;

/// Runs of workflow "restore_drill".
#[derive(Debug, Default)]
pub struct DrillWorkflow;

/// Metadata of a restore run. Keys other than these (workflow_run_id, notes from the
/// console) are ignored.
#[derive(Debug, Default, Deserialize)]
pub struct RestoreRunMetadata {
    pub workflow: Option<String>,
    /// The backup to restore; by default the newest successful backup of `source_env`.
    pub backup_id: Option<Uuid>,
    /// Environment whose newest backup is restored; by default the run's own.
    pub source_env: Option<String>,
    /// Database to create; by default `<db_name>_restored_<UTC time>`.
    pub target_db: Option<String>,
    /// Replace `target_db` when it exists.
    #[serde(default)]
    pub overwrite: bool,
    /// Neutralize the restored database. Always true for non-production environments;
    /// false by default for production.
    pub neutralize: Option<bool>,
    pub scheduled_for: Option<String>,
    pub triggered_by: Option<String>,
}

impl Workflow for RestoreWorkflow {
    fn execute<'a>(&'a self, ctx: &'a RunContext) -> BoxFuture<'a, RunResult> {
        Box::pin(run_restore(ctx))
    }
}

impl Workflow for DrillWorkflow {
    fn execute<'a>(&'a self, ctx: &'a RunContext) -> BoxFuture<'a, RunResult> {
        Box::pin(run_drill(ctx))
    }
}

async fn run_restore(ctx: &RunContext) -> RunResult {
    let metadata: RestoreRunMetadata = ctx.metadata()?;
    approval::check_approvals(ctx).await?;
    let env = EnvironmentRow::load(ctx.pool(), &ctx.run.env_id)
        .await
        .step("load environment")?;
    let job = Job::for_run(ctx);
    let request = plan_restore(&job, env, &metadata)
        .await
        .map_err(StepError::invalid)?;
    job.reporter
        .info(format!(
            "Restoring backup {} into {} ({})",
            request.backup.backup_id,
            request.target_db,
            if request.neutralize {
                "neutralized"
            } else {
                "not neutralized"
            }
        ))
        .await;
    let report = restore(&job, request).await.step("restore")?;
    job.reporter
        .info(format!(
            "Restored {} in {:.1} s; checks: {}",
            report.target_db, report.elapsed_s, report.checks
        ))
        .await;
    Ok(json!({ "restore": report }))
}

/// Turns a restore run's metadata into a request, applying defaults and rejecting
/// requests that could hurt: an un-neutralized copy in a non-production environment, or
/// a backup of another project.
pub async fn plan_restore(
    job: &Job,
    env: EnvironmentRow,
    metadata: &RestoreRunMetadata,
) -> anyhow::Result<RestoreRequest> {
    let neutralize = match (env.is_production(), metadata.neutralize) {
        (false, Some(false)) => anyhow::bail!(
            "restores into non-production environment {} are always neutralized; remove \
             neutralize = false",
            env.env_id
        ),
        (false, _) => true,
        (true, requested) => requested.unwrap_or(false),
    };
    let backup = match metadata.backup_id {
        Some(id) => backup::records::get(&job.pool, id).await?,
        None => {
            let source = metadata.source_env.as_deref().unwrap_or(&env.env_id);
            backup::records::latest_success(&job.pool, source)
                .await?
                .ok_or_else(|| anyhow::anyhow!("environment {source} has no successful backup"))?
        }
    };
    if backup.project_id != env.project_id {
        anyhow::bail!(
            "backup {} belongs to project {}, but environment {} is in project {}. Restore a \
             backup of project {} instead",
            backup.backup_id,
            backup.project_id,
            env.env_id,
            env.project_id,
            env.project_id
        );
    }
    let target_db = metadata.target_db.clone().unwrap_or_else(|| {
        format!(
            "{}_restored_{}",
            env.db_name,
            chrono::Utc::now().format("%Y%m%d_%H%M%S")
        )
    });
    reject_other_live_database(job, &env, &target_db).await?;
    let pg = job.pg_runner(&env.env_id).await?;
    let kind = if metadata.overwrite && pg.database_exists(&target_db).await? {
        RestoreKind::Replace
    } else {
        RestoreKind::Restore
    };
    Ok(RestoreRequest {
        env,
        backup,
        target_db,
        kind,
        neutralize,
    })
}

/// Rejects a target that is the live database of another environment on the same server
/// (same pg tools, host and port in the agent's backup settings). The approval gate holds
/// only a restore over the run's own environment's database, so a restore queued for
/// staging must not reach prod's database. Environments on other servers may use the
/// same database name.
async fn reject_other_live_database(
    job: &Job,
    env: &EnvironmentRow,
    target_db: &str,
) -> anyhow::Result<()> {
    let client = job
        .pool
        .get()
        .await
        .context("connecting to the control plane failed")?;
    let rows = client
        .query(
            "SELECT env_id FROM ops.environments WHERE db_name = $1 AND env_id <> $2 \
             ORDER BY env_id",
            &[&target_db, &env.env_id.as_str()],
        )
        .await
        .context("reading ops.environments failed")?;
    let server = |env_id: &str| {
        let pg = &job.settings.backup.for_env(env_id).pg;
        (pg.tools.clone(), pg.host.clone(), pg.port)
    };
    let own = server(&env.env_id);
    let owner = rows
        .iter()
        .map(|row| row.get::<_, String>(0))
        .find(|other| server(other) == own);
    if let Some(owner) = owner {
        anyhow::bail!(
            "target_db {target_db} is the live database of environment {owner}; queue the \
             restore for {owner} instead, where replacing it needs that environment's \
             approvals"
        );
    }
    Ok(())
}

async fn run_drill(ctx: &RunContext) -> RunResult {
    let env = EnvironmentRow::load(ctx.pool(), &ctx.run.env_id)
        .await
        .step("load environment")?;
    let job = Job::for_run(ctx);
    let backup = backup::records::latest_success(ctx.pool(), &env.env_id)
        .await
        .step("find backup")?
        .ok_or_else(|| {
            StepError::new(
                "find backup",
                anyhow::anyhow!("environment {} has no successful backup", env.env_id),
            )
        })?;
    let target_db = format!(
        "{}_drill_{}",
        &env.db_name[..env.db_name.len().min(40)],
        &Uuid::new_v4().simple().to_string()[..8]
    );
    job.reporter
        .info(format!(
            "Restore drill of backup {} into scratch database {target_db}",
            backup.backup_id
        ))
        .await;
    let request = RestoreRequest {
        env,
        backup,
        target_db,
        kind: RestoreKind::Drill,
        neutralize: false,
    };
    let report = restore(&job, request).await.step("restore drill")?;
    job.reporter
        .info(format!(
            "Restore drill passed in {:.1} s: {}",
            report.elapsed_s, report.checks
        ))
        .await;
    Ok(json!({ "drill": report }))
}

/// Restores backup `backup_id` over database `target_db` of the run's environment,
/// replacing the database and its filestore (the rollback of a deploy whose module
/// update already ran). The backup is loaded and verified under a staging name first,
/// so `target_db` is untouched if anything fails before the swap. Non-production
/// targets are neutralized.
pub async fn restore_backup_over(
    ctx: &RunContext,
    backup_id: Uuid,
    target_db: &str,
) -> anyhow::Result<RestoreReport> {
    let env = EnvironmentRow::load(ctx.pool(), &ctx.run.env_id).await?;
    let job = Job::for_run(ctx);
    let backup = backup::records::get(&job.pool, backup_id).await?;
    let neutralize = !env.is_production();
    let request = RestoreRequest {
        env,
        backup,
        target_db: target_db.to_string(),
        kind: RestoreKind::Replace,
        neutralize,
    };
    restore(&job, request).await
}
