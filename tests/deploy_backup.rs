//! A production deploy with a module update takes a backup first, and its rollback
//! restores that backup over the database and filestore.

mod backup_support;
mod common;
mod deploy_support;

use backup_support::{OdooDb, PARTNERS};
use deploy_support::{Site, BAD, V1};
use serde_json::json;

/// Points env-prod at the Odoo database, with no reviewers so the test needs none, and
/// mounts the database's data directory as the environment's data volume.
async fn prepare_prod(site: &Site, odoo: &OdooDb) -> String {
    let config = site.config(json!({
        "update": ["sale"],
        "data_volume": odoo.data_dir().display().to_string(),
    }));
    site.db
        .client()
        .await
        .execute(
            "UPDATE ops.environments SET db_name = $1, required_reviewers = 0, config = $2
              WHERE env_id = 'env-prod'",
            &[&odoo.name, &config],
        )
        .await
        .unwrap();
    format!(
        "[backup.default]\nhost = \"127.0.0.1\"\nport = 5432\nuser = \"odooops\"\n\
         password = \"odooops\"\ndata_dir = {:?}\n",
        odoo.data_dir().display().to_string()
    )
}

async fn pre_deploy_backups(site: &Site) -> Vec<String> {
    let rows = site
        .db
        .client()
        .await
        .query(
            "SELECT status FROM ops.backups WHERE backup_type = 'pre_deploy' ORDER BY created_at",
            &[],
        )
        .await
        .unwrap();
    rows.iter().map(|row| row.get(0)).collect()
}

#[tokio::test]
async fn prod_update_is_backed_up_and_restored_on_rollback() {
    let site = Site::new().await;
    let odoo = OdooDb::create().await;
    let backup_settings = prepare_prod(&site, &odoo).await;
    site.image(V1, "healthy").await;
    site.image(BAD, "unhealthy").await;
    let metadata = json!({"workflow": "deploy", "triggered_by": "ann"});

    let good = site.queue("env-prod", V1, metadata.clone()).await;
    site.run_agent(&backup_settings).await;
    let bad = site.queue("env-prod", BAD, metadata).await;
    site.run_agent(&backup_settings).await;

    assert_eq!(
        site.run(good).await.0,
        "success",
        "{}",
        site.event_text(good).await
    );
    let (status, run_metadata) = site.run(bad).await;
    assert_eq!(status, "failed");
    assert_eq!(run_metadata["rolled_back_to"], V1);
    assert_eq!(pre_deploy_backups(&site).await, vec!["success", "success"]);
    let text = site.event_text(bad).await;
    assert!(text.contains("taken before the module update"), "{text}");
    assert!(text.contains(&format!("over {} in", odoo.name)), "{text}");
    assert_eq!(odoo.count(&odoo.name, "res_partner").await, PARTNERS);
    assert_eq!(site.get("/web/version").await.as_deref(), Some(V1));
}
