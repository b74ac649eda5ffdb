//! A deploy replaces only containers that carry its project's and environment's labels.
//! A container of another project, or one no deploy created, under the configured
//! container_name (or its `-previous` name) fails the run before any container is touched.

mod common;
mod deploy_support;

use std::collections::HashMap;

use bollard::models::ContainerCreateBody;
use bollard::query_parameters::CreateContainerOptionsBuilder;
use deploy_support::{Site, V0, V1, V2};

/// Creates and starts `name` from the test image of V0 with `labels`, and returns its id.
async fn start_stranger(site: &Site, name: &str, labels: HashMap<String, String>) -> String {
    let image = site.image(V0, "healthy").await;
    let options = CreateContainerOptionsBuilder::default().name(name).build();
    let body = ContainerCreateBody {
        image: Some(image),
        labels: Some(labels),
        ..Default::default()
    };
    let created = site
        .docker
        .create_container(Some(options), body)
        .await
        .unwrap();
    site.docker.start_container(name, None).await.unwrap();
    created.id
}

fn other_project_labels() -> HashMap<String, String> {
    HashMap::from([
        ("odooops.project".to_string(), "other-proj".to_string()),
        ("odooops.env".to_string(), "other-prod".to_string()),
    ])
}

/// Asserts that the run failed in its ownership step with an event that names the
/// container and gives the fix.
async fn assert_rejected(site: &Site, run: uuid::Uuid, name: &str, found: &str) {
    let (status, metadata) = site.run(run).await;
    let text = site.event_text(run).await;
    assert_eq!(status, "failed", "{text}");
    assert_eq!(metadata["failed_step"], "ownership", "{text}");
    let rejection = text
        .lines()
        .find(|line| line.starts_with("error: ") && line.contains(name))
        .unwrap_or_else(|| panic!("no error event names {name}:\n{text}"));
    assert!(rejection.contains(found), "{rejection}");
    assert!(rejection.contains("Rename or remove"), "{rejection}");
    assert!(rejection.contains("container_name"), "{rejection}");
}

#[tokio::test]
async fn other_projects_container_is_left_running() {
    let site = Site::new().await;
    site.image(V1, "healthy").await;
    let id = start_stranger(&site, &site.name, other_project_labels()).await;

    let run = site.deploy(V1).await;

    let found = "odooops.project=\"other-proj\" and odooops.env=\"other-prod\"";
    assert_rejected(&site, run, &site.name, found).await;
    let (running, labels, live_id) = site.container_state(&site.name).await.unwrap();
    assert!(running);
    assert_eq!(live_id, id);
    assert_eq!(labels["odooops.project"], "other-proj");
    let previous = format!("{}-previous", site.name);
    assert!(site.container_state(&previous).await.is_none());
}

#[tokio::test]
async fn unlabelled_container_is_left_running() {
    let site = Site::new().await;
    site.image(V1, "healthy").await;
    let id = start_stranger(&site, &site.name, HashMap::new()).await;

    let run = site.deploy(V1).await;

    let found = "no odooops.project or odooops.env label";
    assert_rejected(&site, run, &site.name, found).await;
    let (running, _, live_id) = site.container_state(&site.name).await.unwrap();
    assert!(running);
    assert_eq!(live_id, id);
    let previous = format!("{}-previous", site.name);
    assert!(site.container_state(&previous).await.is_none());
}

#[tokio::test]
async fn same_project_other_environment_is_rejected() {
    let site = Site::new().await;
    site.image(V1, "healthy").await;
    let labels = HashMap::from([
        ("odooops.project".to_string(), "proj".to_string()),
        ("odooops.env".to_string(), "env-prod".to_string()),
    ]);
    let id = start_stranger(&site, &site.name, labels).await;

    let run = site.deploy(V1).await;

    let found = "odooops.env=\"env-prod\"";
    assert_rejected(&site, run, &site.name, found).await;
    let (running, _, live_id) = site.container_state(&site.name).await.unwrap();
    assert!(running);
    assert_eq!(live_id, id);
}

#[tokio::test]
async fn foreign_previous_container_blocks_the_replace() {
    let site = Site::new().await;
    site.image(V1, "healthy").await;
    site.image(V2, "healthy").await;
    site.deploy(V1).await;
    let (_, _, live_id) = site.container_state(&site.name).await.unwrap();
    let previous = format!("{}-previous", site.name);
    let stranger_id = start_stranger(&site, &previous, other_project_labels()).await;

    let run = site.deploy(V2).await;

    assert_rejected(&site, run, &previous, "other-proj").await;
    let (running, _, id) = site.container_state(&previous).await.unwrap();
    assert!(running);
    assert_eq!(id, stranger_id);
    let (running, _, id) = site.container_state(&site.name).await.unwrap();
    assert!(running);
    assert_eq!(id, live_id);
    assert_eq!(site.get("/web/version").await.as_deref(), Some(V1));
}
