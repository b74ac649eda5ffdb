//! Queues scheduled backups and restore drills for the environments this agent serves.
//!
//! Runs inside the daemon. Each environment has its backup schedules from the config
//! (by default daily at 02:00 UTC for staging and prod) and an optional drill schedule.
//! When a slot comes due, the scheduler queues a backup through ops.create_backup, or a
//! restore_drill run through ops.queue_run, recording the slot as `scheduled_for` in the
//! metadata. A transaction-scoped advisory lock and a lookup of that slot make sure
//! several agents serving the same environment queue it once. A slot missed while the
//! agent was down is still queued if it is at most [`CATCH_UP`] old.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::backup::{default_schedules, CronSchedule};
use crate::config::Settings;

/// A slot missed by up to an hour (an agent restart, a deploy of the agent) still runs.
pub const CATCH_UP: Duration = Duration::from_secs(3600);
/// Environments are re-read this often, so new ones get their schedules.
const RELOAD_INTERVAL: Duration = Duration::from_secs(300);
/// Pause after the control plane could not be reached.
const RETRY_DELAY: Duration = Duration::from_secs(30);
const SCHEDULE_LOCK: &str = "odooops.backup.schedule";

/// Kind of run a due slot queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Task {
    Backup { backup_type: String },
    Drill,
}

/// One schedule of one environment.
#[derive(Debug, Clone)]
pub struct Entry {
    pub project_id: String,
    pub env_id: String,
    pub cron: CronSchedule,
    pub task: Task,
}

/// Runs until `shutdown` fires.
pub async fn run(settings: Arc<Settings>, pool: Pool, shutdown: CancellationToken) {
    tracing::info!("backup scheduler started");
    loop {
        let wait = match tick(&settings, &pool, Utc::now()).await {
            Ok(next) => next,
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), "backup scheduler tick failed");
                RETRY_DELAY
            }
        };
        tracing::debug!(wait_s = wait.as_secs(), "backup scheduler sleeping");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    tracing::info!("backup scheduler stopped");
}

/// Queues every due slot and returns how long to sleep until the next one.
pub async fn tick(
    settings: &Settings,
    pool: &Pool,
    now: DateTime<Utc>,
) -> anyhow::Result<Duration> {
    let entries = load_entries(settings, pool).await?;
    let mut wait = RELOAD_INTERVAL;
    for entry in &entries {
        if let Some(slot) = due_slot(&entry.cron, now) {
            if let Err(err) = queue_slot(pool, entry, slot).await {
                tracing::warn!(env.id = %entry.env_id, error = %format!("{err:#}"), "queueing a scheduled run failed");
            }
        }
        if let Some(next) = entry.cron.schedule.after(&now).next() {
            let until = (next - now).to_std().unwrap_or_default();
            wait = wait.min(until + Duration::from_secs(1));
        }
    }
    Ok(wait)
}

/// Returns the latest slot in (now - CATCH_UP, now].
pub fn due_slot(cron: &CronSchedule, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let since = now - chrono::Duration::from_std(CATCH_UP).expect("an hour fits");
    cron.schedule
        .after(&since)
        .take_while(|slot| *slot <= now)
        .last()
}

/// Loads the schedules of the environments and workflows this agent serves.
pub async fn load_entries(settings: &Settings, pool: &Pool) -> anyhow::Result<Vec<Entry>> {
    let client = pool
        .get()
        .await
        .context("connecting to the control plane failed")?;
    let served = &settings.agent.environments;
    let filter: Option<&Vec<String>> = (!served.is_empty()).then_some(served);
    let rows = client
        .query(
            "SELECT env_id, project_id, env_type FROM ops.environments \
             WHERE $1::text[] IS NULL OR env_id = ANY ($1) ORDER BY env_id",
            &[&filter],
        )
        .await
        .context("reading environments failed")?;
    let runs = |workflow: &str| settings.agent.workflows.iter().any(|w| w == workflow);
    let mut entries = Vec::new();
    for row in rows {
        let (env_id, project_id, env_type): (String, String, String) =
            (row.get(0), row.get(1), row.get(2));
        let env_settings = settings.backup.for_env(&env_id);
        if runs("backup") {
            let schedules = env_settings
                .schedules
                .clone()
                .unwrap_or_else(|| default_schedules(&env_type));
            entries.extend(schedules.into_iter().map(|schedule| Entry {
                project_id: project_id.clone(),
                env_id: env_id.clone(),
                cron: schedule.cron,
                task: Task::Backup {
                    backup_type: schedule.backup_type,
                },
            }));
        }
        if let (true, Some(cron)) = (runs("restore_drill"), &env_settings.drill_schedule) {
            entries.push(Entry {
                project_id,
                env_id,
                cron: cron.clone(),
                task: Task::Drill,
            });
        }
    }
    Ok(entries)
}

/// Queues the run of one slot unless some agent already did. Returns whether it queued.
pub async fn queue_slot(pool: &Pool, entry: &Entry, slot: DateTime<Utc>) -> anyhow::Result<bool> {
    let mut client = pool
        .get()
        .await
        .context("connecting to the control plane failed")?;
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))",
        &[&SCHEDULE_LOCK, &entry.env_id],
    )
    .await?;
    let slot_text = slot.to_rfc3339();
    let metadata = json!({ "scheduled_for": slot_text, "triggered_by": "schedule" });
    let queued = match &entry.task {
        Task::Backup { backup_type } => {
            let exists: bool = tx
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM ops.backups WHERE env_id = $1 \
                     AND backup_type = $2 AND metadata->>'scheduled_for' = $3)",
                    &[&entry.env_id, backup_type, &slot_text],
                )
                .await?
                .get(0);
            if !exists {
                tx.query_one(
                    "SELECT backup_id FROM ops.create_backup($1, $2, $3, $4)",
                    &[&entry.project_id, &entry.env_id, backup_type, &metadata],
                )
                .await
                .context("ops.create_backup failed")?;
            }
            !exists
        }
        Task::Drill => {
            let exists: bool = tx
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM ops.runs WHERE env_id = $1 \
                     AND workflow = 'restore_drill' AND metadata->>'scheduled_for' = $2)",
                    &[&entry.env_id, &slot_text],
                )
                .await?
                .get(0);
            if !exists {
                let mut metadata = metadata.clone();
                metadata["workflow"] = json!("restore_drill");
                tx.query_one(
                    "SELECT run_id FROM ops.queue_run($1, $2, NULL, NULL, $3)",
                    &[&entry.project_id, &entry.env_id, &metadata],
                )
                .await
                .context("ops.queue_run failed")?;
            }
            !exists
        }
    };
    tx.commit().await?;
    if queued {
        tracing::info!(env.id = %entry.env_id, task = ?entry.task, slot = %slot_text, "queued a scheduled run");
    }
    Ok(queued)
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::config::backup::parse_cron;

    #[test]
    fn slot_within_the_catch_up_window_is_due() {
        let cron = parse_cron("k", "0 2 * * *").unwrap();
        let at = |h, m| Utc.with_ymd_and_hms(2024, 6, 1, h, m, 0).unwrap();
        assert_eq!(due_slot(&cron, at(2, 0)), Some(at(2, 0)));
        assert_eq!(due_slot(&cron, at(2, 59)), Some(at(2, 0)));
        assert_eq!(due_slot(&cron, at(3, 1)), None);
        assert_eq!(due_slot(&cron, at(1, 59)), None);
    }
}
