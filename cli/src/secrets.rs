//! The agent's secret side: every configured provider (connected lazily, so an outage at
//! start is an outage like any other), one [`Watcher`] over every `secrets:` entry, and
//! what the API and `/metrics` show of them.
//!
//! Each `secrets[]` entry is one watcher consumer, `secret:NAME`. Delivery into
//! containers is not part of this module: a snapshot is recorded (versions, time, count)
//! and acknowledged as taken, and its values are dropped (zeroed) here; the watcher keeps
//! the one copy per object it needs to notice a change.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use async_trait::async_trait;
use dso_secrets::config::SecretsConfig;
use dso_secrets::spec::ProviderSettings;
use dso_secrets::watcher::{Event, Status, Trigger, WatchSettings, Watched, Watcher};
use dso_secrets::{
    CheckReport, Error as SecretError, Provider, ProviderKind, ProviderSpec, Reference, SecretValue, Version,
};
use serde::Serialize;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The consumer id of a `secrets[]` entry.
fn consumer_of(secret: &str) -> String {
    format!("secret:{secret}")
}

/// The secret side of the agent's process, once started (the config reload reads it).
static RUNNING: Mutex<Option<std::sync::Weak<Secrets>>> = Mutex::new(None);

/// The agent's running secret side, if [`Secrets::start`] started one in this process.
pub fn running() -> Option<Arc<Secrets>> {
    RUNNING
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .and_then(std::sync::Weak::upgrade)
}

/// What follows the config in force: changed together by a reload ([`Secrets::apply`]).
struct Sets {
    /// The providers and secrets in force (the last reload's, or the start's).
    cfg: SecretsConfig,
    /// Local vault files (canonical paths) and the provider instance reading each.
    local_vaults: Vec<(PathBuf, String)>,
    /// The configured secrets, in file order: name, provider, mapping keys and references.
    secrets: Vec<SecretInfo>,
    /// The provider instances each secret's references read, for [`Secrets::poke`].
    providers_of: BTreeMap<String, Vec<String>>,
    /// Every configured provider (the same connections the watcher polls through), for
    /// one-off reads ([`Secrets::read_now`]).
    providers: HashMap<String, Arc<dyn Provider>>,
}

impl Sets {
    fn new(cfg: &SecretsConfig, providers: HashMap<String, Arc<dyn Provider>>) -> Sets {
        let local_vaults = cfg
            .providers
            .iter()
            .filter_map(|spec| match &spec.settings {
                ProviderSettings::Local(l) => {
                    let path = std::fs::canonicalize(&l.vault_file).unwrap_or_else(|_| l.vault_file.clone());
                    Some((path, spec.name.clone()))
                }
                _ => None,
            })
            .collect();
        let secrets = cfg
            .secrets
            .iter()
            .map(|s| SecretInfo {
                name: s.name.clone(),
                provider: s.provider.clone(),
                mappings: s
                    .mappings
                    .iter()
                    .map(|(k, r)| (k.clone(), r.raw.clone()))
                    .collect(),
            })
            .collect();
        let providers_of = cfg
            .secrets
            .iter()
            .map(|s| {
                let mut p: Vec<String> = s.mappings.iter().map(|(_, r)| r.provider.clone()).collect();
                p.sort();
                p.dedup();
                (s.name.clone(), p)
            })
            .collect();
        Sets {
            cfg: cfg.clone(),
            local_vaults,
            secrets,
            providers_of,
            providers,
        }
    }
}

/// What a reload changes of the providers and secrets, by name (never a value). A
/// provider or secret whose settings changed is replaced: removed and added again.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct SecretsDiff {
    /// `providers[NAME]` new in the file.
    pub providers_added: Vec<String>,
    /// `providers[NAME]` no longer in the file.
    pub providers_removed: Vec<String>,
    /// `providers[NAME]` whose settings changed.
    pub providers_replaced: Vec<String>,
    /// `secrets[NAME]` new in the file.
    pub secrets_added: Vec<String>,
    /// `secrets[NAME]` no longer in the file.
    pub secrets_removed: Vec<String>,
    /// `secrets[NAME]` whose entry changed.
    pub secrets_replaced: Vec<String>,
}

impl SecretsDiff {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self == &SecretsDiff::default()
    }

    /// The steps, as a reload's answer names them (`add provider NAME`, ...).
    pub fn steps(&self) -> Vec<String> {
        let mut s = Vec::new();
        let mut push = |verb: &str, what: &str, names: &[String]| {
            s.extend(names.iter().map(|n| format!("{verb} {what} {n}")));
        };
        push("add", "provider", &self.providers_added);
        push("replace", "provider", &self.providers_replaced);
        push("add", "secret", &self.secrets_added);
        push("replace", "secret", &self.secrets_replaced);
        push("remove", "secret", &self.secrets_removed);
        push("remove", "provider", &self.providers_removed);
        s
    }
}

/// The difference between the providers and secrets of `old` and `new`. Pure.
///
/// The provider specs have no `PartialEq` (they hold credentials); their `Debug` text
/// names every setting, is compared in memory only and never printed. A credential's
/// `Debug` hides its value, so a changed value behind the same file or variable name is
/// not a change of the config (it is read when used).
pub fn diff(old: &SecretsConfig, new: &SecretsConfig) -> SecretsDiff {
    let mut d = SecretsDiff::default();
    let text = |c: &SecretsConfig| -> BTreeMap<String, String> {
        c.providers
            .iter()
            .map(|p| (p.name.clone(), format!("{p:?}")))
            .collect()
    };
    let (a, b) = (text(old), text(new));
    for (name, spec) in &b {
        match a.get(name) {
            None => d.providers_added.push(name.clone()),
            Some(o) if o != spec => d.providers_replaced.push(name.clone()),
            Some(_) => {}
        }
    }
    d.providers_removed = a.keys().filter(|n| !b.contains_key(*n)).cloned().collect();
    let by_name = |c: &SecretsConfig| -> BTreeMap<String, dso_secrets::config::SecretSpec> {
        c.secrets.iter().map(|s| (s.name.clone(), s.clone())).collect()
    };
    let (a, b) = (by_name(old), by_name(new));
    for (name, spec) in &b {
        match a.get(name) {
            None => d.secrets_added.push(name.clone()),
            Some(o) if o != spec => d.secrets_replaced.push(name.clone()),
            Some(_) => {}
        }
    }
    d.secrets_removed = a.keys().filter(|n| !b.contains_key(*n)).cloned().collect();
    d
}

/// The providers a reload connected before changing anything (added and replaced ones).
pub struct Connected(HashMap<String, Arc<dyn Provider>>);

impl std::fmt::Debug for Connected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

/// The running secret side of an agent.
pub struct Secrets {
    /// The watcher over every secret.
    watcher: Watcher,
    /// What was seen per secret, for the API.
    seen: Arc<Mutex<BTreeMap<String, SecretSeen>>>,
    /// Per-provider counters, for `/metrics`.
    counters: Arc<Mutex<BTreeMap<String, ProviderCounters>>>,
    /// Delivery into containers, when the agent runs with `--docker`.
    deliverer: std::sync::OnceLock<Arc<crate::delivery::Deliverer>>,
    /// The agent's event bus (`secret.changed`, `provider.down`, `provider.up`).
    events: crate::events::Bus,
    /// The providers and secrets in force, and what is derived from them.
    sets: std::sync::RwLock<Sets>,
    /// The Swarm secret driver's rotation, when it runs: where `swarm:` consumers'
    /// snapshots go (their values dropped here).
    swarm: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<crate::swarm::Change>>,
}

/// A configured secret as the API shows it (no value).
#[derive(Debug, Clone, Serialize)]
pub struct SecretInfo {
    /// `secrets[].name`.
    pub name: String,
    /// Provider instance.
    pub provider: String,
    /// Mapping key (name inside the container) and reference text.
    pub mappings: Vec<(String, String)>,
}

/// What the agent last saw of one secret.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SecretSeen {
    /// Versions of the last snapshot taken, per reference text.
    pub versions: BTreeMap<String, String>,
    /// When that snapshot was taken (Unix ms).
    pub taken_unix_ms: Option<u64>,
    /// Snapshots taken since the agent started (the first one included).
    pub snapshots: u64,
    /// Why a reference could not be used, when it could not (never a value).
    pub unusable: Option<String>,
}

/// Counters of one provider instance since the agent started, kept from the watcher's
/// events (the watcher's own per-provider counters are in [`Watcher::provider_stats`]).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProviderCounters {
    /// Snapshots (changes, first deliveries included) whose references use this provider.
    pub changes: u64,
    /// Unusable-value events.
    pub unusable: u64,
}

/// `GET /v1/secrets`.
#[derive(Debug, Serialize)]
pub struct SecretsStatus {
    /// Configured secrets.
    pub secrets: Vec<SecretStatus>,
    /// The watcher's view: providers and polled objects.
    pub watcher: Option<Status>,
}

/// One secret in `GET /v1/secrets`.
#[derive(Debug, Serialize)]
pub struct SecretStatus {
    /// Name, provider, mappings.
    #[serde(flatten)]
    pub info: SecretInfo,
    /// What was last seen.
    #[serde(flatten)]
    pub seen: SecretSeen,
}

impl Secrets {
    /// Starts the secret side when the config has providers or secrets; `None` otherwise.
    /// Providers connect on first use: one that is down at start is retried by the
    /// watcher's backoff like any outage, and shows in the status meanwhile.
    pub fn start(
        cfg: &SecretsConfig,
        state_dir: &Path,
        stop: CancellationToken,
        bus: crate::events::Bus,
    ) -> anyhow::Result<Option<Arc<Secrets>>> {
        if cfg.providers.is_empty() && cfg.secrets.is_empty() {
            return Ok(None);
        }
        let mut providers: HashMap<String, Arc<dyn Provider>> = HashMap::new();
        let mut limits = HashMap::new();
        for spec in &cfg.providers {
            limits.insert(spec.name.clone(), spec.limits.clone());
            providers.insert(spec.name.clone(), Arc::new(Lazy::new(spec.clone())));
        }
        let items: Vec<Watched> = cfg
            .secrets
            .iter()
            .map(|s| Watched {
                consumer: consumer_of(&s.name),
                mappings: s.mappings.clone(),
            })
            .collect();
        let factor = (cfg.watch.max_interval.as_secs_f64()
            / cfg.watch.polling_interval.as_secs_f64().max(1e-3))
        .floor()
        .clamp(1.0, 1000.0) as u32;
        let settings = WatchSettings {
            interval: cfg.watch.polling_interval,
            max_backoff_factor: factor,
            debounce: cfg.watch.debounce,
            jitter: cfg.watch.jitter,
            limits,
            ..WatchSettings::default()
        };
        let dir = state_dir.join("secrets");
        let own: HashMap<String, Arc<dyn Provider>> = providers
            .iter()
            .map(|(k, p)| (k.clone(), Arc::clone(p)))
            .collect();
        let (watcher, mut events) = Watcher::start(items, providers, settings, &dir, stop)
            .with_context(|| format!("starting the secret watcher on state directory {}", dir.display()))?;
        let seen: Arc<Mutex<BTreeMap<String, SecretSeen>>> = Arc::default();
        let counters: Arc<Mutex<BTreeMap<String, ProviderCounters>>> = Arc::new(Mutex::new(
            cfg.providers
                .iter()
                .map(|p| (p.name.clone(), ProviderCounters::default()))
                .collect(),
        ));
        let secrets = Arc::new(Secrets {
            watcher,
            seen: Arc::clone(&seen),
            counters: Arc::clone(&counters),
            deliverer: std::sync::OnceLock::new(),
            events: bus,
            sets: std::sync::RwLock::new(Sets::new(cfg, own)),
            swarm: std::sync::OnceLock::new(),
        });
        *RUNNING.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::downgrade(&secrets));
        let this = Arc::clone(&secrets);
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                this.on_event(event);
            }
        });
        info!(
            providers = cfg.providers.len(),
            secrets = cfg.secrets.len(),
            state_dir = %dir.display(),
            "secret watcher started"
        );
        Ok(Some(secrets))
    }

    /// Hands service snapshots to delivery from now on.
    pub fn set_deliverer(&self, d: Arc<crate::delivery::Deliverer>) {
        let _ = self.deliverer.set(d);
    }

    /// Hands `swarm:` consumers' changes to the Swarm secret driver from now on.
    pub fn set_swarm(&self, tx: tokio::sync::mpsc::UnboundedSender<crate::swarm::Change>) {
        let _ = self.swarm.set(tx);
    }

    /// Delivery, when it runs.
    pub fn deliverer(&self) -> Option<&Arc<crate::delivery::Deliverer>> {
        self.deliverer.get()
    }

    /// The providers and secrets in force (the start's, or the last reload's): what the Swarm
    /// driver maps labels against.
    pub fn config(&self) -> SecretsConfig {
        self.sets().cfg.clone()
    }

    /// The kind of every provider instance in force.
    pub fn provider_kinds(&self) -> BTreeMap<String, ProviderKind> {
        self.sets()
            .providers
            .iter()
            .map(|(n, p)| (n.clone(), p.kind()))
            .collect()
    }

    /// Reads `reference`'s current value once, with the calls the watcher makes on a
    /// change (`version`, then `fetch` of that version, then the field selected), counted
    /// in `dso_secrets_provider_calls_total` like every call. Errors name the provider and
    /// the reference, never a value.
    pub async fn read_now(&self, reference: &Reference) -> Result<(SecretValue, Version), SecretError> {
        let found = self.sets().providers.get(&reference.provider).cloned();
        let Some(p) = found else {
            let sets = self.sets();
            let mut known: Vec<&str> = sets.providers.keys().map(String::as_str).collect();
            known.sort_unstable();
            return Err(SecretError::Config {
                provider: reference.provider.clone(),
                detail: format!(
                    "reference {:?} names a provider the agent's config does not define (known: {}); add it under providers:",
                    reference.raw,
                    known.join(", ")
                ),
            });
        };
        // As the watcher probes an object: providers read the object whole, whatever the
        // field; the field is selected after.
        let version = p.version(reference).await?;
        let whole = p.fetch(reference, &version).await?;
        Ok((reference.select(&whole)?, version))
    }

    /// The watcher.
    pub fn watcher(&self) -> &Watcher {
        &self.watcher
    }

    fn sets(&self) -> std::sync::RwLockReadGuard<'_, Sets> {
        self.sets.read().unwrap_or_else(|e| e.into_inner())
    }

    /// What a reload to `new` would change of the providers and secrets in force.
    pub fn diff(&self, new: &SecretsConfig) -> SecretsDiff {
        diff(&self.sets().cfg, new)
    }

    /// Connects every provider `d` adds or replaces, before anything is changed: one that
    /// cannot connect fails the reload with an error naming it and the fix (never a
    /// value), and the providers in force keep serving their last good values.
    pub async fn connect(&self, new: &SecretsConfig, d: &SecretsDiff) -> Result<Connected, String> {
        let mut out = HashMap::new();
        for name in d.providers_added.iter().chain(&d.providers_replaced) {
            let Some(spec) = new.providers.iter().find(|p| &p.name == name) else {
                continue;
            };
            match dso_secrets::connect(spec).await {
                Ok(p) => {
                    out.insert(
                        name.clone(),
                        Arc::new(Lazy::connected(spec.clone(), p)) as Arc<dyn Provider>,
                    );
                }
                Err(e) => {
                    let what = if d.providers_added.contains(name) {
                        "is not added"
                    } else {
                        "keeps its settings in force"
                    };
                    let text = dso_secrets::Redactor::global()
                        .redact(&e.to_string())
                        .into_owned();
                    return Err(format!(
                        "providers[{name}]: cannot connect ({} provider): {text}; fix its settings (or make it reachable) and reload again; it {what}",
                        spec.kind().as_str()
                    ));
                }
            }
        }
        Ok(Connected(out))
    }

    /// Applies `d` (checked and connected by [`Secrets::connect`]): providers added and
    /// replaced, secrets added, replaced and removed, providers removed, in that order;
    /// then delivery follows the new set of secrets. Providers and secrets `d` does not
    /// name keep their values, versions and counters. Returns what could not be applied.
    pub fn apply(&self, new: &SecretsConfig, d: &SecretsDiff, connected: Connected) -> Vec<String> {
        let mut failed = Vec::new();
        let mut sets = self.sets.write().unwrap_or_else(|e| e.into_inner());
        let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        for (name, p) in &connected.0 {
            let limits = new
                .providers
                .iter()
                .find(|s| &s.name == name)
                .map(|s| s.limits.clone())
                .unwrap_or_default();
            self.watcher.add_provider(name, Arc::clone(p), limits);
            sets.providers.insert(name.clone(), Arc::clone(p));
            counters.insert(name.clone(), ProviderCounters::default());
        }
        for name in &d.secrets_removed {
            let consumer = consumer_of(name);
            self.watcher.unwatch(&consumer);
            // Added back later, it is read as a new secret (a first snapshot).
            if let Err(e) = self.watcher.state().forget(&consumer) {
                warn!(secret = %name, error = %e, "cannot forget the removed secret's applied versions");
            }
            self.seen.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
        }
        for name in d.secrets_added.iter().chain(&d.secrets_replaced) {
            let Some(spec) = new.secrets.iter().find(|s| &s.name == name) else {
                continue;
            };
            if let Err(e) = self.watcher.watch(consumer_of(name), spec.mappings.clone()) {
                failed.push(format!("secret {name}: {e}"));
            }
        }
        for name in &d.providers_removed {
            self.watcher.remove_provider(name);
            sets.providers.remove(name);
            counters.remove(name);
        }
        let providers = std::mem::take(&mut sets.providers);
        *sets = Sets::new(new, providers);
        drop(counters);
        drop(sets);
        if let Some(deliverer) = self.deliverer.get() {
            // A replaced provider's objects stay watched (read anew through it); a removed
            // one's consumers were unwatched by the watcher.
            // Containers' own `dso.refs` resolve against the providers now in force.
            deliverer.follow_secrets(new.secrets.clone(), self.provider_kinds(), &d.providers_removed);
        }
        failed
    }

    fn on_event(&self, event: Event) {
        self.publish_health(&event);
        match event {
            Event::Snapshot(snap) if snap.consumer.starts_with(crate::swarm::CONSUMER) => {
                // Rotation in Swarm needs the versions only; the values drop (zeroed) here.
                let change = crate::swarm::Change {
                    consumer: snap.consumer.clone(),
                    versions: snap.versions.clone(),
                    first: snap.first,
                };
                match self.swarm.get() {
                    Some(tx) if tx.send(change).is_ok() => {}
                    _ => warn!(consumer = %snap.consumer, "swarm snapshot without the swarm driver; dropped"),
                }
            }
            Event::Unusable {
                consumer,
                reference,
                reason,
            } if consumer.starts_with(crate::swarm::CONSUMER) => {
                warn!(consumer = %consumer, reference = %reference, reason = %reason, "a Swarm secret's value cannot be used; nothing rolls for it");
            }
            Event::Snapshot(snap) if crate::delivery::Deliverer::is_service_consumer(&snap.consumer) => {
                match self.deliverer.get() {
                    Some(d) => d.on_snapshot(snap),
                    None => warn!(consumer = %snap.consumer, "service snapshot without delivery; dropped"),
                }
            }
            Event::Unusable {
                consumer,
                reference,
                reason,
            } if crate::delivery::Deliverer::is_service_consumer(&consumer) => {
                warn!(consumer = %consumer, reference = %reference, reason = %reason, "a secret of this service cannot be used; nothing is delivered to it");
            }
            Event::Snapshot(snap) => {
                let name = snap
                    .consumer
                    .strip_prefix("secret:")
                    .unwrap_or(&snap.consumer)
                    .to_string();
                if !self.sets().secrets.iter().any(|s| s.name == name) {
                    // Removed by a config reload while this snapshot was on its way: it is
                    // not recorded (its values drop, zeroed, here).
                    info!(secret = %name, "snapshot of a secret no longer configured; dropped");
                    return;
                }
                let versions: BTreeMap<String, String> = snap
                    .versions
                    .iter()
                    .map(|(r, v)| (r.raw.clone(), v.to_string()))
                    .collect();
                let providers: Vec<String> = snap.versions.iter().map(|(r, _)| r.provider.clone()).collect();
                info!(
                    secret = %name,
                    first = snap.first,
                    versions = ?versions,
                    keys = snap.values.len(),
                    "secret values taken"
                );
                self.publish_changes(&name, &snap);
                if let Err(e) = self.watcher.applied(&snap.consumer, &snap.versions) {
                    warn!(secret = %name, error = %e, "cannot record the versions taken; an agent restart will take them again");
                }
                {
                    let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
                    let entry = seen.entry(name).or_default();
                    entry.versions = versions;
                    entry.taken_unix_ms = Some(now_ms());
                    entry.snapshots += 1;
                    entry.unusable = None;
                }
                let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
                let mut uniq = providers;
                uniq.sort();
                uniq.dedup();
                for p in uniq {
                    counters.entry(p).or_default().changes += 1;
                }
                // `snap.values` drops here: every value is zeroed.
            }
            Event::ProviderDown { provider, error } => {
                // Counted by the watcher (`ProviderStats::outages`).
                warn!(provider = %provider, error = %error, "provider down; the last good values stay, nothing is triggered");
            }
            Event::ProviderUp { provider } => info!(provider = %provider, "provider answers again"),
            Event::Unusable {
                consumer,
                reference,
                reason,
            } => {
                let name = consumer.strip_prefix("secret:").unwrap_or(&consumer).to_string();
                warn!(secret = %name, reference = %reference, reason = %reason, "secret value cannot be used; nothing is delivered");
                self.seen
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(name)
                    .or_default()
                    .unusable = Some(format!("{}: {reason}", reference.raw));
                self.counters
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(reference.provider.clone())
                    .or_default()
                    .unusable += 1;
            }
        }
    }

    /// `provider.down` (with the redacted error) and `provider.up`: the watcher reports
    /// transitions only, not every failed poll.
    fn publish_health(&self, event: &Event) {
        match event {
            Event::ProviderDown { provider, error } => {
                self.events.publish(
                    "provider.down",
                    serde_json::json!({ "provider": provider, "error": error }),
                );
            }
            Event::ProviderUp { provider } => {
                self.events
                    .publish("provider.up", serde_json::json!({ "provider": provider }));
            }
            _ => {}
        }
    }

    /// `secret.changed` for each reference of a `secrets[]` entry's snapshot whose version
    /// differs from the one last taken (all of them for a first snapshot): names and
    /// versions, never a value. Called before the snapshot's versions are recorded.
    fn publish_changes(&self, name: &str, snap: &dso_secrets::watcher::Snapshot) {
        let old = match self.watcher.state().load(&snap.consumer) {
            Ok(a) => a.unwrap_or_default(),
            Err(e) => {
                warn!(secret = %name, error = %e, "cannot read the versions taken before; secret.changed events carry no old version");
                Default::default()
            }
        };
        for ((key, _), (reference, version)) in snap.values.iter().zip(&snap.versions) {
            let before = old.get(&(reference.provider.clone(), reference.raw.clone()));
            if before == Some(version) {
                continue;
            }
            self.events.publish(
                "secret.changed",
                serde_json::json!({
                    "secret": name,
                    "key": key,
                    "provider": reference.provider,
                    "reference": reference.raw,
                    "old_version": before.map(ToString::to_string),
                    "new_version": version.to_string(),
                    "first": snap.first,
                }),
            );
        }
    }

    /// `dso secret set` changed `vault_file`: polls every local provider reading it now.
    /// Returns the provider instances polled.
    pub fn notify_local(&self, vault_file: &Path) -> Vec<String> {
        let path = std::fs::canonicalize(vault_file).unwrap_or_else(|_| vault_file.to_path_buf());
        let hit: Vec<String> = self
            .sets()
            .local_vaults
            .iter()
            .filter(|(p, _)| *p == path)
            .map(|(_, n)| n.clone())
            .collect();
        for name in &hit {
            self.watcher.trigger(Trigger::Provider(name.clone()));
        }
        hit
    }

    /// "Look now" (`POST /v1/webhook`): polls the providers of secret `name` at once, or
    /// of every secret when `None`. Returns the provider instances polled; `None` when no
    /// secret has that name.
    pub fn poke(&self, name: Option<&str>) -> Option<Vec<String>> {
        let providers = match name {
            Some(n) => self.sets().providers_of.get(n)?.clone(),
            None => {
                let mut all: Vec<String> = self.sets().providers_of.values().flatten().cloned().collect();
                all.sort();
                all.dedup();
                all
            }
        };
        for p in &providers {
            self.watcher.trigger(Trigger::Provider(p.clone()));
        }
        Some(providers)
    }

    /// What `GET /v1/secrets` answers.
    pub async fn status(&self) -> SecretsStatus {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let secrets = self
            .sets()
            .secrets
            .iter()
            .map(|info| SecretStatus {
                info: info.clone(),
                seen: seen.get(&info.name).cloned().unwrap_or_default(),
            })
            .collect();
        SecretsStatus {
            secrets,
            watcher: self.watcher.status().await,
        }
    }

    /// The counters kept from the watcher's events, per provider instance (for
    /// `/metrics`; the watcher's own are [`Watcher::provider_stats`]).
    pub fn event_counters(&self) -> BTreeMap<String, ProviderCounters> {
        self.counters.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sets = self.sets();
        f.debug_struct("Secrets")
            .field("secrets", &sets.secrets.len())
            .field("local_vaults", &sets.local_vaults)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A provider connected on first use. A failed connect is retried at the next call, so
/// a provider that is down when the agent starts is just an outage.
struct Lazy {
    spec: ProviderSpec,
    inner: OnceCell<Arc<dyn Provider>>,
}

impl Lazy {
    fn new(spec: ProviderSpec) -> Lazy {
        Lazy {
            spec,
            inner: OnceCell::new(),
        }
    }

    /// One already connected (by a reload, which checks the connection first).
    fn connected(spec: ProviderSpec, p: Arc<dyn Provider>) -> Lazy {
        Lazy {
            spec,
            inner: OnceCell::new_with(Some(p)),
        }
    }

    async fn get(&self) -> Result<&Arc<dyn Provider>, SecretError> {
        self.inner
            .get_or_try_init(|| dso_secrets::connect(&self.spec))
            .await
    }
}

#[async_trait]
impl Provider for Lazy {
    fn name(&self) -> &str {
        &self.spec.name
    }

    fn kind(&self) -> ProviderKind {
        self.spec.kind()
    }

    fn retries_internally(&self) -> bool {
        // Known before connecting: the AWS provider retries inside the SDK.
        self.spec.kind() == ProviderKind::Aws
    }

    // The watcher counts every attempt (a failed connect as a failed call) in its gate.
    async fn version(&self, reference: &Reference) -> Result<Version, SecretError> {
        self.get().await?.version(reference).await
    }

    async fn fetch(&self, reference: &Reference, version: &Version) -> Result<SecretValue, SecretError> {
        self.get().await?.fetch(reference, version).await
    }

    async fn check(&self) -> Result<CheckReport, SecretError> {
        self.get().await?.check().await
    }
}
