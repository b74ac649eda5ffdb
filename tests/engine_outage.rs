//! Losing the Docker engine: the agent reaches the engine through a unix socket proxy
//! that the test cuts and restores, so the shared engine keeps running for everyone else.
//! The agent runs in a child process, whose log and systemd notifications the test reads.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::agents;
use common::child::{self, ChildAgent};
use common::{runs, wait, TestDb};
use tokio::net::{UnixDatagram, UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use uuid::Uuid;

const LONG: Duration = Duration::from_secs(30);

/// A unix socket that forwards to the Docker engine's socket while it is up. Cut, it
/// closes open connections and every new one, as a stopped engine's socket would fail.
struct EngineProxy {
    path: PathBuf,
    cut: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl EngineProxy {
    async fn start(dir: &Path) -> EngineProxy {
        let target = engine_socket();
        let path = dir.join("docker.sock");
        let listener = UnixListener::bind(&path).expect("binding the engine proxy");
        let (cut, watcher) = watch::channel(false);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                // Dropping the connection closes it.
                if !*watcher.borrow() {
                    tokio::spawn(pipe(client, target.clone(), watcher.clone()));
                }
            }
        });
        EngineProxy { path, cut, accept }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

impl Drop for EngineProxy {
    fn drop(&mut self) {
        self.set_cut(true);
        self.accept.abort();
    }
}

/// Returns the engine's socket path from DOCKER_HOST, or the default socket.
fn engine_socket() -> PathBuf {
    let host = std::env::var("DOCKER_HOST").unwrap_or_default();
    if host.is_empty() {
        return PathBuf::from("/var/run/docker.sock");
    }
    let path = host
        .strip_prefix("unix://")
        .unwrap_or_else(|| panic!("DOCKER_HOST={host} is not a unix socket to proxy"));
    PathBuf::from(path)
}

async fn pipe(mut client: UnixStream, target: PathBuf, mut cut: watch::Receiver<bool>) {
    let Ok(mut engine) = UnixStream::connect(&target).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut engine) => {}
        _ = cut.wait_for(|cut| *cut) => {}
    }
}

/// The datagram socket that NOTIFY_SOCKET names, where systemd would listen. It stores
/// the STATUS= values it receives, in order.
struct NotifySocket {
    path: PathBuf,
    statuses: Arc<Mutex<Vec<String>>>,
    receive: JoinHandle<()>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("binding the notify socket");
        let statuses = Arc::new(Mutex::new(Vec::new()));
        let received = statuses.clone();
        let receive = tokio::spawn(async move {
            let mut buffer = vec![0u8; 4096];
            while let Ok(length) = socket.recv(&mut buffer).await {
                let text = String::from_utf8_lossy(&buffer[..length]).into_owned();
                let mut statuses = received.lock().unwrap();
                for line in text.lines() {
                    if let Some(status) = line.strip_prefix("STATUS=") {
                        statuses.push(status.to_string());
                    }
                }
            }
        });
        NotifySocket {
            path,
            statuses,
            receive,
        }
    }

    fn statuses(&self) -> Vec<String> {
        self.statuses.lock().unwrap().clone()
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.receive.abort();
    }
}

async fn wait_for_status(client: &Client, run_id: Uuid, status: &str) -> runs::RunRow {
    wait::until(
        &format!("run {run_id} to be {status}"),
        LONG,
        || async move { runs::run_in(client, run_id, status).await },
    )
    .await
}

async fn wait_for_log(child: &ChildAgent, text: &str) {
    wait::until(&format!("the agent to log {text:?}"), LONG, || async move {
        child.log().contains(text).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_outage_holds_back_builds() {
    if child::act_as_agent().await {
        return;
    }
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = EngineProxy::start(dir.path()).await;
    let notify = NotifySocket::bind(dir.path());
    // The child's build and restore runs succeed at once: builds stand for the runs that
    // need the engine, and restores with the host's pg_dump for those that do not.
    let release = dir.path().join("release");
    std::fs::write(&release, b"").unwrap();
    let mut config = agents::config("agent-a", "workflows = [\"build\", \"restore\"]");
    let socket = proxy.path.display();
    config.push_str(&format!(
        "[docker]\nhost = \"unix://{socket}\"\nping_interval_secs = 1\n"
    ));
    let notify_path = notify.path.display().to_string();
    let mut agent = ChildAgent::spawn_with(
        "engine_outage_holds_back_builds",
        &db.url,
        &config,
        Some(&release),
        &[("NOTIFY_SOCKET", &notify_path)],
    );
    let before = runs::queue(&client, "env-dev", "build").await;
    wait_for_status(&client, before, "success").await;

    proxy.set_cut(true);
    wait_for_log(&agent, "Docker engine unreachable").await;
    let waiting_build = runs::queue(&client, "env-dev", "build").await;
    let restore = runs::queue(&client, "env-dev", "restore").await;
    wait_for_status(&client, restore, "success").await;
    // Three pings and three polls at 1 s each, any of which could claim the build.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let while_down = runs::run(&client, waiting_build).await;

    proxy.set_cut(false);
    let after = wait_for_status(&client, waiting_build, "success").await;
    agent.terminate();
    let exit = agent.exit_status(LONG).await;
    let log = agent.log();
    let statuses = notify.statuses();

    assert!(exit.success(), "agent exited with {exit}; log:\n{log}");
    assert_eq!(while_down.status, "queued", "claimed without the engine");
    assert_eq!(while_down.attempt, 0);
    assert_eq!(after.attempt, 1);
    assert_eq!(log.matches("Docker engine unreachable").count(), 1, "{log}");
    let back = log.matches("Docker engine reachable again").count();
    assert_eq!(back, 1, "{log}");
    let down_at = statuses
        .iter()
        .position(|s| s.starts_with("Docker engine unreachable"));
    assert!(down_at.is_some(), "no status for the outage: {statuses:?}");
    let up_again = statuses[down_at.unwrap()..]
        .iter()
        .any(|s| s == "claiming runs");
    assert!(up_again, "no status for the engine's return: {statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_loss_fails_a_running_build() {
    if child::act_as_agent().await {
        return;
    }
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = EngineProxy::start(dir.path()).await;
    // No release file: the child's build blocks, as a build waiting on the engine would.
    let release = dir.path().join("release");
    let mut config = agents::config("agent-a", "workflows = [\"build\"]");
    let socket = proxy.path.display();
    config.push_str(&format!(
        "[docker]\nhost = \"unix://{socket}\"\nping_interval_secs = 1\n"
    ));
    let mut agent = ChildAgent::spawn(
        "engine_loss_fails_a_running_build",
        &db.url,
        &config,
        Some(&release),
    );
    let build = runs::queue(&client, "env-dev", "build").await;
    wait_for_status(&client, build, "running").await;

    proxy.set_cut(true);
    let failed = wait_for_status(&client, build, "failed").await;
    let events = runs::events(&client, build).await;
    agent.terminate();
    let exit = agent.exit_status(LONG).await;

    assert!(
        exit.success(),
        "agent exited with {exit}; log:\n{}",
        agent.log()
    );
    let error = failed.metadata["error"].as_str().unwrap_or_default();
    assert!(error.contains("Docker engine stopped replying"), "{error}");
    assert_eq!(failed.metadata["failed_step"], "docker");
    let stopped = runs::messages(&events).contains(&"stopped by cancellation");
    assert!(stopped, "the workflow was not stopped: {events:?}");
}
