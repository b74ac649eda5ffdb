//! Schema migrations for the ops control plane.
//!
//! Migrations are the SQL files in migrations/, compiled into the binary and applied in
//! order of their number. Each runs in its own transaction and is recorded in
//! ops.schema_migrations with a checksum, so a second run applies nothing and an edited
//! migration is reported instead of silently skipped. A session advisory lock makes
//! concurrent runs (two hosts deploying at once) wait for each other.

use sha2::{Digest, Sha256};
use tokio_postgres::Client;

use crate::queue::db_error_text;

/// Key of the advisory lock held while migrating ("odooops" in ASCII).
const MIGRATION_LOCK: i64 = 0x006f_646f_6f6f_7073;

/// One migration file.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in the order they apply.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "control_plane",
        sql: include_str!("../migrations/0001_control_plane.sql"),
    },
    Migration {
        version: 2,
        name: "approvals_and_branch_rules",
        sql: include_str!("../migrations/0002_approvals_and_branch_rules.sql"),
    },
    Migration {
        version: 3,
        name: "backups",
        sql: include_str!("../migrations/0003_backups.sql"),
    },
    Migration {
        version: 4,
        name: "restore_approvals",
        sql: include_str!("../migrations/0004_restore_approvals.sql"),
    },
];

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("database error while applying migrations: {}", db_error_text(.0))]
    Database(#[from] tokio_postgres::Error),
    #[error("migration {version} ({name}) failed: {}", db_error_text(.source))]
    Failed {
        version: i32,
        name: &'static str,
        source: tokio_postgres::Error,
    },
    #[error(
        "migration {version} ({name}) was applied with checksum {applied}, but this binary \
         has {expected}: the file changed after it was applied"
    )]
    Modified {
        version: i32,
        name: &'static str,
        applied: String,
        expected: String,
    },
}

fn checksum(sql: &str) -> String {
    hex::encode(Sha256::digest(sql.as_bytes()))
}

/// Applies pending migrations and returns the versions it applied.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, MigrateError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let result = apply_pending(client).await;
    // The lock is released with the session too, should this statement fail.
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await?;
    result
}

async fn apply_pending(client: &mut Client) -> Result<Vec<i32>, MigrateError> {
    client
        .batch_execute(
            "SET client_min_messages = warning;
             CREATE SCHEMA IF NOT EXISTS ops;
             CREATE TABLE IF NOT EXISTS ops.schema_migrations (
                 version    integer PRIMARY KEY,
                 name       text NOT NULL,
                 checksum   text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );",
        )
        .await?;
    let rows = client
        .query("SELECT version, checksum FROM ops.schema_migrations", &[])
        .await?;
    let applied: std::collections::HashMap<i32, String> =
        rows.iter().map(|row| (row.get(0), row.get(1))).collect();

    let mut newly_applied = Vec::new();
    for migration in MIGRATIONS {
        let expected = checksum(migration.sql);
        match applied.get(&migration.version) {
            Some(found) if *found == expected => continue,
            Some(found) => {
                return Err(MigrateError::Modified {
                    version: migration.version,
                    name: migration.name,
                    applied: found.clone(),
                    expected,
                })
            }
            None => {}
        }
        apply_one(client, migration, &expected).await?;
        newly_applied.push(migration.version);
    }
    Ok(newly_applied)
}

async fn apply_one(
    client: &mut Client,
    migration: &Migration,
    checksum: &str,
) -> Result<(), MigrateError> {
    let failed = |source| MigrateError::Failed {
        version: migration.version,
        name: migration.name,
        source,
    };
    let tx = client.transaction().await?;
    tx.batch_execute(migration.sql).await.map_err(failed)?;
    tx.execute(
        "INSERT INTO ops.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
        &[&migration.version, &migration.name, &checksum],
    )
    .await?;
    tx.commit().await?;
    tracing::info!(
        migration.version = migration.version,
        migration.name = migration.name,
        "applied migration"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order_without_gaps() {
        for (index, migration) in MIGRATIONS.iter().enumerate() {
            assert_eq!(migration.version, index as i32 + 1, "{}", migration.name);
        }
    }
}
