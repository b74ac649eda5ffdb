//! Event ingest rate: the agent's path (EventSink → ops.append_events) against psql's
//! COPY of the same rows and against one INSERT per line, all into ops.run_events.
//!
//! Each measurement writes to a run of its own and is checked afterwards: the run must
//! have exactly the lines sent, numbered 1 to N.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use chrono::{SecondsFormat, Utc};
use deadpool_postgres::Pool;
use odooops_agent::db;
use odooops_agent::events::{EventSink, FlushOutcome};
use odooops_agent::queue::{ClaimFilter, Lease, Queue};
use tokio_postgres::Client;
use uuid::Uuid;

use crate::support::{median, BenchDb};

/// Lines per second, as the median of the rounds.
pub struct IngestFigures {
    pub lines: usize,
    pub rounds: usize,
    pub sink: f64,
    pub copy: f64,
    pub insert_lines: usize,
    pub insert: f64,
}

/// Formats a short line of build output, about 70 bytes.
fn line(index: usize) -> String {
    format!("{index:>7} | Step 12/40 : RUN pip install --no-cache-dir -r requirements.txt")
}

pub async fn measure(
    server: &str,
    lines: usize,
    rounds: usize,
    insert_lines: usize,
) -> anyhow::Result<IngestFigures> {
    let db = BenchDb::migrated(server, "ingest").await?;
    let client = db.client().await?;
    let settings = db.settings("")?;
    let pool = db::pool(&settings.database).map_err(anyhow::Error::msg)?;
    let queue = Queue::new(
        pool.clone(),
        ClaimFilter {
            worker_id: "bench-ingest".to_string(),
            env_ids: None,
            workflows: None,
            lease: Duration::from_secs(300),
        },
    );

    let mut sink_rates = Vec::new();
    let mut copy_rates = Vec::new();
    for _ in 0..rounds {
        let lease = claim_fresh_run(&client, &queue).await?;
        copy_rates.push(through_copy(&db.url, &client, lease.run_id, lines).await?);
        let lease = claim_fresh_run(&client, &queue).await?;
        sink_rates.push(through_sink(&pool, &client, lease, lines).await?);
    }
    let lease = claim_fresh_run(&client, &queue).await?;
    let insert = one_insert_per_line(&client, lease.run_id, insert_lines).await?;

    db.drop().await?;
    Ok(IngestFigures {
        lines,
        rounds,
        sink: median(&sink_rates),
        copy: median(&copy_rates),
        insert_lines,
        insert,
    })
}

async fn claim_fresh_run(client: &Client, queue: &Queue) -> anyhow::Result<Lease> {
    client
        .execute("SELECT 1 FROM ops.queue_run('proj', 'env-dev')", &[])
        .await?;
    let run = queue
        .claim()
        .await?
        .context("the queued run was not claimable")?;
    Ok(run.lease)
}

/// Checks that the run contains exactly `lines` events numbered 1 to `lines`.
async fn check_stored(client: &Client, run_id: Uuid, lines: usize) -> anyhow::Result<()> {
    let row = client
        .query_one(
            "SELECT count(*), coalesce(min(seq), 0), coalesce(max(seq), 0)
               FROM ops.run_events WHERE run_id = $1",
            &[&run_id],
        )
        .await?;
    let (count, min, max): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    ensure!(
        count == lines as i64 && min == 1 && max == lines as i64,
        "run {run_id} holds {count} events numbered {min} to {max}, expected {lines}"
    );
    Ok(())
}

async fn through_sink(
    pool: &Pool,
    client: &Client,
    lease: Lease,
    lines: usize,
) -> anyhow::Result<f64> {
    let messages: Vec<String> = (1..=lines).map(line).collect();
    let sink = EventSink::start(pool.clone(), lease);
    let started = Instant::now();
    for message in messages {
        sink.info(message).await;
    }
    let outcome = sink.flush().await;
    let elapsed = started.elapsed();
    if outcome
        != (FlushOutcome::Flushed {
            written: lines as u64,
        })
    {
        bail!("event sink reported {outcome:?} after {lines} lines");
    }
    check_stored(client, lease.run_id, lines).await?;
    Ok(lines as f64 / elapsed.as_secs_f64())
}

/// COPY text format rows matching what the sink writes for the same lines.
fn copy_rows(run_id: Uuid, lines: usize) -> Vec<u8> {
    let created_at = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
    let mut rows = Vec::with_capacity(lines * 140);
    for seq in 1..=lines {
        let message = line(seq);
        writeln!(rows, "{run_id}\t{seq}\tinfo\t{message}\t\\N\t{created_at}").unwrap();
    }
    rows
}

async fn through_copy(
    url: &str,
    client: &Client,
    run_id: Uuid,
    lines: usize,
) -> anyhow::Result<f64> {
    let mut data = tempfile::NamedTempFile::new()?;
    data.write_all(&copy_rows(run_id, lines))?;
    data.flush()?;
    let url = url.to_string();
    let path = data.path().to_path_buf();
    let elapsed = tokio::task::spawn_blocking(move || -> anyhow::Result<Duration> {
        let input = std::fs::File::open(path)?;
        let started = Instant::now();
        let output = Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &url, "-c"])
            .arg(
                "COPY ops.run_events (run_id, seq, level, message, payload, created_at) FROM STDIN",
            )
            .stdin(Stdio::from(input))
            .output()
            .context("running psql failed; install the PostgreSQL client")?;
        let elapsed = started.elapsed();
        ensure!(
            output.status.success(),
            "psql COPY failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(elapsed)
    })
    .await??;
    check_stored(client, run_id, lines).await?;
    Ok(lines as f64 / elapsed.as_secs_f64())
}

/// Writes one autocommitted INSERT per line, the way a naive log shipper does.
async fn one_insert_per_line(client: &Client, run_id: Uuid, lines: usize) -> anyhow::Result<f64> {
    let insert = client
        .prepare(
            "INSERT INTO ops.run_events (run_id, seq, level, message, created_at)
             VALUES ($1, $2, 'info', $3, now())",
        )
        .await?;
    let started = Instant::now();
    for seq in 1..=lines {
        client
            .execute(&insert, &[&run_id, &(seq as i64), &line(seq)])
            .await?;
    }
    let elapsed = started.elapsed();
    check_stored(client, run_id, lines).await?;
    Ok(lines as f64 / elapsed.as_secs_f64())
}
