//! Helpers for the backup and restore tests: an Odoo-shaped database with a filestore,
//! agent settings pointing at it, and an S3 client for the test server.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use aws_sdk_s3::Client;
use odooops_agent::agent::{self, Mode, Shutdown};
use odooops_agent::config::Settings;
use odooops_agent::workflows::Workflows;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_postgres::Client as PgClient;
use uuid::Uuid;

use crate::common::{connect, server_url, url_for_database, TestDb};

/// Rows per table of the fixture, as the manifest must count them.
pub const PARTNERS: i64 = 250;
pub const ATTACHMENTS: usize = 12;

/// An Odoo-shaped database on the test server with its filestore in a temporary data
/// directory. Every database whose name starts with this one's is dropped at the end.
pub struct OdooDb {
    pub name: String,
    pub dir: tempfile::TempDir,
    /// store_fname of every attachment and the contents of its file.
    pub files: Vec<(String, Vec<u8>)>,
}

impl OdooDb {
    pub async fn create() -> OdooDb {
        let name = format!("odooops_bk_{}", &Uuid::new_v4().simple().to_string()[..12]);
        let admin = connect(&url_for_database(&server_url(), "postgres")).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("creating the Odoo database");
        let db = OdooDb {
            name,
            dir: tempfile::tempdir().expect("temporary directory"),
            files: Vec::new(),
        };
        db.client()
            .await
            .batch_execute(SCHEMA)
            .await
            .expect("creating the Odoo tables");
        let mut db = db;
        db.add_attachments(ATTACHMENTS).await;
        db
    }

    pub fn url(&self) -> String {
        url_for_database(&server_url(), &self.name)
    }

    pub async fn client(&self) -> PgClient {
        connect(&self.url()).await
    }

    pub async fn client_for(&self, database: &str) -> PgClient {
        connect(&url_for_database(&server_url(), database)).await
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn filestore(&self) -> PathBuf {
        self.data_dir().join("filestore").join(&self.name)
    }

    /// Adds attachments whose files exist in the filestore under Odoo's
    /// `<first two hex digits>/<sha1>` names.
    pub async fn add_attachments(&mut self, count: usize) {
        let client = self.client().await;
        for index in 0..count {
            let contents = format!("attachment {index} of {}\n", self.name)
                .repeat(50 + index)
                .into_bytes();
            let sha1 = hex::encode(sha1_digest(&contents));
            let store_fname = format!("{}/{sha1}", &sha1[..2]);
            let path = self.filestore().join(&store_fname);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &contents).unwrap();
            client
                .execute(
                    "INSERT INTO ir_attachment (name, store_fname, file_size, mimetype) \
                     VALUES ($1, $2, $3, 'text/plain')",
                    &[
                        &format!("file{index}.txt"),
                        &store_fname,
                        &(contents.len() as i32),
                    ],
                )
                .await
                .unwrap();
            self.files.push((store_fname, contents));
        }
    }

    /// Adds a file of random bytes to the filestore (an attachment like a JPEG).
    pub async fn add_random_file(&mut self, size: usize) {
        let contents: Vec<u8> = (0..size).map(|_| rand_byte()).collect();
        let sha1 = hex::encode(sha1_digest(&contents));
        let store_fname = format!("{}/{sha1}", &sha1[..2]);
        let path = self.filestore().join(&store_fname);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &contents).unwrap();
        self.client()
            .await
            .execute(
                "INSERT INTO ir_attachment (name, store_fname, file_size, mimetype) \
                 VALUES ('photo.jpg', $1, $2, 'image/jpeg')",
                &[&store_fname, &(size as i32)],
            )
            .await
            .unwrap();
        self.files.push((store_fname, contents));
    }

    /// Number of rows in `table` of `database`.
    pub async fn count(&self, database: &str, table: &str) -> i64 {
        let client = self.client_for(database).await;
        client
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0)
    }

    pub async fn database_exists(&self, database: &str) -> bool {
        let admin = connect(&url_for_database(&server_url(), "postgres")).await;
        admin
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)",
                &[&database],
            )
            .await
            .unwrap()
            .get(0)
    }
}

impl Drop for OdooDb {
    fn drop(&mut self) {
        let prefix = self.name.clone();
        let admin_url = url_for_database(&server_url(), "postgres");
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let admin = connect(&admin_url).await;
                let rows = admin
                    .query(
                        "SELECT datname FROM pg_database WHERE datname LIKE $1 || '%'",
                        &[&prefix],
                    )
                    .await
                    .unwrap_or_default();
                for row in rows {
                    let name: String = row.get(0);
                    let _ = admin
                        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// Tables and rows shaped like Odoo's, enough for backups, restores and neutralization.
const SCHEMA: &str = "
CREATE TABLE ir_module_module (id serial PRIMARY KEY, name varchar NOT NULL,
    state varchar, latest_version varchar);
INSERT INTO ir_module_module (name, state, latest_version) VALUES
    ('base', 'installed', '17.0.1.3'), ('web', 'installed', '17.0.1.0'),
    ('sale', 'installed', '17.0.1.2'), ('crm', 'uninstalled', NULL);
CREATE TABLE ir_attachment (id serial PRIMARY KEY, name varchar NOT NULL,
    store_fname varchar, file_size integer, mimetype varchar, db_datas bytea);
CREATE TABLE ir_cron (id serial PRIMARY KEY, cron_name varchar, active boolean);
INSERT INTO ir_cron (cron_name, active) VALUES ('Mail: Email Queue Manager', true),
    ('Base: Auto-vacuum internal data', true), ('Disabled job', false);
CREATE TABLE ir_mail_server (id serial PRIMARY KEY, name varchar, smtp_host varchar,
    active boolean);
INSERT INTO ir_mail_server (name, smtp_host, active) VALUES
    ('Production SMTP', 'smtp.example.com', true);
CREATE TABLE ir_config_parameter (id serial PRIMARY KEY, key varchar NOT NULL UNIQUE,
    value text NOT NULL);
INSERT INTO ir_config_parameter (key, value) VALUES
    ('database.uuid', 'c0ffee00-0000-4000-8000-000000000001'),
    ('web.base.url', 'https://erp.example.com');
CREATE TABLE res_company (id serial PRIMARY KEY, name varchar);
INSERT INTO res_company (name) VALUES ('Example Ltd');
CREATE TABLE res_partner (id serial PRIMARY KEY, name varchar, comment text);
INSERT INTO res_partner (name, comment)
    SELECT 'Partner ' || i, E'line one\\nline two\\ttab ' || i FROM generate_series(1, 250) i;
CREATE TABLE res_users (id serial PRIMARY KEY, login varchar, partner_id integer);
INSERT INTO res_users (login, partner_id) VALUES ('admin', 1), ('demo', 2);
";

fn sha1_digest(data: &[u8]) -> Vec<u8> {
    // Odoo names filestore files by SHA-1; any stable digest works for the fixture, and
    // SHA-256 cut to 20 bytes keeps the test free of another dependency.
    Sha256::digest(data)[..20].to_vec()
}

fn rand_byte() -> u8 {
    use std::cell::Cell;
    thread_local!(static STATE: Cell<u64> = Cell::new(0x9E37_79B9_7F4A_7C15 ^ std::process::id() as u64));
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        (x >> 24) as u8
    })
}

/// S3 test server settings from the environment, failing the test with set-up advice.
pub struct S3Env {
    pub endpoint: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl S3Env {
    pub fn from_env() -> S3Env {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!(
                    "{name} is not set: start an S3 server on loopback (for example \
                     `moto_server -H 127.0.0.1 -p 9100`) and export ODOOOPS_TEST_S3_ENDPOINT, \
                     ODOOOPS_TEST_S3_REGION, ODOOOPS_TEST_S3_ACCESS_KEY_ID and \
                     ODOOOPS_TEST_S3_SECRET_ACCESS_KEY, or run the tests through scripts/test"
                )
            })
        };
        S3Env {
            endpoint: var("ODOOOPS_TEST_S3_ENDPOINT"),
            region: var("ODOOOPS_TEST_S3_REGION"),
            access_key_id: var("ODOOOPS_TEST_S3_ACCESS_KEY_ID"),
            secret_access_key: var("ODOOOPS_TEST_S3_SECRET_ACCESS_KEY"),
        }
    }

    pub fn client(&self) -> Client {
        let config = aws_sdk_s3::Config::builder()
            .behavior_version_latest()
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                &self.access_key_id,
                &self.secret_access_key,
                None,
                None,
                "test",
            ))
            .region(aws_sdk_s3::config::Region::new(self.region.clone()))
            .endpoint_url(&self.endpoint)
            .force_path_style(true)
            .build();
        Client::from_conf(config)
    }
}

/// Removes a test bucket with its objects and in-progress multipart uploads. A failure
/// is printed, not raised, because it runs while a fixture is dropped.
async fn remove_bucket(client: &Client, bucket: &str) {
    if let Err(err) = empty_bucket(client, bucket).await {
        eprintln!("emptying test bucket {bucket} failed: {err}");
    }
    if let Err(err) = client.delete_bucket().bucket(bucket).send().await {
        eprintln!("deleting test bucket {bucket} failed: {}", describe(err));
    }
}

/// Formats an SDK error with its cause chain.
fn describe<E: std::error::Error>(err: E) -> String {
    aws_sdk_s3::error::DisplayErrorContext(err).to_string()
}

/// Aborts every multipart upload in progress in `bucket` and deletes every object,
/// following each listing's markers across pages.
async fn empty_bucket(client: &Client, bucket: &str) -> Result<(), String> {
    let (mut key_marker, mut upload_id_marker) = (None, None);
    loop {
        let listed = client
            .list_multipart_uploads()
            .bucket(bucket)
            .set_key_marker(key_marker)
            .set_upload_id_marker(upload_id_marker)
            .send()
            .await
            .map_err(describe)?;
        for upload in listed.uploads() {
            client
                .abort_multipart_upload()
                .bucket(bucket)
                .key(upload.key().unwrap_or_default())
                .upload_id(upload.upload_id().unwrap_or_default())
                .send()
                .await
                .map_err(describe)?;
        }
        key_marker = listed.next_key_marker().map(str::to_string);
        upload_id_marker = listed.next_upload_id_marker().map(str::to_string);
        if listed.is_truncated() != Some(true) || key_marker.is_none() {
            break;
        }
    }
    let mut token = None;
    loop {
        let listed = client
            .list_objects_v2()
            .bucket(bucket)
            .set_continuation_token(token)
            .send()
            .await
            .map_err(describe)?;
        for object in listed.contents() {
            client
                .delete_object()
                .bucket(bucket)
                .key(object.key().unwrap_or_default())
                .send()
                .await
                .map_err(describe)?;
        }
        token = listed.next_continuation_token().map(str::to_string);
        if token.is_none() {
            return Ok(());
        }
    }
}

/// Everything a backup test needs: control plane, Odoo database, settings.
pub struct Fixture {
    pub ops: TestDb,
    pub odoo: OdooDb,
    pub bucket: String,
    pub s3: Option<S3Env>,
}

impl Drop for Fixture {
    /// Removes the fixture's bucket, because the shared S3 test server keeps every bucket
    /// in memory until it stops. Drop cannot await, so a thread with its own runtime sends
    /// the requests.
    fn drop(&mut self) {
        let Some(s3) = self.s3.take() else {
            return;
        };
        let bucket = self.bucket.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(remove_bucket(&s3.client(), &bucket));
        })
        .join();
    }
}

impl Fixture {
    /// Creates a control plane whose env-prod uses a new Odoo database, and env-staging a
    /// database of the same name with `_staging` appended, which does not exist.
    pub async fn new() -> Fixture {
        let ops = TestDb::new().await;
        ops.seed_project().await;
        let odoo = OdooDb::create().await;
        ops.client()
            .await
            .execute(
                "UPDATE ops.environments SET db_name = CASE env_id WHEN 'env-prod' THEN $1 \
                 ELSE $1 || '_staging' END WHERE env_id IN ('env-prod', 'env-staging')",
                &[&odoo.name],
            )
            .await
            .unwrap();
        Fixture {
            ops,
            odoo,
            bucket: format!("odooops-bk-{}", &Uuid::new_v4().simple().to_string()[..12]),
            s3: None,
        }
    }

    /// Same, with a bucket of its own on the S3 test server.
    pub async fn with_s3() -> Fixture {
        let mut fixture = Fixture::new().await;
        fixture.s3 = Some(S3Env::from_env());
        fixture
            .s3_client()
            .create_bucket()
            .bucket(&fixture.bucket)
            .send()
            .await
            .expect("creating the test bucket");
        fixture
    }

    pub fn backups_dir(&self) -> PathBuf {
        self.odoo.dir.path().join("backups")
    }

    pub fn work_dir(&self) -> PathBuf {
        self.odoo.dir.path().join("work")
    }

    /// Agent settings; `backend` is "local" or "s3", `extra` more TOML sections.
    pub fn settings_with(
        &self,
        backend: &str,
        s3_endpoint: Option<&str>,
        extra: &str,
    ) -> Arc<Settings> {
        let mut toml = format!(
            "[agent]\nworker_id = \"backup-test\"\nwork_dir = {work:?}\nlease_secs = 5\n\
             heartbeat_interval_secs = 1\npoll_interval_secs = 1\n\
             [storage]\nbackend = {backend:?}\nlocal_dir = {local:?}\n\
             [backup.default]\nhost = \"127.0.0.1\"\nport = 5432\nuser = \"odooops\"\n\
             password = \"odooops\"\ndata_dir = {data:?}\n",
            work = self.work_dir().display().to_string(),
            local = self.backups_dir().display().to_string(),
            data = self.odoo.data_dir().display().to_string(),
        );
        if let Some(s3) = &self.s3 {
            toml.push_str(&format!(
                "[storage.s3]\nbucket = {bucket:?}\nendpoint_url = {endpoint:?}\nregion = {region:?}\n\
                 force_path_style = true\naccess_key_id = {key:?}\nsecret_access_key = {secret:?}\n\
                 part_size_mib = 5\n",
                bucket = self.bucket,
                endpoint = s3_endpoint.unwrap_or(&s3.endpoint),
                region = s3.region,
                key = s3.access_key_id,
                secret = s3.secret_access_key,
            ));
        }
        toml.push_str(extra);
        self.ops.settings(&toml)
    }

    pub fn settings(&self, backend: &str) -> Arc<Settings> {
        self.settings_with(backend, None, "")
    }

    pub fn s3_client(&self) -> Client {
        self.s3.as_ref().expect("fixture made with S3").client()
    }

    /// Queues a backup through ops.create_backup; returns its backup_id.
    pub async fn queue_backup(&self, env: &str, backup_type: &str) -> Uuid {
        self.ops
            .client()
            .await
            .query_one(
                "SELECT backup_id FROM ops.create_backup('proj', $1, $2, '{\"triggered_by\": \"test\"}')",
                &[&env, &backup_type],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Queues a run of `workflow` with extra metadata; returns its run_id.
    pub async fn queue_run(&self, env: &str, metadata: Value) -> Uuid {
        self.ops
            .client()
            .await
            .query_one(
                "SELECT run_id FROM ops.queue_run('proj', $1, NULL, NULL, $2)",
                &[&env, &metadata],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Runs the agent until the queue is empty.
    pub async fn run_agent(&self, settings: Arc<Settings>) {
        agent::run(
            settings,
            Workflows::standard(),
            Mode::Once,
            Shutdown::default(),
        )
        .await
        .expect("agent run");
    }

    pub async fn backup_row(&self, backup_id: Uuid) -> tokio_postgres::Row {
        self.ops
            .client()
            .await
            .query_one(
                "SELECT * FROM ops.backups WHERE backup_id = $1",
                &[&backup_id],
            )
            .await
            .unwrap()
    }

    /// Returns the run's status, metadata and every event message.
    pub async fn run_outcome(&self, run_id: Uuid) -> (String, Value, Vec<String>) {
        let client = self.ops.client().await;
        let run = client
            .query_one(
                "SELECT status, metadata FROM ops.runs WHERE run_id = $1",
                &[&run_id],
            )
            .await
            .unwrap();
        let events = client
            .query(
                "SELECT message FROM ops.run_events WHERE run_id = $1 ORDER BY seq",
                &[&run_id],
            )
            .await
            .unwrap();
        (
            run.get(0),
            run.get(1),
            events.iter().map(|row| row.get(0)).collect(),
        )
    }

    pub async fn run_of_backup(&self, backup_id: Uuid) -> Uuid {
        self.backup_row(backup_id).await.get("run_id")
    }
}

/// Hex SHA-256 of a file.
pub fn sha256_of(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// Path of a `file://` location.
pub fn local_path(location: &str) -> PathBuf {
    PathBuf::from(
        location
            .strip_prefix("file://")
            .expect("a file:// location"),
    )
}

/// Runs Python's zipfile on an archive: checks every CRC, then prints one line per
/// entry with its name and size.
pub fn python_zip_listing(path: &Path) -> String {
    let script = "import sys, zipfile\n\
                  z = zipfile.ZipFile(sys.argv[1])\n\
                  assert z.testzip() is None\n\
                  for i in z.infolist(): print(i.filename, i.file_size)\n";
    let output = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(path)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "python zipfile failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Reads one entry of an archive with Python's zipfile.
pub fn python_zip_read(path: &Path, name: &str) -> Vec<u8> {
    let script = "import sys, zipfile\nsys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))\n";
    let output = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(path)
        .arg(name)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}
