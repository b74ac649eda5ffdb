//! Agents started inside the test process, stopped the way SIGTERM stops the daemon.

use std::sync::Arc;
use std::time::Duration;

use odooops_agent::agent::{self, Mode, Shutdown, Summary};
use odooops_agent::config::{RawConfig, Settings};
use odooops_agent::workflows::Workflows;
use tokio::task::JoinHandle;

/// Settings from TOML for the database at `url`.
pub fn settings(url: &str, toml: &str) -> Arc<Settings> {
    let raw: RawConfig = toml::from_str(toml).expect("test config parses");
    Arc::new(
        raw.validate_with(Some(url.to_string()))
            .expect("test config is valid"),
    )
}

/// Short intervals, so leases expire and runs are reaped within seconds.
const FAST_AGENT: &str = "poll_interval_secs = 1\nlease_secs = 5\nheartbeat_interval_secs = 1\n\
                          reap_interval_secs = 1\nshutdown_grace_secs = 5\n";
const SMALL_DATABASE: &str = "pool_size = 4\nconnect_timeout_secs = 2\n";

/// Agent config TOML for worker `worker_id` with short intervals; `agent_keys` (TOML
/// lines) add to or replace keys of the [agent] table.
pub fn config(worker_id: &str, agent_keys: &str) -> String {
    config_with(worker_id, agent_keys, "")
}

/// Like [`config`], with `database_keys` added to or replacing keys of [database].
pub fn config_with(worker_id: &str, agent_keys: &str, database_keys: &str) -> String {
    let mut agent = table(FAST_AGENT, agent_keys);
    agent.insert("worker_id".into(), worker_id.into());
    let mut root = toml::Table::new();
    root.insert("agent".into(), agent.into());
    root.insert(
        "database".into(),
        table(SMALL_DATABASE, database_keys).into(),
    );
    toml::to_string(&root).expect("config serializes")
}

fn table(defaults: &str, overrides: &str) -> toml::Table {
    let mut table: toml::Table = toml::from_str(defaults).unwrap();
    let overrides: toml::Table = toml::from_str(overrides).expect("test config keys parse");
    table.extend(overrides);
    table
}

/// An agent running in [`Mode::Daemon`] on a task of the test's runtime.
pub struct RunningAgent {
    pub shutdown: Shutdown,
    handle: JoinHandle<anyhow::Result<Summary>>,
}

impl RunningAgent {
    pub fn start(settings: Arc<Settings>, workflows: Workflows) -> RunningAgent {
        let shutdown = Shutdown::default();
        let handle = tokio::spawn(agent::run(
            settings,
            workflows,
            Mode::Daemon,
            shutdown.clone(),
        ));
        RunningAgent { shutdown, handle }
    }

    pub fn is_running(&self) -> bool {
        !self.handle.is_finished()
    }

    /// Drains the agent and returns its summary.
    pub async fn stop(self) -> Summary {
        self.shutdown.drain.cancel();
        self.join().await
    }

    /// Waits for the agent to return on its own (after a stop request).
    pub async fn join(self) -> Summary {
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("agent did not stop within 30 s")
            .expect("agent task panicked")
            .expect("agent failed")
    }
}

/// Registers one workflow under `name`.
pub fn only(name: &str, workflow: impl odooops_agent::workflows::Workflow) -> Workflows {
    let mut workflows = Workflows::new();
    workflows.register(name, workflow);
    workflows
}
