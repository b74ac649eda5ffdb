#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use odooops_agent::agent::{self, Mode, Shutdown};
use odooops_agent::config::{ConfigError, RawConfig, Settings};
use odooops_agent::queue::db_error_text;
use odooops_agent::workflows::restore::command::{self as restore_command, RestoreOptions};
use odooops_agent::workflows::Workflows;
use odooops_agent::{db, docker, logging, migrate};

/// Prints a line to stdout, ignoring a closed pipe (`odooops-agent check | head -1`),
/// where println! would panic.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Exit status for a bad config or command line (EX_USAGE from sysexits.h).
const EXIT_USAGE: u8 = 64;
/// Exit status when the database or Docker engine cannot be reached (EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;
const DEFAULT_CONFIG: &str = "/etc/odooops/agent.toml";
/// Next step for a database that cannot be reached.
const UNREACHABLE_HINT: &str =
    "check that PostgreSQL is running and that database.url or ODOOOPS_DATABASE_URL names it";

/// Executes builds, deploys and backups queued in the ops control plane.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply pending control plane migrations, then exit.
    Migrate {
        /// Config file. Optional when ODOOOPS_DATABASE_URL is set.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run the agent until SIGTERM or SIGINT.
    Run {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Process claimable runs until none is left, then exit.
        #[arg(long)]
        once: bool,
    },
    /// Restore a backup into a new database, verified (and neutralized outside prod).
    Restore {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Environment whose database server and data directory receive the restore.
        #[arg(long)]
        env: String,
        /// Backup to restore; by default the newest successful backup of --from-env.
        #[arg(long)]
        backup_id: Option<uuid::Uuid>,
        /// Environment whose newest backup is restored; by default --env.
        #[arg(long)]
        from_env: Option<String>,
        /// Database to create; by default <db_name>_restored_<UTC time>.
        #[arg(long)]
        target_db: Option<String>,
        /// Replace --target-db if it exists (its database and filestore are dropped).
        #[arg(long)]
        overwrite: bool,
        /// Neutralize a restore into production too; other environments always are.
        #[arg(long)]
        neutralize: bool,
        /// With --overwrite, allow replacing the environment's live database (its
        /// db_name), which a queued restore does only with the environment's approvals.
        #[arg(long)]
        replace_live: bool,
    },
    /// Validate the config and check that the database and Docker engine respond.
    Check {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("starting the tokio runtime failed");
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(err)) => {
            eprintln!("odooops-agent: {err}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Unavailable(err)) => {
            eprintln!("odooops-agent: {err:#}");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
        Err(Failure::Other(err)) => {
            eprintln!("odooops-agent: {err:#}");
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    Config(ConfigError),
    Unavailable(anyhow::Error),
    Other(anyhow::Error),
}

impl From<ConfigError> for Failure {
    fn from(err: ConfigError) -> Self {
        Failure::Config(err)
    }
}

async fn dispatch(command: Command) -> Result<(), Failure> {
    match command {
        Command::Migrate { config } => {
            let settings = load_for_migrate(config.as_deref())?;
            logging::init(&settings.log);
            run_migrations(&settings).await
        }
        Command::Run { config, once } => {
            let settings = Settings::load(&config)?;
            logging::init(&settings.log);
            let mode = if once { Mode::Once } else { Mode::Daemon };
            let shutdown = Shutdown::default();
            shutdown.on_signals().map_err(|err| {
                Failure::Other(anyhow::anyhow!("installing signal handlers failed: {err}"))
            })?;
            agent::run(Arc::new(settings), Workflows::standard(), mode, shutdown)
                .await
                .map(|_| ())
                .map_err(Failure::Other)
        }
        Command::Restore {
            config,
            env,
            backup_id,
            from_env,
            target_db,
            overwrite,
            neutralize,
            replace_live,
        } => {
            let settings = Settings::load(&config)?;
            logging::init(&settings.log);
            let options = RestoreOptions {
                env,
                backup_id,
                from_env,
                target_db,
                overwrite,
                neutralize,
                replace_live,
            };
            let shutdown = Shutdown::default();
            shutdown.on_signals().map_err(|err| {
                Failure::Other(anyhow::anyhow!("installing signal handlers failed: {err}"))
            })?;
            let report = restore_command::run(Arc::new(settings), options, shutdown.drain)
                .await
                .map_err(Failure::Other)?;
            let text = serde_json::to_string_pretty(&report).expect("a report serializes");
            out!("{text}");
            Ok(())
        }
        Command::Check { config } => {
            let settings = Settings::load(&config)?;
            check(&settings).await
        }
    }
}

/// `migrate` needs only a database URL, so the config file may be absent when
/// ODOOOPS_DATABASE_URL is set.
fn load_for_migrate(config: Option<&Path>) -> Result<Settings, ConfigError> {
    match config {
        Some(path) => Settings::load(path),
        None => RawConfig::default().validate(),
    }
}

async fn run_migrations(settings: &Settings) -> Result<(), Failure> {
    let target = describe(settings)?;
    let (mut client, connection) = db::connect(&settings.database, "odooops-agent-migrate")
        .await
        .map_err(|err| {
            Failure::Unavailable(anyhow::anyhow!(
                "connecting to {target} failed: {}; {UNREACHABLE_HINT}",
                db_error_text(&err)
            ))
        })?;
    tokio::spawn(connection);
    let applied = migrate::migrate(&mut client)
        .await
        .map_err(|err| Failure::Other(anyhow::anyhow!("{err}")))?;
    if applied.is_empty() {
        out!("{target}: schema is up to date");
    } else {
        out!("{target}: applied migrations {applied:?}");
    }
    Ok(())
}

fn describe(settings: &Settings) -> Result<String, Failure> {
    let config = db::parse_url(&settings.database.url)
        .map_err(|reason| Failure::Other(anyhow::anyhow!(reason)))?;
    Ok(db::describe(&config))
}

async fn check(settings: &Settings) -> Result<(), Failure> {
    out!("config: ok (worker {})", settings.agent.worker_id);

    let target = describe(settings)?;
    let (client, connection) = db::connect(&settings.database, "odooops-agent-check")
        .await
        .map_err(|err| {
            Failure::Unavailable(anyhow::anyhow!(
                "database {target}: {}; {UNREACHABLE_HINT}",
                db_error_text(&err)
            ))
        })?;
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT (SELECT max(version) FROM ops.schema_migrations) AS version",
            &[],
        )
        .await
        .map_err(|err| {
            Failure::Unavailable(anyhow::anyhow!(
                "database {target}: reading ops.schema_migrations failed: {}; \
                 run `odooops-agent migrate` first",
                db_error_text(&err)
            ))
        })?;
    let version: Option<i32> = row.get(0);
    let expected = migrate::MIGRATIONS.last().map(|m| m.version);
    if version != expected {
        return Err(Failure::Unavailable(anyhow::anyhow!(
            "database {target}: schema version {}, this agent needs {}; run \
             `odooops-agent migrate` (a newer schema needs a newer agent)",
            version.unwrap_or(0),
            expected.unwrap_or(0)
        )));
    }
    out!(
        "database: ok ({target}, schema version {})",
        version.unwrap_or(0)
    );
    check_environments(settings, &client).await?;

    let engine = tokio::time::timeout(DOCKER_CHECK_TIMEOUT, docker_version(settings))
        .await
        .map_err(|_| {
            Failure::Unavailable(anyhow::anyhow!(
                "Docker engine at {} did not respond within {} s",
                docker::address(&settings.docker),
                DOCKER_CHECK_TIMEOUT.as_secs()
            ))
        })??;
    out!("docker: ok ({engine})");
    Ok(())
}

/// Maximum wait for the Docker engine in `check`, because an engine that accepts
/// connections but does not respond must not hang the command.
const DOCKER_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Connects to the engine and describes its version and the negotiated API version.
async fn docker_version(settings: &Settings) -> Result<String, Failure> {
    let engine = docker::connect(&settings.docker)
        .await
        .map_err(|err| Failure::Unavailable(err.into()))?;
    let version = engine
        .version()
        .await
        .map_err(|err| Failure::Unavailable(anyhow::anyhow!("Docker engine: {err}")))?;
    Ok(format!(
        "engine {}, API {}",
        version.version.unwrap_or_default(),
        engine.client_version()
    ))
}

/// Fails when agent.environments names an environment that ops.environments lacks: the
/// agent would wait for runs that can never be queued.
async fn check_environments(
    settings: &Settings,
    client: &tokio_postgres::Client,
) -> Result<(), Failure> {
    let configured = &settings.agent.environments;
    if configured.is_empty() {
        out!("environments: all");
        return Ok(());
    }
    let rows = client
        .query(
            "SELECT env_id FROM ops.environments WHERE env_id = ANY($1)",
            &[configured],
        )
        .await
        .map_err(|err| {
            Failure::Unavailable(anyhow::anyhow!(
                "reading ops.environments failed: {}",
                db_error_text(&err)
            ))
        })?;
    let known: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
    let unknown: Vec<&String> = configured.iter().filter(|id| !known.contains(id)).collect();
    if !unknown.is_empty() {
        return Err(Failure::Config(ConfigError::invalid(
            "agent.environments",
            format!("{unknown:?}"),
            "not in ops.environments; use env_id values from that table",
        )));
    }
    out!("environments: ok ({})", known.join(", "));
    Ok(())
}
