//! odooops-agent: the agent on each droplet that executes the runs queued in the ops.*
//! control plane (builds, deploys, backups and restores of Odoo) through the Docker
//! Engine API, and reports back events, artifacts and results.
//!
//! # Layout
//!
//! - [`config`]: TOML config parsed and validated into settings; [`secret`] for values
//!   that must not be logged.
//! - [`db`] and [`migrate`]: connections to the control plane and its schema.
//! - [`queue`]: claiming, leases, heartbeats and finishing runs; all queue SQL is there.
//! - [`events`]: batched, ordered writing of run events.
//! - [`agent`]: the daemon loop: concurrency, wake-ups, reaping, shutdown.
//! - [`workflows`]: one module per kind of run.
//! - [`docker`]: the Docker Engine client.
//! - [`storage`]: the artifact store for run logs and backups.
//! - [`source`]: fetching a project's commit with git.
//! - [`storage`]: object stores (a local directory, S3) for backups and artifacts.
//! - [`archive`]: the streaming zip format of backups.
//! - [`systemd`]: readiness and watchdog notifications.

#![forbid(unsafe_code)]

pub mod agent;
pub mod archive;
pub mod config;
pub mod db;
pub mod docker;
pub mod events;
pub mod logging;
pub mod migrate;
pub mod queue;
pub mod secret;
pub mod source;
pub mod storage;
pub mod systemd;
pub mod workflows;
