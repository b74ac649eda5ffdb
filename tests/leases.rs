//! Leases: a run whose agent dies is taken back when its lease expires, and an agent that
//! lost its lease can write nothing more for the run.

mod common;

use std::time::Duration;

use common::agents::{self, RunningAgent};
use common::child::{self, ChildAgent};
use common::runs::{self, sqlstate};
use common::workflows::{Block, Release, Succeed};
use common::{wait, TestDb};
use odooops_agent::events::{EventSink, FlushOutcome, Level};
use odooops_agent::queue::{Artifact, ClaimFilter, FinalStatus, Queue, QueueError};
use serde_json::json;
use uuid::Uuid;

const LONG: Duration = Duration::from_secs(30);

/// Starts a child agent "agent-a" that blocks in `build` and `restore` runs, and returns
/// once it works on `run_id`.
async fn child_working_on(db: &TestDb, test_name: &str, run_id: Uuid) -> ChildAgent {
    let config = agents::config("agent-a", "");
    let child = ChildAgent::spawn(test_name, &db.url, &config, None);
    let client = db.client().await;
    let started = tokio::time::timeout(LONG, async {
        while !runs::has_event(&client, run_id, "working").await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        started.is_ok(),
        "child never started the run; log:\n{}",
        child.log()
    );
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agents_run_is_retried_elsewhere() {
    if child::act_as_agent().await {
        return;
    }
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    runs::no_retry_delay(&client).await;
    let run_id = runs::queue(&client, "env-dev", "build").await;
    let mut victim = child_working_on(&db, "killed_agents_run_is_retried_elsewhere", run_id).await;

    victim.kill();
    let rescuer = RunningAgent::start(
        agents::settings(&db.url, &agents::config("agent-b", "")),
        agents::only("build", Succeed),
    );
    let finished = wait::until("another agent to finish the run", LONG, || {
        let client = &client;
        async move { runs::run_in(client, run_id, "success").await }
    })
    .await;
    rescuer.stop().await;

    assert_eq!(finished.worker_id.as_deref(), Some("agent-b"));
    assert_eq!(finished.attempt, 2);
    let events = runs::events(&client, run_id).await;
    let expiry = events
        .iter()
        .find(|event| event.message.starts_with("Lease of worker agent-a expired"))
        .unwrap_or_else(|| panic!("no lease expiry event: {:?}", runs::messages(&events)));
    assert_eq!(expiry.level, "warn");
    assert!(
        expiry.message.contains("requeued for attempt 2 of 3"),
        "{}",
        expiry.message
    );
    let payload = expiry.payload.clone().expect("payload");
    assert_eq!(payload["worker_id"], "agent-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agents_last_attempt_fails_the_run() {
    if child::act_as_agent().await {
        return;
    }
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    // A restore has a single attempt: a second one would find the database half made.
    let run_id = runs::queue(&client, "env-dev", "restore").await;
    let mut victim =
        child_working_on(&db, "killed_agents_last_attempt_fails_the_run", run_id).await;

    victim.kill();
    let reaper = RunningAgent::start(
        agents::settings(&db.url, &agents::config("agent-b", "")),
        agents::only("restore", Succeed),
    );
    let failed = wait::until("the run to fail", LONG, || {
        let client = &client;
        async move { runs::run_in(client, run_id, "failed").await }
    })
    .await;
    reaper.stop().await;

    assert_eq!(failed.attempt, 1);
    let error = failed.metadata["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(error.contains("agent-a"), "{error}");
    let events = runs::events(&client, run_id).await;
    let last = events.last().expect("events");
    assert_eq!(last.level, "error");
    assert!(
        last.message.starts_with("Lease of worker agent-a expired"),
        "{}",
        last.message
    );
    assert!(
        last.message.contains("on attempt 1 of 1; run failed"),
        "{}",
        last.message
    );
}

fn queue_for(db: &TestDb, worker_id: &str, lease: Duration) -> Queue {
    let settings = agents::settings(&db.url, "[database]\npool_size = 2\n");
    let pool = odooops_agent::db::pool(&settings.database).expect("pool");
    Queue::new(
        pool,
        ClaimFilter {
            worker_id: worker_id.to_string(),
            env_ids: None,
            workflows: None,
            lease,
        },
    )
}

#[tokio::test]
async fn stale_agents_writes_are_rejected_after_reclaim() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    runs::no_retry_delay(&client).await;
    let run_id = runs::queue(&client, "env-dev", "build").await;
    let stale = queue_for(&db, "agent-a", Duration::from_secs(1));
    let fresh = queue_for(&db, "agent-b", Duration::from_secs(60));
    let old = stale.claim().await.expect("claim").expect("a run");
    let old_events = EventSink::start(stale.pool().clone(), old.lease);
    old_events.info("written while the lease is held").await;
    assert!(matches!(
        old_events.flush().await,
        FlushOutcome::Flushed { written: 1 }
    ));

    wait::until("the short lease to expire", LONG, || {
        let client = &client;
        async move {
            let sql = "SELECT lease_expires_at < now() FROM ops.runs WHERE run_id = $1";
            let expired: bool = client.query_one(sql, &[&run_id]).await.unwrap().get(0);
            expired.then_some(())
        }
    })
    .await;
    let reaped = fresh.reap_expired().await.expect("reap");
    let new = fresh.claim().await.expect("claim").expect("the run again");

    assert_eq!(reaped.len(), 1);
    assert_eq!(reaped[0].worker_id.as_deref(), Some("agent-a"));
    assert_eq!(reaped[0].action, "requeued");
    assert_eq!(new.run_id, run_id);
    assert_eq!(new.attempt, 2);
    let artifact = Artifact {
        artifact_type: "logs".into(),
        storage_path: "s3://bucket/stale.log".into(),
        digest: None,
        size_bytes: None,
        metadata: json!({}),
    };
    let lost = |result: Result<_, QueueError>| matches!(result, Err(QueueError::LeaseLost { .. }));
    assert!(
        lost(stale.heartbeat(old.lease).await.map(|_| ())),
        "heartbeat"
    );
    assert!(
        lost(stale.add_artifact(old.lease, &artifact).await),
        "add_artifact"
    );
    assert!(lost(stale.release(old.lease, "stale").await), "release");
    let stale_metadata = json!({ "stale": true });
    let finish = stale
        .finish(old.lease, FinalStatus::Failed, &stale_metadata)
        .await;
    assert!(lost(finish), "finish");
    old_events
        .send(Level::Error, "written after the lease was lost", None)
        .await;
    assert!(matches!(
        old_events.flush().await,
        FlushOutcome::LeaseLost { written: 1 }
    ));
    let direct = client
        .query_one(
            "SELECT ops.append_events($1, $2, $3, ARRAY['info'], ARRAY['direct stale write'],
                                      ARRAY[NULL::jsonb], ARRAY[now()])",
            &[&run_id, &old.lease.token, &Uuid::new_v4()],
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&direct), "OPL01");
    let fenced = [
        "SELECT ops.heartbeat_run($1, $2)",
        "SELECT * FROM ops.finish_run(p_run_id => $1, p_status => 'failed',
                                      p_lease_token => $2)",
        "SELECT * FROM ops.add_artifact(p_run_id => $1, p_artifact_type => 'logs',
                                        p_storage_path => 's3://b/x', p_lease_token => $2)",
        "SELECT ops.release_run($1, $2, 'stale')",
    ];
    for sql in fenced {
        let err = client
            .query(sql, &[&run_id, &old.lease.token])
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&err), "OPL01", "{sql}");
    }

    let events = runs::events(&client, run_id).await;
    let messages = runs::messages(&events);
    assert!(
        messages.contains(&"written while the lease is held"),
        "{messages:?}"
    );
    assert!(
        !messages.iter().any(|m| m.contains("after the lease")),
        "{messages:?}"
    );
    assert!(
        !messages.iter().any(|m| m.contains("direct stale")),
        "{messages:?}"
    );
    let artifacts: i64 = client
        .query_one("SELECT count(*) FROM ops.artifacts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(artifacts, 0);
    let run = runs::run(&client, run_id).await;
    assert_eq!(run.status, "running");
    assert_eq!(run.worker_id.as_deref(), Some("agent-b"));
    assert_eq!(run.metadata.get("stale"), None);
    fresh
        .finish(new.lease, FinalStatus::Success, &json!({}))
        .await
        .expect("the new holder finishes the run");
}

#[tokio::test]
async fn taken_back_run_is_stopped() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    let run_id = runs::queue(&client, "env-dev", "build").await;
    let blocked = Block::new(Release::Never);
    let cancelled = blocked.cancelled.clone();
    let agent = RunningAgent::start(
        agents::settings(
            &db.url,
            &agents::config("agent-a", "reap_interval_secs = 3600"),
        ),
        agents::only("build", blocked),
    );
    wait::until("the run to start", LONG, || {
        let client = &client;
        async move {
            runs::has_event(client, run_id, "working")
                .await
                .then_some(())
        }
    })
    .await;

    // Another agent takes the run over as if agent-a's lease had expired.
    client
        .batch_execute(
            "UPDATE ops.runs SET lease_expires_at = now() - interval '1 second';
             SELECT ops.reap_expired_runs();
             UPDATE ops.runs SET run_after = now();",
        )
        .await
        .unwrap();
    let claimed_by_b: Uuid = client
        .query_one("SELECT run_id FROM ops.claim_next_run('agent-b')", &[])
        .await
        .expect("agent-b claims the run")
        .get(0);
    assert_eq!(claimed_by_b, run_id);
    let noticed = tokio::time::timeout(LONG, cancelled.notified()).await;
    let summary = agent.stop().await;

    assert!(noticed.is_ok(), "agent-a's workflow was never cancelled");
    assert_eq!(summary.claimed, 1);
    let run = runs::run(&client, run_id).await;
    assert_eq!(
        run.status, "running",
        "agent-a must not finish agent-b's run"
    );
    assert_eq!(run.worker_id.as_deref(), Some("agent-b"));
    assert!(!runs::has_event(&client, run_id, "stopped by cancellation").await);
    assert!(!runs::has_event(&client, run_id, "handed back").await);
}

#[tokio::test]
async fn expired_run_with_cancel_request_is_cancelled() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    let run_id = runs::queue(&client, "env-dev", "build").await;
    client
        .execute("SELECT * FROM ops.claim_next_run('agent-a')", &[])
        .await
        .unwrap();
    client
        .execute("SELECT * FROM ops.cancel_run(p_run_id => $1)", &[&run_id])
        .await
        .unwrap();
    client
        .execute(
            "UPDATE ops.runs SET lease_expires_at = now() - interval '1 second'",
            &[],
        )
        .await
        .unwrap();

    let reaped = client
        .query(
            "SELECT run_id, worker_id, action FROM ops.reap_expired_runs()",
            &[],
        )
        .await
        .expect("reap");

    assert_eq!(reaped.len(), 1);
    assert_eq!(reaped[0].get::<_, String>("action"), "cancelled");
    assert_eq!(
        reaped[0].get::<_, Option<String>>("worker_id").as_deref(),
        Some("agent-a")
    );
    let run = runs::run(&client, run_id).await;
    assert_eq!(run.status, "cancelled");
    let error = run.metadata["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(error.contains("cancellation was requested"), "{error}");
    let events = runs::events(&client, run_id).await;
    let last = events.last().expect("events");
    assert!(
        last.message.starts_with("Lease of worker agent-a expired"),
        "{}",
        last.message
    );
    assert!(last.message.ends_with("run cancelled"), "{}", last.message);
}

#[tokio::test]
async fn run_once_takes_back_expired_leases_first() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    runs::no_retry_delay(&client).await;
    let run_id = runs::queue(&client, "env-dev", "build").await;
    client
        .execute("SELECT * FROM ops.claim_next_run('dead-agent')", &[])
        .await
        .unwrap();
    client
        .execute(
            "UPDATE ops.runs SET lease_expires_at = now() - interval '1 second'",
            &[],
        )
        .await
        .unwrap();

    // A reap interval far longer than the test: only the reap at start can take it back.
    let config = agents::config("agent-once", "reap_interval_secs = 3600");
    let settings = db.settings(&config);
    let summary = odooops_agent::agent::run(
        settings,
        agents::only("build", Succeed),
        odooops_agent::agent::Mode::Once,
        odooops_agent::agent::Shutdown::default(),
    )
    .await
    .unwrap();

    assert_eq!(summary.claimed, 1);
    let run = runs::run(&client, run_id).await;
    assert_eq!(run.status, "success");
    assert_eq!(run.attempt, 2);
    assert_eq!(run.worker_id.as_deref(), Some("agent-once"));
}
