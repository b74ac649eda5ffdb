//! Wake-up latency: from queue_run's commit to an idle agent's workflow starting.
//!
//! The agent is the real daemon loop (`agent::run`), woken by LISTEN/NOTIFY, with a
//! `build` workflow that only records when it was called. Runs are queued one at a time
//! from a separate connection, with a pause before each so the previous run has finished
//! and the agent is idle again.

use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::future::BoxFuture;
use odooops_agent::agent::{self, Mode, Shutdown};
use odooops_agent::workflows::{RunContext, RunResult, Workflow, Workflows};
use serde_json::json;
use tokio::sync::mpsc;

use crate::support::{millis_between, BenchDb, Samples};

/// Maximum wait for one run to start; the agent's 5 s fallback poll is well within it.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A workflow that sends the instant it was called and succeeds at once.
struct StampWorkflow {
    started: mpsc::UnboundedSender<Instant>,
}

impl Workflow for StampWorkflow {
    fn execute<'a>(&'a self, _ctx: &'a RunContext) -> BoxFuture<'a, RunResult> {
        let _ = self.started.send(Instant::now());
        Box::pin(async { Ok(json!({})) })
    }
}

pub async fn ours(
    server: &str,
    count: usize,
    warmup: usize,
    gap: Duration,
) -> anyhow::Result<Samples> {
    let db = BenchDb::migrated(server, "latency").await?;
    let settings = db.settings("[agent]\nworker_id = \"bench-latency\"\nconcurrency = 1\n")?;
    let (started_tx, mut started_rx) = mpsc::unbounded_channel();
    let mut workflows = Workflows::new();
    workflows.register(
        "build",
        StampWorkflow {
            started: started_tx,
        },
    );
    let shutdown = Shutdown::default();
    let daemon = tokio::spawn(agent::run(
        settings,
        workflows,
        Mode::Daemon,
        shutdown.clone(),
    ));

    let client = db.client().await?;
    let queue_run = client
        .prepare("SELECT run_id FROM ops.queue_run('proj', 'env-dev')")
        .await?;
    let mut samples = Vec::with_capacity(count);
    for index in 0..warmup + count {
        tokio::time::sleep(gap).await;
        client.query_one(&queue_run, &[]).await?;
        let committed = Instant::now();
        let started = tokio::time::timeout(START_TIMEOUT, started_rx.recv())
            .await
            .context("queued run did not start within 15 s")?
            .context("agent stopped")?;
        if index >= warmup {
            samples.push(millis_between(committed, started));
        }
    }

    shutdown.drain.cancel();
    daemon.await??;
    db.drop().await?;
    Ok(Samples::new(samples))
}
