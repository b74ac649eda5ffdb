//! The `[registry]` section: where built images are pushed, and the credentials.

use serde::Deserialize;

use super::{secret, ConfigError};
use crate::secret::Secret;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegistry {
    /// Registry host with an optional port and namespace: `ghcr.io/acme`,
    /// `127.0.0.1:5000`. A leading https:// is accepted and dropped.
    pub url: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_env: Option<String>,
    pub password_file: Option<String>,
}

#[derive(Debug, Clone)]
pub struct RegistrySettings {
    /// Host and optional port, such as `ghcr.io` or `127.0.0.1:5000`.
    pub host: String,
    /// Path prepended to image names without a host, such as `acme`; may be empty.
    pub namespace: String,
    /// Username and password; `None` pushes without credentials.
    pub credentials: Option<(String, Secret)>,
}

impl RegistrySettings {
    /// Returns the registry address with its namespace, the prefix of image references.
    pub fn prefix(&self) -> String {
        if self.namespace.is_empty() {
            self.host.clone()
        } else {
            format!("{}/{}", self.host, self.namespace)
        }
    }
}

impl RawRegistry {
    /// Returns `None` when the section sets nothing.
    pub(super) fn validate(self) -> Result<Option<RegistrySettings>, ConfigError> {
        let password = secret(
            "registry.password",
            &self.password,
            &self.password_env,
            &self.password_file,
        )?;
        let Some(url) = self.url.filter(|url| !url.is_empty()) else {
            if self.username.is_some() || password.is_some() {
                return Err(ConfigError::Missing {
                    key: "registry.url".into(),
                    reason: "credentials are set but not the registry they are for".into(),
                });
            }
            return Ok(None);
        };
        let (host, namespace) = parse_url(&url)?;
        let credentials = match (self.username, password) {
            (Some(username), Some(password)) if !username.is_empty() => Some((username, password)),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Missing {
                    key: "registry.username".into(),
                    reason: "set both registry.username and a registry.password source, \
                             or neither"
                        .into(),
                })
            }
        };
        Ok(Some(RegistrySettings {
            host,
            namespace,
            credentials,
        }))
    }
}

/// Splits `[https://]host[:port][/namespace]` and checks each part.
fn parse_url(url: &str) -> Result<(String, String), ConfigError> {
    let redacted = without_userinfo(url);
    let invalid =
        |reason: &str| ConfigError::invalid("registry.url", format!("{redacted:?}"), reason);
    if url.contains('@') {
        return Err(invalid(
            "put no user or password in the URL; use registry.username and \
             registry.password_env or password_file",
        ));
    }
    if url.starts_with("http://") {
        return Err(invalid(
            "give the host without http://; the engine decides whether to use TLS",
        ));
    }
    let bare = url
        .strip_prefix("https://")
        .unwrap_or(url)
        .trim_end_matches('/');
    let (host, namespace) = bare.split_once('/').unwrap_or((bare, ""));
    if !is_registry_host(host) {
        return Err(invalid(
            "expected a host name or address with an optional :port",
        ));
    }
    if !namespace.is_empty() && !namespace.split('/').all(is_path_component) {
        return Err(invalid(
            "the namespace after the host must be lowercase letters, digits and . _ - \
             separated by /",
        ));
    }
    Ok((host.to_string(), namespace.to_string()))
}

/// Replaces what comes before an `@` in the URL's host part, where a user and password
/// would be, so that an error message never shows them.
fn without_userinfo(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    let host_end = rest.find('/').unwrap_or(rest.len());
    match rest[..host_end].rfind('@') {
        Some(at) => format!("{scheme}***{}", &rest[at..]),
        None => url.to_string(),
    }
}

/// Checks that `host` is a registry host as Docker references allow it: DNS labels or an
/// IPv4 address, with an optional port.
pub fn is_registry_host(host: &str) -> bool {
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    };
    let port_ok =
        port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    let name_ok = !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    port_ok && name_ok
}

/// Checks that `component` is a path component of an image name: runs of `[a-z0-9]`
/// joined by `.`, `_`, `__` or any number of `-`.
pub fn is_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(&bytes[0]) || !alnum(&bytes[bytes.len() - 1]) {
        return false;
    }
    let mut separator = String::new();
    for &b in bytes {
        if alnum(&b) {
            if !matches!(separator.as_str(), "" | "." | "_" | "__")
                && !separator.bytes().all(|s| s == b'-')
            {
                return false;
            }
            separator.clear();
        } else if matches!(b, b'.' | b'_' | b'-') {
            separator.push(b as char);
        } else {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(toml_text: &str) -> Result<Option<RegistrySettings>, ConfigError> {
        let raw: RawRegistry = toml::from_str(toml_text).unwrap();
        raw.validate()
    }

    #[test]
    fn host_namespace_and_credentials_are_read() {
        let settings =
            registry("url = \"https://ghcr.io/acme/\"\nusername = \"bot\"\npassword = \"pw\"")
                .unwrap()
                .unwrap();
        assert_eq!(settings.host, "ghcr.io");
        assert_eq!(settings.namespace, "acme");
        assert_eq!(settings.prefix(), "ghcr.io/acme");
        let (user, password) = settings.credentials.unwrap();
        assert_eq!(user, "bot");
        assert_eq!(password.expose(), "pw");
    }

    #[test]
    fn loopback_registry_with_port_is_accepted() {
        let settings = registry("url = \"127.0.0.1:5000\"").unwrap().unwrap();
        assert_eq!(settings.prefix(), "127.0.0.1:5000");
        assert!(settings.credentials.is_none());
    }

    #[test]
    fn empty_section_means_no_registry() {
        assert!(registry("").unwrap().is_none());
    }

    #[test]
    fn username_without_password_is_rejected() {
        let err = registry("url = \"ghcr.io\"\nusername = \"bot\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("registry.username"), "{err}");
    }

    #[test]
    fn malformed_urls_name_the_key() {
        for url in [
            "http://ghcr.io",
            "ghcr.io:port",
            "-x.io",
            "ghcr.io/Acme",
            "ghcr.io/a//b",
        ] {
            let err = registry(&format!("url = \"{url}\""))
                .unwrap_err()
                .to_string();
            assert!(err.contains("registry.url"), "{url}: {err}");
        }
    }

    #[test]
    fn credentials_in_url_are_rejected_redacted() {
        for url in ["https://bot:hunter2@ghcr.io", "bot:hunter2@ghcr.io/acme"] {
            let err = registry(&format!("url = \"{url}\""))
                .unwrap_err()
                .to_string();
            assert!(err.contains("registry.url"), "{url}: {err}");
            assert!(err.contains("registry.username"), "{url}: {err}");
            assert!(!err.contains("hunter2"), "{url}: {err}");
        }
    }

    #[test]
    fn password_never_appears_in_debug_output() {
        let settings = registry("url = \"ghcr.io\"\nusername = \"bot\"\npassword = \"hunter2\"")
            .unwrap()
            .unwrap();
        assert!(!format!("{settings:?}").contains("hunter2"));
    }

    #[test]
    fn path_components_follow_the_reference_grammar() {
        for good in ["odoo", "odoo-ce", "a.b", "a__b", "a--b", "v17"] {
            assert!(is_path_component(good), "{good}");
        }
        for bad in ["Odoo", "-a", "a-", "a..b", "a___b", "", "a b"] {
            assert!(!is_path_component(bad), "{bad}");
        }
    }
}
