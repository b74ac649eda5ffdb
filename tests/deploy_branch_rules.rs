//! The deploy that a successful build queues, as the branch rules choose.

mod common;

use common::TestDb;
use futures_util::future::BoxFuture;
use odooops_agent::agent::{self, Mode, Shutdown};
use odooops_agent::workflows::deploy::queue_deploy_after_build;
use odooops_agent::workflows::{RunContext, RunResult, StepResultExt, Workflow, Workflows};
use serde_json::json;
use tokio_postgres::Client;
use uuid::Uuid;

/// The whole commit id that the build of the abbreviated sha 'abc1234' resolves to.
const COMMIT: &str = "abc1234def5678901234567890abcdef01234567";

/// A build that does nothing but what a real build does at its end: queue the deploy.
struct QueueingBuild;

impl Workflow for QueueingBuild {
    fn execute<'a>(&'a self, ctx: &'a RunContext) -> BoxFuture<'a, RunResult> {
        Box::pin(async move {
            let deploy =
                queue_deploy_after_build(ctx, &format!("registry.test/proj:{COMMIT}"), COMMIT)
                    .await
                    .step("deploy")?;
            Ok(json!({ "deploy_run_id": deploy }))
        })
    }
}

async fn build(db: &TestDb, client: &Client, git_ref: &str) -> Option<(String, String, Uuid)> {
    let metadata = json!({"workflow": "build", "triggered_by": "ann"});
    let row = client
        .query_one(
            "SELECT run_id FROM ops.queue_run('proj', 'dev', 'abc1234', $1, $2)",
            &[&git_ref, &metadata],
        )
        .await
        .unwrap();
    let build_id: Uuid = row.get(0);
    let mut workflows = Workflows::new();
    workflows.register("build", QueueingBuild);
    let settings = db.settings("[agent]\nworkflows = [\"build\"]\n");
    agent::run(settings, workflows, Mode::Once, Shutdown::default())
        .await
        .unwrap();

    let row = client
        .query_one(
            "SELECT status, metadata FROM ops.runs WHERE run_id = $1",
            &[&build_id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "success");
    let metadata: serde_json::Value = row.get(1);
    let deploy: Uuid = serde_json::from_value(metadata["deploy_run_id"].clone()).ok()?;
    let row = client
        .query_one(
            "SELECT env_id, status, metadata->>'build_run_id', git_sha FROM ops.runs \
             WHERE run_id = $1",
            &[&deploy],
        )
        .await
        .unwrap();
    let build_ref: String = row.get(2);
    assert_eq!(build_ref, build_id.to_string());
    let deploy_sha: String = row.get(3);
    assert_eq!(
        deploy_sha, COMMIT,
        "the deploy names the tag the build pushed"
    );
    Some((row.get(0), row.get(1), deploy))
}

async fn setup() -> (TestDb, Client) {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    (db, client)
}

#[tokio::test]
async fn main_deploys_to_staging() {
    let (db, client) = setup().await;

    let (env, status, _) = build(&db, &client, "main").await.unwrap();

    assert_eq!(env, "env-staging");
    assert_eq!(status, "queued");
}

#[tokio::test]
async fn release_branch_waits_for_approval_in_prod() {
    let (db, client) = setup().await;

    let (env, status, _) = build(&db, &client, "refs/heads/release/2024.05")
        .await
        .unwrap();

    assert_eq!(env, "env-prod");
    assert_eq!(status, "pending_approval");
}

#[tokio::test]
async fn other_branches_deploy_to_dev() {
    let (db, client) = setup().await;

    let (env, status, _) = build(&db, &client, "feature/invoice-pdf").await.unwrap();

    assert_eq!(env, "env-dev");
    assert_eq!(status, "queued");
}

#[tokio::test]
async fn project_rules_replace_the_defaults() {
    let (db, client) = setup().await;
    client
        .batch_execute(
            "INSERT INTO ops.branch_rules (project_id, position, pattern, env_target) VALUES
                 ('proj', 1, 'main', 'env-dev'),
                 ('proj', 2, 'hotfix-*', 'staging'),
                 ('proj', 3, '**', NULL)",
        )
        .await
        .unwrap();

    let main = build(&db, &client, "main").await.unwrap();
    let hotfix = build(&db, &client, "hotfix-42").await.unwrap();
    let nested = build(&db, &client, "hotfix-42/extra").await;

    assert_eq!(main.0, "env-dev");
    assert_eq!(hotfix.0, "env-staging");
    assert!(nested.is_none(), "a rule with no target queues no deploy");
}

#[tokio::test]
async fn glob_patterns_match_like_git_branch_filters() {
    let (_db, client) = setup().await;
    let cases = [
        ("release/**", "release/1.0", true),
        ("release/**", "release/1.0/rc", true),
        ("release/*", "release/1.0/rc", false),
        ("release/*", "release/1.0", true),
        ("v?.x", "v1.x", true),
        ("v?.x", "v1yx", false),
        ("main", "mainline", false),
    ];
    for (pattern, branch, expected) in cases {
        let row = client
            .query_one("SELECT $2 ~ ops.glob_to_regex($1)", &[&pattern, &branch])
            .await
            .unwrap();
        assert_eq!(
            row.get::<_, bool>(0),
            expected,
            "{pattern} against {branch}"
        );
    }
}

#[tokio::test]
async fn retried_build_gets_the_same_deploy_run() {
    let (db, client) = setup().await;
    let (_, _, first) = build(&db, &client, "main").await.unwrap();
    let build_id: Uuid = client
        .query_one(
            "SELECT (metadata->>'build_run_id')::uuid FROM ops.runs WHERE run_id = $1",
            &[&first],
        )
        .await
        .unwrap()
        .get(0);

    client
        .execute(
            "UPDATE ops.runs SET status = 'queued', finished_at = NULL WHERE run_id = $1",
            &[&build_id],
        )
        .await
        .unwrap();
    let mut workflows = Workflows::new();
    workflows.register("build", QueueingBuild);
    let settings = db.settings("[agent]\nworkflows = [\"build\"]\n");
    agent::run(settings, workflows, Mode::Once, Shutdown::default())
        .await
        .unwrap();

    let count: i64 = client
        .query_one(
            "SELECT count(*) FROM ops.runs WHERE workflow = 'deploy'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1);
}
