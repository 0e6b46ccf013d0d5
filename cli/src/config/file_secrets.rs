//! The secret side of the file format (`version`, `mode`, `providers`, `agent.watch`,
//! `agent.rotation`, `defaults`, `secrets`, `logging`) as serde reads it: every key
//! optional, unknown keys rejected. Checks and defaults live in `secrets.rs`.
//!
//! Errors raised inside a visitor get serde_yaml's position of the value, so every custom
//! type here parses in its visitor rather than after.

use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::duration::HumanDuration;

/// `version:`. dso reads schema version 1, written `v1`, `v1.0`, `v1.0.0`, `1`, `1.0` or
/// `1.0.0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaVersion;

impl<'de> Deserialize<'de> for SchemaVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = SchemaVersion;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("the schema version v1 (also written v1.0.0)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SchemaVersion, E> {
                let t = v.trim();
                let n = t.strip_prefix('v').unwrap_or(t);
                if ["1", "1.0", "1.0.0"].contains(&n) {
                    Ok(SchemaVersion)
                } else {
                    Err(E::custom(format!(
                        "unsupported version {v:?}; this dso reads version v1 (write `v1` or `v1.0.0`)"
                    )))
                }
            }
        }
        // Text, whatever the scalar looks like: `1.0` is not read as a float.
        d.deserialize_str(V)
    }
}

/// `mode:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeWord {
    /// A system agent.
    Agent,
    /// A user's development setup.
    Local,
}

/// `agent.cache`. dso always keeps the last good values in memory (never on disk), so
/// that a provider outage does not stop anything; `true` says exactly that and is
/// accepted, `false` cannot be honoured and is an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cache;

impl<'de> Deserialize<'de> for Cache {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Cache;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`true`")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Cache, E> {
                if v {
                    Ok(Cache)
                } else {
                    Err(E::custom(
                        "`cache: false` is not supported: dso always keeps the current values in \
                         memory only (never on disk) so that a provider outage keeps containers \
                         running; remove the key",
                    ))
                }
            }
        }
        d.deserialize_bool(V)
    }
}

/// `agent.watch`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchSection {
    /// Only `polling`; read for its check only.
    #[allow(dead_code)]
    pub mode: Option<WatchMode>,
    /// Base interval.
    pub polling_interval: Option<HumanDuration>,
    /// Longest interval while nothing changes.
    pub max_interval: Option<HumanDuration>,
    /// Window that merges changes into one snapshot.
    pub debounce: Option<HumanDuration>,
    /// Full jitter on or off.
    pub jitter: Option<bool>,
}

/// `agent.watch.mode`: only `polling`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchMode;

impl<'de> Deserialize<'de> for WatchMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = WatchMode;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`polling`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<WatchMode, E> {
                if v == "polling" {
                    Ok(WatchMode)
                } else {
                    Err(E::custom(format!(
                        "watch mode {v:?} is not supported; the only mode is `polling` \
                         (set agent.watch.polling_interval for how often; `dso secret set` \
                         tells a running agent about local vault changes at once)"
                    )))
                }
            }
        }
        d.deserialize_str(V)
    }
}

/// `agent.rotation`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentRotationSection {
    /// Master switch.
    pub enabled: Option<bool>,
    /// Fallback strategy.
    pub strategy: Option<StrategyWord>,
    /// Health deadline of a replacement container.
    pub health_check_timeout: Option<HumanDuration>,
}

/// A rotation strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StrategyWord {
    /// Blue-green.
    Rolling,
    /// Stop, then start.
    Restart,
    /// Replace files, send a signal.
    Signal,
    /// Replace files only.
    None,
    /// The container's label decides.
    Auto,
}

/// `defaults.rotation` and `secrets[].rotation`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationEntry {
    /// Whether a change rotates.
    pub enabled: Option<bool>,
    /// How.
    pub strategy: Option<StrategyWord>,
    /// Signal of `strategy: signal`.
    pub signal: Option<String>,
}

/// `inject.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InjectType {
    /// Environment variables.
    Env,
    /// Files in a tmpfs directory.
    File,
}

/// `inject.env_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EnvModeWord {
    /// dso's launcher sets the variables.
    Launcher,
    /// `Config.Env`.
    Native,
}

/// A file mode, always octal like chmod: `0400`, `400` or `0o400`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMode(pub u32);

impl<'de> Deserialize<'de> for FileMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = FileMode;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an octal file mode like 0400")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<FileMode, E> {
                let t = v.trim();
                let digits = t.strip_prefix("0o").unwrap_or(t);
                match u32::from_str_radix(digits, 8) {
                    Ok(m) if !digits.is_empty() && m <= 0o777 => Ok(FileMode(m)),
                    _ => Err(E::custom(format!(
                        "invalid file mode {v:?}; expected octal 0000-0777 like 0400"
                    ))),
                }
            }
        }
        // The text as written: a plain `0400` is octal here, never the integer 400.
        d.deserialize_str(V)
    }
}

/// `defaults.inject` and `secrets[].inject`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectEntry {
    /// `env` or `file`.
    #[serde(rename = "type")]
    pub kind: Option<InjectType>,
    /// File injection: directory inside the container.
    pub path: Option<String>,
    /// File injection: file mode.
    pub mode: Option<FileMode>,
    /// File injection: owner uid.
    pub uid: Option<u32>,
    /// File injection: group gid.
    pub gid: Option<u32>,
    /// Env injection: launcher or native.
    pub env_mode: Option<EnvModeWord>,
    /// File injection: also set `KEY_FILE=PATH` for each mapping (images that read
    /// `POSTGRES_PASSWORD_FILE` and the like).
    pub env_pointers: Option<bool>,
}

/// `defaults:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultsSection {
    /// Default injection.
    pub inject: Option<InjectEntry>,
    /// Default rotation.
    pub rotation: Option<RotationEntry>,
}

/// `logging.level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LevelWord {
    /// Everything.
    Trace,
    /// Debug and up.
    Debug,
    /// Info and up (the default).
    Info,
    /// Warnings and errors.
    Warn,
    /// Errors only.
    Error,
}

/// `logging:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingSection {
    /// Level when `RUST_LOG` is unset.
    pub level: Option<LevelWord>,
}

/// `providers.NAME.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderType {
    /// The embedded vault.
    Local,
    /// HashiCorp Vault.
    Vault,
    /// AWS Secrets Manager.
    Aws,
    /// Azure Key Vault.
    Azure,
    /// An external executable.
    Plugin,
}

/// `providers.NAME`: the keys of every type together; `secrets.rs` refuses the keys that
/// do not belong to the entry's `type`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderEntry {
    /// The kind.
    #[serde(rename = "type")]
    pub kind: Option<ProviderType>,
    /// local: the encrypted vault file.
    pub vault_file: Option<String>,
    /// local: the key file.
    pub master_key_file: Option<String>,
    /// vault: server address (also accepted as `auth.params.address`).
    pub address: Option<String>,
    /// vault: Enterprise namespace.
    pub namespace: Option<String>,
    /// vault, azure: CA file.
    pub ca_file: Option<String>,
    /// vault, aws, azure: how to log in.
    pub auth: Option<AuthEntry>,
    /// aws: region.
    pub region: Option<String>,
    /// aws: endpoint override.
    pub endpoint_url: Option<String>,
    /// aws: named profile.
    pub profile: Option<String>,
    /// Retries of one call on a transient error.
    pub retry: Option<RetryEntry>,
    /// azure: `https://NAME.vault.azure.net`.
    pub vault_url: Option<String>,
    /// azure: login endpoint.
    pub authority_host: Option<String>,
    /// plugin: the executable.
    pub command: Option<String>,
    /// plugin: its arguments.
    pub args: Option<Vec<String>>,
    /// plugin: pinned SHA-256.
    pub sha256: Option<String>,
    /// plugin: pin file.
    pub pins_file: Option<String>,
    /// plugin: opaque settings sent to it.
    pub config: Option<serde_json::Value>,
    /// plugin: names of agent environment variables it may see (besides PATH, HOME, LANG).
    pub env: Option<Vec<String>>,
    /// Calls per second.
    pub rate_limit: Option<f64>,
    /// Calls in flight.
    pub concurrency: Option<usize>,
    /// Deadline of one call.
    pub timeout: Option<HumanDuration>,
}

/// `providers.NAME.auth`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthEntry {
    /// The method; which ones exist depends on the type.
    pub method: Option<String>,
    /// The method's parameters.
    pub params: Option<AuthParams>,
}

/// `providers.NAME.auth.params`: the keys of every method together.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthParams {
    /// vault: server address (the README's place for it).
    pub address: Option<String>,
    /// vault token.
    pub token: Option<String>,
    /// vault approle: role id.
    pub role_id: Option<String>,
    /// vault approle: file with the secret id.
    pub secret_id_file: Option<String>,
    /// vault approle: auth mount.
    pub mount: Option<String>,
    /// azure: tenant.
    pub tenant_id: Option<String>,
    /// azure: client (application) id.
    pub client_id: Option<String>,
    /// azure client_secret: the secret.
    pub client_secret: Option<String>,
    /// azure workload_identity: the federated token file.
    pub token_file: Option<String>,
    /// azure managed_identity: token endpoint override.
    pub endpoint: Option<String>,
}

/// `providers.NAME.retry`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryEntry {
    /// Attempts of one call.
    pub attempts: Option<u32>,
    /// First backoff, doubling.
    pub backoff: Option<HumanDuration>,
}

/// `secrets[].targets`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetsEntry {
    /// Container names.
    pub containers: Option<Vec<String>>,
    /// Compose service names.
    pub services: Option<Vec<String>>,
    /// Labels every target carries.
    pub labels: Option<OrderedMap<String>>,
}

/// `secrets[]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretEntry {
    /// Unique name.
    pub name: Option<String>,
    /// Provider instance.
    pub provider: Option<String>,
    /// Name inside the container → reference.
    pub mappings: Option<OrderedMap<String>>,
    /// Which containers.
    pub targets: Option<TargetsEntry>,
    /// How values are delivered.
    pub inject: Option<InjectEntry>,
    /// What a change does.
    pub rotation: Option<RotationEntry>,
}

/// `secrets:`: a list; the README's `secrets: {}` (an empty map) is an empty list.
#[derive(Debug, Default)]
pub struct SecretList(pub Vec<SecretEntry>);

impl<'de> Deserialize<'de> for SecretList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SecretList;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of secrets (`- name: ...`)")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SecretList, A::Error> {
                let mut out = Vec::new();
                while let Some(e) = seq.next_element()? {
                    out.push(e);
                }
                Ok(SecretList(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SecretList, A::Error> {
                if map.next_key::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::custom(
                        "secrets is a list: write each secret as `- name: NAME` (only an empty `{}` is read as no secrets)",
                    ));
                }
                Ok(SecretList(Vec::new()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<SecretList, E> {
                Ok(SecretList(Vec::new()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A YAML map kept in file order, with duplicate keys refused.
#[derive(Debug, Default)]
pub struct OrderedMap<V>(pub Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Vis<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for Vis<V> {
            type Value = OrderedMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OrderedMap<V>, A::Error> {
                let mut out: Vec<(String, V)> = Vec::new();
                let mut seen = std::collections::HashSet::new();
                while let Some(k) = map.next_key::<String>()? {
                    if !seen.insert(k.clone()) {
                        return Err(de::Error::custom(format!("duplicate key `{k}`")));
                    }
                    let v = map.next_value()?;
                    out.push((k, v));
                }
                Ok(OrderedMap(out))
            }
            fn visit_unit<E: de::Error>(self) -> Result<OrderedMap<V>, E> {
                Ok(OrderedMap(Vec::new()))
            }
        }
        d.deserialize_map(Vis(PhantomData))
    }
}
