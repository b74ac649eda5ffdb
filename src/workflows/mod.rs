//! Workflows: what the agent does with a claimed run, one module per workflow.
//!
//! A workflow gets a [`RunContext`] and returns the metadata to merge into the run, or a
//! [`StepError`] naming the step that failed. Queue mechanics (leases, heartbeats,
//! finishing) stay in the agent; a workflow only watches `ctx.cancel` and cleans up what
//! it started when it fires.

pub mod backup;
pub mod build;
pub mod deploy;
pub mod restore;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::config::backup::{EnvBackupSettings, PgTools};
use crate::config::Settings;
use crate::events::EventSink;
use crate::queue::{Artifact, ClaimedRun, Queue, QueueError};

/// Context of one run, passed to its workflow.
pub struct RunContext {
    pub run: ClaimedRun,
    pub events: EventSink,
    /// Fires when the run must stop: cancellation was requested, the agent is shutting
    /// down past its grace period, or the lease was lost.
    pub cancel: CancellationToken,
    pub queue: Queue,
    pub settings: Arc<Settings>,
}

impl RunContext {
    pub fn pool(&self) -> &deadpool_postgres::Pool {
        self.queue.pool()
    }

    /// Returns the artifact store key of `file` for this claim of the run:
    /// `<run_id>/attempt-<n>-<claim tag>/<file>`. A retried or handed-back run writes new
    /// objects instead of replacing the ones that earlier artifact rows describe.
    pub fn artifact_key(&self, file: &str) -> String {
        let run = &self.run;
        format!(
            "{}/attempt-{}-{}/{file}",
            run.run_id,
            run.attempt,
            run.lease.tag()
        )
    }

    /// Records an artifact of this run.
    pub async fn add_artifact(&self, artifact: &Artifact) -> Result<(), QueueError> {
        self.queue.add_artifact(self.run.lease, artifact).await
    }

    /// Parses the run's metadata into a workflow's own type. A field of the wrong type or
    /// a missing required field fails the run with a message naming it.
    pub fn metadata<T: DeserializeOwned>(&self) -> Result<T, StepError> {
        serde_json::from_value(self.run.metadata.clone())
            .map_err(|err| StepError::invalid(format!("invalid run metadata: {err}")))
    }
}

/// Returns whether runs of `workflow` in an environment with `backup` settings use the
/// Docker engine. Builds, deploys, promotions and rollbacks always do. Backups and restore
/// drills do when pg_dump and psql run in a container. Restores do in that case too, and
/// when they run `odoo neutralize` in the environment's Odoo container. A run of an
/// unknown workflow fails without the engine.
pub fn needs_docker(workflow: &str, backup: &EnvBackupSettings) -> bool {
    let pg_in_container = matches!(backup.pg.tools, PgTools::Docker { .. });
    match workflow {
        "build" | "deploy" | "promote" | "rollback" => true,
        "backup" | "restore_drill" => pg_in_container,
        "restore" => {
            let neutralizes_in_container =
                backup.odoo_neutralize && backup.odoo_container.is_some();
            pg_in_container || neutralizes_in_container
        }
        _ => false,
    }
}

/// A failed step: which one, and why.
#[derive(Debug)]
pub struct StepError {
    pub step: &'static str,
    pub error: anyhow::Error,
    /// Merged into the run's metadata along with the error.
    pub metadata: Value,
}

impl StepError {
    pub fn new(step: &'static str, error: impl Into<anyhow::Error>) -> StepError {
        StepError {
            step,
            error: error.into(),
            metadata: Value::Object(Default::default()),
        }
    }

    /// A run whose input is malformed: retrying it cannot help.
    pub fn invalid(message: impl fmt::Display) -> StepError {
        StepError::new("validate", anyhow::anyhow!("{message}"))
    }

    pub fn with_metadata(mut self, metadata: Value) -> StepError {
        self.metadata = metadata;
        self
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "step {} failed: {:#}", self.step, self.error)
    }
}

/// Attaches the step name to an error, for `?` inside workflows.
pub trait StepResultExt<T> {
    fn step(self, step: &'static str) -> Result<T, StepError>;
}

impl<T, E: Into<anyhow::Error>> StepResultExt<T> for Result<T, E> {
    fn step(self, step: &'static str) -> Result<T, StepError> {
        self.map_err(|err| StepError::new(step, err))
    }
}

/// Metadata to merge into the run on success, or the failed step.
pub type RunResult = Result<Value, StepError>;

/// A kind of run the agent can execute.
pub trait Workflow: Send + Sync + 'static {
    fn execute<'a>(&'a self, ctx: &'a RunContext) -> BoxFuture<'a, RunResult>;
}

/// The workflows an agent can run, by the name runs carry in metadata.workflow.
#[derive(Clone, Default)]
pub struct Workflows {
    by_name: BTreeMap<String, Arc<dyn Workflow>>,
}

impl Workflows {
    pub fn new() -> Workflows {
        Workflows::default()
    }

    pub fn register(&mut self, name: &str, workflow: impl Workflow) -> &mut Workflows {
        self.by_name.insert(name.to_string(), Arc::new(workflow));
        self
    }

    pub fn get(&self, name: &str) -> Option<Arc<dyn Workflow>> {
        self.by_name.get(name).cloned()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// Returns the workflows this binary implements.
    pub fn standard() -> Workflows {
        let mut workflows = Workflows::new();
        workflows.register("build", build::BuildWorkflow::new());
        workflows.register("deploy", deploy::DeployWorkflow);
        workflows.register("promote", deploy::DeployWorkflow);
        workflows.register("rollback", deploy::DeployWorkflow);
        workflows.register("backup", backup::BackupWorkflow);
        workflows.register("restore", restore::RestoreWorkflow);
        workflows.register("restore_drill", restore::DrillWorkflow);
        workflows
    }
}

/// Returns the approvals `ctx`'s run needs, judged by its environment, workflow and
/// metadata (ops.run_required_reviewers), and the distinct reviewers other than its
/// requester who approved it.
pub async fn run_approvals(ctx: &RunContext) -> anyhow::Result<(i32, Vec<String>)> {
    use anyhow::Context;
    let client = ctx
        .pool()
        .get()
        .await
        .context("connecting to the control plane failed")?;
    let run = &ctx.run;
    let row = client
        .query_one(
            "SELECT coalesce(ops.run_required_reviewers($1, $2, $3), 0), \
                    ops.run_approvers($4)",
            &[&run.env_id, &run.workflow, &run.metadata, &run.run_id],
        )
        .await
        .context("reading the run's approvals failed")?;
    Ok((row.get(0), row.get(1)))
}
