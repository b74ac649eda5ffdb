//! The health gate: probes the new container's health URL until it returns 2xx, the
//! deadline passes, or the container exits or restarts.
//!
//! Probes are summarized: an event is written when the probe outcome changes (connection
//! refused, then HTTP 404, then HTTP 200), not for every probe, and the report counts
//! every outcome.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bollard::Docker;
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::env_config::HealthConfig;
use crate::events::{EventSink, Level};

/// The reason a passed gate reports.
const HEALTHY: &str = "healthy";
/// Shortest request timeout, for the last probe before the deadline.
const MIN_PROBE_TIMEOUT: Duration = Duration::from_millis(10);

/// Gate result, for the events, the run metadata and the evidence artifact.
#[derive(Debug, Clone, Serialize)]
pub struct GateReport {
    pub container: String,
    pub url: String,
    pub healthy: bool,
    /// Reason the gate failed, or "healthy".
    pub reason: String,
    pub elapsed_ms: u64,
    pub probes: u32,
    /// Count of each probe outcome, such as {"HTTP 200": 1, "connection refused": 3}.
    pub outcomes: BTreeMap<String, u32>,
    /// Each change of outcome with the time since the gate started.
    pub transitions: Vec<Transition>,
    pub timeout_ms: u64,
    pub interval_ms: u64,
    pub deadline_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Transition {
    pub at_ms: u64,
    pub outcome: String,
}

impl GateReport {
    /// Creates the report of a container that failed to start, so no probe ran.
    pub fn not_started(
        container: &str,
        url: &str,
        settings: &HealthConfig,
        reason: String,
    ) -> GateReport {
        GateReport {
            container: container.to_string(),
            url: url.to_string(),
            healthy: false,
            reason,
            elapsed_ms: 0,
            probes: 0,
            outcomes: BTreeMap::new(),
            transitions: Vec::new(),
            timeout_ms: settings.timeout.as_millis() as u64,
            interval_ms: settings.interval.as_millis() as u64,
            deadline_ms: settings.deadline.as_millis() as u64,
        }
    }

    /// Summarizes the report for run metadata.
    pub fn summary(&self) -> serde_json::Value {
        json!({
            "healthy": self.healthy,
            "reason": self.reason,
            "url": self.url,
            "elapsed_ms": self.elapsed_ms,
            "probes": self.probes,
        })
    }
}

/// Sends one probe and returns whether it was healthy and its outcome in a few words.
async fn probe(client: &ProbeClient, url: &hyper::Uri, timeout: Duration) -> (bool, String) {
    match tokio::time::timeout(timeout, client.get(url.clone())).await {
        Err(_) => (
            false,
            format!("timed out after {:.1} s", timeout.as_secs_f64()),
        ),
        Ok(Err(err)) => (false, describe_client_error(&err)),
        Ok(Ok(response)) => {
            let status = response.status();
            (status.is_success(), format!("HTTP {}", status.as_u16()))
        }
    }
}

/// Names the cause of a failed request in a few stable words, so repeated failures of
/// the same kind count as one outcome.
fn describe_client_error(err: &hyper_util::client::legacy::Error) -> String {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
                std::io::ErrorKind::ConnectionReset => "connection reset".into(),
                kind => format!("connection failed: {kind}"),
            };
        }
        source = cause.source();
    }
    if err.is_connect() {
        "connection failed".into()
    } else {
        "request failed: connection closed before a response".into()
    }
}

/// Container state that fails the gate at once.
async fn container_failure(docker: &Docker, name: &str, restarts_before: i64) -> Option<String> {
    let inspect = match docker.inspect_container(name, None).await {
        Ok(inspect) => inspect,
        Err(err) => return Some(format!("inspecting container {name} failed: {err}")),
    };
    let restarts = inspect.restart_count.unwrap_or(0);
    let state = inspect.state.unwrap_or_default();
    if state.restarting == Some(true) || restarts > restarts_before {
        return Some(format!(
            "container {name} restarted during the health check"
        ));
    }
    if state.running != Some(true) {
        let code = state.exit_code.unwrap_or(-1);
        return Some(format!(
            "container {name} exited with code {code} during the health check"
        ));
    }
    None
}

/// The HTTP client of the gate: no connection reuse, so every probe opens a connection
/// as a new visitor would.
type ProbeClient = Client<HttpConnector, Empty<Bytes>>;

/// Target of a gate run: the container, its URL and settings, and the run's events.
pub struct Gate<'a> {
    pub docker: &'a Docker,
    pub container: &'a str,
    pub url: &'a str,
    pub settings: &'a HealthConfig,
    pub events: &'a EventSink,
    pub cancel: &'a CancellationToken,
}

impl Gate<'_> {
    /// Runs the gate and returns its report, with a closing event that summarizes it.
    pub async fn run(&self) -> GateReport {
        let started = Instant::now();
        let mut report =
            GateReport::not_started(self.container, self.url, self.settings, String::new());
        report.reason = self.probe_until_decided(started, &mut report).await;
        report.healthy = report.reason == HEALTHY;
        report.elapsed_ms = started.elapsed().as_millis() as u64;

        let seconds = started.elapsed().as_secs_f64();
        let (level, message) = if report.healthy {
            let probes = report.probes;
            let url = self.url;
            (
                Level::Info,
                format!("Health check passed after {seconds:.1} s ({probes} probes of {url})"),
            )
        } else {
            (
                Level::Error,
                format!(
                    "Health check failed after {seconds:.1} s: {}",
                    report.reason
                ),
            )
        };
        self.events
            .send(level, message, Some(report.summary()))
            .await;
        report
    }

    /// Probes until the container is healthy, fails, or the deadline passes, and returns
    /// [`HEALTHY`] or the reason for failing.
    async fn probe_until_decided(&self, started: Instant, report: &mut GateReport) -> String {
        let uri: hyper::Uri = match self.url.parse() {
            Ok(uri) => uri,
            Err(err) => return format!("invalid health URL {}: {err}", self.url),
        };
        let client: ProbeClient = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build_http();
        let restarts_before = match self.docker.inspect_container(self.container, None).await {
            Ok(inspect) => inspect.restart_count.unwrap_or(0),
            Err(err) => return format!("inspecting container {} failed: {err}", self.container),
        };
        let deadline = started + self.settings.deadline;
        loop {
            if let Some(failure) =
                container_failure(self.docker, self.container, restarts_before).await
            {
                return failure;
            }
            let probe_started = Instant::now();
            let timeout =
                (self.settings.timeout).min(deadline.saturating_duration_since(probe_started));
            let (healthy, outcome) = probe(&client, &uri, timeout.max(MIN_PROBE_TIMEOUT)).await;
            self.record(report, started, &outcome).await;
            if healthy {
                return HEALTHY.to_string();
            }
            if Instant::now() >= deadline {
                let limit = self.settings.deadline.as_secs_f64();
                let url = self.url;
                return format!(
                    "no healthy response from {url} within {limit:.1} s; last probe: {outcome}"
                );
            }
            let next = (probe_started + self.settings.interval).min(deadline);
            tokio::select! {
                _ = tokio::time::sleep_until(next.into()) => {}
                _ = self.cancel.cancelled() => return "cancelled".to_string(),
            }
        }
    }

    /// Counts a probe outcome, and writes an event when it differs from the last one.
    async fn record(&self, report: &mut GateReport, started: Instant, outcome: &str) {
        report.probes += 1;
        *report.outcomes.entry(outcome.to_string()).or_default() += 1;
        let changed = report
            .transitions
            .last()
            .is_none_or(|last| last.outcome != outcome);
        if !changed {
            return;
        }
        let at_ms = started.elapsed().as_millis() as u64;
        report.transitions.push(Transition {
            at_ms,
            outcome: outcome.to_string(),
        });
        let message = format!("Health probe: {outcome} at {:.1} s", at_ms as f64 / 1000.0);
        self.events.send(Level::Info, message, None).await;
    }
}
