//! The `[storage]` section: where backups go, a local directory or an S3-compatible
//! bucket.

use std::path::PathBuf;

use serde::Deserialize;

use super::{secret, ConfigError};
use crate::secret::Secret;

/// Backups stay on the droplet unless a bucket is configured.
pub const DEFAULT_LOCAL_DIR: &str = "/var/lib/odooops/backups";
/// AWS and most S3-compatible stores accept any region name when an endpoint is set.
pub const DEFAULT_S3_REGION: &str = "us-east-1";
/// 8 MiB parts keep memory low (a few parts in flight) and allow 80 GB objects at
/// S3's 10,000-part limit before parts grow.
pub const DEFAULT_PART_SIZE_MIB: u64 = 8;
/// Two uploads in flight keep the uplink busy while the next part is built, and bound
/// the upload's memory to about four parts (the part being built, one queued, two sent).
pub const DEFAULT_PARTS_IN_FLIGHT: u64 = 2;
/// S3 rejects parts under 5 MiB, except the last one.
pub const MIN_PART_SIZE_MIB: u64 = 5;
/// S3 rejects parts over 5 GiB; far below that, memory use is the limit.
pub const MAX_PART_SIZE_MIB: u64 = 512;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStorage {
    /// "local" (the default) or "s3".
    pub backend: Option<String>,
    pub local_dir: Option<PathBuf>,
    pub s3: Option<RawS3>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawS3 {
    pub bucket: Option<String>,
    pub prefix: Option<String>,
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    pub force_path_style: Option<bool>,
    pub access_key_id: Option<String>,
    pub access_key_id_env: Option<String>,
    pub access_key_id_file: Option<String>,
    pub secret_access_key: Option<String>,
    pub secret_access_key_env: Option<String>,
    pub secret_access_key_file: Option<String>,
    /// "when_required" or "when_supported".
    pub checksums: Option<String>,
    pub part_size_mib: Option<u64>,
    pub parts_in_flight: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageBackend {
    Local,
    S3,
}

/// When the SDK computes and sends CRC checksums with requests and validates them on
/// responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumMode {
    /// Only for operations that require one. Some S3-compatible stores reject the SDK's
    /// default checksum headers, so this is the default.
    WhenRequired,
    /// For every operation that supports one (the SDK's own default).
    WhenSupported,
}

#[derive(Debug, Clone)]
pub struct StorageSettings {
    pub backend: StorageBackend,
    pub local_dir: PathBuf,
    /// Present when `[storage.s3]` is configured, whatever the backend, so that backups
    /// written to a bucket earlier stay restorable.
    pub s3: Option<S3Settings>,
}

#[derive(Debug, Clone)]
pub struct S3Settings {
    pub bucket: String,
    /// Key prefix without leading or trailing slash; empty for the bucket's root.
    pub prefix: String,
    /// `None` means AWS itself.
    pub endpoint_url: Option<String>,
    pub region: String,
    pub force_path_style: bool,
    pub access_key_id: Secret,
    pub secret_access_key: Secret,
    pub checksums: ChecksumMode,
    /// Bytes per multipart part.
    pub part_size: usize,
    pub parts_in_flight: usize,
}

impl RawStorage {
    pub fn validate(self) -> Result<StorageSettings, ConfigError> {
        let backend = match self.backend.as_deref() {
            None | Some("local") => StorageBackend::Local,
            Some("s3") => StorageBackend::S3,
            Some(other) => {
                return Err(ConfigError::invalid(
                    "storage.backend",
                    format!("{other:?}"),
                    "expected \"local\" or \"s3\"",
                ))
            }
        };
        let local_dir = self.local_dir.unwrap_or_else(|| DEFAULT_LOCAL_DIR.into());
        if !local_dir.is_absolute() {
            return Err(ConfigError::invalid(
                "storage.local_dir",
                local_dir.display(),
                "must be an absolute path",
            ));
        }
        let s3 = self.s3.map(RawS3::validate).transpose()?;
        if backend == StorageBackend::S3 && s3.is_none() {
            return Err(ConfigError::Missing {
                key: "storage.s3".into(),
                reason: "storage.backend is \"s3\"; add a [storage.s3] section with the \
                         bucket and credentials"
                    .into(),
            });
        }
        Ok(StorageSettings {
            backend,
            local_dir,
            s3,
        })
    }
}

impl RawS3 {
    fn validate(self) -> Result<S3Settings, ConfigError> {
        let bucket = self.bucket.unwrap_or_default();
        if !valid_bucket_name(&bucket) {
            return Err(ConfigError::invalid(
                "storage.s3.bucket",
                format!("{bucket:?}"),
                "expected 3 to 63 lowercase letters, digits, dots and hyphens",
            ));
        }
        let prefix = self
            .prefix
            .unwrap_or_default()
            .trim_matches('/')
            .to_string();
        if let Some(url) = &self.endpoint_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::invalid(
                    "storage.s3.endpoint_url",
                    format!("{url:?}"),
                    "expected an http:// or https:// URL",
                ));
            }
        }
        let part_size_mib = self.part_size_mib.unwrap_or(DEFAULT_PART_SIZE_MIB);
        if !(MIN_PART_SIZE_MIB..=MAX_PART_SIZE_MIB).contains(&part_size_mib) {
            return Err(ConfigError::invalid(
                "storage.s3.part_size_mib",
                part_size_mib,
                format!("must be between {MIN_PART_SIZE_MIB} and {MAX_PART_SIZE_MIB}"),
            ));
        }
        let parts_in_flight = self.parts_in_flight.unwrap_or(DEFAULT_PARTS_IN_FLIGHT);
        if !(1..=16).contains(&parts_in_flight) {
            return Err(ConfigError::invalid(
                "storage.s3.parts_in_flight",
                parts_in_flight,
                "must be between 1 and 16",
            ));
        }
        Ok(S3Settings {
            bucket,
            prefix,
            endpoint_url: self.endpoint_url.filter(|url| !url.is_empty()),
            region: self.region.unwrap_or_else(|| DEFAULT_S3_REGION.to_string()),
            force_path_style: self.force_path_style.unwrap_or(false),
            access_key_id: required_secret(
                "storage.s3.access_key_id",
                secret(
                    "storage.s3.access_key_id",
                    &self.access_key_id,
                    &self.access_key_id_env,
                    &self.access_key_id_file,
                )?,
            )?,
            secret_access_key: required_secret(
                "storage.s3.secret_access_key",
                secret(
                    "storage.s3.secret_access_key",
                    &self.secret_access_key,
                    &self.secret_access_key_env,
                    &self.secret_access_key_file,
                )?,
            )?,
            checksums: checksum_mode(self.checksums.as_deref())?,
            part_size: (part_size_mib * 1024 * 1024) as usize,
            parts_in_flight: parts_in_flight as usize,
        })
    }
}

fn required_secret(key: &str, value: Option<Secret>) -> Result<Secret, ConfigError> {
    value.ok_or_else(|| ConfigError::Missing {
        key: key.into(),
        reason: format!("set {key}, {key}_env or {key}_file"),
    })
}

fn checksum_mode(value: Option<&str>) -> Result<ChecksumMode, ConfigError> {
    match value {
        None | Some("when_required") => Ok(ChecksumMode::WhenRequired),
        Some("when_supported") => Ok(ChecksumMode::WhenSupported),
        Some(other) => Err(ConfigError::invalid(
            "storage.s3.checksums",
            format!("{other:?}"),
            "expected \"when_required\" or \"when_supported\"",
        )),
    }
}

/// Checks the DNS-compatible bucket names that every S3-compatible store accepts.
fn valid_bucket_name(name: &str) -> bool {
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-';
    (3..=63).contains(&name.len())
        && name.chars().all(allowed)
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}
