//! Approvals that the database enforces: production deploys wait for distinct reviewers
//! other than their requester, and no agent can claim them before.

mod common;

use common::TestDb;
use serde_json::json;
use tokio_postgres::Client;
use uuid::Uuid;

async fn setup() -> (TestDb, Client) {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    (db, client)
}

async fn queue(client: &Client, env: &str, metadata: serde_json::Value) -> (Uuid, String) {
    let row = client
        .query_one(
            "SELECT run_id, status FROM ops.queue_run('proj', $1, 'abc123', 'release/1', $2)",
            &[&env, &metadata],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

async fn prod_deploy(client: &Client) -> Uuid {
    queue(
        client,
        "prod",
        json!({"workflow": "deploy", "triggered_by": "ann"}),
    )
    .await
    .0
}

async fn status(client: &Client, run: Uuid) -> String {
    client
        .query_one("SELECT status FROM ops.runs WHERE run_id = $1", &[&run])
        .await
        .unwrap()
        .get(0)
}

async fn review(client: &Client, run: Uuid, reviewer: &str, decision: &str) -> Result<(), String> {
    client
        .execute(
            "SELECT 1 FROM ops.review_run($1, $2, $3)",
            &[&run, &reviewer, &decision],
        )
        .await
        .map(|_| ())
        .map_err(|err| {
            err.as_db_error()
                .map(|db| db.message().to_string())
                .unwrap_or_default()
        })
}

async fn claimable(client: &Client) -> bool {
    client
        .query_opt("SELECT run_id FROM ops.claim_next_run('test-worker')", &[])
        .await
        .unwrap()
        .is_some()
}

#[tokio::test]
async fn prod_deploy_waits_with_two_open_approvals() {
    let (_db, client) = setup().await;

    let run = prod_deploy(&client).await;

    assert_eq!(status(&client, run).await, "pending_approval");
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE status = 'pending'), count(*)
               FROM ops.approvals WHERE run_id = $1",
            &[&run],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 2);
    assert_eq!(row.get::<_, i64>(1), 2);
    assert!(!claimable(&client).await);
}

#[tokio::test]
async fn other_environments_and_rollbacks_do_not_wait() {
    let (_db, client) = setup().await;

    let (_, dev) = queue(&client, "dev", json!({"workflow": "deploy"})).await;
    let (_, staging) = queue(&client, "staging", json!({"workflow": "deploy"})).await;
    let (_, rollback) = queue(&client, "prod", json!({"workflow": "rollback"})).await;
    let (_, backup) = queue(&client, "prod", json!({"workflow": "backup"})).await;

    assert_eq!(dev, "queued");
    assert_eq!(staging, "queued");
    assert_eq!(rollback, "queued");
    assert_eq!(backup, "queued");
}

#[tokio::test]
async fn two_distinct_reviewers_queue_the_run() {
    let (_db, client) = setup().await;
    let run = prod_deploy(&client).await;

    review(&client, run, "bob", "approved").await.unwrap();
    assert_eq!(status(&client, run).await, "pending_approval");
    assert!(!claimable(&client).await);
    review(&client, run, "cy", "approved").await.unwrap();

    assert_eq!(status(&client, run).await, "queued");
    assert!(claimable(&client).await);
}

#[tokio::test]
async fn requester_cannot_approve_own_run() {
    let (_db, client) = setup().await;
    let run = prod_deploy(&client).await;

    let err = review(&client, run, "ANN", "approved").await.unwrap_err();

    assert!(err.contains("requested run"), "{err}");
    assert!(err.contains("cannot review it"), "{err}");
    assert_eq!(status(&client, run).await, "pending_approval");
}

#[tokio::test]
async fn one_reviewer_cannot_approve_twice() {
    let (_db, client) = setup().await;
    let run = prod_deploy(&client).await;
    review(&client, run, "bob", "approved").await.unwrap();

    let err = review(&client, run, "Bob", "approved").await.unwrap_err();

    assert!(err.contains("already reviewed"), "{err}");
    assert_eq!(status(&client, run).await, "pending_approval");
}

#[tokio::test]
async fn webhook_update_by_approval_id_counts() {
    let (_db, client) = setup().await;
    let run = prod_deploy(&client).await;
    let ids: Vec<Uuid> = client
        .query(
            "SELECT approval_id FROM ops.approvals WHERE run_id = $1",
            &[&run],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();

    for (id, reviewer) in ids.iter().zip(["bob", "cy"]) {
        client
            .execute(
                "UPDATE ops.approvals
                    SET status = 'approved', approved_by = $2, approved_at = now()
                  WHERE approval_id = $1",
                &[id, &reviewer],
            )
            .await
            .unwrap();
    }

    assert_eq!(status(&client, run).await, "queued");
    let row = client
        .query_one(
            "SELECT metadata->'approvers' FROM ops.runs WHERE run_id = $1",
            &[&run],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, serde_json::Value>(0), json!(["bob", "cy"]));
}

#[tokio::test]
async fn approval_wakes_listening_agents() {
    let (db, client) = setup().await;
    let run = prod_deploy(&client).await;
    let (listener, mut connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = futures_util::StreamExt::next(&mut messages).await {
            if let tokio_postgres::AsyncMessage::Notification(note) = message {
                let _ = tx.send(note.payload().to_string());
            }
        }
    });
    listener
        .batch_execute("LISTEN ops_run_queued")
        .await
        .unwrap();

    review(&client, run, "bob", "approved").await.unwrap();
    review(&client, run, "cy", "approved").await.unwrap();

    let payload = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
        .await
        .expect("a notification within 5 s")
        .unwrap();
    assert_eq!(payload, "env-prod");
}

#[tokio::test]
async fn rejection_cancels_the_run() {
    let (_db, client) = setup().await;
    let run = prod_deploy(&client).await;
    review(&client, run, "bob", "approved").await.unwrap();

    review(&client, run, "cy", "rejected").await.unwrap();

    assert_eq!(status(&client, run).await, "cancelled");
    let err = review(&client, run, "dee", "approved").await.unwrap_err();
    assert!(err.contains("not waiting for approval"), "{err}");
    assert!(!claimable(&client).await);
}

#[tokio::test]
async fn direct_status_update_is_rejected_until_approved() {
    let (_db, client) = setup().await;
    let run = prod_deploy(&client).await;

    let queued = client
        .execute(
            "UPDATE ops.runs SET status = 'queued' WHERE run_id = $1",
            &[&run],
        )
        .await;
    let finished = client
        .execute("SELECT 1 FROM ops.finish_run($1, 'success')", &[&run])
        .await;

    let queued_err = queued.unwrap_err();
    let message = queued_err.as_db_error().unwrap().message();
    assert!(
        message.contains("waiting for approval: 0 of 2"),
        "{message}"
    );
    let finished_err = finished.unwrap_err();
    let message = finished_err.as_db_error().unwrap().message();
    assert!(message.contains("waiting for approval"), "{message}");
    assert_eq!(status(&client, run).await, "pending_approval");
    client
        .execute("SELECT 1 FROM ops.cancel_run($1)", &[&run])
        .await
        .unwrap();
    assert_eq!(status(&client, run).await, "cancelled");
}

#[tokio::test]
async fn inserting_a_run_as_queued_still_holds_it() {
    let (_db, client) = setup().await;

    let row = client
        .query_one(
            "INSERT INTO ops.runs (project_id, env_id, status, git_sha, metadata)
             VALUES ('proj', 'env-prod', 'queued', 'abc', '{\"workflow\": \"promote\",
                     \"triggered_by\": \"ann\"}')
             RETURNING status",
            &[],
        )
        .await
        .unwrap();

    assert_eq!(row.get::<_, String>(0), "pending_approval");
    assert!(!claimable(&client).await);
}

#[tokio::test]
async fn run_without_requester_is_rejected_in_prod() {
    let (_db, client) = setup().await;

    let err = client
        .query_one(
            "SELECT * FROM ops.queue_run('proj', 'prod', 'abc', NULL, '{\"workflow\": \"deploy\"}')",
            &[],
        )
        .await
        .unwrap_err();

    let message = err.as_db_error().unwrap().message().to_string();
    assert!(message.contains("triggered_by"), "{message}");
}

#[tokio::test]
async fn reviewer_count_is_configurable_per_environment() {
    let (_db, client) = setup().await;
    client
        .batch_execute(
            "UPDATE ops.environments SET required_reviewers = 1 WHERE env_id = 'env-staging';
             UPDATE ops.environments SET required_reviewers = 0 WHERE env_id = 'env-prod';",
        )
        .await
        .unwrap();

    let (staging, staging_status) = queue(
        &client,
        "staging",
        json!({"workflow": "deploy", "triggered_by": "ann"}),
    )
    .await;
    let (_, prod_status) = queue(&client, "prod", json!({"workflow": "deploy"})).await;
    review(&client, staging, "bob", "approved").await.unwrap();

    assert_eq!(staging_status, "pending_approval");
    assert_eq!(prod_status, "queued");
    assert_eq!(status(&client, staging).await, "queued");
}

#[tokio::test]
async fn new_prod_environment_defaults_to_two_reviewers() {
    let (_db, client) = setup().await;

    client
        .batch_execute(
            "INSERT INTO ops.environments (env_id, project_id, env_type, db_name)
             VALUES ('env-prod-eu', 'proj', 'prod', 'odoo_eu'),
                    ('env-dev-2', 'proj', 'dev', 'odoo_dev2')",
        )
        .await
        .unwrap();

    let rows = client
        .query(
            "SELECT env_id, required_reviewers FROM ops.environments
              WHERE env_id IN ('env-prod-eu', 'env-dev-2') ORDER BY env_id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, i32>(1), 0);
    assert_eq!(rows[1].get::<_, i32>(1), 2);
}

#[tokio::test]
async fn concurrent_approvals_are_both_counted() {
    let (db, client) = setup().await;
    let run = prod_deploy(&client).await;
    let mut first = db.client().await;
    let mut second = db.client().await;

    let first_tx = first.transaction().await.unwrap();
    first_tx
        .execute("SELECT 1 FROM ops.review_run($1, 'bob')", &[&run])
        .await
        .unwrap();
    let second_review = tokio::spawn(async move {
        let tx = second.transaction().await.unwrap();
        tx.execute("SELECT 1 FROM ops.review_run($1, 'cy')", &[&run])
            .await
            .unwrap();
        tx.commit().await.unwrap();
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    first_tx.commit().await.unwrap();
    second_review.await.unwrap();

    assert_eq!(status(&client, run).await, "queued");
}
