//! Shared pieces of the build tests: the loopback registry, a git repository holding a
//! tiny image (FROM scratch with a static busybox) and a stand-in `odoo` command, and
//! queries for what a run left behind.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use bollard::query_parameters::ListContainersOptions;
use bollard::Docker;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};

/// How to provide the services when a variable is missing.
const SERVICES_HINT: &str = "start the test services with scripts/services and source \
    .state/services.env, or export ODOOOPS_TEST_REGISTRY=127.0.0.1:PORT, \
    ODOOOPS_TEST_REGISTRY_USER, ODOOOPS_TEST_REGISTRY_PASSWORD (a docker-registry with \
    htpasswd auth) and ODOOOPS_TEST_BUSYBOX=/bin/busybox (busybox-static)";

/// Reads a required variable, failing the test with set-up advice when it is missing.
pub fn required_env(name: &str) -> String {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => value,
        _ => panic!("{name} is not set: {SERVICES_HINT}"),
    }
}

/// The loopback registry the tests push to.
#[derive(Debug, Clone)]
pub struct Registry {
    pub address: String,
    pub user: String,
    pub password: String,
}

impl Registry {
    pub fn from_env() -> Registry {
        Registry {
            address: required_env("ODOOOPS_TEST_REGISTRY"),
            user: required_env("ODOOOPS_TEST_REGISTRY_USER"),
            password: required_env("ODOOOPS_TEST_REGISTRY_PASSWORD"),
        }
    }

    /// Sends an authenticated request to the registry's HTTP API; returns the status,
    /// headers and body.
    async fn request(&self, method: &str, path: &str) -> (u16, HashMap<String, String>, String) {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Empty<Bytes>>();
        let credentials = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", self.user, self.password));
        let request = hyper::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.address))
            .header("Authorization", format!("Basic {credentials}"))
            .header(
                "Accept",
                "application/vnd.docker.distribution.manifest.v2+json",
            )
            .body(Empty::new())
            .unwrap();
        let response = client
            .request(request)
            .await
            .unwrap_or_else(|err| panic!("registry {} unreachable: {err}", self.address));
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_lowercase(),
                    v.to_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }

    /// Tags of `repository` (the path after the registry address), as the registry lists
    /// them.
    pub async fn tags(&self, repository: &str) -> Vec<String> {
        let (status, _, body) = self
            .request("GET", &format!("/v2/{repository}/tags/list"))
            .await;
        if status == 404 {
            return Vec::new();
        }
        assert_eq!(status, 200, "listing tags of {repository}: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        json["tags"]
            .as_array()
            .map(|tags| {
                tags.iter()
                    .map(|t| t.as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Returns the manifest digest the registry serves for `repository:tag`.
    pub async fn manifest_digest(&self, repository: &str, tag: &str) -> Option<String> {
        let path = format!("/v2/{repository}/manifests/{tag}");
        let (status, headers, _) = self.request("HEAD", &path).await;
        (status == 200).then(|| headers["docker-content-digest"].clone())
    }
}

pub fn busybox() -> PathBuf {
    PathBuf::from(required_env("ODOOOPS_TEST_BUSYBOX"))
}

/// Dockerfile of the test image: busybox as /bin/sh, the stand-in odoo, and the whole
/// context under /ctx so a test can see what was sent. No RUN step, so the build needs
/// no container.
pub const DOCKERFILE: &str = "FROM scratch
ENV PATH=/usr/bin:/bin
COPY bin /bin
COPY odoo /usr/bin/odoo
COPY . /ctx
";

/// Stand-in for Odoo's test run. It logs in Odoo's format and checks that the database
/// server in its arguments accepts connections. Then it acts on TEST_MODE: pass,
/// error_line (an ERROR record and exit 0), exit_code (exit 4), sleep, or check_context
/// (fail unless .dockerignore was honoured). TEST_LINES sets how many lines pass prints.
pub const ODOO_SCRIPT: &str = r#"#!/bin/sh
all_args="$*"
db=""; host=""; port=""
while [ $# -gt 0 ]; do
    case "$1" in
        --database) db=$2; shift ;;
        --db_host) host=$2; shift ;;
        --db_port) port=$2; shift ;;
    esac
    shift
done
log() { echo "2024-05-01 10:00:00,000 1 $1 ${db:-?} odoo.tests: $2"; }
echo "invoked as: odoo $all_args"
if [ -n "$db" ]; then
    # busybox nc has no -z: send a newline, which PostgreSQL answers by closing.
    echo | busybox nc -w 5 "$host" "$port" >/dev/null ||
        { log CRITICAL "cannot reach $host:$port"; exit 3; }
    log INFO "database $db reachable on $host:$port"
fi
case "${TEST_MODE:-pass}" in
    pass)
        busybox awk -v n="${TEST_LINES:-3}" 'BEGIN { for (i = 1; i <= n; i++)
            printf "2024-05-01 10:00:00,000 1 INFO db odoo.tests: Starting test_%06d\n", i }'
        log INFO "0 failed, 0 error(s)" ;;
    error_line)
        log ERROR "FAIL: TestSample.test_marker"
        log INFO "done" ;;
    exit_code) log INFO "exiting with 4"; exit 4 ;;
    sleep) log INFO "sleeping"; busybox sleep 600 ;;
    check_context)
        for kept in /ctx/Dockerfile /ctx/notes/keep.txt /ctx/sub/secret.txt; do
            [ -e "$kept" ] || { log ERROR "$kept is missing"; }
        done
        for dropped in /ctx/secret.txt /ctx/notes/drop.txt /ctx/build.log; do
            [ -e "$dropped" ] && log ERROR "$dropped was sent"
        done
        log INFO "context checked" ;;
esac
exit 0
"#;

/// A git repository with one commit, in a temporary directory.
pub struct Repo {
    pub dir: tempfile::TempDir,
    pub sha: String,
}

impl Repo {
    /// Creates the test project, plus `extra` files, and commits it.
    pub fn create(extra: &[(&str, &str)]) -> Repo {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();

        write(root, "Dockerfile", DOCKERFILE);
        write(root, "odoo", ODOO_SCRIPT);
        make_executable(&root.join("odoo"));
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::copy(busybox(), root.join("bin/busybox")).unwrap();
        std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
        for (path, contents) in extra {
            write(root, path, contents);
        }

        git(root, &["init", "--quiet", "--initial-branch=main"]);
        git(root, &["add", "--all"]);
        git(
            root,
            &[
                "-c",
                "user.name=odooops test",
                "-c",
                "user.email=test@odooops.invalid",
                "-c",
                "commit.gpgsign=false",
                "commit",
                "--quiet",
                "--message",
                "test project",
            ],
        );
        let sha = git(root, &["rev-parse", "HEAD"]).trim().to_string();
        Repo { dir, sha }
    }

    pub fn url(&self) -> String {
        self.dir.path().to_string_lossy().into_owned()
    }
}

fn write(root: &Path, path: &str, contents: &str) {
    let full = root.join(path);
    std::fs::create_dir_all(full.parent().unwrap()).unwrap();
    std::fs::write(full, contents).unwrap();
}

fn make_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

pub fn git(dir: &Path, args: &[&str]) -> String {
    let output = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running git");
    assert!(
        output.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub async fn docker() -> Docker {
    Docker::connect_with_local_defaults()
        .expect("Docker client")
        .negotiate_version()
        .await
        .expect("the Docker engine is unreachable: start dockerd (scripts/services)")
}

/// Containers, running or not, that carry the label `key=value`.
pub async fn containers_labelled(docker: &Docker, key: &str, value: &str) -> Vec<String> {
    let filters = HashMap::from([("label".to_string(), vec![format!("{key}={value}")])]);
    let options = ListContainersOptions {
        all: true,
        filters: Some(filters),
        ..Default::default()
    };
    docker
        .list_containers(Some(options))
        .await
        .unwrap()
        .into_iter()
        .filter_map(|c| c.id)
        .collect()
}

/// Checks whether the engine has an image with this id or reference.
pub async fn image_exists(docker: &Docker, reference: &str) -> bool {
    docker.inspect_image(reference).await.is_ok()
}

/// Removes local image references a test created; missing ones are fine.
pub async fn remove_images(docker: &Docker, references: &[String]) {
    for reference in references {
        let _ = docker
            .remove_image(
                reference,
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

/// Returns a lowercase name unique to this test run, for image repositories.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}
