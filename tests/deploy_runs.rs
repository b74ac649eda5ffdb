//! Promote and rollback runs, approved production deploys, and images pulled from a real
//! registry with credentials.

mod common;
mod deploy_support;

use bollard::auth::DockerCredentials;
use bollard::query_parameters::{PushImageOptionsBuilder, TagImageOptionsBuilder};
use deploy_support::{free_port, write_file, Site, BAD, V0, V1, V2};
use futures_util::TryStreamExt;
use serde_json::json;
use uuid::Uuid;

/// Configures another environment of the test project with its own container and port,
/// and returns that port.
async fn add_environment(site: &Site, env_id: &str) -> u16 {
    let port = free_port();
    let suffix = env_id.trim_start_matches("env-");
    site.configure(
        env_id,
        json!({
            "container_name": format!("{}-{suffix}", site.name),
            "ports": [format!("127.0.0.1:{port}:8069")],
        }),
    )
    .await;
    port
}

async fn review(site: &Site, run: Uuid, reviewer: &str) {
    site.db
        .client()
        .await
        .execute("SELECT 1 FROM ops.review_run($1, $2)", &[&run, &reviewer])
        .await
        .unwrap();
}

#[tokio::test]
async fn promote_deploys_a_sha_that_passed_in_the_source() {
    let site = Site::new().await;
    let staging_port = add_environment(&site, "env-staging").await;
    site.image(V1, "healthy").await;
    site.deploy(V1).await;

    let metadata = json!({"workflow": "promote", "source_env": "dev", "triggered_by": "ann"});
    let run = site.queue("env-staging", V1, metadata).await;
    site.run_agent("").await;

    assert_eq!(
        site.run(run).await.0,
        "success",
        "{}",
        site.event_text(run).await
    );
    let version = deploy_support::http_get(staging_port, "/web/version").await;
    assert_eq!(version.as_deref(), Some(V1));
}

#[tokio::test]
async fn promote_of_a_sha_never_deployed_is_rejected() {
    let site = Site::new().await;
    add_environment(&site, "env-staging").await;
    site.image(V1, "healthy").await;
    site.image(V2, "healthy").await;
    site.deploy(V1).await;

    let metadata = json!({"workflow": "promote", "source_env": "env-dev"});
    let run = site.queue("env-staging", V2, metadata).await;
    site.run_agent("").await;

    let (status, metadata) = site.run(run).await;
    assert_eq!(status, "failed");
    assert_eq!(metadata["failed_step"], "validate");
    let error = metadata["error"].as_str().unwrap();
    assert!(
        error.contains("never deployed successfully to env-dev"),
        "{error}"
    );
    let staging = format!("{}-staging", site.name);
    assert!(site.container_state(&staging).await.is_none());
}

#[tokio::test]
async fn promotion_to_prod_waits_for_two_approvals() {
    let site = Site::new().await;
    let prod_port = add_environment(&site, "env-prod").await;
    site.image(V1, "healthy").await;
    site.deploy(V1).await;

    let metadata = json!({"workflow": "promote", "source_env": "dev", "approved_by": "ann"});
    let run = site.queue("env-prod", V1, metadata).await;
    site.run_agent("").await;
    assert_eq!(site.run(run).await.0, "pending_approval");

    review(&site, run, "bob").await;
    review(&site, run, "cy").await;
    site.run_agent("").await;

    assert_eq!(
        site.run(run).await.0,
        "success",
        "{}",
        site.event_text(run).await
    );
    assert_eq!(
        deploy_support::http_get(prod_port, "/web/version")
            .await
            .as_deref(),
        Some(V1)
    );
    let text = site.event_text(run).await;
    assert!(text.contains("Approved by bob, cy"), "{text}");
}

#[tokio::test]
async fn rollback_run_redeploys_the_earlier_image() {
    let site = Site::new().await;
    site.image(V1, "healthy").await;
    site.image(V2, "healthy").await;
    let first = site.deploy(V1).await;
    let second = site.deploy(V2).await;

    let metadata = json!({
        "workflow": "rollback", "rollback_from": second, "rollback_to": first,
        "triggered_by": "manual",
    });
    let run = site.queue("env-dev", V1, metadata).await;
    site.run_agent("").await;

    let (status, metadata) = site.run(run).await;
    assert_eq!(status, "success", "{}", site.event_text(run).await);
    assert_eq!(metadata["deployed_sha"], V1);
    assert_eq!(site.get("/web/version").await.as_deref(), Some(V1));
}

#[tokio::test]
async fn rollback_to_a_failed_run_is_rejected() {
    let site = Site::new().await;
    site.image(V1, "healthy").await;
    site.image(BAD, "unhealthy").await;
    site.deploy(V1).await;
    let failed = site.deploy(BAD).await;

    let metadata = json!({"workflow": "rollback", "rollback_to": failed});
    let run = site.queue("env-dev", BAD, metadata).await;
    site.run_agent("").await;

    let (status, metadata) = site.run(run).await;
    assert_eq!(status, "failed");
    let error = metadata["error"].as_str().unwrap();
    assert!(error.contains("finished with status failed"), "{error}");
    assert_eq!(site.get("/web/version").await.as_deref(), Some(V1));
}

#[tokio::test]
async fn rollback_to_another_environments_run_is_rejected() {
    let site = Site::new().await;
    add_environment(&site, "env-staging").await;
    site.image(V1, "healthy").await;
    let dev_run = site.deploy(V1).await;

    let metadata = json!({"workflow": "rollback", "rollback_to": dev_run});
    let run = site.queue("env-staging", V1, metadata).await;
    site.run_agent("").await;

    let (status, metadata) = site.run(run).await;
    assert_eq!(status, "failed");
    let error = metadata["error"].as_str().unwrap();
    assert!(error.contains("env-dev"), "{error}");
}

struct Registry {
    host: String,
    user: String,
    password: String,
}

fn registry() -> Registry {
    let advice = "start the test registry with scripts/services and source .state/services.env";
    let var =
        |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: {advice}"));
    Registry {
        host: var("ODOOOPS_TEST_REGISTRY"),
        user: var("ODOOOPS_TEST_REGISTRY_USER"),
        password: var("ODOOOPS_TEST_REGISTRY_PASSWORD"),
    }
}

/// Pushes the site's image `sha` to the registry as `<registry>/<repo>:<sha>`, removes
/// the registry tag from this host, and points the project at the registry.
async fn push_to_registry(site: &Site, registry: &Registry, sha: &str) -> String {
    let local = site.image(sha, "healthy").await;
    let remote_repo = format!("{}/{}", registry.host, site.repo);
    let options = TagImageOptionsBuilder::default()
        .repo(&remote_repo)
        .tag(sha)
        .build();
    site.docker.tag_image(&local, Some(options)).await.unwrap();
    let credentials = DockerCredentials {
        username: Some(registry.user.clone()),
        password: Some(registry.password.clone()),
        serveraddress: Some(registry.host.clone()),
        ..Default::default()
    };
    let remote = format!("{remote_repo}:{sha}");
    site.docker
        .push_image(
            &remote_repo,
            Some(PushImageOptionsBuilder::default().tag(sha).build()),
            Some(credentials),
        )
        .try_collect::<Vec<_>>()
        .await
        .unwrap_or_else(|err| panic!("pushing {remote} failed: {err}"));
    site.docker
        .remove_image(
            &remote,
            Some(bollard::query_parameters::RemoveImageOptions {
                // Untagged parents may be another test's build cache.
                noprune: true,
                ..Default::default()
            }),
            None,
        )
        .await
        .unwrap();
    site.set_image_repository(&remote_repo).await;
    remote
}

#[tokio::test]
async fn image_is_pulled_with_registry_credentials() {
    let site = Site::new().await;
    let registry = registry();
    let remote = push_to_registry(&site, &registry, V1).await;
    let password = write_file(
        site.work_dir.path(),
        "registry-password",
        &registry.password,
    );
    let settings = format!(
        "[[deploy.registries]]\nhost = \"{}\"\nusername = \"{}\"\npassword_file = \"{}\"\n",
        registry.host,
        registry.user,
        password.display()
    );

    let run = site
        .queue("env-dev", V1, json!({"workflow": "deploy"}))
        .await;
    site.run_agent(&settings).await;

    assert_eq!(
        site.run(run).await.0,
        "success",
        "{}",
        site.event_text(run).await
    );
    let text = site.event_text(run).await;
    assert!(text.contains(&format!("Pulled image {remote}")), "{text}");
    assert!(!text.contains(&registry.password), "{text}");
    assert_eq!(site.get("/web/version").await.as_deref(), Some(V1));
    let _ = site
        .docker
        .remove_image(
            &remote,
            Some(bollard::query_parameters::RemoveImageOptions {
                // Untagged parents may be another test's build cache.
                noprune: true,
                ..Default::default()
            }),
            None,
        )
        .await;
}

#[tokio::test]
async fn pull_without_credentials_fails_before_the_container() {
    let site = Site::new().await;
    let registry = registry();
    site.image(V0, "healthy").await;
    site.deploy(V0).await;
    let (_, _, live_id) = site.container_state(&site.name).await.unwrap();
    push_to_registry(&site, &registry, V1).await;

    let run = site
        .queue("env-dev", V1, json!({"workflow": "deploy"}))
        .await;
    site.run_agent("").await;

    let (status, metadata) = site.run(run).await;
    assert_eq!(status, "failed");
    assert_eq!(metadata["failed_step"], "image");
    let error = metadata["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("pulling it from {}", registry.host)),
        "{error}"
    );
    let (running, _, id) = site.container_state(&site.name).await.unwrap();
    assert!(running);
    assert_eq!(id, live_id);
}

#[tokio::test]
async fn agent_rejects_prod_run_that_skipped_approval() {
    let site = Site::new().await;
    add_environment(&site, "env-prod").await;
    let client = site.db.client().await;
    client
        .batch_execute("ALTER TABLE ops.runs DISABLE TRIGGER runs_require_approval")
        .await
        .unwrap();
    let metadata = json!({"workflow": "deploy", "triggered_by": "ann"});
    let run = site.queue("env-prod", V1, metadata).await;
    client
        .batch_execute("ALTER TABLE ops.runs ENABLE TRIGGER runs_require_approval")
        .await
        .unwrap();

    site.run_agent("").await;

    let (status, metadata) = site.run(run).await;
    assert_eq!(status, "failed");
    assert_eq!(metadata["failed_step"], "approvals");
    let error = metadata["error"].as_str().unwrap();
    assert!(
        error.contains("requires 2 approvals but the run has 0"),
        "{error}"
    );
    assert!(site
        .container_state(&format!("{}-prod", site.name))
        .await
        .is_none());
}

#[tokio::test]
async fn image_is_pulled_with_the_build_registry_login() {
    let site = Site::new().await;
    let registry = registry();
    let remote = push_to_registry(&site, &registry, V1).await;
    site.set_image_repository(&site.repo).await;
    let password = write_file(
        site.work_dir.path(),
        "registry-password",
        &registry.password,
    );
    let settings = format!(
        "[registry]\nurl = \"{}\"\nusername = \"{}\"\npassword_file = \"{}\"\n",
        registry.host,
        registry.user,
        password.display()
    );

    let run = site
        .queue("env-dev", V1, json!({"workflow": "deploy"}))
        .await;
    site.run_agent(&settings).await;

    assert_eq!(
        site.run(run).await.0,
        "success",
        "{}",
        site.event_text(run).await
    );
    let text = site.event_text(run).await;
    assert!(text.contains(&format!("Pulled image {remote}")), "{text}");
    let _ = site
        .docker
        .remove_image(
            &remote,
            Some(bollard::query_parameters::RemoveImageOptions {
                // Untagged parents may be another test's build cache.
                noprune: true,
                ..Default::default()
            }),
            None,
        )
        .await;
}
