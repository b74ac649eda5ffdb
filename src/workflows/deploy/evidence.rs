//! The deploy's evidence artifact: a JSON document of what was deployed, how the health
//! gate went and whether the environment was rolled back.

use anyhow::Context;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::queue::Artifact;
use crate::workflows::RunContext;

/// Writes the evidence and records it as the run's 'evidence' artifact.
// NOTE: the file stays in the agent's work directory (file:// path) because this branch
// has no artifact store; the S3 upload replaces the write below once it exists.
pub async fn record(ctx: &RunContext, evidence: &Value) -> anyhow::Result<String> {
    let body = serde_json::to_vec_pretty(evidence).context("encoding the evidence failed")?;
    let dir = ctx
        .settings
        .agent
        .work_dir
        .join("evidence")
        .join(ctx.run.run_id.to_string());
    let path = dir.join("deploy-evidence.json");
    tokio::fs::create_dir_all(&dir)
        .await
        .with_context(|| format!("creating {} failed", dir.display()))?;
    tokio::fs::write(&path, &body)
        .await
        .with_context(|| format!("writing {} failed", path.display()))?;

    let storage_path = format!("file://{}", path.display());
    let artifact = Artifact {
        artifact_type: "evidence".to_string(),
        storage_path: storage_path.clone(),
        digest: Some(format!("sha256:{}", hex::encode(Sha256::digest(&body)))),
        size_bytes: Some(body.len() as i64),
        metadata: serde_json::json!({ "content_type": "application/json" }),
    };
    ctx.add_artifact(&artifact)
        .await
        .context("recording the evidence artifact failed")?;
    Ok(storage_path)
}
