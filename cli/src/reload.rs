//! Live config reload (`SIGHUP`, `POST /v1/config/reload`, `dso config reload`): the file
//! the agent was started with is read again, checked whole, and the difference applied.
//!
//! What is applied live: the file's listeners (`proxy.listeners`) added, removed (they stop
//! accepting and their connections drain), moved to a new address (a new listener plus a
//! removed one), their backends swapped (the old generation drains) and their settings
//! updated for new connections ([`dso_proxy::Listener::update`]). Listeners managed from
//! Docker labels are never the file's and never touched. The `providers:` and `secrets:`
//! added, removed and replaced (settings changed: removed and added again), when the agent
//! runs a secret side ([`crate::secrets::Secrets::apply`]); untouched providers keep their
//! values, versions and counters. Everything else that changed is reported as needing a
//! restart ([`Plan::restart`]); nothing is ignored silently.
//!
//! Order: parse and check the file (an invalid file changes nothing), plan the difference
//! ([`plan`], a pure function), check it against the running proxy (names taken by Docker
//! listeners, backends, every new address probed for a bind), connect every provider
//! added or replaced (one that cannot connect fails the reload, nothing changed), then
//! apply: listener adds, moves, swaps, updates, removals, then the providers and secrets.
//! A failure while applying (a port taken between the probe and the bind) stops there and
//! the answer lists what was applied and what was not.
//!
//! Reloads are serialized by one async mutex, which also guards the record of the
//! listeners as applied, so that the next reload diffs against what is in force.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use dso_proxy::{Backend, ListenerConfig, Proxy};
use serde::Serialize;
use tracing::{info, warn};

use crate::config::{self, Config};

/// The agent's reloader, set once by `agent.rs`; `None` in processes that are not an agent.
static RELOADER: OnceLock<Arc<Reloader>> = OnceLock::new();

/// Makes `r` the agent's reloader (the API endpoint and the metric read it from here).
pub fn install(r: Arc<Reloader>) {
    let _ = RELOADER.set(r);
}

/// The agent's reloader, once installed.
pub fn get() -> Option<Arc<Reloader>> {
    RELOADER.get().cloned()
}

/// What a reload needs in reach: the file, the proxy, the bus, the config the agent
/// started with, and the listeners as applied.
#[derive(Debug)]
pub struct Reloader {
    /// The config file the agent was started with (`dso agent --config`).
    path: PathBuf,
    /// The running proxy (file and Docker listeners alike; only the file's are touched).
    proxy: Proxy,
    /// `config.reloaded` / `config.reload_failed`.
    events: crate::events::Bus,
    /// The config the agent started with: keys that need a restart are compared with it
    /// (they are still pending until the agent restarts, whatever reloads came between).
    started: Config,
    /// Serializes reloads; the file's listeners as applied, by name.
    applied: tokio::sync::Mutex<BTreeMap<String, ListenerConfig>>,
    /// `dso_config_reloads_total{result}`, indexed by [`Outcome`].
    counts: [AtomicU64; 3],
}

/// How a reload ended, the `result` label of `dso_config_reloads_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Everything that can change live was applied.
    Ok,
    /// Nothing was changed: the file was invalid, or the plan failed its checks.
    Failed,
    /// A step failed while applying; the steps before it are in force.
    Partial,
}

impl Outcome {
    /// Every outcome, in the order of [`Reloader::counts`].
    pub const ALL: [Outcome; 3] = [Outcome::Ok, Outcome::Failed, Outcome::Partial];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
            Outcome::Partial => "partial",
        }
    }
}

/// The difference between the listeners in force and a new config, and the keys that
/// changed but need a restart.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// New listeners, to bind.
    pub add: Vec<ListenerConfig>,
    /// Listeners whose `listen` changed: bound anew at the new address (with the new
    /// entry's settings and backends), the old one removed.
    pub moved: Vec<ListenerConfig>,
    /// Listeners whose backends changed: name and the new backends.
    pub swap: Vec<(String, Vec<Backend>)>,
    /// Listeners whose live settings changed: the new entry and the keys that changed.
    pub update: Vec<(ListenerConfig, Vec<&'static str>)>,
    /// Listeners no longer in the file.
    pub remove: Vec<String>,
    /// Listeners whose entry did not change at all.
    pub unchanged: Vec<String>,
    /// Keys that changed and need an agent restart.
    pub restart: Vec<String>,
}

/// A listener setting's key and whether two entries agree on it.
type Key = (&'static str, fn(&ListenerConfig, &ListenerConfig) -> bool);

/// The listener settings a reload applies to new connections, with their keys.
const LIVE_KEYS: &[Key] = &[
    ("drain_timeout", |a, b| a.drain_timeout == b.drain_timeout),
    ("close_window", |a, b| a.close_window == b.close_window),
    ("hold_max", |a, b| a.hold_max == b.hold_max),
    ("connect_timeout", |a, b| a.connect_timeout == b.connect_timeout),
    ("dial_attempts", |a, b| a.dial_attempts == b.dial_attempts),
    ("dial_budget", |a, b| a.dial_budget == b.dial_budget),
    ("idle_timeout", |a, b| a.idle_timeout == b.idle_timeout),
    ("max_connections", |a, b| a.max_connections == b.max_connections),
];

/// Listener settings that belong to the listening socket: a change needs the socket made
/// again, which the agent does at a restart (or when the listener moves).
const SOCKET_KEYS: &[Key] = &[
    ("backlog", |a, b| a.backlog == b.backlog),
    ("keepalive", |a, b| a.keepalive == b.keepalive),
];

/// Plans a reload: `applied` are the file's listeners in force, `started` the config the
/// agent started with, `new` the file as it is now. Pure: nothing is touched.
pub fn plan(applied: &BTreeMap<String, ListenerConfig>, started: &Config, new: &Config) -> Plan {
    let mut p = Plan::default();
    for n in &new.listeners {
        let Some(old) = applied.get(&n.name) else {
            p.add.push(n.clone());
            continue;
        };
        if old == n {
            p.unchanged.push(n.name.clone());
            continue;
        }
        if old.listen != n.listen {
            p.moved.push(n.clone());
            continue;
        }
        if old.backends != n.backends {
            p.swap.push((n.name.clone(), n.backends.clone()));
        }
        let keys: Vec<&'static str> = LIVE_KEYS
            .iter()
            .filter(|(_, same)| !same(old, n))
            .map(|(k, _)| *k)
            .collect();
        if !keys.is_empty() {
            p.update.push((n.clone(), keys));
        }
        for (k, same) in SOCKET_KEYS {
            if !same(old, n) {
                p.restart.push(format!("proxy.listeners[{}].{k}", n.name));
            }
        }
    }
    p.remove = applied
        .keys()
        .filter(|name| !new.listeners.iter().any(|n| &n.name == *name))
        .cloned()
        .collect();
    p.restart.extend(restart_keys(started, new));
    p
}

/// The keys outside `proxy.listeners` that differ from the config the agent started with:
/// each needs a restart.
fn restart_keys(started: &Config, new: &Config) -> Vec<String> {
    let (a, b) = (&started.agent, &new.agent);
    let mut keys = Vec::new();
    let mut check = |key: &str, same: bool| {
        if !same {
            keys.push(key.to_owned());
        }
    };
    check("agent.socket", a.socket == b.socket);
    check("agent.shutdown_timeout", a.shutdown_timeout == b.shutdown_timeout);
    check("agent.delivery", a.delivery == b.delivery);
    check("agent.api.socket_group", a.socket_group == b.socket_group);
    check(
        "agent.api.allow_secret_read",
        a.allow_secret_read == b.allow_secret_read,
    );
    check("agent.http", a.http == b.http);
    check("agent.notify.webhooks", a.webhooks == b.webhooks);
    check("proxy.max_connections", started.proxy == new.proxy);
    check("logging", started.logging == new.logging);
    let (s, n) = (&started.secrets, &new.secrets);
    check("mode", s.mode == n.mode);
    check("agent.watch", s.watch == n.watch);
    check("agent.rotation", s.rotation == n.rotation);
    keys
}

/// The `providers[NAME]` and `secrets[NAME]` that differ from the config the agent started
/// with, for an agent without a secret side (started with neither): starting one needs a
/// restart. An agent with one applies them live ([`crate::secrets::Secrets::apply`]).
fn secret_restart_keys(started: &Config, new: &Config) -> Vec<String> {
    let mut keys = Vec::new();
    // The provider and secret specs have no `PartialEq` (they hold credentials and
    // references); their `Debug` text names every setting, is compared in memory only and
    // never printed. A credential's `Debug` hides its value, so a changed value behind the
    // same file or variable name is not a change of the config (it is read when used).
    let by_name = |specs: Vec<(String, String)>| specs.into_iter().collect::<BTreeMap<_, _>>();
    let providers = |c: &Config| {
        by_name(
            c.secrets
                .providers
                .iter()
                .map(|p| (p.name.clone(), format!("{p:?}")))
                .collect(),
        )
    };
    let secrets = |c: &Config| {
        by_name(
            c.secrets
                .secrets
                .iter()
                .map(|x| (x.name.clone(), format!("{x:?}")))
                .collect(),
        )
    };
    for (key, old, new) in [
        ("providers", providers(started), providers(new)),
        ("secrets", secrets(started), secrets(new)),
    ] {
        let names: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
        for name in names {
            if old.get(name) != new.get(name) {
                keys.push(format!("{key}[{name}]"));
            }
        }
    }
    keys
}

/// What a reload did, as the API answers it and the log and event carry it.
#[derive(Debug, Serialize)]
pub struct Report {
    /// `ok`, `failed` or `partial`.
    pub result: Outcome,
    /// The file read.
    pub file: PathBuf,
    /// Listeners bound: name and address.
    pub added: Vec<Bound>,
    /// Listeners bound at a new address, the old one draining.
    pub moved: Vec<Moved>,
    /// Listeners whose route was swapped: name, new and previous generation.
    pub swapped: Vec<Swapped>,
    /// Listeners whose settings changed for new connections: name and keys.
    pub updated: Vec<Updated>,
    /// Listeners removed: name and the generation that drains.
    pub removed: Vec<Removed>,
    /// Listeners whose entry did not change (nothing was done to them).
    pub unchanged: Vec<String>,
    /// Providers and secrets added, removed and replaced (names only), applied or, when
    /// the reload failed, planned.
    #[serde(flatten)]
    pub secrets: crate::secrets::SecretsDiff,
    /// Keys that changed but need an agent restart; the rest was applied without them.
    pub restart_required: Vec<String>,
    /// Steps planned but not applied, when a step failed (`partial`), or all of them
    /// when the checks failed (`failed`).
    pub not_applied: Vec<String>,
    /// Why the reload failed, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A listener bound by a reload.
#[derive(Debug, Serialize)]
pub struct Bound {
    /// Its name.
    pub name: String,
    /// The address bound.
    pub bind: std::net::SocketAddr,
}

/// A listener moved by a reload.
#[derive(Debug, Serialize)]
pub struct Moved {
    /// Its name.
    pub name: String,
    /// The old address, now closed; its connections drain.
    pub from: std::net::SocketAddr,
    /// The new address bound.
    pub to: std::net::SocketAddr,
}

/// A swap made by a reload.
#[derive(Debug, Serialize)]
pub struct Swapped {
    /// The listener.
    pub name: String,
    /// The generation now current.
    pub generation: u64,
    /// The generation draining.
    pub previous: u64,
}

/// Settings changed by a reload.
#[derive(Debug, Serialize)]
pub struct Updated {
    /// The listener.
    pub name: String,
    /// The keys that changed.
    pub keys: Vec<&'static str>,
}

/// A listener removed by a reload.
#[derive(Debug, Serialize)]
pub struct Removed {
    /// Its name.
    pub name: String,
    /// The generation that drains.
    pub generation: u64,
}

impl Report {
    fn new(file: &Path) -> Report {
        Report {
            result: Outcome::Ok,
            file: file.to_owned(),
            added: Vec::new(),
            moved: Vec::new(),
            swapped: Vec::new(),
            updated: Vec::new(),
            removed: Vec::new(),
            unchanged: Vec::new(),
            secrets: Default::default(),
            restart_required: Vec::new(),
            not_applied: Vec::new(),
            error: None,
        }
    }

    /// A one-line account of what changed, for the log and the CLI.
    pub fn summary(&self) -> String {
        let names = |v: Vec<&str>| v.join(", ");
        let mut parts = Vec::new();
        let mut part = |what: &str, list: Vec<&str>| {
            if !list.is_empty() {
                parts.push(format!("{what} {}", names(list)));
            }
        };
        part("added", self.added.iter().map(|b| b.name.as_str()).collect());
        part("moved", self.moved.iter().map(|m| m.name.as_str()).collect());
        part("swapped", self.swapped.iter().map(|s| s.name.as_str()).collect());
        part("updated", self.updated.iter().map(|u| u.name.as_str()).collect());
        part("removed", self.removed.iter().map(|r| r.name.as_str()).collect());
        let listeners = self.added.len()
            + self.moved.len()
            + self.swapped.len()
            + self.updated.len()
            + self.removed.len();
        let d = &self.secrets;
        fn strs(v: &[String]) -> Vec<&str> {
            v.iter().map(String::as_str).collect()
        }
        part("providers added", strs(&d.providers_added));
        part("providers replaced", strs(&d.providers_replaced));
        part("providers removed", strs(&d.providers_removed));
        part("secrets added", strs(&d.secrets_added));
        part("secrets replaced", strs(&d.secrets_replaced));
        part("secrets removed", strs(&d.secrets_removed));
        if listeners == 0 {
            parts.insert(0, "no listener changed".to_owned());
        }
        if !self.restart_required.is_empty() {
            parts.push(format!(
                "needs a restart (not applied): {}",
                self.restart_required.join(", ")
            ));
        }
        parts.join("; ")
    }
}

impl Reloader {
    /// A reloader for the agent started from `path` with `started`, whose file listeners
    /// were all bound.
    pub fn new(path: &Path, proxy: Proxy, events: crate::events::Bus, started: Config) -> Reloader {
        let applied = started
            .listeners
            .iter()
            .map(|l| (l.name.clone(), l.clone()))
            .collect();
        Reloader {
            path: path.to_owned(),
            proxy,
            events,
            started,
            applied: tokio::sync::Mutex::new(applied),
            counts: Default::default(),
        }
    }

    /// Reloads by `trigger` (`SIGHUP`, `api`): reads the file, checks it and the plan,
    /// applies it. Logs, publishes and counts the outcome. One at a time.
    pub async fn reload(&self, trigger: &str) -> Report {
        let mut applied = self.applied.lock().await;
        let mut report = Report::new(&self.path);
        match config::load(&self.path) {
            Err(e) => {
                report.result = Outcome::Failed;
                report.error = Some(chain(&e));
            }
            Ok(new) => {
                let p = plan(&applied, &self.started, &new);
                report.unchanged = p.unchanged.clone();
                report.restart_required = p.restart.clone();
                let side = crate::secrets::running();
                let diff = match &side {
                    Some(s) => s.diff(&new.secrets),
                    None => {
                        report
                            .restart_required
                            .extend(secret_restart_keys(&self.started, &new));
                        Default::default()
                    }
                };
                let checked = match self.check(&applied, &p) {
                    Err(e) => Err(e),
                    Ok(()) => match &side {
                        Some(s) if !diff.is_empty() => s.connect(&new.secrets, &diff).await.map(Some),
                        _ => Ok(None),
                    },
                };
                match checked {
                    Err(e) => {
                        report.result = Outcome::Failed;
                        report.not_applied = steps(&p);
                        report.not_applied.extend(diff.steps());
                        report.secrets = diff;
                        report.error = Some(e);
                    }
                    Ok(connected) => {
                        self.apply(&mut applied, p, &mut report);
                        match (side, connected) {
                            (Some(s), Some(connected)) if report.error.is_none() => {
                                let failed = s.apply(&new.secrets, &diff, connected);
                                report.secrets = diff;
                                if !failed.is_empty() {
                                    report.result = Outcome::Partial;
                                    report.error = Some(failed.join("; "));
                                }
                            }
                            // A listener step failed: the providers and secrets stay.
                            _ => report.not_applied.extend(diff.steps()),
                        }
                    }
                }
            }
        }
        drop(applied);
        // The error says whole what happened, as the CLI prints only it.
        if let Some(e) = report.error.take() {
            report.error = Some(match report.result {
                Outcome::Partial => format!(
                    "{e}; applied before it failed: {}; not applied: {}",
                    report.summary(),
                    report.not_applied.join(", ")
                ),
                _ => format!("{e}; nothing was changed, the agent serves with the config in force"),
            });
        }
        self.counts[report.result as usize].fetch_add(1, Ordering::Relaxed);
        self.publish(trigger, &report);
        report
    }

    /// The checks before anything is applied: the agent is not shutting down, no new
    /// name is a Docker listener's, every new route is one the proxy takes, and every new
    /// address can be bound.
    fn check(&self, applied: &BTreeMap<String, ListenerConfig>, p: &Plan) -> Result<(), String> {
        if self.proxy.is_shutting_down() {
            return Err("the agent is shutting down; the config is no longer reloaded".to_owned());
        }
        for cfg in &p.add {
            if self.proxy.listener(&cfg.name).is_ok() {
                return Err(format!(
                    "proxy.listeners[{}]: a listener of that name already runs (managed from Docker labels); give the file's listener another name",
                    cfg.name
                ));
            }
        }
        for (name, backends) in &p.swap {
            if backends.is_empty() {
                return Err(format!(
                    "proxy.listeners[{name}].backends: a running listener cannot swap to no backend; give at least one, or remove the listener"
                ));
            }
            let l = self.proxy.listener(name).map_err(|e| e.to_string())?;
            dso_proxy::check_backends(name, l.local_addr(), backends).map_err(|e| e.to_string())?;
        }
        for cfg in p.add.iter().chain(&p.moved) {
            if cfg.listen.port() == 0 {
                continue;
            }
            if let Err(e) = Proxy::check_bind(cfg) {
                // The address may be held by one of our own listeners that this reload
                // removes or moves away: it is still bound while the plan is checked.
                let holder = applied
                    .values()
                    .find(|old| old.listen == cfg.listen && old.name != cfg.name)
                    .map(|old| {
                        format!(
                            " (listener {} holds it: free it in one reload, then take it in the next)",
                            old.name
                        )
                    })
                    .unwrap_or_default();
                return Err(format!("{}{holder}", chain(&e)));
            }
        }
        Ok(())
    }

    /// Applies a checked plan in order, recording each step in `applied` and `report`;
    /// stops at the first failure.
    fn apply(&self, applied: &mut BTreeMap<String, ListenerConfig>, p: Plan, report: &mut Report) {
        let mut todo = steps(&p);
        todo.reverse();
        let fail = |report: &mut Report, todo: Vec<String>, e: String| {
            report.result = if report.added.is_empty()
                && report.moved.is_empty()
                && report.swapped.is_empty()
                && report.updated.is_empty()
                && report.removed.is_empty()
            {
                Outcome::Failed
            } else {
                Outcome::Partial
            };
            report.not_applied = todo.into_iter().rev().collect();
            report.error = Some(e);
        };
        for cfg in p.add {
            match self.proxy.add_listener(cfg.clone()) {
                Ok(l) => {
                    report.added.push(Bound {
                        name: cfg.name.clone(),
                        bind: l.local_addr(),
                    });
                    applied.insert(cfg.name.clone(), cfg);
                    todo.pop();
                }
                Err(e) => return fail(report, todo, chain(&e)),
            }
        }
        for cfg in p.moved {
            let from = self.proxy.listener(&cfg.name).map(|l| l.local_addr());
            match self.proxy.replace_listener(cfg.clone(), None) {
                Ok(l) => {
                    report.moved.push(Moved {
                        name: cfg.name.clone(),
                        from: from.unwrap_or(cfg.listen),
                        to: l.local_addr(),
                    });
                    applied.insert(cfg.name.clone(), cfg);
                    todo.pop();
                }
                Err(e) => return fail(report, todo, chain(&e)),
            }
        }
        for (name, backends) in p.swap {
            let swapped = self
                .proxy
                .listener(&name)
                .and_then(|l| l.swap(backends.clone(), None));
            match swapped {
                Ok(s) => {
                    report.swapped.push(Swapped {
                        name: name.clone(),
                        generation: s.generation,
                        previous: s.previous,
                    });
                    if let Some(a) = applied.get_mut(&name) {
                        a.backends = backends;
                    }
                    todo.pop();
                }
                Err(e) => return fail(report, todo, chain(&e)),
            }
        }
        for (cfg, keys) in p.update {
            match self.proxy.listener(&cfg.name) {
                Ok(l) => {
                    let now = l.update(&cfg);
                    report.updated.push(Updated {
                        name: cfg.name.clone(),
                        keys,
                    });
                    // The socket's settings stay those in force (a restart applies them).
                    if let Some(a) = applied.get_mut(&cfg.name) {
                        *a = ListenerConfig {
                            backends: a.backends.clone(),
                            backlog: a.backlog,
                            keepalive: a.keepalive,
                            ..(*now).clone()
                        };
                    }
                    todo.pop();
                }
                Err(e) => return fail(report, todo, chain(&e)),
            }
        }
        for name in p.remove {
            match self.proxy.retire_listener(&name, None) {
                Ok(generation) => {
                    report.removed.push(Removed {
                        name: name.clone(),
                        generation,
                    });
                    applied.remove(&name);
                    todo.pop();
                }
                Err(e) => return fail(report, todo, chain(&e)),
            }
        }
    }

    /// Logs the outcome and publishes `config.reloaded` or `config.reload_failed`.
    fn publish(&self, trigger: &str, report: &Report) {
        let data = serde_json::to_value(report).unwrap_or_default();
        let mut data = match data {
            serde_json::Value::Object(m) => m,
            _ => serde_json::Map::new(),
        };
        data.insert("trigger".to_owned(), serde_json::json!(trigger));
        match &report.error {
            None => {
                info!(file = %self.path.display(), trigger, result = report.result.as_str(), "config reloaded: {}", report.summary());
                if !report.restart_required.is_empty() {
                    warn!(keys = ?report.restart_required, "config reload: these changed keys need an agent restart; the rest was applied");
                }
                self.events
                    .publish("config.reloaded", serde_json::Value::Object(data));
            }
            Some(e) => {
                let applied = match report.result {
                    Outcome::Partial => report.summary(),
                    _ => "nothing".to_owned(),
                };
                warn!(file = %self.path.display(), trigger, result = report.result.as_str(), applied = %applied, not_applied = ?report.not_applied, error = %e, "config reload failed; the agent keeps serving with the config in force");
                self.events
                    .publish("config.reload_failed", serde_json::Value::Object(data));
            }
        }
    }

    /// Reloads counted by outcome since the agent started.
    pub fn counts(&self) -> [(Outcome, u64); 3] {
        Outcome::ALL.map(|o| (o, self.counts[o as usize].load(Ordering::Relaxed)))
    }
}

/// An error and its causes on one line, like `{:#}`, without a cause that the text
/// already holds (config errors quote serde's message, which is also their source).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out = format!("{out}: {text}");
        }
        cause = c.source();
    }
    out
}

/// The steps of a plan, in the order they are applied, as the answer names them.
fn steps(p: &Plan) -> Vec<String> {
    let mut s = Vec::new();
    s.extend(p.add.iter().map(|c| format!("add {}", c.name)));
    s.extend(p.moved.iter().map(|c| format!("move {} to {}", c.name, c.listen)));
    s.extend(p.swap.iter().map(|(n, _)| format!("swap {n}")));
    s.extend(
        p.update
            .iter()
            .map(|(c, k)| format!("update {} ({})", c.name, k.join(", "))),
    );
    s.extend(p.remove.iter().map(|n| format!("remove {n}")));
    s
}

/// `dso_config_reloads_total{result}` for `/metrics`, zeros included.
#[derive(Debug)]
pub struct ReloadCollector(pub Arc<Reloader>);

impl prometheus_client::collector::Collector for ReloadCollector {
    fn encode(&self, mut enc: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        use prometheus_client::encoding::EncodeMetric;
        let mut m = enc.encode_descriptor(
            "dso_config_reloads",
            "Config reloads (SIGHUP, dso config reload) by result: ok, failed (nothing changed), partial (a step failed while applying).",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (o, n) in self.0.counts() {
            prometheus_client::metrics::counter::ConstCounter::new(n)
                .encode(m.encode_family(&[("result", o.as_str())])?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
