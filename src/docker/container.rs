//! One-off containers: create, stream the output line by line, wait for the exit code
//! under a timeout, and remove the container whatever happened.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

use bollard::models::{
    ContainerCreateBody, HostConfig, HostConfigLogConfig, Mount as EngineMount, MountType,
};
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptions, RemoveContainerOptions,
};
use bollard::Docker;
use futures_util::future::BoxFuture;
use futures_util::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::events::EventSink;

use super::lines::LineSplitter;

/// Maximum wait for an engine call that should return at once (create, remove). An
/// engine that takes longer is stuck, and the run must not hang with it.
pub const ENGINE_CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// The output stream of a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// Receives a container's output, one line at a time, in the order it was written to each
/// stream. Lines have their trailing `\n` or `\r\n` removed; invalid UTF-8 is replaced.
pub trait OutputSink: Send {
    fn line<'a>(&'a mut self, stream: OutputStream, line: &'a str) -> BoxFuture<'a, ()>;
}

/// Every line becomes an info event of the run.
impl OutputSink for EventSink {
    fn line<'a>(&'a mut self, _stream: OutputStream, line: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(self.info(line))
    }
}

/// A filesystem mount for a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Host path for a bind mount, volume name for a volume.
    pub source: String,
    /// Path inside the container.
    pub target: String,
    pub kind: MountKind,
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountKind {
    Bind,
    Volume,
}

/// A container to run to completion.
#[derive(Clone, Default)]
pub struct ContainerSpec {
    pub image: String,
    /// Container name; the engine picks a random one when `None`.
    pub name: Option<String>,
    /// Replaces the image's entrypoint when set.
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's command when not empty.
    pub cmd: Vec<String>,
    pub env: Vec<(String, String)>,
    pub mounts: Vec<Mount>,
    /// "bridge", "host", "none" or a network name; `None` is the engine's default bridge.
    pub network_mode: Option<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub labels: HashMap<String, String>,
    /// Runs the engine's init process (docker-init) as PID 1, to reap zombies and forward
    /// signals to the command.
    pub init: bool,
    /// The container is killed and the run reported as timed out after this long.
    pub timeout: Duration,
}

/// Leaves out the command and environment values, which may carry passwords.
impl fmt::Debug for ContainerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let env_names: Vec<&str> = self.env.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("ContainerSpec")
            .field("image", &self.image)
            .field("name", &self.name)
            .field("env", &env_names)
            .field("network_mode", &self.network_mode)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// The exit status of a container that ran to the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerExit {
    pub exit_code: i64,
    /// Whether the kernel killed it for exceeding its memory limit.
    pub oom_killed: bool,
    pub duration: Duration,
    /// Lines passed to the output sink.
    pub lines: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("creating a container from image {image} failed: {source}")]
    Create {
        image: String,
        source: bollard::errors::Error,
    },
    #[error("attaching to container {name} failed: {source}")]
    Attach {
        name: String,
        source: bollard::errors::Error,
    },
    #[error("starting container {name} failed: {source}")]
    Start {
        name: String,
        source: bollard::errors::Error,
    },
    #[error("waiting for container {name} failed: {source}")]
    Wait {
        name: String,
        source: bollard::errors::Error,
    },
    #[error("container {name} did not finish within {} s and was killed", timeout.as_secs())]
    TimedOut { name: String, timeout: Duration },
    #[error("container {name} was stopped because the run was cancelled")]
    Cancelled { name: String },
}

/// A container that is removed (forcibly, with its anonymous volumes) when the guard is
/// dropped, unless [`ContainerGuard::remove`] already did it.
pub struct ContainerGuard {
    docker: Docker,
    id: String,
    removed: bool,
}

impl ContainerGuard {
    pub fn new(docker: Docker, id: String) -> ContainerGuard {
        ContainerGuard {
            docker,
            id,
            removed: false,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Kills and removes the container now. A container already gone counts as removed.
    pub async fn remove(mut self) -> Result<(), bollard::errors::Error> {
        self.removed = true;
        remove_container(&self.docker, &self.id).await
    }
}

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        // Reached when the future that owned the guard was dropped mid-run.
        let docker = self.docker.clone();
        let id = std::mem::take(&mut self.id);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(err) = remove_container(&docker, &id).await {
                    tracing::error!(container.id = %id, error = %err, "removing container failed");
                }
            });
        } else {
            tracing::error!(container.id = %id, "no runtime to remove container; it is left behind");
        }
    }
}

/// Kills and removes a container with its anonymous volumes; one already gone is fine.
/// Gives up after [`ENGINE_CALL_TIMEOUT`].
pub async fn remove_container(docker: &Docker, id: &str) -> Result<(), bollard::errors::Error> {
    let options = RemoveContainerOptions {
        force: true,
        v: true,
        ..Default::default()
    };
    let removal = tokio::time::timeout(
        ENGINE_CALL_TIMEOUT,
        docker.remove_container(id, Some(options)),
    );
    match removal.await {
        Err(_) => Err(bollard::errors::Error::RequestTimeoutError),
        Ok(Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        })) => Ok(()),
        Ok(other) => other,
    }
}

/// Runs `spec` to completion, passing each output line to `output`, and removes the
/// container afterwards in every case: success, failure, timeout, cancellation.
pub async fn run_to_completion(
    docker: &Docker,
    spec: &ContainerSpec,
    output: &mut dyn OutputSink,
    cancel: &CancellationToken,
) -> Result<ContainerExit, ContainerError> {
    let started = Instant::now();
    let guard = match tokio::time::timeout(ENGINE_CALL_TIMEOUT, create(docker, spec)).await {
        Ok(created) => created?,
        Err(_) => return Err(create_timed_out(docker, spec).await),
    };
    let name = spec.name.clone().unwrap_or_else(|| short_id(guard.id()));
    tracing::debug!(container.id = guard.id(), container.name = %name, "container created");

    let mut lines = 0u64;
    let run = run_created(docker, guard.id(), &name, output, &mut lines);
    let result = tokio::select! {
        outcome = tokio::time::timeout(spec.timeout, run) => match outcome {
            Ok(result) => result,
            Err(_) => Err(ContainerError::TimedOut { name: name.clone(), timeout: spec.timeout }),
        },
        _ = cancel.cancelled() => Err(ContainerError::Cancelled { name: name.clone() }),
    };

    let id = guard.id().to_string();
    let oom_killed = match &result {
        Ok(_) => was_oom_killed(docker, &id).await,
        Err(_) => false,
    };
    if let Err(err) = guard.remove().await {
        tracing::error!(container.id = %id, error = %err, "removing container failed");
    }
    let exit_code = result?;
    Ok(ContainerExit {
        exit_code,
        oom_killed,
        duration: started.elapsed(),
        lines,
    })
}

/// Removes a container whose creation timed out, if it has a name to find it by: the
/// engine may have created it after all.
async fn create_timed_out(docker: &Docker, spec: &ContainerSpec) -> ContainerError {
    if let Some(name) = &spec.name {
        if let Err(err) = remove_container(docker, name).await {
            tracing::error!(container.name = %name, error = %err, "removing container failed");
        }
    }
    ContainerError::TimedOut {
        name: spec.name.clone().unwrap_or_else(|| spec.image.clone()),
        timeout: ENGINE_CALL_TIMEOUT,
    }
}

async fn create(docker: &Docker, spec: &ContainerSpec) -> Result<ContainerGuard, ContainerError> {
    let options = CreateContainerOptions {
        name: spec.name.clone(),
        ..Default::default()
    };
    let created = docker
        .create_container(Some(options), container_body(spec))
        .await
        .map_err(|source| ContainerError::Create {
            image: spec.image.clone(),
            source,
        })?;
    Ok(ContainerGuard::new(docker.clone(), created.id))
}

fn container_body(spec: &ContainerSpec) -> ContainerCreateBody {
    let mounts = spec.mounts.iter().map(|mount| EngineMount {
        source: Some(mount.source.clone()),
        target: Some(mount.target.clone()),
        typ: Some(match mount.kind {
            MountKind::Bind => MountType::BIND,
            MountKind::Volume => MountType::VOLUME,
        }),
        read_only: Some(mount.read_only),
        ..Default::default()
    });
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        entrypoint: spec.entrypoint.clone(),
        cmd: (!spec.cmd.is_empty()).then(|| spec.cmd.clone()),
        env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        working_dir: spec.working_dir.clone(),
        user: spec.user.clone(),
        labels: Some(spec.labels.clone()),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        tty: Some(false),
        open_stdin: Some(false),
        host_config: Some(HostConfig {
            mounts: Some(mounts.collect()),
            network_mode: spec.network_mode.clone(),
            init: Some(spec.init),
            // The agent reads the output through the attach stream and stores it. A log
            // driver would write a second copy to the engine's disk and cost engine CPU.
            log_config: Some(HostConfigLogConfig {
                typ: Some("none".into()),
                config: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Attaches before starting, so no early output is lost, then pumps the output until the
/// container closes it and returns the exit code.
async fn run_created(
    docker: &Docker,
    id: &str,
    name: &str,
    output: &mut dyn OutputSink,
    lines: &mut u64,
) -> Result<i64, ContainerError> {
    let options = AttachContainerOptions {
        stream: true,
        logs: false,
        stdout: true,
        stderr: true,
        ..Default::default()
    };
    let attached = docker
        .attach_container(id, Some(options))
        .await
        .map_err(|source| ContainerError::Attach {
            name: name.to_string(),
            source,
        })?;
    docker
        .start_container(id, None::<bollard::query_parameters::StartContainerOptions>)
        .await
        .map_err(|source| ContainerError::Start {
            name: name.to_string(),
            source,
        })?;

    if let Err(err) = pump(attached.output, output, lines).await {
        // The exit code still decides; a broken attach stream only loses output.
        tracing::warn!(container.name = %name, error = %err, "reading container output failed");
    }
    wait(docker, id, name).await
}

async fn pump(
    mut stream: impl Stream<Item = Result<bollard::container::LogOutput, bollard::errors::Error>>
        + Unpin,
    output: &mut dyn OutputSink,
    lines: &mut u64,
) -> Result<(), bollard::errors::Error> {
    use bollard::container::LogOutput;
    let mut stdout = LineSplitter::default();
    let mut stderr = LineSplitter::default();
    while let Some(chunk) = stream.next().await {
        let (splitter, which, message) = match chunk? {
            LogOutput::StdOut { message } | LogOutput::Console { message } => {
                (&mut stdout, OutputStream::Stdout, message)
            }
            LogOutput::StdErr { message } => (&mut stderr, OutputStream::Stderr, message),
            LogOutput::StdIn { .. } => continue,
        };
        for line in splitter.push(&message) {
            output.line(which, &line).await;
            *lines += 1;
        }
    }
    for (splitter, which) in [
        (stdout, OutputStream::Stdout),
        (stderr, OutputStream::Stderr),
    ] {
        if let Some(line) = splitter.finish() {
            output.line(which, &line).await;
            *lines += 1;
        }
    }
    Ok(())
}

async fn wait(docker: &Docker, id: &str, name: &str) -> Result<i64, ContainerError> {
    let mut responses =
        docker.wait_container(id, None::<bollard::query_parameters::WaitContainerOptions>);
    match responses.next().await {
        Some(Ok(response)) => Ok(response.status_code),
        // bollard reports a non-zero exit code as an error.
        Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => Ok(code),
        Some(Err(source)) => Err(ContainerError::Wait {
            name: name.to_string(),
            source,
        }),
        None => Err(ContainerError::Wait {
            name: name.to_string(),
            source: bollard::errors::Error::DockerStreamError {
                error: "the engine closed the wait request without an exit code".into(),
            },
        }),
    }
}

async fn was_oom_killed(docker: &Docker, id: &str) -> bool {
    let inspected = docker
        .inspect_container(
            id,
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await;
    inspected
        .ok()
        .and_then(|container| container.state)
        .and_then(|state| state.oom_killed)
        .unwrap_or(false)
}

fn short_id(id: &str) -> String {
    id.chars().take(12).collect()
}
