//! Builds that run more than once, or whose agent dies. A build handed back at shutdown
//! and claimed again stores a second log instead of replacing the first. The test
//! containers and test databases of a killed agent's build are removed, and those of runs
//! still in progress are kept. Real agent, Docker engine, PostgreSQL and registry, as in
//! build_workflow.rs.
//!
//! Needs ODOOOPS_DATABASE_URL, ODOOOPS_TEST_REGISTRY, ODOOOPS_TEST_REGISTRY_USER,
//! ODOOOPS_TEST_REGISTRY_PASSWORD and ODOOOPS_TEST_BUSYBOX (see scripts/services).

mod build_support;
mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{CreateContainerOptions, RemoveContainerOptions};
use bollard::Docker;
use build_support::{containers_labelled, remove_images, unique, Registry, Repo};
use common::agents::{self, RunningAgent};
use common::child::{self, ChildAgent};
use common::{runs, url_for_database, wait, TestDb};
use futures_util::future::BoxFuture;
use odooops_agent::agent::{self, Mode, Shutdown};
use odooops_agent::config::Settings;
use odooops_agent::docker::container::{OutputSink, OutputStream};
use odooops_agent::docker::image::{self, BuildSpec};
use odooops_agent::queue::{claim_tag, ClaimFilter, Queue};
use odooops_agent::workflows::build::{sweep, test_database_name};
use odooops_agent::workflows::Workflows;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
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

    /// Starts an agent in a child process, runs the run's build until its tests sleep,
    /// and kills the agent with SIGKILL. Returns the test containers the build left.
    async fn kill_agent_during_tests(&self, test_name: &str, run_id: Uuid) -> Vec<String> {
        let config = self.config("agent-killed", "");
        let mut child = ChildAgent::spawn_standard(test_name, &self.db.url, &config);
        self.wait_for_tests(run_id).await;
        child.kill();
        containers_labelled(&self.docker, "odooops.run_id", &run_id.to_string()).await
    }

    async fn events(&self, run_id: Uuid) -> String {
        let events = runs::events(&self.db.client().await, run_id).await;
        runs::messages(&events).join("\n")
    }

    /// Removes the local image tags that builds of the test commit create.
    async fn remove_images(&self) {
        let repository = format!("{}/{}", self.registry.address, self.image);
        let tags = [
            format!("{repository}:{}", self.repo.sha),
            format!("{repository}:main-latest"),
        ];
        remove_images(&self.docker, &tags).await;
    }
}

async fn admin() -> Client {
    common::connect(&url_for_database(&common::server_url(), "postgres")).await
}

/// Names of the test databases and roles of a run on the server.
async fn test_databases(admin: &Client, run_id: Uuid) -> Vec<String> {
    let prefix = format!("odooops_build_{}_", run_id.simple());
    admin
        .query(
            "SELECT datname::text FROM pg_database WHERE starts_with(datname, $1)
             UNION ALL SELECT rolname::text FROM pg_roles WHERE starts_with(rolname, $1)",
            &[&prefix],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

async fn container_exists(docker: &Docker, id: &str) -> bool {
    docker
        .inspect_container(
            id,
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await
        .is_ok()
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
async fn killed_build_is_retried_without_leftovers() {
    if child::act_as_agent().await {
        return;
    }
    let site = Site::new("killed").await;
    site.set_test_mode("sleep").await;
    let run_id = site.queue().await;
    let client = site.db.client().await;
    let admin = admin().await;
    let left = site
        .kill_agent_during_tests("killed_build_is_retried_without_leftovers", run_id)
        .await;
    let databases_left = test_databases(&admin, run_id).await;

    // The second agent sweeps at start, while the killed claim's lease still runs, and
    // then not for 12 minutes, so only the retry's own clean-up can remove the leftovers.
    // The test takes the run back itself once the lease expires.
    site.set_test_mode("pass").await;
    let settings = site.settings("agent-b", "reap_interval_secs = 60");
    let second = RunningAgent::start(settings, Workflows::standard());
    wait::until("the lease to expire", LONG, || {
        let client = &client;
        async move {
            let reaped = client
                .query("SELECT run_id FROM ops.reap_expired_runs()", &[])
                .await
                .unwrap();
            reaped
                .iter()
                .any(|row| row.get::<_, Uuid>(0) == run_id)
                .then_some(())
        }
    })
    .await;
    let finished = site.wait_for_status(run_id, "success").await;
    second.stop().await;

    assert_eq!(left.len(), 1, "the killed build left no test container");
    assert_eq!(
        databases_left.len(),
        2,
        "database and role: {databases_left:?}"
    );
    assert_eq!(finished.attempt, 2, "{}", site.events(run_id).await);
    for id in &left {
        assert!(!container_exists(&site.docker, id).await, "{id} was kept");
    }
    let removed = format!("Removed test container odooops-test-{run_id}-1 of an earlier attempt");
    let events = site.events(run_id).await;
    assert!(events.contains(&removed), "{events}");
    let databases = test_databases(&admin, run_id).await;
    assert!(databases.is_empty(), "kept: {databases:?}");
    let logs = site.log_artifacts(run_id).await;
    assert_eq!(logs.len(), 1, "{logs:?}");
    assert!(logs[0].path.contains("/attempt-2-"), "{}", logs[0].path);
    site.remove_images().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_agent_sweeps_failed_build() {
    if child::act_as_agent().await {
        return;
    }
    let site = Site::new("sweep").await;
    site.set_test_mode("sleep").await;
    let run_id = site.queue().await;
    let client = site.db.client().await;
    client
        .execute(
            "UPDATE ops.runs SET max_attempts = 1 WHERE run_id = $1",
            &[&run_id],
        )
        .await
        .unwrap();
    let admin = admin().await;
    let left = site
        .kill_agent_during_tests("restarted_agent_sweeps_failed_build", run_id)
        .await;
    // No agent runs, so the test takes the run back itself once the lease expires.
    wait::until("the lease to expire", LONG, || {
        let client = &client;
        async move {
            client
                .execute("SELECT ops.reap_expired_runs()", &[])
                .await
                .unwrap();
            runs::run_in(client, run_id, "failed").await
        }
    })
    .await;
    let databases_left = test_databases(&admin, run_id).await;
    let mut kept_until_restart = Vec::new();
    for id in &left {
        kept_until_restart.push(container_exists(&site.docker, id).await);
    }

    let restarted = RunningAgent::start(site.settings("agent-b", ""), Workflows::standard());
    wait::until("the leftovers to be removed", LONG, || {
        let (site, admin, left) = (&site, &admin, &left);
        async move {
            for id in left {
                if container_exists(&site.docker, id).await {
                    return None;
                }
            }
            test_databases(admin, run_id).await.is_empty().then_some(())
        }
    })
    .await;
    restarted.stop().await;
    site.remove_images().await;

    assert_eq!(left.len(), 1, "the killed build left no test container");
    assert_eq!(kept_until_restart, [true], "removed before any agent ran");
    assert_eq!(
        databases_left.len(),
        2,
        "database and role: {databases_left:?}"
    );
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
    site.remove_images().await;
}

/// Claims the oldest queued run as an agent that then goes away. Returns the run id and
/// the lease token.
async fn claim_next(client: &Client) -> (Uuid, Uuid) {
    let claimed = client
        .query_one(
            "SELECT run_id, lease_token FROM ops.claim_next_run('agent-gone', NULL, NULL, 600)",
            &[],
        )
        .await
        .unwrap();
    (claimed.get(0), claimed.get(1))
}

/// Queues a build and claims it like [`claim_next`]. No other run may be queued.
async fn claim_build(client: &Client) -> (Uuid, Uuid) {
    let run_id = runs::queue(client, "env-dev", "build").await;
    let (claimed, token) = claim_next(client).await;
    assert_eq!(claimed, run_id, "claimed another run");
    (run_id, token)
}

/// Drops every line of output.
struct Quiet;

impl OutputSink for Quiet {
    fn line<'a>(&'a mut self, _stream: OutputStream, _line: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

/// Builds an image holding only busybox and returns its reference.
async fn busybox_image(docker: &Docker) -> String {
    let context = tempfile::tempdir().unwrap();
    std::fs::write(
        context.path().join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/\n",
    )
    .unwrap();
    std::fs::copy(build_support::busybox(), context.path().join("busybox")).unwrap();
    let reference = format!("odooops-wtsweep/{}:test", unique("decoy"));
    let spec = BuildSpec {
        context_dir: context.path().to_path_buf(),
        dockerfile: "Dockerfile".into(),
        tag: reference.clone(),
        labels: HashMap::new(),
        pull: false,
        timeout: Duration::from_secs(120),
    };
    image::build(docker, &spec, &mut Quiet, &CancellationToken::new())
        .await
        .expect("building the busybox image");
    reference
}

/// Creates a container that is never started, with `labels`, and returns its id.
async fn create_container(docker: &Docker, image: &str, labels: &[(&str, String)]) -> String {
    let body = ContainerCreateBody {
        image: Some(image.to_string()),
        cmd: Some(vec!["/bin/busybox".into(), "true".into()]),
        labels: Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        ),
        ..Default::default()
    };
    let options = CreateContainerOptions {
        name: Some(unique("odooops-wtsweep")),
        ..Default::default()
    };
    docker
        .create_container(Some(options), body)
        .await
        .expect("creating a container")
        .id
}

/// Labels of a test container of the claim with tag `claim` (none: no claim label).
fn test_labels(run_id: Uuid, claim: Option<String>) -> Vec<(&'static str, String)> {
    let mut labels = vec![
        ("odooops.role", "build-test".to_string()),
        ("odooops.run_id", run_id.to_string()),
    ];
    labels.extend(claim.map(|tag| ("odooops.claim", tag)));
    labels
}

async fn name_exists(admin: &Client, name: &str) -> bool {
    !admin
        .query(
            "SELECT 1 FROM pg_database WHERE datname = $1
             UNION ALL SELECT 1 FROM pg_roles WHERE rolname = $1",
            &[&name],
        )
        .await
        .unwrap()
        .is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_keeps_live_and_foreign_resources() {
    let site = Site::new("decoys").await;
    let client = site.db.client().await;
    let admin = admin().await;
    let image = busybox_image(&site.docker).await;

    let (stopped, stopped_token) = claim_build(&client).await;
    client
        .execute(
            "SELECT 1 FROM ops.finish_run($1, 'failed', '{}', $2)",
            &[&stopped, &stopped_token],
        )
        .await
        .unwrap();
    let (live, live_token) = claim_build(&client).await;
    let (moved_on, earlier_token) = claim_build(&client).await;
    client
        .execute(
            "SELECT ops.release_run($1, $2, 'test')",
            &[&moved_on, &earlier_token],
        )
        .await
        .unwrap();
    let (claimed_again, current_token) = claim_next(&client).await;
    assert_eq!(claimed_again, moved_on, "claimed another run");
    let foreign = Uuid::new_v4();
    let tag = claim_tag;

    // (what, container id, whether the sweep removes it)
    let docker = &site.docker;
    let containers = [
        (
            "stopped run",
            test_labels(stopped, Some(tag(stopped_token))),
            true,
        ),
        (
            "live claim",
            test_labels(live, Some(tag(live_token))),
            false,
        ),
        ("live run, no claim label", test_labels(live, None), false),
        (
            "earlier claim",
            test_labels(moved_on, Some(tag(earlier_token))),
            true,
        ),
        (
            "current claim",
            test_labels(moved_on, Some(tag(current_token))),
            false,
        ),
        (
            "foreign run",
            test_labels(foreign, Some(tag(Uuid::new_v4()))),
            false,
        ),
        (
            "no role label",
            test_labels(stopped, None)[1..].to_vec(),
            false,
        ),
    ];
    let mut created = Vec::new();
    for (what, labels, removed) in containers {
        created.push((
            what,
            create_container(docker, &image, &labels).await,
            removed,
        ));
    }
    // (name, whether it is a database or only a role, whether the sweep drops it)
    let names = [
        (test_database_name(stopped, &tag(stopped_token)), true, true),
        (test_database_name(live, &tag(live_token)), true, false),
        (
            test_database_name(moved_on, &tag(earlier_token)),
            false,
            true,
        ),
        (
            test_database_name(moved_on, &tag(current_token)),
            false,
            false,
        ),
        (
            test_database_name(foreign, &tag(Uuid::new_v4())),
            false,
            false,
        ),
        (
            format!(
                "odooops_build_{}",
                &Uuid::new_v4().simple().to_string()[..12]
            ),
            false,
            false,
        ),
    ];
    for (name, database, _) in &names {
        admin
            .batch_execute(&format!("CREATE ROLE {name}"))
            .await
            .unwrap();
        if *database {
            let statement = format!("CREATE DATABASE {name} OWNER {name}");
            admin.batch_execute(&statement).await.unwrap();
        }
    }

    let settings = site.settings("agent-sweep", "");
    let pool = odooops_agent::db::pool(&settings.database).unwrap();
    let queue = Queue::new(
        pool,
        ClaimFilter {
            worker_id: "agent-sweep".into(),
            env_ids: None,
            workflows: None,
            lease: Duration::from_secs(30),
        },
    );
    let swept = sweep::sweep(&settings, &queue, Some(docker)).await;

    let mut container_outcomes = Vec::new();
    for (what, id, removed) in &created {
        container_outcomes.push((*what, container_exists(docker, id).await, *removed));
        let _ = docker
            .remove_container(
                id,
                Some(RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await;
    }
    let mut name_outcomes = Vec::new();
    for (name, _, dropped) in &names {
        name_outcomes.push((name.clone(), name_exists(&admin, name).await, *dropped));
        let drop_database = format!("DROP DATABASE IF EXISTS {name}");
        admin.batch_execute(&drop_database).await.unwrap();
        let drop_role = format!("DROP ROLE IF EXISTS {name}");
        admin.batch_execute(&drop_role).await.unwrap();
    }
    remove_images(docker, &[image]).await;

    let swept = swept.expect("the sweep runs");
    assert_eq!(swept.containers, 2, "{container_outcomes:?}");
    assert_eq!(swept.databases, 2, "{name_outcomes:?}");
    for (what, exists, removed) in container_outcomes {
        assert_eq!(exists, !removed, "container of {what}: exists = {exists}");
    }
    for (name, exists, dropped) in name_outcomes {
        assert_eq!(exists, !dropped, "{name}: exists = {exists}");
    }
}
