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

/// The running secret side of an agent.
pub struct Secrets {
    /// The watcher over every secret.
    watcher: Watcher,
    /// Local vault files (canonical paths) and the provider instance reading each.
    local_vaults: Vec<(PathBuf, String)>,
    /// What was seen per secret, for the API.
    seen: Arc<Mutex<BTreeMap<String, SecretSeen>>>,
    /// Per-provider counters, for `/metrics`.
    counters: Arc<Mutex<BTreeMap<String, ProviderCounters>>>,
    /// The configured secrets, in file order: name, provider, mapping keys and references.
    secrets: Vec<SecretInfo>,
    /// Delivery into containers, when the agent runs with `--docker`.
    deliverer: std::sync::OnceLock<Arc<crate::delivery::Deliverer>>,
    /// Every configured provider (the same connections the watcher polls through), for
    /// one-off reads ([`Secrets::read_now`]).
    providers: HashMap<String, Arc<dyn Provider>>,
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

/// Counters of one provider instance since the agent started.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProviderCounters {
    /// Snapshots (changes, first deliveries included) whose references use this provider.
    pub changes: u64,
    /// Times the provider went down (calls failing).
    pub outages: u64,
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
    ) -> anyhow::Result<Option<Arc<Secrets>>> {
        if cfg.providers.is_empty() && cfg.secrets.is_empty() {
            return Ok(None);
        }
        let mut providers: HashMap<String, Arc<dyn Provider>> = HashMap::new();
        let mut limits = HashMap::new();
        let mut local_vaults = Vec::new();
        for spec in &cfg.providers {
            if let ProviderSettings::Local(l) = &spec.settings {
                let path = std::fs::canonicalize(&l.vault_file).unwrap_or_else(|_| l.vault_file.clone());
                local_vaults.push((path, spec.name.clone()));
            }
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
        let secrets: Vec<SecretInfo> = cfg
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
            local_vaults,
            seen: Arc::clone(&seen),
            counters: Arc::clone(&counters),
            secrets,
            deliverer: std::sync::OnceLock::new(),
            providers: own,
        });
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

    /// Delivery, when it runs.
    pub fn deliverer(&self) -> Option<&Arc<crate::delivery::Deliverer>> {
        self.deliverer.get()
    }

    /// Every configured provider instance and its kind.
    pub fn provider_kinds(&self) -> BTreeMap<String, ProviderKind> {
        self.providers
            .iter()
            .map(|(n, p)| (n.clone(), p.kind()))
            .collect()
    }

    /// Reads `reference`'s current value once, with the calls the watcher makes on a
    /// change (`version`, then `fetch` of that version, then the field selected), counted
    /// in `dso_secrets_provider_calls_total` like every call. Errors name the provider and
    /// the reference, never a value.
    pub async fn read_now(&self, reference: &Reference) -> Result<(SecretValue, Version), SecretError> {
        let Some(p) = self.providers.get(&reference.provider) else {
            let mut known: Vec<&str> = self.providers.keys().map(String::as_str).collect();
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

    fn on_event(&self, event: Event) {
        match event {
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
                warn!(provider = %provider, error = %error, "provider down; the last good values stay, nothing is triggered");
                self.counters
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(provider)
                    .or_default()
                    .outages += 1;
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

    /// `dso secret set` changed `vault_file`: polls every local provider reading it now.
    /// Returns the provider instances polled.
    pub fn notify_local(&self, vault_file: &Path) -> Vec<String> {
        let path = std::fs::canonicalize(vault_file).unwrap_or_else(|_| vault_file.to_path_buf());
        let hit: Vec<String> = self
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

    /// What `GET /v1/secrets` answers.
    pub async fn status(&self) -> SecretsStatus {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        SecretsStatus {
            secrets: self
                .secrets
                .iter()
                .map(|info| SecretStatus {
                    info: info.clone(),
                    seen: seen.get(&info.name).cloned().unwrap_or_default(),
                })
                .collect(),
            watcher: self.watcher.status().await,
        }
    }

    /// The secret side's metric families in Prometheus text format (see docs/metrics.md).
    pub async fn render_metrics(&self) -> String {
        use std::fmt::Write;
        let counters = self.counters.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let status = self.watcher.status().await;
        let mut out = String::new();
        let mut family = |name: &str, help: &str, kind: &str, rows: Vec<(String, f64)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (provider, v) in rows {
                let _ = writeln!(out, "{name}{{provider=\"{}\"}} {v}", escape(&provider));
            }
        };
        let per = |f: fn(&ProviderCounters) -> u64| -> Vec<(String, f64)> {
            counters.iter().map(|(p, c)| (p.clone(), f(c) as f64)).collect()
        };
        family(
            "dso_secrets_changes_total",
            "Snapshots taken (a change, a first delivery, or a change made while the agent was down) whose references use this provider.",
            "counter",
            per(|c| c.changes),
        );
        family(
            "dso_secrets_provider_outages_total",
            "Times calls to this provider started failing (the last good values stayed).",
            "counter",
            per(|c| c.outages),
        );
        family(
            "dso_secrets_unusable_total",
            "Values read from this provider that could not be used (empty, JSON key missing, not found, forbidden).",
            "counter",
            per(|c| c.unusable),
        );
        let providers = status.map(|s| s.providers).unwrap_or_default();
        family(
            "dso_secrets_provider_up",
            "1 when the provider's last call succeeded, 0 when its calls fail.",
            "gauge",
            providers
                .iter()
                .map(|p| (p.provider.clone(), if p.up { 1.0 } else { 0.0 }))
                .collect(),
        );
        family(
            "dso_secrets_provider_consecutive_failures",
            "Failed calls to the provider since its last success.",
            "gauge",
            providers
                .iter()
                .map(|p| (p.provider.clone(), f64::from(p.consecutive_failures)))
                .collect(),
        );
        family(
            "dso_secrets_last_success_timestamp_seconds",
            "Unix time of the provider's last successful call (absent before the first).",
            "gauge",
            providers
                .iter()
                .filter_map(|p| {
                    p.last_success_unix_ms
                        .map(|ms| (p.provider.clone(), ms as f64 / 1000.0))
                })
                .collect(),
        );
        out.push_str(&render_calls());
        out
    }
}

/// Calls made to each provider instance, by call (`version`, `fetch`) and result (`ok`,
/// `error`; a failed connect counts as an error of the call it was for).
static CALLS: Mutex<BTreeMap<(String, &'static str, &'static str), u64>> = Mutex::new(BTreeMap::new());

fn count_call(provider: &str, call: &'static str, ok: bool) {
    let result = if ok { "ok" } else { "error" };
    *CALLS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry((provider.to_owned(), call, result))
        .or_default() += 1;
}

/// `dso_secrets_provider_calls_total` in Prometheus text format.
fn render_calls() -> String {
    use std::fmt::Write;
    let calls = CALLS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut out = String::from(
        "# HELP dso_secrets_provider_calls_total Calls to the provider: version (metadata only) or fetch (a value), ok or error.\n\
         # TYPE dso_secrets_provider_calls_total counter\n",
    );
    for ((provider, call, result), n) in calls {
        let _ = writeln!(
            out,
            "dso_secrets_provider_calls_total{{provider=\"{}\",call=\"{call}\",result=\"{result}\"}} {n}",
            escape(&provider)
        );
    }
    out
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("secrets", &self.secrets.len())
            .field("local_vaults", &self.local_vaults)
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

    async fn version(&self, reference: &Reference) -> Result<Version, SecretError> {
        let r = match self.get().await {
            Ok(p) => p.version(reference).await,
            Err(e) => Err(e),
        };
        count_call(&self.spec.name, "version", r.is_ok());
        r
    }

    async fn fetch(&self, reference: &Reference, version: &Version) -> Result<SecretValue, SecretError> {
        let r = match self.get().await {
            Ok(p) => p.fetch(reference, version).await,
            Err(e) => Err(e),
        };
        count_call(&self.spec.name, "fetch", r.is_ok());
        r
    }

    async fn check(&self) -> Result<CheckReport, SecretError> {
        self.get().await?.check().await
    }
}
