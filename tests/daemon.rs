//! The daemon: stopping on SIGTERM or a shutdown token, and waking for new runs through
//! LISTEN/NOTIFY with the poll as fallback.

mod common;

use std::time::Duration;

use common::agents::{self, RunningAgent};
use common::child::{self, ChildAgent};
use common::runs;
use common::workflows::{Block, Release, Succeed};
use common::{wait, TestDb};
use odooops_agent::queue::listener;
use tokio::sync::watch;
use tokio_postgres::Client;
use uuid::Uuid;

const LONG: Duration = Duration::from_secs(30);

async fn wait_for_event(client: &Client, run_id: Uuid, text: &str) {
    wait::until(&format!("event {text:?}"), LONG, || async move {
        runs::has_event(client, run_id, text).await.then_some(())
    })
    .await;
}

async fn wait_for_status(client: &Client, run_id: Uuid, status: &str) -> runs::RunRow {
    wait::until(
        &format!("run {run_id} to be {status}"),
        LONG,
        || async move { runs::run_in(client, run_id, status).await },
    )
    .await
}

/// Waits until the child's log contains `text`.
async fn wait_for_log(child: &ChildAgent, text: &str) {
    let found = tokio::time::timeout(LONG, async {
        while !child.log().contains(text) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        found.is_ok(),
        "child never logged {text:?}; log:\n{}",
        child.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_current_run() {
    if child::act_as_agent().await {
        return;
    }
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    let current = runs::queue(&client, "env-dev", "build").await;
    let waiting = runs::queue(&client, "env-dev", "build").await;
    let release_dir = tempfile::tempdir().unwrap();
    let release = release_dir.path().join("release");
    let config = agents::config("agent-a", "shutdown_grace_secs = 60");
    let mut agent = ChildAgent::spawn(
        "sigterm_drains_the_current_run",
        &db.url,
        &config,
        Some(&release),
    );
    wait_for_event(&client, current, "working").await;

    agent.terminate();
    wait_for_log(&agent, "stop signal received; draining").await;
    std::fs::write(&release, b"").unwrap();
    let status = agent.exit_status(LONG).await;

    assert!(
        status.success(),
        "agent exited with {status}; log:\n{}",
        agent.log()
    );
    assert_eq!(runs::run(&client, current).await.status, "success");
    let untouched = runs::run(&client, waiting).await;
    assert_eq!(
        untouched.status, "queued",
        "the agent claimed after SIGTERM"
    );
    assert_eq!(untouched.attempt, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_back_overlong_run() {
    if child::act_as_agent().await {
        return;
    }
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    let run_id = runs::queue(&client, "env-dev", "build").await;
    let config = agents::config("agent-a", "shutdown_grace_secs = 1");
    let mut agent = ChildAgent::spawn("sigterm_hands_back_overlong_run", &db.url, &config, None);
    wait_for_event(&client, run_id, "working").await;

    agent.terminate();
    let status = agent.exit_status(LONG).await;

    assert!(
        status.success(),
        "agent exited with {status}; log:\n{}",
        agent.log()
    );
    assert_handed_back(&client, run_id, "agent agent-a stopped").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigterm_hands_back_at_once() {
    if child::act_as_agent().await {
        return;
    }
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    let run_id = runs::queue(&client, "env-dev", "build").await;
    let config = agents::config("agent-a", "shutdown_grace_secs = 3600");
    let mut agent = ChildAgent::spawn("second_sigterm_hands_back_at_once", &db.url, &config, None);
    wait_for_event(&client, run_id, "working").await;

    agent.terminate();
    wait_for_log(&agent, "stop signal received; draining").await;
    agent.terminate();
    let status = agent.exit_status(LONG).await;

    assert!(
        status.success(),
        "agent exited with {status}; log:\n{}",
        agent.log()
    );
    assert_handed_back(&client, run_id, "agent agent-a stopped").await;
}

/// Checks that the run is queued again with its attempt given back, and that its events
/// record the hand-back.
async fn assert_handed_back(client: &Client, run_id: Uuid, reason: &str) {
    let run = runs::run(client, run_id).await;
    assert_eq!(run.status, "queued");
    assert_eq!(run.attempt, 0, "a handed-back run keeps its attempt");
    assert_eq!(run.worker_id, None);
    let events = runs::events(client, run_id).await;
    let messages = runs::messages(&events);
    assert!(
        messages.contains(&"stopped by cancellation"),
        "{messages:?}"
    );
    let handed_back = format!("Run handed back to the queue: {reason}");
    assert!(messages.contains(&handed_back.as_str()), "{messages:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_token_lets_the_running_run_finish() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    let current = runs::queue(&client, "env-dev", "build").await;
    let waiting = runs::queue(&client, "env-dev", "build").await;
    let (release, released) = watch::channel(false);
    let agent = RunningAgent::start(
        agents::settings(
            &db.url,
            &agents::config("agent-a", "shutdown_grace_secs = 60"),
        ),
        agents::only("build", Block::new(Release::Signal(released))),
    );
    wait_for_event(&client, current, "working").await;

    agent.shutdown.drain.cancel();
    release.send_replace(true);
    let summary = agent.join().await;

    assert_eq!(summary.claimed, 1);
    assert_eq!(runs::run(&client, current).await.status, "success");
    assert_eq!(runs::run(&client, waiting).await.status, "queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_back_token_requeues_at_once() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    let run_id = runs::queue(&client, "env-dev", "build").await;
    let agent = RunningAgent::start(
        agents::settings(
            &db.url,
            &agents::config("agent-a", "shutdown_grace_secs = 3600"),
        ),
        agents::only("build", Block::new(Release::Never)),
    );
    wait_for_event(&client, run_id, "working").await;

    agent.shutdown.hand_back.cancel();
    let summary = agent.join().await;

    assert_eq!(summary.claimed, 1, "a handed-back run is not claimed again");
    assert_handed_back(&client, run_id, "agent agent-a stopped").await;
}

/// Agent config that polls only once an hour, so only a wake-up can claim promptly.
fn no_poll_config() -> String {
    agents::config("agent-a", "poll_interval_secs = 3600")
}

/// Returns the backend pid of this database's listener session, once it is listening.
async fn listener_pid(client: &Client) -> Option<i32> {
    client
        .query_opt(
            "SELECT pid FROM pg_stat_activity
              WHERE application_name = $1 AND datname = current_database()
                AND query LIKE 'LISTEN%'",
            &[&listener::APPLICATION_NAME],
        )
        .await
        .unwrap()
        .map(|row| row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_listener_connection_does_not_stall_the_queue() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    let agent = RunningAgent::start(
        agents::settings(&db.url, &no_poll_config()),
        agents::only("build", Succeed),
    );
    let first_pid = wait::until("the listener", LONG, || listener_pid(&client)).await;
    let before = runs::queue(&client, "env-dev", "build").await;
    wait_for_status(&client, before, "success").await;

    client
        .execute("SELECT pg_terminate_backend($1)", &[&first_pid])
        .await
        .unwrap();
    let during = runs::queue(&client, "env-dev", "build").await;
    wait_for_status(&client, during, "success").await;
    let second_pid = wait::until("the listener to reconnect", LONG, || async {
        listener_pid(&client).await.filter(|pid| *pid != first_pid)
    })
    .await;
    let after = runs::queue(&client, "env-dev", "build").await;
    wait_for_status(&client, after, "success").await;
    let summary = agent.stop().await;

    assert_ne!(first_pid, second_pid);
    assert_eq!(summary.claimed, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_claims_runs_when_notifications_are_lost() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    client
        .batch_execute(
            "ALTER TABLE ops.runs DISABLE TRIGGER runs_notify_queued_insert;
             ALTER TABLE ops.runs DISABLE TRIGGER runs_notify_queued_update;",
        )
        .await
        .unwrap();
    let agent = RunningAgent::start(
        agents::settings(
            &db.url,
            &agents::config("agent-a", "poll_interval_secs = 1"),
        ),
        agents::only("build", Succeed),
    );
    wait::until("the listener", LONG, || listener_pid(&client)).await;

    let run_id = runs::queue(&client, "env-dev", "build").await;
    wait_for_status(&client, run_id, "success").await;
    let summary = agent.stop().await;

    assert_eq!(summary.claimed, 1);
}
