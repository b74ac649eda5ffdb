//! Throwaway databases for test runs.
//!
//! Each test run gets a new role and a database it owns on the configured server, with a
//! random password, so the admin credentials never reach the test container. Both are
//! dropped afterwards, also when the run fails or is cancelled.

use std::time::Duration;

use anyhow::Context;
use tokio_postgres::Client;

use crate::config::TestDatabaseSettings;
use crate::secret::Secret;

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
    /// Creates the role and the database.
    pub async fn create(settings: &TestDatabaseSettings) -> anyhow::Result<TestDatabase> {
        tokio::time::timeout(STATEMENT_TIMEOUT, Self::create_now(settings))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "creating the test database took over {} s",
                    STATEMENT_TIMEOUT.as_secs()
                )
            })?
    }

    async fn create_now(settings: &TestDatabaseSettings) -> anyhow::Result<TestDatabase> {
        let name = format!(
            "odooops_build_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
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

async fn connect(admin_url: &Secret) -> anyhow::Result<Client> {
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
