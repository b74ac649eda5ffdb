//! The deploy's evidence artifact: a JSON document of what was deployed, how the health
//! gate went and whether the environment was rolled back.

use anyhow::Context;
use serde_json::Value;

use crate::queue::Artifact;
use crate::storage;
use crate::workflows::RunContext;

/// Stores the evidence under `<run_id>/attempt-<n>-<claim tag>/deploy-evidence.json` in
/// the artifact store, records it as the run's 'evidence' artifact and returns its
/// location.
pub async fn record(ctx: &RunContext, evidence: &Value) -> anyhow::Result<String> {
    let body = serde_json::to_vec_pretty(evidence).context("encoding the evidence failed")?;
    let key = ctx.artifact_key("deploy-evidence.json");
    let stored = storage::put_artifact(&ctx.settings.storage, &key, body.into())
        .await
        .with_context(|| format!("storing {key} failed"))?;

    let artifact = Artifact {
        artifact_type: "evidence".to_string(),
        storage_path: stored.location.clone(),
        digest: Some(stored.digest),
        size_bytes: Some(stored.size_bytes as i64),
        metadata: serde_json::json!({ "content_type": "application/json" }),
    };
    ctx.add_artifact(&artifact)
        .await
        .context("recording the evidence artifact failed")?;
    Ok(stored.location)
}
