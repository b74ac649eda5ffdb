use serde_json::{json, Value};

use super::*;

fn parse(config: Value) -> Result<EnvConfig, EnvConfigError> {
    EnvConfig::parse(&config, "odoo_prod")
}

#[test]
fn empty_config_uses_documented_defaults() {
    let config = parse(json!({"droplet_id": 42, "deploy_url": "https://x"})).unwrap();
    assert_eq!(config.container_name, "odoo-odoo_prod");
    assert_eq!(config.previous_name(), "odoo-odoo_prod-previous");
    assert_eq!(config.data_volume.source, "odoo-odoo_prod-data");
    assert_eq!(config.data_volume.target, ODOO_DATA_DIR);
    assert_eq!(
        config.ports,
        vec![PortSpec {
            host_ip: "127.0.0.1".into(),
            host_port: 8069,
            container_port: 8069,
        }]
    );
    assert_eq!(config.health.path, DEFAULT_HEALTH_PATH);
    assert_eq!(config.health.timeout, DEFAULT_PROBE_TIMEOUT);
    assert_eq!(config.health.interval, DEFAULT_PROBE_INTERVAL);
    assert_eq!(config.health.deadline, DEFAULT_GATE_DEADLINE);
    assert_eq!(config.update, None);
    assert_eq!(config.update_command, vec!["odoo".to_string()]);
    assert_eq!(config.restart_policy, "unless-stopped");
}

#[test]
fn short_and_long_port_forms_are_accepted() {
    let config = parse(json!({"ports": [
        "127.0.0.2:18069:8069",
        "8072:8072",
        {"host_port": 9000, "host_ip": "0.0.0.0"}
    ]}))
    .unwrap();
    assert_eq!(config.ports[0].host_ip, "127.0.0.2");
    assert_eq!(config.ports[0].host_port, 18069);
    assert_eq!(config.ports[1].host_ip, DEFAULT_HOST_IP);
    assert_eq!(config.ports[1].container_port, 8072);
    assert_eq!(config.ports[2].container_port, 8069);
}

#[test]
fn malformed_port_names_key_and_value() {
    let err = parse(json!({"ports": ["eighty"]})).unwrap_err().to_string();
    assert!(err.contains("ports"), "{err}");
    assert!(err.contains("eighty"), "{err}");
}

#[test]
fn probe_url_uses_the_published_port() {
    let config = parse(json!({"ports": ["0.0.0.0:18069:8069"]})).unwrap();
    let url = config.health.probe_url(&config.ports).unwrap();
    assert_eq!(url, "http://127.0.0.1:18069/web/health");
}

#[test]
fn probe_url_without_published_port_is_an_error() {
    let config = parse(json!({"ports": ["18072:8072"]})).unwrap();
    let err = config
        .health
        .probe_url(&config.ports)
        .unwrap_err()
        .to_string();
    assert!(err.contains("health.port"), "{err}");
}

#[test]
fn https_health_url_is_rejected() {
    let err = parse(json!({"health": {"url": "https://example.com/web/health"}}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("health.url"), "{err}");
}

#[test]
fn unknown_health_key_is_rejected() {
    let err = parse(json!({"health": {"interval": 1}}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("interval"), "{err}");
}

#[test]
fn fractional_gate_timings_are_accepted() {
    let config = parse(json!({"health": {"interval_secs": 0.25, "deadline_secs": 3}})).unwrap();
    assert_eq!(config.health.interval, Duration::from_millis(250));
    assert_eq!(config.health.deadline, Duration::from_secs(3));
}

#[test]
fn zero_probe_timeout_is_rejected() {
    let err = parse(json!({"health": {"timeout_secs": 0}}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("health.timeout_secs"), "{err}");
}

#[test]
fn update_accepts_all_a_list_or_a_comma_string() {
    let all = parse(json!({"update": "all"})).unwrap();
    assert_eq!(all.update, Some(Modules::All));
    let list = parse(json!({"update": ["sale", "stock"]})).unwrap();
    assert_eq!(list.update.unwrap().argument(), "sale,stock");
    let text = parse(json!({"update": "sale, stock"})).unwrap();
    assert_eq!(text.update.unwrap().argument(), "sale,stock");
    let none = parse(json!({"update": []})).unwrap();
    assert_eq!(none.update, None);
}

#[test]
fn module_name_with_option_syntax_is_rejected() {
    let err = parse(json!({"update": ["sale", "--dev=all"]}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("--dev=all"), "{err}");
}

#[test]
fn container_name_with_slash_is_rejected() {
    let err = parse(json!({"container_name": "odoo/prod"}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("container_name"), "{err}");
}

#[test]
fn bind_mount_data_volume_is_kept_as_a_path() {
    let config = parse(json!({"data_volume": "/srv/odoo/prod"})).unwrap();
    assert!(config.data_volume.is_bind());
    assert_eq!(config.mounts()[0].target, ODOO_DATA_DIR);
}

#[test]
fn volume_over_the_data_dir_is_rejected() {
    let err = parse(json!({"volumes": [{"source": "x", "target": "/var/lib/odoo/"}]}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("volumes[0].target"), "{err}");
}

#[test]
fn odoo_config_is_mounted_read_only() {
    let config = parse(json!({"odoo_config": "/srv/odoo/prod.conf"})).unwrap();
    let mount = config.mounts().pop().unwrap();
    assert_eq!(mount.target, ODOO_CONFIG_TARGET);
    assert!(mount.read_only);
}

#[test]
fn env_values_may_come_from_the_agent_host() {
    let config = parse(json!({"env": {
        "PGHOST": "db",
        "PGPASSWORD": {"file": "/etc/odooops/pgpassword"},
        "TOKEN": {"env": "ODOO_TOKEN"}
    }}))
    .unwrap();
    assert_eq!(
        config.env[0],
        ("PGHOST".into(), EnvValue::Plain("db".into()))
    );
    assert_eq!(
        config.env[1].1,
        EnvValue::FromFile("/etc/odooops/pgpassword".into())
    );
    assert_eq!(config.env[2].1, EnvValue::FromEnv("ODOO_TOKEN".into()));
}

#[test]
fn env_source_with_both_keys_is_rejected() {
    let err = parse(json!({"env": {"X": {"env": "A", "file": "/b"}}}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("env.X"), "{err}");
}

#[test]
fn missing_host_variable_names_the_key_not_a_value() {
    let value = EnvValue::FromEnv("ODOOOPS_TEST_SURELY_UNSET_VARIABLE".into());
    let err = resolve_env_value("PGPASSWORD", &value)
        .unwrap_err()
        .to_string();
    assert!(err.contains("env.PGPASSWORD"), "{err}");
}

#[test]
fn unknown_restart_policy_is_rejected() {
    let err = parse(json!({"restart_policy": "sometimes"}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("restart_policy"), "{err}");
}

#[test]
fn host_system_paths_cannot_be_bind_mounted() {
    for source in [
        "/",
        "/var/run/docker.sock",
        "/run/docker.sock",
        "/etc",
        "/proc/1",
    ] {
        let config = json!({ "volumes": [{ "source": source, "target": "/mnt/x" }] });
        let err = parse(config).unwrap_err();
        assert_eq!(err.key, "volumes[0].source", "{source}");
    }
}

#[test]
fn data_directories_can_be_bind_mounted() {
    let config = json!({ "volumes": [{ "source": "/srv/odoo/addons", "target": "/mnt/x" }] });
    assert!(parse(config).is_ok());
}
