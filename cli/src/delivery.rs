//! The agent's delivery wiring: which services consume which secrets (from the rotator's
//! scans), one watcher consumer per service (`svc:PROJECT/SERVICE`, all its secrets' mappings,
//! so a change of several secrets is one snapshot and one rotation), and each snapshot
//! handed to the rotator as a rotation carrying the values (`docs/injection.md`).
//!
//! A snapshot's versions are recorded as applied only when its rotation succeeded; a
//! failed one is remembered per service and not retried until a provider reports another
//! version or `dso rotate SERVICE --force`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use dso_rotator::delivery::{Bundle, Delivery, DeliveryConfig, store::StoreOptions};
use dso_rotator::labels::{self, ServiceKey};
use dso_rotator::{Scan, Strategy};
use dso_secrets::config::{SecretSpec, SecretsConfig, Strategy as SecretStrategy};
use dso_secrets::watcher::Snapshot;
use dso_secrets::{Reference, Version};
use prometheus_client::metrics::histogram::Histogram;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::DeliverySettings;
use crate::docker::Docker;
use crate::secrets::Secrets;

/// The consumer prefix of a service.
pub const SERVICE_CONSUMER: &str = "svc:";

/// The record, in the watcher's state directory, of the versions whose delivery to a
/// service failed (`failed:svc:PROJECT/SERVICE`), so that an agent restart does not try
/// them again. No consumer is ever watched under this name.
fn failed_record(service: &str) -> String {
    format!("failed:{SERVICE_CONSUMER}{service}")
}

/// Opens the delivery store (mounting its tmpfs when needed) for the configured secrets.
pub fn open(settings: &DeliverySettings, cfg: &SecretsConfig) -> anyhow::Result<Arc<Delivery>> {
    let d = Delivery::new(DeliveryConfig {
        root: settings.root.clone(),
        store: StoreOptions {
            mount: settings.mount_tmpfs,
            size_bytes: settings.size_bytes,
        },
        launcher: settings.launcher_path(),
        secrets: cfg.secrets.clone(),
        providers: cfg.providers.iter().map(|p| (p.name.clone(), p.kind())).collect(),
    })
    .with_context(|| {
        format!(
            "opening the secret store at {} (agent.delivery.root)",
            settings.root.display()
        )
    })?;
    info!(root = %settings.root.display(), launcher = ?settings.launcher_path(), "secret delivery ready (tmpfs checked)");
    for s in &cfg.secrets {
        if matches!(
            s.inject,
            dso_secrets::config::InjectSpec::Env {
                env_mode: dso_secrets::config::EnvMode::Native
            }
        ) {
            warn!(
                secret = %s.name,
                "inject.env_mode: native puts this secret's values in the containers' Config.Env: `docker inspect` shows them, and Docker writes them to /var/lib/docker/containers/ID/config.v2.json and containerd's metadata under /var/lib/docker/containerd/, where they stay after `docker rm`; use file injection or env_mode: launcher to keep them off the disk"
            );
        }
    }
    Ok(Arc::new(d))
}

/// One service's consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Consumer {
    key: ServiceKey,
    /// `(secret, mapping key)` in watcher mapping order.
    pairs: Vec<(String, String)>,
    /// Watcher mappings (`secret/key`, reference).
    mappings: Vec<(String, Reference)>,
}

/// What `GET /v1/delivery` shows per service.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServiceDelivery {
    /// `project/service`.
    pub service: String,
    /// Secrets it consumes.
    pub secrets: Vec<String>,
    /// Deliveries that succeeded since the agent started.
    pub delivered: u64,
    /// Deliveries whose rotation failed.
    pub failed: u64,
    /// Versions of the last successful delivery (`reference -> version`).
    pub versions: BTreeMap<String, String>,
    /// Versions whose rotation failed and that are not retried (`reference -> version`).
    pub failed_versions: BTreeMap<String, String>,
    /// The last failure, redacted.
    pub last_error: Option<String>,
    /// Unix ms of the last delivery attempt.
    pub last_attempt_unix_ms: Option<u64>,
}

/// Follows scans, keeps the watcher's service consumers, rotates on snapshots.
pub struct Deliverer {
    secrets: Arc<Secrets>,
    docker: Arc<Docker>,
    delivery: Arc<Delivery>,
    /// The `secrets[]` in force (a config reload replaces them, [`Deliverer::follow_secrets`]).
    specs: std::sync::RwLock<Vec<SecretSpec>>,
    consumers: Mutex<HashMap<String, Consumer>>,
    status: Mutex<BTreeMap<String, ServiceDelivery>>,
    /// Consumers whose first delivery was asked for and has not ended yet, with when it
    /// was asked: a scan does not ask again meanwhile (a failed one is asked again after
    /// [`FIRST_RETRY`]).
    first_asked: Mutex<HashMap<String, std::time::Instant>>,
    /// Consumers whose next snapshot may retry failed versions (`--force`).
    forced: Mutex<std::collections::HashSet<String>>,
    /// `agent.rotation.health_check_timeout`, for containers without `dso.health.timeout`.
    health_timeout: std::time::Duration,
    /// Seconds from the watcher having a snapshot's versions (`Snapshot::noticed`) to the
    /// end of the rotation that delivered them, for deliveries that succeeded.
    latency: Histogram,
}

/// Upper bounds (seconds) of [`Deliverer::latency`]'s buckets: a debounce (2 s by default)
/// plus a rotation, from an in-place update to a rolling one waiting for health checks.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// How long a first delivery that has not ended (or failed) keeps a scan from asking again.
const FIRST_RETRY: std::time::Duration = std::time::Duration::from_secs(300);

impl std::fmt::Debug for Deliverer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliverer").finish_non_exhaustive()
    }
}

impl Deliverer {
    /// Starts following the rotator's scans; registers itself with the secret side so
    /// that service snapshots reach it.
    pub fn start(
        secrets: Arc<Secrets>,
        docker: Arc<Docker>,
        delivery: Arc<Delivery>,
        cfg: SecretsConfig,
        stop: CancellationToken,
    ) -> Arc<Deliverer> {
        let me = Arc::new(Deliverer {
            secrets: Arc::clone(&secrets),
            docker,
            delivery,
            specs: std::sync::RwLock::new(cfg.secrets),
            consumers: Mutex::default(),
            status: Mutex::default(),
            first_asked: Mutex::default(),
            forced: Mutex::default(),
            health_timeout: cfg.rotation.health_check_timeout,
            latency: Histogram::new(LATENCY_BUCKETS),
        });
        secrets.set_deliverer(Arc::clone(&me));
        let follow = Arc::clone(&me);
        tokio::spawn(async move {
            let mut scans = follow.docker.rotator.subscribe_scans();
            loop {
                let scan = scans.borrow_and_update().clone();
                if let Some(scan) = scan {
                    follow.on_scan(&scan);
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    r = scans.changed() => if r.is_err() { return },
                }
            }
        });
        me
    }

    /// Brings the watcher's service consumers in line with a scan.
    fn on_scan(&self, scan: &Scan) {
        let watcher = self.secrets.watcher();
        let mut consumers = self.consumers.lock().unwrap_or_else(|e| e.into_inner());
        let mut seen = Vec::new();
        for m in scan.services.values() {
            let Some(c) = m.containers.iter().find(|c| c.running).or(m.containers.first()) else {
                continue;
            };
            let consumed = self.delivery.consumed(c);
            if consumed.is_empty() {
                continue;
            }
            if !self.delivery.declared(c).is_empty() {
                // A `dso up` service: a later container of it without the label (a plain
                // `docker compose up`) is reported (`Docker::recreated_without_override`).
                self.docker.compose.remember(&m.key);
            }
            let id = format!("{SERVICE_CONSUMER}{}", m.key);
            seen.push(id.clone());
            let mut pairs = Vec::new();
            let mut mappings = Vec::new();
            for s in &consumed {
                for (k, r) in &s.mappings {
                    pairs.push((s.name.clone(), k.clone()));
                    mappings.push((format!("{}/{k}", s.name), r.clone()));
                }
            }
            let want = Consumer {
                key: m.key.clone(),
                pairs,
                mappings,
            };
            // A running container without dso's secret directory needs its first delivery:
            // forgetting the applied record makes the watcher hand out the current values.
            // So does one whose directory was lost (a tmpfs gone at a reboot while the
            // applied record on disk stayed).
            let undelivered = m
                .containers
                .iter()
                .any(|c| c.running && !self.delivery.has_files(c));
            let changed = consumers.get(&id) != Some(&want);
            let ask_first = undelivered && {
                let mut asked = self.first_asked.lock().unwrap_or_else(|e| e.into_inner());
                match asked.get(&id) {
                    Some(t) if t.elapsed() < FIRST_RETRY => false,
                    _ => {
                        asked.insert(id.clone(), std::time::Instant::now());
                        true
                    }
                }
            };
            if !changed && !ask_first {
                continue;
            }
            if ask_first {
                // Forgetting the applied record makes the watcher hand out the current
                // values again (also for a container recreated outside dso while the
                // service stayed followed).
                if let Err(e) = watcher.state().forget(&id) {
                    warn!(service = %m.key, error = %e, "cannot reset the applied versions for a first delivery");
                }
                info!(service = %m.key, "a container has no dso secret directory yet: its secrets are read for a first delivery");
            }
            if changed || ask_first {
                if let Err(e) = watcher.watch(id.clone(), want.mappings.clone()) {
                    warn!(service = %m.key, error = %e, "cannot watch the service's secrets");
                    continue;
                }
                self.status
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(m.key.to_string())
                    .or_insert_with(|| ServiceDelivery {
                        service: m.key.to_string(),
                        // Versions that failed before a restart stay failed.
                        failed_versions: self.failed_before(&m.key.to_string()),
                        ..Default::default()
                    })
                    .secrets = consumed.iter().map(|s| s.name.clone()).collect();
                consumers.insert(id, want);
            }
        }
        consumers.retain(|id, c| {
            let keep = seen.contains(id);
            if !keep {
                info!(service = %c.key, "service gone or consumes no secret any more; its secrets are no longer watched for it");
                watcher.unwatch(id);
            }
            keep
        });
    }

    /// A config reload changed the `secrets[]` (to `specs`), the providers in force (to
    /// `providers`, which containers' `dso.refs` resolve against) and removed `gone_providers`
    /// (whose consumers the watcher no longer watches): services' consumers are brought in
    /// line with the new set now, from the last scan, as a scan would. A service that
    /// consumes a new secret gets it like any change of its secrets (its rotation), the
    /// same as after an agent restart with the new file.
    pub fn follow_secrets(
        &self,
        specs: Vec<SecretSpec>,
        providers: BTreeMap<String, dso_secrets::ProviderKind>,
        gone_providers: &[String],
    ) {
        self.delivery.set_secrets(specs.clone());
        self.delivery.set_providers(providers);
        *self.specs.write().unwrap_or_else(|e| e.into_inner()) = specs;
        if !gone_providers.is_empty() {
            self.consumers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|_, c| {
                    !c.mappings
                        .iter()
                        .any(|(_, r)| gone_providers.contains(&r.provider))
                });
        }
        let scan = self.docker.rotator.subscribe_scans().borrow().clone();
        if let Some(scan) = scan {
            self.on_scan(&scan);
        }
    }

    /// The delivery store and planner.
    pub fn delivery(&self) -> &Arc<Delivery> {
        &self.delivery
    }

    /// The watcher consumer of a service.
    pub fn consumer_of(service: &ServiceKey) -> String {
        format!("{SERVICE_CONSUMER}{service}")
    }

    /// Whether a consumer id is a service's.
    pub fn is_service_consumer(id: &str) -> bool {
        id.starts_with(SERVICE_CONSUMER)
    }

    /// A service's snapshot: one rotation carrying every value.
    pub fn on_snapshot(self: &Arc<Self>, snap: Snapshot) {
        let Some(c) = self
            .consumers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&snap.consumer)
            .cloned()
        else {
            return;
        };
        let versions: BTreeMap<String, String> = snap
            .versions
            .iter()
            .map(|(r, v)| (r.raw.clone(), v.to_string()))
            .collect();
        let service = c.key.to_string();
        {
            let status = self.status.lock().unwrap_or_else(|e| e.into_inner());
            let forced = self
                .forced
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&snap.consumer);
            if let Some(s) = status.get(&service)
                && !forced
                && !s.failed_versions.is_empty()
                && s.failed_versions == versions
            {
                info!(service = %service, "these versions already failed to roll out; waiting for a new version or `dso rotate {service} --force`");
                self.docker.events().publish(
                    "delivery.held",
                    serde_json::json!({ "service": service, "versions": versions }),
                );
                return;
            }
        }
        if snap.values.len() != c.pairs.len() {
            warn!(service = %service, "snapshot does not match the service's mappings; skipped");
            return;
        }
        let mut values = Vec::with_capacity(c.pairs.len());
        for ((secret, key), (_, v)) in c.pairs.iter().zip(snap.values) {
            values.push((secret.clone(), key.clone(), v));
        }
        let labels_strategy = self.label_strategy(&c.key);
        let strategy = if self.rotation_disabled(&c.pairs) {
            // `rotation.enabled: false` on every secret: files in place, whatever the label.
            Some(Strategy::None)
        } else {
            match labels_strategy {
                Some(_) => None,
                None => self.secret_strategy(&c.pairs),
            }
        };
        let bundle = Arc::new(Bundle::new(
            values,
            versions.iter().map(|(r, v)| format!("{r}@{v}")).collect(),
        ));
        info!(service = %service, first = snap.first, versions = ?versions, strategy = ?strategy.or(labels_strategy), "delivering changed secrets");
        let (tx, rx) = tokio::sync::oneshot::channel();
        let id = self.docker.submit_request(
            dso_rotator::RotateRequest {
                target: service.clone(),
                strategy,
                secrets: Some(bundle),
                signal: self.secret_signal(&c.pairs),
                health_timeout: Some(self.health_timeout),
                ..Default::default()
            },
            Some(tx),
        );
        let me = Arc::clone(self);
        let consumer = snap.consumer.clone();
        let noticed = snap.noticed;
        let applied: Vec<(Reference, Version)> = snap.versions;
        tokio::spawn(async move {
            let outcome = rx
                .await
                .unwrap_or_else(|_| Err("the rotation task ended without a result".to_owned()));
            let mut status = me.status.lock().unwrap_or_else(|e| e.into_inner());
            let s = status.entry(service.clone()).or_insert_with(|| ServiceDelivery {
                service: service.clone(),
                ..Default::default()
            });
            s.last_attempt_unix_ms = Some(now_ms());
            match outcome {
                Ok(_) => {
                    me.latency.observe(noticed.elapsed().as_secs_f64());
                    me.first_asked
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&consumer);
                    if let Err(e) = me.secrets.watcher().applied(&consumer, &applied) {
                        warn!(service = %service, error = %e, "cannot record the delivered versions; an agent restart delivers them again");
                    }
                    s.delivered += 1;
                    s.versions = versions;
                    s.failed_versions.clear();
                    s.last_error = None;
                    me.record_failed(&service, None);
                    info!(service = %service, rotation = %id, "secrets delivered");
                }
                Err(e) => {
                    s.failed += 1;
                    s.failed_versions = versions;
                    s.last_error = Some(e.clone());
                    me.record_failed(&service, Some(&applied));
                    warn!(service = %service, rotation = %id, error = %e, "delivery failed; the running container keeps its current values");
                    me.docker.events().publish(
                        "delivery.failed",
                        serde_json::json!({
                            "service": service,
                            "id": id,
                            "versions": s.failed_versions,
                            "error": e,
                        }),
                    );
                }
            }
        });
    }

    /// `dso rotate SERVICE --refresh` / `--force`: reads the providers now and delivers
    /// their current values (`force` also retries versions that failed). Returns false
    /// when the service consumes no secret.
    pub fn refresh(&self, service: &ServiceKey, force: bool) -> bool {
        let id = format!("{SERVICE_CONSUMER}{service}");
        let Some(c) = self
            .consumers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
        else {
            return false;
        };
        if force {
            self.forced
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id.clone());
            self.record_failed(&service.to_string(), None);
        }
        let watcher = self.secrets.watcher();
        if let Err(e) = watcher.state().forget(&id) {
            warn!(service = %service, error = %e, "cannot reset the applied versions");
        }
        if let Err(e) = watcher.watch(id, c.mappings) {
            warn!(service = %service, error = %e, "cannot watch the service's secrets");
            return false;
        }
        watcher.trigger(dso_secrets::watcher::Trigger::All);
        true
    }

    /// The versions recorded as failed for `service` (`reference -> version`), empty when
    /// none (or the record cannot be read: logged).
    fn failed_before(&self, service: &str) -> BTreeMap<String, String> {
        match self.secrets.watcher().state().load(&failed_record(service)) {
            Ok(Some(rec)) => rec
                .into_iter()
                .map(|((_, reference), v)| (reference, v.to_string()))
                .collect(),
            Ok(None) => BTreeMap::new(),
            Err(e) => {
                warn!(service, error = %e, "cannot read the versions that failed before; they may be tried once more");
                BTreeMap::new()
            }
        }
    }

    /// Records `versions` as failed for `service` (replacing an earlier record), or removes
    /// the record (`None`: a delivery succeeded, or `--force`).
    fn record_failed(&self, service: &str, versions: Option<&[(Reference, Version)]>) {
        let state = self.secrets.watcher().state();
        let id = failed_record(service);
        let r = state
            .forget(&id)
            .and_then(|()| versions.map_or(Ok(()), |v| state.mark_applied(&id, v)));
        if let Err(e) = r {
            warn!(service, error = %e, "cannot record the versions that failed; an agent restart may try them once more");
        }
    }

    /// Per-service delivery status.
    pub fn status(&self) -> Vec<ServiceDelivery> {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Delivery latency of the deliveries that succeeded (see [`LATENCY_BUCKETS`]).
    pub fn latency(&self) -> &Histogram {
        &self.latency
    }
}

impl Deliverer {
    /// The `dso.update.strategy` label of the service's first container, when set.
    fn label_strategy(&self, key: &ServiceKey) -> Option<Strategy> {
        let rx = self.docker.rotator.subscribe_scans();
        let scan = rx.borrow().clone()?;
        let m = scan.services.get(key)?;
        let v = m.containers.first()?.labels.get(labels::STRATEGY)?;
        v.trim().parse().ok().filter(|s| *s != Strategy::Auto)
    }

    /// Whether every secret of the service has `rotation.enabled: false`.
    fn rotation_disabled(&self, pairs: &[(String, String)]) -> bool {
        let specs = self.specs.read().unwrap_or_else(|e| e.into_inner());
        let mut used = specs
            .iter()
            .filter(|s| pairs.iter().any(|(n, _)| *n == s.name))
            .peekable();
        used.peek().is_some() && used.all(|s| !s.rotation.enabled)
    }

    /// The `rotation.signal` of the first of the service's secrets whose strategy is
    /// `signal` (the container's `dso.signal` label still wins).
    fn secret_signal(&self, pairs: &[(String, String)]) -> Option<String> {
        self.specs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|s| pairs.iter().any(|(n, _)| *n == s.name))
            .find(|s| s.rotation.strategy == SecretStrategy::Signal)
            .map(|s| s.rotation.signal.clone())
    }

    /// The strategy the service's secrets ask for: the one replacing the most (restart
    /// over rolling over signal over none); `None` (the rotator's own choice) for `auto`.
    fn secret_strategy(&self, pairs: &[(String, String)]) -> Option<Strategy> {
        let rank = |s: Strategy| match s {
            Strategy::Restart => 4,
            Strategy::Rolling => 3,
            Strategy::Signal => 2,
            Strategy::None => 1,
            Strategy::Auto => 0,
        };
        let mut best: Option<Strategy> = None;
        for spec in self
            .specs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|s| pairs.iter().any(|(n, _)| *n == s.name))
        {
            let s = if !spec.rotation.enabled {
                Strategy::None
            } else {
                match spec.rotation.strategy {
                    SecretStrategy::Rolling => Strategy::Rolling,
                    SecretStrategy::Restart => Strategy::Restart,
                    SecretStrategy::Signal => Strategy::Signal,
                    SecretStrategy::None => Strategy::None,
                    SecretStrategy::Auto => Strategy::Auto,
                }
            };
            if best.is_none_or(|b| rank(s) > rank(b)) {
                best = Some(s);
            }
        }
        best.filter(|s| *s != Strategy::Auto)
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
