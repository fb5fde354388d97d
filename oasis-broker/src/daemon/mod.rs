//! `oasis run`: the daemon. It gets the divert device, the kernel side and
//! the sockets from the [`Platform`], runs the packet loops (`forward`)
//! around the routing engine, a heartbeat thread, a config writer, the DNS
//! service and the control socket; on SIGINT/SIGTERM it detaches
//! everything it attached and removes what it created.

// The entry point needs a Unix control socket and Unix signals; elsewhere
// the daemon's parts are compiled (and type-checked) for the backend of
// that OS to start them its own way.
#![cfg_attr(not(unix), allow(dead_code))]

mod actions;
mod api;
mod changes;
mod dns;
mod edit;
mod errors;
mod heartbeat;
mod inherit;
mod lists;
mod monitor;
mod monitor_report;
mod persist;
mod serve;
mod sets;
#[cfg(unix)]
mod start;
mod state;
#[cfg(unix)]
mod transport;
mod views;

use std::path::PathBuf;

use crate::config::ConfigError;
use crate::platform::PlatformError;

#[cfg(unix)]
pub use start::run;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("another Oasis daemon is already running (its control socket {0} answers)")]
    AlreadyRunning(PathBuf),
    #[error(transparent)]
    Platform(PlatformError),
    #[error("control socket {path}: {source}")]
    Socket { path: PathBuf, source: std::io::Error },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("packet thread {0} stopped: {1}")]
    PacketThread(String, String),
    #[error("DNS: {0}")]
    Dns(String),
}
