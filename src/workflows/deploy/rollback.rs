//! Automatic rollback after a failed health gate: the environment's previous successful
//! deploy goes back into service and is gated too, and the run fails either way.

use anyhow::anyhow;
use serde_json::json;

use super::container::{self, LABEL_SHA};
use super::health::GateReport;
use super::target::{self, PastDeploy};
use super::{hooks, Deploy, UpdateOutcome};
use crate::events::Level;
use crate::source::GitSha;
use crate::workflows::StepError;

/// Output lines of the failed container copied into the events.
const FAILED_LOG_LINES: usize = 30;

/// Message of the event by which the console recognizes an automatic rollback.
pub const ROLLBACK_MESSAGE: &str = "Automatic rollback triggered due to health check failure";

impl Deploy<'_> {
    /// Rolls back after `report` failed, and returns the run's failure.
    pub(super) async fn roll_back_automatically(
        &mut self,
        report: GateReport,
        update: UpdateOutcome,
    ) -> StepError {
        let reason = report.reason.clone();
        self.evidence.insert("gate".into(), json!(report));
        self.copy_failed_logs().await;

        let previous =
            target::previous_deploy(self.ctx.pool(), &self.site, self.ctx.run.run_id).await;
        let previous = match previous {
            Ok(Some(previous)) => previous,
            Ok(None) => return self.stop_without_previous(reason).await,
            Err(err) => {
                let failure = anyhow!(
                    "health check failed: {reason}; finding the previous deploy failed: {err:#}"
                );
                return self.stop_without_previous_because(failure).await;
            }
        };

        self.announce_rollback(&previous).await;
        let rollback = self.restore_previous_version(&previous, &update).await;
        let (healthy, detail) = self.note_rollback_outcome(&previous, rollback);
        self.evidence.insert("result".into(), json!("rolled_back"));
        self.record_evidence().await;
        let sha = &previous.git_sha;
        StepError::new(
            "health",
            anyhow!("health check failed: {reason}; rolled back to {sha}: {detail}"),
        )
        .with_metadata(json!({
            "rolled_back_to": sha,
            "rollback_healthy": healthy,
            "health": { "healthy": false, "reason": reason },
        }))
    }

    /// Writes the rollback event the console looks for, with the sha it rolls back to.
    async fn announce_rollback(&self, previous: &PastDeploy) {
        let payload = json!({ "previous_sha": previous.git_sha });
        self.ctx
            .events
            .send(Level::Error, ROLLBACK_MESSAGE, Some(payload))
            .await;
        tracing::warn!(
            previous.sha = %previous.git_sha,
            previous.run = %previous.run_id,
            "health check failed; rolling back"
        );
        let message = format!(
            "Rolling back to {} from {} run {}",
            previous.git_sha, previous.workflow, previous.run_id
        );
        self.ctx.events.info(message).await;
    }

    /// Adds the rollback to the evidence and returns whether the previous version is
    /// healthy, with a phrase for the run's error.
    fn note_rollback_outcome(
        &mut self,
        previous: &PastDeploy,
        rollback: anyhow::Result<GateReport>,
    ) -> (bool, String) {
        let mut entry = json!({
            "previous_sha": previous.git_sha,
            "previous_run_id": previous.run_id,
        });
        let outcome = match rollback {
            Ok(report) => {
                let outcome = if report.healthy {
                    (true, "the previous version is healthy again".to_string())
                } else {
                    let reason = &report.reason;
                    (
                        false,
                        format!("the rollback failed its health check too: {reason}"),
                    )
                };
                entry["gate"] = json!(report);
                outcome
            }
            Err(err) => {
                // Docker's errors may echo the container's environment.
                let error = self.scrubber.scrub(&format!("{err:#}"));
                entry["error"] = json!(error);
                (false, format!("the rollback failed: {error}"))
            }
        };
        self.evidence.insert("rollback".into(), entry);
        outcome
    }

    /// Brings the previous version back: the kept `<name>-previous` container when it
    /// runs that sha, otherwise a new container from its image. Then gates it.
    async fn restore_previous_version(
        &mut self,
        previous: &PastDeploy,
        update: &UpdateOutcome,
    ) -> anyhow::Result<GateReport> {
        container::remove_if_present(&self.docker, &self.config.container_name).await?;
        if update.ran {
            hooks::restore_before_rollback(self.ctx, &self.site, update.backup.as_ref()).await;
        }

        let kept = container::inspect(&self.docker, &self.config.previous_name()).await?;
        let kept_sha = kept
            .as_ref()
            .and_then(|kept| container::label(kept, LABEL_SHA));
        // The kept container runs the image that was deployed, even when the history
        // recorded a tag that points at another commit by now.
        if kept_sha.is_some_and(|sha| sha.eq_ignore_ascii_case(&previous.git_sha)) {
            container::reinstate_previous(&self.docker, &self.config).await?;
            self.ctx
                .events
                .info(format!(
                    "Started the kept container of {} again",
                    previous.git_sha
                ))
                .await;
        } else {
            let sha = GitSha::parse(&previous.git_sha).map_err(|err| {
                anyhow!(
                    "the kept container is gone, and the previous deploy's git_sha is not a \
                     commit sha ({err}), so the image of that tag may hold another commit now"
                )
            })?;
            let image = target::image_for(&self.site, sha.as_str())?;
            self.fetch_image(&image).await?;
            let labels = self.labels(sha.as_str());
            let body = container::server_body(&self.config, &image, &labels, &self.env);
            container::start_new(&self.docker, &self.config.container_name, body).await?;
            self.ctx
                .events
                .info(format!("Started a new container from {image}"))
                .await;
        }
        Ok(self.gate().await)
    }

    async fn stop_without_previous(&mut self, reason: String) -> StepError {
        let failure = anyhow!(
            "health check failed: {reason}; {} has no earlier successful deploy to roll back to",
            self.site.env_id
        );
        self.stop_without_previous_because(failure).await
    }

    /// Stops the failed container when there is nothing to roll back to.
    async fn stop_without_previous_because(&mut self, failure: anyhow::Error) -> StepError {
        let name = self.config.container_name.clone();
        let stopped = container::stop(&self.docker, &name, self.config.stop_timeout).await;
        let message = match &stopped {
            Ok(()) => format!(
                "{failure:#}; stopped container {name}, so nothing is serving {}",
                self.site.env_id
            ),
            Err(err) => format!("{failure:#}; stopping container {name} failed too: {err:#}"),
        };
        self.ctx.events.error(message.clone()).await;
        self.evidence
            .insert("result".into(), json!("stopped_without_rollback"));
        self.record_evidence().await;
        StepError::new("health", anyhow!(message)).with_metadata(json!({
            "rolled_back_to": null,
            "health": { "healthy": false },
        }))
    }

    async fn copy_failed_logs(&self) {
        let name = &self.config.container_name;
        let lines = container::tail_logs(&self.docker, name, FAILED_LOG_LINES).await;
        if lines.is_empty() {
            return;
        }
        self.ctx
            .events
            .warn(format!("Last {} output lines of {name}:", lines.len()))
            .await;
        for line in lines {
            let line = self.scrubber.scrub(&line);
            self.ctx.events.send(Level::Warn, line, None).await;
        }
    }
}
