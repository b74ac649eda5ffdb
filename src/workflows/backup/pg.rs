//! Operations of backups and restores on the environment's PostgreSQL server. They run
//! pg_dump and psql, so they work the same from the host and inside a database container.

use serde_json::Value;
use tokio::io::AsyncReadExt;

use super::process::{PgRunner, Process, ProcessError};

/// Database the agent connects to for CREATE, DROP and ALTER DATABASE.
const MAINTENANCE_DB: &str = "postgres";

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(
        "invalid database name {0:?}: use 1 to 63 letters, digits, '_', '.' or '-', \
             starting with a letter or digit"
    )]
    InvalidName(String),
    #[error(
        "pg_dump {dump} is older than the server {server} running on {host}; install \
             pg_dump {server} or newer (for example postgresql-client-{server}) and set \
             pg_bin_dir, or run it in the database container with pg_tools = \"docker\""
    )]
    DumpTooOld {
        dump: u32,
        server: u32,
        host: String,
    },
    #[error("unexpected output from {program}: {output:?}")]
    Output { program: String, output: String },
}

/// Checks a database name: Odoo's own rule (letters, digits, '_', '.', '-'), which also
/// keeps the name from being read as an option or a connection string by the tools.
pub fn validate_db_name(name: &str) -> Result<(), PgError> {
    let valid = (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if valid {
        Ok(())
    } else {
        Err(PgError::InvalidName(name.to_string()))
    }
}

/// Quotes an SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes an SQL string literal (standard_conforming_strings is on since PostgreSQL 9.1).
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Extracts the major version from `pg_dump --version` output such as
/// "pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)".
pub fn parse_tool_major(output: &str) -> Option<u32> {
    let version = output
        .split_whitespace()
        .find(|word| word.starts_with(|c: char| c.is_ascii_digit()))?;
    version
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Major version of a server_version_num: 150018 is 15, and 90624 (9.6.24) is 9.
pub fn server_major(version_num: u32) -> u32 {
    version_num / 10_000
}

impl PgRunner {
    /// Runs a program to completion and returns its stdout.
    async fn output(&self, program: &str, args: &[String]) -> Result<String, PgError> {
        let mut process = self.spawn(program, args, false).await?;
        let mut stdout = process.stdout.take().expect("stdout is piped");
        let mut text = String::new();
        let read = stdout.read_to_string(&mut text).await;
        process.wait().await?;
        read.map_err(|err| PgError::Output {
            program: program.to_string(),
            output: err.to_string(),
        })?;
        Ok(text)
    }

    /// Major version of the pg_dump that backups use.
    pub async fn dump_major(&self) -> Result<u32, PgError> {
        let text = self.output("pg_dump", &["--version".to_string()]).await?;
        parse_tool_major(&text).ok_or(PgError::Output {
            program: "pg_dump --version".to_string(),
            output: text,
        })
    }

    /// Runs one statement with psql and returns its single value as JSON: the statement
    /// must return one row with one column (NULL becomes `Value::Null`).
    pub async fn query_json(&self, db: &str, sql: &str) -> Result<Value, PgError> {
        validate_db_name(db)?;
        let mut args = self.connection_args();
        args.extend(
            [
                "--no-psqlrc",
                "--quiet",
                "--no-align",
                "--tuples-only",
                "--set=ON_ERROR_STOP=1",
            ]
            .map(String::from),
        );
        args.push(format!("--dbname={db}"));
        args.push(format!("--command={sql}"));
        let text = self.output("psql", &args).await?;
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(trimmed).map_err(|_| PgError::Output {
            program: "psql".to_string(),
            output: trimmed.chars().take(500).collect(),
        })
    }

    /// Runs statements that return nothing of interest.
    pub async fn execute(&self, db: &str, sql: &str) -> Result<(), PgError> {
        self.query_json(db, &format!("{sql}; SELECT 'null'"))
            .await
            .map(|_| ())
    }

    /// server_version_num of the server.
    pub async fn server_version_num(&self) -> Result<u32, PgError> {
        let value = self
            .query_json(
                MAINTENANCE_DB,
                "SELECT current_setting('server_version_num')",
            )
            .await?;
        value.as_u64().map(|v| v as u32).ok_or(PgError::Output {
            program: "psql".to_string(),
            output: value.to_string(),
        })
    }

    /// Fails when pg_dump is older than the server: an older pg_dump refuses newer servers
    /// or, in older releases, writes dumps that miss newer features.
    pub async fn check_dump_version(&self) -> Result<(u32, u32), PgError> {
        let dump = self.dump_major().await?;
        let server = server_major(self.server_version_num().await?);
        if dump < server {
            return Err(PgError::DumpTooOld {
                dump,
                server,
                host: self.describe(),
            });
        }
        Ok((dump, server))
    }

    /// Starts a plain-format dump without ownership, as Odoo's database manager makes it.
    pub async fn start_dump(&self, db: &str) -> Result<Process, PgError> {
        validate_db_name(db)?;
        let mut args = self.connection_args();
        args.extend(["--format=plain", "--no-owner"].map(String::from));
        args.push(format!("--dbname={db}"));
        Ok(self.spawn("pg_dump", &args, false).await?)
    }

    /// Starts psql reading an SQL script from stdin into `db`, stopping at the first error.
    pub async fn start_script(&self, db: &str) -> Result<Process, PgError> {
        validate_db_name(db)?;
        let mut args = self.connection_args();
        args.extend(
            [
                "--no-psqlrc",
                "--quiet",
                "--set=ON_ERROR_STOP=1",
                "--output=/dev/null",
            ]
            .map(String::from),
        );
        args.push(format!("--dbname={db}"));
        Ok(self.spawn("psql", &args, true).await?)
    }

    pub async fn database_exists(&self, db: &str) -> Result<bool, PgError> {
        validate_db_name(db)?;
        let sql = format!(
            "SELECT to_json(EXISTS (SELECT 1 FROM pg_database WHERE datname = {}))",
            quote_literal(db)
        );
        Ok(self.query_json(MAINTENANCE_DB, &sql).await? == Value::Bool(true))
    }

    /// Creates an empty UTF-8 database from template0, as Odoo does.
    pub async fn create_database(&self, db: &str) -> Result<(), PgError> {
        validate_db_name(db)?;
        let sql = format!(
            "CREATE DATABASE {} ENCODING 'UTF8' TEMPLATE template0",
            quote_ident(db)
        );
        self.execute_alone(&sql).await
    }

    /// Drops a database, disconnecting its sessions first (PostgreSQL 13 and later).
    pub async fn drop_database(&self, db: &str) -> Result<(), PgError> {
        validate_db_name(db)?;
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(db));
        self.execute_alone(&sql).await
    }

    /// Renames a database after disconnecting its sessions.
    pub async fn rename_database(&self, from: &str, to: &str) -> Result<(), PgError> {
        validate_db_name(from)?;
        validate_db_name(to)?;
        let terminate = format!(
            "SELECT to_json(count(pg_terminate_backend(pid))) FROM pg_stat_activity \
             WHERE datname = {} AND pid <> pg_backend_pid()",
            quote_literal(from)
        );
        self.query_json(MAINTENANCE_DB, &terminate).await?;
        let sql = format!(
            "ALTER DATABASE {} RENAME TO {}",
            quote_ident(from),
            quote_ident(to)
        );
        self.execute_alone(&sql).await
    }

    /// Runs a statement that may not run inside a transaction block (CREATE or DROP
    /// DATABASE): psql sends a lone --command as one simple query.
    async fn execute_alone(&self, sql: &str) -> Result<(), PgError> {
        let mut args = self.connection_args();
        args.extend(["--no-psqlrc", "--quiet", "--set=ON_ERROR_STOP=1"].map(String::from));
        args.push(format!("--dbname={MAINTENANCE_DB}"));
        args.push(format!("--command={sql}"));
        self.output("psql", &args).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_major_version_is_parsed_from_version_output() {
        assert_eq!(
            parse_tool_major("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"),
            Some(15)
        );
        assert_eq!(parse_tool_major("pg_dump (PostgreSQL) 9.6.24"), Some(9));
        assert_eq!(parse_tool_major("pg_dump (PostgreSQL) 17beta1"), Some(17));
        assert_eq!(parse_tool_major("garbage"), None);
    }

    #[test]
    fn server_major_follows_both_numbering_schemes() {
        assert_eq!(server_major(150018), 15);
        assert_eq!(server_major(100023), 10);
        assert_eq!(server_major(90624), 9);
    }

    #[test]
    fn database_names_that_tools_could_misread_are_rejected() {
        for bad in [
            "",
            "-h",
            "a b",
            "db=x",
            "x;drop",
            "postgres://h/db",
            &"a".repeat(64),
        ] {
            assert!(validate_db_name(bad).is_err(), "{bad:?}");
        }
        for good in ["odoo_prod", "odoo-17.0", "A1"] {
            assert!(validate_db_name(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn identifiers_and_literals_double_their_quotes() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
