//! The `[storage]` section: where artifacts such as run logs and backups are kept.

use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;

/// Next to the agent's work directory under /var/lib/odooops, which the systemd unit's
/// StateDirectory= owns.
pub const DEFAULT_ARTIFACT_DIR: &str = "/var/lib/odooops/artifacts";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStorage {
    /// "local" (the default).
    pub backend: Option<String>,
    /// Root directory of the local backend.
    pub local_dir: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct StorageSettings {
    pub backend: StorageBackend,
}

#[derive(Debug, Clone)]
pub enum StorageBackend {
    /// Files under one directory.
    Local { dir: PathBuf },
}

impl RawStorage {
    pub(super) fn validate(self) -> Result<StorageSettings, ConfigError> {
        let backend = match self.backend.as_deref() {
            None | Some("local") => {
                let dir = self
                    .local_dir
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_ARTIFACT_DIR));
                if !dir.is_absolute() {
                    return Err(ConfigError::invalid(
                        "storage.local_dir",
                        dir.display(),
                        "must be an absolute path",
                    ));
                }
                StorageBackend::Local { dir }
            }
            Some(other) => {
                return Err(ConfigError::invalid(
                    "storage.backend",
                    format!("{other:?}"),
                    "expected \"local\"",
                ))
            }
        };
        Ok(StorageSettings { backend })
    }
}
