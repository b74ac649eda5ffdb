//! The `[build]` section: defaults and limits of the build workflow, and the PostgreSQL
//! server where test runs get a throwaway database.

use std::time::Duration;

use serde::Deserialize;

use super::{seconds, secret, ConfigError};
use crate::secret::Secret;

/// The test command of the OdooOps GitHub build job: update every module with tests
/// enabled, then exit.
pub const DEFAULT_TEST_COMMAND: &str =
    "odoo -c /etc/odoo/odoo.conf -u all --test-enable --stop-after-init --log-level=test";
/// A clone of a large Odoo addons repository over a slow link takes minutes.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(600);
/// An Odoo image that installs Python and system packages builds in 10 to 30 minutes.
pub const DEFAULT_BUILD_TIMEOUT: Duration = Duration::from_secs(3600);
/// `-u all --test-enable` on a full Odoo runs every module's tests: up to an hour.
pub const DEFAULT_TEST_TIMEOUT: Duration = Duration::from_secs(3600);
/// Pushing a 1-2 GB Odoo image over a droplet's uplink.
pub const DEFAULT_PUSH_TIMEOUT: Duration = Duration::from_secs(1800);
/// Engine default network: containers reach the host through the bridge gateway.
pub const DEFAULT_TEST_NETWORK: &str = "bridge";

/// A command as a string split on whitespace, or as an argument array.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum CommandLine {
    Text(String),
    Args(Vec<String>),
}

impl CommandLine {
    /// Returns the argument vector. A string is split on whitespace without any quoting
    /// rules, because no shell is involved; use an array for arguments with spaces.
    pub fn to_args(&self) -> Result<Vec<String>, &'static str> {
        let args: Vec<String> = match self {
            CommandLine::Text(text) => text.split_whitespace().map(str::to_string).collect(),
            CommandLine::Args(args) => args.clone(),
        };
        if args.first().is_none_or(|program| program.trim().is_empty()) {
            return Err("must name a program");
        }
        if args.iter().any(|arg| arg.contains('\0')) {
            return Err("must not contain NUL characters");
        }
        Ok(args)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBuild {
    pub test_command: Option<CommandLine>,
    pub fetch_timeout_secs: Option<u64>,
    pub build_timeout_secs: Option<u64>,
    pub test_timeout_secs: Option<u64>,
    pub push_timeout_secs: Option<u64>,
    /// Pull newer base images on every build.
    pub pull: Option<bool>,
    /// Network mode of the test container: bridge, host, none or a network name.
    pub test_network: Option<String>,
    pub test_database: Option<RawTestDatabase>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTestDatabase {
    /// URL of a role with CREATEDB and CREATEROLE, used to create and drop test databases.
    pub admin_url: Option<String>,
    pub admin_url_env: Option<String>,
    pub admin_url_file: Option<String>,
    /// Address the test container connects to. Defaults to the admin URL's host when the
    /// test network is "host". On a bridge network it must be set, usually to the bridge
    /// gateway 172.17.0.1, because 127.0.0.1 inside a container is the container itself.
    pub host: Option<String>,
    /// Port the test container connects to; defaults to the admin URL's port.
    pub port: Option<u16>,
}

#[derive(Debug, Clone)]
pub struct BuildSettings {
    pub test_command: Vec<String>,
    pub fetch_timeout: Duration,
    pub build_timeout: Duration,
    pub test_timeout: Duration,
    pub push_timeout: Duration,
    pub pull: bool,
    pub test_network: String,
    /// `None` runs the test command without a database.
    pub test_database: Option<TestDatabaseSettings>,
}

#[derive(Debug, Clone)]
pub struct TestDatabaseSettings {
    pub admin_url: Secret,
    pub host: String,
    pub port: u16,
}

impl RawBuild {
    pub(super) fn validate(self) -> Result<BuildSettings, ConfigError> {
        let command = self
            .test_command
            .unwrap_or_else(|| CommandLine::Text(DEFAULT_TEST_COMMAND.to_string()));
        let test_command = command.to_args().map_err(|reason| {
            ConfigError::invalid("build.test_command", format!("{command:?}"), reason)
        })?;

        let test_network = self
            .test_network
            .unwrap_or_else(|| DEFAULT_TEST_NETWORK.into());
        if !is_network_name(&test_network) {
            return Err(ConfigError::invalid(
                "build.test_network",
                format!("{test_network:?}"),
                "expected bridge, host, none or a network name",
            ));
        }
        let timeout = |key, value: Option<u64>, default: Duration| match value {
            Some(secs) => seconds(key, secs, 1, 86_400),
            None => Ok(default),
        };
        let test_database = match self.test_database {
            Some(raw) => Some(raw.validate(&test_network)?),
            None => None,
        };
        Ok(BuildSettings {
            test_command,
            fetch_timeout: timeout(
                "build.fetch_timeout_secs",
                self.fetch_timeout_secs,
                DEFAULT_FETCH_TIMEOUT,
            )?,
            build_timeout: timeout(
                "build.build_timeout_secs",
                self.build_timeout_secs,
                DEFAULT_BUILD_TIMEOUT,
            )?,
            test_timeout: timeout(
                "build.test_timeout_secs",
                self.test_timeout_secs,
                DEFAULT_TEST_TIMEOUT,
            )?,
            push_timeout: timeout(
                "build.push_timeout_secs",
                self.push_timeout_secs,
                DEFAULT_PUSH_TIMEOUT,
            )?,
            pull: self.pull.unwrap_or(false),
            test_network,
            test_database,
        })
    }
}

impl RawTestDatabase {
    fn validate(self, test_network: &str) -> Result<TestDatabaseSettings, ConfigError> {
        let admin_url = secret(
            "build.test_database.admin_url",
            &self.admin_url,
            &self.admin_url_env,
            &self.admin_url_file,
        )?
        .ok_or_else(|| ConfigError::Missing {
            key: "build.test_database.admin_url".into(),
            reason: "set admin_url, admin_url_env or admin_url_file, or remove the section \
                     to run tests without a database"
                .into(),
        })?;
        let parsed = crate::db::parse_url(&admin_url).map_err(|reason| ConfigError::Invalid {
            key: "build.test_database.admin_url".into(),
            value: "<redacted>".into(),
            reason,
        })?;
        let url_host = parsed.get_hosts().first().and_then(|host| match host {
            tokio_postgres::config::Host::Tcp(name) => Some(name.clone()),
            _ => None,
        });
        let host = match (self.host, test_network) {
            (Some(host), _) if !host.trim().is_empty() => host,
            (_, "host") => url_host.ok_or_else(|| ConfigError::Missing {
                key: "build.test_database.host".into(),
                reason: "the admin URL has no TCP host to default to".into(),
            })?,
            _ => {
                return Err(ConfigError::Missing {
                    key: "build.test_database.host".into(),
                    reason: format!(
                        "set the address test containers on the {test_network:?} network reach \
                         the server at (such as the bridge gateway 172.17.0.1), or set \
                         build.test_network = \"host\""
                    ),
                })
            }
        };
        let port = self
            .port
            .or_else(|| parsed.get_ports().first().copied())
            .unwrap_or(5432);
        Ok(TestDatabaseSettings {
            admin_url,
            host,
            port,
        })
    }
}

fn is_network_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(text: &str) -> Result<BuildSettings, ConfigError> {
        let raw: RawBuild = toml::from_str(text).unwrap();
        raw.validate()
    }

    #[test]
    fn defaults_test_without_database() {
        let settings = build("").unwrap();
        assert_eq!(settings.test_command[0], "odoo");
        assert_eq!(settings.test_command.len(), 8);
        assert_eq!(settings.test_timeout, DEFAULT_TEST_TIMEOUT);
        assert_eq!(settings.test_network, "bridge");
        assert!(settings.test_database.is_none());
    }

    #[test]
    fn test_command_may_be_an_array() {
        let settings = build("test_command = [\"sh\", \"-c\", \"echo a b\"]").unwrap();
        assert_eq!(settings.test_command, ["sh", "-c", "echo a b"]);
    }

    #[test]
    fn empty_test_command_is_rejected() {
        let err = build("test_command = \"  \"").unwrap_err().to_string();
        assert!(err.contains("build.test_command"), "{err}");
    }

    #[test]
    fn host_network_uses_admin_url_host() {
        let settings = build(
            "test_network = \"host\"\n[test_database]\n\
             admin_url = \"postgres://admin:pw@127.0.0.1:5433/postgres\"",
        )
        .unwrap();
        let database = settings.test_database.unwrap();
        assert_eq!(database.host, "127.0.0.1");
        assert_eq!(database.port, 5433);
    }

    #[test]
    fn bridge_network_requires_an_explicit_database_host() {
        let err = build("[test_database]\nadmin_url = \"postgres://admin:pw@127.0.0.1/postgres\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("build.test_database.host"), "{err}");
        assert!(!err.contains("pw@"), "{err}");
    }

    #[test]
    fn network_name_with_shell_characters_is_rejected() {
        let err = build("test_network = \"host; reboot\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("build.test_network"), "{err}");
    }

    #[test]
    fn example_config_shows_the_defaults() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let raw: crate::config::RawConfig = toml::from_str(&text).unwrap();
        let example = raw.build.validate().unwrap();
        let defaults = build("").unwrap();
        assert_eq!(example.test_command, defaults.test_command);
        assert_eq!(example.fetch_timeout, DEFAULT_FETCH_TIMEOUT);
        assert_eq!(example.build_timeout, DEFAULT_BUILD_TIMEOUT);
        assert_eq!(example.test_timeout, DEFAULT_TEST_TIMEOUT);
        assert_eq!(example.push_timeout, DEFAULT_PUSH_TIMEOUT);
        assert_eq!(example.pull, defaults.pull);
        assert_eq!(example.test_network, DEFAULT_TEST_NETWORK);
    }

    #[test]
    fn zero_timeout_is_rejected() {
        let err = build("test_timeout_secs = 0").unwrap_err().to_string();
        assert!(err.contains("build.test_timeout_secs"), "{err}");
    }
}
