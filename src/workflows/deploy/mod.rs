//! Deploy, promote and rollback runs: put an image into an environment's container, let
//! the health gate decide, and roll back by itself when the new version is unhealthy.
//!
//! The steps of a run, in order:
//!
//! 1. validate: read the environment's config, work out the sha and check the run's
//!    approvals. The sha must be a commit sha, never a tag. A promotion must have passed
//!    in its source environment, and a rollback target must be an earlier successful
//!    deploy of this environment.
//! 2. image: find `<project image>:<sha>` on this host or pull it.
//! 3. ownership: the containers under the environment's names (live, `-previous`,
//!    `-update`) must carry this project's and environment's labels. A container of
//!    another project, or one no deploy created, fails the run untouched.
//! 4. replace: stop the live container and keep it as `<name>-previous`.
//! 5. update (when the config lists modules, not for rollbacks): `odoo -u` in a one-off
//!    container. A failed update puts the previous container back.
//! 6. start the new container and run the health gate.
//! 7. When the gate fails: roll back to the environment's previous successful deploy,
//!    gate that too, and fail the run.
//!
//! Every container of the environment mounts the same data volume, which no step removes.

mod branch;
mod container;
pub mod env_config;
mod evidence;
mod health;
mod hooks;
mod rollback;
mod scrub;
mod target;
mod update;

use anyhow::anyhow;
use bollard::Docker;
use futures_util::future::BoxFuture;
use serde_json::{json, Map, Value};

use crate::config::{RegistryCredentials, Settings};
use crate::docker::{self, pull};
use crate::workflows::{run_approvals, RunContext, RunResult, StepError, StepResultExt, Workflow};
use container::Labels;
use env_config::{resolve_env_value, EnvConfig};
use health::GateReport;
use scrub::Scrubber;
use target::{Kind, Site, Target};

pub use branch::queue_deploy_after_build;
pub use target::DEPLOY_WORKFLOWS;

/// The workflow behind 'deploy', 'promote' and 'rollback' runs.
#[derive(Debug, Default, Clone, Copy)]
pub struct DeployWorkflow;

impl Workflow for DeployWorkflow {
    fn execute<'a>(&'a self, ctx: &'a RunContext) -> BoxFuture<'a, RunResult> {
        Box::pin(execute(ctx))
    }
}

async fn execute(ctx: &RunContext) -> RunResult {
    let kind = Kind::from_workflow(&ctx.run.workflow).ok_or_else(|| {
        StepError::invalid(format!("workflow {:?} is not a deploy", ctx.run.workflow))
    })?;
    let mut site = target::load_site(ctx.pool(), &ctx.run.project_id, &ctx.run.env_id)
        .await
        .step("validate")?;
    // Deploy the repository the build pushed to: an image named without a registry host
    // lives on the configured registry.
    if let (Some(repository), Some(registry)) = (&site.image_repository, &ctx.settings.registry) {
        let pushed = crate::workflows::build::tags::image_repository(repository, registry)
            .map_err(StepError::invalid)?;
        site.image_repository = Some(pushed);
    }
    let config = EnvConfig::parse(&site.config, &site.db_name).map_err(StepError::invalid)?;
    let probe_url = config
        .health
        .probe_url(&config.ports)
        .map_err(StepError::invalid)?;
    let (env, scrubber) = container_env(&config).map_err(StepError::invalid)?;
    let target = target::resolve(ctx, kind, &site).await?;
    check_approvals(ctx).await?;

    let docker = docker::connect(&ctx.settings.docker).await.step("image")?;
    let mut deploy = Deploy {
        ctx,
        docker,
        kind,
        site,
        config,
        env,
        scrubber,
        probe_url,
        evidence: Map::new(),
    };
    deploy.check_ownership().await?;
    deploy.fetch_image(&target.image).await.step("image")?;
    deploy.run(&target).await
}

/// Plain `env` values shorter than this are settings such as `2` or `odoo`, left
/// unmasked: masking them would blank every match in the copied output.
const MIN_MASKED_PLAIN: usize = 6;

/// Resolves the container's environment into KEY=VALUE pairs, and a scrubber that masks
/// the values in the container output the deploy copies: every value read from a file
/// or the agent's environment, and plain values of MIN_MASKED_PLAIN characters or more.
fn container_env(
    config: &EnvConfig,
) -> Result<(Vec<String>, Scrubber), env_config::EnvConfigError> {
    let mut pairs = Vec::with_capacity(config.env.len());
    let mut values = Vec::with_capacity(config.env.len());
    for (name, source) in &config.env {
        let value = resolve_env_value(name, source)?;
        pairs.push(format!("{name}={}", value.expose()));
        let short_setting = matches!(source, env_config::EnvValue::Plain(text)
            if text.chars().count() < MIN_MASKED_PLAIN);
        if !short_setting {
            values.push(value);
        }
    }
    Ok((pairs, Scrubber::new(values)))
}

/// Fails a run that reached an agent without the approvals its environment requires. The
/// database already keeps such runs from being claimed; this check also covers runs
/// queued while the approval triggers were disabled.
async fn check_approvals(ctx: &RunContext) -> Result<(), StepError> {
    let (required, approvers) = run_approvals(ctx).await.step("approvals")?;
    if required == 0 {
        return Ok(());
    }
    if (approvers.len() as i64) < i64::from(required) {
        return Err(StepError::new(
            "approvals",
            anyhow!(
                "{} requires {required} approvals but the run has {} ({}); it is not deployed",
                ctx.run.env_id,
                approvers.len(),
                approvers.join(", ")
            ),
        ));
    }
    ctx.events
        .info(format!("Approved by {}", approvers.join(", ")))
        .await;
    Ok(())
}

/// Finds the login for a registry host: a `[[deploy.registries]]` entry, or else the
/// `[registry]` section when it is for that host, which is where the build pushes.
fn registry_login(settings: &Settings, host: &str) -> Option<RegistryCredentials> {
    if let Some(login) = settings.deploy.credentials_for(host) {
        return Some(login.clone());
    }
    let registry = settings.registry.as_ref()?;
    let (username, password) = registry.credentials.clone()?;
    registry
        .host
        .eq_ignore_ascii_case(host)
        .then(|| RegistryCredentials {
            host: registry.host.clone(),
            username,
            password,
        })
}

/// One run's deploy into one environment.
pub(crate) struct Deploy<'a> {
    ctx: &'a RunContext,
    docker: Docker,
    kind: Kind,
    site: Site,
    config: EnvConfig,
    env: Vec<String>,
    /// Masks the `env` values in container output copied into events and the evidence.
    scrubber: Scrubber,
    probe_url: String,
    evidence: Map<String, Value>,
}

impl Deploy<'_> {
    async fn fetch_image(&self, image: &str) -> Result<(), pull::PullError> {
        let registry = pull::registry_host(image);
        let credentials = registry_login(&self.ctx.settings, registry);
        let source = pull::ensure_image(&self.docker, image, credentials.as_ref()).await?;
        let message = match source {
            pull::ImageSource::Local => format!("Image {image} is on this host"),
            pull::ImageSource::Pulled => format!("Pulled image {image} from {registry}"),
        };
        self.ctx.events.info(message).await;
        Ok(())
    }

    /// Fails the run before any container is touched when a container under one of the
    /// environment's names belongs to another project or environment, or to no deploy.
    async fn check_ownership(&self) -> Result<(), StepError> {
        let (project_id, env_id) = (&self.site.project_id, &self.site.env_id);
        container::check_ownership(&self.docker, &self.config, project_id, env_id)
            .await
            .step("ownership")
    }

    fn labels(&self, git_sha: &str) -> Labels {
        Labels {
            project_id: self.site.project_id.clone(),
            env_id: self.site.env_id.clone(),
            run_id: self.ctx.run.run_id.to_string(),
            git_sha: git_sha.to_string(),
        }
    }

    async fn run(&mut self, target: &Target) -> RunResult {
        let name = self.config.container_name.clone();
        let env_id = &self.site.env_id;
        let message = format!(
            "Starting {} into {env_id} as container {name}",
            target.description
        );
        self.ctx.events.info(message).await;
        let target_evidence = json!({
            "git_sha": target.git_sha, "image": target.image, "container": name,
        });
        self.evidence.insert("target".into(), target_evidence);

        self.retire_live().await?;
        let update = match self.update_if_configured(target).await {
            Ok(update) => update,
            Err(failure) => return Err(self.put_back_previous(failure).await),
        };
        let labels = self.labels(&target.git_sha);
        let body = container::server_body(&self.config, &target.image, &labels, &self.env);
        let report = match container::start_new(&self.docker, &name, body).await {
            Ok(()) => self.gate().await,
            Err(err) => self.failed_start_report(err).await,
        };
        if self.ctx.cancel.is_cancelled() {
            let failure = anyhow!("run cancelled during the health check");
            return Err(self
                .put_back_previous(StepError::new("health", failure))
                .await);
        }
        if report.healthy {
            return Ok(self.succeed(target, report).await);
        }
        Err(self.roll_back_automatically(report, update).await)
    }

    /// Stops the live container and keeps it as `<name>-previous`.
    async fn retire_live(&mut self) -> Result<(), StepError> {
        let run_id = self.ctx.run.run_id.to_string();
        let retired = container::retire_live(&self.docker, &self.config, &run_id)
            .await
            .step("replace")?;
        if let Some(retired) = &retired {
            let sha = retired
                .git_sha
                .as_deref()
                .unwrap_or("without an odooops.sha label");
            let name = &self.config.container_name;
            let previous = self.config.previous_name();
            let message = format!("Stopped {name} (sha {sha}) and kept it as {previous}");
            self.ctx.events.info(message).await;
        }
        let replaced_sha = retired.and_then(|retired| retired.git_sha);
        self.evidence
            .insert("replaced_sha".into(), json!(replaced_sha));
        Ok(())
    }

    /// Runs the module update when the config lists modules. Rollback runs skip it: the
    /// older code cannot update modules that a newer version already migrated.
    async fn update_if_configured(&mut self, target: &Target) -> Result<UpdateOutcome, StepError> {
        let Some(modules) = self.config.update.clone() else {
            return Ok(UpdateOutcome::default());
        };
        if self.kind == Kind::Rollback {
            self.ctx
                .events
                .info("Rollback run: module update skipped")
                .await;
            return Ok(UpdateOutcome::default());
        }
        let backup = hooks::backup_before_update(self.ctx, &self.site)
            .await
            .step("backup")?;
        let labels = self.labels(&target.git_sha);
        let request = update::UpdateRequest {
            config: &self.config,
            image: &target.image,
            db_name: &self.site.db_name,
            modules: &modules,
            labels: &labels,
            env: &self.env,
            scrubber: &self.scrubber,
        };
        let result =
            update::update_modules(&self.docker, request, &self.ctx.events, &self.ctx.cancel).await;
        // The error quotes output lines, which are scrubbed already; Docker's own errors
        // are scrubbed here in case they echo the container's environment.
        let error = result
            .as_ref()
            .err()
            .map(|err| self.scrubber.scrub(&format!("{err:#}")));
        self.evidence.insert(
            "update".into(),
            json!({ "modules": modules.argument(), "ok": result.is_ok(), "error": error }),
        );
        if let Some(error) = error {
            return Err(StepError::new("update", anyhow!(error)));
        }
        Ok(UpdateOutcome { ran: true, backup })
    }

    async fn gate(&self) -> GateReport {
        let message = format!("Health check of {} started", self.probe_url);
        self.ctx.events.info(message).await;
        let gate = health::Gate {
            docker: &self.docker,
            container: &self.config.container_name,
            url: &self.probe_url,
            settings: &self.config.health,
            events: &self.ctx.events,
            cancel: &self.ctx.cancel,
        };
        gate.run().await
    }

    /// Reports a container that could not even start as a failed gate, so that the
    /// automatic rollback handles it like an unhealthy one.
    async fn failed_start_report(&self, err: anyhow::Error) -> GateReport {
        let reason = self.scrubber.scrub(&format!("{err:#}"));
        self.ctx
            .events
            .error(format!("Starting the new container failed: {reason}"))
            .await;
        GateReport::not_started(
            &self.config.container_name,
            &self.probe_url,
            &self.config.health,
            reason,
        )
    }

    async fn succeed(&mut self, target: &Target, report: GateReport) -> Value {
        self.evidence.insert("gate".into(), json!(report));
        self.evidence.insert("result".into(), json!("healthy"));
        let evidence = self.record_evidence().await;
        json!({
            "deployed_sha": target.git_sha,
            "image": target.image,
            "container": self.config.container_name,
            "health": report.summary(),
            "evidence": evidence,
        })
    }

    /// Puts the stopped previous container back after a failure before the new one
    /// started, and returns the failure with what happened added to the events.
    async fn put_back_previous(&mut self, failure: StepError) -> StepError {
        match container::reinstate_previous(&self.docker, &self.config).await {
            Ok(true) => {
                let message = format!(
                    "Started the previous container again as {}",
                    self.config.container_name
                );
                self.ctx.events.warn(message).await;
            }
            Ok(false) => {
                self.ctx
                    .events
                    .warn("No previous container to start again")
                    .await;
            }
            Err(err) => {
                self.ctx
                    .events
                    .error(format!(
                        "Starting the previous container again failed: {err:#}"
                    ))
                    .await;
            }
        }
        self.evidence
            .insert("result".into(), json!(format!("{failure}")));
        self.record_evidence().await;
        failure
    }

    /// Records the evidence artifact; a failure to do so is reported, not fatal.
    async fn record_evidence(&mut self) -> Option<String> {
        let mut document = self.evidence.clone();
        document.insert("run_id".into(), json!(self.ctx.run.run_id));
        document.insert("workflow".into(), json!(self.ctx.run.workflow));
        document.insert("project_id".into(), json!(self.site.project_id));
        document.insert("env_id".into(), json!(self.site.env_id));
        document.insert("recorded_at".into(), json!(chrono::Utc::now()));
        match evidence::record(self.ctx, &Value::Object(document)).await {
            Ok(path) => Some(path),
            Err(err) => {
                self.ctx
                    .events
                    .warn(format!("Recording the deploy evidence failed: {err:#}"))
                    .await;
                None
            }
        }
    }
}

/// Whether the module update ran, and the backup taken before it.
#[derive(Debug, Default)]
struct UpdateOutcome {
    ran: bool,
    backup: Option<hooks::PreUpdateBackup>,
}
