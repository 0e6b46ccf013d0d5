//! The validated secret side of the config file: which secrets exist, where each value goes
//! inside the container, how a change is delivered, and how often providers are polled.
//!
//! The CLI converts `dso.yaml` into these (with errors that name key and line; see
//! `docs/config.md`); the watcher takes [`WatchSettings`] and the references of every
//! [`SecretSpec`], delivery takes [`InjectSpec`] and [`RotationSpec`]. Every default is
//! already applied here: nothing downstream needs to know which keys were written.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::reference::Reference;
use crate::spec::ProviderSpec;

/// `mode:`: how dso runs, which decides default paths.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A system agent (systemd): the local vault defaults to `/var/lib/dso/`.
    #[default]
    Agent,
    /// A user's development setup: the local vault defaults to `~/.dso/`.
    Local,
}

impl Mode {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Agent => "agent",
            Mode::Local => "local",
        }
    }
}

/// `agent.watch`: how providers are polled for changes (metadata only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WatchSettings {
    /// Base interval between two version checks of one reference (`polling_interval`).
    pub polling_interval: Duration,
    /// Longest interval while nothing changes (`max_interval`, default 4 × the base);
    /// after a change the interval returns to the base.
    pub max_interval: Duration,
    /// Changes that arrive within this window become one snapshot (`debounce`).
    pub debounce: Duration,
    /// Full jitter on every interval (`jitter`): the wait is drawn uniformly from
    /// `0..=interval` so that many references do not poll in lockstep.
    pub jitter: bool,
}

impl WatchSettings {
    /// Default base interval.
    pub const DEFAULT_POLLING_INTERVAL: Duration = Duration::from_secs(30);
    /// Default back-off factor: `max_interval` is this many times the base interval.
    pub const DEFAULT_BACKOFF_FACTOR: u32 = 4;
    /// Default debounce window.
    pub const DEFAULT_DEBOUNCE: Duration = Duration::from_secs(2);
}

impl Default for WatchSettings {
    fn default() -> WatchSettings {
        WatchSettings {
            polling_interval: Self::DEFAULT_POLLING_INTERVAL,
            max_interval: Self::DEFAULT_POLLING_INTERVAL * Self::DEFAULT_BACKOFF_FACTOR,
            debounce: Self::DEFAULT_DEBOUNCE,
            jitter: true,
        }
    }
}

/// How a change reaches the containers that use a secret.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Blue-green: a new container with the new values, health-checked, then the old one
    /// goes; the proxy keeps the host port. The default.
    #[default]
    Rolling,
    /// Stop the container and start its replacement with the new values (brief downtime).
    Restart,
    /// Replace the files in place and send the container a signal (file injection only).
    Signal,
    /// Update the files in place (file injection) and do nothing else.
    None,
    /// The container's `dso.update.strategy` label decides; without one, `rolling`, or
    /// `restart` for a container that looks stateful or publishes its own ports. The
    /// default when no key names a strategy.
    Auto,
}

impl Strategy {
    /// Every strategy, in the order the docs list them.
    pub const ALL: [Strategy; 5] = [
        Strategy::Rolling,
        Strategy::Restart,
        Strategy::Signal,
        Strategy::None,
        Strategy::Auto,
    ];

    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Rolling => "rolling",
            Strategy::Restart => "restart",
            Strategy::Signal => "signal",
            Strategy::None => "none",
            Strategy::Auto => "auto",
        }
    }

    /// Parses the config spelling.
    pub fn parse(s: &str) -> Option<Strategy> {
        Strategy::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `agent.rotation`: agent-wide rotation settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentRotation {
    /// Master switch: `false` turns every secret's rotation off (values are still
    /// watched and the files of running containers are still kept current where the
    /// injection allows it).
    pub enabled: bool,
    /// Strategy of secrets that name none themselves and have no `defaults.rotation`.
    pub strategy: Strategy,
    /// How long a replacement container may take to become healthy before the rotation
    /// is rolled back.
    pub health_check_timeout: Duration,
}

impl Default for AgentRotation {
    fn default() -> AgentRotation {
        AgentRotation {
            enabled: true,
            strategy: Strategy::Auto,
            health_check_timeout: Duration::from_secs(30),
        }
    }
}

/// The resolved rotation of one secret (`secrets[].rotation` over `defaults.rotation` over
/// `agent.rotation`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RotationSpec {
    /// Whether a change rotates the containers at all.
    pub enabled: bool,
    /// How.
    pub strategy: Strategy,
    /// The signal `strategy: signal` sends, as `SIGHUP`-style name.
    pub signal: String,
}

impl Default for RotationSpec {
    fn default() -> RotationSpec {
        RotationSpec {
            enabled: true,
            strategy: Strategy::Auto,
            signal: "SIGHUP".to_string(),
        }
    }
}

/// How environment values reach the process (`inject.env_mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EnvMode {
    /// dso's launcher becomes the entrypoint, reads the values from the container's tmpfs
    /// directory and execs the original entrypoint: nothing in `docker inspect` or on disk.
    #[default]
    Launcher,
    /// The values go into the container's `Config.Env`: visible to `docker inspect` and
    /// stored by the engine on the host's disk.
    Native,
}

/// Where a secret's values go inside the container (`inject`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum InjectSpec {
    /// One file per mapping, named by the mapping key, in a read-only tmpfs-backed
    /// directory bind-mounted at `path`.
    File {
        /// Directory inside the container (default `/run/secrets`).
        path: PathBuf,
        /// File mode (default `0o400`).
        mode: u32,
        /// Owner; `None` means the container's `USER`.
        uid: Option<u32>,
        /// Group; `None` means the container's `USER`'s group.
        gid: Option<u32>,
        /// Also set `KEY_FILE=<path>/KEY` in the container's environment for each mapping
        /// (a path, not a value), for images that read `POSTGRES_PASSWORD_FILE` and the like.
        env_pointers: bool,
    },
    /// One environment variable per mapping, named by the mapping key.
    Env {
        /// Launcher (the default, inspect-clean) or native `Config.Env`.
        env_mode: EnvMode,
    },
}

impl InjectSpec {
    /// Default directory of file injection.
    pub const DEFAULT_PATH: &'static str = "/run/secrets";
    /// Default mode of injected files.
    pub const DEFAULT_MODE: u32 = 0o400;

    /// The default injection: files under `/run/secrets`, mode 0400, the container's user.
    pub fn default_file() -> InjectSpec {
        InjectSpec::File {
            path: PathBuf::from(Self::DEFAULT_PATH),
            mode: Self::DEFAULT_MODE,
            uid: None,
            gid: None,
            env_pointers: false,
        }
    }
}

impl Default for InjectSpec {
    fn default() -> InjectSpec {
        InjectSpec::default_file()
    }
}

/// Which containers a secret goes to (`secrets[].targets`). A container is a target when
/// it matches any listed item, or when its `dso.secrets` label names the secret.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Targets {
    /// Container names.
    pub containers: Vec<String>,
    /// Compose service names (`com.docker.compose.service`).
    pub services: Vec<String>,
    /// Labels that must all be present with these values.
    pub labels: BTreeMap<String, String>,
}

impl Targets {
    /// Whether nothing is listed (only the `dso.secrets` label selects containers).
    pub fn is_empty(&self) -> bool {
        self.containers.is_empty() && self.services.is_empty() && self.labels.is_empty()
    }
}

/// One entry of `secrets:`, checked and with every default applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecretSpec {
    /// Unique name (what `dso.secrets` labels name).
    pub name: String,
    /// Provider instance name (a key of `providers:`).
    pub provider: String,
    /// In file order: the name inside the container (env var or file name) and the
    /// reference its value comes from.
    pub mappings: Vec<(String, Reference)>,
    /// Which containers receive it.
    pub targets: Targets,
    /// How the values are delivered.
    pub inject: InjectSpec,
    /// What a change does.
    pub rotation: RotationSpec,
}

/// The whole secret side of one config file.
#[derive(Debug, Clone, Default)]
pub struct SecretsConfig {
    /// `mode:`.
    pub mode: Mode,
    /// `providers:`, in file order.
    pub providers: Vec<ProviderSpec>,
    /// `secrets:`, in file order.
    pub secrets: Vec<SecretSpec>,
    /// `agent.watch`.
    pub watch: WatchSettings,
    /// `agent.rotation`.
    pub rotation: AgentRotation,
}

impl SecretsConfig {
    /// The provider instance named `name`.
    pub fn provider(&self, name: &str) -> Option<&ProviderSpec> {
        self.providers.iter().find(|p| p.name == name)
    }
}
