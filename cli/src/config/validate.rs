//! Stage two: the parsed file (all `Option`s) becomes a checked [`Config`], with the
//! defaults applied in one place ([`ListenerConfig::new`]) and the rules that serde cannot
//! express checked here: required keys, names, non-zero limits, duplicates.
//!
//! serde_yaml gives no positions once a value is parsed, so the line of a key is found
//! again in the source text ([`Lines`]).

use std::collections::HashMap;
use std::net::SocketAddr;

use dso_proxy::{Backend, ListenerConfig, ProxyConfig};

use super::file::{FileConfig, ListenerEntry};
use super::{AgentConfig, Config, ConfigError};

/// A parsed file and the text it came from.
pub struct Source<'a> {
    /// The parsed file.
    pub raw: FileConfig,
    /// The (expanded) text, to find lines in.
    pub text: &'a str,
}

/// Converts a parsed file into a checked config.
pub fn check(raw: FileConfig, text: &str) -> Result<Config, ConfigError> {
    Config::try_from(Source { raw, text })
}

impl TryFrom<Source<'_>> for Config {
    type Error = ConfigError;

    fn try_from(src: Source<'_>) -> Result<Config, ConfigError> {
        let lines = Lines(src.text);
        let agent = src.raw.agent.unwrap_or_default();
        let proxy = src.raw.proxy.unwrap_or_default();
        if proxy.max_connections == Some(0) {
            return Err(invalid(
                &lines,
                "proxy.max_connections",
                "max_connections",
                "must be at least 1",
            ));
        }
        let mut listeners = Vec::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut binds: HashMap<SocketAddr, usize> = HashMap::new();
        for (i, entry) in proxy.listeners.unwrap_or_default().into_iter().enumerate() {
            let cfg = listener(&lines, i, entry)?;
            if let Some(first) = names.insert(cfg.name.clone(), i) {
                return Err(ConfigError::Invalid {
                    key: format!("proxy.listeners[{i}].name"),
                    line: lines.find_value("name", &cfg.name, 1),
                    message: format!(
                        "duplicate listener name {:?} (also proxy.listeners[{first}])",
                        cfg.name
                    ),
                });
            }
            // Port 0 asks the kernel for a free port: several such listeners do not clash.
            // A wildcard address (0.0.0.0, [::]) clashes with every address of its family.
            let clash = binds
                .iter()
                .find(|(a, _)| overlaps(**a, cfg.listen))
                .map(|(_, j)| *j);
            binds.insert(cfg.listen, i);
            if cfg.listen.port() != 0
                && let Some(first) = clash
            {
                return Err(ConfigError::Invalid {
                    key: format!("proxy.listeners[{i}].listen"),
                    line: lines.find_key("listen", &format!("proxy.listeners[{i}].listen")),
                    message: format!(
                        "listen address {} is already used by proxy.listeners[{first}]",
                        cfg.listen
                    ),
                });
            }
            listeners.push(cfg);
        }
        Ok(Config {
            agent: AgentConfig {
                socket: agent.socket,
                shutdown_timeout: agent.shutdown_timeout.map(|d| d.get()),
            },
            proxy: ProxyConfig {
                max_connections: proxy.max_connections,
            },
            listeners,
        })
    }
}

fn listener(lines: &Lines<'_>, i: usize, e: ListenerEntry) -> Result<ListenerConfig, ConfigError> {
    let key = |k: &str| format!("proxy.listeners[{i}].{k}");
    let entry_line = lines.nth_list_item("listeners", i);
    let name = e.name.ok_or_else(|| ConfigError::Invalid {
        key: key("name"),
        line: entry_line,
        message: "missing; every listener needs a name".to_owned(),
    })?;
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(ConfigError::Invalid {
            key: key("name"),
            line: lines.find_value("name", &name, 0),
            message: format!("invalid name {name:?}; use letters, digits, '-', '_' and '.'"),
        });
    }
    let listen = e.listen.ok_or_else(|| ConfigError::Invalid {
        key: key("listen"),
        line: entry_line,
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
            line: lines.find_key("backends", &key("backends")),
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
    if let Some(v) = e.dial_attempts {
        at_least_one("dial_attempts", v.into())?;
        cfg.dial_attempts = v;
    }
    if let Some(v) = e.backlog {
        at_least_one("backlog", v.into())?;
        cfg.backlog = v;
    }
    if let Some(v) = e.max_connections {
        at_least_one("max_connections", v as u64)?;
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
        cfg.keepalive = s.get().map(|d| positive("keepalive", d)).transpose()?;
    }
    Ok(cfg)
}

/// Whether two bind addresses would take the same port.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn invalid(lines: &Lines<'_>, key: &str, leaf: &str, message: &str) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        line: lines.find_key(leaf, key),
        message: message.to_owned(),
    }
}

/// Finds lines of keys and values in YAML text by a plain scan of `key: value` lines.
/// Good enough for block-style files, which is what people write; `None` otherwise.
struct Lines<'a>(&'a str);

impl Lines<'_> {
    /// Line (1-based) of the `skip`-th (0-based) `key: value` line whose value is `value`.
    fn find_value(&self, key: &str, value: &str, skip: usize) -> Option<usize> {
        self.entries()
            .filter(|(_, k, v)| *k == key && unquote(v) == value)
            .nth(skip)
            .map(|(n, _, _)| n)
    }

    /// Line of key `leaf`, taking the occurrence that matches the list index in `path`
    /// (`proxy.listeners[2].backlog` is the third `backlog:` under a listener, when every
    /// listener sets it; otherwise the first `backlog:` found).
    fn find_key(&self, leaf: &str, path: &str) -> Option<usize> {
        let all: Vec<usize> = self
            .entries()
            .filter(|(_, k, _)| *k == leaf)
            .map(|(n, _, _)| n)
            .collect();
        let index = path
            .split_once('[')
            .and_then(|(_, r)| r.split_once(']'))
            .and_then(|(i, _)| i.parse::<usize>().ok());
        let listeners = self.entries().filter(|(_, k, _)| *k == "name").count();
        match index {
            Some(i) if all.len() == listeners => all.get(i).copied(),
            _ => all.first().copied(),
        }
    }

    /// Line of the `i`-th item of the block list under `key:`.
    fn nth_list_item(&self, key: &str, i: usize) -> Option<usize> {
        let (start, _, _) = self.entries().find(|(_, k, _)| *k == key)?;
        let indent = |l: &str| l.len() - l.trim_start().len();
        let mut items = self
            .0
            .lines()
            .enumerate()
            .skip(start)
            .filter(|(_, l)| l.trim_start().starts_with("- "));
        let (first_n, first) = items.next()?;
        let level = indent(first);
        std::iter::once((first_n, first))
            .chain(items)
            .filter(|(_, l)| indent(l) == level)
            .nth(i)
            .map(|(n, _)| n + 1)
    }

    /// `(line, key, value)` of every `key: value` line, list dashes stripped.
    fn entries(&self) -> impl Iterator<Item = (usize, &str, &str)> {
        self.0.lines().enumerate().filter_map(|(n, l)| {
            let t = l.trim_start().trim_start_matches("- ").trim_start();
            if t.starts_with('#') {
                return None;
            }
            let (k, v) = t.split_once(':')?;
            let v = v.split(" #").next().unwrap_or("").trim();
            Some((n + 1, k.trim(), v))
        })
    }
}

fn unquote(v: &str) -> &str {
    v.trim_matches(|c| c == '"' || c == '\'')
}
