//! The module update: `odoo -u` in a one-off container from the new image, judged by its
//! exit code and by the ERROR and CRITICAL lines of its log.

use anyhow::{bail, Context};
use bollard::Docker;
use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::container::{self, Labels};
use super::env_config::{EnvConfig, Modules};
use super::scrub::Scrubber;
use crate::docker::container::{remove_container, run_to_completion, OutputSink, OutputStream};
use crate::events::{EventSink, Level};

/// Error lines quoted in the failure message; the events keep all of them.
const QUOTED_ERROR_LINES: usize = 5;

/// Returns the level of an Odoo log line ("2024-05-01 10:00:00,123 42 ERROR db logger: ..."),
/// or `None` for lines in another format, such as traceback lines.
pub fn odoo_log_level(line: &str) -> Option<&str> {
    let mut fields = line.split_whitespace();
    let date = fields.next()?;
    let looks_like_date =
        date.len() == 10 && date.as_bytes()[4] == b'-' && date.as_bytes()[7] == b'-';
    if !looks_like_date {
        return None;
    }
    let level = fields.nth(2)?;
    ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
        .contains(&level)
        .then_some(level)
}

fn is_failure_line(line: &str) -> bool {
    matches!(odoo_log_level(line), Some("ERROR" | "CRITICAL"))
}

/// Inputs of the update besides the environment's config.
pub struct UpdateRequest<'a> {
    pub config: &'a EnvConfig,
    pub image: &'a str,
    pub db_name: &'a str,
    pub modules: &'a Modules,
    pub labels: &'a Labels,
    pub env: &'a [String],
    /// Masks the `env` values in the output lines before they become events.
    pub scrubber: &'a Scrubber,
}

/// Runs the update and fails unless it exited 0 without ERROR or CRITICAL lines. Every
/// output line becomes an event, error lines at level error.
pub async fn update_modules(
    docker: &Docker,
    request: UpdateRequest<'_>,
    events: &EventSink,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let config = request.config;
    let modules = request.modules.argument();
    let spec = container::update_spec(&request);
    let name = config.update_name();
    let message = format!("Updating modules {modules} with {}", request.image);
    events.info(message).await;
    tracing::info!(container = %name, modules = %modules, "module update started");

    // A container left under this name by a crashed deploy would block the new one.
    remove_container(docker, &name)
        .await
        .with_context(|| format!("removing the leftover container {name} failed"))?;
    let mut log = UpdateLog {
        events: events.clone(),
        scrubber: request.scrubber.clone(),
        lines: 0,
        errors: Vec::new(),
    };
    let exit = run_to_completion(docker, &spec, &mut log, cancel).await?;

    let code = exit.exit_code;
    let elapsed = exit.duration.as_secs_f64();
    tracing::info!(container = %name, exit_code = code, elapsed_s = elapsed, "module update finished");
    if code != 0 || !log.errors.is_empty() {
        let errors = log.describe_errors();
        bail!("module update exited with code {code} after {elapsed:.1} s and {errors}");
    }
    let message = format!(
        "Module update finished in {elapsed:.1} s ({} log lines)",
        log.lines
    );
    events.info(message).await;
    Ok(())
}

/// Record of the update's log: the line count and the ERROR and CRITICAL lines. Every
/// line is also sent on as an event, with the `env` values masked.
struct UpdateLog {
    events: EventSink,
    scrubber: Scrubber,
    lines: u64,
    errors: Vec<String>,
}

impl OutputSink for UpdateLog {
    fn line<'a>(&'a mut self, _stream: OutputStream, line: &'a str) -> BoxFuture<'a, ()> {
        self.lines += 1;
        // The level is read before masking, in case a value matches part of the prefix.
        let failed = is_failure_line(line);
        let line = self.scrubber.scrub(line);
        let level = if failed {
            self.errors.push(line.clone());
            Level::Error
        } else {
            Level::Info
        };
        Box::pin(self.events.send(level, line, None))
    }
}

impl UpdateLog {
    fn describe_errors(&self) -> String {
        if self.errors.is_empty() {
            return "logged no ERROR or CRITICAL line".to_string();
        }
        let quoted: Vec<&str> = self
            .errors
            .iter()
            .take(QUOTED_ERROR_LINES)
            .map(String::as_str)
            .collect();
        format!(
            "logged {} ERROR or CRITICAL lines: {}",
            self.errors.len(),
            quoted.join(" | ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odoo_levels_are_read_from_the_fourth_field() {
        let line = "2024-05-01 10:00:00,123 42 ERROR prod odoo.modules.registry: Failed";
        assert_eq!(odoo_log_level(line), Some("ERROR"));
        let line = "2024-05-01 10:00:00,123 42 CRITICAL prod odoo.service.server: Failed";
        assert!(is_failure_line(line));
        let line = "2024-05-01 10:00:00,123 42 INFO prod odoo: ERROR in a message is fine";
        assert!(!is_failure_line(line));
    }

    #[test]
    fn lines_in_other_formats_have_no_level() {
        assert_eq!(odoo_log_level("Traceback (most recent call last):"), None);
        assert_eq!(odoo_log_level("ERROR: something"), None);
        assert_eq!(odoo_log_level(""), None);
    }
}
