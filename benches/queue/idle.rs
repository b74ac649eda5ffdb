//! Resident memory and CPU of the release binary `odooops-agent run` with nothing to do.
//!
//! The agent runs against a migrated, empty database with its default settings (5 s
//! poll, 5 s reaper, LISTEN connection). After it settles, CPU time (utime + stime from
//! /proc/PID/stat) is read twice, a measuring window apart, and memory (VmRSS, VmHWM)
//! from /proc/PID/status at the end.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::support::BenchDb;

pub struct IdleFigures {
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub threads: u64,
    pub cpu_percent: f64,
    /// CPU time used in the window, in clock ticks (usually 10 ms each).
    pub cpu_ticks: u64,
    pub window: Duration,
}

const SETTLE: Duration = Duration::from_secs(5);

pub async fn measure(server: &str, window: Duration) -> anyhow::Result<IdleFigures> {
    let db = BenchDb::migrated(server, "idle").await?;
    let config = tempfile::NamedTempFile::new()?;
    std::fs::write(config.path(), "[agent]\nworker_id = \"bench-idle\"\n")?;
    let log = tempfile::NamedTempFile::new()?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_odooops-agent"))
        .arg("run")
        .arg("--config")
        .arg(config.path())
        .env("ODOOOPS_DATABASE_URL", &db.url)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(log.reopen()?)
        .stderr(log.reopen()?)
        .spawn()
        .context("starting odooops-agent failed")?;

    let result = watch(&mut child, window).await;
    stop(&mut child).await;
    if result.is_err() {
        eprintln!("agent output:\n{}", std::fs::read_to_string(log.path())?);
    }
    db.drop().await?;
    result
}

async fn watch(child: &mut Child, window: Duration) -> anyhow::Result<IdleFigures> {
    let pid = child.id();
    tokio::time::sleep(SETTLE).await;
    if let Some(status) = child.try_wait()? {
        bail!("odooops-agent exited during start-up with {status}");
    }
    let ticks_before = cpu_ticks(pid)?;
    tokio::time::sleep(window).await;
    if let Some(status) = child.try_wait()? {
        bail!("odooops-agent exited while idle with {status}");
    }
    let ticks_after = cpu_ticks(pid)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;

    let cpu_seconds = (ticks_after - ticks_before) as f64 / clock_ticks_per_second()?;
    Ok(IdleFigures {
        rss_kib: status_field(&status, "VmRSS")?,
        hwm_kib: status_field(&status, "VmHWM")?,
        threads: status_field(&status, "Threads")?,
        cpu_percent: cpu_seconds / window.as_secs_f64() * 100.0,
        cpu_ticks: ticks_after - ticks_before,
        window,
    })
}

/// Sends SIGTERM and waits for the drain; kills the agent if it does not exit in 10 s.
async fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    for _ in 0..100 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("odooops-agent did not stop within 10 s of SIGTERM; killing it");
    let _ = child.kill();
    let _ = child.wait();
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name in parentheses may contain spaces; fields after it start at 3.
    let after_name = &stat[stat.rfind(')').context("malformed /proc stat")? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let utime: u64 = fields.get(11).context("no utime in /proc stat")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime in /proc stat")?.parse()?;
    Ok(utime + stime)
}

fn clock_ticks_per_second() -> anyhow::Result<f64> {
    let output = Command::new("getconf").arg("CLK_TCK").output()?;
    let text = String::from_utf8(output.stdout)?;
    text.trim()
        .parse()
        .with_context(|| format!("getconf CLK_TCK printed {text:?}"))
}

/// Parses a numeric field of /proc/PID/status such as `VmRSS:  8120 kB`.
fn status_field(status: &str, name: &str) -> anyhow::Result<u64> {
    let line = status
        .lines()
        .find(|line| line.starts_with(&format!("{name}:")))
        .with_context(|| format!("/proc status has no {name}"))?;
    let value = line[name.len() + 1..]
        .split_whitespace()
        .next()
        .unwrap_or("");
    value
        .parse()
        .with_context(|| format!("/proc status {name} is {value:?}"))
}
