//! Images: building from a context directory, tagging, pushing and removing.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bollard::auth::DockerCredentials;
use bollard::models::{BuildInfo, ProgressDetail, PushImageInfo};
use bollard::query_parameters::{
    BuildImageOptions, PushImageOptions, RemoveImageOptions, TagImageOptions,
};
use bollard::Docker;
use futures_util::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

use super::container::{OutputSink, OutputStream};
use super::context::{self, ContextError, ContextSummary};
use super::lines::LineSplitter;

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildSpec {
    /// Directory sent as the build context.
    pub context_dir: PathBuf,
    /// Dockerfile path relative to the context directory.
    pub dockerfile: String,
    /// Full reference of the first tag, such as `registry/image:sha`.
    pub tag: String,
    pub labels: HashMap<String, String>,
    /// Pull newer versions of the base images.
    pub pull: bool,
    pub timeout: Duration,
}

/// The image a build produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImage {
    /// `sha256:...` image id.
    pub id: String,
    /// Uncompressed size in bytes.
    pub size_bytes: i64,
    pub layers: usize,
    pub duration: Duration,
    pub context: ContextSummary,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("preparing the build context failed: {0}")]
    Context(#[from] ContextError),
    #[error("building {tag} failed: {message}")]
    Build { tag: String, message: String },
    #[error("building {tag} did not finish within {} s", timeout.as_secs())]
    BuildTimedOut { tag: String, timeout: Duration },
    #[error("building {tag} was stopped because the run was cancelled")]
    Cancelled { tag: String },
    #[error("inspecting image {reference} failed: {source}")]
    Inspect {
        reference: String,
        source: bollard::errors::Error,
    },
    #[error("tagging {source_image} as {target} failed: {source}")]
    Tag {
        source_image: String,
        target: String,
        source: bollard::errors::Error,
    },
    #[error("pushing {reference} failed: {message}")]
    Push { reference: String, message: String },
    #[error("pushing {reference} did not finish within {} s", timeout.as_secs())]
    PushTimedOut {
        reference: String,
        timeout: Duration,
    },
}

/// Builds an image with the engine's classic builder, streaming every output line to
/// `output`. An error reported inside the output fails the build even though the request
/// itself succeeded. Intermediate containers are always removed (`forcerm`); on failure,
/// the untagged intermediate images of this build are removed too.
pub async fn build(
    docker: &Docker,
    spec: &BuildSpec,
    output: &mut dyn OutputSink,
    cancel: &CancellationToken,
) -> Result<BuiltImage, ImageError> {
    let started = Instant::now();
    let rules = context::load_rules(&spec.context_dir, &spec.dockerfile)?;
    let (body, archiver) = context::stream(spec.context_dir.clone(), rules).into_parts();
    let options = BuildImageOptions {
        dockerfile: spec.dockerfile.clone(),
        t: Some(spec.tag.clone()),
        rm: true,
        forcerm: true,
        pull: spec.pull.then(|| "1".to_string()),
        labels: Some(spec.labels.clone()),
        ..Default::default()
    };
    let stream = docker.build_image(options, None, Some(bollard::body_try_stream(body)));

    let mut progress = BuildProgress {
        tag: spec.tag.clone(),
        ..Default::default()
    };
    let outcome = tokio::select! {
        result = tokio::time::timeout(spec.timeout, progress.follow(stream, output)) => {
            result.unwrap_or_else(|_| Err(ImageError::BuildTimedOut {
                tag: spec.tag.clone(),
                timeout: spec.timeout,
            }))
        }
        _ = cancel.cancelled() => Err(ImageError::Cancelled { tag: spec.tag.clone() }),
    };
    let context = archiver.await.unwrap_or_else(|err| {
        Err(ContextError::Archive {
            path: spec.context_dir.clone(),
            source: std::io::Error::other(err),
        })
    });

    if let Err(err) = outcome {
        remove_intermediates(docker, &progress.intermediates).await;
        // A broken context explains a failed request better than the engine's message.
        return Err(match context {
            Err(context_err) if !matches!(context_err, ContextError::Aborted) => context_err.into(),
            _ => err,
        });
    }
    let context = context?;
    let mut built = inspect(docker, &spec.tag).await?;
    built.duration = started.elapsed();
    built.context = context;
    Ok(built)
}

/// What the build output told so far.
#[derive(Default)]
struct BuildProgress {
    tag: String,
    /// Ids of the images committed by each step, in order, from ` ---> <id>` lines.
    intermediates: Vec<String>,
    lines: LineSplitter,
}

impl BuildProgress {
    async fn follow(
        &mut self,
        mut stream: impl Stream<Item = Result<BuildInfo, bollard::errors::Error>> + Unpin,
        output: &mut dyn OutputSink,
    ) -> Result<(), ImageError> {
        while let Some(item) = stream.next().await {
            let info = item.map_err(|err| self.error(engine_message(err)))?;
            if let Some(message) = info.error_detail.and_then(|d| d.message) {
                return Err(self.error(message));
            }
            if let Some(text) = info.stream {
                for line in self.lines.push(text.as_bytes()) {
                    self.note_intermediate(&line);
                    output.line(OutputStream::Stdout, &line).await;
                }
            }
            // Pull progress: report each layer's state changes, not every byte count.
            let byte_progress = is_byte_progress(info.progress_detail.as_ref());
            if let (Some(status), false) = (info.status, byte_progress) {
                let line = match info.id {
                    Some(id) => format!("{id}: {status}"),
                    None => status,
                };
                output.line(OutputStream::Stdout, &line).await;
            }
        }
        if let Some(line) = std::mem::take(&mut self.lines).finish() {
            output.line(OutputStream::Stdout, &line).await;
        }
        Ok(())
    }

    fn error(&self, message: String) -> ImageError {
        ImageError::Build {
            tag: self.tag.clone(),
            message,
        }
    }

    fn note_intermediate(&mut self, line: &str) {
        if let Some(id) = line.trim().strip_prefix("---> ") {
            if id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                self.intermediates.push(id.to_string());
            }
        }
    }
}

/// Removes, newest first, the step images of a failed build that no tag refers to. The
/// engine refuses to remove an image that has children or a container, so layers shared
/// with other images stay.
async fn remove_intermediates(docker: &Docker, ids: &[String]) {
    for id in ids.iter().rev() {
        let tagged = match docker.inspect_image(id).await {
            Ok(image) => image.repo_tags.is_some_and(|tags| !tags.is_empty()),
            Err(_) => continue,
        };
        if tagged {
            continue;
        }
        let options = RemoveImageOptions::default();
        match docker.remove_image(id, Some(options), None).await {
            Ok(_) => tracing::debug!(image.id = %id, "removed intermediate image"),
            Err(err) => tracing::debug!(image.id = %id, error = %err, "intermediate image kept"),
        }
    }
}

/// Reads an image's id, size and layer count.
pub async fn inspect(docker: &Docker, reference: &str) -> Result<BuiltImage, ImageError> {
    let image = docker
        .inspect_image(reference)
        .await
        .map_err(|source| ImageError::Inspect {
            reference: reference.to_string(),
            source,
        })?;
    Ok(BuiltImage {
        id: image.id.unwrap_or_default(),
        size_bytes: image.size.unwrap_or(0),
        layers: image
            .root_fs
            .and_then(|fs| fs.layers)
            .map_or(0, |layers| layers.len()),
        duration: Duration::ZERO,
        context: ContextSummary::default(),
    })
}

/// Adds the tag `target` (`repository:tag`) to the image `source_image`.
pub async fn tag(docker: &Docker, source_image: &str, target: &str) -> Result<(), ImageError> {
    let (repo, tag) = split_tag(target);
    let options = TagImageOptions {
        repo: Some(repo.to_string()),
        tag: Some(tag.to_string()),
    };
    docker
        .tag_image(source_image, Some(options))
        .await
        .map_err(|source| ImageError::Tag {
            source_image: source_image.to_string(),
            target: target.to_string(),
            source,
        })
}

/// Splits `host:port/name:tag` at the tag's colon, which comes after the last `/`.
pub fn split_tag(reference: &str) -> (&str, &str) {
    let name_start = reference.rfind('/').map_or(0, |slash| slash + 1);
    match reference[name_start..].rfind(':') {
        Some(colon) => {
            let at = name_start + colon;
            (&reference[..at], &reference[at + 1..])
        }
        None => (reference, "latest"),
    }
}

/// Pushes `reference` (`repository:tag`) with `credentials`, streaming each layer's state
/// changes to `output`. An error inside the push output fails the push. Returns the
/// manifest digest the registry reported, when it reported one.
pub async fn push(
    docker: &Docker,
    reference: &str,
    credentials: Option<DockerCredentials>,
    output: &mut dyn OutputSink,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<Option<String>, ImageError> {
    let (repo, tag) = split_tag(reference);
    let options = PushImageOptions {
        tag: Some(tag.to_string()),
        ..Default::default()
    };
    let stream = docker.push_image(repo, Some(options), credentials);
    let follow = follow_push(stream, reference, output);
    tokio::select! {
        result = tokio::time::timeout(timeout, follow) => {
            result.unwrap_or_else(|_| Err(ImageError::PushTimedOut {
                reference: reference.to_string(),
                timeout,
            }))
        }
        _ = cancel.cancelled() => Err(ImageError::Push {
            reference: reference.to_string(),
            message: "the run was cancelled".to_string(),
        }),
    }
}

async fn follow_push(
    stream: impl Stream<Item = Result<PushImageInfo, bollard::errors::Error>>,
    reference: &str,
    output: &mut dyn OutputSink,
) -> Result<Option<String>, ImageError> {
    let push_error = |message: String| ImageError::Push {
        reference: reference.to_string(),
        message,
    };
    let mut stream = std::pin::pin!(stream);
    let mut digest = None;
    while let Some(item) = stream.next().await {
        let info = item.map_err(|err| push_error(engine_message(err)))?;
        if let Some(message) = info.error_detail.and_then(|detail| detail.message) {
            return Err(push_error(message));
        }
        let Some(status) = info.status else { continue };
        if is_byte_progress(info.progress_detail.as_ref()) {
            continue;
        }
        if let Some(found) = parse_digest(&status) {
            digest = Some(found);
        }
        output.line(OutputStream::Stdout, &status).await;
    }
    Ok(digest)
}

/// Whether a progress entry only counts bytes, which would flood the events.
fn is_byte_progress(detail: Option<&ProgressDetail>) -> bool {
    detail.is_some_and(|d| d.current.is_some() || d.total.is_some())
}

/// Finds the digest in the engine's last push status, `TAG: digest: sha256:HEX size: N`.
fn parse_digest(status: &str) -> Option<String> {
    let (_, after) = status.split_once("digest: ")?;
    let digest = after.split_whitespace().next()?;
    digest.starts_with("sha256:").then(|| digest.to_string())
}

/// The engine's own message for an error, without bollard's wrapping.
fn engine_message(err: bollard::errors::Error) -> String {
    match err {
        bollard::errors::Error::DockerStreamError { error } => error,
        bollard::errors::Error::DockerResponseServerError { message, .. } => message,
        other => other.to_string(),
    }
}

/// Removes an image reference. Removing the last tag of an image removes the image and
/// its untagged parents; a reference already gone is fine.
pub async fn remove(docker: &Docker, reference: &str) -> Result<(), bollard::errors::Error> {
    match docker
        .remove_image(reference, Some(RemoveImageOptions::default()), None)
        .await
    {
        Ok(_) => Ok(()),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_is_split_after_the_registry_port() {
        assert_eq!(
            split_tag("127.0.0.1:5000/acme/odoo:abc"),
            ("127.0.0.1:5000/acme/odoo", "abc")
        );
        assert_eq!(
            split_tag("127.0.0.1:5000/acme/odoo"),
            ("127.0.0.1:5000/acme/odoo", "latest")
        );
        assert_eq!(split_tag("odoo:17"), ("odoo", "17"));
    }

    #[test]
    fn digest_is_read_from_the_final_push_status() {
        let status = "abc: digest: sha256:0123abcd size: 528";
        assert_eq!(parse_digest(status).as_deref(), Some("sha256:0123abcd"));
        assert_eq!(parse_digest("Pushed"), None);
    }

    #[test]
    fn step_image_lines_are_collected() {
        let mut progress = BuildProgress::default();
        progress.note_intermediate(" ---> 0123456789ab");
        progress.note_intermediate(" ---> Running in 0123456789ab");
        progress.note_intermediate(" ---> Using cache");
        assert_eq!(progress.intermediates, ["0123456789ab"]);
    }
}
