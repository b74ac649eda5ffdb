//! Where the deploy workflow calls the backup workflow: a backup before a production
//! module update, and restoring it when that deploy is rolled back.

use anyhow::Context;
use serde_json::json;
use uuid::Uuid;

use super::target::Site;
use crate::events::Level;
use crate::workflows::backup::{self, records::EnvironmentRow};
use crate::workflows::{restore, RunContext};

/// A backup taken before a module update, to restore if the deploy is rolled back.
#[derive(Debug, Clone)]
pub struct PreUpdateBackup {
    pub backup_id: Uuid,
}

/// Takes the backup that a module update in production needs before it changes the
/// database, and records its id on the deploy run as `pre_deploy_backup_id`. Other
/// environments get none. A failed backup fails the deploy before the update starts.
pub async fn backup_before_update(
    ctx: &RunContext,
    site: &Site,
) -> anyhow::Result<Option<PreUpdateBackup>> {
    if site.env_type != "prod" {
        return Ok(None);
    }
    let env = EnvironmentRow::load(ctx.pool(), &site.env_id).await?;
    let record = backup::backup_environment(ctx, &env, "pre_deploy")
        .await
        .context("backing up the database before the module update failed")?;
    record_on_run(ctx, record.backup_id).await?;
    ctx.events
        .send(
            Level::Info,
            format!(
                "Backed up {} before the module update (backup {})",
                site.db_name, record.backup_id
            ),
            Some(json!({ "pre_deploy_backup_id": record.backup_id })),
        )
        .await;
    Ok(Some(PreUpdateBackup {
        backup_id: record.backup_id,
    }))
}

async fn record_on_run(ctx: &RunContext, backup_id: Uuid) -> anyhow::Result<()> {
    let client = ctx
        .pool()
        .get()
        .await
        .context("connecting to the control plane failed")?;
    let metadata = json!({ "pre_deploy_backup_id": backup_id });
    let updated = client
        .execute(
            "UPDATE ops.runs SET metadata = metadata || $3
              WHERE run_id = $1 AND lease_token = $2 AND status = 'running'",
            &[&ctx.run.run_id, &ctx.run.lease.token, &metadata],
        )
        .await
        .context("recording the backup on the deploy run failed")?;
    if updated == 0 {
        anyhow::bail!(
            "lease on run {} is no longer held by this agent",
            ctx.run.run_id
        );
    }
    Ok(())
}

/// Restores the pre-update backup over the environment's database while a deploy whose
/// module update ran is rolled back, since the previous image may not run on the updated
/// schema.
pub async fn restore_before_rollback(
    ctx: &RunContext,
    site: &Site,
    backup: Option<&PreUpdateBackup>,
) -> anyhow::Result<()> {
    let Some(backup) = backup else {
        ctx.events
            .warn(format!(
                "No backup to restore over {}; the previous version runs on the database as \
                 the module update left it",
                site.db_name
            ))
            .await;
        return Ok(());
    };
    ctx.events
        .warn(format!(
            "Restoring backup {} over {} before the previous version starts",
            backup.backup_id, site.db_name
        ))
        .await;
    restore::restore_backup_over(ctx, backup.backup_id, &site.db_name)
        .await
        .with_context(|| format!("restoring backup {} failed", backup.backup_id))?;
    Ok(())
}
