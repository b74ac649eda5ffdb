//! graphile-worker, the reference for wake-up latency and drain rate, measured by
//! bench/graphile/bench.js on a database of its own.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::support::{BenchDb, Samples};

fn script_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/graphile")
}

/// Runs bench.js with `args` and parses the JSON object it prints.
fn run_script<T: for<'de> Deserialize<'de>>(args: &[String]) -> anyhow::Result<T> {
    let dir = script_dir();
    if !dir.join("node_modules/graphile-worker").is_dir() {
        bail!(
            "graphile-worker is not installed in {}: run scripts/bench, or `npm ci` there",
            dir.display()
        );
    }
    let output = Command::new("node")
        .arg("bench.js")
        .args(args)
        .current_dir(&dir)
        .output()
        .context("starting node failed; install Node.js 18 or later")?;
    if !output.status.success() {
        bail!(
            "graphile-worker benchmark {} failed with {}: {}",
            args[0],
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "graphile-worker benchmark printed unexpected output: {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

#[derive(Deserialize)]
struct LatencyOutput {
    samples_ms: Vec<f64>,
    graphile_worker: String,
}

/// Milliseconds from addJob's commit to the task handler starting, one job at a time.
pub async fn latency(
    server: &str,
    count: usize,
    warmup: usize,
    gap_ms: u64,
) -> anyhow::Result<(Samples, String)> {
    let db = BenchDb::empty(server, "graphile_latency").await?;
    let args = vec![
        "latency".to_string(),
        db.url.clone(),
        count.to_string(),
        warmup.to_string(),
        gap_ms.to_string(),
    ];
    let output = tokio::task::spawn_blocking(move || run_script::<LatencyOutput>(&args)).await?;
    db.drop().await?;
    let output = output?;
    Ok((Samples::new(output.samples_ms), output.graphile_worker))
}

#[derive(Deserialize)]
struct DrainOutput {
    jobs_per_second: f64,
}

/// Jobs per second while draining `jobs` jobs with `concurrency` workers.
pub async fn drain(server: &str, jobs: usize, concurrency: usize) -> anyhow::Result<f64> {
    let db = BenchDb::empty(server, "graphile_drain").await?;
    let args = vec![
        "drain".to_string(),
        db.url.clone(),
        jobs.to_string(),
        concurrency.to_string(),
    ];
    let output = tokio::task::spawn_blocking(move || run_script::<DrainOutput>(&args)).await?;
    db.drop().await?;
    Ok(output?.jobs_per_second)
}
