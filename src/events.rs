//! Run events: the log lines and milestones a run writes to ops.run_events.
//!
//! Workflows send events to an [`EventSink`]; one writer task per run collects whatever
//! has arrived since its last write into a batch and stores it with one call to
//! ops.append_events, so a build printing hundreds of thousands of lines costs a few
//! hundred round trips, not one per line. The channel between them is bounded: when the
//! database is slow or briefly unreachable, senders wait instead of memory growing, and
//! the writer retries the same batch (with the same batch id, so it is stored once) until
//! the database returns or the lease is lost. The lease counts as lost when the database
//! reports it lost, or when it runs out without renewal while the database is unavailable,
//! because no later write of this agent can be accepted for the run.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::{self, CallError};
use crate::queue::{db_error_text, pool_error_text, Lease, CALL_TIMEOUT};

/// Events waiting for the writer. With lines of typical build output (under 200 bytes)
/// this bounds the queue to a few megabytes.
pub const CHANNEL_CAPACITY: usize = 16_384;
/// Largest batch in one statement; bigger batches gain little and hold the run's row lock
/// longer.
pub const MAX_BATCH: usize = 8_192;
/// Maximum message length in bytes. A longer line is cut, and the cut is marked.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;

const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

/// One row for ops.run_events, before the database gives it its seq.
#[derive(Debug, Clone)]
pub struct Event {
    pub level: Level,
    pub message: String,
    pub payload: Option<Value>,
    pub created_at: DateTime<Utc>,
}

enum Message {
    Event(Event),
    /// Acknowledged once every event sent before it is stored.
    Flush(oneshot::Sender<()>),
}

/// Sender of a run's events. Cloning it gives another sender to the same writer, and
/// the writer task ends when the last clone is dropped.
#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::Sender<Message>,
    state: Arc<SinkState>,
}

#[derive(Default)]
struct SinkState {
    lease_lost: AtomicBool,
    written: AtomicU64,
}

/// Result of [`EventSink::flush`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushOutcome {
    /// Every event sent before the flush is stored (or was reported as rejected).
    Flushed { written: u64 },
    /// The lease was lost; events from then on were dropped.
    LeaseLost { written: u64 },
}

impl EventSink {
    /// Starts the writer for a run this agent holds. It retries a failed write until the
    /// database accepts it or reports the lease lost.
    pub fn start(pool: Pool, lease: Lease) -> EventSink {
        EventSink::start_with_expiry(pool, lease, CancellationToken::new())
    }

    /// Starts the writer for a run this agent holds, which also stops retrying and drops
    /// its events once `expired` fires. The owner of the lease fires it when the lease ran
    /// out without renewal, so a database that stays away cannot hold the run forever.
    pub fn start_with_expiry(pool: Pool, lease: Lease, expired: CancellationToken) -> EventSink {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let state = Arc::new(SinkState::default());
        let writer = Writer {
            pool,
            lease,
            expired,
        };
        tokio::spawn(writer.run(rx, state.clone()));
        EventSink { tx, state }
    }

    /// Waits until every event sent so far is stored. Call it before finishing the run:
    /// the lease ends with the run, and later events are rejected.
    pub async fn flush(&self) -> FlushOutcome {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Message::Flush(ack)).await.is_ok() {
            // The writer drops the acknowledgement unanswered only when the lease is lost.
            let _ = done.await;
        }
        let written = self.written();
        if self.lease_lost() {
            FlushOutcome::LeaseLost { written }
        } else {
            FlushOutcome::Flushed { written }
        }
    }

    /// Queues an event, waiting while the writer is behind. Events sent after the lease
    /// was lost are dropped: nothing from this agent may reach the run any more.
    pub async fn send(&self, level: Level, message: impl Into<String>, payload: Option<Value>) {
        if self.state.lease_lost.load(Ordering::Relaxed) {
            return;
        }
        let event = Event {
            level,
            message: truncate(message.into()),
            payload: payload.map(sanitize),
            created_at: Utc::now(),
        };
        // Sending fails only after the writer stopped because the lease was lost.
        let _ = self.tx.send(Message::Event(event)).await;
    }

    pub async fn info(&self, message: impl Into<String>) {
        self.send(Level::Info, message, None).await
    }

    pub async fn warn(&self, message: impl Into<String>) {
        self.send(Level::Warn, message, None).await
    }

    pub async fn error(&self, message: impl Into<String>) {
        self.send(Level::Error, message, None).await
    }

    /// Returns whether the writer found the lease gone.
    pub fn lease_lost(&self) -> bool {
        self.state.lease_lost.load(Ordering::Relaxed)
    }

    /// Events stored so far.
    pub fn written(&self) -> u64 {
        self.state.written.load(Ordering::Relaxed)
    }
}

/// Makes a message storable: PostgreSQL text cannot contain NUL, and messages longer than
/// [`MAX_MESSAGE_BYTES`] are cut.
fn truncate(mut message: String) -> String {
    if message.contains('\0') {
        message = message.replace('\0', "\\0");
    }
    if message.len() <= MAX_MESSAGE_BYTES {
        return message;
    }
    let mut cut = MAX_MESSAGE_BYTES;
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let dropped = message.len() - cut;
    message.truncate(cut);
    message.push_str(&format!(" [... {dropped} more bytes]"));
    message
}

/// The task that stores a run's events.
struct Writer {
    pool: Pool,
    lease: Lease,
    /// Fires when the lease ran out without renewal.
    expired: CancellationToken,
}

impl Writer {
    async fn run(self, mut rx: mpsc::Receiver<Message>, state: Arc<SinkState>) {
        let mut inbox = Vec::with_capacity(MAX_BATCH);
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while rx.recv_many(&mut inbox, MAX_BATCH).await > 0 {
            for message in inbox.drain(..) {
                match message {
                    Message::Event(event) => batch.push(event),
                    Message::Flush(ack) => {
                        if !self.store_batch(&mut batch, &state).await {
                            rx.close();
                            return;
                        }
                        let _ = ack.send(());
                    }
                }
            }
            if !self.store_batch(&mut batch, &state).await {
                rx.close();
                return;
            }
        }
    }

    /// Stores and clears `batch`. Returns false when the lease is lost.
    async fn store_batch(&self, batch: &mut Vec<Event>, state: &SinkState) -> bool {
        if batch.is_empty() {
            return true;
        }
        match self.store_with_retry(batch).await {
            Ok(count) => {
                state.written.fetch_add(count, Ordering::Relaxed);
                batch.clear();
                true
            }
            Err(()) => {
                state.lease_lost.store(true, Ordering::Relaxed);
                false
            }
        }
    }

    /// Stores one batch, retrying while the database is unreachable. Returns `Err` only
    /// when the lease is lost. An attempt in flight is not interrupted when the lease runs
    /// out, so giving up can take up to one [`CALL_TIMEOUT`] longer than the lease.
    async fn store_with_retry(&self, batch: &[Event]) -> Result<u64, ()> {
        let lease = self.lease;
        let batch_id = Uuid::new_v4();
        let mut delay = Duration::from_millis(100);
        let mut failures = 0u32;
        loop {
            match store(&self.pool, lease, batch_id, batch).await {
                Ok(_) => {
                    if failures > 0 {
                        tracing::info!(failures, "event writer reconnected; events stored");
                    }
                    // A retried batch reports 0 rows if its first attempt was stored.
                    return Ok(batch.len() as u64);
                }
                Err(StoreError::LeaseLost) => {
                    tracing::warn!(run.id = %lease.run_id, "lease lost; dropping run events");
                    return Err(());
                }
                Err(StoreError::Rejected(reason)) => {
                    // Retrying a batch the server rejects for its content would stall the
                    // run until its lease expired, so the batch is reported and skipped.
                    tracing::error!(
                        run.id = %lease.run_id,
                        error = %reason,
                        dropped = batch.len(),
                        "control plane rejected a batch of run events"
                    );
                    return Ok(0);
                }
                Err(StoreError::Retry(reason)) => {
                    failures += 1;
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::warn!(
                            run.id = %lease.run_id,
                            error = %reason,
                            failures,
                            pending = batch.len(),
                            "storing run events failed; retrying"
                        );
                    }
                    if !self.wait_before_retry(delay, batch.len(), &reason).await {
                        return Err(());
                    }
                    delay = (delay * 2).min(MAX_RETRY_DELAY);
                }
            }
        }
    }

    /// Waits `delay` before the next attempt. Returns false when the lease ran out
    /// meanwhile or before.
    async fn wait_before_retry(&self, delay: Duration, pending: usize, reason: &str) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(delay) => return true,
            _ = self.expired.cancelled() => {}
        }
        tracing::error!(
            run.id = %self.lease.run_id,
            error = %reason,
            dropped = pending,
            "the lease ran out while the control plane was unavailable; dropping run events"
        );
        false
    }
}

enum StoreError {
    LeaseLost,
    Rejected(String),
    Retry(String),
}

async fn store(
    pool: &Pool,
    lease: Lease,
    batch_id: Uuid,
    batch: &[Event],
) -> Result<i32, StoreError> {
    let client = pool
        .get()
        .await
        .map_err(|err| StoreError::Retry(pool_error_text(&err)))?;
    let levels: Vec<&str> = batch.iter().map(|e| e.level.as_str()).collect();
    let messages: Vec<&str> = batch.iter().map(|e| e.message.as_str()).collect();
    let payloads: Vec<Option<&Value>> = batch.iter().map(|e| e.payload.as_ref()).collect();
    let times: Vec<DateTime<Utc>> = batch.iter().map(|e| e.created_at).collect();
    let outcome = tokio::time::timeout(CALL_TIMEOUT, async {
        let statement = client
            .prepare_cached("SELECT ops.append_events($1, $2, $3, $4, $5, $6, $7)")
            .await?;
        client
            .query_one(
                &statement,
                &[
                    &lease.run_id,
                    &lease.token,
                    &batch_id,
                    &levels,
                    &messages,
                    &payloads,
                    &times,
                ],
            )
            .await
    })
    .await;
    match db::check_answer(client, outcome, CALL_TIMEOUT) {
        Ok(row) => Ok(row.get(0)),
        Err(CallError::TimedOut(limit)) => Err(StoreError::Retry(format!(
            "no reply within {} s; the connection was closed",
            limit.as_secs()
        ))),
        Err(CallError::Database(err)) if db::sqlstate(&err) == Some(db::LEASE_LOST) => {
            Err(StoreError::LeaseLost)
        }
        Err(CallError::Database(err)) if db::is_transient(&err) => {
            Err(StoreError::Retry(db_error_text(&err)))
        }
        Err(CallError::Database(err)) => Err(StoreError::Rejected(db_error_text(&err))),
    }
}

/// Makes a payload storable: jsonb rejects the escape \u0000 in strings and keys, so NUL
/// characters are written as the two characters `\0`, as in messages.
fn sanitize(payload: Value) -> Value {
    match payload {
        Value::String(text) if text.contains('\0') => Value::String(text.replace('\0', "\\0")),
        Value::Array(items) => Value::Array(items.into_iter().map(sanitize).collect()),
        Value::Object(fields) => Value::Object(
            fields
                .into_iter()
                .map(|(key, value)| (key.replace('\0', "\\0"), sanitize(value)))
                .collect(),
        ),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_message_is_cut_on_a_char_boundary_and_marked() {
        let message = "é".repeat(MAX_MESSAGE_BYTES);
        let cut = truncate(message);
        assert!(cut.len() < MAX_MESSAGE_BYTES + 40);
        assert!(cut.ends_with("more bytes]"));
    }

    #[test]
    fn nul_bytes_are_escaped() {
        assert_eq!(truncate("a\0b".to_string()), "a\\0b");
    }

    #[test]
    fn nul_in_payload_strings_and_keys_is_escaped() {
        let payload = serde_json::json!({ "a\0": ["x\0y", { "k": "\0" }], "n": 1 });
        let expected = serde_json::json!({ "a\\0": ["x\\0y", { "k": "\\0" }], "n": 1 });
        assert_eq!(sanitize(payload), expected);
    }

    #[test]
    fn short_message_is_kept_whole() {
        assert_eq!(truncate("hello".to_string()), "hello");
    }
}
