//! The commands that are not the agent: one module per command group.

pub mod config;
pub mod debug;
pub mod doctor;
pub mod init;
pub mod proxy;
pub mod rotate;
pub mod secret;
pub mod setup;
pub mod system;
mod table;
pub mod up;
pub mod version;
pub mod watch;

use std::path::PathBuf;

use crate::config::DEFAULT_SOCKET;

/// The control socket to talk to: `--socket`/`DSO_SOCKET`, else the default.
pub fn socket_path(flag: Option<PathBuf>) -> PathBuf {
    flag.unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// A current-thread runtime for a short command.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}
