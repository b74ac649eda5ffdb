//! The odooops-agent binary: exit codes and messages of `check`, and the database URL
//! override for `migrate`, `run` and `check`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::runs;
use common::TestDb;

const BINARY: &str = env!("CARGO_BIN_EXE_odooops-agent");
const PASSWORD: &str = "s3cret-Pa55word";

/// Runs the binary with `args`, with ODOOOPS_DATABASE_URL set to `database_url` or
/// removed.
fn agent(args: &[&str], database_url: Option<&str>) -> Output {
    let mut command = Command::new(BINARY);
    command.args(args);
    match database_url {
        Some(url) => command.env("ODOOOPS_DATABASE_URL", url),
        None => command.env_remove("ODOOOPS_DATABASE_URL"),
    };
    command.output().expect("running odooops-agent")
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Returns a URL, with a password, to a loopback port where nothing listens.
fn unreachable_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("postgres://agent:{PASSWORD}@127.0.0.1:{port}/ops?sslmode=disable")
}

#[test]
fn check_rejects_bad_value_with_64() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "[agent]\nconcurrency = 0\n");

    let output = agent(&["check", "--config", config.to_str().unwrap()], None);

    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("agent.concurrency"), "{stderr}");
    assert!(stderr.contains(": 0 "), "{stderr}");
}

#[test]
fn check_with_unknown_key_exits_64_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "[agent]\nlease_seconds = 30\n");

    let output = agent(&["check", "--config", config.to_str().unwrap()], None);

    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("lease_seconds"), "{stderr}");
}

#[test]
fn check_with_unreachable_database_hides_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let url = unreachable_url();
    let config = format!("[database]\nurl = \"{url}\"\nconnect_timeout_secs = 2\n");
    let config = write_config(dir.path(), &config);

    let output = agent(&["check", "--config", config.to_str().unwrap()], None);

    let stdout = text(&output.stdout);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains("database 127.0.0.1:"), "{stderr}");
    assert!(stderr.contains("Connection refused"), "{stderr}");
    assert!(stderr.contains("/ops as agent"), "{stderr}");
    assert!(!stderr.contains(PASSWORD), "{stderr}");
    assert!(!stdout.contains(PASSWORD), "{stdout}");
}

#[tokio::test]
async fn database_url_variable_overrides_the_config() {
    let db = TestDb::empty().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[agent]\nworker_id = \"cli-agent\"\n[database]\nurl = \"{}\"\n",
        unreachable_url()
    );
    let config = write_config(dir.path(), &config);
    let config = config.to_str().unwrap();

    let first = agent(&["migrate", "--config", config], Some(&db.url));
    let second = agent(&["migrate", "--config", config], Some(&db.url));
    let check = agent(&["check", "--config", config], Some(&db.url));
    db.seed_project().await;
    let client = db.client().await;
    let run_id = runs::queue(&client, "env-dev", "frobnicate").await;
    let once = agent(&["run", "--once", "--config", config], Some(&db.url));

    assert!(first.status.success(), "{}", text(&first.stderr));
    let every_version: Vec<i32> = odooops_agent::migrate::MIGRATIONS
        .iter()
        .map(|migration| migration.version)
        .collect();
    assert!(
        text(&first.stdout).contains(&format!("applied migrations {every_version:?}")),
        "{}",
        text(&first.stdout)
    );
    assert!(second.status.success(), "{}", text(&second.stderr));
    assert!(text(&second.stdout).contains("schema is up to date"));
    // Past the database, check also needs a Docker engine, which this test does not.
    let checked = text(&check.stdout);
    assert!(
        checked.contains("database: ok"),
        "{checked}{}",
        text(&check.stderr)
    );
    assert!(once.status.success(), "{}", text(&once.stderr));
    let run = runs::run(&client, run_id).await;
    assert_eq!(run.status, "failed");
    assert_eq!(run.worker_id.as_deref(), Some("cli-agent"));
}

#[tokio::test]
async fn migrate_without_config_uses_the_database_url_variable() {
    let db = TestDb::empty().await;

    let output = agent(&["migrate"], Some(&db.url));

    assert!(output.status.success(), "{}", text(&output.stderr));
    let client = db.client().await;
    let versions: i64 = client
        .query_one("SELECT count(*) FROM ops.schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(versions as usize, odooops_agent::migrate::MIGRATIONS.len());
}

#[test]
fn run_once_gives_up_on_unreachable_database() {
    let dir = tempfile::tempdir().unwrap();
    let url = unreachable_url();
    let config = format!("[database]\nurl = \"{url}\"\nconnect_timeout_secs = 1\n");
    let config = write_config(dir.path(), &config);

    let output = agent(
        &["run", "--once", "--config", config.to_str().unwrap()],
        None,
    );

    let stdout = text(&output.stdout);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("claiming a run failed 8 times in a row"),
        "{stderr}"
    );
    assert!(stderr.contains("Connection refused"), "{stderr}");
    assert!(!stderr.contains(PASSWORD), "{stderr}");
    assert!(!stdout.contains(PASSWORD), "{stdout}");
}

#[tokio::test]
async fn failed_migration_names_the_server_error() {
    let db = TestDb::empty().await;
    db.client()
        .await
        .batch_execute("CREATE SCHEMA ops; CREATE TABLE ops.projects (x integer)")
        .await
        .unwrap();

    let output = agent(&["migrate"], Some(&db.url));

    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("migration 1 (control_plane) failed"),
        "{stderr}"
    );
    assert!(
        stderr.contains("relation \"projects\" already exists"),
        "{stderr}"
    );
    assert!(stderr.contains("SQLSTATE 42P07"), "{stderr}");
}

/// Writes a config for `db` with extra agent keys and a Docker host; returns its path.
async fn migrated_config(db: &TestDb, dir: &Path, agent_keys: &str, docker_host: &str) -> PathBuf {
    let migrated = agent(&["migrate"], Some(&db.url));
    assert!(migrated.status.success(), "{}", text(&migrated.stderr));
    db.seed_project().await;
    let config = format!("[agent]\n{agent_keys}\n[docker]\nhost = {docker_host:?}\n");
    write_config(dir, &config)
}

#[tokio::test]
async fn check_names_unknown_environments() {
    let db = TestDb::empty().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = "environments = [\"env-dev\", \"env-dvv\"]";
    let config = migrated_config(&db, dir.path(), keys, "unix:///nonexistent.sock").await;

    let output = agent(
        &["check", "--config", config.to_str().unwrap()],
        Some(&db.url),
    );

    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("agent.environments"), "{stderr}");
    assert!(stderr.contains("env-dvv"), "{stderr}");
    assert!(!stderr.contains("\"env-dev\""), "{stderr}");
}

#[tokio::test]
async fn check_gives_up_on_a_silent_engine() {
    let db = TestDb::empty().await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("silent.sock");
    // Accepts connections and never responds, like a hung engine.
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let silent_engine = std::thread::spawn(move || {
        let connection = listener.accept();
        std::thread::sleep(std::time::Duration::from_secs(30));
        drop(connection);
    });
    let host = format!("unix://{}", socket.display());
    let config = migrated_config(&db, dir.path(), "", &host).await;

    let output = agent(
        &["check", "--config", config.to_str().unwrap()],
        Some(&db.url),
    );

    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains("did not respond within 10 s"), "{stderr}");
    assert!(stderr.contains("silent.sock"), "{stderr}");
    drop(silent_engine);
}
