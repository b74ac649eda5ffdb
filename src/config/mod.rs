//! The agent's configuration: TOML parsed into plain structs, then validated into
//! [`Settings`].
//!
//! Every key is optional and has a named default below with the reason for its value;
//! config.example.toml documents the same keys. A bad value is reported with its key and
//! the value itself (secrets excepted), and the CLI exits with status 64.

pub mod backup;
mod build;
mod deploy;
mod raw;
mod registry;
pub mod storage;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::secret::{Secret, SecretError, SecretSource};
pub use backup::BackupSettings;
pub use build::{BuildSettings, CommandLine, TestDatabaseSettings, DEFAULT_TEST_COMMAND};
pub use deploy::{DeploySettings, RegistryCredentials};
pub use raw::{is_log_filter, RawConfig};
pub use registry::{is_path_component, is_registry_host, RegistrySettings};
pub use storage::{StorageBackend, StorageSettings};

/// Environment variable that overrides `database.url` for every subcommand.
pub const DATABASE_URL_ENV: &str = "ODOOOPS_DATABASE_URL";

/// One run at a time: an Odoo build or deploy already uses both cores of a small droplet.
pub const DEFAULT_CONCURRENCY: usize = 1;
/// Polling only backs up LISTEN/NOTIFY, which wakes the agent within milliseconds.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// A run whose agent falls silent is taken back after at most lease + reap interval.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Three heartbeats per lease, so one lost heartbeat never costs the lease.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// How often this agent looks for other agents' expired leases.
pub const DEFAULT_REAP_INTERVAL: Duration = Duration::from_secs(5);
/// Long enough for a deploy's health gate to finish after SIGTERM; the systemd unit's
/// TimeoutStopSec must stay above it.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(120);
/// Sources, build contexts and scratch files live under the state directory.
pub const DEFAULT_WORK_DIR: &str = "/var/lib/odooops/work";
/// Enough connections for the claim loop, heartbeats, event writers and one workflow.
pub const DEFAULT_POOL_SIZE: usize = 8;
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Builds stream for many minutes through one request, so the Docker client's
/// per-request timeout must be generous.
pub const DEFAULT_DOCKER_TIMEOUT: Duration = Duration::from_secs(3600);
/// While the engine is down, runs that need it wait in the queue. A ping every 5 s lets
/// them start within seconds of the engine's return, for one cheap request.
pub const DEFAULT_DOCKER_PING_INTERVAL: Duration = Duration::from_secs(5);

/// Workflows the agent implements; `agent.workflows` may narrow them.
pub const KNOWN_WORKFLOWS: &[&str] = &[
    "build",
    "deploy",
    "promote",
    "rollback",
    "backup",
    "restore",
    "restore_drill",
];

/// A config problem, naming the key and the bad value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path:?} failed: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path:?} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid value for {key}: {value} ({reason})")]
    Invalid {
        key: String,
        value: String,
        reason: String,
    },
    #[error("missing value for {key}: {reason}")]
    Missing { key: String, reason: String },
    #[error(transparent)]
    Secret(#[from] SecretError),
}

impl ConfigError {
    pub fn invalid(key: &str, value: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// Validated settings for the whole agent.
#[derive(Debug, Clone)]
pub struct Settings {
    pub agent: AgentSettings,
    pub database: DatabaseSettings,
    pub docker: DockerSettings,
    pub log: LogSettings,
    pub storage: StorageSettings,
    pub build: BuildSettings,
    /// `None` when no `[registry]` section is configured.
    pub registry: Option<RegistrySettings>,
    pub deploy: DeploySettings,
    pub backup: BackupSettings,
}

#[derive(Debug, Clone)]
pub struct AgentSettings {
    pub worker_id: String,
    /// Environment ids this agent serves; empty means every environment.
    pub environments: Vec<String>,
    pub workflows: Vec<String>,
    pub concurrency: usize,
    pub poll_interval: Duration,
    pub lease: Duration,
    pub heartbeat_interval: Duration,
    pub reap_interval: Duration,
    pub shutdown_grace: Duration,
    pub work_dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    pub url: Secret,
    pub pool_size: usize,
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct DockerSettings {
    /// Engine address such as unix:///var/run/docker.sock; `None` uses DOCKER_HOST or
    /// the default socket.
    pub host: Option<String>,
    pub timeout: Duration,
    /// How often the agent checks that the engine replies.
    pub ping_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub format: LogFormat,
    /// tracing filter directives; RUST_LOG overrides them.
    pub filter: String,
}

impl Settings {
    /// Reads and validates a config file, applying ODOOOPS_DATABASE_URL.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Settings::from_toml(&text, path)
    }

    /// Parses config text; `path` only labels errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Settings, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|err| ConfigError::Parse {
            path: path.to_path_buf(),
            message: parse_error_message(text, &err),
        })?;
        raw.validate()
    }
}

/// Words in a config line that mark its value as a secret.
const SECRET_MARKERS: &[&str] = &["password", "secret", "url", "token", "key"];

/// Describes a TOML error by line, column and reason, without the file's text: the
/// offending line may hold a secret. When it does, the reason (which can quote the
/// value) is left out too.
fn parse_error_message(text: &str, err: &toml::de::Error) -> String {
    let Some(span) = err.span() else {
        return err.message().to_string();
    };
    let before = &text[..span.start.min(text.len())];
    let line_number = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    let line = text
        .lines()
        .nth(line_number - 1)
        .unwrap_or("")
        .to_ascii_lowercase();
    if SECRET_MARKERS.iter().any(|marker| line.contains(marker)) {
        format!(
            "line {line_number}, column {column}: invalid entry (not shown because the line \
             may hold a secret; check its key, quoting and type)"
        )
    } else {
        format!("line {line_number}, column {column}: {}", err.message())
    }
}

/// Converts a whole number of seconds from the config into a duration within bounds.
pub(crate) fn seconds(key: &str, value: u64, min: u64, max: u64) -> Result<Duration, ConfigError> {
    if value < min || value > max {
        return Err(ConfigError::invalid(
            key,
            value,
            format!("must be between {min} and {max} seconds"),
        ));
    }
    Ok(Duration::from_secs(value))
}

pub(crate) fn secret(
    key: &str,
    value: &Option<String>,
    env: &Option<String>,
    file: &Option<String>,
) -> Result<Option<Secret>, ConfigError> {
    let source = SecretSource {
        value: value.clone(),
        env: env.clone(),
        file: file.clone(),
    };
    Ok(source.resolve(key)?)
}

/// Returns this machine's host name, the default worker id.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "odooops-agent".to_string())
}

#[cfg(test)]
mod tests;
