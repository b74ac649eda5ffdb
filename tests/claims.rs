//! Claiming: every run goes to exactly one agent, agents claim only what they serve, and a
//! run that cannot be executed fails with an event while the agent goes on claiming.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::agents::{self, RunningAgent};
use common::runs;
use common::workflows::{self, Gauge, NeedsMetadata, Panic, Record, Returns, Succeed};
use common::{wait, TestDb};
use odooops_agent::agent::{self, Mode, Shutdown};
use odooops_agent::queue::{ClaimFilter, FinalStatus, Queue};
use odooops_agent::workflows::Workflows;
use serde_json::json;
use uuid::Uuid;

const RACING_AGENTS: usize = 8;
const RACED_RUNS: i32 = 3_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_agents_claim_each_run_exactly_once() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    workflows::create_claims_table(&client).await;
    runs::queue_many(&client, "env-dev", "build", RACED_RUNS).await;

    let mut agents = tokio::task::JoinSet::new();
    for index in 0..RACING_AGENTS {
        // Eight pools of three stay well inside a shared server's 100 connections.
        let worker_id = format!("agent-{index}");
        let config = agents::config_with(&worker_id, "concurrency = 2", "pool_size = 3");
        let settings = agents::settings(&db.url, &config);
        let workflows = agents::only("build", Record);
        agents.spawn(agent::run(
            settings,
            workflows,
            Mode::Once,
            Shutdown::default(),
        ));
    }
    let mut claimed_by_agents = 0;
    while let Some(summary) = agents.join_next().await {
        claimed_by_agents += summary.expect("agent task").expect("agent").claimed;
    }

    let counts = client
        .query_one(
            "SELECT count(*), count(DISTINCT run_id), count(DISTINCT worker_id)
               FROM test_claims",
            &[],
        )
        .await
        .unwrap();
    let claims: i64 = counts.get(0);
    let distinct_runs: i64 = counts.get(1);
    let workers: i64 = counts.get(2);
    assert_eq!(claims, RACED_RUNS as i64, "every run is executed once");
    assert_eq!(distinct_runs, RACED_RUNS as i64, "no run is executed twice");
    assert_eq!(claimed_by_agents, RACED_RUNS as u64);
    assert!(
        workers > 1,
        "only {workers} agent claimed runs; nothing raced"
    );
    let statuses = client
        .query(
            "SELECT status, attempt, count(*) FROM ops.runs GROUP BY status, attempt",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(statuses.len(), 1, "runs not all finished on attempt 1");
    assert_eq!(statuses[0].get::<_, String>(0), "success");
    assert_eq!(statuses[0].get::<_, i32>(1), 1);
    let mismatched: i64 = client
        .query_one(
            "SELECT count(*) FROM test_claims c JOIN ops.runs r USING (run_id)
              WHERE r.worker_id <> c.worker_id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        mismatched, 0,
        "a run was executed by an agent that did not claim it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_queues_never_hand_out_a_run_twice() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    runs::queue_many(&client, "env-dev", "build", RACED_RUNS).await;

    let mut claimers = tokio::task::JoinSet::new();
    for index in 0..RACING_AGENTS {
        let queue = queue_for(&db, &format!("queue-{index}"), None);
        claimers.spawn(async move {
            let mut claimed = Vec::new();
            while let Some(run) = queue.claim().await.expect("claim") {
                queue
                    .finish(run.lease, FinalStatus::Success, &json!({}))
                    .await
                    .expect("finish");
                claimed.push(run.run_id);
            }
            claimed
        });
    }
    let mut claimed: Vec<Uuid> = Vec::new();
    while let Some(batch) = claimers.join_next().await {
        claimed.extend(batch.expect("claimer task"));
    }

    let total = claimed.len();
    claimed.sort();
    claimed.dedup();
    assert_eq!(total, RACED_RUNS as usize, "every run was claimed");
    assert_eq!(claimed.len(), total, "some run was claimed twice");
    let not_once: i64 = client
        .query_one(
            "SELECT count(*) FROM ops.runs WHERE attempt <> 1 OR status <> 'success'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(not_once, 0);
}

fn queue_for(db: &TestDb, worker_id: &str, env_ids: Option<Vec<String>>) -> Queue {
    let settings = agents::settings(&db.url, "[database]\npool_size = 2\n");
    let pool = odooops_agent::db::pool(&settings.database).expect("pool");
    Queue::new(
        pool,
        ClaimFilter {
            worker_id: worker_id.to_string(),
            env_ids,
            workflows: None,
            lease: Duration::from_secs(60),
        },
    )
}

#[tokio::test]
async fn agent_claims_only_served_environments_and_workflows() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    let dev_build = runs::queue(&client, "env-dev", "build").await;
    let dev_deploy = runs::queue(&client, "env-dev", "deploy").await;
    let dev_unknown = runs::queue(&client, "env-dev", "frobnicate").await;
    let prod_build = runs::queue(&client, "env-prod", "build").await;
    let prod_unknown = runs::queue(&client, "env-prod", "frobnicate").await;

    let config = agents::config("dev-builder", "environments = [\"env-dev\"]");
    let summary = agent::run(
        agents::settings(&db.url, &config),
        agents::only("build", Succeed),
        Mode::Once,
        Shutdown::default(),
    )
    .await
    .expect("agent");

    assert_eq!(summary.claimed, 2);
    assert_eq!(runs::run(&client, dev_build).await.status, "success");
    let unknown = runs::run(&client, dev_unknown).await;
    assert_eq!(
        unknown.status, "failed",
        "unknown workflows fail where they are served"
    );
    assert_eq!(
        runs::run(&client, dev_deploy).await.status,
        "queued",
        "deploy not run here"
    );
    assert_eq!(
        runs::run(&client, prod_build).await.status,
        "queued",
        "prod not served"
    );
    assert_eq!(
        runs::run(&client, prod_unknown).await.status,
        "queued",
        "prod not served"
    );
}

#[tokio::test]
async fn unknown_workflow_fails_and_agent_continues() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    let unknown = runs::queue(&client, "env-dev", "frobnicate").await;
    let next = runs::queue(&client, "env-dev", "build").await;

    let summary = agent::run(
        agents::settings(&db.url, &agents::config("agent-a", "")),
        agents::only("build", Succeed),
        Mode::Once,
        Shutdown::default(),
    )
    .await
    .expect("agent");

    assert_eq!(summary.claimed, 2);
    let failed = runs::run(&client, unknown).await;
    assert_eq!(failed.status, "failed");
    let error = failed.metadata["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(error.contains("unknown workflow \"frobnicate\""), "{error}");
    assert_eq!(failed.metadata["failed_step"], "validate");
    let events = runs::events(&client, unknown).await;
    let last = events.last().expect("events");
    assert_eq!(last.level, "error");
    assert!(
        last.message.contains("unknown workflow"),
        "{:?}",
        runs::messages(&events)
    );
    assert_eq!(runs::run(&client, next).await.status, "success");
}

#[tokio::test]
async fn malformed_metadata_fails_naming_field() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    let metadata = json!({ "workflow": "deploy", "image": "ghcr.io/acme/odoo:1",
                           "replicas": "three" });
    let malformed = runs::queue_with(&client, "env-dev", metadata).await;
    let metadata = json!({ "workflow": "deploy", "image": "ghcr.io/acme/odoo:1",
                           "replicas": 3 });
    let good = runs::queue_with(&client, "env-dev", metadata).await;

    let summary = agent::run(
        agents::settings(&db.url, &agents::config("agent-a", "")),
        agents::only("deploy", NeedsMetadata),
        Mode::Once,
        Shutdown::default(),
    )
    .await
    .expect("agent");

    assert_eq!(summary.claimed, 2);
    let failed = runs::run(&client, malformed).await;
    assert_eq!(failed.status, "failed");
    let error = failed.metadata["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(error.contains("invalid run metadata"), "{error}");
    assert!(error.contains("three"), "{error}");
    assert!(runs::has_event(&client, malformed, "invalid run metadata").await);
    let succeeded = runs::run(&client, good).await;
    assert_eq!(succeeded.status, "success");
    assert_eq!(succeeded.metadata["deployed"], "ghcr.io/acme/odoo:1");
}

#[tokio::test]
async fn panicking_workflow_fails_its_run() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    let panicking = runs::queue(&client, "env-dev", "restore").await;
    let next = runs::queue(&client, "env-dev", "build").await;
    let mut workflows = Workflows::new();
    workflows
        .register("restore", Panic)
        .register("build", Succeed);

    let summary = agent::run(
        agents::settings(&db.url, &agents::config("agent-a", "")),
        workflows,
        Mode::Once,
        Shutdown::default(),
    )
    .await
    .expect("agent");

    assert_eq!(summary.claimed, 2);
    let failed = runs::run(&client, panicking).await;
    assert_eq!(failed.status, "failed");
    let error = failed.metadata["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains("panicked: test workflow panics on purpose"),
        "{error}"
    );
    assert_eq!(runs::run(&client, next).await.status, "success");
}

#[tokio::test]
async fn requested_cancellation_stops_a_running_run() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    let run_id = runs::queue(&client, "env-dev", "build").await;
    let blocked = common::workflows::Block::new(common::workflows::Release::Never);
    let agent = RunningAgent::start(
        agents::settings(&db.url, &agents::config("agent-a", "")),
        agents::only("build", blocked),
    );
    wait::until("the run to start", Duration::from_secs(20), || {
        let client = &client;
        async move {
            runs::has_event(client, run_id, "working")
                .await
                .then_some(())
        }
    })
    .await;

    client
        .execute("SELECT ops.cancel_run(p_run_id => $1)", &[&run_id])
        .await
        .expect("cancel_run");
    let cancelled = wait::until("the run to be cancelled", Duration::from_secs(20), || {
        let client = &client;
        async move { runs::run_in(client, run_id, "cancelled").await }
    })
    .await;

    assert_eq!(cancelled.metadata["error"], "cancelled on request");
    assert!(runs::has_event(&client, run_id, "stopped by cancellation").await);
    assert!(runs::has_event(&client, run_id, "Run cancelled on request").await);
    agent.stop().await;
}

#[tokio::test]
async fn non_object_result_is_stored_under_result() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    let run_id = runs::queue(&client, "env-dev", "build").await;

    agent::run(
        agents::settings(&db.url, &agents::config("agent-a", "")),
        agents::only("build", Returns(json!(["sha256:abc"]))),
        Mode::Once,
        Shutdown::default(),
    )
    .await
    .expect("agent");

    let run = runs::run(&client, run_id).await;
    assert_eq!(run.status, "success");
    assert_eq!(run.metadata["result"], json!(["sha256:abc"]));
    assert_eq!(run.metadata["workflow"], "build");
}

#[tokio::test]
async fn unstorable_result_fails_the_run() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    let run_id = runs::queue(&client, "env-dev", "build").await;

    // jsonb rejects the NUL character, so finish_run rejects this result.
    agent::run(
        agents::settings(&db.url, &agents::config("agent-a", "")),
        agents::only("build", Returns(json!({ "digest": "a\u{0}b" }))),
        Mode::Once,
        Shutdown::default(),
    )
    .await
    .expect("agent");

    let run = runs::run(&client, run_id).await;
    assert_eq!(run.status, "failed");
    assert_eq!(run.attempt, 1);
    assert_eq!(run.metadata["failed_step"], "finish");
    let error = run.metadata["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.starts_with("finishing the run as success failed"),
        "{error}"
    );
    assert!(error.contains("SQLSTATE 22P05"), "{error}");
    let events = runs::events(&client, run_id).await;
    let last = events.last().expect("events");
    assert_eq!(last.level, "error");
    assert_eq!(last.message, error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limits_runs_in_progress() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    runs::queue_many(&client, "env-dev", "build", 6).await;
    let max_in_flight = Arc::new(AtomicUsize::new(0));
    let gauge = Gauge {
        hold: Duration::from_millis(300),
        in_flight: Arc::new(AtomicUsize::new(0)),
        max_in_flight: max_in_flight.clone(),
    };

    let summary = agent::run(
        agents::settings(&db.url, &agents::config("agent-a", "concurrency = 2")),
        agents::only("build", gauge),
        Mode::Once,
        Shutdown::default(),
    )
    .await
    .expect("agent");

    assert_eq!(summary.claimed, 6);
    assert_eq!(max_in_flight.load(Ordering::SeqCst), 2);
}
