//! Stage two: the parsed file (all `Option`s) becomes a checked [`Config`], with the
//! defaults applied in one place ([`ListenerConfig::new`]) and the rules that serde cannot
//! express checked here: required keys, names, ranges, duplicates.
//!
//! serde_yaml gives no positions once a value is parsed, so the line of a key is found
//! again in the source text ([`Lines`], an index built once). Everything here is linear in
//! the number of listeners: names and bind addresses are checked through hash maps.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use dso_proxy::{Backend, ListenerConfig, ProxyConfig};

use super::file::{FileConfig, ListenerEntry};
use super::lines::Lines;
use super::{AgentConfig, Config, ConfigError, DeliverySettings, LoggingConfig, SecretsConfig};

/// Most connections a `max_connections` may allow (all listeners, or one). Far above what
/// file descriptors allow (2 per connection), far below tokio's semaphore limit (2^61)
/// that made larger values panic at start.
pub const MAX_CONNECTIONS: usize = 1_000_000;

/// Longest TCP keepalive idle time Linux takes (`TCP_KEEPIDLE`, whole seconds).
pub const MAX_KEEPALIVE_SECS: u64 = 32_767;

/// Converts a parsed file into a checked config (the secret side is filled in by the
/// caller).
pub fn check(raw: FileConfig, lines: &Lines<'_>) -> Result<Config, ConfigError> {
    let agent = raw.agent.unwrap_or_default();
    let proxy = raw.proxy.unwrap_or_default();
    if let Some(n) = proxy.max_connections {
        connections(lines, "proxy.max_connections", n)?;
    }
    let mut listeners = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut ports = Ports::default();
    for (i, entry) in proxy.listeners.unwrap_or_default().into_iter().enumerate() {
        let cfg = listener(lines, i, entry)?;
        if let Some(first) = names.insert(cfg.name.clone(), i) {
            return Err(ConfigError::Invalid {
                key: format!("proxy.listeners[{i}].name"),
                line: lines.line(&format!("proxy.listeners[{i}].name")),
                message: format!(
                    "duplicate listener name {:?} (also proxy.listeners[{first}])",
                    cfg.name
                ),
            });
        }
        if let Some(first) = ports.claim(cfg.listen, i) {
            let key = format!("proxy.listeners[{i}].listen");
            return Err(ConfigError::Invalid {
                line: lines.line(&key),
                key,
                message: format!(
                    "listen address {} is already used by proxy.listeners[{first}]",
                    cfg.listen
                ),
            });
        }
        listeners.push(cfg);
    }
    let shutdown_timeout = agent.shutdown_timeout.map(|d| d.get());
    let delivery = delivery(lines, agent.delivery.unwrap_or_default())?;
    let api = agent.api.unwrap_or_default();
    if let Some(g) = &api.socket_group {
        group_name(lines, g)?;
    }
    Ok(Config {
        agent: AgentConfig {
            socket: agent.socket,
            shutdown_timeout,
            delivery,
            socket_group: api.socket_group,
            allow_secret_read: api.allow_secret_read.unwrap_or(false),
            http: http(lines, agent.http.unwrap_or_default())?,
            webhooks: webhooks(lines, agent.notify.unwrap_or_default())?,
        },
        proxy: ProxyConfig {
            max_connections: proxy.max_connections,
        },
        listeners,
        secrets: SecretsConfig::default(),
        logging: LoggingConfig::default(),
        swarm: crate::swarm::config::check(&|k| lines.line(k), raw.swarm)?,
    })
}

/// `agent.delivery`: an absolute root, a size of 1 MiB to 16 GiB, an absolute launcher.
fn delivery(
    lines: &Lines<'_>,
    d: crate::config::file::DeliverySection,
) -> Result<DeliverySettings, ConfigError> {
    let bad = |key: &str, message: String| ConfigError::Invalid {
        key: key.to_owned(),
        line: lines.line(key),
        message,
    };
    let mut out = DeliverySettings::default();
    if let Some(root) = d.root {
        if !root.is_absolute() || root == std::path::Path::new("/") {
            return Err(bad(
                "agent.delivery.root",
                format!("{} must be an absolute directory other than /", root.display()),
            ));
        }
        out.root = root;
    }
    if let Some(m) = d.mount_tmpfs {
        out.mount_tmpfs = m;
    }
    if let Some(mib) = d.size_mib {
        if !(1..=16 << 10).contains(&mib) {
            return Err(bad(
                "agent.delivery.size_mib",
                format!("{mib} is out of range; expected 1 to 16384 (MiB)"),
            ));
        }
        out.size_bytes = mib << 20;
    }
    if let Some(l) = d.launcher {
        if !l.is_absolute() {
            return Err(bad(
                "agent.delivery.launcher",
                format!(
                    "{} must be an absolute path to the static dso-init binary",
                    l.display()
                ),
            ));
        }
        out.launcher = Some(l);
    }
    out.remote = match d.mode.as_deref() {
        None | Some("auto") => None,
        Some("local") => Some(false),
        Some("remote") => Some(true),
        Some(other) => {
            return Err(bad(
                "agent.delivery.mode",
                format!("{other:?} is not a delivery mode; expected auto, local or remote"),
            ));
        }
    };
    Ok(out)
}

/// `agent.http`: `listen` an `IP:PORT` or `off`; the webhook's key file absolute; its
/// window from 1s to 1h.
fn http(lines: &Lines<'_>, h: crate::config::file::HttpSection) -> Result<super::HttpSettings, ConfigError> {
    use crate::config::file::ListenWord;
    let bad = |key: &str, message: String| ConfigError::Invalid {
        key: key.to_owned(),
        line: lines.line(key),
        message,
    };
    let mut out = super::HttpSettings::default();
    match h.listen {
        None | Some(ListenWord::Flag(true)) => {}
        Some(ListenWord::Flag(false)) => out.listen = None,
        Some(ListenWord::Text(t)) if t == "off" => out.listen = None,
        Some(ListenWord::Text(t)) => {
            let addr: std::net::SocketAddr = t.parse().map_err(|_| {
                bad(
                    "agent.http.listen",
                    format!("{t:?} is not IP:PORT; write e.g. 127.0.0.1:8471, or off for no HTTP listener"),
                )
            })?;
            out.listen = Some(addr);
            out.explicit = true;
        }
    }
    let w = h.webhook.unwrap_or_default();
    if let Some(f) = w.secret_file {
        if !f.is_absolute() {
            return Err(bad(
                "agent.http.webhook.secret_file",
                format!(
                    "{} must be an absolute path to the webhook's key file",
                    f.display()
                ),
            ));
        }
        out.webhook_key_file = Some(f);
    }
    if let Some(t) = w.tolerance {
        let t = t.get();
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&t) {
            return Err(bad(
                "agent.http.webhook.tolerance",
                format!(
                    "{} is out of range; expected 1s to 1h",
                    crate::duration::format(t)
                ),
            ));
        }
        out.webhook_tolerance = t;
    }
    Ok(out)
}

/// `agent.notify.webhooks`: each with an `https://` URL (`http://` only with
/// `allow_http: true`) without credentials, an absolute `secret_file`, known event kinds,
/// a timeout of 1 ms to 5 min and 1 to 20 attempts.
fn webhooks(
    lines: &Lines<'_>,
    n: crate::config::file::NotifySection,
) -> Result<Vec<crate::config::WebhookSettings>, ConfigError> {
    use crate::config::WebhookSettings;
    let mut out = Vec::new();
    for (i, w) in n.webhooks.unwrap_or_default().into_iter().enumerate() {
        let at = |leaf: &str| format!("agent.notify.webhooks[{i}].{leaf}");
        let bad = |leaf: &str, message: String| {
            let key = at(leaf);
            ConfigError::Invalid {
                line: lines.line(&key),
                key,
                message,
            }
        };
        let url = w
            .url
            .ok_or_else(|| bad("url", "missing; the address events are POSTed to".to_owned()))?;
        let parsed =
            reqwest::Url::parse(&url).map_err(|e| bad("url", format!("{url:?} is not a URL: {e}")))?;
        let allow_http = w.allow_http.unwrap_or(false);
        match parsed.scheme() {
            "https" => {}
            "http" if allow_http => {}
            "http" => {
                return Err(bad(
                    "url",
                    format!(
                        "{url:?} is plain http: events and their signatures would cross the network unencrypted; use https://, or set agent.notify.webhooks[{i}].allow_http: true for a receiver on a trusted network"
                    ),
                ));
            }
            other => {
                return Err(bad(
                    "url",
                    format!("scheme {other:?} is not supported; use https://"),
                ));
            }
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(bad("url", format!("{url:?} has no host")));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(bad(
                "url",
                "credentials in the URL would show in logs; the receiver authenticates requests by their X-DSO-Signature".to_owned(),
            ));
        }
        let secret_file = w.secret_file.ok_or_else(|| {
            bad(
                "secret_file",
                "missing; the file holding the HMAC-SHA256 key requests are signed with (e.g. `head -c 32 /dev/urandom | base64 > /etc/dso/webhook.key`)".to_owned(),
            )
        })?;
        if !secret_file.is_absolute() {
            return Err(bad(
                "secret_file",
                format!("{} must be an absolute path", secret_file.display()),
            ));
        }
        let events = match w.events {
            None => WebhookSettings::DEFAULT_EVENTS
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            Some(list) if list.is_empty() => {
                return Err(bad(
                    "events",
                    "empty; name the kinds to send (e.g. [rotation.failed, provider.down]) or leave the key out for the default".to_owned(),
                ));
            }
            Some(list) => {
                for (j, e) in list.iter().enumerate() {
                    let known = WebhookSettings::KINDS.iter().any(|k| {
                        k.strip_prefix(e.as_str())
                            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
                    });
                    if !known {
                        let key = format!("agent.notify.webhooks[{i}].events[{j}]");
                        return Err(ConfigError::Invalid {
                            line: lines.line(&key),
                            key,
                            message: format!(
                                "{e:?} is not an event kind; expected one of {} or a prefix such as `rotation`",
                                WebhookSettings::KINDS.join(", ")
                            ),
                        });
                    }
                }
                list
            }
        };
        let timeout = w.timeout.map_or(std::time::Duration::from_secs(10), |d| d.get());
        if timeout.is_zero() || timeout > std::time::Duration::from_secs(300) {
            return Err(bad(
                "timeout",
                format!("{timeout:?} is out of range; expected 1ms to 5m"),
            ));
        }
        let max_attempts = w.max_attempts.unwrap_or(5);
        if !(1..=20).contains(&max_attempts) {
            return Err(bad(
                "max_attempts",
                format!("{max_attempts} is out of range; expected 1 to 20"),
            ));
        }
        out.push(WebhookSettings {
            url,
            secret_file,
            events,
            timeout,
            max_attempts,
        });
    }
    Ok(out)
}

/// `agent.api.socket_group` must be a plain group name (whether it exists is checked when
/// the agent starts, on the host that runs it).
fn group_name(lines: &Lines<'_>, g: &str) -> Result<(), ConfigError> {
    let ok = !g.is_empty()
        && g.len() <= 32
        && g.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && g.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        return Ok(());
    }
    let key = "agent.api.socket_group";
    Err(ConfigError::Invalid {
        key: key.to_owned(),
        line: lines.line(key),
        message: format!(
            "{g:?} is not a group name; use a name like dso (lowercase letters, digits, `_`, `-`, at most 32)"
        ),
    })
}

fn connections(lines: &Lines<'_>, key: &str, n: usize) -> Result<(), ConfigError> {
    if n == 0 || n > MAX_CONNECTIONS {
        return Err(ConfigError::Invalid {
            key: key.to_owned(),
            line: lines.line(key),
            message: if n == 0 {
                "must be at least 1".to_owned()
            } else {
                format!("{n} is out of range; expected 1 to {MAX_CONNECTIONS}")
            },
        });
    }
    Ok(())
}

/// Which listener holds which `(family, port)`: the wildcard address (0.0.0.0, [::]) and
/// each specific address. Port 0 asks the kernel for a free port and never clashes.
#[derive(Default)]
struct Ports {
    by_port: HashMap<(bool, u16), PortUse>,
}

#[derive(Default)]
struct PortUse {
    wildcard: Option<usize>,
    first: Option<usize>,
    ips: HashMap<IpAddr, usize>,
}

impl Ports {
    /// Records `addr` for listener `i`; returns the listener it clashes with.
    fn claim(&mut self, addr: SocketAddr, i: usize) -> Option<usize> {
        if addr.port() == 0 {
            return None;
        }
        let u = self.by_port.entry((addr.is_ipv4(), addr.port())).or_default();
        let clash = if addr.ip().is_unspecified() {
            u.first
        } else {
            u.wildcard.or_else(|| u.ips.get(&addr.ip()).copied())
        };
        if clash.is_none() {
            u.first.get_or_insert(i);
            if addr.ip().is_unspecified() {
                u.wildcard = Some(i);
            } else {
                u.ips.insert(addr.ip(), i);
            }
        }
        clash
    }
}

fn listener(lines: &Lines<'_>, i: usize, e: ListenerEntry) -> Result<ListenerConfig, ConfigError> {
    let key = |k: &str| format!("proxy.listeners[{i}].{k}");
    let name = e.name.ok_or_else(|| ConfigError::Invalid {
        key: key("name"),
        line: lines.line(&format!("proxy.listeners[{i}]")),
        message: "missing; every listener needs a name".to_owned(),
    })?;
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(ConfigError::Invalid {
            key: key("name"),
            line: lines.line(&key("name")),
            message: format!("invalid name {name:?}; use letters, digits, '-', '_' and '.'"),
        });
    }
    let listen = e.listen.ok_or_else(|| ConfigError::Invalid {
        key: key("listen"),
        line: lines.line(&format!("proxy.listeners[{i}]")),
        message: format!("missing; listener {name:?} needs an address to bind, like 127.0.0.1:5432"),
    })?;
    let backends = e
        .backends
        .unwrap_or_default()
        .into_iter()
        .map(Backend::from)
        .collect();
    let backends: Vec<Backend> = backends;
    if let Some(b) = backends
        .iter()
        .find(|b| dso_proxy::routes_to_itself(listen.0, b.addr))
    {
        return Err(ConfigError::Invalid {
            key: key("backends"),
            line: lines.line(&key("backends")),
            message: format!(
                "backend {} is this listener's own address {}; connections would loop through dso",
                b.addr, listen.0
            ),
        });
    }
    let mut cfg = ListenerConfig::new(name, listen.0, backends);
    let at_least_one = |k: &str, v: u64| -> Result<(), ConfigError> {
        if v == 0 {
            Err(invalid(lines, &key(k), k, "must be at least 1"))
        } else {
            Ok(())
        }
    };
    let at_most = |k: &str, v: u64, max: u64| -> Result<(), ConfigError> {
        at_least_one(k, v)?;
        if v > max {
            Err(invalid(
                lines,
                &key(k),
                k,
                &format!("{v} is out of range; expected 1 to {max}"),
            ))
        } else {
            Ok(())
        }
    };
    if let Some(v) = e.dial_attempts {
        at_most("dial_attempts", v.into(), 100)?;
        cfg.dial_attempts = v;
    }
    if let Some(v) = e.backlog {
        at_most("backlog", v.into(), 65_535)?;
        cfg.backlog = v;
    }
    if let Some(v) = e.max_connections {
        at_least_one("max_connections", v as u64)?;
        connections(lines, &key("max_connections"), v)?;
        cfg.max_connections = Some(v);
    }
    let positive = |k: &str, d: std::time::Duration| -> Result<std::time::Duration, ConfigError> {
        if d.is_zero() {
            Err(invalid(lines, &key(k), k, "must be longer than 0s"))
        } else {
            Ok(d)
        }
    };
    if let Some(d) = e.drain_timeout {
        cfg.drain_timeout = d.get();
    }
    if let Some(d) = e.close_window {
        cfg.close_window = d.get();
    }
    if let Some(d) = e.hold_max {
        cfg.hold_max = positive("hold_max", d.get())?;
    }
    if let Some(d) = e.connect_timeout {
        cfg.connect_timeout = positive("connect_timeout", d.get())?;
    }
    if let Some(d) = e.dial_budget {
        cfg.dial_budget = positive("dial_budget", d.get())?;
    }
    if let Some(s) = e.idle_timeout {
        cfg.idle_timeout = s.get().map(|d| positive("idle_timeout", d)).transpose()?;
    }
    if let Some(s) = e.keepalive {
        cfg.keepalive = s
            .get()
            .map(|d| keepalive(lines, &key("keepalive"), d))
            .transpose()?;
    }
    Ok(cfg)
}

/// The kernel takes `TCP_KEEPIDLE` in whole seconds, 1 to 32767 (issue 9, item 12:
/// `999ms`, `10h` and `1d` passed and stopped the agent with an error naming no key).
fn keepalive(lines: &Lines<'_>, key: &str, d: Duration) -> Result<Duration, ConfigError> {
    let bad = |m: String| ConfigError::Invalid {
        key: key.to_owned(),
        line: lines.line(key),
        message: m,
    };
    if d.subsec_nanos() != 0 {
        return Err(bad(format!(
            "{} is not a whole number of seconds; TCP keepalive takes 1s to {MAX_KEEPALIVE_SECS}s, or off",
            crate::duration::format(d)
        )));
    }
    if d.as_secs() == 0 || d.as_secs() > MAX_KEEPALIVE_SECS {
        return Err(bad(format!(
            "{} is out of range; TCP keepalive takes 1s to {MAX_KEEPALIVE_SECS}s (9h06m07s), or off",
            crate::duration::format(d)
        )));
    }
    Ok(d)
}

fn invalid(lines: &Lines<'_>, key: &str, _leaf: &str, message: &str) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        line: lines.line(key),
        message: message.to_owned(),
    }
}
