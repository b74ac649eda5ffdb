//! An S3-compatible bucket (AWS, DigitalOcean Spaces, MinIO) through aws-sdk-s3.
//!
//! The client is configured from the agent's TOML alone, without aws-config: static
//! credentials, endpoint, region, path-style addressing and the checksum behaviour.
//! Streamed objects go up as multipart uploads with a bounded number of parts in
//! flight, and an object that fits in one part is sent with a single PutObject. A failed or
//! cancelled upload is aborted, so the bucket keeps no orphaned parts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::abort_multipart_upload::builders::AbortMultipartUploadFluentBuilder;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{ObjectReader, ObjectStore, StorageError, StoredObject, UploadPart};
use crate::config::storage::{ChecksumMode, S3Settings};

mod stale;

/// S3's limit on parts per multipart upload.
const MAX_PARTS: i32 = 10_000;
/// Failing fast on an unreachable endpoint; transfers have their own, longer limit.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// One attempt at one part of at most 512 MiB on a slow uplink.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(600);
/// The SDK's standard retry mode with three attempts rides out brief outages.
const MAX_ATTEMPTS: u32 = 3;

pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    part_size: usize,
    parts_in_flight: usize,
}

/// Builds the SDK configuration from the agent's settings.
pub fn client_config(settings: &S3Settings) -> aws_sdk_s3::Config {
    let credentials = Credentials::new(
        settings.access_key_id.expose(),
        settings.secret_access_key.expose(),
        None,
        None,
        "odooops-agent-config",
    );
    let (request, response) = match settings.checksums {
        ChecksumMode::WhenRequired => (
            RequestChecksumCalculation::WhenRequired,
            ResponseChecksumValidation::WhenRequired,
        ),
        ChecksumMode::WhenSupported => (
            RequestChecksumCalculation::WhenSupported,
            ResponseChecksumValidation::WhenSupported,
        ),
    };
    let timeouts = aws_sdk_s3::config::timeout::TimeoutConfig::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .operation_attempt_timeout(ATTEMPT_TIMEOUT)
        .build();
    let mut builder = aws_sdk_s3::Config::builder()
        .behavior_version_latest()
        .credentials_provider(credentials)
        .region(Region::new(settings.region.clone()))
        .force_path_style(settings.force_path_style)
        .request_checksum_calculation(request)
        .response_checksum_validation(response)
        .timeout_config(timeouts)
        .retry_config(
            aws_sdk_s3::config::retry::RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS),
        );
    if let Some(endpoint) = &settings.endpoint_url {
        builder = builder.endpoint_url(endpoint);
    }
    builder.build()
}

/// Formats an SDK error: the service's error code and message when it responded, else
/// the chain of causes (such as a refused connection), each once and without the
/// SDK's debug dump of the request.
fn describe<E, R>(err: &SdkError<E, R>) -> String
where
    E: std::error::Error + ProvideErrorMetadata + 'static,
    R: std::fmt::Debug,
{
    if let Some(code) = err.code() {
        let message = err.message().unwrap_or("no message");
        return format!("{code}: {message}");
    }
    let mut parts: Vec<String> = vec![err.to_string()];
    let mut cause = std::error::Error::source(err);
    while let Some(next) = cause {
        let text = next.to_string();
        if !parts.iter().any(|part| part.contains(&text)) {
            parts.push(text);
        }
        cause = next.source();
    }
    parts.join(": ")
}

impl S3Store {
    pub fn new(settings: &S3Settings) -> S3Store {
        S3Store {
            client: Client::from_conf(client_config(settings)),
            bucket: settings.bucket.clone(),
            prefix: settings.prefix.clone(),
            part_size: settings.part_size,
            parts_in_flight: settings.parts_in_flight,
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Part size for part `number` (from 1): the configured size, doubled every 2,000
    /// parts so that objects far beyond 10,000 parts of the base size still fit.
    pub fn part_size_for(base: usize, number: i32) -> usize {
        base << ((number - 1) / 2000).clamp(0, 4)
    }

    fn object_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    fn failed(&self, operation: &'static str, key: &str, message: String) -> StorageError {
        StorageError::Failed {
            operation,
            location: self.location(key),
            message,
        }
    }

    async fn put_object(&self, key: &str, data: Bytes) -> Result<StoredObject, StorageError> {
        let size_bytes = data.len() as u64;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.object_key(key))
            .content_type("application/zip")
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|err| self.failed("uploading", key, describe(&err)))?;
        Ok(StoredObject {
            location: self.location(key),
            size_bytes,
        })
    }

    async fn upload_stream(
        &self,
        key: &str,
        mut parts: mpsc::Receiver<UploadPart>,
        cancel: CancellationToken,
    ) -> Result<StoredObject, StorageError> {
        let first = match next_part(&mut parts, &cancel, self, key).await? {
            Some(data) => data,
            None => return self.put_object(key, Bytes::new()).await,
        };
        let second = match next_part(&mut parts, &cancel, self, key).await? {
            Some(data) => data,
            None => return self.put_object(key, first).await,
        };
        let upload = Multipart::start(self, key).await?;
        let result = upload.run(first, second, &mut parts, &cancel).await;
        match result {
            Ok(object) => Ok(object),
            Err(err) => {
                upload.abort().await;
                Err(err)
            }
        }
    }
}

/// Receives the next data part; `None` after [`UploadPart::End`].
async fn next_part(
    parts: &mut mpsc::Receiver<UploadPart>,
    cancel: &CancellationToken,
    store: &S3Store,
    key: &str,
) -> Result<Option<Bytes>, StorageError> {
    let part = tokio::select! {
        part = parts.recv() => part,
        _ = cancel.cancelled() => {
            return Err(StorageError::Cancelled { location: store.location(key) })
        }
    };
    match part {
        Some(UploadPart::Data(data)) => Ok(Some(data)),
        Some(UploadPart::End) => Ok(None),
        None => Err(StorageError::Incomplete {
            location: store.location(key),
        }),
    }
}

/// A multipart upload in progress. When it is dropped before it completed or was aborted,
/// because the future driving it was dropped, a task of its own aborts it.
struct Multipart<'a> {
    store: &'a S3Store,
    key: &'a str,
    upload_id: String,
    /// Set once the upload was completed or aborted.
    settled: AtomicBool,
}

impl<'a> Multipart<'a> {
    async fn start(store: &'a S3Store, key: &'a str) -> Result<Multipart<'a>, StorageError> {
        let created = store
            .client
            .create_multipart_upload()
            .bucket(&store.bucket)
            .key(store.object_key(key))
            .content_type("application/zip")
            .send()
            .await
            .map_err(|err| store.failed("starting the multipart upload of", key, describe(&err)))?;
        let upload_id = created.upload_id().unwrap_or_default().to_string();
        Ok(Multipart {
            store,
            key,
            upload_id,
            settled: AtomicBool::new(false),
        })
    }

    /// Uploads every part with at most `parts_in_flight` requests at once, then
    /// completes the upload.
    async fn run(
        &self,
        first: Bytes,
        second: Bytes,
        parts: &mut mpsc::Receiver<UploadPart>,
        cancel: &CancellationToken,
    ) -> Result<StoredObject, StorageError> {
        let mut in_flight = JoinSet::new();
        let mut completed = Vec::new();
        let mut size_bytes = 0u64;
        let mut number = 0i32;
        let mut pending = vec![second, first];
        loop {
            let data = match pending.pop() {
                Some(data) => data,
                None => match next_part(parts, cancel, self.store, self.key).await? {
                    Some(data) => data,
                    None => break,
                },
            };
            number += 1;
            if number > MAX_PARTS {
                return Err(self.store.failed(
                    "uploading",
                    self.key,
                    format!("object needs more than {MAX_PARTS} parts"),
                ));
            }
            size_bytes += data.len() as u64;
            while in_flight.len() >= self.store.parts_in_flight {
                completed.push(self.join_one(&mut in_flight, cancel).await?);
            }
            in_flight.spawn(self.upload_part(number, data));
        }
        while !in_flight.is_empty() {
            completed.push(self.join_one(&mut in_flight, cancel).await?);
        }
        completed.sort_by_key(|part| part.part_number());
        self.complete(completed).await?;
        Ok(StoredObject {
            location: self.store.location(self.key),
            size_bytes,
        })
    }

    fn upload_part(
        &self,
        number: i32,
        data: Bytes,
    ) -> impl std::future::Future<Output = Result<CompletedPart, String>> + Send + 'static {
        let request = self
            .store
            .client
            .upload_part()
            .bucket(&self.store.bucket)
            .key(self.store.object_key(self.key))
            .upload_id(&self.upload_id)
            .part_number(number)
            .body(ByteStream::from(data));
        async move {
            let output = request.send().await.map_err(|err| describe(&err))?;
            Ok(CompletedPart::builder()
                .part_number(number)
                .set_e_tag(output.e_tag().map(str::to_string))
                .build())
        }
    }

    async fn join_one(
        &self,
        in_flight: &mut JoinSet<Result<CompletedPart, String>>,
        cancel: &CancellationToken,
    ) -> Result<CompletedPart, StorageError> {
        let joined = tokio::select! {
            joined = in_flight.join_next() => joined.expect("a part is in flight"),
            _ = cancel.cancelled() => {
                return Err(StorageError::Cancelled { location: self.store.location(self.key) })
            }
        };
        match joined {
            Ok(Ok(part)) => Ok(part),
            Ok(Err(message)) => Err(self.store.failed("uploading a part of", self.key, message)),
            Err(err) => Err(self
                .store
                .failed("uploading a part of", self.key, err.to_string())),
        }
    }

    async fn complete(&self, parts: Vec<CompletedPart>) -> Result<(), StorageError> {
        let upload = CompletedMultipartUpload::builder()
            .set_parts(Some(parts))
            .build();
        self.store
            .client
            .complete_multipart_upload()
            .bucket(&self.store.bucket)
            .key(self.store.object_key(self.key))
            .upload_id(&self.upload_id)
            .multipart_upload(upload)
            .send()
            .await
            .map_err(|err| {
                self.store
                    .failed("completing the upload of", self.key, describe(&err))
            })?;
        self.settled.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Aborts the upload so the store drops its parts. A failure is logged: the bucket's
    /// lifecycle rule for incomplete uploads is then the last resort.
    async fn abort(&self) {
        self.settled.store(true, Ordering::Relaxed);
        let request = self.abort_request();
        abort_upload(
            request,
            self.store.location(self.key),
            self.upload_id.clone(),
        )
        .await;
    }

    fn abort_request(&self) -> AbortMultipartUploadFluentBuilder {
        self.store
            .client
            .abort_multipart_upload()
            .bucket(&self.store.bucket)
            .key(self.store.object_key(self.key))
            .upload_id(&self.upload_id)
    }
}

impl Drop for Multipart<'_> {
    fn drop(&mut self) {
        if self.settled.load(Ordering::Relaxed) {
            return;
        }
        let location = self.store.location(self.key);
        // NOTE: when the process exits before this task runs, the parts stay in the
        // bucket until a lifecycle rule for incomplete uploads removes them.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let request = self.abort_request();
                let upload_id = self.upload_id.clone();
                runtime.spawn(abort_upload(request, location, upload_id));
            }
            Err(_) => tracing::error!(%location, upload.id = %self.upload_id,
                "a multipart upload was dropped outside the runtime; its parts stay in the bucket"),
        }
    }
}

/// Sends an abort request and logs its outcome. A failure leaves the bucket's lifecycle
/// rule for incomplete uploads as the last resort.
async fn abort_upload(
    request: AbortMultipartUploadFluentBuilder,
    location: String,
    upload_id: String,
) {
    match request.send().await {
        Ok(_) => tracing::info!(%location, "aborted the multipart upload"),
        Err(err) => tracing::error!(
            %location,
            upload.id = %upload_id,
            error = %describe(&err),
            "aborting the multipart upload failed; its parts stay in the bucket"
        ),
    }
}

impl ObjectStore for S3Store {
    fn part_size(&self, number: i32) -> usize {
        S3Store::part_size_for(self.part_size, number)
    }

    fn location(&self, key: &str) -> String {
        format!("s3://{}/{}", self.bucket, self.object_key(key))
    }

    fn key_of(&self, location: &str) -> Option<String> {
        let object = location
            .strip_prefix("s3://")?
            .strip_prefix(self.bucket.as_str())?
            .strip_prefix('/')?;
        if self.prefix.is_empty() {
            return Some(object.to_string());
        }
        object
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('/')
            .map(str::to_string)
    }

    fn put_stream<'a>(
        &'a self,
        key: &'a str,
        parts: mpsc::Receiver<UploadPart>,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<StoredObject, StorageError>> {
        Box::pin(self.upload_stream(key, parts, cancel))
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        data: Bytes,
    ) -> BoxFuture<'a, Result<StoredObject, StorageError>> {
        Box::pin(self.put_object(key, data))
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<ObjectReader, StorageError>> {
        Box::pin(async move {
            let result = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(self.object_key(key))
                .send()
                .await;
            match result {
                Ok(output) => Ok(Box::pin(output.body.into_async_read()) as ObjectReader),
                Err(err) if err.code() == Some("NoSuchKey") => Err(StorageError::NotFound {
                    location: self.location(key),
                }),
                Err(err) => Err(self.failed("downloading", key, describe(&err))),
            }
        })
    }

    fn abort_stale_uploads<'a>(
        &'a self,
        key_prefix: &'a str,
        marker: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, StorageError>> {
        Box::pin(self.abort_matching_uploads(key_prefix, marker))
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(self.object_key(key))
                .send()
                .await
                .map_err(|err| self.failed("deleting", key, describe(&err)))?;
            Ok(())
        })
    }
}
