//! Queue, event and idle benchmarks of odooops-agent against a real PostgreSQL, with
//! graphile-worker and psql COPY as references. Prints a table of figures and targets.
//!
//! Run through scripts/bench, or as `cargo bench --bench queue -- [quick] [NAME...]`
//! with ODOOOPS_DATABASE_URL naming a server where the role may create databases.
//! NAME is one of latency, claim, ingest, drain, idle (default: all); `quick` runs
//! smaller counts for a trial run whose figures are not comparable. Every benchmark
//! uses a fresh database, dropped at the end.

mod claim;
mod drain;
mod graphile;
mod idle;
mod ingest;
mod latency;
mod report;
mod support;

use std::time::Duration;

use anyhow::{bail, Context};
use report::{group_thousands, ms, rate, Figure};
use support::{median, Samples};

const BENCHMARKS: &[&str] = &["latency", "claim", "ingest", "drain", "idle"];

/// Counts for one benchmark run.
struct Scale {
    latency_runs: usize,
    latency_warmup: usize,
    /// Pause before queuing each run, so the previous one has finished.
    latency_gap: Duration,
    history_sizes: Vec<u64>,
    claims_per_size: usize,
    ingest_lines: usize,
    insert_lines: usize,
    drain_runs: usize,
    drain_claimers: usize,
    /// Rounds of the drain comparison, alternating ours and graphile-worker's so that a
    /// change in the machine's load hits both alike; the median is reported.
    drain_rounds: usize,
    /// Rounds of the ingest comparison with COPY, alternated the same way.
    ingest_rounds: usize,
    idle_window: Duration,
}

impl Scale {
    fn full() -> Scale {
        Scale {
            latency_runs: 1_000,
            latency_warmup: 20,
            latency_gap: Duration::from_millis(20),
            history_sizes: vec![0, 100_000, 1_000_000],
            claims_per_size: 1_000,
            ingest_lines: 200_000,
            insert_lines: 10_000,
            drain_runs: 20_000,
            drain_claimers: 8,
            drain_rounds: 2,
            ingest_rounds: 3,
            idle_window: Duration::from_secs(60),
        }
    }

    fn quick() -> Scale {
        Scale {
            latency_runs: 100,
            history_sizes: vec![0, 10_000, 100_000],
            claims_per_size: 200,
            ingest_lines: 50_000,
            insert_lines: 2_000,
            drain_runs: 2_000,
            drain_rounds: 1,
            ingest_rounds: 1,
            idle_window: Duration::from_secs(10),
            ..Scale::full()
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // cargo bench passes --bench; every other argument selects benchmarks.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let quick = args.iter().any(|arg| arg == "quick");
    let mut selected: Vec<&str> = Vec::new();
    for arg in args.iter().filter(|arg| *arg != "quick") {
        match BENCHMARKS.iter().find(|name| *name == arg) {
            Some(name) => selected.push(name),
            None => bail!("unknown benchmark {arg:?}; expected one of {BENCHMARKS:?}"),
        }
    }
    if selected.is_empty() {
        selected = BENCHMARKS.to_vec();
    }
    let scale = if quick { Scale::quick() } else { Scale::full() };
    let server = std::env::var("ODOOOPS_DATABASE_URL")
        .context("ODOOOPS_DATABASE_URL is not set: run scripts/bench, or set it to a server")?;
    support::drop_leftover_databases(&server).await?;

    let mut figures = Vec::new();
    let mut loads = Vec::new();
    for name in selected {
        eprintln!("benchmark {name}{}", if quick { " (quick)" } else { "" });
        let load_before = load_average();
        let found = match name {
            "latency" => latency_figures(&server, &scale).await?,
            "claim" => claim_figures(&server, &scale).await?,
            "ingest" => ingest_figures(&server, &scale).await?,
            "drain" => drain_figures(&server, &scale).await?,
            _ => idle_figures(&server, &scale).await?,
        };
        for figure in &found {
            eprintln!("  {}: {} {}", figure.name, figure.ours, figure.reference);
        }
        figures.extend(found);
        loads.push(format!("{name} {load_before} -> {}", load_average()));
    }
    println!();
    report::print_table(&figures);
    // Other work on the machine shows up in every figure; the load average shows how much there was.
    println!(
        "\nload average (1 min) before -> after: {}",
        loads.join(", ")
    );
    Ok(())
}

/// Reads the 1-minute load average from /proc/loadavg.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".to_string())
}

async fn latency_figures(server: &str, scale: &Scale) -> anyhow::Result<Vec<Figure>> {
    let (count, warmup, gap) = (scale.latency_runs, scale.latency_warmup, scale.latency_gap);
    // Two halves each, alternating, so a change in load hits both queues alike.
    let per_round = count.div_ceil(2);
    let (mut ours, mut theirs, mut version) = (Vec::new(), Vec::new(), String::new());
    for _ in 0..2 {
        ours.extend_from_slice(
            latency::ours(server, per_round, warmup, gap)
                .await?
                .values(),
        );
        let gap_ms = gap.as_millis() as u64;
        let (samples, found) = graphile::latency(server, per_round, warmup, gap_ms).await?;
        theirs.extend_from_slice(samples.values());
        version = found;
    }
    let (ours, theirs) = (Samples::new(ours), Samples::new(theirs));
    let name = |p: &str| format!("commit to claimed, {p} of {} runs", ours.len());
    Ok([(50.0, "p50"), (99.0, "p99")]
        .into_iter()
        .map(|(percent, label)| {
            let (ours, theirs) = (ours.percentile(percent), theirs.percentile(percent));
            Figure::new(name(label), ms(ours))
                .reference(format!("graphile-worker {version}: {}", ms(theirs)))
                .target("no slower than graphile-worker", ours <= theirs)
        })
        .collect())
}

async fn claim_figures(server: &str, scale: &Scale) -> anyhow::Result<Vec<Figure>> {
    let sizes = &scale.history_sizes;
    let found = claim::ours(server, sizes, scale.claims_per_size).await?;
    let baseline = found
        .first()
        .map_or(f64::NAN, |f| f.samples.percentile(50.0));
    Ok(found
        .iter()
        .map(|figure| {
            let (p50, p99) = (
                figure.samples.percentile(50.0),
                figure.samples.percentile(99.0),
            );
            // Flat: within half again of the claim time on an empty history.
            let met = p50 < 1.0 && p50 <= baseline * 1.5;
            Figure::new(
                format!(
                    "claim with {} finished runs",
                    group_thousands(figure.history)
                ),
                format!("p50 {}, p99 {}", ms(p50), ms(p99)),
            )
            .reference(format!(
                "server p50 {}; one-row UPDATE p50 {} ({} claims)",
                ms(figure.server.percentile(50.0)),
                ms(figure.commit_floor.percentile(50.0)),
                figure.samples.len()
            ))
            .target("p50 under 1 ms, within 1.5x of empty", met)
        })
        .collect())
}

async fn ingest_figures(server: &str, scale: &Scale) -> anyhow::Result<Vec<Figure>> {
    let found = ingest::measure(
        server,
        scale.ingest_lines,
        scale.ingest_rounds,
        scale.insert_lines,
    )
    .await?;
    let lines = group_thousands(found.lines as u64);
    let ratio = found.sink / found.copy;
    Ok(vec![
        Figure::new(
            format!("event ingest, {lines} lines, EventSink"),
            rate(found.sink, "lines"),
        )
        .reference(format!(
            "psql COPY: {} ({ratio:.2}x)",
            rate(found.copy, "lines")
        ))
        .target("at least 0.7x COPY, no line lost", ratio >= 0.7),
        Figure::new(
            format!(
                "event ingest, one INSERT per line ({} lines)",
                group_thousands(found.insert_lines as u64)
            ),
            rate(found.insert, "lines"),
        )
        .reference(format!(
            "median of {} rounds for the two above",
            found.rounds
        )),
    ])
}

async fn drain_figures(server: &str, scale: &Scale) -> anyhow::Result<Vec<Figure>> {
    let (runs, claimers) = (scale.drain_runs, scale.drain_claimers);
    let mut rates: [Vec<f64>; 4] = Default::default();
    for _ in 0..scale.drain_rounds {
        rates[0].push(drain::queue_loop(server, runs, claimers, false).await?);
        rates[1].push(drain::queue_loop(server, runs, claimers, true).await?);
        rates[2].push(drain::daemon(server, runs, claimers).await?);
        rates[3].push(graphile::drain(server, runs, claimers).await?);
    }
    let [awaited, overlapped, daemon, theirs] = rates.map(|found| median(&found));
    let reference = format!("graphile-worker: {}", rate(theirs, "jobs"));
    let target = "at least graphile-worker's rate";
    let runs = group_thousands(runs as u64);
    Ok(vec![
        Figure::new(
            format!("drain {runs} runs, {claimers} claim+finish loops"),
            rate(awaited, "runs"),
        )
        .reference(reference.clone())
        .target(target, awaited >= theirs),
        Figure::new(
            format!("drain {runs} runs, {claimers} loops, finish overlapping next claim"),
            rate(overlapped, "runs"),
        )
        .reference(reference.clone())
        .target(target, overlapped >= theirs),
        Figure::new(
            format!("drain {runs} runs, daemon with concurrency {claimers}"),
            rate(daemon, "runs"),
        )
        .reference(format!(
            "{reference} (median of {} rounds)",
            scale.drain_rounds
        )),
    ])
}

async fn idle_figures(server: &str, scale: &Scale) -> anyhow::Result<Vec<Figure>> {
    let found = idle::measure(server, scale.idle_window).await?;
    let megabytes = |kib: u64| kib as f64 * 1024.0 / 1e6;
    let (rss, hwm) = (megabytes(found.rss_kib), megabytes(found.hwm_kib));
    let window = found.window.as_secs();
    Ok(vec![
        Figure::new(
            "idle agent memory (VmRSS / VmHWM)",
            format!("{rss:.1} MB / {hwm:.1} MB"),
        )
        .reference(format!("{} threads", found.threads))
        .target("under 15 MB", rss < 15.0 && hwm < 15.0),
        Figure::new(
            format!("idle agent CPU over {window} s"),
            format!("{:.3} %", found.cpu_percent),
        )
        .reference(format!("{} clock ticks", found.cpu_ticks))
        .target("under 0.1 %", found.cpu_percent < 0.1),
    ])
}
