//! Neutralizing a restored database so that a copy of production cannot act as
//! production: no scheduled actions, no outgoing or incoming mail, a new database UUID.
//!
//! The SQL runs on the new database before anything can start Odoo on it, and covers
//! the tables every Odoo version has. When the environment names its Odoo container,
//! the image's own `odoo neutralize` (Odoo 16 and later) runs too. It also covers what
//! installed modules register, such as payment providers and IAP accounts.

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::config::backup::EnvBackupSettings;
use crate::workflows::backup::process::{exec_in_container, PgRunner, ProcessError};
use crate::workflows::backup::Job;

const NEUTRALIZE_SQL: &str = "\
UPDATE ir_cron SET active = false WHERE active;
UPDATE ir_mail_server SET active = false WHERE active;
DO $$ BEGIN
    IF to_regclass('public.fetchmail_server') IS NOT NULL THEN
        UPDATE fetchmail_server SET active = false WHERE active;
    END IF;
END $$;
UPDATE ir_config_parameter SET value = 'True' WHERE key = 'database.is_neutralized';
INSERT INTO ir_config_parameter (key, value)
    SELECT 'database.is_neutralized', 'True'
    WHERE NOT EXISTS (SELECT 1 FROM ir_config_parameter WHERE key = 'database.is_neutralized');
UPDATE ir_config_parameter SET value = gen_random_uuid()::text WHERE key = 'database.uuid'";

/// Verification query: active scheduled actions and mail servers, and the flag.
const CHECK_SQL: &str = "SELECT json_build_object(\
    'active_crons', (SELECT count(*) FROM ir_cron WHERE active), \
    'active_mail_servers', (SELECT count(*) FROM ir_mail_server WHERE active), \
    'is_neutralized', (SELECT value FROM ir_config_parameter \
                       WHERE key = 'database.is_neutralized'))";

/// Neutralizes `db`, then verifies it by queries; returns what they found.
pub async fn neutralize(
    job: &Job,
    pg: &PgRunner,
    env_settings: &EnvBackupSettings,
    db: &str,
) -> anyhow::Result<Value> {
    pg.execute(db, NEUTRALIZE_SQL)
        .await
        .context("neutralizing the database failed")?;
    job.reporter
        .info(format!(
            "Neutralized {db}: scheduled actions and mail servers off"
        ))
        .await;

    let odoo_command = run_odoo_neutralize(job, env_settings, db).await?;
    let checks = pg
        .query_json(db, CHECK_SQL)
        .await
        .context("verifying neutralization failed")?;
    let crons = checks["active_crons"].as_i64().unwrap_or(-1);
    let mail_servers = checks["active_mail_servers"].as_i64().unwrap_or(-1);
    if crons != 0 || mail_servers != 0 || checks["is_neutralized"] != json!("True") {
        bail!("neutralization of {db} did not hold: {checks}");
    }
    let mut checks = checks;
    checks["odoo_neutralize"] = json!(odoo_command);
    Ok(checks)
}

/// Runs `odoo neutralize -d <db>` in the environment's Odoo container when configured.
/// Returns "ran", "skipped" or "unavailable" (an Odoo without the command).
async fn run_odoo_neutralize(
    job: &Job,
    env_settings: &EnvBackupSettings,
    db: &str,
) -> anyhow::Result<&'static str> {
    let (true, Some(container)) = (env_settings.odoo_neutralize, &env_settings.odoo_container)
    else {
        return Ok("skipped");
    };
    let docker = crate::docker::connect(&job.settings.docker).await?;
    let args = ["neutralize".to_string(), "-d".to_string(), db.to_string()];
    match exec_in_container(&docker, container, "odoo", &args).await {
        Ok(()) => {
            job.reporter
                .info(format!("Ran odoo neutralize on {db} in {container}"))
                .await;
            Ok("ran")
        }
        Err(ProcessError::Exit { stderr, .. }) if unknown_command(&stderr) => {
            job.reporter
                .warn(format!("The Odoo in {container} has no neutralize command (before Odoo 16); the SQL neutralization stands alone"))
                .await;
            Ok("unavailable")
        }
        Err(err) => Err(err).context("odoo neutralize failed"),
    }
}

/// Tells whether Odoo's CLI rejected the command as unknown (Odoo 15 and older).
fn unknown_command(stderr: &str) -> bool {
    stderr.contains("Unknown command") || stderr.contains("invalid choice")
}
