//! Workflows that tests register under the standard names, so the agent claims their runs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use odooops_agent::workflows::{RunContext, RunResult, StepError, StepResultExt, Workflow};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{watch, Notify};

/// Records each claim in the table test_claims (created by [`create_claims_table`]).
pub struct Record;

pub async fn create_claims_table(client: &tokio_postgres::Client) {
    client
        .batch_execute("CREATE TABLE test_claims (run_id uuid NOT NULL, worker_id text NOT NULL)")
        .await
        .expect("creating test_claims");
}

impl Workflow for Record {
    fn execute<'a>(&'a self, ctx: &'a RunContext) -> BoxFuture<'a, RunResult> {
        Box::pin(async move {
            let client = ctx.pool().get().await.step("connect")?;
            client
                .execute(
                    "INSERT INTO test_claims (run_id, worker_id) VALUES ($1, $2)",
                    &[&ctx.run.run_id, &ctx.queue.worker_id()],
                )
                .await
                .step("record")?;
            Ok(json!({ "recorded_by": ctx.queue.worker_id() }))
        })
    }
}

/// Succeeds at once.
pub struct Succeed;

impl Workflow for Succeed {
    fn execute<'a>(&'a self, _ctx: &'a RunContext) -> BoxFuture<'a, RunResult> {
        Box::pin(async { Ok(json!({ "done": true })) })
    }
}

/// Condition that lets a [`Block`] run finish.
#[derive(Clone)]
pub enum Release {
    /// Only cancellation ends the run.
    Never,
    /// The run succeeds once this file exists (for agents in another process).
    File(PathBuf),
    /// The run succeeds once the value turns true.
    Signal(watch::Receiver<bool>),
}

/// Writes the event "working", then waits for its release or for cancellation. A
/// cancelled run writes "stopped by cancellation", notifies `cancelled` and fails.
pub struct Block {
    pub release: Release,
    pub cancelled: Arc<Notify>,
}

impl Block {
    pub fn new(release: Release) -> Block {
        Block {
            release,
            cancelled: Arc::new(Notify::new()),
        }
    }
}

impl Workflow for Block {
    fn execute<'a>(&'a self, ctx: &'a RunContext) -> BoxFuture<'a, RunResult> {
        Box::pin(async move {
            ctx.events.info("working").await;
            tokio::select! {
                _ = released(self.release.clone()) => Ok(json!({ "released": true })),
                _ = ctx.cancel.cancelled() => {
                    ctx.events.warn("stopped by cancellation").await;
                    self.cancelled.notify_one();
                    Err(StepError::new("block", anyhow::anyhow!("stopped by cancellation")))
                }
            }
        })
    }
}

async fn released(release: Release) {
    match release {
        Release::Never => std::future::pending().await,
        Release::File(path) => {
            while !path.exists() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Release::Signal(mut released) => {
            // An error means the sender is gone; such a run is only ended by cancellation.
            if released.wait_for(|value| *value).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Sends `lines` info events "line 0", "line 1", ... and succeeds.
pub struct Chatty {
    pub lines: usize,
}

impl Workflow for Chatty {
    fn execute<'a>(&'a self, ctx: &'a RunContext) -> BoxFuture<'a, RunResult> {
        Box::pin(async move {
            for line in 0..self.lines {
                ctx.events.info(format!("line {line}")).await;
            }
            Ok(json!({ "lines": self.lines }))
        })
    }
}

/// Panics inside the workflow.
pub struct Panic;

impl Workflow for Panic {
    fn execute<'a>(&'a self, _ctx: &'a RunContext) -> BoxFuture<'a, RunResult> {
        Box::pin(async { panic!("test workflow panics on purpose") })
    }
}

/// Requires metadata with a string `image` and a numeric `replicas`.
pub struct NeedsMetadata;

#[derive(Deserialize)]
#[allow(dead_code)]
struct DeployMetadata {
    image: String,
    replicas: u32,
}

impl Workflow for NeedsMetadata {
    fn execute<'a>(&'a self, ctx: &'a RunContext) -> BoxFuture<'a, RunResult> {
        Box::pin(async move {
            let metadata: DeployMetadata = ctx.metadata()?;
            Ok(json!({ "deployed": metadata.image }))
        })
    }
}

/// Succeeds with the given value as its result metadata.
pub struct Returns(pub serde_json::Value);

impl Workflow for Returns {
    fn execute<'a>(&'a self, _ctx: &'a RunContext) -> BoxFuture<'a, RunResult> {
        Box::pin(async move { Ok(self.0.clone()) })
    }
}

/// Counts the runs executing at once and records the highest count in `max_in_flight`.
/// Each run takes `hold`, so runs allowed to overlap do.
pub struct Gauge {
    pub hold: Duration,
    pub in_flight: Arc<std::sync::atomic::AtomicUsize>,
    pub max_in_flight: Arc<std::sync::atomic::AtomicUsize>,
}

impl Workflow for Gauge {
    fn execute<'a>(&'a self, _ctx: &'a RunContext) -> BoxFuture<'a, RunResult> {
        use std::sync::atomic::Ordering::SeqCst;
        Box::pin(async move {
            let now = self.in_flight.fetch_add(1, SeqCst) + 1;
            self.max_in_flight.fetch_max(now, SeqCst);
            tokio::time::sleep(self.hold).await;
            self.in_flight.fetch_sub(1, SeqCst);
            Ok(json!({}))
        })
    }
}
