//! Log output: to stdout for journald, without timestamps (journald adds them).

use tracing_subscriber::filter::Directive;
use tracing_subscriber::EnvFilter;

use crate::config::{is_log_filter, LogFormat, LogSettings};

/// Targets whose debug output carries request bodies: bollard logs each Docker API
/// request, container environments included, and those can contain passwords.
const QUIET_TARGETS: [&str; 1] = ["bollard"];

/// Installs the global subscriber. RUST_LOG, when set, replaces the configured filter.
pub fn init(settings: &LogSettings) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(settings, std::env::var("RUST_LOG").ok()))
        .with_writer(std::io::stdout)
        .without_time()
        .with_ansi(false);
    // try_init fails only when a subscriber is already installed (tests).
    let _ = match settings.format {
        LogFormat::Text => builder.with_target(false).try_init(),
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
    };
}

/// Builds the filter from RUST_LOG or the configured one, with the quiet targets held
/// at info whatever either requests. A RUST_LOG that is no valid filter is reported on
/// stderr and ignored: tracing would take a bare word for a target and log nothing else.
fn filter(settings: &LogSettings, rust_log: Option<String>) -> EnvFilter {
    let rust_log = rust_log.filter(|value| {
        let valid = is_log_filter(value);
        if !valid {
            eprintln!(
                "odooops-agent: ignoring RUST_LOG={value:?}: expected a level (trace, debug, \
                 info, warn, error, off) or a filter such as info,odooops_agent=debug; \
                 using log.level {:?}",
                settings.filter
            );
        }
        valid
    });
    let requested = rust_log
        .and_then(|value| EnvFilter::try_new(value).ok())
        .unwrap_or_else(|| EnvFilter::new(&settings.filter));
    QUIET_TARGETS.iter().fold(requested, |filter, target| {
        let directive: Directive = format!("{target}=info")
            .parse()
            .expect("a target=level directive parses");
        filter.add_directive(directive)
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Logs a debug line from bollard and one from the agent under `filter`.
    fn output_with(filter: EnvFilter) -> String {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!(target: "bollard::docker", "Env PASSWORD=hunter2");
            tracing::debug!(target: "odooops_agent::agent", "claimed a run");
        });
        let bytes = captured.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    fn settings(filter: &str) -> LogSettings {
        LogSettings {
            format: LogFormat::Text,
            filter: filter.to_string(),
        }
    }

    #[test]
    fn unfiltered_debug_would_show_bollard() {
        let output = output_with(EnvFilter::new("debug"));
        assert!(output.contains("hunter2"), "{output}");
    }

    #[test]
    fn debug_level_keeps_bollard_quiet() {
        let output = output_with(filter(&settings("debug"), None));
        assert!(output.contains("claimed a run"), "{output}");
        assert!(!output.contains("hunter2"), "{output}");
    }

    #[test]
    fn invalid_rust_log_falls_back_to_the_config() {
        let output = output_with(filter(&settings("debug"), Some("verbose".to_string())));
        assert!(output.contains("claimed a run"), "{output}");
    }

    #[test]
    fn rust_log_cannot_raise_bollard() {
        let rust_log = Some("trace,bollard=trace".to_string());
        let output = output_with(filter(&settings("info"), rust_log));
        assert!(output.contains("claimed a run"), "{output}");
        assert!(!output.contains("hunter2"), "{output}");
    }
}
