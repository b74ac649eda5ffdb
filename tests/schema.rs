//! The ops schema as its callers use it: migrations, the public functions called with
//! named arguments the way PostgREST calls them, and the dashboard and cleanup SQL that
//! operators run against it unchanged.

mod common;

use common::runs::{self, sqlstate};
use common::TestDb;
use odooops_agent::migrate;
use serde_json::{json, Value};
use uuid::Uuid;

/// The dashboard's success rate per day, exactly as operators run it.
const SUCCESS_RATE_QUERY: &str = "\
SELECT
    DATE(created_at) AS date,
    COUNT(*) FILTER (WHERE status = 'success') AS successful_runs,
    COUNT(*) FILTER (WHERE status = 'failed') AS failed_runs,
    ROUND(100.0 * COUNT(*) FILTER (WHERE status = 'success') / COUNT(*), 2) AS success_rate
FROM ops.runs
WHERE metadata->>'workflow_run_id' IS NOT NULL
  AND created_at > NOW() - INTERVAL '7 days'
GROUP BY DATE(created_at)
ORDER BY date DESC;";

/// The dashboard's average build time per environment type, exactly as operators run it.
const BUILD_TIME_QUERY: &str = "\
SELECT
    e.env_type,
    AVG(EXTRACT(EPOCH FROM (r.finished_at - r.started_at))) AS avg_build_seconds
FROM ops.runs r
JOIN ops.environments e ON r.env_id = e.env_id
WHERE r.status IN ('success', 'failed')
  AND r.created_at > NOW() - INTERVAL '30 days'
GROUP BY e.env_type;";

/// The cleanup function as the Edge Function's cron job installs it.
const CLEANUP_FUNCTION: &str = r#"-- Edge Function cron (daily at 3 AM)
CREATE OR REPLACE FUNCTION ops.cleanup_expired_artifacts()
RETURNS void AS $$
BEGIN
    -- Delete artifact metadata for expired artifacts
    DELETE FROM ops.artifacts
    WHERE created_at < NOW() - INTERVAL '90 days'
      AND artifact_type IN ('sbom', 'logs', 'evidence', 'manifest');

    -- Mark old runs for archival
    UPDATE ops.runs
    SET metadata = metadata || '{"archived": true}'::jsonb
    WHERE created_at < NOW() - INTERVAL '90 days'
      AND status IN ('success', 'failed', 'cancelled');
END;
$$ LANGUAGE plpgsql;"#;

#[tokio::test]
async fn second_migrate_applies_nothing() {
    let db = TestDb::new().await;
    let mut client = db.client().await;

    let applied = migrate::migrate(&mut client).await.expect("second migrate");

    assert!(applied.is_empty(), "applied again: {applied:?}");
    let count: i64 = client
        .query_one("SELECT count(*) FROM ops.schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count as usize, migrate::MIGRATIONS.len());
}

#[tokio::test]
async fn edited_migration_is_reported_not_skipped() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    client
        .execute(
            "UPDATE ops.schema_migrations SET checksum = 'f00' WHERE version = 1",
            &[],
        )
        .await
        .unwrap();

    let err = migrate::migrate(&mut client).await.unwrap_err().to_string();

    assert!(err.contains("migration 1 (control_plane)"), "{err}");
    assert!(err.contains("checksum f00"), "{err}");
}

#[tokio::test]
async fn concurrent_migrations_both_succeed() {
    let db = TestDb::empty().await;
    let mut first = db.client().await;
    let mut second = db.client().await;

    let (a, b) = tokio::join!(migrate::migrate(&mut first), migrate::migrate(&mut second));

    let a = a.expect("first migration");
    let b = b.expect("second migration");
    let all: Vec<i32> = migrate::MIGRATIONS.iter().map(|m| m.version).collect();
    assert!(
        (a == all && b.is_empty()) || (b == all && a.is_empty()),
        "each migration must be applied exactly once: {a:?} and {b:?}"
    );
}

#[tokio::test]
async fn dashboard_queries_run_verbatim() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO ops.runs (project_id, env_id, status, metadata, started_at,
                                   finished_at)
             VALUES ('proj', 'env-staging', 'success', '{\"workflow_run_id\": \"1\"}',
                     now() - interval '100 s', now() - interval '40 s'),
                    ('proj', 'env-staging', 'success', '{\"workflow_run_id\": \"2\"}',
                     now() - interval '100 s', now() - interval '80 s'),
                    ('proj', 'env-prod', 'failed', '{\"workflow_run_id\": \"3\"}',
                     now() - interval '100 s', now() - interval '90 s'),
                    ('proj', 'env-prod', 'queued', '{}', NULL, NULL);",
        )
        .await
        .unwrap();

    let rates = text_rows(&client, SUCCESS_RATE_QUERY).await;
    let times = text_rows(&client, BUILD_TIME_QUERY).await;

    assert_eq!(rates.len(), 1, "{rates:?}");
    assert_eq!(rates[0]["successful_runs"], "2");
    assert_eq!(rates[0]["failed_runs"], "1");
    assert_eq!(rates[0]["success_rate"], "66.67");
    assert_eq!(times.len(), 2, "{times:?}");
    let seconds = |env_type: &str| -> f64 {
        let row = times
            .iter()
            .find(|row| row["env_type"] == env_type)
            .unwrap_or_else(|| panic!("no row for {env_type}: {times:?}"));
        row["avg_build_seconds"].parse().expect("a number")
    };
    assert!((seconds("staging") - 40.0).abs() < 0.5, "{times:?}");
    assert!((seconds("prod") - 10.0).abs() < 0.5, "{times:?}");
}

/// Runs `sql` through the simple query protocol, as psql does, and returns each row as
/// column name to text value.
async fn text_rows(
    client: &tokio_postgres::Client,
    sql: &str,
) -> Vec<std::collections::HashMap<String, String>> {
    let messages = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|err| panic!("query failed: {err}\n{sql}"));
    messages
        .iter()
        .filter_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .map(|row| {
            row.columns()
                .iter()
                .enumerate()
                .map(|(i, column)| {
                    let value = row.get(i).unwrap_or("NULL").to_string();
                    (column.name().to_string(), value)
                })
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn cleanup_function_installs_and_runs_verbatim() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    client
        .batch_execute(CLEANUP_FUNCTION)
        .await
        .expect("installing the cleanup function");
    let old = runs::queue(&client, "env-dev", "build").await;
    let recent = runs::queue(&client, "env-dev", "build").await;
    client
        .execute(
            "UPDATE ops.runs SET status = 'success', created_at = now() - interval '100 days'
              WHERE run_id = $1",
            &[&old],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO ops.artifacts (run_id, artifact_type, storage_path, created_at)
             VALUES ($1, 'logs', 's3://a/old-logs', now() - interval '100 days'),
                    ($1, 'image', 'ghcr.io/acme/odoo:old', now() - interval '100 days'),
                    ($2, 'logs', 's3://a/new-logs', now())",
            &[&old, &recent],
        )
        .await
        .unwrap();

    client
        .execute("SELECT ops.cleanup_expired_artifacts()", &[])
        .await
        .expect("cleanup");

    let left: Vec<String> = client
        .query(
            "SELECT storage_path FROM ops.artifacts ORDER BY storage_path",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(left, ["ghcr.io/acme/odoo:old", "s3://a/new-logs"]);
    assert_eq!(
        runs::run(&client, old).await.metadata["archived"],
        json!(true)
    );
    assert_eq!(
        runs::run(&client, recent).await.metadata.get("archived"),
        None
    );
}

#[tokio::test]
async fn queue_run_takes_env_type_or_id() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    let queue = "SELECT run_id, env_id, workflow, max_attempts, git_sha, git_ref, status
                   FROM ops.queue_run(p_project_id => 'proj', p_env => $1,
                                      p_git_sha => 'f00d', p_git_ref => 'main',
                                      p_metadata => '{\"workflow\": \"deploy\",
                                                      \"triggered_by\": \"ci\"}')";

    let by_type = client.query(queue, &[&"staging"]).await.expect("by type");
    let by_id = client.query(queue, &[&"env-prod"]).await.expect("by id");

    assert_eq!(by_type.len(), 1);
    assert_eq!(by_type[0].get::<_, String>("env_id"), "env-staging");
    assert_eq!(by_id[0].get::<_, String>("env_id"), "env-prod");
    assert_eq!(by_id[0].get::<_, String>("workflow"), "deploy");
    assert_eq!(by_id[0].get::<_, i32>("max_attempts"), 2);
    assert_eq!(by_type[0].get::<_, String>("status"), "queued");
    // Production deploys wait for their reviewers.
    assert_eq!(by_id[0].get::<_, String>("status"), "pending_approval");
    assert_eq!(
        by_id[0].get::<_, Option<String>>("git_sha").as_deref(),
        Some("f00d")
    );
    assert_eq!(
        by_id[0].get::<_, Option<String>>("git_ref").as_deref(),
        Some("main")
    );
}

#[tokio::test]
async fn queue_run_rejects_unknown_or_ambiguous_env() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO ops.environments (env_id, project_id, env_type, db_name)
             VALUES ('env-staging-2', 'proj', 'staging', 'odoo_staging_2')",
        )
        .await
        .unwrap();
    let queue = "SELECT * FROM ops.queue_run(p_project_id => 'proj', p_env => $1)";

    let unknown = client.query(queue, &[&"qa"]).await.unwrap_err();
    let ambiguous = client.query(queue, &[&"staging"]).await.unwrap_err();

    assert_eq!(sqlstate(&unknown), "22023");
    assert!(
        unknown.as_db_error().unwrap().message().contains("qa"),
        "{unknown:?}"
    );
    assert_eq!(sqlstate(&ambiguous), "22023");
    let message = ambiguous.as_db_error().unwrap().message().to_string();
    assert!(message.contains("pass an env_id"), "{message}");
}

#[tokio::test]
async fn metadata_workflow_must_be_a_string() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;

    let err = client
        .query(
            "SELECT * FROM ops.queue_run(p_project_id => 'proj', p_env => 'dev',
                                         p_metadata => '{\"workflow\": null}')",
            &[],
        )
        .await
        .unwrap_err();

    assert_eq!(sqlstate(&err), "22023");
    let message = err.as_db_error().unwrap().message().to_string();
    assert!(message.contains("metadata.workflow"), "{message}");
}

#[tokio::test]
async fn bare_claim_returns_run_or_nothing() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    let claim = "SELECT run_id, git_sha, status, worker_id, lease_expires_at > now()
                   FROM ops.claim_next_run(p_worker_id => 'gha-1')";

    let empty = client
        .query(claim, &[])
        .await
        .expect("claim from an empty queue");
    let queued = runs::queue(&client, "env-dev", "build").await;
    let claimed = client.query(claim, &[]).await.expect("claim");
    let again = client
        .query(claim, &[])
        .await
        .expect("claim when all are taken");

    assert!(empty.is_empty());
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].get::<_, Uuid>("run_id"), queued);
    assert_eq!(
        claimed[0].get::<_, Option<String>>("git_sha").as_deref(),
        Some("abc123")
    );
    assert_eq!(claimed[0].get::<_, String>("status"), "running");
    assert_eq!(
        claimed[0].get::<_, Option<String>>("worker_id").as_deref(),
        Some("gha-1")
    );
    assert!(claimed[0].get::<_, bool>(4), "the claim holds a lease");
    assert!(again.is_empty());
}

#[tokio::test]
async fn claim_rejects_a_lease_that_never_expires() {
    let db = TestDb::new().await;
    let client = db.client().await;

    let err = client
        .query(
            "SELECT * FROM ops.claim_next_run(p_worker_id => 'w', p_lease_seconds => NULL)",
            &[],
        )
        .await
        .unwrap_err();

    assert_eq!(sqlstate(&err), "22023");
}

#[tokio::test]
async fn finish_run_merges_metadata() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    let run_id = runs::queue_with(
        &client,
        "env-dev",
        json!({ "workflow": "build", "triggered_by": "ci" }),
    )
    .await;

    let finished = client
        .query(
            "SELECT status, metadata FROM ops.finish_run(p_run_id => $1, p_status => 'success',
                    p_metadata => '{\"image\": \"ghcr.io/acme/odoo:abc\",
                                    \"workflow_run_id\": \"42\"}')",
            &[&run_id],
        )
        .await
        .expect("finish");
    let again = client
        .query(
            "SELECT * FROM ops.finish_run(p_run_id => $1, p_status => 'failed')",
            &[&run_id],
        )
        .await
        .unwrap_err();

    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0].get::<_, String>("status"), "success");
    let metadata: Value = finished[0].get("metadata");
    assert_eq!(metadata["triggered_by"], "ci");
    assert_eq!(metadata["workflow"], "build");
    assert_eq!(metadata["image"], "ghcr.io/acme/odoo:abc");
    assert_eq!(metadata["workflow_run_id"], "42");
    assert_eq!(
        sqlstate(&again),
        "55000",
        "a finished run is never finished again"
    );
}

#[tokio::test]
async fn create_backup_queues_a_backup_run() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;

    let rows = client
        .query(
            "SELECT backup_id, run_id, env_id, backup_type, status
               FROM ops.create_backup(p_project_id => 'proj', p_env => 'prod',
                                      p_backup_type => 'daily',
                                      p_metadata => '{\"triggered_by\": \"github_actions\"}')",
            &[],
        )
        .await
        .expect("create_backup");

    assert_eq!(rows.len(), 1);
    let backup_id: Uuid = rows[0].get("backup_id");
    let run_id: Uuid = rows[0]
        .get::<_, Option<Uuid>>("run_id")
        .expect("a run is queued");
    assert_eq!(rows[0].get::<_, String>("env_id"), "env-prod");
    assert_eq!(rows[0].get::<_, String>("backup_type"), "daily");
    assert_eq!(rows[0].get::<_, String>("status"), "pending");
    let run = runs::run(&client, run_id).await;
    assert_eq!(run.status, "queued");
    assert_eq!(run.metadata["workflow"], "backup");
    assert_eq!(run.metadata["backup_id"], backup_id.to_string());
    assert_eq!(run.metadata["triggered_by"], "github_actions");
}

#[tokio::test]
async fn append_event_numbers_events_and_rejects_unknown_levels() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    let run_id = runs::queue(&client, "env-dev", "build").await;

    let first = client
        .query_one(
            "SELECT seq FROM ops.append_event(p_run_id => $1, p_level => 'info',
                                              p_message => 'Running unit tests')",
            &[&run_id],
        )
        .await
        .expect("append");
    let second = client
        .query_one(
            "SELECT seq, level FROM ops.append_event(p_run_id => $1, p_level => 'WARNING',
                    p_message => 'rollback', p_payload => '{\"previous_sha\": \"abc\"}')",
            &[&run_id],
        )
        .await
        .expect("append with payload");
    let bad = client
        .query(
            "SELECT * FROM ops.append_event(p_run_id => $1, p_level => 'loud', p_message => 'x')",
            &[&run_id],
        )
        .await
        .unwrap_err();
    let missing = client
        .query(
            "SELECT * FROM ops.append_event(p_run_id => $1, p_level => 'info', p_message => 'x')",
            &[&Uuid::new_v4()],
        )
        .await
        .unwrap_err();

    assert_eq!(first.get::<_, i64>(0), 1);
    assert_eq!(second.get::<_, i64>(0), 2);
    assert_eq!(second.get::<_, String>(1), "warn");
    assert_eq!(sqlstate(&bad), "22023");
    assert_eq!(sqlstate(&missing), "OPN01");
}
