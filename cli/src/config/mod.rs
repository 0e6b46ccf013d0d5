//! The config file: read, `${ENV}`-expanded, parsed (`file.rs`), then checked and converted
//! into the plain structs the proxy takes (`validate.rs`).
//!
//! Every error names the key and, where it can be found, the line.

mod env;
mod file;
mod validate;

use std::path::{Path, PathBuf};
use std::time::Duration;

use dso_proxy::{ListenerConfig, ProxyConfig};

pub use file::{BackendEntry, FileConfig};

/// Default control socket of the agent and of every command.
pub const DEFAULT_SOCKET: &str = "/run/dso/dso.sock";

/// Default time a SIGTERM lets open connections finish.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// A checked config, ready to start an agent from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Settings of the agent process.
    pub agent: AgentConfig,
    /// Proxy-wide settings.
    pub proxy: ProxyConfig,
    /// Listeners, in file order.
    pub listeners: Vec<ListenerConfig>,
}

/// Settings of the agent process itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentConfig {
    /// Control socket, when the file sets one.
    pub socket: Option<PathBuf>,
    /// Shutdown deadline, when the file sets one.
    pub shutdown_timeout: Option<Duration>,
}

/// Why a config file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}")]
    Read {
        /// Path given.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// `${VAR}` expansion failed.
    #[error("line {line}: {message}")]
    Env {
        /// 1-based line of the `${`.
        line: usize,
        /// What was wrong.
        message: String,
    },
    /// The YAML did not match the format (syntax, unknown key, wrong type, bad value).
    /// serde_yaml's text carries the key path and the line.
    #[error("{}", with_line(.0))]
    Parse(#[from] serde_yaml::Error),
    /// A value parsed but breaks a rule (duplicate name, zero where at least one is needed).
    #[error("{key}: {message}{}", line.map(|l| format!(" at line {l}")).unwrap_or_default())]
    Invalid {
        /// Path of the key, like `proxy.listeners[1].name`.
        key: String,
        /// Line in the file, when it could be found.
        line: Option<usize>,
        /// What was wrong, with the offending value.
        message: String,
    },
}

/// A config error together with the file it came from, for messages like `dso.yaml: ...`.
#[derive(Debug, thiserror::Error)]
#[error("{}", path.display())]
pub struct FileError {
    /// The file.
    pub path: PathBuf,
    /// What was wrong in it.
    #[source]
    pub source: ConfigError,
}

/// serde_yaml leaves out the position when it is line 1 column 1; put it back so every
/// parse error names a line.
fn with_line(e: &serde_yaml::Error) -> String {
    let text = e.to_string();
    match e.location() {
        Some(l) if !text.contains(" at line ") => {
            format!("{text} at line {} column {}", l.line(), l.column())
        }
        _ => text,
    }
}

/// Reads and checks the config file at `path`, expanding `${VAR}` from the environment.
pub fn load(path: &Path) -> Result<Config, FileError> {
    let wrap = |source| FileError {
        path: path.to_owned(),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(|source| {
        wrap(ConfigError::Read {
            path: path.to_owned(),
            source,
        })
    })?;
    parse(&text, |name| std::env::var(name).ok()).map_err(wrap)
}

/// Checks config text, with `lookup` supplying environment variables.
pub fn parse(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let expanded = env::expand(text, lookup)?;
    // An empty file is an empty mapping, not an error: the agent then serves only its API.
    let raw: FileConfig = if expanded.trim().is_empty() {
        FileConfig::default()
    } else {
        serde_yaml::from_str(&expanded)?
    };
    validate::check(raw, &expanded)
}

#[cfg(test)]
mod tests;
