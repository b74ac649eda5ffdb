//! The Docker Engine API client and the helpers workflows use: [`image`] builds, tags and
//! pushes images from a [`context`] directory filtered by [`ignore`] rules,
//! [`container`] runs one-off containers with their output streamed line by line, and
//! [`pull`] finds an image on the host or pulls it with registry credentials.

pub mod container;
pub mod context;
pub mod ignore;
pub mod image;
pub mod lines;
pub mod pull;

use bollard::{Docker, API_DEFAULT_VERSION};

use crate::config::DockerSettings;

/// The engine's error is part of each message and deliberately not a `source`: a report
/// that prints the cause chain would otherwise print it twice.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("connecting to the Docker engine at {address} failed: {cause}")]
    Connect {
        address: String,
        cause: bollard::errors::Error,
    },
    #[error("Docker engine at {address} is unreachable: {cause}")]
    Unreachable {
        address: String,
        cause: bollard::errors::Error,
    },
}

/// Returns the engine address: docker.host, else DOCKER_HOST, else the default socket.
pub fn address(settings: &DockerSettings) -> String {
    settings
        .host
        .clone()
        .or_else(|| std::env::var("DOCKER_HOST").ok())
        .unwrap_or_else(|| "unix:///var/run/docker.sock".to_string())
}

/// Connects to the engine and settles on the highest API version both sides speak: Debian's
/// docker.io offers 1.41, droplets run newer engines.
pub async fn connect(settings: &DockerSettings) -> Result<Docker, DockerError> {
    let timeout = settings.timeout.as_secs();
    let address = address(settings);
    let client = if let Some(path) = address.strip_prefix("unix://") {
        Docker::connect_with_unix(path, timeout, API_DEFAULT_VERSION)
    } else {
        let http = address.replacen("tcp://", "http://", 1);
        Docker::connect_with_http(&http, timeout, API_DEFAULT_VERSION)
    }
    .map_err(|cause| DockerError::Connect {
        address: address.clone(),
        cause,
    })?;
    client
        .negotiate_version()
        .await
        .map_err(|cause| DockerError::Unreachable { address, cause })
}
