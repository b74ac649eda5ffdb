use std::path::Path;

use super::*;

const URL: &str = "postgres://agent:pw@127.0.0.1:5432/ops?sslmode=disable";

fn parse(text: &str) -> Result<Settings, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|err| ConfigError::Parse {
        path: Path::new("test.toml").to_path_buf(),
        message: err.to_string(),
    })?;
    raw.validate_with(Some(URL.to_string()))
}

#[test]
fn empty_config_uses_documented_defaults() {
    let settings = parse("").unwrap();
    assert_eq!(settings.agent.concurrency, DEFAULT_CONCURRENCY);
    assert_eq!(settings.agent.lease, DEFAULT_LEASE);
    assert_eq!(
        settings.agent.heartbeat_interval,
        DEFAULT_HEARTBEAT_INTERVAL
    );
    assert_eq!(settings.agent.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
    assert_eq!(settings.agent.workflows.len(), KNOWN_WORKFLOWS.len());
    assert!(settings.agent.environments.is_empty());
}

#[test]
fn zero_concurrency_names_key_and_value() {
    let err = parse("[agent]\nconcurrency = 0\n").unwrap_err().to_string();
    assert!(err.contains("agent.concurrency"), "{err}");
    assert!(err.contains(": 0 "), "{err}");
}

#[test]
fn unknown_key_is_rejected_by_name() {
    let err = parse("[agent]\nconcurency = 2\n").unwrap_err().to_string();
    assert!(err.contains("concurency"), "{err}");
}

#[test]
fn unknown_workflow_is_rejected_by_name() {
    let err = parse("[agent]\nworkflows = [\"deploy\", \"frobnicate\"]\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("agent.workflows"), "{err}");
    assert!(err.contains("frobnicate"), "{err}");
}

#[test]
fn heartbeat_longer_than_half_the_lease_is_rejected() {
    let err = parse("[agent]\nlease_secs = 10\nheartbeat_interval_secs = 6\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("agent.heartbeat_interval_secs"), "{err}");
}

#[test]
fn database_url_override_wins_over_the_file() {
    let settings = parse("[database]\nurl = \"postgres://other@db.invalid/x\"\n").unwrap();
    assert_eq!(settings.database.url.expose(), URL);
}

#[test]
fn missing_database_url_names_all_sources() {
    let raw: RawConfig = toml::from_str("").unwrap();
    let err = raw.validate_with(None).unwrap_err().to_string();
    assert!(err.contains("database.url"), "{err}");
    assert!(err.contains(DATABASE_URL_ENV), "{err}");
}

#[test]
fn malformed_database_url_error_hides_the_url() {
    let raw: RawConfig = toml::from_str("").unwrap();
    let err = raw
        .validate_with(Some("postgres://u:topsecret@host:notaport/db".into()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("database.url"), "{err}");
    assert!(!err.contains("topsecret"), "{err}");
}

#[test]
fn bad_log_format_names_key_and_value() {
    let err = parse("[log]\nformat = \"xml\"\n").unwrap_err().to_string();
    assert!(err.contains("log.format"), "{err}");
    assert!(err.contains("xml"), "{err}");
}

#[test]
fn log_level_typo_names_key_and_value() {
    for level in ["inof", "warning", "info,bollard=loud", "=debug"] {
        let err = parse(&format!("[log]\nlevel = {level:?}\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("log.level"), "{level}: {err}");
        assert!(err.contains(level), "{level}: {err}");
    }
}

#[test]
fn log_levels_and_directives_are_accepted() {
    for level in [
        "debug",
        "WARN",
        "off",
        "info,odooops_agent=trace",
        "odooops_agent=debug",
    ] {
        let settings = parse(&format!("[log]\nlevel = {level:?}\n")).unwrap();
        assert_eq!(settings.log.filter, level);
    }
}

#[test]
fn docker_host_without_scheme_is_rejected() {
    let err = parse("[docker]\nhost = \"/var/run/docker.sock\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("docker.host"), "{err}");
}

#[test]
fn docker_ping_interval_defaults_and_bounds() {
    let settings = parse("").unwrap();
    assert_eq!(settings.docker.ping_interval, DEFAULT_DOCKER_PING_INTERVAL);
    let err = parse("[docker]\nping_interval_secs = 0\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("docker.ping_interval_secs"), "{err}");
    assert!(err.contains(": 0 "), "{err}");
}

#[test]
fn example_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let settings = parse(&text).unwrap();
    assert_eq!(settings.agent.lease, DEFAULT_LEASE);
    assert_eq!(settings.agent.poll_interval, DEFAULT_POLL_INTERVAL);
    assert_eq!(settings.database.pool_size, DEFAULT_POOL_SIZE);
}

#[test]
fn parse_error_does_not_echo_a_secret_line() {
    let text = "[registry]\npasword = \"registry-test-password\"\n";
    let err = Settings::from_toml(text, Path::new("agent.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 2"), "{err}");
    assert!(!err.contains("registry-test-password"), "{err}");
}

#[test]
fn unquoted_database_url_is_not_echoed() {
    let text = "[database]\nurl = postgres://u:dbsecretpw@127.0.0.1/x\n";
    let err = Settings::from_toml(text, Path::new("agent.toml"))
        .unwrap_err()
        .to_string();
    assert!(!err.contains("dbsecretpw"), "{err}");
}

#[test]
fn parse_error_names_an_unknown_key() {
    let text = "[agent]\nconcurency = 2\n";
    let err = Settings::from_toml(text, Path::new("agent.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("concurency"), "{err}");
}
