//! Claim time as the history of finished runs grows.
//!
//! For each history size, finished runs are added with generate_series, a batch of runs
//! is queued, and the table is vacuumed and analyzed (as autovacuum would). The queued
//! runs are then claimed one by one through `Queue::claim`, timing each call from the
//! client.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use odooops_agent::db;
use odooops_agent::queue::{ClaimFilter, Queue};
use tokio_postgres::Client;

use crate::support::{millis, BenchDb, Samples};

/// Claim time at one history size.
pub struct ClaimFigures {
    pub history: u64,
    /// Round trips of `Queue::claim`, commit included.
    pub samples: Samples,
    /// Execution Time that EXPLAIN ANALYZE reports for the claim, which excludes the
    /// network, planning and the commit's WAL flush.
    pub server: Samples,
    /// Round trips of an autocommitted one-row UPDATE, timed alternately with the claims:
    /// the floor that the commit's WAL flush sets on this machine.
    pub commit_floor: Samples,
}

/// Finished runs spread over the last year: mostly successes, some failures and
/// cancellations, as a real history has.
const INSERT_HISTORY: &str = "
    INSERT INTO ops.runs (project_id, env_id, status, git_sha, git_ref, attempt,
                          created_at, started_at, finished_at)
    SELECT 'proj', 'env-dev',
           (ARRAY['success', 'success', 'success', 'failed', 'cancelled'])[1 + i % 5],
           md5(i::text), 'main', 1, t, t + interval '2 seconds', t + interval '3 minutes'
      FROM generate_series($1::bigint + 1, $2::bigint) AS i,
           LATERAL (SELECT now() - interval '400 days' + i * interval '30 seconds' AS t) x";

const QUEUE_BATCH: &str = "
    INSERT INTO ops.runs (project_id, env_id, git_sha, created_at)
    SELECT 'proj', 'env-dev', md5(i::text), clock_timestamp()
      FROM generate_series(1, $1::int) AS i";

pub async fn ours(server: &str, sizes: &[u64], claims: usize) -> anyhow::Result<Vec<ClaimFigures>> {
    let db = BenchDb::migrated(server, "claim").await?;
    let client = db.client().await?;
    let settings = db.settings("")?;
    let pool = db::pool(&settings.database).map_err(anyhow::Error::msg)?;
    let queue = Queue::new(
        pool,
        ClaimFilter {
            worker_id: "bench-claim".to_string(),
            env_ids: None,
            workflows: Some(vec!["build".to_string()]),
            lease: Duration::from_secs(60),
        },
    );

    // The first call opens the pooled connection and prepares the statement.
    queue.claim().await?;
    client
        .batch_execute("CREATE TABLE commit_floor (n bigint); INSERT INTO commit_floor VALUES (0)")
        .await?;

    let mut figures = Vec::new();
    let mut history = 0u64;
    for &size in sizes {
        grow_history(&client, history, size).await?;
        history = size.max(history);
        client.execute(QUEUE_BATCH, &[&(claims as i32)]).await?;
        // Autovacuum would analyze after this many new rows; without it, the planner
        // still sees the empty table that the first size starts with.
        client.batch_execute("VACUUM ANALYZE ops.runs").await?;
        let server = explain_claims(&client, claims / 10).await?;
        let (samples, commit_floor) = time_claims(&client, &queue, claims).await?;
        figures.push(ClaimFigures {
            history,
            samples,
            server,
            commit_floor,
        });
    }
    db.drop().await?;
    Ok(figures)
}

async fn grow_history(client: &Client, from: u64, to: u64) -> anyhow::Result<()> {
    if to > from {
        let started = Instant::now();
        client
            .execute(INSERT_HISTORY, &[&(from as i64), &(to as i64)])
            .await
            .context("inserting finished runs failed")?;
        eprintln!(
            "  inserted {} finished runs in {:.1} s",
            to - from,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Claims `claims` queued runs through the queue, one by one, and finishes them so they
/// join the history. Returns the claim round trips and, timed between them, those of a
/// one-row UPDATE.
async fn time_claims(
    client: &Client,
    queue: &Queue,
    claims: usize,
) -> anyhow::Result<(Samples, Samples)> {
    let bump = client.prepare("UPDATE commit_floor SET n = n + 1").await?;
    let mut samples = Vec::with_capacity(claims);
    let mut floor = Vec::with_capacity(claims);
    for _ in 0..claims {
        let started = Instant::now();
        let run = queue.claim().await?;
        samples.push(millis(started.elapsed()));
        if run.is_none() {
            bail!("a queued run was not claimable");
        }

        let started = Instant::now();
        client.execute(&bump, &[]).await?;
        floor.push(millis(started.elapsed()));
    }
    client
        .execute(
            "UPDATE ops.runs SET status = 'success', finished_at = now(), lease_token = NULL
              WHERE status = 'running'",
            &[],
        )
        .await?;
    Ok((Samples::new(samples), Samples::new(floor)))
}

/// Runs the claim under EXPLAIN ANALYZE `count` times, each in a transaction that is
/// rolled back, and returns the server's execution times.
async fn explain_claims(client: &Client, count: usize) -> anyhow::Result<Samples> {
    let explain = client
        .prepare(
            "EXPLAIN (ANALYZE, FORMAT JSON)
             SELECT * FROM ops.claim_next_run('bench-claim', NULL, '{build}', 60)",
        )
        .await?;
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        client.batch_execute("BEGIN").await?;
        let row = client.query_one(&explain, &[]).await?;
        client.batch_execute("ROLLBACK").await?;
        let plan: serde_json::Value = row.get(0);
        let time = plan[0]["Execution Time"]
            .as_f64()
            .context("EXPLAIN output has no Execution Time")?;
        samples.push(time);
    }
    Ok(Samples::new(samples))
}
