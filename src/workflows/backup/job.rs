//! One backup from start to recorded result, usable from a run or from the CLI.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use deadpool_postgres::Pool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::manifest;
use super::pg::validate_db_name;
use super::process::PgRunner;
use super::records::{self, BackupRecord, EnvironmentRow, Stored};
use super::stream::{self, ArchiveInput, ArchiveSummary, PartSink, Progress};
use crate::config::backup::{EnvBackupSettings, PgTools};
use crate::config::Settings;
use crate::events::EventSink;
use crate::storage::{ObjectStore, StorageError, StoredObject, Stores};
use crate::workflows::RunContext;

/// How often a running backup reports its progress.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(15);

/// Destination of progress messages: the run's events, or stdout for a command.
#[derive(Clone)]
pub enum Reporter {
    Events(EventSink),
    Stdout,
}

impl Reporter {
    pub async fn info(&self, message: impl Into<String>) {
        let message = message.into();
        match self {
            Reporter::Events(events) => events.info(message).await,
            Reporter::Stdout => println!("{message}"),
        }
    }

    pub async fn warn(&self, message: impl Into<String>) {
        let message = message.into();
        match self {
            Reporter::Events(events) => events.warn(message).await,
            Reporter::Stdout => println!("warning: {message}"),
        }
    }
}

/// Context of a backup or restore: database pool, settings, reporter, cancellation.
#[derive(Clone)]
pub struct Job {
    pub pool: Pool,
    pub settings: Arc<Settings>,
    pub reporter: Reporter,
    pub cancel: CancellationToken,
    pub run_id: Option<Uuid>,
}

impl Job {
    pub fn for_run(ctx: &RunContext) -> Job {
        Job {
            pool: ctx.pool().clone(),
            settings: ctx.settings.clone(),
            reporter: Reporter::Events(ctx.events.clone()),
            cancel: ctx.cancel.clone(),
            run_id: Some(ctx.run.run_id),
        }
    }

    /// Builds the pg_dump/psql runner for an environment, connecting to Docker when its
    /// tools run in a container.
    pub async fn pg_runner(&self, env_id: &str) -> anyhow::Result<PgRunner> {
        let env_settings = self.settings.backup.for_env(env_id);
        let docker = match env_settings.pg.tools {
            PgTools::Docker { .. } => Some(crate::docker::connect(&self.settings.docker).await?),
            PgTools::Host { .. } => None,
        };
        Ok(PgRunner::new(env_settings.pg.clone(), docker))
    }

    /// Runs backup `backup_id` of `env` and records its outcome in ops.backups.
    pub async fn backup(
        &self,
        env: &EnvironmentRow,
        backup_id: Uuid,
        backup_type: &str,
    ) -> anyhow::Result<BackupRecord> {
        records::start(&self.pool, backup_id, self.run_id).await?;
        let started = Instant::now();
        tracing::info!(backup.id = %backup_id, env.id = %env.env_id, "backup started");
        self.reporter
            .info(format!(
                "Backing up database {} of {} ({backup_type})",
                env.db_name, env.env_id
            ))
            .await;
        let outcome = self.stream_backup(env, backup_id, backup_type).await;

        let elapsed = started.elapsed().as_secs_f64();
        let (object, summary) = match outcome {
            Ok(done) => done,
            Err(err) => {
                let message = format!("{err:#}");
                tracing::warn!(backup.id = %backup_id, error = %message, "backup failed");
                if let Err(record_err) = records::fail(&self.pool, backup_id, &message).await {
                    tracing::error!(backup.id = %backup_id, error = %format!("{record_err:#}"), "recording the failure failed");
                }
                return Err(err);
            }
        };

        let retention = &self.settings.backup.for_env(&env.env_id).retention;
        let keep_for = match backup_type {
            "manual" => Some(retention.manual),
            "pre_deploy" => Some(retention.pre_deploy),
            _ => None,
        };
        let expires_at = keep_for.map(|duration| Utc::now() + duration);
        let record = records::succeed(
            &self.pool,
            backup_id,
            Stored {
                location: &object.location,
                size_bytes: object.size_bytes,
                sha256: &summary.sha256,
                manifest: &summary.manifest,
                expires_at,
            },
        )
        .await?;
        tracing::info!(backup.id = %backup_id, size_bytes = object.size_bytes, elapsed_s = elapsed, "backup finished");
        self.reporter
            .info(format!(
                "Backup {backup_id} stored at {} ({}, sha256 {}) in {elapsed:.1} s",
                object.location,
                human_bytes(object.size_bytes),
                &summary.sha256[..16]
            ))
            .await;
        Ok(record)
    }

    async fn stream_backup(
        &self,
        env: &EnvironmentRow,
        backup_id: Uuid,
        backup_type: &str,
    ) -> anyhow::Result<(StoredObject, ArchiveSummary)> {
        validate_db_name(&env.db_name)?;
        let env_settings = self.settings.backup.for_env(&env.env_id);
        let pg = self.pg_runner(&env.env_id).await?;
        let (dump_major, server_major) = pg.check_dump_version().await?;
        self.reporter
            .info(format!(
                "pg_dump {dump_major} on {} for PostgreSQL {server_major}",
                pg.describe()
            ))
            .await;
        let manifest =
            manifest::start_manifest(&pg, env, backup_id, backup_type, dump_major).await?;
        let filestore = self.filestore_dir(env_settings, &env.db_name).await;

        let stores = Stores::from_settings(&self.settings.storage);
        let store = stores.default.clone();
        let key = object_key(env, backup_id);
        self.abort_stale_uploads(store.as_ref(), env, backup_id)
            .await;
        let progress = Arc::new(Progress::default());
        let upload_cancel = self.cancel.child_token();

        let dump = pg.start_dump(&env.db_name).await?;
        let (dump_tx, dump_rx) = mpsc::channel(16);
        let (part_tx, part_rx) = mpsc::channel(1);
        let reader = tokio::spawn(stream::read_dump(dump, dump_tx));
        let input = ArchiveInput {
            filestore,
            compression_level: self.settings.backup.compression_level,
            manifest,
            progress: progress.clone(),
        };
        let sink = PartSink::new(part_tx, store.clone(), progress.clone());
        let archive =
            tokio::task::spawn_blocking(move || stream::write_archive(input, dump_rx, sink));
        let upload = store.put_stream(&key, part_rx, upload_cancel.clone());
        let reporting = self.report_progress(progress.clone());

        let (uploaded, archived) = tokio::select! {
            outcome = async { tokio::join!(upload, archive) } => outcome,
            _ = reporting => unreachable!("progress reporting never ends"),
        };
        progress.stop.store(true, Ordering::Relaxed);
        reader.abort();
        let archived = archived.context("the archive thread panicked")?;
        let object = pick_error(uploaded, &archived)?;
        let summary = archived?;
        if object.size_bytes != summary.size_bytes {
            anyhow::bail!(
                "the store received {} bytes of a {}-byte archive",
                object.size_bytes,
                summary.size_bytes
            );
        }
        Ok((object, summary))
    }

    /// Aborts the multipart uploads that an earlier attempt of this backup left in the
    /// store, for example when the agent was killed mid-upload. Every attempt writes a new
    /// key, but all of them contain the backup id. A failure is only reported, because
    /// it does not keep this attempt from storing the backup.
    async fn abort_stale_uploads(
        &self,
        store: &dyn ObjectStore,
        env: &EnvironmentRow,
        backup_id: Uuid,
    ) {
        let marker = backup_id.simple().to_string();
        match store
            .abort_stale_uploads(&object_key_prefix(env), &marker)
            .await
        {
            Ok(aborted) if aborted.is_empty() => {}
            Ok(aborted) => {
                self.reporter
                    .info(format!(
                        "Aborted {} multipart uploads left by an earlier attempt: {}",
                        aborted.len(),
                        aborted.join(", ")
                    ))
                    .await
            }
            Err(err) => {
                tracing::warn!(
                    backup.id = %backup_id,
                    error = %err,
                    "aborting stale uploads failed"
                );
                self.reporter
                    .warn(format!(
                        "Aborting multipart uploads left by an earlier attempt failed: {err}"
                    ))
                    .await
            }
        }
    }

    /// Returns the environment's filestore directory, or `None` (with a warning) when it
    /// does not exist.
    async fn filestore_dir(
        &self,
        env_settings: &EnvBackupSettings,
        db_name: &str,
    ) -> Option<std::path::PathBuf> {
        let dir = env_settings.data_dir.join("filestore").join(db_name);
        if tokio::fs::metadata(&dir)
            .await
            .map(|m| m.is_dir())
            .unwrap_or(false)
        {
            return Some(dir);
        }
        self.reporter
            .warn(format!(
                "Filestore {} does not exist; the backup holds the database only",
                dir.display()
            ))
            .await;
        None
    }

    /// Sends a progress message every [`PROGRESS_INTERVAL`]; never returns. Stops the
    /// archive thread when the job is cancelled.
    async fn report_progress(&self, progress: Arc<Progress>) {
        let mut ticker = tokio::time::interval(PROGRESS_INTERVAL);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = self.cancel.cancelled() => {
                    progress.stop.store(true, Ordering::Relaxed);
                    std::future::pending::<()>().await;
                }
            }
            self.reporter
                .info(format!(
                    "Progress: {} of dump read, {} filestore files, {} written",
                    human_bytes(progress.dump_bytes.load(Ordering::Relaxed)),
                    progress.files.load(Ordering::Relaxed),
                    human_bytes(progress.archive_bytes.load(Ordering::Relaxed)),
                ))
                .await;
        }
    }
}

/// Picks the error that explains a failed backup. An upload that stopped because the archive
/// stopped reports the archive's error (pg_dump failing, a filestore file unreadable);
/// an archive that stopped because the upload failed reports the upload's error.
fn pick_error(
    uploaded: Result<StoredObject, StorageError>,
    archived: &anyhow::Result<ArchiveSummary>,
) -> anyhow::Result<StoredObject> {
    match (uploaded, archived) {
        (Ok(object), Ok(_)) => Ok(object),
        (Err(StorageError::Incomplete { .. }), Err(err)) => Err(anyhow::anyhow!("{err:#}")),
        (Err(upload), _) => Err(upload.into()),
        (Ok(_), Err(err)) => Err(anyhow::anyhow!("{err:#}")),
    }
}

/// Object key of a backup: `<project>/<env>/<db>-<UTC time>-<backup id>.zip`.
pub fn object_key(env: &EnvironmentRow, backup_id: Uuid) -> String {
    format!(
        "{}{}-{}.zip",
        object_key_prefix(env),
        Utc::now().format("%Y%m%dT%H%M%SZ"),
        backup_id.simple()
    )
}

/// Start of every backup key of the environment's database: `<project>/<env>/<db>-`.
pub fn object_key_prefix(env: &EnvironmentRow) -> String {
    format!("{}/{}/{}-", env.project_id, env.env_id, env.db_name)
}

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
