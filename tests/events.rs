//! Run events: stored in batches, in order, each exactly once, even when the writer's
//! connection dies mid-stream.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::agents;
use common::runs;
use common::workflows::Chatty;
use common::TestDb;
use odooops_agent::agent::{self, Mode, Shutdown};
use odooops_agent::events::{EventSink, FlushOutcome};
use odooops_agent::queue::{ClaimFilter, Queue};
use tokio_postgres::Client;
use uuid::Uuid;

const MANY_LINES: usize = 200_000;

/// Checks that the run's events "line 0".."line {count - 1}" are stored once each, in
/// order, and that the run's seq numbers have no gap.
async fn assert_lines_in_order(client: &Client, run_id: Uuid, count: usize) {
    let row = client
        .query_one(
            "SELECT count(*), min(seq), max(seq),
                    count(*) FILTER (WHERE message LIKE 'line %'),
                    (SELECT event_seq FROM ops.runs WHERE run_id = $1)
               FROM ops.run_events WHERE run_id = $1",
            &[&run_id],
        )
        .await
        .unwrap();
    let (total, min, max): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    let lines: i64 = row.get(3);
    let event_seq: i64 = row.get(4);
    assert_eq!(lines, count as i64, "lines lost or duplicated");
    assert_eq!(min, 1);
    assert_eq!(max, total, "seq has gaps");
    assert_eq!(event_seq, max, "ops.runs.event_seq is behind the events");
    let out_of_order: i64 = client
        .query_one(
            "SELECT count(*) FROM (
                 SELECT message, row_number() OVER (ORDER BY seq) - 1 AS position
                   FROM ops.run_events WHERE run_id = $1 AND message LIKE 'line %') lines
              WHERE message <> 'line ' || position",
            &[&run_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        out_of_order, 0,
        "lines are not stored in the order they were sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_thousand_lines_are_stored_in_order() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    let run_id = runs::queue(&client, "env-dev", "build").await;

    let summary = agent::run(
        agents::settings(&db.url, &agents::config("agent-a", "")),
        agents::only("build", Chatty { lines: MANY_LINES }),
        Mode::Once,
        Shutdown::default(),
    )
    .await
    .expect("agent");

    assert_eq!(summary.claimed, 1);
    let run = runs::run(&client, run_id).await;
    assert_eq!(run.status, "success");
    assert_lines_in_order(&client, run_id, MANY_LINES).await;
    let events = runs::events(&client, run_id).await;
    assert!(events[0].message.starts_with("Run claimed by agent-a"));
    assert!(events.last().unwrap().message.starts_with("Run succeeded"));
}

/// application_name of the event writer's connections in the writer-killing test.
const WRITER_APP: &str = "odooops-test-event-writer";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_writer_connection_loses_and_duplicates_nothing() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    let run_id = runs::queue(&client, "env-dev", "build").await;
    let settings = agents::settings(&db.url, "[database]\npool_size = 2\n");
    let queue = Queue::new(
        odooops_agent::db::pool(&settings.database).unwrap(),
        ClaimFilter {
            worker_id: "agent-a".into(),
            env_ids: None,
            workflows: None,
            lease: Duration::from_secs(60),
        },
    );
    let run = queue.claim().await.unwrap().expect("claimed");
    let writer_url = format!("{}&application_name={WRITER_APP}", db.url);
    let writer_settings = agents::settings(&writer_url, "[database]\npool_size = 2\n");
    let writer_pool = odooops_agent::db::pool(&writer_settings.database).unwrap();
    let events = EventSink::start(writer_pool, run.lease);
    let killed = Arc::new(AtomicU64::new(0));
    let killer = tokio::spawn(kill_writer_connections(db.url.clone(), killed.clone()));

    for line in 0..MANY_LINES {
        events.info(format!("line {line}")).await;
    }
    let outcome = events.flush().await;
    killer.abort();

    assert!(
        killed.load(Ordering::Relaxed) > 0,
        "no writer connection was killed"
    );
    assert_eq!(
        outcome,
        FlushOutcome::Flushed {
            written: MANY_LINES as u64
        }
    );
    assert_lines_in_order(&client, run_id, MANY_LINES).await;
}

/// Terminates the event writer's backend every 150 ms until aborted, at most six times,
/// so that the writer reconnects and retries but still makes progress.
async fn kill_writer_connections(url: String, killed: Arc<AtomicU64>) {
    let client = common::connect(&url).await;
    while killed.load(Ordering::Relaxed) < 6 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))
                   FROM pg_stat_activity
                  WHERE application_name = $1 AND datname = current_database()",
                &[&WRITER_APP],
            )
            .await
            .expect("terminating the writer's connections");
        killed.fetch_add(row.get::<_, i64>(0) as u64, Ordering::Relaxed);
    }
}

#[tokio::test]
async fn retried_batch_is_stored_once() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    runs::queue(&client, "env-dev", "build").await;
    let claimed = client
        .query_one(
            "SELECT run_id, lease_token FROM ops.claim_next_run('agent-a')",
            &[],
        )
        .await
        .unwrap();
    let (run_id, token): (Uuid, Uuid) = (claimed.get(0), claimed.get(1));
    let batch_id = Uuid::new_v4();
    let append = "SELECT ops.append_events($1, $2, $3, ARRAY['info', 'warn'],
                                         ARRAY['line 0', 'line 1'],
                                         ARRAY[NULL, '{\"k\": 1}']::jsonb[],
                                         ARRAY[now(), now()])";

    let first: i32 = client
        .query_one(append, &[&run_id, &token, &batch_id])
        .await
        .expect("first attempt")
        .get(0);
    // The agent retries with the same batch id when it never received the first reply.
    let retry: i32 = client
        .query_one(append, &[&run_id, &token, &batch_id])
        .await
        .expect("retry")
        .get(0);
    let next: i32 = client
        .query_one(append, &[&run_id, &token, &Uuid::new_v4()])
        .await
        .expect("next batch")
        .get(0);

    assert_eq!(first, 2);
    assert_eq!(retry, 0, "a retried batch is not stored again");
    assert_eq!(next, 2);
    let events = runs::events(&client, run_id).await;
    let seqs: Vec<i64> = events.iter().map(|event| event.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
    assert_eq!(events[1].level, "warn");
    assert_eq!(events[1].payload, Some(serde_json::json!({ "k": 1 })));
}

#[tokio::test]
async fn nul_characters_in_events_are_stored_escaped() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    let run_id = runs::queue(&client, "env-dev", "build").await;
    let settings = agents::settings(&db.url, "[database]\npool_size = 2\n");
    let pool = odooops_agent::db::pool(&settings.database).unwrap();
    let queue = Queue::new(
        pool.clone(),
        ClaimFilter {
            worker_id: "agent-a".into(),
            env_ids: None,
            workflows: None,
            lease: Duration::from_secs(60),
        },
    );
    let run = queue.claim().await.unwrap().expect("claimed");
    let events = EventSink::start(pool, run.lease);

    events.info("before").await;
    let payload = serde_json::json!({ "output": "a\u{0}b" });
    events
        .send(odooops_agent::events::Level::Info, "c\u{0}d", Some(payload))
        .await;
    events.info("after").await;
    let outcome = events.flush().await;

    assert_eq!(outcome, FlushOutcome::Flushed { written: 3 });
    let stored = runs::events(&client, run_id).await;
    assert_eq!(runs::messages(&stored), ["before", "c\\0d", "after"]);
    assert_eq!(
        stored[1].payload,
        Some(serde_json::json!({ "output": "a\\0b" }))
    );
}
