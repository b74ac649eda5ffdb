//! The health gate: probes the new container's health URL until it answers 2xx, the
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
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::env_config::HealthConfig;
use crate::events::{EventSink, Level};

/// What the gate saw, for the events, the run metadata and the evidence artifact.
#[derive(Debug, Clone, Serialize)]
pub struct GateReport {
    pub container: String,
    pub url: String,
    pub healthy: bool,
    /// Why the gate failed, or "healthy".
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
    /// The report for a container that failed to start, so no probe ran.
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

    /// A compact form for run metadata.
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

enum Probe {
    Healthy(String),
    Unhealthy(String),
}

async fn probe(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    url: &hyper::Uri,
    timeout: Duration,
) -> Probe {
    match tokio::time::timeout(timeout, client.get(url.clone())).await {
        Err(_) => Probe::Unhealthy(format!("timed out after {:.1} s", timeout.as_secs_f64())),
        Ok(Err(err)) => Probe::Unhealthy(describe_client_error(&err)),
        Ok(Ok(response)) if response.status().is_success() => {
            Probe::Healthy(format!("HTTP {}", response.status().as_u16()))
        }
        Ok(Ok(response)) => Probe::Unhealthy(format!("HTTP {}", response.status().as_u16())),
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

/// Runs the gate against container `name` and returns its report. Events go to `events`.
pub async fn run_gate(
    docker: &Docker,
    name: &str,
    url: &str,
    settings: &HealthConfig,
    events: &EventSink,
    cancel: &CancellationToken,
) -> GateReport {
    let started = Instant::now();
    let mut report = GateReport {
        container: name.to_string(),
        url: url.to_string(),
        healthy: false,
        reason: String::new(),
        elapsed_ms: 0,
        probes: 0,
        outcomes: BTreeMap::new(),
        transitions: Vec::new(),
        timeout_ms: settings.timeout.as_millis() as u64,
        interval_ms: settings.interval.as_millis() as u64,
        deadline_ms: settings.deadline.as_millis() as u64,
    };
    report.reason = gate_loop(
        docker,
        name,
        url,
        settings,
        events,
        cancel,
        started,
        &mut report,
    )
    .await;
    report.healthy = report.reason == "healthy";
    report.elapsed_ms = started.elapsed().as_millis() as u64;

    let level = if report.healthy {
        Level::Info
    } else {
        Level::Error
    };
    let message = if report.healthy {
        format!(
            "Health check passed after {:.1} s ({} probes of {url})",
            started.elapsed().as_secs_f64(),
            report.probes
        )
    } else {
        format!(
            "Health check failed after {:.1} s: {}",
            started.elapsed().as_secs_f64(),
            report.reason
        )
    };
    events.send(level, message, Some(report.summary())).await;
    report
}

#[allow(clippy::too_many_arguments)]
async fn gate_loop(
    docker: &Docker,
    name: &str,
    url: &str,
    settings: &HealthConfig,
    events: &EventSink,
    cancel: &CancellationToken,
    started: Instant,
    report: &mut GateReport,
) -> String {
    let uri: hyper::Uri = match url.parse() {
        Ok(uri) => uri,
        Err(err) => return format!("invalid health URL {url}: {err}"),
    };
    // No connection reuse: every probe opens a connection, as a new visitor would.
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http::<Empty<Bytes>>();
    let restarts_before = match docker.inspect_container(name, None).await {
        Ok(inspect) => inspect.restart_count.unwrap_or(0),
        Err(err) => return format!("inspecting container {name} failed: {err}"),
    };
    let deadline = started + settings.deadline;
    let mut last_outcome = String::new();
    loop {
        if let Some(failure) = container_failure(docker, name, restarts_before).await {
            return failure;
        }
        let probe_started = Instant::now();
        let timeout = settings
            .timeout
            .min(deadline.saturating_duration_since(probe_started));
        let (healthy, outcome) =
            match probe(&client, &uri, timeout.max(Duration::from_millis(10))).await {
                Probe::Healthy(outcome) => (true, outcome),
                Probe::Unhealthy(outcome) => (false, outcome),
            };
        report.probes += 1;
        *report.outcomes.entry(outcome.clone()).or_default() += 1;
        if outcome != last_outcome {
            let at_ms = started.elapsed().as_millis() as u64;
            report.transitions.push(Transition {
                at_ms,
                outcome: outcome.clone(),
            });
            events
                .send(
                    Level::Info,
                    format!("Health probe: {outcome} at {:.1} s", at_ms as f64 / 1000.0),
                    None,
                )
                .await;
            last_outcome = outcome.clone();
        }
        if healthy {
            return "healthy".to_string();
        }
        let now = Instant::now();
        if now >= deadline {
            return format!(
                "no healthy response from {url} within {:.1} s; last probe: {outcome}",
                settings.deadline.as_secs_f64()
            );
        }
        let next = (probe_started + settings.interval).min(deadline);
        tokio::select! {
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = cancel.cancelled() => return "cancelled".to_string(),
        }
    }
}
