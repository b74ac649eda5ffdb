//! Agents in a child process, for tests that send real signals: the test binary starts
//! itself again, running only the calling test, and the test body acts as the agent
//! when it finds [`CONFIG_VAR`] set.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use odooops_agent::agent::{self, Mode, Shutdown};
use odooops_agent::workflows::Workflows;

use super::workflows::{Block, Release};

/// Agent config TOML; set only in the child.
pub const CONFIG_VAR: &str = "ODOOOPS_TEST_CHILD_CONFIG";
/// Database URL for the child's agent.
pub const URL_VAR: &str = "ODOOOPS_TEST_CHILD_URL";
/// File whose creation lets the child's blocked runs succeed.
pub const RELEASE_VAR: &str = "ODOOOPS_TEST_CHILD_RELEASE";
/// Set to "standard" for the workflows the agent binary runs, in place of [`Block`].
pub const WORKFLOWS_VAR: &str = "ODOOOPS_TEST_CHILD_WORKFLOWS";

/// Runs the agent when this process is a child started by [`ChildAgent::spawn`], and
/// returns whether it was one. `build` and `restore` runs block until released by the
/// file named in [`RELEASE_VAR`], or until cancelled. With [`WORKFLOWS_VAR`] set to
/// "standard", the child runs the standard workflows instead.
pub async fn act_as_agent() -> bool {
    let Ok(config) = std::env::var(CONFIG_VAR) else {
        return false;
    };
    let url = std::env::var(URL_VAR).expect("the parent sets the database URL");
    let settings = super::agents::settings(&url, &config);
    odooops_agent::logging::init(&settings.log);

    let release = match std::env::var(RELEASE_VAR) {
        Ok(path) => Release::File(PathBuf::from(path)),
        Err(_) => Release::Never,
    };
    let mut workflows = Workflows::new();
    workflows.register("build", Block::new(release.clone()));
    workflows.register("restore", Block::new(release));
    if std::env::var(WORKFLOWS_VAR).as_deref() == Ok("standard") {
        workflows = Workflows::standard();
    }

    let shutdown = Shutdown::default();
    shutdown.on_signals().expect("installing signal handlers");
    agent::run(settings, workflows, Mode::Daemon, shutdown)
        .await
        .expect("child agent failed");
    true
}

/// An agent in a child process, killed when dropped.
pub struct ChildAgent {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ChildAgent {
    /// Starts this test binary running only `test_name`, as an agent with `config`.
    pub fn spawn(test_name: &str, url: &str, config: &str, release: Option<&PathBuf>) -> Self {
        Self::spawn_with(test_name, url, config, release, &[])
    }

    /// Like [`ChildAgent::spawn`], running the standard workflows.
    pub fn spawn_standard(test_name: &str, url: &str, config: &str) -> Self {
        Self::spawn_with(test_name, url, config, None, &[(WORKFLOWS_VAR, "standard")])
    }

    /// Like [`ChildAgent::spawn`], with extra environment variables for the child.
    pub fn spawn_with(
        test_name: &str,
        url: &str,
        config: &str,
        release: Option<&PathBuf>,
        env: &[(&str, &str)],
    ) -> Self {
        let dir = tempfile::tempdir().expect("creating a temporary directory");
        let log = dir.path().join("agent.log");
        let output = std::fs::File::create(&log).expect("creating the child's log");
        let mut command = Command::new(std::env::current_exe().expect("test binary path"));
        command
            .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
            .env(CONFIG_VAR, config)
            .env(URL_VAR, url)
            .env("RUST_LOG", "odooops_agent=debug")
            .stdin(Stdio::null())
            .stdout(output.try_clone().expect("duplicating the log handle"))
            .stderr(output);
        if let Some(path) = release {
            command.env(RELEASE_VAR, path);
        }
        command.envs(env.iter().copied());
        let child = command.spawn().expect("starting the child agent");
        ChildAgent {
            child,
            log,
            _dir: dir,
        }
    }

    /// Returns the child's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM, as systemd does to stop the service.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -TERM failed: {status}");
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) {
        self.child.kill().expect("sending SIGKILL");
        self.child.wait().expect("reaping the child");
    }

    /// Waits for the child to exit and returns its status.
    pub async fn exit_status(&mut self, limit: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("polling the child") {
                return status;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "child agent still running after {limit:?}; log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ChildAgent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
