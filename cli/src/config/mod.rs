//! The config file: read, `${ENV}`-expanded (`env.rs`), bounded (`yaml.rs`), parsed
//! (`file.rs`, `file_secrets.rs`), then checked and converted into the plain structs the
//! proxy takes (`validate.rs`) and the secret side's `dso_secrets` types (`secrets.rs`).
//!
//! Every error names the key and, where it can be found, the line (`lines.rs`).

mod env;
mod file;
mod file_secrets;
mod lines;
mod secrets;
mod validate;
mod yaml;

use std::path::{Path, PathBuf};
use std::time::Duration;

use dso_proxy::{ListenerConfig, ProxyConfig};

pub use dso_secrets::config::SecretsConfig;
pub use file::{BackendEntry, FileConfig};
pub use secrets::{LoggingConfig, references, used_providers};

/// Default control socket of the agent and of every command.
pub const DEFAULT_SOCKET: &str = "/run/dso/dso.sock";

/// Default time a SIGTERM lets open connections finish.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// A checked config, ready to start an agent from.
#[derive(Debug, Clone)]
pub struct Config {
    /// Settings of the agent process.
    pub agent: AgentConfig,
    /// Proxy-wide settings.
    pub proxy: ProxyConfig,
    /// Listeners, in file order.
    pub listeners: Vec<ListenerConfig>,
    /// Providers, secrets, watch and rotation settings.
    pub secrets: SecretsConfig,
    /// `logging:`.
    pub logging: LoggingConfig,
    /// `swarm:`, when the Swarm secret driver is on.
    pub swarm: Option<crate::swarm::config::SwarmSettings>,
}

/// Settings of the agent process itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentConfig {
    /// Control socket, when the file sets one.
    pub socket: Option<PathBuf>,
    /// Shutdown deadline, when the file sets one.
    pub shutdown_timeout: Option<Duration>,
    /// `agent.delivery`, defaults applied.
    pub delivery: DeliverySettings,
    /// `agent.api.socket_group`, when the file sets one (else group `dso`, when it exists).
    pub socket_group: Option<String>,
    /// `agent.api.allow_secret_read` (default false): whether members of the socket group
    /// may read local vault values back through the control socket.
    pub allow_secret_read: bool,
    /// `agent.http`, defaults applied.
    pub http: HttpSettings,
    /// `agent.notify.webhooks`, checked.
    pub webhooks: Vec<WebhookSettings>,
}

/// Default address of the HTTP listener (`agent.http.listen`).
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:8471";

/// `agent.http`: the HTTP listener and its webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSettings {
    /// Where to listen; `None` for `listen: off`.
    pub listen: Option<std::net::SocketAddr>,
    /// Whether the file set `listen` (a bind failure then stops the agent; on the
    /// default address it is a warning and a `/health` reason).
    pub explicit: bool,
    /// `agent.http.webhook.secret_file`; `None`: the webhook is off (404).
    pub webhook_key_file: Option<PathBuf>,
    /// `agent.http.webhook.tolerance` (default 5m).
    pub webhook_tolerance: Duration,
}

impl Default for HttpSettings {
    fn default() -> HttpSettings {
        HttpSettings {
            listen: Some(DEFAULT_HTTP_LISTEN.parse().expect("valid default address")),
            explicit: false,
            webhook_key_file: None,
            webhook_tolerance: crate::api::webhook::DEFAULT_TOLERANCE,
        }
    }
}

/// One checked `agent.notify.webhooks` entry (see docs/config.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookSettings {
    /// `https://` (or `http://` with `allow_http`) URL, without credentials.
    pub url: String,
    /// Absolute path of the file holding the signing key (read when the agent starts).
    pub secret_file: PathBuf,
    /// Kinds or kind prefixes sent (default: [`WebhookSettings::DEFAULT_EVENTS`]).
    pub events: Vec<String>,
    /// Time one attempt may take (default 10 s).
    pub timeout: Duration,
    /// Attempts per event (default 5).
    pub max_attempts: u32,
}

impl WebhookSettings {
    /// The events a webhook gets when `events` is not set.
    pub const DEFAULT_EVENTS: &[&str] = &[
        "rotation.succeeded",
        "rotation.failed",
        "rotation.recovered",
        "provider.down",
        "provider.up",
    ];
    /// Every kind the agent publishes (docs/api.md); `events` entries must name one of
    /// them or a dotted prefix of one.
    pub const KINDS: &[&str] = &[
        "rotation.started",
        "rotation.step",
        "rotation.succeeded",
        "rotation.failed",
        "rotation.rolled_back",
        "rotation.recovered",
        "secret.changed",
        "provider.down",
        "provider.up",
        "delivery.failed",
        "delivery.held",
        "docker.container",
        "config.reloaded",
        "config.reload_failed",
        "swarm.secret.read",
        "swarm.rotation.started",
        "swarm.service.updated",
        "swarm.rotation.failed",
        "swarm.secret.removed",
    ];
}

/// `agent.delivery`: the agent's tmpfs for delivered secrets and the launcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliverySettings {
    /// Tmpfs root (default `/run/dso/secrets`).
    pub root: PathBuf,
    /// Mount a tmpfs at `root` when it is not one (default true).
    pub mount_tmpfs: bool,
    /// Size limit of that tmpfs in bytes (default 64 MiB).
    pub size_bytes: u64,
    /// Host path of `dso-init`; `None` means "look next to the `dso` binary, then
    /// `/usr/lib/dso/dso-init`" (see [`DeliverySettings::launcher_path`]).
    pub launcher: Option<PathBuf>,
    /// Bind mounts of the agent's tmpfs (`Some(false)`), tmpfs volumes filled by archive
    /// uploads (`Some(true)`), or decided from the engine (`None`, `auto`).
    pub remote: Option<bool>,
}

impl Default for DeliverySettings {
    fn default() -> DeliverySettings {
        DeliverySettings {
            root: PathBuf::from("/run/dso/secrets"),
            mount_tmpfs: true,
            size_bytes: 64 << 20,
            launcher: None,
            remote: None,
        }
    }
}

impl DeliverySettings {
    /// The launcher to use: the configured path, else `dso-init` next to this binary,
    /// else `/usr/lib/dso/dso-init`, whichever exists first (`None` when none does).
    pub fn launcher_path(&self) -> Option<PathBuf> {
        if let Some(p) = &self.launcher {
            return Some(p.clone());
        }
        let beside = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("dso-init")));
        beside
            .into_iter()
            .chain([PathBuf::from("/usr/lib/dso/dso-init")])
            .find(|p| p.is_file())
    }
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
    #[error("{}{}", with_line(.0), hint(.0))]
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
    /// An error whose text had environment values written back as `${NAME}`.
    #[error("{0}")]
    Scrubbed(String),
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

/// What to write instead of a key dso does not support (appended to serde's "unknown
/// field" message, which already lists the keys that exist there).
const UNSUPPORTED: &[(&str, &str)] = &[
    (
        "cache_ttl",
        "dso keeps values in memory until they change; there is no TTL",
    ),
    (
        "ttl",
        "dso keeps values in memory until they change; there is no TTL",
    ),
    (
        "webhook",
        "dso polls (agent.watch.polling_interval); `dso secret set` tells a running agent about local vault changes at once",
    ),
    ("interval", "write `polling_interval`"),
    (
        "access_key_id",
        "dso never reads AWS keys from its config: use `auth: {method: env}` or `{method: profile}`",
    ),
    (
        "secret_access_key",
        "dso never reads AWS keys from its config: use `auth: {method: env}` or `{method: profile}`",
    ),
    (
        "env",
        "write `mappings:` (NAME_IN_CONTAINER: REFERENCE) and `inject: {type: env}`",
    ),
    (
        "files",
        "write `mappings:` (FILE_NAME: REFERENCE) and `inject: {type: file}`",
    ),
    (
        "health_check",
        "write agent.rotation.health_check_timeout; the check itself is the container's HEALTHCHECK",
    ),
];

fn hint(e: &serde_yaml::Error) -> String {
    let text = e.to_string();
    let Some(rest) = text.split("unknown field `").nth(1) else {
        return String::new();
    };
    let field = rest.split('`').next().unwrap_or("");
    UNSUPPORTED
        .iter()
        .find(|(k, _)| *k == field)
        .map(|(_, h)| format!(" ({h})"))
        .unwrap_or_default()
}

/// Reads and checks the config file at `path`, expanding `${VAR}` from the environment.
pub fn load(path: &Path) -> Result<Config, FileError> {
    let wrap = |source| FileError {
        path: path.to_owned(),
        source,
    };
    let read_err = |source| {
        wrap(ConfigError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let len = std::fs::metadata(path).map_err(read_err)?.len();
    if len > yaml::MAX_FILE_BYTES as u64 {
        return Err(wrap(ConfigError::Invalid {
            key: "(file)".to_owned(),
            line: None,
            message: format!(
                "{len} bytes; a config file is at most {} bytes",
                yaml::MAX_FILE_BYTES
            ),
        }));
    }
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    parse(&text, |name| std::env::var(name).ok()).map_err(wrap)
}

/// Checks config text, with `lookup` supplying environment variables (and `HOME` for `~`).
///
/// Order: `${VAR}` expansion, the nesting bound, the alias bound, serde, then the checks.
/// An error message never shows a value that came from the environment: each such value
/// is written back as its `${NAME}`.
pub fn parse(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let home = lookup("HOME");
    let expanded = env::expand(text, lookup)?;
    parse_expanded(&expanded.text, home).map_err(|e| scrub(e, &expanded.used))
}

fn parse_expanded(text: &str, home: Option<String>) -> Result<Config, ConfigError> {
    // An empty file is an empty mapping, not an error: the agent then serves only its API.
    let mut raw: FileConfig = if text.trim().is_empty() {
        FileConfig::default()
    } else {
        yaml::check_depth(text)?;
        yaml::check_expansion(text)?;
        serde_yaml::from_str(text)?
    };
    let lines = lines::Lines::new(text);
    let (secrets, logging) = secrets::check(&mut raw, &secrets::Ctx { lines: &lines, home })?;
    let mut cfg = validate::check(raw, &lines)?;
    cfg.secrets = secrets;
    cfg.logging = logging;
    Ok(cfg)
}

/// Writes every environment value (4 bytes or longer, so that `${PORT}`-sized values stay
/// readable) in an error back as `${NAME}`.
fn scrub(e: ConfigError, used: &[(String, String)]) -> ConfigError {
    let text = e.to_string();
    let mut out = text.clone();
    let mut seen = std::collections::HashSet::new();
    let mut values: Vec<&(String, String)> = used
        .iter()
        .filter(|(_, v)| v.len() >= 4 && seen.insert(v))
        .collect();
    // Longest first, so a value that contains another is replaced whole.
    values.sort_by_key(|(_, v)| std::cmp::Reverse(v.len()));
    for (name, value) in values {
        out = out.replace(value.as_str(), &format!("${{{name}}}"));
    }
    if out == text {
        return e;
    }
    ConfigError::Scrubbed(out)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod tests_secrets;
