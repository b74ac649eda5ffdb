//! Losing the database: the agent reaches PostgreSQL through a proxy that the tests cut,
//! stall and restore, while the tests themselves talk to the server directly.

mod common;

use std::time::Duration;

use common::agents::{self, RunningAgent};
use common::proxy::{self, Link, Proxy};
use common::runs;
use common::workflows::{Block, Release, Succeed};
use common::{wait, TestDb};
use futures_util::future::BoxFuture;
use odooops_agent::workflows::{RunContext, RunResult, Workflow};
use serde_json::json;
use tokio::sync::{mpsc, Mutex};
use tokio_postgres::Client;
use uuid::Uuid;

const LONG: Duration = Duration::from_secs(40);
/// How long each test keeps the database away: a few failed attempts, well inside the
/// lease.
const OUTAGE: Duration = Duration::from_secs(2);

async fn proxy_for(db: &TestDb) -> (Proxy, String) {
    let proxy = Proxy::start(proxy::server_addr(&db.url)).await;
    let url = proxy::url_through(&db.url, proxy.addr);
    (proxy, url)
}

async fn wait_for_status(client: &Client, run_id: Uuid, status: &str) -> runs::RunRow {
    wait::until(
        &format!("run {run_id} to be {status}"),
        LONG,
        || async move { runs::run_in(client, run_id, status).await },
    )
    .await
}

/// Sends "line 0".."line {PHASE - 1}", reports it, waits for the test's go-ahead, then
/// sends "line {PHASE}".."line {2 * PHASE - 1}" and succeeds.
struct TwoPhases {
    sent_first: mpsc::UnboundedSender<()>,
    go_on: Mutex<mpsc::UnboundedReceiver<()>>,
}

const PHASE: usize = 1_000;

impl Workflow for TwoPhases {
    fn execute<'a>(&'a self, ctx: &'a RunContext) -> BoxFuture<'a, RunResult> {
        Box::pin(async move {
            for line in 0..PHASE {
                ctx.events.info(format!("line {line}")).await;
            }
            ctx.events.flush().await;
            let _ = self.sent_first.send(());
            self.go_on.lock().await.recv().await;
            for line in PHASE..2 * PHASE {
                ctx.events.info(format!("line {line}")).await;
            }
            Ok(json!({}))
        })
    }
}

async fn line_count(client: &Client, run_id: Uuid) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM ops.run_events WHERE run_id = $1 AND message LIKE 'line %'",
            &[&run_id],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_wait_out_a_database_outage() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    let (proxy, url) = proxy_for(&db).await;
    let (sent_first, mut first_sent) = mpsc::unbounded_channel();
    let (go_on, go_on_rx) = mpsc::unbounded_channel();
    let workflow = TwoPhases {
        sent_first,
        go_on: Mutex::new(go_on_rx),
    };
    let config = agents::config("agent-a", "lease_secs = 20\nheartbeat_interval_secs = 2");
    let agent = RunningAgent::start(
        agents::settings(&url, &config),
        agents::only("build", workflow),
    );
    let run_id = runs::queue(&client, "env-dev", "build").await;
    tokio::time::timeout(LONG, first_sent.recv())
        .await
        .expect("the first lines are stored");

    proxy.set(Link::Cut);
    go_on.send(()).unwrap();
    tokio::time::sleep(OUTAGE).await;
    let stored_during_outage = line_count(&client, run_id).await;
    proxy.set(Link::Up);
    let finished = wait_for_status(&client, run_id, "success").await;
    let summary = agent.stop().await;

    assert_eq!(
        stored_during_outage, PHASE as i64,
        "lines were stored with the link cut"
    );
    assert_eq!(finished.attempt, 1);
    assert_eq!(summary.claimed, 1);
    let events = runs::events(&client, run_id).await;
    let lines: Vec<&str> = events
        .iter()
        .map(|event| event.message.as_str())
        .filter(|message| message.starts_with("line "))
        .collect();
    let expected: Vec<String> = (0..2 * PHASE).map(|line| format!("line {line}")).collect();
    assert_eq!(lines, expected, "lines lost, duplicated or out of order");
    let seqs: Vec<i64> = events.iter().map(|event| event.seq).collect();
    let gapless: Vec<i64> = (1..=events.len() as i64).collect();
    assert_eq!(seqs, gapless);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_survives_losing_the_database_and_claims_again() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    let (proxy, url) = proxy_for(&db).await;
    let agent = RunningAgent::start(
        agents::settings(&url, &agents::config("agent-a", "")),
        agents::only("build", Succeed),
    );
    let before = runs::queue(&client, "env-dev", "build").await;
    wait_for_status(&client, before, "success").await;

    proxy.set(Link::Cut);
    let during = runs::queue(&client, "env-dev", "build").await;
    tokio::time::sleep(OUTAGE).await;
    let still_queued = runs::run(&client, during).await;
    proxy.set(Link::Up);
    wait_for_status(&client, during, "success").await;

    assert_eq!(still_queued.status, "queued", "claimed with the link cut");
    assert!(
        agent.is_running(),
        "the agent stopped when it lost the database"
    );
    let summary = agent.stop().await;
    assert_eq!(summary.claimed, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_stops_when_its_lease_cannot_be_renewed() {
    let db = TestDb::new().await;
    db.seed_project().await;
    let client = db.client().await;
    runs::no_retry_delay(&client).await;
    let (proxy, url) = proxy_for(&db).await;
    let blocked = Block::new(Release::Never);
    let cancelled = blocked.cancelled.clone();
    let agent = RunningAgent::start(
        agents::settings(&url, &agents::config("agent-a", "")),
        agents::only("build", blocked),
    );
    let run_id = runs::queue(&client, "env-dev", "build").await;
    wait::until("the run to start", LONG, || {
        let client = &client;
        async move {
            runs::has_event(client, run_id, "working")
                .await
                .then_some(())
        }
    })
    .await;

    // Packets stop flowing but no connection fails: heartbeats hang instead of failing.
    proxy.set(Link::Stalled);
    let stopped = tokio::time::timeout(LONG, cancelled.notified()).await;
    let rescuer = RunningAgent::start(
        agents::settings(&db.url, &agents::config("agent-b", "")),
        agents::only("build", Succeed),
    );
    let finished = wait_for_status(&client, run_id, "success").await;
    rescuer.stop().await;
    proxy.set(Link::Up);
    agent.stop().await;

    assert!(stopped.is_ok(), "the run went on after its lease ran out");
    assert_eq!(finished.worker_id.as_deref(), Some("agent-b"));
    assert_eq!(finished.attempt, 2);
}
