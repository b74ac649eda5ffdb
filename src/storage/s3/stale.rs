//! Aborting multipart uploads that an earlier attempt left behind, for example when the
//! agent was killed in the middle of a backup and never ran its own abort.

use super::{describe, S3Store};
use crate::storage::StorageError;

impl S3Store {
    /// Aborts every in-progress multipart upload whose key starts with `key_prefix` and
    /// contains `marker`, and returns the locations it aborted.
    pub(super) async fn abort_matching_uploads(
        &self,
        key_prefix: &str,
        marker: &str,
    ) -> Result<Vec<String>, StorageError> {
        let mut aborted = Vec::new();
        for (key, upload_id) in self.list_uploads(key_prefix).await? {
            if !key.contains(marker) {
                continue;
            }
            self.client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&key)
                .upload_id(&upload_id)
                .send()
                .await
                .map_err(|err| self.failed_at("aborting the upload of", &key, describe(&err)))?;
            let location = format!("s3://{}/{key}", self.bucket);
            tracing::info!(%location, upload.id = %upload_id, "aborted a stale multipart upload");
            aborted.push(location);
        }
        Ok(aborted)
    }

    /// Lists the bucket keys and upload ids of the in-progress multipart uploads under
    /// `key_prefix`, following the listing's markers across pages.
    async fn list_uploads(&self, key_prefix: &str) -> Result<Vec<(String, String)>, StorageError> {
        let prefix = self.object_key(key_prefix);
        let mut uploads = Vec::new();
        let (mut key_marker, mut upload_id_marker) = (None, None);
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(&prefix)
                .set_key_marker(key_marker)
                .set_upload_id_marker(upload_id_marker)
                .send()
                .await
                .map_err(|err| {
                    self.failed_at("listing multipart uploads under", &prefix, describe(&err))
                })?;
            for upload in page.uploads() {
                if let (Some(key), Some(id)) = (upload.key(), upload.upload_id()) {
                    uploads.push((key.to_string(), id.to_string()));
                }
            }
            if page.is_truncated() != Some(true) {
                return Ok(uploads);
            }
            key_marker = page.next_key_marker().map(str::to_string);
            upload_id_marker = page.next_upload_id_marker().map(str::to_string);
            if key_marker.is_none() && upload_id_marker.is_none() {
                return Ok(uploads);
            }
        }
    }

    /// Builds the error for a failure on a bucket key, which already includes the store's prefix.
    fn failed_at(
        &self,
        operation: &'static str,
        bucket_key: &str,
        message: String,
    ) -> StorageError {
        StorageError::Failed {
            operation,
            location: format!("s3://{}/{bucket_key}", self.bucket),
            message,
        }
    }
}
