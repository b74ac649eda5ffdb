//! What a build needs to know about its project: where the sources are, where the image
//! goes, and the per-project and per-environment settings that override the agent's.
//!
//! Overrides live under the key `build` of ops.projects.config and ops.environments.config;
//! an environment's value wins over its project's:
//!
//! ```json
//! {"build": {"test_command": ["odoo", "-c", "/etc/odoo/odoo.conf", "--test-enable"],
//!            "test_timeout_secs": 900, "test_env": {"ODOO_TEST_LINES": "200"},
//!            "dockerfile": "docker/Dockerfile", "context": ".", "image": "acme/odoo"}}
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, Context};
use serde::Deserialize;
use serde_json::Value;

use crate::config::{BuildSettings, CommandLine};
use crate::docker::ignore::clean;
use crate::source::RepoUrl;

/// Settings a project or environment may override.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildOverrides {
    pub test_command: Option<CommandLine>,
    pub test_timeout_secs: Option<u64>,
    pub test_env: Option<BTreeMap<String, String>>,
    /// Dockerfile path relative to the context directory.
    pub dockerfile: Option<String>,
    /// Build context directory relative to the repository root.
    pub context: Option<String>,
    /// Image repository, used when ops.projects.image is not set.
    pub image: Option<String>,
}

/// The build settings of one run, after overrides.
#[derive(Debug)]
pub struct Project {
    pub repo_url: RepoUrl,
    /// ops.projects.image, or the `build.image` override.
    pub image: String,
    pub test_command: Vec<String>,
    pub test_timeout: Duration,
    pub test_env: BTreeMap<String, String>,
    pub dockerfile: String,
    pub context: String,
}

impl Project {
    /// Reads the project and environment rows of a run.
    pub async fn load(
        pool: &deadpool_postgres::Pool,
        project_id: &str,
        env_id: &str,
        defaults: &BuildSettings,
    ) -> anyhow::Result<Project> {
        let client = pool
            .get()
            .await
            .context("connecting to the control plane failed")?;
        let row = client
            .query_opt(
                "SELECT p.repo_url, p.image, p.config -> 'build' AS project_build,
                        e.config -> 'build' AS env_build
                   FROM ops.projects p
                   JOIN ops.environments e ON e.project_id = p.project_id
                  WHERE p.project_id = $1 AND e.env_id = $2",
                &[&project_id, &env_id],
            )
            .await
            .context("reading the project failed")?
            .ok_or_else(|| anyhow!("project {project_id} has no environment {env_id}"))?;
        let repo_url: Option<String> = row.get("repo_url");
        let image: Option<String> = row.get("image");
        let project = overrides(row.get("project_build"), "ops.projects.config")?;
        let env = overrides(row.get("env_build"), "ops.environments.config")?;
        Project::resolve(repo_url, image, project, env, defaults)
            .with_context(|| format!("project {project_id} in environment {env_id}"))
    }

    fn resolve(
        repo_url: Option<String>,
        image: Option<String>,
        project: BuildOverrides,
        env: BuildOverrides,
        defaults: &BuildSettings,
    ) -> anyhow::Result<Project> {
        let repo_url = repo_url
            .filter(|url| !url.is_empty())
            .ok_or_else(|| anyhow!("ops.projects.repo_url is not set"))?;
        let repo_url = RepoUrl::parse(&repo_url)?;
        let image = image
            .filter(|image| !image.is_empty())
            .or(env.image)
            .or(project.image)
            .ok_or_else(|| anyhow!("ops.projects.image is not set, nor config.build.image"))?;

        let test_command = match env.test_command.or(project.test_command) {
            Some(command) => command
                .to_args()
                .map_err(|reason| anyhow!("config.build.test_command {reason}"))?,
            None => defaults.test_command.clone(),
        };
        let test_timeout = match env.test_timeout_secs.or(project.test_timeout_secs) {
            Some(secs) if (1..=86_400).contains(&secs) => Duration::from_secs(secs),
            Some(secs) => {
                return Err(anyhow!(
                    "config.build.test_timeout_secs {secs} is not 1 to 86400"
                ))
            }
            None => defaults.test_timeout,
        };
        let mut test_env = project.test_env.unwrap_or_default();
        test_env.extend(env.test_env.unwrap_or_default());
        if let Some(name) = test_env.keys().find(|name| !is_env_name(name)) {
            return Err(anyhow!(
                "config.build.test_env has an invalid variable name {name:?}"
            ));
        }
        let dockerfile = env.dockerfile.or(project.dockerfile);
        let context = env.context.or(project.context);
        Ok(Project {
            repo_url,
            image,
            test_command,
            test_timeout,
            test_env,
            dockerfile: relative_path("dockerfile", dockerfile.as_deref().unwrap_or("Dockerfile"))?,
            context: relative_path("context", context.as_deref().unwrap_or("."))?,
        })
    }
}

fn overrides(value: Option<Value>, column: &str) -> anyhow::Result<BuildOverrides> {
    match value {
        None | Some(Value::Null) => Ok(BuildOverrides::default()),
        Some(value) => serde_json::from_value(value)
            .with_context(|| format!("{column} has an invalid \"build\" object")),
    }
}

/// Checks that `path` stays inside the repository: relative, without `..`.
fn relative_path(key: &str, path: &str) -> anyhow::Result<String> {
    let cleaned = clean(path);
    if cleaned.starts_with('/') || cleaned == ".." || cleaned.starts_with("../") {
        return Err(anyhow!(
            "config.build.{key} {path:?} must be a path inside the repository"
        ));
    }
    if path.chars().any(char::is_control) {
        return Err(anyhow!(
            "config.build.{key} {path:?} contains control characters"
        ));
    }
    Ok(cleaned)
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> BuildSettings {
        let raw: crate::config::RawConfig = toml::from_str("").unwrap();
        raw.validate_with(Some("postgres://u@localhost/db".into()))
            .unwrap()
            .build
    }

    fn parse(json: &str) -> BuildOverrides {
        overrides(Some(serde_json::from_str(json).unwrap()), "test").unwrap()
    }

    fn resolve(project: &str, env: &str) -> anyhow::Result<Project> {
        Project::resolve(
            Some("/srv/git/odoo".into()),
            Some("acme/odoo".into()),
            parse(project),
            parse(env),
            &defaults(),
        )
    }

    #[test]
    fn environment_overrides_win_over_the_project() {
        let project = resolve(
            r#"{"test_command": "odoo --test-enable", "test_env": {"A": "1", "B": "1"}}"#,
            r#"{"test_command": ["odoo", "-u", "sale"], "test_env": {"B": "2"}}"#,
        )
        .unwrap();
        assert_eq!(project.test_command, ["odoo", "-u", "sale"]);
        assert_eq!(project.test_env["A"], "1");
        assert_eq!(project.test_env["B"], "2");
    }

    #[test]
    fn defaults_apply_without_overrides() {
        let project = resolve("{}", "{}").unwrap();
        assert_eq!(project.test_command, defaults().test_command);
        assert_eq!(project.dockerfile, "Dockerfile");
        assert_eq!(project.context, ".");
    }

    #[test]
    fn paths_leaving_the_repository_are_rejected() {
        for path in ["../Dockerfile", "/etc/Dockerfile", "a/../../b"] {
            let json = format!(r#"{{"dockerfile": "{path}"}}"#);
            let err = resolve(&json, "{}").unwrap_err();
            assert!(format!("{err:#}").contains("dockerfile"), "{path}: {err:#}");
        }
    }

    #[test]
    fn unknown_override_key_is_rejected() {
        let err = overrides(
            Some(serde_json::json!({"test_comand": "x"})),
            "ops.projects.config",
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("test_comand"), "{err:#}");
    }

    #[test]
    fn invalid_env_name_is_rejected() {
        let err = resolve(r#"{"test_env": {"A=B": "1"}}"#, "{}").unwrap_err();
        assert!(format!("{err:#}").contains("A=B"), "{err:#}");
    }
}
