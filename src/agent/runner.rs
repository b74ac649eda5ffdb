//! Executes one claimed run: heartbeats, events, the workflow, and how the run ends.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::events::{EventSink, FlushOutcome};
use crate::queue::{ClaimedRun, FinalStatus, Lease, Queue, QueueError};
use crate::workflows::{RunContext, RunResult, StepError};

use super::Shared;

/// How long a workflow has to clean up after its cancel token fires before it is dropped.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a run stopped before its workflow finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    CancelRequested,
    Shutdown,
    LeaseLost,
}

/// The first stop reason wins; later ones change nothing.
#[derive(Default)]
struct Stop {
    token: CancellationToken,
    reason: OnceLock<StopReason>,
}

impl Stop {
    fn request(&self, reason: StopReason) {
        if self.reason.set(reason).is_ok() {
            self.token.cancel();
        }
    }

    fn reason(&self) -> Option<StopReason> {
        self.reason.get().copied()
    }
}

/// Runs the claimed run to its end. The permit is the concurrency slot it occupies.
pub async fn execute(run: ClaimedRun, shared: Arc<Shared>, _permit: OwnedSemaphorePermit) {
    let span = tracing::info_span!(
        "run",
        run.id = %run.run_id,
        run.workflow = %run.workflow,
        env.id = %run.env_id,
        attempt = run.attempt,
    );
    execute_in_span(run, shared).instrument(span).await
}

async fn execute_in_span(run: ClaimedRun, shared: Arc<Shared>) {
    let started = Instant::now();
    let lease = run.lease;
    let stop = Arc::new(Stop::default());
    let events = EventSink::start(shared.queue.pool().clone(), lease);
    let heartbeat = tokio::spawn(keep_lease(
        shared.queue.clone(),
        lease,
        shared.settings.agent.heartbeat_interval,
        shared.settings.agent.lease,
        stop.clone(),
    ));
    let hand_back = shared.hand_back.clone();
    let stop_on_shutdown = stop.clone();
    let shutdown_watch = tokio::spawn(async move {
        hand_back.cancelled().await;
        stop_on_shutdown.request(StopReason::Shutdown);
    });

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

    conclude(
        &shared.queue,
        lease,
        &events,
        stop.reason(),
        result,
        started,
    )
    .await;
    shutdown_watch.abort();
    heartbeat.abort();
}

async fn run_workflow(ctx: &RunContext, shared: &Shared, stop: &Stop) -> RunResult {
    let Some(workflow) = shared.workflows.get(&ctx.run.workflow) else {
        return Err(StepError::invalid(format!(
            "unknown workflow {:?}; this agent runs {}",
            ctx.run.workflow,
            shared.workflows.names().collect::<Vec<_>>().join(", ")
        )));
    };
    let execution = workflow.execute(ctx);
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

/// Writes the run's last events and finishes, releases or abandons it.
async fn conclude(
    queue: &Queue,
    lease: Lease,
    events: &EventSink,
    reason: Option<StopReason>,
    result: RunResult,
    started: Instant,
) {
    let elapsed = started.elapsed().as_secs_f64();
    let (status, metadata) = match (reason, result) {
        (Some(StopReason::LeaseLost), _) => {
            tracing::warn!("lease lost; the run was taken back and is abandoned here");
            return;
        }
        (Some(StopReason::Shutdown), _) => {
            events
                .warn("Agent is shutting down; handing the run back")
                .await;
            if let FlushOutcome::Flushed { .. } = events.flush().await {
                let reason = format!("agent {} stopped", queue.worker_id());
                report(
                    queue.release(lease, &reason).await,
                    "handed back to the queue",
                );
            }
            return;
        }
        (Some(StopReason::CancelRequested), _) => {
            events.warn("Run cancelled on request").await;
            (
                FinalStatus::Cancelled,
                json!({ "error": "cancelled on request" }),
            )
        }
        (None, Ok(metadata)) => {
            events
                .info(format!("Run succeeded in {elapsed:.1} s"))
                .await;
            (FinalStatus::Success, metadata)
        }
        (None, Err(failure)) => {
            let message = format!("{failure}");
            tracing::warn!(step = failure.step, error = %message, "run failed");
            events.error(message.clone()).await;
            let mut metadata = json!({ "error": message, "failed_step": failure.step });
            merge(&mut metadata, failure.metadata);
            (FinalStatus::Failed, metadata)
        }
    };
    if let FlushOutcome::LeaseLost { .. } = events.flush().await {
        tracing::warn!("lease lost before the run could be finished");
        return;
    }
    let result = finish_with_retry(queue, lease, status, &metadata).await;
    report(result, status.as_str());
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

/// Finishes the run, retrying while the database is unreachable. The heartbeat keeps the
/// lease meanwhile; if the outage outlasts the lease, the run is reaped instead.
async fn finish_with_retry(
    queue: &Queue,
    lease: Lease,
    status: FinalStatus,
    metadata: &Value,
) -> Result<(), QueueError> {
    let mut delay = Duration::from_millis(200);
    loop {
        match queue.finish(lease, status, metadata).await {
            Err(err) if err.is_unavailable() => {
                tracing::warn!(error = %err, "finishing the run failed; retrying");
                tokio::time::sleep(delay).await;
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
    interval: Duration,
    lease_length: Duration,
    stop: Arc<Stop>,
) {
    let mut renewed_at = Instant::now();
    let mut wait = interval;
    loop {
        tokio::time::sleep(wait).await;
        match queue.heartbeat(lease).await {
            Ok(cancel_requested) => {
                renewed_at = Instant::now();
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
                // Past this point another agent may hold the run.
                if renewed_at.elapsed() >= lease_length {
                    stop.request(StopReason::LeaseLost);
                    return;
                }
            }
        }
    }
}
