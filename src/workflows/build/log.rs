//! The build log: every line of build, test and push output goes to the run's events and
//! into a gzipped file that is stored as the run's 'logs' artifact. While tests run, lines
//! are also checked for the failures Odoo logs without changing its exit code.

use std::path::PathBuf;

use async_compression::tokio::write::GzipEncoder;
use futures_util::future::BoxFuture;
use tokio::io::{AsyncWriteExt, BufWriter};

use crate::docker::container::{OutputSink, OutputStream};
use crate::events::{EventSink, Level};

/// Failure lines quoted in the error that fails the tests.
const QUOTED_FAILURES: usize = 3;

/// Writes output lines to the events and the log file.
pub struct BuildLog {
    events: EventSink,
    path: PathBuf,
    file: GzipEncoder<BufWriter<tokio::fs::File>>,
    /// The first write error; later lines are still sent as events.
    write_error: Option<std::io::Error>,
    scan: Option<TestScan>,
    lines: u64,
    /// Values replaced by `***` in every line, in case a command prints them.
    secrets: Vec<String>,
}

/// Odoo log lines that mean a test or the module update failed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TestScan {
    pub failures: u64,
    /// The first few failure lines.
    pub first: Vec<String>,
}

impl BuildLog {
    pub async fn create(
        path: PathBuf,
        events: EventSink,
        secrets: Vec<String>,
    ) -> std::io::Result<BuildLog> {
        let file = tokio::fs::File::create(&path).await?;
        let mut log = BuildLog {
            events,
            path,
            file: GzipEncoder::new(BufWriter::new(file)),
            write_error: None,
            scan: None,
            lines: 0,
            secrets: Vec::new(),
        };
        secrets
            .into_iter()
            .for_each(|secret| log.add_secret(secret));
        Ok(log)
    }

    /// Adds a value to replace by `***` in later lines. Empty values are ignored.
    pub fn add_secret(&mut self, secret: String) {
        if !secret.is_empty() {
            self.secrets.push(secret);
        }
    }

    /// Adds a line to the log file only, for text the run's events already carry.
    pub async fn write_only(&mut self, message: &str) {
        let message = self.scrub(message);
        self.write(&message).await;
    }

    fn scrub(&self, line: &str) -> String {
        let mut line = line.to_string();
        for secret in &self.secrets {
            if line.contains(secret.as_str()) {
                line = line.replace(secret.as_str(), "***");
            }
        }
        line
    }

    /// Adds a line of the agent's own to the log file and sends it as an event.
    pub async fn note(&mut self, level: Level, message: &str) {
        let message = self.scrub(message);
        self.write(&message).await;
        self.events.send(level, message, None).await;
    }

    /// Starts checking lines for test failures.
    pub fn start_test_scan(&mut self) {
        self.scan = Some(TestScan::default());
    }

    /// Stops checking and returns what was found.
    pub fn finish_test_scan(&mut self) -> TestScan {
        self.scan.take().unwrap_or_default()
    }

    pub fn lines(&self) -> u64 {
        self.lines
    }

    /// Completes the gzip stream and returns the file's path.
    pub async fn finish(mut self) -> std::io::Result<PathBuf> {
        if let Some(err) = self.write_error.take() {
            return Err(err);
        }
        self.file.shutdown().await?;
        Ok(self.path)
    }

    async fn write(&mut self, line: &str) {
        if self.write_error.is_some() {
            return;
        }
        let mut result = self.file.write_all(line.as_bytes()).await;
        if result.is_ok() {
            result = self.file.write_all(b"\n").await;
        }
        if let Err(err) = result {
            tracing::warn!(path = %self.path.display(), error = %err, "writing the build log failed");
            self.write_error = Some(err);
        }
    }
}

impl OutputSink for BuildLog {
    fn line<'a>(&'a mut self, _stream: OutputStream, line: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.lines += 1;
            let line = self.scrub(line);
            self.write(&line).await;
            let failed = is_failure_line(&line);
            let level = match (&mut self.scan, failed) {
                (Some(scan), true) => {
                    scan.failures += 1;
                    if scan.first.len() < QUOTED_FAILURES {
                        scan.first.push(line.clone());
                    }
                    Level::Warn
                }
                _ => Level::Info,
            };
            self.events.send(level, line, None).await;
        })
    }
}

/// Whether an output line reports a failure that Odoo may not reflect in its exit code: a
/// log record at ERROR or CRITICAL level, or a unittest `FAIL:` line.
///
/// Odoo's log format is `2024-05-01 10:00:00,123 42 ERROR dbname logger: message`, so
/// the level is the fourth field of a line that starts with a date. Only that field is
/// checked, so an INFO record that mentions "ERROR" in its message does not count.
pub fn is_failure_line(line: &str) -> bool {
    if line.contains("FAIL:") {
        return true;
    }
    let mut fields = line.split_whitespace();
    let (Some(date), Some(_time), Some(pid), Some(level)) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return false;
    };
    looks_like_date(date)
        && pid.bytes().all(|b| b.is_ascii_digit())
        && matches!(level, "ERROR" | "CRITICAL")
}

fn looks_like_date(field: &str) -> bool {
    let bytes = field.as_bytes();
    bytes.len() == 10
        && bytes[4] == b'-'
        && bytes[7] == b'-'
        && bytes
            .iter()
            .enumerate()
            .all(|(i, b)| i == 4 || i == 7 || b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odoo_error_and_critical_records_are_failures() {
        let error = "2024-05-01 10:00:00,123 42 ERROR testdb odoo.modules.registry: Failed";
        let critical = "2024-05-01 10:00:00,123 42 CRITICAL testdb odoo.service.server: x";
        assert!(is_failure_line(error));
        assert!(is_failure_line(critical));
    }

    #[test]
    fn fail_lines_are_failures_at_any_level() {
        assert!(is_failure_line("FAIL: TestSample.test_x"));
        assert!(is_failure_line(
            "2024-05-01 10:00:00,123 42 INFO db odoo.tests: FAIL: TestSample.test_x"
        ));
    }

    #[test]
    fn info_and_warning_records_are_not_failures() {
        let info = "2024-05-01 10:00:00,123 42 INFO testdb odoo: 0 failed, 0 error(s) of 20 tests";
        let mention = "2024-05-01 10:00:00,123 42 INFO testdb odoo: retrying after ERROR 500";
        let warning = "2024-05-01 10:00:00,123 42 WARNING testdb odoo: deprecated";
        assert!(!is_failure_line(info));
        assert!(!is_failure_line(mention));
        assert!(!is_failure_line(warning));
    }

    #[test]
    fn lines_outside_odoo_format_are_not_failures() {
        assert!(!is_failure_line("Traceback (most recent call last):"));
        assert!(!is_failure_line("ERROR"));
        assert!(!is_failure_line("Step 3/7 : RUN echo ERROR CRITICAL"));
        assert!(!is_failure_line(""));
    }
}
