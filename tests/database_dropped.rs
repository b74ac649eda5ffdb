//! Losing the control plane database for good: it is dropped (DROP DATABASE ... WITH
//! (FORCE)) while a run is in progress, so every new connection fails with SQLSTATE 3D000.

mod common;
mod deploy_support;

use std::time::Duration;

use common::child::{self, ChildAgent};
use common::{agents, runs, wait, TestDb};
use deploy_support::{Site, BAD};
use serde_json::json;
use uuid::Uuid;

const BINARY: &str = env!("CARGO_BIN_EXE_odooops-agent");
/// Far longer than either agent needs to give up on the dropped database (about 25 s
/// with the test's 6 s lease), so only a hang reaches it.
const HANG: Duration = Duration::from_secs(90);
const UNFINISHED: &str = "the lease was lost before the run's outcome was stored";

fn admin_url() -> String {
    common::url_for_database(&common::server_url(), "postgres")
}

/// Drops a database, ending every session on it.
async fn drop_database(name: &str) {
    let admin = common::connect(&admin_url()).await;
    admin
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await
        .expect("dropping the control plane database");
}

/// Creates the test's database again under its old name, migrated and seeded.
async fn recreate_database(db: &TestDb) {
    let admin = common::connect(&admin_url()).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {}", db.name))
        .await
        .expect("creating the control plane database again");
    let mut client = db.client().await;
    odooops_agent::migrate::migrate(&mut client)
        .await
        .expect("migrating");
    db.seed_project().await;
}

async fn wait_for_event(db: &TestDb, run: Uuid, text: &str) {
    let client = db.client().await;
    wait::until(&format!("the event {text:?}"), HANG, || {
        let client = &client;
        async move { runs::has_event(client, run, text).await.then_some(()) }
    })
    .await;
}

/// Writes the agent config of the `run --once` test: a short lease, so that the run
/// gives up soon after the database is gone.
fn once_config(site: &Site) -> std::path::PathBuf {
    let work_dir = site.work_dir.path().display();
    let config = format!(
        "[agent]\nworker_id = \"once\"\nwork_dir = \"{work_dir}\"\nlease_secs = 6\n\
         heartbeat_interval_secs = 2\n[database]\nconnect_timeout_secs = 2\n\
         [storage]\nlocal_dir = \"{work_dir}/artifacts\"\n"
    );
    let path = site.work_dir.path().join("agent.toml");
    std::fs::write(&path, config).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_exits_when_database_dropped() {
    let site = Site::new().await;
    // An unhealthy image keeps the deploy in its health gate for 3 s.
    site.configure("env-dev", json!({"health": {"deadline_secs": 3}}))
        .await;
    site.image(BAD, "unhealthy").await;
    let run = site
        .queue("env-dev", BAD, json!({"workflow": "deploy"}))
        .await;
    let log_path = site.work_dir.path().join("agent.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut agent = tokio::process::Command::new(BINARY)
        .args(["run", "--once", "--config"])
        .arg(once_config(&site))
        .env("ODOOOPS_DATABASE_URL", &site.db.url)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("starting odooops-agent");

    wait_for_event(&site.db, run, "Health check of").await;
    drop_database(&site.db.name).await;
    let exited = tokio::time::timeout(HANG, agent.wait()).await;

    let log = std::fs::read_to_string(&log_path).unwrap();
    let status = exited
        .unwrap_or_else(|_| panic!("run --once still running after {HANG:?}:\n{log}"))
        .unwrap();
    assert_eq!(status.code(), Some(1), "{log}");
    let last_line = log.lines().last().unwrap_or_default();
    assert!(
        last_line.contains("claiming a run failed 8 times in a row"),
        "{log}"
    );
    assert!(last_line.contains("SQLSTATE 3D000"), "{log}");
    assert!(last_line.contains(&site.db.name), "{log}");
    assert!(log.contains(UNFINISHED), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_claims_again_after_database_returns() {
    if child::act_as_agent().await {
        return;
    }
    let db = TestDb::new().await;
    db.seed_project().await;
    let dir = tempfile::tempdir().unwrap();
    let release = dir.path().join("release");
    let config = agents::config("daemon", "");
    let mut agent = ChildAgent::spawn(
        "daemon_claims_again_after_database_returns",
        &db.url,
        &config,
        Some(&release),
    );
    let first = runs::queue(&db.client().await, "env-dev", "build").await;
    wait_for_event(&db, first, "working").await;

    drop_database(&db.name).await;
    std::fs::write(&release, "").unwrap();
    wait::until("the run to give up on the database", HANG, || {
        let log = agent.log();
        async move { log.contains(UNFINISHED).then_some(()) }
    })
    .await;
    wait::until("a failed claim after the run gave up", HANG, || {
        let log = agent.log();
        let claimed_after = log
            .find(UNFINISHED)
            .is_some_and(|at| log[at..].contains("claiming a run failed"));
        async move { claimed_after.then_some(()) }
    })
    .await;
    recreate_database(&db).await;
    let client = db.client().await;
    let second = runs::queue(&client, "env-dev", "build").await;
    let finished = wait::until("the second run to succeed", HANG, || {
        let client = &client;
        async move { runs::run_in(client, second, "success").await }
    })
    .await;
    agent.terminate();
    let status = agent.exit_status(Duration::from_secs(30)).await;

    assert_eq!(finished.worker_id.as_deref(), Some("daemon"));
    assert!(status.success(), "{}", agent.log());
    let log = agent.log();
    assert!(log.contains("SQLSTATE 3D000"), "{log}");
    assert!(log.contains("claiming works again"), "{log}");
}
