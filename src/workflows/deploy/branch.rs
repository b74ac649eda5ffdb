//! Queuing the deploy that follows a successful build, as the branch rules in
//! ops.branch_rules choose: by default main goes to staging, release/** to prod (where it
//! waits for approval) and any other branch to dev.

use anyhow::Context;
use serde_json::json;
use uuid::Uuid;

use crate::workflows::RunContext;

/// Queues the deploy of the build run in `ctx` that the branch rules give, and returns
/// its run id, or `None` when no rule deploys the branch. `image` is the pushed image,
/// recorded in the deploy run's metadata. A build that is retried after queuing gets the
/// same deploy run back instead of a second one.
pub async fn queue_deploy_after_build(
    ctx: &RunContext,
    image: &str,
) -> anyhow::Result<Option<Uuid>> {
    let run = &ctx.run;
    let (Some(git_ref), Some(git_sha)) = (run.git_ref.as_deref(), run.git_sha.as_deref()) else {
        ctx.events
            .info("No deploy queued: the build has no git_ref or git_sha")
            .await;
        return Ok(None);
    };
    let client = ctx
        .pool()
        .get()
        .await
        .context("connecting to the control plane failed")?;

    let existing = client
        .query_opt(
            "SELECT run_id FROM ops.runs
              WHERE project_id = $1 AND workflow = 'deploy'
                AND metadata->>'build_run_id' = $2
              LIMIT 1",
            &[&run.project_id, &run.run_id.to_string()],
        )
        .await
        .context("looking for a deploy already queued by this build failed")?;
    if let Some(row) = existing {
        return Ok(Some(row.get(0)));
    }

    let env_id: Option<String> = client
        .query_one(
            "SELECT ops.branch_deploy_env($1, $2)",
            &[&run.project_id, &git_ref],
        )
        .await
        .context("applying the branch rules failed")?
        .get(0);
    let Some(env_id) = env_id else {
        ctx.events
            .info(format!(
                "No deploy queued: no branch rule deploys {git_ref}"
            ))
            .await;
        return Ok(None);
    };

    let requester = run
        .metadata
        .get("triggered_by")
        .and_then(|value| value.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| format!("build run {}", run.run_id));
    let metadata = json!({
        "workflow": "deploy",
        "triggered_by": requester,
        "build_run_id": run.run_id.to_string(),
        "image": image,
    });
    let row = client
        .query_one(
            "SELECT run_id, status FROM ops.queue_run($1, $2, $3, $4, $5)",
            &[&run.project_id, &env_id, &git_sha, &git_ref, &metadata],
        )
        .await
        .with_context(|| format!("queuing the deploy of {git_sha} to {env_id} failed"))?;
    let (deploy_id, status): (Uuid, String) = (row.get(0), row.get(1));
    let waiting = if status == "pending_approval" {
        ", waiting for approval"
    } else {
        ""
    };
    ctx.events
        .send(
            crate::events::Level::Info,
            format!("Queued deploy run {deploy_id} of {git_sha} to {env_id}{waiting}"),
            Some(json!({ "deploy_run_id": deploy_id, "env_id": env_id, "status": status })),
        )
        .await;
    Ok(Some(deploy_id))
}
