//! Where the deploy workflow calls the backup workflow: a backup before a production
//! module update, and restoring it when that deploy is rolled back.

use uuid::Uuid;

use super::target::Site;
use crate::workflows::RunContext;

/// A backup taken before a module update, to restore if the deploy is rolled back.
#[derive(Debug, Clone)]
pub struct PreUpdateBackup {
    pub backup_id: Uuid,
}

/// Takes the backup that a module update in production needs before it changes the
/// database. Other environments get none.
// NOTE: no backup is taken yet, because this branch lacks the backup workflow. The call
// to `backup::backup_environment(ctx, ..., "pre_deploy")` goes here, and a failed
// backup must fail the deploy before the module update starts.
pub async fn backup_before_update(
    ctx: &RunContext,
    site: &Site,
) -> anyhow::Result<Option<PreUpdateBackup>> {
    if site.env_type != "prod" {
        return Ok(None);
    }
    ctx.events
        .warn(format!(
            "No backup of {} was taken before the module update: this agent was built \
             without the backup workflow",
            site.env_id
        ))
        .await;
    Ok(None)
}

/// Restores the pre-update backup over the environment's database while a deploy whose
/// module update ran is rolled back, since the previous image may not run on the updated
/// schema.
// NOTE: nothing is restored yet, because this branch lacks the restore workflow. The
// restore-over call goes here, before the previous version starts again.
pub async fn restore_before_rollback(
    ctx: &RunContext,
    site: &Site,
    backup: Option<&PreUpdateBackup>,
) -> anyhow::Result<()> {
    let message = match backup {
        Some(backup) => format!(
            "Backup {} was not restored over {}: this agent was built without the restore \
             workflow; the previous version runs on the updated database",
            backup.backup_id, site.db_name
        ),
        None => format!(
            "No backup to restore over {}; the previous version runs on the database as \
             the module update left it",
            site.db_name
        ),
    };
    ctx.events.warn(message).await;
    Ok(())
}
