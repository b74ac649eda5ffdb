//! Restores and restore drills against a real PostgreSQL server and S3-compatible server.

mod backup_support;
mod common;

use backup_support::*;
use serde_json::{json, Value};
use uuid::Uuid;

/// Makes a successful backup of env-prod and returns its id.
async fn backed_up(fixture: &Fixture, backend: &str) -> Uuid {
    let backup_id = fixture.queue_backup("env-prod", "manual").await;
    fixture.run_agent(fixture.settings(backend)).await;
    let row = fixture.backup_row(backup_id).await;
    let status: String = row.get("status");
    assert_eq!(
        status,
        "success",
        "{:?}",
        row.get::<_, Option<String>>("error")
    );
    backup_id
}

async fn restore_row(fixture: &Fixture, target_db: &str) -> tokio_postgres::Row {
    fixture
        .ops
        .client()
        .await
        .query_one(
            "SELECT * FROM ops.restores WHERE target_db = $1",
            &[&target_db],
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn restore_into_new_database_succeeds() {
    let fixture = Fixture::new().await;
    let backup_id = backed_up(&fixture, "local").await;
    let target = format!("{}_copy", fixture.odoo.name);
    let run_id = fixture
        .queue_run(
            "env-staging",
            json!({ "workflow": "restore", "backup_id": backup_id, "target_db": target }),
        )
        .await;
    fixture.run_agent(fixture.settings("local")).await;

    let (status, metadata, events) = fixture.run_outcome(run_id).await;
    assert_eq!(status, "success", "{metadata} {events:?}");
    for table in [
        "res_partner",
        "ir_attachment",
        "res_users",
        "ir_module_module",
    ] {
        assert_eq!(
            fixture.odoo.count(&target, table).await,
            fixture.odoo.count(&fixture.odoo.name, table).await,
            "{table}"
        );
    }
    let restored_filestore = fixture.odoo.data_dir().join("filestore").join(&target);
    for (store_fname, contents) in &fixture.odoo.files {
        assert_eq!(
            &std::fs::read(restored_filestore.join(store_fname)).unwrap(),
            contents,
            "{store_fname}"
        );
    }

    let client = fixture.odoo.client_for(&target).await;
    let active_crons: i64 = client
        .query_one("SELECT count(*) FROM ir_cron WHERE active", &[])
        .await
        .unwrap()
        .get(0);
    let active_mail: i64 = client
        .query_one("SELECT count(*) FROM ir_mail_server WHERE active", &[])
        .await
        .unwrap()
        .get(0);
    let flag: String = client
        .query_one(
            "SELECT value FROM ir_config_parameter WHERE key = 'database.is_neutralized'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let uuid: String = client
        .query_one(
            "SELECT value FROM ir_config_parameter WHERE key = 'database.uuid'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(active_crons, 0);
    assert_eq!(active_mail, 0);
    assert_eq!(flag, "True");
    assert_ne!(
        uuid, "c0ffee00-0000-4000-8000-000000000001",
        "a copy gets its own database.uuid"
    );
    let source_crons = fixture
        .odoo
        .count(&fixture.odoo.name, "ir_cron WHERE active")
        .await;
    assert_eq!(source_crons, 2, "the source database is untouched");

    let row = restore_row(&fixture, &target).await;
    assert_eq!(row.get::<_, String>("status"), "success");
    assert_eq!(row.get::<_, String>("kind"), "restore");
    assert!(row.get::<_, bool>("neutralized"));
    let checks: Value = row.get("checks");
    assert_eq!(checks["neutralization"]["active_crons"], json!(0));
    assert_eq!(checks["rows"]["public.res_partner"], json!(PARTNERS));
}

#[tokio::test]
async fn s3_restore_removes_its_download() {
    let fixture = Fixture::with_s3().await;
    let backup_id = backed_up(&fixture, "s3").await;
    let target = format!("{}_s3", fixture.odoo.name);
    let run_id = fixture
        .queue_run(
            "env-staging",
            json!({ "workflow": "restore", "backup_id": backup_id, "target_db": target }),
        )
        .await;
    fixture.run_agent(fixture.settings("s3")).await;

    let (status, metadata, _) = fixture.run_outcome(run_id).await;
    assert_eq!(status, "success", "{metadata}");
    assert_eq!(fixture.odoo.count(&target, "res_partner").await, PARTNERS);
    let downloads = fixture.work_dir().join("restores");
    let left: Vec<_> = std::fs::read_dir(&downloads)
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "downloaded archives remain: {left:?}");
}

#[tokio::test]
async fn existing_database_is_rejected() {
    let fixture = Fixture::new().await;
    let backup_id = backed_up(&fixture, "local").await;
    let run_id = fixture
        .queue_run("env-prod", json!({ "workflow": "restore", "backup_id": backup_id, "target_db": fixture.odoo.name }))
        .await;
    fixture
        .odoo
        .client()
        .await
        .execute(
            "INSERT INTO res_partner (name) VALUES ('after backup')",
            &[],
        )
        .await
        .unwrap();
    fixture.run_agent(fixture.settings("local")).await;

    let (status, metadata, _) = fixture.run_outcome(run_id).await;
    assert_eq!(status, "failed");
    let error = metadata["error"].as_str().unwrap_or_default();
    assert!(error.contains("already exists"), "{error}");
    assert_eq!(
        fixture.odoo.count(&fixture.odoo.name, "res_partner").await,
        PARTNERS + 1,
        "the database is untouched"
    );
}

#[tokio::test]
async fn overwrite_replaces_database_and_filestore() {
    let fixture = Fixture::new().await;
    let backup_id = backed_up(&fixture, "local").await;
    let target = format!("{}_stage", fixture.odoo.name);
    let first = fixture
        .queue_run(
            "env-staging",
            json!({ "workflow": "restore", "backup_id": backup_id, "target_db": target }),
        )
        .await;
    fixture.run_agent(fixture.settings("local")).await;
    assert_eq!(fixture.run_outcome(first).await.0, "success");
    fixture
        .odoo
        .client_for(&target)
        .await
        .execute("DELETE FROM res_partner WHERE id > 10", &[])
        .await
        .unwrap();
    let stray = fixture
        .odoo
        .data_dir()
        .join("filestore")
        .join(&target)
        .join("zz/stray");
    std::fs::create_dir_all(stray.parent().unwrap()).unwrap();
    std::fs::write(&stray, b"written after the restore").unwrap();

    let second = fixture
        .queue_run(
            "env-staging",
            json!({ "workflow": "restore", "backup_id": backup_id, "target_db": target, "overwrite": true }),
        )
        .await;
    fixture.run_agent(fixture.settings("local")).await;

    let (status, metadata, _) = fixture.run_outcome(second).await;
    assert_eq!(status, "success", "{metadata}");
    assert_eq!(fixture.odoo.count(&target, "res_partner").await, PARTNERS);
    assert!(!stray.exists(), "the old filestore was replaced");
    let leftovers = fixture
        .odoo
        .client_for("postgres")
        .await
        .query(
            "SELECT datname FROM pg_database WHERE datname LIKE $1 || '%'",
            &[&target],
        )
        .await
        .unwrap();
    assert_eq!(
        leftovers.len(),
        1,
        "staging and replaced databases are dropped"
    );
}

#[tokio::test]
async fn non_production_restore_cannot_skip_neutralization() {
    let fixture = Fixture::new().await;
    let backup_id = backed_up(&fixture, "local").await;
    let target = format!("{}_raw", fixture.odoo.name);
    let run_id = fixture
        .queue_run(
            "env-staging",
            json!({ "workflow": "restore", "backup_id": backup_id, "target_db": target, "neutralize": false }),
        )
        .await;
    fixture.run_agent(fixture.settings("local")).await;

    let (status, metadata, _) = fixture.run_outcome(run_id).await;
    assert_eq!(status, "failed");
    assert!(
        metadata["error"]
            .as_str()
            .unwrap_or_default()
            .contains("always neutralized"),
        "{metadata}"
    );
    assert!(!fixture.odoo.database_exists(&target).await);
}

#[tokio::test]
async fn corrupted_archive_fails_checksum() {
    let fixture = Fixture::new().await;
    let backup_id = backed_up(&fixture, "local").await;
    let location: String = fixture.backup_row(backup_id).await.get("db_dump_path");
    let path = local_path(&location);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&path, bytes).unwrap();

    let target = format!("{}_bad", fixture.odoo.name);
    let run_id = fixture
        .queue_run(
            "env-staging",
            json!({ "workflow": "restore", "backup_id": backup_id, "target_db": target }),
        )
        .await;
    fixture.run_agent(fixture.settings("local")).await;

    let (status, metadata, _) = fixture.run_outcome(run_id).await;
    assert_eq!(status, "failed");
    assert!(
        metadata["error"]
            .as_str()
            .unwrap_or_default()
            .contains("checksum mismatch"),
        "{metadata}"
    );
    assert!(!fixture.odoo.database_exists(&target).await);
    assert_eq!(
        restore_row(&fixture, &target)
            .await
            .get::<_, String>("status"),
        "failed"
    );
}

#[tokio::test]
async fn drill_drops_scratch_database() {
    let fixture = Fixture::new().await;
    backed_up(&fixture, "local").await;
    let run_id = fixture
        .queue_run("env-prod", json!({ "workflow": "restore_drill" }))
        .await;
    fixture.run_agent(fixture.settings("local")).await;

    let (status, metadata, events) = fixture.run_outcome(run_id).await;
    assert_eq!(status, "success", "{metadata} {events:?}");
    let drill = &metadata["drill"];
    let target = drill["target_db"].as_str().unwrap().to_string();
    assert!(
        !fixture.odoo.database_exists(&target).await,
        "the scratch database is dropped"
    );
    assert!(
        !fixture.work_dir().join("drills").join(&target).exists(),
        "the scratch filestore is removed"
    );
    assert_eq!(
        drill["checks"]["attachments"]["checked"],
        json!(ATTACHMENTS)
    );
    assert_eq!(
        drill["checks"]["rows"]["public.res_partner"],
        json!(PARTNERS)
    );
    let row = restore_row(&fixture, &target).await;
    assert_eq!(row.get::<_, String>("kind"), "drill");
    assert_eq!(row.get::<_, String>("status"), "success");
}

#[tokio::test]
async fn drill_fails_on_missing_attachment() {
    let fixture = Fixture::new().await;
    let (missing, _) = fixture.odoo.files[3].clone();
    std::fs::remove_file(fixture.odoo.filestore().join(&missing)).unwrap();
    backed_up(&fixture, "local").await;
    let run_id = fixture
        .queue_run("env-prod", json!({ "workflow": "restore_drill" }))
        .await;
    fixture.run_agent(fixture.settings("local")).await;

    let (status, metadata, _) = fixture.run_outcome(run_id).await;
    assert_eq!(status, "failed");
    let error = metadata["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("1 of 12 attachment files are missing"),
        "{error}"
    );
    assert!(error.contains(&missing), "{error}");
}

#[tokio::test]
async fn restore_command_creates_database() {
    let fixture = Fixture::new().await;
    backed_up(&fixture, "local").await;
    let target = format!("{}_cli", fixture.odoo.name);
    let config = fixture.odoo.dir.path().join("agent.toml");
    let toml = format!(
        "[agent]\nwork_dir = {work:?}\n[storage]\nlocal_dir = {local:?}\n\
         [backup.default]\nhost = \"127.0.0.1\"\nuser = \"odooops\"\npassword_env = \"ODOOOPS_TEST_PG_PASSWORD\"\n\
         data_dir = {data:?}\n",
        work = fixture.work_dir().display().to_string(),
        local = fixture.backups_dir().display().to_string(),
        data = fixture.odoo.data_dir().display().to_string(),
    );
    std::fs::write(&config, toml).unwrap();

    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_odooops-agent"))
        .args(["restore", "--config"])
        .arg(&config)
        .args([
            "--env",
            "env-staging",
            "--from-env",
            "env-prod",
            "--target-db",
            &target,
        ])
        .env("ODOOOPS_DATABASE_URL", &fixture.ops.url)
        .env("ODOOOPS_TEST_PG_PASSWORD", "odooops")
        .output()
        .await
        .unwrap();

    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains(&format!("\"target_db\": \"{target}\"")),
        "{stdout}"
    );
    assert_eq!(fixture.odoo.count(&target, "res_partner").await, PARTNERS);
    assert_eq!(
        restore_row(&fixture, &target)
            .await
            .get::<_, String>("status"),
        "success"
    );
}

#[tokio::test]
async fn restore_command_replaces_live_database_only_when_told() {
    use odooops_agent::workflows::restore::command::{self, RestoreOptions};
    use tokio_util::sync::CancellationToken;

    let fixture = Fixture::new().await;
    backed_up(&fixture, "local").await;
    fixture
        .odoo
        .client()
        .await
        .execute(
            "INSERT INTO res_partner (name) VALUES ('after backup')",
            &[],
        )
        .await
        .unwrap();
    let options = RestoreOptions {
        env: "env-prod".into(),
        target_db: Some(fixture.odoo.name.clone()),
        overwrite: true,
        ..Default::default()
    };
    let settings = fixture.settings("local");

    let rejected = command::run(settings.clone(), options.clone(), CancellationToken::new()).await;
    let error = format!("{:#}", rejected.unwrap_err());
    let partners_after_rejection = fixture.odoo.count(&fixture.odoo.name, "res_partner").await;
    let with_flag = RestoreOptions {
        replace_live: true,
        ..options
    };
    let replaced = command::run(settings, with_flag, CancellationToken::new()).await;

    assert!(error.contains("--replace-live"), "{error}");
    assert!(error.contains("live database of env-prod"), "{error}");
    assert_eq!(
        partners_after_rejection,
        PARTNERS + 1,
        "rejected, yet replaced"
    );
    assert!(replaced.is_ok(), "{:?}", replaced.err());
    assert_eq!(
        fixture.odoo.count(&fixture.odoo.name, "res_partner").await,
        PARTNERS
    );
}
