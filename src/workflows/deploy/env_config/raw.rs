//! The config object as stored, and the checks that turn it into an [`EnvConfig`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::*;

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
        if let Some(root) = host_path_denied(source) {
            return Err(invalid(
                key,
                source,
                format!("bind mounts of {root} would give the container control of the host"),
            ));
        }
        return Ok(());
    }
    check_docker_name(key, source).map_err(|mut err| {
        err.reason = "expected a volume name or an absolute host path".into();
        err
    })
}

/// Host paths that no environment may bind-mount: the root, the Docker socket and
/// engine state, and the system's own directories.
// NOTE: this is a deny list. Whoever can write ops.environments.config can still mount
// other host paths (for example /home); an allow list of bind roots in the agent's own
// config would close that.
const DENIED_BIND_ROOTS: &[&str] = &[
    "/boot",
    "/dev",
    "/etc",
    "/proc",
    "/root",
    "/run",
    "/sys",
    "/usr",
    "/var/lib/docker",
    "/var/run",
];

fn host_path_denied(source: &str) -> Option<&'static str> {
    let path = source.trim_end_matches('/');
    if path.is_empty() || path == "/." {
        return Some("/");
    }
    DENIED_BIND_ROOTS
        .iter()
        .find(|root| path == **root || path.starts_with(&format!("{root}/")))
        .copied()
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
