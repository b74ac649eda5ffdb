//! Backups and restores whose pg_dump and psql run in a database container through the
//! Docker exec API, and a restore that runs `odoo neutralize` in the Odoo container.
//!
//! No PostgreSQL image can be pulled here, so the container's image is made FROM scratch
//! out of the host's own PostgreSQL client programs and the libraries they load. It runs
//! on the host network and reaches the test server on 127.0.0.1.

mod backup_support;
mod common;

use std::path::Path;

use backup_support::*;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    BuildImageOptionsBuilder, CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder,
};
use bollard::Docker;
use futures_util::StreamExt;
use serde_json::{json, Value};
use uuid::Uuid;

/// The host's client programs; Debian's /usr/bin/pg_dump is a Perl wrapper.
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Stands in for Odoo's CLI: `odoo neutralize -d DB` marks DB through psql, so the test
/// can tell that the agent ran it, in this container, on the restored database.
const FAKE_ODOO: &str = r#"#!/bin/sh
if [ "$1" != neutralize ] || [ "$2" != -d ]; then
    echo "Unknown command: $1" >&2
    exit 1
fi
exec psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -U odooops -d "$3" \
    -c "INSERT INTO ir_config_parameter (key, value) VALUES ('test.odoo_neutralize', 'ran')"
"#;

async fn docker() -> Docker {
    Docker::connect_with_unix_defaults()
        .expect("connecting to the Docker engine")
        .negotiate_version()
        .await
        .expect("the Docker engine answers")
}

/// Lists the files a dynamically linked program needs: itself and every library `ldd` names.
fn libraries_of(program: &str) -> Vec<String> {
    let output = std::process::Command::new("ldd")
        .arg(program)
        .output()
        .expect("running ldd");
    assert!(output.status.success(), "ldd {program} failed");
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| line.split_whitespace().find(|word| word.starts_with('/')))
        .map(str::to_string)
        .collect()
}

fn append(builder: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8], mode: u32) {
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(mode);
    header.set_cksum();
    builder.append_data(&mut header, name, data).unwrap();
}

/// Builds the client image: busybox, pg_dump, psql, their libraries and the fake odoo.
async fn build_client_image(docker: &Docker, tag: &str) {
    let mut files: Vec<String> = Vec::new();
    for program in ["pg_dump", "psql"] {
        for file in libraries_of(&format!("{PG_BIN}/{program}")) {
            if !files.contains(&file) {
                files.push(file);
            }
        }
    }
    let mut dockerfile = String::from("FROM scratch\nCOPY rootfs/ /\n");
    dockerfile.push_str("RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n");
    dockerfile.push_str("ENV PATH=/usr/local/bin:/bin\nCMD [\"sleep\", \"3600\"]\n");

    let mut builder = tar::Builder::new(Vec::new());
    append(&mut builder, "Dockerfile", dockerfile.as_bytes(), 0o644);
    let busybox = std::fs::read(std::env::var("ODOOOPS_TEST_BUSYBOX").unwrap()).unwrap();
    append(&mut builder, "rootfs/bin/busybox", &busybox, 0o755);
    append(
        &mut builder,
        "rootfs/usr/local/bin/odoo",
        FAKE_ODOO.as_bytes(),
        0o755,
    );
    for program in ["pg_dump", "psql"] {
        let data = std::fs::read(format!("{PG_BIN}/{program}")).unwrap();
        append(
            &mut builder,
            &format!("rootfs/usr/local/bin/{program}"),
            &data,
            0o755,
        );
    }
    for file in files.iter().filter(|file| !file.starts_with(PG_BIN)) {
        let data = std::fs::read(file).unwrap_or_else(|err| panic!("reading {file}: {err}"));
        append(&mut builder, &format!("rootfs{file}"), &data, 0o755);
    }
    let context = builder.into_inner().unwrap();

    let options = BuildImageOptionsBuilder::default()
        .t(tag)
        .rm(true)
        .forcerm(true)
        .build();
    let mut stream = docker.build_image(options, None, Some(bollard::body_full(context.into())));
    while let Some(item) = stream.next().await {
        let info = item.unwrap_or_else(|err| panic!("building {tag} failed: {err}"));
        if let Some(error) = info.error_detail.and_then(|detail| detail.message) {
            panic!("building {tag} failed: {error}");
        }
    }
}

/// A running container of the client image, removed when dropped.
struct ClientContainer {
    docker: Docker,
    name: String,
    image: String,
}

impl ClientContainer {
    async fn start() -> ClientContainer {
        let docker = docker().await;
        let id = Uuid::new_v4().simple().to_string();
        let image = format!("odooops-pgclient-test:{}", &id[..12]);
        build_client_image(&docker, &image).await;
        let name = format!("odooops-pgclient-{}", &id[..12]);
        let body = ContainerCreateBody {
            image: Some(image.clone()),
            env: Some(vec!["PGPASSWORD=odooops".to_string()]),
            host_config: Some(HostConfig {
                network_mode: Some("host".to_string()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::default().name(&name).build();
        docker
            .create_container(Some(options), body)
            .await
            .expect("creating the client container");
        let container = ClientContainer {
            docker,
            name,
            image,
        };
        container
            .docker
            .start_container(
                &container.name,
                None::<bollard::query_parameters::StartContainerOptions>,
            )
            .await
            .expect("starting the client container");
        container
    }
}

impl Drop for ClientContainer {
    fn drop(&mut self) {
        let (docker, name, image) = (self.docker.clone(), self.name.clone(), self.image.clone());
        // Drop cannot await, and blocking inside the test's runtime panics, so a thread
        // with a runtime of its own removes the container and its image.
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let options = RemoveContainerOptionsBuilder::default().force(true).build();
                let _ = docker.remove_container(&name, Some(options)).await;
                let _ = docker
                    .remove_image(
                        &image,
                        None::<bollard::query_parameters::RemoveImageOptions>,
                        None,
                    )
                    .await;
            });
        })
        .join()
        .unwrap();
    }
}

fn docker_tools(env: &str, container: &str, odoo: bool) -> String {
    let mut section =
        format!("[backup.environments.{env}]\npg_tools = \"docker\"\ncontainer = {container:?}\n");
    if odoo {
        section.push_str(&format!(
            "odoo_container = {container:?}\nodoo_neutralize = true\n"
        ));
    }
    section
}

fn assert_zip_has(path: &Path, name: &str) {
    let listing = python_zip_listing(path);
    assert!(
        listing
            .lines()
            .any(|line| line.starts_with(&format!("{name} "))),
        "{name} missing: {listing}"
    );
}

/// Counts the regular files under `dir` at any depth, 0 when it does not exist.
fn files_in(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .map(|entry| entry.unwrap().path())
        .map(|path| if path.is_dir() { files_in(&path) } else { 1 })
        .sum()
}

#[tokio::test]
async fn pg_tools_run_in_container() {
    let container = ClientContainer::start().await;
    let fixture = Fixture::new().await;
    let extra = format!(
        "{}{}",
        docker_tools("env-prod", &container.name, false),
        docker_tools("env-staging", &container.name, true)
    );
    let settings = fixture.settings_with("local", None, &extra);

    let backup_id = fixture.queue_backup("env-prod", "manual").await;
    fixture.run_agent(settings.clone()).await;
    let row = fixture.backup_row(backup_id).await;
    let error: Option<String> = row.get("error");
    assert_eq!(row.get::<_, String>("status"), "success", "{error:?}");
    let (_, _, events) = fixture
        .run_outcome(fixture.run_of_backup(backup_id).await)
        .await;
    let on_container = format!("on container {}", container.name);
    assert!(
        events.iter().any(|event| event.contains(&on_container)),
        "pg_dump did not run in the container: {events:?}"
    );
    let archive = local_path(&row.get::<_, String>("db_dump_path"));
    assert_zip_has(&archive, "dump.sql");
    let dump = String::from_utf8(python_zip_read(&archive, "dump.sql")).unwrap();
    assert!(
        dump.contains("COPY public.res_partner"),
        "dump.sql lacks data"
    );

    let target = format!("{}_docker", fixture.odoo.name);
    let run_id = fixture
        .queue_run(
            "env-staging",
            json!({ "workflow": "restore", "backup_id": backup_id, "target_db": target }),
        )
        .await;
    fixture.run_agent(settings).await;
    let (status, metadata, events) = fixture.run_outcome(run_id).await;
    assert_eq!(status, "success", "{metadata} {events:?}");
    assert!(
        events.iter().any(|event| event.contains(&on_container)),
        "psql did not run in the container: {events:?}"
    );
    for table in ["res_partner", "ir_attachment", "ir_module_module"] {
        assert_eq!(
            fixture.odoo.count(&target, table).await,
            fixture.odoo.count(&fixture.odoo.name, table).await,
            "{table}"
        );
    }
    let client = fixture.odoo.client_for(&target).await;
    let marker: String = client
        .query_one(
            "SELECT value FROM ir_config_parameter WHERE key = 'test.odoo_neutralize'",
            &[],
        )
        .await
        .expect("odoo neutralize did not run on the restored database")
        .get(0);
    assert_eq!(marker, "ran");
    let active_crons = fixture.odoo.count(&target, "ir_cron WHERE active").await;
    assert_eq!(active_crons, 0);
    let checks: Value = fixture
        .ops
        .client()
        .await
        .query_one(
            "SELECT checks FROM ops.restores WHERE target_db = $1",
            &[&target],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(checks["neutralization"]["odoo_neutralize"], json!("ran"));
}

#[tokio::test]
async fn missing_container_fails_backup() {
    let fixture = Fixture::new().await;
    let name = format!(
        "odooops-absent-{}",
        &Uuid::new_v4().simple().to_string()[..12]
    );
    let settings = fixture.settings_with("local", None, &docker_tools("env-prod", &name, false));
    let backup_id = fixture.queue_backup("env-prod", "manual").await;
    fixture.run_agent(settings).await;

    let row = fixture.backup_row(backup_id).await;
    assert_eq!(row.get::<_, String>("status"), "failed");
    let error: String = row.get("error");
    assert!(error.contains(&name), "{error}");
    assert_eq!(
        files_in(&fixture.backups_dir()),
        0,
        "a failed backup left files"
    );
}
