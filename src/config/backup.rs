//! The `[backup]` section: how each environment's database and filestore are reached,
//! when backups and restore drills run, and how long backups are kept.
//!
//! `[backup.default]` applies to every environment; `[backup.environments.<env_id>]`
//! overrides it key by key.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use super::{secret, ConfigError};
use crate::secret::Secret;

/// Deflate level 1 compresses pg_dump's text about 5:1 at several times the speed of
/// level 6, which gains only a few percent more.
pub const DEFAULT_COMPRESSION_LEVEL: u32 = 1;
/// Staging and prod are backed up daily at 02:00 UTC unless configured otherwise.
pub const DEFAULT_SCHEDULE: &str = "0 0 2 * * *";
/// The official Odoo image keeps its data (and the filestore) there.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/odoo";
/// Odoo's usual database role.
pub const DEFAULT_DB_USER: &str = "odoo";
pub const DEFAULT_DB_PORT: u16 = 5432;
/// A week of daily backups covers most "it broke a few days ago" requests.
pub const DEFAULT_KEEP_DAILY: u32 = 7;
pub const DEFAULT_KEEP_WEEKLY: u32 = 4;
pub const DEFAULT_KEEP_MONTHLY: u32 = 3;
/// Manual backups are usually taken before a risky change and outlive it by weeks.
pub const DEFAULT_MANUAL_KEEP_DAYS: u32 = 30;
/// A pre-deploy backup matters until the deploy has proven itself.
pub const DEFAULT_PRE_DEPLOY_KEEP_DAYS: u32 = 14;
/// Failed backups leave no object, only a row worth keeping for a while to diagnose.
pub const DEFAULT_FAILED_KEEP_DAYS: u32 = 30;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackup {
    pub compression_level: Option<u32>,
    #[serde(default)]
    pub default: RawBackupEnv,
    #[serde(default)]
    pub environments: BTreeMap<String, RawBackupEnv>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackupEnv {
    /// "host" runs the host's pg_dump and psql; "docker" runs them in `container`.
    pub pg_tools: Option<String>,
    pub container: Option<String>,
    pub pg_bin_dir: Option<PathBuf>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub password_env: Option<String>,
    pub password_file: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub schedules: Option<Vec<RawSchedule>>,
    pub drill_schedule: Option<String>,
    pub retention: Option<RawRetention>,
    pub odoo_container: Option<String>,
    pub odoo_neutralize: Option<bool>,
    pub filestore_owner: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSchedule {
    pub cron: String,
    pub backup_type: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetention {
    pub daily: Option<u32>,
    pub weekly: Option<u32>,
    pub monthly: Option<u32>,
    pub manual_days: Option<u32>,
    pub pre_deploy_days: Option<u32>,
    pub failed_days: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct BackupSettings {
    /// Deflate level, 1 (fastest) to 9.
    pub compression_level: u32,
    pub default: EnvBackupSettings,
    pub environments: BTreeMap<String, EnvBackupSettings>,
}

impl BackupSettings {
    /// Settings for one environment: its own section, or the defaults.
    pub fn for_env(&self, env_id: &str) -> &EnvBackupSettings {
        self.environments.get(env_id).unwrap_or(&self.default)
    }
}

/// Location of pg_dump and psql: the host or a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgTools {
    /// The host's binaries, from `bin_dir` or the PATH.
    Host { bin_dir: Option<PathBuf> },
    /// `docker exec` into the database container.
    Docker { container: String },
}

#[derive(Debug, Clone)]
pub struct PgConnection {
    pub tools: PgTools,
    /// `None` uses the tools' default (the local socket).
    pub host: Option<String>,
    pub port: u16,
    pub user: String,
    pub password: Option<Secret>,
}

#[derive(Debug, Clone)]
pub struct EnvBackupSettings {
    pub pg: PgConnection,
    /// Odoo's data directory; the filestore of database D is `<data_dir>/filestore/D`.
    pub data_dir: PathBuf,
    /// `None` means the default: daily at 02:00 UTC for staging and prod, none for dev.
    pub schedules: Option<Vec<BackupSchedule>>,
    pub drill_schedule: Option<CronSchedule>,
    pub retention: Retention,
    /// Container of the environment's Odoo image in which `odoo neutralize` runs after a
    /// non-production restore; `None` skips that step.
    pub odoo_container: Option<String>,
    pub odoo_neutralize: bool,
    /// uid and gid given to restored filestore files; `None` keeps the agent's own.
    pub filestore_owner: Option<(u32, u32)>,
}

/// A parsed cron expression with the text it came from.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    pub expression: String,
    pub schedule: cron::Schedule,
}

#[derive(Debug, Clone)]
pub struct BackupSchedule {
    pub cron: CronSchedule,
    pub backup_type: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    pub manual: Duration,
    pub pre_deploy: Duration,
    pub failed: Duration,
}

impl RawBackup {
    pub fn validate(self) -> Result<BackupSettings, ConfigError> {
        let compression_level = self.compression_level.unwrap_or(DEFAULT_COMPRESSION_LEVEL);
        if !(1..=9).contains(&compression_level) {
            return Err(ConfigError::invalid(
                "backup.compression_level",
                compression_level,
                "must be between 1 (fastest) and 9 (smallest)",
            ));
        }
        let default = self.default.clone().validate("backup.default")?;
        let mut environments = BTreeMap::new();
        for (env_id, raw) in self.environments {
            let prefix = format!("backup.environments.{env_id}");
            let merged = raw.or(self.default.clone());
            environments.insert(env_id, merged.validate(&prefix)?);
        }
        Ok(BackupSettings {
            compression_level,
            default,
            environments,
        })
    }
}

impl RawBackupEnv {
    /// Fills every key missing here from `fallback`.
    fn or(self, fallback: RawBackupEnv) -> RawBackupEnv {
        let has_password =
            self.password.is_some() || self.password_env.is_some() || self.password_file.is_some();
        let (password, password_env, password_file) = if has_password {
            (self.password, self.password_env, self.password_file)
        } else {
            (
                fallback.password,
                fallback.password_env,
                fallback.password_file,
            )
        };
        RawBackupEnv {
            pg_tools: self.pg_tools.or(fallback.pg_tools),
            container: self.container.or(fallback.container),
            pg_bin_dir: self.pg_bin_dir.or(fallback.pg_bin_dir),
            host: self.host.or(fallback.host),
            port: self.port.or(fallback.port),
            user: self.user.or(fallback.user),
            password,
            password_env,
            password_file,
            data_dir: self.data_dir.or(fallback.data_dir),
            schedules: self.schedules.or(fallback.schedules),
            drill_schedule: self.drill_schedule.or(fallback.drill_schedule),
            retention: merge_retention(self.retention, fallback.retention),
            odoo_container: self.odoo_container.or(fallback.odoo_container),
            odoo_neutralize: self.odoo_neutralize.or(fallback.odoo_neutralize),
            filestore_owner: self.filestore_owner.or(fallback.filestore_owner),
        }
    }

    fn validate(self, prefix: &str) -> Result<EnvBackupSettings, ConfigError> {
        let key = |name: &str| format!("{prefix}.{name}");
        let data_dir = self.data_dir.unwrap_or_else(|| DEFAULT_DATA_DIR.into());
        if !data_dir.is_absolute() {
            return Err(ConfigError::invalid(
                &key("data_dir"),
                data_dir.display(),
                "must be an absolute path",
            ));
        }
        let schedules = match self.schedules {
            None => None,
            Some(list) => Some(
                list.into_iter()
                    .map(|raw| raw.validate(&key("schedules")))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let drill_schedule = match self.drill_schedule {
            Some(text) => Some(parse_cron(&key("drill_schedule"), &text)?),
            None => None,
        };
        let password_key = key("password");
        let password = secret(
            &password_key,
            &self.password,
            &self.password_env,
            &self.password_file,
        )?;
        let pg = PgConnection {
            tools: pg_tools(
                &key("pg_tools"),
                self.pg_tools,
                self.container,
                self.pg_bin_dir,
            )?,
            host: self.host.filter(|host| !host.is_empty()),
            port: self.port.unwrap_or(DEFAULT_DB_PORT),
            user: self.user.unwrap_or_else(|| DEFAULT_DB_USER.to_string()),
            password,
        };
        Ok(EnvBackupSettings {
            pg,
            data_dir,
            schedules,
            drill_schedule,
            retention: self.retention.unwrap_or_default().validate(),
            odoo_neutralize: self
                .odoo_neutralize
                .unwrap_or(self.odoo_container.is_some()),
            odoo_container: self.odoo_container.filter(|name| !name.is_empty()),
            filestore_owner: match self.filestore_owner {
                Some(text) => Some(parse_owner(&key("filestore_owner"), &text)?),
                None => None,
            },
        })
    }
}

fn merge_retention(
    own: Option<RawRetention>,
    fallback: Option<RawRetention>,
) -> Option<RawRetention> {
    match (own, fallback) {
        (Some(own), Some(fallback)) => Some(RawRetention {
            daily: own.daily.or(fallback.daily),
            weekly: own.weekly.or(fallback.weekly),
            monthly: own.monthly.or(fallback.monthly),
            manual_days: own.manual_days.or(fallback.manual_days),
            pre_deploy_days: own.pre_deploy_days.or(fallback.pre_deploy_days),
            failed_days: own.failed_days.or(fallback.failed_days),
        }),
        (own, fallback) => own.or(fallback),
    }
}

impl RawRetention {
    fn validate(self) -> Retention {
        let days = |value: Option<u32>, default: u32| {
            Duration::from_secs(u64::from(value.unwrap_or(default)) * 86_400)
        };
        Retention {
            daily: self.daily.unwrap_or(DEFAULT_KEEP_DAILY),
            weekly: self.weekly.unwrap_or(DEFAULT_KEEP_WEEKLY),
            monthly: self.monthly.unwrap_or(DEFAULT_KEEP_MONTHLY),
            manual: days(self.manual_days, DEFAULT_MANUAL_KEEP_DAYS),
            pre_deploy: days(self.pre_deploy_days, DEFAULT_PRE_DEPLOY_KEEP_DAYS),
            failed: days(self.failed_days, DEFAULT_FAILED_KEEP_DAYS),
        }
    }
}

impl Default for Retention {
    fn default() -> Self {
        RawRetention::default().validate()
    }
}

impl RawSchedule {
    fn validate(self, key: &str) -> Result<BackupSchedule, ConfigError> {
        let backup_type = self.backup_type.unwrap_or_else(|| "daily".to_string());
        if !["daily", "weekly", "monthly", "manual"].contains(&backup_type.as_str()) {
            return Err(ConfigError::invalid(
                &format!("{key}.backup_type"),
                format!("{backup_type:?}"),
                "expected \"daily\", \"weekly\", \"monthly\" or \"manual\"",
            ));
        }
        Ok(BackupSchedule {
            cron: parse_cron(&format!("{key}.cron"), &self.cron)?,
            backup_type,
        })
    }
}

/// Parses a cron expression evaluated in UTC. Five fields (minute hour day month weekday,
/// as in crontab) get a leading seconds field of 0; six or seven fields are passed to the
/// cron crate as they are. Weekdays are best written as names (Sun, Mon): numbers follow
/// the cron crate, where 1 is Sunday.
pub fn parse_cron(key: &str, text: &str) -> Result<CronSchedule, ConfigError> {
    let fields = text.split_whitespace().count();
    let expression = if fields == 5 {
        format!("0 {}", text.trim())
    } else {
        text.trim().to_string()
    };
    let schedule = cron::Schedule::from_str(&expression).map_err(|err| {
        ConfigError::invalid(
            key,
            format!("{text:?}"),
            format!("not a cron expression: {err}"),
        )
    })?;
    Ok(CronSchedule {
        expression,
        schedule,
    })
}

fn pg_tools(
    key: &str,
    mode: Option<String>,
    container: Option<String>,
    bin_dir: Option<PathBuf>,
) -> Result<PgTools, ConfigError> {
    match mode.as_deref() {
        None | Some("host") => Ok(PgTools::Host { bin_dir }),
        Some("docker") => match container.filter(|name| !name.is_empty()) {
            Some(container) => Ok(PgTools::Docker { container }),
            None => Err(ConfigError::Missing {
                key: key.replace("pg_tools", "container"),
                reason: "pg_tools is \"docker\"; name the database container".into(),
            }),
        },
        Some(other) => Err(ConfigError::invalid(
            key,
            format!("{other:?}"),
            "expected \"host\" or \"docker\"",
        )),
    }
}

fn parse_owner(key: &str, text: &str) -> Result<(u32, u32), ConfigError> {
    let parsed = text
        .split_once(':')
        .and_then(|(uid, gid)| Some((uid.parse().ok()?, gid.parse().ok()?)));
    parsed.ok_or_else(|| {
        ConfigError::invalid(
            key,
            format!("{text:?}"),
            "expected numeric uid:gid such as 101:101",
        )
    })
}

/// Returns the schedules of an environment of type `env_type` when none are configured.
pub fn default_schedules(env_type: &str) -> Vec<BackupSchedule> {
    if env_type == "dev" {
        return Vec::new();
    }
    let cron = parse_cron("backup.default.schedules", DEFAULT_SCHEDULE)
        .expect("the default schedule parses");
    vec![BackupSchedule {
        cron,
        backup_type: "daily".to_string(),
    }]
}
