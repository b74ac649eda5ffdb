//! Drain rate: how fast 8 claimers empty a queue of runs with a trivial handler.
//!
//! It is measured three ways. Eight tasks call `Queue::claim` then `Queue::finish` in a
//! loop, one claim and one finish per run as the reference worker does, either awaiting
//! each finish or overlapping it with the next claim. The real daemon
//! runs with concurrency 8, so it also starts an event writer per run and writes the
//! run's two events. Afterwards every run must be finished successfully, on its first
//! attempt.

use std::time::{Duration, Instant};

use anyhow::ensure;
use futures_util::future::BoxFuture;
use odooops_agent::agent::{self, Mode, Shutdown};
use odooops_agent::db;
use odooops_agent::queue::{ClaimFilter, FinalStatus, Queue, QueueError};
use odooops_agent::workflows::{RunContext, RunResult, Workflow, Workflows};
use serde_json::json;
use tokio::task::{JoinHandle, JoinSet};
use tokio_postgres::Client;

use crate::support::BenchDb;

const QUEUE_RUNS: &str = "
    INSERT INTO ops.runs (project_id, env_id, created_at)
    SELECT 'proj', 'env-dev', clock_timestamp() FROM generate_series(1, $1::int)";

/// Runs per second through `Queue::claim` and `Queue::finish` with `claimers` tasks.
/// With `overlap`, each task claims its next run while the previous finish is still in
/// flight, as graphile-worker's workers do; without it, each finish is awaited first.
pub async fn queue_loop(
    server: &str,
    runs: usize,
    claimers: usize,
    overlap: bool,
) -> anyhow::Result<f64> {
    let db = BenchDb::migrated(server, "drain_queue").await?;
    let client = db.client().await?;
    let settings = db.settings(&format!("[database]\npool_size = {}\n", claimers * 2 + 2))?;
    let pool = db::pool(&settings.database).map_err(anyhow::Error::msg)?;
    let queue = Queue::new(
        pool,
        ClaimFilter {
            worker_id: "bench-drain".to_string(),
            env_ids: None,
            workflows: Some(vec!["build".to_string()]),
            lease: Duration::from_secs(60),
        },
    );
    // Opens the pooled connections before the clock starts, as a running agent has.
    let mut warm = JoinSet::new();
    for _ in 0..claimers {
        let queue = queue.clone();
        warm.spawn(async move { queue.claim().await });
    }
    while let Some(result) = warm.join_next().await {
        result??;
    }

    client.execute(QUEUE_RUNS, &[&(runs as i32)]).await?;
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..claimers {
        tasks.spawn(claim_and_finish(queue.clone(), overlap));
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    let elapsed = started.elapsed();

    check_drained(&client, runs).await?;
    db.drop().await?;
    Ok(runs as f64 / elapsed.as_secs_f64())
}

/// Claims and finishes runs until none is left.
async fn claim_and_finish(queue: Queue, overlap: bool) -> anyhow::Result<()> {
    let mut in_flight: Option<JoinHandle<Result<(), QueueError>>> = None;
    while let Some(run) = queue.claim().await? {
        if let Some(finish) = in_flight.take() {
            finish.await??;
        }
        let queue = queue.clone();
        let finish = async move {
            let metadata = json!({});
            queue
                .finish(run.lease, FinalStatus::Success, &metadata)
                .await
        };
        if overlap {
            in_flight = Some(tokio::spawn(finish));
        } else {
            finish.await?;
        }
    }
    if let Some(finish) = in_flight {
        finish.await??;
    }
    Ok(())
}

struct NoopWorkflow;

impl Workflow for NoopWorkflow {
    fn execute<'a>(&'a self, _ctx: &'a RunContext) -> BoxFuture<'a, RunResult> {
        Box::pin(async { Ok(json!({})) })
    }
}

/// Runs per second through the daemon (`agent::run` in `--once` mode).
pub async fn daemon(server: &str, runs: usize, concurrency: usize) -> anyhow::Result<f64> {
    let db = BenchDb::migrated(server, "drain_daemon").await?;
    let client = db.client().await?;
    let settings = db.settings(&format!(
        "[agent]\nworker_id = \"bench-drain\"\nconcurrency = {concurrency}\n\
         [database]\npool_size = {}\n",
        concurrency * 2 + 2
    ))?;
    let mut workflows = Workflows::new();
    workflows.register("build", NoopWorkflow);

    client.execute(QUEUE_RUNS, &[&(runs as i32)]).await?;
    let started = Instant::now();
    let summary = agent::run(settings, workflows, Mode::Once, Shutdown::default()).await?;
    let elapsed = started.elapsed();

    ensure!(
        summary.claimed == runs as u64,
        "daemon claimed {} runs, expected {runs}",
        summary.claimed
    );
    check_drained(&client, runs).await?;
    db.drop().await?;
    Ok(runs as f64 / elapsed.as_secs_f64())
}

async fn check_drained(client: &Client, runs: usize) -> anyhow::Result<()> {
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE status = 'success' AND attempt = 1),
                    count(*)
               FROM ops.runs",
            &[],
        )
        .await?;
    let (succeeded, total): (i64, i64) = (row.get(0), row.get(1));
    ensure!(
        succeeded == runs as i64 && total == runs as i64,
        "{succeeded} of {total} runs succeeded on their first attempt, expected {runs}"
    );
    Ok(())
}
