//! The environment's containers: what they look like and how one replaces another.
//!
//! The live container is always named `config.container_name`. A deploy stops it and
//! renames it to `<name>-previous`, so that a rollback to it only has to rename and start
//! it again. The container kept from the deploy before is removed at that moment. Volumes
//! are never removed.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerUpdateBody, HostConfig, PortBinding,
    RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, LogsOptionsBuilder, RenameContainerOptionsBuilder,
    StopContainerOptionsBuilder,
};
use bollard::Docker;
use futures_util::StreamExt;

use super::env_config::{EnvConfig, Modules, ODOO_CONFIG_TARGET};
use super::update::UpdateRequest;
use crate::docker::container::{ContainerSpec, Mount, MountKind};
use crate::docker::pull::is_not_found;

pub const LABEL_PROJECT: &str = "odooops.project";
pub const LABEL_ENV: &str = "odooops.env";
pub const LABEL_RUN: &str = "odooops.run";
pub const LABEL_SHA: &str = "odooops.sha";
pub const LABEL_ROLE: &str = "odooops.role";

/// Owner of a container: project, environment, run and sha, written into its labels.
#[derive(Debug, Clone)]
pub struct Labels {
    pub project_id: String,
    pub env_id: String,
    pub run_id: String,
    pub git_sha: String,
}

impl Labels {
    fn to_map(&self, role: &str) -> HashMap<String, String> {
        HashMap::from([
            (LABEL_PROJECT.to_string(), self.project_id.clone()),
            (LABEL_ENV.to_string(), self.env_id.clone()),
            (LABEL_RUN.to_string(), self.run_id.clone()),
            (LABEL_SHA.to_string(), self.git_sha.clone()),
            (LABEL_ROLE.to_string(), role.to_string()),
        ])
    }
}

fn binds(config: &EnvConfig) -> Vec<String> {
    config
        .mounts()
        .iter()
        .map(|mount| {
            let mode = if mount.read_only { ":ro" } else { "" };
            format!("{}:{}{mode}", mount.source, mount.target)
        })
        .collect()
}

fn restart_policy(name: &str) -> RestartPolicy {
    let name = match name {
        "always" => RestartPolicyNameEnum::ALWAYS,
        "unless-stopped" => RestartPolicyNameEnum::UNLESS_STOPPED,
        "on-failure" => RestartPolicyNameEnum::ON_FAILURE,
        _ => RestartPolicyNameEnum::NO,
    };
    RestartPolicy {
        name: Some(name),
        maximum_retry_count: None,
    }
}

/// Sets a container's restart policy. The kept previous container gets "no", so that a
/// reboot of the droplet does not start it next to the live one on the same ports.
async fn set_restart_policy(docker: &Docker, name: &str, policy: &str) -> anyhow::Result<()> {
    let body = ContainerUpdateBody {
        restart_policy: Some(restart_policy(policy)),
        ..Default::default()
    };
    docker
        .update_container(name, body)
        .await
        .with_context(|| format!("setting the restart policy of container {name} failed"))
}

/// Builds the create request of the environment's server container.
pub fn server_body(
    config: &EnvConfig,
    image: &str,
    labels: &Labels,
    env: &[String],
) -> ContainerCreateBody {
    let mut port_bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    for port in &config.ports {
        port_bindings
            .entry(format!("{}/tcp", port.container_port))
            .or_insert_with(|| Some(Vec::new()))
            .get_or_insert_with(Vec::new)
            .push(PortBinding {
                host_ip: Some(port.host_ip.clone()),
                host_port: Some(port.host_port.to_string()),
            });
    }
    ContainerCreateBody {
        image: Some(image.to_string()),
        cmd: config.command.clone(),
        env: Some(env.to_vec()),
        labels: Some(labels.to_map("server")),
        exposed_ports: Some(port_bindings.keys().cloned().collect()),
        stop_timeout: Some(config.stop_timeout.as_secs() as i64),
        host_config: Some(HostConfig {
            binds: Some(binds(config)),
            port_bindings: Some(port_bindings),
            restart_policy: Some(restart_policy(&config.restart_policy)),
            network_mode: config.network.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Builds the module update's command: no HTTP server, no cron threads, stop when done.
pub fn update_command(config: &EnvConfig, db_name: &str, modules: &Modules) -> Vec<String> {
    let mut command = config.update_command.clone();
    if config.odoo_config.is_some() {
        command.extend(["-c".to_string(), ODOO_CONFIG_TARGET.to_string()]);
    }
    command.extend([
        "-d".to_string(),
        db_name.to_string(),
        "-u".to_string(),
        modules.argument(),
        "--stop-after-init".to_string(),
        "--no-http".to_string(),
        "--max-cron-threads=0".to_string(),
    ]);
    command
}

/// Builds the one-off container that updates modules, with the server's volumes and
/// network but no published ports.
pub fn update_spec(request: &UpdateRequest<'_>) -> ContainerSpec {
    let config = request.config;
    let env = request
        .env
        .iter()
        .map(|pair| match pair.split_once('=') {
            Some((name, value)) => (name.to_string(), value.to_string()),
            None => (pair.clone(), String::new()),
        })
        .collect();
    let mounts = config
        .mounts()
        .into_iter()
        .map(|volume| Mount {
            kind: if volume.is_bind() {
                MountKind::Bind
            } else {
                MountKind::Volume
            },
            source: volume.source,
            target: volume.target,
            read_only: volume.read_only,
        })
        .collect();
    ContainerSpec {
        image: request.image.to_string(),
        name: Some(config.update_name()),
        cmd: update_command(config, request.db_name, request.modules),
        env,
        mounts,
        network_mode: config.network.clone(),
        labels: request.labels.to_map("update"),
        timeout: config.update_timeout,
        ..Default::default()
    }
}

/// Removes a container by name, killing it if it runs; a missing one is fine.
pub async fn remove_if_present(docker: &Docker, name: &str) -> anyhow::Result<()> {
    crate::docker::container::remove_container(docker, name)
        .await
        .with_context(|| format!("removing container {name} failed"))
}

pub async fn inspect(
    docker: &Docker,
    name: &str,
) -> anyhow::Result<Option<ContainerInspectResponse>> {
    match docker.inspect_container(name, None).await {
        Ok(found) => Ok(Some(found)),
        Err(err) if is_not_found(&err) => Ok(None),
        Err(err) => Err(err).with_context(|| format!("inspecting container {name} failed")),
    }
}

/// Returns the value of one of a container's labels.
pub fn label(container: &ContainerInspectResponse, key: &str) -> Option<String> {
    container
        .config
        .as_ref()?
        .labels
        .as_ref()?
        .get(key)
        .cloned()
}

pub async fn stop(docker: &Docker, name: &str, timeout: Duration) -> anyhow::Result<()> {
    let options = StopContainerOptionsBuilder::default()
        .t(timeout.as_secs().min(i32::MAX as u64) as i32)
        .build();
    match docker.stop_container(name, Some(options)).await {
        Ok(()) => Ok(()),
        // 304: the container was not running.
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 304, ..
        }) => Ok(()),
        Err(err) => Err(err).with_context(|| format!("stopping container {name} failed")),
    }
}

async fn rename(docker: &Docker, from: &str, to: &str) -> anyhow::Result<()> {
    let options = RenameContainerOptionsBuilder::default().name(to).build();
    docker
        .rename_container(from, options)
        .await
        .with_context(|| format!("renaming container {from} to {to} failed"))
}

/// A container under one of the environment's names whose labels name another project or
/// environment, or none: a deploy must not stop, rename or remove it.
#[derive(Debug, thiserror::Error)]
#[error(
    "container {name} does not belong to {project_id}/{env_id}: {found}; no container was \
     touched. Rename or remove {name} by hand, or set another container_name in the \
     environment's config"
)]
pub struct ForeignContainer {
    pub name: String,
    pub project_id: String,
    pub env_id: String,
    /// Description of the container's owner labels, such as "it has no odooops.project or
    /// odooops.env label".
    pub found: String,
}

/// Describes the owner labels of a container that do not name `project_id` and `env_id`,
/// or returns None when they do.
fn foreign_owner(
    container: &ContainerInspectResponse,
    project_id: &str,
    env_id: &str,
) -> Option<String> {
    let project = label(container, LABEL_PROJECT);
    let env = label(container, LABEL_ENV);
    if project.as_deref() == Some(project_id) && env.as_deref() == Some(env_id) {
        return None;
    }
    if project.is_none() && env.is_none() {
        return Some(format!("it has no {LABEL_PROJECT} or {LABEL_ENV} label"));
    }
    let show = |value: Option<String>| value.map_or("(none)".to_string(), |v| format!("{v:?}"));
    Some(format!(
        "its labels say {LABEL_PROJECT}={} and {LABEL_ENV}={}",
        show(project),
        show(env)
    ))
}

/// Checks that every container a deploy may stop, rename or remove (the live one, the
/// kept `<name>-previous` and a leftover `<name>-update`) carries the labels of
/// `project_id` and `env_id`, which the deploy sets on every container it creates.
pub async fn check_ownership(
    docker: &Docker,
    config: &EnvConfig,
    project_id: &str,
    env_id: &str,
) -> anyhow::Result<()> {
    let names = [
        config.container_name.clone(),
        config.previous_name(),
        config.update_name(),
    ];
    for name in names {
        let Some(container) = inspect(docker, &name).await? else {
            continue;
        };
        if let Some(found) = foreign_owner(&container, project_id, env_id) {
            return Err(ForeignContainer {
                name,
                project_id: project_id.to_string(),
                env_id: env_id.to_string(),
                found,
            }
            .into());
        }
    }
    Ok(())
}

/// The live container after [`retire_live`] stopped it.
#[derive(Debug, Clone)]
pub struct Retired {
    pub git_sha: Option<String>,
}

/// Stops the live container and keeps it as `<name>-previous`. A container under the live
/// name that this same run created before a crash is removed instead, so that the
/// version before it stays available.
pub async fn retire_live(
    docker: &Docker,
    config: &EnvConfig,
    run_id: &str,
) -> anyhow::Result<Option<Retired>> {
    let name = &config.container_name;
    let Some(live) = inspect(docker, name).await? else {
        return Ok(None);
    };
    if label(&live, LABEL_RUN).as_deref() == Some(run_id) {
        remove_if_present(docker, name).await?;
        return Ok(None);
    }
    remove_if_present(docker, &config.previous_name()).await?;
    stop(docker, name, config.stop_timeout).await?;
    set_restart_policy(docker, name, "no").await?;
    rename(docker, name, &config.previous_name()).await?;
    Ok(Some(Retired {
        git_sha: label(&live, LABEL_SHA),
    }))
}

/// Puts `<name>-previous` back under the live name and starts it, removing the container
/// under the live name. Returns false when there is no previous container.
pub async fn reinstate_previous(docker: &Docker, config: &EnvConfig) -> anyhow::Result<bool> {
    let previous = config.previous_name();
    if inspect(docker, &previous).await?.is_none() {
        return Ok(false);
    }
    remove_if_present(docker, &config.container_name).await?;
    rename(docker, &previous, &config.container_name).await?;
    set_restart_policy(docker, &config.container_name, &config.restart_policy).await?;
    docker
        .start_container(&config.container_name, None)
        .await
        .with_context(|| format!("starting container {} failed", config.container_name))?;
    Ok(true)
}

/// Creates and starts the live container, replacing a leftover under its name.
pub async fn start_new(
    docker: &Docker,
    name: &str,
    body: ContainerCreateBody,
) -> anyhow::Result<()> {
    remove_if_present(docker, name).await?;
    let options = CreateContainerOptionsBuilder::default().name(name).build();
    docker
        .create_container(Some(options), body)
        .await
        .with_context(|| format!("creating container {name} failed"))?;
    docker
        .start_container(name, None)
        .await
        .with_context(|| format!("starting container {name} failed"))
}

/// Reads the last `lines` lines of a container's output, for the events of a failed
/// deploy.
pub async fn tail_logs(docker: &Docker, name: &str, lines: usize) -> Vec<String> {
    let options = LogsOptionsBuilder::default()
        .stdout(true)
        .stderr(true)
        .tail(&lines.to_string())
        .build();
    let mut output = String::new();
    let mut logs = docker.logs(name, Some(options));
    while let Some(Ok(chunk)) = logs.next().await {
        output.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
    }
    output.lines().map(str::to_string).collect()
}
