//! The build workflow end to end. The real agent claims a build run from a fresh
//! database and fetches a local git repository. It builds through the real Docker engine,
//! runs the tests against a throwaway database on the real PostgreSQL server, and pushes
//! to a real registry with htpasswd auth.
//!
//! Needs ODOOOPS_DATABASE_URL, ODOOOPS_TEST_REGISTRY, ODOOOPS_TEST_REGISTRY_USER,
//! ODOOOPS_TEST_REGISTRY_PASSWORD and ODOOOPS_TEST_BUSYBOX (see scripts/services).

mod build_support;
mod common;

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use bollard::Docker;
use build_support::{containers_labelled, image_exists, remove_images, unique, Registry, Repo};
use common::{url_for_database, TestDb};
use odooops_agent::agent::{self, Mode, Shutdown};
use odooops_agent::config::Settings;
use odooops_agent::workflows::Workflows;
use serde_json::{json, Value};
use uuid::Uuid;

struct Harness {
    db: TestDb,
    tmp: tempfile::TempDir,
    registry: Registry,
    docker: Docker,
    /// Image repository path on the registry, such as `wtbuild/ok-1a2b3c4d`.
    image: String,
}

struct Outcome {
    run_id: Uuid,
    status: String,
    metadata: Value,
    events: Vec<(String, String)>,
}

impl Outcome {
    fn error(&self) -> &str {
        self.metadata["error"].as_str().unwrap_or("")
    }

    fn has_event(&self, needle: &str) -> bool {
        self.events
            .iter()
            .any(|(_, message)| message.contains(needle))
    }

    fn all_events(&self) -> String {
        let lines: Vec<String> = self
            .events
            .iter()
            .map(|(level, message)| format!("{level}: {message}"))
            .collect();
        lines.join("\n")
    }
}

impl Harness {
    async fn new(name: &str) -> Harness {
        let registry = Registry::from_env();
        let db = TestDb::new().await;
        db.seed_project().await;
        Harness {
            db,
            tmp: tempfile::tempdir().unwrap(),
            registry,
            docker: build_support::docker().await,
            image: format!("wtbuild/{}", unique(name)),
        }
    }

    fn work_dir(&self) -> PathBuf {
        self.tmp.path().join("work")
    }

    fn artifact_dir(&self) -> PathBuf {
        self.tmp.path().join("artifacts")
    }

    /// Builds agent settings. `password` replaces the registry password, and `extra` is
    /// appended to the TOML.
    fn settings(&self, password: Option<&str>, extra: &str) -> Arc<Settings> {
        let admin_url = url_for_database(&common::server_url(), "postgres");
        self.db.settings(&format!(
            "[agent]\nwork_dir = {work:?}\nworkflows = [\"build\"]\n\
             [storage]\nlocal_dir = {artifacts:?}\n\
             [registry]\nurl = {registry:?}\nusername = {user:?}\npassword = {password:?}\n\
             [build]\ntest_network = \"host\"\ntest_timeout_secs = 60\n\
             [build.test_database]\nadmin_url = {admin_url:?}\n{extra}",
            work = self.work_dir().display().to_string(),
            artifacts = self.artifact_dir().display().to_string(),
            registry = self.registry.address,
            user = self.registry.user,
            password = password.unwrap_or(&self.registry.password),
        ))
    }

    async fn configure_project(&self, repo_url: &str, build_config: Value) {
        self.db
            .client()
            .await
            .execute(
                "UPDATE ops.projects SET repo_url = $1, image = $2, config = $3
                  WHERE project_id = 'proj'",
                &[&repo_url, &self.image, &json!({ "build": build_config })],
            )
            .await
            .unwrap();
    }

    async fn queue(&self, sha: &str, git_ref: &str) -> Uuid {
        let row = self
            .db
            .client()
            .await
            .query_one(
                "SELECT run_id FROM ops.queue_run('proj', 'env-dev', $1, $2)",
                &[&sha, &git_ref],
            )
            .await
            .unwrap();
        row.get(0)
    }

    async fn run_agent(&self, settings: Arc<Settings>) {
        agent::run(
            settings,
            Workflows::standard(),
            Mode::Once,
            Shutdown::default(),
        )
        .await
        .expect("the agent runs");
    }

    /// Queues a build, runs the agent until the queue is empty and reads the outcome.
    async fn build(&self, settings: Arc<Settings>, sha: &str, git_ref: &str) -> Outcome {
        let run_id = self.queue(sha, git_ref).await;
        self.run_agent(settings).await;
        self.outcome(run_id).await
    }

    async fn outcome(&self, run_id: Uuid) -> Outcome {
        let client = self.db.client().await;
        let row = client
            .query_one(
                "SELECT status, metadata FROM ops.runs WHERE run_id = $1",
                &[&run_id],
            )
            .await
            .unwrap();
        let events = client
            .query(
                "SELECT level, message FROM ops.run_events WHERE run_id = $1 ORDER BY seq",
                &[&run_id],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        Outcome {
            run_id,
            status: row.get(0),
            metadata: row.get(1),
            events,
        }
    }

    async fn artifacts(
        &self,
        run_id: Uuid,
    ) -> Vec<(String, String, Option<String>, Option<i64>, Value)> {
        self.db
            .client()
            .await
            .query(
                "SELECT artifact_type, storage_path, digest, size_bytes, metadata
                   FROM ops.artifacts WHERE run_id = $1 ORDER BY artifact_type",
                &[&run_id],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4)))
            .collect()
    }

    fn repository(&self) -> String {
        format!("{}/{}", self.registry.address, self.image)
    }

    /// Checks that the run left no container, workspace or test database behind.
    async fn assert_nothing_left(&self, outcome: &Outcome) {
        let run_id = outcome.run_id.to_string();
        let containers = containers_labelled(&self.docker, "odooops.run_id", &run_id).await;
        assert!(containers.is_empty(), "containers left: {containers:?}");
        let workspace = self.work_dir().join(&run_id);
        assert!(
            !workspace.exists(),
            "workspace left: {}",
            workspace.display()
        );

        let admin = common::connect(&url_for_database(&common::server_url(), "postgres")).await;
        for (_, message) in &outcome.events {
            let Some(rest) = message.strip_prefix("Created test database ") else {
                continue;
            };
            let name = rest.split_whitespace().next().unwrap();
            let found = admin
                .query("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
                .await
                .unwrap();
            assert!(found.is_empty(), "test database {name} left behind");
            let role = admin
                .query("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name])
                .await
                .unwrap();
            assert!(role.is_empty(), "test role {name} left behind");
        }
    }

    async fn cleanup(&self, outcome: &Outcome) {
        let mut refs = Vec::new();
        if let Some(tags) = outcome.metadata["image_tags"].as_array() {
            refs.extend(tags.iter().filter_map(|t| t.as_str().map(str::to_string)));
        }
        remove_images(&self.docker, &refs).await;
    }
}

fn read_gzip(path: &str) -> String {
    let file = std::fs::File::open(path.strip_prefix("file://").unwrap()).unwrap();
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .unwrap();
    text
}

#[tokio::test]
async fn build_tests_and_pushes_both_tags() {
    let harness = Harness::new("ok").await;
    let repo = Repo::create(&[]);
    harness
        .configure_project(&repo.url(), json!({ "test_env": { "TEST_LINES": "5" } }))
        .await;

    let settings = harness.settings(None, "");
    let outcome = harness
        .build(settings, &repo.sha, "refs/heads/Feature/Login-Page")
        .await;
    assert_eq!(outcome.status, "success", "{}", outcome.all_events());

    let repository = harness.repository();
    let image = format!("{repository}:{}", repo.sha);
    assert_eq!(outcome.metadata["image"], image);
    let digest = outcome.metadata["digest"].as_str().unwrap().to_string();
    assert!(digest.starts_with("sha256:"), "{digest}");

    let tags = harness.registry.tags(&harness.image).await;
    assert!(tags.contains(&repo.sha), "{tags:?}");
    assert!(
        tags.contains(&"feature-login-page-latest".to_string()),
        "{tags:?}"
    );
    let served = harness
        .registry
        .manifest_digest(&harness.image, &repo.sha)
        .await;
    assert_eq!(served.as_deref(), Some(digest.as_str()));

    let artifacts = harness.artifacts(outcome.run_id).await;
    assert_eq!(artifacts.len(), 2, "{artifacts:?}");
    let (kind, path, image_digest, size, metadata) = &artifacts[0];
    assert_eq!(kind, "image");
    assert_eq!(path, &image);
    assert_eq!(image_digest.as_deref(), Some(digest.as_str()));
    assert!(size.unwrap() > 0);
    assert!(metadata["layers"].as_u64().unwrap() >= 1, "{metadata}");
    assert!(
        metadata["build_time_seconds"].as_f64().is_some(),
        "{metadata}"
    );

    let (kind, path, log_digest, _, _) = &artifacts[1];
    assert_eq!(kind, "logs");
    assert!(path.starts_with("file://"), "{path}");
    assert!(log_digest.as_deref().unwrap().starts_with("sha256:"));
    assert_eq!(outcome.metadata["logs"], path.as_str());
    let log = read_gzip(path);
    assert!(log.contains(" : FROM scratch"), "{log}");
    assert!(log.contains("Starting test_000005"), "{log}");
    assert!(log.contains(&format!("Pushing {image}")), "{log}");

    assert!(outcome.has_event("Step 1/"), "{}", outcome.all_events());
    assert!(outcome.has_event("Starting test_000005"));
    assert!(
        outcome.has_event("database odooops_build_"),
        "{}",
        outcome.all_events()
    );
    assert!(
        outcome.has_event("--db_password ***"),
        "{}",
        outcome.all_events()
    );
    assert!(!outcome.has_event(&harness.registry.password));
    assert!(!log.contains(&harness.registry.password));

    harness.assert_nothing_left(&outcome).await;
    harness.cleanup(&outcome).await;
}

#[tokio::test]
async fn failing_build_step_removes_intermediate_images() {
    let harness = Harness::new("badbuild").await;
    let dockerfile =
        "FROM scratch\nCOPY unique.txt /\nCOPY bin /bin\nRUN [\"/bin/busybox\", \"false\"]\n";
    let marker = Uuid::new_v4().to_string();
    let repo = Repo::create(&[("Dockerfile", dockerfile), ("unique.txt", &marker)]);
    harness.configure_project(&repo.url(), json!({})).await;

    let outcome = harness
        .build(harness.settings(None, ""), &repo.sha, "main")
        .await;
    assert_eq!(outcome.status, "failed");
    assert_eq!(
        outcome.metadata["failed_step"],
        "build",
        "{}",
        outcome.all_events()
    );
    assert!(
        outcome.error().contains("non-zero code"),
        "{}",
        outcome.error()
    );

    let intermediates: Vec<&str> = outcome
        .events
        .iter()
        .filter_map(|(_, message)| message.trim().strip_prefix("---> "))
        .filter(|id| id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect();
    assert!(!intermediates.is_empty(), "{}", outcome.all_events());
    for id in intermediates {
        assert!(
            !image_exists(&harness.docker, id).await,
            "intermediate {id} left"
        );
    }
    let reference = format!("{}:{}", harness.repository(), repo.sha);
    assert!(!image_exists(&harness.docker, &reference).await);
    assert!(harness.registry.tags(&harness.image).await.is_empty());
    harness.assert_nothing_left(&outcome).await;
}

#[tokio::test]
async fn error_line_fails_tests_that_exit_zero() {
    let harness = Harness::new("errline").await;
    let repo = Repo::create(&[]);
    let config = json!({ "test_env": { "TEST_MODE": "error_line" } });
    harness.configure_project(&repo.url(), config).await;

    let outcome = harness
        .build(harness.settings(None, ""), &repo.sha, "main")
        .await;
    assert_eq!(outcome.status, "failed");
    assert_eq!(
        outcome.metadata["failed_step"],
        "test",
        "{}",
        outcome.all_events()
    );
    assert!(
        outcome.error().contains("exited with code 0"),
        "{}",
        outcome.error()
    );
    assert!(
        outcome.error().contains("FAIL: TestSample.test_marker"),
        "{}",
        outcome.error()
    );
    assert_eq!(outcome.metadata["test_failure_lines"], 1);

    assert!(harness.registry.tags(&harness.image).await.is_empty());
    let reference = format!("{}:{}", harness.repository(), repo.sha);
    assert!(
        !image_exists(&harness.docker, &reference).await,
        "failed image kept"
    );
    let artifacts = harness.artifacts(outcome.run_id).await;
    let kinds: Vec<&str> = artifacts.iter().map(|a| a.0.as_str()).collect();
    assert_eq!(kinds, ["logs"]);
    harness.assert_nothing_left(&outcome).await;
}

#[tokio::test]
async fn nonzero_test_exit_code_fails_the_run() {
    let harness = Harness::new("exitcode").await;
    let repo = Repo::create(&[]);
    let config = json!({ "test_env": { "TEST_MODE": "exit_code" } });
    harness.configure_project(&repo.url(), config).await;

    let outcome = harness
        .build(harness.settings(None, ""), &repo.sha, "main")
        .await;
    assert_eq!(outcome.status, "failed");
    assert_eq!(outcome.metadata["failed_step"], "test");
    assert!(
        outcome.error().contains("exited with code 4"),
        "{}",
        outcome.error()
    );
    harness.assert_nothing_left(&outcome).await;
}

#[tokio::test]
async fn test_timeout_kills_and_removes_the_container() {
    let harness = Harness::new("timeout").await;
    let repo = Repo::create(&[]);
    let config = json!({ "test_env": { "TEST_MODE": "sleep" }, "test_timeout_secs": 2 });
    harness.configure_project(&repo.url(), config).await;

    let started = std::time::Instant::now();
    let outcome = harness
        .build(harness.settings(None, ""), &repo.sha, "main")
        .await;
    assert_eq!(outcome.status, "failed");
    assert_eq!(outcome.metadata["failed_step"], "test");
    assert!(
        outcome.error().contains("within 2 s"),
        "{}",
        outcome.error()
    );
    assert!(started.elapsed().as_secs() < 60);
    harness.assert_nothing_left(&outcome).await;
}

#[tokio::test]
async fn unknown_or_malformed_sha_fails_before_building() {
    let harness = Harness::new("badsha").await;
    let repo = Repo::create(&[]);
    harness.configure_project(&repo.url(), json!({})).await;

    let missing = harness
        .queue("0123456789abcdef0123456789abcdef01234567", "main")
        .await;
    let malformed = harness.queue("--upload-pack=touch", "main").await;
    harness.run_agent(harness.settings(None, "")).await;

    let outcome = harness.outcome(missing).await;
    assert_eq!(outcome.status, "failed");
    assert_eq!(
        outcome.metadata["failed_step"],
        "fetch",
        "{}",
        outcome.all_events()
    );
    assert!(
        outcome.error().contains("was not found"),
        "{}",
        outcome.error()
    );
    harness.assert_nothing_left(&outcome).await;

    let outcome = harness.outcome(malformed).await;
    assert_eq!(outcome.status, "failed");
    assert_eq!(outcome.metadata["failed_step"], "validate");
    assert!(
        outcome.error().contains("invalid git sha"),
        "{}",
        outcome.error()
    );
}

#[tokio::test]
async fn wrong_registry_password_fails_push() {
    let harness = Harness::new("badpw").await;
    let repo = Repo::create(&[]);
    harness.configure_project(&repo.url(), json!({})).await;
    let wrong = format!("wrong-{}", Uuid::new_v4().simple());

    let outcome = harness
        .build(harness.settings(Some(&wrong), ""), &repo.sha, "main")
        .await;
    assert_eq!(outcome.status, "failed");
    assert_eq!(
        outcome.metadata["failed_step"],
        "push",
        "{}",
        outcome.all_events()
    );
    assert!(outcome.error().contains("pushing"), "{}", outcome.error());
    assert!(!outcome.metadata.to_string().contains(&wrong));
    assert!(!outcome.all_events().contains(&wrong));
    let artifacts = harness.artifacts(outcome.run_id).await;
    let log = read_gzip(&artifacts[0].1);
    assert!(!log.contains(&wrong));
    let reference = format!("{}:{}", harness.repository(), repo.sha);
    assert!(
        !image_exists(&harness.docker, &reference).await,
        "unpushed image kept"
    );
    harness.assert_nothing_left(&outcome).await;
}

#[tokio::test]
async fn dockerignore_keeps_excluded_files_out_of_the_image() {
    let harness = Harness::new("ignore").await;
    let repo = Repo::create(&[
        (
            ".dockerignore",
            "secret.txt\nnotes\n!notes/keep.txt\n*.log\n",
        ),
        ("secret.txt", "root secret"),
        (
            "sub/secret.txt",
            "not matched: patterns are anchored at the root",
        ),
        ("notes/keep.txt", "kept by an exception"),
        ("notes/drop.txt", "excluded with its directory"),
        ("build.log", "excluded by *.log"),
    ]);
    let config = json!({ "test_env": { "TEST_MODE": "check_context" } });
    harness.configure_project(&repo.url(), config).await;

    let outcome = harness
        .build(harness.settings(None, ""), &repo.sha, "main")
        .await;
    assert_eq!(outcome.status, "success", "{}", outcome.all_events());
    assert!(outcome.has_event("context checked"));
    assert!(
        outcome.has_event("(3 excluded)"),
        "{}",
        outcome.all_events()
    );
    harness.assert_nothing_left(&outcome).await;
    harness.cleanup(&outcome).await;
}

#[tokio::test]
async fn unreachable_engine_leaves_build_queued() {
    let harness = Harness::new("noengine").await;
    let repo = Repo::create(&[]);
    harness.configure_project(&repo.url(), json!({})).await;
    let socket = harness.tmp.path().join("missing.sock");
    let extra = format!("[docker]\nhost = \"unix://{}\"\n", socket.display());

    let outcome = harness
        .build(harness.settings(None, &extra), &repo.sha, "main")
        .await;
    assert_eq!(outcome.status, "queued", "{}", outcome.all_events());
    assert!(
        !outcome.has_event("Run claimed"),
        "{}",
        outcome.all_events()
    );
    harness.assert_nothing_left(&outcome).await;
}

#[tokio::test]
async fn context_symlink_leaving_the_repository_fails() {
    let harness = Harness::new("ctxlink").await;
    let repo = Repo::create(&[]);
    let root = repo.dir.path();
    std::os::unix::fs::symlink("/etc", root.join("ctx")).unwrap();
    build_support::git(root, &["add", "ctx"]);
    build_support::git(
        root,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t.invalid",
            "commit",
            "-qm",
            "link",
        ],
    );
    let sha = build_support::git(root, &["rev-parse", "HEAD"])
        .trim()
        .to_string();
    harness
        .configure_project(&repo.url(), json!({ "context": "ctx" }))
        .await;

    let outcome = harness
        .build(harness.settings(None, ""), &sha, "main")
        .await;
    assert_eq!(outcome.status, "failed");
    assert_eq!(
        outcome.metadata["failed_step"],
        "build",
        "{}",
        outcome.all_events()
    );
    assert!(
        outcome.error().contains("inside the repository"),
        "{}",
        outcome.error()
    );
    harness.assert_nothing_left(&outcome).await;
}

/// Creates the sample Odoo-like project's git repository in a new directory, with the
/// script the demo uses, and returns the directory and the commit sha.
fn sample_repo() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("repo");
    let script = common::repo_root().join("scripts/lib/sample-project.sh");
    let output = std::process::Command::new("bash")
        .arg(&script)
        .arg("make_sample_repo")
        .arg(&target)
        .output()
        .expect("running scripts/lib/sample-project.sh");
    assert!(
        output.status.success(),
        "make_sample_repo failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let sha = String::from_utf8_lossy(&output.stdout).trim().to_string();
    (dir, sha)
}

#[tokio::test]
async fn sample_project_builds_tests_and_pushes() {
    let harness = Harness::new("sample").await;
    let (dir, sha) = sample_repo();
    let url = dir.path().join("repo").display().to_string();
    harness.configure_project(&url, json!({})).await;

    let outcome = harness
        .build(harness.settings(None, ""), &sha, "refs/heads/main")
        .await;
    assert_eq!(outcome.status, "success", "{}", outcome.all_events());
    assert!(outcome.has_event("0 failed, 0 error(s) of 20 tests"));
    let tags = harness.registry.tags(&harness.image).await;
    assert!(tags.contains(&sha), "{tags:?}");
    assert!(tags.contains(&"main-latest".to_string()), "{tags:?}");
    harness.assert_nothing_left(&outcome).await;
    harness.cleanup(&outcome).await;
}

#[tokio::test]
async fn sample_project_failing_test_fails_the_run() {
    let harness = Harness::new("samplefail").await;
    let (dir, _) = sample_repo();
    let root = dir.path().join("repo");
    std::fs::write(root.join("fail_tests"), "one test fails\n").unwrap();
    build_support::git(&root, &["add", "fail_tests"]);
    build_support::git(
        &root,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t.invalid",
            "commit",
            "-qm",
            "fail",
        ],
    );
    let sha = build_support::git(&root, &["rev-parse", "HEAD"])
        .trim()
        .to_string();
    harness
        .configure_project(&root.display().to_string(), json!({}))
        .await;

    let outcome = harness
        .build(harness.settings(None, ""), &sha, "main")
        .await;
    assert_eq!(outcome.status, "failed");
    assert_eq!(
        outcome.metadata["failed_step"],
        "test",
        "{}",
        outcome.all_events()
    );
    assert_eq!(outcome.metadata["test_exit_code"], 0);
    assert!(
        outcome.error().contains("FAIL: TestSample"),
        "{}",
        outcome.error()
    );
    assert!(harness.registry.tags(&harness.image).await.is_empty());
    harness.assert_nothing_left(&outcome).await;
}
