//! Queueing runs and reading them back, through the same SQL functions callers use.

use serde_json::{json, Value};
use tokio_postgres::Client;
use uuid::Uuid;

/// A run as the tests inspect it.
#[derive(Debug, Clone)]
pub struct RunRow {
    pub status: String,
    pub attempt: i32,
    pub worker_id: Option<String>,
    pub metadata: Value,
}

/// One row of ops.run_events.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub seq: i64,
    pub level: String,
    pub message: String,
    pub payload: Option<Value>,
}

/// Queues a run of `workflow` in `env` for project `proj` and returns its id.
pub async fn queue(client: &Client, env: &str, workflow: &str) -> Uuid {
    queue_with(client, env, json!({ "workflow": workflow })).await
}

/// Queues a run with the given metadata and returns its id.
pub async fn queue_with(client: &Client, env: &str, metadata: Value) -> Uuid {
    client
        .query_one(
            "SELECT run_id FROM ops.queue_run(p_project_id => 'proj', p_env => $1, \
             p_git_sha => 'abc123', p_metadata => $2)",
            &[&env, &metadata],
        )
        .await
        .unwrap_or_else(|err| panic!("queue_run failed: {err}"))
        .get(0)
}

/// Queues `count` runs of `workflow` in `env` in one statement.
pub async fn queue_many(client: &Client, env: &str, workflow: &str, count: i32) {
    client
        .execute(
            "INSERT INTO ops.runs (project_id, env_id, metadata)
             SELECT 'proj', $1, jsonb_build_object('workflow', $2::text)
               FROM generate_series(1, $3)",
            &[&env, &workflow, &count],
        )
        .await
        .expect("queueing runs");
}

pub async fn run(client: &Client, run_id: Uuid) -> RunRow {
    let row = client
        .query_one(
            "SELECT status, attempt, worker_id, metadata FROM ops.runs WHERE run_id = $1",
            &[&run_id],
        )
        .await
        .expect("reading the run");
    RunRow {
        status: row.get(0),
        attempt: row.get(1),
        worker_id: row.get(2),
        metadata: row.get(3),
    }
}

/// Returns the run once its status is `status`, or `None`.
pub async fn run_in(client: &Client, run_id: Uuid, status: &str) -> Option<RunRow> {
    let row = run(client, run_id).await;
    (row.status == status).then_some(row)
}

pub async fn events(client: &Client, run_id: Uuid) -> Vec<EventRow> {
    client
        .query(
            "SELECT seq, level, message, payload FROM ops.run_events
              WHERE run_id = $1 ORDER BY seq",
            &[&run_id],
        )
        .await
        .expect("reading events")
        .iter()
        .map(|row| EventRow {
            seq: row.get(0),
            level: row.get(1),
            message: row.get(2),
            payload: row.get(3),
        })
        .collect()
}

/// Returns whether some event of the run contains `text`.
pub async fn has_event(client: &Client, run_id: Uuid, text: &str) -> bool {
    events(client, run_id)
        .await
        .iter()
        .any(|event| event.message.contains(text))
}

/// Returns the messages of a run's events, for assertion output.
pub fn messages(events: &[EventRow]) -> Vec<&str> {
    events.iter().map(|event| event.message.as_str()).collect()
}

/// Makes requeued runs claimable at once, so tests need not wait for the retry delay.
pub async fn no_retry_delay(client: &Client) {
    client
        .execute("UPDATE ops.workflows SET retry_delay = '0'", &[])
        .await
        .expect("clearing retry delays");
}

/// Returns the SQLSTATE of a failed statement.
pub fn sqlstate(err: &tokio_postgres::Error) -> &str {
    err.as_db_error()
        .map(|db| db.code().code())
        .unwrap_or_else(|| panic!("not a database error: {err}"))
}
