//! The retention policy: which backups of an environment to delete, objects and rows.
//!
//! Scheduled backups (daily, weekly, monthly) are kept grandfather-father-son style,
//! whatever their type label. The policy keeps the newest backup of each of the last
//! `daily` days that have one, of each of the last `weekly` ISO weeks, and of each of
//! the last `monthly` months (UTC). Manual and pre-deploy backups are kept until their expires_at. Pinned
//! backups (`keep`) and the newest successful backup are never deleted. Failed backups
//! have no object; their rows go after `failed` days.
//!
//! Deleting marks the row 'deleted' first, then deletes the object, then the row, so a
//! crash or a store error in between leaves a 'deleted' row that the next pass finishes.

use std::collections::HashSet;

use anyhow::Context;
use chrono::{DateTime, Datelike, Utc};
use uuid::Uuid;

use super::job::Job;
use super::records::{self, BackupRecord, EnvironmentRow};
use crate::config::backup::Retention;
use crate::storage::Stores;

/// Advisory lock class of retention passes; the second key is the environment's hash.
const RETENTION_LOCK: &str = "odooops.backup.retention";

/// Result of one retention pass.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RetentionOutcome {
    pub deleted: Vec<Uuid>,
    pub failed_rows_removed: u64,
}

/// Returns the successful or already-deleted backups that the policy drops.
pub fn select_expired(
    backups: &[BackupRecord],
    policy: &Retention,
    now: DateTime<Utc>,
) -> Vec<Uuid> {
    let mut successes: Vec<&BackupRecord> =
        backups.iter().filter(|b| b.status == "success").collect();
    successes.sort_by_key(|b| std::cmp::Reverse(b.created_at));
    let newest = successes.first().map(|b| b.backup_id);

    let scheduled: Vec<&BackupRecord> = successes
        .iter()
        .copied()
        .filter(|b| matches!(b.backup_type.as_str(), "daily" | "weekly" | "monthly"))
        .collect();
    let mut kept: HashSet<Uuid> = HashSet::new();
    keep_newest_per_period(
        &scheduled,
        policy.daily,
        |t| (t.year(), t.ordinal(), 0),
        &mut kept,
    );
    keep_newest_per_period(
        &scheduled,
        policy.weekly,
        |t| (t.iso_week().year(), t.iso_week().week(), 1),
        &mut kept,
    );
    keep_newest_per_period(
        &scheduled,
        policy.monthly,
        |t| (t.year(), t.month(), 2),
        &mut kept,
    );

    let mut expired = Vec::new();
    for backup in &successes {
        if backup.keep || Some(backup.backup_id) == newest || kept.contains(&backup.backup_id) {
            continue;
        }
        let drop = match backup.backup_type.as_str() {
            "daily" | "weekly" | "monthly" => true,
            "pre_deploy" => expiry(backup, policy.pre_deploy) < now,
            _ => expiry(backup, policy.manual) < now,
        };
        if drop {
            expired.push(backup.backup_id);
        }
    }
    expired.extend(
        backups
            .iter()
            .filter(|b| b.status == "deleted")
            .map(|b| b.backup_id),
    );
    expired
}

fn expiry(backup: &BackupRecord, keep_for: std::time::Duration) -> DateTime<Utc> {
    backup
        .expires_at
        .unwrap_or_else(|| backup.created_at + keep_for)
}

/// Keeps the newest backup (input is newest first) of each of the first `count` distinct
/// periods.
fn keep_newest_per_period<K: Eq + std::hash::Hash>(
    newest_first: &[&BackupRecord],
    count: u32,
    period: impl Fn(DateTime<Utc>) -> K,
    kept: &mut HashSet<Uuid>,
) {
    let mut seen = HashSet::new();
    for backup in newest_first {
        if seen.len() as u32 >= count {
            break;
        }
        if seen.insert(period(backup.created_at)) {
            kept.insert(backup.backup_id);
        }
    }
}

/// Applies the policy to one environment. Another agent pruning the same environment
/// at the same time makes this pass a no-op.
pub async fn apply(
    job: &Job,
    env: &EnvironmentRow,
    policy: &Retention,
) -> anyhow::Result<RetentionOutcome> {
    let lock = job
        .pool
        .get()
        .await
        .context("connecting to the control plane failed")?;
    let locked: bool = lock
        .query_one(
            "SELECT pg_try_advisory_lock(hashtext($1), hashtext($2))",
            &[&RETENTION_LOCK, &env.env_id],
        )
        .await
        .context("taking the retention lock failed")?
        .get(0);
    if !locked {
        return Ok(RetentionOutcome::default());
    }
    let outcome = prune(job, env, policy).await;
    let _ = lock
        .execute(
            "SELECT pg_advisory_unlock(hashtext($1), hashtext($2))",
            &[&RETENTION_LOCK, &env.env_id],
        )
        .await;
    outcome
}

async fn prune(
    job: &Job,
    env: &EnvironmentRow,
    policy: &Retention,
) -> anyhow::Result<RetentionOutcome> {
    let backups = records::list(&job.pool, &env.env_id).await?;
    let expired = select_expired(&backups, policy, Utc::now());
    let stores = Stores::from_settings(&job.settings.storage);
    let mut outcome = RetentionOutcome::default();
    for backup in backups.iter().filter(|b| expired.contains(&b.backup_id)) {
        match delete_backup(job, &stores, backup).await {
            Ok(()) => outcome.deleted.push(backup.backup_id),
            Err(err) => {
                job.reporter
                    .warn(format!(
                        "Deleting expired backup {} failed: {err:#}",
                        backup.backup_id
                    ))
                    .await
            }
        }
    }
    let client = job
        .pool
        .get()
        .await
        .context("connecting to the control plane failed")?;
    let failed_before = Utc::now() - policy.failed;
    outcome.failed_rows_removed = client
        .execute(
            "DELETE FROM ops.backups WHERE env_id = $1 AND status = 'failed' AND created_at < $2",
            &[&env.env_id, &failed_before],
        )
        .await
        .context("removing old failed backup rows failed")?;
    if !outcome.deleted.is_empty() {
        job.reporter
            .info(format!(
                "Retention: deleted {} expired backup(s) of {}: {}",
                outcome.deleted.len(),
                env.env_id,
                outcome
                    .deleted
                    .iter()
                    .map(Uuid::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .await;
    }
    Ok(outcome)
}

async fn delete_backup(job: &Job, stores: &Stores, backup: &BackupRecord) -> anyhow::Result<()> {
    let client = job
        .pool
        .get()
        .await
        .context("connecting to the control plane failed")?;
    client
        .execute(
            "UPDATE ops.backups SET status = 'deleted' WHERE backup_id = $1 AND status = 'success'",
            &[&backup.backup_id],
        )
        .await
        .context("marking the backup deleted failed")?;
    if let Some(location) = &backup.db_dump_path {
        let (store, key) = stores.resolve(location)?;
        store.delete(&key).await?;
    }
    client
        .execute(
            "DELETE FROM ops.backups WHERE backup_id = $1 AND status = 'deleted'",
            &[&backup.backup_id],
        )
        .await
        .context("removing the backup row failed")?;
    Ok(())
}

#[cfg(test)]
mod tests;
