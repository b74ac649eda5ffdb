//! The daemon: claims runs within the concurrency limit, wakes on notifications, reaps
//! expired leases, and drains on shutdown.

mod runner;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::queue::{listener, ClaimFilter, Queue};
use crate::systemd;
use crate::workflows::Workflows;

pub use runner::StopReason;

/// Longest pause between claim attempts while the database is unreachable.
const MAX_CLAIM_BACKOFF: Duration = Duration::from_secs(30);
/// How long handed-back runs get to write their last events and release their leases.
const HAND_BACK_TIMEOUT: Duration = Duration::from_secs(45);

/// How the daemon is told to stop. `drain` stops claiming and waits for running runs up
/// to the grace period; `hand_back` stops them at once and returns them to the queue.
#[derive(Clone, Default)]
pub struct Shutdown {
    pub drain: CancellationToken,
    pub hand_back: CancellationToken,
}

/// When the claim loop exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Until shutdown.
    Daemon,
    /// As soon as nothing is claimable and no run is in progress.
    Once,
}

/// What every run task shares.
pub(crate) struct Shared {
    pub settings: Arc<Settings>,
    pub workflows: Workflows,
    pub queue: Queue,
    pub hand_back: CancellationToken,
}

/// Counts of what the daemon did, for `--once` callers and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub claimed: u64,
}

/// Runs the agent until `shutdown` (or, in [`Mode::Once`], until the queue is empty).
pub async fn run(
    settings: Arc<Settings>,
    workflows: Workflows,
    mode: Mode,
    shutdown: Shutdown,
) -> anyhow::Result<Summary> {
    let pool = crate::db::pool(&settings.database).map_err(anyhow::Error::msg)?;
    let queue = Queue::new(pool, claim_filter(&settings, &workflows));
    let wake = Arc::new(Notify::new());
    let background = CancellationToken::new();

    let serving = queue.clone();
    tokio::spawn(listener::run(
        settings.database.clone(),
        move |env_id| serving.serves_env(env_id),
        wake.clone(),
        background.clone(),
    ));
    tokio::spawn(reap_expired_leases(
        queue.clone(),
        settings.agent.reap_interval,
        background.clone(),
    ));
    tokio::spawn(systemd::watchdog(background.clone()));
    // Only a daemon schedules: a `--once` run must not queue work it would then claim.
    if mode == Mode::Daemon {
        tokio::spawn(crate::workflows::backup::scheduler::run(
            settings.clone(),
            queue.pool().clone(),
            background.clone(),
        ));
    }

    let shared = Arc::new(Shared {
        settings: settings.clone(),
        workflows,
        queue,
        hand_back: shutdown.hand_back.clone(),
    });
    tracing::info!(
        worker.id = %shared.queue.worker_id(),
        concurrency = settings.agent.concurrency,
        environments = ?settings.agent.environments,
        "agent started"
    );
    systemd::notify_ready();

    let mut tasks = JoinSet::new();
    let summary = claim_loop(&shared, mode, &shutdown, &wake, &mut tasks).await;

    systemd::notify_stopping();
    drain(&mut tasks, settings.agent.shutdown_grace, &shutdown).await;
    background.cancel();
    tracing::info!(claimed = summary.claimed, "agent stopped");
    Ok(summary)
}

fn claim_filter(settings: &Settings, workflows: &Workflows) -> ClaimFilter {
    let served: Vec<String> = settings
        .agent
        .workflows
        .iter()
        .filter(|name| workflows.get(name).is_some())
        .cloned()
        .collect();
    let environments = &settings.agent.environments;
    ClaimFilter {
        worker_id: settings.agent.worker_id.clone(),
        env_ids: (!environments.is_empty()).then(|| environments.clone()),
        workflows: Some(served),
        lease: settings.agent.lease,
    }
}

async fn claim_loop(
    shared: &Arc<Shared>,
    mode: Mode,
    shutdown: &Shutdown,
    wake: &Notify,
    tasks: &mut JoinSet<()>,
) -> Summary {
    let slots = Arc::new(Semaphore::new(shared.settings.agent.concurrency));
    let poll_interval = shared.settings.agent.poll_interval;
    let mut summary = Summary::default();
    let mut backoff = Duration::from_millis(100);
    loop {
        while tasks.try_join_next().is_some() {}
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("semaphore never closes"),
            _ = shutdown.drain.cancelled() => break,
        };
        if shutdown.drain.is_cancelled() {
            break;
        }
        match shared.queue.claim().await {
            Ok(Some(run)) => {
                summary.claimed += 1;
                backoff = Duration::from_millis(100);
                tasks.spawn(runner::execute(run, shared.clone(), permit));
            }
            Ok(None) => {
                drop(permit);
                backoff = Duration::from_millis(100);
                if mode == Mode::Once && tasks.is_empty() {
                    break;
                }
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(poll_interval) => {}
                    _ = shutdown.drain.cancelled() => break,
                    Some(_) = tasks.join_next(), if mode == Mode::Once => {}
                }
            }
            Err(err) => {
                drop(permit);
                tracing::warn!(
                    error = %err,
                    retry_in_ms = backoff.as_millis() as u64,
                    "claiming a run failed"
                );
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.drain.cancelled() => break,
                }
                backoff = (backoff * 2).min(MAX_CLAIM_BACKOFF);
            }
        }
    }
    summary
}

/// Waits for running runs up to the grace period, then hands the rest back.
async fn drain(tasks: &mut JoinSet<()>, grace: Duration, shutdown: &Shutdown) {
    if tasks.is_empty() {
        return;
    }
    tracing::info!(
        runs = tasks.len(),
        grace_secs = grace.as_secs(),
        "stopped claiming; waiting for running runs"
    );
    let started = Instant::now();
    let all_done = async { while tasks.join_next().await.is_some() {} };
    let finished = tokio::select! {
        _ = all_done => true,
        _ = tokio::time::sleep(grace) => false,
        _ = shutdown.hand_back.cancelled() => false,
    };
    if finished {
        tracing::info!(waited_ms = started.elapsed().as_millis() as u64, "runs finished");
        return;
    }
    tracing::warn!(runs = tasks.len(), "grace period over; handing running runs back");
    shutdown.hand_back.cancel();
    let handed_back = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(HAND_BACK_TIMEOUT, handed_back).await.is_err() {
        tracing::error!(
            runs = tasks.len(),
            "runs did not stop in time; their leases will expire and be reaped"
        );
        tasks.abort_all();
    }
}

async fn reap_expired_leases(queue: Queue, interval: Duration, stop: CancellationToken) {
    let mut failures = 0u32;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.cancelled() => return,
        }
        match queue.reap_expired().await {
            Ok(reaped) => {
                failures = 0;
                for run in reaped {
                    tracing::warn!(
                        run.id = %run.run_id,
                        worker.id = run.worker_id.as_deref().unwrap_or(""),
                        action = %run.action,
                        "took back a run whose lease expired"
                    );
                }
            }
            Err(err) => {
                failures += 1;
                if failures.is_power_of_two() {
                    tracing::warn!(error = %err, failures, "reaping expired leases failed");
                }
            }
        }
    }
}
