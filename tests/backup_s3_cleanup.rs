//! Cleanup on the S3 test server: a backup attempt aborts the multipart uploads that an
//! earlier, killed attempt of the same backup left in the bucket, and a dropped test
//! fixture removes its bucket.

mod backup_support;
mod common;

use aws_sdk_s3::primitives::ByteStream;
use backup_support::*;
use uuid::Uuid;

/// Starts a multipart upload of `key` with one part, as a killed attempt leaves it.
async fn start_upload(fixture: &Fixture, key: &str) {
    let client = fixture.s3_client();
    let upload = client
        .create_multipart_upload()
        .bucket(&fixture.bucket)
        .key(key)
        .send()
        .await
        .unwrap();
    client
        .upload_part()
        .bucket(&fixture.bucket)
        .key(key)
        .upload_id(upload.upload_id().unwrap())
        .part_number(1)
        .body(ByteStream::from(vec![7u8; 5 * 1024 * 1024]))
        .send()
        .await
        .unwrap();
}

/// Lists the keys of the multipart uploads in progress in the fixture's bucket.
async fn open_upload_keys(fixture: &Fixture) -> Vec<String> {
    let listed = fixture
        .s3_client()
        .list_multipart_uploads()
        .bucket(&fixture.bucket)
        .send()
        .await
        .unwrap();
    listed
        .uploads()
        .iter()
        .filter_map(|upload| upload.key().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn backup_aborts_its_stale_upload() {
    let fixture = Fixture::with_s3().await;
    let backup_id = fixture.queue_backup("env-prod", "manual").await;
    let prefix = format!("proj/env-prod/{}-", fixture.odoo.name);
    let stale = format!("{prefix}20260101T000000Z-{}.zip", backup_id.simple());
    let other = format!("{prefix}20260101T000000Z-{}.zip", Uuid::new_v4().simple());
    start_upload(&fixture, &stale).await;
    start_upload(&fixture, &other).await;

    fixture.run_agent(fixture.settings("s3")).await;

    let row = fixture.backup_row(backup_id).await;
    let status: String = row.get("status");
    assert_eq!(
        status,
        "success",
        "{:?}",
        row.get::<_, Option<String>>("error")
    );
    let open = open_upload_keys(&fixture).await;
    assert!(!open.contains(&stale), "{open:?}");
    assert!(
        open.contains(&other),
        "another backup's upload is kept: {open:?}"
    );
    let run_id = fixture.run_of_backup(backup_id).await;
    let (_, _, events) = fixture.run_outcome(run_id).await;
    let aborted = format!(
        "Aborted 1 multipart uploads left by an earlier attempt: s3://{}/{stale}",
        fixture.bucket
    );
    assert!(events.iter().any(|e| e.contains(&aborted)), "{events:?}");
}

#[tokio::test]
async fn dropped_fixture_removes_its_bucket() {
    let fixture = Fixture::with_s3().await;
    let bucket = fixture.bucket.clone();
    fixture
        .s3_client()
        .put_object()
        .bucket(&bucket)
        .key("proj/object.txt")
        .body(ByteStream::from_static(b"left by a test"))
        .send()
        .await
        .unwrap();
    start_upload(&fixture, "proj/unfinished.zip").await;
    let client = fixture.s3_client();

    drop(fixture);

    let listed = client.list_buckets().send().await.unwrap();
    let names: Vec<&str> = listed.buckets().iter().filter_map(|b| b.name()).collect();
    assert!(!names.contains(&bucket.as_str()), "{bucket} remains");
}
