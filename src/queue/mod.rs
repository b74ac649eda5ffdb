//! The run queue: claiming, leases, heartbeats and finishing, over the ops.* functions.
//!
//! All queue SQL lives in this module. A claimed run carries a [`Lease`]; every write the
//! agent makes for the run presents the lease token, and the database rejects it with
//! SQLSTATE OPL01 once the lease has expired and the run was taken back. Workflows never
//! see this module directly: they get a `RunContext`.

pub mod listener;

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde_json::Value;
use tokio::time::error::Elapsed;
use tokio::time::{timeout, timeout_at};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;
use uuid::Uuid;

use crate::db::{self, CallError};

/// Maximum wait for the reply to one queue call. A healthy control plane replies within
/// milliseconds, so a call still waiting after this is on a dead connection. That
/// connection is closed, and the next call opens a fresh one.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Proof that this agent owns a run: its id and the token of the current claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub run_id: Uuid,
    pub token: Uuid,
}

impl Lease {
    /// Returns the claim tag of this lease, see [`claim_tag`].
    pub fn tag(&self) -> String {
        claim_tag(self.token)
    }
}

/// Returns a short name for one claim of a run: the first 8 hex digits of the SHA-256 of
/// its lease token. Every claim gets a new token, so the tag distinguishes two claims
/// with the same attempt number, as when a handed-back run is claimed again
/// (ops.release_run gives the attempt back). Unlike the token, the tag may appear in
/// object keys, database names and labels, because it cannot be turned back into it.
pub fn claim_tag(lease_token: Uuid) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(lease_token.as_bytes())[..4])
}

/// A run this agent claimed.
#[derive(Debug, Clone)]
pub struct ClaimedRun {
    pub run_id: Uuid,
    pub project_id: String,
    pub env_id: String,
    pub workflow: String,
    pub git_sha: Option<String>,
    pub git_ref: Option<String>,
    pub metadata: Value,
    pub attempt: i32,
    pub max_attempts: i32,
    pub created_at: DateTime<Utc>,
    pub lease: Lease,
}

impl ClaimedRun {
    fn from_row(row: &Row) -> Result<ClaimedRun, tokio_postgres::Error> {
        let run_id = row.try_get("run_id")?;
        Ok(ClaimedRun {
            run_id,
            project_id: row.try_get("project_id")?,
            env_id: row.try_get("env_id")?,
            workflow: row.try_get("workflow")?,
            git_sha: row.try_get("git_sha")?,
            git_ref: row.try_get("git_ref")?,
            metadata: row.try_get("metadata")?,
            attempt: row.try_get("attempt")?,
            max_attempts: row.try_get("max_attempts")?,
            created_at: row.try_get("created_at")?,
            lease: Lease {
                run_id,
                token: row.try_get("lease_token")?,
            },
        })
    }
}

/// Final status of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalStatus {
    Success,
    Failed,
    Cancelled,
}

impl FinalStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            FinalStatus::Success => "success",
            FinalStatus::Failed => "failed",
            FinalStatus::Cancelled => "cancelled",
        }
    }
}

/// Failure of a queue call, classified by what the caller should do next.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The lease expired and the run was taken back: stop working on it, write nothing.
    #[error("lease on run {run_id} is no longer held by this agent")]
    LeaseLost { run_id: Uuid },
    /// The database could not be reached, refused the connection, or the connection broke:
    /// back off and retry.
    #[error("control plane database unavailable: {0}")]
    Unavailable(String),
    /// The database rejected the call: retrying the same call will not help.
    #[error("control plane rejected the call: {0}")]
    Rejected(String),
}

impl QueueError {
    fn from_pg(err: tokio_postgres::Error, run_id: Option<Uuid>) -> QueueError {
        match (db::sqlstate(&err), run_id) {
            (Some(db::LEASE_LOST), Some(run_id)) => QueueError::LeaseLost { run_id },
            _ if db::is_transient(&err) => QueueError::Unavailable(db_error_text(&err)),
            _ => QueueError::Rejected(db_error_text(&err)),
        }
    }

    /// Classifies a failure to get a pooled connection as an outage. The statement never
    /// reached the server, so a server error such as 3D000 (the database does not exist)
    /// or 28P01 (password authentication failed) does not mean the call is invalid. The
    /// call may succeed once an operator fixes the database or the login.
    fn from_pool(err: deadpool_postgres::PoolError) -> QueueError {
        QueueError::Unavailable(pool_error_text(&err))
    }

    pub fn is_unavailable(&self) -> bool {
        matches!(self, QueueError::Unavailable(_))
    }
}

/// Describes a database error with what tokio-postgres' Display omits: the server's
/// message and SQLSTATE, or the chain of causes, such as "Connection refused".
pub fn db_error_text(err: &tokio_postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        return format!("{} (SQLSTATE {})", db.message(), db.code().code());
    }
    let mut text = err.to_string();
    let mut cause = std::error::Error::source(err);
    while let Some(source) = cause {
        text.push_str(": ");
        text.push_str(&source.to_string());
        cause = source.source();
    }
    text
}

/// Describes a failure to get a pooled connection, with the server's message and SQLSTATE
/// when connecting failed.
pub fn pool_error_text(err: &deadpool_postgres::PoolError) -> String {
    match err {
        deadpool_postgres::PoolError::Backend(err) => {
            format!("connecting failed: {}", db_error_text(err))
        }
        deadpool_postgres::PoolError::Timeout(kind) => {
            let operation = match kind {
                deadpool_postgres::TimeoutType::Wait => "waiting for a free connection",
                deadpool_postgres::TimeoutType::Create => "connecting to the database",
                deadpool_postgres::TimeoutType::Recycle => "checking an idle connection",
            };
            format!("{operation} timed out (database.connect_timeout_secs)")
        }
        other => other.to_string(),
    }
}

/// A run whose lease expired, as reported by the reaper.
#[derive(Debug, Clone)]
pub struct ReapedRun {
    pub run_id: Uuid,
    pub worker_id: Option<String>,
    /// "requeued", "failed" or "cancelled".
    pub action: String,
}

/// The status of a run and the tag of its current claim while it runs. Compared with the
/// run id and claim tag that a test container or test database carries, it shows whether
/// that resource is a leftover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunState {
    pub status: String,
    /// [`claim_tag`] of the current lease; `None` unless the run is 'running'.
    pub claim_tag: Option<String>,
}

/// Claim scope of an agent: the runs it may claim and the lease length.
#[derive(Debug, Clone)]
pub struct ClaimFilter {
    pub worker_id: String,
    /// `None` claims in every environment.
    pub env_ids: Option<Vec<String>>,
    pub workflows: Option<Vec<String>>,
    pub lease: Duration,
}

/// The agent's handle on the control plane's queue.
#[derive(Clone)]
pub struct Queue {
    pool: Pool,
    filter: ClaimFilter,
}

impl Queue {
    pub fn new(pool: Pool, filter: ClaimFilter) -> Queue {
        Queue { pool, filter }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn worker_id(&self) -> &str {
        &self.filter.worker_id
    }

    pub fn filter(&self) -> &ClaimFilter {
        &self.filter
    }

    fn lease_secs(&self) -> i32 {
        self.filter.lease.as_secs().min(i32::MAX as u64) as i32
    }

    /// Returns whether this agent serves an environment, for filtering notifications.
    pub fn serves_env(&self, env_id: &str) -> bool {
        match &self.filter.env_ids {
            None => true,
            Some(ids) => ids.iter().any(|id| id == env_id),
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, QueueError> {
        self.pool.get().await.map_err(QueueError::from_pool)
    }

    /// Maps the outcome of a call raced against `limit`. `run_id` turns SQLSTATE OPL01
    /// into [`QueueError::LeaseLost`] for that run.
    fn answer<T>(
        client: deadpool_postgres::Object,
        outcome: Result<Result<T, tokio_postgres::Error>, Elapsed>,
        limit: Duration,
        run_id: Option<Uuid>,
    ) -> Result<T, QueueError> {
        db::check_answer(client, outcome, limit).map_err(|err| match err {
            CallError::Database(err) => QueueError::from_pg(err, run_id),
            CallError::TimedOut(limit) => QueueError::Unavailable(format!(
                "no reply within {} s; the connection was closed",
                limit.as_secs()
            )),
        })
    }

    /// Claims the oldest claimable run, if any. See ops.claim_next_run for how long its
    /// row lock lives and what happens to the run if this agent dies.
    pub async fn claim(&self) -> Result<Option<ClaimedRun>, QueueError> {
        let filter = &self.filter;
        self.claim_in(filter.env_ids.as_deref(), filter.workflows.as_deref())
            .await
    }

    /// Claims like [`Queue::claim`], in a narrower scope: `env_ids` and `workflows` replace
    /// the filter's lists (`None` is every environment or workflow). ops.claim_next_run
    /// also claims runs of workflows that ops.workflows does not list, whatever the scope.
    pub async fn claim_in(
        &self,
        env_ids: Option<&[String]>,
        workflows: Option<&[String]>,
    ) -> Result<Option<ClaimedRun>, QueueError> {
        let client = self.client().await?;
        let outcome = timeout(CALL_TIMEOUT, async {
            let statement = client
                .prepare_cached("SELECT * FROM ops.claim_next_run($1, $2, $3, $4)")
                .await?;
            let params: [&(dyn ToSql + Sync); 4] = [
                &self.filter.worker_id,
                &env_ids,
                &workflows,
                &self.lease_secs(),
            ];
            client.query_opt(&statement, &params).await
        })
        .await;
        let row = Queue::answer(client, outcome, CALL_TIMEOUT, None)?;
        row.map(|row| ClaimedRun::from_row(&row))
            .transpose()
            .map_err(|err| QueueError::Rejected(format!("unexpected claim row: {err}")))
    }

    /// Renews the lease. Returns whether cancellation of the run was requested.
    pub async fn heartbeat(&self, lease: Lease) -> Result<bool, QueueError> {
        self.heartbeat_within(lease, CALL_TIMEOUT).await
    }

    /// Renews the lease, giving up after `limit` (at most [`CALL_TIMEOUT`]), for callers
    /// whose lease runs out sooner.
    pub async fn heartbeat_within(
        &self,
        lease: Lease,
        limit: Duration,
    ) -> Result<bool, QueueError> {
        let limit = limit.min(CALL_TIMEOUT);
        let deadline = tokio::time::Instant::now() + limit;
        let client = timeout_at(deadline, self.client()).await.map_err(|_| {
            QueueError::Unavailable(format!(
                "no pooled connection within {} ms",
                limit.as_millis()
            ))
        })??;
        let outcome = timeout_at(deadline, async {
            let statement = client
                .prepare_cached("SELECT ops.heartbeat_run($1, $2, $3)")
                .await?;
            client
                .query_one(
                    &statement,
                    &[&lease.run_id, &lease.token, &self.lease_secs()],
                )
                .await
        })
        .await;
        let row = Queue::answer(client, outcome, limit, Some(lease.run_id))?;
        Ok(row.get(0))
    }

    /// Finishes the run and merges `metadata` into its metadata.
    pub async fn finish(
        &self,
        lease: Lease,
        status: FinalStatus,
        metadata: &Value,
    ) -> Result<(), QueueError> {
        let client = self.client().await?;
        let outcome = timeout(CALL_TIMEOUT, async {
            let statement = client
                .prepare_cached("SELECT 1 FROM ops.finish_run($1, $2, $3, $4)")
                .await?;
            let params: [&(dyn ToSql + Sync); 4] =
                [&lease.run_id, &status.as_str(), metadata, &lease.token];
            client.execute(&statement, &params).await
        })
        .await;
        Queue::answer(client, outcome, CALL_TIMEOUT, Some(lease.run_id))?;
        Ok(())
    }

    /// Hands the run back to the queue without using up an attempt.
    pub async fn release(&self, lease: Lease, reason: &str) -> Result<(), QueueError> {
        let client = self.client().await?;
        let outcome = timeout(
            CALL_TIMEOUT,
            client.execute(
                "SELECT ops.release_run($1, $2, $3)",
                &[&lease.run_id, &lease.token, &reason],
            ),
        )
        .await;
        Queue::answer(client, outcome, CALL_TIMEOUT, Some(lease.run_id))?;
        Ok(())
    }

    /// Takes back runs whose leases expired, from any agent.
    pub async fn reap_expired(&self) -> Result<Vec<ReapedRun>, QueueError> {
        let client = self.client().await?;
        let query = client.query("SELECT * FROM ops.reap_expired_runs()", &[]);
        let outcome = timeout(CALL_TIMEOUT, query).await;
        let rows = Queue::answer(client, outcome, CALL_TIMEOUT, None)?;
        Ok(rows
            .iter()
            .map(|row| ReapedRun {
                run_id: row.get("run_id"),
                worker_id: row.get("worker_id"),
                action: row.get("action"),
            })
            .collect())
    }

    /// Returns the ids of every environment in ops.environments.
    pub async fn environment_ids(&self) -> Result<Vec<String>, QueueError> {
        let client = self.client().await?;
        let query = client.query("SELECT env_id FROM ops.environments ORDER BY env_id", &[]);
        let outcome = timeout(CALL_TIMEOUT, query).await;
        let rows = Queue::answer(client, outcome, CALL_TIMEOUT, None)?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    /// Returns the state of each run in `run_ids` that ops.runs has. Ids it does not have
    /// are missing from the map.
    pub async fn run_states(
        &self,
        run_ids: &[Uuid],
    ) -> Result<HashMap<Uuid, RunState>, QueueError> {
        let client = self.client().await?;
        let sql = "SELECT run_id, status, lease_token FROM ops.runs WHERE run_id = ANY($1)";
        let outcome = timeout(CALL_TIMEOUT, client.query(sql, &[&run_ids])).await;
        let rows = Queue::answer(client, outcome, CALL_TIMEOUT, None)?;
        let states = rows.iter().map(|row| {
            let status: String = row.get("status");
            let token: Option<Uuid> = row.get("lease_token");
            let claim_tag = token.filter(|_| status == "running").map(claim_tag);
            (row.get("run_id"), RunState { status, claim_tag })
        });
        Ok(states.collect())
    }

    /// Records an artifact of a run this agent holds.
    pub async fn add_artifact(&self, lease: Lease, artifact: &Artifact) -> Result<(), QueueError> {
        let client = self.client().await?;
        let params: [&(dyn ToSql + Sync); 7] = [
            &lease.run_id,
            &artifact.artifact_type,
            &artifact.storage_path,
            &artifact.digest,
            &artifact.size_bytes,
            &artifact.metadata,
            &lease.token,
        ];
        let insert = client.execute(
            "SELECT 1 FROM ops.add_artifact($1, $2, $3, $4, $5, $6, $7)",
            &params,
        );
        let outcome = timeout(CALL_TIMEOUT, insert).await;
        Queue::answer(client, outcome, CALL_TIMEOUT, Some(lease.run_id))?;
        Ok(())
    }
}

/// A row for ops.artifacts.
#[derive(Debug, Clone)]
pub struct Artifact {
    /// One of image, sbom, logs, evidence, manifest.
    pub artifact_type: String,
    pub storage_path: String,
    pub digest: Option<String>,
    pub size_bytes: Option<i64>,
    pub metadata: Value,
}
