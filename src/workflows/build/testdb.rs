//! Throwaway databases for test runs.
//!
//! Each test run gets a new role and a database it owns on the configured server, with a
//! random password, so the admin credentials never reach the test container. Both are
//! dropped afterwards, also when the run fails or is cancelled.
//!
//! Both are named `odooops_build_<run id>_<claim tag>` (see [`crate::queue::claim_tag`]).
//! An agent killed during the tests cannot drop them, and the name is all that is needed
//! to find them later: it tells which run and which claim of it a database belongs to,
//! with nothing to record first that a crash could lose. The next claim of the run drops
//! those of its earlier claims before creating its own, and the agent's sweep drops those
//! of runs that stopped (see the `sweep` module).

use std::time::Duration;

use anyhow::Context;
use tokio_postgres::Client;
use uuid::Uuid;

use crate::config::TestDatabaseSettings;
use crate::queue::Lease;
use crate::secret::Secret;

/// Start of every test database and role name.
const NAME_PREFIX: &str = "odooops_build_";

/// Returns the name of the test database and role of one claim of a run. It stays within
/// PostgreSQL's 63-byte limit for identifiers: 14 + 32 + 1 + 8 bytes.
pub fn database_name(run_id: Uuid, claim_tag: &str) -> String {
    format!("{NAME_PREFIX}{}_{claim_tag}", run_id.simple())
}

/// Returns the run id and claim tag in a test database name, or `None` for any other
/// name, including test databases named before the name carried the run.
pub fn parse_database_name(name: &str) -> Option<(Uuid, &str)> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let (run, tag) = rest.split_once('_')?;
    // Lowercase only: PostgreSQL folds an unquoted name to lowercase, so an uppercase
    // name would not be the database that the statements address.
    let hex = |text: &str| text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if run.len() != 32 || tag.len() != 8 || !hex(run) || !hex(tag) {
        return None;
    }
    Some((Uuid::try_parse(run).ok()?, tag))
}

/// A database and its owner role, dropped by [`TestDatabase::drop_now`] or, failing that,
/// when the value is dropped.
pub struct TestDatabase {
    admin_url: Secret,
    /// Also the role's name.
    pub name: String,
    password: Secret,
    pub host: String,
    pub port: u16,
    dropped: bool,
}

impl TestDatabase {
    /// Drops what earlier claims of the lease's run left, then creates the role and the
    /// database of this claim.
    pub async fn create(
        settings: &TestDatabaseSettings,
        lease: Lease,
    ) -> anyhow::Result<TestDatabase> {
        tokio::time::timeout(STATEMENT_TIMEOUT, Self::create_now(settings, lease))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "creating the test database took over {} s",
                    STATEMENT_TIMEOUT.as_secs()
                )
            })?
    }

    async fn create_now(
        settings: &TestDatabaseSettings,
        lease: Lease,
    ) -> anyhow::Result<TestDatabase> {
        let name = database_name(lease.run_id, &lease.tag());
        let password = Secret::new(format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        ));
        let database = TestDatabase {
            admin_url: settings.admin_url.clone(),
            name,
            password,
            host: settings.host.clone(),
            port: settings.port,
            dropped: false,
        };
        let admin = connect(&database.admin_url).await?;
        // This claim holds the run's lease, so a database of the run that exists now was
        // made by an earlier claim whose agent died before dropping it.
        let earlier = list_names(&admin, &database_name(lease.run_id, "")).await?;
        for leftover in earlier
            .iter()
            .filter(|name| parse_database_name(name).is_some())
        {
            tracing::warn!(database = %leftover, "dropping a test database of an earlier claim");
            drop_with(&admin, leftover).await?;
        }
        // The name and password are generated hex, so they are safe inside the statement;
        // CREATE ROLE and CREATE DATABASE take no parameters.
        admin
            .batch_execute(&format!(
                "CREATE ROLE {name} LOGIN PASSWORD '{password}'",
                name = database.name,
                password = database.password.expose()
            ))
            .await
            .with_context(|| format!("creating test role {} failed", database.name))?;
        admin
            .batch_execute(&format!("CREATE DATABASE {0} OWNER {0}", database.name))
            .await
            .with_context(|| format!("creating test database {} failed", database.name))?;
        Ok(database)
    }

    /// Arguments that point Odoo at this database.
    // NOTE: the password is an argument because Odoo reads no password from its
    // environment, so `docker inspect` shows it while the test container exists. It
    // belongs to a role that owns only this database and is dropped after the tests.
    pub fn odoo_args(&self) -> Vec<String> {
        [
            "--database",
            &self.name,
            "--db_host",
            &self.host,
            "--db_port",
            &self.port.to_string(),
            "--db_user",
            &self.name,
            "--db_password",
            self.password.expose(),
        ]
        .iter()
        .map(|arg| arg.to_string())
        .collect()
    }

    /// Returns the password, for removing it from anything shown to users.
    pub fn password(&self) -> &Secret {
        &self.password
    }

    /// Drops the database, closing any connection left to it, then the role.
    pub async fn drop_now(mut self) -> anyhow::Result<()> {
        self.dropped = true;
        drop_database(&self.admin_url, &self.name).await
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        // Reached when the run's future was dropped before it could drop the database.
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(err) = drop_database(&admin_url, &name).await {
                    tracing::error!(database = %name, error = %format!("{err:#}"),
                        "dropping test database failed");
                }
            });
        }
    }
}

/// Maximum wait for creating or dropping a test database. PostgreSQL waits for locks
/// (such as another session on template1) instead of failing.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Returns the names of the test databases and roles on the server that start with
/// `prefix`. A role is listed too when its database is gone, as after a crash between
/// CREATE ROLE and CREATE DATABASE.
async fn list_names(admin: &Client, prefix: &str) -> anyhow::Result<Vec<String>> {
    let rows = admin
        .query(
            "SELECT datname::text FROM pg_database WHERE starts_with(datname, $1)
             UNION SELECT rolname::text FROM pg_roles WHERE starts_with(rolname, $1)",
            &[&prefix],
        )
        .await
        .context("listing test databases failed")?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Returns every test database and role name on the server.
pub async fn list_all(admin: &Client) -> anyhow::Result<Vec<String>> {
    list_names(admin, NAME_PREFIX).await
}

pub async fn connect(admin_url: &Secret) -> anyhow::Result<Client> {
    let config = crate::db::parse_url(admin_url).map_err(anyhow::Error::msg)?;
    let target = crate::db::describe(&config);
    let (client, connection) = config
        .connect(crate::db::tls())
        .await
        .with_context(|| format!("connecting to the test database server {target} failed"))?;
    tokio::spawn(connection);
    Ok(client)
}

async fn drop_database(admin_url: &Secret, name: &str) -> anyhow::Result<()> {
    tokio::time::timeout(STATEMENT_TIMEOUT, drop_database_now(admin_url, name))
        .await
        .map_err(|_| {
            let secs = STATEMENT_TIMEOUT.as_secs();
            anyhow::anyhow!("dropping test database {name} took over {secs} s")
        })?
}

async fn drop_database_now(admin_url: &Secret, name: &str) -> anyhow::Result<()> {
    let admin = connect(admin_url).await?;
    drop_with(&admin, name).await
}

/// Drops the database `name`, closing any connection left to it, then the role. Any
/// name other than one of [`database_name`]'s is rejected, because DROP takes no
/// parameters and the name goes into the statement.
pub async fn drop_with(admin: &Client, name: &str) -> anyhow::Result<()> {
    if parse_database_name(name).is_none() {
        anyhow::bail!("{name:?} is not a test database name; it was not dropped");
    }
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .with_context(|| format!("dropping test database {name} failed"))?;
    admin
        .batch_execute(&format!("DROP ROLE IF EXISTS {name}"))
        .await
        .with_context(|| format!("dropping test role {name} failed"))?;
    Ok(())
}
