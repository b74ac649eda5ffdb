//! Helpers for the deploy tests: Odoo-like test images built FROM scratch with busybox,
//! an environment per test with unique container names and a free loopback port, and
//! clean-up of every container and volume a test made.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    BuildImageOptionsBuilder, CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder,
    RemoveVolumeOptionsBuilder,
};
use bollard::Docker;
use futures_util::{StreamExt, TryStreamExt};
use odooops_agent::agent::{self, Mode, Shutdown};
use odooops_agent::config::Settings;
use odooops_agent::workflows::Workflows;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OnceCell;
use uuid::Uuid;

use crate::common::TestDb;

const FAKE_ODOO: &str = include_str!("fake-odoo.sh");
const SERVICES_ADVICE: &str = "start the test services with scripts/services and source \
                               .state/services.env";

/// Commit shas of the test images. Deploys accept only commit shas (7 to 64 hex digits),
/// and every test builds its images in a repository of its own, so tests share these.
pub const V0: &str = "a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0";
pub const V1: &str = "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1";
pub const V2: &str = "a2a2a2a2a2a2a2a2a2a2a2a2a2a2a2a2a2a2a2a2";
/// For images whose health check fails.
pub const BAD: &str = "badbadbadbadbadbadbadbadbadbadbadbadbad0";
/// For images whose server exits soon after it starts.
pub const CRASH: &str = "deaddeaddeaddeaddeaddeaddeaddeaddeaddead";
/// For images whose module update fails.
pub const BROKEN_UPDATE: &str = "b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0";
/// For images whose module update logs an error but exits 0.
pub const NOISY_UPDATE: &str = "e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0";
/// For images whose fake odoo prints its `env` values and fails.
pub const LEAKY: &str = "f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0";
/// A sha no test builds an image for.
pub const NEVER_BUILT: &str = "c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0";

pub fn busybox_path() -> String {
    std::env::var("ODOOOPS_TEST_BUSYBOX")
        .unwrap_or_else(|_| panic!("ODOOOPS_TEST_BUSYBOX is not set: {SERVICES_ADVICE}"))
}

pub async fn docker() -> Docker {
    let docker = Docker::connect_with_unix_defaults().expect("connecting to the Docker engine");
    docker
        .negotiate_version()
        .await
        .expect("the Docker engine answers")
}

fn tar_context(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data, mode) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(*mode);
        header.set_cksum();
        builder.append_data(&mut header, name, *data).unwrap();
    }
    builder.into_inner().unwrap()
}

async fn build(docker: &Docker, tag: &str, context: Vec<u8>) {
    let options = BuildImageOptionsBuilder::default()
        .t(tag)
        .rm(true)
        .forcerm(true)
        .build();
    let mut stream = docker.build_image(options, None, Some(bollard::body_full(context.into())));
    while let Some(item) = stream.next().await {
        let info = item.unwrap_or_else(|err| panic!("building test image {tag} failed: {err}"));
        if let Some(error) = info.error_detail.and_then(|detail| detail.message) {
            panic!("building test image {tag} failed: {error}");
        }
    }
}

static BASE_IMAGE: OnceCell<String> = OnceCell::const_new();

/// Builds, once per test binary, the image every test image starts from: busybox and
/// the fake odoo script. Its tag depends on the script, so an edited script gets a new
/// image.
pub async fn base_image(docker: &Docker) -> String {
    BASE_IMAGE
        .get_or_init(|| async {
            let digest = format!("{:x}", md5_like(FAKE_ODOO.as_bytes()));
            let tag = format!("odooops-deploytest-base:{digest}");
            if docker.inspect_image(&tag).await.is_ok() {
                return tag;
            }
            let busybox = std::fs::read(busybox_path()).expect("reading busybox");
            let dockerfile = "FROM scratch\nCOPY busybox /bin/busybox\n\
                              RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n\
                              COPY odoo /usr/bin/odoo\n\
                              RUN mkdir -p /var/lib/odoo /var/www/web /tmp\n\
                              ENV PATH=/bin:/usr/bin\nEXPOSE 8069\nCMD [\"odoo\"]\n";
            let context = tar_context(&[
                ("Dockerfile", dockerfile.as_bytes(), 0o644),
                ("busybox", &busybox, 0o755),
                ("odoo", FAKE_ODOO.as_bytes(), 0o755),
            ]);
            build(docker, &tag, context).await;
            tag
        })
        .await
        .clone()
}

/// Hashes with 64-bit FNV-1a, which is stable across runs and enough to tell script
/// versions apart.
fn md5_like(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Builds `repo:sha` whose fake odoo behaves as `mode` and reports `sha` as its version.
pub async fn build_image(docker: &Docker, repo: &str, sha: &str, mode: &str) -> String {
    let base = base_image(docker).await;
    let tag = format!("{repo}:{sha}");
    let dockerfile = format!("FROM {base}\nENV FAKE_ODOO_MODE={mode} FAKE_ODOO_VERSION={sha}\n");
    build(
        docker,
        &tag,
        tar_context(&[("Dockerfile", dockerfile.as_bytes(), 0o644)]),
    )
    .await;
    tag
}

/// Returns a port that was free on 127.0.0.1 a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One test's environment: its database, unique names and the containers to remove.
pub struct Site {
    pub db: TestDb,
    pub docker: Docker,
    /// Container name of the environment, unique to the test.
    pub name: String,
    /// Image repository of the test project.
    pub repo: String,
    pub port: u16,
    pub work_dir: tempfile::TempDir,
}

impl Site {
    /// A project 'proj' with its three environments; env-dev deploys to a container
    /// named after the test on a free port, with a quick health gate.
    pub async fn new() -> Site {
        let db = TestDb::new().await;
        db.seed_project().await;
        let id = Uuid::new_v4().simple().to_string();
        let site = Site {
            db,
            docker: docker().await,
            name: format!("odooops-dt-{}", &id[..12]),
            repo: format!("odooops-dt-{}/odoo", &id[..12]),
            port: free_port(),
            work_dir: tempfile::tempdir().unwrap(),
        };
        site.set_image_repository(&site.repo.clone()).await;
        site.configure("env-dev", serde_json::json!({})).await;
        site
    }

    /// Returns the default test config of an environment merged with `extra`.
    pub fn config(&self, extra: Value) -> Value {
        let mut config = serde_json::json!({
            "container_name": self.name,
            "ports": [format!("127.0.0.1:{}:8069", self.port)],
            "stop_timeout_secs": 2,
            "restart_policy": "no",
            "health": {"interval_secs": 0.1, "timeout_secs": 1, "deadline_secs": 4},
        });
        merge(&mut config, extra);
        config
    }

    pub async fn configure(&self, env_id: &str, extra: Value) {
        let config = self.config(extra);
        self.db
            .client()
            .await
            .execute(
                "UPDATE ops.environments SET config = $2 WHERE env_id = $1",
                &[&env_id, &config],
            )
            .await
            .unwrap();
    }

    pub async fn set_image_repository(&self, repo: &str) {
        self.db
            .client()
            .await
            .execute(
                "UPDATE ops.projects SET image = $1 WHERE project_id = 'proj'",
                &[&repo],
            )
            .await
            .unwrap();
    }

    /// Builds agent settings for the test. `extra` comes right after the `[agent]` keys,
    /// so it may add agent keys as well as later sections.
    pub fn settings(&self, extra: &str) -> Arc<Settings> {
        let work_dir = self.work_dir.path().display();
        self.db.settings(&format!(
            "[agent]\nworker_id = \"deploy-test\"\nwork_dir = \"{work_dir}\"\n{extra}\n\
             [storage]\nlocal_dir = \"{work_dir}/artifacts\"\n"
        ))
    }

    pub async fn image(&self, sha: &str, mode: &str) -> String {
        build_image(&self.docker, &self.repo, sha, mode).await
    }

    pub async fn queue(&self, env: &str, sha: &str, metadata: Value) -> Uuid {
        let row = self
            .db
            .client()
            .await
            .query_one(
                "SELECT run_id FROM ops.queue_run('proj', $1, $2, 'main', $3)",
                &[&env, &sha, &metadata],
            )
            .await
            .unwrap();
        row.get(0)
    }

    /// Queues a deploy of `sha` to env-dev and runs the agent until the queue is empty.
    pub async fn deploy(&self, sha: &str) -> Uuid {
        let run = self
            .queue("env-dev", sha, serde_json::json!({"workflow": "deploy"}))
            .await;
        self.run_agent("").await;
        run
    }

    pub async fn run_agent(&self, extra_settings: &str) {
        let settings = self.settings(extra_settings);
        agent::run(
            settings,
            Workflows::standard(),
            Mode::Once,
            Shutdown::default(),
        )
        .await
        .expect("agent run");
    }

    /// Status and metadata of a run.
    pub async fn run(&self, run_id: Uuid) -> (String, Value) {
        let row = self
            .db
            .client()
            .await
            .query_one(
                "SELECT status, metadata FROM ops.runs WHERE run_id = $1",
                &[&run_id],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    }

    /// Level, message and payload of each event of a run, in order.
    pub async fn events(&self, run_id: Uuid) -> Vec<(String, String, Option<Value>)> {
        let rows = self
            .db
            .client()
            .await
            .query(
                "SELECT level, message, payload FROM ops.run_events WHERE run_id = $1 ORDER BY seq",
                &[&run_id],
            )
            .await
            .unwrap();
        rows.iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect()
    }

    pub async fn event_text(&self, run_id: Uuid) -> String {
        let events = self.events(run_id).await;
        events
            .iter()
            .map(|(level, message, _)| format!("{level}: {message}\n"))
            .collect()
    }

    /// Returns the body of GET `path` on the environment's port, or None unless the status
    /// is 200.
    pub async fn get(&self, path: &str) -> Option<String> {
        http_get(self.port, path).await
    }

    pub async fn container_state(
        &self,
        name: &str,
    ) -> Option<(bool, HashMap<String, String>, String)> {
        let inspect = self.docker.inspect_container(name, None).await.ok()?;
        let running = inspect.state.and_then(|s| s.running).unwrap_or(false);
        let labels = inspect.config.and_then(|c| c.labels).unwrap_or_default();
        Some((running, labels, inspect.id.unwrap_or_default()))
    }

    /// Runs a shell command from the base image with the environment's data volume
    /// mounted at /var/lib/odoo and returns its standard output.
    pub async fn in_data_volume(&self, script: &str) -> String {
        let name = format!(
            "{}-probe-{}",
            self.name,
            &Uuid::new_v4().simple().to_string()[..6]
        );
        let body = ContainerCreateBody {
            image: Some(base_image(&self.docker).await),
            cmd: Some(vec!["sh".into(), "-c".into(), script.into()]),
            host_config: Some(HostConfig {
                binds: Some(vec![format!("{}-data:/var/lib/odoo", self.name)]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::default().name(&name).build();
        self.docker
            .create_container(Some(options), body)
            .await
            .unwrap();
        self.docker.start_container(&name, None).await.unwrap();
        let _ = self
            .docker
            .wait_container(
                &name,
                None::<bollard::query_parameters::WaitContainerOptions>,
            )
            .try_collect::<Vec<_>>()
            .await;
        let options = bollard::query_parameters::LogsOptionsBuilder::default()
            .stdout(true)
            .build();
        let output: Vec<_> = self
            .docker
            .logs(&name, Some(options))
            .try_collect()
            .await
            .unwrap();
        remove_container(&self.docker, &name).await;
        output.iter().map(|chunk| chunk.to_string()).collect()
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let name = self.name.clone();
        let repo = self.repo.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(clean_up(name, repo));
        })
        .join();
    }
}

async fn remove_container(docker: &Docker, name: &str) {
    let options = RemoveContainerOptionsBuilder::default()
        .force(true)
        .v(true)
        .build();
    let _ = docker.remove_container(name, Some(options)).await;
}

/// Removes the test's containers, volumes and images.
async fn clean_up(name: String, repo: String) {
    let docker = docker().await;
    let filters = HashMap::from([("name".to_string(), vec![name.clone()])]);
    let options = bollard::query_parameters::ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let containers = docker
        .list_containers(Some(options))
        .await
        .unwrap_or_default();
    for container in containers {
        if let Some(id) = container.id {
            remove_container(&docker, &id).await;
        }
    }
    let filters = HashMap::from([("name".to_string(), vec![name.clone()])]);
    let options = bollard::query_parameters::ListVolumesOptionsBuilder::default()
        .filters(&filters)
        .build();
    let volumes = docker.list_volumes(Some(options)).await.ok();
    let found = volumes.and_then(|list| list.volumes).unwrap_or_default();
    for volume in found
        .into_iter()
        .filter(|volume| volume.name.starts_with(&name))
    {
        let options = RemoveVolumeOptionsBuilder::default().force(true).build();
        let _ = docker.remove_volume(&volume.name, Some(options)).await;
    }
    let images = docker
        .list_images(None::<bollard::query_parameters::ListImagesOptions>)
        .await
        .unwrap_or_default();
    for image in images {
        for tag in image.repo_tags.iter().filter(|tag| tag.contains(&repo)) {
            let _ = docker
                .remove_image(
                    tag,
                    Some(bollard::query_parameters::RemoveImageOptions {
                        // Untagged parents may be another test's build cache.
                        noprune: true,
                        ..Default::default()
                    }),
                    None,
                )
                .await;
        }
    }
}

/// GET http://127.0.0.1:port/path; the body when the status is 200.
pub async fn http_get(port: u16, path: &str) -> Option<String> {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8_lossy(&response).to_string();
        let (head, body) = text.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.0 200")
            .then(|| body.trim().to_string())
            .or_else(|| {
                head.starts_with("HTTP/1.1 200")
                    .then(|| body.trim().to_string())
            })
    };
    tokio::time::timeout(Duration::from_secs(3), attempt)
        .await
        .ok()
        .flatten()
}

fn merge(target: &mut Value, extra: Value) {
    match (target, extra) {
        (Value::Object(target), Value::Object(extra)) => {
            for (key, value) in extra {
                match target.get_mut(&key) {
                    Some(existing) if existing.is_object() && value.is_object() => {
                        merge(existing, value)
                    }
                    _ => {
                        target.insert(key, value);
                    }
                }
            }
        }
        (target, extra) => *target = extra,
    }
}

/// Writes text to a new file, for registry passwords and the like.
pub fn write_file(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    let mut file = std::fs::File::create(&path).unwrap();
    file.write_all(text.as_bytes()).unwrap();
    path
}
