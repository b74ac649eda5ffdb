//! The values of an environment's `env` config never reach the run's events, its error or
//! the evidence artifact, even when the image prints them: every copied output line has
//! them replaced by `***`.

mod common;
mod deploy_support;

use deploy_support::{write_file, Site, LEAKY, V1};
use serde_json::{json, Value};
use uuid::Uuid;

const FILE_SECRET: &str = "file-secret-7Qx9";
const ENV_SECRET: &str = "env-secret-K3p2";
const INLINE_SECRET: &str = "inline-secret-Zr8w";
const SECRETS: [&str; 3] = [FILE_SECRET, ENV_SECRET, INLINE_SECRET];

/// Configures env-dev with one secret from a file, one from the agent's environment and
/// one given inline, and `extra` on top.
async fn configure_secrets(site: &Site, extra: Value) {
    let var = format!("ODOOOPS_TEST_TOKEN_{}", Uuid::new_v4().simple());
    // Each test runs in a process of its own under nextest, before the agent starts.
    std::env::set_var(&var, ENV_SECRET);
    let file = write_file(
        site.work_dir.path(),
        "db-password",
        &format!("{FILE_SECRET}\n"),
    );
    let mut config = json!({
        "env": {
            "PASSWORD": {"file": file.display().to_string()},
            "DB_TOKEN": {"env": var},
            "INLINE": INLINE_SECRET,
        }
    });
    if let (Value::Object(config), Value::Object(extra)) = (&mut config, extra) {
        config.extend(extra);
    }
    site.configure("env-dev", config).await;
}

/// Returns the run's events (messages and payloads), its metadata and its evidence
/// document, as one text to search.
async fn run_record(site: &Site, run: Uuid) -> (String, String, String) {
    let events: String = site
        .events(run)
        .await
        .iter()
        .map(|(level, message, payload)| format!("{level}: {message} {payload:?}\n"))
        .collect();
    let (_, metadata) = site.run(run).await;
    let row = site
        .db
        .client()
        .await
        .query_one(
            "SELECT storage_path FROM ops.artifacts
              WHERE run_id = $1 AND artifact_type = 'evidence'",
            &[&run],
        )
        .await
        .unwrap();
    let path: String = row.get(0);
    let evidence = std::fs::read_to_string(path.strip_prefix("file://").unwrap()).unwrap();
    (events, metadata.to_string(), evidence)
}

fn assert_no_secret(location: &str, text: &str) {
    for secret in SECRETS {
        assert!(
            !text.contains(secret),
            "{location} contains {secret}:\n{text}"
        );
    }
}

#[tokio::test]
async fn failed_gate_output_is_scrubbed() {
    let site = Site::new().await;
    configure_secrets(&site, json!({})).await;
    site.image(V1, "healthy").await;
    site.image(LEAKY, "leak_secrets").await;
    site.deploy(V1).await;

    let run = site.deploy(LEAKY).await;

    let (status, metadata) = site.run(run).await;
    assert_eq!(status, "failed");
    assert_eq!(metadata["rolled_back_to"], V1);
    let (events, metadata, evidence) = run_record(&site, run).await;
    assert_no_secret("ops.run_events", &events);
    assert_no_secret("the run's metadata", &metadata);
    assert_no_secret("the evidence", &evidence);
    assert!(
        events.contains("connecting with password *** token ***"),
        "{events}"
    );
    assert!(events.contains("inline setting ***"), "{events}");
}

#[tokio::test]
async fn failed_update_output_is_scrubbed() {
    let site = Site::new().await;
    configure_secrets(&site, json!({"update": ["sale"]})).await;
    site.image(V1, "healthy").await;
    site.image(LEAKY, "leak_secrets").await;
    site.deploy(V1).await;

    let run = site.deploy(LEAKY).await;

    let (status, run_metadata) = site.run(run).await;
    assert_eq!(status, "failed");
    assert_eq!(run_metadata["failed_step"], "update");
    let error = run_metadata["error"].as_str().unwrap();
    assert!(error.contains("password *** rejected"), "{error}");
    let (events, metadata, evidence) = run_record(&site, run).await;
    assert_no_secret("ops.run_events", &events);
    assert_no_secret("the run's metadata", &metadata);
    assert_no_secret("the evidence", &evidence);
    assert!(
        events.contains("connecting with password *** token ***"),
        "{events}"
    );
    assert!(evidence.contains("password *** rejected"), "{evidence}");
    assert_eq!(site.get("/web/version").await.as_deref(), Some(V1));
}

#[tokio::test]
async fn secrets_reach_the_container() {
    let site = Site::new().await;
    configure_secrets(&site, json!({})).await;
    site.image(V1, "healthy").await;

    let run = site.deploy(V1).await;

    assert_eq!(
        site.run(run).await.0,
        "success",
        "{}",
        site.event_text(run).await
    );
    let inspect = site
        .docker
        .inspect_container(&site.name, None)
        .await
        .unwrap();
    let env = inspect.config.unwrap().env.unwrap();
    assert!(env.contains(&format!("PASSWORD={FILE_SECRET}")), "{env:?}");
    assert!(env.contains(&format!("DB_TOKEN={ENV_SECRET}")), "{env:?}");
    assert!(env.contains(&format!("INLINE={INLINE_SECRET}")), "{env:?}");
}
