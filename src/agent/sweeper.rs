//! The task that removes what killed builds leave behind, at start and from time to time
//! (see [`crate::workflows::build::sweep`] for what counts as a leftover).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::queue::Queue;
use crate::workflows::build::sweep;

/// Reap intervals between sweeps, so a minute at the default 5 s. Leftovers only appear
/// when an agent dies, and a sweep right after the reaper takes back a run covers the
/// usual case, so the periodic sweep is a fallback for runs that other agents reaped.
const SWEEP_EVERY_REAPS: u32 = 12;
/// Maximum time for one sweep. A database server or Docker engine that stops replying
/// would otherwise stall the sweeper, and the next sweep starts over anyway.
const SWEEP_TIMEOUT: Duration = Duration::from_secs(600);

/// Sweeps now, then after every reap that took back runs and every [`SWEEP_EVERY_REAPS`]
/// reap intervals, until `stop`.
pub(super) async fn run(
    settings: Arc<Settings>,
    queue: Queue,
    reaped: Arc<Notify>,
    stop: CancellationToken,
) {
    let interval = settings.agent.reap_interval * SWEEP_EVERY_REAPS;
    let mut failures = 0u32;
    loop {
        let started = Instant::now();
        match sweep_once(&settings, &queue).await {
            Ok(swept) => {
                failures = 0;
                log_swept(swept, started.elapsed());
            }
            Err(err) => {
                failures += 1;
                if failures.is_power_of_two() {
                    let error = format!("{err:#}");
                    tracing::warn!(
                        error,
                        failures,
                        "sweeping leftovers of stopped builds failed"
                    );
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = reaped.notified() => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Sweeps test containers when the Docker engine is reachable, and test databases.
async fn sweep_once(settings: &Settings, queue: &Queue) -> anyhow::Result<sweep::Swept> {
    tokio::time::timeout(SWEEP_TIMEOUT, sweep_now(settings, queue))
        .await
        .map_err(|_| anyhow::anyhow!("the sweep timed out after {} s", SWEEP_TIMEOUT.as_secs()))?
}

async fn sweep_now(settings: &Settings, queue: &Queue) -> anyhow::Result<sweep::Swept> {
    let docker = match crate::docker::connect(&settings.docker).await {
        Ok(docker) => Some(docker),
        Err(err) => {
            tracing::debug!(error = %err, "not sweeping test containers: the engine is unreachable");
            None
        }
    };
    sweep::sweep(settings, queue, docker.as_ref()).await
}

fn log_swept(swept: sweep::Swept, elapsed: Duration) {
    let duration_ms = elapsed.as_millis() as u64;
    if swept.is_empty() {
        tracing::debug!(duration_ms, "no leftovers of stopped builds found");
    } else {
        tracing::info!(
            containers = swept.containers,
            databases = swept.databases,
            duration_ms,
            "removed leftovers of stopped builds"
        );
    }
}
