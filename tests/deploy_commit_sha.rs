//! Deploying runs accept only commit shas. A tag such as v2 can move to another commit,
//! so a run naming one fails before it touches a container, and a deploy that an older
//! agent recorded under a tag is not started again from that tag's image.

mod common;
mod deploy_support;

use deploy_support::{free_port, Site, BAD, V1};
use serde_json::json;
use uuid::Uuid;

/// Records a successful deploy of `sha` to env-dev without running it, as an agent that
/// accepted tags would have left it in the history.
async fn record_past_deploy(site: &Site, sha: &str) -> Uuid {
    let row = site
        .db
        .client()
        .await
        .query_one(
            "INSERT INTO ops.runs (project_id, env_id, status, git_sha, metadata, finished_at)
             VALUES ('proj', 'env-dev', 'success', $1, '{\"workflow\": \"deploy\"}', now())
             RETURNING run_id",
            &[&sha],
        )
        .await
        .unwrap();
    row.get(0)
}

#[tokio::test]
async fn tag_sha_fails_before_touching_container() {
    let site = Site::new().await;
    let staging = format!("{}-staging", site.name);
    let staging_port = free_port();
    site.configure(
        "env-staging",
        json!({"container_name": staging, "ports": [format!("127.0.0.1:{staging_port}:8069")]}),
    )
    .await;
    site.image(V1, "healthy").await;
    // The tag has an image, so only the shape of the sha can fail the deploy.
    site.image("v2", "healthy").await;
    site.deploy(V1).await;
    let (_, _, live_id) = site.container_state(&site.name).await.unwrap();

    let deploy = site
        .queue("env-dev", "v2", json!({"workflow": "deploy"}))
        .await;
    let promote = site
        .queue(
            "env-staging",
            "main",
            json!({"workflow": "promote", "source_env": "dev"}),
        )
        .await;
    site.run_agent("").await;

    let (status, metadata) = site.run(deploy).await;
    assert_eq!(status, "failed");
    assert_eq!(metadata["failed_step"], "validate");
    let error = metadata["error"].as_str().unwrap();
    assert!(error.contains("\"v2\""), "{error}");
    assert!(error.contains("need a commit sha"), "{error}");
    let events = site.events(deploy).await;
    let (level, message, _) = events.last().unwrap();
    assert_eq!(level, "error");
    assert!(message.contains("\"v2\""), "{message}");
    let (running, labels, id) = site.container_state(&site.name).await.unwrap();
    assert!(running);
    assert_eq!(id, live_id);
    assert_eq!(labels["odooops.sha"], V1);
    assert_eq!(site.get("/web/version").await.as_deref(), Some(V1));
    let previous = format!("{}-previous", site.name);
    assert!(site.container_state(&previous).await.is_none());

    let (status, metadata) = site.run(promote).await;
    assert_eq!(status, "failed", "the agent stopped claiming");
    let error = metadata["error"].as_str().unwrap();
    assert!(error.contains("\"main\""), "{error}");
    assert!(site.container_state(&staging).await.is_none());
}

#[tokio::test]
async fn rollback_to_tagged_run_is_rejected() {
    let site = Site::new().await;
    site.image("v1", "healthy").await;
    let tagged = record_past_deploy(&site, "v1").await;
    site.image(V1, "healthy").await;
    site.deploy(V1).await;
    let (_, _, live_id) = site.container_state(&site.name).await.unwrap();

    let metadata = json!({"workflow": "rollback", "rollback_to": tagged});
    let run = site
        .db
        .client()
        .await
        .query_one(
            "SELECT run_id FROM ops.queue_run('proj', 'env-dev', NULL, NULL, $1)",
            &[&metadata],
        )
        .await
        .unwrap()
        .get(0);
    site.run_agent("").await;

    let (status, metadata) = site.run(run).await;
    assert_eq!(status, "failed");
    assert_eq!(metadata["failed_step"], "validate");
    let error = metadata["error"].as_str().unwrap();
    assert!(error.contains("not a commit sha"), "{error}");
    assert!(error.contains("\"v1\""), "{error}");
    let (running, _, id) = site.container_state(&site.name).await.unwrap();
    assert!(running);
    assert_eq!(id, live_id);
}

#[tokio::test]
async fn automatic_rollback_rejects_tag_image() {
    let site = Site::new().await;
    site.configure("env-dev", json!({"health": {"deadline_secs": 1}}))
        .await;
    site.image("v1", "healthy").await;
    record_past_deploy(&site, "v1").await;
    site.image(BAD, "unhealthy").await;

    let run = site.deploy(BAD).await;

    let (status, metadata) = site.run(run).await;
    assert_eq!(status, "failed");
    assert_eq!(metadata["rolled_back_to"], "v1");
    assert_eq!(metadata["rollback_healthy"], false);
    let error = metadata["error"].as_str().unwrap();
    assert!(error.contains("kept container is gone"), "{error}");
    assert!(error.contains("not a commit sha"), "{error}");
    assert!(site.container_state(&site.name).await.is_none());
    assert_eq!(site.get("/web/version").await, None);
}
