//! The config file as written: every key optional, unknown keys rejected.

use std::path::PathBuf;

use serde::Deserialize;

use super::*;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub agent: RawAgent,
    #[serde(default)]
    pub database: RawDatabase,
    #[serde(default)]
    pub docker: RawDocker,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub storage: super::storage::RawStorage,
    #[serde(default)]
    pub build: super::build::RawBuild,
    #[serde(default)]
    pub registry: super::registry::RawRegistry,
    #[serde(default)]
    pub deploy: super::deploy::RawDeploy,
    #[serde(default)]
    pub backup: super::backup::RawBackup,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    pub worker_id: Option<String>,
    pub environments: Option<Vec<String>>,
    pub workflows: Option<Vec<String>>,
    pub concurrency: Option<u64>,
    pub poll_interval_secs: Option<u64>,
    pub lease_secs: Option<u64>,
    pub heartbeat_interval_secs: Option<u64>,
    pub reap_interval_secs: Option<u64>,
    pub shutdown_grace_secs: Option<u64>,
    pub work_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatabase {
    pub url: Option<String>,
    pub url_env: Option<String>,
    pub url_file: Option<String>,
    pub pool_size: Option<u64>,
    pub connect_timeout_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDocker {
    pub host: Option<String>,
    pub timeout_secs: Option<u64>,
    pub ping_interval_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<String>,
    pub level: Option<String>,
}

impl RawConfig {
    /// Validates every section, taking the database URL from ODOOOPS_DATABASE_URL when it
    /// is set.
    pub fn validate(self) -> Result<Settings, ConfigError> {
        let url_override = std::env::var(DATABASE_URL_ENV)
            .ok()
            .filter(|v| !v.is_empty());
        self.validate_with(url_override)
    }

    pub fn validate_with(self, database_url: Option<String>) -> Result<Settings, ConfigError> {
        Ok(Settings {
            agent: self.agent.validate()?,
            database: self.database.validate(database_url)?,
            docker: self.docker.validate()?,
            log: self.log.validate()?,
            storage: self.storage.validate()?,
            build: self.build.validate()?,
            registry: self.registry.validate()?,
            deploy: self.deploy.validate()?,
            backup: self.backup.validate()?,
        })
    }
}

impl RawAgent {
    fn validate(self) -> Result<AgentSettings, ConfigError> {
        let worker_id = self.worker_id.unwrap_or_else(hostname);
        if worker_id.trim().is_empty() || worker_id.len() > 200 {
            return Err(ConfigError::invalid(
                "agent.worker_id",
                format!("{worker_id:?}"),
                "must be 1 to 200 characters",
            ));
        }

        let environments = self.environments.unwrap_or_default();
        if let Some(bad) = environments.iter().find(|e| e.trim().is_empty()) {
            return Err(ConfigError::invalid(
                "agent.environments",
                format!("{bad:?}"),
                "environment ids must not be empty",
            ));
        }

        let workflows = match self.workflows {
            None => KNOWN_WORKFLOWS.iter().map(|w| w.to_string()).collect(),
            Some(list) => validate_workflows(list)?,
        };

        let concurrency = self.concurrency.unwrap_or(DEFAULT_CONCURRENCY as u64);
        if !(1..=64).contains(&concurrency) {
            return Err(ConfigError::invalid(
                "agent.concurrency",
                concurrency,
                "must be between 1 and 64",
            ));
        }

        let lease = opt_seconds("agent.lease_secs", self.lease_secs, DEFAULT_LEASE, 5, 3600)?;
        let heartbeat_interval = opt_seconds(
            "agent.heartbeat_interval_secs",
            self.heartbeat_interval_secs,
            DEFAULT_HEARTBEAT_INTERVAL,
            1,
            1800,
        )?;
        if heartbeat_interval * 2 > lease {
            return Err(ConfigError::invalid(
                "agent.heartbeat_interval_secs",
                heartbeat_interval.as_secs(),
                format!(
                    "must be at most half of agent.lease_secs ({}), so one late heartbeat \
                     does not lose the lease",
                    lease.as_secs()
                ),
            ));
        }

        Ok(AgentSettings {
            worker_id,
            environments,
            workflows,
            concurrency: concurrency as usize,
            poll_interval: opt_seconds(
                "agent.poll_interval_secs",
                self.poll_interval_secs,
                DEFAULT_POLL_INTERVAL,
                1,
                3600,
            )?,
            lease,
            heartbeat_interval,
            reap_interval: opt_seconds(
                "agent.reap_interval_secs",
                self.reap_interval_secs,
                DEFAULT_REAP_INTERVAL,
                1,
                3600,
            )?,
            shutdown_grace: opt_seconds(
                "agent.shutdown_grace_secs",
                self.shutdown_grace_secs,
                DEFAULT_SHUTDOWN_GRACE,
                0,
                86_400,
            )?,
            work_dir: self
                .work_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_WORK_DIR)),
        })
    }
}

fn validate_workflows(list: Vec<String>) -> Result<Vec<String>, ConfigError> {
    if list.is_empty() {
        return Err(ConfigError::invalid(
            "agent.workflows",
            "[]",
            "list at least one workflow, or remove the key to run all of them",
        ));
    }
    for workflow in &list {
        if !KNOWN_WORKFLOWS.contains(&workflow.as_str()) {
            return Err(ConfigError::invalid(
                "agent.workflows",
                format!("{workflow:?}"),
                format!(
                    "unknown workflow; expected one of {}",
                    KNOWN_WORKFLOWS.join(", ")
                ),
            ));
        }
    }
    Ok(list)
}

fn opt_seconds(
    key: &str,
    value: Option<u64>,
    default: Duration,
    min: u64,
    max: u64,
) -> Result<Duration, ConfigError> {
    match value {
        Some(secs) => seconds(key, secs, min, max),
        None => Ok(default),
    }
}

impl RawDatabase {
    fn validate(self, url_override: Option<String>) -> Result<DatabaseSettings, ConfigError> {
        let url = match url_override {
            Some(url) => Secret::new(url),
            None => secret("database.url", &self.url, &self.url_env, &self.url_file)?.ok_or_else(
                || ConfigError::Missing {
                    key: "database.url".into(),
                    reason: format!(
                        "set database.url, database.url_env or database.url_file, \
                         or the {DATABASE_URL_ENV} environment variable"
                    ),
                },
            )?,
        };
        crate::db::parse_url(&url).map_err(|reason| ConfigError::Invalid {
            key: "database.url".into(),
            value: "<redacted>".into(),
            reason,
        })?;

        let pool_size = self.pool_size.unwrap_or(DEFAULT_POOL_SIZE as u64);
        if !(2..=256).contains(&pool_size) {
            return Err(ConfigError::invalid(
                "database.pool_size",
                pool_size,
                "must be between 2 and 256",
            ));
        }
        Ok(DatabaseSettings {
            url,
            pool_size: pool_size as usize,
            connect_timeout: opt_seconds(
                "database.connect_timeout_secs",
                self.connect_timeout_secs,
                DEFAULT_CONNECT_TIMEOUT,
                1,
                600,
            )?,
        })
    }
}

impl RawDocker {
    fn validate(self) -> Result<DockerSettings, ConfigError> {
        let host = self.host.filter(|h| !h.is_empty());
        if let Some(host) = &host {
            let known = ["unix://", "tcp://", "http://", "https://"];
            if !known.iter().any(|scheme| host.starts_with(scheme)) {
                return Err(ConfigError::invalid(
                    "docker.host",
                    format!("{host:?}"),
                    "expected unix:///path/to/docker.sock or tcp://host:port",
                ));
            }
        }
        Ok(DockerSettings {
            host,
            timeout: opt_seconds(
                "docker.timeout_secs",
                self.timeout_secs,
                DEFAULT_DOCKER_TIMEOUT,
                10,
                86_400,
            )?,
            ping_interval: opt_seconds(
                "docker.ping_interval_secs",
                self.ping_interval_secs,
                DEFAULT_DOCKER_PING_INTERVAL,
                1,
                300,
            )?,
        })
    }
}

impl RawLog {
    fn validate(self) -> Result<LogSettings, ConfigError> {
        let format = match self.format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError::invalid(
                    "log.format",
                    format!("{other:?}"),
                    "expected \"text\" or \"json\"",
                ))
            }
        };
        let filter = self.level.unwrap_or_else(|| "info".to_string());
        if !is_log_filter(&filter) {
            return Err(ConfigError::invalid(
                "log.level",
                format!("{filter:?}"),
                "expected a level (trace, debug, info, warn, error, off) or a filter such as \
                 info,odooops_agent=debug",
            ));
        }
        Ok(LogSettings { format, filter })
    }
}

/// Levels that a log filter directive may name.
const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Tells whether `filter` is a level or a list of `target=level` directives. A bare word
/// that is no level is rejected: tracing would take it for a target and log nothing
/// else, so a typo such as "inof" would silence the agent.
pub fn is_log_filter(filter: &str) -> bool {
    let is_level = |word: &str| LOG_LEVELS.contains(&word.trim().to_ascii_lowercase().as_str());
    let directives_valid = filter
        .split(',')
        .all(|directive| match directive.split_once('=') {
            Some((target, level)) => !target.trim().is_empty() && is_level(level),
            None => is_level(directive),
        });
    directives_valid && tracing_subscriber::EnvFilter::try_new(filter).is_ok()
}
