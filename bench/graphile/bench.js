// Measures graphile-worker the way benches/queue measures odooops-agent, so the two
// sets of figures compare like for like. Called by benches/queue with a fresh database:
//
//   node bench.js latency DATABASE_URL COUNT WARMUP GAP_MS
//     Queues one job at a time with addJob to an idle runner (concurrency 1) and records
//     the milliseconds from addJob's commit to the task handler starting.
//   node bench.js drain DATABASE_URL JOBS CONCURRENCY
//     Starts an idle runner, adds JOBS jobs in one transaction, and records the seconds
//     from that commit until every job is completed (deleted from the jobs table).
//
// Prints one JSON object on stdout. Runner settings are graphile-worker's defaults
// (pollInterval 2000 ms, no local queue, no batched completion) apart from concurrency.
"use strict";

const { Logger, makeWorkerUtils, run, runMigrations } = require("graphile-worker");

// Per-job info lines would add console output that the agent side does not pay for.
const logger = new Logger(() => (level, message) => {
  if (level === "error" || level === "warning") {
    console.error(`graphile-worker ${level}: ${message}`);
  }
});

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const nowMs = () => Number(process.hrtime.bigint()) / 1e6;

async function latency(connectionString, count, warmup, gapMs) {
  await runMigrations({ connectionString, logger });
  let onStart = null;
  const taskList = {
    bench: async () => {
      const started = nowMs();
      if (onStart) {
        onStart(started);
        onStart = null;
      }
    },
  };
  const runner = await run({
    connectionString,
    concurrency: 1,
    noHandleSignals: true,
    taskList,
    logger,
  });
  const utils = await makeWorkerUtils({ connectionString, logger });

  const samples = [];
  for (let i = 0; i < warmup + count; i++) {
    // The gap lets the previous job complete, so each job meets an idle runner.
    await sleep(gapMs);
    const started = new Promise((resolve) => {
      onStart = resolve;
    });
    await utils.addJob("bench", {});
    const committed = nowMs();
    const handlerStarted = await started;
    if (i >= warmup) {
      samples.push(handlerStarted - committed);
    }
  }

  await utils.release();
  await runner.stop();
  return { samples_ms: samples };
}

async function drain(connectionString, jobs, concurrency) {
  await runMigrations({ connectionString, logger });
  let handled = 0;
  let allHandled;
  const allHandledPromise = new Promise((resolve) => {
    allHandled = resolve;
  });
  const taskList = {
    bench: async () => {
      handled += 1;
      if (handled === jobs) {
        allHandled();
      }
    },
  };
  const runner = await run({
    connectionString,
    concurrency,
    noHandleSignals: true,
    taskList,
    logger,
  });
  const utils = await makeWorkerUtils({ connectionString, logger });

  const specs = Array.from({ length: jobs }, () => ({ identifier: "bench", payload: {} }));
  await utils.addJobs(specs);
  const committed = nowMs();
  await allHandledPromise;
  // The runner completes a job after its handler returns, so the end is when the jobs
  // table is empty.
  await utils.withPgClient(async (client) => {
    for (;;) {
      const result = await client.query(
        "SELECT count(*)::int AS left FROM graphile_worker._private_jobs",
      );
      if (result.rows[0].left === 0) {
        return;
      }
      await sleep(2);
    }
  });
  const seconds = (nowMs() - committed) / 1000;

  await utils.release();
  await runner.stop();
  return { jobs, concurrency, seconds, jobs_per_second: jobs / seconds };
}

async function main() {
  const [mode, url, ...args] = process.argv.slice(2);
  const numbers = args.map((arg) => Number.parseInt(arg, 10));
  let result;
  if (mode === "latency" && numbers.length === 3) {
    result = await latency(url, ...numbers);
  } else if (mode === "drain" && numbers.length === 2) {
    result = await drain(url, ...numbers);
  } else {
    console.error(
      "usage: bench.js latency DATABASE_URL COUNT WARMUP GAP_MS | " +
        "bench.js drain DATABASE_URL JOBS CONCURRENCY",
    );
    process.exit(64);
  }
  result.graphile_worker = require("graphile-worker/package.json").version;
  process.stdout.write(`${JSON.stringify(result)}\n`);
}

main().catch((error) => {
  console.error(`graphile-worker benchmark failed: ${error.stack || error}`);
  process.exit(1);
});
