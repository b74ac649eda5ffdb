//! Removal of what killed builds leave behind: test containers and test databases.
//!
//! A build whose agent dies during the test step (kill -9, a crash, a reboot) leaves its
//! test container and its test database. The next claim of the run removes that run's
//! leftovers before it makes its own: [`remove_earlier_containers`] here, and
//! `TestDatabase::create` for the databases. [`sweep`], which the agent calls at start and
//! from time to time, removes the leftovers of every run.
//!
//! Test containers carry the labels odooops.role=build-test, odooops.run_id and
//! odooops.claim (the claim tag, see [`crate::queue::claim_tag`]). Test databases carry
//! the run id and the claim tag in their name. A resource is a leftover when ops.runs has
//! its run and the run is not running, or is running under another claim. A resource
//! whose run ops.runs does not have is kept, because it belongs to another control plane
//! that shares this Docker engine or database server.

use std::collections::HashMap;

use anyhow::Context;
use bollard::query_parameters::ListContainersOptions;
use bollard::Docker;
use uuid::Uuid;

use crate::config::Settings;
use crate::docker::container::remove_container;
use crate::queue::{Queue, RunState};
use crate::workflows::RunContext;

use super::testdb;

pub const ROLE_LABEL: &str = "odooops.role";
/// Value of [`ROLE_LABEL`] on test containers.
pub const TEST_ROLE: &str = "build-test";
pub const RUN_LABEL: &str = "odooops.run_id";
/// Claim tag of the claim that made a test container.
pub const CLAIM_LABEL: &str = "odooops.claim";

/// Counts of what a sweep removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub containers: usize,
    pub databases: usize,
}

impl Swept {
    pub fn is_empty(&self) -> bool {
        self.containers == 0 && self.databases == 0
    }
}

/// A test container found on the engine.
struct TestContainer {
    id: String,
    name: String,
    run_id: Uuid,
    claim_tag: Option<String>,
}

/// Removes the test containers of earlier claims of the context's run. The run's lease
/// is held and this claim has made no test container yet, so every one found is a
/// leftover. Failures are reported as warnings: the build can go on without it.
pub async fn remove_earlier_containers(ctx: &RunContext, docker: &Docker) {
    let run_id = ctx.run.run_id;
    let found = match list_test_containers(docker, Some(run_id)).await {
        Ok(found) => found,
        Err(err) => {
            let message = format!("Listing test containers of earlier attempts failed: {err:#}");
            ctx.events.warn(message).await;
            return;
        }
    };
    for container in found {
        let name = &container.name;
        match remove_container(docker, &container.id).await {
            Ok(()) => {
                let message = format!("Removed test container {name} of an earlier attempt");
                ctx.events.warn(message).await;
            }
            Err(err) => {
                let message = format!("Removing test container {name} failed: {err}");
                ctx.events.warn(message).await;
            }
        }
    }
}

/// Removes the test containers (when `docker` is given) and the test databases (when
/// build.test_database is configured) of runs that stopped or moved on to another claim.
/// Returns what was removed. Removals that fail are logged and tried again next time.
pub async fn sweep(
    settings: &Settings,
    queue: &Queue,
    docker: Option<&Docker>,
) -> anyhow::Result<Swept> {
    let containers = match docker {
        Some(docker) => list_test_containers(docker, None).await?,
        None => Vec::new(),
    };
    let admin = match &settings.build.test_database {
        Some(database) => Some(testdb::connect(&database.admin_url).await?),
        None => None,
    };
    let databases = match &admin {
        Some(admin) => list_test_databases(admin).await?,
        None => Vec::new(),
    };

    let mut run_ids: Vec<Uuid> = containers
        .iter()
        .map(|container| container.run_id)
        .collect();
    run_ids.extend(databases.iter().map(|(_, run_id, _)| *run_id));
    run_ids.sort_unstable();
    run_ids.dedup();
    if run_ids.is_empty() {
        return Ok(Swept::default());
    }
    let states = queue
        .run_states(&run_ids)
        .await
        .context("reading the state of runs with test containers or databases failed")?;

    let mut swept = Swept::default();
    if let Some(docker) = docker {
        swept.containers = remove_containers(docker, containers, &states).await;
    }
    if let Some(admin) = &admin {
        swept.databases = drop_databases(admin, databases, &states).await;
    }
    Ok(swept)
}

/// Returns whether a resource made by the claim with tag `claim_tag` is a leftover, given
/// the state of its run (`None` when ops.runs does not have the run).
fn is_leftover(state: Option<&RunState>, claim_tag: Option<&str>) -> bool {
    let Some(state) = state else {
        return false;
    };
    if state.status != "running" {
        return true;
    }
    match (&state.claim_tag, claim_tag) {
        (Some(current), Some(tag)) => current != tag,
        // Without a tag the claim is unknown, so the resource may be in use.
        _ => false,
    }
}

/// Lists the test containers, running or not, of one run or of every run. Containers
/// whose run label is not a run id are left out.
async fn list_test_containers(
    docker: &Docker,
    run_id: Option<Uuid>,
) -> anyhow::Result<Vec<TestContainer>> {
    let mut labels = vec![format!("{ROLE_LABEL}={TEST_ROLE}")];
    labels.extend(run_id.map(|run_id| format!("{RUN_LABEL}={run_id}")));
    let options = ListContainersOptions {
        all: true,
        filters: Some(HashMap::from([("label".to_string(), labels)])),
        ..Default::default()
    };
    let summaries = docker
        .list_containers(Some(options))
        .await
        .context("listing test containers failed")?;
    let containers = summaries.into_iter().filter_map(|summary| {
        let labels = summary.labels.unwrap_or_default();
        let run_id = Uuid::try_parse(labels.get(RUN_LABEL)?).ok()?;
        let id = summary.id?;
        let name = summary
            .names
            .and_then(|names| names.into_iter().next())
            .map(|name| name.trim_start_matches('/').to_string())
            .unwrap_or_else(|| id.clone());
        Some(TestContainer {
            id,
            name,
            run_id,
            claim_tag: labels.get(CLAIM_LABEL).cloned(),
        })
    });
    Ok(containers.collect())
}

/// Lists the test databases and roles with their run id and claim tag.
async fn list_test_databases(
    admin: &tokio_postgres::Client,
) -> anyhow::Result<Vec<(String, Uuid, String)>> {
    let names = testdb::list_all(admin).await?;
    let parsed = names.into_iter().filter_map(|name| {
        let (run_id, tag) = testdb::parse_database_name(&name)?;
        let tag = tag.to_string();
        Some((name, run_id, tag))
    });
    Ok(parsed.collect())
}

/// Removes the leftover containers by id, which never names a newer container that took
/// over a leftover's name. Returns how many were removed.
async fn remove_containers(
    docker: &Docker,
    containers: Vec<TestContainer>,
    states: &HashMap<Uuid, RunState>,
) -> usize {
    let mut removed = 0;
    for container in containers {
        let state = states.get(&container.run_id);
        if !is_leftover(state, container.claim_tag.as_deref()) {
            continue;
        }
        let status = state.map_or("", |state| state.status.as_str());
        match remove_container(docker, &container.id).await {
            Ok(()) => {
                removed += 1;
                tracing::info!(container.name = %container.name, run.id = %container.run_id,
                    run.status = status, "removed a leftover test container");
            }
            Err(err) => tracing::warn!(container.name = %container.name,
                run.id = %container.run_id, error = %err, "removing a leftover test container failed"),
        }
    }
    removed
}

/// Drops the leftover test databases and their roles. Returns how many were dropped.
async fn drop_databases(
    admin: &tokio_postgres::Client,
    databases: Vec<(String, Uuid, String)>,
    states: &HashMap<Uuid, RunState>,
) -> usize {
    let mut dropped = 0;
    for (name, run_id, tag) in databases {
        let state = states.get(&run_id);
        if !is_leftover(state, Some(&tag)) {
            continue;
        }
        let status = state.map_or("", |state| state.status.as_str());
        match testdb::drop_with(admin, &name).await {
            Ok(()) => {
                dropped += 1;
                tracing::info!(database = %name, run.id = %run_id, run.status = status,
                    "dropped a leftover test database");
            }
            Err(err) => tracing::warn!(database = %name, run.id = %run_id,
                error = %format!("{err:#}"), "dropping a leftover test database failed"),
        }
    }
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(status: &str, claim_tag: Option<&str>) -> RunState {
        RunState {
            status: status.to_string(),
            claim_tag: claim_tag.map(str::to_string),
        }
    }

    #[test]
    fn resource_of_unknown_run_is_kept() {
        assert!(!is_leftover(None, Some("0badc0de")));
        assert!(!is_leftover(None, None));
    }

    #[test]
    fn resource_of_stopped_run_is_leftover() {
        for status in ["success", "failed", "cancelled", "queued"] {
            assert!(
                is_leftover(Some(&state(status, None)), Some("0badc0de")),
                "{status}"
            );
            assert!(is_leftover(Some(&state(status, None)), None), "{status}");
        }
    }

    #[test]
    fn resource_of_current_claim_is_kept() {
        let running = state("running", Some("0badc0de"));
        assert!(!is_leftover(Some(&running), Some("0badc0de")));
    }

    #[test]
    fn resource_of_earlier_claim_is_leftover() {
        let running = state("running", Some("0badc0de"));
        assert!(is_leftover(Some(&running), Some("12345678")));
    }

    #[test]
    fn untagged_resource_of_running_run_is_kept() {
        let running = state("running", Some("0badc0de"));
        assert!(!is_leftover(Some(&running), None));
    }
}
