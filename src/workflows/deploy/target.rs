//! The target of a deploying run: the environment's row, the sha of a deploy, promotion
//! or rollback, and the environment's deploy history. All of the deploy workflow's SQL is
//! here.

use anyhow::{anyhow, Context};
use deadpool_postgres::Pool;
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use crate::source::GitSha;
use crate::workflows::{RunContext, StepError, StepResultExt};

/// Workflows whose successful runs put an image into an environment.
pub const DEPLOY_WORKFLOWS: &[&str] = &["deploy", "promote", "rollback"];

/// The kind of deploying run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Deploy,
    Promote,
    Rollback,
}

impl Kind {
    pub fn from_workflow(workflow: &str) -> Option<Kind> {
        match workflow {
            "deploy" => Some(Kind::Deploy),
            "promote" => Some(Kind::Promote),
            "rollback" => Some(Kind::Rollback),
            _ => None,
        }
    }
}

/// The environment a run deploys to, with its project's image repository.
#[derive(Debug, Clone)]
pub struct Site {
    pub project_id: String,
    pub env_id: String,
    pub env_type: String,
    pub db_name: String,
    pub config: Value,
    /// Image repository without a tag, such as ghcr.io/acme/odoo.
    pub image_repository: Option<String>,
}

/// A successful deploy, promotion or rollback in the environment's history.
#[derive(Debug, Clone)]
pub struct PastDeploy {
    pub run_id: Uuid,
    pub git_sha: String,
    pub workflow: String,
}

/// Sha and image that a run puts into the environment.
#[derive(Debug, Clone)]
pub struct Target {
    pub git_sha: String,
    pub image: String,
    /// For the events: "deploy of abc123", "promotion of abc123 from env-staging", ...
    pub description: String,
}

pub async fn load_site(pool: &Pool, project_id: &str, env_id: &str) -> anyhow::Result<Site> {
    let client = pool
        .get()
        .await
        .context("connecting to the control plane failed")?;
    let row = client
        .query_opt(
            "SELECT e.env_type, e.db_name, e.config, p.image
               FROM ops.environments e JOIN ops.projects p USING (project_id)
              WHERE e.env_id = $1 AND e.project_id = $2",
            &[&env_id, &project_id],
        )
        .await
        .context("reading the environment failed")?
        .ok_or_else(|| anyhow!("environment {env_id} of project {project_id} not found"))?;
    Ok(Site {
        project_id: project_id.to_string(),
        env_id: env_id.to_string(),
        env_type: row.get(0),
        db_name: row.get(1),
        config: row.get(2),
        image_repository: row.get(3),
    })
}

/// Finds the environment's latest successful deploy other than `exclude`: the rollback query,
/// restricted to runs that deployed an image.
pub async fn previous_deploy(
    pool: &Pool,
    site: &Site,
    exclude: Uuid,
) -> anyhow::Result<Option<PastDeploy>> {
    let client = pool
        .get()
        .await
        .context("connecting to the control plane failed")?;
    let row = client
        .query_opt(
            "SELECT run_id, git_sha, workflow FROM ops.runs
              WHERE project_id = $1 AND env_id = $2 AND status = 'success'
                AND workflow = ANY ($3) AND git_sha IS NOT NULL AND run_id <> $4
              ORDER BY finished_at DESC NULLS LAST
              LIMIT 1",
            &[&site.project_id, &site.env_id, &DEPLOY_WORKFLOWS, &exclude],
        )
        .await
        .context("looking up the previous deploy failed")?;
    Ok(row.map(|row| PastDeploy {
        run_id: row.get(0),
        git_sha: row.get(1),
        workflow: row.get(2),
    }))
}

/// Parses the sha a run deploys, which must be a commit sha of 7 to 64 hex digits. The
/// history records this sha as deployed, and promotions and rollbacks go back to it, so a
/// tag or branch name that can later point at another commit is rejected. The result is
/// lowercase, as git prints the commits whose images the build pushes.
pub fn commit_sha(sha: &str) -> Result<GitSha, StepError> {
    GitSha::parse(sha).map_err(|err| {
        StepError::invalid(format!(
            "{err}; deploy, promote and rollback runs need a commit sha, not a tag or \
             branch name, which can move to another commit"
        ))
    })
}

/// Returns the image of a sha: the project's image repository tagged with the sha.
pub fn image_for(site: &Site, sha: &str) -> anyhow::Result<String> {
    let repository = site
        .image_repository
        .as_deref()
        .filter(|repo| !repo.is_empty())
        .ok_or_else(|| {
            anyhow!(
                "project {} has no image repository (ops.projects.image)",
                site.project_id
            )
        })?;
    Ok(format!("{repository}:{sha}"))
}

#[derive(Debug, Deserialize)]
struct PromoteMetadata {
    source_env: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RollbackMetadata {
    rollback_to: Option<Uuid>,
    rollback_from: Option<Uuid>,
}

/// Works out what the run deploys, and rejects a promotion or rollback that the history
/// does not support.
pub async fn resolve(ctx: &RunContext, kind: Kind, site: &Site) -> Result<Target, StepError> {
    let run_sha = ctx.run.git_sha.as_deref().filter(|sha| !sha.is_empty());
    let run_sha = run_sha.map(commit_sha).transpose()?;
    let (sha, description) = match kind {
        Kind::Deploy => {
            let sha = run_sha.ok_or_else(|| StepError::invalid("a deploy run needs a git_sha"))?;
            let description = format!("deploy of {sha}");
            (sha, description)
        }
        Kind::Promote => resolve_promotion(ctx, site, run_sha).await?,
        Kind::Rollback => resolve_rollback(ctx, site, run_sha).await?,
    };
    let image = image_for(site, sha.as_str()).map_err(StepError::invalid)?;
    Ok(Target {
        git_sha: sha.to_string(),
        image,
        description,
    })
}

async fn resolve_promotion(
    ctx: &RunContext,
    site: &Site,
    run_sha: Option<GitSha>,
) -> Result<(GitSha, String), StepError> {
    let metadata: PromoteMetadata = ctx.metadata()?;
    let source = metadata
        .source_env
        .filter(|env| !env.is_empty())
        .ok_or_else(|| StepError::invalid("a promote run needs metadata.source_env"))?;
    let sha = run_sha.ok_or_else(|| StepError::invalid("a promote run needs a git_sha"))?;

    let client = ctx.pool().get().await.step("validate")?;
    let source_env: String = client
        .query_one(
            "SELECT ops.resolve_env($1, $2)",
            &[&site.project_id, &source],
        )
        .await
        .map(|row| row.get(0))
        .map_err(|err| {
            StepError::invalid(format!("source_env {source:?}: {}", db_message(&err)))
        })?;
    if source_env == site.env_id {
        return Err(StepError::invalid(format!(
            "cannot promote from {source_env} into itself"
        )));
    }
    let deployed = client
        .query_opt(
            "SELECT run_id FROM ops.runs
              WHERE project_id = $1 AND env_id = $2 AND lower(git_sha) = $3
                AND status = 'success' AND workflow = ANY ($4)
              ORDER BY finished_at DESC NULLS LAST LIMIT 1",
            &[
                &site.project_id,
                &source_env,
                &sha.as_str(),
                &DEPLOY_WORKFLOWS,
            ],
        )
        .await
        .step("validate")?;
    let Some(row) = deployed else {
        return Err(StepError::invalid(format!(
            "{sha} was never deployed successfully to {source_env}; only a sha that passed \
             there can be promoted"
        )));
    };
    let source_run: Uuid = row.get(0);
    let description = format!("promotion of {sha} from {source_env} (run {source_run})");
    Ok((sha, description))
}

async fn resolve_rollback(
    ctx: &RunContext,
    site: &Site,
    run_sha: Option<GitSha>,
) -> Result<(GitSha, String), StepError> {
    let metadata: RollbackMetadata = ctx.metadata()?;
    let to = metadata
        .rollback_to
        .ok_or_else(|| StepError::invalid("a rollback run needs metadata.rollback_to"))?;
    let client = ctx.pool().get().await.step("validate")?;
    let row = client
        .query_opt(
            "SELECT project_id, env_id, status, workflow, git_sha FROM ops.runs WHERE run_id = $1",
            &[&to],
        )
        .await
        .step("validate")?
        .ok_or_else(|| StepError::invalid(format!("rollback_to run {to} not found")))?;
    let (project, env, status, workflow, sha): (String, String, String, String, Option<String>) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));

    let reject = |reason: String| {
        Err(StepError::invalid(format!(
            "cannot roll back to run {to}: {reason}"
        )))
    };
    if project != site.project_id || env != site.env_id {
        return reject(format!(
            "it ran in {project}/{env}, not {}/{}",
            site.project_id, site.env_id
        ));
    }
    if !DEPLOY_WORKFLOWS.contains(&workflow.as_str()) {
        return reject(format!("it is a {workflow} run, not a deploy"));
    }
    if status != "success" {
        return reject(format!("it finished with status {status}"));
    }
    let Some(recorded) = sha else {
        return reject("it has no git_sha".into());
    };
    let sha = match GitSha::parse(&recorded) {
        Ok(sha) => sha,
        Err(err) => {
            return reject(format!(
                "its git_sha is not a commit sha ({err}), so the image of that tag may hold \
                 another commit by now; deploy the commit sha instead"
            ))
        }
    };
    if let Some(run_sha) = run_sha.filter(|run_sha| *run_sha != sha) {
        return reject(format!("it deployed {sha}, but this run names {run_sha}"));
    }
    let from = metadata
        .rollback_from
        .map(|id| format!(" from run {id}"))
        .unwrap_or_default();
    let description = format!("rollback{from} to {sha} (run {to})");
    Ok((sha, description))
}

fn db_message(err: &tokio_postgres::Error) -> String {
    err.as_db_error()
        .map(|db| db.message().to_string())
        .unwrap_or_else(|| err.to_string())
}
