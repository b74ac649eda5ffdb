//! The daemon: claims runs within the concurrency limit, wakes on notifications, reaps
//! expired leases, holds back runs that need the Docker engine while it is down, and
//! drains on shutdown.

mod engine;
mod runner;
mod shutdown;
mod sweeper;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::queue::{listener, ClaimFilter, ClaimedRun, Queue, QueueError};
use crate::systemd;
use crate::workflows::Workflows;

pub use runner::StopReason;
pub use shutdown::Shutdown;

/// Maximum pause between claim attempts while the database is unreachable.
const MAX_CLAIM_BACKOFF: Duration = Duration::from_secs(30);
/// Consecutive failed claims after which [`Mode::Once`] gives up, after about 13 s of
/// backoff, because a cron job should fail and report rather than wait forever.
const ONCE_MAX_CLAIM_FAILURES: u32 = 8;
/// How long handed-back runs get to write their last events and release their leases.
const HAND_BACK_TIMEOUT: Duration = Duration::from_secs(45);

/// When the claim loop exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Until shutdown.
    Daemon,
    /// As soon as nothing is claimable and no run is in progress.
    Once,
}

/// State shared by every run task.
pub(crate) struct Shared {
    pub settings: Arc<Settings>,
    pub workflows: Workflows,
    pub queue: Queue,
    pub hand_back: CancellationToken,
    pub engine: engine::Engine,
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
    let reaped = Arc::new(Notify::new());
    // Reaps once before the first claim, so that `--once` also takes back the runs of an
    // agent that died. The claim loop reports a database that fails here.
    if let Err(err) = take_back_expired(&queue, &reaped).await {
        tracing::debug!(error = %err, "reaping expired leases at start failed");
    }
    tokio::spawn(reap_expired_leases(
        queue.clone(),
        settings.agent.reap_interval,
        reaped.clone(),
        background.clone(),
    ));
    if serves(&queue, "build") {
        tokio::spawn(sweeper::run(
            settings.clone(),
            queue.clone(),
            reaped,
            background.clone(),
        ));
    }
    tokio::spawn(systemd::watchdog(background.clone()));
    // Only a daemon schedules: a `--once` run must not queue work it would then claim.
    if mode == Mode::Daemon {
        tokio::spawn(crate::workflows::backup::scheduler::run(
            settings.clone(),
            queue.pool().clone(),
            background.clone(),
        ));
    }

    let served = queue.filter().workflows.clone().unwrap_or_default();
    let engine = engine::watch(&settings, &served, wake.clone(), background.clone()).await;
    let shared = Arc::new(Shared {
        settings: settings.clone(),
        workflows,
        queue,
        hand_back: shutdown.hand_back.clone(),
        engine,
    });
    tracing::info!(
        worker.id = %shared.queue.worker_id(),
        concurrency = settings.agent.concurrency,
        environments = ?settings.agent.environments,
        "agent started"
    );
    warn_unknown_environments(&shared.queue, &settings.agent.environments).await;
    systemd::notify_ready();

    let mut tasks = JoinSet::new();
    let outcome = claim_loop(&shared, mode, &shutdown, &wake, &mut tasks).await;

    systemd::notify_stopping();
    drain(&mut tasks, settings.agent.shutdown_grace, &shutdown).await;
    background.cancel();
    let summary = outcome?;
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

/// Returns whether the agent claims runs of `workflow`.
fn serves(queue: &Queue, workflow: &str) -> bool {
    let served = queue.filter().workflows.as_ref();
    served.is_none_or(|names| names.iter().any(|name| name == workflow))
}

async fn claim_loop(
    shared: &Arc<Shared>,
    mode: Mode,
    shutdown: &Shutdown,
    wake: &Notify,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<Summary> {
    let slots = Arc::new(Semaphore::new(shared.settings.agent.concurrency));
    let mut summary = Summary::default();
    let mut backoff = Backoff::default();
    loop {
        while let Some(joined) = tasks.try_join_next() {
            log_task_failure(joined);
        }
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("semaphore never closes"),
            _ = shutdown.stopping() => break,
        };
        if shutdown.is_stopping() {
            break;
        }
        // The database starts the lease after this instant, so a lease deadline counted
        // from it is never later than the database's.
        // NOTE: a stop request does not interrupt a claim in flight, so a database that
        // stopped replying delays shutdown by up to queue::CALL_TIMEOUT (30 s).
        let claimed_at = Instant::now();
        match claim(shared).await {
            Ok(Some(run)) => {
                summary.claimed += 1;
                backoff.succeed();
                tasks.spawn(runner::execute(run, claimed_at, shared.clone(), permit));
            }
            Ok(None) => {
                drop(permit);
                backoff.succeed();
                if mode == Mode::Once && tasks.is_empty() {
                    break;
                }
                let poll = shared.settings.agent.poll_interval;
                if !wait_for_work(mode, poll, shutdown, wake, tasks).await {
                    break;
                }
            }
            Err(err) => {
                drop(permit);
                let delay = backoff.fail();
                if mode == Mode::Once && backoff.failures >= ONCE_MAX_CLAIM_FAILURES {
                    let failures = backoff.failures;
                    anyhow::bail!("claiming a run failed {failures} times in a row: {err}");
                }
                let retry_in_ms = delay.as_millis() as u64;
                tracing::warn!(error = %err, retry_in_ms, "claiming a run failed");
                if !wait_after_failure(delay, shutdown, wake).await {
                    break;
                }
            }
        }
    }
    Ok(summary)
}

/// Claims a run, while the Docker engine is down only one that needs no engine.
async fn claim(shared: &Shared) -> Result<Option<ClaimedRun>, QueueError> {
    if shared.engine.is_up() {
        shared.queue.claim().await
    } else {
        engine::claim_without_engine(shared).await
    }
}

/// Consecutive failed claims and the pause before the next attempt.
struct Backoff {
    failures: u32,
    delay: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            failures: 0,
            delay: Duration::from_millis(100),
        }
    }
}

impl Backoff {
    /// Starts over after a claim that reached the database, and reports the recovery
    /// when claims had been failing.
    fn succeed(&mut self) {
        if self.failures > 0 {
            tracing::info!(
                failures = self.failures,
                "claiming works again; the control plane database answered"
            );
        }
        *self = Backoff::default();
    }

    /// Counts a failure and returns the pause before the next attempt.
    fn fail(&mut self) -> Duration {
        self.failures += 1;
        let delay = self.delay;
        self.delay = (delay * 2).min(MAX_CLAIM_BACKOFF);
        delay
    }
}

/// Waits for a wake-up, the poll interval or, in [`Mode::Once`], the end of a run.
/// Returns false when a stop is requested.
async fn wait_for_work(
    mode: Mode,
    poll_interval: Duration,
    shutdown: &Shutdown,
    wake: &Notify,
    tasks: &mut JoinSet<()>,
) -> bool {
    tokio::select! {
        _ = wake.notified() => true,
        _ = tokio::time::sleep(poll_interval) => true,
        _ = shutdown.stopping() => false,
        Some(joined) = tasks.join_next(), if mode == Mode::Once => {
            log_task_failure(joined);
            true
        }
    }
}

/// Waits out `delay` after a failed claim, or until the listener reconnects, which is the
/// first sign that the database is back. Returns false when a stop is requested.
async fn wait_after_failure(delay: Duration, shutdown: &Shutdown, wake: &Notify) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = wake.notified() => true,
        _ = shutdown.stopping() => false,
    }
}

/// Logs a run task that panicked outside its workflow, which catches its own panics.
fn log_task_failure(joined: Result<(), tokio::task::JoinError>) {
    if let Err(err) = joined {
        if err.is_panic() {
            tracing::error!(error = %err, "a run task panicked; its lease will expire");
        }
    }
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
    let all_done = async {
        while let Some(joined) = tasks.join_next().await {
            log_task_failure(joined);
        }
    };
    let finished = tokio::select! {
        _ = all_done => true,
        _ = tokio::time::sleep(grace) => false,
        _ = shutdown.hand_back.cancelled() => false,
    };
    if finished {
        tracing::info!(
            waited_ms = started.elapsed().as_millis() as u64,
            "runs finished"
        );
        return;
    }
    tracing::warn!(
        runs = tasks.len(),
        "grace period over; handing running runs back"
    );
    shutdown.hand_back.cancel();
    let handed_back = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(HAND_BACK_TIMEOUT, handed_back)
        .await
        .is_err()
    {
        tracing::error!(
            runs = tasks.len(),
            "runs did not stop in time; their leases will expire and be reaped"
        );
        tasks.abort_all();
    }
}

/// Takes back expired leases every `interval` until `stop`, and notifies `reaped` when it
/// took back runs.
async fn reap_expired_leases(
    queue: Queue,
    interval: Duration,
    reaped: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut failures = 0u32;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.cancelled() => return,
        }
        match take_back_expired(&queue, &reaped).await {
            Ok(()) => failures = 0,
            Err(err) => {
                failures += 1;
                if failures.is_power_of_two() {
                    tracing::warn!(error = %err, failures, "reaping expired leases failed");
                }
            }
        }
    }
}

/// Takes back the runs whose lease expired, logs each, and notifies `reaped` when there
/// were any.
async fn take_back_expired(queue: &Queue, reaped: &Notify) -> Result<(), QueueError> {
    let runs = queue.reap_expired().await?;
    if !runs.is_empty() {
        reaped.notify_one();
    }
    for run in runs {
        tracing::warn!(
            run.id = %run.run_id,
            worker.id = run.worker_id.as_deref().unwrap_or(""),
            action = %run.action,
            "took back a run whose lease expired"
        );
    }
    Ok(())
}

/// Warns about entries of agent.environments that ops.environments does not have: no
/// run can be queued for them, so a typo would leave the agent idle without a word. The
/// claim loop reports a database that does not respond.
async fn warn_unknown_environments(queue: &Queue, configured: &[String]) {
    if configured.is_empty() {
        return;
    }
    let Ok(known) = queue.environment_ids().await else {
        return;
    };
    let unknown: Vec<&String> = configured.iter().filter(|id| !known.contains(id)).collect();
    if !unknown.is_empty() {
        tracing::warn!(
            environments = ?unknown,
            "agent.environments names environments that ops.environments does not have; \
             no run will be claimed for them"
        );
    }
}
