//! The config file format as serde reads it: every key optional, unknown keys rejected.
//! Defaults and checks live in `validate.rs`, not here.
//!
//! To add a top-level section (`services:`, `secrets:`), add an `Option` field to
//! [`FileConfig`] with its own struct, and a matching field to the validated `Config`.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

use crate::duration::HumanDuration;

pub use super::file_secrets::*;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Schema version (`v1`, `v1.0.0`); read for its check only.
    #[allow(dead_code)]
    pub version: Option<SchemaVersion>,
    /// `agent` or `local`.
    pub mode: Option<ModeWord>,
    /// Settings of the agent process itself.
    pub agent: Option<AgentSection>,
    /// The listeners the agent owns.
    pub proxy: Option<ProxySection>,
    /// Secret sources, keyed by instance name.
    pub providers: Option<OrderedMap<ProviderEntry>>,
    /// Defaults of every secret.
    pub defaults: Option<DefaultsSection>,
    /// The secrets.
    pub secrets: Option<SecretList>,
    /// Log settings.
    pub logging: Option<LoggingSection>,
    /// The Docker Swarm secret driver (docs/swarm.md); off when absent.
    pub swarm: Option<crate::swarm::config::SwarmSection>,
}

/// `agent:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// Control socket path (overridden by `--socket` and `DSO_SOCKET`).
    pub socket: Option<PathBuf>,
    /// How long a SIGTERM waits for connections to finish.
    pub shutdown_timeout: Option<HumanDuration>,
    /// The original's `cache: true`: accepted (values are always held in memory only);
    /// read for its check only.
    #[allow(dead_code)]
    pub cache: Option<Cache>,
    /// How providers are polled.
    pub watch: Option<WatchSection>,
    /// Agent-wide rotation settings.
    pub rotation: Option<AgentRotationSection>,
    /// Where delivered secret files live (the agent's tmpfs) and the launcher.
    pub delivery: Option<DeliverySection>,
    /// Who may do what on the control socket.
    pub api: Option<ApiSection>,
    /// The HTTP listener (`/health`, `/metrics`, `/v1/events`, `/v1/webhook`).
    pub http: Option<HttpSection>,
    /// Outgoing notifications (webhooks).
    pub notify: Option<NotifySection>,
}

/// `agent.delivery`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverySection {
    /// The tmpfs directory holding one directory per container instance.
    pub root: Option<PathBuf>,
    /// Whether the agent mounts a tmpfs at `root` when it is not one (default true).
    pub mount_tmpfs: Option<bool>,
    /// Size limit of that tmpfs in MiB (default 64).
    pub size_mib: Option<u64>,
    /// Host path of the static `dso-init` launcher (env injection).
    pub launcher: Option<PathBuf>,
    /// `auto` (default: remote when the engine is not on this host), `local` or `remote`.
    pub mode: Option<String>,
}

/// `agent.api:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    /// Group (besides root and the agent's user) allowed on the control socket.
    pub socket_group: Option<String>,
    /// Whether `GET /v1/vault/secrets/{name}` answers values.
    pub allow_secret_read: Option<bool>,
}

/// `agent.http:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    /// `IP:PORT`, or `off` (also `false`) for no HTTP listener.
    pub listen: Option<ListenWord>,
    /// The incoming push trigger `POST /v1/webhook`.
    pub webhook: Option<WebhookSection>,
}

/// `agent.http.listen`: an address or `off`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ListenWord {
    /// `false` (`off` in YAML 1.1 spelling); `true` means the default address.
    Flag(bool),
    /// `IP:PORT` or `off`.
    Text(String),
}

/// `agent.http.webhook:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSection {
    /// File holding the HMAC-SHA256 key (mode 0600 or stricter).
    pub secret_file: Option<PathBuf>,
    /// Replay window either side of the agent's clock (default 5m).
    pub tolerance: Option<HumanDuration>,
}

/// `agent.notify:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifySection {
    /// Outgoing webhooks.
    pub webhooks: Option<Vec<WebhookEntry>>,
}

/// One of `agent.notify.webhooks`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookEntry {
    /// Where events are POSTed.
    pub url: Option<String>,
    /// File holding the HMAC-SHA256 key the requests are signed with.
    pub secret_file: Option<PathBuf>,
    /// Event kinds (or kind prefixes) sent.
    pub events: Option<Vec<String>>,
    /// Whether a plain `http://` URL is accepted.
    pub allow_http: Option<bool>,
    /// Time one attempt may take.
    pub timeout: Option<HumanDuration>,
    /// Attempts per event before it is given up.
    pub max_attempts: Option<u32>,
}

/// `proxy:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySection {
    /// Most connections all listeners together serve at once.
    pub max_connections: Option<usize>,
    /// One entry per owned port.
    pub listeners: Option<Vec<ListenerEntry>>,
}

/// `proxy.listeners[]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerEntry {
    /// Unique name.
    pub name: Option<String>,
    /// Address to bind, `IP:PORT`.
    pub listen: Option<Addr>,
    /// Initial backends.
    pub backends: Option<Vec<BackendEntry>>,
    /// Drain deadline after a swap.
    pub drain_timeout: Option<HumanDuration>,
    /// Window over which connections left at a drain deadline are closed.
    pub close_window: Option<HumanDuration>,
    /// Longest a pause may last.
    pub hold_max: Option<HumanDuration>,
    /// Timeout of one dial.
    pub connect_timeout: Option<HumanDuration>,
    /// Dial attempts per connection.
    pub dial_attempts: Option<u32>,
    /// Time all dial attempts of one connection may take.
    pub dial_budget: Option<HumanDuration>,
    /// Idle timeout; off when absent.
    pub idle_timeout: Option<Switch>,
    /// Per-listener connection limit.
    pub max_connections: Option<usize>,
    /// Listen backlog.
    pub backlog: Option<u32>,
    /// TCP keepalive idle time, or `off`.
    pub keepalive: Option<Switch>,
}

/// A backend written as `IP:PORT` or as `{addr: IP:PORT, label: TEXT}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendEntry {
    /// Address to dial.
    pub addr: SocketAddr,
    /// What is behind it.
    pub label: Option<String>,
}

impl From<BackendEntry> for dso_proxy::Backend {
    fn from(b: BackendEntry) -> Self {
        dso_proxy::Backend {
            addr: b.addr,
            label: b.label,
        }
    }
}

/// A socket address whose parse error says what was expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addr(pub SocketAddr);

impl<'de> Deserialize<'de> for Addr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A visitor, not `String::deserialize` then parse: errors raised inside the visitor
        // get serde_yaml's position of the value itself.
        struct V;
        impl Visitor<'_> for V {
            type Value = Addr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an address IP:PORT")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Addr, E> {
                s.trim().parse().map(Addr).map_err(|_| {
                    E::custom(format!(
                        "invalid address {s:?}; expected IP:PORT, like 127.0.0.1:5432 or [::1]:5432"
                    ))
                })
            }
        }
        d.deserialize_str(V)
    }
}

/// A duration that can also be switched `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switch {
    /// Disabled.
    Off,
    /// Enabled with this duration.
    On(HumanDuration),
}

impl Switch {
    /// The duration, when on.
    pub fn get(self) -> Option<std::time::Duration> {
        match self {
            Switch::Off => None,
            Switch::On(d) => Some(d.get()),
        }
    }
}

impl<'de> Deserialize<'de> for Switch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Switch;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "`off` or {}", crate::duration::EXPECTED)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Switch, E> {
                // YAML 1.1 readers may turn a bare `off` into false.
                if v {
                    Err(E::custom("expected `off` or a duration like 30s"))
                } else {
                    Ok(Switch::Off)
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Switch, E> {
                if v == "off" {
                    return Ok(Switch::Off);
                }
                crate::duration::parse(v)
                    .map(|d| Switch::On(HumanDuration(d)))
                    .map_err(|e| E::custom(format!("{e}, or `off`")))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendMap {
    addr: Addr,
    label: Option<String>,
}

impl<'de> Deserialize<'de> for BackendEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BackendEntry;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a backend as IP:PORT or {addr: IP:PORT, label: TEXT}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<BackendEntry, E> {
                let addr = v.trim().parse().map_err(|_| {
                    E::custom(format!(
                        "invalid backend {v:?}; expected IP:PORT, like 127.0.0.1:5432"
                    ))
                })?;
                Ok(BackendEntry { addr, label: None })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<BackendEntry, A::Error> {
                let m = BackendMap::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(BackendEntry {
                    addr: m.addr.0,
                    label: m.label,
                })
            }
        }
        d.deserialize_any(V)
    }
}
