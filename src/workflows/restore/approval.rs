//! The agent's own approval check for restores that replace an environment's live
//! database.

use anyhow::anyhow;

use crate::workflows::{run_approvals, RunContext, StepError, StepResultExt};

/// Fails a restore run that would replace its environment's live database without the
/// approvals the environment requires. The database already keeps such runs in
/// 'pending_approval'. This check also covers runs queued while the approval triggers
/// were disabled, and runs whose metadata was edited after they were queued.
pub async fn check_approvals(ctx: &RunContext) -> Result<(), StepError> {
    let (required, approvers) = run_approvals(ctx).await.step("approvals")?;
    if required == 0 {
        return Ok(());
    }
    if (approvers.len() as i64) < i64::from(required) {
        return Err(StepError::new(
            "approvals",
            anyhow!(
                "replacing the live database of {} requires {required} approvals but the \
                 run has {} ({}), so nothing was restored",
                ctx.run.env_id,
                approvers.len(),
                approvers.join(", ")
            ),
        ));
    }
    ctx.events
        .info(format!(
            "Replacing the live database, approved by {}",
            approvers.join(", ")
        ))
        .await;
    Ok(())
}
