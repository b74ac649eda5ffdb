//! LISTEN/NOTIFY wake-ups for the claim loop.
//!
//! A trigger on ops.runs sends `ops_run_queued` with the environment id whenever a run
//! becomes claimable. The listener holds its own connection (LISTEN is per session, so a
//! pooled connection will not do) and wakes the claim loop for environments this agent
//! serves. If the connection drops, it reconnects with backoff and wakes the loop once it
//! listens again, since runs queued in between sent their notifications to nobody. The
//! claim loop also polls on a timer, so a dead listener slows the agent down but never
//! stalls it.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, Notify};
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use crate::config::DatabaseSettings;
use crate::db;
use crate::queue::db_error_text;

pub const CHANNEL: &str = "ops_run_queued";
/// application_name of the listener's session, so operators (and tests) can find it.
pub const APPLICATION_NAME: &str = "odooops-agent-listener";

const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A half-open TCP connection delivers nothing and reports no error; a periodic query
/// finds it.
const PING_INTERVAL: Duration = Duration::from_secs(30);

/// Listens until `shutdown`, waking `wake` for every notification whose environment
/// `serves` accepts.
pub async fn run(
    settings: DatabaseSettings,
    serves: impl Fn(&str) -> bool,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let started = tokio::time::Instant::now();
        let reason = tokio::select! {
            _ = shutdown.cancelled() => return,
            reason = listen_once(&settings, &serves, &wake) => reason,
        };
        // A connection that lived a while starts the backoff over.
        if started.elapsed() > MAX_BACKOFF {
            backoff = Duration::from_millis(250);
        }
        tracing::warn!(
            error = %reason,
            retry_in_ms = backoff.as_millis() as u64,
            "queue listener disconnected; polling continues until it reconnects"
        );
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Listens on one connection until it fails, and returns why.
async fn listen_once(
    settings: &DatabaseSettings,
    serves: &impl Fn(&str) -> bool,
    wake: &Notify,
) -> String {
    let (client, mut connection) = match db::connect(settings, APPLICATION_NAME).await {
        Ok(pair) => pair,
        Err(err) => return format!("connecting failed: {}", db_error_text(&err)),
    };

    let (tx, mut rx) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(note)) => {
                    let _ = tx.send(note.payload().to_string());
                }
                Ok(_) => {}
                Err(err) => return format!("connection failed: {}", db_error_text(&err)),
            }
        }
        "connection closed by the server".to_string()
    });

    let result: Result<(), String> = async {
        client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .map_err(|err| format!("LISTEN failed: {}", db_error_text(&err)))?;
        tracing::debug!("queue listener connected");
        // Runs queued while the listener was not connected notified nobody.
        wake.notify_one();
        let mut ping = tokio::time::interval(PING_INTERVAL);
        ping.tick().await;
        loop {
            tokio::select! {
                note = rx.recv() => match note {
                    Some(env_id) if serves(&env_id) => wake.notify_one(),
                    Some(_) => {}
                    None => return Err("notification stream ended".to_string()),
                },
                _ = ping.tick() => {
                    let query = client.simple_query("SELECT 1");
                    match tokio::time::timeout(settings.connect_timeout, query).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(err)) => {
                            return Err(format!("ping failed: {}", db_error_text(&err)))
                        }
                        Err(_) => return Err("ping timed out".to_string()),
                    }
                }
            }
        }
    }
    .await;

    drop(client);
    let reason = match driver.await {
        Ok(reason) => reason,
        Err(err) => format!("listener task failed: {err}"),
    };
    match result {
        Ok(()) => reason,
        Err(err) => format!("{err}; {reason}"),
    }
}
