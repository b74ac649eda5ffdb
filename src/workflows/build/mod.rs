//! The build workflow: from a commit to a tested image in the registry.
//!
//! 1. fetch: the run's `git_sha` of the project's repository into the run's workspace
//!    (agent.work_dir/<run_id>), deleted at the end whatever happened.
//! 2. build: the image, through the Docker API, with every output line sent to the run's
//!    events; tagged `<registry>/<image>:<sha>` and `<registry>/<image>:<ref-slug>-latest`.
//! 3. test: the test command in a container from the new image, against a throwaway
//!    database. A non-zero exit code, or an ERROR, CRITICAL or FAIL: line in the output,
//!    fails the run; the container and database are removed either way. Those of an
//!    earlier attempt whose agent died are removed first (see [`sweep`]).
//! 4. push: both tags, with the registry credentials; then the image is recorded as an
//!    'image' artifact.
//! 5. logs: the gzipped output of all steps is stored in the artifact store under
//!    `<run_id>/attempt-<n>-<claim tag>/build.log.gz` and recorded as a 'logs' artifact,
//!    after failures too.
//!
//! A failure in any step fails the run with that step's name. Images built by a failed run
//! are untagged locally, and a failed build's intermediate images are removed.

mod log;
mod project;
mod steps;
pub mod sweep;
pub mod tags;
mod testdb;

use std::time::Instant;

use anyhow::Context;
use futures_util::future::BoxFuture;
use serde_json::{json, Value};

use crate::events::Level;
use crate::queue::Artifact;
use crate::source::{GitSha, Workspace};
use crate::workflows::{RunContext, RunResult, StepError, StepResultExt, Workflow};

use self::log::BuildLog;
use self::project::Project;
use self::steps::{Build, Plan};

pub use self::log::is_failure_line;
pub use self::testdb::database_name as test_database_name;

/// Builds, tests and pushes the image of a run's commit.
#[derive(Debug, Clone, Copy, Default)]
pub struct BuildWorkflow;

impl BuildWorkflow {
    pub fn new() -> BuildWorkflow {
        BuildWorkflow
    }
}

impl Workflow for BuildWorkflow {
    fn execute<'a>(&'a self, ctx: &'a RunContext) -> BoxFuture<'a, RunResult> {
        Box::pin(run(ctx))
    }
}

async fn run(ctx: &RunContext) -> RunResult {
    let plan = plan(ctx).await?;
    let docker = crate::docker::connect(&ctx.settings.docker)
        .await
        .step("docker")?;
    sweep::remove_earlier_containers(ctx, &docker).await;
    let workspace = Workspace::create(&ctx.settings.agent.work_dir, &ctx.run.run_id.to_string())
        .await
        .step("fetch")?;
    let log_path = workspace.path().join("build.log.gz");
    let log = BuildLog::create(log_path, ctx.events.clone(), plan.secrets())
        .await
        .context("creating the build log failed")
        .step("logs")?;

    let mut build = Build::new(ctx, &plan, &docker, &workspace, log);
    let result = build.run().await;
    let mut log = build.finish(result.is_err()).await;
    if let Err(failure) = &result {
        log.write_only(&failure.to_string()).await;
    }
    let stored = store_log(ctx, log).await;
    if let Err(err) = workspace.remove().await {
        ctx.events
            .warn(format!("Removing the workspace failed: {err}"))
            .await;
    }
    conclude(ctx, result, stored).await
}

/// Checks the run's input and reads its project before anything is fetched or built.
async fn plan(ctx: &RunContext) -> Result<Plan, StepError> {
    let sha = ctx
        .run
        .git_sha
        .as_deref()
        .ok_or_else(|| StepError::invalid("the run has no git_sha to build"))?;
    let sha = GitSha::parse(sha).map_err(StepError::invalid)?;
    let registry = ctx.settings.registry.clone().ok_or_else(|| {
        StepError::invalid("no registry is configured: set [registry] url in the agent config")
    })?;
    let build = &ctx.settings.build;
    let project = Project::load(ctx.pool(), &ctx.run.project_id, &ctx.run.env_id, build)
        .await
        .map_err(StepError::invalid)?;
    let repository =
        tags::image_repository(&project.image, &registry).map_err(StepError::invalid)?;
    Ok(Plan {
        sha,
        git_ref: ctx.run.git_ref.clone().filter(|r| !r.is_empty()),
        project,
        repository,
        registry,
    })
}

/// Stores the gzipped log and records it as the run's 'logs' artifact. Returns the
/// storage location.
async fn store_log(ctx: &RunContext, log: BuildLog) -> anyhow::Result<String> {
    let started = Instant::now();
    let lines = log.lines();
    let path = log.finish().await.context("writing the build log failed")?;
    let key = ctx.artifact_key("build.log.gz");
    let data = tokio::fs::read(&path)
        .await
        .context("reading the build log failed")?;
    let stored = crate::storage::put_artifact(&ctx.settings.storage, &key, data.into())
        .await
        .context("storing the build log failed")?;
    let artifact = Artifact {
        artifact_type: "logs".into(),
        storage_path: stored.location.clone(),
        digest: Some(stored.digest.clone()),
        size_bytes: Some(stored.size_bytes as i64),
        metadata: json!({ "lines": lines, "content_encoding": "gzip" }),
    };
    ctx.add_artifact(&artifact)
        .await
        .context("recording the logs artifact failed")?;
    tracing::info!(
        location = %stored.location,
        bytes = stored.size_bytes,
        duration_ms = started.elapsed().as_millis() as u64,
        "build log stored"
    );
    Ok(stored.location)
}

/// Queues the deploy that the branch rules give for the built branch, and records its run
/// id as `deploy_run_id`.
async fn queue_deploy(ctx: &RunContext, metadata: &mut Value) -> Result<(), StepError> {
    let field = |name: &str| {
        metadata
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    // The deploy pulls the tag the build pushed, which is the whole commit id even when
    // the build was queued with an abbreviated one.
    let (image, commit) = (field("image"), field("git_sha_full"));
    let deploy = crate::workflows::deploy::queue_deploy_after_build(ctx, &image, &commit)
        .await
        .step("queue deploy")?;
    if let (Some(run_id), Value::Object(fields)) = (deploy, metadata) {
        fields.insert("deploy_run_id".into(), Value::String(run_id.to_string()));
    }
    Ok(())
}

/// Combines the steps' result with the log's: a run whose steps succeeded fails if its
/// log could not be stored, and a failed run keeps its own error.
async fn conclude(
    ctx: &RunContext,
    result: RunResult,
    stored: anyhow::Result<String>,
) -> RunResult {
    match (result, stored) {
        (Ok(mut metadata), Ok(location)) => {
            if let Value::Object(fields) = &mut metadata {
                fields.insert("logs".into(), Value::String(location));
            }
            queue_deploy(ctx, &mut metadata).await?;
            Ok(metadata)
        }
        (Ok(_), Err(err)) => Err(StepError::new("logs", err)),
        (Err(failure), Ok(_)) => Err(failure),
        (Err(failure), Err(err)) => {
            let message = format!("The build log could not be stored: {err:#}");
            ctx.events.send(Level::Warn, message, None).await;
            Err(failure)
        }
    }
}
