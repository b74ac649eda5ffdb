//! The sample project of examples/sample-odoo deploys, updates its modules and rolls back
//! with the deploy workflow.

mod common;
mod deploy_support;

use bollard::query_parameters::BuildImageOptionsBuilder;
use deploy_support::{Site, BAD, V1};
use futures_util::StreamExt;
use serde_json::json;

/// Builds the sample project as `<site repo>:<tag>`, with a marker file such as
/// `unhealthy` added to its build context when one is given.
async fn build_sample(site: &Site, tag: &str, marker: Option<&str>) {
    let root = common::repo_root().join("examples/sample-odoo");
    let busybox = std::fs::read(deploy_support::busybox_path()).expect("reading busybox");
    let mut context = tar::Builder::new(Vec::new());
    context
        .append_dir_all(".", &root)
        .expect("adding the sample project");
    let mut extra = vec![("busybox", busybox)];
    if let Some(marker) = marker {
        extra.push((marker, b"made by the deploy sample test\n".to_vec()));
    }
    for (name, data) in extra {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o755);
        header.set_cksum();
        context
            .append_data(&mut header, name, data.as_slice())
            .unwrap();
    }
    let context = context.into_inner().unwrap();

    let image = format!("{}:{tag}", site.repo);
    let options = BuildImageOptionsBuilder::default()
        .t(&image)
        .rm(true)
        .forcerm(true)
        .build();
    let mut stream =
        site.docker
            .build_image(options, None, Some(bollard::body_full(context.into())));
    while let Some(item) = stream.next().await {
        let info = item.unwrap_or_else(|err| panic!("building {image} failed: {err}"));
        if let Some(error) = info.error_detail.and_then(|detail| detail.message) {
            panic!("building {image} failed: {error}");
        }
    }
}

#[tokio::test]
async fn sample_project_deploys_updates_and_rolls_back() {
    let site = Site::new().await;
    site.configure("env-dev", json!({"update": "all"})).await;
    build_sample(&site, V1, None).await;
    build_sample(&site, BAD, Some("unhealthy")).await;

    let first = site.deploy(V1).await;
    let second = site.deploy(BAD).await;

    assert_eq!(
        site.run(first).await.0,
        "success",
        "{}",
        site.event_text(first).await
    );
    let (status, metadata) = site.run(second).await;
    assert_eq!(status, "failed");
    assert_eq!(metadata["rolled_back_to"], V1);
    assert_eq!(metadata["rollback_healthy"], true);
    assert!(site.get("/web/health").await.unwrap().contains("pass"));
    let first_text = site.event_text(first).await;
    assert!(
        first_text.contains("Module update finished"),
        "{first_text}"
    );
    // The sample writes a file into the filestore at every server start: the first
    // deploy, the broken one and the rollback.
    let starts = site
        .in_data_volume("ls /var/lib/odoo/filestore | grep -c '^start-'")
        .await;
    assert_eq!(starts.trim(), "3");
}
