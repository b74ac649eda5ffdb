//! Backups against a real PostgreSQL server and a real S3-compatible server on loopback.

mod backup_support;
mod common;

use std::time::Duration;

use backup_support::*;
use serde_json::{json, Value};

#[tokio::test]
async fn local_backup_is_readable_zip() {
    let fixture = Fixture::new().await;
    let backup_id = fixture.queue_backup("env-prod", "manual").await;
    fixture.run_agent(fixture.settings("local")).await;

    let row = fixture.backup_row(backup_id).await;
    let status: String = row.get("status");
    let error: Option<String> = row.get("error");
    assert_eq!(status, "success", "{error:?}");
    let location: String = row.get("db_dump_path");
    let path = local_path(&location);
    assert!(path.starts_with(fixture.backups_dir()), "{location}");
    let size: i64 = row.get("size_bytes");
    assert_eq!(size as u64, std::fs::metadata(&path).unwrap().len());
    let digest: String = row.get("digest");
    assert_eq!(digest, format!("sha256:{}", sha256_of(&path)));
    let expires_at: Option<chrono::DateTime<chrono::Utc>> = row.get("expires_at");
    assert!(expires_at.is_some(), "manual backups expire");

    let listing = python_zip_listing(&path);
    assert!(
        listing.lines().any(|line| line.starts_with("dump.sql ")),
        "{listing}"
    );
    assert!(
        listing
            .lines()
            .any(|line| line.starts_with("manifest.json ")),
        "{listing}"
    );
    for (store_fname, contents) in &fixture.odoo.files {
        let name = format!("filestore/{store_fname}");
        assert!(
            listing.contains(&format!("{name} {}", contents.len())),
            "{name} missing: {listing}"
        );
        assert_eq!(&python_zip_read(&path, &name), contents, "{name}");
    }
    let dump = String::from_utf8(python_zip_read(&path, "dump.sql")).unwrap();
    assert!(
        dump.contains("COPY public.res_partner"),
        "dump.sql lacks res_partner data"
    );
    assert!(
        !dump.contains("OWNER TO"),
        "dump.sql must be made with --no-owner"
    );

    let unzip = std::process::Command::new("unzip")
        .arg("-tq")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        unzip.status.success(),
        "{}",
        String::from_utf8_lossy(&unzip.stdout)
    );
}

#[tokio::test]
async fn manifest_records_versions_and_counts() {
    let fixture = Fixture::new().await;
    let backup_id = fixture.queue_backup("env-prod", "daily").await;
    fixture.run_agent(fixture.settings("local")).await;

    let row = fixture.backup_row(backup_id).await;
    let manifest: Value = row.get("manifest");
    let location: String = row.get("db_dump_path");
    let in_zip: Value =
        serde_json::from_slice(&python_zip_read(&local_path(&location), "manifest.json")).unwrap();
    assert_eq!(
        manifest, in_zip,
        "ops.backups.manifest and manifest.json differ"
    );

    assert_eq!(manifest["db_name"], json!(fixture.odoo.name));
    assert_eq!(manifest["major_version"], json!("17.0"));
    // Odoo writes divmod(server_version / 100, 100) as "%d.%d": "15.0" for 15.18.
    assert_eq!(manifest["pg_version"], json!("15.0"));
    assert_eq!(
        manifest["modules"],
        json!({"base": "17.0.1.3", "sale": "17.0.1.2", "web": "17.0.1.0"})
    );
    let ours = &manifest["odooops"];
    assert_eq!(ours["backup_id"], json!(backup_id));
    assert!(
        ours["server_version"].as_str().unwrap().starts_with("15."),
        "{}",
        ours["server_version"]
    );
    assert_eq!(ours["tables"]["public.res_partner"], json!(PARTNERS));
    assert_eq!(ours["tables"]["public.ir_attachment"], json!(ATTACHMENTS));
    assert_eq!(ours["filestore"]["files"], json!(ATTACHMENTS));
    assert!(ours["dump"]["size"].as_u64().unwrap() > 10_000);
    assert_eq!(ours["dump"]["crc32"].as_str().unwrap().len(), 8);
    let expires_at: Option<chrono::DateTime<chrono::Utc>> = row.get("expires_at");
    assert!(
        expires_at.is_none(),
        "scheduled backups are kept by count, not by date"
    );
}

#[tokio::test]
async fn s3_backup_leaves_no_upload() {
    let mut fixture = Fixture::with_s3().await;
    fixture.odoo.add_random_file(12 * 1024 * 1024).await;
    let backup_id = fixture.queue_backup("env-prod", "manual").await;
    fixture.run_agent(fixture.settings("s3")).await;

    let row = fixture.backup_row(backup_id).await;
    let status: String = row.get("status");
    let error: Option<String> = row.get("error");
    assert_eq!(status, "success", "{error:?}");
    let location: String = row.get("db_dump_path");
    let prefix = format!("s3://{}/", fixture.bucket);
    let key = location
        .strip_prefix(&prefix)
        .expect("an s3:// location in the test bucket");

    let client = fixture.s3_client();
    let object = client
        .get_object()
        .bucket(&fixture.bucket)
        .key(key)
        .send()
        .await
        .unwrap();
    let body = object.body.collect().await.unwrap().into_bytes();
    let size: i64 = row.get("size_bytes");
    assert_eq!(body.len() as i64, size);
    assert!(
        size > 12 * 1024 * 1024,
        "the random file is stored, not compressed away"
    );
    let digest: String = row.get("digest");
    let local_copy = fixture.odoo.dir.path().join("downloaded.zip");
    std::fs::write(&local_copy, &body).unwrap();
    assert_eq!(digest, format!("sha256:{}", sha256_of(&local_copy)));
    assert!(python_zip_listing(&local_copy).contains("dump.sql"));

    let uploads = client
        .list_multipart_uploads()
        .bucket(&fixture.bucket)
        .send()
        .await
        .unwrap();
    assert!(uploads.uploads().is_empty(), "{:?}", uploads.uploads());
}

#[tokio::test]
async fn events_never_contain_s3_secret() {
    let fixture = Fixture::with_s3().await;
    let good = fixture.queue_backup("env-prod", "manual").await;
    fixture.run_agent(fixture.settings("s3")).await;
    let bad = fixture.queue_backup("env-prod", "manual").await;
    fixture
        .run_agent(fixture.settings_with("s3", Some("http://127.0.0.1:1"), ""))
        .await;

    let secret = &fixture.s3.as_ref().unwrap().secret_access_key;
    for backup_id in [good, bad] {
        let run_id = fixture.run_of_backup(backup_id).await;
        let (_, metadata, events) = fixture.run_outcome(run_id).await;
        let row = fixture.backup_row(backup_id).await;
        let error: Option<String> = row.get("error");
        let everything = format!("{metadata} {events:?} {error:?}");
        assert!(
            !everything.contains(secret.as_str()),
            "secret leaked: {everything}"
        );
    }
}

#[tokio::test]
async fn unreachable_s3_keeps_older_backups() {
    let fixture = Fixture::with_s3().await;
    let older = fixture.queue_backup("env-prod", "daily").await;
    fixture.run_agent(fixture.settings("s3")).await;
    let older_row = fixture.backup_row(older).await;
    let older_status: String = older_row.get("status");
    assert_eq!(older_status, "success");

    let failing = fixture.queue_backup("env-prod", "manual").await;
    fixture
        .run_agent(fixture.settings_with("s3", Some("http://127.0.0.1:1"), ""))
        .await;

    let row = fixture.backup_row(failing).await;
    let status: String = row.get("status");
    let error: String = row.get::<_, Option<String>>("error").unwrap_or_default();
    assert_eq!(status, "failed");
    assert!(
        error.contains("127.0.0.1:1") || error.contains("dispatch"),
        "{error}"
    );
    assert!(error.contains("onnect"), "the cause is named: {error}");
    assert!(
        !error.contains("DispatchFailure {"),
        "no debug dump: {error}"
    );
    let run_id = fixture.run_of_backup(failing).await;
    let (run_status, metadata, _) = fixture.run_outcome(run_id).await;
    assert_eq!(run_status, "failed");
    assert_eq!(metadata["failed_step"], json!("backup"));

    let still: String = fixture.backup_row(older).await.get("status");
    assert_eq!(still, "success");
    let location: String = older_row.get("db_dump_path");
    let key = location
        .strip_prefix(&format!("s3://{}/", fixture.bucket))
        .unwrap();
    let head = fixture
        .s3_client()
        .head_object()
        .bucket(&fixture.bucket)
        .key(key)
        .send()
        .await;
    assert!(head.is_ok(), "the older backup's object must stay");
}

#[tokio::test]
async fn failing_pg_dump_fails_backup() {
    let fixture = Fixture::new().await;
    fixture
        .ops
        .client()
        .await
        .execute(
            "UPDATE ops.environments SET db_name = 'odooops_no_such_db' WHERE env_id = 'env-dev'",
            &[],
        )
        .await
        .unwrap();
    let backup_id = fixture.queue_backup("env-dev", "manual").await;
    fixture.run_agent(fixture.settings("local")).await;

    let row = fixture.backup_row(backup_id).await;
    let status: String = row.get("status");
    let error: String = row.get::<_, Option<String>>("error").unwrap_or_default();
    assert_eq!(status, "failed");
    assert!(error.contains("odooops_no_such_db"), "{error}");
    let leftovers: Vec<_> = walk(&fixture.backups_dir());
    assert!(leftovers.is_empty(), "no file may remain: {leftovers:?}");
}

#[tokio::test]
async fn killed_pg_dump_aborts_upload() {
    let fixture = Fixture::with_s3().await;
    fixture
        .odoo
        .client()
        .await
        .batch_execute(
            "CREATE TABLE big (id int, payload text);
             INSERT INTO big SELECT i, md5(i::text) || md5((i * 7)::text) || md5((i * 13)::text)
               FROM generate_series(1, 1500000) i;",
        )
        .await
        .unwrap();
    let backup_id = fixture.queue_backup("env-prod", "manual").await;
    let settings = fixture.settings("s3");
    let agent = tokio::spawn({
        let settings = settings.clone();
        async move {
            odooops_agent::agent::run(
                settings,
                odooops_agent::workflows::Workflows::standard(),
                odooops_agent::agent::Mode::Once,
                Default::default(),
            )
            .await
        }
    });

    let client = fixture.s3_client();
    let mut saw_upload = false;
    for _ in 0..600 {
        let uploads = client
            .list_multipart_uploads()
            .bucket(&fixture.bucket)
            .send()
            .await
            .unwrap();
        if !uploads.uploads().is_empty() {
            saw_upload = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(saw_upload, "the backup never started a multipart upload");
    let admin = fixture.odoo.client_for("postgres").await;
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND application_name = 'pg_dump'",
            &[&fixture.odoo.name],
        )
        .await
        .unwrap();
    agent.await.unwrap().unwrap();

    let row = fixture.backup_row(backup_id).await;
    let status: String = row.get("status");
    let error: String = row.get::<_, Option<String>>("error").unwrap_or_default();
    assert_eq!(status, "failed");
    assert!(error.contains("pg_dump"), "{error}");
    let uploads = client
        .list_multipart_uploads()
        .bucket(&fixture.bucket)
        .send()
        .await
        .unwrap();
    assert!(
        uploads.uploads().is_empty(),
        "parts left behind: {:?}",
        uploads.uploads()
    );
    let objects = client
        .list_objects_v2()
        .bucket(&fixture.bucket)
        .send()
        .await
        .unwrap();
    assert!(objects.contents().is_empty(), "{:?}", objects.contents());
}

#[tokio::test]
async fn cancelled_backup_removes_partial_file() {
    let fixture = Fixture::new().await;
    fixture
        .odoo
        .client()
        .await
        .batch_execute(
            "CREATE TABLE big (id int, payload text);
             INSERT INTO big SELECT i, md5(i::text) || md5((i * 7)::text)
               FROM generate_series(1, 2000000) i;",
        )
        .await
        .unwrap();
    let backup_id = fixture.queue_backup("env-prod", "manual").await;
    let settings = fixture.settings_with("local", None, "[backup]\ncompression_level = 9\n");
    let agent = tokio::spawn(async move {
        odooops_agent::agent::run(
            settings,
            odooops_agent::workflows::Workflows::standard(),
            odooops_agent::agent::Mode::Once,
            Default::default(),
        )
        .await
    });

    let mut partial = None;
    for _ in 0..600 {
        partial = walk(&fixture.backups_dir())
            .into_iter()
            .find(|p| p.ends_with(".partial"));
        if partial.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(partial.is_some(), "the backup never started writing");
    let run_id = fixture.run_of_backup(backup_id).await;
    fixture
        .ops
        .client()
        .await
        .execute("SELECT ops.cancel_run($1, 'test cancels')", &[&run_id])
        .await
        .unwrap();
    agent.await.unwrap().unwrap();

    let (run_status, _, _) = fixture.run_outcome(run_id).await;
    assert_eq!(run_status, "cancelled");
    let status: String = fixture.backup_row(backup_id).await.get("status");
    assert_eq!(status, "failed");
    let leftovers = walk(&fixture.backups_dir());
    assert!(leftovers.is_empty(), "partial files remain: {leftovers:?}");
}

#[tokio::test]
async fn retention_deletes_objects_and_rows() {
    let fixture = Fixture::new().await;
    let settings = fixture.settings("local");
    let client = fixture.ops.client().await;
    let mut seeded = Vec::new();
    for day in 1..=40i32 {
        let path = fixture.backups_dir().join(format!("old-{day}.zip"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"old backup").unwrap();
        let location = format!("file://{}", path.display());
        let id: uuid::Uuid = client
            .query_one(
                "INSERT INTO ops.backups (project_id, env_id, backup_type, status, db_dump_path, \
                 created_at) VALUES ('proj', 'env-prod', 'daily', 'success', $1, \
                 now() - make_interval(days => $2)) RETURNING backup_id",
                &[&location, &day],
            )
            .await
            .unwrap()
            .get(0);
        seeded.push((day, id, path));
    }
    let backup_id = fixture.queue_backup("env-prod", "daily").await;
    fixture.run_agent(settings).await;
    let status: String = fixture.backup_row(backup_id).await.get("status");
    assert_eq!(status, "success");

    let remaining: Vec<uuid::Uuid> = client
        .query(
            "SELECT backup_id FROM ops.backups WHERE env_id = 'env-prod'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(remaining.contains(&backup_id));
    for (day, id, path) in &seeded {
        let kept = remaining.contains(id);
        assert_eq!(
            kept,
            path.exists(),
            "day {day}: row and object must go together"
        );
        if *day <= 6 {
            assert!(kept, "day {day} is within the 7 daily backups");
        }
    }
    assert!(remaining.len() <= 1 + 6 + 4 + 3, "kept {}", remaining.len());
    assert!(remaining.len() < seeded.len(), "nothing was deleted");
}

#[tokio::test]
async fn scheduler_queues_due_slot_once() {
    let fixture = Fixture::new().await;
    let extra = "[backup.environments.env-staging]\nschedules = [{ cron = \"* * * * *\", backup_type = \"daily\" }]\n\
                 [backup.environments.env-prod]\nschedules = []\n";
    let settings = fixture.settings_with("local", None, extra);
    let pool = odooops_agent::db::pool(&settings.database).unwrap();
    let now = chrono::Utc::now();
    odooops_agent::workflows::backup::scheduler::tick(&settings, &pool, now)
        .await
        .unwrap();
    odooops_agent::workflows::backup::scheduler::tick(&settings, &pool, now)
        .await
        .unwrap();

    let client = fixture.ops.client().await;
    let rows = client
        .query("SELECT env_id, backup_type, metadata FROM ops.backups", &[])
        .await
        .unwrap();
    let staging: Vec<_> = rows
        .iter()
        .filter(|row| row.get::<_, String>(0) == "env-staging")
        .collect();
    assert_eq!(staging.len(), 1, "one slot, one backup");
    assert_eq!(staging[0].get::<_, String>(1), "daily");
    let metadata: Value = staging[0].get(2);
    assert_eq!(metadata["triggered_by"], json!("schedule"));
    assert!(
        rows.iter().all(|row| row.get::<_, String>(0) != "env-prod"),
        "empty schedules disable it"
    );
    let queued: i64 = client
        .query_one(
            "SELECT count(*) FROM ops.runs WHERE workflow = 'backup' AND env_id = 'env-staging'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(queued, 1);
}

/// Lists every file below `dir`, recursively.
fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut files = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return files;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path.display().to_string());
        }
    }
    files
}

/// Counts the multipart uploads in progress in `bucket`.
async fn open_uploads(client: &aws_sdk_s3::Client, bucket: &str) -> usize {
    let listed = client
        .list_multipart_uploads()
        .bucket(bucket)
        .send()
        .await
        .unwrap();
    listed.uploads().len()
}

#[tokio::test]
async fn dropped_upload_is_aborted() {
    use bytes::Bytes;
    use odooops_agent::storage::{Stores, UploadPart};
    use tokio_util::sync::CancellationToken;

    let fixture = Fixture::with_s3().await;
    let settings = fixture.settings("s3");
    let store = Stores::from_settings(&settings.storage).default;
    let (client, bucket) = (&fixture.s3_client(), fixture.bucket.as_str());
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let upload = store.put_stream("dropped/object.zip", rx, CancellationToken::new());

    let started = async {
        for _ in 0..3 {
            let part = Bytes::from(vec![7u8; 5 * 1024 * 1024]);
            tx.send(UploadPart::Data(part)).await.unwrap();
        }
        // The store receives the third part only after it started the multipart upload
        // and has the upload's id, which it needs for the abort.
        let limit = Duration::from_secs(30);
        let tx = &tx;
        common::wait::until("the parts taken", limit, move || async move {
            (tx.capacity() == tx.max_capacity()).then_some(())
        })
        .await;
        assert_eq!(open_uploads(client, bucket).await, 1);
    };
    tokio::select! {
        result = upload => panic!("the upload ended without its last part: {result:?}"),
        () = started => {}
    }

    let limit = Duration::from_secs(30);
    common::wait::until("the dropped upload aborted", limit, move || async move {
        (open_uploads(client, bucket).await == 0).then_some(())
    })
    .await;
    drop(tx);
}
