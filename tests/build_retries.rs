//! Builds that run more than once: a build handed back at shutdown and claimed again
//! stores a second log instead of replacing the first. Real agent, Docker engine,
//! PostgreSQL and registry, as in build_workflow.rs.
//!
//! Needs ODOOOPS_DATABASE_URL, ODOOOPS_TEST_REGISTRY, ODOOOPS_TEST_REGISTRY_USER,
//! ODOOOPS_TEST_REGISTRY_PASSWORD and ODOOOPS_TEST_BUSYBOX (see scripts/services).

mod build_support;
mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bollard::Docker;
use build_support::{containers_labelled, remove_images, unique, Registry, Repo};
use common::agents::{self, RunningAgent};
use common::{runs, url_for_database, wait, TestDb};
use odooops_agent::agent::{self, Mode, Shutdown};
use odooops_agent::config::Settings;
use odooops_agent::workflows::Workflows;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

const LONG: Duration = Duration::from_secs(90);

/// A project whose builds run the stand-in odoo from build_support, with its database,
/// artifact directory and registry repository.
struct Site {
    db: TestDb,
    tmp: tempfile::TempDir,
    registry: Registry,
    docker: Docker,
    repo: Repo,
    /// Image repository path on the registry, such as `wtretry/handback-1a2b3c4d`.
    image: String,
}

/// One 'logs' artifact row.
#[derive(Debug)]
struct LogArtifact {
    path: String,
    digest: String,
}

impl Site {
    async fn new(name: &str) -> Site {
        let db = TestDb::new().await;
        db.seed_project().await;
        let site = Site {
            db,
            tmp: tempfile::tempdir().unwrap(),
            registry: Registry::from_env(),
            docker: build_support::docker().await,
            repo: Repo::create(&[]),
            image: format!("wtretry/{}", unique(name)),
        };
        runs::no_retry_delay(&site.db.client().await).await;
        site
    }

    /// Agent settings with short leases, serving builds only. `agent_keys` (TOML lines)
    /// add to or replace keys of the [agent] table.
    fn settings(&self, worker_id: &str, agent_keys: &str) -> Arc<Settings> {
        agents::settings(&self.db.url, &self.config(worker_id, agent_keys))
    }

    fn config(&self, worker_id: &str, agent_keys: &str) -> String {
        let work_dir = self.tmp.path().join("work").display().to_string();
        let agent = format!("work_dir = {work_dir:?}\nworkflows = [\"build\"]\n{agent_keys}");
        let mut config = agents::config(worker_id, &agent);
        let admin_url = url_for_database(&common::server_url(), "postgres");
        config.push_str(&format!(
            "[storage]\nlocal_dir = {artifacts:?}\n\
             [registry]\nurl = {registry:?}\nusername = {user:?}\npassword = {password:?}\n\
             [build]\ntest_network = \"host\"\ntest_timeout_secs = 120\n\
             [build.test_database]\nadmin_url = {admin_url:?}\n",
            artifacts = self.tmp.path().join("artifacts").display().to_string(),
            registry = self.registry.address,
            user = self.registry.user,
            password = self.registry.password,
        ));
        config
    }

    /// Points the project at the test repository, with the stand-in odoo in `mode`.
    async fn set_test_mode(&self, mode: &str) {
        let config = json!({ "build": { "test_env": { "TEST_MODE": mode } } });
        self.db
            .client()
            .await
            .execute(
                "UPDATE ops.projects SET repo_url = $1, image = $2, config = $3
                  WHERE project_id = 'proj'",
                &[&self.repo.url(), &self.image, &config],
            )
            .await
            .unwrap();
    }

    async fn queue(&self) -> Uuid {
        self.db
            .client()
            .await
            .query_one(
                "SELECT run_id FROM ops.queue_run('proj', 'env-dev', $1, 'main')",
                &[&self.repo.sha],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Waits until the run's tests are running, in the stand-in's "sleep" mode.
    async fn wait_for_tests(&self, run_id: Uuid) {
        let client = self.db.client().await;
        wait::until("the tests to start sleeping", LONG, || {
            let client = &client;
            async move {
                runs::has_event(client, run_id, "odoo.tests: sleeping")
                    .await
                    .then_some(())
            }
        })
        .await;
    }

    async fn wait_for_status(&self, run_id: Uuid, status: &str) -> runs::RunRow {
        let client = self.db.client().await;
        wait::until(&format!("run {run_id} to be {status}"), LONG, || {
            let client = &client;
            async move { runs::run_in(client, run_id, status).await }
        })
        .await
    }

    async fn log_artifacts(&self, run_id: Uuid) -> Vec<LogArtifact> {
        self.db
            .client()
            .await
            .query(
                "SELECT storage_path, digest FROM ops.artifacts
                  WHERE run_id = $1 AND artifact_type = 'logs' ORDER BY created_at",
                &[&run_id],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| LogArtifact {
                path: row.get(0),
                digest: row.get(1),
            })
            .collect()
    }

    async fn events(&self, run_id: Uuid) -> String {
        let events = runs::events(&self.db.client().await, run_id).await;
        runs::messages(&events).join("\n")
    }

    /// Removes the local image tags a successful run created.
    async fn remove_images(&self, metadata: &Value) {
        let tags: Vec<String> = metadata["image_tags"]
            .as_array()
            .map(|tags| {
                tags.iter()
                    .filter_map(|tag| tag.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        remove_images(&self.docker, &tags).await;
    }
}

fn file_of(location: &str) -> PathBuf {
    PathBuf::from(location.strip_prefix("file://").expect("a local artifact"))
}

fn sha256_of(path: &PathBuf) -> String {
    let bytes = std::fs::read(path).unwrap();
    format!("sha256:{}", hex::encode(Sha256::digest(&bytes)))
}

fn gunzip(path: &PathBuf) -> String {
    use std::io::Read;
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handed_back_build_keeps_first_log() {
    let site = Site::new("handback").await;
    site.set_test_mode("sleep").await;
    let run_id = site.queue().await;
    let first = RunningAgent::start(
        site.settings("agent-a", "shutdown_grace_secs = 0"),
        Workflows::standard(),
    );
    site.wait_for_tests(run_id).await;
    first.stop().await;
    let handed_back = runs::run(&site.db.client().await, run_id).await;
    let first_logs = site.log_artifacts(run_id).await;

    site.set_test_mode("pass").await;
    let settings = site.settings("agent-b", "");
    agent::run(
        settings,
        Workflows::standard(),
        Mode::Once,
        Shutdown::default(),
    )
    .await
    .expect("the second agent runs");
    let finished = site.wait_for_status(run_id, "success").await;
    let logs = site.log_artifacts(run_id).await;

    assert_eq!(
        handed_back.status,
        "queued",
        "{}",
        site.events(run_id).await
    );
    assert_eq!(handed_back.attempt, 0, "a hand-back gives the attempt back");
    assert_eq!(first_logs.len(), 1, "{first_logs:?}");
    assert_eq!(finished.attempt, 1);
    assert_eq!(logs.len(), 2, "{logs:?}");
    assert_ne!(
        logs[0].path, logs[1].path,
        "the second claim replaced the log"
    );
    for log in &logs {
        let prefix = format!("/{run_id}/attempt-1-");
        assert!(log.path.contains(&prefix), "{} lacks {prefix}", log.path);
        assert_eq!(sha256_of(&file_of(&log.path)), log.digest, "{}", log.path);
    }
    let first_text = gunzip(&file_of(&logs[0].path));
    let second_text = gunzip(&file_of(&logs[1].path));
    assert!(first_text.contains("odoo.tests: sleeping"), "{first_text}");
    assert!(
        second_text.contains("0 failed, 0 error(s)"),
        "{second_text}"
    );
    let containers = containers_labelled(&site.docker, "odooops.run_id", &run_id.to_string()).await;
    assert!(containers.is_empty(), "containers left: {containers:?}");
    site.remove_images(&finished.metadata).await;
}
