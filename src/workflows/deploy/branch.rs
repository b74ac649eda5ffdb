//! Queuing the deploy that follows a successful build, as the branch rules in
//! ops.branch_rules choose: by default main goes to staging, release/** to prod (where it
//! waits for approval) and any other branch to dev.

use anyhow::Context;
use deadpool_postgres::Object;
use serde_json::json;
use uuid::Uuid;

use crate::events::Level;
use crate::queue::ClaimedRun;
use crate::workflows::RunContext;

/// Queues the deploy of the build run in `ctx` that the branch rules give, and returns
/// its run id, or `None` when no rule deploys the branch. `image` is the pushed image,
/// recorded in the deploy run's metadata, and `git_sha` the whole commit id it is tagged
/// with. A build that is retried after queuing gets the same deploy run back instead of a
/// second one.
pub async fn queue_deploy_after_build(
    ctx: &RunContext,
    image: &str,
    git_sha: &str,
) -> anyhow::Result<Option<Uuid>> {
    let run = &ctx.run;
    let (Some(git_ref), false) = (run.git_ref.as_deref(), git_sha.is_empty()) else {
        let message = "No deploy queued: the build has no git_ref or git_sha";
        ctx.events.info(message).await;
        return Ok(None);
    };
    let client = ctx
        .pool()
        .get()
        .await
        .context("connecting to the control plane failed")?;
    if let Some(existing) = deploy_of_build(&client, run).await? {
        return Ok(Some(existing));
    }
    let Some(env_id) = branch_target(&client, &run.project_id, git_ref).await? else {
        let message = format!("No deploy queued: no branch rule deploys {git_ref}");
        ctx.events.info(message).await;
        return Ok(None);
    };

    let metadata = json!({
        "workflow": "deploy",
        "triggered_by": requester(run),
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
    let message = format!("Queued deploy run {deploy_id} of {git_sha} to {env_id}{waiting}");
    let payload = json!({ "deploy_run_id": deploy_id, "env_id": env_id, "status": status });
    ctx.events.send(Level::Info, message, Some(payload)).await;
    Ok(Some(deploy_id))
}

/// Finds the deploy run that an earlier attempt of this build queued.
async fn deploy_of_build(client: &Object, run: &ClaimedRun) -> anyhow::Result<Option<Uuid>> {
    let row = client
        .query_opt(
            "SELECT run_id FROM ops.runs
              WHERE project_id = $1 AND workflow = 'deploy'
                AND metadata->>'build_run_id' = $2
              LIMIT 1",
            &[&run.project_id, &run.run_id.to_string()],
        )
        .await
        .context("looking for a deploy already queued by this build failed")?;
    Ok(row.map(|row| row.get(0)))
}

/// Returns the environment that the branch rules deploy `git_ref` to.
async fn branch_target(
    client: &Object,
    project_id: &str,
    git_ref: &str,
) -> anyhow::Result<Option<String>> {
    let row = client
        .query_one(
            "SELECT ops.branch_deploy_env($1, $2)",
            &[&project_id, &git_ref],
        )
        .await
        .context("applying the branch rules failed")?;
    Ok(row.get(0))
}

/// Names the deploy's requester: the build's requester, or the build itself. Reviewers of a
/// production deploy cannot be its requester.
fn requester(run: &ClaimedRun) -> String {
    run.metadata
        .get("triggered_by")
        .and_then(|value| value.as_str())
        .filter(|name| !name.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| format!("build run {}", run.run_id))
}
