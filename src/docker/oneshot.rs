//! One-off containers: create, start, stream the output, wait for the exit code, remove.

use std::future::Future;
use std::time::Duration;

use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
};
use bollard::Docker;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::pull::is_not_found;

/// Why a one-off container did not run to its end.
#[derive(Debug, thiserror::Error)]
pub enum OneshotError {
    #[error("{action} container {name} failed: {source}")]
    Docker {
        action: &'static str,
        name: String,
        source: bollard::errors::Error,
    },
    #[error("container {name} did not exit within {} s and was killed", timeout.as_secs())]
    TimedOut { name: String, timeout: Duration },
    #[error("container {name} was killed because the run was cancelled")]
    Cancelled { name: String },
}

fn docker_error(
    action: &'static str,
    name: &str,
) -> impl FnOnce(bollard::errors::Error) -> OneshotError {
    let name = name.to_string();
    move |source| OneshotError::Docker {
        action,
        name,
        source,
    }
}

/// Runs `body` as container `name` until it exits and returns its exit code. Every line
/// of its stdout and stderr goes to `on_line` as it arrives. A container left with the
/// same name by an earlier crash is removed first, and the container is removed at the
/// end whatever happens.
pub async fn run_to_completion<F, Fut>(
    docker: &Docker,
    name: &str,
    body: ContainerCreateBody,
    timeout: Duration,
    cancel: &CancellationToken,
    on_line: F,
) -> Result<i64, OneshotError>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = ()>,
{
    remove_if_present(docker, name).await?;
    let options = CreateContainerOptionsBuilder::default().name(name).build();
    docker
        .create_container(Some(options), body)
        .await
        .map_err(docker_error("creating", name))?;

    let result = start_and_follow(docker, name, timeout, cancel, on_line).await;
    // The exit code is read before removal; removal errors only matter if all else worked.
    let removed = remove_if_present(docker, name).await;
    let code = result?;
    removed?;
    Ok(code)
}

async fn start_and_follow<F, Fut>(
    docker: &Docker,
    name: &str,
    timeout: Duration,
    cancel: &CancellationToken,
    mut on_line: F,
) -> Result<i64, OneshotError>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = ()>,
{
    docker
        .start_container(name, None)
        .await
        .map_err(docker_error("starting", name))?;

    let options = LogsOptionsBuilder::default()
        .follow(true)
        .stdout(true)
        .stderr(true)
        .build();
    let follow = async {
        let mut logs = docker.logs(name, Some(options));
        let mut partial = String::new();
        while let Some(chunk) = logs.next().await {
            let chunk = chunk.map_err(docker_error("reading the output of", name))?;
            partial.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
            while let Some(end) = partial.find('\n') {
                let line: String = partial.drain(..=end).collect();
                on_line(line.trim_end_matches(['\n', '\r']).to_string()).await;
            }
        }
        if !partial.is_empty() {
            on_line(partial).await;
        }
        Ok::<(), OneshotError>(())
    };

    tokio::select! {
        followed = tokio::time::timeout(timeout, follow) => match followed {
            Ok(result) => result?,
            Err(_) => {
                return Err(OneshotError::TimedOut { name: name.to_string(), timeout });
            }
        },
        _ = cancel.cancelled() => {
            return Err(OneshotError::Cancelled { name: name.to_string() });
        }
    }
    exit_code(docker, name).await
}

/// Waits until the container is no longer running and returns its exit code. The log
/// stream ends when the process exits, a moment before the engine records the code.
async fn exit_code(docker: &Docker, name: &str) -> Result<i64, OneshotError> {
    for _ in 0..100 {
        let inspect = docker
            .inspect_container(name, None)
            .await
            .map_err(docker_error("inspecting", name))?;
        let state = inspect.state.unwrap_or_default();
        if state.running != Some(true) {
            return Ok(state.exit_code.unwrap_or(-1));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(OneshotError::TimedOut {
        name: name.to_string(),
        timeout: Duration::from_secs(5),
    })
}

/// Force-removes a container by name; a missing container is fine.
pub async fn remove_if_present(docker: &Docker, name: &str) -> Result<(), OneshotError> {
    let options = RemoveContainerOptionsBuilder::default().force(true).build();
    match docker.remove_container(name, Some(options)).await {
        Ok(()) => Ok(()),
        Err(err) if is_not_found(&err) => Ok(()),
        Err(source) => Err(OneshotError::Docker {
            action: "removing",
            name: name.to_string(),
            source,
        }),
    }
}
