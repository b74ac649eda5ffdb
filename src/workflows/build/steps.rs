//! The steps of a build, in order: fetch, build (while the test database is created),
//! test, push (while the test database is dropped).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use bollard::auth::DockerCredentials;
use bollard::Docker;
use serde_json::json;
use tokio::task::JoinHandle;

use crate::config::{RegistrySettings, TestDatabaseSettings};
use crate::docker::container::{self, ContainerSpec};
use crate::docker::image::{self, BuildSpec, BuiltImage};
use crate::events::Level;
use crate::queue::{Artifact, Lease};
use crate::source::{self, GitSha, Workspace};
use crate::workflows::{RunContext, RunResult, StepError, StepResultExt};

use super::log::{BuildLog, TestScan};
use super::project::Project;
use super::sweep;
use super::tags::{ref_slug, LATEST_SUFFIX};
use super::testdb::TestDatabase;

/// A run's validated input.
#[derive(Debug)]
pub struct Plan {
    pub sha: GitSha,
    pub git_ref: Option<String>,
    pub project: Project,
    /// Full image repository, such as `ghcr.io/acme/odoo`.
    pub repository: String,
    pub registry: RegistrySettings,
}

impl Plan {
    /// Values that must never reach the events or the log.
    pub fn secrets(&self) -> Vec<String> {
        self.registry
            .credentials
            .iter()
            .map(|(_, password)| password.expose().to_string())
            .collect()
    }
}

/// One build in progress.
pub struct Build<'a> {
    ctx: &'a RunContext,
    plan: &'a Plan,
    docker: &'a Docker,
    workspace: &'a Workspace,
    log: BuildLog,
    /// Image references this run created locally, removed again if the run fails.
    local_refs: Vec<String>,
}

/// The image that the build step produced, with its references.
struct Image {
    commit: String,
    reference: String,
    refs: Vec<String>,
    built: BuiltImage,
}

impl<'a> Build<'a> {
    pub fn new(
        ctx: &'a RunContext,
        plan: &'a Plan,
        docker: &'a Docker,
        workspace: &'a Workspace,
        log: BuildLog,
    ) -> Build<'a> {
        Build {
            ctx,
            plan,
            docker,
            workspace,
            log,
            local_refs: Vec::new(),
        }
    }

    pub async fn run(&mut self) -> RunResult {
        let commit = timed("fetch", self.fetch()).await?;

        // The test database is created while the image builds: creating a database
        // copies template1 and can take a second or more.
        let settings = self.ctx.settings.build.test_database.clone();
        let lease = self.ctx.run.lease;
        let (image, database) = tokio::join!(
            timed("build", self.build(commit)),
            create_test_database(settings, lease)
        );
        let image = match image {
            Ok(image) => image,
            Err(failure) => {
                if let Ok(Some(database)) = database {
                    self.drop_test_database(tokio::spawn(database.drop_now()))
                        .await;
                }
                return Err(failure);
            }
        };
        let database = database.step("test")?;
        self.announce_test_database(database.as_ref()).await;

        let tested = timed("test", self.test(&image, database.as_ref())).await;
        // Dropping also waits for a checkpoint, so it overlaps the push.
        let dropping = database.map(|database| tokio::spawn(database.drop_now()));
        let published = match tested {
            Ok(seconds) => self.publish(&image, seconds).await,
            Err(failure) => Err(failure),
        };
        if let Some(dropping) = dropping {
            self.drop_test_database(dropping).await;
        }
        published
    }

    /// Pushes the image, records it, and returns the run's metadata.
    async fn publish(&mut self, image: &Image, test_seconds: f64) -> RunResult {
        let digest = timed("push", self.push(image)).await?;
        self.record(image, &digest).await?;
        Ok(json!({
            "image": image.reference,
            "digest": digest,
            "image_id": image.built.id,
            "image_tags": image.refs,
            "git_sha_full": image.commit,
            "build_time_seconds": round(image.built.duration),
            "test_time_seconds": test_seconds,
        }))
    }

    /// Waits for a test database drop started earlier and reports a failure as a warning.
    async fn drop_test_database(&mut self, dropping: JoinHandle<anyhow::Result<()>>) {
        let error = match dropping.await {
            Ok(Ok(())) => return,
            Ok(Err(err)) => format!("{err:#}"),
            Err(err) => err.to_string(),
        };
        let message = format!("Dropping the test database failed: {error}");
        self.log.note(Level::Warn, &message).await;
    }

    /// Removes the local image references of a failed run, and returns the log.
    pub async fn finish(self, failed: bool) -> BuildLog {
        if failed {
            for reference in self.local_refs.iter().rev() {
                if let Err(err) = image::remove(self.docker, reference).await {
                    tracing::warn!(image = %reference, error = %err, "removing image failed");
                }
            }
        }
        self.log
    }

    async fn fetch(&mut self) -> Result<String, StepError> {
        let (url, sha) = (&self.plan.project.repo_url, &self.plan.sha);
        self.note(format!("Fetching {url} at {sha}")).await;
        let started = Instant::now();
        let dir = self.workspace.path().join("source");
        let timeout = self.ctx.settings.build.fetch_timeout;
        let commit = source::fetch(url, sha, &dir, timeout, &self.ctx.cancel)
            .await
            .step("fetch")?;
        self.note(format!(
            "Checked out {commit} in {:.1} s",
            secs(started.elapsed())
        ))
        .await;
        Ok(commit)
    }

    async fn build(&mut self, commit: String) -> Result<Image, StepError> {
        let project = &self.plan.project;
        let reference = format!("{}:{commit}", self.plan.repository);
        let context_dir = self.context_dir().await.step("build")?;
        let spec = BuildSpec {
            context_dir,
            dockerfile: project.dockerfile.clone(),
            tag: reference.clone(),
            // The classic builder adds each label as a step of its own, with a container
            // and a commit, and the tag already names the commit.
            labels: HashMap::new(),
            pull: self.ctx.settings.build.pull,
            timeout: self.ctx.settings.build.build_timeout,
        };
        self.note(format!("Building {reference} from {}", project.dockerfile))
            .await;
        let built = image::build(self.docker, &spec, &mut self.log, &self.ctx.cancel)
            .await
            .step("build")?;
        self.local_refs.push(reference.clone());

        let mut refs = vec![reference.clone()];
        if let Some(git_ref) = &self.plan.git_ref {
            let moving = format!(
                "{}:{}{LATEST_SUFFIX}",
                self.plan.repository,
                ref_slug(git_ref)
            );
            image::tag(self.docker, &reference, &moving)
                .await
                .step("build")?;
            self.local_refs.push(moving.clone());
            refs.push(moving);
        }
        self.note(format!(
            "Built image {} in {:.1} s: {} layers, {:.1} MB, context {} files ({} excluded)",
            built.id,
            secs(built.duration),
            built.layers,
            built.size_bytes as f64 / 1e6,
            built.context.entries,
            built.context.excluded,
        ))
        .await;
        Ok(Image {
            commit,
            reference,
            refs,
            built,
        })
    }

    /// Resolves the context directory, which must stay inside the checkout even when the
    /// repository makes it a symlink: the archive follows the context directory itself.
    async fn context_dir(&self) -> anyhow::Result<PathBuf> {
        let source = self.workspace.path().join("source");
        let context = &self.plan.project.context;
        let resolved = tokio::fs::canonicalize(source.join(context))
            .await
            .with_context(|| format!("the build context directory {context:?} is missing"))?;
        let root = tokio::fs::canonicalize(&source)
            .await
            .context("resolving the checkout failed")?;
        if !resolved.starts_with(&root) || !resolved.is_dir() {
            anyhow::bail!("the build context {context:?} is not a directory inside the repository");
        }
        Ok(resolved)
    }

    fn labels(&self, commit: &str) -> HashMap<String, String> {
        HashMap::from([
            (
                "org.opencontainers.image.revision".into(),
                commit.to_string(),
            ),
            ("odooops.project_id".into(), self.ctx.run.project_id.clone()),
            ("odooops.run_id".into(), self.ctx.run.run_id.to_string()),
        ])
    }

    /// Runs the test command; returns its duration in seconds.
    async fn test(
        &mut self,
        image: &Image,
        database: Option<&TestDatabase>,
    ) -> Result<f64, StepError> {
        let spec = self.test_container(image, database);
        self.note(format!(
            "Running tests: {} (timeout {} s)",
            self.plan.project.test_command.join(" "),
            spec.timeout.as_secs()
        ))
        .await;

        self.log.start_test_scan();
        let outcome =
            container::run_to_completion(self.docker, &spec, &mut self.log, &self.ctx.cancel).await;
        let scan = self.log.finish_test_scan();

        let exit = outcome.step("test")?;
        check_test_outcome(exit, &scan)?;
        let seconds = round(exit.duration);
        self.note(format!(
            "Tests passed in {seconds:.1} s ({} output lines)",
            exit.lines
        ))
        .await;
        Ok(seconds)
    }

    /// Reports the test database, and hides its password from the log and events.
    async fn announce_test_database(&mut self, database: Option<&TestDatabase>) {
        let Some(database) = database else {
            let message = "No [build.test_database] configured; the tests run without a database";
            self.log.note(Level::Warn, message).await;
            return;
        };
        self.log
            .add_secret(database.password().expose().to_string());
        self.note(format!(
            "Created test database {} on {}:{}",
            database.name, database.host, database.port
        ))
        .await;
    }

    fn test_container(&self, image: &Image, database: Option<&TestDatabase>) -> ContainerSpec {
        let project = &self.plan.project;
        let mut cmd = project.test_command.clone();
        if let Some(database) = database {
            cmd.extend(database.odoo_args());
        }
        let run = &self.ctx.run;
        let mut labels = self.labels(&image.commit);
        labels.insert("odooops.role".into(), "build-test".into());
        labels.insert(sweep::CLAIM_LABEL.into(), run.lease.tag());
        ContainerSpec {
            image: image.reference.clone(),
            name: Some(format!("odooops-test-{}-{}", run.run_id, run.attempt)),
            cmd,
            env: project.test_env.clone().into_iter().collect(),
            network_mode: Some(self.ctx.settings.build.test_network.clone()),
            labels,
            timeout: project.test_timeout,
            ..Default::default()
        }
    }

    /// Pushes every tag; returns the manifest digest of the sha tag.
    async fn push(&mut self, image: &Image) -> Result<String, StepError> {
        let credentials = self
            .plan
            .registry
            .credentials
            .as_ref()
            .map(|(user, password)| DockerCredentials {
                username: Some(user.clone()),
                password: Some(password.expose().to_string()),
                serveraddress: Some(self.plan.registry.host.clone()),
                ..Default::default()
            });
        let timeout = self.ctx.settings.build.push_timeout;
        let mut digest = None;
        for reference in &image.refs {
            self.note(format!("Pushing {reference}")).await;
            let cancel = &self.ctx.cancel;
            let pushed = image::push(
                self.docker,
                reference,
                credentials.clone(),
                &mut self.log,
                timeout,
                cancel,
            )
            .await
            .step("push")?;
            if reference == &image.reference {
                digest = pushed;
            }
        }
        let digest = match digest {
            Some(digest) => digest,
            None => self.repo_digest(&image.reference).await?,
        };
        self.note(format!("Pushed {} ({digest})", image.reference))
            .await;
        Ok(digest)
    }

    /// Reads the pushed digest from the image's RepoDigests when the push output had none.
    async fn repo_digest(&self, reference: &str) -> Result<String, StepError> {
        let inspected = self.docker.inspect_image(reference).await.step("push")?;
        let prefix = format!("{}@", self.plan.repository);
        inspected
            .repo_digests
            .unwrap_or_default()
            .iter()
            .find_map(|entry| entry.strip_prefix(&prefix).map(str::to_string))
            .ok_or_else(|| {
                StepError::new(
                    "push",
                    anyhow::anyhow!("the registry reported no digest for {reference}"),
                )
            })
    }

    async fn record(&mut self, image: &Image, digest: &str) -> Result<(), StepError> {
        let artifact = Artifact {
            artifact_type: "image".into(),
            storage_path: image.reference.clone(),
            digest: Some(digest.to_string()),
            size_bytes: Some(image.built.size_bytes),
            metadata: json!({
                "build_time_seconds": round(image.built.duration),
                "layers": image.built.layers,
                "image_id": image.built.id,
                "tags": image.refs,
                "git_sha": image.commit,
                "git_ref": self.plan.git_ref,
            }),
        };
        self.ctx.add_artifact(&artifact).await.step("artifacts")
    }

    async fn note(&mut self, message: String) {
        self.log.note(Level::Info, &message).await;
    }
}

/// Creates the test database of the lease's claim when one is configured.
async fn create_test_database(
    settings: Option<TestDatabaseSettings>,
    lease: Lease,
) -> anyhow::Result<Option<TestDatabase>> {
    match settings {
        Some(settings) => TestDatabase::create(&settings, lease).await.map(Some),
        None => Ok(None),
    }
}

/// Fails the tests on a non-zero exit code, or on failure lines after exit code 0.
fn check_test_outcome(exit: container::ContainerExit, scan: &TestScan) -> Result<(), StepError> {
    let metadata = json!({ "test_failure_lines": scan.failures, "test_exit_code": exit.exit_code });
    if exit.exit_code != 0 {
        let oom = if exit.oom_killed {
            " (killed: out of memory)"
        } else {
            ""
        };
        let error = anyhow::anyhow!("test command exited with code {}{oom}", exit.exit_code);
        return Err(StepError::new("test", error).with_metadata(metadata));
    }
    if scan.failures > 0 {
        let error = anyhow::anyhow!(
            "test command exited with code 0 but logged {} ERROR, CRITICAL or FAIL: lines; \
             first: {}",
            scan.failures,
            scan.first.join(" | ")
        );
        return Err(StepError::new("test", error).with_metadata(metadata));
    }
    Ok(())
}

/// Logs a step as a started / finished pair with its duration.
async fn timed<T>(
    step: &'static str,
    work: impl std::future::Future<Output = Result<T, StepError>>,
) -> Result<T, StepError> {
    let started = Instant::now();
    tracing::info!(step, "build step started");
    let result = work.await;
    let duration_ms = started.elapsed().as_millis() as u64;
    match &result {
        Ok(_) => tracing::info!(step, duration_ms, "build step finished"),
        Err(err) => tracing::warn!(step, duration_ms, error = %err, "build step failed"),
    }
    result
}

fn secs(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

/// Seconds rounded to milliseconds, for metadata.
fn round(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1000.0).round() / 1000.0
}
