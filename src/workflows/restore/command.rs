//! `odooops-agent restore`: a restore run from the command line, outside the queue,
//! reporting to stdout and recording the restore in ops.restores like a run does.

use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{plan_restore, restore, RestoreKind, RestoreReport, RestoreRunMetadata};
use crate::config::Settings;
use crate::workflows::backup::{EnvironmentRow, Job, Reporter};

/// Options of the restore command.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    pub env: String,
    pub backup_id: Option<Uuid>,
    pub from_env: Option<String>,
    pub target_db: Option<String>,
    pub overwrite: bool,
    pub neutralize: bool,
    /// Allows replacing the environment's live database, which a queued restore may do
    /// only with the environment's approvals.
    pub replace_live: bool,
}

/// Runs the restore; `cancel` stops it (the caller wires it to SIGINT and SIGTERM).
pub async fn run(
    settings: Arc<Settings>,
    options: RestoreOptions,
    cancel: CancellationToken,
) -> anyhow::Result<RestoreReport> {
    let pool = crate::db::pool(&settings.database).map_err(anyhow::Error::msg)?;
    let job = Job {
        pool: pool.clone(),
        settings,
        reporter: Reporter::Stdout,
        cancel,
        run_id: None,
    };
    let env = EnvironmentRow::load(&pool, &options.env).await?;
    let metadata = RestoreRunMetadata {
        backup_id: options.backup_id,
        source_env: options.from_env,
        target_db: options.target_db,
        overwrite: options.overwrite,
        neutralize: options.neutralize.then_some(true),
        ..Default::default()
    };
    let request = plan_restore(&job, env, &metadata).await?;
    let replaces_live =
        matches!(request.kind, RestoreKind::Replace) && request.target_db == request.env.db_name;
    if replaces_live && !options.replace_live {
        anyhow::bail!(
            "{} is the live database of {}; a queued restore that replaces it waits for the \
             environment's approvals. Queue a restore run, or pass --replace-live to replace \
             it now without them",
            request.target_db,
            request.env.env_id
        );
    }
    println!(
        "Restoring backup {} ({}) into {}",
        request.backup.backup_id,
        request.backup.created_at.format("%Y-%m-%d %H:%M UTC"),
        request.target_db
    );
    restore(&job, request).await.context("restore failed")
}
