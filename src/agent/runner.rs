//! Executes one claimed run: heartbeats, events, the workflow, and how the run ends.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use serde_json::{json, Value};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use crate::events::{EventSink, FlushOutcome, Level};
use crate::queue::{ClaimedRun, FinalStatus, Lease, Queue, QueueError};
use crate::workflows::{needs_docker, RunContext, RunResult, StepError};

use super::{engine, Shared};

/// How long a workflow has to clean up after its cancel token fires before it is dropped.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Missed pings of the Docker engine after which a run that needs it fails: 30 s with
/// the default docker.ping_interval_secs of 5.
const ENGINE_LOSS_PINGS: u32 = 6;

/// Reason a run stopped before its workflow finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    CancelRequested,
    Shutdown,
    LeaseLost,
    /// The Docker engine stopped replying while the run needed it.
    EngineLost,
}

/// The first stop reason wins, and later ones change nothing. A lost lease fires
/// `lease_lost` even when another reason came first.
#[derive(Default)]
pub(super) struct Stop {
    token: CancellationToken,
    reason: OnceLock<StopReason>,
    /// Fires when the lease is lost, which ends every retry of a write for the run.
    lease_lost: CancellationToken,
}

impl Stop {
    pub(super) fn request(&self, reason: StopReason) {
        if reason == StopReason::LeaseLost {
            self.lease_lost.cancel();
        }
        if self.reason.set(reason).is_ok() {
            self.token.cancel();
        }
    }

    fn reason(&self) -> Option<StopReason> {
        self.reason.get().copied()
    }
}

/// Runs the claimed run to its end. `claimed_at` is when the claim was sent, and the
/// permit is the concurrency slot the run occupies.
pub async fn execute(
    run: ClaimedRun,
    claimed_at: Instant,
    shared: Arc<Shared>,
    _permit: OwnedSemaphorePermit,
) {
    let span = tracing::info_span!(
        "run",
        run.id = %run.run_id,
        run.workflow = %run.workflow,
        env.id = %run.env_id,
        attempt = run.attempt,
    );
    execute_in_span(run, claimed_at, shared)
        .instrument(span)
        .await
}

async fn execute_in_span(run: ClaimedRun, claimed_at: Instant, shared: Arc<Shared>) {
    let started = Instant::now();
    let lease = run.lease;
    let stop = Arc::new(Stop::default());
    let pool = shared.queue.pool().clone();
    let events = EventSink::start_with_expiry(pool, lease, stop.lease_lost.clone());
    let _watchers = watch_over(&run, claimed_at, &shared, &stop);

    tracing::info!("run started");
    events
        .info(format!(
            "Run claimed by {} (attempt {} of {})",
            shared.queue.worker_id(),
            run.attempt,
            run.max_attempts
        ))
        .await;

    let ctx = RunContext {
        run,
        events: events.clone(),
        cancel: stop.token.clone(),
        queue: shared.queue.clone(),
        settings: shared.settings.clone(),
    };
    let result = run_workflow(&ctx, &shared, &stop).await;
    drop(ctx);

    conclude(&shared.queue, lease, &events, &stop, result, started).await;
}

/// Starts the tasks that renew the lease and turn a hand-back request into a stop. They
/// end when the returned handles are dropped, even when the run task unwinds.
fn watch_over(
    run: &ClaimedRun,
    claimed_at: Instant,
    shared: &Shared,
    stop: &Arc<Stop>,
) -> Vec<AbortOnDropHandle<()>> {
    let heartbeat = tokio::spawn(keep_lease(
        shared.queue.clone(),
        run.lease,
        claimed_at,
        shared.settings.agent.heartbeat_interval,
        shared.settings.agent.lease,
        stop.clone(),
    ));
    let hand_back = shared.hand_back.clone();
    let on_shutdown = stop.clone();
    let shutdown_watch = tokio::spawn(async move {
        hand_back.cancelled().await;
        on_shutdown.request(StopReason::Shutdown);
    });
    let mut handles = vec![
        AbortOnDropHandle::new(heartbeat),
        AbortOnDropHandle::new(shutdown_watch),
    ];
    let settings = &shared.settings;
    if needs_docker(&run.workflow, settings.backup.for_env(&run.env_id)) {
        let limit = settings.docker.ping_interval * ENGINE_LOSS_PINGS;
        let watch = engine::fail_run_on_loss(shared.engine.clone(), limit, stop.clone());
        handles.push(AbortOnDropHandle::new(tokio::spawn(watch)));
    }
    handles
}

async fn run_workflow(ctx: &RunContext, shared: &Shared, stop: &Stop) -> RunResult {
    let Some(workflow) = shared.workflows.get(&ctx.run.workflow) else {
        return Err(StepError::invalid(format!(
            "unknown workflow {:?}; this agent runs {}",
            ctx.run.workflow,
            shared.workflows.names().collect::<Vec<_>>().join(", ")
        )));
    };
    // A panicking workflow fails its run like any other error instead of taking the run
    // task down. The call is inside the future, so a panic before the first await counts.
    let execution = AssertUnwindSafe(async { workflow.execute(ctx).await })
        .catch_unwind()
        .map(|outcome| outcome.unwrap_or_else(|panic| Err(panicked(&ctx.run.workflow, panic))));
    tokio::pin!(execution);
    tokio::select! {
        result = &mut execution => result,
        _ = stop.token.cancelled() => {
            match tokio::time::timeout(CLEANUP_TIMEOUT, &mut execution).await {
                Ok(result) => result,
                Err(_) => Err(StepError::new("cancel", anyhow::anyhow!(
                    "workflow did not stop within {} s of cancellation",
                    CLEANUP_TIMEOUT.as_secs()
                ))),
            }
        }
    }
}

fn panicked(workflow: &str, panic: Box<dyn Any + Send>) -> StepError {
    let message = panic
        .downcast_ref::<&str>()
        .map(|text| text.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_string());
    StepError::new(
        "execute",
        anyhow::anyhow!("workflow {workflow} panicked: {message}"),
    )
}

/// Outcome of a run, decided from its stop reason and its workflow's result.
enum Ending {
    /// The lease is gone: nothing may be written for the run any more.
    Abandon,
    /// Back to the queue without using up the attempt.
    HandBack,
    Finish(FinalStatus, Value),
}

/// Decides the outcome and the last event's message. A workflow that returned success did
/// its work, so the run succeeds even when a stop was requested meanwhile. A failure after
/// a stop request is attributed to the stop.
fn ending(reason: Option<StopReason>, result: RunResult, elapsed: f64) -> (Ending, String) {
    match (reason, result) {
        (Some(StopReason::LeaseLost), _) => (Ending::Abandon, String::new()),
        (_, Ok(metadata)) => (
            Ending::Finish(FinalStatus::Success, as_object(metadata)),
            format!("Run succeeded in {elapsed:.1} s"),
        ),
        (Some(StopReason::Shutdown), Err(_)) => (
            Ending::HandBack,
            "Agent is shutting down; handing the run back".to_string(),
        ),
        (Some(StopReason::EngineLost), Err(_)) => {
            let message = "the Docker engine stopped replying while the run needed it";
            tracing::warn!(error = message, "run failed");
            let metadata = json!({ "error": message, "failed_step": "docker" });
            (
                Ending::Finish(FinalStatus::Failed, metadata),
                message.to_string(),
            )
        }
        (Some(StopReason::CancelRequested), Err(_)) => (
            Ending::Finish(
                FinalStatus::Cancelled,
                json!({ "error": "cancelled on request" }),
            ),
            "Run cancelled on request".to_string(),
        ),
        (None, Err(failure)) => {
            let message = format!("{failure}");
            tracing::warn!(step = failure.step, error = %message, "run failed");
            let mut metadata = json!({ "error": message, "failed_step": failure.step });
            merge(&mut metadata, failure.metadata);
            (Ending::Finish(FinalStatus::Failed, metadata), message)
        }
    }
}

/// Writes the run's last events and finishes, releases or abandons it.
async fn conclude(
    queue: &Queue,
    lease: Lease,
    events: &EventSink,
    stop: &Stop,
    result: RunResult,
    started: Instant,
) {
    let (ending, message) = ending(stop.reason(), result, started.elapsed().as_secs_f64());
    let (status, metadata) = match ending {
        Ending::Abandon => {
            report_unfinished("abandoned");
            return;
        }
        Ending::HandBack => {
            events.warn(message).await;
            if let FlushOutcome::Flushed { .. } = events.flush().await {
                let reason = format!("agent {} stopped", queue.worker_id());
                report(
                    queue.release(lease, &reason).await,
                    "handed back to the queue",
                );
            }
            return;
        }
        Ending::Finish(status, metadata) => (status, metadata),
    };
    let level = match status {
        FinalStatus::Success => Level::Info,
        FinalStatus::Cancelled => Level::Warn,
        FinalStatus::Failed => Level::Error,
    };
    events.send(level, message, None).await;
    if let FlushOutcome::LeaseLost { .. } = events.flush().await {
        report_unfinished(status.as_str());
        return;
    }
    let mut result = finish_with_retry(queue, lease, status, &metadata, &stop.lease_lost).await;
    if let Err(QueueError::Rejected(reason)) = &result {
        // Left running, the run would be reaped and executed again.
        let error = format!("finishing the run as {} failed: {reason}", status.as_str());
        tracing::error!(error = %error, "finishing the run as failed instead");
        events.error(error.clone()).await;
        events.flush().await;
        let metadata = json!({ "error": error, "failed_step": "finish" });
        let failed = FinalStatus::Failed;
        result = finish_with_retry(queue, lease, failed, &metadata, &stop.lease_lost).await;
    }
    match result {
        Err(QueueError::LeaseLost { .. }) => report_unfinished(status.as_str()),
        other => report(other, status.as_str()),
    }
}

/// Logs a run whose outcome could not be stored before its lease was lost. Unless
/// another agent took the run over, the control plane keeps it as running until the
/// reaper takes it back.
fn report_unfinished(outcome: &str) {
    tracing::error!(
        outcome,
        "the lease was lost before the run's outcome was stored; the run is left to the \
         reaper or to the agent that took it over"
    );
}

/// Makes a workflow's result mergeable into the run's metadata, which must be a JSON
/// object. Null adds nothing, and any other non-object value is stored under "result".
fn as_object(metadata: Value) -> Value {
    match metadata {
        Value::Object(_) => metadata,
        Value::Null => json!({}),
        other => json!({ "result": other }),
    }
}

fn merge(target: &mut Value, extra: Value) {
    if let (Value::Object(target), Value::Object(extra)) = (target, extra) {
        target.extend(extra);
    }
}

fn report(result: Result<(), QueueError>, what: &str) {
    match result {
        Ok(()) => tracing::info!(outcome = what, "run ended"),
        Err(err) => tracing::error!(error = %err, outcome = what, "ending the run failed"),
    }
}

/// Finishes the run, retrying while the database is unavailable. The heartbeat keeps
/// the lease meanwhile. When the outage outlasts the lease, `lease_lost` fires and this
/// returns [`QueueError::LeaseLost`], leaving the run to the reaper.
async fn finish_with_retry(
    queue: &Queue,
    lease: Lease,
    status: FinalStatus,
    metadata: &Value,
    lease_lost: &CancellationToken,
) -> Result<(), QueueError> {
    let mut delay = Duration::from_millis(200);
    loop {
        match queue.finish(lease, status, metadata).await {
            Err(err) if err.is_unavailable() => {
                tracing::warn!(error = %err, "finishing the run failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = lease_lost.cancelled() => {
                        return Err(QueueError::LeaseLost { run_id: lease.run_id });
                    }
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

/// Renews the lease until aborted. Stops the run when the lease is lost, when the lease
/// could not be renewed before it expired, or when cancellation is requested.
async fn keep_lease(
    queue: Queue,
    lease: Lease,
    claimed_at: Instant,
    interval: Duration,
    lease_length: Duration,
    stop: Arc<Stop>,
) {
    // The database computes each expiry from its clock when the call arrives, which is
    // after the call left here, so this deadline is never later than the real one.
    let mut deadline = claimed_at + lease_length;
    let mut wait = interval;
    loop {
        tokio::time::sleep(wait).await;
        let sent_at = Instant::now();
        let remaining = deadline.saturating_duration_since(sent_at);
        match queue.heartbeat_within(lease, remaining).await {
            Ok(cancel_requested) => {
                deadline = sent_at + lease_length;
                wait = interval;
                if cancel_requested {
                    stop.request(StopReason::CancelRequested);
                }
            }
            Err(QueueError::LeaseLost { .. }) => {
                stop.request(StopReason::LeaseLost);
                return;
            }
            Err(err) => {
                tracing::warn!(error = %err, "renewing the lease failed; retrying");
                wait = interval.min(Duration::from_secs(1));
            }
        }
        // Past the deadline another agent may hold the run.
        if Instant::now() >= deadline {
            tracing::warn!("the lease expired before it could be renewed; stopping the run");
            stop.request(StopReason::LeaseLost);
            return;
        }
    }
}
