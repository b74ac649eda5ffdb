//! Docker engine availability. While the engine does not reply to pings, the claim loop
//! claims only runs that need no engine, so an engine outage leaves the other runs in the
//! queue instead of failing each of them on its first attempt.
//!
//! A run claimed just before the engine stops replying, or already running then, still
//! fails at its first engine call.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bollard::Docker;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{DockerSettings, Settings};
use crate::queue::{ClaimedRun, QueueError};
use crate::systemd;
use crate::workflows::needs_docker;

use super::runner::{Stop, StopReason};
use super::Shared;

/// Maximum wait for the engine's reply to a ping. A healthy engine replies within
/// milliseconds, while docker.timeout_secs is sized for builds that stream for minutes.
const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// systemd status line while the engine is down.
const DOWN_STATUS: &str = "Docker engine unreachable; claiming only runs that need no engine";
/// systemd status line once it is back, the same as at start.
const UP_STATUS: &str = "claiming runs";

/// State of the engine as its pings see it: up, or down since a given instant. It stays
/// up for an agent that serves no run that could need the engine, which never pings it.
#[derive(Clone)]
pub(crate) struct Engine {
    down_since: Arc<Mutex<Option<Instant>>>,
}

impl Engine {
    fn new() -> Engine {
        Engine {
            down_since: Arc::new(Mutex::new(None)),
        }
    }

    pub fn is_up(&self) -> bool {
        self.down_for().is_none()
    }

    /// Returns how long the engine has not replied to pings, `None` while it replies.
    pub fn down_for(&self) -> Option<Duration> {
        let since = *self.down_since.lock().expect("engine state lock");
        since.map(|since| since.elapsed())
    }

    /// Records a ping's outcome. The engine stays down since its first missed ping.
    fn set(&self, up: bool) {
        let mut since = self.down_since.lock().expect("engine state lock");
        *since = if up {
            None
        } else {
            Some((*since).unwrap_or_else(Instant::now))
        };
    }
}

/// Fails the run of `stop` when the engine has not replied to pings for `limit`: a call
/// to an engine that accepts requests but never responds would otherwise hold the run,
/// and its concurrency slot, until the step's own timeout.
pub(super) async fn fail_run_on_loss(engine: Engine, limit: Duration, stop: Arc<Stop>) {
    let check_every = (limit / 4).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(check_every).await;
        if engine.down_for().is_some_and(|down| down >= limit) {
            tracing::error!(
                limit_secs = limit.as_secs(),
                "the Docker engine has not replied for too long; failing the run"
            );
            stop.request(StopReason::EngineLost);
            return;
        }
    }
}

/// Pings the engine once, when some of the `served` workflows may need it, and then
/// keeps pinging it from a task every docker.ping_interval until `stop`. The task
/// notifies `wake` when the engine replies again, so waiting runs are claimed at once.
pub(super) async fn watch(
    settings: &Arc<Settings>,
    served: &[String],
    wake: Arc<Notify>,
    stop: CancellationToken,
) -> Engine {
    let engine = Engine::new();
    if !served
        .iter()
        .any(|workflow| may_need_docker(settings, workflow))
    {
        return engine;
    }
    let client = match ping(&settings.docker, None).await {
        Ok(docker) => Some(docker),
        Err(error) => {
            report_down(&settings.docker, &error);
            engine.set(false);
            None
        }
    };
    let watcher = Watcher {
        settings: settings.clone(),
        engine: engine.clone(),
        wake,
    };
    tokio::spawn(watcher.run(client, stop));
    engine
}

/// Claims the oldest run that needs no engine, for use while the engine is down. The
/// runs are claimed scope by scope (see [`scopes_without_engine`]).
// NOTE: each scope returns its own oldest run, so with several scopes a newer run can be
// claimed before an older one of another scope.
pub(super) async fn claim_without_engine(
    shared: &Shared,
) -> Result<Option<ClaimedRun>, QueueError> {
    let settings = &shared.settings;
    let env_ids = if settings.agent.environments.is_empty() {
        shared.queue.environment_ids().await?
    } else {
        settings.agent.environments.clone()
    };
    let served = shared.queue.filter().workflows.clone().unwrap_or_default();
    for (env_ids, workflows) in scopes_without_engine(settings, &served, env_ids) {
        let claimed = shared
            .queue
            .claim_in(Some(&env_ids), Some(&workflows))
            .await?;
        if claimed.is_some() {
            return Ok(claimed);
        }
    }
    Ok(None)
}

/// Groups environments by the served workflows that need no engine in them, because the
/// claim call takes a list of environments and a list of workflows, not pairs. Returns
/// (environments, workflows) pairs. Environments where every workflow needs the engine
/// are left out.
fn scopes_without_engine(
    settings: &Settings,
    served: &[String],
    env_ids: Vec<String>,
) -> Vec<(Vec<String>, Vec<String>)> {
    let mut scopes: BTreeMap<Vec<String>, Vec<String>> = BTreeMap::new();
    for env_id in env_ids {
        let backup = settings.backup.for_env(&env_id);
        let workflows: Vec<String> = served
            .iter()
            .filter(|workflow| !needs_docker(workflow, backup))
            .cloned()
            .collect();
        if !workflows.is_empty() {
            scopes.entry(workflows).or_default().push(env_id);
        }
    }
    scopes
        .into_iter()
        .map(|(workflows, env_ids)| (env_ids, workflows))
        .collect()
}

/// Returns whether runs of `workflow` need the engine in some environment.
fn may_need_docker(settings: &Settings, workflow: &str) -> bool {
    let backup = &settings.backup;
    std::iter::once(&backup.default)
        .chain(backup.environments.values())
        .any(|env_settings| needs_docker(workflow, env_settings))
}

/// Connects to the engine unless `client` is given, and pings it, within
/// [`PING_TIMEOUT`]. Returns the client or the error text.
async fn ping(settings: &DockerSettings, client: Option<Docker>) -> Result<Docker, String> {
    let attempt = async {
        let docker = match client {
            Some(docker) => docker,
            None => crate::docker::connect(settings)
                .await
                .map_err(|err| err.to_string())?,
        };
        docker.ping().await.map_err(|err| err.to_string())?;
        Ok(docker)
    };
    tokio::time::timeout(PING_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no reply within {} s", PING_TIMEOUT.as_secs())))
}

fn report_down(settings: &DockerSettings, error: &str) {
    let address = crate::docker::address(settings);
    tracing::warn!(
        docker.host = %address,
        error,
        "Docker engine unreachable; claiming only runs that need no engine until it replies"
    );
    systemd::notify_status(DOWN_STATUS);
}

fn report_up(down_for: Duration) {
    tracing::info!(
        down_secs = down_for.as_secs(),
        "Docker engine reachable again; claiming all runs"
    );
    systemd::notify_status(UP_STATUS);
}

/// The task that pings the engine and reports each change once.
struct Watcher {
    settings: Arc<Settings>,
    engine: Engine,
    wake: Arc<Notify>,
}

impl Watcher {
    async fn run(self, mut client: Option<Docker>, stop: CancellationToken) {
        let interval = self.settings.docker.ping_interval;
        let mut down_since = (!self.engine.is_up()).then(Instant::now);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.cancelled() => return,
            }
            match ping(&self.settings.docker, client.take()).await {
                Ok(docker) => {
                    client = Some(docker);
                    if let Some(since) = down_since.take() {
                        self.engine.set(true);
                        report_up(since.elapsed());
                        self.wake.notify_one();
                    }
                }
                Err(error) if down_since.is_none() => {
                    self.engine.set(false);
                    report_down(&self.settings.docker, &error);
                    down_since = Some(Instant::now());
                }
                Err(error) => tracing::debug!(error, "Docker engine still unreachable"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RawConfig;

    fn settings(toml: &str) -> Settings {
        let raw: RawConfig = toml::from_str(toml).expect("test config parses");
        raw.validate_with(Some("postgres://agent@127.0.0.1/ops".into()))
            .expect("test config is valid")
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|name| name.to_string()).collect()
    }

    const MIXED: &str = r#"
        [backup.environments.env-db-container]
        pg_tools = "docker"
        container = "odoo-db"
        [backup.environments.env-neutralize]
        odoo_container = "odoo"
    "#;

    #[test]
    fn host_tools_leave_backups_and_restores_claimable() {
        let settings = settings("");
        let served = names(&["build", "deploy", "backup", "restore", "restore_drill"]);
        let scopes = scopes_without_engine(&settings, &served, names(&["env-a", "env-b"]));
        let expected = (
            names(&["env-a", "env-b"]),
            names(&["backup", "restore", "restore_drill"]),
        );
        assert_eq!(scopes, [expected]);
    }

    #[test]
    fn environments_are_grouped_by_their_tools() {
        let settings = settings(MIXED);
        let served = names(&["build", "backup", "restore", "restore_drill"]);
        let env_ids = names(&["env-db-container", "env-neutralize", "env-plain"]);
        let scopes = scopes_without_engine(&settings, &served, env_ids);
        let neutralize = (
            names(&["env-neutralize"]),
            names(&["backup", "restore_drill"]),
        );
        let plain = (
            names(&["env-plain"]),
            names(&["backup", "restore", "restore_drill"]),
        );
        assert_eq!(scopes, [plain, neutralize]);
    }

    #[test]
    fn builds_and_deploys_are_never_claimable() {
        let settings = settings("");
        let served = names(&["build", "deploy", "promote", "rollback"]);
        let scopes = scopes_without_engine(&settings, &served, names(&["env-a"]));
        assert!(scopes.is_empty(), "{scopes:?}");
    }

    #[test]
    fn may_need_docker_checks_every_environment() {
        let plain = settings("");
        let mixed = settings(MIXED);
        assert!(may_need_docker(&plain, "build"));
        assert!(!may_need_docker(&plain, "backup"));
        assert!(may_need_docker(&mixed, "backup"));
        assert!(may_need_docker(&mixed, "restore"));
        assert!(!may_need_docker(&plain, "restore"));
    }
}
