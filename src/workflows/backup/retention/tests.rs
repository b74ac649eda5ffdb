use chrono::{Duration, TimeZone};

use super::*;

fn backup(backup_type: &str, created_at: DateTime<Utc>) -> BackupRecord {
    BackupRecord {
        backup_id: Uuid::new_v4(),
        project_id: "proj".into(),
        env_id: "env-prod".into(),
        run_id: None,
        backup_type: backup_type.into(),
        status: "success".into(),
        db_dump_path: Some("file:///b/x.zip".into()),
        size_bytes: Some(1),
        digest: None,
        format: None,
        manifest: None,
        keep: false,
        created_at,
        started_at: None,
        finished_at: None,
        expires_at: None,
    }
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 6, 30, 12, 0, 0).unwrap()
}

/// Makes one daily backup at 02:00 for each of the last `days` days, newest first.
fn dailies(days: i64) -> Vec<BackupRecord> {
    let today = Utc.with_ymd_and_hms(2024, 6, 30, 2, 0, 0).unwrap();
    (0..days)
        .map(|day| backup("daily", today - Duration::days(day)))
        .collect()
}

#[test]
fn dailies_keep_days_weeks_months() {
    let backups = dailies(120);
    let expired = select_expired(&backups, &Retention::default(), now());
    let kept: Vec<_> = backups
        .iter()
        .filter(|b| !expired.contains(&b.backup_id))
        .collect();

    for recent in &backups[..7] {
        assert!(
            !expired.contains(&recent.backup_id),
            "{}",
            recent.created_at
        );
    }
    // 7 days, plus the newest of 4 ISO weeks and 3 months that the days do not cover.
    assert!(kept.len() <= 7 + 4 + 3, "kept {}", kept.len());
    assert!(kept.len() >= 10, "kept {}", kept.len());
    let months: HashSet<u32> = kept.iter().map(|b| b.created_at.month()).collect();
    assert_eq!(months, HashSet::from([6, 5, 4]));
    assert!(expired.contains(&backups[119].backup_id));
}

#[test]
fn newest_backup_is_kept_even_when_expired() {
    let mut only = backup("manual", now() - Duration::days(400));
    only.expires_at = Some(now() - Duration::days(370));
    let expired = select_expired(&[only], &Retention::default(), now());
    assert!(expired.is_empty());
}

#[test]
fn manual_backup_is_kept_until_it_expires() {
    let newest = backup("daily", now() - Duration::hours(10));
    let mut fresh = backup("manual", now() - Duration::days(3));
    fresh.expires_at = Some(now() + Duration::days(27));
    let mut stale = backup("manual", now() - Duration::days(40));
    stale.expires_at = Some(now() - Duration::days(10));
    let backups = vec![newest, fresh.clone(), stale.clone()];

    let expired = select_expired(&backups, &Retention::default(), now());
    assert_eq!(expired, vec![stale.backup_id]);
}

#[test]
fn pinned_backup_is_never_deleted() {
    let mut backups = dailies(60);
    backups[50].keep = true;
    let expired = select_expired(&backups, &Retention::default(), now());
    assert!(!expired.contains(&backups[50].backup_id));
}

#[test]
fn deleted_rows_are_retried_and_failed_rows_ignored() {
    let mut backups = dailies(2);
    let mut half_deleted = backup("daily", now() - Duration::days(90));
    half_deleted.status = "deleted".into();
    let mut failed = backup("daily", now() - Duration::days(1));
    failed.status = "failed".into();
    backups.push(half_deleted.clone());
    backups.push(failed.clone());

    let expired = select_expired(&backups, &Retention::default(), now());
    assert_eq!(expired, vec![half_deleted.backup_id]);
}

#[test]
fn zero_counts_keep_only_the_newest_scheduled_backup() {
    let policy = Retention {
        daily: 0,
        weekly: 0,
        monthly: 0,
        ..Retention::default()
    };
    let backups = dailies(5);
    let expired = select_expired(&backups, &policy, now());
    assert_eq!(expired.len(), 4);
    assert!(!expired.contains(&backups[0].backup_id));
}
