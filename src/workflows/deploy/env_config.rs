//! The container settings of an environment, read from ops.environments.config.
//!
//! The config object is shared with other workflows and with keys the console sets
//! (droplet_id, deploy_url), so unknown top-level keys are ignored; nested objects reject
//! unknown keys to catch typos. docs/environment-config.md documents every key.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::secret::Secret;

/// Where Odoo keeps its data directory (filestore/<db_name>, sessions) in the official
/// image and in the sample project; the data volume is mounted here.
pub const ODOO_DATA_DIR: &str = "/var/lib/odoo";
/// Where the environment's Odoo config file is mounted read-only, the path the official
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
    /// The value of Odoo's `-u` option.
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
    /// The URL the gate probes, from `url` or the port published for `port`.
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

#[derive(Debug, Default, Deserialize)]
struct RawEnvConfig {
    container_name: Option<String>,
    ports: Option<Vec<RawPort>>,
    env: Option<BTreeMap<String, RawEnvValue>>,
    data_volume: Option<String>,
    volumes: Option<Vec<RawVolume>>,
    network: Option<String>,
    odoo_config: Option<String>,
    command: Option<Vec<String>>,
    update: Option<RawModules>,
    update_command: Option<Vec<String>>,
    update_timeout_secs: Option<f64>,
    health: Option<RawHealth>,
    stop_timeout_secs: Option<f64>,
    restart_policy: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawPort {
    Short(String),
    Long(RawPortObject),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPortObject {
    host_ip: Option<String>,
    host_port: u16,
    container_port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawEnvValue {
    Plain(String),
    Source(RawEnvSource),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnvSource {
    env: Option<String>,
    file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVolume {
    source: String,
    target: String,
    #[serde(default)]
    read_only: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawModules {
    Text(String),
    List(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    path: Option<String>,
    port: Option<u16>,
    url: Option<String>,
    timeout_secs: Option<f64>,
    interval_secs: Option<f64>,
    deadline_secs: Option<f64>,
}

impl EnvConfig {
    /// Validates an environment's config object. `db_name` names the default container.
    pub fn parse(config: &Value, db_name: &str) -> Result<EnvConfig, EnvConfigError> {
        let raw: RawEnvConfig = serde_json::from_value(config.clone())
            .map_err(|err| invalid("config", "(object)", err.to_string()))?;

        let container_name = raw
            .container_name
            .unwrap_or_else(|| format!("odoo-{db_name}"));
        check_docker_name("container_name", &container_name)?;
        let data_volume = Volume {
            source: raw
                .data_volume
                .unwrap_or_else(|| format!("{container_name}-data")),
            target: ODOO_DATA_DIR.to_string(),
            read_only: false,
        };
        check_volume_source("data_volume", &data_volume.source)?;

        let ports = match raw.ports {
            None => vec![PortSpec {
                host_ip: DEFAULT_HOST_IP.to_string(),
                host_port: ODOO_HTTP_PORT,
                container_port: ODOO_HTTP_PORT,
            }],
            Some(list) => list.into_iter().map(parse_port).collect::<Result<_, _>>()?,
        };

        Ok(EnvConfig {
            ports,
            env: parse_env(raw.env.unwrap_or_default())?,
            volumes: parse_volumes(raw.volumes.unwrap_or_default())?,
            network: parse_network(raw.network)?,
            odoo_config: parse_odoo_config(raw.odoo_config)?,
            command: parse_command("command", raw.command)?,
            update: parse_modules(raw.update)?,
            update_command: parse_command("update_command", raw.update_command)?
                .unwrap_or_else(|| vec!["odoo".to_string()]),
            update_timeout: parse_secs(
                "update_timeout_secs",
                raw.update_timeout_secs,
                DEFAULT_UPDATE_TIMEOUT,
                1.0..=86_400.0,
            )?,
            health: parse_health(raw.health.unwrap_or_default())?,
            stop_timeout: parse_secs(
                "stop_timeout_secs",
                raw.stop_timeout_secs,
                DEFAULT_STOP_TIMEOUT,
                0.0..=3600.0,
            )?,
            restart_policy: parse_restart_policy(raw.restart_policy)?,
            container_name,
            data_volume,
        })
    }

    /// Name of the stopped container kept from the deploy before, for fast rollbacks.
    pub fn previous_name(&self) -> String {
        format!("{}-previous", self.container_name)
    }

    /// Name of the one-off container that updates modules.
    pub fn update_name(&self) -> String {
        format!("{}-update", self.container_name)
    }

    /// Every mount of a container of this environment, the data volume first.
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

/// Docker's rule for container and volume names.
fn check_docker_name(key: &str, name: &str) -> Result<(), EnvConfigError> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if first_ok && rest_ok && name.len() <= 200 {
        Ok(())
    } else {
        Err(invalid(
            key,
            name,
            "expected letters, digits, '_', '.' or '-', starting with a letter or digit",
        ))
    }
}

fn check_volume_source(key: &str, source: &str) -> Result<(), EnvConfigError> {
    // Docker's bind syntax separates source, target and options with ':'.
    if source.contains(':') {
        return Err(invalid(key, source, "a volume source must not contain ':'"));
    }
    if source.starts_with('/') {
        if source.split('/').any(|part| part == "..") {
            return Err(invalid(
                key,
                source,
                "a bind mount path must not contain '..'",
            ));
        }
        return Ok(());
    }
    check_docker_name(key, source).map_err(|mut err| {
        err.reason = "expected a volume name or an absolute host path".into();
        err
    })
}

fn parse_port(raw: RawPort) -> Result<PortSpec, EnvConfigError> {
    let spec = match raw {
        RawPort::Long(object) => PortSpec {
            host_ip: object
                .host_ip
                .unwrap_or_else(|| DEFAULT_HOST_IP.to_string()),
            host_port: object.host_port,
            container_port: object.container_port.unwrap_or(ODOO_HTTP_PORT),
        },
        RawPort::Short(text) => parse_short_port(&text)?,
    };
    if spec.host_port == 0 || spec.container_port == 0 {
        return Err(invalid(
            "ports",
            format!("{spec:?}"),
            "ports must be between 1 and 65535",
        ));
    }
    if spec.host_ip.parse::<std::net::IpAddr>().is_err() {
        return Err(invalid(
            "ports",
            &spec.host_ip,
            "host_ip must be an IP address",
        ));
    }
    Ok(spec)
}

/// Parses "host_port:container_port" or "host_ip:host_port:container_port".
fn parse_short_port(text: &str) -> Result<PortSpec, EnvConfigError> {
    let bad = || {
        invalid(
            "ports",
            text,
            "expected \"host_port:container_port\" or \"host_ip:host_port:container_port\"",
        )
    };
    let (rest, container) = text.rsplit_once(':').ok_or_else(bad)?;
    let container_port = container.parse().map_err(|_| bad())?;
    let (host_ip, host_port) = match rest.rsplit_once(':') {
        Some((ip, port)) => (ip.trim_matches(['[', ']']).to_string(), port),
        None => (DEFAULT_HOST_IP.to_string(), rest),
    };
    Ok(PortSpec {
        host_ip,
        host_port: host_port.parse().map_err(|_| bad())?,
        container_port,
    })
}

fn parse_env(
    raw: BTreeMap<String, RawEnvValue>,
) -> Result<Vec<(String, EnvValue)>, EnvConfigError> {
    let mut env = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        let key = format!("env.{name}");
        let mut chars = name.chars();
        let valid = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(invalid(
                &key,
                &name,
                "variable names are letters, digits and '_'",
            ));
        }
        let value = match value {
            RawEnvValue::Plain(text) => EnvValue::Plain(text),
            RawEnvValue::Source(RawEnvSource {
                env: Some(var),
                file: None,
            }) => EnvValue::FromEnv(var),
            RawEnvValue::Source(RawEnvSource {
                env: None,
                file: Some(path),
            }) if path.starts_with('/') => EnvValue::FromFile(PathBuf::from(path)),
            RawEnvValue::Source(source) => {
                return Err(invalid(
                    &key,
                    source,
                    "expected a string, {\"env\": \"VAR\"} or {\"file\": \"/absolute/path\"}",
                ))
            }
        };
        env.push((name, value));
    }
    Ok(env)
}

fn parse_volumes(raw: Vec<RawVolume>) -> Result<Vec<Volume>, EnvConfigError> {
    let mut volumes: Vec<Volume> = Vec::with_capacity(raw.len());
    for (index, volume) in raw.into_iter().enumerate() {
        let key = format!("volumes[{index}]");
        check_volume_source(&format!("{key}.source"), &volume.source)?;
        let target = volume.target;
        let reserved = [ODOO_DATA_DIR, ODOO_CONFIG_TARGET];
        if !target.starts_with('/') || reserved.contains(&target.trim_end_matches('/')) {
            return Err(invalid(
                &format!("{key}.target"),
                &target,
                format!(
                    "expected an absolute container path other than {ODOO_DATA_DIR} (use \
                     data_volume) and {ODOO_CONFIG_TARGET} (use odoo_config)"
                ),
            ));
        }
        if volumes.iter().any(|v| v.target == target) {
            return Err(invalid(&format!("{key}.target"), &target, "mounted twice"));
        }
        volumes.push(Volume {
            source: volume.source,
            target,
            read_only: volume.read_only,
        });
    }
    Ok(volumes)
}

fn parse_network(raw: Option<String>) -> Result<Option<String>, EnvConfigError> {
    match raw.filter(|name| !name.is_empty()) {
        Some(name) => check_docker_name("network", &name).map(|()| Some(name)),
        None => Ok(None),
    }
}

fn parse_odoo_config(raw: Option<String>) -> Result<Option<PathBuf>, EnvConfigError> {
    match raw.filter(|path| !path.is_empty()) {
        Some(path) if path.starts_with('/') && !path.split('/').any(|p| p == "..") => {
            Ok(Some(PathBuf::from(path)))
        }
        Some(path) => Err(invalid(
            "odoo_config",
            path,
            "expected an absolute host path",
        )),
        None => Ok(None),
    }
}

fn parse_command(
    key: &str,
    raw: Option<Vec<String>>,
) -> Result<Option<Vec<String>>, EnvConfigError> {
    match raw {
        Some(list) if list.is_empty() || list[0].is_empty() => Err(invalid(
            key,
            list,
            "expected a program followed by its arguments",
        )),
        other => Ok(other),
    }
}

fn parse_modules(raw: Option<RawModules>) -> Result<Option<Modules>, EnvConfigError> {
    let names: Vec<String> = match raw {
        None => return Ok(None),
        Some(RawModules::Text(text)) => text.split(',').map(|n| n.trim().to_string()).collect(),
        Some(RawModules::List(list)) => list.into_iter().map(|n| n.trim().to_string()).collect(),
    };
    let names: Vec<String> = names.into_iter().filter(|n| !n.is_empty()).collect();
    if names.is_empty() {
        return Ok(None);
    }
    if names.iter().any(|n| n == "all") {
        return Ok(Some(Modules::All));
    }
    // Odoo module names are technical names: lowercase letters, digits and underscores.
    if let Some(bad) = names.iter().find(|n| {
        !n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    }) {
        return Err(invalid(
            "update",
            bad,
            "module names are lowercase letters, digits and '_'",
        ));
    }
    Ok(Some(Modules::List(names)))
}

fn parse_health(raw: RawHealth) -> Result<HealthConfig, EnvConfigError> {
    let path = raw.path.unwrap_or_else(|| DEFAULT_HEALTH_PATH.to_string());
    if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace()) {
        return Err(invalid(
            "health.path",
            path,
            "expected a URL path such as /web/health",
        ));
    }
    if let Some(url) = &raw.url {
        // The gate checks the container on this droplet, not the site through its proxy.
        if !url.starts_with("http://") || url.parse::<hyper::Uri>().is_err() {
            return Err(invalid("health.url", url, "expected an http:// URL"));
        }
    }
    let timeout = parse_secs(
        "health.timeout_secs",
        raw.timeout_secs,
        DEFAULT_PROBE_TIMEOUT,
        0.1..=300.0,
    )?;
    let interval = parse_secs(
        "health.interval_secs",
        raw.interval_secs,
        DEFAULT_PROBE_INTERVAL,
        0.05..=60.0,
    )?;
    let deadline = parse_secs(
        "health.deadline_secs",
        raw.deadline_secs,
        DEFAULT_GATE_DEADLINE,
        0.5..=3600.0,
    )?;
    if deadline < timeout.min(interval) {
        return Err(invalid(
            "health.deadline_secs",
            deadline.as_secs_f64(),
            "must leave room for at least one probe",
        ));
    }
    Ok(HealthConfig {
        path,
        port: raw.port.unwrap_or(ODOO_HTTP_PORT),
        url: raw.url,
        timeout,
        interval,
        deadline,
    })
}

fn parse_secs(
    key: &str,
    raw: Option<f64>,
    default: Duration,
    range: std::ops::RangeInclusive<f64>,
) -> Result<Duration, EnvConfigError> {
    match raw {
        None => Ok(default),
        Some(secs) if range.contains(&secs) => Ok(Duration::from_secs_f64(secs)),
        Some(secs) => Err(invalid(
            key,
            secs,
            format!(
                "must be between {} and {} seconds",
                range.start(),
                range.end()
            ),
        )),
    }
}

fn parse_restart_policy(raw: Option<String>) -> Result<String, EnvConfigError> {
    let policy = raw.unwrap_or_else(|| DEFAULT_RESTART_POLICY.to_string());
    if RESTART_POLICIES.contains(&policy.as_str()) {
        Ok(policy)
    } else {
        Err(invalid(
            "restart_policy",
            policy,
            format!("expected one of {}", RESTART_POLICIES.join(", ")),
        ))
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
#[path = "env_config_tests.rs"]
mod tests;
