//! Secrets read from the config file, an environment variable or a file.
//!
//! A [`Secret`] never prints its value: `Debug` and `Display` show a placeholder, so a
//! secret that ends up in a log line or an error message leaks nothing.

use std::fmt;
use std::path::Path;

/// A value that must not appear in logs, events or error messages.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// Returns the secret itself, for handing it to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(\"<redacted>\")")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Source of a secret. At most one of the value itself, an environment variable or a
/// file may be set in the config.
#[derive(Debug, Clone, Default)]
pub struct SecretSource {
    pub value: Option<String>,
    pub env: Option<String>,
    pub file: Option<String>,
}

/// Failure to read a secret. The variants name the config key and the variable or path,
/// never the secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{key}: set only one of `{key}`, `{key}_env` and `{key}_file`")]
    Ambiguous { key: String },
    #[error("{key}_env: environment variable {var:?} is not set")]
    MissingEnv { key: String, var: String },
    #[error("{key}_file: reading {path:?} failed: {source}")]
    File {
        key: String,
        path: String,
        source: std::io::Error,
    },
    #[error("{key}_file: {path:?} is empty")]
    EmptyFile { key: String, path: String },
}

impl SecretSource {
    /// Resolves the source into a secret, or `None` when nothing is configured.
    ///
    /// A file path may start with `${CREDENTIALS_DIRECTORY}`, which is replaced by the
    /// directory where systemd's LoadCredential= puts the service's credentials. One
    /// trailing newline is removed from file contents.
    pub fn resolve(&self, key: &str) -> Result<Option<Secret>, SecretError> {
        let set = [&self.value, &self.env, &self.file]
            .iter()
            .filter(|v| v.is_some())
            .count();
        if set > 1 {
            return Err(SecretError::Ambiguous { key: key.into() });
        }
        if let Some(value) = &self.value {
            return Ok(Some(Secret::new(value.clone())));
        }
        if let Some(var) = &self.env {
            return match std::env::var(var) {
                Ok(value) if !value.is_empty() => Ok(Some(Secret::new(value))),
                _ => Err(SecretError::MissingEnv {
                    key: key.into(),
                    var: var.clone(),
                }),
            };
        }
        match &self.file {
            Some(path) => read_secret_file(key, path).map(Some),
            None => Ok(None),
        }
    }
}

fn read_secret_file(key: &str, path: &str) -> Result<Secret, SecretError> {
    let expanded = expand_credentials_directory(path);
    let contents =
        std::fs::read_to_string(Path::new(&expanded)).map_err(|source| SecretError::File {
            key: key.into(),
            path: expanded.clone(),
            source,
        })?;
    let trimmed = contents
        .strip_suffix('\n')
        .map(|s| s.strip_suffix('\r').unwrap_or(s))
        .unwrap_or(&contents);
    if trimmed.is_empty() {
        return Err(SecretError::EmptyFile {
            key: key.into(),
            path: expanded,
        });
    }
    Ok(Secret::new(trimmed))
}

fn expand_credentials_directory(path: &str) -> String {
    const VAR: &str = "${CREDENTIALS_DIRECTORY}";
    match (
        path.strip_prefix(VAR),
        std::env::var("CREDENTIALS_DIRECTORY"),
    ) {
        (Some(rest), Ok(dir)) => format!("{dir}{rest}"),
        _ => path.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_redacted_in_debug_and_display() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret}"), "<redacted>");
        assert!(!format!("{secret:?}").contains("hunter2"));
    }

    #[test]
    fn two_sources_for_one_secret_are_rejected() {
        let source = SecretSource {
            value: Some("a".into()),
            env: Some("B".into()),
            file: None,
        };
        let err = source.resolve("registry.password").unwrap_err();
        assert!(err.to_string().contains("registry.password"));
    }

    #[test]
    fn secret_file_loses_its_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\n").unwrap();
        let source = SecretSource {
            file: Some(path.to_string_lossy().into_owned()),
            ..Default::default()
        };
        let secret = source
            .resolve("storage.s3.secret_access_key")
            .unwrap()
            .unwrap();
        assert_eq!(secret.expose(), "s3cret");
    }

    #[test]
    fn missing_secret_file_error_names_key_and_path_only() {
        let source = SecretSource {
            file: Some("/nonexistent/odooops-secret".into()),
            ..Default::default()
        };
        let err = source.resolve("database.url").unwrap_err().to_string();
        assert!(err.starts_with("database.url_file"), "{err}");
        assert!(err.contains("/nonexistent/odooops-secret"), "{err}");
    }
}
