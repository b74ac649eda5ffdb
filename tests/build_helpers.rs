//! The helpers under the build workflow, against the real Docker engine and git: one-off
//! containers (output, exit codes, timeouts, cancellation, guaranteed removal) and
//! fetching commits.
//!
//! Needs the Docker engine and ODOOOPS_TEST_BUSYBOX (see scripts/services).

mod build_support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::Docker;
use build_support::{containers_labelled, git, remove_images, unique, Repo};
use futures_util::future::BoxFuture;
use odooops_agent::docker::container::{
    self, ContainerError, ContainerSpec, Mount, MountKind, OutputSink, OutputStream,
};
use odooops_agent::docker::image::{self, BuildSpec};
use odooops_agent::source::{self, GitSha, RepoUrl, SourceError, Workspace};
use tokio_util::sync::CancellationToken;

/// Collects output lines.
#[derive(Default)]
struct Lines(Vec<(OutputStream, String)>);

impl OutputSink for Lines {
    fn line<'a>(&'a mut self, stream: OutputStream, line: &'a str) -> BoxFuture<'a, ()> {
        self.0.push((stream, line.to_string()));
        Box::pin(async {})
    }
}

impl Lines {
    fn of(&self, stream: OutputStream) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(s, _)| *s == stream)
            .map(|(_, line)| line.as_str())
            .collect()
    }
}

/// An image holding only busybox, removed when the test ends.
struct BusyboxImage {
    docker: Docker,
    reference: String,
    label: String,
}

impl BusyboxImage {
    async fn build() -> BusyboxImage {
        let docker = build_support::docker().await;
        let context = tempfile::tempdir().unwrap();
        std::fs::write(
            context.path().join("Dockerfile"),
            "FROM scratch\nCOPY busybox /bin/\n",
        )
        .unwrap();
        std::fs::copy(build_support::busybox(), context.path().join("busybox")).unwrap();
        let reference = format!("odooops-wtbuild/{}:test", unique("helper"));
        let spec = BuildSpec {
            context_dir: context.path().to_path_buf(),
            dockerfile: "Dockerfile".into(),
            tag: reference.clone(),
            labels: HashMap::new(),
            pull: false,
            timeout: Duration::from_secs(120),
        };
        let mut output = Lines::default();
        image::build(&docker, &spec, &mut output, &CancellationToken::new())
            .await
            .expect("building the busybox image");
        BusyboxImage {
            docker,
            reference,
            label: unique("run"),
        }
    }

    /// Returns a container spec running `script` with busybox sh, labelled for this test.
    fn spec(&self, script: &str, timeout: Duration) -> ContainerSpec {
        ContainerSpec {
            image: self.reference.clone(),
            entrypoint: Some(vec!["/bin/busybox".into(), "sh".into(), "-c".into()]),
            cmd: vec![script.to_string()],
            labels: HashMap::from([("odooops.test".to_string(), self.label.clone())]),
            timeout,
            ..Default::default()
        }
    }

    async fn leftover_containers(&self) -> Vec<String> {
        containers_labelled(&self.docker, "odooops.test", &self.label).await
    }

    async fn remove(self) {
        remove_images(&self.docker, std::slice::from_ref(&self.reference)).await;
    }
}

#[tokio::test]
async fn container_output_and_exit_code_are_reported() {
    let image = BusyboxImage::build().await;
    let script = "echo one; echo two; echo oops >&2; printf 'no newline'; exit 3";
    let mut lines = Lines::default();
    let spec = image.spec(script, Duration::from_secs(60));

    let exit =
        container::run_to_completion(&image.docker, &spec, &mut lines, &CancellationToken::new())
            .await
            .unwrap();
    assert_eq!(exit.exit_code, 3);
    assert!(!exit.oom_killed);
    assert_eq!(exit.lines, 4);
    assert_eq!(lines.of(OutputStream::Stdout), ["one", "two", "no newline"]);
    assert_eq!(lines.of(OutputStream::Stderr), ["oops"]);
    assert!(image.leftover_containers().await.is_empty());
    image.remove().await;
}

#[tokio::test]
async fn container_gets_env_mounts_and_network_mode() {
    let image = BusyboxImage::build().await;
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("file"), "from the host").unwrap();
    let mut spec = image.spec(
        "echo \"$GREETING\"; cat /data/file; echo; touch /data/new || echo read-only; \
         /bin/busybox ip -o link | /bin/busybox wc -l",
        Duration::from_secs(60),
    );
    spec.env = vec![("GREETING".into(), "hello world".into())];
    spec.mounts = vec![Mount {
        source: data.path().to_string_lossy().into_owned(),
        target: "/data".into(),
        kind: MountKind::Bind,
        read_only: true,
    }];
    spec.network_mode = Some("none".into());
    let mut lines = Lines::default();

    let exit =
        container::run_to_completion(&image.docker, &spec, &mut lines, &CancellationToken::new())
            .await
            .unwrap();
    assert_eq!(exit.exit_code, 0, "{:?}", lines.0);
    let stdout = lines.of(OutputStream::Stdout);
    assert_eq!(stdout[0], "hello world");
    assert_eq!(stdout[1], "from the host");
    assert_eq!(stdout[2], "read-only");
    // Network mode none leaves only the loopback interface.
    assert_eq!(stdout[3].trim(), "1");
    image.remove().await;
}

#[tokio::test]
async fn container_past_its_timeout_is_killed_and_removed() {
    let image = BusyboxImage::build().await;
    let spec = image.spec(
        "echo started; exec /bin/busybox sleep 600",
        Duration::from_secs(2),
    );
    let mut lines = Lines::default();

    let started = std::time::Instant::now();
    let err =
        container::run_to_completion(&image.docker, &spec, &mut lines, &CancellationToken::new())
            .await
            .unwrap_err();
    assert!(matches!(err, ContainerError::TimedOut { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(lines.of(OutputStream::Stdout), ["started"]);
    assert!(image.leftover_containers().await.is_empty());
    image.remove().await;
}

#[tokio::test]
async fn cancelled_container_is_removed() {
    let image = BusyboxImage::build().await;
    let spec = image.spec("exec /bin/busybox sleep 600", Duration::from_secs(300));
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        trigger.cancel();
    });

    let mut lines = Lines::default();
    let err = container::run_to_completion(&image.docker, &spec, &mut lines, &cancel)
        .await
        .unwrap_err();
    assert!(matches!(err, ContainerError::Cancelled { .. }), "{err}");
    assert!(image.leftover_containers().await.is_empty());
    image.remove().await;
}

#[tokio::test]
async fn dropped_run_still_removes_its_container() {
    let image = BusyboxImage::build().await;
    let spec = image.spec("exec /bin/busybox sleep 600", Duration::from_secs(300));
    let docker = image.docker.clone();
    let task = tokio::spawn(async move {
        let mut lines = Lines::default();
        let _ = container::run_to_completion(&docker, &spec, &mut lines, &CancellationToken::new())
            .await;
    });
    for _ in 0..50 {
        if !image.leftover_containers().await.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        image.leftover_containers().await.len(),
        1,
        "the container never started"
    );
    task.abort();

    let mut left = image.leftover_containers().await;
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = image.leftover_containers().await;
    }
    assert!(
        left.is_empty(),
        "container left after the run was dropped: {left:?}"
    );
    image.remove().await;
}

#[tokio::test]
async fn missing_image_fails_at_create() {
    let docker = build_support::docker().await;
    let spec = ContainerSpec {
        image: format!("odooops-wtbuild/{}:absent", unique("missing")),
        timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let err = container::run_to_completion(
        &docker,
        &spec,
        &mut Lines::default(),
        &CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ContainerError::Create { .. }), "{err}");
}

async fn fetch(url: &str, sha: &str) -> (tempfile::TempDir, Result<String, SourceError>) {
    let dir = tempfile::tempdir().unwrap();
    let url = RepoUrl::parse(url).unwrap();
    let sha = GitSha::parse(sha).unwrap();
    let result = source::fetch(
        &url,
        &sha,
        &dir.path().join("source"),
        Duration::from_secs(60),
        &CancellationToken::new(),
    )
    .await;
    (dir, result)
}

#[tokio::test]
async fn full_sha_is_fetched_from_a_local_path() {
    let repo = Repo::create(&[("marker.txt", "first")]);
    let (dir, result) = fetch(&repo.url(), &repo.sha).await;
    assert_eq!(result.unwrap(), repo.sha);
    let marker = std::fs::read_to_string(dir.path().join("source/marker.txt")).unwrap();
    assert_eq!(marker, "first");
}

#[tokio::test]
async fn local_path_is_cloned_without_copying_objects() {
    let repo = Repo::create(&[("marker.txt", "shared")]);
    let (dir, result) = fetch(&repo.url(), &repo.sha).await;
    assert_eq!(result.unwrap(), repo.sha);
    let alternates = dir.path().join("source/.git/objects/info/alternates");
    let shared = std::fs::read_to_string(&alternates).unwrap();
    let source_objects = repo.dir.path().join(".git/objects");
    assert_eq!(Path::new(shared.trim()), source_objects);
    let objects = dir.path().join("source/.git/objects");
    assert_eq!(
        files_under(&objects),
        vec![alternates],
        "the clone copied objects"
    );
}

/// Lists every regular file under `dir`, at any depth.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[tokio::test]
async fn full_sha_is_fetched_over_a_file_url() {
    let repo = Repo::create(&[("marker.txt", "fetched")]);
    let url = format!("file://{}", repo.url());
    let (dir, result) = fetch(&url, &repo.sha).await;
    assert_eq!(result.unwrap(), repo.sha);
    let marker = std::fs::read_to_string(dir.path().join("source/marker.txt")).unwrap();
    assert_eq!(marker, "fetched");
    assert!(!dir
        .path()
        .join("source/.git/objects/info/alternates")
        .exists());
}

#[tokio::test]
async fn short_sha_on_branch_is_fetched() {
    let repo = Repo::create(&[]);
    let root = repo.dir.path();
    git(root, &["checkout", "--quiet", "-b", "feature"]);
    std::fs::write(root.join("feature.txt"), "feature").unwrap();
    git(root, &["add", "feature.txt"]);
    git(
        root,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t.invalid",
            "commit",
            "--quiet",
            "-m",
            "f",
        ],
    );
    let feature_sha = git(root, &["rev-parse", "HEAD"]).trim().to_string();
    git(root, &["checkout", "--quiet", "main"]);

    let url = format!("file://{}", repo.url());
    let (dir, result) = fetch(&url, &feature_sha[..9]).await;
    assert_eq!(result.unwrap(), feature_sha);
    assert!(dir.path().join("source/feature.txt").exists());
}

#[tokio::test]
async fn unknown_commit_is_reported_as_not_found() {
    let repo = Repo::create(&[]);
    let (_dir, result) = fetch(&repo.url(), "0123456789abcdef0123456789abcdef01234567").await;
    let err = result.unwrap_err();
    assert!(matches!(err, SourceError::CommitNotFound { .. }), "{err}");
}

#[tokio::test]
async fn missing_repository_error_names_it() {
    let (_dir, result) = fetch(
        "/nonexistent/odooops-repo",
        "0123456789abcdef0123456789abcdef01234567",
    )
    .await;
    let err = result.unwrap_err().to_string();
    assert!(err.contains("/nonexistent/odooops-repo"), "{err}");
}

#[tokio::test]
async fn workspace_is_recreated_and_removed() {
    let parent = tempfile::tempdir().unwrap();
    let stale = parent.path().join("run-1/old");
    std::fs::create_dir_all(&stale).unwrap();

    let workspace = Workspace::create(parent.path(), "run-1").await.unwrap();
    assert!(!stale.exists(), "an earlier attempt's files are cleared");
    let path = workspace.path().to_path_buf();
    std::fs::write(path.join("f"), "x").unwrap();
    drop(workspace);
    assert!(!path.exists(), "dropping the workspace removes it");
}
