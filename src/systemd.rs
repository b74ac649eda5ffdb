//! systemd integration: readiness, stopping and watchdog notifications.
//!
//! Outside systemd (no NOTIFY_SOCKET) every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

pub fn notify_ready() {
    send(&[NotifyState::Ready, NotifyState::Status("claiming runs")]);
}

pub fn notify_stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("draining runs")]);
}

/// Sets the status line that `systemctl status` shows.
pub fn notify_status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

fn send(states: &[NotifyState]) {
    if let Err(err) = sd_notify::notify(false, states) {
        tracing::warn!(error = %err, "notifying systemd failed");
    }
}

/// Pings systemd's watchdog at half its interval until `stop`. The ping comes from a task
/// on the same runtime as the claim loop, so a runtime that stops scheduling tasks (a
/// blocked worker thread, a deadlock) stops the pings and systemd restarts the agent.
pub async fn watchdog(stop: CancellationToken) {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let interval = Duration::from_micros(usec) / 2;
    tracing::debug!(
        interval_ms = interval.as_millis() as u64,
        "systemd watchdog enabled"
    );
    loop {
        send(&[NotifyState::Watchdog]);
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.cancelled() => return,
        }
    }
}
