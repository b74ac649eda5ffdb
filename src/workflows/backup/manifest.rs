//! manifest.json: what a backup contains and what it came from.
//!
//! The top-level keys are those of the manifest Odoo's database manager writes
//! (odoo_dump, db_name, version, version_info, major_version, pg_version, modules), so
//! tools that read Odoo's dumps read ours. The agent's own details are under `odooops`:
//! the backup's ids, pg_dump and server versions, the dump's size and CRC-32, the
//! filestore's file count and size, and the rows of every table in the dump.

use chrono::Utc;
use serde_json::{json, Value};
use uuid::Uuid;

use super::pg::quote_literal;
use super::process::PgRunner;
use super::records::EnvironmentRow;

/// Version of the layout under the `odooops` key.
pub const MANIFEST_FORMAT: u32 = 1;

/// Builds the manifest before the dump: everything but sizes, checksums and row counts.
pub async fn start_manifest(
    pg: &PgRunner,
    env: &EnvironmentRow,
    backup_id: Uuid,
    backup_type: &str,
    dump_major: u32,
) -> anyhow::Result<Value> {
    let db = &env.db_name;
    let server = pg
        .query_json(
            db,
            "SELECT json_build_object('version', current_setting('server_version'), \
             'version_num', current_setting('server_version_num')::int, \
             'database_size', pg_database_size(current_database()))",
        )
        .await?;
    let modules = installed_modules(pg, db).await?;
    let base_version = modules.get("base").and_then(Value::as_str).unwrap_or("");
    let major_version = major_version(base_version);
    let version_num = server["version_num"].as_u64().unwrap_or(0);

    Ok(json!({
        "odoo_dump": "1",
        "db_name": db,
        "version": major_version,
        "version_info": version_info(&major_version),
        "major_version": major_version,
        "pg_version": format!("{}.{}", version_num / 10_000, version_num % 10_000 / 100),
        "modules": modules,
        "odooops": {
            "format": MANIFEST_FORMAT,
            "backup_id": backup_id,
            "backup_type": backup_type,
            "project_id": env.project_id,
            "env_id": env.env_id,
            "created_at": Utc::now(),
            "server_version": server["version"],
            "server_version_num": version_num,
            "pg_dump_major": dump_major,
            "database_size": server["database_size"],
        },
    }))
}

/// Installed modules and their versions from ir_module_module, or an empty object for a
/// database without that table (not an Odoo database).
async fn installed_modules(pg: &PgRunner, db: &str) -> anyhow::Result<Value> {
    let exists = pg
        .query_json(
            db,
            &format!(
                "SELECT to_json(to_regclass({}) IS NOT NULL)",
                quote_literal("public.ir_module_module")
            ),
        )
        .await?;
    if exists != Value::Bool(true) {
        return Ok(json!({}));
    }
    let modules = pg
        .query_json(
            db,
            "SELECT coalesce(json_object_agg(name, latest_version ORDER BY name), '{}') \
             FROM ir_module_module WHERE state = 'installed'",
        )
        .await?;
    Ok(modules)
}

/// Odoo's series from the base module's version: "17.0.1.3" gives "17.0", and a
/// "saas~17.2.1.0" version gives "saas~17.2".
fn major_version(base_version: &str) -> String {
    base_version
        .split('.')
        .take(2)
        .collect::<Vec<_>>()
        .join(".")
}

/// Odoo's release.version_info for a series such as "17.0": (17, 0, 0, 'final', 0).
fn version_info(major_version: &str) -> Value {
    let mut parts = major_version.trim_start_matches("saas~").split('.');
    let major: u64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    json!([major, minor, 0, "final", 0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odoo_series_comes_from_the_base_module_version() {
        assert_eq!(major_version("17.0.1.3"), "17.0");
        assert_eq!(major_version("saas~17.2.1.0"), "saas~17.2");
        assert_eq!(major_version(""), "");
        assert_eq!(version_info("16.0"), json!([16, 0, 0, "final", 0]));
    }
}
