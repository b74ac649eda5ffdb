//! The container settings of an environment, read from ops.environments.config.
//!
//! The config object is shared with other workflows and with keys the console sets
//! (droplet_id, deploy_url), so unknown top-level keys are ignored. Nested objects reject
//! unknown keys to catch typos. docs/environment-config.md documents every key.

mod raw;

use std::path::PathBuf;
use std::time::Duration;

use crate::secret::Secret;

/// Path of Odoo's data directory (filestore/<db_name>, sessions) in the official
/// image and in the sample project; the data volume is mounted here.
pub const ODOO_DATA_DIR: &str = "/var/lib/odoo";
/// Mount point of the environment's Odoo config file (read-only), the path the official
/// image's ODOO_RC points to.
pub const ODOO_CONFIG_TARGET: &str = "/etc/odoo/odoo.conf";
/// Odoo's default HTTP port (http_port).
pub const ODOO_HTTP_PORT: u16 = 8069;
/// Odoo's health endpoint since 15.0; it returns 200 without touching the database.
pub const DEFAULT_HEALTH_PATH: &str = "/web/health";
/// Kamal's per-request timeout: a probe that takes longer counts as failed.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Kamal's probe interval.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Odoo loads its registry before serving, which takes tens of seconds on a large
/// database, so the gate waits much longer than Kamal's 30 s.
pub const DEFAULT_GATE_DEADLINE: Duration = Duration::from_secs(120);
/// Odoo finishes in-flight requests on SIGTERM; Docker's own default of 10 s can cut a
/// slow report short.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// `-u all` on a large database can run for most of an hour.
pub const DEFAULT_UPDATE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Brings the site back after a crash or a droplet reboot, but not after a deliberate stop.
pub const DEFAULT_RESTART_POLICY: &str = "unless-stopped";
/// Loopback only: a reverse proxy on the droplet serves the public side.
pub const DEFAULT_HOST_IP: &str = "127.0.0.1";

const RESTART_POLICIES: &[&str] = &["no", "always", "unless-stopped", "on-failure"];

/// A bad value in the environment's config, naming the key and the value.
#[derive(Debug, thiserror::Error)]
#[error("invalid environment config {key}: {value} ({reason})")]
pub struct EnvConfigError {
    pub key: String,
    pub value: String,
    pub reason: String,
}

fn invalid(key: &str, value: impl std::fmt::Debug, reason: impl Into<String>) -> EnvConfigError {
    EnvConfigError {
        key: key.to_string(),
        value: format!("{value:?}"),
        reason: reason.into(),
    }
}

/// The validated container settings of one environment.
#[derive(Debug, Clone)]
pub struct EnvConfig {
    pub container_name: String,
    pub ports: Vec<PortSpec>,
    pub env: Vec<(String, EnvValue)>,
    /// Mounted at [`ODOO_DATA_DIR`] in every container of the environment.
    pub data_volume: Volume,
    pub volumes: Vec<Volume>,
    pub network: Option<String>,
    /// Host path of the Odoo config file, mounted at [`ODOO_CONFIG_TARGET`].
    pub odoo_config: Option<PathBuf>,
    /// Replaces the image's CMD for the server container.
    pub command: Option<Vec<String>>,
    pub update: Option<Modules>,
    /// Program and leading arguments of the module update; the agent appends the rest.
    pub update_command: Vec<String>,
    pub update_timeout: Duration,
    pub health: HealthConfig,
    pub stop_timeout: Duration,
    pub restart_policy: String,
}

/// A published port: host_ip:host_port on the droplet to container_port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    pub host_ip: String,
    pub host_port: u16,
    pub container_port: u16,
}

/// An environment variable's value, or where the agent reads it on its host, so that
/// secrets need not be stored in the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvValue {
    Plain(String),
    FromEnv(String),
    FromFile(PathBuf),
}

/// A named volume or a bind mount (absolute host path) at `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub source: String,
    pub target: String,
    pub read_only: bool,
}

impl Volume {
    pub fn is_bind(&self) -> bool {
        self.source.starts_with('/')
    }
}

/// The modules a deploy updates with `-u`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Modules {
    All,
    List(Vec<String>),
}

impl Modules {
    /// Formats the value of Odoo's `-u` option.
    pub fn argument(&self) -> String {
        match self {
            Modules::All => "all".to_string(),
            Modules::List(names) => names.join(","),
        }
    }
}

/// Health gate settings.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    pub path: String,
    /// Container port whose published host port the gate probes.
    pub port: u16,
    /// Probes this URL instead of the published port.
    pub url: Option<String>,
    pub timeout: Duration,
    pub interval: Duration,
    pub deadline: Duration,
}

impl HealthConfig {
    /// Returns the URL the gate probes, from `url` or the port published for `port`.
    pub fn probe_url(&self, ports: &[PortSpec]) -> Result<String, EnvConfigError> {
        if let Some(url) = &self.url {
            return Ok(url.clone());
        }
        let published = ports
            .iter()
            .find(|p| p.container_port == self.port)
            .ok_or_else(|| {
                invalid(
                    "health.port",
                    self.port,
                    "no entry in ports publishes this container port; publish it \
                     (for example \"127.0.0.1:8069:8069\") or set health.url",
                )
            })?;
        let host = match published.host_ip.as_str() {
            "0.0.0.0" | "" => "127.0.0.1".to_string(),
            "::" => "[::1]".to_string(),
            ip if ip.contains(':') => format!("[{ip}]"),
            ip => ip.to_string(),
        };
        Ok(format!(
            "http://{host}:{}{}",
            published.host_port, self.path
        ))
    }
}

impl EnvConfig {
    /// Name of the stopped container kept from the deploy before, for fast rollbacks.
    pub fn previous_name(&self) -> String {
        format!("{}-previous", self.container_name)
    }

    /// Name of the one-off container that updates modules.
    pub fn update_name(&self) -> String {
        format!("{}-update", self.container_name)
    }

    /// Lists every mount of a container of this environment, the data volume first.
    pub fn mounts(&self) -> Vec<Volume> {
        let mut mounts = vec![self.data_volume.clone()];
        mounts.extend(self.volumes.iter().cloned());
        if let Some(path) = &self.odoo_config {
            mounts.push(Volume {
                source: path.display().to_string(),
                target: ODOO_CONFIG_TARGET.to_string(),
                read_only: true,
            });
        }
        mounts
    }
}

/// Reads an environment variable's value on the agent's host.
pub fn resolve_env_value(name: &str, value: &EnvValue) -> Result<Secret, EnvConfigError> {
    match value {
        EnvValue::Plain(text) => Ok(Secret::new(text.clone())),
        EnvValue::FromEnv(var) => std::env::var(var).map(Secret::new).map_err(|_| {
            invalid(
                &format!("env.{name}"),
                var,
                "the agent's environment does not set it",
            )
        }),
        EnvValue::FromFile(path) => std::fs::read_to_string(path)
            .map(|text| Secret::new(text.strip_suffix('\n').unwrap_or(&text).to_string()))
            .map_err(|err| {
                invalid(
                    &format!("env.{name}"),
                    path,
                    format!("reading failed: {err}"),
                )
            }),
    }
}

#[cfg(test)]
mod tests;
