//! Finding an image on this host, or pulling it from its registry with credentials.

use std::time::Instant;

use bollard::auth::DockerCredentials;
use bollard::query_parameters::CreateImageOptionsBuilder;
use bollard::Docker;
use futures_util::TryStreamExt;

use crate::config::RegistryCredentials;

/// Failure to make an image available.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("inspecting image {image} failed: {source}")]
    Inspect {
        image: String,
        source: bollard::errors::Error,
    },
    #[error("image {image} is not on this host and pulling it from {registry} failed: {source}")]
    Pull {
        image: String,
        registry: String,
        source: bollard::errors::Error,
    },
}

/// Source of the image that [`ensure_image`] made available.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageSource {
    Local,
    Pulled,
}

/// Returns the registry host of an image reference, following Docker's rule. The first
/// path component is a host when it contains '.' or ':' or is "localhost", and otherwise
/// the image is on Docker Hub.
pub fn registry_host(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => first,
        _ => "docker.io",
    }
}

/// Splits "repo:tag" into its repository and tag; a digest reference has no tag.
fn split_tag(image: &str) -> (&str, Option<&str>) {
    if image.contains('@') {
        return (image, None);
    }
    let name_start = image.rfind('/').map_or(0, |slash| slash + 1);
    match image[name_start..].rfind(':') {
        Some(colon) => (
            &image[..name_start + colon],
            Some(&image[name_start + colon + 1..]),
        ),
        None => (image, None),
    }
}

/// Makes sure `image` is on this host: inspects it, and pulls it when it is missing,
/// sending `credentials` only when they belong to the image's registry.
pub async fn ensure_image(
    docker: &Docker,
    image: &str,
    credentials: Option<&RegistryCredentials>,
) -> Result<ImageSource, PullError> {
    match docker.inspect_image(image).await {
        Ok(_) => return Ok(ImageSource::Local),
        Err(err) if is_not_found(&err) => {}
        Err(source) => {
            return Err(PullError::Inspect {
                image: image.to_string(),
                source,
            })
        }
    }

    let registry = registry_host(image).to_string();
    let credentials = credentials
        .filter(|login| login.host.eq_ignore_ascii_case(&registry))
        .map(|login| DockerCredentials {
            username: Some(login.username.clone()),
            password: Some(login.password.expose().to_string()),
            serveraddress: Some(login.host.clone()),
            ..Default::default()
        });
    let (repository, tag) = split_tag(image);
    let mut options = CreateImageOptionsBuilder::default().from_image(repository);
    if let Some(tag) = tag {
        options = options.tag(tag);
    }

    let started = Instant::now();
    tracing::info!(image, registry = %registry, "pulling image");
    docker
        .create_image(Some(options.build()), None, credentials)
        .try_for_each(|_| async { Ok(()) })
        .await
        .map_err(|source| PullError::Pull {
            image: image.to_string(),
            registry,
            source,
        })?;
    tracing::info!(
        image,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "pulled image"
    );
    Ok(ImageSource::Pulled)
}

/// Returns whether a Docker error is a 404 from the engine.
pub fn is_not_found(err: &bollard::errors::Error) -> bool {
    matches!(
        err,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_host_follows_docker_rules() {
        assert_eq!(registry_host("ghcr.io/acme/odoo:abc"), "ghcr.io");
        assert_eq!(registry_host("127.0.0.1:5000/odoo:abc"), "127.0.0.1:5000");
        assert_eq!(registry_host("localhost/odoo"), "localhost");
        assert_eq!(registry_host("acme/odoo:17"), "docker.io");
        assert_eq!(registry_host("odoo:17"), "docker.io");
    }

    #[test]
    fn tag_is_split_after_the_last_slash() {
        assert_eq!(
            split_tag("127.0.0.1:5000/odoo:abc"),
            ("127.0.0.1:5000/odoo", Some("abc"))
        );
        assert_eq!(
            split_tag("127.0.0.1:5000/odoo"),
            ("127.0.0.1:5000/odoo", None)
        );
        assert_eq!(split_tag("odoo@sha256:00"), ("odoo@sha256:00", None));
    }
}
