//! The `[deploy]` section: credentials for pulling images from registries.
//!
//! Each `[[deploy.registries]]` entry applies only to images whose registry host equals
//! its `host`, so a password is never sent to another registry.

use serde::Deserialize;

use super::{secret, ConfigError};
use crate::secret::Secret;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeploy {
    pub registries: Option<Vec<RawRegistry>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegistry {
    pub host: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_env: Option<String>,
    pub password_file: Option<String>,
}

/// Validated `[deploy]` settings.
#[derive(Debug, Clone, Default)]
pub struct DeploySettings {
    pub registries: Vec<RegistryCredentials>,
}

/// A login for one registry host, such as `ghcr.io` or `127.0.0.1:5000`.
#[derive(Debug, Clone)]
pub struct RegistryCredentials {
    pub host: String,
    pub username: String,
    pub password: Secret,
}

impl DeploySettings {
    /// Returns the login for a registry host, if one is configured.
    pub fn credentials_for(&self, host: &str) -> Option<&RegistryCredentials> {
        self.registries
            .iter()
            .find(|entry| entry.host.eq_ignore_ascii_case(host))
    }
}

impl RawDeploy {
    pub fn validate(self) -> Result<DeploySettings, ConfigError> {
        let mut registries: Vec<RegistryCredentials> = Vec::new();
        for (index, raw) in self.registries.unwrap_or_default().into_iter().enumerate() {
            let entry = raw.validate(index)?;
            if registries
                .iter()
                .any(|known| known.host.eq_ignore_ascii_case(&entry.host))
            {
                return Err(ConfigError::invalid(
                    &format!("deploy.registries[{index}].host"),
                    format!("{:?}", entry.host),
                    "another entry already has this host",
                ));
            }
            registries.push(entry);
        }
        Ok(DeploySettings { registries })
    }
}

impl RawRegistry {
    fn validate(self, index: usize) -> Result<RegistryCredentials, ConfigError> {
        let key = |name: &str| format!("deploy.registries[{index}].{name}");
        let host = self.host.unwrap_or_default();
        let valid_host = !host.is_empty()
            && !host.contains('/')
            && !host.contains("://")
            && !host.chars().any(char::is_whitespace);
        if !valid_host {
            return Err(ConfigError::invalid(
                &key("host"),
                format!("{host:?}"),
                "expected a registry host such as ghcr.io or 127.0.0.1:5000, without a scheme",
            ));
        }
        let username = self
            .username
            .filter(|name| !name.is_empty())
            .ok_or_else(|| ConfigError::Missing {
                key: key("username"),
                reason: format!("the login for {host} needs a user name"),
            })?;
        let password = secret(
            &key("password"),
            &self.password,
            &self.password_env,
            &self.password_file,
        )?
        .ok_or_else(|| ConfigError::Missing {
            key: key("password"),
            reason: "set password, password_env or password_file".into(),
        })?;
        Ok(RegistryCredentials {
            host,
            username,
            password,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<DeploySettings, ConfigError> {
        toml::from_str::<RawDeploy>(text).unwrap().validate()
    }

    #[test]
    fn credentials_are_found_by_host_only() {
        let settings =
            parse("[[registries]]\nhost = \"ghcr.io\"\nusername = \"bot\"\npassword = \"pw\"\n")
                .unwrap();
        assert_eq!(settings.credentials_for("GHCR.io").unwrap().username, "bot");
        assert!(settings.credentials_for("docker.io").is_none());
    }

    #[test]
    fn host_with_scheme_is_rejected_by_key() {
        let err = parse("[[registries]]\nhost = \"https://ghcr.io\"\nusername = \"u\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("deploy.registries[0].host"), "{err}");
    }

    #[test]
    fn missing_password_is_reported_without_secrets() {
        let err = parse("[[registries]]\nhost = \"ghcr.io\"\nusername = \"u\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("deploy.registries[0].password"), "{err}");
    }

    #[test]
    fn duplicate_host_is_rejected() {
        let entry = "[[registries]]\nhost = \"ghcr.io\"\nusername = \"u\"\npassword = \"p\"\n";
        let err = parse(&format!("{entry}{entry}")).unwrap_err().to_string();
        assert!(err.contains("deploy.registries[1].host"), "{err}");
    }

    #[test]
    fn password_never_appears_in_debug_output() {
        let settings =
            parse("[[registries]]\nhost = \"ghcr.io\"\nusername = \"u\"\npassword = \"hunter2\"\n")
                .unwrap();
        assert!(!format!("{settings:?}").contains("hunter2"));
    }
}
