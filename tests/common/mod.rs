//! Shared helpers for integration tests: a fresh database per test on the PostgreSQL
//! server named by ODOOOPS_DATABASE_URL (scripts/test starts one on loopback).

#![allow(dead_code)]

pub mod agents;
pub mod child;
pub mod proxy;
pub mod runs;
pub mod wait;
pub mod workflows;

use std::path::Path;
use std::sync::Arc;

use odooops_agent::config::{RawConfig, Settings};
use tokio_postgres::{Client, NoTls};

/// The server's URL from ODOOOPS_DATABASE_URL, failing the test with set-up advice.
pub fn server_url() -> String {
    std::env::var("ODOOOPS_DATABASE_URL").expect(
        "ODOOOPS_DATABASE_URL is not set: run the tests through scripts/test, or source \
         .state/services.env after scripts/services",
    )
}

/// Replaces the database name in a postgres:// URL.
pub fn url_for_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let prefix_end = base.rfind('/').expect("URL has a path");
    let query = if query.contains("sslmode") {
        query
    } else if query.is_empty() {
        "?sslmode=disable".to_string()
    } else {
        format!("{query}&sslmode=disable")
    };
    format!("{}/{database}{query}", &base[..prefix_end])
}

pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|err| panic!("connecting to the test server failed: {err}"));
    tokio::spawn(connection);
    client
}

/// A database created for one test, with the ops schema migrated, dropped at the end.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let db = TestDb::empty().await;
        let (mut client, connection) = tokio_postgres::connect(&db.url, NoTls).await.unwrap();
        tokio::spawn(connection);
        odooops_agent::migrate::migrate(&mut client)
            .await
            .expect("migrating");
        db
    }

    /// A database without the ops schema.
    pub async fn empty() -> TestDb {
        let server = server_url();
        let name = format!("odooops_test_{}", uuid::Uuid::new_v4().simple());
        let admin = connect(&url_for_database(&server, "postgres")).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("creating the test database");
        TestDb {
            url: url_for_database(&server, &name),
            name,
        }
    }

    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    /// Agent settings for this database, from extra TOML (which must not set
    /// database.url).
    pub fn settings(&self, toml: &str) -> Arc<Settings> {
        let raw: RawConfig = toml::from_str(toml).expect("test config parses");
        Arc::new(
            raw.validate_with(Some(self.url.clone()))
                .expect("test config is valid"),
        )
    }

    /// Registers project `proj` with environments env-dev, env-staging and env-prod.
    pub async fn seed_project(&self) {
        self.client()
            .await
            .batch_execute(
                "INSERT INTO ops.projects (project_id) VALUES ('proj');
                 INSERT INTO ops.environments (env_id, project_id, env_type, db_name, config)
                 VALUES ('env-dev', 'proj', 'dev', 'odoo_dev', '{}'),
                        ('env-staging', 'proj', 'staging', 'odoo_staging', '{}'),
                        ('env-prod', 'proj', 'prod', 'odoo_prod', '{}');",
            )
            .await
            .expect("seeding the project");
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin_url = url_for_database(&server_url(), "postgres");
        // Drop runs outside any async context that could be awaited, so the database
        // is dropped from a thread with its own runtime.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let admin = connect(&admin_url).await;
                let _ = admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await;
            });
        })
        .join();
    }
}

pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}
