//! Approval for restores that replace an environment's live database, and the rule that a
//! restore only uses a backup of its own project.

mod backup_support;
mod common;

use backup_support::*;
use serde_json::{json, Value};
use uuid::Uuid;

/// Makes a successful backup of env-prod and returns its id.
async fn backed_up(fixture: &Fixture) -> Uuid {
    let backup_id = fixture.queue_backup("env-prod", "manual").await;
    fixture.run_agent(fixture.settings("local")).await;
    let status: String = fixture.backup_row(backup_id).await.get("status");
    assert_eq!(status, "success");
    backup_id
}

/// Metadata of a restore of `backup_id` over the live database of env-prod.
fn live_overwrite(fixture: &Fixture, backup_id: Uuid) -> Value {
    json!({
        "workflow": "restore",
        "backup_id": backup_id,
        "target_db": fixture.odoo.name,
        "overwrite": true,
        "triggered_by": "ann",
    })
}

/// Adds a partner to the live database, so a restore of the backup would remove it.
async fn change_live_database(fixture: &Fixture) {
    fixture
        .odoo
        .client()
        .await
        .execute(
            "INSERT INTO res_partner (name) VALUES ('after backup')",
            &[],
        )
        .await
        .unwrap();
}

async fn live_partners(fixture: &Fixture) -> i64 {
    fixture.odoo.count(&fixture.odoo.name, "res_partner").await
}

async fn review(fixture: &Fixture, run_id: Uuid, reviewer: &str) {
    fixture
        .ops
        .client()
        .await
        .execute(
            "SELECT * FROM ops.review_run($1, $2, 'approved')",
            &[&run_id, &reviewer],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn live_overwrite_waits_for_approval() {
    let fixture = Fixture::new().await;
    let backup_id = backed_up(&fixture).await;
    change_live_database(&fixture).await;
    let run_id = fixture
        .queue_run("env-prod", live_overwrite(&fixture, backup_id))
        .await;
    assert_eq!(fixture.run_outcome(run_id).await.0, "pending_approval");

    fixture.run_agent(fixture.settings("local")).await;
    let (status, _, events) = fixture.run_outcome(run_id).await;
    assert_eq!(status, "pending_approval");
    assert!(
        events
            .iter()
            .any(|e| e.contains("Waiting for approval by 2")),
        "{events:?}"
    );
    assert_eq!(live_partners(&fixture).await, PARTNERS + 1);

    review(&fixture, run_id, "bob").await;
    assert_eq!(fixture.run_outcome(run_id).await.0, "pending_approval");
    review(&fixture, run_id, "cy").await;
    assert_eq!(fixture.run_outcome(run_id).await.0, "queued");
    fixture.run_agent(fixture.settings("local")).await;

    let (status, metadata, events) = fixture.run_outcome(run_id).await;
    assert_eq!(status, "success", "{metadata} {events:?}");
    assert!(
        events.iter().any(|e| e.contains("approved by bob, cy")),
        "{events:?}"
    );
    assert_eq!(live_partners(&fixture).await, PARTNERS);
}

#[tokio::test]
async fn unapproved_live_overwrite_cannot_be_claimed() {
    let fixture = Fixture::new().await;
    let backup_id = backed_up(&fixture).await;
    let run_id = fixture
        .queue_run("env-prod", live_overwrite(&fixture, backup_id))
        .await;

    let claimed = fixture
        .ops
        .client()
        .await
        .query(
            "SELECT run_id FROM ops.claim_next_run(p_worker_id => 'restore-gate')",
            &[],
        )
        .await
        .unwrap();

    assert!(claimed.is_empty(), "claimed {claimed:?}");
    assert_eq!(fixture.run_outcome(run_id).await.0, "pending_approval");
}

#[tokio::test]
async fn agent_rejects_live_overwrite_that_skipped_approval() {
    let fixture = Fixture::new().await;
    let backup_id = backed_up(&fixture).await;
    change_live_database(&fixture).await;
    let client = fixture.ops.client().await;
    client
        .batch_execute("ALTER TABLE ops.runs DISABLE TRIGGER runs_require_approval")
        .await
        .unwrap();
    let run_id = fixture
        .queue_run("env-prod", live_overwrite(&fixture, backup_id))
        .await;
    client
        .batch_execute("ALTER TABLE ops.runs ENABLE TRIGGER runs_require_approval")
        .await
        .unwrap();
    assert_eq!(fixture.run_outcome(run_id).await.0, "queued");

    fixture.run_agent(fixture.settings("local")).await;

    let (status, metadata, events) = fixture.run_outcome(run_id).await;
    assert_eq!(status, "failed");
    assert_eq!(metadata["failed_step"], "approvals");
    let expected = "live database of env-prod requires 2 approvals but the run has 0";
    let error = metadata["error"].as_str().unwrap_or_default();
    assert!(error.contains(expected), "{error}");
    assert!(events.iter().any(|e| e.contains(expected)), "{events:?}");
    assert_eq!(live_partners(&fixture).await, PARTNERS + 1);
}

#[tokio::test]
async fn queue_gates_only_live_overwrites() {
    let fixture = Fixture::new().await;
    let live = fixture.odoo.name.clone();
    let cases = [
        (
            json!({ "target_db": live, "overwrite": true }),
            "pending_approval",
        ),
        (
            json!({ "target_db": live, "overwrite": "yes" }),
            "pending_approval",
        ),
        (json!({ "target_db": live }), "queued"),
        (json!({ "target_db": live, "overwrite": false }), "queued"),
        (
            json!({ "target_db": format!("{live}_copy"), "overwrite": true }),
            "queued",
        ),
        (json!({ "overwrite": true }), "queued"),
    ];
    for (extra, expected) in cases {
        let mut metadata = json!({ "workflow": "restore", "triggered_by": "ann" });
        for (key, value) in extra.as_object().unwrap() {
            metadata[key] = value.clone();
        }
        let run_id = fixture.queue_run("env-prod", metadata.clone()).await;
        let status = fixture.run_outcome(run_id).await.0;
        assert_eq!(status, expected, "{metadata}");
    }
}

#[tokio::test]
async fn live_overwrite_without_requester_is_rejected() {
    let fixture = Fixture::new().await;
    let metadata = json!({
        "workflow": "restore",
        "target_db": fixture.odoo.name,
        "overwrite": true,
    });
    let err = fixture
        .ops
        .client()
        .await
        .query_one(
            "SELECT run_id FROM ops.queue_run('proj', 'env-prod', NULL, NULL, $1)",
            &[&metadata],
        )
        .await
        .unwrap_err();
    let message = err.as_db_error().unwrap().message().to_string();
    assert!(message.contains("needs approval"), "{message}");
}

#[tokio::test]
async fn new_database_restore_runs_at_once_in_prod() {
    let fixture = Fixture::new().await;
    let backup_id = backed_up(&fixture).await;
    let target = format!("{}_copy", fixture.odoo.name);
    let run_id = fixture
        .queue_run(
            "env-prod",
            json!({ "workflow": "restore", "backup_id": backup_id, "target_db": target }),
        )
        .await;
    assert_eq!(fixture.run_outcome(run_id).await.0, "queued");

    fixture.run_agent(fixture.settings("local")).await;

    let (status, metadata, events) = fixture.run_outcome(run_id).await;
    assert_eq!(status, "success", "{metadata} {events:?}");
    assert_eq!(fixture.odoo.count(&target, "res_partner").await, PARTNERS);
}

/// Adds project "other" whose environment other-staging shares the fixture's server.
async fn add_other_project(fixture: &Fixture) {
    let client = fixture.ops.client().await;
    client
        .batch_execute("INSERT INTO ops.projects (project_id) VALUES ('other')")
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO ops.environments (env_id, project_id, env_type, db_name, config)
             VALUES ('other-staging', 'other', 'staging', $1, '{}')",
            &[&fixture.odoo.name],
        )
        .await
        .unwrap();
}

async fn queue_in_other_project(fixture: &Fixture, metadata: Value) -> Uuid {
    fixture
        .ops
        .client()
        .await
        .query_one(
            "SELECT run_id FROM ops.queue_run('other', 'other-staging', NULL, NULL, $1)",
            &[&metadata],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn backup_of_another_project_is_rejected() {
    let fixture = Fixture::new().await;
    let backup_id = backed_up(&fixture).await;
    add_other_project(&fixture).await;
    let by_id = format!("{}_by_id", fixture.odoo.name);
    let by_source = format!("{}_by_source", fixture.odoo.name);
    let named = queue_in_other_project(
        &fixture,
        json!({ "workflow": "restore", "backup_id": backup_id, "target_db": by_id }),
    )
    .await;
    let newest = queue_in_other_project(
        &fixture,
        json!({ "workflow": "restore", "source_env": "env-prod", "target_db": by_source }),
    )
    .await;

    fixture.run_agent(fixture.settings("local")).await;

    for (run_id, target) in [(named, &by_id), (newest, &by_source)] {
        let (status, metadata, _) = fixture.run_outcome(run_id).await;
        assert_eq!(status, "failed", "{metadata}");
        assert_eq!(metadata["failed_step"], "validate");
        let error = metadata["error"].as_str().unwrap_or_default();
        assert!(error.contains(&backup_id.to_string()), "{error}");
        assert!(error.contains("belongs to project proj"), "{error}");
        assert!(!fixture.odoo.database_exists(target).await, "{target}");
    }
}

#[tokio::test]
async fn restore_cannot_replace_another_environments_database() {
    let fixture = Fixture::new().await;
    let backup_id = backed_up(&fixture).await;
    change_live_database(&fixture).await;
    let before = live_partners(&fixture).await;

    let run_id = fixture
        .queue_run("env-staging", live_overwrite(&fixture, backup_id))
        .await;
    fixture.run_agent(fixture.settings("local")).await;

    let (status, metadata, _) = fixture.run_outcome(run_id).await;
    assert_eq!(status, "failed", "{metadata}");
    let error = metadata["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("live database of environment env-prod"),
        "{error}"
    );
    assert_eq!(
        live_partners(&fixture).await,
        before,
        "prod's database was replaced"
    );
}
