//! Fresh databases, connections and sample statistics shared by the benchmarks.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use odooops_agent::config::{RawConfig, Settings};
use tokio_postgres::{Client, NoTls};

/// Prefix of every database the benchmarks create, so a crashed run's leftovers can be
/// found and dropped by the next one.
pub const DB_PREFIX: &str = "odooops_bench_";

/// Replaces the database name in a postgres:// URL and turns TLS off (loopback only).
pub fn url_for_database(url: &str, database: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let base = &base[..base.rfind('/').map_or(base.len(), |slash| slash)];
    let mut params: Vec<&str> = query
        .split('&')
        .filter(|param| !param.is_empty() && !param.starts_with("sslmode="))
        .collect();
    params.push("sslmode=disable");
    format!("{base}/{database}?{}", params.join("&"))
}

pub async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .context("connecting to the benchmark server failed")?;
    tokio::spawn(connection);
    Ok(client)
}

/// Drops the databases left behind by an earlier benchmark run that did not finish.
pub async fn drop_leftover_databases(server: &str) -> anyhow::Result<()> {
    let admin = connect(&url_for_database(server, "postgres")).await?;
    let pattern = format!("{DB_PREFIX}%");
    let rows = admin
        .query(
            "SELECT datname FROM pg_database WHERE datname LIKE $1",
            &[&pattern],
        )
        .await?;
    for row in rows {
        let name: String = row.get(0);
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
            .with_context(|| format!("dropping leftover database {name} failed"))?;
    }
    Ok(())
}

/// A database created for one benchmark. Call [`BenchDb::drop`] when done.
pub struct BenchDb {
    pub name: String,
    pub url: String,
    admin_url: String,
}

impl BenchDb {
    /// Creates an empty database.
    pub async fn empty(server: &str, label: &str) -> anyhow::Result<BenchDb> {
        let name = format!("{DB_PREFIX}{label}_{}", std::process::id());
        let admin_url = url_for_database(server, "postgres");
        let admin = connect(&admin_url).await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("creating database {name} failed"))?;
        Ok(BenchDb {
            url: url_for_database(server, &name),
            name,
            admin_url,
        })
    }

    /// Creates a database with the ops schema migrated and project `proj` registered with
    /// environment `env-dev`.
    pub async fn migrated(server: &str, label: &str) -> anyhow::Result<BenchDb> {
        let db = BenchDb::empty(server, label).await?;
        let mut client = db.client().await?;
        odooops_agent::migrate::migrate(&mut client).await?;
        client
            .batch_execute(
                "INSERT INTO ops.projects (project_id) VALUES ('proj');
                 INSERT INTO ops.environments (env_id, project_id, env_type, db_name)
                 VALUES ('env-dev', 'proj', 'dev', 'odoo_dev');",
            )
            .await
            .context("registering the benchmark project failed")?;
        Ok(db)
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        connect(&self.url).await
    }

    /// Agent settings for this database from extra TOML, which must not set
    /// database.url.
    pub fn settings(&self, toml: &str) -> anyhow::Result<Arc<Settings>> {
        let raw: RawConfig = toml::from_str(toml).context("benchmark config is invalid")?;
        Ok(Arc::new(raw.validate_with(Some(self.url.clone()))?))
    }

    pub async fn drop(self) -> anyhow::Result<()> {
        let admin = connect(&self.admin_url).await?;
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .with_context(|| format!("dropping database {} failed", self.name))?;
        Ok(())
    }
}

/// Milliseconds from `from` to `to`, negative when `to` came first.
pub fn millis_between(from: Instant, to: Instant) -> f64 {
    if to >= from {
        (to - from).as_secs_f64() * 1e3
    } else {
        -(from - to).as_secs_f64() * 1e3
    }
}

pub fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// Latency samples in milliseconds.
#[derive(Debug, Clone)]
pub struct Samples {
    sorted: Vec<f64>,
}

impl Samples {
    pub fn new(mut values: Vec<f64>) -> Samples {
        values.sort_by(f64::total_cmp);
        Samples { sorted: values }
    }

    pub fn values(&self) -> &[f64] {
        &self.sorted
    }

    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// Nearest-rank percentile; NaN when there are no samples.
    pub fn percentile(&self, percent: f64) -> f64 {
        if self.sorted.is_empty() {
            return f64::NAN;
        }
        let rank = (percent / 100.0 * self.sorted.len() as f64).ceil() as usize;
        self.sorted[rank.clamp(1, self.sorted.len()) - 1]
    }
}

/// Returns the median of a few repeated measurements.
pub fn median(values: &[f64]) -> f64 {
    Samples::new(values.to_vec()).percentile(50.0)
}
