//! Connections to the control plane database.
//!
//! The URL is a [`Secret`]: it usually carries a password, so only [`describe`] output
//! (host, port, database, user) ever reaches a log line or an error message.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_postgres::config::Host;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::DatabaseSettings;
use crate::secret::Secret;

/// Parses a PostgreSQL URL or key=value connection string. The error never repeats
/// the input.
///
/// TLS certificates are always verified against the system's CA store. A server on
/// loopback or a Unix socket, whose URL does not set sslmode, is reached without TLS:
/// local servers usually have a self-signed certificate, and the traffic never leaves
/// the machine.
pub fn parse_url(url: &Secret) -> Result<tokio_postgres::Config, String> {
    let mut config = tokio_postgres::Config::from_str(url.expose())
        .map_err(|err| format!("not a PostgreSQL connection string: {err}"))?;
    if !url.expose().contains("sslmode") && is_local(&config) {
        config.ssl_mode(tokio_postgres::config::SslMode::Disable);
    }
    Ok(config)
}

fn is_local(config: &tokio_postgres::Config) -> bool {
    let hosts = config.get_hosts();
    !hosts.is_empty()
        && hosts.iter().all(|host| match host {
            Host::Unix(_) => true,
            Host::Tcp(name) => {
                name == "localhost"
                    || name
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
        })
}

/// Describes where a connection goes, without the password.
pub fn describe(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(host)) => host.clone(),
        Some(Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{host}:{port}/{} as {}",
        config.get_dbname().unwrap_or("(default database)"),
        config.get_user().unwrap_or("(default user)")
    )
}

/// A TLS connector trusting the system's certificate store. Supabase and other hosted
/// servers require TLS; `sslmode=disable` in the URL turns it off for loopback servers.
pub fn tls() -> MakeRustlsConnect {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A certificate the store cannot parse is skipped; the others still verify.
        let _ = roots.add(cert);
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the aws-lc-rs provider supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    MakeRustlsConnect::new(config)
}

/// Idle time before the first TCP keepalive probe, then the gap between probes and how
/// many may go unanswered: a silent server is found within about 25 seconds.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_RETRIES: u32 = 3;
/// Sent data that stays unacknowledged this long aborts the connection (Linux
/// TCP_USER_TIMEOUT), so a query to a server behind a dead network fails instead of
/// waiting for the kernel's default of about 15 minutes.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Applies the connect timeout and the dead-peer detection every connection uses.
fn tune(config: &mut tokio_postgres::Config, settings: &DatabaseSettings) {
    config.connect_timeout(settings.connect_timeout);
    config.keepalives_idle(KEEPALIVE_IDLE);
    config.keepalives_interval(KEEPALIVE_INTERVAL);
    config.keepalives_retries(KEEPALIVE_RETRIES);
    config.tcp_user_timeout(TCP_USER_TIMEOUT);
}

/// Builds the connection pool. Connections open lazily, so an unreachable server is
/// reported by the first query, not here.
pub fn pool(settings: &DatabaseSettings) -> Result<Pool, String> {
    let mut config = parse_url(&settings.url)?;
    tune(&mut config, settings);
    if config.get_application_name().is_none() {
        config.application_name("odooops-agent");
    }
    let manager = Manager::from_config(
        config,
        tls(),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(settings.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(settings.connect_timeout))
        .create_timeout(Some(settings.connect_timeout))
        .build()
        .map_err(|err| format!("building the connection pool failed: {err}"))
}

/// A connection that is not yet driven by a task of its own.
pub type Connection = tokio_postgres::Connection<
    tokio_postgres::Socket,
    <MakeRustlsConnect as MakeTlsConnect<tokio_postgres::Socket>>::Stream,
>;

/// Opens one connection outside the pool (LISTEN and the migration lock need their own
/// session). The connection task runs on its own until the client is dropped.
pub async fn connect(
    settings: &DatabaseSettings,
    application_name: &str,
) -> Result<(tokio_postgres::Client, Connection), tokio_postgres::Error> {
    let mut config = parse_url(&settings.url).expect("validated with the config");
    tune(&mut config, settings);
    config.application_name(application_name);
    config.connect(tls()).await
}

/// SQLSTATE raised by the ops functions when the caller no longer holds a run's lease.
pub const LEASE_LOST: &str = "OPL01";
/// SQLSTATE raised by the ops functions for a run id that does not exist.
pub const RUN_NOT_FOUND: &str = "OPN01";

/// Returns the SQLSTATE of a database error, if the server sent one.
pub fn sqlstate(err: &tokio_postgres::Error) -> Option<&str> {
    err.as_db_error().map(|db| db.code().code())
}

/// Tells whether retrying may succeed: the server could not be reached, the connection
/// broke, or the server reported a passing condition (SQLSTATE classes 08 connection,
/// 40 deadlock or serialization failure, 53 insufficient resources, 57 shutdown or
/// cancel, 58 system error). Anything else is the server rejecting the statement.
pub fn is_transient(err: &tokio_postgres::Error) -> bool {
    if err.is_closed() {
        return true;
    }
    match err.as_db_error() {
        None => true,
        Some(db) => matches!(&db.code().code()[..2], "08" | "40" | "53" | "57" | "58"),
    }
}

/// Failure of a call raced against a timeout.
#[derive(Debug)]
pub enum CallError {
    Database(tokio_postgres::Error),
    /// No reply within the limit.
    TimedOut(Duration),
}

/// Returns the result of a call on `client` raced with `tokio::time::timeout(limit, ...)`.
/// A connection that did not reply in time is closed instead of going back to the pool,
/// because a later call on it would queue behind the lost one.
pub fn check_answer<T>(
    client: Object,
    outcome: Result<Result<T, tokio_postgres::Error>, tokio::time::error::Elapsed>,
    limit: Duration,
) -> Result<T, CallError> {
    match outcome {
        Ok(result) => result.map_err(CallError::Database),
        Err(_) => {
            drop(Object::take(client));
            Err(CallError::TimedOut(limit))
        }
    }
}
