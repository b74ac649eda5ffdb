//! The deploy workflow's calls into the backup and restore workflows: a backup before a
//! production module update, and restoring it when that deploy is rolled back.

use anyhow::Context;
use uuid::Uuid;

use super::target::Site;
use crate::workflows::backup::{backup_environment, records::EnvironmentRow};
use crate::workflows::restore::restore_backup_over;
use crate::workflows::RunContext;

/// A backup taken before a module update, to restore if the deploy is rolled back.
#[derive(Debug, Clone)]
pub struct PreUpdateBackup {
    pub backup_id: Uuid,
}

/// Takes the 'pre_deploy' backup that a module update in production needs before it
/// changes the database. Other environments get none. A failed backup fails the deploy
/// before the update starts.
pub async fn backup_before_update(
    ctx: &RunContext,
    site: &Site,
) -> anyhow::Result<Option<PreUpdateBackup>> {
    if site.env_type != "prod" {
        return Ok(None);
    }
    let message = format!("Backing up {} before the module update", site.env_id);
    ctx.events.info(message).await;
    let env = EnvironmentRow::load(ctx.pool(), &site.env_id).await?;
    let record = backup_environment(ctx, &env, "pre_deploy")
        .await
        .context("the backup before the module update failed")?;
    let message = format!("Backup {} taken before the module update", record.backup_id);
    ctx.events.info(message).await;
    Ok(Some(PreUpdateBackup {
        backup_id: record.backup_id,
    }))
}

/// Restores the pre-update backup over the environment's database and filestore while a
/// deploy whose module update ran is rolled back, since the previous image may not run on
/// the updated schema. A failed restore is reported and the rollback goes on, so that
/// the site comes back even if on the updated database.
pub async fn restore_before_rollback(
    ctx: &RunContext,
    site: &Site,
    backup: Option<&PreUpdateBackup>,
) {
    let Some(backup) = backup else {
        let message = format!(
            "No backup to restore over {}; the previous version runs on the database as \
             the module update left it",
            site.db_name
        );
        ctx.events.warn(message).await;
        return;
    };
    let backup_id = backup.backup_id;
    let message = format!("Restoring backup {backup_id} over {}", site.db_name);
    ctx.events.info(message).await;
    match restore_backup_over(ctx, backup_id, &site.db_name).await {
        Ok(report) => {
            let message = format!(
                "Restored backup {backup_id} over {} in {:.1} s",
                site.db_name, report.elapsed_s
            );
            ctx.events.info(message).await;
        }
        Err(err) => {
            tracing::error!(backup.id = %backup_id, error = %format!("{err:#}"), "restoring the pre-update backup failed");
            let message = format!(
                "Restoring backup {backup_id} over {} failed: {err:#}; the previous version \
                 runs on the database as the module update left it",
                site.db_name
            );
            ctx.events.error(message).await;
        }
    }
}
